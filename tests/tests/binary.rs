//! Binary content (issue 16): a `GET Binary/[id]` asking for a non-FHIR type is checked as the Binary's metadata
//! (tags, version, security context) like any read, then its raw content streams back at the version checked.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use base64::Engine;
use common::{Stack, stack};
use fhirgw_e2e::fixtures::DATASET as DS;
use fhirgw_e2e::http;
use serde_json::{Value, json};

fn binary(id: &str, code: &str, content: &[u8], context: Option<&str>) -> Value {
    let mut b = json!({"resourceType": "Binary", "id": id, "contentType": "application/pdf",
        "data": base64::engine::general_purpose::STANDARD.encode(content),
        "meta": {"tag": [{"system": DS, "code": code}]}});
    if let Some(context) = context {
        b["securityContext"] = json!({"reference": context});
    }
    b
}

async fn raw(s: &Stack, path: &str, token: &str, accept: &str) -> common::Reply {
    s.send(http().get(s.url(path)).bearer_auth(token).header("accept", accept)).await
}

#[tokio::test]
async fn binary_content_is_checked_then_streamed() {
    let s = stack().await;
    let pdf: Vec<u8> = b"%PDF-1.4\n".iter().copied().chain((0..2_000_000u32).map(|i| (i % 251) as u8)).collect();
    s.put_upstream(&binary("a-bin", "tenant-a", &pdf, None)).await;
    s.put_upstream(&binary("b-bin", "tenant-b", b"%PDF tenant-b secret", None)).await;
    s.put_upstream(&binary("a-bin-b-context", "tenant-a", b"%PDF ctx", Some("Patient/b-pat-1"))).await;
    s.put_upstream(&binary("a-bin-a-context", "tenant-a", b"%PDF ctx ok", Some("Patient/a-pat-1"))).await;

    // One's own: the exact bytes, the upstream's media type; the metadata read without content, then the content
    // at the version checked.
    let from = s.upstream_requests().await.len();
    let r = raw(&s, "/fhir/Binary/a-bin", &s.a, "application/pdf").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body[..200.min(r.body.len())]));
    assert_eq!(r.headers["content-type"], "application/pdf");
    assert!(r.body == pdf, "the content differs ({} bytes, want {})", r.body.len(), pdf.len());
    let log = s.upstream_requests().await;
    let paths: Vec<&str> = log[from..].iter().map(|r| r["path"].as_str().unwrap()).collect();
    let version = s.upstream("/Binary/a-bin").await["meta"]["versionId"].as_str().unwrap().to_owned();
    assert_eq!(
        paths,
        [
            "/fhir/Binary/a-bin?_elements=contentType,securityContext".to_owned(),
            format!("/fhir/Binary/a-bin/_history/{version}")
        ],
        "{paths:?}"
    );

    // Another tenant's, a missing one, and one whose security context is another tenant's: the one 404.
    let missing = raw(&s, "/fhir/Binary/nope", &s.a, "application/pdf").await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["resourceType"], "OperationOutcome");
    for path in ["/fhir/Binary/b-bin", "/fhir/Binary/a-bin-b-context"] {
        let from = s.upstream_requests().await.len();
        let r = raw(&s, path, &s.a, "application/pdf").await;
        assert_eq!((r.status, r.text()), (404, missing.text()), "{path}");
        let log = s.upstream_requests().await;
        assert!(
            log[from..].iter().all(|r| !r["path"].as_str().unwrap().contains("/_history/")),
            "{path}: content was fetched"
        );
    }
    let r = raw(&s, "/fhir/Binary/a-bin-a-context", &s.a, "application/pdf").await;
    assert_eq!((r.status, r.body.as_slice()), (200, b"%PDF ctx ok".as_slice()));

    // A version: only that version's content; another Binary's version number: the 404.
    let r = raw(&s, &format!("/fhir/Binary/a-bin/_history/{version}"), &s.a, "application/pdf").await;
    assert_eq!(r.status, 200);
    assert_eq!(raw(&s, "/fhir/Binary/a-bin/_history/nope", &s.a, "application/pdf").await.status, 404);
    // HEAD: the headers, no content.
    let r =
        s.send(http().head(s.url("/fhir/Binary/a-bin")).bearer_auth(&s.a).header("accept", "application/pdf")).await;
    assert_eq!((r.status, r.body.len()), (200, 0));
    // As FHIR JSON, a Binary is an ordinary read.
    let r = raw(&s, "/fhir/Binary/a-bin", &s.a, "application/fhir+json").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["resourceType"], "Binary");
    assert_eq!(raw(&s, "/fhir/Binary/b-bin", &s.a, "application/fhir+json").await.status, 404);
    // Scopes: a token without Binary read gets nothing; parameters are refused.
    let docs_only = s.issuer.token("tenant-a", "user/Patient.read");
    assert_eq!(raw(&s, "/fhir/Binary/a-bin", &docs_only, "application/pdf").await.status, 403);
    assert_eq!(raw(&s, "/fhir/Binary/a-bin?_elements=data", &s.a, "application/pdf").await.status, 400);
}
