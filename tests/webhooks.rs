//! Webhooks with real HTTP: a Stripe source starts a billing workflow by the customer id
//! in the event and signals it when the invoice is paid; a GitHub source sends each push
//! to a handler. Deliveries signed as the providers sign them are taken once (a
//! redelivery is answered the same, marked a duplicate), forged, stale or malformed ones
//! are refused with nothing done, an event type no route takes is acknowledged, and the
//! admin API lists what each source received.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use durin::webhooks::verify::sign;
use durin::webhooks::{RouteConfig, SourceConfig};
use durin_sdk::{Context, Endpoint, HandlerError, Service};
use serde_json::{json, Value};
use support::{client, eventually, get_json, register, InProcess};

const STRIPE_SECRET: &str = "whsec_stripe_test";
const GITHUB_SECRET: &str = "github-test";

fn route(event_type: Option<&str>) -> RouteConfig {
    RouteConfig {
        event_type: event_type.map(str::to_owned),
        start: None,
        signal: None,
        workflow: None,
        with_start: false,
        send: None,
        id: None,
    }
}

fn sources() -> Vec<SourceConfig> {
    vec![
        SourceConfig {
            source: "stripe".into(),
            scheme: "stripe".into(),
            // The old secret and the new one, while it is rotated.
            secrets: vec!["whsec_old".into(), STRIPE_SECRET.into()],
            header: None,
            prefix: None,
            tolerance: None,
            event_id: None,
            event_type: None,
            routes: vec![
                RouteConfig {
                    start: Some("billing".into()),
                    id: Some("/data/object/customer".into()),
                    ..route(Some("invoice.created"))
                },
                RouteConfig {
                    signal: Some("paid".into()),
                    workflow: Some("billing".into()),
                    id: Some("/data/object/customer".into()),
                    ..route(Some("invoice.paid"))
                },
            ],
        },
        SourceConfig {
            source: "github".into(),
            scheme: "github".into(),
            secrets: vec![GITHUB_SECRET.into()],
            header: None,
            prefix: None,
            tolerance: None,
            event_id: None,
            event_type: None,
            routes: vec![RouteConfig {
                send: Some("hooks/push".into()),
                ..route(Some("push"))
            }],
        },
    ]
}

