//! Upstream credentials the data plane fetches rather than reads from a file: OAuth2 client-credentials access tokens
//! (RFC 6749 §4.4) and metadata-server identity tokens (the GCP Cloud Run pattern).
//!
//! [`TokenSource`] caches one token per (upstream, source) and refreshes it ahead of its expiry: five minutes early,
//! or at half its lifetime when it lives less than ten minutes. Concurrent misses share one fetch. When a refresh
//! fails, the previous token keeps being used while it is still valid; a failure is remembered for a second so a
//! failing token endpoint is not hammered. Nothing here ever puts a secret or a token into an error or a log.
//!
//! The HTTP client here only talks to token endpoints and metadata servers; it never carries an upstream credential.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use fhirgw_config::upstream::UpstreamAuth;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use moka::Expiry;
use moka::future::Cache;
use serde_json::Value;

use crate::http_client::{self, Connector};
use crate::metrics::CacheCounter;

/// How long before a token's expiry it is replaced.
pub const DEFAULT_REFRESH_MARGIN: Duration = Duration::from_secs(300);
/// Lifetime of a client-credentials token whose response has no `expires_in`.
pub const DEFAULT_ACCESS_TOKEN_LIFETIME: Duration = Duration::from_secs(300);
/// Lifetime of an identity token whose `exp` cannot be read.
pub const DEFAULT_IDENTITY_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// Longest lifetime believed: a token is fetched again at least this often.
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Connect, send and read a token response within this.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest token response read.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// A failed fetch is not retried for this long (callers get the same error, or the previous token while valid).
const FAILURE_HOLD: Duration = Duration::from_secs(1);
/// A previous token is only used after a failed refresh while it has at least this much life left.
const STALE_SAFETY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("this credential source is not fetched")]
    NotFetched,
    #[error("client secret file {path} is not readable: {reason}")]
    SecretFile { path: String, reason: String },
    #[error("client secret file {path} is empty")]
    SecretEmpty { path: String },
    #[error("cannot build the request to {url}: {reason}")]
    Request { url: String, reason: String },
    #[error("{url} unreachable: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("{url} did not answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("{url} answered HTTP {status}{}", error_code.as_deref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Status { url: String, status: u16, error_code: Option<String> },
    #[error("the response of {url} is larger than {limit} bytes")]
    TooLarge { url: String, limit: usize },
    #[error("the response of {url} is unusable: {reason}")]
    Malformed { url: String, reason: &'static str },
    #[error("{url} issued a token of type `{token_type}`, not Bearer")]
    TokenType { url: String, token_type: String },
}

/// A fetched token and when to replace it.
#[derive(Clone)]
struct Fetched {
    token: Arc<str>,
    refresh_at: Instant,
    expires_at: Instant,
}

impl std::fmt::Debug for Fetched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetched")
            .field("token", &"<redacted>")
            .field("refresh_at", &self.refresh_at)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// Per-entry expiry: `fresh` entries live until the refresh time, `stale` ones until shortly before the token expires.
#[derive(Clone, Copy)]
enum Until {
    Refresh,
    Expiry,
}

impl Until {
    fn of(self, value: &Fetched, now: Instant) -> Option<Duration> {
        let at = match self {
            Until::Refresh => value.refresh_at,
            Until::Expiry => value.expires_at.checked_sub(STALE_SAFETY).unwrap_or(now),
        };
        Some(at.saturating_duration_since(now))
    }
}

impl Expiry<String, Fetched> for Until {
    fn expire_after_create(&self, _key: &String, value: &Fetched, created_at: Instant) -> Option<Duration> {
        self.of(value, created_at)
    }

    fn expire_after_update(
        &self,
        _key: &String,
        value: &Fetched,
        updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        self.of(value, updated_at)
    }
}

/// Fetches and caches upstream tokens.
pub struct TokenSource {
    http: Client<Connector, Full<Bytes>>,
    margin: Duration,
    /// Tokens not yet due for refresh; a miss fetches (one fetch per key at a time).
    fresh: Cache<String, Fetched>,
    /// The last token fetched per key, kept until shortly before it expires: the fallback when a refresh fails.
    last_good: Cache<String, Fetched>,
    /// Recent failures per key.
    failures: Cache<String, Arc<CredentialError>>,
    /// A hit is a token served without waiting for a fetch.
    lookups: CacheCounter,
}

impl Default for TokenSource {
    fn default() -> Self {
        Self::with_margin(DEFAULT_REFRESH_MARGIN)
    }
}

