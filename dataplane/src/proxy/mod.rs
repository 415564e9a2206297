//! The FHIR request pipeline, outermost first:
//!
//! ```text
//! handle ── span; rescue (error.rs): the one place errors become OperationOutcome responses
//!   └ pin one config snapshot for the whole request (503 before the first one)
//!     └ normalise the path (400 on irregular forms), refuse ambiguous deciding headers (400), find the table
//!       └ classify the interaction (read, search, history, …; Unknown is denied)
//!         └ authenticate (every interaction except `metadata`): tenant from the token (401)
//!           └ route: the most specific route (404 / 405), size limits (414 / 431)
//!             └ action: deny │ handler │ proxy
//!               └ grants confirmed within the TTL (503); one Access, one `now`; the body read within the budget
//!                 └ plan (policy::planner) ◀─┐  pure: refuse │ need facts │ send one call │ answer
//!                   └ execute (execute.rs) ──┘  facts read; the call sent (credential injected by the upstream
//!                                               client); the answer verified as planned (answers.rs, export.rs,
//!                                               bundle_stream.rs, ndjson_stream.rs)
//! ```

mod answers;
mod bundle_stream;
mod discovery;
mod error;
mod execute;
mod export;
mod filtered_body;
mod headers;
mod ndjson_stream;
mod public;
mod respond;
mod upload;

pub(crate) use headers::request_id;
pub use public::{PublicConfig, PublicConfigError};

use std::convert::Infallible;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use fhirgw_config::Snapshot;
use fhirgw_config::path::NormalPath;
use fhirgw_config::route::Action;
use fhirgw_config::upstream::Upstream;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tracing::{Instrument, info_span, warn};

use self::error::ProxyError;
use self::respond::{bytes_response, bytes_response_with, json_response, validators};
use crate::authn::{AuthError, Authenticator};
use crate::body::Body;
use crate::policy::classify::{Interaction, classify};
use crate::policy::input::{Access, Env, Input, RequestBody};
use crate::policy::paging::PageSigner;
use crate::policy::planner;
use crate::policy::refusal::Refusal;
use crate::state::ConfigState;
use crate::upstream::UpstreamClient;

/// Largest `POST _search` form body.
const FORM_MAX_BYTES: usize = 64 * 1024;
/// Largest other request body (a resource, a patch, a Bundle, `Parameters`).
const BODY_MAX_BYTES: usize = 16 * 1024 * 1024;

pub struct Proxy {
    pub state: Arc<ConfigState>,
    pub upstreams: Arc<UpstreamClient>,
    pub authn: Arc<Authenticator>,
    pub pages: PageSigner,
    pub public: PublicConfig,
    /// Rewritten CapabilityStatements by (config digest, public base, request target), kept for a minute.
    pub capabilities: moka::future::Cache<(String, String, String), Bytes>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Bounds the request bodies buffered at once, process-wide (see `body_budget`).
    pub body_budget: Arc<crate::body_budget::BodyBudget>,
    /// Records every interaction as an AuditEvent (see `audit`).
    pub audit: Arc<crate::audit::Auditor>,
}

