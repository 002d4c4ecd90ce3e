//! Archival (issue 31): the database's side of moving a finished task's stream out of
//! `events` and back. Where the archive lives (a directory, a bucket) and its format are
//! the caller's (`reel archive`); here are the stream exactly as stored, the pick of
//! finished tasks, and the two transactions that hand a stream over:
//!
//! - [`PgStore::finish_archive`] deletes a stream the caller has written and verified,
//!   re-checking in the same transaction that the task is still finished at the same
//!   version (a concurrent `retry` wins: nothing is deleted) and that every registered
//!   follower of the global log has read all of it;
//! - [`PgStore::restore_stream`] puts a stream back exactly as it was (the same global
//!   positions and transaction ids, so no follower reads it twice).
//!
//! While a task is archived, appends to it are refused (the fence checks `archived_at`),
//! and commands that need its history answer [`Error::Archived`].

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sqlx::Row;
use uuid::Uuid;

use super::PgStore;
use crate::error::{Error, Result};
use crate::event::{EventRow, RecordedEvent};
use crate::id::{ChannelId, TaskId};
use crate::status::TaskStatus;

/// One row of `events`, every column exactly as stored: `payload` and `metadata` are the
/// stored JSON text, untouched.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoredEvent {
    pub global_position: i64,
    /// The writing transaction's id (`xid8`).
    pub tx_id: i64,
    pub stream_id: Uuid,
    pub stream_version: i32,
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: i16,
    pub payload: Box<RawValue>,
    pub metadata: Box<RawValue>,
    pub recorded_at: DateTime<Utc>,
}

impl StoredEvent {
    /// The event decoded as a read from `events` decodes it (upcasting included).
    pub fn decode(&self) -> Result<RecordedEvent> {
        EventRow {
            global_position: self.global_position,
            tx_id: self.tx_id,
            stream_id: self.stream_id,
            stream_version: self.stream_version,
            event_id: self.event_id,
            event_type: self.event_type.clone(),
            schema_version: self.schema_version,
            payload: self.payload.get().to_owned(),
            metadata: self.metadata.get().to_owned(),
            recorded_at: self.recorded_at,
        }
        .decode()
    }

    /// Whether two are the same row, byte for byte.
    pub fn same_as(&self, other: &StoredEvent) -> bool {
        self.global_position == other.global_position
            && self.tx_id == other.tx_id
            && self.stream_id == other.stream_id
            && self.stream_version == other.stream_version
            && self.event_id == other.event_id
            && self.event_type == other.event_type
            && self.schema_version == other.schema_version
            && self.payload.get() == other.payload.get()
            && self.metadata.get() == other.metadata.get()
            && self.recorded_at == other.recorded_at
    }
}

/// Which finished tasks to archive.
#[derive(Clone, Debug)]
pub struct ArchiveFilter {
    /// Only tasks that finished (their row last changed) before this.
    pub finished_before: DateTime<Utc>,
    pub channel: Option<ChannelId>,
    pub workflow: Option<String>,
}

/// A finished task the archiver may take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchiveCandidate {
    pub task: TaskId,
    pub channel: ChannelId,
    pub workflow: String,
    pub status: TaskStatus,
    /// The stream's version when picked: the archive must hold exactly this many events.
    pub version: u32,
    /// When the task finished (its row's last change): the pick's order and its cursor.
    pub finished_at: DateTime<Utc>,
}

/// What [`PgStore::finish_archive`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArchiveCommit {
    /// The stream's events were deleted and the row marked archived.
    Archived { events: u64 },
    /// The task is no longer finished at the version archived (a retry won, say): nothing
    /// was deleted. The written archive is simply not referenced.
    Changed,
    /// A follower of the global log has not read all of the stream yet, or still has a
    /// sync of it to retry: nothing was deleted. Try again once it has.
    FollowerBehind { follower: String },
    /// Another archiver archived it first: nothing more to do.
    AlreadyArchived,
}

