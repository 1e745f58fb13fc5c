//! JSON shapes of the API's answers.

use std::time::{Duration, UNIX_EPOCH};

use durin_protocol::{Failure, ServiceSpec};
use serde::Serialize;
use serde_json::Value;

use crate::http::json_value;

tokio::task_local! {
    /// Whether the caller being answered may read what the answer shows (`api/auth.rs`
    /// sets it around each request of the main listener; everywhere else: yes).
    static MAY_READ: bool;
}

/// Runs `answer` (a request's handler) for a caller who may, or may not, read an
/// invocation's `last_error` and `idempotency_key`.
pub async fn scoped<F: std::future::Future>(may_read: bool, answer: F) -> F::Output {
    MAY_READ.scope(may_read, answer).await
}

/// Whether the caller being answered may read an invocation's `last_error` and
/// `idempotency_key`.
fn may_read() -> bool {
    MAY_READ.try_with(|may| *may).unwrap_or(true)
}

/// Whether a field that only readers see is left out.
fn hidden(value: &Option<String>) -> bool {
    value.is_none() || !may_read()
}

/// An invocation's last error as a problem may quote it: to a caller who may read the
/// invocation.
pub fn last_error_for_caller(last_error: Option<&str>) -> String {
    if may_read() {
        last_error.unwrap_or_default().to_owned()
    } else {
        "its last error is shown to callers who may read it".to_owned()
    }
}
use crate::store::{DeploymentRecord, InvocationRecord, StoredEntry};

/// The last millisecond of year 9999, the largest time RFC 3339 can write.
const MAX_TIMESTAMP_MS: i64 = 253_402_300_799_999;

/// RFC 3339 with milliseconds, in UTC.
pub fn timestamp(ms: i64) -> String {
    let time = UNIX_EPOCH + Duration::from_millis(ms.clamp(0, MAX_TIMESTAMP_MS) as u64);
    humantime::format_rfc3339_millis(time).to_string()
}

#[derive(Serialize)]
pub struct InvocationView {
    pub id: String,
    pub service: String,
    pub handler: String,
    pub deployment_id: String,
    pub status: &'static str,
    /// The workflow id of a workflow's run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workflow_id: Option<String>,
    /// The key of a keyed handler's invocation; a `queued` one waits for its key's turn
    /// (`GET /v1/services/{service}/keys/{key}` lists the key's queue).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// What a suspended invocation waits for: the journal indexes of its commands.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub waiting_for: Vec<u32>,
    /// The invocation whose `call` or `send` started this one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_invocation_id: Option<String>,
    /// The parent's `call` entry, which this invocation's end completes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_index: Option<u32>,
    /// When someone asked to cancel it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cancel_requested_at: Option<String>,
    /// When an attempt last sent a heartbeat.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_at: Option<String>,
    /// When it fails if it has not ended (`schedule_to_close`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deadline: Option<String>,
    pub attempt: u32,
    pub journal_length: u32,
    /// The bytes of the journal's values.
    pub journal_bytes: i64,
    /// Set when the journal nears one of its limits (80 %): an append past the limit is
    /// refused, so a long-running workflow should start over with a fresh journal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub journal_warning: Option<String>,
    pub created_at: String,
    pub modified_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<String>,
    /// Shown only to a caller who may read the invocation (see [`scoped`]).
    #[serde(skip_serializing_if = "hidden")]
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "hidden")]
    pub idempotency_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
    /// The signals an ended run ended without taking (none is ever dropped silently).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unconsumed_signals: Vec<SignalView>,
    /// In a workflow's runs listing: the run this one continued as new into, and the one
    /// it continued from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub continued_as: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub continued_from: Option<String>,
}

/// A signal an invocation holds: its number among the invocation's signals, and its name.
#[derive(Serialize)]
pub struct SignalView {
    pub seq: u32,
    pub name: String,
}

impl InvocationView {
    /// The view of an ended run with the signals it ended without taking.
    pub async fn with_unconsumed(
        mut self,
        record: &InvocationRecord,
        store: &dyn crate::store::Store,
    ) -> Result<InvocationView, crate::store::StoreError> {
        if record.status.is_final() {
            self.unconsumed_signals = store
                .unconsumed_signals(&record.id)
                .await?
                .into_iter()
                .map(|(seq, name)| SignalView { seq, name })
                .collect();
        }
        Ok(self)
    }

