//! The conformance suite: store behaviours the engine relies on (the scheduler's claims and
//! due times, commands and their completions, signals and awakeables, fencing,
//! idempotency, purges, restarts), each run against a real SQLite file and a real
//! PostgreSQL database (a schema of its own on the server `DURIN_TEST_POSTGRES` names).
#![allow(clippy::unwrap_used)]

use durin_protocol::{EntryKind, HandlerSpec, ServiceSpec};

use super::*;

const T0: i64 = 1_700_000_000_000;

/// A SQLite store in a directory of its own (kept as long as the guard lives).
async fn sqlite(limits: JournalLimits) -> (Box<dyn Store>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("durin.db").display());
    let store = SqliteStore::open(&url).await.unwrap();
    (Box::new(store.with_journal_limits(limits)), dir)
}

/// The PostgreSQL server `DURIN_TEST_POSTGRES` names
/// (`postgres://postgres@127.0.0.1:5432/test` by default).
fn postgres_server() -> String {
    std::env::var("DURIN_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A new schema of its own on the test server: its name and the URL of a database that
/// uses it.
async fn postgres_schema() -> (String, String) {
    let server = postgres_server();
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    let admin = sqlx::PgPool::connect(&server).await.unwrap();
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    let url = format!("{server}?options=-c%20search_path%3D{schema}");
    (schema, url)
}

/// Whether the PostgreSQL server `DURIN_TEST_POSTGRES` names takes a connection within
/// 5 s. If not, the test says so on stderr and is skipped, unless `DURIN_REQUIRE_ALL=1`
/// (CI), which makes it a failure.
pub(crate) async fn postgres_or_skip(test: &str) -> bool {
    static REACHABLE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    // Asked once per test binary: a TCP connection to the server's address.
    let reachable = REACHABLE.get_or_init(|| {
        let server = postgres_server();
        let authority = server
            .split("://")
            .nth(1)
            .and_then(|rest| rest.rsplit('@').next())
            .and_then(|rest| rest.split(['/', '?']).next())
            .unwrap_or_default()
            .to_owned();
        let address = if authority.contains(':') {
            authority
        } else {
            format!("{authority}:5432")
        };
        let addresses = std::net::ToSocketAddrs::to_socket_addrs(&address)
            .map_err(|e| format!("{address}: {e}"))?;
        let mut last = format!("{address} names no address");
        for socket in addresses {
            match std::net::TcpStream::connect_timeout(&socket, std::time::Duration::from_secs(5)) {
                Ok(_) => return Ok(()),
                Err(e) => last = format!("{socket}: {e}"),
            }
        }
        Err(last)
    });
    let why = match reachable {
        Ok(()) => return true,
        Err(why) => why,
    };
    let message = format!(
        "SKIPPED {test}: PostgreSQL ({}) is not reachable: {why}; set DURIN_REQUIRE_ALL=1 to fail instead",
        postgres_server()
    );
    assert!(
        std::env::var("DURIN_REQUIRE_ALL").as_deref() != Ok("1"),
        "{message}"
    );
    // Past the test harness's capture, so that the skip shows.
    let _ = std::io::Write::write_all(&mut std::io::stderr(), format!("{message}\n").as_bytes());
    false
}

/// Drops its schema when the test ends, passed or failed.
struct SchemaGuard(String);

impl Drop for SchemaGuard {
    fn drop(&mut self) {
        let schema = self.0.clone();
        // On a thread and runtime of its own: the test's runtime may be unwinding.
        let _ = std::thread::spawn(move || {
            if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                runtime.block_on(drop_schema(&schema));
            }
        })
        .join();
    }
}

/// A PostgreSQL store in a schema of its own, on the server `DURIN_TEST_POSTGRES`
/// names (`postgres://postgres@127.0.0.1:5432/test` by default).
async fn postgres(limits: JournalLimits) -> (Box<dyn Store>, String) {
    let (schema, url) = postgres_schema().await;
    let store = PostgresStore::open(&url, NodeOptions::default())
        .await
        .unwrap();
    (Box::new(store.with_journal_limits(limits)), schema)
}

async fn drop_schema(schema: &str) {
    let admin = sqlx::PgPool::connect(&postgres_server()).await.unwrap();
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
}

/// Node `id` with leases of `lease_ms`.
fn node(id: &str, lease_ms: u64) -> NodeOptions {
    NodeOptions {
        node_id: id.into(),
        lease: std::time::Duration::from_millis(lease_ms),
        ..NodeOptions::default()
    }
}

/// Opens node `id` on `url`, waiting (at most 10 s) for the database to end the session of
/// the node's previous life, which frees its node id.
async fn reopen(url: &str, id: &str, lease_ms: u64) -> PostgresStore {
    for _ in 0..100 {
        match PostgresStore::open(url, node(id, lease_ms)).await {
            Ok(store) => return store,
            Err(e) if e.to_string().contains("node id") => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    panic!("node {id} could not start again");
}

/// The SQLite store fills its write-ahead log with zeros when it opens, so that commits
/// overwrite written blocks instead of growing the file; a copy of the files taken while
/// it runs (what a `kill -9` leaves) opens with every committed invocation, the zeros
/// past the last frame read as the log's end.
#[tokio::test]
async fn the_sqlite_log_is_filled_with_zeros_and_a_crash_image_recovers_through_them() {
    const LIMIT: usize = 64 * 1024 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("durin.db");
    let wal = dir.path().join("durin.db-wal");
    let store = SqliteStore::open(&format!("sqlite:{}", path.display()))
        .await
        .unwrap();
    // Filled before the store answers: the first commits land in zeros.
    let fresh = std::fs::read(&wal).unwrap();
    assert_eq!(fresh.len(), LIMIT, "the log's length once open");
    assert!(fresh.iter().all(|b| *b == 0), "a fresh log is all zeros");
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(running(&store).await.id);
    }
    let log = std::fs::read(&wal).unwrap();
    assert_eq!(
        log.len(),
        LIMIT,
        "commits overwrote the zeros: the file did not grow"
    );
    assert!(log[..4096].iter().any(|b| *b != 0), "the log has frames");
    assert!(log[LIMIT - 1024 * 1024..].iter().all(|b| *b == 0));

    // A crash image: the database and its log as they are now, without the index (-shm),
    // which SQLite rebuilds from the log.
    let image = tempfile::tempdir().unwrap();
    let image_path = image.path().join("durin.db");
    let image_wal = image.path().join("durin.db-wal");
    std::fs::copy(&path, &image_path).unwrap();
    std::fs::copy(&wal, &image_wal).unwrap();
    drop(store);
    let recovered = SqliteStore::open(&format!("sqlite:{}", image_path.display()))
        .await
        .unwrap();
    for id in &ids {
        let record = recovered.get_invocation(id).await.unwrap();
        assert_eq!(record.map(|r| r.status), Some(Status::Running), "{id}");
    }
    // And it takes more writes after the zeros, in the same file.
    let more = running(&recovered).await;
    assert!(recovered.get_invocation(&more.id).await.unwrap().is_some());
    assert_eq!(std::fs::metadata(&image_wal).unwrap().len(), LIMIT as u64);
}

/// A second process with a node id that a live node has is refused with a reason; a node
/// with another id shares the database, and the first keeps working.
#[tokio::test]
async fn a_second_node_with_the_same_id_on_one_postgres_database_is_refused() {
    if !postgres_or_skip("a_second_node_with_the_same_id_on_one_postgres_database_is_refused").await
    {
        return;
    }
    let (schema, url) = postgres_schema().await;
    let first = PostgresStore::open(&url, node("n1", 10_000)).await.unwrap();
    let refused = PostgresStore::open(&url, node("n1", 10_000))
        .await
        .err()
        .unwrap();
    assert!(
        refused
            .to_string()
            .contains("another Durin node with node id"),
        "{refused}"
    );
    let second = PostgresStore::open(&url, node("n2", 10_000)).await.unwrap();
    first.ping().await.unwrap();
    second.ping().await.unwrap();
    let record = running(&first).await;
    assert_eq!(
        second
            .get_invocation(&record.id)
            .await
            .unwrap()
            .unwrap()
            .attempt,
        1
    );
    drop(first);
    drop(second);
    drop_schema(&schema).await;
}

/// The count that admission control asks under load and the recovery at start search the
/// index of unfinished invocations on SQLite: with a million sleeping or ended invocations,
/// a scan of the table at each start made starts slow down from 3,000/s to under 400/s.
#[tokio::test]
async fn sqlite_counts_pending_starts_and_recovers_through_the_index_of_unfinished_runs() {
    let (store, dir) = sqlite(JournalLimits::default()).await;
    drop(store);
    let conn = rusqlite::Connection::open(dir.path().join("durin.db")).unwrap();
    for sql in [
        crate::store::sqlite::COUNT_PENDING,
        crate::store::sqlite::RECOVER_RUNNING,
    ] {
        let mut plan = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let nulls = std::iter::repeat_n(rusqlite::types::Null, plan.parameter_count());
        let steps: Vec<String> = plan
            .query_map(rusqlite::params_from_iter(nulls), |row| {
                row.get::<_, String>(3)
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            steps
                .iter()
                .any(|s| s.contains("INDEX invocations_unfinished"))
                && !steps.iter().any(|s| s.starts_with("SCAN invocations")),
            "{sql}: {steps:?}"
        );
    }
}

/// The invocations table leaves half of each new page free, so that the updates of a
/// running invocation stay on its page and touch no index.
#[tokio::test]
async fn postgres_leaves_room_on_the_invocations_pages_for_their_updates() {
    if !postgres_or_skip("postgres_leaves_room_on_the_invocations_pages_for_their_updates").await {
        return;
    }
    let (store, schema) = postgres(JournalLimits::default()).await;
    let _guard = SchemaGuard(schema.clone());
    drop(store);
    let admin = sqlx::PgPool::connect(&postgres_server()).await.unwrap();
    let options: Option<Vec<String>> = sqlx::query_scalar(
        "SELECT c.reloptions FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relname = 'invocations'",
    )
    .bind(&schema)
    .fetch_one(&admin)
    .await
    .unwrap();
    admin.close().await;
    assert_eq!(options, Some(vec!["fillfactor=50".to_owned()]));
}

/// Node A's attempts (one it claimed, one it created) stay A's while A renews its leases,
/// past the lease time; once A stops renewing (it froze), node B claims them after their
/// leases expired, with the next attempt, and A's writes for its old attempts are fenced.
#[tokio::test]
async fn an_attempt_whose_lease_expired_is_taken_over_by_another_node() {
    if !postgres_or_skip("an_attempt_whose_lease_expired_is_taken_over_by_another_node").await {
        return;
    }
    let (schema, url) = postgres_schema().await;
    let mut a = PostgresStore::open(&url, node("a", 1_000)).await.unwrap();
    let b = PostgresStore::open(&url, node("b", 1_000)).await.unwrap();
    let created = running(&a).await;
    let backing_off = running(&a).await;
    let back_off = AttemptEnd::BackOff {
        until_ms: T0,
        error: "retry".into(),
        charged: Charge::Nobody,
    };
    (&a as &dyn Store)
        .end_attempt(&backing_off.id, 1, back_off, T0)
        .await
        .unwrap();
    let claimed = (&a as &dyn Store).claim_due(T0 + 1, 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!((&claimed[0].id, claimed[0].attempt), (&backing_off.id, 2));
    // A runs both attempts.
    let _held = [
        a.hold_lease(&created.id, 1),
        a.hold_lease(&backing_off.id, 2),
    ];
    assert!(
        (&b as &dyn Store)
            .claim_due(T0 + 1, 10)
            .await
            .unwrap()
            .is_empty(),
        "A's leases live"
    );
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    assert!(a.lease_held());
    assert!(
        (&b as &dyn Store)
            .claim_due(T0 + 2, 10)
            .await
            .unwrap()
            .is_empty(),
        "A renewed its leases"
    );

    a.stop_renewing();
    let stopped = std::time::Instant::now();
    let mut taken = Vec::new();
    while taken.len() < 2 && stopped.elapsed() < std::time::Duration::from_secs(5) {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        taken.extend((&b as &dyn Store).claim_due(T0 + 3, 10).await.unwrap());
    }
    assert!(
        stopped.elapsed() > std::time::Duration::from_millis(300),
        "not before the leases expired"
    );
    assert!(!a.lease_held(), "A knows that its leases may have expired");
    let mut taken: Vec<_> = taken
        .iter()
        .map(|r| (r.id.to_string(), r.attempt, r.status.as_str()))
        .collect();
    taken.sort();
    let mut expected = vec![
        (created.id.to_string(), 2, "running"),
        (backing_off.id.to_string(), 3, "running"),
    ];
    expected.sort();
    assert_eq!(taken, expected);
    assert!(
        (&b as &dyn Store)
            .claim_due(T0 + 4, 10)
            .await
            .unwrap()
            .is_empty(),
        "B's leases live"
    );

    // A, back from its freeze, writes for the attempts it thinks it runs: fenced.
    let entry = NewEntry {
        index: None,
        kind: EntryKind::Step,
        name: Some("step".into()),
        value: Some(b"1".to_vec()),
        content_type: None,
        failure: None,
        token: claimed[0].attempt_token.clone(),
        effect: Effect::None,
    };
    let refused = (&a as &dyn Store)
        .append_entry(&backing_off.id, 2, entry, T0 + 5)
        .await
        .err()
        .unwrap();
    assert!(
        matches!(
            refused,
            StoreError::Fenced {
                attempt: 2,
                current_attempt: 3,
                status: Status::Running,
                ..
            }
        ),
        "{refused}"
    );
    let completed = AttemptEnd::Completed {
        output: b"1".to_vec(),
        content_type: None,
    };
    let ended = (&a as &dyn Store)
        .end_attempt(&created.id, 1, completed, T0 + 5)
        .await
        .err()
        .unwrap();
    assert!(
        matches!(
            ended,
            StoreError::Fenced {
                attempt: 1,
                current_attempt: 2,
                ..
            }
        ),
        "{ended}"
    );
    // B's attempt writes.
    let current = b.get_invocation(&backing_off.id).await.unwrap().unwrap();
    command(
        &b,
        &current,
        EntryKind::Step,
        Some("step"),
        Effect::None,
        T0 + 6,
    )
    .await;
    drop(a);
    drop(b);
    drop_schema(&schema).await;
}

/// A write that holds a row of a node's running invocation locked does not hold up the
/// node's lease renewals (which skip it, then renew it one at a time, or at the next
/// tick), and the row's lease is renewed once the lock is gone.
#[tokio::test]
async fn a_lease_renewal_does_not_wait_behind_a_locked_row() {
    if !postgres_or_skip("a_lease_renewal_does_not_wait_behind_a_locked_row").await {
        return;
    }
    let (schema, url) = postgres_schema().await;
    let a = PostgresStore::open(&url, node("a", 1_000)).await.unwrap();
    let b = PostgresStore::open(&url, node("b", 1_000)).await.unwrap();
    let locked = running(&a).await;
    let free = running(&a).await;
    let _held = [a.hold_lease(&locked.id, 1), a.hold_lease(&free.id, 1)];
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let mut writer = pool.begin().await.unwrap();
    sqlx::query("SELECT id FROM invocations WHERE id = $1 FOR UPDATE")
        .bind(locked.id.as_str())
        .execute(&mut *writer)
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    assert!(a.lease_held(), "the renewals went on");
    writer.commit().await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    assert!(a.lease_held());
    assert!(
        (&b as &dyn Store)
            .claim_due(T0 + 1, 10)
            .await
            .unwrap()
            .is_empty(),
        "both leases were renewed"
    );
    let leases: Vec<(String, i64)> = sqlx::query_as(&format!(
        "SELECT id, lease_expires_at_ms - {} FROM invocations ORDER BY id",
        "(extract(epoch from clock_timestamp()) * 1000)::BIGINT"
    ))
    .fetch_all(&pool)
    .await
    .unwrap();
    let mut expected = vec![locked.id.to_string(), free.id.to_string()];
    expected.sort();
    assert_eq!(
        leases.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>(),
        expected
    );
    for (id, left) in leases {
        assert!(left > 300, "{id} has {left} ms of its lease left");
    }
    pool.close().await;
    drop(a);
    drop(b);
    drop_schema(&schema).await;
}

/// A node renews the leases of the attempts it runs, and only those: an attempt leased to
/// it that it does not run (its start failed after the write, or the database committed a
/// creation whose acknowledgement was lost) expires and is claimed with the next attempt,
/// here by the node itself; an attempt held twice is renewed until both holds are dropped,
/// and a hold of an older attempt does not renew the newer one.
#[tokio::test]
async fn a_node_renews_only_the_leases_of_the_attempts_it_runs() {
    if !postgres_or_skip("a_node_renews_only_the_leases_of_the_attempts_it_runs").await {
        return;
    }
    let (schema, url) = postgres_schema().await;
    let lease = std::time::Duration::from_millis(1_500);
    let a = PostgresStore::open(&url, node("a", 1_500)).await.unwrap();
    let run = running(&a).await;
    let first = a.hold_lease(&run.id, 1);
    let second = a.hold_lease(&run.id, 1);
    let forgotten = running(&a).await;
    let released = running(&a).await;
    drop(a.hold_lease(&released.id, 1));
    drop(first);
    // Claims `expected` (id, attempt) as their leases expire, and holds what it claims.
    async fn claim_expired(
        a: &PostgresStore,
        now_ms: i64,
        expected: Vec<(String, u32)>,
    ) -> Vec<crate::store::LeaseHold> {
        let started = std::time::Instant::now();
        let mut claimed = Vec::new();
        while claimed.len() < expected.len()
            && started.elapsed() < std::time::Duration::from_secs(8)
        {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            claimed.extend((a as &dyn Store).claim_due(now_ms, 10).await.unwrap());
        }
        let holds = claimed
            .iter()
            .map(|r| a.hold_lease(&r.id, r.attempt))
            .collect();
        let mut claimed: Vec<_> = claimed
            .iter()
            .map(|r| (r.id.to_string(), r.attempt))
            .collect();
        claimed.sort();
        let mut expected = expected;
        expected.sort();
        assert_eq!(claimed, expected, "the attempts not held, and only those");
        holds
    }
    let started = std::time::Instant::now();
    let _claimed = claim_expired(
        &a,
        T0 + 1,
        vec![(forgotten.id.to_string(), 2), (released.id.to_string(), 2)],
    )
    .await;
    assert!(
        started.elapsed() > lease / 3,
        "not before the leases expired"
    );
    // Past two more leases, the attempt held once more is still its first, and the newer
    // attempts held are theirs (the holds of their first attempts are gone).
    tokio::time::sleep(2 * lease).await;
    assert!((&a as &dyn Store)
        .claim_due(T0 + 2, 10)
        .await
        .unwrap()
        .is_empty());
    let still = a.get_invocation(&run.id).await.unwrap().unwrap();
    assert_eq!((still.status, still.attempt), (Status::Running, 1));
    // Once its last hold is dropped, it expires too.
    drop(second);
    let last = claim_expired(&a, T0 + 3, vec![(run.id.to_string(), 2)]).await;
    // A hold of an older attempt (its task still ending) does not renew the newer one.
    let _stale = a.hold_lease(&run.id, 1);
    drop(last);
    let _again = claim_expired(&a, T0 + 4, vec![(run.id.to_string(), 3)]).await;
    drop(a);
    drop_schema(&schema).await;
}

/// A node restarted with its id takes back at once the attempts its previous life ran (and
/// those running before leases, which have no owner); another node's stay that node's.
#[tokio::test]
async fn a_restarted_node_recovers_its_own_attempts_and_leaves_another_nodes() {
    if !postgres_or_skip("a_restarted_node_recovers_its_own_attempts_and_leaves_another_nodes")
        .await
    {
        return;
    }
    let (schema, url) = postgres_schema().await;
    let n1 = PostgresStore::open(&url, node("n1", 10_000)).await.unwrap();
    let n2 = PostgresStore::open(&url, node("n2", 10_000)).await.unwrap();
    let mine = running(&n1).await;
    let before_leases = running(&n1).await;
    let theirs = running(&n2).await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::query(
        "UPDATE invocations SET lease_owner = NULL, lease_expires_at_ms = NULL WHERE id = $1",
    )
    .bind(before_leases.id.as_str())
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    drop(n1);

    let n1 = reopen(&url, "n1", 10_000).await;
    assert_eq!(n1.recover_running(T0 + 10).await.unwrap(), 2);
    for id in [&mine.id, &before_leases.id] {
        let record = n1.get_invocation(id).await.unwrap().unwrap();
        assert_eq!(
            (record.status, record.next_run_at_ms),
            (Status::Pending, Some(T0 + 10))
        );
    }
    let other = n1.get_invocation(&theirs.id).await.unwrap().unwrap();
    assert_eq!((other.status, other.attempt), (Status::Running, 1));
    let mut claimed: Vec<_> = (&n1 as &dyn Store)
        .claim_due(T0 + 10, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.id.to_string(), r.attempt))
        .collect();
    claimed.sort();
    let mut expected = vec![(mine.id.to_string(), 2), (before_leases.id.to_string(), 2)];
    expected.sort();
    assert_eq!(claimed, expected);
    // n2's attempt still writes.
    command(
        &n2,
        &theirs,
        EntryKind::Step,
        Some("step"),
        Effect::None,
        T0 + 11,
    )
    .await;
    drop(n1);
    drop(n2);
    drop_schema(&schema).await;
}

/// An open PostgreSQL store holds its leases and follows the database's clock; a SQLite
/// store, which one process uses alone, always holds them and has no clock of its own.
#[tokio::test]
async fn a_node_holds_its_leases_and_follows_the_database_clock() {
    if !postgres_or_skip("a_node_holds_its_leases_and_follows_the_database_clock").await {
        return;
    }
    let (schema, url) = postgres_schema().await;
    let store = PostgresStore::open(&url, NodeOptions::default())
        .await
        .unwrap();
    assert!(store.lease_held());
    let clock = store.database_clock().unwrap();
    let skew = clock.now_ms() - crate::clock::Clock::now_ms(&crate::clock::SystemClock);
    assert!(skew.abs() < 1_000, "{skew} ms from the system clock");
    drop(store);
    drop_schema(&schema).await;

    let (sqlite, _dir) = sqlite(JournalLimits::default()).await;
    assert!(sqlite.lease_held());
    assert!(sqlite.database_clock().is_none());
}

/// The journal limits a behaviour names, or the default ones.
macro_rules! limits {
    () => {
        JournalLimits::default()
    };
    ($limits:expr) => {
        $limits
    };
}

/// Runs each behaviour against both stores: `name` or `name => journal limits`.
macro_rules! conformance {
    ($($name:ident $(=> $limits:expr)?),* $(,)?) => {
        mod sqlite_store {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    let limits = limits!($($limits)?);
                    let (store, _dir) = sqlite(limits).await;
                    super::$name(&*store).await;
                }
            )*
        }
        mod postgres_store {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    if !postgres_or_skip(stringify!($name)).await {
                        return;
                    }
                    let limits = limits!($($limits)?);
                    let (store, schema) = postgres(limits).await;
                    let _schema = SchemaGuard(schema);
                    super::$name(&*store).await;
                    drop(store);
                }
            )*
        }
    };
}

