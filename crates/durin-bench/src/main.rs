//! `durin-bench`: the "order3" benchmark of DESIGN.md section 6, measured against a release
//! build of Durin, in scenarios that run the same order workflow (three side effects, no
//! delays) in the two ways DESIGN.md section 1 makes durable, with the SDKs of three
//! languages and without any:
//!
//! - **order3** (`--scenario sdk`): the `order` example, written with the Rust SDK, in a
//!   process of its own; its three steps are journaled on the attempt's own exchange
//!   (protocol 6, a streamed attempt).
//! - **order3-python** (`--scenario python-sdk`): `order/process3` of the Python SDK's
//!   example (`sdks/python/examples/order.py`), three `ctx.step`s and no egress call, run by
//!   `python3 -B` in a process of its own.
//! - **order3-typescript** (`--scenario ts-sdk`): `order/order3` of the TypeScript SDK's
//!   example, the same three steps, run by `node` from its build
//!   (`sdks/typescript/dist/examples/order.js`). The bench does not run npm: when that file
//!   is missing it stops before starting anything and says to run
//!   `cd sdks/typescript && npm ci && npm run build`.
//! - **order3-egress** (`--scenario egress`): the same workflow as a plain HTTP handler
//!   without any SDK, served inside this bench process together with the downstream it
//!   calls (see `plain.rs`); its three side effects are outbound HTTP calls that Durin's
//!   egress journals. Durin is started with `--egress-listen 127.0.0.1:0` and an allow-list
//!   holding only the downstream, and the handler is registered with its services declared
//!   inline, as a plain handler in any language would be.
//!
//! The Python and TypeScript examples are started with `--port 0 --durin URL` (the gateway
//! of their context API), their address read from their line `order handler listening on
//! http://127.0.0.1:PORT`, and they are registered as plain handlers with their services
//! declared inline (`{"name": "order", "handlers": [{"name": "order3"}]}`, `process3` in
//! Python); they are called at `POST /v1/call/order/order3` (`.../process3`) with the same
//! order body as the others. Their results are checked by shape (`order bench-1
//! complete charge {id} reservation {id}`), since they make up their own ids; the Rust
//! example's and the plain handler's exactly. The SDKs are found under `--sdks-dir`
//! (default: the `sdks` directory of the repository this bench was built from), the
//! interpreters as `--python` (default `python3`) and `--node` (default `node`).
//!
//! `--scenario sdks` runs order3, order3-python, order3-typescript and order3-egress one
//! after the other, to compare the SDKs with each other and with the plain egress path in
//! one run.
//!
//! Another scenario, **waiting** (`--scenario waiting`, not part of the default `both`),
//! measures what N workflows sleeping on timers at once cost: for each N of
//! `--waiting-counts` (default `10000,100000`), on a fresh database, durin and `order`
//! process, it starts N runs of the order example's approval workflow (`approval/run`)
//! from `--waiting-concurrency` callers (default 32), reads durin's RSS idle and with all
//! N suspended and the database size, kills durin with SIGKILL while they sleep, restarts
//! it on the same database, and reads the time to its ready line, the time from the kill
//! to the first attempt after the restart, how late the timers fired when all fell due
//! together (p50, p99, max), how long until all N completed, and the RSS after the restart.
//! The timers are planned to fall due together 5 s after the kill; see `waiting.rs` for
//! how, and for what each figure is. It is the counterpart of
//! `shared/bench/restate/waiting.sh`: its output on stdout is a table (one row per N), the
//! RSS target (under 200 MB with N sleeping, within a few MB from 10,000 to 100,000) next
//! to Restate's figures, and one JSON line per N with `"scenario": "waiting"` and that
//! script's field names where they exist (`sleeping`, `accepted`, `rss_idle_mib`,
//! `rss_sleeping_mib`, `rss_after_restart_mib`). When an N fails, the figures of the Ns
//! before it are still printed. One N takes about 1.5 times the time to start its runs,
//! plus 10 s, plus the time to fire them all.
//!
//! By default (`--scenario both`) order3 and order3-egress run, SDK first. Each scenario
//! starts its own `durin serve` on a fresh SQLite file in a shared scratch directory, on
//! port 0 (the ports are read from the "listening on" lines) and registers its handler.
//! Every order3 scenario then sends one checked request, warms up (200 requests at c=16 by
//! default, not reported), and, for each concurrency level C, sends N requests to
//! `POST /v1/call/{service}/{handler}` from C concurrent callers on keep-alive connections
//! (a closed loop, like `oha -n N -c C` in `shared/bench/restate/bench.sh`, whose figures
//! for Restate are the reference). At c=1 at most 500 requests are sent, to keep the run
//! short. The processes of a scenario are stopped before the next one starts, so they do
//! not compete for the cores. When a scenario fails, the figures of those before it are
//! still printed, and the bench then exits with the error.
//!
//! Output of the order3 scenarios, all on stdout: per scenario a human-readable table and
//! the DESIGN.md targets next to the measured figures; then, when more than one ran, one
//! side-by-side line per level (throughput, p50, p99, Durin's and the handler's CPU per
//! invocation, errors: each scenario's figure in the order they ran, separated by `vs`,
//! then the ratios of the others' to the first's); then one JSON object per scenario and
//! level, each on a line of its own starting with `{` (select them with `grep '^{'`). The
//! JSON fields are those of `bench.sh` (`system`, `scenario` = `order3`, `order3-python`,
//! `order3-typescript` or `order3-egress`, `n`, `concurrency`, `throughput_per_s`,
//! `p50_ms`, `p95_ms`, `p99_ms`, `max_ms`, `errors`, `mean_ms`, `duration_s`) plus CPU,
//! memory and load figures. Progress goes to stderr.
//!
//! CPU per invocation is the user+system time of a process during a level (from
//! `/proc/PID/stat`) divided by the successful requests of that level; it is reported for
//! Durin (including its egress), the handler (the `order` process, or the python3 or node
//! process of an SDK example, all its threads), and this load generator, which all share the
//! machine's cores. In order3-egress the handler and the downstream share this process with
//! the load generator, so the handler column there is this whole process, and the load
//! generator has no column of its own.
//!
//! order3 runs on SQLite by default. With `--store postgres --database-url URL` it runs on
//! that PostgreSQL database instead, with `--nodes N` Durin nodes sharing it (default 1):
//! each node is its own `durin serve` on its own ports with its own `--node-id`
//! (`bench-node-1`, ...), started one after the other; the order deployment is registered
//! once, on the first node's admin listener; the checked request goes to every node; and
//! the callers (of the warm-up too) are spread round-robin over the nodes' main listeners,
//! caller i to node i mod N, so that at c=1 every request goes to the first node. Durin's
//! CPU and RSS are then the sums over all nodes, and one more figure is reported per level:
//! the CPU of every PostgreSQL process on this machine (`postgres`, its backends included,
//! whatever their database) per invocation. The bench neither creates nor empties the
//! database: drop and recreate it before each run, so that runs start equal. Only order3
//! (`--scenario sdk`) runs on PostgreSQL. The output on SQLite is as it always was.
//!
//! **Past saturation** (`--overload`): shorthand for the concurrency levels `64,2000,5000`
//! (unless `--concurrency` is given) with 30,000 requests per level (unless `--requests` is
//! given; a level needs more requests than callers, or the callers are cut to the request
//! count). It shows what Durin does beyond the callers it can serve: how throughput
//! (successful calls per second) and latency (p50, p99, max) hold up, which calls it
//! refuses (admission control answers 503 with a `Retry-After` header: such an answer's
//! latency is counted, but it is no success), and what the load does to its memory. For
//! these reasons, every level of every order3 scenario, with `--overload` or not,
//! reports:
//!
//! - the answers other than 200 per status (`errors_by_status` in the JSON line, e.g.
//!   `{"503": 1200}`, in the table's `errors` cell as `503:1200`), `refused_503`, and
//!   `refused_with_retry_after` (the 503s with a `Retry-After` header); transport errors
//!   (no answer: a connection refused or reset, a timeout) stay `errors_transport`;
//! - Durin's RSS (summed over its nodes) just before the level (`durin_rss_before_mib`),
//!   its peak during the level, sampled every 100 ms (`durin_rss_peak_mib`), just after it
//!   (`durin_rss_mib`, as always), and after a settle time of `--settle-secs` (default 5,
//!   0 reads at once) without load (`durin_rss_after_mib`). The CPU figures of a level end
//!   with its last answer, before the settle time. Each level's callers have connections of
//!   their own, closed when the level ends, so that the RSS after the settle time is not
//!   what their idle connections hold.
//!
//! Each caller holds a connection of its own, in this process and in Durin (which inherits
//! this process's limits), so before the levels run the bench checks that the soft limit
//! on open files (`ulimit -n`) is at least the largest level plus 100, and stops with an
//! error otherwise.
//!
//! All children are killed when the benchmark ends, fails or is interrupted with Ctrl-C
//! or SIGTERM, and the scratch directory (databases and the children's logs) is removed
//! unless `--keep-dir` is given.
//!
//! ```text
//! cargo build --release -p durin -p order-example -p durin-bench && target/release/durin-bench
//! (cd sdks/typescript && npm ci && npm run build)   # for ts-sdk and sdks
//! target/release/durin-bench --scenario sdks --concurrency 1,64 --requests 3000
//! target/release/durin-bench --scenario waiting [--waiting-counts 10000,100000] [--waiting-concurrency 32]
//! target/release/durin-bench --scenario sdk --store postgres \
//!     --database-url postgres://postgres@127.0.0.1:5432/durin_bench --nodes 3
//! target/release/durin-bench --scenario sdk --overload [--settle-secs 5]
//! ```

