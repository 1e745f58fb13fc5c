//! One attempt: call the handler with the journal, decide how the attempt ended (retry
//! policy, timeouts, suspension, non-determinism) and record that end in the store.
//!
//! The engine never writes storage except through the store's fenced methods: an attempt
//! that was fenced (a newer attempt, a pause) finds its end refused and leaves quietly.

use std::time::Duration;

use durin_protocol::{
    EntryKind, Failure, InvocationRequest, JournalEntry, Outcome, RetryPolicy, HEADER_ATTEMPT,
    HEADER_ATTEMPT_TOKEN, HEADER_INVOCATION_ID, HEADER_PROTOCOL,
};
use serde_json::json;

use super::{Ended, Engine};
use crate::http::{error_chain, json_value, parse_retry_after, read_limited, snippet};
use crate::ids::InvocationId;
use crate::store::{
    AttemptEnd, HandlerProtocol, HandlerTarget, InvocationRecord, Status, StoreError, StoredEntry,
};

/// The longest answer a handler may give, so that a runaway handler cannot exhaust memory.
const MAX_HANDLER_RESPONSE_BYTES: usize = 16 * 1024 * 1024;
/// The longest delay a handler can ask for (`Retry-After`, a step's backoff, a suspension).
const MAX_DELAY: Duration = Duration::from_secs(366 * 24 * 60 * 60);
/// The longest pause between two tries of recording an attempt's end.
const MAX_END_RETRY: Duration = Duration::from_secs(5);

/// `now + delay`, with the delay capped at [`MAX_DELAY`].
fn after(now_ms: i64, delay: Duration) -> i64 {
    now_ms.saturating_add(delay.min(MAX_DELAY).as_millis() as i64)
}

impl Engine {
    /// Runs an attempt the store has started: reads the journal (unless given), calls the
    /// handler, records the end, and tells waiting callers when the invocation ended.
    pub(super) async fn run_attempt(
        &self,
        record: InvocationRecord,
        journal: Option<Vec<StoredEntry>>,
    ) {
        let id = record.id.clone();
        let journal = match journal {
            Some(journal) => journal,
            None => match self.store.read_journal(&id).await {
                Ok(journal) => journal,
                Err(error) => {
                    // The attempt stays running in the store; end it as a retry so that
                    // the scheduler takes it again.
                    tracing::error!(%id, %error, "could not read the journal");
                    let end = AttemptEnd::BackOff {
                        until_ms: self.clock.now_ms() + 1_000,
                        error: format!("the journal could not be read: {error}"),
                        handler_failure: false,
                    };
                    self.record_end(&record, end).await;
                    return;
                }
            },
        };
        let end = self.call(&record, journal).await;
        // The handler has answered (or given up): its egress calls are over.
        self.observer.attempt_ended(&id, record.attempt);
        let end = match end {
            Ok(end) => end,
            Err(error) => {
                tracing::error!(%id, %error, "store failed during an attempt");
                AttemptEnd::BackOff {
                    until_ms: self.clock.now_ms() + 1_000,
                    error: format!("the store failed during the attempt: {error}"),
                    handler_failure: false,
                }
            }
        };
        if let AttemptEnd::BackOff { error, .. } = &end {
            tracing::info!(%id, attempt = record.attempt, %error, "attempt failed; backing off");
        }
        self.record_end(&record, end).await;
    }

