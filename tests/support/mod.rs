//! Test harness: real processes (the gateway, the order handler), a downstream the test
//! owns, and small HTTP helpers. Shared by the test files with `mod support;`.
#![allow(dead_code)]
// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use serde_json::Value;

pub const ORDER: &str = r#"{"order_id":"o-1","customer_id":"c-1","amount_cents":4999}"#;
pub const ORDER_OUTPUT: &str = "order o-1 complete charge charge_o-1 reservation reservation_o-1";

/// A child process that is killed (SIGKILL) when dropped, so a failing test leaves nothing.
pub struct Proc {
    child: Child,
    pub url: String,
    pub addr: SocketAddr,
    /// The admin API's URL, for a gateway (empty for other processes).
    pub admin: String,
}

impl Proc {
    /// Starts `command` and waits for the line `{ready_prefix}http://ADDR…` on its stdout.
    pub fn spawn(command: Command, ready_prefix: &str) -> Proc {
        Proc::spawn_with(command, ready_prefix, &[]).0
    }

    /// Like [`Proc::spawn`], and also returns the URLs of lines starting with `others`,
    /// which must come before the ready line.
    pub fn spawn_with(
        mut command: Command,
        ready_prefix: &str,
        others: &[&str],
    ) -> (Proc, Vec<String>) {
        // stderr is inherited unless the caller redirected it.
        command.stdout(Stdio::piped());
        let mut child = command.spawn().expect("spawn");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        let prefix = ready_prefix.to_owned();
        let others: Vec<String> = others.iter().map(|s| (*s).to_owned()).collect();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let mut found = vec![String::new(); others.len()];
            for line in lines.by_ref() {
                let Ok(line) = line else { return };
                let url_after = |p: &str| {
                    line.strip_prefix(p).map(|rest| {
                        rest.split_whitespace()
                            .next()
                            .unwrap_or_default()
                            .to_owned()
                    })
                };
                for (i, other) in others.iter().enumerate() {
                    if let Some(url) = url_after(other) {
                        found[i] = url;
                    }
                }
                if let Some(url) = url_after(&prefix) {
                    let _ = tx.send((url, found));
                    break;
                }
            }
            // Keep draining so that the child never blocks on a full pipe.
            for _ in lines {}
        });
        let (url, found) = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("process did not print {ready_prefix:?} in time"));
        let addr = url
            .split("://")
            .last()
            .unwrap_or_default()
            .parse()
            .expect("address in ready line");
        (
            Proc {
                child,
                url,
                addr,
                admin: String::new(),
            },
            found,
        )
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the exit, at most `limit`; returns the exit status.
    pub fn terminate(&mut self, limit: Duration) -> std::process::ExitStatus {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM failed");
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                start.elapsed() < limit,
                "no exit within {limit:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The gateway in this test's process (`durin::run` on port 0, its SQLite file in a
/// directory of its own), with `configure` applied to a config that drains in 1 s.
pub struct InProcess {
    pub url: String,
    /// The admin API (deployments, invocation lists, journals, operator verbs).
    pub admin: String,
    shutdown: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
    /// With `DURIN_TEST_STORE=postgres`, its schema, dropped with the gateway.
    _schema: Option<PostgresSchema>,
}

impl InProcess {
    pub async fn start(configure: impl FnOnce(&mut durin::config::Config)) -> InProcess {
        let dir = tempfile::tempdir().unwrap();
        let schema = PostgresSchema::for_store();
        let mut config = durin::config::Config {
            database_url: schema.as_ref().map_or_else(
                || format!("sqlite:{}", dir.path().join("durin.db").display()),
                |schema| schema.url.clone(),
            ),
            drain_timeout: Duration::from_secs(1),
            ..durin::config::Config::default()
        };
        configure(&mut config);
        let listeners = durin::Listeners {
            api: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            admin: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        };
        let url = format!("http://{}", listeners.api.local_addr().unwrap());
        let admin = format!("http://{}", listeners.admin.local_addr().unwrap());
        let shutdown = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(durin::run(config, listeners, shutdown.clone()));
        InProcess {
            url,
            admin,
            shutdown,
            task,
            _dir: dir,
            _schema: schema,
        }
    }

    /// Shuts the gateway down and checks that it ended without an error.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// A directory with the gateway's database and configuration.
pub struct GatewayHome {
    pub dir: tempfile::TempDir,
    /// With `DURIN_TEST_STORE=postgres`, or for a cluster, its PostgreSQL schema (dropped
    /// with the home).
    schema: Option<PostgresSchema>,
}

/// With `DURIN_TEST_STORE=postgres`, the URL of a new, empty schema on the PostgreSQL
/// server `DURIN_TEST_POSTGRES` names (`postgres://postgres@127.0.0.1:5432/test` by
/// default), so that the end-to-end tests run on the PostgreSQL store; `None` otherwise
/// (a SQLite file).
///
/// Nothing drops it: [`PostgresSchema::for_store`] is the same with a guard that does.
pub fn postgres_database() -> Option<String> {
    postgres_store_wanted().then(new_postgres_schema)
}

/// The URL of a new, empty schema on the PostgreSQL server `DURIN_TEST_POSTGRES` names.
///
/// Nothing drops it: [`PostgresSchema`] is the same schema with a guard that does.
pub fn new_postgres_schema() -> String {
    create_schema(&test_postgres_server()).1
}

/// The PostgreSQL server of the tests: `DURIN_TEST_POSTGRES`, or
/// `postgres://postgres@127.0.0.1:5432/test`.
pub fn test_postgres_server() -> String {
    std::env::var("DURIN_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Creates a new, empty schema `e2e_…` on `server`; returns its name and the URL of a
/// database that uses it.
fn create_schema(server: &str) -> (String, String) {
    let schema = format!("e2e_{}", uuid::Uuid::new_v4().simple());
    // On a thread of its own: the caller may be inside a runtime already.
    let create = {
        let (server, schema) = (server.to_owned(), schema.clone());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let pool = sqlx::PgPool::connect(&server).await.unwrap_or_else(|e| {
                    panic!("PostgreSQL is not reachable at {server} (DURIN_TEST_POSTGRES): {e}")
                });
                sqlx::query(&format!("CREATE SCHEMA {schema}"))
                    .execute(&pool)
                    .await
                    .unwrap();
                pool.close().await;
            });
        })
    };
    create.join().expect("create the test schema");
    let url = format!("{server}?options=-c%20search_path%3D{schema}");
    (schema, url)
}

