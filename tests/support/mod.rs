//! Test harness: real processes (the gateway, the order handler), a downstream the test
//! owns, and small HTTP helpers. Shared by the test files with `mod support;`.
#![allow(dead_code)]
// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
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
}

impl InProcess {
    pub async fn start(configure: impl FnOnce(&mut durin::config::Config)) -> InProcess {
        let dir = tempfile::tempdir().unwrap();
        let mut config = durin::config::Config {
            database_url: postgres_database()
                .unwrap_or_else(|| format!("sqlite:{}", dir.path().join("durin.db").display())),
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
    /// With `DURIN_TEST_STORE=postgres`, the database URL (a schema of its own).
    postgres: Option<String>,
}

/// With `DURIN_TEST_STORE=postgres`, the URL of a new, empty schema on the PostgreSQL
/// server `DURIN_TEST_POSTGRES` names (`postgres://postgres@127.0.0.1:5432/test` by
/// default), so that the end-to-end tests run on the PostgreSQL store; `None` otherwise
/// (a SQLite file).
pub fn postgres_database() -> Option<String> {
    if std::env::var("DURIN_TEST_STORE").ok()? != "postgres" {
        return None;
    }
    Some(new_postgres_schema())
}

/// The URL of a new, empty schema on the PostgreSQL server `DURIN_TEST_POSTGRES` names.
pub fn new_postgres_schema() -> String {
    let server = std::env::var("DURIN_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let schema = format!("e2e_{}", uuid::Uuid::new_v4().simple());
    // On a thread of its own: the caller may be inside a runtime already.
    let create = {
        let (server, schema) = (server.clone(), schema.clone());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let pool = sqlx::PgPool::connect(&server).await.unwrap();
                sqlx::query(&format!("CREATE SCHEMA {schema}"))
                    .execute(&pool)
                    .await
                    .unwrap();
                pool.close().await;
            });
        })
    };
    create.join().expect("create the test schema");
    format!("{server}?options=-c%20search_path%3D{schema}")
}

impl GatewayHome {
    /// A home whose config retries quickly, so that crash tests do not wait long.
    pub fn new() -> GatewayHome {
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
        GatewayHome {
            dir,
            postgres: postgres_database(),
        }
    }

    /// A home for several nodes on one PostgreSQL schema of its own, whose attempts are
    /// leased for `lease` (`"2s"`).
    pub fn cluster(lease: &str) -> GatewayHome {
        let home = GatewayHome {
            postgres: Some(new_postgres_schema()),
            ..GatewayHome::new()
        };
        let config = std::fs::read_to_string(home.config()).expect("read config");
        std::fs::write(home.config(), format!("lease = \"{lease}\"\n{config}"))
            .expect("write config");
        home
    }

    pub fn db_url(&self) -> String {
        match &self.postgres {
            Some(url) => url.clone(),
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

/// Registers a deployment through the admin API at `admin`.
pub async fn register(admin: &str, deployment: &str) {
    let response = client()
        .post(format!("{admin}/v1/deployments"))
        .json(&serde_json::json!({ "url": deployment }))
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
