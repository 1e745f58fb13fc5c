//! Keyed handlers: invocations with the same key run at most the handler's `limit` at
//! once, the others wait their turn in arrival order, visible with their position; and
//! 200 invocations on 10 keys, whose exclusive handler checks that it never overlaps
//! itself on a key, all complete exactly once across a SIGKILL of the real `durin`
//! binary in the middle of the queue.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use durin_sdk::{Context, Endpoint, HandlerError, HandlerOptions, KeySpec, Service};
use serde_json::{json, Value};
use support::{client, eventually, get_json, register, wait_final, GatewayHome, InProcess};

/// Serves `service` on a port of its own; its URL.
async fn serve(service: Service) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(Endpoint::new().service(service).serve(listener));
    url
}

fn keyed(key: KeySpec) -> HandlerOptions {
    HandlerOptions {
        key: Some(key),
        ..HandlerOptions::default()
    }
}

/// `POST {url}/v1/send/{target}` (`service/handler`) with `body` (and `headers`): the
/// status and the answer.
async fn send(url: &str, target: &str, body: Value, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut request = client().post(format!("{url}/v1/send/{target}")).json(&body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// One at a time per key, in arrival order, shown with positions; a queued invocation
/// cancelled ends at once; the holder's end lets the next run; other keys are not held
/// up; a key read from a header allows two at once; a request without its key, and a
/// keyed workflow or a bad key declaration, are refused.
#[tokio::test]
async fn keyed_invocations_wait_their_turn_and_say_where_they_are() {
    let server = InProcess::start(|_| {}).await;
    let (url, admin) = (server.url.clone(), server.admin.clone());
    let account = KeySpec::pointer("/account");
    let service = Service::new("account")
        .handler_with(
            "hold",
            keyed(account.clone()),
            |ctx: Context, _: Value| async move {
                ctx.sleep(Duration::from_secs(3600)).await?;
                Ok::<_, HandlerError>("held")
            },
        )
        .handler_with(
            "quick",
            keyed(account.clone()),
            |ctx: Context, input: Value| async move {
                let mut seen: Vec<i64> = ctx.get("seen")?.unwrap_or_default();
                seen.push(input["n"].as_i64().unwrap_or_default());
                ctx.set("seen", &seen).await?;
                Ok::<_, HandlerError>(input["n"].clone())
            },
        )
        .handler_with(
            "peek",
            keyed(account.shared()),
            |ctx: Context, _: Value| async move {
                Ok::<_, HandlerError>(ctx.get::<Value>("seen")?.unwrap_or(Value::Null))
            },
        );
    let deployment = serve(service).await;
    register(&admin, &deployment).await;
    let tenants = Service::new("tenants").handler_with(
        "tenant",
        keyed(KeySpec::header("x-tenant").limit(2)),
        |ctx: Context, _: Value| async move {
            ctx.sleep(Duration::from_secs(3600)).await?;
            Ok::<_, HandlerError>("tenant")
        },
    );
    register(&admin, &serve(tenants).await).await;

    let (status, hold) = send(&url, "account/hold", json!({"account": "a"}), &[]).await;
    assert_eq!(status, 202, "{hold}");
    let hold_id = hold["invocation_id"].as_str().unwrap().to_owned();
    let mut queued = Vec::new();
    for n in [1, 2, 3] {
        let (status, answer) =
            send(&url, "account/quick", json!({"account": "a", "n": n}), &[]).await;
        assert_eq!(status, 202, "{answer}");
        assert_eq!(answer["status"], "queued", "{answer}");
        queued.push(answer["invocation_id"].as_str().unwrap().to_owned());
    }
    // Another key is not held up.
    let other = client()
        .post(format!("{url}/v1/call/account/quick"))
        .json(&json!({"account": "b", "n": 9}))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 200);
    assert_eq!(other.json::<Value>().await.unwrap(), 9);

    let view = get_json(&format!("{url}/v1/services/account/keys/a")).await;
    assert_eq!(view["limit"], 1, "{view}");
    assert_eq!(view["running"][0]["id"], hold_id.as_str(), "{view}");
    let positions: Vec<(u64, String)> = view["queued"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| {
            (
                q["position"].as_u64().unwrap(),
                q["invocation_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        positions,
        vec![
            (1, queued[0].clone()),
            (2, queued[1].clone()),
            (3, queued[2].clone())
        ]
    );
    // A shared handler reads beside the holder, never waiting.
    let peek = client()
        .post(format!("{url}/v1/call/account/peek"))
        .json(&json!({"account": "a"}))
        .send()
        .await
        .unwrap();
    assert_eq!(peek.status(), 200);
    assert_eq!(peek.json::<Value>().await.unwrap(), Value::Null);
    let record = get_json(&format!("{url}/v1/invocations/{}", queued[0])).await;
    assert_eq!(
        (&record["status"], &record["key"]),
        (&json!("queued"), &json!("a"))
    );

    // Cancelled while it waits: it ends at once, without its handler.
    let cancel = client()
        .post(format!("{url}/v1/invocations/{}/cancel", queued[1]))
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), 200);
    let cancel: Value = cancel.json().await.unwrap();
    assert_eq!(cancel["cancellation"], "cancelled", "{cancel}");
    let cancelled = wait_final(&url, &queued[1]).await;
    assert_eq!(
        (&cancelled["status"], &cancelled["attempt"]),
        (&json!("cancelled"), &json!(0))
    );

    // The holder ends: the others run in the order they came.
    let terminate = client()
        .post(format!("{admin}/v1/invocations/{hold_id}/terminate"))
        .send()
        .await
        .unwrap();
    assert_eq!(terminate.status(), 200);
    let first = wait_final(&url, &queued[0]).await;
    let third = wait_final(&url, &queued[2]).await;
    assert_eq!(
        (&first["status"], &third["status"]),
        (&json!("completed"), &json!("completed"))
    );
    assert!(
        first["completed_at"].as_str().unwrap() <= third["completed_at"].as_str().unwrap(),
        "{first} {third}"
    );
    // The state each set became the key's at its end, in the order they ran.
    let view = get_json(&format!("{url}/v1/services/account/keys/a")).await;
    assert_eq!(view["state"]["seen"], json!([1, 3]), "{view}");
    let peek = client()
        .post(format!("{url}/v1/call/account/peek"))
        .json(&json!({"account": "a"}))
        .send()
        .await
        .unwrap();
    assert_eq!(peek.json::<Value>().await.unwrap(), json!([1, 3]));
    assert_eq!(
        (
            view["running"].as_array().unwrap().len(),
            view["queued"].as_array().unwrap().len()
        ),
        (0, 0),
        "{view}"
    );

    // A key in a header, two at once.
    let tenant = [("x-tenant", "t1")];
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let (status, answer) = send(&url, "tenants/tenant", json!({}), &tenant).await;
        assert_eq!(status, 202, "{answer}");
        statuses.push(answer["status"].as_str().unwrap().to_owned());
    }
    assert_eq!(statuses, ["running", "running", "queued"]);

    // Refusals: no key in the request, a keyed workflow, a bad declaration.
    let (status, problem) = send(&url, "account/quick", json!({"n": 1}), &[]).await;
    assert_eq!(status, 400, "{problem}");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("no key at /account"),
        "{problem}"
    );
    let (status, problem) = send(&url, "tenants/tenant", json!({}), &[]).await;
    assert_eq!(status, 400, "{problem}");
    assert!(
        problem["detail"].as_str().unwrap().contains("x-tenant"),
        "{problem}"
    );
    for (services, says) in [
        (
            json!([{"name": "flow", "kind": "workflow", "handlers": [{"name": "run", "key": {"pointer": "/a"}}]}]),
            "workflow",
        ),
        (
            json!([{"name": "svc", "handlers": [{"name": "h", "key": {"pointer": "/a", "limit": 0}}]}]),
            "limit",
        ),
        (
            json!([{"name": "svc", "handlers": [{"name": "h", "key": {"pointer": "/a", "header": "x"}}]}]),
            "exactly one",
        ),
        (
            json!([{"name": "svc", "handlers": [
                {"name": "h", "key": {"pointer": "/a"}},
                {"name": "i", "key": {"pointer": "/a", "limit": 2}}
            ]}]),
            "one key.limit",
        ),
        (
            json!([{"name": "svc", "handlers": [{"name": "h", "key": {"pointer": "/a", "shared": true, "rate": {"limit": 2, "period": "1s"}}}]}]),
            "not shared ones",
        ),
        (
            json!([{"name": "svc", "handlers": [{"name": "h", "key": {"pointer": "/a", "rate": {"limit": 0, "period": "1s"}}}]}]),
            "key.rate.limit",
        ),
        (
            json!([{"name": "svc", "handlers": [{"name": "h", "key": {"pointer": "/a", "debounce": "2s", "debounce_max": "1s"}}]}]),
            "debounce_max",
        ),
    ] {
        let response = client()
            .post(format!("{admin}/v1/deployments"))
            .json(&json!({"url": "http://127.0.0.1:9", "services": services}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400);
        let problem: Value = response.json().await.unwrap();
        assert!(
            problem["detail"].as_str().unwrap().contains(says),
            "{problem}"
        );
    }
    server.stop().await;
}

/// Debounce: five invocations of one key sent within its debounce; the first four are
/// replaced as the next comes (cancelled, type `Debounced`, their handler never ran), the
/// last runs once, not before its debounce passed; another key is debounced on its own.
#[tokio::test]
async fn a_debounced_key_runs_the_last_of_a_burst() {
    let server = InProcess::start(|_| {}).await;
    let (url, admin) = (server.url.clone(), server.admin.clone());
    let runs = Arc::new(AtomicU32::new(0));
    let counted = Arc::clone(&runs);
    let debounce = Duration::from_millis(400);
    let service = Service::new("account")
        .handler_with(
            "sync",
            keyed(KeySpec::pointer("/account").debounce(debounce)),
            move |_: Context, input: Value| {
                let counted = Arc::clone(&counted);
                async move {
                    counted.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, HandlerError>(input["n"].clone())
                }
            },
        )
        .handler_with(
            "note",
            keyed(KeySpec::pointer("/account")),
            |_: Context, input: Value| async move { Ok::<_, HandlerError>(input["n"].clone()) },
        );
    register(&admin, &serve(service).await).await;

    let mut ids = Vec::new();
    for n in 0..5 {
        let (status, answer) =
            send(&url, "account/sync", json!({"account": "a", "n": n}), &[]).await;
        assert_eq!(status, 202, "{answer}");
        assert_eq!(answer["status"], "pending", "{answer}");
        ids.push(answer["invocation_id"].as_str().unwrap().to_owned());
    }
    let (_, other) = send(&url, "account/sync", json!({"account": "b", "n": 9}), &[]).await;
    for id in &ids[..4] {
        let view = wait_final(&url, id).await;
        assert_eq!(view["status"], "cancelled", "{view}");
        assert_eq!(view["failure"]["type"], "Debounced", "{view}");
        assert_eq!(view["attempt"], 0, "{view}");
    }
    let last = wait_final(&url, &ids[4]).await;
    assert_eq!(last["status"], "completed", "{last}");
    let other = wait_final(&url, other["invocation_id"].as_str().unwrap()).await;
    assert_eq!(other["status"], "completed", "{other}");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "the handler ran once per key"
    );
    let output = support::journal(&admin, &ids[4]).await;
    let output = output.iter().find(|e| e["kind"] == "output").unwrap();
    assert_eq!(output["value"], 4, "{output}");
    // Another handler's invocation of the key, waiting behind a debounced one, is not
    // replaced by the next debounced one: only the older of its own handler is.
    let (_, first) = send(&url, "account/sync", json!({"account": "c", "n": 1}), &[]).await;
    let (_, note) = send(&url, "account/note", json!({"account": "c", "n": 2}), &[]).await;
    assert_eq!(note["status"], "queued", "{note}");
    let (_, second) = send(&url, "account/sync", json!({"account": "c", "n": 3}), &[]).await;
    let id = |answer: &Value| answer["invocation_id"].as_str().unwrap().to_owned();
    let first = wait_final(&url, &id(&first)).await;
    assert_eq!(first["failure"]["type"], "Debounced", "{first}");
    assert_eq!(wait_final(&url, &id(&note)).await["status"], "completed");
    assert_eq!(wait_final(&url, &id(&second)).await["status"], "completed");
    assert_eq!(runs.load(Ordering::SeqCst), 3);

    let waited = |view: &Value| {
        let at = |field: &str| {
            durin::schedules::spec::parse_time("t", view[field].as_str().unwrap()).unwrap()
        };
        at("completed_at") - at("created_at")
    };
    assert!(waited(&last) >= 400, "it ran before its debounce: {last}");
    server.stop().await;
}

