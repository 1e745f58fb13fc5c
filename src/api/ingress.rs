//! Ingress: `POST /v1/call/...` (run and wait) and `POST /v1/send/...` (run in background).

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::{wait_for_end, ApiBody, ApiPath, AppState, EndedListener};
use crate::engine::{Admitted, Caller, Ended};
use crate::http::hex;
use crate::ids::{parse_name, InvocationId};
use crate::problem::ApiError;
use crate::store::{
    Created, HandlerProtocol, IdempotencyClaim, InvocationKey, InvocationRecord, NewInvocation,
    StartRate, Status,
};

pub const HEADER_IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Set on an answer that replays an earlier request with the same `Idempotency-Key`.
pub const HEADER_IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";
/// The longest `Prefer: wait=N` honoured, in seconds.
const MAX_WAIT_SECONDS: u64 = 300;

/// `POST /v1/call/{service}/{handler}`: starts (or re-attaches to) an invocation and answers
/// with its output once it ends.
pub async fn call(
    State(state): State<AppState>,
    ApiPath((service, handler)): ApiPath<(String, String)>,
    headers: HeaderMap,
    ApiBody(body): ApiBody,
) -> Result<Response, ApiError> {
    let started = start(&state, &service, &handler, &headers, &body, Caller::Waits).await?;
    let ended = wait_for_end(
        &state,
        &started.record.id,
        state.call_wait,
        true,
        started.listener,
    )
    .await?;
    let status = ended.record.status;
    if !status.is_final() && status != Status::Paused {
        // Still running after `call_wait`: where to look for it.
        return Ok(accepted(&ended.record, started.replayed));
    }
    Ok(ended_response(&ended, started.replayed))
}

/// `POST /v1/send/{service}/{handler}`: starts (or re-attaches to) an invocation and answers
/// 202 with its id; with `Prefer: wait=N` it first waits up to N seconds for the output.
pub async fn send(
    State(state): State<AppState>,
    ApiPath((service, handler)): ApiPath<(String, String)>,
    headers: HeaderMap,
    ApiBody(body): ApiBody,
) -> Result<Response, ApiError> {
    let wait = prefer_wait(&headers);
    let caller = if wait.is_some() {
        Caller::Waits
    } else {
        Caller::HandsOver
    };
    let started = start(&state, &service, &handler, &headers, &body, caller).await?;
    let Some(wait) = wait else {
        return Ok(with_preference(
            accepted(&started.record, started.replayed),
            None,
        ));
    };
    let ended = wait_for_end(&state, &started.record.id, wait, false, started.listener).await?;
    let response = if ended.record.status.is_final() {
        ended_response(&ended, started.replayed)
    } else {
        accepted(&ended.record, started.replayed)
    };
    Ok(with_preference(response, Some(wait)))
}

/// Marks an answer that depends on `Prefer` (RFC 7240): `Vary: Prefer`, and
/// `Preference-Applied: wait=N` when the wait was honoured.
pub fn with_preference(mut response: Response, wait: Option<Duration>) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::VARY, HeaderValue::from_static("prefer"));
    if let Some(wait) = wait {
        if let Ok(value) = HeaderValue::from_str(&format!("wait={}", wait.as_secs())) {
            headers.insert("preference-applied", value);
        }
    }
    response
}

/// `Prefer: wait=N` (RFC 7240), capped at [`MAX_WAIT_SECONDS`]. A preference that cannot be
/// understood (not ASCII, not a whole number of seconds) is ignored, as the RFC asks.
pub fn prefer_wait(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split([',', ';']))
        .filter_map(|preference| preference.trim().strip_prefix("wait="))
        .find_map(|seconds| seconds.trim().parse::<u64>().ok())
        .map(|seconds| Duration::from_secs(seconds.min(MAX_WAIT_SECONDS)))
}

/// 202 with the invocation id and where to look for it.
pub fn accepted(record: &InvocationRecord, replayed: bool) -> Response {
    accepted_with(record, replayed, serde_json::Map::new())
}

/// [`accepted`] with more fields in its body.
pub fn accepted_with(
    record: &InvocationRecord,
    replayed: bool,
    mut fields: serde_json::Map<String, serde_json::Value>,
) -> Response {
    let location = format!("/v1/invocations/{}", record.id);
    fields.insert("invocation_id".into(), json!(record.id.as_str()));
    fields.insert("status".into(), json!(record.status.as_str()));
    fields.insert("location".into(), json!(location));
    let mut response = (StatusCode::ACCEPTED, Json(fields)).into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    decorate(&mut response, &record.id, replayed);
    response
}

