//! Admission control with real processes: past the configured bound of queued work,
//! callers are refused at once with `503 overloaded` and `Retry-After`, nothing is created
//! for them, work is run in arrival order, and everything that was accepted (queued calls,
//! sends left in the store) completes, also across a `kill -9` of Durin.
//!
//! The handler is a plain HTTP handler in this test process that holds every request
//! until the test opens its gate, so that the attempt slots stay taken.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use serde_json::{json, Value};
use support::*;
use tokio::sync::watch;

/// Attempts that run at once, first attempts that may queue, sends that may wait in the store.
const SLOTS: usize = 2;
const QUEUE: usize = 3;
const PENDING: usize = 4;

/// A plain handler that records each input it gets (its `n`) and answers it once the gate
/// lets its arrival through: the gate holds how many requests, in arrival order, may answer.
#[derive(Clone)]
struct Held {
    arrivals: Arc<Mutex<Vec<u64>>>,
    gate: watch::Receiver<usize>,
}

async fn work(State(held): State<Held>, body: axum::body::Bytes) -> axum::Json<Value> {
    let input: Value = serde_json::from_slice(&body).unwrap_or_default();
    let n = input["n"].as_u64().unwrap_or(u64::MAX);
    let place = {
        let mut arrivals = held.arrivals.lock().unwrap();
        arrivals.push(n);
        arrivals.len() - 1
    };
    let mut gate = held.gate.clone();
    let _ = gate.wait_for(|through| place < *through).await;
    axum::Json(json!({ "done": n }))
}

struct Handler {
    url: String,
    arrivals: Arc<Mutex<Vec<u64>>>,
    open: watch::Sender<usize>,
}

impl Handler {
    async fn start() -> Handler {
        let (open, gate) = watch::channel(0);
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let app = axum::Router::new()
            .route("/work", axum::routing::post(work))
            .with_state(Held {
                arrivals: Arc::clone(&arrivals),
                gate,
            });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Handler {
            url,
            arrivals,
            open,
        }
    }

    fn arrivals(&self) -> Vec<u64> {
        self.arrivals.lock().unwrap().clone()
    }

    /// Lets every request answer, those held now and those to come.
    fn open_all(&self) {
        self.open.send(usize::MAX).unwrap();
    }

    /// Lets the held requests answer one at a time, in arrival order, each once the
    /// request that took the slot freed before it has arrived, until `total` have answered:
    /// one slot frees at a time, so the order of arrivals is the order Durin gave slots.
    async fn let_go_one_by_one(&self, total: usize) {
        for through in 1..=total {
            self.open.send(through).unwrap();
            let expected = (through + SLOTS).min(total);
            eventually(Duration::from_secs(10), "the next arrival", || async {
                (self.arrivals().len() >= expected).then_some(())
            })
            .await;
        }
    }
}

/// A gateway home whose config bounds admission as the constants say.
fn bounded_home() -> GatewayHome {
    let home = GatewayHome::new();
    let config = std::fs::read_to_string(home.config()).unwrap();
    std::fs::write(
        home.config(),
        format!(
            "max_concurrent_attempts = {SLOTS}\nmax_queued_attempts = {QUEUE}\nmax_pending_starts = {PENDING}\n{config}"
        ),
    )
    .unwrap();
    home
}

