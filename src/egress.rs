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
use crate::store::{AttemptEnd, Effect, NewEntry, Status, Store, StoreError};
use crate::trace_context::{InvocationTrace, TRACEPARENT};

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
    http: reqwest::Client,
    config: EgressConfig,
}

/// What the egress remembers of each running attempt: how often it saw each call identity
/// (the occurrence), and the calls the journal held when the attempt began. An attempt
/// that ended leaves a mark, so that a late call of it can never bring its state back.
#[derive(Default)]
pub struct EgressCalls {
    attempts: Mutex<HashMap<InvocationId, Slot>>,
}

enum Slot {
    Running(AttemptCalls),
    /// Every attempt up to this one has ended.
    EndedThrough(u32),
}

#[derive(Default)]
struct AttemptCalls {
    attempt: u32,
    /// The attempt's secret, checked against the store when the attempt was admitted; every
    /// later call of the attempt must present it too.
    token: String,
    /// Calls seen in this attempt per identity (method, URL, body digest). A recorded call
    /// of occurrence `k` is claimed by this attempt once its identity was seen `k + 1` times.
    /// Unused on a store that other nodes share: the store counts the attempt's calls,
    /// whichever node's egress they reach (`Store::take_occurrence`).
    occurrences: HashMap<(String, String, String), u32>,
    /// The egress entries of the journal, read once per attempt (entries added later come
    /// from this attempt and are claimed already).
    recorded: Option<Arc<Vec<(u32, EgressRecord)>>>,
    /// The trace the invocation belongs to.
    trace: Option<InvocationTrace>,
}

impl EgressCalls {
    /// Marks `attempt` as ended. The engine calls it as soon as the handler has answered,
    /// so an attempt known as running here has not ended. A newer attempt that already
    /// runs (a plain handler's suspension can be followed by the next attempt before the
    /// suspended one has answered) keeps its state.
    pub fn forget(&self, id: &InvocationId, attempt: u32) {
        let mut attempts = lock(&self.attempts);
        let through = match attempts.get(id) {
            Some(Slot::Running(calls)) if calls.attempt > attempt => return,
            Some(Slot::EndedThrough(e)) => attempt.max(*e),
            _ => attempt,
        };
        attempts.insert(id.clone(), Slot::EndedThrough(through));
    }

    /// Forgets an invocation whose attempts up to `attempt` have ended and are recorded as
    /// ended in the store, which refuses them from then on; a newer attempt's state stays.
    pub fn settle(&self, id: &InvocationId, attempt: u32) {
        let mut attempts = lock(&self.attempts);
        if matches!(attempts.get(id), Some(Slot::EndedThrough(e)) if *e >= attempt) {
            attempts.remove(id);
        }
    }

    /// Gives back the occurrence of a call that left nothing in the journal, so that the
    /// handler's retry of it has the same identity and idempotency key. Only the latest
    /// occurrence can be given back; an earlier one stays used.
    fn release(
        &self,
        id: &InvocationId,
        attempt: u32,
        identity: &(String, String, String),
        occurrence: u32,
    ) {
        // Only the running attempt's own state: giving back never brings an ended
        // attempt's state back.
        if let Some(Slot::Running(calls)) = lock(&self.attempts).get_mut(id) {
            if calls.attempt == attempt {
                if let Some(n) = calls.occurrences.get_mut(identity) {
                    if *n == occurrence + 1 {
                        *n = occurrence;
                    }
                }
            }
        }
    }

    /// Whether `attempt` was admitted with `token` and has not ended.
    fn is_current(&self, id: &InvocationId, attempt: u32, token: &str) -> bool {
        matches!(
            lock(&self.attempts).get(id),
            Some(Slot::Running(calls)) if calls.attempt == attempt && same_secret(&calls.token, token)
        )
    }

    /// Starts keeping the state of `attempt`, which the store has just shown running with
    /// `token`; false when the attempt is known to be over (or a newer one runs).
    fn admit(&self, id: &InvocationId, attempt: u32, token: &str, trace: InvocationTrace) -> bool {
        let mut attempts = lock(&self.attempts);
        let fresh = || {
            Slot::Running(AttemptCalls {
                attempt,
                token: token.to_owned(),
                trace: Some(trace),
                ..AttemptCalls::default()
            })
        };
        let slot = attempts.entry(id.clone()).or_insert_with(fresh);
        match slot {
            Slot::Running(calls) if calls.attempt == attempt => true,
            Slot::Running(calls) if calls.attempt < attempt => {
                *slot = fresh();
                true
            }
            Slot::EndedThrough(ended) if *ended < attempt => {
                *slot = fresh();
                true
            }
            _ => false,
        }
    }