fn decorate(response: &mut Response, id: &InvocationId, replayed: bool) {
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(id.as_str()) {
        headers.insert(durin_protocol::HEADER_INVOCATION_ID, value);
    }
    if replayed {
        headers.insert(HEADER_IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    }
}

/// The answer for an invocation that ended (or paused): its output or its failure, with
/// the invocation's headers either way.
pub(super) fn ended_response(ended: &Ended, replayed: bool) -> Response {
    let mut response = match output_or_failure(ended) {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    decorate(&mut response, &ended.record.id, replayed);
    response
}

fn output_or_failure(ended: &Ended) -> Result<Response, ApiError> {
    let record = &ended.record;
    match record.status {
        Status::Completed => {
            let output = ended.output.as_ref().ok_or_else(|| {
                ApiError::Storage(format!("invocation {} has no output entry", record.id))
            })?;
            let content_type = output
                .content_type
                .clone()
                .unwrap_or_else(|| "application/json".into());
            Ok((
                [(header::CONTENT_TYPE, content_type)],
                output.value.clone().unwrap_or_default(),
            )
                .into_response())
        }
        Status::Paused => Err(ApiError::InvocationPaused {
            invocation_id: record.id.to_string(),
            reason: super::views::last_error_for_caller(record.last_error.as_deref()),
        }),
        Status::Failed if ended.output.as_ref().is_some_and(|o| o.value.is_some()) => {
            // A plain handler's own answer goes back as it was.
            let output = ended.output.as_ref().and_then(|o| o.value.clone());
            let content_type = ended.output.as_ref().and_then(|o| o.content_type.clone());
            let status = record.failure.as_ref().map_or(500, |f| f.status);
            let mut response = (
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                output.unwrap_or_default(),
            )
                .into_response();
            let headers = response.headers_mut();
            if let Some(value) = content_type.and_then(|c| HeaderValue::from_str(&c).ok()) {
                headers.insert(header::CONTENT_TYPE, value);
            }
            headers.insert(
                crate::problem::HEADER_ERROR_SOURCE,
                HeaderValue::from_static("handler"),
            );
            Ok(response)
        }
        _ => {
            let failure = record.failure.clone().unwrap_or(durin_protocol::Failure {
                status: 500,
                error_type: None,
                message: format!("invocation ended as {}", record.status),
            });
            Err(ApiError::InvocationFailed {
                status: failure.status,
                error_type: failure.error_type,
                message: failure.message,
                invocation_id: record.id.to_string(),
            })
        }
    }
}

/// An invocation an ingress request created or re-attached to.
struct Started {
    record: InvocationRecord,
    /// True when an earlier request with the same idempotency key created it.
    replayed: bool,
    /// For a new invocation whose caller waits: hears its end, taken before it started.
    listener: Option<EndedListener>,
}

/// Checks the request and creates the invocation, or finds the one its idempotency key
/// names; refused (503) when admission turns `caller` away.
async fn start(
    state: &AppState,
    service: &str,
    handler: &str,
    headers: &HeaderMap,
    body: &[u8],
    caller: Caller,
) -> Result<Started, ApiError> {
    let service = parse_name("service", service).map_err(ApiError::BadRequest)?;
    let handler = parse_name("handler", handler).map_err(ApiError::BadRequest)?;
    let content_type = content_type(headers)?;
    let key = super::idempotency_key(headers)?;
    let target = state
        .targets
        .latest(&*state.store, &service, &handler)
        .await?
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "no deployment serves handler {service}/{handler}; register one with POST /v1/deployments"
            ))
        })?;
    let (input_digest, content_type) = input_digest(target.protocol, content_type, body)?;
    let invocation_key = invocation_key(&target.spec, Some(headers), body)?;
    let admitted = super::admit(state, caller).await?;
    let now_ms = state.clock.now_ms();
    let idempotency = key.map(|key| IdempotencyClaim {
        scope: format!("{service}/{handler}"),
        key,
        request_digest: request_digest(&service, &handler, &input_digest),
        retention_ms: i64::try_from(state.idempotency_retention.as_millis()).unwrap_or(i64::MAX),
    });
    // The creation and the start of its driver run in a task of their own: if this
    // caller goes away mid-way, the invocation still gets its driver.
    let task_state = state.clone();
    let key_text = idempotency
        .as_ref()
        .map(|c| c.key.clone())
        .unwrap_or_default();
    let target_spec = target.spec.clone();
    let new = NewInvocation {
        id: InvocationId::generate(),
        target,
        input: body.to_vec(),
        content_type: Some(content_type.unwrap_or_else(|| "application/json".into())),
        idempotency,
        now_ms,
        deadline_ms: state.timeouts.deadline(&target_spec, now_ms),
        traceparent: super::traceparent(headers),
        run_now: admitted == Admitted::Queue,
        key: invocation_key,
    };

    let hold = state.engine.hold_first_attempt(&new.id);
    let created = tokio::spawn(async move {
        let state = task_state;
        let created = state.store.create_invocation(new).await?;
        Ok::<_, ApiError>(match created {
            Created::New {
                record,
                input,
                superseded,
            } => {
                state.engine.announce_ended(superseded);
                // Only for a caller that waits: a listener stays in the map of waiters
                // until the invocation ends (days, for a workflow that sleeps for days).
                let listener =
                    (caller == Caller::Waits).then(|| state.engine.waiters().listener(&record.id));
                state.engine.run_created(record.clone(), *input, hold);
                Started {
                    record,
                    replayed: false,
                    listener,
                }
            }
            Created::Existing(record) => {
                // The scheduler runs it (or ran it) whatever happened to the request that
                // created it.
                Started {
                    record,
                    replayed: true,
                    listener: None,
                }
            }
            Created::KeyReused { .. } => {
                return Err(ApiError::IdempotencyKeyReused { key: key_text })
            }
        })
    })
    .await
    .map_err(|e| ApiError::Storage(format!("the invocation could not be created: {e}")))?;
    created
}

