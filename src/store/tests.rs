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

/// A PostgreSQL store in a schema of its own, on the server `DURIN_TEST_POSTGRES`
/// names (`postgres://postgres@127.0.0.1:5432/test` by default); the schema is dropped
/// when the test passes.
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

/// A second process with a node id that a live node has is refused with a reason; a node
/// with another id shares the database, and the first keeps working.
#[tokio::test]
async fn a_second_node_with_the_same_id_on_one_postgres_database_is_refused() {
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

/// Node A's attempts (one it claimed, one it created) stay A's while A renews its leases,
/// past the lease time; once A stops renewing (it froze), node B claims them after their
/// leases expired, with the next attempt, and A's writes for its old attempts are fenced.
#[tokio::test]
async fn an_attempt_whose_lease_expired_is_taken_over_by_another_node() {
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
    a.end_attempt(&backing_off.id, 1, back_off, T0)
        .await
        .unwrap();
    let claimed = a.claim_due(T0 + 1, 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!((&claimed[0].id, claimed[0].attempt), (&backing_off.id, 2));
    assert!(
        b.claim_due(T0 + 1, 10).await.unwrap().is_empty(),
        "A's leases live"
    );
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    assert!(a.lease_held());
    assert!(
        b.claim_due(T0 + 2, 10).await.unwrap().is_empty(),
        "A renewed its leases"
    );

    a.stop_renewing();
    let stopped = std::time::Instant::now();
    let mut taken = Vec::new();
    while taken.len() < 2 && stopped.elapsed() < std::time::Duration::from_secs(5) {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        taken.extend(b.claim_due(T0 + 3, 10).await.unwrap());
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
        b.claim_due(T0 + 4, 10).await.unwrap().is_empty(),
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
    let refused = a
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
    let ended = a
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
    let (schema, url) = postgres_schema().await;
    let a = PostgresStore::open(&url, node("a", 1_000)).await.unwrap();
    let b = PostgresStore::open(&url, node("b", 1_000)).await.unwrap();
    let locked = running(&a).await;
    let free = running(&a).await;
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
        b.claim_due(T0 + 1, 10).await.unwrap().is_empty(),
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

/// A node restarted with its id takes back at once the attempts its previous life ran (and
/// those running before leases, which have no owner); another node's stay that node's.
#[tokio::test]
async fn a_restarted_node_recovers_its_own_attempts_and_leaves_another_nodes() {
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
    let mut claimed: Vec<_> = n1
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
                    let limits = limits!($($limits)?);
                    let (store, schema) = postgres(limits).await;
                    super::$name(&*store).await;
                    drop(store);
                    drop_schema(&schema).await;
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
    let spec = HandlerSpec {
        name: "run".into(),
        path: None,
        retry_policy: None,
        start_to_close: None,
        schedule_to_close: None,
        schedule_to_start: None,
        heartbeat_timeout: None,
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
        })
        .await
        .unwrap();
    let created = store
        .create_invocation(NewInvocation {
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
        })
        .await
        .unwrap();
    created
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

async fn the_same_append_sent_again_answers_the_recorded_entry(store: &dyn Store) {
    let record = running(store).await;
    let step = |value: &str| NewEntry {
        index: Some(1),
        kind: EntryKind::Step,
        name: Some("charge".into()),
        value: Some(value.as_bytes().to_vec()),
        content_type: None,
        failure: None,
        token: record.attempt_token.clone(),
        effect: Effect::None,
    };
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

conformance! {
    a_timer_is_claimed_when_due_and_not_before_and_fires_once,
    a_signal_that_arrives_while_the_attempt_runs_is_not_lost,
    signals_are_buffered_delivered_in_order_once_and_wake_their_wait,
    an_awakeable_completes_once_and_an_ended_invocation_takes_nothing,
    an_attempt_cut_short_by_a_crash_is_due_again_at_start,
    a_wait_that_lost_a_race_takes_no_later_signal,
    a_wait_gets_only_its_first_event_and_later_signals_stay_buffered,
    a_suspension_takes_the_signal_that_arrived_first,
    the_same_append_sent_again_answers_the_recorded_entry,
    an_idempotency_key_lasts_while_its_invocation_runs_and_its_retention_after,
    ended_invocations_are_purged_after_their_retention_with_all_they_kept,
    a_journal_past_its_limits_takes_no_more_entries => JournalLimits {
        max_entries: 3,
        max_bytes: 1_000,
    },
    a_crash_does_not_use_the_budget_of_the_step_that_comes_next,
    a_restart_sent_again_with_its_key_changes_nothing,
}
