//! Cancellation and termination of an invocation or a workflow run.
//!
//! `POST .../cancel` is cooperative: Durin writes a `cancel` entry into the journal and runs
//! the handler, whose next await fails once with a terminal `Cancelled` error; the handler
//! may run compensations (journaled as usual) before it ends, as `cancelled`.
//! `POST .../terminate` (admin listener) is hard: the invocation ends at once as
//! `terminated` and no more handler code runs for it. Both are safe to repeat and say
//! what an earlier request did.

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::workflows::find_run;
use super::{json_body, parse_invocation_id, ApiBody, ApiPath, AppState};
use crate::ids::InvocationId;
use crate::problem::ApiError;
use crate::store::{CancelAnswer, InvocationRecord, Status};

/// The longest termination reason kept.
const MAX_REASON_BYTES: usize = 1024;

/// `POST /v1/invocations/{id}/cancel`.
pub async fn cancel_invocation(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let id = parse_invocation_id(&id)?;
    cancel(&state, &id).await
}

/// `POST /v1/workflows/{workflow}/{id}/cancel`: cancels the workflow id's latest run.
pub async fn cancel_workflow(
    State(state): State<AppState>,
    ApiPath((workflow, id)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    let run = find_run(&state, &workflow, &id).await?;
    cancel(&state, &run.id).await
}

/// `POST /v1/invocations/{id}/terminate` (admin), with an optional `{"reason"}`.
pub async fn terminate_invocation(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiBody(body): ApiBody,
) -> Result<Response, ApiError> {
    let id = parse_invocation_id(&id)?;
    terminate(&state, &id, &body).await
}

/// `POST /v1/workflows/{workflow}/{id}/terminate` (admin): the workflow id's latest run.
pub async fn terminate_workflow(
    State(state): State<AppState>,
    ApiPath((workflow, id)): ApiPath<(String, String)>,
    ApiBody(body): ApiBody,
) -> Result<Response, ApiError> {
    let run = find_run(&state, &workflow, &id).await?;
    terminate(&state, &run.id, &body).await
}

async fn cancel(state: &AppState, id: &InvocationId) -> Result<Response, ApiError> {
    let answer = state.engine.cancel(id).await?;
    let (record, said) = match answer {
        CancelAnswer::Requested(record) => (record, "requested"),
        CancelAnswer::AlreadyRequested(record) => (record, "already-requested"),
        CancelAnswer::Dequeued(record) => {
            return Ok(answer_with(StatusCode::OK, &record, "cancellation", "cancelled"));
        }
        CancelAnswer::Ended(record) if record.status == Status::Cancelled => {
            return Ok(answer_with(StatusCode::OK, &record, "cancellation", "already-cancelled"));
        }
        CancelAnswer::Ended(record) => {
            return Err(ApiError::InvocationState {
                detail: format!(
                    "invocation {id} has already ended as {}; there is nothing to cancel",
                    record.status
                ),
                invocation_id: id.to_string(),
            })
        }
        CancelAnswer::Paused(record) => {
            return Err(ApiError::InvocationState {
                detail: format!(
                    "invocation {id} is paused ({}); resume it to let its handler see the cancellation, or terminate it",
                    super::views::last_error_for_caller(record.last_error.as_deref())
                ),
                invocation_id: id.to_string(),
            })
        }
    };
    Ok(answer_with(
        StatusCode::ACCEPTED,
        &record,
        "cancellation",
        said,
    ))
}

async fn terminate(state: &AppState, id: &InvocationId, body: &[u8]) -> Result<Response, ApiError> {
    let reason = match json_body("the termination request", body)? {
        serde_json::Value::Null => None,
        serde_json::Value::Object(map) => match map.get("reason") {
            None => None,
            Some(serde_json::Value::String(reason)) if reason.len() <= MAX_REASON_BYTES => {
                Some(reason.clone())
            }
            Some(_) => {
                return Err(ApiError::BadRequest(format!(
                    "reason must be a string of at most {MAX_REASON_BYTES} bytes"
                )))
            }
        },
        _ => {
            return Err(ApiError::BadRequest(
                "the termination request must be a JSON object like {\"reason\": \"...\"}".into(),
            ))
        }
    };
    let reason = match reason {
        Some(reason) => format!("terminated by an operator: {reason}"),
        None => "terminated by an operator".to_owned(),
    };
    let (record, terminated) = state.engine.terminate(id, reason).await?;
    if terminated || record.status == Status::Terminated {
        let said = if terminated {
            "terminated"
        } else {
            "already-terminated"
        };
        return Ok(answer_with(StatusCode::OK, &record, "termination", said));
    }
    Err(ApiError::InvocationState {
        detail: format!(
            "invocation {id} has already ended as {}; there is nothing to terminate",
            record.status
        ),
        invocation_id: id.to_string(),
    })
}

fn answer_with(status: StatusCode, record: &InvocationRecord, what: &str, said: &str) -> Response {
    let mut response = (
        status,
        Json(json!({
            "invocation_id": record.id.as_str(),
            "status": record.status.as_str(),
            what: said,
        })),
    )
        .into_response();
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/invocations/{}", record.id)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}
