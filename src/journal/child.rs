//! `call` and `send`: another handler started with the entry, in the same transaction, so
//! that it starts exactly once. A `call` is a command: the child's end completes it with
//! the child's output or failure. A `send` is one-way and may be delayed (a durable
//! scheduled start).

use std::time::Duration;

use durin_protocol::EntryKind;
use serde_json::Value;

use crate::ids::parse_name;

/// The longest a `send` may be delayed (a year and a day, as a sleep).
const MAX_DELAY: Duration = super::MAX_DELAY;

/// A child invocation an entry asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct ChildRequest {
    pub service: String,
    pub handler: String,
    pub input: Value,
    /// How long after now it starts (zero for a `call`).
    pub delay: Duration,
    /// A child workflow: the workflow id its run takes (the handler is `run`).
    pub workflow_id: Option<String>,
    pub parent_close: ParentClose,
}

pub use crate::store::ParentClose;

/// Checks a `call` or `send` entry: `name` is `"service/handler"`, `value`
/// `{"input": V}` with, for a `send`, an optional `"delay_ms"`.
pub fn plan(
    kind: EntryKind,
    name: Option<&str>,
    value: Option<Value>,
) -> Result<ChildRequest, String> {
    let what = kind.as_str();
    let (service, handler) = name
        .and_then(|n| n.split_once('/'))
        .ok_or_else(|| format!("a {what} entry is named \"service/handler\""))?;
    let service = parse_name("service", service)?;
    let handler = parse_name("handler", handler)?;
    let mut fields = match value.unwrap_or(Value::Null) {
        Value::Object(fields) => fields,
        Value::Null => Default::default(),
        _ => return Err(format!("a {what} entry's value is {{\"input\": ...}}")),
    };
    let input = fields.remove("input").unwrap_or(Value::Null);
    let workflow_id = match fields.remove("workflow_id") {
        None => None,
        Some(Value::String(id)) if handler == "run" => Some(crate::ids::parse_workflow_id(&id)?),
        Some(Value::String(_)) => {
            return Err("a child workflow runs the handler \"run\" of its workflow".into())
        }
        Some(_) => return Err("workflow_id is a string".into()),
    };
    let parent_close = match fields.remove("parent_close") {
        None if kind == EntryKind::Call => ParentClose::Cancel,
        None => ParentClose::Abandon,
        Some(Value::String(policy)) => ParentClose::parse(&policy).ok_or_else(|| {
            format!("parent_close is terminate, cancel or abandon, not {policy:?}")
        })?,
        Some(_) => return Err("parent_close is a string".into()),
    };
    let delay = match fields.remove("delay_ms") {
        None => Duration::ZERO,
        Some(_) if kind == EntryKind::Call => {
            return Err("a call starts at once; delay a send instead".into())
        }
        Some(delay) => delay
            .as_u64()
            .map(Duration::from_millis)
            .filter(|d| *d <= MAX_DELAY)
            .ok_or_else(|| {
                "delay_ms is a whole number of milliseconds up to a year and a day".to_owned()
            })?,
    };
    if let Some(unknown) = fields.keys().next() {
        return Err(format!("a {what} entry's value has no field {unknown:?}"));
    }
    Ok(ChildRequest {
        service,
        handler,
        input,
        delay,
        workflow_id,
        parent_close,
    })
}

/// Refuses, in `entry`, a child workflow whose id names a run that has not ended: the
/// entry records the refusal instead (a `call` completes with it), so that every replay
/// sees the same. Nothing changes for an append sent again (its child took the id then).
/// Both the SDK's appends and plain handlers' calls go through here.
pub async fn refuse_if_taken(
    tx: &mut dyn crate::store::tables::Tx,
    parent: &str,
    entry: &mut crate::store::NewEntry,
) -> crate::store::StoreResult<()> {
    let crate::store::Effect::StartChild(child) = &entry.effect else {
        return Ok(());
    };
    let Some(workflow) = &child.workflow else {
        return Ok(());
    };
    let recorded = match (entry.index, tx.invocation(parent).await?) {
        (Some(index), Some(record)) => index < record.journal_len,
        _ => false,
    };
    if recorded {
        return Ok(());
    }
    tx.lock_workflow_id(&child.target.service, &workflow.workflow_id)
        .await?;
    let Some((run, _)) = tx
        .workflow_run(&child.target.service, &workflow.workflow_id)
        .await?
    else {
        return Ok(());
    };
    let live = tx
        .invocation(&run)
        .await?
        .is_some_and(|r| r.completed_at_ms.is_none());
    if !live {
        return Ok(());
    }
    let failure = durin_protocol::Failure {
        status: 409,
        error_type: Some("WorkflowIdTaken".into()),
        message: format!(
            "workflow {} id {:?} already names run {run}, which has not ended",
            child.target.service, workflow.workflow_id
        ),
    };
    let value = serde_json::json!({ "invocation_id": null, "refused": failure });
    entry.value = Some(value.to_string().into_bytes());
    entry.effect = crate::store::Effect::ChildRefused { failure };
    Ok(())
}

