//! The engine: one scheduler claims due invocations and runs their attempts.
//!
//! Every event that makes an invocation runnable (its creation, a backoff that elapsed, a
//! timer that is due, a signal or callback that a suspended attempt waits for, a resume)
//! is a store write that sets its due time in the same transaction. The scheduler
//! (`scheduler.rs`) claims due invocations in batches, which starts their next attempt in
//! the store (fencing every earlier one), and runs each attempt (`attempt.rs`) under a
//! bounded concurrency. Nothing waits in memory: a sleeping invocation is a row with a due
//! time, and recovery after a crash is the scheduler finding rows that are overdue.
//! [`Engine::nudge`] only makes the scheduler look sooner; correctness never depends on it.

mod admission;
mod attempt;
mod heartbeats;
mod invoke;
mod scheduler;
mod updates;
mod waiters;

use std::sync::Arc;
use std::time::Duration;

use durin_protocol::RetryPolicy;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use admission::{Admission, Admitted, Busy, Caller, Limits as AdmissionLimits};
pub use updates::UpdateWatch;
pub use waiters::{Ended, Waiters};

use crate::clock::Clock;
use crate::ids::InvocationId;
use crate::journal::awakeable::AwakeableKey;
use crate::registry::Targets;
use crate::signing::RequestSigner;
use crate::store::{
    ClusterEvent, InvocationRecord, LeaseHold, Status, Store, StoreError, StoredEntry,
};

pub struct EngineConfig {
    /// Base URL of this gateway as handlers reach it (for the context API).
    pub advertised_url: String,
    pub default_retry_policy: RetryPolicy,
    pub default_start_to_close: Duration,
    /// Attempts that run at once, and the work that may wait for them.
    pub admission: admission::Limits,
    /// Past 80 % of these, a handler is told to continue as new.
    pub journal_limits: crate::store::JournalLimits,
    /// Timeouts of handlers that declare none.
    pub timeouts: crate::lifecycle::timeouts::TimeoutDefaults,
    /// When a handler's retry policy is used up, pause the invocation instead of failing.
    pub pause_when_exhausted: bool,
    /// Where the spans of invocations, attempts and entries go.
    pub traces: crate::telemetry::traces::Traces,
}

/// The gateway's secrets the engine uses: the key of awakeable tokens and the signer of
/// requests to handlers.
pub struct EngineKeys {
    pub awakeables: AwakeableKey,
    pub signer: Arc<RequestSigner>,
}

/// Told when a plain handler's attempt starts and when attempts end, so that per-attempt
/// state kept elsewhere (the egress's call occurrences) starts without a read of the store
/// and is dropped at the right time: nothing of an invocation is kept in memory once its
/// attempt's end is in the store, so memory does not grow with the invocations that wait.
pub trait AttemptObserver: Send + Sync {
    /// A plain handler's attempt is about to be called (`record` is its running state,
    /// `journal` the journal it starts from): what an observer would otherwise read from
    /// the store at the attempt's first call, it can take from here.
    fn plain_attempt_starting(&self, _record: &InvocationRecord, _journal: &[StoredEntry]) {}
    /// The handler of `attempt` has answered (or given up): its calls are over, although
    /// the store may still show the attempt running.
    fn attempt_ended(&self, id: &InvocationId, attempt: u32);
    /// The end of `attempt` is in the store (or a newer state fenced it): the store itself
    /// now refuses the attempt.
    fn attempt_recorded(&self, id: &InvocationId, attempt: u32);
    /// The store shows `attempt` over while its handler may still run (terminated, paused,
    /// past its deadline, suspended by a wait); if it runs on this node, the engine calls
    /// [`attempt_ended`](Self::attempt_ended) and
    /// [`attempt_recorded`](Self::attempt_recorded) once its handler has answered.
    fn attempt_over(&self, id: &InvocationId, attempt: u32) {
        self.attempt_recorded(id, attempt);
    }
}

/// Appends what a streamed attempt (protocol 6) sends, by the context API's rules, which
/// live above the engine; set once the API's state exists ([`Engine::set_stream_appender`]).
#[async_trait::async_trait]
pub trait StreamAppender: Send + Sync {
    async fn append(
        &self,
        id: &InvocationId,
        attempt: u32,
        token: &str,
        request: durin_protocol::AppendRequest,
    ) -> Result<durin_protocol::AppendResponse, crate::problem::ApiError>;
}

pub struct Engine {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    http: reqwest::Client,
    appender: std::sync::OnceLock<Arc<dyn StreamAppender>>,
    config: EngineConfig,
    waiters: Waiters,
    /// When running attempts last sent a heartbeat.
    heartbeats: heartbeats::Heartbeats,
    /// Callers waiting for their updates.
    updates: updates::UpdateWatch,
    targets: Arc<Targets>,
    observers: Vec<Arc<dyn AttemptObserver>>,
    awakeables: AwakeableKey,
    /// Signs every request to a handler.
    signer: Arc<RequestSigner>,
    /// Attempts in flight, so that a shutdown can wait for them.
    tracker: TaskTracker,
    /// Bounds the attempts that run at once and the first attempts that wait for them.
    admission: Admission,
    /// Wakes the scheduler when something may have become due.
    nudge: Notify,
    shutdown: CancellationToken,
}

