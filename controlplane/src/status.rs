//! Connected data planes, as `GetStatus` reports them. Each replica knows its own streams; it publishes them to the
//! store (`publish`) so that `GetStatus` on any replica lists the data planes of all of them, and those that left
//! recently (`departed`).

mod departed;

pub use departed::{DEPARTED_FOR, DEPARTED_MAX};

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use fhirgw_config::resource::digest;
use fhirgw_config::tenant::system_to_timestamp;
use fhirgw_config::{Kind, Rejection, ResourceKey};
use fhirgw_proto::admin::v1 as admin;
use prost::Message;
use tokio::sync::{Notify, watch};
use tracing::{debug, warn};

use crate::store::{DataPlaneRow, State, Store, now_millis};

#[derive(Debug, Clone)]
pub struct LastResponse {
    pub nonce: String,
    pub revision: u64,
    pub at: SystemTime,
    pub rejected: Vec<Rejection>,
    pub summary: String,
}

#[derive(Debug, Clone)]
pub struct DataPlane {
    pub node_id: String,
    pub hostname: String,
    pub build_version: String,
    pub peer: String,
    pub connected_at: SystemTime,
    pub subscribed: BTreeSet<Kind>,
    /// What the data plane holds (as far as its ACKs tell).
    pub known: BTreeMap<ResourceKey, String>,
    pub applied_version: String,
    pub acked_revision: u64,
    pub last_ack: Option<LastResponse>,
    pub last_nack: Option<LastResponse>,
    /// From the first message: the store identity and revision of what it held when it connected.
    pub held_store_id: String,
    pub held_system_version: u64,
    /// From its client certificate (mutual TLS); empty with the shared token.
    pub identity: String,
}

fn wanted_digest(state: &State, subscribed: impl Fn(Kind) -> bool) -> String {
    digest(
        state
            .pushed
            .iter()
            .filter(|((kind, _), _)| subscribed(*kind))
            .map(|((k, n), raw)| (*k, n.as_str(), raw.version.as_str())),
    )
}

impl DataPlane {
    fn known_digest(&self) -> String {
        digest(self.known.iter().map(|((k, n), v)| (*k, n.as_str(), v.as_str())))
    }

    /// Whether it holds exactly what `state` pushes for the kinds it subscribed to.
    fn in_sync(&self, state: &State) -> bool {
        wanted_digest(state, |k| self.subscribed.contains(&k)) == self.known_digest()
    }
}

/// Why a data plane will not (or may not) follow this store: see `DataPlaneStatus.store_warnings`.
pub fn store_warnings(dp: &admin::DataPlaneStatus, store_id: &str, revision: u64) -> Vec<String> {
    let mut out = Vec::new();
    if !dp.held_store_id.is_empty() && dp.held_store_id != store_id {
        out.push(format!(
            "holds the configuration of store {} (this store is {store_id}): it refuses this store's",
            dp.held_store_id
        ));
    } else if dp.held_system_version > revision {
        out.push(format!(
            "holds revision {} of this store, newer than the store's revision {revision}: the store went back in time",
            dp.held_system_version
        ));
    }
    let last_reply_is_nack = match (&dp.last_nack, &dp.last_ack) {
        (Some(nack), Some(ack)) => {
            nack.at.as_ref().map(|t| (t.seconds, t.nanos)) >= ack.at.as_ref().map(|t| (t.seconds, t.nanos))
        }
        (Some(_), None) => true,
        _ => false,
    };
    if let Some(nack) = dp.last_nack.as_ref().filter(|_| last_reply_is_nack) {
        // A data plane refusing a whole response (another store, an older revision) names no resource and says why
        // in the summary, naming the store identity or the revision.
        let summary = nack.summary.to_ascii_lowercase();
        if nack.rejected.is_empty()
            && (summary.contains(store_id) || summary.contains("store") || summary.contains("revision"))
        {
            out.push(format!("its last reply was a NACK refusing this store: {}", nack.summary));
        }
    }
    out
}

