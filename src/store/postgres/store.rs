//! The `Store` methods of the PostgreSQL store; each does what the method of the same name
//! in `../sqlite/mod.rs` does, and the conformance suite (`../tests.rs`) holds both to it.

use async_trait::async_trait;
use sqlx::{PgConnection, Row};

use super::rows::*;
use super::tables::{update_row, UPDATE_COLUMNS};
use super::*;

/// The condition of an [`InvocationFilter`], on parameters 1 to 6 (see `filtered`).
const FILTER: &str = "($1::TEXT IS NULL OR service = $1) AND ($2::TEXT IS NULL OR handler = $2) \
     AND ($3::TEXT IS NULL OR status = $3) AND ($4::TEXT IS NULL OR deployment_id = $4) \
     AND ($5::BIGINT IS NULL OR created_at_ms < $5) AND (NOT $6 OR workflow_id IS NOT NULL)";

/// `sql` (which uses [`FILTER`], then `LIMIT $7`) with the filter's parameters and `limit`.
fn filtered<'q>(
    sql: &'q str,
    filter: &InvocationFilter,
    limit: u32,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(sql)
        .bind(filter.service.clone())
        .bind(filter.handler.clone())
        .bind(filter.status.map(Status::as_str))
        .bind(filter.deployment_id.clone())
        .bind(filter.created_before_ms)
        .bind(filter.workflows_only)
        .bind(i64::from(limit))
}

/// The `(name, count)` rows of a counting query.
async fn counts(conn: &mut PgConnection, sql: &str) -> StoreResult<Vec<(String, u64)>> {
    let rows = sqlx::query(sql).fetch_all(conn).await.map_err(backend)?;
    rows.iter()
        .map(|row| {
            let count: i64 = get(row, 1)?;
            Ok((get(row, 0)?, count.max(0) as u64))
        })
        .collect()
}

#[async_trait]
impl Store for PostgresStore {
    async fn transact(&self, key: &str, rule: TxFn) -> StoreResult<TxOutput> {
        let lease = self.lease.clone();
        self.write(key, move |conn| {
            Box::pin(async move {
                let mut tx = super::tables::PgTx { conn, lease };
                rule(&mut tx).await
            })
        })
        .await
    }

    fn journal_limits(&self) -> JournalLimits {
        self.limits
    }

