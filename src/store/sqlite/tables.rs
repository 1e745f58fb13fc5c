//! The tables of the SQLite store: each method one or two statements on the writer's
//! connection, inside the batch's transaction. SQLite has one writer, so the locks of
//! [`Tx`](crate::store::tables::Tx) are nothing to do here.

use async_trait::async_trait;
use durin_protocol::{EntryKind, Failure};
use rusqlite::{params, Connection};

use super::rows::*;
use super::{backend, corrupt};
use crate::store::tables::*;
use crate::store::*;

/// The writer's connection, inside the batch's transaction.
pub struct SqliteTx {
    pub(super) conn: Connection,
}

pub(super) const UPDATE_COLUMNS: &str = "invocation_id, id, name, status, result, failure";

/// An update's row.
pub(super) fn update_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoreResult<UpdateRecord>> {
    let run: String = row.get(0)?;
    let status: String = row.get(3)?;
    let failure: Option<String> = row.get(5)?;
    let result = (|| {
        Ok(UpdateRecord {
            invocation_id: InvocationId::parse(&run).map_err(corrupt)?,
            id: row.get(1).map_err(backend)?,
            name: row.get(2).map_err(backend)?,
            status: UpdateStatus::parse(&status)
                .ok_or_else(|| corrupt(format!("unknown update status {status:?}")))?,
            result: row.get(4).map_err(backend)?,
            failure: failure
                .map(|f| serde_json::from_str(&f))
                .transpose()
                .map_err(backend)?,
        })
    })();
    Ok(result)
}

fn column<T: rusqlite::types::FromSql>(
    row: &rusqlite::Row<'_>,
    i: usize,
) -> rusqlite::Result<StoreResult<T>> {
    row.get(i).map(Ok)
}

