//! Signed page tokens. Upstream paging links are bearer tokens valid for anyone (HAPI's `_getpages`); the gateway
//! never hands them out. It replaces each `next`/`previous` link with `?_page=<token>`, where the token names the
//! tenant, the request path it continues, the upstream and the upstream link, expires, and is signed with HMAC-SHA256.
//! Entries of every page are still verified against the grants current when the page is fetched, so a page replayed
//! after a revocation shows nothing the tenant lost.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// How long a page link stays valid.
pub const PAGE_TTL: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageClaims {
    /// Tenant.
    #[serde(rename = "t")]
    pub tenant: String,
    /// The gateway path (relative to the FHIR base) the token continues, e.g. `Observation`.
    #[serde(rename = "p")]
    pub path: String,
    /// Upstream name.
    #[serde(rename = "u")]
    pub upstream: String,
    /// Path and query on the upstream.
    #[serde(rename = "l")]
    pub target: String,
    /// Unix seconds.
    #[serde(rename = "e")]
    pub expires: u64,
    /// The search was narrowed upstream with the tenant's tags, so its pages' `total` counts the tenant's matches
    /// (see `verify::keeps_total`). Tokens without it (made before it existed) count as not narrowed.
    #[serde(rename = "n", default, skip_serializing_if = "std::ops::Not::not")]
    pub narrowed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PageError {
    #[error("malformed page token")]
    Malformed,
    #[error("page token signature is invalid")]
    BadSignature,
    #[error("page token has expired")]
    Expired,
}

#[derive(Clone)]
pub struct PageSigner {
    key: Vec<u8>,
}

/// Page tokens are signed without a context (as they always were).
const PAGE_CONTEXT: &[u8] = b"";

pub fn unix(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl PageSigner {
    /// `key` must be shared by every data plane behind one load balancer, or a page fetched from another replica
    /// fails with 400.
    pub fn new(key: &[u8]) -> Self {
        PageSigner { key: key.to_vec() }
    }

    /// The MAC over `context` then the payload. Payloads are base64url text, which never holds a NUL, so contexts
    /// ending in NUL (and the empty context of page tokens) separate the kinds of token: one kind never verifies as
    /// another.
    fn mac(&self, context: &[u8]) -> HmacSha256 {
        // HMAC accepts keys of any length.
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(context);
        mac
    }

    /// Signs any claims under `context` (see [`PageSigner::mac`]).
    pub fn seal<T: Serialize>(&self, context: &[u8], claims: &T) -> String {
        let payload = B64.encode(serde_json::to_vec(claims).unwrap_or_default());
        let mut mac = self.mac(context);
        mac.update(payload.as_bytes());
        let tag = B64.encode(mac.finalize().into_bytes());
        format!("{payload}.{tag}")
    }

    /// The claims of a token sealed under `context`, if its signature holds. Expiry is the caller's to check.
    pub fn open<T: DeserializeOwned>(&self, context: &[u8], token: &str) -> Result<T, PageError> {
        let (payload, tag) = token.split_once('.').ok_or(PageError::Malformed)?;
        let tag = B64.decode(tag).map_err(|_| PageError::Malformed)?;
        let mut mac = self.mac(context);
        mac.update(payload.as_bytes());
        mac.verify_slice(&tag).map_err(|_| PageError::BadSignature)?;
        let bytes = B64.decode(payload).map_err(|_| PageError::Malformed)?;
        serde_json::from_slice(&bytes).map_err(|_| PageError::Malformed)
    }

    pub fn sign(&self, claims: &PageClaims) -> String {
        self.seal(PAGE_CONTEXT, claims)
    }

    pub fn claims(tenant: &str, path: &str, upstream: &str, target: &str, now: SystemTime) -> PageClaims {
        PageClaims {
            tenant: tenant.to_owned(),
            path: path.to_owned(),
            upstream: upstream.to_owned(),
            target: target.to_owned(),
            expires: unix(now + PAGE_TTL),
            narrowed: false,
        }
    }

    pub fn verify(&self, token: &str, now: SystemTime) -> Result<PageClaims, PageError> {
        let claims: PageClaims = self.open(PAGE_CONTEXT, token)?;
        if unix(now) >= claims.expires {
            return Err(PageError::Expired);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_table() {
        let signer = PageSigner::new(b"key-one");
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let claims = PageSigner::claims("tenant-a", "Observation", "fhir", "/fhir/Observation?_offset=20", now);
        let token = signer.sign(&claims);
        assert_eq!(signer.verify(&token, now), Ok(claims.clone()));
        let narrowed = PageClaims { narrowed: true, ..claims.clone() };
        assert_eq!(signer.verify(&signer.sign(&narrowed), now), Ok(narrowed));
        assert_eq!(signer.verify(&token, now + PAGE_TTL), Err(PageError::Expired));
        assert_eq!(PageSigner::new(b"key-two").verify(&token, now), Err(PageError::BadSignature));

        // Re-signing another tenant's payload with a forged tag, or editing the payload, fails.
        let (payload, tag) = token.split_once('.').unwrap_or_default();
        let mut forged = claims.clone();
        forged.tenant = "tenant-b".into();
        let forged_payload = B64.encode(serde_json::to_vec(&forged).unwrap_or_default());
        assert_eq!(signer.verify(&format!("{forged_payload}.{tag}"), now), Err(PageError::BadSignature));
        assert_eq!(signer.verify(&format!("{payload}x.{tag}"), now), Err(PageError::BadSignature));
        for junk in ["", ".", "abc", "a.b", "!!!.???"] {
            assert!(signer.verify(junk, now).is_err(), "{junk}");
        }
    }
}
