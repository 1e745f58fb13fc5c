//! Start: a new invocation, its first attempt running at once (once per idempotency
//! key), and a workflow's run, once per workflow id (with signal-with-start).
//!
//! Everything that reads or moves a workflow id (a start, a signal-with-start, a
//! continue-as-new, a child workflow, a restart) takes the id's lock first, so that an id
//! names one live run at a time under any concurrency, on every node.

use sha2::{Digest, Sha256};

use crate::store::tables::{KeyScope, Tx};
use crate::store::{
    Created, InvocationRecord, NewInvocation, NewWorkflowRun, Status, Store, StoreError,
    StoreResult, StoredEntry, WorkflowStarted,
};

impl dyn Store {
    /// See [`create`].
    pub async fn create_invocation(&self, new: NewInvocation) -> StoreResult<Created> {
        let Some(key) = &new.key else {
            let route = new.id.to_string();
            return self
                .write_repeatable(&route, move |tx| {
                    let new = new.clone();
                    Box::pin(async move { create(tx, new).await })
                })
                .await;
        };
        // The creations of one key go to one writer, so that they do not contend with
        // each other; a holder's end elsewhere may still hold the key for a moment.
        let route = format!("{}/key:{}", new.target.service, key.key);
        self.contended(|| {
            let new = new.clone();
            self.write(&route, move |tx| {
                Box::pin(async move { create(tx, new).await })
            })
        })
        .await
    }

    /// See [`start_workflow`].
    pub async fn start_workflow(&self, run: NewWorkflowRun) -> StoreResult<WorkflowStarted> {
        let key = format!("{}/{}", run.invocation.target.service, run.workflow_id);
        let max_bytes = self.journal_limits().max_bytes;
        self.write(&key, move |tx| {
            Box::pin(async move { start_workflow(tx, run, max_bytes).await })
        })
        .await
    }
}

/// Creates an invocation running its first attempt, unless its idempotency key names one
/// that has not expired (the same request: that one; another request: a refusal).
pub async fn create(tx: &mut dyn Tx, new: NewInvocation) -> StoreResult<Created> {
    if let Some(claim) = &new.idempotency {
        tx.lock_idempotency_key(&claim.scope, &claim.key).await?;
        if let Some((digest, invocation_id, expires_at_ms)) =
            tx.idempotency_key(&claim.scope, &claim.key).await?
        {
            if expires_at_ms > new.now_ms {
                if digest != claim.request_digest {
                    return Ok(Created::KeyReused { invocation_id });
                }
                return match tx.invocation(&invocation_id).await? {
                    Some(record) => Ok(Created::Existing(record)),
                    None => Err(StoreError::Backend(
                        format!("idempotency key names missing invocation {invocation_id}").into(),
                    )),
                };
            }
            tx.delete_idempotency_key(&claim.scope, &claim.key).await?;
        }
    }
    let Some(key) = new.key.clone() else {
        let (record, input) = insert_running(tx, new, None, None).await?;
        return Ok(Created::New {
            record,
            input: Box::new(input),
            superseded: Vec::new(),
        });
    };
    // Debounced, it replaces the newest invocation of its handler and key that has not
    // started, and waits the debounce before it starts itself (its burst's bound at most).
    let service = new.target.service.clone();
    let mut superseded = Vec::new();
    let replaced = match key.debounce_ms {
        Some(_) => {
            crate::keys::supersede(
                tx,
                (service.as_str(), new.target.handler.as_str()),
                &key,
                new.id.as_str(),
                new.now_ms,
                &mut superseded,
            )
            .await?
        }
        None => None,
    };
    let (due_ms, debounce_until_ms) = crate::keys::debounced(&key, replaced, new.now_ms);
    // A keyed handler's invocation runs if its key has a free place, and waits its turn
    // otherwise (created pending, then queued: it never runs on this node at once). Under
    // a rate, the scheduler's claim starts it when the rate lets it.
    let queued = crate::keys::must_queue(tx, &service, &key).await?;
    let new = NewInvocation {
        run_now: new.run_now && !queued && due_ms.is_none() && key.rate.is_none(),
        ..new
    };
    let (record, input) = insert_running(tx, new, None, due_ms).await?;
    tx.set_key(
        record.id.as_str(),
        &service,
        &key,
        queued,
        debounce_until_ms,
    )
    .await?;
    let record = tx.invocation(record.id.as_str()).await?.unwrap_or(record);
    Ok(Created::New {
        record,
        input: Box::new(input),
        superseded,
    })
}

