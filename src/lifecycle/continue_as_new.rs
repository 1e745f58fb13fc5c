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
