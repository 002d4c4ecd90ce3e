//! The database's clock, as seen from this process.
//!
//! Every time that another process compares — a park's end, a scheduled retry, a job's
//! age, a poll schedule that survives a park — is compared with PostgreSQL's `now()`, so it
//! must be a time of the database's clock, not of this machine's (which may be minutes
//! off: a worker 600 s behind once parked tasks "until" a time the database had long
//! passed, and they were claimed again at once, thousands of times a minute). Times that
//! only SQL reads are computed in SQL (`now() + interval`); times that go into an event
//! payload come from here: this machine's clock plus the offset measured against the
//! database, refreshed by every claim and by [`PgStore::sync_clock`].

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Instant;

use chrono::{DateTime, Utc};

use super::PgStore;
use crate::error::Result;

/// The database clock minus this machine's, in microseconds (0 until first measured).
#[derive(Debug, Default)]
pub(crate) struct DbClock {
    offset_micros: AtomicI64,
}

impl DbClock {
    pub(crate) fn shared() -> Arc<DbClock> {
        Arc::new(DbClock::default())
    }

    /// Now, by the database's clock.
    pub(crate) fn now(&self) -> DateTime<Utc> {
        let offset = self.offset_micros.load(Ordering::Relaxed);
        Utc::now() + chrono::Duration::microseconds(offset)
    }

    /// Takes a reading: the database said `db_time` somewhere between `sent` and now. It
    /// is taken as read now, the latest it can have been, so the estimate is never ahead
    /// of the database's clock (a time "due now" computed here is due for the database
    /// too); it is behind by at most the round trip.
    pub(crate) fn observe(&self, db_time: DateTime<Utc>, sent: Instant, sent_at: DateTime<Utc>) {
        let trip = sent.elapsed();
        let local = sent_at + chrono::Duration::from_std(trip).unwrap_or_default();
        let offset = (db_time - local).num_microseconds().unwrap_or(0);
        self.offset_micros.store(offset, Ordering::Relaxed);
    }
}

/// A local instant and wall time taken together, before a statement that returns the
/// database's time goes out.
pub(crate) struct Reading {
    pub(crate) sent: Instant,
    pub(crate) sent_at: DateTime<Utc>,
}

impl Reading {
    pub(crate) fn start() -> Reading {
        Reading {
            sent: Instant::now(),
            sent_at: Utc::now(),
        }
    }
}

impl PgStore {
    /// Now, by the database's clock (this machine's clock corrected by the offset last
    /// measured: see [`PgStore::sync_clock`]). Use it for any time another process
    /// compares with the database's `now()`.
    pub fn now(&self) -> DateTime<Utc> {
        self.clock().now()
    }

    /// Measures this machine's clock against the database's (one round trip) and returns
    /// the offset (database minus local). Claims refresh it on their own; a long-running
    /// process calls this at start.
    pub async fn sync_clock(&self) -> Result<chrono::Duration> {
        let reading = Reading::start();
        let db_time: DateTime<Utc> = self
            .on_pool(async |c| self.scalar("SELECT clock_timestamp()").fetch_one(c).await)
            .await?;
        self.clock().observe(db_time, reading.sent, reading.sent_at);
        Ok(self.clock().now() - Utc::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_observed_offset_moves_now_by_it() {
        let clock = DbClock::default();
        let reading = Reading::start();
        clock.observe(
            reading.sent_at + chrono::Duration::seconds(600),
            reading.sent,
            reading.sent_at,
        );
        let ahead = clock.now() - Utc::now();
        assert!(
            (ahead - chrono::Duration::seconds(600))
                .num_milliseconds()
                .abs()
                < 100,
            "{ahead}"
        );
    }
}
