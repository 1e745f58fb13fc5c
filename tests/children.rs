//! Child invocations, in-process (`durin::run` on port 0, a real SQLite file) with a real
//! SDK deployment: a `call` starts its child once and gives the parent its output or its
//! failure; a `send` starts one later without waiting; parent and child link each other.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use durin_sdk::{Context, Endpoint, HandlerError, Service};
use serde_json::{json, Value};
use support::{client, get_json, journal, register, wait_final, InProcess};

#[derive(Default)]
struct Counts {
    echo: AtomicU32,
    note: AtomicU32,
}

fn endpoint(counts: Arc<Counts>) -> Endpoint {
    let echo_counts = Arc::clone(&counts);
    let note_counts = Arc::clone(&counts);
    let children = Service::new("child")
        .handler("echo", move |ctx: Context, text: String| {
            let counts = Arc::clone(&echo_counts);
            async move {
                ctx.run("count", || async {
                    counts.echo.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                })
                .await?;
                Ok::<_, HandlerError>(format!("echo {text}"))
            }
        })
        .handler("note", move |_ctx: Context, _: Value| {
            let counts = Arc::clone(&note_counts);
            async move {
                counts.note.fetch_add(1, Ordering::SeqCst);
                Ok::<_, HandlerError>(())
            }
        })
        .handler("refuse", |_ctx: Context, _: Value| async {
            Err::<(), _>(
                HandlerError::terminal_with_status(422, "card declined").with_type("Declined"),
            )
        });
    let parent = Service::new("parent").handler("run", |ctx: Context, text: String| async move {
        let echoed: String = ctx.call("child", "echo", &text).await?;
        let refused = match ctx.call::<_, Value>("child", "refuse", &()).await {
            Ok(_) => "accepted".to_owned(),
            Err(e) => format!("{}: {}", e.error_type().unwrap_or_default(), e.message()),
        };
        let noted = ctx
            .send("child", "note", &text, Some(Duration::from_millis(300)))
            .await?;
        Ok::<_, HandlerError>(json!({"echoed": echoed, "refused": refused, "noted": noted}))
    });
    Endpoint::new().service(children).service(parent)
}

