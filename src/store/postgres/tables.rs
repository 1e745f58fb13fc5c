//! The tables of the PostgreSQL store: each method one or two statements on the writer's
//! connection, inside the batch's transaction. Locks are explicit: an invocation's row
//! (`FOR UPDATE`) and a workflow id (a transaction-scoped advisory lock), which the rules
//! take in that order: the workflow id first.

use async_trait::async_trait;
use durin_protocol::{EntryKind, Failure};
use sqlx::postgres::PgRow;
use sqlx::PgConnection;

use super::batch::TxConn;
use super::lease::Lease;
use super::rows::*;
use super::{backend, corrupt, DB_NOW_MS};
use crate::store::tables::*;
use crate::store::*;

/// The unfinished children of the parent the parameter `parent` (`$1`, ...) names, in
/// order, as the end of a query.
fn open_children_of(parent: &str) -> String {
    format!(
        "FROM invocations WHERE parent_invocation_id = {parent} \
         AND completed_at_ms IS NULL ORDER BY id"
    )
}

/// What the end of a run deletes and abandons, as parts of a `WITH` on the run the
/// parameter `run` names, each only where `gate` (an `AND ...` or nothing) holds: its
/// timers, and its pending and accepted updates.
fn closing_parts(run: &str, gate: &str) -> String {
    format!(
        "timers AS (DELETE FROM timers WHERE invocation_id = {run}{gate}), \
         updates AS (UPDATE updates SET status = 'abandoned' WHERE invocation_id = {run} \
         AND status IN ('pending', 'accepted'){gate})"
    )
}

/// A child's `(id, parent_close)` row.
fn open_child(row: &PgRow) -> StoreResult<(String, ParentClose)> {
    let policy: Option<String> = get(row, 1)?;
    Ok((get(row, 0)?, parent_close(policy.as_deref())))
}

/// The fenced update that records how an attempt ended (`end`), on `$1` (the time), `$2`
/// and `$3` (the fence: id and attempt), `$4` (the output's bytes, 0 for an end that does
/// not end the invocation) and the end's own parameters from `$5` (see [`bind_end`]); with
/// the number of its last parameter.
fn end_update(end: &AttemptEnd, unless_arrivals: bool) -> (String, usize) {
    let (set, last) = end_set(end, "$1");
    let arrivals = if unless_arrivals {
        " AND COALESCE(arrived_during_attempt, -1) <> $3"
    } else {
        ""
    };
    let sql = format!(
        "UPDATE invocations SET {set}, journal_bytes = journal_bytes + $4, \
         modified_at_ms = $1 WHERE id = $2 AND attempt = $3 AND status = 'running'{arrivals}"
    );
    (sql, last)
}

/// The columns an end (`end`) sets on the run's row, with `now` for the time and the end's
/// own parameters from `$5`; with the number of its last parameter.
fn end_set(end: &AttemptEnd, now: &str) -> (String, usize) {
    let (set, last) = match end {
        AttemptEnd::Completed { .. } => (
            "status = 'completed', journal_len = journal_len + 1, completed_at_ms = $1, \
             last_error = NULL",
            4,
        ),
        AttemptEnd::Failed { .. } => (
            "status = 'failed', journal_len = journal_len + 1, completed_at_ms = $1, \
             failure = $5",
            5,
        ),
        AttemptEnd::BackOff { .. } => (
            "status = 'backing-off', next_run_at_ms = $5, last_error = $6, \
             failures = failures + $7, position_failures = position_failures + $8",
            8,
        ),
        AttemptEnd::Suspended { .. } => (
            "status = 'suspended', next_run_at_ms = $5, waiting_for = $6",
            6,
        ),
        AttemptEnd::Paused { .. } => ("status = 'paused', last_error = $5", 5),
        AttemptEnd::Cancelled { .. } => (
            "status = 'cancelled', journal_len = journal_len + 1, completed_at_ms = $1, \
             failure = $5",
            5,
        ),
        AttemptEnd::ContinuedAsNew { .. } => (
            "status = 'continued', journal_len = journal_len + 1, completed_at_ms = $1, \
             last_error = NULL",
            4,
        ),
    };
    (set.replace("$1", now), last)
}

/// `query` (on [`end_update`]'s parameters first) with the end's parameters bound.
fn bind_end<'q>(
    query: Query<'q>,
    id: &'q str,
    attempt: u32,
    end: &AttemptEnd,
    suspended_due: Option<i64>,
    output_bytes: i64,
    now_ms: i64,
) -> StoreResult<Query<'q>> {
    let query = query
        .bind(now_ms)
        .bind(id)
        .bind(i64::from(attempt))
        .bind(output_bytes);
    let query = match end {
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
    Ok(query)
}

/// A writer's connection inside the batch's transaction, and this node's lease, which the
/// first attempt of a new invocation takes.
pub(super) struct PgTx<'c> {
    pub(super) conn: TxConn<'c>,
    pub(super) lease: Lease,
}

/// A journal entry's fields after its invocation id and index (see [`ENTRY_COLUMNS`]),
/// as a row of a multi-row statement binds them (see [`bind_entry_arrays`]).
pub(super) struct EntryRow {
    kind: &'static str,
    name: Option<String>,
    value: Option<Vec<u8>>,
    content_type: Option<String>,
    failure: Option<String>,
    at_ms: i64,
}

impl EntryRow {
    fn of(entry: &StoredEntry) -> StoreResult<EntryRow> {
        Ok(EntryRow {
            kind: entry.kind.as_str(),
            name: entry.name.clone(),
            value: entry.value.clone(),
            content_type: entry.content_type.clone(),
            failure: entry.failure.as_ref().map(to_json).transpose()?,
            at_ms: entry.at_ms,
        })
    }
}

/// One field of each of `rows`, as the array a multi-row statement binds.
fn array<'r, R, T>(rows: &'r [R], field: impl Fn(&'r R) -> T) -> Vec<T> {
    rows.iter().map(field).collect()
}

