//! Cancel: a cancelled invocation ends as `cancelled` when its handler gives up with the
//! `Cancelled` error its next await received (after whatever compensations it ran), or, for
//! a plain handler, with any terminal answer. A handler that catches the error and returns
//! an output completes as usual.

use durin_protocol::Failure;

use crate::store::AttemptEnd;

/// The error type an SDK gives the await that receives a cancellation.
pub const CANCELLED: &str = "Cancelled";

pub(super) fn is_cancelled(failure: &Failure) -> bool {
    failure.error_type.as_deref() == Some(CANCELLED)
}

pub(super) fn ended(failure: Failure) -> AttemptEnd {
    AttemptEnd::Cancelled {
        failure: Failure {
            status: 409,
            error_type: Some(CANCELLED.into()),
            ..failure
        },
    }
}

impl dyn crate::store::Store {
    /// Asks to cancel an invocation (see [`request`]).
    pub async fn cancel(
        &self,
        id: &crate::ids::InvocationId,
        now_ms: i64,
    ) -> crate::store::StoreResult<crate::store::Cancellation> {
        let route = id.to_string();
        self.contended(|| {
            let id = route.clone();
            self.write(&route, move |tx| {
                Box::pin(async move {
                    let mut ended = Vec::new();
                    let answer = request(tx, &id, now_ms, &mut ended).await?;
                    Ok(crate::store::Cancellation { answer, ended })
                })
            })
        })
        .await
    }
}

/// Cancels an invocation and, with it, the children it does not abandon, in one
/// transaction: the timers due by now fire, the `cancel` entry and its completion are
/// written, and the invocation becomes pending and due, which fences a running attempt
/// (the next one replays up to the cancellation). At most once per invocation; never for
/// an ended or paused one. One that waits for its key's turn (`queued`) has not started: it
/// ends as `cancelled` at once, without its handler (into `ended`).
pub async fn request(
    tx: &mut dyn crate::store::tables::Tx,
    id: &str,
    now_ms: i64,
    ended: &mut crate::store::Closed,
) -> crate::store::StoreResult<crate::store::CancelAnswer> {
    use crate::store::{CancelAnswer, ParentClose, Status, StoreError, StoredEntry};
    // Still queued under its row's lock (it may have been released meanwhile: then it is
    // cancelled as any other).
    let queued = crate::keys::lock_key_if_queued(tx, id).await?
        && tx
            .lock_invocation(id)
            .await?
            .is_some_and(|r| r.status == Status::Queued);
    if queued {
        let ending = super::terminate::Ending {
            status: Status::Cancelled,
            failure: Failure {
                status: 409,
                error_type: Some(CANCELLED.into()),
                message: "cancelled while it waited for its key's turn; its handler never ran"
                    .into(),
            },
            children: format!("its parent {id} was cancelled"),
        };
        let record = super::terminate::end_now(tx, id, &ending, now_ms, ended).await?;
        return Ok(if record.status == Status::Cancelled {
            CancelAnswer::Dequeued(record)
        } else {
            CancelAnswer::Ended(record)
        });
    }
    let record = tx
        .lock_invocation(id)
        .await?
        .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
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
    crate::journal::sleep::fire_timers(tx, id, now_ms, now_ms).await?;
    let index = record.journal_len;
    let entry = StoredEntry {
        index,
        kind: durin_protocol::EntryKind::Cancel,
        name: None,
        value: None,
        content_type: None,
        failure: None,
        attempt: record.attempt,
        at_ms: now_ms,
        completion: None,
    };
    tx.insert_entry(id, &entry).await?;
    crate::journal::completion::complete(tx, id, index, None, None, now_ms).await?;
    let record = tx.mark_cancelled(id, now_ms).await?;
    for (child, policy) in tx.open_children(id).await? {
        if policy != ParentClose::Abandon {
            Box::pin(request(tx, &child, now_ms, ended)).await?;
        }
    }
    Ok(CancelAnswer::Requested(record))
}
