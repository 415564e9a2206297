//! Issue 5: every URL a client receives is the public one, from trusted proxies only; SMART discovery works.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{stack, stack_with};
use fhirgw_e2e::http;
use serde_json::{Value, json};

const LB: [(&str, &str); 3] =
    [("x-forwarded-proto", "https"), ("x-forwarded-host", "fhir.example.org"), ("x-forwarded-for", "203.0.113.9")];

fn urls(bundle: &Value) -> Vec<String> {
    let mut out: Vec<String> =
        bundle["link"].as_array().into_iter().flatten().map(|l| l["url"].as_str().unwrap().to_owned()).collect();
    out.extend(
        bundle["entry"].as_array().into_iter().flatten().filter_map(|e| e["fullUrl"].as_str().map(str::to_owned)),
    );
    out
}

#[tokio::test]
async fn behind_a_trusted_load_balancer_every_url_is_public() {
    let s = stack_with(&[], &["--trusted-proxies", "127.0.0.1/32"]).await;
    let upstream = s.fhir.ready["base_url"].as_str().unwrap().to_owned();
    let with_lb = |r: reqwest::RequestBuilder| LB.iter().fold(r, |r, (k, v)| r.header(*k, *v));

    let r = s.send(with_lb(http().get(s.url("/fhir/Observation?_count=1")).bearer_auth(&s.a))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let bundle = r.json();
    let all = urls(&bundle);
    assert!(all.len() >= 3, "{all:?}");
    for url in &all {
        assert!(url.starts_with("https://fhir.example.org/fhir/"), "{url}");
    }
    assert!(!r.text().contains(&upstream), "the upstream's base leaked");

    // Following the next link (as the load balancer would route it) works.
    let next = bundle["link"].as_array().unwrap().iter().find(|l| l["relation"] == "next").unwrap()["url"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = next.strip_prefix("https://fhir.example.org").unwrap();
    let page = s.send(with_lb(http().get(s.url(path)).bearer_auth(&s.a))).await;
    assert_eq!(page.status, 200, "{}", page.text());
    assert_eq!(page.ids().len(), 1);

    // Location of a create.
    let writer = s.issuer.token("tenant-a", "user/*.cruds");
    let r = s
        .send(with_lb(
            http().post(s.url("/fhir/Patient")).bearer_auth(&writer).json(&json!({"resourceType": "Patient"})),
        ))
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(r.headers["location"].to_str().unwrap().starts_with("https://fhir.example.org/fhir/Patient/"));

    // RFC 7239 Forwarded, with a hop the client forged in front of the balancer's.
    let forwarded = "for=1.2.3.4;host=evil.example;proto=http, for=203.0.113.9;proto=https;host=fhir.example.org";
    let r = s.send(http().get(s.url("/fhir/Patient?_count=1")).bearer_auth(&s.a).header("forwarded", forwarded)).await;
    for url in urls(&r.json()) {
        assert!(url.starts_with("https://fhir.example.org/fhir/"), "{url}");
    }

    // The CapabilityStatement: public base, SMART security, only what the gateway lets through.
    let cs = s.send(with_lb(http().get(s.url("/fhir/metadata")))).await;
    assert_eq!(cs.status, 200, "{}", cs.text());
    let cs = cs.json();
    assert_eq!(cs["implementation"]["url"], "https://fhir.example.org/fhir");
    let rest = &cs["rest"][0];
    assert_eq!(rest["security"]["service"][0]["coding"][0]["code"], "SMART-on-FHIR");
    let oauth = rest["security"]["extension"][0]["extension"].as_array().unwrap();
    assert!(oauth.iter().any(|e| e["url"] == "token" && e["valueUri"].as_str().unwrap().ends_with("/token")));
    let system: Vec<&str> =
        rest["interaction"].as_array().unwrap().iter().map(|i| i["code"].as_str().unwrap()).collect();
    assert_eq!(system, ["transaction", "batch"], "only batch and transaction are served at the system level");
    let patient = rest["resource"].as_array().unwrap().iter().find(|r| r["type"] == "Patient").unwrap();
    let codes: Vec<&str> =
        patient["interaction"].as_array().unwrap().iter().map(|i| i["code"].as_str().unwrap()).collect();
    assert!(codes.contains(&"read") && codes.contains(&"search-type"), "{codes:?}");
    assert!(!cs.to_string().contains(&upstream), "the upstream's base leaked from metadata");

    // SMART discovery needs no token and names the configured issuer.
    let smart = s.send(http().get(s.url("/fhir/.well-known/smart-configuration"))).await;
    assert_eq!(smart.status, 200, "{}", smart.text());
    assert!(smart.headers["content-type"].to_str().unwrap().starts_with("application/json"));
    let smart = smart.json();
    assert_eq!(smart["issuer"], json!(s.issuer.url));
    assert_eq!(smart["token_endpoint"], json!(format!("{}/token", s.issuer.url)));
    assert_eq!(smart["code_challenge_methods_supported"], json!(["S256"]));
    assert!(smart["capabilities"].as_array().unwrap().len() > 2);
}

#[tokio::test]
async fn forwarding_headers_from_an_untrusted_client_change_nothing() {
    let s = stack().await;
    let mut request = http().get(s.url("/fhir/Observation?_count=1")).bearer_auth(&s.a);
    for (k, v) in LB {
        request = request.header(k, v);
    }
    let request = request.header("forwarded", "proto=https;host=evil.example").header("x-forwarded-prefix", "/evil");
    let r = s.send(request).await;
    assert_eq!(r.status, 200);
    let own = format!("http://{}/fhir/", s.dp.addr("fhir"));
    for url in urls(&r.json()) {
        assert!(url.starts_with(&own), "{url} should be on {own}");
    }
}
