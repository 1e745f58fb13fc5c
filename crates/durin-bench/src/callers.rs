//! The callers scenario (`--scenario callers`): what it costs Durin when many callers
//! wait at once for workflows that do not end soon.
//!
//! On a fresh SQLite file, `durin serve` and the `order` example: starts `--callers` N
//! approval runs (`POST /v1/workflows/approval/c-{i}`, an hour's deadline, so that each
//! sleeps), waits until every one is suspended, then opens N long polls
//! (`GET /v1/invocations/{id}` with `Prefer: wait=60`) and, once they are all open, reads
//! Durin's CPU time over `WINDOW`: `durin_cpu_percent` is that time as a share of one
//! core. A caller that waits should cost nothing until the invocation ends, so the figure
//! should stay near zero whatever N is. Also reported: Durin's RSS with the N polls open.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::procs::{self, Service};
use crate::Setup;

/// How long Durin's CPU time is read while every caller waits.
const WINDOW: Duration = Duration::from_secs(10);

pub struct CallersReport {
    pub callers: usize,
    pub durin_cpu_percent: f64,
    pub durin_rss_mib: Option<f64>,
    /// Before the callers came: with the N runs sleeping.
    pub durin_rss_before_mib: Option<f64>,
    pub load_before: Option<f64>,
}

pub async fn measure(setup: &Setup<'_>, callers: usize) -> Result<CallersReport> {
    eprintln!("durin-bench: scenario callers, {callers} waiting callers");
    let load_before = procs::loadavg1();
    let durin = crate::start_durin(setup, "callers", &[])?;

    let order = Service::start(
        "order",
        &setup.bin_dir.join("order"),
        &["--listen", "127.0.0.1:0"],
        setup.dir.join("order-callers.log"),
        &["order service listening on "],
    )?;
    let client = crate::load::client(64)?;
    crate::register(
        &client,
        crate::admin_url(&durin),
        &serde_json::json!({ "url": order.url() }),
    )
    .await?;

    // The runs, started 64 at a time; each sleeps for an hour.
    let mut ids = Vec::with_capacity(callers);
    for chunk in (0..callers).collect::<Vec<_>>().chunks(64) {
        let mut started = tokio::task::JoinSet::new();
        for &i in chunk {
            let client = client.clone();
            let url = format!("{}/v1/workflows/approval/c-{i}", durin.url());
            started.spawn(async move {
                let body = serde_json::json!({"request": format!("c-{i}"), "deadline_secs": 3600});
                let answer: serde_json::Value =
                    client.post(url).json(&body).send().await?.json().await?;
                anyhow::Ok(
                    answer["invocation_id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                )
            });
        }
        while let Some(id) = started.join_next().await {
            ids.push(id.context("a start failed")??);
        }
    }
    let all_waiting = Instant::now();
    loop {
        let last = ids.last().cloned().unwrap_or_default();
        let view: serde_json::Value = client
            .get(format!("{}/v1/invocations/{last}", durin.url()))
            .send()
            .await?
            .json()
            .await?;
        if view["status"] == "suspended" {
            break;
        }
        if all_waiting.elapsed() > Duration::from_secs(120) {
            bail!("the runs did not all suspend within 2 minutes");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let durin_rss_before_mib = procs::rss_mib(durin.pid());

    // The callers: one long poll each, on connections of their own.
    let polls = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(120))
        .build()?;
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut waiting = tokio::task::JoinSet::new();
    for id in &ids {
        let (polls, open) = (polls.clone(), Arc::clone(&open));
        let url = format!("{}/v1/invocations/{id}", durin.url());
        waiting.spawn(async move {
            let request = polls.get(url).header("prefer", "wait=60").send();
            open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let _ = request.await;
        });
    }
    // Every request is sent and Durin has settled.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ticks_before = procs::cpu_ticks(durin.pid())?;
    let window = Instant::now();
    tokio::time::sleep(WINDOW).await;
    let ticks = procs::cpu_ticks(durin.pid())?.saturating_sub(ticks_before);
    let seconds = window.elapsed().as_secs_f64();
    let durin_rss_mib = procs::rss_mib(durin.pid());
    waiting.abort_all();
    Ok(CallersReport {
        callers,
        durin_cpu_percent: 100.0 * ticks as f64 / setup.ticks_per_sec as f64 / seconds,
        durin_rss_mib,
        durin_rss_before_mib,
        load_before,
    })
}

pub fn print(report: &CallersReport) {
    println!(
        "callers: {} callers waiting on sleeping workflows: Durin CPU {:.1}% of a core over {}s, RSS {} MiB ({} MiB before the callers; load before {})",
        report.callers,
        report.durin_cpu_percent,
        WINDOW.as_secs(),
        report.durin_rss_mib.map_or("?".into(), |r| format!("{r:.1}")),
        report.durin_rss_before_mib.map_or("?".into(), |r| format!("{r:.1}")),
        report.load_before.map_or("?".into(), |l| format!("{l:.2}")),
    );
    println!(
        "{}",
        serde_json::json!({
            "scenario": "callers",
            "callers": report.callers,
            "durin_cpu_percent": (report.durin_cpu_percent * 10.0).round() / 10.0,
            "durin_rss_mib": report.durin_rss_mib,
            "durin_rss_before_mib": report.durin_rss_before_mib,
            "loadavg1_before": report.load_before,
        })
    );
}
