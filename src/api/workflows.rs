//! Workflows: a workflow id names one run of a workflow's `run` handler.
//!
//! `POST /v1/workflows/{workflow}/{id}` starts the run once: the same id with the same
//! input answers the same run, another input answers 409 with the first run's `Location`.
//! `?reuse=after-end` starts a new run when the last one has ended. Signals, queries and
//! awakeables reach a run by its workflow id (see `signals.rs`, `queries.rs`).

use crate::engine::{Admitted, Caller};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::Value;

use super::ingress::{
    accepted, content_type, ended_response, input_digest, prefer_wait, with_preference,
};
use super::views::InvocationView;
use super::{load_ended, parse_json, wait_for_end, ApiBody, ApiPath, ApiQuery, AppState};
use crate::ids::{parse_name, InvocationId};
use crate::problem::ApiError;
use crate::store::{
    InvocationRecord, NewInvocation, NewSignal, NewWorkflowRun, Status, WorkflowStarted,
};

/// The handler a workflow runs.
pub const RUN_HANDLER: &str = "run";

/// A workflow id: 1 to 255 visible ASCII characters, no `/`.
pub fn parse_workflow_id(id: &str) -> Result<String, ApiError> {
    crate::ids::parse_workflow_id(id).map_err(ApiError::BadRequest)
}

/// The latest run of a workflow id, or a 404 that says how to start one.
pub async fn find_run(
    state: &AppState,
    workflow: &str,
    id: &str,
) -> Result<InvocationRecord, ApiError> {
    let workflow = parse_name("workflow", workflow).map_err(ApiError::BadRequest)?;
    let id = parse_workflow_id(id)?;
    state
        .store
        .find_workflow(&workflow, &id)
        .await?
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "workflow {workflow} has no run with id {id:?}; start one with POST /v1/workflows/{workflow}/{id}"
            ))
        })
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct StartQuery {
    /// `after-end`: a new run when the last one has ended.
    reuse: Option<String>,
}

/// `POST /v1/workflows/{workflow}/{id}`: starts the run (202 + `Location`), or answers the
/// one the id names. With `Prefer: wait=N` it waits up to N seconds for the output.
pub async fn start(
    State(state): State<AppState>,
    ApiPath((workflow, id)): ApiPath<(String, String)>,
    ApiQuery(query): ApiQuery<StartQuery>,
    headers: HeaderMap,
    ApiBody(body): ApiBody,
) -> Result<Response, ApiError> {
    let wait = prefer_wait(&headers);
    let new_run_after_end = match query.reuse.as_deref() {
        None => false,
        Some("after-end") => true,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "reuse={other:?} is not a policy; the one policy is reuse=after-end"
            )))
        }
    };
    let content_type = content_type(&headers)?;
    let (record, started) = start_run(
        &state,
        super::traceparent(&headers),
        (&workflow, &id),
        content_type,
        &body,
        new_run_after_end,
        None,
        if wait.is_some() {
            Caller::Waits
        } else {
            Caller::HandsOver
        },
    )
    .await?;
    answer(&state, record, started != Run::New, wait).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignalWithStart {
    /// The run's input, if it has to start.
    #[serde(default)]
    input: Value,
    signal: SignalPart,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignalPart {
    name: String,
    #[serde(default)]
    payload: Value,
}

/// `POST /v1/workflows/{workflow}/{id}/signal-with-start` `{"input", "signal": {"name",
/// "payload"}}`: delivers the signal to the run that has not ended, or starts one with
/// `input` and delivers it to that, atomically. An `Idempotency-Key` makes a retry deliver
/// nothing twice.
pub async fn signal_with_start(
    State(state): State<AppState>,
    ApiPath((workflow, id)): ApiPath<(String, String)>,
    headers: HeaderMap,
    ApiBody(body): ApiBody,
) -> Result<Response, ApiError> {
    let request: SignalWithStart = parse_json("the signal-with-start request", &body)?;
    parse_name("signal", &request.signal.name).map_err(ApiError::BadRequest)?;
    let signal = NewSignal {
        name: request.signal.name,
        value: serde_json::to_vec(&request.signal.payload).unwrap_or_default(),
        idempotency_key: super::idempotency_key(&headers)?,
    };
    let input = serde_json::to_vec(&request.input).unwrap_or_default();
    let (record, started) = start_run(
        &state,
        super::traceparent(&headers),
        (&workflow, &id),
        Some("application/json".into()),
        &input,
        true,
        Some(signal),
        Caller::HandsOver,
    )
    .await?;
    state.engine.nudge();
    // Like a signal's answer: whether this request stored the signal or found it stored.
    let mut fields = serde_json::Map::new();
    fields.insert(
        "duplicate".into(),
        Value::Bool(started == Run::DuplicateSignal),
    );
    Ok(super::ingress::accepted_with(
        &record,
        started != Run::New,
        fields,
    ))
}

/// What a start found: a new run, the run the id names, or (signal-with-start) the run
/// that already received this signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    New,
    Existing,
    DuplicateSignal,
}

