//! The PostgreSQL store: several Durin nodes share one database, which is the source of
//! truth (`--database postgres://...`).
//!
//! Writes are group-committed, as in the SQLite store: every write is an async closure sent
//! to one of the node's writer tasks ([`NodeOptions::writers`], one by default: the one its
//! routing key, an invocation id, hashes to, so that the writes of one invocation keep
//! their order); a writer takes what has queued up (up to [`MAX_BATCH`]), runs it in one
//! transaction, commits once and only then answers each caller. A batch of rules that may
//! run again (the hot ones: creations, appends, ends, claims) runs without savepoints and
//! side by side, the rows of their creations, appends and completions written by one
//! statement per kind for the whole batch (`batch.rs`); when one of them fails (a failed
//! statement, a fence), the batch is rolled back and run again, one write at a time with a
//! savepoint for each. Any other batch of
//! several writes runs each under a savepoint of its own from the start. Either way a write
//! that fails is rolled back and leaves its neighbours' writes in the batch. Reads run on
//! the pool.
//!
//! What SQLite gets from its one writer, PostgreSQL gets from row locks: a write that reads
//! an invocation before it changes it reads it `FOR UPDATE`, and every fenced change
//! re-checks its fence (attempt, status) in the `UPDATE` itself.
//!
//! Several nodes share one database: each running attempt is leased to the node that
//! started it, which renews its leases while it lives; an attempt whose lease expired is
//! claimed by another node with the next attempt number, which fences the old one (see
//! `lease.rs`). Every lease time is the database's clock, which [`Store::database_clock`]
//! follows, so that every node compares due times with one clock too.
//!
//! This file holds the pool, the group commit and the migrations; `batch.rs` the writes of
//! a batch side by side; `lease.rs` the node's
//! session (its node-id lock and its lease renewals); `clock.rs` the database's clock;
//! `rows.rs` the row mappings and shared statements; `tables.rs` the tables (SQL only, with
//! their locks; the rules that use them are in `lifecycle/` and `journal/`); `store.rs` the
//! reads and the `Store` methods that are no rule of a primitive.

use std::hash::{Hash, Hasher};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, PgConnection, Postgres};
use tokio::sync::{mpsc, oneshot};

use super::*;

mod batch;
mod clock;
mod egress;
mod lease;
mod notify;
mod rows;
mod store;
mod tables;

use clock::DB_NOW_MS;
use lease::Lease;

/// The most writes one transaction carries.
const MAX_BATCH: usize = 256;
/// Connections for reads, beside the writers'.
const READERS: u32 = 8;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// After the batch's commit (or its failure), hands the caller its result.
type Reply = Box<dyn FnOnce(Option<&StoreError>) + Send>;
/// A write that runs once: inside the batch's transaction, under a savepoint when the batch
/// has others; the flag is true when it failed, so that its savepoint is rolled back.
type OnceOp = Box<dyn for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, (Reply, bool)> + Send>;
/// A write that may run again, in the batch's next try: alone on the connection, or side
/// by side with the batch's other writes (see `batch.rs`).
type RepeatableRun = std::sync::Arc<
    dyn for<'c> Fn(batch::TxConn<'c>) -> BoxFuture<'c, StoreResult<TxOutput>> + Send + Sync,
>;

enum WriteOp {
    Once(OnceOp),
    Repeatable {
        /// The hash of its routing key: the writes of one key run in turn.
        route: u64,
        run: RepeatableRun,
        reply: oneshot::Sender<StoreResult<TxOutput>>,
    },
}

impl WriteOp {
    /// Runs the write; its reply and whether it failed.
    async fn run(self, conn: &mut PgConnection) -> (Reply, bool) {
        match self {
            WriteOp::Once(op) => op(conn).await,
            WriteOp::Repeatable { run, reply, .. } => {
                let result = run(batch::TxConn::Alone(conn)).await;
                let failed = result.is_err();
                (answer(reply, result), failed)
            }
        }
    }
}

/// The reply that hands a write's `result` to its caller once the batch committed, or the
/// commit's error (a failed write's own error whatever happened to the batch).
fn answer<T: Send + 'static>(
    caller: oneshot::Sender<StoreResult<T>>,
    result: StoreResult<T>,
) -> Reply {
    let failed = result.is_err();
    Box::new(move |commit_error: Option<&StoreError>| {
        let result = match commit_error {
            Some(e) if !failed => Err(StoreError::Backend(e.to_string().into())),
            _ => result,
        };
        let _ = caller.send(result);
    })
}

