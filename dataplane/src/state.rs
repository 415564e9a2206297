//! The configuration the data plane serves from: one immutable snapshot behind one atomic pointer. A request loads
//! it once and keeps it to the end, so routing and authorization always agree on one version.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use fhirgw_config::Snapshot;
use tokio::sync::watch;

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
}

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

    pub fn install(&self, snapshot: Arc<Snapshot>, source: Source) {
        let digest = snapshot.digest.clone();
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
}
