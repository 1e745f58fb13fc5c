//! `durin-bench`: the "order3" benchmark of DESIGN.md section 6, measured against a release
//! build of Durin.
//!
//! It starts `durin serve` on a fresh SQLite file in a scratch directory and the `order`
//! example handler, both on port 0 (the ports are read from their "listening on" lines),
//! registers the handler, sends one checked request, warms up (200 requests at c=16 by
//! default, not reported), and then, for each concurrency level C, sends N requests to
//! `POST /v1/call/order/process` from C concurrent callers on keep-alive connections (a
//! closed loop, like `oha -n N -c C` in `shared/bench/restate/bench.sh`, whose figures for
//! Restate are the reference). At c=1 at most 500 requests are sent, to keep the run short.
//!
//! Output, all on stdout: first a human-readable table, then the DESIGN.md targets next to
//! the measured figures, then one JSON object per level, each on a line of its own starting
//! with `{` (select them with `grep '^{'`). The JSON fields are those of `bench.sh` (`system`,
//! `scenario`, `n`, `concurrency`, `throughput_per_s`, `p50_ms`, `p95_ms`, `p99_ms`, `max_ms`,
//! `errors`, `mean_ms`, `duration_s`) plus CPU, memory and load figures. Progress goes to
//! stderr.
//!
//! CPU per invocation is the user+system time of a process during a level (from
//! `/proc/PID/stat`) divided by the successful requests of that level; it is reported for
//! Durin, the handler, and this load generator, which all share the machine's cores.
//!
//! Both children are killed when the benchmark ends, fails or is interrupted with Ctrl-C,
//! and the scratch directory (database and the children's logs) is removed unless
//! `--keep-dir` is given.
//!
//! ```text
//! cargo build --release -p durin -p order-example -p durin-bench && target/release/durin-bench
//! ```

mod load;
mod procs;
mod report;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Parser;

use crate::procs::{Harness, ScratchDir, Service};
use crate::report::{Level, Machine};

/// At c=1 requests are sequential, so the request count is capped to keep the run short;
/// 500 samples are plenty for a p99.
const MAX_REQUESTS_AT_C1: usize = 500;

/// Concurrency of the warm-up, as in the Restate anchor's `run.sh`.
const WARMUP_CONCURRENCY: usize = 16;

#[derive(Parser)]
#[command(
    name = "durin-bench",
    about = "Runs the order3 benchmark against release builds of durin and the order example"
)]
struct Args {
    /// Directory holding the `durin` and `order` binaries [default: the directory of this
    /// executable, i.e. target/release]
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Requests per concurrency level (at c=1 at most 500).
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Concurrency levels, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,64,256")]
    concurrency: Vec<usize>,
    /// Warm-up requests (sent at c=16, not reported); 0 skips the warm-up.
    #[arg(long, default_value_t = 200)]
    warmup: usize,
    /// Keep the scratch directory (SQLite database and the children's logs).
    #[arg(long)]
    keep_dir: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("durin-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    if args.requests == 0 {
        bail!("--requests must be at least 1");
    }
    if args.concurrency.is_empty() || args.concurrency.contains(&0) {
        bail!("--concurrency needs one or more levels, each at least 1");
    }
    let bin_dir = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()
            .context("cannot find the path of this executable; pass --bin-dir")?
            .parent()
            .context("this executable has no parent directory; pass --bin-dir")?
            .to_path_buf(),
    };
    let machine = Machine::now();

    // Declared before the children so that it is dropped after them on an early return.
    let dir = ScratchDir::create(args.keep_dir)?;
    let database = format!("sqlite:{}", dir.path.join("durin.db").display());
    eprintln!("durin-bench: scratch directory {}", dir.path.display());
    let durin = Service::start(
        "durin",
        &bin_dir.join("durin"),
        &["serve", "--listen", "127.0.0.1:0", "--database", &database],
        dir.path.join("durin.log"),
        "durin listening on ",
    )?;
    let order = Service::start(
        "order",
        &bin_dir.join("order"),
        &["--listen", "127.0.0.1:0"],
        dir.path.join("order.log"),
        "order service listening on ",
    )?;
    let harness = Harness {
        durin,
        order,
        _dir: dir,
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let levels = runtime.block_on(async {
        // Interrupting the benchmark drops the run, and `harness` is dropped on the way out
        // of `run`, which kills the children instead of leaving them behind.
        tokio::select! {
            levels = measure(args, &harness, machine.ticks_per_sec) => levels,
            _ = tokio::signal::ctrl_c() => bail!("interrupted"),
        }
    })?;
    let machine = machine.finish();
    report::print(&machine, &levels);
    Ok(())
}

