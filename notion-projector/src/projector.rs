//! The projector: follow the log, coalesce each task to its latest status, PATCH Notion
//! outside any transaction, then record what was handled and move the checkpoint by
//! compare-and-set.
//!
//! Delivery is at-least-once: a crash between a PATCH and the checkpoint commit re-reads
//! the events, and the repeated PATCH sets the same absolute value. `notion_sync` is
//! written right after each successful PATCH, so a redelivered batch skips what already
//! reached Notion.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::{Backoff, TaskId, TaskStatus};
use engine::{Checkpoint, Event, PgStore, RecordedEvent, Subscription, SubscriptionOptions};
use futures_util::StreamExt;
use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::limiter::Limiter;
use crate::metrics::Metrics;
use crate::notion::{NotionClient, NotionError, PropertyType};
use crate::page_id::PageId;

/// The longest `Retry-After` honoured as given (Notion's workspace limit may ask for more
/// than a minute; a larger value is taken as a broken header).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(15 * 60);

/// The event types that set a task's status: `task_submitted` (queued) and `status_changed`.
pub const STATUS_EVENT_TYPES: [&str; 2] = ["task_submitted", "status_changed"];

/// How the projector runs. [`ProjectorOptions::default`] matches the binary's defaults.
#[derive(Clone, Debug)]
pub struct ProjectorOptions {
    /// The checkpoint's and the leader lock's name: instances with the same name share one
    /// checkpoint and only one of them leads.
    pub name: String,
    /// The Notion property that shows the status.
    pub status_property: String,
    pub property_type: PropertyType,
    /// Requests per second to Notion, on average.
    pub rate: f64,
    /// Requests allowed at once.
    pub burst: u32,
    /// The longest wait between reads when no notification arrives.
    pub poll_interval: Duration,
    /// Events read per batch.
    pub batch_size: u32,
    /// Tries after the first for 5xx, timeouts and unreachable Notion.
    pub max_retries: u32,
    /// The first retry's delay; it doubles each time (with jitter of ×0.5–1.5).
    pub retry_base: Duration,
    /// The longest retry delay after a 5xx or a timeout.
    pub retry_max: Duration,
    /// How often failures whose retries ran out are tried again.
    pub failure_retry_interval: Duration,
    /// How often a standby tries to become the leader.
    pub standby_interval: Duration,
    /// Requests in flight at once (the limiter still spaces them).
    pub concurrency: usize,
}

impl Default for ProjectorOptions {
    fn default() -> Self {
        ProjectorOptions {
            name: "notion".into(),
            status_property: "Status".into(),
            property_type: PropertyType::Status,
            rate: 3.0,
            burst: 1,
            poll_interval: Duration::from_millis(500),
            batch_size: 500,
            max_retries: 3,
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            failure_retry_interval: Duration::from_secs(30),
            standby_interval: Duration::from_secs(1),
            concurrency: 3,
        }
    }
}

/// Why the projector stepped back (it retries by itself; `run` returns only on shutdown).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProjectorError {
    #[error(transparent)]
    Engine(#[from] engine::Error),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The leader lock's connection broke: another instance may lead now.
    #[error("lost the leader lock: {0}")]
    LeadershipLost(String),
    /// Another instance moved the checkpoint: this one is a zombie and must not write.
    #[error("checkpoint of {projector} moved by another instance (expected {expected:?})")]
    CheckpointMoved {
        projector: String,
        expected: Checkpoint,
    },
    /// The log holds transaction ids this cluster has not assigned yet: it was restored
    /// from a logical dump into another cluster. Following it would skip new events.
    #[error(
        "the log holds transaction id {highest_stored}, but this cluster's next transaction id \
         is {next_assigned}: the database was restored from a dump into another cluster, and \
         new events would sort below the restored ones and never be mirrored. Stop every reel \
         process and PostgreSQL, run `pg_resetwal -e {epoch} <data directory>` as the server's \
         owner to move the cluster's transaction ids past the restored ones, then start again \
         (notion-projector/README.md, \"Restoring from a dump\")"
    )]
    RestoredLog {
        highest_stored: u64,
        next_assigned: u64,
        /// The smallest xid epoch that puts new transaction ids above the restored ones.
        epoch: u64,
    },
}

