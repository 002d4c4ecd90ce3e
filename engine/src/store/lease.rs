//! Leases: which worker may append to a task right now.
//!
//! A claim bumps `lease_epoch`; every append of the claimant is fenced by that epoch, so a
//! worker that was paused past its lease cannot write after another worker took over.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::{Fence, PgStore};
use crate::error::Result;
use crate::event::{Event, EventMetadata, NewEvent};
use crate::id::TaskId;

/// A worker's right to run a task, until `expires` unless extended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub task: TaskId,
    pub worker_id: String,
    /// The fence every append of this lease carries.
    pub epoch: i64,
    /// The task attempt this claim started (1 = first run).
    pub attempt: u32,
    /// The stream version right after the claim's `task_claimed` event.
    pub version: u32,
}

impl Lease {
    /// The fence for appends under this lease.
    pub fn fence(&self) -> Fence {
        Fence::Lease { epoch: self.epoch }
    }
}

const CLAIM_SQL: &str = r#"
UPDATE tasks SET
    lease_epoch      = lease_epoch + 1,
    lease_owner      = $2,
    lease_expires_at = now() + make_interval(secs => $3),
    -- A parked task resumes its attempt: waiting on provider jobs uses none.
    attempt          = attempt + CASE WHEN parked THEN 0 ELSE 1 END,
    parked           = false,
    updated_at       = now()
WHERE id = $1
  AND status NOT IN ('final_review', 'completed', 'failed', 'cancelled')
  AND (lease_owner IS NULL OR lease_expires_at < now() OR lease_owner = $2)
  AND (next_run_at IS NULL OR next_run_at <= now())
RETURNING lease_epoch, attempt, version
"#;

/// The next due task whose lease is free, expired, or this worker's own from before a
/// restart (never one this process is running now). SKIP LOCKED: concurrent claimers
/// never wait for each other and never take the same task.
///
/// Both lookups are index-backed (see the `tasks_workflow_due` and `tasks_lease_owner`
/// indexes), so a claim costs about the same with 10 or 200,000 queued tasks, of its own
/// workflows or of others: `own` reads this worker's few leases; `due` runs only when
/// `own` found nothing (a one-time filter) and walks each of the worker's workflows'
/// runnable tasks in due order, stopping at the first whose lease is free or expired.
const CLAIM_NEXT_SQL: &str = r#"
WITH own AS (
    SELECT id FROM tasks
    WHERE lease_owner = $1
      AND status NOT IN ('final_review', 'completed', 'failed', 'cancelled')
      AND COALESCE(next_run_at, created_at) <= now()
      AND NOT (id = ANY($3))
      AND workflow = ANY($4)
    ORDER BY COALESCE(next_run_at, created_at)
    LIMIT 1
    FOR UPDATE SKIP LOCKED
), due AS (
    -- The first free due task of each of the worker's workflows (an index walk each, in
    -- due order), then the earliest of those.
    SELECT candidate.id FROM (
        SELECT name FROM unnest($4::text[]) AS name WHERE NOT EXISTS (SELECT 1 FROM own)
    ) AS w
    CROSS JOIN LATERAL (
        SELECT id, COALESCE(next_run_at, created_at) AS due_at FROM tasks
        WHERE workflow = w.name
          AND status NOT IN ('final_review', 'completed', 'failed', 'cancelled')
          AND COALESCE(next_run_at, created_at) <= now()
          AND (lease_owner IS NULL OR lease_expires_at < now())
          AND NOT (id = ANY($3))
        ORDER BY COALESCE(next_run_at, created_at)
        LIMIT 1
        FOR UPDATE SKIP LOCKED
    ) AS candidate
    ORDER BY candidate.due_at
    LIMIT 1
), next AS (
    SELECT id FROM own UNION ALL SELECT id FROM due
)
UPDATE tasks SET
    lease_epoch      = tasks.lease_epoch + 1,
    lease_owner      = $1,
    lease_expires_at = now() + make_interval(secs => $2),
    attempt          = tasks.attempt + CASE WHEN tasks.parked THEN 0 ELSE 1 END,
    parked           = false,
    updated_at       = now()
FROM next
WHERE tasks.id = next.id
RETURNING tasks.id, tasks.lease_epoch, tasks.attempt, tasks.version
"#;

