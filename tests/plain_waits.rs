//! A workflow with no SDK: the Python approval handler (standard library only) waits for a
//! signal raced against a durable timer through the context API, keeps state that queries
//! read, and is killed with SIGKILL while it waits; nothing it recorded runs again.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use support::*;

fn start_approval(durin: &str, port: u16) -> Proc {
    let mut command = Command::new("python3");
    command
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/python/approval_handler.py"))
        .args(["--port", &port.to_string(), "--durin", durin]);
    Proc::spawn(command, "approval handler listening on ")
}

async fn register_approval(admin: &str, handler: &str) {
    register_plain(
        admin,
        handler,
        json!([{"name": "approval", "handlers": [{"name": "run"}]}]),
    )
    .await;
}

async fn run_view(gateway: &str, id: &str) -> Value {
    get_json(&format!("{gateway}/v1/workflows/approval/{id}")).await
}

async fn wait_status(gateway: &str, id: &str, status: &str) -> Value {
    eventually(Duration::from_secs(30), status, || async {
        let view = run_view(gateway, id).await;
        (view["status"] == status).then_some(view)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_workflow_waits_survives_a_killed_handler_and_takes_its_signal_once() {
    if !(require("python3") && require_store()) {
        return;
    }
    let home = GatewayHome::new();
    let gateway = home.start(None);
    let mut handler = start_approval(&gateway.url, 0);
    register_approval(&gateway.admin, &handler.url).await;
    let start = |id: &str, deadline: &str| {
        client()
            .post(format!("{}/v1/workflows/approval/{id}", gateway.url))
            .json(&json!({"request": id, "deadline": deadline}))
            .send()
    };
    assert_eq!(start("p-1", "1h").await.unwrap().status(), 202);
    let view = wait_status(&gateway.url, "p-1", "suspended").await;
    let id = view["id"].as_str().unwrap().to_owned();
    let query = |name: &'static str| {
        let url = format!("{}/v1/workflows/approval/p-1/queries/{name}", gateway.url);
        async move { get_json(&url).await }
    };
    assert_eq!(query("is_cancelled").await, json!(false));
    assert_eq!(query("status").await, json!("waiting for the deadline"));

    // The handler dies while the workflow waits (it holds nothing then); a new one comes.
    handler.kill();
    let _handler = start_approval(&gateway.url, handler.addr.port());
    let sent = client()
        .post(format!(
            "{}/v1/workflows/approval/p-1/signals/cancel",
            gateway.url
        ))
        .json(&"not needed any more")
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 202);
    let done = wait_status(&gateway.url, "p-1", "completed").await;
    assert_eq!(
        done["output"],
        r#"request p-1 cancelled: "not needed any more""#
    );
    assert_eq!(query("is_cancelled").await, json!(true));
    // Each recorded call was recorded once: the state writes of the first attempt were
    // not repeated by the second, which answered them from the journal.
    let entries = journal(&gateway.admin, &id).await;
    let kinds: Vec<(String, Option<String>)> = shape(&entries);
    let expected: Vec<(String, Option<String>)> = [
        ("input", None),
        ("state", Some("is_cancelled")),
        ("state", Some("status")),
        ("signal", Some("cancel")),
        ("sleep", Some("signal:cancel")),
        ("state", Some("is_cancelled")),
        ("state", Some("status")),
        ("output", None),
    ]
    .into_iter()
    .map(|(k, n)| (k.to_owned(), n.map(str::to_owned)))
    .collect();
    assert_eq!(kinds, expected, "{entries:?}");
    assert_eq!(entries[3]["completion"]["value"], "not needed any more");

    // Without a signal, the deadline decides (the wait answers 204 to the handler).
    assert_eq!(start("p-2", "300ms").await.unwrap().status(), 202);
    let done = wait_status(&gateway.url, "p-2", "completed").await;
    assert_eq!(done["output"], "request p-2 approved");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_handler_must_present_its_attempt_and_token() {
    if !(require("python3") && require_store()) {
        return;
    }
    let home = GatewayHome::new();
    let gateway = home.start(None);
    let handler = start_approval(&gateway.url, 0);
    register_approval(&gateway.admin, &handler.url).await;
    let started: Value = client()
        .post(format!("{}/v1/workflows/approval/t-1", gateway.url))
        .json(&json!({"request": "t-1", "deadline": "1h"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = started["invocation_id"].as_str().unwrap().to_owned();
    wait_status(&gateway.url, "t-1", "suspended").await;
    let before = journal(&gateway.admin, &id).await;
    for (attempt, token) in [(None, None), (Some("1"), None), (Some("1"), Some("guess"))] {
        let mut request = client().post(format!("{}/v1/contexts/{id}/signals/cancel", gateway.url));
        if let Some(attempt) = attempt {
            request = request.header("durin-attempt", attempt);
        }
        if let Some(token) = token {
            request = request.header("durin-attempt-token", token);
        }
        let response = request.send().await.unwrap();
        assert!(
            matches!(response.status().as_u16(), 400 | 409),
            "{}",
            response.status()
        );
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
    }
    assert_eq!(
        journal(&gateway.admin, &id).await,
        before,
        "nothing was written"
    );
}

/// A plain handler that wrote state and then failed runs again from the top: its writes
/// replay (the k-th write of a key answers the k-th recorded one) and the state never goes
/// back to an earlier value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_state_writes_replay_and_never_go_back() {
    if !(require("python3") && require_store()) {
        return;
    }
    use axum::http::{HeaderMap, StatusCode};
    use std::sync::{Arc, Mutex};

    /// (attempt, value written, Durin-Replayed, the query's answer right after)
    type Seen = (String, String, String, Value);

    #[derive(Clone)]
    struct Handler {
        gateway: Arc<Mutex<String>>,
        seen: Arc<Mutex<Vec<Seen>>>,
    }

    async fn run(
        axum::extract::State(handler): axum::extract::State<Handler>,
        headers: HeaderMap,
    ) -> (StatusCode, String) {
        let gateway = handler.gateway.lock().unwrap().clone();
        let id = headers["durin-invocation-id"].to_str().unwrap().to_owned();
        let attempt = headers["durin-attempt"].to_str().unwrap().to_owned();
        let token = headers["durin-attempt-token"].to_str().unwrap().to_owned();
        let values: &[&str] = if attempt == "1" {
            &["a", "b"]
        } else {
            &["a", "b", "c"]
        };
        for value in values {
            let response = client()
                .put(format!("{gateway}/v1/contexts/{id}/state/stage"))
                .header("durin-attempt", &attempt)
                .header("durin-attempt-token", &token)
                .json(value)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            let replayed = response.headers()["durin-replayed"]
                .to_str()
                .unwrap()
                .to_owned();
            let now = get_json(&format!("{gateway}/v1/invocations/{id}/queries/stage")).await;
            handler.seen.lock().unwrap().push((
                attempt.clone(),
                (*value).to_owned(),
                replayed,
                now,
            ));
        }
        if attempt == "1" {
            // As if the process died after its writes.
            return (StatusCode::SERVICE_UNAVAILABLE, "crash".into());
        }
        (StatusCode::OK, "\"done\"".into())
    }

    let home = GatewayHome::new();
    let gateway = home.start(None);
    let handler = Handler {
        gateway: Arc::new(Mutex::new(gateway.url.clone())),
        seen: Arc::default(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new()
        .route("/stages/run", axum::routing::post(run))
        .with_state(handler.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let response = client()
        .post(format!("{}/v1/deployments", gateway.admin))
        .json(&json!({"url": url, "services": [{"name": "stages", "handlers": [{"name": "run"}]}]}))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
    let started: Value = client()
        .post(format!("{}/v1/workflows/stages/s-1", gateway.url))
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = started["invocation_id"].as_str().unwrap().to_owned();
    let done = wait_final(&gateway.url, &id).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["output"], "done");
    let seen = handler.seen.lock().unwrap().clone();
    let expected = [
        ("1", "a", "false", "a"),
        ("1", "b", "false", "b"),
        // The second attempt replays a and b: the state stays at b, never back to a.
        ("2", "a", "true", "b"),
        ("2", "b", "true", "b"),
        ("2", "c", "false", "c"),
    ];
    let expected: Vec<Seen> = expected
        .iter()
        .map(|(a, v, r, q)| ((*a).into(), (*v).into(), (*r).into(), json!(q)))
        .collect();
    assert_eq!(seen, expected);
    let writes: Vec<Value> = journal(&gateway.admin, &id)
        .await
        .into_iter()
        .filter(|e| e["kind"] == "state")
        .map(|e| e["value"]["set"].clone())
        .collect();
    assert_eq!(writes, vec![json!("a"), json!("b"), json!("c")]);
}

/// A plain workflow cancelled while it waits: Durin calls it again, its wait answers the
/// `cancelled` problem (the timer had not fired), it answers 409 and ends cancelled; its
/// earlier state writes are not repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_workflow_cancelled_while_it_waits_ends_cancelled() {
    if !(require("python3") && require_store()) {
        return;
    }
    let home = GatewayHome::new();
    let gateway = home.start(None);
    let handler = start_approval(&gateway.url, 0);
    register_approval(&gateway.admin, &handler.url).await;
    let started = client()
        .post(format!("{}/v1/workflows/approval/c-1", gateway.url))
        .json(&json!({"request": "c-1", "deadline": "1h"}))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 202);
    let view = wait_status(&gateway.url, "c-1", "suspended").await;
    let id = view["id"].as_str().unwrap().to_owned();
    let cancelled = client()
        .post(format!("{}/v1/workflows/approval/c-1/cancel", gateway.url))
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status(), 202);
    let view = wait_status(&gateway.url, "c-1", "cancelled").await;
    assert_eq!(view["failure"]["status"], 409, "{view}");
    let kinds: Vec<String> = journal(&gateway.admin, &id)
        .await
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        kinds,
        ["input", "state", "state", "signal", "sleep", "cancel", "output"],
        "the state writes and the wait were not recorded again"
    );
}

/// A plain handler written in this test: it counts its runs (the costly work before its
/// wait), then waits for the signal `go` raced against a timer of the input's `timeout`
/// through the context API, and answers which came first; a suspension ends its attempt.
#[derive(Clone, Default)]
struct Racer {
    gateway: Arc<std::sync::OnceLock<String>>,
    runs: Arc<std::sync::atomic::AtomicUsize>,
}

async fn race(
    axum::extract::State(racer): axum::extract::State<Racer>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> (axum::http::StatusCode, axum::Json<Value>) {
    racer.runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let header = |name: &str| headers[name].to_str().unwrap().to_owned();
    let input: Value = serde_json::from_slice(&body).unwrap();
    let timeout = input["timeout"].as_str().unwrap();
    let answer = client()
        .post(format!(
            "{}/v1/contexts/{}/signals/go?timeout={timeout}",
            racer.gateway.get().unwrap(),
            header("durin-invocation-id"),
        ))
        .header("durin-attempt", header("durin-attempt"))
        .header("durin-attempt-token", header("durin-attempt-token"))
        .send()
        .await
        .unwrap();
    match answer.status().as_u16() {
        200 => (
            axum::http::StatusCode::OK,
            axum::Json(json!({ "signal": answer.json::<Value>().await.unwrap() })),
        ),
        204 => (
            axum::http::StatusCode::OK,
            axum::Json(json!({ "timed_out": true })),
        ),
        // Suspended: the attempt ends, Durin calls again when something has arrived.
        _ => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(Value::Null),
        ),
    }
}

/// A signal buffered before a wait with a timeout answers the wait at once, in the
/// attempt that waits (plain-http.md: "at once"), also with a zero timeout, which looks at
/// what is buffered without waiting; with nothing buffered a zero timeout answers 204 at
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_with_a_timeout_takes_a_buffered_signal_at_once() {
    if !require_store() {
        return;
    }
    let racer = Racer::default();
    let app = axum::Router::new()
        .route("/run", axum::routing::post(race))
        .with_state(racer.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let handler = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let home = GatewayHome::new();
    let gateway = home.start(None);
    racer.gateway.set(gateway.url.clone()).unwrap();
    register_plain(
        &gateway.admin,
        &handler,
        json!([{"name": "racer", "handlers": [{"name": "run", "path": "/run"}]}]),
    )
    .await;

    let outcomes = [
        ("buffered-1h", "1h", true, json!({ "signal": "ready" })),
        ("buffered-0s", "0s", true, json!({ "signal": "ready" })),
        ("empty-0s", "0s", false, json!({ "timed_out": true })),
    ];
    for (id, timeout, buffered, expected) in outcomes {
        let runs_before = racer.runs.load(std::sync::atomic::Ordering::SeqCst);
        let input = json!({ "timeout": timeout });
        let request = if buffered {
            // The signal is there before the run starts.
            client()
                .post(format!(
                    "{}/v1/workflows/racer/{id}/signal-with-start",
                    gateway.url
                ))
                .json(&json!({ "input": input, "signal": {"name": "go", "payload": "ready"} }))
        } else {
            client()
                .post(format!("{}/v1/workflows/racer/{id}", gateway.url))
                .json(&input)
        };
        let started: Value = request.send().await.unwrap().json().await.unwrap();
        let run = started["invocation_id"].as_str().unwrap().to_owned();
        let view = wait_final(&gateway.url, &run).await;
        assert_eq!(view["status"], "completed", "{id}: {view}");
        assert_eq!(view["output"], expected, "{id}: {view}");
        assert_eq!(
            racer.runs.load(std::sync::atomic::Ordering::SeqCst) - runs_before,
            1,
            "{id}: the work before the wait ran again"
        );
    }
}
