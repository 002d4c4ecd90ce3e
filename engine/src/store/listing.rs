//! Listing tasks from the derived `tasks` table (every listing can filter by channel).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Row;

use super::PgStore;
use crate::error::{Error, Result};
use crate::event::EventMetadata;
use crate::id::{ChannelId, TaskId};
use crate::status::TaskStatus;

/// One task, as the `tasks` table shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TaskSummary {
    pub id: TaskId,
    pub workflow: String,
    /// The workflow version the task was submitted for (1 for tasks from before versions).
    pub workflow_version: u32,
    pub channel_id: String,
    pub status: TaskStatus,
    /// The name the status is shown as (what the log recorded with it, else its default).
    pub status_display: String,
    pub attempt: u32,
    /// The stream's version.
    pub version: u32,
    pub lease_owner: Option<String>,
    pub next_run_at: Option<DateTime<Utc>>,
    /// The latest failure's message (truncated).
    pub last_error: Option<String>,
    pub notion_page_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Which tasks to list.
#[derive(Clone, Debug, Default)]
pub struct TaskFilter {
    pub status: Option<TaskStatus>,
    pub channel: Option<ChannelId>,
    /// At most this many, newest first (0: no limit).
    pub limit: u32,
}

impl PgStore {
    /// The task's status as the `tasks` row has it (`None`: no such task).
    /// The metadata `task_submitted` was stored with, read alone (for a history that
    /// cannot be read whole); `None` when the task has none, or it is not JSON metadata.
    pub async fn submitted_metadata(&self, task: TaskId) -> Result<Option<EventMetadata>> {
        let metadata: Option<String> = self
            .on_pool(async |c| {
                self.scalar(
                    "SELECT metadata::text FROM events WHERE stream_id = $1 AND stream_version = 1",
                )
                .bind(task.as_uuid())
                .fetch_optional(c)
                .await
            })
            .await?;
        Ok(metadata.and_then(|text| serde_json::from_str(&text).ok()))
    }

    pub async fn task_status(&self, task: TaskId) -> Result<Option<TaskStatus>> {
        let status: Option<String> = self
            .on_pool(async |c| {
                self.scalar("SELECT status FROM tasks WHERE id = $1")
                    .bind(task.as_uuid())
                    .fetch_optional(c)
                    .await
            })
            .await?;
        status
            .map(|s| {
                s.parse()
                    .map_err(|e| Error::InvalidInput(format!("tasks.status: {e}")))
            })
            .transpose()
    }

    /// Tasks matching `filter`, newest first.
    pub async fn list_tasks(&self, filter: &TaskFilter) -> Result<Vec<TaskSummary>> {
        let rows = self.on_pool(async |c| self.statement(
            "SELECT id, workflow, workflow_version, channel_id, status, status_display, attempt, version, lease_owner, next_run_at, \
                    last_error, notion_page_id, created_at, updated_at \
             FROM tasks \
             WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR channel_id = $2) \
             ORDER BY created_at DESC, id \
             LIMIT CASE WHEN $3 = 0 THEN NULL ELSE $3 END",
        )
        .bind(filter.status.map(TaskStatus::as_str))
        .bind(filter.channel.as_ref().map(ChannelId::as_str))
        .bind(i64::from(filter.limit))
        .fetch_all(c).await).await?;
        rows.iter().map(summary).collect()
    }
}

pub(super) fn summary(row: &sqlx::postgres::PgRow) -> Result<TaskSummary> {
    let status: TaskStatus = row
        .try_get::<String, _>("status")?
        .parse()
        .map_err(|e| Error::InvalidInput(format!("tasks.status: {e}")))?;
    let shown: Option<String> = row.try_get("status_display")?;
    Ok(TaskSummary {
        id: TaskId::from(row.try_get::<uuid::Uuid, _>("id")?),
        workflow: row.try_get("workflow")?,
        workflow_version: u32::try_from(row.try_get::<i32, _>("workflow_version")?).unwrap_or(1),
        channel_id: row.try_get("channel_id")?,
        status,
        status_display: shown.unwrap_or_else(|| status.default_display().into_owned()),
        attempt: u32::try_from(row.try_get::<i32, _>("attempt")?).unwrap_or(0),
        version: u32::try_from(row.try_get::<i32, _>("version")?).unwrap_or(0),
        lease_owner: row.try_get("lease_owner")?,
        next_run_at: row.try_get("next_run_at")?,
        last_error: row.try_get("last_error")?,
        notion_page_id: row.try_get("notion_page_id")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}
