//! Durable state behind one trait: deployments, invocations, journals, idempotency keys.
//!
//! This module is the only place that changes invocation state. Every method that writes on
//! behalf of an attempt is fenced by the attempt number: an append or an end from an attempt
//! that is no longer the current one is refused with [`StoreError::Fenced`] and writes nothing.
//! Nothing outside `store/` knows which database is underneath.

mod postgres;
mod sqlite;
pub mod tables;
#[cfg(test)]
mod tests;

use async_trait::async_trait;
use durin_protocol::{Completion, EntryKind, Failure, HandlerSpec, ServiceSpec};

pub use postgres::{is_postgres_url, PostgresStore};
pub use sqlite::SqliteStore;

impl dyn Store {
    /// Runs `rule` inside one transaction (see [`Store::transact`]) and returns what it
    /// returned once the transaction is durable.
    pub async fn write<T, F>(&self, key: &str, rule: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: for<'t> FnOnce(
                &'t mut dyn tables::Tx,
            ) -> futures_util::future::BoxFuture<'t, StoreResult<T>>
            + Send
            + 'static,
    {
        let erased: TxFn = Box::new(move |tx| {
            Box::pin(async move { rule(tx).await.map(|value| Box::new(value) as TxOutput) })
        });
        typed(self.transact(key, erased).await?)
    }

    /// As [`write`](#method.write), for a rule that may run more than once (see
    /// [`Store::transact_repeatable`]): it clones what it moves into its future.
    pub async fn write_repeatable<T, F>(&self, key: &str, rule: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: for<'t> Fn(
                &'t mut dyn tables::Tx,
            ) -> futures_util::future::BoxFuture<'t, StoreResult<T>>
            + Send
            + Sync
            + 'static,
    {
        let erased: RepeatableTxFn = std::sync::Arc::new(move |tx| {
            let ran = rule(tx);
            Box::pin(async move { ran.await.map(|value| Box::new(value) as TxOutput) })
        });
        typed(self.transact_repeatable(key, erased).await?)
    }
}

/// A rule's result, its type given back.
fn typed<T: 'static>(output: TxOutput) -> StoreResult<T> {
    output
        .downcast::<T>()
        .map(|value| *value)
        .map_err(|_| StoreError::Backend("a rule's result changed type".into()))
}

impl dyn Store {
    /// Runs `write` again while it finds a lock another transaction holds
    /// ([`StoreError::Contended`]), a few milliseconds apart, for up to about 2 s.
    pub async fn contended<T, Fut>(&self, mut write: impl FnMut() -> Fut) -> StoreResult<T>
    where
        Fut: std::future::Future<Output = StoreResult<T>>,
    {
        let mut tries = 0u64;
        loop {
            match write().await {
                Err(StoreError::Contended(_)) if tries < 100 => {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(1 + tries.min(20))).await;
                }
                other => return other,
            }
        }
    }
}

/// A webhook source as stored: its declaration (JSON, secrets included) and who set it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookSourceRow {
    pub name: String,
    /// `api` (the admin API, the CLI) or `config` (the config file).
    pub origin: String,
    pub config: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// How this process takes part in a cluster of nodes on one PostgreSQL database.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// Unique among the nodes of one database; a restarted node with the same id takes its
    /// own unfinished attempts back at once instead of waiting for their leases to expire.
    pub node_id: String,
    /// How long a claimed attempt stays this node's without a renewal (at least 300 ms;
    /// renewed every third of it).
    pub lease: std::time::Duration,
    /// Writer connections, each group-committing the writes of the invocations whose ids
    /// hash to it.
    pub writers: usize,
}

impl Default for NodeOptions {
    /// A node id of its own (`node-<uuid>`), leases of 10 s, and one writer (a batch of
    /// many invocations costs a few statements: on a 2-core machine two writers gave one
    /// node the same throughput for a quarter more of the database's CPU per invocation,
    /// and three nodes a third less: smaller batches, more commits).
    fn default() -> NodeOptions {
        NodeOptions {
            node_id: format!("node-{}", uuid::Uuid::new_v4().simple()),
            lease: std::time::Duration::from_secs(10),
            writers: 1,
        }
    }
}

/// Opens the store `url` names: `postgres://...` (or `postgresql://...`) a PostgreSQL
/// database, which this process uses as node `node` (see [`NodeOptions`]), anything else a
/// SQLite file (`sqlite:durin.db`), which one process uses alone (`node` is ignored).
pub async fn open(
    url: &str,
    limits: JournalLimits,
    node: NodeOptions,
) -> StoreResult<std::sync::Arc<dyn Store>> {
    Ok(if is_postgres_url(url) {
        std::sync::Arc::new(
            PostgresStore::open(url, node)
                .await?
                .with_journal_limits(limits),
        )
    } else {
        std::sync::Arc::new(SqliteStore::open(url).await?.with_journal_limits(limits))
    })
}

/// Applies the migrations of the store `url` names (see [`open`]).
pub async fn migrate(url: &str) -> StoreResult<()> {
    if is_postgres_url(url) {
        PostgresStore::migrate(url).await
    } else {
        SqliteStore::migrate(url).await
    }
}

