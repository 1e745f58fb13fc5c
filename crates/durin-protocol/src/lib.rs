//! Wire types of the Durin handler protocol, version 6 (versions 1 to 5 are still spoken).
//!
//! The gateway and every SDK speak this protocol, so it lives in its own crate with no
//! dependency on either side. ARCHITECTURE.md describes the exchange in prose; this file is
//! the exact shape of every message. All bodies are JSON.
//!
//! 1. Discovery: `GET {deployment}/discover` answers [`Discovery`].
//! 2. Invocation: the gateway sends `POST {deployment}{handler path}` with an
//!    [`InvocationRequest`] and the headers [`HEADER_INVOCATION_ID`], [`HEADER_ATTEMPT`] and
//!    [`HEADER_PROTOCOL`].
//! 3. During the attempt the handler appends entries with `POST {context_url}/entries`
//!    ([`AppendRequest`], header [`HEADER_ATTEMPT`]); each one is durable before it is
//!    acknowledged with an [`AppendResponse`].
//! 4. The handler ends the attempt by answering `200` with an [`Outcome`].
//!
//! Version 2 adds commands whose result arrives later (a durable timer, a wait for a
//! signal, an awakeable) and durable state. A command is an entry the handler appends; its
//! result is a [`Completion`], stored by the gateway when it arrives (possibly while no
//! attempt runs) and delivered on the entry in the next invocation request. A handler that
//! needs a result that has not arrived ends the attempt with [`Outcome::Suspend`], naming
//! the entries it waits for. Version 3 adds cancellation: a `cancel` entry the gateway
//! writes, which the handler's next await receives as a terminal `Cancelled` error.
//! Version 4 adds replay: a request marked [`InvocationRequest::replay`] is answered from
//! its journal alone, and where the handler would go beyond it (run a step, append
//! anything) it ends with [`Outcome::ReplayEnd`] instead, so that a recorded history can be
//! replayed against new code with no side effect.
//! Version 5 lets the entries a handler recorded after its last wait travel with its
//! output or terminal failure ([`Outcome::Output::entries`]): the gateway appends them and
//! records the end in one transaction, which saves the handler an exchange and the gateway
//! a commit per invocation.
//! Version 6 streams the attempt ([`STREAM_VERSION`]): one exchange, both of whose bodies
//! stream at once (HTTP/1.1 chunked both ways), carries the invocation request, every append and its acknowledgement, and the outcome, as
//! newline-delimited JSON frames ([`HandlerFrame`], [`GatewayFrame`]), instead of an
//! exchange per append. The gateway streams when the deployment speaks version 6; a
//! request in plain JSON (a replay) is still answered as before.
//! The version is negotiated: the deployment's discovery document
//! says which version it speaks, and the gateway speaks every version from
//! [`MIN_PROTOCOL_VERSION`] to [`PROTOCOL_VERSION`].

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The protocol version this crate describes.
pub const PROTOCOL_VERSION: u32 = 6;
/// The first version that can replay a history without side effects.
pub const REPLAY_PROTOCOL_VERSION: u32 = 4;
/// The first version whose outcomes may carry entries ([`Outcome::Output::entries`]).
pub const TRAILING_ENTRIES_VERSION: u32 = 5;
/// The first version whose attempts are streamed (see [`HandlerFrame`]).
pub const STREAM_VERSION: u32 = 6;
/// The content type of both directions of a streamed attempt: one JSON document per line.
pub const STREAM_CONTENT_TYPE: &str = "application/x-ndjson";
/// The oldest version the gateway still speaks.
pub const MIN_PROTOCOL_VERSION: u32 = 1;
/// Header naming the invocation an attempt belongs to (`inv_…`).
pub const HEADER_INVOCATION_ID: &str = "durin-invocation-id";
/// Header carrying the attempt number, the fencing token of every append.
pub const HEADER_ATTEMPT: &str = "durin-attempt";
/// Header carrying the attempt's secret token: Durin sends it with every invocation, and
/// appends through the context API must present it.
pub const HEADER_ATTEMPT_TOKEN: &str = "durin-attempt-token";
/// Header `true` on a request to a plain handler whose invocation was cancelled: its waits
/// answer the `cancelled` problem; it compensates and answers a `4xx` to end cancelled.
pub const HEADER_CANCELLED: &str = "durin-cancelled";
/// Header `true` on a request by which Durin replays a recording (`POST /v1/replays`, a
/// verified registration): whatever the handler asks for is answered from the recording,
/// and what the recording lacks is refused, never done; work the handler does on its own
/// (not through Durin) should be skipped.
pub const HEADER_REPLAY: &str = "durin-replay";
/// Header carrying the protocol version on an invocation request.
pub const HEADER_PROTOCOL: &str = "durin-protocol";
/// Header naming the workflow id of a run started as a workflow
/// (`POST /v1/workflows/{workflow}/{id}`); absent for other invocations.
pub const HEADER_WORKFLOW_ID: &str = "durin-workflow-id";
/// Header by which Durin signs each request it sends to a handler:
/// `t=<ms since the epoch>,v3=<base64url Ed25519 signature>` over [`signed_message`].
/// Versions 1 and 2, which listed a fixed set of headers (version 2 could not cover
/// `Durin-Workflow-Id`), are no longer sent: a verifier that looks for them refuses every
/// request rather than accept one whose unsigned headers were changed.
pub const HEADER_SIGNATURE: &str = "durin-signature";
/// The field of [`HEADER_SIGNATURE`] that carries the signature: its version.
pub const SIGNATURE_VERSION: &str = "v3";

