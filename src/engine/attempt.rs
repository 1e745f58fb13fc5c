//! One attempt: call the handler with the journal, decide how the attempt ended (retry
//! policy, timeouts, suspension, non-determinism) and record that end in the store.
//!
//! The engine never writes storage except through the store's fenced methods: an attempt
//! that was fenced (a newer attempt, a pause) finds its end refused and leaves quietly.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::{Ended, Engine};
use crate::ids::InvocationId;
use crate::lifecycle::{self, pause};
use crate::store::{
    AttemptEnd, CancelAnswer, Charge, ClusterEvent, HandlerProtocol, InvocationRecord, NewEntry,
    Status, StoreError, StoredEntry,
};
use durin_protocol::Outcome;

/// The longest pause between two tries of recording an attempt's end.
const MAX_END_RETRY: Duration = Duration::from_secs(5);

impl Engine {
    /// Runs an attempt the store has started: reads the journal (unless given), calls the
    /// handler, records the end, and tells waiting callers when the invocation ended.
    pub(super) async fn run_attempt(
        &self,
        record: InvocationRecord,
        journal: Option<Vec<StoredEntry>>,
    ) {
        // Every event of the attempt carries these fields.
        let span = tracing::info_span!(
            "attempt",
            invocation = %record.id,
            attempt = record.attempt,
            service = %record.service,
            handler = %record.handler,
        );
        tracing::Instrument::instrument(self.run_attempt_in_span(record, journal), span).await
    }

    async fn run_attempt_in_span(
        &self,
        record: InvocationRecord,
        journal: Option<Vec<StoredEntry>>,
    ) {
        let id = record.id.clone();
        let labels = [
            ("service", record.service.clone()),
            ("handler", record.handler.clone()),
        ];
        metrics::counter!(crate::telemetry::ATTEMPTS, &labels).increment(1);
        if record.attempt == 1 {
            metrics::counter!(crate::telemetry::STARTED, &labels).increment(1);
        }
        if let Some(due) = record.scheduled_at_ms {
            let late = self.clock.now_ms().saturating_sub(due).max(0);
            metrics::histogram!(crate::telemetry::LAG).record(late as f64 / 1000.0);
        }
        let journal = match journal {
            Some(journal) => journal,
            None => match self.store.read_journal(&id).await {
                Ok(journal) => journal,
                Err(error) => {
                    // The attempt stays running in the store; end it as a retry so that
                    // the scheduler takes it again.
                    tracing::error!(%id, %error, "could not read the journal");
                    let end = AttemptEnd::BackOff {
                        until_ms: self.clock.now_ms() + 1_000,
                        error: format!("the journal could not be read: {error}"),
                        charged: Charge::Nobody,
                    };
                    self.record_end(&record, end).await;
                    return;
                }
            },
        };
        // A node that was frozen past its leases may have lost this attempt to another.
        if !self.store.lease_held() {
            match self.store.get_invocation(&id).await {
                Ok(Some(now)) if now.attempt == record.attempt && now.status == Status::Running => {
                }
                Ok(_) => {
                    tracing::warn!(%id, attempt = record.attempt, "attempt taken over by another node; not run");
                    for observer in &self.observers {
                        observer.attempt_ended(&id, record.attempt);
                    }
                    self.attempt_recorded(&id, record.attempt);
                    return;
                }
                Err(error) => {
                    // Not run, and ended as a retry (fenced if another node took it
                    // meanwhile), which runs in a second rather than once its lease
                    // expires.
                    tracing::warn!(%id, %error, "cannot check the lease of an attempt; not run, retried later");
                    for observer in &self.observers {
                        observer.attempt_ended(&id, record.attempt);
                    }
                    let end = AttemptEnd::BackOff {
                        until_ms: self.clock.now_ms() + 1_000,
                        error: format!("the attempt's lease could not be checked: {error}"),
                        charged: Charge::Nobody,
                    };
                    self.record_end(&record, end).await;
                    return;
                }
            }
        }
        let started_ms = self.clock.now_ms();
        let known = journal.len();
        let ended = self.call(&record, journal).await;
        self.heartbeats.forget(&id, record.attempt);
        // The handler has answered (or given up): its egress calls are over.
        for observer in &self.observers {
            observer.attempt_ended(&id, record.attempt);
        }
        let (entries, end) = match ended {
            Ok(ended) => ended,
            Err(error) => {
                tracing::error!(%id, %error, "store failed during an attempt");
                let end = AttemptEnd::BackOff {
                    until_ms: self.clock.now_ms() + 1_000,
                    error: format!("the store failed during the attempt: {error}"),
                    charged: Charge::Nobody,
                };
                (Vec::new(), end)
            }
        };
        let backing_off = matches!(end, AttemptEnd::BackOff { .. });
        let error = end.error().map(str::to_owned);
        let ended = self.record_end_after(&record, entries, end).await;
        self.log_end(&record, ended, backing_off, error.as_deref())
            .await;
        if let (true, Some((status, recorded))) = (self.config.traces.enabled(), ended) {
            let error = error.filter(|_| recorded);
            self.trace_attempt(
                &record,
                started_ms,
                known,
                status.as_str(),
                error.as_deref(),
            )
            .await;
        }
    }

