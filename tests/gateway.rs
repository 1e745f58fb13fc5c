//! The gateway in-process (`durin::run` on port 0, a real SQLite file) with real HTTP
//! handlers on port 0: idempotency, bad input, retries, timeouts, non-determinism, replayed
//! values and deployment pinning.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post};
use durin::config::Config;
use durin_protocol::RetryPolicy;
use durin_sdk::{Context, Endpoint, HandlerError, HandlerOptions, RunOptions, Service};
use serde_json::{json, Value};
use support::{client, eventually, journal, register, shape, InProcess, ORDER, ORDER_OUTPUT};
use tokio_util::sync::CancellationToken;

/// The in-process gateway (retrying fast), with the requests these tests make.
struct Gateway(InProcess);

impl std::ops::Deref for Gateway {
    type Target = InProcess;
    fn deref(&self) -> &InProcess {
        &self.0
    }
}

impl Gateway {
    async fn start(configure: impl FnOnce(&mut Config)) -> Gateway {
        Gateway(
            InProcess::start(|config| {
                config.retry_policy = fast_policy(5);
                configure(config);
            })
            .await,
        )
    }

    async fn stop(self) {
        self.0.stop().await;
    }

    async fn post(&self, path: &str, body: &str) -> reqwest::Response {
        post_json(&self.url, path, body).await
    }

    /// A `POST` to the admin API.
    async fn admin_post(&self, path: &str, body: &str) -> reqwest::Response {
        post_json(&self.admin, path, body).await
    }

    /// `POST /v1/send/...` (202); returns the invocation id.
    async fn send(&self, path: &str, body: &str) -> String {
        invocation_id(self.post(path, body).await).await
    }

    async fn invocation(&self, id: &str) -> Value {
        support::get_json(&format!("{}/v1/invocations/{id}", self.url)).await
    }

    async fn invocation_count(&self) -> usize {
        support::get_json(&format!("{}/v1/invocations", self.admin)).await["invocations"]
            .as_array()
            .unwrap()
            .len()
    }
}

async fn post_json(base: &str, path: &str, body: &str) -> reqwest::Response {
    client()
        .post(format!("{base}{path}"))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
}

/// The invocation id an answer names in its `Durin-Invocation-Id` header.
fn header_id(response: &reqwest::Response) -> String {
    response.headers()["durin-invocation-id"]
        .to_str()
        .unwrap()
        .to_owned()
}

/// The invocation id of a 202 answer.
async fn invocation_id(response: reqwest::Response) -> String {
    assert_eq!(response.status(), 202);
    response.json::<Value>().await.unwrap()["invocation_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn fast_policy(maximum_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        initial_interval: Duration::from_millis(20),
        maximum_interval: Duration::from_millis(100),
        maximum_attempts: Some(maximum_attempts),
        ..RetryPolicy::default()
    }
}

/// Serves `router` on 127.0.0.1:0 in this process; returns its URL.
async fn serve(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    url
}

async fn serve_order() -> String {
    let args = order_example::Args {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        step_delay_ms: 0,
        downstream: None,
        step_retry_initial_ms: 20,
        reserve_first: false,
    };
    serve(order_example::endpoint(args).router()).await
}

/// Asserts a problem response and returns its body.
async fn problem(response: reqwest::Response, status: u16, retryable: bool, detail: &str) -> Value {
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    assert!(response.headers().contains_key("durin-error-source"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], status, "{body}");
    assert!(body["type"]
        .as_str()
        .unwrap()
        .starts_with("urn:durin:problem:"));
    assert!(body["title"].is_string());
    assert_eq!(body["retryable"], retryable, "{body}");
    let text = body["detail"].as_str().unwrap();
    assert!(text.contains(detail), "{text:?} does not say {detail:?}");
    body
}

#[tokio::test]
async fn the_order_workflow_runs_and_its_journal_reads_well() {
    let gateway = Gateway::start(|_| {}).await;
    register(&gateway.admin, &serve_order().await).await;
    let response = gateway.post("/v1/call/order/process", ORDER).await;
    assert_eq!(response.status(), 200);
    let id = header_id(&response);
    assert_eq!(response.json::<String>().await.unwrap(), ORDER_OUTPUT);
    let entries = journal(&gateway.admin, &id).await;
    assert_eq!(shape(&entries), support::order_journal_shape());
    assert_eq!(entries[0]["value"]["order_id"], "o-1");
    assert_eq!(entries[1]["value"], "charge_o-1");
    assert_eq!(entries[4]["value"], ORDER_OUTPUT);
    for (i, entry) in entries.iter().enumerate() {
        assert_eq!(entry["index"], i);
        assert!(entry["at"].as_str().unwrap().ends_with('Z'));
    }
    let view = gateway.invocation(&id).await;
    assert_eq!(view["status"], "completed");
    assert_eq!(view["attempt"], 1);
    assert_eq!(view["output"], ORDER_OUTPUT);
    gateway.stop().await;
}

#[tokio::test]
async fn an_idempotency_key_names_one_invocation_and_one_response() {
    let gateway = Gateway::start(|_| {}).await;
    register(&gateway.admin, &serve_order().await).await;
    let call = |body: &'static str| {
        client()
            .post(format!("{}/v1/call/order/process", gateway.url))
            .header("content-type", "application/json")
            .header("idempotency-key", "order-o-1")
            .body(body)
            .send()
    };
    let first = call(ORDER).await.unwrap();
    assert_eq!(first.status(), 200);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let id = first.headers()["durin-invocation-id"].clone();
    let first_body = first.text().await.unwrap();

    // Whitespace and key order do not make it a different request.
    let again = call(r#"{ "amount_cents": 4999, "customer_id": "c-1", "order_id": "o-1" }"#)
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["durin-invocation-id"], id);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.text().await.unwrap(), first_body);

    // The same key on send re-attaches too.
    let sent = client()
        .post(format!("{}/v1/send/order/process", gateway.url))
        .header("content-type", "application/json")
        .header("idempotency-key", "order-o-1")
        .body(ORDER)
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 202);
    assert_eq!(sent.headers()["durin-invocation-id"], id);

    let other = r#"{"order_id":"o-2","customer_id":"c-1","amount_cents":1}"#;
    let body = problem(call(other).await.unwrap(), 422, false, "order-o-1").await;
    // The problem does not tell whose invocation the key names: it may be someone else's.
    assert!(body.get("invocation_id").is_none(), "{body}");
    assert!(!body.to_string().contains(id.to_str().unwrap()), "{body}");
    assert_eq!(gateway.invocation_count().await, 1);
    gateway.stop().await;
}

