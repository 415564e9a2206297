//! Several control-plane replicas on one PostgreSQL store, end to end: real replicas, real data planes, a real FHIR
//! server and a real PostgreSQL started by the harness (one per test binary; a dedicated one for the restart test).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fhirgw_e2e::fixtures::{self, READ_SCOPES, configure, grant, status, wait_in_sync};
use fhirgw_e2e::postgres::Postgres;
use fhirgw_e2e::{
    Process, World, admin, admin_as, config_stream, dp_config, eventually, grpc_url, grpcurl, http, token_hash,
};
use fhirgw_proto::admin::v1 as api;
use fhirgw_proto::config::v1 as pb;
use tonic::Code;

const PROPAGATION: Duration = Duration::from_secs(20);

fn unique(name: &str) -> String {
    format!("{name}_{:08x}", rand::random::<u32>())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn base(fhir: &Process) -> String {
    fhir.ready["base_url"].as_str().unwrap().to_owned()
}

/// Which replica each data plane's stream is open to, by node id.
fn replicas(s: &api::StatusResponse) -> Vec<(String, String)> {
    s.data_planes.iter().map(|d| (d.node_id.clone(), d.replica.clone())).collect()
}

/// Waits until `n` data planes are in sync at `revision` and every one is connected to `replica`.
async fn wait_all_on(admin: &fhirgw_e2e::Admin, n: usize, revision: u64, replica: &str) -> api::StatusResponse {
    eventually(&format!("{n} data planes in sync on {replica}"), PROPAGATION, || {
        let mut admin = admin.clone();
        async move {
            let s = status(&mut admin).await;
            let ok = s.data_planes.len() == n
                && s.data_planes.iter().all(|d| d.in_sync && d.acked_revision >= revision && d.replica == replica);
            ok.then_some(s)
        }
    })
    .await
}

#[tokio::test]
async fn a_grant_put_on_one_replica_reaches_data_planes_on_the_other() {
    let pg = tokio::task::spawn_blocking(Postgres::shared).await.unwrap();
    let world = World::new();
    let fhir = world.fhir_server().await;
    let issuer = fixtures::issuer().await;
    let store = world.pg_store_args(pg, &unique("fanout"));
    let a = world.control_plane_on("cp-a", &store, "127.0.0.1:0", &[]).await;
    let b = world.control_plane_on("cp-b", &store, "127.0.0.1:0", &[]).await;
    let dps = [
        world.data_plane("dp-0", &grpc_url(&a), "dp-0-state").await,
        world.data_plane("dp-1", &grpc_url(&b), "dp-1-state").await,
        world.data_plane("dp-2", &grpc_url(&b), "dp-2-state").await,
    ];
    let mut admin_a = admin(&a).await;
    let admin_b = admin(&b).await;
    let revision = configure(&mut admin_a, &world, &base(&fhir), &issuer).await;

    // GetStatus on either replica lists all three data planes, each with the replica it is connected to.
    let on_b = wait_in_sync(&admin_b, 3, revision).await;
    let on_a = wait_in_sync(&admin_a, 3, revision).await;
    let want = vec![("dp-0".into(), "cp-a".into()), ("dp-1".into(), "cp-b".into()), ("dp-2".into(), "cp-b".into())];
    assert_eq!(replicas(&on_a), want);
    assert_eq!(replicas(&on_b), want);
    // One store: one identity, one revision, one configuration version, whichever replica answers.
    assert_eq!(on_a.store_id.len(), 32, "{on_a:?}");
    assert_eq!((on_a.store_id.as_str(), on_a.revision), (on_b.store_id.as_str(), on_b.revision));
    assert_eq!(on_a.config_version, on_b.config_version);
    assert_eq!((on_a.replica.as_str(), on_b.replica.as_str()), ("cp-a", "cp-b"));

    // The operator puts a grant through replica A with grpcurl; the data planes on replica B apply it.
    let started = Instant::now();
    let body = serde_json::json!({
        "grant": { "tenant": "tenant-b", "tag": { "system": fixtures::DATASET, "code": "tenant-a" } }
    });
    let (ok, out, err) = grpcurl(&a, &["-d", &body.to_string()], &["fhirgw.admin.v1.Admin/PutGrant"]).await;
    assert!(ok, "grpcurl PutGrant failed: {err}");
    let put: serde_json::Value = serde_json::from_str(&out).unwrap();
    let grant_revision: u64 = put["meta"]["version"].as_str().unwrap().parse().unwrap();
    let expected_version = status(&mut admin_a).await.config_version;
    for dp in &dps[1..] {
        eventually(&format!("{} applies the grant", dp.name), PROPAGATION, || async {
            (dp_config(dp).await["version"] == expected_version.as_str()).then_some(())
        })
        .await;
    }
    println!(
        "grant through cp-a applied by the data planes on cp-b in {:?} (incl. grpcurl start-up)",
        started.elapsed()
    );
    let s = wait_in_sync(&admin_a, 3, grant_revision).await;
    assert_eq!(s.revision, grant_revision);
    for dp in &dps {
        let r = http()
            .get(format!("http://{}/fhir/Patient/a-pat-1", dp.addr("fhir")))
            .bearer_auth(issuer.token("tenant-b", READ_SCOPES))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", dp.name);
    }
}

/// Three data planes on replica A (given A and B; B is started once they are all on A); a client reads through them
/// in a loop while A is killed with SIGKILL: they move to B, and no request fails.
#[tokio::test]
async fn kill_9_of_a_replica_under_a_read_loop_fails_no_request_and_resends_nothing() {
    let pg = tokio::task::spawn_blocking(Postgres::shared).await.unwrap();
    let world = World::new();
    let fhir = world.fhir_server().await;
    let issuer = fixtures::issuer().await;
    let store = world.pg_store_args(pg, &unique("kill"));
    let mut a = world.control_plane_on("cp-a", &store, "127.0.0.1:0", &[]).await;
    let b_listen = format!("127.0.0.1:{}", free_port());
    let both = format!("{},http://{b_listen}", grpc_url(&a));
    let mut dps = Vec::new();
    for i in 0..3 {
        dps.push(world.data_plane(&format!("dp-{i}"), &both, &format!("dp-{i}-state")).await);
    }
    let mut admin_a = admin(&a).await;
    let revision = configure(&mut admin_a, &world, &base(&fhir), &issuer).await;
    wait_all_on(&admin_a, 3, revision, "cp-a").await;
    let b = world.control_plane_on("cp-b", &store, &b_listen, &[]).await;
    let admin_b = admin(&b).await;
    wait_all_on(&admin_b, 3, revision, "cp-a").await;
    let mut received = Vec::new();
    for dp in &dps {
        received.push(dp_config(dp).await["received"]["resources"].clone());
    }

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let urls: Vec<String> = dps.iter().map(|dp| format!("http://{}/fhir/Patient/a-pat-1", dp.addr("fhir"))).collect();
    let token = issuer.token("tenant-a", READ_SCOPES);
    let reader = tokio::spawn({
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        async move {
            let client = http();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let response = client.get(&urls[i % urls.len()]).bearer_auth(&token).send().await;
                match response {
                    Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    other => {
                        eprintln!("read failed: {other:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                i += 1;
            }
        }
    });
    let reads = |n: u64| {
        let ok = ok.clone();
        async move {
            eventually(&format!("{n} reads"), PROPAGATION, || async { (ok.load(Ordering::Relaxed) >= n).then_some(()) })
                .await
        }
    };
    reads(30).await;
    a.kill().await;
    let moved = Instant::now();
    let s = wait_all_on(&admin_b, 3, revision, "cp-b").await;
    println!("3 data planes moved from the killed replica to cp-b in {:?}", moved.elapsed());
    let so_far = ok.load(Ordering::Relaxed);
    reads(so_far + 30).await;
    stop.store(true, Ordering::Relaxed);
    reader.await.unwrap();
    assert_eq!(failed.load(Ordering::Relaxed), 0, "requests failed while the replica died");
    assert!(s.data_planes.iter().all(|d| d.store_warnings.is_empty()), "{s:?}");

    // They resumed with what they held: the new replica sent them nothing again.
    for (dp, before) in dps.iter().zip(&received) {
        assert_eq!(&dp_config(dp).await["received"]["resources"], before, "{} was re-sent resources", dp.name);
    }
    // And they follow the surviving replica.
    let mut admin_b2 = admin_b.clone();
    let put = api::PutGrantRequest { grant: Some(grant("tenant-a", "after-kill")), expected_version: String::new() };
    let next: u64 = admin_b2.put_grant(put).await.unwrap().into_inner().meta.unwrap().version.parse().unwrap();
    wait_all_on(&admin_b, 3, next, "cp-b").await;
}

/// Two operators race on one grant through different replicas with the same expected version, ten times: each time
/// exactly one wins and the other gets FAILED_PRECONDITION; the audit trail names each winner.
#[tokio::test]
async fn operators_racing_on_one_grant_through_two_replicas() {
    let pg = tokio::task::spawn_blocking(Postgres::shared).await.unwrap();
    let world = World::new();
    let (alice_token, bob_token) = ("alice-token-0123456789abcdef", "bob-token-0123456789abcdef00");
    let operators = world.path("operators");
    std::fs::write(&operators, format!("alice {}\nbob {}\n", token_hash(alice_token), token_hash(bob_token))).unwrap();
    let operators = operators.display().to_string();
    let store = world.pg_store_args(pg, &unique("race"));
    let a = world.control_plane_on("cp-a", &store, "127.0.0.1:0", &["--operators-file", &operators]).await;
    let b = world.control_plane_on("cp-b", &store, "127.0.0.1:0", &["--operators-file", &operators]).await;
    let (mut alice, mut bob) = (admin_as(&a, alice_token).await, admin_as(&b, bob_token).await);
    let tenant = fhirgw_proto::config::v1::Tenant { name: "tenant-a".into(), display_name: String::new(), audit: None };
    alice.put_tenant(api::PutTenantRequest { tenant: Some(tenant), expected_version: String::new() }).await.unwrap();
    let first = alice
        .put_grant(api::PutGrantRequest { grant: Some(grant("tenant-a", "race")), expected_version: "0".into() })
        .await
        .unwrap()
        .into_inner();
    let mut version = first.meta.unwrap().version;
    let mut winners = vec![("alice".to_owned(), version.clone(), "cp-a".to_owned())];
    for round in 0..10 {
        let with_expiry = |secs: i64| {
            let mut g = grant("tenant-a", "race");
            g.expires_at = Some(prost_types::Timestamp { seconds: 4_000_000_000 + secs, nanos: 0 });
            api::PutGrantRequest { grant: Some(g), expected_version: version.clone() }
        };
        let (ra, rb) = tokio::join!(alice.put_grant(with_expiry(round)), bob.put_grant(with_expiry(1000 + round)));
        let (winner, loser, who) = match (ra, rb) {
            (Ok(w), Err(l)) => (w, l, ("alice", "cp-a")),
            (Err(l), Ok(w)) => (w, l, ("bob", "cp-b")),
            (ra, rb) => panic!("round {round}: exactly one must win: {ra:?} / {rb:?}"),
        };
        assert_eq!(loser.code(), Code::FailedPrecondition, "round {round}: {loser:?}");
        version = winner.into_inner().meta.unwrap().version;
        winners.push((who.0.to_owned(), version.clone(), who.1.to_owned()));
    }
    // Both replicas hold the winner of the last round.
    for client in [&mut alice, &mut bob] {
        let key = api::GrantKey { tenant: "tenant-a".into(), tag: Some(fixtures::tag("race")) };
        let mut client = client.clone();
        let version = version.clone();
        eventually("both replicas agree", PROPAGATION, || {
            let (mut client, key, version) = (client.clone(), key.clone(), version.clone());
            async move { (client.get_grant(key).await.ok()?.into_inner().meta?.version == version).then_some(()) }
        })
        .await;
        let _ = &mut client;
    }
    // The audit trail has every winning write, newest first, with its operator and replica; nothing of the losers.
    let audit = alice
        .list_audit(api::ListAuditRequest { kind: "grant".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let got: Vec<(String, String, String)> =
        audit.entries.iter().map(|e| (e.actor.clone(), e.version_after.clone(), e.replica.clone())).collect();
    winners.reverse();
    assert_eq!(got, winners);
    for pair in audit.entries.windows(2) {
        assert_eq!(pair[0].version_before, pair[1].version_after, "each write replaced the one before it");
    }
}

/// PostgreSQL restarted under two replicas: writes during the outage fail fast with UNAVAILABLE and write nothing;
/// data planes keep serving; afterwards the replicas reconnect by themselves and everything resyncs.
#[tokio::test]
async fn postgres_restarted_under_the_replicas() {
    let pg = Arc::new(tokio::task::spawn_blocking(Postgres::start).await.unwrap());
    let world = World::new();
    let fhir = world.fhir_server().await;
    let issuer = fixtures::issuer().await;
    let store = world.pg_store_args(&pg, "outage");
    let a = world.control_plane_on("cp-a", &store, "127.0.0.1:0", &[]).await;
    let b = world.control_plane_on("cp-b", &store, "127.0.0.1:0", &[]).await;
    let dps = [
        world.data_plane("dp-0", &grpc_url(&a), "dp-0-state").await,
        world.data_plane("dp-1", &grpc_url(&b), "dp-1-state").await,
    ];
    let (mut admin_a, mut admin_b) = (admin(&a).await, admin(&b).await);
    let revision = configure(&mut admin_a, &world, &base(&fhir), &issuer).await;
    wait_in_sync(&admin_b, 2, revision).await;

    tokio::task::spawn_blocking({
        let pg = pg.clone();
        move || pg.stop()
    })
    .await
    .unwrap();
    for (client, name) in [(&mut admin_a, "cp-a"), (&mut admin_b, "cp-b")] {
        let started = Instant::now();
        let put = api::PutGrantRequest { grant: Some(grant("tenant-a", "outage")), expected_version: String::new() };
        let err = client.put_grant(put).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{name}: {err:?}");
        assert!(started.elapsed() < Duration::from_secs(8), "{name} took {:?} to fail", started.elapsed());
        // Still answers from memory.
        let s = status(client).await;
        assert_eq!(s.revision, revision, "{name}");
    }
    for dp in &dps {
        let r = http()
            .get(format!("http://{}/fhir/Patient/a-pat-1", dp.addr("fhir")))
            .bearer_auth(issuer.token("tenant-a", READ_SCOPES))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{} serves from memory", dp.name);
    }
    let available = |cp: &Process| {
        let url = format!("http://{}/metrics", cp.addr("admin"));
        async move {
            let text = http().get(url).send().await.unwrap().text().await.unwrap();
            text.lines().find_map(|l| l.strip_prefix("fhirgw_cp_store_available ")).map(str::to_owned)
        }
    };
    assert_eq!(available(&a).await.as_deref(), Some("0"), "the outage shows on /metrics");

    tokio::task::spawn_blocking({
        let pg = pg.clone();
        move || pg.start_again()
    })
    .await
    .unwrap();
    // The replicas reconnect by themselves: a write through B succeeds and reaches the data plane on A.
    let next: u64 = eventually("a write through cp-b after the restart", Duration::from_secs(30), || {
        let mut admin_b = admin_b.clone();
        async move {
            let put = api::PutGrantRequest { grant: Some(grant("tenant-a", "after")), expected_version: String::new() };
            admin_b.put_grant(put).await.ok()?.into_inner().meta?.version.parse().ok()
        }
    })
    .await;
    assert_eq!(next, revision + 1, "the refused writes left no revision behind");
    eventually("cp-a sees the store again", PROPAGATION, || async {
        (available(&a).await.as_deref() == Some("1")).then_some(())
    })
    .await;
    wait_in_sync(&admin_a, 2, next).await;
    wait_in_sync(&admin_b, 2, next).await;
    let audit = admin_a.list_audit(api::ListAuditRequest::default()).await.unwrap().into_inner();
    assert_eq!(audit.entries.len() as u64, next, "one audit record per revision");
    assert!(audit.entries.iter().all(|e| !e.name.contains("outage")), "nothing of the refused writes was stored");
}

/// SIGTERM with data planes connected: the replica ends every config stream and exits within the bound; the data
/// planes reconnect to the other replica.
#[tokio::test]
async fn sigterm_ends_every_stream_and_data_planes_move_to_another_replica() {
    let pg = tokio::task::spawn_blocking(Postgres::shared).await.unwrap();
    let world = World::new();
    let fhir = world.fhir_server().await;
    let issuer = fixtures::issuer().await;
    let store = world.pg_store_args(pg, &unique("sigterm"));
    let mut a = world.control_plane_on("cp-a", &store, "127.0.0.1:0", &["--heartbeat-secs", "1"]).await;
    let b_listen = format!("127.0.0.1:{}", free_port());
    let both = format!("{},http://{b_listen}", grpc_url(&a));
    let mut dps = Vec::new();
    for i in 0..3 {
        dps.push(world.data_plane(&format!("dp-{i}"), &both, &format!("dp-{i}-state")).await);
    }
    let mut admin_a = admin(&a).await;
    let revision = configure(&mut admin_a, &world, &base(&fhir), &issuer).await;
    wait_all_on(&admin_a, 3, revision, "cp-a").await;
    let b = world.control_plane_on("cp-b", &store, &b_listen, &[]).await;
    let admin_b = admin(&b).await;

    let signalled = Instant::now();
    let exit = a.terminate().await.expect("the control plane did not exit within 30 s of SIGTERM");
    let took = signalled.elapsed();
    assert!(exit.success(), "{exit:?}");
    assert!(took < Duration::from_secs(5), "exit took {took:?} (bound: --shutdown-grace-secs 5)");
    println!("SIGTERM to exit with 3 data planes connected: {took:?}");
    let s = wait_all_on(&admin_b, 3, revision, "cp-b").await;
    println!("all 3 data planes on cp-b {:?} after SIGTERM", signalled.elapsed());
    assert!(s.data_planes.iter().all(|d| d.replica == "cp-b"), "{s:?}");
}

/// Data planes that left are listed by every replica: one whose stream closed on replica A shows in B's `GetStatus`
/// with why it left; one connected to a replica that dies unannounced shows once that replica stops reporting it.
#[tokio::test]
async fn data_planes_that_left_are_listed_on_every_replica() {
    let pg = tokio::task::spawn_blocking(Postgres::shared).await.unwrap();
    let world = World::new();
    let store = world.pg_store_args(pg, &unique("departed"));
    let mut a = world.control_plane_on("cp-a", &store, "127.0.0.1:0", &[]).await;
    let b = world.control_plane_on("cp-b", &store, "127.0.0.1:0", &[]).await;
    let admin_b = admin(&b).await;
    let tenant = pb::Tenant { name: "tenant-a".into(), display_name: String::new(), audit: None };
    admin_b
        .clone()
        .put_tenant(api::PutTenantRequest { tenant: Some(tenant), expected_version: String::new() })
        .await
        .unwrap();
    // cp-a has the tenant before anyone connects, so the first response each data plane ACKs is the whole story.
    let admin_a = admin(&a).await;
    eventually("cp-a has the tenant", PROPAGATION, || {
        let mut admin = admin_a.clone();
        async move { (status(&mut admin).await.revision == 1).then_some(()) }
    })
    .await;
    let mut streams = Vec::new();
    for (node, cp) in [("leaving", &a), ("orphan", &a), ("stays", &b)] {
        let (stream, first) = config_stream::open(cp, node, "", 0).await;
        stream.ack(&first).await;
        streams.push(stream);
    }
    let stays = streams.pop().unwrap();
    let orphan = streams.pop().unwrap();
    let leaving = streams.pop().unwrap();
    eventually("cp-b lists the three data planes", PROPAGATION, || {
        let mut admin = admin_b.clone();
        async move { (status(&mut admin).await.data_planes.len() == 3).then_some(()) }
    })
    .await;

    let config_stream::Stream { tx, inbound: _reading } = leaving;
    drop(tx);
    let s = eventually("cp-b lists the data plane that left cp-a", PROPAGATION, || {
        let mut admin = admin_b.clone();
        async move {
            let s = status(&mut admin).await;
            (s.data_planes.len() == 2 && s.recently_disconnected.len() == 1).then_some(s)
        }
    })
    .await;
    let gone = &s.recently_disconnected[0];
    let dp = gone.data_plane.as_ref().unwrap();
    assert_eq!((dp.node_id.as_str(), dp.replica.as_str()), ("leaving", "cp-a"), "{s:?}");
    assert_eq!(gone.reason, "stream closed by the data plane");
    assert_eq!(dp.sync_state, api::SyncState::InSync as i32);

    a.kill().await;
    let s = eventually("cp-b lists the data plane of the dead replica as gone", PROPAGATION, || {
        let mut admin = admin_b.clone();
        async move {
            let s = status(&mut admin).await;
            (s.recently_disconnected.len() == 2).then_some(s)
        }
    })
    .await;
    let nodes: Vec<(&str, &str)> = s
        .recently_disconnected
        .iter()
        .map(|d| (d.data_plane.as_ref().unwrap().node_id.as_str(), d.reason.as_str()))
        .collect();
    assert_eq!(
        nodes,
        [
            ("orphan", "its control-plane replica `cp-a` stopped reporting it"),
            ("leaving", "stream closed by the data plane")
        ],
        "most recent first"
    );
    let connected: Vec<&str> = s.data_planes.iter().map(|d| d.node_id.as_str()).collect();
    assert_eq!(connected, ["stays"]);
    drop((orphan, stays));
}