    /// Logs how an attempt ended, as the store has it: a failure that backs off as a
    /// failure; an attempt that was fenced as what it is. A plain handler whose wait
    /// suspended the attempt (through the context API) answers anything, often a `503`,
    /// which is ignored: the attempt is suspended, not failed. An attempt fenced by
    /// something else (a cancellation, a pause, a newer attempt) is superseded.
    async fn log_end(
        &self,
        record: &InvocationRecord,
        ended: Option<(Status, bool)>,
        backing_off: bool,
        error: Option<&str>,
    ) {
        let (id, attempt) = (&record.id, record.attempt);
        match ended {
            Some((_, true)) if backing_off => {
                let error = error.unwrap_or_default();
                tracing::info!(%id, attempt, %error, "attempt failed; backing off");
            }
            // The handler completed, but a signal came during the attempt that no wait
            // took: the run runs again to see it (see `lifecycle::end`).
            Some((Status::BackingOff, true)) => {
                tracing::info!(
                    %id,
                    attempt,
                    "completion deferred: a signal came while the attempt ran; running again"
                );
            }
            Some((Status::Suspended, recorded)) => {
                if !tracing::enabled!(tracing::Level::DEBUG) {
                    return;
                }
                // What it waits for, read only when it is logged.
                let waiting = match self.store.get_invocation(id).await {
                    Ok(Some(now)) if now.attempt == attempt && now.status == Status::Suspended => {
                        Some(now)
                    }
                    _ => None,
                };
                let waiting_for = waiting
                    .as_ref()
                    .map(|now| format!("{:?}", now.waiting_for))
                    .unwrap_or_default();
                let until_ms = waiting.and_then(|now| now.next_run_at_ms);
                // `recorded` false: the handler's answer came after its wait had suspended
                // the attempt, and was ignored.
                tracing::debug!(
                    %id,
                    attempt,
                    entries = %waiting_for,
                    until_ms,
                    answer_ignored = !recorded,
                    "attempt suspended, waiting for its commands"
                );
            }
            Some((status, false)) => {
                tracing::debug!(
                    %id,
                    attempt,
                    status = status.as_str(),
                    answer = error.unwrap_or_default(),
                    "attempt superseded; its answer is ignored"
                );
            }
            _ => {}
        }
    }

    /// Exports the span of an attempt that ended, with a span for each entry it appended
    /// (read back from the journal: they came through the context API or the egress).
    async fn trace_attempt(
        &self,
        record: &InvocationRecord,
        started_ms: i64,
        known: usize,
        outcome: &str,
        error: Option<&str>,
    ) {
        let appended = match self.store.read_journal(&record.id).await {
            Ok(journal) => journal
                .into_iter()
                .skip(known)
                .filter(|entry| entry.attempt == record.attempt)
                .collect(),
            Err(_) => Vec::new(),
        };
        self.config.traces.attempt(
            record,
            started_ms,
            self.clock.now_ms(),
            outcome,
            error,
            &appended,
        );
    }

