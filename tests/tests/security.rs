//! The attacks of `shared/security-cases.md`, each sent through a real data plane to a real FHIR server holding two
//! tenants' data. Every test asserts that nothing outside the caller's grants comes back, and that out-of-grant and
//! nonexistent look the same.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

mod common;

use common::{assert_only_tenant, stack, stack_with};
use fhirgw_e2e::fixtures::{self, AUDIENCE, READ_SCOPES, grant};
use fhirgw_e2e::issuer::{Key, now, sign};
use fhirgw_e2e::{UPSTREAM_TOKEN, dp_config, eventually, http};
use fhirgw_proto::admin::v1 as api;
use serde_json::{Value, json};

/// Case 9: tokens that must not authenticate, and a few that must.
#[tokio::test]
async fn token_validation_fails_closed() {
    let s = stack().await;
    let iss = s.issuer.url.clone();
    let claims = |f: &dyn Fn(&mut Value)| {
        let mut c = s.issuer.claims("tenant-a", READ_SCOPES);
        f(&mut c);
        c
    };
    let b64 = |v: &Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let unsigned = format!("{}.{}.", b64(&json!({"alg": "none", "typ": "JWT"})), b64(&claims(&|_| {})));
    let hs256_with_public_key = {
        let key = jsonwebtoken::EncodingKey::from_secret(fhirgw_e2e::issuer::RSA_PUBLIC.as_bytes());
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        header.kid = Some("test-rsa".into());
        jsonwebtoken::encode(&header, &claims(&|_| {}), &key).unwrap()
    };
    let refused: Vec<(&str, String)> = vec![
        ("garbage", "not-a-jwt".into()),
        ("alg none", unsigned),
        ("HS256 signed with the public key", hs256_with_public_key),
        ("expired", sign(Key::Rsa, &claims(&|c| c["exp"] = json!(now() - 120)))),
        ("not yet valid", sign(Key::Rsa, &claims(&|c| c["nbf"] = json!(now() + 120)))),
        (
            "no exp",
            sign(
                Key::Rsa,
                &claims(&|c| {
                    c.as_object_mut().unwrap().remove("exp");
                }),
            ),
        ),
        ("wrong audience", sign(Key::Rsa, &claims(&|c| c["aud"] = json!("https://other.example/fhir")))),
        (
            "no audience",
            sign(
                Key::Rsa,
                &claims(&|c| {
                    c.as_object_mut().unwrap().remove("aud");
                }),
            ),
        ),
        ("issuer with a trailing slash", sign(Key::Rsa, &claims(&|c| c["iss"] = json!(format!("{iss}/"))))),
        ("untrusted issuer", sign(Key::Rsa, &claims(&|c| c["iss"] = json!("https://evil.example")))),
        (
            "no tenant claim",
            sign(
                Key::Rsa,
                &claims(&|c| {
                    c.as_object_mut().unwrap().remove("tenant");
                }),
            ),
        ),
        ("unknown tenant", sign(Key::Rsa, &claims(&|c| c["tenant"] = json!("tenant-z")))),
        ("tenant claim not a string", sign(Key::Rsa, &claims(&|c| c["tenant"] = json!(["tenant-a"])))),
        ("signed by an unpublished key", sign(Key::Rotated, &claims(&|_| {}))),
    ];
    for (what, token) in &refused {
        let r = s.get("/fhir/Patient/a-pat-1", token).await;
        assert_eq!(r.status, 401, "{what}: {}", r.text());
        let challenge = r.headers["www-authenticate"].to_str().unwrap();
        assert!(challenge.contains("error=\"invalid_token\""), "{what}: {challenge}");
        assert_eq!(r.json()["resourceType"], "OperationOutcome");
    }

    // No token at all: 401 with a plain challenge; a non-bearer scheme: refused.
    let r = s.send(http().get(s.url("/fhir/Patient/a-pat-1"))).await;
    assert_eq!(r.status, 401);
    assert!(r.headers["www-authenticate"].to_str().unwrap().starts_with("Bearer"));
    let r = s.send(http().get(s.url("/fhir/Patient/a-pat-1")).basic_auth("tenant-a", Some("x"))).await;
    assert_eq!(r.status, 401);

    // What must work: RS256, ES256, expiry within the leeway, and the public CapabilityStatement.
    assert_eq!(s.get("/fhir/Patient/a-pat-1", &s.a).await.status, 200);
    assert_eq!(s.get("/fhir/Patient/a-pat-1", &sign(Key::Ec, &claims(&|_| {}))).await.status, 200);
    assert_eq!(
        s.get("/fhir/Patient/a-pat-1", &sign(Key::Rsa, &claims(&|c| c["exp"] = json!(now() - 5)))).await.status,
        200
    );
    assert_eq!(s.send(http().get(s.url("/fhir/metadata"))).await.status, 200);

    // A token without the scopes a read needs is refused, not treated as unrestricted.
    let r = s.get("/fhir/Patient/a-pat-1", &s.issuer.token("tenant-a", "openid profile")).await;
    assert_eq!(r.status, 403, "{}", r.text());
    let r = s.get("/fhir/Patient/a-pat-1", &s.issuer.token("tenant-a", "user/Observation.read")).await;
    assert_eq!(r.status, 403, "{}", r.text());
}

