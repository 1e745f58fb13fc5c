//! A plain handler's command through the context API: found by name (and key and
//! occurrence) instead of a cursor, recorded when new, and, for a wait with no result
//! yet, the attempt's suspension in the same transaction.

use super::completion::suspension_due;
use crate::store::tables::Tx;
use crate::store::{
    JournalLimits, PlainAnswer, PlainCommand, Store, StoreError, StoreResult, StoredEntry,
};

use super::append::{append, check_attempt};
use super::child::refuse_if_taken;

impl dyn Store {
    /// See [`command`].
    pub async fn plain_command(
        &self,
        command: PlainCommand,
        now_ms: i64,
    ) -> StoreResult<PlainAnswer> {
        let limits = self.journal_limits();
        let key = command.id.to_string();
        self.write(&key, move |tx| {
            Box::pin(async move { self::command(tx, command, limits, now_ms).await })
        })
        .await
    }
}

/// Finds the command, records it when it is new (a child workflow whose id is taken is
/// recorded as refused, as for the SDK), and suspends the attempt when it waits for
/// something that has not completed.
pub async fn command(
    tx: &mut dyn Tx,
    command: PlainCommand,
    limits: JournalLimits,
    now_ms: i64,
) -> StoreResult<PlainAnswer> {
    let id = command.id.as_str();
    check_attempt(tx, id, command.attempt, &command.token).await?;
    let found = tx
        .find_entry(
            id,
            command.kind,
            &command.name,
            command.key.as_deref(),
            command.occurrence,
        )
        .await?;
    let (entry, recorded) = match (found, command.new) {
        (Some(entry), _) => (entry, true),
        (None, Some(mut new)) => {
            refuse_if_taken(tx, id, &mut new).await?;
            // A new wait of a cancelled invocation gets the cancellation, not a buffered
            // signal: the signal stays buffered (and listed if the run ends without it).
            if let crate::store::Effect::SignalWait { take_buffered } = &mut new.effect {
                if tx.cancel_seq(id).await?.is_some() {
                    *take_buffered = false;
                }
            }
            (
                append(tx, id, command.attempt, new, now_ms, limits).await?,
                false,
            )
        }
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
            let found = tx.find_entry(id, new.kind, &name, None, 0).await?;
            Some(match found {
                Some(entry) => entry,
                None => append(tx, id, command.attempt, new, now_ms, limits).await?,
            })
        }
        None => None,
    };
    // After a cancellation a wait gets only what completed before it.
    let cancel_seq = tx.cancel_seq(id).await?;
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
        let (due, _) = suspension_due(tx, id, None, &waiting_for, now_ms).await?;
        tx.set_suspended(id, due, &waiting_for, now_ms).await?;
    }
    Ok(PlainAnswer {
        entry,
        also,
        recorded,
        suspended,
        cancelled,
    })
}
