//! Rows and small helpers of the PostgreSQL store: the column lists, the mapping of a row to
//! a record (checked: a corrupt row is an error, never a panic), and the statements every
//! write shares. Integers are `BIGINT` in the schema and `i64` on the wire; they become
//! `u32` here, checked.

use durin_protocol::{EntryKind, Failure, HandlerSpec};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};

use super::*;

pub(super) const INVOCATION_COLUMNS: &str =
    "id, service, handler, deployment_id, status, attempt, failures, \
    position_failures, journal_len, next_run_at_ms, last_error, failure, idempotency_key, \
    created_at_ms, modified_at_ms, completed_at_ms, attempt_token, workflow_id, waiting_for, \
    journal_bytes, cancel_requested_at_ms, parent_invocation_id, parent_index, deadline_ms, \
    scheduled_at_ms, heartbeat_at_ms, traceparent, concurrency_key, key_limit";

/// Column `i` of `row`, a `BIGINT` that must fit a `u32`.
pub(super) fn get_u32(row: &PgRow, i: usize) -> StoreResult<u32> {
    let value: i64 = row.try_get(i).map_err(backend)?;
    u32::try_from(value).map_err(|_| corrupt(format!("column {i} holds {value}, not a u32")))
}

/// Column `i` of `row`, a nullable `BIGINT` that must fit a `u32`.
pub(super) fn get_opt_u32(row: &PgRow, i: usize) -> StoreResult<Option<u32>> {
    let value: Option<i64> = row.try_get(i).map_err(backend)?;
    value
        .map(|v| u32::try_from(v).map_err(|_| corrupt(format!("column {i} holds {v}, not a u32"))))
        .transpose()
}

/// Column `i` of `row`.
pub(super) fn get<'r, T>(row: &'r PgRow, i: usize) -> StoreResult<T>
where
    T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    row.try_get(i).map_err(backend)
}

fn failure_of(text: Option<String>) -> StoreResult<Option<Failure>> {
    text.map(|f| serde_json::from_str::<Failure>(&f))
        .transpose()
        .map_err(backend)
}

/// A row of `INVOCATION_COLUMNS`, checked.
pub(super) fn invocation(row: &PgRow) -> StoreResult<InvocationRecord> {
    let id: String = get(row, 0)?;
    let status: String = get(row, 4)?;
    let waiting_for: Option<String> = get(row, 18)?;
    Ok(InvocationRecord {
        id: InvocationId::parse(&id).map_err(corrupt)?,
        service: get(row, 1)?,
        handler: get(row, 2)?,
        deployment_id: get(row, 3)?,
        status: Status::parse(&status)
            .ok_or_else(|| corrupt(format!("unknown status {status:?}")))?,
        attempt: get_u32(row, 5)?,
        failures: get_u32(row, 6)?,
        position_failures: get_u32(row, 7)?,
        journal_len: get_u32(row, 8)?,
        next_run_at_ms: get(row, 9)?,
        last_error: get(row, 10)?,
        failure: failure_of(get(row, 11)?)?,
        idempotency_key: get(row, 12)?,
        created_at_ms: get(row, 13)?,
        modified_at_ms: get(row, 14)?,
        completed_at_ms: get(row, 15)?,
        attempt_token: get(row, 16)?,
        workflow_id: get(row, 17)?,
        waiting_for: waiting_for
            .map(|w| serde_json::from_str(&w))
            .transpose()
            .map_err(backend)?
            .unwrap_or_default(),
        journal_bytes: get(row, 19)?,
        cancel_requested_at_ms: get(row, 20)?,
        parent_invocation_id: get(row, 21)?,
        parent_index: get_opt_u32(row, 22)?,
        deadline_ms: get(row, 23)?,
        scheduled_at_ms: get(row, 24)?,
        heartbeat_at_ms: get(row, 25)?,
        traceparent: get(row, 26)?,
        key: match (get::<Option<String>>(row, 27)?, get_opt_u32(row, 28)?) {
            (Some(key), limit) => Some(InvocationKey {
                key,
                limit: limit.unwrap_or(1).max(1),
                shared: limit == Some(0),
                debounce_ms: None,
                debounce_max_ms: None,
                rate: None,
            }),
            (None, _) => None,
        },
    })
}