#[tokio::test]
async fn a_call_runs_its_child_once_and_a_send_starts_one_later() {
    let server = InProcess::start(|_| {}).await;
    let (url, admin) = (server.url.clone(), server.admin.clone());
    let counts = Arc::new(Counts::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let deployment = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(endpoint(Arc::clone(&counts)).serve(listener));
    register(&admin, &deployment).await;

    let started = Instant::now();
    let response = client()
        .post(format!("{url}/v1/call/parent/run"))
        .json(&"hello")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let parent_id = response.headers()["durin-invocation-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let output: Value = response.json().await.unwrap();
    assert_eq!(output["echoed"], "echo hello");
    assert_eq!(output["refused"], "Declined: card declined");
    assert_eq!(counts.echo.load(Ordering::SeqCst), 1, "the child ran once");

    // The parent's journal names each child and holds its result.
    let entries = journal(&admin, &parent_id).await;
    let calls: Vec<&Value> = entries.iter().filter(|e| e["kind"] == "call").collect();
    assert_eq!(calls.len(), 2, "{entries:#?}");
    assert_eq!(calls[0]["name"], "child/echo");
    let echo_id = calls[0]["value"]["invocation_id"].as_str().unwrap();
    assert_eq!(
        calls[0]["completion"]["value"], "echo hello",
        "{:#?}",
        calls[0]
    );
    assert_eq!(calls[1]["completion"]["failure"]["type"], "Declined");
    let echo = get_json(&format!("{url}/v1/invocations/{echo_id}")).await;
    assert_eq!(echo["status"], "completed");
    assert_eq!(echo["parent_invocation_id"], parent_id.as_str());
    assert_eq!(echo["parent_index"], calls[0]["index"]);

    // The send did not hold the parent up; its child starts 300 ms after it was sent.
    let sent = entries.iter().find(|e| e["kind"] == "send").unwrap();
    let note_id = sent["value"]["invocation_id"].as_str().unwrap();
    assert_eq!(output["noted"], note_id);
    let note = wait_final(&url, note_id).await;
    assert_eq!(note["status"], "completed", "{note}");
    assert_eq!(note["parent_invocation_id"], parent_id.as_str());
    assert!(
        note.get("parent_index").is_none(),
        "nobody waits for a send: {note}"
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(counts.note.load(Ordering::SeqCst), 1);
    server.stop().await;
}

/// A call to a handler no deployment serves is refused before anything is written; the
/// invocation fails with a reason that names it.
#[tokio::test]
async fn a_call_to_an_unknown_handler_fails_the_caller_clearly() {
    let server = InProcess::start(|_| {}).await;
    let (url, admin) = (server.url.clone(), server.admin.clone());
    let endpoint = Endpoint::new().service(
        Service::new("lonely").handler("run", |ctx: Context, _: Value| async move {
            ctx.call::<_, Value>("nobody", "home", &1).await
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let deployment = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(endpoint.serve(listener));
    register(&admin, &deployment).await;
    let response = client()
        .post(format!("{url}/v1/call/lonely/run"))
        .json(&1)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let problem: Value = response.json().await.unwrap();
    assert_eq!(status, 500, "{problem}");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("no deployment serves nobody/home"),
        "{problem}"
    );
    let list = get_json(&format!("{admin}/v1/invocations")).await;
    assert_eq!(list["invocations"].as_array().unwrap().len(), 1, "{list}");
    server.stop().await;
}

/// A parent cancelled or terminated while it waits for a child takes the child with it; a
/// child it only sent goes on.
#[tokio::test]
async fn cancel_and_terminate_reach_the_children_a_parent_waits_for() {
    let server = InProcess::start(|_| {}).await;
    let (url, admin) = (server.url.clone(), server.admin.clone());
    let children = Service::new("slow").handler("nap", |ctx: Context, _: Value| async move {
        ctx.sleep(Duration::from_secs(3600)).await?;
        Ok::<_, HandlerError>("rested")
    });
    let parents = Service::new("boss").handler("run", |ctx: Context, _: Value| async move {
        ctx.send("slow", "nap", &(), None).await?;
        ctx.call::<_, String>("slow", "nap", &()).await
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let deployment = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        Endpoint::new()
            .service(children)
            .service(parents)
            .serve(listener),
    );
    register(&admin, &deployment).await;

    for verb in ["cancel", "terminate"] {
        let response = client()
            .post(format!("{url}/v1/send/boss/run"))
            .json(&())
            .send()
            .await
            .unwrap();
        let parent = response.json::<Value>().await.unwrap()["invocation_id"]
            .as_str()
            .unwrap()
            .to_owned();
        let (sent, called) = support::eventually(
            Duration::from_secs(10),
            "both children to sleep",
            || async {
                let entries = journal(&admin, &parent).await;
                let id = |kind: &str| {
                    entries
                        .iter()
                        .find(|e| e["kind"] == kind)
                        .and_then(|e| e["value"]["invocation_id"].as_str())
                        .map(str::to_owned)
                };
                let (sent, called) = (id("send")?, id("call")?);
                let asleep = |child: &str| {
                    let url = format!("{url}/v1/invocations/{child}");
                    async move { get_json(&url).await["status"] == "suspended" }
                };
                (asleep(&sent).await && asleep(&called).await).then_some((sent, called))
            },
        )
        .await;
        let base = if verb == "cancel" { &url } else { &admin };
        let answer = client()
            .post(format!("{base}/v1/invocations/{parent}/{verb}"))
            .send()
            .await
            .unwrap();
        assert!(answer.status().is_success(), "{verb}: {}", answer.status());
        let ended = if verb == "cancel" {
            "cancelled"
        } else {
            "terminated"
        };
        assert_eq!(wait_final(&url, &parent).await["status"], ended);
        assert_eq!(wait_final(&url, &called).await["status"], ended, "{verb}");
        let sent_view = get_json(&format!("{url}/v1/invocations/{sent}")).await;
        assert_eq!(
            sent_view["status"], "suspended",
            "a sent child goes on: {sent_view}"
        );
    }
    server.stop().await;
}

/// A plain handler (no SDK) calls a child through the context API: the first call starts
/// it and suspends the attempt; Durin calls the handler again when the child has ended,
/// and the same call answers the child's output. A send answers the same child id every
/// time.
#[tokio::test]
async fn a_plain_handler_calls_and_sends_children_through_the_context_api() {
    use axum::http::HeaderMap;
    let server = InProcess::start(|_| {}).await;
    let (url, admin) = (server.url.clone(), server.admin.clone());
    let counts = Arc::new(Counts::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sdk = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(endpoint(Arc::clone(&counts)).serve(listener));
    register(&admin, &sdk).await;

    let gateway = url.clone();
    let attempts = Arc::new(AtomicU32::new(0));
    let seen = Arc::clone(&attempts);
    let plain = axum::Router::new().route(
        "/plain/run",
        axum::routing::post(move |headers: HeaderMap| {
            let gateway = gateway.clone();
            let seen = Arc::clone(&seen);
            async move {
                seen.fetch_add(1, Ordering::SeqCst);
                let header = |name: &str| headers[name].to_str().unwrap().to_owned();
                let id = header("durin-invocation-id");
                let context = |path: &str| {
                    client()
                        .post(format!("{gateway}/v1/contexts/{id}/{path}"))
                        .header("durin-attempt", header("durin-attempt"))
                        .header("durin-attempt-token", header("durin-attempt-token"))
                };
                let sent: Value = context("sends/note")
                    .json(&json!({"service": "child", "handler": "note", "input": "x"}))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                let called = context("calls/greet")
                    .json(&json!({"service": "child", "handler": "echo", "input": "plain"}))
                    .send()
                    .await
                    .unwrap();
                if called.headers().contains_key("durin-suspended") {
                    return (axum::http::StatusCode::SERVICE_UNAVAILABLE, String::new());
                }
                let called: Value = called.json().await.unwrap();
                let answer = json!({"value": called["value"], "sent": sent["invocation_id"]});
                (axum::http::StatusCode::OK, answer.to_string())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let plain_url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, plain).await });
    let registered = client()
        .post(format!("{admin}/v1/deployments"))
        .json(&json!({"url": plain_url, "services": [{"name": "plain", "handlers": [{"name": "run"}]}]}))
        .send()
        .await
        .unwrap();
    assert!(registered.status().is_success());

    let response = client()
        .post(format!("{url}/v1/call/plain/run"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let output: Value = response.json().await.unwrap();
    assert_eq!(output["value"], "echo plain", "{output}");
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        2,
        "suspended once, then answered"
    );
    assert_eq!(counts.echo.load(Ordering::SeqCst), 1, "one child");
    let note = wait_final(&url, output["sent"].as_str().unwrap()).await;
    assert_eq!(note["status"], "completed");
    assert_eq!(counts.note.load(Ordering::SeqCst), 1, "one sent child");
    server.stop().await;
}

/// A plain workflow continues as new through the context API: each run hands the next its
/// input, the workflow id follows the runs, and the long-poll answers the last run's output.
#[tokio::test]
async fn a_plain_workflow_continues_as_new_through_the_context_api() {
    use axum::http::HeaderMap;
    let server = InProcess::start(|_| {}).await;
    let (url, admin) = (server.url.clone(), server.admin.clone());
    let gateway = url.clone();
    let plain = axum::Router::new().route(
        "/looper/run",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let gateway = gateway.clone();
            async move {
                let input: Value = serde_json::from_slice(&body).unwrap();
                let n = input["n"].as_u64().unwrap();
                if n >= 3 {
                    return (axum::http::StatusCode::OK, json!(n).to_string());
                }
                let header = |name: &str| headers[name].to_str().unwrap().to_owned();
                let next = client()
                    .post(format!(
                        "{gateway}/v1/contexts/{}/continue-as-new",
                        header("durin-invocation-id")
                    ))
                    .header("durin-attempt", header("durin-attempt"))
                    .header("durin-attempt-token", header("durin-attempt-token"))
                    .json(&json!({"n": n + 1}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(next.status(), 200);
                (axum::http::StatusCode::OK, "continued".to_owned())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let plain_url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, plain).await });
    let registered = client()
        .post(format!("{admin}/v1/deployments"))
        .json(&json!({"url": plain_url, "services": [{"name": "looper", "handlers": [{"name": "run"}]}]}))
        .send()
        .await
        .unwrap();
    assert!(registered.status().is_success());

    let done = client()
        .post(format!("{url}/v1/workflows/looper/l-1"))
        .header("prefer", "wait=20")
        .json(&json!({"n": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), 200);
    assert_eq!(done.json::<Value>().await.unwrap(), json!(3));
    let runs = get_json(&format!("{url}/v1/workflows/looper/l-1/runs")).await["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap().to_owned())
        .collect::<Vec<_>>();
    assert_eq!(runs, ["continued", "continued", "continued", "completed"]);
    server.stop().await;
}

/// Child workflows by id, with their parent-close policies: when the parent ends, a child
/// it abandons goes on, one it terminates is terminated, one it cancels is cancelled; and
/// a child workflow whose id names a run that goes on is not started: the parent gets a
/// `WorkflowIdTaken` failure, journaled, so every replay agrees.
#[tokio::test]
async fn child_workflows_by_id_follow_their_parent_close_policy() {
    use durin_sdk::ParentClose;
    let server = InProcess::start(|_| {}).await;
    let (url, admin) = (server.url.clone(), server.admin.clone());
    let workers = Service::new("worker").handler("run", |ctx: Context, _: Value| async move {
        ctx.sleep(Duration::from_secs(3600)).await?;
        Ok::<_, HandlerError>("rested")
    });
    let parents = Service::new("lead")
        .handler("run", |ctx: Context, _: Value| async move {
            for (id, policy) in [
                ("w-1", ParentClose::Abandon),
                ("w-2", ParentClose::Terminate),
                ("w-3", ParentClose::Cancel),
            ] {
                ctx.start_workflow("worker", id, &(), policy).await?;
            }
            Ok::<_, HandlerError>("started")
        })
        .handler("again", |ctx: Context, _: Value| async move {
            match ctx
                .call_workflow::<_, Value>("worker", "w-1", &(), ParentClose::Cancel)
                .await
            {
                Ok(_) => Ok::<_, HandlerError>("started".to_owned()),
                Err(e) => Ok(format!(
                    "{}: {}",
                    e.error_type().unwrap_or_default(),
                    e.message()
                )),
            }
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let deployment = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        Endpoint::new()
            .service(workers)
            .service(parents)
            .serve(listener),
    );
    register(&admin, &deployment).await;

    let lead = client()
        .post(format!("{url}/v1/call/lead/run"))
        .json(&())
        .send()
        .await
        .unwrap();
    assert_eq!(lead.status(), 200);
    let lead_id = lead.headers()["durin-invocation-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let run = |id: &'static str| {
        let url = format!("{url}/v1/workflows/worker/{id}");
        async move { get_json(&url).await }
    };
    let w2 = support::eventually(Duration::from_secs(10), "w-2 to be terminated", || async {
        let view = run("w-2").await;
        (view["status"] == "terminated").then_some(view)
    })
    .await;
    assert_eq!(w2["parent_invocation_id"], lead_id.as_str());
    assert!(
        w2["failure"]["message"]
            .as_str()
            .unwrap()
            .contains("closed"),
        "{w2}"
    );
    support::eventually(Duration::from_secs(10), "w-3 to be cancelled", || async {
        (run("w-3").await["status"] == "cancelled").then_some(())
    })
    .await;
    // Abandoned, it goes on: its attempt may still be on its way to the
    // sleep, so wait for it to suspend there rather than catch it running.
    let w1 = support::eventually(Duration::from_secs(10), "w-1 to sleep", || async {
        let view = run("w-1").await;
        match view["status"].as_str() {
            Some("running") => None,
            _ => Some(view),
        }
    })
    .await;
    assert_eq!(w1["status"], "suspended", "abandoned, it goes on: {w1}");

    let again = client()
        .post(format!("{url}/v1/call/lead/again"))
        .json(&())
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    let said: String = again.json().await.unwrap();
    assert!(said.starts_with("WorkflowIdTaken: "), "{said}");
    assert_eq!(
        run("w-1").await["id"],
        w1["id"],
        "w-1 still names its first run"
    );
    server.stop().await;
}
