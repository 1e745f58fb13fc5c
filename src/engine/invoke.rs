//! The HTTP call to a handler: the invocation request (with the journal, its completions
//! and awakeable tokens, for a protocol handler; the caller's request as it came, for a
//! plain one) and what its answer means, before any policy is applied.

use durin_protocol::{
    EntryKind, Failure, HandlerFrame, InvocationRequest, JournalEntry, Lines, Outcome,
    SignedHeaders, HEADER_SIGNATURE, STREAM_CONTENT_TYPE, STREAM_VERSION,
};

use super::Engine;
use crate::http::{error_chain, json_value, parse_retry_after, read_limited, snippet};
use crate::ids::InvocationId;
use crate::lifecycle::{HandlerAnswer, Retryable};
use crate::store::{HandlerProtocol, HandlerTarget, InvocationRecord, Status, StoredEntry};

/// The longest answer a handler may give, so that a runaway handler cannot exhaust memory.
const MAX_HANDLER_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

impl Engine {
    pub(super) async fn call_handler(
        &self,
        record: &InvocationRecord,
        target: &HandlerTarget,
        journal: Vec<StoredEntry>,
    ) -> HandlerAnswer {
        self.invoke(record, target, journal, false).await
    }

    /// Calls the handler to replay `journal`, a recording, with no side effect: an SDK
    /// handler gets the request marked `replay` (protocol 4), a plain one the caller's
    /// request as it came, whose context calls and egress calls the replay answers. No
    /// heartbeat is watched and nothing is read from the store.
    pub async fn replay_handler(
        &self,
        record: &InvocationRecord,
        target: &HandlerTarget,
        journal: Vec<StoredEntry>,
    ) -> HandlerAnswer {
        self.invoke(record, target, journal, true).await
    }

