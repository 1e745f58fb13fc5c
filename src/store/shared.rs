//! What both stores decide the same way, whatever their SQL: how an invocation is ended at
//! once, the next run of a workflow that continues as new, the output an attempt's end
//! records, and the refusal of a child whose workflow id is taken.

use durin_protocol::Failure;

use super::*;

/// How `end_now` ends an invocation.
pub(super) struct Ending {
    /// `terminated`, or `failed` for a timeout.
    pub status: Status,
    pub failure: Failure,
    /// The message of the children's own ending.
    pub children: String,
}

impl Ending {
    /// `terminated` (status 409, type `Terminated`) with `message`, which the children
    /// it takes along get too.
    pub fn terminated(message: String) -> Ending {
        Ending {
            status: Status::Terminated,
            failure: Failure {
                status: 409,
                error_type: Some("Terminated".into()),
                message: message.clone(),
            },
            children: message,
        }
    }
}

/// An invocation created pending by another one (a child, the next run of a workflow).
pub(super) struct Pending<'a> {
    pub id: &'a str,
    pub service: &'a str,
    pub handler: &'a str,
    pub deployment_id: &'a str,
    pub input: &'a [u8],
    pub due_ms: i64,
    pub deadline_ms: Option<i64>,
    pub workflow_id: Option<&'a str>,
    /// The parent and, for a `call`, its entry.
    pub parent: Option<(&'a str, Option<u32>)>,
    pub parent_close: Option<ParentClose>,
    /// The W3C `traceparent` its trace continues.
    pub traceparent: Option<String>,
}

/// The value, content type and failure of an output entry.
pub(super) type Output = (Option<Vec<u8>>, Option<String>, Option<Failure>);

/// What an attempt's end records besides the invocation's row.
pub(super) enum Recorded {
    /// An output entry (the invocation ended).
    Output(Output),
    /// The next run of the workflow, then its output entry (see [`next_run`]).
    ContinuedAsNew {
        input: Vec<u8>,
        next: InvocationId,
        target: Option<Box<HandlerTarget>>,
        deadline_ms: Option<i64>,
    },
    /// Nothing (a retry, a suspension, a pause).
    Nothing,
}

pub(super) fn recorded(end: AttemptEnd) -> Recorded {
    match end {
        AttemptEnd::Completed {
            output,
            content_type,
        } => Recorded::Output((Some(output), content_type, None)),
        AttemptEnd::Failed { failure, body } => {
            let (value, content_type) = body.unzip();
            Recorded::Output((value, content_type.flatten(), Some(failure)))
        }
        AttemptEnd::Cancelled { failure } => Recorded::Output((None, None, Some(failure))),
        AttemptEnd::ContinuedAsNew {
            input,
            next,
            target,
            deadline_ms,
        } => Recorded::ContinuedAsNew {
            input,
            next,
            target,
            deadline_ms,
        },
        AttemptEnd::BackOff { .. } | AttemptEnd::Suspended { .. } | AttemptEnd::Paused { .. } => {
            Recorded::Nothing
        }
    }
}

/// The next run of `record`'s workflow (`next`, pending and due at `now_ms`), on `target`
/// or the run's own deployment.
pub(super) fn next_run<'a>(
    record: &'a InvocationRecord,
    input: &'a [u8],
    next: &'a InvocationId,
    target: Option<&'a HandlerTarget>,
    deadline_ms: Option<i64>,
    now_ms: i64,
) -> Pending<'a> {
    Pending {
        id: next.as_str(),
        service: &record.service,
        handler: &record.handler,
        deployment_id: target.map_or(record.deployment_id.as_str(), |t| &t.deployment_id),
        input,
        due_ms: now_ms,
        deadline_ms,
        workflow_id: record.workflow_id.as_deref(),
        parent: None,
        parent_close: None,
        traceparent: record.traceparent.clone(),
    }
}

/// The output entry of a run that continued as `next`.
pub(super) fn continued_output(next: &InvocationId) -> Output {
    let output = serde_json::json!({ "continued_as": next.as_str() });
    (
        Some(output.to_string().into_bytes()),
        Some("application/json".into()),
        None,
    )
}

/// Makes `entry`, which would start `child`, record instead that the child's workflow id
/// names `run`, which has not ended (a `call` completes with the refusal), so that every
/// replay sees the same.
pub(super) fn refuse_taken_workflow_id(entry: &mut NewEntry, child: &ChildStart, run: &str) {
    let failure = Failure {
        status: 409,
        error_type: Some("WorkflowIdTaken".into()),
        message: format!(
            "workflow {} id {:?} already names run {run}, which has not ended",
            child.target.service,
            child
                .workflow
                .as_ref()
                .map_or("", |w| w.workflow_id.as_str())
        ),
    };
    let value = serde_json::json!({ "invocation_id": null, "refused": failure });
    entry.value = Some(value.to_string().into_bytes());
    entry.effect = Effect::ChildRefused { failure };
}
