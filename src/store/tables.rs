//! The store as tables: one small trait per table or concern, whose methods read and write
//! rows and decide nothing. Both backends implement them (`sqlite/tables.rs`,
//! `postgres/tables.rs`), and [`Tx`] offers them all inside one transaction.
//!
//! The rules of the primitives (how a signal is bound, how a run ends or continues as new,
//! how a workflow id is taken) are written once, in `lifecycle/` and `journal/`, as
//! functions over `&mut dyn Tx`; [`Store::write`](super::Store) runs one in the backend's
//! next group-committed transaction.
//!
//! Locking is explicit: [`Invocations::lock_invocation`] and [`Workflows::lock_workflow_id`]
//! take PostgreSQL's row lock and advisory lock (SQLite's single writer needs none). A rule
//! takes a workflow id's lock before any invocation's, so that two rules never wait for
//! each other in the opposite order.

use async_trait::async_trait;
use durin_protocol::{EntryKind, Failure};

use super::{
    AttemptEnd, InvocationRecord, NewInvocation, ParentClose, StoreError, StoreResult,
    StoredCompletion, StoredEntry, UpdateRecord,
};

/// Where an idempotency key of a signal or an update is unique: the invocation it was
/// sent to, or, for a workflow's runs, the workflow id across all its runs.
#[derive(Debug, Clone, Copy)]
pub enum KeyScope<'a> {
    Invocation(&'a str),
    Workflow {
        workflow: &'a str,
        workflow_id: &'a str,
    },
}

