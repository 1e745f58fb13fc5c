//! The context API: how a running attempt talks to its journal.
//!
//! SDK handlers append entries (`/entries`), each checked and planned by `journal/`.
//! Plain handlers, which have no cursor into their journal, make named calls instead:
//! each answers the recorded result when there is one, or records the command; a wait
//! whose result has not arrived suspends the attempt (409 `suspended`, header
//! `Durin-Suspended: true`) and the handler runs again from the top when it arrives.
//! Every call presents the attempt's number and secret token.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use durin_protocol::{
    AppendRequest, AppendResponse, EntryKind, HEADER_ATTEMPT, HEADER_ATTEMPT_TOKEN, HEADER_REPLAYED,
};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{json_body, parse_invocation_id, parse_json, ApiBody, ApiPath, ApiQuery, AppState};
use crate::engine::AttemptObserver;
use crate::http::json_value;
use crate::ids::InvocationId;
use crate::journal::{self, MAX_NAME_BYTES};
use crate::problem::ApiError;
use crate::store::{
    plain_update_signal, ChildStart, ChildWorkflow, Effect, NamedCommand, NewEntry, PlainAnswer,
    PlainCommand, StoredEntry, UpdateStatus,
};

/// The attempt a handler-facing call speaks for: its number and its secret.
struct Caller {
    attempt: u32,
    token: String,
}

fn caller(headers: &HeaderMap) -> Result<Caller, ApiError> {
    let attempt = headers
        .get(HEADER_ATTEMPT)
        .ok_or_else(|| ApiError::BadRequest("the Durin-Attempt header is missing".into()))?
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
        .filter(|a| *a > 0)
        .ok_or_else(|| {
            ApiError::BadRequest("the Durin-Attempt header must be a positive integer".into())
        })?;
    let token = headers
        .get(HEADER_ATTEMPT_TOKEN)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            ApiError::BadRequest(
                "the Durin-Attempt-Token header is missing: send the attempt token Durin gave the attempt".into(),
            )
        })?
        .to_owned();
    Ok(Caller { attempt, token })
}

fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(ApiError::BadRequest(format!(
            "{what} names must be 1 to {MAX_NAME_BYTES} bytes"
        )));
    }
    Ok(())
}

fn to_bytes(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

/// `POST /v1/contexts/{id}/entries`: durable before it answers; refused for a stale attempt.
pub async fn append(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ApiBody(body): ApiBody,
) -> Result<Json<AppendResponse>, ApiError> {
    let id = parse_invocation_id(&id)?;
    let caller = caller(&headers)?;
    let request: AppendRequest = parse_json("the entry", &body)?;
    append_entry(&state, id, caller, request).await.map(Json)
}

/// The append of a streamed attempt (protocol 6): the same rules as `POST …/entries`,
/// under the stream's attempt.
pub struct StreamAppends(std::sync::Weak<super::Shared>);

impl StreamAppends {
    /// Weak, since the state holds the engine that holds this.
    pub fn new(state: &AppState) -> StreamAppends {
        StreamAppends(state.downgrade())
    }
}

#[async_trait::async_trait]
impl crate::engine::StreamAppender for StreamAppends {
    async fn append(
        &self,
        id: &InvocationId,
        attempt: u32,
        token: &str,
        request: AppendRequest,
    ) -> Result<AppendResponse, ApiError> {
        let state = self
            .0
            .upgrade()
            .map(AppState::from_shared)
            .ok_or_else(|| ApiError::ShuttingDown("the gateway is stopping".into()))?;
        let caller = Caller {
            attempt,
            token: token.to_owned(),
        };
        append_entry(&state, id.clone(), caller, request).await
    }
}

/// Appends `request` for `caller`'s attempt, durable before it returns.
async fn append_entry(
    state: &AppState,
    id: InvocationId,
    caller: Caller,
    request: AppendRequest,
) -> Result<AppendResponse, ApiError> {
    if let Some(session) = state.replays.find(&id, &caller.token) {
        // An SDK that replays appends nothing; one that does anyway is stopped here.
        let name = request.name.as_deref().unwrap_or_default();
        return Err(session.beyond(format!("{} {name:?}", request.kind.as_str()), None));
    }
    let now_ms = state.clock.now_ms();
    let mut planned = match request.kind {
        EntryKind::Call | EntryKind::Send if request.failure.is_none() => {
            plan_child(
                state,
                request.kind,
                request.name.as_deref(),
                request.value,
                now_ms,
            )
            .await?
        }
        _ => journal::plan(
            request.kind,
            request.name.as_deref(),
            request.value,
            request.failure.is_some(),
            now_ms,
        )
        .map_err(ApiError::BadRequest)?,
    };
    match &mut planned.effect {
        Effect::SignalWait { take_buffered } => *take_buffered = request.awaited,
        Effect::UpdateDone { failure, .. } => failure.clone_from(&request.failure),
        _ => {}
    }
    let finishes_update = matches!(planned.effect, Effect::UpdateDone { .. });
    let starts_child = matches!(planned.effect, Effect::StartChild(_));
    let entry = NewEntry {
        index: Some(request.index),
        kind: request.kind,
        name: request.name,
        value: planned.value.as_ref().map(to_bytes),
        content_type: Some("application/json".into()),
        failure: request.failure,
        token: Some(caller.token),
        effect: planned.effect,
    };
    let stored = state
        .store
        .append_entry(&id, caller.attempt, entry, now_ms)
        .await?;
    if starts_child {
        // The child is due (now, or after a send's delay): the scheduler plans for it.
        state.engine.nudge();
    }
    if finishes_update {
        state.engine.updates_changed(&id);
    }
    let limits = state.journal_limits;
    if stored.index + 1 == limits.max_entries * crate::store::JournalLimits::WARN_PERCENT / 100 {
        tracing::warn!(
            invocation = %id,
            entries = stored.index + 1,
            max_entries = limits.max_entries,
            "the journal nears its limit; appends past it will be refused"
        );
    }
    Ok(AppendResponse {
        index: stored.index,
        at_ms: stored.at_ms,
        value: shown_value(state, &id, &stored),
        completion: stored.completion.as_ref().map(|c| c.to_wire()),
        suggest_continue_as_new: limits.warning(stored.index + 1, 0).is_some(),
    })
}

/// A `call` or `send`: the child, on the newest deployment that serves its handler, with
/// its id recorded as the entry's value.
async fn plan_child(
    state: &AppState,
    kind: EntryKind,
    name: Option<&str>,
    value: Option<Value>,
    now_ms: i64,
) -> Result<journal::Planned, ApiError> {
    let child = journal::child::plan(kind, name, value).map_err(ApiError::BadRequest)?;
    let target = state
        .targets
        .latest(&*state.store, &child.service, &child.handler)
        .await?
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "no deployment serves {}/{}",
                child.service, child.handler
            ))
        })?;
    let id = InvocationId::generate();
    let input = to_bytes(&child.input);
    let workflow = match child.workflow_id {
        Some(workflow_id) => Some(ChildWorkflow {
            workflow_id,
            input_digest: super::ingress::input_digest(
                target.protocol,
                Some("application/json".into()),
                &input,
            )?
            .0,
        }),
        None => None,
    };
    let key = super::ingress::invocation_key(&target.spec, None, &input)?;
    Ok(journal::Planned {
        value: Some(serde_json::json!({ "invocation_id": id.as_str() })),
        effect: Effect::StartChild(Box::new(ChildStart {
            id,
            key,
            input,
            due_ms: crate::lifecycle::after(now_ms, child.delay),
            awaited: kind == EntryKind::Call,
            deadline_ms: state.timeouts.deadline(&target.spec, now_ms),
            workflow,
            parent_close: child.parent_close,
            target,
        })),
    })
}