impl Proxy {
    pub async fn handle(
        self: Arc<Self>,
        mut request: Request<Incoming>,
        peer: std::net::SocketAddr,
    ) -> Result<Response<Body>, Infallible> {
        // This request's share of the body budget, given back once the response head is ready.
        let lease = crate::body_budget::Lease::new(self.body_budget.clone());
        request.extensions_mut().insert(lease.clone());
        let span = info_span!(
            target: fhirgw_telemetry::TRACE_ONLY,
            "request",
            method = %request.method(),
            route = tracing::field::Empty,
            tenant = tracing::field::Empty,
            config_version = tracing::field::Empty,
            status = tracing::field::Empty,
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
        );
        fhirgw_telemetry::continue_from_headers(&span, request.headers());
        let trace_id = fhirgw_telemetry::trace_id(&span, Some(request.headers()));
        let trace_id_for_abort = trace_id.clone();
        // Metrics and the access line are recorded here only: what the pipeline learned (route, caller), the response
        // as the client gets it. A request dropped before its head (the client went away) is recorded by the guard.
        let in_flight = self.metrics.request_started(request.method()).traced(span.clone(), trace_id_for_abort);
        let mut facts = crate::access_log::Facts::default();
        let trail = self.audit.begin(&request, peer, &self.public);
        let result = self.pipeline(request, peer, &mut facts, &trail).instrument(span.clone()).await;
        let mut reason = result.as_ref().err().map(ProxyError::code);
        let (response, error) = match result {
            Ok(response) => (response, None),
            Err(error) => {
                let mut outcome = error.outcome();
                outcome.trace_id.clone_from(&trace_id);
                if outcome.status.is_server_error() {
                    warn!(parent: &span, error = %error, "request failed");
                } else {
                    tracing::debug!(parent: &span, error = %error, "request refused");
                }
                (outcome.into_response(), Some(error))
            }
        };
        // Recorded before the response head is sent: in strict mode an event that cannot be made durable turns the
        // answer into a 503 (whatever was done upstream is still recorded in the log).
        let error_text = error.as_ref().map(|e| e as &(dyn std::fmt::Display + Sync));
        let recorded = self.audit.finish(&trail, response.status(), response.headers(), error_text, trace_id.clone());
        let response = match recorded.instrument(span.clone()).await {
            Ok(()) => response,
            Err(crate::audit::Unrecorded) => {
                warn!(parent: &span, status = response.status().as_u16(), "answered 503: the request's audit event is not durable");
                reason = Some(ProxyError::AuditUnavailable.code());
                let mut outcome = ProxyError::AuditUnavailable.outcome();
                outcome.trace_id = trace_id;
                outcome.into_response()
            }
        };
        drop(lease);
        span.record("status", response.status().as_u16());
        Ok(in_flight.caller(facts.tenant, facts.client_id, reason).finish(facts.route, response))
    }

