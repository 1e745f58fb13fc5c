//! The rules of schedules over the store's tables, each in one transaction: setting a
//! schedule, pausing it, and a look at it (the fires due, a trigger by hand, a backfill),
//! whose runs start in the same transaction that moves the schedule on, so a fire starts
//! its run once however many nodes look.

use crate::lifecycle::timeouts::TimeoutDefaults;
use crate::store::tables::Tx;
use crate::store::{
    HandlerProtocol, HandlerTarget, NewInvocation, NewWorkflowRun, ScheduleRow, StoreError,
    StoreResult, WorkflowStarted,
};

use super::fires::{By, FireRecord, Look, Outcome, ScheduleState, Step};
use super::spec::{fire_workflow_id, Overlap, ScheduleSpec, Timing};

/// How long a schedule whose workflow no deployment serves waits before it looks again.
const NO_TARGET_RETRY_MS: i64 = 5_000;

/// What a look does.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    /// The fires due by now (what the loop does).
    Due,
    /// One fire now, by hand.
    Trigger { overlap: Overlap },
    /// Every fire from `from_ms` to `to_ms` (both included).
    Backfill {
        from_ms: i64,
        to_ms: i64,
        overlap: Overlap,
    },
}

/// What a rule found or did, once committed.
#[derive(Debug)]
pub struct Applied {
    pub row: ScheduleRow,
    /// The fires this rule recorded, in order.
    pub fires: Vec<FireRecord>,
    /// Runs started and runs asked to cancel: the engine's scheduler has work.
    pub woke: bool,
}

/// What a set found: refused when the config manages the schedule and an operator tries
/// to change it through the API.
#[derive(Debug)]
pub enum SetOutcome {
    Set { row: ScheduleRow, created: bool },
    Managed,
}

/// Where a start's deadline and size limits come from.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub timeouts: TimeoutDefaults,
    pub max_bytes: i64,
}

fn corrupt(id: &str, what: &str, error: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("schedule {id}: its stored {what} cannot be read: {error}").into())
}

/// A stored schedule's spec, timing and state.
pub fn read(row: &ScheduleRow) -> StoreResult<(ScheduleSpec, Timing, ScheduleState)> {
    let spec: ScheduleSpec =
        serde_json::from_str(&row.spec).map_err(|e| corrupt(&row.id, "spec", e))?;
    let timing = spec.check().map_err(|e| corrupt(&row.id, "spec", e))?;
    let state: ScheduleState =
        serde_json::from_str(&row.state).map_err(|e| corrupt(&row.id, "state", e))?;
    Ok((spec, timing, state))
}

fn write_state(row: &mut ScheduleRow, state: &ScheduleState, due_ms: Option<i64>) {
    row.state = serde_json::to_string(state).unwrap_or_default();
    row.due_ms = due_ms;
}

/// Creates or replaces schedule `id`. A changed timing fires after `now_ms` (nothing is
/// made up for the time before it); `paused` and `note`, when given, are set.
pub async fn set(
    tx: &mut dyn Tx,
    id: &str,
    spec: ScheduleSpec,
    source: &str,
    now_ms: i64,
) -> StoreResult<SetOutcome> {
    let timing = spec.check().map_err(|e| StoreError::Backend(e.into()))?;
    let spec_json = serde_json::to_string(&spec).unwrap_or_default();
    let existing = tx.lock_schedule(id).await?;
    let (mut state, created) = match &existing {
        Some(row) if row.source == "config" && source != "config" => {
            return Ok(SetOutcome::Managed)
        }
        Some(row) => {
            let (_, _, mut state) = read(row)?;
            if row.spec != spec_json {
                state.through_ms = state.through_ms.max(now_ms);
                state.updated_ms = now_ms;
            }
            if let Some(paused) = spec.paused {
                pause_state(&mut state, paused, now_ms);
            }
            if spec.note.is_some() {
                state.note.clone_from(&spec.note);
            }
            (state, false)
        }
        None => (ScheduleState::new(&spec, now_ms), true),
    };
    let look = Look {
        id,
        spec: &spec,
        timing: &timing,
        now_ms,
    };
    let due = look.next_due(&state);
    state.fresh.clear();
    let mut row = ScheduleRow {
        id: id.to_owned(),
        source: source.to_owned(),
        spec: spec_json,
        state: String::new(),
        due_ms: None,
    };
    write_state(&mut row, &state, due);
    tx.put_schedule(&row).await?;
    Ok(SetOutcome::Set { row, created })
}

