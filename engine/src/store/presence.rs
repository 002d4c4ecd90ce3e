//! Worker presence (`workers`): which workflow versions live workers claim, and the tasks
//! no live worker claims — *stranded* tasks, left behind by a deploy that dropped their
//! version.

use std::time::Duration;

use serde::Serialize;
use sqlx::Row;

use super::PgStore;
use super::listing::{TaskSummary, summary};
use crate::error::Result;
use crate::workflow::{ProviderLimits, WorkflowVersion};

/// The stranded tasks `t`: those that still need a worker (anything not finished and not
/// waiting for a human — in review, or for a signal without a deadline — through the claim's index; and finished tasks still parked to follow
/// their provider jobs to their end, through `tasks_settling`) and that no live worker
/// claims, or that the workers that claimed them set aside (they could not read the
/// history, or their version's rules refused the upgrade) until one runs them.
macro_rules! stranded {
    () => {
        " FROM (SELECT * FROM tasks \
                 WHERE status NOT IN ('final_review', 'completed', 'failed', 'cancelled') \
                   AND NOT (parked AND next_run_at >= timestamptz '9999-12-31 00:00:00+00') \
                UNION ALL \
                SELECT * FROM tasks WHERE parked AND status IN ('failed', 'cancelled')) AS t \
          WHERE t.unreadable_since IS NOT NULL OR NOT EXISTS ( \
                SELECT 1 FROM workers w, unnest(w.workflows, w.versions) AS s(workflow, version) \
                 WHERE w.expires_at > now() AND s.workflow = t.workflow \
                   AND s.version = t.workflow_version) "
    };
}

const STRANDED_SQL: &str = concat!(
    "SELECT t.workflow, t.workflow_version, count(*) AS tasks",
    stranded!(),
    "GROUP BY t.workflow, t.workflow_version ORDER BY t.workflow, t.workflow_version"
);

const STRANDED_TASKS_SQL: &str = concat!(
    "SELECT t.id, t.workflow, t.workflow_version, t.channel_id, t.status, t.status_display, \
            t.attempt, t.version, t.lease_owner, t.next_run_at, t.last_error, \
            t.notion_page_id, t.created_at, t.updated_at",
    stranded!(),
    "ORDER BY t.created_at DESC, t.id LIMIT CASE WHEN $1 = 0 THEN NULL ELSE $1 END"
);

/// Stranded tasks of one workflow version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Stranded {
    pub workflow: String,
    pub version: u32,
    pub tasks: u64,
}

impl PgStore {
    /// Says that `worker_id` is alive, claims the versions `claims` and applies the
    /// provider limits `providers`, until `ttl` from now by the database's clock.
    pub async fn worker_beat(
        &self,
        worker_id: &str,
        claims: &[WorkflowVersion],
        providers: &[ProviderLimits],
        ttl: Duration,
    ) -> Result<()> {
        let (workflows, versions) = WorkflowVersion::columns(claims);
        let providers: serde_json::Map<String, serde_json::Value> = providers
            .iter()
            .map(|limits| {
                let applied = serde_json::json!({
                    "max_in_flight": limits.max_in_flight,
                    "rate": limits.rate,
                });
                (limits.key.to_string(), applied)
            })
            .collect();
        self.on_pool(async |c| {
            self.statement(
                "INSERT INTO workers (worker_id, workflows, versions, expires_at, providers) \
                 VALUES ($1, $2, $3, now() + make_interval(secs => $4), $5) \
                 ON CONFLICT (worker_id) DO UPDATE SET workflows = EXCLUDED.workflows, \
                   versions = EXCLUDED.versions, seen_at = now(), expires_at = EXCLUDED.expires_at, \
                   providers = EXCLUDED.providers, \
                   started_at = CASE WHEN workers.expires_at > now() THEN workers.started_at ELSE now() END",
            )
            .bind(worker_id)
            .bind(&workflows)
            .bind(&versions)
            .bind(ttl.as_secs_f64())
            .bind(serde_json::Value::Object(providers.clone()))
            .execute(c)
            .await
        })
        .await?;
        Ok(())
    }

    /// `worker_id` stopped: its versions no longer count as claimed.
    pub async fn worker_left(&self, worker_id: &str) -> Result<()> {
        self.on_pool(async |c| {
            self.statement("DELETE FROM workers WHERE worker_id = $1")
                .bind(worker_id)
                .execute(c)
                .await
        })
        .await?;
        Ok(())
    }

    /// The workflow versions that have stranded tasks, with how many.
    pub async fn stranded(&self) -> Result<Vec<Stranded>> {
        let rows = self
            .on_pool(async |c| self.statement(STRANDED_SQL).fetch_all(c).await)
            .await?;
        rows.iter()
            .map(|row| {
                Ok(Stranded {
                    workflow: row.try_get("workflow")?,
                    version: u32::try_from(row.try_get::<i32, _>("workflow_version")?).unwrap_or(1),
                    tasks: u64::try_from(row.try_get::<i64, _>("tasks")?).unwrap_or(0),
                })
            })
            .collect()
    }

    /// Stranded tasks, newest first (at most `limit`; 0: all).
    pub async fn stranded_tasks(&self, limit: u32) -> Result<Vec<TaskSummary>> {
        let rows = self
            .on_pool(async |c| {
                self.statement(STRANDED_TASKS_SQL)
                    .bind(i64::from(limit))
                    .fetch_all(c)
                    .await
            })
            .await?;
        rows.iter().map(summary).collect()
    }
}