impl TokenSource {
    pub fn with_margin(margin: Duration) -> Self {
        Self {
            http: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(http_client::connector(CONNECT_TIMEOUT)),
            margin,
            fresh: Cache::builder().max_capacity(1024).expire_after(Until::Refresh).build(),
            last_good: Cache::builder().max_capacity(1024).expire_after(Until::Expiry).build(),
            failures: Cache::builder().max_capacity(1024).time_to_live(FAILURE_HOLD).build(),
            lookups: CacheCounter::default(),
        }
    }

    /// Counts lookups into `lookups` (hits and misses).
    pub fn with_lookups(mut self, lookups: CacheCounter) -> Self {
        self.lookups = lookups;
        self
    }

    /// The current token for `upstream`'s `auth` (a client-credentials or metadata identity-token source).
    pub async fn token(&self, upstream: &str, auth: &UpstreamAuth) -> Result<Arc<str>, Arc<CredentialError>> {
        let key = cache_key(upstream, auth).ok_or_else(|| Arc::new(CredentialError::NotFetched))?;
        if let Some(fetched) = self.fresh.get(&key).await {
            self.lookups.hit();
            return Ok(fetched.token);
        }
        self.lookups.miss();
        // Boxed: a miss is rare, and its fetch would otherwise make the future of every upstream call (moved
        // several times per request) kilobytes larger.
        Box::pin(self.refresh(key, auth)).await
    }

    async fn refresh(&self, key: String, auth: &UpstreamAuth) -> Result<Arc<str>, Arc<CredentialError>> {
        if let Some(error) = self.failures.get(&key).await {
            return self.stale_or(&key, error).await;
        }
        let fetch = async {
            let fetched = self.fetch(auth).await?;
            self.last_good.insert(key.clone(), fetched.clone()).await;
            Ok::<_, CredentialError>(fetched)
        };
        match self.fresh.try_get_with(key.clone(), fetch).await {
            Ok(fetched) => Ok(fetched.token),
            Err(error) => {
                self.failures.insert(key.clone(), error.clone()).await;
                self.stale_or(&key, error).await
            }
        }
    }

    async fn stale_or(&self, key: &str, error: Arc<CredentialError>) -> Result<Arc<str>, Arc<CredentialError>> {
        match self.last_good.get(key).await {
            Some(previous) if previous.expires_at > Instant::now() + STALE_SAFETY => {
                tracing::warn!(source = key, %error, "token refresh failed; using the previous token until it expires");
                Ok(previous.token)
            }
            _ => Err(error),
        }
    }

    async fn fetch(&self, auth: &UpstreamAuth) -> Result<Fetched, CredentialError> {
        let started = Instant::now();
        let (token, lifetime) = match auth {
            UpstreamAuth::ClientCredentials { token_url, client_id, client_secret_file, scopes, audience } => {
                let secret = read_secret(client_secret_file).await?;
                let request = client_credentials_request(token_url, client_id, &secret, scopes, audience)?;
                let (status, body) = self.exchange(token_url, request).await?;
                if !status.is_success() {
                    return Err(CredentialError::Status {
                        url: token_url.clone(),
                        status: status.as_u16(),
                        error_code: oauth_error_code(&body),
                    });
                }
                parse_token_response(&body).map_err(|reason| match reason {
                    TokenResponseError::Malformed(reason) => {
                        CredentialError::Malformed { url: token_url.clone(), reason }
                    }
                    TokenResponseError::TokenType(token_type) => {
                        CredentialError::TokenType { url: token_url.clone(), token_type }
                    }
                })?
            }
            UpstreamAuth::MetadataIdentityToken { metadata_url, audience } => {
                let url = identity_url(metadata_url, audience);
                let request = Request::get(&url)
                    .header("Metadata-Flavor", "Google")
                    .body(Full::new(Bytes::new()))
                    .map_err(|e| CredentialError::Request { url: metadata_url.clone(), reason: e.to_string() })?;
                let (status, body) = self.exchange(metadata_url, request).await?;
                if !status.is_success() {
                    return Err(CredentialError::Status {
                        url: metadata_url.clone(),
                        status: status.as_u16(),
                        error_code: None,
                    });
                }
                let malformed = |reason| CredentialError::Malformed { url: metadata_url.clone(), reason };
                let token = std::str::from_utf8(&body).map_err(|_| malformed("the token is not UTF-8"))?.trim();
                check_token(token).map_err(malformed)?;
                let lifetime = match jwt_exp(token) {
                    Some(exp) => {
                        let remaining = exp.saturating_sub(unix_now());
                        if remaining <= 0 {
                            return Err(malformed("the identity token has already expired"));
                        }
                        Duration::from_secs(remaining.unsigned_abs())
                    }
                    None => DEFAULT_IDENTITY_TOKEN_LIFETIME,
                };
                (token.to_owned(), lifetime)
            }
            UpstreamAuth::None | UpstreamAuth::StaticToken { .. } => return Err(CredentialError::NotFetched),
        };
        let lifetime = lifetime.min(MAX_LIFETIME);
        // Counted from when the request left: the token cannot have been issued earlier than that.
        Ok(Fetched {
            token: Arc::from(token),
            refresh_at: started + refresh_after(lifetime, self.margin),
            expires_at: started + lifetime,
        })
    }

