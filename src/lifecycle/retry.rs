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
            until_ms: after(
                now_ms,
                delay_override.unwrap_or_else(|| jittered(delay, facts.jitter)),
            ),
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

/// The share of a backoff left out to spread retries: up to a fifth of it.
const JITTER_SHARE: f64 = 0.2;

/// `delay` less `jitter` thousandths of its last fifth (see [`Facts::jitter`]).
pub(super) fn jittered(delay: Duration, jitter: u16) -> Duration {
    let cut = JITTER_SHARE * f64::from(jitter.min(999)) / 1000.0;
    delay.mul_f64(1.0 - cut)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_shortens_a_backoff_by_at_most_a_fifth() {
        let second = Duration::from_secs(1);
        assert_eq!(jittered(second, 0), second);
        assert_eq!(jittered(second, 500), Duration::from_millis(900));
        let most = jittered(second, u16::MAX);
        assert!(
            most >= Duration::from_millis(800) && most < second,
            "{most:?}"
        );
    }
}
