//! Several Durin nodes on one PostgreSQL database, as real processes: they share the work,
//! a node killed with SIGKILL is taken over by the others once its leases expire, and a
//! node frozen (SIGSTOP) past its leases cannot write or call out for an attempt another
//! node took over when it is resumed.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use serde_json::{json, Value};
use support::*;

/// The lease of these clusters: what a takeover waits for at most.
const LEASE: Duration = Duration::from_secs(2);

/// A pool on the cluster's schema, to look at leases the way the nodes see them.
async fn database(home: &GatewayHome) -> sqlx::PgPool {
    sqlx::PgPool::connect(&home.db_url()).await.unwrap()
}

async fn count(db: &sqlx::PgPool, sql: &str, bind: &str) -> i64 {
    sqlx::query_scalar(sql)
        .bind(bind)
        .fetch_one(db)
        .await
        .unwrap()
}

/// 2,000 order workflows (three steps of 100 ms, each a side effect at a downstream that
/// honours `Idempotency-Key`) sent round-robin to three nodes; one node is killed with
/// SIGKILL mid-load. Every workflow completes with each step applied once, and the
/// survivors take over the dead node's attempts within the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_load_is_taken_over_and_nothing_runs_twice() {
    if !require("postgres") {
        return;
    }
    const ORDERS: usize = 2_000;
    let home = GatewayHome::cluster("2s");
    let downstream = Downstream::start(&[]).await;
    let handler = start_order(
        None,
        &["--step-delay-ms", "100", "--downstream", &downstream.url],
    );
    let mut nodes: Vec<Proc> = (0..3).map(|_| home.start(None)).collect();
    register(&nodes[0].admin, &handler.url).await;
    let db = database(&home).await;

    // Send the orders, 64 at a time, round-robin over the nodes.
    let urls: Vec<String> = nodes.iter().map(|n| n.url.clone()).collect();
    let sent = Arc::new(AtomicU32::new(0));
    let sender = {
        let (urls, sent) = (urls.clone(), Arc::clone(&sent));
        tokio::spawn(async move {
            use futures_util::StreamExt;
            futures_util::stream::iter(0..ORDERS)
                .map(|i| {
                    let (urls, sent) = (urls.clone(), Arc::clone(&sent));
                    async move {
                        let order = json!({"order_id": format!("o-{i}"), "customer_id": "c", "amount_cents": 100});
                        // A node that died answers nothing: the order goes to the next one.
                        let mut tries = 0;
                        loop {
                            let url = &urls[(i + tries) % urls.len()];
                            // The key makes the retry on another node of an order whose
                            // answer was lost (its node died) find the first invocation.
                            let response = client()
                                .post(format!("{url}/v1/send/order/process"))
                                .header("idempotency-key", format!("order-{i}"))
                                .json(&order)
                                .send()
                                .await;
                            match response {
                                Ok(r) if r.status() == 202 => break,
                                _ if tries < 3 => tries += 1,
                                other => panic!("order {i} not accepted: {other:?}"),
                            }
                        }
                        sent.fetch_add(1, Ordering::SeqCst);
                    }
                })
                .buffer_unordered(64)
                .collect::<Vec<()>>()
                .await;
        })
    };

    // Mid-load: kill the second node once it runs attempts of its own.
    let victim = nodes[1].url.clone();
    eventually(
        Duration::from_secs(60),
        "the second node to run attempts",
        || {
            let db = db.clone();
            let victim = victim.clone();
            async move {
                let running = count(
                &db,
                "SELECT COUNT(*) FROM invocations WHERE status = 'running' AND lease_owner = $1",
                &victim,
            )
            .await;
                (running >= 20).then_some(())
            }
        },
    )
    .await;
    let held = count(
        &db,
        "SELECT COUNT(*) FROM invocations WHERE status = 'running' AND lease_owner = $1",
        &victim,
    )
    .await;
    nodes[1].kill();
    let killed = Instant::now();
    // The survivors take its attempts over: none is left running under its lease.
    eventually(Duration::from_secs(30), "the takeover", || {
        let db = db.clone();
        let victim = victim.clone();
        async move {
            let left = count(
                &db,
                "SELECT COUNT(*) FROM invocations WHERE status = 'running' AND lease_owner = $1",
                &victim,
            )
            .await;
            (left == 0).then_some(())
        }
    })
    .await;
    let takeover = killed.elapsed();
    println!(
        "takeover of {held} attempts held by the killed node: {} ms (lease {} ms)",
        takeover.as_millis(),
        LEASE.as_millis()
    );
    assert!(
        takeover < LEASE + Duration::from_secs(2),
        "took {takeover:?}"
    );

    // The orders the dead node had accepted but not started are anyone's: all complete.
    sender.await.unwrap();
    assert_eq!(sent.load(Ordering::SeqCst) as usize, ORDERS);
    eventually(Duration::from_secs(180), "every order to complete", || {
        let db = db.clone();
        async move {
            let done = count(
                &db,
                "SELECT COUNT(*) FROM invocations WHERE service = $1 AND status = 'completed'",
                "order",
            )
            .await;
            (done as usize == ORDERS).then_some(())
        }
    })
    .await;
    let total = count(
        &db,
        "SELECT COUNT(*) FROM invocations WHERE service = $1",
        "order",
    )
    .await;
    assert_eq!(total as usize, ORDERS, "one invocation per order");
    for step in ["charge_payment", "reserve_inventory", "send_confirmation"] {
        let requests = downstream.requests(step).len();
        let applied = downstream.distinct_keys(step);
        println!("{step}: {requests} requests, {applied} applied (one per idempotency key)");
        assert_eq!(applied, ORDERS, "{step} applied once per order");
    }
    // Journals are whole: each order's three steps once.
    let broken = count(
        &db,
        "SELECT COUNT(*) FROM invocations i WHERE service = $1 AND \
         (SELECT COUNT(*) FROM journal j WHERE j.invocation_id = i.id AND j.kind = 'step') <> 3",
        "order",
    )
    .await;
    assert_eq!(broken, 0);
    db.close().await;
}

