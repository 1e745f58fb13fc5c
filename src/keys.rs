//! Keys: a keyed handler's invocations of one key run at most its `limit` at a time
//! (Restate's virtual objects at `limit = 1`; Inngest's concurrency keys beyond). One that
//! finds its key's places taken waits its turn, `queued` (no due time: the scheduler never
//! claims it), and is made due, oldest first, in the transaction that ends a holder of its
//! key. Everything here runs inside the rules that create and end invocations, so a crash
//! loses no place and no turn.
//!
//! A key's rate (at most so many starts in any period) is a gate after its places, kept
//! where an attempt starts (the claim): an invocation with a place whose first start the
//! rate does not allow yet is put off, and counts against the rate only once it starts,
//! so that neither a queue nor a stop of Durin lets more start in a period.
//!
//! Locks (PostgreSQL): a key's lock is only ever tried, never waited for
//! (`StoreError::Contended` when another transaction holds it; the write runs again), so
//! no rule waits on a key, whatever row locks it holds; a deadlock among row locks that
//! PostgreSQL breaks is contended too.

use crate::store::tables::Tx;
use crate::store::{Closed, InvocationKey, InvocationRecord, Status, StoreError, StoreResult};

/// Whether a new invocation of `key` must wait its turn: its key's places are taken. The
/// key stays locked until the transaction ends, so that the invocation is counted before
/// anyone else looks.
pub async fn must_queue(tx: &mut dyn Tx, service: &str, key: &InvocationKey) -> StoreResult<bool> {
    if key.shared {
        // A shared (read-only) handler neither holds the key nor waits for it.
        return Ok(false);
    }
    tx.lock_key(service, &key.key).await?;
    Ok(tx.key_holders(service, &key.key).await? >= key.limit)
}

/// A holder of its key has just ended (`record`): the state it set becomes the key's, and
/// the places of the key that are free go to the invocations queued for it, oldest first.
/// The ids made due.
pub async fn ended(
    tx: &mut dyn Tx,
    record: &InvocationRecord,
    now_ms: i64,
) -> StoreResult<Vec<String>> {
    let Some(key) = record.key.as_ref().filter(|key| !key.shared) else {
        return Ok(Vec::new());
    };
    tx.lock_key(&record.service, &key.key).await?;
    tx.apply_key_state(record.id.as_str(), &record.service, &key.key)
        .await?;
    let holders = tx.key_holders(&record.service, &key.key).await?;
    let free = key.limit.saturating_sub(holders);
    if free == 0 {
        return Ok(Vec::new());
    }
    tx.release_queued(&record.service, &key.key, free, now_ms)
        .await
}

/// Whether the first attempt of invocation `id`, due by `now_ms` and created under its
/// key's rate, may start now: when fewer than the rate's `limit` of its key started in
/// the period before now, the start counts (it is recorded). Otherwise its start is put
/// off, in line: to when the oldest of those leaves the period, one period later for each
/// `limit` of the key's waiters ahead of it (the earliest it could start; it is looked at
/// again then), so that a long line wakes a few at a time. Starts go in the order the
/// key's invocations took their places: one that waited longer and is due goes first. A
/// key whose lock another transaction holds is looked at again a moment later.
pub async fn rate_lets_start(tx: &mut dyn Tx, id: &str, now_ms: i64) -> StoreResult<bool> {
    let (Some(record), Some(rate)) = (tx.invocation(id).await?, tx.start_rate(id).await?) else {
        return Ok(true);
    };
    let Some(key) = record.key.as_ref().filter(|key| !key.shared) else {
        return Ok(true);
    };
    let soon_ms = now_ms.saturating_add(1);
    match tx.lock_key(&record.service, &key.key).await {
        Ok(()) => {}
        Err(StoreError::Contended(_)) => {
            tx.start_at(id, soon_ms).await?;
            return Ok(false);
        }
        Err(error) => return Err(error),
    }
    // One that waited longer and is due (or yielded to another a moment ago) goes first;
    // this one is looked at again a moment later.
    let oldest = tx
        .oldest_rate_waiter(&record.service, &record.handler, &key.key, soon_ms)
        .await?;
    if oldest.is_some_and(|oldest| oldest != id) {
        tx.start_at(id, soon_ms).await?;
        return Ok(false);
    }
    let next_ms = match tx
        .nth_latest_start(&record.service, &record.handler, &key.key, rate.limit)
        .await?
    {
        Some(at_ms) => at_ms.saturating_add(rate.period_ms),
        None => now_ms,
    };
    if next_ms > now_ms {
        let ahead = tx
            .rate_waiters_ahead(&record.service, &record.handler, &key.key, id)
            .await?;
        let periods = i64::from(ahead / rate.limit.max(1));
        let due_ms = next_ms.saturating_add(periods.saturating_mul(rate.period_ms));
        tx.start_at(id, due_ms).await?;
        return Ok(false);
    }
    // Starts only grow later, so one a period old or older limits none to come.
    tx.record_start(
        &record.service,
        &record.handler,
        &key.key,
        now_ms,
        now_ms.saturating_sub(rate.period_ms),
    )
    .await?;
    Ok(true)
}

