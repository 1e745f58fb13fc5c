//! The embedded store: one SQLite file in WAL mode with `synchronous=FULL`.
//!
//! Writes are group-committed. Every write is a closure sent to one writer thread that owns
//! the only writing connection; the thread takes whatever has queued up (up to
//! [`MAX_BATCH`]), runs it all in one `BEGIN IMMEDIATE` transaction, commits once (one fsync)
//! and only then answers each caller. So "acknowledged" always means "on disk", and a busy
//! gateway pays one fsync per batch instead of one per write. A rule that refuses writes
//! nothing, as on PostgreSQL: a batch of rules that may run again (the hot ones: creations,
//! appends, ends, claims) runs without savepoints and, when one refuses, is rolled back and
//! run again with a savepoint for each; any other write beside others has a savepoint of
//! its own from the start; a lone write that refuses is rolled back.
//!
//! The connections are rusqlite's, driven from plain threads: a statement is a direct call
//! into SQLite, and a whole batch costs two thread hand-offs, where an async driver pays two
//! per statement. Checkpoints of the write-ahead log run on a thread of their own
//! (`wal.rs`), which also fills the log with zeros when the store opens. The
//! schema is applied with `sqlx::migrate!` when the store opens. Reads use a small pool of
//! read-only connections on tokio's blocking threads, which WAL lets run beside the writer.
//!
//! This file holds the connections, the group commit, the reads and the `Store` methods
//! that are no rule of a primitive; `tables.rs` the tables (SQL only; the rules that use
//! them are in `lifecycle/` and `journal/`); `rows.rs` the row mappings and shared
//! statements.

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use tokio::sync::{mpsc, oneshot};

use super::*;

/// The condition of the partial indexes on unfinished invocations
/// (`invocations_unfinished`, `invocations_by_key`). SQLite searches a partial index only
/// for a query whose `WHERE` implies the index's own, which it does not deduce from
/// `status = 'pending'` or the like: a query meant for one of them repeats this.
macro_rules! unfinished {
    () => {
        "status NOT IN ('completed', 'failed', 'cancelled', 'terminated', 'continued')"
    };
}

mod rows;
mod tables;
mod wal;

use rows::*;
use tables::SqliteTx;
use wal::WAL_SIZE_LIMIT;

/// The most writes one transaction carries.
const MAX_BATCH: usize = 512;
/// Read-only connections: at most this many reads run at once, each on a connection
/// that stays open.
const READERS: usize = 8;
/// The page cache of each read-only connection, in KiB.
const READER_CACHE_KIB: u32 = 256;
/// Puts the attempts that were running when the process stopped back in line (at start),
/// through the index of unfinished invocations (see `unfinished!`).
pub(super) const RECOVER_RUNNING: &str = concat!(
    "UPDATE invocations SET status = 'pending', next_run_at_ms = ?1, modified_at_ms = ?1 \
     WHERE status = 'running' AND ",
    unfinished!()
);

/// Counts the invocations waiting for their first attempt, which admission control asks
/// under load, through the index of unfinished invocations (see `unfinished!`): without
/// it the count reads every invocation the table keeps (a million sleeping workflows, the
/// ended ones kept for their retention).
pub(super) const COUNT_PENDING: &str = concat!(
    "SELECT COUNT(*) FROM invocations WHERE status = 'pending' AND ",
    unfinished!()
);

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// After the batch's commit (or its failure), hands the caller its result.
type Reply = Box<dyn FnOnce(Option<&StoreError>) + Send>;

/// One write of a batch, run inside the batch's transaction.
enum WriteOp {
    /// A write that runs once (taken out when it runs): under a savepoint of its own when
    /// the batch has other writes, so that a rule that fails writes nothing.
    Once(Option<OnceWrite>),
    /// A rule that may run again (creations, appends, ends, claims): a batch of such rules
    /// runs without savepoints, and, when one fails, is rolled back and run again with one
    /// for each.
    Repeatable(RepeatableWrite),
}

/// A write that runs once, and how it went.
type OnceWrite = Box<dyn FnOnce(&mut SqliteTx) -> (Reply, Ran) + Send>;

/// A rule that may run again, as the writer runs it.
type RepeatableRun = Box<dyn Fn(&mut SqliteTx) -> StoreResult<TxOutput> + Send>;

struct RepeatableWrite {
    run: RepeatableRun,
    answer: oneshot::Sender<StoreResult<TxOutput>>,
}

/// How a write went, for the rest of its batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ran {
    Done,
    /// Its rule refused (fenced, not found, journal full...): what it wrote must go.
    Refused,
    /// The backend failed, or SQLite rolled the transaction back by itself: the whole
    /// batch goes.
    Broke,
}

