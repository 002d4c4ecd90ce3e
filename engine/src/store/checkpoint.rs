//! Sidecar checkpoints: where each follower of the global log stands, as the pair
//! `(tx_id, global_position)` in `projector_checkpoints`.
//!
//! Every sidecar loads its checkpoint, moves it by compare-and-set in the same transaction
//! as the state it derived (so a zombie instance cannot move it back), and may start at the
//! log's head. The head respects the same `pg_snapshot_xmin` watermark as the gap-safe read:
//! a transaction still in flight has an xid at or above the watermark, so it sorts after
//! the head and is read later, never skipped.

use sqlx::postgres::PgConnection;

use super::{Checkpoint, PgStore};
use crate::error::Result;

/// The transaction ids the log holds, against the ones this cluster hands out: see
/// [`PgStore::tx_id_horizon`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxIdHorizon {
    /// The highest `tx_id` in `events` or in a checkpoint (0 when there are none).
    pub highest_stored: u64,
    /// The next transaction id this cluster will assign (`pg_snapshot_xmax`).
    pub next_assigned: u64,
}

impl TxIdHorizon {
    /// Whether stored ids are ahead of the cluster's counter, which happens after a logical
    /// dump is restored into another cluster: new events would then sort below the
    /// restored ones, and a follower whose checkpoint is past them would skip them.
    pub fn is_ahead(&self) -> bool {
        self.highest_stored >= self.next_assigned
    }
}

// The last event below the watermark: every event after it is either newer or still in
// flight, and both are read after it.
const LOG_HEAD_SQL: &str = "SELECT tx_id::text, global_position FROM events \
     WHERE tx_id < pg_snapshot_xmin(pg_current_snapshot()) \
     ORDER BY tx_id DESC, global_position DESC LIMIT 1";

impl PgStore {
    /// The checkpoint of follower `name`, created at the start of the log if it has none.
    pub async fn load_checkpoint(&self, name: &str) -> Result<Checkpoint> {
        self.on_pool(async |c| {
            self.statement(
                "INSERT INTO projector_checkpoints (projector) VALUES ($1) ON CONFLICT DO NOTHING",
            )
            .bind(name)
            .execute(c)
            .await
        })
        .await?;
        let (tx_id, position): (String, i64) = self.on_pool(async |c| self.rows_as(
            "SELECT last_tx_id::text, last_position FROM projector_checkpoints WHERE projector = $1",
        )
        .bind(name)
        .fetch_one(c).await).await?;
        Ok(checkpoint(&tx_id, position))
    }

    /// Moves the checkpoint of `name` from `expected` to `to` inside the caller's
    /// transaction; false (and nothing written) when it is no longer at `expected`: another
    /// instance moved it, and this one must not write.
    pub async fn compare_and_set_checkpoint(
        &self,
        conn: &mut PgConnection,
        name: &str,
        expected: Checkpoint,
        to: Checkpoint,
    ) -> Result<bool> {
        let moved = self
            .statement(
                "UPDATE projector_checkpoints \
                SET last_tx_id = $2::text::xid8, last_position = $3, updated_at = now() \
              WHERE projector = $1 AND last_tx_id = $4::text::xid8 AND last_position = $5",
            )
            .bind(name)
            .bind(to.tx_id.to_string())
            .bind(to.position)
            .bind(expected.tx_id.to_string())
            .bind(expected.position)
            .execute(&mut *conn)
            .await?
            .rows_affected();
        Ok(moved == 1)
    }

    /// The log's head for a follower that starts now: the last event below the watermark
    /// ([`Checkpoint::START`] when there is none). Events of transactions still in flight
    /// sort after it, so a follower starting here reads them.
    pub async fn log_head(&self) -> Result<Checkpoint> {
        let head: Option<(String, i64)> = self
            .on_pool(async |c| self.rows_as(LOG_HEAD_SQL).fetch_optional(c).await)
            .await?;
        Ok(head.map_or(Checkpoint::START, |(tx_id, position)| {
            checkpoint(&tx_id, position)
        }))
    }

    /// Puts the checkpoint of `name` at [`PgStore::log_head`]. With `keep_existing`, a
    /// follower that already has a checkpoint keeps it. Returns the stored checkpoint.
    pub async fn checkpoint_at_head(&self, name: &str, keep_existing: bool) -> Result<Checkpoint> {
        let head = self.log_head().await?;
        self.on_pool(async |c| {
            self.statement(
                "INSERT INTO projector_checkpoints (projector, last_tx_id, last_position) \
             VALUES ($1, $2::text::xid8, $3) \
             ON CONFLICT (projector) DO UPDATE \
                SET last_tx_id = EXCLUDED.last_tx_id, last_position = EXCLUDED.last_position, \
                    updated_at = now() \
              WHERE NOT $4",
            )
            .bind(name)
            .bind(head.tx_id.to_string())
            .bind(head.position)
            .bind(keep_existing)
            .execute(c)
            .await
        })
        .await?;
        self.load_checkpoint(name).await
    }

    /// The highest transaction id stored (events and checkpoints) against this cluster's
    /// next one: [`TxIdHorizon::is_ahead`] means the log was restored from another cluster
    /// and following it in `(tx_id, position)` order would skip new events.
    pub async fn tx_id_horizon(&self) -> Result<TxIdHorizon> {
        let (stored, next): (String, String) = self
            .on_pool(async |c| {
                self.rows_as(
                    "SELECT GREATEST( \
                    (SELECT max(tx_id) FROM events), \
                    (SELECT max(last_tx_id) FROM projector_checkpoints), '0'::xid8)::text, \
                    pg_snapshot_xmax(pg_current_snapshot())::text",
                )
                .fetch_one(c)
                .await
            })
            .await?;
        Ok(TxIdHorizon {
            highest_stored: stored.parse().unwrap_or(0),
            next_assigned: next.parse().unwrap_or(u64::MAX),
        })
    }
}

fn checkpoint(tx_id: &str, position: i64) -> Checkpoint {
    Checkpoint {
        tx_id: tx_id.parse().unwrap_or(0),
        position,
    }
}