impl SqliteTx {
    fn one<T: rusqlite::types::FromSql>(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> StoreResult<Option<T>> {
        query_one(&self.conn, sql, params, |row| column(row, 0))
    }

    fn all<T: rusqlite::types::FromSql>(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> StoreResult<Vec<T>> {
        query_all(&self.conn, sql, params, |row| column(row, 0))
    }

    /// Runs `sql`, a write of invocation `id`'s row, and reads the row back: `None` when the
    /// write changed no row. SQLite's `RETURNING` fills a temporary table before it answers;
    /// a second lookup by primary key costs the writer less.
    fn write_invocation(
        &self,
        id: &str,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> StoreResult<Option<InvocationRecord>> {
        if execute(&self.conn, sql, params)? == 0 {
            return Ok(None);
        }
        fetch_invocation(&self.conn, id)
    }
}

#[async_trait]
impl Invocations for SqliteTx {
    async fn invocation(&mut self, id: &str) -> StoreResult<Option<InvocationRecord>> {
        fetch_invocation(&self.conn, id)
    }

    async fn lock_invocation(&mut self, id: &str) -> StoreResult<Option<InvocationRecord>> {
        fetch_invocation(&self.conn, id)
    }

    async fn insert_running(
        &mut self,
        new: &NewInvocation,
        workflow_id: Option<&str>,
        token: &str,
        input: &StoredEntry,
    ) -> StoreResult<InvocationRecord> {
        let sql = "INSERT INTO invocations (id, service, handler, deployment_id, status, attempt, \
             failures, position_failures, journal_len, next_run_at_ms, idempotency_key, \
             created_at_ms, modified_at_ms, attempt_token, workflow_id, journal_bytes, \
             deadline_ms, scheduled_at_ms, attempt_started_at_ms, traceparent) \
             VALUES (?1, ?2, ?3, ?4, 'running', 1, 0, 0, 1, NULL, ?6, ?5, ?5, ?7, ?8, ?9, ?10, \
             ?5, ?5, ?11)";
        let record = self
            .write_invocation(
                new.id.as_str(),
                sql,
                params![
                    new.id.as_str(),
                    new.target.service,
                    new.target.handler,
                    new.target.deployment_id,
                    new.now_ms,
                    new.idempotency.as_ref().map(|c| c.key.as_str()),
                    token,
                    workflow_id,
                    new.input.len() as i64,
                    new.deadline_ms,
                    new.traceparent,
                ],
            )?
            .ok_or_else(|| corrupt("an inserted invocation was not found".into()))?;
        insert_entry(&self.conn, new.id.as_str(), input)?;
        Ok(record)
    }

    async fn insert_pending(&mut self, new: &Pending<'_>, now_ms: i64) -> StoreResult<()> {
        execute(
            &self.conn,
            "INSERT INTO invocations (id, service, handler, deployment_id, status, attempt, \
             failures, position_failures, journal_len, next_run_at_ms, created_at_ms, \
             modified_at_ms, journal_bytes, workflow_id, parent_invocation_id, parent_index, \
             deadline_ms, parent_close, traceparent, idempotency_key) \
             VALUES (?1, ?2, ?3, ?4, 'pending', 0, 0, 0, 1, ?5, ?6, ?6, ?7, ?8, ?9, ?10, ?11, \
             ?12, ?13, ?14)",
            params![
                new.id,
                new.service,
                new.handler,
                new.deployment_id,
                new.due_ms,
                now_ms,
                new.input.len() as i64,
                new.workflow_id,
                new.parent.map(|(p, _)| p),
                new.parent.and_then(|(_, index)| index),
                new.deadline_ms,
                new.parent_close.map(ParentClose::as_str),
                new.traceparent,
                new.idempotency_key,
            ],
        )?;
        Ok(())
    }

    async fn grow_journal_with(
        &mut self,
        id: &str,
        attempt: u32,
        index: Option<u32>,
        token: Option<&str>,
        bytes: i64,
        max_entries: u32,
        max_bytes: i64,
        entry: &StoredEntry,
    ) -> StoreResult<Option<u32>> {
        // Without `RETURNING` (see `write_invocation`): the index is the one the fence
        // checked, or else read back.
        let grown = execute(
            &self.conn,
            "UPDATE invocations SET journal_len = journal_len + 1, \
             journal_bytes = journal_bytes + ?6, position_failures = 0, modified_at_ms = ?1 \
             WHERE id = ?2 AND attempt = ?3 AND status = 'running' \
             AND (?4 IS NULL OR journal_len = ?4) \
             AND (?5 IS NULL OR attempt_token = ?5) \
             AND journal_len < ?7 AND journal_bytes + ?6 <= ?8",
            params![
                entry.at_ms,
                id,
                attempt,
                index,
                token,
                bytes,
                max_entries,
                max_bytes
            ],
        )?;
        if grown == 0 {
            return Ok(None);
        }
        let index = match index {
            Some(index) => index,
            None => {
                let journal_len: u32 = self
                    .one("SELECT journal_len FROM invocations WHERE id = ?1", [id])?
                    .ok_or_else(|| corrupt(format!("invocation {id} vanished")))?;
                journal_len - 1
            }
        };
        insert_entry_at(&self.conn, id, index, entry)?;
        Ok(Some(index))
    }

    async fn add_bytes(&mut self, id: &str, bytes: i64) -> StoreResult<()> {
        execute(
            &self.conn,
            "UPDATE invocations SET journal_bytes = journal_bytes + ?2 WHERE id = ?1",
            params![id, bytes],
        )?;
        Ok(())
    }

    async fn record_end(
        &mut self,
        id: &str,
        attempt: u32,
        end: &AttemptEnd,
        suspended_due: Option<i64>,
        output_bytes: i64,
        unless_arrivals: bool,
        now_ms: i64,
    ) -> StoreResult<Option<InvocationRecord>> {
        // ?1 is the time, ?2 and ?3 the fence, ?4 the output's bytes (0 for an end that
        // does not end the invocation); the rest depend on the end.
        let (set, extra): (&str, Vec<rusqlite::types::Value>) = match end {
            AttemptEnd::Completed { .. } => (
                "status = 'completed', journal_len = journal_len + 1, completed_at_ms = ?1, \
                 last_error = NULL",
                vec![],
            ),
            AttemptEnd::Failed { failure, .. } => (
                "status = 'failed', journal_len = journal_len + 1, completed_at_ms = ?1, \
                 failure = ?5",
                vec![to_json(failure)?.into()],
            ),
            AttemptEnd::BackOff {
                until_ms,
                error,
                charged,
            } => (
                "status = 'backing-off', next_run_at_ms = ?5, last_error = ?6, \
                 failures = failures + ?7, position_failures = position_failures + ?8",
                vec![
                    (*until_ms).into(),
                    error.clone().into(),
                    i64::from(*charged == Charge::Handler).into(),
                    i64::from(*charged == Charge::Step).into(),
                ],
            ),
            AttemptEnd::Suspended { waiting_for, .. } => (
                "status = 'suspended', next_run_at_ms = ?5, waiting_for = ?6",
                vec![suspended_due.into(), to_json(waiting_for)?.into()],
            ),
            AttemptEnd::Paused { reason } => (
                "status = 'paused', last_error = ?5",
                vec![reason.clone().into()],
            ),
            AttemptEnd::Cancelled { failure } => (
                "status = 'cancelled', journal_len = journal_len + 1, completed_at_ms = ?1, \
                 failure = ?5",
                vec![to_json(failure)?.into()],
            ),
            AttemptEnd::ContinuedAsNew { .. } => (
                "status = 'continued', journal_len = journal_len + 1, completed_at_ms = ?1, \
                 last_error = NULL",
                vec![],
            ),
        };
        let arrivals = if unless_arrivals {
            " AND COALESCE(arrived_during_attempt, -1) <> ?3"
        } else {
            ""
        };
        let sql = format!(
            "UPDATE invocations SET {set}, journal_bytes = journal_bytes + ?4, \
             modified_at_ms = ?1 WHERE id = ?2 AND attempt = ?3 AND status = 'running'{arrivals}"
        );
        let mut values: Vec<rusqlite::types::Value> = vec![
            now_ms.into(),
            id.to_owned().into(),
            attempt.into(),
            output_bytes.into(),
        ];
        values.extend(extra);
        self.write_invocation(id, &sql, rusqlite::params_from_iter(values))
    }

    async fn claimable(&mut self, now_ms: i64, limit: u32) -> StoreResult<Vec<(String, bool)>> {
        query_all(
            &self.conn,
            "SELECT id, key_rate_limit IS NOT NULL AND attempt = 0 FROM invocations \
             WHERE next_run_at_ms IS NOT NULL \
             AND next_run_at_ms <= ?1 AND status IN ('pending', 'backing-off', 'suspended') \
             ORDER BY next_run_at_ms LIMIT ?2",
            params![now_ms, limit],
            |row| Ok(Ok((row.get(0)?, row.get(1)?))),
        )
    }

    async fn start_attempt(
        &mut self,
        id: &str,
        token: &str,
        now_ms: i64,
    ) -> StoreResult<Option<InvocationRecord>> {
        let sql = "UPDATE invocations SET status = 'running', attempt = attempt + 1, \
             scheduled_at_ms = next_run_at_ms, attempt_started_at_ms = ?1, \
             next_run_at_ms = NULL, waiting_for = NULL, modified_at_ms = ?1, attempt_token = ?3 \
             WHERE id = ?2 AND status IN ('pending', 'backing-off', 'suspended')";
        self.write_invocation(id, sql, params![now_ms, id, token])
    }

    async fn record_heartbeat(
        &mut self,
        id: &str,
        attempt: u32,
        token: &str,
        details: Option<&[u8]>,
        now_ms: i64,
    ) -> StoreResult<bool> {
        let beat = execute(
            &self.conn,
            "UPDATE invocations SET heartbeat_at_ms = ?1, heartbeat_details = ?2 \
             WHERE id = ?3 AND attempt = ?4 AND status = 'running' AND attempt_token = ?5",
            params![now_ms, details, id, attempt, token],
        )?;
        Ok(beat == 1)
    }

    async fn note_arrival(&mut self, id: &str, attempt: u32) -> StoreResult<()> {
        execute(
            &self.conn,
            "UPDATE invocations SET arrived_during_attempt = ?2 WHERE id = ?1",
            params![id, attempt],
        )?;
        Ok(())
    }

    async fn set_suspended(
        &mut self,
        id: &str,
        due_ms: Option<i64>,
        waiting_for: &[u32],
        now_ms: i64,
    ) -> StoreResult<()> {
        execute(
            &self.conn,
            "UPDATE invocations SET status = 'suspended', next_run_at_ms = ?1, \
             waiting_for = ?2, modified_at_ms = ?3 WHERE id = ?4",
            params![due_ms, to_json(&waiting_for)?, now_ms, id],
        )?;
        Ok(())
    }

    async fn wake(&mut self, id: &str, now_ms: i64) -> StoreResult<()> {
        execute(
            &self.conn,
            "UPDATE invocations SET next_run_at_ms = MIN(COALESCE(next_run_at_ms, ?1), ?1), \
             modified_at_ms = ?1 WHERE id = ?2",
            params![now_ms, id],
        )?;
        Ok(())
    }

    async fn wake_suspended(&mut self, id: &str, now_ms: i64) -> StoreResult<bool> {
        let n = execute(
            &self.conn,
            "UPDATE invocations SET next_run_at_ms = ?1, modified_at_ms = ?1 \
             WHERE id = ?2 AND status = 'suspended'",
            params![now_ms, id],
        )?;
        Ok(n > 0)
    }

    async fn mark_cancelled(&mut self, id: &str, now_ms: i64) -> StoreResult<InvocationRecord> {
        let sql =
            "UPDATE invocations SET journal_len = journal_len + 1, cancel_requested_at_ms = ?1, \
             status = 'pending', next_run_at_ms = ?1, waiting_for = NULL, modified_at_ms = ?1 \
             WHERE id = ?2";
        self.write_invocation(id, sql, params![now_ms, id])?
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))
    }

    async fn mark_ended(
        &mut self,
        id: &str,
        status: Status,
        failure: &Failure,
        output_bytes: i64,
        now_ms: i64,
    ) -> StoreResult<InvocationRecord> {
        let sql = "UPDATE invocations SET status = ?4, journal_len = journal_len + 1, \
             journal_bytes = journal_bytes + ?5, completed_at_ms = ?1, failure = ?2, \
             next_run_at_ms = NULL, waiting_for = NULL, modified_at_ms = ?1 WHERE id = ?3";
        self.write_invocation(
            id,
            sql,
            params![now_ms, to_json(failure)?, id, status.as_str(), output_bytes],
        )?
        .ok_or_else(|| StoreError::NotFound(id.to_owned()))
    }

    async fn mark_restarted(
        &mut self,
        id: &str,
        from: u32,
        reason: &str,
        keep_cancel: bool,
        key: Option<&str>,
        now_ms: i64,
    ) -> StoreResult<InvocationRecord> {
        let sql =
            "UPDATE invocations SET status = 'pending', next_run_at_ms = ?1, modified_at_ms = ?1, \
             journal_len = ?3 + 1, \
             journal_bytes = (SELECT COALESCE(SUM(COALESCE(LENGTH(value), 0) \
                 + COALESCE(LENGTH(name), 0)), 0) FROM journal WHERE invocation_id = ?2), \
             completed_at_ms = NULL, failure = NULL, waiting_for = NULL, failures = 0, \
             position_failures = 0, last_error = ?4, \
             cancel_requested_at_ms = CASE WHEN ?5 THEN cancel_requested_at_ms ELSE NULL END, \
             restart_key = ?6 \
             WHERE id = ?2";
        self.write_invocation(id, sql, params![now_ms, id, from, reason, keep_cancel, key])?
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))
    }

    async fn mark_paused(
        &mut self,
        id: &str,
        reason: &str,
        now_ms: i64,
    ) -> StoreResult<Option<InvocationRecord>> {
        let sql =
            "UPDATE invocations SET status = 'paused', last_error = ?1, next_run_at_ms = NULL, \
             waiting_for = NULL, modified_at_ms = ?2 WHERE id = ?3 \
             AND status IN ('pending', 'running', 'backing-off', 'suspended')";
        self.write_invocation(id, sql, params![reason, now_ms, id])
    }

    async fn mark_resumed(
        &mut self,
        id: &str,
        deployment_id: Option<&str>,
        now_ms: i64,
    ) -> StoreResult<Option<InvocationRecord>> {
        let sql = "UPDATE invocations SET status = 'pending', next_run_at_ms = ?1, \
             modified_at_ms = ?1, deployment_id = COALESCE(?2, deployment_id), \
             failures = 0, position_failures = 0 \
             WHERE id = ?3 AND status = 'paused'";
        self.write_invocation(id, sql, params![now_ms, deployment_id, id])
    }

    async fn retry_backoff_now(
        &mut self,
        id: &str,
        now_ms: i64,
    ) -> StoreResult<Option<InvocationRecord>> {
        let sql = "UPDATE invocations SET next_run_at_ms = ?1, modified_at_ms = ?1 \
             WHERE id = ?2 AND status = 'backing-off'";
        self.write_invocation(id, sql, params![now_ms, id])
    }

    async fn ended_before(&mut self, before_ms: i64, limit: u32) -> StoreResult<Vec<String>> {
        self.all(
            "SELECT id FROM invocations WHERE completed_at_ms IS NOT NULL \
             AND completed_at_ms < ?1 ORDER BY completed_at_ms LIMIT ?2",
            params![before_ms, limit],
        )
    }

    async fn delete_invocation(&mut self, id: &str) -> StoreResult<()> {
        for sql in [
            "DELETE FROM journal WHERE invocation_id = ?1",
            "DELETE FROM completions WHERE invocation_id = ?1",
            "DELETE FROM timers WHERE invocation_id = ?1",
            "DELETE FROM signals WHERE invocation_id = ?1",
            "DELETE FROM state WHERE invocation_id = ?1",
            "DELETE FROM updates WHERE invocation_id = ?1",
            "DELETE FROM idempotency_keys WHERE invocation_id = ?1",
            "DELETE FROM workflows WHERE invocation_id = ?1",
            "DELETE FROM invocations WHERE id = ?1",
        ] {
            execute(&self.conn, sql, [id])?;
        }
        Ok(())
    }

    async fn restart_key(&mut self, id: &str) -> StoreResult<Option<String>> {
        Ok(self
            .one::<Option<String>>("SELECT restart_key FROM invocations WHERE id = ?1", [id])?
            .flatten())
    }

    async fn inherit_parent(&mut self, from: &str, to: &str) -> StoreResult<()> {
        execute(
            &self.conn,
            "UPDATE invocations SET (parent_invocation_id, parent_index, parent_close) = \
             (SELECT parent_invocation_id, parent_index, parent_close FROM invocations \
             WHERE id = ?1) WHERE id = ?2",
            params![from, to],
        )?;
        Ok(())
    }

    async fn open_children(&mut self, parent: &str) -> StoreResult<Vec<(String, ParentClose)>> {
        let rows = query_all(
            &self.conn,
            "SELECT id, parent_close FROM invocations WHERE parent_invocation_id = ?1 \
             AND completed_at_ms IS NULL ORDER BY id",
            [parent],
            |row| {
                Ok(Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, Option<String>>(1)?,
                )))
            },
        )?;
        Ok(rows
            .into_iter()
            .map(|(id, policy)| (id, parent_close(policy.as_deref())))
            .collect())
    }

    async fn close_run(
        &mut self,
        id: &str,
        output: &StoredEntry,
    ) -> StoreResult<Vec<(String, ParentClose)>> {
        insert_entry(&self.conn, id, output)?;
        execute(
            &self.conn,
            "DELETE FROM timers WHERE invocation_id = ?1",
            [id],
        )?;
        execute(
            &self.conn,
            "UPDATE updates SET status = 'abandoned' \
             WHERE invocation_id = ?1 AND status IN ('pending', 'accepted')",
            [id],
        )?;
        self.open_children(id).await
    }

    async fn past_deadline(
        &mut self,
        now_ms: i64,
        limit: u32,
    ) -> StoreResult<Vec<(String, i64, i64)>> {
        query_all(
            &self.conn,
            "SELECT id, created_at_ms, deadline_ms FROM invocations \
             WHERE deadline_ms IS NOT NULL AND completed_at_ms IS NULL \
             AND deadline_ms <= ?1 ORDER BY deadline_ms LIMIT ?2",
            params![now_ms, limit],
            |row| Ok(Ok((row.get(0)?, row.get(1)?, row.get(2)?))),
        )
    }
}

