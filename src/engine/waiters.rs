//! Callers waiting in this process for invocations to end (`POST /v1/call`, long polls).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::ids::InvocationId;
use crate::store::{InvocationRecord, StoredEntry};

/// An invocation that ended (or paused), as its waiters receive it.
#[derive(Debug)]
pub struct Ended {
    pub record: InvocationRecord,
    /// The output entry, when the invocation completed or failed.
    pub output: Option<StoredEntry>,
}

/// Hands ended invocations to the callers waiting for them in this process.
#[derive(Default)]
pub struct Waiters {
    waiters: Mutex<HashMap<InvocationId, watch::Sender<Option<Arc<Ended>>>>>,
}

impl Waiters {
    /// A receiver that gets the invocation when it ends. Take it before checking the store
    /// (or before starting the invocation), so that an end in between is not missed.
    pub fn listener(&self, id: &InvocationId) -> watch::Receiver<Option<Arc<Ended>>> {
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        waiters
            .entry(id.clone())
            .or_insert_with(|| watch::channel(None).0)
            .subscribe()
    }

    /// Drops the sender of `id` if no waiter listens any more.
    pub fn release(&self, id: &InvocationId) {
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        if waiters.get(id).is_some_and(|s| s.receiver_count() == 0) {
            waiters.remove(id);
        }
    }

    /// Whether a caller here waits for `id`.
    pub fn waits_for(&self, id: &InvocationId) -> bool {
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(id)
    }

    /// How many invocations callers here wait for.
    pub fn count(&self) -> usize {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The invocations callers here wait for.
    pub fn ids(&self) -> Vec<InvocationId> {
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    pub fn finish(&self, ended: Arc<Ended>) {
        let sender = self
            .waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&ended.record.id);
        if let Some(sender) = sender {
            sender.send_replace(Some(ended));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_released_listener_leaves_nothing_behind_unless_someone_waits() {
        let waiters = Waiters::default();
        let id = InvocationId::generate();
        let first = waiters.listener(&id);
        let second = waiters.listener(&id);
        drop(first);
        waiters.release(&id);
        assert_eq!(
            waiters.waiters.lock().map(|w| w.len()).unwrap_or_default(),
            1,
            "second still waits"
        );
        drop(second);
        waiters.release(&id);
        assert!(waiters
            .waiters
            .lock()
            .map(|w| w.is_empty())
            .unwrap_or_default());
    }
}
