//! Workflow versions and their shapes (`workflow_versions`): each worker records, at start,
//! the shape of every workflow version it serves. The first shape recorded for a version is
//! that version's; a build whose shape differs under the same version changed the
//! workflow without saying so (a step renamed, added or removed, a kind changed), and its
//! tasks in flight would meet steps they were not written for.

use std::fmt;

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::PgStore;
use crate::error::Result;
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

/// Two statements, not one: a row another worker inserted at the same moment is not in
/// the snapshot of a statement whose own insert waited for it (and then did nothing).
const RECORD_SQL: &str = "\
INSERT INTO workflow_versions (workflow, version, fingerprint, shape, first_seen_by)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT DO NOTHING";

const FIRST_SQL: &str = "\
SELECT fingerprint, shape, first_seen_at, first_seen_by FROM workflow_versions
 WHERE workflow = $1 AND version = $2
 ORDER BY first_seen_at, fingerprint
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
            self.on_pool(async |c| {
                self.statement(RECORD_SQL)
                    .bind(workflow.name())
                    .bind(version)
                    .bind(&fingerprint)
                    .bind(&shape)
                    .bind(worker_id)
                    .execute(c)
                    .await
            })
            .await?;
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
