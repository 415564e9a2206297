//! Fetched upstream credentials: OAuth2 client credentials and metadata-server identity tokens, end to end. A token
//! endpoint and a metadata server run in this test process; the FHIR server accepts only `UPSTREAM_TOKEN`, so a 200
//! through the gateway proves the fetched token was injected. Whatever happens, nothing reaches the upstream without
//! its credential.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use base64::Engine;
use bytes::Bytes;
use common::{Stack, stack};
use fhirgw_e2e::fixtures::status;
use fhirgw_e2e::{UPSTREAM_TOKEN, eventually, http};
use fhirgw_proto::admin::v1 as api;
use fhirgw_proto::config::v1 as pb;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};

const PROPAGATION: Duration = Duration::from_secs(20);
/// Characters that must survive the RFC 6749 §2.3.1 encoding.
const CLIENT_ID: &str = "fhirgw gateway:1";
const SECRET: &str = "s3cret/with:odd&chars=+";
const SCOPES: [&str; 2] = ["system/*.read", "system/*.write"];
const TOKEN_AUDIENCE: &str = "https://fhir.internal.example";
const METADATA_AUDIENCE: &str = "https://fhir-upstream.run.app";
const METADATA_PATH: &str = "/computeMetadata/v1/instance/service-accounts/default/identity";
/// The token endpoint answers this late, so concurrent misses really overlap.
const TOKEN_DELAY: Duration = Duration::from_millis(400);

/// What the mock token endpoint and metadata server saw.
#[derive(Default)]
struct Seen {
    /// Accepted calls per path.
    calls: HashMap<String, usize>,
    /// Requests refused, with why.
    refused: Vec<String>,
}

struct Mock {
    url: String,
    seen: Arc<Mutex<Seen>>,
    _server: tokio::task::JoinHandle<()>,
}

impl Mock {
    async fn start() -> Mock {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Seen::default()));
        let serving = seen.clone();
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let seen = serving.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(seen.clone(), req));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Mock { url, seen, _server: server }
    }

    fn calls(&self, path: &str) -> usize {
        self.seen.lock().unwrap().calls.get(path).copied().unwrap_or(0)
    }

    fn refused(&self) -> Vec<String> {
        self.seen.lock().unwrap().refused.clone()
    }
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, content_type.parse().unwrap());
    r
}

fn form_decode(s: &str) -> String {
    // `form_urlencoded::parse` decodes pairs; decode a lone value by parsing it as a key.
    form_urlencoded::parse(s.as_bytes()).next().map(|(k, _)| k.into_owned()).unwrap_or_default()
}

/// Checks a client-credentials request; returns why it is refused, if it is.
fn check_token_request(headers: &http::HeaderMap, body: &[u8], secret: &str) -> Result<(), String> {
    let content_type = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
    if content_type != "application/x-www-form-urlencoded" {
        return Err(format!("content-type {content_type}"));
    }
    let authorization = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
    let basic = authorization.strip_prefix("Basic ").ok_or(format!("not Basic: {authorization}"))?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(basic).map_err(|e| e.to_string())?;
    let decoded = String::from_utf8(decoded).map_err(|e| e.to_string())?;
    // Both parts are form-urlencoded, so the first ':' is the separator.
    let (id, secret_sent) = decoded.split_once(':').ok_or("no ':' in Basic credentials")?;
    if form_decode(id) != CLIENT_ID {
        return Err(format!("client id {id}"));
    }
    if form_decode(secret_sent) != secret {
        return Err("wrong secret".into());
    }
    let form: HashMap<String, String> = form_urlencoded::parse(body).into_owned().collect();
    let want = HashMap::from([
        ("grant_type".to_owned(), "client_credentials".to_owned()),
        ("scope".to_owned(), SCOPES.join(" ")),
        ("audience".to_owned(), TOKEN_AUDIENCE.to_owned()),
    ]);
    if form != want {
        return Err(format!("form {form:?}"));
    }
    Ok(())
}

