//! Benchmark: how long one grant change takes to reach 1, 10 and 100 connected data-plane config clients, in two
//! set-ups measured in one run: one control plane on its SQLite store, and two control-plane replicas on one
//! PostgreSQL (started by the harness) with the clients split evenly between them and every write made through the
//! first (so half the clients hear of it through LISTEN/NOTIFY on the other replica).
//!
//! Real control-plane processes (release build); the config clients are the data plane's own `ConfigClient`, many
//! in this one process, each with its own state. One sample = from the start of the `PutGrant` call until every
//! client has validated and swapped in the new snapshot.
//!
//! Run: `./dev bench` (or `cargo run --release -p fhirgw-e2e --bin propagation-bench -- [ROUNDS]`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use fhirgw_dataplane::config_client::ConfigClient;
use fhirgw_dataplane::state::ConfigState;
use fhirgw_e2e::fixtures::{self, grant};
use fhirgw_e2e::postgres::Postgres;
use fhirgw_e2e::{Admin, DATAPLANE_TOKEN, World, admin, grpc_url};
use fhirgw_proto::admin::v1 as api;
use fhirgw_proto::config::v1 as pb;
use fhirgw_proto::push::v1 as push;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() {
    let rounds: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(50);
    let world = World::new();
    println!("| store | control planes | data planes | rounds | p50 | p99 | max |");
    println!("|---|---:|---:|---:|---:|---:|---:|");

    let cp = world
        .control_plane_on("cp", &["--store".into(), world.path("bench.db").display().to_string()], "127.0.0.1:0", &[])
        .await;
    let mut admin = admin(&cp).await;
    seed(&mut admin).await;
    run("SQLite", &mut admin, &[grpc_url(&cp)], rounds).await;

    let pg = tokio::task::spawn_blocking(Postgres::start).await.unwrap();
    let store = world.pg_store_args(&pg, "bench");
    let a = world.control_plane_on("cp-a", &store, "127.0.0.1:0", &[]).await;
    let b = world.control_plane_on("cp-b", &store, "127.0.0.1:0", &[]).await;
    let mut admin = fhirgw_e2e::admin(&a).await;
    seed(&mut admin).await;
    run("PostgreSQL", &mut admin, &[grpc_url(&a), grpc_url(&b)], rounds).await;
    drop((a, b, cp));
    tokio::task::spawn_blocking(move || drop(pg)).await.unwrap();
}

/// A realistic configuration: upstream, route table, 20 tenants with a grant each.
async fn seed(admin: &mut Admin) {
    admin
        .put_upstream(api::PutUpstreamRequest {
            upstream: Some(pb::Upstream {
                name: "fhir".into(),
                base_url: "http://127.0.0.1:9/fhir".into(),
                ..Default::default()
            }),
            expected_version: String::new(),
        })
        .await
        .unwrap();
    admin
        .put_route_table(api::PutRouteTableRequest {
            route_table: Some(fixtures::route_table()),
            expected_version: String::new(),
        })
        .await
        .unwrap();
    for i in 0..20 {
        let name = format!("tenant-{i}");
        admin
            .put_tenant(api::PutTenantRequest {
                tenant: Some(pb::Tenant { name: name.clone(), display_name: String::new(), audit: None }),
                expected_version: String::new(),
            })
            .await
            .unwrap();
        admin
            .put_grant(api::PutGrantRequest { grant: Some(grant(&name, &name)), expected_version: String::new() })
            .await
            .unwrap();
    }
}

/// Clients are spread round-robin over `endpoints`; every write goes through `admin`.
async fn run(store: &str, admin: &mut Admin, endpoints: &[String], rounds: usize) {
    let mut all_clients = Vec::new();
    for n in [1usize, 10, 100] {
        // Top the fleet up to n clients.
        while all_clients.len() < n {
            let state = ConfigState::new();
            let client = ConfigClient {
                endpoint: endpoints[all_clients.len() % endpoints.len()].clone(),
                token: Some(DATAPLANE_TOKEN.into()),
                tls: None,
                node: push::Node { id: format!("bench-{store}-{}", all_clients.len()), ..Default::default() },
                state: state.clone(),
                persist: None,
                metrics: fhirgw_dataplane::metrics::Metrics::new(state.clone()),
            };
            tokio::spawn(client.run());
            all_clients.push(state);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while !all_clients.iter().all(|s| s.is_ready()) {
            assert!(Instant::now() < deadline, "clients did not become ready");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut samples = Vec::with_capacity(rounds);
        for round in 0..rounds {
            let mut receivers: Vec<_> = all_clients.iter().map(|s| s.subscribe()).collect();
            for rx in &mut receivers {
                rx.borrow_and_update();
            }
            // Alternate between adding and removing a grant so every round is a real change.
            let started = Instant::now();
            if round % 2 == 0 {
                admin
                    .put_grant(api::PutGrantRequest {
                        grant: Some(grant("tenant-0", "extra")),
                        expected_version: String::new(),
                    })
                    .await
                    .unwrap();
            } else {
                admin
                    .delete_grant(api::DeleteGrantRequest {
                        tenant: "tenant-0".into(),
                        tag: Some(fixtures::tag("extra")),
                        expected_version: String::new(),
                    })
                    .await
                    .unwrap();
            }
            for rx in &mut receivers {
                tokio::time::timeout(Duration::from_secs(30), rx.changed())
                    .await
                    .expect("propagation timed out")
                    .unwrap();
            }
            samples.push(started.elapsed());
        }
        samples.sort();
        println!(
            "| {store} | {} | {n} | {rounds} | {:.2} ms | {:.2} ms | {:.2} ms |",
            endpoints.len(),
            percentile(&samples, 0.5).as_secs_f64() * 1e3,
            percentile(&samples, 0.99).as_secs_f64() * 1e3,
            samples[samples.len() - 1].as_secs_f64() * 1e3
        );
    }
}
