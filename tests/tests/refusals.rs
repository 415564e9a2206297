//! Why was I refused? The access log (one line per request, with a reason code for refusals, and nothing that names
//! a token, a patient or a query value) and the 401s that say which check failed, through a real data plane.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Stack, stack_with};
use fhirgw_e2e::fixtures::{self, READ_SCOPES};
use fhirgw_e2e::issuer::{Key, now, sign};
use fhirgw_e2e::{eventually, http};
use fhirgw_proto::admin::v1 as api;
use serde_json::{Value, json};

/// The access lines in the data plane's JSON log (their `fields`).
fn access_lines(s: &Stack) -> Vec<Value> {
    std::fs::read_to_string(&s.dp.log)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["target"] == "fhirgw::access")
        .map(|l| l["fields"].clone())
        .collect()
}

/// Waits for the access line of the request with trace id `trace` (written when the response body ends, which may
/// be a moment after the client has read it).
async fn line_of(s: &Stack, trace: &str) -> Value {
    eventually(&format!("the access line of trace {trace}"), Duration::from_secs(10), || async {
        access_lines(s).into_iter().find(|l| l["trace_id"] == trace)
    })
    .await
}

/// What, token, path, status, route id, reason code.
type Case<'a> = (&'a str, &'a str, &'a str, u16, &'a str, Option<&'a str>);

fn traceparent(n: u8) -> (String, String) {
    let trace = format!("{n:02x}{}", "5a".repeat(15));
    (trace.clone(), format!("00-{trace}-00f067aa0ba902b7-01"))
}

#[tokio::test]
async fn the_access_log_says_who_was_refused_and_why_and_names_no_patient() {
    let s = stack_with(&[], &["--log-format", "json"]).await;
    let claims = |f: &dyn Fn(&mut Value)| {
        let mut c = s.issuer.claims("tenant-a", READ_SCOPES);
        c["client_id"] = json!("app-a");
        f(&mut c);
        c
    };
    let good = sign(Key::Rsa, &claims(&|_| {}));
    let expired = sign(Key::Rsa, &claims(&|c| c["exp"] = json!(now() - 120)));
    let no_scope = sign(Key::Rsa, &claims(&|c| c["scope"] = json!("openid profile")));
    let query_value = "q-value-7f3a9c";
    let search = format!("/fhir/Observation?subject=Patient/a-pat-2&code={query_value}");
    #[rustfmt::skip]
    let cases: [Case; 5] = [
        // what, token, path, status, route, reason
        ("read", &good, "/fhir/Patient/a-pat-1", 200, "instance", None),
        ("search", &good, &search, 200, "type", None),
        ("expired", &expired, "/fhir/Patient/a-pat-1", 401, "_none", Some("token_expired")),
        ("no scope", &no_scope, "/fhir/Patient/a-pat-1", 403, "instance", Some("forbidden")),
        ("other tenant's", &good, "/fhir/Patient/b-pat-1", 404, "instance", Some("not_found")),
    ];
    for (n, (what, token, path, status, route, reason)) in cases.iter().enumerate() {
        let (trace, header) = traceparent(n as u8 + 1);
        let r = s.send(http().get(s.url(path)).bearer_auth(token).header("traceparent", header)).await;
        assert_eq!(r.status, *status, "{what}: {}", r.text());
        let line = line_of(&s, &trace).await;
        assert_eq!(line["message"], "access", "{what}: {line}");
        assert_eq!(line["method"], "GET", "{what}: {line}");
        assert_eq!(line["route"], *route, "{what}: {line}");
        assert_eq!(line["status"], *status, "{what}: {line}");
        assert_eq!(line["bytes"].as_u64(), Some(r.body.len() as u64), "{what}: {line}");
        assert!(line["duration_ms"].as_f64().is_some_and(|d| d > 0.0), "{what}: {line}");
        match reason {
            Some(reason) => assert_eq!(line["reason"], *reason, "{what}: {line}"),
            None => assert!(line.get("reason").is_none(), "{what}: {line}"),
        }
        if *status == 401 {
            // Not authenticated: no tenant, no client.
            assert!(line.get("tenant").is_none() && line.get("client_id").is_none(), "{what}: {line}");
        } else {
            assert_eq!(line["tenant"], "tenant-a", "{what}: {line}");
            assert_eq!(line["client_id"], "app-a", "{what}: {line}");
        }
    }
    // No token: its own reason, no trace needed to find it.
    let r = s.send(http().get(s.url("/fhir/Patient/a-pat-1"))).await;
    assert_eq!(r.status, 401);
    eventually("the access line of a request without a token", Duration::from_secs(10), || async {
        access_lines(&s).into_iter().find(|l| l["reason"] == "token_missing" && l["status"] == 401)
    })
    .await;

    // Nothing anywhere in the log (access lines or any other, at the harness's debug level) names a token, a
    // patient, or a query value.
    let log = std::fs::read_to_string(&s.dp.log).unwrap();
    for (what, secret) in [
        ("a token", good.as_str()),
        ("an expired token", expired.as_str()),
        ("a token without scopes", no_scope.as_str()),
        ("a token's signature", good.rsplit('.').next().unwrap()),
        ("a patient id", "a-pat-1"),
        ("a patient id", "a-pat-2"),
        ("another tenant's patient id", "b-pat-1"),
        ("a query value", query_value),
    ] {
        assert!(!log.contains(secret), "the data plane's log names {what} ({secret}):\n{log}");
    }
}

