//! The durable store. Every write bumps one store-wide revision, is validated against the whole resulting
//! configuration with the data plane's own code, and is recorded in an append-only audit log with its actor, so
//! nothing an operator wrote is lost and every replica agrees on what was written.
//!
//! The configuration lives in memory (`State`, behind a `watch`); the database behind [`Backend`] is the truth. A
//! write is checked against the in-memory state at revision N and committed only if the store is still at N (a
//! compare-and-set on the revision row); if another replica got there first, this replica catches up and checks
//! again. Replicas follow each other's writes through `Backend::wait_for_change` (LISTEN/NOTIFY on PostgreSQL,
//! with a periodic poll as the fallback) and replay them from the audit log.
//!
//!
//! `Store` is what `admin.rs`, `push.rs`, `status.rs` and `metrics.rs` see: the
//! whole configuration in memory (`State` behind a `watch`), `write`, `list_audit`, the identity. Underneath, the
//! `Backend` trait (`store/backend.rs`) is all a database must provide; it speaks in model types (`Objects`,
//! `AuditRecord`, `DataPlaneRow`) and `BackendError` (`Unavailable` / `Other` / `Corrupt` / `Locked`), never sqlx:
//!
//! | method | SQLite | PostgreSQL |
//! |---|---|---|
//! | `load`, `revision` | one transaction | one `REPEATABLE READ` transaction |
//! | `commit(record)` | `UPDATE store_revision … WHERE value = N-1` (the compare-and-set), the object row, the audit row, in one transaction | same, plus `pg_notify('fhirgw_store', N)` delivered on commit |
//! | `changes_since(rev)` | the audit rows after `rev` | same |
//! | `wait_for_change(poll)` | sleeps `poll` (nobody else writes: exclusive lock) | `LISTEN fhirgw_store`, at most `poll`; a lost connection returns at once and reconnects next time |
//! | `list_audit`, `publish_data_planes`, `data_planes` | shared SQL (`$N` placeholders, which sqlx's SQLite accepts) | same |
//!
//! **A write** is decided on the in-memory state at revision N (expected version, validation with the data plane's
//! own `Snapshot::build`) and committed only if the store is still at N. If another replica got there first the
//! commit writes nothing; the replica catches up and decides again, so of two replicas racing with the same
//! `expected_version` exactly one wins and the other answers `FAILED_PRECONDITION`. A write that cannot reach the
//! database within 5 s fails `UNAVAILABLE`; being one transaction, it leaves nothing behind.
//!
//! **Fan-out.** Each replica runs `Store::follow`: wait for a change (NOTIFY, or the `--poll-ms` poll), then replay
//! the audit rows after its revision onto its state (a full reload past 1000 rows or on a gap) and publish it; every
//! config session of that replica wakes on the `watch`. Versions are content hashes, so a data plane moving between
//! replicas receives nothing it holds. Without the database a replica keeps its state and streams (heartbeats
//! included), refuses writes, and catches up when `follow` succeeds again.
//!
//! **Status across replicas.** Each replica's `Registry` holds its streams; `status::publish` writes them as rows
//! (`data_planes`: replica, stream, the encoded `DataPlaneStatus`, what the data plane holds) at once after a change and
//! every `--status-interval-ms`, and withdraws them on shutdown. `GetStatus` merges its own streams with the other
//! replicas' fresh rows, recomputes `in_sync`, lag and store warnings against its own state, and keeps one entry per
//! node (the latest connection).
//!
//! **Identity and exclusivity.** `store_meta.store_id` is created in the migration transaction (128 random bits) and
//! sent in every `ConfigResponse`; the first `ConfigRequest`'s `store_id` / `held_system_version` are recorded per
//! stream (and replaced by this store's on an ACK). A data plane that refuses a whole response (another store, an older
//! revision) NACKs it naming no resource and saying why in `summary` with the store identity or revision; `GetStatus`
//! flags it. SQLite: the control plane holds an exclusive `flock` on `<file>.lock` for its lifetime (taken before
//! migrations); PostgreSQL: migrations run under `pg_advisory_xact_lock`.
//!
//! **Shutdown.** SIGTERM flips one `watch`: every session sends `UNAVAILABLE` and ends, the gRPC server stops
//! accepting, the status rows are withdrawn, and the process exits within `--shutdown-grace-secs` whatever lingers.

mod backend;
mod common;
mod postgres;
mod sqlite;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fhirgw_config::{ResourceSet, Snapshot};
use rand::Rng;
use tokio::sync::{Mutex, watch};
use tracing::{info, warn};

pub use backend::{AuditQuery, AuditRecord, Backend, BackendError, DataPlaneRow};

use crate::objects::{ComposeError, ObjKey, ObjKind, Object, Objects, pushed_resources};

