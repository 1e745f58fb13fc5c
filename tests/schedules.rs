//! Schedules end to end: the overlap policies, pause, trigger and backfill on a clock moved
//! by hand (in-process, the approval example served by the Rust SDK), a schedule the
//! config manages, bad input; and a schedule that fires across a kill -9 of the real
//! `durin` binary and catches up every missed fire exactly once.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use durin::clock::ManualClock;
use serde_json::{json, Value};
use support::{client, eventually, get_json, register, start_order, GatewayHome};
use tokio_util::sync::CancellationToken;

/// 2023-11-14T22:13:20Z.
const T0: i64 = 1_700_000_000_000;
const HOUR: i64 = 3_600_000;

struct World {
    gateway: String,
    admin: String,
    clock: Arc<ManualClock>,
    _shutdown: tokio_util::sync::DropGuard,
    _dir: tempfile::TempDir,
}

/// The gateway on a manual clock, with the order example registered and the config's
/// schedule `nightly`.
async fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let nightly: durin::schedules::ScheduleSpec = serde_json::from_value(json!({
        "cron": "0 3 * * *",
        "time_zone": "Europe/Berlin",
        "start": {"workflow": "approval", "input": {"request": "nightly", "deadline_secs": 60}}
    }))
    .unwrap();
    let config = durin::config::Config {
        database_url: format!("sqlite:{}", dir.path().join("durin.db").display()),
        drain_timeout: Duration::from_secs(1),
        schedules: [("nightly".to_owned(), nightly)].into(),
        ..durin::config::Config::default()
    };
    let clock = Arc::new(ManualClock::new(T0));
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
    tokio::spawn(order_example::endpoint(args).serve(handler));
    // The admin listener answers once the gateway serves.
    eventually(Duration::from_secs(20), "the gateway", || async {
        client()
            .get(format!("{admin}/health"))
            .send()
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    register(&admin, &handler_url).await;
    World {
        gateway,
        admin,
        clock,
        _shutdown: shutdown.drop_guard(),
        _dir: dir,
    }
}

impl World {
    fn schedule(&self, id: &str) -> String {
        format!("{}/v1/schedules/{id}", self.admin)
    }

    async fn put(&self, id: &str, spec: Value) -> (u16, Value) {
        let response = client()
            .put(self.schedule(id))
            .json(&spec)
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    }

    async fn post(&self, id: &str, verb: &str, body: Value) -> (u16, Value) {
        let response = client()
            .post(format!("{}/{verb}", self.schedule(id)))
            .json(&body)
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    }

    /// Moves the clock to `at_ms` and waits until the schedule's look at it is done:
    /// until `check` holds for its view.
    async fn at(&self, at_ms: i64, id: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let now = durin::clock::Clock::now_ms(&*self.clock);
        self.clock.advance((at_ms - now).max(0));
        self.until(id, what, check).await
    }

    async fn until(&self, id: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let url = self.schedule(id);
        eventually(Duration::from_secs(20), what, || async {
            let view = get_json(&url).await;
            check(&view).then_some(view)
        })
        .await
    }

    /// The status of the run a workflow id names, once `check` holds for it.
    async fn run_status(&self, workflow_id: &str, check: impl Fn(&str) -> bool) -> String {
        let url = format!("{}/v1/workflows/approval/{workflow_id}", self.gateway);
        eventually(Duration::from_secs(20), workflow_id, || async {
            let response = client().get(&url).send().await.ok()?;
            if response.status() != 200 {
                return None;
            }
            let view: Value = response.json().await.ok()?;
            let status = view["status"].as_str()?.to_owned();
            check(&status).then_some(status)
        })
        .await
    }

    async fn signal_cancel(&self, workflow_id: &str) {
        let response = client()
            .post(format!(
                "{}/v1/workflows/approval/{workflow_id}/signals/cancel",
                self.gateway
            ))
            .json(&json!("done by the test"))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "{}", response.status());
    }

    /// How many runs of `approval` exist.
    async fn approval_runs(&self) -> usize {
        let list = get_json(&format!(
            "{}/v1/invocations?service=approval&limit=1000",
            self.admin
        ))
        .await;
        list["invocations"].as_array().unwrap().len()
    }
}