pub struct PostgresStore {
    pool: PgPool,
    writers: Vec<mpsc::Sender<WriteOp>>,
    /// How long a journal may grow.
    limits: JournalLimits,
    /// This node's id and lease time.
    lease: Lease,
    /// The attempts this node runs: the leases it renews.
    held: Arc<lease::Held>,
    /// When this node's leases were last renewed.
    renewals: Arc<lease::Renewals>,
    clock: Arc<clock::DatabaseClock>,
    /// What this node tells the other nodes, and hears from them.
    notifications: notify::Notifications,
    /// Stops the lease renewals (and ends the node's session, with its node-id lock) when
    /// sent to or dropped with the store.
    _stop_renewals: Option<oneshot::Sender<()>>,
}

fn backend(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    // A deadlock PostgreSQL broke rolled the write back: it may run again.
    let database = (&e as &dyn std::error::Error)
        .downcast_ref::<sqlx::Error>()
        .and_then(sqlx::Error::as_database_error);
    if let Some(database) = database {
        if database.code().as_deref() == Some("40P01") {
            return StoreError::Contended(database.message().to_owned());
        }
    }
    StoreError::Backend(Box::new(e))
}

fn corrupt(what: String) -> StoreError {
    StoreError::Backend(what.into())
}

/// Whether `url` names a PostgreSQL database.
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

impl PostgresStore {
    /// Connects to the database at `url` as node `node`, applies the embedded migrations,
    /// takes the node-id lock (refused while another live process has `node.node_id`) and
    /// starts renewing the node's leases, until the store is dropped.
    pub async fn open(url: &str, node: NodeOptions) -> StoreResult<PostgresStore> {
        let lease = Lease::new(&node)?;
        // Statements are not logged one by one (the store's own errors are).
        let options = PgConnectOptions::from_str(url)
            .map_err(backend)?
            .disable_statement_logging();
        // The config checks the writers' number; a caller of the store may not have.
        let writers = node.writers.clamp(1, 64);
        let pool = PgPoolOptions::new()
            .max_connections(READERS + writers as u32)
            // While the database is away, a caller waits this long, then gets a retryable 503.
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options.clone())
            .await
            .map_err(backend)?;
        MIGRATOR.run(&pool).await.map_err(backend)?;
        let held = Arc::new(lease::Held::default());
        let renewals = Arc::new(lease::Renewals::new(&lease));
        let clock = Arc::new(clock::DatabaseClock::default());
        let session = lease::start(&options, &lease, &renewals, &clock).await?;
        let (stop_renewals, stop) = oneshot::channel();
        tokio::spawn(lease::renew_loop(
            session,
            options,
            lease.clone(),
            Arc::clone(&held),
            Arc::clone(&renewals),
            Arc::clone(&clock),
            stop,
        ));
        let writers = (0..writers)
            .map(|_| {
                let (writes, queue) = mpsc::channel(4 * MAX_BATCH);
                tokio::spawn(write_loop(pool.clone(), queue));
                writes
            })
            .collect();
        let notifications = notify::Notifications::start(&pool);
        Ok(PostgresStore {
            notifications,
            pool,
            writers,
            limits: JournalLimits::default(),
            lease,
            held,
            renewals,
            clock,
            _stop_renewals: Some(stop_renewals),
        })
    }

    /// Applies the embedded migrations.
    pub async fn migrate(url: &str) -> StoreResult<()> {
        let options = PgConnectOptions::from_str(url).map_err(backend)?;
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .map_err(backend)?;
        MIGRATOR.run(&pool).await.map_err(backend)?;
        pool.close().await;
        Ok(())
    }

    /// The store with journals bounded by `limits`.
    pub fn with_journal_limits(mut self, limits: JournalLimits) -> PostgresStore {
        self.limits = limits;
        self
    }

    /// Stops renewing this node's leases, as if it froze: they expire and other nodes claim
    /// its attempts. It ends the node's session too, which frees its node id.
    #[cfg(test)]
    pub(crate) fn stop_renewing(&mut self) {
        if let Some(stop) = self._stop_renewals.take() {
            let _ = stop.send(());
        }
    }

    /// Runs `f` inside the next group-committed transaction of the writer that `key` (an
    /// invocation id, or any text) routes to, and returns its result once the transaction
    /// is committed. An error of `f` rolls back what `f` wrote, and only that.
    async fn write<T, F>(&self, key: &str, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, StoreResult<T>> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let op: OnceOp = Box::new(move |conn| {
            Box::pin(async move {
                let result = f(conn).await;
                let failed = result.is_err();
                (answer(tx, result), failed)
            })
        });
        self.writer(key)
            .send(WriteOp::Once(op))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await
            .map_err(|_| StoreError::Backend("the write was not committed".into()))?
    }

    /// As [`PostgresStore::write`], for a write that may run again.
    async fn write_repeatable(&self, key: &str, run: RepeatableRun) -> StoreResult<TxOutput> {
        let (reply, rx) = oneshot::channel();
        let route = route(key);
        self.writer(key)
            .send(WriteOp::Repeatable { route, run, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await
            .map_err(|_| StoreError::Backend("the write was not committed".into()))?
    }

    /// The writer task `key` routes to.
    fn writer(&self, key: &str) -> &mpsc::Sender<WriteOp> {
        &self.writers[route(key) as usize % self.writers.len()]
    }

    /// A connection of the pool for reads, outside any transaction of the writers.
    async fn reader(&self) -> StoreResult<sqlx::pool::PoolConnection<sqlx::Postgres>> {
        self.pool.acquire().await.map_err(backend)
    }
}

/// The hash of a routing key.
fn route(key: &str) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut hasher);
    hasher.finish()
}

