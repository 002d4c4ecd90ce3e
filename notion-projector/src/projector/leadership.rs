//! What a leader holds: the leader lock (a session advisory lock on a connection of its
//! own, pinged every second) and, with a board, the board's lock on the same session, which
//! makes it the board's card owner. Several projectors may mirror one board (a Status and a
//! Stage property, under two names); only the owner makes cards and takes cards in, so one
//! board gets one card per task. A standby for the board's lock tries it every second; a
//! dead owner's session ends, and another projector's leader takes the board over.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;

use super::{Projector, ProjectorError};
use crate::board::Board;

/// When a leader stops: `stop` (shutdown, or the lock lost) starts no new request;
/// `lock_lost` also abandons the requests in flight, because another instance may lead
/// by now and send a newer status that a late answer of ours must not overwrite.
#[derive(Clone, Debug)]
pub(super) struct Halt {
    pub(super) stop: CancellationToken,
    pub(super) lock_lost: CancellationToken,
    /// The lock session's backend: a request that must not go out twice (a card's create)
    /// checks that this session still holds the locks right before it is sent.
    pub(super) lock_pid: i32,
    /// Whether this leader owns the board's cards (holds the board's lock).
    pub(super) owns_board: Arc<AtomicBool>,
}

impl Halt {
    pub(super) fn cancelled(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.stop.cancelled()
    }

    pub(super) fn owns_board(&self) -> bool {
        self.owns_board.load(Ordering::SeqCst)
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

/// Takes the lock `name` on `conn` if it is free (never waits).
pub(super) async fn try_lock(conn: &mut PgConnection, name: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
        .bind(name)
        .fetch_one(conn)
        .await
}

/// Pings the lock connection every second (or, while another projector owns the board,
/// tries the board's lock instead); on failure cancels `halt`. Returns the connection (to
/// unlock it) when `done`.
pub(super) async fn watch_lock(
    mut conn: PgConnection,
    halt: Halt,
    done: CancellationToken,
    board_lock: Option<String>,
) -> Option<PgConnection> {
    loop {
        tokio::select! {
            _ = done.cancelled() => return Some(conn),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let check = async {
            match board_lock.as_deref().filter(|_| !halt.owns_board()) {
                Some(name) => {
                    if try_lock(&mut conn, name).await? {
                        halt.owns_board.store(true, Ordering::SeqCst);
                        tracing::info!(
                            "owning the board's cards (the board's former owner stopped)"
                        );
                    }
                    Ok::<(), sqlx::Error>(())
                }
                None => conn.ping().await,
            }
        };
        if !matches!(
            tokio::time::timeout(Duration::from_secs(5), check).await,
            Ok(Ok(()))
        ) {
            tracing::warn!("the leader lock's connection failed: stepping back");
            halt.owns_board.store(false, Ordering::SeqCst);
            halt.lock_lost.cancel();
            halt.stop.cancel();
            return None;
        }
    }
}

impl Projector {
    /// Whether the lock session still holds the leader lock and the board's lock, asked
    /// over another connection right before a request that must not go out twice: the
    /// watchdog notices a lost session only at its next ping.
    pub(super) async fn still_owns_board(
        &self,
        halt: &Halt,
        board: &Board,
    ) -> Result<bool, ProjectorError> {
        let held: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks \
              WHERE locktype = 'advisory' AND granted AND pid = $1 AND objsubid = 1 \
                AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                AND ((classid::int8 << 32) | objid::int8) \
                    IN (hashtextextended($2, 0), hashtextextended($3, 0))",
        )
        .bind(halt.lock_pid)
        .bind(self.lock_name())
        .bind(board_lock_name(board))
        .fetch_one(self.store.pool())
        .await?;
        Ok(held == 2 && !halt.lock_lost.is_cancelled())
    }
}