/// Case 9: key rotation is picked up on an unknown kid, and unknown kids cannot hammer the issuer.
#[tokio::test]
async fn jwks_refetch_on_rotation_is_rate_limited() {
    let s = stack().await;
    assert_eq!(s.get("/fhir/Patient/a-pat-1", &s.a).await.status, 200);
    let fetches = s.issuer.jwks_fetches();
    s.issuer.publish_rotated_key();
    let rotated = sign(Key::Rotated, &s.issuer.claims("tenant-a", READ_SCOPES));
    assert_eq!(s.get("/fhir/Patient/a-pat-1", &rotated).await.status, 200, "a rotated key must be picked up");
    assert_eq!(s.issuer.jwks_fetches(), fetches + 1);
    // A burst of unknown kids right after: no further fetches.
    for i in 0..20 {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some(format!("unknown-{i}"));
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(fhirgw_e2e::issuer::RSA_PRIVATE.as_bytes()).unwrap();
        let token = jsonwebtoken::encode(&header, &s.issuer.claims("tenant-a", READ_SCOPES), &key).unwrap();
        assert_eq!(s.get("/fhir/Patient/a-pat-1", &token).await.status, 401);
    }
    assert_eq!(s.issuer.jwks_fetches(), fetches + 1, "unknown kids must not each trigger a JWKS fetch");
}

/// Opaque tokens through RFC 7662 introspection: the tenant comes from the answer, an active answer is cached, a
/// revoked token stops working once the cache bound passes, and an unknown one never authenticates.
#[tokio::test]
async fn opaque_tokens_are_introspected() {
    let mut s = stack().await;
    let secret = s.world.path("introspection.secret");
    std::fs::write(&secret, fhirgw_e2e::issuer::INTROSPECTION_SECRET).unwrap();
    let idp = s.issuer.introspecting_provider(secret.to_str().unwrap());
    let put = api::PutIdentityProviderRequest { identity_provider: Some(idp), expected_version: String::new() };
    let revision: u64 =
        s.admin.put_identity_provider(put).await.unwrap().into_inner().meta.unwrap().version.parse().unwrap();
    fixtures::wait_in_sync(&s.admin, 1, revision).await;

    let a = s.issuer.opaque_token("tenant-a", READ_SCOPES);
    let b = s.issuer.opaque_token("tenant-b", READ_SCOPES);
    assert_eq!(s.get("/fhir/Patient/a-pat-1", &a).await.status, 200);
    assert_only_tenant(&s.get("/fhir/Patient", &a).await, "a-");
    assert_only_tenant(&s.get("/fhir/Patient", &b).await, "b-");
    assert_eq!(s.get("/fhir/Patient/a-pat-1", &b).await.status, 404, "tenant-b's opaque token reads tenant-a");
    let calls = s.issuer.introspections();
    assert_eq!(calls, 2, "one introspection per token, then the cache");
    for _ in 0..5 {
        assert_eq!(s.get("/fhir/Patient/a-pat-1", &a).await.status, 200);
    }
    assert_eq!(s.issuer.introspections(), calls, "an active answer is reused until exp");

    // Never seen, revoked before first use, or with a tenant that does not exist: 401 invalid_token.
    let revoked = s.issuer.opaque_token("tenant-a", READ_SCOPES);
    s.issuer.revoke(&revoked);
    let unknown_tenant = s.issuer.opaque_token("tenant-z", READ_SCOPES);
    for (what, token) in
        [("unknown", "opaque-0000"), ("revoked", revoked.as_str()), ("unknown tenant", &unknown_tenant)]
    {
        let r = s.get("/fhir/Patient/a-pat-1", token).await;
        assert_eq!(r.status, 401, "{what}: {}", r.text());
        assert!(r.headers["www-authenticate"].to_str().unwrap().contains("invalid_token"), "{what}");
    }
    // JWTs of this issuer now need introspection too (it has no JWKS any more); a JWT is not in its table.
    assert_eq!(s.get("/fhir/Patient/a-pat-1", &s.a).await.status, 401);

    // A gateway whose client secret is wrong cannot introspect: that is the gateway's fault, so 503, never a 200.
    std::fs::write(&secret, "wrong-secret").unwrap();
    let fresh = s.issuer.opaque_token("tenant-a", READ_SCOPES);
    let r = s.get("/fhir/Patient/a-pat-1", &fresh).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.headers.contains_key("retry-after"));
}

