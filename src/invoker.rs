//! Runs attempts: calls handlers, turns their answers into attempt ends, schedules the next.
//!
//! One driver task per unfinished invocation (at most one per process, see `active`). A
//! driver waits until the invocation is due, starts an attempt in the store (which fences
//! every earlier attempt), calls the handler with its journal, decides how the attempt ended
//! (retry policy, timeouts, suspension, non-determinism) and records that end in the store.
//! The invoker never writes storage except through the store's fenced methods.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use durin_protocol::{
    EntryKind, Failure, InvocationRequest, JournalEntry, Outcome, RetryPolicy, HEADER_ATTEMPT,
    HEADER_ATTEMPT_TOKEN, HEADER_INVOCATION_ID, HEADER_PROTOCOL, PROTOCOL_VERSION,
};
use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::Clock;
use crate::egress::EgressCalls;
use crate::ids::InvocationId;
use crate::registry::Targets;
use crate::store::{
    AttemptEnd, HandlerProtocol, HandlerTarget, InvocationRecord, Status, Store, StoreError,
    StoredEntry,
};

/// The longest answer a handler may give, so that a runaway handler cannot exhaust memory.
const MAX_HANDLER_RESPONSE_BYTES: usize = 16 * 1024 * 1024;
/// How long a driver waits before trying again after the store failed.
const STORE_RETRY_MS: i64 = 1_000;
/// The longest delay a handler can ask for (`Retry-After`, a step's backoff, a suspension).
const MAX_DELAY: Duration = Duration::from_secs(366 * 24 * 60 * 60);

/// `now + delay`, with the delay capped at [`MAX_DELAY`].
fn after(now_ms: i64, delay: Duration) -> i64 {
    now_ms.saturating_add(delay.min(MAX_DELAY).as_millis() as i64)
}

pub struct InvokerConfig {
    /// Base URL of this gateway as handlers reach it (for the context API).
    pub advertised_url: String,
    pub default_retry_policy: RetryPolicy,
    pub default_start_to_close: Duration,
}

pub struct Invoker {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    http: reqwest::Client,
    config: InvokerConfig,
    /// Invocations that have a driver in this process; guards against two drivers racing
    /// (they would fence each other, wasting attempts). The flag is set when someone asked
    /// for the invocation to run while its driver was busy, so that it looks again before
    /// it leaves.
    active: Mutex<HashMap<InvocationId, bool>>,
    completions: Completions,
    targets: Arc<Targets>,
    egress_calls: Arc<EgressCalls>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

/// What a driver does after an attempt.
enum Next {
    RunAt(i64),
    Stop,
}

/// How a driver begins.
enum Start {
    /// Start an attempt at this time (now when `None`).
    At(Option<i64>),
    /// The store already started attempt 1; here are its record and journal.
    Started(Box<InvocationRecord>, Vec<StoredEntry>),
}

impl Invoker {
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        config: InvokerConfig,
        targets: Arc<Targets>,
        egress_calls: Arc<EgressCalls>,
        shutdown: CancellationToken,
    ) -> Invoker {
        Invoker {
            store,
            clock,
            http: reqwest::Client::builder()
                .pool_idle_timeout(Duration::from_secs(30))
                .build()
                .unwrap_or_default(),
            config,
            active: Mutex::new(HashMap::new()),
            completions: Completions::default(),
            targets,
            egress_calls,
            tracker: TaskTracker::new(),
            shutdown,
        }
    }

    pub fn completions(&self) -> &Completions {
        &self.completions
    }

    /// Makes sure a driver runs the invocation, first at `run_at_ms` (now when `None`).
    pub fn drive(self: &Arc<Self>, id: InvocationId, run_at_ms: Option<i64>) {
        self.spawn_driver(id, Start::At(run_at_ms));
    }

    /// Runs the first attempt of an invocation the store created already started (attempt
    /// 1, running), with its journal in hand, so that it costs no further read or write.
    pub fn drive_started(self: &Arc<Self>, record: InvocationRecord, journal: Vec<StoredEntry>) {
        self.spawn_driver(record.id.clone(), Start::Started(Box::new(record), journal));
    }

    fn spawn_driver(self: &Arc<Self>, id: InvocationId, start: Start) {
        // During a shutdown the invocation stays as it is in the store; the next start
        // recovers it.
        if self.shutdown.is_cancelled() {
            return;
        }
        {
            let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(asked_again) = active.get_mut(&id) {
                *asked_again = true;
                return;
            }
            active.insert(id.clone(), false);
        }
        let invoker = Arc::clone(self);
        self.tracker
            .spawn(async move { invoker.run_driver(id, start).await });
    }