    /// Records how an attempt ended, trying again while the store fails (the handler's
    /// outcome is never thrown away), until it is recorded or fenced. Returns the
    /// invocation's status after the attempt and whether this end is what made it so
    /// (`false`: something else changed it first, such as a plain handler's suspension);
    /// `None` when it is left to the next start, or the invocation is gone.
    async fn record_end(
        &self,
        record: &InvocationRecord,
        end: AttemptEnd,
    ) -> Option<(Status, bool)> {
        self.record_end_after(record, Vec::new(), end).await
    }

    /// As [`Engine::record_end`], after appending the entries the outcome carried.
    async fn record_end_after(
        &self,
        record: &InvocationRecord,
        entries: Vec<NewEntry>,
        end: AttemptEnd,
    ) -> Option<(Status, bool)> {
        let id = &record.id;
        let mut pause = Duration::from_millis(50);
        loop {
            let ended = self
                .end_attempt_after(id, record.attempt, entries.clone(), end.clone())
                .await;
            match ended {
                Ok(ended) => {
                    self.attempt_recorded(id, record.attempt);
                    return Some((ended.status, true));
                }
                // The invocation changed under this attempt (a newer attempt, a pause):
                // whoever changed it scheduled what comes next.
                Err(StoreError::Fenced { status, .. }) => {
                    self.attempt_recorded(id, record.attempt);
                    return Some((status, false));
                }
                Err(StoreError::NotFound(_)) => {
                    self.attempt_recorded(id, record.attempt);
                    return None;
                }
                // Another transaction held its key: nothing is wrong, try again soon.
                Err(StoreError::Contended(_)) => {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err(error) => {
                    tracing::error!(%id, %error, "could not record the end of an attempt; trying again");
                    if self.shutdown.is_cancelled() {
                        // Left running in the store: recovered at the next start.
                        return None;
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MAX_END_RETRY);
                }
            }
        }
    }

    /// Calls the handler and decides how the attempt ended: the entries its outcome
    /// carried (version 5), to append with the end, and the end.
    async fn call(
        &self,
        record: &InvocationRecord,
        journal: Vec<StoredEntry>,
    ) -> Result<(Vec<NewEntry>, AttemptEnd), StoreError> {
        let Some(target) = self
            .targets
            .pinned(
                &*self.store,
                &record.deployment_id,
                &record.service,
                &record.handler,
            )
            .await?
        else {
            return Ok((
                Vec::new(),
                pause::deployment_gone(&record.deployment_id, &record.service, &record.handler),
            ));
        };
        // A journal with entries newer than the deployment's protocol would be misread:
        // wait for an operator instead of failing it.
        if let HandlerProtocol::Sdk { version } = target.protocol {
            if let Some(paused) =
                pause::unreadable_journal(&journal, version, &target.deployment_id)
            {
                return Ok((Vec::new(), paused));
            }
        }
        // Past its `schedule_to_close` deadline (a timer or a retry came due after it, and
        // this claim ran before the deadline sweep): it fails as the sweep would fail it,
        // instead of running after its time.
        if let Some(deadline_ms) = record.deadline_ms {
            if deadline_ms <= self.clock.now_ms() {
                let failure = lifecycle::timeouts::schedule_to_close_failure(
                    record.created_at_ms,
                    deadline_ms,
                );
                return Ok((
                    Vec::new(),
                    AttemptEnd::Failed {
                        failure,
                        body: None,
                    },
                ));
            }
        }
        // Started too late for what it was for: it fails instead of running.
        if let (Some(limit), Some(due)) = (
            self.config.timeouts.schedule_to_start(&target.spec),
            record.scheduled_at_ms,
        ) {
            let late = self.clock.now_ms().saturating_sub(due);
            if let Some(end) = lifecycle::timeouts::started_too_late(late, limit) {
                return Ok((Vec::new(), end));
            }
        }
        let policy = target
            .spec
            .retry_policy
            .clone()
            .unwrap_or_else(|| self.config.default_retry_policy.clone());
        let mut answer = self.call_handler(record, &target, journal).await;
        let entries = trailing_entries(&mut answer, record, self.clock.now_ms());
        let facts = lifecycle::Facts {
            failures: record.failures,
            cancelling: record.cancel_requested_at_ms.is_some(),
            workflow: record.workflow_id.is_some(),
            pause_when_exhausted: self.config.pause_when_exhausted,
            jitter: jitter(&record.id, record.attempt),
        };
        let mut end = lifecycle::decide(facts, &policy, answer, self.clock.now_ms());
        if let AttemptEnd::ContinuedAsNew {
            target: next,
            deadline_ms,
            ..
        } = &mut end
        {
            // The next run goes to the newest deployment: continuing as new is how a
            // long-running workflow picks up new code.
            *next = self
                .targets
                .latest(&*self.store, &record.service, &record.handler)
                .await?
                .map(Box::new);
            let spec = next.as_ref().map_or(&target.spec, |t| &t.spec);
            *deadline_ms = self.config.timeouts.deadline(spec, self.clock.now_ms());
        }
        Ok((entries, end))
    }
}

impl Engine {
    /// Records the end of `attempt` (fenced by it) and tells who waits: the callers waiting
    /// for the invocation when it ended or paused, the scheduler when it is due again. Every
    /// end goes through here, so waiting callers are woken by the end itself and never poll
    /// the store.
    pub async fn end_attempt(
        &self,
        id: &InvocationId,
        attempt: u32,
        end: AttemptEnd,
    ) -> Result<InvocationRecord, StoreError> {
        self.end_attempt_after(id, attempt, Vec::new(), end).await
    }

