//! Who is calling: bearer tokens validated against the pushed identity providers.
//!
//! A JWT's issuer is chosen by its exact `iss`; the key by `kid` from the issuer's JWKS, cached in moka and
//! refetched (at most once per 10 s per issuer) when a `kid` is unknown, so key rotation works without letting random
//! `kid`s hammer the issuer. Algorithms are allow-listed per issuer (asymmetric only, never `none` or HMAC), `aud`
//! must be one of the issuer's configured audiences, `exp` is required, `exp`/`nbf` get 30 s of leeway. Opaque tokens
//! (and JWTs of an issuer without a JWKS) go through RFC 7662 introspection (`introspect.rs`). The tenant comes from
//! the configured claim and must be a tenant the control plane knows; a token without it is refused.
//!
//! A verified token is cached by its SHA-256 until its `exp` (at most five minutes), so the signature check or the
//! introspection call is paid once per token, not once per request. A cached result is used only while the provider's
//! settings are unchanged, and `exp` and the tenant are checked on every request.

mod introspect;
/// Scopes are policy (`policy::scopes`); re-exported here for the code that reads them off tokens.
pub use crate::policy::scopes;

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use bytes::Bytes;
use dashmap::DashMap;
use fhirgw_config::Snapshot;
use fhirgw_config::identity::IdentityProvider;
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use moka::future::Cache;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::http_client::{self, Connector};
use crate::metrics::CacheCounter;
use scopes::Scopes;

pub const LEEWAY_SECS: u64 = 30;
const JWKS_TTL: Duration = Duration::from_secs(600);
const JWKS_REFRESH_MIN_INTERVAL: Duration = Duration::from_secs(10);
const JWKS_MAX_BYTES: usize = 1024 * 1024;
const JWKS_TIMEOUT: Duration = Duration::from_secs(5);
/// A verified token is re-verified at least this often, so a key dropped from the JWKS (or a token revoked at the
/// introspection endpoint) stops working within this bound even if the token's `exp` is later.
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
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token")]
    Missing,
    /// The credentials cannot be read one way only: several `Authorization` headers, or a value that is not exactly
    /// one bearer token. Answered 400 `invalid_request` (RFC 6750 §3.1) before any token is looked at.
    #[error("ambiguous credentials: {0}")]
    Ambiguous(&'static str),
    /// The token is refused. The reason is for the log only; the client learns just `invalid_token`.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// The issuer's keys or introspection endpoint cannot be reached: a 503, not the caller's fault.
    #[error("identity provider `{issuer}` unavailable: {reason}")]
    IssuerUnavailable { issuer: String, reason: String },
}

pub struct Authenticator {
    jwks: Cache<String, Arc<Vec<Jwk>>>,
    last_forced: DashMap<String, Instant>,
    /// Tokens already verified (JWT signature checked, or introspected as active), keyed by the SHA-256 of the token,
    /// each kept until its own `exp` and never longer than `VERIFIED_MAX_AGE`.
    verified: Cache<[u8; 32], Arc<Verified>>,
    http: Client<Connector, Full<Bytes>>,
    jwks_lookups: CacheCounter,
    verified_lookups: CacheCounter,
}

/// The outcome of verifying one token, reusable until `exp` while its identity provider's settings are unchanged.
#[derive(Debug)]
struct Verified {
    /// The settings the token was verified against; a changed provider means verifying again.
    idp: IdentityProvider,
    caller: Caller,
    /// Unix seconds.
    exp: u64,
}

struct VerifiedExpiry;

