//! Claim: the scheduler starts the next attempt of due invocations, in one transaction:
//! their timers due by now fire first, then each gets its attempt (which fences every
//! earlier one) and a fresh token. Nothing that is not due is claimed, and no first
//! attempt its key's rate does not let start yet. Heartbeats of a
//! running attempt are recorded here too.

use crate::ids::InvocationId;
use crate::store::tables::{refusal, Tx};
use crate::store::{InvocationRecord, Store, StoreResult};

impl dyn Store {
    /// Claims up to `limit` due invocations (see [`claim_due`]).
    pub async fn claim_due(&self, now_ms: i64, limit: u32) -> StoreResult<Vec<InvocationRecord>> {
        self.write_repeatable("claim", move |tx| {
            Box::pin(async move { claim_due(tx, now_ms, limit).await })
        })
        .await
    }

    /// Records a heartbeat of the running `attempt` (fenced by it and its token), with its
    /// details (JSON), which the next attempt receives.
    pub async fn heartbeat(
        &self,
        id: &InvocationId,
        attempt: u32,
        token: String,
        details: Option<Vec<u8>>,
        now_ms: i64,
    ) -> StoreResult<()> {
        let id = id.to_string();
        self.write(&id.clone(), move |tx| {
            Box::pin(async move {
                let beat = tx
                    .record_heartbeat(&id, attempt, &token, details.as_deref(), now_ms)
                    .await?;
                if beat {
                    return Ok(());
                }
                crate::journal::append::check_attempt(tx, &id, attempt, &token).await?;
                Err(refusal(tx, &id, attempt).await)
            })
        })
        .await
    }
}

/// Claims up to `limit` due invocations, oldest due first, and starts their next attempt.
pub async fn claim_due(
    tx: &mut dyn Tx,
    now_ms: i64,
    limit: u32,
) -> StoreResult<Vec<InvocationRecord>> {
    let ids = tx.claimable(now_ms, limit).await?;
    let mut claimed = Vec::with_capacity(ids.len());
    for (id, rated) in ids {
        if rated && !crate::keys::rate_lets_start(tx, &id, now_ms).await? {
            continue;
        }
        crate::journal::sleep::fire_timers(tx, &id, now_ms, now_ms).await?;
        if let Some(record) = tx.start_attempt(&id, &attempt_token(), now_ms).await? {
            claimed.push(record);
        }
    }
    Ok(claimed)
}

/// A fresh attempt token, the secret an attempt's appends present: 122 random bits.
pub fn attempt_token() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}
