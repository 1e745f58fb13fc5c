//! PostgreSQL stopped for 8 s and started again under load, with two Durin nodes on it: callers get retry-safe
//! problems while it is down (503 with `Retry-After`), the nodes reconnect by themselves,
//! and every order completes with each side effect applied once. It restarts the server
//! on 127.0.0.1:5432, so it is a test file of its own (cargo runs test files one at a
//! time).

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

const ORDERS: usize = 400;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_under_load_loses_and_repeats_nothing() {
    let home = GatewayHome::cluster("2s");
    let downstream = Downstream::start(&[]).await;
    let handler = start_order(
        None,
        &["--step-delay-ms", "50", "--downstream", &downstream.url],
    );
    let nodes = [home.start(None), home.start(None)];
    register(&nodes[0].admin, &handler.url).await;
    let urls: Vec<String> = nodes.iter().map(|n| n.url.clone()).collect();

    // Orders go out steadily, each under its own key; a 503 is retried after its
    // Retry-After with the same key, as a client should.
    let unavailable = Arc::new(AtomicU32::new(0));
    let sender = {
        let (urls, unavailable) = (urls.clone(), Arc::clone(&unavailable));
        tokio::spawn(async move {
            use futures_util::StreamExt;
            futures_util::stream::iter(0..ORDERS)
                .map(|i| {
                    let (urls, unavailable) = (urls.clone(), Arc::clone(&unavailable));
                    async move {
                        // Spread over time, so that some are sent while the server is down.
                        tokio::time::sleep(Duration::from_millis(10 * i as u64)).await;
                        let order = json!({"order_id": format!("o-{i}"), "customer_id": "c", "amount_cents": 100});
                        let started = Instant::now();
                        loop {
                            let url = &urls[i % urls.len()];
                            let response = client()
                                .post(format!("{url}/v1/send/order/process"))
                                .header("idempotency-key", format!("order-{i}"))
                                .json(&order)
                                .send()
                                .await
                                .unwrap();
                            match response.status().as_u16() {
                                202 => break,
                                503 => {
                                    let after: u64 = response.headers()["retry-after"]
                                        .to_str()
                                        .unwrap()
                                        .parse()
                                        .unwrap();
                                    let problem: serde_json::Value =
                                        response.json().await.unwrap();
                                    assert_eq!(problem["retryable"], true, "{problem}");
                                    unavailable.fetch_add(1, Ordering::SeqCst);
                                    tokio::time::sleep(Duration::from_secs(after)).await;
                                }
                                status => panic!(
                                    "order {i}: {status} {}",
                                    response.text().await.unwrap_or_default()
                                ),
                            }
                            assert!(
                                started.elapsed() < Duration::from_secs(60),
                                "order {i} never accepted"
                            );
                        }
                    }
                })
                .buffer_unordered(64)
                .collect::<Vec<()>>()
                .await;
        })
    };

    // A third of the way in, restart the server.
    tokio::time::sleep(Duration::from_millis(10 * ORDERS as u64 / 3)).await;
    let version = std::fs::read_dir("/etc/postgresql")
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .file_name();
    // Down for 8 s: longer than a node waits for a connection (5 s), so that callers meet
    // the outage, not only a short pause.
    let cluster = |action: &str| {
        let done = std::process::Command::new("pg_ctlcluster")
            .args(["--skip-systemctl-redirect"])
            .arg(&version)
            .args(["main", action])
            .status()
            .unwrap();
        assert!(done.success(), "pg_ctlcluster {action} failed");
    };
    cluster("stop");
    tokio::time::sleep(Duration::from_secs(8)).await;
    cluster("start");

    sender.await.unwrap();
    let refused = unavailable.load(Ordering::SeqCst);
    println!("sends answered 503 with Retry-After while PostgreSQL restarted: {refused}");
    assert!(
        refused > 0,
        "no send met the restart: the test did not test it"
    );
    let db = sqlx::PgPool::connect(&home.db_url()).await.unwrap();
    eventually(Duration::from_secs(120), "every order to complete", || {
        let db = db.clone();
        async move {
            let done: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM invocations WHERE service = 'order' AND status = 'completed'",
            )
            .fetch_one(&db)
            .await
            .ok()?;
            (done as usize == ORDERS).then_some(())
        }
    })
    .await;
    let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM invocations")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(total as usize, ORDERS, "one invocation per order");
    for step in ["charge_payment", "reserve_inventory", "send_confirmation"] {
        let (requests, applied) = (
            downstream.requests(step).len(),
            downstream.distinct_keys(step),
        );
        println!("{step}: {requests} requests, {applied} applied");
        assert_eq!(applied, ORDERS, "{step} once per order");
    }
    db.close().await;
}