/// When a leader stops: `stop` (shutdown, or the lock lost) starts no new request;
/// `lock_lost` also abandons the requests in flight, because another instance may lead
/// by now and send a newer status that a late answer of ours must not overwrite.
#[derive(Clone, Debug)]
struct Halt {
    stop: CancellationToken,
    lock_lost: CancellationToken,
}

impl Halt {
    fn cancelled(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.stop.cancelled()
    }
}

/// Waits after stepping back (database outage, lost lock, moved checkpoint): 100 ms
/// doubling to 10 s.
const STEP_BACK: Backoff =
    Backoff::exponential(Duration::from_millis(100), Duration::from_secs(10));

/// The status a task should show, and the event that set it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Target {
    task: TaskId,
    version: u32,
    status: TaskStatus,
    /// The name Notion shows: the event's `to_display` (its default for older events).
    display: Arc<str>,
    position: i64,
}

/// A status to send to one page.
#[derive(Clone, Debug)]
struct Job {
    target: Target,
    page: PageId,
}

/// A row for `sync_failures`.
#[derive(Clone, Debug)]
struct Failure {
    position: i64,
    task: TaskId,
    http_status: Option<u16>,
    error: String,
    retryable: bool,
}

enum Sent {
    Synced,
    Failed(Failure),
    Interrupted,
}

/// The sidecar. Build one with [`Projector::new`], then [`Projector::run`] it.
#[derive(Debug)]
pub struct Projector {
    store: PgStore,
    client: NotionClient,
    limiter: Limiter,
    options: ProjectorOptions,
    metrics: Arc<Metrics>,
}

