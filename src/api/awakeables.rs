//! Awakeables: `POST /v1/awakeables/{token}/resolve` (a JSON value) and `/reject`
//! (`{"message", "status"?}`) complete a handler's wait from outside. The token names its
//! invocation and journal entry and carries a MAC of this gateway, so it cannot be made
//! from an invocation id. Completing twice answers the first result and changes nothing.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use durin_protocol::Failure;
use serde::Deserialize;
use serde_json::json;

use super::{json_body, parse_json, ApiBody, ApiPath, AppState};
use crate::http::json_value;
use crate::problem::ApiError;
use crate::store::StoreError;

pub async fn resolve(
    State(state): State<AppState>,
    ApiPath(token): ApiPath<String>,
    ApiBody(body): ApiBody,
) -> Result<Response, ApiError> {
    let value = json_body("the awakeable's value", &body)?;
    complete(
        &state,
        &token,
        Ok(serde_json::to_vec(&value).unwrap_or_default()),
    )
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rejection {
    message: String,
    status: Option<u16>,
    #[serde(rename = "type")]
    error_type: Option<String>,
}

pub async fn reject(
    State(state): State<AppState>,
    ApiPath(token): ApiPath<String>,
    ApiBody(body): ApiBody,
) -> Result<Response, ApiError> {
    let rejection: Rejection = parse_json("the rejection", &body)?;
    let failure = Failure {
        status: rejection
            .status
            .filter(|s| (400..600).contains(s))
            .unwrap_or(500),
        error_type: rejection.error_type,
        message: rejection.message,
    };
    complete(&state, &token, Err(failure)).await
}

async fn complete(
    state: &AppState,
    token: &str,
    result: Result<Vec<u8>, Failure>,
) -> Result<Response, ApiError> {
    let (id, index) = state.awakeables.verify(token).map_err(ApiError::NotFound)?;
    let resolved = state
        .store
        .resolve_awakeable(&id, index, result, state.clock.now_ms())
        .await
        .map_err(|e| match e {
            // A valid MAC over an entry that is not there cannot happen for a token this
            // gateway issued; say so without telling which part was wrong.
            StoreError::NotFound(_) => {
                ApiError::NotFound(format!("no awakeable for token {token}"))
            }
            other => other.into(),
        })?;
    if resolved.woke {
        state.engine.nudge();
    }
    let completion = &resolved.completion;
    let mut body = json!({
        "invocation_id": id.as_str(),
        "first": resolved.first,
    });
    match &completion.failure {
        Some(failure) => body["failure"] = json!(failure),
        None => body["value"] = json_value(completion.value.as_deref()),
    }
    Ok((StatusCode::OK, Json(body)).into_response())
}