#[async_trait]
impl Journal for SqliteTx {
    async fn insert_entry(&mut self, id: &str, entry: &StoredEntry) -> StoreResult<()> {
        insert_entry(&self.conn, id, entry)
    }

    async fn entry(&mut self, id: &str, index: u32) -> StoreResult<Option<StoredEntry>> {
        let sql = format!("{ENTRY_SELECT} WHERE j.invocation_id = ?1 AND j.idx = ?2");
        query_one(&self.conn, &sql, params![id, index], entry)
    }

    async fn find_entry(
        &mut self,
        id: &str,
        kind: EntryKind,
        name: &str,
        key: Option<&[u8]>,
        occurrence: u32,
    ) -> StoreResult<Option<StoredEntry>> {
        let sql = format!(
            "{ENTRY_SELECT} WHERE j.invocation_id = ?1 AND j.kind = ?2 AND j.name = ?3 \
             AND (?4 IS NULL OR j.value = ?4) ORDER BY j.idx LIMIT 1 OFFSET ?5"
        );
        query_one(
            &self.conn,
            &sql,
            params![id, kind.as_str(), name, key, occurrence],
            entry,
        )
    }

    async fn command(&mut self, id: &str, index: u32) -> StoreResult<Option<CommandRow>> {
        query_one(
            &self.conn,
            "SELECT j.kind, c.seq, t.wake_at_ms FROM journal j \
             LEFT JOIN completions c ON c.invocation_id = j.invocation_id AND c.idx = j.idx \
             LEFT JOIN timers t ON t.invocation_id = j.invocation_id AND t.idx = j.idx \
             WHERE j.invocation_id = ?1 AND j.idx = ?2",
            params![id, index],
            |row| {
                let kind: String = row.get(0)?;
                Ok(Ok(CommandRow {
                    kind: EntryKind::parse(&kind),
                    completed: row.get(1)?,
                    wake_at_ms: row.get(2)?,
                }))
            },
        )
    }

