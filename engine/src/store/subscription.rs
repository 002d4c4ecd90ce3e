//! Following the global log: LISTEN for wake-ups, poll on a timer, re-poll after reconnects.
//!
//! Notifications are only a hint: they are lost while the listening connection is down,
//! and an event may be readable only after an older transaction ends (the watermark).
//! So the subscription always falls back to polling, and polls at once after any
//! listener trouble.

use std::time::{Duration, Instant};

use super::wakeup::WakeUps;
use super::{Checkpoint, LogPage, PgStore};
use crate::error::Result;
use crate::event::RecordedEvent;

/// How soon to re-read after a wake-up found the watermark not yet past the new events.
const WATERMARK_RETRY: Duration = Duration::from_millis(20);

/// How a [`Subscription`] reads.
#[derive(Clone, Copy, Debug)]
pub struct SubscriptionOptions {
    /// The longest wait between reads when no notification arrives.
    pub poll_interval: Duration,
    /// The most events one `next_batch` returns.
    pub batch_size: u32,
}

impl Default for SubscriptionOptions {
    fn default() -> Self {
        SubscriptionOptions {
            poll_interval: Duration::from_millis(500),
            batch_size: 500,
        }
    }
}

/// A gap-safe follower of the global log from a checkpoint.
///
/// The in-memory position advances past each returned batch; durable progress is the
/// consumer's checkpoint, so after a crash it resumes from there (at-least-once delivery).
#[derive(Debug)]
pub struct Subscription {
    store: PgStore,
    wake_ups: WakeUps,
    position: Checkpoint,
    options: SubscriptionOptions,
}

impl Subscription {
    /// Starts following the log after `from`. Listening starts before the first read, so
    /// no notification between the two is missed.
    pub async fn start(store: PgStore, from: Checkpoint, options: SubscriptionOptions) -> Self {
        Subscription {
            wake_ups: WakeUps::start(store.session_pool().cloned()).await,
            store,
            position: from,
            options,
        }
    }

    /// Where the next batch starts.
    pub fn position(&self) -> Checkpoint {
        self.position
    }

    /// Moves the read position (to re-read after a consumer failure, or skip ahead).
    pub fn seek(&mut self, to: Checkpoint) {
        self.position = to;
    }

    /// Waits for and returns the next non-empty batch of committed events, in global order.
    /// Cancel-safe: dropping the future loses nothing (the position moves only on return).
    /// An event that cannot be decoded fails the call and leaves the position before it.
    pub async fn next_batch(&mut self) -> Result<Vec<RecordedEvent>> {
        let before = self.position;
        let page = self.next_page(None).await?;
        let batch: Result<Vec<RecordedEvent>> = page.events.into_iter().collect();
        if batch.is_err() {
            self.position = before;
        }
        batch
    }

    /// Waits for the next read that scans at least one new row, and returns it with only
    /// the events of `types` decoded (every type when `None`). The page may hold no
    /// matching event: its [`LogPage::end`] still moves a consumer's checkpoint past what
    /// it scanned. Cancel-safe like [`Subscription::next_batch`].
    pub async fn next_page(&mut self, types: Option<&[&str]>) -> Result<LogPage> {
        // A notification arrives at commit, but its event is readable only once every older
        // transaction on the cluster has ended (the watermark). So after a wake-up that
        // reads nothing, re-read quickly for up to a poll interval instead of sleeping it.
        let mut woken_at: Option<Instant> = None;
        loop {
            let page = self
                .store
                .read_page(self.position, self.options.batch_size, types)
                .await?;
            if let Some(end) = page.end {
                self.position = end;
                return Ok(page);
            }
            match woken_at {
                Some(at) if at.elapsed() < self.options.poll_interval => {
                    tokio::time::sleep(WATERMARK_RETRY).await;
                }
                _ => {
                    woken_at = self
                        .wake_ups
                        .wait(self.options.poll_interval)
                        .await
                        .then(Instant::now)
                }
            }
        }
    }
}
