//! `GET /v1/services/{service}/keys/{key}`: who holds a key of a keyed handler, who waits
//! for it, in the order they will run, and the key's durable state.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::views::{timestamp, InvocationView};
use super::{ApiPath, AppState};
use crate::ids::parse_name;
use crate::problem::ApiError;
use crate::store::Status;

/// The most invocations of one key an answer lists.
const MAX_LISTED: u32 = 1000;

pub async fn show(
    State(state): State<AppState>,
    ApiPath((service, key)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    let service = parse_name("service", &service).map_err(ApiError::BadRequest)?;
    if key.is_empty() || key.len() > durin_protocol::MAX_KEY_BYTES {
        return Err(ApiError::BadRequest(format!(
            "a key has 1 to {} bytes, not {}",
            durin_protocol::MAX_KEY_BYTES,
            key.len()
        )));
    }
    let records = state
        .store
        .key_invocations(&service, &key, MAX_LISTED + 1)
        .await?;
    let truncated = records.len() > MAX_LISTED as usize;
    let records = &records[..records.len().min(MAX_LISTED as usize)];
    // Shared (read-only) invocations neither hold the key nor wait for it.
    let records: Vec<_> = records
        .iter()
        .filter(|r| r.key.as_ref().is_some_and(|k| !k.shared))
        .collect();
    let limit = records.iter().find_map(|r| r.key.as_ref().map(|k| k.limit));
    let key_state: serde_json::Map<String, serde_json::Value> = state
        .store
        .key_state(&service, &key)
        .await?
        .into_iter()
        .map(|(name, value)| {
            let value = serde_json::from_slice(&value).unwrap_or(serde_json::Value::Null);
            (name, value)
        })
        .collect();
    let (queued, holders): (Vec<_>, Vec<_>) = records
        .into_iter()
        .partition(|r| r.status == Status::Queued);
    let running: Vec<InvocationView> = holders
        .iter()
        .map(|r| InvocationView::new(r, None).warned(&state.journal_limits))
        .collect();
    let queued: Vec<serde_json::Value> = queued
        .iter()
        .enumerate()
        .map(|(i, r)| {
            json!({
                "position": i + 1,
                "invocation_id": r.id.as_str(),
                "handler": r.handler,
                "created_at": timestamp(r.created_at_ms),
            })
        })
        .collect();
    Ok(Json(json!({
        "service": service,
        "key": key,
        "limit": limit,
        "running": running,
        "queued": queued,
        "truncated": truncated,
        "state": key_state,
    }))
    .into_response())
}
