//! Token issuers the data plane trusts.

use std::time::Duration;

use fhirgw_proto::config::v1 as pb;

use crate::names::{self, NameError};

/// Algorithms accepted when a provider names none.
pub const DEFAULT_ALGORITHMS: &[&str] = &["RS256", "ES256", "PS256"];
/// Every algorithm that may be configured: asymmetric only, so a public key can never verify an HMAC.
pub const ALLOWED_ALGORITHMS: &[&str] =
    &["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"];
/// How long a fetched JWKS is used when the provider does not say: the bound on how long a key the provider has
/// removed keeps verifying tokens.
pub const DEFAULT_JWKS_MAX_AGE: Duration = Duration::from_secs(300);
const JWKS_MAX_AGE_RANGE: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(3600));
/// How long an active introspection answer is reused when the provider does not say: the bound on how long a token
/// revoked at the provider keeps working.
pub const DEFAULT_INTROSPECTION_MAX_AGE: Duration = Duration::from_secs(60);
const INTROSPECTION_MAX_AGE_RANGE: (Duration, Duration) = (Duration::ZERO, Duration::from_secs(300));

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityProvider {
    pub name: String,
    pub issuer: String,
    pub jwks_uri: String,
    pub audiences: Vec<String>,
    pub tenant_claim: String,
    pub algorithms: Vec<String>,
    pub introspection_endpoint: Option<String>,
    pub introspection_client_id: String,
    pub introspection_client_secret_file: Option<String>,
    pub authorization_endpoint: Option<String>,
    pub token_endpoint: Option<String>,
    pub jwks_max_age: Duration,
    pub introspection_max_age: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("{0}")]
    Invalid(String),
}

fn optional_url(what: &'static str, value: &str) -> Result<Option<String>, NameError> {
    if value.is_empty() {
        return Ok(None);
    }
    names::http_url(what, value)?;
    Ok(Some(value.to_owned()))
}

/// Where keys or token verdicts are fetched from: https, except on loopback (local issuers in tests and dev).
fn secure_url(what: &'static str, value: &str) -> Result<Option<String>, IdentityError> {
    let Some(url) = optional_url(what, value)? else { return Ok(None) };
    let uri = names::http_url(what, &url)?;
    let loopback = matches!(uri.host(), Some("localhost" | "127.0.0.1" | "[::1]" | "::1"));
    if uri.scheme_str() != Some("https") && !loopback {
        return Err(IdentityError::Invalid(format!("{what} must be https (plain http only on loopback)")));
    }
    Ok(Some(url))
}

/// A cache lifetime within `range`, or `default` when unset.
fn max_age(
    what: &str,
    value: Option<&prost_types::Duration>,
    default: Duration,
    (min, max): (Duration, Duration),
) -> Result<Duration, IdentityError> {
    let Some(value) = value else { return Ok(default) };
    match Duration::try_from(*value) {
        Ok(d) if (min..=max).contains(&d) => Ok(d),
        _ => Err(IdentityError::Invalid(format!("{what} must be between {}s and {}s", min.as_secs(), max.as_secs()))),
    }
}

impl TryFrom<&pb::IdentityProvider> for IdentityProvider {
    type Error = IdentityError;