/// A verified JWT is cached, but only against the identity provider's settings it was verified with: changing the
/// provider (here: its audience) refuses the same token on the next request, with no restart.
#[tokio::test]
async fn cached_verification_follows_provider_changes() {
    let mut s = stack().await;
    for _ in 0..3 {
        assert_eq!(s.get("/fhir/Patient/a-pat-1", &s.a).await.status, 200);
    }
    let mut idp = s.issuer.identity_provider();
    idp.audiences = vec!["https://elsewhere.example/fhir".into()];
    let put = api::PutIdentityProviderRequest { identity_provider: Some(idp), expected_version: String::new() };
    let revision: u64 =
        s.admin.put_identity_provider(put).await.unwrap().into_inner().meta.unwrap().version.parse().unwrap();
    fixtures::wait_in_sync(&s.admin, 1, revision).await;
    let r = s.get("/fhir/Patient/a-pat-1", &s.a).await;
    assert_eq!(r.status, 401, "a token cached under the old audience still works: {}", r.text());
}

/// SMART `patient/` scopes: the token's `patient` claim confines every read and search to that patient's
/// compartment, on top of the tenant's grants (never instead of them).
#[tokio::test]
async fn patient_scopes_confine_to_the_compartment() {
    let s = stack().await;
    let token = |patient: Option<&str>, scope: &str| {
        let mut claims = s.issuer.claims("tenant-a", scope);
        if let Some(p) = patient {
            claims["patient"] = json!(p);
        }
        sign(Key::Rsa, &claims)
    };
    let p1 = token(Some("a-pat-1"), "launch/patient patient/*.rs");
    let ids = |r: &common::Reply| r.ids();

    assert_eq!(s.get("/fhir/Patient/a-pat-1", &p1).await.status, 200);
    let other = s.get("/fhir/Patient/a-pat-2", &p1).await;
    let missing = s.get("/fhir/Patient/nope", &p1).await;
    assert_eq!((other.status, missing.status), (404, 404));
    assert_eq!(other.json()["issue"], missing.json()["issue"], "another patient must look missing");
    assert_eq!(s.get("/fhir/Observation/a-obs-3", &p1).await.status, 404, "a-pat-2's observation");
    assert_eq!(s.get("/fhir/Observation/a-obs-1", &p1).await.status, 200);

    // Searches: only the patient's own, never another tenant's record about the same patient (b-obs-cross).
    let r = s.get("/fhir/Observation", &p1).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let mut got = ids(&r);
    got.sort();
    assert_eq!(got, ["Observation/a-obs-1", "Observation/a-obs-2"]);
    assert_eq!(ids(&s.get("/fhir/Patient", &p1).await), ["Patient/a-pat-1"]);
    assert_eq!(ids(&s.get("/fhir/Condition", &p1).await), ["Condition/a-cond-1"]);
    // Asking for another patient explicitly narrows to nothing rather than widening.
    assert!(ids(&s.get("/fhir/Observation?subject=Patient/a-pat-2", &p1).await).is_empty());
    // Includes and $everything are checked entry by entry.
    let r = s.get("/fhir/Observation?_include=Observation:subject&_count=50", &p1).await;
    assert!(
        ids(&r).iter().all(|id| id.ends_with("a-obs-1") || id.ends_with("a-obs-2") || id == "Patient/a-pat-1"),
        "{:?}",
        ids(&r)
    );
    let r = s.get("/fhir/Patient/a-pat-1/$everything", &p1).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!ids(&r).is_empty());
    for id in ids(&r) {
        assert!(!id.starts_with("Observation/a-obs-3") && !id.contains("b-"), "{id} is outside the compartment");
    }
    assert_eq!(s.get("/fhir/Patient/a-pat-2/$everything", &p1).await.status, 404);
    assert_eq!(s.get("/fhir/Patient/a-pat-2/_history", &p1).await.status, 404);

    // The tenant's grants still apply: a patient claim naming another tenant's patient sees nothing.
    let foreign = token(Some("b-pat-1"), "patient/*.rs");
    assert_eq!(s.get("/fhir/Patient/b-pat-1", &foreign).await.status, 404);
    assert!(ids(&s.get("/fhir/Observation", &foreign).await).is_empty());

    // Refused: no patient claim, types outside the compartment, and writes.
    let r = s.get("/fhir/Observation", &token(None, "patient/*.rs")).await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(s.get("/fhir/Practitioner", &p1).await.status, 403);
    let write = token(Some("a-pat-1"), "patient/*.cruds");
    let r = s
        .send(http().post(s.url("/fhir/Observation")).bearer_auth(&write).json(&json!({
            "resourceType": "Observation", "status": "final", "code": {"text": "x"},
            "subject": {"reference": "Patient/a-pat-1"}})))
        .await;
    assert_eq!(r.status, 403, "{}", r.text());
}