impl Ran {
    fn of<T>(result: &StoreResult<T>) -> Ran {
        match result {
            Ok(_) => Ran::Done,
            Err(StoreError::Backend(_)) => Ran::Broke,
            Err(_) => Ran::Refused,
        }
    }
}

/// A write's result once its batch's fate is known: its own, unless the batch did not
/// commit for another write's sake (`commit_error`), when the caller learns that instead.
fn settled<T>(result: StoreResult<T>, commit_error: Option<&StoreError>) -> StoreResult<T> {
    match commit_error {
        Some(e) if Ran::of(&result) != Ran::Broke => Err(StoreError::Backend(e.to_string().into())),
        _ => result,
    }
}

/// What a write that ran owes its caller once the batch's fate is known.
enum Answer {
    Once(Reply),
    Repeatable(StoreResult<TxOutput>),
}

pub struct SqliteStore {
    writes: mpsc::Sender<WriteOp>,
    /// How long a journal may grow.
    limits: JournalLimits,
    readers: Arc<ReaderPool>,
    /// Dropping it stops the checkpointer thread.
    _checkpointer: std::sync::mpsc::Sender<()>,
}

/// The `(name, count)` rows of a counting query.
fn counts(conn: &Connection, sql: &str) -> StoreResult<Vec<(String, u64)>> {
    let mut statement = conn.prepare_cached(sql).map_err(backend)?;
    let rows = statement
        .query_map([], |row| Ok((row.get(0)?, row.get::<_, i64>(1)? as u64)))
        .map_err(backend)?;
    rows.collect::<rusqlite::Result<_>>().map_err(backend)
}

/// The condition of an [`InvocationFilter`], on parameters 1 to 6 (see `filter_params`).
const FILTER: &str = "(?1 IS NULL OR service = ?1) AND (?2 IS NULL OR handler = ?2) \
     AND (?3 IS NULL OR status = ?3) AND (?4 IS NULL OR deployment_id = ?4) \
     AND (?5 IS NULL OR created_at_ms < ?5) AND (?6 = 0 OR workflow_id IS NOT NULL)";

/// The parameters of [`FILTER`], then `limit` (parameter 7).
fn filter_params(filter: &InvocationFilter, limit: u32) -> impl rusqlite::Params + '_ {
    (
        &filter.service,
        &filter.handler,
        filter.status.map(Status::as_str),
        &filter.deployment_id,
        filter.created_before_ms,
        filter.workflows_only,
        limit,
    )
}

fn backend(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Backend(Box::new(e))
}

fn corrupt(what: String) -> StoreError {
    StoreError::Backend(what.into())
}

/// The file path of a `sqlite:` URL (`sqlite:PATH`, `sqlite://PATH`, with an optional
/// `?query`, which is ignored: the store sets its own pragmas).
fn database_path(url: &str) -> StoreResult<String> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .ok_or_else(|| corrupt(format!("{url:?} is not a sqlite: URL")))?;
    let path = rest.split('?').next().unwrap_or_default();
    if path.is_empty() || path == ":memory:" {
        return Err(corrupt(format!(
            "{url:?} names no file; the store needs a file (e.g. sqlite:durin.db)"
        )));
    }
    Ok(path.to_owned())
}

