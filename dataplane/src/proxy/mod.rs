//! The FHIR request pipeline, outermost first:
//!
//! ```text
//! handle ── span; rescue: the one place errors become OperationOutcome responses
//!   └ pin one config snapshot for the whole request (503 before the first one)
//!     └ normalise the path (400 on irregular forms) and find the table by base path
//!       └ classify the interaction (read, search, history, …; Unknown is denied)
//!         └ authenticate (every interaction except `metadata`): tenant from the token (401)
//!           └ route: the most specific route (404 / 405)
//!             └ action: deny │ handler (docref.rs, export.rs) │ proxy
//!               └ authorize and rewrite (access.rs): scopes, query checks, narrowing, page tokens
//!                 └ upstream (UpstreamClient::send injects the credential)
//!                   └ verify the response: resource or every Bundle entry against the grants; links signed
//! ```

mod access;
mod batch;
mod bundle_stream;
mod discovery;
mod docref;
mod export;
mod filtered_body;
mod headers;
mod links;
mod ndjson_stream;
mod public;
mod references;
mod write;

pub use public::{PublicConfig, PublicConfigError};

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use fhirgw_config::Snapshot;
use fhirgw_config::path::{NormalPath, PathError, join_encoded};
use fhirgw_config::route::Action;
use fhirgw_config::upstream::Upstream;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::Value;
use tracing::{Instrument, info_span, warn};

use crate::authn::{AuthError, Authenticator};
use crate::outcome::{FHIR_JSON, Outcome};
use crate::policy::classify::{Interaction, classify};
use crate::policy::paging::{PageError, PageSigner};
use crate::policy::query::QueryError;
use crate::state::ConfigState;
use crate::upstream::{Body, UpstreamClient, UpstreamError};

pub struct Proxy {
    pub state: Arc<ConfigState>,
    pub upstreams: Arc<UpstreamClient>,
    pub authn: Arc<Authenticator>,
    pub pages: PageSigner,
    /// Longest time grants are trusted without confirmation from the control plane.
    pub grant_ttl: std::time::Duration,
    pub public: PublicConfig,
    /// Rewritten CapabilityStatements by (config digest, public base, request target), kept for a minute.
    pub capabilities: moka::future::Cache<(String, String, String), Bytes>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Bounds the request bodies buffered at once, process-wide (see `body_budget`).
    pub body_budget: Arc<crate::body_budget::BodyBudget>,
}

