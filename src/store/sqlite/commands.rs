//! What a write does to a journal in the SQLite store: appends (fenced by the attempt and
//! its token), the effects of commands (timers, signal waits, state), completions numbered
//! in the order their events happened, signals and their binding to waits, suspensions,
//! and new invocations. Every function runs inside the caller's transaction.

use durin_protocol::{EntryKind, Failure};
use rusqlite::{params, Connection, OptionalExtension};

use super::*;
pub(super) use crate::store::shared::{Ending, Pending};

/// Appends `entry` for `attempt` at the next free index (which must be `entry.index` when
/// that is given), inside the caller's transaction.
pub(super) fn append(
    conn: &Connection,
    id: &InvocationId,
    attempt: u32,
    entry: NewEntry,
    now_ms: i64,
    limits: JournalLimits,
) -> StoreResult<StoredEntry> {
    let bytes = entry.value.as_ref().map_or(0, Vec::len) as i64
        + entry.name.as_ref().map_or(0, String::len) as i64;
    let grown: Option<u32> = conn
        .prepare_cached(
            "UPDATE invocations SET journal_len = journal_len + 1, \
             journal_bytes = journal_bytes + ?6, position_failures = 0, modified_at_ms = ?1 \
             WHERE id = ?2 AND attempt = ?3 AND status = 'running' \
             AND (?4 IS NULL OR journal_len = ?4) \
             AND (?5 IS NULL OR attempt_token = ?5) \
             AND journal_len < ?7 AND journal_bytes + ?6 <= ?8 RETURNING journal_len",
        )
        .map_err(backend)?
        .query_row(
            params![
                now_ms,
                id.as_str(),
                attempt,
                entry.index,
                entry.token,
                bytes,
                limits.max_entries,
                limits.max_bytes
            ],
            |row| row.get(0),
        )
        .optional()
        .map_err(backend)?;
    let Some(journal_len) = grown else {
        return Err(match refusal(conn, id.as_str(), attempt) {
            StoreError::Fenced {
                current_attempt,
                status: Status::Running,
                ..
            } if current_attempt == attempt => {
                let current = fetch_invocation(conn, id.as_str())?;
                let token = current.as_ref().and_then(|r| r.attempt_token.clone());
                if entry.token.is_some() && entry.token != token {
                    StoreError::WrongToken {
                        invocation_id: id.to_string(),
                        attempt,
                    }
                } else if let Some(recorded) = same_append(conn, id.as_str(), attempt, &entry)? {
                    // The same append again (its answer was lost): the recorded entry.
                    return Ok(recorded);
                } else if let Some(full) = current.as_ref().and_then(|r| {
                    let index_ok = entry.index.is_none_or(|i| i == r.journal_len);
                    let limit = if r.journal_len >= limits.max_entries {
                        Some(format!("{} entries at most", limits.max_entries))
                    } else if r.journal_bytes + bytes > limits.max_bytes {
                        Some(format!("{} bytes at most", limits.max_bytes))
                    } else {
                        None
                    };
                    limit.filter(|_| index_ok)
                }) {
                    StoreError::JournalFull {
                        invocation_id: id.to_string(),
                        limit: full,
                    }
                } else {
                    StoreError::IndexMismatch {
                        invocation_id: id.to_string(),
                        requested: entry.index.unwrap_or_default(),
                        expected: current.map(|r| r.journal_len).unwrap_or_default(),
                    }
                }
            }
            other => other,
        });
    };
    let mut stored = StoredEntry {
        index: journal_len - 1,
        kind: entry.kind,
        name: entry.name,
        value: entry.value,
        content_type: entry.content_type,
        failure: entry.failure,
        attempt,
        at_ms: now_ms,
        completion: None,
    };
    insert_entry(conn, id.as_str(), &stored)?;
    stored.completion = apply_effect(conn, id.as_str(), &stored, entry.effect, now_ms)?;
    metrics::counter!(crate::telemetry::APPENDS).increment(1);
    Ok(stored)
}

/// The entry an attempt recorded at the index `entry` names, if `entry` is that same append
/// sent again: same attempt, kind, name and failure, and the same value where the handler
/// chose it (the gateway computes a sleep's wake time, so a retry cannot repeat it).
fn same_append(
    conn: &Connection,
    id: &str,
    attempt: u32,
    entry: &NewEntry,
) -> StoreResult<Option<StoredEntry>> {
    let Some(index) = entry.index else {
        return Ok(None);
    };
    let sql = format!("{ENTRY_SELECT} WHERE j.invocation_id = ?1 AND j.idx = ?2");
    let Some(recorded) = query_one(conn, &sql, params![id, index], self::entry)? else {
        return Ok(None);
    };
    // The gateway chose these values (a wake time, a child's id): a retry cannot repeat them.
    let value_matches =
        entry.kind.is_command() || entry.kind == EntryKind::Send || recorded.value == entry.value;
    let same = recorded.attempt == attempt
        && recorded.kind == entry.kind
        && recorded.name == entry.name
        && recorded.failure == entry.failure
        && value_matches;
    Ok(same.then_some(recorded))
}