use crate::ids::InvocationId;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invocation {0} not found")]
    NotFound(String),
    /// The writer is not the current attempt of a running invocation.
    #[error("attempt {attempt} of invocation {invocation_id} is not current (current attempt {current_attempt}, status {status}); a newer attempt owns the journal")]
    Fenced {
        invocation_id: String,
        attempt: u32,
        current_attempt: u32,
        status: Status,
    },
    /// An append named an index other than the next free one.
    #[error("append at index {requested} refused: the next index of invocation {invocation_id} is {expected}")]
    IndexMismatch {
        invocation_id: String,
        requested: u32,
        expected: u32,
    },
    /// The invocation has ended; nothing can be delivered to it any more.
    #[error(
        "invocation {invocation_id} has ended ({status}); it takes no more signals or callbacks"
    )]
    Ended {
        invocation_id: String,
        status: Status,
    },
    /// The journal has reached one of its limits (entries or bytes).
    #[error("the journal of invocation {invocation_id} is full: {limit}")]
    JournalFull {
        invocation_id: String,
        limit: String,
    },
    /// An append from the current attempt number with the wrong attempt token.
    #[error(
        "the attempt token does not belong to attempt {attempt} of invocation {invocation_id}"
    )]
    WrongToken { invocation_id: String, attempt: u32 },
    #[error("storage backend error: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the store is closed")]
    Closed,
    /// Another transaction holds a lock this write needs (a key's, which PostgreSQL takes
    /// without waiting, so that group-committed batches never wait for each other in a
    /// cycle; or a deadlock it broke): nothing was written, and the write may run again.
    #[error("storage contended: {0}; nothing was written")]
    Contended(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// A keyed invocation waiting for a holder of its key to end (never claimed).
    Queued,
    Pending,
    Running,
    Suspended,
    BackingOff,
    Paused,
    Completed,
    Failed,
    Cancelled,
    Terminated,
    /// A workflow's run that continued as a new run (under the same workflow id).
    Continued,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Pending => "pending",
            Status::Running => "running",
            Status::Suspended => "suspended",
            Status::BackingOff => "backing-off",
            Status::Paused => "paused",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
            Status::Terminated => "terminated",
            Status::Continued => "continued",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Some(match s {
            "queued" => Status::Queued,
            "pending" => Status::Pending,
            "running" => Status::Running,
            "suspended" => Status::Suspended,
            "backing-off" => Status::BackingOff,
            "paused" => Status::Paused,
            "completed" => Status::Completed,
            "failed" => Status::Failed,
            "cancelled" => Status::Cancelled,
            "terminated" => Status::Terminated,
            "continued" => Status::Continued,
            _ => return None,
        })
    }

    /// Completed, failed, cancelled, terminated or continued: nothing will ever change it
    /// again.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Status::Completed
                | Status::Failed
                | Status::Cancelled
                | Status::Terminated
                | Status::Continued
        )
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a deployment is spoken to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandlerProtocol {
    /// The Durin handler protocol (an SDK) at the version its discovery declared: journal
    /// in, outcome out.
    Sdk { version: u32 },
    /// A plain HTTP handler: the caller's body in, the answer out; durable through the
    /// egress and the context API.
    Plain,
}

impl HandlerProtocol {
    /// The stored form: `sdk` (version 1, as stored before versions were negotiated),
    /// `sdk/N`, or `plain`.
    pub fn to_text(self) -> String {
        match self {
            HandlerProtocol::Sdk { version: 1 } => "sdk".into(),
            HandlerProtocol::Sdk { version } => format!("sdk/{version}"),
            HandlerProtocol::Plain => "plain".into(),
        }
    }

    pub fn parse(s: &str) -> Option<HandlerProtocol> {
        match s {
            "sdk" => Some(HandlerProtocol::Sdk { version: 1 }),
            "plain" => Some(HandlerProtocol::Plain),
            _ => s
                .strip_prefix("sdk/")?
                .parse()
                .ok()
                .map(|version| HandlerProtocol::Sdk { version }),
        }
    }

    pub fn is_sdk(self) -> bool {
        matches!(self, HandlerProtocol::Sdk { .. })
    }
}

#[derive(Debug, Clone)]
pub struct NewDeployment {
    pub url: String,
    pub protocol: HandlerProtocol,
    pub services: Vec<ServiceSpec>,
    pub now_ms: i64,
    /// New invocations may go to it (false: registered inactive, until activated).
    pub active: bool,
}

/// A schedule as stored: its spec and its state as JSON, which the rules in `schedules/`
/// read and write; the store only keeps them and finds the due ones.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleRow {
    pub id: String,
    /// Who manages it: `api` (the admin API, the CLI) or `config` (the config file).
    pub source: String,
    pub spec: String,
    pub state: String,
    /// When it is next looked at; `None` while it has nothing to do (paused).
    pub due_ms: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct DeploymentRecord {
    pub id: String,
    pub url: String,
    pub protocol: HandlerProtocol,
    pub services: Vec<ServiceSpec>,
    pub created_at_ms: i64,
    /// New invocations of its handlers go to it when it is the newest active one.
    pub active: bool,
}

/// Where and how to call one handler of one deployment.
#[derive(Debug, Clone, PartialEq)]
pub struct HandlerTarget {
    pub deployment_id: String,
    pub url: String,
    pub protocol: HandlerProtocol,
    pub service: String,
    pub handler: String,
    pub spec: HandlerSpec,
}

impl HandlerTarget {
    /// The full URL the gateway POSTs to.
    pub fn endpoint(&self) -> String {
        let path = self
            .spec
            .path
            .clone()
            .unwrap_or_else(|| format!("/{}/{}", self.service, self.handler));
        format!("{}{}", self.url.trim_end_matches('/'), path)
    }
}

