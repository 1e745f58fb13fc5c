//! `signal`: a wait for a named signal, and the signals sent to an invocation. A signal
//! is stored in order and handed to at most one wait: the oldest open wait of its name
//! that a suspended attempt waits for (alone, or in a race that is still open), or later
//! the wait that takes it from the buffer. Its idempotency key is unique per workflow id,
//! across its runs, so that a retry after a continue-as-new delivers nothing new.

use crate::ids::InvocationId;
use crate::store::tables::{KeyScope, Tx};
use crate::store::{
    InvocationRecord, NewSignal, SignalSent, Status, Store, StoreError, StoreResult,
    StoredCompletion,
};

use super::completion::{complete, wake_if_waiting};
use super::sleep::fire_timers;

/// The most signals a run holds unconsumed.
pub const MAX_BUFFERED: u32 = 10_000;

impl dyn Store {
    /// Sends a signal to invocation `id` (see [`send`]).
    pub async fn send_signal(
        &self,
        id: &InvocationId,
        signal: NewSignal,
        now_ms: i64,
    ) -> StoreResult<SignalSent> {
        let id = id.to_string();
        let max_bytes = self.journal_limits().max_bytes;
        self.write(&id.clone(), move |tx| {
            Box::pin(async move { send(tx, &id, signal, max_bytes, now_ms).await })
        })
        .await
    }
}

/// Sends `signal` to invocation `id`: stored once per key, and bound to a suspended wait
/// of its name if one can take it. A run that continued as new hands it to the run its
/// workflow id names now; a run that ended otherwise refuses it.
pub async fn send(
    tx: &mut dyn Tx,
    id: &str,
    signal: NewSignal,
    max_bytes: i64,
    now_ms: i64,
) -> StoreResult<SignalSent> {
    let record = super::update::receiving_run(tx, id).await?;
    if let Some(key) = &signal.idempotency_key {
        if let Some((_, seq)) = tx.signal_by_key(KeyScope::of(&record), key).await? {
            return Ok(SignalSent {
                seq,
                duplicate: true,
                woke: false,
            });
        }
    }
    if record.status.is_final() {
        return Err(StoreError::Ended {
            invocation_id: record.id.to_string(),
            status: record.status,
        });
    }
    insert(tx, &record, signal, max_bytes, now_ms).await
}

/// Stores a signal for `record` (which has not ended, and whose key was not seen) and
/// hands it to the oldest open wait of its name that a suspended attempt waits for.
pub async fn insert(
    tx: &mut dyn Tx,
    record: &InvocationRecord,
    signal: NewSignal,
    max_bytes: i64,
    now_ms: i64,
) -> StoreResult<SignalSent> {
    let id = record.id.as_str();
    let bytes = (signal.value.len() + signal.name.len()) as i64;
    let (buffered, _) = tx.buffered(id).await?;
    if buffered >= MAX_BUFFERED || record.journal_bytes + bytes > max_bytes {
        return Err(StoreError::JournalFull {
            invocation_id: id.to_owned(),
            limit: if buffered >= MAX_BUFFERED {
                format!("{MAX_BUFFERED} signals waiting to be taken at most")
            } else {
                format!("{max_bytes} bytes at most, signals included")
            },
        });
    }
    let seq = tx.next_signal_seq(id).await?;
    // The oldest wait for this name that a suspended attempt waits for; otherwise the
    // signal is buffered until a wait takes it.
    let waiting_for: Vec<u32> = if record.status == Status::Suspended {
        record.waiting_for.clone()
    } else {
        Vec::new()
    };
    let open_waits = if waiting_for.is_empty() {
        Vec::new()
    } else {
        tx.open_signal_waits(id, &signal.name).await?
    };
    // Only the first event of a wait is delivered: when a command it waits for has
    // completed, or a waited timer was due before this signal came, the signal stays
    // buffered for a later wait.
    let race = race_state(tx, id, &waiting_for, now_ms).await?;
    let open_wait = open_waits
        .into_iter()
        .find(|i| waiting_for.contains(i))
        .filter(|_| !race.decided && race.first_due_timer.is_none());
    // A signal that came while an attempt ran and that no wait took: that attempt may
    // not complete without seeing it (see `lifecycle::end`).
    let during_attempt = (record.status == Status::Running).then_some(record.attempt);
    tx.insert_signal(
        id,
        seq,
        &signal.name,
        &signal.value,
        signal.idempotency_key.as_deref(),
        open_wait,
        during_attempt,
        now_ms,
    )
    .await?;
    tx.add_bytes(id, bytes).await?;
    if let Some(attempt) = during_attempt {
        tx.note_arrival(id, attempt).await?;
    }
    let mut woke = false;
    if let Some(index) = open_wait {
        complete(tx, id, index, Some(signal.value), None, now_ms).await?;
        woke = wake_if_waiting(tx, id, index, now_ms).await?;
    }
    Ok(SignalSent {
        seq,
        duplicate: false,
        woke,
    })
}

