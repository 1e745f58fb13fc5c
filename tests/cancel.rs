//! Cancellation and termination, in-process (`durin::run` on port 0, a real SQLite file)
//! with the order example and a downstream that counts side effects: a cancelled order
//! compensates what it started (a saga) and ends cancelled; a terminated workflow ends at
//! once; repeats say what happened; bad requests change nothing.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use support::{
    client, journal, register, send_order, shape, wait_final, Downstream, InProcess, ORDER,
};

/// The in-process gateway, with the requests these tests make.
struct Gateway(InProcess);

impl std::ops::Deref for Gateway {
    type Target = InProcess;
    fn deref(&self) -> &InProcess {
        &self.0
    }
}

impl Gateway {
    async fn start() -> Gateway {
        Gateway(InProcess::start(|_| {}).await)
    }

    async fn stop(self) {
        self.0.stop().await;
    }

    async fn post(&self, base: &str, path: &str, body: Value) -> (u16, Value) {
        let response = client()
            .post(format!("{base}{path}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }
}

/// Serves the order example with `step_delay_ms` before each step, its side effects going
/// to `downstream`; returns its URL.
async fn serve_order(step_delay_ms: u64, downstream: &Downstream) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let args = order_example::Args {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        step_delay_ms,
        downstream: Some(downstream.url.clone()),
        step_retry_initial_ms: 20,
        reserve_first: false,
    };
    tokio::spawn(order_example::endpoint(args).serve(listener));
    url
}

#[tokio::test]
async fn a_cancelled_order_compensates_in_reverse_and_ends_cancelled() {
    let gateway = Gateway::start().await;
    let downstream = Downstream::start(&[]).await;
    register(&gateway.admin, &serve_order(400, &downstream).await).await;
    let id = send_order(&gateway.url, ORDER).await;
    support::wait_for_step(&gateway.admin, &id, "charge_payment").await;

    // Cancelled while `reserve_inventory` runs (each step waits 400 ms first).
    let (status, body) = gateway
        .post(
            &gateway.url,
            &format!("/v1/invocations/{id}/cancel"),
            json!(null),
        )
        .await;
    assert_eq!(
        (status, &body["cancellation"]),
        (202, &json!("requested")),
        "{body}"
    );
    let (status, body) = gateway
        .post(
            &gateway.url,
            &format!("/v1/invocations/{id}/cancel"),
            json!(null),
        )
        .await;
    assert_eq!(
        (status, &body["cancellation"]),
        (202, &json!("already-requested")),
        "{body}"
    );

    let view = wait_final(&gateway.url, &id).await;
    assert_eq!(view["status"], "cancelled", "{view}");
    let entries = journal(&gateway.admin, &id).await;
    let names: Vec<(String, Option<String>)> = shape(&entries);
    let expected: Vec<(String, Option<String>)> = [
        ("input", None),
        ("step", Some("charge_payment")),
        ("cancel", None),
        ("step", Some("release_inventory")),
        ("step", Some("refund_payment")),
        ("output", None),
    ]
    .into_iter()
    .map(|(k, n)| (k.to_owned(), n.map(str::to_owned)))
    .collect();
    assert_eq!(names, expected, "{entries:#?}");
    let output = entries.last().unwrap();
    assert_eq!(output["failure"]["type"], "Cancelled", "{output}");
    assert_eq!(output["failure"]["status"], 409);

    // Each compensation happened once; the confirmation never did.
    assert_eq!(downstream.distinct_keys("charge_payment"), 1);
    assert_eq!(downstream.distinct_keys("release_inventory"), 1);
    assert_eq!(downstream.distinct_keys("refund_payment"), 1);
    assert_eq!(downstream.requests("refund_payment").len(), 1);
    assert!(downstream.requests("send_confirmation").is_empty());

    // The caller sees the cancellation; a repeat says it is done.
    let response = client()
        .get(format!("{}/v1/invocations/{id}", gateway.url))
        .send()
        .await
        .unwrap();
    let view: Value = response.json().await.unwrap();
    assert_eq!(view["status"], "cancelled");
    let (status, body) = gateway
        .post(
            &gateway.url,
            &format!("/v1/invocations/{id}/cancel"),
            json!(null),
        )
        .await;
    assert_eq!(
        (status, &body["cancellation"]),
        (200, &json!("already-cancelled")),
        "{body}"
    );
    gateway.stop().await;
}

#[tokio::test]
async fn a_terminated_workflow_ends_at_once_and_wakes_its_caller() {
    let gateway = Gateway::start().await;
    let downstream = Downstream::start(&[]).await;
    register(&gateway.admin, &serve_order(0, &downstream).await).await;
    let (status, started) = gateway
        .post(
            &gateway.url,
            "/v1/workflows/approval/r-1",
            json!({"request": "r-1", "deadline_secs": 3600}),
        )
        .await;
    assert_eq!(status, 202, "{started}");
    let id = started["invocation_id"].as_str().unwrap().to_owned();
    support::eventually(Duration::from_secs(10), "the approval to wait", || async {
        let view = support::get_json(&format!("{}/v1/invocations/{id}", gateway.url)).await;
        (view["status"] == "suspended").then_some(())
    })
    .await;
    let url = gateway.url.clone();
    let waiting = {
        let id = id.clone();
        tokio::spawn(async move {
            client()
                .get(format!("{url}/v1/invocations/{id}"))
                .header("prefer", "wait=60")
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Terminate is an operator's verb: not on the main listener.
    let response = client()
        .post(format!(
            "{}/v1/workflows/approval/r-1/terminate",
            gateway.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let (status, body) = gateway
        .post(
            &gateway.admin,
            "/v1/workflows/approval/r-1/terminate",
            json!({"reason": "duplicate request"}),
        )
        .await;
    assert_eq!(
        (status, &body["termination"]),
        (200, &json!("terminated")),
        "{body}"
    );
    let view = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiting caller was woken")
        .unwrap();
    assert_eq!(view["status"], "terminated", "{view}");
    let entries = journal(&gateway.admin, &id).await;
    let output = entries.last().unwrap();
    assert_eq!(output["failure"]["type"], "Terminated");
    assert!(output["failure"]["message"]
        .as_str()
        .unwrap()
        .contains("duplicate request"));

    // Repeats say what happened and write nothing; a cancel after it is refused.
    let (status, body) = gateway
        .post(
            &gateway.admin,
            &format!("/v1/invocations/{id}/terminate"),
            json!(null),
        )
        .await;
    assert_eq!(
        (status, &body["termination"]),
        (200, &json!("already-terminated")),
        "{body}"
    );
    let (status, body) = gateway
        .post(
            &gateway.url,
            "/v1/workflows/approval/r-1/cancel",
            json!(null),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["type"], "urn:durin:problem:invocation-state");
    assert_eq!(journal(&gateway.admin, &id).await.len(), entries.len());
    gateway.stop().await;
}

#[tokio::test]
async fn cancelling_what_cannot_be_cancelled_is_a_clear_problem_and_writes_nothing() {
    let gateway = Gateway::start().await;
    let downstream = Downstream::start(&[]).await;
    register(&gateway.admin, &serve_order(0, &downstream).await).await;
    let done = client()
        .post(format!("{}/v1/call/order/process", gateway.url))
        .header("content-type", "application/json")
        .body(ORDER)
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), 200);
    let id = done.headers()["durin-invocation-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let before = journal(&gateway.admin, &id).await;

    let cases = [
        (
            format!("/v1/invocations/{id}/cancel"),
            409,
            "already ended as completed",
        ),
        (
            "/v1/invocations/inv_0193a2b4c5d6e7f8091a2b3c4d5e6f70/cancel".to_owned(),
            404,
            "not found",
        ),
        ("/v1/invocations/nope/cancel".to_owned(), 400, "inv_"),
        ("/v1/workflows/approval/none/cancel".to_owned(), 404, "none"),
    ];
    for (path, status, detail) in cases {
        let (got, body) = gateway.post(&gateway.url, &path, json!(null)).await;
        assert_eq!(got, status, "{path}: {body}");
        assert_eq!(body["retryable"], false, "{body}");
        assert!(
            body["detail"].as_str().unwrap().contains(detail),
            "{path}: {body}"
        );
    }
    let (status, body) = gateway
        .post(
            &gateway.admin,
            &format!("/v1/invocations/{id}/terminate"),
            json!([1]),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = gateway
        .post(
            &gateway.admin,
            &format!("/v1/invocations/{id}/terminate"),
            json!(null),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(journal(&gateway.admin, &id).await, before);
    let view = support::get_json(&format!("{}/v1/invocations/{id}", gateway.url)).await;
    assert_eq!(view["status"], "completed");
    gateway.stop().await;
}
