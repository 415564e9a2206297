//! The one place errors become client answers. A request is refused by the planner (`policy::refusal`, which maps
//! each refusal to its OperationOutcome) or fails around it (not ready, unauthenticated, the upstream failing);
//! either way the client gets an OperationOutcome, and internal details stay in the log.

use http::StatusCode;

use crate::authn::AuthError;
use crate::outcome::Outcome;
use crate::policy::refusal::Refusal;
use crate::upstream::UpstreamError;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    #[error("configuration not loaded yet")]
    NotReady,
    #[error(transparent)]
    Path(#[from] fhirgw_config::path::PathError),
    #[error(transparent)]
    Ambiguous(#[from] super::headers::Ambiguous),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("request target longer than {limit} bytes")]
    TooLong { limit: u32 },
    #[error("request header fields larger than {limit} bytes")]
    HeadersTooLarge { limit: u32 },
    #[error(transparent)]
    Body(#[from] crate::body_budget::BodyError),
    #[error("grants not confirmed by the control plane within the grant TTL")]
    GrantsStale,
    #[error("route refers to unknown upstream `{0}`")]
    MissingUpstream(String),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("upstream answered {0}")]
    UpstreamStatus(StatusCode),
    #[error("upstream response cannot be verified: {0}")]
    Unverifiable(String),
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// Strict auditing: the request's AuditEvent cannot be made durable (no room in the spool, or it fails).
    #[error("the audit event cannot be made durable")]
    AuditUnavailable,
}

impl From<crate::policy::query::QueryError> for ProxyError {
    fn from(e: crate::policy::query::QueryError) -> Self {
        ProxyError::Refused(e.into())
    }
}

impl ProxyError {
    /// The single classification of errors into client responses.
    pub fn outcome(&self) -> Outcome {
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
            Auth(AuthError::Missing) => Outcome::new(StatusCode::UNAUTHORIZED, "login", "A bearer token is required.")
                .challenge("Bearer realm=\"fhirgw\""),
            Auth(e @ AuthError::Ambiguous(_)) => Outcome::new(StatusCode::BAD_REQUEST, "invalid", e.to_string())
                .challenge("Bearer realm=\"fhirgw\", error=\"invalid_request\""),
            // Which check failed, in the client developer's terms (authn::Reason); the detail stays in the log.
            Auth(AuthError::Invalid { reason, .. }) => {
                Outcome::new(StatusCode::UNAUTHORIZED, "login", reason.description()).challenge(reason.challenge())
            }
            Auth(AuthError::IssuerUnavailable { .. }) => {
                Outcome::new(StatusCode::SERVICE_UNAVAILABLE, "transient", "The token cannot be verified right now.")
                    .retry_after(5)
            }
            TooLong { limit } => Outcome::new(
                StatusCode::URI_TOO_LONG,
                "too-long",
                format!("The request target is longer than {limit} bytes; use POST _search for long searches."),
            ),
            HeadersTooLarge { limit } => Outcome::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "too-long",
                format!("The request's header fields are larger than {limit} bytes in all."),
            ),
            Body(e) => e.outcome(),
            GrantsStale => Outcome::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "transient",
                "The gateway cannot confirm access grants right now.",
            )
            .retry_after(10),
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
            UpstreamStatus(_) | Unverifiable(_) => Outcome::new(
                StatusCode::BAD_GATEWAY,
                "transient",
                "The upstream server sent a response the gateway cannot pass on.",
            ),
            Refused(refusal) => refusal.outcome(),
            AuditUnavailable => Outcome::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "transient",
                "The gateway cannot record this access right now.",
            )
            .retry_after(5),
        }
    }

    /// A short stable code for this refusal or failure: the access log's `reason`, one per kind (never a detail
    /// that could carry a token, a patient id or a query value).
    pub fn code(&self) -> &'static str {
        use crate::body_budget::BodyError;
        use ProxyError::*;
        match self {
            NotReady => "not_ready",
            Path(_) => "bad_path",
            Ambiguous(_) => "ambiguous_headers",
            Auth(e) => e.code(),
            TooLong { .. } => "target_too_long",
            HeadersTooLarge { .. } => "headers_too_large",
            Body(BodyError::TooLarge { .. }) => "body_too_large",
            Body(BodyError::Busy) => "body_budget_exhausted",
            Body(BodyError::Encoding(_)) => "body_encoding",
            Body(BodyError::Read(_)) => "body_read",
            Body(BodyError::Idle(_)) => "body_idle",
            Body(BodyError::Slow(_)) => "body_slow",
            GrantsStale => "grants_stale",
            MissingUpstream(_) => "missing_upstream",
            Upstream(UpstreamError::Credential { .. }) => "upstream_credential",
            Upstream(UpstreamError::Connect { .. }) => "upstream_connect",
            Upstream(UpstreamError::Timeout { .. }) => "upstream_timeout",
            Upstream(UpstreamError::Request(_)) => "upstream_request",
            UpstreamStatus(_) => "upstream_status",
            AuditUnavailable => "audit_unavailable",
            Unverifiable(_) => "unverifiable",
            Refused(refusal) => refusal.code(),
        }
    }
}