/// Hands the oldest buffered signal named `name` to the wait at `index`, if there is one.
/// Timers that were due when the signal arrived fire first, so that completions are
/// numbered in the order their events happened.
pub async fn bind_buffered(
    tx: &mut dyn Tx,
    id: &str,
    index: u32,
    name: &str,
    now_ms: i64,
) -> StoreResult<Option<StoredCompletion>> {
    let Some(buffered) = tx.oldest_buffered(id, name).await? else {
        return Ok(None);
    };
    fire_timers(tx, id, buffered.at_ms, now_ms).await?;
    tx.consume_signal(id, buffered.seq, index).await?;
    complete(tx, id, index, buffered.value, None, now_ms)
        .await
        .map(Some)
}

/// Where a wait for the first of `waiting_for` stands.
pub struct RaceState {
    /// One of the commands has completed: the wait is decided.
    pub decided: bool,
    /// The earliest wake time of a waited timer that is due and has not fired.
    pub first_due_timer: Option<i64>,
}

pub async fn race_state(
    tx: &mut dyn Tx,
    id: &str,
    waiting_for: &[u32],
    now_ms: i64,
) -> StoreResult<RaceState> {
    let mut state = RaceState {
        decided: false,
        first_due_timer: None,
    };
    for index in waiting_for {
        match tx.command(id, *index).await? {
            Some(row) if row.completed.is_some() => state.decided = true,
            Some(row) => {
                if let Some(wake_at) = row.wake_at_ms.filter(|at| *at <= now_ms) {
                    state.first_due_timer =
                        Some(state.first_due_timer.map_or(wake_at, |t| t.min(wake_at)));
                }
            }
            None => {}
        }
    }
    Ok(state)
}

/// Hands the buffered signal that arrived first among those the open waits of
/// `waiting_for` take to its wait, unless one of the commands has completed or a waited
/// timer fell due before the signal arrived (the timer came first; it fires when the
/// scheduler gets to it). Answers the wait's index and its completion.
pub async fn take_first_buffered(
    tx: &mut dyn Tx,
    id: &str,
    waiting_for: &[u32],
    now_ms: i64,
) -> StoreResult<Option<(u32, StoredCompletion)>> {
    let race = race_state(tx, id, waiting_for, now_ms).await?;
    if race.decided {
        return Ok(None);
    }
    let Some((index, name, arrived_at_ms)) = first_buffered(tx, id, waiting_for).await? else {
        return Ok(None);
    };
    if race.first_due_timer.is_some_and(|due| due <= arrived_at_ms) {
        return Ok(None);
    }
    let completion = bind_buffered(tx, id, index, &name, now_ms).await?;
    Ok(completion.map(|completion| (index, completion)))
}

/// The buffered signal that arrived first among those the open waits of `waiting_for` can
/// take, with the wait that takes it (the lowest index of its name): `(index, name,
/// arrived at)`.
pub async fn first_buffered(
    tx: &mut dyn Tx,
    id: &str,
    waiting_for: &[u32],
) -> StoreResult<Option<(u32, String, i64)>> {
    let mut sorted = waiting_for.to_vec();
    sorted.sort_unstable();
    let mut best: Option<(u32, u32, String, i64)> = None;
    for index in sorted {
        let Some(name) = tx.open_signal_wait(id, index).await? else {
            continue;
        };
        if let Some(buffered) = tx.oldest_buffered(id, &name).await? {
            if best
                .as_ref()
                .is_none_or(|(best_seq, ..)| buffered.seq < *best_seq)
            {
                best = Some((buffered.seq, index, name, buffered.at_ms));
            }
        }
    }
    Ok(best.map(|(_, index, name, at_ms)| (index, name, at_ms)))
}
