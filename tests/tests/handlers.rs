//! The gateway's own handlers end to end, through a real data plane to the test FHIR server with two tenants' data:
//! `DocumentReference/$docref` and bulk `$export` (kick-off, status, manifest, files, cancel), with an upstream
//! that honours `_typeFilter` and with one that ignores it, so only the gateway's per-line verification stands
//! between a tenant and the other's data.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Reply, Stack, assert_only_tenant, stack, stack_full};
use fhirgw_e2e::fixtures::DATASET;
use fhirgw_e2e::{UPSTREAM_TOKEN, eventually, http};
use serde_json::{Value, json};

fn tagged(tenant: &str) -> Value {
    json!({"tag": [{"system": DATASET, "code": tenant}]})
}

fn document(id: &str, tenant: &str, patient: &str, loinc: &str, date: &str) -> Value {
    json!({
        "resourceType": "DocumentReference", "id": id, "meta": tagged(tenant), "status": "current",
        "type": {"coding": [{"system": "http://loinc.org", "code": loinc}]},
        "subject": {"reference": format!("Patient/{patient}")}, "date": date,
        "content": [{"attachment": {"contentType": "text/plain", "data": "aGVsbG8="}}]
    })
}

/// DocumentReferences written straight to the upstream (the seed files other suites count stay as they are).
async fn seed_documents(s: &Stack) {
    for d in [
        document("a-doc-1", "tenant-a", "a-pat-1", "34133-9", "2024-03-01T10:00:00Z"),
        document("a-doc-2", "tenant-a", "a-pat-1", "18842-5", "2022-06-01T10:00:00Z"),
        document("a-doc-3", "tenant-a", "a-pat-2", "34133-9", "2024-03-01T10:00:00Z"),
        // Tenant B's document about tenant A's patient: what the narrowing must keep out.
        document("b-doc-cross", "tenant-b", "a-pat-1", "34133-9", "2024-03-01T10:00:00Z"),
        document("b-doc-1", "tenant-b", "b-pat-1", "34133-9", "2024-03-01T10:00:00Z"),
    ] {
        s.put_upstream(&d).await;
    }
}

/// Groups: tenant A's holds one of tenant B's patients too.
async fn seed_groups(s: &Stack) {
    let group = |id: &str, tenant: &str, members: &[&str]| {
        let member: Vec<Value> =
            members.iter().map(|m| json!({"entity": {"reference": format!("Patient/{m}")}})).collect();
        json!({"resourceType": "Group", "id": id, "meta": tagged(tenant), "type": "person", "actual": true, "member": member})
    };
    s.put_upstream(&group("a-grp-1", "tenant-a", &["a-pat-1", "a-pat-2", "b-pat-1"])).await;
    s.put_upstream(&group("b-grp-1", "tenant-b", &["b-pat-1"])).await;
}

fn sorted(ids: Vec<String>) -> Vec<String> {
    ids.into_iter().collect::<BTreeSet<_>>().into_iter().collect()
}

/// Name/value pairs of a URL's (or a path's) query, decoded.
fn query_pairs(path_or_url: &str) -> Vec<(String, String)> {
    let url = if path_or_url.starts_with('/') { format!("http://x{path_or_url}") } else { path_or_url.to_owned() };
    reqwest::Url::parse(&url).unwrap().query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect()
}

fn values(pairs: &[(String, String)], name: &str) -> Vec<String> {
    pairs.iter().filter(|(k, _)| k == name).map(|(_, v)| v.clone()).collect()
}

impl Stack {
    async fn kick_off(&self, path: &str, token: &str) -> Reply {
        self.send(http().get(self.url(path)).bearer_auth(token).header("prefer", "respond-async")).await
    }

    /// A `POST` kick-off with a `Parameters` body.
    async fn kick_off_post(&self, path: &str, token: &str, body: &Value) -> Reply {
        let request = http()
            .post(self.url(path))
            .bearer_auth(token)
            .header("prefer", "respond-async")
            .header("content-type", "application/fhir+json")
            .body(body.to_string());
        self.send(request).await
    }

    /// The gateway path of a link the gateway handed out, which must be on its own public base.
    fn gateway_path(&self, url: &str) -> String {
        let base = self.url("");
        url.strip_prefix(&base).unwrap_or_else(|| panic!("{url} is not on the gateway ({base})")).to_owned()
    }

