//! The waiting scenario (`--scenario waiting`): what N workflows sleeping on timers at once
//! cost Durin, and how it brings them back after a `kill -9`; the counterpart of Restate's
//! anchor `shared/bench/restate/waiting.sh`.
//!
//! For each N of `--waiting-counts`, on a fresh SQLite file, a fresh `durin serve` and a
//! fresh `order` example process (which also serves the approval workflow, `approval/run`):
//!
//! 1. registers `order` and reads Durin's idle RSS (`VmRSS` of `/proc/PID/status`):
//!    `rss_idle_mib`;
//! 2. calibrates: starts a few approval runs (`calib-{i}`, N/20 clamped to 50..=1000) with a
//!    deadline of 0 s, which run through without sleeping, and times them until they have
//!    all completed; this also warms Durin up. They stay in the database as completed rows;
//! 3. starts the N runs, `POST /v1/workflows/approval/w-{i}` with `{"request": "w-{i}",
//!    "deadline_secs": D}`, from `--waiting-concurrency` callers (`accepted` counts the
//!    202s, `starts_per_s` their rate; a start refused with 503 and `Retry-After`, as
//!    admission control refuses one when too many starts are pending, is sent again after
//!    that wait and counted in `starts_refused`), and waits until none is pending or running any
//!    more, i.e. all are `suspended` (`all_suspended_s` from the first start). The API lists
//!    at most 1000 invocations, so this reads the SQLite file directly, read-only, beside
//!    the gateway; the polls count the unfinished runs through the gateway's own partial
//!    index, so that they stay cheap at 100,000 runs;
//! 4. at least 2 s later, reads Durin's RSS with N sleeping (`rss_sleeping_mib`) and the
//!    size of the database: `db_mib`, the `.db` file plus its `-wal`, also given apart
//!    (`db_file_mib`, `wal_mib`: the log keeps the size of its largest burst);
//! 5. kills Durin with SIGKILL, restarts it on the same file (port 0), and times the
//!    restart to its ready line (`restart_to_ready_ms`); reads its RSS just before the first
//!    timer falls due (`rss_after_restart_mib`, all N still sleeping);
//! 6. waits until every run has completed (or, with `--waiting-fired M`, the first M: a
//!    large N would otherwise wait for every timer; `fired_partial` says so, and the
//!    figures below are then over those M), reads the RSS then (`rss_after_fired_mib`), and
//!    reads from the database how late each timer fired. A timer fires when the scheduler
//!    claims its run for the next attempt, in the same transaction that starts the
//!    attempt, so `completions.at_ms - wake_at_ms` (the wake time its sleep entry
//!    recorded) is its lateness (`timer_late_p50_ms`, `_p99_ms`, `_max_ms`, over all N),
//!    and the earliest such completion after the kill is when the first attempt after the
//!    restart started (`kill_to_first_attempt_ms`; the run's `modified_at_ms` is that same
//!    instant at first, but is overwritten when the run completes).
//!    `all_fired_after_deadline_ms` runs from the earliest wake time to the last run's
//!    `completed_at_ms`.
//!
//! All timers fall due together, a fixed time after the kill. The workflow takes its
//! deadline in whole seconds from the moment its first attempt creates the timer, so every
//! start computes its own D = (T_due - now) rounded up to whole seconds, towards one
//! planned instant T_due; the wake times then spread over about a second (plus the time
//! from a 202 to the attempt), which the output reports as `wake_spread_ms`. T_due has to
//! come after all N are started and suspended and Durin has been killed: the calibration
//! gives the time per run (a calibration run does a little more than a measured run's
//! first attempt, so the figure errs on the slow side), the plan allows 1.5 times that
//! for the N runs plus 2 s to settle, Durin is killed at that planned moment (or 2 s after
//! the last run suspended, if later), and T_due is 5 s after the planned kill
//! (`--waiting-plan-secs S` plans S seconds for the starts instead, for a large N whose
//! rate is known: the calibration's margin would otherwise idle for a long time). If the starts
//! finish early, the bench idles until the planned kill. Should they take longer than
//! planned, the timers fall due less than 5 s after the kill (`kill_to_first_due_ms` shows
//! it, and a warning is printed); if they fell due before the kill, the firing figures
//! include Durin's down time.
//!
//! `kill_to_first_attempt_ms` therefore includes the planned 5 s; the recovery itself is
//! `kill_to_first_attempt_ms - kill_to_first_due_ms`, i.e. how late the first timer fired.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use rusqlite::{params, Connection, OpenFlags};

use crate::procs::{self, Service};
use crate::report::Machine;
use crate::Setup;