#[tokio::test]
async fn bad_input_gets_a_clear_problem_and_changes_nothing() {
    let gateway = Gateway::start(|c| c.max_body_bytes = 4096).await;
    register(&gateway.admin, &serve_order().await).await;
    let url = &gateway.url;
    let admin = &gateway.admin;
    let http = client();

    let r = gateway
        .post("/v1/call/order/process", r#"{"order_id": "#)
        .await;
    problem(r, 400, false, "not valid JSON").await;
    let r = gateway.post("/v1/call/nope/process", ORDER).await;
    problem(r, 404, false, "no deployment serves handler nope/process").await;
    let r = gateway.post("/v1/call/order/nope", ORDER).await;
    problem(r, 404, false, "order/nope").await;
    let r = gateway.post("/v1/call/bad%20name/process", ORDER).await;
    problem(r, 400, false, "service name").await;
    let big = format!(r#"{{"pad": "{}"}}"#, "x".repeat(5000));
    let r = gateway.post("/v1/call/order/process", &big).await;
    problem(r, 413, false, "4096 bytes").await;
    let r = http
        .post(format!("{url}/v1/call/order/process"))
        .header("content-type", "text/plain")
        .body(ORDER)
        .send()
        .await
        .unwrap();
    problem(r, 415, false, "must be JSON").await;
    for key in ["has space", &"k".repeat(256), ""] {
        let r = http
            .post(format!("{url}/v1/send/order/process"))
            .header("idempotency-key", key)
            .body(ORDER)
            .send()
            .await
            .unwrap();
        problem(r, 400, false, "Idempotency-Key").await;
    }

    let unknown = "inv_0193a2b4c5d6e7f8091a2b3c4d5e6f70";
    let r = http
        .get(format!("{url}/v1/invocations/{unknown}"))
        .send()
        .await
        .unwrap();
    problem(r, 404, false, unknown).await;
    let r = http
        .get(format!("{admin}/v1/invocations/{unknown}/journal"))
        .send()
        .await
        .unwrap();
    problem(r, 404, false, unknown).await;
    let r = http
        .get(format!("{url}/v1/invocations/inv_42"))
        .send()
        .await
        .unwrap();
    problem(r, 400, false, "32 hex digits").await;
    let r = http
        .get(format!("{admin}/v1/invocations?status=sleeping"))
        .send()
        .await
        .unwrap();
    problem(r, 400, false, "unknown status").await;

    let r = gateway.admin_post("/v1/deployments", "{").await;
    problem(r, 400, false, "deployment is not valid").await;
    let r = gateway
        .admin_post("/v1/deployments", r#"{"uri": "x"}"#)
        .await;
    problem(r, 400, false, "unknown field").await;
    let r = gateway
        .admin_post("/v1/deployments", r#"{"url": "ftp://x"}"#)
        .await;
    problem(r, 400, false, "http://").await;
    // A port nobody listens on: the gateway could not reach it, and may try again later.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed_url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let r = gateway
        .admin_post("/v1/deployments", &json!({ "url": closed_url }).to_string())
        .await;
    problem(r, 502, true, "/discover failed").await;
    let garbage = serve(axum::Router::new().route("/discover", get(|| async { "hello" }))).await;
    let r = gateway
        .admin_post("/v1/deployments", &json!({ "url": garbage }).to_string())
        .await;
    problem(r, 502, false, "not a discovery document").await;

    let r = http.get(format!("{url}/v1/nope")).send().await.unwrap();
    problem(r, 404, false, "no route").await;
    let r = http
        .delete(format!("{admin}/v1/deployments"))
        .send()
        .await
        .unwrap();
    problem(r, 405, false, "DELETE").await;

    // The context API refuses writes that do not come from the current attempt.
    let id = gateway_send(&gateway, ORDER).await;
    support::wait_final(url, &id).await;
    let entries_url = format!("{url}/v1/contexts/{id}/entries");
    let entry = json!({"index": 5, "kind": "step", "name": "late", "value": 1});
    let r = http.post(&entries_url).json(&entry).send().await.unwrap();
    problem(r, 400, false, "Durin-Attempt").await;
    let r = http
        .post(&entries_url)
        .header("durin-attempt", "1")
        .json(&entry)
        .send()
        .await
        .unwrap();
    problem(r, 400, false, "Durin-Attempt-Token").await;
    let r = http
        .post(&entries_url)
        .header("durin-attempt", "1")
        .header("durin-attempt-token", "forged")
        .json(&entry)
        .send()
        .await
        .unwrap();
    problem(r, 409, false, "not current").await;
    let r = http
        .post(&entries_url)
        .header("durin-attempt", "1")
        .header("durin-attempt-token", "forged")
        .body("[1, 2")
        .send()
        .await
        .unwrap();
    problem(r, 400, false, "entry is not valid").await;
    let output = json!({"index": 5, "kind": "output", "value": 1});
    let r = http
        .post(&entries_url)
        .header("durin-attempt", "1")
        .header("durin-attempt-token", "forged")
        .json(&output)
        .send()
        .await
        .unwrap();
    problem(r, 400, false, "written by the gateway").await;
    let r = http
        .post(format!("{url}/v1/contexts/{unknown}/entries"))
        .header("durin-attempt", "1")
        .header("durin-attempt-token", "forged")
        .json(&entry)
        .send()
        .await
        .unwrap();
    problem(r, 404, false, unknown).await;

    // Only the one good request created an invocation, and its journal is intact.
    assert_eq!(gateway.invocation_count().await, 1);
    assert_eq!(
        shape(&journal(admin, &id).await),
        support::order_journal_shape()
    );
    gateway.stop().await;
}

async fn gateway_send(gateway: &Gateway, body: &str) -> String {
    support::send_order(&gateway.url, body).await
}

#[tokio::test]
async fn a_handler_answering_garbage_fails_with_a_message_that_says_so() {
    let gateway = Gateway::start(|_| {}).await;
    let discovery = json!({"protocol": 1, "services": [{"name": "junk", "handlers": [
        {"name": "run", "retry_policy": {"initial_interval": "10ms", "maximum_attempts": 2}}
    ]}]});
    let url = serve(
        axum::Router::new()
            .route(
                "/discover",
                get(move || async move { axum::Json(discovery) }),
            )
            .route("/junk/run", post(|| async { "<html>garbage</html>" })),
    )
    .await;
    register(&gateway.admin, &url).await;
    let r = gateway.post("/v1/call/junk/run", "{}").await;
    assert_eq!(r.headers()["durin-error-source"], "handler");
    let header_id = header_id(&r);
    let body = problem(r, 500, false, "all 2 attempts failed").await;
    assert_eq!(body["invocation_id"], header_id.as_str());
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("protocol violation"), "{detail}");
    assert!(detail.contains("<html>garbage</html>"), "{detail}");
    let id = body["invocation_id"].as_str().unwrap();
    let entries = journal(&gateway.admin, id).await;
    assert_eq!(
        shape(&entries),
        vec![("input".to_owned(), None), ("output".to_owned(), None)]
    );
    assert_eq!(gateway.invocation(id).await["attempt"], 2);
    gateway.stop().await;
}

/// Version 5: the entries an output or a terminal failure carries are appended with the
/// end in one transaction; a command among them is a retryable protocol violation that
/// writes nothing, and an entry at the wrong index fails the invocation as a refused append
/// does, with the entries before it kept.
#[tokio::test]
async fn entries_that_come_with_the_outcome_are_appended_with_the_end() {
    let gateway = Gateway::start(|_| {}).await;
    let discovery = json!({"protocol": 5, "services": [{"name": "raw", "handlers": [
        {"name": "run", "retry_policy": {"initial_interval": "10ms", "maximum_attempts": 3}}
    ]}]});
    let answer = |request: Value| {
        let attempt = request["attempt"].as_u64().unwrap();
        let step = |index: u32, name: &str, value: Value| json!({"index": index, "kind": "step", "name": name, "value": value});
        match request["input"]["case"].as_str().unwrap() {
            // Attempt 1 sends a timer with its output: refused, nothing written.
            "good" if attempt == 1 => json!({"outcome": "output", "output": 0, "entries": [
                step(1, "charge", json!("ch_1")),
                {"index": 2, "kind": "sleep", "value": {"duration_ms": 5}},
            ]}),
            "good" => json!({"outcome": "output", "output": 2, "entries": [
                step(1, "charge", json!("ch_1")),
                {"index": 2, "kind": "now", "value": 1234},
                {"index": 3, "kind": "state", "name": "paid", "value": {"set": true}},
            ]}),
            "declined" => json!({"outcome": "failure",
                "failure": {"status": 402, "type": "CardDeclined", "message": "declined"},
                "entries": [{"index": 1, "kind": "step", "name": "charge",
                    "failure": {"status": 402, "type": "CardDeclined", "message": "declined"}}]}),
            _ => json!({"outcome": "output", "output": 3, "entries": [
                step(1, "charge", json!("ch_2")),
                step(7, "ship", json!("sh_2")),
            ]}),
        }
    };
    let url = serve(
        axum::Router::new()
            .route(
                "/discover",
                get(move || async move { axum::Json(discovery) }),
            )
            .route(
                "/raw/run",
                post(move |axum::Json(request): axum::Json<Value>| async move {
                    axum::Json(answer(request))
                }),
            ),
    )
    .await;
    register(&gateway.admin, &url).await;

    let r = gateway
        .post("/v1/call/raw/run", r#"{"case": "good"}"#)
        .await;
    assert_eq!(r.status(), 200);
    let id = header_id(&r);
    assert_eq!(r.json::<Value>().await.unwrap(), 2);
    let entries = journal(&gateway.admin, &id).await;
    let kinds: Vec<_> = entries
        .iter()
        .map(|e| (e["kind"].as_str().unwrap(), e["attempt"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("input", 0),
            ("step", 2),
            ("now", 2),
            ("state", 2),
            ("output", 2)
        ],
        "attempt 1's entries were refused whole: {entries:?}"
    );
    assert_eq!(entries[1]["value"], "ch_1");
    assert_eq!(entries[2]["value"], 1234);
    assert_eq!(
        gateway.invocation(&id).await["attempt"],
        2,
        "attempt 1 was retried"
    );

    let r = gateway
        .post("/v1/call/raw/run", r#"{"case": "declined"}"#)
        .await;
    let id = header_id(&r);
    problem(r, 402, false, "declined").await;
    // The input, the step that came with the end, and the end.
    let charged = vec![
        ("input".to_owned(), None),
        ("step".to_owned(), Some("charge".to_owned())),
        ("output".to_owned(), None),
    ];
    let entries = journal(&gateway.admin, &id).await;
    assert_eq!(shape(&entries), charged);
    assert_eq!(entries[1]["failure"]["type"], "CardDeclined");

    let r = gateway.post("/v1/call/raw/run", r#"{"case": "gap"}"#).await;
    let id = header_id(&r);
    let body = problem(r, 500, false, "refused entry 7").await;
    assert_eq!(body["error_type"], "JournalRefused", "{body}");
    let entries = journal(&gateway.admin, &id).await;
    assert_eq!(shape(&entries), charged, "the entry before the gap is kept");
    assert_eq!(gateway.invocation(&id).await["attempt"], 1, "not retried");
    gateway.stop().await;
}

/// One streamed attempt (version 6) as a raw handler sees it: the request's lines in, the
/// answer's lines out.
struct RawStream {
    request: axum::body::BodyDataStream,
    read: durin_protocol::Lines,
    answer: Option<tokio::sync::mpsc::UnboundedSender<Vec<u8>>>,
}

impl RawStream {
    /// The stream of `request` and the answer that carries what it sends.
    fn open(request: axum::extract::Request) -> (RawStream, axum::response::Response) {
        assert_eq!(
            request.headers()["content-type"],
            durin_protocol::STREAM_CONTENT_TYPE
        );
        // Chunked: its end is not known when it starts.
        assert_eq!(request.headers()["transfer-encoding"], "chunked");
        let (answer, lines) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
        let lines = futures_util::stream::unfold(lines, |mut lines| async move {
            let line = lines.recv().await?;
            Some((Ok::<_, std::convert::Infallible>(line), lines))
        });
        let response = axum::response::Response::builder()
            .header("content-type", durin_protocol::STREAM_CONTENT_TYPE)
            .body(axum::body::Body::from_stream(lines))
            .unwrap();
        let stream = RawStream {
            request: request.into_body().into_data_stream(),
            read: durin_protocol::Lines::default(),
            answer: Some(answer),
        };
        (stream, response)
    }

    /// The next line of the request; `None` once it has ended.
    async fn line(&mut self) -> Option<Value> {
        use futures_util::StreamExt;
        loop {
            if let Some(line) = self.read.next_line() {
                return Some(serde_json::from_slice(&line).unwrap());
            }
            match self.request.next().await {
                Some(Ok(chunk)) => self.read.push(&chunk),
                Some(Err(_)) | None => return None,
            }
        }
    }

    fn send(&self, frame: Value) {
        let mut line = serde_json::to_vec(&frame).unwrap();
        line.push(b'\n');
        let _ = self.answer.as_ref().unwrap().send(line);
    }

    /// Sends an append and returns the gateway's answer to it.
    async fn append(&mut self, entry: Value) -> Value {
        self.send(json!({ "append": entry }));
        self.line().await.expect("an answer to the append")
    }
}

/// Version 6: the appends, their answers and the outcome travel on the invocation's own
/// exchange, both bodies streamed. An append is answered once durable, a refused one with the context
/// API's problem; an answer that ends without an outcome is a retryable protocol violation
/// that keeps what was appended, and a handler may still answer in one JSON body. An
/// attempt that runs out of time has its request ended, so the handler learns it is over.
#[tokio::test]
async fn a_streamed_attempt_carries_its_appends_and_its_outcome() {
    use axum::response::IntoResponse;
    let gateway = Gateway::start(|_| {}).await;
    let discovery = json!({"protocol": 6, "services": [{"name": "raw", "handlers": [
        {"name": "run", "retry_policy": {"initial_interval": "10ms", "maximum_attempts": 3}},
        {"name": "slow", "start_to_close": "300ms",
         "retry_policy": {"initial_interval": "10ms", "maximum_attempts": 1}}
    ]}]});
    // What the handler heard: the answers to its appends, and whether the request ended.
    let heard: Arc<std::sync::Mutex<Vec<Value>>> = Arc::default();
    let step = |index: u32, name: &str, value: &str| json!({"index": index, "kind": "step", "name": name, "value": value});
    let (run_heard, slow_heard) = (Arc::clone(&heard), Arc::clone(&heard));
    let run = move |request: axum::extract::Request| {
        let heard = Arc::clone(&run_heard);
        async move {
            let (mut stream, response) = RawStream::open(request);
            let invocation = stream.line().await.unwrap();
            let attempt = invocation["attempt"].as_u64().unwrap();
            let case = invocation["input"]["case"].as_str().unwrap().to_owned();
            if case == "silent" && attempt == 2 {
                // The journal it resumes from, and an answer in one JSON body.
                let charged = &invocation["journal"][0];
                assert_eq!(
                    (charged["name"].as_str(), charged["value"].as_str()),
                    (Some("charge"), Some("ch_1"))
                );
                return axum::Json(json!({"outcome": "output", "output": "resumed"}))
                    .into_response();
            }
            tokio::spawn(async move {
                let mut answers = vec![stream.append(step(1, "charge", "ch_1")).await];
                if case == "silent" {
                    // Ends its answer with no outcome.
                    return;
                }
                answers.push(stream.append(step(5, "gap", "x")).await);
                answers.push(stream.append(step(2, "ship", "sh_1")).await);
                stream.send(json!({"outcome": {"outcome": "output", "output": "done",
                    "entries": [{"index": 3, "kind": "now", "value": 1234}]}}));
                let ended = stream.line().await.is_none();
                answers.push(json!({ "request_ended": ended }));
                heard.lock().unwrap().extend(answers);
            });
            response
        }
    };
    let slow = move |request: axum::extract::Request| {
        let heard = Arc::clone(&slow_heard);
        async move {
            let (mut stream, response) = RawStream::open(request);
            stream.line().await.unwrap();
            tokio::spawn(async move {
                let started = std::time::Instant::now();
                let ended = stream.line().await.is_none();
                heard.lock().unwrap().push(json!({
                    "slow_request_ended": ended,
                    "after_ms": started.elapsed().as_millis() as u64,
                }));
            });
            response
        }
    };
    let url = serve(
        axum::Router::new()
            .route(
                "/discover",
                get(move || async move { axum::Json(discovery) }),
            )
            .route("/raw/run", post(run))
            .route("/raw/slow", post(slow)),
    )
    .await;
    register(&gateway.admin, &url).await;

    let r = gateway
        .post("/v1/call/raw/run", r#"{"case": "good"}"#)
        .await;
    assert_eq!(r.status(), 200);
    let id = header_id(&r);
    assert_eq!(r.json::<Value>().await.unwrap(), "done");
    let entries = journal(&gateway.admin, &id).await;
    let kinds: Vec<_> = entries
        .iter()
        .map(|e| (e["kind"].as_str().unwrap(), e["name"].as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("input", None),
            ("step", Some("charge")),
            ("step", Some("ship")),
            ("now", None),
            ("output", None)
        ]
    );
    let answers = eventually(Duration::from_secs(5), "the handler's record", || async {
        let heard = heard.lock().unwrap();
        (heard.len() == 4).then(|| heard.clone())
    })
    .await;
    assert_eq!(answers[0]["appended"]["index"], 1, "{answers:?}");
    assert_eq!(answers[1]["refused"]["status"], 409, "{answers:?}");
    assert_eq!(
        answers[1]["refused"]["type"], "urn:durin:problem:conflict",
        "{answers:?}"
    );
    assert_eq!(answers[2]["appended"]["index"], 2, "{answers:?}");
    assert_eq!(
        answers[3]["request_ended"], true,
        "the gateway ends its side after the outcome"
    );
    heard.lock().unwrap().clear();

    let r = gateway
        .post("/v1/call/raw/run", r#"{"case": "silent"}"#)
        .await;
    let id = header_id(&r);
    assert_eq!(r.json::<Value>().await.unwrap(), "resumed");
    let record = gateway.invocation(&id).await;
    assert_eq!(record["attempt"], 2, "{record}");
    let entries = journal(&gateway.admin, &id).await;
    assert_eq!(
        shape(&entries).len(),
        3,
        "input, the step kept, output: {entries:?}"
    );

    let r = gateway.post("/v1/call/raw/slow", "{}").await;
    let body = problem(r, 500, false, "start_to_close").await;
    assert_eq!(body["error_type"], "StartToCloseTimeout", "{body}");
    let slow = eventually(
        Duration::from_secs(5),
        "the slow handler's record",
        || async { heard.lock().unwrap().first().cloned() },
    )
    .await;
    assert_eq!(slow["slow_request_ended"], true, "{slow}");
    assert!(slow["after_ms"].as_u64().unwrap() < 2_000, "{slow}");
    gateway.stop().await;
}

/// A handler (or its discovery) answering a redirect is not followed: the invocation is not
/// sent elsewhere (as a GET, or with its attempt token to another host); the answer is an
/// error like any other.
#[tokio::test]
async fn redirects_are_not_followed() {
    let gateway = Gateway::start(|config| {
        config.retry_policy = RetryPolicy {
            initial_interval: Duration::from_millis(10),
            maximum_interval: Duration::from_millis(10),
            maximum_attempts: Some(2),
            ..RetryPolicy::default()
        };
    })
    .await;
    let followed = Arc::new(AtomicU32::new(0));
    let hits = Arc::clone(&followed);
    let elsewhere = serve(axum::Router::new().fallback(move || {
        let hits = Arc::clone(&hits);
        async move {
            hits.fetch_add(1, Ordering::SeqCst);
            "followed"
        }
    }))
    .await;
    let target = elsewhere.clone();
    let url = serve(axum::Router::new().fallback(move || {
        let target = target.clone();
        async move { axum::response::Redirect::temporary(&format!("{target}/stolen")) }
    }))
    .await;
    // Discovery: refused, not followed.
    let response = gateway
        .admin_post("/v1/deployments", &json!({ "url": url }).to_string())
        .await;
    assert_eq!(response.status(), 502, "{}", response.text().await.unwrap());
    // A plain handler: its 307 is a failed attempt, retried and then failed.
    let response = gateway
        .admin_post(
            "/v1/deployments",
            &json!({"url": url, "services": [{"name": "moved", "handlers": [{"name": "run"}]}]})
                .to_string(),
        )
        .await;
    assert!(response.status().is_success());
    let r = gateway.post("/v1/call/moved/run", "{}").await;
    let body = problem(r, 500, false, "all 2 attempts failed").await;
    assert!(body["detail"].as_str().unwrap().contains("307"), "{body}");
    assert_eq!(
        followed.load(Ordering::SeqCst),
        0,
        "a redirect was followed"
    );
    gateway.stop().await;
}

/// A plain handler that keeps answering 429 is retried (after its `Retry-After`) until the
/// policy is used up; the caller then gets a 429 problem marked retryable, not a 500 that
/// says the request is hopeless.
#[tokio::test]
async fn a_handler_that_keeps_answering_429_fails_as_a_retryable_429() {
    let gateway = Gateway::start(|config| config.retry_policy = fast_policy(3)).await;
    let hits = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&hits);
    let url = serve(axum::Router::new().route(
        "/busy/run",
        post(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            async {
                (
                    axum::http::StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", "0")],
                    "slow down",
                )
            }
        }),
    ))
    .await;
    let services = json!([{"name": "busy", "handlers": [{"name": "run"}]}]);
    let response = gateway
        .admin_post(
            "/v1/deployments",
            &json!({"url": url, "services": services}).to_string(),
        )
        .await;
    assert!(response.status().is_success());
    let r = gateway.post("/v1/call/busy/run", "{}").await;
    let body = problem(r, 429, true, "all 3 attempts failed").await;
    assert!(
        body["detail"].as_str().unwrap().contains("slow down"),
        "{body}"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 3);
    gateway.stop().await;
}

/// `Prefer` as RFC 7240 says: a preference that cannot be understood is ignored, an
/// honoured wait is named in `Preference-Applied`, and answers that depend on it vary by it.
#[tokio::test]
async fn prefer_wait_is_honoured_said_and_ignored_when_unusable() {
    let gateway = Gateway::start(|_| {}).await;
    register(&gateway.admin, &serve_order().await).await;
    let send = |prefer: &'static str| {
        client()
            .post(format!("{}/v1/send/order/process", gateway.url))
            .header("content-type", "application/json")
            .header("prefer", prefer)
            .body(ORDER)
            .send()
    };
    let ignored = send("wait=soon").await.unwrap();
    assert_eq!(ignored.status(), 202);
    assert!(ignored.headers().get("preference-applied").is_none());
    assert_eq!(ignored.headers()["vary"], "prefer");
    let waited = send("respond-async, wait=10").await.unwrap();
    assert_eq!(waited.status(), 200);
    assert_eq!(waited.headers()["preference-applied"], "wait=10");
    assert_eq!(waited.headers()["vary"], "prefer");
    gateway.stop().await;
}

/// `POST /v1/call` waits at most `call_wait`; an invocation still running then is answered
/// 202 with where to find it, and goes on.
#[tokio::test]
async fn a_call_that_outlasts_call_wait_answers_202_with_its_location() {
    let gateway = Gateway::start(|config| config.call_wait = Duration::from_millis(200)).await;
    let slow = Endpoint::new().service(Service::new("slow").handler(
        "run",
        |ctx: Context, _: Value| async move {
            ctx.run("nap", || async {
                tokio::time::sleep(Duration::from_millis(800)).await;
                Ok(())
            })
            .await?;
            Ok::<_, HandlerError>("rested")
        },
    ));
    register(&gateway.admin, &serve(slow.router()).await).await;
    let r = gateway.post("/v1/call/slow/run", "{}").await;
    assert_eq!(r.status(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let view = client()
        .get(format!("{}{location}", gateway.url))
        .header("prefer", "wait=10")
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(view["status"], "completed");
    assert_eq!(view["output"], "rested");
    gateway.stop().await;
}

/// The admin API is on its own listener, and with a token it answers only to a bearer of it;
/// the main listener does not serve it at all.
#[tokio::test]
async fn the_admin_api_is_apart_and_behind_its_token() {
    let gateway = Gateway::start(|config| config.admin_token = Some("s3cret-token".into())).await;
    let deployments = |base: &str, authorization: Option<&str>| {
        let mut request = client().get(format!("{base}/v1/deployments"));
        if let Some(authorization) = authorization {
            request = request.header("authorization", authorization);
        }
        request.send()
    };
    for authorization in [None, Some("Bearer guess"), Some("s3cret-token")] {
        let r = deployments(&gateway.admin, authorization).await.unwrap();
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        problem(r, 401, false, "admin token").await;
    }
    let r = deployments(&gateway.admin, Some("Bearer s3cret-token"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = deployments(&gateway.url, Some("Bearer s3cret-token"))
        .await
        .unwrap();
    problem(r, 404, false, "no route").await;
    // Callers do not need the token.
    let r = client()
        .get(format!("{}/health", gateway.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    gateway.stop().await;
}

/// A journal that reaches its limit takes no more entries: the handler's next step is
/// refused, and the invocation fails saying why instead of growing without bound.
#[tokio::test]
async fn a_journal_at_its_limit_fails_the_invocation_with_a_clear_reason() {
    let gateway = Gateway::start(|config| {
        config.journal_limits = durin::store::JournalLimits {
            max_entries: 3,
            max_bytes: 1024 * 1024,
        }
    })
    .await;
    let endpoint = Endpoint::new().service(Service::new("long").handler(
        "run",
        |ctx: Context, _: Value| async move {
            for step in ["one", "two", "three", "four"] {
                ctx.run(step, || async { Ok(1) }).await?;
            }
            Ok::<_, HandlerError>("done")
        },
    ));
    register(&gateway.admin, &serve(endpoint.router()).await).await;
    let r = gateway.post("/v1/call/long/run", "{}").await;
    let body = problem(r, 500, false, "journal").await;
    assert!(body["detail"].as_str().unwrap().contains("full"), "{body}");
    gateway.stop().await;
}

/// An empty admin token would let everyone in: Durin refuses to start with one.
#[tokio::test]
async fn an_empty_admin_token_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        database_url: format!("sqlite:{}", dir.path().join("durin.db").display()),
        admin_token: Some(" ".into()),
        ..Config::default()
    };
    let listeners = durin::Listeners {
        api: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        admin: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    };
    let ended = durin::run(config, listeners, CancellationToken::new()).await;
    let error = ended.expect_err("Durin started with an empty admin token");
    assert!(
        error.to_string().contains("admin token is empty"),
        "{error}"
    );
}

/// A deployment that checks Durin's signature (with the key the admin API serves) runs
/// Durin's invocations; the SDK's own test shows it refuses forged ones.
#[tokio::test]
async fn a_deployment_that_checks_signatures_runs_durins_invocations() {
    let gateway = Gateway::start(|_| {}).await;
    let key: Value = support::get_json(&format!("{}/v1/signing-key", gateway.admin)).await;
    assert_eq!(key["algorithm"], "ed25519");
    let args = order_example::Args {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        step_delay_ms: 0,
        downstream: None,
        step_retry_initial_ms: 20,
        reserve_first: false,
    };
    let endpoint = order_example::endpoint(args)
        .verify_signatures(key["public_key"].as_str().unwrap())
        .unwrap();
    register(&gateway.admin, &serve(endpoint.router()).await).await;
    let r = gateway.post("/v1/call/order/process", ORDER).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), ORDER_OUTPUT);
    gateway.stop().await;
}

#[tokio::test]
async fn a_terminal_error_goes_back_to_the_caller_without_retry() {
    let gateway = Gateway::start(|_| {}).await;
    register(&gateway.admin, &serve_order().await).await;
    let r = gateway
        .post(
            "/v1/call/order/process",
            r#"{"order_id":"o-9","customer_id":"c","amount_cents":0}"#,
        )
        .await;
    assert_eq!(r.headers()["durin-error-source"], "handler");
    let body = problem(r, 422, false, "amount_cents must be positive").await;
    assert_eq!(body["error_type"], "InvalidOrder");
    let view = gateway
        .invocation(body["invocation_id"].as_str().unwrap())
        .await;
    assert_eq!(view["status"], "failed");
    assert_eq!(view["attempt"], 1);
    assert_eq!(view["failure"]["status"], 422);
    gateway.stop().await;
}

#[tokio::test]
async fn retries_follow_the_policy_and_exhaustion_says_why() {
    let gateway = Gateway::start(|_| {}).await;
    let calls = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&calls);
    let endpoint = Endpoint::new().service(Service::new("flaky").handler_with(
        "run",
        HandlerOptions {
            retry_policy: Some(fast_policy(3)),
            ..HandlerOptions::default()
        },
        move |_ctx: Context, _: Value| {
            counter.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(HandlerError::retryable("database is down")) }
        },
    ));
    register(&gateway.admin, &serve(endpoint.router()).await).await;
    let r = gateway.post("/v1/call/flaky/run", "null").await;
    let body = problem(
        r,
        500,
        false,
        "all 3 attempts failed; last error: database is down",
    )
    .await;
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    let view = gateway
        .invocation(body["invocation_id"].as_str().unwrap())
        .await;
    assert_eq!(view["status"], "failed");
    assert_eq!(view["attempt"], 3);
    gateway.stop().await;
}

#[tokio::test]
async fn start_to_close_ends_a_hung_attempt_and_fences_it() {
    let gateway = Gateway::start(|_| {}).await;
    let endpoint = Endpoint::new().service(Service::new("slow").handler_with(
        "run",
        HandlerOptions {
            retry_policy: Some(fast_policy(3)),
            start_to_close: Some(Duration::from_millis(300)),
            ..HandlerOptions::default()
        },
        |ctx: Context, _: Value| async move {
            if ctx.attempt() == 1 {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                // Too late: attempt 2 owns the journal now, so this append is refused
                // and this attempt ends without recording anything.
                ctx.run("late", || async { Ok(1) }).await?;
            }
            ctx.run("fast", || async { Ok(2) }).await
        },
    ));
    register(&gateway.admin, &serve(endpoint.router()).await).await;
    let r = client()
        .post(format!("{}/v1/send/slow/run", gateway.url))
        .send()
        .await
        .unwrap();
    let id = invocation_id(r).await;
    let view = support::wait_final(&gateway.url, &id).await;
    assert_eq!(view["status"], "completed", "{view}");
    assert_eq!(view["attempt"], 2);
    assert_eq!(view["output"], 2);
    // Give the stale first attempt time to try its append, then check it was refused.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let entries = journal(&gateway.admin, &id).await;
    assert_eq!(
        shape(&entries),
        vec![
            ("input".to_owned(), None),
            ("step".to_owned(), Some("fast".to_owned())),
            ("output".to_owned(), None)
        ]
    );
    gateway.stop().await;
}

#[tokio::test]
async fn a_step_retries_by_its_own_policy_and_records_its_final_failure() {
    let gateway = Gateway::start(|_| {}).await;
    let runs = Arc::new(AtomicU32::new(0));
    let declined_runs = Arc::new(AtomicU32::new(0));
    let (r1, r2) = (Arc::clone(&runs), Arc::clone(&declined_runs));
    let step_policy = RetryPolicy {
        non_retryable_error_types: vec!["CardDeclined".into()],
        ..fast_policy(2)
    };
    let endpoint = Endpoint::new().service(Service::new("pay").handler(
        "run",
        move |ctx: Context, declined: bool| {
            let (runs, declined_runs, policy) =
                (Arc::clone(&r1), Arc::clone(&r2), step_policy.clone());
            async move {
                let result = ctx
                    .run_with("charge", RunOptions::retry_policy(policy), || async {
                        if declined {
                            declined_runs.fetch_add(1, Ordering::SeqCst);
                            Err::<String, _>(
                                HandlerError::retryable("card declined").with_type("CardDeclined"),
                            )
                        } else {
                            runs.fetch_add(1, Ordering::SeqCst);
                            Err(HandlerError::retryable("gateway timeout"))
                        }
                    })
                    .await;
                // The handler sees the recorded failure and may compensate; here it gives up.
                match result {
                    Ok(v) => Ok(v),
                    Err(e) => Err(HandlerError::terminal_with_status(
                        402,
                        e.message().to_owned(),
                    )),
                }
            }
        },
    ));
    register(&gateway.admin, &serve(endpoint.router()).await).await;

    let r = gateway.post("/v1/call/pay/run", "false").await;
    let body = problem(
        r,
        402,
        false,
        "step \"charge\" failed: all 2 attempts failed; last error: gateway timeout",
    )
    .await;
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    let entries = journal(&gateway.admin, body["invocation_id"].as_str().unwrap()).await;
    assert_eq!(entries[1]["name"], "charge");
    assert!(entries[1]["failure"]["message"]
        .as_str()
        .unwrap()
        .contains("all 2 attempts failed"));

    let r = gateway.post("/v1/call/pay/run", "true").await;
    problem(r, 402, false, "error type CardDeclined is not retryable").await;
    assert_eq!(declined_runs.load(Ordering::SeqCst), 1);
    gateway.stop().await;
}

#[tokio::test]
async fn recorded_now_uuid_and_random_are_the_same_on_replay() {
    let gateway = Gateway::start(|_| {}).await;
    let endpoint = Endpoint::new().service(Service::new("ids").handler(
        "run",
        |ctx: Context, _: Value| async move {
            let now = ctx.now().await?;
            let uuid = ctx.uuid().await?;
            let random = ctx.random().await?;
            if ctx.attempt() == 1 {
                return Err(HandlerError::retryable("crash after recording"));
            }
            let millis = now
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64;
            Ok(json!({"now": millis, "uuid": uuid, "random": random}))
        },
    ));
    register(&gateway.admin, &serve(endpoint.router()).await).await;
    let r = gateway.post("/v1/call/ids/run", "null").await;
    assert_eq!(r.status(), 200);
    let id = header_id(&r);
    let output: Value = r.json().await.unwrap();
    let entries = journal(&gateway.admin, &id).await;
    assert_eq!(entries[1]["kind"], "now");
    assert_eq!(entries[1]["attempt"], 1);
    assert_eq!(output["now"], entries[1]["value"]);
    assert_eq!(output["uuid"], entries[2]["value"]);
    assert_eq!(output["random"], entries[3]["value"]);
    assert_eq!(gateway.invocation(&id).await["attempt"], 2);
    gateway.stop().await;
}

#[tokio::test]
async fn non_determinism_pauses_with_both_sides_named_and_resume_continues() {
    let gateway = Gateway::start(|_| {}).await;
    let renamed = Arc::new(AtomicBool::new(false));
    let ship_ok = Arc::new(AtomicBool::new(false));
    let (flag, ok) = (Arc::clone(&renamed), Arc::clone(&ship_ok));
    let endpoint = Endpoint::new().service(Service::new("shop").handler(
        "buy",
        move |ctx: Context, _: Value| {
            let first = if flag.load(Ordering::SeqCst) {
                "refund"
            } else {
                "charge"
            };
            let ship_ok = ok.load(Ordering::SeqCst);
            async move {
                ctx.run(first, || async { Ok("charged".to_owned()) })
                    .await?;
                let policy = RunOptions::retry_policy(RetryPolicy {
                    initial_interval: Duration::from_millis(300),
                    ..RetryPolicy::default()
                });
                ctx.run_with("ship", policy, || async move {
                    if ship_ok {
                        Ok("shipped".to_owned())
                    } else {
                        Err(HandlerError::retryable("no courier"))
                    }
                })
                .await
            }
        },
    ));
    register(&gateway.admin, &serve(endpoint.router()).await).await;
    let id = {
        let r = client()
            .post(format!("{}/v1/send/shop/buy", gateway.url))
            .header("idempotency-key", "buy-1")
            .body("null")
            .send()
            .await
            .unwrap();
        invocation_id(r).await
    };
    eventually(Duration::from_secs(10), "backing-off", || async {
        (gateway.invocation(&id).await["status"] == "backing-off").then_some(())
    })
    .await;
    // A "new version" of the handler asks for a different first step.
    renamed.store(true, Ordering::SeqCst);
    let paused = eventually(Duration::from_secs(10), "paused", || async {
        let view = gateway.invocation(&id).await;
        (view["status"] == "paused").then_some(view)
    })
    .await;
    let reason = paused["last_error"].as_str().unwrap();
    assert!(reason.contains("index 1"), "{reason}");
    assert!(reason.contains("step \"charge\""), "{reason}");
    assert!(reason.contains("step \"refund\""), "{reason}");
    // A paused invocation is not retried blindly.
    let attempt = paused["attempt"].as_u64().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(gateway.invocation(&id).await["attempt"], attempt);
    // A caller re-attaching to it hears that it is paused, and why.
    let r = client()
        .post(format!("{}/v1/call/shop/buy", gateway.url))
        .header("idempotency-key", "buy-1")
        .body("null")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["location"].to_str().unwrap(),
        format!("/v1/invocations/{id}")
    );
    problem(r, 503, true, "step \"refund\"").await;

    // The fix is deployed: resume, and the invocation finishes from its journal.
    renamed.store(false, Ordering::SeqCst);
    ship_ok.store(true, Ordering::SeqCst);
    let r = gateway
        .admin_post(&format!("/v1/invocations/{id}/resume"), "")
        .await;
    assert_eq!(r.status(), 200);
    let view = support::wait_final(&gateway.url, &id).await;
    assert_eq!(view["status"], "completed");
    assert_eq!(view["output"], "shipped");
    let r = gateway
        .admin_post(&format!("/v1/invocations/{id}/resume"), "")
        .await;
    problem(r, 409, false, "only a paused invocation").await;
    gateway.stop().await;
}

#[tokio::test]
async fn invocations_stay_pinned_to_the_deployment_that_started_them() {
    let gateway = Gateway::start(|_| {}).await;
    let version = |label: &'static str, fail_first: bool| {
        let failed = Arc::new(AtomicBool::new(!fail_first));
        Endpoint::new().service(Service::new("greeter").handler(
            "hello",
            move |_ctx: Context, _: Value| {
                let failed = Arc::clone(&failed);
                async move {
                    if !failed.swap(true, Ordering::SeqCst) {
                        return Err(HandlerError::retryable("not yet")
                            .retry_after(Duration::from_millis(500)));
                    }
                    Ok(label)
                }
            },
        ))
    };
    register(&gateway.admin, &serve(version("v1", true).router()).await).await;
    let first = gateway.send("/v1/send/greeter/hello", "null").await;
    eventually(Duration::from_secs(10), "backing-off", || async {
        (gateway.invocation(&first).await["status"] == "backing-off").then_some(())
    })
    .await;
    register(&gateway.admin, &serve(version("v2", false).router()).await).await;
    let r = gateway.post("/v1/call/greeter/hello", "null").await;
    assert_eq!(r.json::<String>().await.unwrap(), "v2");
    let view = support::wait_final(&gateway.url, &first).await;
    assert_eq!(view["output"], "v1");
    let deployments = support::get_json(&format!("{}/v1/deployments", gateway.admin)).await;
    assert_eq!(deployments["deployments"].as_array().unwrap().len(), 2);
    gateway.stop().await;
}

/// A recorded value that no longer fits the type the new code asks for is non-determinism:
/// the invocation pauses with the reason, it does not fail.
#[tokio::test]
async fn a_recorded_value_of_another_type_pauses_the_invocation() {
    let gateway = Gateway::start(|_| {}).await;
    let endpoint = Endpoint::new().service(Service::new("typed").handler(
        "run",
        |ctx: Context, _: Value| async move {
            if ctx.attempt() == 1 {
                ctx.run("count", || async { Ok(42_u32) }).await?;
                return Err(HandlerError::retryable("crash after the step"));
            }
            // A new version expects a string where a number was recorded.
            ctx.run("count", || async { Ok("forty-two".to_owned()) })
                .await
        },
    ));
    register(&gateway.admin, &serve(endpoint.router()).await).await;
    let r = client()
        .post(format!("{}/v1/call/typed/run", gateway.url))
        .body("null")
        .send()
        .await
        .unwrap();
    let body = problem(r, 503, true, "does not fit the type").await;
    let view = gateway
        .invocation(body["invocation_id"].as_str().unwrap())
        .await;
    assert_eq!(view["status"], "paused", "{view}");
    assert!(view["last_error"]
        .as_str()
        .unwrap()
        .contains("non-determinism at journal index 1"));
    gateway.stop().await;
}

/// Knowing an invocation id and its attempt number is not enough to write into its journal:
/// an append must present the attempt's secret token.
#[tokio::test]
async fn an_append_without_the_attempt_token_is_refused() {
    let gateway = Gateway::start(|_| {}).await;
    let endpoint = Endpoint::new().service(Service::new("slow").handler(
        "run",
        |ctx: Context, _: Value| async move {
            tokio::time::sleep(Duration::from_millis(1000)).await;
            ctx.run("real", || async { Ok(1) }).await
        },
    ));
    register(&gateway.admin, &serve(endpoint.router()).await).await;
    let id = gateway.send("/v1/send/slow/run", "null").await;
    let forged = client()
        .post(format!("{}/v1/contexts/{id}/entries", gateway.url))
        .header("durin-attempt", "1")
        .header("durin-attempt-token", "0123456789abcdef0123456789abcdef")
        .json(&json!({"index": 1, "kind": "step", "name": "real", "value": 666}))
        .send()
        .await
        .unwrap();
    problem(forged, 409, false, "attempt token does not belong").await;
    let view = support::wait_final(&gateway.url, &id).await;
    assert_eq!(view["output"], 1, "{view}");
    let entries = journal(&gateway.admin, &id).await;
    assert_eq!(entries[1]["value"], 1);
    assert_eq!(entries.len(), 3);
    gateway.stop().await;
}

/// The SDK bounds what it accepts: a journal that outgrew its limit is refused with 413
/// before the handler runs, and Durin pauses the invocation with a reason that says what
/// to raise, instead of retrying the same request or failing the workflow.
#[tokio::test]
async fn a_request_above_the_sdks_bound_pauses_the_invocation() {
    let gateway = Gateway::start(|_| {}).await;
    let runs = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&runs);
    let endpoint = Endpoint::new()
        .max_request_bytes(4096)
        .service(
            Service::new("big").handler("run", move |ctx: Context, _: Value| {
                let first = counter.fetch_add(1, Ordering::SeqCst) == 0;
                async move {
                    ctx.run("blob", || async { Ok("x".repeat(8192)) }).await?;
                    if first {
                        return Err::<(), _>(HandlerError::retryable("once more"));
                    }
                    Ok(())
                }
            }),
        );
    register(&gateway.admin, &serve(endpoint.router()).await).await;
    let r = gateway.post("/v1/call/big/run", "null").await;
    let body = problem(r, 503, true, "as too large (413)").await;
    let view = gateway
        .invocation(body["invocation_id"].as_str().unwrap())
        .await;
    assert_eq!(view["status"], "paused", "{view}");
    assert!(
        view["last_error"]
            .as_str()
            .unwrap()
            .contains("max_request_bytes"),
        "{view}"
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the second request never ran"
    );
    gateway.stop().await;
}

/// A workflow's code changes under a running invocation (the deployment's URL now serves
/// new code): `ctx.patched` keeps the run recorded before the change on the old branch,
/// while a new run takes the new one and journals the patch marker.
#[tokio::test]
async fn a_patch_changes_new_runs_and_leaves_recorded_ones_on_the_old_branch() {
    let gateway = Gateway::start(|_| {}).await;
    let new_code = Arc::new(AtomicBool::new(false));
    let switch = Arc::clone(&new_code);
    let endpoint = Endpoint::new().service(Service::new("pricing").handler(
        "run",
        move |ctx: Context, _: Value| {
            let new_code = switch.load(Ordering::SeqCst);
            async move {
                let base: u32 = ctx.run("base", || async { Ok(100) }).await?;
                let price = if new_code && ctx.patched("add-fee").await? {
                    ctx.run("fee", || async { Ok(base + 5) }).await?
                } else {
                    base
                };
                let go: String = ctx.signal("go").await?;
                Ok::<_, HandlerError>(format!("{go} {price}"))
            }
        },
    ));
    register(&gateway.admin, &serve(endpoint.router()).await).await;
    let old = gateway.send("/v1/send/pricing/run", "null").await;
    eventually(Duration::from_secs(10), "the old run to wait", || async {
        (gateway.invocation(&old).await["status"] == "suspended").then_some(())
    })
    .await;

    new_code.store(true, Ordering::SeqCst);
    let new = gateway.send("/v1/send/pricing/run", "null").await;
    eventually(Duration::from_secs(10), "the new run to wait", || async {
        (gateway.invocation(&new).await["status"] == "suspended").then_some(())
    })
    .await;
    for id in [&old, &new] {
        let r = gateway
            .post(&format!("/v1/invocations/{id}/signals/go"), "\"paid\"")
            .await;
        assert_eq!(r.status(), 202);
    }
    let old_view = support::wait_final(&gateway.url, &old).await;
    assert_eq!(old_view["output"], "paid 100", "{old_view}");
    let new_view = support::wait_final(&gateway.url, &new).await;
    assert_eq!(new_view["output"], "paid 105", "{new_view}");
    let kinds = |entries: Vec<Value>| -> Vec<String> {
        entries
            .iter()
            .map(|e| {
                format!(
                    "{} {}",
                    e["kind"].as_str().unwrap(),
                    e["name"].as_str().unwrap_or("")
                )
            })
            .collect()
    };
    assert_eq!(
        kinds(journal(&gateway.admin, &old).await),
        ["input ", "step base", "signal go", "output "]
    );
    assert_eq!(
        kinds(journal(&gateway.admin, &new).await),
        [
            "input ",
            "step base",
            "patch add-fee",
            "step fee",
            "signal go",
            "output "
        ]
    );
    gateway.stop().await;
}

/// A step's own `start_to_close` bounds one try of it: a try that hangs fails as
/// `StartToCloseTimeout` and the step's policy tries again, long before the handler's
/// `start_to_close` would.
#[tokio::test]
async fn a_steps_start_to_close_ends_a_hung_try() {
    let gateway = Gateway::start(|_| {}).await;
    let tries = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&tries);
    let endpoint = Endpoint::new().service(Service::new("hang").handler(
        "run",
        move |ctx: Context, _: Value| {
            let counter = Arc::clone(&counter);
            async move {
                let options = RunOptions::retry_policy(fast_policy(3))
                    .start_to_close(Duration::from_millis(200));
                ctx.run_with("fetch", options, || async {
                    if counter.fetch_add(1, Ordering::SeqCst) == 0 {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    }
                    Ok("fetched".to_owned())
                })
                .await
            }
        },
    ));
    register(&gateway.admin, &serve(endpoint.router()).await).await;
    let started = std::time::Instant::now();
    let r = gateway.post("/v1/call/hang/run", "null").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), "fetched");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(tries.load(Ordering::SeqCst), 2);
    gateway.stop().await;
}

