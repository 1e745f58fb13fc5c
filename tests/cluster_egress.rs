//! One attempt's egress calls reaching two nodes' egresses (a plain handler behind a load
//! balancer), on one PostgreSQL database: the occurrences, which pick each call's derived
//! `Idempotency-Key`, are counted in the store, so two identical calls never share a key and
//! a call sent again after its answer was lost keeps its key, whichever node it reaches.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use serde_json::{json, Value};
use support::*;

/// A request the downstream received: its body and `Idempotency-Key`.
#[derive(Debug, Clone)]
struct Seen {
    body: String,
    key: String,
}

/// What the handler got from one egress call: `status` 0 when it hung up.
#[derive(Debug, Clone)]
struct Answer {
    attempt: u32,
    call: &'static str,
    status: u16,
    replayed: bool,
    body: String,
}

/// One attempt calls `POST /charge` with the same body twice, through node 1's egress and
/// then node 2's: two keys. It then calls `POST /charge` with another body twice through
/// node 1; the downstream holds the second call's answer and the handler hangs up (the
/// egress gives the occurrence back), then sends it again through node 2: the same key as
/// its first try, and not the first call's. The attempt fails after its calls; attempt 2
/// makes them again and gets every one from the journal, and the downstream sees nothing
/// new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_attempts_calls_through_two_nodes_keep_their_keys_apart() {
    if !require("postgres") {
        return;
    }
    let home = GatewayHome::cluster("2s");
    let db = sqlx::PgPool::connect(&home.db_url()).await.unwrap();

    // The downstream: records every request; holds the answer of one marked `x-hold` 5 s.
    let seen = Arc::new(Mutex::new(Vec::<Seen>::new()));
    let downstream = {
        let seen = Arc::clone(&seen);
        serve_router(axum::Router::new().route(
            "/charge",
            axum::routing::post(move |headers: HeaderMap, body: String| {
                let seen = Arc::clone(&seen);
                async move {
                    let key = headers
                        .get("idempotency-key")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    let n = {
                        let mut seen = seen.lock().unwrap();
                        seen.push(Seen {
                            body: body.clone(),
                            key: key.clone(),
                        });
                        seen.len()
                    };
                    if headers.contains_key("x-hold") {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                    json!({"request": n, "key": key, "body": body}).to_string()
                }
            }),
        ))
        .await
    };
    let target = format!("http/{}", downstream.trim_start_matches("http://"));

    let allow = ["--egress-allow", "127.0.0.1"];
    let (node1, egress1) = home.start_with_egress(None, None, &allow);
    let (_node2, egress2) = home.start_with_egress(None, None, &allow);

    let answers = Arc::new(Mutex::new(Vec::<Answer>::new()));
    let handler = {
        let (answers, db) = (Arc::clone(&answers), db.clone());
        let egresses = [egress1.clone(), egress2.clone()];
        serve_router(axum::Router::new().route(
            "/pay/run",
            axum::routing::post(move |headers: HeaderMap| {
                let (answers, db, egresses, target) = (
                    Arc::clone(&answers),
                    db.clone(),
                    egresses.clone(),
                    target.clone(),
                );
                async move {
                    let header = |name: &str| headers[name].to_str().unwrap().to_owned();
                    let (id, attempt, token) = (
                        header("durin-invocation-id"),
                        header("durin-attempt"),
                        header("durin-attempt-token"),
                    );
                    let n: u32 = attempt.parse().unwrap();
                    // One egress call: `POST /charge` with `body` through node `node`'s
                    // egress, given up after `timeout`.
                    let call = |call: &'static str,
                                node: usize,
                                body: &'static str,
                                hold: bool,
                                timeout: Duration| {
                        let mut request = client()
                            .post(format!("{}/{target}/charge", egresses[node]))
                            .timeout(timeout)
                            .header("durin-invocation-id", &id)
                            .header("durin-attempt", &attempt)
                            .header("durin-attempt-token", &token)
                            .body(body);
                        if hold {
                            request = request.header("x-hold", "1");
                        }
                        let answers = Arc::clone(&answers);
                        async move {
                            let answer = match request.send().await {
                                Ok(response) => {
                                    let status = response.status().as_u16();
                                    let replayed = response
                                        .headers()
                                        .get("durin-replayed")
                                        .is_some_and(|v| v == "true");
                                    let body = response.text().await.unwrap_or_default();
                                    Answer {
                                        attempt: n,
                                        call,
                                        status,
                                        replayed,
                                        body,
                                    }
                                }
                                Err(_) => Answer {
                                    attempt: n,
                                    call,
                                    status: 0,
                                    replayed: false,
                                    body: String::new(),
                                },
                            };
                            answers.lock().unwrap().push(answer.clone());
                            answer
                        }
                    };
                    let long = Duration::from_secs(30);
                    let a = r#"{"item":"a"}"#;
                    let b = r#"{"item":"b"}"#;
                    call("a1", 0, a, false, long).await;
                    call("a2", 1, a, false, long).await;
                    call("b1", 0, b, false, long).await;
                    // The downstream holds this answer; the handler gives up after 500 ms.
                    let b2 = call("b2", 0, b, true, Duration::from_millis(500)).await;
                    if b2.status == 0 {
                        // A real handler would back off before sending it again; this one
                        // waits (at most 10 s) until node 1's egress has given the
                        // occurrence back in the store, rather than guessing a delay.
                        let started = Instant::now();
                        while started.elapsed() < Duration::from_secs(10) {
                            let back: i64 = sqlx::query_scalar(
                                "SELECT COUNT(*) FROM egress_occurrences WHERE invocation_id = $1 \
                                 AND attempt = $2 AND next = 1",
                            )
                            .bind(&id)
                            .bind(i64::from(n))
                            .fetch_one(&db)
                            .await
                            .unwrap();
                            if back == 1 {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        call("b2 again", 1, b, false, long).await;
                    }
                    if n == 1 {
                        (
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "fail once after the calls",
                        )
                    } else {
                        (StatusCode::OK, "done")
                    }
                }
            }),
        ))
        .await
    };
    let registered = client()
        .post(format!("{}/v1/deployments", node1.admin))
        .json(
            &json!({"url": handler, "services": [{"name": "pay", "handlers": [{"name": "run"}]}]}),
        )
        .send()
        .await
        .unwrap();
    assert!(registered.status().is_success());

    let response = client()
        .post(format!("{}/v1/send/pay/run", node1.url))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let id = response.json::<Value>().await.unwrap()["invocation_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let view = wait_final(&node1.url, &id).await;
    let answers = answers.lock().unwrap().clone();
    assert_eq!(
        (view["status"].as_str(), view["attempt"].as_u64()),
        (Some("completed"), Some(2)),
        "{view} {answers:#?}"
    );

    // Attempt 1: five requests reached the downstream, and attempt 2 none.
    let seen = seen.lock().unwrap().clone();
    let keys: Vec<&str> = seen.iter().map(|s| s.key.as_str()).collect();
    println!("keys seen by the downstream: {keys:#?}");
    let of_item = |item: &str| -> Vec<&str> {
        let body = format!(r#"{{"item":"{item}"}}"#);
        seen.iter()
            .filter(|s| s.body == body)
            .map(|s| s.key.as_str())
            .collect()
    };
    let (a, b) = (of_item("a"), of_item("b"));
    assert_eq!(
        a.len(),
        2,
        "both identical calls, through node 1 and node 2, reach the downstream: {seen:#?} {answers:#?}"
    );
    assert_ne!(
        a[0], a[1],
        "two identical calls of one attempt, through two nodes, share a key"
    );
    assert!(b.len() >= 3, "b1, b2 and b2 sent again: {seen:#?}");
    assert_eq!(
        b[1], b[2],
        "the call sent again through the other node after its answer was lost got another key"
    );
    assert_ne!(
        b[0], b[2],
        "the call sent again took the key of the first identical call"
    );
    assert_eq!(seen.len(), 5, "{seen:#?}");

    let of = |attempt: u32, call: &str| {
        answers
            .iter()
            .find(|a| a.attempt == attempt && a.call == call)
            .unwrap_or_else(|| panic!("no answer of {call} in attempt {attempt}: {answers:#?}"))
            .clone()
    };
    for call in ["a1", "a2", "b1", "b2 again"] {
        let answer = of(1, call);
        assert_eq!((answer.status, answer.replayed), (200, false), "{answer:?}");
    }
    assert_eq!(of(1, "b2").status, 0, "the handler hung up on b2");

    // Attempt 2 makes the same calls and gets each from the journal, b2 the answer its
    // second try got; nothing new reached the downstream.
    for (call, recorded) in [("a1", "a1"), ("a2", "a2"), ("b1", "b1"), ("b2", "b2 again")] {
        let (replay, first) = (of(2, call), of(1, recorded));
        assert_eq!((replay.status, replay.replayed), (200, true), "{replay:?}");
        assert_eq!(replay.body, first.body, "{call}");
    }
    assert!(
        !answers
            .iter()
            .any(|a| a.attempt == 2 && a.call == "b2 again"),
        "{answers:#?}"
    );
    let entries = journal(&node1.admin, &id).await;
    let kinds: Vec<&str> = entries
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["input", "egress", "egress", "egress", "egress", "output"],
        "{entries:#?}"
    );
    db.close().await;
}

async fn serve_router(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    url
}