impl<'a> KeyScope<'a> {
    /// The scope of the keys of signals and updates sent to `record`.
    pub fn of(record: &'a InvocationRecord) -> KeyScope<'a> {
        match &record.workflow_id {
            Some(workflow_id) => KeyScope::Workflow {
                workflow: &record.service,
                workflow_id,
            },
            None => KeyScope::Invocation(record.id.as_str()),
        }
    }
}

/// A command of the journal as a wait sees it.
#[derive(Debug, Clone, Copy)]
pub struct CommandRow {
    pub kind: Option<EntryKind>,
    /// The number of its completion, once it completed.
    pub completed: Option<u32>,
    /// The wake time of its timer that has not fired.
    pub wake_at_ms: Option<i64>,
}

/// The parent-close policy a child's row holds (none: the child is abandoned).
pub fn parent_close(stored: Option<&str>) -> ParentClose {
    stored
        .and_then(ParentClose::parse)
        .unwrap_or(ParentClose::Abandon)
}

/// A signal that no wait has taken.
#[derive(Debug, Clone)]
pub struct BufferedSignal {
    pub seq: u32,
    pub value: Option<Vec<u8>>,
    pub at_ms: i64,
}

/// The `invocations` table.
#[async_trait]
pub trait Invocations: Send {
    async fn invocation(&mut self, id: &str) -> StoreResult<Option<InvocationRecord>>;
    /// The invocation, locked until the transaction ends (PostgreSQL `FOR UPDATE`).
    async fn lock_invocation(&mut self, id: &str) -> StoreResult<Option<InvocationRecord>>;
    /// Inserts a new invocation whose first attempt runs on this node, with its `input`
    /// entry (index 0); PostgreSQL does both in one statement.
    async fn insert_running(
        &mut self,
        new: &NewInvocation,
        workflow_id: Option<&str>,
        token: &str,
        input: &StoredEntry,
    ) -> StoreResult<InvocationRecord>;
    /// Inserts an invocation that waits for the scheduler (attempt 0), with no entry.
    async fn insert_pending(&mut self, new: &Pending<'_>, now_ms: i64) -> StoreResult<()>;
    /// Grows the journal of the running `attempt` by one entry of `bytes`, if the fence,
    /// the index and the token (when given) match and the limits allow it, and inserts
    /// `entry` at the index that gives it (its own `index` is ignored), at `entry.at_ms`:
    /// that index, or `None` when the journal did not grow. PostgreSQL does both in one
    /// statement.
    #[allow(clippy::too_many_arguments)]
    async fn grow_journal_with(
        &mut self,
        id: &str,
        attempt: u32,
        index: Option<u32>,
        token: Option<&str>,
        bytes: i64,
        max_entries: u32,
        max_bytes: i64,
        entry: &StoredEntry,
    ) -> StoreResult<Option<u32>>;
    /// Adds `bytes` to what the invocation holds (completions, buffered signals).
    async fn add_bytes(&mut self, id: &str, bytes: i64) -> StoreResult<()>;
    /// Records how `attempt` ended, fenced by it (`None` when the fence did not match, or,
    /// with `unless_arrivals`, when a signal or an update arrived during the attempt: see
    /// [`Invocations::note_arrival`]). An end that ends the invocation reserves the output
    /// entry's index and counts `output_bytes`.
    #[allow(clippy::too_many_arguments)]
    async fn record_end(
        &mut self,
        id: &str,
        attempt: u32,
        end: &AttemptEnd,
        suspended_due: Option<i64>,
        output_bytes: i64,
        unless_arrivals: bool,
        now_ms: i64,
    ) -> StoreResult<Option<InvocationRecord>>;
    /// Notes on the invocation's row that a signal or an update arrived while `attempt`
    /// ran, so that the attempt's completion looks (a write to the row: on PostgreSQL a
    /// completion waiting for the row sees it).
    async fn note_arrival(&mut self, id: &str, attempt: u32) -> StoreResult<()>;
    /// Up to `limit` invocations an attempt may start now, oldest due first: due ones and,
    /// on a database several nodes share, running ones whose lease expired; locked (rows
    /// another transaction holds are skipped). Each with whether its start waits for its
    /// key's rate (the first attempt of an invocation created under one).
    async fn claimable(&mut self, now_ms: i64, limit: u32) -> StoreResult<Vec<(String, bool)>>;
    /// Starts the next attempt of a claimable invocation (`attempt + 1` fences every
    /// earlier one; leased to this node where nodes share the database), with `token`.
    async fn start_attempt(
        &mut self,
        id: &str,
        token: &str,
        now_ms: i64,
    ) -> StoreResult<Option<InvocationRecord>>;
    /// Records a heartbeat of the running `attempt` with `token`: false when the fence or
    /// the token did not match.
    async fn record_heartbeat(
        &mut self,
        id: &str,
        attempt: u32,
        token: &str,
        details: Option<&[u8]>,
        now_ms: i64,
    ) -> StoreResult<bool>;
    /// Suspends the running invocation (a plain handler's wait).
    async fn set_suspended(
        &mut self,
        id: &str,
        due_ms: Option<i64>,
        waiting_for: &[u32],
        now_ms: i64,
    ) -> StoreResult<()>;
    /// Makes the invocation due by `now_ms` (an earlier due time stays).
    async fn wake(&mut self, id: &str, now_ms: i64) -> StoreResult<()>;
    /// Makes a suspended invocation due at `now_ms`.
    async fn wake_suspended(&mut self, id: &str, now_ms: i64) -> StoreResult<bool>;
    /// Reserves the index of the `cancel` entry and makes the invocation pending and due,
    /// which fences a running attempt.
    async fn mark_cancelled(&mut self, id: &str, now_ms: i64) -> StoreResult<InvocationRecord>;
    /// Ends the invocation at once with `status` and `failure`, reserving its output
    /// entry's index.
    async fn mark_ended(
        &mut self,
        id: &str,
        status: super::Status,
        failure: &Failure,
        output_bytes: i64,
        now_ms: i64,
    ) -> StoreResult<InvocationRecord>;
    /// Makes an ended or paused invocation pending again with entries `0..=from` kept.
    async fn mark_restarted(
        &mut self,
        id: &str,
        from: u32,
        reason: &str,
        keep_cancel: bool,
        key: Option<&str>,
        now_ms: i64,
    ) -> StoreResult<InvocationRecord>;
    /// Gives `to` (the next run of `from`) the parent, the parent's entry and the
    /// parent-close policy of `from`.
    async fn inherit_parent(&mut self, from: &str, to: &str) -> StoreResult<()>;
    /// Pauses an invocation that has not ended (fencing a running attempt); `None` when
    /// it was not in a state that pauses.
    async fn mark_paused(
        &mut self,
        id: &str,
        reason: &str,
        now_ms: i64,
    ) -> StoreResult<Option<InvocationRecord>>;
    /// Makes a paused invocation pending and due, optionally on another deployment.
    async fn mark_resumed(
        &mut self,
        id: &str,
        deployment_id: Option<&str>,
        now_ms: i64,
    ) -> StoreResult<Option<InvocationRecord>>;
    /// Makes a backing-off invocation due at `now_ms`.
    async fn retry_backoff_now(
        &mut self,
        id: &str,
        now_ms: i64,
    ) -> StoreResult<Option<InvocationRecord>>;
    /// Ended invocations that ended before `before_ms`, oldest first (locked; rows another
    /// transaction holds are skipped).
    async fn ended_before(&mut self, before_ms: i64, limit: u32) -> StoreResult<Vec<String>>;
    /// Deletes an invocation with everything kept for it (journal, completions, timers,
    /// signals, state, updates, idempotency keys, workflow id, egress bookkeeping).
    async fn delete_invocation(&mut self, id: &str) -> StoreResult<()>;
    /// The idempotency key of the invocation's last restart.
    async fn restart_key(&mut self, id: &str) -> StoreResult<Option<String>>;
    /// The unfinished children of `parent` with their parent-close policy.
    async fn open_children(&mut self, parent: &str) -> StoreResult<Vec<(String, ParentClose)>>;
    /// Closes a run that has just ended: inserts its `output` entry, deletes its timers,
    /// marks its pending and accepted updates abandoned, and returns its unfinished
    /// children with their parent-close policy ([`Invocations::open_children`]).
    /// PostgreSQL does it all in one statement.
    async fn close_run(
        &mut self,
        id: &str,
        output: &StoredEntry,
    ) -> StoreResult<Vec<(String, ParentClose)>>;
    /// [`Invocations::record_end`] of an `end` that ends the invocation and, when it was
    /// written, [`Invocations::close_run`] with `output` at the index the end reserved
    /// (`output.index` is not read, the entry's index is the record's last): the record
    /// and the unfinished children. PostgreSQL does it all in one statement.
    #[allow(clippy::too_many_arguments)]
    async fn record_final_end(
        &mut self,
        id: &str,
        attempt: u32,
        end: &AttemptEnd,
        output_bytes: i64,
        unless_arrivals: bool,
        now_ms: i64,
        output: &StoredEntry,
    ) -> StoreResult<Option<(InvocationRecord, Vec<(String, ParentClose)>)>> {
        let Some(record) = self
            .record_end(
                id,
                attempt,
                end,
                None,
                output_bytes,
                unless_arrivals,
                now_ms,
            )
            .await?
        else {
            return Ok(None);
        };
        let output = StoredEntry {
            index: record.journal_len - 1,
            ..output.clone()
        };
        let children = self.close_run(id, &output).await?;
        Ok(Some((record, children)))
    }
    /// Unfinished invocations whose `schedule_to_close` deadline passed: `(id, created,
    /// deadline)`.
    async fn past_deadline(
        &mut self,
        now_ms: i64,
        limit: u32,
    ) -> StoreResult<Vec<(String, i64, i64)>>;
}

/// The `journal` table.
#[async_trait]
pub trait Journal: Send {
    async fn insert_entry(&mut self, id: &str, entry: &StoredEntry) -> StoreResult<()>;
    /// The entry at `index`, with its completion.
    async fn entry(&mut self, id: &str, index: u32) -> StoreResult<Option<StoredEntry>>;
    /// The `occurrence`-th entry (from 0) of `kind` named `name` (and valued `key`).
    async fn find_entry(
        &mut self,
        id: &str,
        kind: EntryKind,
        name: &str,
        key: Option<&[u8]>,
        occurrence: u32,
    ) -> StoreResult<Option<StoredEntry>>;
    /// The command at `index` as a wait sees it.
    async fn command(&mut self, id: &str, index: u32) -> StoreResult<Option<CommandRow>>;
    /// The indexes of the signal waits named `name` that have not completed, in order.
    async fn open_signal_waits(&mut self, id: &str, name: &str) -> StoreResult<Vec<u32>>;
    /// The name of the signal wait at `index`, if it has not completed.
    async fn open_signal_wait(&mut self, id: &str, index: u32) -> StoreResult<Option<String>>;
    /// The first entry after `from` that started something (`call`, `send`, `update`,
    /// `update_result`): `(index, kind)`.
    async fn first_start_after(
        &mut self,
        id: &str,
        from: u32,
    ) -> StoreResult<Option<(u32, String)>>;
    /// Deletes the entries after `from`, their completions and timers, and gives the
    /// signals they took back to the buffer.
    async fn truncate(&mut self, id: &str, from: u32) -> StoreResult<()>;
    /// The `state` entries in order: `(key, value)`.
    async fn state_entries(&mut self, id: &str) -> StoreResult<Vec<(String, Option<Vec<u8>>)>>;
    /// Whether the journal holds a `cancel` entry.
    async fn has_cancel(&mut self, id: &str) -> StoreResult<bool>;
}

/// The `completions` and `timers` tables.
#[async_trait]
pub trait Completions: Send {
    /// The next completion number of the invocation.
    async fn next_completion_seq(&mut self, id: &str) -> StoreResult<u32>;
    async fn insert_completion(
        &mut self,
        id: &str,
        index: u32,
        completion: &StoredCompletion,
    ) -> StoreResult<()>;
    /// The completion number of the invocation's cancellation.
    async fn cancel_seq(&mut self, id: &str) -> StoreResult<Option<u32>>;
    async fn insert_timer(&mut self, id: &str, index: u32, wake_at_ms: i64) -> StoreResult<()>;
    /// The timers due by `by_ms`, in order of their wake times.
    async fn due_timers(&mut self, id: &str, by_ms: i64) -> StoreResult<Vec<u32>>;
    async fn delete_timer(&mut self, id: &str, index: u32) -> StoreResult<()>;
}

/// The `signals` table.
#[async_trait]
pub trait Signals: Send {
    /// The run and number of the signal sent with `key` in `scope`.
    async fn signal_by_key(
        &mut self,
        scope: KeyScope<'_>,
        key: &str,
    ) -> StoreResult<Option<(String, u32)>>;
    async fn next_signal_seq(&mut self, id: &str) -> StoreResult<u32>;
    #[allow(clippy::too_many_arguments)]
    async fn insert_signal(
        &mut self,
        id: &str,
        seq: u32,
        name: &str,
        value: &[u8],
        key: Option<&str>,
        consumed_by: Option<u32>,
        during_attempt: Option<u32>,
        at_ms: i64,
    ) -> StoreResult<()>;
    /// What arrived while `attempt` ran and was not handled, in one read: the signals no
    /// wait took (`"name" (#seq)`, in order, comma-separated; `None` when there are none),
    /// and whether updates that arrived while it ran are pending.
    async fn unseen_arrivals(
        &mut self,
        id: &str,
        attempt: u32,
    ) -> StoreResult<(Option<String>, bool)>;
    /// The oldest signal named `name` that no wait took.
    async fn oldest_buffered(
        &mut self,
        id: &str,
        name: &str,
    ) -> StoreResult<Option<BufferedSignal>>;
    async fn consume_signal(&mut self, id: &str, seq: u32, index: u32) -> StoreResult<()>;
    /// How many signals no wait took, and their bytes.
    async fn buffered(&mut self, id: &str) -> StoreResult<(u32, i64)>;
    /// The signals of `from` that no wait took, moved (in order, after those of `to`, with
    /// their keys) to `to`: their count and bytes.
    async fn move_buffered(&mut self, from: &str, to: &str) -> StoreResult<(u32, i64)>;
    /// Deletes the signals of `id` that no wait took and whose names start with `prefix`.
    async fn drop_buffered(&mut self, id: &str, prefix: &str) -> StoreResult<()>;
}

/// The `workflows` table: a workflow id names its latest run.
#[async_trait]
pub trait Workflows: Send {
    /// Serialises everything that reads and moves one workflow id, on every node
    /// (PostgreSQL: a transaction-scoped advisory lock).
    async fn lock_workflow_id(&mut self, workflow: &str, workflow_id: &str) -> StoreResult<()>;
    /// The run the id names and the digest of its input.
    async fn workflow_run(
        &mut self,
        workflow: &str,
        workflow_id: &str,
    ) -> StoreResult<Option<(String, String)>>;
    /// Points the id at `invocation` (inserting it when new).
    async fn take_workflow_id(
        &mut self,
        workflow: &str,
        workflow_id: &str,
        invocation: &str,
        input_digest: &str,
    ) -> StoreResult<()>;
    /// Points an existing id at `invocation`, keeping its input digest.
    async fn point_workflow_id(
        &mut self,
        workflow: &str,
        workflow_id: &str,
        invocation: &str,
    ) -> StoreResult<()>;
}

/// The `state` table.
#[async_trait]
pub trait State: Send {
    /// Sets `key` (`None` clears it).
    async fn put_state(&mut self, id: &str, key: &str, value: Option<&[u8]>) -> StoreResult<()>;
    async fn clear_state(&mut self, id: &str) -> StoreResult<()>;
}

/// The `updates` table.
#[async_trait]
pub trait Updates: Send {
    async fn update(&mut self, run: &str, id: &str) -> StoreResult<Option<UpdateRecord>>;
    /// The update sent with `key` in `scope`.
    async fn update_by_key(
        &mut self,
        scope: KeyScope<'_>,
        key: &str,
    ) -> StoreResult<Option<UpdateRecord>>;
    #[allow(clippy::too_many_arguments)]
    /// A pending update of `run`; `during_attempt` is the attempt running as it arrives.
    async fn insert_update(
        &mut self,
        run: &str,
        id: &str,
        name: &str,
        input: &[u8],
        key: Option<&str>,
        during_attempt: Option<u32>,
        now_ms: i64,
    ) -> StoreResult<()>;
    /// Moves a `from` update to `to` (with its result or failure).
    async fn set_update_status(
        &mut self,
        run: &str,
        id: &str,
        from: super::UpdateStatus,
        to: super::UpdateStatus,
        result: Option<&[u8]>,
        failure: Option<&Failure>,
    ) -> StoreResult<()>;
    /// Whether updates that arrived while the current attempt ran are pending.
    async fn updates_since_attempt(&mut self, run: &str) -> StoreResult<bool>;
}

/// The `idempotency_keys` table (keys of calls, sends and starts).
#[async_trait]
pub trait IdempotencyKeys: Send {
    /// Serialises the creations under one key, on every node (PostgreSQL: a
    /// transaction-scoped advisory lock), so that the second finds the first's invocation.
    async fn lock_idempotency_key(&mut self, scope: &str, key: &str) -> StoreResult<()>;
    /// `(request digest, invocation, expires at)` of a key.
    async fn idempotency_key(
        &mut self,
        scope: &str,
        key: &str,
    ) -> StoreResult<Option<(String, String, i64)>>;
    async fn delete_idempotency_key(&mut self, scope: &str, key: &str) -> StoreResult<()>;
    async fn insert_idempotency_key(
        &mut self,
        claim: &super::IdempotencyClaim,
        invocation: &str,
    ) -> StoreResult<()>;
    /// Deletes the keys that expired by `now_ms`: how many.
    async fn delete_expired_keys(&mut self, now_ms: i64) -> StoreResult<u64>;
    /// The invocation's keys expire `retention` after `now_ms` (it ended), or never
    /// (`None`: it runs again).
    async fn hold_idempotency_keys(
        &mut self,
        invocation: &str,
        from_ms: Option<i64>,
    ) -> StoreResult<()>;
}

/// The `schedules` table.
#[async_trait]
pub trait Schedules: Send {
    /// The schedule, locked until the transaction ends (PostgreSQL `FOR UPDATE`).
    async fn lock_schedule(&mut self, id: &str) -> StoreResult<Option<super::ScheduleRow>>;
    /// Inserts the schedule, or replaces the one with its id.
    async fn put_schedule(&mut self, row: &super::ScheduleRow) -> StoreResult<()>;
    /// Whether there was one to delete.
    async fn delete_schedule(&mut self, id: &str) -> StoreResult<bool>;
}

#[async_trait]
pub trait WebhookSources: Send {
    /// The source, locked until the transaction ends (PostgreSQL `FOR UPDATE`).
    async fn lock_webhook_source(
        &mut self,
        name: &str,
    ) -> StoreResult<Option<super::WebhookSourceRow>>;
    /// Inserts the source, or replaces the one of its name.
    async fn put_webhook_source(&mut self, row: &super::WebhookSourceRow) -> StoreResult<()>;
    /// Deletes the source and its deliveries: whether there was one.
    async fn delete_webhook_source(&mut self, name: &str) -> StoreResult<bool>;
    /// Records a delivery (JSON) of the source, and forgets all but its `keep` latest.
    async fn insert_webhook_delivery(
        &mut self,
        source: &str,
        delivery: &str,
        keep: u32,
    ) -> StoreResult<()>;
}

/// The keys of keyed handlers' invocations (columns of the `invocations` table).
///
/// On PostgreSQL a key's lock is taken without waiting ([`StoreError::Contended`] when
/// another transaction holds it: the write runs again), so no rule ever waits on a key.
#[async_trait]
pub trait Keys: Send {
    /// Serialises what changes who holds or waits for one key of a service, on every node
    /// (PostgreSQL: a transaction-scoped advisory lock).
    async fn lock_key(&mut self, service: &str, key: &str) -> StoreResult<()>;
    /// How many invocations of the key hold it: neither queued nor ended.
    async fn key_holders(&mut self, service: &str, key: &str) -> StoreResult<u32>;
    /// Gives a new invocation its key (and its rate), after the key's other unfinished
    /// invocations; `queued`, it waits its turn (status `queued`, no due time).
    /// `debounce_until_ms`: the latest its burst may put its start off.
    async fn set_key(
        &mut self,
        id: &str,
        service: &str,
        key: &super::InvocationKey,
        queued: bool,
        debounce_until_ms: Option<i64>,
    ) -> StoreResult<()>;
    /// The newest invocation of `handler` with the key, made by a caller (not a child),
    /// that has not started (queued, or pending before its first attempt): its id and the
    /// latest its burst may put its start off.
    async fn newest_unstarted(
        &mut self,
        service: &str,
        handler: &str,
        key: &str,
    ) -> StoreResult<Option<(String, Option<i64>)>>;
    /// The rate invocation `id` was created under.
    async fn start_rate(&mut self, id: &str) -> StoreResult<Option<super::StartRate>>;
    /// The `nth` latest start (1-based) of the handler's key, if it had that many.
    async fn nth_latest_start(
        &mut self,
        service: &str,
        handler: &str,
        key: &str,
        nth: u32,
    ) -> StoreResult<Option<i64>>;
    /// Records a start of the handler's key at `at_ms`, and forgets those at or before
    /// `forget_through_ms`.
    async fn record_start(
        &mut self,
        service: &str,
        handler: &str,
        key: &str,
        at_ms: i64,
        forget_through_ms: i64,
    ) -> StoreResult<()>;
    /// The handler's invocation of the key created under its rate, due by `due_by_ms`,
    /// that waits longest (the lowest place) for its first start.
    async fn oldest_rate_waiter(
        &mut self,
        service: &str,
        handler: &str,
        key: &str,
        due_by_ms: i64,
    ) -> StoreResult<Option<String>>;
    /// How many of the handler's invocations of the key created under its rate wait for
    /// their first start ahead of invocation `id` (in a lower place).
    async fn rate_waiters_ahead(
        &mut self,
        service: &str,
        handler: &str,
        key: &str,
        id: &str,
    ) -> StoreResult<u32>;
    /// Forgets the starts of every key before `before_ms`.
    async fn forget_starts_before(&mut self, before_ms: i64) -> StoreResult<()>;
    /// Puts the start of pending invocation `id` off to `due_ms`.
    async fn start_at(&mut self, id: &str, due_ms: i64) -> StoreResult<()>;
    /// Makes the state invocation `id` set (and cleared) its key's.
    async fn apply_key_state(&mut self, id: &str, service: &str, key: &str) -> StoreResult<()>;
    /// Makes up to `count` of the key's queued invocations, oldest first, pending and due
    /// at `now_ms`: their ids.
    async fn release_queued(
        &mut self,
        service: &str,
        key: &str,
        count: u32,
        now_ms: i64,
    ) -> StoreResult<Vec<String>>;
}

/// Every table, in one transaction.
pub trait Tx:
    Invocations
    + Journal
    + Completions
    + Signals
    + Workflows
    + State
    + Updates
    + IdempotencyKeys
    + Schedules
    + WebhookSources
    + Keys
{
}

impl<T> Tx for T where
    T: Invocations
        + Journal
        + Completions
        + Signals
        + Workflows
        + State
        + Updates
        + IdempotencyKeys
        + Schedules
        + WebhookSources
        + Keys
{
}

/// Locks the workflow id of invocation `id` when it is a workflow's run, then the
/// invocation: the order every rule takes them in, so that two rules never wait for each
/// other in the opposite order.
pub async fn lock_with_workflow_id(tx: &mut dyn Tx, id: &str) -> StoreResult<InvocationRecord> {
    let first = tx
        .invocation(id)
        .await?
        .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
    if let Some(workflow_id) = &first.workflow_id {
        tx.lock_workflow_id(&first.service, workflow_id).await?;
    }
    tx.lock_invocation(id)
        .await?
        .ok_or_else(|| StoreError::NotFound(id.to_owned()))
}

/// Why a fenced write matched no row: no such invocation, or not its attempt.
pub async fn refusal(tx: &mut dyn Tx, id: &str, attempt: u32) -> StoreError {
    match tx.invocation(id).await {
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

/// An invocation created pending by another one (a child, the next run of a workflow).
pub struct Pending<'a> {
    pub id: &'a str,
    pub service: &'a str,
    pub handler: &'a str,
    pub deployment_id: &'a str,
    pub input: &'a [u8],
    pub due_ms: i64,
    pub deadline_ms: Option<i64>,
    pub workflow_id: Option<&'a str>,
    /// The parent and, for a `call`, its entry.
    pub parent: Option<(&'a str, Option<u32>)>,
    pub parent_close: Option<ParentClose>,
    /// The W3C `traceparent` its trace continues.
    pub traceparent: Option<String>,
    /// The `Idempotency-Key` of the request that created it, shown in its view.
    pub idempotency_key: Option<&'a str>,
}