mod callers;
mod load;
mod plain;
mod procs;
mod report;
mod waiting;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};

use crate::load::Expected;
use crate::procs::{ScratchDir, Service};
use crate::report::{Level, Machine, Restate, ScenarioReport};

/// At c=1 requests are sequential, so the request count is capped to keep the run short;
/// 500 samples are plenty for a p99.
const MAX_REQUESTS_AT_C1: usize = 500;

/// Requests per level unless `--requests` or `--overload` says otherwise.
const DEFAULT_REQUESTS: usize = 2000;

/// Requests per level with `--overload`, unless `--requests` is given: more than the
/// largest overload level, so that every caller gets requests to send.
const OVERLOAD_REQUESTS: usize = 30_000;

/// Concurrency levels unless `--concurrency` or `--overload` says otherwise.
const DEFAULT_LEVELS: [usize; 3] = [1, 64, 256];

/// Concurrency levels with `--overload`, unless `--concurrency` is given: one level Durin
/// serves, and two well past saturation.
const OVERLOAD_LEVELS: [usize; 3] = [64, 2000, 5000];

/// Open files needed beyond one per caller: the listeners, the database, the logs, the
/// connections to the handler.
const FD_HEADROOM: u64 = 100;

/// How often Durin's RSS is sampled during a level, for its peak.
const RSS_SAMPLE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// Concurrency of the warm-up, as in the Restate anchor's `run.sh`.
const WARMUP_CONCURRENCY: usize = 16;

/// The ready line of Durin's API listener.
const DURIN_READY: &str = "durin listening on ";

/// The ready line of Durin's egress, printed before the API's when `--egress-listen` is set.
const EGRESS_READY: &str = "durin egress listening on ";

/// The ready line of Durin's admin listener, where deployments are registered.
const ADMIN_READY: &str = "durin admin listening on ";

/// The admin URL of a Durin started by [`start_durin`] (its last ready line).
fn admin_url(durin: &Service) -> &str {
    durin.urls.last().map_or("", String::as_str)
}

/// The service name under which the plain handler is declared.
const PLAIN_SERVICE: &str = "order_plain";

/// The ready line of the SDK examples in other languages.
const EXAMPLE_READY: &str = "order handler listening on ";

/// The service of order3 in the SDK examples in other languages (its handler is
/// [`Example::handler`]).
const EXAMPLE_SERVICE: &str = "order";

/// Which scenarios to run.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenarios {
    /// order3: the Rust SDK example in its own process.
    Sdk,
    /// order3-egress: a plain handler without an SDK, calling out through the egress.
    Egress,
    /// order3 and order3-egress, SDK first (not `waiting`).
    Both,
    /// order3-python: the Python SDK example's `order/process3`, run by python3.
    PythonSdk,
    /// order3-typescript: the TypeScript SDK example's `order/order3`, run by node (build it
    /// first: `cd sdks/typescript && npm ci && npm run build`).
    TsSdk,
    /// order3 with each SDK and through the egress, one after the other: sdk, python-sdk,
    /// ts-sdk, egress.
    Sdks,
    /// waiting: N workflows sleeping on timers at once, kill -9 and restart of durin.
    Waiting,
    /// callers: N callers long-polling sleeping workflows at once: Durin's CPU meanwhile.
    Callers,
}

