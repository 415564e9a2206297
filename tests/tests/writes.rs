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
    assert_eq!(missing.status, 404, "no update-as-create through the gateway: {}", missing.text());

    // Another tenant's resource: update, patch and delete all look exactly like a missing one, and change nothing.
    let b_before = s.upstream("/Patient/b-pat-1").await;
    let attempts = vec![
        http().put(s.url("/fhir/Patient/b-pat-1")).bearer_auth(&a).json(
            &json!({"resourceType": "Patient", "id": "b-pat-1", "meta": {"tag": [{"system": DS, "code": "tenant-a"}]}}),
        ),
        http()
            .patch(s.url("/fhir/Patient/b-pat-1"))
            .bearer_auth(&a)
            .header("content-type", "application/json-patch+json")
            .body(r#"[{"op":"replace","path":"/active","value":false}]"#),
        http().delete(s.url("/fhir/Patient/b-pat-1")).bearer_auth(&a),
    ];
    for request in attempts {
        let r = s.send(request).await;
        assert_eq!((r.status, &r.body), (404, &missing.body));
    }
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
    let r = s
        .send(
            http()
                .patch(s.url("/fhir/Patient/a-pat-3"))
                .bearer_auth(&a)
                .header("content-type", "application/fhir+json")
                .body("{}"),
        )
        .await;
    assert_eq!(r.status, 415, "FHIRPath Patch is not accepted yet");

    // Delete one's own resource: gone. Another tenant's: untouched (above).
    let r = s.send(http().delete(s.url("/fhir/Observation/a-obs-4")).bearer_auth(&a)).await;
    assert!(r.status == 200 || r.status == 204, "{}", r.text());
    assert_eq!(s.get("/fhir/Observation/a-obs-4", &a).await.status, 404);
}
