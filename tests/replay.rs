//! Replay before you deploy: histories exported from Durin replay against a deployment with
//! no side effect (the steps count their runs, and no replay adds one); a deployment whose
//! code reorders two steps diverges, is named where and how, and is refused when it asks to
//! be verified; the same change behind `ctx.patched` replays and is registered. Through the
//! admin API and through `durin replay`, whose exit codes a CI reads. The order example's
//! recorded histories (`examples/order/histories/`) replay against its code, so a change
//! to it that breaks what runs fails `cargo test`.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use durin_sdk::{Context, Endpoint, HandlerError, Service};
use serde_json::{json, Value};
use support::{client, eventually, get_json, register, InProcess};

/// The shop's order handler, as each version of its code does it.
#[derive(Clone, Copy)]
enum Version {
    /// Reserves, charges, optionally waits for `confirm`, ships.
    First,
    /// Charges before it reserves: what runs now cannot replay.
    Reordered,
    /// Charges first only in runs that pass the patch `charge-first`.
    Patched,
    /// Notifies the customer after shipping: a completed run cannot have ended the way it
    /// did, and a replay must not notify anyone to find that out.
    Extended,
    /// Sends a receipt after shipping, in runs that pass the patch `receipt`: runs that
    /// ended before it take the old branch.
    Receipt,
}

/// Every run of a step's body, in every version: what a replay must never add to.
#[derive(Clone, Default)]
struct Effects(Arc<AtomicU32>);

impl Effects {
    fn count(&self) -> u32 {
        self.0.load(Ordering::SeqCst)
    }

    async fn step(&self, ctx: &Context, name: &str) -> Result<String, HandlerError> {
        let effects = self.clone();
        let done = format!("{name}-done");
        ctx.run(name, || async move {
            effects.0.fetch_add(1, Ordering::SeqCst);
            Ok(done)
        })
        .await
    }
}

async fn order(
    version: Version,
    effects: Effects,
    ctx: Context,
    input: Value,
) -> Result<Value, HandlerError> {
    let charge_first = match version {
        Version::First | Version::Extended | Version::Receipt => false,
        Version::Reordered => true,
        Version::Patched => ctx.patched("charge-first").await?,
    };
    if charge_first {
        effects.step(&ctx, "charge").await?;
        effects.step(&ctx, "reserve").await?;
    } else {
        effects.step(&ctx, "reserve").await?;
        effects.step(&ctx, "charge").await?;
    }
    if input["confirm"] == true {
        let _: Value = ctx.signal("confirm").await?;
    }
    effects.step(&ctx, "ship").await?;
    if let Version::Extended = version {
        effects.step(&ctx, "notify").await?;
    }
    if let Version::Receipt = version {
        if ctx.patched("receipt").await? {
            effects.step(&ctx, "receipt").await?;
        }
    }
    Ok(json!({ "order": input["order"], "shipped": true }))
}

/// Serves `version` of the shop on a port of its own; returns its URL.
async fn serve(version: Version, effects: &Effects) -> String {
    let effects = effects.clone();
    let endpoint = Endpoint::new().service(
        Service::new("shop").handler("order", move |ctx: Context, input: Value| {
            order(version, effects.clone(), ctx, input)
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, endpoint.router()).await });
    url
}