/// A new, empty PostgreSQL schema of a test's own, dropped with everything in it when the
/// guard goes (also when the test fails): best effort, a schema that cannot be dropped is
/// one line on stderr.
pub struct PostgresSchema {
    pub name: String,
    /// The URL of a database that uses the schema.
    pub url: String,
    server: String,
}

impl PostgresSchema {
    /// A schema on the server `DURIN_TEST_POSTGRES` names.
    pub fn new() -> PostgresSchema {
        PostgresSchema::on(&test_postgres_server())
    }

    /// A schema on the server at `server` (a URL).
    pub fn on(server: &str) -> PostgresSchema {
        let (name, url) = create_schema(server);
        PostgresSchema {
            name,
            url,
            server: server.to_owned(),
        }
    }

    /// With `DURIN_TEST_STORE=postgres`, a schema for the end-to-end tests' store (see
    /// [`postgres_database`]); `None` otherwise (a SQLite file).
    pub fn for_store() -> Option<PostgresSchema> {
        postgres_store_wanted().then(PostgresSchema::new)
    }
}

impl Drop for PostgresSchema {
    fn drop(&mut self) {
        if let Err(e) = drop_schema(&self.server, &self.name) {
            let _ = writeln!(
                std::io::stderr(),
                "could not drop the test schema {} on {}: {e}",
                self.name,
                self.server
            );
        }
    }
}