    /// Sends `request`, reads at most [`MAX_RESPONSE_BYTES`], all within [`FETCH_TIMEOUT`].
    async fn exchange(
        &self,
        url: &str,
        request: Request<Full<Bytes>>,
    ) -> Result<(http::StatusCode, Bytes), CredentialError> {
        let url = without_query(url);
        let exchange = async {
            let response: Response<Incoming> = self
                .http
                .request(request)
                .await
                .map_err(|e| CredentialError::Unreachable { url: url.clone(), reason: e.to_string() })?;
            let declared = response
                .headers()
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|n| n > MAX_RESPONSE_BYTES as u64) {
                return Err(CredentialError::TooLarge { url: url.clone(), limit: MAX_RESPONSE_BYTES });
            }
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES).collect().await.map_err(|e| {
                if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                    CredentialError::TooLarge { url: url.clone(), limit: MAX_RESPONSE_BYTES }
                } else {
                    CredentialError::Unreachable { url: url.clone(), reason: e.to_string() }
                }
            })?;
            Ok((status, body.to_bytes()))
        };
        tokio::time::timeout(FETCH_TIMEOUT, exchange)
            .await
            .map_err(|_| CredentialError::Timeout { url: url.clone(), timeout: FETCH_TIMEOUT })?
    }
}

/// The cache key: the upstream and everything that identifies the source (never the secret itself).
fn cache_key(upstream: &str, auth: &UpstreamAuth) -> Option<String> {
    match auth {
        UpstreamAuth::ClientCredentials { token_url, client_id, client_secret_file, scopes, audience } => Some(
            serde_json::json!([
                "client_credentials",
                upstream,
                token_url,
                client_id,
                client_secret_file,
                scopes,
                audience
            ])
            .to_string(),
        ),
        UpstreamAuth::MetadataIdentityToken { metadata_url, audience } => {
            Some(serde_json::json!(["metadata_identity_token", upstream, metadata_url, audience]).to_string())
        }
        UpstreamAuth::None | UpstreamAuth::StaticToken { .. } => None,
    }
}

/// When to replace a token that lives `lifetime`: `margin` before it expires, or at half its lifetime when it lives
/// less than twice the margin.
pub fn refresh_after(lifetime: Duration, margin: Duration) -> Duration {
    if lifetime < margin.saturating_mul(2) { lifetime / 2 } else { lifetime - margin }
}

async fn read_secret(path: &str) -> Result<String, CredentialError> {
    let raw = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| CredentialError::SecretFile { path: path.to_owned(), reason: e.kind().to_string() })?;
    let secret = raw.trim();
    if secret.is_empty() {
        return Err(CredentialError::SecretEmpty { path: path.to_owned() });
    }
    Ok(secret.to_owned())
}

/// Whether `client_secret_file` can be used: readable and not empty. For configuration checks.
pub fn check_secret_file(path: &str) -> Result<(), String> {
    match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => Ok(()),
        Ok(_) => Err(format!("client_secret_file {path} is empty on this data plane")),
        Err(e) => Err(format!("client_secret_file {path} is not readable on this data plane: {e}")),
    }
}

/// `Basic base64(urlencode(client_id):urlencode(secret))` (RFC 6749 §2.3.1).
pub fn basic_auth(client_id: &str, secret: &str) -> String {
    let encode = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    format!("Basic {}", STANDARD.encode(format!("{}:{}", encode(client_id), encode(secret))))
}