    async fn invoke(
        &self,
        record: &InvocationRecord,
        target: &HandlerTarget,
        journal: Vec<StoredEntry>,
        replay: bool,
    ) -> HandlerAnswer {
        let position_since_ms = journal.last().map(|e| e.at_ms);
        if target.protocol == HandlerProtocol::Plain && !replay {
            // The egress learns the attempt and its recorded calls before the handler's
            // first call, which then reads nothing from the store.
            for observer in &self.observers {
                observer.plain_attempt_starting(record, &journal);
            }
        }
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
        // Parsed once: the request goes there, and the signature covers its path. (A URL
        // that does not parse goes to reqwest as text, which fails the call with why.)
        let url = reqwest::Url::parse(&endpoint);
        let post = || match &url {
            Ok(url) => self.http.post(url.clone()),
            Err(_) => self.http.post(&endpoint),
        };
        // What an earlier attempt's last heartbeat said, for this one to go on from.
        let heartbeat_details = match record.heartbeat_at_ms.filter(|_| !replay) {
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
            (HandlerProtocol::Sdk { version }, Some(_)) if version >= 3 && !replay => {
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
        // A keyed invocation reads its key's state as the ended ones left it: the same for
        // every attempt, since its own writes become the key's only when it ends.
        let key_state = match (&record.key, target.protocol) {
            (Some(key), HandlerProtocol::Sdk { .. }) if !replay => {
                match self.store.key_state(&record.service, &key.key).await {
                    Ok(state) => Some(
                        state
                            .into_iter()
                            .map(|(name, value)| (name, json_value(Some(&value))))
                            .collect(),
                    ),
                    Err(error) => {
                        return HandlerAnswer::Retry(Retryable::new(
                            format!("the key's state could not be read: {error}"),
                            None,
                        ))
                    }
                }
            }
            _ => None,
        };
        // Version 6 streams the attempt: its appends travel on the invocation's own
        // exchange. A replay appends nothing and is not streamed.
        let appender = match target.protocol {
            HandlerProtocol::Sdk { version } if version >= STREAM_VERSION && !replay => {
                self.appender.get()
            }
            _ => None,
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
                    replay,
                    key_state,
                })
                .unwrap_or_default();
                let content_type = match appender {
                    Some(_) => STREAM_CONTENT_TYPE,
                    None => "application/json",
                };
                let request = post().header(reqwest::header::CONTENT_TYPE, content_type);
                (request, body)
            }
            // A plain handler gets the caller's request as it came.
            HandlerProtocol::Plain => {
                let request = post();
                let request = match &input.content_type {
                    Some(content_type) => {
                        request.header(reqwest::header::CONTENT_TYPE, content_type)
                    }
                    None => request,
                };
                (request, input.value.unwrap_or_default())
            }
        };
        let path = url.as_ref().map(|url| url.path()).unwrap_or_default();
        // Every `Durin-*` header the handler gets is signed with the body: a replayed
        // request cannot be turned into a cancellation or given another token.
        let attempt = record.attempt.to_string();
        let protocol = match target.protocol {
            HandlerProtocol::Sdk { version } => version.to_string(),
            HandlerProtocol::Plain => String::new(),
        };
        // A plain handler learns of a cancellation here; an SDK one from its journal.
        let cancelled =
            target.protocol == HandlerProtocol::Plain && record.cancel_requested_at_ms.is_some();
        let headers = SignedHeaders {
            invocation_id: record.id.as_str(),
            attempt: &attempt,
            attempt_token: record.attempt_token.as_deref().unwrap_or_default(),
            cancelled: if cancelled { "true" } else { "" },
            protocol: &protocol,
            replay: if replay { "true" } else { "" },
            workflow_id: record.workflow_id.as_deref().unwrap_or_default(),
        };
        let headers = headers.carried();
        let signature = self
            .signer
            .header(self.clock.now_ms(), path, &headers, &body);
        let request_bytes = body.len();
        // The handler's spans hang under the attempt's.
        let traceparent = self
            .config
            .traces
            .handler_traceparent(record)
            .filter(|_| !replay);
        let request = match traceparent {
            Some(traceparent) => request.header(crate::telemetry::traces::TRACEPARENT, traceparent),
            None => request,
        };
        // Exactly the headers signed.
        let request = headers.into_iter().fold(request, |request, (name, value)| {
            request.header(name, value)
        });
        // A streamed attempt's first line is the invocation request, which the signature
        // covers; the answers to its appends follow on the same request body.
        let (request, frames) = match appender {
            Some(_) => {
                // Unbounded, so that a handler slow to read never holds up the loop that
                // reads its lines (the journal's limits bound what it may append).
                let (frames, lines) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
                let mut first = body;
                first.push(b'\n');
                let _ = frames.send(first);
                let lines = futures_util::stream::unfold(lines, |mut lines| async move {
                    let line = lines.recv().await?;
                    Some((Ok::<_, std::convert::Infallible>(line), lines))
                });
                (
                    request.body(reqwest::Body::wrap_stream(lines)),
                    Some(frames),
                )
            }
            None => (request.body(body), None),
        };
        let sent = request
            .header(HEADER_SIGNATURE, signature)
            .timeout(timeout)
            .send();
        let heartbeat_timeout = self
            .config
            .timeouts
            .heartbeat(&target.spec)
            .filter(|_| !replay);
        if heartbeat_timeout.is_some() {
            // Forgotten when the attempt is over (`attempt.rs`).
            self.heartbeats.watch(&record.id, record.attempt);
        }
        let exchange = async {
            let response = match sent.await {
                Ok(response) => response,
                Err(e) => return self.unanswered(record, &endpoint, timeout, &e),
            };
            match (appender, frames) {
                (Some(appender), Some(frames)) if is_stream(&response) => {
                    self.streamed(record, appender.as_ref(), response, frames, timeout)
                        .await
                }
                _ => self.answered(record, target, response, request_bytes).await,
            }
        };
        match heartbeat_timeout {
            None => exchange.await,
            Some(limit) => tokio::select! {
                answer = exchange => answer,
                silent = self.silence(record, limit) => {
                    HandlerAnswer::Retry(Retryable::new(
                        format!(
                            "attempt {} sent no heartbeat for {} (its heartbeat_timeout)",
                            record.attempt,
                            humantime::format_duration(silent)
                        ),
                        Some("HeartbeatTimeout".into()),
                    ))
                }
            },
        }
    }

    /// The call could not be made, or no answer came in time.
    fn unanswered(
        &self,
        record: &InvocationRecord,
        endpoint: &str,
        timeout: std::time::Duration,
        error: &reqwest::Error,
    ) -> HandlerAnswer {
        if error.is_timeout() {
            HandlerAnswer::Retry(Retryable::new(
                format!(
                    "attempt {} exceeded its start_to_close timeout of {}",
                    record.attempt,
                    humantime::format_duration(timeout)
                ),
                Some("StartToCloseTimeout".into()),
            ))
        } else {
            HandlerAnswer::Retry(Retryable::new(
                format!("could not call {endpoint}: {}", error_chain(error)),
                None,
            ))
        }
    }

    /// A streamed attempt (version 6): appends each `append` line of the handler's answer
    /// and sends back its acknowledgement (or refusal) on `frames`, in order, until the
    /// `outcome` line.
    async fn streamed(
        &self,
        record: &InvocationRecord,
        appender: &dyn super::StreamAppender,
        mut response: reqwest::Response,
        frames: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
        timeout: std::time::Duration,
    ) -> HandlerAnswer {
        let endpoint = response.url().to_string();
        let token = record.attempt_token.as_deref().unwrap_or_default();
        let violation = |what: String| {
            HandlerAnswer::Retry(Retryable::new(
                format!("protocol violation: the stream of {endpoint} {what}"),
                Some("ProtocolViolation".into()),
            ))
        };
        let mut lines = Lines::default();
        let mut ended = false;
        loop {
            while let Some(line) = lines.next_line() {
                let line = line.trim_ascii();
                if line.is_empty() {
                    continue;
                }
                let frame = match serde_json::from_slice::<HandlerFrame>(line) {
                    Ok(frame) => frame,
                    Err(e) => {
                        return violation(format!(
                            "sent a line that is not a frame ({e}): {}",
                            snippet(line)
                        ))
                    }
                };
                let request = match frame {
                    HandlerFrame::Outcome(outcome) => {
                        // The request ends here. The answer's end comes with its last line
                        // (the handler ends it after the outcome), so the connection serves
                        // the next attempt: at 64 callers, 10,000 attempts left some 150
                        // sockets in TIME-WAIT, those of the benchmark's own start.
                        drop(frames);
                        return HandlerAnswer::Outcome(outcome);
                    }
                    HandlerFrame::Append(request) => request,
                };
                let answer = match appender
                    .append(&record.id, record.attempt, token, request)
                    .await
                {
                    Ok(appended) => serde_json::json!({ "appended": appended }),
                    Err(refused) => serde_json::json!({ "refused": refused.problem() }),
                };
                let mut answer = serde_json::to_vec(&answer).unwrap_or_default();
                answer.push(b'\n');
                // A handler that stopped reading learns nothing more; its outcome may still
                // come.
                let _ = frames.send(answer);
            }
            if ended {
                return violation("ended without an outcome".into());
            }
            if lines.pending() > MAX_HANDLER_RESPONSE_BYTES {
                return violation(format!(
                    "sent a line longer than {MAX_HANDLER_RESPONSE_BYTES} bytes"
                ));
            }
            match response.chunk().await {
                Ok(Some(chunk)) => lines.push(&chunk),
                // The last line may lack its newline.
                Ok(None) => {
                    lines.end();
                    ended = true;
                }
                Err(e) if e.is_timeout() => return self.unanswered(record, &endpoint, timeout, &e),
                Err(e) => {
                    return HandlerAnswer::Retry(Retryable::new(
                        format!(
                            "could not call {endpoint} to the end: its stream broke ({})",
                            error_chain(&e)
                        ),
                        None,
                    ))
                }
            }
        }
    }

    /// What a handler's answer (not a stream) means.
    async fn answered(
        &self,
        record: &InvocationRecord,
        target: &HandlerTarget,
        response: reqwest::Response,
        request_bytes: usize,
    ) -> HandlerAnswer {
        let endpoint = target.endpoint();
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
        // A plain handler says that a wait suspended it and it stopped; when one did, the
        // store has the attempt suspended already and this answer changes nothing.
        let says_suspended = response
            .headers()
            .get(durin_protocol::HEADER_SUSPENDED)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
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
        if plain && says_suspended {
            HandlerAnswer::Retry(Retryable::new(
                format!(
                    "the handler answered {status} with Durin-Suspended: true, but no wait suspended attempt {}: a handler stops so only after a context call answered 409 with Durin-Suspended: true",
                    record.attempt
                ),
                Some("NotSuspended".into()),
            ))
        } else if status.is_success() && plain {
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
            // A problem document says what went wrong in its own words; anything else is
            // quoted.
            let (error_type, message) = problem_words(&body, content_type.as_deref())
                .unwrap_or_else(|| {
                    (
                        None,
                        format!("handler answered {status}: {}", snippet(&body)),
                    )
                });
            let failure = Failure {
                status: status.as_u16(),
                error_type,
                message,
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
    ///
    /// A heartbeat sent through this node is in memory. One sent through another node (on
    /// a store several nodes share) is only in the store, as the invocation's
    /// `heartbeat_at_ms`: when the attempt has been silent here for `limit`, the store is
    /// read (once per deadline, never per heartbeat), and a heartbeat recorded since the
    /// last read (heartbeats are fenced, so it is this attempt's) moves the deadline.
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
        let mut remote = RemoteHeartbeat::new(record.heartbeat_at_ms, started);
        loop {
            tokio::time::sleep(check).await;
            let here = self
                .heartbeats
                .last(&record.id, record.attempt)
                .unwrap_or(started);
            let last = remote.last.map_or(here, |there| there.max(here));
            if last.elapsed() < limit {
                continue;
            }
            let reading = tokio::time::Instant::now();
            let stored = match self.store.get_invocation(&record.id).await {
                Ok(Some(now)) if now.attempt == record.attempt && now.status == Status::Running => {
                    now.heartbeat_at_ms
                }
                // Ended or fenced meanwhile: its end will be refused anyway.
                Ok(_) => None,
                Err(error) => {
                    tracing::warn!(id = %record.id, %error, "could not read the last heartbeat from the store; counting only this node's");
                    None
                }
            };
            let now_ms = self.clock.now_ms();
            let there = remote.read(stored, reading, now_ms);
            let last = there.map_or(last, |there| there.max(last));
            let silent = last.elapsed();
            if silent >= limit {
                return silent;
            }
        }
    }
}

/// The heartbeats of an attempt that the store shows, as its watchdog has read them.
struct RemoteHeartbeat {
    /// `heartbeat_at_ms` as last read (at the start, from the claim: an earlier attempt's).
    seen_ms: Option<i64>,
    /// When the last read began: a heartbeat it did not see was recorded after.
    read_at: tokio::time::Instant,
    /// When this attempt's last heartbeat in the store was sent, on this node's clock.
    last: Option<tokio::time::Instant>,
}

impl RemoteHeartbeat {
    fn new(seen_ms: Option<i64>, started: tokio::time::Instant) -> RemoteHeartbeat {
        RemoteHeartbeat {
            seen_ms,
            read_at: started,
            last: None,
        }
    }

    /// A read that began at `reading` found `stored` (`now_ms` on the gateway's clock when
    /// it answered); returns when this attempt's last heartbeat in the store was sent.
    /// A value other than the one seen last is a heartbeat recorded since that read, by
    /// this attempt; its time is `heartbeat_at_ms` (another node's clock), kept between that
    /// read and now so that a skewed clock cannot stretch the deadline further.
    fn read(
        &mut self,
        stored: Option<i64>,
        reading: tokio::time::Instant,
        now_ms: i64,
    ) -> Option<tokio::time::Instant> {
        if let Some(at_ms) = stored.filter(|at| Some(*at) != self.seen_ms) {
            let now = tokio::time::Instant::now();
            let age = std::time::Duration::from_millis(now_ms.saturating_sub(at_ms).max(0) as u64);
            let sent = now.checked_sub(age).unwrap_or(self.read_at);
            self.last = Some(sent.clamp(self.read_at, now));
            self.seen_ms = Some(at_ms);
        }
        self.read_at = reading;
        self.last
    }
}

/// A journal entry as a handler receives it: completions attached, an awakeable with its
/// token (computed here, never stored).
/// Whether a handler answered a streamed attempt with a stream (it may answer a plain
/// outcome, or an error, instead).
fn is_stream(response: &reqwest::Response) -> bool {
    response.status().is_success()
        && response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with(STREAM_CONTENT_TYPE))
}

