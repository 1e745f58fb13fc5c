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
use support::{client, delivery_outcomes, eventually, get_json, register, GatewayHome, InProcess};

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
    let outcomes = delivery_outcomes(&gateway.admin, "stripe").await;
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

/// A GitHub push to source `name` of the gateway at `url`, signed with `secret`.
async fn push(url: &str, name: &str, delivery: &str, secret: &str) -> reqwest::Response {
    let push = serde_json::to_vec(&json!({"ref": format!("refs/heads/{delivery}")})).unwrap();
    client()
        .post(format!("{url}/v1/webhooks/{name}"))
        .header("content-type", "application/json")
        .header("x-github-event", "push")
        .header("x-github-delivery", delivery)
        .header("x-hub-signature-256", sign::github(secret, &push))
        .body(push)
        .send()
        .await
        .unwrap()
}

/// A source set through the admin API, with the real `durin` binary: it takes deliveries
/// at once and never shows its secrets; a declaration that cannot work is refused and
/// changes nothing; the source and its deliveries outlive a SIGKILL of Durin (a
/// redelivery after the restart is a duplicate); a second secret rotates in and the first
/// out; a source the config file declares is changed only there (409); a deleted source's
/// deliveries are 404s.
#[tokio::test]
async fn a_source_set_through_the_admin_api_outlives_a_kill_and_rotates_its_secret() {
    let pushes = Arc::new(AtomicU32::new(0));
    let deployment = serve(Arc::clone(&pushes)).await;
    let home = GatewayHome::new();
    std::fs::write(
        home.config(),
        "[[webhooks]]\nsource = \"declared\"\nscheme = \"github\"\nsecrets = [\"c\"]\n\
         [[webhooks.routes]]\ntype = \"push\"\nsend = \"hooks/push\"\n",
    )
    .unwrap();
    let mut durin = home.start(None);
    let (url, admin) = (durin.url.clone(), durin.admin.clone());
    register(&admin, &deployment).await;
    let put = |body: Value| {
        client()
            .put(format!("{admin}/v1/webhooks/gh"))
            .json(&body)
            .send()
    };
    let routes = json!([{"type": "push", "send": "hooks/push"}]);

    let created = put(json!({"scheme": "github", "secrets": ["first-secret"], "routes": routes}))
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let created = created.text().await.unwrap();
    assert!(!created.contains("first-secret"), "{created}");
    let created: Value = serde_json::from_str(&created).unwrap();
    assert_eq!(created["declared"]["secrets"], 1, "{created}");
    assert_eq!(created["origin"], "api", "{created}");
    let refused = put(json!({"scheme": "nope", "secrets": ["x"], "routes": routes}))
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    let problem: Value = refused.json().await.unwrap();
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("unknown scheme"),
        "{problem}"
    );
    let shown = get_json(&format!("{admin}/v1/webhooks/gh")).await;
    assert_eq!(shown["declared"]["scheme"], "github", "{shown}");

    let first = push(&url, "gh", "d-1", "first-secret").await;
    assert_eq!(first.status(), 202);
    assert_eq!(first.headers()["durin-webhook-duplicate"], "false");
    let first: Value = first.json().await.unwrap();
    // Completed (as Durin recorded it) before the kill, so that it does not run again.
    let done = support::wait_final(&url, first["invocation_id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(pushes.load(Ordering::SeqCst), 1);

    // Killed and started again: the source and what it received are still there.
    durin.kill();
    let address: std::net::SocketAddr = url.trim_start_matches("http://").parse().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut durin = home.start(Some(address));
    let admin = durin.admin.clone();
    let outcomes = delivery_outcomes(&admin, "gh").await;
    assert_eq!(outcomes, ["accepted"]);
    let again = push(&url, "gh", "d-1", "first-secret").await;
    assert_eq!(again.status(), 202);
    assert_eq!(again.headers()["durin-webhook-duplicate"], "true");

    // A second secret rotates in, then the first out.
    let put = |body: Value| {
        client()
            .put(format!("{admin}/v1/webhooks/gh"))
            .json(&body)
            .send()
    };
    let both =
        json!({"scheme": "github", "secrets": ["first-secret", "second-secret"], "routes": routes});
    assert_eq!(put(both).await.unwrap().status(), 200);
    assert_eq!(push(&url, "gh", "d-2", "second-secret").await.status(), 202);
    assert_eq!(push(&url, "gh", "d-3", "first-secret").await.status(), 202);
    let second = json!({"scheme": "github", "secrets": ["second-secret"], "routes": routes});
    assert_eq!(put(second).await.unwrap().status(), 200);
    assert_eq!(push(&url, "gh", "d-4", "first-secret").await.status(), 401);
    eventually(
        Duration::from_secs(20),
        "the pushes to be handled",
        || async { (pushes.load(Ordering::SeqCst) == 3).then_some(()) },
    )
    .await;
    let listed = get_json(&format!("{admin}/v1/webhooks")).await;
    let gh = listed["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["source"] == "gh")
        .unwrap();
    assert_eq!(gh["recent"]["accepted"], 3, "{gh}");
    assert_eq!(gh["recent"]["duplicate"], 1, "{gh}");
    assert_eq!(gh["recent"]["refused"], 1, "{gh}");

    // Forgeries cost no write beyond 10 a second: all refused, not all kept.
    for n in 0..25 {
        let forged = push(&url, "gh", &format!("f-{n}"), "not-the-secret").await;
        assert_eq!(forged.status(), 401);
    }
    let listed = get_json(&format!("{admin}/v1/webhooks/gh")).await;
    let refused = listed["recent"]["refused"].as_u64().unwrap();
    assert!((10..25).contains(&refused), "{refused} refusals kept of 26");

    // The config's source is the config's.
    let declared = client()
        .put(format!("{admin}/v1/webhooks/declared"))
        .json(&json!({"scheme": "github", "secrets": ["x"], "routes": routes}))
        .send()
        .await
        .unwrap();
    assert_eq!(declared.status(), 409);
    let deleted = client()
        .delete(format!("{admin}/v1/webhooks/declared"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 409);
    assert_eq!(push(&url, "declared", "d-5", "c").await.status(), 202);

    // Deleted: its deliveries are 404s.
    let deleted = client()
        .delete(format!("{admin}/v1/webhooks/gh"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    assert_eq!(push(&url, "gh", "d-6", "second-secret").await.status(), 404);
    let gone = client()
        .get(format!("{admin}/v1/webhooks/gh"))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 404);
    durin.kill();
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
