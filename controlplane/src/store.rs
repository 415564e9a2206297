//! The durable store: SQLite by default (WAL, synchronous=FULL, so a write is on disk before the admin call
//! returns). Every write bumps one store-wide revision, is validated against the whole resulting configuration with
//! the data plane's own code, and is recorded in an append-only audit log, so nothing an operator wrote is lost.
//!
//! All SQL is plain and portable so a PostgreSQL backend can sit behind the same interface.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fhirgw_config::{ResourceSet, Snapshot};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use tokio::sync::{Mutex, watch};

use crate::objects::{ComposeError, ObjKey, ObjKind, Object, Objects, pushed_resources};

/// Ordered schema migrations; `PRAGMA user_version` records how many have run.
const MIGRATIONS: &[&str] = &["CREATE TABLE objects (
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        body BLOB NOT NULL,
        revision INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (kind, name)
    );
    CREATE TABLE store_revision (id INTEGER PRIMARY KEY CHECK (id = 1), value INTEGER NOT NULL);
    INSERT INTO store_revision (id, value) VALUES (1, 0);
    CREATE TABLE audit (
        revision INTEGER PRIMARY KEY,
        at INTEGER NOT NULL,
        actor TEXT NOT NULL,
        op TEXT NOT NULL,
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        body BLOB
    );"];

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
    #[error("store: {0}")]
    Db(#[from] sqlx::Error),
    #[error("store holds invalid data: {0}")]
    Corrupt(String),
}

impl From<ComposeError> for StoreError {
    fn from(e: ComposeError) -> Self {
        match e {
            ComposeError::UnknownTenant { .. } => StoreError::Invalid(e.to_string()),
            ComposeError::Decode { .. } => StoreError::Corrupt(e.to_string()),
        }
    }
}

pub enum Change {
    Put { kind: ObjKind, name: String, body: Vec<u8> },
    Delete { kind: ObjKind, name: String },
}

pub struct Store {
    pool: SqlitePool,
    /// Serialises this process's writes; SQLite's own lock serialises processes.
    write_lock: Mutex<()>,
    state: watch::Sender<Arc<State>>,
    /// When recent revisions were first seen by this process, oldest first: the start of a data plane's lag.
    history: std::sync::Mutex<VecDeque<(u64, SystemTime)>>,
}

const HISTORY: usize = 4096;

