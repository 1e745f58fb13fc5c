//! Leases: how several nodes share one database.
//!
//! A running attempt is leased to the node that started it (`lease_owner`,
//! `lease_expires_at_ms`, in the database's clock): a claim or the creation of an invocation
//! with its first attempt running sets both. Each node renews the leases of the attempts it
//! runs ([`Held`]) every third of the lease time, from a task that owns the node's own
//! session; a row leased to the node that the node does not run (its start failed after the
//! write, or the database committed a creation whose acknowledgement was lost) is not
//! renewed. An attempt whose lease expired (its node died, froze, lost the database or does
//! not run it) is claimed by any node with the next attempt number, which fences every
//! write of the old attempt; leases themselves fence nothing.
//!
//! The session also holds the node-id lock, a session advisory lock on the node's id in
//! this schema: two live processes never share a node id, so that a node restarted with its
//! id may take its previous life's attempts back at once (`recover_running`) without
//! waiting for their leases to expire.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, PgConnection};
use tokio::sync::oneshot;

use super::clock::{DatabaseClock, DB_NOW_MS};
use super::{backend, corrupt, StoreResult};
use crate::store::{LeaseHold, NodeOptions};

/// This node's leases: whose they are and how long they last.
#[derive(Debug, Clone)]
pub(super) struct Lease {
    /// This node's id, the `lease_owner` of its attempts.
    pub(super) owner: Arc<str>,
    /// How long an attempt stays this node's without a renewal, in milliseconds.
    pub(super) ms: i64,
    /// How often the leases are renewed: a third of the lease.
    pub(super) period: Duration,
    /// How long after the start of a successful renewal the leases are known to be live: the
    /// lease less one period (the margin covers the renewal's round trip and the clocks'
    /// drift).
    pub(super) valid_for: Duration,
}

impl Lease {
    pub(super) fn new(node: &NodeOptions) -> StoreResult<Lease> {
        if node.node_id.trim().is_empty() {
            return Err(corrupt("the node id is empty".into()));
        }
        if node.lease < Duration::from_millis(300) {
            return Err(corrupt(format!(
                "a lease of {:?} is too short to be renewed in time: give at least 300 ms",
                node.lease
            )));
        }
        let ms = i64::try_from(node.lease.as_millis())
            .map_err(|_| corrupt(format!("a lease of {:?} is too long", node.lease)))?;
        let period = node.lease / 3;
        Ok(Lease {
            owner: node.node_id.as_str().into(),
            ms,
            period,
            valid_for: node.lease - period,
        })
    }
}

/// The attempts this node runs, by invocation id and attempt number: the only rows whose
/// leases it renews (a row whose attempt moved on is not renewed for a task of an older
/// attempt that still ends). Counted, in case one attempt is held twice.
#[derive(Debug, Default)]
pub(super) struct Held(Mutex<HashMap<(Arc<str>, u32), u32>>);

impl Held {
    /// Holds `attempt` of `id` until the returned hold is dropped.
    pub(super) fn hold(self: &Arc<Self>, id: &str, attempt: u32) -> LeaseHold {
        let key: (Arc<str>, u32) = (id.into(), attempt);
        *self.lock().entry(key.clone()).or_default() += 1;
        let held = Arc::clone(self);
        LeaseHold::new(move || {
            let mut attempts = held.lock();
            if let Some(count) = attempts.get_mut(&key) {
                *count -= 1;
                if *count == 0 {
                    attempts.remove(&key);
                }
            }
        })
    }

