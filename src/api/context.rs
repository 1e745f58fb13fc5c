//! The context API: how a running attempt appends journal entries.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use durin_protocol::{
    AppendRequest, AppendResponse, EntryKind, HEADER_ATTEMPT, HEADER_ATTEMPT_TOKEN,
};
use serde_json::Value;

use super::{parse_invocation_id, parse_json, ApiBody, ApiPath, AppState};
use crate::egress::HEADER_REPLAYED;
use crate::invoker::json_value;
use crate::problem::ApiError;
use crate::store::NewEntry;

const MAX_NAME_BYTES: usize = 256;

/// `POST /v1/contexts/{id}/entries`: durable before it answers; refused for a stale attempt.
pub async fn append(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ApiBody(body): ApiBody,
) -> Result<Json<AppendResponse>, ApiError> {
    let id = parse_invocation_id(&id)?;
    let attempt = attempt_header(&headers)?;
    let token = headers
        .get(HEADER_ATTEMPT_TOKEN)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            ApiError::BadRequest(
                "the Durin-Attempt-Token header is missing: send the attempt_token of the invocation request".into(),
            )
        })?
        .to_owned();
    let request: AppendRequest = parse_json("the entry", &body)?;
    if !request.kind.appendable() {
        return Err(ApiError::BadRequest(format!(
            "entries of kind {} are written by the gateway, not appended by handlers",
            request.kind.as_str()
        )));
    }
    match (&request.name, request.kind) {
        (None, EntryKind::Step) => {
            return Err(ApiError::BadRequest("a step entry needs a name".into()))
        }
        (Some(name), _) if name.is_empty() || name.len() > MAX_NAME_BYTES => {
            return Err(ApiError::BadRequest(format!(
                "entry names must be 1 to {MAX_NAME_BYTES} bytes"
            )))
        }
        _ => {}
    }
    if request.value.is_some() == request.failure.is_some() && request.kind == EntryKind::Step {
        return Err(ApiError::BadRequest(
            "a step entry carries exactly one of value and failure".into(),
        ));
    }
    let entry = NewEntry {
        index: Some(request.index),
        kind: request.kind,
        name: request.name,
        value: request
            .value
            .map(|v| serde_json::to_vec(&v).unwrap_or_default()),
        content_type: Some("application/json".into()),
        failure: request.failure,
        token: Some(token),
    };
    let stored = state
        .store
        .append_entry(&id, attempt, entry, state.clock.now_ms())
        .await?;
    Ok(Json(AppendResponse {
        index: stored.index,
        at_ms: stored.at_ms,
    }))
}

fn attempt_header(headers: &HeaderMap) -> Result<u32, ApiError> {
    headers
        .get(HEADER_ATTEMPT)
        .ok_or_else(|| ApiError::BadRequest("the Durin-Attempt header is missing".into()))?
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
        .filter(|a| *a > 0)
        .ok_or_else(|| {
            ApiError::BadRequest("the Durin-Attempt header must be a positive integer".into())
        })
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
    let attempt = attempt_header(&headers)?;
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(ApiError::BadRequest(format!(
            "step names must be 1 to {MAX_NAME_BYTES} bytes"
        )));
    }
    let value: Value = if body.is_empty() {
        Value::Null
    } else {
        parse_json("the step value", &body)?
    };
    let (value, replayed) = state
        .store
        .record_step(
            &id,
            attempt,
            name,
            serde_json::to_vec(&value).unwrap_or_default(),
            state.clock.now_ms(),
        )
        .await?;
    let value = json_value(Some(&value));
    let mut response = Json(value).into_response();
    response.headers_mut().insert(
        HEADER_REPLAYED,
        HeaderValue::from_static(if replayed { "true" } else { "false" }),
    );
    Ok(response)
}