impl Engine {
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        config: EngineConfig,
        targets: Arc<Targets>,
        observers: Vec<Arc<dyn AttemptObserver>>,
        keys: EngineKeys,
        shutdown: CancellationToken,
    ) -> Engine {
        let EngineKeys { awakeables, signer } = keys;
        let admission = Admission::new(config.admission);
        Engine {
            store,
            clock,
            // A redirect is not followed: it would turn the invocation into a GET, or carry
            // the attempt's token to another host.
            http: reqwest::Client::builder()
                .pool_idle_timeout(Duration::from_secs(30))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap_or_default(),
            appender: std::sync::OnceLock::new(),
            config,
            waiters: Waiters::default(),
            heartbeats: heartbeats::Heartbeats::default(),
            updates: updates::UpdateWatch::default(),
            targets,
            observers,
            awakeables,
            signer,
            tracker: TaskTracker::new(),
            admission,
            nudge: Notify::new(),
            shutdown,
        }
    }

    /// Where the appends of streamed attempts go. Until it is set, deployments of
    /// protocol 6 are invoked without a stream.
    pub fn set_stream_appender(&self, appender: Arc<dyn StreamAppender>) {
        let _ = self.appender.set(appender);
    }

    pub fn traces(&self) -> &crate::telemetry::traces::Traces {
        &self.config.traces
    }

    pub fn waiters(&self) -> &Waiters {
        &self.waiters
    }

    /// Where callers wait for the updates they sent.
    pub fn updates(&self) -> &UpdateWatch {
        &self.updates
    }

    /// An update of `run` may have changed (refused, done, or the run ended): its callers
    /// here and on the other nodes look again.
    pub fn updates_changed(&self, run: &InvocationId) {
        self.updates.changed(run);
        self.store
            .broadcast(ClusterEvent::UpdateChanged(run.clone()));
    }

    /// Hears what the other nodes on the store tell (nothing, on a store no other node
    /// shares): an invocation ended there answers the callers waiting for it here; stops
    /// with the shutdown token.
    pub fn start_cluster_events(self: &Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        let mut events = self.store.cluster_events()?;
        let engine = Arc::clone(self);
        Some(tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    event = events.recv() => match event {
                        Some(event) => event,
                        None => return,
                    },
                    _ = engine.shutdown.cancelled() => return,
                };
                match event {
                    ClusterEvent::Ended(id) => engine.ended_elsewhere(&id).await,
                    ClusterEvent::UpdateChanged(run) => engine.updates.changed(&run),
                    ClusterEvent::Resync => {
                        for id in engine.waiters.ids() {
                            engine.ended_elsewhere(&id).await;
                        }
                        for run in engine.updates.runs() {
                            engine.updates.changed(&run);
                        }
                    }
                }
            }
        }))
    }

    /// Answers the callers waiting here for `id` if it has ended (or paused), as another
    /// node said; reads it from the store only when someone here waits.
    async fn ended_elsewhere(&self, id: &InvocationId) {
        if !self.waiters.waits_for(id) {
            return;
        }
        self.updates.changed(id);
        let record = match self.store.get_invocation(id).await {
            Ok(Some(record)) => record,
            Ok(None) => return,
            Err(error) => {
                tracing::warn!(%id, %error, "could not read an invocation another node ended");
                return;
            }
        };
        if !(record.status.is_final() || record.status == crate::store::Status::Paused) {
            return;
        }
        let ended = match self.load_ended(record).await {
            Ok(ended) => ended,
            Err(error) => {
                tracing::warn!(%id, %error, "could not read the output of an invocation another node ended");
                return;
            }
        };
        self.waiters.finish(Arc::new(ended));
    }

    /// `record` as its waiters receive it: with its output entry when it has ended.
    pub async fn load_ended(&self, record: InvocationRecord) -> Result<Ended, StoreError> {
        let output = if record.status.is_final() {
            self.store
                .read_entry(&record.id, record.journal_len.saturating_sub(1))
                .await?
        } else {
            None
        };
        Ok(Ended { record, output })
    }

    /// A running attempt sent a heartbeat (recorded in the store already). Kept in memory
    /// only when this node runs that attempt under a heartbeat timeout; the watchdog of an
    /// attempt another node runs finds it in the store.
    pub fn heartbeat(&self, id: &InvocationId, attempt: u32) {
        self.heartbeats.beat(id, attempt);
    }

    /// Every second, fails the invocations whose `schedule_to_close` deadline passed and
    /// tells their waiting callers; stops with the shutdown token.
    pub fn start_deadlines(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let engine = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = engine.shutdown.cancelled() => return,
                }
                match engine.store.expire(engine.clock.now_ms(), 500).await {
                    Ok(ended) => {
                        for (record, output) in ended {
                            tracing::info!(id = %record.id, "schedule_to_close timeout");
                            engine.ended(record, Some(output));
                        }
                    }
                    Err(error) => tracing::warn!(%error, "could not expire deadlines"),
                }
            }
        })
    }

    /// The scheduler looks for due invocations now (after a write that made one due).
    pub fn nudge(&self) {
        self.nudge.notify_one();
    }

    /// Invocations whose attempt was cut short by a crash or a stop become due; returns how
    /// many. Call before [`Engine::start_scheduler`].
    pub async fn recover(&self) -> Result<u64, StoreError> {
        // On PostgreSQL another node may be claiming the same rows (their leases ran
        // out): a deadlock PostgreSQL breaks is contended, and the recovery runs again.
        self.store
            .contended(|| self.store.recover_running(self.clock.now_ms()))
            .await
    }

    /// Starts the scheduler loop; it stops with the shutdown token.
    pub fn start_scheduler(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(scheduler::run(Arc::clone(self)))
    }

    /// Who may create work now, and how (see [`Admission`]).
    pub fn admission(&self) -> &Admission {
        &self.admission
    }

    /// Whether a request that would create work is let in, and whether its first attempt
    /// runs here (queued for a slot) or is left to the scheduler; asked before anything is
    /// written.
    pub async fn admit(&self, caller: Caller) -> Result<Admitted, Busy> {
        let store = &self.store;
        self.admission
            .admit(caller, || async move {
                store.count_pending().await.unwrap_or_else(|error| {
                    tracing::warn!(%error, "could not count the pending starts; refusing");
                    u64::MAX
                })
            })
            .await
    }

    /// Runs the first attempt of an invocation ingress has just created: at once (after
    /// its turn for a slot) when it was created running, by the scheduler when it was
    /// created due. `hold` is the first attempt's lease, held since before the creation's
    /// write (see [`Engine::hold_first_attempt`]).
    pub fn run_created(
        self: &Arc<Self>,
        record: InvocationRecord,
        input: StoredEntry,
        hold: LeaseHold,
    ) {
        if record.status == Status::Running {
            self.run_started(record, vec![input], hold);
        } else {
            self.nudge();
        }
    }

    /// Runs the first attempt of an invocation the store created already started (attempt
    /// 1, running), with its journal in hand, so that it costs no further read or write. It
    /// waits for a slot in arrival order first.
    fn run_started(
        self: &Arc<Self>,
        record: InvocationRecord,
        journal: Vec<StoredEntry>,
        hold: LeaseHold,
    ) {
        // During a shutdown the invocation stays running in the store (also one still in
        // the queue); the next start recovers it.
        if self.shutdown.is_cancelled() {
            return;
        }
        // Its lease lives while this task does, queued or running.
        let engine = Arc::clone(self);
        self.tracker.spawn(async move {
            let _hold = hold;
            let Some(slot) = engine.admission.queue_for_slot(&engine.shutdown).await else {
                return;
            };
            // After a wait in the queue, the invocation is read again: it may have been
            // cancelled (the attempt must see it) or ended (terminated: nothing to run).
            let (record, journal) = if slot.waited {
                match engine.store.get_invocation(&record.id).await {
                    Ok(Some(now))
                        if now.status == Status::Running && now.attempt == record.attempt =>
                    {
                        (now, None)
                    }
                    Ok(_) => return,
                    // The attempt reads the journal itself; a store that fails there too
                    // ends it as a retry.
                    Err(_) => (record, None),
                }
            } else {
                (record, Some(journal))
            };
            // Boxed: the attempt's state is allocated once it runs, so that a task still
            // in the queue is small.
            Box::pin(engine.run_attempt(record, journal)).await;
            drop(slot);
        });
    }

    /// The lease of the first attempt of `id`, which ingress is about to create: held from
    /// before the write, so that the renewals cover the row from its commit on, and
    /// dropped unless the creation is handed to [`Engine::run_created`] (an invocation that
    /// existed already, a failed write, or one whose acknowledgement was lost is then not
    /// renewed by this node).
    pub fn hold_first_attempt(&self, id: &InvocationId) -> LeaseHold {
        self.store.hold_lease(id, 1)
    }

    /// Waits for attempts in flight to finish, at most `timeout`. What is left is
    /// recovered at the next start.
    pub async fn drain(&self, timeout: Duration) {
        self.tracker.close();
        if tokio::time::timeout(timeout, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = self.tracker.len(),
                "drain timed out; unfinished attempts resume at the next start"
            );
        }
    }
}