/// A debounce with a bound: a burst that never pauses (a send every 100 ms for 2 s, with a
/// 300 ms debounce) still runs, at the latest `debounce_max` (800 ms) after the burst's
/// first invocation; without the bound only the last would run, after the burst.
#[tokio::test]
async fn a_bounded_debounce_runs_within_its_bound_in_an_endless_burst() {
    let server = InProcess::start(|_| {}).await;
    let (url, admin) = (server.url.clone(), server.admin.clone());
    let runs = Arc::new(AtomicU32::new(0));
    let counted = Arc::clone(&runs);
    let service = Service::new("index").handler_with(
        "rebuild",
        keyed(
            KeySpec::pointer("/doc")
                .debounce_max(Duration::from_millis(300), Duration::from_millis(800)),
        ),
        move |_: Context, input: Value| {
            let counted = Arc::clone(&counted);
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                Ok::<_, HandlerError>(input["n"].clone())
            }
        },
    );
    register(&admin, &serve(service).await).await;

    let started = std::time::Instant::now();
    let mut ids = Vec::new();
    let mut ran_during_burst = 0;
    for n in 0..20 {
        let (status, answer) = send(&url, "index/rebuild", json!({"doc": "d", "n": n}), &[]).await;
        assert_eq!(status, 202, "{answer}");
        ids.push(answer["invocation_id"].as_str().unwrap().to_owned());
        tokio::time::sleep(Duration::from_millis(100)).await;
        if ran_during_burst == 0 && runs.load(Ordering::SeqCst) > 0 {
            ran_during_burst = started.elapsed().as_millis();
        }
    }
    let mut completed = 0;
    for id in &ids {
        let view = wait_final(&url, id).await;
        match view["status"].as_str().unwrap() {
            "completed" => completed += 1,
            "cancelled" => assert_eq!(view["failure"]["type"], "Debounced", "{view}"),
            other => panic!("{id} ended {other}: {view}"),
        }
    }
    assert!(
        ran_during_burst > 0 && ran_during_burst <= 1300,
        "the first run came {ran_during_burst} ms into a burst of 2 s, not within its 800 ms bound"
    );
    assert!(
        completed >= 2,
        "{completed} ran of a 2 s burst bounded at 800 ms"
    );
    assert_eq!(runs.load(Ordering::SeqCst), completed);
    // The last of the burst runs, as with any debounce.
    let last = wait_final(&url, ids.last().unwrap()).await;
    assert_eq!(last["status"], "completed", "{last}");
    server.stop().await;
}