    async fn open_signal_waits(&mut self, id: &str, name: &str) -> StoreResult<Vec<u32>> {
        self.all(
            "SELECT j.idx FROM journal j WHERE j.invocation_id = ?1 AND j.kind = 'signal' \
             AND j.name = ?2 AND NOT EXISTS (SELECT 1 FROM completions c \
             WHERE c.invocation_id = j.invocation_id AND c.idx = j.idx) ORDER BY j.idx",
            params![id, name],
        )
    }

    async fn open_signal_wait(&mut self, id: &str, index: u32) -> StoreResult<Option<String>> {
        self.one(
            "SELECT j.name FROM journal j WHERE j.invocation_id = ?1 AND j.idx = ?2 \
             AND j.kind = 'signal' AND NOT EXISTS (SELECT 1 FROM completions c \
             WHERE c.invocation_id = j.invocation_id AND c.idx = j.idx)",
            params![id, index],
        )
    }

    async fn first_start_after(
        &mut self,
        id: &str,
        from: u32,
    ) -> StoreResult<Option<(u32, String)>> {
        query_one(
            &self.conn,
            "SELECT idx, kind FROM journal WHERE invocation_id = ?1 AND idx > ?2 \
             AND kind IN ('call', 'send', 'update', 'update_result') ORDER BY idx LIMIT 1",
            params![id, from],
            |row| Ok(Ok((row.get(0)?, row.get(1)?))),
        )
    }

    async fn truncate(&mut self, id: &str, from: u32) -> StoreResult<()> {
        for sql in [
            "DELETE FROM journal WHERE invocation_id = ?1 AND idx > ?2",
            "DELETE FROM completions WHERE invocation_id = ?1 AND idx > ?2",
            "DELETE FROM timers WHERE invocation_id = ?1 AND idx > ?2",
            "UPDATE signals SET consumed_by = NULL WHERE invocation_id = ?1 AND consumed_by > ?2",
        ] {
            execute(&self.conn, sql, params![id, from])?;
        }
        Ok(())
    }

    async fn state_entries(&mut self, id: &str) -> StoreResult<Vec<(String, Option<Vec<u8>>)>> {
        query_all(
            &self.conn,
            "SELECT name, value FROM journal WHERE invocation_id = ?1 AND kind = 'state' \
             ORDER BY idx",
            [id],
            |row| Ok(Ok((row.get(0)?, row.get(1)?))),
        )
    }

    async fn has_cancel(&mut self, id: &str) -> StoreResult<bool> {
        Ok(self
            .one::<i64>(
                "SELECT 1 FROM journal WHERE invocation_id = ?1 AND kind = 'cancel' LIMIT 1",
                [id],
            )?
            .is_some())
    }
}

#[async_trait]
impl Completions for SqliteTx {
    async fn next_completion_seq(&mut self, id: &str) -> StoreResult<u32> {
        Ok(self
            .one(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM completions WHERE invocation_id = ?1",
                [id],
            )?
            .unwrap_or(1))
    }

