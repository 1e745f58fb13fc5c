//! Workflows you can talk to, in-process (`durin::run_with_clock` on port 0, a real SQLite
//! file, the approval example served by the Rust SDK on port 0): start once per id,
//! queries that call no handler, signals raced against a timer, a 30-day sleep on a
//! clock moved by hand, and bad input.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use durin::clock::ManualClock;
use durin::config::Config;
use serde_json::{json, Value};
use support::{client, eventually, get_json, journal, register};
use tokio_util::sync::CancellationToken;

struct World {
    gateway: String,
    admin: String,
    clock: Arc<ManualClock>,
    _shutdown: tokio_util::sync::DropGuard,
    _dir: tempfile::TempDir,
}

/// The gateway on a manual clock, with the order example (approval workflow) registered.
async fn world() -> World {
    world_with(|_| {}).await
}

async fn world_with(configure: impl FnOnce(&mut Config)) -> World {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        database_url: format!("sqlite:{}", dir.path().join("durin.db").display()),
        drain_timeout: Duration::from_secs(1),
        ..Config::default()
    };
    configure(&mut config);
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let listeners = durin::Listeners {
        api: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        admin: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    };
    let gateway = format!("http://{}", listeners.api.local_addr().unwrap());
    let admin = format!("http://{}", listeners.admin.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    tokio::spawn(durin::run_with_clock(
        config,
        listeners,
        shutdown.clone(),
        Arc::clone(&clock) as Arc<dyn durin::clock::Clock>,
    ));
    let handler = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let handler_url = format!("http://{}", handler.local_addr().unwrap());
    let args = order_example::Args {
        listen: handler.local_addr().unwrap(),
        step_delay_ms: 0,
        downstream: None,
        step_retry_initial_ms: 10,
        reserve_first: false,
    };
    let endpoint = order_example::endpoint(args)
        .service(durin_sdk::Service::new("callback").handler("run", callback))
        .service(durin_sdk::Service::new("inbox").handler("run", inbox))
        .service(durin_sdk::Service::new("counter").handler("run", counter))
        .service(durin_sdk::Service::new("gate").handler("run", gate))
        .service(
            durin_sdk::Service::new("bounded")
                .handler_with(
                    "run",
                    durin_sdk::HandlerOptions {
                        schedule_to_close: Some(Duration::from_secs(3600)),
                        ..Default::default()
                    },
                    napper,
                )
                .handler_with(
                    "punctual",
                    durin_sdk::HandlerOptions {
                        schedule_to_start: Some(Duration::from_secs(60)),
                        ..Default::default()
                    },
                    napper,
                ),
        );
    tokio::spawn(endpoint.serve(handler));
    register(&admin, &handler_url).await;
    World {
        gateway,
        admin,
        clock,
        _shutdown: shutdown.drop_guard(),
        _dir: dir,
    }
}

/// A workflow that hands out an awakeable (its token in the state, for the test to read)
/// and answers with what it was resolved with.
async fn callback(ctx: durin_sdk::Context, _: Value) -> Result<Value, durin_sdk::HandlerError> {
    let awakeable = ctx.awakeable().await?;
    ctx.set("token", &awakeable.token).await?;
    let value: Value = awakeable.wait(&ctx).await?;
    Ok(json!({ "resolved_with": value }))
}

/// A workflow that counts what its `add` updates add (positive numbers only) until a
/// `stop` signal. The count lives in the handler's memory: replaying the updates rebuilds
/// it, so the output shows that they replay.
async fn counter(ctx: durin_sdk::Context, _: Value) -> Result<i64, durin_sdk::HandlerError> {
    let count = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let total = Arc::clone(&count);
    ctx.on_update(
        "add",
        |n: &i64| {
            if *n > 0 {
                Ok(())
            } else {
                Err(durin_sdk::HandlerError::terminal_with_status(
                    422,
                    format!("add takes a positive number, not {n}"),
                ))
            }
        },
        move |ctx: durin_sdk::Context, n: i64| {
            let total = Arc::clone(&total);
            async move {
                let now = total.fetch_add(n, std::sync::atomic::Ordering::SeqCst) + n;
                ctx.set("count", &now).await?;
                Ok::<_, durin_sdk::HandlerError>(now)
            }
        },
    );
    ctx.signal::<Value>("stop").await?;
    Ok(count.load(std::sync::atomic::Ordering::SeqCst))
}

