//! The database's clock, as seen from this process: the system clock plus the offset to
//! PostgreSQL's `clock_timestamp()`, measured when the store opens and again at each lease
//! renewal. Every node that reads due times through it compares them with one clock (the
//! database's), whatever its own clock says.

use std::sync::atomic::{AtomicI64, Ordering};

use sqlx::PgConnection;

use super::{backend, StoreResult};
use crate::clock::{Clock, SystemClock};

/// The database's time now, in milliseconds since the epoch, as SQL.
pub(super) const DB_NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::BIGINT";

/// The system clock shifted by the last measured offset to the database's clock.
#[derive(Debug, Default)]
pub(super) struct DatabaseClock {
    /// Database time minus local time, in milliseconds.
    offset_ms: AtomicI64,
}

impl DatabaseClock {
    /// Measures the offset on `conn`: the database's time against the midpoint of the
    /// request's local send and receive times (half the round trip either way is the
    /// measurement's error bound).
    pub(super) async fn measure(&self, conn: &mut PgConnection) -> StoreResult<()> {
        let sent = SystemClock.now_ms();
        let db_ms: i64 = sqlx::query_scalar(&format!("SELECT {DB_NOW_MS}"))
            .fetch_one(conn)
            .await
            .map_err(backend)?;
        let received = SystemClock.now_ms();
        let midpoint = sent + (received - sent) / 2;
        self.offset_ms.store(db_ms - midpoint, Ordering::Relaxed);
        Ok(())
    }

    /// Database time minus local time, as last measured.
    pub(super) fn offset_ms(&self) -> i64 {
        self.offset_ms.load(Ordering::Relaxed)
    }
}

impl Clock for DatabaseClock {
    fn now_ms(&self) -> i64 {
        SystemClock.now_ms() + self.offset_ms()
    }
}