    async fn insert_completion(
        &mut self,
        id: &str,
        index: u32,
        completion: &StoredCompletion,
    ) -> StoreResult<()> {
        let failure = completion.failure.as_ref().map(to_json).transpose()?;
        execute(
            &self.conn,
            "INSERT INTO completions (invocation_id, idx, seq, value, failure, at_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                id,
                index,
                completion.seq,
                completion.value,
                failure,
                completion.at_ms
            ],
        )?;
        Ok(())
    }

    async fn cancel_seq(&mut self, id: &str) -> StoreResult<Option<u32>> {
        self.one(
            "SELECT c.seq FROM journal j JOIN completions c \
             ON c.invocation_id = j.invocation_id AND c.idx = j.idx \
             WHERE j.invocation_id = ?1 AND j.kind = 'cancel' ORDER BY j.idx LIMIT 1",
            [id],
        )
    }

    async fn insert_timer(&mut self, id: &str, index: u32, wake_at_ms: i64) -> StoreResult<()> {
        execute(
            &self.conn,
            "INSERT INTO timers (invocation_id, idx, wake_at_ms) VALUES (?1, ?2, ?3)",
            params![id, index, wake_at_ms],
        )?;
        Ok(())
    }

    async fn due_timers(&mut self, id: &str, by_ms: i64) -> StoreResult<Vec<u32>> {
        self.all(
            "SELECT idx FROM timers WHERE invocation_id = ?1 AND wake_at_ms <= ?2 \
             ORDER BY wake_at_ms, idx",
            params![id, by_ms],
        )
    }

    async fn delete_timer(&mut self, id: &str, index: u32) -> StoreResult<()> {
        execute(
            &self.conn,
            "DELETE FROM timers WHERE invocation_id = ?1 AND idx = ?2",
            params![id, index],
        )?;
        Ok(())
    }
}

#[async_trait]
impl Signals for SqliteTx {
    async fn signal_by_key(
        &mut self,
        scope: KeyScope<'_>,
        key: &str,
    ) -> StoreResult<Option<(String, u32)>> {
        let pair = |row: &rusqlite::Row<'_>| Ok(Ok((row.get(0)?, row.get(1)?)));
        match scope {
            KeyScope::Invocation(id) => query_one(
                &self.conn,
                "SELECT invocation_id, seq FROM signals \
                 WHERE invocation_id = ?1 AND idempotency_key = ?2",
                params![id, key],
                pair,
            ),
            KeyScope::Workflow {
                workflow,
                workflow_id,
            } => query_one(
                &self.conn,
                "SELECT s.invocation_id, s.seq FROM signals s \
                 JOIN invocations i ON i.id = s.invocation_id \
                 WHERE s.idempotency_key = ?1 AND i.service = ?2 AND i.workflow_id = ?3 \
                 LIMIT 1",
                params![key, workflow, workflow_id],
                pair,
            ),
        }
    }

    async fn next_signal_seq(&mut self, id: &str) -> StoreResult<u32> {
        Ok(self
            .one(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM signals WHERE invocation_id = ?1",
                [id],
            )?
            .unwrap_or(1))
    }

    async fn insert_signal(
        &mut self,
        id: &str,
        seq: u32,
        name: &str,
        value: &[u8],
        key: Option<&str>,
        consumed_by: Option<u32>,
        during_attempt: Option<u32>,
        at_ms: i64,
    ) -> StoreResult<()> {
        execute(
            &self.conn,
            "INSERT INTO signals (invocation_id, seq, name, value, idempotency_key, \
             consumed_by, during_attempt, at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                id,
                seq,
                name,
                value,
                key,
                consumed_by,
                during_attempt,
                at_ms
            ],
        )?;
        Ok(())
    }

    async fn unseen_arrivals(
        &mut self,
        id: &str,
        attempt: u32,
    ) -> StoreResult<(Option<String>, bool)> {
        Ok(query_one(
            &self.conn,
            "SELECT (SELECT group_concat('\"' || name || '\" (#' || seq || ')', ', ') \
             FROM (SELECT name, seq FROM signals WHERE invocation_id = ?1 \
             AND consumed_by IS NULL AND during_attempt = ?2 ORDER BY seq)), \
             EXISTS (SELECT 1 FROM updates u JOIN invocations i ON i.id = u.invocation_id \
             WHERE u.invocation_id = ?1 AND u.status = 'pending' AND (u.during_attempt = ?2 \
             OR (u.during_attempt IS NULL \
             AND u.created_at_ms > COALESCE(i.attempt_started_at_ms, 0))))",
            params![id, attempt],
            |row| Ok(Ok((row.get(0)?, row.get(1)?))),
        )?
        .unwrap_or((None, false)))
    }

    async fn oldest_buffered(
        &mut self,
        id: &str,
        name: &str,
    ) -> StoreResult<Option<BufferedSignal>> {
        query_one(
            &self.conn,
            "SELECT seq, value, at_ms FROM signals WHERE invocation_id = ?1 AND name = ?2 \
             AND consumed_by IS NULL ORDER BY seq LIMIT 1",
            params![id, name],
            |row| {
                Ok(Ok(BufferedSignal {
                    seq: row.get(0)?,
                    value: row.get(1)?,
                    at_ms: row.get(2)?,
                }))
            },
        )
    }

    async fn consume_signal(&mut self, id: &str, seq: u32, index: u32) -> StoreResult<()> {
        execute(
            &self.conn,
            "UPDATE signals SET consumed_by = ?1 WHERE invocation_id = ?2 AND seq = ?3",
            params![index, id, seq],
        )?;
        Ok(())
    }

    async fn buffered(&mut self, id: &str) -> StoreResult<(u32, i64)> {
        Ok(query_one(
            &self.conn,
            "SELECT COUNT(*), COALESCE(SUM(COALESCE(LENGTH(value), 0) + LENGTH(name)), 0) \
             FROM signals WHERE invocation_id = ?1 AND consumed_by IS NULL",
            [id],
            |row| Ok(Ok((row.get(0)?, row.get(1)?))),
        )?
        .unwrap_or((0, 0)))
    }

    async fn move_buffered(&mut self, from: &str, to: &str) -> StoreResult<(u32, i64)> {
        let moved = self.buffered(from).await?;
        if moved.0 == 0 {
            return Ok(moved);
        }
        execute(
            &self.conn,
            "INSERT INTO signals (invocation_id, seq, name, value, idempotency_key, \
             consumed_by, during_attempt, at_ms) \
             SELECT ?2, (SELECT COALESCE(MAX(seq), 0) FROM signals WHERE invocation_id = ?2) \
             + ROW_NUMBER() OVER (ORDER BY seq), name, value, idempotency_key, NULL, NULL, at_ms \
             FROM signals WHERE invocation_id = ?1 AND consumed_by IS NULL ORDER BY seq",
            params![from, to],
        )?;
        execute(
            &self.conn,
            "DELETE FROM signals WHERE invocation_id = ?1 AND consumed_by IS NULL",
            [from],
        )?;
        Ok(moved)
    }

    async fn drop_buffered(&mut self, id: &str, prefix: &str) -> StoreResult<()> {
        execute(
            &self.conn,
            "DELETE FROM signals WHERE invocation_id = ?1 AND consumed_by IS NULL \
             AND substr(name, 1, length(?2)) = ?2",
            params![id, prefix],
        )?;
        Ok(())
    }
}