/// The `Durin-*` headers Durin sends to a handler, besides the signature.
pub const SIGNED_HEADERS: [&str; 7] = [
    HEADER_INVOCATION_ID,
    HEADER_ATTEMPT,
    HEADER_ATTEMPT_TOKEN,
    HEADER_CANCELLED,
    HEADER_PROTOCOL,
    HEADER_REPLAY,
    HEADER_WORKFLOW_ID,
];

/// The values of the [`SIGNED_HEADERS`] of a request Durin sends, empty for a header it
/// does not carry (a plain handler gets no `Durin-Protocol`, `Durin-Cancelled` only once
/// its invocation was cancelled, `Durin-Workflow-Id` only for a workflow's run). Durin
/// sends exactly the non-empty ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SignedHeaders<'a> {
    pub invocation_id: &'a str,
    pub attempt: &'a str,
    pub attempt_token: &'a str,
    pub cancelled: &'a str,
    pub protocol: &'a str,
    pub replay: &'a str,
    pub workflow_id: &'a str,
}

impl<'a> SignedHeaders<'a> {
    /// The headers a request carries, each with its value: the non-empty ones, in the
    /// order of [`SIGNED_HEADERS`].
    pub fn carried(&self) -> Vec<(&'static str, &'a str)> {
        [
            (HEADER_INVOCATION_ID, self.invocation_id),
            (HEADER_ATTEMPT, self.attempt),
            (HEADER_ATTEMPT_TOKEN, self.attempt_token),
            (HEADER_CANCELLED, self.cancelled),
            (HEADER_PROTOCOL, self.protocol),
            (HEADER_REPLAY, self.replay),
            (HEADER_WORKFLOW_ID, self.workflow_id),
        ]
        .into_iter()
        .filter(|(_, value)| !value.is_empty())
        .collect()
    }
}

/// What Durin's signature (version 3) of a request to a handler covers: the time it
/// signed, the request's path, **every `Durin-*` header the request carries** except the
/// signature (`headers`: lower-case names with their values, one `name:value` line each,
/// sorted by name) and the body. None of them can be changed, added or removed (a
/// replayed request cannot be turned into a cancellation, given another attempt's token
/// or another workflow id), nor the request sent to another path. The host and other
/// headers are not covered. The bytes are
///
/// ```text
/// durin-signature-v3\n{t}\n{path}\n
/// {name}:{value}\n      for each Durin-* header, sorted by name
/// {body}
/// ```
///
/// A verifier passes every `Durin-*` header it received (refusing one received twice),
/// whatever its name, so a header added on the way fails the check.
pub fn signed_message(
    timestamp_ms: i64,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Vec<u8> {
    let mut sorted: Vec<(&str, &str)> = headers.to_vec();
    sorted.sort_unstable();
    let mut message = format!("durin-signature-v3\n{timestamp_ms}\n{path}\n");
    for (name, value) in sorted {
        message.push_str(name);
        message.push(':');
        message.push_str(value);
        message.push('\n');
    }
    let mut message = message.into_bytes();
    message.extend_from_slice(body);
    message
}

/// Set (to `true`) on an answer of the context API or the egress that comes from the journal.
pub const HEADER_REPLAYED: &str = "durin-replayed";
/// Set (to `true`) on the context API's answer when the call suspended the attempt: a plain
/// handler must stop (whatever it answers is ignored); it runs again, from the top, when
/// what it waits for has arrived.
pub const HEADER_SUSPENDED: &str = "durin-suspended";

/// What `GET /discover` answers: the services a deployment serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Discovery {
    /// Protocol version the deployment speaks; the gateway refuses versions it does not know.
    pub protocol: u32,
    pub services: Vec<ServiceSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub name: String,
    #[serde(default)]
    pub kind: ServiceKind,
    pub handlers: Vec<HandlerSpec>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceKind {
    /// A plain call with no key.
    #[default]
    Service,
    /// Runs once per workflow id.
    Workflow,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HandlerSpec {
    pub name: String,
    /// Path under the deployment URL; defaults to `/{service}/{handler}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Retry policy of the handler's attempts; the gateway's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_policy: Option<RetryPolicy>,
    /// Bound on one attempt; the gateway's default when absent.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub start_to_close: Option<Duration>,
    /// Bound on the whole invocation, every attempt and wait included, from its creation
    /// (a workflow run's execution timeout); the gateway's default when absent.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub schedule_to_close: Option<Duration>,
    /// Bound on how late an attempt may start after it was due; the gateway's default
    /// when absent.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub schedule_to_start: Option<Duration>,
    /// An attempt that sends no heartbeat for this long is ended (far sooner than
    /// `start_to_close` for a handler that hangs); none when absent.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub heartbeat_timeout: Option<Duration>,
    /// Makes the handler keyed: invocations with the same key run at most `limit` at a
    /// time (one by default), the others wait their turn, durably, in arrival order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<KeySpec>,
}

/// Where a keyed handler's key is read, and how many invocations of one key may run at
/// once. Exactly one of `header` and `pointer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySpec {
    /// A request header that carries the key (`POST /v1/call` and `/v1/send` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// A JSON pointer (RFC 6901) into the JSON input, naming a string or a number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pointer: Option<String>,
    /// How many invocations of one key may run at once (1: one at a time).
    #[serde(default = "KeySpec::one")]
    pub limit: u32,
    /// A shared (read-only) handler: its invocations read the key's state and never wait
    /// for the key, nor hold it; what they set stays their own.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared: bool,
    /// Debounce: an invocation of the key waits this long before it starts, and a newer
    /// one of the key that comes meanwhile replaces it (the last of a burst runs).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub debounce: Option<Duration>,
    /// The longest a burst of a debounced key may put off its run: a newer invocation of
    /// the burst starts at the latest this long after the burst's first (Inngest's debounce
    /// timeout); no bound when absent.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub debounce_max: Option<Duration>,
    /// A rate limit per key: at most `rate.limit` invocations of this handler with one key
    /// start in any `rate.period`; the others wait, durably, in the order they took their
    /// places.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<KeyRate>,
}

/// How many invocations of one key may start in any period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRate {
    /// How many starts in any `period`.
    pub limit: u32,
    /// The period, 1 ms to a day.
    #[serde(with = "humantime_serde")]
    pub period: Duration,
}

