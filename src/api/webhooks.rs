//! Webhook ingress (`POST /v1/webhooks/{source}`, main listener) and what operators see of
//! it (admin listener); the sources, their verification and routing are `crate::webhooks`.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::{ApiBody, ApiPath, AppState};
use crate::problem::ApiError;

/// `POST /v1/webhooks/{source}` (main listener).
pub async fn receive(
    State(state): State<AppState>,
    ApiPath(source): ApiPath<String>,
    headers: HeaderMap,
    ApiBody(body): ApiBody,
) -> Result<Response, ApiError> {
    state
        .webhooks
        .deliver(&source, &headers, body, state.clock.now_ms())
        .await
}

/// `GET /v1/webhooks` (admin): the sources and their recent deliveries' counts.
pub async fn list(State(state): State<AppState>) -> Response {
    let sources: Vec<Value> = state
        .webhooks
        .sources()
        .into_iter()
        .map(|source| {
            let deliveries = source.deliveries();
            let count = |outcome: &str| deliveries.iter().filter(|d| d.outcome == outcome).count();
            json!({
                "source": source.name(),
                "url": format!("/v1/webhooks/{}", source.name()),
                "recent": {
                    "accepted": count("accepted"),
                    "duplicate": count("duplicate"),
                    "ignored": count("ignored"),
                    "refused": count("refused"),
                },
            })
        })
        .collect();
    axum::Json(json!({ "sources": sources })).into_response()
}

/// `GET /v1/webhooks/{source}/deliveries` (admin): its recent deliveries, newest first.
pub async fn deliveries(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Response, ApiError> {
    let source = state
        .webhooks
        .source(&name)
        .ok_or_else(|| ApiError::NotFound(format!("no webhook source is named {name:?}")))?;
    Ok((
        StatusCode::OK,
        axum::Json(json!({ "source": name, "deliveries": source.deliveries() })),
    )
        .into_response())
}
