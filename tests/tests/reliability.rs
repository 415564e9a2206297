//! Issue 12, end to end with real processes: bounded connections at a low file limit, configuration that cannot go
//! backwards, damaged snapshot files, SIGTERM under keep-alive load.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fhirgw_dataplane::persist::HEADER_LEN;
use fhirgw_e2e::fixtures::{self, READ_SCOPES, configure};
use fhirgw_e2e::{Process, World, admin, dp_config, eventually, grpc_url, http};
use fhirgw_proto::push::v1 as push;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A client that gives up quickly: a data plane that is offline must fail the test, not hang it.
fn quick() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap()
}

async fn metric(dp: &Process, line_prefix: &str) -> f64 {
    let text = http().get(format!("http://{}/metrics", dp.addr("admin"))).send().await.unwrap().text().await.unwrap();
    text.lines().find_map(|l| l.strip_prefix(line_prefix).and_then(|rest| rest.trim().parse().ok())).unwrap_or(0.0)
}

#[tokio::test]
async fn silent_connections_do_not_take_a_data_plane_offline_at_a_low_file_limit() {
    let world = World::new();
    let fhir = world.fhir_server().await;
    let issuer = fixtures::issuer().await;
    let cp = world.control_plane("cp", "cp.db").await;
    let dp = world
        .data_plane_wrapped(
            "dp",
            &grpc_url(&cp),
            "dp-state",
            &world.path("dataplane.token"),
            &["prlimit", "--nofile=256", "--"],
            &["--first-request-timeout-secs", "3"],
        )
        .await;
    let mut admin = admin(&cp).await;
    let revision = configure(&mut admin, &world, fhir.ready["base_url"].as_str().unwrap(), &issuer).await;
    fixtures::wait_in_sync(&admin, 1, revision).await;
    let token = issuer.token("tenant-a", READ_SCOPES);

    // More silent connections than the process has file descriptors.
    let mut silent = Vec::new();
    for _ in 0..400 {
        silent.push(TcpStream::connect(dp.addr("fhir")).await.unwrap());
    }
    let opened = Instant::now();

    // A new client still gets answers on both ports, at once.
    let admin_base = format!("http://{}", dp.addr("admin"));
    for path in ["/healthz", "/readyz"] {
        let r = quick().get(format!("{admin_base}{path}")).send().await.unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(r.status(), 200, "{path}");
    }
    let r = quick()
        .get(format!("http://{}/fhir/Patient/a-pat-1", dp.addr("fhir")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap_or_else(|e| panic!("a FHIR read among 400 silent connections: {e}"));
    assert_eq!(r.status(), 200);
    assert!(opened.elapsed() < Duration::from_secs(3), "answered before any silent connection timed out");

    // Every silent connection is closed by the data plane: evicted at the cap, or after the first-request timeout.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    for (i, stream) in silent.iter_mut().enumerate() {
        let mut buf = [0u8; 1];
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => {}
            Ok(Ok(_)) => panic!("silent connection {i} received bytes"),
            Err(_) => panic!("silent connection {i} is still open after {:?}", opened.elapsed()),
        }
    }
    let evicted = metric(&dp, "fhirgw_dp_connections_closed_total{listener=\"fhir\",reason=\"evicted\"}").await;
    let timed_out =
        metric(&dp, "fhirgw_dp_connections_closed_total{listener=\"fhir\",reason=\"first_request_timeout\"}").await;
    assert!(evicted > 0.0, "at the cap, silent connections make room for new ones");
    assert!(timed_out > 0.0, "silent connections under the cap are closed after the timeout");
    assert!(evicted + timed_out >= 400.0, "evicted {evicted} + timed out {timed_out}");
    assert_eq!(metric(&dp, "fhirgw_dp_connections_open{listener=\"fhir\"}").await, 0.0);

    // And the data plane still serves as before.
    let r = quick()
        .get(format!("http://{}/fhir/Patient/a-pat-1", dp.addr("fhir")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// The snapshot file a data plane wrote, once it holds `revision`.
async fn snapshot_bytes(world: &World, state_dir: &str) -> Vec<u8> {
    std::fs::read(world.path(state_dir).join("snapshot.pb")).unwrap()
}

#[tokio::test]
async fn a_data_plane_refuses_the_configuration_of_a_control_plane_on_an_empty_store() {
    let world = World::new();
    let fhir = world.fhir_server().await;
    let issuer = fixtures::issuer().await;
    let mut cp = world.control_plane("cp", "cp.db").await;
    let mut dp = world.data_plane("dp", &grpc_url(&cp), "dp-state").await;
    let mut admin = admin(&cp).await;
    let revision = configure(&mut admin, &world, fhir.ready["base_url"].as_str().unwrap(), &issuer).await;
    fixtures::wait_in_sync(&admin, 1, revision).await;
    let token = issuer.token("tenant-a", READ_SCOPES);
    let saved = eventually("the snapshot is on disk", Duration::from_secs(10), || async {
        let bytes = std::fs::read(world.path("dp-state").join("snapshot.pb")).ok()?;
        let message = push::SnapshotFile::decode(bytes.get(HEADER_LEN..)?).ok()?;
        (message.system_version == revision).then_some(bytes)
    })
    .await;
    dp.kill().await;
    cp.kill().await;

    // A new control plane on a fresh store (a new pod on an empty volume), and the data plane restarted.
    let cp2 = world.control_plane_args("cp2", "fresh.db", "127.0.0.1:0", &["--heartbeat-secs", "1"]).await;
    let dp = world.data_plane("dp", &grpc_url(&cp2), "dp-state").await;
    let config = eventually("the data plane refuses the empty store's configuration", Duration::from_secs(20), || {
        let dp = &dp;
        async move {
            let config = dp_config(dp).await;
            (!config["refusing"].is_null()).then_some(config)
        }
    })
    .await;
    assert_eq!(config["system_version"], revision, "{config:#}");
    assert!(config["refusing"]["reason"].as_str().unwrap().contains(&format!("holds revision {revision}")));

    // It keeps serving its snapshot, says so on /readyz, and alerts.
    let readyz = http().get(format!("http://{}/readyz", dp.addr("admin"))).send().await.unwrap();
    assert_eq!(readyz.status(), 200);
    let detail = readyz.text().await.unwrap();
    assert!(detail.contains("refusing") && detail.contains(&format!("revision {revision}")), "{detail}");
    let r = http().get(format!("http://{}/fhir/Patient/a-pat-1", dp.addr("fhir"))).bearer_auth(&token).send().await;
    assert_eq!(r.unwrap().status(), 200, "the last good snapshot is served");
    assert_eq!(metric(&dp, "fhirgw_dp_config_refusing").await, 1.0);
    assert!(metric(&dp, "fhirgw_dp_config_refusals_total").await >= 1.0);
    assert!(metric(&dp, "fhirgw_dp_config_nacks_total").await >= 1.0);
    assert_eq!(snapshot_bytes(&world, "dp-state").await, saved, "the snapshot on disk is untouched");
    let log = std::fs::read_to_string(&dp.log).unwrap();
    assert!(
        log.lines().any(|l| l.contains("ERROR") && l.contains("refusing the control plane's configuration")),
        "{log}"
    );
    // The control plane sees the NACK.
    let mut admin2 = fhirgw_e2e::admin(&cp2).await;
    let status = eventually("the control plane records the NACK", Duration::from_secs(10), || {
        let mut admin2 = admin2.clone();
        async move {
            let s = fixtures::status(&mut admin2).await;
            s.data_planes
                .iter()
                .any(|d| d.last_nack.as_ref().is_some_and(|n| n.summary.contains("refused")))
                .then_some(s)
        }
    })
    .await;
    assert_eq!(status.data_planes.len(), 1);

    // An operator accepts it once: the data plane takes the empty store's configuration, which is never saved.
    let r = http().post(format!("http://{}/config/accept-next", dp.addr("admin"))).send().await.unwrap();
    assert_eq!(r.status(), 202);
    eventually("the next configuration is accepted", Duration::from_secs(20), || {
        let dp = &dp;
        async move {
            let config = dp_config(dp).await;
            (config["refusing"].is_null() && config["system_version"] == 0).then_some(())
        }
    })
    .await;
    assert_eq!(metric(&dp, "fhirgw_dp_config_refusing").await, 0.0);
    assert_eq!(snapshot_bytes(&world, "dp-state").await, saved, "an empty configuration is never the last good one");
    let _ = fixtures::status(&mut admin2).await;
}

#[tokio::test]
async fn damaged_snapshot_files_are_not_served() {
    let world = World::new();
    let fhir = world.fhir_server().await;
    let issuer = fixtures::issuer().await;
    let cp = world.control_plane("cp", "cp.db").await;
    let mut dp = world.data_plane("dp", &grpc_url(&cp), "dp-state").await;
    let mut admin = admin(&cp).await;
    let revision = configure(&mut admin, &world, fhir.ready["base_url"].as_str().unwrap(), &issuer).await;
    fixtures::wait_in_sync(&admin, 1, revision).await;
    let whole = eventually("the snapshot is on disk", Duration::from_secs(10), || async {
        let bytes = std::fs::read(world.path("dp-state").join("snapshot.pb")).ok()?;
        let message = push::SnapshotFile::decode(bytes.get(HEADER_LEN..)?).ok()?;
        (message.system_version == revision).then_some(bytes)
    })
    .await;
    dp.kill().await;
    let message = push::SnapshotFile::decode(&whole[HEADER_LEN..]).unwrap();
    assert!(message.resources.len() > 2);
    // Cut after the first resources: the identity provider and tenants that come later are lost.
    let kept = push::SnapshotFile { resources: message.resources[..2].to_vec(), ..Default::default() };
    let boundary = HEADER_LEN + kept.encoded_len();
    assert_eq!(push::SnapshotFile::decode(&whole[HEADER_LEN..boundary]).unwrap().resources.len(), 2);

    // Nothing answers on this address: the data plane has only its disk to go by.
    let nowhere = "http://127.0.0.1:1";
    for (case, bytes) in [("empty", Vec::new()), ("cut on a record boundary", whole[..boundary].to_vec())] {
        std::fs::write(world.path("dp-state").join("snapshot.pb"), &bytes).unwrap();
        let dp = world.data_plane(&format!("dp-{}", bytes.len()), nowhere, "dp-state").await;
        let readyz = http().get(format!("http://{}/readyz", dp.addr("admin"))).send().await.unwrap();
        assert_eq!(readyz.status(), 503, "{case}: not ready");
        assert_eq!(dp_config(&dp).await["ready"], false, "{case}");
        let r = http().get(format!("http://{}/fhir/metadata", dp.addr("fhir"))).send().await.unwrap();
        assert_eq!(r.status(), 503, "{case}: nothing is served");
        let log = std::fs::read_to_string(&dp.log).unwrap();
        assert!(log.contains("refusing the snapshot on disk"), "{case}: {log}");
        assert_eq!(std::fs::read(world.path("dp-state").join("snapshot.pb")).unwrap(), bytes, "{case}: left as found");
    }
    // The whole file still loads.
    std::fs::write(world.path("dp-state").join("snapshot.pb"), &whole).unwrap();
    let dp = world.data_plane("dp-whole", nowhere, "dp-state").await;
    assert_eq!(http().get(format!("http://{}/readyz", dp.addr("admin"))).send().await.unwrap().status(), 200);
}

/// What one keep-alive client saw.
#[derive(Default, Debug)]
struct Seen {
    ok: u64,
    other_status: Vec<u16>,
    /// Requests written on an open connection that got no (whole) response.
    unanswered: u64,
    closes: u64,
}

/// One HTTP/1.1 response: (status, `Connection: close`, body length).
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(u16, bool)> {
    buf.clear();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status: u16 = head.split(' ').nth(1)?.parse().ok()?;
    let length: usize =
        head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok())?;
    let close = head.lines().any(|l| l.starts_with("connection:") && l.contains("close"));
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some((status, close))
}

/// Sends keep-alive requests until the listener refuses connections (or `until`), reconnecting when told to close.
async fn keep_alive_client(addr: String, request: Vec<u8>, until: Instant, sent_after: Arc<AtomicBool>) -> (Seen, u64) {
    let mut seen = Seen::default();
    let mut after_signal = 0;
    let mut buf = Vec::new();
    'connections: while Instant::now() < until {
        let Ok(mut stream) = TcpStream::connect(&addr).await else { break };
        loop {
            if Instant::now() >= until {
                break 'connections;
            }
            if stream.write_all(&request).await.is_err() {
                seen.unanswered += 1;
                continue 'connections;
            }
            let signalled = sent_after.load(Ordering::SeqCst);
            match read_response(&mut stream, &mut buf).await {
                None => {
                    seen.unanswered += 1;
                    continue 'connections;
                }
                Some((status, close)) => {
                    if status == 200 {
                        seen.ok += 1;
                    } else {
                        seen.other_status.push(status);
                    }
                    if signalled {
                        after_signal += 1;
                    }
                    if close {
                        seen.closes += 1;
                        continue 'connections;
                    }
                }
            }
        }
    }
    (seen, after_signal)
}

#[tokio::test]
async fn sigterm_under_keep_alive_load_answers_every_request() {
    let world = World::new();
    let fhir = world.fhir_server().await;
    let issuer = fixtures::issuer().await;
    let cp = world.control_plane("cp", "cp.db").await;
    let mut dp = world
        .data_plane_args(
            "dp",
            &grpc_url(&cp),
            "dp-state",
            &world.path("dataplane.token"),
            // The harness gives every data plane `--drain-secs 5`.
            &["--shutdown-delay-secs", "2"],
        )
        .await;
    let mut admin = admin(&cp).await;
    let revision = configure(&mut admin, &world, fhir.ready["base_url"].as_str().unwrap(), &issuer).await;
    fixtures::wait_in_sync(&admin, 1, revision).await;
    let token = issuer.token("tenant-a", READ_SCOPES);
    let request =
        format!("GET /fhir/Patient/a-pat-1 HTTP/1.1\r\nhost: fhirgw\r\nauthorization: Bearer {token}\r\n\r\n")
            .into_bytes();

    let signalled = Arc::new(AtomicBool::new(false));
    let until = Instant::now() + Duration::from_secs(40);
    let clients: Vec<_> = (0..8)
        .map(|_| tokio::spawn(keep_alive_client(dp.addr("fhir"), request.clone(), until, signalled.clone())))
        .collect();
    let ok_before = Arc::new(AtomicU64::new(0));
    // Load is flowing before the signal.
    let metrics_url = format!("http://{}/metrics", dp.addr("admin"));
    eventually("requests are flowing", Duration::from_secs(20), || {
        let url = metrics_url.clone();
        let ok_before = ok_before.clone();
        async move {
            let text = http().get(url).send().await.ok()?.text().await.ok()?;
            let n: f64 = text
                .lines()
                .find_map(|l| {
                    l.strip_prefix("fhirgw_dp_requests_total{route=\"instance\",method=\"GET\",status_class=\"2xx\"}")
                })
                .and_then(|v| v.trim().parse().ok())?;
            ok_before.store(n as u64, Ordering::Relaxed);
            (n >= 200.0).then_some(())
        }
    })
    .await;

    signalled.store(true, Ordering::SeqCst);
    let at = Instant::now();
    dp.signal_term().await;
    // Readiness fails first, while requests are still answered.
    let readyz = format!("http://{}/readyz", dp.addr("admin"));
    eventually("/readyz fails after SIGTERM", Duration::from_secs(2), || {
        let readyz = readyz.clone();
        async move { (http().get(readyz).send().await.ok()?.status() == 503).then_some(()) }
    })
    .await;
    assert!(at.elapsed() < Duration::from_secs(2), "not ready at once");

    let exit = dp.wait().await.expect("the data plane did not exit");
    let took = at.elapsed();
    assert!(exit.success(), "{exit:?}");
    assert!(took >= Duration::from_secs(2), "served through the shutdown delay: {took:?}");
    assert!(took < Duration::from_secs(8), "exited within delay + drain: {took:?}");

    let mut total = Seen::default();
    let mut after = 0;
    for client in clients {
        let (seen, after_signal) = client.await.unwrap();
        total.ok += seen.ok;
        total.other_status.extend(seen.other_status);
        total.unanswered += seen.unanswered;
        total.closes += seen.closes;
        after += after_signal;
    }
    assert_eq!(total.unanswered, 0, "requests written on an open connection and never answered: {total:?}");
    assert!(total.other_status.is_empty(), "{total:?}");
    assert!(after > 0, "requests were still answered after SIGTERM: {total:?}");
    assert!(total.closes > 0, "HTTP/1.1 responses during the drain carry Connection: close: {total:?}");
    assert!(total.ok > ok_before.load(Ordering::Relaxed), "{total:?}");
}

#[tokio::test]
async fn a_bundle_cut_by_the_upstream_is_counted_logged_and_traced_as_aborted() {
    let world = World::new();
    let fhir = world.fhir_server().await;
    let issuer = fixtures::issuer().await;
    let cp = world.control_plane("cp", "cp.db").await;
    let dp = world
        .data_plane_args("dp", &grpc_url(&cp), "dp-state", &world.path("dataplane.token"), &["--log-format", "json"])
        .await;
    let mut admin = admin(&cp).await;
    let revision = configure(&mut admin, &world, fhir.ready["base_url"].as_str().unwrap(), &issuer).await;
    fixtures::wait_in_sync(&admin, 1, revision).await;
    let token = issuer.token("tenant-a", READ_SCOPES);
    let search = format!("http://{}/fhir/Observation?_count=50", dp.addr("fhir"));
    let whole = http().get(&search).bearer_auth(&token).send().await.unwrap();
    assert_eq!(whole.status(), 200);
    assert!(whole.bytes().await.is_ok());

    let fault = format!("http://{}/__admin/fault", fhir.ready["listening"].as_str().unwrap());
    let r = http().post(fault).body(r#"{"cut_bundles":1}"#).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let cut = http()
        .get(&search)
        .bearer_auth(&token)
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(cut.status(), 200, "the head was sent before the upstream failed");
    assert!(cut.bytes().await.is_err(), "the client sees the Bundle cut off, never a complete-looking document");

    let aborted = eventually("the abort is counted", Duration::from_secs(5), || {
        let dp = &dp;
        async move {
            let text =
                http().get(format!("http://{}/metrics", dp.addr("admin"))).send().await.ok()?.text().await.ok()?;
            text.lines()
                .find(|l| l.starts_with("fhirgw_dp_requests_aborted_total{") && l.contains("reason=\"upstream_error\""))
                .map(str::to_owned)
        }
    })
    .await;
    assert!(aborted.ends_with(" 1"), "{aborted}");
    let log = std::fs::read_to_string(&dp.log).unwrap();
    let line =
        log.lines().find(|l| l.contains("response aborted")).unwrap_or_else(|| panic!("no abort logged:\n{log}"));
    let entry: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(entry["level"], "WARN", "{line}");
    assert!(line.contains(trace_id), "the log line carries the caller's trace id: {line}");
    assert!(line.contains("upstream_error"), "{line}");
}

/// A configured stack whose data plane runs with `args`, and a tenant-a token that may write Patients.
struct BodyStack {
    _world: World,
    _fhir: Process,
    _cp: Process,
    dp: Process,
    token: String,
    url: String,
}

impl BodyStack {
    async fn start(args: &[&str]) -> BodyStack {
        let world = World::new();
        let fhir = world.fhir_server().await;
        let issuer = fixtures::issuer().await;
        let cp = world.control_plane("cp", "cp.db").await;
        let dp = world.data_plane_args("dp", &grpc_url(&cp), "dp-state", &world.path("dataplane.token"), args).await;
        let mut admin = admin(&cp).await;
        let revision = configure(&mut admin, &world, fhir.ready["base_url"].as_str().unwrap(), &issuer).await;
        fixtures::wait_in_sync(&admin, 1, revision).await;
        let token = issuer.token("tenant-a", "openid user/*.*");
        let url = format!("http://{}/fhir/Patient", dp.addr("fhir"));
        BodyStack { _world: world, _fhir: fhir, _cp: cp, dp, token, url }
    }

    fn post(&self, body: Vec<u8>) -> reqwest::RequestBuilder {
        http().post(&self.url).bearer_auth(&self.token).header("content-type", "application/fhir+json").body(body)
    }
}

/// A Patient padded with whitespace to `size` bytes (valid JSON).
fn padded_patient(size: usize) -> Vec<u8> {
    let mut body = vec![b' '; size];
    let json = br#"{"resourceType":"Patient","name":[{"family":"Budget"}]}"#;
    body[size - json.len()..].copy_from_slice(json);
    body
}

#[tokio::test]
async fn request_bodies_get_413_415_and_503_over_the_budget() {
    let stack = BodyStack::start(&["--body-budget-bytes", "1000000"]).await;
    let (dp, token) = (&stack.dp, &stack.token);
    let patient = padded_patient;
    let post = |body: Vec<u8>| stack.post(body);
    let outcome = |r: reqwest::Response| async move {
        let status = r.status().as_u16();
        let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["resourceType"], "OperationOutcome", "{body}");
        (status, retry)
    };

    assert_eq!(post(patient(1000)).send().await.unwrap().status(), 201);
    // A compressed body: 415, whatever it holds.
    let r = post(patient(1000)).header("content-encoding", "gzip").send().await.unwrap();
    assert_eq!(outcome(r).await.0, 415);
    // Past the 16 MiB a body may hold: 413, refused from its Content-Length.
    let r = post(vec![b' '; 17 * 1024 * 1024]).send().await.unwrap();
    assert_eq!(outcome(r).await.0, 413);
    // More than the whole budget: 503 with Retry-After, before the body is read.
    let r = post(patient(1_500_000)).send().await.unwrap();
    assert_eq!(outcome(r).await, (503, Some("1".to_owned())));

    // The budget is shared: a slow chunked upload holds 600 kB of it...
    let mut slow = TcpStream::connect(dp.addr("fhir")).await.unwrap();
    let head = format!(
        "POST /fhir/Patient HTTP/1.1\r\nhost: fhirgw\r\nauthorization: Bearer {token}\r\ncontent-type: application/fhir+json\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.write_all(format!("{:x}\r\n", 600_000).as_bytes()).await.unwrap();
    slow.write_all(&vec![b' '; 600_000]).await.unwrap();
    slow.write_all(b"\r\n").await.unwrap();
    eventually("the slow upload holds its share", Duration::from_secs(10), || async {
        (metric(dp, "fhirgw_dp_request_body_bytes_reserved").await >= 600_000.0).then_some(())
    })
    .await;
    // ...so a 500 kB body that would fit alone waits its turn: 503.
    let r = post(patient(500_000)).send().await.unwrap();
    assert_eq!(outcome(r).await, (503, Some("1".to_owned())));
    // The slow upload completes and is answered; its share comes back; the same body is then accepted.
    let rest = br#"{"resourceType":"Patient","name":[{"family":"Slow"}]}"#;
    slow.write_all(format!("{:x}\r\n", rest.len()).as_bytes()).await.unwrap();
    slow.write_all(rest).await.unwrap();
    slow.write_all(b"\r\n0\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), slow.read(&mut chunk)).await.unwrap().unwrap();
        assert!(n > 0, "the slow upload got no answer");
        buf.extend_from_slice(&chunk[..n]);
    }
    assert!(buf.starts_with(b"HTTP/1.1 201"), "{}", String::from_utf8_lossy(&buf));
    eventually("the share is given back", Duration::from_secs(10), || async {
        (metric(dp, "fhirgw_dp_request_body_bytes_reserved").await == 0.0).then_some(())
    })
    .await;
    assert_eq!(post(patient(500_000)).send().await.unwrap().status(), 201);
}

/// A control plane on another store, even one further ahead (a second cluster's store, a restore of another
/// volume), is refused by its store identity: the revision alone would let it through. The control plane shows the
/// data plane in `GetStatus` with a store warning.
#[tokio::test]
async fn a_data_plane_refuses_another_store_even_at_a_higher_revision() {
    let world = World::new();
    let fhir = world.fhir_server().await;
    let issuer = fixtures::issuer().await;
    let mut cp = world.control_plane("cp", "cp.db").await;
    let mut dp = world.data_plane("dp", &grpc_url(&cp), "dp-state").await;
    let mut admin1 = admin(&cp).await;
    let revision = configure(&mut admin1, &world, fhir.ready["base_url"].as_str().unwrap(), &issuer).await;
    fixtures::wait_in_sync(&admin1, 1, revision).await;
    let held = dp_config(&dp).await;
    dp.kill().await;
    cp.kill().await;

    // Another store, configured the same way and then written to well past the revision the data plane holds.
    let cp2 = world.control_plane_args("cp2", "other.db", "127.0.0.1:0", &["--heartbeat-secs", "1"]).await;
    let mut admin2 = admin(&cp2).await;
    let mut revision2 = configure(&mut admin2, &world, fhir.ready["base_url"].as_str().unwrap(), &issuer).await;
    for i in 0..revision + 3 {
        let tenant =
            fhirgw_proto::config::v1::Tenant { name: format!("extra-{i}"), display_name: "extra".into(), audit: None };
        let put = fhirgw_proto::admin::v1::PutTenantRequest { tenant: Some(tenant), expected_version: String::new() };
        let entry = admin2.put_tenant(put).await.unwrap().into_inner();
        revision2 = entry.meta.unwrap().version.parse().unwrap();
    }
    assert!(revision2 > revision, "{revision2} <= {revision}");

    let dp = world.data_plane("dp", &grpc_url(&cp2), "dp-state").await;
    let config = eventually("the data plane refuses the other store", Duration::from_secs(20), || {
        let dp = &dp;
        async move {
            let config = dp_config(dp).await;
            (!config["refusing"].is_null()).then_some(config)
        }
    })
    .await;
    let reason = config["refusing"]["reason"].as_str().unwrap();
    assert!(reason.contains("store"), "{config:#}");
    assert_eq!(config["system_version"], held["system_version"], "it still serves what it held");
    let token = issuer.token("tenant-a", READ_SCOPES);
    let r = http().get(format!("http://{}/fhir/Patient/a-pat-1", dp.addr("fhir"))).bearer_auth(&token).send().await;
    assert_eq!(r.unwrap().status(), 200, "the last good snapshot is served");
    let status = eventually("GetStatus warns about the data plane", Duration::from_secs(20), || {
        let mut admin2 = admin2.clone();
        async move {
            let s = fixtures::status(&mut admin2).await;
            s.data_planes.iter().any(|d| !d.store_warnings.is_empty()).then_some(s)
        }
    })
    .await;
    let warnings = &status.data_planes[0].store_warnings;
    assert!(warnings.iter().any(|w| w.contains("store")), "{warnings:?}");
}

/// A client that declares a large body and then sends nothing, or trickles it, holds its share of the body budget
/// only until `--body-idle-timeout-secs` or `--body-read-timeout-secs`: it gets a 408 and the share comes back, so a
/// few such clients cannot starve every other caller's writes.
#[tokio::test]
async fn stalled_and_trickled_bodies_give_their_budget_back() {
    let stack = BodyStack::start(&[
        "--body-budget-bytes",
        "1000000",
        "--body-idle-timeout-secs",
        "1",
        "--body-read-timeout-secs",
        "3",
    ])
    .await;
    let (dp, token) = (&stack.dp, &stack.token);
    let patient = padded_patient;
    let post = |body: Vec<u8>| stack.post(body);
    let head = format!(
        "POST /fhir/Patient HTTP/1.1\r\nhost: fhirgw\r\nauthorization: Bearer {token}\r\ncontent-type: application/fhir+json\r\ncontent-length: 900000\r\n\r\n"
    );
    // The answer on a raw connection: status line and body (the data plane closes the connection after it).
    async fn answer(stream: &mut TcpStream, within: Duration) -> String {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let _ = tokio::time::timeout(within, async {
            loop {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                if buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.ends_with(b"}") {
                    break;
                }
            }
        })
        .await;
        String::from_utf8_lossy(&buf).into_owned()
    }

    // Stalled: 900 kB declared, 10 bytes sent. Its share is reserved at once, so a 500 kB write must wait...
    let mut stalled = TcpStream::connect(dp.addr("fhir")).await.unwrap();
    stalled.write_all(head.as_bytes()).await.unwrap();
    stalled.write_all(b"          ").await.unwrap();
    eventually("the stalled body holds its share", Duration::from_secs(10), || async {
        (metric(dp, "fhirgw_dp_request_body_bytes_reserved").await >= 900_000.0).then_some(())
    })
    .await;
    assert_eq!(post(patient(500_000)).send().await.unwrap().status(), 503);
    // ...only until the body has stalled for a second: 408, and the share comes back.
    let started = Instant::now();
    let text = answer(&mut stalled, Duration::from_secs(10)).await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("OperationOutcome") && text.contains("stalled"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(5), "answered after {:?}", started.elapsed());
    eventually("the stalled body's share is given back", Duration::from_secs(10), || async {
        (metric(dp, "fhirgw_dp_request_body_bytes_reserved").await == 0.0).then_some(())
    })
    .await;
    assert_eq!(post(patient(500_000)).send().await.unwrap().status(), 201);

    // Trickled: a few bytes every 300 ms never stalls for a second, but the whole body is due within 3 s.
    let mut trickle = TcpStream::connect(dp.addr("fhir")).await.unwrap();
    trickle.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut text = String::new();
    while started.elapsed() < Duration::from_secs(10) {
        if trickle.write_all(&[b' '; 100]).await.is_err() {
            break;
        }
        text = answer(&mut trickle, Duration::from_millis(300)).await;
        if !text.is_empty() {
            break;
        }
    }
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("did not arrive within 3 seconds"), "{text}");
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(3) && took < Duration::from_secs(6), "answered after {took:?}");
    eventually("the trickled body's share is given back", Duration::from_secs(10), || async {
        (metric(dp, "fhirgw_dp_request_body_bytes_reserved").await == 0.0).then_some(())
    })
    .await;
    assert_eq!(post(patient(500_000)).send().await.unwrap().status(), 201);
}