/// The key of a request to a keyed handler (read where the handler declares it: in the
/// request's `headers`, which a child call has none of, or its input), with the handler's
/// limit; a 400 when the request has none.
pub(super) fn invocation_key(
    spec: &durin_protocol::HandlerSpec,
    headers: Option<&HeaderMap>,
    body: &[u8],
) -> Result<Option<InvocationKey>, ApiError> {
    let Some(key_spec) = &spec.key else {
        return Ok(None);
    };
    let header = |name: &str| headers?.get(name).map(HeaderValue::as_bytes);
    let key = key_spec
        .key_of(header, body)
        .map_err(|e| ApiError::BadRequest(format!("handler {} is keyed: {e}", spec.name)))?;
    Ok(Some(InvocationKey {
        key,
        limit: key_spec.limit,
        shared: key_spec.shared,
        debounce_ms: key_spec.debounce.map(millis),
        debounce_max_ms: key_spec.debounce_max.map(millis),
        rate: key_spec.rate.map(|rate| StartRate {
            limit: rate.limit,
            period_ms: millis(rate.period),
        }),
    }))
}

fn millis(duration: std::time::Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// The digest of a request's input (which an idempotency key or a workflow id compares)
/// and the content type to record with it.
pub(super) fn input_digest(
    protocol: HandlerProtocol,
    content_type: Option<String>,
    body: &[u8],
) -> Result<(String, Option<String>), ApiError> {
    Ok(match protocol {
        HandlerProtocol::Sdk { .. } => (json_input_digest(content_type.as_deref(), body)?, None),
        // A plain handler takes any body; the digest covers its bytes and their type.
        HandlerProtocol::Plain => (
            crate::lifecycle::start::bytes_digest(content_type.as_deref(), body),
            content_type,
        ),
    })
}

/// The `Content-Type` of a request, if it has one.
pub(super) fn content_type(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    headers
        .get(header::CONTENT_TYPE)
        .map(|v| {
            v.to_str()
                .map(str::to_owned)
                .map_err(|_| ApiError::BadRequest("the Content-Type header is not ASCII".into()))
        })
        .transpose()
}

/// Checks that a protocol handler's input is JSON and digests its value, not its bytes,
/// so that whitespace or key order does not make a retry with the same Idempotency-Key look
/// like a different request.
fn json_input_digest(content_type: Option<&str>, body: &[u8]) -> Result<String, ApiError> {
    if let Some(content_type) = content_type {
        let essence = content_type.split(';').next().unwrap_or_default().trim();
        if !(essence.eq_ignore_ascii_case("application/json") || essence.ends_with("+json")) {
            return Err(ApiError::UnsupportedMediaType(format!(
                "the request body must be JSON (Content-Type: application/json), not {content_type:?}"
            )));
        }
    }
    let input: serde_json::Value = if body.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::BadRequest(format!("the request body is not valid JSON: {e}")))?
    };
    Ok(crate::lifecycle::start::json_digest(&input))
}

fn request_digest(service: &str, handler: &str, input_digest: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(service.as_bytes());
    hasher.update([0]);
    hasher.update(handler.as_bytes());
    hasher.update([0]);
    hasher.update(input_digest.as_bytes());
    hex(&hasher.finalize())
}