    /// Records how an attempt ended, trying again while the store fails (the handler's
    /// outcome is never thrown away), until it is recorded or fenced.
    async fn record_end(&self, record: &InvocationRecord, end: AttemptEnd) {
        let id = &record.id;
        let mut pause = Duration::from_millis(50);
        loop {
            match self
                .store
                .end_attempt(id, record.attempt, end.clone(), self.clock.now_ms())
                .await
            {
                Ok((ended, output)) => {
                    self.observer.attempt_recorded(id, record.attempt);
                    if ended.status.is_final() || ended.status == Status::Paused {
                        self.waiters.finish(std::sync::Arc::new(Ended {
                            record: ended,
                            output,
                        }));
                    } else if ended.next_run_at_ms.is_some() {
                        self.nudge();
                    }
                    return;
                }
                // The invocation changed under this attempt (a newer attempt, a pause):
                // whoever changed it scheduled what comes next.
                Err(StoreError::Fenced { .. }) | Err(StoreError::NotFound(_)) => {
                    self.observer.attempt_recorded(id, record.attempt);
                    return;
                }
                Err(error) => {
                    tracing::error!(%id, %error, "could not record the end of an attempt; trying again");
                    if self.shutdown.is_cancelled() {
                        // Left running in the store: recovered at the next start.
                        return;
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MAX_END_RETRY);
                }
            }
        }
    }

    async fn call(
        &self,
        record: &InvocationRecord,
        journal: Vec<StoredEntry>,
    ) -> Result<AttemptEnd, StoreError> {
        let Some(target) = self
            .targets
            .pinned(
                &*self.store,
                &record.deployment_id,
                &record.service,
                &record.handler,
            )
            .await?
        else {
            return Ok(AttemptEnd::Paused {
                reason: format!(
                    "deployment {} no longer serves {}/{}",
                    record.deployment_id, record.service, record.handler
                ),
            });
        };
        // A journal with entries newer than the deployment's protocol (an invocation resumed
        // on an older deployment, an SDK rolled back) would be misread: wait for an
        // operator instead of failing it.
        if let HandlerProtocol::Sdk { version } = target.protocol {
            if let Some(entry) = journal.iter().find(|e| e.kind.since_version() > version) {
                return Ok(AttemptEnd::Paused {
                    reason: format!(
                        "journal entry {} is a {} entry, which protocol version {version} of deployment {} does not know; resume the invocation on a deployment that speaks version {}",
                        entry.index,
                        entry.kind.as_str(),
                        target.deployment_id,
                        entry.kind.since_version()
                    ),
                });
            }
        }
        let policy = target
            .spec
            .retry_policy
            .clone()
            .unwrap_or_else(|| self.config.default_retry_policy.clone());
        let answer = self.call_handler(record, &target, journal).await;
        Ok(self.decide(record, &policy, answer))
    }

