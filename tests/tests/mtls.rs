//! Issue 18, transport security: mutual TLS between the planes and TLS on the data plane's FHIR port, with real
//! processes and certificates made here (rcgen): data planes identified by their certificate, refused (and told
//! why, in both logs) with a certificate from another CA, an expired one, or none; operators with grpcurl over TLS
//! with their bearer token (and an operator certificate when the control plane asks for one); a data-plane
//! certificate refused on the admin API; certificates rotated under a live config stream; several control planes
//! behind one name; the FHIR port over TLS with HTTP/2 and HTTP/1.1 from real clients, its certificate rotated, and
//! its first-request timeout closing a client that never finishes its handshake.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fhirgw_e2e::pki::{Ca, Pair, Usage, Validity};
use fhirgw_e2e::postgres::Postgres;
use fhirgw_e2e::{
    Admin, Process, World, admin_tls, dp_config, eventually, grpcurl_tls, http, log_of, path_str, smart_client,
};
use fhirgw_proto::admin::v1 as api;
use fhirgw_proto::config::v1 as pb;
use fhirgw_tls::rustls;
use fhirgw_tls::tokio_rustls::TlsConnector;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const DP_ID: &str = "spiffe://fhirgw.test/ns/fhirgw/sa/fhirgw-dataplane";
const WAIT: Duration = Duration::from_secs(30);

fn s(items: &[&str]) -> Vec<String> {
    items.iter().map(|i| (*i).to_owned()).collect()
}

/// The data plane's TLS flags towards the control plane: the CA bundle to trust and, when given, its certificate.
fn dp_flags(ca: &Path, client: Option<&Pair>) -> Vec<String> {
    let mut flags = vec!["--control-plane-ca-file".to_owned(), path_str(ca)];
    if let Some(pair) = client {
        flags.extend([
            "--client-cert-file".to_owned(),
            pair.cert_str(),
            "--client-key-file".to_owned(),
            pair.key_str(),
        ]);
    }
    flags
}