/// Refuses a caller that is not the running attempt of the invocation or lacks its token.
pub(super) fn check_attempt(
    conn: &Connection,
    id: &str,
    attempt: u32,
    token: &str,
) -> StoreResult<()> {
    let current = fetch_invocation(conn, id)?.ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
    if current.attempt != attempt || current.status != Status::Running {
        return Err(StoreError::Fenced {
            invocation_id: id.to_owned(),
            attempt,
            current_attempt: current.attempt,
            status: current.status,
        });
    }
    if current.attempt_token.as_deref() != Some(token) {
        return Err(StoreError::WrongToken {
            invocation_id: id.to_owned(),
            attempt,
        });
    }
    Ok(())
}

/// Carries out what an appended entry does besides being journaled; returns the entry's
/// completion when it is complete at once.
pub(super) fn apply_effect(
    conn: &Connection,
    id: &str,
    entry: &StoredEntry,
    effect: Effect,
    now_ms: i64,
) -> StoreResult<Option<StoredCompletion>> {
    match effect {
        Effect::None => Ok(None),
        Effect::Timer { wake_at_ms } if wake_at_ms <= now_ms => {
            complete(conn, id, entry.index, None, None, now_ms).map(Some)
        }
        Effect::Timer { wake_at_ms } => {
            execute(
                conn,
                "INSERT INTO timers (invocation_id, idx, wake_at_ms) VALUES (?1, ?2, ?3)",
                params![id, entry.index, wake_at_ms],
            )?;
            Ok(None)
        }
        Effect::SignalWait {
            take_buffered: false,
        } => Ok(None),
        Effect::SignalWait {
            take_buffered: true,
        } => {
            let name = entry.name.clone().unwrap_or_default();
            bind_buffered_signal(conn, id, entry.index, &name, now_ms)
        }
        Effect::State { key, value } => {
            put_state(conn, id, &key, value.as_deref())?;
            Ok(None)
        }
        Effect::StartChild(child) => {
            insert_child(conn, &child, id, entry, now_ms)?;
            Ok(None)
        }
        Effect::ChildRefused { failure } if entry.kind == EntryKind::Call => {
            complete(conn, id, entry.index, None, Some(failure), now_ms).map(Some)
        }
        Effect::ChildRefused { .. } => Ok(None),
        // An update that is no longer pending (or accepted) is left as it is: the entry
        // is the SDK's record either way.
        Effect::UpdateAccepted { id: update } => {
            execute(
                conn,
                "UPDATE updates SET status = 'accepted' \
                 WHERE invocation_id = ?1 AND id = ?2 AND status = 'pending'",
                params![id, update],
            )?;
            Ok(None)
        }
        Effect::UpdateDone {
            id: update,
            result,
            failure,
        } => {
            let failure = failure.as_ref().map(to_json).transpose()?;
            execute(
                conn,
                "UPDATE updates SET status = 'done', result = ?3, failure = ?4 \
                 WHERE invocation_id = ?1 AND id = ?2 AND status = 'accepted'",
                params![id, update, result, failure],
            )?;
            Ok(None)
        }
    }
}

/// Inserts a child invocation, pending and due at `child.due_ms`, with its input entry and
/// its link to the parent's entry.
fn insert_child(
    conn: &Connection,
    child: &ChildStart,
    parent: &str,
    entry: &StoredEntry,
    now_ms: i64,
) -> StoreResult<()> {
    let parent_index = entry.index;
    // The child's trace hangs under the parent's attempt that started it.
    let parent_trace: Option<String> = conn
        .query_row(
            "SELECT traceparent FROM invocations WHERE id = ?1",
            params![parent],
            |row| row.get(0),
        )
        .map_err(backend)?;
    let traceparent = InvocationId::parse(parent)
        .map(|p| {
            crate::trace_context::child_traceparent(&p, parent_trace.as_deref(), entry.attempt)
        })
        .ok();
    insert_pending(
        conn,
        Pending {
            id: child.id.as_str(),
            service: &child.target.service,
            handler: &child.target.handler,
            deployment_id: &child.target.deployment_id,
            input: &child.input,
            due_ms: child.due_ms,
            deadline_ms: child.deadline_ms,
            workflow_id: child.workflow.as_ref().map(|w| w.workflow_id.as_str()),
            parent: Some((parent, child.awaited.then_some(parent_index))),
            parent_close: Some(child.parent_close),
            traceparent,
        },
        now_ms,
    )?;
    if let Some(workflow) = &child.workflow {
        // The child workflow's run takes the id (it was free: see `check_workflow_id_free`).
        take_workflow_id(
            conn,
            &child.target.service,
            &workflow.workflow_id,
            child.id.as_str(),
            &workflow.input_digest,
        )?;
    }
    Ok(())
}

/// Points the workflow id `workflow_id` of `workflow` at the run `invocation`, started
/// with an input of digest `input_digest`.
pub(super) fn take_workflow_id(
    conn: &Connection,
    workflow: &str,
    workflow_id: &str,
    invocation: &str,
    input_digest: &str,
) -> StoreResult<()> {
    execute(
        conn,
        "INSERT INTO workflows (workflow, workflow_id, invocation_id, input_digest) \
         VALUES (?1, ?2, ?3, ?4) ON CONFLICT (workflow, workflow_id) DO UPDATE \
         SET invocation_id = excluded.invocation_id, input_digest = excluded.input_digest",
        params![workflow, workflow_id, invocation, input_digest],
    )?;
    Ok(())
}

