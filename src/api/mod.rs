//! The HTTP surface: ingress (callers), admin (operators) and context (handlers).
//!
//! Handlers here parse and check the request, call the store or the engine, and shape the
//! answer; they hold no state of their own. Every error leaves through [`ApiError`].

mod admin;
mod auth;
mod awakeables;
mod cancel;
pub(crate) mod context;
mod ingress;
mod keys;
mod operate;
mod queries;
mod replays;
mod schedules;
mod signals;
mod updates;
mod views;
mod webhooks;
mod workflows;

pub use context::StateCursors;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, Uri};
use axum::routing::{get, post, put};
use axum::Router;
use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::clock::Clock;
use crate::engine::{Ended, Engine, Waiters};
use crate::ids::InvocationId;
use crate::problem::ApiError;
use crate::registry::Targets;
use crate::store::{InvocationRecord, Status, Store};

/// Every route of the main listener (callers and handlers), as `(method, path)` in the
/// OpenAPI document's spelling; a test checks that this list, [`ADMIN_ROUTES`], the routers
/// and `openapi/durin.yaml` agree.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/health"),
    ("POST", "/v1/call/{service}/{handler}"),
    ("POST", "/v1/send/{service}/{handler}"),
    ("GET", "/v1/invocations/{id}"),
    ("POST", "/v1/invocations/{id}/signals/{name}"),
    ("GET", "/v1/invocations/{id}/queries/{name}"),
    ("POST", "/v1/invocations/{id}/cancel"),
    ("POST", "/v1/workflows/{workflow}/{id}"),
    ("GET", "/v1/workflows/{workflow}/{id}"),
    ("POST", "/v1/workflows/{workflow}/{id}/cancel"),
    ("GET", "/v1/workflows/{workflow}/{id}/runs"),
    ("POST", "/v1/workflows/{workflow}/{id}/updates/{name}"),
    (
        "GET",
        "/v1/workflows/{workflow}/{id}/updates/{name}/{update_id}",
    ),
    ("POST", "/v1/workflows/{workflow}/{id}/signal-with-start"),
    ("POST", "/v1/workflows/{workflow}/{id}/signals/{name}"),
    ("GET", "/v1/workflows/{workflow}/{id}/queries/{name}"),
    ("POST", "/v1/awakeables/{token}/resolve"),
    ("POST", "/v1/awakeables/{token}/reject"),
    ("POST", "/v1/contexts/{id}/entries"),
    ("POST", "/v1/contexts/{id}/steps/{name}"),
    ("GET", "/v1/contexts/{id}/steps/{name}"),
    ("POST", "/v1/contexts/{id}/first"),
    ("POST", "/v1/contexts/{id}/heartbeat"),
    ("POST", "/v1/contexts/{id}/calls/{name}"),
    ("POST", "/v1/contexts/{id}/continue-as-new"),
    ("POST", "/v1/contexts/{id}/sends/{name}"),
    ("POST", "/v1/contexts/{id}/updates/{update_id}/refuse"),
    ("POST", "/v1/contexts/{id}/updates/{update_id}/result"),
    ("GET", "/v1/contexts/{id}/heartbeat"),
    ("POST", "/v1/contexts/{id}/sleep/{name}"),
    ("POST", "/v1/contexts/{id}/signals/{name}"),
    ("POST", "/v1/contexts/{id}/awakeables/{name}"),
    ("POST", "/v1/contexts/{id}/awakeables/{name}/wait"),
    ("PUT", "/v1/contexts/{id}/state/{key}"),
    ("DELETE", "/v1/contexts/{id}/state/{key}"),
    ("POST", "/v1/webhooks/{source}"),
    ("GET", "/v1/services/{service}/keys/{key}"),
];

