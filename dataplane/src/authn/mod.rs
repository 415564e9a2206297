//! Who is calling: bearer tokens validated against the pushed identity providers.
//!
//! A JWT's issuer is chosen by its exact `iss`; the key by `kid` from the issuer's JWKS (`jwks.rs`: used for the
//! provider's `jwks_max_age`, refetched at once, at most every 10 s, when a `kid` is unknown). Algorithms are
//! allow-listed per issuer (asymmetric only, never `none` or HMAC), `aud` must be one of the issuer's configured
//! audiences, `exp` is required, `exp`/`nbf` get 30 s of leeway. Opaque tokens (and JWTs of an issuer without a JWKS)
//! go through RFC 7662 introspection (`introspect.rs`). The tenant comes from the configured claim and must be a
//! tenant the control plane knows; a token without it is refused.
//!
//! A verified token is cached by its SHA-256, so the signature check or the introspection call is paid once per
//! token, not once per request. A cached verification never outlives its basis: a JWT's is kept only while the key
//! set that verified it is in date (so a key the provider removes stops working within `jwks_max_age`), an
//! introspection answer for `introspection_max_age` (so a revoked token stops within that), and neither past the
//! token's `exp` nor five minutes. It is used only while the provider's settings are unchanged, and `exp` and the
//! tenant are checked on every request.

mod introspect;
mod jwks;
mod reason;
/// Scopes are policy (`policy::scopes`); re-exported here for the code that reads them off tokens.
pub use crate::policy::scopes;

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use bytes::Bytes;
use fhirgw_config::Snapshot;
use fhirgw_config::identity::IdentityProvider;
use http::HeaderMap;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use moka::future::Cache;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::http_client::{self, Connector};
use crate::metrics::CacheCounter;
pub use reason::Reason;
use scopes::Scopes;

pub const LEEWAY_SECS: u64 = 30;
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// A verified token is re-verified at least this often, whatever the provider's cache settings.
const VERIFIED_MAX_AGE: Duration = Duration::from_secs(300);
const VERIFIED_CAPACITY: u64 = 100_000;

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub tenant: String,
    pub subject: String,
    pub scopes: Scopes,
    /// The `patient` claim (SMART launch context), if any.
    pub patient: Option<String>,
    /// The OAuth client the token was issued to (`client_id`, RFC 9068 and RFC 7662; else OpenID's `azp`), for the
    /// access log. Never used for a decision.
    pub client_id: Option<String>,
    /// The identity provider's issuer, which scopes `subject` and `client_id` (for the audit trail).
    pub issuer: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token")]
    Missing,
    /// The credentials cannot be read one way only: several `Authorization` headers, or a value that is not exactly
    /// one bearer token. Answered 400 `invalid_request` (RFC 6750 §3.1) before any token is looked at.
    #[error("ambiguous credentials: {0}")]
    Ambiguous(&'static str),
    /// The token is refused. The client learns the kind (`Reason::description`); the detail is for the log only.
    #[error("invalid token ({}): {detail}", reason.code())]
    Invalid { reason: Reason, detail: String },
    /// The issuer's keys or introspection endpoint cannot be reached: a 503, not the caller's fault.
    #[error("identity provider `{issuer}` unavailable: {reason}")]
    IssuerUnavailable { issuer: String, reason: String },
}

pub struct Authenticator {
    jwks: jwks::Jwks,
    /// Tokens already verified (JWT signature checked, or introspected as active), keyed by the SHA-256 of the token,
    /// each kept until its `until`, its own `exp`, and never longer than `VERIFIED_MAX_AGE`.
    verified: Cache<[u8; 32], Arc<Verified>>,
    http: Client<Connector, Full<Bytes>>,
    verified_lookups: CacheCounter,
}

/// The outcome of verifying one token, reusable until `exp` while its identity provider's settings are unchanged.
#[derive(Debug)]
struct Verified {
    /// The settings the token was verified against; a changed provider means verifying again.
    idp: IdentityProvider,
    /// Shared by every request the token makes while the verification is reused (no copy per request).
    caller: Arc<Caller>,
    /// Unix seconds.
    exp: u64,
    /// The verification's own basis runs out then: the key set it used is due for a refetch, or the introspection
    /// answer is as old as the provider allows.
    until: Instant,
}