/// The longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 256;
/// The largest `limit` of a keyed handler.
pub const MAX_KEY_LIMIT: u32 = 1000;
/// The longest `debounce` (and `debounce_max`) of a keyed handler.
pub const MAX_DEBOUNCE: Duration = Duration::from_secs(24 * 3600);
/// The most starts a key's `rate` allows in its period.
pub const MAX_RATE_LIMIT: u32 = 1000;
/// The longest period of a key's `rate`.
pub const MAX_RATE_PERIOD: Duration = Duration::from_secs(24 * 3600);

impl KeySpec {
    fn one() -> u32 {
        1
    }

    /// Invocations of one key run one at a time; the key is read at `pointer` in the input.
    pub fn pointer(pointer: impl Into<String>) -> KeySpec {
        KeySpec {
            header: None,
            pointer: Some(pointer.into()),
            limit: 1,
            shared: false,
            debounce: None,
            debounce_max: None,
            rate: None,
        }
    }

    /// Invocations of one key run one at a time; the key is read in the request `header`.
    pub fn header(header: impl Into<String>) -> KeySpec {
        KeySpec {
            header: Some(header.into()),
            pointer: None,
            limit: 1,
            shared: false,
            debounce: None,
            debounce_max: None,
            rate: None,
        }
    }

    /// At most `limit` invocations of one key at once.
    pub fn limit(self, limit: u32) -> KeySpec {
        KeySpec { limit, ..self }
    }

    /// A shared (read-only) handler of the key: it reads the key's state beside the
    /// holders, never waiting.
    pub fn shared(self) -> KeySpec {
        KeySpec {
            shared: true,
            ..self
        }
    }

    /// Debounced by `period`: the last invocation of a burst of the key runs.
    pub fn debounce(self, period: Duration) -> KeySpec {
        KeySpec {
            debounce: Some(period),
            ..self
        }
    }

    /// Debounced by `period`, a burst putting its run off by `max` at most.
    pub fn debounce_max(self, period: Duration, max: Duration) -> KeySpec {
        KeySpec {
            debounce: Some(period),
            debounce_max: Some(max),
            ..self
        }
    }

    /// At most `limit` starts of one key in any `period`.
    pub fn rate(self, limit: u32, period: Duration) -> KeySpec {
        KeySpec {
            rate: Some(KeyRate { limit, period }),
            ..self
        }
    }