#[derive(Debug, thiserror::Error)]
enum ProxyError {
    #[error("configuration not loaded yet")]
    NotReady,
    #[error(transparent)]
    Path(#[from] PathError),
    #[error(transparent)]
    Ambiguous(#[from] headers::Ambiguous),
    #[error("no route")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("denied by route `{route}`")]
    Denied { route: String, status: StatusCode, message: String },
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("route refers to unknown upstream `{0}`")]
    MissingUpstream(String),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// The one answer for a resource that is missing, deleted, or outside the grants.
    #[error("resource not found or not visible")]
    ResourceNotFound,
    #[error(transparent)]
    Query(#[from] QueryError),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error(transparent)]
    Page(#[from] PageError),
    #[error(transparent)]
    ExportLink(crate::policy::export::LinkError),
    #[error("upstream answered {0}")]
    UpstreamStatus(StatusCode),
    #[error("upstream response cannot be verified: {0}")]
    Unverifiable(String),
    #[error("grants not confirmed by the control plane within the grant TTL")]
    GrantsStale,
    #[error("request target longer than {limit} bytes")]
    TooLong { limit: u32 },
    #[error("unsupported media type `{0}`")]
    UnsupportedMedia(String),
    #[error("precondition failed")]
    PreconditionFailed,
    #[error(transparent)]
    Write(#[from] crate::policy::write::WriteError),
    #[error(transparent)]
    FhirPathPatch(#[from] crate::policy::fhirpath_patch::FhirPathPatchError),
    #[error("request header fields larger than {limit} bytes")]
    HeadersTooLarge { limit: u32 },
    #[error("a conditional write matches several resources")]
    MultipleMatches,
    /// A written reference to a resource the caller cannot see: whether missing or another tenant's, one answer.
    #[error("{path} refers to {reference}, which is missing or not visible")]
    Reference { path: String, reference: String },
    /// An update of an id the caller cannot see: whether free or another tenant's, the same answer.
    #[error("update of a resource that is not visible (update as create is refused)")]
    UpdateAsCreate,
    #[error(transparent)]
    Body(#[from] crate::body_budget::BodyError),
    /// An entry of a batch or transaction was refused.
    #[error("entry {index}: {error}")]
    Entry { index: usize, error: Box<ProxyError> },
}

impl ProxyError {
    /// Whether this refusal concerns one entry of a batch (answered in place), rather than the whole request
    /// (the upstream failing, grants unconfirmed).
    fn is_entry_level(&self) -> bool {
        !matches!(
            self,
            ProxyError::NotReady
                | ProxyError::Upstream(_)
                | ProxyError::MissingUpstream(_)
                | ProxyError::UpstreamStatus(_)
                | ProxyError::Unverifiable(_)
                | ProxyError::GrantsStale
                | ProxyError::Auth(_)
                | ProxyError::Body(_)
        )
    }

    /// The single classification of errors into client responses. Internal details stay in the log.
    fn outcome(&self) -> Outcome {
        use ProxyError::*;
        match self {
            NotReady => Outcome::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "transient",
                "The gateway is starting and has no configuration yet.",
            )
            .retry_after(2),
            Path(e) => Outcome::new(StatusCode::BAD_REQUEST, "invalid", e.to_string()),
            Ambiguous(e) => Outcome::new(StatusCode::BAD_REQUEST, "invalid", e.to_string()),
            NotFound => Outcome::new(StatusCode::NOT_FOUND, "not-found", "No such endpoint."),
            MethodNotAllowed => {
                Outcome::new(StatusCode::METHOD_NOT_ALLOWED, "not-supported", "Method not allowed on this endpoint.")
            }
            Denied { status, message, .. } => {
                let text = if message.is_empty() { "Access to this endpoint is denied." } else { message };
                Outcome::new(*status, "forbidden", text)
            }
            Upstream(UpstreamError::Credential { .. }) => Outcome::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "transient",
                "The upstream server is temporarily unavailable.",
            )
            .retry_after(5),
            Upstream(UpstreamError::Connect { .. }) => {
                Outcome::new(StatusCode::BAD_GATEWAY, "transient", "The upstream server could not be reached.")
                    .retry_after(2)
            }
            Upstream(UpstreamError::Timeout { .. }) => {
                Outcome::new(StatusCode::GATEWAY_TIMEOUT, "timeout", "The upstream server did not answer in time.")
            }
            Upstream(UpstreamError::Request(_)) | MissingUpstream(_) => {
                Outcome::new(StatusCode::INTERNAL_SERVER_ERROR, "exception", "Internal gateway error.")
            }
            Auth(AuthError::Missing) => Outcome::new(StatusCode::UNAUTHORIZED, "login", "A bearer token is required.")
                .challenge("Bearer realm=\"fhirgw\""),
            Auth(e @ AuthError::Ambiguous(_)) => Outcome::new(StatusCode::BAD_REQUEST, "invalid", e.to_string())
                .challenge("Bearer realm=\"fhirgw\", error=\"invalid_request\""),
            Auth(AuthError::Invalid(_)) => {
                Outcome::new(StatusCode::UNAUTHORIZED, "login", "The bearer token is not valid.")
                    .challenge("Bearer realm=\"fhirgw\", error=\"invalid_token\"")
            }
            Auth(AuthError::IssuerUnavailable { .. }) => {
                Outcome::new(StatusCode::SERVICE_UNAVAILABLE, "transient", "The token cannot be verified right now.")
                    .retry_after(5)
            }
            Forbidden(message) => Outcome::new(StatusCode::FORBIDDEN, "forbidden", message.clone()),
            ResourceNotFound => Outcome::new(StatusCode::NOT_FOUND, "not-found", "Resource not found."),
            Query(e @ QueryError::Refused { .. }) => {
                Outcome::new(StatusCode::BAD_REQUEST, "not-supported", e.to_string())
            }
            Query(e @ QueryError::NotAcceptable { .. }) => {
                Outcome::new(StatusCode::NOT_ACCEPTABLE, "not-supported", e.to_string())
            }
            BadRequest(message) => Outcome::new(StatusCode::BAD_REQUEST, "invalid", message.clone()),
            Page(e) => Outcome::new(StatusCode::BAD_REQUEST, "invalid", format!("{e}; run the search again")),
            ExportLink(e) => Outcome::new(StatusCode::BAD_REQUEST, "invalid", format!("{e}; start the export again")),
            UpstreamStatus(StatusCode::TOO_MANY_REQUESTS) => {
                Outcome::new(StatusCode::TOO_MANY_REQUESTS, "throttled", "The upstream server is busy; retry later.")
                    .retry_after(5)
            }
            UpstreamStatus(StatusCode::SERVICE_UNAVAILABLE) => Outcome::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "transient",
                "The upstream server is temporarily unavailable.",
            )
            .retry_after(5),
            UpstreamStatus(StatusCode::GATEWAY_TIMEOUT) => {
                Outcome::new(StatusCode::GATEWAY_TIMEOUT, "timeout", "The upstream server did not answer in time.")
            }
            UpstreamStatus(status) if status.is_client_error() => {
                Outcome::new(*status, "processing", "The upstream server refused the request.")
            }
            TooLong { limit } => Outcome::new(
                StatusCode::URI_TOO_LONG,
                "too-long",
                format!("The request target is longer than {limit} bytes; use POST _search for long searches."),
            ),
            UnsupportedMedia(media) => Outcome::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "not-supported",
                format!(
                    "Content type `{media}` is not accepted here; use application/fhir+json (for PATCH: \
                     application/json-patch+json, or application/fhir+json with a FHIRPath Patch Parameters body)."
                ),
            ),
            PreconditionFailed => Outcome::new(
                StatusCode::PRECONDITION_FAILED,
                "conflict",
                "The resource has changed; read it again and retry with its current version.",
            ),
            Write(e @ crate::policy::write::WriteError::ForeignTag(_))
            | Write(e @ crate::policy::write::WriteError::ForbiddenPatch(_))
            | Write(e @ crate::policy::write::WriteError::WouldOrphan) => {
                Outcome::new(StatusCode::FORBIDDEN, "forbidden", e.to_string())
            }
            Write(e) => Outcome::new(StatusCode::BAD_REQUEST, "invalid", e.to_string()),
            FhirPathPatch(e @ crate::policy::fhirpath_patch::FhirPathPatchError::Forbidden { .. }) => {
                Outcome::new(StatusCode::FORBIDDEN, "forbidden", e.to_string())
            }
            FhirPathPatch(e) => Outcome::new(StatusCode::BAD_REQUEST, "not-supported", e.to_string()),
            GrantsStale => Outcome::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "transient",
                "The gateway cannot confirm access grants right now.",
            )
            .retry_after(10),
            HeadersTooLarge { limit } => Outcome::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "too-long",
                format!("The request's header fields are larger than {limit} bytes in all."),
            ),
            Reference { path, reference } => Outcome::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "processing",
                format!("`{path}` refers to `{reference}`, which does not exist or is not visible to you."),
            ),
            UpdateAsCreate => Outcome::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "not-supported",
                "No resource with this id exists for you, and this server does not create resources by update: \
                 create it with POST to its type, which assigns the id.",
            ),
            MultipleMatches => Outcome::new(
                StatusCode::PRECONDITION_FAILED,
                "multiple-matches",
                "The condition matches more than one resource; make it more specific.",
            ),
            Body(e) => e.outcome(),
            Entry { index, error } => {
                let mut outcome = error.outcome();
                outcome.diagnostics = format!("Bundle entry {index}: {}", outcome.diagnostics);
                outcome
            }
            UpstreamStatus(_) | Unverifiable(_) => Outcome::new(
                StatusCode::BAD_GATEWAY,
                "transient",
                "The upstream server sent a response the gateway cannot pass on.",
            ),
        }
    }
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
            "request",
            otel.kind = "server",
            method = %request.method(),
            route = tracing::field::Empty,
            tenant = tracing::field::Empty,
            config_version = tracing::field::Empty,
            status = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        fhirgw_telemetry::continue_from_headers(&span, request.headers());
        let trace_id = fhirgw_telemetry::trace_id(&span, Some(request.headers()));
        let trace_id_for_abort = trace_id.clone();
        // Metrics are recorded here only: the route the pipeline matched, the response as the client gets it.
        let (in_flight, method, mut route) = (self.metrics.request_started(), request.method().clone(), None);
        let result = self.pipeline(request, peer, &mut route).instrument(span.clone()).await;
        let response = match result {
            Ok(response) => response,
            Err(error) => {
                let mut outcome = error.outcome();
                outcome.trace_id = trace_id;
                if outcome.status.is_server_error() {
                    warn!(parent: &span, error = %error, "request failed");
                } else {
                    tracing::debug!(parent: &span, error = %error, "request refused");
                }
                outcome.into_response()
            }
        };
        drop(lease);
        span.record("status", response.status().as_u16());
        Ok(in_flight.traced(span, trace_id_for_abort).finish(&method, route, response))
    }

    async fn pipeline(
        &self,
        request: Request<Incoming>,
        peer: std::net::SocketAddr,
        route: &mut Option<String>,
    ) -> Result<Response<Body>, ProxyError> {
        let snapshot = self.state.load().ok_or(ProxyError::NotReady)?;
        let span = tracing::Span::current();
        span.record("config_version", snapshot.digest.as_str());
        let path = NormalPath::parse(request.uri().path())?;
        headers::check_unambiguous(request.headers(), request.method())?;
        let (table, relative) = snapshot.table_for(&path).ok_or(ProxyError::NotFound)?;
        let public = self.public.base(peer, request.uri(), request.headers(), &table.base_path);
        if relative == [".well-known", "smart-configuration"] && request.method() == http::Method::GET {
            let doc = discovery::smart_configuration(&snapshot).ok_or(ProxyError::NotFound)?;
            let mut response = json_response(StatusCode::OK, &doc, &HeaderMap::new(), false);
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            return Ok(response);
        }
        let interaction = classify(request.method(), relative, request.uri().query().is_some());
        // Only the CapabilityStatement is public; everything else needs a caller.
        let caller = if interaction == Interaction::Capabilities {
            None
        } else {
            let caller = self
                .authn
                .authenticate(&snapshot, request.headers())
                .instrument(tracing::info_span!("authenticate"))
                .await?;
            span.record("tenant", caller.tenant.as_str());
            Some(caller)
        };
        let Some(matched) = table.route(request.method(), relative) else {
            return Err(if table.path_known(relative) { ProxyError::MethodNotAllowed } else { ProxyError::NotFound });
        };
        span.record("route", matched.route.id.as_str());
        *route = Some(matched.route.id.clone());
        let limit = match matched.route.guard.max_url_bytes {
            0 => fhirgw_config::route::DEFAULT_MAX_URL_BYTES,
            n => n,
        };
        if request.uri().path_and_query().map_or(0, |pq| pq.as_str().len()) > limit as usize {
            return Err(ProxyError::TooLong { limit });
        }
        let header_limit = match matched.route.guard.max_header_bytes {
            0 => fhirgw_config::route::DEFAULT_MAX_HEADER_BYTES,
            n => n,
        };
        if headers::total_size(request.headers()) > header_limit as usize {
            return Err(ProxyError::HeadersTooLarge { limit: header_limit });
        }
        match &matched.route.action {
            Action::Deny { status, message } => {
                Err(ProxyError::Denied { route: matched.route.id.clone(), status: *status, message: message.clone() })
            }
            Action::Handler { handler, upstream } => {
                // Handlers serve callers only (`metadata` is never a handler's).
                let caller = caller.ok_or(ProxyError::Auth(AuthError::Missing))?;
                let upstream = upstream_of(&snapshot, upstream)?;
                let ctx = access::Ctx {
                    proxy: self,
                    snapshot: &snapshot,
                    caller: &caller,
                    forwarded: forwarded(&request, &matched.route.forward_headers, &upstream),
                    visible_references: Default::default(),
                    upstream,
                    public,
                    relative,
                    guard: &matched.route.guard,
                    table,
                };
                let policy = tracing::info_span!("policy", handler = ?handler);
                ctx.handler(*handler, request).instrument(policy).await
            }
            Action::Proxy { upstream } => {
                let upstream = upstream_of(&snapshot, upstream)?;
                match caller {
                    None => {
                        // The rewritten CapabilityStatement depends on the config, the public base and the request
                        // target only, so it is served from a short-lived cache.
                        let key = (
                            snapshot.digest.clone(),
                            public.clone(),
                            request.uri().path_and_query().map(|pq| pq.as_str().to_owned()).unwrap_or_default(),
                        );
                        let body = match self.capabilities.get(&key).await {
                            Some(body) => body,
                            None => {
                                let target = join_encoded(&upstream.base_path, relative);
                                let forward = &matched.route.forward_headers;
                                let response = self.fetch_metadata(upstream, &target, &request, forward).await?;
                                let body = capabilities(response, &snapshot, table, &public).await?;
                                self.capabilities.insert(key, body.clone()).await;
                                body
                            }
                        };
                        Ok(bytes_response(StatusCode::OK, body))
                    }
                    Some(caller) => {
                        let ctx = access::Ctx {
                            proxy: self,
                            snapshot: &snapshot,
                            caller: &caller,
                            forwarded: forwarded(&request, &matched.route.forward_headers, &upstream),
                            visible_references: Default::default(),
                            upstream,
                            public,
                            relative,
                            guard: &matched.route.guard,
                            table,
                        };
                        let policy = tracing::info_span!("policy", interaction = interaction.name());
                        ctx.serve(interaction, request).instrument(policy).await
                    }
                }
            }
        }
    }

    /// GETs the upstream's CapabilityStatement at `target` (an encoded path on the upstream) with the client's query,
    /// allow-listed headers and no body; the response comes back as the upstream sent it, hop-by-hop headers removed.
    async fn fetch_metadata(
        &self,
        upstream: Arc<Upstream>,
        target: &str,
        request: &Request<Incoming>,
        forward: &[http::HeaderName],
    ) -> Result<Response<Incoming>, ProxyError> {
        let path_and_query = match request.uri().query() {
            Some(query) => format!("{target}?{query}"),
            None => target.to_owned(),
        };
        let uri = Uri::try_from(format!("{}{path_and_query}", upstream.origin))
            .map_err(|e| ProxyError::Upstream(UpstreamError::Request(e.to_string())))?;
        let mut outbound = Request::builder()
            .method(http::Method::GET)
            .uri(uri)
            .body(http_body_util::Empty::new().map_err(|never| match never {}).boxed_unsync())
            .map_err(|e| ProxyError::Upstream(UpstreamError::Request(e.to_string())))?;
        let headers = outbound.headers_mut();
        *headers =
            headers::for_upstream(request.headers(), &http::Method::GET, forward, &upstream.strip_request_headers);
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/fhir+json"));
        // The body is parsed (and rewritten): it must come uncompressed.
        headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        let mut response = self.upstreams.send(&upstream, outbound).await?;
        headers::strip_hop_by_hop(response.headers_mut());
        Ok(response)
    }
}