async fn handle(seen: Arc<Mutex<Seen>>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let path = parts.uri.path().to_owned();
    let refuse = |why: String, status: StatusCode, body: Value| {
        seen.lock().unwrap().refused.push(format!("{path}: {why}"));
        reply(status, "application/json", body.to_string())
    };
    if path == METADATA_PATH {
        if parts.method != http::Method::GET {
            return Ok(refuse(format!("method {}", parts.method), StatusCode::METHOD_NOT_ALLOWED, json!({})));
        }
        if parts.headers.get("metadata-flavor").and_then(|v| v.to_str().ok()) != Some("Google") {
            return Ok(refuse("no Metadata-Flavor".into(), StatusCode::FORBIDDEN, json!({})));
        }
        if parts.headers.contains_key("authorization") {
            return Ok(refuse("carries an Authorization header".into(), StatusCode::BAD_REQUEST, json!({})));
        }
        let query: HashMap<String, String> =
            form_urlencoded::parse(parts.uri.query().unwrap_or_default().as_bytes()).into_owned().collect();
        let want = HashMap::from([
            ("audience".to_owned(), METADATA_AUDIENCE.to_owned()),
            ("format".to_owned(), "full".to_owned()),
        ]);
        if query != want {
            return Ok(refuse(format!("query {query:?}"), StatusCode::BAD_REQUEST, json!({})));
        }
        *seen.lock().unwrap().calls.entry(path.clone()).or_default() += 1;
        // Not a JWT (the test FHIR server only takes this exact token): its lifetime is the default.
        return Ok(reply(StatusCode::OK, "text/plain", UPSTREAM_TOKEN.to_owned()));
    }
    // Token endpoints: /{mode}/token, where mode chooses the answer.
    let Some(mode) = path.strip_prefix('/').and_then(|p| p.strip_suffix("/token")) else {
        return Ok(refuse("unknown path".into(), StatusCode::NOT_FOUND, json!({})));
    };
    if parts.method != http::Method::POST {
        return Ok(refuse(format!("method {}", parts.method), StatusCode::METHOD_NOT_ALLOWED, json!({})));
    }
    if let Err(why) = check_token_request(&parts.headers, &body, SECRET) {
        return Ok(refuse(why, StatusCode::UNAUTHORIZED, json!({"error": "invalid_client"})));
    }
    *seen.lock().unwrap().calls.entry(path.clone()).or_default() += 1;
    tokio::time::sleep(TOKEN_DELAY).await;
    let expires_in = match mode {
        "long" => 3600,
        "short" => 4,
        "fail" => {
            let body = json!({"error": "temporarily_unavailable"}).to_string();
            return Ok(reply(StatusCode::INTERNAL_SERVER_ERROR, "application/json", body));
        }
        other => return Ok(refuse(format!("mode {other}"), StatusCode::NOT_FOUND, json!({}))),
    };
    let body = json!({"access_token": UPSTREAM_TOKEN, "token_type": "Bearer", "expires_in": expires_in});
    Ok(reply(StatusCode::OK, "application/json", body.to_string()))
}

fn client_credentials(token_url: String, secret_file: String) -> pb::upstream_auth::Source {
    pb::upstream_auth::Source::ClientCredentials(pb::ClientCredentials {
        token_url,
        client_id: CLIENT_ID.into(),
        client_secret_file: secret_file,
        scopes: SCOPES.iter().map(|s| (*s).to_owned()).collect(),
        audience: TOKEN_AUDIENCE.into(),
    })
}

/// Re-points the upstream `fhir` at the same FHIR server with another credential source; returns the revision.
async fn put_upstream(s: &mut Stack, source: pb::upstream_auth::Source) -> u64 {
    let mut upstream = fhirgw_e2e::fixtures::upstream(&s.world, s.fhir.ready["base_url"].as_str().unwrap());
    upstream.auth = Some(pb::UpstreamAuth { source: Some(source) });
    let put = s
        .admin
        .put_upstream(api::PutUpstreamRequest { upstream: Some(upstream), expected_version: String::new() })
        .await
        .unwrap();
    put.into_inner().meta.unwrap().version.parse().unwrap()
}