/// A running invocation (attempt 1) of `wf/run`.
async fn running(store: &dyn Store) -> InvocationRecord {
    match create(store, None, T0).await {
        Created::New { record, .. } => record,
        other => panic!("{other:?}"),
    }
}

/// Creates an invocation of `wf/run`, with an idempotency claim if given.
async fn create(store: &dyn Store, idempotency: Option<IdempotencyClaim>, now_ms: i64) -> Created {
    create_with(store, idempotency, None, now_ms).await
}

/// Creates an invocation of `wf/run` with an idempotency claim or a key, if given.
async fn create_with(
    store: &dyn Store,
    idempotency: Option<IdempotencyClaim>,
    key: Option<InvocationKey>,
    now_ms: i64,
) -> Created {
    let new = new_invocation(store, idempotency, key, now_ms).await;
    store.create_invocation(new).await.unwrap()
}

/// A new invocation of `wf/run` with an idempotency claim or a key, if given, its
/// deployment registered.
async fn new_invocation(
    store: &dyn Store,
    idempotency: Option<IdempotencyClaim>,
    key: Option<InvocationKey>,
    now_ms: i64,
) -> NewInvocation {
    let spec = HandlerSpec {
        name: "run".into(),
        path: None,
        retry_policy: None,
        start_to_close: None,
        schedule_to_close: None,
        schedule_to_start: None,
        heartbeat_timeout: None,
        key: None,
    };
    let (deployment, _) = store
        .register_deployment(NewDeployment {
            url: "http://127.0.0.1:1".into(),
            protocol: HandlerProtocol::Sdk { version: 2 },
            services: vec![ServiceSpec {
                name: "wf".into(),
                kind: Default::default(),
                handlers: vec![spec.clone()],
            }],
            now_ms: T0,
            active: true,
        })
        .await
        .unwrap();
    NewInvocation {
        id: InvocationId::generate(),
        target: HandlerTarget {
            deployment_id: deployment.id,
            url: deployment.url,
            protocol: deployment.protocol,
            service: "wf".into(),
            handler: "run".into(),
            spec,
        },
        input: b"null".to_vec(),
        content_type: None,
        idempotency,
        now_ms,
        deadline_ms: None,
        traceparent: None,
        run_now: true,
        key,
    }
}