    /// What is wrong with it, if anything.
    pub fn validate(&self) -> Result<(), String> {
        match (self.debounce, self.debounce_max) {
            (None, Some(_)) => {
                return Err("key.debounce_max bounds a debounce: give key.debounce".into())
            }
            (Some(period), Some(max)) if max < period || max > MAX_DEBOUNCE => {
                return Err(format!(
                    "key.debounce_max {max:?} is outside key.debounce ({period:?})..=1d"
                ))
            }
            _ => {}
        }
        if let Some(rate) = self.rate {
            if !(1..=MAX_RATE_LIMIT).contains(&rate.limit) {
                return Err(format!(
                    "key.rate.limit {} is outside 1..={MAX_RATE_LIMIT}",
                    rate.limit
                ));
            }
            if rate.period < Duration::from_millis(1) || rate.period > MAX_RATE_PERIOD {
                return Err(format!(
                    "key.rate.period {:?} is outside 1ms..=1d",
                    rate.period
                ));
            }
            if self.shared {
                return Err("key.rate is for handlers that hold the key, not shared ones".into());
            }
        }
        if let Some(period) = self.debounce {
            if period < Duration::from_millis(1) || period > MAX_DEBOUNCE {
                return Err(format!("key.debounce {period:?} is outside 1ms..=1d"));
            }
            if self.shared {
                return Err(
                    "key.debounce is for handlers that hold the key, not shared ones".into(),
                );
            }
        }
        match (&self.header, &self.pointer) {
            (Some(header), None) => {
                let valid = !header.is_empty()
                    && header
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
                if !valid {
                    return Err(format!("key.header {header:?} is not a header name"));
                }
            }
            (None, Some(pointer)) => {
                if !pointer.starts_with('/') {
                    return Err(format!(
                        "key.pointer {pointer:?} is not a JSON pointer (it starts with '/')"
                    ));
                }
            }
            _ => return Err("key names exactly one of header and pointer".into()),
        }
        if !(1..=MAX_KEY_LIMIT).contains(&self.limit) {
            return Err(format!(
                "key.limit {} is outside 1..={MAX_KEY_LIMIT}",
                self.limit
            ));
        }
        Ok(())
    }

    /// The key of a request: read in its header (by `header`, which gives a header's
    /// value) or in its JSON input. `Err` says why the request has none.
    pub fn key_of<'a>(
        &self,
        header: impl FnOnce(&str) -> Option<&'a [u8]>,
        input: &[u8],
    ) -> Result<String, String> {
        let key = if let Some(name) = &self.header {
            let value = header(name).ok_or_else(|| format!("the key header {name} is missing"))?;
            std::str::from_utf8(value)
                .map_err(|_| format!("the key header {name} is not UTF-8"))?
                .to_owned()
        } else {
            let pointer = self.pointer.as_deref().unwrap_or_default();
            let input: serde_json::Value = serde_json::from_slice(input)
                .map_err(|e| format!("the key is read at {pointer} in a JSON input: {e}"))?;
            match input.pointer(pointer) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Number(n)) => n.to_string(),
                Some(other) => {
                    return Err(format!(
                        "the key at {pointer} in the input is {other}, not a string or a number"
                    ))
                }
                None => return Err(format!("the input has no key at {pointer}")),
            }
        };
        if key.is_empty() || key.len() > MAX_KEY_BYTES {
            return Err(format!(
                "the key is {} bytes; a key has 1 to {MAX_KEY_BYTES}",
                key.len()
            ));
        }
        Ok(key)
    }
}

/// When and how often a failed attempt (of a handler or of one step) is tried again.
///
/// The delay before retry `n` (1-based) is `initial_interval * backoff_coefficient^(n-1)`,
/// capped at `maximum_interval`. `maximum_attempts` counts every attempt, the first included;
/// `None` retries forever.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RetryPolicy {
    #[serde(with = "humantime_serde")]
    pub initial_interval: Duration,
    pub backoff_coefficient: f64,
    #[serde(with = "humantime_serde")]
    pub maximum_interval: Duration,
    pub maximum_attempts: Option<u32>,
    pub non_retryable_error_types: Vec<String>,
}

impl Default for RetryPolicy {
    /// Temporal's defaults, which users of durable execution already know, except that the
    /// number of attempts is bounded so that a broken handler ends instead of looping forever.
    fn default() -> Self {
        RetryPolicy {
            initial_interval: Duration::from_secs(1),
            backoff_coefficient: 2.0,
            maximum_interval: Duration::from_secs(100),
            maximum_attempts: Some(10),
            non_retryable_error_types: Vec::new(),
        }
    }
}

impl RetryPolicy {
    /// The delay after `failed_attempts` failures, or `None` when no attempt is left or
    /// the error type is not retryable.
    pub fn next_delay(&self, failed_attempts: u32, error_type: Option<&str>) -> Option<Duration> {
        if let Some(error_type) = error_type {
            if self
                .non_retryable_error_types
                .iter()
                .any(|t| t == error_type)
            {
                return None;
            }
        }
        if let Some(max) = self.maximum_attempts {
            if failed_attempts >= max {
                return None;
            }
        }
        let exponent = failed_attempts.saturating_sub(1).min(64) as i32;
        let factor = self.backoff_coefficient.max(1.0).powi(exponent);
        let millis = (self.initial_interval.as_millis() as f64 * factor)
            .min(self.maximum_interval.as_millis() as f64);
        Some(Duration::from_millis(millis.max(0.0) as u64))
    }

    /// Why [`RetryPolicy::next_delay`] gave up, in words for a failure message.
    pub fn exhausted_reason(&self, error_type: Option<&str>) -> String {
        match (error_type, self.maximum_attempts) {
            (Some(t), _) if self.non_retryable_error_types.iter().any(|n| n == t) => {
                format!("error type {t} is not retryable")
            }
            (_, Some(max)) => format!("all {max} attempts failed"),
            _ => "no attempt is left".to_owned(),
        }
    }

