//! Lifecycle: how an attempt's end moves its invocation, one file per transition.
//!
//! [`decide`] turns what the handler answered, the retry policy and the time into an
//! [`AttemptEnd`]; it is pure, so each rule is tested without a handler or a store. The
//! store carries the end out, fenced by the attempt. `retry.rs` (backoff or failure when
//! attempts are used up), `suspend.rs` (waiting for commands), `pause.rs` (waiting for an
//! operator: non-determinism, a journal the deployment cannot read, a deployment gone),
//! `cancel.rs` (a cancelled invocation's handler ends it), `continue_as_new.rs` (a
//! workflow's run hands over to its next run), `timeouts.rs` (schedule_to_close,
//! schedule_to_start, heartbeats).

pub mod cancel;
pub mod claim;
pub mod continue_as_new;
pub mod end;
pub mod operate;
pub mod pause;
pub mod restart;
mod retry;
pub mod start;
pub mod suspend;
pub mod terminate;
pub mod timeouts;

use std::time::Duration;

use durin_protocol::{Failure, Outcome, RetryPolicy};

use crate::store::AttemptEnd;

/// The longest delay a handler can ask for (`Retry-After`, a step's backoff, a suspension).
pub use crate::journal::MAX_DELAY;

/// `now + delay`, with the delay capped at [`MAX_DELAY`].
pub fn after(now_ms: i64, delay: Duration) -> i64 {
    now_ms.saturating_add(delay.min(MAX_DELAY).as_millis() as i64)
}

/// What the handler's HTTP answer meant, before the retry policy is applied.
#[derive(Debug)]
pub enum HandlerAnswer {
    /// A protocol handler's outcome.
    Outcome(Outcome),
    /// A plain handler's output and its content type.
    Output(Vec<u8>, Option<String>),
    /// A terminal failure, with a plain handler's own answer.
    Terminal(Failure, Option<(Vec<u8>, Option<String>)>),
    /// A crash, a timeout, a 5xx, a 429: retried under the handler's policy.
    Retry(Retryable),
    /// An SDK deployment answered 413 to an invocation request of `bytes`.
    RequestTooLarge { deployment_id: String, bytes: usize },
}

/// A failure the handler's retry policy may try again.
#[derive(Debug)]
pub struct Retryable {
    pub error: String,
    pub error_type: Option<String>,
    /// The handler's own `Retry-After`.
    pub delay: Option<Duration>,
    /// What the caller gets when the policy is used up: the handler's 429 (too many
    /// requests: the same request later may succeed), or 500.
    pub status: u16,
}

impl Retryable {
    /// A failure of Durin's call or of the handler, not an answer of its own.
    pub fn new(error: String, error_type: Option<String>) -> Retryable {
        Retryable {
            error,
            error_type,
            delay: None,
            status: 500,
        }
    }
}

/// What [`decide`] needs to know of the invocation.
#[derive(Debug, Clone, Copy, Default)]
pub struct Facts {
    /// Its earlier handler-level failures.
    pub failures: u32,
    /// Someone cancelled it.
    pub cancelling: bool,
    /// It is a workflow's run (which may continue as new).
    pub workflow: bool,
    /// When the retry policy is used up, pause for an operator instead of failing.
    pub pause_when_exhausted: bool,
    /// How much of the last fifth of a policy's backoff to leave out, in thousandths
    /// (0..1000): attempts that failed together (a handler restarting under load) come
    /// back spread out instead of all at once. 0 keeps the policy's delay as it is.
    pub jitter: u16,
}

