//! The writes of a batch run side by side on the writer's one connection, so that the
//! statements they would each send alone go as one statement for all of them.
//!
//! A batch of rules that may run again runs as one future per routing key (the writes of
//! one invocation keep their order, in turn), all polled together. A table call that has a
//! multi-row form (an append's growth of the journal, the creation of a running
//! invocation, the completion of a run) does not run its statement: it queues its row and
//! waits. Any other table call takes the connection, and the write holds it until it
//! ends, its later rows written at once: nothing another write does comes between what a
//! write read and what it writes on that reading (within one transaction, row locks and
//! advisory locks would not keep the writes apart). A write waits for others only at the
//! rows it queued before any other call, statements whose every condition (attempt,
//! status, index) is in their SQL. When every write still running
//! waits on the queue, the queue is flushed: one statement per kind of row for all of
//! them, in the order they queued (a second row for the same invocation goes in a
//! statement of its own, after the first), and each write gets its row's answer and goes
//! on. A statement that fails fails every row in it, and the batch runs again, one write
//! at a time with a savepoint each (see `commit_batch`).

use std::future::poll_fn;
use std::task::Poll;

use futures_util::stream::{FuturesUnordered, StreamExt};
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, Postgres};
use tokio::sync::oneshot;

use super::tables::{
    complete_runs, grow_journals, insert_runnings, Closed, CompletionRow, GrowRow, RunningRow,
};
use super::*;

/// A writer's connection as a table call sees it: its own, or shared by the writes of a
/// batch that run side by side, then held by this write once it made a call that is not a
/// queued row.
pub(super) enum TxConn<'c> {
    Alone(&'c mut PgConnection),
    Shared {
        shared: &'c Shared,
        held: Option<tokio::sync::MutexGuard<'c, PoolConnection<Postgres>>>,
    },
}

/// The connection of a batch whose writes run side by side, and the rows they queued.
pub(super) struct Shared {
    conn: tokio::sync::Mutex<PoolConnection<Postgres>>,
    queue: std::sync::Mutex<Vec<Queued>>,
}

/// A row queued for a multi-row statement, with where its answer goes.
pub(super) enum Queued {
    Grow(GrowRow, oneshot::Sender<StoreResult<Option<u32>>>),
    Running(RunningRow, oneshot::Sender<StoreResult<InvocationRecord>>),
    Completion(CompletionRow, oneshot::Sender<StoreResult<Option<Closed>>>),
}

impl<'c> TxConn<'c> {
    /// A write's connection, shared with the batch's writes side by side (`shared`).
    pub(super) fn shared(shared: &'c Shared) -> TxConn<'c> {
        TxConn::Shared { shared, held: None }
    }

    /// The connection: a write side by side with others waits until none holds it, then
    /// holds it until it ends, so that nothing the others write comes between what it
    /// reads and what it writes.
    pub(super) async fn lock(&mut self) -> &mut PgConnection {
        match self {
            TxConn::Alone(conn) => conn,
            TxConn::Shared { shared, held } => {
                let guard = match held {
                    Some(guard) => guard,
                    None => held.insert(shared.conn.lock().await),
                };
                guard
            }
        }
    }

    /// The connection, when this write has it for itself: alone, or held.
    fn direct(&mut self) -> Option<&mut PgConnection> {
        match self {
            TxConn::Alone(conn) => Some(conn),
            TxConn::Shared {
                held: Some(guard), ..
            } => Some(guard),
            TxConn::Shared { held: None, .. } => None,
        }
    }

    /// Queues `queued` for the batch's next flush (a write that does not hold the
    /// connection).
    fn queue(&self, queued: Queued) {
        if let TxConn::Shared { shared, .. } = self {
            shared.queue(queued);
        }
    }

    /// Grows the journal of `row`'s invocation by `row`'s entry (see
    /// [`grow_journals`]), in the batch's next flush when the connection is shared.
    pub(super) async fn grow(&mut self, row: GrowRow) -> StoreResult<Option<u32>> {
        if let Some(conn) = self.direct() {
            return one(grow_journals(conn, std::slice::from_ref(&row)).await);
        }
        let (answer, rx) = oneshot::channel();
        self.queue(Queued::Grow(row, answer));
        rx.await.map_err(|_| unanswered())?
    }

    /// Inserts `row`'s running invocation and its input entry (see [`insert_runnings`]),
    /// in the batch's next flush when the connection is shared.
    pub(super) async fn insert_running(
        &mut self,
        row: RunningRow,
    ) -> StoreResult<InvocationRecord> {
        if let Some(conn) = self.direct() {
            return one(insert_runnings(conn, std::slice::from_ref(&row)).await)?
                .ok_or_else(|| corrupt("INSERT … RETURNING returned no row".into()));
        }
        let (answer, rx) = oneshot::channel();
        self.queue(Queued::Running(row, answer));
        rx.await.map_err(|_| unanswered())?
    }

    /// Completes `row`'s run and closes it (see [`complete_runs`]), in the batch's next
    /// flush when the connection is shared.
    pub(super) async fn complete(&mut self, row: CompletionRow) -> StoreResult<Option<Closed>> {
        if let Some(conn) = self.direct() {
            return one(complete_runs(conn, std::slice::from_ref(&row)).await);
        }
        let (answer, rx) = oneshot::channel();
        self.queue(Queued::Completion(row, answer));
        rx.await.map_err(|_| unanswered())?
    }
}

/// The answer of a multi-row statement's only row.
fn one<T>(answers: StoreResult<Vec<Option<T>>>) -> StoreResult<Option<T>> {
    Ok(answers?.into_iter().next().flatten())
}

fn unanswered() -> StoreError {
    StoreError::Backend("a queued row was not written".into())
}

impl Shared {
    fn new(conn: PoolConnection<Postgres>) -> Shared {
        Shared {
            conn: tokio::sync::Mutex::new(conn),
            queue: std::sync::Mutex::new(Vec::new()),
        }
    }