    /// Checks the values a user gave, so that a bad policy is refused where it is declared.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.backoff_coefficient >= 1.0 && self.backoff_coefficient.is_finite()) {
            return Err(format!(
                "backoff_coefficient must be a finite number >= 1, not {}",
                self.backoff_coefficient
            ));
        }
        if self.maximum_interval < self.initial_interval {
            return Err("maximum_interval must not be shorter than initial_interval".into());
        }
        if self.maximum_attempts == Some(0) {
            return Err("maximum_attempts must be at least 1".into());
        }
        Ok(())
    }
}

/// The body of the gateway's call to a handler.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InvocationRequest {
    pub protocol: u32,
    pub invocation_id: String,
    pub attempt: u32,
    /// The attempt's secret; every append sends it back in [`HEADER_ATTEMPT_TOKEN`].
    pub attempt_token: String,
    pub service: String,
    pub handler: String,
    /// The caller's JSON body.
    pub input: Value,
    /// Every entry recorded so far, after the input, in index order.
    pub journal: Vec<JournalEntry>,
    /// Attempts whose step failed since the journal last grew (a crash or a timeout counts
    /// for no step); the SDK uses it to count the attempts of the step that is failing.
    pub position_failures: u32,
    /// Base URL of this invocation's context API.
    pub context_url: String,
    /// Version 3, for a workflow's run: updates sent to it and not yet accepted or refused,
    /// oldest first. The SDK validates each at the run's next wait: it refuses one with
    /// `POST {context_url}/updates/{id}/refuse`, or accepts it with an `update` entry, runs
    /// its handler and appends an `update_result`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub updates: Vec<PendingUpdate>,
    /// Version 3: when the journal's last entry was recorded (ms since the epoch): the
    /// step after it has been trying since then, which bounds it by its own
    /// `schedule_to_close`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position_since_ms: Option<i64>,
    /// Version 3: the details of the last heartbeat of an earlier attempt, so that this one
    /// can skip the work that one had done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_details: Option<Value>,
    /// Version 3: the journal has passed 80 % of one of its limits; a workflow that loops
    /// should continue as new.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suggest_continue_as_new: bool,
    /// Version 4: replay only. The journal is a recording: the handler answers from it and
    /// does nothing new (no step runs, nothing is appended, no heartbeat is sent); where it
    /// would, it ends with [`Outcome::ReplayEnd`] naming what it would have done.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replay: bool,
    /// A keyed handler's invocation: its key's durable state as the invocations of the
    /// key that ended left it, read for each attempt (the same for every attempt when the
    /// key's limit is 1); the invocation adds its own `state` entries on top, and they
    /// become the key's when it ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_state: Option<serde_json::Map<String, Value>>,
}

/// What a child undergoes when its parent closes (ends), or is cancelled or terminated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParentClose {
    /// Terminated with its parent (a cancellation of the parent cancels it).
    Terminate,
    /// Cancelled with its parent: it runs its compensations (the default of a `call`).
    Cancel,
    /// Goes on alone (the default of a `send`).
    Abandon,
}

impl ParentClose {
    pub fn as_str(self) -> &'static str {
        match self {
            ParentClose::Terminate => "terminate",
            ParentClose::Cancel => "cancel",
            ParentClose::Abandon => "abandon",
        }
    }

    pub fn parse(s: &str) -> Option<ParentClose> {
        Some(match s {
            "terminate" => ParentClose::Terminate,
            "cancel" => ParentClose::Cancel,
            "abandon" => ParentClose::Abandon,
            _ => return None,
        })
    }
}

/// An update waiting for a workflow's run to accept or refuse it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingUpdate {
    /// `upd_` and 32 hex digits.
    pub id: String,
    pub name: String,
    pub input: Value,
}

/// One recorded entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalEntry {
    pub index: u32,
    pub kind: EntryKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
    pub attempt: u32,
    /// Milliseconds since the Unix epoch when the entry was recorded.
    pub at_ms: i64,
    /// The result of a command (`sleep`, `signal`, `awakeable`) once it has arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion: Option<Completion>,
}

