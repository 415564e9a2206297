//! The shared backend: PostgreSQL, for several control-plane replicas. Writes are serialised by a compare-and-set
//! on the one store-wide revision row; each commit sends `NOTIFY fhirgw_store` so the other replicas reload within
//! milliseconds (the caller's periodic poll covers a missed notification). Migrations run under an advisory lock,
//! so replicas starting together apply them once.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{PgConnection, PgPool, Row};
use tokio::sync::Mutex;

use super::backend::{AuditQuery, AuditRecord, Backend, BackendError, DataPlaneRow, classify, from_sql, to_sql};
use super::common::shared_queries;
use crate::objects::{ObjKind, Object, Objects};

/// The channel every commit notifies.
const CHANNEL: &str = "fhirgw_store";
/// `pg_advisory_xact_lock` key for migrations ("fhirgw" in ASCII).
const MIGRATION_LOCK: i64 = 0x0000_6668_6972_6777;

/// Ordered schema migrations; `fhirgw_schema.version` records how many have run.
const MIGRATIONS: &[&str] = &["CREATE TABLE objects (
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        body BYTEA NOT NULL,
        revision BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        PRIMARY KEY (kind, name)
    );
    CREATE TABLE store_revision (id INTEGER PRIMARY KEY CHECK (id = 1), value BIGINT NOT NULL);
    INSERT INTO store_revision (id, value) VALUES (1, 0);
    CREATE TABLE audit (
        revision BIGINT PRIMARY KEY,
        at BIGINT NOT NULL,
        actor TEXT NOT NULL,
        op TEXT NOT NULL,
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        body BYTEA,
        replica TEXT NOT NULL DEFAULT '',
        version_before BIGINT
    );
    CREATE INDEX audit_at ON audit (at);
    CREATE TABLE store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE data_planes (
        replica TEXT NOT NULL,
        stream TEXT NOT NULL,
        node_id TEXT NOT NULL,
        known_digest TEXT NOT NULL,
        subscribed TEXT NOT NULL,
        status BYTEA NOT NULL,
        heartbeat_at BIGINT NOT NULL,
        PRIMARY KEY (replica, stream)
    );"];

pub struct PostgresBackend {
    pool: PgPool,
    describe: String,
    store_id: String,
    /// The LISTEN connection; `None` after it was lost, until the next wait reconnects it.
    listener: Mutex<Option<PgListener>>,
}

shared_queries!(PostgresBackend, PgConnection);

impl PostgresBackend {
    /// `url`: a `postgres://` URL; `password` overrides the URL's (and `PGPASSWORD`, which sqlx reads).
    pub async fn open(url: &str, password: Option<&str>, replica: &str) -> Result<Self, BackendError> {
        let mut options: PgConnectOptions =
            url.parse().map_err(|e| BackendError::Other(format!("bad PostgreSQL URL: {e}")))?;
        if let Some(password) = password {
            options = options.password(password);
        }
        // A query that hangs (a partitioned database) must not hold an admin call: the write fails UNAVAILABLE.
        options =
            options.application_name(&format!("fhirgw-controlplane {replica}")).options([("statement_timeout", "10s")]);
        let describe = format!(
            "postgres://{}:{}/{}",
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or_default()
        );
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(3))
            .connect_with(options)
            .await
            .map_err(classify)?;
        let store_id = migrate(&pool).await?;
        Ok(PostgresBackend { pool, describe, store_id, listener: Mutex::new(None) })
    }
}

/// Runs the missing migrations and creates the store identity in one transaction, under an advisory lock: replicas
/// starting at once wait for the first, then find nothing left to do.
async fn migrate(pool: &PgPool) -> Result<String, BackendError> {
    let mut tx = pool.begin().await.map_err(classify)?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(MIGRATION_LOCK).execute(&mut *tx).await.map_err(classify)?;
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS fhirgw_schema (version INTEGER NOT NULL)")
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
    let applied: i64 = sqlx::query("SELECT COALESCE(MAX(version), 0)::BIGINT FROM fhirgw_schema")
        .fetch_one(&mut *tx)
        .await
        .map_err(classify)?
        .try_get(0)
        .map_err(classify)?;
    let applied = usize::try_from(applied).unwrap_or(0);
    if applied > MIGRATIONS.len() {
        return Err(BackendError::Corrupt(format!(
            "store schema version {applied} is newer than this control plane understands ({})",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        sqlx::raw_sql(sql).execute(&mut *tx).await.map_err(classify)?;
        sqlx::query("INSERT INTO fhirgw_schema (version) VALUES ($1)")
            .bind(i32::try_from(i + 1).unwrap_or(i32::MAX))
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
    }
    let store_id = PostgresBackend::q_store_id(&mut tx).await?;
    tx.commit().await.map_err(classify)?;
    Ok(store_id)
}

#[tonic::async_trait]
impl Backend for PostgresBackend {
    fn store_id(&self) -> &str {
        &self.store_id
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn is_shared(&self) -> bool {
        true
    }

    async fn load(&self) -> Result<(u64, Objects), BackendError> {
        // One snapshot for both reads: the revision and the objects agree.
        let mut tx = self.pool.begin().await.map_err(classify)?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
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
        // Delivered to listeners when (and only if) the transaction commits.
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(record.revision.to_string())
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        Ok(true)
    }

    async fn changes_since(&self, revision: u64, limit: u32) -> Result<Vec<AuditRecord>, BackendError> {
        Self::q_changes_since(&mut *self.pool.acquire().await.map_err(classify)?, revision, limit).await
    }

    async fn wait_for_change(&self, poll: Duration) {
        let mut guard = self.listener.lock().await;
        let Some(listener) = guard.as_mut() else {
            match listen(&self.pool).await {
                // Just (re)connected: return, so the caller catches up on whatever it missed meanwhile.
                Ok(listener) => *guard = Some(listener),
                Err(e) => {
                    tracing::debug!(error = %e, "LISTEN connection failed; polling");
                    tokio::time::sleep(poll).await;
                }
            }
            return;
        };
        match tokio::time::timeout(poll, listener.try_recv()).await {
            Ok(Ok(Some(_))) | Err(_) => {}
            // The connection was lost: notifications may have been missed; reconnect on the next wait.
            Ok(Ok(None)) | Ok(Err(_)) => *guard = None,
        }
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

async fn listen(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.eager_reconnect(false);
    listener.listen(CHANNEL).await?;
    Ok(listener)
}
