//! What the projector records beside its checkpoint (`notion_sync`, `sync_retries`,
//! `sync_failures`), and the two ways retries enter the queue: the pending retries a new
//! leader resumes, and the periodic pass over failures whose retries ran out.

use std::collections::HashMap;
use std::time::Duration;

use engine::telemetry::TraceContext;
use engine::{Checkpoint, TaskId};
use tokio::time::Instant;
use uuid::Uuid;

use super::cards::{WAITING_FOR_OWNER, card_task};
use super::{Failure, Projector, ProjectorError, Target, target_of};
use crate::page_id::PageId;
use crate::queue::{Job, Origin, SendQueue};

impl Projector {
    /// Which targets need a request: drops tasks already mirrored at or past the version
    /// and tasks without a page (both returned apart: nothing to send), records invalid
    /// page ids.
    pub(super) async fn plan(
        &self,
        targets: Vec<Target>,
        failures: &mut Vec<Failure>,
    ) -> Result<(Vec<Job>, Vec<TaskId>), ProjectorError> {
        self.plan_targets(targets, failures, true).await
    }

    /// [`Projector::plan`] for statuses owed once more (after a request with no clear
    /// answer): sent even when `notion_sync` says the page shows them.
    async fn plan_owed(
        &self,
        targets: Vec<Target>,
        failures: &mut Vec<Failure>,
    ) -> Result<Vec<Job>, ProjectorError> {
        Ok(self.plan_targets(targets, failures, false).await?.0)
    }

    async fn plan_targets(
        &self,
        targets: Vec<Target>,
        failures: &mut Vec<Failure>,
        skip_up_to_date: bool,
    ) -> Result<(Vec<Job>, Vec<TaskId>), ProjectorError> {
        if targets.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let ids: Vec<Uuid> = targets.iter().map(|t| t.task.as_uuid()).collect();
        let rows: Vec<Known> = self.store.on_pool(async |c| self.store.rows_as(
            "SELECT u.id, NULLIF(btrim(t.notion_page_id), '') AS page, c.page_id AS card, \
                    s.applied_version AS applied, \
                    e.metadata ->> 'traceparent' AS traceparent, \
                    e.metadata ->> 'tracestate' AS tracestate \
               FROM unnest($1::uuid[]) AS u(id) \
               LEFT JOIN tasks t ON t.id = u.id \
               LEFT JOIN events e ON e.stream_id = u.id AND e.stream_version = 1 \
               LEFT JOIN LATERAL (SELECT page_id FROM notion_cards c \
                                   WHERE c.task_id = u.id AND (c.projector = $2 OR c.data_source = $3) \
                                   ORDER BY c.projector = $2 DESC, c.recorded_at LIMIT 1) c ON true \
               LEFT JOIN notion_sync s ON s.projector = $2 AND s.task_id = u.id",
        )
        .bind(&ids)
        .bind(&self.options.name)
        .bind(self.board.as_ref().map(|b| b.data_source.as_str()))
        .fetch_all(c).await).await?;
        let known: HashMap<Uuid, Known> = rows.into_iter().map(|known| (known.id, known)).collect();
        let mut jobs = Vec::new();
        let mut up_to_date = Vec::new();
        let mut nothing_to_send = Vec::new();
        for target in targets {
            let known = known
                .get(&target.task.as_uuid())
                .cloned()
                .unwrap_or_default();
            if skip_up_to_date
                && known
                    .applied
                    .is_some_and(|v| i64::from(v) >= i64::from(target.version))
            {
                up_to_date.push(target.task);
                continue;
            }
            let trace = known
                .traceparent
                .as_deref()
                .and_then(|parent| TraceContext::parse(parent, known.tracestate.as_deref()).ok());
            let from_card = known.page.is_none() && known.card.is_some();
            let Some(raw) = known.page.or(known.card) else {
                if self.board.is_some() {
                    jobs.push(Job {
                        trace,
                        ..Job::card(target)
                    });
                    continue;
                }
                tracing::info!(task_id = %target.task, status = target.status.as_str(), "task has no notion_page_id: not mirrored");
                self.metrics.skip("no_page", 1);
                nothing_to_send.push(target.task);
                continue;
            };
            match PageId::parse(&raw) {
                Ok(page) => {
                    // The task's own card: one the projector made (or found) for it, or the
                    // card intake made it of.
                    let card =
                        self.board.is_some() && (from_card || card_task(&page) == target.task);
                    jobs.push(Job {
                        card,
                        trace,
                        ..Job::fresh(target, page)
                    });
                }
                Err(err) => {
                    tracing::warn!(task_id = %target.task, error = %err, "invalid notion_page_id: recorded as a sync failure");
                    failures.push(Failure {
                        position: target.position,
                        task: target.task,
                        http_status: None,
                        error: err.to_string(),
                        retryable: false,
                    });
                }
            }
        }
        self.metrics.skip("up_to_date", up_to_date.len());
        up_to_date.extend(nothing_to_send);
        Ok((jobs, up_to_date))
    }