/// The result of a command, which arrives after the command was journaled: a timer that
/// fired, the signal that a wait received, the value an awakeable was resolved with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// Order of arrival among the invocation's completions, from 1: when a handler waits
    /// for the first of several commands, the lowest `seq` won, on every replay.
    pub seq: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
    /// Milliseconds since the Unix epoch when it arrived.
    pub at_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// The caller's request; always index 0.
    Input,
    /// The result or the error of a named step.
    Step,
    /// A recorded clock reading (`value` is milliseconds since the epoch).
    Now,
    /// A recorded random UUID (`value` is its string form).
    Uuid,
    /// A recorded random 64-bit number (`value`).
    Random,
    /// An outbound call made through the egress, and its response. The gateway matches these
    /// itself (by method, URL, body digest and occurrence); SDKs skip them when replaying.
    Egress,
    /// The handler's result; written by the gateway when the invocation ends.
    Output,
    /// A durable timer (v2). Appended with `value` `{"duration_ms": N}` or
    /// `{"wake_at_ms": T}`; the gateway records `{"wake_at_ms": T}` (its own clock) and
    /// completes it at T.
    Sleep,
    /// A wait for the next signal named `name` (v2). Completed with the signal's payload;
    /// signals of one name are delivered in order, each to one wait.
    Signal,
    /// A callback from outside (v2). The gateway answers the append with
    /// `{"token", "resolve_url", "reject_url"}`; completed by a resolve or a reject.
    Awakeable,
    /// Durable state (v2): `name` is the key, `value` `{"set": V}` or `{"clear": true}`.
    /// Queries read it without calling the handler.
    State,
    /// A cancellation (v3), written by the gateway when someone cancelled the invocation;
    /// its completion's `seq` orders it among the other completions. The handler's next
    /// await at or after it (a command it asks for at this index, or a wait for commands
    /// none of which completed before it) fails once with a terminal `Cancelled` error;
    /// what the handler does after that (compensations) is journaled as usual.
    Cancel,
    /// A call of another handler whose result the handler waits for (v3): appended with
    /// `name` `"service/handler"` and `value` `{"input": V}`; the gateway starts the child
    /// invocation in the same transaction, records `{"invocation_id"}` and completes the
    /// entry with the child's output (or failure) when it ends.
    Call,
    /// A one-way start of another handler (v3): like `call` with an optional
    /// `"delay_ms"` (a durable scheduled start), and no completion.
    Send,
    /// A patch marker (v3), `name` the patch: appended the first time code that asks
    /// whether the patch applies runs live. A replay that finds it knows the run took the
    /// new code; one that does not find it (a journal recorded before the patch) takes the
    /// old branch.
    Patch,
    /// An update the workflow accepted (v3), appended by the SDK at a wait: `name` the
    /// update, `value` `{"id", "input"}`. The update's handler runs there, on every replay.
    Update,
    /// The result of an accepted update (v3): `name` its id, `value` the result or
    /// `failure`; the caller that sent the update gets it.
    UpdateResult,
    /// A kind this version does not know (a newer gateway or SDK): a reader must treat it
    /// as a retryable error, never as a terminal failure, so that rolling upgrades are safe.
    #[serde(other)]
    Unknown,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Input => "input",
            EntryKind::Step => "step",
            EntryKind::Now => "now",
            EntryKind::Uuid => "uuid",
            EntryKind::Random => "random",
            EntryKind::Egress => "egress",
            EntryKind::Output => "output",
            EntryKind::Sleep => "sleep",
            EntryKind::Signal => "signal",
            EntryKind::Awakeable => "awakeable",
            EntryKind::State => "state",
            EntryKind::Cancel => "cancel",
            EntryKind::Call => "call",
            EntryKind::Send => "send",
            EntryKind::Patch => "patch",
            EntryKind::Update => "update",
            EntryKind::UpdateResult => "update_result",
            EntryKind::Unknown => "unknown",
        }
    }

    pub fn parse(s: &str) -> Option<EntryKind> {
        Some(match s {
            "input" => EntryKind::Input,
            "step" => EntryKind::Step,
            "now" => EntryKind::Now,
            "uuid" => EntryKind::Uuid,
            "random" => EntryKind::Random,
            "egress" => EntryKind::Egress,
            "output" => EntryKind::Output,
            "sleep" => EntryKind::Sleep,
            "signal" => EntryKind::Signal,
            "awakeable" => EntryKind::Awakeable,
            "state" => EntryKind::State,
            "cancel" => EntryKind::Cancel,
            "call" => EntryKind::Call,
            "send" => EntryKind::Send,
            "patch" => EntryKind::Patch,
            "update" => EntryKind::Update,
            "update_result" => EntryKind::UpdateResult,
            _ => return None,
        })
    }

    /// Whether a handler may append this kind through the context API.
    pub fn appendable(self) -> bool {
        !matches!(
            self,
            EntryKind::Input
                | EntryKind::Output
                | EntryKind::Egress
                | EntryKind::Cancel
                | EntryKind::Unknown
        )
    }

    /// Whether the entry is a command whose result arrives later as a [`Completion`].
    pub fn is_command(self) -> bool {
        matches!(
            self,
            EntryKind::Sleep | EntryKind::Signal | EntryKind::Awakeable | EntryKind::Call
        )
    }

    /// The first protocol version that has this kind.
    pub fn since_version(self) -> u32 {
        match self {
            EntryKind::Sleep | EntryKind::Signal | EntryKind::Awakeable | EntryKind::State => 2,
            EntryKind::Cancel
            | EntryKind::Call
            | EntryKind::Send
            | EntryKind::Patch
            | EntryKind::Update
            | EntryKind::UpdateResult => 3,
            EntryKind::Unknown => u32::MAX,
            _ => 1,
        }
    }
}

/// A failure as the caller sees it: an HTTP status, an error type and a message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    pub status: u16,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub error_type: Option<String>,
    pub message: String,
}