#[tokio::test]
async fn access_log_off_and_sampled() {
    // Sampling at 0 keeps no complete 2xx response, but every refusal.
    let s = stack_with(&[], &["--log-format", "json", "--access-log", "sample=0"]).await;
    for n in 1..=3u8 {
        let (_, header) = traceparent(n);
        assert_eq!(
            s.send(http().get(s.url("/fhir/Patient/a-pat-1")).bearer_auth(&s.a).header("traceparent", header))
                .await
                .status,
            200
        );
    }
    let (refused, header) = traceparent(9);
    let r = s.send(http().get(s.url("/fhir/Patient/b-pat-1")).bearer_auth(&s.a).header("traceparent", header)).await;
    assert_eq!(r.status, 404);
    line_of(&s, &refused).await;
    assert!(access_lines(&s).iter().all(|l| l["status"] != 200), "{:?}", access_lines(&s));

    let off = stack_with(&[], &["--log-format", "json", "--access-log", "off"]).await;
    let (trace, header) = traceparent(4);
    let r =
        off.send(http().get(off.url("/fhir/Patient/b-pat-1")).bearer_auth(&off.a).header("traceparent", header)).await;
    assert_eq!(r.status, 404);
    // The request's own log lines show it was handled; no access line follows it.
    eventually("the data plane logged the request", Duration::from_secs(10), || async {
        std::fs::read_to_string(&off.dp.log).unwrap().contains(&trace).then_some(())
    })
    .await;
    assert!(access_lines(&off).is_empty(), "{:?}", access_lines(&off));
}