impl Verified {
    /// How long this verification may be reused from `now` (`now_unix` on the wall clock): zero if not at all.
    fn reusable_for(&self, now: Instant, now_unix: u64) -> Duration {
        let to_exp = Duration::from_secs((self.exp + LEEWAY_SECS).saturating_sub(now_unix));
        self.until.saturating_duration_since(now).min(to_exp).min(VERIFIED_MAX_AGE)
    }
}

struct VerifiedExpiry;

impl moka::Expiry<[u8; 32], Arc<Verified>> for VerifiedExpiry {
    fn expire_after_create(&self, _: &[u8; 32], value: &Arc<Verified>, now: Instant) -> Option<Duration> {
        Some(value.reusable_for(now, unix_now()))
    }
}

impl AuthError {
    pub(crate) fn invalid(reason: Reason, detail: impl Into<String>) -> Self {
        AuthError::Invalid { reason, detail: detail.into() }
    }

    /// The stable code of this refusal (the access log's `reason`).
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "token_missing",
            AuthError::Ambiguous(_) => "credentials_ambiguous",
            AuthError::Invalid { reason, .. } => reason.code(),
            AuthError::IssuerUnavailable { .. } => "idp_unavailable",
        }
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Default for Authenticator {
    fn default() -> Self {
        Self::build(CacheCounter::default(), CacheCounter::default())
    }
}

fn bearer(headers: &HeaderMap) -> Result<&str, AuthError> {
    let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Err(AuthError::Missing);
    };
    if values.next().is_some() {
        return Err(AuthError::Ambiguous("more than one Authorization header"));
    }
    // Read as bytes, in one pass over the token (a JWT is a kilobyte, and this is on every request's path).
    let value = value.as_bytes();
    let space = value
        .iter()
        .position(|&b| b == b' ')
        .ok_or_else(|| AuthError::invalid(Reason::NotBearer, "malformed authorization header"))?;
    let (scheme, token) = (&value[..space], trim_spaces(&value[space + 1..]));
    if !scheme.eq_ignore_ascii_case(b"bearer") || token.is_empty() {
        return Err(AuthError::invalid(Reason::NotBearer, "not a bearer token"));
    }
    if !is_b64token(token) {
        if !token.is_ascii() {
            return Err(AuthError::invalid(Reason::NotBearer, "authorization header is not ASCII"));
        }
        return Err(AuthError::Ambiguous("the Authorization header must hold exactly one bearer token"));
    }
    // A b64token is ASCII, so this cannot fail.
    std::str::from_utf8(token).map_err(|_| AuthError::invalid(Reason::NotBearer, "authorization header is not ASCII"))
}

fn trim_spaces(mut bytes: &[u8]) -> &[u8] {
    while let [b' ', rest @ ..] = bytes {
        bytes = rest;
    }
    while let [rest @ .., b' '] = bytes {
        bytes = rest;
    }
    bytes
}

/// The bytes of RFC 6750's `b64token` before its `=` padding, as a table.
const B64TOKEN: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        table[i] = b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/');
        i += 1;
    }
    table
};

/// RFC 6750's `b64token`: `1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`. A space or comma
/// inside (`Bearer a, Bearer b`, `Bearer a b`) would be a second credential.
fn is_b64token(token: &[u8]) -> bool {
    let mut body = token;
    while let [rest @ .., b'='] = body {
        body = rest;
    }
    !body.is_empty() && body.iter().all(|&b| B64TOKEN[usize::from(b)])
}

/// `iss` read before verification, only to pick the issuer whose keys will verify the token.
fn unverified_issuer(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = B64.decode(payload).ok()?;
    let value: Value = serde_json::from_slice(&bytes).ok()?;
    value.get("iss")?.as_str().map(str::to_owned)
}

/// A compact JWS has exactly three segments and a header that decodes; anything else is an opaque token.
fn looks_like_jwt(token: &str) -> bool {
    token.split('.').count() == 3 && jsonwebtoken::decode_header(token).is_ok()
}

fn algorithm_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::HS256 => "HS256",
        Algorithm::HS384 => "HS384",
        Algorithm::HS512 => "HS512",
        Algorithm::ES256 => "ES256",
        Algorithm::ES384 => "ES384",
        Algorithm::RS256 => "RS256",
        Algorithm::RS384 => "RS384",
        Algorithm::RS512 => "RS512",
        Algorithm::PS256 => "PS256",
        Algorithm::PS384 => "PS384",
        Algorithm::PS512 => "PS512",
        Algorithm::EdDSA => "EdDSA",
    }
}

