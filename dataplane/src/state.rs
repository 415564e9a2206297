//! The configuration the data plane serves from: one immutable snapshot behind one atomic pointer. A request loads
//! it once and keeps it to the end, so routing and authorization always agree on one version.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use fhirgw_config::Snapshot;
use tokio::sync::{Notify, watch};

use crate::config_guard::Held;

/// Where the current snapshot came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    ControlPlane,
    Disk,
}

#[derive(Debug, Clone)]
pub struct Applied {
    pub source: Source,
    pub applied_at: SystemTime,
}

/// The control plane's configuration is being refused (another store, an older revision): the last good snapshot
/// is served meanwhile.
#[derive(Debug, Clone)]
pub struct Refusing {
    pub since: SystemTime,
    pub reason: String,
    /// What the control plane offered.
    pub offered_store_id: String,
    pub offered_revision: u64,
}

#[derive(Debug, Clone, Default)]
pub struct LastRejection {
    pub at: Option<SystemTime>,
    pub summary: String,
}

pub struct ConfigState {
    snapshot: ArcSwapOption<Snapshot>,
    /// When the control plane last confirmed the configuration (a response applied or a healthy stream).
    confirmed_at: Mutex<Option<SystemTime>>,
    applied: Mutex<Option<Applied>>,
    last_rejection: Mutex<LastRejection>,
    /// Digest of the current snapshot, for anything that reacts to changes (never held across request work).
    changes: watch::Sender<Option<String>>,
    responses_received: AtomicU64,
    resources_received: AtomicU64,
    /// Identity of the store the current snapshot came from ("" when unknown).
    store_id: Mutex<String>,
    refusing: Mutex<Option<Refusing>>,
    /// Operator overrides of the rollback guard: always (a flag), or the next response once (an admin call).
    allow_rollback: AtomicBool,
    accept_next: AtomicBool,
    /// Wakes the config client to reconnect, so the control plane sends its whole configuration again.
    reconnect: Notify,
    /// How long a confirmation keeps grants trusted (`--grant-ttl-secs`), in milliseconds.
    grant_ttl_ms: AtomicU64,
}

/// The grant TTL until [`ConfigState::set_grant_ttl`] (the flag's default).
pub const DEFAULT_GRANT_TTL: Duration = Duration::from_secs(300);

/// Counts of what the control plane has sent, for the admin port and for tests of incremental resume.
#[derive(Debug, Clone, Copy, Default)]
pub struct Received {
    pub responses: u64,
    pub resources: u64,
}

impl Default for ConfigState {
    fn default() -> Self {
        Self {
            snapshot: ArcSwapOption::empty(),
            confirmed_at: Mutex::new(None),
            applied: Mutex::new(None),
            last_rejection: Mutex::new(LastRejection::default()),
            changes: watch::channel(None).0,
            responses_received: AtomicU64::new(0),
            resources_received: AtomicU64::new(0),
            store_id: Mutex::new(String::new()),
            refusing: Mutex::new(None),
            allow_rollback: AtomicBool::new(false),
            accept_next: AtomicBool::new(false),
            reconnect: Notify::new(),
            grant_ttl_ms: AtomicU64::new(DEFAULT_GRANT_TTL.as_millis() as u64),
        }
    }
}

impl ConfigState {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The snapshot to serve one request from; `None` until configuration is loaded.
    pub fn load(&self) -> Option<Arc<Snapshot>> {
        self.snapshot.load_full()
    }

    pub fn is_ready(&self) -> bool {
        self.snapshot.load().is_some()
    }

    /// Installs `snapshot`, which came from the store `store_id` ("" when unknown).
    pub fn install(&self, snapshot: Arc<Snapshot>, source: Source, store_id: &str) {
        let digest = snapshot.digest.clone();
        if let Ok(mut id) = self.store_id.lock() {
            store_id.clone_into(&mut id);
        }
        self.snapshot.store(Some(snapshot));
        if let Ok(mut applied) = self.applied.lock() {
            *applied = Some(Applied { source, applied_at: SystemTime::now() });
        }
        self.changes.send_replace(Some(digest));
    }

    pub fn confirm(&self, at: SystemTime) {
        if let Ok(mut confirmed) = self.confirmed_at.lock() {
            *confirmed = Some(at);
        }
    }

    pub fn confirmed_at(&self) -> Option<SystemTime> {
        self.confirmed_at.lock().ok().and_then(|c| *c)
    }