async fn command(
    store: &dyn Store,
    record: &InvocationRecord,
    kind: EntryKind,
    name: Option<&str>,
    effect: Effect,
    now_ms: i64,
) -> StoredEntry {
    let entry = NewEntry {
        index: None,
        kind,
        name: name.map(str::to_owned),
        value: None,
        content_type: None,
        failure: None,
        token: record.attempt_token.clone(),
        effect,
    };
    store
        .append_entry(&record.id, record.attempt, entry, now_ms)
        .await
        .unwrap()
}

fn signal(name: &str, value: &str, key: Option<&str>) -> NewSignal {
    NewSignal {
        name: name.into(),
        value: value.as_bytes().to_vec(),
        idempotency_key: key.map(str::to_owned),
    }
}

async fn suspend(
    store: &dyn Store,
    record: &InvocationRecord,
    waiting_for: Vec<u32>,
    now_ms: i64,
) -> InvocationRecord {
    let end = AttemptEnd::Suspended {
        until_ms: None,
        waiting_for,
    };
    store
        .end_attempt(&record.id, record.attempt, end, now_ms)
        .await
        .unwrap()
        .0
}

async fn a_timer_is_claimed_when_due_and_not_before_and_fires_once(store: &dyn Store) {
    let record = running(store).await;
    let wake = T0 + 30 * 24 * 3600 * 1000;
    let timer = command(
        store,
        &record,
        EntryKind::Sleep,
        None,
        Effect::Timer { wake_at_ms: wake },
        T0,
    )
    .await;
    assert_eq!(timer.completion, None);
    let suspended = suspend(store, &record, vec![timer.index], T0).await;
    assert_eq!(suspended.status, Status::Suspended);
    assert_eq!(suspended.next_run_at_ms, Some(wake));
    assert_eq!(store.next_due().await.unwrap(), Some(wake));
    assert!(
        store.claim_due(wake - 1, 10).await.unwrap().is_empty(),
        "never early"
    );
    let claimed = store.claim_due(wake + 5, 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].attempt, 2, "the claim started the next attempt");
    assert!(
        store.claim_due(wake + 6, 10).await.unwrap().is_empty(),
        "claimed once"
    );
    let journal = store.read_journal(&record.id).await.unwrap();
    let fired = journal[timer.index as usize].completion.clone().unwrap();
    assert_eq!((fired.seq, fired.at_ms), (1, wake + 5));
    assert_eq!(store.next_due().await.unwrap(), None);
}

