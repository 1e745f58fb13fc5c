//! Operator verbs on the admin listener, one invocation at a time and in bulk: pause
//! (resume is in `admin.rs`), retry now (skip the backoff), restart from a journal entry
//! (safe to repeat with an `Idempotency-Key`), purge (delete an ended invocation), and
//! `POST /v1/invocations/bulk/{verb}` for those (but restart), cancel, terminate and resume,
//! over the invocations a filter selects. Each is safe to repeat and says what it did.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::views::InvocationView;
use super::{json_body, parse_invocation_id, ApiBody, ApiPath, AppState};
use crate::ids::InvocationId;
use crate::problem::ApiError;
use crate::store::{CancelAnswer, InvocationFilter, Status, StoreError};

/// The most invocations one bulk request reaches; send it again for the rest.
const BULK_LIMIT: u32 = 1000;

/// `POST /v1/invocations/{id}/pause`: it runs no attempt until resumed (a running attempt
/// is fenced).
pub async fn pause(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_invocation_id(&id)?;
    let (record, paused) = state
        .engine
        .pause(&id, "paused by an operator".into())
        .await?;
    if !paused && record.status != Status::Paused {
        return Err(state_error(&id, record.status, "pause"));
    }
    Ok(Json(answer(&record, "pause", paused, "already-paused")))
}