/// `DROP SCHEMA … CASCADE`, on a thread and a runtime of its own (it runs in `Drop`, maybe
/// inside the test's runtime). Sessions that still hold locks in the schema (a gateway
/// that was not stopped, in a transaction its blocked runtime cannot finish) are ended
/// after 2 s, and the drop is tried again.
fn drop_schema(server: &str, schema: &str) -> Result<(), String> {
    let (server, schema) = (server.to_owned(), schema.to_owned());
    let dropping = std::thread::spawn(move || -> Result<(), String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        runtime.block_on(async {
            use sqlx::Connection;
            let mut conn = tokio::time::timeout(
                Duration::from_secs(10),
                sqlx::PgConnection::connect(&server),
            )
            .await
            .map_err(|_| "no connection within 10 s".to_owned())?
            .map_err(|e| e.to_string())?;
            sqlx::query("SET lock_timeout = '2s'")
                .execute(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            let mut tries = 0;
            loop {
                tries += 1;
                let dropped = sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                    .execute(&mut conn)
                    .await;
                let e = match dropped {
                    Ok(_) => break,
                    Err(e) => e,
                };
                let locked = e
                    .as_database_error()
                    .and_then(|e| e.code())
                    .is_some_and(|code| code == "55P03");
                if !locked || tries == 5 {
                    return Err(e.to_string());
                }
                sqlx::query(
                    "SELECT pg_terminate_backend(l.pid) FROM pg_locks l \
                     JOIN pg_class c ON c.oid = l.relation \
                     JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname = $1 AND l.pid <> pg_backend_pid()",
                )
                .bind(&schema)
                .execute(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            }
            let _ = conn.close().await;
            Ok(())
        })
    });
    dropping
        .join()
        .unwrap_or_else(|_| Err("the dropping thread panicked".into()))
}

// What the tests need from the machine. A test that needs PostgreSQL, Python 3, Node.js or
// Chromium and does not find it says so in one line on stderr and returns early (it passes,
// skipped); with `DURIN_REQUIRE_ALL=1` (CI) it fails with that line instead.

/// Whether `DURIN_REQUIRE_ALL=1`: a missing dependency fails the test instead of skipping it.
pub fn require_all() -> bool {
    std::env::var("DURIN_REQUIRE_ALL").is_ok_and(|value| value == "1")
}

/// This test cannot run because `missing` (what is missing and why): writes one line on
/// stderr (past the test harness's capture, so that `cargo test` shows it) and returns
/// `false`, for `if !… { return; }`; with `DURIN_REQUIRE_ALL=1` it panics with that line.
#[track_caller]
pub fn skip(missing: &str) -> bool {
    let test = std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_owned();
    if require_all() {
        panic!("{test}: {missing}; with DURIN_REQUIRE_ALL=1 that is a failure");
    }
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: {missing}; set DURIN_REQUIRE_ALL=1 to fail instead"
    );
    false
}

/// Whether this test can use `dependency`: `"postgres"` (the server `DURIN_TEST_POSTGRES`
/// names, see [`postgres_available`]) or a program that must answer `--version`
/// (`"python3"`, `"node"`, `"chromium"`). If not, [`skip`]: `if !require("python3") {
/// return; }`.
#[track_caller]
pub fn require(dependency: &str) -> bool {
    let found = if dependency == "postgres" {
        postgres_reachable()
    } else {
        program_runs(dependency)
    };
    match found {
        Ok(()) => true,
        Err(missing) => skip(&missing),
    }
}

/// Whether the end-to-end tests' store is there: always on SQLite, and with
/// `DURIN_TEST_STORE=postgres` when [`require`]`("postgres")` is.
#[track_caller]
pub fn require_store() -> bool {
    !postgres_store_wanted() || require("postgres")
}

/// Whether the PostgreSQL server `DURIN_TEST_POSTGRES` names
/// (`postgres://postgres@127.0.0.1:5432/test` by default) takes a connection within 5 s;
/// asked once per test binary. Says nothing: see [`require`].
pub fn postgres_available() -> bool {
    postgres_reachable().is_ok()
}

fn postgres_store_wanted() -> bool {
    std::env::var("DURIN_TEST_STORE").is_ok_and(|store| store == "postgres")
}