/// Registers the handler, checks one call, warms up, and measures every level.
async fn measure(args: &Args, harness: &Harness, ticks_per_sec: u64) -> Result<Vec<Level>> {
    let max_concurrency = args.concurrency.iter().copied().max().unwrap_or(1);
    let client = load::client(max_concurrency.max(WARMUP_CONCURRENCY))?;
    register(&client, &harness.durin.url, &harness.order.url).await?;

    let url = format!("{}/v1/call/order/process", harness.durin.url);
    load::smoke(&client, &url).await?;
    if args.warmup > 0 {
        eprintln!(
            "durin-bench: warm-up, {} requests at c={WARMUP_CONCURRENCY}",
            args.warmup
        );
        let warmup = load::run(&client, &url, args.warmup, WARMUP_CONCURRENCY).await?;
        if let Some(e) = &warmup.first_error {
            eprintln!(
                "durin-bench: warm-up had {} errors, the first: {e}",
                warmup.errors()
            );
        }
    }

    let mut levels = Vec::new();
    for &concurrency in &args.concurrency {
        let requests = if concurrency == 1 {
            args.requests.min(MAX_REQUESTS_AT_C1)
        } else {
            args.requests
        };
        eprintln!("durin-bench: c={concurrency}, {requests} requests");
        let load_before = procs::loadavg1();
        let cpu_before = cpu_snapshot(harness)?;
        let result = load::run(&client, &url, requests, concurrency).await?;
        let cpu_after = cpu_snapshot(harness)?;
        if let Some(e) = &result.first_error {
            eprintln!(
                "durin-bench: c={concurrency} had {} errors, the first: {e}",
                result.errors()
            );
        }
        levels.push(Level {
            concurrency,
            requests,
            durin_cpu_s: ticks_to_s(cpu_after[0].saturating_sub(cpu_before[0]), ticks_per_sec),
            handler_cpu_s: ticks_to_s(cpu_after[1].saturating_sub(cpu_before[1]), ticks_per_sec),
            loadgen_cpu_s: ticks_to_s(cpu_after[2].saturating_sub(cpu_before[2]), ticks_per_sec),
            durin_rss_mib: procs::rss_mib(harness.durin.pid()),
            load_before,
            load_after: procs::loadavg1(),
            result,
        });
    }
    Ok(levels)
}

/// CPU ticks so far of Durin, the handler, and this process, in that order.
fn cpu_snapshot(harness: &Harness) -> Result<[u64; 3]> {
    Ok([
        procs::cpu_ticks(harness.durin.pid())?,
        procs::cpu_ticks(harness.order.pid())?,
        procs::cpu_ticks(std::process::id())?,
    ])
}

fn ticks_to_s(ticks: u64, ticks_per_sec: u64) -> f64 {
    ticks as f64 / ticks_per_sec as f64
}

/// Registers the order service with Durin, which discovers its handlers.
async fn register(client: &reqwest::Client, durin: &str, order: &str) -> Result<()> {
    let response = client
        .post(format!("{durin}/v1/deployments"))
        .json(&serde_json::json!({ "url": order }))
        .send()
        .await
        .context("cannot reach durin to register the order service")?;
    let status = response.status();
    if status != reqwest::StatusCode::CREATED && status != reqwest::StatusCode::OK {
        let body = response.text().await.unwrap_or_default();
        bail!("registering {order} with durin answered {status}: {body}");
    }
    Ok(())
}