/// Where Durin keeps its state.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Store {
    /// A fresh SQLite file per scenario, in the scratch directory.
    Sqlite,
    /// The PostgreSQL database of `--database-url` (order3 only).
    Postgres,
    /// order3 on a fresh SQLite file, then on the PostgreSQL database of `--database-url`,
    /// in one run: DESIGN.md's target for PostgreSQL is a share of SQLite's throughput.
    Both,
}

#[derive(Parser)]
#[command(
    name = "durin-bench",
    about = "Runs the order3 benchmark against release builds of durin and the order example: with the Rust, Python and TypeScript SDKs, and through the egress"
)]
struct Args {
    /// Directory holding the `durin` and `order` binaries [default: the directory of this
    /// executable, i.e. target/release]
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Which scenarios to run.
    #[arg(long, value_enum, default_value_t = Scenarios::Both)]
    scenario: Scenarios,
    /// Requests per concurrency level (at c=1 at most 500) [default: 2000; 30000 with
    /// --overload]
    #[arg(long)]
    requests: Option<usize>,
    /// Concurrency levels, comma-separated [default: 1,64,256; 64,2000,5000 with --overload]
    #[arg(long, value_delimiter = ',')]
    concurrency: Option<Vec<usize>>,
    /// Past saturation: the levels 64,2000,5000 with 30000 requests each, unless
    /// --concurrency or --requests is given.
    #[arg(long)]
    overload: bool,
    /// Seconds to wait after each level before reading Durin's RSS again (0: at once).
    #[arg(long, default_value_t = 5)]
    settle_secs: u64,
    /// Warm-up requests (sent at c=16, not reported); 0 skips the warm-up.
    #[arg(long, default_value_t = 200)]
    warmup: usize,
    /// waiting: the numbers of sleeping workflows, comma-separated; each is measured on a
    /// fresh database, durin and order.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    waiting_counts: Vec<usize>,
    /// waiting: concurrent callers starting the workflows.
    #[arg(long, default_value_t = 32)]
    waiting_concurrency: usize,
    /// waiting: after the restart, wait for this many runs to complete instead of all (0:
    /// all), so that a large N does not wait for every timer to fire; the lateness figures
    /// are then over the runs that fired.
    #[arg(long, default_value_t = 0)]
    waiting_fired: usize,
    /// waiting: plan the starts to take this many seconds instead of 1.5 times the
    /// calibrated time per run (the kill comes then, or once all are suspended if later,
    /// and the timers 5 s after it); for a large N whose rate is known.
    #[arg(long)]
    waiting_plan_secs: Option<u64>,
    /// callers: how many callers wait at once.
    #[arg(long, default_value_t = 3000)]
    callers: usize,
    /// Where Durin keeps its state; postgres and both need --database-url and run order3
    /// only (`--scenario sdk`).
    #[arg(long, value_enum, default_value_t = Store::Sqlite)]
    store: Store,
    /// The PostgreSQL database of `--store postgres` or `both`, e.g.
    /// `postgres://postgres@127.0.0.1:5432/durin_bench`. The bench does not empty it: drop and
    /// recreate it before each run.
    #[arg(long)]
    database_url: Option<String>,
    /// Durin nodes sharing the database (more than one only with `--store postgres`); the
    /// callers are spread round-robin over them.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Keep the scratch directory (SQLite databases and the children's logs).
    #[arg(long)]
    keep_dir: bool,
    /// Hold the targets against Restate's figures in FILE, the JSON lines printed by
    /// the Restate anchor's `run.sh` in the same hour (levels 1, 64 and 256), instead of
    /// DESIGN.md's, which were measured when the machine was quiet [default: DESIGN.md's]
    #[arg(long, value_name = "FILE")]
    restate: Option<PathBuf>,
    /// The directory of the SDKs in other languages (python-sdk, ts-sdk, sdks) [default: the
    /// `sdks` directory of the repository this bench was built from]
    #[arg(long)]
    sdks_dir: Option<PathBuf>,
    /// The Python interpreter of python-sdk.
    #[arg(long, default_value = "python3")]
    python: PathBuf,
    /// The Node.js of ts-sdk.
    #[arg(long, default_value = "node")]
    node: PathBuf,
}

/// One way of running order3, each a scenario of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Order3 {
    /// order3: the Rust SDK example `order`, on a fresh SQLite file.
    Rust,
    /// order3 on the PostgreSQL database of `--database-url`, `--nodes` Durin nodes.
    RustOnPostgres,
    /// order3-python or order3-typescript: an SDK example in another language.
    Example(Example),
    /// order3-egress: the plain handler in this process, through the egress.
    Egress,
}

impl Order3 {
    /// The scenario's name in the report and the JSON lines.
    fn name(self) -> &'static str {
        match self {
            Order3::Rust | Order3::RustOnPostgres => "order3",
            Order3::Example(example) => example.scenario(),
            Order3::Egress => report::EGRESS_SCENARIO,
        }
    }
}

impl Args {
    /// The order3 scenarios to run, in their order: those of `--scenario` on SQLite; on
    /// PostgreSQL, order3 (`run` has checked that `--scenario` is `sdk`).
    fn order3(&self) -> &'static [Order3] {
        match self.store {
            Store::Sqlite => self.scenario.order3(),
            Store::Postgres => &[Order3::RustOnPostgres],
            Store::Both => &[Order3::Rust, Order3::RustOnPostgres],
        }
    }
}

impl Scenarios {
    /// The order3 scenarios to run, in their order; none for `waiting` and `callers`.
    fn order3(self) -> &'static [Order3] {
        const PYTHON: Order3 = Order3::Example(Example::Python);
        const TYPESCRIPT: Order3 = Order3::Example(Example::TypeScript);
        match self {
            Scenarios::Sdk => &[Order3::Rust],
            Scenarios::Egress => &[Order3::Egress],
            Scenarios::Both => &[Order3::Rust, Order3::Egress],
            Scenarios::PythonSdk => &[PYTHON],
            Scenarios::TsSdk => &[TYPESCRIPT],
            Scenarios::Sdks => &[Order3::Rust, PYTHON, TYPESCRIPT, Order3::Egress],
            Scenarios::Waiting | Scenarios::Callers => &[],
        }
    }
}