impl PgStore {
    /// Claims `task` for `worker_id` if it is runnable, due, and its lease is free, expired
    /// or already this worker's (a restarted worker reclaims its own leases at once).
    /// Appends `task_claimed` in the same transaction. `None`: not claimable now.
    pub async fn claim_task(
        &self,
        task: TaskId,
        worker_id: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>> {
        let mut tx = self.pool().begin().await?;
        let row = sqlx::query(CLAIM_SQL)
            .bind(task.as_uuid())
            .bind(worker_id)
            .bind(ttl.as_secs_f64())
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let lease = self.record_claim(&mut tx, task, worker_id, &row).await?;
        tx.commit().await?;
        Ok(Some(lease))
    }

    /// Claims the next runnable task of one of `workflows` for `worker_id`, skipping the
    /// tasks in `running` (the ones this process runs now). Its own leases from before a
    /// restart come first.
    pub async fn claim_next(
        &self,
        worker_id: &str,
        ttl: Duration,
        running: &[TaskId],
        workflows: &[String],
    ) -> Result<Option<Lease>> {
        let running: Vec<uuid::Uuid> = running.iter().map(TaskId::as_uuid).collect();
        let mut tx = self.pool().begin().await?;
        let row = sqlx::query(CLAIM_NEXT_SQL)
            .bind(worker_id)
            .bind(ttl.as_secs_f64())
            .bind(&running)
            .bind(workflows)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let task = TaskId::from(row.try_get::<uuid::Uuid, _>("id")?);
        let lease = self.record_claim(&mut tx, task, worker_id, &row).await?;
        tx.commit().await?;
        Ok(Some(lease))
    }

    /// Appends `task_claimed` for a claim `row` (epoch, attempt, version) in the claim's
    /// transaction, fenced by the new epoch.
    async fn record_claim(
        &self,
        tx: &mut sqlx::PgConnection,
        task: TaskId,
        worker_id: &str,
        row: &sqlx::postgres::PgRow,
    ) -> Result<Lease> {
        let epoch: i64 = row.try_get("lease_epoch")?;
        let attempt = u32::try_from(row.try_get::<i32, _>("attempt")?).unwrap_or(0);
        let version = u32::try_from(row.try_get::<i32, _>("version")?).unwrap_or(0);
        let claimed = NewEvent::new(Event::TaskClaimed {
            worker_id: worker_id.to_owned(),
            lease_epoch: epoch,
            attempt,
        })
        .with_metadata(EventMetadata {
            correlation_id: Some(task.as_uuid()),
            worker_id: Some(worker_id.to_owned()),
            attempt: Some(attempt),
            ..EventMetadata::default()
        });
        let appended = self
            .append_in(tx, task, version, Fence::Lease { epoch }, &[claimed])
            .await?;
        Ok(Lease {
            task,
            worker_id: worker_id.to_owned(),
            epoch,
            attempt,
            version: appended.version,
        })
    }

    /// Tasks of `workflows` queued, running or scheduled for retry (not in review, not
    /// finished), other than those in `except` (the ones a worker has given up on).
    pub async fn unfinished_tasks(&self, workflows: &[String], except: &[TaskId]) -> Result<i64> {
        let except: Vec<uuid::Uuid> = except.iter().map(TaskId::as_uuid).collect();
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM tasks \
             WHERE status NOT IN ('final_review', 'completed', 'failed', 'cancelled') \
               AND workflow = ANY($1) AND NOT (id = ANY($2))",
        )
        .bind(workflows)
        .bind(&except)
        .fetch_one(self.pool())
        .await?)
    }

    /// Extends the lease by `ttl` from now; false when it was lost (another claim since).
    pub async fn extend_lease(&self, lease: &Lease, ttl: Duration) -> Result<bool> {
        let extended = sqlx::query(
            "UPDATE tasks SET lease_expires_at = now() + make_interval(secs => $3) \
             WHERE id = $1 AND lease_epoch = $2 AND lease_owner = $4",
        )
        .bind(lease.task.as_uuid())
        .bind(lease.epoch)
        .bind(ttl.as_secs_f64())
        .bind(&lease.worker_id)
        .execute(self.pool())
        .await?;
        Ok(extended.rows_affected() == 1)
    }

    /// Releases a task whose history this build cannot read, and sets it aside: no worker
    /// claims it before the returned time, a wait as long as it has been unreadable (30 s
    /// to 1 h), so old workers in a rolling upgrade touch it ever more rarely while a newer
    /// worker can run it when due. `None`: the lease was already lost.
    pub async fn set_aside(&self, lease: &Lease) -> Result<Option<DateTime<Utc>>> {
        Ok(sqlx::query_scalar(
            "UPDATE tasks SET lease_owner = NULL, lease_expires_at = NULL, \
                    unreadable_since = COALESCE(unreadable_since, now()), \
                    next_run_at = now() + LEAST(interval '1 hour', GREATEST(interval '30 seconds', \
                                  now() - COALESCE(unreadable_since, now()))) \
             WHERE id = $1 AND lease_epoch = $2 AND lease_owner = $3 \
             RETURNING next_run_at",
        )
        .bind(lease.task.as_uuid())
        .bind(lease.epoch)
        .bind(&lease.worker_id)
        .fetch_optional(self.pool())
        .await?
        .flatten())
    }

    /// Gives the lease up so another worker can claim the task at once; false when it was
    /// already released or lost.
    pub async fn release_lease(&self, lease: &Lease) -> Result<bool> {
        let released = sqlx::query(
            "UPDATE tasks SET lease_owner = NULL, lease_expires_at = NULL \
             WHERE id = $1 AND lease_epoch = $2 AND lease_owner = $3",
        )
        .bind(lease.task.as_uuid())
        .bind(lease.epoch)
        .bind(&lease.worker_id)
        .execute(self.pool())
        .await?;
        Ok(released.rows_affected() == 1)
    }
}
