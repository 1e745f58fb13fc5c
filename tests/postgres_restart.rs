//! PostgreSQL stopped for 8 s and started again under load, with two Durin nodes on it: callers get retry-safe
//! problems while it is down (503 with `Retry-After`), the nodes reconnect by themselves,
//! and every order completes with each side effect applied once. The server is a
//! throwaway cluster of the test's own (`initdb` into a temporary directory, `pg_ctl` on
//! a free port of 127.0.0.1, its socket in that directory), removed at the end, also when
//! the test fails; the machine's PostgreSQL is not touched. Run as root, the cluster runs
//! as the `postgres` OS user (through `runuser`), since PostgreSQL refuses root. Without
//! PostgreSQL's server programs (`initdb`, `pg_ctl`, `postgres`: on PATH, in
//! `/usr/lib/postgresql/*/bin`, or where `DURIN_TEST_PG_BIN` says) the test is skipped, or
//! fails with `DURIN_REQUIRE_ALL=1`.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

/// A PostgreSQL cluster of this test's own: its data directory, log and socket in a
/// temporary directory, listening on 127.0.0.1:`port` with trust authentication. Dropped,
/// it is stopped (immediate mode) and its directory removed.
struct ThrowawayPostgres {
    dir: tempfile::TempDir,
    /// Where `initdb` and `pg_ctl` are.
    bin: PathBuf,
    /// The OS user the cluster runs as, when this test runs as root (which `initdb` and
    /// `postgres` refuse): `postgres`, through `runuser`.
    run_as: Option<String>,
    port: u16,
}