async fn a_signal_that_arrives_while_the_attempt_runs_is_not_lost(store: &dyn Store) {
    let record = running(store).await;
    let wait = command(
        store,
        &record,
        EntryKind::Signal,
        Some("approve"),
        Effect::SignalWait {
            take_buffered: true,
        },
        T0,
    )
    .await;
    // The signal lands between the wait and the suspension.
    let sent = store
        .send_signal(&record.id, signal("approve", "1", None), T0 + 1)
        .await
        .unwrap();
    assert!(!sent.woke, "the attempt still runs");
    let suspended = suspend(store, &record, vec![wait.index], T0 + 2).await;
    assert_eq!(
        suspended.next_run_at_ms,
        Some(T0 + 2),
        "due at once: the signal is there"
    );
    let claimed = store.claim_due(T0 + 2, 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
}

async fn signals_are_buffered_delivered_in_order_once_and_wake_their_wait(store: &dyn Store) {
    let record = running(store).await;
    for (value, key) in [("1", "k1"), ("2", "k2"), ("1", "k1")] {
        store
            .send_signal(&record.id, signal("step", value, Some(key)), T0)
            .await
            .unwrap();
    }
    // Two buffered (the third was a retry); the first wait takes the first.
    let first = command(
        store,
        &record,
        EntryKind::Signal,
        Some("step"),
        Effect::SignalWait {
            take_buffered: true,
        },
        T0,
    )
    .await;
    assert_eq!(first.completion.unwrap().value, Some(b"1".to_vec()));
    let second = command(
        store,
        &record,
        EntryKind::Signal,
        Some("step"),
        Effect::SignalWait {
            take_buffered: true,
        },
        T0,
    )
    .await;
    assert_eq!(second.completion.unwrap().value, Some(b"2".to_vec()));
    let third = command(
        store,
        &record,
        EntryKind::Signal,
        Some("step"),
        Effect::SignalWait {
            take_buffered: true,
        },
        T0,
    )
    .await;
    assert_eq!(third.completion, None, "nothing left in the buffer");
    let suspended = suspend(store, &record, vec![third.index], T0).await;
    assert_eq!(suspended.next_run_at_ms, None, "nothing to wake it yet");
    let sent = store
        .send_signal(&record.id, signal("step", "3", None), T0 + 9)
        .await
        .unwrap();
    assert!(sent.woke);
    let again = store.get_invocation(&record.id).await.unwrap().unwrap();
    assert_eq!(again.next_run_at_ms, Some(T0 + 9));
}

async fn an_awakeable_completes_once_and_an_ended_invocation_takes_nothing(store: &dyn Store) {
    let record = running(store).await;
    let awakeable = command(store, &record, EntryKind::Awakeable, None, Effect::None, T0).await;
    suspend(store, &record, vec![awakeable.index], T0).await;
    let first = store
        .resolve_awakeable(&record.id, awakeable.index, Ok(b"\"yes\"".to_vec()), T0 + 1)
        .await
        .unwrap();
    assert!(first.first && first.woke);
    let second = store
        .resolve_awakeable(
            &record.id,
            awakeable.index,
            Err(durin_protocol::Failure {
                status: 500,
                error_type: None,
                message: "no".into(),
            }),
            T0 + 2,
        )
        .await
        .unwrap();
    assert!(!second.first);
    assert_eq!(
        second.completion, first.completion,
        "the first result stands"
    );
    let claimed = store.claim_due(T0 + 1, 10).await.unwrap().remove(0);
    store
        .end_attempt(
            &record.id,
            claimed.attempt,
            AttemptEnd::Completed {
                output: b"1".to_vec(),
                content_type: None,
            },
            T0 + 3,
        )
        .await
        .unwrap();
    let late = store
        .send_signal(&record.id, signal("x", "1", None), T0 + 4)
        .await;
    assert!(matches!(late, Err(StoreError::Ended { .. })), "{late:?}");
    // A valid entry index that is not an awakeable is no awakeable.
    let wrong = store
        .resolve_awakeable(&record.id, 0, Ok(b"1".to_vec()), T0)
        .await;
    assert!(matches!(wrong, Err(StoreError::NotFound(_))));
}

async fn an_attempt_cut_short_by_a_crash_is_due_again_at_start(store: &dyn Store) {
    let record = running(store).await;
    assert!(
        store.claim_due(T0 + 10, 10).await.unwrap().is_empty(),
        "running is not due"
    );
    assert_eq!(store.recover_running(T0 + 10).await.unwrap(), 1);
    let claimed = store.claim_due(T0 + 10, 10).await.unwrap();
    assert_eq!(
        claimed[0].attempt,
        record.attempt + 1,
        "the next attempt fences the lost one"
    );
}

async fn a_wait_that_lost_a_race_takes_no_later_signal(store: &dyn Store) {
    let record = running(store).await;
    let lost = command(
        store,
        &record,
        EntryKind::Signal,
        Some("x"),
        Effect::SignalWait {
            take_buffered: true,
        },
        T0,
    )
    .await;
    let timer = command(
        store,
        &record,
        EntryKind::Sleep,
        None,
        Effect::Timer {
            wake_at_ms: T0 + 10,
        },
        T0,
    )
    .await;
    suspend(store, &record, vec![lost.index, timer.index], T0).await;
    // The timer wins; the next attempt waits for x again with a new wait.
    let next = store.claim_due(T0 + 10, 10).await.unwrap().remove(0);
    let again = command(
        store,
        &next,
        EntryKind::Signal,
        Some("x"),
        Effect::SignalWait {
            take_buffered: true,
        },
        T0 + 11,
    )
    .await;
    suspend(store, &next, vec![again.index], T0 + 11).await;
    let sent = store
        .send_signal(&record.id, signal("x", "1", None), T0 + 12)
        .await
        .unwrap();
    assert!(sent.woke, "the wait someone waits for took it");
    let journal = store.read_journal(&record.id).await.unwrap();
    assert_eq!(
        journal[lost.index as usize].completion, None,
        "the lost wait took nothing"
    );
    assert_eq!(
        journal[again.index as usize]
            .completion
            .as_ref()
            .unwrap()
            .value,
        Some(b"1".to_vec())
    );
}

async fn a_wait_gets_only_its_first_event_and_later_signals_stay_buffered(store: &dyn Store) {
    let record = running(store).await;
    let wait = command(
        store,
        &record,
        EntryKind::Signal,
        Some("x"),
        Effect::SignalWait {
            take_buffered: true,
        },
        T0,
    )
    .await;
    let timer = command(
        store,
        &record,
        EntryKind::Sleep,
        None,
        Effect::Timer {
            wake_at_ms: T0 + 10,
        },
        T0,
    )
    .await;
    suspend(store, &record, vec![wait.index, timer.index], T0).await;
    // The deadline passed at T0 + 10; the signal comes at T0 + 50, before any claim: the
    // deadline won, and the signal waits for the next wait.
    let sent = store
        .send_signal(&record.id, signal("x", "1", None), T0 + 50)
        .await
        .unwrap();
    assert!(!sent.woke);
    let next = store.claim_due(T0 + 60, 10).await.unwrap().remove(0);
    let journal = store.read_journal(&record.id).await.unwrap();
    assert!(
        journal[timer.index as usize].completion.is_some(),
        "the deadline fired"
    );
    assert_eq!(
        journal[wait.index as usize].completion, None,
        "the lost wait took nothing"
    );
    let again = command(
        store,
        &next,
        EntryKind::Signal,
        Some("x"),
        Effect::SignalWait {
            take_buffered: true,
        },
        T0 + 61,
    )
    .await;
    assert_eq!(again.completion.unwrap().value, Some(b"1".to_vec()));
}

async fn a_suspension_takes_the_signal_that_arrived_first(store: &dyn Store) {
    let record = running(store).await;
    let a = command(
        store,
        &record,
        EntryKind::Signal,
        Some("a"),
        Effect::SignalWait {
            take_buffered: true,
        },
        T0,
    )
    .await;
    let b = command(
        store,
        &record,
        EntryKind::Signal,
        Some("b"),
        Effect::SignalWait {
            take_buffered: true,
        },
        T0,
    )
    .await;
    // While the attempt runs, b arrives, then a.
    store
        .send_signal(&record.id, signal("b", "1", None), T0 + 1)
        .await
        .unwrap();
    store
        .send_signal(&record.id, signal("a", "2", None), T0 + 2)
        .await
        .unwrap();
    suspend(store, &record, vec![a.index, b.index], T0 + 3).await;
    let journal = store.read_journal(&record.id).await.unwrap();
    assert!(
        journal[b.index as usize].completion.is_some(),
        "b came first"
    );
    assert_eq!(
        journal[a.index as usize].completion, None,
        "a stays buffered"
    );
}

/// A step `charge` of `record`'s running attempt at `index`, valued `value`.
fn charge(record: &InvocationRecord, index: u32, value: &str) -> NewEntry {
    NewEntry {
        index: Some(index),
        kind: EntryKind::Step,
        name: Some("charge".into()),
        value: Some(value.as_bytes().to_vec()),
        content_type: None,
        failure: None,
        token: record.attempt_token.clone(),
        effect: Effect::None,
    }
}

async fn the_same_append_sent_again_answers_the_recorded_entry(store: &dyn Store) {
    let record = running(store).await;
    let step = |value: &str| charge(&record, 1, value);
    let first = store
        .append_entry(&record.id, 1, step("1"), T0)
        .await
        .unwrap();
    // The answer was lost; the SDK sends the same append again.
    let again = store
        .append_entry(&record.id, 1, step("1"), T0 + 5)
        .await
        .unwrap();
    assert_eq!(again, first);
    assert_eq!(store.read_journal(&record.id).await.unwrap().len(), 2);
    // Another value at a taken index is still refused.
    let other = store.append_entry(&record.id, 1, step("2"), T0 + 6).await;
    assert!(
        matches!(other, Err(StoreError::IndexMismatch { .. })),
        "{other:?}"
    );
}

/// Many invocations created and written at once (on PostgreSQL, the rows of a batch's
/// writes go in one statement per kind): each gets its own rows, once, and the appends of
/// one invocation keep their order.
async fn writes_of_many_invocations_at_once_each_land_once(store: &dyn Store) {
    let created = futures_util::future::join_all((0..32).map(|_| create(store, None, T0))).await;
    let records: Vec<InvocationRecord> = created
        .into_iter()
        .map(|created| match created {
            Created::New { record, .. } => record,
            other => panic!("{other:?}"),
        })
        .collect();
    for record in &records {
        assert_eq!(record.status, Status::Running);
        assert_eq!(record.attempt, 1);
        let journal = store.read_journal(&record.id).await.unwrap();
        assert_eq!(journal.len(), 1, "the input entry of {}", record.id);
    }
    // Invocation 0 takes eight appends at any free index, sent at once; every other one
    // two appends in turn.
    let first = &records[0];
    let anywhere = (0..8).map(|i| {
        let entry = NewEntry {
            index: None,
            ..charge(first, 1, &format!("any{i}"))
        };
        async move { store.append_entry(&first.id, 1, entry, T0).await }
    });
    let in_turn = records[1..].iter().map(|record| async move {
        let a = store.append_entry(&record.id, 1, charge(record, 1, "a"), T0);
        let a = a.await.unwrap();
        let b = store.append_entry(&record.id, 1, charge(record, 2, "bb"), T0);
        (a.index, b.await.unwrap().index)
    });
    let (anywhere, in_turn) = futures_util::future::join(
        futures_util::future::join_all(anywhere),
        futures_util::future::join_all(in_turn),
    )
    .await;
    let mut indexes: Vec<u32> = anywhere.into_iter().map(|e| e.unwrap().index).collect();
    indexes.sort_unstable();
    assert_eq!(indexes, (1..=8).collect::<Vec<u32>>());
    let journal = store.read_journal(&first.id).await.unwrap();
    assert_eq!(journal.len(), 9);
    let mut values: Vec<String> = journal[1..]
        .iter()
        .map(|e| String::from_utf8(e.value.clone().unwrap()).unwrap())
        .collect();
    values.sort();
    assert_eq!(
        values,
        (0..8).map(|i| format!("any{i}")).collect::<Vec<_>>()
    );
    for (record, indexes) in records[1..].iter().zip(in_turn) {
        assert_eq!(indexes, (1, 2));
        let journal = store.read_journal(&record.id).await.unwrap();
        let values: Vec<Option<&[u8]>> = journal.iter().map(|e| e.value.as_deref()).collect();
        assert_eq!(values[1..], [Some(b"a".as_slice()), Some(b"bb".as_slice())]);
        let now = store.get_invocation(&record.id).await.unwrap().unwrap();
        assert_eq!(now.journal_len, 3);
        assert_eq!(now.journal_bytes, record.journal_bytes + 2 * 6 + 3);
    }
    // They all complete at once, the last step with the output; one end comes from a
    // stale attempt and is refused without taking its neighbours with it.
    let ends = records[1..]
        .iter()
        .enumerate()
        .map(|(i, record)| async move {
            let attempt = if i == 5 { 7 } else { 1 };
            let last = vec![charge(record, 3, "c")];
            let output = completed(&format!("done{i}"));
            store
                .end_attempt_after(&record.id, attempt, last, output, T0 + 1)
                .await
        });
    let ends = futures_util::future::join_all(ends).await;
    for (i, (record, ended)) in records[1..].iter().zip(ends).enumerate() {
        let journal = store.read_journal(&record.id).await.unwrap();
        let now = store.get_invocation(&record.id).await.unwrap().unwrap();
        if i == 5 {
            assert!(matches!(ended, Err(StoreError::Fenced { .. })), "{ended:?}");
            assert_eq!((now.status, journal.len()), (Status::Running, 3));
            continue;
        }
        let (ended, output, _) = ended.unwrap();
        assert_eq!(ended.status, Status::Completed);
        assert_eq!(now.status, Status::Completed);
        assert_eq!((now.journal_len, journal.len()), (5, 5));
        assert_eq!(journal[3].value.as_deref(), Some(b"c".as_slice()));
        assert_eq!(journal[4].kind, EntryKind::Output);
        let expected = format!("done{i}");
        assert_eq!(journal[4].value.as_deref(), Some(expected.as_bytes()));
        assert_eq!(output.map(|o| o.index), Some(4));
    }
    // Sixteen creations with one idempotency key at once make one invocation.
    let claim = || IdempotencyClaim {
        scope: "wf/run".into(),
        key: "at-once".into(),
        request_digest: "d".into(),
        retention_ms: 60_000,
    };
    let created =
        futures_util::future::join_all((0..16).map(|_| create(store, Some(claim()), T0))).await;
    let new: Vec<&InvocationRecord> = created
        .iter()
        .filter_map(|c| match c {
            Created::New { record, .. } => Some(record),
            _ => None,
        })
        .collect();
    assert_eq!(new.len(), 1, "{created:?}");
    for created in &created {
        match created {
            Created::New { .. } => {}
            Created::Existing(record) => assert_eq!(record.id, new[0].id),
            other => panic!("{other:?}"),
        }
    }
}

/// Creations, appends and ends of distinct invocations sent at once (one batch, side by
/// side on PostgreSQL) each land once, with their own answers; a stale append among them is
/// refused alone.
async fn creations_appends_and_ends_at_once_each_land_once(store: &dyn Store) {
    let mut records = Vec::new();
    for _ in 0..9 {
        records.push(running(store).await);
    }
    let mut new = Vec::new();
    for _ in 0..8 {
        new.push(new_invocation(store, None, None, T0).await);
    }
    let creations = futures_util::future::join_all(
        new.into_iter()
            .map(|new| async move { store.create_invocation(new).await.unwrap() }),
    );
    let appends = futures_util::future::join_all(
        records[..4]
            .iter()
            .map(|record| store.append_entry(&record.id, 1, charge(record, 1, "a"), T0)),
    );
    let ends =
        futures_util::future::join_all(records[4..8].iter().enumerate().map(|(i, record)| {
            // Two ends with a last step (an append's row, then the completion's), two
            // without.
            let last = if i < 2 {
                vec![charge(record, 1, "b")]
            } else {
                Vec::new()
            };
            store.end_attempt_after(&record.id, 1, last, completed(&format!("out{i}")), T0 + 1)
        }));
    let stale = store.append_entry(&records[8].id, 7, charge(&records[8], 1, "x"), T0);
    let (created, appended, ended, stale) = futures_util::join!(creations, appends, ends, stale);
    let mut ids = std::collections::HashSet::new();
    for created in created {
        let Created::New { record, .. } = created else {
            panic!("{created:?}")
        };
        assert_eq!((record.status, record.journal_len), (Status::Running, 1));
        assert_eq!(store.read_journal(&record.id).await.unwrap().len(), 1);
        assert!(ids.insert(record.id));
    }
    assert_eq!(ids.len(), 8);
    for (record, appended) in records[..4].iter().zip(appended) {
        assert_eq!(appended.unwrap().index, 1);
        let journal = store.read_journal(&record.id).await.unwrap();
        assert_eq!(journal[1].value.as_deref(), Some(b"a".as_slice()));
        let now = store.get_invocation(&record.id).await.unwrap().unwrap();
        assert_eq!((now.status, now.journal_len), (Status::Running, 2));
    }
    for (i, (record, ended)) in records[4..8].iter().zip(ended).enumerate() {
        let (ended, output, _) = ended.unwrap();
        assert_eq!(ended.status, Status::Completed);
        let at = if i < 2 { 2 } else { 1 };
        assert_eq!(output.map(|o| o.index), Some(at));
        let journal = store.read_journal(&record.id).await.unwrap();
        assert_eq!(journal.len(), at as usize + 1);
        if i < 2 {
            assert_eq!(journal[1].value.as_deref(), Some(b"b".as_slice()));
        }
        let expected = format!("out{i}");
        assert_eq!(
            journal[at as usize].value.as_deref(),
            Some(expected.as_bytes())
        );
    }
    assert!(matches!(stale, Err(StoreError::Fenced { .. })), "{stale:?}");
    let journal = store.read_journal(&records[8].id).await.unwrap();
    assert_eq!(journal.len(), 1);
}

/// Writes refused in the middle of a busy moment (stale attempts, a wrong index) write
/// nothing and leave every other write of their transaction: on PostgreSQL, a batch of
/// appends that fails without savepoints is run again with one per write.
async fn refused_writes_leave_their_neighbours_in_the_batch(store: &dyn Store) {
    let mut records = Vec::new();
    for _ in 0..24 {
        records.push(running(store).await);
    }
    let writes = records.iter().enumerate().map(|(i, record)| async move {
        match i % 3 {
            // A stale attempt.
            0 => {
                store
                    .append_entry(&record.id, 7, charge(record, 1, "x"), T0)
                    .await
            }
            // A gap in the journal.
            1 => {
                store
                    .append_entry(&record.id, 1, charge(record, 5, "x"), T0)
                    .await
            }
            _ => {
                store
                    .append_entry(&record.id, 1, charge(record, 1, "ok"), T0)
                    .await
            }
        }
    });
    let answers = futures_util::future::join_all(writes).await;
    for (i, (record, answer)) in records.iter().zip(answers).enumerate() {
        let journal = store.read_journal(&record.id).await.unwrap();
        match i % 3 {
            0 => assert!(
                matches!(answer, Err(StoreError::Fenced { .. })),
                "{answer:?}"
            ),
            1 => assert!(
                matches!(answer, Err(StoreError::IndexMismatch { .. })),
                "{answer:?}"
            ),
            _ => {
                assert_eq!(answer.unwrap().index, 1);
                assert_eq!(journal[1].value.as_deref(), Some(b"ok".as_slice()));
            }
        }
        let expected = if i % 3 == 2 { 2 } else { 1 };
        assert_eq!(journal.len(), expected, "invocation {i}");
        let now = store.get_invocation(&record.id).await.unwrap().unwrap();
        assert_eq!(now.journal_len as usize, expected, "invocation {i}");
    }
}

/// A rule that writes and then refuses writes nothing, alone in its transaction or beside
/// others in a busy moment, whether it runs once or may run again; the writes beside it
/// stay.
async fn a_rule_that_refuses_after_writing_writes_nothing(store: &dyn Store) {
    let refused = running(store).await;
    fn refuse(
        id: String,
    ) -> impl for<'t> Fn(
        &'t mut dyn tables::Tx,
    ) -> futures_util::future::BoxFuture<'t, StoreResult<()>>
           + Send
           + Sync
           + 'static {
        move |tx| {
            let id = id.clone();
            Box::pin(async move {
                tx.add_bytes(&id, 1000).await?;
                Err(StoreError::NotFound(format!("{id} (refused on purpose)")))
            })
        }
    }
    let id = refused.id.as_str().to_owned();
    let before = store
        .get_invocation(&refused.id)
        .await
        .unwrap()
        .unwrap()
        .journal_bytes;
    // Alone.
    let once = store.write(&id, refuse(id.clone())).await;
    assert!(matches!(once, Err(StoreError::NotFound(_))), "{once:?}");
    let repeatable = store.write_repeatable(&id, refuse(id.clone())).await;
    assert!(
        matches!(repeatable, Err(StoreError::NotFound(_))),
        "{repeatable:?}"
    );
    // Beside appends of other invocations.
    let mut others = Vec::new();
    for _ in 0..12 {
        others.push(running(store).await);
    }
    let writes = others.iter().enumerate().map(|(i, record)| {
        let id = id.clone();
        async move {
            let refused = match i % 3 {
                0 => store.write(&id, refuse(id.clone())).await,
                1 => store.write_repeatable(&id, refuse(id.clone())).await,
                _ => Ok(()),
            };
            assert!(matches!(refused, Err(StoreError::NotFound(_)) | Ok(())));
            store
                .append_entry(&record.id, 1, charge(record, 1, "ok"), T0)
                .await
        }
    });
    for appended in futures_util::future::join_all(writes).await {
        assert_eq!(appended.unwrap().index, 1);
    }
    let after = store
        .get_invocation(&refused.id)
        .await
        .unwrap()
        .unwrap()
        .journal_bytes;
    assert_eq!(after, before, "nothing of the refusing rules was written");
    for record in &others {
        assert_eq!(store.read_journal(&record.id).await.unwrap().len(), 2);
    }
}