    /// Runs `f` on the state of `attempt`; `None` when it is not the admitted, running one.
    fn with<T>(
        &self,
        id: &InvocationId,
        attempt: u32,
        f: impl FnOnce(&mut AttemptCalls) -> T,
    ) -> Option<T> {
        match lock(&self.attempts).get_mut(id) {
            Some(Slot::Running(calls)) if calls.attempt == attempt => Some(f(calls)),
            _ => None,
        }
    }
}

/// An occurrence a call holds while it is out; given back when dropped unless the call was
/// journaled (or the occurrence was given back already).
struct OccurrenceHeld<'a> {
    calls: &'a EgressCalls,
    id: &'a InvocationId,
    attempt: u32,
    identity: &'a (String, String, String),
    occurrence: u32,
    journaled: bool,
    /// On a store that other nodes share, the occurrence was taken in the store: the store
    /// and the identity's digest, to give it back there.
    shared: Option<(Arc<dyn Store>, String)>,
}

impl OccurrenceHeld<'_> {
    /// Gives the occurrence taken in a shared store back now, before the handler hears of
    /// the call, so that its retry, through any node, takes it again.
    async fn give_back_to_store(&mut self) {
        if let Some((store, digest)) = self.shared.take() {
            self.journaled = true;
            // On a task of its own, so that it is done even if the handler hangs up now.
            let (id, attempt, occurrence) = (self.id.clone(), self.attempt, self.occurrence);
            let given_back = tokio::spawn(async move {
                give_back(&*store, &id, attempt, &digest, occurrence).await;
            });
            let _ = given_back.await;
        }
    }
}

impl Drop for OccurrenceHeld<'_> {
    fn drop(&mut self) {
        if self.journaled {
            return;
        }
        match self.shared.take() {
            None => self
                .calls
                .release(self.id, self.attempt, self.identity, self.occurrence),
            // The handler hung up mid-call (this guard is dropped with the call's future):
            // the store is written from a task of its own.
            Some((store, digest)) => {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    let (id, attempt, occurrence) =
                        (self.id.clone(), self.attempt, self.occurrence);
                    runtime.spawn(async move {
                        give_back(&*store, &id, attempt, &digest, occurrence).await;
                    });
                }
            }
        }
    }
}

/// Gives an occurrence back in a shared store; a failure is logged (the call's retry then
/// takes the next occurrence, and so another `Idempotency-Key`).
async fn give_back(
    store: &dyn Store,
    id: &InvocationId,
    attempt: u32,
    digest: &str,
    occurrence: u32,
) {
    if let Err(error) = store
        .give_back_occurrence(id, attempt, digest, occurrence)
        .await
    {
        tracing::warn!(%error, invocation_id = %id, attempt, occurrence, "could not give an egress call's occurrence back");
    }
}

/// The digest under which a shared store counts a call identity (method, URL, body digest).
fn identity_digest(method: &str, url: &str, body_digest: &str) -> String {
    let mut hasher = Sha256::new();
    for part in [method, url, body_digest] {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    hex(&hasher.finalize())
}

impl AttemptObserver for EgressCalls {
    fn attempt_ended(&self, id: &InvocationId, attempt: u32) {
        self.forget(id, attempt);
    }

    fn attempt_recorded(&self, id: &InvocationId, attempt: u32) {
        self.settle(id, attempt);
    }
}

fn stale(id: &InvocationId, attempt: u32) -> ApiError {
    ApiError::Conflict(format!(
        "attempt {attempt} of invocation {id} has ended; only the current attempt may call out"
    ))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The value of an egress journal entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct EgressRecord {
    method: String,
    url: String,
    body_digest: String,
    occurrence: u32,
    idempotency_key: String,
    status: u16,
    headers: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    body: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    body_base64: Option<String>,
}

impl EgressRecord {
    /// A response that is passed on but not journaled.
    fn unjournaled(status: u16, headers: Vec<(String, String)>, body: Vec<u8>) -> EgressRecord {
        EgressRecord {
            method: String::new(),
            url: String::new(),
            body_digest: String::new(),
            occurrence: 0,
            idempotency_key: String::new(),
            status,
            headers,
            body_base64: Some(base64::engine::general_purpose::STANDARD.encode(body)),
            body: None,
        }
    }

    fn body_bytes(&self) -> Vec<u8> {
        match (&self.body, &self.body_base64) {
            (Some(text), _) => text.clone().into_bytes(),
            (None, Some(b64)) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap_or_default(),
            (None, None) => Vec::new(),
        }
    }

    fn response(&self, replayed: bool) -> Response {
        let mut response = Response::new(Body::from(self.body_bytes()));
        *response.status_mut() = StatusCode::from_u16(self.status).unwrap_or(StatusCode::OK);
        let headers = response.headers_mut();
        for (name, value) in &self.headers {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                headers.append(name, value);
            }
        }
        if replayed {
            headers.insert(HEADER_REPLAYED, HeaderValue::from_static("true"));
        }
        response
    }
}

/// Headers that describe one hop, not the message; never forwarded.
fn hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
    ) || name.starts_with("durin-")
}

