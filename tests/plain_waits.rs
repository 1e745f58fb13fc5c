//! A workflow with no SDK: the Python approval handler (standard library only) waits for a
//! signal raced against a durable timer through the context API, keeps state that queries
//! read, and is killed with SIGKILL while it waits; nothing it recorded runs again.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::PathBuf;
use std::process::Command;
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

async fn register_approval(gateway: &str, handler: &str) {
    let response = client()
        .post(format!("{gateway}/v1/deployments"))
        .json(&json!({
            "url": handler,
            "services": [{"name": "approval", "handlers": [{"name": "run"}]}],
        }))
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "{}",
        response.text().await.unwrap()
    );
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
    let home = GatewayHome::new();
    let gateway = home.start(None);
    let mut handler = start_approval(&gateway.url, 0);
    register_approval(&gateway.url, &handler.url).await;
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
    let entries = journal(&gateway.url, &id).await;
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
    let home = GatewayHome::new();
    let gateway = home.start(None);
    let handler = start_approval(&gateway.url, 0);
    register_approval(&gateway.url, &handler.url).await;
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
    let before = journal(&gateway.url, &id).await;
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
        journal(&gateway.url, &id).await,
        before,
        "nothing was written"
    );
}
