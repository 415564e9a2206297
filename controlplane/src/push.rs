//! The config push stream: one session per data plane.
//!
//! Per stream: the first response is sent at once, even empty; afterwards a response goes out whenever what the
//! data plane holds differs from the store, one response in flight at a time. A NACKed version is remembered and
//! never sent to that stream again, so a bad resource cannot cause a resend loop; the rest of the configuration
//! still flows.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fhirgw_config::{Kind, Rejection, ResourceKey};
use fhirgw_proto::push::v1 as push;
use fhirgw_proto::push::v1::config_discovery_server::ConfigDiscovery;
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::metrics::Metrics;
use crate::peer_auth::DataPlaneIdentity;
use crate::status::{DataPlane, LastResponse, Registry};
use crate::store::{State, Store};
use crate::transport::PeerInfo;

pub struct PushService {
    store: Arc<Store>,
    registry: Arc<Registry>,
    max_lifetime: Duration,
    heartbeat: Duration,
    metrics: Arc<Metrics>,
    /// Turns true on SIGTERM: every stream ends at once with UNAVAILABLE, so data planes move to another replica.
    shutdown: watch::Receiver<bool>,
}

impl PushService {
    /// `heartbeat`: an idle stream gets an empty response this often, so data planes can tell a live control plane
    /// (and thus current grants) from a silent one.
    pub fn new(
        store: Arc<Store>,
        registry: Arc<Registry>,
        max_lifetime: Duration,
        heartbeat: Duration,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self { store, registry, max_lifetime, heartbeat, metrics, shutdown }
    }
}

struct Pending {
    nonce: String,
    revision: u64,
    sent: Vec<(ResourceKey, String)>,
    removed: Vec<ResourceKey>,
}

struct Session {
    id: u64,
    store: Arc<Store>,
    registry: Arc<Registry>,
    subscribed: BTreeSet<Kind>,
    /// What the data plane holds, per its initial versions and ACKs.
    known: BTreeMap<ResourceKey, String>,
    /// Versions this data plane rejected; never sent to it again.
    nacked: HashMap<ResourceKey, String>,
    pending: Option<Pending>,
    nonce_prefix: String,
    sent_count: u64,
    metrics: Arc<Metrics>,
}

type Outbound = mpsc::Sender<Result<push::ConfigResponse, Status>>;

#[tonic::async_trait]
impl ConfigDiscovery for PushService {
    type StreamConfigStream = ReceiverStream<Result<push::ConfigResponse, Status>>;