/// Whether `ip` is an address inside a network rather than on the internet: loopback,
/// private, link-local (where cloud metadata services answer), shared (CGNAT),
/// unspecified, multicast or broadcast. The egress calls these only when the allow-list
/// names the host.
fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || (a == 100 && (64..128).contains(&b)) // shared (CGNAT)
                || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
                || (a == 198 && (18..20).contains(&b)) // benchmarking
                || a >= 240 // reserved
                || a == 0
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            let segments = v6.segments();
            // NAT64 (64:ff9b::/96) and IPv4-compatible (::a.b.c.d) forms of an IPv4 address.
            let embedded = std::net::Ipv4Addr::new(
                (segments[6] >> 8) as u8,
                segments[6] as u8,
                (segments[7] >> 8) as u8,
                segments[7] as u8,
            );
            let nat64 = segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
            let compatible = segments[..6] == [0; 6] && !v6.is_loopback() && !v6.is_unspecified();
            if nat64 || compatible {
                return is_internal(IpAddr::V4(embedded));
            }
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local
                || (first & 0xffc0) == 0xfe80 // link-local
                || (first & 0xffc0) == 0xfec0 // site-local
        }
    }
}

/// Resolves the egress's target names, keeping internal addresses only for hosts the
/// allow-list names: the check is made on the address the call connects to, so a public
/// name that resolves to 127.0.0.1 (or is made to, later) reaches nothing inside.
struct GuardedResolver {
    /// Hosts named in the allow-list (wildcards excluded), lower case.
    named: Vec<String>,
}