/// Case 4: a system-level search is narrowed like a type search: `_type` is required and scope-checked, the tenant's
/// `_tag` is added, every entry verified, and its pages are signed and bound to the tenant.
#[tokio::test]
async fn system_searches_are_narrowed() {
    let s = stack().await;
    let r = s.get("/fhir?_type=Patient,Observation&_count=50", &s.a).await;
    assert_only_tenant(&r, "a-");
    let ids = r.ids();
    assert!(
        ids.iter().any(|id| id.starts_with("Patient/")) && ids.iter().any(|id| id.starts_with("Observation/")),
        "{ids:?}"
    );
    assert!(!ids.contains(&"Observation/b-obs-cross".to_owned()));
    // POST [base]/_search, the same.
    let r = s
        .send(http().post(s.url("/fhir/_search")).bearer_auth(&s.b).form(&[("_type", "Patient"), ("_count", "50")]))
        .await;
    assert_only_tenant(&r, "b-");
    assert!(!r.ids().is_empty());
    // Asking for the other tenant's tag narrows to nothing.
    let r = s.get("/fhir?_type=Patient&_tag=https://fhirgw.dev/dataset|tenant-b", &s.a).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.ids().is_empty(), "{:?}", r.ids());
    // Pages: signed, followed through the gateway, refused to the other tenant.
    let r = s.get("/fhir?_type=Observation&_count=1", &s.a).await;
    assert_only_tenant(&r, "a-");
    let next = r.json()["link"].as_array().unwrap().iter().find(|l| l["relation"] == "next").unwrap()["url"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = next.split_once(&s.dp.addr("fhir")).unwrap().1.to_owned();
    let page = s.get(&path, &s.a).await;
    assert_only_tenant(&page, "a-");
    assert_eq!(page.ids().len(), 1);
    assert_ne!(page.ids(), r.ids());
    assert_eq!(s.get(&path, &s.b).await.status, 400, "tenant-b replayed tenant-a's page");
    // Without _type, with a bad type, or with a type the scopes do not cover: refused before the upstream.
    let before = s.upstream_requests().await.len();
    assert_eq!(s.get("/fhir?name=x", &s.a).await.status, 400);
    assert_eq!(s.get("/fhir?_type=patient", &s.a).await.status, 400);
    let observations_only = s.issuer.token("tenant-a", "user/Observation.rs");
    assert_eq!(s.get("/fhir?_type=Observation,Patient", &observations_only).await.status, 403);
    assert_eq!(s.upstream_requests().await.len(), before, "a refused system search reached the upstream");
}