    async fn stream_config(
        &self,
        request: Request<Streaming<push::ConfigRequest>>,
    ) -> Result<Response<Self::StreamConfigStream>, Status> {
        if *self.shutdown.borrow() {
            return Err(Status::unavailable("control plane shutting down; connect to another replica"));
        }
        let peer = PeerInfo::of(&request).map(|p| p.remote.to_string()).unwrap_or_default();
        let identity = request.extensions().get::<DataPlaneIdentity>().map(|i| i.0.clone()).unwrap_or_default();
        let mut inbound = request.into_inner();
        let first = match tokio::time::timeout(Duration::from_secs(30), inbound.message()).await {
            Ok(Ok(Some(first))) => first,
            Ok(Ok(None)) => {
                return Err(Status::cancelled("stream closed before its first message"));
            }
            Ok(Err(status)) => return Err(status),
            Err(_) => return Err(Status::deadline_exceeded("no first message within 30s")),
        };
        let node = first.node.clone().unwrap_or_default();
        if node.id.is_empty() || node.id.len() > 256 {
            return Err(Status::invalid_argument("the first message must carry node.id (1-256 bytes)"));
        }
        let mut subscribed: BTreeSet<Kind> = first.subscribe.iter().filter_map(|k| Kind::from_proto(*k)).collect();
        if first.subscribe.is_empty() {
            subscribed = Kind::ALL.into_iter().collect();
        }
        let known: BTreeMap<ResourceKey, String> = first
            .initial_versions
            .iter()
            .filter_map(|v| Kind::from_proto(v.kind).map(|k| ((k, v.name.clone()), v.version.clone())))
            .filter(|((k, _), _)| subscribed.contains(k))
            .collect();
        let id = self.registry.register(DataPlane {
            node_id: node.id.clone(),
            hostname: node.hostname.clone(),
            build_version: node.build_version.clone(),
            peer: peer.clone(),
            connected_at: SystemTime::now(),
            subscribed: subscribed.clone(),
            known: known.clone(),
            applied_version: first.applied_version.clone(),
            acked_revision: 0,
            last_ack: None,
            last_nack: None,
            held_store_id: first.store_id.clone(),
            held_system_version: first.held_system_version,
            identity: identity.clone(),
        });
        let (tx, rx) = mpsc::channel(4);
        let mut session = Session {
            id,
            store: self.store.clone(),
            registry: self.registry.clone(),
            subscribed,
            known,
            nacked: HashMap::new(),
            pending: None,
            nonce_prefix: format!("{:08x}", rand::rng().random::<u32>()),
            sent_count: 0,
            metrics: self.metrics.clone(),
        };
        // Jitter spreads reconnects so data planes rebalance across replicas instead of stampeding.
        let lifetime = self.max_lifetime.mul_f64(rand::rng().random_range(0.8..1.0));
        let span = info_span!("config_stream", node = %node.id, peer = %peer, identity = %identity);
        let heartbeat = self.heartbeat;
        let shutdown = self.shutdown.clone();
        tokio::spawn(
            async move {
                info!(initial = session.known.len(), "data plane connected");
                let reason = session.run(inbound, tx, lifetime, heartbeat, shutdown).await;
                session.registry.remove(session.id, &reason);
                info!(%reason, "data plane disconnected");
            }
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

impl Session {
    async fn run(
        &mut self,
        mut inbound: Streaming<push::ConfigRequest>,
        tx: Outbound,
        lifetime: Duration,
        heartbeat: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) -> String {
        let mut state_rx = self.store.subscribe();
        let deadline = tokio::time::sleep(lifetime);
        tokio::pin!(deadline);
        let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first response is always sent, even when empty: the data plane's readiness waits for it.
        let state = state_rx.borrow_and_update().clone();
        if let Err(reason) = self.send(&tx, &state, true).await {
            return reason;
        }
        loop {
            tokio::select! {
                () = async { let _ = shutdown.wait_for(|stop| *stop).await; } => {
                    // Ended, not abandoned: the data plane reconnects (to another replica) at once instead of
                    // waiting for this process's heartbeats to stop.
                    let _ = tx.send(Err(Status::unavailable("control plane shutting down; reconnect"))).await;
                    return "control plane shutting down".into();
                }
                () = &mut deadline => {
                    let _ = tx.send(Err(Status::unavailable("maximum stream lifetime reached; reconnect"))).await;
                    return "maximum stream lifetime reached".into();
                }
                message = inbound.message() => match message {
                    Ok(Some(request)) => self.on_request(request),
                    Ok(None) => return "stream closed by the data plane".into(),
                    Err(status) => return format!("stream error: {status}"),
                },
                changed = state_rx.changed(), if self.pending.is_none() => {
                    if changed.is_err() {
                        return "control plane shutting down".into();
                    }
                }
                _ = beat.tick(), if self.pending.is_none() => {
                    let state = state_rx.borrow_and_update().clone();
                    if let Err(reason) = self.send(&tx, &state, true).await {
                        return reason;
                    }
                }
            }
            if self.pending.is_none() {
                let state = state_rx.borrow_and_update().clone();
                if let Err(reason) = self.send(&tx, &state, false).await {
                    return reason;
                }
            }
        }
    }

    /// Sends what differs between the store and the data plane, if anything does (or always, when `force`).
    async fn send(&mut self, tx: &Outbound, state: &State, force: bool) -> Result<(), String> {
        let mut resources = Vec::new();
        let mut sent = Vec::new();
        let mut held_back = false;
        for ((kind, name), raw) in &state.pushed {
            if !self.subscribed.contains(kind) {
                continue;
            }
            let key = (*kind, name.clone());
            if self.known.get(&key) == Some(&raw.version) {
                continue;
            }
            if self.nacked.get(&key) == Some(&raw.version) {
                held_back = true;
                continue;
            }
            resources.push(push::Resource {
                kind: kind.to_proto() as i32,
                name: name.clone(),
                version: raw.version.clone(),
                body: Some(raw.body.clone()),
            });
            sent.push((key, raw.version.clone()));
        }
        let removed: Vec<ResourceKey> =
            self.known.keys().filter(|key| !state.pushed.contains_key(*key)).cloned().collect();
        if resources.is_empty() && removed.is_empty() && !force {
            if !held_back {
                // Already holds exactly what this revision pushes (say, a change was reverted to what it runs).
                let revision = state.revision;
                self.registry.update(self.id, |dp| dp.acked_revision = dp.acked_revision.max(revision));
            }
            return Ok(());
        }
        self.sent_count += 1;
        let nonce = format!("{}-{}", self.nonce_prefix, self.sent_count);
        debug!(%nonce, revision = state.revision, resources = resources.len(), removed = removed.len(), "sending config");
        let response = push::ConfigResponse {
            nonce: nonce.clone(),
            system_version: state.revision,
            resources,
            removed: removed
                .iter()
                .map(|(kind, name)| push::ResourceRef { kind: kind.to_proto() as i32, name: name.clone() })
                .collect(),
            trace_context: state.trace_context.clone(),
            store_id: self.store.store_id().to_owned(),
        };
        self.pending = Some(Pending { nonce, revision: state.revision, sent, removed });
        tx.send(Ok(response)).await.map_err(|_| "data plane went away".to_owned())?;
        self.metrics.pushed();
        Ok(())
    }

    fn on_request(&mut self, request: push::ConfigRequest) {
        let Some(pending) = self.pending.take_if(|p| p.nonce == request.response_nonce) else {
            // Stale or unknown nonce: an answer to a response we no longer wait for.
            debug!(nonce = %request.response_nonce, "ignoring a stale acknowledgement");
            return;
        };
        let now = SystemTime::now();
        self.metrics.replied(request.nack.is_none());
        match request.nack {
            None => {
                for (key, version) in pending.sent {
                    self.known.insert(key, version);
                }
                for key in pending.removed {
                    self.known.remove(&key);
                }
                let known = self.known.clone();
                let store_id = self.store.store_id().to_owned();
                self.registry.update(self.id, |dp| {
                    // It accepted this store's configuration: that is what it holds now.
                    dp.held_store_id = store_id;
                    dp.held_system_version = pending.revision;
                    dp.known = known;
                    dp.applied_version = request.applied_version;
                    dp.acked_revision = pending.revision;
                    dp.last_ack = Some(LastResponse {
                        nonce: pending.nonce,
                        revision: pending.revision,
                        at: now,
                        rejected: Vec::new(),
                        summary: String::new(),
                    });
                });
            }
            Some(nack) => {
                let mut rejected: Vec<Rejection> = Vec::new();
                for r in &nack.rejected {
                    let Some(kind) = Kind::from_proto(r.kind) else {
                        continue;
                    };
                    let key = (kind, r.name.clone());
                    let version = pending
                        .sent
                        .iter()
                        .find(|(k, _)| *k == key)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_else(|| r.version.clone());
                    self.nacked.insert(key, version.clone());
                    rejected.push(Rejection { kind, name: r.name.clone(), version, reason: r.reason.clone() });
                }
                if rejected.is_empty() {
                    // A NACK that names nothing: hold back everything it carried rather than loop.
                    for (key, version) in &pending.sent {
                        self.nacked.insert(key.clone(), version.clone());
                    }
                }
                warn!(nonce = %pending.nonce, revision = pending.revision, summary = %nack.summary, rejected = rejected.len(), "data plane rejected a push");
                self.registry.update(self.id, |dp| {
                    dp.applied_version = request.applied_version;
                    dp.last_nack = Some(LastResponse {
                        nonce: pending.nonce,
                        revision: pending.revision,
                        at: now,
                        rejected,
                        summary: nack.summary,
                    });
                });
            }
        }
    }
}