/// `query` with the fields of `entries`, one array per field (six parameters: `TEXT[]`,
/// `TEXT[]`, `BYTEA[]`, `TEXT[]`, `TEXT[]`, `BIGINT[]`, from `kind` to `at_ms`), bound.
fn bind_entry_arrays<'q>(query: Query<'q>, entries: &[&'q EntryRow]) -> Query<'q> {
    query
        .bind(array(entries, |e| e.kind))
        .bind(array(entries, |e| e.name.as_deref()))
        .bind(array(entries, |e| e.value.as_deref()))
        .bind(array(entries, |e| e.content_type.as_deref()))
        .bind(array(entries, |e| e.failure.as_deref()))
        .bind(array(entries, |e| e.at_ms))
}

/// Runs a multi-row statement, each row's entry bound last (see [`bind_entry_arrays`]), and
/// answers each of `rows`, in order, with what `decode` makes of the result row of its
/// invocation (its id and its answer), or `None` when the statement returned none for it.
/// The rows name distinct invocations.
async fn answers_by_invocation<'q, R, T>(
    conn: &mut PgConnection,
    query: Query<'q>,
    entries: &[&'q EntryRow],
    rows: &[R],
    id: impl Fn(&R) -> &str,
    decode: impl Fn(&PgRow) -> StoreResult<(String, T)>,
) -> StoreResult<Vec<Option<T>>> {
    let found = bind_entry_arrays(query, entries)
        .fetch_all(conn)
        .await
        .map_err(backend)?;
    let mut answers = std::collections::HashMap::with_capacity(found.len());
    for row in &found {
        let (id, answer) = decode(row)?;
        answers.insert(id, answer);
    }
    Ok(rows.iter().map(|r| answers.remove(id(r))).collect())
}

/// An append's growth of an invocation's journal, a row of [`grow_journals`].
pub(super) struct GrowRow {
    pub(super) id: String,
    attempt: i64,
    index: Option<i64>,
    token: Option<String>,
    bytes: i64,
    max_entries: i64,
    max_bytes: i64,
    entry: EntryRow,
}

/// Grows the journal of each row's invocation by the row's entry, at its next free index,
/// where its attempt (and index, and token, when given) still hold and within the row's
/// limits: for each row, in order, the index its entry took, or `None` when refused. The
/// rows name distinct invocations.
pub(super) async fn grow_journals(
    conn: &mut PgConnection,
    rows: &[GrowRow],
) -> StoreResult<Vec<Option<u32>>> {
    let query = sqlx::query(
        "WITH input AS (SELECT * FROM unnest($1::TEXT[], $2::BIGINT[], $3::BIGINT[], \
         $4::TEXT[], $5::BIGINT[], $6::BIGINT[], $7::BIGINT[], $8::TEXT[], $9::TEXT[], \
         $10::BYTEA[], $11::TEXT[], $12::TEXT[], $13::BIGINT[]) AS r(id, attempt, idx, \
         token, bytes, max_entries, max_bytes, kind, name, value, content_type, failure, \
         at_ms)), \
         grown AS (UPDATE invocations i SET journal_len = i.journal_len + 1, \
         journal_bytes = i.journal_bytes + r.bytes, position_failures = 0, \
         modified_at_ms = r.at_ms FROM input r \
         WHERE i.id = r.id AND i.attempt = r.attempt AND i.status = 'running' \
         AND (r.idx IS NULL OR i.journal_len = r.idx) \
         AND (r.token IS NULL OR i.attempt_token = r.token) \
         AND i.journal_len < r.max_entries AND i.journal_bytes + r.bytes <= r.max_bytes \
         RETURNING i.id, i.journal_len) \
         INSERT INTO journal (invocation_id, idx, kind, name, value, content_type, failure, \
         attempt, at_ms) \
         SELECT r.id, g.journal_len - 1, r.kind, r.name, r.value, r.content_type, r.failure, \
         r.attempt, r.at_ms FROM grown g JOIN input r ON r.id = g.id \
         RETURNING invocation_id, idx",
    )
    .bind(array(rows, |r| r.id.as_str()))
    .bind(array(rows, |r| r.attempt))
    .bind(array(rows, |r| r.index))
    .bind(array(rows, |r| r.token.as_deref()))
    .bind(array(rows, |r| r.bytes))
    .bind(array(rows, |r| r.max_entries))
    .bind(array(rows, |r| r.max_bytes));
    let entries = array(rows, |r| &r.entry);
    answers_by_invocation(
        conn,
        query,
        &entries,
        rows,
        |r| &r.id,
        |row| Ok((get::<String>(row, 0)?, get_u32(row, 1)?)),
    )
    .await
}

/// A new invocation with its first attempt running, leased to this node, and its input
/// entry: a row of [`insert_runnings`].
pub(super) struct RunningRow {
    pub(super) id: String,
    service: String,
    handler: String,
    deployment_id: String,
    now_ms: i64,
    idempotency_key: Option<String>,
    token: String,
    workflow_id: Option<String>,
    input_bytes: i64,
    deadline_ms: Option<i64>,
    traceparent: Option<String>,
    lease_owner: String,
    lease_ms: i64,
    input: EntryRow,
}

/// Inserts each row's invocation and its input entry (whose foreign key is checked at the
/// statement's end, when the invocation is there): for each row, in order, its record.
pub(super) async fn insert_runnings(
    conn: &mut PgConnection,
    rows: &[RunningRow],
) -> StoreResult<Vec<Option<InvocationRecord>>> {
    let sql = format!(
        "WITH input AS (SELECT * FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], \
         $5::BIGINT[], $6::TEXT[], $7::TEXT[], $8::TEXT[], $9::BIGINT[], $10::BIGINT[], \
         $11::TEXT[], $12::TEXT[], $13::BIGINT[], $14::TEXT[], $15::TEXT[], $16::BYTEA[], \
         $17::TEXT[], $18::TEXT[], $19::BIGINT[]) AS r(id, service, handler, deployment_id, \
         now_ms, idempotency_key, token, workflow_id, journal_bytes, deadline_ms, traceparent, \
         lease_owner, lease_ms, kind, name, value, content_type, failure, at_ms)), \
         invocation AS (INSERT INTO invocations (id, service, handler, deployment_id, \
         status, attempt, failures, position_failures, journal_len, next_run_at_ms, \
         idempotency_key, created_at_ms, modified_at_ms, attempt_token, workflow_id, \
         journal_bytes, deadline_ms, scheduled_at_ms, attempt_started_at_ms, traceparent, \
         lease_owner, lease_expires_at_ms) \
         SELECT id, service, handler, deployment_id, 'running', 1, 0, 0, 1, NULL::BIGINT, \
         idempotency_key, now_ms, now_ms, token, workflow_id, journal_bytes, deadline_ms, \
         now_ms, now_ms, traceparent, lease_owner, {DB_NOW_MS} + lease_ms FROM input \
         RETURNING {INVOCATION_COLUMNS}), \
         input_entry AS (INSERT INTO journal (invocation_id, idx, kind, name, value, \
         content_type, failure, attempt, at_ms) \
         SELECT id, 0, kind, name, value, content_type, failure, 0, at_ms FROM input) \
         SELECT {INVOCATION_COLUMNS} FROM invocation"
    );
    let query = sqlx::query(&sql)
        .bind(array(rows, |r| r.id.as_str()))
        .bind(array(rows, |r| r.service.as_str()))
        .bind(array(rows, |r| r.handler.as_str()))
        .bind(array(rows, |r| r.deployment_id.as_str()))
        .bind(array(rows, |r| r.now_ms))
        .bind(array(rows, |r| r.idempotency_key.as_deref()))
        .bind(array(rows, |r| r.token.as_str()))
        .bind(array(rows, |r| r.workflow_id.as_deref()))
        .bind(array(rows, |r| r.input_bytes))
        .bind(array(rows, |r| r.deadline_ms))
        .bind(array(rows, |r| r.traceparent.as_deref()))
        .bind(array(rows, |r| r.lease_owner.as_str()))
        .bind(array(rows, |r| r.lease_ms));
    let entries = array(rows, |r| &r.input);
    answers_by_invocation(
        conn,
        query,
        &entries,
        rows,
        |r| &r.id,
        |row| {
            let record = invocation(row)?;
            Ok((record.id.to_string(), record))
        },
    )
    .await
}

/// The completion of a run's attempt with its output entry: a row of [`complete_runs`].
pub(super) struct CompletionRow {
    pub(super) id: String,
    attempt: i64,
    now_ms: i64,
    output_bytes: i64,
    output: EntryRow,
}

/// A run just ended: its record, and its unfinished children with their parent-close
/// policies.
pub(super) type Closed = (InvocationRecord, Vec<(String, ParentClose)>);

/// Completes each row's run, fenced by its attempt and refused when an arrival was noted
/// during that attempt, and closes it as `record_final_end` does (its output entry at the
/// index the update reserved, its timers, its updates; its open children read): for each
/// row, in order, the run and its children, or `None` when refused. The rows name distinct
/// runs.
pub(super) async fn complete_runs(
    conn: &mut PgConnection,
    rows: &[CompletionRow],
) -> StoreResult<Vec<Option<Closed>>> {
    let completed = AttemptEnd::Completed {
        output: Vec::new(),
        content_type: None,
    };
    let (set, _) = end_set(&completed, "in_now_ms");
    let closing = closing_parts("ANY(ARRAY(SELECT id FROM ended))", "");
    let children = open_children_of("ended.id");
    // The input's columns are named apart from the invocation's, which the update's
    // `SET` and `RETURNING` name unqualified.
    let sql = format!(
        "WITH input AS (SELECT * FROM unnest($1::TEXT[], $2::BIGINT[], $3::BIGINT[], \
         $4::BIGINT[], $5::TEXT[], $6::TEXT[], $7::BYTEA[], $8::TEXT[], $9::TEXT[], \
         $10::BIGINT[]) AS r(in_id, in_attempt, in_now_ms, in_bytes, in_kind, in_name, \
         in_value, in_content_type, in_failure, in_at_ms)), \
         ended AS (UPDATE invocations SET {set}, journal_bytes = journal_bytes + in_bytes, \
         modified_at_ms = in_now_ms FROM input \
         WHERE id = in_id AND attempt = in_attempt AND status = 'running' \
         AND COALESCE(arrived_during_attempt, -1) <> in_attempt \
         RETURNING {INVOCATION_COLUMNS}), \
         output AS (INSERT INTO journal ({ENTRY_COLUMNS}) \
         SELECT id, journal_len - 1, in_kind, in_name, in_value, in_content_type, \
         in_failure, in_attempt, in_at_ms FROM ended JOIN input ON in_id = id), {closing} \
         SELECT ended.*, ARRAY(SELECT id {children}) AS children, \
         ARRAY(SELECT parent_close {children}) AS parent_close FROM ended"
    );
    let query = sqlx::query(&sql)
        .bind(array(rows, |r| r.id.as_str()))
        .bind(array(rows, |r| r.attempt))
        .bind(array(rows, |r| r.now_ms))
        .bind(array(rows, |r| r.output_bytes));
    let entries = array(rows, |r| &r.output);
    answers_by_invocation(
        conn,
        query,
        &entries,
        rows,
        |r| &r.id,
        |row| {
            let run = closed_run(row)?;
            Ok((run.0.id.to_string(), run))
        },
    )
    .await
}

/// A run that ended, from a row of its [`INVOCATION_COLUMNS`] followed by the arrays
/// `children` and `parent_close` of its open children.
fn closed_run(row: &PgRow) -> StoreResult<Closed> {
    let ids: Vec<String> = sqlx::Row::try_get(row, "children").map_err(backend)?;
    let policies: Vec<Option<String>> = sqlx::Row::try_get(row, "parent_close").map_err(backend)?;
    let children = ids
        .into_iter()
        .zip(policies)
        .map(|(id, policy)| (id, parent_close(policy.as_deref())))
        .collect();
    Ok((invocation(row)?, children))
}

pub(super) const UPDATE_COLUMNS: &str = "invocation_id, id, name, status, result, failure";

/// An update's row.
pub(super) fn update_row(row: &PgRow) -> StoreResult<UpdateRecord> {
    let run: String = get(row, 0)?;
    let status: String = get(row, 3)?;
    let failure: Option<String> = get(row, 5)?;
    Ok(UpdateRecord {
        invocation_id: InvocationId::parse(&run).map_err(corrupt)?,
        id: get(row, 1)?,
        name: get(row, 2)?,
        status: UpdateStatus::parse(&status)
            .ok_or_else(|| corrupt(format!("unknown update status {status:?}")))?,
        result: get(row, 4)?,
        failure: failure
            .map(|f| serde_json::from_str(&f))
            .transpose()
            .map_err(backend)?,
    })
}

type Query<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

impl PgTx<'_> {
    async fn execute(&mut self, query: Query<'_>) -> StoreResult<u64> {
        Ok(query
            .execute(self.conn.lock().await)
            .await
            .map_err(backend)?
            .rows_affected())
    }

    async fn optional(&mut self, query: Query<'_>) -> StoreResult<Option<PgRow>> {
        query
            .fetch_optional(self.conn.lock().await)
            .await
            .map_err(backend)
    }

    async fn all(&mut self, query: Query<'_>) -> StoreResult<Vec<PgRow>> {
        query
            .fetch_all(self.conn.lock().await)
            .await
            .map_err(backend)
    }

    async fn returning(&mut self, query: Query<'_>) -> StoreResult<Option<InvocationRecord>> {
        self.optional(query)
            .await?
            .as_ref()
            .map(invocation)
            .transpose()
    }
}

