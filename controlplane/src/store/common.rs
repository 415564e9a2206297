//! The SQL both backends share. Placeholders are `$N`, which PostgreSQL and (through sqlx) SQLite both accept; the
//! macro instantiates the same queries for each driver's connection type, so no generic bounds leak anywhere.

/// Defines the shared queries as associated functions of `$backend`, on `&mut $conn`.
macro_rules! shared_queries {
    ($backend:ty, $conn:ty) => {
        impl $backend {
            async fn q_revision(conn: &mut $conn) -> Result<u64, BackendError> {
                let row = sqlx::query("SELECT value FROM store_revision WHERE id = 1")
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(classify)?;
                Ok(from_sql(row.try_get(0).map_err(classify)?))
            }

            async fn q_objects(conn: &mut $conn) -> Result<Objects, BackendError> {
                let rows = sqlx::query("SELECT kind, name, body, revision, updated_at FROM objects")
                    .fetch_all(&mut *conn)
                    .await
                    .map_err(classify)?;
                let mut objects = Objects::new();
                for row in rows {
                    let kind: String = row.try_get(0).map_err(classify)?;
                    let kind: ObjKind = kind.parse().map_err(BackendError::Corrupt)?;
                    let name: String = row.try_get(1).map_err(classify)?;
                    let body: Vec<u8> = row.try_get(2).map_err(classify)?;
                    let revision: i64 = row.try_get(3).map_err(classify)?;
                    let updated_at: i64 = row.try_get(4).map_err(classify)?;
                    objects.insert((kind, name), Object { body, revision: from_sql(revision), updated_at });
                }
                Ok(objects)
            }

            /// The write itself, inside the caller's transaction: the store-wide compare-and-set first, so a
            /// writer that lost the race writes nothing.
            async fn q_write(conn: &mut $conn, r: &AuditRecord) -> Result<bool, BackendError> {
                let rev = to_sql(r.revision)?;
                let cas = sqlx::query("UPDATE store_revision SET value = $1 WHERE id = 1 AND value = $2")
                    .bind(rev)
                    .bind(rev - 1)
                    .execute(&mut *conn)
                    .await
                    .map_err(classify)?;
                if cas.rows_affected() != 1 {
                    return Ok(false);
                }
                match &r.body {
                    Some(body) => {
                        sqlx::query(
                            "INSERT INTO objects (kind, name, body, revision, updated_at) VALUES ($1, $2, $3, $4, $5)
                             ON CONFLICT (kind, name) DO UPDATE SET body = excluded.body,
                             revision = excluded.revision, updated_at = excluded.updated_at",
                        )
                        .bind(&r.kind)
                        .bind(&r.name)
                        .bind(body)
                        .bind(rev)
                        .bind(r.at)
                        .execute(&mut *conn)
                        .await
                        .map_err(classify)?;
                    }
                    None => {
                        sqlx::query("DELETE FROM objects WHERE kind = $1 AND name = $2")
                            .bind(&r.kind)
                            .bind(&r.name)
                            .execute(&mut *conn)
                            .await
                            .map_err(classify)?;
                    }
                }
                let before = r.version_before.map(to_sql).transpose()?;
                sqlx::query(
                    "INSERT INTO audit (revision, at, actor, op, kind, name, body, replica, version_before)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                )
                .bind(rev)
                .bind(r.at)
                .bind(&r.actor)
                .bind(&r.op)
                .bind(&r.kind)
                .bind(&r.name)
                .bind(r.body.as_deref())
                .bind(&r.replica)
                .bind(before)
                .execute(&mut *conn)
                .await
                .map_err(classify)?;
                Ok(true)
            }

            async fn q_changes_since(
                conn: &mut $conn,
                revision: u64,
                limit: u32,
            ) -> Result<Vec<AuditRecord>, BackendError> {
                let rows = sqlx::query(
                    "SELECT revision, at, actor, replica, op, kind, name, body, version_before FROM audit
                     WHERE revision > $1 ORDER BY revision LIMIT $2",
                )
                .bind(to_sql(revision)?)
                .bind(i64::from(limit))
                .fetch_all(&mut *conn)
                .await
                .map_err(classify)?;
                rows.iter().map(Self::audit_row).collect()
            }

            async fn q_list_audit(conn: &mut $conn, q: &AuditQuery) -> Result<Vec<AuditRecord>, BackendError> {
                let rows = sqlx::query(
                    "SELECT revision, at, actor, replica, op, kind, name, body, version_before FROM audit
                     WHERE ($1 = '' OR kind = $1) AND ($2 = '' OR name = $2) AND ($3 = '' OR actor = $3)
                       AND at >= $4 AND at < $5 AND revision < $6
                     ORDER BY revision DESC LIMIT $7",
                )
                .bind(&q.kind)
                .bind(&q.name)
                .bind(&q.actor)
                .bind(q.since.unwrap_or(i64::MIN))
                .bind(q.until.unwrap_or(i64::MAX))
                .bind(q.before_revision.map(to_sql).transpose()?.unwrap_or(i64::MAX))
                .bind(i64::from(q.limit))
                .fetch_all(&mut *conn)
                .await
                .map_err(classify)?;
                rows.iter().map(Self::audit_row).collect()
            }

            fn audit_row(row: &<<$conn as sqlx::Connection>::Database as sqlx::Database>::Row) -> Result<AuditRecord, BackendError> {
                let revision: i64 = row.try_get(0).map_err(classify)?;
                let before: Option<i64> = row.try_get(8).map_err(classify)?;
                Ok(AuditRecord {
                    revision: from_sql(revision),
                    at: row.try_get(1).map_err(classify)?,
                    actor: row.try_get(2).map_err(classify)?,
                    replica: row.try_get(3).map_err(classify)?,
                    op: row.try_get(4).map_err(classify)?,
                    kind: row.try_get(5).map_err(classify)?,
                    name: row.try_get(6).map_err(classify)?,
                    body: row.try_get(7).map_err(classify)?,
                    version_before: before.map(from_sql),
                })
            }

            /// Reads the store's identity, creating it if the store has none yet (a new store, or one made by a
            /// control plane from before identities).
            async fn q_store_id(conn: &mut $conn) -> Result<String, BackendError> {
                sqlx::query("INSERT INTO store_meta (key, value) VALUES ('store_id', $1) ON CONFLICT (key) DO NOTHING")
                    .bind(super::new_store_id())
                    .execute(&mut *conn)
                    .await
                    .map_err(classify)?;
                let row = sqlx::query("SELECT value FROM store_meta WHERE key = 'store_id'")
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(classify)?;
                row.try_get(0).map_err(classify)
            }

            async fn q_publish(conn: &mut $conn, replica: &str, rows: &[DataPlaneRow]) -> Result<(), BackendError> {
                sqlx::query("DELETE FROM data_planes WHERE replica = $1")
                    .bind(replica)
                    .execute(&mut *conn)
                    .await
                    .map_err(classify)?;
                for r in rows {
                    sqlx::query(
                        "INSERT INTO data_planes (replica, stream, node_id, known_digest, subscribed, status, heartbeat_at)
                         VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    )
                    .bind(&r.replica)
                    .bind(&r.stream)
                    .bind(&r.node_id)
                    .bind(&r.known_digest)
                    .bind(&r.subscribed)
                    .bind(&r.status)
                    .bind(r.heartbeat_at)
                    .execute(&mut *conn)
                    .await
                    .map_err(classify)?;
                }
                Ok(())
            }

            async fn q_data_planes(conn: &mut $conn, since: i64) -> Result<Vec<DataPlaneRow>, BackendError> {
                sqlx::query("DELETE FROM data_planes WHERE heartbeat_at < $1")
                    .bind(since)
                    .execute(&mut *conn)
                    .await
                    .map_err(classify)?;
                let rows = sqlx::query(
                    "SELECT replica, stream, node_id, known_digest, subscribed, status, heartbeat_at FROM data_planes",
                )
                .fetch_all(&mut *conn)
                .await
                .map_err(classify)?;
                rows.iter()
                    .map(|row| {
                        Ok(DataPlaneRow {
                            replica: row.try_get(0).map_err(classify)?,
                            stream: row.try_get(1).map_err(classify)?,
                            node_id: row.try_get(2).map_err(classify)?,
                            known_digest: row.try_get(3).map_err(classify)?,
                            subscribed: row.try_get(4).map_err(classify)?,
                            status: row.try_get(5).map_err(classify)?,
                            heartbeat_at: row.try_get(6).map_err(classify)?,
                        })
                    })
                    .collect()
            }
        }
    };
}

pub(crate) use shared_queries;
