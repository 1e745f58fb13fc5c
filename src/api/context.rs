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
    ChildStart, ChildWorkflow, Effect, NewEntry, PlainAnswer, PlainCommand, StoredEntry,
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
    let now_ms = state.clock.now_ms();
    let mut planned = match request.kind {
        EntryKind::Call | EntryKind::Send if request.failure.is_none() => {
            plan_child(
                &state,
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
    Ok(Json(AppendResponse {
        index: stored.index,
        at_ms: stored.at_ms,
        value: shown_value(&state, &id, &stored),
        completion: stored.completion.as_ref().map(|c| c.to_wire()),
        suggest_continue_as_new: limits.warning(stored.index + 1, 0).is_some(),
    }))
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
    Ok(journal::Planned {
        value: Some(serde_json::json!({ "invocation_id": id.as_str() })),
        effect: Effect::StartChild(Box::new(ChildStart {
            id,
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
        EntryKind::Awakeable => Some(awakeable_value(state, id, entry.index)),
        EntryKind::Sleep | EntryKind::Call | EntryKind::Send => {
            entry.value.as_deref().map(|v| json_value(Some(v)))
        }
        _ => None,
    }
}

fn awakeable_value(state: &AppState, id: &InvocationId, index: u32) -> Value {
    state.engine.awakeable_value(id, index)
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
    let answer = plain(
        &state,
        PlainCommand {
            id,
            attempt: caller.attempt,
            token: caller.token,
            kind: EntryKind::Step,
            name: name.clone(),
            key: None,
            occurrence: 0,
            also: None,
            new: Some(new_entry(
                EntryKind::Step,
                Some(name),
                Some(to_bytes(&value)),
                Effect::None,
            )),
            suspend: false,
        },
    )
    .await?;
    Ok(replayed(
        Json(json_value(answer.entry.value.as_deref())).into_response(),
        answer.recorded,
    ))
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
    let what = format!("{} {:?}", command.kind.as_str(), command.name);
    let id = command.id.clone();
    let answer = state
        .store
        .plain_command(command, state.clock.now_ms())
        .await?;
    if answer.cancelled {
        return Err(ApiError::Cancelled(format!(
            "invocation {id} was cancelled before {what} completed: run your compensations (steps and calls still work), then answer with a 4xx (409) to end it as cancelled"
        )));
    }
    if answer.suspended {
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
    check_name("sleep", &name)?;
    let request: PlainSleep = parse_json("the sleep", &body)?;
    let duration_ms = match (request.duration, request.duration_ms) {
        (Some(d), None) => Some(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        (None, ms) => ms,
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(
                "give one of duration, duration_ms and wake_at_ms".into(),
            ))
        }
    };
    let value = json!({"duration_ms": duration_ms, "wake_at_ms": request.wake_at_ms});
    let value = Value::Object(
        value
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    );
    let planned = journal::plan(
        EntryKind::Sleep,
        None,
        Some(value),
        false,
        state.clock.now_ms(),
    )
    .map_err(ApiError::BadRequest)?;
    let answer = plain(
        &state,
        PlainCommand {
            id,
            attempt: caller.attempt,
            token: caller.token,
            kind: EntryKind::Sleep,
            name: name.clone(),
            key: None,
            occurrence: 0,
            also: None,
            new: Some(new_entry(
                EntryKind::Sleep,
                Some(name),
                planned.value.as_ref().map(to_bytes),
                planned.effect,
            )),
            suspend: true,
        },
    )
    .await?;
    let wake_at = json_value(answer.entry.value.as_deref())["wake_at_ms"].clone();
    let fired_at = answer.entry.completion.as_ref().map(|c| c.at_ms);
    Ok(replayed(
        Json(json!({"wake_at_ms": wake_at, "fired_at_ms": fired_at})).into_response(),
        answer.recorded,
    ))
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
    crate::ids::parse_name("signal", &name).map_err(ApiError::BadRequest)?;
    let key = query.key.unwrap_or_else(|| name.clone());
    check_name("wait key", &key)?;
    let timeout = match &query.timeout {
        Some(text) => {
            let duration = humantime::parse_duration(text).map_err(|e| {
                ApiError::BadRequest(format!("timeout={text:?} is not a duration like 30s: {e}"))
            })?;
            let value =
                json!({ "duration_ms": u64::try_from(duration.as_millis()).unwrap_or(u64::MAX) });
            let planned = journal::plan(
                EntryKind::Sleep,
                None,
                Some(value),
                false,
                state.clock.now_ms(),
            )
            .map_err(ApiError::BadRequest)?;
            let timer_name = format!("signal:{key}");
            let timer = new_entry(
                EntryKind::Sleep,
                Some(timer_name.clone()),
                planned.value.as_ref().map(to_bytes),
                planned.effect,
            );
            Some((timer_name, timer))
        }
        None => None,
    };
    let value = to_bytes(&json!({ "key": key }));
    let answer = plain(
        &state,
        PlainCommand {
            id,
            attempt: caller.attempt,
            token: caller.token,
            kind: EntryKind::Signal,
            name: name.clone(),
            key: Some(value.clone()),
            occurrence: 0,
            new: Some(new_entry(
                EntryKind::Signal,
                Some(name),
                Some(value),
                // A buffered signal came before the wait began, so before its timer: it
                // is taken at once, also when the wait has a timeout (even `0s`, which
                // looks at what is buffered without waiting).
                Effect::SignalWait {
                    take_buffered: true,
                },
            )),
            also: timeout,
            suspend: true,
        },
    )
    .await?;
    let signal = answer.entry.completion.as_ref();
    let timer = answer.also.as_ref().and_then(|e| e.completion.as_ref());
    let response = match (signal, timer) {
        (Some(s), Some(t)) if t.seq < s.seq => StatusCode::NO_CONTENT.into_response(),
        (None, Some(_)) => StatusCode::NO_CONTENT.into_response(),
        (s, _) => Json(
            s.map(|c| json_value(c.value.as_deref()))
                .unwrap_or(Value::Null),
        )
        .into_response(),
    };
    Ok(replayed(response, answer.recorded))
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
    check_name("awakeable", &name)?;
    let answer = plain(
        &state,
        PlainCommand {
            id: id.clone(),
            attempt: caller.attempt,
            token: caller.token,
            kind: EntryKind::Awakeable,
            name: name.clone(),
            key: None,
            occurrence: 0,
            also: None,
            new: Some(new_entry(
                EntryKind::Awakeable,
                Some(name),
                None,
                Effect::None,
            )),
            suspend: false,
        },
    )
    .await?;
    let mut value = awakeable_value(&state, &id, answer.entry.index);
    value["completed"] = json!(answer.entry.completion.is_some());
    Ok(replayed(Json(value).into_response(), answer.recorded))
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
    let answer = plain(
        &state,
        PlainCommand {
            id,
            attempt: caller.attempt,
            token: caller.token,
            kind: EntryKind::Awakeable,
            name: name.clone(),
            key: None,
            occurrence: 0,
            new: None,
            also: None,
            suspend: true,
        },
    )
    .await
    .map_err(|e| match e {
        ApiError::NotFound(_) => ApiError::NotFound(format!(
            "awakeable {name:?} was not created: POST .../awakeables/{name} first"
        )),
        other => other,
    })?;
    let body = Value::Object(completion_body(&answer.entry));
    Ok(replayed(Json(body).into_response(), answer.recorded))
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
    // runs again from the top replays its writes instead of repeating them.
    let occurrence = state.state_cursors.reserve(&id, caller.attempt, &key);
    let answer = plain(
        &state,
        PlainCommand {
            id: id.clone(),
            attempt: caller.attempt,
            token: caller.token,
            kind: EntryKind::State,
            name: key.clone(),
            key: None,
            occurrence,
            new: Some(new_entry(
                EntryKind::State,
                Some(key.clone()),
                planned.value.as_ref().map(to_bytes),
                planned.effect,
            )),
            also: None,
            suspend: false,
        },
    )
    .await
    .inspect_err(|_| {
        state
            .state_cursors
            .give_back(&id, caller.attempt, &key, occurrence)
    })?;
    // What this point of the handler recorded (on a replay, the first run's value).
    let recorded = json_value(answer.entry.value.as_deref());
    let value = recorded.get("set").cloned().unwrap_or(Value::Null);
    Ok(replayed(Json(value).into_response(), answer.recorded))
}

/// Per running attempt of a plain handler: how many times it wrote each state key. Kept in
/// memory only while the attempt runs (a new attempt starts from zero), and dropped once
/// the attempt's end is recorded.
#[derive(Default)]
pub struct StateCursors {
    attempts: Mutex<HashMap<InvocationId, AttemptWrites>>,
}

/// An attempt's number and its writes per state key.
type AttemptWrites = (u32, HashMap<String, u32>);

impl StateCursors {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<InvocationId, AttemptWrites>> {
        self.attempts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The occurrence of this write of `key` by `attempt`, counted now (so that two
    /// writes at once get two occurrences).
    fn reserve(&self, id: &InvocationId, attempt: u32, key: &str) -> u32 {
        let mut attempts = self.lock();
        let slot = attempts
            .entry(id.clone())
            .or_insert_with(|| (attempt, HashMap::new()));
        if slot.0 > attempt {
            // A stale attempt's write: the store refuses it; a newer attempt's count stays.
            return 0;
        }
        if slot.0 < attempt {
            *slot = (attempt, HashMap::new());
        }
        let count = slot.1.entry(key.to_owned()).or_insert(0);
        *count += 1;
        *count - 1
    }

    /// Gives back an occurrence whose write did not happen, if no later one was reserved.
    fn give_back(&self, id: &InvocationId, attempt: u32, key: &str, occurrence: u32) {
        if let Some((a, keys)) = self.lock().get_mut(id) {
            if *a == attempt {
                if let Some(count) = keys.get_mut(key) {
                    if *count == occurrence + 1 {
                        *count = occurrence;
                    }
                }
            }
        }
    }
}

impl AttemptObserver for StateCursors {
    fn attempt_ended(&self, _: &InvocationId, _: u32) {}

    fn attempt_recorded(&self, id: &InvocationId, attempt: u32) {
        let mut attempts = self.lock();
        if attempts.get(id).is_some_and(|(a, _)| *a <= attempt) {
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
    state
        .store
        .refuse_update(&id, caller.attempt, caller.token, &update_id, failure)
        .await?;
    state.engine.updates_changed(&id);
    Ok(StatusCode::NO_CONTENT.into_response())
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
/// child starts with it.
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
    check_name(kind.as_str(), &name)?;
    let child: PlainChild = parse_json("the child", body)?;
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
    // A recorded call is answered even when no deployment serves its handler any more.
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
    let starts_child = new.is_some();
    let answer = plain(
        state,
        PlainCommand {
            id,
            attempt: caller.attempt,
            token: caller.token,
            kind,
            name: name.clone(),
            key: None,
            occurrence: 0,
            new,
            also: None,
            suspend,
        },
    )
    .await
    .map_err(|e| match e {
        ApiError::NotFound(_) => ApiError::NotFound(format!(
            "no deployment serves {target}, and no {} named {name:?} was recorded",
            kind.as_str()
        )),
        other => other,
    })?;
    if starts_child && !answer.recorded {
        state.engine.nudge();
    }
    Ok(answer)
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
    let mut body = completion_body(&answer.entry);
    let child = json_value(answer.entry.value.as_deref())["invocation_id"].clone();
    body.insert("invocation_id".into(), child);
    Ok(replayed(
        Json(Value::Object(body)).into_response(),
        answer.recorded,
    ))
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
    let recorded = json_value(answer.entry.value.as_deref());
    Ok(replayed(Json(recorded).into_response(), answer.recorded))
}
