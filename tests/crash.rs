//! Durability proven by killing real processes with SIGKILL: the handler between steps, the
//! gateway between steps, and the gateway during a durable backoff.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::*;

/// The handler dies in the middle of the flow; Durin calls it again with the journal, the
/// recorded step is not run again, and the order completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_killed_between_steps_resumes_without_repeating_steps() {
    if !require_store() {
        return;
    }
    let downstream = Downstream::start(&[]).await;
    let home = GatewayHome::new();
    let gateway = home.start(None);
    let args = ["--step-delay-ms", "600", "--downstream", &downstream.url];
    let mut handler = start_order(None, &args);
    register(&gateway.admin, &handler.url).await;

    let id = send_order(&gateway.url, ORDER).await;
    wait_for_step(&gateway.admin, &id, "charge_payment").await;
    // The handler is now waiting before reserve_inventory's side effect.
    handler.kill();
    let _handler = start_order(Some(handler.addr), &args);

    let view = wait_final(&gateway.url, &id).await;
    assert_eq!(view["status"], "completed", "{view}");
    assert_eq!(view["output"], ORDER_OUTPUT);
    assert!(view["attempt"].as_u64().unwrap() >= 2, "{view}");
    let entries = journal(&gateway.admin, &id).await;
    assert_eq!(shape(&entries), order_journal_shape());
    assert_eq!(
        entries[1]["attempt"], 1,
        "charge_payment came from the first attempt"
    );
    assert!(entries[2]["attempt"].as_u64().unwrap() >= 2);
    for step in ["charge_payment", "reserve_inventory", "send_confirmation"] {
        assert_eq!(
            downstream.requests(step).len(),
            1,
            "{step} ran more than once"
        );
    }
}

/// Durin dies in the middle of the flow, and with it the caller's connection. After a
/// restart it resumes the invocation; the caller re-attaches with its Idempotency-Key and
/// gets the output; no completed step runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_killed_between_steps_resumes_and_the_caller_reattaches() {
    if !require_store() {
        return;
    }
    let downstream = Downstream::start(&[]).await;
    let home = GatewayHome::new();
    let mut gateway = home.start(None);
    let handler = start_order(
        None,
        &["--step-delay-ms", "600", "--downstream", &downstream.url],
    );
    register(&gateway.admin, &handler.url).await;

    let url = format!("{}/v1/call/order/process", gateway.url);
    let caller = tokio::spawn(async move {
        client()
            .post(url)
            .header("content-type", "application/json")
            .header("idempotency-key", "order-o-1")
            .body(ORDER)
            .send()
            .await
    });
    let id = eventually(Duration::from_secs(10), "the invocation", || async {
        let list = get_json(&format!("{}/v1/invocations", gateway.admin)).await;
        list["invocations"][0]["id"].as_str().map(str::to_owned)
    })
    .await;
    wait_for_step(&gateway.admin, &id, "charge_payment").await;
    gateway.kill();
    assert!(
        caller.await.unwrap().is_err(),
        "the caller's connection must drop with the gateway"
    );

    let gateway = home.start(Some(gateway.addr));
    let response = client()
        .post(format!("{}/v1/call/order/process", gateway.url))
        .header("content-type", "application/json")
        .header("idempotency-key", "order-o-1")
        .body(ORDER)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["durin-invocation-id"], id.as_str());
    assert_eq!(response.headers()["idempotent-replayed"], "true");
    assert_eq!(response.json::<String>().await.unwrap(), ORDER_OUTPUT);

    let entries = journal(&gateway.admin, &id).await;
    assert_eq!(shape(&entries), order_journal_shape());
    assert_eq!(downstream.requests("charge_payment").len(), 1);
    assert_eq!(downstream.requests("send_confirmation").len(), 1);
    // reserve_inventory was in flight when Durin died: the old attempt may still have sent
    // it before being fenced off, so a step runs at least once. Its idempotency key is the
    // same every time, so an API that honours it applies it once.
    let reserve = downstream.requests("reserve_inventory");
    assert!((1..=2).contains(&reserve.len()), "{reserve:?}");
    assert_eq!(downstream.distinct_keys("reserve_inventory"), 1);
}