/// `POST {context_url}/entries`: append the next entry of the attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppendRequest {
    /// The index the handler expects the entry to get; a mismatch is refused, so two
    /// writers can never interleave.
    pub index: u32,
    pub kind: EntryKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
    /// For a command (v2): the handler waits for it alone, right after this append, so a
    /// result that is already there (a buffered signal) may complete it at once. Without
    /// it, a command that may be raced against others gets a buffered signal only when the
    /// attempt suspends on it, so that the first event of the race wins.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub awaited: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppendResponse {
    pub index: u32,
    pub at_ms: i64,
    /// The value the gateway recorded when it differs from the one sent (a sleep's
    /// `wake_at_ms`, an awakeable's token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    /// A command's result when it was already there (a buffered signal, a timer in the past).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion: Option<Completion>,
    /// Version 3: this append took the journal past 80 % of its entry limit (see
    /// [`InvocationRequest::suggest_continue_as_new`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suggest_continue_as_new: bool,
}

/// (kind, name) of an entry, as a non-determinism report names it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntryRef {
    pub kind: EntryKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// How an attempt ended: the body of the handler's `200` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// The handler finished; `output` goes back to the caller.
    Output {
        output: Value,
        /// Version 5: entries the handler recorded since its last append, in index order
        /// (steps, `now`, `uuid`, `random`, `state`, `patch`; no command), which the
        /// gateway appends in the transaction that records the output. Nothing observed
        /// them before the end, so they need not be durable sooner: a crash before the end
        /// is recorded loses them with the output, and the next attempt runs them again.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        entries: Vec<AppendRequest>,
    },
    /// A terminal failure: no retry; its status and message go back to the caller.
    Failure {
        failure: Failure,
        /// Version 5: as in [`Outcome::Output::entries`].
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        entries: Vec<AppendRequest>,
    },
    /// A retryable failure. `retry_after_ms` overrides the handler's backoff (the SDK sets it
    /// from a step's own policy; `step` names that step).
    Retry {
        error: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error_type: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        step: Option<String>,
    },
    /// The handler cannot go on now. Version 2: it waits for the commands at the journal
    /// indexes `waiting_for` and runs again as soon as one of them completes (the gateway
    /// checks, in the same transaction, whether one already has). Version 1: call it again
    /// at `wake_at_ms` (ms since the epoch).
    Suspend {
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        waiting_for: Vec<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        wake_at_ms: Option<i64>,
    },
    /// Version 3, for a workflow's run: end this run and start the next one under the same
    /// workflow id with `input` and a fresh journal, in one transaction (a long-running
    /// loop keeps its history short this way).
    ContinueAsNew { input: Value },
    /// On replay the handler asked for an entry different from the recorded one.
    NonDeterminism {
        index: u32,
        recorded: EntryRef,
        requested: EntryRef,
        /// What else disagreed, when kind and name match (e.g. the recorded value no longer
        /// fits the type the handler asks for).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
    /// Version 4, only in answer to a replay: the handler replayed the journal to its end
    /// and would now do `next` at journal index `index` (run a step, wait for a new
    /// command, ...), which a replay never does.
    ReplayEnd { index: u32, next: EntryRef },
}

/// A line of the handler's answer to a streamed attempt (version 6). The answer's status is
/// `200` and its content type [`STREAM_CONTENT_TYPE`]; its lines are appends, each
/// answered by one [`GatewayFrame`] in the same order, and then one outcome, after which
/// the handler ends the answer. An answer that ends without an outcome ends the attempt
/// as a retryable failure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HandlerFrame {
    /// As `POST {context_url}/entries` would send it; the attempt's number and token are
    /// the stream's.
    Append(AppendRequest),
    Outcome(Outcome),
}

/// A line the gateway sends on a streamed attempt after the first one (the
/// [`InvocationRequest`], which the signature covers): the answer to the handler's append
/// of the same position, once it is durable or refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GatewayFrame {
    Appended(AppendResponse),
    /// The append was refused: the problem document (RFC 9457) the context API would have
    /// answered, with its status.
    Refused(Refusal),
}

/// The lines of a streamed body as its chunks come (version 6): both sides of a streamed
/// attempt read their peer's lines with it. A line that spans many chunks is searched for
/// its end once, not once per chunk.
#[derive(Debug, Default)]
pub struct Lines {
    read: Vec<u8>,
    /// How much of `read` is known to hold no newline.
    searched: usize,
}

impl Lines {
    /// Adds the next chunk of the body.
    pub fn push(&mut self, chunk: &[u8]) {
        self.read.extend_from_slice(chunk);
    }

    /// The next complete line, without its newline.
    pub fn next_line(&mut self) -> Option<Vec<u8>> {
        let Some(at) = self.read[self.searched..].iter().position(|b| *b == b'\n') else {
            self.searched = self.read.len();
            return None;
        };
        let mut line: Vec<u8> = self.read.drain(..=self.searched + at).collect();
        line.pop();
        self.searched = 0;
        Some(line)
    }

