//! `fhirgw-controlplane`: one gRPC port serving the operator API, the config push stream, reflection and health;
//! one admin HTTP port serving `/metrics` and `/healthz`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use fhirgw_controlplane::admin::AdminService;
use fhirgw_controlplane::admin_http;
use fhirgw_controlplane::auth::BearerAuth;
use fhirgw_controlplane::metrics::Metrics;
use fhirgw_controlplane::push::PushService;
use fhirgw_controlplane::status::Registry;
use fhirgw_controlplane::store::Store;
use fhirgw_proto::admin::v1::admin_server::AdminServer;
use fhirgw_proto::push::v1::config_discovery_server::ConfigDiscoveryServer;
use tokio_stream::wrappers::TcpListenerStream;
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
    /// SQLite database file of the embedded store (created if missing).
    #[arg(long, env = "FHIRGW_CP_STORE", default_value = "fhirgw-controlplane.db")]
    store: PathBuf,
    /// File holding the operator bearer token. Else FHIRGW_OPERATOR_TOKEN.
    #[arg(long, env = "FHIRGW_OPERATOR_TOKEN_FILE")]
    operator_token_file: Option<PathBuf>,
    /// File holding the token data planes present. Else FHIRGW_DATAPLANE_TOKEN.
    #[arg(long, env = "FHIRGW_DATAPLANE_TOKEN_FILE")]
    dataplane_token_file: Option<PathBuf>,
    /// Longest life of one config stream (jittered down by up to 20%), so data planes rebalance across replicas.
    #[arg(long, env = "FHIRGW_CP_STREAM_LIFETIME_SECS", default_value_t = 1800)]
    stream_lifetime_secs: u64,
    /// An idle config stream gets an empty response this often; data planes treat it as confirmation that their
    /// grants are current. Keep it well below the data planes' --grant-ttl-secs.
    #[arg(long, env = "FHIRGW_CP_HEARTBEAT_SECS", default_value_t = 30)]
    heartbeat_secs: u64,
    /// How often to look for writes by other replicas sharing the store.
    #[arg(long, env = "FHIRGW_CP_POLL_MS", default_value_t = 1000)]
    poll_ms: u64,
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
    let operator = BearerAuth::load(args.operator_token_file.as_deref(), "FHIRGW_OPERATOR_TOKEN", "operator")?;
    let dataplane = BearerAuth::load(args.dataplane_token_file.as_deref(), "FHIRGW_DATAPLANE_TOKEN", "data plane")?;

    let store = Store::open(&args.store).await.with_context(|| format!("opening store {}", args.store.display()))?;
    info!(store = %args.store.display(), revision = store.state().revision, "store open");
    let registry = Arc::new(Registry::default());
    let metrics = Metrics::new(store.clone(), registry.clone());

    let poller = store.clone();
    let poll = Duration::from_millis(args.poll_ms.max(50));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(poll);
        loop {
            tick.tick().await;
            if let Err(e) = poller.refresh().await {
                warn!(error = %e, "store refresh failed");
            }
        }
    });

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

    let admin = tonic::service::interceptor::InterceptedService::new(
        AdminServer::new(AdminService::new(store.clone(), registry.clone(), metrics.clone()))
            .max_decoding_message_size(16 * 1024 * 1024),
        operator,
    );
    let push = ConfigDiscoveryServer::with_interceptor(
        PushService::new(
            store.clone(),
            registry.clone(),
            Duration::from_secs(args.stream_lifetime_secs.max(10)),
            Duration::from_secs(args.heartbeat_secs.max(1)),
            metrics.clone(),
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
    tokio::spawn(admin_http::serve(admin_listener, metrics));

    tonic::transport::Server::builder()
        .trace_fn(grpc_span)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(admin)
        .add_service(push)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), fhirgw_telemetry::shutdown_signal())
        .await?;
    info!("control plane stopped");
    Ok(())
}
