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

    // Both runs replay against the handler: its state writes, its signal wait and its
    // timer are answered from the recordings, and nothing is written to the journals.
    let mut histories = String::new();
    for workflow_id in ["p-1", "p-2"] {
        let history = client()
            .get(format!(
                "{}/v1/workflows/approval/{workflow_id}/history",
                gateway.admin
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(history.status(), 200);
        histories.push_str(&history.text().await.unwrap());
    }
    let report: Value = client()
        .post(format!("{}/v1/replays", gateway.admin))
        .query(&[("deployment", _handler.url.as_str())])
        .body(histories)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(report["replayed"], 2, "{report:#}");
    for replayed in report["histories"].as_array().unwrap() {
        assert_eq!(replayed["reached"], "end", "{report:#}");
    }
    assert_eq!(journal(&gateway.admin, &id).await, entries);
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
    let app = axum::Router::new()
        .route("/stages/run", axum::routing::post(run))
        .with_state(handler.clone());
    let url = format!("http://{}", serve_router(app).await);
    register_plain(
        &gateway.admin,
        &url,
        json!([{"name": "stages", "handlers": [{"name": "run"}]}]),
    )
    .await;
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
    let handler = format!("http://{}", serve_router(app).await);
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

/// An answer of `first`: its status, `Durin-Replayed` and body.
type Answer = (u16, String, Value);

/// A plain handler that races signals, an awakeable, a timer and a child call with
/// `first`, after reading a step before its costly work.
#[derive(Clone, Default)]
struct FirstOf {
    gateway: Arc<std::sync::OnceLock<String>>,
    /// Per workflow id: every answer `first` gave, as (status, Durin-Replayed, body).
    answers: Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<Answer>>>>,
    /// Per workflow id: how many times the costly work before the race ran.
    work: Arc<std::sync::Mutex<std::collections::HashMap<String, u32>>>,
    /// Per workflow id: the awakeable's token.
    tokens: Arc<std::sync::Mutex<std::collections::HashMap<String, String>>>,
}

async fn first_of(
    axum::extract::State(app): axum::extract::State<FirstOf>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> (
    axum::http::StatusCode,
    [(&'static str, &'static str); 1],
    axum::Json<Value>,
) {
    let (status, body) = first_of_answer(app, headers, body).await;
    let suspended = if status == axum::http::StatusCode::ACCEPTED {
        "true"
    } else {
        "false"
    };
    (status, [("durin-suspended", suspended)], body)
}

async fn first_of_answer(
    app: FirstOf,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> (axum::http::StatusCode, axum::Json<Value>) {
    use axum::http::StatusCode;
    let header = |name: &str| headers[name].to_str().unwrap().to_owned();
    let gateway = app.gateway.get().unwrap().clone();
    let context = format!("{gateway}/v1/contexts/{}", header("durin-invocation-id"));
    let input: Value = serde_json::from_slice(&body).unwrap();
    let workflow = input["id"].as_str().unwrap().to_owned();
    let with_attempt = |request: reqwest::RequestBuilder| {
        request
            .header("durin-attempt", header("durin-attempt"))
            .header("durin-attempt-token", header("durin-attempt-token"))
    };
    // The costly work runs only when its step is not recorded.
    let step = with_attempt(client().get(format!("{context}/steps/work")))
        .send()
        .await
        .unwrap();
    let work = match step.status().as_u16() {
        204 => {
            *app.work
                .lock()
                .unwrap()
                .entry(workflow.clone())
                .or_default() += 1;
            let recorded = with_attempt(client().post(format!("{context}/steps/work")))
                .json(&json!({"worked": true}))
                .send()
                .await
                .unwrap();
            assert_eq!(recorded.headers()["durin-replayed"], "false");
            recorded.json::<Value>().await.unwrap()
        }
        200 => {
            assert_eq!(step.headers()["durin-replayed"], "true");
            step.json::<Value>().await.unwrap()
        }
        other => panic!("GET steps/work answered {other}"),
    };
    assert_eq!(work, json!({"worked": true}));
    // The awakeable is created, and its token handed over, before the race.
    let awakeable: Value = with_attempt(client().post(format!("{context}/awakeables/callback")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    app.tokens.lock().unwrap().insert(
        workflow.clone(),
        awakeable["token"].as_str().unwrap().to_owned(),
    );
    let members = json!([
        {"signal": "go", "key": "go-a"},
        {"signal": "stop"},
        {"awakeable": "callback"},
        {"sleep": "deadline", "duration": input["deadline"]},
        {"call": "helper", "service": "firsts", "handler": "child", "input": {"id": workflow}},
    ]);
    let answer = with_attempt(client().post(format!("{context}/first")))
        .json(&json!({ "of": members }))
        .send()
        .await
        .unwrap();
    let status = answer.status().as_u16();
    let replayed = answer
        .headers()
        .get("durin-replayed")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let suspended = answer.headers().contains_key("durin-suspended");
    let body: Value = answer.json().await.unwrap_or(Value::Null);
    app.answers
        .lock()
        .unwrap()
        .entry(workflow.clone())
        .or_default()
        .push((status, replayed.clone(), body.clone()));
    if suspended {
        // The documented answer of a suspended attempt.
        return (StatusCode::ACCEPTED, axum::Json(Value::Null));
    }
    assert_eq!(status, 200, "{body}");
    if replayed == "false" {
        // As if the process died after the race: the next attempt replays it.
        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(Value::Null));
    }
    (StatusCode::OK, axum::Json(body))
}

/// The child the race calls: it waits for its signal `release`.
async fn first_child(
    axum::extract::State(app): axum::extract::State<FirstOf>,
    headers: axum::http::HeaderMap,
) -> (axum::http::StatusCode, axum::Json<Value>) {
    let header = |name: &str| headers[name].to_str().unwrap().to_owned();
    let answer = client()
        .post(format!(
            "{}/v1/contexts/{}/signals/release",
            app.gateway.get().unwrap(),
            header("durin-invocation-id")
        ))
        .header("durin-attempt", header("durin-attempt"))
        .header("durin-attempt-token", header("durin-attempt-token"))
        .send()
        .await
        .unwrap();
    match answer.status().as_u16() {
        200 => (
            axum::http::StatusCode::OK,
            axum::Json(json!({"released": answer.json::<Value>().await.unwrap()})),
        ),
        _ => (axum::http::StatusCode::ACCEPTED, axum::Json(Value::Null)),
    }
}

/// `first` answers whichever of two signals, an awakeable, a timer and a child call
/// completes first, the same on the replay; a signal buffered before the race answers it
/// in the attempt that waits; a recorded step is read before the costly work, which runs
/// once per run; bad races are refused with 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_handler_waits_for_the_first_of_several_commands() {
    if !require_store() {
        return;
    }
    let app = FirstOf::default();
    let router = axum::Router::new()
        .route("/first", axum::routing::post(first_of))
        .route("/child", axum::routing::post(first_child))
        .with_state(app.clone());
    let handler = format!("http://{}", serve_router(router).await);
    let home = GatewayHome::new();
    let gateway = home.start(None);
    app.gateway.set(gateway.url.clone()).unwrap();
    register_plain(
        &gateway.admin,
        &handler,
        json!([{"name": "firsts", "handlers": [
            {"name": "run", "path": "/first",
             "retry_policy": {"initial_interval": "50ms", "maximum_attempts": 10}},
            {"name": "child", "path": "/child"}]}]),
    )
    .await;
    let start = |id: &'static str, deadline: &'static str| {
        let gateway = gateway.url.clone();
        async move {
            let started: Value = client()
                .post(format!("{gateway}/v1/workflows/firsts/{id}"))
                .json(&json!({"id": id, "deadline": deadline}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            started["invocation_id"].as_str().unwrap().to_owned()
        }
    };
    let suspended_once = |id: &'static str| {
        let app = app.clone();
        async move {
            eventually(Duration::from_secs(30), "the race to suspend", || async {
                let answers = app.answers.lock().unwrap();
                answers.get(id).is_some_and(|a| a[0].0 == 409).then_some(())
            })
            .await
        }
    };
    let signal = |id: &'static str, name: &'static str, payload: Value| {
        let gateway = gateway.url.clone();
        async move {
            let response = client()
                .post(format!("{gateway}/v1/workflows/firsts/{id}/signals/{name}"))
                .json(&payload)
                .send()
                .await
                .unwrap();
            assert!(response.status().is_success(), "{response:?}");
        }
    };

    // The second signal wins; the first signal's wait is still open, and takes nothing.
    let run = start("by-signal", "1h").await;
    suspended_once("by-signal").await;
    signal("by-signal", "stop", json!("halt")).await;
    let view = wait_final(&gateway.url, &run).await;
    assert_eq!(
        view["output"],
        json!({"index": 1, "kind": "signal", "name": "stop", "value": "halt"}),
        "{view}"
    );

    // The awakeable, resolved through its URL.
    let run = start("by-awakeable", "1h").await;
    suspended_once("by-awakeable").await;
    let token = app.tokens.lock().unwrap()["by-awakeable"].clone();
    let resolved = client()
        .post(format!("{}/v1/awakeables/{token}/resolve", gateway.url))
        .json(&json!({"ok": 1}))
        .send()
        .await
        .unwrap();
    assert!(resolved.status().is_success());
    let view = wait_final(&gateway.url, &run).await;
    assert_eq!(
        view["output"],
        json!({"index": 2, "kind": "awakeable", "name": "callback", "value": {"ok": 1}}),
        "{view}"
    );
    // Its history holds the token the handler was given (another Durin, replaying it,
    // could not derive it), and replays.
    let history = client()
        .get(format!("{}/v1/invocations/{run}/history", gateway.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let awakeable: Value = history
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .find(|line| line["entry"]["kind"] == "awakeable")
        .unwrap();
    assert_eq!(
        awakeable["entry"]["value"]["token"],
        json!(token),
        "{history}"
    );
    let report: Value = client()
        .post(format!("{}/v1/replays", gateway.admin))
        .query(&[("deployment", handler.as_str())])
        .body(history)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(report["replayed"], 1, "{report:#}");

    // The timer.
    let run = start("by-timer", "300ms").await;
    let view = wait_final(&gateway.url, &run).await;
    let output = &view["output"];
    assert_eq!(output["index"], 3, "{view}");
    assert_eq!(output["kind"], "sleep");
    assert!(
        output["value"]["fired_at_ms"].as_i64().unwrap()
            >= output["value"]["wake_at_ms"].as_i64().unwrap()
    );

    // The child call, once the child got its own signal.
    let run = start("by-child", "1h").await;
    suspended_once("by-child").await;
    let child = eventually(Duration::from_secs(30), "the child to start", || async {
        journal(&gateway.admin, &run)
            .await
            .into_iter()
            .find(|e| e["kind"] == "call")
            .and_then(|e| e["value"]["invocation_id"].as_str().map(str::to_owned))
    })
    .await;
    let released = client()
        .post(format!(
            "{}/v1/invocations/{child}/signals/release",
            gateway.url
        ))
        .json(&json!("now"))
        .send()
        .await
        .unwrap();
    assert!(released.status().is_success());
    let view = wait_final(&gateway.url, &run).await;
    assert_eq!(
        view["output"],
        json!({"index": 4, "kind": "call", "name": "helper", "invocation_id": child,
               "value": {"released": "now"}}),
        "{view}"
    );

    // A signal there before the race: answered in the attempt that waits.
    let started: Value = client()
        .post(format!(
            "{}/v1/workflows/firsts/buffered/signal-with-start",
            gateway.url
        ))
        .json(&json!({"input": {"id": "buffered", "deadline": "0s"},
                      "signal": {"name": "go", "payload": "early"}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let run = started["invocation_id"].as_str().unwrap().to_owned();
    let view = wait_final(&gateway.url, &run).await;
    assert_eq!(
        view["output"],
        json!({"index": 0, "kind": "signal", "name": "go", "value": "early"}),
        "{view}"
    );

    // Every run: each attempt after the race was decided got the same answer, from the
    // journal; the costly work ran once although each run's handler ran at least twice.
    let answers = app.answers.lock().unwrap().clone();
    for id in [
        "by-signal",
        "by-awakeable",
        "by-timer",
        "by-child",
        "buffered",
    ] {
        let ok: Vec<&Answer> = answers[id]
            .iter()
            .filter(|(status, ..)| *status == 200)
            .collect();
        assert!(answers[id].len() >= 2, "{id}: {:?}", answers[id]);
        assert_eq!(ok.last().unwrap().1, "true", "{id}: {:?}", answers[id]);
        assert!(ok.iter().all(|a| a.2 == ok[0].2), "{id}: {:?}", answers[id]);
        assert_eq!(app.work.lock().unwrap()[id], 1, "{id}: the work ran again");
    }
    // The buffered signal answered in the attempt that waited, fresh, then replayed.
    let buffered: Vec<(u16, &str)> = answers["buffered"]
        .iter()
        .map(|(status, replayed, _)| (*status, replayed.as_str()))
        .collect();
    assert_eq!(buffered, [(200, "false"), (200, "true")]);

    // Reading a step of an invocation that does not exist is a 404, not "no step".
    let unknown = client()
        .get(format!(
            "{}/v1/contexts/inv_{}/steps/work",
            gateway.url,
            "0".repeat(32)
        ))
        .header("durin-attempt", "1")
        .header("durin-attempt-token", "x")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);

    // Refusals: nothing to wait for, a member twice, two kinds in one, a field of another kind.
    let run = start("refusals", "1h").await;
    suspended_once("refusals").await;
    let record = get_json(&format!("{}/v1/invocations/{run}", gateway.url)).await;
    assert_eq!(record["status"], "suspended", "{record}");
    for (of, says) in [
        (json!([]), "1 to 16"),
        (json!([{"signal": "a"}, {"signal": "a"}]), "twice"),
        (json!([{"signal": "a", "sleep": "b"}]), "one of"),
        (json!([{"sleep": "b", "key": "k"}]), "key does not go"),
        (
            json!([{"call": "c", "service": "firsts"}]),
            "needs service and handler",
        ),
        (json!([{"timer": "t"}]), "unknown field"),
    ] {
        let refused = client()
            .post(format!("{}/v1/contexts/{run}/first", gateway.url))
            .header("durin-attempt", "1")
            .header("durin-attempt-token", "x")
            .json(&json!({ "of": of }))
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 400, "{of}");
        let problem: Value = refused.json().await.unwrap();
        assert!(
            problem["detail"].as_str().unwrap().contains(says),
            "{of}: {problem}"
        );
    }
}

/// A plain handler that answers `Durin-Suspended: true` when no wait suspended it is
/// retried, and fails when its attempts run out, the error saying why; the documented
/// answer of a real suspension is taken as one (the other tests' handlers answer it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_answer_without_a_suspension_is_retried() {
    if !require_store() {
        return;
    }
    let attempts = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let seen = Arc::clone(&attempts);
    let router = axum::Router::new().route(
        "/liar",
        axum::routing::post(move || {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                (
                    axum::http::StatusCode::ACCEPTED,
                    [("durin-suspended", "true")],
                    "",
                )
            }
        }),
    );
    let handler = format!("http://{}", serve_router(router).await);
    let home = GatewayHome::new();
    let gateway = home.start(None);
    register_plain(
        &gateway.admin,
        &handler,
        json!([{"name": "liar", "handlers": [{"name": "run", "path": "/liar",
            "retry_policy": {"initial_interval": "50ms", "maximum_attempts": 2}}]}]),
    )
    .await;
    let started: Value = client()
        .post(format!("{}/v1/send/liar/run", gateway.url))
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = started["invocation_id"].as_str().unwrap().to_owned();
    let view = wait_final(&gateway.url, &id).await;
    assert_eq!(view["status"], "failed", "{view}");
    assert_eq!(attempts.load(std::sync::atomic::Ordering::SeqCst), 2);
    let text = view.to_string();
    assert!(
        text.contains("no wait suspended attempt 2"),
        "the failure says why: {text}"
    );
}

/// A plain workflow that keeps a running total: each `add` update (received at an update
/// wait raced against the signal `done`) is refused when negative, else added to the
/// state `total` and answered with the new total; `done` ends the run with the total.
#[derive(Clone, Default)]
struct Adder {
    gateway: Arc<std::sync::OnceLock<String>>,
    /// Every answer of `first`, in order: (attempt, kind, Durin-Replayed).
    waits: Arc<std::sync::Mutex<Vec<(String, String, String)>>>,
}

async fn adder(
    axum::extract::State(app): axum::extract::State<Adder>,
    headers: axum::http::HeaderMap,
) -> (
    axum::http::StatusCode,
    [(&'static str, &'static str); 1],
    axum::Json<Value>,
) {
    use axum::http::StatusCode;
    let header = |name: &str| headers[name].to_str().unwrap().to_owned();
    let context = format!(
        "{}/v1/contexts/{}",
        app.gateway.get().unwrap(),
        header("durin-invocation-id")
    );
    let attempt = header("durin-attempt");
    let call = |path: String, body: Value| {
        client()
            .post(format!("{context}/{path}"))
            .header("durin-attempt", header("durin-attempt"))
            .header("durin-attempt-token", header("durin-attempt-token"))
            .json(&body)
    };
    let mut total = 0_i64;
    for i in 1.. {
        let members = json!([{"update": "add", "key": format!("add-{i}")}, {"signal": "done"}]);
        let answer = call("first".into(), json!({ "of": members }))
            .send()
            .await
            .unwrap();
        if answer.headers().contains_key("durin-suspended") {
            return (
                StatusCode::ACCEPTED,
                [("durin-suspended", "true")],
                axum::Json(Value::Null),
            );
        }
        assert_eq!(answer.status(), 200);
        let replayed = answer.headers()["durin-replayed"]
            .to_str()
            .unwrap()
            .to_owned();
        let won: Value = answer.json().await.unwrap();
        app.waits.lock().unwrap().push((
            attempt.clone(),
            won["kind"].as_str().unwrap().to_owned(),
            replayed,
        ));
        if won["kind"] == "signal" {
            return (
                StatusCode::OK,
                [("durin-suspended", "false")],
                axum::Json(json!({ "total": total })),
            );
        }
        assert_eq!(won["kind"], "update", "{won}");
        assert_eq!(won["name"], "add", "{won}");
        let update = &won["value"];
        let update_id = update["update_id"].as_str().unwrap();
        let amount = update["input"].as_i64().unwrap();
        if amount < 0 {
            let refused = call(
                format!("updates/{update_id}/refuse"),
                json!({"status": 422, "message": "only positive amounts"}),
            )
            .send()
            .await
            .unwrap();
            assert_eq!(refused.status(), 204);
            // Its caller got the refusal: it cannot be answered as well.
            let answered = call(format!("updates/{update_id}/result"), json!({"value": 0}))
                .send()
                .await
                .unwrap();
            assert_eq!(answered.status(), 409);
            continue;
        }
        total += amount;
        let set = client()
            .put(format!("{context}/state/total"))
            .header("durin-attempt", header("durin-attempt"))
            .header("durin-attempt-token", header("durin-attempt-token"))
            .json(&total)
            .send()
            .await
            .unwrap();
        assert_eq!(set.status(), 200);
        let answered = call(
            format!("updates/{update_id}/result"),
            json!({ "value": total }),
        )
        .send()
        .await
        .unwrap();
        assert_eq!(answered.status(), 200);
        assert_eq!(answered.json::<Value>().await.unwrap()["value"], total);
    }
    unreachable!()
}

/// Updates reach a plain workflow: each is answered with the handler's result, a refused
/// one with the validator's 4xx, a retry with the same `Idempotency-Key` with the same
/// answer; every attempt replays the updates before it from the journal; the run ends with
/// the total of the accepted ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_workflow_validates_accepts_and_answers_updates() {
    if !require_store() {
        return;
    }
    let app = Adder::default();
    let router = axum::Router::new()
        .route("/adder", axum::routing::post(adder))
        .with_state(app.clone());
    let handler = format!("http://{}", serve_router(router).await);
    let home = GatewayHome::new();
    let gateway = home.start(None);
    app.gateway.set(gateway.url.clone()).unwrap();
    register_plain(
        &gateway.admin,
        &handler,
        json!([{"name": "adder", "handlers": [{"name": "run", "path": "/adder"}]}]),
    )
    .await;
    let started: Value = client()
        .post(format!("{}/v1/workflows/adder/a-1", gateway.url))
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let run = started["invocation_id"].as_str().unwrap().to_owned();
    let update = |amount: i64, key: Option<&'static str>| {
        let gateway = gateway.url.clone();
        async move {
            let mut request = client()
                .post(format!("{gateway}/v1/workflows/adder/a-1/updates/add"))
                .header("prefer", "wait=20")
                .json(&amount);
            if let Some(key) = key {
                request = request.header("idempotency-key", key);
            }
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    assert_eq!(update(5, Some("first")).await, (200, json!(5)));
    let (status, refused) = update(-1, None).await;
    assert_eq!(status, 422, "{refused}");
    assert!(
        refused.to_string().contains("only positive amounts"),
        "{refused}"
    );
    assert_eq!(update(7, None).await, (200, json!(12)));
    // The same key: the same update, answered again, not added twice.
    assert_eq!(update(5, Some("first")).await, (200, json!(5)));
    let total = get_json(&format!(
        "{}/v1/workflows/adder/a-1/queries/total",
        gateway.url
    ))
    .await;
    assert_eq!(total, json!(12));
    let done = client()
        .post(format!(
            "{}/v1/workflows/adder/a-1/signals/done",
            gateway.url
        ))
        .json(&json!(null))
        .send()
        .await
        .unwrap();
    assert!(done.status().is_success());
    let view = wait_final(&gateway.url, &run).await;
    assert_eq!(view["output"], json!({"total": 12}), "{view}");
    // Every attempt runs from the top: its waits are a prefix of the last attempt's
    // (three updates, then the signal), and whatever an earlier attempt got is replayed.
    let waits = app.waits.lock().unwrap().clone();
    let mut attempts: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for (attempt, kind, replayed) in &waits {
        if attempts.last().is_none_or(|(a, _)| a != attempt) {
            attempts.push((attempt.clone(), Vec::new()));
        }
        attempts
            .last_mut()
            .unwrap()
            .1
            .push((kind.clone(), replayed.clone()));
    }
    let last: Vec<&str> = attempts
        .last()
        .unwrap()
        .1
        .iter()
        .map(|(k, _)| k.as_str())
        .collect();
    assert_eq!(last, ["update", "update", "update", "signal"], "{waits:?}");
    for pair in attempts.windows(2) {
        let (earlier, later) = (&pair[0].1, &pair[1].1);
        assert!(later.len() >= earlier.len(), "{waits:?}");
        for (k, (kind, replayed)) in later.iter().enumerate() {
            assert_eq!(kind, last[k], "{waits:?}");
            if k < earlier.len() {
                assert_eq!(
                    replayed, "true",
                    "an earlier attempt's wait is replayed: {waits:?}"
                );
            }
        }
    }

    // The run replays: its update waits, its answers and its signal come from the
    // recording, and nothing is written.
    let recorded = journal(&gateway.admin, &run).await;
    let history = client()
        .get(format!("{}/v1/workflows/adder/a-1/history", gateway.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let report: Value = client()
        .post(format!("{}/v1/replays", gateway.admin))
        .query(&[("deployment", handler.as_str())])
        .body(history)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(report["replayed"], 1, "{report:#}");
    assert_eq!(report["histories"][0]["reached"], "end", "{report:#}");
    assert_eq!(journal(&gateway.admin, &run).await, recorded);
}

/// Knowing an invocation id grants nothing: state writes that claim another attempt (one
/// far ahead of the running one) or present a made-up token are refused, and the running
/// attempt's next writes are recorded as new, not answered as replays of its first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_state_writes_are_refused_and_change_no_count() {
    if !require_store() {
        return;
    }
    use axum::http::HeaderMap;
    use std::sync::{Arc, Mutex};

    /// (who wrote, status, Durin-Replayed if 200)
    type Seen = (String, u16, Option<String>);

    #[derive(Clone, Default)]
    struct Handler {
        gateway: Arc<Mutex<String>>,
        seen: Arc<Mutex<Vec<Seen>>>,
    }

    async fn run(
        axum::extract::State(handler): axum::extract::State<Handler>,
        headers: HeaderMap,
    ) -> &'static str {
        let gateway = handler.gateway.lock().unwrap().clone();
        let id = headers["durin-invocation-id"].to_str().unwrap().to_owned();
        let attempt = headers["durin-attempt"].to_str().unwrap().to_owned();
        let token = headers["durin-attempt-token"].to_str().unwrap().to_owned();
        let writes = [
            ("running", attempt.as_str(), token.as_str(), "a"),
            ("far ahead", "4294967295", "made-up", "x"),
            ("made-up token", attempt.as_str(), "made-up", "y"),
            ("running", attempt.as_str(), token.as_str(), "b"),
            ("running", attempt.as_str(), token.as_str(), "c"),
        ];
        for (who, attempt, token, value) in writes {
            let response = client()
                .put(format!("{gateway}/v1/contexts/{id}/state/stage"))
                .header("durin-attempt", attempt)
                .header("durin-attempt-token", token)
                .json(value)
                .send()
                .await
                .unwrap();
            let replayed = response
                .headers()
                .get("durin-replayed")
                .map(|v| v.to_str().unwrap().to_owned());
            handler
                .seen
                .lock()
                .unwrap()
                .push((who.into(), response.status().as_u16(), replayed));
        }
        "\"done\""
    }

    let home = GatewayHome::new();
    let gateway = home.start(None);
    let handler = Handler::default();
    *handler.gateway.lock().unwrap() = gateway.url.clone();
    let app = axum::Router::new()
        .route("/stages/run", axum::routing::post(run))
        .with_state(handler.clone());
    let url = format!("http://{}", serve_router(app).await);
    register_plain(
        &gateway.admin,
        &url,
        json!([{"name": "stages", "handlers": [{"name": "run"}]}]),
    )
    .await;
    let started: Value = client()
        .post(format!("{}/v1/workflows/stages/forged-1", gateway.url))
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
    let seen = handler.seen.lock().unwrap().clone();
    let written = |who: &str| (who.to_owned(), 200, Some("false".to_owned()));
    assert_eq!(
        seen,
        vec![
            written("running"),
            ("far ahead".into(), 409, None),
            ("made-up token".into(), 409, None),
            written("running"),
            written("running"),
        ]
    );
    let writes: Vec<Value> = journal(&gateway.admin, &id)
        .await
        .into_iter()
        .filter(|e| e["kind"] == "state")
        .map(|e| e["value"]["set"].clone())
        .collect();
    assert_eq!(writes, vec![json!("a"), json!("b"), json!("c")]);
    let now = get_json(&format!(
        "{}/v1/invocations/{id}/queries/stage",
        gateway.url
    ))
    .await;
    assert_eq!(now, json!("c"));
}

/// An update handled by a run that then continued as new: its `Location` (scoped to the
/// workflow id) still answers its result, now that another run is the workflow id's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_updates_result_outlives_its_runs_continue_as_new() {
    if !require_store() {
        return;
    }
    use axum::http::{HeaderMap, StatusCode};
    use std::sync::{Arc, OnceLock};

    let gateway_url: Arc<OnceLock<String>> = Arc::default();
    let handler = {
        let gateway_url = Arc::clone(&gateway_url);
        move |headers: HeaderMap, body: axum::body::Bytes| {
            let gateway = gateway_url.get().unwrap().clone();
            async move {
                let input: Value = serde_json::from_slice(&body).unwrap();
                if input["second"] == true {
                    return (
                        StatusCode::OK,
                        [("durin-suspended", "false")],
                        "\"second\"".into(),
                    );
                }
                let header = |name: &str| headers[name].to_str().unwrap().to_owned();
                let context = format!("{gateway}/v1/contexts/{}", header("durin-invocation-id"));
                let call = |path: &str, body: Value| {
                    client()
                        .post(format!("{context}/{path}"))
                        .header("durin-attempt", header("durin-attempt"))
                        .header("durin-attempt-token", header("durin-attempt-token"))
                        .json(&body)
                        .send()
                };
                let answer = call("first", json!({"of": [{"update": "add", "key": "add-1"}]}))
                    .await
                    .unwrap();
                if answer.headers().contains_key("durin-suspended") {
                    return (
                        StatusCode::ACCEPTED,
                        [("durin-suspended", "true")],
                        String::new(),
                    );
                }
                let won: Value = answer.json().await.unwrap();
                let update_id = won["value"]["update_id"].as_str().unwrap().to_owned();
                let amount = won["value"]["input"].as_i64().unwrap();
                let answered = call(
                    &format!("updates/{update_id}/result"),
                    json!({ "value": amount * 10 }),
                )
                .await
                .unwrap();
                assert_eq!(answered.status(), 200);
                let next = call("continue-as-new", json!({"second": true}))
                    .await
                    .unwrap();
                assert_eq!(next.status(), 200);
                (
                    StatusCode::OK,
                    [("durin-suspended", "false")],
                    "\"continued\"".into(),
                )
            }
        }
    };
    let router = axum::Router::new().route("/looper", axum::routing::post(handler));
    let handler_url = format!("http://{}", serve_router(router).await);
    let home = GatewayHome::new();
    let gateway = home.start(None);
    gateway_url.set(gateway.url.clone()).unwrap();
    register_plain(
        &gateway.admin,
        &handler_url,
        json!([{"name": "looper", "handlers": [{"name": "run", "path": "/looper"}]}]),
    )
    .await;
    let workflow = format!("{}/v1/workflows/looper/l-1", gateway.url);
    let started = client()
        .post(&workflow)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert!(started.status().is_success());
    let sent = client()
        .post(format!("{workflow}/updates/add"))
        .header("prefer", "wait=20")
        .json(&4)
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 200);
    let location = sent.headers()["location"].to_str().unwrap().to_owned();
    assert_eq!(sent.json::<Value>().await.unwrap(), json!(40));
    // The second run took the workflow id and ended.
    let runs = eventually(Duration::from_secs(20), "the second run's end", || async {
        let runs = get_json(&format!("{}/v1/workflows/looper/l-1/runs", gateway.admin)).await;
        let runs = runs["runs"].as_array().cloned().unwrap_or_default();
        (runs.len() == 2 && runs[1]["status"] == "completed").then_some(runs)
    })
    .await;
    assert_eq!(runs[0]["status"], "continued", "{runs:?}");
    let again = client()
        .get(format!("{}{location}", gateway.url))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200, "{location}");
    assert_eq!(again.json::<Value>().await.unwrap(), json!(40));
    let missing = client()
        .get(format!("{workflow}/updates/add/upd_0123"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
}