#[derive(Debug, Clone)]
pub struct InvocationRecord {
    pub id: InvocationId,
    pub service: String,
    pub handler: String,
    pub deployment_id: String,
    pub status: Status,
    /// Number of the current (or last) attempt; 0 before the first one. The fencing token.
    pub attempt: u32,
    /// Attempts that ended in a handler-level retryable failure.
    pub failures: u32,
    /// Attempts that failed since the journal last grew.
    pub position_failures: u32,
    pub journal_len: u32,
    /// The bytes of the journal's values.
    pub journal_bytes: i64,
    /// When the next attempt is due (pending, backing-off or suspended).
    pub next_run_at_ms: Option<i64>,
    pub last_error: Option<String>,
    pub failure: Option<Failure>,
    pub idempotency_key: Option<String>,
    pub created_at_ms: i64,
    pub modified_at_ms: i64,
    pub completed_at_ms: Option<i64>,
    /// The secret of the current attempt, which its appends must present.
    pub attempt_token: Option<String>,
    /// The workflow id, for a run of a workflow service.
    pub workflow_id: Option<String>,
    /// The journal indexes of the commands a suspended invocation waits for.
    pub waiting_for: Vec<u32>,
    /// When someone asked to cancel it (its journal then holds a `cancel` entry).
    pub cancel_requested_at_ms: Option<i64>,
    /// The invocation whose `call` or `send` started it.
    pub parent_invocation_id: Option<String>,
    /// The parent's `call` entry, which this invocation's end completes (`None` for a
    /// `send`).
    pub parent_index: Option<u32>,
    /// When it fails with `ScheduleToCloseTimeout` if it has not ended.
    pub deadline_ms: Option<i64>,
    /// When the current attempt was due.
    pub scheduled_at_ms: Option<i64>,
    /// The last heartbeat of an attempt (its details are read with
    /// [`Store::heartbeat_details`]).
    pub heartbeat_at_ms: Option<i64>,
    /// The W3C `traceparent` its trace continues (see [`crate::telemetry::trace_context`]).
    pub traceparent: Option<String>,
    /// Its key, for a keyed handler's invocation.
    pub key: Option<InvocationKey>,
}

/// The key of a keyed handler's invocation: at most `limit` invocations of one service's
/// key run at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvocationKey {
    pub key: String,
    pub limit: u32,
    /// A shared (read-only) handler's: it reads the key's state, and neither holds the
    /// key nor waits for it (stored as a limit of 0).
    pub shared: bool,
    /// At its creation only (not read back): the key's debounce, in ms.
    pub debounce_ms: Option<i64>,
    /// At its creation only: the longest a burst may put a debounced start off, in ms.
    pub debounce_max_ms: Option<i64>,
    /// At its creation only (stored, read back where a start is let go): the key's rate.
    pub rate: Option<StartRate>,
}

/// At most `limit` starts of one key in any `period_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartRate {
    pub limit: u32,
    pub period_ms: i64,
}

