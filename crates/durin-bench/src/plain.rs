//! The servers of the "order3-egress" scenario, run inside this bench process: the order
//! workflow written as a plain HTTP handler without any SDK, and the downstream its three
//! side effects go to.
//!
//! Durin calls the handler at `POST /order/process` with the order and the headers
//! `Durin-Invocation-Id` and `Durin-Attempt`. The handler makes its three side effects
//! (`/charge`, `/reserve`, `/send`) one after another as outbound HTTP calls through
//! Durin's egress, in its explicit form `POST {egress}/http/{downstream}/{step}`, with both
//! headers copied, so that Durin journals each call and its answer (DESIGN.md section 1,
//! "Without an SDK"). It then answers the same result as the SDK example, as a JSON string.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::serve::ListenerExt;
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The path Durin calls the plain handler at; declared when the deployment is registered.
pub const HANDLER_PATH: &str = "/order/process";

/// The headers Durin sends with each attempt and the egress requires on each call. They are
/// spelled out rather than taken from the protocol crate: the point of the scenario is a
/// handler that knows nothing of Durin but this contract.
const HEADER_INVOCATION_ID: &str = "durin-invocation-id";
const HEADER_ATTEMPT: &str = "durin-attempt";
const HEADER_ATTEMPT_TOKEN: &str = "durin-attempt-token";

/// The attempt a call speaks for: its number and its secret, as Durin handed them over.
#[derive(Clone, Copy)]
struct Attempt<'a> {
    number: &'a str,
    token: &'a str,
}

/// One server of this process, stopped when dropped.
pub struct Server {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `router` on a fresh port of 127.0.0.1 until the returned guard is dropped.
async fn serve(name: &'static str, router: Router) -> Result<Server> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .with_context(|| format!("cannot listen for the {name}"))?;
    let addr = listener
        .local_addr()
        .with_context(|| format!("cannot read the address of the {name}"))?;
    // Answers are small and latency matters more than packet count, as in Durin itself.
    let listener = listener.tap_io(|stream| {
        let _ = stream.set_nodelay(true);
    });
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            eprintln!("durin-bench: the {name} stopped: {e}");
        }
    });
    Ok(Server { addr, task })
}

/// Starts the downstream: `POST /charge`, `/reserve` and `/send`, each answering a small
/// JSON object whose one field is derived from the `order_id` of the request body.
pub async fn downstream() -> Result<Server> {
    let router = Router::new()
        .route(
            "/charge",
            post(|body: Bytes| async move { side_effect(&body, "charge_id", "charge") }),
        )
        .route(
            "/reserve",
            post(|body: Bytes| async move { side_effect(&body, "reservation_id", "reservation") }),
        )
        .route(
            "/send",
            post(|body: Bytes| async move { side_effect(&body, "message_id", "message") }),
        );
    serve("downstream", router).await
}

/// Answers `{field: "{prefix}_{order_id}"}`, or 400 when the body names no order.
fn side_effect(body: &[u8], field: &str, prefix: &str) -> Response {
    let order_id = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("order_id")?.as_str().map(str::to_owned));
    match order_id {
        Some(id) => {
            let mut answer = Map::new();
            answer.insert(field.to_owned(), Value::String(format!("{prefix}_{id}")));
            Json(Value::Object(answer)).into_response()
        }
        None => (StatusCode::BAD_REQUEST, "the body needs a string order_id").into_response(),
    }
}

/// What the handler needs for its calls.
struct Plain {
    /// One client for all calls, so they reuse keep-alive connections to the egress.
    http: reqwest::Client,
    /// The egress's base URL, e.g. `http://127.0.0.1:41235`.
    egress: String,
    /// The downstream's `host:port`, the target part of the explicit egress form.
    downstream: SocketAddr,
}

/// Why the handler could not finish: the status Durin gets and a detail for its log.
type Failure = (StatusCode, String);

/// Starts the plain order handler, which calls `downstream` through the egress at `egress`.
pub async fn handler(egress: &str, downstream: SocketAddr) -> Result<Server> {
    let http = reqwest::Client::builder()
        .tcp_nodelay(true)
        // The egress may retry a failing downstream for a while, but a hung call must still
        // end so that Durin retries the attempt.
        .timeout(Duration::from_secs(60))
        .build()
        .context("cannot build the handler's HTTP client")?;
    let plain = Arc::new(Plain {
        http,
        egress: egress.trim_end_matches('/').to_owned(),
        downstream,
    });
    let router = Router::new()
        .route(HANDLER_PATH, post(process))
        .with_state(plain);
    serve("plain order handler", router).await
}

