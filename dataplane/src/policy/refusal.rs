//! Why the planner refuses a request, and what the client is told: each refusal maps to exactly one
//! OperationOutcome here, so a request shape cannot answer differently from another for the same reason.

use http::StatusCode;

use super::export::LinkError;
use super::fhirpath_patch::FhirPathPatchError;
use super::paging::PageError;
use super::query::QueryError;
use super::write::WriteError;
use crate::outcome::Outcome;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No route for the path.
    #[error("no route")]
    NoRoute,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("denied by route `{route}`")]
    Denied { route: String, status: StatusCode, message: String },
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// The one answer for a resource that is missing, deleted, or outside the grants.
    #[error("resource not found or not visible")]
    NotFound,
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error(transparent)]
    Query(#[from] QueryError),
    #[error(transparent)]
    Page(#[from] PageError),
    #[error(transparent)]
    ExportLink(#[from] LinkError),
    #[error("unsupported media type `{0}`")]
    UnsupportedMedia(String),
    #[error("precondition failed")]
    PreconditionFailed,
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error(transparent)]
    FhirPathPatch(#[from] FhirPathPatchError),
    #[error("a conditional write matches several resources")]
    MultipleMatches,
    /// A written reference to a resource the caller cannot see: whether missing or another tenant's, one answer.
    #[error("{path} refers to {reference}, which is missing or not visible")]
    Reference { path: String, reference: String },
    /// An update of an id the caller cannot see: whether free or another tenant's, the same answer.
    #[error("update of a resource that is not visible (update as create is refused)")]
    UpdateAsCreate,
    /// A fact the upstream gave cannot be used (a stored resource without a version, a search that is no Bundle).
    #[error("upstream answer unusable: {0}")]
    UpstreamUnusable(String),
    /// An entry of a transaction (or a refusal that concerns the whole Bundle) was refused.
    #[error("entry {index}: {refusal}")]
    Entry { index: usize, refusal: Box<Refusal> },
}

impl Refusal {
    pub fn forbidden(message: impl Into<String>) -> Self {
        Refusal::Forbidden(message.into())
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Refusal::BadRequest(message.into())
    }

    /// Whether this refusal concerns one entry of a batch (answered in place), rather than the whole request.
    pub fn is_entry_level(&self) -> bool {
        !matches!(self, Refusal::UpstreamUnusable(_))
    }

    /// A short stable code per kind of refusal (the access log's `reason`); an entry's refusal gives its own.
    pub fn code(&self) -> &'static str {
        use Refusal::*;
        match self {
            NoRoute => "no_route",
            MethodNotAllowed => "method_not_allowed",
            Denied { .. } => "route_denied",
            Forbidden(_) => "forbidden",
            NotFound => "not_found",
            BadRequest(_) => "bad_request",
            Query(QueryError::Refused { .. }) => "query_refused",
            Query(QueryError::NotAcceptable { .. }) => "not_acceptable",
            Page(_) => "bad_page_link",
            ExportLink(_) => "bad_export_link",
            UnsupportedMedia(_) => "unsupported_media_type",
            PreconditionFailed => "precondition_failed",
            Write(WriteError::ForeignTag(_) | WriteError::ForbiddenPatch(_) | WriteError::WouldOrphan) => {
                "write_forbidden"
            }
            Write(_) => "bad_write",
            FhirPathPatch(FhirPathPatchError::Forbidden { .. }) => "patch_forbidden",
            FhirPathPatch(_) => "bad_patch",
            MultipleMatches => "multiple_matches",
            Reference { .. } => "reference_not_visible",
            UpdateAsCreate => "update_as_create",
            UpstreamUnusable(_) => "upstream_unusable",
            Entry { refusal, .. } => refusal.code(),
        }
    }

    /// The OperationOutcome a client gets for this refusal.
    pub fn outcome(&self) -> Outcome {
        use Refusal::*;
        match self {
            NoRoute => Outcome::new(StatusCode::NOT_FOUND, "not-found", "No such endpoint."),
            MethodNotAllowed => {
                Outcome::new(StatusCode::METHOD_NOT_ALLOWED, "not-supported", "Method not allowed on this endpoint.")
            }
            Denied { status, message, .. } => {
                let text = if message.is_empty() { "Access to this endpoint is denied." } else { message };
                Outcome::new(*status, "forbidden", text)
            }
            Forbidden(message) => Outcome::new(StatusCode::FORBIDDEN, "forbidden", message.clone()),
            NotFound => Outcome::new(StatusCode::NOT_FOUND, "not-found", "Resource not found."),
            BadRequest(message) => Outcome::new(StatusCode::BAD_REQUEST, "invalid", message.clone()),
            Query(e @ QueryError::Refused { .. }) => {
                Outcome::new(StatusCode::BAD_REQUEST, "not-supported", e.to_string())
            }
            Query(e @ QueryError::NotAcceptable { .. }) => {
                Outcome::new(StatusCode::NOT_ACCEPTABLE, "not-supported", e.to_string())
            }
            Page(e) => Outcome::new(StatusCode::BAD_REQUEST, "invalid", format!("{e}; run the search again")),
            ExportLink(e) => Outcome::new(StatusCode::BAD_REQUEST, "invalid", format!("{e}; start the export again")),
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
            Write(e @ (WriteError::ForeignTag(_) | WriteError::ForbiddenPatch(_) | WriteError::WouldOrphan)) => {
                Outcome::new(StatusCode::FORBIDDEN, "forbidden", e.to_string())
            }
            Write(e) => Outcome::new(StatusCode::BAD_REQUEST, "invalid", e.to_string()),
            FhirPathPatch(e @ FhirPathPatchError::Forbidden { .. }) => {
                Outcome::new(StatusCode::FORBIDDEN, "forbidden", e.to_string())
            }
            FhirPathPatch(e) => Outcome::new(StatusCode::BAD_REQUEST, "not-supported", e.to_string()),
            MultipleMatches => Outcome::new(
                StatusCode::PRECONDITION_FAILED,
                "multiple-matches",
                "The condition matches more than one resource; make it more specific.",
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
            UpstreamUnusable(_) => Outcome::new(
                StatusCode::BAD_GATEWAY,
                "transient",
                "The upstream server sent a response the gateway cannot pass on.",
            ),
            Entry { index, refusal } => {
                let mut outcome = refusal.outcome();
                outcome.diagnostics = format!("Bundle entry {index}: {}", outcome.diagnostics);
                outcome
            }
        }
    }
}