impl moka::Expiry<[u8; 32], Arc<Verified>> for VerifiedExpiry {
    fn expire_after_create(&self, _: &[u8; 32], value: &Arc<Verified>, _: std::time::Instant) -> Option<Duration> {
        let left = (value.exp + LEEWAY_SECS).saturating_sub(unix_now());
        Some(Duration::from_secs(left).min(VERIFIED_MAX_AGE))
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Default for Authenticator {
    fn default() -> Self {
        Authenticator {
            jwks: Cache::builder().max_capacity(256).time_to_live(JWKS_TTL).build(),
            last_forced: DashMap::new(),
            verified: Cache::builder().max_capacity(VERIFIED_CAPACITY).expire_after(VerifiedExpiry).build(),
            http: Client::builder(TokioExecutor::new()).build(http_client::connector(JWKS_TIMEOUT)),
            jwks_lookups: CacheCounter::default(),
            verified_lookups: CacheCounter::default(),
        }
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
    let value = value.to_str().map_err(|_| AuthError::Invalid("authorization header is not ASCII".into()))?;
    let (scheme, token) =
        value.split_once(' ').ok_or_else(|| AuthError::Invalid("malformed authorization header".into()))?;
    let token = token.trim_matches(' ');
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(AuthError::Invalid("not a bearer token".into()));
    }
    if !is_b64token(token) {
        return Err(AuthError::Ambiguous("the Authorization header must hold exactly one bearer token"));
    }
    Ok(token)
}

/// RFC 6750's `b64token`: `1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`. A space or comma
/// inside (`Bearer a, Bearer b`, `Bearer a b`) would be a second credential.
fn is_b64token(token: &str) -> bool {
    let body = token.trim_end_matches('=');
    !body.is_empty()
        && body.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/'))
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
        .ok_or_else(|| AuthError::Invalid(format!("no `{}` claim", idp.tenant_claim)))?;
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
    })
}

impl Authenticator {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Counts hits and misses of the JWKS cache and of the verified-token cache.
    pub fn with_metrics(jwks_lookups: CacheCounter, verified_lookups: CacheCounter) -> Arc<Self> {
        Arc::new(Self { jwks_lookups, verified_lookups, ..Self::default() })
    }