fn open_connection(path: &str, read_only: bool) -> StoreResult<Connection> {
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let conn = Connection::open_with_flags(path, flags).map_err(backend)?;
    conn.busy_timeout(Duration::from_secs(10))
        .map_err(backend)?;
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; \
         PRAGMA journal_size_limit = {WAL_SIZE_LIMIT};"
    ))
    .map_err(backend)?;
    if read_only {
        // Readers serve short lookups; a small page cache each keeps their memory from
        // growing with the database (eight of SQLite's default 2 MB caches would).
        conn.execute_batch(&format!("PRAGMA cache_size = -{READER_CACHE_KIB};"))
            .map_err(backend)?;
    }
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `url` and applies the embedded migrations.
    pub async fn open(url: &str) -> StoreResult<SqliteStore> {
        let path = database_path(url)?;
        SqliteStore::migrate(url).await?;
        let writer = open_connection(&path, false)?;
        // Checkpoints run on their own thread so that commits never wait for one.
        writer
            .execute_batch("PRAGMA wal_autocheckpoint = 0;")
            .map_err(backend)?;
        let checkpointer = open_connection(&path, false)?;
        // Before the writer starts: nothing else writes the log meanwhile.
        if let Err(error) = wal::fill_with_zeros(&format!("{path}-wal")) {
            tracing::warn!(%error, "could not fill the write-ahead log with zeros; it grows with its commits instead");
        }
        let (writes, queue) = mpsc::channel(4 * MAX_BATCH);
        let restart = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer_restart = Arc::clone(&restart);
        std::thread::Builder::new()
            .name("durin-sqlite-writer".into())
            .spawn(move || write_loop(SqliteTx { conn: writer }, queue, writer_restart))
            .map_err(backend)?;
        let (stop, stopped) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("durin-sqlite-checkpointer".into())
            .spawn(move || wal::checkpoint_loop(checkpointer, stopped, restart))
            .map_err(backend)?;
        Ok(SqliteStore {
            writes,
            limits: JournalLimits::default(),
            readers: Arc::new(ReaderPool {
                path,
                idle: Mutex::new(Vec::new()),
                permits: Arc::new(tokio::sync::Semaphore::new(READERS)),
            }),
            _checkpointer: stop,
        })
    }

    /// The store with journals bounded by `limits`.
    pub fn with_journal_limits(mut self, limits: JournalLimits) -> SqliteStore {
        self.limits = limits;
        self
    }

    /// Applies the embedded migrations (creating the file if needed).
    pub async fn migrate(url: &str) -> StoreResult<()> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(backend)?
            .create_if_missing(true)
            .busy_timeout(Duration::from_secs(10));
        // Through a one-connection pool: with a bare connection, sqlx's `Migrator::run`
        // makes the caller's future lose `Send`.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .map_err(backend)?;
        MIGRATOR.run(&pool).await.map_err(backend)?;
        pool.close().await;
        Ok(())
    }

    /// Runs `f` inside the next group-committed transaction and returns its result once the
    /// transaction is durable. A backend error rolls back the whole batch.
    async fn write<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        self.write_tx(move |tx| f(&tx.conn)).await
    }

    /// As [`SqliteStore::write`], with the tables of the transaction.
    async fn write_tx<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut SqliteTx) -> StoreResult<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let op = WriteOp::Once(Some(Box::new(move |conn| {
            let result = f(conn);
            let ran = Ran::of(&result);
            let reply: Reply = Box::new(move |commit_error: Option<&StoreError>| {
                let _ = tx.send(settled(result, commit_error));
            });
            (reply, ran)
        })));
        self.writes.send(op).await.map_err(|_| StoreError::Closed)?;
        rx.await
            .map_err(|_| StoreError::Backend("the write was not committed".into()))?
    }

    /// Runs `f` on a read-only connection on a blocking thread.
    async fn read<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        let readers = Arc::clone(&self.readers);
        let permit = Arc::clone(&readers.permits)
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Closed)?;
        tokio::task::spawn_blocking(move || {
            let result = readers.with(f);
            drop(permit);
            result
        })
        .await
        .map_err(backend)?
    }
}

struct ReaderPool {
    path: String,
    idle: Mutex<Vec<Connection>>,
    /// Bounds the reads in flight, so that connections are reused rather than opened.
    permits: Arc<tokio::sync::Semaphore>,
}

impl ReaderPool {
    fn with<T>(&self, f: impl FnOnce(&Connection) -> StoreResult<T>) -> StoreResult<T> {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let conn = match idle {
            Some(conn) => conn,
            None => open_connection(&self.path, true)?,
        };
        let result = f(&conn);
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < READERS {
            idle.push(conn);
        }
        result
    }
}

fn write_loop(
    mut tx: SqliteTx,
    mut queue: mpsc::Receiver<WriteOp>,
    restart: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = queue.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        commit_batch(&mut tx, &mut batch);
        if restart.swap(false, std::sync::atomic::Ordering::Relaxed) {
            let conn = &tx.conn;
            // Between two batches, no write is in progress: finish copying the log and
            // make the next write start it over (truncated to `journal_size_limit`). It
            // waits only for reads in flight, which are short.
            match conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |row| {
                row.get::<_, i64>(0)
            }) {
                // Busy (a checkpoint or a long read held it): the next pass asks again.
                Ok(busy) if busy != 0 => {
                    restart.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "restarting the write-ahead log failed"),
            }
        }
    }
}