/// The order example of an SDK in another language than Rust. Each serves order3 (three
/// `ctx.step`s, no egress call) as a plain handler, `order/process3` in Python and
/// `order/order3` in TypeScript, prints `order handler listening
/// on http://127.0.0.1:PORT` once it listens, and takes `--port` (0: any free one) and
/// `--durin` (the gateway, for its context API).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Example {
    /// `sdks/python/examples/order.py`, run by `python3 -B` (no bytecode written into the
    /// repository).
    Python,
    /// `sdks/typescript/dist/examples/order.js`, the build of `examples/order.ts`, run by
    /// `node`.
    TypeScript,
}

impl Example {
    /// The scenario's name in the report and the JSON lines.
    fn scenario(self) -> &'static str {
        match self {
            Example::Python => "order3-python",
            Example::TypeScript => "order3-typescript",
        }
    }

    /// The handler of order3 in the example's service `order`: the Python example calls it
    /// `process3` (next to its `process`), the TypeScript one `order3`.
    fn handler(self) -> &'static str {
        match self {
            Example::Python => "process3",
            Example::TypeScript => "order3",
        }
    }

    /// The path under Durin that calls order3.
    fn call_path(self) -> &'static str {
        match self {
            Example::Python => "/v1/call/order/process3",
            Example::TypeScript => "/v1/call/order/order3",
        }
    }

    /// The name of the child process, and of its log in the scratch directory.
    fn process_name(self) -> &'static str {
        match self {
            Example::Python => "order-python",
            Example::TypeScript => "order-typescript",
        }
    }

    /// The interpreter that runs the example.
    fn interpreter(self, args: &Args) -> PathBuf {
        match self {
            Example::Python => args.python.clone(),
            Example::TypeScript => args.node.clone(),
        }
    }

    /// The example's script under the `sdks` directory.
    fn script(self, sdks: &Path) -> PathBuf {
        match self {
            Example::Python => sdks.join("python/examples/order.py"),
            Example::TypeScript => sdks.join("typescript/dist/examples/order.js"),
        }
    }

    /// The arguments of the interpreter: the script, then the flags.
    fn arguments(self, sdks: &Path, durin: &str) -> Vec<String> {
        let script = self.script(sdks).display().to_string();
        let mut arguments = match self {
            Example::Python => vec!["-B".to_owned(), script],
            Example::TypeScript => vec![script],
        };
        arguments.extend(["--port", "0", "--durin", durin].map(str::to_owned));
        arguments
    }

    /// Fails unless the example can be run: the TypeScript one must have been built (the
    /// bench does not run npm), the Python one must be there.
    fn check(self, sdks: &Path) -> Result<()> {
        let script = self.script(sdks);
        if script.is_file() {
            return Ok(());
        }
        match self {
            Example::TypeScript => bail!(
                "{} is missing: the TypeScript SDK is not built; build it with `cd {} && npm ci && npm run build`, then run the bench again",
                script.display(),
                sdks.join("typescript").display()
            ),
            Example::Python => bail!(
                "{} is missing: give the sdks directory of the repository with --sdks-dir",
                script.display()
            ),
        }
    }
}

impl Args {
    /// The `sdks` directory of the SDKs in other languages: `--sdks-dir`, or that of the
    /// repository this bench was built from.
    fn sdks_dir(&self) -> PathBuf {
        self.sdks_dir.clone().unwrap_or_else(|| {
            // This crate is crates/durin-bench of the repository.
            let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
            crate_dir
                .ancestors()
                .nth(2)
                .unwrap_or(crate_dir)
                .join("sdks")
        })
    }

    /// The concurrency levels: `--concurrency`, or those of `--overload`, or the default.
    fn levels(&self) -> &[usize] {
        match &self.concurrency {
            Some(levels) => levels,
            None if self.overload => &OVERLOAD_LEVELS,
            None => &DEFAULT_LEVELS,
        }
    }

    /// The requests per level: `--requests`, or those of `--overload`, or the default.
    fn requests(&self) -> usize {
        match self.requests {
            Some(requests) => requests,
            None if self.overload => OVERLOAD_REQUESTS,
            None => DEFAULT_REQUESTS,
        }
    }
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
    if args.waiting_counts.is_empty() || args.waiting_counts.contains(&0) {
        bail!("--waiting-counts needs one or more counts, each at least 1");
    }
    if args.waiting_concurrency == 0 {
        bail!("--waiting-concurrency must be at least 1");
    }
    if args.requests() == 0 {
        bail!("--requests must be at least 1");
    }
    if args.levels().is_empty() || args.levels().contains(&0) {
        bail!("--concurrency needs one or more levels, each at least 1");
    }
    if args.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    match args.store {
        Store::Sqlite if args.nodes > 1 => {
            bail!("--nodes above 1 needs --store postgres: nodes cannot share a SQLite file")
        }
        Store::Sqlite if args.database_url.is_some() => {
            bail!("--database-url is for --store postgres")
        }
        Store::Sqlite => {}
        Store::Postgres | Store::Both => {
            if args.scenario != Scenarios::Sdk {
                bail!("--store postgres and both run order3 only: give --scenario sdk");
            }
            match &args.database_url {
                Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                }
                Some(url) => bail!("--database-url {url:?} is not a postgres:// URL"),
                None => bail!("--store postgres and both need --database-url postgres://..."),
            }
        }
    }
    let bin_dir = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()
            .context("cannot find the path of this executable; pass --bin-dir")?
            .parent()
            .context("this executable has no parent directory; pass --bin-dir")?
            .to_path_buf(),
    };
    let order3 = args.order3();
    if !order3.is_empty() {
        let largest = args.levels().iter().copied().max().unwrap_or(1);
        check_open_files(largest, procs::open_files_limits()?)?;
        warn_of_clamped_levels(args.levels(), args.requests());
    }
    // Before anything starts, so that a missing build does not end the run halfway.
    for run in order3 {
        if let Order3::Example(example) = run {
            example.check(&args.sdks_dir())?;
        }
    }
    // Read first, so that a bad file does not end the run after its scenarios.
    if args.restate.is_some() && order3.is_empty() {
        bail!("--restate is for the order3 scenarios (sdk, egress, both, the SDKs')");
    }
    let restate = match &args.restate {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read --restate {}", path.display()))?;
            Restate::from_run(&path.display().to_string(), &text).map_err(anyhow::Error::msg)?
        }
        None => Restate::design(),
    };
    let machine = Machine::now();

    // Declared before every child and server so that it is dropped after them, also on an
    // early return: the children are killed before their directory is removed.
    let dir = ScratchDir::create(args.keep_dir)?;
    eprintln!("durin-bench: scratch directory {}", dir.path.display());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;

    let setup = Setup {
        args,
        runtime: &runtime,
        bin_dir: &bin_dir,
        dir: &dir.path,
        ticks_per_sec: machine.ticks_per_sec,
    };
    if args.scenario == Scenarios::Waiting {
        return run_waiting(&setup, machine);
    }
    if args.scenario == Scenarios::Callers {
        let report = runtime.block_on(interruptible(callers::measure(&setup, args.callers)))?;
        callers::print(&report);
        return Ok(());
    }
    // One scenario after the other, each stopping its processes before the next starts.
    // When one fails, the figures of those before it are still printed.
    let mut scenarios = Vec::new();
    let mut failure = None;
    for &run in order3 {
        let report = match run {
            Order3::Rust => sdk_scenario(&setup, false),
            Order3::RustOnPostgres => sdk_scenario(&setup, true),
            Order3::Example(example) => example_scenario(&setup, example),
            Order3::Egress => egress_scenario(&setup),
        };
        match report {
            Ok(report) => scenarios.push(report),
            Err(e) => {
                failure = Some(e.context(format!("scenario {}", run.name())));
                break;
            }
        }
    }
    if !scenarios.is_empty() {
        report::print(&machine.finish(), &scenarios, &restate);
    }
    failure.map_or(Ok(()), Err)
}

