//! The handler's view of its invocation: replay of recorded entries, append of new ones.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use durin_protocol::ParentClose;
use durin_protocol::{
    AppendRequest, AppendResponse, Completion, EntryKind, EntryRef, Failure, GatewayFrame,
    InvocationRequest, JournalEntry, Outcome, RetryPolicy, HEADER_ATTEMPT, HEADER_ATTEMPT_TOKEN,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::error::{HandlerError, Kind};
use crate::stream::AttemptStream;

type BoxFuture<T> = std::pin::Pin<Box<dyn Future<Output = T> + Send>>;
type Validator = Arc<dyn Fn(&Value) -> Result<(), HandlerError> + Send + Sync>;
type UpdateFn = Arc<dyn Fn(Context, Value) -> BoxFuture<Result<Value, HandlerError>> + Send + Sync>;

/// A workflow's handler of one kind of update: its validator and its handler.
#[derive(Clone)]
struct UpdateHandler {
    validate: Validator,
    handle: UpdateFn,
}

/// How long an append keeps trying while the gateway cannot be reached (it may be
/// restarting); after that the attempt ends and Durin retries it.
const APPEND_PATIENCE: Duration = Duration::from_secs(10);

/// Options of one step.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// The step's retry policy; the SDK's default ([`RetryPolicy::default`]) when `None`.
    pub retry_policy: Option<RetryPolicy>,
    /// Bound on one try of the step: past it the try fails (retryable, type
    /// `StartToCloseTimeout`) and the step's policy decides what comes next.
    pub start_to_close: Option<Duration>,
    /// Bound on all the tries of the step, from its first: a failure past it is the
    /// step's last (a terminal `ScheduleToCloseTimeout`), whatever its retry policy says.
    pub schedule_to_close: Option<Duration>,
}

impl RunOptions {
    pub fn retry_policy(policy: RetryPolicy) -> RunOptions {
        RunOptions {
            retry_policy: Some(policy),
            ..RunOptions::default()
        }
    }

    /// The same options with a bound on one try of the step.
    pub fn start_to_close(mut self, limit: Duration) -> RunOptions {
        self.start_to_close = Some(limit);
        self
    }

    /// The same options with a bound on all the tries of the step.
    pub fn schedule_to_close(mut self, limit: Duration) -> RunOptions {
        self.schedule_to_close = Some(limit);
        self
    }
}

/// A journaled command whose result arrives later: a timer, a signal wait, an awakeable.
/// Wait for it (and possibly others) with [`Context::first`].
#[derive(Debug, Clone)]
pub struct Waitable {
    index: u32,
    /// What the gateway recorded for it (a timer's wake time, an awakeable's token).
    info: Option<Value>,
    completion: Option<Completion>,
    /// The completion came with the journal the attempt started with (rather than with an
    /// append during the attempt).
    known_at_start: bool,
}

impl Waitable {
    /// The invocation id of a child started with [`Context::call_waiter`].
    pub fn invocation_id(&self) -> String {
        invocation_id(self.info.as_ref())
    }

    /// Whether its result has arrived.
    pub fn is_complete(&self) -> bool {
        self.completion.is_some()
    }

    /// The result, as `T` (a signal's payload, an awakeable's value). A rejected awakeable
    /// is a terminal error the handler may handle.
    pub fn value<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        let completion = self.completion.as_ref().ok_or_else(|| {
            HandlerError::terminal("the result has not arrived; wait with Context::first")
        })?;
        if let Some(failure) = &completion.failure {
            return Err(HandlerError::from_failure(failure.clone()));
        }
        serde_json::from_value(completion.value.clone().unwrap_or(Value::Null)).map_err(|e| {
            HandlerError::terminal(format!("the result does not fit the type asked for: {e}"))
        })
    }
}

/// Which of `waitables` completed first, when every replay will answer the same: decided
/// from a completion that came with the journal (anything that completed later has a
/// higher number), or one learned during the attempt when every number between the
/// journal's last and it is known, or when all have completed. Otherwise a completion this
/// attempt has not seen may have come first, and `None` makes the handler suspend: the
/// gateway, which knows, runs it again at once.
fn first_decided(
    waitables: &[&Waitable],
    start_seq: u32,
    learned: &std::collections::BTreeSet<u32>,
) -> Option<usize> {
    let (seq, i) = waitables
        .iter()
        .enumerate()
        .filter_map(|(i, w)| w.completion.as_ref().map(|c| (c.seq, i)))
        .min()?;
    let all_known = waitables.iter().all(|w| w.completion.is_some());
    let no_gap = (start_seq + 1..seq).all(|s| learned.contains(&s));
    (waitables.len() == 1 || all_known || waitables[i].known_at_start || no_gap).then_some(i)
}

/// Milliseconds since the epoch on this machine's clock.
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn to_json<T: Serialize>(value: &T) -> Result<Value, HandlerError> {
    serde_json::to_value(value)
        .map_err(|e| HandlerError::terminal(format!("the input cannot be serialized: {e}")))
}

