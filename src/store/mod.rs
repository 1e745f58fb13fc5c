//! Durable state behind one trait: deployments, invocations, journals, idempotency keys.
//!
//! This module is the only place that changes invocation state. Every method that writes on
//! behalf of an attempt is fenced by the attempt number: an append or an end from an attempt
//! that is no longer the current one is refused with [`StoreError::Fenced`] and writes nothing.
//! Nothing outside `store/` knows which database is underneath.

mod sqlite;

use async_trait::async_trait;
use durin_protocol::{EntryKind, Failure, HandlerSpec, ServiceSpec};

pub use sqlite::SqliteStore;

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
    /// An append from the current attempt number with the wrong attempt token.
    #[error(
        "the attempt token does not belong to attempt {attempt} of invocation {invocation_id}"
    )]
    WrongToken { invocation_id: String, attempt: u32 },
    #[error("storage backend error: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the store is closed")]
    Closed,
}

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pending,
    Running,
    Suspended,
    BackingOff,
    Paused,
    Completed,
    Failed,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Running => "running",
            Status::Suspended => "suspended",
            Status::BackingOff => "backing-off",
            Status::Paused => "paused",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Some(match s {
            "pending" => Status::Pending,
            "running" => Status::Running,
            "suspended" => Status::Suspended,
            "backing-off" => Status::BackingOff,
            "paused" => Status::Paused,
            "completed" => Status::Completed,
            "failed" => Status::Failed,
            "cancelled" => Status::Cancelled,
            _ => return None,
        })
    }

    /// Completed, failed or cancelled: nothing will ever change it again.
    pub fn is_final(self) -> bool {
        matches!(self, Status::Completed | Status::Failed | Status::Cancelled)
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
    /// The Durin handler protocol (an SDK): journal in, outcome out.
    Sdk,
    /// A plain HTTP handler: the caller's body in, the answer out; durable through the egress.
    Plain,
}

impl HandlerProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            HandlerProtocol::Sdk => "sdk",
            HandlerProtocol::Plain => "plain",
        }
    }

    pub fn parse(s: &str) -> Option<HandlerProtocol> {
        match s {
            "sdk" => Some(HandlerProtocol::Sdk),
            "plain" => Some(HandlerProtocol::Plain),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct NewDeployment {
    pub url: String,
    pub protocol: HandlerProtocol,
    pub services: Vec<ServiceSpec>,
    pub now_ms: i64,
}

#[derive(Debug, Clone)]
pub struct DeploymentRecord {
    pub id: String,
    pub url: String,
    pub protocol: HandlerProtocol,
    pub services: Vec<ServiceSpec>,
    pub created_at_ms: i64,
}

/// Where and how to call one handler of one deployment.
#[derive(Debug, Clone)]
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
}

/// The idempotency claim of a new invocation: `(scope, key)` is unique while not expired.
#[derive(Debug, Clone)]
pub struct IdempotencyClaim {
    pub scope: String,
    pub key: String,
    pub request_digest: String,
    pub expires_at_ms: i64,
}

#[derive(Debug, Clone)]
pub struct NewInvocation {
    pub id: InvocationId,
    pub target: HandlerTarget,
    pub input: Vec<u8>,
    pub content_type: Option<String>,
    pub idempotency: Option<IdempotencyClaim>,
    pub now_ms: i64,
}

#[derive(Debug)]
pub enum Created {
    /// Created with its first attempt already started (running, attempt 1), so that the
    /// caller can run it at once; `input` is its journal so far.
    New {
        record: InvocationRecord,
        input: StoredEntry,
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
    /// Retry at `until_ms`. `handler_failure` counts it against the handler's policy.
    BackOff {
        until_ms: i64,
        error: String,
        handler_failure: bool,
    },
    Suspended {
        until_ms: i64,
    },
    Paused {
        reason: String,
    },
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Records a deployment, or returns the newest one with the same URL and services.
    /// The flag is true when a new deployment was created.
    async fn register_deployment(
        &self,
        deployment: NewDeployment,
    ) -> StoreResult<(DeploymentRecord, bool)>;
    async fn list_deployments(&self) -> StoreResult<Vec<DeploymentRecord>>;
    /// The handler in the newest deployment that serves it.
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

    /// Creates an invocation with its input entry and its first attempt started, unless its
    /// idempotency key is taken.
    async fn create_invocation(&self, new: NewInvocation) -> StoreResult<Created>;
    async fn get_invocation(&self, id: &InvocationId) -> StoreResult<Option<InvocationRecord>>;
    async fn read_journal(&self, id: &InvocationId) -> StoreResult<Vec<StoredEntry>>;
    async fn read_entry(&self, id: &InvocationId, index: u32) -> StoreResult<Option<StoredEntry>>;
    /// Invocations, newest first, at most `limit`, optionally only those with `status`.
    async fn list_invocations(
        &self,
        status: Option<Status>,
        limit: u32,
    ) -> StoreResult<Vec<InvocationRecord>>;
    /// Invocations that need a driver after a start: pending, running, backing-off, suspended.
    async fn list_resumable(&self) -> StoreResult<Vec<InvocationRecord>>;

    /// Starts the next attempt: the status becomes running and the attempt number grows by
    /// one, which fences every earlier attempt. `None` when the invocation is final or paused.
    async fn start_attempt(
        &self,
        id: &InvocationId,
        now_ms: i64,
    ) -> StoreResult<Option<InvocationRecord>>;
    /// Appends an entry for `attempt`, durably, at the next free index (which must be
    /// `entry.index` when that is given).
    async fn append_entry(
        &self,
        id: &InvocationId,
        attempt: u32,
        entry: NewEntry,
        now_ms: i64,
    ) -> StoreResult<StoredEntry>;
    /// The value of step `name`: the recorded one if there is one, else `value`, which is
    /// then recorded for `attempt`, atomically. The flag is true for a recorded value.
    async fn record_step(
        &self,
        id: &InvocationId,
        attempt: u32,
        name: String,
        value: Vec<u8>,
        now_ms: i64,
    ) -> StoreResult<(Vec<u8>, bool)>;
    /// Ends `attempt` as the invoker decided; returns the record and, when the invocation
    /// ended, its output entry.
    async fn end_attempt(
        &self,
        id: &InvocationId,
        attempt: u32,
        end: AttemptEnd,
        now_ms: i64,
    ) -> StoreResult<(InvocationRecord, Option<StoredEntry>)>;
    /// A paused invocation becomes pending again, optionally moved to another deployment.
    async fn resume(
        &self,
        id: &InvocationId,
        deployment_id: Option<String>,
        now_ms: i64,
    ) -> StoreResult<Option<InvocationRecord>>;
    /// Checks that the database answers.
    async fn ping(&self) -> StoreResult<()>;
    /// Forgets idempotency keys whose retention ended; returns how many.
    async fn purge_idempotency_keys(&self, now_ms: i64) -> StoreResult<u64>;
}
