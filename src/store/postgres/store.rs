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
                let conn = super::batch::TxConn::Alone(conn);
                let mut tx = super::tables::PgTx { conn, lease };
                rule(&mut tx).await
            })
        })
        .await
    }

    async fn transact_repeatable(&self, key: &str, rule: RepeatableTxFn) -> StoreResult<TxOutput> {
        let lease = self.lease.clone();
        let run: super::RepeatableRun = std::sync::Arc::new(move |conn| {
            let (rule, lease) = (std::sync::Arc::clone(&rule), lease.clone());
            Box::pin(async move {
                let mut tx = super::tables::PgTx { conn, lease };
                rule(&mut tx).await
            })
        });
        self.write_repeatable(key, run).await
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
                if let Some(mut record) = latest_deployment(conn, &new.url).await? {
                    if record.services == new.services && record.protocol == new.protocol {
                        // The same deployment: registering it active activates it.
                        if new.active && !record.active {
                            sqlx::query("UPDATE deployments SET active = TRUE WHERE id = $1")
                                .bind(&record.id)
                                .execute(&mut *conn)
                                .await
                                .map_err(backend)?;
                            record.active = true;
                        }
                        return Ok((record, false));
                    }
                }
                let id = crate::ids::new_deployment_id();
                sqlx::query(
                    "INSERT INTO deployments (id, url, protocol, services, created_at_ms, active) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(&id)
                .bind(&new.url)
                .bind(new.protocol.to_text())
                .bind(to_json(&new.services)?)
                .bind(new.now_ms)
                .bind(new.active)
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
                    active: new.active,
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

    async fn activate_deployment(&self, id: &str) -> StoreResult<Option<DeploymentRecord>> {
        let id = id.to_owned();
        self.write(&id.clone(), move |conn| {
            Box::pin(async move {
                sqlx::query("UPDATE deployments SET active = TRUE WHERE id = $1")
                    .bind(&id)
                    .execute(&mut *conn)
                    .await
                    .map_err(backend)?;
                let sql = format!("SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE id = $1");
                let row = sqlx::query(&sql)
                    .bind(&id)
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(backend)?;
                row.as_ref().map(deployment).transpose()
            })
        })
        .await
    }

    async fn latest_handler(
        &self,
        service: &str,
        handler: &str,
    ) -> StoreResult<Option<HandlerTarget>> {
        let mut conn = self.reader().await?;
        let conn: &mut PgConnection = &mut conn;
        let sql = format!(
            "{TARGET_SELECT} WHERE h.service = $1 AND h.handler = $2 AND d.active \
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

    async fn key_state(&self, service: &str, key: &str) -> StoreResult<Vec<(String, Vec<u8>)>> {
        let mut conn = self.reader().await?;
        let rows = sqlx::query(
            "SELECT name, value FROM key_state WHERE service = $1 AND key = $2 ORDER BY name",
        )
        .bind(service)
        .bind(key)
        .fetch_all(&mut *conn)
        .await
        .map_err(backend)?;
        rows.iter()
            .map(|row| Ok((get(row, 0)?, get(row, 1)?)))
            .collect()
    }

    async fn key_invocations(
        &self,
        service: &str,
        key: &str,
        limit: u32,
    ) -> StoreResult<Vec<InvocationRecord>> {
        let mut conn = self.reader().await?;
        let conn: &mut PgConnection = &mut conn;
        let sql = format!(
            "SELECT {INVOCATION_COLUMNS} FROM invocations \
             WHERE service = $1 AND concurrency_key = $2 \
             AND status NOT IN ('completed', 'failed', 'cancelled', 'terminated', 'continued') \
             ORDER BY status = 'queued', key_seq LIMIT $3"
        );
        let rows = sqlx::query(&sql)
            .bind(service)
            .bind(key)
            .bind(i64::from(limit))
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

    async fn find_workflow_update(
        &self,
        workflow: &str,
        workflow_id: &str,
        id: &str,
    ) -> StoreResult<Option<UpdateRecord>> {
        let sql = format!(
            "SELECT {UPDATE_COLUMNS} FROM updates WHERE id = $3 AND invocation_id IN \
             (SELECT id FROM invocations WHERE service = $1 AND workflow_id = $2)"
        );
        let row = sqlx::query(&sql)
            .bind(workflow)
            .bind(workflow_id)
            .bind(id)
            .fetch_optional(&mut *self.reader().await?)
            .await
            .map_err(backend)?;
        row.as_ref().map(update_row).transpose()
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

    async fn count_pending(&self) -> StoreResult<u64> {
        let mut conn = self.reader().await?;
        let n: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM invocations WHERE status = 'pending'")
                .fetch_one(&mut *conn)
                .await
                .map_err(backend)?;
        Ok(n.max(0) as u64)
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

    async fn list_webhook_sources(&self) -> StoreResult<Vec<WebhookSourceRow>> {
        let mut conn = self.reader().await?;
        let conn: &mut PgConnection = &mut conn;
        let sql = format!("SELECT {WEBHOOK_SOURCE_COLUMNS} FROM webhook_sources ORDER BY name");
        let rows = sqlx::query(&sql).fetch_all(conn).await.map_err(backend)?;
        rows.iter().map(webhook_source).collect()
    }

    async fn get_webhook_source(&self, name: &str) -> StoreResult<Option<WebhookSourceRow>> {
        let mut conn = self.reader().await?;
        let conn: &mut PgConnection = &mut conn;
        let sql = format!("SELECT {WEBHOOK_SOURCE_COLUMNS} FROM webhook_sources WHERE name = $1");
        let row = sqlx::query(&sql)
            .bind(name)
            .fetch_optional(conn)
            .await
            .map_err(backend)?;
        row.as_ref().map(webhook_source).transpose()
    }

    async fn webhook_deliveries(&self, source: &str, limit: u32) -> StoreResult<Vec<String>> {
        let mut conn = self.reader().await?;
        let conn: &mut PgConnection = &mut conn;
        let rows = sqlx::query(
            "SELECT delivery FROM webhook_deliveries WHERE source = $1 ORDER BY id DESC LIMIT $2",
        )
        .bind(source)
        .bind(i64::from(limit))
        .fetch_all(conn)
        .await
        .map_err(backend)?;
        rows.iter().map(|row| get(row, 0)).collect()
    }

    async fn list_schedules(&self) -> StoreResult<Vec<ScheduleRow>> {
        let mut conn = self.reader().await?;
        let conn: &mut PgConnection = &mut conn;
        let sql = format!("SELECT {SCHEDULE_COLUMNS} FROM schedules ORDER BY id");
        let rows = sqlx::query(&sql).fetch_all(conn).await.map_err(backend)?;
        rows.iter().map(schedule).collect()
    }

    async fn get_schedule(&self, id: &str) -> StoreResult<Option<ScheduleRow>> {
        let mut conn = self.reader().await?;
        let conn: &mut PgConnection = &mut conn;
        let sql = format!("SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(conn)
            .await
            .map_err(backend)?;
        row.as_ref().map(schedule).transpose()
    }

    async fn due_schedules(&self, now_ms: i64, limit: u32) -> StoreResult<Vec<String>> {
        let mut conn = self.reader().await?;
        let conn: &mut PgConnection = &mut conn;
        let rows = sqlx::query(
            "SELECT id FROM schedules WHERE due_ms IS NOT NULL AND due_ms <= $1 \
             ORDER BY due_ms LIMIT $2",
        )
        .bind(now_ms)
        .bind(i64::from(limit))
        .fetch_all(conn)
        .await
        .map_err(backend)?;
        rows.iter().map(|row| get(row, 0)).collect()
    }

    async fn next_schedule_due(&self) -> StoreResult<Option<i64>> {
        let mut conn = self.reader().await?;
        let conn: &mut PgConnection = &mut conn;
        sqlx::query("SELECT MIN(due_ms) FROM schedules WHERE due_ms IS NOT NULL")
            .fetch_one(conn)
            .await
            .map_err(backend)?
            .try_get(0)
            .map_err(backend)
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

    fn hold_lease(&self, id: &InvocationId, attempt: u32) -> crate::store::LeaseHold {
        self.held.hold(id.as_str(), attempt)
    }

    fn database_clock(&self) -> Option<std::sync::Arc<dyn crate::clock::Clock>> {
        Some(self.clock.clone())
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