/// Every route of the admin listener (operators): what decides where callers' requests go
/// and what reads everyone's journals is never open to whoever reaches the main listener.
pub const ADMIN_ROUTES: &[(&str, &str)] = &[
    ("GET", "/health"),
    ("GET", "/v1/deployments"),
    ("POST", "/v1/deployments"),
    ("GET", "/v1/invocations"),
    ("GET", "/v1/invocations/{id}"),
    ("GET", "/v1/invocations/{id}/journal"),
    ("POST", "/v1/invocations/{id}/resume"),
    ("POST", "/v1/invocations/{id}/cancel"),
    ("POST", "/v1/invocations/{id}/terminate"),
    ("POST", "/v1/workflows/{workflow}/{id}/terminate"),
    ("GET", "/v1/signing-key"),
    ("GET", "/metrics"),
    ("GET", "/ui"),
    ("POST", "/v1/invocations/{id}/pause"),
    ("POST", "/v1/invocations/{id}/retry-now"),
    ("POST", "/v1/invocations/{id}/purge"),
    ("POST", "/v1/invocations/{id}/restart"),
    ("POST", "/v1/invocations/bulk/{verb}"),
    ("GET", "/v1/invocations/{id}/history"),
    ("GET", "/v1/workflows/{workflow}/{id}/history"),
    ("GET", "/v1/workflows/{workflow}/{id}/runs"),
    ("POST", "/v1/replays"),
    ("POST", "/v1/deployments/{id}/activate"),
    ("GET", "/v1/webhooks"),
    ("GET", "/v1/webhooks/{source}"),
    ("PUT", "/v1/webhooks/{source}"),
    ("DELETE", "/v1/webhooks/{source}"),
    ("GET", "/v1/webhooks/{source}/deliveries"),
    ("GET", "/v1/schedules"),
    ("GET", "/v1/schedules/{id}"),
    ("PUT", "/v1/schedules/{id}"),
    ("DELETE", "/v1/schedules/{id}"),
    ("POST", "/v1/schedules/{id}/pause"),
    ("POST", "/v1/schedules/{id}/unpause"),
    ("POST", "/v1/schedules/{id}/trigger"),
    ("POST", "/v1/schedules/{id}/backfill"),
];

