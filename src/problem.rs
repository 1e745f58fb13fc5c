//! The one mapping from errors to HTTP: `application/problem+json` (RFC 9457).
//!
//! Every error a client can see is an [`ApiError`]. Its body carries `type`, `title`,
//! `status`, `detail`, and `retryable`, which says whether sending the same request again is
//! safe and may succeed. The `Durin-Error-Source` header says whether the gateway or the
//! handler failed.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use crate::store::StoreError;

pub const HEADER_ERROR_SOURCE: &str = "durin-error-source";
pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request itself is malformed: bad JSON, a bad header, a bad name.
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("no route for {method} {path}")]
    NoRoute { method: String, path: String },
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("the request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// An append past the journal's limits.
    #[error("{0}")]
    JournalFull(String),
    /// An admin request without the admin token.
    #[error("the admin API needs Authorization: Bearer with the admin token (--admin-token)")]
    Unauthorized,
    /// The egress refuses a call (no running invocation, a host outside the allow-list).
    #[error("{0}")]
    Forbidden(String),
    /// A caller of the main listener without credentials that hold (authentication on).
    #[error("{0}")]
    Unauthenticated(String),
    /// A caller outside its grants; it does not say whether the target exists.
    #[error("{0}")]
    NotAllowed(String),
    /// The same `Idempotency-Key` was used before with a different request. The problem
    /// does not name that request's invocation: the key may be someone else's.
    #[error("Idempotency-Key {key:?} was already used for a different request; use a new key for a new request")]
    IdempotencyKeyReused { key: String },
    /// An append or another handler-facing call from an attempt that is no longer current.
    #[error("{0}")]
    Conflict(String),
    /// A deployment could not be reached or answered something unusable.
    #[error("{detail}")]
    Deployment { detail: String, retryable: bool },
    /// The invocation ended in a failure that the handler reported or that exhausted its
    /// attempts; `status` is what goes back to the caller.
    #[error("{message}")]
    InvocationFailed {
        status: u16,
        error_type: Option<String>,
        message: String,
        invocation_id: String,
    },
    /// The invocation is paused (for example after a non-determinism error).
    #[error("invocation {invocation_id} is paused: {reason}")]
    InvocationPaused {
        invocation_id: String,
        reason: String,
    },
    /// The invocation's state does not allow the request (cancel an ended or paused
    /// invocation, terminate an ended one).
    #[error("{detail}")]
    InvocationState {
        detail: String,
        invocation_id: String,
    },
    /// A workflow id already names a run started with another input.
    #[error("{detail}")]
    WorkflowConflict {
        detail: String,
        invocation_id: String,
    },
    /// A query of a name the invocation's state does not have.
    #[error("{detail}")]
    UnknownQuery { detail: String, known: Vec<String> },
    /// A plain handler's context call suspended its attempt: it must stop now and will run
    /// again from the top when what it waits for has arrived.
    #[error("{0}")]
    Suspended(String),
    /// An update the run's validator refused (nothing was journaled), or whose handler
    /// failed; `status` is the handler's.
    #[error("{message}")]
    Update {
        refused: bool,
        status: u16,
        error_type: Option<String>,
        message: String,
        update_id: String,
    },
    /// A plain handler's wait in an invocation that was cancelled before it completed.
    #[error("{0}")]
    Cancelled(String),
    /// The egress got no answer from a downstream; nothing was journaled.
    #[error("{0}")]
    Downstream(String),
    #[error("storage is unavailable: {0}")]
    Storage(String),
    #[error("{0}")]
    ShuttingDown(String),
    /// A webhook delivery whose signature does not hold (or is too old): nothing was done.
    #[error("{0}")]
    WebhookRefused(String),
    /// A deployment that could not replay what its handlers run (verification): nothing
    /// was registered; `report` is the replay's.
    #[error("{detail}")]
    DeploymentDiverged { detail: String, report: Value },
    /// Too much work waits already: the caller should come back after `retry_after`.
    #[error("{detail}")]
    Overloaded {
        detail: String,
        retry_after: std::time::Duration,
    },
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::NotFound(id) => ApiError::NotFound(format!("invocation {id} not found")),
            StoreError::Fenced { .. }
            | StoreError::IndexMismatch { .. }
            | StoreError::WrongToken { .. }
            | StoreError::Ended { .. } => ApiError::Conflict(e.to_string()),
            StoreError::JournalFull { .. } => ApiError::JournalFull(e.to_string()),
            StoreError::Backend(_) | StoreError::Closed | StoreError::Contended(_) => {
                ApiError::Storage(e.to_string())
            }
        }
    }
}

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str, &'static str, bool) {
        use ApiError::*;
        match self {
            BadRequest(_) => (StatusCode::BAD_REQUEST, "bad-request", "Bad request", false),
            NotFound(_) => (StatusCode::NOT_FOUND, "not-found", "Not found", false),
            NoRoute { .. } => (StatusCode::NOT_FOUND, "no-route", "No such route", false),
            MethodNotAllowed { .. } => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
                false,
            ),
            PayloadTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload-too-large",
                "Request body too large",
                false,
            ),
            UnsupportedMediaType(_) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported media type",
                false,
            ),
            IdempotencyKeyReused { .. } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency-key-reused",
                "Idempotency key reused with a different request",
                false,
            ),
            Conflict(_) => (StatusCode::CONFLICT, "conflict", "Conflict", false),
            JournalFull(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "journal-full",
                "Journal full",
                false,
            ),
            Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Admin token required",
                false,
            ),
            InvocationState { .. } => (
                StatusCode::CONFLICT,
                "invocation-state",
                "The invocation's state does not allow this",
                false,
            ),
            WorkflowConflict { .. } => (
                StatusCode::CONFLICT,
                "workflow-id-taken",
                "Workflow id already names another run",
                false,
            ),
            UnknownQuery { .. } => (
                StatusCode::NOT_FOUND,
                "unknown-query",
                "Unknown query",
                false,
            ),
            Suspended(_) => (
                StatusCode::CONFLICT,
                "suspended",
                "The attempt is suspended",
                false,
            ),
            Update {
                refused, status, ..
            } => (
                StatusCode::from_u16(*status)
                    .ok()
                    .filter(|s| s.is_client_error() || s.is_server_error())
                    .unwrap_or(StatusCode::BAD_REQUEST),
                if *refused {
                    "update-refused"
                } else {
                    "update-failed"
                },
                if *refused {
                    "Update refused"
                } else {
                    "Update failed"
                },
                false,
            ),
            Cancelled(_) => (
                StatusCode::CONFLICT,
                "cancelled",
                "The invocation was cancelled",
                false,
            ),
            Forbidden(_) => (
                StatusCode::FORBIDDEN,
                "egress-refused",
                "Egress refused",
                false,
            ),
            Unauthenticated(_) => (
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "Credentials required",
                false,
            ),
            NotAllowed(_) => (StatusCode::FORBIDDEN, "forbidden", "Not allowed", false),
            Deployment { retryable, .. } => (
                StatusCode::BAD_GATEWAY,
                "deployment-unusable",
                "Deployment could not be used",
                *retryable,
            ),
            // A handler that kept answering 429 may take the same request later (under
            // a new Idempotency-Key: this invocation's end is final).
            InvocationFailed { status, .. } => (
                StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                "invocation-failed",
                "Invocation failed",
                *status == 429,
            ),
            Downstream(_) => (
                StatusCode::BAD_GATEWAY,
                "downstream-unreachable",
                "Downstream unreachable",
                true,
            ),
            InvocationPaused { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "invocation-paused",
                "Invocation paused",
                true,
            ),
            Storage(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "storage-unavailable",
                "Storage unavailable",
                true,
            ),
            ShuttingDown(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting-down",
                "Durin is shutting down",
                true,
            ),
            WebhookRefused(_) => (
                StatusCode::UNAUTHORIZED,
                "webhook-refused",
                "Webhook signature refused",
                false,
            ),
            DeploymentDiverged { .. } => (
                StatusCode::CONFLICT,
                "deployment-diverged",
                "The deployment cannot continue what runs",
                false,
            ),
            Overloaded { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "Durin is at capacity",
                true,
            ),
        }
    }

    /// Whether sending the same request again is safe and may succeed.
    pub fn is_retryable(&self) -> bool {
        self.parts().3
    }

    fn source(&self) -> &'static str {
        match self {
            ApiError::InvocationFailed { .. } | ApiError::Update { .. } => "handler",
            _ => "gateway",
        }
    }

    fn extensions(&self) -> Map<String, Value> {
        let mut ext = Map::new();
        match self {
            ApiError::InvocationFailed {
                invocation_id,
                error_type,
                ..
            } => {
                ext.insert("invocation_id".into(), json!(invocation_id));
                if let Some(t) = error_type {
                    ext.insert("error_type".into(), json!(t));
                }
            }
            ApiError::Update {
                update_id,
                error_type,
                ..
            } => {
                ext.insert("update_id".into(), json!(update_id));
                if let Some(t) = error_type {
                    ext.insert("error_type".into(), json!(t));
                }
            }
            ApiError::DeploymentDiverged { report, .. } => {
                ext.insert("report".into(), report.clone());
            }
            ApiError::UnknownQuery { known, .. } => {
                ext.insert("known".into(), json!(known));
            }
            ApiError::InvocationPaused { invocation_id, .. }
            | ApiError::InvocationState { invocation_id, .. }
            | ApiError::WorkflowConflict { invocation_id, .. } => {
                ext.insert("invocation_id".into(), json!(invocation_id));
            }
            _ => {}
        }
        ext
    }
}