/// A node frozen with SIGSTOP while its attempt's handler works: another node takes the
/// invocation over after the lease and finishes it. Resumed with SIGCONT, the frozen node
/// gets the old attempt's late append, end and egress call, and refuses each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_node_cannot_write_or_call_out_for_an_attempt_taken_over() {
    if !require("postgres") {
        return;
    }
    let home = GatewayHome::cluster("2s");
    let calls = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let downstream = {
        let calls = Arc::clone(&calls);
        serve_router(axum::Router::new().route(
            "/charge",
            axum::routing::post(move |headers: HeaderMap| {
                let calls = Arc::clone(&calls);
                async move {
                    let key = headers["idempotency-key"].to_str().unwrap().to_owned();
                    calls.lock().unwrap().push(key);
                    r#"{"charged":true}"#
                }
            }),
        ))
        .await
    };
    let (mut frozen, frozen_egress) =
        home.start_with_egress(None, None, &["--egress-allow", "127.0.0.1"]);
    let (other, other_egress) =
        home.start_with_egress(None, None, &["--egress-allow", "127.0.0.1"]);

    // The handler: records a step, waits 3 s (the first attempt is frozen meanwhile),
    // then charges through the egress of the node that invoked it.
    let attempts = Arc::new(AtomicU32::new(0));
    let answers = Arc::new(std::sync::Mutex::new(Vec::<(u32, String, u16)>::new()));
    let handler = {
        let (nodes, egresses) = (
            [frozen.url.clone(), other.url.clone()],
            [frozen_egress.clone(), other_egress.clone()],
        );
        let (attempts, answers, downstream) = (
            Arc::clone(&attempts),
            Arc::clone(&answers),
            downstream.clone(),
        );
        serve_router(axum::Router::new().route(
            "/pay/run",
            axum::routing::post(move |headers: HeaderMap| {
                let (nodes, egresses, answers, downstream) = (
                    nodes.clone(),
                    egresses.clone(),
                    Arc::clone(&answers),
                    downstream.clone(),
                );
                attempts.fetch_add(1, Ordering::SeqCst);
                async move {
                    let header = |name: &str| headers[name].to_str().unwrap().to_owned();
                    let (id, attempt) = (header("durin-invocation-id"), header("durin-attempt"));
                    let n: u32 = attempt.parse().unwrap();
                    // Attempt 1 runs on the first node, the takeover on the second.
                    let which = usize::from(n > 1);
                    let durin = |request: reqwest::RequestBuilder| {
                        request
                            .header("durin-invocation-id", &id)
                            .header("durin-attempt", &attempt)
                            .header("durin-attempt-token", header("durin-attempt-token"))
                    };
                    let step = durin(
                        client().post(format!("{}/v1/contexts/{id}/steps/reserve", nodes[which])),
                    )
                    .json(&json!("r-1"))
                    .send()
                    .await;
                    let step = step.map(|r| r.status().as_u16()).unwrap_or(0);
                    answers.lock().unwrap().push((n, "step".into(), step));
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    let target = downstream.trim_start_matches("http://");
                    let charged =
                        durin(client().post(format!("{}/http/{target}/charge", egresses[which])))
                            .body("{}")
                            .send()
                            .await
                            .map(|r| r.status().as_u16())
                            .unwrap_or(0);
                    answers.lock().unwrap().push((n, "charge".into(), charged));
                    (StatusCode::OK, json!({"charged": charged}).to_string())
                }
            }),
        ))
        .await
    };
    let registered = client()
        .post(format!("{}/v1/deployments", frozen.admin))
        .json(
            &json!({"url": handler, "services": [{"name": "pay", "handlers": [{"name": "run"}]}]}),
        )
        .send()
        .await
        .unwrap();
    assert!(registered.status().is_success());

    // Started on the first node, which runs attempt 1; frozen once the step is recorded.
    let id = send_json(&frozen.url, "/v1/send/pay/run").await;
    eventually(Duration::from_secs(10), "the step of attempt 1", || {
        let answers = Arc::clone(&answers);
        async move {
            answers
                .lock()
                .unwrap()
                .iter()
                .any(|(n, what, _)| *n == 1 && what == "step")
                .then_some(())
        }
    })
    .await;
    signal(&frozen, "STOP");
    // The other node takes over after the lease and finishes the invocation.
    let done = eventually(Duration::from_secs(30), "the takeover to finish", || {
        let url = other.url.clone();
        let id = id.clone();
        async move {
            let view = get_json(&format!("{url}/v1/invocations/{id}")).await;
            (view["status"] == "completed").then_some(view)
        }
    })
    .await;
    assert_eq!(done["attempt"], 2, "{done}");
    // Attempt 1's handler sends its charge to the frozen node's egress 3 s after its step
    // (the takeover took longer): it waits in that node's socket.
    tokio::time::sleep(Duration::from_secs(1)).await;
    signal(&frozen, "CONT");
    // Attempt 1's charge reaches the resumed node's egress, which refuses it.
    eventually(
        Duration::from_secs(15),
        "attempt 1's charge to be answered",
        || {
            let answers = Arc::clone(&answers);
            async move {
                answers
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|(n, what, _)| *n == 1 && what == "charge")
                    .map(|(_, _, status)| *status)
            }
        },
    )
    .await;
    let answers = answers.lock().unwrap().clone();
    let charge_1 = answers
        .iter()
        .find(|(n, what, _)| *n == 1 && what == "charge")
        .unwrap()
        .2;
    assert!(
        (400..500).contains(&charge_1),
        "the resumed node refuses the old attempt's call: {answers:?}"
    );
    assert_eq!(calls.lock().unwrap().len(), 1, "one charge, by attempt 2");
    // Nothing of attempt 1 after the takeover: the journal is attempt 1's step, attempt 2's
    // charge and output.
    let entries = journal(&other.admin, &id).await;
    let by: Vec<(String, u64)> = entries
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap().to_owned(),
                e["attempt"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        by,
        [
            ("input".to_owned(), 0),
            ("step".to_owned(), 1),
            ("egress".to_owned(), 2),
            ("output".to_owned(), 2),
        ],
        "{entries:?}"
    );
    let after = get_json(&format!("{}/v1/invocations/{id}", other.url)).await;
    assert_eq!(
        (after["status"].clone(), after["attempt"].clone()),
        (json!("completed"), json!(2))
    );
    frozen.kill();
}

