//! The HTTP call to a handler: the invocation request (with the journal, its completions
//! and awakeable tokens, for a protocol handler; the caller's request as it came, for a
//! plain one) and what its answer means, before any policy is applied.

use durin_protocol::{
    EntryKind, Failure, InvocationRequest, JournalEntry, Outcome, HEADER_ATTEMPT,
    HEADER_ATTEMPT_TOKEN, HEADER_CANCELLED, HEADER_INVOCATION_ID, HEADER_PROTOCOL,
    HEADER_SIGNATURE,
};

use super::Engine;
use crate::http::{error_chain, json_value, parse_retry_after, read_limited, snippet};
use crate::ids::InvocationId;
use crate::lifecycle::{HandlerAnswer, Retryable};
use crate::store::{HandlerProtocol, HandlerTarget, InvocationRecord, StoredEntry};

/// The longest answer a handler may give, so that a runaway handler cannot exhaust memory.
const MAX_HANDLER_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

impl Engine {
    pub(super) async fn call_handler(
        &self,
        record: &InvocationRecord,
        target: &HandlerTarget,
        journal: Vec<StoredEntry>,
    ) -> HandlerAnswer {
        let position_since_ms = journal.last().map(|e| e.at_ms);
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
        // What an earlier attempt's last heartbeat said, for this one to go on from.
        let heartbeat_details = match record.heartbeat_at_ms {
            Some(_) => match self.store.heartbeat_details(&record.id).await {
                Ok(details) => details.map(|d| json_value(Some(&d))),
                Err(error) => {
                    return HandlerAnswer::Retry(Retryable::new(
                        format!("the last heartbeat could not be read: {error}"),
                        None,
                    ))
                }
            },
            None => None,
        };
        // A workflow run on an SDK deployment handles the updates sent to it at its waits.
        let updates = match (target.protocol, &record.workflow_id) {
            (HandlerProtocol::Sdk { version }, Some(_)) if version >= 3 => {
                match self.store.pending_updates(&record.id).await {
                    Ok(updates) => updates,
                    Err(error) => {
                        return HandlerAnswer::Retry(Retryable::new(
                            format!("the pending updates could not be read: {error}"),
                            None,
                        ))
                    }
                }
            }
            _ => Vec::new(),
        };
        let (request, body) = match target.protocol {
            HandlerProtocol::Sdk { version } => {
                let body = serde_json::to_vec(&InvocationRequest {
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
                    heartbeat_details,
                    updates,
                    position_since_ms,
                    suggest_continue_as_new: self
                        .config
                        .journal_limits
                        .warning(record.journal_len, record.journal_bytes)
                        .is_some(),
                    context_url: format!(
                        "{}/v1/contexts/{}",
                        self.config.advertised_url.trim_end_matches('/'),
                        record.id
                    ),
                })
                .unwrap_or_default();
                let request = self
                    .http
                    .post(&endpoint)
                    .header(HEADER_PROTOCOL, version)
                    .header(reqwest::header::CONTENT_TYPE, "application/json");
                (request, body)
            }
            // A plain handler gets the caller's request as it came.
            HandlerProtocol::Plain => {
                let mut request = self.http.post(&endpoint);
                if record.cancel_requested_at_ms.is_some() {
                    request = request.header(HEADER_CANCELLED, "true");
                }
                let request = match &input.content_type {
                    Some(content_type) => {
                        request.header(reqwest::header::CONTENT_TYPE, content_type)
                    }
                    None => request,
                };
                (request, input.value.unwrap_or_default())
            }
        };
        let path = reqwest::Url::parse(&endpoint)
            .map(|url| url.path().to_owned())
            .unwrap_or_default();
        let signature = self.signer.header(
            self.clock.now_ms(),
            &path,
            record.id.as_str(),
            &record.attempt.to_string(),
            &body,
        );
        let request_bytes = body.len();
        // The handler's spans hang under the attempt's.
        let request = match self.config.traces.handler_traceparent(record) {
            Some(traceparent) => request.header(crate::traces::TRACEPARENT, traceparent),
            None => request,
        };
        let sent = request
            .body(body)
            .header(HEADER_SIGNATURE, signature)
            .header(HEADER_INVOCATION_ID, record.id.as_str())
            .header(HEADER_ATTEMPT, record.attempt)
            .header(
                HEADER_ATTEMPT_TOKEN,
                record.attempt_token.as_deref().unwrap_or_default(),
            )
            .timeout(timeout)
            .send();
        let heartbeat_timeout = self.config.timeouts.heartbeat(&target.spec);
        let sent = match heartbeat_timeout {
            None => sent.await,
            Some(limit) => tokio::select! {
                sent = sent => sent,
                silent = self.silence(record, limit) => {
                    return HandlerAnswer::Retry(Retryable::new(
                        format!(
                            "attempt {} sent no heartbeat for {} (its heartbeat_timeout)",
                            record.attempt,
                            humantime::format_duration(silent)
                        ),
                        Some("HeartbeatTimeout".into()),
                    ));
                }
            },
        };
        let response = match sent {
            Ok(response) => response,
            Err(e) if e.is_timeout() => {
                return HandlerAnswer::Retry(Retryable::new(
                    format!(
                        "attempt {} exceeded its start_to_close timeout of {}",
                        record.attempt,
                        humantime::format_duration(timeout)
                    ),
                    Some("StartToCloseTimeout".into()),
                ))
            }
            Err(e) => {
                return HandlerAnswer::Retry(Retryable::new(
                    format!("could not call {endpoint}: {}", error_chain(&e)),
                    None,
                ))
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
                return HandlerAnswer::Retry(Retryable::new(
                    format!("reading the answer of {endpoint} failed: {error}"),
                    None,
                ))
            }
        };
        let plain = target.protocol == HandlerProtocol::Plain;
        if status.is_success() && plain {
            HandlerAnswer::Output(body, content_type)
        } else if status.is_success() {
            match serde_json::from_slice::<Outcome>(&body) {
                Ok(outcome) => HandlerAnswer::Outcome(outcome),
                Err(e) => HandlerAnswer::Retry(Retryable::new(
                    format!(
                        "protocol violation: {endpoint} answered {status} with a body that is not a Durin outcome ({e}): {}",
                        snippet(&body)
                    ),
                    Some("ProtocolViolation".into()),
                )),
            }
        } else if status == reqwest::StatusCode::PAYLOAD_TOO_LARGE && !plain {
            HandlerAnswer::RequestTooLarge {
                deployment_id: target.deployment_id.clone(),
                bytes: request_bytes,
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
            let throttled = status == reqwest::StatusCode::TOO_MANY_REQUESTS;
            HandlerAnswer::Retry(Retryable {
                delay: retry_after,
                status: if throttled { 429 } else { 500 },
                ..Retryable::new(
                    format!("handler answered {status}: {}", snippet(&body)),
                    None,
                )
            })
        }
    }
}

impl Engine {
    /// Resolves once the attempt has gone `limit` without a heartbeat (counting from its
    /// start), with how long it was silent.
    async fn silence(
        &self,
        record: &InvocationRecord,
        limit: std::time::Duration,
    ) -> std::time::Duration {
        let started = tokio::time::Instant::now();
        let check = (limit / 4).clamp(
            std::time::Duration::from_millis(10),
            std::time::Duration::from_secs(1),
        );
        loop {
            tokio::time::sleep(check).await;
            let last = self
                .heartbeats
                .last(&record.id, record.attempt)
                .unwrap_or(started);
            let silent = last.elapsed();
            if silent >= limit {
                return silent;
            }
        }
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