    /// The attempts held now: their ids and, in the same order, their numbers.
    fn attempts(&self) -> (Vec<String>, Vec<i64>) {
        self.lock()
            .keys()
            .map(|(id, attempt)| (id.to_string(), i64::from(*attempt)))
            .unzip()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(Arc<str>, u32), u32>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// When this node's leases were last renewed, by this process's monotonic clock.
#[derive(Debug)]
pub(super) struct Renewals {
    base: Instant,
    /// Nanoseconds from `base` to the start of the last successful renewal, plus one; 0 when
    /// none succeeded.
    last: AtomicU64,
    valid_for: Duration,
}

impl Renewals {
    pub(super) fn new(lease: &Lease) -> Renewals {
        Renewals {
            base: Instant::now(),
            last: AtomicU64::new(0),
            valid_for: lease.valid_for,
        }
    }

    /// A renewal that started at `started` succeeded.
    fn record(&self, started: Instant) {
        let nanos = started.saturating_duration_since(self.base).as_nanos();
        let nanos = u64::try_from(nanos).unwrap_or(u64::MAX - 1) + 1;
        self.last.fetch_max(nanos, Ordering::Relaxed);
    }

    /// Whether the last renewal started less than the lease (less its margin) ago.
    pub(super) fn held(&self) -> bool {
        match self.last.load(Ordering::Relaxed) {
            0 => false,
            nanos => {
                let renewed = self.base + Duration::from_nanos(nanos - 1);
                renewed.elapsed() < self.valid_for
            }
        }
    }
}

/// Connects the node's own session and takes the node-id lock in it. Refused when another
/// live process has this node id, or when a node of a version without leases (which
/// runs alone on its database) uses the database.
async fn lock_node(options: &PgConnectOptions, lease: &Lease) -> StoreResult<PgConnection> {
    let mut conn = options.connect().await.map_err(backend)?;
    // The server notices a vanished node (its host gone without closing the connection)
    // within about 25 s instead of the system's default of hours, and releases its node
    // id. A renewal that waits for a row lock gives up after a tenth of the lease.
    let lock_timeout_ms = (lease.ms / 10).max(50);
    sqlx::query(
        "SELECT set_config('tcp_keepalives_idle', '10', false), \
         set_config('tcp_keepalives_interval', '5', false), \
         set_config('tcp_keepalives_count', '3', false), \
         set_config('lock_timeout', $1, false)",
    )
    .bind(format!("{lock_timeout_ms}ms"))
    .execute(&mut conn)
    .await
    .map_err(backend)?;
    // Versions without leases lock the schema's node key exclusively; nodes with leases
    // share it.
    let shared: bool = sqlx::query_scalar(
        "SELECT pg_try_advisory_lock_shared(hashtext('durin-node:' || current_schema()))",
    )
    .fetch_one(&mut conn)
    .await
    .map_err(backend)?;
    if !shared {
        return Err(corrupt(
            "another Durin node, of a version without leases (which runs alone on its database), is using this database; stop it before starting nodes that share the database".into(),
        ));
    }
    let locked: bool = sqlx::query_scalar(
        "SELECT pg_try_advisory_lock(hashtext('durin-node:' || current_schema() || ':' || $1))",
    )
    .bind(&*lease.owner)
    .fetch_one(&mut conn)
    .await
    .map_err(backend)?;
    if !locked {
        return Err(corrupt(format!(
            "another Durin node with node id {:?} is using this database; each node of a database needs a node id of its own (a node restarted with its id starts once the database has ended its old session)",
            lease.owner
        )));
    }
    Ok(conn)
}

/// Renews the leases of the attempts this node runs (`held`) on `conn`; returns how many
/// it renewed.
///
/// A bulk renewal that waited for row locks could deadlock with a write transaction that
/// holds one of this node's rows and waits for another (and the database would break one
/// of them, maybe a whole batch of writes), so the rows that are locked right now are
/// skipped first, then renewed one at a time: a statement that holds no lock while it
/// waits cannot deadlock.
async fn renew(conn: &mut PgConnection, lease: &Lease, held: &Held) -> StoreResult<u64> {
    let (ids, attempts) = held.attempts();
    if ids.is_empty() {
        return Ok(0);
    }
    // The held attempts that are still this node's and running.
    const HELD: &str = "(id, attempt) IN (SELECT * FROM unnest($3::TEXT[], $4::BIGINT[])) \
         AND lease_owner = $1 AND status = 'running'";
    let renewed = sqlx::query(&format!(
        "UPDATE invocations SET lease_expires_at_ms = {DB_NOW_MS} + $2 \
         WHERE id = ANY(ARRAY(SELECT id FROM invocations WHERE {HELD} \
         FOR UPDATE SKIP LOCKED)) AND {HELD}"
    ))
    .bind(&*lease.owner)
    .bind(lease.ms)
    .bind(&ids)
    .bind(&attempts)
    .execute(&mut *conn)
    .await
    .map_err(backend)?
    .rows_affected();
    // The rows it skipped: those renewed just now end about a lease from now, those it
    // skipped at least half a period earlier (they were renewed a period ago, or never).
    let skipped: Vec<(String, i64)> = sqlx::query_as(&format!(
        "SELECT id, attempt FROM invocations WHERE {HELD} \
         AND lease_expires_at_ms < {DB_NOW_MS} + $2 - $5"
    ))
    .bind(&*lease.owner)
    .bind(lease.ms)
    .bind(&ids)
    .bind(&attempts)
    .bind(lease.period.as_millis() as i64 / 2)
    .fetch_all(&mut *conn)
    .await
    .map_err(backend)?;
    let mut held = renewed;
    let one = format!(
        "UPDATE invocations SET lease_expires_at_ms = {DB_NOW_MS} + $2 \
         WHERE id = $3 AND attempt = $4 AND lease_owner = $1 AND status = 'running'"
    );
    for (id, attempt) in skipped {
        match sqlx::query(&one)
            .bind(&*lease.owner)
            .bind(lease.ms)
            .bind(&id)
            .bind(attempt)
            .execute(&mut *conn)
            .await
        {
            Ok(done) => held += done.rows_affected(),
            // Its lock was held past the lock timeout: it is renewed at the next tick (its
            // lease outlives two of them).
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03") => {
                tracing::debug!(invocation_id = %id, "lease renewal skipped a locked invocation");
            }
            Err(e) => return Err(backend(e)),
        }
    }
    Ok(held)
}

/// The node's session and the database's clock measured, as the store opens (it holds no
/// attempt yet: its previous life's are recovered by `recover_running`); the store refuses
/// to open when either fails.
pub(super) async fn start(
    options: &PgConnectOptions,
    lease: &Lease,
    renewals: &Renewals,
    clock: &DatabaseClock,
) -> StoreResult<PgConnection> {
    let mut conn = lock_node(options, lease).await?;
    let started = Instant::now();
    clock.measure(&mut conn).await?;
    renewals.record(started);
    Ok(conn)
}

/// Renews the leases of the `held` attempts every period until `stop` fires (or its sender
/// is dropped with the store), then ends the node's session. A failed renewal is logged and tried again at the
/// next tick, on a new session when the old one broke.
pub(super) async fn renew_loop(
    conn: PgConnection,
    options: PgConnectOptions,
    lease: Lease,
    held: Arc<Held>,
    renewals: Arc<Renewals>,
    clock: Arc<DatabaseClock>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut session = Some(conn);
    let mut ticks =
        tokio::time::interval_at(tokio::time::Instant::now() + lease.period, lease.period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = ticks.tick() => {}
        }
        let started = Instant::now();
        let tick = tokio::time::timeout(
            lease.period,
            renew_once(&mut session, &options, &lease, &held, &clock),
        )
        .await;
        match tick {
            Ok(Ok(held)) => {
                renewals.record(started);
                tracing::trace!(held, "leases renewed");
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, node_id = %lease.owner, "could not renew this node's leases");
            }
            Err(_) => {
                // The session is mid-statement: it cannot be used again.
                session = None;
                tracing::warn!(node_id = %lease.owner, "renewing this node's leases took longer than a third of the lease");
            }
        }
    }
    if let Some(mut conn) = session {
        // The node id is free at once for a node that starts with it.
        let _ = sqlx::query("SELECT pg_advisory_unlock_all()")
            .execute(&mut conn)
            .await;
        let _ = sqlx::Connection::close(conn).await;
    }
}

/// One renewal: on the node's session, made again (with its node-id lock) when it broke.
async fn renew_once(
    session: &mut Option<PgConnection>,
    options: &PgConnectOptions,
    lease: &Lease,
    held: &Held,
    clock: &DatabaseClock,
) -> StoreResult<u64> {
    let conn = match session {
        Some(conn) => conn,
        None => session.insert(lock_node(options, lease).await?),
    };
    let result = match clock.measure(conn).await {
        Ok(()) => renew(conn, lease, held).await,
        Err(e) => Err(e),
    };
    if result.is_err() && sqlx::Connection::ping(conn).await.is_err() {
        // The session broke, and its node-id lock with it.
        *session = None;
    }
    result
}
