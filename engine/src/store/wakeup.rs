//! Wake-ups: LISTEN on the events channel, with the poll interval as a fallback.
//!
//! Notifications are only a hint: they are lost while the listening connection is down.
//! So every waiter also wakes on a timer, and right after any listener trouble.

use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool};

use super::EVENTS_CHANNEL;

/// A LISTEN connection that reconnects lazily.
#[derive(Debug)]
pub(crate) struct WakeUps {
    /// Where LISTEN works (`None`: through a transaction pooler, nowhere: only the timer).
    pool: Option<PgPool>,
    listener: Option<PgListener>,
}

impl WakeUps {
    /// Starts listening at once (when the database answers), so nothing notified between
    /// now and the caller's first read is missed. Without a pool that keeps sessions
    /// (see [`PgStore::session_pool`](crate::PgStore::session_pool)) it only waits.
    pub(crate) async fn start(pool: Option<PgPool>) -> Self {
        let mut wake_ups = WakeUps {
            pool,
            listener: None,
        };
        wake_ups.ensure_listening().await;
        wake_ups
    }

    /// Waits up to `timeout`. True: a notification arrived or the listener had trouble
    /// (something may be waiting: look at once). False: the timeout passed quietly.
    pub(crate) async fn wait(&mut self, timeout: Duration) -> bool {
        if self.pool.is_none() {
            tokio::time::sleep(timeout).await;
            return false;
        }
        if !self.ensure_listening().await {
            tokio::time::sleep(timeout).await;
            return false;
        }
        let Some(listener) = self.listener.as_mut() else {
            return true;
        };
        match tokio::time::timeout(timeout, listener.try_recv()).await {
            Err(_elapsed) => false,
            Ok(Ok(Some(_))) => {
                // Drain what piled up; one look serves them all.
                while listener.next_buffered().is_some() {}
                true
            }
            Ok(Ok(None)) => {
                tracing::warn!("listen connection lost; looking now, then listening again");
                true
            }
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "listen connection failed; reconnecting");
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
        let Some(pool) = &self.pool else {
            return false;
        };
        let connected = async {
            let mut listener = PgListener::connect_with(pool).await?;
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
                tracing::warn!(error = %err, "cannot LISTEN; polling");
                false
            }
        }
    }
}