/// Takes the key's lock when invocation `id` waits for its key's turn, so that nothing
/// releases it meanwhile: whether it did (the caller checks the status again under the
/// row's lock).
pub async fn lock_key_if_queued(tx: &mut dyn Tx, id: &str) -> StoreResult<bool> {
    let Some(record) = tx.invocation(id).await? else {
        return Ok(false);
    };
    match (&record.key, record.status) {
        (Some(key), Status::Queued) => {
            tx.lock_key(&record.service, &key.key).await?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Debounce: the newest invocation of the same handler and key that a caller made and that
/// has not started yet is replaced by the one being created (the last of a burst runs).
/// It ends `cancelled`, of type `Debounced`, naming `by`, into `ended`. `Some` when it
/// replaced one: the latest the burst may put its start off, if bounded.
pub async fn supersede(
    tx: &mut dyn Tx,
    target: (&str, &str),
    key: &InvocationKey,
    by: &str,
    now_ms: i64,
    ended: &mut Closed,
) -> StoreResult<Option<Option<i64>>> {
    let (service, handler) = target;
    tx.lock_key(service, &key.key).await?;
    let Some((older, until_ms)) = tx.newest_unstarted(service, handler, &key.key).await? else {
        return Ok(None);
    };
    // Under its row's lock: it may have started meanwhile (claimed), then it runs.
    let unstarted = tx
        .lock_invocation(&older)
        .await?
        .is_some_and(|r| r.attempt == 0 && matches!(r.status, Status::Queued | Status::Pending));
    if !unstarted {
        return Ok(None);
    }
    let ending = crate::lifecycle::terminate::Ending {
        status: Status::Cancelled,
        failure: durin_protocol::Failure {
            status: 409,
            error_type: Some("Debounced".into()),
            message: format!(
                "replaced by {by}, a newer invocation of key {:?} within its debounce; its handler never ran",
                key.key
            ),
        },
        children: format!("its parent {older} was replaced"),
    };
    crate::lifecycle::terminate::end_now(tx, &older, &ending, now_ms, ended).await?;
    Ok(Some(until_ms))
}

/// When a debounced invocation created at `now_ms` is due, and the latest its burst may
/// put its start off: `replaced` is what [`supersede`] answered.
pub fn debounced(
    key: &InvocationKey,
    replaced: Option<Option<i64>>,
    now_ms: i64,
) -> (Option<i64>, Option<i64>) {
    let Some(debounce_ms) = key.debounce_ms else {
        return (None, None);
    };
    // A burst's bound is its first invocation's; one without a bound gets it now.
    let until_ms = replaced
        .flatten()
        .or_else(|| key.debounce_max_ms.map(|max| now_ms.saturating_add(max)));
    let due_ms = now_ms.saturating_add(debounce_ms);
    (
        Some(until_ms.map_or(due_ms, |until| due_ms.min(until))),
        until_ms,
    )
}
