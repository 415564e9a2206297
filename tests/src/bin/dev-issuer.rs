//! `fhirgw-dev-issuer`: the local token issuer of `./dev up`. Test keys, no client authentication: local use only.
//!
//! Usage: fhirgw-dev-issuer LISTEN_ADDR AUDIENCE   (prints one JSON line with its URL, then serves until killed)

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:8091".into()).parse().expect("LISTEN_ADDR");
    let audience = args.next().unwrap_or_else(|| "http://127.0.0.1:8080/fhir".into());
    let issuer = fhirgw_e2e::issuer::Issuer::start(addr, &audience).await;
    println!("{}", serde_json::json!({"event": "listening", "url": issuer.url, "audience": issuer.audience}));
    std::future::pending::<()>().await;
}
