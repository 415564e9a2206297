//! Upstream FHIR servers.

use std::time::Duration;

use fhirgw_proto::config::v1 as pb;
use http::HeaderName;

use crate::names::{self, NameError};

pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_IDLE_BODY_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    pub name: String,
    /// Scheme and authority, e.g. `http://hapi:8080`.
    pub origin: String,
    /// Path of the FHIR base without a trailing slash, e.g. `/fhir` (empty for the root).
    pub base_path: String,
    /// The base URL as configured, without a trailing slash: what the upstream writes into its own links.
    pub base_url: String,
    pub auth: UpstreamAuth,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub idle_body_timeout: Duration,
    pub strip_request_headers: Vec<HeaderName>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamAuth {
    None,
    StaticToken {
        token_file: String,
    },
    ClientCredentials {
        token_url: String,
        client_id: String,
        client_secret_file: String,
        scopes: Vec<String>,
        audience: String,
    },
    MetadataIdentityToken {
        metadata_url: String,
        audience: String,
    },
}

/// The GCP metadata server's identity-token endpoint.
pub const GCP_IDENTITY_URL: &str =
    "http://metadata.google.internal/computeMetadata/v1/instance/service-accounts/default/identity";

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("{0}")]
    Invalid(String),
}

fn duration(what: &str, value: Option<&prost_types::Duration>, default: Duration) -> Result<Duration, UpstreamError> {
    let Some(d) = value else { return Ok(default) };
    let d = Duration::try_from(*d).map_err(|_| UpstreamError::Invalid(format!("{what} timeout must be positive")))?;
    if d.is_zero() || d > MAX_TIMEOUT {
        return Err(UpstreamError::Invalid(format!("{what} timeout must be between 0 and 1 hour")));
    }
    Ok(d)
}

fn file_path(what: &'static str, value: &str) -> Result<String, UpstreamError> {
    names::text(what, value)?;
    if !value.starts_with('/') {
        return Err(UpstreamError::Invalid(format!("{what} must be an absolute path")));
    }
    Ok(value.to_owned())
}

impl TryFrom<&pb::Upstream> for Upstream {
    type Error = UpstreamError;