    /// Polls a status link until the manifest arrives; the first poll must be the upstream's 202, passed through.
    async fn manifest(&self, status: &str, token: &str) -> Value {
        let first = self.get(status, token).await;
        assert_eq!(first.status, 202, "{}", first.text());
        assert_eq!(first.headers["x-progress"], "in progress");
        assert_eq!(first.headers["retry-after"], "1");
        assert!(first.body.is_empty(), "{}", first.text());
        let (url, token) = (self.url(status), token.to_owned());
        eventually("the export's manifest", Duration::from_secs(20), move || {
            let (url, token) = (url.clone(), token.clone());
            async move {
                let r = http().get(url).bearer_auth(token).send().await.unwrap();
                match r.status().as_u16() {
                    202 => None,
                    200 => {
                        assert!(r.headers()["content-type"].to_str().unwrap().starts_with("application/json"));
                        Some(r.json::<Value>().await.unwrap())
                    }
                    other => panic!("polling: {other} {}", r.text().await.unwrap_or_default()),
                }
            }
        })
        .await
    }

    /// Downloads every output file of a manifest through the gateway; returns `Type/id` of every line.
    async fn download(&self, manifest: &Value, token: &str) -> Vec<String> {
        let mut ids = Vec::new();
        for output in manifest["output"].as_array().unwrap() {
            let ty = output["type"].as_str().unwrap();
            let url = output["url"].as_str().unwrap();
            assert!(url.starts_with(&self.url("/fhir/$export-file?_token=")), "{url}");
            assert!(output.get("count").is_none(), "upstream counts may count other tenants: {output}");
            let r = self.get(&self.gateway_path(url), token).await;
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.headers["content-type"], "application/fhir+ndjson");
            for line in r.text().lines() {
                let resource: Value = serde_json::from_str(line).unwrap();
                assert_eq!(resource["resourceType"], ty, "{line}");
                ids.push(format!("{ty}/{}", resource["id"].as_str().unwrap()));
            }
        }
        ids
    }

    /// The NDJSON files the upstream served for the gateway's downloads, read straight from the upstream.
    async fn upstream_files(&self) -> String {
        let origin = format!("http://{}", self.fhir.ready["listening"].as_str().unwrap());
        let mut text = String::new();
        for r in self.upstream_requests().await {
            let path = r["path"].as_str().unwrap();
            if path.starts_with("/fhir/$export-file/") {
                let body = http().get(format!("{origin}{path}")).bearer_auth(UPSTREAM_TOKEN).send().await.unwrap();
                text.push_str(&body.text().await.unwrap());
            }
        }
        text
    }
}

