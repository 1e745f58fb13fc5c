//! Terminate: an invocation ended at once, without its handler (an operator's terminate,
//! a `schedule_to_close` deadline, a parent closing with policy `terminate`), with the
//! children it does not abandon.

use durin_protocol::Failure;

use crate::ids::InvocationId;
use crate::store::tables::Tx;
use crate::store::{
    InvocationRecord, ParentClose, Status, Store, StoreError, StoreResult, StoredEntry, Termination,
};

/// How [`end_now`] ends an invocation.
pub struct Ending {
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

impl dyn Store {
    /// Ends an invocation at once as `terminated`, with the children it does not abandon.
    pub async fn terminate(
        &self,
        id: &InvocationId,
        reason: String,
        now_ms: i64,
    ) -> StoreResult<Termination> {
        let route = id.to_string();
        self.contended(|| {
            let (id, reason) = (route.clone(), reason.clone());
            self.write(&route, move |tx| {
                Box::pin(async move {
                    let mut ended = Vec::new();
                    let ending = Ending {
                        children: format!("its parent {id} was terminated"),
                        ..Ending::terminated(reason)
                    };
                    let record = end_now(tx, &id, &ending, now_ms, &mut ended).await?;
                    Ok(Termination {
                        terminated: !ended.is_empty(),
                        record,
                        ended,
                    })
                })
            })
        })
        .await
    }

    /// Fails, with `ScheduleToCloseTimeout`, up to `limit` invocations whose deadline
    /// passed; what ended goes back with its output.
    pub async fn expire(
        &self,
        now_ms: i64,
        limit: u32,
    ) -> StoreResult<Vec<(InvocationRecord, StoredEntry)>> {
        self.contended(|| {
            self.write("expire", move |tx| {
                Box::pin(async move {
                    let mut ended = Vec::new();
                    for (id, created_at_ms, deadline_ms) in tx.past_deadline(now_ms, limit).await? {
                        let failure =
                            super::timeouts::schedule_to_close_failure(created_at_ms, deadline_ms);
                        let ending = Ending {
                            status: Status::Failed,
                            failure,
                            children: format!(
                                "its parent {id} passed its schedule_to_close timeout"
                            ),
                        };
                        end_now(tx, &id, &ending, now_ms, &mut ended).await?;
                    }
                    Ok(ended)
                })
            })
        })
        .await
    }
}

/// Ends an invocation at once and, with it, the children it does not abandon; what it
/// ended goes to `ended`. Returns the invocation's record (unchanged when it had ended).
pub async fn end_now(
    tx: &mut dyn Tx,
    id: &str,
    ending: &Ending,
    now_ms: i64,
    ended: &mut Vec<(InvocationRecord, StoredEntry)>,
) -> StoreResult<InvocationRecord> {
    crate::keys::lock_key_if_queued(tx, id).await?;
    let record = tx
        .lock_invocation(id)
        .await?
        .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
    if record.status.is_final() {
        return Ok(record);
    }
    let held_key = record.status != Status::Queued;
    let record = tx
        .mark_ended(id, ending.status, &ending.failure, 0, now_ms)
        .await?;
    if held_key {
        crate::keys::ended(tx, &record, now_ms).await?;
    }
    let output = super::end::output_entry(
        record.attempt,
        (None, None, Some(ending.failure.clone())),
        now_ms,
    );
    let (output, children) = super::end::record_output(tx, &record, output, now_ms).await?;
    crate::journal::child::complete_parent(tx, &record, Some(&output), now_ms).await?;
    ended.push((record.clone(), output));
    let ending = Ending::terminated(ending.children.clone());
    for (child, policy) in children {
        if policy != ParentClose::Abandon {
            Box::pin(end_now(tx, &child, &ending, now_ms, ended)).await?;
        }
    }
    Ok(record)
}
