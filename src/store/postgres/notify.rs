//! What one node tells the others: `LISTEN/NOTIFY` on the channel `durin`.
//!
//! A node that ended an invocation (or changed an update) says so with a notification that
//! PostgreSQL hands to every node listening, so that a caller waiting on node A hears of
//! an end on node B at once. Notifications are a nudge: one that is lost (a listener that
//! reconnected) is made up for by [`ClusterEvent::Resync`], on which a node checks in the
//! store what its waiting callers wait for. They are sent in batches, the first of a batch
//! waiting [`GATHER`] for others, so that under load a statement carries many and wakes
//! each node's listener once for all of them (a caller waiting on the node that ran the
//! invocation is told by that node directly).

use std::sync::Mutex;
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool};
use tokio::sync::mpsc;

use super::*;

const CHANNEL: &str = "durin";
/// The most notifications sent in one statement.
const MAX_BATCH: usize = 512;
/// How long the first notification of a statement waits for others.
const GATHER: Duration = Duration::from_millis(5);

/// The sending and the receiving side of one node.
pub(super) struct Notifications {
    outgoing: mpsc::UnboundedSender<String>,
    incoming: Mutex<Option<mpsc::UnboundedReceiver<ClusterEvent>>>,
}

impl Notifications {
    /// Starts the sender and the listener tasks on `pool`; they stop when the store (and
    /// with it the sender's channel) is dropped, or the receiver is.
    pub(super) fn start(pool: &PgPool) -> Notifications {
        let (outgoing, queue) = mpsc::unbounded_channel();
        tokio::spawn(send_loop(pool.clone(), queue));
        let (events, incoming) = mpsc::unbounded_channel();
        tokio::spawn(listen_loop(pool.clone(), events));
        Notifications {
            outgoing,
            incoming: Mutex::new(Some(incoming)),
        }
    }

    pub(super) fn broadcast(&self, event: &ClusterEvent) {
        let payload = match event {
            ClusterEvent::Ended(id) => format!("e {id}"),
            ClusterEvent::UpdateChanged(run) => format!("u {run}"),
            ClusterEvent::Resync => return,
        };
        let _ = self.outgoing.send(payload);
    }

    pub(super) fn events(&self) -> Option<mpsc::UnboundedReceiver<ClusterEvent>> {
        self.incoming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

async fn send_loop(pool: PgPool, mut queue: mpsc::UnboundedReceiver<String>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = queue.recv().await {
        batch.push(first);
        // A nudge may wait a moment for others: under load each statement carries many,
        // and wakes every node's listener once for all of them.
        tokio::time::sleep(GATHER).await;
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(payload) => batch.push(payload),
                Err(_) => break,
            }
        }
        let sent = sqlx::query("SELECT pg_notify($1, p) FROM unnest($2::TEXT[]) AS p")
            .bind(CHANNEL)
            .bind(&batch)
            .execute(&pool)
            .await;
        if let Err(error) = sent {
            // The other nodes find out by their fallback (a resync when their listener
            // reconnects, their callers' own deadlines): an end is never lost, only late.
            tracing::warn!(%error, count = batch.len(), "could not notify the other nodes");
        }
        batch.clear();
    }
}

async fn listen_loop(pool: PgPool, events: mpsc::UnboundedSender<ClusterEvent>) {
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::warn!(%error, "cannot listen for the other nodes; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(error) = listener.listen(CHANNEL).await {
            tracing::warn!(%error, "cannot listen for the other nodes; trying again");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        // Whatever happened while this node was not listening.
        if events.send(ClusterEvent::Resync).is_err() {
            return;
        }
        loop {
            let event = match listener.try_recv().await {
                Ok(Some(notification)) => match parse(notification.payload()) {
                    Some(event) => event,
                    None => continue,
                },
                // The connection was lost (and is made again at the next receive):
                // notifications may have been missed.
                Ok(None) => ClusterEvent::Resync,
                Err(error) => {
                    tracing::warn!(%error, "lost the notifications of the other nodes");
                    break;
                }
            };
            if events.send(event).is_err() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn parse(payload: &str) -> Option<ClusterEvent> {
    let (kind, id) = payload.split_once(' ')?;
    let id = InvocationId::parse(id).ok()?;
    match kind {
        "e" => Some(ClusterEvent::Ended(id)),
        "u" => Some(ClusterEvent::UpdateChanged(id)),
        _ => None,
    }
}