/// A workflow whose `pass` update waits for an `open` signal before it answers (the first
/// one waits; later ones find the gate open), and which itself waits for ever.
async fn gate(ctx: durin_sdk::Context, _: Value) -> Result<(), durin_sdk::HandlerError> {
    let open = Arc::new(std::sync::atomic::AtomicBool::new(false));
    ctx.on_update(
        "pass",
        |_: &String| Ok(()),
        move |ctx: durin_sdk::Context, who: String| {
            let open = Arc::clone(&open);
            async move {
                if !open.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    ctx.signal::<Value>("open").await?;
                }
                Ok::<_, durin_sdk::HandlerError>(format!("{who} passed"))
            }
        },
    );
    ctx.signal::<Value>("never").await?;
    Ok(())
}

/// Sleeps a day, then answers.
async fn napper(ctx: durin_sdk::Context, _: Value) -> Result<String, durin_sdk::HandlerError> {
    ctx.sleep(Duration::from_secs(24 * 3600)).await?;
    Ok("rested".into())
}

/// A workflow that takes three signals of one name, one after the other.
async fn inbox(ctx: durin_sdk::Context, _: Value) -> Result<String, durin_sdk::HandlerError> {
    let mut text = String::new();
    for _ in 0..3 {
        text.push_str(&ctx.signal::<String>("msg").await?);
    }
    Ok(text)
}

async fn post(url: &str, body: Value) -> reqwest::Response {
    client().post(url).json(&body).send().await.unwrap()
}

async fn query(world: &World, id: &str, name: &str) -> reqwest::Response {
    client()
        .get(format!(
            "{}/v1/workflows/approval/{id}/queries/{name}",
            world.gateway
        ))
        .send()
        .await
        .unwrap()
}

