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

/// The plaintext FHIR port tells HTTP/2 (prior knowledge, as load balancers speak to backends) from HTTP/1.1 by the
/// first bytes, peeked before hyper takes the connection: both serve a verified read, also when the preface or the
/// request line arrives in pieces, and a connection that sends nothing is still closed by the first-request timeout.
#[tokio::test]
async fn plaintext_port_speaks_http1_and_http2_prior_knowledge() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    let world = World::new();
    let fhir = world.fhir_server().await;
    let issuer = fixtures::issuer().await;
    let cp = world.control_plane("cp", "cp.db").await;
    let token_file = world.path("dataplane.token");
    let dp = world
        .data_plane_args("dp", &grpc_url(&cp), "dp-state", &token_file, &["--first-request-timeout-secs", "2"])
        .await;
    let mut admin = admin(&cp).await;
    let revision = configure(&mut admin, &world, fhir.ready["base_url"].as_str().unwrap(), &issuer).await;
    fixtures::wait_in_sync(&admin, 1, revision).await;
    let token = issuer.token("tenant-a", READ_SCOPES);
    let addr = dp.addr("fhir");
    let uri = format!("http://{addr}/fhir/Patient/a-pat-1");

    // HTTP/2 with prior knowledge: hyper's own client, two requests on one connection.
    let tcp = TcpStream::connect(&addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(connection);
    for _ in 0..2 {
        sender.ready().await.unwrap();
        let request =
            http::Request::get(&uri).header("authorization", format!("Bearer {token}")).body(Empty::<Bytes>::new());
        let response = sender.send_request(request.unwrap()).await.unwrap();
        assert_eq!(response.version(), http::Version::HTTP_2);
        assert_eq!(response.status(), 200);
        let body: serde_json::Value =
            serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(body["id"], "a-pat-1");
    }

    // The preface in two pieces: the server waits for the rest, then answers HTTP/2 (its SETTINGS frame first).
    let mut raw = TcpStream::connect(&addr).await.unwrap();
    raw.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    raw.write_all(b"\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await.unwrap();
    let mut frame = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(5), raw.read_exact(&mut frame)).await.unwrap().unwrap();
    assert_eq!(frame[3], 4, "an HTTP/2 SETTINGS frame: {frame:?}");

    // HTTP/1.1 whose first byte could begin the preface (`P` of POST, `PRI` of nothing) arrives alone.
    let mut raw = TcpStream::connect(&addr).await.unwrap();
    raw.write_all(b"P").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    raw.write_all(b"OST /fhir/Patient/_search HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut answer)).await.unwrap().unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 401"), "{}", String::from_utf8_lossy(&answer));

    // HTTP/1.1 as usual.
    let r = http().get(&uri).bearer_auth(&token).send().await.unwrap();
    assert_eq!((r.version(), r.status().as_u16()), (http::Version::HTTP_11, 200));

    // Silent, and silent after a strict prefix of the preface: both closed by the first-request timeout.
    for sent in [&b""[..], b"PRI * HT"] {
        let mut raw = TcpStream::connect(&addr).await.unwrap();
        raw.write_all(sent).await.unwrap();
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut rest)).await;
        // Closed with unread bytes in the server's socket, the kernel resets instead of ending the stream.
        let reset = |e: &std::io::Error| e.kind() == std::io::ErrorKind::ConnectionReset;
        assert!(
            matches!(&closed, Ok(Ok(0))) || matches!(&closed, Ok(Err(e)) if reset(e)),
            "{sent:?}: {closed:?} {rest:?}"
        );
    }
}

