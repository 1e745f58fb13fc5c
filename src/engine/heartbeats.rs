//! When each running attempt last sent a heartbeat, in this process: the invoker ends an
//! attempt that stays silent longer than its `heartbeat_timeout` (a hung handler), far
//! sooner than `start_to_close`. The details of a heartbeat are in the store, for the next
//! attempt; only the time is kept here, and only while the attempt runs.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::time::Instant;

use crate::ids::InvocationId;

#[derive(Default)]
pub struct Heartbeats {
    last: Mutex<HashMap<InvocationId, (u32, Instant)>>,
}

impl Heartbeats {
    /// `attempt` of `id` sent a heartbeat now.
    pub fn beat(&self, id: &InvocationId, attempt: u32) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let entry = last.entry(id.clone()).or_insert((attempt, Instant::now()));
        if attempt >= entry.0 {
            *entry = (attempt, Instant::now());
        }
    }

    /// When `attempt` of `id` last sent a heartbeat, if it did.
    pub(super) fn last(&self, id: &InvocationId, attempt: u32) -> Option<Instant> {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        last.get(id)
            .filter(|(beat_attempt, _)| *beat_attempt == attempt)
            .map(|(_, at)| *at)
    }

    /// The attempt is over: nothing of it is kept.
    pub(super) fn forget(&self, id: &InvocationId, attempt: u32) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.get(id).is_some_and(|(a, _)| *a <= attempt) {
            last.remove(id);
        }
    }
}