/// What [`PgStore::restore_stream`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RestoreOutcome {
    /// The stream is back in `events` and the row no longer archived.
    Restored { events: u64 },
    /// The task was not archived (restored already, or never archived): nothing changed.
    NotArchived,
}

/// Finished: never queued, running, parked, retry-scheduled or in review. A failed or
/// cancelled task still parked follows its provider jobs to their end, so it is not.
const CANDIDATES_SQL: &str = r#"
SELECT id, channel_id, workflow, status, version, updated_at FROM tasks
WHERE status IN ('completed', 'failed', 'cancelled') AND archived_at IS NULL AND NOT parked
  AND updated_at < $1
  AND ($2::text IS NULL OR channel_id = $2)
  AND ($3::text IS NULL OR workflow = $3)
  AND ($4::timestamptz IS NULL OR (updated_at, id) > ($4, $5))
ORDER BY updated_at, id
LIMIT $6
"#;

// Locks the row and re-checks it: still finished, at the version archived, not parked,
// not archived, held by no one.
const RECHECK_SQL: &str = r#"
SELECT 1 FROM tasks
WHERE id = $1 AND version = $2 AND status IN ('completed', 'failed', 'cancelled')
  AND NOT parked AND archived_at IS NULL AND lease_owner IS NULL
FOR UPDATE
"#;

// A registered follower that has not read every event of the stream, or that still has
// a sync of the task to try again (a retry due, or a retryable failure not yet resolved):
// it would read the stream then.
const FOLLOWER_BEHIND_SQL: &str = r#"
SELECT projector FROM (
    SELECT c.projector FROM projector_checkpoints c
    WHERE EXISTS (SELECT 1 FROM events e
                  WHERE e.stream_id = $1
                    AND (e.tx_id, e.global_position) > (c.last_tx_id, c.last_position))
    UNION ALL
    SELECT r.projector FROM sync_retries r WHERE r.task_id = $1
    UNION ALL
    SELECT f.projector FROM sync_failures f
    WHERE f.task_id = $1 AND f.resolved_at IS NULL AND f.retryable
) AS behind
ORDER BY projector
LIMIT 1
"#;

impl PgStore {
    /// The stream of `task` exactly as stored, in version order.
    pub async fn stored_stream(&self, task: TaskId) -> Result<Vec<StoredEvent>> {
        let rows = self
            .on_pool(async |c| {
                self.statement(
                    "SELECT global_position, tx_id::text::bigint AS tx_id, stream_id, \
                            stream_version, event_id, event_type, schema_version, \
                            payload::text AS payload, metadata::text AS metadata, recorded_at \
                     FROM events WHERE stream_id = $1 ORDER BY stream_version",
                )
                .bind(task.as_uuid())
                .fetch_all(c)
                .await
            })
            .await?;
        let raw = |text: String| {
            RawValue::from_string(text).map_err(|e| Error::Database(sqlx::Error::Decode(e.into())))
        };
        rows.into_iter()
            .map(|row| {
                Ok(StoredEvent {
                    global_position: row.try_get("global_position")?,
                    tx_id: row.try_get("tx_id")?,
                    stream_id: row.try_get("stream_id")?,
                    stream_version: row.try_get("stream_version")?,
                    event_id: row.try_get("event_id")?,
                    event_type: row.try_get("event_type")?,
                    schema_version: row.try_get("schema_version")?,
                    payload: raw(row.try_get("payload")?)?,
                    metadata: raw(row.try_get("metadata")?)?,
                    recorded_at: row.try_get("recorded_at")?,
                })
            })
            .collect()
    }