/// The whole stored configuration at one revision, and what it pushes.
#[derive(Debug)]
pub struct State {
    pub revision: u64,
    pub objects: Objects,
    pub pushed: ResourceSet,
    /// Digest of `pushed`, the configuration version data planes report.
    pub digest: String,
    /// When this revision was loaded by this process; the start of lag for data planes behind it.
    pub loaded_at: SystemTime,
    /// W3C trace context of the write that made this revision (empty when loaded from the store).
    pub trace_context: std::collections::BTreeMap<String, String>,
}

impl State {
    fn new(revision: u64, objects: Objects) -> Result<State, StoreError> {
        let pushed = pushed_resources(&objects)?;
        let digest = fhirgw_config::resource::set_digest(&pushed);
        Ok(State { revision, objects, pushed, digest, loaded_at: SystemTime::now(), trace_context: Default::default() })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    Any,
    Absent,
    Revision(u64),
}

impl Expected {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim() {
            "" => Ok(Expected::Any),
            "0" => Ok(Expected::Absent),
            v => {
                v.parse::<u64>().map(Expected::Revision).map_err(|_| format!("expected_version `{v}` is not a version"))
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{kind} `{name}` not found")]
    NotFound { kind: ObjKind, name: String },
    #[error("{kind} `{name}`: expected version {expected}, stored version is {actual}")]
    VersionMismatch { kind: ObjKind, name: String, expected: String, actual: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    /// The database cannot be reached; nothing was written. Retry later.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Backend(String),
    #[error("store holds invalid data: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Locked(String),
}

impl From<ComposeError> for StoreError {
    fn from(e: ComposeError) -> Self {
        match e {
            ComposeError::UnknownTenant { .. } => StoreError::Invalid(e.to_string()),
            ComposeError::Decode { .. } => StoreError::Corrupt(e.to_string()),
        }
    }
}

impl From<BackendError> for StoreError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::Unavailable(_) => StoreError::Unavailable(e.to_string()),
            BackendError::Other(m) => StoreError::Backend(m),
            BackendError::Corrupt(m) => StoreError::Corrupt(m),
            BackendError::Locked(m) => StoreError::Locked(m),
        }
    }
}

pub enum Change {
    Put { kind: ObjKind, name: String, body: Vec<u8> },
    Delete { kind: ObjKind, name: String },
}

/// Where the store lives, from `--store`: a `postgres://` (or `postgresql://`) URL, a `sqlite://` URL, or a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Sqlite(PathBuf),
    Postgres(String),
}

impl Location {
    pub fn parse(s: &str) -> Location {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Location::Postgres(s.to_owned())
        } else {
            Location::Sqlite(PathBuf::from(s.strip_prefix("sqlite://").unwrap_or(s)))
        }
    }
}

/// A new store identity: 128 random bits, hex.
fn new_store_id() -> String {
    format!("{:032x}", rand::rng().random::<u128>())
}

/// How long a write may wait for the database before it fails with UNAVAILABLE.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Replays longer than this reload the whole store instead.
const REPLAY_LIMIT: u32 = 1000;
const HISTORY: usize = 4096;

pub struct Store {
    backend: Box<dyn Backend>,
    replica: String,
    /// Serialises this process's writes (replicas are serialised by the revision compare-and-set).
    write_lock: Mutex<()>,
    refresh_lock: Mutex<()>,
    state: watch::Sender<Arc<State>>,
    /// Whether the last operation on the database succeeded (the `store_available` gauge).
    available: std::sync::atomic::AtomicBool,
    /// When recent revisions were first seen by this process, oldest first: the start of a data plane's lag.
    history: std::sync::Mutex<VecDeque<(u64, SystemTime)>>,
}

pub fn now_millis() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)).unwrap_or(0)
}

impl Store {
    /// Opens (creating and migrating as needed) the store at `location`. `replica` names this control plane in the
    /// audit log and in `GetStatus`; `password` overrides a PostgreSQL URL's.
    pub async fn open(location: &Location, password: Option<&str>, replica: &str) -> Result<Arc<Self>, StoreError> {
        let backend: Box<dyn Backend> = match location {
            Location::Sqlite(path) => Box::new(sqlite::SqliteBackend::open(path).await?),
            Location::Postgres(url) => Box::new(postgres::PostgresBackend::open(url, password, replica).await?),
        };
        Self::with_backend(backend, replica).await
    }

    pub async fn with_backend(backend: Box<dyn Backend>, replica: &str) -> Result<Arc<Self>, StoreError> {
        let (revision, objects) = backend.load().await?;
        let (tx, _) = watch::channel(Arc::new(State::new(revision, objects)?));
        Ok(Arc::new(Store {
            backend,
            replica: replica.to_owned(),
            write_lock: Mutex::new(()),
            refresh_lock: Mutex::new(()),
            state: tx,
            available: std::sync::atomic::AtomicBool::new(true),
            history: Default::default(),
        }))
    }

