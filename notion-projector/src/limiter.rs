//! One limiter for every request to Notion: a token bucket (leaky-bucket) at the configured
//! rate, and a pause that a 429/529's `Retry-After` imposes on all requests at once.
//! Background work (the board's intake) asks with [`Limiter::acquire_yielding`] and goes
//! only when no status change waits, so it never queues ahead of one.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use leaky_bucket::RateLimiter;
use tokio::time::Instant;

/// The request budget shared by every task the projector syncs.
#[derive(Debug)]
pub struct Limiter {
    bucket: RateLimiter,
    paused_until: Mutex<Option<Instant>>,
    /// Callers of [`Limiter::acquire`] waiting now.
    waiting: AtomicUsize,
}

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
        let interval = Duration::from_secs_f64(1.0 / rate).max(Duration::from_millis(1));
        let burst = usize::try_from(burst.max(1)).unwrap_or(1);
        Limiter {
            bucket: RateLimiter::builder()
                .initial(1)
                .max(burst)
                .refill(1)
                .interval(interval)
                .fair(true)
                .build(),
            paused_until: Mutex::new(None),
            waiting: AtomicUsize::new(0),
        }
    }

    /// Waits until a request may be sent: past any pause, then for a token.
    pub async fn acquire(&self) {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.waiting);
        loop {
            if let Some(until) = self.paused_until() {
                tokio::time::sleep_until(until).await;
                continue;
            }
            self.bucket.acquire_one().await;
            // A 429 may have paused everything while this waited for its token.
            if self.paused_until().is_none() {
                return;
            }
        }
    }

    /// Waits until a request may be sent and no [`Limiter::acquire`] waits: the token is
    /// taken only when free, so the next status change waits at most one interval.
    pub async fn acquire_yielding(&self) {
        loop {
            if let Some(until) = self.paused_until() {
                tokio::time::sleep_until(until).await;
                continue;
            }
            if self.waiting.load(Ordering::SeqCst) == 0 && self.bucket.try_acquire(1) {
                return;
            }
            tokio::time::sleep(YIELD_POLL).await;
        }
    }

    /// Holds every request back for `wait` from now (a longer pause already set stays).
    pub fn pause_for(&self, wait: Duration) {
        let until = Instant::now() + wait;
        let mut paused = self.paused_until.lock().unwrap_or_else(|e| e.into_inner());
        if paused.is_none_or(|current| current < until) {
            *paused = Some(until);
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
        // One token at start, then one per 250 ms.
        assert_eq!(start.elapsed(), Duration::from_millis(1000));
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