fn now_millis() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)).unwrap_or(0)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl Store {
    pub async fn open(path: &Path) -> Result<Arc<Self>, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new().max_connections(4).connect_with(options).await?;
        migrate(&pool).await?;
        let state = load_state(&pool).await?;
        let (tx, _) = watch::channel(Arc::new(state));
        Ok(Arc::new(Store { pool, write_lock: Mutex::new(()), state: tx, history: Default::default() }))
    }

    pub fn state(&self) -> Arc<State> {
        self.state.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<State>> {
        self.state.subscribe()
    }

    /// Reloads if another process wrote (several replicas on one store); cheap when nothing changed.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let stored: i64 =
            sqlx::query("SELECT value FROM store_revision WHERE id = 1").fetch_one(&self.pool).await?.try_get(0)?;
        if to_u64(stored) > self.state.borrow().revision {
            let _guard = self.write_lock.lock().await;
            let state = load_state(&self.pool).await?;
            self.publish(state);
        }
        Ok(())
    }

    /// When the first revision after `revision` was seen, if it is recent enough to be remembered.
    pub fn changed_since(&self, revision: u64) -> Option<SystemTime> {
        let history = self.history.lock().ok()?;
        history.iter().find(|(r, _)| *r > revision).map(|(_, at)| *at)
    }

    fn publish(&self, state: State) {
        if let Ok(mut history) = self.history.lock() {
            history.push_back((state.revision, state.loaded_at));
            while history.len() > HISTORY {
                history.pop_front();
            }
        }
        self.state.send_if_modified(|current| {
            if state.revision > current.revision {
                *current = Arc::new(state);
                true
            } else {
                false
            }
        });
    }

    /// Applies one change if `expected` holds and the resulting configuration is valid; returns the new revision.
    /// `check` sees the objects as they will be after the change and may refuse it.
    pub async fn write(
        &self,
        actor: &str,
        change: Change,
        expected: Expected,
        check: impl FnOnce(&Objects) -> Result<(), StoreError>,
    ) -> Result<u64, StoreError> {
        let _guard = self.write_lock.lock().await;
        let mut tx = self.pool.begin().await?;
        let mut objects = load_objects(&mut tx).await?;
        let (kind, name) = match &change {
            Change::Put { kind, name, .. } | Change::Delete { kind, name } => (*kind, name.clone()),
        };
        let key: ObjKey = (kind, name.clone());
        let current = objects.get(&key).map(|o| o.revision);
        match (expected, current) {
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
        let row: i64 =
            sqlx::query("SELECT value FROM store_revision WHERE id = 1").fetch_one(&mut *tx).await?.try_get(0)?;
        let revision = to_u64(row) + 1;
        let at = now_millis();
        let (op, body) = match change {
            Change::Put { body, .. } => {
                objects.insert(key, Object { body: body.clone(), revision, updated_at: at });
                ("put", Some(body))
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
        let rev = i64::try_from(revision).map_err(|_| StoreError::Corrupt("revision overflow".into()))?;
        match &body {
            Some(body) => {
                sqlx::query(
                    "INSERT INTO objects (kind, name, body, revision, updated_at) VALUES (?, ?, ?, ?, ?)
                     ON CONFLICT (kind, name) DO UPDATE SET body = excluded.body, revision = excluded.revision,
                     updated_at = excluded.updated_at",
                )
                .bind(kind.as_str())
                .bind(&name)
                .bind(body)
                .bind(rev)
                .bind(at)
                .execute(&mut *tx)
                .await?;
            }
            None => {
                sqlx::query("DELETE FROM objects WHERE kind = ? AND name = ?")
                    .bind(kind.as_str())
                    .bind(&name)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        sqlx::query("UPDATE store_revision SET value = ? WHERE id = 1").bind(rev).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO audit (revision, at, actor, op, kind, name, body) VALUES (?, ?, ?, ?, ?, ?, ?)")
            .bind(rev)
            .bind(at)
            .bind(actor)
            .bind(op)
            .bind(kind.as_str())
            .bind(&name)
            .bind(body)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        let digest = fhirgw_config::resource::set_digest(&pushed);
        let trace_context = fhirgw_telemetry::to_map(&tracing::Span::current());
        self.publish(State { revision, objects, pushed, digest, loaded_at: SystemTime::now(), trace_context });
        Ok(revision)
    }

    /// Number of audit records (every write ever made).
    pub async fn audit_len(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query("SELECT COUNT(*) FROM audit").fetch_one(&self.pool).await?.try_get(0)?;
        Ok(to_u64(n))
    }
}

async fn migrate(pool: &SqlitePool) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    let applied: i64 = sqlx::query("PRAGMA user_version").fetch_one(&mut *tx).await?.try_get(0)?;
    let applied = usize::try_from(applied).unwrap_or(0);
    if applied > MIGRATIONS.len() {
        return Err(StoreError::Corrupt(format!(
            "store schema version {applied} is newer than this control plane understands ({})",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        sqlx::raw_sql(sql).execute(&mut *tx).await?;
        sqlx::raw_sql(&format!("PRAGMA user_version = {}", i + 1)).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

async fn load_objects(conn: &mut sqlx::SqliteConnection) -> Result<Objects, StoreError> {
    let rows = sqlx::query("SELECT kind, name, body, revision, updated_at FROM objects").fetch_all(conn).await?;
    let mut objects = Objects::new();
    for row in rows {
        let kind: String = row.try_get(0)?;
        let kind: ObjKind = kind.parse().map_err(StoreError::Corrupt)?;
        let name: String = row.try_get(1)?;
        let body: Vec<u8> = row.try_get(2)?;
        let revision: i64 = row.try_get(3)?;
        let updated_at: i64 = row.try_get(4)?;
        objects.insert((kind, name), Object { body, revision: to_u64(revision), updated_at });
    }
    Ok(objects)
}

async fn load_state(pool: &SqlitePool) -> Result<State, StoreError> {
    let mut tx = pool.begin().await?;
    let revision: i64 =
        sqlx::query("SELECT value FROM store_revision WHERE id = 1").fetch_one(&mut *tx).await?.try_get(0)?;
    let objects = load_objects(&mut tx).await?;
    tx.commit().await?;
    let pushed = pushed_resources(&objects)?;
    let digest = fhirgw_config::resource::set_digest(&pushed);
    Ok(State {
        revision: to_u64(revision),
        objects,
        pushed,
        digest,
        loaded_at: SystemTime::now(),
        trace_context: Default::default(),
    })
}
