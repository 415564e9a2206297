//! Connected data planes, as `GetStatus` reports them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use dashmap::DashMap;
use fhirgw_config::resource::digest;
use fhirgw_config::tenant::system_to_timestamp;
use fhirgw_config::{Kind, Rejection, ResourceKey};
use fhirgw_proto::admin::v1 as admin;

use crate::store::State;

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
}

impl DataPlane {
    fn known_digest(&self) -> String {
        digest(self.known.iter().map(|((k, n), v)| (*k, n.as_str(), v.as_str())))
    }

    /// Whether it holds exactly what `state` pushes for the kinds it subscribed to.
    fn in_sync(&self, state: &State) -> bool {
        let wanted = digest(
            state
                .pushed
                .iter()
                .filter(|((kind, _), _)| self.subscribed.contains(kind))
                .map(|((k, n), raw)| (*k, n.as_str(), raw.version.as_str())),
        );
        wanted == self.known_digest()
    }
}

/// The fleet in three numbers, for metrics (per-data-plane series would be unbounded).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub connected: usize,
    pub out_of_sync: usize,
    /// Revisions between the store and the furthest-behind data plane that is out of sync (0 when all are in sync).
    pub max_lag_revisions: u64,
}

#[derive(Default)]
pub struct Registry {
    next_id: AtomicU64,
    streams: DashMap<u64, DataPlane>,
}

impl Registry {
    pub fn register(&self, dp: DataPlane) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.streams.insert(id, dp);
        id
    }

    pub fn update(&self, id: u64, f: impl FnOnce(&mut DataPlane)) {
        if let Some(mut entry) = self.streams.get_mut(&id) {
            f(&mut entry);
        }
    }

    pub fn remove(&self, id: u64) {
        self.streams.remove(&id);
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

    /// Status of every connected data plane against the current state. `changed_since(rev)` gives when the first
    /// revision after `rev` was written, the start of a lagging data plane's lag.
    pub fn report(
        &self,
        state: &State,
        changed_since: impl Fn(u64) -> Option<SystemTime>,
    ) -> Vec<admin::DataPlaneStatus> {
        let now = SystemTime::now();
        let mut out: Vec<admin::DataPlaneStatus> = self
            .streams
            .iter()
            .map(|entry| {
                let dp = entry.value();
                let in_sync = dp.in_sync(state);
                let lag_seconds = if in_sync {
                    0.0
                } else {
                    let since = changed_since(dp.acked_revision).unwrap_or(dp.connected_at).max(dp.connected_at);
                    now.duration_since(since).map(|d| d.as_secs_f64()).unwrap_or(0.0)
                };
                admin::DataPlaneStatus {
                    node_id: dp.node_id.clone(),
                    hostname: dp.hostname.clone(),
                    build_version: dp.build_version.clone(),
                    peer_address: dp.peer.clone(),
                    connected_at: Some(system_to_timestamp(dp.connected_at)),
                    applied_version: dp.applied_version.clone(),
                    acked_revision: dp.acked_revision,
                    in_sync,
                    lag_seconds,
                    last_ack: dp.last_ack.as_ref().map(to_proto),
                    last_nack: dp.last_nack.as_ref().map(to_proto),
                }
            })
            .collect();
        out.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        out
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
