//! What a leader holds: the leader lock and, with a board, the board's lock, which makes it
//! the board's card owner. Several projectors may mirror one board (a Status and a Stage
//! property, under two names); only the owner makes cards, so one board gets one card per
//! task. Intake has a lock of its own, contended only by leaders with intake on: the card
//! owner may well be a projector without it. A standby for the board's lock tries it every second; a dead
//! owner's lock ends, and another projector's leader takes the board over.
//!
//! The locks are session advisory locks on a connection of their own (pinged every
//! second), when the store has a session: a direct connection, or a session pooler. Behind
//! a transaction pooler without `REEL_DIRECT_DATABASE_URL` there is no session to hold a
//! lock in, and the locks are lease rows instead (`leader_leases`): taken when free or
//! expired, renewed every second for [`LEASE_TTL`]. A leader paused past its lease (a long
//! GC pause, a frozen VM) can overlap its successor until its next renewal fails; a
//! session lock cannot, which is why the direct URL is the better set-up.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use engine::PgStore;
use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;

use super::{Projector, ProjectorError};
use crate::board::Board;

/// How long a lease row holds a lock without being renewed (renewals come every second).
pub(super) const LEASE_TTL: Duration = Duration::from_secs(5);

/// When a leader stops: `stop` (shutdown, or the lock lost) starts no new request;
/// `lock_lost` also abandons the requests in flight, because another instance may lead
/// by now and send a newer status that a late answer of ours must not overwrite.
#[derive(Clone, Debug)]
pub(super) struct Halt {
    pub(super) stop: CancellationToken,
    pub(super) lock_lost: CancellationToken,
    /// Who holds the locks: a request that must not go out twice (a card's create) checks
    /// that they are still held right before it is sent.
    pub(super) holder: Holder,
    /// Whether this leader owns the board's cards (holds the board's lock).
    pub(super) owns_board: Arc<AtomicBool>,
    /// Whether this leader takes the board's new cards in (holds the board's intake lock;
    /// only leaders with intake on contend for it).
    pub(super) takes_in: Arc<AtomicBool>,
}

/// Who holds a leader's locks.
#[derive(Clone, Debug)]
pub(super) enum Holder {
    /// A session's backend, holding advisory locks.
    Session(i32),
    /// A lease-row holder id (unique per leadership).
    Lease(String),
}

impl Halt {
    pub(super) fn cancelled(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.stop.cancelled()
    }

    pub(super) fn owns_board(&self) -> bool {
        self.owns_board.load(Ordering::SeqCst)
    }

    pub(super) fn takes_in(&self) -> bool {
        self.takes_in.load(Ordering::SeqCst)
    }

    /// The same leadership with a `stop` of its own (cancelled with this one's).
    pub(super) fn child(&self) -> Halt {
        Halt {
            stop: self.stop.child_token(),
            ..self.clone()
        }
    }
}

/// The board's lock: one card owner per data source, whatever the projectors' names.
pub(super) fn board_lock_name(board: &Board) -> String {
    format!("reel/notion-board/{}", board.data_source)
}

/// The board's intake lock: one projector takes a board's new cards in, and only one with
/// intake on contends for it (the card owner may be a projector without intake).
pub(super) fn intake_lock_name(board: &Board) -> String {
    format!("reel/notion-intake/{}", board.data_source)
}

/// A lock a leader takes beside its own when it is free, and tries again every second
/// while another projector holds it.
#[derive(Debug)]
pub(super) struct SideLock {
    pub(super) name: String,
    pub(super) held: Arc<AtomicBool>,
    /// What the log says when this leader takes it over.
    pub(super) taken_over: &'static str,
}

/// Where a leader's locks live.
#[derive(Debug)]
pub(super) enum Locks {
    /// Session advisory locks on this connection.
    Session(PgConnection),
    /// Lease rows held as `holder`.
    Lease { store: PgStore, holder: String },
}

impl Locks {
    /// A session of its own when the store has one, else lease rows.
    pub(super) async fn open(store: &PgStore) -> Result<Locks, ProjectorError> {
        match store.session_pool() {
            Some(pool) => Ok(Locks::Session(
                PgConnection::connect_with(&pool.connect_options()).await?,
            )),
            None => Ok(Locks::Lease {
                store: store.clone(),
                holder: format!("projector-{}", uuid::Uuid::new_v4()),
            }),
        }
    }

    /// Takes the lock `name` if it is free (never waits).
    pub(super) async fn try_lock(&mut self, name: &str) -> Result<bool, ProjectorError> {
        match self {
            Locks::Session(conn) => Ok(sqlx::query_scalar(
                "SELECT pg_try_advisory_lock(hashtextextended($1, 0))",
            )
            .bind(name)
            .fetch_one(conn)
            .await?),
            Locks::Lease { store, holder } => Ok(store.take_lead(name, holder, LEASE_TTL).await?),
        }
    }