fn postgres_reachable() -> Result<(), String> {
    static REACHABLE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    REACHABLE
        .get_or_init(|| {
            let server = test_postgres_server();
            let probe = {
                let server = server.clone();
                std::thread::spawn(move || -> Result<(), String> {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| e.to_string())?;
                    runtime.block_on(async {
                        use sqlx::Connection;
                        let conn = tokio::time::timeout(
                            Duration::from_secs(5),
                            sqlx::PgConnection::connect(&server),
                        )
                        .await
                        .map_err(|_| "no connection within 5 s".to_owned())?
                        .map_err(|e| e.to_string())?;
                        let _ = conn.close().await;
                        Ok(())
                    })
                })
            };
            probe
                .join()
                .unwrap_or_else(|_| Err("the probe panicked".into()))
                .map_err(|e| {
                    format!("PostgreSQL is not reachable at {server} (DURIN_TEST_POSTGRES): {e}")
                })
        })
        .clone()
}

/// Whether `program --version` runs and succeeds; asked once per program and test binary.
fn program_runs(program: &str) -> Result<(), String> {
    static FOUND: std::sync::OnceLock<Mutex<HashMap<String, Result<(), String>>>> =
        std::sync::OnceLock::new();
    let found = FOUND.get_or_init(Default::default);
    if let Some(known) = found.lock().unwrap().get(program) {
        return known.clone();
    }
    let ran = Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let result = match ran {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(format!(
            "{program} is missing (`{program} --version`: {status})"
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(format!("{program} is missing (not found on PATH)"))
        }
        Err(e) => Err(format!("{program} is missing (cannot run it: {e})")),
    };
    found
        .lock()
        .unwrap()
        .insert(program.to_owned(), result.clone());
    result
}

impl GatewayHome {
    /// A home whose config retries quickly, so that crash tests do not wait long.
    pub fn new() -> GatewayHome {
        GatewayHome::with_schema(PostgresSchema::for_store())
    }

    /// A home on `schema`, or on a SQLite file in its directory.
    fn with_schema(schema: Option<PostgresSchema>) -> GatewayHome {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("durin.toml"),
            r#"
start_to_close = "20s"
drain_timeout = "1s"
[retry_policy]
initial_interval = "200ms"
maximum_interval = "1s"
maximum_attempts = 100
"#,
        )
        .expect("write config");
        GatewayHome { dir, schema }
    }

    /// A home for several nodes on one PostgreSQL schema of its own, whose attempts are
    /// leased for `lease` (`"2s"`).
    pub fn cluster(lease: &str) -> GatewayHome {
        GatewayHome::cluster_on(PostgresSchema::new(), lease)
    }

    /// Like [`GatewayHome::cluster`], on `schema` (of any server); the home drops it.
    pub fn cluster_on(schema: PostgresSchema, lease: &str) -> GatewayHome {
        let home = GatewayHome::with_schema(Some(schema));
        let config = std::fs::read_to_string(home.config()).expect("read config");
        std::fs::write(home.config(), format!("lease = \"{lease}\"\n{config}"))
            .expect("write config");
        home
    }

    pub fn db_url(&self) -> String {
        match &self.schema {
            Some(schema) => schema.url.clone(),
            None => format!("sqlite:{}", self.dir.path().join("durin.db").display()),
        }
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("durin.toml")
    }

    /// Starts the real `durin` binary with an egress proxy (on `egress`, or port 0); returns
    /// it and the egress URL.
    /// `args` are more flags for `durin serve`.
    pub fn start_with_egress(
        &self,
        listen: Option<SocketAddr>,
        egress: Option<&str>,
        args: &[&str],
    ) -> (Proc, String) {
        let mut command = self.command(listen);
        command
            .arg("--egress-listen")
            .arg(egress.map_or("127.0.0.1:0", |e| e.trim_start_matches("http://")))
            .args(args);
        let (mut proc, mut found) = Proc::spawn_with(
            command,
            "durin listening on ",
            &["durin egress listening on ", "durin admin listening on "],
        );
        proc.admin = found.remove(1);
        (proc, found.remove(0))
    }

    /// Starts the real `durin` binary with `args` and `DURIN_LOG=info`, its logs (stderr)
    /// going to the file `logs`.
    pub fn start_logging(&self, args: &[&str], logs: &Path) -> Proc {
        let mut command = self.command(None);
        command
            .args(args)
            .env("DURIN_LOG", "info")
            .stderr(std::fs::File::create(logs).expect("log file"));
        let (mut proc, mut found) = Proc::spawn_with(
            command,
            "durin listening on ",
            &["durin admin listening on "],
        );
        proc.admin = found.remove(0);
        proc
    }

    /// Starts the real `durin` binary, on `listen` (a fixed address for a restart) or port 0;
    /// its admin API on a port of its own.
    pub fn start(&self, listen: Option<SocketAddr>) -> Proc {
        let (mut proc, mut found) = Proc::spawn_with(
            self.command(listen),
            "durin listening on ",
            &["durin admin listening on "],
        );
        proc.admin = found.remove(0);
        proc
    }

    fn command(&self, listen: Option<SocketAddr>) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_durin"));
        command
            .arg("serve")
            .arg("--listen")
            .arg(listen.map_or("127.0.0.1:0".to_owned(), |a| a.to_string()))
            .arg("--admin-listen")
            .arg("127.0.0.1:0")
            .arg("--database")
            .arg(self.db_url())
            .arg("--config")
            .arg(self.config())
            .env("DURIN_LOG", "warn");
        command
    }
}

