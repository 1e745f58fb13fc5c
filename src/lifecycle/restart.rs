//! Restart: an operator runs an ended or paused invocation again from entry `from` (the
//! entries after it go, with their completions and timers; the signals they took go back
//! to the buffer; the durable state is rebuilt from the entries kept).

use crate::ids::InvocationId;
use crate::store::tables::{lock_with_workflow_id, Tx};
use crate::store::{InvocationRecord, Status, Store, StoreResult};

impl dyn Store {
    /// See [`restart`]. `Ok(Err(why))` when it is refused.
    pub async fn restart(
        &self,
        id: &InvocationId,
        from: u32,
        key: Option<String>,
        now_ms: i64,
    ) -> StoreResult<Result<(InvocationRecord, bool), String>> {
        let route = id.to_string();
        self.contended(|| {
            let (id, key) = (route.clone(), key.clone());
            self.write(&route, move |tx| {
                Box::pin(async move { restart(tx, &id, from, key.as_deref(), now_ms).await })
            })
        })
        .await
    }
}

/// Restarts invocation `id` from entry `from`, unless the restart with `key` was the last
/// one (it was done: `false`). Every check comes before the first write.
pub async fn restart(
    tx: &mut dyn Tx,
    id: &str,
    from: u32,
    key: Option<&str>,
    now_ms: i64,
) -> StoreResult<Result<(InvocationRecord, bool), String>> {
    let record = lock_with_workflow_id(tx, id).await?;
    if let Some(key) = key {
        // The last restart sent again (its answer was lost): it was done, whatever became
        // of the invocation since.
        if tx.restart_key(id).await?.as_deref() == Some(key) {
            return Ok(Ok((record, false)));
        }
    }
    let refuse = |why: String| Ok(Err(why));
    if !(record.status.is_final() || record.status == Status::Paused) {
        return refuse(format!(
            "invocation {id} is {}: pause it first, then restart it",
            record.status
        ));
    }
    if record.status == Status::Continued {
        return refuse(format!(
            "invocation {id} continued as new; its workflow id names a later run"
        ));
    }
    if let Some(workflow_id) = &record.workflow_id {
        if let Some((current, _)) = tx.workflow_run(&record.service, workflow_id).await? {
            if current != id {
                return refuse(format!(
                    "workflow {} id {workflow_id:?} now names run {current}: a restart of run {id} would give the id two runs",
                    record.service
                ));
            }
        }
    }
    if record.parent_index.is_some() && record.status.is_final() {
        return refuse(format!(
            "invocation {id} gave its result to its parent {}; restart the parent instead",
            record.parent_invocation_id.as_deref().unwrap_or_default()
        ));
    }
    // An ended invocation's last entry is its output, which goes.
    let last = record
        .journal_len
        .saturating_sub(if record.status.is_final() { 2 } else { 1 });
    if from == 0 || from > last {
        return refuse(format!(
            "a restart keeps entries 0 to N, with N from 1 to {last}, not {from}"
        ));
    }
    if let Some((index, kind)) = tx.first_start_after(id, from).await? {
        return refuse(format!(
            "entry {index} (a {kind}) comes after entry {from}: a restart from there would start it again"
        ));
    }
    tx.truncate(id, from).await?;
    tx.clear_state(id).await?;
    // The durable state as the entries kept left it.
    for (key, value) in tx.state_entries(id).await? {
        let op: serde_json::Value = value
            .as_deref()
            .and_then(|v| serde_json::from_slice(v).ok())
            .unwrap_or_default();
        let kept = op.get("set").map(|v| v.to_string().into_bytes());
        tx.put_state(id, &key, kept.as_deref()).await?;
    }
    // An ended run of a keyed handler takes its key's turn again: a place if one is free,
    // the end of the queue otherwise (a paused one holds its place still).
    let requeue = match (&record.key, record.status.is_final()) {
        (Some(key), true) if crate::keys::must_queue(tx, &record.service, key).await? => {
            Some(key.clone())
        }
        _ => None,
    };
    let keep_cancel = tx.has_cancel(id).await?;
    let record = tx
        .mark_restarted(
            id,
            from,
            &format!("restarted from entry {from} by an operator"),
            keep_cancel,
            key,
            now_ms,
        )
        .await?;
    // Its idempotency key names it again for as long as it runs.
    tx.hold_idempotency_keys(id, None).await?;
    let record = match requeue {
        Some(key) => {
            tx.set_key(id, &record.service, &key, true, None).await?;
            tx.invocation(id).await?.unwrap_or(record)
        }
        None => record,
    };
    Ok(Ok((record, true)))
}
