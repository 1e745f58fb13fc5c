//! Continue-as-new: a workflow's run ends and its next run starts under the same workflow
//! id, with the input the handler gave and a fresh journal, in one transaction. A loop
//! that would grow its journal without bound (a subscription billed every month) keeps
//! it short this way.

use durin_protocol::Failure;
use serde_json::Value;

use crate::ids::InvocationId;
use crate::store::AttemptEnd;

/// The run's end; an invocation that is not a workflow's run has no next run, and fails.
pub(super) fn next_run(input: Value, workflow: bool) -> AttemptEnd {
    if !workflow {
        return AttemptEnd::Failed {
            failure: Failure {
                status: 500,
                error_type: Some("ProtocolViolation".into()),
                message: "continue_as_new ends a workflow's run, and this invocation is not one; start it with POST /v1/workflows/{workflow}/{id}".into(),
            },
            body: None,
        };
    }
    AttemptEnd::ContinuedAsNew {
        input: serde_json::to_vec(&input).unwrap_or_default(),
        next: InvocationId::generate(),
        // The engine resolves the newest deployment and its deadline.
        target: None,
        deadline_ms: None,
    }
}

/// The output entry of a run that continued as `next`.
pub fn output(next: &InvocationId) -> super::end::Output {
    let output = serde_json::json!({ "continued_as": next.as_str() });
    (
        Some(output.to_string().into_bytes()),
        Some("application/json".into()),
        None,
    )
}

/// Starts the next run of a workflow whose run `record` continues as new, in the
/// transaction that ends it (the workflow id is locked): `next`, pending and due now on
/// `target` (or the run's own deployment), takes the workflow id, the run's parent and
/// parent-close policy (a parent's `call` completes with the last run's result), and the
/// signals the run had not consumed, in order, with their idempotency keys.
pub async fn start_next_run(
    tx: &mut dyn crate::store::tables::Tx,
    record: &crate::store::InvocationRecord,
    input: &[u8],
    next: &InvocationId,
    target: Option<&crate::store::HandlerTarget>,
    deadline_ms: Option<i64>,
    now_ms: i64,
) -> crate::store::StoreResult<()> {
    let workflow_id = record.workflow_id.as_deref().ok_or_else(|| {
        crate::store::StoreError::Backend(
            format!(
                "invocation {} continued as new without a workflow id",
                record.id
            )
            .into(),
        )
    })?;
    let pending = crate::store::tables::Pending {
        id: next.as_str(),
        service: &record.service,
        handler: &record.handler,
        deployment_id: target.map_or(record.deployment_id.as_str(), |t| &t.deployment_id),
        input,
        due_ms: now_ms,
        deadline_ms,
        workflow_id: Some(workflow_id),
        parent: None,
        parent_close: None,
        traceparent: record.traceparent.clone(),
        idempotency_key: None,
    };
    crate::journal::child::insert_pending(tx, &pending, now_ms).await?;
    tx.inherit_parent(record.id.as_str(), next.as_str()).await?;
    tx.point_workflow_id(&record.service, workflow_id, next.as_str())
        .await?;
    // A plain run's updates that no update wait took were abandoned with it (their callers
    // heard that nothing was done): their deliveries are deleted; every other buffered
    // signal goes to the next run.
    tx.drop_buffered(record.id.as_str(), crate::store::PLAIN_UPDATE_SIGNAL_PREFIX)
        .await?;
    let (_, bytes) = tx.move_buffered(record.id.as_str(), next.as_str()).await?;
    if bytes > 0 {
        tx.add_bytes(next.as_str(), bytes).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_workflow_run_continues_as_new() {
        match next_run(serde_json::json!({"cycle": 4}), true) {
            AttemptEnd::ContinuedAsNew { input, .. } => assert_eq!(input, br#"{"cycle":4}"#),
            other => panic!("{other:?}"),
        }
        match next_run(Value::Null, false) {
            AttemptEnd::Failed { failure, .. } => {
                assert!(failure.message.contains("not one"), "{failure:?}")
            }
            other => panic!("{other:?}"),
        }
    }
}
