//! Leases: which worker may append to a task right now.
//!
//! A claim bumps `lease_epoch`; every append of the claimant is fenced by that epoch, so a
//! worker that was paused past its lease cannot write after another worker took over.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::clock::Reading;
use super::{Fence, PgStore};
use crate::error::Result;
use crate::event::FIRST_SCHEMA_VERSION;
use crate::id::TaskId;
use crate::workflow::WorkflowVersion;

/// A worker's right to run a task, until `expires` unless extended. Only a claim makes one.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Lease {
    pub task: TaskId,
    pub worker_id: String,
    /// The fence every append of this lease carries.
    pub epoch: i64,
    /// The task attempt this claim started (1 = first run).
    pub attempt: u32,
    /// The stream version right after the claim's `task_claimed` event.
    pub version: u32,
    /// The task's workflow (what metrics count the run under).
    pub workflow: String,
}

impl Lease {
    /// The fence for appends under this lease.
    pub fn fence(&self) -> Fence {
        Fence::Lease { epoch: self.epoch }
    }
}

/// A claim and its `task_claimed` event in one statement (one round trip, one commit):
/// `$next` picks the task's id (locking its row); the claim bumps the lease epoch, takes
/// the lease, starts the attempt (a parked task resumes its own: waiting on provider jobs
/// uses none) and moves the stream's version past the event it inserts. The claim is the
/// fence: only this statement's row lock and epoch make the event's place.
///
/// The event is built here because its epoch and attempt are known only after the update;
/// `a_claim_is_stored_as_its_event_encodes` (tests/event_store.rs) holds it to the
/// encoding [`crate::Event::encode`] and [`crate::EventMetadata`] give. Parameters: `$1` worker id,
/// `$2` lease seconds, `$3` schema version, then the pick's own.
macro_rules! claim_sql {
    ($next:literal) => {
        concat!(
            "WITH next AS (",
            $next,
            r#"
), claimed AS (
    UPDATE tasks SET
        lease_epoch      = tasks.lease_epoch + 1,
        lease_owner      = $1,
        lease_expires_at = now() + make_interval(secs => $2),
        attempt          = tasks.attempt + CASE WHEN tasks.parked THEN 0 ELSE 1 END,
        -- A failed or cancelled task claimed to settle its open jobs stays parked and due
        -- until its run says they are settled: a run that dies or stops meanwhile leaves
        -- it for the next worker.
        parked           = tasks.parked AND tasks.status IN ('failed', 'cancelled'),
        next_run_at      = CASE WHEN tasks.status IN ('failed', 'cancelled')
                                THEN tasks.next_run_at END,
        version          = tasks.version + 1,
        updated_at       = now()
    FROM next
    WHERE tasks.id = next.id
    RETURNING tasks.id, tasks.lease_epoch, tasks.attempt, tasks.version, tasks.workflow
), recorded AS (
    INSERT INTO events (stream_id, stream_version, event_id, event_type, schema_version, payload, metadata)
    SELECT id, version, gen_random_uuid(), 'task_claimed', $3,
           jsonb_build_object('worker_id', $1::text, 'lease_epoch', lease_epoch, 'attempt', attempt),
           jsonb_build_object('correlation_id', id, 'worker_id', $1::text, 'attempt', attempt)
    FROM claimed
)
SELECT id, lease_epoch, attempt, version, workflow, clock_timestamp() AS db_now FROM claimed"#
        )
    };
}

/// Claims one task by id (`$4`) if it is runnable, due, and its lease is free, expired or
/// the worker's own.
const CLAIM_SQL: &str = claim_sql!(
    r#"
    SELECT id FROM tasks
    WHERE id = $4
      AND (status NOT IN ('final_review', 'completed', 'failed', 'cancelled')
           OR (parked AND status IN ('failed', 'cancelled')))
      AND (lease_owner IS NULL OR lease_expires_at < now() OR lease_owner = $1)
      AND (next_run_at IS NULL OR next_run_at <= now())
    FOR UPDATE
"#
);