/// An attempt that outlives its `start_to_close` is over for Durin, which ends its stream
/// (protocol 6): the SDK stops the handler there, as a handler whose caller hung up is, so
/// what attempt 1 would have done after its long wait never happens; attempt 2 does it.
#[tokio::test]
async fn a_handler_whose_attempt_timed_out_is_stopped() {
    let gateway = Gateway::start(|_| {}).await;
    let after = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&after);
    let endpoint = Endpoint::new().service(Service::new("late").handler_with(
        "run",
        HandlerOptions {
            start_to_close: Some(Duration::from_millis(300)),
            retry_policy: Some(fast_policy(2)),
            ..HandlerOptions::default()
        },
        move |ctx: Context, _: Value| {
            let counter = Arc::clone(&counter);
            async move {
                if ctx.attempt() == 1 {
                    // The handler's own work, not a step: nothing asks Durin before it ends.
                    tokio::time::sleep(Duration::from_millis(800)).await;
                }
                counter.fetch_add(1, Ordering::SeqCst);
                Ok::<_, HandlerError>(ctx.attempt())
            }
        },
    ));
    register(&gateway.admin, &serve(endpoint.router()).await).await;
    let r = gateway.post("/v1/call/late/run", "null").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), 2);
    // Long after attempt 1's wait would have ended.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(
        after.load(Ordering::SeqCst),
        1,
        "only attempt 2 got past the wait"
    );
    gateway.stop().await;
}

