//! The signal storm: no accepted signal is lost or doubled across continue-as-new and
//! `kill -9`.
//!
//! Twenty `tally/run` workflows (the `order` example) consume `add` signals and continue
//! as new every three of them. Sixteen senders send 600 `add` signals, each with its own
//! `Idempotency-Key` (the key in its body): about a fifth are sent twice with the same key,
//! a little later, and about a quarter go through signal-with-start instead of the
//! workflow's signal route. A sender sends again, with the same key, whatever got no
//! answer or a `5xx`, and a `409` (the run it reached had just continued). Durin is killed
//! with SIGKILL twice in the middle of the storm and restarted on the same store. Then
//! every workflow is sent `finish`, and its last run's output carries every key its runs
//! consumed: each accepted key must be there exactly once, and each workflow id must have
//! exactly one run that did not continue, its last.
//!
//! With `DURIN_TEST_STORE=postgres` the same storm runs on a PostgreSQL schema.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

const WORKFLOWS: usize = 20;
const SENDERS: usize = 16;
const SIGNALS: usize = 600;
/// `add` signals per run before it continues as new.
const PER_RUN: u32 = 3;
/// Of every 100 keys, how many are sent twice, and how many through signal-with-start.
const DUPLICATED_PERCENT: u64 = 20;
const WITH_START_PERCENT: u64 = 25;
/// How long one key may take to be accepted (Durin restarts meanwhile).
const SEND_LIMIT: Duration = Duration::from_secs(40);

/// A small deterministic generator (xorshift64*), so that every run sends the same storm.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn workflow_id(w: usize) -> String {
    format!("storm-{w:02}")
}

fn counter_input() -> Value {
    json!({"consumed": [], "per_run": PER_RUN})
}

/// One `add` signal: its key, its workflow, and the route it goes through.
#[derive(Clone, Debug)]
struct Add {
    key: String,
    workflow: usize,
    with_start: bool,
}

/// What the senders saw.
#[derive(Default)]
struct Seen {
    /// Keys Durin answered 2xx for, per workflow.
    accepted: HashMap<usize, HashSet<String>>,
    /// Keys never accepted within [`SEND_LIMIT`], with the last answer.
    unaccepted: Vec<String>,
    /// Requests sent, answers per kind.
    requests: usize,
    answered_2xx: usize,
    duplicate_answers: usize,
    conflicts: usize,
    server_errors: usize,
    connection_errors: usize,
}