async fn an_idempotency_key_lasts_while_its_invocation_runs_and_its_retention_after(
    store: &dyn Store,
) {
    let day = 24 * 3600 * 1000;
    let claim = || IdempotencyClaim {
        scope: "wf/run".into(),
        key: "k".into(),
        request_digest: "d".into(),
        retention_ms: day,
    };
    let Created::New { record, .. } = create(store, Some(claim()), T0).await else {
        panic!("not new")
    };
    // Ten days of sleeping or backing off later, the key still names the same invocation.
    let later = T0 + 10 * day;
    assert_eq!(store.purge_idempotency_keys(later).await.unwrap(), 0);
    assert!(
        matches!(create(store, Some(claim()), later).await, Created::Existing(r) if r.id == record.id)
    );
    let end = AttemptEnd::Completed {
        output: b"1".to_vec(),
        content_type: None,
    };
    store.end_attempt(&record.id, 1, end, later).await.unwrap();
    // The retention counts from the end.
    assert!(matches!(
        create(store, Some(claim()), later + day - 1).await,
        Created::Existing(_)
    ));
    assert_eq!(
        store.purge_idempotency_keys(later + day - 1).await.unwrap(),
        0
    );
    assert_eq!(store.purge_idempotency_keys(later + day).await.unwrap(), 1);
    assert!(matches!(
        create(store, Some(claim()), later + day).await,
        Created::New { .. }
    ));
}

async fn ended_invocations_are_purged_after_their_retention_with_all_they_kept(store: &dyn Store) {
    let record = running(store).await;
    let state = NewEntry {
        index: None,
        kind: EntryKind::State,
        name: Some("k".into()),
        value: Some(br#"{"set":1}"#.to_vec()),
        content_type: None,
        failure: None,
        token: record.attempt_token.clone(),
        effect: Effect::State {
            key: "k".into(),
            value: Some(b"1".to_vec()),
        },
    };
    store.append_entry(&record.id, 1, state, T0).await.unwrap();
    let still_running = running(store).await;
    let end = AttemptEnd::Completed {
        output: b"1".to_vec(),
        content_type: None,
    };
    store
        .end_attempt(&record.id, 1, end, T0 + 10)
        .await
        .unwrap();
    assert_eq!(
        store.purge_ended(T0 + 10, 100).await.unwrap(),
        0,
        "not before"
    );
    assert_eq!(store.purge_ended(T0 + 11, 100).await.unwrap(), 1);
    assert!(store.get_invocation(&record.id).await.unwrap().is_none());
    assert!(store.read_journal(&record.id).await.unwrap().is_empty());
    assert!(store.read_state(&record.id).await.unwrap().is_empty());
    // A running invocation is never purged.
    assert_eq!(store.purge_ended(i64::MAX, 100).await.unwrap(), 0);
    assert!(store
        .get_invocation(&still_running.id)
        .await
        .unwrap()
        .is_some());
}

async fn a_journal_past_its_limits_takes_no_more_entries(store: &dyn Store) {
    let record = running(store).await;
    let step = |name: &str, value: Vec<u8>| NewEntry {
        index: None,
        kind: EntryKind::Step,
        name: Some(name.into()),
        value: Some(value),
        content_type: None,
        failure: None,
        token: record.attempt_token.clone(),
        effect: Effect::None,
    };
    // The input is entry 0: two more fit.
    store
        .append_entry(&record.id, 1, step("a", b"1".to_vec()), T0)
        .await
        .unwrap();
    let big = store
        .append_entry(&record.id, 1, step("b", vec![b'x'; 2_000]), T0)
        .await;
    assert!(
        matches!(big, Err(StoreError::JournalFull { .. })),
        "{big:?}"
    );
    store
        .append_entry(&record.id, 1, step("c", b"2".to_vec()), T0)
        .await
        .unwrap();
    let full = store
        .append_entry(&record.id, 1, step("d", b"3".to_vec()), T0)
        .await;
    assert!(
        matches!(full, Err(StoreError::JournalFull { .. })),
        "{full:?}"
    );
    let now = store.get_invocation(&record.id).await.unwrap().unwrap();
    assert_eq!(now.journal_len, 3, "refused appends wrote nothing");
    assert!(JournalLimits {
        max_entries: 3,
        max_bytes: 1_000
    }
    .warning(now.journal_len, now.journal_bytes)
    .is_some());
}

async fn a_crash_does_not_use_the_budget_of_the_step_that_comes_next(store: &dyn Store) {
    let record = running(store).await;
    let back_off = |charged| AttemptEnd::BackOff {
        until_ms: T0,
        error: "boom".into(),
        charged,
    };
    // A step failed, then the handler crashed, then the gateway's store failed.
    let (after_step, _, _) = store
        .end_attempt(&record.id, 1, back_off(Charge::Step), T0)
        .await
        .unwrap();
    assert_eq!((after_step.position_failures, after_step.failures), (1, 0));
    let second = store.claim_due(T0, 10).await.unwrap().remove(0);
    let (after_crash, _, _) = store
        .end_attempt(&record.id, second.attempt, back_off(Charge::Handler), T0)
        .await
        .unwrap();
    assert_eq!(
        (after_crash.position_failures, after_crash.failures),
        (1, 1)
    );
    let third = store.claim_due(T0, 10).await.unwrap().remove(0);
    let (after_store, _, _) = store
        .end_attempt(&record.id, third.attempt, back_off(Charge::Nobody), T0)
        .await
        .unwrap();
    assert_eq!(
        (after_store.position_failures, after_store.failures),
        (1, 1)
    );
}

/// Runs the current attempt of `record` to its end: a `ship` step, then its output.
async fn ship_and_complete(store: &dyn Store, record: &InvocationRecord, now_ms: i64) {
    command(
        store,
        record,
        EntryKind::Step,
        Some("ship"),
        Effect::None,
        now_ms,
    )
    .await;
    let end = AttemptEnd::Completed {
        output: b"1".to_vec(),
        content_type: None,
    };
    let (ended, _, _) = store
        .end_attempt(&record.id, record.attempt, end, now_ms)
        .await
        .unwrap();
    assert_eq!((ended.status, ended.journal_len), (Status::Completed, 4));
}

/// A restart sent again with its `Idempotency-Key` (its answer was lost) changes nothing,
/// while the invocation runs again and after it ended again; a restart with another key,
/// or none, restarts it again, and a refused one does not take the key.
async fn a_restart_sent_again_with_its_key_changes_nothing(store: &dyn Store) {
    let record = running(store).await;
    command(
        store,
        &record,
        EntryKind::Step,
        Some("charge"),
        Effect::None,
        T0,
    )
    .await;
    ship_and_complete(store, &record, T0).await;
    let restart = |key: Option<&str>, now_ms: i64| {
        store.restart(&record.id, 1, key.map(str::to_owned), now_ms)
    };
    // Claims the restarted run's attempt and runs it to its end.
    let run_again = |now_ms: i64| async move {
        let claimed = store.claim_due(now_ms, 10).await.unwrap();
        assert_eq!(claimed.len(), 1, "{claimed:?}");
        ship_and_complete(store, &claimed[0], now_ms).await;
    };

    let (restarted, changed) = restart(Some("r-1"), T0 + 1).await.unwrap().unwrap();
    assert!(changed);
    assert_eq!(
        (restarted.status, restarted.journal_len),
        (Status::Pending, 2)
    );
    // Sent again while it waits to run: unchanged, where a new restart is refused (and
    // does not take the key of the last one).
    let (again, changed) = restart(Some("r-1"), T0 + 2).await.unwrap().unwrap();
    assert!(!changed);
    assert_eq!(
        (again.status, again.modified_at_ms),
        (Status::Pending, T0 + 1)
    );
    assert!(restart(Some("r-other"), T0 + 2).await.unwrap().is_err());
    assert!(restart(None, T0 + 2).await.unwrap().is_err());
    let (_, changed) = restart(Some("r-1"), T0 + 2).await.unwrap().unwrap();
    assert!(!changed);

    // Sent again once it ran to its end again: still nothing changes.
    run_again(T0 + 3).await;
    let (again, changed) = restart(Some("r-1"), T0 + 4).await.unwrap().unwrap();
    assert!(!changed);
    assert_eq!((again.status, again.journal_len), (Status::Completed, 4));
    assert_eq!(store.read_journal(&record.id).await.unwrap().len(), 4);
    assert!(store.claim_due(T0 + 5, 10).await.unwrap().is_empty());

    // A new key restarts it again; so does a restart without a key, which forgets the
    // last key, so that the same key then restarts it once more.
    for key in [Some("r-2"), None, Some("r-2")] {
        let (restarted, changed) = restart(key, T0 + 6).await.unwrap().unwrap();
        assert!(changed, "{key:?}");
        assert_eq!(
            (restarted.status, restarted.journal_len),
            (Status::Pending, 2)
        );
        run_again(T0 + 7).await;
    }
}

/// The handler of `wf/run` in a fresh deployment.
async fn target(store: &dyn Store) -> HandlerTarget {
    if let Created::New { record, .. } = create(store, None, T0).await {
        // The invocation `create` made is not used.
        store
            .terminate(&record.id, "unused".into(), T0)
            .await
            .unwrap();
    }
    store.latest_handler("wf", "run").await.unwrap().unwrap()
}

/// Starts workflow `wf` id `workflow_id` (with signal-with-start when `signal` is given).
async fn start(
    store: &dyn Store,
    workflow_id: &str,
    signal: Option<NewSignal>,
    now_ms: i64,
) -> WorkflowStarted {
    let target = store.latest_handler("wf", "run").await.unwrap().unwrap();
    store
        .start_workflow(NewWorkflowRun {
            invocation: NewInvocation {
                id: InvocationId::generate(),
                target,
                input: b"{}".to_vec(),
                content_type: None,
                idempotency: None,
                now_ms,
                deadline_ms: None,
                traceparent: None,
                run_now: true,
                key: None,
            },
            workflow_id: workflow_id.into(),
            input_digest: "d".into(),
            new_run_after_end: true,
            signal,
        })
        .await
        .unwrap()
}

fn started(started: WorkflowStarted) -> InvocationRecord {
    match started {
        WorkflowStarted::New { record, .. } => record,
        other => panic!("{other:?}"),
    }
}

/// A wait for signal `name` that takes a buffered one.
async fn wait_for(
    store: &dyn Store,
    record: &InvocationRecord,
    name: &str,
    now_ms: i64,
) -> StoredEntry {
    command(
        store,
        record,
        EntryKind::Signal,
        Some(name),
        Effect::SignalWait {
            take_buffered: true,
        },
        now_ms,
    )
    .await
}

async fn end(
    store: &dyn Store,
    record: &InvocationRecord,
    end: AttemptEnd,
    now_ms: i64,
) -> InvocationRecord {
    store
        .end_attempt(&record.id, record.attempt, end, now_ms)
        .await
        .unwrap()
        .0
}

fn completed(output: &str) -> AttemptEnd {
    AttemptEnd::Completed {
        output: output.as_bytes().to_vec(),
        content_type: None,
    }
}

fn continued(next: &InvocationId) -> AttemptEnd {
    AttemptEnd::ContinuedAsNew {
        input: b"{}".to_vec(),
        next: next.clone(),
        target: None,
        deadline_ms: None,
    }
}

/// Claims the one invocation due at `now_ms`.
/// The ids of what claims at each of `times` started, in the order they started.
async fn claimed_at(store: &dyn Store, times: &[i64]) -> Vec<InvocationId> {
    let mut claimed = Vec::new();
    for at in times {
        let records = store.claim_due(*at, 10).await.unwrap();
        claimed.extend(records.into_iter().map(|r| r.id));
    }
    claimed
}

async fn claim_one(store: &dyn Store, now_ms: i64) -> InvocationRecord {
    let mut claimed = store.claim_due(now_ms, 10).await.unwrap();
    assert_eq!(claimed.len(), 1, "{claimed:?}");
    claimed.remove(0)
}

/// A signal that came during a run's last attempt and that no wait took is never dropped
/// by the run's completion: the run runs again, once, and its next attempt takes it.
async fn a_run_does_not_complete_over_a_signal_that_came_while_it_ran(store: &dyn Store) {
    target(store).await;
    let run = started(start(store, "w1", None, T0).await);
    store
        .send_signal(&run.id, signal("go", "1", Some("k1")), T0 + 1)
        .await
        .unwrap();
    let deferred = end(store, &run, completed("early"), T0 + 2).await;
    assert_eq!(deferred.status, Status::BackingOff, "{deferred:?}");
    assert_eq!(deferred.next_run_at_ms, Some(T0 + 2));
    assert!(
        deferred
            .last_error
            .as_deref()
            .unwrap_or_default()
            .contains("\"go\""),
        "{deferred:?}"
    );
    assert_eq!(deferred.failures, 0, "a deferral is charged to nobody");
    let again = claim_one(store, T0 + 3).await;
    let wait = wait_for(store, &again, "go", T0 + 3).await;
    assert_eq!(wait.completion.unwrap().value.as_deref(), Some(&b"1"[..]));
    // Another signal during this attempt holds its end once more; the next attempt, which
    // could take it and does not, completes (the signal stays unconsumed, never dropped
    // silently).
    store
        .send_signal(&run.id, signal("later", "2", None), T0 + 4)
        .await
        .unwrap();
    let held = end(store, &again, completed("a"), T0 + 5).await;
    assert_eq!(held.status, Status::BackingOff);
    let third = claim_one(store, T0 + 6).await;
    let done = end(store, &third, completed("done"), T0 + 7).await;
    assert_eq!(done.status, Status::Completed);
}

/// At continue-as-new, the signals the run did not consume move to the next run in order
/// with their keys; a signal sent to the old run goes to the next one; a key is unique
/// per workflow id across its runs.
async fn continue_as_new_hands_unconsumed_signals_and_keys_to_the_next_run(store: &dyn Store) {
    target(store).await;
    let first = started(start(store, "w2", None, T0).await);
    for (value, key) in [("1", "k1"), ("2", "k2"), ("3", "k3")] {
        store
            .send_signal(&first.id, signal("add", value, Some(key)), T0 + 1)
            .await
            .unwrap();
    }
    let taken = wait_for(store, &first, "add", T0 + 2).await;
    assert_eq!(taken.completion.unwrap().value.as_deref(), Some(&b"1"[..]));
    let next = InvocationId::generate();
    let ended = end(store, &first, continued(&next), T0 + 3).await;
    assert_eq!(ended.status, Status::Continued);
    let named = store.find_workflow("wf", "w2").await.unwrap().unwrap();
    assert_eq!(named.id, next);
    // Sent again, each key is known, whichever run holds it now.
    for key in ["k1", "k2", "k3"] {
        let again = store
            .send_signal(&first.id, signal("add", "x", Some(key)), T0 + 4)
            .await
            .unwrap();
        assert!(again.duplicate, "{key}");
    }
    // A new signal to the run that continued goes to the next run.
    let sent = store
        .send_signal(&first.id, signal("add", "4", Some("k4")), T0 + 4)
        .await
        .unwrap();
    assert!(!sent.duplicate);
    let second = claim_one(store, T0 + 5).await;
    assert_eq!(second.id, next);
    let mut values = Vec::new();
    for i in 0..3 {
        let wait = wait_for(store, &second, "add", T0 + 6 + i).await;
        values.push(wait.completion.map(|c| c.value.unwrap_or_default()));
    }
    assert_eq!(
        values,
        [
            Some(b"2".to_vec()),
            Some(b"3".to_vec()),
            Some(b"4".to_vec())
        ]
    );
    let done = end(store, &second, completed("{}"), T0 + 9).await;
    assert_eq!(done.status, Status::Completed);
    // The old run keeps nothing unconsumed.
    let runs = store.workflow_runs("wf", "w2").await.unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(
        runs.iter()
            .filter(|r| r.status != Status::Continued)
            .count(),
        1
    );
}

/// A `call` of the child workflow `wf` id `workflow_id` (invocation `id`), by the attempt
/// holding `token` (`None`: a writer inside the gateway).
fn child_call(
    target: &HandlerTarget,
    id: &InvocationId,
    workflow_id: &str,
    token: Option<String>,
    parent_close: ParentClose,
) -> NewEntry {
    NewEntry {
        index: None,
        kind: EntryKind::Call,
        name: Some("wf/run".into()),
        value: Some(b"{}".to_vec()),
        content_type: None,
        failure: None,
        token,
        effect: Effect::StartChild(Box::new(ChildStart {
            id: id.clone(),
            target: target.clone(),
            input: b"{}".to_vec(),
            due_ms: T0,
            awaited: true,
            deadline_ms: None,
            workflow: Some(ChildWorkflow {
                workflow_id: workflow_id.into(),
                input_digest: "d".into(),
            }),
            parent_close,
            key: None,
        })),
    }
}

/// A child workflow whose run continues as new hands its parent's call to its next run:
/// the parent gets the last run's result, and the next run keeps the parent-close policy.
async fn a_child_that_continues_as_new_answers_its_parent_from_its_last_run(store: &dyn Store) {
    let target = target(store).await;
    let parent = running(store).await;
    let child_id = InvocationId::generate();
    let call = child_call(
        &target,
        &child_id,
        "child-1",
        parent.attempt_token.clone(),
        ParentClose::Terminate,
    );
    let call = store
        .append_entry(&parent.id, parent.attempt, call, T0)
        .await
        .unwrap();
    suspend(store, &parent, vec![call.index], T0).await;
    let child = claim_one(store, T0 + 1).await;
    assert_eq!(child.id, child_id);
    let next = InvocationId::generate();
    end(store, &child, continued(&next), T0 + 2).await;
    let entry = store
        .read_entry(&parent.id, call.index)
        .await
        .unwrap()
        .unwrap();
    assert!(entry.completion.is_none(), "{entry:?}");
    let next_run = claim_one(store, T0 + 3).await;
    assert_eq!(next_run.id, next);
    assert_eq!(
        next_run.parent_invocation_id.as_deref(),
        Some(parent.id.as_str())
    );
    assert_eq!(next_run.parent_index, Some(call.index));
    end(store, &next_run, completed("42"), T0 + 4).await;
    let entry = store
        .read_entry(&parent.id, call.index)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        entry.completion.and_then(|c| c.value).as_deref(),
        Some(&b"42"[..])
    );
    // The parent is due and can end; terminating a parent takes a live child run along.
    let parent_again = claim_one(store, T0 + 5).await;
    assert_eq!(parent_again.id, parent.id);
}