/// Inserts a child invocation, pending and due at `child.due_ms`, with its input entry and
/// its link to the parent's entry; a child workflow's run takes its id (which
/// [`refuse_if_taken`] found free).
pub async fn insert(
    tx: &mut dyn crate::store::tables::Tx,
    child: &crate::store::ChildStart,
    parent: &str,
    entry: &crate::store::StoredEntry,
    now_ms: i64,
) -> crate::store::StoreResult<()> {
    // The child's trace hangs under the parent's attempt that started it.
    let parent_trace = tx.invocation(parent).await?.and_then(|p| p.traceparent);
    let traceparent = crate::ids::InvocationId::parse(parent)
        .map(|p| {
            crate::telemetry::trace_context::child_traceparent(
                &p,
                parent_trace.as_deref(),
                entry.attempt,
            )
        })
        .ok();
    let pending = crate::store::tables::Pending {
        id: child.id.as_str(),
        service: &child.target.service,
        handler: &child.target.handler,
        deployment_id: &child.target.deployment_id,
        input: &child.input,
        due_ms: child.due_ms,
        deadline_ms: child.deadline_ms,
        workflow_id: child.workflow.as_ref().map(|w| w.workflow_id.as_str()),
        parent: Some((parent, child.awaited.then_some(entry.index))),
        parent_close: Some(child.parent_close),
        traceparent,
        idempotency_key: None,
    };
    // A child of a keyed handler takes its key's turn as any invocation does.
    let queued = match &child.key {
        Some(key) => crate::keys::must_queue(tx, &child.target.service, key).await?,
        None => false,
    };
    insert_pending(tx, &pending, now_ms).await?;
    if let Some(key) = &child.key {
        tx.set_key(child.id.as_str(), &child.target.service, key, queued, None)
            .await?;
    }
    if let Some(workflow) = &child.workflow {
        tx.take_workflow_id(
            &child.target.service,
            &workflow.workflow_id,
            child.id.as_str(),
            &workflow.input_digest,
        )
        .await?;
    }
    Ok(())
}

/// When an invocation a parent's `call` started has ended: its output or failure completes
/// the parent's entry (after the parent's timers due by then), and wakes the parent if it
/// waits for it. Nothing when the parent has ended.
pub async fn complete_parent(
    tx: &mut dyn crate::store::tables::Tx,
    child: &crate::store::InvocationRecord,
    output: Option<&crate::store::StoredEntry>,
    now_ms: i64,
) -> crate::store::StoreResult<()> {
    let (Some(parent), Some(index)) = (&child.parent_invocation_id, child.parent_index) else {
        return Ok(());
    };
    let open = tx
        .lock_invocation(parent)
        .await?
        .is_some_and(|p| !p.status.is_final());
    if !open {
        return Ok(());
    }
    super::sleep::fire_timers(tx, parent, now_ms, now_ms).await?;
    let (value, failure) = match child.status {
        crate::store::Status::Completed => (output.and_then(|o| o.value.clone()), None),
        _ => (None, child.failure.clone()),
    };
    let bytes = value.as_ref().map_or(0, Vec::len) as i64;
    super::completion::complete(tx, parent, index, value, failure, now_ms).await?;
    if bytes > 0 {
        tx.add_bytes(parent, bytes).await?;
    }
    super::completion::wake_if_waiting(tx, parent, index, now_ms).await?;
    Ok(())
}

/// Inserts an invocation that waits for the scheduler (a child, or the next run of a
/// workflow), with its JSON input entry, and counts its input.
pub async fn insert_pending(
    tx: &mut dyn crate::store::tables::Tx,
    new: &crate::store::tables::Pending<'_>,
    now_ms: i64,
) -> crate::store::StoreResult<()> {
    tx.insert_pending(new, now_ms).await?;
    let input = crate::store::StoredEntry {
        index: 0,
        kind: EntryKind::Input,
        name: None,
        value: Some(new.input.to_vec()),
        content_type: Some("application/json".into()),
        failure: None,
        attempt: 0,
        at_ms: now_ms,
        completion: None,
    };
    tx.insert_entry(new.id, &input).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn calls_and_sends_name_a_handler_and_carry_an_input() {
        let call = plan(
            EntryKind::Call,
            Some("order/process"),
            Some(json!({"input": 1})),
        );
        assert_eq!(
            call,
            Ok(ChildRequest {
                service: "order".into(),
                handler: "process".into(),
                input: json!(1),
                delay: Duration::ZERO,
                workflow_id: None,
                parent_close: ParentClose::Cancel,
            })
        );
        let send = plan(
            EntryKind::Send,
            Some("email/send"),
            Some(json!({"input": null, "delay_ms": 1500})),
        );
        assert_eq!(send.map(|s| s.delay), Ok(Duration::from_millis(1500)));
        let child = plan(
            EntryKind::Call,
            Some("billing/run"),
            Some(json!({"workflow_id": "acct-1", "parent_close": "abandon"})),
        );
        assert_eq!(
            child.map(|c| (c.workflow_id, c.parent_close)),
            Ok((Some("acct-1".into()), ParentClose::Abandon))
        );
        for (kind, name, value) in [
            (EntryKind::Call, Some("order"), json!({})),
            (EntryKind::Call, Some("9/x"), json!({})),
            (EntryKind::Call, None, json!({})),
            (EntryKind::Call, Some("a/b"), json!({"delay_ms": 5})),
            (EntryKind::Send, Some("a/b"), json!({"delay_ms": -5})),
            (EntryKind::Send, Some("a/b"), json!({"inputs": 5})),
            (EntryKind::Send, Some("a/b"), json!([1])),
            (EntryKind::Call, Some("a/b"), json!({"workflow_id": "w"})),
            (
                EntryKind::Call,
                Some("a/run"),
                json!({"workflow_id": "x/y"}),
            ),
            (
                EntryKind::Call,
                Some("a/run"),
                json!({"parent_close": "explode"}),
            ),
        ] {
            assert!(
                plan(kind, name, Some(value.clone())).is_err(),
                "{name:?} {value}"
            );
        }
    }
}
