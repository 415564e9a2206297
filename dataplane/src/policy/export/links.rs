//! Status and file links: bearer capabilities on the upstream, handed out only as gateway links signed under a
//! context of their own, bound to the tenant, the upstream and the kind of link, valid for 24 hours.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::policy::paging::{PageError, PageSigner, unix};

/// How long status and file links stay valid.
pub const EXPORT_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// The signing context of export links (see `PageSigner::seal`).
const EXPORT_CONTEXT: &[u8] = b"fhirgw/export\0";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LinkKind {
    #[serde(rename = "status")]
    Status,
    #[serde(rename = "file")]
    File,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportClaims {
    #[serde(rename = "k")]
    pub kind: LinkKind,
    #[serde(rename = "t")]
    pub tenant: String,
    /// Upstream name.
    #[serde(rename = "u")]
    pub upstream: String,
    /// Path and query on the upstream.
    #[serde(rename = "l")]
    pub target: String,
    /// For a file: the resource type the manifest declared for it; every line must be of that type.
    #[serde(rename = "r", default, skip_serializing_if = "Option::is_none")]
    pub resource_type: Option<String>,
    /// Unix seconds.
    #[serde(rename = "e")]
    pub expires: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("the export link is malformed")]
    Malformed,
    #[error("the export link's signature is invalid")]
    BadSignature,
    #[error("the export link has expired")]
    Expired,
    #[error("the export link is not valid for this request")]
    Mismatch,
}

/// What a link must be bound to, to be honoured here.
pub struct Binding<'a> {
    pub kind: LinkKind,
    pub tenant: &'a str,
    pub upstream: &'a str,
    /// The upstream's base path (`/fhir`, or empty): the target must be on it.
    pub base_path: &'a str,
}

impl ExportClaims {
    pub fn new(binding: &Binding<'_>, target: String, resource_type: Option<String>, now: SystemTime) -> Self {
        ExportClaims {
            kind: binding.kind,
            tenant: binding.tenant.to_owned(),
            upstream: binding.upstream.to_owned(),
            target,
            resource_type,
            expires: unix(now + EXPORT_TTL),
        }
    }

    pub fn sign(&self, signer: &PageSigner) -> String {
        signer.seal(EXPORT_CONTEXT, self)
    }

    /// The claims of `token`, if it is a valid, unexpired export link bound exactly to `binding`.
    pub fn verify(
        signer: &PageSigner,
        token: &str,
        binding: &Binding<'_>,
        now: SystemTime,
    ) -> Result<ExportClaims, LinkError> {
        let claims: ExportClaims = signer.open(EXPORT_CONTEXT, token).map_err(|e| match e {
            PageError::BadSignature => LinkError::BadSignature,
            PageError::Malformed | PageError::Expired => LinkError::Malformed,
        })?;
        if unix(now) >= claims.expires {
            return Err(LinkError::Expired);
        }
        let base = binding.base_path;
        let on_base = claims.target.starts_with(&format!("{base}/")) || claims.target.starts_with(&format!("{base}?"));
        if claims.kind != binding.kind
            || claims.tenant != binding.tenant
            || claims.upstream != binding.upstream
            || !on_base
        {
            return Err(LinkError::Mismatch);
        }
        Ok(claims)
    }
}
