//! Turning measured levels into the table, the DESIGN.md comparison, and the JSON lines.

use std::time::Duration;

use crate::load::LevelResult;
use crate::procs;

/// Restate 1.7 on this machine, quiet (DESIGN.md section 6): c=1 p50 in ms.
const RESTATE_C1_P50_MS: f64 = 5.4;
/// Restate's throughput at c=64, per second.
const RESTATE_C64_PER_S: f64 = 790.0;
/// Restate's throughput at c=256, per second.
const RESTATE_C256_PER_S: f64 = 1100.0;
/// Target: single-caller p50 under this many ms.
const TARGET_C1_P50_MS: f64 = 2.0;
/// Target: throughput at c=64 at least this multiple of Restate's.
const TARGET_C64_FACTOR: f64 = 5.0;

/// Facts about the machine, which is shared: the load average says how noisy the run was.
pub struct Machine {
    pub cores: usize,
    pub ticks_per_sec: u64,
    pub load_before: Option<f64>,
    pub load_after: Option<f64>,
}

impl Machine {
    pub fn now() -> Self {
        Machine {
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            ticks_per_sec: procs::clock_ticks_per_sec(),
            load_before: procs::loadavg1(),
            load_after: None,
        }
    }

    pub fn finish(self) -> Self {
        Machine {
            load_after: procs::loadavg1(),
            ..self
        }
    }
}

/// One measured concurrency level.
pub struct Level {
    pub concurrency: usize,
    pub requests: usize,
    pub result: LevelResult,
    /// CPU seconds used during the level by Durin, the handler, and this load generator.
    pub durin_cpu_s: f64,
    pub handler_cpu_s: f64,
    pub loadgen_cpu_s: f64,
    pub durin_rss_mib: Option<f64>,
    pub load_before: Option<f64>,
    pub load_after: Option<f64>,
}

impl Level {
    fn throughput(&self) -> f64 {
        let secs = self.result.wall.as_secs_f64();
        if secs > 0.0 {
            self.result.ok as f64 / secs
        } else {
            0.0
        }
    }

    /// CPU microseconds per successful invocation; `None` if nothing succeeded.
    fn per_invocation_us(&self, cpu_s: f64) -> Option<f64> {
        (self.result.ok > 0).then(|| cpu_s * 1e6 / self.result.ok as f64)
    }

    fn p50_ms(&self) -> Option<f64> {
        self.result.percentile(0.50).map(ms)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Formats an optional figure with `decimals` decimals, or `-` when it is missing.
fn fmt(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}"))
}

/// Rounds to three decimals for the JSON output, as `bench.sh` does for milliseconds.
fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

/// Prints the table, then the targets, then one JSON line per level, all on stdout.
pub fn print(machine: &Machine, levels: &[Level]) {
    println!(
        "order3 on durin {}: {} cores; load average (1 min) {} before, {} after; CPU from /proc at {} ticks/s",
        env!("CARGO_PKG_VERSION"),
        machine.cores,
        fmt(machine.load_before, 2),
        fmt(machine.load_after, 2),
        machine.ticks_per_sec,
    );
    println!();
    println!(
        "{:>5} {:>6} {:>9} {:>8} {:>8} {:>8} {:>8} {:>6} {:>11} {:>11} {:>11} {:>11}",
        "c",
        "n",
        "ok/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "max ms",
        "errors",
        "durin µs/i",
        "handler µs/i",
        "bench µs/i",
        "load 1m"
    );
    for level in levels {
        let r = &level.result;
        println!(
            "{:>5} {:>6} {:>9.1} {:>8} {:>8} {:>8} {:>8} {:>6} {:>11} {:>11} {:>11} {:>11}",
            level.concurrency,
            level.requests,
            level.throughput(),
            fmt(level.p50_ms(), 2),
            fmt(r.percentile(0.95).map(ms), 2),
            fmt(r.percentile(0.99).map(ms), 2),
            fmt(r.latencies.last().copied().map(ms), 2),
            r.errors(),
            fmt(level.per_invocation_us(level.durin_cpu_s), 0),
            fmt(level.per_invocation_us(level.handler_cpu_s), 0),
            fmt(level.per_invocation_us(level.loadgen_cpu_s), 0),
            format!(
                "{}->{}",
                fmt(level.load_before, 2),
                fmt(level.load_after, 2)
            ),
        );
    }
    println!("µs/i: CPU microseconds per successful invocation (user+system); load 1m: load average before->after the level");
    println!();
    print_targets(levels);
    println!();
    for level in levels {
        println!("{}", json_line(machine, level));
    }
}

fn level_at(levels: &[Level], concurrency: usize) -> Option<&Level> {
    levels.iter().find(|l| l.concurrency == concurrency)
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "NOT met"
    }
}