/// Sends `add` until Durin answers 2xx (sending again, with the same key, after a
/// connection error, a 5xx or a 409), or [`SEND_LIMIT`] passes.
async fn send_add(
    http: &reqwest::Client,
    gateway: &str,
    add: &Add,
    seen: &Mutex<Seen>,
    progress: &AtomicUsize,
) {
    let id = workflow_id(add.workflow);
    let payload = json!({ "key": add.key });
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < SEND_LIMIT {
        progress.fetch_add(1, Ordering::SeqCst);
        let request = if add.with_start {
            http.post(format!(
                "{gateway}/v1/workflows/tally/{id}/signal-with-start"
            ))
            .json(&json!({
                "input": counter_input(),
                "signal": {"name": "add", "payload": payload},
            }))
        } else {
            http.post(format!("{gateway}/v1/workflows/tally/{id}/signals/add"))
                .json(&payload)
        };
        let answer = request
            .header("idempotency-key", &add.key)
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        seen.lock().unwrap().requests += 1;
        match answer {
            Ok(response) if response.status().is_success() => {
                let body: Value = response.json().await.unwrap_or(Value::Null);
                let mut seen = seen.lock().unwrap();
                seen.answered_2xx += 1;
                if body["duplicate"] == true {
                    seen.duplicate_answers += 1;
                }
                seen.accepted
                    .entry(add.workflow)
                    .or_default()
                    .insert(add.key.clone());
                return;
            }
            Ok(response) => {
                let status = response.status();
                last = format!("{status} {}", response.text().await.unwrap_or_default());
                {
                    let mut seen = seen.lock().unwrap();
                    if status.as_u16() == 409 {
                        seen.conflicts += 1;
                    } else if status.is_server_error() {
                        seen.server_errors += 1;
                    } else {
                        // Any other refusal is for good: the storm is not what it claims.
                        seen.unaccepted.push(format!("{}: {last}", add.key));
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(error) => {
                last = error.to_string();
                seen.lock().unwrap().connection_errors += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    seen.lock()
        .unwrap()
        .unaccepted
        .push(format!("{}: {last}", add.key));
}

/// Sends `finish` to a workflow id until Durin answers 2xx.
async fn send_finish(http: &reqwest::Client, gateway: &str, w: usize) -> Result<(), String> {
    let id = workflow_id(w);
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < SEND_LIMIT {
        let answer = http
            .post(format!("{gateway}/v1/workflows/tally/{id}/signals/finish"))
            .header("idempotency-key", format!("finish-{id}"))
            .json(&Value::Null)
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        match answer {
            Ok(response) if response.status().is_success() => return Ok(()),
            Ok(response) => {
                last = format!(
                    "{} {}",
                    response.status(),
                    response.text().await.unwrap_or_default()
                );
            }
            Err(error) => last = error.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("finish to {id} never accepted: {last}"))
}

/// The end of one workflow id: its last run's view (or the latest run's when it did not
/// complete in time), the keys its runs consumed, and its runs' statuses.
struct Outcome {
    status: String,
    consumed: Vec<String>,
    runs: Vec<String>,
}

async fn outcome(http: &reqwest::Client, gateway: &str, w: usize, until: Instant) -> Outcome {
    let id = workflow_id(w);
    let url = format!("{gateway}/v1/workflows/tally/{id}");
    let mut view = Value::Null;
    while Instant::now() < until {
        let left = until.saturating_duration_since(Instant::now()).as_secs();
        let answer = http
            .get(&url)
            .header("prefer", format!("wait={}", left.clamp(1, 5)))
            .send()
            .await;
        if let Ok(response) = answer {
            if let Ok(body) = response.json::<Value>().await {
                view = body;
            }
        }
        if matches!(
            view["status"].as_str(),
            Some("completed" | "failed" | "cancelled" | "terminated" | "paused")
        ) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = view["status"].as_str().unwrap_or("unknown").to_owned();
    // Completed: the output carries every key. Otherwise what the latest run has consumed
    // so far (its `consumed` query), so that the figures still mean something.
    let consumed = if status == "completed" {
        view["output"]["consumed"].clone()
    } else {
        get_json(&format!("{url}/queries/consumed")).await
    };
    let consumed = consumed
        .as_array()
        .map(|keys| {
            keys.iter()
                .filter_map(|k| k.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let runs = get_json(&format!("{url}/runs")).await["runs"]
        .as_array()
        .map(|runs| {
            runs.iter()
                .map(|r| r["status"].as_str().unwrap_or("unknown").to_owned())
                .collect()
        })
        .unwrap_or_default();
    Outcome {
        status,
        consumed,
        runs,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_accepted_signal_is_lost_or_doubled_across_continue_as_new_and_kill_9() {
    if !support::require_store() {
        return;
    }
    let test_started = Instant::now();
    let store = std::env::var("DURIN_TEST_STORE").unwrap_or_else(|_| "sqlite".into());
    let home = GatewayHome::new();
    let mut gateway = home.start(None);
    let handler = start_order(None, &[]);
    register(&gateway.admin, &handler.url).await;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(SENDERS)
        .build()
        .unwrap();
    let base = gateway.url.clone();

    for w in 0..WORKFLOWS {
        let response = http
            .post(format!("{base}/v1/workflows/tally/{}", workflow_id(w)))
            .json(&counter_input())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
    }

    // The storm's plan: each key's workflow and route; duplicates go a few sends later, so
    // that the run that took the first has often continued by then.
    let mut rng = Rng(0x005E_ED0F_D0A1_u64);
    let mut plans: Vec<Vec<Add>> = vec![Vec::new(); SENDERS];
    let mut delayed: Vec<Vec<(usize, Add)>> = vec![Vec::new(); SENDERS];
    for i in 0..SIGNALS {
        let workflow = rng.below(WORKFLOWS as u64) as usize;
        let add = Add {
            key: format!("{}-k{i:03}", workflow_id(workflow)),
            workflow,
            with_start: rng.below(100) < WITH_START_PERCENT,
        };
        let (plan, delayed) = (&mut plans[i % SENDERS], &mut delayed[i % SENDERS]);
        plan.push(add.clone());
        if rng.below(100) < DUPLICATED_PERCENT {
            delayed.push((plan.len() + 2 + rng.below(4) as usize, add));
        }
        while let Some(due) = delayed.iter().position(|(at, _)| *at <= plan.len()) {
            plan.push(delayed.remove(due).1);
        }
    }
    for (plan, delayed) in plans.iter_mut().zip(delayed) {
        plan.extend(delayed.into_iter().map(|(_, add)| add));
    }
    // Each sender pauses 20 to 120 ms after each key, so that the storm lasts a few seconds
    // and its signals meet runs that continue as new.
    let pauses: Vec<Vec<u64>> = plans
        .iter()
        .map(|plan| plan.iter().map(|_| 20 + rng.below(100)).collect())
        .collect();
    let total_sends: usize = plans.iter().map(Vec::len).sum();
    let duplicated = total_sends - SIGNALS;
    let with_start = plans
        .iter()
        .flatten()
        .filter(|a| a.with_start)
        .map(|a| &a.key)
        .collect::<HashSet<_>>()
        .len();

    let seen = Arc::new(Mutex::new(Seen::default()));
    let progress = Arc::new(AtomicUsize::new(0));
    let storm_started = Instant::now();
    let mut senders = Vec::new();
    for (plan, pauses) in plans.into_iter().zip(pauses) {
        let (http, base, seen, progress) = (
            http.clone(),
            base.clone(),
            Arc::clone(&seen),
            Arc::clone(&progress),
        );
        senders.push(tokio::spawn(async move {
            for (add, pause) in plan.iter().zip(pauses) {
                send_add(&http, &base, add, &seen, &progress).await;
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        }));
    }

    // Two SIGKILLs in the middle of the storm, each followed by a restart on the same store
    // and address.
    let mut kills = Vec::new();
    for fraction in [0.3, 0.65] {
        let threshold = (total_sends as f64 * fraction) as usize;
        while progress.load(Ordering::SeqCst) < threshold
            && !senders.iter().all(|s| s.is_finished())
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The sends so far, and whether the storm still goes on (the kill is in its middle).
        let at = (
            progress.load(Ordering::SeqCst),
            !senders.iter().all(|s| s.is_finished()),
        );
        gateway.kill();
        tokio::time::sleep(Duration::from_millis(150)).await;
        let addr = gateway.addr;
        gateway = tokio::task::block_in_place(|| home.start(Some(addr)));
        kills.push(at);
    }
    for sender in senders {
        sender.await.unwrap();
    }
    let storm = storm_started.elapsed();

    // Finish every workflow, then read what each consumed.
    let mut problems = Vec::new();
    for w in 0..WORKFLOWS {
        if let Err(problem) = send_finish(&http, &base, w).await {
            problems.push(problem);
        }
    }
    let until = Instant::now() + Duration::from_secs(30);
    let mut outcomes = Vec::new();
    for w in 0..WORKFLOWS {
        let (http, base) = (http.clone(), base.clone());
        outcomes.push(tokio::spawn(async move {
            outcome(&http, &base, w, until).await
        }));
    }
    let mut ends = Vec::new();
    for outcome in outcomes {
        ends.push(outcome.await.unwrap());
    }

    // The figures.
    let seen = seen.lock().unwrap();
    let accepted: usize = seen.accepted.values().map(HashSet::len).sum();
    let (mut delivered, mut lost, mut doubled, mut phantom) = (0, 0, 0, 0);
    let (mut continued, mut extra_live) = (0, 0);
    let mut live_runs = BTreeMap::new();
    let mut examples = Vec::new();
    for (w, end) in ends.iter().enumerate() {
        let id = workflow_id(w);
        let empty = HashSet::new();
        let expected = seen.accepted.get(&w).unwrap_or(&empty);
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for key in &end.consumed {
            *counts.entry(key.as_str()).or_default() += 1;
        }
        delivered += end.consumed.len();
        for key in expected {
            if !counts.contains_key(key.as_str()) {
                lost += 1;
                if examples.len() < 10 {
                    examples.push(format!("{key} lost"));
                }
            }
        }
        for (key, n) in &counts {
            if *n > 1 {
                doubled += n - 1;
                if examples.len() < 10 {
                    examples.push(format!("{key} consumed {n} times"));
                }
            }
            if !expected.contains(*key) {
                phantom += 1;
            }
        }
        let live = end.runs.iter().filter(|s| *s != "continued").count();
        continued += end.runs.len() - live;
        extra_live += live.saturating_sub(1);
        live_runs.insert(id.clone(), live);
        if end.status != "completed" {
            problems.push(format!("{id} ended {:?}, not completed", end.status));
        }
        if live != 1 || end.runs.last().is_some_and(|s| s == "continued") {
            problems.push(format!("{id} runs: {:?}", end.runs));
        }
    }
    let figures = format!(
        "store {store}: {SIGNALS} keys over {WORKFLOWS} workflows ({duplicated} sent twice, \
         {with_start} with start), {} requests in {storm:.1?} (kills after (sends, mid-storm) {kills:?}; \
         {} connection errors, {} 5xx, {} 409, {} duplicate answers); \
         accepted {accepted}, delivered {delivered}, lost {lost}, doubled {doubled}, \
         not accepted but delivered {phantom}, never accepted {}; \
         runs continued {continued}, extra live runs {extra_live}; \
         live runs per id {live_runs:?}; test took {:.1?}",
        seen.requests,
        seen.connection_errors,
        seen.server_errors,
        seen.conflicts,
        seen.duplicate_answers,
        seen.unaccepted.len(),
        test_started.elapsed(),
    );
    println!("{figures}");
    if !examples.is_empty() {
        println!("for example: {examples:?}");
    }
    if !problems.is_empty() {
        println!("problems: {problems:?}");
    }
    drop(handler);
    drop(gateway);

    assert!(
        kills.iter().all(|(_, mid_storm)| *mid_storm),
        "Durin was not killed in the middle of the storm: {figures}"
    );
    assert!(
        seen.unaccepted.is_empty(),
        "keys never accepted: {:?}\n{figures}",
        seen.unaccepted
    );
    assert!(
        lost == 0 && doubled == 0 && phantom == 0 && problems.is_empty(),
        "signals lost or doubled, or runs left live: {examples:?} {problems:?}\n{figures}"
    );
    assert_eq!(accepted, SIGNALS, "{figures}");
    assert!(
        continued >= WORKFLOWS * 5,
        "the runs hardly continued as new: {figures}"
    );
}
