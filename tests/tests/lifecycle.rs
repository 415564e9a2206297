//! Data plane lifecycle and request limits, end to end: draining on SIGTERM, over-long request targets and header blocks.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use fhirgw_e2e::fixtures::{self, READ_SCOPES, configure};
use fhirgw_e2e::{UPSTREAM_TOKEN, World, admin, eventually, grpc_url, http};
use fhirgw_proto::admin::v1 as api;
use fhirgw_proto::config::v1 as pb;

#[tokio::test]
async fn sigterm_drains_in_flight_requests_then_exits() {
    let world = World::new();
    let fhir = world.fhir_server_args(&["--latency-ms", "1500"]).await;
    let issuer = fixtures::issuer().await;
    let cp = world.control_plane("cp", "cp.db").await;
    let mut dp = world.data_plane("dp", &grpc_url(&cp), "dp-state").await;
    let mut admin = admin(&cp).await;
    let revision = configure(&mut admin, &world, fhir.ready["base_url"].as_str().unwrap(), &issuer).await;
    fixtures::wait_in_sync(&admin, 1, revision).await;
    let token = issuer.token("tenant-a", READ_SCOPES);
    let url = format!("http://{}/fhir/Patient/a-pat-1", dp.addr("fhir"));

    // A slow request in flight...
    let in_flight = tokio::spawn({
        let (url, token) = (url.clone(), token.clone());
        async move { http().get(url).bearer_auth(token).send().await.map(|r| r.status().as_u16()) }
    });
    let log_url = format!("http://{}/__admin/requests", fhir.ready["listening"].as_str().unwrap());
    eventually("the request reaches the upstream", Duration::from_secs(10), || {
        let log_url = log_url.clone();
        async move {
            let log: serde_json::Value = http().get(log_url).send().await.ok()?.json().await.ok()?;
            log.as_array()?.iter().any(|r| r["path"].as_str().is_some_and(|p| p.contains("a-pat-1"))).then_some(())
        }
    })
    .await;
    // ...survives SIGTERM.
    let signalled = Instant::now();
    dp.signal_term().await;
    let status = in_flight.await.unwrap();
    assert_eq!(status.ok(), Some(200), "an in-flight request must complete during the drain");

    // No new connections once draining; the process exits cleanly within the grace period.
    let exit = dp.wait().await.expect("the data plane did not exit");
    assert!(exit.success(), "{exit:?}");
    assert!(signalled.elapsed() < Duration::from_secs(6), "took {:?}", signalled.elapsed());
    assert!(http().get(&url).bearer_auth(&token).send().await.is_err(), "the listener must be closed");
    let _ = UPSTREAM_TOKEN;
}

#[tokio::test]
async fn over_long_request_targets_and_headers_are_refused() {
    let world = World::new();
    let fhir = world.fhir_server().await;
    let issuer = fixtures::issuer().await;
    let cp = world.control_plane("cp", "cp.db").await;
    let dp = world.data_plane("dp", &grpc_url(&cp), "dp-state").await;
    let mut admin = admin(&cp).await;
    let revision = configure(&mut admin, &world, fhir.ready["base_url"].as_str().unwrap(), &issuer).await;
    fixtures::wait_in_sync(&admin, 1, revision).await;
    let token = issuer.token("tenant-a", READ_SCOPES);
    let long = "x".repeat(9000);
    let r = http()
        .get(format!("http://{}/fhir/Patient?name={long}", dp.addr("fhir")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 414);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["resourceType"], "OperationOutcome");

    // Header fields: 16 KiB in all by default, less on a route whose guard says so (431 OperationOutcome).
    let get = |path: &str, header_bytes: usize| {
        http()
            .get(format!("http://{}/fhir/{path}", dp.addr("fhir")))
            .bearer_auth(&token)
            .header("x-padding", "p".repeat(header_bytes))
            .send()
    };
    assert_eq!(get("Patient/a-pat-1", 3000).await.unwrap().status(), 200);
    let r = get("Patient/a-pat-1", 17_000).await.unwrap();
    assert_eq!(r.status(), 431);
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["resourceType"], "OperationOutcome");
    let mut table = fixtures::route_table();
    for route in &mut table.routes {
        if route.id == "instance" {
            route.query_guard = Some(pb::QueryGuard { max_header_bytes: 2048, ..Default::default() });
        }
    }
    let put = api::PutRouteTableRequest { route_table: Some(table.clone()), expected_version: String::new() };
    let revision: u64 = admin.put_route_table(put).await.unwrap().into_inner().meta.unwrap().version.parse().unwrap();
    fixtures::wait_in_sync(&admin, 1, revision).await;
    assert_eq!(get("Patient/a-pat-1", 3000).await.unwrap().status(), 431, "the instance route's own limit");
    assert_eq!(get("Patient?name=x", 3000).await.unwrap().status(), 200, "other routes keep the default");
    // A guard cannot allow more than the data plane reads.
    table.routes[0].query_guard = Some(pb::QueryGuard { max_header_bytes: 1 << 20, ..Default::default() });
    let put = api::PutRouteTableRequest { route_table: Some(table), expected_version: String::new() };
    let refused = admin.put_route_table(put).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
}