/// `POST /v1/invocations/{id}/retry-now`: an invocation that backs off runs now.
pub async fn retry_now(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_invocation_id(&id)?;
    let (record, due) = state.engine.retry_now(&id).await?;
    if !due {
        return Err(state_error(
            &id,
            record.status,
            "retry now (it is not backing off)",
        ));
    }
    Ok(Json(answer(&record, "retry", true, "")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RestartRequest {
    /// The last journal entry kept.
    from: u32,
}

/// `POST /v1/invocations/{id}/restart` with `{"from": N}`: a paused or ended invocation
/// keeps its journal up to entry N and runs again, replaying up to there. With an
/// `Idempotency-Key`, safe to repeat: the key of the invocation's last restart changes
/// nothing (`"restart": "already-restarted"`), whatever its status now.
pub async fn restart(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ApiBody(body): ApiBody,
) -> Result<Json<Value>, ApiError> {
    let id = parse_invocation_id(&id)?;
    let key = super::idempotency_key(&headers)?;
    let request: RestartRequest = super::parse_json("the restart request", &body)?;
    match state.engine.restart(&id, request.from, key).await? {
        Ok((record, restarted)) => Ok(Json(answer(
            &record,
            "restart",
            restarted,
            "already-restarted",
        ))),
        Err(why) => Err(ApiError::InvocationState {
            detail: format!("invocation {id} cannot restart: {why}"),
            invocation_id: id.to_string(),
        }),
    }
}

/// `POST /v1/invocations/{id}/purge`: deletes an ended invocation, its journal and
/// everything kept for it, before its retention ends.
pub async fn purge(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_invocation_id(&id)?;
    let record = super::find_invocation(&state, &id).await?;
    if !state.store.purge(&id).await? {
        return Err(state_error(&id, record.status, "purge (it has not ended)"));
    }
    Ok(Json(
        json!({ "invocation_id": id.as_str(), "purge": "purged" }),
    ))
}

/// The filter of a bulk verb.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct BulkFilter {
    service: Option<String>,
    handler: Option<String>,
    status: Option<String>,
    deployment_id: Option<String>,
    /// Only invocations created more than this long ago (`"1h"`, `"7d"`).
    #[serde(default, with = "humantime_serde")]
    older_than: Option<std::time::Duration>,
    /// Only runs of workflows.
    #[serde(default)]
    workflows_only: bool,
}

/// `POST /v1/invocations/bulk/{verb}` with a filter: applies `verb` (`cancel`,
/// `terminate`, `pause`, `resume`, `retry-now`, `purge`) to at most 1,000 of the
/// invocations the filter selects, oldest first; answers how many it selected and how
/// many it changed. Safe to repeat: what is done already is not changed again.
pub async fn bulk(
    State(state): State<AppState>,
    ApiPath(verb): ApiPath<String>,
    ApiBody(body): ApiBody,
) -> Result<Json<Value>, ApiError> {
    let filter: BulkFilter = match json_body("the filter", &body)? {
        Value::Null => BulkFilter::default(),
        value => serde_json::from_value(value)
            .map_err(|e| ApiError::BadRequest(format!("the filter is not valid: {e}")))?,
    };
    let status = filter
        .status
        .as_deref()
        .map(|s| {
            Status::parse(s).ok_or_else(|| ApiError::BadRequest(format!("unknown status {s:?}")))
        })
        .transpose()?;
    let created_before_ms = filter.older_than.map(|age| {
        state
            .clock
            .now_ms()
            .saturating_sub(age.as_millis().min(i64::MAX as u128) as i64)
    });
    if !matches!(
        verb.as_str(),
        "cancel" | "terminate" | "pause" | "resume" | "retry-now" | "purge"
    ) {
        return Err(ApiError::NotFound(format!(
            "no bulk verb {verb:?}: use cancel, terminate, pause, resume, retry-now or purge"
        )));
    }
    let ids = state
        .store
        .select_invocations(
            InvocationFilter {
                service: filter.service,
                handler: filter.handler,
                status,
                deployment_id: filter.deployment_id,
                created_before_ms,
                workflows_only: filter.workflows_only,
            },
            BULK_LIMIT,
        )
        .await?;
    let mut changed = 0u64;
    for id in &ids {
        if apply(&state, &verb, id).await? {
            changed += 1;
        }
    }
    Ok(Json(json!({
        "verb": verb,
        "selected": ids.len(),
        "changed": changed,
        "more": ids.len() as u32 == BULK_LIMIT,
    })))
}

/// Applies one bulk verb; whether it changed the invocation. An invocation the verb does
/// not apply to (already ended, not paused...), or that went meanwhile, is left as it is;
/// a failure of the store stops the request (sending it again finishes the job).
async fn apply(state: &AppState, verb: &str, id: &InvocationId) -> Result<bool, ApiError> {
    let changed = match verb {
        "cancel" => state.engine.cancel(id).await.map(|answer| {
            matches!(
                answer,
                CancelAnswer::Requested(_) | CancelAnswer::Dequeued(_)
            )
        }),
        "terminate" => state
            .engine
            .terminate(id, "terminated by an operator (bulk)".into())
            .await
            .map(|(_, terminated)| terminated),
        "pause" => state
            .engine
            .pause(id, "paused by an operator (bulk)".into())
            .await
            .map(|(_, paused)| paused),
        "resume" => {
            let resumed = state
                .store
                .resume(id, None, state.clock.now_ms())
                .await
                .map(|record| record.is_some());
            if matches!(resumed, Ok(true)) {
                state.engine.nudge();
            }
            resumed
        }
        "retry-now" => state.engine.retry_now(id).await.map(|(_, due)| due),
        _ => state.store.purge(id).await,
    };
    match changed {
        Ok(changed) => Ok(changed),
        Err(StoreError::NotFound(_)) => Ok(false),
        Err(error) => Err(error.into()),
    }
}

fn answer(
    record: &crate::store::InvocationRecord,
    verb: &str,
    changed: bool,
    already: &str,
) -> Value {
    let said = if changed { "done" } else { already };
    json!({
        "invocation_id": record.id.as_str(),
        "status": record.status.as_str(),
        verb: said,
        "invocation": InvocationView::new(record, None),
    })
}

fn state_error(id: &InvocationId, status: Status, what: &str) -> ApiError {
    ApiError::InvocationState {
        detail: format!("invocation {id} is {status}: cannot {what}"),
        invocation_id: id.to_string(),
    }
}
