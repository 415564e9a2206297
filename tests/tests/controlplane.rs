//! The control plane's store, end to end, on the backend the run selects (`FHIRGW_TEST_STORE=postgres`: the
//! harness's PostgreSQL; else SQLite): store identity and the data planes that refuse it, one control plane per
//! SQLite file, the audit trail with named operators, and the admin API's message-size limit.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant, SystemTime};

use fhirgw_e2e::fixtures::{grant, status, tag};
use fhirgw_e2e::{World, admin, admin_as, binary, config_stream, eventually, grpcurl, token_hash};
use fhirgw_proto::admin::v1 as api;
use fhirgw_proto::config::v1 as pb;
use fhirgw_proto::push::v1 as push;
use prost::Message;
use tonic::Code;

#[tokio::test]
async fn a_sqlite_store_is_held_by_one_control_plane_only() {
    let world = World::new();
    let path = world.path("shared.db").display().to_string();
    let mut first = world.control_plane_on("cp-1", &["--store".into(), path.clone()], "127.0.0.1:0", &[]).await;

    // A second control plane on the same file refuses to start, saying why.
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(binary("fhirgw-controlplane"))
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--store", &path])
            .arg("--operator-token-file")
            .arg(world.path("operator.token"))
            .arg("--dataplane-token-file")
            .arg(world.path("dataplane.token"))
            .output(),
    )
    .await
    .expect("the second control plane neither started nor stopped")
    .unwrap();
    assert!(!out.status.success(), "a second control plane started on the same SQLite file");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("another control plane holds the SQLite store"), "{stderr}");
    assert!(out.stdout.is_empty(), "it must not have listened: {}", String::from_utf8_lossy(&out.stdout));

    // The first is unharmed; once it is gone (even by SIGKILL) the store opens again, same store.
    let mut admin1 = admin(&first).await;
    let id = status(&mut admin1).await.store_id;
    first.kill().await;
    let second = world.control_plane_on("cp-2", &["--store".into(), path], "127.0.0.1:0", &[]).await;
    assert_eq!(status(&mut admin(&second).await).await.store_id, id);
}