fn first_fire(view: &Value) -> &Value {
    &view["recent"][0]
}

fn approvals(overlap: &str) -> Value {
    json!({
        "every": "1h",
        "overlap": overlap,
        "start": {"workflow": "approval", "input": {"request": "hourly", "deadline_secs": 86400}}
    })
}

fn iso(ms: i64) -> String {
    durin::schedules::spec::rfc3339(ms)
}

#[tokio::test]
async fn overlap_policies_pause_trigger_and_backfill_on_a_clock_moved_by_hand() {
    let w = world().await;
    let h23 = 1_699_999_200_000 + HOUR; // 2023-11-14T23:00:00Z
    assert_eq!(iso(h23), "2023-11-14T23:00:00Z");
    let wid = |ms: i64| format!("hourly-{}", iso(ms));

    // Created: it fires from the next full hour.
    let (status, view) = w.put("hourly", approvals("skip")).await;
    assert_eq!(status, 201, "{view}");
    assert_eq!(view["next_fires"][0], iso(h23));
    assert_eq!(view["next_fires"].as_array().unwrap().len(), 5);
    assert_eq!(view["source"], "api");

    // 23:00 starts a run under the fire's workflow id.
    let view = w
        .at(h23, "hourly", "the 23:00 fire", |v| {
            v["counts"]["started"] == 1
        })
        .await;
    assert_eq!(first_fire(&view)["outcome"], "started");
    assert_eq!(first_fire(&view)["workflow_id"], wid(h23));
    w.run_status(&wid(h23), |s| s == "suspended").await;

    // skip: at 0:00 the 23:00 run has not ended, so the fire is skipped.
    let view = w
        .at(h23 + HOUR, "hourly", "the 0:00 fire skipped", |v| {
            v["counts"]["skipped"] == 1
        })
        .await;
    assert!(
        first_fire(&view)["detail"]
            .as_str()
            .unwrap()
            .contains(&wid(h23)),
        "{view}"
    );

    // buffer_one: at 1:00 the fire waits; at 2:00 one waits already, so it is skipped;
    // once the 23:00 run ends, the 1:00 fire starts.
    let (status, _) = w.put("hourly", approvals("buffer_one")).await;
    assert_eq!(status, 200);
    let view = w
        .at(h23 + 2 * HOUR, "hourly", "the 1:00 fire waiting", |v| {
            v["buffered"] == iso(h23 + 2 * HOUR)
        })
        .await;
    assert_eq!(first_fire(&view)["outcome"], "buffered");
    let view = w
        .at(h23 + 3 * HOUR, "hourly", "the 2:00 fire skipped", |v| {
            v["counts"]["skipped"] == 2
        })
        .await;
    assert!(
        first_fire(&view)["detail"]
            .as_str()
            .unwrap()
            .contains("waits already"),
        "{view}"
    );
    w.signal_cancel(&wid(h23)).await;
    w.run_status(&wid(h23), |s| s == "completed").await;
    // A waiting fire looks again each second of the gateway's clock.
    w.clock.advance(1_000);
    let view = w
        .until("hourly", "the buffered fire started", |v| {
            v["counts"]["started"] == 2
        })
        .await;
    assert_eq!(first_fire(&view)["workflow_id"], wid(h23 + 2 * HOUR));
    assert_eq!(view["buffered"], Value::Null);
    assert_eq!(view["running"], json!([wid(h23 + 2 * HOUR)]));

    // cancel_other: at 3:00 the 1:00 run is cancelled (the SDK's await gets the
    // cancellation, the run ends cancelled), then the 3:00 fire starts.
    let (status, _) = w.put("hourly", approvals("cancel_other")).await;
    assert_eq!(status, 200);
    w.clock.advance(HOUR);
    w.run_status(&wid(h23 + 2 * HOUR), |s| s == "cancelled")
        .await;
    w.clock.advance(1_000);
    let view = w
        .until("hourly", "the 3:00 fire started", |v| {
            v["counts"]["started"] == 3
        })
        .await;
    assert_eq!(first_fire(&view)["workflow_id"], wid(h23 + 4 * HOUR));

    // allow_all: at 4:00 a second run starts beside the 3:00 one.
    let (status, _) = w.put("hourly", approvals("allow_all")).await;
    assert_eq!(status, 200);
    let view = w
        .at(h23 + 5 * HOUR, "hourly", "the 4:00 fire", |v| {
            v["counts"]["started"] == 4
        })
        .await;
    assert_eq!(view["running"].as_array().unwrap().len(), 2, "{view}");
    w.run_status(&wid(h23 + 5 * HOUR), |s| s == "suspended")
        .await;

    // Paused: nothing fires, none is due, and the fires it slept through are not made up.
    let (status, view) = w
        .post("hourly", "pause", json!({"note": "maintenance"}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(view["paused"], true);
    assert_eq!(view["note"], "maintenance");
    assert_eq!(view["next_fires"], json!([]));
    w.clock.advance(2 * HOUR + 1);
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let (status, view) = w.post("hourly", "unpause", json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(view["counts"]["started"], 4, "{view}");
    assert_eq!(view["next_fires"][0], iso(h23 + 8 * HOUR));

    // Trigger: one fire now, by hand.
    let now = durin::clock::Clock::now_ms(&*w.clock);
    let (status, answer) = w.post("hourly", "trigger", json!({})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["fires"][0]["outcome"], "started");
    assert_eq!(answer["fires"][0]["by"], "trigger");
    assert_eq!(answer["fires"][0]["workflow_id"], wid(now));

    // Backfill: the fires of 20:00 to 23:00 start, each under its own id; 23:00 ran
    // already, and a second backfill of the range starts nothing.
    let runs_before = w.approval_runs().await;
    let range = json!({"from": iso(h23 - 3 * HOUR), "to": iso(h23)});
    let (status, answer) = w.post("hourly", "backfill", range.clone()).await;
    assert_eq!(status, 200, "{answer}");
    let outcomes: Vec<&str> = answer["fires"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        outcomes,
        ["started", "started", "started", "already_started"]
    );
    assert_eq!(w.approval_runs().await, runs_before + 3);
    let (_, again) = w.post("hourly", "backfill", range).await;
    assert!(again["fires"]
        .as_array()
        .unwrap()
        .iter()
        .all(|f| f["outcome"] == "already_started"));
    assert_eq!(w.approval_runs().await, runs_before + 3);

    // Deleted: it fires no more; its runs go on.
    let response = client().delete(w.schedule("hourly")).send().await.unwrap();
    assert_eq!(response.status(), 204);
    let response = client().get(w.schedule("hourly")).send().await.unwrap();
    assert_eq!(response.status(), 404);
    w.run_status(&wid(h23 + 5 * HOUR), |s| s == "suspended")
        .await;
}

#[tokio::test]
async fn the_config_manages_its_schedules_and_bad_input_is_refused() {
    let w = world().await;
    // 3:00 in Berlin is 2:00 UTC in November.
    let view = get_json(&w.schedule("nightly")).await;
    assert_eq!(view["source"], "config");
    assert_eq!(view["next_fires"][0], "2023-11-15T02:00:00Z");
    let (status, problem) = w.put("nightly", approvals("skip")).await;
    assert_eq!(status, 409);
    assert!(
        problem["detail"].as_str().unwrap().contains("config file"),
        "{problem}"
    );
    let response = client().delete(w.schedule("nightly")).send().await.unwrap();
    assert_eq!(response.status(), 409);
    // Operators may still pause it.
    let (status, view) = w.post("nightly", "pause", json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(view["paused"], true);

    let list = get_json(&format!("{}/v1/schedules", w.admin)).await;
    assert_eq!(list["schedules"].as_array().unwrap().len(), 1);

    for (spec, says) in [
        (
            json!({"cron": "61 * * * *", "start": {"workflow": "approval"}}),
            "cron",
        ),
        (
            json!({"every": "1h", "start": {"workflow": "approval"}, "color": "red"}),
            "unknown field",
        ),
        (json!({"every": "1h"}), "start"),
        (
            json!({"cron": "0 9 * * *", "time_zone": "Nowhere/Else", "start": {"workflow": "approval"}}),
            "time zone",
        ),
        (
            json!({"every": "1h", "overlap": "sometimes", "start": {"workflow": "approval"}}),
            "unknown variant",
        ),
    ] {
        let response = client()
            .put(w.schedule("bad"))
            .json(&spec)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{spec}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        let problem: Value = response.json().await.unwrap();
        assert!(
            problem["detail"].as_str().unwrap().contains(says),
            "{spec}: {problem}"
        );
    }
    let response = client()
        .put(format!("{}/v1/schedules/not%20a%20name", w.admin))
        .json(&approvals("skip"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    // Nothing was stored.
    let list = get_json(&format!("{}/v1/schedules", w.admin)).await;
    assert_eq!(list["schedules"].as_array().unwrap().len(), 1);

    let (status, _) = w.put("hourly", approvals("skip")).await;
    assert_eq!(status, 201);
    let future = iso(T0 + 10 * HOUR);
    let (status, problem) = w
        .post("hourly", "backfill", json!({"from": iso(T0), "to": future}))
        .await;
    assert_eq!(status, 400);
    assert!(problem["detail"].as_str().unwrap().contains("future"));
    let (status, problem) = w
        .post(
            "hourly",
            "backfill",
            json!({"from": iso(T0 - 2000 * HOUR), "to": iso(T0)}),
        )
        .await;
    assert_eq!(status, 400);
    assert!(problem["detail"].as_str().unwrap().contains("in parts"));
    let (status, _) = w.post("nope", "trigger", json!({})).await;
    assert_eq!(status, 404);
    // A workflow no deployment serves: the trigger says so and starts nothing.
    let (status, _) = w
        .put(
            "orphan",
            json!({"every": "1h", "start": {"workflow": "nobody"}}),
        )
        .await;
    assert_eq!(status, 201);
    let (status, problem) = w.post("orphan", "trigger", json!({})).await;
    assert_eq!(status, 404);
    assert!(problem["detail"]
        .as_str()
        .unwrap()
        .contains("no deployment"));
}

/// Every second a `batch/run` starts; Durin is killed with SIGKILL and stays down for
/// three seconds; once back, it starts the fires it missed, and every second from the
/// first fire to the last has exactly one run, each completed.
#[tokio::test]
async fn a_schedule_fires_across_a_kill_of_durin_and_catches_up_exactly_once() {
    let mut order = start_order(None, &[]);
    let home = GatewayHome::new();
    let mut durin = home.start(None);
    let gateway = durin.url.clone();
    register(&durin.admin, &order.url).await;
    let spec = json!({
        "every": "1s",
        "overlap": "allow_all",
        "start": {"workflow": "batch", "input": {"items": 1, "item_ms": 1}}
    });
    let response = client()
        .put(format!("{}/v1/schedules/tick", durin.admin))
        .json(&spec)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let started = |admin: String| async move {
        let view = get_json(&format!("{admin}/v1/schedules/tick")).await;
        view["counts"]["started"].as_u64().unwrap_or(0)
    };
    let admin = durin.admin.clone();
    eventually(Duration::from_secs(30), "three fires", || {
        let admin = admin.clone();
        async move { (started(admin).await >= 3).then_some(()) }
    })
    .await;
    durin.kill();
    let down_at = std::time::SystemTime::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let address: std::net::SocketAddr = gateway.trim_start_matches("http://").parse().unwrap();
    let mut durin = home.start(Some(address));
    let admin = durin.admin.clone();
    // Fires well after the restart show the catch-up is over.
    let restarted_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    eventually(Duration::from_secs(30), "fires after the restart", || {
        let admin = admin.clone();
        async move {
            let view = get_json(&format!("{admin}/v1/schedules/tick")).await;
            let newest = view["recent"][0]["fire_time"].as_str()?.to_owned();
            let newest = durin::schedules::spec::parse_time("t", &newest).ok()?;
            (newest >= restarted_ms + 2_000).then_some(())
        }
    })
    .await;
    let response = client()
        .post(format!("{admin}/v1/schedules/tick/pause"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let view = get_json(&format!("{admin}/v1/schedules/tick")).await;

    // Every batch run, by workflow id: one per second from the first to the last.
    let list = get_json(&format!("{admin}/v1/invocations?service=batch&limit=1000")).await;
    let mut ids: Vec<String> = list["invocations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["workflow_id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    let count = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), count, "a fire started twice: {ids:?}");
    let times: Vec<i64> = ids
        .iter()
        .map(|id| durin::schedules::spec::parse_time("t", id.trim_start_matches("tick-")).unwrap())
        .collect();
    for pair in times.windows(2) {
        assert_eq!(pair[1] - pair[0], 1_000, "a fire is missing: {ids:?}");
    }
    let down_ms = down_at
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let during_downtime = times
        .iter()
        .filter(|t| **t > down_ms + 500 && **t < restarted_ms - 500)
        .count();
    assert!(
        during_downtime >= 2,
        "the fires of the 3 s down were not made up: {ids:?}"
    );
    assert_eq!(
        view["counts"]["started"].as_u64().unwrap() as usize,
        count,
        "{view}"
    );
    assert_eq!(view["counts"]["missed"], 0);
    // A fire that found its run started already was looked at twice.
    let twice: Vec<&Value> = view["recent"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["outcome"] == "already_started")
        .collect();
    assert!(twice.is_empty(), "{twice:?}");
    for id in &ids {
        let url = format!("{gateway}/v1/workflows/batch/{id}");
        eventually(Duration::from_secs(30), id, || {
            let url = url.clone();
            async move {
                let view = get_json(&url).await;
                (view["status"] == "completed").then_some(())
            }
        })
        .await;
    }
    durin.kill();
    order.kill();
}

/// Three nodes on one PostgreSQL database look at the same schedule (every second,
/// `allow_all`); one is killed with SIGKILL midway. Every fire from the first to the last
/// started exactly one run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_start_each_fire_once() {
    if !support::require("postgres") {
        return;
    }
    let order = start_order(None, &[]);
    let home = GatewayHome::cluster("2s");
    let mut nodes: Vec<support::Proc> = (0..3).map(|_| home.start(None)).collect();
    register(&nodes[0].admin, &order.url).await;
    let admin = nodes[1].admin.clone();
    let response = client()
        .put(format!("{admin}/v1/schedules/tick"))
        .json(&json!({
            "every": "1s",
            "overlap": "allow_all",
            "start": {"workflow": "batch", "input": {"items": 1, "item_ms": 1}}
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let fires = |admin: String, at_least: u64| async move {
        eventually(Duration::from_secs(60), "fires", || {
            let admin = admin.clone();
            async move {
                let view = get_json(&format!("{admin}/v1/schedules/tick")).await;
                (view["counts"]["started"].as_u64()? >= at_least).then_some(())
            }
        })
        .await
    };
    fires(admin.clone(), 4).await;
    nodes[0].kill();
    let before = get_json(&format!("{admin}/v1/schedules/tick")).await["counts"]["started"]
        .as_u64()
        .unwrap();
    fires(admin.clone(), before + 4).await;
    let response = client()
        .post(format!("{admin}/v1/schedules/tick/pause"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let view = get_json(&format!("{admin}/v1/schedules/tick")).await;
    let list = get_json(&format!("{admin}/v1/invocations?service=batch&limit=1000")).await;
    let mut ids: Vec<String> = list["invocations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["workflow_id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    let count = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), count, "a fire started twice: {ids:?}");
    let times: Vec<i64> = ids
        .iter()
        .map(|id| durin::schedules::spec::parse_time("t", id.trim_start_matches("tick-")).unwrap())
        .collect();
    for pair in times.windows(2) {
        assert_eq!(pair[1] - pair[0], 1_000, "a fire is missing: {ids:?}");
    }
    assert_eq!(
        view["counts"]["started"].as_u64().unwrap() as usize,
        count,
        "{view}"
    );
    assert!(
        view["recent"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["outcome"] == "started"),
        "a fire was looked at twice: {view}"
    );
    for node in &mut nodes[1..] {
        node.kill();
    }
}
