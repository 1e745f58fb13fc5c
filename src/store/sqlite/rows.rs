//! Rows and small helpers of the SQLite store: the column lists, the mapping of a row to a
//! record (checked: a corrupt row is an error, never a panic), and the statements every
//! write shares.

use std::sync::LazyLock;

use durin_protocol::{EntryKind, Failure, HandlerSpec};
use rusqlite::{params, Connection, OptionalExtension, Row};

use super::*;

pub(super) const INVOCATION_COLUMNS: &str =
    "id, service, handler, deployment_id, status, attempt, failures, \
    position_failures, journal_len, next_run_at_ms, last_error, failure, idempotency_key, \
    created_at_ms, modified_at_ms, completed_at_ms, attempt_token, workflow_id, waiting_for, \
    journal_bytes, cancel_requested_at_ms, parent_invocation_id, parent_index, deadline_ms, \
    scheduled_at_ms, heartbeat_at_ms, traceparent, concurrency_key, key_limit";

/// A row of `INVOCATION_COLUMNS`, checked.
pub(super) fn invocation(row: &Row<'_>) -> rusqlite::Result<StoreResult<InvocationRecord>> {
    let id: String = row.get(0)?;
    let status: String = row.get(4)?;
    let failure: Option<String> = row.get(11)?;
    let waiting_for: Option<String> = row.get(18)?;
    let record = (|| {
        Ok(InvocationRecord {
            id: InvocationId::parse(&id).map_err(corrupt)?,
            status: Status::parse(&status)
                .ok_or_else(|| corrupt(format!("unknown status {status:?}")))?,
            failure: failure
                .map(|f| serde_json::from_str::<Failure>(&f))
                .transpose()
                .map_err(backend)?,
            service: row.get(1).map_err(backend)?,
            handler: row.get(2).map_err(backend)?,
            deployment_id: row.get(3).map_err(backend)?,
            attempt: row.get(5).map_err(backend)?,
            failures: row.get(6).map_err(backend)?,
            position_failures: row.get(7).map_err(backend)?,
            journal_len: row.get(8).map_err(backend)?,
            next_run_at_ms: row.get(9).map_err(backend)?,
            last_error: row.get(10).map_err(backend)?,
            idempotency_key: row.get(12).map_err(backend)?,
            created_at_ms: row.get(13).map_err(backend)?,
            modified_at_ms: row.get(14).map_err(backend)?,
            completed_at_ms: row.get(15).map_err(backend)?,
            attempt_token: row.get(16).map_err(backend)?,
            workflow_id: row.get(17).map_err(backend)?,
            journal_bytes: row.get(19).map_err(backend)?,
            cancel_requested_at_ms: row.get(20).map_err(backend)?,
            parent_invocation_id: row.get(21).map_err(backend)?,
            parent_index: row.get(22).map_err(backend)?,
            deadline_ms: row.get(23).map_err(backend)?,
            scheduled_at_ms: row.get(24).map_err(backend)?,
            heartbeat_at_ms: row.get(25).map_err(backend)?,
            traceparent: row.get(26).map_err(backend)?,
            key: key_of(row.get(27).map_err(backend)?, row.get(28).map_err(backend)?),
            waiting_for: waiting_for
                .map(|w| serde_json::from_str(&w))
                .transpose()
                .map_err(backend)?
                .unwrap_or_default(),
        })
    })();
    Ok(record)
}

/// An invocation's key from its two columns.
pub(super) fn key_of(key: Option<String>, limit: Option<u32>) -> Option<InvocationKey> {
    Some(InvocationKey {
        key: key?,
        limit: limit.unwrap_or(1).max(1),
        shared: limit == Some(0),
        debounce_ms: None,
        debounce_max_ms: None,
        rate: None,
    })
}

/// Journal entries with their completions (`j` and `c`).
pub(super) const ENTRY_SELECT: &str =
    "SELECT j.idx, j.kind, j.name, j.value, j.content_type, j.failure, \
     j.attempt, j.at_ms, c.seq, c.value, c.failure, c.at_ms FROM journal j \
     LEFT JOIN completions c ON c.invocation_id = j.invocation_id AND c.idx = j.idx";

pub(super) fn entry(row: &Row<'_>) -> rusqlite::Result<StoreResult<StoredEntry>> {
    let kind: String = row.get(1)?;
    let failure: Option<String> = row.get(5)?;
    let completion_seq: Option<u32> = row.get(8)?;
    let completion_failure: Option<String> = row.get(10)?;
    let entry = (|| {
        let completion = match completion_seq {
            Some(seq) => Some(StoredCompletion {
                seq,
                value: row.get(9).map_err(backend)?,
                failure: completion_failure
                    .map(|f| serde_json::from_str::<Failure>(&f))
                    .transpose()
                    .map_err(backend)?,
                at_ms: row.get(11).map_err(backend)?,
            }),
            None => None,
        };
        Ok(StoredEntry {
            index: row.get(0).map_err(backend)?,
            kind: EntryKind::parse(&kind)
                .ok_or_else(|| corrupt(format!("unknown entry kind {kind:?}")))?,
            name: row.get(2).map_err(backend)?,
            value: row.get(3).map_err(backend)?,
            content_type: row.get(4).map_err(backend)?,
            failure: failure
                .map(|f| serde_json::from_str::<Failure>(&f))
                .transpose()
                .map_err(backend)?,
            attempt: row.get(6).map_err(backend)?,
            at_ms: row.get(7).map_err(backend)?,
            completion,
        })
    })();
    Ok(entry)
}