/// The form body of a client-credentials grant.
pub fn client_credentials_form(scopes: &[String], audience: &str) -> String {
    let mut form = form_urlencoded::Serializer::new(String::new());
    form.append_pair("grant_type", "client_credentials");
    let scope = scopes.iter().map(|s| s.trim()).filter(|s| !s.is_empty()).collect::<Vec<_>>().join(" ");
    if !scope.is_empty() {
        form.append_pair("scope", &scope);
    }
    if !audience.is_empty() {
        form.append_pair("audience", audience);
    }
    form.finish()
}

fn client_credentials_request(
    token_url: &str,
    client_id: &str,
    secret: &str,
    scopes: &[String],
    audience: &str,
) -> Result<Request<Full<Bytes>>, CredentialError> {
    let fail = |reason: &str| CredentialError::Request { url: without_query(token_url), reason: reason.to_owned() };
    let mut authorization = HeaderValue::try_from(basic_auth(client_id, secret))
        .map_err(|_| fail("the client credentials are not a valid header value"))?;
    authorization.set_sensitive(true);
    Request::post(token_url)
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(ACCEPT, "application/json")
        .header(AUTHORIZATION, authorization)
        .body(Full::new(Bytes::from(client_credentials_form(scopes, audience))))
        .map_err(|_| fail("invalid token_url"))
}

#[derive(Debug, PartialEq, Eq)]
pub enum TokenResponseError {
    Malformed(&'static str),
    TokenType(String),
}

/// Parses a successful token response (RFC 6749 §5.1): the access token and its lifetime.
pub fn parse_token_response(body: &[u8]) -> Result<(String, Duration), TokenResponseError> {
    use TokenResponseError::Malformed;
    // serde_json's messages never quote the input, but the input is not looked at beyond this anyway.
    let value: Value = serde_json::from_slice(body).map_err(|_| Malformed("not JSON"))?;
    let object = value.as_object().ok_or(Malformed("not a JSON object"))?;
    let token = object
        .get("access_token")
        .ok_or(Malformed("no access_token"))?
        .as_str()
        .ok_or(Malformed("access_token is not a string"))?;
    check_token(token).map_err(Malformed)?;
    match object.get("token_type") {
        None | Some(Value::Null) => {}
        Some(Value::String(t)) if t.eq_ignore_ascii_case("bearer") => {}
        Some(Value::String(t)) => return Err(TokenResponseError::TokenType(t.chars().take(32).collect())),
        Some(_) => return Err(Malformed("token_type is not a string")),
    }
    let lifetime = match object.get("expires_in") {
        None | Some(Value::Null) => DEFAULT_ACCESS_TOKEN_LIFETIME,
        // Some providers send the number as a string.
        Some(Value::String(s)) => {
            Duration::from_secs(s.trim().parse::<u64>().map_err(|_| Malformed("expires_in is not a number"))?)
        }
        Some(Value::Number(n)) => match (n.as_u64(), n.as_f64()) {
            (Some(secs), _) => Duration::from_secs(secs),
            (None, Some(secs)) if secs.is_finite() && secs >= 0.0 => {
                Duration::from_secs_f64(secs.min(MAX_LIFETIME.as_secs_f64()))
            }
            _ => return Err(Malformed("expires_in is negative")),
        },
        Some(_) => return Err(Malformed("expires_in is not a number")),
    };
    if lifetime.is_zero() {
        return Err(Malformed("expires_in is 0"));
    }
    Ok((token.to_owned(), lifetime))
}

/// The `error` code of an OAuth2 error response (RFC 6749 §5.2), when it is a plain code (safe to log).
fn oauth_error_code(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let code = value.get("error")?.as_str()?;
    let plain = !code.is_empty() && code.len() <= 64 && code.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    plain.then(|| code.to_owned())
}

/// A token must fit in an `Authorization: Bearer` header: visible ASCII, no spaces.
fn check_token(token: &str) -> Result<(), &'static str> {
    if token.is_empty() {
        return Err("the token is empty");
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the token has characters not allowed in a header");
    }
    Ok(())
}

/// `{metadata_url}?audience=…&format=full`.
pub fn identity_url(metadata_url: &str, audience: &str) -> String {
    let query = form_urlencoded::Serializer::new(String::new())
        .append_pair("audience", audience)
        .append_pair("format", "full")
        .finish();
    let separator = if metadata_url.contains('?') { '&' } else { '?' };
    format!("{metadata_url}{separator}{query}")
}

