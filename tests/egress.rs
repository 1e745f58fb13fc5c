//! Durable without an SDK: the Python order handler (standard library only) sends its side
//! effects through Durin's egress. The handler and Durin are killed with SIGKILL between two
//! calls and between a downstream's answer and its journal write; the payment service
//! counts charges and idempotency keys.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use support::*;

/// The downstreams of these tests listen on 127.0.0.1, which the egress calls only when
/// the allow-list names it.
const LOOPBACK: &[&str] = &["--egress-allow", "127.0.0.1"];

/// Whether these tests can run: Python 3 (the handler and the downstreams) and the store.
fn ready() -> bool {
    require("python3") && require_store()
}

fn python(script: &str) -> Command {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples/python")
        .join(script);
    let mut command = Command::new("python3");
    command.arg(path);
    command
}

struct Downstreams {
    payment: Proc,
    inventory: Proc,
    email: Proc,
}

fn start_downstreams(payment_hold_ms: u64) -> Downstreams {
    start_downstreams_failing(payment_hold_ms, 0)
}

/// The three services; the payment service holds its first answers `payment_hold_ms` and
/// answers 503 to its first `payment_fail_first` requests.
fn start_downstreams_failing(payment_hold_ms: u64, payment_fail_first: u32) -> Downstreams {
    let start = |role: &str, hold: u64, fail_first: u32| {
        let mut command = python("downstream.py");
        command
            .args(["--role", role, "--hold-ms"])
            .arg(hold.to_string())
            .arg("--fail-first")
            .arg(fail_first.to_string());
        Proc::spawn(command, &format!("{role} listening on "))
    };
    Downstreams {
        payment: start("payment", payment_hold_ms, payment_fail_first),
        inventory: start("inventory", 0, 0),
        email: start("email", 0, 0),
    }
}

fn start_handler(
    listen: Option<SocketAddr>,
    egress: &str,
    downstreams: &Downstreams,
    step_delay_ms: u64,
) -> Proc {
    start_handler_noting(listen, egress, downstreams, step_delay_ms, "")
}

/// The handler, adding `note` to its charge request.
fn start_handler_noting(
    listen: Option<SocketAddr>,
    egress: &str,
    downstreams: &Downstreams,
    step_delay_ms: u64,
    note: &str,
) -> Proc {
    let mut command = python("order_handler.py");
    command.args(["--charge-note", note]);
    command
        .arg("--port")
        .arg(listen.map_or(0, |a| a.port()).to_string())
        .args(["--egress", egress])
        .args(["--payment", &downstreams.payment.url])
        .args(["--inventory", &downstreams.inventory.url])
        .args(["--email", &downstreams.email.url])
        .arg("--step-delay-ms")
        .arg(step_delay_ms.to_string());
    Proc::spawn(command, "order handler listening on ")
}

