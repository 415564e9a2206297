//! Request headers between the client and the upstream (security case 8, issue 11.3-11.5): only an allow-list
//! reaches the upstream on every interaction; credentials and other deciding headers that could be read two ways are
//! refused before anything is sent; and every interaction the rewritten CapabilityStatement advertises is routed, in
//! the tests' table and in the one `./dev up` pushes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Stack, stack, stack_full};
use fhirgw_e2e::fixtures::{self, DATASET as DS};
use fhirgw_e2e::{grpcurl, http, workspace};
use fhirgw_proto::admin::v1 as api;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WRITE: &str = "user/*.read user/*.write";

/// Headers an upstream or a sidecar in front of it might honour: none may arrive there, whatever the interaction.
const HOSTILE: &[(&str, &str)] = &[
    ("x-http-method-override", "DELETE"),
    ("x-http-method", "DELETE"),
    ("x-method-override", "DELETE"),
    ("x-original-url", "/fhir/Patient/b-pat-1"),
    ("x-rewrite-url", "/fhir/Patient/b-pat-1"),
    ("x-remote-user", "admin"),
    ("x-auth-request-user", "admin"),
    ("x-auth-request-email", "admin@example.org"),
    ("x-scope", "system/*.*"),
    ("x-dataset", "tenant-b"),
    ("x-tenant", "tenant-b"),
    ("x-forwarded-user", "admin"),
    ("x-forwarded-for", "10.0.0.1"),
    ("forwarded", "for=10.0.0.1;host=internal"),
    ("cookie", "session=admin"),
    ("x-custom-internal", "1"),
    ("x-correlation-id", "not-listed-by-this-route"),
    ("if-none-match", "*"),
    ("range", "bytes=0-10"),
];

fn hostile(request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    HOSTILE
        .iter()
        .fold(request, |r, (name, value)| r.header(*name, *value))
        .header("accept-language", "de-CH")
        .header("x-request-id", "req-7")
}

/// Every request the upstream received since `from`, checked: no hostile header, no client credential.
async fn assert_clean(s: &Stack, from: usize, what: &str) -> Vec<Value> {
    let log = s.upstream_requests().await;
    let seen = log[from..].to_vec();
    assert!(!seen.is_empty(), "{what}: nothing reached the upstream");
    for request in &seen {
        let headers = request["headers"].as_object().unwrap();
        for (name, _) in HOSTILE {
            assert!(!headers.contains_key(*name), "{what}: `{name}` reached the upstream: {request}");
        }
        let auth = headers["authorization"].as_str().unwrap();
        assert_eq!(auth, format!("Bearer {}", fhirgw_e2e::UPSTREAM_TOKEN), "{what}: {request}");
    }
    seen
}