impl StartRate {
    /// The rate as its two columns hold it (none when either is empty).
    pub(crate) fn from_columns(limit: Option<i64>, period_ms: Option<i64>) -> Option<StartRate> {
        Some(StartRate {
            limit: u32::try_from(limit?).ok()?,
            period_ms: period_ms?,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct StoredEntry {
    pub index: u32,
    pub kind: EntryKind,
    pub name: Option<String>,
    pub value: Option<Vec<u8>>,
    pub content_type: Option<String>,
    pub failure: Option<Failure>,
    pub attempt: u32,
    pub at_ms: i64,
    /// A command's result, once it arrived.
    pub completion: Option<StoredCompletion>,
}

/// A command's result as stored (see [`durin_protocol::Completion`]).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredCompletion {
    pub seq: u32,
    pub value: Option<Vec<u8>>,
    pub failure: Option<Failure>,
    pub at_ms: i64,
}

impl StoredCompletion {
    pub fn to_wire(&self) -> Completion {
        Completion {
            seq: self.seq,
            value: self
                .value
                .as_deref()
                .map(|v| serde_json::from_slice(v).unwrap_or(serde_json::Value::Null)),
            failure: self.failure.clone(),
            at_ms: self.at_ms,
        }
    }
}

/// How long a journal may grow: an append past either limit is refused, and the invocation
/// is warned about from [`JournalLimits::WARN_PERCENT`] of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalLimits {
    pub max_entries: u32,
    pub max_bytes: i64,
}

impl JournalLimits {
    pub const WARN_PERCENT: u32 = 80;

    /// Why a journal of `entries` entries and `bytes` bytes deserves a warning, if it does.
    pub fn warning(&self, entries: u32, bytes: i64) -> Option<String> {
        let near = |used: f64, max: f64| used * 100.0 >= max * f64::from(Self::WARN_PERCENT);
        if near(f64::from(entries), f64::from(self.max_entries)) {
            return Some(format!(
                "the journal holds {entries} of at most {} entries",
                self.max_entries
            ));
        }
        if near(bytes as f64, self.max_bytes as f64) {
            return Some(format!(
                "the journal holds {bytes} of at most {} bytes",
                self.max_bytes
            ));
        }
        None
    }
}

impl Default for JournalLimits {
    /// Temporal's order of magnitude: tens of thousands of events, tens of megabytes.
    fn default() -> JournalLimits {
        JournalLimits {
            max_entries: 50_000,
            max_bytes: 50 * 1024 * 1024,
        }
    }
}

/// The idempotency claim of a new invocation: `(scope, key)` names it while it runs and
/// for `retention_ms` after it ended.
#[derive(Debug, Clone)]
pub struct IdempotencyClaim {
    pub scope: String,
    pub key: String,
    pub request_digest: String,
    pub retention_ms: i64,
}

#[derive(Debug, Clone)]
pub struct NewInvocation {
    pub id: InvocationId,
    pub target: HandlerTarget,
    pub input: Vec<u8>,
    pub content_type: Option<String>,
    pub idempotency: Option<IdempotencyClaim>,
    pub now_ms: i64,
    /// When it fails if it has not ended (`schedule_to_close`).
    pub deadline_ms: Option<i64>,
    /// The caller's W3C `traceparent`, checked.
    pub traceparent: Option<String>,
    /// Created with its first attempt running, for this node to run at once (`true`), or
    /// due now, for the scheduler to claim when a slot is free (`false`: admission's queue
    /// was full).
    pub run_now: bool,
    /// Its key, for a keyed handler: it runs when fewer than the limit of its key do,
    /// and waits its turn (`queued`) otherwise.
    pub key: Option<InvocationKey>,
}

/// The start of a run of a workflow: `(workflow, workflow_id)` names one run at a time.
#[derive(Debug, Clone)]
pub struct NewWorkflowRun {
    pub invocation: NewInvocation,
    pub workflow_id: String,
    /// Digest of the input: the same id with another input is a conflict.
    pub input_digest: String,
    /// Start a new run when the last one has ended (instead of answering with it).
    pub new_run_after_end: bool,
    /// A signal delivered with the start (signal-with-start), to this run or the one
    /// already running.
    pub signal: Option<NewSignal>,
}

#[derive(Debug)]
pub enum WorkflowStarted {
    /// A new run, its first attempt started (as for [`Created::New`]).
    New {
        record: InvocationRecord,
        input: Box<StoredEntry>,
    },
    /// The id names a run started with the same input (or a running one, for
    /// signal-with-start, which now holds the signal).
    Existing(InvocationRecord),
    /// A signal-with-start sent again: the run the id names received its signal (the same
    /// `Idempotency-Key`) already, and nothing new was stored.
    DuplicateSignal(InvocationRecord),
    /// The id names a run started with another input.
    Conflict(InvocationRecord),
}

/// A signal for an invocation.
#[derive(Debug, Clone)]
pub struct NewSignal {
    pub name: String,
    pub value: Vec<u8>,
    /// A retry with the same key delivers nothing new.
    pub idempotency_key: Option<String>,
}

/// What sending a signal did.
#[derive(Debug, Clone)]
pub struct SignalSent {
    /// Order of the signal among the invocation's signals.
    pub seq: u32,
    /// An earlier signal with the same idempotency key: nothing new was stored.
    pub duplicate: bool,
    /// The invocation became due (a suspended wait received it).
    pub woke: bool,
}

/// See [`Store::plain_command`].
#[derive(Debug, Clone)]
pub struct PlainCommand {
    pub id: InvocationId,
    pub attempt: u32,
    pub token: String,
    /// Found by name, or recorded when new, in this order; a wait waits for whichever of
    /// them completes first (one command, or a signal and its timeout, or a race).
    pub commands: Vec<NamedCommand>,
    pub suspend: bool,
}

/// One command of a [`PlainCommand`], identified by its kind, name, key and occurrence.
#[derive(Debug, Clone)]
pub struct NamedCommand {
    pub kind: EntryKind,
    pub name: String,
    /// The recorded entry must have this value too (a wait's own key).
    pub key: Option<Vec<u8>>,
    /// Which of the matching entries, in journal order, from 0 (a state key written
    /// several times).
    pub occurrence: u32,
    /// Appended when no entry matches; `None` means "it must exist already".
    pub new: Option<NewEntry>,
}

impl NamedCommand {
    /// The command `kind` named `name` (occurrence 0, no key), recorded as `new` if absent.
    pub fn named(kind: EntryKind, name: String, new: Option<NewEntry>) -> Self {
        Self {
            kind,
            name,
            key: None,
            occurrence: 0,
            new,
        }
    }
}

#[derive(Debug, Clone)]
pub struct PlainAnswer {
    /// The entries of [`PlainCommand::commands`], in their order, each with whether it
    /// was in the journal before this call.
    pub entries: Vec<(StoredEntry, bool)>,
    /// The attempt is now suspended: the handler must stop.
    pub suspended: bool,
    /// A wait of a cancelled invocation for which nothing completed before the
    /// cancellation: the handler gets the cancellation instead of waiting.
    pub cancelled: bool,
}

impl PlainAnswer {
    /// The first command's entry.
    pub fn entry(&self) -> &StoredEntry {
        &self.entries[0].0
    }

    /// Every command was in the journal before this call: the answer is a replay.
    pub fn recorded(&self) -> bool {
        self.entries.iter().all(|(_, recorded)| *recorded)
    }

    /// The position of the command that completed first (the lowest completion number),
    /// if one has.
    pub fn first_completed(&self) -> Option<usize> {
        self.entries
            .iter()
            .enumerate()
            .filter_map(|(i, (entry, _))| entry.completion.as_ref().map(|c| (c.seq, i)))
            .min()
            .map(|(_, i)| i)
    }
}

/// What resolving an awakeable did.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The awakeable's result: this one, or the one of an earlier resolve.
    pub completion: StoredCompletion,
    /// False when an earlier resolve or reject had completed it already.
    pub first: bool,
    pub woke: bool,
}

/// What an appended entry does besides being journaled, planned by `journal/` and carried
/// out by the store in the same transaction.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    None,
    /// A durable timer that fires at `wake_at_ms` (at once when that has passed).
    Timer {
        wake_at_ms: i64,
    },
    /// A wait for the next signal named like the entry. With `take_buffered` (the SDK
    /// waiting for it alone, or a plain handler's wait, raced at most against its own
    /// timer, which is recorded after it) it takes the oldest buffered signal at once;
    /// otherwise (the SDK may race it against other commands) a signal is bound only when
    /// the attempt suspends on it, so that the first event of the race wins.
    SignalWait {
        take_buffered: bool,
    },
    /// Sets (`Some`) or clears (`None`) a key of the invocation's durable state.
    State {
        key: String,
        value: Option<Vec<u8>>,
    },
    /// Starts a child invocation (a `call` or a `send`) in the same transaction as the
    /// entry, so that it starts exactly once.
    StartChild(Box<ChildStart>),
    /// A child workflow was not started (its id names a run that goes on): a `call`
    /// completes with `failure` at once.
    ChildRefused {
        failure: Failure,
    },
    /// The run accepted its pending update `id` (an `update` entry).
    UpdateAccepted {
        id: String,
    },
    /// The accepted update `id` has its result (an `update_result` entry).
    UpdateDone {
        id: String,
        result: Option<Vec<u8>>,
        failure: Option<Failure>,
    },
    /// A plain handler answered the update `id` it received: accepted and done at once.
    UpdateAnswered {
        id: String,
        result: Option<Vec<u8>>,
        failure: Option<Failure>,
    },
}