#[async_trait]
impl Invocations for PgTx<'_> {
    async fn invocation(&mut self, id: &str) -> StoreResult<Option<InvocationRecord>> {
        fetch_invocation(self.conn.lock().await, id).await
    }

    async fn lock_invocation(&mut self, id: &str) -> StoreResult<Option<InvocationRecord>> {
        lock_invocation(self.conn.lock().await, id).await
    }

    async fn insert_running(
        &mut self,
        new: &NewInvocation,
        workflow_id: Option<&str>,
        token: &str,
        input: &StoredEntry,
    ) -> StoreResult<InvocationRecord> {
        let row = RunningRow {
            id: new.id.to_string(),
            service: new.target.service.clone(),
            handler: new.target.handler.clone(),
            deployment_id: new.target.deployment_id.clone(),
            now_ms: new.now_ms,
            idempotency_key: new.idempotency.as_ref().map(|c| c.key.clone()),
            token: token.to_owned(),
            workflow_id: workflow_id.map(str::to_owned),
            input_bytes: new.input.len() as i64,
            deadline_ms: new.deadline_ms,
            traceparent: new.traceparent.clone(),
            lease_owner: self.lease.owner.to_string(),
            lease_ms: self.lease.ms,
            input: EntryRow::of(input)?,
        };
        self.conn.insert_running(row).await
    }

    async fn insert_pending(&mut self, new: &Pending<'_>, now_ms: i64) -> StoreResult<()> {
        self.execute(
            sqlx::query(
                "INSERT INTO invocations (id, service, handler, deployment_id, status, attempt, \
                 failures, position_failures, journal_len, next_run_at_ms, created_at_ms, \
                 modified_at_ms, journal_bytes, workflow_id, parent_invocation_id, \
                 parent_index, deadline_ms, parent_close, traceparent, idempotency_key) \
                 VALUES ($1, $2, $3, $4, 'pending', 0, 0, 0, 1, $5, $6, $6, $7, $8, $9, $10, \
                 $11, $12, $13, $14)",
            )
            .bind(new.id)
            .bind(new.service)
            .bind(new.handler)
            .bind(new.deployment_id)
            .bind(new.due_ms)
            .bind(now_ms)
            .bind(new.input.len() as i64)
            .bind(new.workflow_id)
            .bind(new.parent.map(|(p, _)| p))
            .bind(new.parent.and_then(|(_, index)| index).map(i64::from))
            .bind(new.deadline_ms)
            .bind(new.parent_close.map(ParentClose::as_str))
            .bind(new.traceparent.as_deref())
            .bind(new.idempotency_key),
        )
        .await?;
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
        let row = GrowRow {
            id: id.to_owned(),
            attempt: i64::from(attempt),
            index: index.map(i64::from),
            token: token.map(str::to_owned),
            bytes,
            max_entries: i64::from(max_entries),
            max_bytes,
            entry: EntryRow::of(entry)?,
        };
        self.conn.grow(row).await
    }

    async fn add_bytes(&mut self, id: &str, bytes: i64) -> StoreResult<()> {
        self.execute(
            sqlx::query("UPDATE invocations SET journal_bytes = journal_bytes + $2 WHERE id = $1")
                .bind(id)
                .bind(bytes),
        )
        .await?;
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
        let (update, _) = end_update(end, unless_arrivals);
        let sql = format!("{update} RETURNING {INVOCATION_COLUMNS}");
        let query = sqlx::query(&sql);
        let query = bind_end(query, id, attempt, end, suspended_due, output_bytes, now_ms)?;
        self.returning(query).await
    }

    async fn record_final_end(
        &mut self,
        id: &str,
        attempt: u32,
        end: &AttemptEnd,
        output_bytes: i64,
        unless_arrivals: bool,
        now_ms: i64,
        output: &StoredEntry,
    ) -> StoreResult<Option<(InvocationRecord, Vec<(String, ParentClose)>)>> {
        if let (AttemptEnd::Completed { .. }, true) = (end, unless_arrivals) {
            // The common end, in the batch's statement of completions when it has one.
            let row = CompletionRow {
                id: id.to_owned(),
                attempt: i64::from(attempt),
                now_ms,
                output_bytes,
                output: EntryRow::of(output)?,
            };
            return self.conn.complete(row).await;
        }
        // The end's update, then what `close_run` does, each part only when the update
        // wrote the row: the output entry at the index it reserved (the entry's fields on
        // the parameters after the end's), the timers, the updates; and the children,
        // read in the statement's snapshot (they are other rows).
        let (update, n) = end_update(end, unless_arrivals);
        let fields = (n + 1..=n + 7)
            .map(|i| format!("${i}"))
            .collect::<Vec<_>>()
            .join(", ");
        let closing = closing_parts("$2", " AND EXISTS (SELECT FROM ended)");
        let children = open_children_of("$2");
        let sql = format!(
            "WITH ended AS ({update} RETURNING {INVOCATION_COLUMNS}), \
             output AS (INSERT INTO journal ({ENTRY_COLUMNS}) \
             SELECT id, journal_len - 1, {fields} FROM ended), {closing} \
             SELECT ended.*, ARRAY(SELECT id {children}) AS children, \
             ARRAY(SELECT parent_close {children}) AS parent_close FROM ended"
        );
        let query = bind_end(
            sqlx::query(&sql),
            id,
            attempt,
            end,
            None,
            output_bytes,
            now_ms,
        )?;
        let query = bind_entry_fields(query, output)?;
        let row = self.optional(query).await?;
        row.as_ref().map(closed_run).transpose()
    }

    async fn claimable(&mut self, now_ms: i64, limit: u32) -> StoreResult<Vec<(String, bool)>> {
        // Rows another transaction holds (being claimed, written or renewed) are skipped.
        // First the attempts whose lease expired (their node died or froze), by the
        // database's clock, then the due invocations.
        let expired = self
            .all(
                sqlx::query(&format!(
                    "SELECT id FROM invocations WHERE status = 'running' \
                     AND lease_expires_at_ms < (SELECT {DB_NOW_MS}) \
                     ORDER BY lease_expires_at_ms LIMIT $1 FOR UPDATE SKIP LOCKED"
                ))
                .bind(i64::from(limit)),
            )
            .await?;
        let mut ids = expired
            .iter()
            .map(|row| Ok((get(row, 0)?, false)))
            .collect::<StoreResult<Vec<(String, bool)>>>()?;
        let left = i64::from(limit) - ids.len() as i64;
        if left > 0 {
            let due = self
                .all(
                    sqlx::query(
                        "SELECT id, key_rate_limit IS NOT NULL AND attempt = 0 FROM invocations \
                         WHERE next_run_at_ms IS NOT NULL AND next_run_at_ms <= $1 \
                         AND status IN ('pending', 'backing-off', 'suspended') \
                         ORDER BY next_run_at_ms LIMIT $2 FOR UPDATE SKIP LOCKED",
                    )
                    .bind(now_ms)
                    .bind(left),
                )
                .await?;
            for row in &due {
                ids.push((get(row, 0)?, get(row, 1)?));
            }
        }
        Ok(ids)
    }

    async fn start_attempt(
        &mut self,
        id: &str,
        token: &str,
        now_ms: i64,
    ) -> StoreResult<Option<InvocationRecord>> {
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
        let owner = self.lease.owner.clone();
        let lease_ms = self.lease.ms;
        self.returning(
            sqlx::query(&sql)
                .bind(now_ms)
                .bind(id)
                .bind(token)
                .bind(&*owner)
                .bind(lease_ms),
        )
        .await
    }

    async fn record_heartbeat(
        &mut self,
        id: &str,
        attempt: u32,
        token: &str,
        details: Option<&[u8]>,
        now_ms: i64,
    ) -> StoreResult<bool> {
        let beat = self
            .execute(
                sqlx::query(
                    "UPDATE invocations SET heartbeat_at_ms = $1, heartbeat_details = $2 \
                     WHERE id = $3 AND attempt = $4 AND status = 'running' \
                     AND attempt_token = $5",
                )
                .bind(now_ms)
                .bind(details)
                .bind(id)
                .bind(i64::from(attempt))
                .bind(token),
            )
            .await?;
        Ok(beat == 1)
    }

    async fn note_arrival(&mut self, id: &str, attempt: u32) -> StoreResult<()> {
        self.execute(
            sqlx::query("UPDATE invocations SET arrived_during_attempt = $2 WHERE id = $1")
                .bind(id)
                .bind(i64::from(attempt)),
        )
        .await?;
        Ok(())
    }

    async fn set_suspended(
        &mut self,
        id: &str,
        due_ms: Option<i64>,
        waiting_for: &[u32],
        now_ms: i64,
    ) -> StoreResult<()> {
        self.execute(
            sqlx::query(
                "UPDATE invocations SET status = 'suspended', next_run_at_ms = $1, \
                 waiting_for = $2, modified_at_ms = $3 WHERE id = $4",
            )
            .bind(due_ms)
            .bind(to_json(&waiting_for)?)
            .bind(now_ms)
            .bind(id),
        )
        .await?;
        Ok(())
    }

    async fn wake(&mut self, id: &str, now_ms: i64) -> StoreResult<()> {
        self.execute(
            sqlx::query(
                "UPDATE invocations SET next_run_at_ms = LEAST(COALESCE(next_run_at_ms, $1), $1), \
                 modified_at_ms = $1 WHERE id = $2",
            )
            .bind(now_ms)
            .bind(id),
        )
        .await?;
        Ok(())
    }

    async fn wake_suspended(&mut self, id: &str, now_ms: i64) -> StoreResult<bool> {
        let n = self
            .execute(
                sqlx::query(
                    "UPDATE invocations SET next_run_at_ms = $1, modified_at_ms = $1 \
                     WHERE id = $2 AND status = 'suspended'",
                )
                .bind(now_ms)
                .bind(id),
            )
            .await?;
        Ok(n > 0)
    }

    async fn mark_cancelled(&mut self, id: &str, now_ms: i64) -> StoreResult<InvocationRecord> {
        let sql = format!(
            "UPDATE invocations SET journal_len = journal_len + 1, cancel_requested_at_ms = $1, \
             status = 'pending', next_run_at_ms = $1, waiting_for = NULL, modified_at_ms = $1 \
             WHERE id = $2 RETURNING {INVOCATION_COLUMNS}"
        );
        self.returning(sqlx::query(&sql).bind(now_ms).bind(id))
            .await?
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
        let sql = format!(
            "UPDATE invocations SET status = $4, journal_len = journal_len + 1, \
             journal_bytes = journal_bytes + $5, completed_at_ms = $1, failure = $2, \
             next_run_at_ms = NULL, waiting_for = NULL, modified_at_ms = $1 WHERE id = $3 \
             RETURNING {INVOCATION_COLUMNS}"
        );
        self.returning(
            sqlx::query(&sql)
                .bind(now_ms)
                .bind(to_json(failure)?)
                .bind(id)
                .bind(status.as_str())
                .bind(output_bytes),
        )
        .await?
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
        // `LENGTH` counts a name's characters, as SQLite's does (`append` counts its bytes).
        let sql = format!(
            "UPDATE invocations SET status = 'pending', next_run_at_ms = $1, modified_at_ms = $1, \
             journal_len = $3 + 1, \
             journal_bytes = (SELECT COALESCE(SUM(COALESCE(LENGTH(value), 0) \
                 + COALESCE(LENGTH(name), 0)), 0)::BIGINT \
                 FROM journal WHERE invocation_id = $2), \
             completed_at_ms = NULL, failure = NULL, waiting_for = NULL, failures = 0, \
             position_failures = 0, last_error = $4, \
             cancel_requested_at_ms = CASE WHEN $5 THEN cancel_requested_at_ms ELSE NULL END, \
             restart_key = $6 \
             WHERE id = $2 RETURNING {INVOCATION_COLUMNS}"
        );
        self.returning(
            sqlx::query(&sql)
                .bind(now_ms)
                .bind(id)
                .bind(i64::from(from))
                .bind(reason)
                .bind(keep_cancel)
                .bind(key),
        )
        .await?
        .ok_or_else(|| StoreError::NotFound(id.to_owned()))
    }

    async fn mark_paused(
        &mut self,
        id: &str,
        reason: &str,
        now_ms: i64,
    ) -> StoreResult<Option<InvocationRecord>> {
        let sql = format!(
            "UPDATE invocations SET status = 'paused', last_error = $1, \
             next_run_at_ms = NULL, waiting_for = NULL, modified_at_ms = $2 \
             WHERE id = $3 AND status IN ('pending', 'running', 'backing-off', \
             'suspended') RETURNING {INVOCATION_COLUMNS}"
        );
        self.returning(sqlx::query(&sql).bind(reason).bind(now_ms).bind(id))
            .await
    }

    async fn mark_resumed(
        &mut self,
        id: &str,
        deployment_id: Option<&str>,
        now_ms: i64,
    ) -> StoreResult<Option<InvocationRecord>> {
        let sql = format!(
            "UPDATE invocations SET status = 'pending', next_run_at_ms = $1, \
             modified_at_ms = $1, deployment_id = COALESCE($2, deployment_id), \
             failures = 0, position_failures = 0 \
             WHERE id = $3 AND status = 'paused' RETURNING {INVOCATION_COLUMNS}"
        );
        self.returning(sqlx::query(&sql).bind(now_ms).bind(deployment_id).bind(id))
            .await
    }

    async fn retry_backoff_now(
        &mut self,
        id: &str,
        now_ms: i64,
    ) -> StoreResult<Option<InvocationRecord>> {
        let sql = format!(
            "UPDATE invocations SET next_run_at_ms = $1, modified_at_ms = $1 \
             WHERE id = $2 AND status = 'backing-off' RETURNING {INVOCATION_COLUMNS}"
        );
        self.returning(sqlx::query(&sql).bind(now_ms).bind(id))
            .await
    }

    async fn ended_before(&mut self, before_ms: i64, limit: u32) -> StoreResult<Vec<String>> {
        let rows = self
            .all(
                sqlx::query(
                    "SELECT id FROM invocations WHERE completed_at_ms IS NOT NULL \
                     AND completed_at_ms < $1 ORDER BY completed_at_ms LIMIT $2 \
                     FOR UPDATE SKIP LOCKED",
                )
                .bind(before_ms)
                .bind(i64::from(limit)),
            )
            .await?;
        rows.iter().map(|row| get(row, 0)).collect()
    }

    async fn delete_invocation(&mut self, id: &str) -> StoreResult<()> {
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
            self.execute(sqlx::query(sql).bind(id)).await?;
        }
        Ok(())
    }

    async fn restart_key(&mut self, id: &str) -> StoreResult<Option<String>> {
        let row = self
            .optional(sqlx::query("SELECT restart_key FROM invocations WHERE id = $1").bind(id))
            .await?;
        Ok(row.as_ref().map(|r| get(r, 0)).transpose()?.flatten())
    }

    async fn inherit_parent(&mut self, from: &str, to: &str) -> StoreResult<()> {
        self.execute(
            sqlx::query(
                "UPDATE invocations AS n SET parent_invocation_id = o.parent_invocation_id, \
                 parent_index = o.parent_index, parent_close = o.parent_close \
                 FROM invocations AS o WHERE o.id = $1 AND n.id = $2",
            )
            .bind(from)
            .bind(to),
        )
        .await?;
        Ok(())
    }

    async fn open_children(&mut self, parent: &str) -> StoreResult<Vec<(String, ParentClose)>> {
        let rows = self
            .all(
                sqlx::query(&format!(
                    "SELECT id, parent_close {}",
                    open_children_of("$1")
                ))
                .bind(parent),
            )
            .await?;
        rows.iter().map(open_child).collect()
    }

    async fn close_run(
        &mut self,
        id: &str,
        output: &StoredEntry,
    ) -> StoreResult<Vec<(String, ParentClose)>> {
        // Data-modifying parts of a WITH run once, to completion, whether or not the
        // query reads them: the output entry, the timers and the updates in one round trip
        // with the read of the children.
        let sql = format!(
            "WITH output AS ({INSERT_ENTRY}), {} SELECT id, parent_close {}",
            closing_parts("$1", ""),
            open_children_of("$1")
        );
        let rows = self.all(bind_entry(sqlx::query(&sql), id, output)?).await?;
        rows.iter().map(open_child).collect()
    }

    async fn past_deadline(
        &mut self,
        now_ms: i64,
        limit: u32,
    ) -> StoreResult<Vec<(String, i64, i64)>> {
        let rows = self
            .all(
                sqlx::query(
                    "SELECT id, created_at_ms, deadline_ms FROM invocations \
                     WHERE deadline_ms IS NOT NULL AND completed_at_ms IS NULL \
                     AND deadline_ms <= $1 ORDER BY deadline_ms LIMIT $2 \
                     FOR UPDATE SKIP LOCKED",
                )
                .bind(now_ms)
                .bind(i64::from(limit)),
            )
            .await?;
        rows.iter()
            .map(|row| Ok((get(row, 0)?, get(row, 1)?, get(row, 2)?)))
            .collect()
    }
}