#[tokio::test]
async fn docref_returns_only_the_tenants_documents() {
    let s = stack().await;
    seed_documents(&s).await;
    let upstream = s.upstream("/DocumentReference?patient=Patient/a-pat-1").await;
    assert!(upstream.to_string().contains("b-doc-cross"), "the attack must be real");

    let cases: &[(&str, &[&str])] = &[
        ("patient=a-pat-1", &["DocumentReference/a-doc-1", "DocumentReference/a-doc-2"]),
        ("patient=Patient/a-pat-1&start=2024-01-01", &["DocumentReference/a-doc-1"]),
        ("patient=a-pat-1&end=2023-01-01&on-demand=false", &["DocumentReference/a-doc-2"]),
        ("patient=a-pat-1&type=http://loinc.org|18842-5", &["DocumentReference/a-doc-2"]),
        ("patient=a-pat-3", &[]),
    ];
    for (query, want) in cases {
        let r = s.get(&format!("/fhir/DocumentReference/$docref?{}", query.replace('|', "%7C")), &s.a).await;
        assert_only_tenant(&r, "a-");
        assert_eq!(sorted(r.ids()), *want, "{query}");
        assert_eq!(r.json()["type"], "searchset");
    }

    // POST with a Parameters body.
    let body = json!({"resourceType": "Parameters", "parameter": [
        {"name": "patient", "valueId": "a-pat-1"},
        {"name": "type", "valueCodeableConcept": {"coding": [{"system": "http://loinc.org", "code": "34133-9"}]}}
    ]});
    let r = s
        .send(
            http()
                .post(s.url("/fhir/DocumentReference/$docref"))
                .bearer_auth(&s.a)
                .header("content-type", "application/fhir+json")
                .body(body.to_string()),
        )
        .await;
    assert_only_tenant(&r, "a-");
    assert_eq!(r.ids(), ["DocumentReference/a-doc-1"]);

    // Upstream: a DocumentReference search narrowed to the tenant, with the upstream's credential.
    let log = s.upstream_requests().await;
    let search = log
        .iter()
        .rev()
        .find(|r| r["path"].as_str().unwrap().starts_with("/fhir/DocumentReference?"))
        .expect("the translated search");
    let pairs = query_pairs(search["path"].as_str().unwrap());
    assert_eq!(values(&pairs, "patient"), ["Patient/a-pat-1"]);
    assert_eq!(values(&pairs, "_tag"), [format!("{DATASET}|tenant-a")]);
    assert_eq!(search["headers"]["authorization"], format!("Bearer {UPSTREAM_TOKEN}"));

    // DocumentReference scopes suffice (the Patient is checked, not shown); other scopes do not.
    let docs_only = s.issuer.token("tenant-a", "user/DocumentReference.rs");
    assert_eq!(s.get("/fhir/DocumentReference/$docref?patient=a-pat-1", &docs_only).await.status, 200);
    let patients_only = s.issuer.token("tenant-a", "user/Patient.read");
    assert_eq!(s.get("/fhir/DocumentReference/$docref?patient=a-pat-1", &patients_only).await.status, 403);

    // Refused before anything reaches the upstream.
    let before = s.upstream_requests().await.len();
    for query in [
        "",
        "patient=a-pat-1&on-demand=true",
        "patient=a-pat-1&profile=http://example.org/p",
        "patient=a-pat-1&_include=DocumentReference:subject",
        "patient=a-pat-1&subject:Patient.name=x",
        "patient=a-pat-1&start=ge2024",
    ] {
        let r = s.get(&format!("/fhir/DocumentReference/$docref?{query}"), &s.a).await;
        assert_eq!(r.status, 400, "{query}: {}", r.text());
        assert_eq!(r.json()["resourceType"], "OperationOutcome");
    }
    assert_eq!(s.upstream_requests().await.len(), before, "a refused $docref reached the upstream");
}

#[tokio::test]
async fn docref_on_another_tenants_patient_looks_missing() {
    let s = stack().await;
    seed_documents(&s).await;
    let foreign = s.get("/fhir/DocumentReference/$docref?patient=b-pat-1", &s.a).await;
    let missing = s.get("/fhir/DocumentReference/$docref?patient=no-such-patient", &s.a).await;
    assert_eq!((foreign.status, missing.status), (404, 404), "{}", foreign.text());
    assert_eq!(foreign.body, missing.body, "the body must match a missing patient's byte for byte");
    // Tenant B sees its own.
    let r = s.get("/fhir/DocumentReference/$docref?patient=b-pat-1", &s.b).await;
    assert_only_tenant(&r, "b-");
    assert_eq!(r.ids(), ["DocumentReference/b-doc-1"]);
}