    fn try_from(msg: &pb::Upstream) -> Result<Self, Self::Error> {
        names::object_name("upstream name", &msg.name)?;
        let uri = names::http_url("upstream base_url", &msg.base_url)?;
        let scheme = uri.scheme_str().unwrap_or("http");
        let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
        let origin = format!("{scheme}://{authority}");
        let base_path = uri.path().trim_end_matches('/').to_owned();
        let auth = match msg.auth.as_ref().and_then(|a| a.source.as_ref()) {
            None => UpstreamAuth::None,
            Some(pb::upstream_auth::Source::StaticToken(s)) => {
                UpstreamAuth::StaticToken { token_file: file_path("token_file", &s.token_file)? }
            }
            Some(pb::upstream_auth::Source::ClientCredentials(c)) => {
                let token_uri = names::http_url("token_url", &c.token_url)?;
                let loopback = matches!(token_uri.host(), Some("localhost" | "127.0.0.1" | "[::1]" | "::1"));
                if token_uri.scheme_str() != Some("https") && !loopback {
                    return Err(UpstreamError::Invalid("token_url must be https (plain http only on loopback)".into()));
                }
                if c.client_id.is_empty() {
                    return Err(UpstreamError::Invalid("client_credentials needs a client_id".into()));
                }
                names::text("client_id", &c.client_id)?;
                names::text("audience", &c.audience)?;
                for scope in &c.scopes {
                    names::text("scope", scope)?;
                }
                UpstreamAuth::ClientCredentials {
                    token_url: c.token_url.clone(),
                    client_id: c.client_id.clone(),
                    client_secret_file: file_path("client_secret_file", &c.client_secret_file)?,
                    scopes: c.scopes.clone(),
                    audience: c.audience.clone(),
                }
            }
            Some(pb::upstream_auth::Source::MetadataIdentityToken(m)) => {
                let metadata_url =
                    if m.metadata_url.is_empty() { GCP_IDENTITY_URL.to_owned() } else { m.metadata_url.clone() };
                names::http_url("metadata_url", &metadata_url)?;
                if m.audience.is_empty() {
                    return Err(UpstreamError::Invalid("metadata_identity_token needs an audience".into()));
                }
                names::text("audience", &m.audience)?;
                UpstreamAuth::MetadataIdentityToken { metadata_url, audience: m.audience.clone() }
            }
        };
        let timeouts = msg.timeouts.unwrap_or_default();
        let mut strip_request_headers = Vec::new();
        for header in &msg.strip_request_headers {
            let name = HeaderName::try_from(header.as_str())
                .map_err(|_| UpstreamError::Invalid(format!("`{header}` is not a valid header name")))?;
            strip_request_headers.push(name);
        }
        Ok(Upstream {
            name: msg.name.clone(),
            base_url: format!("{origin}{base_path}"),
            origin,
            base_path,
            auth,
            connect_timeout: duration("connect", timeouts.connect.as_ref(), DEFAULT_CONNECT_TIMEOUT)?,
            first_byte_timeout: duration("first_byte", timeouts.first_byte.as_ref(), DEFAULT_FIRST_BYTE_TIMEOUT)?,
            idle_body_timeout: duration("idle_body", timeouts.idle_body.as_ref(), DEFAULT_IDLE_BODY_TIMEOUT)?,
            strip_request_headers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(base_url: &str) -> pb::Upstream {
        pb::Upstream { name: "hapi".into(), base_url: base_url.into(), ..Default::default() }
    }

    #[test]
    fn base_url_is_split() {
        let u = Upstream::try_from(&upstream("http://hapi:8080/fhir/")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(u.origin, "http://hapi:8080");
        assert_eq!(u.base_path, "/fhir");
        assert_eq!(u.base_url, "http://hapi:8080/fhir");
        let root = Upstream::try_from(&upstream("https://fhir.example")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(root.base_path, "");
    }

    #[test]
    fn invalid_upstreams() {
        let mut relative_token = upstream("http://x/fhir");
        relative_token.auth = Some(pb::UpstreamAuth {
            source: Some(pb::upstream_auth::Source::StaticToken(pb::StaticToken { token_file: "token".into() })),
        });
        let mut zero_timeout = upstream("http://x/fhir");
        zero_timeout.timeouts =
            Some(pb::Timeouts { connect: Some(prost_types::Duration { seconds: 0, nanos: 0 }), ..Default::default() });
        let mut bad_header = upstream("http://x/fhir");
        bad_header.strip_request_headers = vec!["bad header".into()];
        let mut no_audience = upstream("http://x/fhir");
        no_audience.auth = Some(pb::UpstreamAuth {
            source: Some(pb::upstream_auth::Source::MetadataIdentityToken(Default::default())),
        });
        let mut http_token_url = upstream("http://x/fhir");
        http_token_url.auth = Some(pb::UpstreamAuth {
            source: Some(pb::upstream_auth::Source::ClientCredentials(pb::ClientCredentials {
                token_url: "http://idp.example/token".into(),
                client_id: "gw".into(),
                client_secret_file: "/run/secret".into(),
                ..Default::default()
            })),
        });
        let cases = [
            ("client secret over plain http", http_token_url),
            ("relative token file", relative_token),
            ("zero timeout", zero_timeout),
            ("bad header", bad_header),
            ("metadata without audience", no_audience),
            ("bad name", pb::Upstream { name: "Bad".into(), base_url: "http://x".into(), ..Default::default() }),
            ("bad url", upstream("hapi:8080")),
        ];
        for (what, msg) in cases {
            assert!(Upstream::try_from(&msg).is_err(), "{what} should be refused");
        }
    }
}