    async fn pipeline(
        &self,
        request: Request<Incoming>,
        peer: std::net::SocketAddr,
        facts: &mut crate::access_log::Facts,
        trail: &crate::audit::Trail,
    ) -> Result<Response<Body>, ProxyError> {
        let snapshot = self.state.load().ok_or(ProxyError::NotReady)?;
        let span = tracing::Span::current();
        span.record("config_version", snapshot.digest.as_str());
        let path = NormalPath::parse(request.uri().path())?;
        headers::check_unambiguous(request.headers(), request.method())?;
        let (table, relative) = snapshot.table_for(&path).ok_or(Refusal::NoRoute)?;
        let public = self.public.base(peer, request.uri(), request.headers(), &table.base_path);
        trail.public_base(&public);
        if relative == [".well-known", "smart-configuration"] && request.method() == Method::GET {
            let doc = discovery::smart_configuration(&snapshot).ok_or(Refusal::NoRoute)?;
            let mut response = json_response(StatusCode::OK, &doc, &HeaderMap::new(), false);
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            return Ok(response);
        }
        let interaction = classify(request.method(), relative, request.uri().query().is_some());
        trail.interaction(&interaction, relative);
        // Only the CapabilityStatement is public; everything else needs a caller.
        let caller = if interaction == Interaction::Capabilities {
            None
        } else {
            let authenticated = self
                .authn
                .authenticate(&snapshot, request.headers())
                .instrument(tracing::info_span!(target: fhirgw_telemetry::TRACE_ONLY, "authenticate"))
                .await;
            let caller = match authenticated {
                Ok(caller) => caller,
                Err(e) => {
                    // Recorded under the route it was meant for (which may turn auditing off).
                    if let Some(matched) = table.route(request.method(), relative) {
                        trail.route(matched.route);
                    }
                    return Err(e.into());
                }
            };
            span.record("tenant", caller.tenant.as_str());
            trail.caller(&caller, snapshot.tenants.get(&caller.tenant));
            facts.caller(&caller);
            Some(caller)
        };
        let Some(matched) = table.route(request.method(), relative) else {
            return Err(if table.path_known(relative) { Refusal::MethodNotAllowed } else { Refusal::NoRoute }.into());
        };
        trail.route(matched.route);
        span.record("route", matched.route.id.as_str());
        facts.route = Some(matched.route.id.clone());
        let guard = &matched.route.guard;
        let limit =
            if guard.max_url_bytes == 0 { fhirgw_config::route::DEFAULT_MAX_URL_BYTES } else { guard.max_url_bytes };
        if request.uri().path_and_query().map_or(0, |pq| pq.as_str().len()) > limit as usize {
            return Err(ProxyError::TooLong { limit });
        }
        let header_limit = match guard.max_header_bytes {
            0 => fhirgw_config::route::DEFAULT_MAX_HEADER_BYTES,
            n => n,
        };
        if headers::total_size(request.headers()) > header_limit as usize {
            return Err(ProxyError::HeadersTooLarge { limit: header_limit });
        }
        let (upstream, handler) = match &matched.route.action {
            Action::Deny { status, message } => {
                let (route, status, message) = (matched.route.id.clone(), *status, message.clone());
                return Err(Refusal::Denied { route, status, message }.into());
            }
            Action::Handler { handler, upstream } => (upstream_of(&snapshot, upstream)?, Some(*handler)),
            Action::Proxy { upstream } => (upstream_of(&snapshot, upstream)?, None),
        };
        trail.handler(handler);
        // Strict auditing: nothing is carried out that could not be recorded.
        self.audit.admit(trail).map_err(|_| ProxyError::AuditUnavailable)?;
        let forwarded = headers::for_upstream(
            request.headers(),
            request.method(),
            &matched.route.forward_headers,
            &upstream.strip_request_headers,
        );
        let env = Env { snapshot: &snapshot, upstream: &upstream, public: &public, guard, table, signer: &self.pages };
        let Some(caller) = caller else {
            // Handlers serve callers only (`metadata` is never a handler's).
            if handler.is_some() {
                return Err(AuthError::Missing.into());
            }
            // Boxed: rarer than reads and searches, and inline it would enlarge every request's future.
            return Box::pin(self.capability_statement(&request, relative, &env, &upstream, &forwarded, trail)).await;
        };
        let now = SystemTime::now();
        // Cut off from the control plane for longer than the grant TTL: grants may have been revoked meanwhile.
        if self.state.grants_stale(now) {
            return Err(ProxyError::GrantsStale);
        }
        let access = Access::new(&caller.tenant, caller.scopes.clone(), caller.patient.clone(), &snapshot, now);
        let (input, upload) = read_input(request, interaction, handler, relative).await?;
        trail.input(&input, &env);
        let exec = execute::Exec {
            proxy: self,
            env,
            upstream: upstream.clone(),
            access: &access,
            forwarded: &forwarded,
            trail,
            upload: std::sync::Mutex::new(upload),
        };
        let name = handler.map_or(input.interaction.name(), |h| {
            if h == fhirgw_config::route::Handler::DocRef { "docref" } else { "export" }
        });
        exec.run(&input)
            .instrument(tracing::info_span!(target: fhirgw_telemetry::TRACE_ONLY, "policy", interaction = name))
            .await
    }

