//! A plain handler's command through the context API: found by name (and key and
//! occurrence) instead of a cursor, recorded when new, and, for a wait with no result
//! yet, the attempt's suspension in the same transaction. A wait may name several
//! commands (a signal and its timeout, or the members of a race): it answers the one that
//! completed first.

use super::completion::suspension_due;
use super::signal;
use crate::store::tables::Tx;
use crate::store::{
    Effect, JournalLimits, PlainAnswer, PlainCommand, Store, StoreError, StoreResult, StoredEntry,
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
        let once = |command: PlainCommand| {
            self.write(&key, move |tx| {
                Box::pin(async move { self::command(tx, command, limits, now_ms).await })
            })
        };
        // Only a call of a keyed handler takes a key's lock, which may be contended.
        let keyed = command.commands.iter().any(|c| {
            matches!(
                c.new.as_ref().map(|n| &n.effect),
                Some(crate::store::Effect::StartChild(child)) if child.key.is_some()
            )
        });
        if !keyed {
            return once(command).await;
        }
        self.contended(|| once(command.clone())).await
    }
}

/// Finds the commands, records those that are new (a child workflow whose id is taken is
/// recorded as refused, as for the SDK), and, for a wait, answers the one that completed
/// first or suspends the attempt on all of them. A signal buffered before the wait began
/// came first, unless a waited timer fell due before it arrived: the one that arrived
/// first is taken at once, and only one (the others stay buffered).
pub async fn command(
    tx: &mut dyn Tx,
    command: PlainCommand,
    limits: JournalLimits,
    now_ms: i64,
) -> StoreResult<PlainAnswer> {
    let id = command.id.as_str();
    check_attempt(tx, id, command.attempt, &command.token).await?;
    // Timers are recorded last: a signal buffered before the wait began came before a
    // timer that the wait starts, even one that is due at once.
    let mut found = Vec::with_capacity(command.commands.len());
    let mut timers = Vec::new();
    for (position, named) in command.commands.into_iter().enumerate() {
        let entry = tx
            .find_entry(
                id,
                named.kind,
                &named.name,
                named.key.as_deref(),
                named.occurrence,
            )
            .await?;
        found.push(match (entry, named.new) {
            (Some(entry), _) => Some((entry, true)),
            (None, Some(new)) if matches!(new.effect, Effect::Timer { .. }) => {
                timers.push((position, new));
                None
            }
            (None, Some(mut new)) => {
                refuse_if_taken(tx, id, &mut new).await?;
                // Buffered signals are taken below, once the wait's other commands are
                // recorded, so that the one that arrived first wins.
                if let Effect::SignalWait { take_buffered } = &mut new.effect {
                    *take_buffered = false;
                }
                let entry = append(tx, id, command.attempt, new, now_ms, limits).await?;
                Some((entry, false))
            }
            (None, None) => {
                return Err(StoreError::NotFound(format!(
                    "{} {:?} of invocation {id}",
                    named.kind.as_str(),
                    named.name
                )))
            }
        });
    }
    // After a cancellation a wait gets only what completed before it, and a new wait
    // takes no buffered signal (it stays buffered, and listed if the run ends without it).
    let cancel_seq = tx.cancel_seq(id).await?;
    let mut recorded: Vec<(StoredEntry, bool)> = found.iter().flatten().cloned().collect();
    let undecided = recorded.iter().all(|(e, _)| e.completion.is_none());
    if command.suspend && undecided && cancel_seq.is_none() {
        let waiting_for: Vec<u32> = recorded.iter().map(|(e, _)| e.index).collect();
        if let Some((index, completion)) =
            signal::take_first_buffered(tx, id, &waiting_for, now_ms).await?
        {
            if let Some((entry, _)) = recorded.iter_mut().find(|(e, _)| e.index == index) {
                entry.completion = Some(completion);
            }
        }
    }
    let mut recorded = recorded.into_iter();
    for slot in found.iter_mut().filter(|slot| slot.is_some()) {
        *slot = recorded.next();
    }
    for (position, new) in timers {
        found[position] = Some((
            append(tx, id, command.attempt, new, now_ms, limits).await?,
            false,
        ));
    }
    let entries: Vec<(StoredEntry, bool)> = found.into_iter().flatten().collect();
    let waiting_for: Vec<u32> = entries.iter().map(|(e, _)| e.index).collect();
    let before_cancel = |e: &StoredEntry| {
        e.completion
            .as_ref()
            .is_some_and(|c| cancel_seq.is_none_or(|seq| c.seq < seq))
    };
    let cancelled =
        command.suspend && cancel_seq.is_some() && !entries.iter().any(|(e, _)| before_cancel(e));
    let suspended =
        command.suspend && !cancelled && entries.iter().all(|(e, _)| e.completion.is_none());
    if suspended {
        let (due, _) = suspension_due(tx, id, None, &waiting_for, now_ms).await?;
        tx.set_suspended(id, due, &waiting_for, now_ms).await?;
    }
    Ok(PlainAnswer {
        entries,
        suspended,
        cancelled,
    })
}