#[async_trait]
impl Journal for PgTx<'_> {
    async fn insert_entry(&mut self, id: &str, entry: &StoredEntry) -> StoreResult<()> {
        insert_entry(self.conn.lock().await, id, entry).await
    }

    async fn entry(&mut self, id: &str, index: u32) -> StoreResult<Option<StoredEntry>> {
        let sql = format!("{ENTRY_SELECT} WHERE j.invocation_id = $1 AND j.idx = $2");
        let row = self
            .optional(sqlx::query(&sql).bind(id).bind(i64::from(index)))
            .await?;
        row.as_ref().map(entry).transpose()
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
            "{ENTRY_SELECT} WHERE j.invocation_id = $1 AND j.kind = $2 AND j.name = $3 \
             AND ($4::BYTEA IS NULL OR j.value = $4) ORDER BY j.idx LIMIT 1 OFFSET $5"
        );
        let row = self
            .optional(
                sqlx::query(&sql)
                    .bind(id)
                    .bind(kind.as_str())
                    .bind(name)
                    .bind(key)
                    .bind(i64::from(occurrence)),
            )
            .await?;
        row.as_ref().map(entry).transpose()
    }

    async fn command(&mut self, id: &str, index: u32) -> StoreResult<Option<CommandRow>> {
        let row = self
            .optional(
                sqlx::query(
                    "SELECT j.kind, c.seq, t.wake_at_ms FROM journal j \
                     LEFT JOIN completions c ON c.invocation_id = j.invocation_id \
                     AND c.idx = j.idx \
                     LEFT JOIN timers t ON t.invocation_id = j.invocation_id AND t.idx = j.idx \
                     WHERE j.invocation_id = $1 AND j.idx = $2",
                )
                .bind(id)
                .bind(i64::from(index)),
            )
            .await?;
        row.as_ref()
            .map(|row| {
                let kind: String = get(row, 0)?;
                Ok(CommandRow {
                    kind: EntryKind::parse(&kind),
                    completed: get_opt_u32(row, 1)?,
                    wake_at_ms: get(row, 2)?,
                })
            })
            .transpose()
    }

    async fn open_signal_waits(&mut self, id: &str, name: &str) -> StoreResult<Vec<u32>> {
        let rows = self
            .all(
                sqlx::query(
                    "SELECT j.idx FROM journal j WHERE j.invocation_id = $1 \
                     AND j.kind = 'signal' AND j.name = $2 AND NOT EXISTS (SELECT 1 FROM \
                     completions c WHERE c.invocation_id = j.invocation_id AND c.idx = j.idx) \
                     ORDER BY j.idx",
                )
                .bind(id)
                .bind(name),
            )
            .await?;
        rows.iter().map(|row| get_u32(row, 0)).collect()
    }

    async fn open_signal_wait(&mut self, id: &str, index: u32) -> StoreResult<Option<String>> {
        let row = self
            .optional(
                sqlx::query(
                    "SELECT j.name FROM journal j WHERE j.invocation_id = $1 AND j.idx = $2 \
                     AND j.kind = 'signal' AND NOT EXISTS (SELECT 1 FROM completions c \
                     WHERE c.invocation_id = j.invocation_id AND c.idx = j.idx)",
                )
                .bind(id)
                .bind(i64::from(index)),
            )
            .await?;
        row.as_ref().map(|row| get(row, 0)).transpose()
    }

    async fn first_start_after(
        &mut self,
        id: &str,
        from: u32,
    ) -> StoreResult<Option<(u32, String)>> {
        let row = self
            .optional(
                sqlx::query(
                    "SELECT idx, kind FROM journal WHERE invocation_id = $1 AND idx > $2 \
                     AND kind IN ('call', 'send', 'update', 'update_result') \
                     ORDER BY idx LIMIT 1",
                )
                .bind(id)
                .bind(i64::from(from)),
            )
            .await?;
        row.as_ref()
            .map(|row| Ok((get_u32(row, 0)?, get(row, 1)?)))
            .transpose()
    }

    async fn truncate(&mut self, id: &str, from: u32) -> StoreResult<()> {
        for sql in [
            "DELETE FROM journal WHERE invocation_id = $1 AND idx > $2",
            "DELETE FROM completions WHERE invocation_id = $1 AND idx > $2",
            "DELETE FROM timers WHERE invocation_id = $1 AND idx > $2",
            "UPDATE signals SET consumed_by = NULL WHERE invocation_id = $1 AND consumed_by > $2",
        ] {
            self.execute(sqlx::query(sql).bind(id).bind(i64::from(from)))
                .await?;
        }
        Ok(())
    }

    async fn state_entries(&mut self, id: &str) -> StoreResult<Vec<(String, Option<Vec<u8>>)>> {
        let rows = self
            .all(
                sqlx::query(
                    "SELECT name, value FROM journal WHERE invocation_id = $1 \
                     AND kind = 'state' ORDER BY idx",
                )
                .bind(id),
            )
            .await?;
        rows.iter()
            .map(|row| Ok((get(row, 0)?, get(row, 1)?)))
            .collect()
    }

    async fn has_cancel(&mut self, id: &str) -> StoreResult<bool> {
        Ok(self
            .optional(
                sqlx::query(
                    "SELECT 1 FROM journal WHERE invocation_id = $1 AND kind = 'cancel' LIMIT 1",
                )
                .bind(id),
            )
            .await?
            .is_some())
    }
}