/// What every request handler can reach: one shared [`Shared`], so that a clone (axum
/// clones the state for each extractor and layer of every request) is one counter's
/// increment, not one per field.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> AppState {
        AppState(Arc::new(shared))
    }

    fn from_shared(shared: Arc<Shared>) -> AppState {
        AppState(shared)
    }

    fn downgrade(&self) -> std::sync::Weak<Shared> {
        Arc::downgrade(&self.0)
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What [`AppState`] shares.
pub struct Shared {
    pub store: Arc<dyn Store>,
    pub targets: Arc<Targets>,
    pub engine: Arc<Engine>,
    pub clock: Arc<dyn Clock>,
    pub awakeables: crate::journal::awakeable::AwakeableKey,
    /// Signs requests to handlers; its public key is served to operators.
    pub signer: Arc<crate::signing::RequestSigner>,
    /// Per running attempt: how often a plain handler wrote each state key.
    pub state_cursors: Arc<StateCursors>,
    /// Replays under way, whose plain handlers' context calls their recordings answer.
    pub replays: Arc<crate::replay::Replays>,
    /// The webhook sources (the config's and the admin API's).
    pub webhooks: Arc<crate::webhooks::Webhooks>,
    /// Who callers of the main listener are, and what they may do.
    pub auth: Arc<crate::auth::Authenticator>,
    /// Schedules: the admin API's operations on them.
    pub schedules: Arc<crate::schedules::Schedules>,
    pub http: reqwest::Client,
    pub idempotency_retention: Duration,
    /// How long `POST /v1/call` waits for the end before it answers `202` with `Location`.
    pub call_wait: Duration,
    /// How long a journal may grow; views warn from 80 % of it.
    pub journal_limits: crate::store::JournalLimits,
    /// Timeouts of handlers that declare none.
    pub timeouts: crate::lifecycle::timeouts::TimeoutDefaults,
    pub max_body_bytes: usize,
    /// Cancelled when the server stops; long waits end with a 503 then.
    pub stopping: tokio_util::sync::CancellationToken,
}

/// The main listener: callers (ingress, workflows, signals, queries, awakeables) and
/// handlers (the context API).
pub fn router(state: AppState) -> Router {
    let router = Router::new()
        .route("/health", get(admin::health))
        .route("/v1/call/{service}/{handler}", post(ingress::call))
        .route("/v1/send/{service}/{handler}", post(ingress::send))
        .route("/v1/invocations/{id}", get(admin::get_invocation))
        .route(
            "/v1/invocations/{id}/signals/{name}",
            post(signals::to_invocation),
        )
        .route(
            "/v1/invocations/{id}/queries/{name}",
            get(queries::of_invocation),
        )
        .route(
            "/v1/workflows/{workflow}/{id}",
            post(workflows::start).get(workflows::get),
        )
        .route(
            "/v1/invocations/{id}/cancel",
            post(cancel::cancel_invocation),
        )
        .route(
            "/v1/workflows/{workflow}/{id}/cancel",
            post(cancel::cancel_workflow),
        )
        .route("/v1/workflows/{workflow}/{id}/runs", get(workflows::runs))
        .route(
            "/v1/workflows/{workflow}/{id}/updates/{name}",
            post(updates::send),
        )
        .route(
            "/v1/workflows/{workflow}/{id}/updates/{name}/{update_id}",
            get(updates::get),
        )
        .route(
            "/v1/workflows/{workflow}/{id}/signal-with-start",
            post(workflows::signal_with_start),
        )
        .route(
            "/v1/workflows/{workflow}/{id}/signals/{name}",
            post(signals::to_workflow),
        )
        .route(
            "/v1/workflows/{workflow}/{id}/queries/{name}",
            get(queries::of_workflow),
        )
        .route("/v1/webhooks/{source}", post(webhooks::receive))
        .route("/v1/services/{service}/keys/{key}", get(keys::show))
        .route("/v1/awakeables/{token}/resolve", post(awakeables::resolve))
        .route("/v1/awakeables/{token}/reject", post(awakeables::reject))
        .route("/v1/contexts/{id}/entries", post(context::append))
        .route(
            "/v1/contexts/{id}/steps/{name}",
            post(context::record_step).get(context::read_step),
        )
        .route("/v1/contexts/{id}/first", post(context::first))
        .route("/v1/contexts/{id}/calls/{name}", post(context::call_child))
        .route(
            "/v1/contexts/{id}/continue-as-new",
            post(context::continue_as_new),
        )
        .route("/v1/contexts/{id}/sends/{name}", post(context::send_child))
        .route(
            "/v1/contexts/{id}/updates/{update_id}/refuse",
            post(context::refuse_update),
        )
        .route(
            "/v1/contexts/{id}/updates/{update_id}/result",
            post(context::answer_update),
        )
        .route(
            "/v1/contexts/{id}/heartbeat",
            post(context::heartbeat).get(context::last_heartbeat),
        )
        .route("/v1/contexts/{id}/sleep/{name}", post(context::sleep))
        .route(
            "/v1/contexts/{id}/signals/{name}",
            post(context::wait_signal),
        )
        .route(
            "/v1/contexts/{id}/awakeables/{name}",
            post(context::create_awakeable),
        )
        .route(
            "/v1/contexts/{id}/awakeables/{name}/wait",
            post(context::wait_awakeable),
        )
        .route(
            "/v1/contexts/{id}/state/{key}",
            put(context::set_state).delete(context::clear_state),
        );
    // On the routes only: an unknown route is a 404 that names nothing.
    let router = router.route_layer(axum::middleware::from_fn_with_state(
        state.clone(),
        auth::authorize,
    ));
    finish(router, state)
}

/// The admin listener: deployments, the list of invocations, journals, resume, cancel and
/// terminate. With a
/// token configured, every request must carry `Authorization: Bearer TOKEN`.
pub fn admin_router(state: AppState, token: Option<String>) -> Router {
    // A history file holds a whole journal (up to `max_journal_bytes`, its values in
    // base64 or JSON), more than a request body usually may.
    let history_limit = usize::try_from(state.journal_limits.max_bytes)
        .unwrap_or(usize::MAX)
        .saturating_mul(2)
        .max(state.max_body_bytes);
    let router = Router::new()
        .route("/health", get(admin::health))
        .route(
            "/v1/deployments",
            get(admin::list_deployments).post(admin::register_deployment),
        )
        .route("/v1/invocations", get(admin::list_invocations))
        .route("/v1/invocations/{id}", get(admin::get_invocation))
        .route("/v1/invocations/{id}/journal", get(admin::get_journal))
        .route(
            "/v1/invocations/{id}/history",
            get(replays::invocation_history),
        )
        .route(
            "/v1/workflows/{workflow}/{id}/history",
            get(replays::workflow_history),
        )
        .route("/v1/webhooks", get(webhooks::list))
        .route(
            "/v1/webhooks/{source}",
            get(webhooks::get)
                .put(webhooks::put)
                .delete(webhooks::delete),
        )
        .route("/v1/schedules", get(schedules::list))
        .route(
            "/v1/schedules/{id}",
            get(schedules::get)
                .put(schedules::put)
                .delete(schedules::delete),
        )
        .route("/v1/schedules/{id}/pause", post(schedules::pause))
        .route("/v1/schedules/{id}/unpause", post(schedules::unpause))
        .route("/v1/schedules/{id}/trigger", post(schedules::trigger))
        .route("/v1/schedules/{id}/backfill", post(schedules::backfill))
        .route(
            "/v1/webhooks/{source}/deliveries",
            get(webhooks::deliveries),
        )
        .route(
            "/v1/replays",
            post(replays::replay).layer::<_, std::convert::Infallible>((
                DefaultBodyLimit::max(history_limit),
                axum::Extension(BodyLimit(history_limit)),
            )),
        )
        .route(
            "/v1/deployments/{id}/activate",
            post(admin::activate_deployment),
        )
        .route("/v1/workflows/{workflow}/{id}/runs", get(workflows::runs))
        .route("/v1/invocations/{id}/resume", post(admin::resume))
        .route("/metrics", get(admin::metrics))
        .route("/v1/invocations/{id}/pause", post(operate::pause))
        .route("/v1/invocations/{id}/retry-now", post(operate::retry_now))
        .route("/v1/invocations/{id}/purge", post(operate::purge))
        .route("/v1/invocations/{id}/restart", post(operate::restart))
        .route("/v1/invocations/bulk/{verb}", post(operate::bulk))
        .route(
            "/v1/invocations/{id}/cancel",
            post(cancel::cancel_invocation),
        )
        .route(
            "/v1/invocations/{id}/terminate",
            post(cancel::terminate_invocation),
        )
        .route(
            "/v1/workflows/{workflow}/{id}/terminate",
            post(cancel::terminate_workflow),
        )
        .route("/v1/signing-key", get(admin::signing_key));
    let router = finish(router, state);
    let router = match token {
        Some(token) => {
            let token = Arc::new(token);
            router.layer(axum::middleware::from_fn(move |request, next| {
                admin::require_token(Arc::clone(&token), request, next)
            }))
        }
        None => router,
    };
    // The page itself holds no data and a browser cannot send a bearer token to open it:
    // it asks for the token and sends it with every API call.
    Router::new().route("/ui", get(admin::ui)).merge(router)
}

/// What both listeners share: problems for unknown routes and methods, the body limit.
fn finish(router: Router<AppState>, state: AppState) -> Router {
    let max_body = state.max_body_bytes;
    router
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::Extension(BodyLimit(max_body)))
        .with_state(state)
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::NoRoute {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
}

/// `Path` whose rejection is a problem response.
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(t)| ApiPath(t))
            .map_err(|e| ApiError::BadRequest(e.body_text()))
    }
}

