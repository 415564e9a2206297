//! Case 5 of `shared/security-cases.md`: writes check both sides — the stored resource before, the new content —
//! and are forwarded with If-Match on the checked version. Real requests through a real data plane.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::stack;
use fhirgw_e2e::http;
use serde_json::{Value, json};

const WRITE: &str = "openid user/*.*";
const DS: &str = "https://fhirgw.dev/dataset";

fn tags(resource: &Value) -> Vec<String> {
    resource["meta"]["tag"]
        .as_array()
        .map(|t| {
            t.iter()
                .map(|t| format!("{}|{}", t["system"].as_str().unwrap_or(""), t["code"].as_str().unwrap_or("")))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn creates_carry_only_the_callers_datasets() {
    let s = stack().await;
    let a = s.issuer.token("tenant-a", WRITE);
    let count = |v: Value| v["total"].as_u64().unwrap();
    let before = count(s.upstream("/Patient?_summary=count").await);

    // Untagged: stamped with the tenant's only dataset.
    let r = s
        .send(
            http()
                .post(s.url("/fhir/Patient"))
                .bearer_auth(&a)
                .json(&json!({"resourceType": "Patient", "name": [{"family": "New"}]})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let location = r.headers["location"].to_str().unwrap().to_owned();
    assert!(!location.contains(s.fhir.ready["base_url"].as_str().unwrap()), "upstream URL leaked: {location}");
    let id = location.split("/Patient/").nth(1).unwrap().split('/').next().unwrap().to_owned();
    let stored = s.upstream(&format!("/Patient/{id}")).await;
    assert_eq!(tags(&stored), vec![format!("{DS}|tenant-a")]);
    assert_eq!(s.get(&format!("/fhir/Patient/{id}"), &a).await.status, 200);
    assert_eq!(s.get(&format!("/fhir/Patient/{id}"), &s.b).await.status, 404);

    // Other tag systems are kept alongside.
    let body = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
        "meta": {"tag": [{"system": "http://example.org/workflow", "code": "draft"}]}});
    let r = s.send(http().post(s.url("/fhir/Observation")).bearer_auth(&a).json(&body)).await;
    assert_eq!(r.status, 201, "{}", r.text());

    // Another tenant's dataset, alone or alongside one's own: refused, and nothing is created.
    for meta in [
        json!({"tag": [{"system": DS, "code": "tenant-b"}]}),
        json!({"tag": [{"system": DS, "code": "tenant-a"}, {"system": DS, "code": "tenant-b"}]}),
    ] {
        let r = s
            .send(
                http()
                    .post(s.url("/fhir/Patient"))
                    .bearer_auth(&a)
                    .json(&json!({"resourceType": "Patient", "meta": meta})),
            )
            .await;
        assert_eq!(r.status, 403, "{}", r.text());
    }
    // A tag without a system or without a code is refused naming the element, on every kind of write, and nothing
    // is stored.
    let incomplete = json!({"tag": [{"system": DS, "code": "tenant-a"}, {"code": "sample-b"}]});
    let r = s
        .send(
            http()
                .post(s.url("/fhir/Patient"))
                .bearer_auth(&a)
                .json(&json!({"resourceType": "Patient", "meta": incomplete})),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("meta.tag[1]"), "the element is named: {}", r.text());
    let mut own = s.upstream("/Patient/a-pat-1").await;
    own["meta"]["tag"] = json!([{"system": DS, "code": "tenant-a"}, {"system": "http://example.org/workflow"}]);
    let r = s.send(http().put(s.url("/fhir/Patient/a-pat-1")).bearer_auth(&a).json(&own)).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let r = s
        .send(http().post(s.url("/fhir/Patient/a-pat-1/$meta-add")).bearer_auth(&a).json(&json!({
            "resourceType": "Parameters", "parameter": [{"name": "meta", "valueMeta": {"tag": [{"code": "sample-b"}]}}]
        })))
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
    let r = s
        .send(http().post(s.url("/fhir")).bearer_auth(&a).json(&json!({"resourceType": "Bundle", "type": "batch",
            "entry": [{"request": {"method": "POST", "url": "Patient"},
                       "resource": {"resourceType": "Patient", "meta": {"tag": [{"code": "sample-b"}]}}}]})))
        .await;
    assert!(r.json()["entry"][0]["response"]["status"].as_str().unwrap().starts_with("400"), "{}", r.text());
    assert!(
        !tags(&s.upstream("/Patient/a-pat-1").await).iter().any(|t| t.starts_with('|') || t.ends_with('|')),
        "an incomplete tag was stored"
    );
    assert_eq!(count(s.upstream("/Patient?_summary=count").await), before + 1);

    // Wrong type, not JSON, XML: refused.
    let r =
        s.send(http().post(s.url("/fhir/Patient")).bearer_auth(&a).json(&json!({"resourceType": "Observation"}))).await;
    assert_eq!(r.status, 400);
    let r = s
        .send(
            http()
                .post(s.url("/fhir/Patient"))
                .bearer_auth(&a)
                .header("content-type", "application/fhir+json")
                .body("{not json"),
        )
        .await;
    assert_eq!(r.status, 400);
    let r = s
        .send(
            http()
                .post(s.url("/fhir/Patient"))
                .bearer_auth(&a)
                .header("content-type", "application/fhir+xml")
                .body("<Patient/>"),
        )
        .await;
    assert_eq!(r.status, 415);

    // Read-only scopes cannot write.
    let r =
        s.send(http().post(s.url("/fhir/Patient")).bearer_auth(&s.a).json(&json!({"resourceType": "Patient"}))).await;
    assert_eq!(r.status, 403);

    // A conditional create matches only within the tenant: tenant-b's identifier is not an oracle.
    let b_identifier = s.upstream("/Patient/b-pat-1").await["identifier"][0].clone();
    let condition =
        format!("identifier={}|{}", b_identifier["system"].as_str().unwrap(), b_identifier["value"].as_str().unwrap());
    let r = s
        .send(
            http()
                .post(s.url("/fhir/Patient"))
                .bearer_auth(&a)
                .header("if-none-exist", condition)
                .json(&json!({"resourceType": "Patient", "identifier": [b_identifier]})),
        )
        .await;
    assert_eq!(r.status, 201, "a conditional create must not match another tenant's resource: {}", r.text());
}

#[tokio::test]
async fn updates_patches_and_deletes_check_both_sides() {
    let s = stack().await;
    let a = s.issuer.token("tenant-a", WRITE);
    let missing = s
        .send(
            http()
                .put(s.url("/fhir/Patient/nope"))
                .bearer_auth(&a)
                .json(&json!({"resourceType": "Patient", "id": "nope"})),
        )
        .await;
    // No update-as-create through the gateway (the id could be taken in another tenant), and it says so.
    assert_eq!(missing.status, 405, "no update-as-create through the gateway: {}", missing.text());
    assert_eq!(missing.json()["resourceType"], "OperationOutcome");
    assert!(missing.text().contains("does not create resources by update"), "{}", missing.text());
    assert!(s.upstream("/Patient/nope").await["resourceType"] == "OperationOutcome", "nothing was created");

    // Another tenant's resource: update, patch and delete all look exactly like a missing one, and change nothing.
    let b_before = s.upstream("/Patient/b-pat-1").await;
    let patch = |id: &str| {
        http()
            .patch(s.url(&format!("/fhir/Patient/{id}")))
            .bearer_auth(&a)
            .header("content-type", "application/json-patch+json")
            .body(r#"[{"op":"replace","path":"/active","value":false}]"#)
    };
    let r = s
        .send(http().put(s.url("/fhir/Patient/b-pat-1")).bearer_auth(&a).json(
            &json!({"resourceType": "Patient", "id": "b-pat-1", "meta": {"tag": [{"system": DS, "code": "tenant-a"}]}}),
        ))
        .await;
    assert_eq!((r.status, &r.body), (405, &missing.body), "{}", r.text());
    let missing_patch = s.send(patch("nope")).await;
    assert_eq!(missing_patch.status, 404, "{}", missing_patch.text());
    let r = s.send(patch("b-pat-1")).await;
    assert_eq!((r.status, &r.body), (404, &missing_patch.body));
    let missing_delete = s.send(http().delete(s.url("/fhir/Patient/nope")).bearer_auth(&a)).await;
    let r = s.send(http().delete(s.url("/fhir/Patient/b-pat-1")).bearer_auth(&a)).await;
    assert_eq!((r.status, &r.body), (404, &missing_delete.body));
    assert_eq!(missing_delete.status, 404);
    assert_eq!(s.upstream("/Patient/b-pat-1").await, b_before);

    // Update one's own resource: without tags it keeps its dataset; moving it to another dataset is refused.
    let stored = s.upstream("/Patient/a-pat-2").await;
    let version = stored["meta"]["versionId"].as_str().unwrap().to_owned();
    let r = s
        .send(
            http()
                .put(s.url("/fhir/Patient/a-pat-2"))
                .bearer_auth(&a)
                .json(&json!({"resourceType": "Patient", "id": "a-pat-2", "active": false})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let after = s.upstream("/Patient/a-pat-2").await;
    assert_eq!(tags(&after), vec![format!("{DS}|tenant-a")], "an update must not strip the dataset tag");
    let log = s.upstream_requests().await;
    let put = log.iter().rev().find(|r| r["method"] == "PUT").unwrap();
    assert_eq!(
        put["headers"]["if-match"],
        json!(format!("W/\"{version}\"")),
        "the write must be conditional on the checked version"
    );

    let r = s
        .send(http().put(s.url("/fhir/Patient/a-pat-2")).bearer_auth(&a).json(
            &json!({"resourceType": "Patient", "id": "a-pat-2", "meta": {"tag": [{"system": DS, "code": "tenant-b"}]}}),
        ))
        .await;
    assert_eq!(r.status, 403);
    // A stale If-Match from the client: 412, nothing written.
    let r = s
        .send(
            http()
                .put(s.url("/fhir/Patient/a-pat-2"))
                .bearer_auth(&a)
                .header("if-match", format!("W/\"{version}\""))
                .json(&json!({"resourceType": "Patient", "id": "a-pat-2"})),
        )
        .await;
    assert_eq!(r.status, 412);
    // The id in the body must be the id in the URL.
    let r = s
        .send(
            http()
                .put(s.url("/fhir/Patient/a-pat-2"))
                .bearer_auth(&a)
                .json(&json!({"resourceType": "Patient", "id": "b-pat-1"})),
        )
        .await;
    assert_eq!(r.status, 400);

    // Patches cannot touch meta (tags), id or the whole document.
    for patch in [
        r#"[{"op":"remove","path":"/meta/tag/0"}]"#,
        r#"[{"op":"replace","path":"/meta","value":{}}]"#,
        r#"[{"op":"add","path":"/meta/tag/-","value":{"system":"https://fhirgw.dev/dataset","code":"tenant-b"}}]"#,
        r#"[{"op":"replace","path":"","value":{"resourceType":"Patient"}}]"#,
    ] {
        let r = s
            .send(
                http()
                    .patch(s.url("/fhir/Patient/a-pat-3"))
                    .bearer_auth(&a)
                    .header("content-type", "application/json-patch+json")
                    .body(patch),
            )
            .await;
        assert_eq!(r.status, 403, "{patch}: {}", r.text());
    }
    assert_eq!(tags(&s.upstream("/Patient/a-pat-3").await), vec![format!("{DS}|tenant-a")]);
    let r = s
        .send(
            http()
                .patch(s.url("/fhir/Patient/a-pat-3"))
                .bearer_auth(&a)
                .header("content-type", "application/json-patch+json")
                .body(r#"[{"op":"replace","path":"/active","value":false}]"#),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(s.upstream("/Patient/a-pat-3").await["active"], json!(false));
    // FHIRPath Patch (HAPI's usual form): the same rule. Content changes go through, pinned to the checked version;
    // a path that reaches meta or id, or that could (an expression outside the accepted grammar), is refused.
    let fhirpath = |kind: &str, path: &str, extra: Value| {
        let mut parts = vec![json!({"name": "type", "valueCode": kind}), json!({"name": "path", "valueString": path})];
        if let Some(more) = extra.as_array() {
            parts.extend(more.iter().cloned());
        }
        let body = json!({"resourceType": "Parameters", "parameter": [{"name": "operation", "part": parts}]});
        http()
            .patch(s.url("/fhir/Patient/a-pat-3"))
            .bearer_auth(&a)
            .header("content-type", "application/fhir+json")
            .json(&body)
    };
    let before = s.upstream("/Patient/a-pat-3").await;
    let r =
        s.send(fhirpath("replace", "Patient.birthDate", json!([{"name": "value", "valueDate": "1980-02-29"}]))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["birthDate"], "1980-02-29");
    let after = s.upstream("/Patient/a-pat-3").await;
    assert_eq!(after["birthDate"], "1980-02-29");
    let log = s.upstream_requests().await;
    let sent = log.iter().rev().find(|r| r["method"] == "PATCH").unwrap();
    assert_eq!(sent["headers"]["if-match"], json!(format!("W/\"{}\"", before["meta"]["versionId"].as_str().unwrap())));
    assert_eq!(sent["headers"]["content-type"], "application/fhir+json");
    for (kind, path, extra, want) in [
        ("delete", "Patient.meta.tag", json!([]), 403),
        ("delete", "Patient.meta", json!([]), 403),
        (
            "add",
            "Patient.meta",
            json!([{"name": "name", "valueString": "tag"}, {"name": "value", "valueCoding": {"system": DS, "code": "tenant-b"}}]),
            403,
        ),
        ("add", "Patient", json!([{"name": "name", "valueString": "meta"}, {"name": "value", "valueMeta": {}}]), 403),
        ("replace", "Patient.id", json!([{"name": "value", "valueId": "x"}]), 403),
        ("replace", "Patient.name.select(%resource.meta)", json!([{"name": "value", "valueMeta": {}}]), 400),
        ("delete", "Patient.name | Patient.meta", json!([]), 400),
        ("delete", "Patient.descendants()", json!([]), 400),
    ] {
        let r = s.send(fhirpath(kind, path, extra)).await;
        assert_eq!(r.status, want, "{kind} {path}: {}", r.text());
        assert_eq!(r.json()["resourceType"], "OperationOutcome");
    }
    assert_eq!(tags(&s.upstream("/Patient/a-pat-3").await), vec![format!("{DS}|tenant-a")]);
    assert_eq!(s.upstream("/Patient/a-pat-3").await["meta"]["versionId"], after["meta"]["versionId"]);
    let r = s
        .send(
            http()
                .patch(s.url("/fhir/Patient/a-pat-3"))
                .bearer_auth(&a)
                .header("content-type", "application/fhir+json")
                .body("{}"),
        )
        .await;
    assert_eq!(r.status, 400, "not a FHIRPath Patch: {}", r.text());
    let r = s
        .send(
            http()
                .patch(s.url("/fhir/Patient/a-pat-3"))
                .bearer_auth(&a)
                .header("content-type", "application/xml-patch+xml")
                .body("<diff/>"),
        )
        .await;
    assert_eq!(r.status, 415, "{}", r.text());
    assert!(r.text().contains("FHIRPath Patch"), "the refusal says what to use: {}", r.text());

    // Delete one's own resource: gone. Another tenant's: untouched (above).
    let r = s.send(http().delete(s.url("/fhir/Observation/a-obs-4")).bearer_auth(&a)).await;
    assert!(r.status == 200 || r.status == 204, "{}", r.text());
    assert_eq!(s.get("/fhir/Observation/a-obs-4", &a).await.status, 404);
}

/// Case 4: every entry of a batch or transaction is checked like the request it describes; a transaction with one
/// refused entry is refused whole before anything reaches the upstream.
#[tokio::test]
async fn batch_and_transaction_entries_are_checked_one_by_one() {
    let s = stack().await;
    let a = s.issuer.token("tenant-a", WRITE);
    let post = |bundle: Value| s.send(http().post(s.url("/fhir")).bearer_auth(&a).json(&bundle));
    let b_before = s.upstream("/Patient/b-pat-1").await;
    let patients_before = s.upstream("/Patient?_summary=count").await["total"].as_u64().unwrap();
    let entry = |method: &str, url: &str| json!({"request": {"method": method, "url": url}});
    let with = |method: &str, url: &str, resource: Value| json!({"request": {"method": method, "url": url}, "resource": resource});

    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        entry("GET", "Patient/a-pat-1"),
        entry("GET", "Patient/b-pat-1"),
        entry("GET", "Patient/does-not-exist"),
        entry("GET", "Patient?_count=50"),
        entry("GET", &format!("Patient?_tag={DS}|tenant-b")),
        with("POST", "Patient", json!({"resourceType": "Patient", "name": [{"family": "Batched"}]})),
        with("PUT", "Patient/b-pat-1", json!({"resourceType": "Patient", "id": "b-pat-1", "meta": {"tag": [{"system": DS, "code": "tenant-a"}]}})),
        entry("DELETE", "Patient/b-pat-1"),
        entry("GET", "Patient/b-pat-1/Observation"),
        with("POST", "Observation", json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "meta": {"tag": [{"system": DS, "code": "tenant-b"}]}})),
        entry("GET", "Patient/b-pat-1/$everything"),
        entry("GET", "https://evil.example/fhir/Patient/b-pat-1"),
        entry("DELETE", "Patient?identifier=x"),
    ]});
    let r = post(batch).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    assert_eq!(body["type"], "batch-response");
    let entries = body["entry"].as_array().unwrap();
    assert_eq!(entries.len(), 13);
    let status = |i: usize| entries[i]["response"]["status"].as_str().unwrap().to_owned();
    assert!(status(0).starts_with("200"), "{}", entries[0]);
    assert_eq!(entries[0]["resource"]["id"], "a-pat-1");
    // Out of grant and nonexistent: the same answer, byte for byte.
    assert!(status(1).starts_with("404"), "{}", entries[1]);
    assert_eq!(entries[1], entries[2], "out-of-grant and missing differ");
    // The search is narrowed: only tenant-a's patients, and asking for tenant-b's tag finds nothing.
    let found: Vec<&str> = entries[3]["resource"]["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["id"].as_str().unwrap())
        .collect();
    assert!(!found.is_empty() && found.iter().all(|id| !id.starts_with("b-")), "{found:?}");
    assert!(entries[4]["resource"]["entry"].as_array().is_none_or(Vec::is_empty), "{}", entries[4]);
    // The create is stamped with tenant-a's dataset and its location is public.
    assert!(status(5).starts_with("201"), "{}", entries[5]);
    let location = entries[5]["response"]["location"].as_str().unwrap();
    assert!(location.starts_with(&s.url("/fhir/Patient/")), "{location}");
    let id = location.split("/Patient/").nth(1).unwrap().split('/').next().unwrap();
    assert_eq!(tags(&s.upstream(&format!("/Patient/{id}")).await), vec![format!("{DS}|tenant-a")]);
    // Writes to another tenant's resource look like writes to a missing one (an update: refused as an
    // update-as-create); the rest are refused in place.
    assert!(status(6).starts_with("405") && status(7).starts_with("404"), "{} {}", entries[6], entries[7]);
    for i in [8, 9, 10, 12] {
        assert!(status(i).starts_with("403"), "entry {i}: {}", entries[i]);
        assert_eq!(entries[i]["response"]["outcome"]["resourceType"], "OperationOutcome");
    }
    assert!(status(11).starts_with("400"), "{}", entries[11]);
    assert_eq!(s.upstream("/Patient/b-pat-1").await, b_before, "tenant-b's patient changed");
    let upstream_base = s.fhir.ready["base_url"].as_str().unwrap();
    assert!(!r.text().contains(upstream_base), "the upstream's base leaked");

    // A transaction with one refused entry is refused whole, and nothing reaches the upstream.
    let log_before = s.upstream_requests().await.len();
    let refused = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        with("POST", "Patient", json!({"resourceType": "Patient", "name": [{"family": "Never"}]})),
        entry("GET", "Patient/b-pat-1/Observation"),
    ]});
    let r = post(refused).await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.json()["issue"][0]["diagnostics"].as_str().unwrap().contains("entry 1"), "{}", r.text());
    let log = s.upstream_requests().await;
    assert!(log[log_before..].iter().all(|req| req["method"] != "POST"), "a refused transaction reached the upstream");

    // A transaction touching another tenant's resource: the same 404 as a missing one, and nothing written.
    let r = post(json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        with("POST", "Patient", json!({"resourceType": "Patient", "name": [{"family": "Never"}]})),
        entry("DELETE", "Patient/b-pat-1"),
    ]}))
    .await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(s.upstream("/Patient/b-pat-1").await, b_before);

    // A transaction the checks allow goes through atomically, with references between its entries resolved.
    let ok = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:7f4b9e2a-0000-4000-8000-000000000001",
         "resource": {"resourceType": "Patient", "name": [{"family": "Transacted"}]},
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "t"},
                      "subject": {"reference": "urn:uuid:7f4b9e2a-0000-4000-8000-000000000001"}},
         "request": {"method": "POST", "url": "Observation"}},
    ]});
    let r = post(ok).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    assert_eq!(body["type"], "transaction-response");
    for e in body["entry"].as_array().unwrap() {
        assert!(e["response"]["status"].as_str().unwrap().starts_with("201"), "{e}");
        let location = e["response"]["location"].as_str().unwrap();
        let path = location.strip_prefix(&s.url("/fhir")).unwrap_or_else(|| panic!("not public: {location}"));
        let path = path.split("/_history").next().unwrap();
        assert_eq!(tags(&s.upstream(path).await), vec![format!("{DS}|tenant-a")], "{path}");
    }
    let patients_after = s.upstream("/Patient?_summary=count").await["total"].as_u64().unwrap();
    assert_eq!(patients_after, patients_before + 2, "one patient from the batch, one from the transaction");

    // An update pinned to a stale version fails the transaction with 412.
    let current = s.upstream("/Patient/a-pat-2").await;
    let mut stale = current.clone();
    stale["name"] = json!([{"family": "Stale"}]);
    let r = post(json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": stale, "request": {"method": "PUT", "url": "Patient/a-pat-2", "ifMatch": "W/\"999\""}},
    ]}))
    .await;
    assert_eq!(r.status, 412, "{}", r.text());
    assert_eq!(s.upstream("/Patient/a-pat-2").await, current);

    // Not a batch at all, or a read-only token writing: refused.
    let r = post(json!({"resourceType": "Bundle", "type": "collection", "entry": []})).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let r = s
        .send(http().post(s.url("/fhir")).bearer_auth(&s.a).json(
            &json!({"resourceType": "Bundle", "type": "batch", "entry": [
                with("POST", "Patient", json!({"resourceType": "Patient"})),
            ]}),
        ))
        .await;
    assert!(r.json()["entry"][0]["response"]["status"].as_str().unwrap().starts_with("403"), "{}", r.text());
}