    /// Up to `limit` finished, unarchived tasks matching `filter`, oldest finish first,
    /// after `after` (the last one of the previous page).
    pub async fn archive_candidates(
        &self,
        filter: &ArchiveFilter,
        after: Option<&ArchiveCandidate>,
        limit: u32,
    ) -> Result<Vec<ArchiveCandidate>> {
        let rows = self
            .on_pool(async |c| {
                self.statement(CANDIDATES_SQL)
                    .bind(filter.finished_before)
                    .bind(filter.channel.as_ref().map(ChannelId::as_str))
                    .bind(filter.workflow.as_deref())
                    .bind(after.map(|a| a.finished_at))
                    .bind(after.map(|a| a.task.as_uuid()))
                    .bind(i64::from(limit))
                    .fetch_all(c)
                    .await
            })
            .await?;
        let mut candidates = Vec::with_capacity(rows.len());
        for row in rows {
            let task = TaskId::from(row.try_get::<Uuid, _>("id")?);
            // A row written by hand with a channel outside the rules: skipped, not fatal.
            let channel = match ChannelId::parse(&row.try_get::<String, _>("channel_id")?) {
                Ok(channel) => channel,
                Err(err) => {
                    tracing::warn!(%task, error = %err, "not archived: its channel id is not valid");
                    continue;
                }
            };
            candidates.push(ArchiveCandidate {
                task,
                channel,
                workflow: row.try_get("workflow")?,
                status: row
                    .try_get::<String, _>("status")?
                    .parse()
                    .map_err(|e| Error::InvalidInput(format!("tasks.status: {e}")))?,
                version: u32::try_from(row.try_get::<i32, _>("version")?).unwrap_or(0),
                finished_at: row.try_get("updated_at")?,
            });
        }
        Ok(candidates)
    }

    /// Deletes `task`'s stream, archived and verified at `location` with `version` events,
    /// and marks its row archived there (`summary`: what statistics need of it) — all in one
    /// transaction, and only if the task is still finished at `version` and every follower
    /// of the global log has read the whole stream.
    pub async fn finish_archive(
        &self,
        task: TaskId,
        version: u32,
        location: &str,
        summary: &serde_json::Value,
    ) -> Result<ArchiveCommit> {
        let expected = i32::try_from(version)
            .map_err(|_| Error::InvalidInput(format!("version {version} is out of range")))?;
        let mut tx = self.pool().begin().await?;
        let still = self
            .statement(RECHECK_SQL)
            .bind(task.as_uuid())
            .bind(expected)
            .fetch_optional(&mut *tx)
            .await?;
        if still.is_none() {
            let archived: Option<bool> = self
                .scalar("SELECT archived_at IS NOT NULL FROM tasks WHERE id = $1")
                .bind(task.as_uuid())
                .fetch_optional(&mut *tx)
                .await?;
            return Ok(match archived {
                Some(true) => ArchiveCommit::AlreadyArchived,
                _ => ArchiveCommit::Changed,
            });
        }
        let behind: Option<String> = self
            .scalar(FOLLOWER_BEHIND_SQL)
            .bind(task.as_uuid())
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(follower) = behind {
            return Ok(ArchiveCommit::FollowerBehind { follower });
        }
        // The row keeps the task's input (from its first event, before it goes): a submit
        // repeating its idempotency key is still compared with it.
        self.statement(
            "UPDATE tasks SET archived_at = now(), archive_location = $2, \
                 archive_summary = $3::jsonb || jsonb_build_object('input', \
                     (SELECT payload -> 'input' FROM events WHERE stream_id = $1 AND stream_version = 1)) \
             WHERE id = $1",
        )
        .bind(task.as_uuid())
        .bind(location)
        .bind(summary)
        .execute(&mut *tx)
        .await?;
        let deleted = self
            .statement("DELETE FROM events WHERE stream_id = $1")
            .bind(task.as_uuid())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if deleted != u64::from(version) {
            // The stream is not whole here (it never should be): keep everything.
            tx.rollback().await?;
            return Err(Error::InvalidInput(format!(
                "task {task}'s stream holds {deleted} events, its row says {version}: not archived"
            )));
        }
        tx.commit().await?;
        Ok(ArchiveCommit::Archived { events: deleted })
    }

