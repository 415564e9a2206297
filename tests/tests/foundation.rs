//! The foundation, end to end: a real control plane, real data planes and a real FHIR server, over real sockets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use fhirgw_e2e::fixtures::{self, READ_SCOPES, configure, grant, status};
use fhirgw_e2e::issuer::Issuer;
use fhirgw_e2e::{World, admin, dp_config, eventually, grpc_url, grpcurl, http};
use fhirgw_proto::admin::v1 as api;
use fhirgw_proto::config::v1 as pb;
use tonic::Code;

const PROPAGATION: Duration = Duration::from_secs(20);

fn fhir_base(server: &fhirgw_e2e::Process) -> String {
    server.ready["base_url"].as_str().unwrap().to_owned()
}

/// Waits until every data plane runs the control plane's current configuration.
async fn wait_in_sync(admin: &mut fhirgw_e2e::Admin, n: usize, revision: u64) -> api::StatusResponse {
    fixtures::wait_in_sync(admin, n, revision).await
}

async fn read_patient(dp: &fhirgw_e2e::Process, issuer: &Issuer, id: &str) -> reqwest::Response {
    http()
        .get(format!("http://{}/fhir/Patient/{id}", dp.addr("fhir")))
        .bearer_auth(issuer.token("tenant-a", READ_SCOPES))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn grant_put_with_grpcurl_reaches_three_data_planes() {
    let world = World::new();
    let fhir = world.fhir_server().await;
    let issuer = fixtures::issuer().await;
    let cp = world.control_plane("cp", "cp.db").await;
    let mut dps = Vec::new();
    for i in 0..3 {
        dps.push(world.data_plane(&format!("dp-{i}"), &grpc_url(&cp), &format!("dp-{i}-state")).await);
    }
    let mut admin = admin(&cp).await;
    let revision = configure(&mut admin, &world, &fhir_base(&fhir), &issuer).await;
    wait_in_sync(&mut admin, 3, revision).await;

    // Reflection works for an operator with nothing but grpcurl.
    let (ok, out, err) = grpcurl(&cp, &[], &["list"]).await;
    assert!(ok, "grpcurl list failed: {err}");
    for service in ["fhirgw.admin.v1.Admin", "fhirgw.push.v1.ConfigDiscovery", "grpc.health.v1.Health"] {
        assert!(out.contains(service), "{service} missing from `grpcurl list`: {out}");
    }
    let (ok, out, err) = grpcurl(&cp, &[], &["describe", "fhirgw.admin.v1.Admin.PutGrant"]).await;
    assert!(ok && out.contains("PutGrantRequest"), "grpcurl describe failed: {out} {err}");

    // The operator puts a grant exactly as the README shows.
    let started = Instant::now();
    let body = serde_json::json!({
        "grant": { "tenant": "tenant-b", "tag": { "system": fixtures::DATASET, "code": "tenant-a" },
                   "expires_at": "2099-01-01T00:00:00Z" }
    });
    let (ok, out, err) = grpcurl(&cp, &["-d", &body.to_string()], &["fhirgw.admin.v1.Admin/PutGrant"]).await;
    assert!(ok, "grpcurl PutGrant failed: {err}");
    let put: serde_json::Value = serde_json::from_str(&out).unwrap();
    let grant_revision: u64 = put["meta"]["version"].as_str().unwrap().parse().unwrap();
    assert!(grant_revision > revision);

    // Every data plane applies it; GetStatus shows it.
    let s = wait_in_sync(&mut admin, 3, grant_revision).await;
    let elapsed = started.elapsed();
    for dp in &dps {
        let cfg = dp_config(dp).await;
        assert_eq!(cfg["version"], s.config_version, "{} runs another version", dp.name);
    }
    for d in &s.data_planes {
        assert_eq!(d.applied_version, s.config_version);
        assert!(d.last_ack.is_some() && d.last_nack.is_none());
    }
    println!("grant propagation to 3 data planes (grpcurl call to all in sync, incl. grpcurl start-up): {elapsed:?}");

    // And the grant is in the tenant resource each data plane holds: the version the control plane computes for
    // tenant-a (with the grant) is the version each data plane reports.
    let list = admin.list_grants(api::ListGrantsRequest { tenant: "tenant-b".into() }).await.unwrap().into_inner();
    assert_eq!(list.grants.len(), 2);
    assert!(list.grants.iter().any(|g| g.grant.as_ref().unwrap().expires_at.is_some()));

    // Its effect on every data plane: tenant-b now sees tenant-a's patients too.
    for dp in &dps {
        let response = http()
            .get(format!("http://{}/fhir/Patient/a-pat-1", dp.addr("fhir")))
            .bearer_auth(issuer.token("tenant-b", READ_SCOPES))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{}", dp.name);
    }
}

#[tokio::test]
async fn control_plane_restart_resyncs_without_resending_and_loses_nothing() {
    let world = World::new();
    let fhir = world.fhir_server().await;
    let issuer = fixtures::issuer().await;
    let mut cp = world.control_plane("cp", "cp.db").await;
    let dp = world.data_plane("dp", &grpc_url(&cp), "dp-state").await;
    let mut admin = admin(&cp).await;
    let revision = configure(&mut admin, &world, &fhir_base(&fhir), &issuer).await;
    let before = wait_in_sync(&mut admin, 1, revision).await;
    let tenants_before = admin.list_tenants(api::ListRequest {}).await.unwrap().into_inner();
    let tables_before = admin.list_route_tables(api::ListRequest {}).await.unwrap().into_inner();
    let received_before = dp_config(&dp).await["received"].clone();

    // Control plane gone: the data plane keeps serving its last snapshot.
    cp.kill().await;
    let response = read_patient(&dp, &issuer, "a-pat-1").await;
    assert_eq!(response.status(), 200);
    assert_eq!(http().get(format!("http://{}/readyz", dp.addr("admin"))).send().await.unwrap().status(), 200);

    // Restart on the same store (same port, as a Service address would be).
    let port = cp.addr("grpc").rsplit(':').next().unwrap().to_owned();
    let cp2 = world.control_plane_at("cp-restarted", "cp.db", &format!("127.0.0.1:{port}")).await;
    let mut admin2 = fhirgw_e2e::admin(&cp2).await;
    let after = wait_in_sync(&mut admin2, 1, revision).await;
    assert_eq!(after.revision, before.revision, "store revision survives a restart");
    assert_eq!(after.config_version, before.config_version, "versions come from the store, not the process");

    // Resumed with initial_versions: one (empty) response, no resource sent again.
    let received_after = eventually("a response after reconnecting", PROPAGATION, || {
        let dp = &dp;
        let before = received_before.clone();
        async move {
            let r = dp_config(dp).await["received"].clone();
            (r["responses"].as_u64() > before["responses"].as_u64()).then_some(r)
        }
    })
    .await;
    assert_eq!(
        received_after["resources"], received_before["resources"],
        "resources were re-sent: {received_before} -> {received_after}"
    );

    // Nothing the operator wrote is lost.
    assert_eq!(admin2.list_tenants(api::ListRequest {}).await.unwrap().into_inner(), tenants_before);
    assert_eq!(admin2.list_route_tables(api::ListRequest {}).await.unwrap().into_inner(), tables_before);
    assert_eq!(read_patient(&dp, &issuer, "a-pat-1").await.status(), 200);
}

#[tokio::test]
async fn data_plane_started_while_control_plane_is_down_serves_from_disk() {
    let world = World::new();
    let fhir = world.fhir_server().await;
    let issuer = fixtures::issuer().await;
    let mut cp = world.control_plane("cp", "cp.db").await;
    let mut dp = world.data_plane("dp", &grpc_url(&cp), "dp-state").await;
    let mut admin = admin(&cp).await;
    let revision = configure(&mut admin, &world, &fhir_base(&fhir), &issuer).await;
    let synced = wait_in_sync(&mut admin, 1, revision).await;
    let url = grpc_url(&cp);
    dp.terminate().await;
    cp.kill().await;

    let dp2 = world.data_plane("dp-again", &url, "dp-state").await;
    let cfg = dp_config(&dp2).await;
    assert_eq!(cfg["ready"], true);
    assert_eq!(cfg["source"], "disk");
    assert_eq!(cfg["version"], synced.config_version);
    assert_eq!(http().get(format!("http://{}/readyz", dp2.addr("admin"))).send().await.unwrap().status(), 200);
    let response = read_patient(&dp2, &issuer, "a-pat-2").await;
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["id"], "a-pat-2");
}