/// Registers the Python handler as a plain deployment, declared inline.
async fn register_plain(admin: &str, handler: &str) {
    let response = client()
        .post(format!("{admin}/v1/deployments"))
        .json(&json!({
            "url": handler,
            "services": [{"name": "order", "handlers": [{"name": "process"}]}]
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
}

async fn stats(service: &Proc) -> Value {
    get_json(&format!("{}/stats", service.url)).await
}

fn plain_journal_shape(downstreams: &Downstreams) -> Vec<(String, Option<String>)> {
    vec![
        ("input".to_owned(), None),
        (
            "egress".to_owned(),
            Some(format!("POST {}/charge", downstreams.payment.url)),
        ),
        (
            "egress".to_owned(),
            Some(format!("POST {}/reserve", downstreams.inventory.url)),
        ),
        (
            "egress".to_owned(),
            Some(format!("POST {}/send", downstreams.email.url)),
        ),
        ("output".to_owned(), None),
    ]
}

async fn wait_for_egress(gateway: &str, id: &str, path: &str) {
    eventually(Duration::from_secs(20), path, || async {
        journal(gateway, id)
            .await
            .iter()
            .any(|e| e["kind"] == "egress" && e["name"].as_str().is_some_and(|n| n.ends_with(path)))
            .then_some(())
    })
    .await
}

/// One charge, one idempotency key (derived by Durin), seen `requests` times by the
/// payment service; one effect each for the other services.
async fn assert_charged_once(downstreams: &Downstreams, requests: u64) {
    let payment = stats(&downstreams.payment).await;
    assert_eq!(payment["effects"], 1, "{payment}");
    assert_eq!(payment["requests"], requests, "{payment}");
    let keys = payment["keys"].as_object().unwrap();
    assert_eq!(
        keys.len(),
        1,
        "one idempotency key for the one charge: {payment}"
    );
    let (key, seen) = keys.iter().next().unwrap();
    assert!(key.starts_with("durin-"), "{payment}");
    assert_eq!(seen, requests, "{payment}");
    for service in [&downstreams.inventory, &downstreams.email] {
        assert_eq!(stats(service).await["effects"], 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_handler_killed_between_calls_resumes_from_the_journal() {
    if !ready() {
        return;
    }
    let downstreams = start_downstreams(0);
    let home = GatewayHome::new();
    let (gateway, egress) = home.start_with_egress(None, None, LOOPBACK);
    let mut handler = start_handler(None, &egress, &downstreams, 600);
    register_plain(&gateway.admin, &handler.url).await;

    let id = send_order(&gateway.url, ORDER).await;
    wait_for_egress(&gateway.admin, &id, "/charge").await;
    handler.kill();
    let _handler = start_handler(Some(handler.addr), &egress, &downstreams, 600);

    let view = wait_final(&gateway.url, &id).await;
    assert_eq!(view["status"], "completed", "{view}");
    assert_eq!(view["output"], ORDER_OUTPUT);
    assert!(view["attempt"].as_u64().unwrap() >= 2);
    let entries = journal(&gateway.admin, &id).await;
    assert_eq!(shape(&entries), plain_journal_shape(&downstreams));
    assert_eq!(entries[1]["attempt"], 1);
    assert_eq!(entries[1]["value"]["status"], 200);
    assert_eq!(entries[1]["value"]["occurrence"], 0);
    // The charge was answered from the journal on the second attempt.
    assert_charged_once(&downstreams, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_killed_between_calls_resumes_without_repeating_the_charge() {
    if !ready() {
        return;
    }
    let downstreams = start_downstreams(0);
    let home = GatewayHome::new();
    let (mut gateway, egress) = home.start_with_egress(None, None, LOOPBACK);
    let handler = start_handler(None, &egress, &downstreams, 600);
    register_plain(&gateway.admin, &handler.url).await;

    let id = send_order(&gateway.url, ORDER).await;
    wait_for_egress(&gateway.admin, &id, "/charge").await;
    gateway.kill();
    let (gateway, _) = home.start_with_egress(Some(gateway.addr), Some(&egress), LOOPBACK);

    let view = wait_final(&gateway.url, &id).await;
    assert_eq!(view["status"], "completed", "{view}");
    assert_eq!(view["output"], ORDER_OUTPUT);
    assert_eq!(
        shape(&journal(&gateway.admin, &id).await),
        plain_journal_shape(&downstreams)
    );
    assert_charged_once(&downstreams, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_killed_after_the_charge_but_before_its_journal_write() {
    if !ready() {
        return;
    }
    // The payment service charges, then holds its answer for 3 s: Durin dies meanwhile.
    let downstreams = start_downstreams(3000);
    let home = GatewayHome::new();
    let (mut gateway, egress) = home.start_with_egress(None, None, LOOPBACK);
    let handler = start_handler(None, &egress, &downstreams, 0);
    register_plain(&gateway.admin, &handler.url).await;

    let id = send_order(&gateway.url, ORDER).await;
    eventually(Duration::from_secs(10), "the charge", || async {
        (stats(&downstreams.payment).await["effects"] == 1).then_some(())
    })
    .await;
    assert!(
        journal(&gateway.admin, &id)
            .await
            .iter()
            .all(|e| e["kind"] != "egress"),
        "the charge's answer must not be journaled yet"
    );
    gateway.kill();
    let (gateway, _) = home.start_with_egress(Some(gateway.addr), Some(&egress), LOOPBACK);

    let view = wait_final(&gateway.url, &id).await;
    assert_eq!(view["status"], "completed", "{view}");
    assert_eq!(view["output"], ORDER_OUTPUT);
    assert_eq!(
        shape(&journal(&gateway.admin, &id).await),
        plain_journal_shape(&downstreams)
    );
    // The call went out twice with the same key; the payment service charged once.
    assert_charged_once(&downstreams, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_egress_is_not_an_open_proxy() {
    if !ready() {
        return;
    }
    let downstreams = start_downstreams(0);
    let allowed = downstreams.payment.addr.to_string();
    let home = GatewayHome::new();
    let (gateway, egress) = home.start_with_egress(
        None,
        None,
        &["--egress-allow", &allowed, "--egress-allow", "127.0.0.1:1"],
    );
    let handler = start_handler(None, &egress, &downstreams, 5000);
    register_plain(&gateway.admin, &handler.url).await;
    let charge = format!("{egress}/http/{allowed}/charge");
    let http = client();
    let problem = |response: reqwest::Response, status: u16, detail: &'static str| async move {
        assert_eq!(response.status(), status);
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        let body: Value = response.json().await.unwrap();
        let text = body["detail"].as_str().unwrap().to_owned();
        assert!(text.contains(detail), "{text:?} does not say {detail:?}");
    };

    let r = http.post(&charge).json(&json!({})).send().await.unwrap();
    problem(r, 403, "Durin-Invocation-Id").await;
    let unknown = "inv_0193a2b4c5d6e7f8091a2b3c4d5e6f70";
    let r = http
        .post(&charge)
        .header("durin-invocation-id", unknown)
        .send()
        .await
        .unwrap();
    problem(r, 403, "Durin-Attempt-Token").await;
    let r = http
        .post(&charge)
        .header("durin-invocation-id", unknown)
        .header("durin-attempt-token", "guess")
        .send()
        .await
        .unwrap();
    problem(r, 404, unknown).await;
    let r = http
        .post(&charge)
        .header("durin-invocation-id", "inv_1")
        .send()
        .await
        .unwrap();
    problem(r, 400, "32 hex digits").await;
    let r = http
        .post(format!("{egress}/http/127.0.0.2:9/anything"))
        .header("durin-invocation-id", unknown)
        .send()
        .await
        .unwrap();
    problem(r, 403, "allow-list").await;
    let r = http
        .post(format!("{egress}/v1/charges"))
        .header("durin-invocation-id", unknown)
        .send()
        .await
        .unwrap();
    problem(r, 400, "names no target").await;

    // A running invocation (its handler waits 5 s before each call).
    let id = send_order(&gateway.url, ORDER).await;
    let r = http
        .post(&charge)
        .header("durin-invocation-id", &id)
        .header("durin-attempt", "7")
        .header("durin-attempt-token", "guess")
        .send()
        .await
        .unwrap();
    problem(r, 409, "attempt 7").await;
    // The id of a running invocation and its current attempt are not enough: the egress
    // wants the attempt's secret.
    for token in [None, Some("guess")] {
        let mut request = http
            .post(&charge)
            .header("durin-invocation-id", &id)
            .header("durin-attempt", "1");
        if let Some(token) = token {
            request = request.header("durin-attempt-token", token);
        }
        problem(request.send().await.unwrap(), 403, "Durin-Attempt-Token").await;
    }
    let r = http
        .post(&charge)
        .header("durin-invocation-id", &id)
        .body(vec![b'x'; 1024 * 1024 + 1])
        .send()
        .await
        .unwrap();
    problem(r, 413, "larger than").await;
    // Nothing of this reached the payment service or the journal.
    assert_eq!(stats(&downstreams.payment).await["requests"], 0);
    assert_eq!(journal(&gateway.admin, &id).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_handlers_terminal_failure_goes_back_as_it_was() {
    if !ready() {
        return;
    }
    let downstreams = start_downstreams(0);
    let home = GatewayHome::new();
    let (gateway, egress) = home.start_with_egress(None, None, LOOPBACK);
    let handler = start_handler(None, &egress, &downstreams, 0);
    register_plain(&gateway.admin, &handler.url).await;
    let response = client()
        .post(format!("{}/v1/call/order/process", gateway.url))
        .header("content-type", "application/json")
        .body(r#"{"order_id": "o-9"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    assert_eq!(response.headers()["durin-error-source"], "handler");
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["title"], "invalid order",
        "the handler's own body: {body}"
    );
    assert_eq!(stats(&downstreams.payment).await["requests"], 0);
}

/// A new version of the handler sends a different charge request on replay: the journal's
/// call and the handler's call are named, the invocation is paused, nothing is charged again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_call_on_replay_pauses_the_invocation() {
    if !ready() {
        return;
    }
    let downstreams = start_downstreams(0);
    let home = GatewayHome::new();
    let (gateway, egress) = home.start_with_egress(None, None, LOOPBACK);
    let mut handler = start_handler(None, &egress, &downstreams, 600);
    register_plain(&gateway.admin, &handler.url).await;

    let id = send_order(&gateway.url, ORDER).await;
    wait_for_egress(&gateway.admin, &id, "/charge").await;
    handler.kill();
    let _handler = start_handler_noting(Some(handler.addr), &egress, &downstreams, 600, "v2");

    let url = format!("{}/v1/invocations/{id}", gateway.url);
    let paused = eventually(Duration::from_secs(20), "paused", || async {
        let view = get_json(&url).await;
        (view["status"] == "paused").then_some(view)
    })
    .await;
    let reason = paused["last_error"].as_str().unwrap();
    assert!(
        reason.contains("non-determinism at journal index 1"),
        "{reason}"
    );
    assert!(
        reason.contains(&format!("POST {}/charge", downstreams.payment.url)),
        "{reason}"
    );
    assert_eq!(stats(&downstreams.payment).await["requests"], 1);
    assert_eq!(stats(&downstreams.inventory).await["requests"], 0);

    // The fixed handler is deployed; resumed, the invocation finishes from its journal.
    drop(_handler);
    let _fixed = start_handler(Some(handler.addr), &egress, &downstreams, 0);
    let resumed = client()
        .post(format!("{}/v1/invocations/{id}/resume", gateway.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(resumed.status(), 200);
    let view = wait_final(&gateway.url, &id).await;
    assert_eq!(view["status"], "completed", "{view}");
    assert_eq!(view["output"], ORDER_OUTPUT);
    assert_charged_once(&downstreams, 1).await;
}

/// A downstream outage outlasts the egress's tries: the handler sees the 503, nothing is
/// journaled, and the next attempt makes the same call with the same key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_not_journaled_and_the_call_is_made_again() {
    if !ready() {
        return;
    }
    let downstreams = start_downstreams_failing(0, 4);
    let home = GatewayHome::new();
    let (gateway, egress) = home.start_with_egress(None, None, LOOPBACK);
    let handler = start_handler(None, &egress, &downstreams, 0);
    register_plain(&gateway.admin, &handler.url).await;

    let id = send_order(&gateway.url, ORDER).await;
    let view = wait_final(&gateway.url, &id).await;
    assert_eq!(view["status"], "completed", "{view}");
    assert!(view["attempt"].as_u64().unwrap() >= 2, "{view}");
    let entries = journal(&gateway.admin, &id).await;
    assert_eq!(shape(&entries), plain_journal_shape(&downstreams));
    assert_eq!(entries[1]["value"]["status"], 200);
    // Four 503s (three tries of the first attempt, one of the second), then the charge;
    // all five carried the same key.
    assert_charged_once(&downstreams, 5).await;
}

/// The secret token of the current attempt of invocation `id`, from the gateway's database
/// (its SQLite file, or its PostgreSQL schema).
fn attempt_token(home: &GatewayHome, id: &str) -> String {
    let url = home.db_url();
    if url.starts_with("postgres") {
        let id = id.to_owned();
        return std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let pool = sqlx::PgPool::connect(&url).await.unwrap();
                let token: String =
                    sqlx::query_scalar("SELECT attempt_token FROM invocations WHERE id = $1")
                        .bind(&id)
                        .fetch_one(&pool)
                        .await
                        .unwrap();
                pool.close().await;
                token
            })
        })
        .join()
        .unwrap();
    }
    let db = rusqlite::Connection::open(path_of(home).join("durin.db")).unwrap();
    db.query_row(
        "SELECT attempt_token FROM invocations WHERE id = ?1",
        [id],
        |row| row.get(0),
    )
    .unwrap()
}

/// Recording a step value over plain HTTP: the first value wins, concurrent first calls
/// included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_step_value_is_the_same_for_every_caller() {
    if !ready() {
        return;
    }
    let downstreams = start_downstreams(0);
    let home = GatewayHome::new();
    let (gateway, egress) = home.start_with_egress(None, None, LOOPBACK);
    let handler = start_handler(None, &egress, &downstreams, 5000);
    register_plain(&gateway.admin, &handler.url).await;
    let id = send_order(&gateway.url, ORDER).await;
    let url = format!("{}/v1/contexts/{id}/steps/order-number", gateway.url);
    // Without the attempt's token, nothing is recorded.
    let refused = client()
        .post(&url)
        .header("durin-attempt", "1")
        .json(&0)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    // The test plays the handler, which Durin gave the token of its attempt: read it where
    // Durin keeps it.
    let token = attempt_token(&home, &id);
    let calls: Vec<_> = (0..8)
        .map(|n| {
            let url = url.clone();
            let token = token.clone();
            tokio::spawn(async move {
                let r = client()
                    .post(url)
                    .header("durin-attempt", "1")
                    .header("durin-attempt-token", token)
                    .json(&n)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                let replayed = r.headers()["durin-replayed"] == "true";
                (r.json::<Value>().await.unwrap(), replayed)
            })
        })
        .collect();
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.unwrap());
    }
    let first = answers[0].0.clone();
    assert!(answers.iter().all(|(v, _)| *v == first), "{answers:?}");
    assert_eq!(answers.iter().filter(|(_, replayed)| !replayed).count(), 1);
    let steps: Vec<Value> = journal(&gateway.admin, &id)
        .await
        .into_iter()
        .filter(|e| e["kind"] == "step")
        .collect();
    assert_eq!(steps.len(), 1, "{steps:?}");
    assert_eq!(steps[0]["value"], first);
}

/// The same contract from Node.js (no packages): an order completes through the egress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_handler_runs_the_same_flow() {
    if !(ready() && require("node")) {
        return;
    }
    let downstreams = start_downstreams(0);
    let home = GatewayHome::new();
    let (gateway, egress) = home.start_with_egress(None, None, LOOPBACK);
    let mut command = Command::new("node");
    command
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/node/order_handler.js"))
        .args(["--port", "0", "--egress", &egress])
        .args(["--payment", &downstreams.payment.url])
        .args(["--inventory", &downstreams.inventory.url])
        .args(["--email", &downstreams.email.url]);
    let handler = Proc::spawn(command, "order handler listening on ");
    register_plain(&gateway.admin, &handler.url).await;
    let response = client()
        .post(format!("{}/v1/call/order/process", gateway.url))
        .header("content-type", "application/json")
        .body(ORDER)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let id = response.headers()["durin-invocation-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(response.json::<String>().await.unwrap(), ORDER_OUTPUT);
    assert_eq!(
        shape(&journal(&gateway.admin, &id).await),
        plain_journal_shape(&downstreams)
    );
    assert_charged_once(&downstreams, 1).await;
}

/// HTTPS targets: the handler names an https:// URL, Durin makes the TLS call itself (here
/// trusting a private CA given with --egress-ca-file) and journals it like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_targets_are_called_by_durin() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let (ca_file, cert_file, key_file) = (
        dir.path().join("ca.pem"),
        dir.path().join("cert.pem"),
        dir.path().join("key.pem"),
    );
    std::fs::write(&ca_file, ca.pem()).unwrap();
    std::fs::write(&cert_file, leaf.pem()).unwrap();
    std::fs::write(&key_file, leaf_key.serialize_pem()).unwrap();

    let mut command = python("downstream.py");
    command
        .args(["--role", "payment", "--tls-cert"])
        .arg(&cert_file)
        .arg("--tls-key")
        .arg(&key_file);
    let payment = Proc::spawn(command, "payment listening on ");
    assert!(payment.url.starts_with("https://"));
    let plain = start_downstreams(0);
    let downstreams = Downstreams {
        payment,
        inventory: plain.inventory,
        email: plain.email,
    };
    let home = GatewayHome::new();
    let ca_arg = ca_file.to_str().unwrap();
    let (gateway, egress) = home.start_with_egress(
        None,
        None,
        &["--egress-ca-file", ca_arg, "--egress-allow", "127.0.0.1"],
    );
    let handler = start_handler(None, &egress, &downstreams, 0);
    register_plain(&gateway.admin, &handler.url).await;

    let id = send_order(&gateway.url, ORDER).await;
    let view = wait_final(&gateway.url, &id).await;
    assert_eq!(view["status"], "completed", "{view}");
    assert_eq!(view["output"], ORDER_OUTPUT);
    let entries = journal(&gateway.admin, &id).await;
    assert_eq!(shape(&entries), plain_journal_shape(&downstreams));
    assert!(entries[1]["name"]
        .as_str()
        .unwrap()
        .starts_with("POST https://"));
    let trusting = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap())
        .build()
        .unwrap();
    let payment: Value = trusting
        .get(format!("{}/stats", downstreams.payment.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(payment["effects"], 1, "{payment}");
    assert_eq!(payment["requests"], 1, "{payment}");
}

/// The egress reaches nothing inside unless the allow-list names it: loopback, private and
/// link-local addresses (cloud metadata) are refused, whether written as addresses or
/// reached through a name that resolves to them; nothing reaches the downstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_egress_refuses_internal_addresses_unless_named() {
    if !ready() {
        return;
    }
    let downstreams = start_downstreams(0);
    let home = GatewayHome::new();
    let (gateway, egress) = home.start_with_egress(None, None, &[]);
    // A running invocation whose handler waits before its first call.
    let handler = start_handler(None, &egress, &downstreams, 5000);
    register_plain(&gateway.admin, &handler.url).await;
    let id = send_order(&gateway.url, ORDER).await;
    let token = eventually(Duration::from_secs(10), "the attempt", || async {
        let view = get_json(&format!("{}/v1/invocations/{id}", gateway.url)).await;
        (view["status"] == "running").then(|| attempt_token(&home, &id))
    })
    .await;
    let port = downstreams.payment.addr.port();
    for target in [
        format!("http/127.0.0.1:{port}/charge"),
        format!("http/localhost:{port}/charge"),
        "http/169.254.169.254/latest/meta-data/".to_owned(),
        "http/[::1]:9/x".to_owned(),
        "http/10.1.2.3:80/x".to_owned(),
    ] {
        let response = client()
            .post(format!("{egress}/{target}"))
            .header("durin-invocation-id", &id)
            .header("durin-attempt", "1")
            .header("durin-attempt-token", &token)
            .json(&json!({"amount_cents": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 403, "{target}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            body["type"], "urn:durin:problem:egress-refused",
            "{target}: {body}"
        );
    }
    assert_eq!(stats(&downstreams.payment).await["requests"], 0);
    assert_eq!(
        journal(&gateway.admin, &id).await.len(),
        1,
        "nothing was journaled"
    );
}

/// A handler that hangs up on an egress call (its own timeout) and sends it again gets the
/// same occurrence, so the same Idempotency-Key: the payment service applies it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_caller_hung_up_keeps_its_idempotency_key() {
    if !ready() {
        return;
    }
    // The payment service holds its first answer for each key 1.5 s.
    let downstreams = start_downstreams(1500);
    let home = GatewayHome::new();
    let (gateway, egress) = home.start_with_egress(None, None, LOOPBACK);
    // The real handler waits a minute before its first call: the test plays its attempt.
    let handler = start_handler(None, &egress, &downstreams, 60_000);
    register_plain(&gateway.admin, &handler.url).await;
    let id = send_order(&gateway.url, ORDER).await;
    let token = eventually(Duration::from_secs(10), "the attempt", || async {
        let view = get_json(&format!("{}/v1/invocations/{id}", gateway.url)).await;
        (view["status"] == "running").then(|| attempt_token(&home, &id))
    })
    .await;
    let charge = format!(
        "{egress}/http/127.0.0.1:{}/charge",
        downstreams.payment.addr.port()
    );
    let call = |timeout: Duration| {
        reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .unwrap()
            .post(&charge)
            .header("durin-invocation-id", &id)
            .header("durin-attempt", "1")
            .header("durin-attempt-token", &token)
            .json(&json!({"order_id": "o-1", "amount_cents": 4999}))
            .send()
    };
    // The handler gives up after 300 ms and hangs up.
    assert!(call(Duration::from_millis(300)).await.is_err());
    tokio::time::sleep(Duration::from_millis(1800)).await;
    let retried = call(Duration::from_secs(10)).await.unwrap();
    assert_eq!(retried.status(), 200);
    let payment = stats(&downstreams.payment).await;
    assert_eq!(payment["requests"], 2, "{payment}");
    assert_eq!(payment["effects"], 1, "{payment}");
    assert_eq!(
        payment["keys"].as_object().unwrap().len(),
        1,
        "one key: {payment}"
    );
    let egress_entries = journal(&gateway.admin, &id)
        .await
        .into_iter()
        .filter(|e| e["kind"] == "egress")
        .count();
    assert_eq!(egress_entries, 1);
}

/// The Python order handler, cancelled between its charge and its reservation: its
/// running attempt is fenced (the egress refuses its next call), Durin calls it again with
/// `Durin-Cancelled: true`, it compensates through the egress (release, then refund) and
/// answers 409, and the order ends cancelled. Charged once, refunded once, never confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_python_order_compensates_and_ends_cancelled() {
    if !ready() {
        return;
    }
    let downstreams = start_downstreams(0);
    let home = GatewayHome::new();
    let (gateway, egress) = home.start_with_egress(None, None, LOOPBACK);
    let _handler = start_handler(None, &egress, &downstreams, 600);
    register_plain(&gateway.admin, &_handler.url).await;

    let id = send_order(&gateway.url, ORDER).await;
    wait_for_egress(&gateway.admin, &id, "/charge").await;
    let response = client()
        .post(format!("{}/v1/invocations/{id}/cancel", gateway.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);

    let view = wait_final(&gateway.url, &id).await;
    assert_eq!(view["status"], "cancelled", "{view}");
    let entries = journal(&gateway.admin, &id).await;
    let expected = vec![
        ("input".to_owned(), None),
        (
            "egress".to_owned(),
            Some(format!("POST {}/charge", downstreams.payment.url)),
        ),
        ("cancel".to_owned(), None),
        (
            "egress".to_owned(),
            Some(format!("POST {}/release", downstreams.inventory.url)),
        ),
        (
            "egress".to_owned(),
            Some(format!("POST {}/refund", downstreams.payment.url)),
        ),
        ("output".to_owned(), None),
    ];
    assert_eq!(shape(&entries), expected, "{entries:#?}");
    let payment = stats(&downstreams.payment).await;
    assert_eq!(payment["paths"]["/charge"], 1, "{payment}");
    assert_eq!(payment["paths"]["/refund"], 1, "{payment}");
    let inventory = stats(&downstreams.inventory).await;
    assert!(inventory["paths"].get("/reserve").is_none(), "{inventory}");
    assert_eq!(inventory["paths"]["/release"], 1, "{inventory}");
    assert_eq!(stats(&downstreams.email).await["requests"], 0);
    let output = entries.last().unwrap();
    assert_eq!(output["failure"]["status"], 409, "{output}");
}

/// What each downstream has received, by path, and in all.
async fn received(downstreams: &Downstreams) -> Vec<Value> {
    let mut seen = Vec::new();
    for service in [
        &downstreams.payment,
        &downstreams.inventory,
        &downstreams.email,
    ] {
        let stats = stats(service).await;
        seen.push(json!({ "requests": stats["requests"], "paths": stats["paths"] }));
    }
    seen
}

/// Registers the Python handler at `handler` as `POST /v1/deployments` with `verify`.
async fn register_plain_verified(admin: &str, handler: &str) -> reqwest::Response {
    client()
        .post(format!("{admin}/v1/deployments"))
        .json(&json!({
            "url": handler,
            "services": [{"name": "order", "handlers": [{"name": "process"}]}],
            "verify": true
        }))
        .send()
        .await
        .unwrap()
}

/// A plain Python handler replays a completed order through the egress: every call is
/// answered from the recording, none reaches a downstream. A changed handler (its charge
/// request gains a note) is caught at the charge, named on both sides, never sent, and
/// refused when it asks to be registered with `verify`; the unchanged one is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_python_handler_is_caught_at_the_egress_and_nothing_is_sent() {
    if !ready() {
        return;
    }
    let downstreams = start_downstreams(0);
    let home = GatewayHome::new();
    let (gateway, egress) = home.start_with_egress(None, None, LOOPBACK);
    let handler = start_handler(None, &egress, &downstreams, 0);
    register_plain(&gateway.admin, &handler.url).await;
    let id = send_order(&gateway.url, ORDER).await;
    assert_eq!(wait_final(&gateway.url, &id).await["status"], "completed");
    let history = client()
        .get(format!("{}/v1/invocations/{id}/history", gateway.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let before = received(&downstreams).await;
    let replay = |deployment: String| {
        let (admin, history) = (gateway.admin.clone(), history.clone());
        async move {
            let answer = client()
                .post(format!("{admin}/v1/replays"))
                .query(&[("deployment", deployment)])
                .body(history)
                .send()
                .await
                .unwrap();
            assert_eq!(answer.status(), 200);
            answer.json::<Value>().await.unwrap()
        }
    };

    // The code that recorded it: the three calls come from the journal, the same output.
    let report = replay(handler.url.clone()).await;
    assert_eq!(report["replayed"], 1, "{report:#}");
    assert_eq!(report["histories"][0]["reached"], "end", "{report:#}");
    assert_eq!(
        received(&downstreams).await,
        before,
        "a replay reached a downstream"
    );

    // The changed code, registered beside it: caught at its first call.
    let changed = start_handler_noting(None, &egress, &downstreams, 0, "v2");
    let refused = register_plain_verified(&gateway.admin, &changed.url).await;
    assert_eq!(refused.status(), 409);
    let problem: Value = refused.json().await.unwrap();
    assert_eq!(problem["type"], "urn:durin:problem:deployment-diverged");
    let divergence = &problem["report"]["histories"][0]["divergence"];
    let charge = format!("egress POST {}/charge", downstreams.payment.url);
    assert_eq!(divergence["index"], 1, "{problem:#}");
    assert!(
        divergence["recorded"]
            .as_str()
            .unwrap()
            .starts_with(&charge),
        "{problem:#}"
    );
    assert!(
        divergence["requested"]
            .as_str()
            .unwrap()
            .starts_with(&charge),
        "{problem:#}"
    );
    assert_ne!(divergence["recorded"], divergence["requested"]);
    assert_eq!(
        received(&downstreams).await,
        before,
        "a replay reached a downstream"
    );
    let deployments = get_json(&format!("{}/v1/deployments", gateway.admin)).await;
    assert_eq!(deployments["deployments"].as_array().unwrap().len(), 1);

    // The unchanged code at another address proves itself and is taken.
    let again = start_handler(None, &egress, &downstreams, 0);
    let taken = register_plain_verified(&gateway.admin, &again.url).await;
    assert_eq!(taken.status(), 201);
    let deployment: Value = taken.json().await.unwrap();
    assert_eq!(deployment["verification"]["replayed"], 1, "{deployment:#}");
    assert_eq!(
        received(&downstreams).await,
        before,
        "a replay reached a downstream"
    );
}

/// A plain handler that goes on after an operator terminated (or paused) its invocation:
/// the egress refuses its next call before anything goes out, on SQLite too, where the
/// egress keeps the running attempts in memory. The handler here is in this process: it
/// charges, tells the test, waits until the test has terminated the invocation, then tries
/// to reserve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_or_paused_invocations_handler_can_no_longer_call_out() {
    if !require_store() {
        return;
    }
    use axum::http::HeaderMap;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Mutex};
    use tokio::sync::Notify;

    #[derive(Clone, Default)]
    struct Shop {
        egress: Arc<Mutex<String>>,
        downstream: Arc<Mutex<String>>,
        charged: Arc<Notify>,
        ended: Arc<Notify>,
        /// The status the egress answered the call made after the end.
        late: Arc<Mutex<Option<u16>>>,
        /// What reached the downstream: charges, reservations.
        charges: Arc<AtomicU32>,
        reservations: Arc<AtomicU32>,
    }

    async fn buy(
        axum::extract::State(shop): axum::extract::State<Shop>,
        headers: HeaderMap,
    ) -> &'static str {
        let egress = shop.egress.lock().unwrap().clone();
        let downstream = shop.downstream.lock().unwrap().clone();
        let call = |path: &str| {
            let mut request = client().post(format!("{egress}/http/{downstream}/{path}"));
            for name in [
                "durin-invocation-id",
                "durin-attempt",
                "durin-attempt-token",
            ] {
                request = request.header(name, headers[name].clone());
            }
            request.json(&json!({"order_id": "o-1"})).send()
        };
        assert_eq!(call("charge").await.unwrap().status(), 200);
        shop.charged.notify_one();
        shop.ended.notified().await;
        let late = call("reserve").await.unwrap().status().as_u16();
        *shop.late.lock().unwrap() = Some(late);
        "\"done\""
    }

    let home = GatewayHome::new();
    let (gateway, egress) = home.start_with_egress(None, None, LOOPBACK);
    let shop = Shop::default();
    *shop.egress.lock().unwrap() = egress;
    let downstream = {
        let (charges, reservations) = (shop.charges.clone(), shop.reservations.clone());
        axum::Router::new()
            .route(
                "/charge",
                axum::routing::post(move || async move {
                    charges.fetch_add(1, Ordering::SeqCst);
                    axum::Json(json!({"charge_id": "c-1"}))
                }),
            )
            .route(
                "/reserve",
                axum::routing::post(move || async move {
                    reservations.fetch_add(1, Ordering::SeqCst);
                    axum::Json(json!({"reservation_id": "r-1"}))
                }),
            )
    };
    *shop.downstream.lock().unwrap() = serve_router(downstream).await.to_string();
    let app = axum::Router::new()
        .route("/shop/buy", axum::routing::post(buy))
        .with_state(shop.clone());
    let url = format!("http://{}", serve_router(app).await);
    let response = client()
        .post(format!("{}/v1/deployments", gateway.admin))
        .json(&json!({"url": url, "services": [{"name": "shop", "handlers": [{"name": "buy"}]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());

    for verb in ["terminate", "pause"] {
        shop.charges.store(0, Ordering::SeqCst);
        *shop.late.lock().unwrap() = None;
        let sent: Value = client()
            .post(format!("{}/v1/send/shop/buy", gateway.url))
            .json(&json!({}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = sent["invocation_id"].as_str().unwrap().to_owned();
        tokio::time::timeout(Duration::from_secs(20), shop.charged.notified())
            .await
            .expect("the handler charged");
        let response = client()
            .post(format!("{}/v1/invocations/{id}/{verb}", gateway.admin))
            .json(&json!({"reason": "test"}))
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "{verb}: {}",
            response.status()
        );
        shop.ended.notify_one();
        let late = eventually(Duration::from_secs(20), "the late call", || async {
            *shop.late.lock().unwrap()
        })
        .await;
        assert_eq!(late, 409, "{verb}: the call after the end is refused");
        assert_eq!(shop.charges.load(Ordering::SeqCst), 1, "{verb}");
        assert_eq!(
            shop.reservations.load(Ordering::SeqCst),
            0,
            "{verb}: nothing went out after the end"
        );
        let egress_entries = journal(&gateway.admin, &id)
            .await
            .into_iter()
            .filter(|e| e["kind"] == "egress")
            .count();
        assert_eq!(egress_entries, 1, "{verb}");
    }
}

/// Two identical calls at once, of which only the second was journaled (the first kept
/// failing): the next attempt's first such call is not recorded, and is made, not taken
/// for a divergence from the recorded second one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_calls_with_a_gap_in_the_journal_are_no_divergence() {
    if !require_store() {
        return;
    }
    use axum::http::{HeaderMap, StatusCode};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    /// An attempt and the statuses the egress answered its calls.
    type Answers = (String, Vec<u16>);

    #[derive(Clone, Default)]
    struct Flow {
        egress: Arc<Mutex<String>>,
        downstream: Arc<Mutex<String>>,
        /// The downstream fails the first key it saw while this holds.
        failing: Arc<AtomicBool>,
        first_key: Arc<Mutex<Option<String>>>,
        /// Per attempt, the statuses the egress answered.
        answers: Arc<Mutex<Vec<Answers>>>,
    }

    async fn run(
        axum::extract::State(flow): axum::extract::State<Flow>,
        headers: HeaderMap,
    ) -> (StatusCode, &'static str) {
        let egress = flow.egress.lock().unwrap().clone();
        let downstream = flow.downstream.lock().unwrap().clone();
        let attempt = headers["durin-attempt"].to_str().unwrap().to_owned();
        let call = || {
            let mut request = client().post(format!("{egress}/http/{downstream}/x"));
            for name in [
                "durin-invocation-id",
                "durin-attempt",
                "durin-attempt-token",
            ] {
                request = request.header(name, headers[name].clone());
            }
            let request = request.json(&json!({"same": true}));
            async move { request.send().await.unwrap().status().as_u16() }
        };
        if attempt == "1" {
            let first = call();
            let second = async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                call().await
            };
            let (first, second) = tokio::join!(first, second);
            flow.answers
                .lock()
                .unwrap()
                .push((attempt, vec![first, second]));
            flow.failing.store(false, Ordering::SeqCst);
            return (StatusCode::SERVICE_UNAVAILABLE, "try again");
        }
        let again = call().await;
        flow.answers.lock().unwrap().push((attempt, vec![again]));
        (StatusCode::OK, "\"done\"")
    }

    let home = GatewayHome::new();
    let (gateway, egress) = home.start_with_egress(None, None, LOOPBACK);
    let flow = Flow::default();
    flow.failing.store(true, Ordering::SeqCst);
    *flow.egress.lock().unwrap() = egress;
    let downstream = {
        let flow = flow.clone();
        axum::Router::new().route(
            "/x",
            axum::routing::post(move |headers: HeaderMap| async move {
                let key = headers["idempotency-key"].to_str().unwrap().to_owned();
                let first = flow
                    .first_key
                    .lock()
                    .unwrap()
                    .get_or_insert_with(|| key.clone())
                    .clone();
                if flow.failing.load(Ordering::SeqCst) && key == first {
                    return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({})));
                }
                (StatusCode::OK, axum::Json(json!({"key": key})))
            }),
        )
    };
    *flow.downstream.lock().unwrap() = serve_router(downstream).await.to_string();
    let app = axum::Router::new()
        .route("/gap/run", axum::routing::post(run))
        .with_state(flow.clone());
    let url = format!("http://{}", serve_router(app).await);
    let response = client()
        .post(format!("{}/v1/deployments", gateway.admin))
        .json(&json!({"url": url, "services": [{"name": "gap", "handlers": [{"name": "run"}]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
    let sent: Value = client()
        .post(format!("{}/v1/send/gap/run", gateway.url))
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = sent["invocation_id"].as_str().unwrap().to_owned();
    let view = eventually(Duration::from_secs(30), "completed or paused", || async {
        let view = get_json(&format!("{}/v1/invocations/{id}", gateway.url)).await;
        matches!(view["status"].as_str(), Some("completed" | "paused")).then_some(view)
    })
    .await;
    assert_eq!(view["status"], "completed", "{view}");
    let answers = flow.answers.lock().unwrap().clone();
    assert_eq!(
        answers,
        vec![
            ("1".to_owned(), vec![503, 200]),
            ("2".to_owned(), vec![200])
        ]
    );
    let keys: Vec<Value> = journal(&gateway.admin, &id)
        .await
        .into_iter()
        .filter(|e| e["kind"] == "egress")
        .map(|e| e["value"]["idempotency_key"].clone())
        .collect();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert_ne!(
        keys[0], keys[1],
        "the two occurrences, each with its own key"
    );
}