/// Re-points the upstream and waits until the data plane ACKs it.
async fn switch_upstream(s: &mut Stack, source: pb::upstream_auth::Source) {
    let revision = put_upstream(s, source).await;
    fhirgw_e2e::fixtures::wait_in_sync(&s.admin, 1, revision).await;
    // The data plane runs the new upstream: its `/config` shows the version the control plane pushes.
    let config_version = status(&mut s.admin).await.config_version;
    assert_eq!(fhirgw_e2e::dp_config(&s.dp).await["version"], config_version);
}

async fn clear_upstream_log(s: &Stack) {
    let addr = s.fhir.ready["listening"].as_str().unwrap();
    http().delete(format!("http://{addr}/__admin/requests")).send().await.unwrap();
}

/// Every request the upstream ever received carried exactly the upstream credential.
async fn assert_upstream_saw_only_the_credential(s: &Stack) -> usize {
    let log = s.upstream_requests().await;
    let want = format!("Bearer {UPSTREAM_TOKEN}");
    for entry in &log {
        assert_eq!(
            entry["headers"]["authorization"].as_str(),
            Some(want.as_str()),
            "sent without its credential: {entry}"
        );
    }
    log.len()
}

async fn read_ok(s: &Stack) {
    let r = s.get("/fhir/Patient/a-pat-1", &s.a).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["id"], "a-pat-1");
}

