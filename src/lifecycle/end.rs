//! An attempt's end, recorded: fenced by the attempt, in one transaction with everything
//! the end implies (the suspension's bindings and due time, the output entry, the next
//! run of a workflow that continues as new, the parent's completion, the children's
//! parent-close policies).
//!
//! A run does not complete while a signal that arrived during its last attempt waits in
//! its buffer: that attempt could not have seen it, so the completion is deferred and the
//! run runs again at once (as Temporal runs a workflow task again when new events came
//! during it). A run that fails, is cancelled or is terminated ends with its buffered
//! signals unconsumed, and its view lists them; a run that continues as new hands them to
//! its next run.

use durin_protocol::Failure;

use crate::ids::InvocationId;
use crate::store::tables::{lock_with_workflow_id, refusal, Tx};
use crate::store::{
    AttemptEnd, Charge, Closed, InvocationRecord, JournalLimits, NewEntry, ParentClose, Store,
    StoreError, StoreResult, StoredEntry,
};

use super::terminate::{end_now, Ending};

impl dyn Store {
    /// Records how `attempt` ended (see [`end_attempt`]).
    pub async fn end_attempt(
        &self,
        id: &InvocationId,
        attempt: u32,
        end: AttemptEnd,
        now_ms: i64,
    ) -> StoreResult<(InvocationRecord, Option<StoredEntry>, Closed)> {
        self.end_attempt_after(id, attempt, Vec::new(), end, now_ms)
            .await
    }

    /// Appends the entries the handler's outcome carried, then records how `attempt`
    /// ended, in one transaction (see [`end_after_entries`]).
    pub async fn end_attempt_after(
        &self,
        id: &InvocationId,
        attempt: u32,
        entries: Vec<NewEntry>,
        end: AttemptEnd,
        now_ms: i64,
    ) -> StoreResult<(InvocationRecord, Option<StoredEntry>, Closed)> {
        // Run again by the engine while it fails (`StoreError::Contended` included).
        let id = id.to_string();
        let limits = self.journal_limits();
        self.write_repeatable(&id.clone(), move |tx| {
            let (id, entries, end) = (id.clone(), entries.clone(), end.clone());
            Box::pin(async move {
                end_after_entries(tx, &id, attempt, entries, end, now_ms, limits).await
            })
        })
        .await
    }
}

/// Appends `entries` for `attempt` (version 5: the entries an output or a terminal failure
/// carries, which nothing observed before the end), then records its end. An entry the
/// journal refuses (a wrong index, a full journal) fails the invocation as a refused
/// append fails it in the SDK (`JournalRefused`), with the entries before it kept; a
/// fenced attempt writes nothing.
pub async fn end_after_entries(
    tx: &mut dyn Tx,
    id: &str,
    attempt: u32,
    entries: Vec<NewEntry>,
    mut end: AttemptEnd,
    now_ms: i64,
    limits: JournalLimits,
) -> StoreResult<(InvocationRecord, Option<StoredEntry>, Closed)> {
    for entry in entries {
        let index = entry.index.unwrap_or_default();
        match crate::journal::append::append(tx, id, attempt, entry, now_ms, limits).await {
            Ok(_) => {}
            Err(refused @ (StoreError::IndexMismatch { .. } | StoreError::JournalFull { .. })) => {
                end = AttemptEnd::Failed {
                    failure: Failure {
                        status: 500,
                        error_type: Some("JournalRefused".into()),
                        message: format!(
                            "the gateway refused entry {index}, which came with the outcome: {refused}"
                        ),
                    },
                    body: None,
                };
                break;
            }
            Err(error) => return Err(error),
        }
    }
    end_attempt(tx, id, attempt, end, now_ms).await
}

/// The value, content type and failure of an output entry.
pub type Output = (Option<Vec<u8>>, Option<String>, Option<Failure>);