/// The fleet in three numbers, for metrics (per-data-plane series would be unbounded).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub connected: usize,
    pub out_of_sync: usize,
    /// Revisions between the store and the furthest-behind data plane that is out of sync (0 when all are in sync).
    pub max_lag_revisions: u64,
}

/// This replica's config streams.
pub struct Registry {
    replica: String,
    /// How often the publisher heartbeats this replica's rows.
    interval: Duration,
    next_id: AtomicU64,
    streams: DashMap<u64, DataPlane>,
    /// Signalled on every change, so the publisher tells the other replicas promptly.
    changed: Notify,
    /// Streams that closed here recently.
    departed: departed::List,
}

/// What `GetStatus` lists: the data planes connected to any replica, and those that left recently.
#[derive(Debug, Default)]
pub struct Fleet {
    pub connected: Vec<admin::DataPlaneStatus>,
    pub departed: Vec<admin::DisconnectedDataPlane>,
}

impl Registry {
    pub fn new(replica: &str, interval: Duration) -> Self {
        Registry {
            replica: replica.to_owned(),
            interval,
            next_id: AtomicU64::new(0),
            streams: DashMap::new(),
            changed: Notify::new(),
            departed: departed::List::default(),
        }
    }

    pub fn register(&self, dp: DataPlane) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.streams.insert(id, dp);
        self.changed.notify_one();
        id
    }

    pub fn update(&self, id: u64, f: impl FnOnce(&mut DataPlane)) {
        if let Some(mut entry) = self.streams.get_mut(&id) {
            f(&mut entry);
        }
        self.changed.notify_one();
    }

    /// The stream `id` closed, for `reason`: listed among the departed from now on.
    pub fn remove(&self, id: u64, reason: &str) {
        if let Some((stream, dp)) = self.streams.remove(&id) {
            let at = SystemTime::now();
            self.departed.push(departed::Departed { stream, dp, at, reason: reason.to_owned() });
        }
        self.changed.notify_one();
    }

    /// Rows heartbeated longer ago than this are a replica that died without withdrawing them.
    pub fn stale_after(&self) -> Duration {
        (self.interval * 3).max(Duration::from_secs(3))
    }

    pub fn len(&self) -> usize {
        self.streams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    pub fn summary(&self, state: &State) -> Summary {
        let mut summary = Summary { connected: self.streams.len(), ..Summary::default() };
        for entry in &self.streams {
            let dp = entry.value();
            if !dp.in_sync(state) {
                summary.out_of_sync += 1;
                let lag = state.revision.saturating_sub(dp.acked_revision).max(1);
                summary.max_lag_revisions = summary.max_lag_revisions.max(lag);
            }
        }
        summary
    }

    fn status_of(
        &self,
        dp: &DataPlane,
        state: &State,
        store_id: &str,
        changed_since: &impl Fn(u64) -> Option<SystemTime>,
    ) -> admin::DataPlaneStatus {
        let in_sync = dp.in_sync(state);
        let mut status = admin::DataPlaneStatus {
            node_id: dp.node_id.clone(),
            hostname: dp.hostname.clone(),
            build_version: dp.build_version.clone(),
            peer_address: dp.peer.clone(),
            connected_at: Some(system_to_timestamp(dp.connected_at)),
            applied_version: dp.applied_version.clone(),
            acked_revision: dp.acked_revision,
            in_sync,
            sync_state: sync_state(in_sync) as i32,
            lag_seconds: lag(in_sync, dp.acked_revision, dp.connected_at, changed_since),
            last_ack: dp.last_ack.as_ref().map(to_proto),
            last_nack: dp.last_nack.as_ref().map(to_proto),
            replica: self.replica.clone(),
            held_store_id: dp.held_store_id.clone(),
            held_system_version: dp.held_system_version,
            store_warnings: Vec::new(),
            identity: dp.identity.clone(),
        };
        status.store_warnings = store_warnings(&status, store_id, state.revision);
        status
    }

    /// Status of every data plane connected to this replica against the current state. `changed_since(rev)` gives
    /// when the first revision after `rev` was written, the start of a lagging data plane's lag.
    pub fn report(
        &self,
        state: &State,
        store_id: &str,
        changed_since: impl Fn(u64) -> Option<SystemTime>,
    ) -> Vec<admin::DataPlaneStatus> {
        let mut out: Vec<admin::DataPlaneStatus> =
            self.streams.iter().map(|e| self.status_of(e.value(), state, store_id, &changed_since)).collect();
        out.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        out
    }

    /// This replica's streams as rows for the store.
    pub fn rows(
        &self,
        state: &State,
        store_id: &str,
        changed_since: impl Fn(u64) -> Option<SystemTime>,
    ) -> Vec<DataPlaneRow> {
        let now = now_millis();
        let row = |stream: String, dp: &DataPlane, status: Vec<u8>, heartbeat_at: i64| DataPlaneRow {
            replica: self.replica.clone(),
            stream,
            node_id: dp.node_id.clone(),
            known_digest: dp.known_digest(),
            subscribed: dp.subscribed.iter().map(|k| (k.to_proto() as i32).to_string()).collect::<Vec<_>>().join(","),
            status,
            heartbeat_at,
        };
        let connected = self.streams.iter().map(|e| {
            let status = self.status_of(e.value(), state, store_id, &changed_since).encode_to_vec();
            row(e.key().to_string(), e.value(), status, now)
        });
        // Departed rows keep the moment they left as their heartbeat (see `departed`).
        let departed = self.departed.current(SystemTime::now()).into_iter().map(|d| {
            let status = self.status_of(&d.dp, state, store_id, &changed_since);
            let encoded = departed::entry(status, d.at, d.reason.clone()).encode_to_vec();
            row(format!("{}{}", departed::ROW_PREFIX, d.stream), &d.dp, encoded, departed::millis(d.at))
        });
        connected.chain(departed).collect()
    }

    /// The data planes of this replica and of the others (from their published `rows`, read at `now_ms`), one entry
    /// per node (the most recent connection wins, so a data plane that just moved is not listed twice), each judged
    /// against this replica's state; and those that left within `DEPARTED_FOR` and are not connected now.
    pub fn fleet(
        &self,
        state: &State,
        store_id: &str,
        rows: Vec<DataPlaneRow>,
        now_ms: i64,
        changed_since: impl Fn(u64) -> Option<SystemTime>,
    ) -> Fleet {
        let live_since = now_ms.saturating_sub(i64::try_from(self.stale_after().as_millis()).unwrap_or(i64::MAX));
        let mut by_node: HashMap<String, admin::DataPlaneStatus> = HashMap::new();
        let now = SystemTime::now();
        let mut gone: Vec<admin::DisconnectedDataPlane> = self
            .departed
            .current(now)
            .into_iter()
            .map(|d| departed::entry(self.status_of(&d.dp, state, store_id, &changed_since), d.at, d.reason))
            .collect();
        let local = self.report(state, store_id, &changed_since);
        let remote = rows.into_iter().filter(|r| r.replica != self.replica).filter_map(|row| {
            let departed_row = row.stream.starts_with(departed::ROW_PREFIX);
            let decoded = if departed_row {
                admin::DisconnectedDataPlane::decode(row.status.as_slice())
                    .map(|d| (d.data_plane.unwrap_or_default(), d.disconnected_at, d.reason))
            } else {
                admin::DataPlaneStatus::decode(row.status.as_slice()).map(|s| (s, None, String::new()))
            };
            let (status, at, reason) = match decoded {
                Ok(decoded) => decoded,
                Err(e) => {
                    warn!(replica = %row.replica, error = %e, "ignoring an unreadable data-plane row");
                    return None;
                }
            };
            let status = self.judge(status, &row, state, store_id, &changed_since);
            if departed_row {
                gone.push(admin::DisconnectedDataPlane { data_plane: Some(status), disconnected_at: at, reason });
                None
            } else if row.heartbeat_at < live_since {
                let reason = format!("its control-plane replica `{}` stopped reporting it", row.replica);
                gone.push(departed::entry(status, departed::from_millis(row.heartbeat_at), reason));
                None
            } else {
                Some(status)
            }
        });
        for status in local.into_iter().chain(remote.collect::<Vec<_>>()) {
            let newer = by_node.get(&status.node_id).is_none_or(|have| {
                let key = |s: &admin::DataPlaneStatus| s.connected_at.as_ref().map(|t| (t.seconds, t.nanos));
                key(&status) > key(have)
            });
            if newer {
                by_node.insert(status.node_id.clone(), status);
            }
        }
        let mut connected: Vec<_> = by_node.into_values().collect();
        connected.sort_by(|a, b| a.node_id.cmp(&b.node_id).then_with(|| a.replica.cmp(&b.replica)));
        let departed = departed::combine(gone, &connected, now);
        Fleet { connected, departed }
    }

    /// Another replica's data plane judged against this replica's state: sync, lag and store warnings.
    fn judge(
        &self,
        mut status: admin::DataPlaneStatus,
        row: &DataPlaneRow,
        state: &State,
        store_id: &str,
        changed_since: &impl Fn(u64) -> Option<SystemTime>,
    ) -> admin::DataPlaneStatus {
        let subscribed: BTreeSet<i32> = row.subscribed.split(',').filter_map(|k| k.parse().ok()).collect();
        status.in_sync = wanted_digest(state, |k| subscribed.contains(&(k.to_proto() as i32))) == row.known_digest;
        status.sync_state = sync_state(status.in_sync) as i32;
        let connected_at = status
            .connected_at
            .as_ref()
            .map(|t| {
                SystemTime::UNIX_EPOCH
                    + Duration::new(u64::try_from(t.seconds).unwrap_or(0), u32::try_from(t.nanos).unwrap_or(0))
            })
            .unwrap_or(SystemTime::UNIX_EPOCH);
        status.lag_seconds = lag(status.in_sync, status.acked_revision, connected_at, changed_since);
        status.store_warnings = store_warnings(&status, store_id, state.revision);
        status
    }
}