/// The certificate (DER) a TLS server at `addr` presents now, checked against `ca` for `name`.
async fn presented(addr: &str, ca: &Path, name: &str, alpn: &[&'static str]) -> Vec<u8> {
    let spec = fhirgw_tls::client::ClientSpec { ca: Some(ca.to_owned()), identity: None, alpn: alpn.to_vec() };
    let (config, _) = spec.build(&[std::fs::read(ca).unwrap()]).unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
    let tls = TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

async fn status(admin: &Admin) -> api::StatusResponse {
    admin.clone().get_status(api::GetStatusRequest {}).await.unwrap().into_inner()
}

async fn put_tenant(admin: &Admin, name: &str) -> u64 {
    let tenant = pb::Tenant { name: name.into(), display_name: format!("Tenant {name}"), audit: None };
    let put = api::PutTenantRequest { tenant: Some(tenant), expected_version: String::new() };
    let entry = admin.clone().put_tenant(put).await.unwrap().into_inner();
    entry.meta.unwrap().version.parse().unwrap()
}

/// Waits for `needle` in `process`'s log.
async fn logged(process: &Process, needle: &str) {
    eventually(&format!("{} to log {needle:?}", process.name), WAIT, || async {
        log_of(process).contains(needle).then_some(())
    })
    .await
}

/// The data plane `node`'s entry in `GetStatus`, once it has ACKed at least `revision`.
async fn connected(admin: &Admin, node: &str, revision: u64) -> api::DataPlaneStatus {
    eventually(&format!("{node} connected and at revision {revision}"), WAIT, || async {
        status(admin).await.data_planes.into_iter().find(|d| d.node_id == node && d.acked_revision >= revision)
    })
    .await
}

#[tokio::test]
async fn data_planes_by_certificate_operators_by_token() {
    let world = World::new();
    let dir = world.dir.path();
    let (cp_ca, dp_ca, op_ca, rogue) = (
        Ca::new("test control-plane CA"),
        Ca::new("test data-plane CA"),
        Ca::new("test operator CA"),
        Ca::new("rogue"),
    );
    let (cp_ca_file, dp_ca_file, op_ca_file, rogue_file) = (
        cp_ca.write(dir, "cp-ca.pem"),
        dp_ca.write(dir, "dp-ca.pem"),
        op_ca.write(dir, "op-ca.pem"),
        rogue.write(dir, "rogue-ca.pem"),
    );
    let server = cp_ca.issue(dir, "cp", &["localhost", "127.0.0.1"], Usage::Server, Validity::Current);
    let cp_flags = vec![
        "--tls-cert-file".to_owned(),
        server.cert_str(),
        "--tls-key-file".into(),
        server.key_str(),
        "--dataplane-ca-file".into(),
        path_str(&dp_ca_file),
        "--operator-ca-file".into(),
        path_str(&op_ca_file),
    ];

    // One CA for both roles is refused at start: a certificate could then call the admin API as an operator.
    let mut same = cp_flags.clone();
    same[7] = path_str(&dp_ca_file);
    let out = tokio::process::Command::new(fhirgw_e2e::binary("fhirgw-controlplane"))
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--store"])
        .arg(world.path("refused.db"))
        .arg("--operator-token-file")
        .arg(world.path("operator.token"))
        .args(&same)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("share a certificate"), "{stderr}");

    let cp = world.control_plane_tls("cp", &world.store_args("cp.db"), &cp_flags).await;
    let url = format!("https://{}", cp.addr("grpc"));
    let operator = op_ca.issue(dir, "alice", &["alice.operators.fhirgw.test"], Usage::Client, Validity::Current);
    let admin = admin_tls(&cp, &cp_ca_file, "127.0.0.1", Some(&operator)).await;

    // A data plane with a certificate from the data-plane CA and no token: connected, identified by its URI SAN.
    let good = dp_ca.issue(dir, "dp", &[DP_ID, "fhirgw-dataplane.fhirgw.svc"], Usage::Client, Validity::Current);
    let dp = world.data_plane_tls("dp-good", &url, "good-state", &dp_flags(&cp_ca_file, Some(&good))).await;
    let revision = put_tenant(&admin, "clinic-a").await;
    let entry = connected(&admin, "dp-good", revision).await;
    assert_eq!(entry.identity, DP_ID);
    assert!(entry.in_sync, "{entry:?}");
    let config = dp_config(&dp).await;
    assert_eq!(config["system_version"].as_u64(), Some(revision), "{config}");

    // Refused ones, each told why, and the control plane says why in its log too.
    let token = ["--token-file".to_owned(), path_str(&world.path("dataplane.token"))];
    let other = rogue.issue(dir, "rogue-dp", &[DP_ID], Usage::Client, Validity::Current);
    let expired = dp_ca.issue(dir, "expired-dp", &[DP_ID], Usage::Client, Validity::Expired);
    let cases: Vec<(&str, Vec<String>, &str, &str)> = vec![
        (
            "dp-other-ca",
            dp_flags(&cp_ca_file, Some(&other)),
            "the control plane refused this side's certificate (TLS alert UnknownCA)",
            "the client's certificate is refused: it is not issued by a CA trusted here",
        ),
        (
            "dp-expired",
            dp_flags(&cp_ca_file, Some(&expired)),
            "the control plane refused this side's certificate (TLS alert CertificateExpired): it has expired",
            "the client's certificate is refused: it has expired",
        ),
        (
            "dp-no-cert",
            [dp_flags(&cp_ca_file, None), token.to_vec()].concat(),
            "a data-plane client certificate is required (mutual TLS); none was presented",
            "none was presented",
        ),
        (
            "dp-operator-cert",
            dp_flags(&cp_ca_file, Some(&operator)),
            "the client certificate is not issued by the data-plane CA",
            "the client certificate is not issued by the data-plane CA",
        ),
        (
            // The other way round: the control plane's certificate is not one this data plane trusts.
            "dp-distrusts",
            dp_flags(&rogue_file, Some(&good)),
            "the control plane's certificate is refused: it is not issued by a CA trusted here",
            "the client refused this side's certificate (TLS alert UnknownCA)",
        ),
    ];
    let mut refused = Vec::new();
    for (name, flags, dp_says, _) in &cases {
        refused.push((world.data_plane_tls(name, &url, &format!("{name}-state"), flags).await, *dp_says));
    }
    for (process, dp_says) in &refused {
        logged(process, dp_says).await;
    }
    for (_, _, _, cp_says) in &cases {
        logged(&cp, cp_says).await;
    }
    let listed: Vec<String> = status(&admin).await.data_planes.into_iter().map(|d| d.node_id).collect();
    assert_eq!(listed, vec!["dp-good".to_owned()]);
    for (process, _) in &refused {
        let config = dp_config(process).await;
        assert!(config["system_version"].is_null() || config["system_version"] == 0, "{config}");
    }

    // A control plane whose own certificate has expired: the data plane refuses it, and each side says so.
    let stale = cp_ca.issue(dir, "cp-expired", &["localhost", "127.0.0.1"], Usage::Server, Validity::Expired);
    let mut stale_flags = cp_flags.clone();
    (stale_flags[1], stale_flags[3]) = (stale.cert_str(), stale.key_str());
    let stale_cp = world.control_plane_tls("cp-expired", &world.store_args("cp-expired.db"), &stale_flags).await;
    let stale_url = format!("https://{}", stale_cp.addr("grpc"));
    let stale_dp =
        world.data_plane_tls("dp-to-expired", &stale_url, "stale-state", &dp_flags(&cp_ca_file, Some(&good))).await;
    logged(&stale_dp, "the control plane's certificate is refused: it has expired").await;
    logged(&stale_cp, "the client refused this side's certificate (TLS alert CertificateExpired): it has expired")
        .await;

    // grpcurl as an operator: the control plane's CA, the operator's certificate and bearer token.
    let addr = cp.addr("grpc");
    let bearer = format!("authorization: Bearer {}", fhirgw_e2e::OPERATOR_TOKEN);
    let tls = |pair: Option<&Pair>, token: bool| {
        let mut flags = vec!["-cacert".to_owned(), path_str(&cp_ca_file)];
        if let Some(pair) = pair {
            flags.extend(["-cert".to_owned(), pair.cert_str(), "-key".into(), pair.key_str()]);
        }
        if token {
            flags.extend(["-H".to_owned(), bearer.clone()]);
        }
        flags
    };
    let (ok, out, err) = grpcurl_tls(&addr, &tls(Some(&operator), true), &["fhirgw.admin.v1.Admin/GetStatus"]).await;
    assert!(ok, "{err}");
    assert!(out.contains(DP_ID) && out.contains("dp-good"), "{out}");
    let (ok, out, _) = grpcurl_tls(&addr, &tls(None, false), &["list"]).await;
    assert!(ok && out.contains("fhirgw.admin.v1.Admin"), "reflection answers over TLS: {out}");
    for (flags, code, says) in [
        (tls(Some(&operator), false), "Unauthenticated", "missing bearer token"),
        (tls(None, true), "Unauthenticated", "operator client certificate"),
        // A data plane's certificate never reaches the admin API, whatever token comes with it.
        (tls(Some(&good), true), "PermissionDenied", "a data-plane certificate cannot call the admin API"),
    ] {
        let (ok, _, err) = grpcurl_tls(&addr, &flags, &["fhirgw.admin.v1.Admin/GetStatus"]).await;
        assert!(!ok && err.contains(code) && err.contains(says), "{flags:?}: {err}");
    }
    logged(&cp, "refused an admin call made with a data-plane certificate").await;
    // Over plaintext, nothing answers: the port speaks TLS only.
    let (ok, _, _) = grpcurl_tls(&addr, &s(&["-plaintext", "-max-time", "5"]), &["list"]).await;
    assert!(!ok);
}

#[tokio::test]
async fn certificates_rotate_under_a_live_stream() {
    let world = World::new();
    let dir = world.dir.path();
    let (cp_ca, dp_ca) = (Ca::new("test control-plane CA"), Ca::new("test data-plane CA"));
    let (cp_ca_file, dp_ca_file) = (cp_ca.write(dir, "cp-ca.pem"), dp_ca.write(dir, "dp-ca.pem"));
    let first = cp_ca.issue(dir, "cp", &["localhost", "127.0.0.1"], Usage::Server, Validity::Current);
    // Certificate and token both required (no operator CA: operators come with their token alone, over TLS).
    let cp_flags = vec![
        "--tls-cert-file".to_owned(),
        first.cert_str(),
        "--tls-key-file".into(),
        first.key_str(),
        "--dataplane-ca-file".into(),
        path_str(&dp_ca_file),
        "--dataplane-token-file".into(),
        path_str(&world.path("dataplane.token")),
    ];
    let cp = world.control_plane_tls("cp", &world.store_args("cp.db"), &cp_flags).await;
    let admin = admin_tls(&cp, &cp_ca_file, "localhost", None).await;
    let url = format!("https://localhost:{}", cp.addr("grpc").rsplit(':').next().unwrap());
    let dp_cert = dp_ca.issue(dir, "dp", &["spiffe://fhirgw.test/dp/first"], Usage::Client, Validity::Current);
    let token = ["--token-file".to_owned(), path_str(&world.path("dataplane.token"))];
    let dp = world
        .data_plane_tls("dp", &url, "dp-state", &[dp_flags(&cp_ca_file, Some(&dp_cert)), token.to_vec()].concat())
        .await;
    let revision = put_tenant(&admin, "clinic-a").await;
    let before = connected(&admin, "dp", revision).await;
    assert_eq!(before.identity, "spiffe://fhirgw.test/dp/first");
    let (grpc, admin_port) = (cp.addr("grpc"), cp.addr("admin"));
    assert_eq!(presented(&grpc, &cp_ca_file, "localhost", &["h2"]).await, first.der);

    // Both certificates rotated in place, as cert-manager does.
    let second = cp_ca.issue(dir, "cp", &["localhost", "127.0.0.1"], Usage::Server, Validity::Current);
    assert_ne!(second.der, first.der);
    dp_ca.issue(dir, "dp", &["spiffe://fhirgw.test/dp/second"], Usage::Client, Validity::Current);
    // New connections get the new server certificate, on both ports.
    eventually("the gRPC port to present the new certificate", WAIT, || async {
        (presented(&grpc, &cp_ca_file, "localhost", &["h2"]).await == second.der).then_some(())
    })
    .await;
    eventually("the admin port to present the new certificate", WAIT, || async {
        (presented(&admin_port, &cp_ca_file, "127.0.0.1", &[]).await == second.der).then_some(())
    })
    .await;
    logged(&dp, "new connections use the reloaded configuration").await;
    // The admin port still answers over TLS (what Kubernetes probes and Prometheus use).
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(&cp_ca_file)
        .arg(format!("https://127.0.0.1:{}/healthz", admin_port.rsplit(':').next().unwrap()))
        .output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n", "{}", String::from_utf8_lossy(&out.stderr));

    // The open stream carries on: a write reaches the data plane on the same stream (same connection time, the
    // identity of the certificate it connected with).
    let revision = put_tenant(&admin, "clinic-b").await;
    let during = connected(&admin, "dp", revision).await;
    assert_eq!(during.connected_at, before.connected_at, "the stream was not dropped");
    assert_eq!(during.identity, "spiffe://fhirgw.test/dp/first");

    // Its next connection presents the rotated client certificate and accepts the rotated server certificate.
    let reopen = http().post(format!("http://{}/config/accept-next", dp.addr("admin"))).send().await.unwrap();
    assert!(reopen.status().is_success());
    let after = eventually("the data plane to reconnect with its new certificate", WAIT, || async {
        status(&admin).await.data_planes.into_iter().find(|d| d.identity == "spiffe://fhirgw.test/dp/second")
    })
    .await;
    assert_ne!(after.connected_at, before.connected_at);
    let revision = put_tenant(&admin, "clinic-c").await;
    connected(&admin, "dp", revision).await;
}

#[tokio::test]
async fn replicas_behind_one_name() {
    let world = World::new();
    let dir = world.dir.path();
    let (cp_ca, dp_ca) = (Ca::new("test control-plane CA"), Ca::new("test data-plane CA"));
    let (cp_ca_file, dp_ca_file) = (cp_ca.write(dir, "cp-ca.pem"), dp_ca.write(dir, "dp-ca.pem"));
    // One certificate for every replica: it names the Service, not the pods.
    let server = cp_ca.issue(dir, "cp", &["localhost"], Usage::Server, Validity::Current);
    let flags = vec![
        "--tls-cert-file".to_owned(),
        server.cert_str(),
        "--tls-key-file".into(),
        server.key_str(),
        "--dataplane-ca-file".into(),
        path_str(&dp_ca_file),
    ];
    let pg = tokio::task::spawn_blocking(Postgres::shared).await.unwrap();
    let store = world.pg_store_args(pg, &format!("mtls_{:08x}", rand::random::<u32>()));
    let mut replicas =
        [world.control_plane_tls("cp-1", &store, &flags).await, world.control_plane_tls("cp-2", &store, &flags).await];
    let port = |p: &Process| p.addr("grpc").rsplit(':').next().unwrap().to_owned();
    // Both by the name in the certificate (`localhost` also resolves to ::1, where nothing listens: skipped).
    let urls = format!("https://localhost:{},https://localhost:{}", port(&replicas[0]), port(&replicas[1]));
    let cert = dp_ca.issue(dir, "dp", &[DP_ID], Usage::Client, Validity::Current);
    let _dp = world.data_plane_tls("dp", &urls, "dp-state", &dp_flags(&cp_ca_file, Some(&cert))).await;
    let admins = [
        admin_tls(&replicas[0], &cp_ca_file, "localhost", None).await,
        admin_tls(&replicas[1], &cp_ca_file, "localhost", None).await,
    ];
    let revision = put_tenant(&admins[0], "clinic-a").await;
    let first = connected(&admins[0], "dp", revision).await;
    assert_eq!(first.identity, DP_ID);
    let serving = replicas.iter().position(|r| r.name == first.replica).unwrap();
    let other = 1 - serving;
    replicas[serving].kill().await;
    let moved = eventually("the data plane to move to the other replica over mutual TLS", WAIT, || async {
        status(&admins[other])
            .await
            .data_planes
            .into_iter()
            .find(|d| d.node_id == "dp" && d.replica == replicas[other].name)
    })
    .await;
    assert_eq!(moved.identity, DP_ID);
    let revision = put_tenant(&admins[other], "clinic-b").await;
    connected(&admins[other], "dp", revision).await;
}

/// One HTTP/2 or HTTP/1.1 connection over TLS, made by hand so the test knows it is the same connection.
async fn fhir_connection(
    addr: &str,
    ca: &Path,
    alpn: &'static str,
) -> (hyper::client::conn::http2::SendRequest<Empty<Bytes>>, Vec<u8>) {
    let spec = fhirgw_tls::client::ClientSpec { ca: Some(ca.to_owned()), identity: None, alpn: vec![alpn] };
    let (config, _) = spec.build(&[std::fs::read(ca).unwrap()]).unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap();
    let der = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn.as_bytes()));
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.unwrap();
    tokio::spawn(connection);
    (sender, der)
}

