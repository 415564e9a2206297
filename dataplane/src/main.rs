//! `fhirgw-dataplane`: the FHIR port, the admin port, and the config client that follows the control plane.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use fhirgw_dataplane::authn::Authenticator;
use fhirgw_dataplane::config_client::ConfigClient;
use fhirgw_dataplane::metrics::Metrics;
use fhirgw_dataplane::persist::SnapshotDir;
use fhirgw_dataplane::policy::paging::PageSigner;
use fhirgw_dataplane::proxy::{Proxy, PublicConfig};
use fhirgw_dataplane::state::{ConfigState, Source};
use fhirgw_dataplane::upstream::{UpstreamClient, environment_rejections};
use fhirgw_dataplane::{admin_http, server};
use fhirgw_proto::push::v1 as push;
use rand::Rng;
use tokio::sync::watch;
use tracing::{info, warn};

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
    /// File holding the data plane token for the control plane. Else FHIRGW_DATAPLANE_TOKEN.
    #[arg(long, env = "FHIRGW_DATAPLANE_TOKEN_FILE")]
    token_file: Option<PathBuf>,
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
    /// Public base URL clients use (e.g. https://fhir.example.org); overrides forwarding headers. Route tables' base
    /// paths are appended to it.
    #[arg(long, env = "FHIRGW_PUBLIC_BASE_URL")]
    public_base_url: Option<String>,
    /// Proxies whose X-Forwarded-* / Forwarded headers are honoured, as CIDRs or addresses, comma separated. Default:
    /// none, so forwarding headers from clients are ignored.
    #[arg(long, env = "FHIRGW_TRUSTED_PROXIES", value_delimiter = ',')]
    trusted_proxies: Vec<String>,
    /// Seconds in-flight requests get to finish after SIGTERM.
    #[arg(long, env = "FHIRGW_DP_DRAIN_SECS", default_value_t = 25)]
    drain_secs: u64,
    /// Log format: text or json.
    #[arg(long, env = "FHIRGW_LOG_FORMAT", default_value = "text")]
    log_format: String,
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "dataplane".to_owned())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _telemetry =
        fhirgw_telemetry::init("fhirgw-dataplane", args.log_format == "json", "info,h2=warn,tower=warn,hyper=warn")
            .map_err(|e| anyhow::anyhow!("telemetry: {e}"))?;
    let token = match &args.token_file {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        None => std::env::var("FHIRGW_DATAPLANE_TOKEN")
            .context("no data plane token: set FHIRGW_DATAPLANE_TOKEN or --token-file")?,
    };
    let host = hostname();
    let node_id =
        args.node_id.clone().unwrap_or_else(|| format!("{host}-{:06x}", rand::rng().random::<u32>() & 0xff_ffff));

    let state = ConfigState::new();
    let persist = (!args.state_dir.as_os_str().is_empty()).then(|| SnapshotDir::new(&args.state_dir));
    if let Some(dir) = &persist {
        match dir.load() {
            Ok(Some(loaded)) => {
                let env = environment_rejections(&loaded.snapshot);
                if env.is_empty() {
                    info!(version = %loaded.snapshot.digest, path = %dir.path().display(), "serving the last good snapshot from disk until the control plane answers");
                    state.install(Arc::new(loaded.snapshot), Source::Disk);
                    if let Some(at) = loaded.confirmed_at {
                        state.confirm(at);
                    }
                } else {
                    warn!(problems = ?env, "the snapshot on disk cannot be served here; waiting for the control plane");
                }
            }
            Ok(None) => info!("no snapshot on disk; not ready until the control plane answers"),
            Err(e) => warn!(error = %e, "ignoring an unreadable snapshot on disk"),
        }
    }

    let metrics = Metrics::new(state.clone());
    let client = ConfigClient {
        endpoint: args.control_plane.clone(),
        token: token.trim().to_owned(),
        node: push::Node { id: node_id.clone(), build_version: env!("CARGO_PKG_VERSION").to_owned(), hostname: host },
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

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
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
    let proxy = Arc::new(Proxy {
        state: state.clone(),
        upstreams: UpstreamClient::new(metrics.clone()),
        authn: Authenticator::with_metrics(metrics.cache("jwks"), metrics.cache("verified_token")),
        pages: PageSigner::new(&paging_key),
        grant_ttl: Duration::from_secs(args.grant_ttl_secs.max(1)),
        public: PublicConfig::new(args.public_base_url.as_deref(), &args.trusted_proxies)?,
        capabilities: moka::future::Cache::builder().max_capacity(64).time_to_live(Duration::from_secs(60)).build(),
        metrics: metrics.clone(),
    });
    let grace = Duration::from_secs(args.drain_secs);
    let fhir_server = server::serve(
        fhir,
        move |req, peer| Box::pin(proxy.clone().handle(req, peer)),
        stopped(stop_rx.clone()),
        grace,
        "fhir",
    );
    let admin_state = state.clone();
    let admin_server = server::serve(
        admin,
        move |req, _peer| admin_http::handle(admin_state.clone(), metrics.clone(), req),
        stopped(stop_rx),
        grace,
        "admin",
    );
    tokio::spawn(async move {
        fhirgw_telemetry::shutdown_signal().await;
        info!("shutdown requested");
        let _ = stop_tx.send(true);
    });
    tokio::join!(fhir_server, admin_server);
    info!("data plane stopped");
    Ok(())
}