/// The workflow service of the order example that sleeps on a timer.
const WORKFLOW: &str = "approval";
/// Workflow ids of the measured runs.
const RUN_PREFIX: &str = "w-";
/// Workflow ids of the calibration runs.
const CALIBRATION_PREFIX: &str = "calib-";
/// From the planned kill to the instant the timers fall due.
const LEAD_MS: i64 = 5_000;
/// The least time between the last run suspending and the kill.
const MIN_SETTLE_MS: i64 = 2_000;
/// The planned start time of the N runs, as a multiple of the calibrated time per run.
const SAFETY: f64 = 1.5;
/// How often the database is polled while waiting for the measured runs.
const POLL: Duration = Duration::from_millis(250);
/// How often it is polled during the calibration, which its granularity would distort.
const CALIBRATION_POLL: Duration = Duration::from_millis(25);
/// A wait fails when the runs' statuses have not changed for this long.
const STALL: Duration = Duration::from_secs(120);
/// How often progress is reported while starting runs.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Target (DESIGN.md section 6): Durin's RSS with N sleeping, up to [`TARGET_SLEEPING`],
/// stays under this many MB (10^6 bytes).
const TARGET_RSS_MB: f64 = 300.0;
/// The number of sleeping workflows the RSS target is set for.
const TARGET_SLEEPING: usize = 10_000_000;
/// Restate 1.7.12 on this machine (`waiting.sh`, 2026-11-29), RSS in MB as it printed them.
const RESTATE_REFERENCE: &str = "Restate 1.7.12 here (waiting.sh): 147 MB idle, 567 MB with 10,000 sleeping, 1,054 MB with 100,000, 231 MB on disk, ingress back 384 ms after kill -9";

/// The figures of one N.
pub struct WaitingReport {
    pub sleeping: usize,
    pub concurrency: usize,
    /// Starts answered 202.
    pub accepted: usize,
    /// Starts refused with 503 (admission control) and sent again after their
    /// `Retry-After`.
    pub starts_refused: usize,
    pub start_errors: usize,
    pub first_error: Option<String>,
    /// From the first start to the last answer.
    pub start_s: f64,
    /// From the first start until every run was suspended.
    pub suspend_s: f64,
    /// Runs found suspended just before the kill.
    pub suspended: usize,
    pub rss_idle_mib: Option<f64>,
    pub rss_sleeping_mib: Option<f64>,
    /// The database file and its write-ahead log, in MiB; `db_mib` is their sum.
    pub db_file_mib: f64,
    pub wal_mib: f64,
    pub restart_to_ready_ms: f64,
    /// From the kill to the earliest wake time; planned to be [`LEAD_MS`].
    pub kill_to_first_due_ms: Option<i64>,
    pub kill_to_first_attempt_ms: Option<i64>,
    /// Lateness of every timer of the measured runs, sorted ascending, in ms.
    pub lateness_ms: Vec<i64>,
    /// Latest minus earliest wake time.
    pub wake_spread_ms: Option<i64>,
    /// From the earliest wake time until the last run completed.
    pub all_fired_after_deadline_ms: Option<i64>,
    /// Runs completed at the end (the others failed or were cancelled, or had not fired
    /// yet when `partial`).
    pub completed: usize,
    /// Whether the measurement stopped once `--waiting-fired` runs had completed, not all.
    pub partial: bool,
    /// Durin's RSS after the restart, just before the timers fall due.
    pub rss_after_restart_mib: Option<f64>,
    /// Durin's RSS once every run (or the `--waiting-fired` first) has completed.
    pub rss_after_fired_mib: Option<f64>,
    pub load_before: Option<f64>,
    pub load_sleeping: Option<f64>,
    pub load_after: Option<f64>,
}

impl WaitingReport {
    /// Timer lateness at quantile `q` by the nearest-rank method.
    fn late(&self, q: f64) -> Option<i64> {
        let n = self.lateness_ms.len();
        if n == 0 {
            return None;
        }
        let rank = (q * n as f64).ceil() as usize;
        Some(self.lateness_ms[rank.clamp(1, n) - 1])
    }
}

/// Milliseconds since the epoch on this machine's clock, which is Durin's clock too.
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Sleeps until the epoch instant `at_ms` (not at all if it has passed).
async fn sleep_until_ms(at_ms: i64) {
    // In steps of at most a second, each against the wall clock: the timers fall due by
    // the wall clock, and one long sleep follows the monotonic clock, which stops while
    // the virtual machine is paused (a 12 s pause once made a kill planned an hour ahead
    // come 12 s late, after the timers had started to fire).
    loop {
        let wait = at_ms.saturating_sub(now_ms());
        if wait <= 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(wait.unsigned_abs().min(1000))).await;
    }
}