async fn h2_get(
    sender: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    uri: &str,
    token: &str,
) -> (u16, String) {
    sender.ready().await.unwrap();
    let request =
        http::Request::get(uri).header("authorization", format!("Bearer {token}")).body(Empty::new()).unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    let status = response.status().as_u16();
    (status, String::from_utf8_lossy(&response.into_body().collect().await.unwrap().to_bytes()).into_owned())
}

/// curl, a real HTTP client: `--http2` or `--http1.1`; returns (HTTP version, status, body).
async fn curl(version_flag: &str, ca: &Path, url: &str, token: &str) -> (String, String, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", version_flag, "--cacert"])
        .arg(ca)
        .args(["-H", &format!("authorization: Bearer {token}"), "-w", "\n%{http_version} %{http_code}", url])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "curl {url}: {}", String::from_utf8_lossy(&out.stderr));
    let (body, tail) = text.rsplit_once('\n').unwrap();
    let (version, code) = tail.split_once(' ').unwrap();
    (version.to_owned(), code.to_owned(), body.to_owned())
}

#[tokio::test]
async fn fhir_port_over_tls() {
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new("test FHIR CA");
    let ca_file = ca.write(certs.path(), "ca.pem");
    let first = ca.issue(certs.path(), "fhir", &["localhost", "127.0.0.1"], Usage::Server, Validity::Current);
    let stack = common::stack_with(
        &[],
        &[
            "--tls-cert-file",
            &first.cert_str(),
            "--tls-key-file",
            &first.key_str(),
            "--first-request-timeout-secs",
            "2",
        ],
    )
    .await;
    let port = stack.dp.addr("fhir").rsplit(':').next().unwrap().to_owned();
    let base = format!("https://localhost:{port}/fhir");

    // curl over HTTP/2 and HTTP/1.1, negotiated by ALPN; links name the https origin.
    for (flag, want) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let (version, code, body) = curl(flag, &ca_file, &format!("{base}/Patient/a-pat-1"), &stack.a).await;
        assert_eq!((version.as_str(), code.as_str()), (want, "200"), "{body}");
        let (_, code, body) = curl(flag, &ca_file, &format!("{base}/Observation?_count=2"), &stack.a).await;
        assert_eq!(code, "200", "{body}");
        assert!(body.contains(&format!("\"url\":\"{base}/Observation")), "{body}");
        let (_, code, _) = curl(flag, &ca_file, &format!("{base}/Patient/b-pat-1"), &stack.a).await;
        assert_eq!(code, "404", "another tenant's patient looks missing over TLS too");
    }
    // The Python SMART client (HTTP/1.1 through `requests`), trusting only the test CA.
    let run =
        smart_client(&base, &stack.a, "a-pat-1", "Observation", 2, &[("REQUESTS_CA_BUNDLE", &path_str(&ca_file))])
            .await;
    assert!(run.success, "the SMART client failed over TLS:\n{}", run.stderr);
    assert_eq!(run.output["patient"]["id"], "a-pat-1");
    assert_eq!(run.output["discovered"]["implementation_url"], serde_json::json!(base));

    // An HTTP/2 connection open across a rotation keeps working; new connections get the new certificate.
    let addr = format!("127.0.0.1:{port}");
    let (mut open, der) = fhir_connection(&addr, &ca_file, "h2").await;
    assert_eq!(der, first.der);
    let (code, body) = h2_get(&mut open, &format!("{base}/Patient/a-pat-1"), &stack.a).await;
    assert_eq!(code, 200, "{body}");
    let second = ca.issue(certs.path(), "fhir", &["localhost", "127.0.0.1"], Usage::Server, Validity::Current);
    eventually("the FHIR port to present the new certificate", WAIT, || async {
        (presented(&addr, &ca_file, "localhost", &["h2"]).await == second.der).then_some(())
    })
    .await;
    let (code, body) = h2_get(&mut open, &format!("{base}/Patient/a-pat-1"), &stack.a).await;
    assert_eq!(code, 200, "the connection made before the rotation still serves: {body}");
    let (version, code, _) = curl("--http2", &ca_file, &format!("{base}/metadata"), &stack.a).await;
    assert_eq!((version.as_str(), code.as_str()), ("2", "200"));

    // A client that never finishes its handshake is closed by the first-request timeout (2 s here), as is one
    // that sends half a ClientHello; a plaintext request on the TLS port is refused by the handshake.
    let metric = |body: &str, reason: &str| -> u64 {
        let key = format!("fhirgw_dp_connections_closed_total{{listener=\"fhir\",reason=\"{reason}\"}} ");
        body.lines().find_map(|l| l.strip_prefix(&key)).map_or(0, |v| v.trim().parse().unwrap())
    };
    let metrics = || async {
        http().get(format!("http://{}/metrics", stack.dp.addr("admin"))).send().await.unwrap().text().await.unwrap()
    };
    let timeouts_before = metric(&metrics().await, "first_request_timeout");
    for first_bytes in [&b""[..], &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01][..]] {
        let started = Instant::now();
        let mut silent = TcpStream::connect(&addr).await.unwrap();
        silent.write_all(first_bytes).await.unwrap();
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(15), silent.read(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "the server must close it: {read:?}");
        assert!(started.elapsed() >= Duration::from_millis(1500), "closed before the timeout: {:?}", started.elapsed());
    }
    let mut plain = TcpStream::connect(&addr).await.unwrap();
    plain.write_all(b"GET /fhir/metadata HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), plain.read_to_end(&mut answer)).await.unwrap();
    assert!(!String::from_utf8_lossy(&answer).contains("CapabilityStatement"));
    let body = eventually("the closed connections to be counted", WAIT, || async {
        let body = metrics().await;
        (metric(&body, "first_request_timeout") >= timeouts_before + 2 && metric(&body, "tls_handshake") >= 1)
            .then_some(body)
    })
    .await;
    assert!(metric(&body, "tls_handshake") >= 1);
    logged(&stack.dp, "speaking plaintext to a TLS port").await;
}
