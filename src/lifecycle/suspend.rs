//! Suspend: the handler waits for commands whose results have not arrived (version 2), or
//! until a time (version 1). The store records it and, in the same transaction, makes the
//! invocation due at once if one of them has completed meanwhile.

use super::{after, MAX_DELAY};
use crate::store::AttemptEnd;

/// The suspension, or why it is a protocol violation.
pub(super) fn suspend(
    waiting_for: Vec<u32>,
    wake_at_ms: Option<i64>,
    now_ms: i64,
) -> Result<AttemptEnd, String> {
    if waiting_for.is_empty() && wake_at_ms.is_none() {
        return Err(
            "protocol violation: the handler suspended without saying what it waits for".into(),
        );
    }
    Ok(AttemptEnd::Suspended {
        until_ms: wake_at_ms.map(|at| at.min(after(now_ms, MAX_DELAY))),
        waiting_for,
    })
}