/// Fails unless the soft limit on open files (`soft`, `hard` from
/// [`procs::open_files_limits`]) leaves one per caller of the largest level and
/// [`FD_HEADROOM`] more, so that a large level does not fail midway with transport errors.
fn check_open_files(largest: usize, (soft, hard): (u64, u64)) -> Result<()> {
    let needed = u64::try_from(largest)
        .unwrap_or(u64::MAX)
        .saturating_add(FD_HEADROOM);
    if soft >= needed {
        return Ok(());
    }
    let raise = if hard >= needed {
        format!("raise it with `ulimit -n {needed}` (the hard limit is {hard})")
    } else {
        format!("the hard limit is {hard} too: raise both (as root, `ulimit -Hn {needed}`) or give lower levels")
    };
    bail!(
        "the open-file limit (ulimit -n) is {soft}, below the {needed} that {largest} callers need (a connection each, here and in durin, which inherits the limit, plus {FD_HEADROOM}): {raise}"
    )
}

/// Says on stderr which levels above one caller have fewer requests than callers, and so
/// run with as many callers as requests (see [`load::run`]).
fn warn_of_clamped_levels(levels: &[usize], requests: usize) {
    for &concurrency in levels.iter().filter(|&&c| c > 1 && c > requests) {
        eprintln!(
            "durin-bench: c={concurrency} has only {requests} requests: it runs with {requests} callers (give --requests above {concurrency})"
        );
    }
}

/// The waiting scenario, once per count. When a count fails, the figures of the counts
/// measured before it are still printed.
fn run_waiting(setup: &Setup<'_>, machine: Machine) -> Result<()> {
    let mut reports = Vec::new();
    let mut failure = None;
    for &sleeping in &setup.args.waiting_counts {
        match setup
            .runtime
            .block_on(interruptible(waiting::measure(setup, sleeping)))
        {
            Ok(report) => reports.push(report),
            Err(e) => {
                failure = Some(e.context(format!("waiting with {sleeping} workflows")));
                break;
            }
        }
    }
    if !reports.is_empty() {
        waiting::print(&machine.finish(), &reports);
    }
    failure.map_or(Ok(()), Err)
}

/// What every scenario needs.
struct Setup<'a> {
    args: &'a Args,
    runtime: &'a tokio::runtime::Runtime,
    bin_dir: &'a Path,
    /// The scratch directory, for the databases and the children's logs.
    dir: &'a Path,
    ticks_per_sec: u64,
}

/// Starts Durin on a fresh database named after `scenario`, with `extra` arguments to
/// `durin serve`; when they include `--egress-listen`, it also waits for the egress.
fn start_durin(setup: &Setup<'_>, scenario: &str, extra: &[&str]) -> Result<Service> {
    let db = setup.dir.join(format!("durin-{scenario}.db"));
    start_durin_on(setup, &db, &format!("durin-{scenario}.log"), extra)
}

/// Starts Durin on the SQLite file `db`, logging to `log` in the scratch directory, with
/// `extra` arguments to `durin serve` (see [`start_durin`]).
fn start_durin_on(setup: &Setup<'_>, db: &Path, log: &str, extra: &[&str]) -> Result<Service> {
    start_durin_at(setup, &format!("sqlite:{}", db.display()), log, extra)
}

/// Starts Durin on the database URL `database` (see [`start_durin_on`]).
fn start_durin_at(setup: &Setup<'_>, database: &str, log: &str, extra: &[&str]) -> Result<Service> {
    let mut args = vec![
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--database",
        database,
    ];
    args.extend_from_slice(extra);
    let ready: &[&'static str] = if extra.contains(&"--egress-listen") {
        &[DURIN_READY, EGRESS_READY, ADMIN_READY]
    } else {
        &[DURIN_READY, ADMIN_READY]
    };
    Service::start(
        "durin",
        &setup.bin_dir.join("durin"),
        &args,
        setup.dir.join(log),
        ready,
    )
}

/// The Durin nodes of order3: one on a fresh SQLite file, or `--nodes` on the PostgreSQL
/// database, started one after the other (the first applies the migrations).
fn start_sdk_nodes(setup: &Setup<'_>, postgres: bool) -> Result<Vec<Service>> {
    let args = setup.args;
    match (postgres, &args.database_url) {
        (true, Some(url)) => (1..=args.nodes)
            .map(|i| {
                let node_id = format!("bench-node-{i}");
                start_durin_at(
                    setup,
                    url,
                    &format!("durin-sdk-node-{i}.log"),
                    &["--node-id", &node_id],
                )
            })
            .collect(),
        _ => Ok(vec![start_durin(setup, "sdk", &[])?]),
    }
}