    /// Where `task`'s stream is archived, if it is (`None`: its stream is in `events`, or
    /// there is no such task).
    pub async fn archive_location(&self, task: TaskId) -> Result<Option<String>> {
        let location: Option<Option<String>> = self
            .on_pool(async |c| {
                self.scalar(
                    "SELECT archive_location FROM tasks WHERE id = $1 AND archived_at IS NOT NULL",
                )
                .bind(task.as_uuid())
                .fetch_optional(c)
                .await
            })
            .await?;
        Ok(location.flatten())
    }

    /// The summaries recorded when tasks of `channel` (`None`: all) were archived.
    pub async fn archive_summaries(
        &self,
        channel: Option<&ChannelId>,
    ) -> Result<Vec<serde_json::Value>> {
        let rows: Vec<Option<serde_json::Value>> = self
            .on_pool(async |c| {
                self.scalar(
                    "SELECT archive_summary FROM tasks WHERE archived_at IS NOT NULL \
                     AND ($1::text IS NULL OR channel_id = $1)",
                )
                .bind(channel.map(ChannelId::as_str))
                .fetch_all(c)
                .await
            })
            .await?;
        Ok(rows.into_iter().flatten().collect())
    }

    /// Puts an archived stream back into `events` exactly as it was stored, and marks the
    /// row unarchived, in one transaction. `events` must be the task's whole stream, the
    /// version its row records.
    pub async fn restore_stream(
        &self,
        task: TaskId,
        events: &[StoredEvent],
    ) -> Result<RestoreOutcome> {
        let whole = events.iter().enumerate().all(|(i, e)| {
            e.stream_id == task.as_uuid() && i64::from(e.stream_version) == i as i64 + 1
        });
        if !whole || events.is_empty() {
            return Err(Error::InvalidInput(format!(
                "the events given for task {task} are not its whole stream from version 1"
            )));
        }
        let mut tx = self.pool().begin().await?;
        let version: Option<i32> = self
            .scalar(
                "SELECT version FROM tasks WHERE id = $1 AND archived_at IS NOT NULL FOR UPDATE",
            )
            .bind(task.as_uuid())
            .fetch_optional(&mut *tx)
            .await?;
        let Some(version) = version else {
            return Ok(RestoreOutcome::NotArchived);
        };
        if i64::from(version) != events.len() as i64 {
            return Err(Error::InvalidInput(format!(
                "task {task}'s row is at version {version}, its archive holds {} events: not restored",
                events.len()
            )));
        }
        let column = |f: fn(&StoredEvent) -> String| events.iter().map(f).collect::<Vec<_>>();
        self.statement(
            "INSERT INTO events (global_position, tx_id, stream_id, stream_version, event_id, \
                                 event_type, schema_version, payload, metadata, recorded_at) \
             OVERRIDING SYSTEM VALUE \
             SELECT p, t::xid8, s, v, i, ty, sv, pa::jsonb, m::jsonb, r \
             FROM UNNEST($1::bigint[], $2::text[], $3::uuid[], $4::int[], $5::uuid[], $6::text[], \
                         $7::int2[], $8::text[], $9::text[], $10::timestamptz[]) \
                  AS e(p, t, s, v, i, ty, sv, pa, m, r)",
        )
        .bind(events.iter().map(|e| e.global_position).collect::<Vec<_>>())
        .bind(column(|e| e.tx_id.to_string()))
        .bind(events.iter().map(|e| e.stream_id).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.stream_version).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.event_id).collect::<Vec<_>>())
        .bind(column(|e| e.event_type.clone()))
        .bind(events.iter().map(|e| e.schema_version).collect::<Vec<_>>())
        .bind(column(|e| e.payload.get().to_owned()))
        .bind(column(|e| e.metadata.get().to_owned()))
        .bind(events.iter().map(|e| e.recorded_at).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
        self.statement(
            // Touched now: a retention policy does not take it straight back.
            "UPDATE tasks SET archived_at = NULL, archive_location = NULL, archive_summary = NULL, \
                 updated_at = now() \
             WHERE id = $1",
        )
        .bind(task.as_uuid())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(RestoreOutcome::Restored {
            events: events.len() as u64,
        })
    }
}
