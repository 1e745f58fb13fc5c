//! Updates: sent to a workflow's run (the run its id names when the one addressed
//! continued as new), accepted or refused by the handler, answered with its `update_result`
//! entry. An update's idempotency key is unique per workflow id across its runs.

use durin_protocol::Failure;

use crate::ids::InvocationId;
use crate::store::tables::{lock_with_workflow_id, KeyScope, Tx};
use crate::store::{
    plain_update_signal, InvocationRecord, NewSignal, NewUpdate, Status, Store, StoreError,
    StoreResult, UpdateRecord, UpdateSent, UpdateStatus,
};

impl dyn Store {
    /// Stores an update for `run` (see [`send`]).
    pub async fn send_update(
        &self,
        run: &InvocationId,
        update: NewUpdate,
        now_ms: i64,
    ) -> StoreResult<UpdateSent> {
        let run = run.to_string();
        let max_bytes = self.journal_limits().max_bytes;
        self.write(&run.clone(), move |tx| {
            Box::pin(async move { send(tx, &run, update, max_bytes, now_ms).await })
        })
        .await
    }

    /// The running attempt refuses a pending update (its validator said no).
    pub async fn refuse_update(
        &self,
        run: &InvocationId,
        attempt: u32,
        token: String,
        id: &str,
        failure: Failure,
    ) -> StoreResult<UpdateRecord> {
        let (run, id) = (run.to_string(), id.to_owned());
        self.write(&run.clone(), move |tx| {
            Box::pin(async move {
                super::append::check_attempt(tx, &run, attempt, &token).await?;
                tx.set_update_status(
                    &run,
                    &id,
                    UpdateStatus::Pending,
                    UpdateStatus::Refused,
                    None,
                    Some(&failure),
                )
                .await?;
                tx.update(&run, &id)
                    .await?
                    .ok_or_else(|| StoreError::NotFound(format!("update {id} of invocation {run}")))
            })
        })
        .await
    }
}

/// The run a signal or an update for `id` goes to, locked: `id` itself, or, when `id`
/// continued as new, the run its workflow id names now. The workflow id is locked first,
/// so that no run of it continues as new meanwhile.
pub async fn receiving_run(tx: &mut dyn Tx, id: &str) -> StoreResult<InvocationRecord> {
    let record = lock_with_workflow_id(tx, id).await?;
    if let (Status::Continued, Some(workflow_id)) = (record.status, &record.workflow_id) {
        if let Some((current, _)) = tx.workflow_run(&record.service, workflow_id).await? {
            if current != id {
                return tx
                    .lock_invocation(&current)
                    .await?
                    .ok_or_else(|| StoreError::NotFound(current.clone()));
            }
        }
    }
    Ok(record)
}

/// Stores an update once per key; a suspended run becomes due to handle it at once (a
/// running attempt suspends into it). A plain handler's run gets it as a signal for its
/// update waits instead: a run suspended on one wakes, another waits until it waits for
/// updates.
pub async fn send(
    tx: &mut dyn Tx,
    run: &str,
    update: NewUpdate,
    max_bytes: i64,
    now_ms: i64,
) -> StoreResult<UpdateSent> {
    let record = receiving_run(tx, run).await?;
    if let Some(key) = &update.idempotency_key {
        if let Some(existing) = tx.update_by_key(KeyScope::of(&record), key).await? {
            return Ok(UpdateSent::Sent {
                update: existing,
                new: false,
                woke: false,
            });
        }
    }
    if record.status.is_final() {
        return Ok(UpdateSent::Ended(Box::new(record)));
    }
    let run = record.id.as_str();
    tx.insert_update(
        run,
        &update.id,
        &update.name,
        &update.input,
        update.idempotency_key.as_deref(),
        (record.status == Status::Running).then_some(record.attempt),
        now_ms,
    )
    .await?;
    let woke = if update.plain {
        let value = serde_json::json!({
            "update_id": update.id,
            "name": update.name,
            "input": crate::http::json_value(Some(&update.input)),
        });
        let signal = NewSignal {
            name: plain_update_signal(&update.name),
            value: serde_json::to_vec(&value).unwrap_or_default(),
            idempotency_key: None,
        };
        super::signal::insert(tx, &record, signal, max_bytes, now_ms)
            .await?
            .woke
    } else {
        if record.status == Status::Running {
            // The running attempt may not complete without handling it.
            tx.note_arrival(run, record.attempt).await?;
        }
        let woke = record.status == Status::Suspended;
        if woke {
            tx.wake_suspended(run, now_ms).await?;
        }
        woke
    };
    Ok(UpdateSent::Sent {
        update: UpdateRecord {
            invocation_id: record.id.clone(),
            id: update.id,
            name: update.name,
            status: UpdateStatus::Pending,
            result: None,
            failure: None,
        },
        new: true,
        woke,
    })
}