/// Starts an order and returns its invocation id.
async fn send_order(gateway: &InProcess, order: u32, confirm: bool) -> String {
    let answer: Value = client()
        .post(format!("{}/v1/send/shop/order", gateway.url))
        .json(&json!({ "order": order, "confirm": confirm }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    answer["invocation_id"].as_str().unwrap().to_owned()
}

async fn status_is(gateway: &InProcess, id: &str, status: &str) {
    eventually(Duration::from_secs(20), status, || async {
        let view = get_json(&format!("{}/v1/invocations/{id}", gateway.url)).await;
        (view["status"] == status).then_some(())
    })
    .await;
}

/// A completed order and one waiting for its confirmation, recorded by the first version;
/// returns their histories, in one file.
async fn record_two_orders(gateway: &InProcess, effects: &Effects) -> String {
    let first = serve(Version::First, effects).await;
    register(&gateway.admin, &first).await;
    let done = send_order(gateway, 1, false).await;
    let waiting = send_order(gateway, 2, true).await;
    status_is(gateway, &done, "completed").await;
    status_is(gateway, &waiting, "suspended").await;
    let mut file = String::new();
    for id in [&done, &waiting] {
        let answer = client()
            .get(format!("{}/v1/invocations/{id}/history", gateway.admin))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
        assert_eq!(answer.headers()["content-type"], "application/jsonl");
        file.push_str(&answer.text().await.unwrap());
    }
    file
}

async fn replay(gateway: &InProcess, deployment: &str, history: &str) -> Value {
    let answer = client()
        .post(format!("{}/v1/replays", gateway.admin))
        .query(&[("deployment", deployment)])
        .header("content-type", "application/jsonl")
        .body(history.to_owned())
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    answer.json().await.unwrap()
}

/// `durin replay` with `history` as its file; its exit code and what it printed.
fn replay_cli(gateway: &InProcess, deployment: &str, history: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("orders.jsonl");
    std::fs::write(&file, history).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_durin"))
        .args(["replay", "--history"])
        .arg(&file)
        .args(["--deployment", deployment, "--admin-url", &gateway.admin])
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.code().unwrap_or(-1), printed)
}

async fn register_verified(gateway: &InProcess, deployment: &str) -> reqwest::Response {
    client()
        .post(format!("{}/v1/deployments", gateway.admin))
        .json(&json!({ "url": deployment, "verify": true }))
        .send()
        .await
        .unwrap()
}

async fn deployment_count(gateway: &InProcess) -> usize {
    get_json(&format!("{}/v1/deployments", gateway.admin)).await["deployments"]
        .as_array()
        .unwrap()
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn histories_replay_against_the_code_that_recorded_them_and_nothing_runs_again() {
    let gateway = InProcess::start(|_| {}).await;
    let effects = Effects::default();
    let history = record_two_orders(&gateway, &effects).await;
    // Reserve, charge and ship, then reserve and charge before the wait.
    assert_eq!(effects.count(), 5);
    let lines: Vec<Value> = history
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines[0]["history"]["service"], "shop");
    assert_eq!(lines[0]["history"]["status"], "completed");
    assert_eq!(lines[1]["entry"]["kind"], "input");
    assert_eq!(lines[2]["entry"]["name"], "reserve");

    // The same code: the first ends as recorded, the second reaches its wait.
    let first = get_json(&format!("{}/v1/deployments", gateway.admin)).await["deployments"][0]
        ["url"]
        .as_str()
        .unwrap()
        .to_owned();
    let report = replay(&gateway, &first, &history).await;
    assert_eq!(report["replayed"], 2, "{report:#}");
    assert_eq!(report["diverged"], 0, "{report:#}");
    let histories = report["histories"].as_array().unwrap();
    assert_eq!(histories[0]["reached"], "end", "{report:#}");
    assert_eq!(histories[1]["reached"], "frontier", "{report:#}");
    assert_eq!(histories[1]["status"], "suspended", "{report:#}");
    assert_eq!(effects.count(), 5, "a replay ran a step");

    let (code, printed) = replay_cli(&gateway, &first, &history);
    assert_eq!(code, 0, "{printed}");
    assert!(
        printed.contains("2 replayed, 0 diverged, 0 failed"),
        "{printed}"
    );
    assert_eq!(effects.count(), 5, "a replay ran a step");

    // Code that goes beyond a recording that ended diverges where the recording ended,
    // without running the new step; the waiting order has not got that far.
    let extended = serve(Version::Extended, &effects).await;
    let report = replay(&gateway, &extended, &history).await;
    assert_eq!(report["diverged"], 1, "{report:#}");
    let divergence = &report["histories"][0]["divergence"];
    assert_eq!(divergence["index"], 4, "{report:#}");
    assert_eq!(divergence["requested"], "step \"notify\"", "{report:#}");
    assert!(
        divergence["recorded"]
            .as_str()
            .unwrap()
            .starts_with("output {\"order\":1"),
        "{report:#}"
    );
    assert_eq!(report["histories"][1]["reached"], "frontier", "{report:#}");
    assert_eq!(effects.count(), 5, "a replay ran a step");

    // The same addition behind a patch: the completed run takes the old branch at its
    // end, and is replayed; twice in a row, the same.
    let receipt = serve(Version::Receipt, &effects).await;
    for _ in 0..2 {
        let report = replay(&gateway, &receipt, &history).await;
        assert_eq!(report["replayed"], 2, "{report:#}");
        assert_eq!(report["histories"][0]["reached"], "end", "{report:#}");
    }
    assert_eq!(effects.count(), 5, "a replay ran a step");

    // A history of more than the 1 MiB a request body may usually have is taken.
    let mut big: Vec<Value> = history
        .lines()
        .take(2)
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    big[0]["history"]["status"] = json!("running");
    big.push(
        json!({"entry": {"index": 1, "kind": "step", "name": "reserve",
        "value": "x".repeat(1_500_000), "attempt": 1, "at_ms": 1}}),
    );
    let big: String = big.iter().map(|line| format!("{line}\n")).collect();
    let report = replay(&gateway, &first, &big).await;
    assert_eq!(report["replayed"], 1, "{report:#}");

    // The waiting order goes on as if nothing happened.
    let waiting = histories[1]["invocation_id"].as_str().unwrap();
    let signalled = client()
        .post(format!(
            "{}/v1/invocations/{waiting}/signals/confirm",
            gateway.url
        ))
        .json(&json!("yes"))
        .send()
        .await
        .unwrap();
    assert!(signalled.status().is_success());
    status_is(&gateway, waiting, "completed").await;
    assert_eq!(effects.count(), 6);

    // A history that is not one is refused, and says where.
    let answer = client()
        .post(format!("{}/v1/replays", gateway.admin))
        .query(&[("deployment", first.as_str())])
        .body("{\"entry\": {}}\n")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 400);
    let problem: Value = answer.json().await.unwrap();
    assert!(
        problem["detail"].as_str().unwrap().contains("line 1"),
        "{problem}"
    );
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reordered_deployment_is_refused_where_it_diverges_and_the_patched_one_is_taken() {
    let gateway = InProcess::start(|_| {}).await;
    let effects = Effects::default();
    let history = record_two_orders(&gateway, &effects).await;
    let recorded_effects = effects.count();

    // Reordered code: both recordings diverge at entry 1, named on both sides.
    let reordered = serve(Version::Reordered, &effects).await;
    let report = replay(&gateway, &reordered, &history).await;
    assert_eq!(report["diverged"], 2, "{report:#}");
    let divergence = &report["histories"][0]["divergence"];
    assert_eq!(divergence["index"], 1, "{report:#}");
    assert_eq!(divergence["recorded"], "step \"reserve\"", "{report:#}");
    assert_eq!(divergence["requested"], "step \"charge\"", "{report:#}");
    let (code, printed) = replay_cli(&gateway, &reordered, &history);
    assert_eq!(code, 4, "{printed}");
    assert!(printed.contains("recorded:  step \"reserve\""), "{printed}");

    // Asked to be verified, it is refused with the report, and nothing is registered.
    let refused = register_verified(&gateway, &reordered).await;
    assert_eq!(refused.status(), 409);
    let problem: Value = refused.json().await.unwrap();
    assert_eq!(problem["type"], "urn:durin:problem:deployment-diverged");
    assert_eq!(problem["report"]["diverged"], 2, "{problem:#}");
    assert_eq!(deployment_count(&gateway).await, 1);

    // The same change behind a patch replays both recordings and is registered.
    let patched = serve(Version::Patched, &effects).await;
    let taken = register_verified(&gateway, &patched).await;
    assert_eq!(taken.status(), 201);
    let deployment: Value = taken.json().await.unwrap();
    assert_eq!(deployment["verification"]["replayed"], 2, "{deployment:#}");
    assert_eq!(deployment_count(&gateway).await, 2);
    assert_eq!(effects.count(), recorded_effects, "a replay ran a step");

    // New orders run the new code and record the patch.
    let id = send_order(&gateway, 3, false).await;
    status_is(&gateway, &id, "completed").await;
    let journal = get_json(&format!("{}/v1/invocations/{id}/journal", gateway.admin)).await;
    let names: Vec<&str> = journal["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert_eq!(names, ["charge-first", "charge", "reserve", "ship"]);

    // By choice, the reordered code is registered inactive instead (all three orders
    // diverge on it now, the patched one at its patch marker): no new order goes to it
    // until it is activated.
    let kept: Value = client()
        .post(format!("{}/v1/deployments", gateway.admin))
        .json(&json!({ "url": reordered, "verify": { "on_divergence": "inactive" } }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(kept["active"], false, "{kept:#}");
    assert_eq!(kept["verification"]["diverged"], 3, "{kept:#}");
    let id = send_order(&gateway, 4, false).await;
    status_is(&gateway, &id, "completed").await;
    let view = get_json(&format!("{}/v1/invocations/{id}", gateway.url)).await;
    assert_eq!(
        view["deployment_id"], deployment["id"],
        "an inactive deployment took an order"
    );
    let activated = client()
        .post(format!(
            "{}/v1/deployments/{}/activate",
            gateway.admin,
            kept["id"].as_str().unwrap()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(activated.status(), 200);
    let id = send_order(&gateway, 5, false).await;
    status_is(&gateway, &id, "completed").await;
    let view = get_json(&format!("{}/v1/invocations/{id}", gateway.url)).await;
    assert_eq!(view["deployment_id"], kept["id"]);
    // The reordered code took that order: it charged first.
    let journal = get_json(&format!("{}/v1/invocations/{id}/journal", gateway.admin)).await;
    assert_eq!(journal["entries"][1]["name"], "charge");
    gateway.stop().await;
}

/// The histories kept with the order example replay against its code as it is now: a
/// completed order, an approval cancelled by its signal, and one still waiting for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_order_examples_recorded_histories_replay_against_its_code() {
    let gateway = InProcess::start(|_| {}).await;
    let args = order_example::Args {
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        step_delay_ms: 0,
        downstream: None,
        step_retry_initial_ms: 20,
        reserve_first: false,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let order = format!("http://{}", listener.local_addr().unwrap());
    let router = order_example::endpoint(args).router();
    tokio::spawn(async move { axum::serve(listener, router).await });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/order/histories");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "approval-cancelled.jsonl",
            "approval-waiting.jsonl",
            "order-7001.jsonl"
        ]
    );
    let reached = ["end", "frontier", "end"];
    for (file, reached) in files.iter().zip(reached) {
        let report = replay(&gateway, &order, &std::fs::read_to_string(file).unwrap()).await;
        assert_eq!(report["replayed"], 1, "{}: {report:#}", file.display());
        assert_eq!(report["histories"][0]["reached"], reached, "{report:#}");
    }
    gateway.stop().await;
}

/// A run Durin ended (its retries used up) binds nothing: the same code replays to where
/// it was cut, and a verification leaves such runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_durin_failed_replays_to_where_it_was_cut() {
    let gateway = InProcess::start(|config| {
        config.retry_policy = durin_protocol::RetryPolicy {
            initial_interval: Duration::from_millis(10),
            maximum_attempts: Some(2),
            ..durin_protocol::RetryPolicy::default()
        };
    })
    .await;
    let tries = Effects::default();
    let counted = tries.clone();
    let endpoint = Endpoint::new().service(Service::new("flaky").handler(
        "run",
        move |ctx: Context, _: Value| {
            let tries = counted.clone();
            async move {
                let id: String = ctx.run("id", || async { Ok("a".to_owned()) }).await?;
                tries.0.fetch_add(1, Ordering::SeqCst);
                Err::<Value, _>(HandlerError::retryable(format!("down after {id}")))
            }
        },
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, endpoint.router()).await });
    register(&gateway.admin, &url).await;
    let answer: Value = client()
        .post(format!("{}/v1/send/flaky/run", gateway.url))
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = answer["invocation_id"].as_str().unwrap().to_owned();
    status_is(&gateway, &id, "failed").await;
    assert_eq!(tries.count(), 2);
    let history = client()
        .get(format!("{}/v1/invocations/{id}/history", gateway.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let report = replay(&gateway, &url, &history).await;
    assert_eq!(report["replayed"], 1, "{report:#}");
    // The SDK failed again where the run was cut: the replay reached its end there.
    assert_eq!(
        tries.count(),
        3,
        "the handler's own code ran, its steps did not"
    );
    let verified = register_verified(&gateway, &url).await;
    assert!(verified.status().is_success());
    let deployment: Value = verified.json().await.unwrap();
    assert_eq!(
        deployment["verification"]["histories"],
        json!([]),
        "{deployment:#}"
    );
    gateway.stop().await;
}

/// A plain handler (a Rust axum one here, through the context API) that records steps
/// `a` and `b`, and a later version that records only `b`: it finds `b` by name, but the
/// recorded `a` it skipped is a divergence.
#[derive(Clone)]
struct Stepper {
    gateway: String,
    steps: &'static [&'static str],
}

async fn stepper(
    axum::extract::State(app): axum::extract::State<Stepper>,
    headers: axum::http::HeaderMap,
) -> axum::Json<Value> {
    let header = |name: &str| headers[name].to_str().unwrap().to_owned();
    for step in app.steps {
        let answer = client()
            .post(format!(
                "{}/v1/contexts/{}/steps/{step}",
                app.gateway,
                header("durin-invocation-id")
            ))
            .header("durin-attempt", header("durin-attempt"))
            .header("durin-attempt-token", header("durin-attempt-token"))
            .json(&json!(step))
            .send()
            .await
            .unwrap();
        assert!(answer.status().is_success(), "{}", answer.status());
    }
    axum::Json(json!("done"))
}

async fn serve_stepper(gateway: &str, steps: &'static [&'static str]) -> String {
    let app = axum::Router::new()
        .route("/steps", axum::routing::post(stepper))
        .with_state(Stepper {
            gateway: gateway.to_owned(),
            steps,
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_handler_that_skips_a_recorded_step_diverges_there() {
    let gateway = InProcess::start(|_| {}).await;
    let declare = |url: &str, verify: bool| {
        json!({
            "url": url,
            "services": [{"name": "plain", "handlers": [{"name": "run", "path": "/steps"}]}],
            "verify": verify
        })
    };
    let both = serve_stepper(&gateway.url, &["a", "b"]).await;
    let registered = client()
        .post(format!("{}/v1/deployments", gateway.admin))
        .json(&declare(&both, false))
        .send()
        .await
        .unwrap();
    assert_eq!(registered.status(), 201);
    let answer: Value = client()
        .post(format!("{}/v1/send/plain/run", gateway.url))
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = answer["invocation_id"].as_str().unwrap().to_owned();
    status_is(&gateway, &id, "completed").await;

    let only_b = serve_stepper(&gateway.url, &["b"]).await;
    let refused = client()
        .post(format!("{}/v1/deployments", gateway.admin))
        .json(&declare(&only_b, true))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 409);
    let problem: Value = refused.json().await.unwrap();
    let divergence = &problem["report"]["histories"][0]["divergence"];
    assert_eq!(divergence["index"], 1, "{problem:#}");
    assert_eq!(divergence["recorded"], "step \"a\"", "{problem:#}");
    let taken = client()
        .post(format!("{}/v1/deployments", gateway.admin))
        .json(&declare(
            &serve_stepper(&gateway.url, &["a", "b"]).await,
            true,
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(taken.status(), 201);
    gateway.stop().await;
}
