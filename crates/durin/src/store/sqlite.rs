//! The embedded store: one SQLite file in WAL mode with `synchronous=FULL`.
//!
//! Writes are group-committed. Every write is a closure sent to one writer task that owns
//! the only writing connection; the task takes whatever has queued up (up to
//! [`MAX_BATCH`]), runs it all in one `BEGIN IMMEDIATE` transaction, commits once (one fsync)
//! and only then answers each caller. So "acknowledged" always means "on disk", and a busy
//! gateway pays one fsync per batch instead of one per append. Reads go to a pool of
//! read-only connections, which WAL lets run beside the writer.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use durin_protocol::{EntryKind, Failure, HandlerSpec};
use futures_util::future::BoxFuture;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{Connection, FromRow};
use tokio::sync::{mpsc, oneshot};

use super::*;

/// The most writes one transaction carries.
const MAX_BATCH: usize = 512;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// After the batch's commit (or its failure), hands each caller its result.
type Reply = Box<dyn FnOnce(Option<&StoreError>) + Send>;
type WriteOp =
    Box<dyn for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, (Reply, bool)> + Send>;

pub struct SqliteStore {
    reads: SqlitePool,
    writes: mpsc::Sender<WriteOp>,
}

fn backend(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Backend(Box::new(e))
}

fn connect_options(url: &str) -> StoreResult<SqliteConnectOptions> {
    Ok(SqliteConnectOptions::from_str(url)
        .map_err(backend)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(10))
        .foreign_keys(true))
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `url` and applies the embedded migrations.
    pub async fn open(url: &str) -> StoreResult<SqliteStore> {
        let options = connect_options(url)?;
        apply_migrations(&options).await?;
        let writer = SqliteConnection::connect_with(&options)
            .await
            .map_err(backend)?;
        let reads = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await
            .map_err(backend)?;
        let (writes, queue) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(write_loop(writer, queue));
        Ok(SqliteStore { reads, writes })
    }

    /// Applies the embedded migrations and closes the database.
    pub async fn migrate(url: &str) -> StoreResult<()> {
        apply_migrations(&connect_options(url)?).await
    }

    /// Runs `f` inside the next group-committed transaction and returns its result once the
    /// transaction is durable. A backend error rolls back the whole batch.
    async fn write<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, StoreResult<T>>
            + Send
            + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let op: WriteOp = Box::new(move |conn| {
            Box::pin(async move {
                let result = f(conn).await;
                let poisons = matches!(result, Err(StoreError::Backend(_)));
                let reply: Reply = Box::new(move |commit_error: Option<&StoreError>| {
                    let result = match commit_error {
                        Some(e) if !poisons => Err(StoreError::Backend(e.to_string().into())),
                        _ => result,
                    };
                    let _ = tx.send(result);
                });
                (reply, poisons)
            })
        });
        self.writes.send(op).await.map_err(|_| StoreError::Closed)?;
        rx.await
            .map_err(|_| StoreError::Backend("the write was not committed".into()))?
    }
}

/// Runs the migrations through a one-connection pool: with a bare `&mut SqliteConnection`,
/// sqlx's `Migrator::run` makes the caller's future lose `Send`.
async fn apply_migrations(options: &SqliteConnectOptions) -> StoreResult<()> {
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options.clone())
        .await
        .map_err(backend)?;
    MIGRATOR.run(&pool).await.map_err(backend)?;
    pool.close().await;
    Ok(())
}

async fn write_loop(mut conn: SqliteConnection, mut queue: mpsc::Receiver<WriteOp>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        commit_batch(&mut conn, &mut batch).await;
    }
    let _ = conn.close().await;
}