/// Inserts a new invocation with its input entry and its idempotency claim: running its
/// first attempt, or (when `new.run_now` is false) due for the scheduler at `due_ms`
/// (now when `None`).
async fn insert_running(
    tx: &mut dyn Tx,
    new: NewInvocation,
    workflow_id: Option<&str>,
    due_ms: Option<i64>,
) -> StoreResult<(InvocationRecord, StoredEntry)> {
    let input = StoredEntry {
        index: 0,
        kind: durin_protocol::EntryKind::Input,
        name: None,
        value: Some(new.input.clone()),
        content_type: new.content_type.clone(),
        failure: None,
        attempt: 0,
        at_ms: new.now_ms,
        completion: None,
    };
    let record = if new.run_now {
        let token = super::claim::attempt_token();
        tx.insert_running(&new, workflow_id, &token, &input).await?
    } else {
        let pending = crate::store::tables::Pending {
            id: new.id.as_str(),
            service: &new.target.service,
            handler: &new.target.handler,
            deployment_id: &new.target.deployment_id,
            input: &new.input,
            due_ms: due_ms.unwrap_or(new.now_ms),
            deadline_ms: new.deadline_ms,
            workflow_id,
            parent: None,
            parent_close: None,
            traceparent: new.traceparent.clone(),
            idempotency_key: new.idempotency.as_ref().map(|c| c.key.as_str()),
        };
        tx.insert_pending(&pending, new.now_ms).await?;
        tx.insert_entry(new.id.as_str(), &input).await?;
        tx.invocation(new.id.as_str())
            .await?
            .ok_or_else(|| StoreError::Backend("a new invocation could not be read".into()))?
    };
    if let Some(claim) = &new.idempotency {
        // It expires only once the invocation has ended (see `record_output`).
        tx.insert_idempotency_key(claim, record.id.as_str()).await?;
    }
    Ok((record, input))
}

/// Starts a run of a workflow by id: a new run when the id names none (or, with
/// `new_run_after_end`, one that ended); otherwise the run it names (the same input, or a
/// signal-with-start, which delivers its signal to a run that has not ended) or a conflict.
pub async fn start_workflow(
    tx: &mut dyn Tx,
    run: NewWorkflowRun,
    max_bytes: i64,
) -> StoreResult<WorkflowStarted> {
    let workflow = run.invocation.target.service.clone();
    tx.lock_workflow_id(&workflow, &run.workflow_id).await?;
    let scope = KeyScope::Workflow {
        workflow: &workflow,
        workflow_id: &run.workflow_id,
    };
    // A signal-with-start sent again whose signal a run of this id received already
    // answers the run the id names, even when it has ended since.
    let duplicate_signal = match run.signal.as_ref().and_then(|s| s.idempotency_key.as_ref()) {
        Some(key) => tx.signal_by_key(scope, key).await?.is_some(),
        None => false,
    };
    if let Some((invocation_id, digest)) = tx.workflow_run(&workflow, &run.workflow_id).await? {
        let record = tx.lock_invocation(&invocation_id).await?.ok_or_else(|| {
            StoreError::Backend(format!("workflow names missing invocation {invocation_id}").into())
        })?;
        if duplicate_signal {
            return Ok(WorkflowStarted::DuplicateSignal(record));
        }
        let ended = record.status.is_final();
        if !(ended && run.new_run_after_end) {
            if let (Some(signal), false) = (run.signal, ended) {
                crate::journal::signal::insert(
                    tx,
                    &record,
                    signal,
                    max_bytes,
                    run.invocation.now_ms,
                )
                .await?;
                let record = tx.invocation(&invocation_id).await?.unwrap_or(record);
                return Ok(WorkflowStarted::Existing(record));
            }
            if digest == run.input_digest {
                return Ok(WorkflowStarted::Existing(record));
            }
            return Ok(WorkflowStarted::Conflict(record));
        }
    }
    let now_ms = run.invocation.now_ms;
    let (record, input) = insert_running(tx, run.invocation, Some(&run.workflow_id), None).await?;
    tx.take_workflow_id(
        &workflow,
        &run.workflow_id,
        record.id.as_str(),
        &run.input_digest,
    )
    .await?;
    if let Some(signal) = run.signal.filter(|_| !duplicate_signal) {
        // The run's first attempt has not called its handler yet: the signal is there
        // before it starts, not during it.
        let before_start = InvocationRecord {
            status: Status::Pending,
            ..record.clone()
        };
        crate::journal::signal::insert(tx, &before_start, signal, max_bytes, now_ms).await?;
    }
    Ok(WorkflowStarted::New {
        record,
        input: Box::new(input),
    })
}

/// The digest of an SDK handler's JSON input: of its value, not its bytes (serde_json's
/// maps are sorted by key, so whitespace and key order do not make a start look new).
pub fn json_digest(input: &serde_json::Value) -> String {
    crate::http::hex(&Sha256::digest(input.to_string().as_bytes()))
}

/// The digest of a plain handler's input: of its bytes and their type.
pub fn bytes_digest(content_type: Option<&str>, body: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(content_type.unwrap_or_default().as_bytes());
    hasher.update([0]);
    hasher.update(body);
    crate::http::hex(&hasher.finalize())
}
