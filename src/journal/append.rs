//! An append: an entry of the running attempt, fenced by its number and token, at the
//! next free index, within the journal's limits, with what its kind does besides being
//! journaled (its effect), all in one transaction.

use durin_protocol::EntryKind;

use crate::ids::InvocationId;
use crate::store::tables::{refusal, Tx};
use crate::store::{
    Effect, JournalLimits, NewEntry, Status, Store, StoreError, StoreResult, StoredCompletion,
    StoredEntry, UpdateStatus,
};

impl dyn Store {
    /// Appends `entry` for `attempt` (see [`append`]); a child workflow whose id is taken
    /// is recorded as refused.
    pub async fn append_entry(
        &self,
        id: &InvocationId,
        attempt: u32,
        entry: NewEntry,
        now_ms: i64,
    ) -> StoreResult<StoredEntry> {
        let limits = self.journal_limits();
        let route = id.to_string();
        let once = |id: InvocationId, entry: NewEntry| {
            self.write_repeatable(&route, move |tx| {
                let (id, mut entry) = (id.clone(), entry.clone());
                Box::pin(async move {
                    super::child::refuse_if_taken(tx, id.as_str(), &mut entry).await?;
                    append(tx, id.as_str(), attempt, entry, now_ms, limits).await
                })
            })
        };
        // Only a call of a keyed handler takes a key's lock, which may be contended.
        let keyed =
            matches!(&entry.effect, crate::store::Effect::StartChild(child) if child.key.is_some());
        if !keyed {
            return once(id.clone(), entry).await;
        }
        self.contended(|| once(id.clone(), entry.clone())).await
    }
}

/// Appends `entry` for `attempt` at the next free index (which must be `entry.index` when
/// that is given).
pub async fn append(
    tx: &mut dyn Tx,
    id: &str,
    attempt: u32,
    entry: NewEntry,
    now_ms: i64,
    limits: JournalLimits,
) -> StoreResult<StoredEntry> {
    let bytes = entry.value.as_ref().map_or(0, Vec::len) as i64
        + entry.name.as_ref().map_or(0, String::len) as i64;
    let NewEntry {
        index,
        kind,
        name,
        value,
        content_type,
        failure,
        token,
        effect,
    } = entry;
    let mut stored = StoredEntry {
        index: index.unwrap_or_default(),
        kind,
        name,
        value,
        content_type,
        failure,
        attempt,
        at_ms: now_ms,
        completion: None,
    };
    let grown = tx
        .grow_journal_with(
            id,
            attempt,
            index,
            token.as_deref(),
            bytes,
            limits.max_entries,
            limits.max_bytes,
            &stored,
        )
        .await?;
    let Some(grown_to) = grown else {
        let entry = NewEntry {
            index,
            kind: stored.kind,
            name: stored.name,
            value: stored.value,
            content_type: stored.content_type,
            failure: stored.failure,
            token,
            effect,
        };
        return answer_refused(tx, id, attempt, &entry, bytes, limits).await;
    };
    stored.index = grown_to;
    stored.completion = apply_effect(tx, id, &stored, effect, now_ms).await?;
    metrics::counter!(crate::telemetry::APPENDS).increment(1);
    Ok(stored)
}

/// Why an append was refused, or the recorded entry when it is the same append sent again
/// (its answer was lost).
async fn answer_refused(
    tx: &mut dyn Tx,
    id: &str,
    attempt: u32,
    entry: &NewEntry,
    bytes: i64,
    limits: JournalLimits,
) -> StoreResult<StoredEntry> {
    let refused = refusal(tx, id, attempt).await;
    let StoreError::Fenced {
        current_attempt,
        status: Status::Running,
        ..
    } = refused
    else {
        return Err(refused);
    };
    if current_attempt != attempt {
        return Err(refused);
    }
    let current = tx.invocation(id).await?;
    let token = current.as_ref().and_then(|r| r.attempt_token.clone());
    if entry.token.is_some() && entry.token != token {
        return Err(StoreError::WrongToken {
            invocation_id: id.to_owned(),
            attempt,
        });
    }
    if let Some(recorded) = same_append(tx, id, attempt, entry).await? {
        return Ok(recorded);
    }
    let full = current.as_ref().and_then(|r| {
        let index_ok = entry.index.is_none_or(|i| i == r.journal_len);
        let limit = if r.journal_len >= limits.max_entries {
            Some(format!("{} entries at most", limits.max_entries))
        } else if r.journal_bytes + bytes > limits.max_bytes {
            Some(format!("{} bytes at most", limits.max_bytes))
        } else {
            None
        };
        limit.filter(|_| index_ok)
    });
    Err(match full {
        Some(limit) => StoreError::JournalFull {
            invocation_id: id.to_owned(),
            limit,
        },
        None => StoreError::IndexMismatch {
            invocation_id: id.to_owned(),
            requested: entry.index.unwrap_or_default(),
            expected: current.map(|r| r.journal_len).unwrap_or_default(),
        },
    })
}