/// Kick-off, poll, manifest and download for tenant A; other tenants' links refused; cancel.
async fn export_round_trip(fhir_args: &[&str], upstream_filters: bool) {
    let s = stack_full(fhir_args, &[], &[]).await;
    let k = s.kick_off("/fhir/$export?_type=Patient,Observation", &s.a).await;
    assert_eq!(k.status, 202, "{}", k.text());
    let location = k.headers["content-location"].to_str().unwrap().to_owned();
    assert!(location.starts_with(&s.url("/fhir/$export-poll-status?_token=")), "{location}");

    // The kick-off reached the upstream narrowed, with the upstream's credential and not the caller's token.
    let log = s.upstream_requests().await;
    let kick = log.iter().find(|r| r["path"].as_str().unwrap().starts_with("/fhir/$export?")).unwrap();
    let pairs = query_pairs(kick["path"].as_str().unwrap());
    assert_eq!(values(&pairs, "_type"), ["Patient,Observation"]);
    assert_eq!(
        values(&pairs, "_typeFilter"),
        [
            format!("Patient?_tag={}", urlencode(&format!("{DATASET}|tenant-a"))),
            format!("Observation?_tag={}", urlencode(&format!("{DATASET}|tenant-a"))),
        ]
    );
    assert_eq!(kick["headers"]["authorization"], format!("Bearer {UPSTREAM_TOKEN}"));
    assert_eq!(kick["headers"]["prefer"], "respond-async");

    let status = s.gateway_path(&location);
    let manifest = s.manifest(&status, &s.a).await;
    assert_eq!(manifest["requiresAccessToken"], true);
    let upstream_base = s.fhir.ready["base_url"].as_str().unwrap();
    assert!(!manifest.to_string().contains(upstream_base), "the upstream's URLs leaked: {manifest}");
    let ids = s.download(&manifest, &s.a).await;
    for id in &ids {
        assert!(id.split('/').nth(1).unwrap().starts_with("a-"), "{id} leaked to tenant A");
    }
    for want in ["Patient/a-pat-1", "Patient/a-pat-3", "Observation/a-obs-1", "Observation/a-obs-4"] {
        assert!(ids.contains(&want.to_owned()), "{want} missing from {ids:?}");
    }
    // What the upstream itself served: filtered by it, or not (then only the gateway's verification kept B out).
    let served = s.upstream_files().await;
    assert_eq!(served.contains("\"b-pat-1\""), !upstream_filters, "{served}");

    // Another tenant replaying A's links is refused as a replayed page token is (400), and nothing reaches the
    // upstream; a file link is not a status link, and a tampered token is refused.
    let file = s.gateway_path(manifest["output"][0]["url"].as_str().unwrap());
    let before = s.upstream_requests().await.len();
    for (what, reply) in [
        ("status", s.get(&status, &s.b).await),
        ("cancel", s.send(http().delete(s.url(&status)).bearer_auth(&s.b)).await),
        ("file", s.get(&file, &s.b).await),
        ("file as status", s.get(&file.replace("$export-file", "$export-poll-status"), &s.a).await),
        ("status as file", s.get(&status.replace("$export-poll-status", "$export-file"), &s.a).await),
        ("tampered", s.get(&status.replace("_token=", "_token=x"), &s.a).await),
        ("extra parameter", s.get(&format!("{status}&_type=Patient"), &s.a).await),
    ] {
        assert_eq!(reply.status, 400, "{what}: {}", reply.text());
        assert_eq!(reply.json()["resourceType"], "OperationOutcome", "{what}");
    }
    assert_eq!(s.upstream_requests().await.len(), before, "a refused link reached the upstream");

    // Tenant A cancels; the job is gone.
    let cancel = s.send(http().delete(s.url(&status)).bearer_auth(&s.a)).await;
    assert_eq!(cancel.status, 202, "{}", cancel.text());
    assert_eq!(s.get(&status, &s.a).await.status, 404);
}

fn urlencode(value: &str) -> String {
    reqwest::Url::parse_with_params("http://x/", &[("v", value)]).unwrap().query().unwrap()[2..].to_owned()
}

#[tokio::test]
async fn export_through_an_upstream_that_filters() {
    export_round_trip(&[], true).await;
}

#[tokio::test]
async fn export_through_an_upstream_that_ignores_type_filter() {
    export_round_trip(&["--export-ignores-typefilter"], false).await;
}