impl ThrowawayPostgres {
    /// Creates the cluster (`initdb`) and starts it; `Err` says what is missing (a failing
    /// `initdb` or start is a panic).
    fn start() -> Result<ThrowawayPostgres, String> {
        let bin = postgres_bin()?;
        let dir = tempfile::Builder::new()
            .prefix("durin-pg-")
            .tempdir()
            .unwrap();
        let root = current_uid() == Some(0);
        let run_as = if root {
            // initdb and postgres refuse root: the cluster belongs to the `postgres` user.
            let (uid, gid) = os_user_ids("postgres").ok_or(
                "this test runs as root, which PostgreSQL refuses, and there is no `postgres` \
                 OS user to run the cluster as",
            )?;
            if Command::new("runuser")
                .arg("--help")
                .stdout(Stdio::null())
                .status()
                .is_err()
            {
                return Err(
                    "this test runs as root, which PostgreSQL refuses, and `runuser` \
                    (to run the cluster as `postgres`) is missing"
                        .into(),
                );
            }
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
            Some("postgres".to_owned())
        } else {
            None
        };
        let mut cluster = ThrowawayPostgres {
            dir,
            bin,
            run_as,
            port: 0,
        };
        let data = cluster.data();
        let initdb = cluster.run(
            "initdb",
            &[
                "--pgdata",
                data.to_str().unwrap(),
                "--username",
                "postgres",
                "--auth",
                "trust",
                "--encoding",
                "UTF8",
                "--locale",
                "C",
                "--no-sync",
            ],
        );
        initdb.unwrap_or_else(|e| panic!("{e}"));
        // A free port: bound and let go; another process taking it meanwhile makes the
        // start fail, and the next port is tried.
        let mut tries = 0;
        loop {
            tries += 1;
            cluster.port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|listener| listener.local_addr())
                .unwrap()
                .port();
            match cluster.pg_ctl_start() {
                Ok(()) => return Ok(cluster),
                Err(e) if tries == 3 => panic!("{e}"),
                Err(_) => {}
            }
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The URL of its `postgres` database.
    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Runs the PostgreSQL program `program` (as `run_as`, if set) in the cluster's
    /// directory; `Err` with its output if it fails.
    fn run(&self, program: &str, args: &[&str]) -> Result<(), String> {
        let path = self.bin.join(program);
        let mut command = match &self.run_as {
            Some(user) => {
                let mut command = Command::new("runuser");
                command.args(["-u", user, "--"]).arg(&path);
                command
            }
            None => Command::new(&path),
        };
        let output = command
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", path.display()))?;
        if output.status.success() {
            return Ok(());
        }
        Err(format!(
            "{program} {args:?} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }

    /// `pg_ctl start`, waiting until the server takes connections.
    fn pg_ctl_start(&self) -> Result<(), String> {
        let (data, log) = (self.data(), self.dir.path().join("postgres.log"));
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {}",
            self.port,
            self.dir.path().display()
        );
        self.run(
            "pg_ctl",
            &[
                "start",
                "--wait",
                "--timeout",
                "60",
                "--pgdata",
                data.to_str().unwrap(),
                "--log",
                log.to_str().unwrap(),
                "-o",
                &options,
            ],
        )
        .map_err(|e| {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            format!("{e}\nserver log:\n{log}")
        })
    }

    /// `pg_ctl stop` in `mode` (`fast`: sessions are ended, as a restart by an operator).
    fn pg_ctl_stop(&self, mode: &str) -> Result<(), String> {
        let data = self.data();
        self.run(
            "pg_ctl",
            &[
                "stop",
                "--wait",
                "--mode",
                mode,
                "--pgdata",
                data.to_str().unwrap(),
            ],
        )
    }
}

impl Drop for ThrowawayPostgres {
    fn drop(&mut self) {
        // Stopped already (the test failed while it was down) is fine; the directory goes
        // with `dir`.
        let _ = self.pg_ctl_stop("immediate");
    }
}

/// The directory of PostgreSQL's server programs: `DURIN_TEST_PG_BIN` if set, or else the
/// one of `pg_ctl` on PATH when `initdb` and `postgres` are beside it, or else the newest
/// `/usr/lib/postgresql/*/bin` (Debian's).
fn postgres_bin() -> Result<PathBuf, String> {
    let complete = |dir: &Path| {
        ["initdb", "pg_ctl", "postgres"]
            .iter()
            .all(|p| dir.join(p).is_file())
    };
    if let Some(dir) = std::env::var_os("DURIN_TEST_PG_BIN") {
        let dir = PathBuf::from(dir);
        return if complete(&dir) {
            Ok(dir)
        } else {
            Err(format!(
                "PostgreSQL's server programs (initdb, pg_ctl, postgres) are missing from {} \
                 (DURIN_TEST_PG_BIN)",
                dir.display()
            ))
        };
    }
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|dir| std::fs::canonicalize(dir.join("pg_ctl")).ok())
        .filter_map(|pg_ctl| pg_ctl.parent().map(Path::to_path_buf));
    let mut debian: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dirs| {
            dirs.filter_map(|dir| {
                let dir = dir.ok()?;
                let version = dir.file_name().to_str()?.parse().ok()?;
                Some((version, dir.path().join("bin")))
            })
            .collect()
        })
        .unwrap_or_default();
    debian.sort();
    on_path
        .chain(debian.into_iter().rev().map(|(_, dir)| dir))
        .find(|dir| complete(dir))
        .ok_or_else(|| {
            "PostgreSQL's server programs (initdb, pg_ctl, postgres) are missing: not on PATH, \
             nor in /usr/lib/postgresql/*/bin (DURIN_TEST_PG_BIN can name their directory)"
                .to_owned()
        })
}

/// This process's uid.
fn current_uid() -> Option<u32> {
    let output = Command::new("id").arg("-u").output().ok()?;
    String::from_utf8(output.stdout).ok()?.trim().parse().ok()
}

/// The uid and gid of the OS user `name`.
fn os_user_ids(name: &str) -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let output = Command::new("id").args([flag, name]).output().ok()?;
        if !output.status.success() {
            return None;
        }
        String::from_utf8(output.stdout).ok()?.trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

const ORDERS: usize = 400;

/// The invocations not completed, one line each with what says why, for a failure's message.
async fn unfinished(db: &sqlx::PgPool) -> String {
    let now = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT";
    let lines: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT format('%s status=%s attempt=%s failures=%s journal_len=%s next_run_in_ms=%s \
         lease_owner=%s lease_expires_in_ms=%s waiting_for=%s last_error=%s', \
         id, status, attempt, failures, journal_len, next_run_at_ms - {now}, lease_owner, \
         lease_expires_at_ms - {now}, waiting_for, last_error) \
         FROM invocations WHERE status <> 'completed' ORDER BY id LIMIT 50"
    ))
    .fetch_all(db)
    .await
    .unwrap_or_else(|e| vec![format!("(could not read them: {e})")]);
    lines.join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_under_load_loses_and_repeats_nothing() {
    let started = Instant::now();
    let postgres = match ThrowawayPostgres::start() {
        Ok(postgres) => postgres,
        Err(missing) => {
            skip(&missing);
            return;
        }
    };
    println!(
        "throwaway PostgreSQL on 127.0.0.1:{} in {}, up in {} ms",
        postgres.port,
        postgres.dir.path().display(),
        started.elapsed().as_millis()
    );
    // Declared after the cluster, so dropped before it: the schema goes while the server
    // is up.
    let home = GatewayHome::cluster_on(PostgresSchema::on(&postgres.url()), "2s");
    let downstream = Downstream::start(&[]).await;
    let handler = start_order(
        None,
        &["--step-delay-ms", "50", "--downstream", &downstream.url],
    );
    let nodes = [home.start(None), home.start(None)];
    register(&nodes[0].admin, &handler.url).await;
    let urls: Vec<String> = nodes.iter().map(|n| n.url.clone()).collect();

    // Orders go out steadily, each under its own key; a 503 is retried after its
    // Retry-After with the same key, as a client should.
    let unavailable = Arc::new(AtomicU32::new(0));
    let sender = {
        let (urls, unavailable) = (urls.clone(), Arc::clone(&unavailable));
        tokio::spawn(async move {
            use futures_util::StreamExt;
            futures_util::stream::iter(0..ORDERS)
                .map(|i| {
                    let (urls, unavailable) = (urls.clone(), Arc::clone(&unavailable));
                    async move {
                        // Spread over time, so that some are sent while the server is down.
                        tokio::time::sleep(Duration::from_millis(10 * i as u64)).await;
                        let order = json!({"order_id": format!("o-{i}"), "customer_id": "c", "amount_cents": 100});
                        let started = Instant::now();
                        loop {
                            let url = &urls[i % urls.len()];
                            let response = client()
                                .post(format!("{url}/v1/send/order/process"))
                                .header("idempotency-key", format!("order-{i}"))
                                .json(&order)
                                .send()
                                .await
                                .unwrap();
                            match response.status().as_u16() {
                                202 => break,
                                503 => {
                                    let after: u64 = response.headers()["retry-after"]
                                        .to_str()
                                        .unwrap()
                                        .parse()
                                        .unwrap();
                                    let problem: serde_json::Value =
                                        response.json().await.unwrap();
                                    assert_eq!(problem["retryable"], true, "{problem}");
                                    unavailable.fetch_add(1, Ordering::SeqCst);
                                    tokio::time::sleep(Duration::from_secs(after)).await;
                                }
                                status => panic!(
                                    "order {i}: {status} {}",
                                    response.text().await.unwrap_or_default()
                                ),
                            }
                            assert!(
                                started.elapsed() < Duration::from_secs(60),
                                "order {i} never accepted"
                            );
                        }
                    }
                })
                .buffer_unordered(64)
                .collect::<Vec<()>>()
                .await;
        })
    };

    // A third of the way in, restart the server.
    tokio::time::sleep(Duration::from_millis(10 * ORDERS as u64 / 3)).await;
    // Down for 8 s: longer than a node waits for a connection (5 s), so that callers meet
    // the outage, not only a short pause.
    // (pg_ctl blocks: off the runtime's worker, so that the sends go on meanwhile.)
    let stopping = Instant::now();
    tokio::task::block_in_place(|| postgres.pg_ctl_stop("fast")).unwrap();
    println!("stopped in {} ms", stopping.elapsed().as_millis());
    tokio::time::sleep(Duration::from_secs(8)).await;
    let starting = Instant::now();
    tokio::task::block_in_place(|| postgres.pg_ctl_start()).unwrap();
    println!("started again in {} ms", starting.elapsed().as_millis());

    sender.await.unwrap();
    let refused = unavailable.load(Ordering::SeqCst);
    println!("sends answered 503 with Retry-After while PostgreSQL restarted: {refused}");
    assert!(
        refused > 0,
        "no send met the restart: the test did not test it"
    );
    let db = sqlx::PgPool::connect(&home.db_url()).await.unwrap();
    let waiting = Instant::now();
    loop {
        let done: Option<i64> = sqlx::query_scalar(
            "SELECT COUNT(*) FROM invocations WHERE service = 'order' AND status = 'completed'",
        )
        .fetch_one(&db)
        .await
        .ok();
        if done.is_some_and(|done| done as usize == ORDERS) {
            break;
        }
        if waiting.elapsed() > Duration::from_secs(120) {
            panic!(
                "timed out waiting for every order to complete; the others:\n{}",
                unfinished(&db).await
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM invocations")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(total as usize, ORDERS, "one invocation per order");
    for step in ["charge_payment", "reserve_inventory", "send_confirmation"] {
        let (requests, applied) = (
            downstream.requests(step).len(),
            downstream.distinct_keys(step),
        );
        println!("{step}: {requests} requests, {applied} applied");
        assert_eq!(applied, ORDERS, "{step} once per order");
    }
    db.close().await;
}
