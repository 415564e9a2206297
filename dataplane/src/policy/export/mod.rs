//! Bulk `$export` (Bulk Data Access IG v2), the pure parts.
//!
//! - A kick-off is narrowed before it leaves: `_type` is required (or filled from the types the scopes name), every
//!   type must be readable under the scopes, and each type gets a `_typeFilter` carrying the tenant's tags. A
//!   client's own `_typeFilter`s are kept, checked like searches (no chains, `_has`, `_filter`, …) and narrowed the
//!   same way: filters for one type are ORed by the server, so every one of them carries the tags.
//! - The upstream's status and file URLs are bearer capabilities; the client only ever sees gateway links carrying
//!   a token signed under a context of its own (a page token is never an export link, nor the reverse), bound to
//!   the tenant, the upstream and the kind of link, valid for 24 hours.
//! - The manifest keeps only what can be verified: file URLs on the upstream's base become signed links, per-file
//!   counts (which could count other tenants' resources) are dropped, `requiresAccessToken` is true. For the same
//!   reason a progress text with digits in it is not relayed.
//! - Every line of every file is verified on the way back (`line_visible`), so an upstream that ignores
//!   `_typeFilter` still hands out nothing outside the grants.
//!
//! The whole flow, as the gateway runs it:
//! `export` (`/$export`, `/Patient/$export`, `/Group/{id}/$export`, plus the gateway-owned `/$export-poll-status` and
//! `/$export-file`): kick-off by `GET` (query) or `POST` (a `Parameters` body, `valueString`s and `_since` as
//! `valueInstant`, turned into the same parameter list and checked the same way; a query as well is refused). A `POST`
//! to `Patient/$export` or `Group/{id}/$export` may name `patient`s (`Patient/<id>` references only): each must be
//! visible to the caller (else the same 404 as a missing one), and then the upstream gets a `POST` with the narrowed
//! parameters and the patients; otherwise it gets a narrowed `GET` kick-off, which every Bulk Data server supports.
//! `Prefer: respond-async` is required; `_type` is required or filled from the types the scopes
//! name, each type must be readable, and one `_typeFilter=<Type>?_tag=<tenant's tags>` per type is added. A
//! client's `_typeFilter`s are kept, checked like searches (control parameters limited to `_id`, `_lastUpdated`,
//! `_tag`, `_profile`, `_security`, `_source`) and narrowed one by one, since a server ORs them; other parameters
//! (`_elements`, `includeAssociatedData`, …) are refused. The upstream's status URL and file URLs reach
//! the client only as `?_token=` links: HMAC under a signing context of their own (never valid as page tokens, nor
//! the reverse), bound to tenant, upstream and kind (status or file; a file also to its declared type), 24 h.
//! Another tenant's link gets 400, as a page token does. Polling passes `202` with `Retry-After` and `X-Progress`
//! (the latter only without digits); the manifest keeps `transactionTime`, `request` (public), `output` and `error`
//! with signed links, drops per-file counts, `deleted` and extensions, sets `requiresAccessToken: true`, and is
//! refused (502) if a file is off the upstream's base. `DELETE` cancels upstream. Files stream line by line: a line
//! is kept only if it parses, is of the file's declared type, of a type the scopes allow, and tagged inside the
//! grants; it is re-serialised with references on the public base. A line over 16 MiB resets the stream. Error
//! files hold OperationOutcomes (upstream diagnostics), which are never relayed, so they come back empty.

mod kickoff;
mod links;
mod manifest;
#[cfg(test)]
mod tests;

pub use kickoff::{KickOffError, kickoff, parameters, upstream_parameters};
pub use links::{Binding, EXPORT_TTL, ExportClaims, LinkError, LinkKind};
pub use manifest::{line_visible, progress, rewrite_manifest};

/// The query parameter carrying an export link's token.
pub const TOKEN_PARAM: &str = "_token";
/// The gateway's status endpoint, relative to the FHIR base.
pub const STATUS_OP: &str = "$export-poll-status";
/// The gateway's file endpoint, relative to the FHIR base.
pub const FILE_OP: &str = "$export-file";