/// The deadline a start asks for.
#[derive(Clone, Copy)]
enum Deadline {
    /// A fixed number of seconds.
    Secs(u64),
    /// Whole seconds from now until at least this epoch instant (at least 1).
    DueAt(i64),
}

impl Deadline {
    fn secs(self, now_ms: i64) -> u64 {
        match self {
            Deadline::Secs(secs) => secs,
            Deadline::DueAt(due_ms) => due_ms
                .saturating_sub(now_ms)
                .max(1)
                .unsigned_abs()
                .div_ceil(1000),
        }
    }
}

/// What a batch of starts produced.
struct Starts {
    accepted: usize,
    /// 503s (admission control: too many starts pending) waited out and sent again.
    refused: usize,
    errors: usize,
    first_error: Option<String>,
    wall: Duration,
}

/// Starts `count` approval runs named `{prefix}{i}` from `concurrency` callers.
async fn start_runs(
    client: &reqwest::Client,
    durin: &str,
    prefix: &'static str,
    count: usize,
    concurrency: usize,
    deadline: Deadline,
) -> Result<Starts> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.clamp(1, count.max(1)) {
        let client = client.clone();
        let base = format!("{durin}/v1/workflows/{WORKFLOW}/");
        let next = Arc::clone(&next);
        tasks.spawn(async move {
            let (mut accepted, mut refused, mut errors, mut first_error) =
                (0usize, 0usize, 0usize, None);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    break;
                }
                let id = format!("{prefix}{i}");
                let first_try = Instant::now();
                loop {
                    let body = serde_json::json!({
                        "request": id,
                        "deadline_secs": deadline.secs(now_ms()),
                    });
                    match start_one(&client, &format!("{base}{id}"), &body).await {
                        Ok(()) => accepted += 1,
                        // As a client should: the same start again once the wait it was
                        // given is over.
                        Err(StartError::Busy(wait)) if first_try.elapsed() < MAX_REFUSED => {
                            refused += 1;
                            tokio::time::sleep(wait).await;
                            continue;
                        }
                        Err(StartError::Busy(_)) => {
                            errors += 1;
                            first_error.get_or_insert(format!(
                                "refused with 503 for {} s",
                                MAX_REFUSED.as_secs()
                            ));
                        }
                        Err(StartError::Failed(e)) => {
                            errors += 1;
                            first_error.get_or_insert(e);
                        }
                    }
                    break;
                }
            }
            (accepted, refused, errors, first_error)
        });
    }
    let progress = {
        let next = Arc::clone(&next);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval_at(
                tokio::time::Instant::now() + PROGRESS_EVERY,
                PROGRESS_EVERY,
            );
            loop {
                ticks.tick().await;
                let sent = next.load(Ordering::Relaxed).min(count);
                eprintln!(
                    "durin-bench:   {sent} of {count} started ({:.0}/s)",
                    sent as f64 / started.elapsed().as_secs_f64()
                );
            }
        })
    };
    let mut starts = Starts {
        accepted: 0,
        refused: 0,
        errors: 0,
        first_error: None,
        wall: Duration::ZERO,
    };
    while let Some(joined) = tasks.join_next().await {
        let (accepted, refused, errors, first_error) = joined.context("a starting task failed")?;
        starts.accepted += accepted;
        starts.refused += refused;
        starts.errors += errors;
        if let Some(e) = first_error {
            starts.first_error.get_or_insert(e);
        }
    }
    progress.abort();
    starts.wall = started.elapsed();
    Ok(starts)
}

/// Why a start was not answered 202.
enum StartError {
    /// 503 with `Retry-After` (admission control): send it again after that long.
    Busy(Duration),
    Failed(String),
}

/// The longest `Retry-After` a starter waits.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(5);
/// How long a starter sends a refused start again before it counts it as failed.
const MAX_REFUSED: Duration = Duration::from_secs(300);

/// Starts one run; anything but a 202 is an error.
async fn start_one(
    client: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
) -> Result<(), StartError> {
    let response = client
        .post(url)
        .json(body)
        .send()
        .await
        .map_err(|e| StartError::Failed(format!("{e:#}")))?;
    let status = response.status();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|secs| Duration::from_secs(secs).min(MAX_RETRY_AFTER));
    // Read in full, also on failures, so that the connection can be reused.
    let answer = response
        .bytes()
        .await
        .map_err(|e| StartError::Failed(format!("reading the answer: {e:#}")))?;
    match (status, retry_after) {
        (reqwest::StatusCode::ACCEPTED, _) => Ok(()),
        (reqwest::StatusCode::SERVICE_UNAVAILABLE, Some(wait)) => Err(StartError::Busy(wait)),
        _ => Err(StartError::Failed(format!(
            "status {status}: {}",
            String::from_utf8_lossy(&answer)
        ))),
    }
}