/// Case 4: conditional update, patch and delete are resolved with a search narrowed to the tenant; another tenant's
/// resources can neither match nor be counted, and the write itself is the ordinary checked one.
#[tokio::test]
async fn conditional_writes_match_only_the_callers_resources() {
    let s = stack().await;
    let a = s.issuer.token("tenant-a", WRITE);
    let b_before = s.upstream("/Patient/b-pat-1").await;

    // One match: updated in place, pinned to the version that matched; the body may leave the id out.
    let r = s
        .send(http().put(s.url("/fhir/Patient?_id=a-pat-2")).bearer_auth(&a).json(&json!({
            "resourceType": "Patient", "name": [{"family": "Conditional"}]})))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let stored = s.upstream("/Patient/a-pat-2").await;
    assert_eq!(stored["name"][0]["family"], "Conditional");
    assert_eq!(tags(&stored), vec![format!("{DS}|tenant-a")], "the stored dataset tag is kept");

    // Another tenant's resource never matches: a conditional update creates the caller's own resource instead,
    // and a conditional delete finds nothing, exactly as for a condition nothing meets.
    let r = s
        .send(http().put(s.url("/fhir/Patient?_id=b-pat-1")).bearer_auth(&a).json(&json!({
            "resourceType": "Patient", "name": [{"family": "NotB"}]})))
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let created = r.headers["location"].to_str().unwrap().to_owned();
    assert!(!created.contains("b-pat-1"), "{created}");
    let foreign = s.send(http().delete(s.url("/fhir/Patient?_id=b-pat-1")).bearer_auth(&a)).await;
    let nothing = s.send(http().delete(s.url("/fhir/Patient?_id=nope")).bearer_auth(&a)).await;
    assert_eq!((foreign.status, nothing.status), (404, 404), "{}", foreign.text());
    assert_eq!(foreign.json()["issue"], nothing.json()["issue"]);
    let foreign_patch = s
        .send(
            http()
                .patch(s.url("/fhir/Patient?_id=b-pat-1"))
                .bearer_auth(&a)
                .header("content-type", "application/json-patch+json")
                .body(r#"[{"op": "replace", "path": "/active", "value": false}]"#),
        )
        .await;
    assert_eq!(foreign_patch.status, 404, "{}", foreign_patch.text());
    assert_eq!(s.upstream("/Patient/b-pat-1").await, b_before, "tenant-b's patient changed");

    // Several of one's own match: 412, nothing deleted. b-obs-cross (tenant-b, about a-pat-1) is not counted either.
    let r = s.send(http().delete(s.url("/fhir/Observation?subject=Patient/a-pat-1")).bearer_auth(&a)).await;
    assert_eq!(r.status, 412, "{}", r.text());
    assert_eq!(s.upstream("/Observation/a-obs-1").await["id"], "a-obs-1");
    // Exactly one: deleted.
    let r = s.send(http().delete(s.url("/fhir/Observation?_id=a-obs-4")).bearer_auth(&a)).await;
    assert!(r.status == 200 || r.status == 204, "{} {}", r.status, r.text());
    let gone = s.get("/fhir/Observation/a-obs-4", &a).await;
    assert_eq!(gone.status, 404);

    // Read-only scopes cannot write conditionally; a paging or count parameter is not a condition.
    let r = s.send(http().delete(s.url("/fhir/Patient?_id=a-pat-3")).bearer_auth(&s.a)).await;
    assert_eq!(r.status, 403, "{}", r.text());
    let r = s.send(http().delete(s.url("/fhir/Patient?_id=a-pat-3&_count=1")).bearer_auth(&a)).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(s.upstream("/Patient/a-pat-3").await["id"], "a-pat-3");
}

/// Case 5: `$meta-add` and `$meta-delete` change tags directly, so they get the write rules: the resource must be
/// visible, only the caller's own dataset tags may be added or removed, and the last one cannot be removed.
#[tokio::test]
async fn meta_operations_keep_resources_in_the_tenant() {
    let s = stack().await;
    let a = s.issuer.token("tenant-a", WRITE);
    let meta_op = |path: &str, tags: Value| {
        let body = json!({"resourceType": "Parameters", "parameter": [{"name": "meta", "valueMeta": {"tag": tags}}]});
        s.send(http().post(s.url(&format!("/fhir/{path}"))).bearer_auth(&a).json(&body))
    };
    let workflow = json!([{"system": "http://example.org/workflow", "code": "reviewed"}]);

    // Another system's tag: added and removed freely on one's own resource.
    let r = meta_op("Patient/a-pat-3/$meta-add", workflow.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["resourceType"], "Parameters");
    assert!(tags(&s.upstream("/Patient/a-pat-3").await).contains(&"http://example.org/workflow|reviewed".to_owned()));
    let r = meta_op("Patient/a-pat-3/$meta-delete", workflow.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(tags(&s.upstream("/Patient/a-pat-3").await), vec![format!("{DS}|tenant-a")]);

    // Sharing into another tenant's dataset, or taking away the last own dataset tag: refused, nothing changed.
    let r = meta_op("Patient/a-pat-3/$meta-add", json!([{"system": DS, "code": "tenant-b"}])).await;
    assert_eq!(r.status, 403, "{}", r.text());
    let r = meta_op("Patient/a-pat-3/$meta-delete", json!([{"system": DS, "code": "tenant-a"}])).await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(tags(&s.upstream("/Patient/a-pat-3").await), vec![format!("{DS}|tenant-a")]);

    // Another tenant's resource looks missing, whatever the tags named.
    let b_before = s.upstream("/Patient/b-pat-1").await;
    let foreign = meta_op("Patient/b-pat-1/$meta-add", workflow.clone()).await;
    let missing = meta_op("Patient/nope/$meta-add", workflow.clone()).await;
    assert_eq!((foreign.status, missing.status), (404, 404), "{}", foreign.text());
    assert_eq!(foreign.json()["issue"], missing.json()["issue"]);
    let r = meta_op("Patient/b-pat-1/$meta-delete", json!([{"system": DS, "code": "tenant-b"}])).await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(s.upstream("/Patient/b-pat-1").await, b_before);

    // Read-only scopes: refused; a malformed request: 400.
    let r = s
        .send(http().post(s.url("/fhir/Patient/a-pat-3/$meta-add")).bearer_auth(&s.a).json(&json!({
            "resourceType": "Parameters", "parameter": [{"name": "meta", "valueMeta": {"tag": workflow}}]})))
        .await;
    assert_eq!(r.status, 403, "{}", r.text());
    let r = s
        .send(
            http()
                .post(s.url("/fhir/Patient/a-pat-3/$meta-add"))
                .bearer_auth(&a)
                .json(&json!({"resourceType": "Parameters"})),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
}