/// Waits until the run is suspended (it holds no attempt).
async fn suspended(world: &World, id: &str) -> Value {
    eventually(Duration::from_secs(20), "the run to suspend", || async {
        let view = get_json(&format!("{}/v1/workflows/approval/{id}", world.gateway)).await;
        (view["status"] == "suspended").then_some(view)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thirty_day_deadline_fires_on_a_moved_clock_and_queries_call_no_handler() {
    let world = world().await;
    let url = format!("{}/v1/workflows/approval/a-1", world.gateway);
    let input = json!({"request": "a-1", "deadline_secs": 30 * 24 * 3600});
    let started = post(&url, input.clone()).await;
    assert_eq!(started.status(), 202);
    let run = started.json::<Value>().await.unwrap()["invocation_id"].clone();

    let view = suspended(&world, "a-1").await;
    let attempts = view["attempt"].clone();
    // It says what it waits for: the deadline's timer and the cancel signal.
    assert_eq!(view["workflow_id"], "a-1");
    assert_eq!(view["waiting_for"].as_array().unwrap().len(), 2, "{view}");
    // Queries answer from durable state while it sleeps, and run no attempt.
    for _ in 0..3 {
        let answer = query(&world, "a-1", "is_cancelled").await;
        assert_eq!(answer.status(), 200);
        assert_eq!(answer.json::<Value>().await.unwrap(), json!(false));
    }
    let unknown = query(&world, "a-1", "nope").await;
    assert_eq!(unknown.status(), 404);
    let problem: Value = unknown.json().await.unwrap();
    assert_eq!(problem["type"], "urn:durin:problem:unknown-query");
    assert_eq!(problem["known"], json!(["is_cancelled", "status"]));
    assert_eq!(suspended(&world, "a-1").await["attempt"], attempts);

    // The same id and input: the same run. Another input: 409 naming the first run.
    let again = post(&url, input.clone()).await;
    assert_eq!(again.status(), 202);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json::<Value>().await.unwrap()["invocation_id"], run);
    let other = post(&url, json!({"request": "other", "deadline_secs": 1})).await;
    assert_eq!(other.status(), 409);
    assert_eq!(
        other.headers()["location"].to_str().unwrap(),
        format!("/v1/invocations/{}", run.as_str().unwrap())
    );

    // A day short of the deadline nothing fires; past it, the timer fires.
    world.clock.advance(29 * 24 * 3600 * 1000);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(suspended(&world, "a-1").await["attempt"], attempts);
    world.clock.advance(24 * 3600 * 1000 + 1);
    let done = eventually(Duration::from_secs(10), "the deadline", || async {
        let view = get_json(&url).await;
        (view["status"] == "completed").then_some(view)
    })
    .await;
    assert_eq!(done["output"], "request a-1 approved");
    let answer = query(&world, "a-1", "status").await;
    assert_eq!(answer.json::<Value>().await.unwrap(), json!("approved"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_signal_wins_the_race_once_and_bad_input_touches_nothing() {
    let world = world().await;
    let url = format!("{}/v1/workflows/approval/b-1", world.gateway);
    let input = json!({"request": "b-1", "deadline_secs": 3600});
    assert_eq!(post(&url, input).await.status(), 202);
    let view = suspended(&world, "b-1").await;
    let id = view["id"].as_str().unwrap().to_owned();
    let journal_before = journal(&world.admin, &id).await;

    // Bad input: each a problem, none touches the journal.
    let bad = [
        (format!("{url}/signals/9bad"), "{}".to_owned(), 400),
        (format!("{url}/signals/cancel"), "{not json".to_owned(), 400),
        (
            format!(
                "{}/v1/workflows/approval/nobody/signals/cancel",
                world.gateway
            ),
            "1".to_owned(),
            404,
        ),
        (
            format!("{}/v1/workflows/nosuch/x", world.gateway),
            "{}".to_owned(),
            404,
        ),
        (
            format!("{}/v1/awakeables/awk_forged/resolve", world.gateway),
            "1".to_owned(),
            404,
        ),
        (
            format!(
                "{}/v1/awakeables/awk_{}{}/resolve",
                world.gateway,
                &id[4..],
                "0".repeat(40)
            ),
            "1".to_owned(),
            404,
        ),
        (
            format!("{url}/signals/cancel"),
            "x".repeat(2 * 1024 * 1024),
            413,
        ),
    ];
    for (target, body, status) in bad {
        let response = client()
            .post(&target)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{target}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json",
            "{target}"
        );
        let problem: Value = response.json().await.unwrap();
        assert!(problem["retryable"].is_boolean(), "{problem}");
    }
    assert_eq!(journal(&world.admin, &id).await, journal_before);

    // The cancel signal, sent twice with one key: delivered once.
    for duplicate in [false, true] {
        let sent = client()
            .post(format!("{url}/signals/cancel"))
            .header("idempotency-key", "cancel-b-1")
            .json(&json!({"by": "ada"}))
            .send()
            .await
            .unwrap();
        assert_eq!(sent.status(), 202);
        assert_eq!(sent.json::<Value>().await.unwrap()["duplicate"], duplicate);
    }
    let done = eventually(Duration::from_secs(10), "the cancel", || async {
        let view = get_json(&url).await;
        (view["status"] == "completed").then_some(view)
    })
    .await;
    assert_eq!(done["output"], r#"request b-1 cancelled: {"by":"ada"}"#);
    let answer = query(&world, "b-1", "is_cancelled").await;
    assert_eq!(answer.json::<Value>().await.unwrap(), json!(true));
    // A signal to an ended run is refused, and says so.
    let late = post(&format!("{url}/signals/cancel"), json!(1)).await;
    assert_eq!(late.status(), 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_sent_before_anyone_waits_are_buffered_in_order() {
    let world = world().await;
    // Signal-with-start: the run and its first signal in one write, before the handler
    // has asked for anything.
    let response = post(
        &format!("{}/v1/workflows/approval/c-1/signal-with-start", world.gateway),
        json!({"input": {"request": "c-1", "deadline_secs": 3600}, "signal": {"name": "cancel", "payload": "first"}}),
    )
    .await;
    assert_eq!(response.status(), 202);
    let done = eventually(Duration::from_secs(10), "the run to end", || async {
        let view = get_json(&format!("{}/v1/workflows/approval/c-1", world.gateway)).await;
        (view["status"] == "completed").then_some(view)
    })
    .await;
    assert_eq!(done["output"], r#"request c-1 cancelled: "first""#);
    // The first attempt races the signal against the deadline and suspends; the suspension
    // takes the buffered signal at once, and the second attempt ends the run.
    assert_eq!(done["attempt"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_awakeable_is_resolved_once_from_outside_with_its_token() {
    let world = world().await;
    let url = format!("{}/v1/workflows/callback/k-1", world.gateway);
    assert_eq!(post(&url, json!(null)).await.status(), 202);
    let token = eventually(Duration::from_secs(10), "the token", || async {
        let answer = client()
            .get(format!("{url}/queries/token"))
            .send()
            .await
            .unwrap();
        if answer.status() != 200 {
            return None;
        }
        answer
            .json::<Value>()
            .await
            .unwrap()
            .as_str()
            .map(str::to_owned)
    })
    .await;
    // Durin does not write the token into the awakeable's journal entry (this workflow
    // chose to put it in its state, for the test).
    let run = get_json(&url).await;
    let entries = journal(&world.admin, run["id"].as_str().unwrap()).await;
    let awakeable = entries.iter().find(|e| e["kind"] == "awakeable").unwrap();
    assert!(awakeable.get("value").is_none(), "{awakeable}");
    let resolve = format!("{}/v1/awakeables/{token}/resolve", world.gateway);
    let first = post(&resolve, json!({"approved": true})).await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.json::<Value>().await.unwrap()["first"], true);
    let done = eventually(Duration::from_secs(10), "the run to end", || async {
        let view = get_json(&url).await;
        (view["status"] == "completed").then_some(view)
    })
    .await;
    assert_eq!(done["output"], json!({"resolved_with": {"approved": true}}));
    // Resolving again, or rejecting, answers the first result and changes nothing.
    let second = post(&resolve, json!({"approved": false})).await;
    assert_eq!(second.status(), 200);
    let second: Value = second.json().await.unwrap();
    assert_eq!(
        (second["first"].clone(), second["value"].clone()),
        (json!(false), json!({"approved": true}))
    );
    let reject = post(
        &format!("{}/v1/awakeables/{token}/reject", world.gateway),
        json!({"message": "too late"}),
    )
    .await;
    assert_eq!(reject.json::<Value>().await.unwrap()["first"], false);
    assert_eq!(get_json(&url).await["output"], done["output"]);
    // A token with one digit changed is refused.
    let last = token.chars().last().unwrap();
    let forged = format!(
        "{}{}",
        &token[..token.len() - 1],
        if last == '0' { '1' } else { '0' }
    );
    let refused = post(
        &format!("{}/v1/awakeables/{forged}/resolve", world.gateway),
        json!(1),
    )
    .await;
    assert_eq!(refused.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_of_one_name_reach_their_waits_in_order_each_once() {
    let world = world().await;
    let url = format!("{}/v1/workflows/inbox/i-1", world.gateway);
    // The first before the run starts (signal-with-start), the others while it runs or
    // waits: every one is kept until a wait takes it.
    let started = post(
        &format!("{url}/signal-with-start"),
        json!({"input": null, "signal": {"name": "msg", "payload": "a"}}),
    )
    .await;
    assert_eq!(started.status(), 202, "{}", started.text().await.unwrap());
    for payload in ["b", "c"] {
        assert_eq!(
            post(&format!("{url}/signals/msg"), json!(payload))
                .await
                .status(),
            202
        );
    }
    let done = eventually(Duration::from_secs(10), "the run to end", || async {
        let view = get_json(&url).await;
        (view["status"] == "completed").then_some(view)
    })
    .await;
    assert_eq!(done["output"], "abc");
    // A fourth signal after the end is refused; the journal holds three waits, each with
    // its own signal.
    assert_eq!(
        post(&format!("{url}/signals/msg"), json!("d"))
            .await
            .status(),
        409
    );
    let entries = journal(&world.admin, done["id"].as_str().unwrap()).await;
    let taken: Vec<Value> = entries
        .iter()
        .filter(|e| e["kind"] == "signal")
        .map(|e| e["completion"]["value"].clone())
        .collect();
    assert_eq!(taken, vec![json!("a"), json!("b"), json!("c")]);
}

/// A signal-with-start says what it did: started a run (`duplicate: false`, no
/// `Idempotent-Replayed`), gave the signal to the run the id names (`duplicate: false`,
/// `Idempotent-Replayed: true`), or found its signal stored already (`duplicate: true`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_with_start_says_whether_it_was_a_duplicate() {
    let world = world().await;
    let url = format!("{}/v1/workflows/inbox/i-2/signal-with-start", world.gateway);
    let send = |key: &'static str, payload: &'static str| {
        let url = url.clone();
        async move {
            let answer = client()
                .post(url)
                .header("idempotency-key", key)
                .json(&json!({"input": null, "signal": {"name": "msg", "payload": payload}}))
                .send()
                .await
                .unwrap();
            assert_eq!(answer.status(), 202);
            let replayed = answer.headers().contains_key("idempotent-replayed");
            let body: Value = answer.json().await.unwrap();
            (
                body["duplicate"].clone(),
                replayed,
                body["invocation_id"].clone(),
            )
        }
    };
    let (duplicate, replayed, run) = send("k-1", "a").await;
    assert_eq!((duplicate, replayed), (json!(false), false));
    assert_eq!(send("k-1", "a").await, (json!(true), true, run.clone()));
    assert_eq!(send("k-2", "b").await, (json!(false), true, run.clone()));
    assert_eq!(send("k-2", "b").await, (json!(true), true, run));
}

/// The tutorial's subscription: a month's durable sleep, a charge, and every three cycles
/// the run continues as new under the same workflow id, so that each run's journal stays
/// short. Seven months pass on the manual clock; three runs bill seven cycles, each cycle
/// once, and the workflow's URL, queries and long-polls follow the latest run.
#[tokio::test]
async fn a_subscription_continues_as_new_and_its_id_follows_the_latest_run() {
    let world = world().await;
    let url = format!("{}/v1/workflows/subscription/sub-1", world.gateway);
    let started = post(
        &url,
        json!({"customer_id": "ada", "amount_cents": 999, "cycles": 7, "cycles_per_run": 3}),
    )
    .await;
    assert_eq!(started.status(), 202);
    let waiting = {
        let url = url.clone();
        tokio::spawn(async move {
            client()
                .get(url)
                .header("prefer", "wait=60")
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        })
    };
    for cycle in 0..7u64 {
        eventually(Duration::from_secs(20), "the month's sleep", || async {
            let view = get_json(&url).await;
            if view["status"] == "backing-off" {
                // An attempt that failed on this busy machine (a connection refused, a
                // timeout) retries after its backoff, which the frozen clock never
                // reaches: let a minute pass (the month's sleeps are far longer).
                eprintln!("backing off: {}", view["last_error"]);
                world.clock.advance(60 * 1000);
            }
            let cycles = get_json(&format!("{url}/queries/cycles")).await;
            (view["status"] == "suspended" && cycles == json!(cycle)).then_some(())
        })
        .await;
        world.clock.advance(30 * 24 * 3600 * 1000);
    }
    let ended = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the long-poll followed the runs to the end")
        .unwrap();
    assert_eq!(ended["status"], "completed", "{ended}");
    assert_eq!(ended["output"], "ada billed 7 cycles");

    let runs = get_json(&format!("{url}/runs")).await["runs"]
        .as_array()
        .unwrap()
        .clone();
    let statuses: Vec<&str> = runs.iter().map(|r| r["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["continued", "continued", "completed"]);
    // Each run names the one it became and the one it came from.
    for pair in runs.windows(2) {
        assert_eq!(pair[0]["continued_as"], pair[1]["id"], "{runs:?}");
        assert_eq!(pair[1]["continued_from"], pair[0]["id"], "{runs:?}");
    }
    assert!(runs[0].get("continued_from").is_none(), "{runs:?}");
    assert!(runs[2].get("continued_as").is_none(), "{runs:?}");
    let mut charges = Vec::new();
    for run in &runs {
        let entries = journal(&world.admin, run["id"].as_str().unwrap()).await;
        assert!(
            entries.len() <= 13,
            "a run's journal stays short: {}",
            entries.len()
        );
        charges.extend(
            entries
                .iter()
                .filter(|e| e["name"].as_str().is_some_and(|n| n.starts_with("charge_")))
                .map(|e| e["name"].as_str().unwrap().to_owned()),
        );
        assert_eq!(run["workflow_id"], "sub-1");
    }
    let expected: Vec<String> = (0..7).map(|c| format!("charge_{c}")).collect();
    assert_eq!(charges, expected, "each cycle billed once, in order");
    let first = journal(&world.admin, runs[0]["id"].as_str().unwrap()).await;
    assert_eq!(
        first.last().unwrap()["value"]["continued_as"],
        runs[1]["id"]
    );
}

/// Near its journal's limit (80 % of 10 entries here) a run is told so, by the append that
/// crosses it, and the subscription continues as new before the limit could fail it.
#[tokio::test]
async fn a_run_near_its_journal_limit_is_told_to_continue_as_new() {
    let world = world_with(|config| config.journal_limits.max_entries = 10).await;
    let url = format!("{}/v1/workflows/subscription/sub-2", world.gateway);
    let started = post(
        &url,
        json!({"customer_id": "bob", "amount_cents": 5, "cycles": 4, "cycles_per_run": 100}),
    )
    .await;
    assert_eq!(started.status(), 202);
    for cycle in 0..4u64 {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let view = get_json(&url).await;
            let cycles = get_json(&format!("{url}/queries/cycles")).await;
            if view["status"] == "suspended" && cycles == json!(cycle) {
                break;
            }
            if std::time::Instant::now() > deadline {
                // Say what happened, run by run.
                let runs = get_json(&format!("{url}/runs")).await;
                let mut journals = Vec::new();
                for run in runs["runs"].as_array().unwrap() {
                    journals.push(journal(&world.admin, run["id"].as_str().unwrap()).await);
                }
                panic!("cycle {cycle}: {view:#}\nqueries: {cycles}\nruns: {runs:#}\njournals: {journals:#?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        world.clock.advance(30 * 24 * 3600 * 1000);
    }
    let ended = eventually(Duration::from_secs(20), "the end", || async {
        let view = get_json(&url).await;
        (view["status"] == "completed").then_some(view)
    })
    .await;
    assert_eq!(ended["output"], "bob billed 4 cycles");
    let runs = get_json(&format!("{url}/runs")).await["runs"]
        .as_array()
        .unwrap()
        .clone();
    assert!(runs.len() >= 2, "the run continued as new: {runs:#?}");
    for run in &runs {
        assert!(run["journal_length"].as_u64().unwrap() <= 10, "{run}");
    }
}

/// `schedule_to_close` bounds the whole invocation, waits included: an hour into its day's
/// sleep it fails, named after the timeout, and a waiting caller hears it. A
/// `schedule_to_start` of a minute fails an attempt that could only start an hour after
/// it was due (Durin was down, or the clock jumped), instead of running it late.
#[tokio::test]
async fn schedule_to_close_and_schedule_to_start_fail_what_is_too_late() {
    let world = world().await;
    let started = post(
        &format!("{}/v1/send/bounded/run", world.gateway),
        json!(null),
    )
    .await;
    let bounded = started.json::<Value>().await.unwrap()["invocation_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let started = post(
        &format!("{}/v1/send/bounded/punctual", world.gateway),
        json!(null),
    )
    .await;
    let punctual = started.json::<Value>().await.unwrap()["invocation_id"]
        .as_str()
        .unwrap()
        .to_owned();
    for id in [&bounded, &punctual] {
        eventually(Duration::from_secs(10), "the sleep", || async {
            let view = get_json(&format!("{}/v1/invocations/{id}", world.gateway)).await;
            (view["status"] == "suspended").then_some(())
        })
        .await;
    }
    let view = get_json(&format!("{}/v1/invocations/{bounded}", world.gateway)).await;
    assert!(view["deadline"].is_string(), "{view}");
    let waiting = {
        let url = format!("{}/v1/invocations/{bounded}", world.gateway);
        tokio::spawn(async move {
            client()
                .get(url)
                .header("prefer", "wait=30")
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        })
    };
    // Two days later: the deadline (an hour) has passed, and the timer (a day) is an hour
    // past due.
    world.clock.advance(25 * 3600 * 1000);
    let view = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the caller was woken")
        .unwrap();
    assert_eq!(view["status"], "failed", "{view}");
    assert_eq!(view["failure"]["type"], "ScheduleToCloseTimeout", "{view}");
    assert_eq!(view["failure"]["status"], 504);
    let view = eventually(Duration::from_secs(10), "the late attempt", || async {
        let view = get_json(&format!("{}/v1/invocations/{punctual}", world.gateway)).await;
        (view["status"] == "failed").then_some(view)
    })
    .await;
    assert_eq!(view["failure"]["type"], "ScheduleToStartTimeout", "{view}");
    assert!(
        view["failure"]["message"].as_str().unwrap().contains("1h"),
        "{view}"
    );
}

/// Updates: validated before anything is journaled (a refusal leaves no trace), handled
/// once under one `Idempotency-Key`, answered with their result, and replayed with the
/// run (the count the run ends with is rebuilt from them).
#[tokio::test]
async fn updates_are_validated_handled_once_and_replayed() {
    let world = world().await;
    let url = format!("{}/v1/workflows/counter/c-1", world.gateway);
    assert_eq!(post(&url, json!(null)).await.status(), 202);
    let run = eventually(Duration::from_secs(10), "the run to wait", || async {
        let view = get_json(&url).await;
        (view["status"] == "suspended").then_some(view)
    })
    .await;
    let id = run["id"].as_str().unwrap().to_owned();
    let update = |n: Value, key: Option<&'static str>| {
        let url = format!("{url}/updates/add");
        async move {
            let mut request = client().post(url).json(&n);
            if let Some(key) = key {
                request = request.header("idempotency-key", key);
            }
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let replayed = response.headers().contains_key("idempotent-replayed");
            (status, response.json::<Value>().await.unwrap(), replayed)
        }
    };
    assert_eq!(update(json!(5), None).await, (200, json!(5), false));
    let before = journal(&world.admin, &id).await.len();
    let (status, problem, _) = update(json!(-1), None).await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(problem["type"], "urn:durin:problem:update-refused");
    assert!(
        problem["detail"].as_str().unwrap().contains("positive"),
        "{problem}"
    );
    let (status, problem, _) = update(json!("five"), None).await;
    assert_eq!(status, 400, "{problem}");
    assert_eq!(
        journal(&world.admin, &id).await.len(),
        before,
        "a refusal journals nothing"
    );

    assert_eq!(
        update(json!(2), Some("add-2")).await,
        (200, json!(7), false)
    );
    assert_eq!(update(json!(2), Some("add-2")).await, (200, json!(7), true));
    let unknown = client()
        .post(format!("{url}/updates/nope"))
        .json(&1)
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let kinds: Vec<String> = journal(&world.admin, &id)
        .await
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| *k == "update").count(),
        2,
        "{kinds:?}"
    );
    assert_eq!(get_json(&format!("{url}/queries/count")).await, json!(7));

    // The run replays its updates when it goes on, and ends with their sum.
    let stop = post(&format!("{url}/signals/stop"), json!(null)).await;
    assert_eq!(stop.status(), 202);
    let ended = eventually(Duration::from_secs(10), "the run to end", || async {
        let view = get_json(&url).await;
        (view["status"] == "completed").then_some(view)
    })
    .await;
    assert_eq!(ended["output"], 7, "{ended}");
    let (status, problem, _) = update(json!(1), None).await;
    assert_eq!(status, 409, "{problem}");
    assert_eq!(problem["type"], "urn:durin:problem:invocation-state");
}

/// An update whose handler waits (here for a signal) holds the run at that wait; another
/// update sent meanwhile waits its turn: the run does not spin, and both are answered
/// once the first one's wait is over.
#[tokio::test]
async fn an_update_that_waits_holds_the_next_one_without_spinning() {
    let world = world().await;
    let url = format!("{}/v1/workflows/gate/g-1", world.gateway);
    assert_eq!(post(&url, json!(null)).await.status(), 202);
    let run = eventually(Duration::from_secs(10), "the run to wait", || async {
        let view = get_json(&url).await;
        (view["status"] == "suspended").then_some(view)
    })
    .await;
    let id = run["id"].as_str().unwrap().to_owned();
    let send = |body: Value| {
        let url = format!("{url}/updates/pass");
        tokio::spawn(async move {
            client()
                .post(url)
                .header("prefer", "wait=20")
                .json(&body)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        })
    };
    let first = send(json!("first"));
    eventually(
        Duration::from_secs(10),
        "the first update to wait",
        || async {
            let kinds: Vec<String> = journal(&world.admin, &id)
                .await
                .iter()
                .map(|e| e["kind"].as_str().unwrap().to_owned())
                .collect();
            (kinds.contains(&"update".to_owned()) && get_json(&url).await["status"] == "suspended")
                .then_some(())
        },
    )
    .await;
    let second = send(json!("second"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let attempts = get_json(&url).await["attempt"].as_u64().unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = get_json(&url).await;
    assert!(
        later["attempt"].as_u64().unwrap() <= attempts + 1,
        "the run spins: {attempts} then {later}"
    );
    let opened = post(&format!("{url}/signals/open"), json!(null)).await;
    assert_eq!(opened.status(), 202);
    assert_eq!(first.await.unwrap(), json!("first passed"));
    assert_eq!(second.await.unwrap(), json!("second passed"));
}
