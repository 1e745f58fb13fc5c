//! Schedules on the admin listener: `PUT /v1/schedules/{id}` sets one, `GET` lists and
//! shows them (with the next fire times and the recent fires), `DELETE` removes one, and
//! `pause`, `unpause`, `trigger` and `backfill` act on one. The rules are
//! `crate::schedules`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::{parse_json, ApiBody, ApiPath, AppState};
use crate::problem::ApiError;
use crate::schedules::rule::Op;
use crate::schedules::spec::parse_time;
use crate::schedules::{Overlap, ScheduleError, ScheduleSpec, Source};

impl From<ScheduleError> for ApiError {
    fn from(e: ScheduleError) -> ApiError {
        match e {
            ScheduleError::NotFound(_) | ScheduleError::NoDeployment(_) => {
                ApiError::NotFound(e.to_string())
            }
            ScheduleError::Invalid(detail) => ApiError::BadRequest(detail),
            ScheduleError::Managed(_) => ApiError::Conflict(e.to_string()),
            ScheduleError::Store(e) => e.into(),
        }
    }
}

/// A body that may be empty (`{}` then).
fn optional_json<T: for<'de> Deserialize<'de> + Default>(
    what: &str,
    body: &[u8],
) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        Ok(T::default())
    } else {
        parse_json(what, body)
    }
}

/// `GET /v1/schedules`.
pub async fn list(State(state): State<AppState>) -> Result<Response, ApiError> {
    let schedules = state.schedules.list().await?;
    Ok(Json(json!({ "schedules": schedules })).into_response())
}

/// `GET /v1/schedules/{id}`.
pub async fn get(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    Ok(Json(state.schedules.get(&id).await?).into_response())
}

/// `PUT /v1/schedules/{id}`: creates (201) or replaces (200) the schedule.
pub async fn put(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiBody(body): ApiBody,
) -> Result<Response, ApiError> {
    let spec: ScheduleSpec = parse_json("the schedule", &body)?;
    let (view, created) = state.schedules.set(&id, spec, Source::Api).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view)).into_response())
}

/// `DELETE /v1/schedules/{id}`: the runs it started go on.
pub async fn delete(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    state.schedules.delete(&id, Source::Api).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PauseRequest {
    note: Option<String>,
}

/// `POST /v1/schedules/{id}/pause` `{"note"}`.
pub async fn pause(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiBody(body): ApiBody,
) -> Result<Response, ApiError> {
    let request: PauseRequest = optional_json("the pause request", &body)?;
    Ok(Json(state.schedules.pause(&id, true, request.note).await?).into_response())
}

/// `POST /v1/schedules/{id}/unpause` `{"note"}`: fires from now on.
pub async fn unpause(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiBody(body): ApiBody,
) -> Result<Response, ApiError> {
    let request: PauseRequest = optional_json("the unpause request", &body)?;
    Ok(Json(state.schedules.pause(&id, false, request.note).await?).into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TriggerRequest {
    /// The schedule's own policy unless given.
    overlap: Option<Overlap>,
}

/// `POST /v1/schedules/{id}/trigger` `{"overlap"}`: one fire now.
pub async fn trigger(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiBody(body): ApiBody,
) -> Result<Response, ApiError> {
    let request: TriggerRequest = optional_json("the trigger request", &body)?;
    let overlap = match request.overlap {
        Some(overlap) => overlap,
        None => state.schedules.get(&id).await?.spec.overlap,
    };
    let (fires, schedule) = state.schedules.fire(&id, Op::Trigger { overlap }).await?;
    Ok(Json(json!({ "fires": fires, "schedule": schedule })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackfillRequest {
    from: String,
    to: String,
    /// `allow_all` unless given: a backfill starts every fire of the range.
    overlap: Option<Overlap>,
}

/// The most fires one backfill starts.
const MAX_BACKFILL: usize = crate::schedules::fires::MAX_FIRES_PER_LOOK;

/// `POST /v1/schedules/{id}/backfill` `{"from", "to", "overlap"}`: every fire of a past
/// range, each under its own workflow id (a fire that ran already is not run again).
pub async fn backfill(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiBody(body): ApiBody,
) -> Result<Response, ApiError> {
    let schedule = state.schedules.get(&id).await?;
    let request: BackfillRequest = parse_json("the backfill request", &body)?;
    let from_ms = parse_time("from", &request.from).map_err(ApiError::BadRequest)?;
    let to_ms = parse_time("to", &request.to).map_err(ApiError::BadRequest)?;
    let now_ms = state.clock.now_ms();
    if from_ms > to_ms {
        return Err(ApiError::BadRequest("from is after to".into()));
    }
    if to_ms > now_ms {
        return Err(ApiError::BadRequest(
            "to is in the future: a backfill starts past fires (trigger starts one now)".into(),
        ));
    }
    let timing = schedule.spec.check().map_err(ApiError::BadRequest)?;
    let count = {
        let mut count = 0;
        let mut at = from_ms - 1;
        while let Some(next) = timing.next_after(at).filter(|next| *next <= to_ms) {
            count += 1;
            if count > MAX_BACKFILL {
                return Err(ApiError::BadRequest(format!(
                    "the range holds more than {MAX_BACKFILL} fires; backfill it in parts"
                )));
            }
            at = next;
        }
        count
    };
    if count == 0 {
        return Err(ApiError::BadRequest(
            "the schedule has no fire in that range".into(),
        ));
    }
    let op = Op::Backfill {
        from_ms,
        to_ms,
        overlap: request.overlap.unwrap_or(Overlap::AllowAll),
    };
    let (fires, schedule) = state.schedules.fire(&id, op).await?;
    Ok(Json(json!({ "fires": fires, "schedule": schedule })).into_response())
}
