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

/// Sends raw HTTP/1.1 to the data plane (a chunked body, a declared length the client never sends) and returns the
/// status and the whole answer.
async fn raw_http(s: &Stack, request: &[u8]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(s.dp.addr("fhir")).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        let mut buf = [0u8; 8192];
        // Until the answer's head and body are in (the connection may stay open while the body is refused).
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
            let text = String::from_utf8_lossy(&out);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
                    .and_then(|v| v.parse::<usize>().ok());
                if length.is_some_and(|n| body.len() >= n) {
                    break;
                }
            }
        }
    });
    read.await.expect("an answer within 20 s");
    let text = String::from_utf8_lossy(&out).into_owned();
    (text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0), text)
}

/// The Binary a Location header names, as the upstream holds it.
async fn stored_binary(s: &Stack, location: &str) -> Value {
    let id = location.split("/Binary/").nth(1).unwrap().split('/').next().unwrap();
    s.upstream(&format!("/Binary/{id}")).await
}

/// Raw uploads (issue 16): `POST Binary` / `PUT Binary/[id]` with a non-FHIR body become a Binary the gateway builds
/// and checks (content type, a security context visible to the caller, the dataset tag), with the bytes streamed
/// into `data`; another tenant's context or Binary is refused before anything is written.
#[tokio::test]
async fn binary_uploads_are_checked_and_streamed() {
    use base64::engine::general_purpose::STANDARD;
    let s = stack().await;
    let token = s.issuer.token("tenant-a", "user/*.read user/*.write");
    let pdf: Vec<u8> = b"%PDF-1.7\n".iter().copied().chain((0..3_000_001u32).map(|i| (i % 253) as u8)).collect();
    let upload = |path: &str, content_type: &str, body: Vec<u8>| {
        http().post(s.url(path)).bearer_auth(&token).header("content-type", content_type).body(body)
    };

    // Under a context of one's own: 201, a public Location; the upstream holds the bytes, the context, the tag.
    let from = s.upstream_requests().await.len();
    let r = s
        .send(upload("/fhir/Binary", "application/pdf", pdf.clone()).header("x-security-context", "Patient/a-pat-1"))
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(r.body.is_empty(), "the content is not echoed back");
    let location = r.headers["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with(&s.url("/fhir/Binary/")), "{location}");
    let stored = stored_binary(&s, &location).await;
    assert_eq!(stored["contentType"], "application/pdf");
    assert_eq!(stored["securityContext"]["reference"], "Patient/a-pat-1");
    assert_eq!(stored["meta"]["tag"], json!([{"system": DS, "code": "tenant-a"}]));
    assert!(STANDARD.decode(stored["data"].as_str().unwrap()).unwrap() == pdf, "the stored content differs");
    let sent = s.upstream_requests().await;
    let post = sent[from..].iter().find(|r| r["method"] == "POST").unwrap();
    assert_eq!(post["headers"]["content-type"], "application/fhir+json");
    assert!(post["headers"].get("x-security-context").is_none(), "the client's header is not passed on");
    // Read back through the gateway as content: the same bytes.
    let id = location.split("/Binary/").nth(1).unwrap().split('/').next().unwrap().to_owned();
    let back = raw(&s, &format!("/fhir/Binary/{id}"), &token, "application/pdf").await;
    assert_eq!(back.status, 200);
    assert!(back.body == pdf, "read back {} bytes, uploaded {}", back.body.len(), pdf.len());

    // No context: the tenant's only dataset. A chunked body streams the same way; an empty one is a Binary
    // without data.
    let chunked = format!(
        "POST /fhir/Binary HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\nContent-Type: text/plain; charset=utf-8\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n4\r\nhell\r\n1\r\no\r\n6\r\n world\r\n0\r\n\r\n",
        s.dp.addr("fhir")
    );
    let (status, answer) = raw_http(&s, chunked.as_bytes()).await;
    assert_eq!(status, 201, "{answer}");
    let location = answer.lines().find_map(|l| l.strip_prefix("location: ")).unwrap().trim().to_owned();
    let stored = stored_binary(&s, &location).await;
    assert_eq!(stored["contentType"], "text/plain; charset=utf-8");
    assert_eq!(stored["data"], STANDARD.encode("hello world"));
    assert_eq!(stored["meta"]["tag"], json!([{"system": DS, "code": "tenant-a"}]));
    assert!(stored.get("securityContext").is_none());
    let r = s.send(upload("/fhir/Binary", "image/png", Vec::new())).await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(stored_binary(&s, r.headers["location"].to_str().unwrap()).await.get("data").is_none());

    // Another tenant's context, a missing one: one 422, nothing written. A context that is no plain reference: 400.
    let posts = |log: &[Value]| log.iter().filter(|r| r["method"] != "GET").count();
    let before = posts(&s.upstream_requests().await);
    let theirs = s
        .send(upload("/fhir/Binary", "application/pdf", pdf.clone()).header("x-security-context", "Patient/b-pat-1"))
        .await;
    let missing = s
        .send(upload("/fhir/Binary", "application/pdf", pdf.clone()).header("x-security-context", "Patient/nope"))
        .await;
    assert_eq!(theirs.status, 422, "{}", theirs.text());
    assert_eq!(theirs.json()["resourceType"], "OperationOutcome");
    assert_eq!(missing.status, 422);
    for context in ["Patient?identifier=x", "https://elsewhere.example/fhir/Patient/a-pat-1", "#contained"] {
        let r = s
            .send(upload("/fhir/Binary", "application/pdf", b"x".to_vec()).header("x-security-context", context))
            .await;
        assert_eq!(r.status, 400, "{context}: {}", r.text());
    }
    assert_eq!(posts(&s.upstream_requests().await), before, "a refused upload reached the upstream");

    // Updates: one's own (pinned to the version checked; a stale If-Match is 412); another tenant's and a missing
    // one alike: refused, never created.
    s.put_upstream(&binary("a-up", "tenant-a", b"v1", None)).await;
    s.put_upstream(&binary("b-up", "tenant-b", b"b's", None)).await;
    let put =
        |path: &str| http().put(s.url(path)).bearer_auth(&token).header("content-type", "application/octet-stream");
    let r = s.send(put("/fhir/Binary/a-up").body(b"v2 content".to_vec())).await;
    assert!(matches!(r.status, 200 | 204), "{} {}", r.status, r.text());
    let stored = s.upstream("/Binary/a-up").await;
    assert_eq!(stored["data"], STANDARD.encode("v2 content"));
    assert_eq!(stored["contentType"], "application/octet-stream");
    assert_eq!(stored["meta"]["tag"], json!([{"system": DS, "code": "tenant-a"}]));
    let stale = s.send(put("/fhir/Binary/a-up").header("if-match", "W/\"1\"").body(b"v3".to_vec())).await;
    assert_eq!(stale.status, 412, "{}", stale.text());
    let theirs = s.send(put("/fhir/Binary/b-up").body(b"mine now".to_vec())).await;
    let free = s.send(put("/fhir/Binary/free-id").body(b"mine now".to_vec())).await;
    assert_eq!((theirs.status, theirs.text()), (free.status, free.text()));
    assert_eq!(theirs.status, 405);
    assert_eq!(s.upstream("/Binary/b-up").await["data"], STANDARD.encode("b's"));
    let before = posts(&s.upstream_requests().await);

    // Raw content is for Binary only; compressed uploads and declared sizes over the limit are refused up front.
    let r = s.send(upload("/fhir/DocumentReference", "application/pdf", b"%PDF".to_vec())).await;
    assert_eq!(r.status, 415, "{}", r.text());
    let r = s.send(upload("/fhir/Binary", "application/pdf", b"x".to_vec()).header("content-encoding", "gzip")).await;
    assert_eq!(r.status, 415, "{}", r.text());
    let huge = format!(
        "POST /fhir/Binary HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/pdf\r\nContent-Length: 4294967296\r\n\r\n%PDF",
        s.dp.addr("fhir")
    );
    let (status, answer) = raw_http(&s, huge.as_bytes()).await;
    assert_eq!(status, 413, "{answer}");
    assert_eq!(posts(&s.upstream_requests().await), before, "a refused upload reached the upstream");
    // A client that goes away mid-upload: the upstream request is aborted with it, and nothing is stored.
    let count = || async { s.upstream("/Binary?_summary=count").await["total"].as_u64().unwrap() };
    let stored_before = count().await;
    let cut = format!(
        "POST /fhir/Binary HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/pdf\r\nContent-Length: 100000\r\n\r\n%PDF-1.7 and then nothing",
        s.dp.addr("fhir")
    );
    {
        use tokio::io::AsyncWriteExt;
        let mut stream = tokio::net::TcpStream::connect(s.dp.addr("fhir")).await.unwrap();
        stream.write_all(cut.as_bytes()).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(count().await, stored_before, "a truncated upload was stored");
    let before = posts(&s.upstream_requests().await);
    // Without write scope: 403.
    let reader = s.issuer.token("tenant-a", "user/*.read");
    let r = s
        .send(
            http()
                .post(s.url("/fhir/Binary"))
                .bearer_auth(&reader)
                .header("content-type", "application/pdf")
                .body(b"x".to_vec()),
        )
        .await;
    assert_eq!(r.status, 403);
    assert_eq!(posts(&s.upstream_requests().await), before, "a refused upload reached the upstream");
}