/// Where an update sent to a workflow's run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateStatus {
    /// Waiting for the run's next wait, where its SDK validates it.
    Pending,
    /// Accepted (journaled); its handler runs.
    Accepted,
    /// Its result is in `result` (or its handler's failure in `failure`).
    Done,
    /// The validator refused it (`failure`); nothing was journaled.
    Refused,
    /// The run ended before it handled the update.
    Abandoned,
}

impl UpdateStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            UpdateStatus::Pending => "pending",
            UpdateStatus::Accepted => "accepted",
            UpdateStatus::Done => "done",
            UpdateStatus::Refused => "refused",
            UpdateStatus::Abandoned => "abandoned",
        }
    }

    pub fn parse(s: &str) -> Option<UpdateStatus> {
        Some(match s {
            "pending" => UpdateStatus::Pending,
            "accepted" => UpdateStatus::Accepted,
            "done" => UpdateStatus::Done,
            "refused" => UpdateStatus::Refused,
            "abandoned" => UpdateStatus::Abandoned,
            _ => return None,
        })
    }

    /// Nothing will change it again.
    pub fn is_final(self) -> bool {
        !matches!(self, UpdateStatus::Pending | UpdateStatus::Accepted)
    }
}

/// An update sent to a workflow's run.
#[derive(Debug, Clone)]
pub struct UpdateRecord {
    pub invocation_id: InvocationId,
    pub id: String,
    pub name: String,
    pub status: UpdateStatus,
    pub result: Option<Vec<u8>>,
    pub failure: Option<Failure>,
}

/// An update to send.
#[derive(Debug, Clone)]
pub struct NewUpdate {
    pub id: String,
    pub name: String,
    pub input: Vec<u8>,
    pub idempotency_key: Option<String>,
    /// The run is a plain handler's: the update is delivered to its update waits as the
    /// signal [`plain_update_signal`] names, with `{"update_id", "name", "input"}`.
    pub plain: bool,
}

/// How the signals that carry updates to a plain handler's waits are named: this, then the
/// update's name. Signal names sent by callers cannot contain `:`, so nobody else can send
/// one.
pub const PLAIN_UPDATE_SIGNAL_PREFIX: &str = "update:";

/// The signal that carries update `name` to a plain handler's waits (`first` with an
/// `update` member).
pub fn plain_update_signal(name: &str) -> String {
    format!("{PLAIN_UPDATE_SIGNAL_PREFIX}{name}")
}

/// What sending an update did.
#[derive(Debug, Clone)]
pub enum UpdateSent {
    /// Stored (`new`), or the one its idempotency key names; `woke` when the run became due
    /// to handle it.
    Sent {
        update: UpdateRecord,
        new: bool,
        woke: bool,
    },
    /// The run has ended: nothing was stored.
    Ended(Box<InvocationRecord>),
}

pub use durin_protocol::ParentClose;

/// A child workflow's run: the id it takes and its input's digest (as a start by id
/// records it).
#[derive(Debug, Clone, PartialEq)]
pub struct ChildWorkflow {
    pub workflow_id: String,
    pub input_digest: String,
}

/// A child invocation a `call` or `send` entry starts.
#[derive(Debug, Clone, PartialEq)]
pub struct ChildStart {
    pub id: InvocationId,
    pub target: HandlerTarget,
    pub input: Vec<u8>,
    /// When its first attempt is due (later than now for a delayed `send`).
    pub due_ms: i64,
    /// A `call`: the child's end completes the parent's entry.
    pub awaited: bool,
    /// When it fails if it has not ended (`schedule_to_close`).
    pub deadline_ms: Option<i64>,
    /// A child workflow's run, by id.
    pub workflow: Option<ChildWorkflow>,
    pub parent_close: ParentClose,
    /// Its key, when it calls a keyed handler (read in its input).
    pub key: Option<InvocationKey>,
}

#[derive(Debug)]
pub enum Created {
    /// Created with its first attempt already started (running, attempt 1), so that the
    /// caller can run it at once; `input` is its journal so far.
    New {
        record: InvocationRecord,
        input: Box<StoredEntry>,
        /// What its creation ended: the invocation of a debounced key it replaced.
        superseded: Closed,
    },
    /// The idempotency key was seen before with the same request: the earlier invocation.
    Existing(InvocationRecord),
    /// The idempotency key was seen before with a different request.
    KeyReused { invocation_id: String },
}

/// An entry an attempt appends.
#[derive(Debug, Clone)]
pub struct NewEntry {
    /// The index the writer expects; `None` takes the next free one (for writers, like the
    /// egress, whose calls may run concurrently).
    pub index: Option<u32>,
    pub kind: EntryKind,
    pub name: Option<String>,
    pub value: Option<Vec<u8>>,
    pub content_type: Option<String>,
    pub failure: Option<Failure>,
    /// The attempt token the writer presented; `None` for writers inside the gateway (the
    /// egress), which checked the attempt themselves.
    pub token: Option<String>,
    pub effect: Effect,
}