#[tokio::test]
async fn data_plane_without_any_config_is_not_ready_and_answers_503() {
    let world = World::new();
    let issuer = fixtures::issuer().await;
    // Nothing listens on this port: bind and drop to get a free one.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dp = world.data_plane("dp", &format!("http://127.0.0.1:{port}"), "dp-state").await;
    let readyz = http().get(format!("http://{}/readyz", dp.addr("admin"))).send().await.unwrap();
    assert_eq!(readyz.status(), 503);
    assert_eq!(http().get(format!("http://{}/healthz", dp.addr("admin"))).send().await.unwrap().status(), 200);
    let response = read_patient(&dp, &issuer, "a-pat-1").await;
    assert_eq!(response.status(), 503);
    assert!(response.headers().get("retry-after").is_some());
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("application/fhir+json"));
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["resourceType"], "OperationOutcome");
}

#[tokio::test]
async fn invalid_push_is_nacked_last_good_config_stays_and_nack_shows_in_status() {
    let world = World::new();
    let fhir = world.fhir_server().await;
    let issuer = fixtures::issuer().await;
    let cp = world.control_plane("cp", "cp.db").await;
    let dp = world.data_plane("dp", &grpc_url(&cp), "dp-state").await;
    let mut admin = admin(&cp).await;
    let revision = configure(&mut admin, &world, &fhir_base(&fhir), &issuer).await;
    let good = wait_in_sync(&mut admin, 1, revision).await;

    // Valid for the control plane, impossible for this data plane: its credential file does not exist here.
    let mut bad = fixtures::upstream(&world, &fhir_base(&fhir));
    bad.auth = Some(pb::UpstreamAuth {
        source: Some(pb::upstream_auth::Source::StaticToken(pb::StaticToken {
            token_file: "/nonexistent/fhirgw/token".into(),
        })),
    });
    let put = admin
        .put_upstream(api::PutUpstreamRequest { upstream: Some(bad), expected_version: String::new() })
        .await
        .unwrap();
    let bad_revision: u64 = put.into_inner().meta.unwrap().version.parse().unwrap();

    let nacked = eventually("the NACK in GetStatus", PROPAGATION, || {
        let mut admin = admin.clone();
        async move {
            let s = status(&mut admin).await;
            s.data_planes
                .first()
                .and_then(|d| d.last_nack.clone())
                .filter(|n| n.revision == bad_revision)
                .map(|n| (s.clone(), n))
        }
    })
    .await;
    let (s, nack) = nacked;
    assert_eq!(nack.rejected.len(), 1, "{nack:?}");
    assert_eq!((nack.rejected[0].kind.as_str(), nack.rejected[0].name.as_str()), ("upstream", "fhir"));
    assert!(nack.rejected[0].reason.contains("/nonexistent/fhirgw/token"), "{}", nack.rejected[0].reason);
    let d = &s.data_planes[0];
    assert!(!d.in_sync);
    assert_eq!(d.applied_version, good.config_version, "the data plane reports its last good version");

    // Last good config still serves, with the old credential.
    let cfg = dp_config(&dp).await;
    assert_eq!(cfg["version"], good.config_version);
    assert!(cfg["last_rejection"]["summary"].as_str().unwrap().contains("nonexistent"));
    assert_eq!(read_patient(&dp, &issuer, "a-pat-1").await.status(), 200);

    // The NACKed version is not resent: the next change delivers exactly the one changed resource.
    let received = dp_config(&dp).await["received"].clone();
    let put = admin
        .put_grant(api::PutGrantRequest { grant: Some(grant("tenant-b", "extra")), expected_version: String::new() })
        .await
        .unwrap();
    let next: u64 = put.into_inner().meta.unwrap().version.parse().unwrap();
    eventually("the next change acked", PROPAGATION, || {
        let mut admin = admin.clone();
        async move {
            status(&mut admin).await.data_planes.first().and_then(|d| d.last_ack.clone()).filter(|a| a.revision == next)
        }
    })
    .await;
    let received_after = dp_config(&dp).await["received"].clone();
    assert_eq!(
        received_after["responses"].as_u64().unwrap(),
        received["responses"].as_u64().unwrap() + 1,
        "{received} -> {received_after}"
    );
    assert_eq!(
        received_after["resources"].as_u64().unwrap(),
        received["resources"].as_u64().unwrap() + 1,
        "{received} -> {received_after}"
    );

    // Fixing the upstream converges again.
    let put = admin
        .put_upstream(api::PutUpstreamRequest {
            upstream: Some(fixtures::upstream(&world, &fhir_base(&fhir))),
            expected_version: String::new(),
        })
        .await
        .unwrap();
    let fixed: u64 = put.into_inner().meta.unwrap().version.parse().unwrap();
    wait_in_sync(&mut admin, 1, fixed).await;
}

