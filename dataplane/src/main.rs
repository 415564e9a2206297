//! `fhirgw-dataplane`: the FHIR port, the admin port, and the config client that follows the control plane.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use fhirgw_config::audit::AuditMode;
use fhirgw_dataplane::audit;
use fhirgw_dataplane::authn::Authenticator;
use fhirgw_dataplane::config_client::ConfigClient;
use fhirgw_dataplane::cp_tls::ControlPlaneTls;
use fhirgw_dataplane::lifecycle::{Lifecycle, Phase};
use fhirgw_dataplane::metrics::Metrics;
use fhirgw_dataplane::persist::SnapshotDir;
use fhirgw_dataplane::policy::paging::PageSigner;
use fhirgw_dataplane::proxy::{Proxy, PublicConfig};
use fhirgw_dataplane::state::{ConfigState, Source};
use fhirgw_dataplane::upstream::{UpstreamClient, environment_rejections};
use fhirgw_dataplane::{admin_http, limits, server};
use fhirgw_proto::push::v1 as push;
use fhirgw_tls::client::ClientSpec;
use fhirgw_tls::server::ServerSpec;
use rand::Rng;
use tracing::{error, info, warn};

#[derive(Parser, Debug)]
#[command(version, about = "fhirgw data plane")]
struct Args {
    /// FHIR listen address.
    #[arg(long, env = "FHIRGW_DP_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Admin listen address (/healthz, /readyz, /config, /metrics).
    #[arg(long, env = "FHIRGW_DP_ADMIN_LISTEN", default_value = "127.0.0.1:9901")]
    admin_listen: SocketAddr,
    /// Control plane gRPC URL, or several separated by commas (replicas on one PostgreSQL store); a name that
    /// resolves to several addresses counts as each. When a stream drops, the next session goes to the next one.
    #[arg(long, env = "FHIRGW_CONTROL_PLANE", default_value = "http://127.0.0.1:50051")]
    control_plane: String,
    /// File holding the data plane token for the control plane. Else FHIRGW_DATAPLANE_TOKEN. Optional with a client
    /// certificate (--client-cert-file).
    #[arg(long, env = "FHIRGW_DATAPLANE_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// PEM bundle of the CA(s) the control plane's certificate must chain to (https:// control-plane URLs).
    /// Default: the public web PKI roots.
    #[arg(long, env = "FHIRGW_CONTROL_PLANE_CA_FILE")]
    control_plane_ca_file: Option<PathBuf>,
    /// Name the control plane's certificate is checked against. Default: the host of each --control-plane URL.
    #[arg(long, env = "FHIRGW_CONTROL_PLANE_SERVER_NAME")]
    control_plane_server_name: Option<String>,
    /// This data plane's client certificate (PEM chain) for mutual TLS with the control plane. Re-read within 2 s of
    /// a change: the next connection presents the new one, the open stream carries on.
    #[arg(long, env = "FHIRGW_DP_CLIENT_CERT_FILE", requires = "client_key_file")]
    client_cert_file: Option<PathBuf>,
    /// PEM private key of --client-cert-file.
    #[arg(long, env = "FHIRGW_DP_CLIENT_KEY_FILE", requires = "client_cert_file")]
    client_key_file: Option<PathBuf>,
    /// Serve the FHIR port over TLS with this certificate chain (PEM), HTTP/2 and HTTP/1.1 by ALPN, for deployments
    /// without a TLS-terminating ingress. Reloaded within 2 s of a change. Default: plaintext.
    #[arg(long, env = "FHIRGW_DP_TLS_CERT_FILE", requires = "tls_key_file")]
    tls_cert_file: Option<PathBuf>,
    /// PEM private key of --tls-cert-file.
    #[arg(long, env = "FHIRGW_DP_TLS_KEY_FILE", requires = "tls_cert_file")]
    tls_key_file: Option<PathBuf>,
    /// Directory for the last good snapshot; empty to keep none.
    #[arg(long, env = "FHIRGW_DP_STATE_DIR", default_value = "fhirgw-dataplane-state")]
    state_dir: PathBuf,
    /// Node id reported to the control plane. Default: hostname plus a random suffix.
    #[arg(long, env = "FHIRGW_NODE_ID")]
    node_id: Option<String>,
    /// File holding the key that signs paging links. Every data plane behind one load balancer needs the same key;
    /// without one, a random key is used and page links only work on the replica that issued them.
    #[arg(long, env = "FHIRGW_PAGING_KEY_FILE")]
    paging_key_file: Option<PathBuf>,
    /// Grants are security state: when the control plane has not confirmed the configuration for this long (it sends
    /// a heartbeat every 30 s by default), requests that depend on grants fail closed with 503. Routes stay served.
    #[arg(long, env = "FHIRGW_GRANT_TTL_SECS", default_value_t = 300)]
    grant_ttl_secs: u64,
    /// Past the grant TTL /readyz answers 503, so load balancers send grant-dependent traffic to data planes that can
    /// serve it. With this flag it answers 200 "degraded" instead: for a fleet that shares one control plane and
    /// would rather answer 503 OperationOutcomes than have no ready endpoint at all (see deploy/README.md).
    #[arg(long, env = "FHIRGW_DP_READY_WITH_STALE_GRANTS")]
    ready_with_stale_grants: bool,
    /// Public base URL clients use (e.g. https://fhir.example.org); overrides forwarding headers. Route tables' base
    /// paths are appended to it.
    #[arg(long, env = "FHIRGW_PUBLIC_BASE_URL")]
    public_base_url: Option<String>,
    /// Proxies whose X-Forwarded-* / Forwarded headers are honoured, as CIDRs or addresses, comma separated. Default:
    /// none, so forwarding headers from clients are ignored.
    #[arg(long, env = "FHIRGW_TRUSTED_PROXIES", value_delimiter = ',')]
    trusted_proxies: Vec<String>,
    /// After SIGTERM: seconds the data plane keeps serving (and accepting) with /readyz failing, so load balancers
    /// stop sending to it before anything closes. A second SIGTERM skips what is left of it.
    #[arg(long, env = "FHIRGW_DP_SHUTDOWN_DELAY_SECS", default_value_t = 5)]
    shutdown_delay_secs: u64,
    /// After that delay: seconds the requests that have arrived get to finish once the FHIR listener is closed.
    #[arg(long, env = "FHIRGW_DP_DRAIN_SECS", default_value_t = 25)]
    drain_secs: u64,
    /// Most FHIR connections open at once; 0 sizes it from the file-descriptor limit (what is left after 64 reserved
    /// descriptors, halved for the upstream connections). At the cap, the oldest connection that has sent no request
    /// is evicted for the new one, or the new one is closed.
    #[arg(long, env = "FHIRGW_DP_MAX_CONNECTIONS", default_value_t = 0)]
    max_connections: usize,
    /// Seconds a new connection gets to send its first complete request head before it is closed.
    #[arg(long, env = "FHIRGW_DP_FIRST_REQUEST_TIMEOUT_SECS", default_value_t = 10)]
    first_request_timeout_secs: u64,
    /// Seconds a connection (HTTP/1.1 keep-alive or HTTP/2) may carry no request before it is closed (HTTP/2: GOAWAY).
    #[arg(long, env = "FHIRGW_DP_IDLE_TIMEOUT_SECS", default_value_t = 75)]
    idle_timeout_secs: u64,
    /// Accept configuration from a control plane on another store, or at an older store revision than the one held
    /// (normally refused: NACKed while the last good snapshot is served). For a deliberate restore; to accept one
    /// configuration only, POST /config/accept-next on the admin port instead.
    #[arg(long, env = "FHIRGW_DP_ALLOW_CONFIG_ROLLBACK")]
    allow_config_rollback: bool,
    /// Request body bytes buffered at once by all requests together (writes, batches, forms; each body is also
    /// limited to 16 MiB, 413 past it). A request whose body does not fit gets 503 with Retry-After before its body
    /// is read.
    #[arg(long, env = "FHIRGW_DP_BODY_BUDGET_BYTES", default_value_t = 64 * 1024 * 1024)]
    body_budget_bytes: usize,
    /// Seconds a request body (buffered, or a raw Binary upload) may stall with nothing arriving: 408 past it.
    #[arg(long, env = "FHIRGW_DP_BODY_IDLE_TIMEOUT_SECS", default_value_t = 30)]
    body_idle_timeout_secs: u64,
    /// Seconds a buffered request body (at most 16 MiB) may take to arrive whole: 408 past it, and its share of
    /// --body-budget-bytes is given back. Raw Binary uploads are bounded by --body-idle-timeout-secs only.
    #[arg(long, env = "FHIRGW_DP_BODY_READ_TIMEOUT_SECS", default_value_t = 60)]
    body_read_timeout_secs: u64,
    /// Log format: text or json.
    #[arg(long, env = "FHIRGW_LOG_FORMAT", default_value = "text")]
    log_format: String,
    /// Directory of the audit spool (AuditEvents on their way to the sinks; it holds PHI). Unset: no spool, so
    /// requests of tenants or routes audited in strict mode are answered 503 and relaxed events are dropped.
    #[arg(long, env = "FHIRGW_DP_AUDIT_DIR")]
    audit_dir: Option<PathBuf>,
    /// Size limit of the audit spool. When it is full, strict requests are answered 503 and relaxed events dropped.
    #[arg(long, env = "FHIRGW_DP_AUDIT_SPOOL_MAX_BYTES", default_value_t = 1 << 30)]
    audit_spool_max_bytes: u64,
    /// Size at which a spool segment file is closed and a new one started (a segment is deleted once every sink has
    /// all its events).
    #[arg(long, env = "FHIRGW_DP_AUDIT_SEGMENT_BYTES", default_value_t = 16 << 20)]
    audit_segment_bytes: u64,
    /// Relaxed-mode events waiting to be written, at most; more are dropped (counted, logged), never waited for.
    #[arg(long, env = "FHIRGW_DP_AUDIT_QUEUE_EVENTS", default_value_t = 10_000)]
    audit_queue_events: usize,
    /// Strict mode's commit delay, in microseconds: a group commit that finds strict events waits up to this long
    /// for the strict requests already admitted and not yet recorded, so that one disk flush carries them all (fewer
    /// flushes under concurrent strict traffic, for at most this much latency; a request alone does not wait). 0: off;
    /// at most 100000.
    #[arg(long, env = "FHIRGW_DP_AUDIT_COMMIT_DELAY_US", default_value_t = 300)]
    audit_commit_delay_us: u64,
    /// How requests refused without a caller (401, malformed requests) are audited: off, relaxed or strict (a
    /// route's own audit mode applies too). Only with --audit-dir.
    #[arg(long, env = "FHIRGW_DP_AUDIT_UNAUTHENTICATED", default_value = "relaxed")]
    audit_unauthenticated: String,
    /// FHIR server that receives the AuditEvents (its base URL): batches of `PUT AuditEvent/<id>`.
    #[arg(long, env = "FHIRGW_DP_AUDIT_FHIR_URL")]
    audit_fhir_url: Option<String>,
    /// The FHIR sink's credential, written as an upstream's `auth` in proto3 JSON, e.g.
    /// '{"static_token":{"token_file":"/run/secrets/audit.token"}}' or '{"client_credentials":{...}}'.
    #[arg(long, env = "FHIRGW_DP_AUDIT_FHIR_AUTH")]
    audit_fhir_auth: Option<String>,
    /// AuditEvents per request to the FHIR sink, at most.
    #[arg(long, env = "FHIRGW_DP_AUDIT_FHIR_BATCH", default_value_t = 100)]
    audit_fhir_batch: usize,
    /// NDJSON sink: one AuditEvent per line, appended (and fsynced) to this file, or on stdout for `-`.
    #[arg(long, env = "FHIRGW_DP_AUDIT_NDJSON")]
    audit_ndjson: Option<String>,
    /// First delay before a failed delivery to a sink is retried (doubling, jittered, up to the max).
    #[arg(long, env = "FHIRGW_DP_AUDIT_RETRY_INITIAL_MS", default_value_t = 500)]
    audit_retry_initial_ms: u64,
    /// Longest delay between two delivery attempts.
    #[arg(long, env = "FHIRGW_DP_AUDIT_RETRY_MAX_MS", default_value_t = 30_000)]
    audit_retry_max_ms: u64,
    /// Access log (one line per FHIR request, target `fhirgw::access`, in the --log-format): `on`, `off`, or
    /// `sample=P` to keep a fraction P (0 to 1) of the complete 2xx responses and every other one (errors, refusals,
    /// aborted and abandoned requests).
    #[arg(long, env = "FHIRGW_DP_ACCESS_LOG", default_value = "on")]
    access_log: fhirgw_dataplane::access_log::AccessLog,
}