    /// Drivers of every invocation that had not finished when the gateway last stopped.
    pub async fn recover(self: &Arc<Self>) -> Result<usize, StoreError> {
        let resumable = self.store.list_resumable().await?;
        let count = resumable.len();
        for record in resumable {
            let run_at = match record.status {
                Status::BackingOff | Status::Suspended | Status::Pending => record.next_run_at_ms,
                _ => None,
            };
            self.drive(record.id, run_at);
        }
        Ok(count)
    }

    /// Waits for drivers in the middle of an attempt to finish it, at most `timeout`.
    /// Sleeping drivers stop at once; what is left is recovered at the next start.
    pub async fn drain(&self, timeout: Duration) {
        self.tracker.close();
        if tokio::time::timeout(timeout, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = self.tracker.len(),
                "drain timed out; unfinished attempts resume at the next start"
            );
        }
    }

    async fn run_driver(self: Arc<Self>, id: InvocationId, start: Start) {
        let mut next = match start {
            Start::At(at) => Next::RunAt(at.unwrap_or(i64::MIN)),
            Start::Started(record, journal) => self.run_started_attempt(*record, journal).await,
        };
        loop {
            while let Next::RunAt(at) = next {
                let wait = at.saturating_sub(self.clock.now_ms());
                if wait > 0 {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(wait as u64)) => {}
                        _ = self.shutdown.cancelled() => {}
                    }
                }
                if self.shutdown.is_cancelled() {
                    break;
                }
                next = self.run_attempt(&id).await;
            }
            // Leave, unless the invocation was asked to run meanwhile (a resume while this
            // driver was finishing): then look once more.
            let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
            match active.get_mut(&id) {
                Some(asked_again) if *asked_again && !self.shutdown.is_cancelled() => {
                    *asked_again = false;
                    next = Next::RunAt(self.clock.now_ms());
                }
                _ => {
                    active.remove(&id);
                    return;
                }
            }
        }
    }

    /// Starts the next attempt in the store, then runs it.
    async fn run_attempt(&self, id: &InvocationId) -> Next {
        let record = match self.store.start_attempt(id, self.clock.now_ms()).await {
            Ok(Some(record)) => record,
            Ok(None) => return Next::Stop,
            Err(error) => {
                tracing::error!(%id, %error, "could not start an attempt");
                return Next::RunAt(self.clock.now_ms() + STORE_RETRY_MS);
            }
        };
        let journal = match self.store.read_journal(id).await {
            Ok(journal) => journal,
            Err(error) => {
                tracing::error!(%id, %error, "could not read the journal");
                return Next::RunAt(self.clock.now_ms() + STORE_RETRY_MS);
            }
        };
        self.run_started_attempt(record, journal).await
    }

    /// Calls the handler for an attempt the store has started and records how it ended.
    async fn run_started_attempt(
        &self,
        record: InvocationRecord,
        journal: Vec<StoredEntry>,
    ) -> Next {
        let id = &record.id;
        let end = self.call(&record, journal).await;
        // The handler has answered (or given up): its egress calls are over.
        self.egress_calls.forget(id, record.attempt);
        let end = match end {
            Ok(end) => end,
            Err(error) => {
                tracing::error!(%id, %error, "store failed during an attempt");
                return Next::RunAt(self.clock.now_ms() + STORE_RETRY_MS);
            }
        };
        if let AttemptEnd::BackOff { error, .. } = &end {
            tracing::info!(%id, attempt = record.attempt, %error, "attempt failed; backing off");
        }
        match self
            .store
            .end_attempt(id, record.attempt, end, self.clock.now_ms())
            .await
        {
            Ok((ended, output)) => {
                if ended.status.is_final() {
                    self.egress_calls.remove(id);
                }
                if ended.status.is_final() || ended.status == Status::Paused {
                    self.completions.finish(Arc::new(Ended {
                        record: ended,
                        output,
                    }));
                    Next::Stop
                } else {
                    Next::RunAt(ended.next_run_at_ms.unwrap_or_else(|| self.clock.now_ms()))
                }
            }
            // The invocation changed under this attempt (a newer attempt, a pause, and maybe
            // a resume since): look again. Starting an attempt only succeeds if it is due.
            Err(StoreError::Fenced { .. }) => Next::RunAt(self.clock.now_ms()),
            Err(error) => {
                tracing::error!(%id, %error, "could not record the end of an attempt");
                Next::RunAt(self.clock.now_ms() + STORE_RETRY_MS)
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
            HandlerProtocol::Sdk => self
                .http
                .post(&endpoint)
                .header(HEADER_PROTOCOL, PROTOCOL_VERSION)
                .json(&InvocationRequest {
                    protocol: PROTOCOL_VERSION,
                    invocation_id: record.id.to_string(),
                    attempt: record.attempt,
                    attempt_token: record.attempt_token.clone().unwrap_or_default(),
                    service: record.service.clone(),
                    handler: record.handler.clone(),
                    input: json_value(input.value.as_deref()),
                    journal: entries.map(wire_entry).collect(),
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
            Outcome::Suspend { wake_at_ms } => AttemptEnd::Suspended {
                until_ms: wake_at_ms.min(after(now, MAX_DELAY)),
            },
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

/// `Retry-After` as delay-seconds or as an HTTP date (RFC 9110 §10.2.3).
pub(crate) fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

fn describe(kind: EntryKind, name: Option<&str>) -> String {
    match name {
        Some(name) => format!("{} {name:?}", kind.as_str()),
        None => kind.as_str().to_owned(),
    }
}

/// A stored value as JSON: JSON stays JSON, anything else becomes a string.
pub fn json_value(bytes: Option<&[u8]>) -> Value {
    match bytes {
        None => Value::Null,
        Some([]) => Value::Null,
        Some(bytes) => serde_json::from_slice(bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned())),
    }
}

fn wire_entry(entry: StoredEntry) -> JournalEntry {
    JournalEntry {
        index: entry.index,
        kind: entry.kind,
        name: entry.name,
        value: entry.value.as_deref().map(|v| json_value(Some(v))),
        failure: entry.failure,
        attempt: entry.attempt,
        at_ms: entry.at_ms,
    }
}

fn snippet(body: &[u8]) -> String {
    const MAX: usize = 200;
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX)]).into_owned();
    if body.len() > MAX {
        format!("{text}…")
    } else if text.is_empty() {
        "(empty body)".into()
    } else {
        text
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// Reads a response body, refusing one larger than `limit`.
pub(crate) async fn read_limited(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| error_chain(&e))? {
        if body.len() + chunk.len() > limit {
            return Err(format!("the answer is larger than {limit} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// An invocation that ended (or paused), as its waiters receive it.
#[derive(Debug)]
pub struct Ended {
    pub record: InvocationRecord,
    /// The output entry, when the invocation completed or failed.
    pub output: Option<StoredEntry>,
}

/// Hands ended invocations to the callers waiting for them in this process.
#[derive(Default)]
pub struct Completions {
    waiters: Mutex<HashMap<InvocationId, watch::Sender<Option<Arc<Ended>>>>>,
}

impl Completions {
    /// A receiver that gets the invocation when it ends. Take it before checking the store
    /// (or before starting the invocation), so that an end in between is not missed.
    pub fn listener(&self, id: &InvocationId) -> watch::Receiver<Option<Arc<Ended>>> {
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        waiters
            .entry(id.clone())
            .or_insert_with(|| watch::channel(None).0)
            .subscribe()
    }

    /// Drops the sender of `id` if no waiter listens any more.
    pub fn release(&self, id: &InvocationId) {
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        if waiters.get(id).is_some_and(|s| s.receiver_count() == 0) {
            waiters.remove(id);
        }
    }

    pub fn finish(&self, ended: Arc<Ended>) {
        let sender = self
            .waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&ended.record.id);
        if let Some(sender) = sender {
            sender.send_replace(Some(ended));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_released_listener_leaves_nothing_behind_unless_someone_waits() {
        let completions = Completions::default();
        let id = InvocationId::generate();
        let first = completions.listener(&id);
        let second = completions.listener(&id);
        drop(first);
        completions.release(&id);
        assert_eq!(
            completions.waiters.lock().unwrap().len(),
            1,
            "second still waits"
        );
        drop(second);
        completions.release(&id);
        assert!(completions.waiters.lock().unwrap().is_empty());
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        assert_eq!(parse_retry_after(" 7 "), Some(Duration::from_secs(7)));
        let later = std::time::SystemTime::now() + Duration::from_secs(120);
        let delay = parse_retry_after(&httpdate::fmt_http_date(later)).unwrap();
        assert!(delay > Duration::from_secs(100) && delay <= Duration::from_secs(120));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
