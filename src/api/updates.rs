//! Updates: `POST /v1/workflows/{workflow}/{id}/updates/{name}` sends a synchronous,
//! validated mutation to a workflow's run and answers its result.
//!
//! The update is stored pending and the run is made due; at its next wait the run's SDK
//! validates it. Refused, nothing is journaled and the caller gets the validator's `4xx`.
//! Accepted, an `update` entry is journaled, the update's handler runs (on every replay,
//! at the same place) and its result, journaled as `update_result`, goes back to the
//! caller. The same `Idempotency-Key` names the same update: it is handled once and
//! answered again. `GET .../updates/{name}/{update_id}` reads (or waits for) one.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::ingress::{prefer_wait, with_preference};
use super::workflows::find_run;
use super::{idempotency_key, json_body, ApiBody, ApiPath, AppState};
use crate::ids::parse_name;
use crate::problem::ApiError;
use crate::store::{
    HandlerProtocol, InvocationRecord, NewUpdate, UpdateRecord, UpdateSent, UpdateStatus,
};

/// `POST /v1/workflows/{workflow}/{id}/updates/{name}`.
pub async fn send(
    State(state): State<AppState>,
    ApiPath((workflow, id, name)): ApiPath<(String, String, String)>,
    headers: HeaderMap,
    ApiBody(body): ApiBody,
) -> Result<Response, ApiError> {
    let name = parse_name("update", &name).map_err(ApiError::BadRequest)?;
    let input = json_body("the update's input", &body)?;
    let key = idempotency_key(&headers)?;
    let run = find_run(&state, &workflow, &id).await?;
    let target = state
        .targets
        .pinned(
            &*state.store,
            &run.deployment_id,
            &run.service,
            &run.handler,
        )
        .await?;
    // An SDK validates and runs updates at its waits from protocol 3 on; a plain handler
    // takes them at its update waits (`first` with an `update` member).
    let plain = match target.map(|t| t.protocol) {
        Some(HandlerProtocol::Plain) => true,
        Some(HandlerProtocol::Sdk { version }) if version >= 3 => false,
        _ => {
            return Err(ApiError::InvocationState {
                detail: format!(
                    "run {} of workflow {workflow} is on a deployment that does not handle updates (an SDK speaking protocol 3 does, and a plain handler); signal it instead",
                    run.id
                ),
                invocation_id: run.id.to_string(),
            })
        }
    };
    let update = NewUpdate {
        id: format!("upd_{}", uuid::Uuid::now_v7().simple()),
        name,
        input: serde_json::to_vec(&input).unwrap_or_default(),
        idempotency_key: key,
        plain,
    };
    let sent = state
        .store
        .send_update(&run.id, update, state.clock.now_ms())
        .await?;
    let (update, new) = match sent {
        UpdateSent::Sent { update, new, woke } => {
            if woke {
                state.engine.nudge();
            }
            (update, new)
        }
        UpdateSent::Ended(record) => return Err(ended(&record)),
    };
    // The update is the run's that took it: the one found above, or the next, when that one
    // continued as new meanwhile.
    let wait = prefer_wait(&headers).unwrap_or(state.call_wait);
    let update = wait_for(&state, update, wait).await?;
    let mut response = answer(&workflow, &id, &update)?;
    if !new {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(with_preference(response, prefer_wait(&headers)))
}

/// `GET /v1/workflows/{workflow}/{id}/updates/{name}/{update_id}` (`Prefer: wait=N`
/// waits).
pub async fn get(
    State(state): State<AppState>,
    ApiPath((workflow, id, name, update_id)): ApiPath<(String, String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    // The workflow id names a run still (a 404 that says how to start one otherwise); the
    // update is that of whichever of its runs took it, which may have continued as new since.
    find_run(&state, &workflow, &id).await?;
    let update = state
        .store
        .find_workflow_update(&workflow, &id, &update_id)
        .await?
        .filter(|u| u.name == name)
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "no run of workflow {workflow} with id {id:?} has an update {update_id:?} named {name:?}"
            ))
        })?;
    let wait = prefer_wait(&headers);
    let update = match wait {
        Some(wait) => wait_for(&state, update, wait).await?,
        None => update,
    };
    Ok(with_preference(answer(&workflow, &id, &update)?, wait))
}

/// Waits up to `wait` for the update to be refused, done or abandoned, on the run that
/// took it.
async fn wait_for(
    state: &AppState,
    update: UpdateRecord,
    wait: Duration,
) -> Result<UpdateRecord, ApiError> {
    if update.status.is_final() {
        return Ok(update);
    }
    let run = update.invocation_id.clone();
    let listening = Listening {
        watch: state.engine.updates(),
        run: &run,
    };
    let mut listener = listening.watch.listen(&run);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        // Read after listening: a change in between is not missed.
        let update = state
            .store
            .get_update(&run, &update.id)
            .await?
            .unwrap_or_else(|| update.clone());
        if update.status.is_final() {
            return Ok(update);
        }
        tokio::select! {
            changed = listener.changed() => {
                if changed.is_err() {
                    return Ok(update);
                }
            }
            _ = tokio::time::sleep_until(deadline) => return Ok(update),
            _ = state.stopping.cancelled() => {
                return Err(ApiError::ShuttingDown(format!(
                    "Durin is restarting; the update goes on, read it with GET .../updates/{}/{}",
                    update.name, update.id
                )));
            }
        }
    }
}

/// Forgets the run's watch when its last listener leaves.
struct Listening<'a> {
    watch: &'a crate::engine::UpdateWatch,
    run: &'a crate::ids::InvocationId,
}

impl Drop for Listening<'_> {
    fn drop(&mut self) {
        self.watch.release(self.run);
    }
}

/// The caller's answer for an update as it stands.
fn answer(workflow: &str, workflow_id: &str, update: &UpdateRecord) -> Result<Response, ApiError> {
    let run = &update.invocation_id;
    let location = format!(
        "/v1/workflows/{workflow}/{workflow_id}/updates/{}/{}",
        update.name, update.id
    );
    let mut response = match update.status {
        UpdateStatus::Done if update.failure.is_none() => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            update.result.clone().unwrap_or_else(|| b"null".to_vec()),
        )
            .into_response(),
        UpdateStatus::Done | UpdateStatus::Refused => {
            let failure = update.failure.clone().unwrap_or(durin_protocol::Failure {
                status: 400,
                error_type: None,
                message: "refused".into(),
            });
            return Err(ApiError::Update {
                refused: update.status == UpdateStatus::Refused,
                status: failure.status,
                error_type: failure.error_type,
                message: failure.message,
                update_id: update.id.clone(),
            });
        }
        UpdateStatus::Abandoned => {
            return Err(ApiError::InvocationState {
                detail: format!("run {run} ended before it handled the update; nothing was done"),
                invocation_id: run.to_string(),
            })
        }
        UpdateStatus::Pending | UpdateStatus::Accepted => (
            StatusCode::ACCEPTED,
            Json(json!({
                "update_id": update.id,
                "invocation_id": run.as_str(),
                "status": update.status.as_str(),
                "location": location,
            })),
        )
            .into_response(),
    };
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    if let Ok(value) = HeaderValue::from_str(&update.id) {
        response.headers_mut().insert("durin-update-id", value);
    }
    Ok(response)
}

fn ended(run: &InvocationRecord) -> ApiError {
    ApiError::InvocationState {
        detail: format!(
            "run {} has ended ({}) before it handled the update; nothing was done",
            run.id, run.status
        ),
        invocation_id: run.id.to_string(),
    }
}