/// order3: Durin (one node on SQLite, or `--nodes` on PostgreSQL) and the SDK example, each
/// in its own process.
fn sdk_scenario(setup: &Setup<'_>, postgres: bool) -> Result<ScenarioReport> {
    let args = setup.args;
    let postgres_nodes = postgres.then_some(args.nodes);
    match postgres_nodes {
        None => eprintln!("durin-bench: scenario order3 (SDK)"),
        Some(n) => eprintln!("durin-bench: scenario order3 (SDK) on PostgreSQL, {n} node(s)"),
    }
    let nodes = start_sdk_nodes(setup, postgres)?;
    let durin = nodes.first().context("no durin node")?;
    let order = Service::start(
        "order",
        &setup.bin_dir.join("order"),
        &["--listen", "127.0.0.1:0"],
        setup.dir.join("order.log"),
        &["order service listening on "],
    )?;
    let target = Target {
        durin_urls: nodes.iter().map(|n| n.url().to_owned()).collect(),
        admin_url: admin_url(durin),
        durin_pids: nodes.iter().map(Service::pid).collect(),
        handler_pid: Some(order.pid()),
        registration: serde_json::json!({ "url": order.url() }),
        call_path: "/v1/call/order/process",
        postgres: postgres_nodes.is_some(),
        database_url: args
            .database_url
            .as_deref()
            .filter(|_| postgres_nodes.is_some()),
        expected: Expected::Exact,
    };
    let levels = setup
        .runtime
        .block_on(interruptible(measure(setup, &target)))?;
    let mut description =
        "the SDK example `order` in its own process, three steps journaled on the attempt's stream (protocol 6)"
            .to_owned();
    if let Some(n) = postgres_nodes {
        description.push_str(&format!(
            "; on PostgreSQL, {n} durin node(s) on one database, callers round-robin over them"
        ));
    }
    // `nodes` and `order` are dropped here, which stops them before the next scenario.
    Ok(ScenarioReport {
        scenario: "order3",
        description,
        handler_in_process: false,
        postgres_nodes,
        levels,
    })
}

/// order3-python and order3-typescript: Durin, and an SDK example in another language in a
/// process of its own, registered as a plain handler with its services declared inline.
fn example_scenario(setup: &Setup<'_>, example: Example) -> Result<ScenarioReport> {
    let scenario = example.scenario();
    eprintln!("durin-bench: scenario {scenario}");
    let durin = start_durin(setup, scenario, &[])?;
    let sdks = setup.args.sdks_dir();
    let arguments = example.arguments(&sdks, durin.url());
    let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
    let name = example.process_name();
    let handler = Service::start(
        name,
        &example.interpreter(setup.args),
        &arguments,
        setup.dir.join(format!("{name}.log")),
        &[EXAMPLE_READY],
    )?;
    let target = Target {
        durin_urls: vec![durin.url().to_owned()],
        admin_url: admin_url(&durin),
        durin_pids: vec![durin.pid()],
        handler_pid: Some(handler.pid()),
        registration: serde_json::json!({
            "url": handler.url(),
            "services": [{
                "name": EXAMPLE_SERVICE,
                "handlers": [{ "name": example.handler() }],
            }],
        }),
        call_path: example.call_path(),
        postgres: false,
        database_url: None,
        // The examples make up their own charge and reservation ids.
        expected: Expected::Shape,
    };
    let levels = setup
        .runtime
        .block_on(interruptible(measure(setup, &target)))?;
    let (language, interpreter) = match example {
        Example::Python => ("Python", "python3"),
        Example::TypeScript => ("TypeScript", "node"),
    };
    // `durin` and `handler` are dropped here, which stops them before the next scenario.
    Ok(ScenarioReport {
        scenario,
        description: format!(
            "the {language} SDK example ({}) in its own {interpreter} process, `{EXAMPLE_SERVICE}/{}`: three steps journaled through the context API, registered as a plain handler",
            example.script(Path::new("sdks")).display(),
            example.handler()
        ),
        handler_in_process: false,
        postgres_nodes: None,
        levels,
    })
}

/// order3-egress: Durin with its egress, and the plain handler and its downstream inside
/// this process.
fn egress_scenario(setup: &Setup<'_>) -> Result<ScenarioReport> {
    eprintln!("durin-bench: scenario order3-egress (plain handler through the egress)");
    // The downstream is started first so that the egress can be limited to it.
    let downstream = setup.runtime.block_on(plain::downstream())?;
    let allow = downstream.addr.to_string();
    let durin = start_durin(
        setup,
        "egress",
        &["--egress-listen", "127.0.0.1:0", "--egress-allow", &allow],
    )?;
    let egress_url = durin
        .urls
        .get(1)
        .context("durin printed no egress address")?;
    let handler = setup
        .runtime
        .block_on(plain::handler(egress_url, downstream.addr))?;
    let target = Target {
        durin_urls: vec![durin.url().to_owned()],
        admin_url: admin_url(&durin),
        durin_pids: vec![durin.pid()],
        handler_pid: None,
        registration: serde_json::json!({
            "url": format!("http://{}", handler.addr),
            "services": [{
                "name": PLAIN_SERVICE,
                "handlers": [{ "name": "process", "path": plain::HANDLER_PATH }],
            }],
        }),
        call_path: "/v1/call/order_plain/process",
        postgres: false,
        database_url: None,
        expected: Expected::Exact,
    };
    let levels = setup
        .runtime
        .block_on(interruptible(measure(setup, &target)))?;
    Ok(ScenarioReport {
        scenario: report::EGRESS_SCENARIO,
        description: format!(
            "a plain handler without an SDK ({PLAIN_SERVICE}), three side effects as HTTP calls through the egress; handler and downstream run inside this bench process"
        ),
        handler_in_process: true,
        postgres_nodes: None,
        levels,
    })
}

/// Runs `future` unless Ctrl-C (or, on Unix, SIGTERM) comes first. Interrupting drops the
/// run, and the guards of the children are dropped on the way out, which kills them instead
/// of leaving them behind.
async fn interruptible<T>(future: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::select! {
        result = future => result,
        () = interrupted() => bail!("interrupted"),
    }
}

