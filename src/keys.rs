//! Keys: a keyed handler's invocations of one key run at most its `limit` at a time
//! (Restate's virtual objects at `limit = 1`; Inngest's concurrency keys beyond). One that
//! finds its key's places taken waits its turn, `queued` (no due time: the scheduler never
//! claims it), and is made due, oldest first, in the transaction that ends a holder of its
//! key. Everything here runs inside the rules that create and end invocations, so a crash
//! loses no place and no turn.
//!
//! Locks (PostgreSQL): a key's lock is only ever tried, never waited for
//! (`StoreError::Contended` when another transaction holds it; the write runs again), so
//! no rule waits on a key, whatever row locks it holds; a deadlock among row locks that
//! PostgreSQL breaks is contended too.

use crate::store::tables::Tx;
use crate::store::{Closed, InvocationKey, InvocationRecord, Status, StoreResult};

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
/// It ends `cancelled`, of type `Debounced`, naming `by`, into `ended`.
pub async fn supersede(
    tx: &mut dyn Tx,
    target: (&str, &str),
    key: &InvocationKey,
    by: &str,
    now_ms: i64,
    ended: &mut Closed,
) -> StoreResult<()> {
    let (service, handler) = target;
    tx.lock_key(service, &key.key).await?;
    let Some(older) = tx.newest_unstarted(service, handler, &key.key).await? else {
        return Ok(());
    };
    // Under its row's lock: it may have started meanwhile (claimed), then it runs.
    let unstarted = tx
        .lock_invocation(&older)
        .await?
        .is_some_and(|r| r.attempt == 0 && matches!(r.status, Status::Queued | Status::Pending));
    if !unstarted {
        return Ok(());
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
    Ok(())
}
