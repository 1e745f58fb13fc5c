//! Webhook ingress (`POST /v1/webhooks/{source}`, main listener) and the sources on the
//! admin listener: `PUT /v1/webhooks/{source}` sets one, `GET` lists and shows them (never
//! their secrets) with their recent deliveries, `DELETE` removes one. The sources, their
//! verification and routing are `crate::webhooks`.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::{parse_json, ApiBody, ApiPath, AppState};
use crate::problem::ApiError;
use crate::store::WebhookSourceRow;
use crate::webhooks::{Delivery, Origin, SourceConfig, WebhookError, KEPT_DELIVERIES};

impl From<WebhookError> for ApiError {
    fn from(e: WebhookError) -> ApiError {
        match e {
            WebhookError::NotFound(_) => ApiError::NotFound(e.to_string()),
            WebhookError::Invalid(detail) => ApiError::BadRequest(detail),
            WebhookError::Managed(_) => ApiError::Conflict(e.to_string()),
            WebhookError::Store(e) => e.into(),
        }
    }
}

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

/// A source as operators see it: its declaration with its secrets counted, not shown,
/// and its recent deliveries' outcomes.
fn view(row: &WebhookSourceRow, deliveries: &[Delivery]) -> Value {
    let mut declared: Value = serde_json::from_str::<SourceConfig>(&row.config)
        .ok()
        .and_then(|config| serde_json::to_value(config).ok())
        .unwrap_or(Value::Null);
    if let Some(declared) = declared.as_object_mut() {
        let secrets = declared
            .remove("secrets")
            .and_then(|s| s.as_array().map(Vec::len))
            .unwrap_or(0);
        declared.insert("secrets".into(), json!(secrets));
    }
    let count = |outcome: &str| deliveries.iter().filter(|d| d.outcome == outcome).count();
    json!({
        "source": row.name,
        "url": format!("/v1/webhooks/{}", row.name),
        "origin": row.origin,
        "declared": declared,
        "created_at": crate::schedules::spec::rfc3339(row.created_at_ms),
        "updated_at": crate::schedules::spec::rfc3339(row.updated_at_ms),
        "recent": {
            "accepted": count("accepted"),
            "duplicate": count("duplicate"),
            "ignored": count("ignored"),
            "refused": count("refused"),
        },
    })
}

/// `GET /v1/webhooks` (admin): the sources and their recent deliveries' counts.
pub async fn list(State(state): State<AppState>) -> Result<Response, ApiError> {
    let mut sources = Vec::new();
    for row in state.webhooks.sources().await? {
        let deliveries = state
            .webhooks
            .deliveries(&row.name, KEPT_DELIVERIES)
            .await?;
        sources.push(view(&row, &deliveries));
    }
    Ok(axum::Json(json!({ "sources": sources })).into_response())
}

/// `GET /v1/webhooks/{source}` (admin).
pub async fn get(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Response, ApiError> {
    let row = state.webhooks.source(&name).await?;
    let deliveries = state.webhooks.deliveries(&name, KEPT_DELIVERIES).await?;
    Ok(axum::Json(view(&row, &deliveries)).into_response())
}

/// `PUT /v1/webhooks/{source}` (admin): creates (201) or replaces (200) the source.
pub async fn put(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiBody(body): ApiBody,
) -> Result<Response, ApiError> {
    let config: SourceConfig = parse_json("the webhook source", &body)?;
    let created = state
        .webhooks
        .set(&name, config, Origin::Api, state.clock.now_ms())
        .await?;
    let row = state.webhooks.source(&name).await?;
    let deliveries = state.webhooks.deliveries(&name, KEPT_DELIVERIES).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(view(&row, &deliveries))).into_response())
}

/// `DELETE /v1/webhooks/{source}` (admin): its deliveries go with it; the work they
/// started goes on.
pub async fn delete(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Response, ApiError> {
    state.webhooks.delete(&name, Origin::Api).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /v1/webhooks/{source}/deliveries` (admin): its recent deliveries, newest first.
pub async fn deliveries(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Response, ApiError> {
    state.webhooks.source(&name).await?;
    let deliveries = state.webhooks.deliveries(&name, KEPT_DELIVERIES).await?;
    Ok((
        StatusCode::OK,
        axum::Json(json!({ "source": name, "deliveries": deliveries })),
    )
        .into_response())
}