fn wire_entry(engine: &Engine, id: &InvocationId, entry: StoredEntry) -> JournalEntry {
    let value = match entry.kind {
        EntryKind::Awakeable => Some(engine.awakeable_shown(id, &entry)),
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

/// The `type` (unless `about:blank`) and the `detail` (or else the `title`) of a handler's
/// answer that is a JSON problem document, as a failure's type and message.
fn problem_words(body: &[u8], content_type: Option<&str>) -> Option<(Option<String>, String)> {
    let json = content_type.is_some_and(|t| {
        let t = t.trim().to_ascii_lowercase();
        t.starts_with("application/problem+json") || t.starts_with("application/json")
    });
    if !json {
        return None;
    }
    let problem: serde_json::Value = serde_json::from_slice(body).ok()?;
    let text = |field: &str| {
        problem[field]
            .as_str()
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
    };
    let message = text("detail").or_else(|| text("title"))?;
    let error_type = text("type").filter(|t| t != "about:blank");
    Some((error_type, message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::time::Instant;

    /// What the watchdog takes from the store: only a heartbeat recorded since its last
    /// read (not the earlier attempt's it was claimed with), dated by its timestamp but
    /// never before the read that missed it nor after now, whatever the other clock says.
    #[test]
    fn a_heartbeat_in_the_store_counts_from_when_it_was_sent() {
        let ago = |secs| {
            Instant::now()
                .checked_sub(Duration::from_secs(secs))
                .unwrap_or_else(Instant::now)
        };
        let mut remote = RemoteHeartbeat::new(Some(1_000), ago(20));
        // Reads that began 10 s ago found the earlier attempt's heartbeat, or none.
        assert_eq!(remote.read(Some(1_000), ago(10), 50_000), None);
        assert_eq!(remote.read(None, ago(10), 50_000), None);

        // Recorded 2 s ago by the gateway's clock.
        let sent = remote.read(Some(48_000), Instant::now(), 50_000);
        let age = sent.map(|sent| sent.elapsed()).unwrap_or_default();
        assert!(
            age >= Duration::from_secs(2) && age < Duration::from_secs(3),
            "{age:?}"
        );
        // The same value again moves nothing.
        let before = ago(5);
        assert_eq!(remote.read(Some(48_000), before, 90_000), sent);
        // Recorded by a node whose clock is far behind: not before the read that missed it.
        let sent = remote.read(Some(2_000), Instant::now(), 90_000);
        assert_eq!(sent, Some(before));
        // Far ahead: now, not later.
        let sent = remote.read(Some(999_000), Instant::now(), 90_000);
        assert!(sent.is_some_and(|sent| sent.elapsed() < Duration::from_secs(1)));
    }

    #[test]
    fn a_problem_document_gives_its_type_and_detail() {
        let problem = br#"{"type": "urn:shop:out-of-stock", "title": "Out of stock", "detail": "no more red shoes"}"#;
        assert_eq!(
            problem_words(problem, Some("application/problem+json")),
            Some((
                Some("urn:shop:out-of-stock".into()),
                "no more red shoes".into()
            ))
        );
        let title_only = br#"{"type": "about:blank", "title": "not a valid thing"}"#;
        assert_eq!(
            problem_words(title_only, Some("application/json; charset=utf-8")),
            Some((None, "not a valid thing".into()))
        );
        assert_eq!(problem_words(b"plain words", Some("text/plain")), None);
        assert_eq!(
            problem_words(br#"{"x": 1}"#, Some("application/json")),
            None
        );
        assert_eq!(
            problem_words(b"{oops", Some("application/problem+json")),
            None
        );
    }
}
