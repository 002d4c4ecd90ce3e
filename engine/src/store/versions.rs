//! Workflow versions and their shapes (`workflow_versions`): each worker records, at start,
//! the shape of every workflow version it serves. The first shape recorded for a version is
//! that version's; a build whose shape differs under the same version changed the
//! workflow without saying so (a step renamed, added or removed, a kind changed), and its
//! tasks in flight would meet steps they were not written for.

use std::fmt;

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::{Appended, Fence, PgStore};
use crate::error::{Error, Result};
use crate::event::{Event, NewEvent};
use crate::id::TaskId;
use crate::workflow::Registry;

/// A workflow version whose shape here differs from the one first recorded for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShapeChange {
    pub workflow: String,
    pub version: u32,
    /// The shape first recorded for the version, one line per step (and the review gate
    /// and input type), and by whom and when.
    pub recorded: String,
    pub recorded_by: String,
    pub recorded_at: DateTime<Utc>,
    /// The shape this build has.
    pub here: String,
}

impl ShapeChange {
    /// What changed, line by line: `-` recorded only, `+` here only.
    pub fn changes(&self) -> Vec<String> {
        let recorded: Vec<&str> = self.recorded.lines().collect();
        let here: Vec<&str> = self.here.lines().collect();
        let mut changes: Vec<String> = recorded
            .iter()
            .filter(|line| !here.contains(line))
            .map(|line| format!("-{line}"))
            .collect();
        changes.extend(
            here.iter()
                .filter(|line| !recorded.contains(line))
                .map(|line| format!("+{line}")),
        );
        if changes.is_empty() {
            // The same lines in another order: the steps were reordered.
            changes.push(format!("steps reordered: {}", here.join(", ")));
        }
        changes
    }
}

impl fmt::Display for ShapeChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "workflow {:?} version {} has another shape than the one {} recorded for it at {} \
             ({}): raise the workflow's version (Workflow::version) when its steps change",
            self.workflow,
            self.version,
            self.recorded_by,
            self.recorded_at.format("%Y-%m-%d %H:%M:%S UTC"),
            self.changes().join("; ")
        )
    }
}

/// Separate statements: a row another worker inserted at the same moment is not in the
/// snapshot of a statement whose own insert waited for it (and then did nothing). The
/// first shape of a version is the one whose row holds its `first` mark (a unique index):
/// of two workers recording different shapes at once, the second waits for the first's
/// mark, inserts unmarked, and finds the first's shape.
/// The mark goes only to a version's first row: a row an older build wrote (unmarked, it
/// knew no marks) still comes first by its time.
const RECORD_FIRST_SQL: &str = "\
INSERT INTO workflow_versions (workflow, version, fingerprint, shape, first_seen_by, first)
SELECT $1, $2, $3, $4, $5, true
 WHERE NOT EXISTS (SELECT 1 FROM workflow_versions WHERE workflow = $1 AND version = $2)
ON CONFLICT DO NOTHING";

const RECORD_SQL: &str = "\
INSERT INTO workflow_versions (workflow, version, fingerprint, shape, first_seen_by)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT DO NOTHING";

const FIRST_SQL: &str = "\
SELECT fingerprint, shape, first_seen_at, first_seen_by FROM workflow_versions
 WHERE workflow = $1 AND version = $2
 ORDER BY first DESC, first_seen_at, fingerprint
 LIMIT 1";