/// A run that ends closes what it leaves: its output entry is written, its timers go (a
/// timer of an ended run never fires), and its unfinished children follow their
/// parent-close policy (one statement on PostgreSQL: `Invocations::close_run`).
async fn a_run_that_ends_closes_its_timers_and_its_children(store: &dyn Store) {
    let target = target(store).await;
    let parent = running(store).await;
    let wake = T0 + 3_600_000;
    let sleep = command(
        store,
        &parent,
        EntryKind::Sleep,
        None,
        Effect::Timer { wake_at_ms: wake },
        T0,
    )
    .await;
    let mut children = Vec::new();
    for (workflow_id, policy) in [("t", ParentClose::Terminate), ("a", ParentClose::Abandon)] {
        let child = InvocationId::generate();
        let call = child_call(
            &target,
            &child,
            workflow_id,
            parent.attempt_token.clone(),
            policy,
        );
        store
            .append_entry(&parent.id, parent.attempt, call, T0)
            .await
            .unwrap();
        children.push(child);
    }
    let timers = |id: String| async move {
        let timers = store
            .transact(
                &id.clone(),
                Box::new(move |tx| {
                    Box::pin(async move {
                        let due = tx.due_timers(&id, i64::MAX).await?;
                        Ok(Box::new(due) as TxOutput)
                    })
                }),
            )
            .await
            .unwrap();
        *timers.downcast::<Vec<u32>>().unwrap()
    };
    // An end the fence refuses closes nothing: no output entry, the timer stays.
    let journal = store.read_journal(&parent.id).await.unwrap();
    let stale = store
        .end_attempt(&parent.id, parent.attempt + 1, completed("stale"), T0 + 1)
        .await
        .err()
        .unwrap();
    assert!(matches!(stale, StoreError::Fenced { .. }), "{stale}");
    assert_eq!(
        store.read_journal(&parent.id).await.unwrap().len(),
        journal.len()
    );
    assert_eq!(timers(parent.id.to_string()).await, [sleep.index]);
    let ended = end(store, &parent, completed("done"), T0 + 1).await;
    assert_eq!(ended.status, Status::Completed);
    let journal = store.read_journal(&parent.id).await.unwrap();
    let output = journal.last().unwrap();
    assert_eq!(
        (output.index, output.kind, output.value.as_deref()),
        (ended.journal_len - 1, EntryKind::Output, Some(&b"done"[..]))
    );
    assert_eq!(timers(parent.id.to_string()).await, Vec::<u32>::new());
    let status = |id: &InvocationId| {
        let id = id.clone();
        async move { store.get_invocation(&id).await.unwrap().unwrap().status }
    };
    assert_eq!(status(&children[0]).await, Status::Terminated);
    assert!(
        !status(&children[1]).await.is_final(),
        "abandoned, it goes on"
    );
    // The only due invocation is the abandoned child: nothing of the parent fires.
    let claimed = store.claim_due(wake + 1, 10).await.unwrap();
    let claimed: Vec<_> = claimed.iter().map(|r| r.id.clone()).collect();
    assert_eq!(claimed, [children[1].clone()]);
}

/// A workflow id names one live run: a plain handler's child workflow is refused while the
/// id names a running run, as an SDK's is, and an operator cannot restart a run whose id
/// now names a later run.
async fn a_workflow_id_names_one_live_run(store: &dyn Store) {
    let target = target(store).await;
    let live = started(start(store, "w3", None, T0).await);
    let parent = running(store).await;
    let answer = store
        .plain_command(
            PlainCommand {
                id: parent.id.clone(),
                attempt: parent.attempt,
                token: parent.attempt_token.clone().unwrap(),
                commands: vec![NamedCommand::named(
                    EntryKind::Call,
                    "wf/run".into(),
                    Some(child_call(
                        &target,
                        &InvocationId::generate(),
                        "w3",
                        None,
                        ParentClose::Abandon,
                    )),
                )],
                suspend: false,
            },
            T0 + 1,
        )
        .await
        .unwrap();
    let recorded: serde_json::Value =
        serde_json::from_slice(answer.entry().value.as_deref().unwrap()).unwrap();
    assert_eq!(recorded["refused"]["type"], "WorkflowIdTaken", "{recorded}");
    assert_eq!(
        answer
            .entry()
            .completion
            .clone()
            .and_then(|c| c.failure)
            .map(|f| f.status),
        Some(409)
    );
    assert_eq!(
        store.find_workflow("wf", "w3").await.unwrap().unwrap().id,
        live.id
    );

    // The run fails; a new run takes the id; the failed run cannot be restarted.
    let failed = AttemptEnd::Failed {
        failure: durin_protocol::Failure {
            status: 500,
            error_type: None,
            message: "boom".into(),
        },
        body: None,
    };
    end(store, &live, failed, T0 + 2).await;
    let second = started(start(store, "w3", None, T0 + 3).await);
    assert_ne!(second.id, live.id);
    let refused = store.restart(&live.id, 1, None, T0 + 4).await.unwrap();
    assert!(
        refused
            .as_ref()
            .is_err_and(|why| why.contains(second.id.as_str())),
        "{refused:?}"
    );
}