async fn serve_router(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    url
}

async fn send_json(gateway: &str, path: &str) -> String {
    let response = client()
        .post(format!("{gateway}{path}"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    body["invocation_id"].as_str().unwrap().to_owned()
}

fn signal(process: &Proc, which: &str) {
    let sent = std::process::Command::new("kill")
        .args([&format!("-{which}"), &process.pid().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// A caller waiting on one node hears at once of an end on another: the order runs on the
/// second node (it took it in), the caller long-polls the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_on_one_node_hears_an_end_on_another_at_once() {
    if !require("postgres") {
        return;
    }
    let home = GatewayHome::cluster("2s");
    let handler = start_order(None, &["--step-delay-ms", "300"]);
    let (waiting, running) = (home.start(None), home.start(None));
    register(&waiting.admin, &handler.url).await;
    let id = send_order(&running.url, ORDER).await;
    let started = Instant::now();
    let answer = client()
        .get(format!("{}/v1/invocations/{id}", waiting.url))
        .header("prefer", "wait=30")
        .send()
        .await
        .unwrap();
    let waited = started.elapsed();
    assert_eq!(answer.status(), 200);
    let view: Value = answer.json().await.unwrap();
    assert_eq!(view["status"], "completed", "{view}");
    // Three steps of 300 ms on the other node; told by a notification, not a timeout.
    assert!(waited < Duration::from_secs(5), "waited {waited:?}");
    println!(
        "answered on the other node {} ms after the send",
        waited.as_millis()
    );
}

/// One `Idempotency-Key` sent to two nodes at once, many times over: one invocation, and
/// every answer names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_idempotency_key_sent_to_two_nodes_at_once_makes_one_invocation() {
    if !require("postgres") {
        return;
    }
    let home = GatewayHome::cluster("2s");
    let handler = start_order(None, &[]);
    let nodes = [home.start(None), home.start(None)];
    register(&nodes[0].admin, &handler.url).await;
    for round in 0..10 {
        let key = format!("race-{round}");
        let sends = (0..8).map(|i| {
            let (url, key) = (nodes[i % 2].url.clone(), key.clone());
            async move {
                let response = client()
                    .post(format!("{url}/v1/send/order/process"))
                    .header("idempotency-key", key)
                    .header("content-type", "application/json")
                    .body(ORDER)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 202);
                let body: Value = response.json().await.unwrap();
                body["invocation_id"].as_str().unwrap().to_owned()
            }
        });
        let mut ids = futures_util::future::join_all(sends).await;
        ids.dedup();
        assert_eq!(ids.len(), 1, "round {round}: {ids:?}");
    }
    let db = database(&home).await;
    let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM invocations")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(total, 10);
    db.close().await;
}

/// A workflow started on one node waits for a signal; the signal sent to another node wakes
/// it there at once, and the caller on the first node hears the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_sent_to_another_node_wakes_the_workflow() {
    if !require("postgres") {
        return;
    }
    let home = GatewayHome::cluster("2s");
    let handler = start_order(None, &[]);
    let (first, second) = (home.start(None), home.start(None));
    register(&first.admin, &handler.url).await;
    let started = client()
        .post(format!("{}/v1/workflows/approval/a-1", first.url))
        .json(&json!({"request": "a-1", "deadline_secs": 3600}))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 202);
    eventually(Duration::from_secs(10), "the run to wait", || {
        let url = first.url.clone();
        async move {
            let view = get_json(&format!("{url}/v1/workflows/approval/a-1")).await;
            (view["status"] == "suspended").then_some(())
        }
    })
    .await;
    let sent = Instant::now();
    let signalled = client()
        .post(format!(
            "{}/v1/workflows/approval/a-1/signals/cancel",
            second.url
        ))
        .json(&json!("no"))
        .send()
        .await
        .unwrap();
    assert!(signalled.status().is_success(), "{}", signalled.status());
    let ended = client()
        .get(format!("{}/v1/workflows/approval/a-1", first.url))
        .header("prefer", "wait=30")
        .send()
        .await
        .unwrap();
    let waited = sent.elapsed();
    let view: Value = ended.json().await.unwrap();
    assert_eq!(view["status"], "completed", "{view}");
    assert!(waited < Duration::from_secs(5), "waited {waited:?}");
    println!("the run ended {} ms after the signal", waited.as_millis());
}