/// The entry an attempt recorded at the index `entry` names, if `entry` is that same append
/// sent again: same attempt, kind, name and failure, and the same value where the handler
/// chose it (the gateway computes a sleep's wake time, so a retry cannot repeat it).
async fn same_append(
    tx: &mut dyn Tx,
    id: &str,
    attempt: u32,
    entry: &NewEntry,
) -> StoreResult<Option<StoredEntry>> {
    let Some(index) = entry.index else {
        return Ok(None);
    };
    let Some(recorded) = tx.entry(id, index).await? else {
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
/// The invocation stays locked: what the caller writes next is written by that attempt.
pub async fn check_attempt(
    tx: &mut dyn Tx,
    id: &str,
    attempt: u32,
    token: &str,
) -> StoreResult<()> {
    let current = tx
        .lock_invocation(id)
        .await?
        .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
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

/// An accepted update is done: its result (or failure) goes to its caller.
async fn finish_update(
    tx: &mut dyn Tx,
    id: &str,
    update: &str,
    result: Option<Vec<u8>>,
    failure: Option<durin_protocol::Failure>,
) -> StoreResult<Option<StoredCompletion>> {
    tx.set_update_status(
        id,
        update,
        UpdateStatus::Accepted,
        UpdateStatus::Done,
        result.as_deref(),
        failure.as_ref(),
    )
    .await?;
    Ok(None)
}

/// Carries out what an appended entry does besides being journaled; returns the entry's
/// completion when it is complete at once.
async fn apply_effect(
    tx: &mut dyn Tx,
    id: &str,
    entry: &StoredEntry,
    effect: Effect,
    now_ms: i64,
) -> StoreResult<Option<StoredCompletion>> {
    use super::completion::complete;
    match effect {
        Effect::None => Ok(None),
        Effect::Timer { wake_at_ms } if wake_at_ms <= now_ms => {
            complete(tx, id, entry.index, None, None, now_ms)
                .await
                .map(Some)
        }
        Effect::Timer { wake_at_ms } => {
            tx.insert_timer(id, entry.index, wake_at_ms).await?;
            Ok(None)
        }
        Effect::SignalWait {
            take_buffered: false,
        } => Ok(None),
        Effect::SignalWait {
            take_buffered: true,
        } => {
            let name = entry.name.clone().unwrap_or_default();
            super::signal::bind_buffered(tx, id, entry.index, &name, now_ms).await
        }
        Effect::State { key, value } => {
            tx.put_state(id, &key, value.as_deref()).await?;
            Ok(None)
        }
        Effect::StartChild(child) => {
            super::child::insert(tx, &child, id, entry, now_ms).await?;
            Ok(None)
        }
        Effect::ChildRefused { failure } if entry.kind == EntryKind::Call => {
            complete(tx, id, entry.index, None, Some(failure), now_ms)
                .await
                .map(Some)
        }
        Effect::ChildRefused { .. } => Ok(None),
        // An update that is no longer pending (or accepted) is left as it is: the entry
        // is the SDK's record either way.
        Effect::UpdateAccepted { id: update } => {
            tx.set_update_status(
                id,
                &update,
                UpdateStatus::Pending,
                UpdateStatus::Accepted,
                None,
                None,
            )
            .await?;
            Ok(None)
        }
        Effect::UpdateAnswered {
            id: update,
            result,
            failure,
        } => {
            tx.set_update_status(
                id,
                &update,
                UpdateStatus::Pending,
                UpdateStatus::Accepted,
                None,
                None,
            )
            .await?;
            finish_update(tx, id, &update, result, failure).await
        }
        Effect::UpdateDone {
            id: update,
            result,
            failure,
        } => finish_update(tx, id, &update, result, failure).await,
    }
}