#[async_trait]
impl Completions for PgTx<'_> {
    async fn next_completion_seq(&mut self, id: &str) -> StoreResult<u32> {
        let row = self
            .optional(
                sqlx::query(
                    "SELECT COALESCE(MAX(seq), 0) + 1 FROM completions WHERE invocation_id = $1",
                )
                .bind(id),
            )
            .await?;
        row.as_ref().map_or(Ok(1), |row| get_u32(row, 0))
    }

    async fn insert_completion(
        &mut self,
        id: &str,
        index: u32,
        completion: &StoredCompletion,
    ) -> StoreResult<()> {
        let failure = completion.failure.as_ref().map(to_json).transpose()?;
        self.execute(
            sqlx::query(
                "INSERT INTO completions (invocation_id, idx, seq, value, failure, at_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(id)
            .bind(i64::from(index))
            .bind(i64::from(completion.seq))
            .bind(&completion.value)
            .bind(failure)
            .bind(completion.at_ms),
        )
        .await?;
        Ok(())
    }

    async fn cancel_seq(&mut self, id: &str) -> StoreResult<Option<u32>> {
        let row = self
            .optional(
                sqlx::query(
                    "SELECT c.seq FROM journal j JOIN completions c \
                     ON c.invocation_id = j.invocation_id AND c.idx = j.idx \
                     WHERE j.invocation_id = $1 AND j.kind = 'cancel' ORDER BY j.idx LIMIT 1",
                )
                .bind(id),
            )
            .await?;
        row.as_ref().map(|row| get_u32(row, 0)).transpose()
    }

    async fn insert_timer(&mut self, id: &str, index: u32, wake_at_ms: i64) -> StoreResult<()> {
        self.execute(
            sqlx::query("INSERT INTO timers (invocation_id, idx, wake_at_ms) VALUES ($1, $2, $3)")
                .bind(id)
                .bind(i64::from(index))
                .bind(wake_at_ms),
        )
        .await?;
        Ok(())
    }

    async fn due_timers(&mut self, id: &str, by_ms: i64) -> StoreResult<Vec<u32>> {
        let rows = self
            .all(
                sqlx::query(
                    "SELECT idx FROM timers WHERE invocation_id = $1 AND wake_at_ms <= $2 \
                     ORDER BY wake_at_ms, idx",
                )
                .bind(id)
                .bind(by_ms),
            )
            .await?;
        rows.iter().map(|row| get_u32(row, 0)).collect()
    }

    async fn delete_timer(&mut self, id: &str, index: u32) -> StoreResult<()> {
        self.execute(
            sqlx::query("DELETE FROM timers WHERE invocation_id = $1 AND idx = $2")
                .bind(id)
                .bind(i64::from(index)),
        )
        .await?;
        Ok(())
    }
}