/// Marks the resolver's refusal, so that the egress can answer 403 for it.
const INTERNAL_REFUSED: &str = "resolves only to internal addresses";

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_ascii_lowercase();
        let named = self.named.contains(&host);
        Box::pin(async move {
            let addresses: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|address| named || !is_internal(address.ip()))
                .collect();
            if addresses.is_empty() {
                return Err(format!(
                    "{host} {INTERNAL_REFUSED} (loopback, private or link-local); name it in --egress-allow to let handlers call it"
                )
                .into());
            }
            Ok(Box::new(addresses.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Whether the allow-list `allow` lets handlers call `url`'s host. An internal address
/// written as an IP literal must be named; a name is checked again, on the addresses it
/// resolves to, when the call connects ([`GuardedResolver`]).
fn allowed_by(allow: &[String], url: &reqwest::Url) -> bool {
    let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
    let bare = host.trim_matches(['[', ']']).to_owned();
    let port = url.port_or_known_default().unwrap_or(0);
    // Entries that name this host decide alone (a wildcard does not widen them): `host`
    // allows every port, `host:port` that port only.
    let naming: Vec<String> = allow
        .iter()
        .filter(|pattern| !pattern.starts_with("*."))
        .map(|pattern| pattern.to_ascii_lowercase())
        .filter(|pattern| split_entry(pattern).0 == bare)
        .collect();
    if !naming.is_empty() {
        return naming.iter().any(|pattern| {
            let (_, named_port) = split_entry(pattern);
            named_port.is_none_or(|p| p == port)
        });
    }
    // An internal address is called only when named.
    if bare.parse::<IpAddr>().is_ok_and(is_internal) {
        return false;
    }
    if allow.is_empty() {
        return true;
    }
    allow.iter().any(|pattern| {
        let pattern = pattern.to_ascii_lowercase();
        pattern
            .strip_prefix("*.")
            .is_some_and(|domain| host.ends_with(&format!(".{domain}")))
    })
}

/// An allow-list entry's host (lower case, IPv6 without brackets) and port, if it names one:
/// `[::1]:8080`, `host:8080`, `host`, `::1`.
fn split_entry(pattern: &str) -> (String, Option<u16>) {
    let pattern = pattern.to_ascii_lowercase();
    match pattern.strip_prefix('[') {
        Some(rest) => {
            let (host, after) = rest.split_once(']').unwrap_or((rest, ""));
            (
                host.to_owned(),
                after.strip_prefix(':').and_then(|p| p.parse().ok()),
            )
        }
        None if pattern.matches(':').count() == 1 => {
            let (host, port) = pattern.split_once(':').unwrap_or((&pattern, ""));
            (host.to_owned(), port.parse().ok())
        }
        None => (pattern, None),
    }
}

/// The hosts an allow-list names explicitly (`host` or `host:port`; not `*.domain`).
fn named_hosts(allow: &[String]) -> Vec<String> {
    allow
        .iter()
        .filter(|pattern| !pattern.starts_with("*."))
        .map(|pattern| split_entry(pattern).0)
        .collect()
}

impl Egress {
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        engine: Arc<Engine>,
        calls: Arc<EgressCalls>,
        config: EgressConfig,
    ) -> Result<Egress, reqwest::Error> {
        // No proxy from the environment: the address check is made on what the egress
        // itself connects to.
        let mut http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(Arc::new(GuardedResolver {
                named: named_hosts(&config.allow),
            }));
        for root in &config.extra_roots {
            http = http.add_root_certificate(root.clone());
        }
        Ok(Egress {
            store,
            clock,
            engine,
            calls,
            http: http.build()?,
            config,
        })
    }

    pub fn router(self: Arc<Self>) -> Router {
        Router::new().fallback(handle).with_state(self)
    }

    /// Whether the allow-list lets handlers call `url`'s host. An internal address written
    /// as an IP literal must be named; a name is checked again, on the addresses it
    /// resolves to, when the call connects ([`GuardedResolver`]).
    fn allowed(&self, url: &reqwest::Url) -> bool {
        allowed_by(&self.config.allow, url)
    }

    async fn serve(&self, request: Request) -> Result<Response, ApiError> {
        let (parts, body) = request.into_parts();
        if parts.method == Method::CONNECT {
            return Err(ApiError::BadRequest(
                "the egress does not tunnel (CONNECT): send HTTPS calls in the explicit form http://EGRESS/https/HOST/PATH so that Durin can journal them".into(),
            ));
        }
        let url = target_url(&parts.uri)?;
        let id = parts
            .headers
            .get(HEADER_INVOCATION_ID)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                ApiError::Forbidden(
                    "the egress only carries calls of running invocations: send the Durin-Invocation-Id header your handler was given".into(),
                )
            })
            .and_then(|v| InvocationId::parse(v).map_err(ApiError::BadRequest))?;
        let claimed_attempt = match parts.headers.get(HEADER_ATTEMPT) {
            Some(v) => Some(
                v.to_str()
                    .ok()
                    .and_then(|v| v.trim().parse::<u32>().ok())
                    .ok_or_else(|| {
                        ApiError::BadRequest("the Durin-Attempt header must be a number".into())
                    })?,
            ),
            None => None,
        };
        if !self.allowed(&url) {
            return Err(ApiError::Forbidden(format!(
                "{} is not in the egress allow-list",
                url.host_str().unwrap_or_default()
            )));
        }
        let limit = self.config.max_body_bytes;
        let body = axum::body::to_bytes(body, limit)
            .await
            .map_err(|_| ApiError::PayloadTooLarge { limit })?;
        let token = parts
            .headers
            .get(HEADER_ATTEMPT_TOKEN)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                ApiError::Forbidden(
                    "the egress only carries calls of a running attempt: send the Durin-Attempt-Token header your handler was given".into(),
                )
            })?
            .to_owned();
        let attempt = match claimed_attempt.filter(|a| self.calls.is_current(&id, *a, &token)) {
            // An earlier call of this attempt was checked, and the attempt has not ended.
            Some(attempt) => attempt,
            None => {
                let (attempt, trace) = self.running_attempt(&id, claimed_attempt, &token).await?;
                if !self.calls.admit(&id, attempt, &token, trace) {
                    return Err(stale(&id, attempt));
                }
                attempt
            }
        };
        let method = parts.method.as_str().to_owned();
        let url_text = url.to_string();
        let body_digest = hex(&Sha256::digest(&body));
        let identity = (method.clone(), url_text.clone(), body_digest.clone());
        // On a store that other nodes share, the attempt's calls may reach their egresses
        // too (a handler behind a load balancer): the occurrence is counted in the store.
        let shared = if self.store.shared() {
            let digest = identity_digest(&method, &url_text, &body_digest);
            self.store
                .take_occurrence(&id, attempt, &digest)
                .await?
                .map(|occurrence| (occurrence, digest))
        } else {
            None
        };
        let (occurrence, shared) = match shared {
            Some((occurrence, digest)) => (occurrence, Some((Arc::clone(&self.store), digest))),
            None => (
                self.calls
                    .with(&id, attempt, |calls| {
                        let n = calls.occurrences.entry(identity.clone()).or_default();
                        let occurrence = *n;
                        *n += 1;
                        occurrence
                    })
                    .ok_or_else(|| stale(&id, attempt))?,
                None,
            ),
        };
        // Gives the occurrence back unless the call ends up in the journal, also when the
        // handler hangs up mid-call (this future is then dropped): its retry has the same
        // identity and Idempotency-Key, so a downstream that honours the key applies it once.
        let mut occurrence_held = OccurrenceHeld {
            calls: &self.calls,
            id: &id,
            attempt,
            identity: &identity,
            occurrence,
            journaled: false,
            shared,
        };
        // The call's span hangs under the attempt's (or under the span the handler sent).
        let span = self
            .calls
            .with(&id, attempt, |calls| calls.trace)
            .flatten()
            .and_then(|trace| {
                let sent = parts.headers.get(TRACEPARENT).and_then(|v| v.to_str().ok());
                self.engine
                    .traces()
                    .egress(&trace, &id, attempt, sent, &method, &url_text)
            });
        let traceparent = span.as_ref().map(|span| span.traceparent.as_str());
        let result = self
            .call(
                &id,
                attempt,
                &parts,
                url,
                body,
                &identity,
                occurrence,
                traceparent,
            )
            .await;
        occurrence_held.journaled = matches!(result, Ok((_, true)));
        if !occurrence_held.journaled {
            occurrence_held.give_back_to_store().await;
        }
        if let Some(span) = span {
            match &result {
                Ok((response, _)) => span.end(Some(response.status().as_u16()), outcome(response)),
                Err(_) => span.end(None, "failed"),
            }
        }
        result.map(|(response, _)| response)
    }

    /// Answers one call from the journal, or makes it and journals it. The flag says whether
    /// the call is now in the journal (and so has used its occurrence).
    #[allow(clippy::too_many_arguments)]
    async fn call(
        &self,
        id: &InvocationId,
        attempt: u32,
        parts: &axum::http::request::Parts,
        url: reqwest::Url,
        body: bytes::Bytes,
        identity: &(String, String, String),
        occurrence: u32,
        traceparent: Option<&str>,
    ) -> Result<(Response, bool), ApiError> {
        let (method, url_text, body_digest) = identity.clone();
        let id = id.clone();

        let cached = self
            .calls
            .with(&id, attempt, |calls| calls.recorded.clone())
            .ok_or_else(|| stale(&id, attempt))?;
        let recorded = match cached {
            Some(recorded) => recorded,
            None => {
                let loaded = Arc::new(self.recorded_calls(&id).await?);
                self.calls
                    .with(&id, attempt, |calls| {
                        Arc::clone(calls.recorded.get_or_insert(loaded))
                    })
                    .ok_or_else(|| stale(&id, attempt))?
            }
        };
        let exact = recorded.iter().find(|(_, r)| {
            r.method == method
                && r.url == url_text
                && r.body_digest == body_digest
                && r.occurrence == occurrence
        });
        if let Some((_, record)) = exact {
            return Ok((record.response(true), true));
        }
        let diverged = if self.store.shared() {
            // The attempt's calls are counted in the store, whichever node they reached;
            // read only when a recorded call has this method and URL.
            let same_target: Vec<&(u32, EgressRecord)> = recorded
                .iter()
                .filter(|(_, r)| r.method == method && r.url == url_text)
                .collect();
            if same_target.is_empty() {
                None
            } else {
                let seen = self.store.occurrences_seen(&id, attempt).await?;
                same_target
                    .into_iter()
                    .find(|(_, r)| {
                        let digest = identity_digest(&r.method, &r.url, &r.body_digest);
                        seen.get(&digest).copied().unwrap_or(0) <= r.occurrence
                    })
                    .cloned()
            }
        } else {
            self.calls
                .with(&id, attempt, |calls| {
                    recorded
                        .iter()
                        .find(|(_, r)| {
                            let seen = calls
                                .occurrences
                                .get(&(r.method.clone(), r.url.clone(), r.body_digest.clone()))
                                .copied()
                                .unwrap_or(0);
                            r.method == method && r.url == url_text && seen <= r.occurrence
                        })
                        .cloned()
                })
                .ok_or_else(|| stale(&id, attempt))?
        };
        if let Some((index, other)) = diverged {
            return Err(self
                .pause(
                    &id,
                    attempt,
                    format!(
                        "non-determinism at journal index {index}: the journal recorded egress {} {} (body digest {}, occurrence {}) but the handler called {method} {url_text} (body digest {}, occurrence {occurrence}); fix the handler and resume the invocation",
                        other.method,
                        other.url,
                        &other.body_digest[..12],
                        other.occurrence,
                        &body_digest[..12],
                    ),
                )
                .await);
        }

        let idempotency_key = parts
            .headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .unwrap_or_else(|| {
                let mut hasher = Sha256::new();
                for part in [id.as_str(), &method, &url_text, &body_digest] {
                    hasher.update(part.as_bytes());
                    hasher.update([0]);
                }
                hasher.update(occurrence.to_be_bytes());
                format!("durin-{}", &hex(&hasher.finalize())[..40])
            });
        if self.store.shared() {
            // Another node may have taken the attempt over (this one was frozen past its
            // lease, or cut off): it must still be the running one before anything goes
            // out, whatever this node remembers.
            let token = parts
                .headers
                .get(HEADER_ATTEMPT_TOKEN)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            self.running_attempt(&id, Some(attempt), token).await?;
        }
        let (status, headers, response_body, settled) = self
            .send(
                &parts.method,
                &url,
                &parts.headers,
                &idempotency_key,
                traceparent,
                body,
            )
            .await?;
        if !settled {
            // The downstream kept failing in a way that may pass: the handler gets the last
            // answer, and nothing is journaled, so the next attempt makes the call again
            // with the same key.
            let record = EgressRecord::unjournaled(status, headers, response_body);
            return Ok((record.response(false), false));
        }
        let text = String::from_utf8(response_body.clone()).ok();
        let egress_record = EgressRecord {
            method: method.clone(),
            url: url_text.clone(),
            body_digest,
            occurrence,
            idempotency_key,
            status,
            headers,
            body_base64: text
                .is_none()
                .then(|| base64::engine::general_purpose::STANDARD.encode(&response_body)),
            body: text,
        };
        let value =
            serde_json::to_vec(&egress_record).map_err(|e| ApiError::Storage(e.to_string()))?;
        let entry = NewEntry {
            index: None,
            kind: EntryKind::Egress,
            name: Some(format!("{method} {url_text}")),
            value: Some(value),
            content_type: Some("application/json".into()),
            failure: None,
            token: None,
            effect: Effect::None,
        };
        match self
            .store
            .append_entry(&id, attempt, entry, self.clock.now_ms())
            .await
        {
            Ok(_) => Ok((egress_record.response(false), true)),
            Err(error @ StoreError::Fenced { .. }) => {
                // The attempt ended while this call was out: forget what the call may have
                // brought back of its bookkeeping (a newer attempt's stays).
                self.calls.forget(&id, attempt);
                self.calls.settle(&id, attempt);
                Err(error.into())
            }
            Err(error) => Err(error.into()),
        }
    }

    /// The current attempt of a running invocation, checked against the one the caller
    /// claims to be.
    async fn running_attempt(
        &self,
        id: &InvocationId,
        claimed: Option<u32>,
        token: &str,
    ) -> Result<(u32, InvocationTrace), ApiError> {
        let record = self
            .store
            .get_invocation(id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("invocation {id} not found")))?;
        if record.status != Status::Running {
            return Err(ApiError::Conflict(format!(
                "invocation {id} is {}, not running: only a running attempt may call out",
                record.status
            )));
        }
        if let Some(claimed) = claimed.filter(|a| *a != record.attempt) {
            return Err(ApiError::Conflict(format!(
                "attempt {claimed} of invocation {id} is not current (current attempt {})",
                record.attempt
            )));
        }
        if !same_secret(record.attempt_token.as_deref().unwrap_or_default(), token) {
            return Err(ApiError::Forbidden(format!(
                "the Durin-Attempt-Token does not belong to the running attempt of invocation {id}"
            )));
        }
        Ok((record.attempt, crate::traces::trace_of(&record)))
    }

    /// The egress calls in the invocation's journal, with their indexes.
    async fn recorded_calls(
        &self,
        id: &InvocationId,
    ) -> Result<Vec<(u32, EgressRecord)>, ApiError> {
        Ok(self
            .store
            .read_journal(id)
            .await?
            .into_iter()
            .filter(|e| e.kind == EntryKind::Egress)
            .filter_map(|e| {
                let value = e.value?;
                serde_json::from_slice::<EgressRecord>(&value)
                    .ok()
                    .map(|r| (e.index, r))
            })
            .collect())
    }

    /// Sends one outbound call, retrying what may succeed later, with the same key. The
    /// flag is false when the last answer was still one that may pass (408, 429, 5xx).
    async fn send(
        &self,
        method: &Method,
        url: &reqwest::Url,
        headers: &HeaderMap,
        idempotency_key: &str,
        traceparent: Option<&str>,
        body: bytes::Bytes,
    ) -> Result<(u16, Vec<(String, String)>, Vec<u8>, bool), ApiError> {
        let method = reqwest::Method::from_bytes(method.as_str().as_bytes())
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        // Headers the caller named in `Connection` are for the hop to the egress only
        // (RFC 9110 §7.6.1).
        let connection_options: Vec<String> = headers
            .get_all(axum::http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|option| option.trim().to_ascii_lowercase())
            .filter(|option| !option.is_empty())
            .collect();
        let mut tries = 0;
        loop {
            tries += 1;
            // The delay before the next try; `None` when this try is the last.
            let next_delay = self.config.retry_policy.next_delay(tries, None);
            let mut request = self
                .http
                .request(method.clone(), url.clone())
                .timeout(self.config.call_timeout)
                .header("idempotency-key", idempotency_key)
                .body(body.clone());
            if let Some(traceparent) = traceparent {
                request = request.header(TRACEPARENT, traceparent);
            }
            for (name, value) in headers {
                let name = name.as_str();
                // Durin's own `traceparent` replaces the handler's.
                let replaced = traceparent.is_some() && name == TRACEPARENT;
                if !hop_by_hop(name)
                    && name != "idempotency-key"
                    && !replaced
                    && !connection_options.iter().any(|option| option == name)
                {
                    request = request.header(name, value.as_bytes());
                }
            }
            let (retry_after, problem) = match request.send().await {
                Ok(response) => {
                    let status = response.status();
                    let transient = status.is_server_error()
                        || status == reqwest::StatusCode::REQUEST_TIMEOUT
                        || status == reqwest::StatusCode::TOO_MANY_REQUESTS;
                    let retry_after = response
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(parse_retry_after);
                    if !transient || next_delay.is_none() {
                        let headers = response
                            .headers()
                            .iter()
                            .filter(|(name, _)| !hop_by_hop(name.as_str()))
                            .filter_map(|(name, value)| {
                                Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned()))
                            })
                            .collect();
                        // Bounded: the answer is held in memory and journaled whole.
                        let body = read_limited(response, self.config.max_body_bytes)
                            .await
                            .map_err(|e| {
                                ApiError::Downstream(format!(
                                    "reading the answer of {url} failed: {e}; nothing was journaled"
                                ))
                            })?;
                        return Ok((status.as_u16(), headers, body, !transient));
                    }
                    (retry_after, format!("{url} answered {status}"))
                }
                Err(e) => {
                    let chain = crate::http::error_chain(&e);
                    if chain.contains(INTERNAL_REFUSED) {
                        return Err(ApiError::Forbidden(chain));
                    }
                    (None, format!("could not call {url}: {e}"))
                }
            };
            match next_delay {
                Some(delay) => {
                    let delay = retry_after
                        .unwrap_or(delay)
                        .min(self.config.retry_policy.maximum_interval);
                    tokio::time::sleep(delay).await;
                }
                None => {
                    return Err(ApiError::Downstream(format!(
                        "{problem} ({tries} tries); nothing was journaled, the same call may be made again"
                    )))
                }
            }
        }
    }

    /// Pauses the invocation (fenced by the attempt) and wakes its waiters.
    async fn pause(&self, id: &InvocationId, attempt: u32, reason: String) -> ApiError {
        let end = AttemptEnd::Paused {
            reason: reason.clone(),
        };
        match self.engine.end_attempt(id, attempt, end).await {
            Ok(_) => {
                self.calls.forget(id, attempt);
                ApiError::Conflict(reason)
            }
            Err(StoreError::Fenced { .. }) => ApiError::Conflict(reason),
            Err(e) => e.into(),
        }
    }
}