/// Waits for Ctrl-C, or on Unix for SIGTERM too (`kill`, `timeout`).
async fn interrupted() {
    #[cfg(unix)]
    if let Ok(mut terminate) =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        return;
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// What one scenario measures.
struct Target<'a> {
    /// The main listener of every Durin node; the callers are spread round-robin over them.
    durin_urls: Vec<String>,
    /// Where the handler is registered (the first node's admin listener).
    admin_url: &'a str,
    /// Every Durin node's process, whose CPU times are summed.
    durin_pids: Vec<u32>,
    /// The handler's own process; `None` when it runs inside this one.
    handler_pid: Option<u32>,
    /// The body of `POST /v1/deployments` that registers the handler.
    registration: serde_json::Value,
    /// The path under Durin that starts one order.
    call_path: &'static str,
    /// Whether the PostgreSQL server's CPU is read too.
    postgres: bool,
    /// The PostgreSQL database, whose statements are counted when it has
    /// `pg_stat_statements`.
    database_url: Option<&'a str>,
    /// How the result of a call is checked.
    expected: Expected,
}

/// Registers the handler, checks one call, warms up, and measures every level.
async fn measure(setup: &Setup<'_>, target: &Target<'_>) -> Result<Vec<Level>> {
    let (args, ticks_per_sec) = (setup.args, setup.ticks_per_sec);
    let max_concurrency = args.levels().iter().copied().max().unwrap_or(1);
    let client = load::client(max_concurrency.max(WARMUP_CONCURRENCY))?;
    register(&client, target.admin_url, &target.registration).await?;

    let urls: Vec<String> = target
        .durin_urls
        .iter()
        .map(|durin| format!("{durin}{}", target.call_path))
        .collect();
    // Every node gets a checked request: the deployment registered on the first one must
    // be known to all.
    for url in &urls {
        load::smoke(&client, url, target.expected).await?;
    }
    if args.warmup > 0 {
        eprintln!(
            "durin-bench: warm-up, {} requests at c={WARMUP_CONCURRENCY}",
            args.warmup
        );
        let warmup = load::run(
            &client,
            &urls,
            args.warmup,
            WARMUP_CONCURRENCY,
            target.expected,
        )
        .await?;
        if let Some(e) = &warmup.first_error {
            eprintln!(
                "durin-bench: warm-up had {} errors, the first: {e}",
                warmup.errors()
            );
        }
    }

    let mut levels = Vec::new();
    let settle = std::time::Duration::from_secs(args.settle_secs);
    for &concurrency in args.levels() {
        let requests = if concurrency == 1 {
            args.requests().min(MAX_REQUESTS_AT_C1)
        } else {
            args.requests()
        };
        eprintln!("durin-bench: c={concurrency}, {requests} requests");
        let load_before = procs::loadavg1();
        let rss_before = procs::rss_sum_mib(&target.durin_pids);
        let rss_peak = procs::RssPeak::start(target.durin_pids.clone(), RSS_SAMPLE_INTERVAL);
        let cpu_before = cpu_snapshot(target)?;
        let postgres_before = postgres_snapshot(target);
        let statements_before = target.database_url.and_then(procs::postgres_statements);
        // Each level's callers connect anew and leave when it ends, as a burst of callers
        // would: what Durin keeps after the settle time is not their open connections.
        let callers = load::client(concurrency)?;
        let result = load::run(&callers, &urls, requests, concurrency, target.expected).await;
        drop(callers);
        // The CPU figures end with the level's last answer, before the settle time.
        let cpu_after = cpu_snapshot(target)?;
        let postgres_after = postgres_snapshot(target);
        let statements_after = target.database_url.and_then(procs::postgres_statements);
        let rss_end = procs::rss_sum_mib(&target.durin_pids);
        let rss_peak = procs::max_of(rss_peak.stop().await, rss_end);
        let load_after = procs::loadavg1();
        let result = result?;
        if let Some(e) = &result.first_error {
            eprintln!(
                "durin-bench: c={concurrency} had {} errors, the first: {e}",
                result.errors()
            );
        }
        let seconds =
            |i: usize| ticks_to_s(cpu_after[i].saturating_sub(cpu_before[i]), ticks_per_sec);
        let own = seconds(2);
        levels.push(Level {
            concurrency,
            requests,
            durin_cpu_s: seconds(0),
            // An in-process handler has no CPU figure of its own: this whole process is
            // reported in its place, and the load generator gets none.
            handler_cpu_s: if target.handler_pid.is_some() {
                seconds(1)
            } else {
                own
            },
            loadgen_cpu_s: target.handler_pid.is_some().then_some(own),
            postgres_cpu_s: postgres_cpu_s(
                postgres_before.as_ref(),
                postgres_after.as_ref(),
                concurrency,
                ticks_per_sec,
            ),
            postgres_statements: statements_before
                .zip(statements_after)
                .map(|(before, after)| after.saturating_sub(before)),
            durin_rss_mib: rss_end,
            durin_rss_before_mib: rss_before,
            durin_rss_peak_mib: rss_peak,
            durin_rss_after_mib: settled_rss(target, settle, concurrency).await,
            settle_secs: args.settle_secs,
            load_before,
            load_after,
            result,
        });
    }
    Ok(levels)
}

/// Durin's RSS after `settle` without load (at once when it is zero), summed over its nodes.
async fn settled_rss(
    target: &Target<'_>,
    settle: std::time::Duration,
    concurrency: usize,
) -> Option<f64> {
    if !settle.is_zero() {
        eprintln!(
            "durin-bench: c={concurrency} done, settling {}s before reading durin's RSS",
            settle.as_secs()
        );
        tokio::time::sleep(settle).await;
    }
    procs::rss_sum_mib(&target.durin_pids)
}

/// CPU ticks so far of Durin (all its nodes), the handler (this process when it runs inside
/// it), and this process, in that order.
fn cpu_snapshot(target: &Target<'_>) -> Result<[u64; 3]> {
    let own = procs::cpu_ticks(std::process::id())?;
    let handler = match target.handler_pid {
        Some(pid) => procs::cpu_ticks(pid)?,
        None => own,
    };
    let mut durin = 0;
    for &pid in &target.durin_pids {
        durin += procs::cpu_ticks(pid)?;
    }
    Ok([durin, handler, own])
}

/// CPU time so far of the PostgreSQL server, when the target uses it and it runs here.
fn postgres_snapshot(target: &Target<'_>) -> Option<procs::PostgresCpu> {
    target.postgres.then(procs::postgres_cpu).flatten()
}