/// The `order` example binary, which `cargo test` builds (as an example of this package)
/// before it runs the tests: `target/{profile}/examples/order`, beside the test's `deps/`.
pub fn order_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binaries live in target/{profile}/deps");
    let binary = profile_dir.join("examples").join("order");
    assert!(
        binary.exists(),
        "{} is missing: run the tests with `cargo test` (which builds the examples) or `cargo build --examples` first",
        binary.display()
    );
    binary
}

/// Starts the real `order` example binary.
pub fn start_order(listen: Option<SocketAddr>, args: &[&str]) -> Proc {
    let mut command = Command::new(order_binary());
    command
        .arg("--listen")
        .arg(listen.map_or("127.0.0.1:0".to_owned(), |a| a.to_string()))
        .args(args)
        .env("RUST_LOG", "warn");
    Proc::spawn(command, "order service listening on ")
}

/// One request the downstream received.
#[derive(Debug, Clone)]
pub struct Effect {
    pub key: String,
    pub at: Instant,
}

/// The service the order steps call for their side effects; it records every request,
/// answers 503 to the first `fail_first[step]` requests of a step, and 409 to every
/// request of a step it refuses (see [`Downstream::refuse`]).
#[derive(Clone, Default)]
pub struct Downstream {
    pub url: String,
    effects: Arc<Mutex<HashMap<String, Vec<Effect>>>>,
    fail_first: Arc<Mutex<HashMap<String, u32>>>,
    refused: Arc<Mutex<HashSet<String>>>,
}