/// Sets the state `key` of invocation `id` to `value` (`None` clears it).
fn put_state(conn: &Connection, id: &str, key: &str, value: Option<&[u8]>) -> StoreResult<()> {
    execute(
        conn,
        "INSERT INTO state (invocation_id, key, value) VALUES (?1, ?2, ?3) \
         ON CONFLICT (invocation_id, key) DO UPDATE SET value = excluded.value",
        params![id, key, value],
    )?;
    Ok(())
}

/// The run a child workflow's id names and that has not ended, if any (unless the append
/// is one sent again: its entry is recorded, and the child took the id then).
pub(super) fn taken_workflow_id(
    conn: &Connection,
    id: &str,
    index: Option<u32>,
    child: &ChildStart,
) -> StoreResult<Option<String>> {
    let Some(workflow) = &child.workflow else {
        return Ok(None);
    };
    let recorded = match (index, fetch_invocation(conn, id)?) {
        (Some(index), Some(record)) => index < record.journal_len,
        _ => false,
    };
    if recorded {
        return Ok(None);
    }
    let run: Option<String> = conn
        .prepare_cached(
            "SELECT w.invocation_id FROM workflows w JOIN invocations i ON i.id = w.invocation_id \
             WHERE w.workflow = ?1 AND w.workflow_id = ?2 AND i.completed_at_ms IS NULL",
        )
        .map_err(backend)?
        .query_row(params![child.target.service, workflow.workflow_id], |row| {
            row.get(0)
        })
        .optional()
        .map_err(backend)?;
    Ok(run)
}

/// Applies the parent-close policies of the unfinished children of `parent`, which has
/// just ended: `terminate` ends them at once (into `closed`), `cancel` cancels them (they
/// compensate), `abandon` leaves them.
pub(super) fn close_children(
    conn: &Connection,
    parent: &str,
    now_ms: i64,
    closed: &mut Vec<(InvocationRecord, StoredEntry)>,
) -> StoreResult<()> {
    for (child, policy) in open_children(conn, parent)? {
        match policy {
            ParentClose::Terminate => {
                let ending = Ending::terminated(format!("its parent {parent} closed"));
                end_now(conn, &child, &ending, now_ms, closed)?;
            }
            ParentClose::Cancel => {
                cancel(conn, &child, now_ms)?;
            }
            ParentClose::Abandon => {}
        }
    }
    Ok(())
}

/// The unfinished children of `parent` with their parent-close policy.
fn open_children(conn: &Connection, parent: &str) -> StoreResult<Vec<(String, ParentClose)>> {
    let mut statement = conn
        .prepare_cached(
            "SELECT id, parent_close FROM invocations WHERE parent_invocation_id = ?1 \
             AND completed_at_ms IS NULL ORDER BY id",
        )
        .map_err(backend)?;
    let rows = statement
        .query_map([parent], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, Option<String>>(1)?))
        })
        .map_err(backend)?;
    let rows: Vec<(String, Option<String>)> =
        rows.collect::<rusqlite::Result<_>>().map_err(backend)?;
    Ok(rows
        .into_iter()
        .map(|(id, policy)| {
            let policy = policy
                .as_deref()
                .and_then(ParentClose::parse)
                .unwrap_or(ParentClose::Abandon);
            (id, policy)
        })
        .collect())
}

/// Inserts an invocation that waits for the scheduler (attempt 0, due at `due_ms`), with
/// its JSON input entry.
pub(super) fn insert_pending(conn: &Connection, new: Pending<'_>, now_ms: i64) -> StoreResult<()> {
    execute(
        conn,
        "INSERT INTO invocations (id, service, handler, deployment_id, status, attempt, \
         failures, position_failures, journal_len, next_run_at_ms, created_at_ms, \
         modified_at_ms, journal_bytes, workflow_id, parent_invocation_id, parent_index, \
         deadline_ms, parent_close, traceparent) \
         VALUES (?1, ?2, ?3, ?4, 'pending', 0, 0, 0, 1, ?5, ?6, ?6, ?7, ?8, ?9, ?10, ?11, ?12, \
         ?13)",
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
        ],
    )?;
    insert_entry(
        conn,
        new.id,
        &input_entry(new.input.to_vec(), Some("application/json".into()), now_ms),
    )
}

/// An invocation's entry 0.
fn input_entry(value: Vec<u8>, content_type: Option<String>, now_ms: i64) -> StoredEntry {
    StoredEntry {
        index: 0,
        kind: EntryKind::Input,
        name: None,
        value: Some(value),
        content_type,
        failure: None,
        attempt: 0,
        at_ms: now_ms,
        completion: None,
    }
}

