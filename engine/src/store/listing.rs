//! Listing tasks from the derived `tasks` table (every listing can filter by channel).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Row;

use super::PgStore;
use crate::error::{Error, Result};
use crate::event::EventMetadata;
use crate::id::{ChannelId, TaskId};
use crate::state::StepProgress;
use crate::status::TaskStatus;

/// The most tasks [`PgStore::with_progress`] reads the streams of.
pub const PROGRESS_MAX_TASKS: usize = 500;

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
    /// When its stream moved to an archive (`reel archive`), if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archived_at: Option<DateTime<Utc>>,
    /// How far its running step is, when [`PgStore::with_progress`] read it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<StepProgress>,
}

/// Which tasks to list.
#[derive(Clone, Debug, Default)]
pub struct TaskFilter {
    pub status: Option<TaskStatus>,
    pub channel: Option<ChannelId>,
    /// At most this many, newest first (0: no limit).
    pub limit: u32,
    /// Only tasks of this workflow.
    pub workflow: Option<String>,
    /// Only tasks in one of these channels (empty: any). A console limited to some
    /// channels sets it; `channel` narrows further.
    pub channels: Vec<ChannelId>,
    /// Only tasks whose id, workflow, channel, shown status or last error contains this
    /// text (case-insensitive).
    pub text: Option<String>,
    /// Keyset pagination: only tasks older than this one, in list order (newest first).
    pub after: Option<TaskCursor>,
}

/// A position in the task list (newest first): a task's creation time and id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskCursor {
    pub created_at: DateTime<Utc>,
    pub id: TaskId,
}

impl TaskCursor {
    /// The position of `task` in the list.
    pub fn of(task: &TaskSummary) -> TaskCursor {
        TaskCursor {
            created_at: task.created_at,
            id: task.id,
        }
    }

    /// `MICROS.ID` (what [`TaskCursor::parse`] reads): fits a URL as it is.
    pub fn encode(&self) -> String {
        format!("{}.{}", self.created_at.timestamp_micros(), self.id)
    }

    /// Reads [`TaskCursor::encode`]'s form.
    pub fn parse(text: &str) -> Result<TaskCursor> {
        let bad = || Error::InvalidInput(format!("invalid task cursor {:?}", truncate(text)));
        let (micros, id) = text.split_once('.').ok_or_else(bad)?;
        let micros: i64 = micros.parse().map_err(|_| bad())?;
        // Within what PostgreSQL stores (and any task's creation time): 1970 to 9999.
        const LAST: i64 = 253_402_300_799_999_999;
        if !(0..=LAST).contains(&micros) {
            return Err(bad());
        }
        Ok(TaskCursor {
            created_at: DateTime::from_timestamp_micros(micros).ok_or_else(bad)?,
            id: id.parse().map_err(|_| bad())?,
        })
    }
}

fn truncate(text: &str) -> String {
    crate::id::truncate_for_display(text, 60)
}

/// The filter's conditions on `tasks` (every one but the status), as SQL over parameters
/// $1 (channel), $2 (workflow), $3 (channels), $4 (text): shared by the list and the counts.
macro_rules! filtered {
    () => {
        "($1::text IS NULL OR channel_id = $1) \
         AND ($2::text IS NULL OR workflow = $2) \
         AND (cardinality($3::text[]) = 0 OR channel_id = ANY($3)) \
         AND ($4::text IS NULL OR strpos(lower(id::text || ' ' || workflow || ' ' || channel_id \
              || ' ' || COALESCE(status_display, status) || ' ' || COALESCE(last_error, '')), \
              lower($4)) > 0)"
    };
}

/// The list: $5 status, $6/$7 the cursor (created_at, id), $8 the limit (0: none).
const LIST_SQL: &str = concat!(
    "SELECT id, workflow, workflow_version, channel_id, status, status_display, attempt, \
            version, lease_owner, next_run_at, last_error, notion_page_id, created_at, updated_at, \
            archived_at \
     FROM tasks WHERE ",
    filtered!(),
    " AND ($5::text IS NULL OR status = $5) \
      AND ($6::timestamptz IS NULL OR (created_at, id) < ($6, $7::uuid)) \
     ORDER BY created_at DESC, id DESC \
     LIMIT CASE WHEN $8 = 0 THEN NULL ELSE $8 END"
);

const COUNT_SQL: &str = concat!(
    "SELECT status, count(*) FROM tasks WHERE ",
    filtered!(),
    " GROUP BY status ORDER BY status"
);

impl PgStore {
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

    /// The channels that have tasks, in order (a skip scan of `tasks_channel_status`: one
    /// index probe per channel, however many tasks).
    pub async fn channels(&self) -> Result<Vec<ChannelId>> {
        let names: Vec<String> = self
            .on_pool(async |c| {
                self.scalar(
                    "WITH RECURSIVE c AS ( \
                         (SELECT channel_id FROM tasks ORDER BY channel_id LIMIT 1) \
                         UNION ALL \
                         SELECT (SELECT t.channel_id FROM tasks t WHERE t.channel_id > c.channel_id \
                                  ORDER BY t.channel_id LIMIT 1) \
                         FROM c WHERE c.channel_id IS NOT NULL) \
                     SELECT channel_id FROM c WHERE channel_id IS NOT NULL",
                )
                .fetch_all(c)
                .await
            })
            .await?;
        // A row written by hand with a name outside the rules is left out, not fatal.
        Ok(names
            .iter()
            .filter_map(|name| match ChannelId::parse(name) {
                Ok(channel) => Some(channel),
                Err(err) => {
                    tracing::warn!(error = %err, "a task row's channel id is not valid: left out");
                    None
                }
            })
            .collect())
    }