/// Cases 1, 7, 10: reads and vreads are verified; out-of-grant is indistinguishable from missing.
#[tokio::test]
async fn reads_are_verified_and_out_of_grant_looks_missing() {
    let s = stack().await;
    let own = s.get("/fhir/Patient/a-pat-1", &s.a).await;
    assert_eq!(own.status, 200);
    assert_eq!(own.json()["id"], "a-pat-1");

    let missing = s.get("/fhir/Patient/does-not-exist", &s.a).await;
    assert_eq!(missing.status, 404);
    let version = s.upstream("/Patient/b-pat-1").await["meta"]["versionId"].as_str().unwrap().to_owned();
    let etag = format!("W/\"{version}\"");
    let attempts: Vec<(&str, reqwest::RequestBuilder)> = vec![
        ("read another tenant's patient", http().get(s.url("/fhir/Patient/b-pat-1")).bearer_auth(&s.a)),
        ("read an untagged resource", http().get(s.url("/fhir/Practitioner/untagged-prac-1")).bearer_auth(&s.a)),
        (
            "vread another tenant's patient",
            http().get(s.url(&format!("/fhir/Patient/b-pat-1/_history/{version}"))).bearer_auth(&s.a),
        ),
        (
            "read with a matching If-None-Match (a 304 would confirm the version)",
            http().get(s.url("/fhir/Patient/b-pat-1")).bearer_auth(&s.a).header("if-none-match", &etag),
        ),
        (
            "read with If-Modified-Since",
            http()
                .get(s.url("/fhir/Patient/b-pat-1"))
                .bearer_auth(&s.a)
                .header("if-modified-since", "Sat, 01 Jan 2000 00:00:00 GMT"),
        ),
        ("read the percent-encoded id", http().get(s.url("/fhir/Patient/%62-pat-1")).bearer_auth(&s.a)),
        ("history of another tenant's patient", http().get(s.url("/fhir/Patient/b-pat-1/_history")).bearer_auth(&s.a)),
        (
            "$everything of another tenant's patient",
            http().get(s.url("/fhir/Patient/b-pat-1/$everything")).bearer_auth(&s.a),
        ),
        (
            "%24everything of another tenant's patient",
            http().get(s.url("/fhir/Patient/b-pat-1/%24everything")).bearer_auth(&s.a),
        ),
        (
            "history of a patient that does not exist",
            http().get(s.url("/fhir/Patient/nope/_history")).bearer_auth(&s.a),
        ),
        (
            "$everything of a patient that does not exist",
            http().get(s.url("/fhir/Patient/nope/$everything")).bearer_auth(&s.a),
        ),
    ];
    for (what, request) in attempts {
        let r = s.send(request).await;
        assert_eq!(r.status, 404, "{what}: {}", r.text());
        assert_eq!(r.body, missing.body, "{what}: the body must match a missing resource's byte for byte");
        assert_eq!(r.headers.get("etag"), None, "{what}");
    }
    // HEAD: same status, no body, no validators.
    let r = s.send(http().head(s.url("/fhir/Patient/b-pat-1")).bearer_auth(&s.a)).await;
    assert_eq!((r.status, r.body.len()), (404, 0));
    let r = s.send(http().head(s.url("/fhir/Patient/a-pat-1")).bearer_auth(&s.a)).await;
    assert_eq!(r.status, 200);
    // A conditional read of one's own resource still gets the resource (verified), never a bare 304 from upstream.
    let own_version = s.upstream("/Patient/a-pat-1").await["meta"]["versionId"].as_str().unwrap().to_owned();
    let r = s
        .send(
            http()
                .get(s.url("/fhir/Patient/a-pat-1"))
                .bearer_auth(&s.a)
                .header("if-none-match", format!("W/\"{own_version}\"")),
        )
        .await;
    assert_eq!(r.status, 200);
    // Response shaping that hides meta makes a resource invisible rather than unverified.
    let r = s.get("/fhir/Patient/a-pat-1?_elements=name", &s.a).await;
    assert!(r.status == 200 || r.status == 404, "{}", r.text());
    if r.status == 200 {
        assert!(r.json()["meta"]["tag"].is_array());
    }
    // XML is refused rather than passed unverified.
    for request in [
        http().get(s.url("/fhir/Patient/a-pat-1?_format=xml")).bearer_auth(&s.a),
        http().get(s.url("/fhir/Patient/a-pat-1")).bearer_auth(&s.a).header("accept", "application/fhir+xml"),
    ] {
        assert_eq!(s.send(request).await.status, 406);
    }
}