/// The caller described by verified claims (from a JWT or an introspection response).
pub(crate) fn caller_from_claims(idp: &IdentityProvider, claims: &Value) -> Result<Caller, AuthError> {
    let tenant = claims
        .get(&idp.tenant_claim)
        .and_then(Value::as_str)
        .ok_or_else(|| AuthError::invalid(Reason::NoTenant, format!("no string `{}` claim", idp.tenant_claim)))?;
    let scopes = match (claims.get("scope"), claims.get("scp")) {
        (Some(Value::String(s)), _) => Scopes::parse(s),
        (_, Some(Value::Array(items))) => Scopes::from_list(items.iter().filter_map(Value::as_str)),
        (_, Some(Value::String(s))) => Scopes::parse(s),
        _ => Scopes::default(),
    };
    Ok(Caller {
        tenant: tenant.to_owned(),
        subject: claims.get("sub").and_then(Value::as_str).unwrap_or_default().to_owned(),
        scopes,
        patient: claims.get("patient").and_then(Value::as_str).map(str::to_owned),
        client_id: ["client_id", "azp"].iter().find_map(|c| claims.get(*c).and_then(Value::as_str)).map(str::to_owned),
        issuer: idp.issuer.clone(),
    })
}

impl Authenticator {
    fn build(jwks_lookups: CacheCounter, verified_lookups: CacheCounter) -> Self {
        let http = Client::builder(TokioExecutor::new()).build(http_client::connector(FETCH_TIMEOUT));
        Authenticator {
            jwks: jwks::Jwks::new(http.clone(), jwks_lookups),
            verified: Cache::builder().max_capacity(VERIFIED_CAPACITY).expire_after(VerifiedExpiry).build(),
            http,
            verified_lookups,
        }
    }

    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Counts hits and misses of the JWKS cache and of the verified-token cache.
    pub fn with_metrics(jwks_lookups: CacheCounter, verified_lookups: CacheCounter) -> Arc<Self> {
        Arc::new(Self::build(jwks_lookups, verified_lookups))
    }

    pub async fn authenticate(&self, snapshot: &Snapshot, headers: &HeaderMap) -> Result<Arc<Caller>, AuthError> {
        self.authenticate_at(snapshot, headers, Instant::now()).await
    }

    /// `authenticate` as of `now` on the monotonic clock (tests move it forward; `exp` is read off the wall clock).
    async fn authenticate_at(
        &self,
        snapshot: &Snapshot,
        headers: &HeaderMap,
        now: Instant,
    ) -> Result<Arc<Caller>, AuthError> {
        let token = bearer(headers)?;
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let cached = match self.verified.get(&key).await {
            // Reuse only while the verification's basis holds and the provider's settings are exactly those the
            // token was verified against.
            Some(hit) if hit.until > now && snapshot.identity_providers.iter().any(|p| *p == hit.idp) => Some(hit),
            Some(_) => {
                self.verified.invalidate(&key).await;
                None
            }
            None => None,
        };
        self.verified_lookups.record(cached.is_some());
        let verified = match cached {
            Some(hit) => hit,
            None => {
                let fresh = Arc::new(self.verify(snapshot, token, now).await?);
                if !fresh.reusable_for(now, unix_now()).is_zero() {
                    self.verified.insert(key, fresh.clone()).await;
                }
                fresh
            }
        };
        // Checked on every request, cached or not: the expiry to the second, and the tenant still existing.
        if verified.exp + LEEWAY_SECS <= unix_now() {
            return Err(AuthError::invalid(Reason::Expired, "token expired"));
        }
        if !snapshot.tenants.contains_key(&verified.caller.tenant) {
            return Err(AuthError::invalid(
                Reason::UnknownTenant,
                format!("unknown tenant `{}`", verified.caller.tenant),
            ));
        }
        Ok(verified.caller.clone())
    }