fn print_targets(levels: &[Level]) {
    println!(
        "DESIGN.md section 6 targets (Restate 1.7 here, quiet: c=1 p50 {RESTATE_C1_P50_MS} ms, c=64 ~{RESTATE_C64_PER_S:.0}/s, c=256 ~{RESTATE_C256_PER_S:.0}/s):"
    );
    match level_at(levels, 1).and_then(Level::p50_ms) {
        Some(p50) => println!(
            "  c=1 p50 under {TARGET_C1_P50_MS} ms: measured {p50:.2} ms, {} (Restate {RESTATE_C1_P50_MS} ms; durin/Restate {:.2})",
            verdict(p50 < TARGET_C1_P50_MS),
            p50 / RESTATE_C1_P50_MS,
        ),
        None => println!("  c=1 p50 under {TARGET_C1_P50_MS} ms: not measured (no c=1 level)"),
    }
    let target = TARGET_C64_FACTOR * RESTATE_C64_PER_S;
    match level_at(levels, 64) {
        Some(level) => {
            let throughput = level.throughput();
            println!(
                "  c=64 throughput >= {target:.0}/s ({TARGET_C64_FACTOR}x Restate's ~{RESTATE_C64_PER_S:.0}/s): measured {throughput:.0}/s, {} ({:.1}x Restate)",
                verdict(throughput >= target),
                throughput / RESTATE_C64_PER_S,
            );
        }
        None => println!("  c=64 throughput >= {target:.0}/s: not measured (no c=64 level)"),
    }
    if let Some(level) = level_at(levels, 256) {
        let throughput = level.throughput();
        println!(
            "  c=256 (no target): measured {throughput:.0}/s, {:.1}x Restate's ~{RESTATE_C256_PER_S:.0}/s",
            throughput / RESTATE_C256_PER_S,
        );
    }
}

fn json_line(machine: &Machine, level: &Level) -> serde_json::Value {
    let r = &level.result;
    let ms3 = |d: Option<Duration>| d.map(|d| round3(ms(d)));
    serde_json::json!({
        "system": "durin",
        "version": env!("CARGO_PKG_VERSION"),
        "scenario": "order3",
        "n": level.requests,
        "concurrency": level.concurrency,
        "throughput_per_s": (level.throughput() * 100.0).round() / 100.0,
        "p50_ms": ms3(r.percentile(0.50)),
        "p95_ms": ms3(r.percentile(0.95)),
        "p99_ms": ms3(r.percentile(0.99)),
        "max_ms": ms3(r.latencies.last().copied()),
        "mean_ms": ms3(r.mean()),
        "errors": r.errors(),
        "errors_status": r.bad_status,
        "errors_body": r.bad_body,
        "errors_transport": r.transport,
        "duration_s": round3(r.wall.as_secs_f64()),
        "durin_cpu_s": round3(level.durin_cpu_s),
        "handler_cpu_s": round3(level.handler_cpu_s),
        "loadgen_cpu_s": round3(level.loadgen_cpu_s),
        "durin_cpu_us_per_inv": level.per_invocation_us(level.durin_cpu_s).map(f64::round),
        "handler_cpu_us_per_inv": level.per_invocation_us(level.handler_cpu_s).map(f64::round),
        "loadgen_cpu_us_per_inv": level.per_invocation_us(level.loadgen_cpu_s).map(f64::round),
        "durin_rss_mib": level.durin_rss_mib.map(|v| (v * 10.0).round() / 10.0),
        "loadavg1_before": level.load_before,
        "loadavg1_after": level.load_after,
        "cores": machine.cores,
        "clk_tck": machine.ticks_per_sec,
    })
}