fn commit_batch(tx: &mut SqliteTx, batch: &mut Vec<WriteOp>) {
    let started = std::time::Instant::now();
    metrics::histogram!(crate::store::BATCH_METRIC).record(batch.len() as f64);
    if !tx.conn.is_autocommit() {
        // A transaction an earlier batch could not end (its ROLLBACK failed): end it now,
        // or no batch would ever begin again.
        if let Err(error) = execute(&tx.conn, "ROLLBACK", []) {
            tracing::error!(%error, "could not end a transaction left open");
        }
    }
    if let Err(error) = execute(&tx.conn, "BEGIN IMMEDIATE", []) {
        // Dropping the ops tells each caller that its write was not committed.
        batch.clear();
        tracing::error!(%error, "could not begin a write transaction");
        return;
    }
    // A write that runs once cannot run again: beside others, it has a savepoint from the
    // start.
    let savepoints = batch.len() > 1 && batch.iter().any(|op| matches!(op, WriteOp::Once(_)));
    let (mut answers, mut ran) = run_batch(tx, batch, savepoints);
    if ran == Ran::Refused && !savepoints && batch.len() > 1 {
        // Repeatable rules, one of which refused after it may have written: all again,
        // each under a savepoint.
        metrics::counter!(crate::store::BATCH_RETRIED_METRIC).increment(1);
        let again = execute(&tx.conn, "ROLLBACK", [])
            .and_then(|_| execute(&tx.conn, "BEGIN IMMEDIATE", []));
        (answers, ran) = match again {
            Ok(_) => run_batch(tx, batch, true),
            Err(error) => {
                tracing::error!(%error, "could not run a batch again with savepoints");
                batch.clear();
                return;
            }
        };
    }
    let conn = &tx.conn;
    let error = match ran {
        Ran::Broke => {
            let _ = execute(conn, "ROLLBACK", []);
            Some(StoreError::Backend(
                "a write in the same transaction failed; nothing was written".into(),
            ))
        }
        // The batch's only write refused: nothing to keep, and its caller gets its own
        // error.
        Ran::Refused if !savepoints && batch.len() == 1 => {
            let _ = execute(conn, "ROLLBACK", []);
            None
        }
        _ => match execute(conn, "COMMIT", []) {
            Ok(_) => None,
            Err(e) => {
                tracing::error!(error = %e, "commit failed");
                let _ = execute(conn, "ROLLBACK", []);
                Some(e)
            }
        },
    };
    metrics::histogram!(crate::store::COMMIT_METRIC).record(started.elapsed().as_secs_f64());
    // The writes that did not run (after one that broke the batch) are dropped, which
    // tells their callers that nothing was committed.
    for (op, answer) in batch.drain(..).zip(answers) {
        match (op, answer) {
            (_, Answer::Once(reply)) => reply(error.as_ref()),
            (WriteOp::Repeatable(write), Answer::Repeatable(result)) => {
                let _ = write.answer.send(settled(result, error.as_ref()));
            }
            (WriteOp::Once(_), Answer::Repeatable(_)) => {}
        }
    }
}

/// Runs the writes of `batch` in order, each under a savepoint of its own when
/// `savepoints`, until one breaks the transaction; answers for those that ran, and the
/// worst that happened (`Refused` only without savepoints: with them, a refused write's
/// savepoint is rolled back and the batch goes on).
fn run_batch(tx: &mut SqliteTx, batch: &mut [WriteOp], savepoints: bool) -> (Vec<Answer>, Ran) {
    let mut answers = Vec::with_capacity(batch.len());
    let mut worst = Ran::Done;
    for op in batch.iter_mut() {
        if savepoints {
            if let Err(error) = execute(&tx.conn, "SAVEPOINT write", []) {
                tracing::error!(%error, "could not open a savepoint");
                return (answers, Ran::Broke);
            }
        }
        let (answer, ran) = match op {
            WriteOp::Once(write) => match write.take() {
                Some(write) => {
                    let (reply, ran) = write(tx);
                    (Answer::Once(reply), ran)
                }
                // Run already: never the case, since a batch with such a write is run once.
                None => return (answers, Ran::Broke),
            },
            WriteOp::Repeatable(write) => {
                let result = (write.run)(tx);
                let ran = Ran::of(&result);
                (Answer::Repeatable(result), ran)
            }
        };
        answers.push(answer);
        // Some errors (disk full, I/O) make SQLite roll the transaction back by itself;
        // running the rest would commit them one by one, so the batch stops here.
        if ran == Ran::Broke || tx.conn.is_autocommit() {
            return (answers, Ran::Broke);
        }
        if savepoints {
            let closed = match ran {
                Ran::Refused => execute(&tx.conn, "ROLLBACK TO write", [])
                    .and_then(|_| execute(&tx.conn, "RELEASE write", [])),
                _ => execute(&tx.conn, "RELEASE write", []),
            };
            if let Err(error) = closed {
                tracing::error!(%error, "could not close a savepoint");
                return (answers, Ran::Broke);
            }
        } else if ran == Ran::Refused {
            worst = Ran::Refused;
        }
    }
    (answers, worst)
}

const TARGET_SELECT: &str = "SELECT h.deployment_id, d.url, d.protocol, h.service, h.handler, \
     h.spec FROM handlers h JOIN deployments d ON d.id = h.deployment_id";