/// A step fails and backs off for 2 s; Durin is killed during the backoff and restarted.
/// The schedule does not change: the retry happens when it was due, not earlier and not
/// from scratch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_killed_during_backoff_keeps_the_schedule() {
    if !require_store() {
        return;
    }
    let downstream = Downstream::start(&[("reserve_inventory", 1)]).await;
    let home = GatewayHome::new();
    let mut gateway = home.start(None);
    let handler = start_order(
        None,
        &[
            "--downstream",
            &downstream.url,
            "--step-retry-initial-ms",
            "2000",
        ],
    );
    register(&gateway.admin, &handler.url).await;

    let id = send_order(&gateway.url, ORDER).await;
    let invocation_url = format!("{}/v1/invocations/{id}", gateway.url);
    let before = eventually(Duration::from_secs(10), "backing-off", || async {
        let view = get_json(&invocation_url).await;
        (view["status"] == "backing-off").then_some(view)
    })
    .await;
    let due = before["next_attempt_at"].as_str().unwrap().to_owned();
    assert!(
        before["last_error"]
            .as_str()
            .unwrap()
            .contains("reserve_inventory"),
        "{before}"
    );
    let failed_at = downstream.requests("reserve_inventory")[0].at;

    gateway.kill();
    let gateway = home.start(Some(gateway.addr));
    let after = get_json(&invocation_url).await;
    assert_eq!(after["status"], "backing-off", "{after}");
    assert_eq!(
        after["next_attempt_at"],
        due.as_str(),
        "the schedule changed"
    );

    let view = wait_final(&gateway.url, &id).await;
    assert_eq!(view["status"], "completed", "{view}");
    assert_eq!(view["output"], ORDER_OUTPUT);
    let reserve = downstream.requests("reserve_inventory");
    assert_eq!(reserve.len(), 2, "one failure, one success");
    let waited = reserve[1].at.duration_since(failed_at);
    assert!(
        waited >= Duration::from_millis(1900),
        "the retry came early, after {waited:?}"
    );
    assert!(
        waited < Duration::from_millis(4000),
        "the retry came late, after {waited:?}"
    );
    assert_eq!(downstream.requests("charge_payment").len(), 1);
    assert_eq!(downstream.requests("send_confirmation").len(), 1);
    assert_eq!(
        shape(&journal(&gateway.admin, &id).await),
        order_journal_shape()
    );
}

/// SIGTERM stops Durin cleanly within its drain timeout (1 s here) while an invocation is in
/// flight; a restart finishes it, and no completed step runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_a_restart_finishes_the_rest() {
    if !require_store() {
        return;
    }
    let downstream = Downstream::start(&[]).await;
    let home = GatewayHome::new();
    let mut gateway = home.start(None);
    let handler = start_order(
        None,
        &["--step-delay-ms", "800", "--downstream", &downstream.url],
    );
    register(&gateway.admin, &handler.url).await;
    let id = send_order(&gateway.url, ORDER).await;
    wait_for_step(&gateway.admin, &id, "charge_payment").await;

    let status = gateway.terminate(Duration::from_secs(5));
    assert!(status.success(), "durin exited with {status}");

    let gateway = home.start(Some(gateway.addr));
    let view = wait_final(&gateway.url, &id).await;
    assert_eq!(view["status"], "completed", "{view}");
    assert_eq!(view["output"], ORDER_OUTPUT);
    assert_eq!(
        shape(&journal(&gateway.admin, &id).await),
        order_journal_shape()
    );
    assert_eq!(downstream.requests("charge_payment").len(), 1);
    for step in ["reserve_inventory", "send_confirmation"] {
        assert_eq!(downstream.distinct_keys(step), 1, "{step}");
    }
}