impl Projector {
    pub fn new(
        store: PgStore,
        client: NotionClient,
        options: ProjectorOptions,
        metrics: Arc<Metrics>,
    ) -> Projector {
        Projector {
            limiter: Limiter::new(options.rate, options.burst),
            store,
            client,
            options,
            metrics,
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Leads (or waits as a standby) until `shutdown`; steps back and retries after
    /// database outages, a lost leader lock or a moved checkpoint.
    pub async fn run(&self, shutdown: CancellationToken) {
        let mut outages = 0;
        while !shutdown.is_cancelled() {
            let started = Instant::now();
            match self.standby_then_lead(&shutdown).await {
                Ok(()) => {}
                Err(err) => {
                    self.metrics.leader.set(0);
                    if matches!(err, ProjectorError::Database(_) | ProjectorError::Engine(_)) {
                        self.metrics.set_healthy(false);
                    }
                    // A leadership that lasted a while starts the backoff over.
                    outages = if started.elapsed() > Duration::from_secs(30) {
                        1
                    } else {
                        outages + 1
                    };
                    let backoff = STEP_BACK.delay(outages, 0.5);
                    tracing::warn!(error = %err, retry_in = ?backoff, "projector stepped back");
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(backoff) => {}
                    }
                }
            }
        }
        tracing::info!("projector stopped");
    }

    async fn standby_then_lead(&self, shutdown: &CancellationToken) -> Result<(), ProjectorError> {
        let options = self.store.pool().connect_options();
        let mut conn = PgConnection::connect_with(&options).await?;
        let mut announced = false;
        loop {
            let acquired: bool =
                sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
                    .bind(self.lock_name())
                    .fetch_one(&mut conn)
                    .await?;
            self.metrics.set_healthy(true);
            if acquired {
                break;
            }
            if !announced {
                tracing::info!(projector = %self.options.name, "another instance leads: waiting as standby");
                announced = true;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(self.options.standby_interval) => {}
            }
        }
        tracing::info!(projector = %self.options.name, "leading");
        self.metrics.leader.set(1);
        // The lock lives as long as its connection: a watchdog pings it, and halts this
        // leader as soon as it breaks (another instance may take the lock then).
        let halt = Halt {
            stop: shutdown.child_token(),
            lock_lost: CancellationToken::new(),
        };
        let done = CancellationToken::new();
        let watchdog = tokio::spawn(watch_lock(conn, halt.clone(), done.clone()));
        let result = self.lead(&halt).await;
        done.cancel();
        self.metrics.leader.set(0);
        if let Ok(Some(mut conn)) = watchdog.await {
            let _ = sqlx::query("SELECT pg_advisory_unlock(hashtextextended($1, 0))")
                .bind(self.lock_name())
                .execute(&mut conn)
                .await;
            let _ = conn.close().await;
        }
        match result {
            Ok(()) if !shutdown.is_cancelled() => Err(ProjectorError::LeadershipLost(
                "the lock connection failed".into(),
            )),
            other => other,
        }
    }

    fn lock_name(&self) -> String {
        format!("reel/notion-projector/{}", self.options.name)
    }

    /// Follows the log until `halt`.
    async fn lead(&self, halt: &Halt) -> Result<(), ProjectorError> {
        let mut checkpoint = self.store.load_checkpoint(&self.options.name).await?;
        tracing::info!(
            tx_id = checkpoint.tx_id,
            position = checkpoint.position,
            "reading the log after the checkpoint"
        );
        let mut subscription = Subscription::start(
            self.store.clone(),
            checkpoint,
            SubscriptionOptions {
                poll_interval: self.options.poll_interval,
                batch_size: self.options.batch_size,
            },
        )
        .await;
        let mut failure_pass = tokio::time::interval(self.options.failure_retry_interval);
        failure_pass.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = halt.cancelled() => return Ok(()),
                _ = failure_pass.tick() => self.retry_failures(halt).await?,
                page = subscription.next_page(Some(&STATUS_EVENT_TYPES)) => {
                    let page = page?;
                    self.metrics.set_healthy(true);
                    let Some(end) = page.end else { continue };
                    let Some(failures) = self.handle(page.events, halt).await? else {
                        return Ok(()); // halted mid-batch: the checkpoint stays, the batch is redelivered
                    };
                    self.commit(Some((checkpoint, end)), &failures).await?;
                    checkpoint = end;
                }
            }
        }
    }

    /// Sends the latest status of every task in `events`. `None` when halted before the
    /// end; otherwise the failures to record with the checkpoint.
    async fn handle(
        &self,
        events: Vec<engine::Result<RecordedEvent>>,
        halt: &Halt,
    ) -> Result<Option<Vec<Failure>>, ProjectorError> {
        let mut failures = Vec::new();
        let mut latest: HashMap<TaskId, Target> = HashMap::new();
        for event in events {
            match event {
                Ok(event) => {
                    self.metrics.events.inc();
                    if let Some(target) = target_of(&event) {
                        match latest.entry(target.task) {
                            Entry::Occupied(mut newest) => {
                                if target.version > newest.get().version {
                                    newest.insert(target);
                                }
                            }
                            Entry::Vacant(slot) => {
                                slot.insert(target);
                            }
                        }
                    }
                }
                Err(engine::Error::Decode {
                    position,
                    stream,
                    reason,
                    ..
                }) => {
                    tracing::error!(task_id = %stream, position, %reason, "cannot decode a status event: recorded as a sync failure");
                    failures.push(Failure {
                        position,
                        task: stream,
                        http_status: None,
                        error: format!("cannot decode event: {reason}"),
                        retryable: false,
                    });
                }
                Err(other) => return Err(other.into()),
            }
        }
        // Oldest change first: under the rate limit, tasks are served in log order.
        let mut targets: Vec<Target> = latest.into_values().collect();
        targets.sort_by_key(|t| t.position);
        let (jobs, _settled) = self.plan(targets, &mut failures).await?;
        self.send_all(jobs, halt, failures, self.options.max_retries)
            .await
    }

    /// Sends `jobs` with bounded concurrency, each with up to `max_retries` retries;
    /// `None` when halted.
    async fn send_all(
        &self,
        jobs: Vec<Job>,
        halt: &Halt,
        mut failures: Vec<Failure>,
        max_retries: u32,
    ) -> Result<Option<Vec<Failure>>, ProjectorError> {
        let mut sent = futures_util::stream::iter(jobs)
            .map(|job| self.send(job, halt, max_retries))
            .buffer_unordered(self.options.concurrency.max(1));
        let mut interrupted = false;
        while let Some(outcome) = sent.next().await {
            match outcome? {
                Sent::Synced => {}
                Sent::Failed(failure) => failures.push(failure),
                Sent::Interrupted => interrupted = true,
            }
        }
        Ok((!interrupted).then_some(failures))
    }

    /// Which targets need a request: drops tasks already mirrored at or past the version
    /// and tasks without a page (both returned apart: nothing to send), records invalid
    /// page ids.
    async fn plan(
        &self,
        targets: Vec<Target>,
        failures: &mut Vec<Failure>,
    ) -> Result<(Vec<Job>, Vec<TaskId>), ProjectorError> {
        if targets.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let ids: Vec<Uuid> = targets.iter().map(|t| t.task.as_uuid()).collect();
        let rows: Vec<(Uuid, Option<String>, Option<i32>)> = sqlx::query_as(
            "SELECT u.id, t.notion_page_id, s.applied_version \
               FROM unnest($1::uuid[]) AS u(id) \
               LEFT JOIN tasks t ON t.id = u.id \
               LEFT JOIN notion_sync s ON s.projector = $2 AND s.task_id = u.id",
        )
        .bind(&ids)
        .bind(&self.options.name)
        .fetch_all(self.store.pool())
        .await?;
        let known: HashMap<Uuid, (Option<String>, Option<i32>)> = rows
            .into_iter()
            .map(|(id, page, applied)| (id, (page, applied)))
            .collect();
        let mut jobs = Vec::new();
        let mut up_to_date = Vec::new();
        let mut nothing_to_send = Vec::new();
        for target in targets {
            let (page, applied) = known
                .get(&target.task.as_uuid())
                .cloned()
                .unwrap_or((None, None));
            if applied.is_some_and(|v| i64::from(v) >= i64::from(target.version)) {
                up_to_date.push(target.task);
                continue;
            }
            let Some(raw) = page.filter(|p| !p.trim().is_empty()) else {
                tracing::info!(task_id = %target.task, status = target.status.as_str(), "task has no notion_page_id: not mirrored");
                self.metrics.skip("no_page", 1);
                nothing_to_send.push(target.task);
                continue;
            };
            match PageId::parse(&raw) {
                Ok(page) => jobs.push(Job { target, page }),
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

    /// One task's PATCH with the retry policy.
    async fn send(
        &self,
        mut job: Job,
        halt: &Halt,
        max_retries: u32,
    ) -> Result<Sent, ProjectorError> {
        let task = job.target.task;
        let mut failed_tries = 0u32;
        loop {
            tokio::select! {
                _ = halt.cancelled() => return Ok(Sent::Interrupted),
                _ = self.limiter.acquire() => {}
            }
            // Coalesce late too: while this job waited for its turn, the task may have moved
            // on. Send the newest status and skip the rest of its events when they arrive.
            job.target = self.freshest(job.target).await?;
            let name = &*job.target.display;
            if halt.stop.is_cancelled() {
                return Ok(Sent::Interrupted);
            }
            let request = self.client.set_status(
                &job.page,
                &self.options.status_property,
                self.options.property_type,
                name,
            );
            // Once the lock is lost, another instance may lead and send a newer status:
            // drop the request (closing its connection) rather than let its answer, or a
            // retry, land after the new leader's. SIGTERM lets requests in flight finish.
            let result = tokio::select! {
                result = request => result,
                _ = halt.lock_lost.cancelled() => return Ok(Sent::Interrupted),
            };
            let error = match result {
                Ok(()) => {
                    self.metrics.request("ok");
                    self.record_synced(&job).await?;
                    tracing::debug!(task_id = %task, status = name, version = job.target.version, "status mirrored");
                    return Ok(Sent::Synced);
                }
                Err(error) => error,
            };
            self.metrics.request(error.outcome());
            let wait = match &error {
                NotionError::RateLimited { retry_after, .. } => {
                    // Notion says when: everything waits, and it does not count as a try.
                    self.metrics.rate_limited.inc();
                    let wait = retry_after
                        .unwrap_or(Duration::from_secs(1))
                        .min(MAX_RETRY_AFTER);
                    self.limiter.pause_for(wait);
                    tracing::warn!(task_id = %task, error = %error, wait = ?wait, "Notion rate limited: pausing every request");
                    Duration::ZERO
                }
                error if error.is_retryable() => {
                    failed_tries += 1;
                    if failed_tries > max_retries {
                        tracing::warn!(task_id = %task, error = %error, tries = failed_tries, "Notion status sync failed: retries exhausted, recorded for a later pass");
                        return Ok(Sent::Failed(failure(&job, error, true)));
                    }
                    let delay = self.backoff(failed_tries);
                    tracing::warn!(task_id = %task, error = %error, retry_in = ?delay, try_number = failed_tries, "Notion status sync failed: retrying");
                    delay
                }
                error => {
                    tracing::error!(task_id = %task, page_id = %job.page, error = %error, "Notion rejected the status update: not retried, recorded as a sync failure");
                    return Ok(Sent::Failed(failure(&job, error, false)));
                }
            };
            self.metrics.retries.inc();
            tokio::select! {
                _ = halt.cancelled() => return Ok(Sent::Interrupted),
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// The task's latest status event at or after `target` (committed; this read is per
    /// task, so it does not need the global watermark: a task's versions commit in order).
    async fn freshest(&self, target: Target) -> Result<Target, ProjectorError> {
        let newer = self
            .store
            .read_stream(target.task, target.version + 1)
            .await;
        match newer {
            Ok(events) => Ok(events.iter().rev().find_map(target_of).unwrap_or(target)),
            // An event the projector cannot decode: send what the batch had; the global
            // read records that event as a failure.
            Err(engine::Error::Decode { .. }) => Ok(target),
            Err(other) => Err(other.into()),
        }
    }

    /// `retry_base · 2^(n−1)` with jitter of ×0.5–1.5, at most `retry_max`.
    fn backoff(&self, failed_tries: u32) -> Duration {
        Backoff::exponential(self.options.retry_base, self.options.retry_max)
            .with_jitter(0.5)
            .random_delay(failed_tries)
    }

    async fn record_synced(&self, job: &Job) -> Result<(), ProjectorError> {
        sqlx::query(
            "WITH synced AS ( \
                INSERT INTO notion_sync (projector, task_id, applied_version, applied_status, synced_at) \
                VALUES ($4, $1, $2, $3, now()) \
                ON CONFLICT (projector, task_id) DO UPDATE \
                   SET applied_version = EXCLUDED.applied_version, \
                       applied_status = EXCLUDED.applied_status, synced_at = now() \
                 WHERE notion_sync.applied_version < EXCLUDED.applied_version \
                RETURNING 1) \
             UPDATE sync_failures SET resolved_at = now() \
              WHERE projector = $4 AND task_id = $1 AND resolved_at IS NULL",
        )
        .bind(job.target.task.as_uuid())
        .bind(i32::try_from(job.target.version).unwrap_or(i32::MAX))
        .bind(job.target.status.as_str())
        .bind(&self.options.name)
        .execute(self.store.pool())
        .await?;
        Ok(())
    }

    /// Records `failures` and, when given, moves the checkpoint from `.0` to `.1` by
    /// compare-and-set — in one short transaction, after every request of the batch.
    async fn commit(
        &self,
        advance: Option<(Checkpoint, Checkpoint)>,
        failures: &[Failure],
    ) -> Result<(), ProjectorError> {
        let mut tx = self.store.pool().begin().await?;
        for failure in failures {
            sqlx::query(
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
            if !failure.retryable {
                // A retry sends the task's latest status whatever row asked for it, so a
                // failure no retry can fix (a 404, an undecodable event) after a 503 ends
                // the task's retries instead of repeating them forever.
                sqlx::query(
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

    /// A later pass over failures whose retries ran out: each such task's latest status,
    /// from its stream, is sent again, once; a failure bumps the row's `attempts` and its
    /// `failed_at`, which sends the task to the back of the next pass (tasks whose latest
    /// failure is oldest go first, so no group of failures hides the others). A task that
    /// is up to date or has no page has nothing to send: its rows are resolved. A task
    /// whose stream cannot be decoded gets a failure naming the event, not retryable.
    async fn retry_failures(&self, halt: &Halt) -> Result<(), ProjectorError> {
        let tasks: Vec<Uuid> = sqlx::query_scalar(
            "SELECT task_id FROM sync_failures \
              WHERE projector = $1 AND resolved_at IS NULL AND retryable \
              GROUP BY task_id ORDER BY max(failed_at), task_id LIMIT 100",
        )
        .bind(&self.options.name)
        .fetch_all(self.store.pool())
        .await?;
        if tasks.is_empty() {
            return Ok(());
        }
        tracing::info!(tasks = tasks.len(), "retrying failed Notion syncs");
        let mut targets = Vec::new();
        let mut failures = Vec::new();
        for task in tasks {
            let task = TaskId::from(task);
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
        let (jobs, settled) = self.plan(targets, &mut failures).await?;
        if !settled.is_empty() {
            let ids: Vec<Uuid> = settled.iter().map(TaskId::as_uuid).collect();
            sqlx::query(
                "UPDATE sync_failures SET resolved_at = now() \
                  WHERE projector = $1 AND task_id = ANY($2) AND resolved_at IS NULL",
            )
            .bind(&self.options.name)
            .bind(&ids)
            .execute(self.store.pool())
            .await?;
        }
        // One try each: a pass over many failures must not hold back fresh changes.
        if let Some(failures) = self.send_all(jobs, halt, failures, 0).await? {
            self.commit(None, &failures).await?;
        }
        Ok(())
    }

    /// Refuses to follow a log restored from a dump into another cluster (see
    /// [`ProjectorError::RestoredLog`]); the binary checks this before it starts.
    pub async fn preflight(&self) -> Result<(), ProjectorError> {
        let horizon = self.store.tx_id_horizon().await?;
        if horizon.is_ahead() {
            return Err(ProjectorError::RestoredLog {
                highest_stored: horizon.highest_stored,
                next_assigned: horizon.next_assigned,
                epoch: (horizon.highest_stored >> 32) + 1,
            });
        }
        Ok(())
    }
}

/// Puts the checkpoint of projector `name` at the log's head, so that everything in the log
/// now counts as mirrored and only later changes are sent. With `only_if_new`, a projector
/// that already has a checkpoint keeps it (the binary's `--from-now`); otherwise the
/// checkpoint is moved (for demos and benchmarks that share a database). Use while no
/// instance of `name` runs: a running leader's compare-and-set then fails and it re-reads.
pub async fn checkpoint_at_head(
    store: &PgStore,
    name: &str,
    only_if_new: bool,
) -> Result<(), ProjectorError> {
    store.checkpoint_at_head(name, only_if_new).await?;
    Ok(())
}

/// The status an event sets, if it sets one.
fn target_of(event: &RecordedEvent) -> Option<Target> {
    let (status, display) = match &event.event {
        Event::TaskSubmitted { .. } => (TaskStatus::QUEUED, TaskStatus::QUEUED.default_display()),
        Event::StatusChanged { to, .. } => (*to, event.event.display_of_new_status()?),
        _ => return None,
    };
    Some(Target {
        task: event.stream_id,
        version: event.version,
        status,
        display: Arc::from(display),
        position: event.global_position,
    })
}

fn failure(job: &Job, error: &NotionError, retryable: bool) -> Failure {
    Failure {
        position: job.target.position,
        task: job.target.task,
        http_status: error.http_status(),
        error: error.to_string(),
        retryable,
    }
}

/// Pings the lock connection every second; on failure cancels `halt`. Returns the
/// connection (to unlock it) when `done`.
async fn watch_lock(
    mut conn: PgConnection,
    halt: Halt,
    done: CancellationToken,
) -> Option<PgConnection> {
    loop {
        tokio::select! {
            _ = done.cancelled() => return Some(conn),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let ping = tokio::time::timeout(Duration::from_secs(5), conn.ping()).await;
        if !matches!(ping, Ok(Ok(()))) {
            tracing::warn!("the leader lock's connection failed: stepping back");
            halt.lock_lost.cancel();
            halt.stop.cancel();
            return None;
        }
    }
}
