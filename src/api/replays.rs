//! Histories and replays, on the admin listener: an invocation's or a workflow's history
//! as JSON Lines, and the replay of histories against a deployment with no side effect.

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::{parse_invocation_id, ApiBody, ApiPath, ApiQuery, AppState};
use crate::ids::InvocationId;
use crate::problem::ApiError;
use crate::registry;
use crate::replay::{replay_all, Candidate, History};
use crate::store::StoredEntry;
use durin_protocol::EntryKind;

/// The media type of a history file.
pub const HISTORY_CONTENT_TYPE: &str = "application/jsonl";

fn jsonl(text: String) -> Response {
    let mut response = text.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(HISTORY_CONTENT_TYPE),
    );
    response
}

/// `GET /v1/invocations/{id}/history`: the invocation's journal as a history file.
pub async fn invocation_history(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let id = parse_invocation_id(&id)?;
    let record = super::find_invocation(&state, &id).await?;
    let entries = with_awakeables(&state, &id, state.store.read_journal(&id).await?);
    Ok(jsonl(History::of(&record, entries).to_jsonl()))
}

/// `GET /v1/workflows/{workflow}/{id}/history`: every run of the workflow id, oldest first,
/// one history each, in one file.
pub async fn workflow_history(
    State(state): State<AppState>,
    ApiPath((workflow, workflow_id)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    // The latest run, checking the names; then all of them.
    super::workflows::find_run(&state, &workflow, &workflow_id).await?;
    let runs = state.store.workflow_runs(&workflow, &workflow_id).await?;
    if runs.is_empty() {
        return Err(ApiError::NotFound(format!(
            "workflow {workflow} has no run with id {workflow_id:?}"
        )));
    }
    let mut text = String::new();
    for run in runs {
        let entries = with_awakeables(&state, &run.id, state.store.read_journal(&run.id).await?);
        text.push_str(&History::of(&run, entries).to_jsonl());
    }
    Ok(jsonl(text))
}

/// The journal with each awakeable's token and URLs as this gateway gave them to the
/// handler (a journal stores none: they derive from the gateway's key, which another
/// Durin replaying the history does not have).
fn with_awakeables(
    state: &AppState,
    id: &InvocationId,
    mut entries: Vec<StoredEntry>,
) -> Vec<StoredEntry> {
    for entry in entries
        .iter_mut()
        .filter(|e| e.kind == EntryKind::Awakeable && e.value.is_none())
    {
        let value = state.engine.awakeable_value(id, entry.index);
        entry.value = serde_json::to_vec(&value).ok();
    }
    entries
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayQuery {
    /// The deployment's URL.
    deployment: String,
}

/// `POST /v1/replays?deployment=URL` with a history file as the body: replays each history
/// against the deployment, with no side effect, and answers the report (`200` whatever
/// the replays found; the report says).
pub async fn replay(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ReplayQuery>,
    ApiBody(body): ApiBody,
) -> Result<Response, ApiError> {
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::BadRequest("the history file is not UTF-8".into()))?;
    let histories = History::parse_all(text)
        .map_err(|e| ApiError::BadRequest(format!("the history file: {e}")))?;
    if histories.is_empty() {
        return Err(ApiError::BadRequest(
            "the history file holds no history (export one with GET /v1/invocations/{id}/history)"
                .into(),
        ));
    }
    let candidate = candidate(&state, &query.deployment).await?;
    let report = replay_all(&state.engine, &state.replays, &candidate, &histories).await;
    Ok(Json(report).into_response())
}

/// The deployment at `url`: the newest one registered there, or else what its `/discover`
/// says (an SDK deployment need not be registered to be replayed against).
async fn candidate(state: &AppState, url: &str) -> Result<Candidate, ApiError> {
    let url = registry::parse_deployment_url(url)?;
    let registered = state
        .store
        .list_deployments()
        .await?
        .into_iter()
        .filter(|d| d.url == url)
        .max_by_key(|d| d.created_at_ms);
    if let Some(deployment) = registered {
        return Ok(Candidate {
            deployment_id: deployment.id,
            url: deployment.url,
            protocol: deployment.protocol,
            services: deployment.services,
        });
    }
    let (url, protocol, services) = registry::describe(&state.http, &url, None)
        .await
        .map_err(|e| match e {
            ApiError::Deployment { detail, retryable } => ApiError::Deployment {
                detail: format!(
                    "no deployment is registered at {url}, and it cannot be discovered ({detail}); a plain deployment must be registered first"
                ),
                retryable,
            },
            other => other,
        })?;
    Ok(Candidate {
        deployment_id: String::new(),
        url,
        protocol,
        services,
    })
}