/// Workflows sleep on timers while Durin is killed; after the restart each timer fires
/// once (late, never early) and each workflow completes, with one sleep completion each.
/// A signal sent while Durin was down is retried by the client with the same
/// Idempotency-Key after the restart and delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_fire_once_after_durin_is_killed_and_signals_are_delivered_once() {
    if !require_store() {
        return;
    }
    let home = GatewayHome::new();
    let mut gateway = home.start(None);
    let handler = start_order(None, &[]);
    register(&gateway.admin, &handler.url).await;
    let http = client();
    let start = |id: &str, deadline: u64| {
        http.post(format!("{}/v1/workflows/approval/{id}", gateway.url))
            .json(&serde_json::json!({"request": id, "deadline_secs": deadline}))
            .send()
    };
    for id in ["sleeper-1", "sleeper-2", "sleeper-3"] {
        assert_eq!(start(id, 2).await.unwrap().status(), 202);
    }
    assert_eq!(start("cancelled", 3600).await.unwrap().status(), 202);
    // Wait until every run is suspended on its timer, then kill Durin.
    eventually(Duration::from_secs(20), "runs to suspend", || async {
        let list = get_json(&format!(
            "{}/v1/invocations?status=suspended",
            gateway.admin
        ))
        .await;
        (list["invocations"].as_array().unwrap().len() == 4).then_some(())
    })
    .await;
    // A signal is on its way when Durin dies: the client does not know whether it landed.
    let in_flight = client()
        .post(format!(
            "{}/v1/workflows/approval/cancelled/signals/cancel",
            gateway.url
        ))
        .header("idempotency-key", "cancel-1")
        .json(&"changed my mind")
        .send();
    let in_flight = tokio::spawn(async move { in_flight.await.map(|r| r.status()) });
    tokio::time::sleep(Duration::from_millis(2)).await;
    let killed_at = std::time::Instant::now();
    gateway.kill();
    let _ = in_flight.await;
    let gateway = home.start(Some(gateway.addr));
    // The client retries with the same key, twice: the signal is delivered once.
    for _ in 0..2 {
        let response = client()
            .post(format!(
                "{}/v1/workflows/approval/cancelled/signals/cancel",
                gateway.url
            ))
            .header("idempotency-key", "cancel-1")
            .json(&"changed my mind")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
    }
    for id in ["sleeper-1", "sleeper-2", "sleeper-3", "cancelled"] {
        let view = eventually(Duration::from_secs(30), "the run to end", || async {
            let view = get_json(&format!("{}/v1/workflows/approval/{id}", gateway.url)).await;
            (view["status"] == "completed").then_some(view)
        })
        .await;
        let entries = journal(&gateway.admin, view["id"].as_str().unwrap()).await;
        let completions: Vec<&serde_json::Value> = entries
            .iter()
            .filter(|e| !e["completion"].is_null())
            .collect();
        assert_eq!(completions.len(), 1, "{entries:?}");
        if id == "cancelled" {
            assert_eq!(
                view["output"],
                "request cancelled cancelled: \"changed my mind\""
            );
            assert_eq!(completions[0]["kind"], "signal");
        } else {
            assert_eq!(view["output"], format!("request {id} approved"));
            assert_eq!(completions[0]["kind"], "sleep");
            let wake_at = completions[0]["value"]["wake_at_ms"].as_i64().unwrap();
            let fired_at = chrono_ms(completions[0]["completion"]["at"].as_str().unwrap());
            assert!(fired_at >= wake_at, "fired early: {fired_at} < {wake_at}");
        }
    }
    assert!(killed_at.elapsed() >= Duration::from_secs(1));
}

/// Milliseconds since the epoch of an RFC 3339 time as the journal shows it.
fn chrono_ms(text: &str) -> i64 {
    humantime::parse_rfc3339(text)
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Durin dies after a signal arrived and before the attempt that waits for it suspended:
/// the signal is durable, the attempt is run again after the restart, and the wait gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_that_arrived_before_a_crash_and_the_suspension_is_not_lost() {
    if !require_store() {
        return;
    }
    use durin_sdk::{Context, Endpoint, HandlerError, Service};

    async fn gate(ctx: Context, _: serde_json::Value) -> Result<String, HandlerError> {
        let go = ctx.signal_waiter("go").await?;
        // Work between the wait's entry and the suspension, during which Durin dies.
        ctx.run("slow", || async {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            Ok(())
        })
        .await?;
        ctx.first(&[&go]).await?;
        go.value()
    }

    let home = GatewayHome::new();
    let mut gateway = home.start(None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let handler_url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        Endpoint::new()
            .service(Service::new("gate").handler("run", gate))
            .serve(listener),
    );
    register(&gateway.admin, &handler_url).await;
    let url = format!("{}/v1/workflows/gate/g-1", gateway.url);
    assert_eq!(
        client().post(&url).json(&1).send().await.unwrap().status(),
        202
    );
    let id = get_json(&url).await["id"].as_str().unwrap().to_owned();
    wait_for_step_kind(&gateway.admin, &id, "signal").await;
    let sent = client()
        .post(format!("{url}/signals/go"))
        .json(&"through")
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 202);
    // The attempt is still in its slow step: it has not suspended.
    assert_eq!(get_json(&url).await["status"], "running");
    gateway.kill();
    let gateway = home.start(Some(gateway.addr));
    let url = format!("{}/v1/workflows/gate/g-1", gateway.url);
    let done = eventually(Duration::from_secs(40), "the run to end", || async {
        let view = get_json(&url).await;
        (view["status"] == "completed").then_some(view)
    })
    .await;
    assert_eq!(done["output"], "through");
    let entries = journal(&gateway.admin, &id).await;
    let waits: Vec<_> = entries.iter().filter(|e| e["kind"] == "signal").collect();
    assert_eq!(waits.len(), 1, "{entries:?}");
    assert_eq!(waits[0]["completion"]["value"], "through");
}

/// Waits until the journal holds an entry of `kind`.
async fn wait_for_step_kind(gateway: &str, id: &str, kind: &str) {
    eventually(Duration::from_secs(20), kind, || async {
        journal(gateway, id)
            .await
            .iter()
            .any(|e| e["kind"] == kind)
            .then_some(())
    })
    .await
}