impl PgStore {
    /// Records the shape of every workflow version in `registry` as seen by `worker_id`
    /// (once per distinct shape), and returns the versions whose shape differs from the one
    /// first recorded for them.
    pub async fn record_workflow_versions(
        &self,
        registry: &Registry,
        worker_id: &str,
    ) -> Result<Vec<ShapeChange>> {
        let mut changes = Vec::new();
        for workflow in registry.versions() {
            let (shape, fingerprint) = (workflow.shape(), workflow.fingerprint());
            let version = i32::try_from(workflow.version_number()).unwrap_or(i32::MAX);
            for sql in [RECORD_FIRST_SQL, RECORD_SQL] {
                let inserted = self
                    .on_pool(async |c| {
                        self.statement(sql)
                            .bind(workflow.name())
                            .bind(version)
                            .bind(&fingerprint)
                            .bind(&shape)
                            .bind(worker_id)
                            .execute(c)
                            .await
                    })
                    .await?;
                if inserted.rows_affected() == 1 {
                    break;
                }
            }
            let first = self
                .on_pool(async |c| {
                    self.statement(FIRST_SQL)
                        .bind(workflow.name())
                        .bind(version)
                        .fetch_one(c)
                        .await
                })
                .await?;
            if first.try_get::<String, _>("fingerprint")? != fingerprint {
                changes.push(ShapeChange {
                    workflow: workflow.name().to_owned(),
                    version: workflow.version_number(),
                    recorded: first.try_get("shape")?,
                    recorded_by: first.try_get("first_seen_by")?,
                    recorded_at: first.try_get("first_seen_at")?,
                    here: shape,
                });
            }
        }
        Ok(changes)
    }
}

/// Moves a task's rows of renamed steps ($2 old names, $3 new ones) to the new names.
const RENAME_STEP_SQL: [&str; 2] = [
    "UPDATE provider_slots t SET step = r.new FROM unnest($2::text[], $3::text[]) AS r(old, new) \
      WHERE t.task_id = $1 AND t.step = r.old",
    "UPDATE orphan_jobs t SET step = r.new FROM unnest($2::text[], $3::text[]) AS r(old, new) \
      WHERE t.task_id = $1 AND t.step = r.old",
];

impl PgStore {
    /// The shape first recorded for `version` of `workflow`, if a worker ever recorded one.
    pub async fn recorded_shape(&self, workflow: &str, version: u32) -> Result<Option<String>> {
        let version = i32::try_from(version).unwrap_or(i32::MAX);
        let row = self
            .on_pool(async |c| {
                self.statement(FIRST_SQL)
                    .bind(workflow)
                    .bind(version)
                    .fetch_optional(c)
                    .await
            })
            .await?;
        Ok(row.map(|row| row.try_get("shape")).transpose()?)
    }

    /// Appends `upgraded` (a [`Event::TaskUpgraded`]) to `task` at `expected_version` under
    /// `fence`, and in the same transaction moves the task's provider slots and orphaned
    /// jobs of renamed steps to their new names: a job open under the old name keeps its
    /// place at the provider and is found by its new step when it ends.
    pub async fn upgrade_task(
        &self,
        task: TaskId,
        expected_version: u32,
        fence: Fence,
        upgraded: NewEvent,
    ) -> Result<Appended> {
        let Event::TaskUpgraded { renamed, .. } = &upgraded.event else {
            return Err(Error::InvalidInput(format!(
                "upgrade_task takes a task_upgraded event, not {}",
                upgraded.event.event_type()
            )));
        };
        let (old, new): (Vec<&str>, Vec<&str>) = renamed
            .iter()
            .map(|r| (r.from.as_str(), r.to.as_str()))
            .unzip();
        let mut tx = self.pool().begin().await?;
        // A task that workers set aside (their rules refused it) is due again once an
        // operator moved it: it does not wait out the set-aside's back-off.
        let set_aside: Option<bool> = self
            .scalar("SELECT unreadable_since IS NOT NULL AND NOT parked FROM tasks WHERE id = $1")
            .bind(task.as_uuid())
            .fetch_optional(&mut *tx)
            .await?;
        let appended = self
            .append_in(
                &mut tx,
                task,
                expected_version,
                fence,
                std::slice::from_ref(&upgraded),
            )
            .await?;
        if !old.is_empty() {
            for sql in RENAME_STEP_SQL {
                self.statement(sql)
                    .bind(task.as_uuid())
                    .bind(&old)
                    .bind(&new)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        if fence == Fence::Unleased && set_aside == Some(true) {
            self.statement("UPDATE tasks SET next_run_at = NULL WHERE id = $1")
                .bind(task.as_uuid())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(appended)
    }
}