/// Signals count toward what a run holds: past its bytes, a signal is refused and nothing
/// is stored.
async fn signals_past_the_limits_are_refused(store: &dyn Store) {
    target(store).await;
    let run = started(start(store, "w4", None, T0).await);
    let big = "x".repeat(400);
    let mut accepted = 0;
    let refused = loop {
        match store
            .send_signal(&run.id, signal("s", &big, None), T0 + 1)
            .await
        {
            Ok(_) => accepted += 1,
            Err(error) => break error,
        }
        assert!(accepted < 10, "signals are never refused");
    };
    assert!(
        matches!(refused, StoreError::JournalFull { .. }),
        "{refused}"
    );
    assert_eq!(accepted, 2);
    let record = store.get_invocation(&run.id).await.unwrap().unwrap();
    assert!(record.journal_bytes <= 1_000, "{record:?}");
}

/// Cancel, terminate, pause and resume: each writes once, is fenced against the running
/// attempt, and leaves the invocation where the engine expects it.
async fn cancel_terminate_pause_and_resume_move_an_invocation_once(store: &dyn Store) {
    let record = running(store).await;
    let CancelAnswer::Requested(cancelled) = store.cancel(&record.id, T0 + 1).await.unwrap().answer
    else {
        panic!("not cancelled")
    };
    assert_eq!(
        (cancelled.status, cancelled.cancel_requested_at_ms),
        (Status::Pending, Some(T0 + 1))
    );
    assert!(matches!(
        store.cancel(&record.id, T0 + 2).await.unwrap().answer,
        CancelAnswer::AlreadyRequested(_)
    ));
    // The attempt that ran is fenced.
    let stale = store
        .end_attempt(&record.id, record.attempt, completed("x"), T0 + 2)
        .await
        .err()
        .unwrap();
    assert!(matches!(stale, StoreError::Fenced { .. }), "{stale}");
    let journal = store.read_journal(&record.id).await.unwrap();
    assert_eq!(journal.last().map(|e| e.kind), Some(EntryKind::Cancel));
    assert!(journal.last().unwrap().completion.is_some());

    let (paused, changed) = store
        .pause(&record.id, "look".into(), T0 + 3)
        .await
        .unwrap();
    assert!(changed);
    assert_eq!(paused.status, Status::Paused);
    assert!(store.claim_due(T0 + 4, 10).await.unwrap().is_empty());
    let resumed = store
        .resume(&record.id, None, T0 + 5)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resumed.status, Status::Pending);
    let claimed = claim_one(store, T0 + 6).await;

    let termination = store
        .terminate(&record.id, "enough".into(), T0 + 7)
        .await
        .unwrap();
    assert!(termination.terminated);
    assert_eq!(termination.record.status, Status::Terminated);
    let again = store
        .terminate(&record.id, "again".into(), T0 + 8)
        .await
        .unwrap();
    assert!(!again.terminated);
    let late = store
        .end_attempt(&claimed.id, claimed.attempt, completed("x"), T0 + 9)
        .await
        .err()
        .unwrap();
    assert!(matches!(late, StoreError::Fenced { .. }), "{late}");
    assert!(matches!(
        store.cancel(&record.id, T0 + 9).await.unwrap().answer,
        CancelAnswer::Ended(_)
    ));
}

