//! Admin: deployments, invocation status and journals, resume, health.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::ingress::{prefer_wait, with_preference};
use super::views::{DeploymentView, EntryView, InvocationView, JournalView};
use super::{
    find_invocation, load_ended, parse_invocation_id, parse_json, wait_for_end, ApiBody, ApiPath,
    ApiQuery, AppState,
};
use crate::problem::ApiError;
use crate::registry;
use crate::store::{InvocationFilter, Status};

/// Lets a request through only with `Authorization: Bearer {token}` (compared in constant
/// time); otherwise a `401` problem.
pub async fn require_token(
    token: std::sync::Arc<String>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let presented = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if crate::http::same_secret(presented, &token) {
        next.run(request).await
    } else {
        ApiError::Unauthorized.into_response()
    }
}

/// `GET /v1/signing-key`: the public key with which handlers check Durin's signature.
pub async fn signing_key(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({
        "algorithm": "ed25519",
        "public_key": state.signer.public_key(),
        "jwk": state.signer.public_jwk(),
    }))
}

/// `GET /health`: 200 when the server is up and its database answers.
pub async fn health(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    state.store.ping().await?;
    Ok(Json(json!({"status": "ok"})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterRequest {
    url: String,
    /// Declared inline: a plain HTTP deployment, not asked for `/discover`.
    services: Option<Vec<durin_protocol::ServiceSpec>>,
    /// Replay recent journals of its handlers against it first, and refuse it when one
    /// diverges: `true`, or `{"sample": N}` invocations per handler.
    verify: Option<Verify>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Verify {
    On(bool),
    With(VerifyOptions),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyOptions {
    #[serde(default = "default_sample")]
    sample: u32,
    #[serde(default)]
    on_divergence: OnDivergence,
}

fn default_sample() -> u32 {
    crate::replay::verify::DEFAULT_SAMPLE
}

/// What a verification that found a divergence does with the deployment.
#[derive(Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum OnDivergence {
    /// Registers nothing: 409 with the report.
    #[default]
    Refuse,
    /// Registers it inactive: no new invocation goes to it until it is activated; runs
    /// can be resumed onto it by hand.
    Inactive,
}

impl Verify {
    /// Invocations per handler to replay, and what a divergence does, if it verifies.
    fn options(&self) -> Option<(u32, OnDivergence)> {
        match self {
            Verify::On(false) => None,
            Verify::On(true) => Some((default_sample(), OnDivergence::Refuse)),
            Verify::With(options) => Some((options.sample, options.on_divergence)),
        }
    }
}

/// `POST /v1/deployments {"url", "services"?}`: records a deployment, discovering its
/// services unless they are declared inline. 201 when new, 200 when the same deployment
/// was already registered.
pub async fn register_deployment(
    State(state): State<AppState>,
    ApiBody(body): ApiBody,
) -> Result<Response, ApiError> {
    let request: RegisterRequest = parse_json("the deployment", &body)?;
    let described = registry::describe(&state.http, &request.url, request.services).await?;
    let (verification, active) = match request.verify.as_ref().and_then(Verify::options) {
        Some((sample, on_divergence)) => {
            let (report, diverged) = verify(&state, &described, sample, on_divergence).await?;
            (Some(report), !diverged)
        }
        None => (None, true),
    };
    let (deployment, created) = registry::record(
        &*state.store,
        &state.targets,
        &*state.clock,
        described,
        active,
    )
    .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut view = serde_json::to_value(DeploymentView::from(deployment))
        .map_err(|e| ApiError::Storage(e.to_string()))?;
    if let (Some(report), Some(view)) = (verification, view.as_object_mut()) {
        view.insert("verification".into(), report);
    }
    Ok((status, Json(view)).into_response())
}

/// Replays up to `sample` recent journals of each handler the described deployment serves
/// against it; the report and whether one diverged, or the refusal when one diverged and
/// `on_divergence` refuses.
async fn verify(
    state: &AppState,
    (url, protocol, services): &(
        String,
        crate::store::HandlerProtocol,
        Vec<durin_protocol::ServiceSpec>,
    ),
    sample: u32,
    on_divergence: OnDivergence,
) -> Result<(serde_json::Value, bool), ApiError> {
    let candidate = crate::replay::Candidate {
        deployment_id: String::new(),
        url: url.clone(),
        protocol: *protocol,
        services: services.clone(),
    };
    let histories = crate::replay::verify::sample(&*state.store, &candidate, sample).await?;
    let report =
        crate::replay::replay_all(&state.engine, &state.replays, &candidate, &histories).await;
    let value = serde_json::to_value(&report).map_err(|e| ApiError::Storage(e.to_string()))?;
    // A run it could not replay (its code failed on it, or cannot replay at all) proves
    // nothing either.
    let unproven = report.diverged + report.failed;
    if unproven > 0 && on_divergence == OnDivergence::Refuse {
        return Err(ApiError::DeploymentDiverged {
            detail: format!(
                "of the {} recorded runs replayed on the deployment at {url}, {} diverge and {} could not be replayed: it was not registered, and runs keep the deployments they run on (the report says where each diverged or why it failed)",
                report.histories.len(),
                report.diverged,
                report.failed
            ),
            report: value,
        });
    }
    Ok((value, unproven > 0))
}

/// `POST /v1/deployments/{id}/activate`: new invocations of its handlers may go to it
/// (the newest active deployment that serves a handler gets them). Answers the deployment.
pub async fn activate_deployment(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let deployment = state
        .store
        .activate_deployment(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("deployment {id} not found")))?;
    state.targets.forget_latest();
    Ok(Json(DeploymentView::from(deployment)).into_response())
}

pub async fn list_deployments(
    State(state): State<AppState>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let deployments: Vec<DeploymentView> = state
        .store
        .list_deployments()
        .await?
        .into_iter()
        .map(DeploymentView::from)
        .collect();
    Ok(Json(json!({ "deployments": deployments })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    status: Option<String>,
    limit: Option<u32>,
    service: Option<String>,
    handler: Option<String>,
    deployment_id: Option<String>,
    /// Only runs of workflows.
    #[serde(default)]
    workflows_only: bool,
}

/// `GET /v1/invocations?status=&service=&handler=&deployment_id=&workflows_only=&limit=`:
/// newest first.
pub async fn list_invocations(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let status = query
        .status
        .map(|s| {
            Status::parse(&s).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "unknown status {s:?}; use pending, running, suspended, backing-off, paused, completed, failed or cancelled"
                ))
            })
        })
        .transpose()?;
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    let invocations: Vec<InvocationView> = state
        .store
        .list_invocations(
            InvocationFilter {
                service: query.service,
                handler: query.handler,
                status,
                deployment_id: query.deployment_id,
                created_before_ms: None,
                workflows_only: query.workflows_only,
            },
            limit,
        )
        .await?
        .iter()
        .map(|r| InvocationView::new(r, None).warned(&state.journal_limits))
        .collect();
    Ok(Json(json!({ "invocations": invocations })))
}

/// `GET /ui`: the web UI, one page embedded in the binary (no CDN, works offline), which
/// reads and acts through this admin API.
pub async fn ui() -> Response {
    (
        [
            (axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Its own script and style only; nothing is fetched from elsewhere.
            (
                axum::http::header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
            ),
        ],
        include_str!("ui/index.html"),
    )
        .into_response()
}

/// `GET /metrics`: Prometheus' text format, with the invocations that have not ended by
/// status.
pub async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let counts = state.store.count_unfinished().await?;
    let waiting = state.store.count_waiting().await?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::telemetry::render(&counts, &waiting, state.engine.waiters().count()),
    )
        .into_response())
}