async fn write_loop(pool: PgPool, mut queue: mpsc::Receiver<WriteOp>) {
    // The writer keeps its connection from one batch to the next.
    let mut held = None;
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = queue.recv().await {
        batch.push(first);
        // The tasks that woke with this write's sender may have writes of their own to
        // queue: they run first, and the batch is larger (fewer statements and commits
        // per write under load; nothing to wait for when alone).
        tokio::task::yield_now().await;
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        commit_batch(&pool, &mut held, &mut batch, &queue).await;
    }
}

/// The connection a writer keeps from one batch to the next.
struct Held {
    conn: PoolConnection<Postgres>,
    /// Whether its next transaction has begun: the last commit began it in the same round
    /// trip, as more writes were waiting.
    begun: bool,
}

/// A connection inside a new transaction: the one the writer `held`, or, when it holds
/// none or the one it held is broken (the database restarted), one of the pool.
async fn begin(pool: &PgPool, held: &mut Option<Held>) -> StoreResult<PoolConnection<Postgres>> {
    if let Some(Held { mut conn, begun }) = held.take() {
        if begun || run(&mut conn, "BEGIN").await.is_ok() {
            return Ok(conn);
        }
        conn.detach();
    }
    let mut conn = pool.acquire().await.map_err(backend)?;
    run(&mut conn, "BEGIN").await?;
    Ok(conn)
}

async fn commit_batch(
    pool: &PgPool,
    held: &mut Option<Held>,
    batch: &mut Vec<WriteOp>,
    queue: &mpsc::Receiver<WriteOp>,
) {
    let started = std::time::Instant::now();
    metrics::histogram!(crate::store::BATCH_METRIC).record(batch.len() as f64);
    let mut conn = match begin(pool, held).await {
        Ok(conn) => conn,
        Err(error) => {
            // Dropping the ops tells each caller that its write was not committed.
            batch.clear();
            tracing::error!(%error, "could not begin a write transaction");
            return;
        }
    };
    let mut replies = Vec::with_capacity(batch.len());
    let mut broken = None;
    if batch.len() == 1 {
        // Alone in its transaction: a failed write rolls back the transaction instead of a
        // savepoint.
        if let Some(op) = batch.pop() {
            let (reply, failed) = op.run(&mut conn).await;
            if failed {
                if run(&mut conn, "ROLLBACK").await.is_ok() {
                    *held = Some(Held { conn, begun: false });
                } else {
                    // The connection may be broken: the pool makes a new one.
                    conn.detach();
                }
                reply(None);
                return;
            }
            replies.push(reply);
        }
    } else if batch
        .iter()
        .all(|op| matches!(op, WriteOp::Repeatable { .. }))
    {
        let (back, done) = without_savepoints(conn, batch).await;
        conn = back;
        match done {
            Ok(done) => replies = done,
            Err(error) => broken = Some(error),
        }
    }
    for op in batch.drain(..) {
        if broken.is_some() {
            // Dropping the op tells its caller that its write was not committed.
            continue;
        }
        if let Err(error) = run(&mut conn, "SAVEPOINT write").await {
            broken = Some(error);
            continue;
        }
        let (reply, failed) = op.run(&mut conn).await;
        let end = if failed {
            "ROLLBACK TO SAVEPOINT write"
        } else {
            "RELEASE SAVEPOINT write"
        };
        if let Err(error) = run(&mut conn, end).await {
            broken = Some(error);
        }
        replies.push(reply);
    }
    let error = match broken {
        Some(error) => {
            let _ = run(&mut conn, "ROLLBACK").await;
            // The connection may be broken (the server restarted): the pool makes a new one.
            conn.detach();
            Some(error)
        }
        None => {
            // Under load the next batch is already waiting: its transaction begins in the
            // commit's round trip, one round trip fewer per batch.
            match commit(&mut conn, !queue.is_empty()).await {
                Ok(begun) => {
                    *held = Some(Held { conn, begun });
                    None
                }
                Err(error) => {
                    tracing::error!(%error, "commit failed");
                    let _ = run(&mut conn, "ROLLBACK").await;
                    conn.detach();
                    Some(error)
                }
            }
        }
    };
    metrics::histogram!(crate::store::COMMIT_METRIC).record(started.elapsed().as_secs_f64());
    for reply in replies {
        reply(error.as_ref());
    }
}

