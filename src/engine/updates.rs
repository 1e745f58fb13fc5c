//! Callers waiting in this process for the updates they sent to a workflow's run: told
//! when one of the run's updates may have changed (refused, done, or the run ended), they
//! read it from the store.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::watch;

use crate::ids::InvocationId;

#[derive(Default)]
pub struct UpdateWatch {
    runs: Mutex<HashMap<InvocationId, watch::Sender<u64>>>,
}

impl UpdateWatch {
    /// A receiver that changes whenever an update of `run` may have. Take it before
    /// reading the store, so that a change in between is not missed.
    pub fn listen(&self, run: &InvocationId) -> watch::Receiver<u64> {
        let mut runs = self.runs.lock().unwrap_or_else(|e| e.into_inner());
        runs.entry(run.clone())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    pub fn changed(&self, run: &InvocationId) {
        let runs = self.runs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(sender) = runs.get(run) {
            sender.send_modify(|version| *version += 1);
        }
    }

    /// The runs whose updates callers here wait for.
    pub fn runs(&self) -> Vec<InvocationId> {
        self.runs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Forgets `run` when nobody listens any more.
    pub fn release(&self, run: &InvocationId) {
        let mut runs = self.runs.lock().unwrap_or_else(|e| e.into_inner());
        if runs.get(run).is_some_and(|s| s.receiver_count() == 0) {
            runs.remove(run);
        }
    }
}
