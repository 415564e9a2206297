//! The FHIR sink's definition from the data plane's flags: its base URL and a credential written exactly as an
//! upstream's `auth` is in the operator API (proto3 JSON: `{"static_token": {"token_file": "…"}}`,
//! `{"client_credentials": {…}}`, `{"metadata_identity_token": {…}}`), validated by the same code as upstreams and
//! used through the same client, so every upstream credential source works and is refreshed the same way.

use std::sync::Arc;

use fhirgw_config::upstream::{Upstream, UpstreamAuth};
use fhirgw_proto::config::v1 as pb;
use serde::Deserialize;

/// The sink's name in the upstream client (its metrics label); no configured upstream can have it.
pub const SINK_UPSTREAM: &str = "_audit";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Auth {
    #[serde(alias = "staticToken")]
    static_token: Option<StaticToken>,
    #[serde(alias = "clientCredentials")]
    client_credentials: Option<ClientCredentials>,
    #[serde(alias = "metadataIdentityToken")]
    metadata_identity_token: Option<Metadata>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StaticToken {
    #[serde(alias = "tokenFile")]
    token_file: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientCredentials {
    #[serde(alias = "tokenUrl")]
    token_url: String,
    #[serde(alias = "clientId")]
    client_id: String,
    #[serde(alias = "clientSecretFile")]
    client_secret_file: String,
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default)]
    audience: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    #[serde(alias = "metadataUrl", default)]
    metadata_url: String,
    audience: String,
}

/// `base_url` with the credential `auth` (proto3 JSON of `UpstreamAuth`; `None` or `{}`: no credential).
pub fn fhir_sink(base_url: &str, auth: Option<&str>) -> Result<Arc<Upstream>, String> {
    let auth: Auth = match auth.map(str::trim).filter(|a| !a.is_empty()) {
        Some(json) => serde_json::from_str(json).map_err(|e| format!("--audit-fhir-auth: {e}"))?,
        None => Auth::default(),
    };
    let source = match (auth.static_token, auth.client_credentials, auth.metadata_identity_token) {
        (None, None, None) => None,
        (Some(s), None, None) => {
            Some(pb::upstream_auth::Source::StaticToken(pb::StaticToken { token_file: s.token_file }))
        }
        (None, Some(c), None) => Some(pb::upstream_auth::Source::ClientCredentials(pb::ClientCredentials {
            token_url: c.token_url,
            client_id: c.client_id,
            client_secret_file: c.client_secret_file,
            scopes: c.scopes,
            audience: c.audience,
        })),
        (None, None, Some(m)) => Some(pb::upstream_auth::Source::MetadataIdentityToken(pb::MetadataIdentityToken {
            metadata_url: m.metadata_url,
            audience: m.audience,
        })),
        _ => return Err("--audit-fhir-auth names more than one credential source".into()),
    };
    let seconds = |s: i64| Some(prost_types::Duration { seconds: s, nanos: 0 });
    let msg = pb::Upstream {
        name: "audit".into(),
        base_url: base_url.to_owned(),
        auth: source.map(|source| pb::UpstreamAuth { source: Some(source) }),
        timeouts: Some(pb::Timeouts { connect: seconds(5), first_byte: seconds(30), idle_body: seconds(30) }),
        strip_request_headers: Vec::new(),
    };
    let mut upstream = Upstream::try_from(&msg).map_err(|e| format!("--audit-fhir-url / --audit-fhir-auth: {e}"))?;
    // Checked now: a sink that cannot authenticate would only fill the spool.
    match &upstream.auth {
        UpstreamAuth::StaticToken { token_file } => match std::fs::read_to_string(token_file) {
            Ok(s) if !s.trim().is_empty() => {}
            Ok(_) => return Err(format!("the audit sink's token_file {token_file} is empty")),
            Err(e) => return Err(format!("the audit sink's token_file {token_file} is not readable: {e}")),
        },
        UpstreamAuth::ClientCredentials { client_secret_file, .. } => {
            crate::credentials::check_secret_file(client_secret_file)?;
        }
        UpstreamAuth::None | UpstreamAuth::MetadataIdentityToken { .. } => {}
    }
    SINK_UPSTREAM.clone_into(&mut upstream.name);
    Ok(Arc::new(upstream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sink_credentials_are_upstream_credentials() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let token = dir.path().join("audit.token");
        std::fs::write(&token, "secret\n").unwrap_or_else(|e| panic!("{e}"));
        let token = token.display().to_string();
        let ok = |auth: Option<String>| fhir_sink("https://audit.example/fhir", auth.as_deref());
        let sink =
            ok(Some(format!(r#"{{"static_token":{{"token_file":"{token}"}}}}"#))).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(sink.name, SINK_UPSTREAM);
        assert_eq!(sink.base_path, "/fhir");
        assert_eq!(sink.auth, UpstreamAuth::StaticToken { token_file: token.clone() });
        let camel =
            ok(Some(format!(r#"{{"staticToken":{{"tokenFile":"{token}"}}}}"#))).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(camel.auth, sink.auth);
        assert_eq!(ok(None).map(|s| s.auth.clone()), Ok(UpstreamAuth::None));
        let metadata = ok(Some(r#"{"metadata_identity_token":{"audience":"https://audit.example"}}"#.into()));
        assert!(matches!(metadata.map(|s| s.auth.clone()), Ok(UpstreamAuth::MetadataIdentityToken { .. })));
        let refused = [
            ("not JSON", Some("static".to_owned())),
            ("unknown field", Some(r#"{"static_token":{"token_file":"/x","extra":1}}"#.to_owned())),
            (
                "two sources",
                Some(format!(
                    r#"{{"static_token":{{"token_file":"{token}"}},"metadata_identity_token":{{"audience":"a"}}}}"#
                )),
            ),
            ("relative token file", Some(r#"{"static_token":{"token_file":"audit.token"}}"#.to_owned())),
            ("missing token file", Some(r#"{"static_token":{"token_file":"/nonexistent/audit.token"}}"#.to_owned())),
            (
                "secret over plain http",
                Some(format!(
                    r#"{{"client_credentials":{{"token_url":"http://idp.example/token","client_id":"gw","client_secret_file":"{token}"}}}}"#
                )),
            ),
        ];
        for (what, auth) in refused {
            assert!(ok(auth).is_err(), "{what} should be refused");
        }
        assert!(fhir_sink("audit.example", None).is_err());
    }
}