#[tokio::test]
async fn admin_api_refuses_missing_and_wrong_credentials() {
    let world = World::new();
    let cp = world.control_plane("cp", "cp.db").await;
    let channel = tonic::transport::Channel::from_shared(grpc_url(&cp)).unwrap().connect().await.unwrap();
    let tenant = || api::PutTenantRequest {
        tenant: Some(pb::Tenant { name: "intruder".into(), display_name: String::new(), audit: None }),
        expected_version: String::new(),
    };

    let mut anonymous = fhirgw_proto::admin::v1::admin_client::AdminClient::new(channel.clone());
    assert_eq!(anonymous.put_tenant(tenant()).await.unwrap_err().code(), Code::Unauthenticated);
    assert_eq!(anonymous.get_status(api::GetStatusRequest {}).await.unwrap_err().code(), Code::Unauthenticated);

    for token in ["wrong-token-0123456789abcdef", fhirgw_e2e::DATAPLANE_TOKEN] {
        let header: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
        let mut wrong = fhirgw_proto::admin::v1::admin_client::AdminClient::with_interceptor(
            channel.clone(),
            move |mut r: tonic::Request<()>| {
                r.metadata_mut().insert("authorization", header.clone());
                Ok(r)
            },
        );
        assert_eq!(wrong.put_tenant(tenant()).await.unwrap_err().code(), Code::Unauthenticated, "token {token}");
    }

    // grpcurl without the header is refused too.
    let out = tokio::process::Command::new(fhirgw_e2e::grpcurl_path())
        .args([
            "-plaintext",
            "-d",
            r#"{"tenant":{"name":"intruder"}}"#,
            &cp.addr("grpc"),
            "fhirgw.admin.v1.Admin/PutTenant",
        ])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Unauthenticated"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Nothing changed.
    let mut admin = admin(&cp).await;
    let s = status(&mut admin).await;
    assert_eq!(s.revision, 0);
    assert!(admin.list_tenants(api::ListRequest {}).await.unwrap().into_inner().tenants.is_empty());

    // A data plane with a wrong token never gets configuration.
    std::fs::write(world.path("bad.token"), "not-the-dataplane-token-0000").unwrap();
    let dp = world.data_plane_with("dp-bad", &grpc_url(&cp), "dp-state", &world.path("bad.token")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(http().get(format!("http://{}/readyz", dp.addr("admin"))).send().await.unwrap().status(), 503);
    assert!(status(&mut admin).await.data_planes.is_empty());
}

#[tokio::test]
async fn bad_admin_input_is_refused_and_changes_nothing() {
    let world = World::new();
    let fhir = world.fhir_server().await;
    let issuer = fixtures::issuer().await;
    let cp = world.control_plane("cp", "cp.db").await;
    let mut admin = admin(&cp).await;
    let revision = configure(&mut admin, &world, &fhir_base(&fhir), &issuer).await;
    let before = status(&mut admin).await;
    assert_eq!(before.revision, revision);

    let put_grant = |g: pb::Grant| api::PutGrantRequest { grant: Some(g), expected_version: String::new() };
    let mut past = grant("tenant-a", "tenant-a");
    past.expires_at = Some(prost_types::Timestamp { seconds: 1_000_000_000, nanos: 0 });
    let mut bad_system = grant("tenant-a", "x");
    bad_system.tag = Some(pb::Tag { system: "not a uri".into(), code: "x".into() });
    let cases: Vec<(&str, api::PutGrantRequest, &str)> = vec![
        ("unknown tenant", put_grant(grant("nobody", "x")), "unknown tenant `nobody`"),
        ("malformed code", put_grant(grant("tenant-a", "a|b")), "tag code"),
        ("malformed system", put_grant(bad_system), "tag system"),
        ("expiry in the past", put_grant(past), "in the past"),
        ("no tag", put_grant(pb::Grant { tenant: "tenant-a".into(), tag: None, expires_at: None }), "tag"),
    ];
    for (what, request, needle) in cases {
        let err = admin.put_grant(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        assert!(err.message().contains(needle), "{what}: {}", err.message());
    }

    // A table with two routes that match the same requests with equal specificity is refused naming both.
    let mut table = fixtures::route_table();
    table.routes.push(pb::Route {
        id: "shadow".into(),
        path: "/{type}/{id}".into(),
        methods: vec!["GET".into()],
        action: Some(pb::route::Action::Proxy(pb::ProxyAction { upstream: "fhir".into() })),
        query_guard: None,
        forward_headers: Vec::new(),
        audit: None,
    });
    let err = admin
        .put_route_table(api::PutRouteTableRequest { route_table: Some(table), expected_version: String::new() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("`instance`") && err.message().contains("`shadow`"), "{}", err.message());

    // A route to an upstream that does not exist.
    let mut table = fixtures::route_table();
    table.routes[0].action = Some(pb::route::Action::Proxy(pb::ProxyAction { upstream: "ghost".into() }));
    let err = admin
        .put_route_table(api::PutRouteTableRequest { route_table: Some(table), expected_version: String::new() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("unknown upstream `ghost`"), "{}", err.message());

    // Oversized payload: an object just over the 1 MiB object limit is refused by the store's check; a message
    // past what any object can be is refused by gRPC from its length prefix, unread, with RESOURCE_EXHAUSTED.
    let big = pb::Tenant { name: "big".into(), display_name: "x".repeat(1024 * 1024 + 16), audit: None };
    let err = admin
        .put_tenant(api::PutTenantRequest { tenant: Some(big), expected_version: String::new() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let huge = pb::Tenant { name: "big".into(), display_name: "x".repeat(2 * 1024 * 1024), audit: None };
    let err = admin
        .put_tenant(api::PutTenantRequest { tenant: Some(huge), expected_version: String::new() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");

    // Optimistic concurrency.
    let current = admin.get_tenant(api::GetRequest { name: "tenant-a".into() }).await.unwrap().into_inner();
    let stale = api::PutTenantRequest { tenant: current.tenant.clone(), expected_version: "1".into() };
    assert_eq!(admin.put_tenant(stale).await.unwrap_err().code(), Code::FailedPrecondition);
    let create_only = api::PutTenantRequest { tenant: current.tenant.clone(), expected_version: "0".into() };
    assert_eq!(admin.put_tenant(create_only).await.unwrap_err().code(), Code::FailedPrecondition);
    let del = api::DeleteRequest { name: "tenant-a".into(), expected_version: "1".into() };
    assert_eq!(admin.delete_tenant(del).await.unwrap_err().code(), Code::FailedPrecondition);

    // Referenced objects cannot be deleted out from under their users.
    let err = admin
        .delete_upstream(api::DeleteRequest { name: "fhir".into(), expected_version: String::new() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    let after = status(&mut admin).await;
    assert_eq!(after.revision, before.revision, "a refused call must not change the store");
    assert_eq!(after.config_version, before.config_version);

    // The right version succeeds.
    let ok = api::PutTenantRequest { tenant: current.tenant, expected_version: current.meta.unwrap().version };
    admin.put_tenant(ok).await.unwrap();
}