    /// The view with a warning when the journal nears `limits`.
    pub fn warned(mut self, limits: &crate::store::JournalLimits) -> InvocationView {
        if !matches!(
            self.status,
            "completed" | "failed" | "cancelled" | "terminated" | "continued"
        ) {
            self.journal_warning = limits.warning(self.journal_length, self.journal_bytes);
        }
        self
    }

    pub fn new(record: &InvocationRecord, output: Option<&StoredEntry>) -> InvocationView {
        InvocationView {
            id: record.id.to_string(),
            service: record.service.clone(),
            handler: record.handler.clone(),
            deployment_id: record.deployment_id.clone(),
            status: record.status.as_str(),
            workflow_id: record.workflow_id.clone(),
            key: record.key.as_ref().map(|k| k.key.clone()),
            waiting_for: if record.status == crate::store::Status::Suspended {
                record.waiting_for.clone()
            } else {
                Vec::new()
            },
            parent_invocation_id: record.parent_invocation_id.clone(),
            parent_index: record.parent_index,
            cancel_requested_at: record.cancel_requested_at_ms.map(timestamp),
            last_heartbeat_at: record.heartbeat_at_ms.map(timestamp),
            deadline: record.deadline_ms.map(timestamp),
            attempt: record.attempt,
            journal_length: record.journal_len,
            journal_bytes: record.journal_bytes,
            journal_warning: None,
            created_at: timestamp(record.created_at_ms),
            modified_at: timestamp(record.modified_at_ms),
            completed_at: record.completed_at_ms.map(timestamp),
            next_attempt_at: if record.status.is_final() {
                None
            } else {
                record.next_run_at_ms.map(timestamp)
            },
            last_error: record.last_error.clone(),
            idempotency_key: record.idempotency_key.clone(),
            output: output
                .filter(|entry| entry.failure.is_none())
                .map(|entry| json_value(entry.value.as_deref())),
            failure: record.failure.clone(),
            unconsumed_signals: Vec::new(),
            continued_as: None,
            continued_from: None,
        }
    }
}

#[derive(Serialize)]
pub struct EntryView {
    pub index: u32,
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
    pub attempt: u32,
    pub at: String,
    /// A command's result (a timer fired, a signal received, an awakeable resolved).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion: Option<CompletionView>,
}

#[derive(Serialize)]
pub struct CompletionView {
    pub seq: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
    pub at: String,
}

impl From<StoredEntry> for EntryView {
    fn from(entry: StoredEntry) -> EntryView {
        EntryView {
            index: entry.index,
            kind: entry.kind.as_str(),
            value: entry.value.as_deref().map(|v| json_value(Some(v))),
            name: entry.name,
            failure: entry.failure,
            attempt: entry.attempt,
            at: timestamp(entry.at_ms),
            completion: entry.completion.map(|c| CompletionView {
                seq: c.seq,
                value: c.value.as_deref().map(|v| json_value(Some(v))),
                failure: c.failure,
                at: timestamp(c.at_ms),
            }),
        }
    }
}

#[derive(Serialize)]
pub struct JournalView {
    pub invocation_id: String,
    pub status: &'static str,
    pub entries: Vec<EntryView>,
}

#[derive(Serialize)]
pub struct DeploymentView {
    pub id: String,
    pub url: String,
    pub protocol: String,
    pub created_at: String,
    pub services: Vec<ServiceSpec>,
    /// New invocations may go to it (false: registered inactive, see its activation).
    pub active: bool,
}

impl From<DeploymentRecord> for DeploymentView {
    fn from(d: DeploymentRecord) -> DeploymentView {
        DeploymentView {
            id: d.id,
            url: d.url,
            protocol: d.protocol.to_text(),
            created_at: timestamp(d.created_at_ms),
            services: d.services,
            active: d.active,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::timestamp;

    #[test]
    fn timestamps_never_panic() {
        assert_eq!(timestamp(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(timestamp(i64::MAX), "9999-12-31T23:59:59.999Z");
        assert_eq!(timestamp(-5), "1970-01-01T00:00:00.000Z");
    }
}
