//! `fhirgw-controlplane`: one gRPC port serving the operator API, the config push stream, reflection and health;
//! one admin HTTP port serving `/metrics` and `/healthz`. Both over TLS when given a certificate (see `transport`
//! and `peer_auth` for client certificates).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use fhirgw_controlplane::admin::AdminService;
use fhirgw_controlplane::admin_http;
use fhirgw_controlplane::auth::BearerAuth;
use fhirgw_controlplane::limits::{MAX_ADMIN_MESSAGE_BYTES, ResourceExhausted};
use fhirgw_controlplane::metrics::Metrics;
use fhirgw_controlplane::operators::OperatorAuth;
use fhirgw_controlplane::peer_auth::{AdminGate, DataPlaneAuth};
use fhirgw_controlplane::push::PushService;
use fhirgw_controlplane::status::{self, Registry};
use fhirgw_controlplane::store::{Location, Store};
use fhirgw_controlplane::transport::{self, DATAPLANE, OPERATOR};
use fhirgw_proto::admin::v1::admin_server::AdminServer;
use fhirgw_proto::push::v1::config_discovery_server::ConfigDiscoveryServer;
use fhirgw_tls::server::ServerSpec;
use tokio::sync::watch;
use tracing::{info, warn};

#[derive(Parser, Debug)]
#[command(version, about = "fhirgw control plane")]
struct Args {
    /// gRPC listen address (operator API, config stream, reflection, health).
    #[arg(long, env = "FHIRGW_CP_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Admin HTTP listen address (/metrics, /healthz).
    #[arg(long, env = "FHIRGW_CP_ADMIN_LISTEN", default_value = "127.0.0.1:9902")]
    admin_listen: SocketAddr,
    /// The store: a SQLite file (a path, or sqlite:///path; created if missing; one control plane only, held by an
    /// exclusive lock), or a PostgreSQL URL (postgres://user@host:5432/db, several replicas). Give the PostgreSQL
    /// password with --store-password-file or PGPASSWORD, not in the URL.
    #[arg(long, env = "FHIRGW_CP_STORE", default_value = "fhirgw-controlplane.db")]
    store: String,
    /// File holding the PostgreSQL password (overrides the URL's and PGPASSWORD).
    #[arg(long, env = "FHIRGW_CP_STORE_PASSWORD_FILE")]
    store_password_file: Option<PathBuf>,
    /// This replica's name in the audit log and GetStatus. Default: hostname-pid.
    #[arg(long, env = "FHIRGW_CP_REPLICA_ID")]
    replica_id: Option<String>,
    /// File holding the operator bearer token (the operator named `operator`). Else FHIRGW_OPERATOR_TOKEN.
    #[arg(long, env = "FHIRGW_OPERATOR_TOKEN_FILE")]
    operator_token_file: Option<PathBuf>,
    /// File of named operator credentials, one `name sha256-hex-of-token` per line (`printf %s "$TOKEN" |
    /// sha256sum`); re-read when it changes. Usable with or without the single token.
    #[arg(long, env = "FHIRGW_OPERATORS_FILE")]
    operators_file: Option<PathBuf>,
    /// File holding the token data planes present. Else FHIRGW_DATAPLANE_TOKEN. Optional with --dataplane-ca-file;
    /// with both, data planes need both.
    #[arg(long, env = "FHIRGW_DATAPLANE_TOKEN_FILE")]
    dataplane_token_file: Option<PathBuf>,
    /// PEM certificate chain (server certificate first) for the gRPC and admin ports; with --tls-key-file both
    /// serve TLS only. Re-read within 2 s of a change: new connections use the new certificate, open streams stay.
    #[arg(long, env = "FHIRGW_CP_TLS_CERT_FILE", requires = "tls_key_file")]
    tls_cert_file: Option<PathBuf>,
    /// PEM private key of --tls-cert-file.
    #[arg(long, env = "FHIRGW_CP_TLS_KEY_FILE", requires = "tls_cert_file")]
    tls_key_file: Option<PathBuf>,
    /// PEM bundle of the CA that issues data planes' client certificates (mutual TLS): a data plane must present one,
    /// and its URI or DNS SAN is its identity in GetStatus. Such a certificate can never call the admin API.
    #[arg(long, env = "FHIRGW_CP_DATAPLANE_CA_FILE", requires = "tls_cert_file")]
    dataplane_ca_file: Option<PathBuf>,
    /// PEM bundle of the CA that issues operators' client certificates: operators must then present one as well as
    /// their bearer token. Must not share a certificate with --dataplane-ca-file.
    #[arg(long, env = "FHIRGW_CP_OPERATOR_CA_FILE", requires = "tls_cert_file")]
    operator_ca_file: Option<PathBuf>,
    /// Longest life of one config stream (jittered down by up to 20%), so data planes rebalance across replicas.
    #[arg(long, env = "FHIRGW_CP_STREAM_LIFETIME_SECS", default_value_t = 1800)]
    stream_lifetime_secs: u64,
    /// An idle config stream gets an empty response this often; data planes treat it as confirmation that their
    /// grants are current. Keep it well below the data planes' --grant-ttl-secs.
    #[arg(long, env = "FHIRGW_CP_HEARTBEAT_SECS", default_value_t = 30)]
    heartbeat_secs: u64,
    /// How often to look for writes by other replicas sharing the store when no notification came (PostgreSQL's
    /// LISTEN/NOTIFY brings them at once; this poll is the fallback).
    #[arg(long, env = "FHIRGW_CP_POLL_MS", default_value_t = 1000)]
    poll_ms: u64,
    /// How often this replica publishes its connected data planes to the store for the other replicas' GetStatus.
    #[arg(long, env = "FHIRGW_CP_STATUS_INTERVAL_MS", default_value_t = 1000)]
    status_interval_ms: u64,
    /// On SIGTERM every config stream ends at once (data planes reconnect to another replica); the process then
    /// exits within this many seconds even if connections linger. Keep it below the pod's termination grace period.
    #[arg(long, env = "FHIRGW_CP_SHUTDOWN_GRACE_SECS", default_value_t = 5)]
    shutdown_grace_secs: u64,
    /// Log format: text or json.
    #[arg(long, env = "FHIRGW_LOG_FORMAT", default_value = "text")]
    log_format: String,
}

