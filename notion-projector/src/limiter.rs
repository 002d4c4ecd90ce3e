//! One limiter for every request to Notion: a token bucket (leaky-bucket) at the configured
//! rate, and a pause that a 429/529's `Retry-After` imposes on all requests at once.
//! Background work (the board's intake) asks with [`Limiter::acquire_yielding`] and goes
//! only when no status change waits, so it never queues ahead of one.
//!
//! Notion's limit is per token, not per process: with [`Limiter::shared`] the turns come
//! from the token's budget in PostgreSQL (`notion_rate_budgets`), which every projector
//! using the token shares. Each request reserves the next free time there (one interval
//! after the last one reserved, by whichever process) and waits for it, and a 429's pause
//! is written there for all of them.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use engine::PgStore;
use leaky_bucket::RateLimiter;
use tokio::time::Instant;

/// The request budget shared by every task the projector syncs.
#[derive(Debug)]
pub struct Limiter {
    bucket: RateLimiter,
    paused_until: Mutex<Option<Instant>>,
    /// Callers of [`Limiter::acquire`] waiting now.
    waiting: AtomicUsize,
    /// The time between two requests (see [`JITTER_HEADROOM`]), and how many may go back
    /// to back.
    interval: Duration,
    burst: u32,
    /// The token's budget in PostgreSQL, when shared.
    shared: Option<SharedBudget>,
}

/// A token's request budget in `notion_rate_budgets`.
#[derive(Debug)]
struct SharedBudget {
    store: PgStore,
    /// A hash of the token (see [`crate::NotionClient::budget_key`]).
    key: String,
    /// Set while the database cannot be reached: the local bucket stands in.
    degraded: AtomicBool,
}

/// Reserves the budget's next free time: one interval after the last reservation (or now,
/// or the pause's end, whichever is later), less the burst. The wait until it, in seconds.
const RESERVE_SQL: &str = "\
INSERT INTO notion_rate_budgets AS b (budget, next_at) \
VALUES ($1, clock_timestamp() + make_interval(secs => $2)) \
ON CONFLICT (budget) DO UPDATE \
   SET next_at = greatest(b.next_at, b.paused_until, clock_timestamp()) + make_interval(secs => $2) \
RETURNING greatest(extract(epoch FROM greatest(b.next_at - make_interval(secs => $2 * $3), \
                                               b.paused_until) - clock_timestamp()), 0)::float8";

const PAUSE_SQL: &str = "\
INSERT INTO notion_rate_budgets AS b (budget, next_at, paused_until) \
VALUES ($1, clock_timestamp(), clock_timestamp() + make_interval(secs => $2)) \
ON CONFLICT (budget) DO UPDATE \
   SET paused_until = greatest(b.paused_until, EXCLUDED.paused_until)";

impl SharedBudget {
    /// The wait until this request's reserved time.
    async fn reserve(&self, interval: Duration, burst: u32) -> Result<Duration, engine::Error> {
        let wait: f64 = self
            .store
            .on_pool(async |c| {
                self.store
                    .scalar(RESERVE_SQL)
                    .bind(&self.key)
                    .bind(interval.as_secs_f64())
                    .bind(f64::from(burst))
                    .fetch_one(c)
                    .await
            })
            .await?;
        Ok(Duration::try_from_secs_f64(wait).unwrap_or_default())
    }
}

/// Requests are spaced this much more than `1/rate` apart: requests sent exactly `1/rate`
/// apart reach Notion a few milliseconds early or late, and four of them then land within
/// one second. With 10% (33 ms at 3/s), `rate` requests never land within a second unless
/// one is held up 100 ms more than the one three places after it. At 3/s this sends 2.73
/// requests/s at most.
const JITTER_HEADROOM: f64 = 0.10;

/// How late a request may leave after its turn before it takes a new one: with the
/// headroom, `rate` requests then never leave within one second.
const LATE_TURN: Duration = Duration::from_millis(50);

/// How often a yielding caller looks again for a free token.
const YIELD_POLL: Duration = Duration::from_millis(25);