async fn handle(State(egress): State<Arc<Egress>>, request: Request) -> Response {
    let response = match egress.serve(request).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    metrics::counter!(crate::telemetry::EGRESS, "outcome" => outcome(&response)).increment(1);
    response
}

/// What became of a call, from the egress's answer: `replayed` from the journal, `failed`
/// (the egress's own 5xx problem), or `recorded`.
fn outcome(response: &Response) -> &'static str {
    if response.headers().contains_key(HEADER_REPLAYED) {
        "replayed"
    } else if response
        .headers()
        .contains_key(crate::problem::HEADER_ERROR_SOURCE)
        && response.status().is_server_error()
    {
        "failed"
    } else {
        "recorded"
    }
}

/// The call's target: the absolute URI of a proxy-form request, or the explicit form
/// `/{scheme}/{authority}/{path}`.
fn target_url(uri: &Uri) -> Result<reqwest::Url, ApiError> {
    let text = if uri.scheme().is_some() {
        uri.to_string()
    } else {
        let path = uri.path().trim_start_matches('/');
        let (scheme, rest) = path.split_once('/').unwrap_or((path, ""));
        if !matches!(scheme, "http" | "https") || rest.is_empty() {
            return Err(ApiError::BadRequest(format!(
                "{uri} names no target: use proxy form (an absolute URI) or http://EGRESS/{{http|https}}/HOST/PATH"
            )));
        }
        let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
        format!("{scheme}://{rest}{query}")
    };
    let url = reqwest::Url::parse(&text)
        .map_err(|e| ApiError::BadRequest(format!("target {text:?} is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(ApiError::BadRequest(format!(
            "target {text:?} must be an http or https URL with a host"
        )));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_called_only_on_the_ports_the_allow_list_names() {
        let allowed = |allow: &[&str], url: &str| {
            let allow: Vec<String> = allow.iter().map(|s| (*s).to_owned()).collect();
            allowed_by(&allow, &reqwest::Url::parse(url).unwrap())
        };
        assert!(allowed(&["127.0.0.1:9101"], "http://127.0.0.1:9101/charge"));
        assert!(!allowed(
            &["127.0.0.1:9101"],
            "http://127.0.0.1:9070/v1/deployments"
        ));
        assert!(allowed(&["127.0.0.1"], "http://127.0.0.1:9070/"));
        assert!(!allowed(&[], "http://10.1.2.3/"));
        assert!(!allowed(&[], "http://169.254.169.254/latest/"));
        assert!(!allowed(&[], "http://[::ffff:127.0.0.1]:80/"));
        assert!(!allowed(&[], "http://[64:ff9b::a01:203]/"));
        assert!(!allowed(&[], "http://192.0.0.192/"));
        assert!(allowed(&[], "http://93.184.216.34/"));
        assert!(allowed(&[], "http://example.com/"));
        assert!(allowed(&["[::1]:8080"], "http://[::1]:8080/"));
        assert!(!allowed(&["[::1]:8080"], "http://[::1]:8081/"));
        // A wildcard does not widen what an entry naming the host allows.
        let corp = ["*.corp", "db.corp:5432"];
        assert!(allowed(&corp, "http://db.corp:5432/"));
        assert!(!allowed(&corp, "http://db.corp:9999/"));
        assert!(allowed(&corp, "http://api.corp/"));
        assert!(!allowed(&corp, "http://example.com/"));
    }

    #[test]
    fn targets_in_proxy_and_explicit_form() {
        let proxy: Uri = "http://pay.example:8080/v1/charges?x=1".parse().unwrap();
        assert_eq!(
            target_url(&proxy).unwrap().as_str(),
            "http://pay.example:8080/v1/charges?x=1"
        );
        let explicit: Uri = "/https/api.example.com/v1/charges?x=1".parse().unwrap();
        assert_eq!(
            target_url(&explicit).unwrap().as_str(),
            "https://api.example.com/v1/charges?x=1"
        );
        assert!(target_url(&"/ftp/x/y".parse().unwrap()).is_err());
        assert!(target_url(&"/v1/charges".parse().unwrap()).is_err());
    }
}