/// Runs a rule over the tables of the SQLite store to its end: every table method
/// completes at once (a direct call into SQLite), so the rule never waits.
fn run_now<T>(rule: impl std::future::Future<Output = StoreResult<T>>) -> StoreResult<T> {
    use futures_util::FutureExt;
    rule.now_or_never().unwrap_or_else(|| {
        Err(corrupt(
            "a rule waited for something outside the store".into(),
        ))
    })
}

#[async_trait]
impl Store for SqliteStore {
    async fn transact(&self, _key: &str, rule: TxFn) -> StoreResult<TxOutput> {
        self.write_tx(move |tx| run_now(rule(tx))).await
    }

    async fn transact_repeatable(&self, _key: &str, rule: RepeatableTxFn) -> StoreResult<TxOutput> {
        let (answer, rx) = oneshot::channel();
        let op = WriteOp::Repeatable(RepeatableWrite {
            run: Box::new(move |tx| run_now(rule(tx))),
            answer,
        });
        self.writes.send(op).await.map_err(|_| StoreError::Closed)?;
        rx.await
            .map_err(|_| StoreError::Backend("the write was not committed".into()))?
    }

    fn journal_limits(&self) -> JournalLimits {
        self.limits
    }

    async fn register_deployment(
        &self,
        new: NewDeployment,
    ) -> StoreResult<(DeploymentRecord, bool)> {
        self.write(move |conn| {
            if let Some(mut record) = latest_deployment(conn, &new.url)? {
                if record.services == new.services && record.protocol == new.protocol {
                    // The same deployment: registering it active activates it.
                    if new.active && !record.active {
                        execute(
                            conn,
                            "UPDATE deployments SET active = 1 WHERE id = ?1",
                            params![record.id],
                        )?;
                        record.active = true;
                    }
                    return Ok((record, false));
                }
            }
            let id = crate::ids::new_deployment_id();
            execute(
                conn,
                "INSERT INTO deployments (id, url, protocol, services, created_at_ms, active) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    id,
                    new.url,
                    new.protocol.to_text(),
                    to_json(&new.services)?,
                    new.now_ms,
                    new.active
                ],
            )?;
            for service in &new.services {
                for handler in &service.handlers {
                    execute(
                        conn,
                        "INSERT INTO handlers (deployment_id, service, handler, spec) \
                         VALUES (?1, ?2, ?3, ?4)",
                        params![id, service.name, handler.name, to_json(handler)?],
                    )?;
                }
            }
            let record = DeploymentRecord {
                id,
                url: new.url,
                protocol: new.protocol,
                services: new.services,
                created_at_ms: new.now_ms,
                active: new.active,
            };
            Ok((record, true))
        })
        .await
    }

    async fn list_deployments(&self) -> StoreResult<Vec<DeploymentRecord>> {
        self.read(|conn| {
            query_all(
                conn,
                "SELECT id, url, protocol, services, created_at_ms, active FROM deployments \
                 ORDER BY id",
                [],
                deployment,
            )
        })
        .await
    }

    async fn activate_deployment(&self, id: &str) -> StoreResult<Option<DeploymentRecord>> {
        let id = id.to_owned();
        self.write(move |conn| {
            execute(
                conn,
                "UPDATE deployments SET active = 1 WHERE id = ?1",
                params![id],
            )?;
            query_one(
                conn,
                "SELECT id, url, protocol, services, created_at_ms, active FROM deployments \
                 WHERE id = ?1",
                [&id],
                deployment,
            )
        })
        .await
    }

    async fn latest_handler(
        &self,
        service: &str,
        handler: &str,
    ) -> StoreResult<Option<HandlerTarget>> {
        let (service, handler) = (service.to_owned(), handler.to_owned());
        self.read(move |conn| {
            let sql = format!(
                "{TARGET_SELECT} WHERE h.service = ?1 AND h.handler = ?2 AND d.active \
                 ORDER BY h.deployment_id DESC LIMIT 1"
            );
            query_one(conn, &sql, [service, handler], target)
        })
        .await
    }

    async fn deployment_handler(
        &self,
        deployment_id: &str,
        service: &str,
        handler: &str,
    ) -> StoreResult<Option<HandlerTarget>> {
        let keys = [
            deployment_id.to_owned(),
            service.to_owned(),
            handler.to_owned(),
        ];
        self.read(move |conn| {
            let sql = format!(
                "{TARGET_SELECT} WHERE h.deployment_id = ?1 AND h.service = ?2 AND h.handler = ?3"
            );
            query_one(conn, &sql, keys, target)
        })
        .await
    }

    async fn get_invocation(&self, id: &InvocationId) -> StoreResult<Option<InvocationRecord>> {
        let id = id.clone();
        self.read(move |conn| fetch_invocation(conn, id.as_str()))
            .await
    }

    async fn read_journal(&self, id: &InvocationId) -> StoreResult<Vec<StoredEntry>> {
        let id = id.clone();
        self.read(move |conn| {
            let sql = format!("{ENTRY_SELECT} WHERE j.invocation_id = ?1 ORDER BY j.idx");
            query_all(conn, &sql, [id.as_str()], entry)
        })
        .await
    }

    async fn read_entry(&self, id: &InvocationId, index: u32) -> StoreResult<Option<StoredEntry>> {
        let id = id.clone();
        self.read(move |conn| {
            let sql = format!("{ENTRY_SELECT} WHERE j.invocation_id = ?1 AND j.idx = ?2");
            query_one(conn, &sql, params![id.as_str(), index], entry)
        })
        .await
    }

    async fn list_invocations(
        &self,
        filter: InvocationFilter,
        limit: u32,
    ) -> StoreResult<Vec<InvocationRecord>> {
        self.read(move |conn| {
            let sql = format!(
                "SELECT {INVOCATION_COLUMNS} FROM invocations WHERE {FILTER} \
                 ORDER BY id DESC LIMIT ?7"
            );
            query_all(conn, &sql, filter_params(&filter, limit), invocation)
        })
        .await
    }

    async fn recover_running(&self, now_ms: i64) -> StoreResult<u64> {
        self.write(move |conn| {
            let n = execute(conn, RECOVER_RUNNING, [now_ms])?;
            Ok(n as u64)
        })
        .await
    }

    async fn next_due(&self) -> StoreResult<Option<i64>> {
        self.read(|conn| {
            conn.prepare_cached(
                "SELECT MIN(next_run_at_ms) FROM invocations WHERE next_run_at_ms IS NOT NULL \
                 AND status IN ('pending', 'backing-off', 'suspended')",
            )
            .map_err(backend)?
            .query_row([], |row| row.get(0))
            .map_err(backend)
        })
        .await
    }

    async fn find_workflow(
        &self,
        workflow: &str,
        workflow_id: &str,
    ) -> StoreResult<Option<InvocationRecord>> {
        let keys = [workflow.to_owned(), workflow_id.to_owned()];
        self.read(move |conn| {
            let sql = format!(
                "SELECT {INVOCATION_COLUMNS} FROM invocations WHERE id = \
                 (SELECT invocation_id FROM workflows WHERE workflow = ?1 AND workflow_id = ?2)"
            );
            query_one(conn, &sql, keys, invocation)
        })
        .await
    }

    async fn workflow_runs(
        &self,
        workflow: &str,
        workflow_id: &str,
    ) -> StoreResult<Vec<InvocationRecord>> {
        let keys = [workflow.to_owned(), workflow_id.to_owned()];
        self.read(move |conn| {
            let sql = format!(
                "SELECT {INVOCATION_COLUMNS} FROM invocations \
                 WHERE service = ?1 AND workflow_id = ?2 ORDER BY id"
            );
            query_all(conn, &sql, keys, invocation)
        })
        .await
    }

    async fn key_state(&self, service: &str, key: &str) -> StoreResult<Vec<(String, Vec<u8>)>> {
        let (service, key) = (service.to_owned(), key.to_owned());
        self.read(move |conn| {
            query_all(
                conn,
                "SELECT name, value FROM key_state WHERE service = ?1 AND key = ?2 ORDER BY name",
                rusqlite::params![service, key],
                |row| Ok(Ok((row.get(0)?, row.get(1)?))),
            )
        })
        .await
    }

    async fn key_invocations(
        &self,
        service: &str,
        key: &str,
        limit: u32,
    ) -> StoreResult<Vec<InvocationRecord>> {
        let (service, key) = (service.to_owned(), key.to_owned());
        self.read(move |conn| {
            let sql = format!(
                concat!(
                    "SELECT {INVOCATION_COLUMNS} FROM invocations \
                     WHERE service = ?1 AND concurrency_key = ?2 AND ",
                    unfinished!(),
                    " ORDER BY status = 'queued', key_seq LIMIT ?3"
                ),
                INVOCATION_COLUMNS = INVOCATION_COLUMNS
            );
            query_all(
                conn,
                &sql,
                rusqlite::params![service, key, limit],
                invocation,
            )
        })
        .await
    }

    async fn unconsumed_signals(&self, id: &InvocationId) -> StoreResult<Vec<(u32, String)>> {
        let id = id.clone();
        self.read(move |conn| {
            query_all(
                conn,
                "SELECT seq, name FROM signals WHERE invocation_id = ?1 \
                 AND consumed_by IS NULL ORDER BY seq",
                [id.as_str()],
                |row| Ok(Ok((row.get(0)?, row.get(1)?))),
            )
        })
        .await
    }

    async fn read_state(&self, id: &InvocationId) -> StoreResult<Vec<(String, Option<Vec<u8>>)>> {
        let id = id.clone();
        self.read(move |conn| {
            let mut statement = conn
                .prepare_cached(
                    "SELECT key, value FROM state WHERE invocation_id = ?1 ORDER BY key",
                )
                .map_err(backend)?;
            let rows = statement
                .query_map([id.as_str()], |row| Ok((row.get(0)?, row.get(1)?)))
                .map_err(backend)?;
            rows.collect::<rusqlite::Result<_>>().map_err(backend)
        })
        .await
    }

    async fn gateway_secret(&self, name: &str) -> StoreResult<Vec<u8>> {
        let name = name.to_owned();
        self.write(move |conn| {
            let fresh: Vec<u8> = (0..2)
                .flat_map(|_| *uuid::Uuid::new_v4().as_bytes())
                .collect();
            execute(
                conn,
                "INSERT INTO gateway_secrets (name, secret) VALUES (?1, ?2) \
                 ON CONFLICT (name) DO NOTHING",
                params![name, fresh],
            )?;
            conn.prepare_cached("SELECT secret FROM gateway_secrets WHERE name = ?1")
                .map_err(backend)?
                .query_row([name], |row| row.get(0))
                .map_err(backend)
        })
        .await
    }

    async fn heartbeat_details(&self, id: &InvocationId) -> StoreResult<Option<Vec<u8>>> {
        let id = id.clone();
        self.read(move |conn| {
            conn.prepare_cached("SELECT heartbeat_details FROM invocations WHERE id = ?1")
                .map_err(backend)?
                .query_row([id.as_str()], |row| row.get(0))
                .optional()
                .map(Option::flatten)
                .map_err(backend)
        })
        .await
    }

    async fn get_update(&self, run: &InvocationId, id: &str) -> StoreResult<Option<UpdateRecord>> {
        let keys = [run.to_string(), id.to_owned()];
        self.read(move |conn| {
            let sql = format!(
                "SELECT {} FROM updates WHERE invocation_id = ?1 AND id = ?2",
                tables::UPDATE_COLUMNS
            );
            query_one(conn, &sql, keys, tables::update_row)
        })
        .await
    }

    async fn find_workflow_update(
        &self,
        workflow: &str,
        workflow_id: &str,
        id: &str,
    ) -> StoreResult<Option<UpdateRecord>> {
        let keys = [workflow.to_owned(), workflow_id.to_owned(), id.to_owned()];
        self.read(move |conn| {
            let sql = format!(
                "SELECT {} FROM updates WHERE id = ?3 AND invocation_id IN \
                 (SELECT id FROM invocations WHERE service = ?1 AND workflow_id = ?2)",
                tables::UPDATE_COLUMNS
            );
            query_one(conn, &sql, keys, tables::update_row)
        })
        .await
    }

    async fn pending_updates(
        &self,
        run: &InvocationId,
    ) -> StoreResult<Vec<durin_protocol::PendingUpdate>> {
        let run = run.to_string();
        self.read(move |conn| {
            let mut statement = conn
                .prepare_cached(
                    "SELECT id, name, input FROM updates WHERE invocation_id = ?1 \
                     AND status = 'pending' ORDER BY created_at_ms, id",
                )
                .map_err(backend)?;
            let rows = statement
                .query_map([run], |row| {
                    let input: Vec<u8> = row.get(2)?;
                    Ok(durin_protocol::PendingUpdate {
                        id: row.get(0)?,
                        name: row.get(1)?,
                        input: serde_json::from_slice(&input).unwrap_or_default(),
                    })
                })
                .map_err(backend)?;
            rows.collect::<rusqlite::Result<_>>().map_err(backend)
        })
        .await
    }

    async fn select_invocations(
        &self,
        filter: InvocationFilter,
        limit: u32,
    ) -> StoreResult<Vec<InvocationId>> {
        self.read(move |conn| {
            let mut statement = conn
                .prepare_cached(&format!(
                    "SELECT id FROM invocations WHERE {FILTER} ORDER BY id LIMIT ?7"
                ))
                .map_err(backend)?;
            let rows = statement
                .query_map(filter_params(&filter, limit), |row| row.get::<_, String>(0))
                .map_err(backend)?;
            let ids: Vec<String> = rows.collect::<rusqlite::Result<_>>().map_err(backend)?;
            ids.iter()
                .map(|id| InvocationId::parse(id).map_err(corrupt))
                .collect()
        })
        .await
    }

    async fn count_unfinished(&self) -> StoreResult<Vec<(String, u64)>> {
        self.read(|conn| {
            counts(
                conn,
                "SELECT status, COUNT(*) FROM invocations WHERE completed_at_ms IS NULL \
                 GROUP BY status",
            )
        })
        .await
    }

    async fn count_pending(&self) -> StoreResult<u64> {
        self.read(|conn| {
            conn.prepare_cached(COUNT_PENDING)
                .map_err(backend)?
                .query_row([], |row| row.get::<_, i64>(0))
                .map(|n| n.max(0) as u64)
                .map_err(backend)
        })
        .await
    }

    async fn count_waiting(&self) -> StoreResult<Vec<(String, u64)>> {
        self.read(|conn| {
            counts(
                conn,
                "SELECT j.kind, COUNT(DISTINCT i.id) FROM invocations i \
                 JOIN json_each(i.waiting_for) w \
                 JOIN journal j ON j.invocation_id = i.id AND j.idx = w.value \
                 WHERE i.status = 'suspended' GROUP BY j.kind \
                 UNION ALL \
                 SELECT 'none', COUNT(*) FROM invocations WHERE status = 'suspended' \
                 AND (waiting_for IS NULL OR json_array_length(waiting_for) = 0)",
            )
        })
        .await
    }

    async fn ping(&self) -> StoreResult<()> {
        self.read(|conn| conn.query_row("SELECT 1", [], |_| Ok(())).map_err(backend))
            .await
    }

    async fn list_webhook_sources(&self) -> StoreResult<Vec<WebhookSourceRow>> {
        self.read(|conn| {
            query_all(
                conn,
                &format!("SELECT {WEBHOOK_SOURCE_COLUMNS} FROM webhook_sources ORDER BY name"),
                [],
                webhook_source,
            )
        })
        .await
    }

    async fn get_webhook_source(&self, name: &str) -> StoreResult<Option<WebhookSourceRow>> {
        let name = name.to_owned();
        self.read(move |conn| {
            query_one(
                conn,
                &format!("SELECT {WEBHOOK_SOURCE_COLUMNS} FROM webhook_sources WHERE name = ?1"),
                [name],
                webhook_source,
            )
        })
        .await
    }

    async fn webhook_deliveries(&self, source: &str, limit: u32) -> StoreResult<Vec<String>> {
        let source = source.to_owned();
        self.read(move |conn| {
            query_all(
                conn,
                "SELECT delivery FROM webhook_deliveries WHERE source = ?1 \
                 ORDER BY id DESC LIMIT ?2",
                rusqlite::params![source, limit],
                |row| Ok(Ok(row.get(0)?)),
            )
        })
        .await
    }

    async fn list_schedules(&self) -> StoreResult<Vec<ScheduleRow>> {
        self.read(|conn| {
            query_all(
                conn,
                &format!("SELECT {SCHEDULE_COLUMNS} FROM schedules ORDER BY id"),
                [],
                schedule,
            )
        })
        .await
    }

    async fn get_schedule(&self, id: &str) -> StoreResult<Option<ScheduleRow>> {
        let id = id.to_owned();
        self.read(move |conn| {
            query_one(
                conn,
                &format!("SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE id = ?1"),
                [id],
                schedule,
            )
        })
        .await
    }

    async fn due_schedules(&self, now_ms: i64, limit: u32) -> StoreResult<Vec<String>> {
        self.read(move |conn| {
            query_all(
                conn,
                "SELECT id FROM schedules WHERE due_ms IS NOT NULL AND due_ms <= ?1 \
                 ORDER BY due_ms LIMIT ?2",
                params![now_ms, limit],
                |row| Ok(Ok(row.get(0)?)),
            )
        })
        .await
    }

    async fn next_schedule_due(&self) -> StoreResult<Option<i64>> {
        self.read(|conn| {
            conn.prepare_cached("SELECT MIN(due_ms) FROM schedules WHERE due_ms IS NOT NULL")
                .map_err(backend)?
                .query_row([], |row| row.get(0))
                .map_err(backend)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::database_path;

    #[test]
    fn database_urls() {
        assert_eq!(database_path("sqlite:durin.db").unwrap(), "durin.db");
        assert_eq!(
            database_path("sqlite:///tmp/d.db?mode=rwc").unwrap(),
            "/tmp/d.db"
        );
        assert!(database_path("sqlite::memory:").is_err());
        assert!(database_path("postgres://x").is_err());
    }
}