#[tokio::test]
async fn client_credentials_are_fetched_shared_refreshed_and_fail_closed() {
    let mut s = stack().await;
    let mock = Mock::start().await;
    let secret_file = s.world.path("client.secret");
    std::fs::write(&secret_file, format!("  {SECRET}\n")).unwrap();
    let secret_file = secret_file.display().to_string();

    // A secret file this data plane cannot read is NACKed; the last good upstream keeps serving.
    let missing = s.world.path("missing.secret").display().to_string();
    let bad = put_upstream(&mut s, client_credentials(format!("{}/long/token", mock.url), missing.clone())).await;
    let admin = s.admin.clone();
    let nack = eventually("the NACK of a missing client secret file", PROPAGATION, move || {
        let mut admin = admin.clone();
        async move {
            status(&mut admin).await.data_planes.first().and_then(|d| d.last_nack.clone()).filter(|n| n.revision == bad)
        }
    })
    .await;
    assert!(nack.rejected.iter().any(|r| r.reason.contains(&missing)), "{nack:?}");
    read_ok(&s).await;
    assert_eq!(mock.calls("/long/token"), 0);

    // Concurrent misses share one fetch; the fetched token reaches the upstream.
    switch_upstream(&mut s, client_credentials(format!("{}/long/token", mock.url), secret_file.clone())).await;
    let reads = (0..24).map(|_| {
        let token = s.a.clone();
        let url = s.url("/fhir/Patient/a-pat-1");
        async move { http().get(url).bearer_auth(token).send().await.unwrap().status().as_u16() }
    });
    let statuses = futures_join_all(reads).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(mock.calls("/long/token"), 1, "concurrent misses must share one token fetch");
    for _ in 0..5 {
        read_ok(&s).await;
    }
    assert_eq!(mock.calls("/long/token"), 1, "a valid token is reused");

    // A token living 4 s is refreshed at half its lifetime (it is shorter than twice the 5-minute margin).
    switch_upstream(&mut s, client_credentials(format!("{}/short/token", mock.url), secret_file.clone())).await;
    read_ok(&s).await;
    let fetched = Instant::now();
    assert_eq!(mock.calls("/short/token"), 1);
    read_ok(&s).await;
    if fetched.elapsed() < Duration::from_millis(1000) {
        assert_eq!(mock.calls("/short/token"), 1, "reused before its refresh time");
    }
    tokio::time::sleep(Duration::from_millis(2500).saturating_sub(fetched.elapsed())).await;
    read_ok(&s).await;
    assert_eq!(mock.calls("/short/token"), 2, "refreshed after half its lifetime");

    // Token endpoint failing, or refusing the client: 503 with Retry-After, and nothing at all sent upstream.
    let wrong_secret_file = s.world.path("wrong.secret");
    std::fs::write(&wrong_secret_file, "not-the-secret\n").unwrap();
    let wrong_secret_file = wrong_secret_file.display().to_string();
    for (what, source) in [
        ("token endpoint failing", client_credentials(format!("{}/fail/token", mock.url), secret_file.clone())),
        ("client refused", client_credentials(format!("{}/long/token", mock.url), wrong_secret_file)),
    ] {
        switch_upstream(&mut s, source).await;
        clear_upstream_log(&s).await;
        for _ in 0..3 {
            let r = s.get("/fhir/Patient/a-pat-1", &s.a).await;
            assert_eq!(r.status, 503, "{what}: {}", r.text());
            assert!(r.headers.contains_key("retry-after"), "{what}: {:?}", r.headers);
            assert_eq!(r.json()["resourceType"], "OperationOutcome");
            assert!(!r.text().contains(SECRET), "{what}");
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
        let log = s.upstream_requests().await;
        assert!(log.is_empty(), "{what}: requests reached the upstream without a credential: {log:?}");
    }
    assert!(mock.calls("/fail/token") >= 1);
    let refused = mock.refused();
    assert!(!refused.is_empty() && refused.iter().all(|r| r.ends_with("wrong secret")), "{refused:?}");
    let dp_log = std::fs::read_to_string(&s.dp.log).unwrap();
    assert!(!dp_log.contains(SECRET) && !dp_log.contains("not-the-secret"), "a secret was logged");

    // Back to a working endpoint: served again, with the credential.
    switch_upstream(&mut s, client_credentials(format!("{}/long/token", mock.url), secret_file)).await;
    read_ok(&s).await;
    assert!(assert_upstream_saw_only_the_credential(&s).await > 0);
}

#[tokio::test]
async fn metadata_identity_token_is_injected() {
    let mut s = stack().await;
    let mock = Mock::start().await;
    let source = |metadata_url: String| {
        pb::upstream_auth::Source::MetadataIdentityToken(pb::MetadataIdentityToken {
            metadata_url,
            audience: METADATA_AUDIENCE.into(),
        })
    };
    switch_upstream(&mut s, source(format!("{}{METADATA_PATH}", mock.url))).await;
    clear_upstream_log(&s).await;
    let reads = (0..12).map(|_| {
        let token = s.a.clone();
        let url = s.url("/fhir/Patient/a-pat-1");
        async move { http().get(url).bearer_auth(token).send().await.unwrap().status().as_u16() }
    });
    let statuses = futures_join_all(reads).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    read_ok(&s).await;
    assert_eq!(mock.calls(METADATA_PATH), 1, "one fetch, reused (an opaque token lives the default hour)");
    assert_eq!(mock.refused(), Vec::<String>::new());
    assert!(assert_upstream_saw_only_the_credential(&s).await >= 13);

    // A metadata server that is not there: 503, nothing upstream.
    switch_upstream(&mut s, source(format!("{}/nowhere/identity", mock.url))).await;
    clear_upstream_log(&s).await;
    let r = s.get("/fhir/Patient/a-pat-1", &s.a).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.headers.contains_key("retry-after"));
    assert!(s.upstream_requests().await.is_empty());
}

/// `join_all` without another dependency: spawn each and await them in order.
async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<u16>
where
    F: std::future::Future<Output = u16> + Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for handle in handles {
        out.push(handle.await.unwrap());
    }
    out
}
