//! An operator's moves: pause (fencing a running attempt), resume (optionally on another
//! deployment), retry a backoff now, and the purges of what retention lets go.

use crate::ids::InvocationId;
use crate::store::tables::Tx;
use crate::store::{InvocationRecord, Store, StoreError, StoreResult};

impl dyn Store {
    /// Pauses an invocation that has not ended (fencing a running attempt): it runs no
    /// attempt until resumed. `false` when it was not in a state that pauses.
    pub async fn pause(
        &self,
        id: &InvocationId,
        reason: String,
        now_ms: i64,
    ) -> StoreResult<(InvocationRecord, bool)> {
        let id = id.to_string();
        self.write(&id.clone(), move |tx| {
            Box::pin(async move {
                let changed = tx.mark_paused(&id, &reason, now_ms).await?;
                changed_or_current(tx, &id, changed).await
            })
        })
        .await
    }

    /// A paused invocation becomes pending again, optionally on another deployment.
    pub async fn resume(
        &self,
        id: &InvocationId,
        deployment_id: Option<String>,
        now_ms: i64,
    ) -> StoreResult<Option<InvocationRecord>> {
        let id = id.to_string();
        self.write(&id.clone(), move |tx| {
            Box::pin(async move { tx.mark_resumed(&id, deployment_id.as_deref(), now_ms).await })
        })
        .await
    }

    /// Makes an invocation that backs off due now. `false` when it was not backing off.
    pub async fn retry_now(
        &self,
        id: &InvocationId,
        now_ms: i64,
    ) -> StoreResult<(InvocationRecord, bool)> {
        let id = id.to_string();
        self.write(&id.clone(), move |tx| {
            Box::pin(async move {
                let changed = tx.retry_backoff_now(&id, now_ms).await?;
                changed_or_current(tx, &id, changed).await
            })
        })
        .await
    }

    /// Deletes an ended invocation with everything kept for it; `false` when it has not
    /// ended.
    pub async fn purge(&self, id: &InvocationId) -> StoreResult<bool> {
        let id = id.to_string();
        self.write(&id.clone(), move |tx| {
            Box::pin(async move {
                let ended = tx
                    .lock_invocation(&id)
                    .await?
                    .ok_or_else(|| StoreError::NotFound(id.clone()))?
                    .completed_at_ms
                    .is_some();
                if ended {
                    tx.delete_invocation(&id).await?;
                }
                Ok(ended)
            })
        })
        .await
    }

    /// Deletes up to `limit` invocations that ended before `ended_before_ms`, with
    /// everything kept for them; how many.
    pub async fn purge_ended(&self, ended_before_ms: i64, limit: u32) -> StoreResult<u64> {
        self.write("purge", move |tx| {
            Box::pin(async move {
                let ended = tx.ended_before(ended_before_ms, limit).await?;
                for id in &ended {
                    tx.delete_invocation(id).await?;
                }
                Ok(ended.len() as u64)
            })
        })
        .await
    }

    /// Deletes the idempotency keys that expired by `now_ms` (how many), and the starts of
    /// rate-limited keys older than any rate's period, which limit no start any more.
    pub async fn purge_idempotency_keys(&self, now_ms: i64) -> StoreResult<u64> {
        self.write("purge", move |tx| {
            Box::pin(async move {
                let longest =
                    i64::try_from(durin_protocol::MAX_RATE_PERIOD.as_millis()).unwrap_or(i64::MAX);
                tx.forget_starts_before(now_ms.saturating_sub(longest))
                    .await?;
                tx.delete_expired_keys(now_ms).await
            })
        })
        .await
    }
}

/// The changed record and `true`, or the record as it is and `false`.
async fn changed_or_current(
    tx: &mut dyn Tx,
    id: &str,
    changed: Option<InvocationRecord>,
) -> StoreResult<(InvocationRecord, bool)> {
    match changed {
        Some(record) => Ok((record, true)),
        None => tx
            .invocation(id)
            .await?
            .map(|record| (record, false))
            .ok_or_else(|| StoreError::NotFound(id.to_owned())),
    }
}