/// Where an invocation was first seen: its key, when (ms since the epoch), its attempt.
type FirstSeen = (String, u128, u32);

/// A rate per key (at most 3 starts of one key in any second, with room for 1000 at
/// once): 12 invocations of one key sent at once start 3 a second, in the order they
/// came, across a SIGKILL of `durin` in the middle, which lets none start early (a start
/// counts once it happened); another key is not held up.
#[tokio::test]
async fn a_rate_limited_key_keeps_its_rate_across_a_kill() {
    // When each was first seen, and at which attempt (one whose first attempt the kill
    // lost is first seen at its second, after the restart, though it had started).
    let starts: Arc<Mutex<HashMap<String, FirstSeen>>> = Arc::default();
    let seen = Arc::clone(&starts);
    let service = Service::new("feed").handler_with(
        "pull",
        keyed(
            KeySpec::pointer("/feed")
                .limit(1000)
                .rate(3, Duration::from_secs(1)),
        ),
        move |ctx: Context, input: Value| {
            let seen = Arc::clone(&seen);
            async move {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis();
                let feed = input["feed"].as_str().unwrap_or_default().to_owned();
                seen.lock()
                    .unwrap()
                    .entry(input["n"].to_string())
                    .or_insert((feed, now, ctx.attempt()));
                Ok::<_, HandlerError>(input["n"].clone())
            }
        },
    );
    let deployment = serve(service).await;
    let home = GatewayHome::new();
    let mut durin = home.start(None);
    let gateway = durin.url.clone();
    register(&durin.admin, &deployment).await;

    let mut ids = Vec::new();
    for n in 0..12 {
        let (status, answer) = send(&gateway, "feed/pull", json!({"feed": "f", "n": n}), &[]).await;
        assert_eq!(status, 202, "{answer}");
        ids.push(answer["invocation_id"].as_str().unwrap().to_owned());
    }
    let sent_other = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    for n in 100..102 {
        let (status, answer) = send(&gateway, "feed/pull", json!({"feed": "g", "n": n}), &[]).await;
        assert_eq!(status, 202, "{answer}");
        ids.push(answer["invocation_id"].as_str().unwrap().to_owned());
    }
    // Killed once the second second's starts began, most of them still put off.
    let count = Arc::clone(&starts);
    eventually(Duration::from_secs(30), "a second second of starts", || {
        let count = Arc::clone(&count);
        async move { (count.lock().unwrap().len() >= 2 + 4).then_some(()) }
    })
    .await;
    durin.kill();
    let before_kill = starts.lock().unwrap().len();
    assert!(before_kill < 14, "all had started before the kill");
    let address: std::net::SocketAddr = gateway.trim_start_matches("http://").parse().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut durin = home.start(Some(address));
    for id in &ids {
        let view = wait_final(&gateway, id).await;
        assert_eq!(view["status"], "completed", "{view}");
    }
    let starts = starts.lock().unwrap().clone();
    let f: Vec<(u128, i64, u32)> = {
        let mut f: Vec<_> = starts
            .iter()
            .filter(|(_, (feed, ..))| feed == "f")
            .map(|(n, (_, at, attempt))| (*at, n.parse().unwrap(), *attempt))
            .collect();
        f.sort();
        f
    };
    assert_eq!(f.len(), 12);
    // Never more than 3 starts in a second (100 ms for the way from Durin to the handler),
    // counting those the handler saw start.
    let firsts: Vec<(u128, i64)> = f
        .iter()
        .filter(|(.., attempt)| *attempt == 1)
        .map(|(at, n, _)| (*at, *n))
        .collect();
    assert!(firsts.len() >= 9, "{f:?}");
    for window in firsts.windows(4) {
        assert!(
            window[3].0 - window[0].0 >= 900,
            "four starts within a second: {window:?} of {f:?}"
        );
    }
    assert!(
        firsts.last().unwrap().0 - firsts[0].0 >= 2900,
        "12 starts at 3 a second: {f:?}"
    );
    // In the order they came: a start half a second after another came after it.
    for (i, (at, n)) in firsts.iter().enumerate() {
        for (later_at, later_n) in &firsts[i + 1..] {
            assert!(
                later_at - at < 500 || later_n > n,
                "{later_n} started well after {n}, though it came later: {f:?}"
            );
        }
    }
    // The other key started at once, whatever the first one's rate.
    for n in ["100", "101"] {
        let (feed, at, _) = &starts[n];
        assert_eq!(feed, "g");
        assert!(
            at - sent_other < 1500,
            "key g waited {} ms for key f's rate",
            at - sent_other
        );
    }
    durin.kill();
}