    async fn register_deployment(
        &self,
        new: NewDeployment,
    ) -> StoreResult<(DeploymentRecord, bool)> {
        let key = new.url.clone();
        self.write(&key, move |conn| {
            Box::pin(async move {
                // One registration of a URL at a time, on every node.
                sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
                    .bind(&new.url)
                    .execute(&mut *conn)
                    .await
                    .map_err(backend)?;
                if let Some(record) = latest_deployment(conn, &new.url).await? {
                    if record.services == new.services && record.protocol == new.protocol {
                        return Ok((record, false));
                    }
                }
                let id = crate::ids::new_deployment_id();
                sqlx::query(
                    "INSERT INTO deployments (id, url, protocol, services, created_at_ms) \
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(&id)
                .bind(&new.url)
                .bind(new.protocol.to_text())
                .bind(to_json(&new.services)?)
                .bind(new.now_ms)
                .execute(&mut *conn)
                .await
                .map_err(backend)?;
                for service in &new.services {
                    for handler in &service.handlers {
                        sqlx::query(
                            "INSERT INTO handlers (deployment_id, service, handler, spec) \
                             VALUES ($1, $2, $3, $4)",
                        )
                        .bind(&id)
                        .bind(&service.name)
                        .bind(&handler.name)
                        .bind(to_json(handler)?)
                        .execute(&mut *conn)
                        .await
                        .map_err(backend)?;
                    }
                }
                let record = DeploymentRecord {
                    id,
                    url: new.url,
                    protocol: new.protocol,
                    services: new.services,
                    created_at_ms: new.now_ms,
                };
                Ok((record, true))
            })
        })
        .await
    }

    async fn list_deployments(&self) -> StoreResult<Vec<DeploymentRecord>> {
        let mut conn = self.reader().await?;
        let conn: &mut PgConnection = &mut conn;
        let sql = format!("SELECT {DEPLOYMENT_COLUMNS} FROM deployments ORDER BY id");
        let rows = sqlx::query(&sql).fetch_all(conn).await.map_err(backend)?;
        rows.iter().map(deployment).collect()
    }

    async fn latest_handler(
        &self,
        service: &str,
        handler: &str,
    ) -> StoreResult<Option<HandlerTarget>> {
        let mut conn = self.reader().await?;
        let conn: &mut PgConnection = &mut conn;
        let sql = format!(
            "{TARGET_SELECT} WHERE h.service = $1 AND h.handler = $2 \
                 ORDER BY h.deployment_id DESC LIMIT 1"
        );
        let row = sqlx::query(&sql)
            .bind(service)
            .bind(handler)
            .fetch_optional(conn)
            .await
            .map_err(backend)?;
        row.as_ref().map(target).transpose()
    }

    async fn deployment_handler(
        &self,
        deployment_id: &str,
        service: &str,
        handler: &str,
    ) -> StoreResult<Option<HandlerTarget>> {
        let mut conn = self.reader().await?;
        let conn: &mut PgConnection = &mut conn;
        let sql = format!(
            "{TARGET_SELECT} WHERE h.deployment_id = $1 AND h.service = $2 \
                 AND h.handler = $3"
        );
        let row = sqlx::query(&sql)
            .bind(deployment_id)
            .bind(service)
            .bind(handler)
            .fetch_optional(conn)
            .await
            .map_err(backend)?;
        row.as_ref().map(target).transpose()
    }

    async fn get_invocation(&self, id: &InvocationId) -> StoreResult<Option<InvocationRecord>> {
        fetch_invocation(&mut *self.reader().await?, id.as_str()).await
    }

    async fn read_journal(&self, id: &InvocationId) -> StoreResult<Vec<StoredEntry>> {
        let mut conn = self.reader().await?;
        let conn: &mut PgConnection = &mut conn;
        let sql = format!("{ENTRY_SELECT} WHERE j.invocation_id = $1 ORDER BY j.idx");
        let rows = sqlx::query(&sql)
            .bind(id.as_str())
            .fetch_all(conn)
            .await
            .map_err(backend)?;
        rows.iter().map(entry).collect()
    }

    async fn read_entry(&self, id: &InvocationId, index: u32) -> StoreResult<Option<StoredEntry>> {
        read_entry(&mut *self.reader().await?, id.as_str(), index).await
    }

    async fn list_invocations(
        &self,
        filter: InvocationFilter,
        limit: u32,
    ) -> StoreResult<Vec<InvocationRecord>> {
        let mut conn = self.reader().await?;
        let conn: &mut PgConnection = &mut conn;
        let sql = format!(
            "SELECT {INVOCATION_COLUMNS} FROM invocations WHERE {FILTER} \
                 ORDER BY id DESC LIMIT $7"
        );
        let rows = filtered(&sql, &filter, limit)
            .fetch_all(conn)
            .await
            .map_err(backend)?;
        rows.iter().map(invocation).collect()
    }

    async fn recover_running(&self, now_ms: i64) -> StoreResult<u64> {
        let owner = self.lease.owner.clone();
        self.write("recover", move |conn| {
            Box::pin(async move {
                // This node's previous life's attempts, and those running before leases
                // (no owner); other nodes' are theirs until their leases expire.
                let done = sqlx::query(
                    "UPDATE invocations SET status = 'pending', next_run_at_ms = $1, \
                     modified_at_ms = $1 WHERE status = 'running' \
                     AND (lease_owner = $2 OR lease_owner IS NULL)",
                )
                .bind(now_ms)
                .bind(&*owner)
                .execute(conn)
                .await
                .map_err(backend)?;
                Ok(done.rows_affected())
            })
        })
        .await
    }

    async fn next_due(&self) -> StoreResult<Option<i64>> {
        let mut conn = self.reader().await?;
        let conn: &mut PgConnection = &mut conn;
        sqlx::query(
            "SELECT MIN(next_run_at_ms) FROM invocations \
                 WHERE next_run_at_ms IS NOT NULL \
                 AND status IN ('pending', 'backing-off', 'suspended')",
        )
        .fetch_one(conn)
        .await
        .map_err(backend)?
        .try_get(0)
        .map_err(backend)
    }

    async fn find_workflow(
        &self,
        workflow: &str,
        workflow_id: &str,
    ) -> StoreResult<Option<InvocationRecord>> {
        let mut conn = self.reader().await?;
        let conn: &mut PgConnection = &mut conn;
        let sql = format!(
            "SELECT {INVOCATION_COLUMNS} FROM invocations WHERE id = \
                 (SELECT invocation_id FROM workflows WHERE workflow = $1 \
                 AND workflow_id = $2)"
        );
        let row = sqlx::query(&sql)
            .bind(workflow)
            .bind(workflow_id)
            .fetch_optional(conn)
            .await
            .map_err(backend)?;
        row.as_ref().map(invocation).transpose()
    }

    async fn workflow_runs(
        &self,
        workflow: &str,
        workflow_id: &str,
    ) -> StoreResult<Vec<InvocationRecord>> {
        let mut conn = self.reader().await?;
        let conn: &mut PgConnection = &mut conn;
        let sql = format!(
            "SELECT {INVOCATION_COLUMNS} FROM invocations \
                 WHERE service = $1 AND workflow_id = $2 ORDER BY id"
        );
        let rows = sqlx::query(&sql)
            .bind(workflow)
            .bind(workflow_id)
            .fetch_all(conn)
            .await
            .map_err(backend)?;
        rows.iter().map(invocation).collect()
    }

    async fn unconsumed_signals(&self, id: &InvocationId) -> StoreResult<Vec<(u32, String)>> {
        let mut conn = self.reader().await?;
        let rows = sqlx::query(
            "SELECT seq, name FROM signals WHERE invocation_id = $1 \
             AND consumed_by IS NULL ORDER BY seq",
        )
        .bind(id.as_str())
        .fetch_all(&mut *conn)
        .await
        .map_err(backend)?;
        rows.iter()
            .map(|row| Ok((get_u32(row, 0)?, get(row, 1)?)))
            .collect()
    }

    async fn read_state(&self, id: &InvocationId) -> StoreResult<Vec<(String, Option<Vec<u8>>)>> {
        let mut conn = self.reader().await?;
        let conn: &mut PgConnection = &mut conn;
        let rows =
            sqlx::query("SELECT key, value FROM state WHERE invocation_id = $1 ORDER BY key")
                .bind(id.as_str())
                .fetch_all(conn)
                .await
                .map_err(backend)?;
        rows.iter()
            .map(|row| Ok((get(row, 0)?, get(row, 1)?)))
            .collect()
    }

    async fn gateway_secret(&self, name: &str) -> StoreResult<Vec<u8>> {
        let name = name.to_owned();
        self.write(&name.clone(), move |conn| {
            Box::pin(async move {
                let fresh: Vec<u8> = (0..2)
                    .flat_map(|_| *uuid::Uuid::new_v4().as_bytes())
                    .collect();
                sqlx::query(
                    "INSERT INTO gateway_secrets (name, secret) VALUES ($1, $2) \
                     ON CONFLICT (name) DO NOTHING",
                )
                .bind(&name)
                .bind(fresh)
                .execute(&mut *conn)
                .await
                .map_err(backend)?;
                sqlx::query("SELECT secret FROM gateway_secrets WHERE name = $1")
                    .bind(&name)
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(backend)?
                    .try_get(0)
                    .map_err(backend)
            })
        })
        .await
    }

    async fn heartbeat_details(&self, id: &InvocationId) -> StoreResult<Option<Vec<u8>>> {
        let mut conn = self.reader().await?;
        let conn: &mut PgConnection = &mut conn;
        let row = sqlx::query("SELECT heartbeat_details FROM invocations WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(conn)
            .await
            .map_err(backend)?;
        Ok(match row {
            Some(row) => get(&row, 0)?,
            None => None,
        })
    }

    async fn get_update(&self, run: &InvocationId, id: &str) -> StoreResult<Option<UpdateRecord>> {
        get_update(&mut *self.reader().await?, run.as_str(), id).await
    }

    async fn pending_updates(
        &self,
        run: &InvocationId,
    ) -> StoreResult<Vec<durin_protocol::PendingUpdate>> {
        let mut conn = self.reader().await?;
        let conn: &mut PgConnection = &mut conn;
        let rows = sqlx::query(
            "SELECT id, name, input FROM updates WHERE invocation_id = $1 \
                 AND status = 'pending' ORDER BY created_at_ms, id",
        )
        .bind(run.as_str())
        .fetch_all(conn)
        .await
        .map_err(backend)?;
        rows.iter()
            .map(|row| {
                let input: Vec<u8> = get(row, 2)?;
                Ok(durin_protocol::PendingUpdate {
                    id: get(row, 0)?,
                    name: get(row, 1)?,
                    input: serde_json::from_slice(&input).unwrap_or_default(),
                })
            })
            .collect()
    }

    async fn resume(
        &self,
        id: &InvocationId,
        deployment_id: Option<String>,
        now_ms: i64,
    ) -> StoreResult<Option<InvocationRecord>> {
        let id = id.clone();
        self.write(&id.to_string(), move |conn| {
            Box::pin(async move {
                let sql = format!(
                    "UPDATE invocations SET status = 'pending', next_run_at_ms = $1, \
                     modified_at_ms = $1, deployment_id = COALESCE($2, deployment_id), \
                     failures = 0, position_failures = 0 \
                     WHERE id = $3 AND status = 'paused' RETURNING {INVOCATION_COLUMNS}"
                );
                let row = sqlx::query(&sql)
                    .bind(now_ms)
                    .bind(deployment_id)
                    .bind(id.as_str())
                    .fetch_optional(conn)
                    .await
                    .map_err(backend)?;
                row.as_ref().map(invocation).transpose()
            })
        })
        .await
    }

    async fn pause(
        &self,
        id: &InvocationId,
        reason: String,
        now_ms: i64,
    ) -> StoreResult<(InvocationRecord, bool)> {
        let id = id.clone();
        self.write(&id.to_string(), move |conn| {
            Box::pin(async move {
                let sql = format!(
                    "UPDATE invocations SET status = 'paused', last_error = $1, \
                     next_run_at_ms = NULL, waiting_for = NULL, modified_at_ms = $2 \
                     WHERE id = $3 AND status IN ('pending', 'running', 'backing-off', \
                     'suspended') RETURNING {INVOCATION_COLUMNS}"
                );
                let changed = sqlx::query(&sql)
                    .bind(reason)
                    .bind(now_ms)
                    .bind(id.as_str())
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(backend)?;
                changed_or_current(conn, id.as_str(), changed).await
            })
        })
        .await
    }

    async fn retry_now(
        &self,
        id: &InvocationId,
        now_ms: i64,
    ) -> StoreResult<(InvocationRecord, bool)> {
        let id = id.clone();
        self.write(&id.to_string(), move |conn| {
            Box::pin(async move {
                let sql = format!(
                    "UPDATE invocations SET next_run_at_ms = $1, modified_at_ms = $1 \
                     WHERE id = $2 AND status = 'backing-off' RETURNING {INVOCATION_COLUMNS}"
                );
                let changed = sqlx::query(&sql)
                    .bind(now_ms)
                    .bind(id.as_str())
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(backend)?;
                changed_or_current(conn, id.as_str(), changed).await
            })
        })
        .await
    }

    async fn purge(&self, id: &InvocationId) -> StoreResult<bool> {
        let id = id.clone();
        self.write(&id.to_string(), move |conn| {
            Box::pin(async move {
                let ended = lock_invocation(conn, id.as_str())
                    .await?
                    .ok_or_else(|| StoreError::NotFound(id.to_string()))?
                    .completed_at_ms
                    .is_some();
                if ended {
                    delete_invocation(conn, id.as_str()).await?;
                }
                Ok(ended)
            })
        })
        .await
    }

    async fn select_invocations(
        &self,
        filter: InvocationFilter,
        limit: u32,
    ) -> StoreResult<Vec<InvocationId>> {
        let mut conn = self.reader().await?;
        let conn: &mut PgConnection = &mut conn;
        let sql = format!("SELECT id FROM invocations WHERE {FILTER} ORDER BY id LIMIT $7");
        let rows = filtered(&sql, &filter, limit)
            .fetch_all(conn)
            .await
            .map_err(backend)?;
        rows.iter()
            .map(|row| InvocationId::parse(&get::<String>(row, 0)?).map_err(corrupt))
            .collect()
    }

    async fn count_unfinished(&self) -> StoreResult<Vec<(String, u64)>> {
        let mut conn = self.reader().await?;
        counts(
            &mut conn,
            "SELECT status, COUNT(*) FROM invocations WHERE completed_at_ms IS NULL \
                 GROUP BY status",
        )
        .await
    }

    async fn count_waiting(&self) -> StoreResult<Vec<(String, u64)>> {
        let mut conn = self.reader().await?;
        counts(
            &mut conn,
            "SELECT j.kind, COUNT(DISTINCT i.id) FROM invocations i \
                 CROSS JOIN LATERAL jsonb_array_elements_text(i.waiting_for::jsonb) w(idx) \
                 JOIN journal j ON j.invocation_id = i.id AND j.idx = w.idx::BIGINT \
                 WHERE i.status = 'suspended' GROUP BY j.kind \
                 UNION ALL \
                 SELECT 'none', COUNT(*) FROM invocations WHERE status = 'suspended' \
                 AND (waiting_for IS NULL OR jsonb_array_length(waiting_for::jsonb) = 0)",
        )
        .await
    }

    async fn ping(&self) -> StoreResult<()> {
        let mut conn = self.reader().await?;
        let conn: &mut PgConnection = &mut conn;
        sqlx::query("SELECT 1")
            .execute(conn)
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn purge_ended(&self, ended_before_ms: i64, limit: u32) -> StoreResult<u64> {
        self.write("purge", move |conn| {
            Box::pin(async move {
                let ended = sqlx::query(
                    "SELECT id FROM invocations WHERE completed_at_ms IS NOT NULL \
                     AND completed_at_ms < $1 ORDER BY completed_at_ms LIMIT $2 \
                     FOR UPDATE SKIP LOCKED",
                )
                .bind(ended_before_ms)
                .bind(i64::from(limit))
                .fetch_all(&mut *conn)
                .await
                .map_err(backend)?;
                for row in &ended {
                    let id: String = get(row, 0)?;
                    delete_invocation(conn, &id).await?;
                }
                Ok(ended.len() as u64)
            })
        })
        .await
    }

    fn shared(&self) -> bool {
        true
    }

    fn broadcast(&self, event: ClusterEvent) {
        self.notifications.broadcast(&event);
    }

    fn cluster_events(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<ClusterEvent>> {
        self.notifications.events()
    }

    fn lease_held(&self) -> bool {
        self.renewals.held()
    }

    fn database_clock(&self) -> Option<std::sync::Arc<dyn crate::clock::Clock>> {
        Some(self.clock.clone())
    }

    async fn purge_idempotency_keys(&self, now_ms: i64) -> StoreResult<u64> {
        self.write("purge", move |conn| {
            Box::pin(async move {
                let done = sqlx::query("DELETE FROM idempotency_keys WHERE expires_at_ms <= $1")
                    .bind(now_ms)
                    .execute(conn)
                    .await
                    .map_err(backend)?;
                Ok(done.rows_affected())
            })
        })
        .await
    }

    async fn take_occurrence(
        &self,
        id: &InvocationId,
        attempt: u32,
        identity: &str,
    ) -> StoreResult<Option<u32>> {
        let (id, identity) = (id.clone(), identity.to_owned());
        self.write(&id.to_string(), move |conn| {
            Box::pin(async move {
                super::egress::take_occurrence(conn, id.as_str(), attempt, &identity)
                    .await
                    .map(Some)
            })
        })
        .await
    }

    async fn give_back_occurrence(
        &self,
        id: &InvocationId,
        attempt: u32,
        identity: &str,
        occurrence: u32,
    ) -> StoreResult<()> {
        let (id, identity) = (id.clone(), identity.to_owned());
        self.write(&id.to_string(), move |conn| {
            Box::pin(async move {
                super::egress::give_back_occurrence(
                    conn,
                    id.as_str(),
                    attempt,
                    &identity,
                    occurrence,
                )
                .await
            })
        })
        .await
    }

    async fn occurrences_seen(
        &self,
        id: &InvocationId,
        attempt: u32,
    ) -> StoreResult<std::collections::HashMap<String, u32>> {
        let mut conn = self.reader().await?;
        super::egress::occurrences_seen(&mut conn, id.as_str(), attempt).await
    }
}

async fn read_entry(
    conn: &mut PgConnection,
    id: &str,
    index: u32,
) -> StoreResult<Option<StoredEntry>> {
    let sql = format!("{ENTRY_SELECT} WHERE j.invocation_id = $1 AND j.idx = $2");
    let row = sqlx::query(&sql)
        .bind(id)
        .bind(i64::from(index))
        .fetch_optional(conn)
        .await
        .map_err(backend)?;
    row.as_ref().map(entry).transpose()
}

async fn get_update(
    conn: &mut PgConnection,
    run: &str,
    id: &str,
) -> StoreResult<Option<UpdateRecord>> {
    let sql = format!("SELECT {UPDATE_COLUMNS} FROM updates WHERE invocation_id = $1 AND id = $2");
    let row = sqlx::query(&sql)
        .bind(run)
        .bind(id)
        .fetch_optional(conn)
        .await
        .map_err(backend)?;
    row.as_ref().map(update_row).transpose()
}

/// The changed record of a guarded `UPDATE ... RETURNING` of invocation `id` and `true`,
/// or, when it matched no row, the record as it is and `false`.
async fn changed_or_current(
    conn: &mut PgConnection,
    id: &str,
    changed: Option<sqlx::postgres::PgRow>,
) -> StoreResult<(InvocationRecord, bool)> {
    match changed {
        Some(row) => Ok((invocation(&row)?, true)),
        None => fetch_invocation(conn, id)
            .await?
            .map(|record| (record, false))
            .ok_or_else(|| StoreError::NotFound(id.to_owned())),
    }
}

/// Deletes an invocation with its journal, completions, timers, signals, state, updates,
/// idempotency keys, workflow id and egress occurrences.
async fn delete_invocation(conn: &mut PgConnection, id: &str) -> StoreResult<()> {
    for sql in [
        "DELETE FROM journal WHERE invocation_id = $1",
        "DELETE FROM completions WHERE invocation_id = $1",
        "DELETE FROM timers WHERE invocation_id = $1",
        "DELETE FROM signals WHERE invocation_id = $1",
        "DELETE FROM state WHERE invocation_id = $1",
        "DELETE FROM updates WHERE invocation_id = $1",
        "DELETE FROM idempotency_keys WHERE invocation_id = $1",
        "DELETE FROM workflows WHERE invocation_id = $1",
        "DELETE FROM egress_occurrences WHERE invocation_id = $1",
        "DELETE FROM invocations WHERE id = $1",
    ] {
        sqlx::query(sql)
            .bind(id)
            .execute(&mut *conn)
            .await
            .map_err(backend)?;
    }
    Ok(())
}