    /// Records `failures` (ending the pending retries of their tasks) and, when given,
    /// moves the checkpoint from `.0` to `.1` by compare-and-set, in one short transaction.
    pub(super) async fn commit(
        &self,
        advance: Option<(Checkpoint, Checkpoint)>,
        failures: &[Failure],
    ) -> Result<(), ProjectorError> {
        let mut tx = self.store.pool().begin().await?;
        for failure in failures {
            self.store
                .statement(
                    "INSERT INTO sync_failures \
                    (projector, global_position, task_id, http_status, error, retryable) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (projector, global_position) DO UPDATE \
                    SET attempts = sync_failures.attempts + 1, http_status = EXCLUDED.http_status, \
                        error = EXCLUDED.error, retryable = EXCLUDED.retryable, \
                        failed_at = now(), resolved_at = NULL",
                )
                .bind(&self.options.name)
                .bind(failure.position)
                .bind(failure.task.as_uuid())
                .bind(failure.http_status.map(i32::from))
                .bind(&failure.error)
                .bind(failure.retryable)
                .execute(&mut *tx)
                .await?;
            self.store
                .statement("DELETE FROM sync_retries WHERE projector = $1 AND task_id = $2")
                .bind(&self.options.name)
                .bind(failure.task.as_uuid())
                .execute(&mut *tx)
                .await?;
            if !failure.retryable {
                // A retry sends the task's latest status whatever row asked for it, so a
                // failure no retry can fix (a 404, an undecodable event) after a 503 ends
                // the task's retries instead of repeating them forever.
                self.store
                    .statement(
                        "UPDATE sync_failures SET retryable = false \
                      WHERE projector = $1 AND task_id = $2 AND resolved_at IS NULL AND retryable",
                    )
                    .bind(&self.options.name)
                    .bind(failure.task.as_uuid())
                    .execute(&mut *tx)
                    .await?;
            }
        }
        if let Some((from, to)) = advance {
            let moved = self
                .store
                .compare_and_set_checkpoint(&mut tx, &self.options.name, from, to)
                .await?;
            if !moved {
                tx.rollback().await?;
                return Err(ProjectorError::CheckpointMoved {
                    projector: self.options.name.clone(),
                    expected: from,
                });
            }
        }
        tx.commit().await?;
        self.metrics.sync_failures.inc_by(failures.len() as u64);
        Ok(())
    }

    /// Marks the task mirrored at the job's version, resolves its failures and ends its
    /// pending retry (unless it waits with a newer status), in one statement.
    pub(super) async fn record_synced(&self, job: &Job) -> Result<(), ProjectorError> {
        self.store.on_pool(async |c| self.store.statement(
            "WITH synced AS ( \
                INSERT INTO notion_sync (projector, task_id, applied_version, applied_status, synced_at) \
                VALUES ($4, $1, $2, $3, now()) \
                ON CONFLICT (projector, task_id) DO UPDATE \
                   SET applied_version = EXCLUDED.applied_version, \
                       applied_status = EXCLUDED.applied_status, synced_at = now() \
                 WHERE notion_sync.applied_version < EXCLUDED.applied_version \
                RETURNING 1), \
             retried AS ( \
                DELETE FROM sync_retries \
                 WHERE projector = $4 AND task_id = $1 AND version <= $2 \
                RETURNING 1) \
             UPDATE sync_failures SET resolved_at = now() \
              WHERE projector = $4 AND task_id = $1 AND resolved_at IS NULL",
        )
        .bind(job.target.task.as_uuid())
        .bind(version_to_db(job.target.version))
        .bind(job.target.status.as_str())
        .bind(&self.options.name)
        .execute(c).await).await?;
        Ok(())
    }