/// Journal entries with their completions (`j` and `c`).
pub(super) const ENTRY_SELECT: &str =
    "SELECT j.idx, j.kind, j.name, j.value, j.content_type, j.failure, \
     j.attempt, j.at_ms, c.seq, c.value, c.failure, c.at_ms FROM journal j \
     LEFT JOIN completions c ON c.invocation_id = j.invocation_id AND c.idx = j.idx";

pub(super) fn entry(row: &PgRow) -> StoreResult<StoredEntry> {
    let kind: String = get(row, 1)?;
    let completion = match get_opt_u32(row, 8)? {
        Some(seq) => Some(StoredCompletion {
            seq,
            value: get(row, 9)?,
            failure: failure_of(get(row, 10)?)?,
            at_ms: get(row, 11)?,
        }),
        None => None,
    };
    Ok(StoredEntry {
        index: get_u32(row, 0)?,
        kind: EntryKind::parse(&kind)
            .ok_or_else(|| corrupt(format!("unknown entry kind {kind:?}")))?,
        name: get(row, 2)?,
        value: get(row, 3)?,
        content_type: get(row, 4)?,
        failure: failure_of(get(row, 5)?)?,
        attempt: get_u32(row, 6)?,
        at_ms: get(row, 7)?,
        completion,
    })
}

pub(super) const DEPLOYMENT_COLUMNS: &str = "id, url, protocol, services, created_at_ms, active";

pub(super) fn deployment(row: &PgRow) -> StoreResult<DeploymentRecord> {
    let protocol: String = get(row, 2)?;
    let services: String = get(row, 3)?;
    Ok(DeploymentRecord {
        id: get(row, 0)?,
        url: get(row, 1)?,
        protocol: HandlerProtocol::parse(&protocol)
            .ok_or_else(|| corrupt(format!("unknown protocol {protocol:?}")))?,
        services: serde_json::from_str(&services).map_err(backend)?,
        created_at_ms: get(row, 4)?,
        active: get(row, 5)?,
    })
}

pub(super) const TARGET_SELECT: &str =
    "SELECT h.deployment_id, d.url, d.protocol, h.service, h.handler, \
     h.spec FROM handlers h JOIN deployments d ON d.id = h.deployment_id";

pub(super) fn target(row: &PgRow) -> StoreResult<HandlerTarget> {
    let protocol: String = get(row, 2)?;
    let spec: String = get(row, 5)?;
    Ok(HandlerTarget {
        deployment_id: get(row, 0)?,
        url: get(row, 1)?,
        protocol: HandlerProtocol::parse(&protocol)
            .ok_or_else(|| corrupt(format!("unknown protocol {protocol:?}")))?,
        service: get(row, 3)?,
        handler: get(row, 4)?,
        spec: serde_json::from_str::<HandlerSpec>(&spec).map_err(backend)?,
    })
}

pub(super) fn to_json<T: serde::Serialize>(value: &T) -> StoreResult<String> {
    serde_json::to_string(value).map_err(backend)
}

/// The invocation `id` as it is now.
pub(super) async fn fetch_invocation(
    conn: &mut PgConnection,
    id: &str,
) -> StoreResult<Option<InvocationRecord>> {
    select_invocation(conn, id, "").await
}

/// The invocation `id`, locked until the end of the transaction: what a write decides from
/// it stays true until it commits, whichever node writes beside it.
pub(super) async fn lock_invocation(
    conn: &mut PgConnection,
    id: &str,
) -> StoreResult<Option<InvocationRecord>> {
    select_invocation(conn, id, " FOR UPDATE").await
}

async fn select_invocation(
    conn: &mut PgConnection,
    id: &str,
    lock: &str,
) -> StoreResult<Option<InvocationRecord>> {
    let sql = format!("SELECT {INVOCATION_COLUMNS} FROM invocations WHERE id = $1{lock}");
    let row = sqlx::query(&sql)
        .bind(id)
        .fetch_optional(conn)
        .await
        .map_err(backend)?;
    row.as_ref().map(invocation).transpose()
}

