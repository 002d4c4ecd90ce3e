//! Following the global log: LISTEN for wake-ups, poll on a timer, re-poll after reconnects.
//!
//! Notifications are only a hint: they are lost while the listening connection is down,
//! and an event may be readable only after an older transaction ends (the watermark).
//! So the subscription always falls back to polling, and polls at once after any
//! listener trouble.

use std::time::{Duration, Instant};

use sqlx::postgres::PgListener;

use super::{Checkpoint, EVENTS_CHANNEL, GlobalLog, PgStore};
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
    listener: Option<PgListener>,
    position: Checkpoint,
    options: SubscriptionOptions,
}

impl Subscription {
    /// Starts following the log after `from`. Listening starts before the first read, so
    /// no notification between the two is missed.
    pub async fn start(store: PgStore, from: Checkpoint, options: SubscriptionOptions) -> Self {
        let mut subscription = Subscription {
            store,
            listener: None,
            position: from,
            options,
        };
        subscription.ensure_listening().await;
        subscription
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
    pub async fn next_batch(&mut self) -> Result<Vec<RecordedEvent>> {
        // A notification arrives at commit, but its event is readable only once every older
        // transaction on the cluster has ended (the watermark). So after a wake-up that
        // reads nothing, re-read quickly for up to a poll interval instead of sleeping it.
        let mut woken_at: Option<Instant> = None;
        loop {
            let batch = self
                .store
                .read_all_after(self.position, self.options.batch_size)
                .await?;
            if let Some(last) = batch.last() {
                self.position = Checkpoint::after(last);
                return Ok(batch);
            }
            match woken_at {
                Some(at) if at.elapsed() < self.options.poll_interval => {
                    tokio::time::sleep(WATERMARK_RETRY).await;
                }
                _ => woken_at = self.wait_for_wake_up().await.then(Instant::now),
            }
        }
    }

    /// Returns when a notification arrives or the listener had trouble (true: events may
    /// be waiting, read at once) or when the poll interval passes (false).
    async fn wait_for_wake_up(&mut self) -> bool {
        if !self.ensure_listening().await {
            tokio::time::sleep(self.options.poll_interval).await;
            return false;
        }
        let Some(listener) = self.listener.as_mut() else {
            return true;
        };
        match tokio::time::timeout(self.options.poll_interval, listener.try_recv()).await {
            Err(_elapsed) => false,
            Ok(Ok(Some(_))) => {
                // Drain notifications that piled up; one read serves them all.
                while listener.next_buffered().is_some() {}
                true
            }
            Ok(Ok(None)) => {
                tracing::warn!("event listener connection lost; re-reading, then listening again");
                true
            }
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "event listener failed; reconnecting");
                self.listener = None;
                true
            }
        }
    }

    /// Connects and LISTENs if not already; false when the database cannot be reached now.
    async fn ensure_listening(&mut self) -> bool {
        if self.listener.is_some() {
            return true;
        }
        let connected = async {
            let mut listener = PgListener::connect_with(self.store.pool()).await?;
            listener.listen(EVENTS_CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        }
        .await;
        match connected {
            Ok(listener) => {
                self.listener = Some(listener);
                true
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot LISTEN for events; polling");
                false
            }
        }
    }
}