/// How an attempt ends, given the handler's answer.
pub fn decide(
    facts: Facts,
    policy: &RetryPolicy,
    answer: HandlerAnswer,
    now_ms: i64,
) -> AttemptEnd {
    let Facts {
        cancelling,
        workflow,
        ..
    } = facts;
    let outcome = match answer {
        HandlerAnswer::Terminal(failure, _) if cancelling => return cancel::ended(failure),
        HandlerAnswer::Terminal(failure, body) => return AttemptEnd::Failed { failure, body },
        HandlerAnswer::Retry(failure) => {
            return retry::handler_failure(facts, policy, failure, now_ms)
        }
        HandlerAnswer::RequestTooLarge {
            deployment_id,
            bytes,
        } => return pause::request_too_large(&deployment_id, bytes),
        HandlerAnswer::Output(output, content_type) => {
            return AttemptEnd::Completed {
                output,
                content_type,
            }
        }
        HandlerAnswer::Outcome(outcome) => outcome,
    };
    match outcome {
        Outcome::Output { output, .. } => AttemptEnd::Completed {
            output: serde_json::to_vec(&output).unwrap_or_default(),
            content_type: Some("application/json".into()),
        },
        Outcome::Failure { failure, .. } if cancelling && cancel::is_cancelled(&failure) => {
            cancel::ended(failure)
        }
        Outcome::Failure { failure, .. } => AttemptEnd::Failed {
            failure: Failure {
                status: if (400..600).contains(&failure.status) {
                    failure.status
                } else {
                    500
                },
                ..failure
            },
            body: None,
        },
        Outcome::Retry {
            error,
            error_type,
            retry_after_ms: Some(delay_ms),
            step: Some(step),
        } => retry::step_backoff(&step, error, error_type, delay_ms, now_ms),
        Outcome::Retry {
            error,
            error_type,
            retry_after_ms,
            ..
        } => retry::handler_failure(
            facts,
            policy,
            Retryable {
                delay: retry_after_ms.map(Duration::from_millis),
                ..Retryable::new(error, error_type)
            },
            now_ms,
        ),
        Outcome::Suspend {
            waiting_for,
            wake_at_ms,
        } => suspend::suspend(waiting_for, wake_at_ms, now_ms).unwrap_or_else(|violation| {
            retry::handler_failure(
                facts,
                policy,
                Retryable::new(violation, Some("ProtocolViolation".into())),
                now_ms,
            )
        }),
        Outcome::NonDeterminism {
            index,
            recorded,
            requested,
            detail,
        } => pause::non_determinism(index, &recorded, &requested, detail),
        Outcome::ContinueAsNew { input } => continue_as_new::next_run(input, workflow),
        // Only a replay asks for it; an attempt answered so is retried.
        Outcome::ReplayEnd { index, next } => retry::handler_failure(
            facts,
            policy,
            Retryable::new(
                format!(
                    "protocol violation: the handler answered replay_end (at index {index}, {}) to an attempt that is not a replay",
                    next.kind.as_str()
                ),
                Some("ProtocolViolation".into()),
            ),
            now_ms,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use durin_protocol::{EntryKind, EntryRef};

    const NOW: i64 = 1_000_000;

    fn failed(failures: u32) -> Facts {
        Facts {
            failures,
            ..Facts::default()
        }
    }

    fn policy(attempts: u32) -> RetryPolicy {
        RetryPolicy {
            initial_interval: Duration::from_millis(100),
            maximum_attempts: Some(attempts),
            ..RetryPolicy::default()
        }
    }

    fn retry(step: Option<&str>, after_ms: Option<u64>) -> HandlerAnswer {
        HandlerAnswer::Outcome(Outcome::Retry {
            error: "boom".into(),
            error_type: None,
            retry_after_ms: after_ms,
            step: step.map(str::to_owned),
        })
    }

    #[test]
    fn a_step_backoff_is_not_charged_to_the_handler_and_its_retries_are() {
        match decide(failed(9), &policy(3), retry(Some("charge"), Some(250)), NOW) {
            AttemptEnd::BackOff {
                until_ms,
                charged,
                error,
            } => {
                assert_eq!(until_ms, NOW + 250);
                assert_eq!(charged, crate::store::Charge::Step);
                assert!(error.contains("charge"), "{error}");
            }
            other => panic!("{other:?}"),
        }
        match decide(failed(0), &policy(3), retry(None, None), NOW) {
            AttemptEnd::BackOff {
                until_ms, charged, ..
            } => assert_eq!(
                (until_ms, charged),
                (NOW + 100, crate::store::Charge::Handler)
            ),
            other => panic!("{other:?}"),
        }
        match decide(failed(2), &policy(3), retry(None, None), NOW) {
            AttemptEnd::Failed { failure, .. } => {
                assert!(
                    failure.message.starts_with("all 3 attempts failed"),
                    "{failure:?}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_suspension_names_what_it_waits_for_or_is_a_protocol_violation() {
        let suspend = |waiting_for: Vec<u32>, wake_at_ms| {
            HandlerAnswer::Outcome(Outcome::Suspend {
                waiting_for,
                wake_at_ms,
            })
        };
        match decide(failed(0), &policy(3), suspend(vec![3, 4], None), NOW) {
            AttemptEnd::Suspended {
                waiting_for,
                until_ms,
            } => assert_eq!((waiting_for, until_ms), (vec![3, 4], None)),
            other => panic!("{other:?}"),
        }
        // Version 1: a wake time, capped at a year and a day.
        match decide(failed(0), &policy(3), suspend(vec![], Some(i64::MAX)), NOW) {
            AttemptEnd::Suspended { until_ms, .. } => {
                assert_eq!(until_ms, Some(after(NOW, MAX_DELAY)))
            }
            other => panic!("{other:?}"),
        }
        match decide(failed(0), &policy(3), suspend(vec![], None), NOW) {
            AttemptEnd::BackOff { error, .. } => assert!(error.contains("protocol violation")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn non_determinism_pauses_and_names_both_sides() {
        let answer = HandlerAnswer::Outcome(Outcome::NonDeterminism {
            index: 3,
            recorded: EntryRef {
                kind: EntryKind::Step,
                name: Some("reserve".into()),
            },
            requested: EntryRef {
                kind: EntryKind::Step,
                name: Some("charge".into()),
            },
            detail: None,
        });
        match decide(failed(0), &policy(3), answer, NOW) {
            AttemptEnd::Paused { reason } => {
                assert!(reason.contains(r#"step "reserve""#), "{reason}");
                assert!(reason.contains(r#"step "charge""#), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }
}
