//! Turning measured levels into the tables, the DESIGN.md comparison, the side-by-side
//! lines of the scenarios that ran, and the JSON lines.

use std::time::Duration;

use crate::load::LevelResult;
use crate::procs;

/// Restate 1.7 on this machine, quiet (DESIGN.md section 6): c=1 p50 in ms.
const RESTATE_C1_P50_MS: f64 = 5.4;
/// Restate's throughput at c=64, per second.
const RESTATE_C64_PER_S: f64 = 790.0;
/// Restate's throughput at c=256, per second.
const RESTATE_C256_PER_S: f64 = 1100.0;
/// Restate's figures that the targets are held against: DESIGN.md's, measured on this
/// machine when it was quiet, or those of a run of the Restate anchor in the same hour
/// (`--restate FILE`). The machine's speed varies by the hour, Restate's with it, so only
/// the second gives the ratio of a run side by side.
#[derive(Debug, Clone, PartialEq)]
pub struct Restate {
    pub c1_p50_ms: f64,
    pub c64_per_s: f64,
    pub c256_per_s: f64,
    /// Where the figures come from, for the report's heading.
    pub source: String,
}

impl Restate {
    /// DESIGN.md section 6's figures.
    pub fn design() -> Self {
        Restate {
            c1_p50_ms: RESTATE_C1_P50_MS,
            c64_per_s: RESTATE_C64_PER_S,
            c256_per_s: RESTATE_C256_PER_S,
            source: "Restate 1.7 here, quiet, DESIGN.md".to_owned(),
        }
    }

    /// The figures in `text`, the JSON lines that the Restate anchor's `run.sh` prints
    /// (one per level: `system`, `concurrency`, `throughput_per_s`, `p50_ms`), read from
    /// `path`. Each of the levels 1, 64 and 256 must be there; the last line of a level
    /// counts.
    pub fn from_run(path: &str, text: &str) -> Result<Self, String> {
        let mut p50 = None;
        let mut c64 = None;
        let mut c256 = None;
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let value: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| format!("{path}, line {}: not a JSON line ({e})", number + 1))?;
            if value["system"] != "restate" {
                continue;
            }
            let figure = |name: &str| {
                value[name]
                    .as_f64()
                    .filter(|v| v.is_finite() && *v > 0.0)
                    .ok_or_else(|| format!("{path}, line {}: no positive {name}", number + 1))
            };
            match value["concurrency"].as_u64() {
                Some(1) => p50 = Some(figure("p50_ms")?),
                Some(64) => c64 = Some(figure("throughput_per_s")?),
                Some(256) => c256 = Some(figure("throughput_per_s")?),
                _ => {}
            }
        }
        let missing = |what: &str| format!("{path} has no Restate level at {what}");
        Ok(Restate {
            c1_p50_ms: p50.ok_or_else(|| missing("c=1"))?,
            c64_per_s: c64.ok_or_else(|| missing("c=64"))?,
            c256_per_s: c256.ok_or_else(|| missing("c=256"))?,
            source: format!("Restate measured side by side, {path}"),
        })
    }
}

/// Target (DESIGN.md section 6): with an SDK, a single caller's p50 under this many ms.
const TARGET_C1_P50_MS: f64 = 1.0;
/// Target: with an SDK, throughput at c=64 and at c=256 at least this multiple of Restate's.
const TARGET_SDK_FACTOR: f64 = 10.0;
/// Target: through the egress (no SDK), throughput at c=64 and at c=256 at least this
/// multiple of Restate's.
const TARGET_EGRESS_FACTOR: f64 = 5.0;
/// Target: order3 on PostgreSQL, one node, at least this share of the SQLite store's
/// throughput in the same run (`--store both`).
const TARGET_POSTGRES_SHARE: f64 = 0.6;
/// The name of the scenario through the egress, whose targets are not the SDK's.
pub const EGRESS_SCENARIO: &str = "order3-egress";

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

/// The measured levels of one scenario.
pub struct ScenarioReport {
    /// `order3`, `order3-python`, `order3-typescript` or `order3-egress`, also the
    /// `scenario` of the JSON lines.
    pub scenario: &'static str,
    /// One line on how the handler is written and run.
    pub description: String,
    /// Whether the handler runs inside this bench process, so that its CPU figure is this
    /// whole process, load generator included.
    pub handler_in_process: bool,
    /// How many Durin nodes shared a PostgreSQL database; `None` on SQLite (one node), whose
    /// output has no PostgreSQL figures.
    pub postgres_nodes: Option<usize>,
    pub levels: Vec<Level>,
}