    pub async fn authenticate(&self, snapshot: &Snapshot, headers: &HeaderMap) -> Result<Caller, AuthError> {
        let token = bearer(headers)?;
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let cached = match self.verified.get(&key).await {
            // Reuse only while the provider's settings are exactly those the token was verified against.
            Some(hit) if snapshot.identity_providers.iter().any(|p| *p == hit.idp) => Some(hit),
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
                let fresh = Arc::new(self.verify(snapshot, token).await?);
                self.verified.insert(key, fresh.clone()).await;
                fresh
            }
        };
        // Checked on every request, cached or not: the expiry to the second, and the tenant still existing.
        if verified.exp + LEEWAY_SECS <= unix_now() {
            return Err(AuthError::Invalid("token expired".into()));
        }
        if !snapshot.tenants.contains_key(&verified.caller.tenant) {
            return Err(AuthError::Invalid(format!("unknown tenant `{}`", verified.caller.tenant)));
        }
        Ok(verified.caller.clone())
    }

    async fn verify(&self, snapshot: &Snapshot, token: &str) -> Result<Verified, AuthError> {
        if !looks_like_jwt(token) {
            // An opaque token carries no issuer: it goes to the one provider that introspects, never to several
            // (sending a caller's token to an issuer that did not mint it would leak it).
            let mut introspecting = snapshot.identity_providers.iter().filter(|p| p.introspection_endpoint.is_some());
            return match (introspecting.next(), introspecting.next()) {
                (Some(idp), None) => introspect::introspect(&self.http, idp, token).await,
                (None, _) => Err(AuthError::Invalid("opaque token, and no identity provider introspects".into())),
                (Some(_), Some(_)) => {
                    Err(AuthError::Invalid("opaque token, and more than one identity provider introspects".into()))
                }
            };
        }
        let issuer = unverified_issuer(token).ok_or_else(|| AuthError::Invalid("no readable iss claim".into()))?;
        let idp = snapshot
            .identity_providers
            .iter()
            .find(|p| p.issuer == issuer)
            .ok_or_else(|| AuthError::Invalid(format!("issuer `{issuer}` is not trusted")))?;
        if idp.jwks_uri.is_empty() {
            return match idp.introspection_endpoint {
                Some(_) => introspect::introspect(&self.http, idp, token).await,
                None => Err(AuthError::Invalid(format!("`{}` has neither JWKS nor introspection", idp.name))),
            };
        }
        self.verify_jwt(idp, token).await
    }

    async fn verify_jwt(&self, idp: &IdentityProvider, token: &str) -> Result<Verified, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| AuthError::Invalid(format!("header: {e}")))?;
        let alg = algorithm_name(header.alg);
        if !idp.algorithms.iter().any(|a| a == alg) {
            return Err(AuthError::Invalid(format!("algorithm {alg} is not allowed for `{}`", idp.name)));
        }
        let jwk = self.key(idp, header.kid.as_deref()).await?;
        if let Some(key_alg) = jwk.common.key_algorithm
            && format!("{key_alg:?}") != alg
        {
            return Err(AuthError::Invalid(format!("key is for {key_alg:?}, token uses {alg}")));
        }
        let key = DecodingKey::from_jwk(&jwk).map_err(|e| AuthError::Invalid(format!("unusable key: {e}")))?;
        let mut validation = Validation::new(header.alg);
        validation.algorithms = vec![header.alg];
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_issuer(&[&idp.issuer]);
        validation.set_audience(&idp.audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data = jsonwebtoken::decode::<Value>(token, &key, &validation)
            .map_err(|e| AuthError::Invalid(format!("verification: {e}")))?;
        let exp = data.claims.get("exp").and_then(Value::as_u64).ok_or_else(|| AuthError::Invalid("no exp".into()))?;
        Ok(Verified { idp: idp.clone(), caller: caller_from_claims(idp, &data.claims)?, exp })
    }

    async fn key(&self, idp: &IdentityProvider, kid: Option<&str>) -> Result<Jwk, AuthError> {
        let find = |keys: &[Jwk]| -> Option<Jwk> {
            match kid {
                Some(kid) => keys.iter().find(|k| k.common.key_id.as_deref() == Some(kid)).cloned(),
                // Without a kid, only an unambiguous set will do.
                None if keys.len() == 1 => keys.first().cloned(),
                None => None,
            }
        };
        let keys = self.keys(idp).await?;
        if let Some(jwk) = find(&keys) {
            return Ok(jwk);
        }
        // Unknown kid: the issuer may have rotated. Refetch, but not more than once per interval.
        let due = self.last_forced.get(&idp.jwks_uri).is_none_or(|at| at.elapsed() >= JWKS_REFRESH_MIN_INTERVAL);
        if due && kid.is_some() {
            self.last_forced.insert(idp.jwks_uri.clone(), Instant::now());
            self.jwks.invalidate(&idp.jwks_uri).await;
            let keys = self.keys(idp).await?;
            if let Some(jwk) = find(&keys) {
                return Ok(jwk);
            }
        }
        Err(AuthError::Invalid(format!("no key `{}` in the JWKS of `{}`", kid.unwrap_or("(none)"), idp.name)))
    }

    async fn keys(&self, idp: &IdentityProvider) -> Result<Arc<Vec<Jwk>>, AuthError> {
        let uri = idp.jwks_uri.clone();
        let http = self.http.clone();
        let mut fetched = false;
        let keys = self
            .jwks
            .try_get_with(uri.clone(), async {
                fetched = true;
                fetch_jwks(&http, &uri).await.map(Arc::new)
            })
            .await;
        self.jwks_lookups.record(!fetched);
        keys.map_err(|e: Arc<String>| AuthError::IssuerUnavailable {
            issuer: idp.issuer.clone(),
            reason: e.to_string(),
        })
    }
}

async fn fetch_jwks(http: &Client<Connector, Full<Bytes>>, uri: &str) -> Result<Vec<Jwk>, String> {
    let request = Request::get(uri)
        .header(http::header::ACCEPT, "application/json")
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(JWKS_TIMEOUT, http.request(request))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("HTTP {}", response.status()));
    }
    let body = tokio::time::timeout(JWKS_TIMEOUT, Limited::new(response.into_body(), JWKS_MAX_BYTES).collect())
        .await
        .map_err(|_| "timed out reading".to_owned())?
        .map_err(|e| e.to_string())?
        .to_bytes();
    // Parse key by key: one key of an unsupported type must not take the others down with it.
    let value: Value = serde_json::from_slice(&body).map_err(|e| format!("not JSON: {e}"))?;
    let keys: Vec<Jwk> = value
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("no `keys` array")?
        .iter()
        .filter_map(|k| serde_json::from_value::<Jwk>(k.clone()).ok())
        .collect();
    Ok(keys)
}

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