#[async_trait]
impl Workflows for SqliteTx {
    async fn lock_workflow_id(&mut self, _workflow: &str, _workflow_id: &str) -> StoreResult<()> {
        // The one writer runs one rule at a time.
        Ok(())
    }

    async fn workflow_run(
        &mut self,
        workflow: &str,
        workflow_id: &str,
    ) -> StoreResult<Option<(String, String)>> {
        query_one(
            &self.conn,
            "SELECT invocation_id, input_digest FROM workflows \
             WHERE workflow = ?1 AND workflow_id = ?2",
            params![workflow, workflow_id],
            |row| Ok(Ok((row.get(0)?, row.get(1)?))),
        )
    }

    async fn take_workflow_id(
        &mut self,
        workflow: &str,
        workflow_id: &str,
        invocation: &str,
        input_digest: &str,
    ) -> StoreResult<()> {
        execute(
            &self.conn,
            "INSERT INTO workflows (workflow, workflow_id, invocation_id, input_digest) \
             VALUES (?1, ?2, ?3, ?4) ON CONFLICT (workflow, workflow_id) DO UPDATE \
             SET invocation_id = excluded.invocation_id, input_digest = excluded.input_digest",
            params![workflow, workflow_id, invocation, input_digest],
        )?;
        Ok(())
    }

    async fn point_workflow_id(
        &mut self,
        workflow: &str,
        workflow_id: &str,
        invocation: &str,
    ) -> StoreResult<()> {
        execute(
            &self.conn,
            "UPDATE workflows SET invocation_id = ?1 WHERE workflow = ?2 AND workflow_id = ?3",
            params![invocation, workflow, workflow_id],
        )?;
        Ok(())
    }
}

#[async_trait]
impl State for SqliteTx {
    async fn put_state(&mut self, id: &str, key: &str, value: Option<&[u8]>) -> StoreResult<()> {
        execute(
            &self.conn,
            "INSERT INTO state (invocation_id, key, value) VALUES (?1, ?2, ?3) \
             ON CONFLICT (invocation_id, key) DO UPDATE SET value = excluded.value",
            params![id, key, value],
        )?;
        Ok(())
    }

    async fn clear_state(&mut self, id: &str) -> StoreResult<()> {
        execute(
            &self.conn,
            "DELETE FROM state WHERE invocation_id = ?1",
            [id],
        )?;
        Ok(())
    }
}

#[async_trait]
impl Updates for SqliteTx {
    async fn update(&mut self, run: &str, id: &str) -> StoreResult<Option<UpdateRecord>> {
        let sql =
            format!("SELECT {UPDATE_COLUMNS} FROM updates WHERE invocation_id = ?1 AND id = ?2");
        query_one(&self.conn, &sql, params![run, id], update_row)
    }

    async fn update_by_key(
        &mut self,
        scope: KeyScope<'_>,
        key: &str,
    ) -> StoreResult<Option<UpdateRecord>> {
        match scope {
            KeyScope::Invocation(run) => {
                let sql = format!(
                    "SELECT {UPDATE_COLUMNS} FROM updates \
                     WHERE invocation_id = ?1 AND idempotency_key = ?2"
                );
                query_one(&self.conn, &sql, params![run, key], update_row)
            }
            KeyScope::Workflow {
                workflow,
                workflow_id,
            } => query_one(
                &self.conn,
                "SELECT u.invocation_id, u.id, u.name, u.status, u.result, u.failure \
                 FROM updates u JOIN invocations i ON i.id = u.invocation_id \
                 WHERE u.idempotency_key = ?1 AND i.service = ?2 AND i.workflow_id = ?3 \
                 LIMIT 1",
                params![key, workflow, workflow_id],
                update_row,
            ),
        }
    }

    async fn insert_update(
        &mut self,
        run: &str,
        id: &str,
        name: &str,
        input: &[u8],
        key: Option<&str>,
        during_attempt: Option<u32>,
        now_ms: i64,
    ) -> StoreResult<()> {
        execute(
            &self.conn,
            "INSERT INTO updates (invocation_id, id, name, input, idempotency_key, status, \
             created_at_ms, during_attempt) VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6, ?7)",
            params![run, id, name, input, key, now_ms, during_attempt],
        )?;
        Ok(())
    }

    async fn set_update_status(
        &mut self,
        run: &str,
        id: &str,
        from: UpdateStatus,
        to: UpdateStatus,
        result: Option<&[u8]>,
        failure: Option<&Failure>,
    ) -> StoreResult<()> {
        let failure = failure.map(to_json).transpose()?;
        execute(
            &self.conn,
            "UPDATE updates SET status = ?4, result = COALESCE(?5, result), \
             failure = COALESCE(?6, failure) \
             WHERE invocation_id = ?1 AND id = ?2 AND status = ?3",
            params![run, id, from.as_str(), to.as_str(), result, failure],
        )?;
        Ok(())
    }

    async fn updates_since_attempt(&mut self, run: &str) -> StoreResult<bool> {
        Ok(self
            .one::<i64>(
                "SELECT 1 FROM updates u JOIN invocations i ON i.id = u.invocation_id \
                 WHERE u.invocation_id = ?1 AND u.status = 'pending' \
                 AND (u.during_attempt = i.attempt OR (u.during_attempt IS NULL \
                 AND u.created_at_ms > COALESCE(i.attempt_started_at_ms, 0))) LIMIT 1",
                [run],
            )?
            .is_some())
    }
}