    /// The store's identity: created with it, never changed, the same on every replica sharing it.
    pub fn store_id(&self) -> &str {
        self.backend.store_id()
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// What the store is, for logs (no password).
    pub fn describe(&self) -> String {
        self.backend.describe()
    }

    /// Whether the database answered the last time this replica asked (writes, or following other replicas).
    pub fn available(&self) -> bool {
        self.available.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn mark<T>(&self, result: &Result<T, StoreError>) {
        let up = !matches!(result, Err(StoreError::Unavailable(_)));
        self.available.store(up, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn state(&self) -> Arc<State> {
        self.state.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<State>> {
        self.state.subscribe()
    }

    /// Catches up with writes made by other replicas; cheap when there are none.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let _guard = self.refresh_lock.lock().await;
        let result = self.refresh_locked().await;
        self.mark(&result);
        result
    }

    async fn refresh_locked(&self) -> Result<(), StoreError> {
        let current = self.state();
        let records = self.backend.changes_since(current.revision, REPLAY_LIMIT).await?;
        if records.is_empty() {
            return Ok(());
        }
        let contiguous = records.iter().zip(current.revision + 1..).all(|(r, want)| r.revision == want);
        let state = if contiguous && records.len() < REPLAY_LIMIT as usize {
            let mut objects = current.objects.clone();
            for r in &records {
                let kind: ObjKind = r.kind.parse().map_err(StoreError::Corrupt)?;
                match &r.body {
                    Some(body) => {
                        objects.insert(
                            (kind, r.name.clone()),
                            Object { body: body.clone(), revision: r.revision, updated_at: r.at },
                        );
                    }
                    None => {
                        objects.remove(&(kind, r.name.clone()));
                    }
                }
            }
            let revision = records.last().map_or(current.revision, |r| r.revision);
            State::new(revision, objects)?
        } else {
            let (revision, objects) = self.backend.load().await?;
            State::new(revision, objects)?
        };
        self.publish(state);
        Ok(())
    }

    /// Follows other replicas' writes until the process ends: at each notification (or poll), catch up.
    pub async fn follow(self: Arc<Self>, poll: Duration) {
        let mut healthy = true;
        loop {
            self.backend.wait_for_change(poll).await;
            match self.refresh().await {
                Ok(()) if !healthy => {
                    info!(store = %self.describe(), "store reachable again");
                    healthy = true;
                }
                Ok(()) => {}
                Err(e) => {
                    if healthy {
                        warn!(error = %e, "cannot read the store; serving the configuration held in memory");
                    }
                    healthy = false;
                    tokio::time::sleep(poll.min(Duration::from_secs(1))).await;
                }
            }
        }
    }

    /// When the first revision after `revision` was seen, if it is recent enough to be remembered.
    pub fn changed_since(&self, revision: u64) -> Option<SystemTime> {
        let history = self.history.lock().ok()?;
        history.iter().find(|(r, _)| *r > revision).map(|(_, at)| *at)
    }

    fn publish(&self, state: State) {
        let (revision, loaded_at) = (state.revision, state.loaded_at);
        let published = self.state.send_if_modified(|current| {
            if state.revision > current.revision {
                *current = Arc::new(state);
                true
            } else {
                false
            }
        });
        if published && let Ok(mut history) = self.history.lock() {
            history.push_back((revision, loaded_at));
            while history.len() > HISTORY {
                history.pop_front();
            }
        }
    }

    /// Applies one change if `expected` holds and the resulting configuration is valid; returns the new revision.
    /// `check` sees the objects as they will be after the change and may refuse it. Fails with `Unavailable`, having
    /// written nothing, when the database cannot be reached in time.
    pub async fn write(
        &self,
        actor: &str,
        change: Change,
        expected: Expected,
        check: impl Fn(&Objects) -> Result<(), StoreError>,
    ) -> Result<u64, StoreError> {
        let result = self.write_inner(actor, change, expected, check).await;
        self.mark(&result);
        result
    }

    async fn write_inner(
        &self,
        actor: &str,
        change: Change,
        expected: Expected,
        check: impl Fn(&Objects) -> Result<(), StoreError>,
    ) -> Result<u64, StoreError> {
        let _guard = self.write_lock.lock().await;
        // A lost race means another replica wrote: catch up and decide again on what is now stored.
        for _ in 0..8 {
            let current = self.state();
            let (record, state) = self.prepare(actor, &change, expected, &check, &current)?;
            // Commit and publish before the follower can replay this revision from the audit log: the published
            // state is the one carrying the write's trace context.
            let replay = self.refresh_lock.lock().await;
            let committed =
                tokio::time::timeout(WRITE_TIMEOUT, self.backend.commit(&record)).await.map_err(|_| {
                    StoreError::Unavailable(format!("store unavailable: no answer within {WRITE_TIMEOUT:?}"))
                })??;
            if committed {
                let revision = state.revision;
                self.publish(state);
                return Ok(revision);
            }
            drop(replay);
            tokio::time::timeout(WRITE_TIMEOUT, self.refresh()).await.map_err(|_| {
                StoreError::Unavailable(format!("store unavailable: no answer within {WRITE_TIMEOUT:?}"))
            })??;
        }
        Err(StoreError::Unavailable("store too busy: lost the write race repeatedly; retry".into()))
    }

    /// The audit record of `change` on `current`, and the state it makes; refuses what `expected` or validation
    /// rule out.
    fn prepare(
        &self,
        actor: &str,
        change: &Change,
        expected: Expected,
        check: &impl Fn(&Objects) -> Result<(), StoreError>,
        current: &State,
    ) -> Result<(AuditRecord, State), StoreError> {
        let (kind, name) = match change {
            Change::Put { kind, name, .. } | Change::Delete { kind, name } => (*kind, name.clone()),
        };
        let key: ObjKey = (kind, name.clone());
        let before = current.objects.get(&key).map(|o| o.revision);
        match (expected, before) {
            (Expected::Any, _) | (Expected::Absent, None) => {}
            (Expected::Revision(want), Some(have)) if want == have => {}
            (expected, current) => {
                return Err(StoreError::VersionMismatch {
                    kind,
                    name,
                    expected: match expected {
                        Expected::Absent => "0 (absent)".into(),
                        Expected::Revision(r) => r.to_string(),
                        Expected::Any => String::new(),
                    },
                    actual: current.map_or_else(|| "none (absent)".into(), |r| r.to_string()),
                });
            }
        }
        let revision = current.revision + 1;
        let at = now_millis();
        let mut objects = current.objects.clone();
        let (op, body) = match change {
            Change::Put { body, .. } => {
                objects.insert(key, Object { body: body.clone(), revision, updated_at: at });
                ("put", Some(body.clone()))
            }
            Change::Delete { .. } => {
                if objects.remove(&key).is_none() {
                    return Err(StoreError::NotFound { kind, name });
                }
                ("delete", None)
            }
        };
        check(&objects)?;
        let pushed = pushed_resources(&objects)?;
        if let Err(rejections) = Snapshot::build(pushed.clone(), revision) {
            let reasons: Vec<String> = rejections.iter().map(ToString::to_string).collect();
            return Err(StoreError::Invalid(reasons.join("; ")));
        }
        let record = AuditRecord {
            revision,
            at,
            actor: actor.to_owned(),
            replica: self.replica.clone(),
            op: op.to_owned(),
            kind: kind.as_str().to_owned(),
            name,
            body,
            version_before: before,
        };
        let digest = fhirgw_config::resource::set_digest(&pushed);
        let trace_context = fhirgw_telemetry::to_map(&tracing::Span::current());
        Ok((record, State { revision, objects, pushed, digest, loaded_at: SystemTime::now(), trace_context }))
    }

    /// The audit log, newest first.
    pub async fn list_audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        Ok(self.backend.list_audit(query).await?)
    }

    /// Whether several control planes can share this store (and so need each other's data-plane rows).
    pub fn is_shared(&self) -> bool {
        self.backend.is_shared()
    }

    /// Replaces this replica's published data planes (what the other replicas' `GetStatus` shows).
    pub async fn publish_data_planes(&self, rows: &[DataPlaneRow]) -> Result<(), StoreError> {
        Ok(self.backend.publish_data_planes(&self.replica, rows).await?)
    }

    /// Every replica's data planes published at or after `since` (Unix milliseconds).
    pub async fn data_planes(&self, since: i64) -> Result<Vec<DataPlaneRow>, StoreError> {
        Ok(self.backend.data_planes(since).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        for (arg, want) in [
            ("postgres://u@db:5432/fhirgw", Location::Postgres("postgres://u@db:5432/fhirgw".into())),
            ("postgresql://db/fhirgw", Location::Postgres("postgresql://db/fhirgw".into())),
            ("sqlite:///var/lib/cp.db", Location::Sqlite("/var/lib/cp.db".into())),
            ("sqlite://cp.db", Location::Sqlite("cp.db".into())),
            ("/var/lib/cp.db", Location::Sqlite("/var/lib/cp.db".into())),
        ] {
            assert_eq!(Location::parse(arg), want, "{arg}");
        }
    }

    #[test]
    fn store_ids_are_random_hex() {
        let (a, b) = (new_store_id(), new_store_id());
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