async fn commit_batch(conn: &mut SqliteConnection, batch: &mut Vec<WriteOp>) {
    if let Err(error) = sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await {
        // Dropping the ops tells each caller that its write was not committed.
        batch.clear();
        tracing::error!(%error, "could not begin a write transaction");
        return;
    }
    let mut replies = Vec::with_capacity(batch.len());
    let mut poisoned = false;
    for op in batch.drain(..) {
        let (reply, poisons) = op(conn).await;
        poisoned |= poisons;
        replies.push(reply);
    }
    let end = if poisoned { "ROLLBACK" } else { "COMMIT" };
    let outcome = sqlx::query(end).execute(&mut *conn).await;
    let error = match (poisoned, outcome) {
        (false, Ok(_)) => None,
        (true, _) => Some(StoreError::Backend(
            "a write in the same transaction failed; nothing was written".into(),
        )),
        (false, Err(e)) => {
            tracing::error!(error = %e, "commit failed");
            let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
            Some(backend(e))
        }
    };
    for reply in replies {
        reply(error.as_ref());
    }
}

const INVOCATION_COLUMNS: &str = "id, service, handler, deployment_id, status, attempt, failures, \
    position_failures, journal_len, next_run_at_ms, last_error, failure, idempotency_key, \
    created_at_ms, modified_at_ms, completed_at_ms";

#[derive(FromRow)]
struct InvocationRow {
    id: String,
    service: String,
    handler: String,
    deployment_id: String,
    status: String,
    attempt: i64,
    failures: i64,
    position_failures: i64,
    journal_len: i64,
    next_run_at_ms: Option<i64>,
    last_error: Option<String>,
    failure: Option<String>,
    idempotency_key: Option<String>,
    created_at_ms: i64,
    modified_at_ms: i64,
    completed_at_ms: Option<i64>,
}

fn corrupt(what: String) -> StoreError {
    StoreError::Backend(what.into())
}

impl TryFrom<InvocationRow> for InvocationRecord {
    type Error = StoreError;

    fn try_from(row: InvocationRow) -> StoreResult<InvocationRecord> {
        Ok(InvocationRecord {
            id: InvocationId::parse(&row.id).map_err(corrupt)?,
            status: Status::parse(&row.status)
                .ok_or_else(|| corrupt(format!("unknown status {:?}", row.status)))?,
            failure: row
                .failure
                .map(|f| serde_json::from_str::<Failure>(&f))
                .transpose()
                .map_err(backend)?,
            service: row.service,
            handler: row.handler,
            deployment_id: row.deployment_id,
            attempt: row.attempt as u32,
            failures: row.failures as u32,
            position_failures: row.position_failures as u32,
            journal_len: row.journal_len as u32,
            next_run_at_ms: row.next_run_at_ms,
            last_error: row.last_error,
            idempotency_key: row.idempotency_key,
            created_at_ms: row.created_at_ms,
            modified_at_ms: row.modified_at_ms,
            completed_at_ms: row.completed_at_ms,
        })
    }
}

#[derive(FromRow)]
struct EntryRow {
    idx: i64,
    kind: String,
    name: Option<String>,
    value: Option<Vec<u8>>,
    content_type: Option<String>,
    failure: Option<String>,
    attempt: i64,
    at_ms: i64,
}

impl TryFrom<EntryRow> for StoredEntry {
    type Error = StoreError;

    fn try_from(row: EntryRow) -> StoreResult<StoredEntry> {
        Ok(StoredEntry {
            index: row.idx as u32,
            kind: EntryKind::parse(&row.kind)
                .ok_or_else(|| corrupt(format!("unknown entry kind {:?}", row.kind)))?,
            failure: row
                .failure
                .map(|f| serde_json::from_str::<Failure>(&f))
                .transpose()
                .map_err(backend)?,
            name: row.name,
            value: row.value,
            content_type: row.content_type,
            attempt: row.attempt as u32,
            at_ms: row.at_ms,
        })
    }
}

#[derive(FromRow)]
struct DeploymentRow {
    id: String,
    url: String,
    protocol: String,
    services: String,
    created_at_ms: i64,
}

impl TryFrom<DeploymentRow> for DeploymentRecord {
    type Error = StoreError;