/// The client's headers that may reach `upstream` for this request (see `headers::for_upstream`).
fn forwarded(request: &Request<Incoming>, route: &[http::HeaderName], upstream: &Upstream) -> HeaderMap {
    headers::for_upstream(request.headers(), request.method(), route, &upstream.strip_request_headers)
}

fn upstream_of(snapshot: &Snapshot, name: &str) -> Result<Arc<Upstream>, ProxyError> {
    snapshot.upstreams.get(name).cloned().ok_or_else(|| ProxyError::MissingUpstream(name.to_owned()))
}

/// A JSON response re-serialised from the parsed value, so the client receives exactly what was verified. `keep`
/// holds the only upstream headers passed on (validators, rewritten locations), chosen by the caller.
pub(super) fn json_response(status: StatusCode, value: &Value, keep: &HeaderMap, head: bool) -> Response<Body> {
    let bytes = if head { Bytes::new() } else { Bytes::from(value.to_string()) };
    let mut response = Response::new(Full::new(bytes).map_err(|never| match never {}).boxed_unsync());
    *response.status_mut() = status;
    *response.headers_mut() = keep.clone();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    response
}

/// The upstream's validators (`ETag`, `Last-Modified`), for a response that is the upstream's representation.
pub(super) fn validators(upstream: &HeaderMap) -> HeaderMap {
    let mut keep = HeaderMap::new();
    for name in [header::ETAG, header::LAST_MODIFIED] {
        if let Some(v) = upstream.get(&name) {
            keep.insert(name, v.clone());
        }
    }
    keep
}