/// An idle plaintext HTTP/1.1 keep-alive connection is parked (hyper's buffers let go, `connections_parked` counts
/// it) and serves its next request on the same socket, also past hyper's 30 s header-read timeout, which used to
/// close every idle keep-alive connection at 30 s whatever `--idle-timeout-secs` said (a load balancer keeping its
/// backend connections 60 s then meets closed ones). The idle timeout still closes it.
#[tokio::test]
async fn idle_keep_alive_connections_are_parked_and_last_until_the_idle_timeout() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpStream;

    let world = World::new();
    let fhir = world.fhir_server().await;
    let issuer = fixtures::issuer().await;
    let cp = world.control_plane("cp", "cp.db").await;
    let token_file = world.path("dataplane.token");
    let dp = world.data_plane_args("dp", &grpc_url(&cp), "dp-state", &token_file, &["--idle-timeout-secs", "34"]).await;
    let mut admin = admin(&cp).await;
    let revision = configure(&mut admin, &world, fhir.ready["base_url"].as_str().unwrap(), &issuer).await;
    fixtures::wait_in_sync(&admin, 1, revision).await;
    let token = issuer.token("tenant-a", READ_SCOPES);
    let addr = dp.addr("fhir");
    let metrics_url = format!("http://{}/metrics", dp.addr("admin"));
    let metric = |name: &'static str| {
        let url = metrics_url.clone();
        async move {
            let text = http().get(url).send().await.unwrap().text().await.unwrap();
            text.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse::<f64>().ok())).unwrap_or(0.0)
        }
    };
    const PARKED: &str = "fhirgw_dp_connections_parked{listener=\"fhir\"}";
    const CLOSED_IDLE: &str = "fhirgw_dp_connections_closed_total{listener=\"fhir\",reason=\"idle\"}";

    let connect = async || {
        let tcp = TcpStream::connect(&addr).await.unwrap();
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
        (sender, tokio::spawn(connection))
    };
    let read = async |sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>| {
        sender.ready().await.unwrap();
        let request = http::Request::get("/fhir/Patient/a-pat-1")
            .header("host", &addr)
            .header("authorization", format!("Bearer {token}"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        let body: serde_json::Value =
            serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(body["id"], "a-pat-1");
    };
    let closed_before = metric(CLOSED_IDLE).await;
    // Two connections, one request each.
    let ((mut sender_a, connection_a), (mut sender_b, connection_b)) = (connect().await, connect().await);
    read(&mut sender_a).await;
    read(&mut sender_b).await;
    let answered = Instant::now();
    eventually("both idle connections are parked", Duration::from_secs(10), || {
        let parked = metric(PARKED);
        async move { (parked.await == 2.0).then_some(()) }
    })
    .await;
    // A connection whose last request had a body is not parked (what a handler leaves unread of a body must never be
    // read as the next request), and is served all the same.
    let tcp = TcpStream::connect(&addr).await.unwrap();
    let (mut sender_c, connection_c) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
    let connection_c = tokio::spawn(connection_c);
    let search = http::Request::post("/fhir/Patient/_search")
        .header("host", &addr)
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(http_body_util::Full::new(Bytes::from_static(b"_id=a-pat-1")))
        .unwrap();
    sender_c.ready().await.unwrap();
    let response = sender_c.send_request(search).await.unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(metric(PARKED).await, 2.0, "a connection after a request with a body is not parked");
    assert!(!connection_c.is_finished());
    drop(sender_c);
    connection_c.await.unwrap().unwrap();
    // Past hyper's header-read timeout (30 s) and short of the idle timeout (34 s): the connection answers.
    tokio::time::sleep((answered + Duration::from_millis(31_500)).saturating_duration_since(Instant::now())).await;
    assert!(!connection_a.is_finished() && !sender_a.is_closed(), "the server closed an idle connection early");
    read(&mut sender_a).await;
    // The other one is closed by the idle timeout, parked as it is.
    tokio::time::timeout(Duration::from_secs(15), connection_b).await.unwrap().unwrap().unwrap();
    let lasted = answered.elapsed();
    assert!(lasted >= Duration::from_secs(33), "closed {lasted:?} after its last response");
    assert!(sender_b.is_closed());
    assert_eq!(metric(CLOSED_IDLE).await, closed_before + 1.0);
    // A parked connection its client closes is no longer counted.
    eventually("the first connection is parked again", Duration::from_secs(10), || {
        let parked = metric(PARKED);
        async move { (parked.await == 1.0).then_some(()) }
    })
    .await;
    drop(sender_a);
    connection_a.await.unwrap().unwrap();
    eventually("no connection is parked", Duration::from_secs(10), || {
        let parked = metric(PARKED);
        async move { (parked.await == 0.0).then_some(()) }
    })
    .await;
}