/// The server span of one gRPC call, continuing the caller's W3C trace context (`traceparent` metadata), so an
/// operator's trace runs through the admin call, the store write and the pushes it causes. Health checks and
/// reflection get none: probes would flood the traces.
fn grpc_span(request: &http::Request<()>) -> tracing::Span {
    let path = request.uri().path();
    if path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.") {
        return tracing::Span::none();
    }
    let span =
        tracing::info_span!("grpc", otel.name = %path.trim_start_matches('/'), otel.kind = "server", rpc = %path);
    fhirgw_telemetry::continue_from_headers(&span, request.headers());
    span
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _telemetry =
        fhirgw_telemetry::init("fhirgw-controlplane", args.log_format == "json", "info,sqlx=warn,h2=warn,tower=warn")
            .map_err(|e| anyhow::anyhow!("telemetry: {e}"))?;
    let single = if args.operator_token_file.is_some() || std::env::var_os("FHIRGW_OPERATOR_TOKEN").is_some() {
        Some(BearerAuth::load(args.operator_token_file.as_deref(), "FHIRGW_OPERATOR_TOKEN", "operator")?)
    } else {
        None
    };
    let operator = OperatorAuth::new(single, args.operators_file.as_deref())?;
    tokio::spawn(operator.clone().watch(Duration::from_secs(2)));
    let dataplane_token = if args.dataplane_token_file.is_some() || std::env::var_os("FHIRGW_DATAPLANE_TOKEN").is_some()
    {
        Some(BearerAuth::load(args.dataplane_token_file.as_deref(), "FHIRGW_DATAPLANE_TOKEN", "data plane")?)
    } else {
        None
    };
    let dataplane = DataPlaneAuth::new(dataplane_token, args.dataplane_ca_file.is_some())?;
    let admin_gate = AdminGate::new(operator, args.operator_ca_file.is_some());
    let (grpc_tls, admin_tls) = match (&args.tls_cert_file, &args.tls_key_file) {
        (Some(cert), Some(key)) => {
            let mut client_cas = Vec::new();
            client_cas.extend(args.dataplane_ca_file.clone().map(|ca| (DATAPLANE, ca)));
            client_cas.extend(args.operator_ca_file.clone().map(|ca| (OPERATOR, ca)));
            let spec = |client_cas, alpn| ServerSpec { cert: cert.clone(), key: key.clone(), client_cas, alpn };
            let grpc = spec(client_cas, vec!["h2"]).start("grpc").context("TLS on the gRPC port")?;
            let admin = spec(Vec::new(), vec!["http/1.1"]).start("admin").context("TLS on the admin port")?;
            (Some(grpc), Some(admin))
        }
        _ => {
            warn!(
                "no --tls-cert-file: the gRPC and admin ports are plaintext (tokens travel in clear; local use only)"
            );
            (None, None)
        }
    };

    let replica = args.replica_id.clone().unwrap_or_else(|| format!("{}-{}", hostname(), std::process::id()));
    let password = match &args.store_password_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading the store password file {}", path.display()))?
                .trim_end_matches(['\r', '\n'])
                .to_owned(),
        ),
        None => None,
    };
    let location = Location::parse(&args.store);
    let store = Store::open(&location, password.as_deref(), &replica).await.context("opening the store")?;
    info!(store = %store.describe(), store_id = store.store_id(), %replica, revision = store.state().revision, "store open");
    let status_interval = Duration::from_millis(args.status_interval_ms.max(100));
    let registry = Arc::new(Registry::new(&replica, status_interval));
    let metrics = Metrics::new(store.clone(), registry.clone());

    // SIGTERM (or Ctrl-C) flips this once; everything that must end on shutdown watches it.
    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(async move {
        fhirgw_telemetry::shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    tokio::spawn(store.clone().follow(Duration::from_millis(args.poll_ms.max(50))));
    let publisher = tokio::spawn(status::publish(registry.clone(), store.clone(), stop.clone()));

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<AdminServer<AdminService>>().await;
    health_reporter.set_serving::<ConfigDiscoveryServer<PushService>>().await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(fhirgw_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(fhirgw_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    // Decode no more than an object can be: a larger message is refused from its length prefix, unread.
    let admin = ResourceExhausted(tonic::service::interceptor::InterceptedService::new(
        AdminServer::new(AdminService::new(store.clone(), registry.clone(), metrics.clone()))
            .max_decoding_message_size(MAX_ADMIN_MESSAGE_BYTES),
        admin_gate,
    ));
    let push = ConfigDiscoveryServer::with_interceptor(
        PushService::new(
            store.clone(),
            registry.clone(),
            Duration::from_secs(args.stream_lifetime_secs.max(10)),
            Duration::from_secs(args.heartbeat_secs.max(1)),
            metrics.clone(),
            stop.clone(),
        ),
        dataplane,
    );

    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let admin_listener = tokio::net::TcpListener::bind(args.admin_listen)
        .await
        .with_context(|| format!("binding {}", args.admin_listen))?;
    let (local, admin_addr) = (listener.local_addr()?, admin_listener.local_addr()?);
    // One machine-readable line on stdout: how scripts and tests learn the ports when they were 0.
    println!(
        "{}",
        serde_json::json!({ "event": "listening", "grpc": local.to_string(), "admin": admin_addr.to_string() })
    );
    info!(%local, %admin_addr, "control plane listening");
    tokio::spawn(admin_http::serve(admin_listener, metrics, admin_tls));

    let mut stopped = stop.clone();
    let server = tonic::transport::Server::builder()
        .trace_fn(grpc_span)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(admin)
        .add_service(push)
        .serve_with_incoming_shutdown(transport::incoming(listener, grpc_tls), async move {
            let _ = stopped.wait_for(|s| *s).await;
        });
    let mut server = tokio::spawn(server);
    let mut signalled = stop.clone();
    tokio::select! {
        result = &mut server => result??,
        _ = signalled.wait_for(|s| *s) => {
            // Streams end at once (see PushService); what still lingers after the grace period is cut off, so the
            // process is gone well within a Kubernetes termination grace period.
            let grace = Duration::from_secs(args.shutdown_grace_secs);
            info!(grace_secs = grace.as_secs(), "shutting down: config streams ended, draining");
            match tokio::time::timeout(grace, &mut server).await {
                Ok(result) => result??,
                Err(_) => warn!("connections still open after the grace period; exiting anyway"),
            }
        }
    }
    // Withdraw this replica's data planes from the other replicas' GetStatus.
    let _ = tokio::time::timeout(Duration::from_secs(2), publisher).await;
    info!("control plane stopped");
    Ok(())
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "controlplane".to_owned())
}