/// Issue 11.3: for every interaction kind, only the allow-list reaches the upstream; a route may add names, never
/// one that changes what the upstream does.
#[tokio::test]
async fn only_allow_listed_headers_reach_the_upstream() {
    let s = stack().await;
    let a = s.issuer.token("tenant-a", WRITE);
    let version = s.upstream("/Patient/a-pat-1").await["meta"]["versionId"].as_str().unwrap().to_owned();
    let mrn = "https://fhirgw.dev/tenant-a/mrn|APAT2";
    let page = s.get("/fhir/Observation?_count=1", &a).await.json();
    let next = page["link"].as_array().unwrap().iter().find(|l| l["relation"] == "next").unwrap()["url"]
        .as_str()
        .unwrap()
        .to_owned();
    let p2 = s.upstream("/Patient/a-pat-2").await;
    let cases: Vec<(&str, reqwest::RequestBuilder)> = vec![
        ("metadata", http().get(s.url("/fhir/metadata"))),
        ("read", http().get(s.url("/fhir/Patient/a-pat-1")).bearer_auth(&a)),
        ("HEAD read", http().head(s.url("/fhir/Patient/a-pat-1")).bearer_auth(&a)),
        ("vread", http().get(s.url(&format!("/fhir/Patient/a-pat-1/_history/{version}"))).bearer_auth(&a)),
        ("search", http().get(s.url("/fhir/Observation?_count=2")).bearer_auth(&a)),
        ("next page", http().get(next).bearer_auth(&a)),
        (
            "POST _search",
            http()
                .post(s.url("/fhir/Observation/_search"))
                .bearer_auth(&a)
                .header("content-type", "application/x-www-form-urlencoded")
                .body("status=final"),
        ),
        ("system search", http().get(s.url("/fhir?_type=Observation")).bearer_auth(&a)),
        ("compartment search", http().get(s.url("/fhir/Patient/a-pat-1/Observation")).bearer_auth(&a)),
        ("instance history", http().get(s.url("/fhir/Patient/a-pat-1/_history")).bearer_auth(&a)),
        ("type history", http().get(s.url("/fhir/Patient/_history")).bearer_auth(&a)),
        ("$everything", http().get(s.url("/fhir/Patient/a-pat-1/$everything")).bearer_auth(&a)),
        ("$docref", http().get(s.url("/fhir/DocumentReference/$docref?patient=a-pat-1")).bearer_auth(&a)),
        (
            "$export kick-off",
            http().get(s.url("/fhir/$export?_type=Patient")).bearer_auth(&a).header("prefer", "respond-async"),
        ),
        (
            "create",
            http()
                .post(s.url("/fhir/Patient"))
                .bearer_auth(&a)
                .header("prefer", "return=representation")
                .json(&json!({"resourceType": "Patient", "name": [{"family": "Headers"}]})),
        ),
        ("update", http().put(s.url("/fhir/Patient/a-pat-2")).bearer_auth(&a).json(&p2)),
        (
            "patch",
            http()
                .patch(s.url("/fhir/Patient/a-pat-3"))
                .bearer_auth(&a)
                .header("content-type", "application/json-patch+json")
                .body(r#"[{"op":"replace","path":"/active","value":true}]"#),
        ),
        ("conditional update", http().put(s.url(&format!("/fhir/Patient?identifier={mrn}"))).bearer_auth(&a).json(&p2)),
        (
            "$meta-add",
            http().post(s.url("/fhir/Patient/a-pat-1/$meta-add")).bearer_auth(&a).json(&json!({
                "resourceType": "Parameters",
                "parameter": [{"name": "meta", "valueMeta": {"tag": [{"system": "http://example.org/flag", "code": "x"}]}}]
            })),
        ),
        (
            "batch",
            http().post(s.url("/fhir")).bearer_auth(&a).json(&json!({"resourceType": "Bundle", "type": "batch",
                "entry": [{"request": {"method": "GET", "url": "Patient/a-pat-1"}}]})),
        ),
        (
            "transaction",
            http().post(s.url("/fhir")).bearer_auth(&a).json(&json!({"resourceType": "Bundle", "type": "transaction",
                "entry": [{"request": {"method": "GET", "url": "Patient/a-pat-1"}}]})),
        ),
        ("delete", http().delete(s.url("/fhir/Observation/a-obs-4")).bearer_auth(&a)),
    ];
    for (what, request) in cases {
        let from = s.upstream_requests().await.len();
        let r = s.send(hostile(request)).await;
        assert!(r.status < 300, "{what}: {} {}", r.status, r.text());
        let seen = assert_clean(&s, from, what).await;
        // What FHIR needs still passes.
        let last = seen.last().unwrap();
        assert_eq!(last["headers"]["accept-language"], "de-CH", "{what}: {last}");
        assert_eq!(last["headers"]["x-request-id"], "req-7", "{what}: {last}");
        if what == "create" {
            assert_eq!(last["headers"]["prefer"], "return=representation", "{last}");
        }
    }

    // A route may forward a header of its own choosing; one that changes the request's meaning is refused.
    let mut admin = s.admin.clone();
    let mut table = fixtures::route_table();
    for route in table.routes.iter_mut().filter(|r| r.id == "instance") {
        route.forward_headers = vec!["x-correlation-id".into()];
    }
    let entry = admin
        .put_route_table(api::PutRouteTableRequest {
            route_table: Some(table.clone()),
            expected_version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    fixtures::wait_in_sync(&admin, 1, entry.meta.unwrap().version.parse().unwrap()).await;
    let from = s.upstream_requests().await.len();
    let r = s.send(http().get(s.url("/fhir/Patient/a-pat-1")).bearer_auth(&a).header("x-correlation-id", "c-9")).await;
    assert_eq!(r.status, 200);
    let log = s.upstream_requests().await;
    assert_eq!(log[from]["headers"]["x-correlation-id"], "c-9", "{}", log[from]);
    let from = log.len();
    s.send(http().get(s.url("/fhir/Observation")).bearer_auth(&a).header("x-correlation-id", "c-9")).await;
    let log = s.upstream_requests().await;
    assert!(log[from]["headers"].get("x-correlation-id").is_none(), "another route forwarded it: {}", log[from]);
    for name in ["x-http-method-override", "x-original-url", "x-remote-user", "authorization", "if-match", "cookie"] {
        let mut bad = table.clone();
        bad.routes[0].forward_headers = vec![name.into()];
        let err = admin
            .put_route_table(api::PutRouteTableRequest { route_table: Some(bad), expected_version: String::new() })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{name}: {err:?}");
        assert!(err.message().contains(name), "{name}: {}", err.message());
    }
}

/// Sends raw HTTP/1.1 (so headers can be repeated exactly as an attacker would) and returns the status and body.
async fn raw(s: &Stack, head: &str, body: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(s.dp.addr("fhir")).await.unwrap();
    let request = format!("{head}Content-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

/// Issue 11.4: a request with two credentials, or two values of any header that decides something, is refused
/// (400) and reaches nothing.
#[tokio::test]
async fn ambiguous_credentials_and_headers_reach_nothing() {
    let s = stack().await;
    let a = s.issuer.token("tenant-a", WRITE);
    let b = s.issuer.token("tenant-b", WRITE);
    let host = s.dp.addr("fhir");
    let p2 = s.upstream("/Patient/a-pat-2").await;
    let version = p2["meta"]["versionId"].as_str().unwrap().to_owned();
    let p2 = p2.to_string();
    let create = json!({"resourceType": "Patient", "meta": {"tag": [{"system": DS, "code": "tenant-a"}]}}).to_string();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "two Authorization headers (tenant-b's first)",
            format!(
                "GET /fhir/Patient/b-pat-1 HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {b}\r\nAuthorization: Bearer {a}\r\n"
            ),
            "",
        ),
        (
            "two Authorization headers (tenant-a's first)",
            format!(
                "GET /fhir/Patient/a-pat-1 HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {a}\r\nAuthorization: Bearer {b}\r\n"
            ),
            "",
        ),
        (
            "two credentials in one value",
            format!("GET /fhir/Patient/a-pat-1 HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {b}, Bearer {a}\r\n"),
            "",
        ),
        (
            "two tokens in one value",
            format!("GET /fhir/Patient/a-pat-1 HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {a} {b}\r\n"),
            "",
        ),
        (
            "two Host headers",
            format!(
                "GET /fhir/Patient/a-pat-1 HTTP/1.1\r\nHost: {host}\r\nHost: evil.example\r\nAuthorization: Bearer {a}\r\n"
            ),
            "",
        ),
        (
            "two Content-Type headers",
            format!(
                "POST /fhir/Patient HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {a}\r\nContent-Type: application/fhir+json\r\nContent-Type: application/json-patch+json\r\n"
            ),
            &create,
        ),
        (
            "two If-Match headers",
            format!(
                "PUT /fhir/Patient/a-pat-2 HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {a}\r\nContent-Type: application/fhir+json\r\nIf-Match: W/\"{version}\"\r\nIf-Match: W/\"1\"\r\n"
            ),
            &p2,
        ),
        (
            "an If-Match list",
            format!(
                "PUT /fhir/Patient/a-pat-2 HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {a}\r\nContent-Type: application/fhir+json\r\nIf-Match: W/\"{version}\", W/\"1\"\r\n"
            ),
            &p2,
        ),
        (
            "two If-None-Exist headers",
            format!(
                "POST /fhir/Patient HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {a}\r\nContent-Type: application/fhir+json\r\nIf-None-Exist: name=a\r\nIf-None-Exist: name=b\r\n"
            ),
            &create,
        ),
        (
            "conflicting Prefer",
            format!(
                "POST /fhir/Patient HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {a}\r\nContent-Type: application/fhir+json\r\nPrefer: return=minimal\r\nPrefer: return=representation\r\n"
            ),
            &create,
        ),
    ];
    let patients = s.upstream("/Patient?_summary=count").await["total"].clone();
    for (what, head, body) in cases {
        let from = s.upstream_requests().await.len();
        let (status, text) = raw(&s, &head, body).await;
        assert_eq!(status, 400, "{what}: {text}");
        assert!(text.contains("OperationOutcome"), "{what}: {text}");
        assert_eq!(s.upstream_requests().await.len(), from, "{what}: reached the upstream");
    }
    assert_eq!(s.upstream("/Patient?_summary=count").await["total"], patients);
    assert_eq!(s.upstream("/Patient/a-pat-2").await["meta"]["versionId"], json!(version));

    // One of each still works.
    let (status, text) = raw(
        &s,
        &format!("GET /fhir/Patient/a-pat-1 HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {a}\r\nPrefer: handling=strict\r\nPrefer: handling=strict\r\n"),
        "",
    )
    .await;
    assert_eq!(status, 200, "{text}");
}

/// Every interaction a rewritten CapabilityStatement advertises is routed (not "no such endpoint", not "method
/// not allowed"): for the tests' route table and for `deploy/local/route-table.json`, which `./dev up` pushes.
#[tokio::test]
async fn every_advertised_interaction_is_routed() {
    for table in ["tests", "deploy/local/route-table.json"] {
        let s = stack_full(&[], &[], &[]).await;
        if table != "tests" {
            let body = std::fs::read_to_string(workspace().join(table)).unwrap();
            let (ok, out, err) = grpcurl(&s.cp, &["-d", &body], &["fhirgw.admin.v1.Admin/PutRouteTable"]).await;
            assert!(ok, "{out}{err}");
            let version: u64 =
                serde_json::from_str::<Value>(&out).unwrap()["meta"]["version"].as_str().unwrap().parse().unwrap();
            fixtures::wait_in_sync(&s.admin, 1, version).await;
        }
        let a = s.issuer.token("tenant-a", "user/*.read user/*.write");
        let cs = s.send(http().get(s.url("/fhir/metadata"))).await.json();
        let rest = &cs["rest"][0];
        let mut probes: Vec<(String, reqwest::Method, String)> = Vec::new();
        for code in rest["interaction"].as_array().unwrap().iter().map(|i| i["code"].as_str().unwrap()) {
            match code {
                "batch" | "transaction" => probes.push((code.into(), reqwest::Method::POST, "/fhir".into())),
                "search-system" => probes.push((code.into(), reqwest::Method::GET, "/fhir?_type=Patient".into())),
                other => panic!("{table}: unexpected system interaction {other}"),
            }
        }
        for op in rest["operation"].as_array().into_iter().flatten() {
            let name = op["name"].as_str().unwrap();
            probes.push((format!("system ${name}"), reqwest::Method::GET, format!("/fhir/${name}")));
        }
        let resources = rest["resource"].as_array().unwrap();
        assert!(resources.len() > 100, "{table}: every resource type is served");
        for resource in resources {
            let ty = resource["type"].as_str().unwrap();
            if !["Patient", "Observation", "DocumentReference", "Group", "Practitioner"].contains(&ty) {
                continue;
            }
            for code in resource["interaction"].as_array().unwrap().iter().map(|i| i["code"].as_str().unwrap()) {
                let (method, path) = match code {
                    "read" => (reqwest::Method::GET, format!("/fhir/{ty}/x")),
                    "vread" => (reqwest::Method::GET, format!("/fhir/{ty}/x/_history/1")),
                    "search-type" => (reqwest::Method::GET, format!("/fhir/{ty}")),
                    "history-instance" => (reqwest::Method::GET, format!("/fhir/{ty}/x/_history")),
                    "history-type" => (reqwest::Method::GET, format!("/fhir/{ty}/_history")),
                    "create" => (reqwest::Method::POST, format!("/fhir/{ty}")),
                    "update" => (reqwest::Method::PUT, format!("/fhir/{ty}/x")),
                    "patch" => (reqwest::Method::PATCH, format!("/fhir/{ty}/x")),
                    "delete" => (reqwest::Method::DELETE, format!("/fhir/{ty}/x")),
                    other => panic!("{table}: unexpected interaction {other} on {ty}"),
                };
                probes.push((format!("{ty} {code}"), method, path));
            }
            let interactions: Vec<&str> =
                resource["interaction"].as_array().unwrap().iter().map(|i| i["code"].as_str().unwrap()).collect();
            for code in [
                "read",
                "vread",
                "search-type",
                "history-instance",
                "history-type",
                "create",
                "update",
                "patch",
                "delete",
            ] {
                assert!(interactions.contains(&code), "{table}: {ty} does not offer {code}: {interactions:?}");
            }
            // A resource's operation is served on the type or on an instance (`Group/x/$export`): one must be routed.
            for op in resource["operation"].as_array().into_iter().flatten() {
                let name = op["name"].as_str().unwrap();
                probes.push((
                    format!("{ty} ${name}"),
                    reqwest::Method::GET,
                    format!("/fhir/{ty}/${name}|/fhir/{ty}/x/${name}"),
                ));
            }
        }
        assert!(probes.len() > 40, "{table}: {} probes", probes.len());
        for (what, method, paths) in probes {
            let mut answers = Vec::new();
            for path in paths.split('|') {
                let r = s
                    .send(http().request(method.clone(), s.url(path)).bearer_auth(&a).header("prefer", "respond-async"))
                    .await;
                let text = r.text();
                let unrouted = (r.status == 404 && text.contains("No such endpoint"))
                    || (r.status == 405 && text.contains("Method not allowed on this endpoint"));
                answers.push((unrouted, format!("{path}: {} {text}", r.status)));
            }
            assert!(
                answers.iter().any(|(unrouted, _)| !unrouted),
                "{table}: {what} is advertised but not routed: {answers:?}"
            );
        }
    }
}