    pub fn set_grant_ttl(&self, ttl: Duration) {
        self.grant_ttl_ms.store(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    pub fn grant_ttl(&self) -> Duration {
        Duration::from_millis(self.grant_ttl_ms.load(Ordering::Relaxed))
    }

    /// How long ago the control plane last confirmed the configuration, at `now`; `None` if never, or if the
    /// confirmation lies in the future (the clock stepped back), which is not trusted either.
    pub fn confirmation_age(&self, now: SystemTime) -> Option<Duration> {
        self.confirmed_at().and_then(|at| now.duration_since(at).ok())
    }

    /// Whether grants are past the grant TTL at `now`: requests that depend on grants are refused with 503, and
    /// `/readyz` fails. The same rule as the request path's (`proxy/access.rs`).
    pub fn grants_stale(&self, now: SystemTime) -> bool {
        self.confirmation_age(now).is_none_or(|age| age > self.grant_ttl())
    }

    pub fn applied(&self) -> Option<Applied> {
        self.applied.lock().ok().and_then(|a| a.clone())
    }

    pub fn reject(&self, summary: String) {
        if let Ok(mut last) = self.last_rejection.lock() {
            *last = LastRejection { at: Some(SystemTime::now()), summary };
        }
    }

    pub fn last_rejection(&self) -> LastRejection {
        self.last_rejection.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn count_received(&self, resources: usize) {
        self.responses_received.fetch_add(1, Ordering::Relaxed);
        self.resources_received.fetch_add(resources as u64, Ordering::Relaxed);
    }

    pub fn received(&self) -> Received {
        Received {
            responses: self.responses_received.load(Ordering::Relaxed),
            resources: self.resources_received.load(Ordering::Relaxed),
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<Option<String>> {
        self.changes.subscribe()
    }

    pub fn store_id(&self) -> String {
        self.store_id.lock().map(|id| id.clone()).unwrap_or_default()
    }

    /// What the rollback guard compares a response with: `None` while nothing is held, or what is held is an empty
    /// configuration (no route table: it serves nothing, so there is nothing to protect).
    pub fn held(&self) -> Option<Held> {
        let snapshot = self.load().filter(|s| !s.tables.is_empty())?;
        Some(Held { store_id: self.store_id(), system_version: snapshot.system_version })
    }

    pub fn refusing(&self) -> Option<Refusing> {
        self.refusing.lock().ok().and_then(|r| r.clone())
    }

    /// Records the current refusal (`None`: the control plane's configuration is accepted again). Returns whether the
    /// refusal is new or says something new, so it is logged once rather than at every heartbeat.
    pub fn set_refusing(&self, refusing: Option<Refusing>) -> bool {
        let Ok(mut current) = self.refusing.lock() else { return true };
        let changed = match (&*current, &refusing) {
            (Some(a), Some(b)) => a.reason != b.reason,
            (None, None) => false,
            _ => true,
        };
        let since = current.as_ref().map(|c| c.since);
        *current = refusing.map(|mut r| {
            if !changed {
                r.since = since.unwrap_or(r.since);
            }
            r
        });
        changed
    }

    pub fn set_allow_rollback(&self, allow: bool) {
        self.allow_rollback.store(allow, Ordering::Relaxed);
    }

    pub fn allow_rollback(&self) -> bool {
        self.allow_rollback.load(Ordering::Relaxed)
    }

    /// The operator accepts the control plane's next configuration whatever its store and revision; the config
    /// stream is reopened so the control plane sends all of it.
    pub fn accept_next(&self) {
        self.accept_next.store(true, Ordering::SeqCst);
        self.reconnect.notify_one();
    }

    pub fn accept_next_pending(&self) -> bool {
        self.accept_next.load(Ordering::SeqCst)
    }

    /// Consumes the one-time override, if the operator gave one.
    pub fn take_accept_next(&self) -> bool {
        self.accept_next.swap(false, Ordering::SeqCst)
    }

    /// Resolves when the config stream should be reopened (see [`ConfigState::accept_next`]).
    pub async fn reconnect_requested(&self) {
        self.reconnect.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_go_stale_past_the_ttl() {
        let state = ConfigState::new();
        state.set_grant_ttl(Duration::from_secs(300));
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert!(state.grants_stale(at), "never confirmed");
        state.confirm(at);
        let cases = [
            (Duration::ZERO, false),
            (Duration::from_secs(300), false),
            (Duration::from_millis(300_001), true),
            (Duration::from_secs(3600), true),
        ];
        for (after, stale) in cases {
            assert_eq!(state.grants_stale(at + after), stale, "{after:?} after the confirmation");
            assert_eq!(state.confirmation_age(at + after), Some(after));
        }
        // A confirmation in the future (the clock stepped back) is not trusted.
        assert!(state.grants_stale(at - Duration::from_secs(1)));
        assert_eq!(state.confirmation_age(at - Duration::from_secs(1)), None);
    }
}
