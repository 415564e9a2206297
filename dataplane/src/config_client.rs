//! The config client: follows the control plane's push stream and keeps [`ConfigState`] current.
//!
//! Each response is validated off the hot path with the shared model code plus this data plane's own environment
//! checks (credential files it must read), then applied whole with one atomic swap, written to disk, and ACKed. A
//! response that fails is NACKed naming the rejected resources, and the last good snapshot stays. A response from
//! another store or an older revision than the one held is refused whole (see `config_guard`).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fhirgw_config::resource::from_wire;
use fhirgw_config::{Kind, Rejection, Snapshot};
use fhirgw_proto::push::v1 as push;
use fhirgw_proto::push::v1::config_discovery_client::ConfigDiscoveryClient;
use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::Endpoint;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::config_guard;
use crate::cp_tls::ControlPlaneTls;
use crate::metrics::Metrics;
use crate::persist::SnapshotDir;
use crate::state::{ConfigState, Refusing, Source};
use crate::upstream::environment_rejections;

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct ConfigClient {
    /// One control-plane URL, or several separated by commas (see `run`).
    pub endpoint: String,
    /// The shared data-plane token, when the control plane asks for one.
    pub token: Option<String>,
    /// TLS (and the client certificate) for `https://` control planes.
    pub tls: Option<ControlPlaneTls>,
    pub node: push::Node,
    pub state: Arc<ConfigState>,
    pub persist: Option<SnapshotDir>,
    pub metrics: Arc<Metrics>,
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("stream: {0}")]
    Stream(#[from] tonic::Status),
    #[error("bad endpoint or token: {0}")]
    Setup(String),
    #[error("stream closed")]
    Closed,
    #[error("reopening the stream to take the control plane's whole configuration")]
    Reconnect,
}

/// Full jitter over an exponentially growing ceiling.
fn backoff(attempt: u32) -> Duration {
    let ceiling = MIN_BACKOFF.saturating_mul(1u32 << attempt.min(10)).min(MAX_BACKOFF);
    ceiling.mul_f64(rand::rng().random_range(0.5..=1.0))
}

impl ConfigClient {
    /// Runs until the process ends: connect, follow, reconnect with jittered exponential backoff. With several
    /// control planes (`endpoint` is a comma-separated list, and a name resolving to several addresses counts as
    /// each), every new session goes to the next one, starting from a random one: a stream that drops (a replica
    /// dying or shutting down, or the stream's lifetime ending) moves the data plane to another replica.
    pub async fn run(self) {
        let mut attempt = 0u32;
        let mut next = rand::rng().random_range(0..64usize);
        loop {
            let targets = control_planes(&self.endpoint).await;
            let target = &targets[next % targets.len()];
            next = next.wrapping_add(1);
            // Context for the log lines only: a session lasts until the stream ends (~30 min), so as an exported
            // span it would show up that late, each attempt its own trace. Every apply is a trace of its own.
            let span =
                info_span!(target: fhirgw_telemetry::LOG_ONLY, "config_session", control_plane = %target.url, attempt);
            let mut got_response = false;
            let result = self.session(target, &mut got_response).instrument(span).await;
            if got_response {
                attempt = 0;
            }
            let delay = backoff(attempt);
            attempt = attempt.saturating_add(1);
            match result {
                Err(SessionError::Stream(status)) if status.code() == tonic::Code::Unavailable && got_response => {
                    info!(control_plane = %target.url, reason = %status.message(), "config stream ended; reconnecting");
                }
                Err(e @ SessionError::Reconnect) => info!(reason = %e, "config stream closed; reconnecting"),
                Err(e) => {
                    let error = fhirgw_tls::explain::chain(&e);
                    match fhirgw_tls::explain::explain(&e, "the control plane") {
                        Some(tls) => {
                            warn!(control_plane = %target.url, %tls, %error, retry_in_ms = delay.as_millis() as u64, "config stream failed: TLS refused")
                        }
                        None => {
                            warn!(control_plane = %target.url, %error, retry_in_ms = delay.as_millis() as u64, "config stream failed")
                        }
                    }
                }
                Ok(()) => {}
            }
            tokio::time::sleep(delay).await;
        }
    }