    async fn call_handler(
        &self,
        record: &InvocationRecord,
        target: &HandlerTarget,
        journal: Vec<StoredEntry>,
    ) -> HandlerAnswer {
        let mut entries = journal.into_iter();
        let Some(input) = entries.next().filter(|e| e.kind == EntryKind::Input) else {
            return HandlerAnswer::Terminal(
                Failure {
                    status: 500,
                    error_type: None,
                    message: "the journal has no input entry".into(),
                },
                None,
            );
        };
        let timeout = target
            .spec
            .start_to_close
            .unwrap_or(self.config.default_start_to_close);
        let endpoint = target.endpoint();
        let request = match target.protocol {
            HandlerProtocol::Sdk { version } => self
                .http
                .post(&endpoint)
                .header(HEADER_PROTOCOL, version)
                .json(&InvocationRequest {
                    protocol: version,
                    invocation_id: record.id.to_string(),
                    attempt: record.attempt,
                    attempt_token: record.attempt_token.clone().unwrap_or_default(),
                    service: record.service.clone(),
                    handler: record.handler.clone(),
                    input: json_value(input.value.as_deref()),
                    journal: entries
                        .map(|entry| wire_entry(self, &record.id, entry))
                        .collect(),
                    position_failures: record.position_failures,
                    context_url: format!(
                        "{}/v1/contexts/{}",
                        self.config.advertised_url.trim_end_matches('/'),
                        record.id
                    ),
                }),
            // A plain handler gets the caller's request as it came.
            HandlerProtocol::Plain => {
                let request = self.http.post(&endpoint);
                let request = match &input.content_type {
                    Some(content_type) => {
                        request.header(reqwest::header::CONTENT_TYPE, content_type)
                    }
                    None => request,
                };
                request.body(input.value.unwrap_or_default())
            }
        };
        let sent = request
            .header(HEADER_INVOCATION_ID, record.id.as_str())
            .header(HEADER_ATTEMPT, record.attempt)
            .header(
                HEADER_ATTEMPT_TOKEN,
                record.attempt_token.as_deref().unwrap_or_default(),
            )
            .timeout(timeout)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(e) if e.is_timeout() => {
                return HandlerAnswer::Retry {
                    error: format!(
                        "attempt {} exceeded its start_to_close timeout of {}",
                        record.attempt,
                        humantime::format_duration(timeout)
                    ),
                    error_type: Some("StartToCloseTimeout".into()),
                    delay: None,
                }
            }
            Err(e) => {
                return HandlerAnswer::Retry {
                    error: format!("could not call {endpoint}: {}", error_chain(&e)),
                    error_type: None,
                    delay: None,
                }
            }
        };
        let status = response.status();
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let body = match read_limited(response, MAX_HANDLER_RESPONSE_BYTES).await {
            Ok(body) => body,
            Err(error) => {
                return HandlerAnswer::Retry {
                    error: format!("reading the answer of {endpoint} failed: {error}"),
                    error_type: None,
                    delay: None,
                }
            }
        };
        let plain = target.protocol == HandlerProtocol::Plain;
        if status.is_success() && plain {
            HandlerAnswer::Output(body, content_type)
        } else if status.is_success() {
            match serde_json::from_slice::<Outcome>(&body) {
                Ok(outcome) => HandlerAnswer::Outcome(outcome),
                Err(e) => HandlerAnswer::Retry {
                    error: format!(
                        "protocol violation: {endpoint} answered {status} with a body that is not a Durin outcome ({e}): {}",
                        snippet(&body)
                    ),
                    error_type: Some("ProtocolViolation".into()),
                    delay: None,
                },
            }
        } else if status.is_client_error()
            && status != reqwest::StatusCode::REQUEST_TIMEOUT
            && status != reqwest::StatusCode::TOO_MANY_REQUESTS
        {
            let failure = Failure {
                status: status.as_u16(),
                error_type: None,
                message: format!("handler answered {status}: {}", snippet(&body)),
            };
            HandlerAnswer::Terminal(failure, plain.then_some((body, content_type)))
        } else {
            HandlerAnswer::Retry {
                error: format!("handler answered {status}: {}", snippet(&body)),
                error_type: None,
                delay: retry_after,
            }
        }
    }

    /// Turns the handler's answer into how the attempt ends, applying the retry policy.
    fn decide(
        &self,
        record: &InvocationRecord,
        policy: &RetryPolicy,
        answer: HandlerAnswer,
    ) -> AttemptEnd {
        let now = self.clock.now_ms();
        let outcome = match answer {
            HandlerAnswer::Terminal(failure, body) => return AttemptEnd::Failed { failure, body },
            HandlerAnswer::Retry {
                error,
                error_type,
                delay,
            } => return self.handler_failure(record, policy, error, error_type, delay),
            HandlerAnswer::Output(output, content_type) => {
                return AttemptEnd::Completed {
                    output,
                    content_type,
                }
            }
            HandlerAnswer::Outcome(outcome) => outcome,
        };
        match outcome {
            Outcome::Output { output } => AttemptEnd::Completed {
                output: serde_json::to_vec(&output).unwrap_or_default(),
                content_type: Some("application/json".into()),
            },
            Outcome::Failure { failure } => AttemptEnd::Failed {
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
                retry_after_ms,
                step: Some(step),
            } if retry_after_ms.is_some() => {
                // The SDK applied the step's own retry policy; the handler's is not charged.
                let delay = Duration::from_millis(retry_after_ms.unwrap_or_default());
                let kind = error_type.map(|t| format!(" ({t})")).unwrap_or_default();
                AttemptEnd::BackOff {
                    until_ms: after(now, delay),
                    error: format!("step {step:?} failed{kind}: {error}"),
                    handler_failure: false,
                }
            }
            Outcome::Retry {
                error,
                error_type,
                retry_after_ms,
                ..
            } => self.handler_failure(
                record,
                policy,
                error,
                error_type,
                retry_after_ms.map(Duration::from_millis),
            ),
            Outcome::Suspend {
                waiting_for,
                wake_at_ms,
            } => {
                if waiting_for.is_empty() && wake_at_ms.is_none() {
                    return self.handler_failure(
                        record,
                        policy,
                        "protocol violation: the handler suspended without saying what it waits for".into(),
                        Some("ProtocolViolation".into()),
                        None,
                    );
                }
                AttemptEnd::Suspended {
                    until_ms: wake_at_ms.map(|at| at.min(after(now, MAX_DELAY))),
                    waiting_for,
                }
            }
            Outcome::NonDeterminism {
                index,
                recorded,
                requested,
                detail,
            } => AttemptEnd::Paused {
                reason: format!(
                    "non-determinism at journal index {index}: the journal recorded {} but the handler asked for {}{}; fix the handler and resume the invocation",
                    describe(recorded.kind, recorded.name.as_deref()),
                    describe(requested.kind, requested.name.as_deref()),
                    detail.map(|d| format!(" ({d})")).unwrap_or_default(),
                ),
            },
        }
    }

    fn handler_failure(
        &self,
        record: &InvocationRecord,
        policy: &RetryPolicy,
        error: String,
        error_type: Option<String>,
        delay_override: Option<Duration>,
    ) -> AttemptEnd {
        let failed = record.failures + 1;
        match policy.next_delay(failed, error_type.as_deref()) {
            Some(delay) => AttemptEnd::BackOff {
                until_ms: after(self.clock.now_ms(), delay_override.unwrap_or(delay)),
                error,
                handler_failure: true,
            },
            None => {
                let why = policy.exhausted_reason(error_type.as_deref());
                AttemptEnd::Failed {
                    failure: Failure {
                        status: 500,
                        error_type,
                        message: format!("{why}; last error: {error}"),
                    },
                    body: None,
                }
            }
        }
    }
}