impl ApiError {
    /// The problem document (RFC 9457) that says what went wrong.
    pub fn problem(&self) -> Value {
        let (status, slug, title, retryable) = self.parts();
        let mut body = self.extensions();
        body.insert("type".into(), json!(format!("urn:durin:problem:{slug}")));
        body.insert("title".into(), json!(title));
        body.insert("status".into(), json!(status.as_u16()));
        body.insert("detail".into(), json!(self.to_string()));
        body.insert("retryable".into(), json!(retryable));
        Value::Object(body)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.parts().0;
        let mut response = (status, self.problem().to_string()).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(PROBLEM_CONTENT_TYPE),
        );
        headers.insert(HEADER_ERROR_SOURCE, HeaderValue::from_static(self.source()));
        if matches!(self, ApiError::Unauthorized | ApiError::Unauthenticated(_)) {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            // A paused invocation waits for an operator; the rest passes in moments.
            let after = match &self {
                ApiError::InvocationPaused { .. } => 30,
                ApiError::Overloaded { retry_after, .. } => retry_after.as_secs().max(1),
                _ => 1,
            };
            headers.insert(header::RETRY_AFTER, HeaderValue::from(after));
        }
        if let ApiError::Suspended(_) = &self {
            headers.insert(
                durin_protocol::HEADER_SUSPENDED,
                HeaderValue::from_static("true"),
            );
        }
        if let ApiError::InvocationPaused { invocation_id, .. }
        | ApiError::InvocationState { invocation_id, .. }
        | ApiError::WorkflowConflict { invocation_id, .. } = &self
        {
            if let Ok(v) = HeaderValue::from_str(&format!("/v1/invocations/{invocation_id}")) {
                headers.insert(header::LOCATION, v);
            }
        }
        response
    }
}