/// A webhook source set through one node's admin API is served by the other node at once,
/// with both nodes' deliveries listed together; a secret changed on the second node is
/// the one the first node checks from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_source_set_on_one_node_is_served_by_every_node() {
    if !require("postgres") {
        return;
    }
    let home = GatewayHome::cluster("2s");
    let handler = start_order(None, &[]);
    let (first, second) = (home.start(None), home.start(None));
    register(&first.admin, &handler.url).await;
    let set = |admin: &str, secret: &str| {
        client()
            .put(format!("{admin}/v1/webhooks/orders"))
            .json(&json!({
                "scheme": "github", "secrets": [secret],
                "routes": [{"send": "order/process"}],
            }))
            .send()
    };
    let deliver = |node: &Proc, delivery: &str, secret: &str| {
        let body = ORDER.as_bytes().to_vec();
        let signature = durin::webhooks::verify::sign::github(secret, &body);
        client()
            .post(format!("{}/v1/webhooks/orders", node.url))
            .header("content-type", "application/json")
            .header("x-github-event", "push")
            .header("x-github-delivery", delivery.to_owned())
            .header("x-hub-signature-256", signature)
            .body(body)
            .send()
    };
    assert_eq!(set(&first.admin, "one").await.unwrap().status(), 201);
    assert_eq!(deliver(&second, "d-1", "one").await.unwrap().status(), 202);
    // Changed on the second node: the first checks the new secret.
    assert_eq!(set(&second.admin, "two").await.unwrap().status(), 200);
    assert_eq!(deliver(&first, "d-2", "one").await.unwrap().status(), 401);
    // The same order body under another secret is a new signature, not a new event: the
    // event is told apart by its signed body, so it is the first one's duplicate.
    let again = deliver(&first, "d-3", "two").await.unwrap();
    assert_eq!(again.status(), 202);
    assert_eq!(again.headers()["durin-webhook-duplicate"], "true");
    let outcomes = delivery_outcomes(&second.admin, "orders").await;
    assert_eq!(outcomes, ["duplicate", "refused", "accepted"]);
}