async fn process(State(plain): State<Arc<Plain>>, headers: HeaderMap, body: Bytes) -> Response {
    match plain.process(&headers, &body).await {
        // `Json` of a string answers the JSON string with `application/json`.
        Ok(result) => Json(result).into_response(),
        Err((status, detail)) => (status, detail).into_response(),
    }
}

impl Plain {
    /// The order workflow: charge, reserve, send, each through the egress.
    async fn process(&self, headers: &HeaderMap, body: &[u8]) -> Result<String, Failure> {
        // Missing headers or a bad order are the caller's mistake and would fail on every
        // retry, so they are answered with a 4xx, which Durin treats as terminal.
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
                .ok_or_else(|| (StatusCode::BAD_REQUEST, format!("no {name} header")))
        };
        let invocation = header(HEADER_INVOCATION_ID)?;
        let attempt = header(HEADER_ATTEMPT)?;
        let token = header(HEADER_ATTEMPT_TOKEN)?;
        let order: Value = serde_json::from_slice(body).map_err(|e| {
            (
                StatusCode::BAD_REQUEST,
                format!("the order is not JSON: {e}"),
            )
        })?;
        let order_id = order
            .get("order_id")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                (
                    StatusCode::BAD_REQUEST,
                    "the order has no order_id".to_owned(),
                )
            })?;
        let id = invocation.as_str();
        let attempt = Attempt {
            number: &attempt,
            token: &token,
        };

        let charge = self
            .call(
                id,
                attempt,
                "charge",
                json!({
                    "order_id": order_id,
                    "customer_id": order.get("customer_id"),
                    "amount_cents": order.get("amount_cents"),
                }),
                "charge_id",
            )
            .await?;
        let reservation = self
            .call(
                id,
                attempt,
                "reserve",
                json!({ "order_id": order_id }),
                "reservation_id",
            )
            .await?;
        self.call(
            id,
            attempt,
            "send",
            json!({
                "order_id": order_id,
                "charge_id": charge,
                "reservation_id": reservation,
            }),
            "message_id",
        )
        .await?;
        Ok(format!(
            "order {order_id} complete charge {charge} reservation {reservation}"
        ))
    }

    /// Sends one side effect through the egress and returns the string `field` of the
    /// downstream's JSON answer.
    async fn call(
        &self,
        invocation: &str,
        attempt: Attempt<'_>,
        step: &str,
        body: Value,
        field: &str,
    ) -> Result<String, Failure> {
        let url = format!("{}/http/{}/{step}", self.egress, self.downstream);
        // Every failure to get an answer is retryable (502): Durin then runs a new attempt,
        // and the egress answers the calls it journaled from the journal.
        let retryable = |detail: String| (StatusCode::BAD_GATEWAY, format!("{step}: {detail}"));
        let response = self
            .http
            .post(&url)
            .header(HEADER_INVOCATION_ID, invocation)
            .header(HEADER_ATTEMPT, attempt.number)
            .header(HEADER_ATTEMPT_TOKEN, attempt.token)
            .json(&body)
            .send()
            .await
            .map_err(|e| retryable(format!("cannot reach the egress: {e}")))?;
        let status = response.status();
        let answer = response
            .bytes()
            .await
            .map_err(|e| retryable(format!("cannot read the answer: {e}")))?;
        if !status.is_success() {
            let detail = format!(
                "the egress answered {status}: {}",
                String::from_utf8_lossy(&answer)
            );
            // A refusal (an allow-list miss, an attempt that is no longer current, a
            // downstream's 4xx) will not change on a retry; 408 and 429 may.
            let terminal = status.is_client_error()
                && status != StatusCode::REQUEST_TIMEOUT
                && status != StatusCode::TOO_MANY_REQUESTS;
            return Err(if terminal {
                (
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("{step}: {detail}"),
                )
            } else {
                retryable(detail)
            });
        }
        serde_json::from_slice::<Value>(&answer)
            .ok()
            .and_then(|v| v.get(field)?.as_str().map(str::to_owned))
            .ok_or_else(|| {
                retryable(format!(
                    "the answer {:?} has no string {field}",
                    String::from_utf8_lossy(&answer)
                ))
            })
    }
}