    fn try_from(row: DeploymentRow) -> StoreResult<DeploymentRecord> {
        Ok(DeploymentRecord {
            protocol: HandlerProtocol::parse(&row.protocol)
                .ok_or_else(|| corrupt(format!("unknown protocol {:?}", row.protocol)))?,
            services: serde_json::from_str(&row.services).map_err(backend)?,
            id: row.id,
            url: row.url,
            created_at_ms: row.created_at_ms,
        })
    }
}

#[derive(FromRow)]
struct TargetRow {
    deployment_id: String,
    url: String,
    protocol: String,
    service: String,
    handler: String,
    spec: String,
}

impl TryFrom<TargetRow> for HandlerTarget {
    type Error = StoreError;

    fn try_from(row: TargetRow) -> StoreResult<HandlerTarget> {
        Ok(HandlerTarget {
            protocol: HandlerProtocol::parse(&row.protocol)
                .ok_or_else(|| corrupt(format!("unknown protocol {:?}", row.protocol)))?,
            spec: serde_json::from_str::<HandlerSpec>(&row.spec).map_err(backend)?,
            deployment_id: row.deployment_id,
            url: row.url,
            service: row.service,
            handler: row.handler,
        })
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> StoreResult<String> {
    serde_json::to_string(value).map_err(backend)
}

async fn fetch_invocation(
    conn: &mut SqliteConnection,
    id: &str,
) -> StoreResult<Option<InvocationRecord>> {
    let sql = format!("SELECT {INVOCATION_COLUMNS} FROM invocations WHERE id = ?");
    sqlx::query_as::<_, InvocationRow>(&sql)
        .bind(id)
        .fetch_optional(conn)
        .await
        .map_err(backend)?
        .map(InvocationRecord::try_from)
        .transpose()
}

/// Explains why a fenced write matched no row: no such invocation, or not its attempt.
async fn refusal(conn: &mut SqliteConnection, id: &str, attempt: u32) -> StoreError {
    match fetch_invocation(conn, id).await {
        Ok(None) => StoreError::NotFound(id.to_owned()),
        Ok(Some(record)) => StoreError::Fenced {
            invocation_id: id.to_owned(),
            attempt,
            current_attempt: record.attempt,
            status: record.status,
        },
        Err(e) => e,
    }
}

#[allow(clippy::too_many_arguments)]
async fn insert_entry(
    conn: &mut SqliteConnection,
    id: &str,
    index: u32,
    kind: EntryKind,
    name: Option<&str>,
    value: Option<&[u8]>,
    content_type: Option<&str>,
    failure: Option<&Failure>,
    attempt: u32,
    now_ms: i64,
) -> StoreResult<()> {
    let failure = failure.map(to_json).transpose()?;
    sqlx::query(
        "INSERT INTO journal (invocation_id, idx, kind, name, value, content_type, failure, attempt, at_ms) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(id)
    .bind(index as i64)
    .bind(kind.as_str())
    .bind(name)
    .bind(value)
    .bind(content_type)
    .bind(failure)
    .bind(attempt as i64)
    .bind(now_ms)
    .execute(conn)
    .await
    .map_err(backend)?;
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    async fn register_deployment(
        &self,
        new: NewDeployment,
    ) -> StoreResult<(DeploymentRecord, bool)> {
        self.write(move |conn| {
            Box::pin(async move {
                let services_json = to_json(&new.services)?;
                let latest = sqlx::query_as::<_, DeploymentRow>(
                    "SELECT id, url, protocol, services, created_at_ms FROM deployments \
                     WHERE url = ? ORDER BY id DESC LIMIT 1",
                )
                .bind(&new.url)
                .fetch_optional(&mut *conn)
                .await
                .map_err(backend)?;
                if let Some(row) = latest {
                    let record = DeploymentRecord::try_from(row)?;
                    if record.services == new.services && record.protocol == new.protocol {
                        return Ok((record, false));
                    }
                }
                let id = crate::ids::new_deployment_id();
                sqlx::query(
                    "INSERT INTO deployments (id, url, protocol, services, created_at_ms) VALUES (?, ?, ?, ?, ?)",
                )
                .bind(&id)
                .bind(&new.url)
                .bind(new.protocol.as_str())
                .bind(&services_json)
                .bind(new.now_ms)
                .execute(&mut *conn)
                .await
                .map_err(backend)?;
                for service in &new.services {
                    for handler in &service.handlers {
                        sqlx::query(
                            "INSERT INTO handlers (deployment_id, service, handler, spec) VALUES (?, ?, ?, ?)",
                        )
                        .bind(&id)
                        .bind(&service.name)
                        .bind(&handler.name)
                        .bind(to_json(handler)?)
                        .execute(&mut *conn)
                        .await
                        .map_err(backend)?;
                    }
                }
                let record = DeploymentRecord {
                    id,
                    url: new.url,
                    protocol: new.protocol,
                    services: new.services,
                    created_at_ms: new.now_ms,
                };
                Ok((record, true))
            })
        })
        .await
    }

    async fn list_deployments(&self) -> StoreResult<Vec<DeploymentRecord>> {
        sqlx::query_as::<_, DeploymentRow>(
            "SELECT id, url, protocol, services, created_at_ms FROM deployments ORDER BY id",
        )
        .fetch_all(&self.reads)
        .await
        .map_err(backend)?
        .into_iter()
        .map(DeploymentRecord::try_from)
        .collect()
    }

    async fn latest_handler(
        &self,
        service: &str,
        handler: &str,
    ) -> StoreResult<Option<HandlerTarget>> {
        sqlx::query_as::<_, TargetRow>(
            "SELECT h.deployment_id, d.url, d.protocol, h.service, h.handler, h.spec \
             FROM handlers h JOIN deployments d ON d.id = h.deployment_id \
             WHERE h.service = ? AND h.handler = ? ORDER BY h.deployment_id DESC LIMIT 1",
        )
        .bind(service)
        .bind(handler)
        .fetch_optional(&self.reads)
        .await
        .map_err(backend)?
        .map(HandlerTarget::try_from)
        .transpose()
    }

    async fn deployment_handler(
        &self,
        deployment_id: &str,
        service: &str,
        handler: &str,
    ) -> StoreResult<Option<HandlerTarget>> {
        sqlx::query_as::<_, TargetRow>(
            "SELECT h.deployment_id, d.url, d.protocol, h.service, h.handler, h.spec \
             FROM handlers h JOIN deployments d ON d.id = h.deployment_id \
             WHERE h.deployment_id = ? AND h.service = ? AND h.handler = ?",
        )
        .bind(deployment_id)
        .bind(service)
        .bind(handler)
        .fetch_optional(&self.reads)
        .await
        .map_err(backend)?
        .map(HandlerTarget::try_from)
        .transpose()
    }

    async fn create_invocation(&self, new: NewInvocation) -> StoreResult<Created> {
        self.write(move |conn| {
            Box::pin(async move {
                if let Some(claim) = &new.idempotency {
                    let seen: Option<(String, String, i64)> = sqlx::query_as(
                        "SELECT request_digest, invocation_id, expires_at_ms FROM idempotency_keys \
                         WHERE scope = ? AND key = ?",
                    )
                    .bind(&claim.scope)
                    .bind(&claim.key)
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(backend)?;
                    if let Some((digest, invocation_id, expires_at_ms)) = seen {
                        if expires_at_ms > new.now_ms {
                            if digest != claim.request_digest {
                                return Ok(Created::KeyReused { invocation_id });
                            }
                            return match fetch_invocation(conn, &invocation_id).await? {
                                Some(record) => Ok(Created::Existing(record)),
                                None => Err(corrupt(format!(
                                    "idempotency key names missing invocation {invocation_id}"
                                ))),
                            };
                        }
                        sqlx::query("DELETE FROM idempotency_keys WHERE scope = ? AND key = ?")
                            .bind(&claim.scope)
                            .bind(&claim.key)
                            .execute(&mut *conn)
                            .await
                            .map_err(backend)?;
                    }
                }
                let id = new.id.as_str();
                let sql = format!(
                    "INSERT INTO invocations (id, service, handler, deployment_id, status, attempt, \
                     failures, position_failures, journal_len, next_run_at_ms, idempotency_key, \
                     created_at_ms, modified_at_ms) \
                     VALUES (?, ?, ?, ?, 'pending', 0, 0, 0, 1, ?, ?, ?, ?) RETURNING {INVOCATION_COLUMNS}"
                );
                let row = sqlx::query_as::<_, InvocationRow>(&sql)
                    .bind(id)
                    .bind(&new.target.service)
                    .bind(&new.target.handler)
                    .bind(&new.target.deployment_id)
                    .bind(new.now_ms)
                    .bind(new.idempotency.as_ref().map(|c| c.key.as_str()))
                    .bind(new.now_ms)
                    .bind(new.now_ms)
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(backend)?;
                insert_entry(
                    conn,
                    id,
                    0,
                    EntryKind::Input,
                    None,
                    Some(&new.input),
                    new.content_type.as_deref(),
                    None,
                    0,
                    new.now_ms,
                )
                .await?;
                if let Some(claim) = &new.idempotency {
                    sqlx::query(
                        "INSERT INTO idempotency_keys (scope, key, request_digest, invocation_id, expires_at_ms) \
                         VALUES (?, ?, ?, ?, ?)",
                    )
                    .bind(&claim.scope)
                    .bind(&claim.key)
                    .bind(&claim.request_digest)
                    .bind(id)
                    .bind(claim.expires_at_ms)
                    .execute(&mut *conn)
                    .await
                    .map_err(backend)?;
                }
                Ok(Created::New(row.try_into()?))
            })
        })
        .await
    }

    async fn get_invocation(&self, id: &InvocationId) -> StoreResult<Option<InvocationRecord>> {
        let mut conn = self.reads.acquire().await.map_err(backend)?;
        fetch_invocation(&mut conn, id.as_str()).await
    }

    async fn read_journal(&self, id: &InvocationId) -> StoreResult<Vec<StoredEntry>> {
        sqlx::query_as::<_, EntryRow>(
            "SELECT idx, kind, name, value, content_type, failure, attempt, at_ms FROM journal \
             WHERE invocation_id = ? ORDER BY idx",
        )
        .bind(id.as_str())
        .fetch_all(&self.reads)
        .await
        .map_err(backend)?
        .into_iter()
        .map(StoredEntry::try_from)
        .collect()
    }

    async fn read_entry(&self, id: &InvocationId, index: u32) -> StoreResult<Option<StoredEntry>> {
        sqlx::query_as::<_, EntryRow>(
            "SELECT idx, kind, name, value, content_type, failure, attempt, at_ms FROM journal \
             WHERE invocation_id = ? AND idx = ?",
        )
        .bind(id.as_str())
        .bind(index as i64)
        .fetch_optional(&self.reads)
        .await
        .map_err(backend)?
        .map(StoredEntry::try_from)
        .transpose()
    }

    async fn list_invocations(
        &self,
        status: Option<Status>,
        limit: u32,
    ) -> StoreResult<Vec<InvocationRecord>> {
        let sql = format!(
            "SELECT {INVOCATION_COLUMNS} FROM invocations WHERE (?1 IS NULL OR status = ?1) \
             ORDER BY id DESC LIMIT ?2"
        );
        sqlx::query_as::<_, InvocationRow>(&sql)
            .bind(status.map(Status::as_str))
            .bind(limit as i64)
            .fetch_all(&self.reads)
            .await
            .map_err(backend)?
            .into_iter()
            .map(InvocationRecord::try_from)
            .collect()
    }

    async fn list_resumable(&self) -> StoreResult<Vec<InvocationRecord>> {
        let sql = format!(
            "SELECT {INVOCATION_COLUMNS} FROM invocations \
             WHERE status IN ('pending', 'running', 'backing-off', 'suspended') ORDER BY id"
        );
        sqlx::query_as::<_, InvocationRow>(&sql)
            .fetch_all(&self.reads)
            .await
            .map_err(backend)?
            .into_iter()
            .map(InvocationRecord::try_from)
            .collect()
    }

    async fn start_attempt(
        &self,
        id: &InvocationId,
        now_ms: i64,
    ) -> StoreResult<Option<InvocationRecord>> {
        let id = id.clone();
        self.write(move |conn| {
            Box::pin(async move {
                let sql = format!(
                    "UPDATE invocations SET status = 'running', attempt = attempt + 1, \
                     next_run_at_ms = NULL, modified_at_ms = ? \
                     WHERE id = ? AND status IN ('pending', 'running', 'backing-off', 'suspended') \
                     RETURNING {INVOCATION_COLUMNS}"
                );
                sqlx::query_as::<_, InvocationRow>(&sql)
                    .bind(now_ms)
                    .bind(id.as_str())
                    .fetch_optional(conn)
                    .await
                    .map_err(backend)?
                    .map(InvocationRecord::try_from)
                    .transpose()
            })
        })
        .await
    }

    async fn append_entry(
        &self,
        id: &InvocationId,
        attempt: u32,
        entry: NewEntry,
        now_ms: i64,
    ) -> StoreResult<StoredEntry> {
        let id = id.clone();
        self.write(move |conn| {
            Box::pin(async move {
                let grown: Option<(i64,)> = sqlx::query_as(
                    "UPDATE invocations SET journal_len = journal_len + 1, position_failures = 0, \
                     modified_at_ms = ? \
                     WHERE id = ? AND attempt = ? AND status = 'running' AND journal_len = ? \
                     RETURNING journal_len",
                )
                .bind(now_ms)
                .bind(id.as_str())
                .bind(attempt as i64)
                .bind(entry.index as i64)
                .fetch_optional(&mut *conn)
                .await
                .map_err(backend)?;
                if grown.is_none() {
                    let refusal = refusal(conn, id.as_str(), attempt).await;
                    return Err(match refusal {
                        StoreError::Fenced {
                            current_attempt,
                            status: Status::Running,
                            ..
                        } if current_attempt == attempt => {
                            let expected = fetch_invocation(conn, id.as_str())
                                .await?
                                .map(|r| r.journal_len)
                                .unwrap_or_default();
                            StoreError::IndexMismatch {
                                invocation_id: id.to_string(),
                                requested: entry.index,
                                expected,
                            }
                        }
                        other => other,
                    });
                }
                insert_entry(
                    conn,
                    id.as_str(),
                    entry.index,
                    entry.kind,
                    entry.name.as_deref(),
                    entry.value.as_deref(),
                    entry.content_type.as_deref(),
                    entry.failure.as_ref(),
                    attempt,
                    now_ms,
                )
                .await?;
                Ok(StoredEntry {
                    index: entry.index,
                    kind: entry.kind,
                    name: entry.name,
                    value: entry.value,
                    content_type: entry.content_type,
                    failure: entry.failure,
                    attempt,
                    at_ms: now_ms,
                })
            })
        })
        .await
    }

    async fn end_attempt(
        &self,
        id: &InvocationId,
        attempt: u32,
        end: AttemptEnd,
        now_ms: i64,
    ) -> StoreResult<InvocationRecord> {
        let id = id.clone();
        self.write(move |conn| {
            Box::pin(async move {
                // ?1 is the time and ?2, ?3 the fence; the rest depend on the end.
                let fence = "WHERE id = ?2 AND attempt = ?3 AND status = 'running'";
                let query = match &end {
                    AttemptEnd::Completed { .. } => format!(
                        "UPDATE invocations SET status = 'completed', journal_len = journal_len + 1, \
                         completed_at_ms = ?1, modified_at_ms = ?1, last_error = NULL {fence} \
                         RETURNING {INVOCATION_COLUMNS}"
                    ),
                    AttemptEnd::Failed { .. } => format!(
                        "UPDATE invocations SET status = 'failed', journal_len = journal_len + 1, \
                         completed_at_ms = ?1, modified_at_ms = ?1, failure = ?4 {fence} \
                         RETURNING {INVOCATION_COLUMNS}"
                    ),
                    AttemptEnd::BackOff { .. } => format!(
                        "UPDATE invocations SET status = 'backing-off', next_run_at_ms = ?4, \
                         last_error = ?5, failures = failures + ?6, \
                         position_failures = position_failures + 1, modified_at_ms = ?1 {fence} \
                         RETURNING {INVOCATION_COLUMNS}"
                    ),
                    AttemptEnd::Suspended { .. } => format!(
                        "UPDATE invocations SET status = 'suspended', next_run_at_ms = ?4, \
                         modified_at_ms = ?1 {fence} RETURNING {INVOCATION_COLUMNS}"
                    ),
                    AttemptEnd::Paused { .. } => format!(
                        "UPDATE invocations SET status = 'paused', last_error = ?4, \
                         modified_at_ms = ?1 {fence} RETURNING {INVOCATION_COLUMNS}"
                    ),
                };
                let mut q = sqlx::query_as::<_, InvocationRow>(&query)
                    .bind(now_ms)
                    .bind(id.as_str())
                    .bind(attempt as i64);
                q = match &end {
                    AttemptEnd::Completed { .. } => q,
                    AttemptEnd::Failed { failure } => q.bind(to_json(failure)?),
                    AttemptEnd::BackOff {
                        until_ms,
                        error,
                        handler_failure,
                    } => q
                        .bind(*until_ms)
                        .bind(error.clone())
                        .bind(i64::from(*handler_failure)),
                    AttemptEnd::Suspended { until_ms } => q.bind(*until_ms),
                    AttemptEnd::Paused { reason } => q.bind(reason.clone()),
                };
                let Some(row) = q.fetch_optional(&mut *conn).await.map_err(backend)? else {
                    return Err(refusal(conn, id.as_str(), attempt).await);
                };
                let record = InvocationRecord::try_from(row)?;
                let output_index = record.journal_len - 1;
                match end {
                    AttemptEnd::Completed {
                        output,
                        content_type,
                    } => {
                        insert_entry(
                            conn,
                            id.as_str(),
                            output_index,
                            EntryKind::Output,
                            None,
                            Some(&output),
                            content_type.as_deref(),
                            None,
                            attempt,
                            now_ms,
                        )
                        .await?
                    }
                    AttemptEnd::Failed { failure } => {
                        insert_entry(
                            conn,
                            id.as_str(),
                            output_index,
                            EntryKind::Output,
                            None,
                            None,
                            None,
                            Some(&failure),
                            attempt,
                            now_ms,
                        )
                        .await?
                    }
                    _ => {}
                }
                Ok(record)
            })
        })
        .await
    }

    async fn resume(
        &self,
        id: &InvocationId,
        deployment_id: Option<String>,
        now_ms: i64,
    ) -> StoreResult<Option<InvocationRecord>> {
        let id = id.clone();
        self.write(move |conn| {
            Box::pin(async move {
                let sql = format!(
                    "UPDATE invocations SET status = 'pending', next_run_at_ms = ?1, \
                     modified_at_ms = ?1, deployment_id = COALESCE(?2, deployment_id), \
                     failures = 0, position_failures = 0 \
                     WHERE id = ?3 AND status = 'paused' RETURNING {INVOCATION_COLUMNS}"
                );
                sqlx::query_as::<_, InvocationRow>(&sql)
                    .bind(now_ms)
                    .bind(deployment_id)
                    .bind(id.as_str())
                    .fetch_optional(conn)
                    .await
                    .map_err(backend)?
                    .map(InvocationRecord::try_from)
                    .transpose()
            })
        })
        .await
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1")
            .execute(&self.reads)
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn purge_idempotency_keys(&self, now_ms: i64) -> StoreResult<u64> {
        self.write(move |conn| {
            Box::pin(async move {
                Ok(
                    sqlx::query("DELETE FROM idempotency_keys WHERE expires_at_ms <= ?")
                        .bind(now_ms)
                        .execute(conn)
                        .await
                        .map_err(backend)?
                        .rows_affected(),
                )
            })
        })
        .await
    }
}