/// Every kind of invalid token gets a 401 saying which check failed, in the OperationOutcome and in the challenge's
/// `error_description`, with `error="invalid_token"` kept; the access log has the matching reason code.
#[tokio::test]
async fn a_401_says_which_check_failed() {
    let mut s = stack_with(&[], &["--log-format", "json"]).await;
    let claims = |f: &dyn Fn(&mut Value)| {
        let mut c = s.issuer.claims("tenant-a", READ_SCOPES);
        f(&mut c);
        c
    };
    let b64 = |v: &Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let without = |claim: &'static str| {
        sign(
            Key::Rsa,
            &claims(&|c| {
                c.as_object_mut().unwrap().remove(claim);
            }),
        )
    };
    let cases: Vec<(&str, Option<String>, &str, &str)> = vec![
        // what, token (None: HTTP Basic), code, words the client reads
        ("expired", Some(sign(Key::Rsa, &claims(&|c| c["exp"] = json!(now() - 120)))), "token_expired", "has expired"),
        (
            "not yet valid",
            Some(sign(Key::Rsa, &claims(&|c| c["nbf"] = json!(now() + 600)))),
            "token_not_yet_valid",
            "not valid yet",
        ),
        (
            "wrong audience",
            Some(sign(Key::Rsa, &claims(&|c| c["aud"] = json!("https://other.example/fhir")))),
            "token_wrong_audience",
            "not meant for this server",
        ),
        ("no audience", Some(without("aud")), "token_wrong_audience", "not meant for this server"),
        (
            "unknown tenant",
            Some(sign(Key::Rsa, &claims(&|c| c["tenant"] = json!("tenant-z")))),
            "token_unknown_tenant",
            "tenant this server does not know",
        ),
        ("no tenant", Some(without("tenant")), "token_no_tenant", "no tenant claim"),
        (
            "unknown issuer",
            Some(sign(Key::Rsa, &claims(&|c| c["iss"] = json!("https://elsewhere.example")))),
            "token_unknown_issuer",
            "No identity provider here",
        ),
        (
            "unpublished key",
            Some(sign(Key::Rotated, &claims(&|_| {}))),
            "token_signature",
            "signature or signing key is not recognised",
        ),
        (
            "tampered",
            Some({
                let t = sign(Key::Rsa, &claims(&|_| {}));
                let parts: Vec<&str> = t.split('.').collect();
                format!("{}.{}.{}", parts[0], b64(&claims(&|c| c["tenant"] = json!("tenant-b"))), parts[2])
            }),
            "token_signature",
            "signature or signing key is not recognised",
        ),
        ("no exp", Some(without("exp")), "token_malformed", "malformed"),
        (
            "no iss",
            Some(format!(
                "{}.{}.c2ln",
                b64(&json!({"alg": "RS256", "kid": "test-rsa"})),
                b64(&json!({"tenant": "tenant-a"}))
            )),
            "token_malformed",
            "malformed",
        ),
        ("opaque", Some("opaque-0123456789".into()), "token_opaque_unsupported", "not a JWT"),
        ("basic", None, "token_not_bearer", "Authorization: Bearer"),
    ];
    for (n, (what, token, code, words)) in cases.iter().enumerate() {
        let (trace, header) = traceparent(n as u8 + 0x10);
        let request = http().get(s.url("/fhir/Patient/a-pat-1")).header("traceparent", header);
        let request = match token {
            Some(token) => request.bearer_auth(token),
            None => request.basic_auth("tenant-a", Some("secret")),
        };
        let r = s.send(request).await;
        assert_eq!(r.status, 401, "{what}: {}", r.text());
        let diagnostics = r.json()["issue"][0]["diagnostics"].as_str().unwrap().to_owned();
        assert!(diagnostics.contains(words), "{what}: {diagnostics}");
        let challenge = r.headers["www-authenticate"].to_str().unwrap().to_owned();
        assert!(challenge.starts_with("Bearer realm=\"fhirgw\", error=\"invalid_token\", "), "{what}: {challenge}");
        let description = challenge.split("error_description=\"").nth(1).and_then(|d| d.strip_suffix('"')).unwrap();
        assert!(description.contains(words) && diagnostics.starts_with(description), "{what}: {challenge}");
        assert_eq!(line_of(&s, &trace).await["reason"], *code, "{what}");
    }

    // Introspection: a token the identity provider says is no longer active.
    let secret = s.world.path("introspection.secret");
    std::fs::write(&secret, fhirgw_e2e::issuer::INTROSPECTION_SECRET).unwrap();
    let idp = s.issuer.introspecting_provider(secret.to_str().unwrap());
    let put = api::PutIdentityProviderRequest { identity_provider: Some(idp), expected_version: String::new() };
    let revision: u64 =
        s.admin.put_identity_provider(put).await.unwrap().into_inner().meta.unwrap().version.parse().unwrap();
    fixtures::wait_in_sync(&s.admin, 1, revision).await;
    let revoked = s.issuer.opaque_token("tenant-a", READ_SCOPES);
    s.issuer.revoke(&revoked);
    let (trace, header) = traceparent(0x30);
    let r =
        s.send(http().get(s.url("/fhir/Patient/a-pat-1")).bearer_auth(&revoked).header("traceparent", header)).await;
    assert_eq!(r.status, 401, "{}", r.text());
    let challenge = r.headers["www-authenticate"].to_str().unwrap();
    assert!(challenge.contains("error=\"invalid_token\"") && challenge.contains("not active"), "{challenge}");
    assert_eq!(line_of(&s, &trace).await["reason"], "token_inactive");
}