/// The upstream's CapabilityStatement, rewritten for the gateway (see `discovery`), serialised.
async fn capabilities(
    response: Response<Incoming>,
    snapshot: &Snapshot,
    table: &fhirgw_config::route::RouteTable,
    public: &str,
) -> Result<Bytes, ProxyError> {
    if response.status() != StatusCode::OK {
        return Err(ProxyError::UpstreamStatus(response.status()));
    }
    headers::require_identity(response.headers())?;
    let body = http_body_util::Limited::new(response.into_body(), 16 * 1024 * 1024)
        .collect()
        .await
        .map_err(|e| ProxyError::Unverifiable(format!("reading the CapabilityStatement: {e}")))?
        .to_bytes();
    let cs: Value =
        serde_json::from_slice(&body).map_err(|e| ProxyError::Unverifiable(format!("CapabilityStatement: {e}")))?;
    if cs.get("resourceType").and_then(Value::as_str) != Some("CapabilityStatement") {
        return Err(ProxyError::Unverifiable("metadata is not a CapabilityStatement".into()));
    }
    Ok(Bytes::from(discovery::capability_statement(cs, snapshot, table, public).to_string()))
}

/// A FHIR JSON response from bytes the gateway produced.
fn bytes_response(status: StatusCode, body: Bytes) -> Response<Body> {
    bytes_response_with(status, body, HeaderMap::new(), false)
}

/// A FHIR JSON response from verified bytes, with the headers in `keep` (validators) and no body for HEAD.
pub(super) fn bytes_response_with(status: StatusCode, body: Bytes, keep: HeaderMap, head: bool) -> Response<Body> {
    let body = if head { Bytes::new() } else { body };
    let mut response = Response::new(Full::new(body).map_err(|never| match never {}).boxed_unsync());
    *response.status_mut() = status;
    *response.headers_mut() = keep;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    response
}