/// Cases 2, 3, 4, 7: searches are narrowed, includes filtered, joins refused, other shapes denied.
#[tokio::test]
async fn searches_are_narrowed_and_joins_refused() {
    let s = stack().await;
    let r = s.get("/fhir/Patient", &s.a).await;
    assert_only_tenant(&r, "a-");
    assert_eq!(r.ids().len(), 3);
    // The caller's own _tag constrains further, never replaces.
    let r = s.get("/fhir/Patient?_tag=https://fhirgw.dev/dataset|tenant-b", &s.a).await;
    assert_eq!(r.status, 200);
    assert!(r.ids().is_empty(), "{}", r.text());
    let r = s.get("/fhir/Observation?_tag:not=https://fhirgw.dev/dataset|tenant-a", &s.a).await;
    assert_only_tenant(&r, "a-");

    // _revinclude pulls tenant-b's observation about a-pat-1: it must be dropped.
    let r = s.get("/fhir/Patient?_id=a-pat-1&_revinclude=Observation:subject", &s.a).await;
    assert_only_tenant(&r, "a-");
    assert!(r.ids().contains(&"Patient/a-pat-1".to_owned()));
    let upstream = s.upstream("/Patient?_id=a-pat-1&_revinclude=Observation:subject").await;
    assert!(
        upstream.to_string().contains("b-obs-cross"),
        "the attack must be real: upstream returns the cross-tenant entry"
    );
    // _include from tenant-b's cross observation would pull tenant-a's patient for tenant-b.
    let r = s.get("/fhir/Observation?_id=b-obs-cross&_include=Observation:subject", &s.b).await;
    assert_only_tenant(&r, "b-");
    let r = s.get("/fhir/Observation?_include:iterate=Observation:subject&_revinclude=Observation:subject", &s.b).await;
    assert_only_tenant(&r, "b-");

    // Joins that could act as an oracle are refused outright.
    for q in [
        "/fhir/Observation?subject:Patient.name=Garcia",
        "/fhir/Observation?subject.name=Garcia",
        "/fhir/Patient?_has:Observation:subject:code=1234",
        "/fhir/Patient?_filter=name%20eq%20Garcia",
        "/fhir/Patient?_list=123",
        "/fhir/Patient?_query=custom",
        "/fhir/Patient?_contained=true",
        "/fhir/Patient?_getpages=abc",
        "/fhir/Patient?_whatever=1",
    ] {
        let r = s.get(q, &s.a).await;
        assert_eq!(r.status, 400, "{q}: {}", r.text());
        assert_eq!(r.json()["resourceType"], "OperationOutcome");
    }
    assert_eq!(s.get("/fhir/Patient?_format=xml", &s.a).await.status, 406);

    // _summary=count counts only the tenant's resources; _elements that drop meta hide entries rather than leak.
    let r = s.get("/fhir/Observation?_summary=count", &s.a).await;
    assert_eq!(r.status, 200);
    let own = s.get("/fhir/Observation?_count=100", &s.a).await.ids().len();
    assert_eq!(r.json()["total"], json!(own), "{}", r.text());
    let r = s.get("/fhir/Patient?_elements=name", &s.a).await;
    assert_only_tenant(&r, "a-");

    // POST _search with a form body is narrowed the same way, and checked the same way.
    let r = s
        .send(
            http()
                .post(s.url("/fhir/Patient/_search"))
                .bearer_auth(&s.a)
                .form(&[("_tag", "https://fhirgw.dev/dataset|tenant-b")]),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.ids().is_empty());
    let r = s.send(http().post(s.url("/fhir/Patient/_search")).bearer_auth(&s.a).form(&[("name", "Garcia")])).await;
    assert_only_tenant(&r, "a-");
    let r = s
        .send(
            http()
                .post(s.url("/fhir/Patient/_search"))
                .bearer_auth(&s.a)
                .form(&[("_has:Observation:subject:code", "x")]),
        )
        .await;
    assert_eq!(r.status, 400);

    // Compartment searches: the focal patient is verified first (another tenant's patient looks missing), then the
    // search is narrowed like any other, so another tenant's record about this patient (b-obs-cross) stays hidden.
    let r = s.get("/fhir/Patient/a-pat-1/Observation", &s.a).await;
    let mut got = r.ids();
    got.sort();
    assert_eq!(got, ["Observation/a-obs-1", "Observation/a-obs-2"], "{}", r.text());
    let foreign = s.get("/fhir/Patient/b-pat-1/Observation", &s.a).await;
    let missing = s.get("/fhir/Patient/nope/Observation", &s.a).await;
    assert_eq!((foreign.status, missing.status), (404, 404), "{}", foreign.text());
    assert_eq!(foreign.json()["issue"], missing.json()["issue"]);
    assert_eq!(s.get("/fhir/Patient/a-pat-1/Practitioner", &s.a).await.status, 403);

    // Request shapes that carry searches or writes the gateway does not verify yet are refused, not forwarded.
    let before = s.upstream_requests().await.len();
    let denied: Vec<(&str, reqwest::RequestBuilder)> = vec![
        (
            "compartment search outside the Patient compartment",
            http().get(s.url("/fhir/Group/g1/Observation")).bearer_auth(&s.a),
        ),
        ("system history", http().get(s.url("/fhir/_history")).bearer_auth(&s.a)),
        (
            "transaction carrying a compartment search",
            http().post(s.url("/fhir")).bearer_auth(&s.a).json(
                &json!({"resourceType": "Bundle", "type": "transaction", "entry": [
                    {"request": {"method": "GET", "url": "Patient/b-pat-1/Observation"}},
                ]}),
            ),
        ),
        (
            "update",
            http()
                .put(s.url("/fhir/Patient/b-pat-1"))
                .bearer_auth(&s.a)
                .json(&json!({"resourceType": "Patient", "id": "b-pat-1"})),
        ),
        ("create", http().post(s.url("/fhir/Patient")).bearer_auth(&s.a).json(&json!({"resourceType": "Patient"}))),
        ("delete", http().delete(s.url("/fhir/Patient/b-pat-1")).bearer_auth(&s.a)),
        ("$meta-add", http().post(s.url("/fhir/Patient/$meta-add")).bearer_auth(&s.a)),
    ];
    for (what, request) in denied {
        let r = s.send(request).await;
        assert!(r.status == 403 || r.status == 404 || r.status == 405, "{what}: {} {}", r.status, r.text());
        assert_eq!(r.json()["resourceType"], "OperationOutcome", "{what}");
    }
    // Bulk export has its own handler (tests/tests/handlers.rs): without `Prefer: respond-async` it is refused too,
    // and a POST kick-off without its `Parameters` body is refused before anything is sent.
    let r = s.get("/fhir/Patient/$export", &s.a).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["resourceType"], "OperationOutcome");
    let r =
        s.send(http().post(s.url("/fhir/Patient/$export")).bearer_auth(&s.a).header("prefer", "respond-async")).await;
    assert_eq!(r.status, 415, "{}", r.text());
    assert_eq!(r.json()["resourceType"], "OperationOutcome");
    assert_eq!(s.upstream_requests().await.len(), before, "a refused request reached the upstream");
}