/// What the handler sees of an entry's value: an awakeable's token, a sleep's wake time,
/// a child's invocation id.
fn shown_value(state: &AppState, id: &InvocationId, entry: &StoredEntry) -> Option<Value> {
    match entry.kind {
        EntryKind::Awakeable => Some(awakeable_value(state, id, entry)),
        EntryKind::Sleep | EntryKind::Call | EntryKind::Send => {
            entry.value.as_deref().map(|v| json_value(Some(v)))
        }
        _ => None,
    }
}

fn awakeable_value(state: &AppState, id: &InvocationId, entry: &StoredEntry) -> Value {
    state.engine.awakeable_shown(id, entry)
}

/// `POST /v1/contexts/{id}/steps/{name}`, for handlers without an SDK: the first time, the
/// JSON body is recorded as the value of step `name`; every time, the recorded value is
/// the answer (`Durin-Replayed: true` when it came from the journal). A handler computes a
/// value (an id, a time, a decision), records it here and uses the answer, so a re-invocation
/// sees the same value. Step names are unique within an invocation.
pub async fn record_step(
    State(state): State<AppState>,
    ApiPath((id, name)): ApiPath<(String, String)>,
    headers: HeaderMap,
    ApiBody(body): ApiBody,
) -> Result<Response, ApiError> {
    let id = parse_invocation_id(&id)?;
    let caller = caller(&headers)?;
    check_name("step", &name)?;
    let value = json_body("the step value", &body)?;
    let new = new_entry(
        EntryKind::Step,
        Some(name.clone()),
        Some(to_bytes(&value)),
        Effect::None,
    );
    let command = NamedCommand::named(EntryKind::Step, name, Some(new));
    let answer = plain(&state, once(id, caller, command)).await?;
    Ok(replayed(
        Json(json_value(answer.entry().value.as_deref())).into_response(),
        answer.recorded(),
    ))
}

