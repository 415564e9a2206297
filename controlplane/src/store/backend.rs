//! The storage backend behind [`Store`](super::Store): the few operations the control plane needs from a database.
//! Nothing here names a driver type; SQLite (`sqlite.rs`) and PostgreSQL (`postgres.rs`) implement it with sqlx.

use std::time::Duration;

use crate::objects::Objects;

/// A backend failure, with no driver type in it.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The database cannot be reached (or answered too late): retry later; nothing was written.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Anything else the database said: a bug or a damaged store.
    #[error("store: {0}")]
    Other(String),
    /// Another process holds the store (an embedded store has exactly one control plane).
    #[error("{0}")]
    Locked(String),
    /// The store holds data this control plane cannot read.
    #[error("store holds invalid data: {0}")]
    Corrupt(String),
}

/// One write as the audit log records it (and as replicas replay it).
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    /// The store revision this write made.
    pub revision: u64,
    /// Unix milliseconds.
    pub at: i64,
    /// The operator's name (never a token).
    pub actor: String,
    /// The control-plane replica that took the write.
    pub replica: String,
    /// `put` or `delete`.
    pub op: String,
    pub kind: String,
    pub name: String,
    /// The stored body (puts only).
    pub body: Option<Vec<u8>>,
    /// Revision of the object before the write; `None` when it did not exist.
    pub version_before: Option<u64>,
}

/// Filters of `ListAudit`; empty strings and `None` match everything. Newest first.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub kind: String,
    pub name: String,
    pub actor: String,
    /// Unix milliseconds, inclusive.
    pub since: Option<i64>,
    /// Unix milliseconds, exclusive.
    pub until: Option<i64>,
    /// Only records older than this revision (the page token).
    pub before_revision: Option<u64>,
    pub limit: u32,
}

/// One connected data plane as a replica publishes it for the others' `GetStatus`.
#[derive(Debug, Clone, PartialEq)]
pub struct DataPlaneRow {
    pub replica: String,
    /// The stream's id within its replica.
    pub stream: String,
    pub node_id: String,
    /// Digest of what the data plane holds, for the kinds it subscribed to.
    pub known_digest: String,
    /// The kinds it subscribed to, as their `ResourceKind` numbers, comma separated.
    pub subscribed: String,
    /// Encoded `fhirgw.admin.v1.DataPlaneStatus`, as the owning replica last computed it (a data plane that left:
    /// `stream` is `departed/<id>`, this a `DisconnectedDataPlane`, and `heartbeat_at` when it left).
    pub status: Vec<u8>,
    /// Unix milliseconds of the owning replica's last heartbeat.
    pub heartbeat_at: i64,
}

#[tonic::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// The store's identity: created with the store, never changed, shared by every replica on it.
    fn store_id(&self) -> &str;

    /// What the store is, for logs (never a password).
    fn describe(&self) -> String;

    /// Whether several control planes may share the store (an embedded store has exactly one).
    fn is_shared(&self) -> bool;

    /// The whole store at one revision.
    async fn load(&self) -> Result<(u64, Objects), BackendError>;

    /// The store-wide revision.
    async fn revision(&self) -> Result<u64, BackendError>;

    /// Commits one write and its audit record, only if the store is still at `record.revision - 1` (the
    /// store-wide optimistic-concurrency check). `Ok(false)`: another writer got there first; nothing was written.
    async fn commit(&self, record: &AuditRecord) -> Result<bool, BackendError>;

    /// The writes after `revision`, oldest first, at most `limit`.
    async fn changes_since(&self, revision: u64, limit: u32) -> Result<Vec<AuditRecord>, BackendError>;

    /// Returns when another replica may have written, or after `poll` at the latest.
    async fn wait_for_change(&self, poll: Duration);

    async fn list_audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, BackendError>;

    /// Replaces `replica`'s published data planes with `rows`.
    async fn publish_data_planes(&self, replica: &str, rows: &[DataPlaneRow]) -> Result<(), BackendError>;

    /// Every replica's published data planes heartbeated at or after `since` (Unix milliseconds); older rows are
    /// deleted.
    async fn data_planes(&self, since: i64) -> Result<Vec<DataPlaneRow>, BackendError>;
}

/// Classifies a driver error: lost or refused connections and timeouts are `Unavailable`.
pub(crate) fn classify(e: sqlx::Error) -> BackendError {
    use sqlx::Error as E;
    match &e {
        E::Io(_) | E::PoolTimedOut | E::PoolClosed | E::Tls(_) | E::WorkerCrashed => {
            BackendError::Unavailable(e.to_string())
        }
        // PostgreSQL: connection exceptions (08), operator intervention (57: shutdown, cannot connect now),
        // insufficient resources (53); SQLite: busy / locked past the busy timeout.
        E::Database(db) => match db.code().as_deref() {
            Some(code) if code.starts_with("08") || code.starts_with("57") || code.starts_with("53") => {
                BackendError::Unavailable(e.to_string())
            }
            Some("5" | "6" | "261" | "517") => BackendError::Unavailable(e.to_string()),
            _ => BackendError::Other(e.to_string()),
        },
        _ => BackendError::Other(e.to_string()),
    }
}

/// Store revisions are `u64` in the model and `BIGINT` in SQL.
pub(crate) fn to_sql(v: u64) -> Result<i64, BackendError> {
    i64::try_from(v).map_err(|_| BackendError::Corrupt("revision overflow".into()))
}

pub(crate) fn from_sql(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}