/// PostgreSQL's CPU seconds between two snapshots of a level; `None` without them, or when
/// a server started or stopped in between (its counts started again), which is said.
fn postgres_cpu_s(
    before: Option<&procs::PostgresCpu>,
    after: Option<&procs::PostgresCpu>,
    concurrency: usize,
    ticks_per_sec: u64,
) -> Option<f64> {
    let (before, after) = before.zip(after)?;
    let ticks = before.ticks_until(after);
    if ticks.is_none() {
        eprintln!(
            "durin-bench: c={concurrency}: a PostgreSQL server started or stopped during the level (postmasters {:?}, then {:?}): no PostgreSQL CPU figure",
            before.postmasters, after.postmasters
        );
    }
    ticks.map(|ticks| ticks_to_s(ticks, ticks_per_sec))
}

fn ticks_to_s(ticks: u64, ticks_per_sec: u64) -> f64 {
    ticks as f64 / ticks_per_sec as f64
}

/// Registers a deployment with Durin: by URL alone (Durin discovers its handlers) or with
/// its services declared inline.
pub(crate) async fn register(
    client: &reqwest::Client,
    durin: &str,
    registration: &serde_json::Value,
) -> Result<()> {
    let response = client
        .post(format!("{durin}/v1/deployments"))
        .json(registration)
        .send()
        .await
        .context("cannot reach durin to register the handler")?;
    let status = response.status();
    if status != reqwest::StatusCode::CREATED && status != reqwest::StatusCode::OK {
        let body = response.text().await.unwrap_or_default();
        bail!("registering {registration} with durin answered {status}: {body}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The arguments of a command line, as clap parses them.
    fn parse(line: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("durin-bench").chain(line.iter().copied())).unwrap()
    }

    #[test]
    fn levels_and_requests_by_default_and_with_overload() {
        let plain = parse(&[]);
        assert_eq!(
            (plain.levels(), plain.requests()),
            (&[1, 64, 256][..], 2000)
        );
        assert_eq!(plain.settle_secs, 5);
        let overload = parse(&["--overload"]);
        assert_eq!(
            (overload.levels(), overload.requests()),
            (&[64, 2000, 5000][..], 30_000)
        );
    }

    #[test]
    fn explicit_levels_and_requests_win_over_overload() {
        let levels = parse(&["--overload", "--concurrency", "64,600"]);
        assert_eq!(
            (levels.levels(), levels.requests()),
            (&[64, 600][..], 30_000)
        );
        let requests = parse(&["--overload", "--requests", "9000", "--settle-secs", "0"]);
        assert_eq!(
            (requests.levels(), requests.requests()),
            (&[64, 2000, 5000][..], 9000)
        );
        assert_eq!(requests.settle_secs, 0);
    }

    #[test]
    fn the_order3_scenarios_of_each_choice() {
        let python = Order3::Example(Example::Python);
        let typescript = Order3::Example(Example::TypeScript);
        let order3 = |scenario: &str| parse(&["--scenario", scenario]).scenario.order3();
        assert_eq!(order3("sdk"), [Order3::Rust]);
        assert_eq!(order3("both"), [Order3::Rust, Order3::Egress]);
        assert_eq!(order3("python-sdk"), [python]);
        assert_eq!(order3("ts-sdk"), [typescript]);
        assert_eq!(
            order3("sdks"),
            [Order3::Rust, python, typescript, Order3::Egress]
        );
        assert!(order3("waiting").is_empty());
        let url = "postgres://postgres@127.0.0.1/bench";
        let on = |store: &str| {
            parse(&["--scenario", "sdk", "--store", store, "--database-url", url]).order3()
        };
        assert_eq!(on("sqlite"), [Order3::Rust]);
        assert_eq!(on("postgres"), [Order3::RustOnPostgres]);
        assert_eq!(on("both"), [Order3::Rust, Order3::RustOnPostgres]);
        let names: Vec<&str> = order3("sdks").iter().map(|r| r.name()).collect();
        assert_eq!(
            names,
            [
                "order3",
                "order3-python",
                "order3-typescript",
                "order3-egress"
            ]
        );
    }

    #[test]
    fn the_examples_are_started_with_port_0_and_the_gateway() {
        let sdks = Path::new("/repo/sdks");
        let durin = "http://127.0.0.1:4000";
        assert_eq!(
            Example::Python.arguments(sdks, durin),
            [
                "-B",
                "/repo/sdks/python/examples/order.py",
                "--port",
                "0",
                "--durin",
                durin
            ]
        );
        assert_eq!(
            Example::TypeScript.arguments(sdks, durin),
            [
                "/repo/sdks/typescript/dist/examples/order.js",
                "--port",
                "0",
                "--durin",
                durin
            ]
        );
        assert_eq!(
            (Example::Python.handler(), Example::Python.call_path()),
            ("process3", "/v1/call/order/process3")
        );
        assert_eq!(
            (
                Example::TypeScript.handler(),
                Example::TypeScript.call_path()
            ),
            ("order3", "/v1/call/order/order3")
        );
        let args = parse(&["--python", "/usr/bin/python3.12"]);
        assert_eq!(
            Example::Python.interpreter(&args),
            Path::new("/usr/bin/python3.12")
        );
        assert_eq!(Example::TypeScript.interpreter(&args), Path::new("node"));
    }

    #[test]
    fn an_unbuilt_typescript_sdk_is_refused_with_the_build_command() {
        let sdks = Path::new("/nonexistent/sdks");
        let error = Example::TypeScript.check(sdks).unwrap_err().to_string();
        assert!(
            error.contains("/nonexistent/sdks/typescript/dist/examples/order.js is missing")
                && error.contains("`cd /nonexistent/sdks/typescript && npm ci && npm run build`"),
            "{error}"
        );
        // This repository's SDKs, by default.
        let repository = parse(&[]).sdks_dir();
        assert!(repository.ends_with("sdks") && repository.is_absolute());
        assert!(Example::Python.check(&repository).is_ok());
    }

    #[test]
    fn open_files_must_cover_the_largest_level() {
        assert!(check_open_files(5000, (20_000, 20_000)).is_ok());
        assert!(check_open_files(5000, (5100, 5100)).is_ok());
        assert!(check_open_files(5000, (u64::MAX, u64::MAX)).is_ok());
        let raise = check_open_files(5000, (1024, 20_000))
            .unwrap_err()
            .to_string();
        assert!(
            raise.contains("is 1024") && raise.contains("ulimit -n 5100"),
            "{raise}"
        );
        let hard = check_open_files(5000, (1024, 4096))
            .unwrap_err()
            .to_string();
        assert!(hard.contains("hard limit is 4096 too"), "{hard}");
    }
}