/// The next due task whose lease is free, expired, or this worker's own from before a
/// restart (never one this process is running now, `$4`), of the workflow versions the
/// worker serves (names `$5`, versions `$6`, pairwise). SKIP LOCKED: concurrent claimers
/// never wait for each other and never take the same task.
///
/// Both lookups are index-backed (see the `tasks_workflow_version_due` and
/// `tasks_lease_owner` indexes), so a claim costs about the same with 10 or 200,000 queued
/// tasks, of its own workflow versions or of others: `own` reads this worker's few leases;
/// `due` runs only when `own` found nothing (a one-time filter) and walks each served
/// workflow version's
/// runnable tasks in due order, stopping at the first whose lease is free or expired;
/// `settle` does the same for failed or cancelled tasks with provider jobs to settle (an
/// index that holds only those), and the earlier of the two is claimed.
const CLAIM_NEXT_SQL: &str = claim_sql!(
    r#"
    WITH own AS (
        SELECT id FROM tasks
        WHERE lease_owner = $1
          AND (status NOT IN ('final_review', 'completed', 'failed', 'cancelled')
               OR (parked AND status IN ('failed', 'cancelled')))
          AND COALESCE(next_run_at, created_at) <= now()
          AND NOT (id = ANY($4))
          AND (workflow, workflow_version) IN (SELECT * FROM unnest($5::text[], $6::int[]))
        ORDER BY COALESCE(next_run_at, created_at)
        LIMIT 1
        FOR UPDATE SKIP LOCKED
    ), due AS (
        -- The first free due task of each served workflow version (an index walk each,
        -- in due order), then the earliest of those.
        SELECT candidate.id, candidate.due_at FROM (
            SELECT name, version FROM unnest($5::text[], $6::int[]) AS s(name, version)
            WHERE NOT EXISTS (SELECT 1 FROM own)
        ) AS w
        CROSS JOIN LATERAL (
            SELECT id, COALESCE(next_run_at, created_at) AS due_at FROM tasks
            WHERE workflow = w.name AND workflow_version = w.version
              AND status NOT IN ('final_review', 'completed', 'failed', 'cancelled')
              AND COALESCE(next_run_at, created_at) <= now()
              AND (lease_owner IS NULL OR lease_expires_at < now())
              AND NOT (id = ANY($4))
            ORDER BY COALESCE(next_run_at, created_at)
            LIMIT 1
            FOR UPDATE SKIP LOCKED
        ) AS candidate
        ORDER BY candidate.due_at
        LIMIT 1
    ), settle AS (
        -- A failed or cancelled task whose provider jobs were left open, due to have
        -- them polled to their end (through `tasks_settling`, empty but for those).
        SELECT candidate.id, candidate.due_at FROM (
            SELECT name, version FROM unnest($5::text[], $6::int[]) AS s(name, version)
            WHERE NOT EXISTS (SELECT 1 FROM own)
        ) AS w
        CROSS JOIN LATERAL (
            SELECT id, next_run_at AS due_at FROM tasks
            WHERE workflow = w.name AND workflow_version = w.version
              AND parked AND status IN ('failed', 'cancelled')
              AND next_run_at <= now()
              AND (lease_owner IS NULL OR lease_expires_at < now())
              AND NOT (id = ANY($4))
            ORDER BY next_run_at
            LIMIT 1
            FOR UPDATE SKIP LOCKED
        ) AS candidate
        ORDER BY candidate.due_at
        LIMIT 1
    )
    SELECT id FROM own
    UNION ALL
    (SELECT id FROM (SELECT id, due_at FROM due UNION ALL SELECT id, due_at FROM settle) AS c
     ORDER BY due_at LIMIT 1)
"#
);

impl PgStore {
    /// The lease a claim's row (id, epoch, attempt, version after `task_claimed`) grants;
    /// the row's `db_now` is a reading of the database's clock.
    fn lease_from(
        &self,
        row: &sqlx::postgres::PgRow,
        worker_id: &str,
        reading: Reading,
    ) -> Result<Lease> {
        let db_now: DateTime<Utc> = row.try_get("db_now")?;
        self.clock().observe(db_now, reading.sent, reading.sent_at);
        lease_from(row, worker_id)
    }
}