#[async_trait]
impl Signals for PgTx<'_> {
    async fn signal_by_key(
        &mut self,
        scope: KeyScope<'_>,
        key: &str,
    ) -> StoreResult<Option<(String, u32)>> {
        let row = match scope {
            KeyScope::Invocation(id) => {
                self.optional(
                    sqlx::query(
                        "SELECT invocation_id, seq FROM signals \
                         WHERE invocation_id = $1 AND idempotency_key = $2",
                    )
                    .bind(id)
                    .bind(key),
                )
                .await?
            }
            KeyScope::Workflow {
                workflow,
                workflow_id,
            } => {
                self.optional(
                    sqlx::query(
                        "SELECT s.invocation_id, s.seq FROM signals s \
                         JOIN invocations i ON i.id = s.invocation_id \
                         WHERE s.idempotency_key = $1 AND i.service = $2 \
                         AND i.workflow_id = $3 LIMIT 1",
                    )
                    .bind(key)
                    .bind(workflow)
                    .bind(workflow_id),
                )
                .await?
            }
        };
        row.as_ref()
            .map(|row| Ok((get(row, 0)?, get_u32(row, 1)?)))
            .transpose()
    }

    async fn next_signal_seq(&mut self, id: &str) -> StoreResult<u32> {
        let row = self
            .optional(
                sqlx::query(
                    "SELECT COALESCE(MAX(seq), 0) + 1 FROM signals WHERE invocation_id = $1",
                )
                .bind(id),
            )
            .await?;
        row.as_ref().map_or(Ok(1), |row| get_u32(row, 0))
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
        self.execute(
            sqlx::query(
                "INSERT INTO signals (invocation_id, seq, name, value, idempotency_key, \
                 consumed_by, during_attempt, at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(id)
            .bind(i64::from(seq))
            .bind(name)
            .bind(value)
            .bind(key)
            .bind(consumed_by.map(i64::from))
            .bind(during_attempt.map(i64::from))
            .bind(at_ms),
        )
        .await?;
        Ok(())
    }

    async fn unseen_arrivals(
        &mut self,
        id: &str,
        attempt: u32,
    ) -> StoreResult<(Option<String>, bool)> {
        let row = self
            .optional(
                sqlx::query(
                    "SELECT (SELECT string_agg('\"' || name || '\" (#' || seq::TEXT || ')', ', ' \
                     ORDER BY seq) FROM signals WHERE invocation_id = $1 \
                     AND consumed_by IS NULL AND during_attempt = $2), \
                     EXISTS (SELECT 1 FROM updates u JOIN invocations i \
                     ON i.id = u.invocation_id WHERE u.invocation_id = $1 \
                     AND u.status = 'pending' AND (u.during_attempt = $2 \
                     OR (u.during_attempt IS NULL \
                     AND u.created_at_ms > COALESCE(i.attempt_started_at_ms, 0))))",
                )
                .bind(id)
                .bind(i64::from(attempt)),
            )
            .await?;
        row.as_ref()
            .map_or(Ok((None, false)), |row| Ok((get(row, 0)?, get(row, 1)?)))
    }

    async fn oldest_buffered(
        &mut self,
        id: &str,
        name: &str,
    ) -> StoreResult<Option<BufferedSignal>> {
        let row = self
            .optional(
                sqlx::query(
                    "SELECT seq, value, at_ms FROM signals WHERE invocation_id = $1 \
                     AND name = $2 AND consumed_by IS NULL ORDER BY seq LIMIT 1",
                )
                .bind(id)
                .bind(name),
            )
            .await?;
        row.as_ref()
            .map(|row| {
                Ok(BufferedSignal {
                    seq: get_u32(row, 0)?,
                    value: get(row, 1)?,
                    at_ms: get(row, 2)?,
                })
            })
            .transpose()
    }

    async fn consume_signal(&mut self, id: &str, seq: u32, index: u32) -> StoreResult<()> {
        self.execute(
            sqlx::query(
                "UPDATE signals SET consumed_by = $1 WHERE invocation_id = $2 AND seq = $3",
            )
            .bind(i64::from(index))
            .bind(id)
            .bind(i64::from(seq)),
        )
        .await?;
        Ok(())
    }

    async fn buffered(&mut self, id: &str) -> StoreResult<(u32, i64)> {
        let row = self
            .optional(
                sqlx::query(
                    "SELECT COUNT(*), COALESCE(SUM(COALESCE(LENGTH(value), 0) \
                     + OCTET_LENGTH(name)), 0)::BIGINT \
                     FROM signals WHERE invocation_id = $1 AND consumed_by IS NULL",
                )
                .bind(id),
            )
            .await?;
        row.as_ref()
            .map_or(Ok((0, 0)), |row| Ok((get_u32(row, 0)?, get(row, 1)?)))
    }

    async fn move_buffered(&mut self, from: &str, to: &str) -> StoreResult<(u32, i64)> {
        let moved = self.buffered(from).await?;
        if moved.0 == 0 {
            return Ok(moved);
        }
        self.execute(
            sqlx::query(
                "INSERT INTO signals (invocation_id, seq, name, value, idempotency_key, \
                 consumed_by, during_attempt, at_ms) \
                 SELECT $2, (SELECT COALESCE(MAX(seq), 0) FROM signals WHERE invocation_id = $2) \
                 + ROW_NUMBER() OVER (ORDER BY seq), name, value, idempotency_key, NULL, NULL, \
                 at_ms FROM signals WHERE invocation_id = $1 AND consumed_by IS NULL",
            )
            .bind(from)
            .bind(to),
        )
        .await?;
        self.execute(
            sqlx::query("DELETE FROM signals WHERE invocation_id = $1 AND consumed_by IS NULL")
                .bind(from),
        )
        .await?;
        Ok(moved)
    }

    async fn drop_buffered(&mut self, id: &str, prefix: &str) -> StoreResult<()> {
        self.execute(
            sqlx::query(
                "DELETE FROM signals WHERE invocation_id = $1 AND consumed_by IS NULL \
                 AND left(name, length($2)) = $2",
            )
            .bind(id)
            .bind(prefix),
        )
        .await?;
        Ok(())
    }
}

#[async_trait]
impl Workflows for PgTx<'_> {
    async fn lock_workflow_id(&mut self, workflow: &str, workflow_id: &str) -> StoreResult<()> {
        // Held until the transaction ends, on every node; also while the id names no run.
        self.execute(
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1), hashtext($2))")
                .bind(workflow)
                .bind(workflow_id),
        )
        .await?;
        Ok(())
    }

    async fn workflow_run(
        &mut self,
        workflow: &str,
        workflow_id: &str,
    ) -> StoreResult<Option<(String, String)>> {
        let row = self
            .optional(
                sqlx::query(
                    "SELECT invocation_id, input_digest FROM workflows \
                     WHERE workflow = $1 AND workflow_id = $2",
                )
                .bind(workflow)
                .bind(workflow_id),
            )
            .await?;
        row.as_ref()
            .map(|row| Ok((get(row, 0)?, get(row, 1)?)))
            .transpose()
    }

    async fn take_workflow_id(
        &mut self,
        workflow: &str,
        workflow_id: &str,
        invocation: &str,
        input_digest: &str,
    ) -> StoreResult<()> {
        self.execute(
            sqlx::query(
                "INSERT INTO workflows (workflow, workflow_id, invocation_id, input_digest) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (workflow, workflow_id) DO UPDATE \
                 SET invocation_id = excluded.invocation_id, \
                 input_digest = excluded.input_digest",
            )
            .bind(workflow)
            .bind(workflow_id)
            .bind(invocation)
            .bind(input_digest),
        )
        .await?;
        Ok(())
    }

    async fn point_workflow_id(
        &mut self,
        workflow: &str,
        workflow_id: &str,
        invocation: &str,
    ) -> StoreResult<()> {
        self.execute(
            sqlx::query(
                "UPDATE workflows SET invocation_id = $1 WHERE workflow = $2 AND workflow_id = $3",
            )
            .bind(invocation)
            .bind(workflow)
            .bind(workflow_id),
        )
        .await?;
        Ok(())
    }
}

#[async_trait]
impl State for PgTx<'_> {
    async fn put_state(&mut self, id: &str, key: &str, value: Option<&[u8]>) -> StoreResult<()> {
        self.execute(
            sqlx::query(
                "INSERT INTO state (invocation_id, key, value) VALUES ($1, $2, $3) \
                 ON CONFLICT (invocation_id, key) DO UPDATE SET value = excluded.value",
            )
            .bind(id)
            .bind(key)
            .bind(value),
        )
        .await?;
        Ok(())
    }

    async fn clear_state(&mut self, id: &str) -> StoreResult<()> {
        self.execute(sqlx::query("DELETE FROM state WHERE invocation_id = $1").bind(id))
            .await?;
        Ok(())
    }
}

