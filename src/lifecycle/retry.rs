//! Retry: a failed attempt backs off durably, or the invocation fails when its retry
//! policy is used up (or the error type is not retryable).

use std::time::Duration;

use durin_protocol::{Failure, RetryPolicy};

use super::{after, Facts, Retryable};
use crate::store::{AttemptEnd, Charge};

/// A handler-level failure (a crash, a timeout, a 5xx, a 429, a `retry` outcome), charged
/// to the handler's policy.
pub(super) fn handler_failure(
    facts: Facts,
    policy: &RetryPolicy,
    failure: Retryable,
    now_ms: i64,
) -> AttemptEnd {
    let failures = facts.failures;
    let Retryable {
        error,
        error_type,
        delay: delay_override,
        status,
    } = failure;
    match policy.next_delay(failures + 1, error_type.as_deref()) {
        Some(delay) => AttemptEnd::BackOff {
            until_ms: after(now_ms, delay_override.unwrap_or(delay)),
            error,
            charged: Charge::Handler,
        },
        None if facts.pause_when_exhausted => AttemptEnd::Paused {
            reason: format!(
                "{}; last error: {error}; paused instead of failing (on_retries_exhausted = \"pause\"): fix the cause and resume it",
                policy.exhausted_reason(error_type.as_deref())
            ),
        },
        None => {
            let why = policy.exhausted_reason(error_type.as_deref());
            AttemptEnd::Failed {
                failure: Failure {
                    status,
                    error_type,
                    message: format!("{why}; last error: {error}"),
                },
                body: None,
            }
        }
    }
}

/// A step that failed and may try again: the SDK applied the step's own policy, so the
/// handler's is not charged.
pub(super) fn step_backoff(
    step: &str,
    error: String,
    error_type: Option<String>,
    delay_ms: u64,
    now_ms: i64,
) -> AttemptEnd {
    let kind = error_type.map(|t| format!(" ({t})")).unwrap_or_default();
    AttemptEnd::BackOff {
        until_ms: after(now_ms, Duration::from_millis(delay_ms)),
        error: format!("step {step:?} failed{kind}: {error}"),
        charged: Charge::Step,
    }
}