/// The `exp` claim of a JWT, read without verifying it (it is our own credential, issued to us over a trusted path).
pub fn jwt_exp(token: &str) -> Option<i64> {
    let mut parts = token.split('.');
    let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    match claims.get("exp")? {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().filter(|f| f.is_finite()).map(|f| f as i64)),
        _ => None,
    }
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)).unwrap_or(0)
}

/// A URL fit for an error message: without its query.
fn without_query(url: &str) -> String {
    url.split(['?', '#']).next().unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn refresh_time() {
        let margin = 5 * MIN;
        assert_eq!(refresh_after(60 * MIN, margin), 55 * MIN);
        assert_eq!(refresh_after(10 * MIN, margin), 5 * MIN, "exactly twice the margin: margin early");
        assert_eq!(refresh_after(Duration::from_secs(310), margin), Duration::from_secs(155));
        assert_eq!(refresh_after(Duration::from_secs(2), margin), Duration::from_secs(1));
        assert_eq!(refresh_after(Duration::ZERO, margin), Duration::ZERO);
        assert_eq!(refresh_after(Duration::from_secs(30), Duration::from_secs(10)), Duration::from_secs(20));
    }

    #[test]
    fn token_responses() {
        let ok = |body: &str| parse_token_response(body.as_bytes());
        assert_eq!(
            ok(r#"{"access_token":"abc.def","token_type":"Bearer","expires_in":3600}"#),
            Ok(("abc.def".to_owned(), 60 * MIN))
        );
        assert_eq!(ok(r#"{"access_token":"t","token_type":"bearer"}"#), Ok(("t".to_owned(), 5 * MIN)));
        assert_eq!(ok(r#"{"access_token":"t","expires_in":"120"}"#), Ok(("t".to_owned(), 2 * MIN)));
        assert_eq!(
            ok(r#"{"access_token":"t","expires_in":90.5}"#),
            Ok(("t".to_owned(), Duration::from_secs_f64(90.5)))
        );
        assert_eq!(ok(r#"{"access_token":"t","expires_in":null,"scope":"a b"}"#), Ok(("t".to_owned(), 5 * MIN)));
        assert_eq!(ok(r#"{"access_token":"t","token_type":"mac"}"#), Err(TokenResponseError::TokenType("mac".into())));
        for (body, what) in [
            ("not json", "not JSON"),
            ("[]", "not a JSON object"),
            (r#"{"token_type":"Bearer"}"#, "no access_token"),
            (r#"{"access_token":42}"#, "access_token is not a string"),
            (r#"{"access_token":""}"#, "the token is empty"),
            (r#"{"access_token":"a b"}"#, "the token has characters not allowed in a header"),
            (r#"{"access_token":"a\nb"}"#, "the token has characters not allowed in a header"),
            (r#"{"access_token":"t","expires_in":-5}"#, "expires_in is negative"),
            (r#"{"access_token":"t","expires_in":0}"#, "expires_in is 0"),
            (r#"{"access_token":"t","expires_in":"soon"}"#, "expires_in is not a number"),
            (r#"{"access_token":"t","token_type":1}"#, "token_type is not a string"),
        ] {
            assert_eq!(ok(body), Err(TokenResponseError::Malformed(what)), "{body}");
        }
    }

    #[test]
    fn errors_never_show_the_token() {
        let secret_token = "sekrit-token-value";
        let body = format!(r#"{{"access_token":"{secret_token}","token_type":"{secret_token}"}}"#);
        let error = parse_token_response(body.as_bytes()).unwrap_err();
        // The token type is echoed (it is not a secret), truncated; the access token never is.
        let TokenResponseError::TokenType(t) = error else { panic!("{error:?}") };
        let message = CredentialError::TokenType { url: "http://x/token".into(), token_type: t }.to_string();
        assert_eq!(message.matches(secret_token).count(), 1);
        let message = CredentialError::Status {
            url: "http://x/token".into(),
            status: 401,
            error_code: oauth_error_code(br#"{"error":"invalid_client","error_description":"bad secret sekrit"}"#),
        }
        .to_string();
        assert_eq!(message, "http://x/token answered HTTP 401 (invalid_client)");
        assert_eq!(oauth_error_code(br#"{"error":"has spaces and sekrit"}"#), None);
        assert_eq!(without_query("http://meta/identity?audience=x"), "http://meta/identity");
        let fetched =
            Fetched { token: Arc::from(secret_token), refresh_at: Instant::now(), expires_at: Instant::now() };
        assert!(!format!("{fetched:?}").contains(secret_token));
    }

    #[test]
    fn jwt_expiry() {
        let b64 = |v: &str| URL_SAFE_NO_PAD.encode(v);
        let jwt = |payload: &str| format!("{}.{}.sig", b64(r#"{"alg":"RS256"}"#), b64(payload));
        assert_eq!(jwt_exp(&jwt(r#"{"aud":"x","exp":1700000000}"#)), Some(1_700_000_000));
        assert_eq!(jwt_exp(&jwt(r#"{"exp":1700000000.7}"#)), Some(1_700_000_000));
        assert_eq!(jwt_exp(&jwt(r#"{"aud":"x"}"#)), None);
        assert_eq!(jwt_exp(&jwt(r#"{"exp":"1700000000"}"#)), None);
        assert_eq!(jwt_exp(&jwt("not json")), None);
        assert_eq!(jwt_exp("opaque-token-0123"), None);
        assert_eq!(jwt_exp("a.b"), None);
        assert_eq!(jwt_exp("a.!!!.c"), None);
        assert_eq!(jwt_exp(&format!("{}.x", jwt(r#"{"exp":1}"#))), None, "four parts");
        // Padded base64url is tolerated.
        let padded = format!("h.{}.s", base64::engine::general_purpose::URL_SAFE.encode(r#"{"exp":12}"#));
        assert_eq!(jwt_exp(&padded), Some(12));
    }

    #[test]
    fn basic_auth_encodes_each_part_first() {
        assert_eq!(basic_auth("client", "secret"), format!("Basic {}", STANDARD.encode("client:secret")));
        // RFC 6749 §2.3.1: form-urlencode, then join with ':' — a ':' in the id must not split it.
        assert_eq!(
            basic_auth("my client:1", "p@ss w/rd&=+"),
            format!("Basic {}", STANDARD.encode("my+client%3A1:p%40ss+w%2Frd%26%3D%2B"))
        );
        assert_eq!(basic_auth("é", ""), format!("Basic {}", STANDARD.encode("%C3%A9:")));
    }

    #[test]
    fn request_shapes() {
        assert_eq!(client_credentials_form(&[], ""), "grant_type=client_credentials");
        assert_eq!(
            client_credentials_form(&["system/*.read".into(), "openid".into()], "https://fhir.example/"),
            "grant_type=client_credentials&scope=system%2F*.read+openid&audience=https%3A%2F%2Ffhir.example%2F"
        );
        assert_eq!(
            identity_url("http://metadata/identity", "https://run.app/x?y"),
            "http://metadata/identity?audience=https%3A%2F%2Frun.app%2Fx%3Fy&format=full"
        );
        let request = client_credentials_request("http://idp/token", "id", "secret", &["a".into()], "").unwrap();
        assert_eq!(request.method(), http::Method::POST);
        assert_eq!(request.headers()[CONTENT_TYPE], "application/x-www-form-urlencoded");
        assert!(request.headers()[AUTHORIZATION].is_sensitive());
    }

    #[test]
    fn cache_keys_identify_the_source_not_the_secret() {
        let cc = |scopes: Vec<String>| UpstreamAuth::ClientCredentials {
            token_url: "http://idp/token".into(),
            client_id: "id".into(),
            client_secret_file: "/run/secret".into(),
            scopes,
            audience: String::new(),
        };
        let a = cache_key("fhir", &cc(vec!["a".into()])).unwrap();
        assert_ne!(a, cache_key("fhir", &cc(vec!["b".into()])).unwrap());
        assert_ne!(a, cache_key("other", &cc(vec!["a".into()])).unwrap());
        assert_ne!(a, cache_key("fhir", &cc(vec!["a b".into()])).unwrap());
        let md = |audience: &str| UpstreamAuth::MetadataIdentityToken {
            metadata_url: "http://m/identity".into(),
            audience: audience.into(),
        };
        assert_ne!(cache_key("fhir", &md("x")), cache_key("fhir", &md("y")));
        assert_eq!(cache_key("fhir", &UpstreamAuth::None), None);
    }

    #[test]
    fn expiry_policy() {
        let now = Instant::now();
        let fetched = Fetched { token: Arc::from("t"), refresh_at: now + MIN, expires_at: now + 5 * MIN };
        assert_eq!(Until::Refresh.of(&fetched, now), Some(MIN));
        assert_eq!(Until::Expiry.of(&fetched, now), Some(5 * MIN - STALE_SAFETY));
        assert_eq!(Until::Refresh.of(&fetched, now + 2 * MIN), Some(Duration::ZERO));
    }
}