/// The audit settings from the flags.
fn audit_settings(args: &Args, node: &str) -> anyhow::Result<audit::Settings> {
    let unauthenticated = AuditMode::parse(&args.audit_unauthenticated).with_context(|| {
        format!("--audit-unauthenticated {}: use off, relaxed or strict", args.audit_unauthenticated)
    })?;
    let mut sinks = Vec::new();
    if let Some(url) = &args.audit_fhir_url {
        let upstream = audit::sink::fhir_sink(url, args.audit_fhir_auth.as_deref()).map_err(anyhow::Error::msg)?;
        sinks.push(audit::ship::SinkConfig::Fhir { upstream, batch: args.audit_fhir_batch.clamp(1, 1000) });
    } else if args.audit_fhir_auth.is_some() {
        anyhow::bail!("--audit-fhir-auth needs --audit-fhir-url");
    }
    if let Some(path) = &args.audit_ndjson {
        let path = (path != "-").then(|| PathBuf::from(path));
        sinks.push(audit::ship::SinkConfig::Ndjson { path });
    }
    anyhow::ensure!(args.audit_dir.is_some() || sinks.is_empty(), "audit sinks need a spool: set --audit-dir");
    anyhow::ensure!(args.audit_segment_bytes >= 4096, "--audit-segment-bytes must be at least 4096");
    anyhow::ensure!(args.audit_spool_max_bytes >= 8192, "--audit-spool-max-bytes must be at least 8192");
    Ok(audit::Settings {
        dir: args.audit_dir.clone(),
        max_bytes: args.audit_spool_max_bytes,
        segment_bytes: args.audit_segment_bytes.min(args.audit_spool_max_bytes / 2),
        relaxed_queue: args.audit_queue_events,
        commit_delay: Duration::from_micros(args.audit_commit_delay_us.min(100_000)),
        unauthenticated,
        node: node.to_owned(),
        sinks,
        backoff: audit::ship::Backoff {
            initial: Duration::from_millis(args.audit_retry_initial_ms.max(1)),
            max: Duration::from_millis(args.audit_retry_max_ms.max(args.audit_retry_initial_ms).max(1)),
        },
    })
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "dataplane".to_owned())
}

