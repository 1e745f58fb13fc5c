//! Serves handlers over HTTP: the discovery document and one route per handler.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use durin_protocol::{
    Discovery, EntryKind, HandlerSpec, InvocationRequest, KeySpec, Outcome, RetryPolicy,
    ServiceKind, ServiceSpec, HEADER_SIGNATURE, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
    SIGNATURE_VERSION, STREAM_CONTENT_TYPE, STREAM_VERSION,
};
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::context::Context;
use crate::error::HandlerError;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type BoxedHandler =
    Arc<dyn Fn(Context, Value) -> BoxFuture<Result<Value, HandlerError>> + Send + Sync>;

/// Declared options of a handler, published in the discovery document.
#[derive(Debug, Clone, Default)]
pub struct HandlerOptions {
    /// Retry policy of the handler's attempts (the gateway's default when `None`).
    pub retry_policy: Option<RetryPolicy>,
    /// Bound on one attempt (the gateway's default when `None`).
    pub start_to_close: Option<Duration>,
    /// Bound on the whole invocation from its creation, attempts and waits included (a
    /// workflow run's execution timeout; the gateway's default when `None`).
    pub schedule_to_close: Option<Duration>,
    /// Bound on how late an attempt may start after it was due.
    pub schedule_to_start: Option<Duration>,
    /// An attempt that sends no [`crate::Context::heartbeat`] for this long is ended.
    pub heartbeat_timeout: Option<Duration>,
    /// Makes the handler keyed: invocations with the same key run at most `limit` at a
    /// time, the others wait their turn in arrival order (see [`KeySpec`]).
    pub key: Option<KeySpec>,
}

/// A named group of handlers.
pub struct Service {
    name: String,
    handlers: Vec<(HandlerSpec, BoxedHandler)>,
}

impl Service {
    pub fn new(name: impl Into<String>) -> Service {
        Service {
            name: name.into(),
            handlers: Vec::new(),
        }
    }

