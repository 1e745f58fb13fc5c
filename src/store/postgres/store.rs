//! The `Store` methods of the PostgreSQL store; each does what the method of the same name
//! in `../sqlite/mod.rs` does, and the conformance suite (`../tests.rs`) holds both to it.

use async_trait::async_trait;
use durin_protocol::{EntryKind, Failure};
use futures_util::future::BoxFuture;
use sqlx::{PgConnection, Row};

use super::commands::{self, *};
use super::rows::*;
use super::*;
use crate::store::shared;

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

    async fn create_invocation(&self, new: NewInvocation) -> StoreResult<Created> {
        let key = new.id.to_string();
        let lease = self.lease.clone();
        self.write(&key, move |conn| {
            Box::pin(async move {
                if let Some(claim) = &new.idempotency {
                    // The key's row, locked: two nodes creating under one key take turns,
                    // and the second finds the first's invocation.
                    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1), hashtext($2))")
                        .bind(&claim.scope)
                        .bind(&claim.key)
                        .execute(&mut *conn)
                        .await
                        .map_err(backend)?;
                    let seen = sqlx::query(
                        "SELECT request_digest, invocation_id, expires_at_ms \
                         FROM idempotency_keys WHERE scope = $1 AND key = $2",
                    )
                    .bind(&claim.scope)
                    .bind(&claim.key)
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(backend)?;
                    if let Some(row) = seen {
                        let digest: String = get(&row, 0)?;
                        let invocation_id: String = get(&row, 1)?;
                        let expires_at_ms: i64 = get(&row, 2)?;
                        if expires_at_ms > new.now_ms {
                            if digest != claim.request_digest {
                                return Ok(Created::KeyReused { invocation_id });
                            }
                            return match fetch_invocation(conn, &invocation_id).await? {
                                Some(record) => Ok(Created::Existing(record)),
                                None => Err(corrupt(format!(
                                    "idempotency key names missing invocation {invocation_id}"
                                ))),
                            };
                        }
                        sqlx::query("DELETE FROM idempotency_keys WHERE scope = $1 AND key = $2")
                            .bind(&claim.scope)
                            .bind(&claim.key)
                            .execute(&mut *conn)
                            .await
                            .map_err(backend)?;
                    }
                }
                let (record, input) = insert_invocation(conn, new, None, &lease).await?;
                Ok(Created::New {
                    record,
                    input: Box::new(input),
                })
            })
        })
        .await
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

    async fn claim_due(&self, now_ms: i64, limit: u32) -> StoreResult<Vec<InvocationRecord>> {
        let lease = self.lease.clone();
        self.write("claim", move |conn| {
            Box::pin(async move {
                // Rows another transaction holds (being claimed, written or renewed) are
                // skipped. First the attempts whose lease expired (their node died or
                // froze), by the database's clock, then the due invocations.
                let mut ids: Vec<String> = sqlx::query_scalar(&format!(
                    "SELECT id FROM invocations WHERE status = 'running' \
                     AND lease_expires_at_ms < (SELECT {DB_NOW_MS}) \
                     ORDER BY lease_expires_at_ms LIMIT $1 FOR UPDATE SKIP LOCKED"
                ))
                .bind(i64::from(limit))
                .fetch_all(&mut *conn)
                .await
                .map_err(backend)?;
                let left = i64::from(limit) - ids.len() as i64;
                if left > 0 {
                    let due: Vec<String> = sqlx::query_scalar(
                        "SELECT id FROM invocations WHERE next_run_at_ms IS NOT NULL \
                         AND next_run_at_ms <= $1 \
                         AND status IN ('pending', 'backing-off', 'suspended') \
                         ORDER BY next_run_at_ms LIMIT $2 FOR UPDATE SKIP LOCKED",
                    )
                    .bind(now_ms)
                    .bind(left)
                    .fetch_all(&mut *conn)
                    .await
                    .map_err(backend)?;
                    ids.extend(due);
                }
                // The new attempt (attempt + 1 fences the old one), leased to this node.
                let sql = format!(
                    "UPDATE invocations SET status = 'running', attempt = attempt + 1, \
                     scheduled_at_ms = COALESCE(next_run_at_ms, $1), \
                     attempt_started_at_ms = $1, next_run_at_ms = NULL, waiting_for = NULL, \
                     modified_at_ms = $1, attempt_token = $3, \
                     lease_owner = $4, lease_expires_at_ms = {DB_NOW_MS} + $5 \
                     WHERE id = $2 AND (status IN ('pending', 'backing-off', 'suspended') \
                     OR (status = 'running' AND lease_expires_at_ms < {DB_NOW_MS})) \
                     RETURNING {INVOCATION_COLUMNS}"
                );
                let mut claimed = Vec::with_capacity(ids.len());
                for id in &ids {
                    fire_timers(conn, id, now_ms, now_ms).await?;
                    let row = sqlx::query(&sql)
                        .bind(now_ms)
                        .bind(id)
                        .bind(new_attempt_token())
                        .bind(&*lease.owner)
                        .bind(lease.ms)
                        .fetch_optional(&mut *conn)
                        .await
                        .map_err(backend)?;
                    if let Some(row) = row {
                        claimed.push(invocation(&row)?);
                    }
                }
                Ok(claimed)
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

    async fn start_workflow(&self, run: NewWorkflowRun) -> StoreResult<WorkflowStarted> {
        let key = format!("{}/{}", run.invocation.target.service, run.workflow_id);
        let lease = self.lease.clone();
        self.write(&key, move |conn| {
            Box::pin(async move {
                let workflow = run.invocation.target.service.clone();
                // The workflow id, locked (or, while it names no run, its name): two starts
                // of one id take turns, on every node.
                sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1), hashtext($2))")
                    .bind(&workflow)
                    .bind(&run.workflow_id)
                    .execute(&mut *conn)
                    .await
                    .map_err(backend)?;
                let seen = sqlx::query(
                    "SELECT invocation_id, input_digest FROM workflows \
                     WHERE workflow = $1 AND workflow_id = $2",
                )
                .bind(&workflow)
                .bind(&run.workflow_id)
                .fetch_optional(&mut *conn)
                .await
                .map_err(backend)?;
                if let Some(row) = seen {
                    let invocation_id: String = get(&row, 0)?;
                    let digest: String = get(&row, 1)?;
                    let record = lock_invocation(conn, &invocation_id)
                        .await?
                        .ok_or_else(|| {
                            corrupt(format!("workflow names missing invocation {invocation_id}"))
                        })?;
                    let ended = record.status.is_final();
                    // A retry of a signal-with-start whose signal the last run received
                    // already answers that run, even when it has ended since.
                    if let Some(key) = run.signal.as_ref().and_then(|s| s.idempotency_key.as_ref())
                    {
                        if signal_seq(conn, &invocation_id, key).await?.is_some() {
                            return Ok(WorkflowStarted::Existing(record));
                        }
                    }
                    if !(ended && run.new_run_after_end) {
                        // Signal-with-start delivers to a run that has not ended, whatever
                        // its input.
                        if let (Some(signal), false) = (run.signal, ended) {
                            insert_signal(conn, &invocation_id, signal, run.invocation.now_ms)
                                .await?;
                            return Ok(WorkflowStarted::Existing(record));
                        }
                        if digest == run.input_digest {
                            return Ok(WorkflowStarted::Existing(record));
                        }
                        return Ok(WorkflowStarted::Conflict(record));
                    }
                }
                let now_ms = run.invocation.now_ms;
                let (record, input) =
                    insert_invocation(conn, run.invocation, Some(&run.workflow_id), &lease).await?;
                take_workflow_id(
                    conn,
                    &workflow,
                    &run.workflow_id,
                    record.id.as_str(),
                    &run.input_digest,
                )
                .await?;
                if let Some(signal) = run.signal {
                    insert_signal(conn, record.id.as_str(), signal, now_ms).await?;
                }
                Ok(WorkflowStarted::New {
                    record,
                    input: Box::new(input),
                })
            })
        })
        .await
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

    async fn send_signal(
        &self,
        id: &InvocationId,
        signal: NewSignal,
        now_ms: i64,
    ) -> StoreResult<SignalSent> {
        let id = id.clone();
        self.write(&id.to_string(), move |conn| {
            Box::pin(async move {
                let record = lock_invocation(conn, id.as_str())
                    .await?
                    .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
                if record.status.is_final() {
                    // A retry of a signal that was delivered before the end is no error.
                    if let Some(key) = &signal.idempotency_key {
                        if let Some(seq) = signal_seq(conn, id.as_str(), key).await? {
                            return Ok(SignalSent {
                                seq,
                                duplicate: true,
                                woke: false,
                            });
                        }
                    }
                    return Err(StoreError::Ended {
                        invocation_id: id.to_string(),
                        status: record.status,
                    });
                }
                insert_signal(conn, id.as_str(), signal, now_ms).await
            })
        })
        .await
    }

    async fn resolve_awakeable(
        &self,
        id: &InvocationId,
        index: u32,
        result: Result<Vec<u8>, Failure>,
        now_ms: i64,
    ) -> StoreResult<Resolved> {
        let id = id.clone();
        self.write(&id.to_string(), move |conn| {
            Box::pin(async move {
                let record = lock_invocation(conn, id.as_str())
                    .await?
                    .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
                let entry = read_entry(conn, id.as_str(), index)
                    .await?
                    .filter(|e| e.kind == EntryKind::Awakeable)
                    .ok_or_else(|| StoreError::NotFound(format!("{id} awakeable {index}")))?;
                if let Some(completion) = entry.completion {
                    return Ok(Resolved {
                        completion,
                        first: false,
                        woke: false,
                    });
                }
                if record.status.is_final() {
                    return Err(StoreError::Ended {
                        invocation_id: id.to_string(),
                        status: record.status,
                    });
                }
                let (value, failure) = match result {
                    Ok(value) => (Some(value), None),
                    Err(failure) => (None, Some(failure)),
                };
                // Timers that were due before this callback came first.
                fire_timers(conn, id.as_str(), now_ms, now_ms).await?;
                let completion = complete(conn, id.as_str(), index, value, failure, now_ms).await?;
                let woke = wake_if_waiting(conn, id.as_str(), index, now_ms).await?;
                Ok(Resolved {
                    completion,
                    first: true,
                    woke,
                })
            })
        })
        .await
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

    async fn plain_command(&self, command: PlainCommand, now_ms: i64) -> StoreResult<PlainAnswer> {
        let limits = self.limits;
        let key = command.id.to_string();
        self.write(&key, move |conn| {
            Box::pin(async move {
                let id = command.id.as_str();
                lock_invocation(conn, id).await?;
                check_attempt(conn, id, command.attempt, &command.token).await?;
                let find = |kind: EntryKind, name: String, key: Option<Vec<u8>>, n: u32| {
                    let sql = format!(
                        "{ENTRY_SELECT} WHERE j.invocation_id = $1 AND j.kind = $2 \
                         AND j.name = $3 AND ($4::BYTEA IS NULL OR j.value = $4) \
                         ORDER BY j.idx LIMIT 1 OFFSET $5"
                    );
                    (sql, kind.as_str(), name, key, i64::from(n))
                };
                let (sql, kind, name, key, offset) = find(
                    command.kind,
                    command.name.clone(),
                    command.key.clone(),
                    command.occurrence,
                );
                let found = sqlx::query(&sql)
                    .bind(id)
                    .bind(kind)
                    .bind(name)
                    .bind(key)
                    .bind(offset)
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(backend)?
                    .as_ref()
                    .map(entry)
                    .transpose()?;
                let (entry, recorded) = match (found, command.new) {
                    (Some(entry), _) => (entry, true),
                    (None, Some(new)) => (
                        append(conn, &command.id, command.attempt, new, now_ms, limits).await?,
                        false,
                    ),
                    (None, None) => {
                        return Err(StoreError::NotFound(format!(
                            "{} {:?} of invocation {id}",
                            command.kind.as_str(),
                            command.name
                        )))
                    }
                };
                let also = match command.also {
                    Some((name, new)) => {
                        let (sql, kind, name, key, offset) = find(new.kind, name, None, 0);
                        let found = sqlx::query(&sql)
                            .bind(id)
                            .bind(kind)
                            .bind(name)
                            .bind(key)
                            .bind(offset)
                            .fetch_optional(&mut *conn)
                            .await
                            .map_err(backend)?
                            .as_ref()
                            .map(super::rows::entry)
                            .transpose()?;
                        Some(match found {
                            Some(entry) => entry,
                            None => {
                                append(conn, &command.id, command.attempt, new, now_ms, limits)
                                    .await?
                            }
                        })
                    }
                    None => None,
                };
                // After a cancellation a wait gets only what completed before it.
                let cancel_seq = commands::cancel_seq(conn, id).await?;
                let before_cancel = |e: &StoredEntry| {
                    e.completion
                        .as_ref()
                        .is_some_and(|c| cancel_seq.is_none_or(|seq| c.seq < seq))
                };
                let cancelled = command.suspend
                    && cancel_seq.is_some()
                    && !before_cancel(&entry)
                    && !also.as_ref().is_some_and(before_cancel);
                let suspended = command.suspend
                    && !cancelled
                    && entry.completion.is_none()
                    && also.as_ref().is_none_or(|e| e.completion.is_none());
                if suspended {
                    let waiting_for: Vec<u32> = [Some(entry.index), also.as_ref().map(|e| e.index)]
                        .into_iter()
                        .flatten()
                        .collect();
                    let (due, _) = suspension_due(conn, id, None, &waiting_for, now_ms).await?;
                    sqlx::query(
                        "UPDATE invocations SET status = 'suspended', next_run_at_ms = $1, \
                         waiting_for = $2, modified_at_ms = $3 WHERE id = $4",
                    )
                    .bind(due)
                    .bind(to_json(&waiting_for)?)
                    .bind(now_ms)
                    .bind(id)
                    .execute(&mut *conn)
                    .await
                    .map_err(backend)?;
                }
                Ok(PlainAnswer {
                    entry,
                    also,
                    recorded,
                    suspended,
                    cancelled,
                })
            })
        })
        .await
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

    async fn append_entry(
        &self,
        id: &InvocationId,
        attempt: u32,
        entry: NewEntry,
        now_ms: i64,
    ) -> StoreResult<StoredEntry> {
        let id = id.clone();
        let limits = self.limits;
        self.write(&id.to_string(), move |conn| {
            Box::pin(async move {
                let mut entry = entry;
                if let Effect::StartChild(child) = &entry.effect {
                    // A child workflow whose id names a run that goes on is not started:
                    // the entry records the refusal (a `call` completes with it), so every
                    // replay sees the same.
                    if let Some(run) =
                        commands::taken_workflow_id(conn, id.as_str(), entry.index, child).await?
                    {
                        let child = child.clone();
                        shared::refuse_taken_workflow_id(&mut entry, &child, &run);
                    }
                }
                append(conn, &id, attempt, entry, now_ms, limits).await
            })
        })
        .await
    }

    async fn end_attempt(
        &self,
        id: &InvocationId,
        attempt: u32,
        end: AttemptEnd,
        now_ms: i64,
    ) -> StoreResult<(InvocationRecord, Option<StoredEntry>, Closed)> {
        let id = id.clone();
        self.write(&id.to_string(), move |conn| {
            Box::pin(end_attempt(conn, id, attempt, end, now_ms))
        })
        .await
    }

    async fn cancel(&self, id: &InvocationId, now_ms: i64) -> StoreResult<CancelAnswer> {
        let id = id.clone();
        self.write(&id.to_string(), move |conn| {
            Box::pin(async move { commands::cancel(conn, id.as_str(), now_ms).await })
        })
        .await
    }

    async fn terminate(
        &self,
        id: &InvocationId,
        reason: String,
        now_ms: i64,
    ) -> StoreResult<Termination> {
        let id = id.clone();
        self.write(&id.to_string(), move |conn| {
            Box::pin(async move {
                let mut ended = Vec::new();
                let ending = commands::Ending {
                    children: format!("its parent {id} was terminated"),
                    ..commands::Ending::terminated(reason)
                };
                let record =
                    commands::end_now(conn, id.as_str(), &ending, now_ms, &mut ended).await?;
                Ok(Termination {
                    terminated: !ended.is_empty(),
                    record,
                    ended,
                })
            })
        })
        .await
    }

    async fn heartbeat(
        &self,
        id: &InvocationId,
        attempt: u32,
        token: String,
        details: Option<Vec<u8>>,
        now_ms: i64,
    ) -> StoreResult<()> {
        let id = id.clone();
        self.write(&id.to_string(), move |conn| {
            Box::pin(async move {
                let beat = sqlx::query(
                    "UPDATE invocations SET heartbeat_at_ms = $1, heartbeat_details = $2 \
                     WHERE id = $3 AND attempt = $4 AND status = 'running' \
                     AND attempt_token = $5",
                )
                .bind(now_ms)
                .bind(details)
                .bind(id.as_str())
                .bind(i64::from(attempt))
                .bind(&token)
                .execute(&mut *conn)
                .await
                .map_err(backend)?;
                if beat.rows_affected() == 1 {
                    Ok(())
                } else {
                    commands::check_attempt(conn, id.as_str(), attempt, &token).await?;
                    Err(refusal(conn, id.as_str(), attempt).await)
                }
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

    async fn expire(
        &self,
        now_ms: i64,
        limit: u32,
    ) -> StoreResult<Vec<(InvocationRecord, StoredEntry)>> {
        self.write("expire", move |conn| {
            Box::pin(async move {
                let due = sqlx::query(
                    "SELECT id, created_at_ms, deadline_ms FROM invocations \
                     WHERE deadline_ms IS NOT NULL AND completed_at_ms IS NULL \
                     AND deadline_ms <= $1 ORDER BY deadline_ms LIMIT $2 \
                     FOR UPDATE SKIP LOCKED",
                )
                .bind(now_ms)
                .bind(i64::from(limit))
                .fetch_all(&mut *conn)
                .await
                .map_err(backend)?;
                let mut ended = Vec::new();
                for row in &due {
                    let id: String = get(row, 0)?;
                    let failure = crate::lifecycle::timeouts::schedule_to_close_failure(
                        get(row, 1)?,
                        get(row, 2)?,
                    );
                    let ending = commands::Ending {
                        status: Status::Failed,
                        failure,
                        children: format!("its parent {id} passed its schedule_to_close timeout"),
                    };
                    commands::end_now(conn, &id, &ending, now_ms, &mut ended).await?;
                }
                Ok(ended)
            })
        })
        .await
    }

    async fn send_update(
        &self,
        run: &InvocationId,
        update: NewUpdate,
        now_ms: i64,
    ) -> StoreResult<UpdateSent> {
        let run = run.clone();
        self.write(&run.to_string(), move |conn| {
            Box::pin(async move {
                let record = lock_invocation(conn, run.as_str())
                    .await?
                    .ok_or_else(|| StoreError::NotFound(run.to_string()))?;
                if let Some(key) = &update.idempotency_key {
                    let select = format!(
                        "SELECT {UPDATE_COLUMNS} FROM updates WHERE invocation_id = $1 \
                         AND idempotency_key = $2"
                    );
                    let existing = sqlx::query(&select)
                        .bind(run.as_str())
                        .bind(key)
                        .fetch_optional(&mut *conn)
                        .await
                        .map_err(backend)?;
                    if let Some(row) = existing {
                        return Ok(UpdateSent::Sent {
                            update: update_row(&row)?,
                            new: false,
                            woke: false,
                        });
                    }
                }
                if record.status.is_final() {
                    return Ok(UpdateSent::Ended(Box::new(record)));
                }
                sqlx::query(
                    "INSERT INTO updates (invocation_id, id, name, input, idempotency_key, \
                     status, created_at_ms) VALUES ($1, $2, $3, $4, $5, 'pending', $6)",
                )
                .bind(run.as_str())
                .bind(&update.id)
                .bind(&update.name)
                .bind(&update.input)
                .bind(&update.idempotency_key)
                .bind(now_ms)
                .execute(&mut *conn)
                .await
                .map_err(backend)?;
                // A waiting run handles it at once; a running attempt suspends into it.
                let woke = record.status == Status::Suspended;
                if woke {
                    sqlx::query(
                        "UPDATE invocations SET next_run_at_ms = $1, modified_at_ms = $1 \
                         WHERE id = $2",
                    )
                    .bind(now_ms)
                    .bind(run.as_str())
                    .execute(&mut *conn)
                    .await
                    .map_err(backend)?;
                }
                Ok(UpdateSent::Sent {
                    update: UpdateRecord {
                        invocation_id: run,
                        id: update.id,
                        name: update.name,
                        status: UpdateStatus::Pending,
                        result: None,
                        failure: None,
                    },
                    new: true,
                    woke,
                })
            })
        })
        .await
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

    async fn refuse_update(
        &self,
        run: &InvocationId,
        attempt: u32,
        token: String,
        id: &str,
        failure: Failure,
    ) -> StoreResult<UpdateRecord> {
        let (run, id) = (run.clone(), id.to_owned());
        self.write(&run.to_string(), move |conn| {
            Box::pin(async move {
                lock_invocation(conn, run.as_str()).await?;
                commands::check_attempt(conn, run.as_str(), attempt, &token).await?;
                sqlx::query(
                    "UPDATE updates SET status = 'refused', failure = $3 \
                     WHERE invocation_id = $1 AND id = $2 AND status = 'pending'",
                )
                .bind(run.as_str())
                .bind(&id)
                .bind(to_json(&failure)?)
                .execute(&mut *conn)
                .await
                .map_err(backend)?;
                get_update(conn, run.as_str(), &id)
                    .await?
                    .ok_or_else(|| StoreError::NotFound(format!("update {id} of invocation {run}")))
            })
        })
        .await
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

    async fn restart(
        &self,
        id: &InvocationId,
        from: u32,
        key: Option<String>,
        now_ms: i64,
    ) -> StoreResult<Result<(InvocationRecord, bool), String>> {
        let id = id.clone();
        self.write(&id.to_string(), move |conn| {
            Box::pin(async move {
                commands::restart(conn, id.as_str(), from, key.as_deref(), now_ms).await
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

/// Records how `attempt` ended (see [`Store::end_attempt`]).
fn end_attempt(
    conn: &mut PgConnection,
    id: InvocationId,
    attempt: u32,
    end: AttemptEnd,
    now_ms: i64,
) -> BoxFuture<'_, StoreResult<(InvocationRecord, Option<StoredEntry>, Closed)>> {
    Box::pin(async move {
        // $1 is the time and $2, $3 the fence; the rest depend on the end.
        let fence = "WHERE id = $2 AND attempt = $3 AND status = 'running'";
        let mut suspended_due = None;
        let end = match end {
            AttemptEnd::Suspended {
                until_ms,
                waiting_for,
            } => {
                // A refused suspension writes nothing: the fence first, then the bindings
                // and the due time.
                let current = lock_invocation(conn, id.as_str()).await?;
                if !current
                    .as_ref()
                    .is_some_and(|r| r.attempt == attempt && r.status == Status::Running)
                {
                    return Err(refusal(conn, id.as_str(), attempt).await);
                }
                let (due, can_complete) =
                    suspension_due(conn, id.as_str(), until_ms, &waiting_for, now_ms).await?;
                suspended_due = due;
                if can_complete {
                    AttemptEnd::Suspended {
                        until_ms,
                        waiting_for,
                    }
                } else {
                    AttemptEnd::Paused {
                        reason: format!(
                            "the handler suspended waiting for {waiting_for:?}, which are not commands of its journal, so nothing could ever wake it; fix the handler and resume the invocation"
                        ),
                    }
                }
            }
            other => other,
        };
        let set = match &end {
            AttemptEnd::Completed { .. } => {
                "status = 'completed', journal_len = journal_len + 1, completed_at_ms = $1, \
                 last_error = NULL"
            }
            AttemptEnd::Failed { .. } => {
                "status = 'failed', journal_len = journal_len + 1, completed_at_ms = $1, \
                 failure = $4"
            }
            AttemptEnd::BackOff { .. } => {
                "status = 'backing-off', next_run_at_ms = $4, last_error = $5, \
                 failures = failures + $6, position_failures = position_failures + $7"
            }
            AttemptEnd::Suspended { .. } => {
                "status = 'suspended', next_run_at_ms = $4, waiting_for = $5"
            }
            AttemptEnd::Paused { .. } => "status = 'paused', last_error = $4",
            AttemptEnd::Cancelled { .. } => {
                "status = 'cancelled', journal_len = journal_len + 1, completed_at_ms = $1, \
                 failure = $4"
            }
            AttemptEnd::ContinuedAsNew { .. } => {
                "status = 'continued', journal_len = journal_len + 1, completed_at_ms = $1, \
                 last_error = NULL"
            }
        };
        let sql = format!(
            "UPDATE invocations SET {set}, modified_at_ms = $1 {fence} \
             RETURNING {INVOCATION_COLUMNS}"
        );
        let query = sqlx::query(&sql)
            .bind(now_ms)
            .bind(id.as_str())
            .bind(i64::from(attempt));
        let query = match &end {
            AttemptEnd::Failed { failure, .. } | AttemptEnd::Cancelled { failure } => {
                query.bind(to_json(failure)?)
            }
            AttemptEnd::BackOff {
                until_ms,
                error,
                charged,
            } => query
                .bind(*until_ms)
                .bind(error.clone())
                .bind(i64::from(*charged == Charge::Handler))
                .bind(i64::from(*charged == Charge::Step)),
            AttemptEnd::Suspended { waiting_for, .. } => {
                query.bind(suspended_due).bind(to_json(waiting_for)?)
            }
            AttemptEnd::Paused { reason } => query.bind(reason.clone()),
            AttemptEnd::Completed { .. } | AttemptEnd::ContinuedAsNew { .. } => query,
        };
        let Some(row) = query.fetch_optional(&mut *conn).await.map_err(backend)? else {
            return Err(refusal(conn, id.as_str(), attempt).await);
        };
        let record = invocation(&row)?;
        let output = match shared::recorded(end) {
            shared::Recorded::Output(output) => Some(output),
            shared::Recorded::ContinuedAsNew {
                input,
                next,
                target,
                deadline_ms,
            } => {
                let next_run = shared::next_run(
                    &record,
                    &input,
                    &next,
                    target.as_deref(),
                    deadline_ms,
                    now_ms,
                );
                continue_as_new(conn, &record, next_run, now_ms).await?;
                Some(shared::continued_output(&next))
            }
            shared::Recorded::Nothing => None,
        };
        let output = match output {
            Some(output) => Some(record_output(conn, &record, attempt, output, now_ms).await?),
            None => None,
        };
        let mut closed = Vec::new();
        if record.status.is_final() {
            commands::complete_parent(conn, &record, output.as_ref(), now_ms).await?;
            commands::close_children(conn, id.as_str(), now_ms, &mut closed).await?;
        }
        Ok((record, output, closed))
    })
}

/// Starts the next run of a workflow whose run `record` continues as new (`next`, pending
/// and due now, under the same workflow id, which names it from now on).
async fn continue_as_new(
    conn: &mut PgConnection,
    record: &InvocationRecord,
    next: commands::Pending<'_>,
    now_ms: i64,
) -> StoreResult<()> {
    let workflow_id = record.workflow_id.as_deref().ok_or_else(|| {
        corrupt(format!(
            "invocation {} continued as new without a workflow id",
            record.id
        ))
    })?;
    let next_id = next.id.to_owned();
    commands::insert_pending(conn, next, now_ms).await?;
    sqlx::query("UPDATE workflows SET invocation_id = $1 WHERE workflow = $2 AND workflow_id = $3")
        .bind(next_id)
        .bind(&record.service)
        .bind(workflow_id)
        .execute(&mut *conn)
        .await
        .map_err(backend)?;
    Ok(())
}
