//! Queries: `GET /v1/workflows/{workflow}/{id}/queries/{name}` (and under
//! `/v1/invocations/{id}`) answer a key of the run's durable state, as its `state`
//! entries left it, while it runs, sleeps or after it ended: without calling the handler
//! and without writing anything.

use axum::extract::State;
use axum::Json;
use serde_json::Value;

use super::workflows::find_run;
use super::{find_invocation, parse_invocation_id, ApiPath, AppState};
use crate::http::json_value;
use crate::ids::InvocationId;
use crate::problem::ApiError;

pub async fn of_workflow(
    State(state): State<AppState>,
    ApiPath((workflow, id, name)): ApiPath<(String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    let run = find_run(&state, &workflow, &id).await?;
    query(&state, &run.id, &name).await
}

pub async fn of_invocation(
    State(state): State<AppState>,
    ApiPath((id, name)): ApiPath<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_invocation_id(&id)?;
    find_invocation(&state, &id).await?;
    query(&state, &id, &name).await
}

async fn query(state: &AppState, id: &InvocationId, name: &str) -> Result<Json<Value>, ApiError> {
    let keys = state.store.read_state(id).await?;
    match keys.iter().find(|(key, _)| key == name) {
        // A cleared key answers null.
        Some((_, value)) => Ok(Json(json_value(value.as_deref()))),
        None => {
            let known: Vec<&str> = keys.iter().map(|(key, _)| key.as_str()).collect();
            Err(ApiError::UnknownQuery {
                detail: format!(
                    "invocation {id} has no state named {name:?}; known: {}",
                    if known.is_empty() {
                        "none yet".to_owned()
                    } else {
                        known.join(", ")
                    }
                ),
                known: known.into_iter().map(str::to_owned).collect(),
            })
        }
    }
}