/// Group- and patient-level exports; `_type` filled from the scopes; the group's member from tenant B stays out.
#[tokio::test]
async fn group_and_patient_exports() {
    let s = stack_full(&["--export-ignores-typefilter"], &[], &[]).await;
    seed_groups(&s).await;
    let token = s.issuer.token("tenant-a", "openid system/Patient.read system/Observation.read");
    let k = s.kick_off("/fhir/Group/a-grp-1/$export", &token).await;
    assert_eq!(k.status, 202, "{}", k.text());
    let log = s.upstream_requests().await;
    let kick = log.iter().find(|r| r["path"].as_str().unwrap().starts_with("/fhir/Group/a-grp-1/$export?")).unwrap();
    assert_eq!(values(&query_pairs(kick["path"].as_str().unwrap()), "_type"), ["Patient,Observation"]);
    let manifest = s.manifest(&s.gateway_path(k.headers["content-location"].to_str().unwrap()), &token).await;
    let ids = sorted(s.download(&manifest, &token).await);
    assert!(s.upstream_files().await.contains("\"b-pat-1\""), "the upstream must have exported B's member");
    assert_eq!(
        ids,
        ["Observation/a-obs-1", "Observation/a-obs-2", "Observation/a-obs-3", "Patient/a-pat-1", "Patient/a-pat-2"]
    );

    // Another tenant's group looks exactly like a missing one.
    let foreign = s.kick_off("/fhir/Group/b-grp-1/$export?_type=Patient", &s.a).await;
    let missing = s.kick_off("/fhir/Group/no-such-group/$export?_type=Patient", &s.a).await;
    assert_eq!((foreign.status, missing.status), (404, 404), "{}", foreign.text());
    assert_eq!(foreign.body, missing.body);

    // Patient level: b-obs-cross (tenant B's, about a-pat-1) is in the compartment upstream, not in the download.
    let k = s.kick_off("/fhir/Patient/$export?_type=Observation", &s.a).await;
    assert_eq!(k.status, 202, "{}", k.text());
    let manifest = s.manifest(&s.gateway_path(k.headers["content-location"].to_str().unwrap()), &s.a).await;
    let ids = sorted(s.download(&manifest, &s.a).await);
    assert_eq!(ids, ["Observation/a-obs-1", "Observation/a-obs-2", "Observation/a-obs-3", "Observation/a-obs-4"]);
}

#[tokio::test]
async fn export_kick_offs_that_are_refused() {
    let s = stack().await;
    let before = s.upstream_requests().await.len();
    let no_prefer = s.get("/fhir/$export?_type=Patient", &s.a).await;
    assert_eq!(no_prefer.status, 400, "{}", no_prefer.text());
    assert!(no_prefer.text().contains("respond-async"), "{}", no_prefer.text());
    // Checked before the Group is even looked up.
    assert_eq!(s.get("/fhir/Group/a-grp-1/$export?_type=Patient", &s.a).await.status, 400);
    let observations_only = s.issuer.token("tenant-a", "user/Observation.read");
    let cases: Vec<(&str, &str, &str, u16)> = vec![
        ("no _type with a wildcard scope", "/fhir/$export", &s.a, 400),
        ("_outputFormat", "/fhir/$export?_type=Patient&_outputFormat=application/json", &s.a, 400),
        ("_elements", "/fhir/Patient/$export?_type=Patient&_elements=id", &s.a, 400),
        (
            "_typeFilter with _has",
            "/fhir/$export?_type=Patient&_typeFilter=Patient%3F_has%3AObservation%3Asubject%3Acode%3D1",
            &s.a,
            400,
        ),
        (
            "_typeFilter of a type not exported",
            "/fhir/$export?_type=Patient&_typeFilter=Observation%3Fcode%3D1",
            &s.a,
            400,
        ),
        ("a type outside the scopes", "/fhir/$export?_type=Patient,Observation", &observations_only, 403),
        ("XML", "/fhir/$export?_type=Patient&_format=xml", &s.a, 400),
    ];
    for (what, path, token, status) in cases {
        let r = s.kick_off(path, token).await;
        assert_eq!(r.status, status, "{what}: {}", r.text());
        assert_eq!(r.json()["resourceType"], "OperationOutcome", "{what}");
    }
    assert_eq!(s.upstream_requests().await.len(), before, "a refused kick-off reached the upstream");

    // A client `_typeFilter` is kept and narrowed.
    let k =
        s.kick_off("/fhir/$export?_type=Observation&_typeFilter=Observation%3Fsubject%3DPatient%2Fa-pat-2", &s.a).await;
    assert_eq!(k.status, 202, "{}", k.text());
    let manifest = s.manifest(&s.gateway_path(k.headers["content-location"].to_str().unwrap()), &s.a).await;
    assert_eq!(s.download(&manifest, &s.a).await, ["Observation/a-obs-3"]);
}

