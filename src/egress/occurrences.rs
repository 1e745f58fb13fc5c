//! Occurrences: how often each call identity was seen in an attempt, in memory on one node
//! and in the store where nodes share a database, so that identical calls match their
//! recorded twins in order.

use super::*;

/// What the egress remembers of each running attempt: how often it saw each call identity
/// (the occurrence), and the calls the journal held when the attempt began. An attempt
/// that ended leaves a mark, so that a late call of it can never bring its state back.
#[derive(Default)]
pub struct EgressCalls {
    attempts: Mutex<HashMap<InvocationId, Slot>>,
}

pub(super) enum Slot {
    Running(AttemptCalls),
    /// Every attempt up to this one has ended.
    EndedThrough(u32),
}

#[derive(Default)]
pub(super) struct AttemptCalls {
    pub(super) attempt: u32,
    /// The attempt's secret, checked against the store when the attempt was admitted; every
    /// later call of the attempt must present it too.
    pub(super) token: String,
    /// Calls seen in this attempt per identity (method, URL, body digest). A recorded call
    /// of occurrence `k` is claimed by this attempt once its identity was seen `k + 1` times.
    /// Unused on a store that other nodes share: the store counts the attempt's calls,
    /// whichever node's egress they reach (`Store::take_occurrence`).
    pub(super) occurrences: HashMap<(String, String, String), u32>,
    /// The egress entries of the journal when the attempt began: handed over by the engine
    /// that started it, or read at its first call (entries added later come from this
    /// attempt and are claimed already).
    pub(super) recorded: Option<Arc<Vec<(u32, EgressRecord)>>>,
    /// The trace the invocation belongs to.
    pub(super) trace: Option<InvocationTrace>,
}

impl EgressCalls {
    /// Marks `attempt` as ended. The engine calls it as soon as the handler has answered,
    /// so an attempt known as running here has not ended. A newer attempt that already
    /// runs (a plain handler's suspension can be followed by the next attempt before the
    /// suspended one has answered) keeps its state.
    pub fn forget(&self, id: &InvocationId, attempt: u32) {
        let mut attempts = lock(&self.attempts);
        let through = match attempts.get(id) {
            Some(Slot::Running(calls)) if calls.attempt > attempt => return,
            Some(Slot::EndedThrough(e)) => attempt.max(*e),
            _ => attempt,
        };
        attempts.insert(id.clone(), Slot::EndedThrough(through));
    }

    /// Forgets an invocation whose attempts up to `attempt` have ended and are recorded as
    /// ended in the store, which refuses them from then on; a newer attempt's state stays.
    pub fn settle(&self, id: &InvocationId, attempt: u32) {
        let mut attempts = lock(&self.attempts);
        if matches!(attempts.get(id), Some(Slot::EndedThrough(e)) if *e >= attempt) {
            attempts.remove(id);
        }
    }

    /// Gives back the occurrence of a call that left nothing in the journal, so that the
    /// handler's retry of it has the same identity and idempotency key. Only the latest
    /// occurrence can be given back; an earlier one stays used.
    fn release(
        &self,
        id: &InvocationId,
        attempt: u32,
        identity: &(String, String, String),
        occurrence: u32,
    ) {
        // Only the running attempt's own state: giving back never brings an ended
        // attempt's state back.
        if let Some(Slot::Running(calls)) = lock(&self.attempts).get_mut(id) {
            if calls.attempt == attempt {
                if let Some(n) = calls.occurrences.get_mut(identity) {
                    if *n == occurrence + 1 {
                        *n = occurrence;
                    }
                }
            }
        }
    }

    /// Whether `attempt` was admitted with `token` and has not ended.
    pub(super) fn is_current(&self, id: &InvocationId, attempt: u32, token: &str) -> bool {
        matches!(
            lock(&self.attempts).get(id),
            Some(Slot::Running(calls)) if calls.attempt == attempt && same_secret(&calls.token, token)
        )
    }

    /// Starts keeping the state of `attempt`, which the store has just shown running with
    /// `token`; false when the attempt is known to be over (or a newer one runs).
    pub(super) fn admit(
        &self,
        id: &InvocationId,
        attempt: u32,
        token: &str,
        trace: InvocationTrace,
    ) -> bool {
        let mut attempts = lock(&self.attempts);
        let fresh = || {
            Slot::Running(AttemptCalls {
                attempt,
                token: token.to_owned(),
                trace: Some(trace),
                ..AttemptCalls::default()
            })
        };
        let slot = attempts.entry(id.clone()).or_insert_with(fresh);
        match slot {
            Slot::Running(calls) if calls.attempt == attempt => true,
            Slot::Running(calls) if calls.attempt < attempt => {
                *slot = fresh();
                true
            }
            Slot::EndedThrough(ended) if *ended < attempt => {
                *slot = fresh();
                true
            }
            _ => false,
        }
    }

    /// Runs `f` on the state of `attempt`; `None` when it is not the admitted, running one.
    pub(super) fn with<T>(
        &self,
        id: &InvocationId,
        attempt: u32,
        f: impl FnOnce(&mut AttemptCalls) -> T,
    ) -> Option<T> {
        match lock(&self.attempts).get_mut(id) {
            Some(Slot::Running(calls)) if calls.attempt == attempt => Some(f(calls)),
            _ => None,
        }
    }
}

