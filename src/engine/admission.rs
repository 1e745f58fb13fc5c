//! Admission: how much work runs at once, how much waits, and who is turned away.
//!
//! Every attempt, whether the scheduler claimed it or ingress has just created it, runs
//! under one of `max_concurrent_attempts` slots. A first attempt created by a request
//! waits for its slot in a FIFO queue (tokio's semaphore is fair), in the same line as the
//! scheduler, so new work runs in the order it arrived whatever the load; an eighth of the
//! slots is the scheduler's alone, so that invocations under way (due in the store) are
//! not starved by a line of new ones. Past
//! `max_queued_attempts` waiting first attempts, ingress refuses callers that would wait
//! for an answer with a 503 and `Retry-After` before it writes anything ([`Admission::admit`]),
//! and creates the work of callers that do not wait (`send`, a start without
//! `Prefer: wait`) as a row due now, which the scheduler claims when a slot is free: a
//! waiting caller costs a connection and memory, a queued send only a row. Such rows are
//! bounded too, by `max_pending_starts`, counted in the store.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Queued first attempts (a gauge).
pub const QUEUED: &str = "durin_admission_queued";
/// Requests admitted, by kind (`call`: the caller waits; `send`: it does not).
pub const ADMITTED: &str = "durin_admission_admitted_total";
/// Requests refused with a 503, by kind.
pub const REFUSED: &str = "durin_admission_refused_total";
/// How long a first attempt waited for its slot.
pub const WAIT: &str = "durin_admission_wait_seconds";

/// What a refused caller is told to wait before it tries again.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// How long a count of pending starts read from the store stands in for the store.
const PENDING_FRESH: Duration = Duration::from_millis(100);

/// The bounds of [`Admission`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Attempts that run at once on this node, an eighth of them (rounded down) kept for
    /// the scheduler.
    pub max_concurrent_attempts: usize,
    /// First attempts of new invocations that may wait for a slot in memory, each with
    /// its caller's request held open.
    pub max_queued_attempts: usize,
    /// Invocations waiting in the store for their first attempt (status `pending`, in the
    /// whole store): sends created due because the queue was full, children, next runs.
    pub max_pending_starts: u64,
}

/// Whether a request that creates work is let in, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admitted {
    /// Its first attempt waits in the queue for a slot (or runs at once).
    Queue,
    /// Its invocation is created due, for the scheduler: the queue is full, and the caller
    /// does not wait for the answer.
    Defer,
}

/// Who a request is: one that waits for the outcome, or one that only hands work over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    Waits,
    HandsOver,
}

impl Caller {
    fn label(self) -> &'static str {
        match self {
            Caller::Waits => "call",
            Caller::HandsOver => "send",
        }
    }
}

/// Refused: too much work waits. Answered `503` with `Retry-After`.
#[derive(Debug, Clone, Copy)]
pub struct Busy {
    pub retry_after: Duration,
    /// First attempts waiting for a slot.
    pub queued: usize,
    /// For a caller that hands work over: the invocations waiting in the store.
    pub pending: Option<u64>,
}

pub struct Admission {
    /// The slots new first attempts and the scheduler share, in one fair line.
    slots: Arc<Semaphore>,
    /// The slots kept for the scheduler (an eighth of them), so that invocations already
    /// under way (a timer, a signal, a retry, a child, a send left in the store) go on
    /// while new callers queue.
    reserved: Arc<Semaphore>,
    queued: AtomicUsize,
    limits: Limits,
    /// The last count of pending starts and when it was read, plus those deferred since.
    pending: std::sync::Mutex<PendingCount>,
}

#[derive(Default)]
struct PendingCount {
    read_at: Option<std::time::Instant>,
    count: u64,
}

impl Admission {
    pub fn new(limits: Limits) -> Admission {
        let total = limits.max_concurrent_attempts.max(1);
        let reserved = total / 8;
        Admission {
            slots: Arc::new(Semaphore::new(total - reserved)),
            reserved: Arc::new(Semaphore::new(reserved)),
            queued: AtomicUsize::new(0),
            limits,
            pending: std::sync::Mutex::new(PendingCount::default()),
        }
    }