/// Whose retry budget a failed attempt uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charge {
    /// The handler's policy (a crash, a timeout, a 5xx, a `retry` outcome).
    Handler,
    /// The policy of the step that failed (counted in `position_failures`, which the SDK
    /// reads): a crash never uses a step's budget.
    Step,
    /// Nobody's: the gateway failed (its store), not the handler.
    Nobody,
}

/// How an attempt ended, as the invoker decided it.
#[derive(Debug, Clone)]
pub enum AttemptEnd {
    Completed {
        output: Vec<u8>,
        content_type: Option<String>,
    },
    Failed {
        failure: Failure,
        /// The handler's own answer (body and content type), which goes back to the caller.
        body: Option<(Vec<u8>, Option<String>)>,
    },
    /// Retry at `until_ms`, charged to `charged`'s retry budget.
    BackOff {
        until_ms: i64,
        error: String,
        charged: Charge,
    },
    /// Waits for the commands at `waiting_for` (v2), or until `until_ms` (v1), whichever
    /// comes first; due at once when one of them has completed already.
    Suspended {
        until_ms: Option<i64>,
        waiting_for: Vec<u32>,
    },
    Paused {
        reason: String,
    },
    /// The handler ended a cancelled invocation with its `Cancelled` error (after its
    /// compensations).
    Cancelled {
        failure: Failure,
    },
    /// A workflow's run continues as a new run `next` with `input` and a fresh journal,
    /// on `target` (the newest deployment serving the workflow) or, without one, on the
    /// run's own deployment.
    ContinuedAsNew {
        input: Vec<u8>,
        next: InvocationId,
        target: Option<Box<HandlerTarget>>,
        /// The next run's `schedule_to_close` deadline.
        deadline_ms: Option<i64>,
    },
}

impl AttemptEnd {
    /// The error (or the reason for a pause) the attempt ended with.
    pub fn error(&self) -> Option<&str> {
        match self {
            AttemptEnd::Failed { failure, .. } | AttemptEnd::Cancelled { failure } => {
                Some(&failure.message)
            }
            AttemptEnd::BackOff { error, .. } => Some(error),
            AttemptEnd::Paused { reason } => Some(reason),
            AttemptEnd::Completed { .. }
            | AttemptEnd::Suspended { .. }
            | AttemptEnd::ContinuedAsNew { .. } => None,
        }
    }
}

/// What a termination did.
#[derive(Debug, Clone)]
pub struct Termination {
    /// The invocation, as it is now.
    pub record: InvocationRecord,
    /// False when it had ended already: nothing was written.
    pub terminated: bool,
    /// Every invocation it ended (it first, then its `call` children), with its output
    /// entry.
    pub ended: Vec<(InvocationRecord, StoredEntry)>,
}

/// Which invocations an operator's bulk verb reaches.
#[derive(Debug, Clone, Default)]
pub struct InvocationFilter {
    pub service: Option<String>,
    pub handler: Option<String>,
    pub status: Option<Status>,
    pub deployment_id: Option<String>,
    /// Created before this instant (ms since the epoch).
    pub created_before_ms: Option<i64>,
    /// Only runs of workflows.
    pub workflows_only: bool,
}

/// Invocations ended by another's end (children closed with their parent), with their
/// output entries.
pub type Closed = Vec<(InvocationRecord, StoredEntry)>;

/// What a cancellation request found and did.
#[derive(Debug, Clone)]
pub enum CancelAnswer {
    /// The `cancel` entry is in the journal and the invocation is due to run: its handler
    /// sees the cancellation at its next await. A running attempt was fenced.
    Requested(InvocationRecord),
    /// An earlier request did the above; nothing was written.
    AlreadyRequested(InvocationRecord),
    /// It had ended; nothing was written.
    Ended(InvocationRecord),
    /// It is paused (waiting for an operator); nothing was written.
    Paused(InvocationRecord),
    /// It waited for its key's turn and never started: it ended as `cancelled` at once.
    Dequeued(InvocationRecord),
}

/// What a cancellation did, and what it ended at once (invocations that waited for their
/// key's turn), whose waiting callers are told.
#[derive(Debug)]
pub struct Cancellation {
    pub answer: CancelAnswer,
    pub ended: Closed,
}

/// The metric of the writes committed together in one transaction (group commit).
pub const BATCH_METRIC: &str = "durin_store_batch_writes";
/// The metric of batches a store ran again with a savepoint per write, after one of their
/// writes failed without.
pub const BATCH_RETRIED_METRIC: &str = "durin_store_batches_retried_total";
/// The metric of how long one group commit took, from `BEGIN` to `COMMIT`.
pub const COMMIT_METRIC: &str = "durin_store_commit_seconds";

/// What a rule run by [`Store::transact`] returns, its type erased.
pub type TxOutput = Box<dyn std::any::Any + Send>;
/// A rule over the tables, run inside one transaction.
pub type TxFn = Box<
    dyn for<'t> FnOnce(
            &'t mut dyn tables::Tx,
        ) -> futures_util::future::BoxFuture<'t, StoreResult<TxOutput>>
        + Send,
>;
/// A rule over the tables that may run more than once: a backend may run it in a
/// transaction it then rolls back (with every write of it), and run it again in the next.
pub type RepeatableTxFn = std::sync::Arc<
    dyn for<'t> Fn(
            &'t mut dyn tables::Tx,
        ) -> futures_util::future::BoxFuture<'t, StoreResult<TxOutput>>
        + Send
        + Sync,