    /// Records the job's next try, due after `delay`: from here on the checkpoint may pass
    /// its event, because a crash or a new leader resumes the retry from this row.
    pub(super) async fn record_retry(
        &self,
        job: &Job,
        http_status: Option<u16>,
        error: &str,
        delay: Duration,
    ) -> Result<(), ProjectorError> {
        self.store
            .on_pool(async |c| {
                self.store
                    .statement(
                        "INSERT INTO sync_retries \
                (projector, task_id, version, global_position, tries, due_at, http_status, error, \
                 unsettled_until) \
             VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6), $7, $8, \
                     now() + make_interval(secs => $9)) \
             ON CONFLICT (projector, task_id) DO UPDATE \
                SET version = EXCLUDED.version, global_position = EXCLUDED.global_position, \
                    tries = EXCLUDED.tries, due_at = EXCLUDED.due_at, \
                    http_status = EXCLUDED.http_status, error = EXCLUDED.error, \
                    unsettled_until = EXCLUDED.unsettled_until, recorded_at = now() \
              WHERE sync_retries.version <= EXCLUDED.version",
                    )
                    .bind(&self.options.name)
                    .bind(job.target.task.as_uuid())
                    .bind(version_to_db(job.target.version))
                    .bind(job.target.position)
                    .bind(i32::try_from(job.tries).unwrap_or(i32::MAX))
                    .bind(delay.as_secs_f64())
                    .bind(http_status.map(i32::from))
                    .bind(error)
                    .bind(job.unsettled_until.map(|until| {
                        until
                            .saturating_duration_since(Instant::now())
                            .as_secs_f64()
                    }))
                    .execute(c)
                    .await
            })
            .await?;
        Ok(())
    }

    /// A card job on a projector that does not own the board: the owner makes the card.
    /// Recorded and queued as a retry due in a second (not a try), so nothing is lost if
    /// this leader stops meanwhile.
    pub(super) async fn wait_for_card(
        &self,
        job: Job,
        queue: &mut SendQueue,
    ) -> Result<(), ProjectorError> {
        let wait = Duration::from_secs(1);
        self.record_retry(&job, None, WAITING_FOR_OWNER, wait)
            .await?;
        let job = Job {
            origin: Origin::Retry,
            batch: None,
            waits: job.waits + 1,
            ..job
        };
        queue.push_retry(job, Instant::now() + wait);
        Ok(())
    }

    /// Queues the pending retries recorded by this projector (by an earlier leader, or
    /// before a crash), each with its tries so far and its due time, and the task's latest
    /// status. Rows with nothing left to send are deleted.
    pub(super) async fn load_retries(&self, queue: &mut SendQueue) -> Result<(), ProjectorError> {
        let rows: Vec<(Uuid, i32, f64, Option<f64>)> = self
            .store
            .on_pool(async |c| {
                self.store.rows_as(
            "SELECT task_id, tries, GREATEST(extract(epoch FROM due_at - now()), 0)::float8, \
                    extract(epoch FROM unsettled_until - now())::float8 \
               FROM sync_retries WHERE projector = $1",
        )
        .bind(&self.options.name)
        .fetch_all(c).await
            })
            .await?;
        if rows.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        let in_secs =
            |secs: f64| now + Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or_default();
        let mut unsettled = HashMap::new();
        let mut pending: HashMap<TaskId, (u32, Duration)> = HashMap::new();
        for (task, tries, wait, until) in rows {
            let task = TaskId::from(task);
            let wait = Duration::try_from_secs_f64(wait).unwrap_or_default();
            pending.insert(task, (u32::try_from(tries).unwrap_or(0), wait));
            if let Some(until) = until {
                unsettled.insert(task, in_secs(until));
            }
        }
        let tasks: Vec<TaskId> = pending.keys().copied().collect();
        let (targets, mut failures) = self.latest_targets(&tasks).await?;
        // A row owing a send after an unclear request is sent even when `notion_sync` says
        // the page is up to date: that request may have landed since.
        let (targets, owed): (Vec<Target>, Vec<Target>) = targets
            .into_iter()
            .partition(|t| !unsettled.contains_key(&t.task));
        let (mut jobs, settled) = self.plan(targets, &mut failures).await?;
        jobs.extend(self.plan_owed(owed, &mut failures).await?);
        let ids: Vec<Uuid> = settled.iter().map(TaskId::as_uuid).collect();
        self.store
            .on_pool(async |c| {
                self.store
                    .statement(
                        "DELETE FROM sync_retries WHERE projector = $1 AND task_id = ANY($2)",
                    )
                    .bind(&self.options.name)
                    .bind(&ids)
                    .execute(c)
                    .await
            })
            .await?;
        tracing::info!(retries = jobs.len(), "resuming pending retries");
        for job in jobs {
            let (tries, wait) = pending.get(&job.task()).copied().unwrap_or_default();
            let job = Job {
                tries,
                origin: Origin::Retry,
                unsettled_until: unsettled.get(&job.task()).copied(),
                ..job
            };
            queue.push_retry(job, now + wait);
        }
        if !failures.is_empty() {
            self.commit(None, &failures).await?;
        }
        Ok(())
    }