/// Fires that fall while a schedule is paused are not made up when it is unpaused.
fn pause_state(state: &mut ScheduleState, paused: bool, now_ms: i64) {
    if state.paused && !paused {
        state.through_ms = state.through_ms.max(now_ms);
    }
    state.paused = paused;
}

/// Pauses or unpauses schedule `id`, with a note when given; `None` when there is none.
pub async fn pause(
    tx: &mut dyn Tx,
    id: &str,
    paused: bool,
    note: Option<String>,
    now_ms: i64,
) -> StoreResult<Option<ScheduleRow>> {
    let Some(mut row) = tx.lock_schedule(id).await? else {
        return Ok(None);
    };
    let (spec, timing, mut state) = read(&row)?;
    pause_state(&mut state, paused, now_ms);
    if note.is_some() {
        state.note = note;
    }
    let look = Look {
        id,
        spec: &spec,
        timing: &timing,
        now_ms,
    };
    let due = look.next_due(&state);
    write_state(&mut row, &state, due);
    tx.put_schedule(&row).await?;
    Ok(Some(row))
}

/// Deletes schedule `id` unless the config manages it (and `source` is not the config).
/// The runs it started go on. `None` when there is none.
pub async fn delete(tx: &mut dyn Tx, id: &str, source: &str) -> StoreResult<Option<SetOutcome>> {
    let Some(row) = tx.lock_schedule(id).await? else {
        return Ok(None);
    };
    if row.source == "config" && source != "config" {
        return Ok(Some(SetOutcome::Managed));
    }
    tx.delete_schedule(id).await?;
    Ok(Some(SetOutcome::Set {
        row,
        created: false,
    }))
}

/// A look at schedule `id`: the fires `op` names, started with `target` (the newest
/// deployment of its workflow), skipped, made to wait or counted missed by the overlap
/// policy and the catch-up window. A look at a schedule that another look moved on
/// already does nothing. `None` when there is no such schedule.
pub async fn look(
    tx: &mut dyn Tx,
    id: &str,
    op: Op,
    now_ms: i64,
    target: Option<&HandlerTarget>,
    limits: Limits,
) -> StoreResult<Option<Applied>> {
    let Some(mut row) = tx.lock_schedule(id).await? else {
        return Ok(None);
    };
    if matches!(op, Op::Due) && row.due_ms.is_none_or(|due| due > now_ms) {
        return Ok(Some(Applied {
            row,
            fires: Vec::new(),
            woke: false,
        }));
    }
    let (spec, timing, mut state) = read(&row)?;
    let before = state.clone();
    forget_ended(tx, &spec.start.workflow, &mut state).await?;
    let look = Look {
        id,
        spec: &spec,
        timing: &timing,
        now_ms,
    };
    let (steps, due) = match op {
        Op::Due => look.due(&mut state),
        Op::Trigger { overlap } => {
            let steps = look.fire(&mut state, now_ms, overlap, By::Trigger);
            (steps, look.next_due(&state))
        }
        Op::Backfill {
            from_ms,
            to_ms,
            overlap,
        } => {
            let mut steps = Vec::new();
            let mut at = from_ms - 1;
            while let Some(next) = timing.next_after(at).filter(|next| *next <= to_ms) {
                steps.extend(look.fire(&mut state, next, overlap, By::Backfill));
                at = next;
            }
            (steps, look.next_due(&state))
        }
    };
    let starts = steps.iter().any(|step| matches!(step, Step::Start { .. }));
    if let (true, None) = (starts, target) {
        // Nothing is lost: the fires stay due, and are looked at again shortly (or
        // counted missed once they are older than the catch-up window).
        let mut waiting = before;
        waiting.last_error = Some(format!(
            "no deployment serves workflow {}; register one with POST /v1/deployments",
            spec.start.workflow
        ));
        write_state(&mut row, &waiting, Some(now_ms + NO_TARGET_RETRY_MS));
        tx.put_schedule(&row).await?;
        return Ok(Some(Applied {
            row,
            fires: Vec::new(),
            woke: false,
        }));
    }
    let mut woke = false;
    // Cancellations after the starts, each run once, their workflow ids locked in order
    // before any of their runs: the lock order every rule keeps.
    let mut cancels = std::collections::BTreeSet::new();
    for step in steps {
        match step {
            Step::Start { nominal_ms, by } => {
                let Some(target) = target else {
                    continue;
                };
                let record = start(tx, id, &spec, target, nominal_ms, by, now_ms, limits).await?;
                if record.outcome == Outcome::AlreadyStarted {
                    // Not a run of this schedule's to wait for unless it still runs.
                    forget_ended(tx, &spec.start.workflow, &mut state).await?;
                }
                woke |= record.outcome == Outcome::Started;
                state.record(record);
            }
            Step::Cancel(workflow_ids) => cancels.extend(workflow_ids),
        }
    }
    for workflow_id in &cancels {
        tx.lock_workflow_id(&spec.start.workflow, workflow_id)
            .await?;
    }
    for workflow_id in &cancels {
        woke |= cancel(tx, &spec.start.workflow, workflow_id, now_ms).await?;
    }
    state.last_error = None;
    if due.is_none() && !state.paused {
        state.last_error = Some(format!(
            "it has no fire after {}: it fires no more",
            super::spec::rfc3339(state.through_ms)
        ));
    }
    finish(tx, row, state, due, woke).await
}

