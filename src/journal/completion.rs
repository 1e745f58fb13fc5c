//! Completions: the result of a command (a timer, a signal wait, an awakeable, a child
//! call, a cancellation), numbered per invocation in the order the events happened, and
//! the wake-up of a suspended invocation that waits for it.

use durin_protocol::Failure;

use crate::store::tables::Tx;
use crate::store::{Status, StoreResult, StoredCompletion};

/// Writes the completion of the command at `index` (the next in order of arrival).
pub async fn complete(
    tx: &mut dyn Tx,
    id: &str,
    index: u32,
    value: Option<Vec<u8>>,
    failure: Option<Failure>,
    now_ms: i64,
) -> StoreResult<StoredCompletion> {
    let completion = StoredCompletion {
        seq: tx.next_completion_seq(id).await?,
        value,
        failure,
        at_ms: now_ms,
    };
    tx.insert_completion(id, index, &completion).await?;
    Ok(completion)
}

/// Makes a suspended invocation due now if it waits for the command at `index`.
pub async fn wake_if_waiting(
    tx: &mut dyn Tx,
    id: &str,
    index: u32,
    now_ms: i64,
) -> StoreResult<bool> {
    let waits = tx
        .invocation(id)
        .await?
        .is_some_and(|r| r.status == Status::Suspended && r.waiting_for.contains(&index));
    if waits {
        tx.wake(id, now_ms).await?;
    }
    Ok(waits)
}

/// Where a suspension leaves the invocation: due now when a command it waits for has
/// completed (or a waited timer is due), else at the first waited timer (`until_ms` for a
/// version 1 handler), else when a completion wakes it. `None` for the due time and
/// `false` when it waits for nothing that can ever complete.
///
/// A wait takes a signal only while someone waits for it (when it is appended, or now),
/// so a wait that lost a race and is never waited for again takes nothing; and only the
/// first event of a wait is delivered: nothing is bound once one of the commands it waits
/// for has completed (or its timer is due before the signal came).
pub async fn suspension_due(
    tx: &mut dyn crate::store::tables::Tx,
    id: &str,
    until_ms: Option<i64>,
    waiting_for: &[u32],
    now_ms: i64,
) -> crate::store::StoreResult<(Option<i64>, bool)> {
    use super::signal;
    signal::take_first_buffered(tx, id, waiting_for, now_ms).await?;
    let mut due = until_ms;
    let mut can_complete = until_ms.is_some();
    // An update that came during the attempt is handled at once, by the next one.
    if tx.updates_since_attempt(id).await? {
        due = Some(now_ms);
        can_complete = true;
    }
    for index in waiting_for {
        let Some(row) = tx.command(id, *index).await? else {
            continue;
        };
        if !row.kind.is_some_and(durin_protocol::EntryKind::is_command) {
            continue;
        }
        can_complete = true;
        let at = if row.completed.is_some() {
            Some(now_ms)
        } else {
            row.wake_at_ms
        };
        due = match (due, at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    Ok((due, can_complete))
}
