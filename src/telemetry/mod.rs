//! Prometheus metrics: the recorder this process installs once, the names Durin records
//! under, and the text served at `GET /metrics` on the admin listener.
//!
//! Counters and histograms are recorded where things happen (the engine, the store's
//! writer, the egress) with the `metrics` crate's macros; gauges of the invocations by
//! status are read from the store when scraped. Names follow Prometheus' conventions
//! (`durin_` prefix, base units, `_total` for counters).
//!
//! `traces.rs` exports OpenTelemetry traces; `trace_context.rs` is the W3C `traceparent`
//! and the ids derived from an invocation.

pub mod trace_context;
pub mod traces;

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Attempts started, by service and handler.
pub const ATTEMPTS: &str = "durin_attempts_total";
/// Invocations whose first attempt started, by service and handler.
pub const STARTED: &str = "durin_invocations_started_total";
/// Invocations that ended, by service, handler and final status.
pub const ENDED: &str = "durin_invocations_ended_total";
/// Attempts that ended in a backoff (a retry to come), by service and handler.
pub const RETRIES: &str = "durin_retries_total";
/// From an invocation's creation to its end, by service and handler.
pub const DURATION: &str = "durin_invocation_duration_seconds";
/// How late an attempt started after it was due (the scheduler's lag).
pub const LAG: &str = "durin_scheduler_lag_seconds";
/// Journal entries appended.
pub const APPENDS: &str = "durin_journal_appends_total";
/// Writes committed together in one transaction (group commit).
pub const BATCH: &str = crate::store::BATCH_METRIC;
/// Batches PostgreSQL ran again with a savepoint per write, after one of them failed.
pub const BATCH_RETRIED: &str = crate::store::BATCH_RETRIED_METRIC;
/// How long one group commit took, from `BEGIN` to `COMMIT`.
pub const COMMIT: &str = crate::store::COMMIT_METRIC;
/// Outbound calls through the egress, by outcome (`recorded`, `replayed`, `failed`).
pub const EGRESS: &str = "durin_egress_calls_total";
/// Invocations that have not ended, by status (a gauge read when scraped).
pub const INVOCATIONS: &str = "durin_invocations";
/// Suspended invocations by the kind of command they wait for (a gauge read when scraped).
pub const WAITING: &str = "durin_invocations_waiting";
/// Invocations whose end callers of this process wait for (`POST /v1/call`, long polls,
/// `Prefer: wait`; a gauge read when scraped).
pub const AWAITED: &str = "durin_awaited_invocations";

/// The statuses of invocations that have not ended, each reported (0 when none).
const UNFINISHED: [&str; 5] = ["pending", "running", "suspended", "backing-off", "paused"];
/// The kinds of waits, each reported (0 when none).
const WAITS: [&str; 5] = ["sleep", "signal", "awakeable", "call", "none"];

/// The process's Prometheus recorder, installed at the first call. In a process that runs
/// several gateways (tests), they share it.
pub fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0, 60.0, 300.0, 3600.0,
                ])
                .unwrap_or_else(|_| PrometheusBuilder::new())
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder already installed (a test harness): this one renders empty.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            upkeep(handle.clone());
            handle
        })
        .clone()
}

/// How often the recorded histogram samples are folded into their buckets.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Folds the histograms' samples into their buckets every [`UPKEEP_EVERY`], on a thread of
/// its own, for the life of the process. The recorder keeps each sample until this runs
/// (a scrape of `/metrics` does it too): without it a Durin that nobody scrapes grew by
/// every sample of every attempt and commit, some 40 bytes per invocation, which a
/// million sleeping workflows made 40 MB.
fn upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("durin-metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_EVERY);
            handle.run_upkeep();
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "could not start the metrics' upkeep; histograms are folded only when /metrics is scraped");
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(ATTEMPTS, "Attempts started");
    describe_counter!(STARTED, "Invocations whose first attempt started");
    describe_counter!(ENDED, "Invocations that ended, by final status");
    describe_counter!(RETRIES, "Attempts that ended in a backoff");
    describe_histogram!(
        DURATION,
        Unit::Seconds,
        "From an invocation's creation to its end"
    );
    describe_histogram!(
        LAG,
        Unit::Seconds,
        "How late an attempt started after it was due"
    );
    describe_counter!(APPENDS, "Journal entries appended");
    describe_histogram!(BATCH, "Writes committed together in one transaction");
    describe_counter!(
        BATCH_RETRIED,
        "Batches of writes run again with a savepoint per write after one failed (PostgreSQL)"
    );
    describe_histogram!(
        COMMIT,
        Unit::Seconds,
        "One group commit, from BEGIN to COMMIT"
    );
    describe_counter!(EGRESS, "Outbound calls through the egress, by outcome");
    describe_gauge!(INVOCATIONS, "Invocations that have not ended, by status");
    describe_gauge!(
        WAITING,
        "Suspended invocations by the kind of command they wait for"
    );
    describe_gauge!(
        AWAITED,
        "Invocations whose end callers of this process wait for"
    );
}

/// The text served at `GET /metrics`: the recorded metrics, with `counts` (invocations by
/// status) as the `durin_invocations` gauge and `waiting` (suspended invocations by kind of
/// wait) as `durin_invocations_waiting`. A status or kind missing from them is 0.
pub fn render(counts: &[(String, u64)], waiting: &[(String, u64)], awaited: usize) -> String {
    gauges(INVOCATIONS, "status", &UNFINISHED, counts);
    gauges(WAITING, "wait", &WAITS, waiting);
    metrics::gauge!(AWAITED).set(awaited as f64);
    handle().render()
}

fn gauges(
    name: &'static str,
    label: &'static str,
    known: &[&'static str],
    values: &[(String, u64)],
) {
    for key in known {
        if !values.iter().any(|(k, _)| k == key) {
            metrics::gauge!(name, label => *key).set(0.0);
        }
    }
    for (key, value) in values {
        metrics::gauge!(name, label => key.clone()).set(*value as f64);
    }
}