/// When an invocation a parent's `call` started has ended: its output or failure completes
/// the parent's entry (after the parent's timers due by then), and wakes the parent if it
/// waits for it. Nothing when the parent has ended.
pub(super) fn complete_parent(
    conn: &Connection,
    child: &InvocationRecord,
    output: Option<&StoredEntry>,
    now_ms: i64,
) -> StoreResult<()> {
    let (Some(parent), Some(index)) = (&child.parent_invocation_id, child.parent_index) else {
        return Ok(());
    };
    let open = fetch_invocation(conn, parent)?.is_some_and(|p| !p.status.is_final());
    if !open {
        return Ok(());
    }
    fire_timers(conn, parent, now_ms, now_ms)?;
    let (value, failure) = match child.status {
        Status::Completed => (output.and_then(|o| o.value.clone()), None),
        _ => (None, child.failure.clone()),
    };
    complete(conn, parent, index, value, failure, now_ms)?;
    wake_if_waiting(conn, parent, index, now_ms)?;
    Ok(())
}

/// Hands the oldest buffered signal named `name` to the wait at `index`, if there is one.
/// Timers that were due when the signal arrived fire first, so that completions are
/// numbered in the order their events happened.
pub(super) fn bind_buffered_signal(
    conn: &Connection,
    id: &str,
    index: u32,
    name: &str,
    now_ms: i64,
) -> StoreResult<Option<StoredCompletion>> {
    let buffered: Option<(u32, Option<Vec<u8>>, i64)> = conn
        .prepare_cached(
            "SELECT seq, value, at_ms FROM signals WHERE invocation_id = ?1 AND name = ?2 \
             AND consumed_by IS NULL ORDER BY seq LIMIT 1",
        )
        .map_err(backend)?
        .query_row(params![id, name], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })
        .optional()
        .map_err(backend)?;
    let Some((seq, value, arrived_at_ms)) = buffered else {
        return Ok(None);
    };
    fire_timers(conn, id, arrived_at_ms, now_ms)?;
    execute(
        conn,
        "UPDATE signals SET consumed_by = ?1 WHERE invocation_id = ?2 AND seq = ?3",
        params![index, id, seq],
    )?;
    complete(conn, id, index, value, None, now_ms).map(Some)
}

/// Writes the completion of the command at `index` (the next in order of arrival).
pub(super) fn complete(
    conn: &Connection,
    id: &str,
    index: u32,
    value: Option<Vec<u8>>,
    failure: Option<Failure>,
    now_ms: i64,
) -> StoreResult<StoredCompletion> {
    let seq: u32 = conn
        .prepare_cached(
            "SELECT COALESCE(MAX(seq), 0) + 1 FROM completions WHERE invocation_id = ?1",
        )
        .map_err(backend)?
        .query_row([id], |row| row.get(0))
        .map_err(backend)?;
    let failure_json = failure.as_ref().map(to_json).transpose()?;
    execute(
        conn,
        "INSERT INTO completions (invocation_id, idx, seq, value, failure, at_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![id, index, seq, value, failure_json, now_ms],
    )?;
    Ok(StoredCompletion {
        seq,
        value,
        failure,
        at_ms: now_ms,
    })
}

/// Whether updates sent since the current attempt started wait for the run to accept or
/// refuse them (the attempt was given the older ones: if it suspends without handling
/// them, it waits inside an update, and they wait for its next wait).
pub(super) fn has_pending_updates(conn: &Connection, id: &str) -> StoreResult<bool> {
    conn.prepare_cached(
        "SELECT 1 FROM updates u JOIN invocations i ON i.id = u.invocation_id \
         WHERE u.invocation_id = ?1 AND u.status = 'pending' \
         AND u.created_at_ms > COALESCE(i.attempt_started_at_ms, 0) LIMIT 1",
    )
    .map_err(backend)?
    .query_row([id], |_| Ok(()))
    .optional()
    .map(|found| found.is_some())
    .map_err(backend)
}

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

pub(super) const UPDATE_COLUMNS: &str = "invocation_id, id, name, status, result, failure";

/// The completion number of the invocation's cancellation, if someone cancelled it.
pub(super) fn cancel_seq(conn: &Connection, id: &str) -> StoreResult<Option<u32>> {
    conn.prepare_cached(
        "SELECT c.seq FROM journal j JOIN completions c \
         ON c.invocation_id = j.invocation_id AND c.idx = j.idx \
         WHERE j.invocation_id = ?1 AND j.kind = 'cancel' ORDER BY j.idx LIMIT 1",
    )
    .map_err(backend)?
    .query_row([id], |row| row.get(0))
    .optional()
    .map_err(backend)
}