/// An order is cancelled mid-flow and Durin is killed while the compensations run. After
/// a restart the cancellation goes on from the journal: each compensation happens under
/// one key (the one in flight may be sent again, with the same key), the one not yet
/// started happens once, the confirmation never, and the order ends cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_killed_during_a_cancellation_compensates_once() {
    if !require_store() {
        return;
    }
    let downstream = Downstream::start(&[]).await;
    let home = GatewayHome::new();
    let mut gateway = home.start(None);
    let handler = start_order(
        None,
        &["--step-delay-ms", "600", "--downstream", &downstream.url],
    );
    register(&gateway.admin, &handler.url).await;

    let id = send_order(&gateway.url, ORDER).await;
    wait_for_step(&gateway.admin, &id, "charge_payment").await;
    let response = client()
        .post(format!("{}/v1/invocations/{id}/cancel", gateway.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    // The new attempt replays to the cancellation and starts `release_inventory` (600 ms
    // before its side effect); Durin dies in the middle of it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    gateway.kill();
    let gateway = home.start(Some(gateway.addr));

    let view = wait_final(&gateway.url, &id).await;
    assert_eq!(view["status"], "cancelled", "{view}");
    let entries = journal(&gateway.admin, &id).await;
    let kinds: Vec<(String, Option<String>)> = shape(&entries);
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
    assert_eq!(kinds, expected, "{entries:#?}");
    assert!(
        entries[3]["attempt"].as_u64().unwrap() >= 3,
        "the compensation was recorded after the restart: {entries:#?}"
    );
    assert_eq!(downstream.requests("charge_payment").len(), 1);
    let release = downstream.requests("release_inventory");
    assert!((1..=2).contains(&release.len()), "{release:?}");
    assert_eq!(downstream.distinct_keys("release_inventory"), 1);
    assert_eq!(downstream.requests("refund_payment").len(), 1);
    // The step cut short by the cancellation may have had its effect, once; the
    // compensation noted before it covers that.
    assert!(downstream.requests("reserve_inventory").len() <= 1);
    assert!(downstream.requests("send_confirmation").is_empty());
}

/// The children of `parent`, from the admin list, oldest first (ids are time-ordered).
async fn children_of(admin: &str, parent: &str) -> Vec<serde_json::Value> {
    let list = get_json(&format!("{admin}/v1/invocations")).await;
    let mut children: Vec<serde_json::Value> = list["invocations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["parent_invocation_id"] == parent)
        .cloned()
        .collect();
    children.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    children
}

const CART: &str = r#"{"orders":[{"order_id":"o-1","customer_id":"c-1","amount_cents":4999},{"order_id":"o-2","customer_id":"c-1","amount_cents":100}]}"#;

/// Durin is killed right after a parent's `call` entry is written, while its child runs,
/// and again as soon as that child has ended. After each
/// restart there is still exactly one child per call, each order's steps ran once, and
/// the parent resumes and completes with both outputs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_killed_around_a_child_call_starts_each_child_once() {
    if !require_store() {
        return;
    }
    let downstream = Downstream::start(&[]).await;
    let home = GatewayHome::new();
    let mut gateway = home.start(None);
    let handler = start_order(
        None,
        &["--step-delay-ms", "400", "--downstream", &downstream.url],
    );
    register(&gateway.admin, &handler.url).await;

    let response = client()
        .post(format!("{}/v1/send/checkout/run", gateway.url))
        .header("content-type", "application/json")
        .body(CART)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let parent = response.json::<serde_json::Value>().await.unwrap()["invocation_id"]
        .as_str()
        .unwrap()
        .to_owned();

    // Killed just after the first call entry (its child is in its first step).
    let admin = gateway.admin.clone();
    eventually(Duration::from_secs(10), "the first call", || async {
        let entries = journal(&admin, &parent).await;
        entries.iter().any(|e| e["kind"] == "call").then_some(())
    })
    .await;
    gateway.kill();
    let mut gateway = home.start(Some(gateway.addr));
    assert_eq!(children_of(&gateway.admin, &parent).await.len(), 1);

    // Killed as soon as the first child has ended: its end completed the parent's entry
    // and made the parent due in one transaction, so whether or not the parent had woken
    // up yet, the restart finds it due.
    let admin = gateway.admin.clone();
    let first = eventually(
        Duration::from_secs(20),
        "the first child to end",
        || async {
            let children = children_of(&admin, &parent).await;
            let first = children.first()?;
            (first["status"] == "completed").then(|| first.clone())
        },
    )
    .await;
    gateway.kill();
    let gateway = home.start(Some(gateway.addr));

    let view = wait_final(&gateway.url, &parent).await;
    assert_eq!(view["status"], "completed", "{view}");
    assert_eq!(
        view["output"],
        "order o-1 complete charge charge_o-1 reservation reservation_o-1; \
         order o-2 complete charge charge_o-2 reservation reservation_o-2"
    );
    let children = children_of(&gateway.admin, &parent).await;
    let calls: Vec<_> = children
        .iter()
        .filter(|c| c["service"] == "order")
        .collect();
    assert_eq!(calls.len(), 2, "one child per call: {children:#?}");
    assert_eq!(calls[0]["id"], first["id"]);
    // The receipt was sent one way, once.
    assert_eq!(
        children
            .iter()
            .filter(|c| c["handler"] == "receipt")
            .count(),
        1
    );
    for step in ["charge_payment", "reserve_inventory", "send_confirmation"] {
        assert_eq!(
            downstream.distinct_keys(step),
            2,
            "{step}: one key per order"
        );
    }
    assert_eq!(downstream.requests("charge_payment").len(), 2);
}

/// A subscription billed every 300 ms, two cycles per run, with Durin killed three times
/// while it runs (around its continues-as-new). Afterwards: exactly one next run per
/// continue-as-new, and each cycle charged under exactly one key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_killed_around_continue_as_new_starts_exactly_one_next_run() {
    if !require_store() {
        return;
    }
    let downstream = Downstream::start(&[]).await;
    let home = GatewayHome::new();
    let mut gateway = home.start(None);
    let handler = start_order(None, &["--downstream", &downstream.url]);
    register(&gateway.admin, &handler.url).await;

    let url = format!("{}/v1/workflows/subscription/sub-9", gateway.url);
    let started = client()
        .post(&url)
        .json(&serde_json::json!({
            "customer_id": "cy", "amount_cents": 10, "cycles": 6,
            "cycles_per_run": 2, "period_ms": 300
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 202);
    for pause_ms in [450, 500, 350] {
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        gateway.kill();
        gateway = home.start(Some(gateway.addr));
    }
    let url = format!("{}/v1/workflows/subscription/sub-9", gateway.url);
    let ended = eventually(
        Duration::from_secs(30),
        "the subscription to end",
        || async {
            let view = get_json(&url).await;
            (view["status"] == "completed").then_some(view)
        },
    )
    .await;
    assert_eq!(ended["output"], "cy billed 6 cycles");
    let runs = get_json(&format!("{url}/runs")).await["runs"]
        .as_array()
        .unwrap()
        .clone();
    let statuses: Vec<&str> = runs.iter().map(|r| r["status"].as_str().unwrap()).collect();
    assert_eq!(
        statuses,
        ["continued", "continued", "completed"],
        "{runs:#?}"
    );
    assert_eq!(downstream.distinct_keys("charge_payment"), 6);
    let charged: std::collections::BTreeSet<String> = downstream
        .requests("charge_payment")
        .into_iter()
        .map(|e| e.key.rsplit(':').next().unwrap().to_owned())
        .collect();
    let expected: std::collections::BTreeSet<String> = (0..6).map(|c| format!("cy-{c}")).collect();
    assert_eq!(charged, expected);
}

/// Sends `signal` (`STOP`, `CONT`) to a process.
fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// The handler's process freezes in the middle of a long step (SIGSTOP: its connection
/// stays open, as when its machine is gone). The step sends a heartbeat per item and the
/// handler declares a 1 s heartbeat_timeout: Durin ends the attempt within about a second
/// (its start_to_close is 120 s), and once a handler is back, the next attempt goes on
/// from the last item a heartbeat reported, so at most one item is processed twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_handler_is_found_by_its_heartbeat_timeout_and_the_next_attempt_goes_on() {
    if !require_store() {
        return;
    }
    let downstream = Downstream::start(&[]).await;
    let home = GatewayHome::new();
    let gateway = home.start(None);
    let mut handler = start_order(None, &["--downstream", &downstream.url]);
    register(&gateway.admin, &handler.url).await;

    let response = client()
        .post(format!("{}/v1/send/batch/run", gateway.url))
        .json(&serde_json::json!({"items": 12, "item_ms": 150}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let id = response.json::<serde_json::Value>().await.unwrap()["invocation_id"]
        .as_str()
        .unwrap()
        .to_owned();
    eventually(Duration::from_secs(10), "four items", || async {
        (downstream.requests("batch_item").len() >= 4).then_some(())
    })
    .await;
    signal(handler.pid(), "STOP");
    let frozen = std::time::Instant::now();
    let url = format!("{}/v1/invocations/{id}", gateway.url);
    let view = eventually(Duration::from_secs(10), "the attempt to end", || async {
        let view = get_json(&url).await;
        (view["attempt"].as_u64() >= Some(2)
            || view["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("heartbeat")))
        .then_some(view)
    })
    .await;
    let found_after = frozen.elapsed();
    assert!(
        found_after < Duration::from_secs(5),
        "found after {found_after:?}: {view}"
    );
    let done_before = downstream.requests("batch_item").len();
    // The frozen process goes; a new one on the same address takes the next attempt.
    signal(handler.pid(), "CONT");
    handler.kill();
    let _handler = start_order(Some(handler.addr), &["--downstream", &downstream.url]);

    let view = wait_final(&gateway.url, &id).await;
    assert_eq!(view["status"], "completed", "{view}");
    let output = view["output"].as_str().unwrap();
    let from: usize = output.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(
        from >= 4 && from <= done_before,
        "{output} (done before: {done_before})"
    );
    assert_eq!(downstream.distinct_keys("batch_item"), 12);
    let processed = downstream.requests("batch_item").len();
    assert!(
        (12..=13).contains(&processed),
        "at most the item in flight is processed twice: {processed}"
    );
}

/// `--log-format json` writes one JSON object per line, and an attempt's events carry its
/// invocation, attempt, service and handler as fields; the text format written to a file
/// (not a terminal) has no colour codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_json_lines_with_the_attempt_or_plain_text_without_colours() {
    if !require_store() {
        return;
    }
    // A step fails once, so that an attempt logs its backoff.
    let downstream = Downstream::start(&[("charge_payment", 1)]).await;
    let home = GatewayHome::new();
    let json_logs = path_of(&home).join("json.log");
    let mut gateway = home.start_logging(&["--log-format", "json"], &json_logs);
    let handler = start_order(None, &["--downstream", &downstream.url]);
    register(&gateway.admin, &handler.url).await;
    let id = send_order(&gateway.url, ORDER).await;
    let view = wait_final(&gateway.url, &id).await;
    assert_eq!(view["status"], "completed", "{view}");
    gateway.kill();
    let text = std::fs::read_to_string(&json_logs).unwrap();
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    assert!(!events.is_empty());
    let attempt = events
        .iter()
        .find(|e| e["span"]["invocation"] == id.as_str())
        .unwrap_or_else(|| panic!("no event of the attempt: {text}"));
    assert_eq!(attempt["span"]["service"], "order");
    assert_eq!(attempt["span"]["handler"], "process");
    assert!(attempt["span"]["attempt"].as_u64().is_some(), "{attempt}");

    let text_logs = path_of(&home).join("text.log");
    let mut gateway = home.start_logging(&[], &text_logs);
    assert!(gateway.terminate(Duration::from_secs(10)).success());
    let text = std::fs::read_to_string(&text_logs).unwrap();
    assert!(text.contains("stopped"), "{text}");
    assert!(!text.contains('\u{1b}'), "colour codes in a file: {text:?}");
}

/// A bulk cancel interrupted by `kill -9` of Durin: every invocation it reached is
/// cancelled (its cancellation is one transaction), the others are untouched, and the
/// same verb sent again after the restart finishes the job: every workflow ends cancelled,
/// none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_cancel_cut_by_a_crash_is_finished_by_the_same_verb() {
    if !require_store() {
        return;
    }
    let home = GatewayHome::new();
    let mut gateway = home.start(None);
    let handler = start_order(None, &[]);
    register(&gateway.admin, &handler.url).await;
    let count = 300;
    for i in 0..count {
        let started = client()
            .post(format!("{}/v1/workflows/approval/bulk-{i}", gateway.url))
            .json(&serde_json::json!({"request": format!("bulk-{i}"), "deadline_secs": 3600}))
            .send()
            .await
            .unwrap();
        assert_eq!(started.status(), 202);
    }
    let admin = gateway.admin.clone();
    let suspended = || {
        let admin = admin.clone();
        async move {
            get_json(&format!(
                "{admin}/v1/invocations?status=suspended&limit=1000"
            ))
            .await["invocations"]
                .as_array()
                .unwrap()
                .len()
        }
    };
    eventually(Duration::from_secs(60), "every run to wait", || async {
        (suspended().await == count).then_some(())
    })
    .await;

    // The bulk cancel goes out; Durin dies while it works through the runs.
    let bulk = {
        let admin = gateway.admin.clone();
        tokio::spawn(async move {
            client()
                .post(format!("{admin}/v1/invocations/bulk/cancel"))
                .json(&serde_json::json!({"service": "approval"}))
                .send()
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    gateway.kill();
    let _ = bulk.await;
    let gateway = home.start(Some(gateway.addr));
    // The same verb again: what was cancelled is not changed again.
    let again: serde_json::Value = client()
        .post(format!("{}/v1/invocations/bulk/cancel", gateway.admin))
        .json(&serde_json::json!({"service": "approval"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let changed = again["changed"].as_u64().unwrap() as usize;
    assert!(changed <= count, "{again}");
    let admin = gateway.admin.clone();
    eventually(
        Duration::from_secs(60),
        "every run to end cancelled",
        || async {
            let list = get_json(&format!(
                "{admin}/v1/invocations?status=cancelled&limit=1000"
            ))
            .await;
            (list["invocations"].as_array().unwrap().len() == count).then_some(())
        },
    )
    .await;
    // Each run has exactly one cancel entry.
    let list = get_json(&format!(
        "{}/v1/invocations?status=cancelled&limit=1000",
        gateway.admin
    ))
    .await;
    for run in list["invocations"].as_array().unwrap().iter().take(20) {
        let entries = journal(&gateway.admin, run["id"].as_str().unwrap()).await;
        let cancels = entries.iter().filter(|e| e["kind"] == "cancel").count();
        assert_eq!(cancels, 1, "{entries:#?}");
    }
    eprintln!("the second bulk cancel changed {changed} of {count}");
}

/// `POST {admin}/v1/invocations/{id}/restart` with `{"from": from}` and an
/// `Idempotency-Key`; the answer's status and body, or the error of a request cut short.
async fn restart_with_key(
    admin: &str,
    id: &str,
    from: u32,
    key: &str,
) -> reqwest::Result<(u16, serde_json::Value)> {
    let response = client()
        .post(format!("{admin}/v1/invocations/{id}/restart"))
        .header("idempotency-key", key)
        .json(&serde_json::json!({ "from": from }))
        .send()
        .await?;
    let code = response.status().as_u16();
    Ok((code, response.json().await?))
}

/// How many requests of `step` the downstream got under each idempotency key.
fn effects_by_key(downstream: &Downstream, step: &str) -> std::collections::HashMap<String, usize> {
    let mut counts = std::collections::HashMap::new();
    for effect in downstream.requests(step) {
        *counts.entry(effect.key).or_default() += 1;
    }
    counts
}

/// Operator restarts cut by `kill -9` of Durin and sent again with the same
/// `Idempotency-Key`s after the restart: every order is restarted exactly once. 100 orders
/// fail for good (the downstream refuses `reserve_inventory`); once it accepts again, one
/// restart per order from entry 1 (keeping `charge_payment`) goes out with a key per order,
/// 8 at a time, and Durin dies once 30 were answered, with the next ones in flight (done
/// or not, their answers lost). The handler dies with it, so that no step it had started
/// outlives the crash: a step the crash cut short would run again and look like a second
/// restart. Sent again, each restart that was done answers "already-restarted" and the
/// others are done; sent a third time, once all completed, none changes anything.
/// `charge_payment` ran once per order, and the steps after entry 1 once per restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_cut_by_a_crash_and_sent_again_restart_each_invocation_once() {
    if !require_store() {
        return;
    }
    const COUNT: usize = 100;
    const KILL_AFTER: usize = 30;
    const SENDERS: usize = 8;
    // No restarted run reaches its first side effect (reserve_inventory's, after this
    // delay) before the kill; checked below.
    const STEP_DELAY_MS: &str = "2000";
    let downstream = Downstream::start(&[]).await;
    downstream.refuse("reserve_inventory", true);
    let home = GatewayHome::new();
    let mut gateway = home.start(None);
    let args = [
        "--step-delay-ms",
        STEP_DELAY_MS,
        "--downstream",
        &downstream.url,
    ];
    let mut handler = start_order(None, &args);
    register(&gateway.admin, &handler.url).await;
    let order =
        |i: usize| format!(r#"{{"order_id":"o-{i}","customer_id":"c-{i}","amount_cents":4999}}"#);
    let mut ids = Vec::new();
    for i in 0..COUNT {
        ids.push(send_order(&gateway.url, &order(i)).await);
    }
    for id in &ids {
        let view = wait_final(&gateway.url, id).await;
        assert_eq!(view["status"], "failed", "{view}");
    }
    assert_eq!(downstream.requests("reserve_inventory").len(), COUNT);
    downstream.refuse("reserve_inventory", false);
    let key = |id: &str| format!("restart-{id}");

    // The restarts go out from SENDERS tasks at once, each order's with its own key; Durin
    // is killed once KILL_AFTER were answered, with up to SENDERS of them in flight.
    struct Progress {
        answered: Vec<String>,
        first: Option<std::time::Instant>,
        reached: Option<tokio::sync::oneshot::Sender<std::time::Instant>>,
    }
    let (reached, kill_now) = tokio::sync::oneshot::channel();
    let progress = std::sync::Arc::new(std::sync::Mutex::new(Progress {
        answered: Vec::new(),
        first: None,
        reached: Some(reached),
    }));
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut senders = Vec::new();
    for _ in 0..SENDERS {
        let (admin, ids) = (gateway.admin.clone(), ids.clone());
        let (progress, next) = (
            std::sync::Arc::clone(&progress),
            std::sync::Arc::clone(&next),
        );
        senders.push(tokio::spawn(async move {
            while let Some(id) = ids.get(next.fetch_add(1, std::sync::atomic::Ordering::SeqCst)) {
                // An error: the request was cut by the kill, or Durin is gone.
                let Ok((code, body)) = restart_with_key(&admin, id, 1, &key(id)).await else {
                    return;
                };
                assert_eq!((code, &body["restart"]), (200, &"done".into()), "{body}");
                let mut progress = progress.lock().unwrap();
                let first = *progress.first.get_or_insert_with(std::time::Instant::now);
                progress.answered.push(id.clone());
                if progress.answered.len() >= KILL_AFTER {
                    if let Some(reached) = progress.reached.take() {
                        let _ = reached.send(first);
                    }
                }
            }
        }));
    }
    let first_answer = kill_now.await.unwrap();
    gateway.kill();
    handler.kill();
    let kill_after = first_answer.elapsed();
    for sender in senders {
        sender.await.unwrap();
    }
    let answered = progress.lock().unwrap().answered.clone();
    assert!(
        (KILL_AFTER..COUNT).contains(&answered.len()),
        "the kill came after all the restarts were answered: {}",
        answered.len()
    );
    assert_eq!(
        (
            downstream.requests("reserve_inventory").len(),
            downstream.requests("send_confirmation").len()
        ),
        (COUNT, 0),
        "a restarted run reached a side effect before the kill ({kill_after:?} after the first \
         answer), so a step cut by the crash could run twice: raise STEP_DELAY_MS"
    );

    let _handler = start_order(Some(handler.addr), &args);
    let gateway = home.start(Some(gateway.addr));
    // Every restart again, with its key: what was done is not done again.
    let mut changed = 0;
    for id in &ids {
        let (code, body) = restart_with_key(&gateway.admin, id, 1, &key(id))
            .await
            .unwrap();
        assert_eq!(code, 200, "{body}");
        match body["restart"].as_str() {
            Some("done") => {
                assert!(
                    !answered.contains(id),
                    "{id} was restarted before the kill and again: {body}"
                );
                changed += 1;
            }
            Some("already-restarted") => {}
            _ => panic!("{body}"),
        }
    }
    let cut = COUNT - answered.len() - changed;
    assert!(
        cut <= SENDERS,
        "only the requests in flight at the kill can be done unanswered: {cut}"
    );
    for (i, id) in ids.iter().enumerate() {
        let view = wait_final(&gateway.url, id).await;
        assert_eq!(view["status"], "completed", "{view}");
        assert_eq!(
            view["output"],
            format!("order o-{i} complete charge charge_o-{i} reservation reservation_o-{i}")
        );
    }
    // And once more, now that they all completed again: nothing changes.
    for id in &ids {
        let (code, body) = restart_with_key(&gateway.admin, id, 1, &key(id))
            .await
            .unwrap();
        assert_eq!(
            (code, &body["restart"], &body["status"]),
            (200, &"already-restarted".into(), &"completed".into()),
            "{body}"
        );
    }

    // Side effects per idempotency key: charge_payment (kept by the restart) once per
    // order; reserve_inventory refused once, then once for the one restart;
    // send_confirmation once.
    let (charges, reservations, confirmations) = (
        effects_by_key(&downstream, "charge_payment"),
        effects_by_key(&downstream, "reserve_inventory"),
        effects_by_key(&downstream, "send_confirmation"),
    );
    for (i, id) in ids.iter().enumerate() {
        let step_key = |step: &str| format!("{id}:{step}:o-{i}");
        assert_eq!(
            (
                charges.get(&step_key("charge_payment")),
                reservations.get(&step_key("reserve_inventory")),
                confirmations.get(&step_key("send_confirmation")),
            ),
            (Some(&1), Some(&2), Some(&1)),
            "order {i} ({id})"
        );
        let entries = journal(&gateway.admin, id).await;
        assert_eq!(shape(&entries), order_journal_shape(), "{entries:#?}");
        assert_eq!(
            entries[1]["attempt"], 1,
            "charge_payment was kept: {entries:#?}"
        );
    }
    assert_eq!(
        (charges.len(), reservations.len(), confirmations.len()),
        (COUNT, COUNT, COUNT)
    );
    eprintln!(
        "restarts answered before the kill: {} of {COUNT} (the kill came {kill_after:?} after \
         the first answer); done but unanswered: {cut}; the repeat changed {changed}",
        answered.len()
    );
}