/// `GET /v1/invocations/{id}`; with `Prefer: wait=N` it long-polls and answers 202 when
/// the invocation is still not finished after N seconds.
pub async fn get_invocation(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = parse_invocation_id(&id)?;
    let wait = prefer_wait(&headers);
    let ended = match wait {
        Some(wait) => wait_for_end(&state, &id, wait, false, None).await?,
        None => load_ended(&state, find_invocation(&state, &id).await?).await?,
    };
    let status = if wait.is_some() && !ended.record.status.is_final() {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    let view = InvocationView::new(&ended.record, ended.output.as_ref())
        .warned(&state.journal_limits)
        .with_unconsumed(&ended.record, &*state.store)
        .await?;
    Ok(with_preference((status, Json(view)).into_response(), wait))
}

pub async fn get_journal(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<JournalView>, ApiError> {
    let id = parse_invocation_id(&id)?;
    let record = find_invocation(&state, &id).await?;
    let entries = state.store.read_journal(&id).await?;
    Ok(Json(JournalView {
        invocation_id: id.to_string(),
        status: record.status.as_str(),
        entries: entries.into_iter().map(EntryView::from).collect(),
    }))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ResumeRequest {
    deployment_id: Option<String>,
}

/// `POST /v1/invocations/{id}/resume`: a paused invocation runs again, optionally on another
/// deployment (for example one with a fixed handler).
pub async fn resume(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiBody(body): ApiBody,
) -> Result<Json<InvocationView>, ApiError> {
    let id = parse_invocation_id(&id)?;
    let request: ResumeRequest = if body.is_empty() {
        ResumeRequest::default()
    } else {
        parse_json("the resume request", &body)?
    };
    let record = find_invocation(&state, &id).await?;
    if let Some(deployment_id) = &request.deployment_id {
        state
            .store
            .deployment_handler(deployment_id, &record.service, &record.handler)
            .await?
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "deployment {deployment_id} does not serve {}/{}",
                    record.service, record.handler
                ))
            })?;
    }
    // The store makes it due; the scheduler runs it (a nudge only makes that sooner).
    let resumed = state
        .store
        .resume(&id, request.deployment_id, state.clock.now_ms())
        .await?;
    if resumed.is_some() {
        state.engine.nudge();
    }
    let resumed = resumed.ok_or_else(|| {
        ApiError::Conflict(format!(
            "invocation {id} is {}, only a paused invocation can be resumed",
            record.status
        ))
    })?;
    Ok(Json(
        InvocationView::new(&resumed, None).warned(&state.journal_limits),
    ))
}