/// Reads Durin's SQLite file directly, beside the running gateway (WAL lets a reader run
/// beside the writer).
struct Db {
    path: PathBuf,
}

/// How many runs of one prefix are in each status.
#[derive(Default, PartialEq, Eq, Clone)]
struct StatusCounts(BTreeMap<String, usize>);

impl StatusCounts {
    fn get(&self, status: &str) -> usize {
        self.0.get(status).copied().unwrap_or(0)
    }

    fn total(&self) -> usize {
        self.0.values().sum()
    }

    /// Runs that may still run an attempt: pending, running or backing off.
    fn active(&self) -> usize {
        self.total() - self.get("suspended") - self.finished()
    }

    fn finished(&self) -> usize {
        self.get("completed") + self.get("failed") + self.get("cancelled")
    }
}

impl std::fmt::Display for StatusCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        let parts: Vec<String> = self.0.iter().map(|(s, n)| format!("{n} {s}")).collect();
        f.write_str(&parts.join(", "))
    }
}

/// What a wait polls.
#[derive(Clone, Copy)]
enum Watch<'a> {
    /// The approval runs named `{prefix}…`, whatever their status: a scan of every run.
    Runs(&'a str),
    /// Every run that is not final, through the gateway's partial index of them, which is
    /// cheap enough to poll without competing with the gateway for the cores. Once the
    /// calibration runs have completed, these are the measured runs.
    Unfinished,
}

/// Firing figures of the measured runs, read once they have all completed.
struct Firing {
    /// (fired at, due at) of every fired timer, epoch ms.
    timers: Vec<(i64, i64)>,
    last_completed_ms: Option<i64>,
}

impl Db {
    fn open(&self) -> Result<Connection> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .with_context(|| format!("cannot open {}", self.path.display()))?;
        conn.busy_timeout(Duration::from_secs(10))?;
        Ok(conn)
    }

    /// The statuses of what `watch` names.
    fn statuses(&self, watch: Watch<'_>) -> Result<StatusCounts> {
        let conn = self.open()?;
        let (mut statement, pattern) = match watch {
            Watch::Runs(prefix) => (
                conn.prepare(
                    "SELECT status, COUNT(*) FROM invocations \
                     WHERE service = ?1 AND workflow_id LIKE ?2 GROUP BY status",
                )?,
                Some(format!("{prefix}%")),
            ),
            // The condition is the gateway's index's, word for word, so that SQLite uses it.
            Watch::Unfinished => (
                conn.prepare(
                    "SELECT status, COUNT(*) FROM invocations \
                     WHERE status NOT IN ('completed', 'failed', 'cancelled') GROUP BY status",
                )?,
                None,
            ),
        };
        let row = |row: &rusqlite::Row<'_>| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?));
        let rows = match &pattern {
            Some(pattern) => statement.query_map(params![WORKFLOW, pattern], row)?,
            None => statement.query_map([], row)?,
        };
        let mut counts = StatusCounts::default();
        for row in rows {
            let (status, n) = row?;
            counts.0.insert(status, usize::try_from(n).unwrap_or(0));
        }
        Ok(counts)
    }

    /// The earliest wake time of the timers that have not fired.
    fn first_pending_wake_ms(&self) -> Result<Option<i64>> {
        Ok(self
            .open()?
            .query_row("SELECT MIN(wake_at_ms) FROM timers", [], |row| row.get(0))?)
    }

    fn firing(&self, prefix: &str) -> Result<Firing> {
        let conn = self.open()?;
        let pattern = format!("{prefix}%");
        // The value of a sleep entry is the JSON text `{"wake_at_ms": T}`, stored as a
        // blob; json_extract reads blobs as JSONB, hence the cast.
        let mut statement = conn.prepare(
            "SELECT c.at_ms, CAST(json_extract(CAST(j.value AS TEXT), '$.wake_at_ms') AS INTEGER) \
             FROM invocations i \
             JOIN journal j ON j.invocation_id = i.id AND j.kind = 'sleep' \
             JOIN completions c ON c.invocation_id = j.invocation_id AND c.idx = j.idx \
             WHERE i.service = ?1 AND i.workflow_id LIKE ?2",
        )?;
        let timers = statement
            .query_map(params![WORKFLOW, pattern], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let last_completed_ms = conn.query_row(
            "SELECT MAX(completed_at_ms) FROM invocations \
             WHERE service = ?1 AND workflow_id LIKE ?2 AND status = 'completed'",
            params![WORKFLOW, pattern],
            |row| row.get(0),
        )?;
        Ok(Firing {
            timers,
            last_completed_ms,
        })
    }

    /// The sizes of the database file and of its write-ahead log, in MiB (0 when absent).
    fn sizes_mib(&self) -> (f64, f64) {
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        let mib = |path: &Path| {
            std::fs::metadata(path).map_or(0.0, |m| m.len() as f64 / (1024.0 * 1024.0))
        };
        (mib(&self.path), mib(Path::new(&wal)))
    }

    /// Polls the statuses of what `watch` names every `poll` until `done` holds, reporting
    /// progress; fails when they stop changing for [`STALL`] without `done`.
    async fn wait_until(
        &self,
        watch: Watch<'_>,
        what: &str,
        poll: Duration,
        done: impl Fn(&StatusCounts) -> bool,
    ) -> Result<StatusCounts> {
        let mut last = StatusCounts::default();
        let mut changed = Instant::now();
        let mut reported = Instant::now();
        loop {
            let counts = self.statuses(watch)?;
            if done(&counts) {
                return Ok(counts);
            }
            if counts != last {
                last = counts;
                changed = Instant::now();
            } else if changed.elapsed() > STALL {
                bail!(
                    "waiting for {what}: the runs' statuses have not changed for {}s ({last})",
                    STALL.as_secs()
                );
            }
            if reported.elapsed() >= PROGRESS_EVERY {
                eprintln!("durin-bench:   waiting for {what}: {last}");
                reported = Instant::now();
            }
            tokio::time::sleep(poll).await;
        }
    }
}