impl ScenarioReport {
    /// The scenario's name, and the store when it is PostgreSQL: `order3 on PostgreSQL`.
    fn label(&self) -> String {
        match self.postgres_nodes {
            None => self.scenario.to_owned(),
            Some(1) => format!("{} on PostgreSQL", self.scenario),
            Some(nodes) => format!("{} on PostgreSQL ({nodes} nodes)", self.scenario),
        }
    }
}

/// One measured concurrency level.
pub struct Level {
    pub concurrency: usize,
    pub requests: usize,
    pub result: LevelResult,
    /// CPU seconds used during the level by Durin (its egress included) and the handler.
    /// For a handler inside this process, the handler's figure is the whole process.
    pub durin_cpu_s: f64,
    pub handler_cpu_s: f64,
    /// CPU seconds of this load generator; `None` when it shares its process with the
    /// handler and so has no figure of its own.
    pub loadgen_cpu_s: Option<f64>,
    /// CPU seconds of every PostgreSQL process on this machine; `None` on SQLite, or when no
    /// PostgreSQL process could be read here.
    pub postgres_cpu_s: Option<f64>,
    /// Statements the database ran during the level (its own and those of its triggers),
    /// when it has `pg_stat_statements`: `BEGIN`, `COMMIT` and `SAVEPOINT` are not among
    /// them (prepared utility statements are not counted).
    pub postgres_statements: Option<u64>,
    /// Durin's RSS just after the level; with several nodes, their sum (as the three below).
    pub durin_rss_mib: Option<f64>,
    /// Durin's RSS just before the level.
    pub durin_rss_before_mib: Option<f64>,
    /// The largest of Durin's RSS sampled during the level and just after it.
    pub durin_rss_peak_mib: Option<f64>,
    /// Durin's RSS after `settle_secs` without load following the level.
    pub durin_rss_after_mib: Option<f64>,
    /// How long the bench waited after the level before reading `durin_rss_after_mib`.
    pub settle_secs: u64,
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

/// The width of the table's `errors` cell; a longer breakdown goes on a line of its own.
const ERRORS_WIDTH: usize = 9;

/// The failures of a level for the table: `0`, or the count per status other than 200
/// (`503:1200`), then `body:N` for 200s with another body and `tx:N` for transport errors,
/// separated by spaces.
fn errors_cell(r: &LevelResult) -> String {
    let mut parts: Vec<String> = r
        .by_status
        .iter()
        .map(|(status, count)| format!("{status}:{count}"))
        .collect();
    if r.bad_body > 0 {
        parts.push(format!("body:{}", r.bad_body));
    }
    if r.transport > 0 {
        parts.push(format!("tx:{}", r.transport));
    }
    if parts.is_empty() {
        "0".to_owned()
    } else {
        parts.join(" ")
    }
}

/// The `errors` cell of a level's row, and the breakdown for a line of its own below the
/// row when it is wider than the cell: then the cell holds the total.
fn errors_in_row(r: &LevelResult) -> (String, Option<String>) {
    let cell = errors_cell(r);
    if cell.chars().count() <= ERRORS_WIDTH {
        (cell, None)
    } else {
        (r.errors().to_string(), Some(cell))
    }
}

/// Durin's RSS before, at the peak of, and after a level, in whole MiB: `15/327/40`, `-`
/// for a figure that could not be read.
fn rss_cell(level: &Level) -> String {
    format!(
        "{}/{}/{}",
        fmt(level.durin_rss_before_mib, 0),
        fmt(level.durin_rss_peak_mib, 0),
        fmt(level.durin_rss_after_mib, 0)
    )
}

/// Rounds to one decimal for the JSON output, for MiB.
fn round1(value: f64) -> f64 {
    (value * 10.0).round() / 10.0
}

/// Rounds to three decimals for the JSON output, as `bench.sh` does for milliseconds.
fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

/// Prints, per scenario, the table and the targets; then the side-by-side lines when more
/// than one scenario ran; then one JSON line per scenario and level; all on stdout.
pub fn print(machine: &Machine, scenarios: &[ScenarioReport], restate: &Restate) {
    println!(
        "durin {}: {} cores; load average (1 min) {} before, {} after; CPU from /proc at {} ticks/s",
        env!("CARGO_PKG_VERSION"),
        machine.cores,
        fmt(machine.load_before, 2),
        fmt(machine.load_after, 2),
        machine.ticks_per_sec,
    );
    for scenario in scenarios {
        println!();
        print_table(scenario);
        println!();
        for line in target_lines(scenario, restate) {
            println!("{line}");
        }
    }
    if scenarios.len() > 1 {
        println!();
        for line in side_by_side(scenarios) {
            println!("{line}");
        }
        for line in postgres_share_lines(scenarios) {
            println!("{line}");
        }
    }
    println!();
    for scenario in scenarios {
        for level in &scenario.levels {
            println!("{}", json_line(machine, scenario, level));
        }
    }
}

fn print_table(scenario: &ScenarioReport) {
    println!("{}: {}", scenario.scenario, scenario.description);
    // The PostgreSQL column is there only on PostgreSQL, so the SQLite table is unchanged.
    let postgres = scenario.postgres_nodes.is_some();
    let postgres_column = |value: &str| {
        if postgres {
            format!(" {value:>11}")
        } else {
            String::new()
        }
    };
    println!(
        "{:>5} {:>6} {:>8} {:>7} {:>7} {:>7} {:>8} {:>ERRORS_WIDTH$} {:>14} {:>10} {:>14} {:>10}{} {:>10}",
        "c",
        "n",
        "ok/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "max ms",
        "errors",
        "RSS MiB b/p/a",
        "durin µs/i",
        if scenario.handler_in_process {
            "hdl+bench µs/i"
        } else {
            "handler µs/i"
        },
        "bench µs/i",
        postgres_column("pg µs/i"),
        "load 1m"
    );
    for level in &scenario.levels {
        let r = &level.result;
        let (errors, breakdown) = errors_in_row(r);
        println!(
            "{:>5} {:>6} {:>8.1} {:>7} {:>7} {:>7} {:>8} {:>ERRORS_WIDTH$} {:>14} {:>10} {:>14} {:>10}{} {:>10}",
            level.concurrency,
            level.requests,
            level.throughput(),
            fmt(level.p50_ms(), 2),
            fmt(r.percentile(0.95).map(ms), 2),
            fmt(r.percentile(0.99).map(ms), 2),
            fmt(r.latencies.last().copied().map(ms), 2),
            errors,
            rss_cell(level),
            fmt(level.per_invocation_us(level.durin_cpu_s), 0),
            fmt(level.per_invocation_us(level.handler_cpu_s), 0),
            fmt(
                level
                    .loadgen_cpu_s
                    .and_then(|cpu| level.per_invocation_us(cpu)),
                0
            ),
            postgres_column(&fmt(
                level
                    .postgres_cpu_s
                    .and_then(|cpu| level.per_invocation_us(cpu)),
                0
            )),
            format!(
                "{}->{}",
                fmt(level.load_before, 2),
                fmt(level.load_after, 2)
            ),
        );
        if let Some(breakdown) = breakdown {
            println!("{:>13} {breakdown}", "errors:");
        }
    }
    println!("µs/i: CPU microseconds per successful invocation (user+system); durin includes its egress; load 1m: load average before->after the level");
    let settle = scenario.levels.first().map_or(0, |l| l.settle_secs);
    println!("errors: answers per HTTP status other than 200 (503: refused by admission control; counted in the latencies, not in ok/s), body: 200s with another body, tx: no answer (connection failed, timeout)");
    println!("RSS MiB b/p/a: durin's RSS just before the level / its peak during it (sampled every 100 ms) / after {settle} s without load");
    for level in scenario
        .levels
        .iter()
        .filter(|l| l.result.refused_503() > 0)
    {
        println!(
            "c={}: {} answers 503, {} of them with Retry-After",
            level.concurrency,
            level.result.refused_503(),
            level.result.refused_with_retry_after
        );
    }
    if let Some(nodes) = scenario.postgres_nodes {
        println!("durin µs/i: the sum of its {nodes} node(s); pg µs/i: every PostgreSQL process on this machine (postmaster, background processes, all backends of any database)");
    }
    if scenario.handler_in_process {
        println!("hdl+bench µs/i: this whole bench process, where the plain handler, the downstream and the load generator share one runtime; they are not measured apart, so bench µs/i is '-'");
    }
}

/// A heading, then one line per concurrency level of the first scenario: each figure of
/// every scenario that measured the level, separated by `vs`, and the ratios of the others'
/// to the first's. With two scenarios (order3 and order3-egress) a figure reads `3100 vs
/// 1500 (0.48x)`; with four, `3100 vs 450 vs 900 vs 1500 (0.15x 0.29x 0.48x)`. A note
/// follows when a scenario's handler runs inside the bench process.
fn side_by_side(scenarios: &[ScenarioReport]) -> Vec<String> {
    let Some((first, others)) = scenarios.split_first() else {
        return Vec::new();
    };
    let names: Vec<String> = scenarios.iter().map(ScenarioReport::label).collect();
    let ratios = if others.len() == 1 {
        format!("ratio = {}/{}", names[1], names[0])
    } else {
        format!("ratios = each of the others/{}", names[0])
    };
    let mut lines = vec![format!("side by side, {} ({ratios}):", names.join(" vs "))];
    for level in &first.levels {
        let levels: Vec<&Level> = scenarios
            .iter()
            .filter_map(|s| level_at(&s.levels, level.concurrency))
            .collect();
        // (label, decimals, the figure of a level)
        type Figure = (&'static str, usize, fn(&Level) -> Option<f64>);
        let figures: [Figure; 5] = [
            ("ok/s", 0, |l| Some(l.throughput())),
            ("p50 ms", 2, Level::p50_ms),
            ("p99 ms", 2, |l| l.result.percentile(0.99).map(ms)),
            ("durin µs/i", 0, |l| l.per_invocation_us(l.durin_cpu_s)),
            ("handler µs/i", 0, |l| l.per_invocation_us(l.handler_cpu_s)),
        ];
        let mut line = format!("  c={:<3}", level.concurrency);
        for (label, decimals, figure) in figures {
            let values: Vec<Option<f64>> = levels.iter().map(|l| figure(l)).collect();
            line.push_str(&format!("  {label} {}", vs(&values, decimals)));
        }
        let errors: Vec<String> = levels
            .iter()
            .map(|l| l.result.errors().to_string())
            .collect();
        line.push_str(&format!("  errors {}", errors.join(" vs ")));
        lines.push(line);
    }
    let in_process: Vec<&str> = scenarios
        .iter()
        .filter(|s| s.handler_in_process)
        .map(|s| s.scenario)
        .collect();
    if !in_process.is_empty() {
        lines.push(format!(
            "  handler µs/i of {}: this whole bench process (handler, downstream and load generator)",
            in_process.join(", ")
        ));
    }
    lines
}

/// Figures side by side, `a vs b vs c`, then the ratios of the others to the first,
/// `(0.50x 2.00x)`; `-` for a figure or a ratio that is missing.
fn vs(values: &[Option<f64>], decimals: usize) -> String {
    let figures: Vec<String> = values.iter().map(|&v| fmt(v, decimals)).collect();
    let Some((&first, others)) = values.split_first() else {
        return String::new();
    };
    if others.is_empty() {
        return figures.join(" vs ");
    }
    let ratios: Vec<String> = others
        .iter()
        .map(|&other| match (other, first) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
            _ => "-".to_owned(),
        })
        .collect();
    format!("{} ({})", figures.join(" vs "), ratios.join(" "))
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

/// The lines that hold a scenario against DESIGN.md section 6: with an SDK, a single
/// caller's p50 under [`TARGET_C1_P50_MS`] and [`TARGET_SDK_FACTOR`] times Restate's
/// throughput at 64 and 256 callers; through the egress, [`TARGET_EGRESS_FACTOR`] times.
/// On PostgreSQL the target is a share of SQLite's ([`postgres_share_lines`]).
fn target_lines(scenario: &ScenarioReport, restate: &Restate) -> Vec<String> {
    let label = scenario.label();
    if scenario.postgres_nodes.is_some() {
        return vec![format!(
            "{label}: DESIGN.md section 6 holds PostgreSQL against the SQLite store in the same run (--store both), at least {TARGET_POSTGRES_SHARE}x its throughput on one node"
        )];
    }
    let (c1_target, factor) = if scenario.scenario == EGRESS_SCENARIO {
        (None, TARGET_EGRESS_FACTOR)
    } else {
        (Some(TARGET_C1_P50_MS), TARGET_SDK_FACTOR)
    };
    let Restate {
        c1_p50_ms: restate_p50,
        c64_per_s,
        c256_per_s,
        source,
    } = restate;
    let mut lines = vec![format!(
        "{label} against the DESIGN.md section 6 targets ({source}: c=1 p50 {restate_p50} ms, c=64 ~{c64_per_s:.0}/s, c=256 ~{c256_per_s:.0}/s):"
    )];
    let p50 = level_at(&scenario.levels, 1).and_then(Level::p50_ms);
    lines.push(match (c1_target, p50) {
        (Some(target), Some(p50)) => format!(
            "  c=1 p50 under {target} ms: measured {p50:.2} ms, {} (Restate {restate_p50} ms; durin/Restate {:.2})",
            verdict(p50 < target),
            p50 / restate_p50,
        ),
        (Some(target), None) => {
            format!("  c=1 p50 under {target} ms: not measured (no c=1 level)")
        }
        (None, Some(p50)) => format!(
            "  c=1 p50 (no target): measured {p50:.2} ms (Restate {restate_p50} ms; durin/Restate {:.2})",
            p50 / restate_p50,
        ),
        (None, None) => "  c=1 p50 (no target): not measured".to_owned(),
    });
    for (concurrency, restate) in [(64, *c64_per_s), (256, *c256_per_s)] {
        let target = factor * restate;
        lines.push(match level_at(&scenario.levels, concurrency) {
            Some(level) => {
                let throughput = level.throughput();
                format!(
                    "  c={concurrency} throughput >= {target:.0}/s ({factor}x Restate's ~{restate:.0}/s): measured {throughput:.0}/s, {} ({:.1}x Restate)",
                    verdict(throughput >= target),
                    throughput / restate,
                )
            }
            None => format!(
                "  c={concurrency} throughput >= {target:.0}/s: not measured (no c={concurrency} level)"
            ),
        });
    }
    lines
}

/// When order3 ran on SQLite and on PostgreSQL in this run (`--store both`): PostgreSQL's
/// throughput as a share of SQLite's at each level both measured with more than one caller,
/// held against [`TARGET_POSTGRES_SHARE`] when PostgreSQL had one node.
fn postgres_share_lines(scenarios: &[ScenarioReport]) -> Vec<String> {
    let order3 = |postgres: bool| {
        scenarios
            .iter()
            .find(|s| s.scenario == "order3" && s.postgres_nodes.is_some() == postgres)
    };
    let (Some(sqlite), Some(postgres)) = (order3(false), order3(true)) else {
        return Vec::new();
    };
    let one_node = postgres.postgres_nodes == Some(1);
    let mut lines = vec![if one_node {
        format!(
            "{} against the DESIGN.md section 6 target (at least {TARGET_POSTGRES_SHARE}x the SQLite store's throughput in the same run):",
            postgres.label()
        )
    } else {
        format!(
            "{} against SQLite in the same run (DESIGN.md's target of {TARGET_POSTGRES_SHARE}x is for one node):",
            postgres.label()
        )
    }];
    for level in postgres.levels.iter().filter(|l| l.concurrency > 1) {
        let Some(base) = level_at(&sqlite.levels, level.concurrency) else {
            continue;
        };
        let (pg, lite) = (level.throughput(), base.throughput());
        let share = if lite > 0.0 { pg / lite } else { 0.0 };
        let mut line = format!(
            "  c={}: {pg:.0}/s against {lite:.0}/s on SQLite, {share:.2}x",
            level.concurrency
        );
        if one_node {
            line.push_str(&format!(", {}", verdict(share >= TARGET_POSTGRES_SHARE)));
        }
        lines.push(line);
    }
    lines
}

fn json_line(machine: &Machine, scenario: &ScenarioReport, level: &Level) -> serde_json::Value {
    let r = &level.result;
    let ms3 = |d: Option<Duration>| d.map(|d| round3(ms(d)));
    let mut line = serde_json::json!({
        "system": "durin",
        "version": env!("CARGO_PKG_VERSION"),
        "scenario": scenario.scenario,
        "n": level.requests,
        "concurrency": level.concurrency,
        "throughput_per_s": (level.throughput() * 100.0).round() / 100.0,
        "p50_ms": ms3(r.percentile(0.50)),
        "p95_ms": ms3(r.percentile(0.95)),
        "p99_ms": ms3(r.percentile(0.99)),
        "max_ms": ms3(r.latencies.last().copied()),
        "mean_ms": ms3(r.mean()),
        "errors": r.errors(),
        "errors_status": r.bad_status(),
        "errors_by_status": r
            .by_status
            .iter()
            .map(|(status, &count)| (status.to_string(), serde_json::Value::from(count)))
            .collect::<serde_json::Map<_, _>>(),
        "refused_503": r.refused_503(),
        "refused_with_retry_after": r.refused_with_retry_after,
        "errors_body": r.bad_body,
        "errors_transport": r.transport,
        "duration_s": round3(r.wall.as_secs_f64()),
        "durin_cpu_s": round3(level.durin_cpu_s),
        "handler_cpu_s": round3(level.handler_cpu_s),
        "loadgen_cpu_s": level.loadgen_cpu_s.map(round3),
        "durin_cpu_us_per_inv": level.per_invocation_us(level.durin_cpu_s).map(f64::round),
        "handler_cpu_us_per_inv": level.per_invocation_us(level.handler_cpu_s).map(f64::round),
        "loadgen_cpu_us_per_inv": level
            .loadgen_cpu_s
            .and_then(|cpu| level.per_invocation_us(cpu))
            .map(f64::round),
        "handler_in_bench_process": scenario.handler_in_process,
        "durin_rss_mib": level.durin_rss_mib.map(round1),
        "durin_rss_before_mib": level.durin_rss_before_mib.map(round1),
        "durin_rss_peak_mib": level.durin_rss_peak_mib.map(round1),
        "durin_rss_after_mib": level.durin_rss_after_mib.map(round1),
        "settle_s": level.settle_secs,
        "loadavg1_before": level.load_before,
        "loadavg1_after": level.load_after,
        "cores": machine.cores,
        "clk_tck": machine.ticks_per_sec,
    });
    // On PostgreSQL only, so that the SQLite lines keep their fields.
    if let (Some(nodes), Some(fields)) = (scenario.postgres_nodes, line.as_object_mut()) {
        fields.insert("store".to_owned(), "postgres".into());
        fields.insert("nodes".to_owned(), nodes.into());
        fields.insert(
            "postgres_cpu_s".to_owned(),
            level.postgres_cpu_s.map(round3).into(),
        );
        fields.insert(
            "postgres_statements_per_inv".to_owned(),
            level
                .postgres_statements
                .filter(|_| level.result.ok > 0)
                .map(|n| round3(n as f64 / level.result.ok as f64))
                .into(),
        );
        fields.insert(
            "postgres_cpu_us_per_inv".to_owned(),
            level
                .postgres_cpu_s
                .and_then(|cpu| level.per_invocation_us(cpu))
                .map(f64::round)
                .into(),
        );
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A level of `result` with RSS figures and nothing else of interest.
    fn level(result: LevelResult, rss: [Option<f64>; 3]) -> Level {
        Level {
            concurrency: 5000,
            requests: 30_000,
            result,
            durin_cpu_s: 1.0,
            handler_cpu_s: 1.0,
            loadgen_cpu_s: None,
            postgres_cpu_s: None,
            postgres_statements: None,
            durin_rss_mib: rss[1],
            durin_rss_before_mib: rss[0],
            durin_rss_peak_mib: rss[1],
            durin_rss_after_mib: rss[2],
            settle_secs: 5,
            load_before: None,
            load_after: None,
        }
    }

    /// A scenario named `name` with one level at 64 callers: `ok` successes in one second,
    /// each taking `p50_ms`, and `durin_cpu_s` of Durin's CPU.
    fn scenario(name: &'static str, ok: usize, p50_ms: u64, durin_cpu_s: f64) -> ScenarioReport {
        let result = LevelResult {
            latencies: vec![Duration::from_millis(p50_ms); ok],
            ok,
            wall: Duration::from_secs(1),
            ..LevelResult::default()
        };
        let mut level = level(result, [None; 3]);
        level.concurrency = 64;
        level.durin_cpu_s = durin_cpu_s;
        ScenarioReport {
            scenario: name,
            description: String::new(),
            handler_in_process: name == "order3-egress",
            postgres_nodes: None,
            levels: vec![level],
        }
    }

    #[test]
    fn side_by_side_of_two_and_of_four_scenarios() {
        let sdk = scenario("order3", 1000, 10, 0.3);
        let egress = scenario("order3-egress", 500, 20, 0.6);
        assert_eq!(
            side_by_side(&[sdk, egress]),
            [
                "side by side, order3 vs order3-egress (ratio = order3-egress/order3):",
                "  c=64   ok/s 1000 vs 500 (0.50x)  p50 ms 10.00 vs 20.00 (2.00x)  p99 ms 10.00 vs 20.00 (2.00x)  durin µs/i 300 vs 1200 (4.00x)  handler µs/i 1000 vs 2000 (2.00x)  errors 0 vs 0",
                "  handler µs/i of order3-egress: this whole bench process (handler, downstream and load generator)",
            ]
        );
        let all = [
            scenario("order3", 1000, 10, 0.3),
            scenario("order3-python", 250, 40, 0.3),
            scenario("order3-typescript", 500, 20, 0.3),
            scenario("order3-egress", 500, 20, 0.6),
        ];
        let lines = side_by_side(&all);
        assert_eq!(
            lines[0],
            "side by side, order3 vs order3-python vs order3-typescript vs order3-egress (ratios = each of the others/order3):"
        );
        assert!(
            lines[1].starts_with("  c=64   ok/s 1000 vs 250 vs 500 vs 500 (0.25x 0.50x 0.50x)  p50 ms 10.00 vs 40.00 vs 20.00 vs 20.00 (4.00x 2.00x 2.00x)"),
            "{}",
            lines[1]
        );
        assert!(
            lines[1].ends_with("errors 0 vs 0 vs 0 vs 0"),
            "{}",
            lines[1]
        );
        assert_eq!(lines.len(), 3);
        // A scenario alone has nothing to stand beside.
        assert_eq!(vs(&[Some(1.0)], 0), "1");
        assert_eq!(vs(&[None, Some(2.0)], 1), "- vs 2.0 (-)");
    }

    /// `scenario` with a single caller's level, each request taking `c1_p50_us`, added before
    /// its level at 64 callers.
    fn with_single_caller(mut scenario: ScenarioReport, c1_p50_us: u64) -> ScenarioReport {
        let result = LevelResult {
            latencies: vec![Duration::from_micros(c1_p50_us); 10],
            ok: 10,
            wall: Duration::from_millis(20),
            ..LevelResult::default()
        };
        let mut single = level(result, [None; 3]);
        single.concurrency = 1;
        scenario.levels.insert(0, single);
        scenario
    }

    #[test]
    fn targets_of_an_sdk_scenario_and_of_the_egress() {
        // 900 µs at one caller, 8,000/s at 64: both SDK targets met; no level at 256.
        let sdk = with_single_caller(scenario("order3", 8000, 10, 0.3), 900);
        let lines = target_lines(&sdk, &Restate::design());
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert!(lines[0].starts_with("order3 against the DESIGN.md section 6 targets"));
        assert_eq!(
            lines[1],
            "  c=1 p50 under 1 ms: measured 0.90 ms, met (Restate 5.4 ms; durin/Restate 0.17)"
        );
        assert_eq!(
            lines[2],
            "  c=64 throughput >= 7900/s (10x Restate's ~790/s): measured 8000/s, met (10.1x Restate)"
        );
        assert_eq!(
            lines[3],
            "  c=256 throughput >= 11000/s: not measured (no c=256 level)"
        );
        // 1.5 ms and 5,000/s miss them.
        let slow = with_single_caller(scenario("order3", 5000, 10, 0.3), 1500);
        let lines = target_lines(&slow, &Restate::design());
        assert!(
            lines[1].contains("measured 1.50 ms, NOT met"),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].contains("measured 5000/s, NOT met (6.3x Restate)"),
            "{}",
            lines[2]
        );
        // Through the egress: five times Restate, and no target for a single caller.
        let egress = with_single_caller(scenario("order3-egress", 4000, 20, 0.6), 2500);
        let lines = target_lines(&egress, &Restate::design());
        assert_eq!(
            lines[1],
            "  c=1 p50 (no target): measured 2.50 ms (Restate 5.4 ms; durin/Restate 0.46)"
        );
        assert_eq!(
            lines[2],
            "  c=64 throughput >= 3950/s (5x Restate's ~790/s): measured 4000/s, met (5.1x Restate)"
        );
    }

    #[test]
    fn targets_against_restate_measured_side_by_side() {
        // Three lines as the Restate anchor's run.sh prints them, and one of another system.
        let run = r#"{"system":"restate","scenario":"order3","n":200,"concurrency":1,"throughput_per_s":278.68,"p50_ms":3.662}
{"system":"durin","scenario":"order3","n":2000,"concurrency":64,"throughput_per_s":7569.74,"p50_ms":8.061}
{"system":"restate","scenario":"order3","n":2000,"concurrency":64,"throughput_per_s":1541.47,"p50_ms":38.011}

{"system":"restate","scenario":"order3","n":2000,"concurrency":256,"throughput_per_s":1693.44,"p50_ms":109.526}
"#;
        let restate = Restate::from_run("restate.jsonl", run).unwrap();
        assert_eq!(
            (restate.c1_p50_ms, restate.c64_per_s, restate.c256_per_s),
            (3.662, 1541.47, 1693.44)
        );
        let sdk = with_single_caller(scenario("order3", 8000, 10, 0.3), 900);
        let lines = target_lines(&sdk, &restate);
        assert_eq!(
            lines[0],
            "order3 against the DESIGN.md section 6 targets (Restate measured side by side, restate.jsonl: c=1 p50 3.662 ms, c=64 ~1541/s, c=256 ~1693/s):"
        );
        assert_eq!(
            lines[1],
            "  c=1 p50 under 1 ms: measured 0.90 ms, met (Restate 3.662 ms; durin/Restate 0.25)"
        );
        // 8,000/s is 10.1 times DESIGN.md's 790/s but 5.2 times this Restate.
        assert_eq!(
            lines[2],
            "  c=64 throughput >= 15415/s (10x Restate's ~1541/s): measured 8000/s, NOT met (5.2x Restate)"
        );
        // A file without every level, or with something else than JSON lines, is refused.
        let without_256 = run.lines().take(3).collect::<Vec<_>>().join("\n");
        assert_eq!(
            Restate::from_run("r", &without_256).unwrap_err(),
            "r has no Restate level at c=256"
        );
        assert!(Restate::from_run("r", "[setup] done")
            .unwrap_err()
            .starts_with("r, line 1: not a JSON line"));
        assert_eq!(
            Restate::from_run(
                "r",
                r#"{"system":"restate","concurrency":64,"throughput_per_s":0}"#
            )
            .unwrap_err(),
            "r, line 1: no positive throughput_per_s"
        );
    }

    #[test]
    fn postgres_is_held_against_sqlite_in_the_same_run() {
        let sqlite = with_single_caller(scenario("order3", 5000, 10, 0.3), 1500);
        let mut postgres = with_single_caller(scenario("order3", 2500, 20, 0.3), 3000);
        postgres.postgres_nodes = Some(1);
        assert_eq!(
            target_lines(&postgres, &Restate::design()),
            ["order3 on PostgreSQL: DESIGN.md section 6 holds PostgreSQL against the SQLite store in the same run (--store both), at least 0.6x its throughput on one node"]
        );
        let lines = postgres_share_lines(&[sqlite, postgres]);
        assert_eq!(
            lines,
            [
                "order3 on PostgreSQL against the DESIGN.md section 6 target (at least 0.6x the SQLite store's throughput in the same run):",
                "  c=64: 2500/s against 5000/s on SQLite, 0.50x, NOT met",
            ]
        );
        // Three nodes: the share without a verdict; and nothing without both stores.
        let mut three = scenario("order3", 3500, 20, 0.3);
        three.postgres_nodes = Some(3);
        let lines = postgres_share_lines(&[scenario("order3", 5000, 10, 0.3), three]);
        assert_eq!(lines[1], "  c=64: 3500/s against 5000/s on SQLite, 0.70x");
        assert!(lines[0].starts_with("order3 on PostgreSQL (3 nodes) against SQLite"));
        let sdk_and_egress = [
            scenario("order3", 5000, 10, 0.3),
            scenario("order3-egress", 2500, 20, 0.6),
        ];
        assert!(postgres_share_lines(&sdk_and_egress).is_empty());
    }

    #[test]
    fn errors_cell_shows_the_statuses_or_zero() {
        let mut r = LevelResult::default();
        assert_eq!(errors_in_row(&r), ("0".to_owned(), None));
        for _ in 0..1200 {
            r.count_status(503, true);
        }
        assert_eq!(errors_in_row(&r), ("503:1200".to_owned(), None));
        r.count_status(500, false);
        r.transport = 3;
        r.bad_body = 2;
        // Too wide for the cell: the total there, the breakdown on a line of its own.
        assert_eq!(
            errors_in_row(&r),
            (
                "1206".to_owned(),
                Some("500:1 503:1200 body:2 tx:3".to_owned())
            )
        );
    }

    #[test]
    fn rss_cell_in_whole_mib() {
        let full = level(
            LevelResult::default(),
            [Some(15.2), Some(327.5), Some(40.0)],
        );
        assert_eq!(rss_cell(&full), "15/328/40");
        let missing = level(LevelResult::default(), [Some(15.0), None, None]);
        assert_eq!(rss_cell(&missing), "15/-/-");
    }

    #[test]
    fn json_line_has_the_statuses_and_the_rss_figures() {
        let mut result = LevelResult {
            latencies: vec![Duration::from_millis(5); 4],
            ok: 1,
            wall: Duration::from_secs(1),
            ..LevelResult::default()
        };
        result.count_status(503, true);
        result.count_status(503, false);
        result.count_status(500, false);
        let scenario = ScenarioReport {
            scenario: "order3",
            description: String::new(),
            handler_in_process: false,
            postgres_nodes: None,
            levels: Vec::new(),
        };
        let machine = Machine {
            cores: 2,
            ticks_per_sec: 100,
            load_before: None,
            load_after: None,
        };
        let level = level(result, [Some(15.04), Some(327.46), Some(40.0)]);
        let line = json_line(&machine, &scenario, &level);
        assert_eq!(
            line["errors_by_status"],
            serde_json::json!({"500": 1, "503": 2})
        );
        assert_eq!(line["refused_503"], 2);
        assert_eq!(line["refused_with_retry_after"], 1);
        assert_eq!(line["errors"], 3);
        assert_eq!(line["errors_status"], 3);
        assert_eq!(line["throughput_per_s"], 1.0);
        assert_eq!(line["durin_rss_before_mib"], 15.0);
        assert_eq!(line["durin_rss_peak_mib"], 327.5);
        assert_eq!(line["durin_rss_mib"], 327.5);
        assert_eq!(line["durin_rss_after_mib"], 40.0);
        assert_eq!(line["settle_s"], 5);
    }
}