/// `POST` kick-offs: the `Parameters` body is checked and narrowed exactly like a query, and the upstream gets the
/// same narrowed `GET` kick-off; anything the gateway cannot check is refused by name before the upstream sees it.
#[tokio::test]
async fn export_kick_off_by_post() {
    // An upstream that honours `_typeFilter`, so the client's own filter shows in what comes back.
    let s = stack_full(&[], &[], &[]).await;
    seed_groups(&s).await;
    let params = |p: Value| json!({"resourceType": "Parameters", "parameter": p});
    let body = params(json!([
        {"name": "_type", "valueString": "Observation"},
        {"name": "_typeFilter", "valueString": "Observation?subject=Patient/a-pat-2"}
    ]));
    let k = s.kick_off_post("/fhir/$export", &s.a, &body).await;
    assert_eq!(k.status, 202, "{}", k.text());
    let log = s.upstream_requests().await;
    let kick = log.iter().find(|r| r["path"].as_str().unwrap().starts_with("/fhir/$export?")).unwrap();
    assert_eq!(kick["method"], "GET");
    let pairs = query_pairs(kick["path"].as_str().unwrap());
    assert_eq!(values(&pairs, "_type"), ["Observation"]);
    let tag = format!("{DATASET}|tenant-a");
    assert_eq!(
        values(&pairs, "_typeFilter")
            .iter()
            .map(|f| {
                let (ty, q) = f.split_once('?').unwrap();
                let decoded: Vec<String> =
                    query_pairs(&format!("/?{q}")).iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("{ty}?{}", decoded.join("&"))
            })
            .collect::<Vec<_>>(),
        [format!("Observation?subject=Patient/a-pat-2&_tag={tag}")]
    );
    let manifest = s.manifest(&s.gateway_path(k.headers["content-location"].to_str().unwrap()), &s.a).await;
    assert_eq!(s.download(&manifest, &s.a).await, ["Observation/a-obs-3"]);

    // Group level by POST: the member from tenant B stays out; another tenant's group looks missing.
    let types = params(json!([{"name": "_type", "valueString": "Patient"}]));
    let k = s.kick_off_post("/fhir/Group/a-grp-1/$export", &s.a, &types).await;
    assert_eq!(k.status, 202, "{}", k.text());
    let manifest = s.manifest(&s.gateway_path(k.headers["content-location"].to_str().unwrap()), &s.a).await;
    assert_eq!(sorted(s.download(&manifest, &s.a).await), ["Patient/a-pat-1", "Patient/a-pat-2"]);
    let foreign = s.kick_off_post("/fhir/Group/b-grp-1/$export", &s.a, &types).await;
    let missing = s.kick_off_post("/fhir/Group/no-such-group/$export", &s.a, &types).await;
    assert_eq!((foreign.status, missing.status), (404, 404), "{}", foreign.text());
    assert_eq!(foreign.body, missing.body);

    // Named patients: each must be visible (another tenant's looks missing), and the upstream gets them in a POST
    // with the narrowed parameters. b-obs-cross (tenant B's, about a-pat-1) stays out.
    let patient = |id: &str| json!({"name": "patient", "valueReference": {"reference": format!("Patient/{id}")}});
    let body = params(json!([{"name": "_type", "valueString": "Observation"}, patient("a-pat-1")]));
    let k = s.kick_off_post("/fhir/Patient/$export", &s.a, &body).await;
    assert_eq!(k.status, 202, "{}", k.text());
    let log = s.upstream_requests().await;
    let kick = log.iter().rev().find(|r| r["path"] == "/fhir/Patient/$export").unwrap();
    assert_eq!(kick["method"], "POST");
    assert_eq!(kick["headers"]["authorization"], format!("Bearer {UPSTREAM_TOKEN}"));
    let manifest = s.manifest(&s.gateway_path(k.headers["content-location"].to_str().unwrap()), &s.a).await;
    assert_eq!(sorted(s.download(&manifest, &s.a).await), ["Observation/a-obs-1", "Observation/a-obs-2"]);
    let before = s.upstream_requests().await.len();
    let foreign = s
        .kick_off_post(
            "/fhir/Patient/$export",
            &s.a,
            &params(json!([{"name": "_type", "valueString": "Observation"}, patient("a-pat-1"), patient("b-pat-1")])),
        )
        .await;
    let missing = s
        .kick_off_post(
            "/fhir/Patient/$export",
            &s.a,
            &params(json!([{"name": "_type", "valueString": "Observation"}, patient("a-pat-1"), patient("nobody")])),
        )
        .await;
    assert_eq!((foreign.status, missing.status), (404, 404), "{}", foreign.text());
    assert_eq!(foreign.body, missing.body);
    let kick_offs = |log: Vec<Value>| log.iter().filter(|r| r["path"] == "/fhir/Patient/$export").count();
    assert_eq!(kick_offs(s.upstream_requests().await[before..].to_vec()), 0, "a refused kick-off reached the upstream");

    let before = s.upstream_requests().await.len();
    let observations_only = s.issuer.token("tenant-a", "user/Observation.read");
    let cases: Vec<(&str, &str, &str, Value, u16, &str)> = vec![
        ("patient at system level", "/fhir/$export", &s.a, params(json!([patient("a-pat-1")])), 400, "patient"),
        (
            "patient not a Patient reference",
            "/fhir/Patient/$export",
            &s.a,
            params(json!([{"name": "patient", "valueReference": {"reference": "Group/a-grp-1"}}])),
            400,
            "patient",
        ),
        (
            "unknown parameter",
            "/fhir/$export",
            &s.a,
            params(json!([{"name": "_elements", "valueString": "id"}])),
            400,
            "_elements",
        ),
        (
            "_typeFilter with _has",
            "/fhir/$export",
            &s.a,
            params(json!([
                {"name": "_type", "valueString": "Patient"},
                {"name": "_typeFilter", "valueString": "Patient?_has:Observation:subject:code=1"}
            ])),
            400,
            "_has",
        ),
        (
            "wrong value type",
            "/fhir/$export",
            &s.a,
            params(json!([{"name": "_type", "valueCode": "Patient"}])),
            400,
            "_type",
        ),
        ("not Parameters", "/fhir/$export", &s.a, json!({"resourceType": "Patient"}), 400, "Parameters"),
        (
            "a type outside the scopes",
            "/fhir/$export",
            &observations_only,
            params(json!([{"name": "_type", "valueString": "Patient,Observation"}])),
            403,
            "Patient",
        ),
    ];
    for (what, path, token, body, status, named) in cases {
        let r = s.kick_off_post(path, token, &body).await;
        assert_eq!(r.status, status, "{what}: {}", r.text());
        assert_eq!(r.json()["resourceType"], "OperationOutcome", "{what}");
        assert!(r.text().contains(named), "{what}: the outcome should name `{named}`: {}", r.text());
    }
    // Parameters in the query as well as the body; a body that is not FHIR JSON; no `Prefer: respond-async`.
    let both = s.kick_off_post("/fhir/$export?_type=Patient", &s.a, &types).await;
    assert_eq!(both.status, 400, "{}", both.text());
    let form = s
        .send(
            http()
                .post(s.url("/fhir/$export"))
                .bearer_auth(&s.a)
                .header("prefer", "respond-async")
                .header("content-type", "application/x-www-form-urlencoded")
                .body("_type=Patient"),
        )
        .await;
    assert_eq!(form.status, 415, "{}", form.text());
    let sync = s
        .send(
            http()
                .post(s.url("/fhir/$export"))
                .bearer_auth(&s.a)
                .header("content-type", "application/fhir+json")
                .body(types.to_string()),
        )
        .await;
    assert_eq!(sync.status, 400, "{}", sync.text());
    assert!(sync.text().contains("respond-async"), "{}", sync.text());
    assert_eq!(s.upstream_requests().await.len(), before, "a refused kick-off reached the upstream");
}

#[tokio::test]
async fn capability_statement_advertises_the_handlers() {
    let s = stack().await;
    let cs = s.send(http().get(s.url("/fhir/metadata"))).await.json();
    let rest = &cs["rest"][0];
    let names = |ops: &Value| -> Vec<String> {
        ops.as_array().map(|o| o.iter().map(|o| o["name"].as_str().unwrap().to_owned()).collect()).unwrap_or_default()
    };
    assert_eq!(names(&rest["operation"]), ["export"]);
    let resource = |ty: &str| rest["resource"].as_array().unwrap().iter().find(|r| r["type"] == ty).unwrap().clone();
    assert_eq!(sorted(names(&resource("Patient")["operation"])), ["everything", "export"]);
    assert_eq!(names(&resource("Group")["operation"]), ["export"]);
    assert_eq!(names(&resource("DocumentReference")["operation"]), ["docref"]);
    assert!(names(&resource("Observation")["operation"]).is_empty());
}