/// Measures one N; see the module documentation.
pub async fn measure(setup: &Setup<'_>, sleeping: usize) -> Result<WaitingReport> {
    let concurrency = setup.args.waiting_concurrency;
    let label = format!("waiting-{sleeping}");
    eprintln!("durin-bench: scenario waiting, {sleeping} sleeping workflows");
    let load_before = procs::loadavg1();
    let db = Db {
        path: setup.dir.join(format!("durin-{label}.db")),
    };
    let durin = crate::start_durin_on(setup, &db.path, &format!("durin-{label}.log"), &[])?;
    let order = Service::start(
        "order",
        &setup.bin_dir.join("order"),
        &["--listen", "127.0.0.1:0"],
        setup.dir.join(format!("order-{label}.log")),
        &["order service listening on "],
    )?;
    let client = crate::load::client(concurrency)?;
    crate::register(
        &client,
        crate::admin_url(&durin),
        &serde_json::json!({ "url": order.url() }),
    )
    .await?;
    let rss_idle_mib = procs::rss_mib(durin.pid());

    // Calibration: runs that do not sleep, timed until they have completed.
    let calibration = (sleeping / 20).clamp(50, 1000);
    eprintln!("durin-bench:   calibrating with {calibration} runs that do not sleep");
    let calibration_start = Instant::now();
    let starts = start_runs(
        &client,
        durin.url(),
        CALIBRATION_PREFIX,
        calibration,
        concurrency,
        Deadline::Secs(0),
    )
    .await?;
    if let Some(e) = &starts.first_error {
        bail!(
            "{} of {calibration} calibration starts failed, the first: {e}",
            starts.errors
        );
    }
    let counts = db
        .wait_until(
            Watch::Runs(CALIBRATION_PREFIX),
            "the calibration runs",
            CALIBRATION_POLL,
            |c| c.total() >= calibration && c.finished() == c.total(),
        )
        .await?;
    if counts.get("completed") != calibration {
        bail!("the calibration runs did not all complete: {counts}");
    }
    let per_run_ms = calibration_start.elapsed().as_secs_f64() * 1e3 / calibration as f64;

    // The plan: the kill once all are started and suspended, the timers due LEAD_MS later.
    let start_ms = now_ms();
    let planned_ms = match setup.args.waiting_plan_secs {
        Some(secs) => i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX / 4),
        None => (per_run_ms * sleeping as f64 * SAFETY).ceil() as i64,
    };
    let kill_at_ms = start_ms + planned_ms + MIN_SETTLE_MS;
    let due_ms = kill_at_ms + LEAD_MS;
    eprintln!(
        "durin-bench:   {per_run_ms:.2} ms per run; starting {sleeping} runs at c={concurrency}, planning the kill in {:.1}s and the timers {}s after it",
        (kill_at_ms - start_ms) as f64 / 1e3,
        LEAD_MS / 1000
    );
    let started = Instant::now();
    let starts = start_runs(
        &client,
        durin.url(),
        RUN_PREFIX,
        sleeping,
        concurrency,
        Deadline::DueAt(due_ms),
    )
    .await?;
    if let Some(e) = &starts.first_error {
        eprintln!(
            "durin-bench:   {} of {sleeping} starts failed, the first: {e}",
            starts.errors
        );
    }
    if starts.accepted == 0 {
        bail!("no run was started");
    }
    eprintln!(
        "durin-bench:   {} started in {:.1}s ({:.0}/s; {} refused with 503 and sent again after their Retry-After); waiting until all are suspended",
        starts.accepted,
        starts.wall.as_secs_f64(),
        starts.accepted as f64 / starts.wall.as_secs_f64(),
        starts.refused
    );
    let counts = db
        .wait_until(Watch::Unfinished, "the runs to suspend", POLL, |c| {
            c.active() == 0
        })
        .await?;
    let suspend_s = started.elapsed().as_secs_f64();
    if counts.get("suspended") < starts.accepted {
        eprintln!("durin-bench:   warning: not every run suspended: {counts}");
    }

    // N sleeping: settle, measure, kill.
    sleep_until_ms((now_ms() + MIN_SETTLE_MS).max(kill_at_ms)).await;
    let rss_sleeping_mib = procs::rss_mib(durin.pid());
    let (db_file_mib, wal_mib) = db.sizes_mib();
    let load_sleeping = procs::loadavg1();
    // As counted once none was active any more (nothing has changed since): counting them
    // again here would delay the kill by seconds at millions.
    let suspended = counts.get("suspended");
    let kill_ms = now_ms();
    // Dropping the guard sends SIGKILL, as `kill -9` does, and reaps the process.
    drop(durin);
    if kill_ms > due_ms - LEAD_MS / 2 {
        eprintln!(
            "durin-bench:   warning: the starts took longer than planned; the timers fall due {} ms after the kill instead of {LEAD_MS}",
            due_ms - kill_ms
        );
    }
    eprintln!("durin-bench:   killed durin with {suspended} runs suspended; restarting it");
    let restart = Instant::now();
    let durin = crate::start_durin_on(setup, &db.path, &format!("durin-{label}-restart.log"), &[])?;
    let restart_to_ready_ms = restart.elapsed().as_secs_f64() * 1e3;

    // RSS of the restarted gateway with all still sleeping, just before the first timer.
    let first_due_ms = db.first_pending_wake_ms()?;
    if let Some(first) = first_due_ms {
        sleep_until_ms(first - 500).await;
    }
    let rss_after_restart_mib = procs::rss_mib(durin.pid());
    // All of them, or the first `--waiting-fired`.
    let fired_wanted = match setup.args.waiting_fired {
        0 => suspended,
        n => n.min(suspended),
    };
    let partial = fired_wanted < suspended;
    eprintln!(
        "durin-bench:   waiting for the timers to fire and {} to complete",
        if partial {
            format!("{fired_wanted} of the {suspended} runs")
        } else {
            "every run".to_owned()
        }
    );
    db.wait_until(Watch::Unfinished, "the runs to complete", POLL, |c| {
        c.total() + fired_wanted <= suspended
    })
    .await?;
    let rss_after_fired_mib = procs::rss_mib(durin.pid());
    let load_after = procs::loadavg1();
    let counts = db.statuses(Watch::Runs(RUN_PREFIX))?;
    if counts.get("completed") < counts.total() {
        eprintln!("durin-bench:   warning: not every run completed: {counts}");
    }

    let firing = db.firing(RUN_PREFIX)?;
    let mut lateness_ms: Vec<i64> = firing.timers.iter().map(|(at, due)| at - due).collect();
    lateness_ms.sort_unstable();
    let first_wake = firing.timers.iter().map(|&(_, due)| due).min();
    let last_wake = firing.timers.iter().map(|&(_, due)| due).max();
    let first_attempt = firing
        .timers
        .iter()
        .map(|&(at, _)| at)
        .filter(|&at| at > kill_ms)
        .min();
    Ok(WaitingReport {
        sleeping,
        concurrency,
        accepted: starts.accepted,
        starts_refused: starts.refused,
        start_errors: starts.errors,
        first_error: starts.first_error,
        start_s: starts.wall.as_secs_f64(),
        suspend_s,
        suspended,
        rss_idle_mib,
        rss_sleeping_mib,
        db_file_mib,
        wal_mib,
        restart_to_ready_ms,
        kill_to_first_due_ms: first_wake.map(|w| w - kill_ms),
        kill_to_first_attempt_ms: first_attempt.map(|at| at - kill_ms),
        lateness_ms,
        wake_spread_ms: first_wake.zip(last_wake).map(|(a, b)| b - a),
        // Until the last run completed: not known when only some were waited for.
        all_fired_after_deadline_ms: first_wake
            .zip(firing.last_completed_ms)
            .map(|(w, done)| done - w)
            .filter(|_| !partial),
        partial,
        completed: counts.get("completed"),
        rss_after_restart_mib,
        rss_after_fired_mib,
        load_before,
        load_sleeping,
        load_after,
    })
    // `durin` and `order` are dropped here, which stops them before the next N.
}