/// Runs a batch of writes that may run again without savepoints, side by side (see
/// `batch.rs`). The connection back, and: when every one succeeded, their replies, and
/// `batch` is empty; when one failed, the transaction is rolled back and begun again, and
/// `batch` is left whole, for a savepoint each.
async fn without_savepoints(
    conn: PoolConnection<Postgres>,
    batch: &mut Vec<WriteOp>,
) -> (PoolConnection<Postgres>, StoreResult<Vec<Reply>>) {
    let runs: Vec<(u64, RepeatableRun)> = batch
        .iter()
        .filter_map(|op| match op {
            WriteOp::Repeatable { route, run, .. } => Some((*route, std::sync::Arc::clone(run))),
            WriteOp::Once(_) => None,
        })
        .collect();
    let (mut conn, outputs) = batch::run_side_by_side(conn, runs).await;
    let Some(outputs) = outputs else {
        metrics::counter!(crate::store::BATCH_RETRIED_METRIC).increment(1);
        let again = match run(&mut conn, "ROLLBACK").await {
            Ok(()) => run(&mut conn, "BEGIN").await,
            Err(error) => Err(error),
        };
        return (conn, again.map(|()| Vec::new()));
    };
    let replies = batch
        .drain(..)
        .zip(outputs)
        .filter_map(|(op, output)| match op {
            WriteOp::Repeatable { reply, .. } => Some(answer(reply, Ok(output))),
            WriteOp::Once(_) => None,
        })
        .collect();
    (conn, Ok(replies))
}

/// Commits the transaction on `conn` and, when `begin_next`, begins the next one in the
/// same round trip (both statements in one message): whether the next one has begun. Once
/// the commit has answered, the commit stands: should the next transaction fail to begin,
/// the next batch begins it again, or takes another connection if this one broke.
async fn commit(conn: &mut PgConnection, begin_next: bool) -> StoreResult<bool> {
    if !begin_next {
        run(conn, "COMMIT").await?;
        return Ok(false);
    }
    use futures_util::StreamExt;
    let mut answers = sqlx::raw_sql("COMMIT; BEGIN").execute_many(&mut *conn);
    answers
        .next()
        .await
        .unwrap_or_else(|| Err(sqlx::Error::Protocol("no answer to COMMIT".into())))
        .map_err(backend)?;
    Ok(matches!(answers.next().await, Some(Ok(_))))
}

async fn run(conn: &mut PgConnection, sql: &str) -> StoreResult<()> {
    sqlx::query(sql).execute(conn).await.map_err(backend)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use sqlx::Connection;

    use super::*;

    async fn count(conn: &mut PgConnection) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM t")
            .fetch_one(conn)
            .await
            .unwrap()
    }

    /// A commit that begins the next transaction in its round trip has committed what came
    /// before it, and what comes after it is inside the next transaction; a plain commit
    /// leaves the connection outside any.
    #[tokio::test]
    async fn a_commit_can_begin_the_next_transaction_in_its_round_trip() {
        if !crate::store::tests::postgres_or_skip(
            "a_commit_can_begin_the_next_transaction_in_its_round_trip",
        )
        .await
        {
            return;
        }
        let server = std::env::var("DURIN_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let mut conn = PgConnection::connect(&server).await.unwrap();
        // This connection's own table, gone with it.
        run(&mut conn, "CREATE TEMPORARY TABLE t (n INT)")
            .await
            .unwrap();
        run(&mut conn, "BEGIN").await.unwrap();
        run(&mut conn, "INSERT INTO t VALUES (1)").await.unwrap();
        assert!(commit(&mut conn, true).await.unwrap());
        run(&mut conn, "INSERT INTO t VALUES (2)").await.unwrap();
        run(&mut conn, "ROLLBACK").await.unwrap();
        assert_eq!(count(&mut conn).await, 1, "the second row was rolled back");

        run(&mut conn, "BEGIN").await.unwrap();
        run(&mut conn, "INSERT INTO t VALUES (3)").await.unwrap();
        assert!(!commit(&mut conn, false).await.unwrap());
        // Outside a transaction, this row commits by itself; the ROLLBACK has nothing to
        // roll back.
        run(&mut conn, "INSERT INTO t VALUES (4)").await.unwrap();
        run(&mut conn, "ROLLBACK").await.unwrap();
        assert_eq!(count(&mut conn).await, 3);

        conn.close().await.unwrap();
    }
}