/// Makes a suspended invocation due now if it waits for the command at `index`.
pub(super) fn wake_if_waiting(
    conn: &Connection,
    id: &str,
    index: u32,
    now_ms: i64,
) -> StoreResult<bool> {
    let row: Option<(String, Option<String>)> = conn
        .prepare_cached("SELECT status, waiting_for FROM invocations WHERE id = ?1")
        .map_err(backend)?
        .query_row([id], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()
        .map_err(backend)?;
    let Some((status, waiting_for)) = row else {
        return Ok(false);
    };
    let waits: Vec<u32> = waiting_for
        .map(|w| serde_json::from_str(&w))
        .transpose()
        .map_err(backend)?
        .unwrap_or_default();
    if status != Status::Suspended.as_str() || !waits.contains(&index) {
        return Ok(false);
    }
    execute(
        conn,
        "UPDATE invocations SET next_run_at_ms = MIN(COALESCE(next_run_at_ms, ?1), ?1), \
         modified_at_ms = ?1 WHERE id = ?2",
        params![now_ms, id],
    )?;
    Ok(true)
}

/// Where a suspension leaves the invocation: due now when a command it waits for has
/// completed (or a waited timer is due), else at the first waited timer (`until_ms` for a
/// version 1 handler), else when a completion wakes it. `None` for the due time and
/// `false` when it waits for nothing that can ever complete.
pub(super) fn suspension_due(
    conn: &Connection,
    id: &str,
    until_ms: Option<i64>,
    waiting_for: &[u32],
    now_ms: i64,
) -> StoreResult<(Option<i64>, bool)> {
    // A wait takes a signal only while someone waits for it (when it is appended, or now),
    // so a wait that lost a race and is never waited for again takes nothing; and only the
    // first event of a wait is delivered: nothing is bound once one of the commands it
    // waits for has completed (or its timer is due before the signal came).
    let race = race_state(conn, id, waiting_for, now_ms)?;
    if !race.decided {
        if let Some((index, name, arrived_at_ms)) = first_buffered(conn, id, waiting_for)? {
            if race.first_due_timer.is_none_or(|due| arrived_at_ms < due) {
                bind_buffered_signal(conn, id, index, &name, now_ms)?;
            }
        }
    }
    let mut due = until_ms;
    let mut can_complete = until_ms.is_some();
    // An update that came during the attempt is handled at once, by the next one.
    if has_pending_updates(conn, id)? {
        due = Some(now_ms);
        can_complete = true;
    }
    for index in waiting_for {
        let row: Option<(String, Option<u32>, Option<i64>)> = conn
            .prepare_cached(
                "SELECT j.kind, c.seq, t.wake_at_ms FROM journal j \
                 LEFT JOIN completions c ON c.invocation_id = j.invocation_id AND c.idx = j.idx \
                 LEFT JOIN timers t ON t.invocation_id = j.invocation_id AND t.idx = j.idx \
                 WHERE j.invocation_id = ?1 AND j.idx = ?2",
            )
            .map_err(backend)?
            .query_row(params![id, index], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })
            .optional()
            .map_err(backend)?;
        let Some((kind, completed, wake_at)) = row else {
            continue;
        };
        if !EntryKind::parse(&kind).is_some_and(EntryKind::is_command) {
            continue;
        }
        can_complete = true;
        let at = if completed.is_some() {
            Some(now_ms)
        } else {
            wake_at
        };
        due = match (due, at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    Ok((due, can_complete))
}

/// Where a wait for the first of `waiting_for` stands.
pub(super) struct RaceState {
    /// One of the commands has completed: the wait is decided.
    decided: bool,
    /// The earliest wake time of a waited timer that has not fired.
    first_due_timer: Option<i64>,
}

pub(super) fn race_state(
    conn: &Connection,
    id: &str,
    waiting_for: &[u32],
    now_ms: i64,
) -> StoreResult<RaceState> {
    let mut state = RaceState {
        decided: false,
        first_due_timer: None,
    };
    for index in waiting_for {
        let row: Option<(Option<u32>, Option<i64>)> = conn
            .prepare_cached(
                "SELECT c.seq, t.wake_at_ms FROM journal j \
                 LEFT JOIN completions c ON c.invocation_id = j.invocation_id AND c.idx = j.idx \
                 LEFT JOIN timers t ON t.invocation_id = j.invocation_id AND t.idx = j.idx \
                 WHERE j.invocation_id = ?1 AND j.idx = ?2",
            )
            .map_err(backend)?
            .query_row(params![id, index], |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()
            .map_err(backend)?;
        match row {
            Some((Some(_), _)) => state.decided = true,
            Some((None, Some(wake_at))) if wake_at <= now_ms => {
                state.first_due_timer =
                    Some(state.first_due_timer.map_or(wake_at, |t| t.min(wake_at)));
            }
            _ => {}
        }
    }
    Ok(state)
}

/// The buffered signal that arrived first among those the open waits of `waiting_for` can
/// take, with the wait that takes it (the lowest index of its name): `(index, name,
/// arrived at)`.
fn first_buffered(
    conn: &Connection,
    id: &str,
    waiting_for: &[u32],
) -> StoreResult<Option<(u32, String, i64)>> {
    let mut sorted = waiting_for.to_vec();
    sorted.sort_unstable();
    let mut best: Option<(u32, u32, String, i64)> = None;
    for index in sorted {
        let open_wait: Option<String> = conn
            .prepare_cached(
                "SELECT j.name FROM journal j WHERE j.invocation_id = ?1 AND j.idx = ?2 \
                 AND j.kind = 'signal' AND NOT EXISTS (SELECT 1 FROM completions c \
                 WHERE c.invocation_id = j.invocation_id AND c.idx = j.idx)",
            )
            .map_err(backend)?
            .query_row(params![id, index], |row| row.get(0))
            .optional()
            .map_err(backend)?;
        let Some(name) = open_wait else { continue };
        let buffered: Option<(u32, i64)> = conn
            .prepare_cached(
                "SELECT seq, at_ms FROM signals WHERE invocation_id = ?1 AND name = ?2 \
                 AND consumed_by IS NULL ORDER BY seq LIMIT 1",
            )
            .map_err(backend)?
            .query_row(params![id, name], |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()
            .map_err(backend)?;
        if let Some((seq, at_ms)) = buffered {
            if best.as_ref().is_none_or(|(best_seq, ..)| seq < *best_seq) {
                best = Some((seq, index, name, at_ms));
            }
        }
    }
    Ok(best.map(|(_, index, name, at_ms)| (index, name, at_ms)))
}

/// Fires the invocation's timers due by `by_ms`: each gets its completion (at `now_ms`), in
/// order of their wake times.
pub(super) fn fire_timers(conn: &Connection, id: &str, by_ms: i64, now_ms: i64) -> StoreResult<()> {
    let due: Vec<u32> = {
        let mut statement = conn
            .prepare_cached(
                "SELECT idx FROM timers WHERE invocation_id = ?1 AND wake_at_ms <= ?2 \
                 ORDER BY wake_at_ms, idx",
            )
            .map_err(backend)?;
        let rows = statement
            .query_map(params![id, by_ms], |row| row.get(0))
            .map_err(backend)?;
        rows.collect::<rusqlite::Result<_>>().map_err(backend)?
    };
    for index in due {
        complete(conn, id, index, None, None, now_ms)?;
        execute(
            conn,
            "DELETE FROM timers WHERE invocation_id = ?1 AND idx = ?2",
            params![id, index],
        )?;
    }
    Ok(())
}

/// Inserts a new invocation, running its first attempt, with its input entry and its
/// idempotency claim.
pub(super) fn insert_invocation(
    conn: &Connection,
    new: NewInvocation,
    workflow_id: Option<&str>,
) -> StoreResult<(InvocationRecord, StoredEntry)> {
    let id = new.id.as_str();
    let sql = format!(
        "INSERT INTO invocations (id, service, handler, deployment_id, status, attempt, \
         failures, position_failures, journal_len, next_run_at_ms, idempotency_key, \
         created_at_ms, modified_at_ms, attempt_token, workflow_id, journal_bytes, \
         deadline_ms, scheduled_at_ms, attempt_started_at_ms, traceparent) \
         VALUES (?1, ?2, ?3, ?4, 'running', 1, 0, 0, 1, NULL, ?6, ?5, ?5, ?7, ?8, ?9, ?10, ?5, ?5, \
         ?11) \
         RETURNING {INVOCATION_COLUMNS}"
    );
    let record = query_one(
        conn,
        &sql,
        params![
            id,
            new.target.service,
            new.target.handler,
            new.target.deployment_id,
            new.now_ms,
            new.idempotency.as_ref().map(|c| c.key.as_str()),
            new_attempt_token(),
            workflow_id,
            new.input.len() as i64,
            new.deadline_ms,
            new.traceparent,
        ],
        invocation,
    )?
    .ok_or_else(|| corrupt("INSERT … RETURNING returned no row".into()))?;
    let input = input_entry(new.input, new.content_type, new.now_ms);
    insert_entry(conn, id, &input)?;
    if let Some(claim) = &new.idempotency {
        execute(
            conn,
            "INSERT INTO idempotency_keys (scope, key, request_digest, invocation_id, \
             expires_at_ms, retention_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            // It expires only once the invocation has ended (see `end_attempt`).
            params![
                claim.scope,
                claim.key,
                claim.request_digest,
                id,
                i64::MAX,
                claim.retention_ms
            ],
        )?;
    }
    Ok((record, input))
}

/// The sequence number of the invocation's signal sent with idempotency key `key`.
pub(super) fn signal_seq(conn: &Connection, id: &str, key: &str) -> StoreResult<Option<u32>> {
    conn.prepare_cached("SELECT seq FROM signals WHERE invocation_id = ?1 AND idempotency_key = ?2")
        .map_err(backend)?
        .query_row(params![id, key], |row| row.get(0))
        .optional()
        .map_err(backend)
}

/// Stores a signal and hands it to the oldest open wait of its name.
pub(super) fn insert_signal(
    conn: &Connection,
    id: &str,
    signal: NewSignal,
    now_ms: i64,
) -> StoreResult<SignalSent> {
    if let Some(key) = &signal.idempotency_key {
        if let Some(seq) = signal_seq(conn, id, key)? {
            return Ok(SignalSent {
                seq,
                duplicate: true,
                woke: false,
            });
        }
    }
    let seq: u32 = conn
        .prepare_cached("SELECT COALESCE(MAX(seq), 0) + 1 FROM signals WHERE invocation_id = ?1")
        .map_err(backend)?
        .query_row([id], |row| row.get(0))
        .map_err(backend)?;
    // The oldest wait for this name that a suspended attempt waits for; otherwise the
    // signal is buffered until a wait takes it.
    let waiting_for: Vec<u32> = match fetch_invocation(conn, id)? {
        Some(record) if record.status == Status::Suspended => record.waiting_for,
        _ => Vec::new(),
    };
    let open_waits: Vec<u32> = if waiting_for.is_empty() {
        Vec::new()
    } else {
        let mut statement = conn
            .prepare_cached(
                "SELECT j.idx FROM journal j WHERE j.invocation_id = ?1 AND j.kind = 'signal' \
                 AND j.name = ?2 AND NOT EXISTS (SELECT 1 FROM completions c \
                 WHERE c.invocation_id = j.invocation_id AND c.idx = j.idx) ORDER BY j.idx",
            )
            .map_err(backend)?;
        let rows = statement
            .query_map(params![id, signal.name], |row| row.get(0))
            .map_err(backend)?;
        rows.collect::<rusqlite::Result<_>>().map_err(backend)?
    };
    // Only the first event of a wait is delivered: when a command it waits for has
    // completed, or a waited timer was due before this signal came, the signal stays
    // buffered for a later wait.
    let race = race_state(conn, id, &waiting_for, now_ms)?;
    let open_wait = open_waits
        .into_iter()
        .find(|i| waiting_for.contains(i))
        .filter(|_| !race.decided && race.first_due_timer.is_none());
    execute(
        conn,
        "INSERT INTO signals (invocation_id, seq, name, value, idempotency_key, consumed_by, at_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![id, seq, signal.name, signal.value, signal.idempotency_key, open_wait, now_ms],
    )?;
    let mut woke = false;
    if let Some(index) = open_wait {
        complete(conn, id, index, Some(signal.value), None, now_ms)?;
        woke = wake_if_waiting(conn, id, index, now_ms)?;
    }
    Ok(SignalSent {
        seq,
        duplicate: false,
        woke,
    })
}

/// Cancels an invocation (see [`Store::cancel`]) and, with it, the children its `call`
/// entries wait for, in the caller's transaction.
pub(super) fn cancel(conn: &Connection, id: &str, now_ms: i64) -> StoreResult<CancelAnswer> {
    let record = fetch_invocation(conn, id)?.ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
    if record.status.is_final() {
        return Ok(CancelAnswer::Ended(record));
    }
    if record.cancel_requested_at_ms.is_some() {
        return Ok(CancelAnswer::AlreadyRequested(record));
    }
    if record.status == Status::Paused {
        return Ok(CancelAnswer::Paused(record));
    }
    // Timers due by now fired before the cancellation (completions are numbered in the
    // order their events happened).
    fire_timers(conn, id, now_ms, now_ms)?;
    let index = record.journal_len;
    insert_entry(
        conn,
        id,
        &StoredEntry {
            index,
            kind: EntryKind::Cancel,
            name: None,
            value: None,
            content_type: None,
            failure: None,
            attempt: record.attempt,
            at_ms: now_ms,
            completion: None,
        },
    )?;
    complete(conn, id, index, None, None, now_ms)?;
    // Pending and due now: a running attempt is fenced (its appends and its end are
    // refused) and the next one replays up to the cancellation.
    let sql = format!(
        "UPDATE invocations SET journal_len = journal_len + 1, cancel_requested_at_ms = ?1, \
         status = 'pending', next_run_at_ms = ?1, waiting_for = NULL, modified_at_ms = ?1 \
         WHERE id = ?2 RETURNING {INVOCATION_COLUMNS}"
    );
    let record = query_one(conn, &sql, params![now_ms, id], invocation)?
        .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
    // A cancelled parent cancels the children it does not abandon.
    for (child, policy) in open_children(conn, id)? {
        if policy != ParentClose::Abandon {
            cancel(conn, &child, now_ms)?;
        }
    }
    Ok(CancelAnswer::Requested(record))
}

/// Ends an invocation at once, fenced like any change of state, and terminates the
/// children its `call` entries wait for (see [`Store::terminate`]); what it ended goes to
/// `ended`. Returns the invocation's record (unchanged when it had ended).
pub(super) fn end_now(
    conn: &Connection,
    id: &str,
    ending: &Ending,
    now_ms: i64,
    ended: &mut Vec<(InvocationRecord, StoredEntry)>,
) -> StoreResult<InvocationRecord> {
    let record = fetch_invocation(conn, id)?.ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
    if record.status.is_final() {
        return Ok(record);
    }
    let sql = format!(
        "UPDATE invocations SET status = ?4, journal_len = journal_len + 1, \
         completed_at_ms = ?1, failure = ?2, next_run_at_ms = NULL, waiting_for = NULL, \
         modified_at_ms = ?1 WHERE id = ?3 RETURNING {INVOCATION_COLUMNS}"
    );
    let record = query_one(
        conn,
        &sql,
        params![
            now_ms,
            to_json(&ending.failure)?,
            id,
            ending.status.as_str()
        ],
        invocation,
    )?
    .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
    let output = record_output(
        conn,
        &record,
        record.attempt,
        (None, None, Some(ending.failure.clone())),
        now_ms,
    )?;
    complete_parent(conn, &record, Some(&output), now_ms)?;
    ended.push((record.clone(), output));
    // A parent ended this way takes the children it does not abandon with it.
    let children = Ending::terminated(ending.children.clone());
    for (child, policy) in open_children(conn, id)? {
        if policy != ParentClose::Abandon {
            end_now(conn, &child, &children, now_ms, ended)?;
        }
    }
    Ok(record)
}

/// See [`Store::restart`]. Every check comes before the first write.
pub(super) fn restart(
    conn: &Connection,
    id: &str,
    from: u32,
    key: Option<&str>,
    now_ms: i64,
) -> StoreResult<Result<(InvocationRecord, bool), String>> {
    let record = fetch_invocation(conn, id)?.ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
    if let Some(key) = key {
        // The last restart sent again (its answer was lost): it was done, whatever became
        // of the invocation since.
        let last: Option<String> = conn
            .prepare_cached("SELECT restart_key FROM invocations WHERE id = ?1")
            .map_err(backend)?
            .query_row([id], |row| row.get(0))
            .map_err(backend)?;
        if last.as_deref() == Some(key) {
            return Ok(Ok((record, false)));
        }
    }
    let refuse = |why: String| Ok(Err(why));
    if !(record.status.is_final() || record.status == Status::Paused) {
        return refuse(format!(
            "invocation {id} is {}: pause it first, then restart it",
            record.status
        ));
    }
    if record.status == Status::Continued {
        return refuse(format!(
            "invocation {id} continued as new; its workflow id names a later run"
        ));
    }
    if record.parent_index.is_some() && record.status.is_final() {
        return refuse(format!(
            "invocation {id} gave its result to its parent {}; restart the parent instead",
            record.parent_invocation_id.as_deref().unwrap_or_default()
        ));
    }
    // An ended invocation's last entry is its output, which goes.
    let last = record
        .journal_len
        .saturating_sub(if record.status.is_final() { 2 } else { 1 });
    if from == 0 || from > last {
        return refuse(format!(
            "a restart keeps entries 0 to N, with N from 1 to {last}, not {from}"
        ));
    }
    // Entries that started something the replay would start again.
    let started: Option<(u32, String)> = conn
        .prepare_cached(
            "SELECT idx, kind FROM journal WHERE invocation_id = ?1 AND idx > ?2 \
             AND kind IN ('call', 'send', 'update', 'update_result') ORDER BY idx LIMIT 1",
        )
        .map_err(backend)?
        .query_row(params![id, from], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()
        .map_err(backend)?;
    if let Some((index, kind)) = started {
        return refuse(format!(
            "entry {index} (a {kind}) comes after entry {from}: a restart from there would start it again"
        ));
    }
    for sql in [
        "DELETE FROM journal WHERE invocation_id = ?1 AND idx > ?2",
        "DELETE FROM completions WHERE invocation_id = ?1 AND idx > ?2",
        "DELETE FROM timers WHERE invocation_id = ?1 AND idx > ?2",
        "UPDATE signals SET consumed_by = NULL WHERE invocation_id = ?1 AND consumed_by > ?2",
    ] {
        execute(conn, sql, params![id, from])?;
    }
    execute(conn, "DELETE FROM state WHERE invocation_id = ?1", [id])?;
    // The durable state as the entries kept left it.
    let writes: Vec<(String, Option<Vec<u8>>)> = {
        let mut statement = conn
            .prepare_cached(
                "SELECT name, value FROM journal WHERE invocation_id = ?1 AND kind = 'state' \
                 ORDER BY idx",
            )
            .map_err(backend)?;
        let rows = statement
            .query_map([id], |row| Ok((row.get(0)?, row.get(1)?)))
            .map_err(backend)?;
        rows.collect::<rusqlite::Result<_>>().map_err(backend)?
    };
    for (key, value) in writes {
        let op: serde_json::Value = value
            .as_deref()
            .and_then(|v| serde_json::from_slice(v).ok())
            .unwrap_or_default();
        let kept = op.get("set").map(|v| v.to_string().into_bytes());
        put_state(conn, id, &key, kept.as_deref())?;
    }
    let cancel_kept: bool = conn
        .prepare_cached("SELECT 1 FROM journal WHERE invocation_id = ?1 AND kind = 'cancel'")
        .map_err(backend)?
        .query_row([id], |_| Ok(()))
        .optional()
        .map_err(backend)?
        .is_some();
    let sql = format!(
        "UPDATE invocations SET status = 'pending', next_run_at_ms = ?1, modified_at_ms = ?1, \
         journal_len = ?3 + 1, \
         journal_bytes = (SELECT COALESCE(SUM(COALESCE(LENGTH(value), 0) + COALESCE(LENGTH(name), 0)), 0) \
             FROM journal WHERE invocation_id = ?2), \
         completed_at_ms = NULL, failure = NULL, waiting_for = NULL, failures = 0, \
         position_failures = 0, last_error = ?4, \
         cancel_requested_at_ms = CASE WHEN ?5 THEN cancel_requested_at_ms ELSE NULL END, \
         restart_key = ?6 \
         WHERE id = ?2 RETURNING {INVOCATION_COLUMNS}"
    );
    let record = query_one(
        conn,
        &sql,
        params![
            now_ms,
            id,
            from,
            format!("restarted from entry {from} by an operator"),
            cancel_kept,
            key
        ],
        invocation,
    )?
    .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
    // Its idempotency key names it again for as long as it runs.
    execute(
        conn,
        "UPDATE idempotency_keys SET expires_at_ms = ?2 WHERE invocation_id = ?1",
        params![id, i64::MAX],
    )?;
    Ok(Ok((record, true)))
}