/// Formats an optional figure with `decimals` decimals, or `-` when it is missing.
fn fmt(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}"))
}

fn fmt_ms(value: Option<i64>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

fn round1(value: f64) -> f64 {
    (value * 10.0).round() / 10.0
}

/// Prints the table, the target and one JSON line per N, all on stdout.
pub fn print(machine: &Machine, reports: &[WaitingReport]) {
    println!(
        "durin {}: {} cores; load average (1 min) {} before, {} after",
        env!("CARGO_PKG_VERSION"),
        machine.cores,
        fmt(machine.load_before, 2),
        fmt(machine.load_after, 2),
    );
    println!();
    println!("waiting: N approval workflows (order example) each sleeping on one timer; kill -9 of durin while they sleep, restart, timers due ~{}s after the kill", LEAD_MS / 1000);
    println!(
        "{:>7} {:>7} {:>7} {:>8} {:>9} {:>7} {:>8} {:>13} {:>16} {:>8} {:>9} {:>9} {:>9} {:>14}",
        "N",
        "ok",
        "start/s",
        "idle MiB",
        "sleep MiB",
        "db MiB",
        "ready ms",
        "kill>1st ms",
        "late p50/99/max",
        "spread",
        "all ms",
        "rst MiB",
        "end MiB",
        "load 1m"
    );
    for r in reports {
        println!(
            "{:>7} {:>7} {:>7.0} {:>8} {:>9} {:>7.1} {:>8.0} {:>13} {:>16} {:>8} {:>9} {:>9} {:>9} {:>14}",
            r.sleeping,
            r.accepted,
            r.accepted as f64 / r.start_s,
            fmt(r.rss_idle_mib, 1),
            fmt(r.rss_sleeping_mib, 1),
            r.db_file_mib + r.wal_mib,
            r.restart_to_ready_ms,
            format!(
                "{} ({})",
                fmt_ms(r.kill_to_first_attempt_ms),
                fmt_ms(r.kill_to_first_due_ms)
            ),
            format!(
                "{}/{}/{}",
                fmt_ms(r.late(0.50)),
                fmt_ms(r.late(0.99)),
                fmt_ms(r.lateness_ms.last().copied())
            ),
            fmt_ms(r.wake_spread_ms),
            fmt_ms(r.all_fired_after_deadline_ms),
            fmt(r.rss_after_restart_mib, 1),
            fmt(r.rss_after_fired_mib, 1),
            format!(
                "{}->{}->{}",
                fmt(r.load_before, 1),
                fmt(r.load_sleeping, 1),
                fmt(r.load_after, 1)
            ),
        );
    }
    println!("ok: starts answered 202; start/s: their rate; sleep MiB: durin's RSS with N sleeping; db MiB: .db + -wal (apart in the JSON); ready ms: restart to ready line;");
    println!("kill>1st ms: kill to the first attempt after the restart (in brackets: kill to the first wake time); late: how late the timers fired (ms);");
    println!("spread: last minus first wake time (ms); all ms: first wake time to the last run completed; rst MiB: RSS after the restart, just before the timers;");
    println!("end MiB: RSS once all completed; load 1m: before -> with N sleeping -> after");
    for r in reports {
        if r.starts_refused > 0 {
            println!(
                "N={}: {} starts were refused with 503 (too many starts pending) and sent again after their Retry-After",
                r.sleeping, r.starts_refused
            );
        }
        if let Some(e) = &r.first_error {
            println!(
                "N={}: {} starts failed, the first: {e}",
                r.sleeping, r.start_errors
            );
        }
        if r.partial {
            println!(
                "N={}: measured until {} runs had completed after the restart (--waiting-fired), not all: late and end MiB are over those",
                r.sleeping, r.completed
            );
        } else if r.completed < r.accepted {
            println!(
                "N={}: only {} of {} runs completed",
                r.sleeping, r.completed, r.accepted
            );
        }
    }

    println!();
    println!("against the target (RSS with up to {TARGET_SLEEPING} sleeping under {TARGET_RSS_MB:.0} MB, within a few MB from 10,000 to 100,000); {RESTATE_REFERENCE}:");
    for r in reports {
        match r.rss_sleeping_mib {
            Some(mib) => {
                let mb = mib * 1.048_576;
                println!(
                    "  N={}: {mib:.1} MiB = {mb:.1} MB, {}",
                    r.sleeping,
                    if mb < TARGET_RSS_MB { "met" } else { "NOT met" }
                );
            }
            None => println!("  N={}: RSS not read", r.sleeping),
        }
    }
    let rss: Vec<(usize, f64)> = reports
        .iter()
        .filter_map(|r| r.rss_sleeping_mib.map(|m| (r.sleeping, m)))
        .collect();
    let smallest = rss.iter().min_by_key(|(n, _)| *n);
    let largest = rss.iter().max_by_key(|(n, _)| *n);
    if let (Some(&(n0, m0)), Some(&(n1, m1))) = (smallest, largest) {
        if n1 > n0 {
            println!(
                "  from N={n0} to N={n1}: {:+.1} MiB ({:.2} KiB per additional sleeping workflow)",
                m1 - m0,
                (m1 - m0) * 1024.0 / (n1 - n0) as f64
            );
        }
    }

    println!();
    for r in reports {
        println!("{}", json_line(machine, r));
    }
}

fn json_line(machine: &Machine, r: &WaitingReport) -> serde_json::Value {
    serde_json::json!({
        "system": "durin",
        "version": env!("CARGO_PKG_VERSION"),
        "scenario": "waiting",
        "sleeping": r.sleeping,
        "concurrency": r.concurrency,
        "accepted": r.accepted,
        "starts_refused": r.starts_refused,
        "start_errors": r.start_errors,
        "start_s": (r.start_s * 1e3).round() / 1e3,
        "starts_per_s": round1(r.accepted as f64 / r.start_s),
        "all_suspended_s": (r.suspend_s * 1e3).round() / 1e3,
        "suspended_at_kill": r.suspended,
        "rss_idle_mib": r.rss_idle_mib.map(round1),
        "rss_sleeping_mib": r.rss_sleeping_mib.map(round1),
        "db_mib": round1(r.db_file_mib + r.wal_mib),
        "db_file_mib": round1(r.db_file_mib),
        "wal_mib": round1(r.wal_mib),
        "restart_to_ready_ms": r.restart_to_ready_ms.round(),
        "kill_to_first_due_ms": r.kill_to_first_due_ms,
        "kill_to_first_attempt_ms": r.kill_to_first_attempt_ms,
        "timers_fired": r.lateness_ms.len(),
        "timer_late_p50_ms": r.late(0.50),
        "timer_late_p99_ms": r.late(0.99),
        "timer_late_max_ms": r.lateness_ms.last(),
        "wake_spread_ms": r.wake_spread_ms,
        "all_fired_after_deadline_ms": r.all_fired_after_deadline_ms,
        "completed": r.completed,
        "fired_partial": r.partial,
        "rss_after_restart_mib": r.rss_after_restart_mib.map(round1),
        "rss_after_fired_mib": r.rss_after_fired_mib.map(round1),
        "loadavg1_before": r.load_before,
        "loadavg1_sleeping": r.load_sleeping,
        "loadavg1_after": r.load_after,
        "cores": machine.cores,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_round_up_to_whole_seconds() {
        assert_eq!(Deadline::DueAt(10_000).secs(0), 10);
        assert_eq!(Deadline::DueAt(10_001).secs(0), 11);
        assert_eq!(Deadline::DueAt(10_000).secs(9_999), 1);
        // A deadline that has passed still sleeps a second rather than not at all.
        assert_eq!(Deadline::DueAt(10_000).secs(20_000), 1);
        assert_eq!(Deadline::Secs(0).secs(12_345), 0);
    }

    #[test]
    fn status_counts() {
        let mut counts = StatusCounts::default();
        for (status, n) in [("suspended", 5), ("running", 2), ("completed", 3)] {
            counts.0.insert(status.to_owned(), n);
        }
        assert_eq!(counts.total(), 10);
        assert_eq!(counts.active(), 2);
        assert_eq!(counts.finished(), 3);
        assert_eq!(counts.to_string(), "3 completed, 2 running, 5 suspended");
    }
}