/// `Query` whose rejection is a problem response.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(t)| ApiQuery(t))
            .map_err(|e| ApiError::BadRequest(e.body_text()))
    }
}

/// The raw body, within the size limit.
pub struct ApiBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for ApiBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let limit = request
            .extensions()
            .get::<BodyLimit>()
            .map(|l| l.0)
            .unwrap_or_default();
        Bytes::from_request(request, state)
            .await
            .map(ApiBody)
            .map_err(|e| {
                if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge { limit }
                } else {
                    ApiError::BadRequest(e.body_text())
                }
            })
    }
}

/// The configured body limit, for the error message.
#[derive(Clone, Copy)]
pub struct BodyLimit(pub usize);

/// Parses a JSON body into `T`, with an error that says where it went wrong.
pub fn parse_json<T: DeserializeOwned>(what: &str, body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("{what} is not valid: {e}")))
}

/// Admission for a request that would create work: how its first attempt runs, or a 503
/// with `Retry-After` when too much work waits already (nothing is written then).
pub async fn admit(
    state: &AppState,
    caller: crate::engine::Caller,
) -> Result<crate::engine::Admitted, ApiError> {
    state.engine.admit(caller).await.map_err(|busy| {
        let limits = state.engine.admission().limits();
        let detail = match caller {
            crate::engine::Caller::Waits => format!(
                "{} new invocations already wait for one of {} attempt slots (max_queued_attempts); nothing was created, try again after {} s (or send it with POST /v1/send without Prefer: wait, which queues it in the store)",
                busy.queued,
                limits.max_concurrent_attempts,
                busy.retry_after.as_secs().max(1),
            ),
            crate::engine::Caller::HandsOver => format!(
                "{} invocations already wait in the store for their first attempt (max_pending_starts {}); nothing was created, try again after {} s",
                busy.pending.unwrap_or(limits.max_pending_starts),
                limits.max_pending_starts,
                busy.retry_after.as_secs().max(1),
            ),
        };
        ApiError::Overloaded {
            detail,
            retry_after: busy.retry_after,
        }
    })
}

/// The caller's W3C `traceparent`, when it is one (W3C Trace Context: an invalid one is
/// ignored, not refused); the invocation's trace continues it.
pub fn traceparent(headers: &HeaderMap) -> Option<String> {
    let value = headers
        .get(crate::telemetry::traces::TRACEPARENT)?
        .to_str()
        .ok()?;
    let parsed = crate::telemetry::traces::parse_traceparent(value)?;
    Some(crate::telemetry::traces::format_traceparent(
        parsed.trace_id,
        parsed.span_id,
        parsed.sampled,
    ))
}