/// Starts a run, or finds the one the id names; refused (503) when admission turns
/// `caller` away.
#[allow(clippy::too_many_arguments)]
async fn start_run(
    state: &AppState,
    traceparent: Option<String>,
    (workflow, id): (&str, &str),
    content_type: Option<String>,
    body: &[u8],
    new_run_after_end: bool,
    signal: Option<NewSignal>,
    caller: Caller,
) -> Result<(InvocationRecord, Run), ApiError> {
    let workflow = parse_name("workflow", workflow).map_err(ApiError::BadRequest)?;
    let workflow_id = parse_workflow_id(id)?;
    let target = state
        .targets
        .latest(&*state.store, &workflow, RUN_HANDLER)
        .await?
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "no deployment serves workflow {workflow} (a service with a handler named {RUN_HANDLER:?}); register one with POST /v1/deployments"
            ))
        })?;
    let (input_digest, content_type) = input_digest(target.protocol, content_type, body)?;
    let admitted = super::admit(state, caller).await?;
    let now_ms = state.clock.now_ms();
    let deadline_ms = state.timeouts.deadline(&target.spec, now_ms);
    let run = NewWorkflowRun {
        invocation: NewInvocation {
            id: InvocationId::generate(),
            target,
            input: body.to_vec(),
            content_type: Some(content_type.unwrap_or_else(|| "application/json".into())),
            idempotency: None,
            now_ms,
            deadline_ms,
            traceparent,
            run_now: admitted == Admitted::Queue,
            key: None,
        },
        workflow_id,
        input_digest,
        new_run_after_end,
        signal,
    };
    // In a task of its own, so that a caller going away cannot leave a new run unstarted.
    let task_state = state.clone();
    let hold = state.engine.hold_first_attempt(&run.invocation.id);
    let started = tokio::spawn(async move {
        let state = task_state;
        let started = state.store.start_workflow(run).await?;
        if let WorkflowStarted::New { record, input } = &started {
            state
                .engine
                .run_created(record.clone(), (**input).clone(), hold);
        }
        Ok::<_, ApiError>(started)
    })
    .await
    .map_err(|e| ApiError::Storage(format!("the workflow could not be started: {e}")))??;
    match started {
        WorkflowStarted::New { record, .. } => Ok((record, Run::New)),
        WorkflowStarted::Existing(record) => Ok((record, Run::Existing)),
        WorkflowStarted::DuplicateSignal(record) => Ok((record, Run::DuplicateSignal)),
        WorkflowStarted::Conflict(record) => Err(ApiError::WorkflowConflict {
            detail: format!(
                "workflow {} id {id:?} already names run {} ({}), started with another input; use another id, or reuse=after-end once it has ended",
                record.service, record.id, record.status
            ),
            invocation_id: record.id.to_string(),
        }),
    }
}

/// 202 with the run, or (with `Prefer: wait=N`) its output once it ended.
async fn answer(
    state: &AppState,
    record: InvocationRecord,
    replayed: bool,
    wait: Option<std::time::Duration>,
) -> Result<Response, ApiError> {
    let Some(wait) = wait else {
        return Ok(with_preference(accepted(&record, replayed), None));
    };
    let ended = wait_for_runs(state, record, wait).await?;
    let response = if ended.record.status.is_final() {
        ended_response(&ended, replayed)
    } else {
        accepted(&ended.record, replayed)
    };
    Ok(with_preference(response, Some(wait)))
}

/// `GET /v1/workflows/{workflow}/{id}`: the latest run's status and output, like
/// `GET /v1/invocations/{id}` (`Prefer: wait=N` long-polls).
pub async fn get(
    State(state): State<AppState>,
    ApiPath((workflow, id)): ApiPath<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let wait = prefer_wait(&headers);
    let run = find_run(&state, &workflow, &id).await?;
    let ended = match wait {
        Some(wait) => wait_for_runs(&state, run, wait).await?,
        None => load_ended(&state, run).await?,
    };
    let status = if wait.is_some() && !ended.record.status.is_final() {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    let view = InvocationView::new(&ended.record, ended.output.as_ref())
        .warned(&state.journal_limits)
        .with_unconsumed(&ended.record, &*state.store)
        .await?;
    let mut response = (status, Json(view)).into_response();
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/invocations/{}", ended.record.id)) {
        response
            .headers_mut()
            .insert(header::CONTENT_LOCATION, location);
    }
    Ok(with_preference(response, wait))
}

/// Waits up to `wait` for the workflow's end, following runs that continue as new: the
/// end of the last run, or the run current when the time is up.
async fn wait_for_runs(
    state: &AppState,
    mut run: InvocationRecord,
    wait: std::time::Duration,
) -> Result<std::sync::Arc<crate::engine::Ended>, ApiError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let ended = wait_for_end(state, &run.id, left, false, None).await?;
        if ended.record.status != Status::Continued || left.is_zero() {
            return Ok(ended);
        }
        let Some(workflow_id) = &ended.record.workflow_id else {
            return Ok(ended);
        };
        run = find_run(state, &ended.record.service, workflow_id).await?;
    }
}

/// `GET /v1/workflows/{workflow}/{id}/runs`: every run of the workflow id, oldest first
/// (each that continued as new, then the next).
pub async fn runs(
    State(state): State<AppState>,
    ApiPath((workflow, id)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    let latest = find_run(&state, &workflow, &id).await?;
    let runs = state
        .store
        .workflow_runs(
            &latest.service,
            latest.workflow_id.as_deref().unwrap_or(&id),
        )
        .await?;
    let mut views: Vec<InvocationView> = runs
        .iter()
        .map(|run| InvocationView::new(run, None).warned(&state.journal_limits))
        .collect();
    // Oldest first: a run that continued as new is followed by the run it became (a run
    // started anew after one ended, `reuse=after-end`, is not linked).
    for i in 1..views.len() {
        if runs[i - 1].status == crate::store::Status::Continued {
            views[i - 1].continued_as = Some(views[i].id.clone());
            views[i].continued_from = Some(views[i - 1].id.clone());
        }
    }
    Ok(Json(serde_json::json!({ "runs": views })).into_response())
}