/// The `durin_admission_queued` gauge of the gateway's `/metrics`.
async fn queued(admin: &str) -> u64 {
    let text = client()
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix("durin_admission_queued "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

/// Starts a `call` with input `n` and key `call-{n}` in a task; its answer comes later.
fn call(gateway: &str, n: u64) -> tokio::task::JoinHandle<reqwest::Result<reqwest::Response>> {
    let request = client()
        .post(format!("{gateway}/v1/call/held/work"))
        .header("idempotency-key", format!("call-{n}"))
        .json(&json!({ "n": n }));
    tokio::spawn(request.send())
}

/// `send` with input `n`; `wait` adds `Prefer: wait=1`.
async fn send(gateway: &str, n: u64, wait: bool) -> reqwest::Response {
    let mut request = client()
        .post(format!("{gateway}/v1/send/held/work"))
        .header("idempotency-key", format!("send-{n}"))
        .json(&json!({ "n": n }));
    if wait {
        request = request.header("prefer", "wait=1");
    }
    request.send().await.unwrap()
}

/// Checks a refusal: `503`, `Retry-After`, `overloaded`, from Durin, and at once.
async fn assert_overloaded(answer: reqwest::Response, sent: Instant, what: &str) {
    assert!(
        sent.elapsed() < Duration::from_secs(2),
        "{what}: the refusal took {:?}",
        sent.elapsed()
    );
    assert_eq!(answer.status(), 503, "{what}");
    let headers = answer.headers().clone();
    assert_eq!(headers["retry-after"], "1", "{what}");
    assert_eq!(headers["durin-error-source"], "gateway", "{what}");
    assert_eq!(
        headers["content-type"], "application/problem+json",
        "{what}"
    );
    let problem: Value = answer.json().await.unwrap();
    assert_eq!(problem["type"], "urn:durin:problem:overloaded", "{what}");
    assert_eq!(problem["retryable"], true, "{what}");
}

/// Fills the slots and the queue, then checks who is refused and how; returns the
/// invocation ids of the accepted sends and the tasks of the accepted calls.
async fn fill(
    gateway: &Proc,
    handler: &Handler,
) -> (
    Vec<String>,
    Vec<tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>>,
) {
    let mut calls = Vec::new();
    // Calls 1 and 2 take the slots.
    for n in 1..=SLOTS as u64 {
        calls.push(call(&gateway.url, n));
    }
    eventually(Duration::from_secs(10), "the slots taken", || async {
        (handler.arrivals().len() == SLOTS).then_some(())
    })
    .await;
    // Calls 3 to 5 queue, one after the other.
    for n in SLOTS as u64 + 1..=(SLOTS + QUEUE) as u64 {
        calls.push(call(&gateway.url, n));
        let queued_now = n - SLOTS as u64;
        eventually(Duration::from_secs(10), "a call queued", || async {
            (queued(&gateway.admin).await == queued_now).then_some(())
        })
        .await;
    }
    assert_eq!(
        handler.arrivals().len(),
        SLOTS,
        "a queued call reached the handler"
    );

    // The queue is full: a call, and a send that would wait, are refused at once.
    let sent = Instant::now();
    let refused = client()
        .post(format!("{}/v1/call/held/work", gateway.url))
        .json(&json!({ "n": 100 }))
        .send()
        .await
        .unwrap();
    assert_overloaded(refused, sent, "a call past the queue").await;
    let sent = Instant::now();
    assert_overloaded(send(&gateway.url, 101, true).await, sent, "a waiting send").await;

    // Sends that do not wait go to the store, up to their own bound.
    let mut pending = Vec::new();
    for n in 11..11 + PENDING as u64 {
        let answer = send(&gateway.url, n, false).await;
        assert_eq!(answer.status(), 202);
        let accepted: Value = answer.json().await.unwrap();
        assert_eq!(accepted["status"], "pending", "{accepted}");
        pending.push(accepted["invocation_id"].as_str().unwrap().to_owned());
    }
    let sent = Instant::now();
    assert_overloaded(
        send(&gateway.url, 102, false).await,
        sent,
        "a send past its bound",
    )
    .await;
    (pending, calls)
}

/// The queue is FIFO, refusals are immediate and create nothing, and everything accepted
/// completes once the handler lets go.
#[tokio::test]
async fn past_the_bound_callers_are_refused_and_queued_work_runs_in_arrival_order() {
    if !require_store() {
        return;
    }
    let handler = Handler::start().await;
    let home = bounded_home();
    let gateway = home.start(None);
    register_plain(
        &gateway.admin,
        &handler.url,
        json!([{ "name": "held", "handlers": [{ "name": "work", "path": "/work" }] }]),
    )
    .await;
    let (pending, calls) = fill(&gateway, &handler).await;
    // The last queued call is terminated while it waits for its slot: it never runs.
    let listed = get_json(&format!("{}/v1/invocations?limit=100", gateway.admin)).await;
    let last_queued = listed["invocations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|view| view["idempotency_key"] == "call-5")
        .and_then(|view| view["id"].as_str())
        .unwrap()
        .to_owned();
    let terminated = client()
        .post(format!(
            "{}/v1/invocations/{last_queued}/terminate",
            gateway.admin
        ))
        .send()
        .await
        .unwrap();
    assert!(terminated.status().is_success(), "{}", terminated.status());

    handler
        .let_go_one_by_one(SLOTS + (QUEUE - 1) + PENDING)
        .await;
    for (i, task) in calls.into_iter().enumerate() {
        let n = i as u64 + 1;
        let answer = task.await.unwrap().unwrap();
        if n == 5 {
            assert_ne!(answer.status(), 200, "a terminated call answered 200");
            continue;
        }
        assert_eq!(answer.status(), 200);
        let output: Value = answer.json().await.unwrap();
        assert_eq!(output, json!({ "done": n }));
    }
    for id in &pending {
        let view = wait_final(&gateway.url, id).await;
        assert_eq!(view["status"], "completed", "{view}");
    }
    let arrivals = handler.arrivals();
    // The queued calls ran in the order they came; the terminated one never ran. The sends
    // the store holds run when the scheduler gets slots, and the scheduler may have taken
    // its place in the line (on its idle poll) before a queued call did. Slots were freed
    // one at a time, so the order of arrivals is the order in which slots were given.
    let after_slots = &arrivals[SLOTS..];
    let calls: Vec<u64> = after_slots.iter().copied().filter(|n| *n < 10).collect();
    assert_eq!(calls, [3, 4], "{arrivals:?}");
    let mut sends: Vec<u64> = after_slots.iter().copied().filter(|n| *n > 10).collect();
    sends.sort_unstable();
    assert_eq!(sends, [11, 12, 13, 14], "{arrivals:?}");
    assert_eq!(after_slots.len(), 6, "{arrivals:?}");
    // Nothing refused was created or run.
    assert!(
        !arrivals.iter().any(|n| *n >= 100),
        "a refused request ran: {arrivals:?}"
    );
    let listed = get_json(&format!("{}/v1/invocations?limit=100", gateway.admin)).await;
    assert_eq!(
        listed["invocations"].as_array().map(Vec::len),
        Some(SLOTS + QUEUE + PENDING),
        "{listed}"
    );
}

/// Queued calls and sends waiting in the store survive a `kill -9` of Durin: after a
/// restart, every accepted request completes, once.
#[tokio::test]
async fn accepted_work_survives_kill_9_while_queued() {
    if !require_store() {
        return;
    }
    let handler = Handler::start().await;
    let home = bounded_home();
    let mut gateway = home.start(None);
    register_plain(
        &gateway.admin,
        &handler.url,
        json!([{ "name": "held", "handlers": [{ "name": "work", "path": "/work" }] }]),
    )
    .await;
    let (pending, calls) = fill(&gateway, &handler).await;

    gateway.kill();
    for task in calls {
        // The callers lose their connections; their invocations do not.
        assert!(task.await.unwrap().is_err());
    }
    let gateway = home.start(None);
    handler.open_all();
    // Each call, sent again with its key, answers its own output.
    for n in 1..=(SLOTS + QUEUE) as u64 {
        let answer = call(&gateway.url, n).await.unwrap().unwrap();
        assert_eq!(answer.status(), 200, "call {n}");
        assert_eq!(answer.headers()["idempotent-replayed"], "true", "call {n}");
        let output: Value = answer.json().await.unwrap();
        assert_eq!(output, json!({ "done": n }));
    }
    for id in &pending {
        let view = wait_final(&gateway.url, id).await;
        assert_eq!(view["status"], "completed", "{view}");
    }
    let mut arrivals = handler.arrivals();
    arrivals.sort_unstable();
    arrivals.dedup();
    // Every accepted input reached the handler (the two that held slots twice: their
    // attempts were cut by the kill), and no refused one did.
    assert_eq!(arrivals, [1, 2, 3, 4, 5, 11, 12, 13, 14], "{arrivals:?}");
}

/// Reads from `stream` until the server closes it (or resets it); returns what came and
/// how long it took, or `None` when it stayed open for `limit`.
async fn read_until_closed(
    stream: &mut tokio::net::TcpStream,
    limit: Duration,
) -> Option<(String, Duration)> {
    use tokio::io::AsyncReadExt;
    let start = Instant::now();
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let left = limit.checked_sub(start.elapsed())?;
        match tokio::time::timeout(left, stream.read(&mut buffer)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => {
                return Some((
                    String::from_utf8_lossy(&received).into_owned(),
                    start.elapsed(),
                ))
            }
            Ok(Ok(n)) => received.extend_from_slice(&buffer[..n]),
        }
    }
}

/// A client that sends its request's head too slowly, stops sending its body, or leaves its
/// keep-alive connection idle, loses the connection after the configured read timeouts.
#[tokio::test]
async fn slow_and_idle_clients_cannot_hold_connections() {
    use tokio::io::AsyncWriteExt;
    let gateway = InProcess::start(|config| {
        config.header_read_timeout = Duration::from_secs(1);
        config.body_read_timeout = Duration::from_secs(1);
    })
    .await;
    let address = gateway.url.trim_start_matches("http://").to_owned();
    let limit = Duration::from_secs(10);

    // Half a request head, then nothing.
    let mut slow_head = tokio::net::TcpStream::connect(&address).await.unwrap();
    slow_head
        .write_all(b"POST /v1/send/order/process HTTP/1.1\r\nhost: durin\r\n")
        .await
        .unwrap();
    let (_, after) = read_until_closed(&mut slow_head, limit)
        .await
        .expect("a connection with half a head stayed open");
    assert!(
        after >= Duration::from_millis(900),
        "closed after {after:?}"
    );

    // A whole head that announces 100 bytes of body, 10 of them, then nothing.
    let mut slow_body = tokio::net::TcpStream::connect(&address).await.unwrap();
    slow_body
        .write_all(
            b"POST /v1/send/order/process HTTP/1.1\r\nhost: durin\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"a\": 123",
        )
        .await
        .unwrap();
    let (answer, _) = read_until_closed(&mut slow_body, limit)
        .await
        .expect("a connection with a stalled body stayed open");
    // A problem that says why, and the connection's end.
    assert!(
        answer.starts_with("HTTP/1.1 400") && answer.contains("designated timeout"),
        "a stalled body: {answer}"
    );

    // One request answered, then an idle keep-alive connection.
    let mut idle = tokio::net::TcpStream::connect(&address).await.unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nhost: durin\r\n\r\n")
        .await
        .unwrap();
    let (answer, _) = read_until_closed(&mut idle, limit)
        .await
        .expect("an idle keep-alive connection stayed open");
    assert!(answer.starts_with("HTTP/1.1 "), "{answer}");
    gateway.stop().await;
}