    /// The bytes held that belong to no complete line yet (all of them, once
    /// [`Lines::next_line`] has answered `None`).
    pub fn pending(&self) -> usize {
        self.read.len()
    }

    /// The body has ended: what is held is its last line, which may lack its newline.
    pub fn end(&mut self) {
        self.read.push(b'\n');
    }
}

/// Why the gateway refused an append on a streamed attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Refusal {
    /// The HTTP status the context API would have answered: `409` for an attempt that is
    /// no longer current, `5xx` for a refusal that may pass if the append is sent again,
    /// any other for one that will not.
    pub status: u16,
    #[serde(default)]
    pub detail: String,
    #[serde(default)]
    pub retryable: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let policy = RetryPolicy {
            initial_interval: Duration::from_millis(100),
            backoff_coefficient: 2.0,
            maximum_interval: Duration::from_millis(300),
            maximum_attempts: Some(4),
            non_retryable_error_types: vec!["CardDeclined".into()],
        };
        let delays: Vec<_> = (1..=4).map(|n| policy.next_delay(n, None)).collect();
        assert_eq!(
            delays,
            vec![
                Some(Duration::from_millis(100)),
                Some(Duration::from_millis(200)),
                Some(Duration::from_millis(300)),
                None
            ]
        );
        assert_eq!(policy.next_delay(1, Some("CardDeclined")), None);
        assert_eq!(
            policy.next_delay(1, Some("Timeout")),
            Some(Duration::from_millis(100))
        );
    }

    #[test]
    fn outcome_wire_shape() {
        let json = serde_json::to_value(Outcome::Retry {
            error: "boom".into(),
            error_type: None,
            retry_after_ms: Some(5),
            step: Some("charge".into()),
        })
        .unwrap();
        assert_eq!(
            json,
            serde_json::json!({"outcome": "retry", "error": "boom", "retry_after_ms": 5, "step": "charge"})
        );
        let frame = serde_json::to_value(HandlerFrame::Outcome(Outcome::Suspend {
            waiting_for: vec![3],
            wake_at_ms: None,
        }))
        .unwrap();
        assert_eq!(
            frame,
            serde_json::json!({"outcome": {"outcome": "suspend", "waiting_for": [3]}})
        );
        let refused: GatewayFrame =
            serde_json::from_str(r#"{"refused": {"status": 409, "detail": "stale", "type": "urn:durin:problem:conflict"}}"#)
                .unwrap();
        assert_eq!(
            refused,
            GatewayFrame::Refused(Refusal {
                status: 409,
                detail: "stale".into(),
                retryable: false
            })
        );
        let unknown: EntryKind = serde_json::from_str(r#""teleport""#).unwrap();
        assert_eq!(unknown, EntryKind::Unknown);
        assert!(!unknown.appendable());
        let policy: RetryPolicy =
            serde_json::from_str(r#"{"initial_interval": "250ms", "maximum_attempts": 3}"#)
                .unwrap();
        assert_eq!(policy.initial_interval, Duration::from_millis(250));
        assert_eq!(policy.backoff_coefficient, 2.0);
    }

    /// Lines come out whole however the chunks cut them, and an unended last line comes
    /// out once the body ends.
    #[test]
    fn lines_are_split_across_chunks() {
        let mut lines = Lines::default();
        lines.push(b"{\"a\"");
        assert_eq!(lines.next_line(), None);
        assert_eq!(lines.pending(), 4);
        lines.push(b":1}\n\n{\"b\":");
        assert_eq!(lines.next_line().as_deref(), Some(&b"{\"a\":1}"[..]));
        assert_eq!(lines.next_line().as_deref(), Some(&b""[..]));
        assert_eq!(lines.next_line(), None);
        lines.push(b"2}");
        assert_eq!(lines.next_line(), None);
        lines.end();
        assert_eq!(lines.next_line().as_deref(), Some(&b"{\"b\":2}"[..]));
        assert_eq!(lines.next_line(), None);
    }

    /// The signed bytes, exactly as the handler protocol documents them (verifiers in
    /// other languages build the same): every header carried, sorted by name.
    #[test]
    fn the_signed_message_lists_every_durin_header_sorted() {
        let headers = SignedHeaders {
            invocation_id: "inv_x",
            attempt: "2",
            attempt_token: "tok",
            cancelled: "true",
            protocol: "",
            replay: "",
            workflow_id: "order-7",
        };
        let carried = headers.carried();
        assert_eq!(carried.len(), 5, "the empty protocol is not carried");
        let message = signed_message(17, "/order/process", &carried, b"{}");
        assert_eq!(
            String::from_utf8(message).unwrap_or_default(),
            "durin-signature-v3\n17\n/order/process\ndurin-attempt:2\n\
             durin-attempt-token:tok\ndurin-cancelled:true\ndurin-invocation-id:inv_x\n\
             durin-workflow-id:order-7\n{}"
        );
        let mut reversed = carried.clone();
        reversed.reverse();
        assert_eq!(
            signed_message(17, "/p", &reversed, b""),
            signed_message(17, "/p", &carried, b""),
            "the order received does not matter"
        );
    }
}