#[async_trait]
impl Updates for PgTx<'_> {
    async fn update(&mut self, run: &str, id: &str) -> StoreResult<Option<UpdateRecord>> {
        let sql =
            format!("SELECT {UPDATE_COLUMNS} FROM updates WHERE invocation_id = $1 AND id = $2");
        let row = self.optional(sqlx::query(&sql).bind(run).bind(id)).await?;
        row.as_ref().map(update_row).transpose()
    }

    async fn update_by_key(
        &mut self,
        scope: KeyScope<'_>,
        key: &str,
    ) -> StoreResult<Option<UpdateRecord>> {
        let row = match scope {
            KeyScope::Invocation(run) => {
                let sql = format!(
                    "SELECT {UPDATE_COLUMNS} FROM updates \
                     WHERE invocation_id = $1 AND idempotency_key = $2"
                );
                self.optional(sqlx::query(&sql).bind(run).bind(key)).await?
            }
            KeyScope::Workflow {
                workflow,
                workflow_id,
            } => {
                self.optional(
                    sqlx::query(
                        "SELECT u.invocation_id, u.id, u.name, u.status, u.result, u.failure \
                         FROM updates u JOIN invocations i ON i.id = u.invocation_id \
                         WHERE u.idempotency_key = $1 AND i.service = $2 \
                         AND i.workflow_id = $3 LIMIT 1",
                    )
                    .bind(key)
                    .bind(workflow)
                    .bind(workflow_id),
                )
                .await?
            }
        };
        row.as_ref().map(update_row).transpose()
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
        self.execute(
            sqlx::query(
                "INSERT INTO updates (invocation_id, id, name, input, idempotency_key, status, \
                 created_at_ms, during_attempt) VALUES ($1, $2, $3, $4, $5, 'pending', $6, $7)",
            )
            .bind(run)
            .bind(id)
            .bind(name)
            .bind(input)
            .bind(key)
            .bind(now_ms)
            .bind(during_attempt.map(i64::from)),
        )
        .await?;
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
        self.execute(
            sqlx::query(
                "UPDATE updates SET status = $4, result = COALESCE($5, result), \
                 failure = COALESCE($6, failure) \
                 WHERE invocation_id = $1 AND id = $2 AND status = $3",
            )
            .bind(run)
            .bind(id)
            .bind(from.as_str())
            .bind(to.as_str())
            .bind(result)
            .bind(failure),
        )
        .await?;
        Ok(())
    }

    async fn updates_since_attempt(&mut self, run: &str) -> StoreResult<bool> {
        Ok(self
            .optional(
                sqlx::query(
                    "SELECT 1 FROM updates u JOIN invocations i ON i.id = u.invocation_id \
                     WHERE u.invocation_id = $1 AND u.status = 'pending' \
                     AND (u.during_attempt = i.attempt OR (u.during_attempt IS NULL \
                     AND u.created_at_ms > COALESCE(i.attempt_started_at_ms, 0))) LIMIT 1",
                )
                .bind(run),
            )
            .await?
            .is_some())
    }
}

#[async_trait]
impl Schedules for PgTx<'_> {
    async fn lock_schedule(&mut self, id: &str) -> StoreResult<Option<ScheduleRow>> {
        let sql = format!("SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE id = $1 FOR UPDATE");
        self.optional(sqlx::query(&sql).bind(id))
            .await?
            .as_ref()
            .map(schedule)
            .transpose()
    }

    async fn put_schedule(&mut self, row: &ScheduleRow) -> StoreResult<()> {
        self.execute(
            sqlx::query(
                "INSERT INTO schedules (id, source, spec, state, due_ms) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO UPDATE \
                 SET source = excluded.source, spec = excluded.spec, \
                 state = excluded.state, due_ms = excluded.due_ms",
            )
            .bind(&row.id)
            .bind(&row.source)
            .bind(&row.spec)
            .bind(&row.state)
            .bind(row.due_ms),
        )
        .await?;
        Ok(())
    }

    async fn delete_schedule(&mut self, id: &str) -> StoreResult<bool> {
        Ok(self
            .execute(sqlx::query("DELETE FROM schedules WHERE id = $1").bind(id))
            .await?
            > 0)
    }
}

#[async_trait]
impl WebhookSources for PgTx<'_> {
    async fn lock_webhook_source(&mut self, name: &str) -> StoreResult<Option<WebhookSourceRow>> {
        let sql = format!(
            "SELECT {WEBHOOK_SOURCE_COLUMNS} FROM webhook_sources WHERE name = $1 FOR UPDATE"
        );
        let row = self.optional(sqlx::query(&sql).bind(name)).await?;
        row.as_ref().map(webhook_source).transpose()
    }

    async fn put_webhook_source(&mut self, row: &WebhookSourceRow) -> StoreResult<()> {
        self.execute(
            sqlx::query(
                "INSERT INTO webhook_sources (name, origin, config, created_at_ms, updated_at_ms) \
                 VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (name) DO UPDATE SET origin = excluded.origin, \
                 config = excluded.config, updated_at_ms = excluded.updated_at_ms",
            )
            .bind(&row.name)
            .bind(&row.origin)
            .bind(&row.config)
            .bind(row.created_at_ms)
            .bind(row.updated_at_ms),
        )
        .await?;
        Ok(())
    }

    async fn delete_webhook_source(&mut self, name: &str) -> StoreResult<bool> {
        self.execute(sqlx::query("DELETE FROM webhook_deliveries WHERE source = $1").bind(name))
            .await?;
        Ok(self
            .execute(sqlx::query("DELETE FROM webhook_sources WHERE name = $1").bind(name))
            .await?
            > 0)
    }

    async fn insert_webhook_delivery(
        &mut self,
        source: &str,
        delivery: &str,
        keep: u32,
    ) -> StoreResult<()> {
        self.execute(
            sqlx::query("INSERT INTO webhook_deliveries (source, delivery) VALUES ($1, $2)")
                .bind(source)
                .bind(delivery),
        )
        .await?;
        self.execute(
            sqlx::query(
                "DELETE FROM webhook_deliveries WHERE source = $1 AND id <= \
                 (SELECT id FROM webhook_deliveries WHERE source = $1 ORDER BY id DESC \
                  LIMIT 1 OFFSET $2)",
            )
            .bind(source)
            .bind(i64::from(keep)),
        )
        .await?;
        Ok(())
    }
}