    /// The bounds it was made with.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// First attempts waiting for a slot now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Decides for a request that would create work, before anything is written.
    /// `pending_starts` counts the invocations waiting in the store for their first attempt
    /// (those [`Admitted::Defer`] made among them); it is asked only when the queue is full
    /// and the caller hands work over.
    pub async fn admit<F, Fut>(&self, caller: Caller, pending_starts: F) -> Result<Admitted, Busy>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = u64>,
    {
        let queued = self.queued();
        let mut pending = None;
        let admitted = if queued < self.limits.max_queued_attempts {
            Some(Admitted::Queue)
        } else if caller == Caller::HandsOver {
            let count = self.pending_starts(pending_starts).await;
            pending = Some(count);
            (count < self.limits.max_pending_starts).then(|| {
                if let Ok(mut pending) = self.pending.lock() {
                    pending.count += 1;
                }
                Admitted::Defer
            })
        } else {
            None
        };
        let kind = caller.label();
        match admitted {
            Some(admitted) => {
                metrics::counter!(ADMITTED, "kind" => kind).increment(1);
                Ok(admitted)
            }
            None => {
                metrics::counter!(REFUSED, "kind" => kind).increment(1);
                Err(Busy {
                    retry_after: RETRY_AFTER,
                    queued,
                    pending,
                })
            }
        }
    }

    /// Pending starts in the store: read at most every [`PENDING_FRESH`], counting those
    /// deferred here in between.
    async fn pending_starts<F, Fut>(&self, read: F) -> u64
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = u64>,
    {
        if let Ok(pending) = self.pending.lock() {
            if pending
                .read_at
                .is_some_and(|at| at.elapsed() < PENDING_FRESH)
            {
                return pending.count;
            }
        }
        let count = read().await;
        if let Ok(mut pending) = self.pending.lock() {
            *pending = PendingCount {
                read_at: Some(std::time::Instant::now()),
                count,
            };
        }
        count
    }

    /// A slot, waited for in arrival order by a first attempt; `None` when `stop` comes
    /// first.
    pub async fn queue_for_slot(&self, stop: &tokio_util::sync::CancellationToken) -> Option<Slot> {
        // A free slot means that nobody waits (a released slot goes to the first waiter).
        if let Ok(permit) = Arc::clone(&self.slots).try_acquire_owned() {
            metrics::histogram!(WAIT).record(0.0);
            return Some(Slot {
                _permit: permit,
                waited: false,
            });
        }
        let waiting = Queued::enter(&self.queued);
        let since = std::time::Instant::now();
        let permit = tokio::select! {
            permit = Arc::clone(&self.slots).acquire_owned() => permit.ok(),
            _ = stop.cancelled() => None,
        };
        drop(waiting);
        metrics::histogram!(WAIT).record(since.elapsed().as_secs_f64());
        permit.map(|permit| Slot {
            _permit: permit,
            waited: true,
        })
    }

    /// Slots for the scheduler to claim as many due invocations, at most `max`: the free
    /// ones (its reserved ones first); when none is free, the first to come of its
    /// reserved ones or of its place in the shared line. `None` when the semaphores closed.
    pub async fn scheduler_slots(&self, max: usize) -> Option<Vec<OwnedSemaphorePermit>> {
        let mut slots = Vec::new();
        for pool in [&self.reserved, &self.slots] {
            while slots.len() < max {
                match Arc::clone(pool).try_acquire_owned() {
                    Ok(permit) => slots.push(permit),
                    Err(_) => break,
                }
            }
        }
        if slots.is_empty() {
            let reserve = self.reserved_slots() > 0;
            let permit = tokio::select! {
                permit = Arc::clone(&self.reserved).acquire_owned(), if reserve => permit.ok()?,
                permit = Arc::clone(&self.slots).acquire_owned() => permit.ok()?,
            };
            slots.push(permit);
        }
        Some(slots)
    }

    /// How many slots only the scheduler uses.
    pub fn reserved_slots(&self) -> usize {
        self.limits.max_concurrent_attempts.max(1) / 8
    }
}

/// A slot held by a first attempt: given back when dropped.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    /// It had to wait in the queue: what the attempt knew of its invocation when it was
    /// created may have changed meanwhile (a cancellation, a termination).
    pub waited: bool,
}

/// Counts one queued first attempt for as long as it lives (also when its task is
/// dropped mid-wait).
struct Queued<'a>(&'a AtomicUsize);

