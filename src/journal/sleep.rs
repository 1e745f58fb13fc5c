//! `sleep`: a durable timer. The handler asks for a duration or an instant; the gateway
//! records the instant on its own clock, so a replay (or a handler whose clock is off)
//! sees the same wake time, and the store arms a timer that the scheduler fires.

use serde::Deserialize;
use serde_json::{json, Value};

use super::Planned;
use crate::store::Effect;

/// The longest sleep: a year and a day.
const MAX_SLEEP_MS: i64 = 366 * 24 * 60 * 60 * 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SleepRequest {
    duration_ms: Option<i64>,
    wake_at_ms: Option<i64>,
}

pub(super) fn plan(value: Option<Value>, now_ms: i64) -> Result<Planned, String> {
    let request: SleepRequest =
        serde_json::from_value(value.unwrap_or(Value::Null)).map_err(|e| {
            format!("a sleep entry's value is {{\"duration_ms\": N}} or {{\"wake_at_ms\": T}}: {e}")
        })?;
    let wake_at_ms = match (request.duration_ms, request.wake_at_ms) {
        (Some(duration), None) if (0..=MAX_SLEEP_MS).contains(&duration) => now_ms + duration,
        (None, Some(at)) if at <= now_ms.saturating_add(MAX_SLEEP_MS) => at,
        (Some(_), None) | (None, Some(_)) => {
            return Err(format!(
                "a sleep lasts from 0 to {MAX_SLEEP_MS} ms (a year and a day)"
            ))
        }
        _ => return Err("a sleep entry has exactly one of duration_ms and wake_at_ms".into()),
    };
    Ok(Planned {
        value: Some(json!({ "wake_at_ms": wake_at_ms })),
        effect: Effect::Timer { wake_at_ms },
    })
}

/// Fires the invocation's timers due by `by_ms`: each gets its completion (at `now_ms`), in
/// order of their wake times.
pub async fn fire_timers(
    tx: &mut dyn crate::store::tables::Tx,
    id: &str,
    by_ms: i64,
    now_ms: i64,
) -> crate::store::StoreResult<()> {
    for index in tx.due_timers(id, by_ms).await? {
        super::completion::complete(tx, id, index, None, None, now_ms).await?;
        tx.delete_timer(id, index).await?;
    }
    Ok(())
}