/// A step's own `schedule_to_close` bounds all its tries, across attempts: a step that
/// keeps failing (its policy would try for ever) fails for good once it has tried for
/// longer, named after the timeout, and the handler gets that failure.
#[tokio::test]
async fn a_steps_schedule_to_close_ends_its_retries() {
    let gateway = Gateway::start(|_| {}).await;
    let tries = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&tries);
    let endpoint = Endpoint::new().service(Service::new("stubborn").handler(
        "run",
        move |ctx: Context, _: Value| {
            let counter = Arc::clone(&counter);
            async move {
                let options = RunOptions::retry_policy(RetryPolicy {
                    initial_interval: Duration::from_millis(50),
                    maximum_interval: Duration::from_millis(50),
                    maximum_attempts: None,
                    ..RetryPolicy::default()
                })
                .schedule_to_close(Duration::from_millis(600));
                let result = ctx
                    .run_with("flaky", options, || async {
                        counter.fetch_add(1, Ordering::SeqCst);
                        Err::<u32, _>(HandlerError::retryable("still down"))
                    })
                    .await;
                Ok::<_, HandlerError>(match result {
                    Ok(_) => "ok".to_owned(),
                    Err(e) => e.error_type().unwrap_or_default().to_owned(),
                })
            }
        },
    ));
    register(&gateway.admin, &serve(endpoint.router()).await).await;
    let started = std::time::Instant::now();
    let r = gateway.post("/v1/call/stubborn/run", "null").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), "ScheduleToCloseTimeout");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert!(tries.load(Ordering::SeqCst) >= 3, "it was retried before");
    gateway.stop().await;
}

