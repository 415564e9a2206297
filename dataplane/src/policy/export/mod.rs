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