/// Counts a waiting [`Limiter::acquire`] until it returns or is dropped.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Limiter {
    /// `rate` requests per second on average, at most `burst` at once (both at least 1
    /// request per hour and 1). The bucket starts with one token: a fresh projector does not
    /// open with a burst.
    pub fn new(rate: f64, burst: u32) -> Limiter {
        let rate = if rate.is_finite() {
            rate.max(1.0 / 3600.0)
        } else {
            3.0
        };
        let micros = (1_000_000.0 * (1.0 + JITTER_HEADROOM) / rate)
            .ceil()
            .max(1_000.0);
        let interval = Duration::from_micros(micros as u64);
        let burst = burst.max(1);
        Limiter {
            bucket: RateLimiter::builder()
                .initial(1)
                .max(usize::try_from(burst).unwrap_or(1))
                .refill(1)
                .interval(interval)
                .fair(true)
                .build(),
            paused_until: Mutex::new(None),
            waiting: AtomicUsize::new(0),
            interval,
            burst,
            shared: None,
        }
    }

    /// The same limiter, taking its turns from the budget `key` (a hash of the token) in
    /// PostgreSQL, which every projector using the token shares. While the database cannot
    /// be reached, the local bucket stands in (a warning says so).
    pub fn shared(mut self, store: PgStore, key: impl Into<String>) -> Limiter {
        self.shared = Some(SharedBudget {
            store,
            key: key.into(),
            degraded: AtomicBool::new(false),
        });
        self
    }

    /// Waits until a request may be sent: past any pause, then for a turn. The turn's
    /// time: send right away (see [`Limiter::on_time`]).
    pub async fn acquire(&self) -> Instant {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.waiting);
        loop {
            if let Some(until) = self.paused_until() {
                tokio::time::sleep_until(until).await;
                continue;
            }
            let turn = self.take_turn().await;
            // A 429 may have paused everything while this waited for its turn.
            if self.paused_until().is_none() {
                return turn;
            }
        }
    }

    /// Right before sending on the turn taken at `turn`: when work since (reading the
    /// database) made the request more than [`LATE_TURN`] late, it takes a new turn, so
    /// that requests leave at the spacing the budget gave them. The turn to send on.
    pub async fn on_time(&self, turn: Instant) -> Instant {
        if Instant::now() <= turn + LATE_TURN {
            return turn;
        }
        self.acquire().await
    }

    /// Waits until a request may be sent and no [`Limiter::acquire`] waits: a turn is
    /// taken only then, so the next status change waits at most one interval.
    pub async fn acquire_yielding(&self) {
        loop {
            if let Some(until) = self.paused_until() {
                tokio::time::sleep_until(until).await;
                continue;
            }
            if self.waiting.load(Ordering::SeqCst) == 0 {
                if self.shared.is_some() {
                    self.take_turn().await;
                    if self.paused_until().is_none() {
                        return;
                    }
                    continue;
                }
                // The local bucket: the token is taken only when free.
                if self.bucket.try_acquire(1) {
                    return;
                }
            }
            tokio::time::sleep(YIELD_POLL).await;
        }
    }

    /// One turn: the next time reserved in the shared budget, or a token of the local
    /// bucket. Its time.
    async fn take_turn(&self) -> Instant {
        if let Some(shared) = &self.shared {
            match shared.reserve(self.interval, self.burst).await {
                Ok(wait) => {
                    if shared.degraded.swap(false, Ordering::SeqCst) {
                        tracing::info!("the token's shared request budget is back");
                    }
                    let turn = Instant::now() + wait;
                    tokio::time::sleep_until(turn).await;
                    return turn;
                }
                Err(error) => {
                    if !shared.degraded.swap(true, Ordering::SeqCst) {
                        tracing::warn!(error = %error, "cannot reach the token's shared request budget: this process keeps to its own rate until it can");
                    }
                }
            }
        }
        self.bucket.acquire_one().await;
        Instant::now()
    }

    /// Holds every request back for `wait` from now (a longer pause already set stays),
    /// in every projector sharing the budget.
    pub fn pause_for(&self, wait: Duration) {
        let until = Instant::now() + wait;
        {
            let mut paused = self.paused_until.lock().unwrap_or_else(|e| e.into_inner());
            if paused.is_none_or(|current| current < until) {
                *paused = Some(until);
            }
        }
        if let (Some(shared), Ok(runtime)) = (&self.shared, tokio::runtime::Handle::try_current()) {
            let (store, key) = (shared.store.clone(), shared.key.clone());
            runtime.spawn(async move {
                let written = store
                    .on_pool(async |c| {
                        store
                            .statement(PAUSE_SQL)
                            .bind(&key)
                            .bind(wait.as_secs_f64())
                            .execute(c)
                            .await
                    })
                    .await;
                if let Err(error) = written {
                    tracing::warn!(error = %error, "cannot share a Retry-After pause with the token's other projectors");
                }
            });
        }
    }

    /// The end of the pause in force, if any.
    pub fn paused_until(&self) -> Option<Instant> {
        let mut paused = self.paused_until.lock().unwrap_or_else(|e| e.into_inner());
        match *paused {
            Some(until) if until > Instant::now() => Some(until),
            Some(_) => {
                *paused = None;
                None
            }
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn spaces_requests_at_the_rate() {
        let limiter = Limiter::new(4.0, 1);
        let start = Instant::now();
        for _ in 0..5 {
            limiter.acquire().await;
        }
        // One token at start, then one per 275 ms (250 ms and the headroom).
        assert_eq!(start.elapsed(), Duration::from_millis(1100));
    }

    #[tokio::test(start_paused = true)]
    async fn yielding_callers_go_after_waiting_ones() {
        let limiter = std::sync::Arc::new(Limiter::new(4.0, 1));
        limiter.acquire().await;
        let order = std::sync::Arc::new(Mutex::new(Vec::new()));
        let background = {
            let (limiter, order) = (limiter.clone(), order.clone());
            tokio::spawn(async move {
                limiter.acquire_yielding().await;
                order.lock().map(|mut o| o.push("intake")).ok();
            })
        };
        tokio::task::yield_now().await;
        for _ in 0..3 {
            limiter.acquire().await;
            order.lock().map(|mut o| o.push("status")).ok();
        }
        background.await.ok();
        let order = order.lock().map(|o| o.clone()).unwrap_or_default();
        // The yielding caller waited for each status request that was waiting; once none
        // waits it gets the next free token.
        assert_eq!(order, vec!["status", "status", "status", "intake"]);
    }

    #[test]
    fn rate_intervals_never_fit_more_than_the_rate_in_a_second() {
        let limiter = Limiter::new(3.0, 1);
        assert_eq!(limiter.interval, Duration::from_micros(366_667));
        assert!(limiter.interval * 3 > Duration::from_millis(1_100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_holds_everything_back() {
        let limiter = Limiter::new(100.0, 10);
        limiter.acquire().await;
        limiter.pause_for(Duration::from_secs(2));
        limiter.pause_for(Duration::from_secs(1));
        let start = Instant::now();
        limiter.acquire().await;
        assert!(start.elapsed() >= Duration::from_secs(2));
        assert!(limiter.paused_until().is_none());
    }
}