/// Attempts that run longer than the lease stay their node's: the node renews the lease
/// of each attempt it runs, the first (created running by the send) and a retry (claimed
/// by the scheduler after a backoff), so no other node takes one over mid-way. Three
/// steps of 1 s against a lease of 2 s, on two nodes; the first charge fails once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_longer_than_the_lease_stay_with_their_node() {
    if !require("postgres") {
        return;
    }
    let downstream = Downstream::start(&[("charge_payment", 1)]).await;
    let home = GatewayHome::cluster("2s");
    let handler = start_order(
        None,
        &[
            "--step-delay-ms",
            "1000",
            "--downstream",
            &downstream.url,
            "--step-retry-initial-ms",
            "100",
        ],
    );
    let nodes = [home.start(None), home.start(None)];
    register(&nodes[0].admin, &handler.url).await;
    let first = send_order(&nodes[0].url, ORDER).await;
    let second = send_order(&nodes[1].url, &ORDER.replace("\"o-1\"", "\"o-2\"")).await;
    for id in [&first, &second] {
        let view = wait_final(&nodes[0].url, id).await;
        assert_eq!(view["status"], "completed", "{view}");
    }
    let db = database(&home).await;
    let attempts: Vec<(String, i64)> =
        sqlx::query_as("SELECT id, attempt FROM invocations ORDER BY id")
            .fetch_all(&db)
            .await
            .unwrap();
    // One failed charge: one invocation retried once, the other never; no takeover.
    let mut numbers: Vec<i64> = attempts.iter().map(|(_, a)| *a).collect();
    numbers.sort();
    assert_eq!(numbers, [1, 2], "{attempts:?}");
    for step in ["charge_payment", "reserve_inventory", "send_confirmation"] {
        assert_eq!(downstream.distinct_keys(step), 2, "{step} once per order");
    }
    let reserve = downstream.requests("reserve_inventory").len();
    assert_eq!(reserve, 2, "no step ran twice");
    db.close().await;
}