/// What the exclusive handler saw: per key, how many of its invocations were inside the
/// step at once (at most), and how many steps ran.
#[derive(Default)]
struct Watch {
    inside: Mutex<HashMap<String, u32>>,
    overlaps: AtomicU32,
    steps: AtomicU32,
}

/// One invocation inside the step, until it leaves it (also when its attempt's future is
/// dropped: a killed Durin closes the attempt's connection, which ends the handler there).
struct Inside<'a> {
    watch: &'a Watch,
    account: &'a str,
    /// How many of its key were inside, itself included, when it came in.
    count: u32,
}

impl<'a> Inside<'a> {
    fn enter(watch: &'a Watch, account: &'a str) -> Inside<'a> {
        let mut inside = watch.inside.lock().unwrap();
        let count = inside.entry(account.to_owned()).or_default();
        *count += 1;
        Inside {
            watch,
            account,
            count: *count,
        }
    }
}

impl Drop for Inside<'_> {
    fn drop(&mut self) {
        if let Some(count) = self.watch.inside.lock().unwrap().get_mut(self.account) {
            *count -= 1;
        }
    }
}

/// `account/deposit`, keyed by the input's `account`, one at a time: its step notes in
/// `watch` who of its key is inside, and stays inside for `work`.
fn exclusive(watch: Arc<Watch>, work: Duration) -> Service {
    Service::new("account").handler_with(
        "deposit",
        keyed(KeySpec::pointer("/account")),
        move |ctx: Context, input: Value| {
            let watch = Arc::clone(&watch);
            async move {
                let account = input["account"].as_str().unwrap_or_default().to_owned();
                let alone: bool = ctx
                    .run("apply", || async {
                        let inside = Inside::enter(&watch, &account);
                        watch.steps.fetch_add(1, Ordering::SeqCst);
                        if inside.count > 1 {
                            watch.overlaps.fetch_add(1, Ordering::SeqCst);
                        }
                        tokio::time::sleep(work).await;
                        Ok(inside.count == 1)
                    })
                    .await?;
                // The key's balance: read as the ended deposits left it, set for the next.
                let balance: i64 = ctx.get("balance")?.unwrap_or(0);
                ctx.set("balance", &(balance + 1)).await?;
                Ok::<_, HandlerError>(json!({"n": input["n"], "alone": alone}))
            }
        },
    )
}