/// Case 1: history and $everything are filtered entry by entry, and totals do not reveal unfiltered counts.
#[tokio::test]
async fn history_and_everything_are_filtered() {
    let s = stack().await;
    let upstream = s.upstream("/Patient/a-pat-1/$everything").await;
    assert!(upstream.to_string().contains("b-obs-cross"), "the attack must be real");
    let r = s.get("/fhir/Patient/a-pat-1/$everything", &s.a).await;
    assert_only_tenant(&r, "a-");
    let ids = r.ids();
    assert!(ids.contains(&"Patient/a-pat-1".into()) && ids.contains(&"Observation/a-obs-1".into()), "{ids:?}");
    if let Some(total) = r.json().get("total") {
        assert_eq!(total, &json!(ids.len()));
    }
    assert!(!r.text().contains(s.fhir.ready["base_url"].as_str().unwrap()), "upstream URLs leaked: {}", r.text());

    // (Type-level history is filtered the same way; the test FHIR server does not implement it.)
    let r = s.get("/fhir/Patient/a-pat-1/_history", &s.a).await;
    assert_only_tenant(&r, "a-");
}

/// Case 6: page links are the gateway's own, signed, bound to the tenant, and re-verified when followed.
#[tokio::test]
async fn page_links_are_signed_and_bound_to_the_tenant() {
    let mut s = stack().await;
    let first = s.get("/fhir/Observation?_count=1", &s.a).await;
    assert_only_tenant(&first, "a-");
    let bundle = first.json();
    let next = bundle["link"].as_array().unwrap().iter().find(|l| l["relation"] == "next").expect("a next link")["url"]
        .as_str()
        .unwrap()
        .to_owned();
    let upstream_base = s.fhir.ready["base_url"].as_str().unwrap().to_owned();
    assert!(!next.contains(&upstream_base) && next.contains("_page="), "{next}");
    let path = next.split_once(s.dp.addr("fhir").as_str()).map(|(_, p)| p.to_owned()).unwrap_or_else(|| {
        // Links are built on the Host the client used.
        next.split_once("/fhir/").map(|(_, p)| format!("/fhir/{p}")).unwrap()
    });

    let second = s.get(&path, &s.a).await;
    assert_only_tenant(&second, "a-");
    assert_eq!(second.ids().len(), 1);
    assert_ne!(second.ids(), first.ids());

    // Another tenant replaying the link, a tampered token, and a token moved to another path all fail.
    assert_eq!(s.get(&path, &s.b).await.status, 400);
    let tampered = path.replacen("_page=", "_page=x", 1);
    assert_eq!(s.get(&tampered, &s.a).await.status, 400);
    let moved = path.replacen("/fhir/Observation", "/fhir/Patient", 1);
    assert_eq!(s.get(&moved, &s.a).await.status, 400);
    // An upstream paging link is useless through the gateway.
    assert_eq!(s.get("/fhir/Observation?_getpages=anything", &s.a).await.status, 400);

    // After the grant is revoked, the same link shows nothing of the revoked dataset.
    let key = api::DeleteGrantRequest {
        tenant: "tenant-a".into(),
        tag: Some(fixtures::tag("tenant-a")),
        expected_version: String::new(),
    };
    s.admin.delete_grant(key).await.unwrap();
    let dp = &s.dp;
    eventually("revocation applied", Duration::from_secs(20), || async move {
        let cfg = dp_config(dp).await;
        (cfg["last_rejection"].is_null() && cfg["received"]["responses"].as_u64() > Some(0)).then_some(())
    })
    .await;
    let a = s.a.clone();
    let after = eventually("the page shows nothing once revoked", Duration::from_secs(20), || {
        let s = &s;
        let path = path.clone();
        let a = a.clone();
        async move {
            let r = s.get(&path, &a).await;
            (r.status == 200 && r.ids().is_empty()).then_some(r)
        }
    })
    .await;
    assert!(after.ids().is_empty());
}

/// Case 8: the client's credentials and internal headers never reach the upstream; irregular paths are refused.
#[tokio::test]
async fn headers_and_paths_cannot_be_smuggled() {
    let s = stack().await;
    let before = s.upstream_requests().await.len();
    let r = s
        .send(
            http()
                .get(s.url("/fhir/Patient/a-pat-1"))
                .bearer_auth(&s.a)
                .header("x-forwarded-host", "evil.example")
                .header("forwarded", "for=1.2.3.4;host=evil.example")
                .header("x-tenant", "tenant-b")
                .header("cookie", "session=stolen"),
        )
        .await;
    assert_eq!(r.status, 200);
    let log = s.upstream_requests().await;
    let sent = &log[before..];
    assert!(!sent.is_empty());
    for request in sent {
        let headers = &request["headers"];
        assert_eq!(headers["authorization"], json!(format!("Bearer {UPSTREAM_TOKEN}")), "{request}");
        for name in ["x-forwarded-host", "forwarded", "x-tenant", "cookie"] {
            assert!(headers.get(name).is_none(), "{name} reached the upstream: {request}");
        }
    }
    for path in [
        "/fhir/Patient/../Patient/b-pat-1",
        "/fhir/Patient/%2e%2e/Patient/b-pat-1",
        "/fhir/Patient%2Fb-pat-1",
        "/fhir//Patient/b-pat-1",
        "/fhir/Patient/./b-pat-1",
    ] {
        let r = s.get(path, &s.a).await;
        assert!(r.status == 400 || r.status == 404, "{path}: {}", r.status);
        assert!(!r.text().contains("b-pat-1\""), "{path}: {}", r.text());
    }
}