impl<'a> Queued<'a> {
    fn enter(count: &'a AtomicUsize) -> Queued<'a> {
        let now = count.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::gauge!(QUEUED).set(now as f64);
        Queued(count)
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        let now = self.0.fetch_sub(1, Ordering::Relaxed).saturating_sub(1);
        metrics::gauge!(QUEUED).set(now as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(queued: usize, pending: u64) -> Limits {
        Limits {
            max_concurrent_attempts: 1,
            max_queued_attempts: queued,
            max_pending_starts: pending,
        }
    }

    #[tokio::test]
    async fn a_full_queue_refuses_callers_and_defers_sends_up_to_their_bound() {
        let admission = Arc::new(Admission::new(limits(1, 2)));
        let stop = tokio_util::sync::CancellationToken::new();
        let running = admission.queue_for_slot(&stop).await;
        assert!(running.is_some());
        // One waits for the slot the first holds.
        let waiter = {
            let (admission, stop) = (Arc::clone(&admission), stop.clone());
            tokio::spawn(async move { admission.queue_for_slot(&stop).await.is_some() })
        };
        while admission.queued() == 0 {
            tokio::task::yield_now().await;
        }
        let busy = admission
            .admit(Caller::Waits, || async { 0 })
            .await
            .expect_err("a full queue refuses a caller that waits");
        assert_eq!((busy.queued, busy.retry_after), (1, RETRY_AFTER));
        assert_eq!(
            admission
                .admit(Caller::HandsOver, || async { 1 })
                .await
                .ok(),
            Some(Admitted::Defer)
        );
        assert!(admission
            .admit(Caller::HandsOver, || async { 2 })
            .await
            .is_err());
        drop(running);
        assert_eq!(waiter.await.ok(), Some(true));
        assert_eq!(admission.queued(), 0);
        assert_eq!(
            admission.admit(Caller::Waits, || async { 0 }).await.ok(),
            Some(Admitted::Queue)
        );
    }

    #[tokio::test]
    async fn slots_go_in_arrival_order() {
        let admission = Arc::new(Admission::new(limits(100, 0)));
        let stop = tokio_util::sync::CancellationToken::new();
        let first = admission.queue_for_slot(&stop).await;
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..20 {
            let (line, stop, order) = (Arc::clone(&admission), stop.clone(), Arc::clone(&order));
            tasks.push(tokio::spawn(async move {
                let permit = line.queue_for_slot(&stop).await;
                order.lock().map(|mut o| o.push(i)).ok();
                drop(permit);
            }));
            // Each is in the line before the next arrives.
            while admission.queued() < i + 1 {
                tokio::task::yield_now().await;
            }
        }
        drop(first);
        for task in tasks {
            task.await.ok();
        }
        let order = order.lock().map(|o| o.clone()).unwrap_or_default();
        assert_eq!(order, (0..20).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn the_scheduler_keeps_an_eighth_of_the_slots_and_claims_no_more_than_it_holds() {
        let admission = Arc::new(Admission::new(Limits {
            max_concurrent_attempts: 16,
            max_queued_attempts: 100,
            max_pending_starts: 0,
        }));
        let stop = tokio_util::sync::CancellationToken::new();
        // New first attempts take the 14 shared slots and a 15th waits in the line.
        let mut held = Vec::new();
        for _ in 0..14 {
            held.push(admission.queue_for_slot(&stop).await);
        }
        let waiter = {
            let (admission, stop) = (Arc::clone(&admission), stop.clone());
            tokio::spawn(async move { admission.queue_for_slot(&stop).await.is_some() })
        };
        while admission.queued() == 0 {
            tokio::task::yield_now().await;
        }
        // The scheduler still gets its two, at once, and no more than asked for.
        let slots = admission.scheduler_slots(256).await.unwrap_or_default();
        assert_eq!(slots.len(), 2);
        // With every slot taken, the scheduler waits too.
        let more =
            tokio::time::timeout(Duration::from_millis(50), admission.scheduler_slots(256)).await;
        assert!(more.is_err(), "the scheduler got a slot nobody had freed");
        drop(slots);
        drop(held);
        assert_eq!(waiter.await.ok(), Some(true));
    }

    #[tokio::test]
    async fn a_stop_ends_the_wait_and_the_count() {
        let admission = Arc::new(Admission::new(limits(10, 0)));
        let stop = tokio_util::sync::CancellationToken::new();
        let _held = admission.queue_for_slot(&stop).await;
        let waiter = {
            let (admission, stop) = (Arc::clone(&admission), stop.clone());
            tokio::spawn(async move { admission.queue_for_slot(&stop).await.is_none() })
        };
        while admission.queued() == 0 {
            tokio::task::yield_now().await;
        }
        stop.cancel();
        assert_eq!(waiter.await.ok(), Some(true));
        assert_eq!(admission.queued(), 0);
    }
}