fn sync_state(in_sync: bool) -> admin::SyncState {
    if in_sync { admin::SyncState::InSync } else { admin::SyncState::OutOfSync }
}

fn lag(
    in_sync: bool,
    acked_revision: u64,
    connected_at: SystemTime,
    changed_since: &impl Fn(u64) -> Option<SystemTime>,
) -> f64 {
    if in_sync {
        return 0.0;
    }
    let since = changed_since(acked_revision).unwrap_or(connected_at).max(connected_at);
    SystemTime::now().duration_since(since).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Publishes this replica's data planes to the store: at once after a change (debounced), and every `interval`
/// as a heartbeat. On shutdown (`stop` turns true) it withdraws them.
pub async fn publish(registry: Arc<Registry>, store: Arc<Store>, mut stop: watch::Receiver<bool>) {
    if !store.is_shared() {
        // One control plane per store: nobody else reads the rows.
        return;
    }
    let interval = registry.interval;
    loop {
        tokio::select! {
            // At most a few publishes a second however busy the streams are: a write ACKed by a hundred data planes
            // is one publish, not a hundred.
            () = registry.changed.notified() => tokio::time::sleep(Duration::from_millis(200)).await,
            () = tokio::time::sleep(interval) => {}
            () = async { let _ = stop.wait_for(|s| *s).await; } => break,
        }
        let state = store.state();
        let rows = registry.rows(&state, store.store_id(), |r| store.changed_since(r));
        if let Err(e) = store.publish_data_planes(&rows).await {
            debug!(error = %e, "cannot publish this replica's data planes");
        }
    }
    if let Err(e) = store.publish_data_planes(&[]).await {
        debug!(error = %e, "cannot withdraw this replica's data planes");
    }
}

fn to_proto(r: &LastResponse) -> admin::LastResponse {
    admin::LastResponse {
        nonce: r.nonce.clone(),
        revision: r.revision,
        at: Some(system_to_timestamp(r.at)),
        rejected: r
            .rejected
            .iter()
            .map(|x| admin::Rejection {
                kind: x.kind.to_string(),
                name: x.name.clone(),
                version: x.version.clone(),
                reason: x.reason.clone(),
            })
            .collect(),
        summary: r.summary.clone(),
    }
}