/// Case 11: a revoked grant stops working; an expiring grant stops at its expiry with no push.
#[tokio::test]
async fn revoked_and_expired_grants_stop_working() {
    let mut s = stack().await;
    assert_eq!(s.get("/fhir/Patient/b-pat-1", &s.b).await.status, 200);
    let key = api::DeleteGrantRequest {
        tenant: "tenant-b".into(),
        tag: Some(fixtures::tag("tenant-b")),
        expected_version: String::new(),
    };
    s.admin.delete_grant(key).await.unwrap();
    let b = s.b.clone();
    eventually("revocation reaches the data plane", Duration::from_secs(20), || {
        let s = &s;
        let b = b.clone();
        async move { (s.get("/fhir/Patient/b-pat-1", &b).await.status == 404).then_some(()) }
    })
    .await;
    assert!(s.get("/fhir/Patient", &s.b).await.ids().is_empty());

    // A grant that expires in two seconds: works, then stops at its expiry with no push in between.
    let mut expiring = grant("tenant-b", "tenant-b");
    expiring.expires_at = Some(prost_types::Timestamp { seconds: (now() + 2) as i64, nanos: 0 });
    let put = s
        .admin
        .put_grant(api::PutGrantRequest { grant: Some(expiring), expected_version: String::new() })
        .await
        .unwrap();
    let revision: u64 = put.into_inner().meta.unwrap().version.parse().unwrap();
    let dp = &s.dp;
    eventually("expiring grant applied", Duration::from_secs(20), || async move {
        (dp_config(dp).await["system_version"].as_u64() >= Some(revision)).then_some(())
    })
    .await;
    assert_eq!(s.get("/fhir/Patient/b-pat-1", &s.b).await.status, 200);
    let received = dp_config(&s.dp).await["received"].clone();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let b = s.issuer.token("tenant-b", READ_SCOPES);
    assert_eq!(s.get("/fhir/Patient/b-pat-1", &b).await.status, 404);
    assert!(s.get("/fhir/Patient", &b).await.ids().is_empty());
    assert_eq!(dp_config(&s.dp).await["received"], received, "expiry must not depend on a push");
    let _ = AUDIENCE;
}

/// Case 11: a data plane cut off from the control plane for longer than the grant TTL fails closed on grants, keeps
/// serving what needs no grant, and recovers when the control plane is back.
#[tokio::test]
async fn cut_off_data_plane_fails_closed_on_grants_after_the_ttl() {
    let mut s = stack_with(&["--heartbeat-secs", "1"], &["--grant-ttl-secs", "3"]).await;
    // Heartbeats keep a healthy data plane confirmed well past the TTL.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(s.get("/fhir/Patient/a-pat-1", &s.a).await.status, 200);

    let port = s.cp.addr("grpc").rsplit(':').next().unwrap().to_owned();
    s.cp.kill().await;
    assert_eq!(s.get("/fhir/Patient/a-pat-1", &s.a).await.status, 200, "within the TTL the last grants still hold");
    let a = s.a.clone();
    let stale = eventually("grants fail closed after the TTL", Duration::from_secs(20), || {
        let s = &s;
        let a = a.clone();
        async move {
            let r = s.get("/fhir/Patient/a-pat-1", &a).await;
            (r.status == 503).then_some(r)
        }
    })
    .await;
    assert!(stale.headers.get("retry-after").is_some());
    assert_eq!(stale.json()["resourceType"], "OperationOutcome");
    assert_eq!(s.get("/fhir/Patient", &s.a).await.status, 503);
    assert_eq!(s.send(http().get(s.url("/fhir/metadata"))).await.status, 200, "routes stay last-known-good");

    let _cp =
        s.world.control_plane_args("cp-back", "cp.db", &format!("127.0.0.1:{port}"), &["--heartbeat-secs", "1"]).await;
    eventually("grants confirmed again", Duration::from_secs(30), || {
        let s = &s;
        let a = a.clone();
        async move { (s.get("/fhir/Patient/a-pat-1", &a).await.status == 200).then_some(()) }
    })
    .await;
}