    /// A later pass over failures whose retries ran out: each such task's latest status,
    /// from its stream, is queued as a retry due now with one try left; a failure bumps the
    /// row's `attempts` and its `failed_at`, which sends the task to the back of the next
    /// pass (tasks whose latest failure is oldest go first, so no group of failures hides
    /// the others). Tasks already queued are left to their job. A task that is up to date
    /// or has no page has nothing to send: its rows are resolved. A task whose stream
    /// cannot be decoded gets a failure naming the event, not retryable.
    pub(super) async fn enqueue_failures(
        &self,
        queue: &mut SendQueue,
    ) -> Result<(), ProjectorError> {
        // With each task, how long its last unclear request (no answer, 502/504) may still
        // land.
        let rows: Vec<(Uuid, Option<f64>)> = self
            .store
            .on_pool(async |c| {
                self.store
                    .rows_as(
                        "SELECT task_id, extract(epoch FROM \
                    max(failed_at) FILTER (WHERE http_status IS NULL OR http_status IN (502, 504)) \
                    + make_interval(secs => $2) - now())::float8 \
               FROM sync_failures \
              WHERE projector = $1 AND resolved_at IS NULL AND retryable \
              GROUP BY task_id ORDER BY max(failed_at), task_id LIMIT 100",
                    )
                    .bind(&self.options.name)
                    .bind(self.options.late_write_window.as_secs_f64())
                    .fetch_all(c)
                    .await
            })
            .await?;
        let now = Instant::now();
        let unsettled: HashMap<TaskId, Instant> = rows
            .iter()
            .filter_map(|(task, left)| {
                let left = Duration::try_from_secs_f64(left.filter(|l| *l > 0.0)?).ok()?;
                Some((TaskId::from(*task), now + left))
            })
            .collect();
        let tasks: Vec<TaskId> = rows
            .into_iter()
            .map(|(task, _)| TaskId::from(task))
            .filter(|task| !queue.contains(*task))
            .collect();
        if tasks.is_empty() {
            return Ok(());
        }
        tracing::info!(tasks = tasks.len(), "retrying failed Notion syncs");
        let (targets, mut failures) = self.latest_targets(&tasks).await?;
        let (jobs, settled) = self.plan(targets, &mut failures).await?;
        if !settled.is_empty() {
            let ids: Vec<Uuid> = settled.iter().map(TaskId::as_uuid).collect();
            self.store
                .on_pool(async |c| {
                    self.store
                        .statement(
                            "UPDATE sync_failures SET resolved_at = now() \
                  WHERE projector = $1 AND task_id = ANY($2) AND resolved_at IS NULL",
                        )
                        .bind(&self.options.name)
                        .bind(&ids)
                        .execute(c)
                        .await
                })
                .await?;
        }
        // One try each, beside fresh changes: a pass over many failures never holds them back.
        for job in jobs {
            let job = Job {
                tries: self.options.max_retries,
                origin: Origin::Retry,
                unsettled_until: unsettled.get(&job.task()).copied(),
                ..job
            };
            queue.push_retry(job, now);
        }
        if !failures.is_empty() {
            self.commit(None, &failures).await?;
        }
        Ok(())
    }

    /// Each task's latest status, from its stream; a task whose stream cannot be decoded
    /// gets a failure naming the event instead.
    async fn latest_targets(
        &self,
        tasks: &[TaskId],
    ) -> Result<(Vec<Target>, Vec<Failure>), ProjectorError> {
        let mut targets = Vec::new();
        let mut failures = Vec::new();
        for &task in tasks {
            match self.store.read_stream(task, 1).await {
                Ok(events) => targets.extend(events.iter().rev().find_map(target_of)),
                Err(engine::Error::Decode {
                    position, reason, ..
                }) => {
                    tracing::error!(task_id = %task, position, %reason, "cannot decode the task's history: its failed sync is not retried");
                    failures.push(Failure {
                        position,
                        task,
                        http_status: None,
                        error: format!("cannot decode event: {reason}"),
                        retryable: false,
                    });
                }
                Err(other) => return Err(other.into()),
            }
        }
        Ok((targets, failures))
    }
}

/// What the database knows of a task the projector is about to send: its own page, the
/// card recorded for it, and the version mirrored last.
#[derive(Clone, Debug, Default, sqlx::FromRow)]
struct Known {
    id: Uuid,
    page: Option<String>,
    card: Option<String>,
    applied: Option<i32>,
    /// The trace context the task's submit stored.
    traceparent: Option<String>,
    tracestate: Option<String>,
}

fn version_to_db(version: u32) -> i32 {
    i32::try_from(version).unwrap_or(i32::MAX)
}