/// The child's id in what the gateway recorded for a `call` or `send`.
fn invocation_id(info: Option<&Value>) -> String {
    info.and_then(|v| v["invocation_id"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// A callback from outside (see [`Context::awakeable`]).
#[derive(Debug, Clone)]
pub struct Awakeable {
    /// The secret that completes it; it names its invocation and cannot be guessed.
    pub token: String,
    /// `POST` a JSON value here to resolve it.
    pub resolve_url: String,
    /// `POST {"message"}` here to reject it.
    pub reject_url: String,
    pub waitable: Waitable,
}

impl Awakeable {
    /// Waits for the value it is resolved with (a rejection is a terminal error).
    pub async fn wait<T: DeserializeOwned>(&self, ctx: &Context) -> Result<T, HandlerError> {
        ctx.first(&[&self.waitable]).await?;
        self.waitable.value()
    }
}

/// The context of one attempt. Cheap to clone; all clones share the same cursor.
#[derive(Clone)]
pub struct Context {
    inner: Arc<Inner>,
}

struct Inner {
    invocation_id: String,
    attempt: u32,
    attempt_token: String,
    entries_url: String,
    heartbeat_url: String,
    updates_url: String,
    /// The workflow's update handlers, by name.
    update_handlers: Mutex<std::collections::HashMap<String, UpdateHandler>>,
    /// What the last heartbeat of an earlier attempt said.
    heartbeat_details: Option<Value>,
    position_failures: u32,
    /// A replay of a recorded history: nothing new runs or is appended.
    replay_only: bool,
    /// Version 5: entries that start nothing are kept back until the next append, or sent
    /// with the outcome (see [`Context::keep`]).
    keeps_back: bool,
    http: reqwest::Client,
    /// Version 6: appends go on the attempt's own stream instead of a call each.
    stream: Option<Arc<AttemptStream>>,
    state: Mutex<ReplayState>,
    /// The durable state as the handler sees it: its key's (a keyed handler), with the
    /// `set`s and `clear`s it has made so far on top.
    values: Mutex<serde_json::Map<String, Value>>,
}

struct ReplayState {
    /// Recorded entries after the input, in index order.
    journal: Vec<JournalEntry>,
    /// Position in `journal` of the next entry the handler will ask for.
    cursor: usize,
    /// The index the next appended entry gets.
    next_index: u32,
    /// Entries recorded but not yet sent, their indexes taken (see [`Context::keep`]).
    kept: Vec<AppendRequest>,
    /// Whether this attempt appended anything (then a failing step is on its first try).
    appended: bool,
    /// Set when the attempt must end with this outcome whatever the handler returns.
    abort: Option<Outcome>,
    /// The highest completion number in the journal the attempt started with.
    start_seq: u32,
    /// Completion numbers learned from appends during the attempt.
    learned: std::collections::BTreeSet<u32>,
    /// Durin said the journal nears its limits (at the start, or in an append's answer).
    suggest_continue_as_new: bool,
    /// When the journal last grew (ms since the epoch, Durin's clock): the next step has
    /// been trying since then.
    position_since_ms: Option<i64>,
    /// Updates sent to the run and not yet accepted or refused, oldest first.
    pending_updates: std::collections::VecDeque<durin_protocol::PendingUpdate>,
    /// An update's handler runs: waits inside it handle no other update.
    in_update: bool,
}

enum Replayed {
    Recorded(Box<JournalEntry>),
    New,
}

/// What became of one sending of an append.
enum Delivered {
    Appended(AppendResponse),
    /// The gateway refused it, with this HTTP status.
    Refused {
        status: u16,
        detail: String,
    },
    /// The gateway's answer is not an append response.
    Unreadable(String),
    /// The gateway could not be reached.
    Unreachable(String),
    /// The attempt's stream ended first: the attempt is over.
    Gone,
}

impl Context {
    pub(crate) fn new(
        request: &mut InvocationRequest,
        http: reqwest::Client,
        stream: Option<Arc<AttemptStream>>,
    ) -> Context {
        let journal = std::mem::take(&mut request.journal);
        let next_index = journal.last().map(|e| e.index + 1).unwrap_or(1);
        // Egress entries are matched by the gateway, not replayed by the cursor.
        let journal: Vec<JournalEntry> = journal
            .into_iter()
            .filter(|e| e.kind != EntryKind::Egress)
            .collect();
        Context {
            inner: Arc::new(Inner {
                invocation_id: request.invocation_id.clone(),
                attempt: request.attempt,
                attempt_token: std::mem::take(&mut request.attempt_token),
                entries_url: format!("{}/entries", request.context_url.trim_end_matches('/')),
                heartbeat_url: format!("{}/heartbeat", request.context_url.trim_end_matches('/')),
                heartbeat_details: request.heartbeat_details.take(),
                updates_url: format!("{}/updates", request.context_url.trim_end_matches('/')),
                update_handlers: Mutex::default(),
                position_failures: request.position_failures,
                replay_only: request.replay,
                keeps_back: request.protocol >= durin_protocol::TRAILING_ENTRIES_VERSION
                    && !request.replay,
                http,
                stream,
                values: Mutex::new(request.key_state.take().unwrap_or_default()),
                state: Mutex::new(ReplayState {
                    start_seq: journal
                        .iter()
                        .filter_map(|e| e.completion.as_ref().map(|c| c.seq))
                        .max()
                        .unwrap_or(0),
                    journal,
                    cursor: 0,
                    next_index,
                    kept: Vec::new(),
                    appended: false,
                    abort: None,
                    learned: Default::default(),
                    suggest_continue_as_new: request.suggest_continue_as_new,
                    position_since_ms: request.position_since_ms,
                    pending_updates: std::mem::take(&mut request.updates).into(),
                    in_update: false,
                }),
            }),
        }
    }

    /// The invocation id (`inv_…`), stable across attempts: a good idempotency key.
    pub fn invocation_id(&self) -> &str {
        &self.inner.invocation_id
    }

    /// The attempt number, from 1.
    pub fn attempt(&self) -> u32 {
        self.inner.attempt
    }

    /// True when the journal has passed 80 % of one of its limits: a workflow that loops
    /// should [`Context::continue_as_new`] at its next convenient point. It is false while
    /// the handler replays its journal, so that a replay takes the path it took before
    /// (the journal was shorter then), and true once it runs past it.
    pub fn suggest_continue_as_new(&self) -> bool {
        let state = self.lock();
        state.suggest_continue_as_new && state.cursor >= state.journal.len()
    }

    /// Ends this run of the workflow and starts the next one under the same workflow id,
    /// with `input` and a fresh journal (Durin does both in one transaction, on the newest
    /// deployment). Return what it returns: `return ctx.continue_as_new(&next);`. Only a
    /// workflow's run (started with `POST /v1/workflows/...`) can continue as new.
    pub fn continue_as_new<I: Serialize, T>(&self, input: &I) -> Result<T, HandlerError> {
        let input = to_json(input)?;
        self.lock()
            .abort
            .get_or_insert(Outcome::ContinueAsNew { input });
        Err(HandlerError::abort("the run continues as new"))
    }

    /// Runs a journaled step with the default retry policy. See [`Context::run_with`].
    pub async fn run<T, F, Fut>(&self, name: &str, f: F) -> Result<T, HandlerError>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, HandlerError>>,
    {
        self.run_with(name, RunOptions::default(), f).await
    }

    /// Runs a journaled step: the first time, `f` runs and its result is recorded; on
    /// replay the recorded result comes back and `f` does not run. The result is on Durin's
    /// disk before anything can observe it: before the next step's code runs, before any
    /// other entry, heartbeat or update refusal, and before the attempt ends (with protocol
    /// 5 the last step's result travels with the output instead of in an append of its own;
    /// with older gateways it is appended before this returns).
    ///
    /// A retryable error from `f` ends the attempt, and Durin calls the handler again after
    /// the step's backoff (durably: a crash does not shorten it). When the step's attempts
    /// are used up, or `f` fails terminally, the failure is recorded and returned as a
    /// terminal error, which the handler may handle or propagate.
    pub async fn run_with<T, F, Fut>(
        &self,
        name: &str,
        options: RunOptions,
        f: F,
    ) -> Result<T, HandlerError>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, HandlerError>>,
    {
        match self.replay(EntryKind::Step, Some(name))? {
            Replayed::Recorded(entry) => {
                if let Some(failure) = entry.failure {
                    return Err(HandlerError::from_failure(failure));
                }
                self.decode(*entry)
            }
            Replayed::New => {
                // What an earlier step returned is durable before this one's code runs.
                self.flush().await?;
                match self.try_step(name, &options, f).await {
                    Ok(value) => {
                        let json = serde_json::to_value(&value).map_err(|e| {
                            HandlerError::terminal(format!(
                                "the result of step {name:?} cannot be serialized: {e}"
                            ))
                        })?;
                        self.keep(EntryKind::Step, Some(name), Some(json), None)
                            .await?;
                        Ok(value)
                    }
                    Err(error) if error.kind == Kind::Abort => Err(error),
                    Err(error) => self.step_failed(name, options, error).await,
                }
            }
        }
    }

    /// One try of a step, bounded by its `start_to_close`.
    async fn try_step<T, F, Fut>(
        &self,
        name: &str,
        options: &RunOptions,
        f: F,
    ) -> Result<T, HandlerError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, HandlerError>>,
    {
        let Some(limit) = options.start_to_close else {
            return f().await;
        };
        match tokio::time::timeout(limit, f()).await {
            Ok(result) => result,
            Err(_) => Err(HandlerError::retryable(format!(
                "step {name:?} exceeded its start_to_close timeout of {limit:?}"
            ))
            .with_type("StartToCloseTimeout")),
        }
    }

    /// Tells Durin the attempt is alive and how far it got. A handler whose deployment
    /// declares a `heartbeat_timeout` must call this more often than that, or Durin ends
    /// the attempt (a hung handler is found far sooner than by `start_to_close`). The
    /// next attempt gets the last `details` from [`Context::last_heartbeat_details`], so
    /// a long step can skip what was done. A heartbeat is not journaled.
    pub async fn heartbeat<D: Serialize>(&self, details: &D) -> Result<(), HandlerError> {
        if self.inner.replay_only {
            return Ok(());
        }
        self.flush().await?;
        let response = self
            .inner
            .http
            .post(&self.inner.heartbeat_url)
            .header(HEADER_ATTEMPT, self.inner.attempt)
            .header(HEADER_ATTEMPT_TOKEN, &self.inner.attempt_token)
            .json(details)
            .send()
            .await;
        match response {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) if r.status() == reqwest::StatusCode::CONFLICT => {
                let detail = r.text().await.unwrap_or_default();
                Err(self.end_attempt(format!("the gateway refused a heartbeat (409): {detail}")))
            }
            // A heartbeat that did not get through is not worth failing for: the next one
            // may, and a silent attempt is ended by Durin anyway.
            Ok(_) | Err(_) => Ok(()),
        }
    }

    /// The details of the last heartbeat an earlier attempt sent, if any, as `D`.
    pub fn last_heartbeat_details<D: DeserializeOwned>(&self) -> Option<D> {
        self.inner
            .heartbeat_details
            .clone()
            .and_then(|v| serde_json::from_value(v).ok())
    }

    async fn step_failed<T>(
        &self,
        name: &str,
        options: RunOptions,
        error: HandlerError,
    ) -> Result<T, HandlerError> {
        let policy = options.retry_policy.unwrap_or_default();
        let step_attempt = {
            let state = self.lock();
            if state.appended {
                1
            } else {
                self.inner.position_failures + 1
            }
        };
        // Tried for longer than the step's schedule_to_close: this failure is its last.
        let out_of_time = options.schedule_to_close.and_then(|limit| {
            let since = self.lock().position_since_ms?;
            let tried = now_ms().saturating_sub(since).max(0) as u64;
            (Duration::from_millis(tried) >= limit).then_some(limit)
        });
        if let Some(limit) = out_of_time {
            let failure = Failure {
                status: 504,
                error_type: Some("ScheduleToCloseTimeout".into()),
                message: format!(
                    "step {name:?} did not succeed within its schedule_to_close of {limit:?}; last error: {}",
                    error.message
                ),
            };
            self.keep(EntryKind::Step, Some(name), None, Some(failure.clone()))
                .await?;
            return Err(HandlerError::from_failure(failure));
        }
        let delay = match &error.kind {
            Kind::Retryable { retry_after } => policy
                .next_delay(step_attempt, error.error_type())
                .map(|d| retry_after.unwrap_or(d)),
            _ => None,
        };
        if let Some(delay) = delay {
            self.lock().abort.get_or_insert(Outcome::Retry {
                error: error.message.clone(),
                error_type: error.error_type.clone(),
                retry_after_ms: Some(delay.as_millis() as u64),
                step: Some(name.to_owned()),
            });
            return Err(HandlerError::abort(format!(
                "step {name:?} failed on attempt {step_attempt} and will be retried: {error}"
            )));
        }
        let failure = if error.is_terminal() {
            error.to_failure()
        } else {
            let why = policy.exhausted_reason(error.error_type());
            Failure {
                status: 500,
                error_type: error.error_type.clone(),
                message: format!("step {name:?} failed: {why}; last error: {}", error.message),
            }
        };
        self.keep(EntryKind::Step, Some(name), None, Some(failure.clone()))
            .await?;
        Err(HandlerError::from_failure(failure))
    }

    /// Whether the code change `patch` applies to this run: `true` when the code runs
    /// live (a marker is journaled), and on replays of runs that went that way; `false`
    /// when replaying a journal recorded before the patch. Branch on it to change a
    /// workflow's code while old runs finish the old way:
    ///
    /// ```ignore
    /// if ctx.patched("refund-fee").await? { new_code } else { old_code }
    /// ```
    ///
    /// Once no run recorded before the patch is left, replace the call with
    /// [`Context::deprecate_patch`] and drop the old branch; later, drop both.
    pub async fn patched(&self, patch: &str) -> Result<bool, HandlerError> {
        match self.peek_patch(patch)? {
            Some(true) => Ok(true),
            Some(false) => Ok(false),
            None => {
                self.append(EntryKind::Patch, Some(patch), None, None)
                    .await?;
                Ok(true)
            }
        }
    }

    /// Keeps replaying runs that passed [`Context::patched`]`(patch)` deterministic after
    /// the old branch is gone: consumes the marker where one was recorded, records none.
    pub fn deprecate_patch(&self, patch: &str) -> Result<(), HandlerError> {
        self.peek_patch(patch).map(|_| ())
    }

    /// `Some(true)`: the marker of `patch` is at the cursor (consumed); `Some(false)`:
    /// another recorded entry is (the journal predates the patch); `None`: the code runs
    /// live.
    fn peek_patch(&self, patch: &str) -> Result<Option<bool>, HandlerError> {
        let mut state = self.lock();
        if state.abort.is_some() {
            return Err(HandlerError::abort("the attempt is ending"));
        }
        match state.journal.get(state.cursor) {
            None => Ok(None),
            Some(e) if e.kind == EntryKind::Patch && e.name.as_deref() == Some(patch) => {
                state.cursor += 1;
                Ok(Some(true))
            }
            Some(_) => Ok(Some(false)),
        }
    }

    /// The current time, recorded: a replay sees the same instant.
    pub async fn now(&self) -> Result<SystemTime, HandlerError> {
        let millis = self
            .record(EntryKind::Now, || {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0)
            })
            .await?;
        Ok(UNIX_EPOCH + Duration::from_millis(millis))
    }

    /// A random UUID (v4), recorded.
    pub async fn uuid(&self) -> Result<uuid::Uuid, HandlerError> {
        self.record(EntryKind::Uuid, uuid::Uuid::new_v4).await
    }

    /// A random 64-bit number, recorded.
    pub async fn random(&self) -> Result<u64, HandlerError> {
        self.record(EntryKind::Random, rand::random::<u64>).await
    }

    async fn record<T>(&self, kind: EntryKind, make: impl FnOnce() -> T) -> Result<T, HandlerError>
    where
        T: Serialize + DeserializeOwned,
    {
        match self.replay(kind, None)? {
            Replayed::Recorded(entry) => self.decode(*entry),
            Replayed::New => {
                let value = make();
                let json = serde_json::to_value(&value)
                    .map_err(|e| HandlerError::terminal(e.to_string()))?;
                self.keep(kind, None, Some(json), None).await?;
                Ok(value)
            }
        }
    }

    /// A durable timer that fires after `duration`, measured on the gateway's clock. Use it
    /// with [`Context::first`] to race it against a signal; [`Context::sleep`] just waits.
    pub async fn timer(&self, duration: Duration) -> Result<Waitable, HandlerError> {
        let value = serde_json::json!({ "duration_ms": duration.as_millis() as u64 });
        self.command(EntryKind::Sleep, None, Some(value), false)
            .await
    }

    /// A durable timer that fires at `at`.
    pub async fn timer_until(&self, at: SystemTime) -> Result<Waitable, HandlerError> {
        let millis = at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let value = serde_json::json!({ "wake_at_ms": millis });
        self.command(EntryKind::Sleep, None, Some(value), false)
            .await
    }

    /// Sleeps durably: the invocation holds no connection and no task while it sleeps,
    /// and the sleep survives restarts of Durin and of the handler.
    pub async fn sleep(&self, duration: Duration) -> Result<(), HandlerError> {
        let timer = self.timer(duration).await?;
        self.first(&[&timer]).await.map(|_| ())
    }

    /// Sleeps durably until `at`.
    pub async fn sleep_until(&self, at: SystemTime) -> Result<(), HandlerError> {
        let timer = self.timer_until(at).await?;
        self.first(&[&timer]).await.map(|_| ())
    }

    /// A wait for the next signal named `name` (buffered if it came before). Use it with
    /// [`Context::first`]; [`Context::signal`] just waits.
    pub async fn signal_waiter(&self, name: &str) -> Result<Waitable, HandlerError> {
        self.command(EntryKind::Signal, Some(name), None, false)
            .await
    }

    /// Waits for the next signal named `name` and returns its payload. Signals of one name
    /// arrive in the order they were sent, each once.
    pub async fn signal<T: DeserializeOwned>(&self, name: &str) -> Result<T, HandlerError> {
        let waiter = self
            .command(EntryKind::Signal, Some(name), None, true)
            .await?;
        self.first(&[&waiter]).await?;
        waiter.value()
    }

    /// Calls `service/handler` with `input` as a child invocation and waits for its output
    /// (its failure is a terminal error the handler may handle). The child starts exactly
    /// once, with this entry; while it runs this invocation holds nothing (it suspends),
    /// and a replay answers from the journal without calling it again.
    pub async fn call<I: Serialize, O: DeserializeOwned>(
        &self,
        service: &str,
        handler: &str,
        input: &I,
    ) -> Result<O, HandlerError> {
        let child = self.call_waiter(service, handler, input).await?;
        self.first(&[&child]).await?;
        child.value()
    }

    /// Starts `service/handler` as a child invocation, to be waited for with
    /// [`Context::first`] (raced against a timer, say). Its id is
    /// [`Waitable::invocation_id`].
    pub async fn call_waiter<I: Serialize>(
        &self,
        service: &str,
        handler: &str,
        input: &I,
    ) -> Result<Waitable, HandlerError> {
        let value = serde_json::json!({ "input": to_json(input)? });
        self.command(
            EntryKind::Call,
            Some(&format!("{service}/{handler}")),
            Some(value),
            false,
        )
        .await
    }

    /// Calls the workflow `workflow` as a child run under `workflow_id` and waits for its
    /// output. The id must not name a run that goes on (a terminal `409` error of type
    /// `WorkflowIdTaken` otherwise); `parent_close` says what happens to the child when
    /// this invocation is cancelled, terminated or ends first.
    pub async fn call_workflow<I: Serialize, O: DeserializeOwned>(
        &self,
        workflow: &str,
        workflow_id: &str,
        input: &I,
        parent_close: ParentClose,
    ) -> Result<O, HandlerError> {
        let value = serde_json::json!({
            "input": to_json(input)?,
            "workflow_id": workflow_id,
            "parent_close": parent_close,
        });
        let child = self
            .command(
                EntryKind::Call,
                Some(&format!("{workflow}/run")),
                Some(value),
                false,
            )
            .await?;
        self.first(&[&child]).await?;
        child.value()
    }

    /// Starts the workflow `workflow` as a child run under `workflow_id` without waiting
    /// for it (it goes on alone unless `parent_close` says otherwise); returns its
    /// invocation id.
    pub async fn start_workflow<I: Serialize>(
        &self,
        workflow: &str,
        workflow_id: &str,
        input: &I,
        parent_close: ParentClose,
    ) -> Result<String, HandlerError> {
        let name = format!("{workflow}/run");
        let info = match self.replay(EntryKind::Send, Some(&name))? {
            Replayed::Recorded(entry) => entry.value,
            Replayed::New => {
                let value = serde_json::json!({
                    "input": to_json(input)?,
                    "workflow_id": workflow_id,
                    "parent_close": parent_close,
                });
                self.append(EntryKind::Send, Some(&name), Some(value), None)
                    .await?
                    .value
            }
        };
        // Not started (its id names a run that goes on): the same on every replay.
        if let Some(refused) = info
            .as_ref()
            .map(|v| &v["refused"])
            .filter(|r| !r.is_null())
        {
            let failure: Failure = serde_json::from_value(refused.clone()).map_err(|e| {
                HandlerError::terminal(format!("the recorded refusal is not a failure: {e}"))
            })?;
            return Err(HandlerError::from_failure(failure));
        }
        Ok(invocation_id(info.as_ref()))
    }

    /// Starts `service/handler` with `input` and does not wait for it; with `delay`, it
    /// starts that much later (a durable scheduled start). Returns the child's invocation
    /// id, the same on every replay.
    pub async fn send<I: Serialize>(
        &self,
        service: &str,
        handler: &str,
        input: &I,
        delay: Option<Duration>,
    ) -> Result<String, HandlerError> {
        let name = format!("{service}/{handler}");
        let info = match self.replay(EntryKind::Send, Some(&name))? {
            Replayed::Recorded(entry) => entry.value,
            Replayed::New => {
                let mut value = serde_json::json!({ "input": to_json(input)? });
                if let Some(delay) = delay {
                    value["delay_ms"] = (delay.as_millis() as u64).into();
                }
                self.append(EntryKind::Send, Some(&name), Some(value), None)
                    .await?
                    .value
            }
        };
        Ok(invocation_id(info.as_ref()))
    }

    /// A callback from outside: hand `awakeable.token` (or its `resolve_url`) to another
    /// system, which completes it with `POST /v1/awakeables/{token}/resolve`; wait for it
    /// with [`Context::first`] or [`Awakeable::wait`].
    pub async fn awakeable(&self) -> Result<Awakeable, HandlerError> {
        let waitable = self
            .command(EntryKind::Awakeable, None, None, false)
            .await?;
        let info = waitable.info.clone().unwrap_or(Value::Null);
        let text = |key: &str| info[key].as_str().unwrap_or_default().to_owned();
        Ok(Awakeable {
            token: text("token"),
            resolve_url: text("resolve_url"),
            reject_url: text("reject_url"),
            waitable,
        })
    }

    /// Sets a key of the invocation's durable state, which
    /// `GET /v1/workflows/{workflow}/{id}/queries/{key}` answers without calling the handler.
    /// In a keyed handler it is the key's state: the next invocations of the key see it
    /// once this one has ended.
    pub async fn set<T: Serialize>(&self, key: &str, value: &T) -> Result<(), HandlerError> {
        let value = serde_json::to_value(value)
            .map_err(|e| HandlerError::terminal(format!("state {key:?}: {e}")))?;
        self.state_entry(key, serde_json::json!({ "set": value }))
            .await
    }

    /// Clears a key of the durable state (a query then answers `null`).
    pub async fn clear(&self, key: &str) -> Result<(), HandlerError> {
        self.state_entry(key, serde_json::json!({ "clear": true }))
            .await
    }

    /// A key of the durable state as this invocation sees it: what it set (or cleared)
    /// last, else, in a keyed handler, its key's state as the invocations of the key
    /// that ended left it (the same on every attempt when the key's limit is 1; see
    /// docs/keys.md for a larger limit and shared handlers).
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, HandlerError> {
        let values = self.values();
        values
            .get(key)
            .map(|v| serde_json::from_value(v.clone()))
            .transpose()
            .map_err(|e| HandlerError::terminal(format!("state {key:?}: {e}")))
    }

    async fn state_entry(&self, key: &str, op: Value) -> Result<(), HandlerError> {
        match self.replay(EntryKind::State, Some(key))? {
            Replayed::Recorded(_) => {}
            Replayed::New => {
                self.append(EntryKind::State, Some(key), Some(op.clone()), None)
                    .await?;
            }
        }
        let mut values = self.values();
        match op.get("set") {
            Some(value) => values.insert(key.to_owned(), value.clone()),
            None => values.remove(key),
        };
        Ok(())
    }

    /// Journals a command (or finds it on replay) with whatever result has arrived.
    /// `awaited`: the handler waits for this command alone right after, so a result that
    /// is already there may complete it at once.
    async fn command(
        &self,
        kind: EntryKind,
        name: Option<&str>,
        value: Option<Value>,
        awaited: bool,
    ) -> Result<Waitable, HandlerError> {
        match self.replay(kind, name)? {
            Replayed::Recorded(entry) => Ok(Waitable {
                index: entry.index,
                info: entry.value,
                known_at_start: entry.completion.is_some(),
                completion: entry.completion,
            }),
            Replayed::New => {
                let answer = self.append_command(kind, name, value, awaited).await?;
                Ok(Waitable {
                    index: answer.index,
                    info: answer.value,
                    completion: answer.completion,
                    known_at_start: false,
                })
            }
        }
    }

    /// Waits for the first of `waitables` to complete and returns its position in the
    /// slice. When several have completed, the one that completed first wins, on every
    /// replay. When none has, the attempt ends suspended and Durin calls the handler again
    /// when one completes: the handler holds nothing while it waits.
    ///
    /// When the invocation was cancelled while it waited, and none of `waitables` had
    /// completed before that, this returns the terminal [`HandlerError::cancelled`] error.
    pub async fn first(&self, waitables: &[&Waitable]) -> Result<usize, HandlerError> {
        // Updates handled while the run waited here, on every replay at the same place.
        while let Some((name, id, input)) = self.recorded_update() {
            self.run_update(&name, &id, input).await?;
        }
        if let Some(i) = self.decide(waitables)? {
            return Ok(i);
        }
        // Live: the updates sent meanwhile are validated and handled now.
        while let Some(update) = self.next_pending_update() {
            if self.handle_update(update).await? {
                if let Some(i) = self.decide(waitables)? {
                    return Ok(i);
                }
            }
        }
        let waiting_for = waitables.iter().map(|w| w.index).collect();
        self.lock().abort.get_or_insert(Outcome::Suspend {
            waiting_for,
            wake_at_ms: None,
        });
        Err(HandlerError::abort(
            "the handler waits; the attempt is suspended",
        ))
    }

    /// Which of `waitables` completed first, when every replay will answer the same, or the
    /// cancellation that reached this wait.
    fn decide(&self, waitables: &[&Waitable]) -> Result<Option<usize>, HandlerError> {
        let decided = {
            let mut state = self.lock();
            let cancel = state
                .journal
                .get(state.cursor)
                .filter(|e| e.kind == EntryKind::Cancel)
                .map(|e| e.completion.as_ref().map_or(0, |c| c.seq));
            if let Some(cancel_seq) = cancel {
                // What completed before the cancellation wins (every such completion came
                // with the journal); otherwise the wait ends with the cancellation.
                let before = waitables
                    .iter()
                    .enumerate()
                    .filter_map(|(i, w)| w.completion.as_ref().map(|c| (c.seq, i)))
                    .filter(|(seq, _)| *seq < cancel_seq)
                    .min();
                if let Some((_, i)) = before {
                    return Ok(Some(i));
                }
                state.cursor += 1;
                return Err(HandlerError::cancelled());
            }
            first_decided(waitables, state.start_seq, &state.learned)
        };
        Ok(decided)
    }

    /// Handles the updates of a workflow's run: `validate` sees each update's input first
    /// and may refuse it with an error (its status, a `4xx`, goes back to the caller, and
    /// nothing is journaled); an accepted update is journaled and `handle` runs it (it may
    /// change state with [`Context::set`], run steps, and so on) at the run's wait where it
    /// was accepted, on every replay; its output, or its failure, goes back to the caller
    /// of `POST /v1/workflows/{workflow}/{id}/updates/{name}`. Register every update
    /// handler at the start of the run. Updates are handled while the run waits
    /// ([`Context::first`] and the waits built on it).
    pub fn on_update<I, O, V, F, Fut>(&self, name: &str, validate: V, handle: F)
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        V: Fn(&I) -> Result<(), HandlerError> + Send + Sync + 'static,
        F: Fn(Context, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, HandlerError>> + Send + 'static,
    {
        let parse = |input: &Value| {
            I::deserialize(input).map_err(|e| {
                HandlerError::terminal_with_status(
                    400,
                    format!("the update's input is not valid: {e}"),
                )
                .with_type("InvalidInput")
            })
        };
        let validate = Arc::new(move |input: &Value| validate(&parse(input)?));
        let handle = Arc::new(handle);
        let handle = Arc::new(move |ctx: Context, input: Value| {
            let handle = Arc::clone(&handle);
            Box::pin(async move {
                let input = parse(&input)?;
                let output = handle(ctx, input).await?;
                serde_json::to_value(output).map_err(|e| {
                    HandlerError::terminal(format!("the update's output cannot be serialized: {e}"))
                })
            }) as BoxFuture<Result<Value, HandlerError>>
        });
        self.inner
            .update_handlers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned(), UpdateHandler { validate, handle });
    }

    /// The accepted update at the cursor (consumed), replayed.
    fn recorded_update(&self) -> Option<(String, String, Value)> {
        let mut state = self.lock();
        if state.in_update || state.abort.is_some() {
            return None;
        }
        let entry = state
            .journal
            .get(state.cursor)
            .filter(|e| e.kind == EntryKind::Update)?
            .clone();
        state.cursor += 1;
        let value = entry.value.unwrap_or(Value::Null);
        Some((
            entry.name.unwrap_or_default(),
            value["id"].as_str().unwrap_or_default().to_owned(),
            value["input"].clone(),
        ))
    }

    /// The next update to validate, when the run waits past its journal.
    fn next_pending_update(&self) -> Option<durin_protocol::PendingUpdate> {
        let mut state = self.lock();
        if state.in_update || state.abort.is_some() || state.cursor < state.journal.len() {
            return None;
        }
        state.pending_updates.pop_front()
    }

    /// Validates a pending update: refuses it, or accepts (journals) and runs it. `true`
    /// when it ran.
    async fn handle_update(
        &self,
        update: durin_protocol::PendingUpdate,
    ) -> Result<bool, HandlerError> {
        let handler = self
            .inner
            .update_handlers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&update.name)
            .cloned();
        let verdict = match &handler {
            None => Err(HandlerError::terminal_with_status(
                404,
                format!("this workflow has no update named {:?}", update.name),
            )
            .with_type("UnknownUpdate")),
            Some(handler) => (handler.validate)(&update.input),
        };
        if let Err(refusal) = verdict {
            let mut failure = refusal.to_failure();
            if !(400..500).contains(&failure.status) {
                failure.status = 400;
            }
            self.refuse(&update.id, failure).await?;
            return Ok(false);
        }
        let value = serde_json::json!({ "id": update.id, "input": update.input });
        self.append(EntryKind::Update, Some(&update.name), Some(value), None)
            .await?;
        self.run_update(&update.name, &update.id, update.input)
            .await?;
        Ok(true)
    }

    /// Runs an accepted update's handler and records (or replays) its result.
    async fn run_update(&self, name: &str, id: &str, input: Value) -> Result<(), HandlerError> {
        let handler = self
            .inner
            .update_handlers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned();
        let result = match handler {
            Some(handler) => {
                self.lock().in_update = true;
                let result = (handler.handle)(self.clone(), input).await;
                self.lock().in_update = false;
                result
            }
            None => Err(HandlerError::terminal_with_status(
                404,
                format!("this workflow has no update named {name:?}"),
            )),
        };
        if let Err(error) = &result {
            if error.kind == Kind::Abort {
                return Err(error.clone());
            }
        }
        match self.replay(EntryKind::UpdateResult, Some(id))? {
            Replayed::Recorded(_) => Ok(()),
            Replayed::New => {
                let (value, failure) = match result {
                    Ok(value) => (Some(value), None),
                    Err(error) => (None, Some(error.to_failure())),
                };
                self.append(EntryKind::UpdateResult, Some(id), value, failure)
                    .await
                    .map(|_| ())
            }
        }
    }

    /// Tells Durin the update `id` is refused; nothing is journaled.
    async fn refuse(&self, id: &str, failure: Failure) -> Result<(), HandlerError> {
        self.flush().await?;
        let sent = self
            .inner
            .http
            .post(format!("{}/{id}/refuse", self.inner.updates_url))
            .header(HEADER_ATTEMPT, self.inner.attempt)
            .header(HEADER_ATTEMPT_TOKEN, &self.inner.attempt_token)
            .json(&failure)
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => {
                let status = r.status();
                let detail = r.text().await.unwrap_or_default();
                Err(self.end_attempt(format!(
                    "the gateway did not take the refusal of update {id} ({status}): {detail}"
                )))
            }
            Err(e) => Err(self.end_attempt(format!(
                "the refusal of update {id} did not get through: {e}"
            ))),
        }
    }

    /// The recorded value of `entry` as the handler's type. A value that no longer fits
    /// (the code changed) is non-determinism: the invocation pauses.
    fn decode<T: DeserializeOwned>(&self, entry: JournalEntry) -> Result<T, HandlerError> {
        serde_json::from_value(entry.value.unwrap_or(Value::Null)).map_err(|e| {
            let at = EntryRef {
                kind: entry.kind,
                name: entry.name,
            };
            self.lock().abort.get_or_insert(Outcome::NonDeterminism {
                index: entry.index,
                recorded: at.clone(),
                requested: at,
                detail: Some(format!(
                    "the recorded value does not fit the type the handler asks for: {e}"
                )),
            });
            HandlerError::abort(format!("non-determinism at journal index {}", entry.index))
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ReplayState> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn values(&self) -> std::sync::MutexGuard<'_, serde_json::Map<String, Value>> {
        self.inner.values.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The recorded entry at the cursor, checked against what the handler asks for.
    fn replay(&self, kind: EntryKind, name: Option<&str>) -> Result<Replayed, HandlerError> {
        let mut state = self.lock();
        if state.abort.is_some() {
            return Err(HandlerError::abort("the attempt is ending"));
        }
        let Some(entry) = state.journal.get(state.cursor).cloned() else {
            if self.inner.replay_only {
                return Err(replay_end(&mut state, kind, name));
            }
            return Ok(Replayed::New);
        };
        if entry.kind == EntryKind::Cancel {
            // Someone cancelled the invocation here: this await gets the cancellation, once;
            // what the handler does next is new.
            state.cursor += 1;
            return Err(HandlerError::cancelled());
        }
        if entry.kind != kind || entry.name.as_deref() != name {
            let index = entry.index;
            state.abort = Some(Outcome::NonDeterminism {
                index,
                recorded: EntryRef {
                    kind: entry.kind,
                    name: entry.name,
                },
                requested: EntryRef {
                    kind,
                    name: name.map(str::to_owned),
                },
                detail: None,
            });
            return Err(HandlerError::abort(format!(
                "non-determinism at journal index {index}"
            )));
        }
        state.cursor += 1;
        Ok(Replayed::Recorded(Box::new(entry)))
    }

    /// Appends the next entry and waits until the gateway has it on disk.
    async fn append(
        &self,
        kind: EntryKind,
        name: Option<&str>,
        value: Option<Value>,
        failure: Option<Failure>,
    ) -> Result<AppendResponse, HandlerError> {
        let request = AppendRequest {
            index: 0,
            kind,
            name: name.map(str::to_owned),
            value,
            failure,
            awaited: false,
        };
        self.send_append(request).await
    }

    async fn append_command(
        &self,
        kind: EntryKind,
        name: Option<&str>,
        value: Option<Value>,
        awaited: bool,
    ) -> Result<AppendResponse, HandlerError> {
        let request = AppendRequest {
            index: 0,
            kind,
            name: name.map(str::to_owned),
            value,
            failure: None,
            awaited,
        };
        self.send_append(request).await
    }

    /// Records an entry that starts nothing (a step's result, a clock reading): with
    /// version 5 it is kept back, its index taken, and sent before anything else goes to
    /// the gateway (the next step's code, an append, a heartbeat) or with the outcome,
    /// which saves an exchange after the last step; nothing observes it before either.
    /// Without it, it is appended at once.
    async fn keep(
        &self,
        kind: EntryKind,
        name: Option<&str>,
        value: Option<Value>,
        failure: Option<Failure>,
    ) -> Result<(), HandlerError> {
        if !self.inner.keeps_back {
            return self.append(kind, name, value, failure).await.map(|_| ());
        }
        let mut state = self.lock();
        let index = state.next_index;
        state.next_index += 1;
        state.appended = true;
        state.kept.push(AppendRequest {
            index,
            kind,
            name: name.map(str::to_owned),
            value,
            failure,
            awaited: false,
        });
        Ok(())
    }

    /// Appends the entries kept back, in order, and waits until the gateway has them.
    async fn flush(&self) -> Result<(), HandlerError> {
        let kept = std::mem::take(&mut self.lock().kept);
        for request in kept {
            self.post(request).await?;
        }
        Ok(())
    }

    /// Sends `request` as the next entry (its index is set here), after the entries kept
    /// back.
    async fn send_append(
        &self,
        mut request: AppendRequest,
    ) -> Result<AppendResponse, HandlerError> {
        if self.inner.replay_only {
            let mut state = self.lock();
            return Err(replay_end(
                &mut state,
                request.kind,
                request.name.as_deref(),
            ));
        }
        self.flush().await?;
        request.index = self.lock().next_index;
        self.post(request).await
    }

    /// Sends `request` at its index and waits until the gateway has it on disk.
    async fn post(&self, request: AppendRequest) -> Result<AppendResponse, HandlerError> {
        let index = request.index;
        let started = tokio::time::Instant::now();
        let mut pause = Duration::from_millis(50);
        loop {
            let problem = match self.deliver(&request).await {
                Delivered::Appended(answer) => {
                    let mut state = self.lock();
                    state.next_index = state.next_index.max(index + 1);
                    state.appended = true;
                    if let Some(completion) = &answer.completion {
                        state.learned.insert(completion.seq);
                    }
                    state.suggest_continue_as_new |= answer.suggest_continue_as_new;
                    state.position_since_ms = Some(answer.at_ms);
                    return Ok(answer);
                }
                Delivered::Unreadable(e) => {
                    return Err(self.end_attempt(format!(
                        "the gateway's answer to entry {index} is not an append response: {e}"
                    )))
                }
                Delivered::Gone => {
                    // The gateway went away, or ended the attempt (a timeout): whoever runs
                    // the invocation next does so in a new attempt, which fences this one.
                    return Err(self.end_attempt(format!(
                        "the attempt's stream ended before entry {index} was acknowledged"
                    )));
                }
                Delivered::Refused { status, detail } if status >= 500 => {
                    format!("the gateway answered {status}: {detail}")
                }
                Delivered::Refused {
                    status: 409,
                    detail,
                } => {
                    // A newer attempt owns the journal: this one may not write any more.
                    return Err(self.end_attempt(format!(
                        "the gateway refused entry {index} (409): {detail}"
                    )));
                }
                Delivered::Refused { status, detail } => {
                    // Refused for good (too large, malformed): running the step again would
                    // repeat its side effect for nothing, so the invocation fails.
                    let failure = Failure {
                        status: 500,
                        error_type: Some("JournalRefused".into()),
                        message: format!("the gateway refused entry {index} ({status}): {detail}"),
                    };
                    self.lock().abort.get_or_insert(Outcome::Failure {
                        failure: failure.clone(),
                        entries: Vec::new(),
                    });
                    return Err(HandlerError::abort(failure.message));
                }
                Delivered::Unreachable(e) => format!("the gateway is unreachable: {e}"),
            };
            if started.elapsed() >= APPEND_PATIENCE {
                return Err(self.end_attempt(format!("could not append entry {index}: {problem}")));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// Sends `request` once, on the attempt's stream or to the context API.
    async fn deliver(&self, request: &AppendRequest) -> Delivered {
        if let Some(stream) = &self.inner.stream {
            return match stream.append(request).await {
                Ok(GatewayFrame::Appended(answer)) => Delivered::Appended(answer),
                Ok(GatewayFrame::Refused(refusal)) => Delivered::Refused {
                    status: refusal.status,
                    detail: refusal.detail,
                },
                Err(crate::stream::Gone) => Delivered::Gone,
            };
        }
        let sent = self
            .inner
            .http
            .post(&self.inner.entries_url)
            .header(HEADER_ATTEMPT, self.inner.attempt)
            .header(HEADER_ATTEMPT_TOKEN, &self.inner.attempt_token)
            .json(request)
            .send()
            .await;
        match sent {
            Ok(response) if response.status().is_success() => match response.json().await {
                Ok(answer) => Delivered::Appended(answer),
                Err(e) => Delivered::Unreadable(e.to_string()),
            },
            Ok(response) => Delivered::Refused {
                status: response.status().as_u16(),
                detail: response.text().await.unwrap_or_default(),
            },
            Err(e) => Delivered::Unreachable(e.to_string()),
        }
    }

    fn end_attempt(&self, error: String) -> HandlerError {
        self.lock().abort.get_or_insert(Outcome::Retry {
            error: error.clone(),
            error_type: None,
            retry_after_ms: None,
            step: None,
        });
        HandlerError::abort(error)
    }

    /// How the attempt ends, given what the handler returned. The entries kept back go
    /// with an output or a terminal failure (version 5); before any other outcome they
    /// are appended.
    pub(crate) async fn finish(&self, result: Result<Value, HandlerError>) -> Outcome {
        let outcome = self.outcome(result);
        let kept = std::mem::take(&mut self.lock().kept);
        match outcome {
            Outcome::Output { output, .. } => Outcome::Output {
                output,
                entries: kept,
            },
            Outcome::Failure { failure, .. } => Outcome::Failure {
                failure,
                entries: kept,
            },
            outcome if kept.is_empty() => outcome,
            outcome => {
                self.lock().kept = kept;
                match self.flush().await {
                    Ok(()) => outcome,
                    // The append failed: the attempt ends as the failure says.
                    Err(_) => self.outcome(Err(HandlerError::abort(
                        "the entries before the end could not be appended",
                    ))),
                }
            }
        }
    }

    /// How the attempt ends, given what the handler returned, before the entries kept back.
    fn outcome(&self, result: Result<Value, HandlerError>) -> Outcome {
        let mut state = self.lock();
        if let Some(outcome) = state.abort.take() {
            return outcome;
        }
        match result {
            Ok(output) => {
                // A cancellation after the last await came too late to be seen: the
                // handler completed.
                // A replay's journal ends with the recorded output (version 4).
                let rest = state.journal.get(state.cursor..).unwrap_or_default();
                if let Some(entry) = rest
                    .iter()
                    .find(|e| !matches!(e.kind, EntryKind::Cancel | EntryKind::Output))
                {
                    // The code finished without asking for entries the journal holds.
                    return Outcome::NonDeterminism {
                        index: entry.index,
                        recorded: EntryRef {
                            kind: entry.kind,
                            name: entry.name.clone(),
                        },
                        requested: EntryRef {
                            kind: EntryKind::Output,
                            name: None,
                        },
                        detail: None,
                    };
                }
                Outcome::Output {
                    output,
                    entries: Vec::new(),
                }
            }
            Err(error) => match error.kind {
                Kind::Terminal => Outcome::Failure {
                    failure: error.to_failure(),
                    entries: Vec::new(),
                },
                Kind::Retryable { retry_after } => Outcome::Retry {
                    error: error.message,
                    error_type: error.error_type,
                    retry_after_ms: retry_after.map(|d| d.as_millis() as u64),
                    step: None,
                },
                Kind::Abort => Outcome::Retry {
                    error: error.message,
                    error_type: None,
                    retry_after_ms: None,
                    step: None,
                },
            },
        }
    }
}

/// A replay reached the end of its journal where the handler would do `kind` `name`: the
/// attempt ends with [`Outcome::ReplayEnd`] and nothing runs.
fn replay_end(state: &mut ReplayState, kind: EntryKind, name: Option<&str>) -> HandlerError {
    let index = state.next_index;
    state.abort.get_or_insert(Outcome::ReplayEnd {
        index,
        next: EntryRef {
            kind,
            name: name.map(str::to_owned),
        },
    });
    HandlerError::abort(format!(
        "the replay ends at journal index {index}: the handler would now do {} {name:?}",
        kind.as_str()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waitable(index: u32, seq: Option<u32>, known_at_start: bool) -> Waitable {
        Waitable {
            index,
            info: None,
            completion: seq.map(|seq| Completion {
                seq,
                value: None,
                failure: None,
                at_ms: 0,
            }),
            known_at_start,
        }
    }

    /// A context replaying `entries` (`(kind, completion seq)` from index 1).
    fn replaying(entries: &[(EntryKind, Option<u32>)]) -> Context {
        let journal = entries
            .iter()
            .enumerate()
            .map(|(i, (kind, seq))| JournalEntry {
                index: i as u32 + 1,
                kind: *kind,
                name: None,
                value: (*kind == EntryKind::Sleep).then(|| serde_json::json!({"wake_at_ms": 1})),
                failure: None,
                attempt: 1,
                at_ms: 0,
                completion: seq.map(|seq| Completion {
                    seq,
                    value: None,
                    failure: None,
                    at_ms: 0,
                }),
            })
            .collect();
        let mut request = request(
            durin_protocol::PROTOCOL_VERSION,
            2,
            journal,
            "http://127.0.0.1:1/v1/contexts/inv_x".into(),
        );
        Context::new(&mut request, reqwest::Client::new(), None)
    }

    /// An invocation request of `inv_x` for `attempt`, with `journal` after its input.
    fn request(
        protocol: u32,
        attempt: u32,
        journal: Vec<JournalEntry>,
        context_url: String,
    ) -> InvocationRequest {
        InvocationRequest {
            protocol,
            invocation_id: "inv_x".into(),
            attempt,
            attempt_token: "t".into(),
            service: "s".into(),
            handler: "h".into(),
            input: Value::Null,
            journal,
            position_failures: 0,
            context_url,
            suggest_continue_as_new: false,
            heartbeat_details: None,
            updates: Vec::new(),
            position_since_ms: None,
            replay: false,
            key_state: None,
        }
    }

    /// A gateway's context API that notes each append in `events` and takes it.
    async fn noting_gateway(events: Arc<Mutex<Vec<String>>>) -> String {
        let app = axum::Router::new().route(
            "/v1/contexts/inv_x/entries",
            axum::routing::post(move |axum::Json(request): axum::Json<AppendRequest>| {
                let events = Arc::clone(&events);
                async move {
                    let note = format!("append {}", request.index);
                    events.lock().unwrap_or_else(|e| e.into_inner()).push(note);
                    axum::Json(AppendResponse {
                        index: request.index,
                        at_ms: 1,
                        value: None,
                        completion: None,
                        suggest_continue_as_new: false,
                    })
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}/v1/contexts/inv_x")
    }

    /// A first attempt with an empty journal, whose context API is at `context_url`.
    fn live(protocol: u32, context_url: String) -> Context {
        let mut request = request(protocol, 1, Vec::new(), context_url);
        Context::new(&mut request, reqwest::Client::new(), None)
    }

    /// Version 5: a step's result is on the gateway's disk before the next step's code
    /// runs, and the last one travels with the output (one exchange fewer); before any
    /// other outcome it is appended. Version 4 appends each result at once.
    #[tokio::test]
    async fn a_result_is_durable_before_the_next_step_and_the_last_goes_with_the_output() {
        for protocol in [4, 5] {
            let events = Arc::new(Mutex::new(Vec::new()));
            let url = noting_gateway(Arc::clone(&events)).await;
            let ctx = live(protocol, url.clone());
            for name in ["a", "b", "c"] {
                let noted = Arc::clone(&events);
                let ran = ctx
                    .run(name, || async move {
                        noted
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(format!("run {name}"));
                        Ok(name.to_owned())
                    })
                    .await;
                assert_eq!(ran.ok().as_deref(), Some(name));
            }
            let outcome = ctx.finish(Ok(Value::from("done"))).await;
            let seen = events.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let Outcome::Output { output, entries } = outcome else {
                panic!("not an output: {outcome:?}");
            };
            assert_eq!(output, "done");
            if protocol == 5 {
                assert_eq!(seen, ["run a", "append 1", "run b", "append 2", "run c"]);
                let sent: Vec<_> = entries
                    .iter()
                    .map(|e| (e.index, e.kind, e.name.as_deref(), e.value.clone()))
                    .collect();
                assert_eq!(
                    sent,
                    [(3, EntryKind::Step, Some("c"), Some(Value::from("c")))]
                );
            } else {
                assert_eq!(
                    seen,
                    ["run a", "append 1", "run b", "append 2", "run c", "append 3"]
                );
                assert!(entries.is_empty());
            }

            // A retry after a step: the step's result is appended before the attempt ends.
            events.lock().unwrap_or_else(|e| e.into_inner()).clear();
            let ctx = live(protocol, url);
            let ran = ctx.run("a", || async { Ok(1) }).await;
            assert_eq!(ran.ok(), Some(1));
            let outcome = ctx.finish(Err(HandlerError::retryable("later"))).await;
            assert!(matches!(outcome, Outcome::Retry { .. }), "{outcome:?}");
            let seen = events.lock().unwrap_or_else(|e| e.into_inner()).clone();
            assert_eq!(seen, ["append 1"]);
        }
    }

    /// A cancellation reaches the handler's next await once, decided by the journal alone:
    /// a wait whose command completed before the cancellation (a lower `seq`) gets its
    /// result and the next await the cancellation; one that completed after it, or not
    /// at all, gets the cancellation; after it, what the handler asks for is new.
    #[tokio::test]
    async fn a_cancellation_reaches_the_next_await_once_and_the_same_on_every_replay() {
        for (timer_seq, cancel_seq, timer_wins) in
            [(None, 1, false), (Some(1), 2, true), (Some(3), 2, false)]
        {
            let ctx = replaying(&[
                (EntryKind::Sleep, timer_seq),
                (EntryKind::Cancel, Some(cancel_seq)),
            ]);
            let timer = ctx
                .timer(Duration::from_secs(1))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let waited = ctx.first(&[&timer]).await;
            let cancelled = if timer_wins {
                assert_eq!(waited.ok(), Some(0), "timer seq {timer_seq:?}");
                ctx.replay(EntryKind::Step, Some("next")).err()
            } else {
                waited.err()
            };
            assert!(
                cancelled.as_ref().is_some_and(HandlerError::is_cancelled),
                "timer seq {timer_seq:?}, cancel seq {cancel_seq}: {cancelled:?}"
            );
            // Delivered once: the compensation that follows is a new step.
            assert!(matches!(
                ctx.replay(EntryKind::Step, Some("refund")),
                Ok(Replayed::New)
            ));
        }
        // A step the handler asks for at the cancellation is not run; the cancellation
        // after the last await does not make a completed handler non-deterministic.
        let ctx = replaying(&[(EntryKind::Cancel, Some(1))]);
        let ran = std::sync::atomic::AtomicBool::new(false);
        let step = ctx
            .run("charge", || async {
                ran.store(true, std::sync::atomic::Ordering::SeqCst);
                Ok(1)
            })
            .await;
        assert!(step.is_err_and(|e| e.is_cancelled()));
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
        let ctx = replaying(&[(EntryKind::Cancel, Some(1))]);
        assert!(matches!(
            ctx.finish(Ok(Value::Null)).await,
            Outcome::Output { .. }
        ));
    }

    /// `patched` is false on a journal recorded before the patch (and consumes nothing),
    /// true where the marker was recorded; `deprecate_patch` consumes a marker where there
    /// is one and leaves other entries alone, so both kinds of journal keep replaying.
    #[tokio::test]
    async fn patches_follow_what_the_journal_recorded() {
        let named = |kind: EntryKind, name: &str| {
            let ctx = replaying(&[(kind, None)]);
            ctx.lock().journal[0].name = Some(name.to_owned());
            ctx
        };
        let before = named(EntryKind::Step, "next");
        assert!(!before.patched("p").await.unwrap_or(true));
        assert!(matches!(
            before.replay(EntryKind::Step, Some("next")),
            Ok(Replayed::Recorded(_))
        ));
        let after = named(EntryKind::Patch, "p");
        assert!(after.patched("p").await.unwrap_or(false));
        assert!(matches!(
            after.replay(EntryKind::Step, Some("x")),
            Ok(Replayed::New)
        ));
        for (kind, name) in [(EntryKind::Patch, "p"), (EntryKind::Step, "next")] {
            let ctx = named(kind, name);
            ctx.deprecate_patch("p").unwrap_or_else(|e| panic!("{e}"));
            let consumed = ctx.lock().cursor == 1;
            assert_eq!(consumed, kind == EntryKind::Patch);
        }
    }

    #[test]
    fn the_first_completion_is_chosen_only_when_every_replay_agrees() {
        let none = std::collections::BTreeSet::new();
        // From the journal: decided, the lowest number wins.
        let (a, b) = (waitable(1, Some(4), true), waitable(2, Some(3), true));
        assert_eq!(first_decided(&[&a, &b], 4, &none), Some(1));
        // Learned during the attempt right after the journal's last number: decided.
        let (a, b) = (waitable(1, None, false), waitable(2, Some(5), false));
        assert_eq!(first_decided(&[&a, &b], 4, &none), Some(1));
        // Learned with a gap (number 5 unseen, maybe a's): not decided, suspend.
        let b = waitable(2, Some(6), false);
        assert_eq!(first_decided(&[&a, &b], 4, &none), None);
        let learned = [5].into_iter().collect();
        assert_eq!(first_decided(&[&a, &b], 4, &learned), Some(1));
        // Nothing completed: suspend.
        let b = waitable(2, None, false);
        assert_eq!(first_decided(&[&a, &b], 4, &none), None);
    }
}