/// 200 invocations on 10 keys of an exclusive handler, sent at once; Durin is killed
/// with SIGKILL while most of them wait in their keys' queues, and started again. Every
/// invocation completes, each once; the handler never saw two invocations of one key at
/// once; and each key's invocations completed in the order they were created.
#[tokio::test]
async fn keys_hold_across_a_kill_of_durin_mid_queue() {
    let watch = Arc::new(Watch::default());
    let service = exclusive(Arc::clone(&watch), Duration::from_millis(15));
    let deployment = serve(service).await;
    let home = GatewayHome::new();
    let mut durin = home.start(None);
    let gateway = durin.url.clone();
    register(&durin.admin, &deployment).await;

    let sends = (0..200).map(|n| {
        let gateway = gateway.clone();
        async move {
            let body = json!({"account": format!("acct-{}", n % 10), "n": n});
            let (status, answer) = send(&gateway, "account/deposit", body, &[]).await;
            assert_eq!(status, 202, "{answer}");
            answer["invocation_id"].as_str().unwrap().to_owned()
        }
    });
    let ids: Vec<String> = futures_util::future::join_all(sends).await;

    // Killed while the queues are long: some done, most still waiting.
    let admin = durin.admin.clone();
    eventually(Duration::from_secs(60), "some deposits to complete", || {
        let admin = admin.clone();
        async move {
            let list = get_json(&format!(
                "{admin}/v1/invocations?status=completed&limit=1000"
            ))
            .await;
            (list["invocations"].as_array().unwrap().len() >= 20).then_some(())
        }
    })
    .await;
    // Each key's queue as Durin saw it just before the kill: the order they must run in.
    let mut queues = Vec::new();
    for k in 0..10 {
        let view = get_json(&format!("{gateway}/v1/services/account/keys/acct-{k}")).await;
        let order: Vec<String> = view["running"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_owned())
            .chain(
                view["queued"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|q| q["invocation_id"].as_str().unwrap().to_owned()),
            )
            .collect();
        queues.push(order);
    }
    durin.kill();
    let waiting: usize = queues.iter().map(|q| q.len().saturating_sub(1)).sum();
    assert!(
        waiting >= 50,
        "few waited when Durin was killed: {queues:?}"
    );

    let address: std::net::SocketAddr = gateway.trim_start_matches("http://").parse().unwrap();
    // On PostgreSQL a node restarted with its id starts once the database has ended the
    // killed one's session (moments after the kill): as a supervisor's restart delay.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut durin = home.start(Some(address));
    let mut finals = Vec::new();
    for id in &ids {
        let view = wait_final(&gateway, id).await;
        assert_eq!(view["status"], "completed", "{view}");
        finals.push(view);
    }
    assert_eq!(
        watch.overlaps.load(Ordering::SeqCst),
        0,
        "two invocations of one key were in the handler at once"
    );
    // A step whose result the kill lost runs again; every other runs once.
    let steps = watch.steps.load(Ordering::SeqCst);
    assert!(
        (200..=210).contains(&steps),
        "{steps} steps for 200 deposits"
    );
    for id in &ids {
        let journal = support::journal(&durin.admin, id).await;
        let output: Value = journal
            .iter()
            .find(|e| e["kind"] == "output")
            .map(|e| e["value"].clone())
            .unwrap();
        assert_eq!(output["alone"], true, "{id}: {output}");
    }
    // Every deposit counted once in its key's balance: none lost, none twice.
    for k in 0..10 {
        let view = get_json(&format!("{gateway}/v1/services/account/keys/acct-{k}")).await;
        assert_eq!(view["state"]["balance"], 20, "acct-{k}: {view}");
    }
    // Each key's queue ran in its order, across the kill.
    let completed: HashMap<&str, &str> = finals
        .iter()
        .map(|v| {
            (
                v["id"].as_str().unwrap(),
                v["completed_at"].as_str().unwrap(),
            )
        })
        .collect();
    for queue in &queues {
        for pair in queue.windows(2) {
            assert!(
                completed[pair[0].as_str()] <= completed[pair[1].as_str()],
                "{} completed after {}, which waited behind it",
                pair[0],
                pair[1]
            );
        }
    }
    durin.kill();
}