#[async_trait]
impl Schedules for SqliteTx {
    async fn lock_schedule(&mut self, id: &str) -> StoreResult<Option<ScheduleRow>> {
        // The one writer runs one rule at a time.
        query_one(
            &self.conn,
            &format!("SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE id = ?1"),
            [id],
            schedule,
        )
    }

    async fn put_schedule(&mut self, row: &ScheduleRow) -> StoreResult<()> {
        execute(
            &self.conn,
            "INSERT INTO schedules (id, source, spec, state, due_ms) VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (id) DO UPDATE SET source = excluded.source, spec = excluded.spec, \
             state = excluded.state, due_ms = excluded.due_ms",
            params![row.id, row.source, row.spec, row.state, row.due_ms],
        )?;
        Ok(())
    }

    async fn delete_schedule(&mut self, id: &str) -> StoreResult<bool> {
        Ok(execute(&self.conn, "DELETE FROM schedules WHERE id = ?1", [id])? > 0)
    }
}

#[async_trait]
impl WebhookSources for SqliteTx {
    async fn lock_webhook_source(&mut self, name: &str) -> StoreResult<Option<WebhookSourceRow>> {
        // The one writer runs one rule at a time.
        query_one(
            &self.conn,
            &format!("SELECT {WEBHOOK_SOURCE_COLUMNS} FROM webhook_sources WHERE name = ?1"),
            [name],
            webhook_source,
        )
    }

    async fn put_webhook_source(&mut self, row: &WebhookSourceRow) -> StoreResult<()> {
        execute(
            &self.conn,
            "INSERT INTO webhook_sources (name, origin, config, created_at_ms, updated_at_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (name) DO UPDATE SET origin = excluded.origin, \
             config = excluded.config, updated_at_ms = excluded.updated_at_ms",
            params![
                row.name,
                row.origin,
                row.config,
                row.created_at_ms,
                row.updated_at_ms
            ],
        )?;
        Ok(())
    }

    async fn delete_webhook_source(&mut self, name: &str) -> StoreResult<bool> {
        execute(
            &self.conn,
            "DELETE FROM webhook_deliveries WHERE source = ?1",
            [name],
        )?;
        Ok(execute(
            &self.conn,
            "DELETE FROM webhook_sources WHERE name = ?1",
            [name],
        )? > 0)
    }

    async fn insert_webhook_delivery(
        &mut self,
        source: &str,
        delivery: &str,
        keep: u32,
    ) -> StoreResult<()> {
        execute(
            &self.conn,
            "INSERT INTO webhook_deliveries (source, delivery) VALUES (?1, ?2)",
            params![source, delivery],
        )?;
        execute(
            &self.conn,
            "DELETE FROM webhook_deliveries WHERE source = ?1 AND id <= \
             (SELECT id FROM webhook_deliveries WHERE source = ?1 ORDER BY id DESC \
              LIMIT 1 OFFSET ?2)",
            params![source, keep],
        )?;
        Ok(())
    }
}

/// A key's limit as stored: 0 for a shared handler's invocation.
pub(super) fn stored_limit(key: &InvocationKey) -> u32 {
    if key.shared {
        0
    } else {
        key.limit
    }
}

#[async_trait]
impl Keys for SqliteTx {
    async fn lock_key(&mut self, _service: &str, _key: &str) -> StoreResult<()> {
        // The one writer runs one rule at a time.
        Ok(())
    }

    async fn key_holders(&mut self, service: &str, key: &str) -> StoreResult<u32> {
        // The terms of the partial index `invocations_by_key`, so that it serves.
        Ok(self
            .one(
                concat!(
                    "SELECT COUNT(*) FROM invocations WHERE service = ?1 \
                     AND concurrency_key = ?2 AND ",
                    unfinished!(),
                    " AND status <> 'queued' AND key_limit > 0"
                ),
                params![service, key],
            )?
            .unwrap_or(0))
    }

    async fn set_key(
        &mut self,
        id: &str,
        service: &str,
        key: &InvocationKey,
        queued: bool,
        debounce_until_ms: Option<i64>,
    ) -> StoreResult<()> {
        // A restart gives no rate (`key` read back): the one it was created under stays.
        execute(
            &self.conn,
            concat!(
                "UPDATE invocations SET concurrency_key = ?2, key_limit = ?3, \
                 key_seq = (SELECT COALESCE(MAX(key_seq), 0) + 1 FROM invocations \
                 WHERE service = ?5 AND concurrency_key = ?2 AND ",
                unfinished!(),
                "), status = CASE WHEN ?4 THEN 'queued' ELSE status END, \
                 next_run_at_ms = CASE WHEN ?4 THEN NULL ELSE next_run_at_ms END, \
                 key_rate_limit = COALESCE(?6, key_rate_limit), \
                 key_rate_period_ms = COALESCE(?7, key_rate_period_ms), \
                 debounce_until_ms = ?8 \
                 WHERE id = ?1"
            ),
            params![
                id,
                key.key,
                stored_limit(key),
                queued,
                service,
                key.rate.map(|r| r.limit),
                key.rate.map(|r| r.period_ms),
                debounce_until_ms
            ],
        )?;
        Ok(())
    }

    async fn newest_unstarted(
        &mut self,
        service: &str,
        handler: &str,
        key: &str,
    ) -> StoreResult<Option<(String, Option<i64>)>> {
        query_one(
            &self.conn,
            concat!(
                "SELECT id, debounce_until_ms FROM invocations \
                 WHERE service = ?1 AND concurrency_key = ?2 AND ",
                unfinished!(),
                " AND status IN ('queued', 'pending') AND attempt = 0 AND key_limit > 0 \
                 AND handler = ?3 AND parent_invocation_id IS NULL \
                 ORDER BY key_seq DESC LIMIT 1"
            ),
            params![service, key, handler],
            |row| Ok(Ok((row.get(0)?, row.get(1)?))),
        )
    }

    async fn start_rate(&mut self, id: &str) -> StoreResult<Option<StartRate>> {
        Ok(query_one(
            &self.conn,
            "SELECT key_rate_limit, key_rate_period_ms FROM invocations WHERE id = ?1",
            [id],
            |row| Ok(Ok(StartRate::from_columns(row.get(0)?, row.get(1)?))),
        )?
        .flatten())
    }

    async fn nth_latest_start(
        &mut self,
        service: &str,
        handler: &str,
        key: &str,
        nth: u32,
    ) -> StoreResult<Option<i64>> {
        self.one(
            "SELECT at_ms FROM key_starts WHERE service = ?1 AND key = ?2 AND handler = ?4 \
             ORDER BY at_ms DESC LIMIT 1 OFFSET ?3",
            params![service, key, nth.saturating_sub(1), handler],
        )
    }

