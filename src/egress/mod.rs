//! The egress: an HTTP proxy through which a plain handler's outbound calls become durable.
//!
//! A handler sends its outbound call through the egress with the `Durin-Invocation-Id` it
//! was given, either in proxy form (an absolute URI, as `HTTP_PROXY` clients send it) or in
//! the explicit form `http://EGRESS/{scheme}/{host[:port]}/{path}` (which also reaches
//! HTTPS targets: Durin makes the TLS call). The egress identifies the call by (method, URL,
//! body digest, occurrence), where the occurrence counts identical calls in the attempt.
//! A call the journal holds is answered from the journal; a new one goes out with an
//! `Idempotency-Key` derived from the invocation and the call's identity (the same on every
//! retry, so a downstream that honours it applies the call once even when its answer was
//! lost), and its response is journaled before the handler sees it.
//!
//! `proxy.rs` serves the calls (replay, divergence, the call out, its recording);
//! `occurrences.rs` counts each call identity per attempt; `guard.rs` keeps calls to the
//! hosts the allow-list names and off internal addresses; `record.rs` is the journal entry
//! of a call.

mod guard;
mod occurrences;
mod proxy;
mod record;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use base64::Engine as _;
use durin_protocol::{
    EntryKind, RetryPolicy, HEADER_ATTEMPT, HEADER_ATTEMPT_TOKEN, HEADER_INVOCATION_ID,
    HEADER_REPLAYED,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::clock::Clock;
use crate::engine::{AttemptObserver, Engine};
use crate::http::{hex, parse_retry_after, read_limited, same_secret};
use crate::ids::InvocationId;
use crate::problem::ApiError;
use crate::store::{
    AttemptEnd, Effect, InvocationRecord, NewEntry, Status, Store, StoreError, StoredEntry,
};
use crate::telemetry::trace_context::{InvocationTrace, TRACEPARENT};

use guard::*;
pub use occurrences::EgressCalls;
use occurrences::*;
use record::*;

pub struct EgressConfig {
    /// Hosts the egress may call: `host`, `host:port` or `*.domain`; empty allows any.
    pub allow: Vec<String>,
    pub max_body_bytes: usize,
    /// Retries of one outbound call (connection errors, timeouts, 408, 429, 5xx).
    pub retry_policy: RetryPolicy,
    /// Bound on one try of an outbound call.
    pub call_timeout: Duration,
    /// Extra root certificates to trust, PEM.
    pub extra_roots: Vec<reqwest::Certificate>,
}

pub struct Egress {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    engine: Arc<Engine>,
    calls: Arc<EgressCalls>,
    /// Replays under way: their calls are answered from their recordings, never sent.
    replays: Arc<crate::replay::Replays>,
    http: reqwest::Client,
    config: EgressConfig,
}
