//! Jobs a provider accepted that no log could take: their worker had lost the task's lease
//! (see `migrations/*_orphan_jobs.sql`). The task's next run adopts them.

use serde_json::Value;
use sqlx::Row;

use super::PgStore;
use crate::error::Result;
use crate::id::TaskId;

/// A job accepted for `item` of `step`, not in the log.
#[derive(Clone, Debug, PartialEq)]
pub struct OrphanJob {
    pub step: String,
    pub item: u32,
    /// The submission number it was sent under (its idempotency key's).
    pub submission: u32,
    /// What the provider returned: what polling it needs.
    pub job: Value,
}

impl PgStore {
    /// Keeps `job` for the task's next run to adopt (a repeat is a no-op).
    pub async fn keep_orphan_job(&self, task: TaskId, job: &OrphanJob, worker: &str) -> Result<()> {
        const KEEP_SQL: &str = "INSERT INTO orphan_jobs (task_id, step, item, submission, job, worker) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING";
        self.on_pool(async |c| {
            self.statement(KEEP_SQL)
                .bind(task.as_uuid())
                .bind(&job.step)
                .bind(i32::try_from(job.item).unwrap_or(i32::MAX))
                .bind(i32::try_from(job.submission).unwrap_or(i32::MAX))
                .bind(&job.job)
                .bind(worker)
                .execute(c)
                .await
        })
        .await?;
        Ok(())
    }

    /// The task's orphan jobs of `step`, oldest first.
    pub async fn orphan_jobs(&self, task: TaskId, step: &str) -> Result<Vec<OrphanJob>> {
        const LIST_SQL: &str = "SELECT step, item, submission, job FROM orphan_jobs \
             WHERE task_id = $1 AND step = $2 ORDER BY found_at, item";
        let rows = self
            .on_pool(async |c| {
                self.statement(LIST_SQL)
                    .bind(task.as_uuid())
                    .bind(step)
                    .fetch_all(c)
                    .await
            })
            .await?;
        rows.iter()
            .map(|row| {
                Ok(OrphanJob {
                    step: row.try_get("step")?,
                    item: u32::try_from(row.try_get::<i32, _>("item")?).unwrap_or(0),
                    submission: u32::try_from(row.try_get::<i32, _>("submission")?).unwrap_or(0),
                    job: row.try_get("job")?,
                })
            })
            .collect()
    }

    /// Forgets an orphan job (it is in the log now, or accounted for).
    pub async fn forget_orphan_job(&self, task: TaskId, job: &OrphanJob) -> Result<()> {
        const FORGET_SQL: &str = "DELETE FROM orphan_jobs \
             WHERE task_id = $1 AND step = $2 AND item = $3 AND submission = $4";
        self.on_pool(async |c| {
            self.statement(FORGET_SQL)
                .bind(task.as_uuid())
                .bind(&job.step)
                .bind(i32::try_from(job.item).unwrap_or(i32::MAX))
                .bind(i32::try_from(job.submission).unwrap_or(i32::MAX))
                .execute(c)
                .await
        })
        .await?;
        Ok(())
    }
}
