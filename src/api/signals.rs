//! Signals: `POST /v1/workflows/{workflow}/{id}/signals/{name}` and
//! `POST /v1/invocations/{id}/signals/{name}` with a JSON payload.
//!
//! Answered 202 once the signal is durable. A signal no one waits for yet is buffered;
//! signals of one name reach the handler's waits in order, each once. A retry with the
//! same `Idempotency-Key` delivers nothing twice.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::workflows::find_run;
use super::{
    find_invocation, idempotency_key, json_body, parse_invocation_id, ApiBody, ApiPath, AppState,
};
use crate::ids::{parse_name, InvocationId};
use crate::problem::ApiError;
use crate::store::NewSignal;

pub async fn to_workflow(
    State(state): State<AppState>,
    ApiPath((workflow, id, name)): ApiPath<(String, String, String)>,
    headers: HeaderMap,
    ApiBody(body): ApiBody,
) -> Result<Response, ApiError> {
    let run = find_run(&state, &workflow, &id).await?;
    send(&state, &run.id, &name, &headers, &body).await
}

pub async fn to_invocation(
    State(state): State<AppState>,
    ApiPath((id, name)): ApiPath<(String, String)>,
    headers: HeaderMap,
    ApiBody(body): ApiBody,
) -> Result<Response, ApiError> {
    let id = parse_invocation_id(&id)?;
    find_invocation(&state, &id).await?;
    send(&state, &id, &name, &headers, &body).await
}

async fn send(
    state: &AppState,
    id: &InvocationId,
    name: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    let name = parse_name("signal", name).map_err(ApiError::BadRequest)?;
    let payload = json_body("the signal payload", body)?;
    let signal = NewSignal {
        name: name.clone(),
        value: serde_json::to_vec(&payload).unwrap_or_default(),
        idempotency_key: idempotency_key(headers)?,
    };
    let sent = state
        .store
        .send_signal(id, signal, state.clock.now_ms())
        .await?;
    if sent.woke {
        state.engine.nudge();
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "invocation_id": id.as_str(),
            "signal": name,
            "seq": sent.seq,
            "duplicate": sent.duplicate,
        })),
    )
        .into_response())
}
