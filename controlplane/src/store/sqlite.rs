//! The embedded backend: one SQLite file (WAL, `synchronous=FULL`, so a write is on disk before the admin call
//! returns), held by exactly one control plane through an exclusive lock on `<file>.lock`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqliteConnection, SqlitePool};

use super::backend::{AuditQuery, AuditRecord, Backend, BackendError, DataPlaneRow, classify, from_sql, to_sql};
use super::common::shared_queries;
use crate::objects::{ObjKind, Object, Objects};

/// Ordered schema migrations; `PRAGMA user_version` records how many have run.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE objects (
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
    );",
    "ALTER TABLE audit ADD COLUMN replica TEXT NOT NULL DEFAULT '';
    ALTER TABLE audit ADD COLUMN version_before INTEGER;
    CREATE INDEX audit_at ON audit (at);
    CREATE TABLE store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE data_planes (
        replica TEXT NOT NULL,
        stream TEXT NOT NULL,
        node_id TEXT NOT NULL,
        known_digest TEXT NOT NULL,
        subscribed TEXT NOT NULL,
        status BLOB NOT NULL,
        heartbeat_at INTEGER NOT NULL,
        PRIMARY KEY (replica, stream)
    );",
];

pub struct SqliteBackend {
    pool: SqlitePool,
    path: PathBuf,
    store_id: String,
    /// Held for the life of the process: the exclusive lock that keeps a second control plane off this file.
    _lock: File,
}

shared_queries!(SqliteBackend, SqliteConnection);

/// Takes the exclusive lock beside the database file, or says who to blame.
fn lock(path: &Path) -> Result<File, BackendError> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = PathBuf::from(name);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| BackendError::Other(format!("cannot open the lock file {}: {e}", lock_path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(BackendError::Locked(format!(
            "another control plane holds the SQLite store {} (lock {}); an embedded store serves exactly one \
             control plane: stop the other one, or run several replicas on PostgreSQL",
            path.display(),
            lock_path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(BackendError::Other(format!("cannot lock {}: {e}", lock_path.display())))
        }
    }
}

impl SqliteBackend {
    pub async fn open(path: &Path) -> Result<Self, BackendError> {
        // The lock comes first: a second process must not even run migrations on a file in use.
        let lock = lock(path)?;
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await
            .map_err(classify)?;
        let store_id = migrate(&pool).await?;
        Ok(SqliteBackend { pool, path: path.to_owned(), store_id, _lock: lock })
    }
}

/// Runs the missing migrations and creates the store identity, in one transaction.
async fn migrate(pool: &SqlitePool) -> Result<String, BackendError> {
    let mut tx = pool.begin().await.map_err(classify)?;
    let applied: i64 =
        sqlx::query("PRAGMA user_version").fetch_one(&mut *tx).await.map_err(classify)?.try_get(0).map_err(classify)?;
    let applied = usize::try_from(applied).unwrap_or(0);
    if applied > MIGRATIONS.len() {
        return Err(BackendError::Corrupt(format!(
            "store schema version {applied} is newer than this control plane understands ({})",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        sqlx::raw_sql(sql).execute(&mut *tx).await.map_err(classify)?;
        sqlx::raw_sql(&format!("PRAGMA user_version = {}", i + 1)).execute(&mut *tx).await.map_err(classify)?;
    }
    let store_id = SqliteBackend::q_store_id(&mut tx).await?;
    tx.commit().await.map_err(classify)?;
    Ok(store_id)
}

#[tonic::async_trait]
impl Backend for SqliteBackend {
    fn store_id(&self) -> &str {
        &self.store_id
    }

    fn describe(&self) -> String {
        format!("sqlite://{}", self.path.display())
    }

    fn is_shared(&self) -> bool {
        false
    }

    async fn load(&self) -> Result<(u64, Objects), BackendError> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let revision = Self::q_revision(&mut tx).await?;
        let objects = Self::q_objects(&mut tx).await?;
        tx.commit().await.map_err(classify)?;
        Ok((revision, objects))
    }

    async fn revision(&self) -> Result<u64, BackendError> {
        Self::q_revision(&mut *self.pool.acquire().await.map_err(classify)?).await
    }

    async fn commit(&self, record: &AuditRecord) -> Result<bool, BackendError> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        if !Self::q_write(&mut tx, record).await? {
            return Ok(false);
        }
        tx.commit().await.map_err(classify)?;
        Ok(true)
    }

    async fn changes_since(&self, revision: u64, limit: u32) -> Result<Vec<AuditRecord>, BackendError> {
        Self::q_changes_since(&mut *self.pool.acquire().await.map_err(classify)?, revision, limit).await
    }

    async fn wait_for_change(&self, poll: Duration) {
        // Nobody else writes this file (the lock sees to that); the poll only re-reads what this process wrote.
        tokio::time::sleep(poll).await;
    }

    async fn list_audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, BackendError> {
        Self::q_list_audit(&mut *self.pool.acquire().await.map_err(classify)?, query).await
    }

    async fn publish_data_planes(&self, replica: &str, rows: &[DataPlaneRow]) -> Result<(), BackendError> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        Self::q_publish(&mut tx, replica, rows).await?;
        tx.commit().await.map_err(classify)
    }

    async fn data_planes(&self, since: i64) -> Result<Vec<DataPlaneRow>, BackendError> {
        Self::q_data_planes(&mut *self.pool.acquire().await.map_err(classify)?, since).await
    }
}
