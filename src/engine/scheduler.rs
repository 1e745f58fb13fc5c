//! The scheduler loop: claims due invocations in batches and runs their attempts.
//!
//! It holds no per-invocation state: between claims it sleeps until the earliest due time
//! in the store (at most [`IDLE_POLL`], so that a clock moved by hand or a write from
//! elsewhere is seen), or until nudged. Memory grows with the work that is due, not with
//! the number of waiting invocations.

use std::sync::Arc;
use std::time::Duration;

use super::Engine;

/// The most invocations one claim takes.
const BATCH: usize = 256;
/// The longest the loop sleeps without looking at the store.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// The pause after the store failed.
const STORE_RETRY: Duration = Duration::from_secs(1);

pub(super) async fn run(engine: Arc<Engine>) {
    loop {
        if engine.shutdown.is_cancelled() {
            return;
        }
        // Slots before the claim, and a claim of no more rows than slots: a claimed
        // invocation starts at once.
        let slots = tokio::select! {
            slots = engine.admission.scheduler_slots(BATCH) => match slots {
                Some(slots) => slots,
                None => return,
            },
            _ = engine.shutdown.cancelled() => return,
        };
        let limit = slots.len();
        let claimed = match engine
            .store
            .claim_due(engine.clock.now_ms(), limit as u32)
            .await
        {
            Ok(claimed) => claimed,
            Err(error) => {
                tracing::error!(%error, "could not claim due invocations");
                drop(slots);
                pause(&engine, STORE_RETRY).await;
                continue;
            }
        };
        let full = claimed.len() == limit;
        // The slots left over (fewer rows were due) go back here.
        for (record, slot) in claimed.into_iter().zip(slots) {
            let hold = engine.store.hold_lease(&record.id, record.attempt);
            let runner = Arc::clone(&engine);
            engine.tracker.spawn(async move {
                runner.run_attempt(record, None).await;
                drop((slot, hold));
            });
        }
        if full {
            continue;
        }
        let wait = match engine.store.next_due().await {
            Ok(Some(due)) => {
                let ms = due.saturating_sub(engine.clock.now_ms()).max(0) as u64;
                Duration::from_millis(ms).min(IDLE_POLL)
            }
            Ok(None) => IDLE_POLL,
            Err(error) => {
                tracing::error!(%error, "could not read the next due time");
                STORE_RETRY
            }
        };
        if !wait.is_zero() {
            pause(&engine, wait).await;
        }
    }
}

/// Sleeps `wait`, or less when nudged or stopped.
async fn pause(engine: &Engine, wait: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(wait) => {}
        _ = engine.nudge.notified() => {}
        _ = engine.shutdown.cancelled() => {}
    }
}