    /// Who holds these locks, for checks from other connections.
    pub(super) async fn holder(&mut self) -> Result<Holder, ProjectorError> {
        match self {
            Locks::Session(conn) => Ok(Holder::Session(
                sqlx::query_scalar("SELECT pg_backend_pid()")
                    .fetch_one(conn)
                    .await?,
            )),
            Locks::Lease { holder, .. } => Ok(Holder::Lease(holder.clone())),
        }
    }

    /// Keeps the locks: pings the session, or renews the leases. False: they are lost.
    async fn keep(&mut self) -> Result<bool, ProjectorError> {
        match self {
            Locks::Session(conn) => {
                conn.ping().await?;
                Ok(true)
            }
            Locks::Lease { store, holder } => {
                const RENEW_SQL: &str = "UPDATE leader_leases \
                     SET expires_at = now() + make_interval(secs => $2) \
                     WHERE holder = $1 AND expires_at >= now()";
                let kept = store
                    .on_pool(async |c| {
                        store
                            .statement(RENEW_SQL)
                            .bind(holder.as_str())
                            .bind(LEASE_TTL.as_secs_f64())
                            .execute(c)
                            .await
                    })
                    .await?;
                Ok(kept.rows_affected() > 0)
            }
        }
    }

    /// Gives every lock up (best effort: they end with the session or the lease anyway).
    pub(super) async fn release(self) {
        match self {
            Locks::Session(mut conn) => {
                let _ = sqlx::query("SELECT pg_advisory_unlock_all()")
                    .execute(&mut conn)
                    .await;
                let _ = conn.close().await;
            }
            Locks::Lease { store, holder } => {
                const RELEASE_SQL: &str = "DELETE FROM leader_leases WHERE holder = $1";
                let _ = store
                    .on_pool(async |c| {
                        store
                            .statement(RELEASE_SQL)
                            .bind(holder.as_str())
                            .execute(c)
                            .await
                    })
                    .await;
            }
        }
    }
}

/// Keeps the locks every second (and tries each side lock another projector holds: the
/// board's, the board's intake); when they are lost or cannot be kept, cancels `halt`.
/// Returns the locks (to release them) when `done`.
pub(super) async fn watch_lock(
    mut locks: Locks,
    halt: Halt,
    done: CancellationToken,
    side_locks: Vec<SideLock>,
) -> Option<Locks> {
    loop {
        tokio::select! {
            _ = done.cancelled() => return Some(locks),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let check = async {
            let kept = locks.keep().await?;
            if kept {
                for side in &side_locks {
                    if !side.held.load(Ordering::SeqCst) && locks.try_lock(&side.name).await? {
                        side.held.store(true, Ordering::SeqCst);
                        tracing::info!("{}", side.taken_over);
                    }
                }
            }
            Ok::<bool, ProjectorError>(kept)
        };
        if !matches!(
            tokio::time::timeout(Duration::from_secs(5), check).await,
            Ok(Ok(true))
        ) {
            tracing::warn!("the leader lock was lost or cannot be kept: stepping back");
            for side in &side_locks {
                side.held.store(false, Ordering::SeqCst);
            }
            halt.lock_lost.cancel();
            halt.stop.cancel();
            return None;
        }
    }
}

impl Projector {
    /// Whether the leader still holds the leader lock and the board's lock, asked over
    /// another connection right before a request that must not go out twice: the watchdog
    /// notices a lost lock only at its next round.
    pub(super) async fn still_owns_board(
        &self,
        halt: &Halt,
        board: &Board,
    ) -> Result<bool, ProjectorError> {
        let (leader, board) = (self.lock_name(), board_lock_name(board));
        let held: i64 = match &halt.holder {
            Holder::Session(pid) => {
                const SESSION_SQL: &str = "SELECT count(*) FROM pg_locks \
                      WHERE locktype = 'advisory' AND granted AND pid = $1 AND objsubid = 1 \
                        AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                        AND ((classid::int8 << 32) | objid::int8) \
                            IN (hashtextextended($2, 0), hashtextextended($3, 0))";
                self.store
                    .on_pool(async |c| {
                        self.store
                            .scalar(SESSION_SQL)
                            .bind(*pid)
                            .bind(&leader)
                            .bind(&board)
                            .fetch_one(c)
                            .await
                    })
                    .await?
            }
            Holder::Lease(holder) => {
                const LEASE_SQL: &str = "SELECT count(*) FROM leader_leases \
                      WHERE holder = $1 AND name IN ($2, $3) AND expires_at > now()";
                self.store
                    .on_pool(async |c| {
                        self.store
                            .scalar(LEASE_SQL)
                            .bind(holder.as_str())
                            .bind(&leader)
                            .bind(&board)
                            .fetch_one(c)
                            .await
                    })
                    .await?
            }
        };
        Ok(held == 2 && !halt.lock_lost.is_cancelled())
    }
}
