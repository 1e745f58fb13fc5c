//! When each running attempt of this node last sent a heartbeat through this node: the
//! invoker ends an attempt that stays silent longer than its `heartbeat_timeout` (a hung
//! handler), far sooner than `start_to_close`. Only the attempts this node runs under a
//! heartbeat timeout are watched, and only while they run; a heartbeat of any other attempt
//! (one another node runs, on a store several nodes share) is only in the store, where the
//! watchdog of the attempt's node looks before it ends the attempt (`invoke.rs`). The
//! details of a heartbeat are in the store, for the next attempt; only the time is kept
//! here.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::time::Instant;

use crate::ids::InvocationId;

#[derive(Default)]
pub struct Heartbeats {
    /// The watched attempt of each invocation, with its last heartbeat here, if any.
    last: Mutex<HashMap<InvocationId, (u32, Option<Instant>)>>,
}

impl Heartbeats {
    /// This node runs `attempt` of `id` under a heartbeat timeout: its heartbeats are kept
    /// until [`Heartbeats::forget`].
    pub(super) fn watch(&self, id: &InvocationId, attempt: u32) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        last.insert(id.clone(), (attempt, None));
    }

    /// `attempt` of `id` sent a heartbeat now (through this node); nothing is kept unless
    /// this node watches that attempt.
    pub fn beat(&self, id: &InvocationId, attempt: u32) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((watched, at)) = last.get_mut(id) {
            if *watched == attempt {
                *at = Some(Instant::now());
            }
        }
    }

    /// When `attempt` of `id` last sent a heartbeat through this node, if it did.
    pub(super) fn last(&self, id: &InvocationId, attempt: u32) -> Option<Instant> {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        last.get(id)
            .filter(|(watched, _)| *watched == attempt)
            .and_then(|(_, at)| *at)
    }

    /// The attempt is over: nothing of it is kept.
    pub(super) fn forget(&self, id: &InvocationId, attempt: u32) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.get(id).is_some_and(|(a, _)| *a <= attempt) {
            last.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a watched attempt's heartbeats are kept (a node keeps nothing of the attempts
    /// other nodes run), and nothing once it is forgotten.
    #[test]
    fn only_watched_attempts_are_kept() {
        let beats = Heartbeats::default();
        let id = InvocationId::generate();
        beats.beat(&id, 1);
        assert!(beats
            .last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty());
        beats.watch(&id, 2);
        assert_eq!(beats.last(&id, 2), None);
        beats.beat(&id, 1);
        beats.beat(&id, 3);
        assert_eq!(beats.last(&id, 2), None, "another attempt's heartbeat");
        beats.beat(&id, 2);
        assert!(beats.last(&id, 2).is_some());
        assert_eq!(beats.last(&id, 1), None);
        beats.forget(&id, 2);
        assert!(beats
            .last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty());
    }
}