    /// Adds a handler with the gateway's default options.
    pub fn handler<I, O, F, Fut>(self, name: &str, f: F) -> Service
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(Context, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, HandlerError>> + Send + 'static,
    {
        self.handler_with(name, HandlerOptions::default(), f)
    }

    /// Adds a handler with its own retry policy or timeout.
    pub fn handler_with<I, O, F, Fut>(
        mut self,
        name: &str,
        options: HandlerOptions,
        f: F,
    ) -> Service
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(Context, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, HandlerError>> + Send + 'static,
    {
        let f = Arc::new(f);
        let boxed: BoxedHandler = Arc::new(move |ctx: Context, input: Value| {
            let f = Arc::clone(&f);
            Box::pin(async move {
                let input: I = serde_json::from_value(input).map_err(|e| {
                    HandlerError::terminal_with_status(400, format!("the input is not valid: {e}"))
                        .with_type("InvalidInput")
                })?;
                let output = f(ctx, input).await?;
                serde_json::to_value(output).map_err(|e| {
                    HandlerError::terminal(format!("the output cannot be serialized: {e}"))
                })
            })
        });
        let spec = HandlerSpec {
            name: name.to_owned(),
            path: Some(format!("/{}/{}", self.name, name)),
            retry_policy: options.retry_policy,
            start_to_close: options.start_to_close,
            schedule_to_close: options.schedule_to_close,
            schedule_to_start: options.schedule_to_start,
            heartbeat_timeout: options.heartbeat_timeout,
            key: options.key,
        };
        self.handlers.push((spec, boxed));
        self
    }
}

/// The HTTP server of a set of services.
pub struct Endpoint {
    services: Vec<Service>,
    /// Durin's public key: when set, a request without Durin's valid signature is refused.
    verifier: Option<VerifyingKey>,
    /// The largest invocation request accepted.
    max_request_bytes: usize,
    /// Whether Durin may stream attempts (protocol 6), or calls once per attempt.
    streaming: bool,
}

/// The default bound on an invocation request: above what Durin sends at its default
/// limits (a 1 MiB input and a journal of at most 50 MiB, with its framing).
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 64 * 1024 * 1024;

impl Default for Endpoint {
    fn default() -> Endpoint {
        Endpoint {
            services: Vec::new(),
            verifier: None,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            streaming: true,
        }
    }
}

#[derive(Clone)]
struct EndpointState {
    http: reqwest::Client,
    verifier: Option<Arc<VerifyingKey>>,
    /// An invocation request carries the whole journal, which can be larger than axum's
    /// default 2 MB limit.
    max_request_bytes: usize,
}

/// How far a signature's time may be from this clock (a replay of an old request is
/// refused).
const SIGNATURE_TOLERANCE_MS: i64 = 5 * 60 * 1000;

impl Endpoint {
    pub fn new() -> Endpoint {
        Endpoint::default()
    }

    /// Refuses every invocation request that does not carry Durin's signature under
    /// `public_key` (what `durin serve` prints as `ed25519:…` and serves at
    /// `GET /v1/signing-key` on its admin listener), so that a forged request, with a forged
    /// journal or a `context_url` elsewhere, never reaches a handler.
    pub fn verify_signatures(mut self, public_key: &str) -> Result<Endpoint, String> {
        let encoded = public_key.trim().trim_start_matches("ed25519:");
        let bytes: [u8; 32] = STANDARD
            .decode(encoded)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| format!("{public_key:?} is not a base64 Ed25519 public key"))?;
        self.verifier = Some(
            VerifyingKey::from_bytes(&bytes)
                .map_err(|e| format!("{public_key:?} is not an Ed25519 public key: {e}"))?,
        );
        Ok(self)
    }

    /// Refuses invocation requests larger than `bytes` with `413` before reading them
    /// further ([`DEFAULT_MAX_REQUEST_BYTES`] unless set). Durin pauses an invocation whose
    /// request is refused so; raise the bound and resume it.
    pub fn max_request_bytes(mut self, bytes: usize) -> Endpoint {
        self.max_request_bytes = bytes;
        self
    }

    /// Whether Durin streams each attempt (protocol 6, the default): the appends travel on
    /// the invocation's own exchange, whose request and answer stay open together. Turn it
    /// off for a deployment that Durin reaches through something that holds a request
    /// until its body ends (a buffering proxy, a serverless platform): the deployment then
    /// declares protocol 5, and Durin sends each attempt in one body
    /// and takes each append as a call of its own.
    pub fn streaming(mut self, on: bool) -> Endpoint {
        self.streaming = on;
        self
    }

    pub fn service(mut self, service: Service) -> Endpoint {
        self.services.push(service);
        self
    }

    /// The discovery document this endpoint serves.
    pub fn discovery(&self) -> Discovery {
        Discovery {
            protocol: if self.streaming {
                PROTOCOL_VERSION
            } else {
                STREAM_VERSION - 1
            },
            services: self
                .services
                .iter()
                .map(|s| ServiceSpec {
                    name: s.name.clone(),
                    kind: ServiceKind::Service,
                    handlers: s.handlers.iter().map(|(spec, _)| spec.clone()).collect(),
                })
                .collect(),
        }
    }

    /// An axum router with `GET /discover` and one `POST` route per handler.
    pub fn router(self) -> Router {
        let discovery = Arc::new(self.discovery());
        let state = EndpointState {
            http: reqwest::Client::new(),
            verifier: self.verifier.map(Arc::new),
            max_request_bytes: self.max_request_bytes,
        };
        let mut router = Router::new().route(
            "/discover",
            get(move || {
                let discovery = Arc::clone(&discovery);
                async move { Json((*discovery).clone()) }
            }),
        );
        for service in self.services {
            for (spec, handler) in service.handlers {
                let path = spec.path.clone().unwrap_or_default();
                router = router.route(
                    &path,
                    post(
                        move |state: State<EndpointState>, request: axum::extract::Request| {
                            invoke(state, Arc::clone(&handler), request)
                        },
                    ),
                );
            }
        }
        router.with_state(state)
    }

    /// Serves until the process ends, on a listener from [`bind`] (or any other).
    pub async fn serve(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        let listener = listener.tap_io(|stream| {
            // Answers are small and latency matters more than packet count.
            let _ = stream.set_nodelay(true);
        });
        axum::serve(listener, self.router()).await
    }
}

/// The connections a listener from [`bind`] holds before they are accepted. Tokio's own
/// `TcpListener::bind` asks for 128: Durin opens a connection for each attempt that runs
/// at once, and when a burst of them overflows the backlog, the dropped handshakes wait a
/// second for their retry. The system's limit (`net.core.somaxconn` on Linux) still caps it.
pub const LISTEN_BACKLOG: u32 = 4096;

/// A listener for [`Endpoint::serve`] on the first of `address`'s addresses that binds,
/// holding [`LISTEN_BACKLOG`] connections not yet accepted.
pub async fn bind(
    address: impl tokio::net::ToSocketAddrs,
) -> std::io::Result<tokio::net::TcpListener> {
    let mut last_error = None;
    for address in tokio::net::lookup_host(address).await? {
        let socket = match address {
            std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        // As tokio's bind: a restarted handler binds its port again at once (not on
        // Windows, where the option would let another process take a port in use).
        #[cfg(not(windows))]
        socket.set_reuseaddr(true)?;
        match socket.bind(address) {
            Ok(()) => return socket.listen(LISTEN_BACKLOG),
            Err(error) => last_error = Some(error),
        }
    }
    Err(last_error.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the address resolved to nothing",
        )
    }))
}