/// An occurrence a call holds while it is out; given back when dropped unless the call was
/// journaled (or the occurrence was given back already).
pub(super) struct OccurrenceHeld<'a> {
    pub(super) calls: &'a EgressCalls,
    pub(super) id: &'a InvocationId,
    pub(super) attempt: u32,
    pub(super) identity: &'a (String, String, String),
    pub(super) occurrence: u32,
    pub(super) journaled: bool,
    /// On a store that other nodes share, the occurrence was taken in the store: the store
    /// and the identity's digest, to give it back there.
    pub(super) shared: Option<(Arc<dyn Store>, String)>,
}

impl OccurrenceHeld<'_> {
    /// Gives the occurrence taken in a shared store back now, before the handler hears of
    /// the call, so that its retry, through any node, takes it again.
    pub(super) async fn give_back_to_store(&mut self) {
        if let Some((store, digest)) = self.shared.take() {
            self.journaled = true;
            // On a task of its own, so that it is done even if the handler hangs up now.
            let (id, attempt, occurrence) = (self.id.clone(), self.attempt, self.occurrence);
            let given_back = tokio::spawn(async move {
                give_back(&*store, &id, attempt, &digest, occurrence).await;
            });
            let _ = given_back.await;
        }
    }
}

impl Drop for OccurrenceHeld<'_> {
    fn drop(&mut self) {
        if self.journaled {
            return;
        }
        match self.shared.take() {
            None => self
                .calls
                .release(self.id, self.attempt, self.identity, self.occurrence),
            // The handler hung up mid-call (this guard is dropped with the call's future):
            // the store is written from a task of its own.
            Some((store, digest)) => {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    let (id, attempt, occurrence) =
                        (self.id.clone(), self.attempt, self.occurrence);
                    runtime.spawn(async move {
                        give_back(&*store, &id, attempt, &digest, occurrence).await;
                    });
                }
            }
        }
    }
}

/// Gives an occurrence back in a shared store; a failure is logged (the call's retry then
/// takes the next occurrence, and so another `Idempotency-Key`).
pub(super) async fn give_back(
    store: &dyn Store,
    id: &InvocationId,
    attempt: u32,
    digest: &str,
    occurrence: u32,
) {
    if let Err(error) = store
        .give_back_occurrence(id, attempt, digest, occurrence)
        .await
    {
        tracing::warn!(%error, invocation_id = %id, attempt, occurrence, "could not give an egress call's occurrence back");
    }
}

/// The digest under which a shared store counts a call identity (method, URL, body digest).
pub(super) fn identity_digest(method: &str, url: &str, body_digest: &str) -> String {
    let mut hasher = Sha256::new();
    for part in [method, url, body_digest] {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    hex(&hasher.finalize())
}

/// The egress calls in `journal`, with their indexes.
pub(super) fn recorded_calls(journal: &[StoredEntry]) -> Vec<(u32, EgressRecord)> {
    journal
        .iter()
        .filter(|e| e.kind == EntryKind::Egress)
        .filter_map(|e| {
            serde_json::from_slice::<EgressRecord>(e.value.as_deref()?)
                .ok()
                .map(|r| (e.index, r))
        })
        .collect()
}

impl AttemptObserver for EgressCalls {
    /// Admits the attempt the engine has just started (the store shows it running with
    /// its token) with the calls its journal holds, as its first call would.
    fn plain_attempt_starting(&self, record: &InvocationRecord, journal: &[StoredEntry]) {
        let Some(token) = record.attempt_token.as_deref() else {
            return;
        };
        let trace = crate::telemetry::traces::trace_of(record);
        if self.admit(&record.id, record.attempt, token, trace) {
            let recorded = Arc::new(recorded_calls(journal));
            self.with(&record.id, record.attempt, |calls| {
                calls.recorded.get_or_insert(recorded);
            });
        }
    }

    fn attempt_ended(&self, id: &InvocationId, attempt: u32) {
        self.forget(id, attempt);
    }

    fn attempt_recorded(&self, id: &InvocationId, attempt: u32) {
        self.settle(id, attempt);
    }

    /// An attempt this egress holds as running is marked ended, so that none of its calls
    /// is carried or admitted again; the mark goes when the engine records the end after
    /// the handler has answered. An attempt it does not hold (one that runs on another
    /// node, or none) leaves nothing behind: its calls are checked in the store.
    fn attempt_over(&self, id: &InvocationId, attempt: u32) {
        let mut attempts = lock(&self.attempts);
        if let Some(slot) = attempts.get_mut(id) {
            if matches!(slot, Slot::Running(calls) if calls.attempt <= attempt) {
                *slot = Slot::EndedThrough(attempt);
            }
        }
    }
}

pub(super) fn stale(id: &InvocationId, attempt: u32) -> ApiError {
    ApiError::Conflict(format!(
        "attempt {attempt} of invocation {id} has ended; only the current attempt may call out"
    ))
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