>;

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Runs `rule` inside the backend's next group-committed transaction (the one of the
    /// writer `key` routes to, where there are several) and answers once it is durable. A
    /// rule that fails writes nothing. Use [`Store::write`](trait.Store.html#method.write)
    /// on `dyn Store`, which keeps the result's type.
    async fn transact(&self, key: &str, rule: TxFn) -> StoreResult<TxOutput>;
    /// As [`Store::transact`], for a rule that may run more than once. Both stores run a
    /// batch of such rules without a savepoint for each, and, when one fails, roll the
    /// batch back and run them all again, each under a savepoint. Use
    /// [`Store::write_repeatable`](trait.Store.html#method.write_repeatable).
    async fn transact_repeatable(&self, key: &str, rule: RepeatableTxFn) -> StoreResult<TxOutput> {
        self.transact(key, Box::new(move |tx| rule(tx))).await
    }
    /// How long a journal may grow.
    fn journal_limits(&self) -> JournalLimits;
    /// Records a deployment, or returns the newest one with the same URL and services.
    /// The flag is true when a new deployment was created.
    async fn register_deployment(
        &self,
        deployment: NewDeployment,
    ) -> StoreResult<(DeploymentRecord, bool)>;
    async fn list_deployments(&self) -> StoreResult<Vec<DeploymentRecord>>;
    /// Makes the deployment `id` active (new invocations may go to it); `None` when there
    /// is no such deployment.
    async fn activate_deployment(&self, id: &str) -> StoreResult<Option<DeploymentRecord>>;
    /// The handler in the newest active deployment that serves it.
    async fn latest_handler(
        &self,
        service: &str,
        handler: &str,
    ) -> StoreResult<Option<HandlerTarget>>;
    /// The handler in one given deployment (invocations stay pinned to theirs).
    async fn deployment_handler(
        &self,
        deployment_id: &str,
        service: &str,
        handler: &str,
    ) -> StoreResult<Option<HandlerTarget>>;

    async fn get_invocation(&self, id: &InvocationId) -> StoreResult<Option<InvocationRecord>>;
    async fn read_journal(&self, id: &InvocationId) -> StoreResult<Vec<StoredEntry>>;
    async fn read_entry(&self, id: &InvocationId, index: u32) -> StoreResult<Option<StoredEntry>>;
    /// Invocations that `filter` selects, newest first, at most `limit`.
    async fn list_invocations(
        &self,
        filter: InvocationFilter,
        limit: u32,
    ) -> StoreResult<Vec<InvocationRecord>>;
    /// Invocations whose attempt was running when this node last stopped become due at once
    /// (their attempt is fenced by the next one); returns how many. Called at start. On a
    /// database that several nodes share, only the attempts leased to this node's id (its
    /// previous life) are taken: other nodes' are left to their leases.
    async fn recover_running(&self, now_ms: i64) -> StoreResult<u64>;
    /// The earliest due time of any waiting invocation.
    async fn next_due(&self) -> StoreResult<Option<i64>>;

    /// The latest run of a workflow id.
    async fn find_workflow(
        &self,
        workflow: &str,
        workflow_id: &str,
    ) -> StoreResult<Option<InvocationRecord>>;
    /// The durable state of a key of `service`: `(name, value)`, by name.
    async fn key_state(&self, service: &str, key: &str) -> StoreResult<Vec<(String, Vec<u8>)>>;
    /// The unfinished invocations of a key of `service`: its holders, then those queued
    /// for it, in arrival order; at most `limit`.
    async fn key_invocations(
        &self,
        service: &str,
        key: &str,
        limit: u32,
    ) -> StoreResult<Vec<InvocationRecord>>;
    /// The runs of a workflow id, oldest first (a run that continued as new, then the next).
    async fn workflow_runs(
        &self,
        workflow: &str,
        workflow_id: &str,
    ) -> StoreResult<Vec<InvocationRecord>>;
    /// The signals of an invocation that no wait took, in order: `(seq, name)`. A run
    /// that ended lists here what it ended without consuming.
    async fn unconsumed_signals(&self, id: &InvocationId) -> StoreResult<Vec<(u32, String)>>;
    /// The durable state of an invocation: every key with its value (`None` when cleared).
    async fn read_state(&self, id: &InvocationId) -> StoreResult<Vec<(String, Option<Vec<u8>>)>>;
    /// A secret of this gateway, made (32 random bytes) the first time it is asked for.
    async fn gateway_secret(&self, name: &str) -> StoreResult<Vec<u8>>;
    /// The details of the last heartbeat.
    async fn heartbeat_details(&self, id: &InvocationId) -> StoreResult<Option<Vec<u8>>>;
    async fn get_update(&self, run: &InvocationId, id: &str) -> StoreResult<Option<UpdateRecord>>;
    /// The update `id` sent to any run of workflow `workflow` with id `workflow_id` (the run
    /// it was sent to may have continued as new since).
    async fn find_workflow_update(
        &self,
        workflow: &str,
        workflow_id: &str,
        id: &str,
    ) -> StoreResult<Option<UpdateRecord>>;
    /// The run's pending updates, oldest first, as its next attempt receives them.
    async fn pending_updates(
        &self,
        run: &InvocationId,
    ) -> StoreResult<Vec<durin_protocol::PendingUpdate>>;
    /// Checks that the database answers.
    async fn ping(&self) -> StoreResult<()>;
    /// The ids of up to `limit` invocations that `filter` selects, oldest first.
    async fn select_invocations(
        &self,
        filter: InvocationFilter,
        limit: u32,
    ) -> StoreResult<Vec<InvocationId>>;
    /// How many invocations that have not ended are in each status.
    async fn count_unfinished(&self) -> StoreResult<Vec<(String, u64)>>;
    /// How many invocations wait for their first attempt (status `pending`).
    async fn count_pending(&self) -> StoreResult<u64>;
    /// How many suspended invocations wait for each kind of command (`sleep`, `signal`,
    /// `awakeable`, `call`; `none` for a suspension that names no command); one that waits
    /// for several kinds counts once under each.
    async fn count_waiting(&self) -> StoreResult<Vec<(String, u64)>>;
    /// Every webhook source, by name.
    async fn list_webhook_sources(&self) -> StoreResult<Vec<WebhookSourceRow>>;
    async fn get_webhook_source(&self, name: &str) -> StoreResult<Option<WebhookSourceRow>>;
    /// Up to `limit` of the source's latest deliveries (JSON), newest first.
    async fn webhook_deliveries(&self, source: &str, limit: u32) -> StoreResult<Vec<String>>;
    /// Every schedule, by id.
    async fn list_schedules(&self) -> StoreResult<Vec<ScheduleRow>>;
    async fn get_schedule(&self, id: &str) -> StoreResult<Option<ScheduleRow>>;
    /// The ids of up to `limit` schedules due by `now_ms`, the most overdue first.
    async fn due_schedules(&self, now_ms: i64, limit: u32) -> StoreResult<Vec<String>>;
    /// The earliest time a schedule is due.
    async fn next_schedule_due(&self) -> StoreResult<Option<i64>>;

    /// Whether other nodes may write this store too (PostgreSQL): what this node remembers
    /// of an attempt must then be checked in the store before it acts on the attempt's
    /// behalf outside the store (an egress call).
    fn shared(&self) -> bool {
        false
    }
    /// The egress's occurrence of a call of the running `attempt` whose identity (method,
    /// URL, body digest) has the digest `identity`: how many calls of it the attempt made
    /// before, through any node, counting this one as made. Fenced like an append (the
    /// attempt must be the running one). `None` for a store that no other node writes: the
    /// egress counts in memory.
    async fn take_occurrence(
        &self,
        _id: &InvocationId,
        _attempt: u32,
        _identity: &str,
    ) -> StoreResult<Option<u32>> {
        Ok(None)
    }
    /// Gives back `occurrence` (taken by [`Store::take_occurrence`]) of a call that left
    /// nothing in the journal, if it is still the latest of its identity; an earlier one
    /// stays used.
    async fn give_back_occurrence(
        &self,
        _id: &InvocationId,
        _attempt: u32,
        _identity: &str,
        _occurrence: u32,
    ) -> StoreResult<()> {
        Ok(())
    }
    /// How many calls of each identity (by digest) `attempt` has made, as
    /// [`Store::take_occurrence`] counts them; empty for a store that keeps no count.
    async fn occurrences_seen(
        &self,
        _id: &InvocationId,
        _attempt: u32,
    ) -> StoreResult<std::collections::HashMap<String, u32>> {
        Ok(std::collections::HashMap::new())
    }
    /// Whether this node's leases are known to be live: its last renewal succeeded less than
    /// the lease time (minus a margin) ago, by this process's monotonic clock. A node that was
    /// frozen (SIGSTOP) past its lease sees `false` until its next renewal, and must check the
    /// store before acting for an attempt it thinks it runs.
    fn lease_held(&self) -> bool {
        true
    }
    /// Marks `attempt` of `id`, which this node creates or has claimed, as one it runs,
    /// until the returned hold is dropped. A store whose attempts are leased renews only
    /// the leases of held attempts: an attempt that the node does not run (an error cut
    /// its start short, or the database committed a creation whose acknowledgement was
    /// lost) is not held up for as long as the node lives, but expires and is claimed
    /// like a dead node's.
    fn hold_lease(&self, _id: &InvocationId, _attempt: u32) -> LeaseHold {
        LeaseHold::default()
    }
    /// A clock that follows the database's (PostgreSQL's `clock_timestamp()`), so that every
    /// node compares due times with one clock; `None` for a store without one.
    fn database_clock(&self) -> Option<std::sync::Arc<dyn crate::clock::Clock>> {
        None
    }

    /// Tells the other nodes on this store, if any, that `event` happened here (a nudge:
    /// see [`ClusterEvent`]).
    fn broadcast(&self, _event: ClusterEvent) {}
    /// What the other nodes on this store tell this one; `None` for a store that no other
    /// node shares, or when taken already (it is taken once).
    fn cluster_events(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<ClusterEvent>> {
        None
    }
}

/// An attempt this node runs, whose lease it renews while the hold lives (see
/// [`Store::hold_lease`]).
#[derive(Default)]
#[must_use = "the lease is renewed only while the hold lives"]
pub struct LeaseHold {
    release: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl LeaseHold {
    /// A hold that `release` ends when dropped.
    pub(crate) fn new(release: impl FnOnce() + Send + Sync + 'static) -> LeaseHold {
        LeaseHold {
            release: Some(Box::new(release)),
        }
    }
}

impl Drop for LeaseHold {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            release();
        }
    }
}

impl std::fmt::Debug for LeaseHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseHold")
            .field("held", &self.release.is_some())
            .finish()
    }
}

/// What one node tells the others that share its store. Only a nudge: each node reads
/// what changed from the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterEvent {
    /// The invocation ended or paused: its waiting callers may be answered.
    Ended(InvocationId),
    /// An update of this run may have changed (refused, done, or the run ended).
    UpdateChanged(InvocationId),
    /// Events may have been missed (the connection that brings them was made again):
    /// check what this node waits for.
    Resync,
}