impl Downstream {
    pub async fn start(fail_first: &[(&str, u32)]) -> Downstream {
        let mut downstream = Downstream::default();
        *downstream.fail_first.lock().unwrap() = fail_first
            .iter()
            .map(|(s, n)| ((*s).to_owned(), *n))
            .collect();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        downstream.url = format!("http://{}", listener.local_addr().unwrap());
        let app = Router::new()
            .route("/{step}", post(record_effect))
            .with_state(downstream.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        downstream
    }

    /// Refuses (409, which the order example takes as a failure for good) every request of
    /// `step` from now on, or, with `false`, none any more.
    pub fn refuse(&self, step: &str, refused: bool) {
        let mut steps = self.refused.lock().unwrap();
        if refused {
            steps.insert(step.to_owned());
        } else {
            steps.remove(step);
        }
    }

    /// Requests received for `step`, failed ones included.
    pub fn requests(&self, step: &str) -> Vec<Effect> {
        self.effects
            .lock()
            .unwrap()
            .get(step)
            .cloned()
            .unwrap_or_default()
    }

    /// Distinct idempotency keys seen for `step`: the effects a deduplicating API applies.
    pub fn distinct_keys(&self, step: &str) -> usize {
        let mut keys: Vec<String> = self.requests(step).into_iter().map(|e| e.key).collect();
        keys.sort();
        keys.dedup();
        keys.len()
    }
}

async fn record_effect(
    State(downstream): State<Downstream>,
    UrlPath(step): UrlPath<String>,
    headers: HeaderMap,
) -> StatusCode {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    downstream
        .effects
        .lock()
        .unwrap()
        .entry(step.clone())
        .or_default()
        .push(Effect {
            key,
            at: Instant::now(),
        });
    if downstream.refused.lock().unwrap().contains(&step) {
        return StatusCode::CONFLICT;
    }
    let mut fail_first = downstream.fail_first.lock().unwrap();
    match fail_first.get_mut(&step) {
        Some(n) if *n > 0 => {
            *n -= 1;
            StatusCode::SERVICE_UNAVAILABLE
        }
        _ => StatusCode::OK,
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// Serves `router` on a fresh port of 127.0.0.1 (a handler or a downstream inside the
/// test) for as long as the test's runtime runs; returns its address.
pub async fn serve_router(router: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

/// Registers a deployment through the admin API at `admin`.
pub async fn register(admin: &str, deployment: &str) {
    register_body(admin, &serde_json::json!({ "url": deployment })).await
}

/// Registers a plain deployment whose `services` (a JSON array) are declared inline.
pub async fn register_plain(admin: &str, deployment: &str, services: serde_json::Value) {
    register_body(
        admin,
        &serde_json::json!({ "url": deployment, "services": services }),
    )
    .await
}

async fn register_body(admin: &str, body: &serde_json::Value) {
    let response = client()
        .post(format!("{admin}/v1/deployments"))
        .json(body)
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "registration failed: {}",
        response.text().await.unwrap()
    );
}

/// `POST /v1/send/order/process`; returns the invocation id.
pub async fn send_order(gateway: &str, body: &str) -> String {
    let response = client()
        .post(format!("{gateway}/v1/send/order/process"))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let json: Value = response.json().await.unwrap();
    json["invocation_id"].as_str().unwrap().to_owned()
}

pub async fn get_json(url: &str) -> Value {
    client()
        .get(url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The outcome of each delivery webhook source `source` kept, newest first.
pub async fn delivery_outcomes(admin: &str, source: &str) -> Vec<String> {
    get_json(&format!("{admin}/v1/webhooks/{source}/deliveries")).await["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["outcome"].as_str().unwrap().to_owned())
        .collect()
}

pub async fn journal(gateway: &str, id: &str) -> Vec<Value> {
    get_json(&format!("{gateway}/v1/invocations/{id}/journal")).await["entries"]
        .as_array()
        .unwrap()
        .clone()
}

/// `(kind, name)` of every entry, for comparing whole journals.
pub fn shape(entries: &[Value]) -> Vec<(String, Option<String>)> {
    entries
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap().to_owned(),
                e["name"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

pub fn order_journal_shape() -> Vec<(String, Option<String>)> {
    [
        ("input", None),
        ("step", Some("charge_payment")),
        ("step", Some("reserve_inventory")),
        ("step", Some("send_confirmation")),
        ("output", None),
    ]
    .into_iter()
    .map(|(k, n)| (k.to_owned(), n.map(str::to_owned)))
    .collect()
}

/// Polls `check` every 20 ms until it returns `Some`, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the invocation's journal holds a step named `step`.
pub async fn wait_for_step(gateway: &str, id: &str, step: &str) {
    eventually(Duration::from_secs(20), step, || async {
        let entries = journal(gateway, id).await;
        entries
            .iter()
            .any(|e| e["name"].as_str() == Some(step))
            .then_some(())
    })
    .await
}

/// Long-polls until the invocation is final; returns its view.
pub async fn wait_final(gateway: &str, id: &str) -> Value {
    eventually(
        Duration::from_secs(60),
        "the invocation to finish",
        || async {
            let response = client()
                .get(format!("{gateway}/v1/invocations/{id}"))
                .header("prefer", "wait=5")
                .send()
                .await
                .ok()?;
            let view: Value = response.json().await.ok()?;
            matches!(
                view["status"].as_str(),
                Some("completed" | "failed" | "cancelled" | "terminated")
            )
            .then_some(view)
        },
    )
    .await
}

pub fn path_of(home: &GatewayHome) -> &Path {
    home.dir.path()
}