#[tokio::test]
async fn a_store_keeps_its_identity_and_a_new_store_gets_another() {
    let world = World::new();
    let mut cp = world.control_plane_on("cp", &world.store_args("cp.db"), "127.0.0.1:0", &[]).await;
    let id = status(&mut admin(&cp).await).await.store_id;
    assert_eq!(id.len(), 32, "{id}");
    assert!(id.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
    cp.kill().await;
    let again = world.control_plane_on("cp-again", &world.store_args("cp.db"), "127.0.0.1:0", &[]).await;
    assert_eq!(status(&mut admin(&again).await).await.store_id, id, "the identity is stored, not made per process");
    let fresh = world.control_plane_on("cp-fresh", &world.store_args("fresh.db"), "127.0.0.1:0", &[]).await;
    assert_ne!(status(&mut admin(&fresh).await).await.store_id, id);
}

#[tokio::test]
async fn data_planes_that_hold_another_store_or_refuse_this_one_are_shown() {
    let world = World::new();
    let cp = world.control_plane_on("cp", &world.store_args("cp.db"), "127.0.0.1:0", &[]).await;
    let mut admin = admin(&cp).await;
    let tenant = pb::Tenant { name: "tenant-a".into(), display_name: String::new(), audit: None };
    admin.put_tenant(api::PutTenantRequest { tenant: Some(tenant), expected_version: String::new() }).await.unwrap();
    let s = status(&mut admin).await;
    let (store_id, revision) = (s.store_id.clone(), s.revision);
    let foreign = "0123456789abcdef0123456789abcdef";

    // Every response carries the store identity.
    let (plain, first) = config_stream::open(&cp, "plain", "", 0).await;
    assert_eq!(first.store_id, store_id);
    plain.tx.send(push::ConfigRequest { response_nonce: first.nonce, ..Default::default() }).await.unwrap();
    let (_other_store, first) = config_stream::open(&cp, "other-store", foreign, 29).await;
    assert_eq!(first.store_id, store_id);
    let (_ahead, _) = config_stream::open(&cp, "ahead", &store_id, revision + 28).await;
    // The data plane that refuses a whole response NACKs it naming no resource, saying why (the store identity).
    let (refusing, first) = config_stream::open(&cp, "refusing", "", 0).await;
    let summary = format!("refusing configuration from store {store_id}: this data plane holds store {foreign}");
    refusing
        .tx
        .send(push::ConfigRequest {
            response_nonce: first.nonce,
            nack: Some(push::Nack { rejected: Vec::new(), summary: summary.clone() }),
            ..Default::default()
        })
        .await
        .unwrap();

    let s = eventually("four data planes, the refusing one's NACK recorded", Duration::from_secs(10), || {
        let mut admin = admin.clone();
        async move {
            let s = status(&mut admin).await;
            (s.data_planes.len() == 4 && s.data_planes.iter().any(|d| d.node_id == "refusing" && d.last_nack.is_some()))
                .then_some(s)
        }
    })
    .await;
    let warnings = |node: &str| s.data_planes.iter().find(|d| d.node_id == node).unwrap().store_warnings.clone();
    assert_eq!(warnings("plain"), Vec::<String>::new());
    let other = s.data_planes.iter().find(|d| d.node_id == "other-store").unwrap();
    assert_eq!((other.held_store_id.as_str(), other.held_system_version), (foreign, 29));
    assert_eq!(warnings("other-store").len(), 1);
    assert!(warnings("other-store")[0].contains(&format!("store {foreign}")), "{:?}", warnings("other-store"));
    assert!(warnings("ahead")[0].contains(&format!("revision {}", revision + 28)), "{:?}", warnings("ahead"));
    assert!(warnings("ahead")[0].contains("newer"), "{:?}", warnings("ahead"));
    assert!(warnings("refusing")[0].contains("NACK refusing this store"), "{:?}", warnings("refusing"));
    assert!(warnings("refusing")[0].contains(&summary), "{:?}", warnings("refusing"));
    drop(plain.inbound);
}

/// `GetStatus` as grpcurl prints it, without `-emit-defaults`: every data plane's `syncState` shows, in sync or not;
/// a data plane whose stream closed is listed with when and why it left, until it connects again.
#[tokio::test]
async fn get_status_shows_sync_state_and_data_planes_that_left() {
    let world = World::new();
    let cp = world.control_plane_on("cp", &world.store_args("cp.db"), "127.0.0.1:0", &[]).await;
    let mut admin = admin(&cp).await;
    let tenant = pb::Tenant { name: "tenant-a".into(), display_name: String::new(), audit: None };
    admin.put_tenant(api::PutTenantRequest { tenant: Some(tenant), expected_version: String::new() }).await.unwrap();
    let (synced, first) = config_stream::open(&cp, "synced", "", 0).await;
    synced.ack(&first).await;
    let (_lagging, _) = config_stream::open(&cp, "lagging", "", 0).await;
    let (leaving, first) = config_stream::open(&cp, "leaving", "", 0).await;
    leaving.ack(&first).await;
    eventually("three data planes, two in sync", Duration::from_secs(10), || {
        let mut admin = admin.clone();
        async move {
            let s = status(&mut admin).await;
            (s.data_planes.len() == 3 && s.data_planes.iter().filter(|d| d.in_sync).count() == 2).then_some(())
        }
    })
    .await;

    // The data plane closes its side of the stream.
    let before = SystemTime::now();
    let config_stream::Stream { tx, inbound: _still_reading } = leaving;
    drop(tx);
    eventually("the data plane that left is listed as such", Duration::from_secs(10), || {
        let mut admin = admin.clone();
        async move { (status(&mut admin).await.recently_disconnected.len() == 1).then_some(()) }
    })
    .await;
    let (ok, out, err) = grpcurl(&cp, &[], &["fhirgw.admin.v1.Admin/GetStatus"]).await;
    assert!(ok, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let sync: Vec<(&str, &str)> = json["dataPlanes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["nodeId"].as_str().unwrap(), d["syncState"].as_str().unwrap_or("(hidden)")))
        .collect();
    assert_eq!(sync, [("lagging", "OUT_OF_SYNC"), ("synced", "IN_SYNC")], "{json}");
    let gone = &json["recentlyDisconnected"];
    assert_eq!(gone.as_array().map(Vec::len), Some(1), "{json}");
    assert_eq!(gone[0]["dataPlane"]["nodeId"], "leaving", "{json}");
    assert_eq!(gone[0]["dataPlane"]["syncState"], "IN_SYNC", "it left with the current configuration: {json}");
    assert_eq!(gone[0]["reason"], "stream closed by the data plane", "{json}");
    let s = status(&mut admin).await;
    let at = s.recently_disconnected[0].disconnected_at.unwrap();
    let (from, to) = (prost_types::Timestamp::from(before), prost_types::Timestamp::from(SystemTime::now()));
    assert!((from.seconds, from.nanos) <= (at.seconds, at.nanos) && (at.seconds, at.nanos) <= (to.seconds, to.nanos));

    // Back again: connected, no longer listed as gone.
    let (back, first) = config_stream::open(&cp, "leaving", "", 0).await;
    back.ack(&first).await;
    let s = status(&mut admin).await;
    assert!(s.recently_disconnected.is_empty(), "{s:?}");
    assert!(s.data_planes.iter().any(|d| d.node_id == "leaving"), "{s:?}");
}

/// `ListGrants` marks expired grants; `DeleteTenant` is refused while a grant has not expired (and then deletes
/// nothing), and deletes a tenant whose grants have all expired, each expired grant as its own audited write.
#[tokio::test]
async fn expired_grants_are_marked_and_do_not_keep_their_tenant() {
    let world = World::new();
    let cp = world.control_plane_on("cp", &world.store_args("cp.db"), "127.0.0.1:0", &[]).await;
    let mut admin = admin(&cp).await;
    let tenant = pb::Tenant { name: "tenant-a".into(), display_name: String::new(), audit: None };
    admin.put_tenant(api::PutTenantRequest { tenant: Some(tenant), expected_version: String::new() }).await.unwrap();
    let soon = prost_types::Timestamp::from(SystemTime::now() + Duration::from_secs(2));
    let short = pb::Grant { expires_at: Some(soon), ..grant("tenant-a", "short") };
    for g in [short, grant("tenant-a", "open-ended")] {
        admin.put_grant(api::PutGrantRequest { grant: Some(g), expected_version: String::new() }).await.unwrap();
    }
    let list = || async {
        let (ok, out, err) =
            grpcurl(&cp, &["-d", r#"{"tenant":"tenant-a"}"#], &["fhirgw.admin.v1.Admin/ListGrants"]).await;
        assert!(ok, "{err}");
        let json: serde_json::Value = serde_json::from_str(&out).unwrap();
        // No grants: grpcurl prints `{}`.
        json["grants"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|g| (g["grant"]["tag"]["code"].as_str().unwrap().to_owned(), g["expired"] == true))
            .collect::<Vec<_>>()
    };
    assert_eq!(list().await, [("open-ended".to_owned(), false), ("short".to_owned(), false)]);
    eventually("the short grant has expired", Duration::from_secs(10), || async {
        (list().await == [("open-ended".to_owned(), false), ("short".to_owned(), true)]).then_some(())
    })
    .await;
    let key = api::GrantKey { tenant: "tenant-a".into(), tag: Some(tag("short")) };
    assert!(admin.get_grant(key).await.unwrap().into_inner().expired);

    // One grant still gives access: refused, and nothing is deleted.
    let revision = status(&mut admin).await.revision;
    let (ok, _, err) = grpcurl(&cp, &["-d", r#"{"name":"tenant-a"}"#], &["fhirgw.admin.v1.Admin/DeleteTenant"]).await;
    assert!(!ok && err.contains("FailedPrecondition") && err.contains("1 grant(s) that have not expired"), "{err}");
    assert_eq!(status(&mut admin).await.revision, revision, "a refused delete writes nothing");
    assert_eq!(list().await.len(), 2);

    // Only expired grants left: the tenant goes, and its expired grant with it.
    let (tenant_a, open_ended) = ("tenant-a".to_owned(), Some(tag("open-ended")));
    let delete = api::DeleteGrantRequest { tenant: tenant_a, tag: open_ended, expected_version: String::new() };
    admin.delete_grant(delete).await.unwrap();
    let (ok, out, err) = grpcurl(&cp, &["-d", r#"{"name":"tenant-a"}"#], &["fhirgw.admin.v1.Admin/DeleteTenant"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("revision"), "{out}");
    assert!(list().await.is_empty());
    assert_eq!(admin.get_tenant(api::GetRequest { name: "tenant-a".into() }).await.unwrap_err().code(), Code::NotFound);
    let trail = admin.list_audit(api::ListAuditRequest { page_size: 2, ..Default::default() }).await.unwrap();
    let last: Vec<(String, String, String)> =
        trail.into_inner().entries.into_iter().map(|e| (e.operation, e.kind, e.name)).collect();
    assert_eq!(
        last,
        [
            ("delete".into(), "tenant".into(), "tenant-a".into()),
            ("delete".into(), "grant".into(), "tenant-a/https://fhirgw.dev/dataset|short".into()),
        ]
    );
}

#[tokio::test]
async fn list_audit_shows_every_write_with_its_operator_filtered_and_paged() {
    let world = World::new();
    let (alice_token, bob_token, carol_token) =
        ("alice-token-0123456789abcdef", "bob-token-0123456789abcdef00", "carol-token-0123456789abcdef0");
    let operators = world.path("operators");
    std::fs::write(
        &operators,
        format!("# on call\nalice {}\nbob {}\n", token_hash(alice_token), token_hash(bob_token)),
    )
    .unwrap();
    let operators_arg = operators.display().to_string();
    let cp = world
        .control_plane_on("cp", &world.store_args("cp.db"), "127.0.0.1:0", &["--operators-file", &operators_arg])
        .await;
    let (mut alice, mut bob, mut single) =
        (admin_as(&cp, alice_token).await, admin_as(&cp, bob_token).await, admin(&cp).await);

    let started = SystemTime::now();
    let tenant = |name: &str| api::PutTenantRequest {
        tenant: Some(pb::Tenant { name: name.into(), display_name: format!("{name} display"), audit: None }),
        expected_version: String::new(),
    };
    alice.put_tenant(tenant("tenant-a")).await.unwrap();
    bob.put_tenant(tenant("tenant-b")).await.unwrap();
    single.put_tenant(tenant("tenant-c")).await.unwrap();
    let g = api::PutGrantRequest { grant: Some(grant("tenant-a", "ds-1")), expected_version: String::new() };
    alice.put_grant(g).await.unwrap();
    let key = |t: &str, code: &str| (t.to_owned(), Some(tag(code)));
    let (tenant_a, tag1) = key("tenant-a", "ds-1");
    bob.delete_grant(api::DeleteGrantRequest { tenant: tenant_a, tag: tag1, expected_version: "4".into() })
        .await
        .unwrap();
    // A refused write leaves no record.
    let refused = bob
        .put_grant(api::PutGrantRequest { grant: Some(grant("nobody", "x")), expected_version: String::new() })
        .await;
    assert_eq!(refused.unwrap_err().code(), Code::InvalidArgument);

    let lister = alice.clone();
    let list = |req: api::ListAuditRequest| {
        let mut alice = lister.clone();
        async move { alice.list_audit(req).await.unwrap().into_inner() }
    };
    let all = list(api::ListAuditRequest::default()).await;
    let rows: Vec<(u64, &str, &str, &str, &str, &str, &str)> = all
        .entries
        .iter()
        .map(|e| {
            (
                e.revision,
                e.actor.as_str(),
                e.operation.as_str(),
                e.kind.as_str(),
                e.name.as_str(),
                e.version_before.as_str(),
                e.version_after.as_str(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            (5, "bob", "delete", "grant", "tenant-a/https://fhirgw.dev/dataset|ds-1", "4", ""),
            (4, "alice", "put", "grant", "tenant-a/https://fhirgw.dev/dataset|ds-1", "", "4"),
            (3, "operator", "put", "tenant", "tenant-c", "", "3"),
            (2, "bob", "put", "tenant", "tenant-b", "", "2"),
            (1, "alice", "put", "tenant", "tenant-a", "", "1"),
        ],
        "newest first, every write, with its operator"
    );
    assert!(all.next_page_token.is_empty());
    assert!(all.entries.iter().all(|e| e.replica == "cp"));
    // The stored body, as its config message.
    let body = all.entries[4].body.as_ref().unwrap();
    assert_eq!(body.type_url, "type.googleapis.com/fhirgw.config.v1.Tenant");
    assert_eq!(pb::Tenant::decode(body.value.as_slice()).unwrap().display_name, "tenant-a display");
    assert!(all.entries[0].body.is_none(), "a delete stores no body");
    let at = all.entries[0].at.unwrap();
    let since = prost_types::Timestamp::from(started - Duration::from_secs(1));
    assert!(at.seconds >= since.seconds);
    // No token anywhere in the trail.
    let debug = format!("{all:?}");
    for token in [alice_token, bob_token, fhirgw_e2e::OPERATOR_TOKEN] {
        assert!(!debug.contains(token) && !debug.contains(&token_hash(token)), "a credential in the audit trail");
    }

    // Filters: kind, name, actor, time range; pages.
    let revisions = |r: api::ListAuditResponse| r.entries.iter().map(|e| e.revision).collect::<Vec<_>>();
    assert_eq!(revisions(list(api::ListAuditRequest { kind: "tenant".into(), ..Default::default() }).await), [3, 2, 1]);
    assert_eq!(revisions(list(api::ListAuditRequest { actor: "bob".into(), ..Default::default() }).await), [5, 2]);
    assert_eq!(revisions(list(api::ListAuditRequest { name: "tenant-b".into(), ..Default::default() }).await), [2]);
    let future = prost_types::Timestamp::from(SystemTime::now() + Duration::from_secs(3600));
    assert_eq!(
        revisions(list(api::ListAuditRequest { since: Some(future), ..Default::default() }).await),
        Vec::<u64>::new()
    );
    assert_eq!(
        revisions(list(api::ListAuditRequest { since: Some(since), until: Some(future), ..Default::default() }).await)
            .len(),
        5
    );
    assert_eq!(
        revisions(list(api::ListAuditRequest { until: Some(since), ..Default::default() }).await),
        Vec::<u64>::new()
    );
    let page1 = list(api::ListAuditRequest { page_size: 2, ..Default::default() }).await;
    assert_eq!(revisions(page1.clone()), [5, 4]);
    let page2 =
        list(api::ListAuditRequest { page_size: 2, page_token: page1.next_page_token, ..Default::default() }).await;
    assert_eq!(revisions(page2.clone()), [3, 2]);
    let page3 =
        list(api::ListAuditRequest { page_size: 2, page_token: page2.next_page_token, ..Default::default() }).await;
    assert_eq!(revisions(page3.clone()), [1]);
    assert!(page3.next_page_token.is_empty());
    let bad =
        alice.list_audit(api::ListAuditRequest { kind: "secret".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    let bad =
        alice.list_audit(api::ListAuditRequest { page_token: "x".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);

    // grpcurl shows the body as JSON through reflection.
    let (ok, out, err) =
        grpcurl(&cp, &["-d", r#"{"name":"tenant-a","kind":"tenant"}"#], &["fhirgw.admin.v1.Admin/ListAudit"]).await;
    assert!(ok, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["entries"][0]["body"]["@type"], "type.googleapis.com/fhirgw.config.v1.Tenant", "{json}");
    assert_eq!(json["entries"][0]["body"]["displayName"], "tenant-a display", "{json}");
    assert_eq!(json["entries"][0]["actor"], "alice", "{json}");

    // The operators file is reloaded without a restart: carol is added, bob revoked.
    std::fs::write(&operators, format!("alice {}\ncarol {}\n", token_hash(alice_token), token_hash(carol_token)))
        .unwrap();
    let mut carol = admin_as(&cp, carol_token).await;
    eventually("carol's credential is accepted", Duration::from_secs(15), || {
        let mut carol = carol.clone();
        async move { carol.put_tenant(tenant("tenant-d")).await.ok() }
    })
    .await;
    assert_eq!(bob.put_tenant(tenant("tenant-e")).await.unwrap_err().code(), Code::Unauthenticated);
    let latest = list(api::ListAuditRequest { page_size: 1, ..Default::default() }).await;
    assert_eq!((latest.entries[0].actor.as_str(), latest.entries[0].name.as_str()), ("carol", "tenant-d"));
    // A broken file is refused whole; the last good one stays.
    std::fs::write(&operators, "carol not-a-hash\n").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    carol.put_tenant(tenant("tenant-f")).await.expect("the last good operators file stays in force");
}

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Twenty concurrent 15 MB PutRouteTable calls: refused RESOURCE_EXHAUSTED from the length prefix, unread, so the
/// control plane's peak memory barely moves (it decoded all of them before: ~586 MB).
#[tokio::test]
async fn oversized_admin_writes_are_refused_unread() {
    let world = World::new();
    let cp = world.control_plane_on("cp", &world.store_args("cp.db"), "127.0.0.1:0", &[]).await;
    let pid = cp.pid().unwrap();
    let admin = admin(&cp).await;
    let before = vm_hwm_kib(pid);
    let table = pb::RouteTable {
        name: "huge".into(),
        routes: vec![pb::Route { id: "x".repeat(15_000_000), path: "/**".into(), ..Default::default() }],
        ..Default::default()
    };
    let started = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let mut admin = admin.clone();
        let table = table.clone();
        calls.spawn(async move {
            admin
                .put_route_table(api::PutRouteTableRequest {
                    route_table: Some(table),
                    expected_version: String::new(),
                })
                .await
        });
    }
    while let Some(r) = calls.join_next().await {
        let err = r.unwrap().unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    }
    let peak = vm_hwm_kib(pid);
    println!(
        "20 concurrent 15 MB PutRouteTable: refused in {:?}; control plane VmHWM {before} KiB -> {peak} KiB",
        started.elapsed()
    );
    assert!(peak < before + 64 * 1024, "peak RSS grew from {before} KiB to {peak} KiB");
    assert_eq!(status(&mut admin.clone()).await.revision, 0);
}
