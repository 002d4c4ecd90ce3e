//! How long a job step's provider jobs take (`job_durations`), learned from the jobs that
//! ended: the poll schedule polls often only near a job's expected end (see
//! `orchestrator::jobs`).

use std::time::Duration;

use super::PgStore;
use crate::error::Result;

/// The moving average's weight of a new sample once this many are in (before that, the
/// mean of all so far).
const SAMPLES_AVERAGED: i64 = 5;

impl PgStore {
    /// The expected duration of `workflow`'s `step`'s jobs, if any ended yet.
    pub async fn expected_job_duration(
        &self,
        workflow: &str,
        step: &str,
    ) -> Result<Option<Duration>> {
        let ms: Option<i64> = self
            .on_pool(async |c| {
                self.scalar(
                    "SELECT expected_ms FROM job_durations WHERE workflow = $1 AND step = $2",
                )
                .bind(workflow)
                .bind(step)
                .fetch_optional(c)
                .await
            })
            .await?;
        Ok(ms.map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(0))))
    }

    /// A job of `workflow`'s `step` ended after `took` (from its submission to the poll
    /// that saw its end): the expectation moves toward it. Returns the new expectation.
    pub async fn observe_job_duration(
        &self,
        workflow: &str,
        step: &str,
        took: Duration,
    ) -> Result<Duration> {
        let ms = i64::try_from(took.as_millis()).unwrap_or(i64::MAX);
        let expected: i64 = self
            .on_pool(async |c| {
                self.scalar(
                    "INSERT INTO job_durations (workflow, step, expected_ms) VALUES ($1, $2, $3) \
                     ON CONFLICT (workflow, step) DO UPDATE SET \
                         expected_ms = job_durations.expected_ms \
                             + (EXCLUDED.expected_ms - job_durations.expected_ms) \
                               / LEAST(job_durations.samples + 1, $4), \
                         samples = job_durations.samples + 1, \
                         updated_at = now() \
                     RETURNING expected_ms",
                )
                .bind(workflow)
                .bind(step)
                .bind(ms)
                .bind(SAMPLES_AVERAGED)
                .fetch_one(c)
                .await
            })
            .await?;
        Ok(Duration::from_millis(u64::try_from(expected).unwrap_or(0)))
    }
}