    /// As [`Engine::end_attempt`], after appending `entries` (those an outcome carried) in
    /// the same transaction.
    async fn end_attempt_after(
        &self,
        id: &InvocationId,
        attempt: u32,
        entries: Vec<NewEntry>,
        end: AttemptEnd,
    ) -> Result<InvocationRecord, StoreError> {
        let (record, output, closed) = self
            .store
            .end_attempt_after(id, attempt, entries, end, self.clock.now_ms())
            .await?;
        for (child, child_output) in closed {
            self.ended(child, Some(child_output));
        }
        record_end_metrics(&record);
        if record.status.is_final() {
            self.config.traces.invocation(&record);
        }
        if record.status.is_final() || record.status == Status::Paused {
            self.finish(Ended {
                record: record.clone(),
                output,
            });
        }
        // Due again, a child whose end may have woken its parent, or a next run.
        let parent_woken = record.status.is_final() && record.parent_index.is_some();
        let next_run = record.status == Status::Continued;
        // A keyed invocation's end may have made the next of its key due.
        let key_freed = record.status.is_final() && record.key.is_some();
        if record.next_run_at_ms.is_some() || parent_woken || next_run || key_freed {
            self.nudge();
        }
        Ok(record)
    }

    /// Asks to cancel an invocation (see [`crate::store::Store::cancel`]); the scheduler runs it at once.
    pub async fn cancel(&self, id: &InvocationId) -> Result<CancelAnswer, StoreError> {
        let cancellation = self.store.cancel(id, self.clock.now_ms()).await?;
        if let CancelAnswer::Requested(_) = &cancellation.answer {
            self.nudge();
        }
        for (record, output) in cancellation.ended {
            self.ended(record, Some(output));
        }
        Ok(cancellation.answer)
    }

    /// Ends an invocation at once, with the children it waits for (see
    /// [`crate::store::Store::terminate`]), and tells their waiting callers; `false` when it
    /// had ended already.
    pub async fn terminate(
        &self,
        id: &InvocationId,
        reason: String,
    ) -> Result<(InvocationRecord, bool), StoreError> {
        let termination = self
            .store
            .terminate(id, reason, self.clock.now_ms())
            .await?;
        for (record, output) in termination.ended {
            self.ended(record, Some(output));
        }
        Ok((termination.record, termination.terminated))
    }