    fn try_from(msg: &pb::IdentityProvider) -> Result<Self, Self::Error> {
        names::object_name("identity provider name", &msg.name)?;
        names::http_url("issuer", &msg.issuer)?;
        let jwks_uri = secure_url("jwks_uri", &msg.jwks_uri)?;
        let introspection_endpoint = secure_url("introspection_endpoint", &msg.introspection_endpoint)?;
        if jwks_uri.is_none() && introspection_endpoint.is_none() {
            return Err(IdentityError::Invalid("needs a jwks_uri, an introspection_endpoint, or both".into()));
        }
        if msg.audiences.is_empty() {
            return Err(IdentityError::Invalid("needs at least one audience (the gateway's public FHIR base)".into()));
        }
        for audience in &msg.audiences {
            if audience.is_empty() {
                return Err(IdentityError::Invalid("an audience is empty".into()));
            }
            names::text("audience", audience)?;
        }
        let tenant_claim = if msg.tenant_claim.is_empty() { "tenant".to_owned() } else { msg.tenant_claim.clone() };
        names::text("tenant_claim", &tenant_claim)?;
        let algorithms: Vec<String> = if msg.algorithms.is_empty() {
            DEFAULT_ALGORITHMS.iter().map(|a| (*a).to_owned()).collect()
        } else {
            msg.algorithms.clone()
        };
        if let Some(bad) = algorithms.iter().find(|a| !ALLOWED_ALGORITHMS.contains(&a.as_str())) {
            return Err(IdentityError::Invalid(format!(
                "algorithm `{bad}` is not allowed (allowed: {})",
                ALLOWED_ALGORITHMS.join(", ")
            )));
        }
        let introspection_client_secret_file = if msg.introspection_client_secret_file.is_empty() {
            None
        } else {
            names::text("introspection_client_secret_file", &msg.introspection_client_secret_file)?;
            Some(msg.introspection_client_secret_file.clone())
        };
        names::text("introspection_client_id", &msg.introspection_client_id)?;
        Ok(IdentityProvider {
            name: msg.name.clone(),
            issuer: msg.issuer.clone(),
            jwks_uri: jwks_uri.unwrap_or_default(),
            audiences: msg.audiences.clone(),
            tenant_claim,
            algorithms,
            introspection_endpoint,
            introspection_client_id: msg.introspection_client_id.clone(),
            introspection_client_secret_file,
            authorization_endpoint: optional_url("authorization_endpoint", &msg.authorization_endpoint)?,
            token_endpoint: optional_url("token_endpoint", &msg.token_endpoint)?,
            jwks_max_age: max_age("jwks_max_age", msg.jwks_max_age.as_ref(), DEFAULT_JWKS_MAX_AGE, JWKS_MAX_AGE_RANGE)?,
            introspection_max_age: max_age(
                "introspection_max_age",
                msg.introspection_max_age.as_ref(),
                DEFAULT_INTROSPECTION_MAX_AGE,
                INTROSPECTION_MAX_AGE_RANGE,
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idp() -> pb::IdentityProvider {
        pb::IdentityProvider {
            name: "local".into(),
            issuer: "https://issuer.example".into(),
            jwks_uri: "https://issuer.example/jwks".into(),
            audiences: vec!["https://gw.example/fhir".into()],
            ..Default::default()
        }
    }

    #[test]
    fn algorithms_are_allow_listed() {
        let ok = IdentityProvider::try_from(&idp()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ok.algorithms, DEFAULT_ALGORITHMS);
        for bad in ["none", "HS256", "hs256", "RS1"] {
            let mut msg = idp();
            msg.algorithms = vec![bad.into()];
            assert!(IdentityProvider::try_from(&msg).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn key_urls_must_be_https_off_loopback() {
        for (url, ok) in [
            ("https://issuer.example/jwks", true),
            ("http://127.0.0.1:8080/jwks", true),
            ("http://localhost/jwks", true),
            ("http://issuer.example/jwks", false),
        ] {
            let mut msg = idp();
            msg.jwks_uri = url.into();
            assert_eq!(IdentityProvider::try_from(&msg).is_ok(), ok, "{url}");
        }
    }

    #[test]
    fn cache_lifetimes() {
        type Age = Option<prost_types::Duration>;
        type Want = Result<(u64, u64), &'static str>;
        let d = |seconds, nanos| Some(prost_types::Duration { seconds, nanos });
        #[rustfmt::skip]
        let cases: &[(Age, Age, Want)] = &[
            (None, None, Ok((300, 60))),
            (d(1, 0), d(0, 0), Ok((1, 0))),
            (d(3600, 0), d(300, 0), Ok((3600, 300))),
            (d(0, 500_000_000), None, Err("jwks_max_age")),
            (d(0, 0), None, Err("jwks_max_age")),
            (d(3601, 0), None, Err("jwks_max_age")),
            (d(-5, 0), None, Err("jwks_max_age")),
            (None, d(301, 0), Err("introspection_max_age")),
            (None, d(-1, 0), Err("introspection_max_age")),
        ];
        for (jwks, introspection, want) in cases {
            let mut msg = idp();
            msg.jwks_max_age = *jwks;
            msg.introspection_max_age = *introspection;
            match (IdentityProvider::try_from(&msg), want) {
                (Ok(got), Ok((j, i))) => {
                    assert_eq!((got.jwks_max_age.as_secs(), got.introspection_max_age.as_secs()), (*j, *i));
                }
                (Err(e), Err(what)) => assert!(e.to_string().contains(what), "{jwks:?} {introspection:?}: {e}"),
                (got, want) => panic!("{jwks:?} {introspection:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn needs_keys_and_audience() {
        let mut no_keys = idp();
        no_keys.jwks_uri.clear();
        assert!(IdentityProvider::try_from(&no_keys).is_err());
        let mut no_aud = idp();
        no_aud.audiences.clear();
        assert!(IdentityProvider::try_from(&no_aud).is_err());
    }
}
