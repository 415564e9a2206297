//! The FHIR request pipeline, outermost first:
//!
//! ```text
//! handle ── rescue: the one place errors become OperationOutcome responses
//!   └ pin one config snapshot for the whole request (503 before the first one)
//!     └ normalise the path (400 on irregular forms)
//!       └ route: table by base path, then the most specific route (404 / 405)
//!         └ action: deny │ handler │ proxy
//!           └ forward: sanitise headers → UpstreamClient::send (credential injected there) → stream back
//! ```
//!
//! Authentication and tenant authorization slot in between routing and the action (issue 4); they will see the
//! same pinned snapshot.

mod headers;

use std::convert::Infallible;
use std::sync::Arc;

use fhirgw_config::Snapshot;
use fhirgw_config::path::{NormalPath, PathError, join_encoded};
use fhirgw_config::route::Action;
use fhirgw_config::upstream::Upstream;
use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tracing::{Instrument, info_span, warn};

use crate::outcome::Outcome;
use crate::state::ConfigState;
use crate::upstream::{Body, UpstreamClient, UpstreamError};

pub struct Proxy {
    pub state: Arc<ConfigState>,
    pub upstreams: Arc<UpstreamClient>,
}

#[derive(Debug, thiserror::Error)]
enum ProxyError {
    #[error("configuration not loaded yet")]
    NotReady,
    #[error(transparent)]
    Path(#[from] PathError),
    #[error("no route")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("denied by route `{route}`")]
    Denied { route: String, status: StatusCode, message: String },
    #[error("handler not available")]
    HandlerUnavailable,
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("route refers to unknown upstream `{0}`")]
    MissingUpstream(String),
}

impl ProxyError {
    /// The single classification of errors into client responses. Internal details stay in the log.
    fn outcome(&self) -> Outcome {
        match self {
            ProxyError::NotReady => Outcome::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "transient",
                "The gateway is starting and has no configuration yet.",
            )
            .retry_after(2),
            ProxyError::Path(e) => Outcome::new(StatusCode::BAD_REQUEST, "invalid", e.to_string()),
            ProxyError::NotFound => Outcome::new(StatusCode::NOT_FOUND, "not-found", "No such endpoint."),
            ProxyError::MethodNotAllowed => {
                Outcome::new(StatusCode::METHOD_NOT_ALLOWED, "not-supported", "Method not allowed on this endpoint.")
            }
            ProxyError::Denied { status, message, .. } => {
                let text = if message.is_empty() { "Access to this endpoint is denied." } else { message };
                Outcome::new(*status, "forbidden", text)
            }
            ProxyError::HandlerUnavailable => {
                Outcome::new(StatusCode::NOT_IMPLEMENTED, "not-supported", "This operation is not available yet.")
            }
            ProxyError::Upstream(UpstreamError::Credential { .. }) => Outcome::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "transient",
                "The upstream server is temporarily unavailable.",
            )
            .retry_after(5),
            ProxyError::Upstream(UpstreamError::Connect { .. }) => {
                Outcome::new(StatusCode::BAD_GATEWAY, "transient", "The upstream server could not be reached.")
                    .retry_after(2)
            }
            ProxyError::Upstream(UpstreamError::Timeout { .. }) => {
                Outcome::new(StatusCode::GATEWAY_TIMEOUT, "timeout", "The upstream server did not answer in time.")
            }
            ProxyError::Upstream(UpstreamError::Request(_)) | ProxyError::MissingUpstream(_) => {
                Outcome::new(StatusCode::INTERNAL_SERVER_ERROR, "exception", "Internal gateway error.")
            }
        }
    }
}

impl Proxy {
    pub async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Result<Response<Body>, Infallible> {
        let span = info_span!("request", method = %request.method(), route = tracing::field::Empty, config_version = tracing::field::Empty, status = tracing::field::Empty);
        let result = self.pipeline(request).instrument(span.clone()).await;
        let response = match result {
            Ok(response) => response,
            Err(error) => {
                let outcome = error.outcome();
                if outcome.status.is_server_error() {
                    warn!(parent: &span, error = %error, "request failed");
                }
                outcome.into_response()
            }
        };
        span.record("status", response.status().as_u16());
        Ok(response)
    }

    async fn pipeline(&self, request: Request<Incoming>) -> Result<Response<Body>, ProxyError> {
        let snapshot = self.state.load().ok_or(ProxyError::NotReady)?;
        let span = tracing::Span::current();
        span.record("config_version", snapshot.digest.as_str());
        let path = NormalPath::parse(request.uri().path())?;
        let (table, relative) = snapshot.table_for(&path).ok_or(ProxyError::NotFound)?;
        let Some(matched) = table.route(request.method(), relative) else {
            return Err(if table.path_known(relative) { ProxyError::MethodNotAllowed } else { ProxyError::NotFound });
        };
        span.record("route", matched.route.id.as_str());
        match &matched.route.action {
            Action::Deny { status, message } => {
                Err(ProxyError::Denied { route: matched.route.id.clone(), status: *status, message: message.clone() })
            }
            Action::Handler { .. } => Err(ProxyError::HandlerUnavailable),
            Action::Proxy { upstream } => {
                let upstream = upstream_of(&snapshot, upstream)?;
                let target = join_encoded(&upstream.base_path, relative);
                self.forward(upstream, &target, request).await
            }
        }
    }

    /// Sends the request to `target` (an encoded path on the upstream) and streams the response back.
    async fn forward(
        &self,
        upstream: Arc<Upstream>,
        target: &str,
        request: Request<Incoming>,
    ) -> Result<Response<Body>, ProxyError> {
        let (mut parts, body) = request.into_parts();
        let path_and_query = match parts.uri.query() {
            Some(query) => format!("{target}?{query}"),
            None => target.to_owned(),
        };
        parts.uri = Uri::try_from(format!("{}{path_and_query}", upstream.origin))
            .map_err(|e| ProxyError::Upstream(UpstreamError::Request(e.to_string())))?;
        parts.version = http::Version::HTTP_11;
        headers::sanitize_request(&mut parts.headers, &upstream.strip_request_headers);
        let outbound = Request::from_parts(parts, body.map_err(Into::into).boxed_unsync());
        let response = self.upstreams.send(&upstream, outbound).await?;
        let (mut parts, body) = response.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, body.map_err(Into::into).boxed_unsync()))
    }
}

fn upstream_of(snapshot: &Snapshot, name: &str) -> Result<Arc<Upstream>, ProxyError> {
    snapshot.upstreams.get(name).cloned().ok_or_else(|| ProxyError::MissingUpstream(name.to_owned()))
}
