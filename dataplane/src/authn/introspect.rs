//! RFC 7662 token introspection for opaque tokens.
//!
//! The gateway authenticates to the endpoint as a confidential client (HTTP Basic, RFC 6749 §2.3.1, with the secret
//! read from a file on the data plane) and accepts the token only if the answer says `active: true`, names this
//! issuer if it names one, names one of the configured audiences if it names any, and has not passed its `exp`.
//! An answer without `exp` is trusted for `DEFAULT_LIFETIME` only. An active answer is reused for the provider's
//! `introspection_max_age` at most, the bound on how long a revoked token keeps working.

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use fhirgw_config::identity::IdentityProvider;
use http::{Request, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use serde_json::Value;

use super::{AuthError, LEEWAY_SECS, Reason, Verified, caller_from_claims, unix_now};
use crate::http_client::Connector;

const TIMEOUT: Duration = Duration::from_secs(5);
const MAX_BYTES: usize = 64 * 1024;
/// How long an active answer without `exp` is reused.
const DEFAULT_LIFETIME: u64 = 60;

fn unavailable(idp: &IdentityProvider, reason: impl Into<String>) -> AuthError {
    AuthError::IssuerUnavailable { issuer: idp.issuer.clone(), reason: reason.into() }
}

fn form_encode(value: &str) -> String {
    form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

pub(super) async fn introspect(
    http: &Client<Connector, Full<Bytes>>,
    idp: &IdentityProvider,
    token: &str,
    now: Instant,
) -> Result<Verified, AuthError> {
    let Some(endpoint) = idp.introspection_endpoint.as_deref() else {
        return Err(AuthError::invalid(Reason::OpaqueUnsupported, format!("`{}` does not introspect", idp.name)));
    };
    let mut request = Request::post(endpoint)
        .header(header::ACCEPT, "application/json")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    if !idp.introspection_client_id.is_empty() {
        let secret = match &idp.introspection_client_secret_file {
            Some(path) => tokio::fs::read_to_string(path)
                .await
                .map_err(|e| unavailable(idp, format!("client secret file {path}: {e}")))?
                .trim()
                .to_owned(),
            None => String::new(),
        };
        let pair = format!("{}:{}", form_encode(&idp.introspection_client_id), form_encode(&secret));
        request = request.header(header::AUTHORIZATION, format!("Basic {}", STANDARD.encode(pair)));
    }
    let body = format!("token={}&token_type_hint=access_token", form_encode(token));
    let request = request.body(Full::new(Bytes::from(body))).map_err(|e| unavailable(idp, e.to_string()))?;
    let response = tokio::time::timeout(TIMEOUT, http.request(request))
        .await
        .map_err(|_| unavailable(idp, "introspection timed out"))?
        .map_err(|e| unavailable(idp, format!("introspection: {e}")))?;
    if !response.status().is_success() {
        return Err(unavailable(idp, format!("introspection answered HTTP {}", response.status())));
    }
    let body = tokio::time::timeout(TIMEOUT, Limited::new(response.into_body(), MAX_BYTES).collect())
        .await
        .map_err(|_| unavailable(idp, "introspection timed out while reading"))?
        .map_err(|e| unavailable(idp, format!("introspection body: {e}")))?
        .to_bytes();
    let answer: Value = serde_json::from_slice(&body)
        .map_err(|e| unavailable(idp, format!("introspection answer is not JSON: {e}")))?;
    let exp = check_answer(idp, &answer, unix_now())?;
    Ok(Verified {
        idp: idp.clone(),
        caller: std::sync::Arc::new(caller_from_claims(idp, &answer)?),
        exp,
        until: now + idp.introspection_max_age,
    })
}

/// Whether an introspection answer accepts the token at `now`; the `exp` to cache it until.
fn check_answer(idp: &IdentityProvider, answer: &Value, now: u64) -> Result<u64, AuthError> {
    if answer.get("active") != Some(&Value::Bool(true)) {
        return Err(AuthError::invalid(Reason::Inactive, "introspection: token is not active"));
    }
    if let Some(iss) = answer.get("iss")
        && iss.as_str() != Some(idp.issuer.as_str())
    {
        return Err(AuthError::invalid(
            Reason::UnknownIssuer,
            format!("introspection: iss {iss} is not `{}`", idp.issuer),
        ));
    }
    if let Some(aud) = answer.get("aud") {
        let named: Vec<&str> = match aud {
            Value::String(s) => vec![s.as_str()],
            Value::Array(items) => items.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        if !named.iter().any(|a| idp.audiences.iter().any(|want| want == a)) {
            return Err(AuthError::invalid(
                Reason::WrongAudience,
                format!("introspection: aud {aud} is not this gateway"),
            ));
        }
    }
    let exp = match answer.get("exp") {
        None => now + DEFAULT_LIFETIME,
        Some(v) => {
            v.as_u64().ok_or_else(|| AuthError::invalid(Reason::Malformed, "introspection: exp is not a number"))?
        }
    };
    if exp + LEEWAY_SECS <= now {
        return Err(AuthError::invalid(Reason::Expired, "introspection: token expired"));
    }
    if let Some(nbf) = answer.get("nbf").and_then(Value::as_u64)
        && nbf > now + LEEWAY_SECS
    {
        return Err(AuthError::invalid(Reason::NotYetValid, "introspection: token not yet valid"));
    }
    Ok(exp)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn idp() -> IdentityProvider {
        IdentityProvider {
            name: "idp".into(),
            issuer: "https://idp.example".into(),
            jwks_uri: String::new(),
            audiences: vec!["https://gw.example/fhir".into()],
            tenant_claim: "tenant".into(),
            algorithms: vec![],
            introspection_endpoint: Some("https://idp.example/introspect".into()),
            introspection_client_id: "gw".into(),
            introspection_client_secret_file: None,
            authorization_endpoint: None,
            token_endpoint: None,
            jwks_max_age: fhirgw_config::identity::DEFAULT_JWKS_MAX_AGE,
            introspection_max_age: fhirgw_config::identity::DEFAULT_INTROSPECTION_MAX_AGE,
        }
    }

    #[test]
    fn answers() {
        let now = 1_000_000;
        // An answer, and the exp it is cached until or the reason and words of its refusal.
        type Case = (Value, Result<u64, (Reason, &'static str)>);
        let cases: &[Case] = &[
            (json!({"active": true, "exp": now + 100}), Ok(now + 100)),
            (json!({"active": true}), Ok(now + DEFAULT_LIFETIME)),
            (json!({"active": false, "exp": now + 100}), Err((Reason::Inactive, "not active"))),
            (json!({"exp": now + 100}), Err((Reason::Inactive, "not active"))),
            (json!({"active": "true"}), Err((Reason::Inactive, "not active"))),
            (json!({"active": true, "iss": "https://idp.example"}), Ok(now + DEFAULT_LIFETIME)),
            (json!({"active": true, "iss": "https://evil.example"}), Err((Reason::UnknownIssuer, "iss"))),
            (json!({"active": true, "aud": "https://gw.example/fhir"}), Ok(now + DEFAULT_LIFETIME)),
            (json!({"active": true, "aud": ["x", "https://gw.example/fhir"]}), Ok(now + DEFAULT_LIFETIME)),
            (json!({"active": true, "aud": "https://other.example/fhir"}), Err((Reason::WrongAudience, "aud"))),
            (json!({"active": true, "aud": 7}), Err((Reason::WrongAudience, "aud"))),
            (json!({"active": true, "exp": now - LEEWAY_SECS - 1}), Err((Reason::Expired, "expired"))),
            (json!({"active": true, "exp": "soon"}), Err((Reason::Malformed, "not a number"))),
            (json!({"active": true, "nbf": now + LEEWAY_SECS + 60}), Err((Reason::NotYetValid, "not yet valid"))),
        ];
        for (answer, want) in cases {
            match (check_answer(&idp(), answer, now), want) {
                (Ok(got), Ok(want)) => assert_eq!(got, *want, "{answer}"),
                (Err(AuthError::Invalid { reason, detail }), Err((want_reason, want))) => {
                    assert_eq!(reason, *want_reason, "{answer}");
                    assert!(detail.contains(want), "{answer}: {detail}");
                }
                (got, want) => panic!("{answer}: got {got:?}, want {want:?}"),
            }
        }
    }
}