/// `GET /v1/contexts/{id}/steps/{name}`: the value recorded as step `name`
/// (`Durin-Replayed: true`), or `204` when there is none yet; records nothing. A handler
/// reads a step before it does costly work, and does the work only when it is not there.
pub async fn read_step(
    State(state): State<AppState>,
    ApiPath((id, name)): ApiPath<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = parse_invocation_id(&id)?;
    let caller = caller(&headers)?;
    check_name("step", &name)?;
    if let Some(session) = state.replays.find(&id, &caller.token) {
        // What the recording lacks is not done: the handler stops here instead of
        // running the step's work.
        let command = NamedCommand::named(EntryKind::Step, name, None);
        let answer = session.plain(&once(id, caller, command))?;
        return Ok(replayed(
            Json(json_value(answer.entry().value.as_deref())).into_response(),
            true,
        ));
    }
    let command = NamedCommand::named(EntryKind::Step, name, None);
    match plain(&state, once(id.clone(), caller, command)).await {
        Ok(answer) => Ok(replayed(
            Json(json_value(answer.entry().value.as_deref())).into_response(),
            true,
        )),
        // No such step, or no such invocation (a 404 of its own).
        Err(ApiError::NotFound(_)) => {
            super::find_invocation(&state, &id).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        Err(other) => Err(other),
    }
}

/// `command` alone, recorded when new, never waited for.
fn once(id: InvocationId, caller: Caller, command: NamedCommand) -> PlainCommand {
    PlainCommand {
        id,
        attempt: caller.attempt,
        token: caller.token,
        commands: vec![command],
        suspend: false,
    }
}

fn new_entry(
    kind: EntryKind,
    name: Option<String>,
    value: Option<Vec<u8>>,
    effect: Effect,
) -> NewEntry {
    NewEntry {
        index: None,
        kind,
        name,
        value,
        content_type: Some("application/json".into()),
        failure: None,
        token: None,
        effect,
    }
}

fn replayed(mut response: Response, recorded: bool) -> Response {
    response.headers_mut().insert(
        HEADER_REPLAYED,
        HeaderValue::from_static(if recorded { "true" } else { "false" }),
    );
    response
}

/// Runs a plain command; a suspension becomes the `suspended` problem, a wait after a
/// cancellation the `cancelled` one.
async fn plain(state: &AppState, command: PlainCommand) -> Result<PlainAnswer, ApiError> {
    let what = command
        .commands
        .iter()
        .map(|c| format!("{} {:?}", c.kind.as_str(), c.name))
        .collect::<Vec<_>>()
        .join(" or ");
    let (id, attempt) = (command.id.clone(), command.attempt);
    // A replay's handler: its recording answers, and nothing is written.
    let answer = match state.replays.find(&command.id, &command.token) {
        Some(session) => session.plain(&command)?,
        None => {
            state
                .store
                .plain_command(command, state.clock.now_ms())
                .await?
        }
    };
    if answer.cancelled {
        return Err(ApiError::Cancelled(format!(
            "invocation {id} was cancelled before {what} completed: run your compensations (steps and calls still work), then answer with a 4xx (409) to end it as cancelled"
        )));
    }
    if answer.suspended {
        // The attempt is over in the store while its handler still runs: nothing it sends
        // from now on is carried for it (the egress asks the store again).
        state.engine.attempt_over(&id, attempt);
        // It may already be due (a completion that arrived before the suspension).
        state.engine.nudge();
        return Err(ApiError::Suspended(format!(
            "invocation {id} waits for {what}: the attempt is suspended, stop now (what you answer is ignored); Durin calls the handler again when it has arrived"
        )));
    }
    Ok(answer)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlainSleep {
    /// `"30s"`, `"2h"`, `"30d"`.
    #[serde(default, with = "humantime_serde")]
    duration: Option<Duration>,
    duration_ms: Option<i64>,
    wake_at_ms: Option<i64>,
}

/// The durable timer `name`, recorded as `sleep` asks when it is new.
fn sleep_command(
    state: &AppState,
    name: String,
    sleep: PlainSleep,
) -> Result<NamedCommand, ApiError> {
    check_name("sleep", &name)?;
    let duration_ms = match (sleep.duration, sleep.duration_ms) {
        (Some(d), None) => Some(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        (None, ms) => ms,
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(
                "give one of duration, duration_ms and wake_at_ms".into(),
            ))
        }
    };
    let mut value = serde_json::Map::new();
    if let Some(ms) = duration_ms {
        value.insert("duration_ms".into(), ms.into());
    }
    if let Some(at) = sleep.wake_at_ms {
        value.insert("wake_at_ms".into(), at.into());
    }
    let planned = journal::plan(
        EntryKind::Sleep,
        None,
        Some(Value::Object(value)),
        false,
        state.clock.now_ms(),
    )
    .map_err(ApiError::BadRequest)?;
    let new = new_entry(
        EntryKind::Sleep,
        Some(name.clone()),
        planned.value.as_ref().map(to_bytes),
        planned.effect,
    );
    Ok(NamedCommand::named(EntryKind::Sleep, name, Some(new)))
}

/// A fired timer as a plain handler gets it.
fn sleep_value(entry: &StoredEntry) -> Value {
    let wake_at = json_value(entry.value.as_deref())["wake_at_ms"].clone();
    let fired_at = entry.completion.as_ref().map(|c| c.at_ms);
    json!({"wake_at_ms": wake_at, "fired_at_ms": fired_at})
}

/// The wait for the next signal `name`, told apart from other waits of that name by `key`.
fn signal_command(name: String, key: &str) -> Result<NamedCommand, ApiError> {
    crate::ids::parse_name("signal", &name).map_err(ApiError::BadRequest)?;
    signal_wait(name, key)
}

/// The wait for the next update `name` sent to this workflow's run: a wait for the signal
/// that carries it to plain handlers.
fn update_command(name: &str, key: Option<String>) -> Result<NamedCommand, ApiError> {
    crate::ids::parse_name("update", name).map_err(ApiError::BadRequest)?;
    let signal = plain_update_signal(name);
    let key = key.unwrap_or_else(|| signal.clone());
    signal_wait(signal, &key)
}

/// The wait for the next signal `name` (already checked) with its `key`.
fn signal_wait(name: String, key: &str) -> Result<NamedCommand, ApiError> {
    check_name("wait key", key)?;
    let value = to_bytes(&json!({ "key": key }));
    let new = new_entry(
        EntryKind::Signal,
        Some(name.clone()),
        Some(value.clone()),
        // Buffered signals are taken by the wait as a whole (see `journal::plain`).
        Effect::SignalWait {
            take_buffered: false,
        },
    );
    Ok(NamedCommand {
        kind: EntryKind::Signal,
        name,
        key: Some(value),
        occurrence: 0,
        new: Some(new),
    })
}

/// The awakeable `name`, created when new.
fn awakeable_command(name: String) -> Result<NamedCommand, ApiError> {
    check_name("awakeable", &name)?;
    let new = new_entry(EntryKind::Awakeable, Some(name.clone()), None, Effect::None);
    Ok(NamedCommand::named(EntryKind::Awakeable, name, Some(new)))
}

/// `POST /v1/contexts/{id}/sleep/{name}` `{"duration": "30s"}` (or `duration_ms`,
/// `wake_at_ms`): a durable timer named `name`. Answers `{"wake_at_ms", "fired_at_ms"}`
/// once it fired; before that, suspends the attempt.
pub async fn sleep(
    State(state): State<AppState>,
    ApiPath((id, name)): ApiPath<(String, String)>,
    headers: HeaderMap,
    ApiBody(body): ApiBody,
) -> Result<Response, ApiError> {
    let id = parse_invocation_id(&id)?;
    let caller = caller(&headers)?;
    let request: PlainSleep = parse_json("the sleep", &body)?;
    let command = sleep_command(&state, name, request)?;
    let answer = plain(&state, wait(id, caller, vec![command])).await?;
    Ok(replayed(
        Json(sleep_value(answer.entry())).into_response(),
        answer.recorded(),
    ))
}

/// A wait for the first of `commands` to complete.
fn wait(id: InvocationId, caller: Caller, commands: Vec<NamedCommand>) -> PlainCommand {
    PlainCommand {
        id,
        attempt: caller.attempt,
        token: caller.token,
        commands,
        suspend: true,
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct WaitQuery {
    /// Tells apart several waits for the same signal name (the default is the name).
    key: Option<String>,
    /// Gives up after this long (`"30s"`, `"2h"`, `"7d"`): a durable timer raced against
    /// the signal.
    timeout: Option<String>,
}

/// `POST /v1/contexts/{id}/signals/{name}[?key=K][&timeout=30s]`: waits for the next signal
/// `name`. Answers 200 with its payload once received (signals sent before anyone waited
/// are buffered and delivered in order), or 204 when the timeout fired first (whichever
/// came first, on every replay); before either, suspends the attempt.
pub async fn wait_signal(
    State(state): State<AppState>,
    ApiPath((id, name)): ApiPath<(String, String)>,
    ApiQuery(query): ApiQuery<WaitQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = parse_invocation_id(&id)?;
    let caller = caller(&headers)?;
    let key = query.key.unwrap_or_else(|| name.clone());
    let mut commands = vec![signal_command(name, &key)?];
    if let Some(text) = &query.timeout {
        let duration = humantime::parse_duration(text).map_err(|e| {
            ApiError::BadRequest(format!("timeout={text:?} is not a duration like 30s: {e}"))
        })?;
        let timer = PlainSleep {
            duration: Some(duration),
            duration_ms: None,
            wake_at_ms: None,
        };
        commands.push(sleep_command(&state, format!("signal:{key}"), timer)?);
    }
    let answer = plain(&state, wait(id, caller, commands)).await?;
    let response = match answer.first_completed() {
        Some(0) => Json(json_value(
            answer
                .entry()
                .completion
                .as_ref()
                .and_then(|c| c.value.as_deref()),
        ))
        .into_response(),
        _ => StatusCode::NO_CONTENT.into_response(),
    };
    Ok(replayed(response, answer.recorded()))
}

/// `POST /v1/contexts/{id}/awakeables/{name}`: creates the awakeable `name` (or finds it)
/// and answers `{"token", "resolve_url", "reject_url", "completed"}`. Send the token to
/// whoever will complete it, then wait with `.../awakeables/{name}/wait`.
pub async fn create_awakeable(
    State(state): State<AppState>,
    ApiPath((id, name)): ApiPath<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = parse_invocation_id(&id)?;
    let caller = caller(&headers)?;
    let command = awakeable_command(name)?;
    let answer = plain(&state, once(id.clone(), caller, command)).await?;
    let mut value = awakeable_value(&state, &id, answer.entry());
    value["completed"] = json!(answer.entry().completion.is_some());
    Ok(replayed(Json(value).into_response(), answer.recorded()))
}

/// `POST /v1/contexts/{id}/awakeables/{name}/wait`: answers `{"value"}` or `{"failure"}`
/// once the awakeable was resolved or rejected; before that, suspends the attempt.
pub async fn wait_awakeable(
    State(state): State<AppState>,
    ApiPath((id, name)): ApiPath<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = parse_invocation_id(&id)?;
    let caller = caller(&headers)?;
    check_name("awakeable", &name)?;
    let command = NamedCommand::named(EntryKind::Awakeable, name.clone(), None);
    let answer = plain(&state, wait(id, caller, vec![command]))
        .await
        .map_err(|e| match e {
            ApiError::NotFound(_) => ApiError::NotFound(format!(
                "awakeable {name:?} was not created: POST .../awakeables/{name} first"
            )),
            other => other,
        })?;
    let body = Value::Object(completion_body(answer.entry()));
    Ok(replayed(Json(body).into_response(), answer.recorded()))
}

/// A completed command's result as a plain handler gets it: `{"value"}`, or `{"failure"}`
/// when it failed (a rejected awakeable, a child that did not complete).
fn completion_body(entry: &StoredEntry) -> serde_json::Map<String, Value> {
    let completion = entry.completion.as_ref();
    let mut body = serde_json::Map::new();
    match completion.and_then(|c| c.failure.clone()) {
        Some(failure) => body.insert("failure".into(), json!(failure)),
        None => body.insert(
            "value".into(),
            json_value(completion.and_then(|c| c.value.as_deref())),
        ),
    };
    body
}

/// `PUT /v1/contexts/{id}/state/{key}` (JSON body) sets a key of the durable state that
/// queries read; `DELETE` clears it. Writes are replayed like every other call: the k-th
/// write of a key in an attempt answers the k-th recorded one (`Durin-Replayed: true`) and
/// changes nothing, so a handler that runs again from the top neither grows its journal
/// nor sends its state back to an earlier value.
pub async fn set_state(
    State(state): State<AppState>,
    ApiPath((id, key)): ApiPath<(String, String)>,
    headers: HeaderMap,
    ApiBody(body): ApiBody,
) -> Result<Response, ApiError> {
    let value = json_body("the state value", &body)?;
    write_state(state, id, key, headers, Some(value)).await
}

pub async fn clear_state(
    State(state): State<AppState>,
    ApiPath((id, key)): ApiPath<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    write_state(state, id, key, headers, None).await
}

async fn write_state(
    state: AppState,
    id: String,
    key: String,
    headers: HeaderMap,
    value: Option<Value>,
) -> Result<Response, ApiError> {
    let id = parse_invocation_id(&id)?;
    let caller = caller(&headers)?;
    check_name("state key", &key)?;
    let op = match &value {
        Some(v) => json!({ "set": v }),
        None => json!({ "clear": true }),
    };
    let planned = journal::plan(EntryKind::State, Some(&key), Some(op), false, 0)
        .map_err(ApiError::BadRequest)?;
    // The k-th write of this key in the attempt is the k-th recorded one: a handler that
    // runs again from the top replays its writes instead of repeating them. A replay
    // counts its own, never the running attempt's.
    let session = state.replays.find(&id, &caller.token);
    let occurrence = match &session {
        Some(session) => session.state_occurrence(&key),
        None => {
            // Only the running attempt's writes are counted: a caller that is not it (a
            // late attempt, or anyone who knows the invocation id) must not move the count
            // the running attempt's replayed writes are matched by. The store is asked at an
            // attempt's first write; later writes present the token it was shown with.
            if !state
                .state_cursors
                .counts(&id, caller.attempt, &caller.token)
            {
                running_attempt(&state, &id, &caller).await?;
            }
            state
                .state_cursors
                .reserve(&id, caller.attempt, &caller.token, &key)
        }
    };
    let new = new_entry(
        EntryKind::State,
        Some(key.clone()),
        planned.value.as_ref().map(to_bytes),
        planned.effect,
    );
    let command = NamedCommand {
        occurrence,
        ..NamedCommand::named(EntryKind::State, key.clone(), Some(new))
    };
    let attempt = caller.attempt;
    let answer = plain(&state, once(id.clone(), caller, command))
        .await
        .inspect_err(|error| {
            if session.is_none() {
                state
                    .state_cursors
                    .give_back(&id, attempt, &key, occurrence, error)
            }
        })?;
    // What this point of the handler recorded (on a replay, the first run's value).
    let recorded = json_value(answer.entry().value.as_deref());
    let value = recorded.get("set").cloned().unwrap_or(Value::Null);
    Ok(replayed(Json(value).into_response(), answer.recorded()))
}

/// Per running attempt of a plain handler: how many times it wrote each state key. Kept in
/// memory only while the attempt runs (a new attempt starts from zero), and dropped once
/// the attempt's end is recorded, or once a write finds the attempt over. Only an attempt
/// the store showed running with its token gets a count.
#[derive(Default)]
pub struct StateCursors {
    attempts: Mutex<HashMap<InvocationId, AttemptWrites>>,
}

/// An attempt's number, its token, and its writes per state key.
struct AttemptWrites {
    attempt: u32,
    token: String,
    keys: HashMap<String, u32>,
}

impl AttemptWrites {
    fn new(attempt: u32, token: &str) -> AttemptWrites {
        AttemptWrites {
            attempt,
            token: token.to_owned(),
            keys: HashMap::new(),
        }
    }
}

impl StateCursors {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<InvocationId, AttemptWrites>> {
        self.attempts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the writes of `attempt`, presenting `token`, are the ones counted here.
    fn counts(&self, id: &InvocationId, attempt: u32, token: &str) -> bool {
        self.lock().get(id).is_some_and(|writes| {
            writes.attempt == attempt && crate::http::same_secret(&writes.token, token)
        })
    }

    /// The occurrence of this write of `key` by `attempt`, counted now (so that two
    /// writes at once get two occurrences). The caller has checked that `attempt` runs
    /// with `token` ([`StateCursors::counts`], or the store).
    fn reserve(&self, id: &InvocationId, attempt: u32, token: &str, key: &str) -> u32 {
        let mut attempts = self.lock();
        let writes = attempts
            .entry(id.clone())
            .or_insert_with(|| AttemptWrites::new(attempt, token));
        if writes.attempt > attempt {
            // A newer attempt runs since the check: the store refuses this write, and the
            // newer attempt's count stays.
            return 0;
        }
        if writes.attempt < attempt {
            *writes = AttemptWrites::new(attempt, token);
        }
        let count = writes.keys.entry(key.to_owned()).or_insert(0);
        *count += 1;
        *count - 1
    }

    /// Gives back an occurrence whose write did not happen, if no later one was reserved;
    /// when the store refused the attempt itself, forgets the attempt's writes (its end may
    /// have been recorded between the check and the write).
    fn give_back(
        &self,
        id: &InvocationId,
        attempt: u32,
        key: &str,
        occurrence: u32,
        error: &ApiError,
    ) {
        let mut attempts = self.lock();
        let Some(writes) = attempts.get_mut(id) else {
            return;
        };
        if writes.attempt != attempt {
            return;
        }
        if matches!(error, ApiError::Conflict(_)) {
            attempts.remove(id);
        } else if let Some(count) = writes.keys.get_mut(key) {
            if *count == occurrence + 1 {
                *count = occurrence;
            }
        }
    }

    /// How many attempts have their writes counted (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

impl AttemptObserver for StateCursors {
    fn attempt_ended(&self, _: &InvocationId, _: u32) {}

    fn attempt_recorded(&self, id: &InvocationId, attempt: u32) {
        let mut attempts = self.lock();
        if attempts
            .get(id)
            .is_some_and(|writes| writes.attempt <= attempt)
        {
            attempts.remove(id);
        }
    }
}

/// `POST /v1/contexts/{id}/heartbeat`: the running attempt is alive and has got this far
/// (the JSON body, `null` when empty). Fenced like an append; the next attempt receives
/// the details of the last one (in its invocation request, or `GET` here).
pub async fn heartbeat(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ApiBody(body): ApiBody,
) -> Result<Response, ApiError> {
    let id = parse_invocation_id(&id)?;
    let caller = caller(&headers)?;
    let details = json_body("the heartbeat details", &body)?;
    if state.replays.find(&id, &caller.token).is_some() {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    state
        .store
        .heartbeat(
            &id,
            caller.attempt,
            caller.token,
            Some(to_bytes(&details)),
            state.clock.now_ms(),
        )
        .await?;
    state.engine.heartbeat(&id, caller.attempt);
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The running invocation `id` when `caller` is its current attempt with its token.
async fn running_attempt(
    state: &AppState,
    id: &InvocationId,
    caller: &Caller,
) -> Result<crate::store::InvocationRecord, ApiError> {
    let record = super::find_invocation(state, id).await?;
    let current = record.status == crate::store::Status::Running
        && record.attempt == caller.attempt
        && record
            .attempt_token
            .as_deref()
            .is_some_and(|t| crate::http::same_secret(t, &caller.token));
    if !current {
        return Err(ApiError::Conflict(format!(
            "attempt {} with this token is not the running attempt of invocation {id}",
            caller.attempt
        )));
    }
    Ok(record)
}

/// `POST /v1/contexts/{id}/continue-as-new` (the next run's JSON input), for a plain
/// handler of a workflow: ends this run as `continued` and starts the next under the same
/// workflow id, with a fresh journal, in one transaction; answers `{"continued_as"}`. The
/// handler must stop then (what it answers is ignored).
pub async fn continue_as_new(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ApiBody(body): ApiBody,
) -> Result<Response, ApiError> {
    let id = parse_invocation_id(&id)?;
    let caller = caller(&headers)?;
    let input = json_body("the next run's input", &body)?;
    if let Some(session) = state.replays.find(&id, &caller.token) {
        return Err(session.continue_as_new());
    }
    let record = running_attempt(&state, &id, &caller).await?;
    if record.workflow_id.is_none() {
        return Err(ApiError::BadRequest(format!(
            "invocation {id} is not a workflow's run: only a run started with POST /v1/workflows/{{workflow}}/{{id}} continues as new"
        )));
    }
    let next = state.engine.continue_as_new(&record, &input).await?;
    Ok(Json(json!({ "continued_as": next.as_str() })).into_response())
}

/// `GET /v1/contexts/{id}/heartbeat`: the details of the last heartbeat (of this attempt or
/// an earlier one), for a plain handler to go on from where an earlier attempt got;
/// `null` when there was none. Only the running attempt may read them.
pub async fn last_heartbeat(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = parse_invocation_id(&id)?;
    let caller = caller(&headers)?;
    if state.replays.find(&id, &caller.token).is_some() {
        // A replay runs as the recording's next attempt, which has no heartbeat of its own.
        return Ok(Json(json!({ "details": null })).into_response());
    }
    running_attempt(&state, &id, &caller).await?;
    let details = state.store.heartbeat_details(&id).await?;
    Ok(Json(json!({ "details": json_value(details.as_deref()) })).into_response())
}

/// `POST /v1/contexts/{id}/updates/{update_id}/refuse`: the running attempt's validator
/// refused a pending update (body: a `Failure`, whose `4xx` status the update's caller
/// gets). Fenced like an append; nothing is journaled.
pub async fn refuse_update(
    State(state): State<AppState>,
    ApiPath((id, update_id)): ApiPath<(String, String)>,
    headers: HeaderMap,
    ApiBody(body): ApiBody,
) -> Result<Response, ApiError> {
    let id = parse_invocation_id(&id)?;
    let caller = caller(&headers)?;
    let mut failure: durin_protocol::Failure = parse_json("the refusal", &body)?;
    if !(400..500).contains(&failure.status) {
        failure.status = 400;
    }
    if let Some(session) = state.replays.find(&id, &caller.token) {
        session.refuse_update(&update_id);
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    state
        .store
        .refuse_update(&id, caller.attempt, caller.token, &update_id, failure)
        .await?;
    state.engine.updates_changed(&id);
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The body of a plain handler's answer to an update.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateAnswer {
    value: Option<Value>,
    failure: Option<durin_protocol::Failure>,
}

/// `POST /v1/contexts/{id}/updates/{update_id}/result` (`{"value"}` or `{"failure"}`), for
/// plain handlers: answers an update the handler received at an update wait. The first
/// time, the answer is journaled (an `update_result` entry) and the update's caller gets
/// it; every later time, in any attempt, the recorded answer is answered back
/// (`Durin-Replayed: true`) and nothing changes.
pub async fn answer_update(
    State(state): State<AppState>,
    ApiPath((id, update_id)): ApiPath<(String, String)>,
    headers: HeaderMap,
    ApiBody(body): ApiBody,
) -> Result<Response, ApiError> {
    let id = parse_invocation_id(&id)?;
    let caller = caller(&headers)?;
    let answer: UpdateAnswer = parse_json("the update's answer", &body)?;
    let failure = match (&answer.value, answer.failure) {
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(
                "an update's answer has a value or a failure, not both".into(),
            ))
        }
        (_, Some(mut failure)) => {
            if !(400..600).contains(&failure.status) {
                failure.status = 500;
            }
            Some(failure)
        }
        (_, None) => None,
    };
    let value = answer.value.unwrap_or(Value::Null);
    // Its caller got the refusal: an answer would go to nobody. (A replayed answer finds
    // the update done.) A replay knows what it refused; the store may not know the
    // invocation at all.
    let refused = match state.replays.find(&id, &caller.token) {
        Some(session) => session.refused(&update_id),
        None => {
            let update = state
                .store
                .get_update(&id, &update_id)
                .await?
                .ok_or_else(|| {
                    ApiError::NotFound(format!("invocation {id} has no update {update_id:?}"))
                })?;
            update.status == UpdateStatus::Refused
        }
    };
    if refused {
        return Err(ApiError::Conflict(format!(
            "update {update_id} was refused; it cannot be answered as well"
        )));
    }
    let result = failure.is_none().then(|| to_bytes(&value));
    let new = NewEntry {
        failure: failure.clone(),
        ..new_entry(
            EntryKind::UpdateResult,
            Some(update_id.clone()),
            result.clone(),
            Effect::UpdateAnswered {
                id: update_id.clone(),
                result,
                failure,
            },
        )
    };
    let command = NamedCommand::named(EntryKind::UpdateResult, update_id, Some(new));
    let replaying = state.replays.find(&id, &caller.token).is_some();
    let answer = plain(&state, once(id.clone(), caller, command)).await?;
    if !replaying {
        state.engine.updates_changed(&id);
    }
    let entry = answer.entry();
    let mut body = serde_json::Map::new();
    match &entry.failure {
        Some(failure) => body.insert("failure".into(), json!(failure)),
        None => body.insert("value".into(), json_value(entry.value.as_deref())),
    };
    Ok(replayed(
        Json(Value::Object(body)).into_response(),
        answer.recorded(),
    ))
}

/// The body of a plain handler's `calls/{name}` or `sends/{name}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlainChild {
    service: String,
    handler: String,
    #[serde(default)]
    input: Value,
    /// A `send` only: start the child this much later.
    delay_ms: Option<u64>,
    /// A child workflow's run under this id (the handler is `run`).
    workflow_id: Option<String>,
    /// `terminate`, `cancel` or `abandon`.
    parent_close: Option<String>,
}

/// A plain handler's `call` or `send` named `name`: the recorded one, or a new one whose
/// child starts with it (`new` is `None` when no deployment serves the child's handler:
/// a recorded call is answered even then). Also answers the `not found` to give when
/// neither is there.
async fn child_command(
    state: &AppState,
    kind: EntryKind,
    name: String,
    child: PlainChild,
) -> Result<(NamedCommand, ApiError), ApiError> {
    check_name(kind.as_str(), &name)?;
    let mut value = json!({ "input": child.input });
    if let Some(delay) = child.delay_ms {
        value["delay_ms"] = delay.into();
    }
    if let Some(workflow_id) = child.workflow_id {
        value["workflow_id"] = workflow_id.into();
    }
    if let Some(policy) = child.parent_close {
        value["parent_close"] = policy.into();
    }
    let target = format!("{}/{}", child.service, child.handler);
    let new = match plan_child(
        state,
        kind,
        Some(&target),
        Some(value),
        state.clock.now_ms(),
    )
    .await
    {
        Ok(planned) => Some(new_entry(
            kind,
            Some(name.clone()),
            planned.value.as_ref().map(to_bytes),
            planned.effect,
        )),
        Err(ApiError::NotFound(_)) => None,
        Err(other) => return Err(other),
    };
    let missing = ApiError::NotFound(format!(
        "no deployment serves {target}, and no {} named {name:?} was recorded",
        kind.as_str()
    ));
    Ok((NamedCommand::named(kind, name, new), missing))
}

/// Runs `command` and starts the children it records.
async fn plain_with_children(
    state: &AppState,
    command: PlainCommand,
) -> Result<PlainAnswer, ApiError> {
    let starts: Vec<bool> = command
        .commands
        .iter()
        .map(|c| {
            c.new
                .as_ref()
                .is_some_and(|new| matches!(new.effect, Effect::StartChild(_)))
        })
        .collect();
    let answer = plain(state, command).await?;
    let started = starts
        .iter()
        .zip(&answer.entries)
        .any(|(starts, (_, recorded))| *starts && !recorded);
    if started {
        state.engine.nudge();
    }
    Ok(answer)
}

/// A plain handler's `call` or `send` named `name`.
async fn plain_child(
    state: &AppState,
    kind: EntryKind,
    id: String,
    name: String,
    headers: &HeaderMap,
    body: &[u8],
    suspend: bool,
) -> Result<PlainAnswer, ApiError> {
    let id = parse_invocation_id(&id)?;
    let caller = caller(headers)?;
    let child: PlainChild = parse_json("the child", body)?;
    let (command, missing) = child_command(state, kind, name, child).await?;
    let command = PlainCommand {
        suspend,
        ..once(id, caller, command)
    };
    plain_with_children(state, command)
        .await
        .map_err(|e| match e {
            ApiError::NotFound(_) => missing,
            other => other,
        })
}

/// `POST /v1/contexts/{id}/calls/{name}` (`{"service", "handler", "input"}`), for plain
/// handlers: the first time, starts the child with the entry; every time, answers
/// `{"invocation_id", "value"}` (or `"failure"`) once the child has ended, and before that
/// suspends the attempt.
pub async fn call_child(
    State(state): State<AppState>,
    ApiPath((id, name)): ApiPath<(String, String)>,
    headers: HeaderMap,
    ApiBody(body): ApiBody,
) -> Result<Response, ApiError> {
    let answer = plain_child(&state, EntryKind::Call, id, name, &headers, &body, true).await?;
    Ok(replayed(
        Json(Value::Object(call_body(answer.entry()))).into_response(),
        answer.recorded(),
    ))
}

/// A child call's result as a plain handler gets it: `{"invocation_id", "value"}` (or
/// `"failure"`).
fn call_body(entry: &StoredEntry) -> serde_json::Map<String, Value> {
    let mut body = completion_body(entry);
    let child = json_value(entry.value.as_deref())["invocation_id"].clone();
    body.insert("invocation_id".into(), child);
    body
}

/// `POST /v1/contexts/{id}/sends/{name}` (`{"service", "handler", "input", "delay_ms"?}`),
/// for plain handlers: starts the child once (later, with `delay_ms`) and answers
/// `{"invocation_id"}`, the same every time.
pub async fn send_child(
    State(state): State<AppState>,
    ApiPath((id, name)): ApiPath<(String, String)>,
    headers: HeaderMap,
    ApiBody(body): ApiBody,
) -> Result<Response, ApiError> {
    let answer = plain_child(&state, EntryKind::Send, id, name, &headers, &body, false).await?;
    // `{"invocation_id"}`, or a refusal recorded in its place.
    let recorded = json_value(answer.entry().value.as_deref());
    Ok(replayed(Json(recorded).into_response(), answer.recorded()))
}

/// The most commands one `first` waits for.
pub const MAX_FIRST: usize = 16;

/// The body of `first`: the commands raced.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct First {
    of: Vec<Member>,
}

/// One command of a `first`, named by the field of its kind: `signal` (with `key`),
/// `awakeable`, `sleep` (with `duration`, `duration_ms` or `wake_at_ms`) or `call` (with
/// the fields of `calls/{name}`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Member {
    signal: Option<String>,
    /// The next update of this name sent to the workflow's run.
    update: Option<String>,
    key: Option<String>,
    awakeable: Option<String>,
    sleep: Option<String>,
    #[serde(default, with = "humantime_serde")]
    duration: Option<Duration>,
    duration_ms: Option<i64>,
    wake_at_ms: Option<i64>,
    call: Option<String>,
    service: Option<String>,
    handler: Option<String>,
    input: Option<Value>,
    workflow_id: Option<String>,
    parent_close: Option<String>,
}

impl Member {
    /// The member's kind and name, when it names exactly one, and the fields it gives
    /// that its kind does not take.
    fn kind(&self) -> Result<(&'static str, &str), String> {
        let named: Vec<(&'static str, &str)> = [
            ("signal", &self.signal),
            ("update", &self.update),
            ("awakeable", &self.awakeable),
            ("sleep", &self.sleep),
            ("call", &self.call),
        ]
        .into_iter()
        .filter_map(|(kind, name)| name.as_deref().map(|n| (kind, n)))
        .collect();
        let [(kind, name)] = named[..] else {
            return Err(
                "each member names one of signal, update, awakeable, sleep and call".into(),
            );
        };
        let given: [(&str, bool, &[&str]); 9] = [
            ("key", self.key.is_some(), &["signal", "update"]),
            ("duration", self.duration.is_some(), &["sleep"]),
            ("duration_ms", self.duration_ms.is_some(), &["sleep"]),
            ("wake_at_ms", self.wake_at_ms.is_some(), &["sleep"]),
            ("service", self.service.is_some(), &["call"]),
            ("handler", self.handler.is_some(), &["call"]),
            ("input", self.input.is_some(), &["call"]),
            ("workflow_id", self.workflow_id.is_some(), &["call"]),
            ("parent_close", self.parent_close.is_some(), &["call"]),
        ];
        if let Some((field, ..)) = given
            .iter()
            .find(|(_, set, kinds)| *set && !kinds.contains(&kind))
        {
            return Err(format!(
                "{field} does not go with a {kind} member ({name:?})"
            ));
        }
        Ok((kind, name))
    }

    async fn command(self, state: &AppState) -> Result<(NamedCommand, Option<ApiError>), ApiError> {
        let (kind, name) = self.kind().map_err(ApiError::BadRequest)?;
        let name = name.to_owned();
        Ok(match kind {
            "signal" => {
                let key = self.key.unwrap_or_else(|| name.clone());
                (signal_command(name, &key)?, None)
            }
            "update" => (update_command(&name, self.key)?, None),
            "awakeable" => (awakeable_command(name)?, None),
            "sleep" => {
                let sleep = PlainSleep {
                    duration: self.duration,
                    duration_ms: self.duration_ms,
                    wake_at_ms: self.wake_at_ms,
                };
                (sleep_command(state, name, sleep)?, None)
            }
            _ => {
                let (Some(service), Some(handler)) = (self.service, self.handler) else {
                    return Err(ApiError::BadRequest(format!(
                        "the call member {name:?} needs service and handler"
                    )));
                };
                let child = PlainChild {
                    service,
                    handler,
                    input: self.input.unwrap_or_default(),
                    delay_ms: None,
                    workflow_id: self.workflow_id,
                    parent_close: self.parent_close,
                };
                let (command, missing) = child_command(state, EntryKind::Call, name, child).await?;
                (command, Some(missing))
            }
        })
    }
}

/// `POST /v1/contexts/{id}/first` `{"of": [members]}`: waits for the first of up to 16
/// signals, awakeables, timers and child calls, each the same command as the single call
/// of its kind and name (recorded here when new). Answers `{"index", "kind", "name", ...}`
/// with the result of the one that completed first, the same on every later attempt;
/// before any has, suspends the attempt on all of them.
pub async fn first(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ApiBody(body): ApiBody,
) -> Result<Response, ApiError> {
    let id = parse_invocation_id(&id)?;
    let caller = caller(&headers)?;
    let request: First = parse_json("the wait", &body)?;
    if request.of.is_empty() || request.of.len() > MAX_FIRST {
        return Err(ApiError::BadRequest(format!(
            "of lists 1 to {MAX_FIRST} members, not {}",
            request.of.len()
        )));
    }
    let mut commands: Vec<NamedCommand> = Vec::with_capacity(request.of.len());
    let mut missing = None;
    for member in request.of {
        let (command, not_found) = member.command(&state).await?;
        if commands
            .iter()
            .any(|c| c.kind == command.kind && c.name == command.name && c.key == command.key)
        {
            return Err(ApiError::BadRequest(format!(
                "the {} member {:?} is listed twice",
                command.kind.as_str(),
                command.name
            )));
        }
        missing = missing.or(not_found);
        commands.push(command);
    }
    let answer = plain_with_children(&state, wait(id, caller, commands))
        .await
        .map_err(|e| match (e, missing) {
            (ApiError::NotFound(_), Some(missing)) => missing,
            (other, _) => other,
        })?;
    let index = answer.first_completed().ok_or_else(|| {
        ApiError::Storage("the journal answered a wait with nothing completed".into())
    })?;
    let entry = &answer.entries[index].0;
    let mut body = match entry.kind {
        EntryKind::Call => call_body(entry),
        EntryKind::Sleep => serde_json::Map::from_iter([("value".into(), sleep_value(entry))]),
        _ => completion_body(entry),
    };
    let name = entry.name.clone().unwrap_or_default();
    // An update comes as the signal that carries it: `{"update_id", "name", "input"}`.
    let (kind, name) = match name.strip_prefix(crate::store::PLAIN_UPDATE_SIGNAL_PREFIX) {
        Some(update) if entry.kind == EntryKind::Signal => ("update", update.to_owned()),
        _ => (entry.kind.as_str(), name),
    };
    body.insert("index".into(), index.into());
    body.insert("kind".into(), kind.into());
    body.insert("name".into(), name.into());
    Ok(replayed(
        Json(Value::Object(body)).into_response(),
        answer.recorded(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_counts_are_kept_only_for_the_running_attempt_and_go_with_it() {
        let cursors = StateCursors::default();
        let id = InvocationId::generate();
        assert_eq!(cursors.reserve(&id, 1, "t1", "k"), 0);
        assert_eq!(cursors.reserve(&id, 1, "t1", "k"), 1);
        assert!(cursors.counts(&id, 1, "t1"));
        assert!(!cursors.counts(&id, 1, "other"), "another token");
        assert!(!cursors.counts(&id, 2, "t1"), "another attempt");
        // A write that failed for another reason gives its occurrence back.
        let full = ApiError::JournalFull("full".into());
        cursors.give_back(&id, 1, "k", 1, &full);
        assert_eq!(cursors.reserve(&id, 1, "t1", "k"), 1);
        // A write the store refused because the attempt is over (its end was recorded
        // between the check and the write) takes the attempt's counts along.
        let fenced = ApiError::Conflict("fenced".into());
        cursors.give_back(&id, 1, "k", 2, &fenced);
        assert_eq!(cursors.len(), 0);
        // A newer attempt starts from zero; the end of an older one leaves it alone.
        assert_eq!(cursors.reserve(&id, 2, "t2", "k"), 0);
        cursors.attempt_recorded(&id, 1);
        assert!(cursors.counts(&id, 2, "t2"));
        cursors.attempt_recorded(&id, 2);
        assert_eq!(cursors.len(), 0);
    }
}