/// Records how `attempt` ended, fenced by it: a stale attempt changes nothing.
pub async fn end_attempt(
    tx: &mut dyn Tx,
    id: &str,
    attempt: u32,
    end: AttemptEnd,
    now_ms: i64,
) -> StoreResult<(InvocationRecord, Option<StoredEntry>, Closed)> {
    // A run that continues as new moves its workflow id: the id's lock first, then the
    // run's (the order every rule takes them in); it and a suspension read the run's
    // signals, updates and commands before they write, under the run's lock, so that
    // what is sent meanwhile comes before (and is seen) or after (and finds the run
    // handed over or suspended). A completion's fenced update also refuses when an arrival
    // was noted during the attempt (see below); any other end is fenced by its own
    // update.
    match &end {
        AttemptEnd::ContinuedAsNew { .. } => {
            lock_with_workflow_id(tx, id).await?;
        }
        AttemptEnd::Suspended { .. } => {
            // A suspension binds signals before its fenced update: a refused one writes
            // nothing.
            let current = tx.lock_invocation(id).await?;
            if !current
                .as_ref()
                .is_some_and(|r| r.attempt == attempt && r.status == crate::store::Status::Running)
            {
                return Err(refusal(tx, id, attempt).await);
            }
        }
        _ => {}
    }
    let mut suspended_due = None;
    let end = match end {
        AttemptEnd::Suspended {
            until_ms,
            waiting_for,
        } => {
            let (due, can_complete) =
                crate::journal::completion::suspension_due(tx, id, until_ms, &waiting_for, now_ms)
                    .await?;
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
        AttemptEnd::ContinuedAsNew { .. } => {
            // Its signals go to the next run; updates that came during the attempt hold it.
            let (_, updates) = tx.unseen_arrivals(id, attempt).await?;
            if updates {
                deferred(now_ms, "updates")
            } else {
                end
            }
        }
        other => other,
    };
    let output = match &end {
        AttemptEnd::Completed {
            output,
            content_type,
        } => Some((Some(output.clone()), content_type.clone(), None)),
        AttemptEnd::Failed { failure, body } => {
            let (value, content_type) = body.clone().unzip();
            Some((value, content_type.flatten(), Some(failure.clone())))
        }
        AttemptEnd::Cancelled { failure } => Some((None, None, Some(failure.clone()))),
        AttemptEnd::ContinuedAsNew { next, .. } => Some(super::continue_as_new::output(next)),
        AttemptEnd::BackOff { .. } | AttemptEnd::Suspended { .. } | AttemptEnd::Paused { .. } => {
            None
        }
    };
    let output_bytes = output
        .as_ref()
        .and_then(|(value, ..)| value.as_ref())
        .map_or(0, Vec::len) as i64;
    // A completion is written unless a signal or an update arrived during the attempt
    // (noted on the run's row, which the update reads after any writer of it committed).
    let completes = matches!(end, AttemptEnd::Completed { .. });
    let output = output.map(|output| output_entry(attempt, output, now_ms));
    // An end that closes the run closes it in the same write (one statement on
    // PostgreSQL); a run that continues as new starts its next run first.
    let written = match &output {
        Some(entry) if !matches!(end, AttemptEnd::ContinuedAsNew { .. }) => tx
            .record_final_end(id, attempt, &end, output_bytes, completes, now_ms, entry)
            .await?
            .map(|(record, children)| (record, Some(children))),
        _ => tx
            .record_end(
                id,
                attempt,
                &end,
                suspended_due,
                output_bytes,
                completes,
                now_ms,
            )
            .await?
            .map(|record| (record, None)),
    };
    let (record, children) = match written {
        Some(written) => written,
        None if completes => {
            // Fenced, or something arrived: under the run's lock, what arrived, and
            // whether nothing handled it.
            let current = tx.lock_invocation(id).await?;
            if !current
                .as_ref()
                .is_some_and(|r| r.attempt == attempt && r.status == crate::store::Status::Running)
            {
                return Err(refusal(tx, id, attempt).await);
            }
            if let Some(unseen) = unseen(tx, id, attempt).await? {
                let backoff = deferred(now_ms, &unseen);
                let record = tx
                    .record_end(id, attempt, &backoff, None, 0, false, now_ms)
                    .await?
                    .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
                return Ok((record, None, Vec::new()));
            }
            let record = tx
                .record_end(id, attempt, &end, None, output_bytes, false, now_ms)
                .await?
                .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
            (record, None)
        }
        None => return Err(refusal(tx, id, attempt).await),
    };
    if let AttemptEnd::ContinuedAsNew {
        input,
        next,
        target,
        deadline_ms,
    } = end
    {
        super::continue_as_new::start_next_run(
            tx,
            &record,
            &input,
            &next,
            target.as_deref(),
            deadline_ms,
            now_ms,
        )
        .await?;
    }
    let (output, children) = match (output, children) {
        (Some(entry), Some(children)) => {
            let entry = StoredEntry {
                index: record.journal_len - 1,
                ..entry
            };
            hold_key(tx, &record, now_ms).await?;
            (Some(entry), children)
        }
        (Some(entry), None) => {
            let (output, children) = record_output(tx, &record, entry, now_ms).await?;
            (Some(output), children)
        }
        (None, _) => (None, Vec::new()),
    };
    let mut closed = Vec::new();
    if record.status.is_final() {
        // A run that continued as new leaves its parent's call to its next run.
        if record.status != crate::store::Status::Continued {
            crate::journal::child::complete_parent(tx, &record, output.as_ref(), now_ms).await?;
        }
        close_children(tx, id, children, now_ms, &mut closed).await?;
        crate::keys::ended(tx, &record, now_ms).await?;
    }
    Ok((record, output, closed))
}

/// The end of an attempt whose run runs again at once to see what arrived during it.
fn deferred(now_ms: i64, unseen: &str) -> AttemptEnd {
    AttemptEnd::BackOff {
        until_ms: now_ms,
        error: format!(
            "completion deferred: {unseen} arrived while the attempt ran and were not handled; the run runs again to see them"
        ),
        charged: Charge::Nobody,
    }
}

/// What arrived during `attempt` and was not handled (signals no wait took, updates
/// pending since it started), described; `None` when nothing.
async fn unseen(tx: &mut dyn Tx, id: &str, attempt: u32) -> StoreResult<Option<String>> {
    let (signals, updates) = tx.unseen_arrivals(id, attempt).await?;
    let mut unseen = Vec::new();
    if let Some(signals) = signals {
        unseen.push(format!("signals {signals}"));
    }
    if updates {
        unseen.push("updates".to_owned());
    }
    Ok((!unseen.is_empty()).then(|| unseen.join(" and ")))
}

/// The output entry of `attempt`: its value or failure (its index is the last of the
/// journal the end grew, set where it is written).
pub fn output_entry(
    attempt: u32,
    (value, content_type, failure): Output,
    now_ms: i64,
) -> StoredEntry {
    StoredEntry {
        index: 0,
        kind: durin_protocol::EntryKind::Output,
        name: None,
        value,
        content_type,
        failure,
        attempt,
        at_ms: now_ms,
        completion: None,
    }
}

/// Writes the `output` entry of an invocation that has just ended (its row already counts
/// it in `journal_len`) and closes its run: its timers go, its unhandled updates are
/// abandoned, and its idempotency key names it for the retention period from now. With
/// the entry, the invocation's unfinished children and their parent-close policies.
pub async fn record_output(
    tx: &mut dyn Tx,
    record: &InvocationRecord,
    output: StoredEntry,
    now_ms: i64,
) -> StoreResult<(StoredEntry, Vec<(String, ParentClose)>)> {
    let output = StoredEntry {
        index: record.journal_len - 1,
        ..output
    };
    let children = tx.close_run(record.id.as_str(), &output).await?;
    hold_key(tx, record, now_ms).await?;
    Ok((output, children))
}

/// The idempotency key of an invocation that has just ended names it for the retention
/// period from now.
async fn hold_key(tx: &mut dyn Tx, record: &InvocationRecord, now_ms: i64) -> StoreResult<()> {
    if record.idempotency_key.is_some() {
        tx.hold_idempotency_keys(record.id.as_str(), Some(now_ms))
            .await?;
    }
    Ok(())
}

/// Applies the parent-close policies of the unfinished `children` of `parent`, which has
/// just ended: `terminate` ends them at once (into `closed`), `cancel` cancels them (they
/// compensate), `abandon` leaves them.
pub async fn close_children(
    tx: &mut dyn Tx,
    parent: &str,
    children: Vec<(String, ParentClose)>,
    now_ms: i64,
    closed: &mut Closed,
) -> StoreResult<()> {
    for (child, policy) in children {
        match policy {
            ParentClose::Terminate => {
                let ending = Ending::terminated(format!("its parent {parent} closed"));
                end_now(tx, &child, &ending, now_ms, closed).await?;
            }
            ParentClose::Cancel => {
                super::cancel::request(tx, &child, now_ms, closed).await?;
            }
            ParentClose::Abandon => {}
        }
    }
    Ok(())
}