/// The billing workflow waits for its invoice to be paid; `hooks/push` counts pushes.
async fn serve(pushes: Arc<AtomicU32>) -> String {
    let endpoint = Endpoint::new()
        .service(Service::new("billing").handler(
            "run",
            |ctx: Context, invoice: Value| async move {
                let paid: Value = ctx.signal("paid").await?;
                Ok::<_, HandlerError>(json!({
                    "customer": invoice["data"]["object"]["customer"],
                    "paid": paid["id"],
                }))
            },
        ))
        .service(
            Service::new("hooks").handler("push", move |_: Context, push: Value| {
                let pushes = Arc::clone(&pushes);
                async move {
                    pushes.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, HandlerError>(push["ref"].clone())
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, endpoint.router()).await });
    url
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

async fn stripe(
    gateway: &InProcess,
    event: &Value,
    signature: Option<String>,
) -> reqwest::Response {
    let body = serde_json::to_vec(event).unwrap();
    let signature = signature.unwrap_or_else(|| sign::stripe(STRIPE_SECRET, now_s(), &body));
    client()
        .post(format!("{}/v1/webhooks/stripe", gateway.url))
        .header("content-type", "application/json")
        .header("stripe-signature", signature)
        .body(body)
        .send()
        .await
        .unwrap()
}

fn invoice(id: &str, kind: &str, customer: &str) -> Value {
    json!({"id": id, "type": kind, "data": {"object": {"customer": customer}}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_deliveries_start_and_signal_workflows_once_and_forged_ones_do_nothing() {
    let gateway = InProcess::start(|config| config.webhooks = sources()).await;
    let pushes = Arc::new(AtomicU32::new(0));
    register(&gateway.admin, &serve(Arc::clone(&pushes)).await).await;

    // invoice.created starts billing/cus_1, answered at once.
    let created = invoice("evt_1", "invoice.created", "cus_1");
    let answer = stripe(&gateway, &created, None).await;
    assert_eq!(answer.status(), 202);
    assert_eq!(answer.headers()["durin-webhook-duplicate"], "false");
    let first: Value = answer.json().await.unwrap();
    let run = first["invocation_id"].as_str().unwrap().to_owned();
    // Stripe sends it again: the same answer, marked a duplicate, no second run.
    let again = stripe(&gateway, &created, None).await;
    assert!(again.status().is_success(), "{}", again.status());
    assert_eq!(again.headers()["durin-webhook-duplicate"], "true");
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["invocation_id"], json!(run));

    // Forged, stale, unsigned: 401 problems, and nothing is done.
    let forged = stripe(
        &gateway,
        &invoice("evt_2", "invoice.paid", "cus_1"),
        Some(sign::stripe("whsec_wrong", now_s(), b"{}")),
    )
    .await;
    assert_eq!(forged.status(), 401);
    assert_eq!(forged.headers()["content-type"], "application/problem+json");
    let problem: Value = forged.json().await.unwrap();
    assert_eq!(problem["type"], "urn:durin:problem:webhook-refused");
    let paid = invoice("evt_3", "invoice.paid", "cus_1");
    let body = serde_json::to_vec(&paid).unwrap();
    let stale = stripe(
        &gateway,
        &paid,
        Some(sign::stripe(STRIPE_SECRET, now_s() - 3600, &body)),
    )
    .await;
    assert_eq!(stale.status(), 401);
    let unsigned = client()
        .post(format!("{}/v1/webhooks/stripe", gateway.url))
        .json(&paid)
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status(), 401);
    let view = get_json(&format!("{}/v1/invocations/{run}", gateway.url)).await;
    assert_ne!(
        view["status"], "completed",
        "a refused delivery signalled: {view}"
    );

    // A malformed event: 400, saying what is missing.
    let answer = stripe(
        &gateway,
        &json!({"id": "evt_4", "type": "invoice.paid", "data": {}}),
        None,
    )
    .await;
    assert_eq!(answer.status(), 400);
    let problem: Value = answer.json().await.unwrap();
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("/data/object/customer"),
        "{problem}"
    );
    // A type no route takes: acknowledged, nothing done.
    let answer = stripe(
        &gateway,
        &invoice("evt_5", "customer.updated", "cus_1"),
        None,
    )
    .await;
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.json::<Value>().await.unwrap()["ignored"], true);

    // invoice.paid (signed with the old secret, still accepted) signals the run, once.
    let answer = stripe(
        &gateway,
        &paid,
        Some(sign::stripe("whsec_old", now_s(), &body)),
    )
    .await;
    assert!(answer.status().is_success(), "{}", answer.status());
    let again = stripe(&gateway, &paid, None).await;
    assert_eq!(again.headers()["durin-webhook-duplicate"], "true");
    let done = eventually(Duration::from_secs(20), "billing to complete", || async {
        let view = get_json(&format!("{}/v1/invocations/{run}", gateway.url)).await;
        (view["status"] == "completed").then_some(view)
    })
    .await;
    assert_eq!(
        done["output"],
        json!({"customer": "cus_1", "paid": "evt_3"})
    );

    // GitHub: each push is sent to hooks/push, a redelivery is not sent again.
    let push = serde_json::to_vec(&json!({"ref": "refs/heads/main"})).unwrap();
    let deliver = || {
        client()
            .post(format!("{}/v1/webhooks/github", gateway.url))
            .header("content-type", "application/json")
            .header("x-github-event", "push")
            .header("x-github-delivery", "d-1")
            .header("x-hub-signature-256", sign::github(GITHUB_SECRET, &push))
            .body(push.clone())
            .send()
    };
    let first: Value = deliver().await.unwrap().json().await.unwrap();
    let second = deliver().await.unwrap();
    assert_eq!(second.headers()["durin-webhook-duplicate"], "true");
    let second: Value = second.json().await.unwrap();
    assert_eq!(first["invocation_id"], second["invocation_id"]);
    eventually(
        Duration::from_secs(20),
        "the push to be handled",
        || async { (pushes.load(Ordering::SeqCst) == 1).then_some(()) },
    )
    .await;

    // What each source received, newest first.
    let listed = get_json(&format!("{}/v1/webhooks/stripe/deliveries", gateway.admin)).await;
    let outcomes: Vec<&str> = listed["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        outcomes,
        [
            "duplicate",
            "accepted",
            "ignored",
            "refused",
            "refused",
            "refused",
            "refused",
            "duplicate",
            "accepted"
        ]
    );
    let sources = get_json(&format!("{}/v1/webhooks", gateway.admin)).await;
    assert_eq!(sources["sources"][0]["source"], "github");
    assert_eq!(sources["sources"][1]["recent"]["refused"], 4);
    // The same from the command line.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_durin"))
        .args([
            "webhooks",
            "deliveries",
            "github",
            "--admin-url",
            &gateway.admin,
        ])
        .output()
        .unwrap();
    assert!(output.status.success());
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        printed.contains("duplicate") && printed.contains("d-1"),
        "{printed}"
    );
    // Unknown sources are 404s.
    let unknown = client()
        .post(format!("{}/v1/webhooks/nobody", gateway.url))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    gateway.stop().await;
}

#[tokio::test]
async fn a_source_that_cannot_work_stops_durin_at_start() {
    let mut broken = sources();
    broken[0].routes[0].id = None;
    let mut config = durin::config::Config {
        webhooks: broken,
        ..durin::config::Config::default()
    };
    config.database_url = "sqlite::memory:".into();
    let listeners = durin::Listeners {
        api: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        admin: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    };
    let error = durin::run(
        config,
        listeners,
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(
        error.to_string().contains("says where its `id` is"),
        "{error}"
    );
}