/// TLS towards the control plane, from the URLs' scheme: every URL `https://` (then a client certificate may be
/// given) or every URL `http://` (then no TLS flag may be). Mixing them would let a mutual-TLS data plane fall back to
/// plaintext, so it is refused.
fn control_plane_tls(args: &Args) -> anyhow::Result<Option<ControlPlaneTls>> {
    let urls: Vec<&str> = args.control_plane.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
    let https = urls.iter().filter(|u| u.starts_with("https://")).count();
    if https == 0 {
        if args.client_cert_file.is_some() || args.control_plane_ca_file.is_some() {
            anyhow::bail!("--client-cert-file and --control-plane-ca-file need https:// control-plane URLs");
        }
        return Ok(None);
    }
    if https != urls.len() {
        anyhow::bail!("--control-plane mixes https:// and http:// URLs; use https:// for all of them");
    }
    let spec = ClientSpec {
        ca: args.control_plane_ca_file.clone(),
        identity: args.client_cert_file.clone().zip(args.client_key_file.clone()),
        alpn: Vec::new(),
    };
    let tls = ControlPlaneTls::start(spec, args.control_plane_server_name.clone())
        .context("TLS towards the control plane")?;
    Ok(Some(tls))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _telemetry =
        fhirgw_telemetry::init("fhirgw-dataplane", args.log_format == "json", "info,h2=warn,tower=warn,hyper=warn")
            .map_err(|e| anyhow::anyhow!("telemetry: {e}"))?;
    let token = match &args.token_file {
        Some(path) => Some(
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?.trim().to_owned(),
        ),
        None => std::env::var("FHIRGW_DATAPLANE_TOKEN").ok().map(|t| t.trim().to_owned()),
    };
    let cp_tls = control_plane_tls(&args)?;
    if token.is_none() && args.client_cert_file.is_none() {
        anyhow::bail!(
            "no credentials for the control plane: --client-cert-file (mutual TLS) or --token-file / FHIRGW_DATAPLANE_TOKEN"
        );
    }
    let fhir_tls = match (&args.tls_cert_file, &args.tls_key_file) {
        (Some(cert), Some(key)) => Some(
            ServerSpec { cert: cert.clone(), key: key.clone(), client_cas: Vec::new(), alpn: vec!["h2", "http/1.1"] }
                .start("fhir")
                .context("TLS on the FHIR port")?,
        ),
        _ => None,
    };
    let host = hostname();
    let node_id =
        args.node_id.clone().unwrap_or_else(|| format!("{host}-{:06x}", rand::rng().random::<u32>() & 0xff_ffff));

    let state = ConfigState::new();
    state.set_allow_rollback(args.allow_config_rollback);
    let grant_ttl = Duration::from_secs(args.grant_ttl_secs.max(1));
    state.set_grant_ttl(grant_ttl);
    let persist = (!args.state_dir.as_os_str().is_empty()).then(|| SnapshotDir::new(&args.state_dir));
    if let Some(dir) = &persist {
        match dir.load() {
            Ok(Some(loaded)) => {
                let env = environment_rejections(&loaded.snapshot);
                if env.is_empty() {
                    info!(version = %loaded.snapshot.digest, revision = loaded.snapshot.system_version, store_id = %loaded.store_id, path = %dir.path().display(), "serving the last good snapshot from disk until the control plane answers");
                    state.install(Arc::new(loaded.snapshot), Source::Disk, &loaded.store_id);
                    if let Some(at) = loaded.confirmed_at {
                        state.confirm(at);
                    }
                } else {
                    warn!(problems = ?env, "the snapshot on disk cannot be served here; waiting for the control plane");
                }
            }
            Ok(None) => info!("no snapshot on disk; not ready until the control plane answers"),
            Err(e) => {
                error!(error = %e, "refusing the snapshot on disk; not ready until the control plane answers")
            }
        }
    }

    let metrics = Metrics::with_access_log(state.clone(), args.access_log);
    let client = ConfigClient {
        endpoint: args.control_plane.clone(),
        token,
        tls: cp_tls,
        node: push::Node {
            id: node_id.clone(),
            build_version: fhirgw_telemetry::process::build_version(),
            hostname: host,
        },
        state: state.clone(),
        persist,
        metrics: metrics.clone(),
    };
    tokio::spawn(client.run());

    let fhir = tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let admin = tokio::net::TcpListener::bind(args.admin_listen)
        .await
        .with_context(|| format!("binding {}", args.admin_listen))?;
    let (fhir_addr, admin_addr) = (fhir.local_addr()?, admin.local_addr()?);
    // One machine-readable line on stdout: how scripts and tests learn the ports when they were 0.
    println!(
        "{}",
        serde_json::json!({ "event": "listening", "fhir": fhir_addr.to_string(), "admin": admin_addr.to_string(), "node_id": node_id })
    );
    info!(%fhir_addr, %admin_addr, %node_id, "data plane listening");

    let paging_key = match &args.paging_key_file {
        Some(path) => {
            let key = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            anyhow::ensure!(key.len() >= 32, "the paging key in {} must be at least 32 bytes", path.display());
            key
        }
        None => {
            warn!("no --paging-key-file: page links are signed with a random key and only work on this replica");
            let mut key = vec![0u8; 32];
            rand::rng().fill(key.as_mut_slice());
            key
        }
    };
    let upstreams = UpstreamClient::new(metrics.clone());
    // Opened (and recovered) before the first request; the shippers start with what earlier runs left unshipped.
    let auditor = audit::Auditor::start(audit_settings(&args, &node_id)?, &metrics, upstreams.clone())
        .context("opening the audit spool")?;
    let proxy = Arc::new(Proxy {
        state: state.clone(),
        upstreams,
        authn: Authenticator::with_metrics(metrics.cache("jwks"), metrics.cache("verified_token")),
        pages: PageSigner::new(&paging_key),
        public: PublicConfig {
            tls: fhir_tls.is_some(),
            ..PublicConfig::new(args.public_base_url.as_deref(), &args.trusted_proxies)?
        },
        capabilities: moka::future::Cache::builder().max_capacity(64).time_to_live(Duration::from_secs(60)).build(),
        metrics: metrics.clone(),
        body_budget: fhirgw_dataplane::body_budget::BodyBudget::with_gauge(
            args.body_budget_bytes,
            metrics.body_reserved(),
            fhirgw_dataplane::body_budget::BodyTiming {
                idle: Duration::from_secs(args.body_idle_timeout_secs.max(1)),
                total: Duration::from_secs(args.body_read_timeout_secs.max(1)),
            },
        ),
        audit: auditor.clone(),
    });
    let nofile = limits::raise_nofile_limit();
    let max_connections = match args.max_connections {
        0 => limits::default_max_connections(nofile),
        n => n,
    };
    info!(nofile, max_connections, "connection limits");
    let (first_request_timeout, idle_timeout) = (
        Duration::from_secs(args.first_request_timeout_secs.max(1)),
        Duration::from_secs(args.idle_timeout_secs.max(1)),
    );
    let lifecycle = Lifecycle::new();
    let drain = Duration::from_secs(args.drain_secs);
    // The admin port outlives the FHIR drain: liveness probes and scrapes keep answering until the end.
    let admin_lifecycle = Lifecycle::new();
    let fhir_server = server::serve(
        fhir,
        move |req, peer| Box::pin(proxy.clone().handle(req, peer)),
        server::Limits { max_connections, first_request_timeout, idle_timeout, drain },
        lifecycle.subscribe(),
        metrics.listener("fhir"),
        "fhir",
        fhir_tls,
    );
    let admin_ctx = Arc::new(admin_http::Admin {
        state: state.clone(),
        metrics: metrics.clone(),
        lifecycle: lifecycle.clone(),
        ready_with_stale_grants: args.ready_with_stale_grants,
    });
    let admin_server = server::serve(
        admin,
        move |req, _peer| Box::pin(admin_http::handle(admin_ctx.clone(), req)),
        server::Limits {
            max_connections: limits::ADMIN_MAX_CONNECTIONS,
            first_request_timeout,
            idle_timeout,
            drain: Duration::from_secs(2),
        },
        admin_lifecycle.subscribe(),
        metrics.listener("admin"),
        "admin",
        None,
    );
    let delay = Duration::from_secs(args.shutdown_delay_secs);
    // When the FHIR listener closes: the drain window the audit trail shares with the requests still in flight.
    let (drain_deadline_tx, drain_deadline) = tokio::sync::oneshot::channel::<std::time::Instant>();
    tokio::spawn({
        let lifecycle = lifecycle.clone();
        async move {
            fhirgw_telemetry::shutdown_signal().await;
            lifecycle.advance(Phase::Draining);
            info!(
                delay_secs = delay.as_secs(),
                "shutdown requested: not ready; serving on while load balancers stop sending"
            );
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = fhirgw_telemetry::shutdown_signal() => info!("second shutdown signal: skipping the rest of the delay"),
            }
            info!("closing the FHIR listener; answering what has arrived");
            let _ = drain_deadline_tx.send(std::time::Instant::now() + drain);
            lifecycle.advance(Phase::Stopping);
        }
    });
    let fhir_then_admin = async {
        fhir_server.await;
        // No request is in flight any more: the audit spool gets the rest of the drain window to reach the sinks.
        let deadline = drain_deadline.await.unwrap_or_else(|_| std::time::Instant::now());
        auditor.drain(deadline).await;
        admin_lifecycle.advance(Phase::Stopping);
    };
    tokio::join!(fhir_then_admin, admin_server);
    info!("data plane stopped");
    Ok(())
}