/// The value of `name{labels}` in a Prometheus text exposition (0 when absent).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' '))
        .filter(|(series, _)| series.starts_with(&format!("{name}{{")) || *series == name)
        .filter(|(series, _)| {
            labels
                .iter()
                .all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|(_, value)| value.parse::<f64>().ok())
        .sum()
}

/// `/metrics` (admin listener only) moves with a known workload: three invocations of a
/// handler whose first attempt fails, so three retries, six attempts, three completed, and
/// their journal appends and group commits.
#[tokio::test]
async fn metrics_count_a_known_workload() {
    let gateway = Gateway::start(|_| {}).await;
    let endpoint = Endpoint::new()
        .service(
            Service::new("metered").handler("run", |ctx: Context, _: Value| async move {
                let n: u32 = ctx.run("one", || async { Ok(1) }).await?;
                if ctx.attempt() == 1 {
                    return Err(HandlerError::retryable("first attempts fail"));
                }
                Ok::<_, HandlerError>(n)
            }),
        )
        .service(
            Service::new("napper").handler("run", |ctx: Context, _: Value| async move {
                ctx.sleep(Duration::from_secs(3600)).await?;
                Ok::<_, HandlerError>("rested")
            }),
        );
    register(&gateway.admin, &serve(endpoint.router()).await).await;
    let scrape = || async {
        let response = client()
            .get(format!("{}/metrics", gateway.admin))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert!(response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"));
        response.text().await.unwrap()
    };
    let before = scrape().await;
    for _ in 0..3 {
        let r = gateway.post("/v1/call/metered/run", "null").await;
        assert_eq!(r.status(), 200);
    }
    let after = scrape().await;
    let labels = [("service", "metered"), ("handler", "run")];
    let moved = |name: &str, labels: &[(&str, &str)]| {
        sample(&after, name, labels) - sample(&before, name, labels)
    };
    assert_eq!(moved("durin_attempts_total", &labels), 6.0, "{after}");
    assert_eq!(moved("durin_invocations_started_total", &labels), 3.0);
    assert_eq!(moved("durin_retries_total", &labels), 3.0);
    let completed = [labels[0], labels[1], ("status", "completed")];
    assert_eq!(moved("durin_invocations_ended_total", &completed), 3.0);
    assert_eq!(
        moved("durin_invocation_duration_seconds_count", &labels),
        3.0
    );
    assert!(moved("durin_journal_appends_total", &[]) >= 3.0, "{after}");
    assert!(
        moved("durin_store_commit_seconds_count", &[]) >= 3.0,
        "{after}"
    );
    assert!(
        after.contains("# TYPE durin_attempts_total counter"),
        "{after}"
    );
    // Waiting invocations by kind of wait: none sleep yet (reported as 0), then two.
    assert!(
        after.contains("durin_invocations_waiting{wait=\"sleep\"} 0\n"),
        "{after}"
    );
    let mut naps = Vec::new();
    for _ in 0..2 {
        let id = gateway.send("/v1/send/napper/run", "null").await;
        eventually(Duration::from_secs(10), "the nap", || {
            let gateway = &gateway;
            let id = id.clone();
            async move { (gateway.invocation(&id).await["status"] == "suspended").then_some(()) }
        })
        .await;
        naps.push(id);
    }
    let napping = scrape().await;
    // Sent without `Prefer: wait`: nobody here waits for their end.
    assert_eq!(
        sample(&napping, "durin_awaited_invocations", &[]),
        0.0,
        "{napping}"
    );
    // A long poll on one is counted while it waits, and not once its caller went away.
    let poll = tokio::spawn(
        client()
            .get(format!("{}/v1/invocations/{}", gateway.url, naps[0]))
            .header("prefer", "wait=60")
            .send(),
    );
    for awaited in [1.0, 0.0] {
        eventually(Duration::from_secs(10), "the long poll's count", || async {
            (sample(&scrape().await, "durin_awaited_invocations", &[]) == awaited).then_some(())
        })
        .await;
        poll.abort();
    }
    assert_eq!(
        sample(&napping, "durin_invocations_waiting", &[("wait", "sleep")]),
        2.0,
        "{napping}"
    );
    assert_eq!(
        sample(&napping, "durin_invocations_waiting", &[("wait", "signal")]),
        0.0
    );
    assert_eq!(
        sample(&napping, "durin_invocations", &[("status", "suspended")]),
        2.0
    );
    // Not on the main listener.
    let main = client()
        .get(format!("{}/metrics", gateway.url))
        .send()
        .await
        .unwrap();
    assert_eq!(main.status(), 404);
    gateway.stop().await;
}

/// The operator's verbs on the admin listener: pause and resume, retry now, purge, and
/// their bulk forms over a filter, each safe to repeat.
#[tokio::test]
async fn operators_pause_resume_retry_purge_and_act_in_bulk() {
    let gateway = Gateway::start(|_| {}).await;
    let endpoint = Endpoint::new()
        .service(
            Service::new("sleepy").handler("run", |ctx: Context, _: Value| async move {
                ctx.sleep(Duration::from_secs(3600)).await?;
                Ok::<_, HandlerError>("rested")
            }),
        )
        .service(Service::new("later").handler_with(
            "run",
            HandlerOptions {
                retry_policy: Some(RetryPolicy {
                    initial_interval: Duration::from_secs(3600),
                    maximum_interval: Duration::from_secs(3600),
                    maximum_attempts: Some(5),
                    ..RetryPolicy::default()
                }),
                ..HandlerOptions::default()
            },
            |ctx: Context, _: Value| async move {
                if ctx.attempt() == 1 {
                    return Err(HandlerError::retryable("not yet"));
                }
                Ok::<_, HandlerError>("now")
            },
        ));
    register(&gateway.admin, &serve(endpoint.router()).await).await;
    let status = |id: String| {
        let gateway_url = gateway.url.clone();
        async move {
            support::get_json(&format!("{gateway_url}/v1/invocations/{id}")).await["status"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let wait_for = |id: String, wanted: &'static str| async move {
        eventually(Duration::from_secs(10), wanted, || {
            let id = id.clone();
            async move { (status(id).await == wanted).then_some(()) }
        })
        .await
    };
    let admin = |path: String, body: Value| {
        let admin = gateway.admin.clone();
        async move {
            let r = post_json(&admin, &path, &body.to_string()).await;
            let code = r.status().as_u16();
            (code, r.json::<Value>().await.unwrap())
        }
    };

    // Pause and resume one.
    let sleepy = gateway.send("/v1/send/sleepy/run", "null").await;
    wait_for(sleepy.clone(), "suspended").await;
    let (code, body) = admin(format!("/v1/invocations/{sleepy}/pause"), json!(null)).await;
    assert_eq!((code, &body["pause"]), (200, &json!("done")), "{body}");
    let (code, body) = admin(format!("/v1/invocations/{sleepy}/pause"), json!(null)).await;
    assert_eq!(
        (code, &body["pause"]),
        (200, &json!("already-paused")),
        "{body}"
    );
    assert_eq!(status(sleepy.clone()).await, "paused");
    let (code, _) = admin(format!("/v1/invocations/{sleepy}/resume"), json!({})).await;
    assert_eq!(code, 200);
    wait_for(sleepy.clone(), "suspended").await;

    // Retry now instead of in an hour.
    let later = gateway.send("/v1/send/later/run", "null").await;
    wait_for(later.clone(), "backing-off").await;
    let (code, body) = admin(format!("/v1/invocations/{later}/retry-now"), json!(null)).await;
    assert_eq!(code, 200, "{body}");
    wait_for(later.clone(), "completed").await;
    let (code, body) = admin(format!("/v1/invocations/{later}/retry-now"), json!(null)).await;
    assert_eq!(
        (code, &body["type"]),
        (409, &json!("urn:durin:problem:invocation-state"))
    );

    // Purge: only what has ended.
    let (code, _) = admin(format!("/v1/invocations/{sleepy}/purge"), json!(null)).await;
    assert_eq!(code, 409);
    let (code, body) = admin(format!("/v1/invocations/{later}/purge"), json!(null)).await;
    assert_eq!((code, &body["purge"]), (200, &json!("purged")), "{body}");
    let gone = client()
        .get(format!("{}/v1/invocations/{later}", gateway.url))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 404);

    // In bulk: three more sleepers, paused, resumed and cancelled by a filter.
    let mut ids = vec![sleepy.clone()];
    for _ in 0..3 {
        ids.push(gateway.send("/v1/send/sleepy/run", "null").await);
    }
    for id in &ids {
        wait_for(id.clone(), "suspended").await;
    }
    let filter = json!({"service": "sleepy"});
    let (code, body) = admin("/v1/invocations/bulk/pause".into(), filter.clone()).await;
    assert_eq!(
        (code, &body["selected"], &body["changed"]),
        (200, &json!(4), &json!(4)),
        "{body}"
    );
    let (_, body) = admin("/v1/invocations/bulk/pause".into(), filter.clone()).await;
    assert_eq!(body["changed"], 0, "safe to repeat: {body}");
    let (_, body) = admin(
        "/v1/invocations/bulk/resume".into(),
        json!({"status": "paused"}),
    )
    .await;
    assert_eq!(body["changed"], 4, "{body}");
    for id in &ids {
        wait_for(id.clone(), "suspended").await;
    }
    let (_, body) = admin("/v1/invocations/bulk/cancel".into(), filter.clone()).await;
    assert_eq!(body["changed"], 4, "{body}");
    for id in &ids {
        wait_for(id.clone(), "cancelled").await;
    }
    let (code, _) = admin("/v1/invocations/bulk/explode".into(), filter).await;
    assert_eq!(code, 404);
    gateway.stop().await;
}

/// A restart with an `Idempotency-Key` is safe to repeat: the same key again (its answer
/// was lost) changes nothing, even once the restarted invocation completed; a new key
/// restarts it again. The kept step never runs again; the steps after it run once per
/// restart.
#[tokio::test]
async fn a_restart_sent_again_with_its_idempotency_key_restarts_once() {
    let gateway = Gateway::start(|_| {}).await;
    let broken = Arc::new(AtomicBool::new(true));
    let charged = Arc::new(AtomicU32::new(0));
    let shipped = Arc::new(AtomicU32::new(0));
    let (flag, charges, ships) = (
        Arc::clone(&broken),
        Arc::clone(&charged),
        Arc::clone(&shipped),
    );
    let endpoint = Endpoint::new().service(Service::new("parcel").handler(
        "run",
        move |ctx: Context, _: Value| {
            let (flag, charges, ships) =
                (Arc::clone(&flag), Arc::clone(&charges), Arc::clone(&ships));
            async move {
                ctx.run("charge", || async {
                    charges.fetch_add(1, Ordering::SeqCst);
                    Ok("charged".to_owned())
                })
                .await?;
                let shipped: String = ctx
                    .run("ship", || async {
                        ships.fetch_add(1, Ordering::SeqCst);
                        if flag.load(Ordering::SeqCst) {
                            Err(HandlerError::terminal("the carrier refused the parcel"))
                        } else {
                            Ok("shipped".to_owned())
                        }
                    })
                    .await?;
                Ok::<_, HandlerError>(shipped)
            }
        },
    ));
    register(&gateway.admin, &serve(endpoint.router()).await).await;
    let r = gateway.post("/v1/call/parcel/run", "null").await;
    assert_eq!(r.status(), 500);
    let id = header_id(&r);
    let restart = |key: &'static str| {
        let (admin, id) = (gateway.admin.clone(), id.clone());
        async move {
            let r = client()
                .post(format!("{admin}/v1/invocations/{id}/restart"))
                .header("idempotency-key", key)
                .json(&json!({"from": 1}))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let counts = || {
        (
            charged.load(Ordering::SeqCst),
            shipped.load(Ordering::SeqCst),
        )
    };
    assert_eq!(counts(), (1, 1));
    broken.store(false, Ordering::SeqCst);

    let (code, body) = restart("restart-1").await;
    assert_eq!((code, &body["restart"]), (200, &json!("done")), "{body}");
    let view = support::wait_final(&gateway.url, &id).await;
    assert_eq!(view["output"], "shipped", "{view}");
    assert_eq!(counts(), (1, 2), "charge kept, ship run again");
    let journal_before = journal(&gateway.admin, &id).await;

    // The answer was lost; the operator sends the same restart again.
    let (code, body) = restart("restart-1").await;
    assert_eq!(
        (code, &body["restart"], &body["status"]),
        (200, &json!("already-restarted"), &json!("completed")),
        "{body}"
    );
    assert_eq!(body["invocation_id"], id.as_str(), "{body}");
    assert_eq!(body["invocation"]["status"], "completed", "{body}");
    assert_eq!(gateway.invocation(&id).await["status"], "completed");
    assert_eq!(journal(&gateway.admin, &id).await, journal_before);
    assert_eq!(counts(), (1, 2), "nothing ran again");

    // A new key is a new restart.
    let (code, body) = restart("restart-2").await;
    assert_eq!((code, &body["restart"]), (200, &json!("done")), "{body}");
    let view = support::wait_final(&gateway.url, &id).await;
    assert_eq!(view["status"], "completed", "{view}");
    assert_eq!(counts(), (1, 3));

    // A key that is not one is a problem, and changes nothing.
    let r = client()
        .post(format!("{}/v1/invocations/{id}/restart", gateway.admin))
        .header("idempotency-key", "two words")
        .json(&json!({"from": 1}))
        .send()
        .await
        .unwrap();
    problem(r, 400, false, "Idempotency-Key").await;
    assert_eq!(gateway.invocation(&id).await["status"], "completed");
    assert_eq!(counts(), (1, 3));
    gateway.stop().await;
}

/// With `on_retries_exhausted = "pause"`, an invocation whose retry policy is used up
/// waits for an operator instead of failing; resumed, it gets its attempts back.
#[tokio::test]
async fn exhausted_retries_can_pause_instead_of_failing() {
    let gateway = Gateway::start(|config| {
        config.on_retries_exhausted = durin::config::RetriesExhausted::Pause;
        config.retry_policy = fast_policy(2);
    })
    .await;
    let fixed = Arc::new(AtomicBool::new(false));
    let fix = Arc::clone(&fixed);
    let endpoint = Endpoint::new().service(Service::new("broken").handler(
        "run",
        move |_ctx: Context, _: Value| {
            let fixed = fix.load(Ordering::SeqCst);
            async move {
                if fixed {
                    Ok::<_, HandlerError>("fixed")
                } else {
                    Err(HandlerError::retryable("the database is down"))
                }
            }
        },
    ));
    register(&gateway.admin, &serve(endpoint.router()).await).await;
    let id = gateway.send("/v1/send/broken/run", "null").await;
    let view = eventually(Duration::from_secs(10), "the pause", || async {
        let view = gateway.invocation(&id).await;
        (view["status"] == "paused").then_some(view)
    })
    .await;
    let reason = view["last_error"].as_str().unwrap();
    assert!(
        reason.contains("all 2 attempts failed") && reason.contains("resume"),
        "{reason}"
    );
    fixed.store(true, Ordering::SeqCst);
    let resumed = gateway
        .admin_post(&format!("/v1/invocations/{id}/resume"), "")
        .await;
    assert_eq!(resumed.status(), 200);
    let view = support::wait_final(&gateway.url, &id).await;
    assert_eq!(view["output"], "fixed", "{view}");
    gateway.stop().await;
}

/// Restart from a journal index: a failed invocation, once its cause is fixed, keeps its
/// journal up to the chosen entry and runs again; what it keeps is replayed, not run again.
#[tokio::test]
async fn an_ended_invocation_restarts_from_a_journal_index() {
    let gateway = Gateway::start(|_| {}).await;
    let broken = Arc::new(AtomicBool::new(true));
    let charged = Arc::new(AtomicU32::new(0));
    let (flag, count) = (Arc::clone(&broken), Arc::clone(&charged));
    let endpoint = Endpoint::new().service(Service::new("flow").handler(
        "run",
        move |ctx: Context, _: Value| {
            let (broken, charged) = (flag.load(Ordering::SeqCst), Arc::clone(&count));
            async move {
                let charge: String = ctx
                    .run("charge", || async {
                        charged.fetch_add(1, Ordering::SeqCst);
                        Ok("charged".to_owned())
                    })
                    .await?;
                ctx.set("stage", &"charged").await?;
                let shipped: String = ctx
                    .run("ship", || async move {
                        if broken {
                            Err(HandlerError::terminal("the carrier refused the parcel"))
                        } else {
                            Ok("shipped".to_owned())
                        }
                    })
                    .await?;
                Ok::<_, HandlerError>(format!("{charge} {shipped}"))
            }
        },
    ));
    register(&gateway.admin, &serve(endpoint.router()).await).await;
    let r = gateway.post("/v1/call/flow/run", "null").await;
    assert_eq!(r.status(), 500);
    let id = header_id(&r);
    let restart = |from: Value| {
        let (admin, id) = (gateway.admin.clone(), id.clone());
        async move {
            let r = post_json(
                &admin,
                &format!("/v1/invocations/{id}/restart"),
                &json!({ "from": from }).to_string(),
            )
            .await;
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    // Out of range: the output goes, so an ended invocation keeps at most up to `ship`.
    let (code, body) = restart(json!(4)).await;
    assert_eq!(code, 409, "{body}");
    let before = journal(&gateway.admin, &id).await;
    assert_eq!(before[3]["name"], "ship", "{before:#?}");

    // The carrier is fixed; keep `charge` and the state write, run `ship` again.
    broken.store(false, Ordering::SeqCst);
    let (code, body) = restart(json!(2)).await;
    assert_eq!(code, 200, "{body}");
    let view = support::wait_final(&gateway.url, &id).await;
    assert_eq!(view["status"], "completed", "{view}");
    assert_eq!(view["output"], "charged shipped");
    assert_eq!(
        charged.load(Ordering::SeqCst),
        1,
        "the kept step was replayed"
    );
    let after = journal(&gateway.admin, &id).await;
    assert_eq!(
        shape(&after),
        shape(&before),
        "the same entries, the failure replaced"
    );
    assert!(after[3]["failure"].is_null(), "{after:#?}");
    let stage = support::get_json(&format!(
        "{}/v1/invocations/{id}/queries/stage",
        gateway.url
    ))
    .await;
    assert_eq!(stage, "charged");

    // Something that runs cannot restart.
    let sleepy = Endpoint::new().service(Service::new("nap").handler(
        "run",
        |ctx: Context, _: Value| async move {
            ctx.sleep(Duration::from_secs(3600)).await?;
            Ok::<_, HandlerError>(())
        },
    ));
    register(&gateway.admin, &serve(sleepy.router()).await).await;
    let napping = gateway.send("/v1/send/nap/run", "null").await;
    eventually(Duration::from_secs(10), "the nap", || async {
        (gateway.invocation(&napping).await["status"] == "suspended").then_some(())
    })
    .await;
    let r = post_json(
        &gateway.admin,
        &format!("/v1/invocations/{napping}/restart"),
        r#"{"from": 1}"#,
    )
    .await;
    assert_eq!(r.status(), 409);
    gateway.stop().await;
}

/// Several nodes on one PostgreSQL database: an attempt runs on the node that took the
/// call, while its handler sends every heartbeat through the other node. The heartbeats
/// count: the attempt outlives its 1 s heartbeat_timeout for as long as they come
/// (each one is accepted, so the attempt was still the current one), and once they stop
/// (the handler hangs) the timeout ends it and the next attempt completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_sent_through_another_node_keep_the_attempt_alive() {
    if !support::require("postgres") {
        return;
    }
    const BEATS: u32 = 10;
    const EVERY: Duration = Duration::from_millis(200);
    // Dropped, with everything in it, at the end.
    let schema = support::PostgresSchema::new();
    let database = schema.url.clone();
    let runner = {
        let database = database.clone();
        Gateway::start(move |config| config.database_url = database).await
    };
    let other = Gateway::start(move |config| config.database_url = database).await;

    let beats = Arc::new(std::sync::Mutex::new(Vec::<u16>::new()));
    let first_started = Arc::new(std::sync::Mutex::new(None::<std::time::Instant>));
    let second_started = Arc::new(std::sync::Mutex::new(None::<std::time::Instant>));
    let context = format!("{}/v1/contexts", other.url);
    let handler = {
        let (beats, first, second) = (
            Arc::clone(&beats),
            Arc::clone(&first_started),
            Arc::clone(&second_started),
        );
        serve(axum::Router::new().route(
            "/beat/run",
            post(move |headers: axum::http::HeaderMap| {
                let (beats, first, second) = (beats.clone(), first.clone(), second.clone());
                let context = context.clone();
                async move {
                    let header = |name: &str| headers[name].to_str().unwrap().to_owned();
                    let (id, attempt) = (header("durin-invocation-id"), header("durin-attempt"));
                    if attempt != "1" {
                        second
                            .lock()
                            .unwrap()
                            .get_or_insert_with(std::time::Instant::now);
                        return "done";
                    }
                    *first.lock().unwrap() = Some(std::time::Instant::now());
                    for i in 0..BEATS {
                        let status = client()
                            .post(format!("{context}/{id}/heartbeat"))
                            .header("durin-attempt", &attempt)
                            .header("durin-attempt-token", header("durin-attempt-token"))
                            .json(&json!({ "beat": i }))
                            .send()
                            .await
                            .unwrap()
                            .status();
                        beats.lock().unwrap().push(status.as_u16());
                        tokio::time::sleep(EVERY).await;
                    }
                    // Hangs: only the heartbeat timeout ends this attempt.
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    "too late"
                }
            }),
        ))
        .await
    };
    let services = json!([{"name": "beat", "handlers": [{
        "name": "run", "heartbeat_timeout": "1s", "start_to_close": "120s"
    }]}]);
    let response = runner
        .admin_post(
            "/v1/deployments",
            &json!({"url": handler, "services": services}).to_string(),
        )
        .await;
    assert!(response.status().is_success());
    // Taken by `runner`, which runs its first attempt.
    let id = runner.send("/v1/send/beat/run", "{}").await;
    let view = support::wait_final(&runner.url, &id).await;
    assert_eq!(view["status"], "completed", "{view}");
    assert_eq!(view["attempt"], 2, "{view}");
    assert_eq!(
        *beats.lock().unwrap(),
        vec![204; BEATS as usize],
        "every heartbeat through the other node was the current attempt's"
    );
    let first = first_started.lock().unwrap().unwrap();
    let second = second_started.lock().unwrap().unwrap();
    let lived = second - first;
    assert!(
        lived >= EVERY * BEATS && lived < Duration::from_secs(10),
        "the first attempt lived {lived:?}"
    );
    runner.stop().await;
    other.stop().await;
    drop(schema);
}