/// Three nodes on one PostgreSQL database; 90 invocations on 3 keys sent round-robin to
/// them; one node is killed with SIGKILL midway. The others take its attempts over once
/// their leases expire, and every invocation completes, never two of one key at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_hold_across_the_loss_of_a_node() {
    if !support::require("postgres") {
        return;
    }
    let watch = Arc::new(Watch::default());
    let deployment = serve(exclusive(Arc::clone(&watch), Duration::from_millis(30))).await;
    let home = GatewayHome::cluster("2s");
    let mut nodes: Vec<support::Proc> = (0..3).map(|_| home.start(None)).collect();
    register(&nodes[0].admin, &deployment).await;
    let urls: Vec<String> = nodes.iter().map(|n| n.url.clone()).collect();
    let sends = (0..90).map(|n| {
        let url = urls[n % 3].clone();
        async move {
            let body = json!({"account": format!("acct-{}", n % 3), "n": n});
            let (status, answer) = send(&url, "account/deposit", body, &[]).await;
            assert_eq!(status, 202, "{answer}");
            answer["invocation_id"].as_str().unwrap().to_owned()
        }
    });
    let ids: Vec<String> = futures_util::future::join_all(sends).await;
    let survivor = nodes[1].url.clone();
    let admin = nodes[1].admin.clone();
    eventually(Duration::from_secs(60), "some deposits to complete", || {
        let admin = admin.clone();
        async move {
            let list = get_json(&format!(
                "{admin}/v1/invocations?status=completed&limit=1000"
            ))
            .await;
            (list["invocations"].as_array().unwrap().len() >= 10).then_some(())
        }
    })
    .await;
    let mut waiting = 0;
    for k in 0..3 {
        let view = get_json(&format!("{survivor}/v1/services/account/keys/acct-{k}")).await;
        waiting += view["queued"].as_array().unwrap().len();
    }
    nodes[0].kill();
    assert!(waiting >= 20, "the kill came too late: {waiting} waited");
    for id in &ids {
        let view = wait_final(&survivor, id).await;
        assert_eq!(view["status"], "completed", "{view}");
    }
    assert_eq!(
        watch.overlaps.load(Ordering::SeqCst),
        0,
        "two invocations of one key were in the handler at once"
    );
    for k in 0..3 {
        let view = get_json(&format!("{survivor}/v1/services/account/keys/acct-{k}")).await;
        assert_eq!(view["state"]["balance"], 30, "acct-{k}: {view}");
    }
    for node in &mut nodes {
        node.kill();
    }
}