/// The lease a claim's row (id, epoch, attempt, version after `task_claimed`) grants.
fn lease_from(row: &sqlx::postgres::PgRow, worker_id: &str) -> Result<Lease> {
    Ok(Lease {
        task: TaskId::from(row.try_get::<uuid::Uuid, _>("id")?),
        worker_id: worker_id.to_owned(),
        epoch: row.try_get("lease_epoch")?,
        attempt: u32::try_from(row.try_get::<i32, _>("attempt")?).unwrap_or(0),
        version: u32::try_from(row.try_get::<i32, _>("version")?).unwrap_or(0),
        workflow: row.try_get("workflow")?,
    })
}

impl PgStore {
    /// Claims `task` for `worker_id` if it is runnable, due, and its lease is free, expired
    /// or already this worker's (a restarted worker reclaims its own leases at once).
    /// Appends `task_claimed` in the same statement. `None`: not claimable now.
    pub async fn claim_task(
        &self,
        task: TaskId,
        worker_id: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>> {
        let reading = Reading::start();
        let row = self
            .on_pool(async |c| {
                self.statement(CLAIM_SQL)
                    .bind(worker_id)
                    .bind(ttl.as_secs_f64())
                    .bind(FIRST_SCHEMA_VERSION)
                    .bind(task.as_uuid())
                    .fetch_optional(c)
                    .await
            })
            .await?;
        row.map(|row| self.lease_from(&row, worker_id, reading))
            .transpose()
    }

    /// Claims the next runnable task of one of the workflow versions `served` for
    /// `worker_id`, skipping the tasks in `running` (the ones this process runs now). Its
    /// own leases from before a restart come first. Appends `task_claimed` in the same
    /// statement. A task of a version not in `served` is never claimed.
    pub async fn claim_next(
        &self,
        worker_id: &str,
        ttl: Duration,
        running: &[TaskId],
        served: &[WorkflowVersion],
    ) -> Result<Option<Lease>> {
        let running: Vec<uuid::Uuid> = running.iter().map(TaskId::as_uuid).collect();
        let (workflows, versions) = WorkflowVersion::columns(served);
        let reading = Reading::start();
        let row = self
            .on_pool(async |c| {
                self.statement(CLAIM_NEXT_SQL)
                    .bind(worker_id)
                    .bind(ttl.as_secs_f64())
                    .bind(FIRST_SCHEMA_VERSION)
                    .bind(&running)
                    .bind(&workflows)
                    .bind(&versions)
                    .fetch_optional(c)
                    .await
            })
            .await?;
        row.map(|row| self.lease_from(&row, worker_id, reading))
            .transpose()
    }

    /// Tasks of the workflow versions `served` queued, running or scheduled for retry (not
    /// in review, not finished), or finished with provider jobs still to settle, other than
    /// those in `except` (the ones a worker has given up on).
    pub async fn unfinished_tasks(
        &self,
        served: &[WorkflowVersion],
        except: &[TaskId],
    ) -> Result<i64> {
        let except: Vec<uuid::Uuid> = except.iter().map(TaskId::as_uuid).collect();
        let (workflows, versions) = WorkflowVersion::columns(served);
        self.on_pool(async |c| {
            self.scalar(
                "SELECT count(*) FROM tasks \
             WHERE (status NOT IN ('final_review', 'completed', 'failed', 'cancelled') \
                    OR (parked AND status IN ('failed', 'cancelled'))) \
               AND (workflow, workflow_version) IN (SELECT * FROM unnest($1::text[], $3::int[])) \
               AND NOT (id = ANY($2)) \
               AND NOT (parked AND next_run_at >= timestamptz '9999-12-31 00:00:00+00')",
            )
            .bind(&workflows)
            .bind(&except)
            .bind(&versions)
            .fetch_one(c)
            .await
        })
        .await
    }

    /// Until when a worker holds the task's lease (`None`: nobody does, or it expired).
    pub async fn lease_held_until(&self, task: TaskId) -> Result<Option<DateTime<Utc>>> {
        const HELD_SQL: &str = "SELECT lease_expires_at FROM tasks \
             WHERE id = $1 AND lease_owner IS NOT NULL AND lease_expires_at > now()";
        Ok(self
            .on_pool(async |c| {
                self.scalar::<Option<DateTime<Utc>>>(HELD_SQL)
                    .bind(task.as_uuid())
                    .fetch_optional(c)
                    .await
            })
            .await?
            .flatten())
    }

    /// Makes a parked task due now (nobody holds its lease).
    pub async fn wake_parked(&self, task: TaskId) -> Result<()> {
        const WAKE_SQL: &str = "UPDATE tasks SET next_run_at = now() \
             WHERE id = $1 AND parked AND lease_owner IS NULL AND next_run_at > now()";
        self.on_pool(async |c| {
            self.statement(WAKE_SQL)
                .bind(task.as_uuid())
                .execute(c)
                .await
        })
        .await?;
        Ok(())
    }

    /// A settling task's run found no job left open: it is no longer parked, and its lease
    /// goes. False when the lease was lost.
    pub async fn settled(&self, lease: &Lease) -> Result<bool> {
        const SETTLED_SQL: &str = "UPDATE tasks SET parked = false, next_run_at = NULL, \
                    lease_owner = NULL, lease_expires_at = NULL \
             WHERE id = $1 AND lease_epoch = $2 AND lease_owner = $3";
        let done = self
            .on_pool(async |c| {
                self.statement(SETTLED_SQL)
                    .bind(lease.task.as_uuid())
                    .bind(lease.epoch)
                    .bind(&lease.worker_id)
                    .execute(c)
                    .await
            })
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Extends the lease by `ttl` from now; false when it was lost (another claim since).
    pub async fn extend_lease(&self, lease: &Lease, ttl: Duration) -> Result<bool> {
        let extended = self
            .on_pool(async |c| {
                self.statement(
                    "UPDATE tasks SET lease_expires_at = now() + make_interval(secs => $3) \
             WHERE id = $1 AND lease_epoch = $2 AND lease_owner = $4",
                )
                .bind(lease.task.as_uuid())
                .bind(lease.epoch)
                .bind(ttl.as_secs_f64())
                .bind(&lease.worker_id)
                .execute(c)
                .await
            })
            .await?;
        Ok(extended.rows_affected() == 1)
    }

    /// Releases a task whose history this build cannot read, and sets it aside: no worker
    /// claims it before the returned time, a wait as long as it has been unreadable (30 s
    /// to 1 h), so old workers in a rolling upgrade touch it ever more rarely while a newer
    /// worker can run it when due. `why`, when given, becomes the task's last error (what
    /// `reel tasks` shows). A task set aside counts as stranded until a worker runs it (see
    /// [`PgStore::stranded`]). `None`: the lease was already lost.
    pub async fn set_aside(
        &self,
        lease: &Lease,
        why: Option<&str>,
    ) -> Result<Option<DateTime<Utc>>> {
        Ok(self
            .on_pool(async |c| {
                self.scalar(
                    "UPDATE tasks SET lease_owner = NULL, lease_expires_at = NULL, \
                    unreadable_since = COALESCE(unreadable_since, now()), \
                    last_error = COALESCE($4, last_error), \
                    next_run_at = now() + LEAST(interval '1 hour', GREATEST(interval '30 seconds', \
                                  now() - COALESCE(unreadable_since, now()))) \
             WHERE id = $1 AND lease_epoch = $2 AND lease_owner = $3 \
             RETURNING next_run_at",
                )
                .bind(lease.task.as_uuid())
                .bind(lease.epoch)
                .bind(&lease.worker_id)
                .bind(why.map(|w| crate::id::truncate_for_display(w, 500)))
                .fetch_optional(c)
                .await
            })
            .await?
            .flatten())
    }

    /// Gives the lease up so another worker can claim the task at once; false when it was
    /// already released or lost.
    pub async fn release_lease(&self, lease: &Lease) -> Result<bool> {
        let released = self
            .on_pool(async |c| {
                self.statement(
                    "UPDATE tasks SET lease_owner = NULL, lease_expires_at = NULL, updated_at = now() \
             WHERE id = $1 AND lease_epoch = $2 AND lease_owner = $3",
                )
                .bind(lease.task.as_uuid())
                .bind(lease.epoch)
                .bind(&lease.worker_id)
                .execute(c)
                .await
            })
            .await?;
        Ok(released.rows_affected() == 1)
    }
}