    fn first_request(&self) -> push::ConfigRequest {
        let current = self.state.load();
        let initial_versions = current
            .as_ref()
            .map(|s| {
                s.resources
                    .iter()
                    .map(|((kind, name), raw)| push::ResourceVersion {
                        kind: kind.to_proto() as i32,
                        name: name.clone(),
                        version: raw.version.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let held = self.state.held();
        push::ConfigRequest {
            node: Some(self.node.clone()),
            subscribe: Kind::ALL.iter().map(|k| k.to_proto() as i32).collect(),
            initial_versions,
            applied_version: current.map(|s| s.digest.clone()).unwrap_or_default(),
            store_id: held.as_ref().map(|h| h.store_id.clone()).unwrap_or_default(),
            held_system_version: held.map_or(0, |h| h.system_version),
            ..Default::default()
        }
    }

    async fn session(&self, target: &Target, got_response: &mut bool) -> Result<(), SessionError> {
        let mut endpoint = Endpoint::from_shared(target.url.clone()).map_err(|e| SessionError::Setup(e.to_string()))?;
        if let Some(origin) = &target.origin {
            endpoint = endpoint.origin(origin.clone());
        }
        let endpoint = endpoint
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        let channel = match &self.tls {
            Some(tls) => {
                // The certificate names the configured host, also when it was resolved to one replica's address.
                let configured = target.origin.as_ref().and_then(|o| o.host()).map(str::to_owned);
                let host = configured.or_else(|| endpoint.uri().host().map(str::to_owned)).unwrap_or_default();
                endpoint.connect_with_connector(tls.connector(&host).map_err(SessionError::Setup)?).await?
            }
            None => endpoint.connect().await?,
        };
        let auth: Option<MetadataValue<_>> = match &self.token {
            Some(token) => Some(
                format!("Bearer {token}")
                    .parse()
                    .map_err(|_| SessionError::Setup("token is not a valid header".into()))?,
            ),
            None => None,
        };
        let mut client = ConfigDiscoveryClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
            if let Some(auth) = &auth {
                req.metadata_mut().insert("authorization", auth.clone());
            }
            Ok(req)
        });
        let (tx, rx) = mpsc::channel(4);
        tx.send(self.first_request()).await.map_err(|_| SessionError::Closed)?;
        let mut inbound = client.stream_config(ReceiverStream::new(rx)).await?.into_inner();
        info!("config stream open");
        loop {
            let response = tokio::select! {
                message = inbound.message() => match message? {
                    Some(response) => response,
                    None => break,
                },
                () = self.state.reconnect_requested() => return Err(SessionError::Reconnect),
            };
            *got_response = true;
            let reply = self.apply(response).await;
            self.metrics.config_replied(reply.nack.is_none());
            tx.send(reply).await.map_err(|_| SessionError::Closed)?;
        }
        Err(SessionError::Closed)
    }

    /// Validates and applies one response; returns the ACK or NACK to send.
    pub async fn apply(&self, response: push::ConfigResponse) -> push::ConfigRequest {
        let nonce = response.nonce.clone();
        // A trace root (its session is never exported), linked to the admin call that caused the change, so one
        // trace shows a change reaching the fleet.
        let span = info_span!("config_apply", %nonce, revision = response.system_version);
        fhirgw_telemetry::link_from_map(&span, &response.trace_context);
        async {
            self.state.count_received(response.resources.len());
            let current = self.state.load();
            let held = self.state.held();
            let mut overridden = false;
            if let Err(refusal) = config_guard::check(held.as_ref(), &response.store_id, response.system_version) {
                if self.state.allow_rollback() || self.state.take_accept_next() {
                    warn!(%refusal, "accepting the control plane's configuration anyway: an operator allowed it");
                    overridden = true;
                } else {
                    return self.refuse(nonce, refusal, &response, current.as_deref());
                }
            }
            let store_id = config_guard::next_store_id(held.as_ref(), &response.store_id, overridden);
            let mut candidate = current.as_ref().map(|s| s.resources.clone()).unwrap_or_default();
            let mut rejected: Vec<Rejection> = Vec::new();
            for removed in &response.removed {
                if let Some(kind) = Kind::from_proto(removed.kind) {
                    candidate.remove(&(kind, removed.name.clone()));
                }
            }
            for resource in response.resources {
                match from_wire(resource) {
                    Ok((key, raw)) => {
                        candidate.insert(key, raw);
                    }
                    Err(rejection) => rejected.push(rejection),
                }
            }
            let outcome = if rejected.is_empty() {
                match Snapshot::build(candidate, response.system_version) {
                    Ok(snapshot) => {
                        let env = environment_rejections(&snapshot);
                        if env.is_empty() { Ok(snapshot) } else { Err(env) }
                    }
                    Err(rejections) => Err(rejections),
                }
            } else {
                Err(rejected)
            };
            let now = SystemTime::now();
            match outcome {
                Ok(snapshot) => {
                    let snapshot = Arc::new(snapshot);
                    let changed = current.as_ref().is_none_or(|c| c.digest != snapshot.digest);
                    self.state.install(snapshot.clone(), Source::ControlPlane, &store_id);
                    self.state.confirm(now);
                    self.state.take_accept_next();
                    if self.state.set_refusing(None) {
                        info!(
                            revision = snapshot.system_version,
                            "the control plane's configuration is accepted again"
                        );
                    }
                    if changed {
                        info!(version = %snapshot.digest, resources = snapshot.resources.len(), "config applied");
                    } else {
                        debug!(version = %snapshot.digest, "config confirmed unchanged");
                    }
                    if let Some(persist) = self.persist.clone() {
                        let to_save = snapshot.clone();
                        match tokio::task::spawn_blocking(move || persist.save(&to_save, now, &store_id)).await {
                            Ok(Ok(true)) => {}
                            Ok(Ok(false)) => {
                                info!("not saving an empty configuration (no route table) as the last good one")
                            }
                            Ok(Err(e)) => warn!(error = %e, "could not write the snapshot to disk"),
                            Err(e) => warn!(error = %e, "snapshot writer failed"),
                        }
                    }
                    push::ConfigRequest {
                        response_nonce: nonce,
                        applied_version: snapshot.digest.clone(),
                        ..Default::default()
                    }
                }
                Err(rejections) => {
                    let summary = rejections.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
                    warn!(%summary, "config rejected; keeping the last good snapshot");
                    self.state.reject(summary.clone());
                    push::ConfigRequest {
                        response_nonce: nonce,
                        applied_version: current.map(|s| s.digest.clone()).unwrap_or_default(),
                        nack: Some(push::Nack { rejected: rejections.iter().map(Into::into).collect(), summary }),
                        ..Default::default()
                    }
                }
            }
        }
        .instrument(span)
        .await
    }

    /// The NACK for a response the rollback guard refused. The last good snapshot stays and is not confirmed: a
    /// control plane on another store cannot vouch for the grants held.
    fn refuse(
        &self,
        nonce: String,
        refusal: config_guard::Refusal,
        response: &push::ConfigResponse,
        current: Option<&fhirgw_config::Snapshot>,
    ) -> push::ConfigRequest {
        let summary = format!("refused: {refusal}");
        let refusing = Refusing {
            since: SystemTime::now(),
            reason: refusal.to_string(),
            offered_store_id: response.store_id.clone(),
            offered_revision: response.system_version,
        };
        if self.state.set_refusing(Some(refusing)) {
            error!(%refusal, "refusing the control plane's configuration and serving the last good snapshot; to accept it, POST /config/accept-next on the admin port (or start with --allow-config-rollback)");
        } else {
            debug!(%refusal, "still refusing the control plane's configuration");
        }
        self.metrics.config_refused();
        push::ConfigRequest {
            response_nonce: nonce,
            applied_version: current.map(|s| s.digest.clone()).unwrap_or_default(),
            // Names no resource: the whole response is refused, not any one resource in it.
            nack: Some(push::Nack { rejected: Vec::new(), summary }),
            ..Default::default()
        }
    }
}

/// One control-plane address to connect to; `origin` keeps the configured name when `url` is one of its addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    url: String,
    origin: Option<http::Uri>,
}

/// The control planes named by `endpoints` (comma separated), each DNS name expanded to every address it resolves
/// to now (re-resolved for each session, so a scaled or replaced replica set is followed). Never empty.
async fn control_planes(endpoints: &str) -> Vec<Target> {
    let mut targets = Vec::new();
    for url in endpoints.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        targets.extend(expand(url).await);
    }
    if targets.is_empty() {
        targets.push(Target { url: endpoints.to_owned(), origin: None });
    }
    targets
}