    /// Pauses an invocation for an operator (see [`crate::store::Store::pause`]); callers
    /// waiting to hear of a pause hear it. `false` when it was paused already.
    pub async fn pause(
        &self,
        id: &InvocationId,
        reason: String,
    ) -> Result<(InvocationRecord, bool), StoreError> {
        let (record, paused) = self.store.pause(id, reason, self.clock.now_ms()).await?;
        if paused {
            self.finish(Ended {
                record: record.clone(),
                output: None,
            });
        }
        Ok((record, paused))
    }

    /// Restarts a paused or ended invocation from journal entry `from` (see
    /// [`crate::store::Store::restart`]); the scheduler runs it at once. `false` when `key`
    /// is the last restart's: nothing changed.
    pub async fn restart(
        &self,
        id: &InvocationId,
        from: u32,
        key: Option<String>,
    ) -> Result<Result<(InvocationRecord, bool), String>, StoreError> {
        let restarted = self
            .store
            .restart(id, from, key, self.clock.now_ms())
            .await?;
        if matches!(restarted, Ok((_, true))) {
            self.nudge();
        }
        Ok(restarted)
    }

    /// Runs an invocation that backs off now rather than at the end of its backoff.
    pub async fn retry_now(
        &self,
        id: &InvocationId,
    ) -> Result<(InvocationRecord, bool), StoreError> {
        let (record, due) = self.store.retry_now(id, self.clock.now_ms()).await?;
        if due {
            self.nudge();
        }
        Ok((record, due))
    }

    /// Ends the running `record`'s attempt by continuing its workflow run as a new run with
    /// `input` (for a plain handler, which asks through the context API); returns the next
    /// run's id.
    pub async fn continue_as_new(
        &self,
        record: &InvocationRecord,
        input: &serde_json::Value,
    ) -> Result<InvocationId, StoreError> {
        let target = self
            .targets
            .latest(&*self.store, &record.service, &record.handler)
            .await?;
        let next = InvocationId::generate();
        let deadline_ms = target
            .as_ref()
            .and_then(|t| self.config.timeouts.deadline(&t.spec, self.clock.now_ms()));
        let end = AttemptEnd::ContinuedAsNew {
            input: serde_json::to_vec(input).unwrap_or_default(),
            next: next.clone(),
            target: target.map(Box::new),
            deadline_ms,
        };
        self.end_attempt(&record.id, record.attempt, end).await?;
        Ok(next)
    }

    /// Tells who waits for them that a write ended these invocations (besides the one it
    /// was about): a debounced one replaced by a newer one.
    pub fn announce_ended(&self, ended: crate::store::Closed) {
        for (record, output) in ended {
            self.ended(record, Some(output));
        }
    }

    /// An invocation ended (or paused), in an attempt or outside one (terminated, timed
    /// out): its waiting callers get it, and a parent it completed runs.
    pub(super) fn ended(&self, record: InvocationRecord, output: Option<StoredEntry>) {
        record_end_metrics(&record);
        self.config.traces.invocation(&record);
        // Its parent may be due, or the next invocation of its key.
        if record.parent_index.is_some() || record.key.is_some() {
            self.nudge();
        }
        self.finish(Ended { record, output });
    }

    /// Hands an invocation that ended (or paused) to the callers waiting for it and its
    /// updates, here and, through the store, on the other nodes.
    fn finish(&self, ended: Ended) {
        let id = ended.record.id.clone();
        // An invocation ended (or paused) by an operator or a deadline may still have its
        // handler at work.
        self.attempt_over(&id, ended.record.attempt);
        self.updates.changed(&id);
        self.waiters.finish(Arc::new(ended));
        self.store.broadcast(ClusterEvent::Ended(id));
    }

    fn attempt_recorded(&self, id: &InvocationId, attempt: u32) {
        for observer in &self.observers {
            observer.attempt_recorded(id, attempt);
        }
    }