#[async_trait]
impl Keys for PgTx<'_> {
    async fn lock_key(&mut self, service: &str, key: &str) -> StoreResult<()> {
        // Without waiting: a batch that holds one key and waits for another could wait
        // for a batch that holds that one and waits for the first. A write that finds the
        // key taken is run again (`Store::contended`).
        let row = self
            .optional(
                sqlx::query(
                    "SELECT pg_try_advisory_xact_lock(hashtext('key:' || $1), hashtext($2))",
                )
                .bind(service)
                .bind(key),
            )
            .await?;
        let taken: bool = row.as_ref().map_or(Ok(false), |row| get(row, 0))?;
        if taken {
            Ok(())
        } else {
            Err(StoreError::Contended(format!(
                "key {key:?} of {service} is held by another transaction"
            )))
        }
    }

    async fn key_holders(&mut self, service: &str, key: &str) -> StoreResult<u32> {
        let row = self
            .optional(
                sqlx::query(
                    "SELECT COUNT(*) FROM invocations WHERE service = $1 AND concurrency_key = $2 \
                     AND status NOT IN ('completed', 'failed', 'cancelled', 'terminated', 'continued') \
                     AND status <> 'queued' AND key_limit > 0",
                )
                .bind(service)
                .bind(key),
            )
            .await?;
        row.as_ref().map_or(Ok(0), |row| get_u32(row, 0))
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
        self.execute(
            sqlx::query(
                "UPDATE invocations SET concurrency_key = $2, key_limit = $3, \
                 key_seq = (SELECT COALESCE(MAX(key_seq), 0) + 1 FROM invocations \
                   WHERE service = $5 AND concurrency_key = $2 \
                   AND status NOT IN ('completed', 'failed', 'cancelled', 'terminated', 'continued')), \
                 status = CASE WHEN $4 THEN 'queued' ELSE status END, \
                 next_run_at_ms = CASE WHEN $4 THEN NULL ELSE next_run_at_ms END, \
                 key_rate_limit = COALESCE($6, key_rate_limit), \
                 key_rate_period_ms = COALESCE($7, key_rate_period_ms), \
                 debounce_until_ms = $8 \
                 WHERE id = $1",
            )
            .bind(id)
            .bind(&key.key)
            .bind(i64::from(if key.shared { 0 } else { key.limit }))
            .bind(queued)
            .bind(service)
            .bind(key.rate.map(|r| i64::from(r.limit)))
            .bind(key.rate.map(|r| r.period_ms))
            .bind(debounce_until_ms),
        )
        .await?;
        Ok(())
    }

    async fn newest_unstarted(
        &mut self,
        service: &str,
        handler: &str,
        key: &str,
    ) -> StoreResult<Option<(String, Option<i64>)>> {
        let row = self
            .optional(
                sqlx::query(
                    "SELECT id, debounce_until_ms FROM invocations \
                     WHERE service = $1 AND concurrency_key = $2 \
                     AND status NOT IN ('completed', 'failed', 'cancelled', 'terminated', 'continued') \
                     AND status IN ('queued', 'pending') AND attempt = 0 AND key_limit > 0 \
                     AND handler = $3 AND parent_invocation_id IS NULL \
                     ORDER BY key_seq DESC LIMIT 1",
                )
                .bind(service)
                .bind(key)
                .bind(handler),
            )
            .await?;
        row.as_ref()
            .map(|row| Ok((get(row, 0)?, get(row, 1)?)))
            .transpose()
    }

    async fn start_rate(&mut self, id: &str) -> StoreResult<Option<StartRate>> {
        let row = self
            .optional(
                sqlx::query(
                    "SELECT key_rate_limit, key_rate_period_ms FROM invocations WHERE id = $1",
                )
                .bind(id),
            )
            .await?;
        match row {
            Some(row) => Ok(StartRate::from_columns(get(&row, 0)?, get(&row, 1)?)),
            None => Ok(None),
        }
    }

    async fn nth_latest_start(
        &mut self,
        service: &str,
        handler: &str,
        key: &str,
        nth: u32,
    ) -> StoreResult<Option<i64>> {
        let row = self
            .optional(
                sqlx::query(
                    "SELECT at_ms FROM key_starts WHERE service = $1 AND key = $2 AND handler = $4 \
                     ORDER BY at_ms DESC LIMIT 1 OFFSET $3",
                )
                .bind(service)
                .bind(key)
                .bind(i64::from(nth.saturating_sub(1)))
                .bind(handler),
            )
            .await?;
        row.as_ref().map(|row| get(row, 0)).transpose()
    }

    async fn record_start(
        &mut self,
        service: &str,
        handler: &str,
        key: &str,
        at_ms: i64,
        forget_through_ms: i64,
    ) -> StoreResult<()> {
        self.execute(
            sqlx::query("DELETE FROM key_starts WHERE service = $1 AND key = $2 AND at_ms <= $3 AND handler = $4")
                .bind(service)
                .bind(key)
                .bind(forget_through_ms)
                .bind(handler),
        )
        .await?;
        self.execute(
            sqlx::query(
                "INSERT INTO key_starts (service, key, at_ms, handler) VALUES ($1, $2, $3, $4)",
            )
            .bind(service)
            .bind(key)
            .bind(at_ms)
            .bind(handler),
        )
        .await?;
        Ok(())
    }

    async fn oldest_rate_waiter(
        &mut self,
        service: &str,
        handler: &str,
        key: &str,
        due_by_ms: i64,
    ) -> StoreResult<Option<String>> {
        let row = self
            .optional(
                sqlx::query(
                    "SELECT id FROM invocations WHERE service = $1 AND concurrency_key = $2 \
                     AND status NOT IN ('completed', 'failed', 'cancelled', 'terminated', 'continued') \
                     AND status = 'pending' AND attempt = 0 AND key_rate_limit IS NOT NULL \
                     AND next_run_at_ms <= $4 AND handler = $3 ORDER BY key_seq LIMIT 1",
                )
                .bind(service)
                .bind(key)
                .bind(handler)
                .bind(due_by_ms),
            )
            .await?;
        row.as_ref().map(|row| get(row, 0)).transpose()
    }

    async fn rate_waiters_ahead(
        &mut self,
        service: &str,
        handler: &str,
        key: &str,
        id: &str,
    ) -> StoreResult<u32> {
        let row = self
            .optional(
                sqlx::query(
                    "SELECT COUNT(*) FROM invocations WHERE service = $1 AND concurrency_key = $2 \
                     AND status NOT IN ('completed', 'failed', 'cancelled', 'terminated', 'continued') \
                     AND status = 'pending' AND attempt = 0 AND key_rate_limit IS NOT NULL \
                     AND handler = $3 AND key_seq < (SELECT key_seq FROM invocations WHERE id = $4)",
                )
                .bind(service)
                .bind(key)
                .bind(handler)
                .bind(id),
            )
            .await?;
        row.as_ref().map_or(Ok(0), |row| get_u32(row, 0))
    }

    async fn forget_starts_before(&mut self, before_ms: i64) -> StoreResult<()> {
        self.execute(sqlx::query("DELETE FROM key_starts WHERE at_ms < $1").bind(before_ms))
            .await?;
        Ok(())
    }

    async fn start_at(&mut self, id: &str, due_ms: i64) -> StoreResult<()> {
        self.execute(
            sqlx::query(
                "UPDATE invocations SET next_run_at_ms = $2 WHERE id = $1 AND status = 'pending'",
            )
            .bind(id)
            .bind(due_ms),
        )
        .await?;
        Ok(())
    }

    async fn apply_key_state(&mut self, id: &str, service: &str, key: &str) -> StoreResult<()> {
        self.execute(
            sqlx::query(
                "INSERT INTO key_state (service, key, name, value) \
                 SELECT $2, $3, key, value FROM state WHERE invocation_id = $1 \
                 AND value IS NOT NULL \
                 ON CONFLICT (service, key, name) DO UPDATE SET value = excluded.value",
            )
            .bind(id)
            .bind(service)
            .bind(key),
        )
        .await?;
        self.execute(
            sqlx::query(
                "DELETE FROM key_state WHERE service = $2 AND key = $3 AND name IN \
                 (SELECT key FROM state WHERE invocation_id = $1 AND value IS NULL)",
            )
            .bind(id)
            .bind(service)
            .bind(key),
        )
        .await?;
        Ok(())
    }

    async fn release_queued(
        &mut self,
        service: &str,
        key: &str,
        count: u32,
        now_ms: i64,
    ) -> StoreResult<Vec<String>> {
        // Only queued rows, which no rule locks while it waits for the key (see `Keys`).
        let rows = self
            .all(
                sqlx::query(
                    "UPDATE invocations SET status = 'pending', next_run_at_ms = $4, \
                     modified_at_ms = $4 \
                     WHERE id IN (SELECT id FROM invocations WHERE service = $1 \
                       AND concurrency_key = $2 \
                       AND status NOT IN ('completed', 'failed', 'cancelled', 'terminated', 'continued') \
                       AND status = 'queued' ORDER BY key_seq LIMIT $3 FOR UPDATE) \
                     RETURNING id",
                )
                .bind(service)
                .bind(key)
                .bind(i64::from(count))
                .bind(now_ms),
            )
            .await?;
        rows.iter().map(|row| get(row, 0)).collect()
    }
}

#[async_trait]
impl IdempotencyKeys for PgTx<'_> {
    async fn lock_idempotency_key(&mut self, scope: &str, key: &str) -> StoreResult<()> {
        self.execute(
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1), hashtext($2))")
                .bind(scope)
                .bind(key),
        )
        .await?;
        Ok(())
    }

    async fn idempotency_key(
        &mut self,
        scope: &str,
        key: &str,
    ) -> StoreResult<Option<(String, String, i64)>> {
        let row = self
            .optional(
                sqlx::query(
                    "SELECT request_digest, invocation_id, expires_at_ms FROM idempotency_keys \
                     WHERE scope = $1 AND key = $2",
                )
                .bind(scope)
                .bind(key),
            )
            .await?;
        row.as_ref()
            .map(|row| Ok((get(row, 0)?, get(row, 1)?, get(row, 2)?)))
            .transpose()
    }

    async fn delete_idempotency_key(&mut self, scope: &str, key: &str) -> StoreResult<()> {
        self.execute(
            sqlx::query("DELETE FROM idempotency_keys WHERE scope = $1 AND key = $2")
                .bind(scope)
                .bind(key),
        )
        .await?;
        Ok(())
    }

    async fn insert_idempotency_key(
        &mut self,
        claim: &IdempotencyClaim,
        invocation: &str,
    ) -> StoreResult<()> {
        self.execute(
            sqlx::query(
                "INSERT INTO idempotency_keys (scope, key, request_digest, invocation_id, \
                 expires_at_ms, retention_ms) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&claim.scope)
            .bind(&claim.key)
            .bind(&claim.request_digest)
            .bind(invocation)
            .bind(i64::MAX)
            .bind(claim.retention_ms),
        )
        .await?;
        Ok(())
    }

    async fn delete_expired_keys(&mut self, now_ms: i64) -> StoreResult<u64> {
        self.execute(
            sqlx::query("DELETE FROM idempotency_keys WHERE expires_at_ms <= $1").bind(now_ms),
        )
        .await
    }

    async fn hold_idempotency_keys(
        &mut self,
        invocation: &str,
        from_ms: Option<i64>,
    ) -> StoreResult<()> {
        let query = match from_ms {
            Some(now_ms) => sqlx::query(
                "UPDATE idempotency_keys SET expires_at_ms = $1 + retention_ms \
                 WHERE invocation_id = $2 AND retention_ms IS NOT NULL",
            )
            .bind(now_ms)
            .bind(invocation),
            None => sqlx::query(
                "UPDATE idempotency_keys SET expires_at_ms = $1 WHERE invocation_id = $2",
            )
            .bind(i64::MAX)
            .bind(invocation),
        };
        self.execute(query).await?;
        Ok(())
    }
}