async fn expand(url: &str) -> Vec<Target> {
    let single = vec![Target { url: url.to_owned(), origin: None }];
    let Ok(uri) = url.parse::<http::Uri>() else { return single };
    let (Some(host), Some(scheme)) = (uri.host(), uri.scheme_str()) else { return single };
    if host.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>().is_ok() {
        return single;
    }
    let port = uri.port_u16().unwrap_or(if scheme == "https" { 443 } else { 80 });
    let Ok(addrs) = tokio::net::lookup_host((host, port)).await else { return single };
    let mut addrs: Vec<std::net::SocketAddr> = addrs.collect();
    addrs.sort();
    addrs.dedup();
    if addrs.len() <= 1 {
        return single;
    }
    let path = uri.path_and_query().map_or("", |p| p.as_str()).trim_end_matches('/');
    addrs
        .into_iter()
        .map(|addr| Target { url: format!("{scheme}://{addr}{path}"), origin: Some(uri.clone()) })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn several_control_planes() {
        let urls = |t: Vec<Target>| t.into_iter().map(|t| (t.url, t.origin.is_some())).collect::<Vec<_>>();
        assert_eq!(
            urls(control_planes("http://127.0.0.1:1, http://[::1]:2,,http://10.0.0.3:3").await),
            vec![
                ("http://127.0.0.1:1".into(), false),
                ("http://[::1]:2".into(), false),
                ("http://10.0.0.3:3".into(), false)
            ]
        );
        assert_eq!(urls(control_planes("").await), vec![(String::new(), false)]);
        // localhost resolves to 127.0.0.1 and usually ::1: each address is a target named after the configured URL.
        let local = control_planes("http://localhost:50051").await;
        assert!(!local.is_empty());
        if local.len() > 1 {
            assert!(
                local.iter().all(|t| t.origin.as_ref().is_some_and(|o| o.host() == Some("localhost"))),
                "{local:?}"
            );
            assert!(local.iter().any(|t| t.url == "http://127.0.0.1:50051"), "{local:?}");
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempt in 0..40 {
            let d = backoff(attempt);
            assert!(d >= MIN_BACKOFF / 2 && d <= MAX_BACKOFF, "{attempt}: {d:?}");
        }
        assert!(backoff(0) <= MIN_BACKOFF);
        assert!(backoff(20) >= MAX_BACKOFF / 2);
    }
}