    fn queue(&self, queued: Queued) {
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(queued);
    }

    fn queued(&self) -> usize {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Runs the queued rows, one statement per kind and round (a round holds at most one
    /// row per invocation), and answers each.
    async fn flush(&self) {
        let queued = std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()));
        let mut conn = self.conn.lock().await;
        for round in rounds(queued) {
            let (mut grows, mut runnings, mut completions) = (Vec::new(), Vec::new(), Vec::new());
            for queued in round {
                match queued {
                    Queued::Grow(row, answer) => grows.push((row, answer)),
                    Queued::Running(row, answer) => runnings.push((row, answer)),
                    Queued::Completion(row, answer) => completions.push((row, answer)),
                }
            }
            if !grows.is_empty() {
                let (rows, answers): (Vec<_>, Vec<_>) = grows.into_iter().unzip();
                answer_all(answers, grow_journals(&mut conn, &rows).await, Ok);
            }
            if !runnings.is_empty() {
                let (rows, answers): (Vec<_>, Vec<_>) = runnings.into_iter().unzip();
                answer_all(answers, insert_runnings(&mut conn, &rows).await, |record| {
                    record.ok_or_else(|| corrupt("INSERT … RETURNING returned no row".into()))
                });
            }
            if !completions.is_empty() {
                let (rows, answers): (Vec<_>, Vec<_>) = completions.into_iter().unzip();
                answer_all(answers, complete_runs(&mut conn, &rows).await, Ok);
            }
        }
    }
}

impl Queued {
    /// The invocation its row writes.
    fn invocation(&self) -> &str {
        match self {
            Queued::Grow(row, _) => &row.id,
            Queued::Running(row, _) => &row.id,
            Queued::Completion(row, _) => &row.id,
        }
    }
}

/// `queued` in rounds that write an invocation once each, in the order they queued: a
/// row goes in the round after the last one that writes its invocation.
fn rounds(queued: Vec<Queued>) -> Vec<Vec<Queued>> {
    let mut rounds: Vec<(std::collections::HashSet<String>, Vec<Queued>)> = Vec::new();
    for queued in queued {
        let id = queued.invocation();
        let at = rounds
            .iter()
            .rposition(|(ids, _)| ids.contains(id))
            .map_or(0, |i| i + 1);
        if at == rounds.len() {
            rounds.push(Default::default());
        }
        rounds[at].0.insert(id.to_owned());
        rounds[at].1.push(queued);
    }
    rounds.into_iter().map(|(_, round)| round).collect()
}

/// Hands each queued row its answer from `found` (one per row, in order), or the
/// statement's error.
fn answer_all<T, U>(
    answers: Vec<oneshot::Sender<StoreResult<U>>>,
    found: StoreResult<Vec<Option<T>>>,
    each: impl Fn(Option<T>) -> StoreResult<U>,
) {
    match found {
        Ok(found) => {
            for (answer, found) in answers.into_iter().zip(found) {
                let _ = answer.send(each(found));
            }
        }
        Err(error) => {
            // The batch runs again, a write at a time: this error reaches no caller.
            let error = error.to_string();
            for answer in answers {
                let _ = answer.send(Err(StoreError::Backend(error.clone().into())));
            }
        }
    }
}

/// Runs `runs` side by side on `conn`, those of one routing key in turn: the connection
/// back, and every write's output, in order, or `None` when one failed (what they wrote is
/// still in the transaction, for the caller to roll back).
pub(super) async fn run_side_by_side(
    conn: PoolConnection<Postgres>,
    runs: Vec<(u64, RepeatableRun)>,
) -> (PoolConnection<Postgres>, Option<Vec<TxOutput>>) {
    let count = runs.len();
    let shared = Shared::new(conn);
    let mut by_route: Vec<(u64, Vec<(usize, RepeatableRun)>)> = Vec::new();
    for (at, (route, run)) in runs.into_iter().enumerate() {
        match by_route.iter_mut().find(|(r, _)| *r == route) {
            Some((_, runs)) => runs.push((at, run)),
            None => by_route.push((route, vec![(at, run)])),
        }
    }
    let mut routes: FuturesUnordered<_> = by_route
        .into_iter()
        .map(|(_, runs)| {
            let shared = &shared;
            async move {
                let mut outputs = Vec::with_capacity(runs.len());
                for (at, run) in runs {
                    outputs.push((at, run(TxConn::shared(shared)).await));
                }
                outputs
            }
        })
        .collect();
    let mut outputs: Vec<Option<TxOutput>> = (0..count).map(|_| None).collect();
    let mut failed = false;
    enum Step<T> {
        Done(T),
        Flush,
        Finished,
    }
    loop {
        let step = poll_fn(|cx| match routes.poll_next_unpin(cx) {
            Poll::Ready(Some(done)) => Poll::Ready(Step::Done(done)),
            Poll::Ready(None) => Poll::Ready(Step::Finished),
            // Every write still running waits on the queue.
            Poll::Pending if shared.queued() == routes.len() => Poll::Ready(Step::Flush),
            Poll::Pending => Poll::Pending,
        })
        .await;
        match step {
            Step::Done(done) => {
                for (at, output) in done {
                    match output {
                        Ok(output) => outputs[at] = Some(output),
                        Err(_) => failed = true,
                    }
                }
            }
            Step::Flush => shared.flush().await,
            Step::Finished => break,
        }
    }
    drop(routes);
    let conn = shared.conn.into_inner();
    let outputs = if failed {
        None
    } else {
        outputs.into_iter().collect()
    };
    (conn, outputs)
}