/// Invocations of one key run at most its limit at once; the others wait, never claimed,
/// and are made due in arrival order by a holder's end (a completion, a termination); one
/// cancelled while it waits ends at once, without running.
async fn a_key_runs_its_limit_at_once_and_the_others_in_arrival_order(store: &dyn Store) {
    let new = |key: &'static str, limit: u32, now_ms: i64| async move {
        let key = Some(InvocationKey {
            key: key.into(),
            limit,
            shared: false,
            debounce_ms: None,
            debounce_max_ms: None,
            rate: None,
        });
        match create_with(store, None, key, now_ms).await {
            Created::New { record, .. } => record,
            other => panic!("{other:?}"),
        }
    };
    let a = new("k", 1, T0).await;
    let b = new("k", 1, T0 + 1).await;
    let c = new("k", 1, T0 + 2).await;
    let other = new("j", 1, T0 + 3).await;
    let statuses = [a.status, b.status, c.status, other.status];
    assert_eq!(
        statuses,
        [
            Status::Running,
            Status::Queued,
            Status::Queued,
            Status::Running
        ]
    );
    assert_eq!(b.next_run_at_ms, None);
    assert!(store.claim_due(T0 + 10, 10).await.unwrap().is_empty());
    let listed: Vec<InvocationId> = store
        .key_invocations("wf", "k", 10)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(listed, [a.id.clone(), b.id.clone(), c.id.clone()]);

    // The holder completes: what it set becomes the key's (a clear removes), the oldest
    // waiting one is due, the next still waits.
    for (name, op, value) in [
        ("n", &br#"{"set":1}"#[..], Some(b"1".to_vec())),
        ("gone", br#"{"clear":true}"#, None),
    ] {
        let entry = NewEntry {
            index: None,
            kind: EntryKind::State,
            name: Some(name.into()),
            value: Some(op.to_vec()),
            content_type: None,
            failure: None,
            token: a.attempt_token.clone(),
            effect: Effect::State {
                key: name.into(),
                value,
            },
        };
        store.append_entry(&a.id, 1, entry, T0 + 5).await.unwrap();
    }
    assert!(store.key_state("wf", "k").await.unwrap().is_empty());
    end(store, &a, completed("1"), T0 + 11).await;
    assert_eq!(
        store.key_state("wf", "k").await.unwrap(),
        [("n".to_owned(), b"1".to_vec())]
    );
    let b = claim_one(store, T0 + 12).await;
    assert_eq!(b.id, listed[1]);
    // What the next holder clears leaves the key's state when it ends (below).
    let clear = NewEntry {
        index: None,
        kind: EntryKind::State,
        name: Some("n".into()),
        value: Some(br#"{"clear":true}"#.to_vec()),
        content_type: None,
        failure: None,
        token: b.attempt_token.clone(),
        effect: Effect::State {
            key: "n".into(),
            value: None,
        },
    };
    store
        .append_entry(&b.id, b.attempt, clear, T0 + 12)
        .await
        .unwrap();
    assert!(store.claim_due(T0 + 12, 10).await.unwrap().is_empty());

    // Cancelled while it waits: ended at once, without an attempt.
    let cancellation = store.cancel(&c.id, T0 + 13).await.unwrap();
    let CancelAnswer::Dequeued(cancelled) = cancellation.answer else {
        panic!("{:?}", cancellation.answer)
    };
    assert_eq!(
        (cancelled.status, cancelled.attempt),
        (Status::Cancelled, 0)
    );
    assert_eq!(cancellation.ended.len(), 1);

    // A termination of the holder frees its place too.
    let d = new("k", 1, T0 + 14).await;
    assert_eq!(d.status, Status::Queued);
    store
        .terminate(&b.id, "enough".into(), T0 + 15)
        .await
        .unwrap();
    assert!(store.key_state("wf", "k").await.unwrap().is_empty());
    assert_eq!(claim_one(store, T0 + 16).await.id, d.id);

    // Two at once: the third waits until one of them ends.
    let x = new("two", 2, T0 + 20).await;
    let y = new("two", 2, T0 + 21).await;
    let z = new("two", 2, T0 + 22).await;
    assert_eq!(
        [x.status, y.status, z.status],
        [Status::Running, Status::Running, Status::Queued]
    );
    end(store, &y, completed("y"), T0 + 23).await;
    assert_eq!(claim_one(store, T0 + 24).await.id, z.id);
}

/// An update `set` with id `id`, to a plain run when `plain`.
fn new_update(id: &str, key: Option<&str>, plain: bool) -> NewUpdate {
    NewUpdate {
        id: id.into(),
        name: "set".into(),
        input: b"{}".to_vec(),
        idempotency_key: key.map(str::to_owned),
        plain,
    }
}

/// Updates: stored once per key (across the runs of a workflow id), refused by the
/// running attempt, abandoned when the run ends; a start by id answers the run it names.
async fn updates_and_starts_by_id_are_answered_once(store: &dyn Store) {
    target(store).await;
    let run = started(start(store, "w5", None, T0).await);
    assert!(matches!(
        start(store, "w5", None, T0 + 1).await,
        WorkflowStarted::Existing(ref r) if r.id == run.id
    ));
    let update = |id: &str, key: &str| new_update(id, Some(key), false);
    let UpdateSent::Sent { new, .. } = store
        .send_update(&run.id, update("u1", "k"), T0 + 1)
        .await
        .unwrap()
    else {
        panic!("not sent")
    };
    assert!(new);
    let UpdateSent::Sent {
        new, update: first, ..
    } = store
        .send_update(&run.id, update("u2", "k"), T0 + 2)
        .await
        .unwrap()
    else {
        panic!("not sent")
    };
    assert!(!new);
    assert_eq!(first.id, "u1");
    let refused = store
        .refuse_update(
            &run.id,
            run.attempt,
            run.attempt_token.clone().unwrap(),
            "u1",
            durin_protocol::Failure {
                status: 400,
                error_type: None,
                message: "no".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(refused.status, UpdateStatus::Refused);
    store
        .send_update(&run.id, update("u3", "k3"), T0 + 3)
        .await
        .unwrap();
    // An update that came during the attempt holds its continue-as-new: the run runs
    // again to handle it; the next attempt, which had it and did not handle it, goes on.
    let next = InvocationId::generate();
    let held = end(store, &run, continued(&next), T0 + 4).await;
    assert_eq!(held.status, Status::BackingOff, "{held:?}");
    assert!(held.last_error.unwrap_or_default().contains("updates"));
    let again = claim_one(store, T0 + 5).await;
    end(store, &again, continued(&next), T0 + 6).await;
    assert_eq!(
        store
            .get_update(&run.id, "u3")
            .await
            .unwrap()
            .unwrap()
            .status,
        UpdateStatus::Abandoned
    );
    // The key of an update to the first run is known to the next one.
    let UpdateSent::Sent { new, update, .. } = store
        .send_update(&next, update("u4", "k"), T0 + 7)
        .await
        .unwrap()
    else {
        panic!("not sent")
    };
    assert!(!new);
    assert_eq!(update.id, "u1");
}

/// A plain run's update that no update wait took is abandoned when the run continues as
/// new, and its delivery stays behind: the next run is not handed an update whose caller
/// heard that nothing was done. Its other buffered signals go to the next run.
async fn a_plain_runs_abandoned_update_does_not_reach_its_next_run(store: &dyn Store) {
    target(store).await;
    let run = started(start(store, "w6", None, T0).await);
    let update = new_update("u1", None, true);
    let sent = store.send_update(&run.id, update, T0 + 1).await.unwrap();
    assert!(
        matches!(sent, UpdateSent::Sent { new: true, .. }),
        "{sent:?}"
    );
    store
        .send_signal(&run.id, signal("approve", "1", None), T0 + 1)
        .await
        .unwrap();
    let next = InvocationId::generate();
    let mut record = run.clone();
    let mut now = T0 + 2;
    // An update that came during the attempt may hold the continue-as-new for one more
    // attempt, which goes on.
    loop {
        let ended = end(store, &record, continued(&next), now).await;
        if ended.status == Status::Continued {
            break;
        }
        assert_eq!(ended.status, Status::BackingOff, "{ended:?}");
        record = claim_one(store, now + 1).await;
        now += 2;
    }
    assert_eq!(
        store
            .get_update(&run.id, "u1")
            .await
            .unwrap()
            .unwrap()
            .status,
        UpdateStatus::Abandoned
    );
    let handed: Vec<String> = store
        .unconsumed_signals(&next)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, name)| name)
        .collect();
    assert_eq!(handed, vec!["approve".to_owned()]);
}

/// An update that arrived while the attempt ran holds its completion, whatever its time
/// says: here it is stamped before the attempt's start (its caller's clock, or the
/// order in which two writers committed), and it still counts as the attempt's.
async fn an_update_during_the_attempt_counts_by_the_attempt_not_by_its_time(store: &dyn Store) {
    target(store).await;
    let run = started(start(store, "w7", None, T0 + 10).await);
    let update = new_update("u1", None, false);
    store.send_update(&run.id, update, T0 + 5).await.unwrap();
    let held = end(store, &run, completed("done"), T0 + 11).await;
    assert_eq!(held.status, Status::BackingOff, "{held:?}");
    assert!(held.last_error.unwrap_or_default().contains("updates"));
    assert_eq!(
        store
            .get_update(&run.id, "u1")
            .await
            .unwrap()
            .unwrap()
            .status,
        UpdateStatus::Pending
    );
}

/// The deployment new invocations of `wf/run` go to.
async fn latest(store: &dyn Store) -> String {
    store
        .latest_handler("wf", "run")
        .await
        .unwrap()
        .unwrap()
        .deployment_id
}

/// An inactive deployment takes no new invocation until it is activated; registering the
/// same deployment again active activates it too.
async fn new_invocations_go_to_the_newest_active_deployment(store: &dyn Store) {
    let spec = HandlerSpec {
        name: "run".into(),
        path: None,
        retry_policy: None,
        start_to_close: None,
        schedule_to_close: None,
        schedule_to_start: None,
        heartbeat_timeout: None,
        key: None,
    };
    let deployment = |url: &str, active: bool| NewDeployment {
        url: url.into(),
        protocol: HandlerProtocol::Sdk { version: 4 },
        services: vec![ServiceSpec {
            name: "wf".into(),
            kind: Default::default(),
            handlers: vec![spec.clone()],
        }],
        now_ms: T0,
        active,
    };
    let (old, _) = store
        .register_deployment(deployment("http://127.0.0.1:1", true))
        .await
        .unwrap();
    let (new, created) = store
        .register_deployment(deployment("http://127.0.0.1:2", false))
        .await
        .unwrap();
    assert!(created && !new.active);
    assert_eq!(latest(store).await, old.id);
    // Pinned runs can still be sent to it.
    assert!(store
        .deployment_handler(&new.id, "wf", "run")
        .await
        .unwrap()
        .is_some());
    let listed = store.list_deployments().await.unwrap();
    assert_eq!(
        listed.iter().map(|d| d.active).collect::<Vec<_>>(),
        [true, false]
    );
    let activated = store.activate_deployment(&new.id).await.unwrap().unwrap();
    assert!(activated.active);
    assert_eq!(latest(store).await, new.id);
    assert!(store
        .activate_deployment("dp_none")
        .await
        .unwrap()
        .is_none());
    // The same deployment registered inactive stays as it is; registered active, it is
    // activated.
    let (third, _) = store
        .register_deployment(deployment("http://127.0.0.1:3", false))
        .await
        .unwrap();
    let (again, created) = store
        .register_deployment(deployment("http://127.0.0.1:3", false))
        .await
        .unwrap();
    assert!(!created && !again.active);
    let (again, created) = store
        .register_deployment(deployment("http://127.0.0.1:3", true))
        .await
        .unwrap();
    assert!(!created && again.active && again.id == third.id);
    assert_eq!(latest(store).await, third.id);
}

/// A schedule's row: set, found due when its fire is due and not before, and a look
/// starts each due fire's run once, in the transaction that moves it on; a second look at
/// the same time starts nothing; a run whose id names one already is not started again.
async fn a_schedule_starts_each_fire_once(store: &dyn Store) {
    use crate::schedules::rule::{self, Limits, Op, SetOutcome};
    let target = target(store).await;
    let spec: crate::schedules::ScheduleSpec = serde_json::from_value(serde_json::json!({
        "every": "1m", "overlap": "allow_all", "start": {"workflow": "wf", "input": {"n": 1}}
    }))
    .unwrap();
    let minute = 60_000;
    let start_ms = T0 - T0 % minute;
    let set = store
        .write("schedule/s", move |tx| {
            Box::pin(async move { rule::set(tx, "s", spec, "api", start_ms).await })
        })
        .await
        .unwrap();
    assert!(matches!(set, SetOutcome::Set { created: true, .. }));
    assert_eq!(
        store.next_schedule_due().await.unwrap(),
        Some(start_ms + minute)
    );
    assert!(store
        .due_schedules(start_ms + minute - 1, 10)
        .await
        .unwrap()
        .is_empty());
    let now_ms = start_ms + 3 * minute;
    assert_eq!(store.due_schedules(now_ms, 10).await.unwrap(), ["s"]);
    let limits = Limits {
        timeouts: Default::default(),
        max_bytes: store.journal_limits().max_bytes,
    };
    async fn look(
        store: &dyn Store,
        target: HandlerTarget,
        now_ms: i64,
        limits: Limits,
    ) -> rule::Applied {
        store
            .write("schedule/s", move |tx| {
                Box::pin(async move {
                    rule::look(tx, "s", Op::Due, now_ms, Some(&target), limits).await
                })
            })
            .await
            .unwrap()
            .unwrap()
    }
    let applied = look(store, target.clone(), now_ms, limits).await;
    let ids: Vec<String> = applied
        .fires
        .iter()
        .map(|f| f.workflow_id.clone().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            crate::schedules::spec::fire_workflow_id("s", start_ms + minute),
            crate::schedules::spec::fire_workflow_id("s", start_ms + 2 * minute),
            crate::schedules::spec::fire_workflow_id("s", start_ms + 3 * minute),
        ]
    );
    for id in &ids {
        let run = store.find_workflow("wf", id).await.unwrap().unwrap();
        assert_eq!(run.status, Status::Pending, "due for the scheduler");
    }
    assert_eq!(
        store.get_schedule("s").await.unwrap().unwrap().due_ms,
        Some(start_ms + 4 * minute)
    );
    assert!(store.due_schedules(now_ms, 10).await.unwrap().is_empty());
    // A second look at the same time (another node's) starts nothing.
    let again = look(store, target.clone(), now_ms, limits).await;
    assert!(again.fires.is_empty());
    // A backfill over the same fires finds their runs.
    let backfill = store
        .write("schedule/s", move |tx| {
            Box::pin(async move {
                let op = Op::Backfill {
                    from_ms: start_ms + minute,
                    to_ms: start_ms + 3 * minute,
                    overlap: crate::schedules::Overlap::AllowAll,
                };
                rule::look(tx, "s", op, now_ms, Some(&target), limits).await
            })
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(backfill.fires.len(), 3);
    assert!(backfill
        .fires
        .iter()
        .all(|f| f.outcome == crate::schedules::fires::Outcome::AlreadyStarted));
    assert_eq!(store.list_schedules().await.unwrap().len(), 1);
    let deleted = store
        .write("schedule/s", |tx| {
            Box::pin(async move { rule::delete(tx, "s", "api").await })
        })
        .await
        .unwrap();
    assert!(deleted.is_some());
    assert!(store.get_schedule("s").await.unwrap().is_none());
    assert_eq!(store.next_schedule_due().await.unwrap(), None);
}

/// A key's rate (2 starts a second): of four invocations created at once, the claim
/// starts two and puts the others off to a second after those started; a claim before
/// then starts nothing, one then starts both, the older first. A line of three waits in
/// line: the first two for the next starts, the third a period more. Another key has
/// its own rate.
async fn a_key_rate_starts_so_many_a_period_when_they_start(store: &dyn Store) {
    let new = |key: &'static str, now_ms: i64| async move {
        let key = Some(InvocationKey {
            key: key.into(),
            limit: 10,
            shared: false,
            debounce_ms: None,
            debounce_max_ms: None,
            rate: Some(StartRate {
                limit: 2,
                period_ms: 1_000,
            }),
        });
        match create_with(store, None, key, now_ms).await {
            Created::New { record, .. } => record,
            other => panic!("{other:?}"),
        }
    };
    let a = new("k", T0).await;
    let b = new("k", T0 + 1).await;
    let c = new("k", T0 + 2).await;
    let d = new("k", T0 + 3).await;
    // Under a rate, nothing runs at its creation: the claim starts it.
    assert_eq!(a.status, Status::Pending);
    let claimed = claimed_at(store, &[T0 + 10]).await;
    assert_eq!(claimed, [a.id.clone(), b.id.clone()]);
    let put_off = store.get_invocation(&c.id).await.unwrap().unwrap();
    assert_eq!(put_off.status, Status::Pending);
    assert_eq!(put_off.next_run_at_ms, Some(T0 + 1_010));
    assert!(store.claim_due(T0 + 1_009, 10).await.unwrap().is_empty());
    // Another key is not held up by this one's.
    let other = new("j", T0 + 20).await;
    assert_eq!(claim_one(store, T0 + 20).await.id, other.id);
    // A second after the first two, the next two start, the older first (one found
    // before the older yields to it a moment).
    let claimed = claimed_at(store, &[T0 + 1_010, T0 + 1_011]).await;
    assert_eq!(claimed, [c.id.clone(), d.id.clone()]);
    // A line of three: the first waits for the next start, the third a period more.
    let line = [
        new("k", T0 + 1_020).await,
        new("k", T0 + 1_021).await,
        new("k", T0 + 1_022).await,
    ];
    assert!(store.claim_due(T0 + 1_030, 10).await.unwrap().is_empty());
    let due: Vec<Option<i64>> = {
        let mut due = Vec::new();
        for waiting in &line {
            due.push(
                store
                    .get_invocation(&waiting.id)
                    .await
                    .unwrap()
                    .unwrap()
                    .next_run_at_ms,
            );
        }
        due
    };
    assert_eq!(due[0], Some(T0 + 2_010));
    assert_eq!(due[2], Some(T0 + 3_010));
    let claimed = claimed_at(store, &[T0 + 2_010, T0 + 2_011, T0 + 2_012]).await;
    assert_eq!(claimed, [line[0].id.clone(), line[1].id.clone()]);
    assert_eq!(claim_one(store, T0 + 3_011).await.id, line[2].id);
}

conformance! {
    a_schedule_starts_each_fire_once,
    new_invocations_go_to_the_newest_active_deployment,
    a_timer_is_claimed_when_due_and_not_before_and_fires_once,
    a_signal_that_arrives_while_the_attempt_runs_is_not_lost,
    signals_are_buffered_delivered_in_order_once_and_wake_their_wait,
    an_awakeable_completes_once_and_an_ended_invocation_takes_nothing,
    an_attempt_cut_short_by_a_crash_is_due_again_at_start,
    a_wait_that_lost_a_race_takes_no_later_signal,
    a_wait_gets_only_its_first_event_and_later_signals_stay_buffered,
    a_suspension_takes_the_signal_that_arrived_first,
    the_same_append_sent_again_answers_the_recorded_entry,
    refused_writes_leave_their_neighbours_in_the_batch,
    a_rule_that_refuses_after_writing_writes_nothing,
    a_plain_runs_abandoned_update_does_not_reach_its_next_run,
    an_update_during_the_attempt_counts_by_the_attempt_not_by_its_time,
    writes_of_many_invocations_at_once_each_land_once,
    creations_appends_and_ends_at_once_each_land_once,
    an_idempotency_key_lasts_while_its_invocation_runs_and_its_retention_after,
    ended_invocations_are_purged_after_their_retention_with_all_they_kept,
    a_journal_past_its_limits_takes_no_more_entries => JournalLimits {
        max_entries: 3,
        max_bytes: 1_000,
    },
    a_crash_does_not_use_the_budget_of_the_step_that_comes_next,
    a_restart_sent_again_with_its_key_changes_nothing,
    a_run_does_not_complete_over_a_signal_that_came_while_it_ran,
    continue_as_new_hands_unconsumed_signals_and_keys_to_the_next_run,
    a_child_that_continues_as_new_answers_its_parent_from_its_last_run,
    a_run_that_ends_closes_its_timers_and_its_children,
    a_workflow_id_names_one_live_run,
    signals_past_the_limits_are_refused => JournalLimits {
        max_entries: 100,
        max_bytes: 1_000,
    },
    cancel_terminate_pause_and_resume_move_an_invocation_once,
    updates_and_starts_by_id_are_answered_once,
    a_key_runs_its_limit_at_once_and_the_others_in_arrival_order,
    a_key_rate_starts_so_many_a_period_when_they_start,
}
