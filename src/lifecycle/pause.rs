//! Pause: the invocation waits for an operator (`POST /v1/invocations/{id}/resume`,
//! optionally on another deployment) instead of being retried blindly.

use durin_protocol::{EntryKind, EntryRef};

use crate::store::{AttemptEnd, StoredEntry};

/// On replay the handler asked for another entry than the journal holds.
pub(super) fn non_determinism(
    index: u32,
    recorded: &EntryRef,
    requested: &EntryRef,
    detail: Option<String>,
) -> AttemptEnd {
    AttemptEnd::Paused {
        reason: format!(
            "non-determinism at journal index {index}: the journal recorded {} but the handler asked for {}{}; fix the handler and resume the invocation",
            describe(recorded.kind, recorded.name.as_deref()),
            describe(requested.kind, requested.name.as_deref()),
            detail.map(|d| format!(" ({d})")).unwrap_or_default(),
        ),
    }
}

/// A journal with an entry newer than the protocol version of the deployment that would
/// read it (an invocation resumed on an older deployment, an SDK rolled back).
pub fn unreadable_journal(
    journal: &[StoredEntry],
    version: u32,
    deployment_id: &str,
) -> Option<AttemptEnd> {
    let entry = journal.iter().find(|e| e.kind.since_version() > version)?;
    Some(AttemptEnd::Paused {
        reason: format!(
            "journal entry {} is a {} entry, which protocol version {version} of deployment {deployment_id} does not know; resume the invocation on a deployment that speaks version {}",
            entry.index,
            entry.kind.as_str(),
            entry.kind.since_version()
        ),
    })
}

/// An SDK deployment refused the invocation request as too large (its journal outgrew the
/// SDK's bound on what it accepts): retrying would only send it again.
pub(super) fn request_too_large(deployment_id: &str, bytes: usize) -> AttemptEnd {
    AttemptEnd::Paused {
        reason: format!(
            "deployment {deployment_id} refused the invocation request of {bytes} bytes as too large (413); raise its limit (Endpoint::max_request_bytes in the Rust SDK) and resume the invocation"
        ),
    }
}

/// The deployment the invocation is pinned to no longer serves its handler.
pub fn deployment_gone(deployment_id: &str, service: &str, handler: &str) -> AttemptEnd {
    AttemptEnd::Paused {
        reason: format!("deployment {deployment_id} no longer serves {service}/{handler}"),
    }
}

fn describe(kind: EntryKind, name: Option<&str>) -> String {
    match name {
        Some(name) => format!("{} {name:?}", kind.as_str()),
        None => kind.as_str().to_owned(),
    }
}