    async fn record_start(
        &mut self,
        service: &str,
        handler: &str,
        key: &str,
        at_ms: i64,
        forget_through_ms: i64,
    ) -> StoreResult<()> {
        execute(
            &self.conn,
            "DELETE FROM key_starts WHERE service = ?1 AND key = ?2 AND at_ms <= ?3 AND handler = ?4",
            params![service, key, forget_through_ms, handler],
        )?;
        execute(
            &self.conn,
            "INSERT INTO key_starts (service, key, at_ms, handler) VALUES (?1, ?2, ?3, ?4)",
            params![service, key, at_ms, handler],
        )?;
        Ok(())
    }

    async fn oldest_rate_waiter(
        &mut self,
        service: &str,
        handler: &str,
        key: &str,
        due_by_ms: i64,
    ) -> StoreResult<Option<String>> {
        self.one(
            concat!(
                "SELECT id FROM invocations WHERE service = ?1 AND concurrency_key = ?2 AND ",
                unfinished!(),
                " AND status = 'pending' AND attempt = 0 AND key_rate_limit IS NOT NULL \
                 AND next_run_at_ms <= ?4 AND handler = ?3 ORDER BY key_seq LIMIT 1"
            ),
            params![service, key, handler, due_by_ms],
        )
    }

    async fn rate_waiters_ahead(
        &mut self,
        service: &str,
        handler: &str,
        key: &str,
        id: &str,
    ) -> StoreResult<u32> {
        Ok(self
            .one(
                concat!(
                    "SELECT COUNT(*) FROM invocations WHERE service = ?1 \
                     AND concurrency_key = ?2 AND ",
                    unfinished!(),
                    " AND status = 'pending' AND attempt = 0 AND key_rate_limit IS NOT NULL \
                     AND handler = ?3 AND key_seq < (SELECT key_seq FROM invocations WHERE id = ?4)"
                ),
                params![service, key, handler, id],
            )?
            .unwrap_or(0))
    }

    async fn forget_starts_before(&mut self, before_ms: i64) -> StoreResult<()> {
        execute(
            &self.conn,
            "DELETE FROM key_starts WHERE at_ms < ?1",
            [before_ms],
        )?;
        Ok(())
    }

    async fn start_at(&mut self, id: &str, due_ms: i64) -> StoreResult<()> {
        execute(
            &self.conn,
            "UPDATE invocations SET next_run_at_ms = ?2 WHERE id = ?1 AND status = 'pending'",
            params![id, due_ms],
        )?;
        Ok(())
    }

    async fn apply_key_state(&mut self, id: &str, service: &str, key: &str) -> StoreResult<()> {
        execute(
            &self.conn,
            "INSERT INTO key_state (service, key, name, value) \
             SELECT ?2, ?3, key, value FROM state WHERE invocation_id = ?1 AND value IS NOT NULL \
             ON CONFLICT (service, key, name) DO UPDATE SET value = excluded.value",
            params![id, service, key],
        )?;
        execute(
            &self.conn,
            "DELETE FROM key_state WHERE service = ?2 AND key = ?3 AND name IN \
             (SELECT key FROM state WHERE invocation_id = ?1 AND value IS NULL)",
            params![id, service, key],
        )?;
        Ok(())
    }

    async fn release_queued(
        &mut self,
        service: &str,
        key: &str,
        count: u32,
        now_ms: i64,
    ) -> StoreResult<Vec<String>> {
        self.all(
            concat!(
                "UPDATE invocations SET status = 'pending', next_run_at_ms = ?4, \
                 modified_at_ms = ?4 WHERE id IN (SELECT id FROM invocations \
                 WHERE service = ?1 AND concurrency_key = ?2 AND ",
                unfinished!(),
                " AND status = 'queued' ORDER BY key_seq LIMIT ?3) RETURNING id"
            ),
            params![service, key, count, now_ms],
        )
    }
}

#[async_trait]
impl IdempotencyKeys for SqliteTx {
    async fn lock_idempotency_key(&mut self, _scope: &str, _key: &str) -> StoreResult<()> {
        // The one writer runs one rule at a time.
        Ok(())
    }

    async fn idempotency_key(
        &mut self,
        scope: &str,
        key: &str,
    ) -> StoreResult<Option<(String, String, i64)>> {
        query_one(
            &self.conn,
            "SELECT request_digest, invocation_id, expires_at_ms FROM idempotency_keys \
             WHERE scope = ?1 AND key = ?2",
            [scope, key],
            |row| Ok(Ok((row.get(0)?, row.get(1)?, row.get(2)?))),
        )
    }

    async fn delete_idempotency_key(&mut self, scope: &str, key: &str) -> StoreResult<()> {
        execute(
            &self.conn,
            "DELETE FROM idempotency_keys WHERE scope = ?1 AND key = ?2",
            [scope, key],
        )?;
        Ok(())
    }

    async fn insert_idempotency_key(
        &mut self,
        claim: &IdempotencyClaim,
        invocation: &str,
    ) -> StoreResult<()> {
        execute(
            &self.conn,
            "INSERT INTO idempotency_keys (scope, key, request_digest, invocation_id, \
             expires_at_ms, retention_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                claim.scope,
                claim.key,
                claim.request_digest,
                invocation,
                i64::MAX,
                claim.retention_ms
            ],
        )?;
        Ok(())
    }

    async fn delete_expired_keys(&mut self, now_ms: i64) -> StoreResult<u64> {
        let n = execute(
            &self.conn,
            "DELETE FROM idempotency_keys WHERE expires_at_ms <= ?1",
            [now_ms],
        )?;
        Ok(n as u64)
    }

    async fn hold_idempotency_keys(
        &mut self,
        invocation: &str,
        from_ms: Option<i64>,
    ) -> StoreResult<()> {
        match from_ms {
            Some(now_ms) => execute(
                &self.conn,
                "UPDATE idempotency_keys SET expires_at_ms = ?1 + retention_ms \
                 WHERE invocation_id = ?2 AND retention_ms IS NOT NULL",
                params![now_ms, invocation],
            )?,
            None => execute(
                &self.conn,
                "UPDATE idempotency_keys SET expires_at_ms = ?2 WHERE invocation_id = ?1",
                params![invocation, i64::MAX],
            )?,
        };
        Ok(())
    }
}
