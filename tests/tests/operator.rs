//! What an operator sees on a data plane's admin port: readiness that follows the grant TTL, and `/config` listing
//! the tenants and grants it enforces.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::stack_with;
use fhirgw_e2e::fixtures::{self, grant};
use fhirgw_e2e::{Process, dp_config, eventually, http};
use fhirgw_proto::admin::v1 as api;

async fn readyz(dp: &Process) -> (u16, String) {
    let r = http().get(format!("http://{}/readyz", dp.addr("admin"))).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// The value of an unlabelled sample on `dp`'s `/metrics`, if present.
async fn metric(dp: &Process, name: &str) -> Option<f64> {
    let text = http().get(format!("http://{}/metrics", dp.addr("admin"))).send().await.unwrap().text().await.unwrap();
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// A data plane cut off from the control plane past the grant TTL refuses every grant-dependent request, so it
/// stops being ready (unless told to report itself degraded), says why, and is ready again once the control plane
/// is back.
#[tokio::test]
async fn readiness_fails_past_the_grant_ttl_and_comes_back() {
    let ttl = ["--grant-ttl-secs", "3"];
    let mut s = stack_with(&["--heartbeat-secs", "1"], &ttl).await;
    let degraded_args = ["--grant-ttl-secs", "3", "--ready-with-stale-grants"];
    let degraded = s
        .world
        .data_plane_args(
            "dp-degraded",
            &fhirgw_e2e::grpc_url(&s.cp),
            "dp2-state",
            &s.world.path("dataplane.token"),
            &degraded_args,
        )
        .await;
    let revision = fixtures::status(&mut s.admin).await.revision;
    fixtures::wait_in_sync(&s.admin, 2, revision).await;
    for dp in [&s.dp, &degraded] {
        assert_eq!(readyz(dp).await, (200, "ready\n".to_owned()), "{}", dp.name);
        assert_eq!(metric(dp, "fhirgw_dp_grants_stale").await, Some(0.0));
        assert_eq!(metric(dp, "fhirgw_dp_grant_ttl_seconds").await, Some(3.0));
        assert_eq!(dp_config(dp).await["grants_stale"], false);
    }

    let port = s.cp.addr("grpc").rsplit(':').next().unwrap().to_owned();
    s.cp.kill().await;
    let (status, body) = eventually("/readyz fails past the grant TTL", Duration::from_secs(20), || async {
        let (status, body) = readyz(&s.dp).await;
        (status == 503).then_some((status, body))
    })
    .await;
    assert!(body.starts_with("not ready: grants not confirmed by the control plane for "), "{status} {body}");
    assert!(body.contains("grant TTL 3s"), "{body}");
    // What readiness says is what a request gets.
    assert_eq!(s.get("/fhir/Patient/a-pat-1", &s.a).await.status, 503);
    assert_eq!(metric(&s.dp, "fhirgw_dp_grants_stale").await, Some(1.0));
    assert!(metric(&s.dp, "fhirgw_dp_config_seconds_since_confirmed").await.unwrap() > 3.0);
    assert_eq!(dp_config(&s.dp).await["grants_stale"], true);
    assert_eq!(http().get(format!("http://{}/healthz", s.dp.addr("admin"))).send().await.unwrap().status(), 200);
    // Told to stay in the pool, the other reports itself degraded, with the same reason.
    let (status, body) = eventually("the other reports itself degraded", Duration::from_secs(20), || async {
        let (status, body) = readyz(&degraded).await;
        (status != 200 || body != "ready\n").then_some((status, body))
    })
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("degraded: grants not confirmed by the control plane for "), "{body}");
    assert_eq!(metric(&degraded, "fhirgw_dp_grants_stale").await, Some(1.0));

    let _cp =
        s.world.control_plane_args("cp-back", "cp.db", &format!("127.0.0.1:{port}"), &["--heartbeat-secs", "1"]).await;
    for dp in [&s.dp, &degraded] {
        eventually("ready again once the control plane confirms the grants", Duration::from_secs(30), || async {
            (readyz(dp).await == (200, "ready\n".to_owned())).then_some(())
        })
        .await;
        assert_eq!(metric(dp, "fhirgw_dp_grants_stale").await, Some(0.0));
    }
    assert_eq!(s.get("/fhir/Patient/a-pat-1", &s.a).await.status, 200);
}

/// `/config` lists every tenant with its grants as the data plane enforces them, expiries included.
#[tokio::test]
async fn config_lists_tenants_and_grants_with_expiries() {
    let mut s = stack_with(&[], &[]).await;
    let expires = prost_types::Timestamp { seconds: 4_102_444_800, nanos: 0 }; // 2100-01-01T00:00:00Z
    let mut expiring = grant("tenant-a", "until-2100");
    expiring.expires_at = Some(expires);
    let put = api::PutGrantRequest { grant: Some(expiring), expected_version: String::new() };
    let revision: u64 = s.admin.put_grant(put).await.unwrap().into_inner().meta.unwrap().version.parse().unwrap();
    let config = eventually("the new grant on the data plane", Duration::from_secs(20), || async {
        let config = dp_config(&s.dp).await;
        (config["system_version"] == revision).then_some(config)
    })
    .await;
    let tenant = |name: &str| {
        config["tenants"].as_array().unwrap().iter().find(|t| t["name"] == name).cloned().unwrap_or_else(|| {
            panic!("no tenant {name} in {config:#}");
        })
    };
    let names: Vec<&str> = config["tenants"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["tenant-a", "tenant-b"]);
    let a = tenant("tenant-a");
    assert_eq!(a["display_name"], "Tenant tenant-a");
    let version = config["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["kind"] == "tenant" && r["name"] == "tenant-a")
        .map(|r| r["version"].clone())
        .unwrap_or_else(|| panic!("{config:#}"));
    assert_eq!(a["version"], version);
    let grants = a["grants"].as_array().unwrap();
    assert_eq!(grants.len(), 2, "{a:#}");
    assert_eq!(grants[0]["code"], "tenant-a");
    assert_eq!(grants[0]["system"], fixtures::DATASET);
    assert_eq!((grants[0]["expires_at"].clone(), grants[0]["active"].clone()), (serde_json::Value::Null, true.into()));
    assert_eq!(grants[1]["code"], "until-2100");
    assert_eq!(grants[1]["expires_at"], "2100-01-01T00:00:00Z");
    assert_eq!(grants[1]["active"], true);
    assert!(grants[1]["expires_in_seconds"].as_u64().unwrap() > 2_000_000_000, "{a:#}");
    assert_eq!(tenant("tenant-b")["grants"].as_array().unwrap().len(), 1);
    assert_eq!(config["grant_ttl_seconds"], 300);
    assert_eq!(config["grants_stale"], false);
}