pub(super) fn deployment(row: &Row<'_>) -> rusqlite::Result<StoreResult<DeploymentRecord>> {
    let protocol: String = row.get(2)?;
    let services: String = row.get(3)?;
    let record = (|| {
        Ok(DeploymentRecord {
            id: row.get(0).map_err(backend)?,
            url: row.get(1).map_err(backend)?,
            protocol: HandlerProtocol::parse(&protocol)
                .ok_or_else(|| corrupt(format!("unknown protocol {protocol:?}")))?,
            services: serde_json::from_str(&services).map_err(backend)?,
            created_at_ms: row.get(4).map_err(backend)?,
            active: row.get(5).map_err(backend)?,
        })
    })();
    Ok(record)
}

pub(super) fn target(row: &Row<'_>) -> rusqlite::Result<StoreResult<HandlerTarget>> {
    let protocol: String = row.get(2)?;
    let spec: String = row.get(5)?;
    let target = (|| {
        Ok(HandlerTarget {
            deployment_id: row.get(0).map_err(backend)?,
            url: row.get(1).map_err(backend)?,
            protocol: HandlerProtocol::parse(&protocol)
                .ok_or_else(|| corrupt(format!("unknown protocol {protocol:?}")))?,
            service: row.get(3).map_err(backend)?,
            handler: row.get(4).map_err(backend)?,
            spec: serde_json::from_str::<HandlerSpec>(&spec).map_err(backend)?,
        })
    })();
    Ok(target)
}

/// Runs a query expected to return at most one row, mapped by `map`.
pub(super) fn query_one<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    map: impl FnOnce(&Row<'_>) -> rusqlite::Result<StoreResult<T>>,
) -> StoreResult<Option<T>> {
    conn.prepare_cached(sql)
        .map_err(backend)?
        .query_row(params, map)
        .optional()
        .map_err(backend)?
        .transpose()
}

/// Runs a query and maps every row with `map`.
pub(super) fn query_all<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    map: impl FnMut(&Row<'_>) -> rusqlite::Result<StoreResult<T>>,
) -> StoreResult<Vec<T>> {
    let mut statement = conn.prepare_cached(sql).map_err(backend)?;
    let rows = statement.query_map(params, map).map_err(backend)?;
    rows.map(|row| row.map_err(backend)?).collect()
}

pub(super) fn execute(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> StoreResult<usize> {
    conn.prepare_cached(sql)
        .map_err(backend)?
        .execute(params)
        .map_err(backend)
}

pub(super) fn to_json<T: serde::Serialize>(value: &T) -> StoreResult<String> {
    serde_json::to_string(value).map_err(backend)
}

pub(super) fn fetch_invocation(
    conn: &Connection,
    id: &str,
) -> StoreResult<Option<InvocationRecord>> {
    static SQL: LazyLock<String> =
        LazyLock::new(|| format!("SELECT {INVOCATION_COLUMNS} FROM invocations WHERE id = ?1"));
    query_one(conn, &SQL, [id], invocation)
}

pub(super) fn insert_entry(conn: &Connection, id: &str, entry: &StoredEntry) -> StoreResult<()> {
    insert_entry_at(conn, id, entry.index, entry)
}

/// Inserts `entry` at `index` (whatever its own).
pub(super) fn insert_entry_at(
    conn: &Connection,
    id: &str,
    index: u32,
    entry: &StoredEntry,
) -> StoreResult<()> {
    let failure = entry.failure.as_ref().map(to_json).transpose()?;
    execute(
        conn,
        "INSERT INTO journal (invocation_id, idx, kind, name, value, content_type, failure, attempt, at_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            id,
            index,
            entry.kind.as_str(),
            entry.name,
            entry.value,
            entry.content_type,
            failure,
            entry.attempt,
            entry.at_ms
        ],
    )?;
    Ok(())
}

pub(super) fn latest_deployment(
    conn: &Connection,
    url: &str,
) -> StoreResult<Option<DeploymentRecord>> {
    query_one(
        conn,
        "SELECT id, url, protocol, services, created_at_ms, active FROM deployments \
         WHERE url = ?1 ORDER BY id DESC LIMIT 1",
        [url],
        deployment,
    )
}

/// The columns of a schedule, in [`schedule`]'s order.
pub(super) const SCHEDULE_COLUMNS: &str = "id, source, spec, state, due_ms";

pub(super) fn schedule(row: &Row<'_>) -> rusqlite::Result<StoreResult<ScheduleRow>> {
    Ok(Ok(ScheduleRow {
        id: row.get(0)?,
        source: row.get(1)?,
        spec: row.get(2)?,
        state: row.get(3)?,
        due_ms: row.get(4)?,
    }))
}

pub(super) const WEBHOOK_SOURCE_COLUMNS: &str =
    "name, origin, config, created_at_ms, updated_at_ms";

pub(super) fn webhook_source(row: &Row<'_>) -> rusqlite::Result<StoreResult<WebhookSourceRow>> {
    Ok(Ok(WebhookSourceRow {
        name: row.get(0)?,
        origin: row.get(1)?,
        config: row.get(2)?,
        created_at_ms: row.get(3)?,
        updated_at_ms: row.get(4)?,
    }))
}