/// What the handler's HTTP answer meant, before the retry policy is applied.
enum HandlerAnswer {
    /// A protocol handler's outcome.
    Outcome(Outcome),
    /// A plain handler's output and its content type.
    Output(Vec<u8>, Option<String>),
    /// A terminal failure, with a plain handler's own answer.
    Terminal(Failure, Option<(Vec<u8>, Option<String>)>),
    Retry {
        error: String,
        error_type: Option<String>,
        delay: Option<Duration>,
    },
}

fn describe(kind: EntryKind, name: Option<&str>) -> String {
    match name {
        Some(name) => format!("{} {name:?}", kind.as_str()),
        None => kind.as_str().to_owned(),
    }
}

/// A journal entry as a handler receives it: completions attached, an awakeable with its
/// token (computed here, never stored).
fn wire_entry(engine: &Engine, id: &InvocationId, entry: StoredEntry) -> JournalEntry {
    let value = match entry.kind {
        EntryKind::Awakeable => Some(engine.awakeable_value(id, entry.index)),
        _ => entry.value.as_deref().map(|v| json_value(Some(v))),
    };
    JournalEntry {
        index: entry.index,
        kind: entry.kind,
        name: entry.name,
        value,
        failure: entry.failure,
        attempt: entry.attempt,
        at_ms: entry.at_ms,
        completion: entry.completion.as_ref().map(|c| c.to_wire()),
    }
}

impl Engine {
    /// What an awakeable's entry shows its handler: the token and where to complete it.
    pub fn awakeable_value(&self, id: &InvocationId, index: u32) -> serde_json::Value {
        let token = self.awakeables.token(id, index);
        let base = self.config.advertised_url.trim_end_matches('/');
        json!({
            "token": token,
            "resolve_url": format!("{base}/v1/awakeables/{token}/resolve"),
            "reject_url": format!("{base}/v1/awakeables/{token}/reject"),
        })
    }
}
