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
                let wanted = digest(
                    state
                        .pushed
                        .iter()
                        .filter(|((kind, _), _)| dp.subscribed.contains(kind))
                        .map(|((k, n), raw)| (*k, n.as_str(), raw.version.as_str())),
                );
                let in_sync = wanted == dp.known_digest();
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