/// Checks Durin's signature of a request (version 3, see
/// [`durin_protocol::signed_message`]): its time, path, body and every `Durin-*` header it
/// carries, so that a request whose `Durin-Cancelled`, `Durin-Attempt-Token` or
/// `Durin-Workflow-Id` was added, removed or changed is refused like a forged one.
fn verify(
    key: &VerifyingKey,
    headers: &HeaderMap,
    path: &str,
    body: &[u8],
    now_ms: i64,
) -> Result<(), String> {
    // A signed header sent twice could be read one way here and another by the handler.
    let mut carried: Vec<(&str, &str)> = Vec::new();
    let mut signature = None;
    for name in headers.keys() {
        let name = name.as_str();
        if !name.starts_with("durin-") {
            continue;
        }
        let mut values = headers.get_all(name).iter();
        let value = values
            .next()
            .map(|v| v.to_str().map_err(|_| format!("{name} is not text")))
            .transpose()?
            .unwrap_or_default();
        if values.next().is_some() {
            return Err(format!("{name} appears more than once"));
        }
        if name == HEADER_SIGNATURE {
            signature = Some(value);
        } else {
            carried.push((name, value));
        }
    }
    let signature = signature.ok_or_else(|| format!("no {HEADER_SIGNATURE} header"))?;
    let field = |name: &str| {
        signature.split(',').find_map(|part| {
            let (key, value) = part.trim().split_once('=')?;
            (key == name).then_some(value)
        })
    };
    let timestamp_ms: i64 = field("t")
        .ok_or_else(|| format!("{HEADER_SIGNATURE} has no t"))?
        .parse()
        .map_err(|_| format!("{HEADER_SIGNATURE}: t is not a number"))?;
    let Some(encoded) = field(SIGNATURE_VERSION) else {
        return Err(match ["v1", "v2"].into_iter().find(|v| field(v).is_some()) {
            Some(old) => format!(
                "{HEADER_SIGNATURE} is of version {}, from a Durin older than this SDK, which checks version 3 (it covers every Durin-* header): upgrade Durin",
                &old[1..]
            ),
            None => format!("{HEADER_SIGNATURE} has no {SIGNATURE_VERSION}"),
        });
    };
    if now_ms.abs_diff(timestamp_ms) > SIGNATURE_TOLERANCE_MS.unsigned_abs() {
        return Err("the signature is more than 5 minutes away from this clock".into());
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(encoded)
        .map_err(|_| format!("{HEADER_SIGNATURE}: {SIGNATURE_VERSION} is not base64url"))?;
    let signature = Signature::from_slice(&bytes).map_err(|_| {
        format!("{HEADER_SIGNATURE}: {SIGNATURE_VERSION} is not an Ed25519 signature")
    })?;
    let message = durin_protocol::signed_message(timestamp_ms, path, &carried, body);
    key.verify(&message, &signature)
        .map_err(|_| "the signature does not verify with Durin's public key".into())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// An invocation: in one JSON body, or streamed (version 6: the body's first line, then
/// Durin's answers to the appends, which go as lines of the answer with the outcome last).
async fn invoke(
    State(state): State<EndpointState>,
    handler: BoxedHandler,
    request: axum::extract::Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let streamed = parts
        .headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(STREAM_CONTENT_TYPE));
    let (body, rest) = if streamed {
        let mut stream = body.into_data_stream();
        match crate::stream::first_line(&mut stream, state.max_request_bytes).await {
            Ok((first, rest)) => (first, Some((stream, rest))),
            Err(refused) => return refused.into_response(),
        }
    } else {
        match axum::body::to_bytes(body, state.max_request_bytes).await {
            Ok(body) => (body, None),
            Err(e) => {
                return (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the invocation request could not be read: {e}"),
                )
                    .into_response()
            }
        }
    };
    let mut request = match accepted(&state, &parts.headers, &parts.uri, &body) {
        Ok(request) => request,
        Err(refused) => return refused,
    };
    let input = std::mem::take(&mut request.input);
    let Some((body, rest)) = rest else {
        let ctx = Context::new(&mut request, state.http, None);
        let result = handler(ctx.clone(), input).await;
        let outcome: Outcome = ctx.finish(result).await;
        return Json(outcome).into_response();
    };
    let (stream, answer) = crate::stream::AttemptStream::new();
    let stream = Arc::new(stream);
    let reader = Arc::clone(&stream);
    let ctx = Context::new(&mut request, state.http, Some(Arc::clone(&stream)));
    let running = tokio::spawn(async move {
        let result = handler(ctx.clone(), input).await;
        let outcome: Outcome = ctx.finish(result).await;
        stream.finish(&outcome);
    });
    // Durin ends its side once it has the outcome, or when the attempt is over for it (its
    // timeout, its own end): a handler still running then is stopped, as a handler whose
    // caller hangs up is, so that it starts nothing for an attempt that is gone.
    let running = running.abort_handle();
    tokio::spawn(async move {
        reader.read_answers(body, rest).await;
        running.abort();
    });
    (
        [(axum::http::header::CONTENT_TYPE, STREAM_CONTENT_TYPE)],
        answer,
    )
        .into_response()
}

/// The invocation request in `body`, once its signature, version and journal are
/// checked; or the answer that refuses it.
#[allow(clippy::result_large_err)]
fn accepted(
    state: &EndpointState,
    headers: &HeaderMap,
    uri: &Uri,
    body: &[u8],
) -> Result<InvocationRequest, Response> {
    if let Some(key) = &state.verifier {
        if let Err(why) = verify(key, headers, uri.path(), body, now_ms()) {
            return Err((
                StatusCode::UNAUTHORIZED,
                format!("not a request signed by Durin: {why}"),
            )
                .into_response());
        }
    }
    let request: InvocationRequest = match serde_json::from_slice(body) {
        Ok(request) => request,
        Err(e) => {
            return Err((
                StatusCode::BAD_REQUEST,
                format!("not a Durin invocation request: {e}"),
            )
                .into_response())
        }
    };
    if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&request.protocol) {
        return Err((
            StatusCode::BAD_REQUEST,
            format!(
                "protocol version {} is not supported; this SDK speaks {PROTOCOL_VERSION}",
                request.protocol
            ),
        )
            .into_response());
    }
    // A kind this SDK does not know comes from a newer gateway or SDK: replaying past it
    // would be a guess, and failing for good would lose the invocation during a rolling
    // upgrade. The attempt is retried (a newer SDK deployment will take it).
    if let Some(entry) = request
        .journal
        .iter()
        .find(|e| e.kind == EntryKind::Unknown)
    {
        return Err(Json(Outcome::Retry {
            error: format!(
                "journal entry {} has a kind this SDK does not know (protocol {PROTOCOL_VERSION}); deploy a newer SDK",
                entry.index
            ),
            error_type: Some("UnknownEntryKind".into()),
            retry_after_ms: None,
            step: None,
        })
        .into_response());
    }
    Ok(request)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    /// A listener from [`bind`] holds a burst of connections that nothing has accepted
    /// yet: more of them than tokio's default backlog of 128 (as many as the kernel's own
    /// cap, `net.core.somaxconn`, lets through). A handshake the kernel dropped would wait
    /// a second for its retry, past the timeout.
    #[tokio::test]
    async fn a_burst_of_connections_fits_the_backlog() {
        let listener = bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(4096);
        let burst = somaxconn.min(400);
        let connects = (0..burst).map(|_| {
            tokio::time::timeout(
                Duration::from_millis(800),
                tokio::net::TcpStream::connect(address),
            )
        });
        let results = futures_util::future::join_all(connects).await;
        let connected = results
            .iter()
            .filter(|result| matches!(result, Ok(Ok(_))))
            .count();
        assert_eq!(
            connected, burst,
            "connections that completed their handshake"
        );
        drop(listener);
    }

    /// A deployment that does not stream declares the version before streaming, so that
    /// Durin sends it each attempt in one body.
    #[test]
    fn streaming_is_declared_by_the_version() {
        assert_eq!(Endpoint::new().discovery().protocol, STREAM_VERSION);
        assert_eq!(
            Endpoint::new().streaming(false).discovery().protocol,
            STREAM_VERSION - 1
        );
    }

    /// A journal entry of a kind this SDK does not know (a newer gateway) is answered with a
    /// retryable outcome naming the problem, never a terminal failure, and the handler does
    /// not run.
    #[tokio::test]
    async fn an_unknown_entry_kind_is_a_retryable_error() {
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&ran);
        let router = Endpoint::new()
            .service(
                Service::new("s").handler("h", move |_ctx: Context, _: Value| {
                    let flag = Arc::clone(&flag);
                    async move {
                        flag.store(true, std::sync::atomic::Ordering::SeqCst);
                        Ok::<_, HandlerError>(1)
                    }
                }),
            )
            .router();
        let request = serde_json::json!({
            "protocol": PROTOCOL_VERSION, "invocation_id": "inv_x", "attempt": 2,
            "attempt_token": "t", "service": "s", "handler": "h", "input": null,
            "journal": [{"index": 1, "kind": "teleport", "attempt": 1, "at_ms": 1}],
            "position_failures": 0, "context_url": "http://127.0.0.1:1/v1/contexts/inv_x",
        });
        let response = router
            .oneshot(
                Request::post("/s/h")
                    .header("content-type", "application/json")
                    .body(Body::from(request.to_string()))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let outcome: Outcome = serde_json::from_slice(&body).unwrap();
        match outcome {
            Outcome::Retry { error_type, .. } => {
                assert_eq!(error_type.as_deref(), Some("UnknownEntryKind"))
            }
            other => panic!("{other:?}"),
        }
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
    }

    /// With Durin's public key configured, only requests carrying Durin's valid signature
    /// reach the handler: a forged one, a changed body, an old one, one signed with
    /// version 1 only, and one whose `Durin-*` headers were changed (made a cancellation,
    /// given another token or none, a header sent twice) are refused with 401.
    #[tokio::test]
    async fn only_requests_signed_by_durin_reach_the_handler() {
        use durin_protocol::{SignedHeaders, HEADER_ATTEMPT_TOKEN, HEADER_CANCELLED};
        use ed25519_dalek::{Signer, SigningKey};
        let durin = SigningKey::from_bytes(&[7; 32]);
        let public = STANDARD.encode(durin.verifying_key().to_bytes());
        let ran = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let count = Arc::clone(&ran);
        let router = Endpoint::new()
            .service(
                Service::new("s").handler("h", move |_ctx: Context, _: Value| {
                    let count = Arc::clone(&count);
                    async move {
                        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        Ok::<_, HandlerError>(1)
                    }
                }),
            )
            .verify_signatures(&format!("ed25519:{public}"))
            .unwrap()
            .router();
        let body = serde_json::json!({
            "protocol": PROTOCOL_VERSION, "invocation_id": "inv_x", "attempt": 1,
            "attempt_token": "t", "service": "s", "handler": "h", "input": null,
            "journal": [], "position_failures": 0,
            "context_url": "http://127.0.0.1:1/v1/contexts/inv_x",
        })
        .to_string();
        let protocol = PROTOCOL_VERSION.to_string();
        // What Durin sends, each header signed.
        let genuine = SignedHeaders {
            invocation_id: "inv_x",
            attempt: "1",
            attempt_token: "t",
            cancelled: "",
            protocol: &protocol,
            replay: "",
            workflow_id: "",
        };
        let sign_with = |key: &SigningKey, t: i64, headers: &SignedHeaders<'_>, body: &str| {
            let message =
                durin_protocol::signed_message(t, "/s/h", &headers.carried(), body.as_bytes());
            format!(
                "t={t},v3={}",
                URL_SAFE_NO_PAD.encode(key.sign(&message).to_bytes())
            )
        };
        // The headers a request carries: the non-empty ones.
        let carried = |headers: &SignedHeaders<'_>| -> Vec<(&'static str, String)> {
            headers
                .carried()
                .into_iter()
                .map(|(name, value)| (name, value.to_owned()))
                .collect()
        };
        let send = |signature: Option<String>,
                    headers: Vec<(&'static str, String)>,
                    body: String| {
            let router = router.clone();
            async move {
                let mut request = Request::post("/s/h").header("content-type", "application/json");
                for (name, value) in headers {
                    request = request.header(name, value);
                }
                if let Some(signature) = signature {
                    request = request.header(HEADER_SIGNATURE, signature);
                }
                let response = router
                    .oneshot(request.body(Body::from(body)).unwrap())
                    .await
                    .unwrap();
                let status = response.status();
                let text = axum::body::to_bytes(response.into_body(), usize::MAX)
                    .await
                    .unwrap();
                (status, String::from_utf8_lossy(&text).into_owned())
            }
        };
        let refused = |(status, text): (StatusCode, String), why: &str| {
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{text}");
            assert!(text.contains(why), "{text:?} does not say {why:?}");
        };
        let now = now_ms();
        let signature = sign_with(&durin, now, &genuine, &body);
        let sent = carried(&genuine);

        let (status, text) = send(Some(signature.clone()), sent.clone(), body.clone()).await;
        assert_eq!(status, StatusCode::OK, "{text}");
        refused(
            send(None, sent.clone(), body.clone()).await,
            "no durin-signature",
        );
        let changed = body.replace("contexts/inv_x", "contexts/inv_y");
        refused(
            send(Some(signature.clone()), sent.clone(), changed).await,
            "does not verify",
        );
        let old = sign_with(&durin, now - 10 * 60 * 1000, &genuine, &body);
        refused(
            send(Some(old), sent.clone(), body.clone()).await,
            "5 minutes",
        );
        let forged = sign_with(&SigningKey::from_bytes(&[8; 32]), now, &genuine, &body);
        refused(
            send(Some(forged), sent.clone(), body.clone()).await,
            "does not verify",
        );

        // The genuine request replayed as a cancellation, with another token or none.
        let cancelled = SignedHeaders {
            cancelled: "true",
            ..genuine
        };
        for altered in [
            cancelled,
            SignedHeaders {
                attempt_token: "stolen",
                ..genuine
            },
            SignedHeaders {
                attempt_token: "",
                ..genuine
            },
            SignedHeaders {
                workflow_id: "someone-else",
                ..genuine
            },
        ] {
            refused(
                send(Some(signature.clone()), carried(&altered), body.clone()).await,
                "does not verify",
            );
        }
        // A signed header sent twice: a second token, a cancellation said twice.
        let mut second_token = carried(&genuine);
        second_token.push((HEADER_ATTEMPT_TOKEN, "stolen".to_owned()));
        let mut cancelled_twice = carried(&cancelled);
        cancelled_twice.push((HEADER_CANCELLED, "true".to_owned()));
        for twice in [second_token, cancelled_twice] {
            refused(
                send(Some(signature.clone()), twice, body.clone()).await,
                "appears more than once",
            );
        }
        // A request Durin signed as a cancellation passes with the header it was signed with.
        let (status, text) = send(
            Some(sign_with(&durin, now, &cancelled, &body)),
            carried(&cancelled),
            body.clone(),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{text}");

        // Version 1 (the invocation id, attempt and body only) is refused, saying why.
        let v1 = format!("durin-signature-v1\n{now}\n/s/h\ninv_x\n1\n{body}");
        let v1 = format!(
            "t={now},v1={}",
            URL_SAFE_NO_PAD.encode(durin.sign(v1.as_bytes()).to_bytes())
        );
        refused(
            send(Some(v1), sent.clone(), body.clone()).await,
            "version 1",
        );
        // Version 2 (a fixed list of headers) is refused too.
        let v2 = signature.replace("v3=", "v2=");
        refused(
            send(Some(v2), sent.clone(), body.clone()).await,
            "version 2",
        );
        // A Durin-* header added on the way, whatever its name, fails the check.
        let mut added = sent;
        added.push(("durin-anything", "x".to_owned()));
        refused(
            send(Some(signature.clone()), added, body.clone()).await,
            "does not verify",
        );
        assert_eq!(
            ran.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "only the requests Durin signed as they are ran"
        );
    }
}