    /// Fills in the progress of the tasks that are in a step ("Generating Video 12/18"),
    /// read from their streams in one query and folded (archived tasks, tasks between
    /// steps, a task whose history this build cannot read, and tasks past the first
    /// [`PROGRESS_MAX_TASKS`] in a step have none).
    pub async fn with_progress(&self, tasks: &mut [TaskSummary]) -> Result<()> {
        let running: Vec<TaskId> = tasks
            .iter()
            .filter(|t| t.status.is_step_status() && t.archived_at.is_none())
            .map(|t| t.id)
            .take(PROGRESS_MAX_TASKS)
            .collect();
        if running.is_empty() {
            return Ok(());
        }
        let mut streams: std::collections::HashMap<TaskId, Vec<crate::event::RecordedEvent>> =
            std::collections::HashMap::new();
        match self.read_streams(&running).await {
            Ok(events) => {
                for event in events {
                    streams.entry(event.stream_id).or_default().push(event);
                }
            }
            // An event this build cannot read (a newer build's, a corrupt one): the tasks
            // that read are shown with their progress, the others without.
            Err(Error::Decode { .. }) => {
                for task in &running {
                    match self.read_stream(*task, 1).await {
                        Ok(events) => {
                            streams.insert(*task, events);
                        }
                        Err(Error::Decode { .. }) => {}
                        Err(other) => return Err(other),
                    }
                }
            }
            Err(other) => return Err(other),
        }
        for task in tasks.iter_mut() {
            if let Some(events) = streams.get(&task.id) {
                task.progress = crate::state::fold(events).progress();
            }
        }
        Ok(())
    }

    /// The task's status as the `tasks` row has it (`None`: no such task).
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

    /// Tasks matching `filter`, newest first (ties: by id, descending).
    pub async fn list_tasks(&self, filter: &TaskFilter) -> Result<Vec<TaskSummary>> {
        let channels: Vec<&str> = filter.channels.iter().map(ChannelId::as_str).collect();
        let text = filter.text.as_deref().filter(|t| !t.trim().is_empty());
        let rows = self
            .on_pool(async |c| {
                self.statement(LIST_SQL)
                    .bind(filter.channel.as_ref().map(ChannelId::as_str))
                    .bind(filter.workflow.as_deref())
                    .bind(&channels)
                    .bind(text)
                    .bind(filter.status.map(TaskStatus::as_str))
                    .bind(filter.after.map(|a| a.created_at))
                    .bind(filter.after.map(|a| a.id.as_uuid()))
                    .bind(i64::from(filter.limit))
                    .fetch_all(c)
                    .await
            })
            .await?;
        rows.iter().map(summary).collect()
    }

    /// The rows of `tasks` (those that exist), in no particular order.
    pub async fn tasks_by_id(&self, tasks: &[TaskId]) -> Result<Vec<TaskSummary>> {
        let ids: Vec<uuid::Uuid> = tasks.iter().map(|t| t.as_uuid()).collect();
        let rows = self
            .on_pool(async |c| {
                self.statement(
                    "SELECT id, workflow, workflow_version, channel_id, status, status_display, \
                            attempt, version, lease_owner, next_run_at, last_error, \
                            notion_page_id, created_at, updated_at, archived_at \
                     FROM tasks WHERE id = ANY($1)",
                )
                .bind(&ids)
                .fetch_all(c)
                .await
            })
            .await?;
        rows.iter().map(summary).collect()
    }

    /// How many tasks `filter` matches per status (its status, cursor and limit aside).
    pub async fn count_tasks_by_status(
        &self,
        filter: &TaskFilter,
    ) -> Result<Vec<(TaskStatus, i64)>> {
        let channels: Vec<&str> = filter.channels.iter().map(ChannelId::as_str).collect();
        let text = filter.text.as_deref().filter(|t| !t.trim().is_empty());
        let rows: Vec<(String, i64)> = self
            .on_pool(async |c| {
                self.rows_as(COUNT_SQL)
                    .bind(filter.channel.as_ref().map(ChannelId::as_str))
                    .bind(filter.workflow.as_deref())
                    .bind(&channels)
                    .bind(text)
                    .fetch_all(c)
                    .await
            })
            .await?;
        rows.into_iter()
            .map(|(status, n)| {
                let status = status
                    .parse()
                    .map_err(|e| Error::InvalidInput(format!("tasks.status: {e}")))?;
                Ok((status, n))
            })
            .collect()
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
        // Selected by the listings that show it; absent elsewhere.
        archived_at: row.try_get("archived_at").ok().flatten(),
        progress: None,
    })
}