    /// The rewritten CapabilityStatement, which depends on the config, the public base and the request target only,
    /// so it is served from a short-lived cache.
    async fn capability_statement(
        &self,
        request: &Request<Incoming>,
        relative: &[String],
        env: &Env<'_>,
        upstream: &Arc<Upstream>,
        forwarded: &HeaderMap,
        trail: &crate::audit::Trail,
    ) -> Result<Response<Body>, ProxyError> {
        let target = request.uri().path_and_query().map(|pq| pq.as_str().to_owned()).unwrap_or_default();
        let key = (env.snapshot.digest.clone(), env.public.to_owned(), target);
        if let Some(body) = self.capabilities.get(&key).await {
            return Ok(bytes_response(StatusCode::OK, body));
        }
        let input = Input::new(
            request.method(),
            Interaction::Capabilities,
            None,
            relative,
            request.uri().query(),
            request.headers(),
            None,
        );
        let call = planner::capabilities(&input, env);
        // No caller: an access that sees nothing (the CapabilityStatement is checked for its shape, not for grants).
        let access = Access::new("", crate::policy::scopes::Scopes::parse(""), None, env.snapshot, SystemTime::now());
        let exec = execute::Exec {
            proxy: self,
            env: *env,
            upstream: upstream.clone(),
            access: &access,
            forwarded,
            trail,
            upload: std::sync::Mutex::new(None),
        };
        let response = exec.request(call.method, &call.target, None, &call.headers).await?;
        let body = exec.capabilities(response).await?;
        self.capabilities.insert(key, body.clone()).await;
        Ok(bytes_response(StatusCode::OK, body))
    }
}

/// The request as the planner sees it, with its body read (within the process-wide budget) and parsed once, for the
/// methods that carry one. The raw content of a Binary create or update is not read: it is returned as it came, to
/// be streamed to the upstream (`upload.rs`).
async fn read_input(
    request: Request<Incoming>,
    interaction: Interaction,
    handler: Option<fhirgw_config::route::Handler>,
    relative: &[String],
) -> Result<(Input, Option<upload::Upload>), ProxyError> {
    let method = request.method().clone();
    if !matches!(method, Method::POST | Method::PUT | Method::PATCH) {
        let (parts, _) = request.into_parts();
        let input = Input::new(&method, interaction, handler, relative, parts.uri.query(), &parts.headers, None);
        return Ok((input, None));
    }
    let binary_write = handler.is_none()
        && matches!(&interaction, Interaction::Create { ty } | Interaction::Update { ty, .. } if ty == "Binary");
    if binary_write && let Some(content_type) = raw_content_type(request.headers()) {
        let (parts, body) = request.into_parts();
        let length = crate::body_budget::content_length(&parts.headers);
        let refusal = match crate::body_budget::check_encoding(&parts.headers) {
            Err(e) => Some(e),
            Ok(()) if length.is_some_and(|n| n > upload::UPLOAD_MAX_BYTES) => {
                Some(crate::body_budget::BodyError::TooLarge { limit: upload::UPLOAD_MAX_BYTES as usize })
            }
            Ok(()) => None,
        };
        if let Some(refusal) = refusal {
            crate::body_budget::discard(body, length);
            return Err(refusal.into());
        }
        let mut input = Input::new(&method, interaction, handler, relative, parts.uri.query(), &parts.headers, None);
        input.body = RequestBody::Upload { content_type, length };
        let idle = parts
            .extensions
            .get::<crate::body_budget::Lease>()
            .map_or_else(|| crate::body_budget::BodyTiming::default().idle, |lease| lease.timing().idle);
        return Ok((input, Some(upload::Upload { body, length, idle })));
    }
    let form = matches!(interaction, Interaction::SearchType { post: true, .. } | Interaction::SearchSystem);
    let max = if form && handler.is_none() { FORM_MAX_BYTES } else { BODY_MAX_BYTES };
    let (parts, body) = crate::body_budget::read(request, max).await?;
    let input = Input::new(&method, interaction, handler, relative, parts.uri.query(), &parts.headers, Some(&body));
    Ok((input, None))
}

/// The `Content-Type` of a body that is raw content rather than a FHIR resource (see `input::is_fhir_media`).
fn raw_content_type(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let media = value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    (!crate::policy::input::is_fhir_media(&media)).then(|| value.to_owned())
}

fn upstream_of(snapshot: &Snapshot, name: &str) -> Result<Arc<Upstream>, ProxyError> {
    snapshot.upstreams.get(name).cloned().ok_or_else(|| ProxyError::MissingUpstream(name.to_owned()))
}