/// Explains why a fenced write matched no row: no such invocation, or not its attempt.
pub(super) async fn refusal(conn: &mut PgConnection, id: &str, attempt: u32) -> StoreError {
    match fetch_invocation(conn, id).await {
        Ok(None) => StoreError::NotFound(id.to_owned()),
        Ok(Some(record)) => StoreError::Fenced {
            invocation_id: id.to_owned(),
            attempt,
            current_attempt: record.attempt,
            status: record.status,
        },
        Err(e) => e,
    }
}

macro_rules! entry_columns {
    () => {
        "invocation_id, idx, kind, name, value, content_type, failure, attempt, at_ms"
    };
}

/// The columns of a journal entry, in the order [`bind_entry`] binds them.
pub(super) const ENTRY_COLUMNS: &str = entry_columns!();

/// The insert of a journal entry, on parameters 1 to 9 (see [`bind_entry`]).
pub(super) const INSERT_ENTRY: &str = concat!(
    "INSERT INTO journal (",
    entry_columns!(),
    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
);

type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// `query` (which uses [`INSERT_ENTRY`]) with `entry` of invocation `id` bound.
pub(super) fn bind_entry<'q>(
    query: PgQuery<'q>,
    id: &'q str,
    entry: &'q StoredEntry,
) -> StoreResult<PgQuery<'q>> {
    bind_entry_fields(query.bind(id).bind(i64::from(entry.index)), entry)
}

/// `query` with the fields of `entry` that follow its invocation id and index in
/// [`ENTRY_COLUMNS`] (seven of them, from `kind` to `at_ms`) bound.
pub(super) fn bind_entry_fields<'q>(
    query: PgQuery<'q>,
    entry: &'q StoredEntry,
) -> StoreResult<PgQuery<'q>> {
    let failure = entry.failure.as_ref().map(to_json).transpose()?;
    Ok(query
        .bind(entry.kind.as_str())
        .bind(&entry.name)
        .bind(&entry.value)
        .bind(&entry.content_type)
        .bind(failure)
        .bind(i64::from(entry.attempt))
        .bind(entry.at_ms))
}

pub(super) async fn insert_entry(
    conn: &mut PgConnection,
    id: &str,
    entry: &StoredEntry,
) -> StoreResult<()> {
    bind_entry(sqlx::query(INSERT_ENTRY), id, entry)?
        .execute(conn)
        .await
        .map_err(backend)?;
    Ok(())
}

pub(super) async fn latest_deployment(
    conn: &mut PgConnection,
    url: &str,
) -> StoreResult<Option<DeploymentRecord>> {
    let sql = format!(
        "SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE url = $1 ORDER BY id DESC LIMIT 1"
    );
    let row = sqlx::query(&sql)
        .bind(url)
        .fetch_optional(conn)
        .await
        .map_err(backend)?;
    row.as_ref().map(deployment).transpose()
}

/// The columns of a schedule, in [`schedule`]'s order.
pub(super) const SCHEDULE_COLUMNS: &str = "id, source, spec, state, due_ms";

pub(super) fn schedule(row: &PgRow) -> StoreResult<ScheduleRow> {
    Ok(ScheduleRow {
        id: get(row, 0)?,
        source: get(row, 1)?,
        spec: get(row, 2)?,
        state: get(row, 3)?,
        due_ms: get(row, 4)?,
    })
}

pub(super) const WEBHOOK_SOURCE_COLUMNS: &str =
    "name, origin, config, created_at_ms, updated_at_ms";

pub(super) fn webhook_source(row: &PgRow) -> StoreResult<WebhookSourceRow> {
    Ok(WebhookSourceRow {
        name: get(row, 0)?,
        origin: get(row, 1)?,
        config: get(row, 2)?,
        created_at_ms: get(row, 3)?,
        updated_at_ms: get(row, 4)?,
    })
}