    /// The store shows `attempt` over (terminated, paused, timed out, suspended by a wait)
    /// while its handler may still be at work: the observers learn it at once, so that the
    /// egress marks the attempt ended and refuses its next call, and its state writes are
    /// no longer counted.
    pub fn attempt_over(&self, id: &InvocationId, attempt: u32) {
        for observer in &self.observers {
            observer.attempt_over(id, attempt);
        }
    }

    /// What the awakeable `entry` shows its handler: computed from the gateway's key (a
    /// journal stores none), or, in a replayed history, as the recording's gateway gave it.
    pub fn awakeable_shown(
        &self,
        id: &InvocationId,
        entry: &crate::store::StoredEntry,
    ) -> serde_json::Value {
        match entry.value.as_deref() {
            Some(recorded) => crate::http::json_value(Some(recorded)),
            None => self.awakeable_value(id, entry.index),
        }
    }

    /// What an awakeable's entry shows its handler: the token and where to complete it.
    pub fn awakeable_value(&self, id: &InvocationId, index: u32) -> serde_json::Value {
        let token = self.awakeables.token(id, index);
        let base = self.config.advertised_url.trim_end_matches('/');
        json!({
            "token": token,
            "resolve_url": format!("{base}/v1/awakeables/{token}/resolve"),
            "reject_url": format!("{base}/v1/awakeables/{token}/reject"),
        })
    }
}

/// Counts an invocation that ended (by its final status) or an attempt that backs off.
fn record_end_metrics(record: &InvocationRecord) {
    let labels = [
        ("service", record.service.clone()),
        ("handler", record.handler.clone()),
    ];
    if record.status == Status::BackingOff {
        metrics::counter!(crate::telemetry::RETRIES, &labels).increment(1);
    }
    if record.status.is_final() {
        let status = ("status", record.status.as_str().to_owned());
        let with_status = [labels[0].clone(), labels[1].clone(), status];
        metrics::counter!(crate::telemetry::ENDED, &with_status).increment(1);
        if let Some(ended) = record.completed_at_ms {
            let seconds = ended.saturating_sub(record.created_at_ms).max(0) as f64 / 1000.0;
            metrics::histogram!(crate::telemetry::DURATION, &labels).record(seconds);
        }
    }
}

/// Takes the entries an output or a terminal failure carried (version 5) out of the
/// handler's answer, planned as appends of the attempt; entries an outcome may not carry
/// make the answer a retryable protocol violation.
fn trailing_entries(
    answer: &mut lifecycle::HandlerAnswer,
    record: &InvocationRecord,
    now_ms: i64,
) -> Vec<NewEntry> {
    let requests = match answer {
        lifecycle::HandlerAnswer::Outcome(
            Outcome::Output { entries, .. } | Outcome::Failure { entries, .. },
        ) => std::mem::take(entries),
        _ => return Vec::new(),
    };
    if requests.is_empty() {
        return Vec::new();
    }
    crate::journal::plan_trailing(requests, record.attempt_token.as_deref(), now_ms).unwrap_or_else(
        |why| {
            *answer = lifecycle::HandlerAnswer::Retry(lifecycle::Retryable::new(
                format!("protocol violation: {why}"),
                Some("ProtocolViolation".into()),
            ));
            Vec::new()
        },
    )
}

/// A number in 0..1000 fixed by the invocation and the attempt (FNV-1a), which spreads the
/// backoffs of attempts that failed together (see [`lifecycle::Facts::jitter`]).
fn jitter(id: &crate::ids::InvocationId, attempt: u32) -> u16 {
    let hash = id
        .as_str()
        .bytes()
        .chain(attempt.to_le_bytes())
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        });
    (hash % 1000) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_that_fail_together_get_spread_backoffs() {
        let values: std::collections::BTreeSet<u16> = (0..1000)
            .map(|_| jitter(&crate::ids::InvocationId::generate(), 1))
            .collect();
        assert!(values.iter().all(|v| *v < 1000));
        // 1,000 invocations over 1,000 values: far from all on one.
        assert!(values.len() > 400, "{} distinct values", values.len());
        let id = crate::ids::InvocationId::generate();
        assert_eq!(jitter(&id, 3), jitter(&id, 3));
    }
}
