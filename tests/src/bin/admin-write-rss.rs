//! Benchmark (issue 12.2): peak RSS of a control plane under N concurrent maximum-size `PutRouteTable` calls.
//!
//! Starts the control-plane binary given as the first argument (default: the one built beside this binary) on a
//! fresh SQLite store, sends N (default 20) concurrent PutRouteTable calls of SIZE bytes (default 15,000,000) and
//! prints the answers and the process's VmHWM before and after. Run it against the binary before and after a change:
//!   cargo run --release -p fhirgw-e2e --bin admin-write-rss -- [CONTROLPLANE_BINARY] [N] [SIZE]

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Instant;

use fhirgw_e2e::{Process, World, admin, binary};
use fhirgw_proto::admin::v1 as api;
use fhirgw_proto::config::v1 as pb;

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find(|l| l.starts_with("VmHWM:")).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bin = args.get(1).map_or_else(|| binary("fhirgw-controlplane"), Into::into);
    let n: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(20);
    let size: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(15_000_000);
    let world = World::new();
    let mut command = tokio::process::Command::new(&bin);
    command
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--store"])
        .arg(world.path("cp.db"))
        .arg("--operator-token-file")
        .arg(world.path("operator.token"))
        .arg("--dataplane-token-file")
        .arg(world.path("dataplane.token"))
        .env("RUST_LOG", "warn");
    let cp = Process::spawn("cp", command, world.dir.path()).await;
    let pid = cp.pid().unwrap();
    let client = admin(&cp).await;
    let before = vm_hwm_kib(pid);
    let table = pb::RouteTable {
        name: "huge".into(),
        routes: vec![pb::Route { id: "x".repeat(size), path: "/**".into(), ..Default::default() }],
        ..Default::default()
    };
    let started = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (mut client, table) = (client.clone(), table.clone());
        calls.spawn(async move {
            client
                .put_route_table(api::PutRouteTableRequest {
                    route_table: Some(table),
                    expected_version: String::new(),
                })
                .await
        });
    }
    let mut codes: BTreeMap<String, usize> = BTreeMap::new();
    while let Some(r) = calls.join_next().await {
        let code = match r.unwrap() {
            Ok(_) => "OK".to_owned(),
            Err(status) => format!("{:?}", status.code()),
        };
        *codes.entry(code).or_default() += 1;
    }
    let after = vm_hwm_kib(pid);
    println!(
        "{} | {n} concurrent PutRouteTable of {size} bytes | answers {codes:?} in {:.0} ms | VmHWM {:.1} MiB -> {:.1} MiB",
        bin.display(),
        started.elapsed().as_secs_f64() * 1e3,
        before as f64 / 1024.0,
        after as f64 / 1024.0
    );
}