    async fn verify(&self, snapshot: &Snapshot, token: &str, now: Instant) -> Result<Verified, AuthError> {
        if !looks_like_jwt(token) {
            // An opaque token carries no issuer: it goes to the one provider that introspects, never to several
            // (sending a caller's token to an issuer that did not mint it would leak it).
            let mut introspecting = snapshot.identity_providers.iter().filter(|p| p.introspection_endpoint.is_some());
            return match (introspecting.next(), introspecting.next()) {
                (Some(idp), None) => introspect::introspect(&self.http, idp, token, now).await,
                (None, _) => Err(AuthError::invalid(
                    Reason::OpaqueUnsupported,
                    "opaque token, and no identity provider introspects",
                )),
                (Some(_), Some(_)) => Err(AuthError::invalid(
                    Reason::OpaqueUnsupported,
                    "opaque token, and more than one identity provider introspects",
                )),
            };
        }
        let issuer =
            unverified_issuer(token).ok_or_else(|| AuthError::invalid(Reason::Malformed, "no readable iss claim"))?;
        let idp =
            snapshot.identity_providers.iter().find(|p| p.issuer == issuer).ok_or_else(|| {
                AuthError::invalid(Reason::UnknownIssuer, format!("issuer `{issuer}` is not trusted"))
            })?;
        if idp.jwks_uri.is_empty() {
            return match idp.introspection_endpoint {
                Some(_) => introspect::introspect(&self.http, idp, token, now).await,
                None => Err(AuthError::invalid(
                    Reason::UnknownIssuer,
                    format!("`{}` has neither JWKS nor introspection", idp.name),
                )),
            };
        }
        self.verify_jwt(idp, token, now).await
    }

    async fn verify_jwt(&self, idp: &IdentityProvider, token: &str, now: Instant) -> Result<Verified, AuthError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| AuthError::invalid(Reason::Malformed, format!("header: {e}")))?;
        let alg = algorithm_name(header.alg);
        if !idp.algorithms.iter().any(|a| a == alg) {
            return Err(AuthError::invalid(
                Reason::Signature,
                format!("algorithm {alg} is not allowed for `{}`", idp.name),
            ));
        }
        let (jwk, key_set) = self.jwks.key(idp, header.kid.as_deref(), now).await?;
        if let Some(key_alg) = jwk.common.key_algorithm
            && format!("{key_alg:?}") != alg
        {
            return Err(AuthError::invalid(Reason::Signature, format!("key is for {key_alg:?}, token uses {alg}")));
        }
        let key = DecodingKey::from_jwk(&jwk)
            .map_err(|e| AuthError::invalid(Reason::Signature, format!("unusable key: {e}")))?;
        let mut validation = Validation::new(header.alg);
        validation.algorithms = vec![header.alg];
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_issuer(&[&idp.issuer]);
        validation.set_audience(&idp.audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data = jsonwebtoken::decode::<Value>(token, &key, &validation)
            .map_err(|e| AuthError::invalid(reason::of_jwt_error(e.kind()), format!("verification: {e}")))?;
        let exp = data
            .claims
            .get("exp")
            .and_then(Value::as_u64)
            .ok_or_else(|| AuthError::invalid(Reason::Malformed, "no exp"))?;
        Ok(Verified {
            idp: idp.clone(),
            caller: Arc::new(caller_from_claims(idp, &data.claims)?),
            exp,
            until: key_set.good_until(idp),
        })
    }
}

#[cfg(test)]
mod cache_tests;

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn bearer_credentials_table() {
        #[rustfmt::skip]
        let cases: Vec<(Vec<&str>, Result<&str, &str>)> = vec![
            (vec!["Bearer abc.def-ghi_jkl"], Ok("abc.def-ghi_jkl")),
            (vec!["bearer abc=="], Ok("abc==")),
            (vec!["Bearer  abc "], Ok("abc")),
            (vec![], Err("no bearer token")),
            (vec!["Bearer a", "Bearer b"], Err("more than one")),
            (vec!["Bearer a", "Bearer a"], Err("more than one")),
            (vec!["Bearer a, Bearer b"], Err("exactly one")),
            (vec!["Bearer a b"], Err("exactly one")),
            (vec!["Bearer a,b"], Err("exactly one")),
            (vec!["Bearer a=b"], Err("exactly one")),
            (vec!["Basic dXNlcjpwYXNz"], Err("not a bearer token")),
            (vec!["Bearer"], Err("malformed")),
            (vec!["Bearer "], Err("not a bearer token")),
            (vec!["Bearer a~+/9-._Z="], Ok("a~+/9-._Z=")),
            (vec!["Bearer ="], Err("exactly one")),
            (vec!["Bearer a;b"], Err("exactly one")),
        ];
        for (values, want) in cases {
            let mut headers = HeaderMap::new();
            for v in &values {
                headers.append(http::header::AUTHORIZATION, HeaderValue::from_static(v));
            }
            match (bearer(&headers), want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{values:?}"),
                (Err(e), Err(want)) => assert!(e.to_string().contains(want), "{values:?}: {e}"),
                (got, want) => panic!("{values:?}: got {got:?}, want {want:?}"),
            }
        }
    }
}