async fn finish(
    tx: &mut dyn Tx,
    mut row: ScheduleRow,
    mut state: ScheduleState,
    due: Option<i64>,
    woke: bool,
) -> StoreResult<Option<Applied>> {
    let fires = std::mem::take(&mut state.fresh);
    write_state(&mut row, &state, due);
    tx.put_schedule(&row).await?;
    Ok(Some(Applied { row, fires, woke }))
}

/// Drops from `state.running` the workflow ids whose run has ended (or that name none).
async fn forget_ended(
    tx: &mut dyn Tx,
    workflow: &str,
    state: &mut ScheduleState,
) -> StoreResult<()> {
    let mut running = Vec::with_capacity(state.running.len());
    for workflow_id in std::mem::take(&mut state.running) {
        let Some((invocation, _)) = tx.workflow_run(workflow, &workflow_id).await? else {
            continue;
        };
        let live = tx
            .invocation(&invocation)
            .await?
            .is_some_and(|record| !record.status.is_final());
        if live && !running.contains(&workflow_id) {
            running.push(workflow_id);
        }
    }
    state.running = running;
    Ok(())
}

/// Starts the run of the fire at `nominal_ms`, due at once for the scheduler.
#[allow(clippy::too_many_arguments)]
async fn start(
    tx: &mut dyn Tx,
    id: &str,
    spec: &ScheduleSpec,
    target: &HandlerTarget,
    nominal_ms: i64,
    by: By,
    now_ms: i64,
    limits: Limits,
) -> StoreResult<FireRecord> {
    let workflow_id = fire_workflow_id(id, nominal_ms);
    let input = serde_json::to_vec(&spec.start.input).unwrap_or_default();
    let content_type = "application/json";
    let input_digest = match target.protocol {
        HandlerProtocol::Sdk { .. } => crate::lifecycle::start::json_digest(&spec.start.input),
        HandlerProtocol::Plain => crate::lifecycle::start::bytes_digest(Some(content_type), &input),
    };
    let run = NewWorkflowRun {
        invocation: NewInvocation {
            id: crate::ids::InvocationId::generate(),
            target: target.clone(),
            input,
            content_type: Some(content_type.into()),
            idempotency: None,
            now_ms,
            deadline_ms: limits.timeouts.deadline(&target.spec, now_ms),
            traceparent: None,
            run_now: false,
            key: None,
        },
        workflow_id: workflow_id.clone(),
        input_digest,
        new_run_after_end: false,
        signal: None,
    };
    let started = crate::lifecycle::start::start_workflow(tx, run, limits.max_bytes).await?;
    let (outcome, detail) = match started {
        WorkflowStarted::New { record, .. } => (Outcome::Started, format!("run {}", record.id)),
        WorkflowStarted::Existing(record)
        | WorkflowStarted::Conflict(record)
        | WorkflowStarted::DuplicateSignal(record) => (
            Outcome::AlreadyStarted,
            format!(
                "the workflow id names run {} ({}) already",
                record.id, record.status
            ),
        ),
    };
    Ok(FireRecord {
        nominal_ms,
        at_ms: now_ms,
        outcome,
        workflow_id: Some(workflow_id),
        detail: Some(detail),
        by,
    })
}

/// Asks the run a workflow id names to cancel; whether that was new.
async fn cancel(
    tx: &mut dyn Tx,
    workflow: &str,
    workflow_id: &str,
    now_ms: i64,
) -> StoreResult<bool> {
    let Some((invocation, _)) = tx.workflow_run(workflow, workflow_id).await? else {
        return Ok(false);
    };
    // A schedule's runs are workflow runs, which are never queued for a key.
    let mut ended = Vec::new();
    match crate::lifecycle::cancel::request(tx, &invocation, now_ms, &mut ended).await {
        Ok(crate::store::CancelAnswer::Requested(_)) => Ok(true),
        Ok(_) | Err(StoreError::NotFound(_)) => Ok(false),
        Err(error) => Err(error),
    }
}