/// The `Idempotency-Key` of a request, checked.
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    headers
        .get(ingress::HEADER_IDEMPOTENCY_KEY)
        .map(|v| {
            v.to_str()
                .map_err(|_| "Idempotency-Key must be visible ASCII".to_owned())
                .and_then(crate::ids::IdempotencyKey::parse)
                .map(|k| k.as_str().to_owned())
                .map_err(ApiError::BadRequest)
        })
        .transpose()
}

/// The JSON of a body, with an error that says where it went wrong; an empty body is
/// `null`.
pub fn json_body(what: &str, body: &[u8]) -> Result<serde_json::Value, ApiError> {
    if body.is_empty() {
        Ok(serde_json::Value::Null)
    } else {
        parse_json(what, body)
    }
}

pub fn parse_invocation_id(id: &str) -> Result<InvocationId, ApiError> {
    InvocationId::parse(id).map_err(ApiError::BadRequest)
}

/// Hears the end of one invocation (see [`crate::engine::Waiters`]).
pub type EndedListener = watch::Receiver<Option<Arc<Ended>>>;

/// Waits until the invocation is final (or paused, with `stop_on_pause`: a paused
/// invocation waits for an operator), or `timeout` passes; returns its latest state either
/// way. The end wakes the wait ([`Engine::end_attempt`] is the only way an attempt ends),
/// so a waiting caller costs no store reads. `listener`, when given, was taken before the
/// invocation started, so the store need not be read first.
pub async fn wait_for_end(
    state: &AppState,
    id: &InvocationId,
    timeout: Duration,
    stop_on_pause: bool,
    listener: Option<EndedListener>,
) -> Result<Arc<Ended>, ApiError> {
    let done = |record: &InvocationRecord| {
        record.status.is_final() || (stop_on_pause && record.status == Status::Paused)
    };
    let _release = ReleaseListener(state.engine.waiters(), id);
    let mut ended = match listener {
        Some(listener) => listener,
        None => {
            // Listening first, then reading: an end in between is not missed.
            let listener = state.engine.waiters().listener(id);
            let record = find_invocation(state, id).await?;
            if done(&record) {
                return load_ended(state, record).await;
            }
            listener
        }
    };
    // A wait too long to represent has no deadline.
    let deadline = Instant::now().checked_add(timeout);
    let heard = async {
        loop {
            if ended.changed().await.is_err() {
                // The sender is gone without a value for this wait: read the store.
                return None;
            }
            let value = ended.borrow_and_update().clone();
            match value {
                // A pause ends only a wait that stops on pauses; the others listen
                // again for the end that follows a resume.
                Some(value) if done(&value.record) => return Some(value),
                Some(_) => {
                    ended = state.engine.waiters().listener(id);
                    // Resumed and ended before this listener was taken: read the end.
                    let record = find_invocation(state, id).await.ok();
                    if record.as_ref().is_none_or(done) {
                        return None;
                    }
                }
                None => {}
            }
        }
    };
    tokio::select! {
        value = heard => match value {
            Some(value) => Ok(value),
            None => load_ended(state, find_invocation(state, id).await?).await,
        },
        () = sleep_until(deadline) => load_ended(state, find_invocation(state, id).await?).await,
        () = state.stopping.cancelled() => Err(ApiError::ShuttingDown(format!(
            "Durin is restarting; invocation {id} goes on, re-attach with GET /v1/invocations/{id} or the same Idempotency-Key"
        ))),
    }
}

/// Sleeps until `deadline`, or for ever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

pub async fn find_invocation(
    state: &AppState,
    id: &InvocationId,
) -> Result<InvocationRecord, ApiError> {
    state
        .store
        .get_invocation(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("invocation {id} not found")))
}

/// The record with its output entry, read when the invocation has ended.
pub async fn load_ended(
    state: &AppState,
    record: InvocationRecord,
) -> Result<Arc<Ended>, ApiError> {
    Ok(Arc::new(state.engine.load_ended(record).await?))
}

/// Forgets the waiters' entry of an invocation when the last waiter leaves, so that waits
/// on invocations that never end (or do not exist) leave nothing behind.
struct ReleaseListener<'a>(&'a Waiters, &'a InvocationId);

impl Drop for ReleaseListener<'_> {
    fn drop(&mut self) {
        self.0.release(self.1);
    }
}
