//! Running a claimed task: replay its stream, then run only what is missing.
//!
//! Nothing is held while a step's work runs: each item's completion is one short append,
//! fenced by the lease. Decisions come from the fold; the log records every outcome.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use std::panic::AssertUnwindSafe;

use futures_util::{FutureExt, StreamExt};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::event::{Event, FailureKind, NewEvent, PollSchedule, RecordedEvent};
use crate::id::ChannelId;
use crate::outputs::{ItemOutput, Outputs};
use crate::state::{ItemRecord, SignalRecord, StepState, TaskState, WaitRecord, fold};
use crate::status::TaskStatus;
use crate::store::{Lease, PgStore, SlotOwner};
use crate::telemetry::{self, TraceContext};
use crate::workflow::{
    Plan, ProviderLimits, Registry, Step, StepContext, StepError, WaitFor, WaitView, Work, Workflow,
};

mod commit;
mod jobs;
mod log;

use commit::Committer;
pub use commit::HOLD_SPARE;
use jobs::JobRun;
use log::{Answer, Log};

/// How a run of a claimed task ended.
#[derive(Clone, Debug, PartialEq)]
pub enum RunOutcome {
    /// Every step is done; the task waits in `final_review` (workflows with a review gate).
    AwaitingReview,
    /// Every step is done; the task is `completed` (workflows without a review gate).
    Completed,
    /// An attempt gave up on a transient failure; a later claim resumes by replay.
    RetryScheduled { next_run_at: chrono::DateTime<Utc> },
    /// A permanent failure or the attempt limit: the task is `failed`.
    Failed { reason: String },
    /// The task was cancelled; the run stopped at an item boundary.
    Cancelled,
    /// The run stopped early (the process is shutting down, or the stream changed under it);
    /// the lease is released and a later claim resumes by replay.
    Stopped,
    /// Every item in flight waits on a provider job (or on room at a provider): the lease
    /// is released and the task is due again at `until`, same status, same attempt.
    Parked {
        until: chrono::DateTime<Utc>,
        /// Open jobs waited on.
        jobs: u32,
        /// Items waiting for room at their provider.
        waiting: u32,
    },
    /// Items wait for a signal or a time (see `StepContext::signal`, `StepContext::sleep`):
    /// the wait is recorded, the lease released, and the task parked, holding no worker
    /// slot, until the signal comes (it wakes the task) or `until` (none: only a signal
    /// ends the wait).
    Waiting {
        until: Option<chrono::DateTime<Utc>>,
        /// The signals waited for.
        signals: Vec<String>,
    },
    /// The task was not runnable (already in review or finished).
    NotRunnable(TaskStatus),
    /// This build cannot read the task's history (an event from a newer build): the task
    /// is released and set aside until `until` — not failed, no attempt used — so that a
    /// newer worker can run it.
    SetAside {
        until: chrono::DateTime<Utc>,
        reason: String,
    },
}

/// Runs claimed tasks of the registered workflows.
#[derive(Clone, Debug)]
pub struct Orchestrator {
    store: PgStore,
    registry: Arc<Registry>,
    /// Provider limits that replace the steps' defaults, by key.
    overrides: Arc<Vec<ProviderLimits>>,
    /// Its runs' appends, shared between them: see [`Committer`].
    committer: Arc<Committer>,
    /// Where its runs are counted, if anywhere.
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

/// Parks a task when its next poll (or its next chance at a provider) is at least this far
/// off; shorter waits are slept in place.
pub const PARK_AFTER: Duration = Duration::from_secs(1);

/// How long a task waiting for room at a provider stays parked at most (a released slot
/// wakes the oldest waiter sooner).
const SLOT_WAIT: Duration = Duration::from_secs(5);

/// How long provider slots and places live without a heartbeat (or past a park's end).
pub const SLOT_TTL: Duration = Duration::from_secs(60);

impl Orchestrator {
    /// An orchestrator over `store` for the workflows in `registry`.
    pub fn new(store: PgStore, registry: Registry) -> Self {
        Orchestrator {
            committer: Arc::new(Committer::new(store.clone())),
            store,
            registry: Arc::new(registry),
            overrides: Arc::new(Vec::new()),
            metrics: None,
        }
    }

    /// Counts its runs, their items and their appends in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Replaces the steps' default provider limits, by key: a field set here wins.
    pub fn with_provider_limits(mut self, overrides: Vec<ProviderLimits>) -> Self {
        self.overrides = Arc::new(overrides);
        self
    }

    /// The workflows this orchestrator runs.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Runs the task `lease` holds until it awaits review, fails, is rescheduled, or stops.
    /// `cancel` stops the run at once (in-flight items are abandoned, nothing is recorded
    /// for them). `LeaseLost` means another worker owns the task now: stop touching it.
    pub async fn run(&self, lease: &Lease, cancel: CancellationToken) -> Result<RunOutcome> {
        self.run_with(lease, cancel.clone(), cancel).await
    }

    /// Like [`Orchestrator::run`], with a gentler stop: after `drain` fires no new item (or
    /// retry) starts, but items in flight finish and are recorded; `abort` abandons them.
    pub async fn run_with(
        &self,
        lease: &Lease,
        drain: CancellationToken,
        abort: CancellationToken,
    ) -> Result<RunOutcome> {
        // Read before the attempt's span exists: the span's parent is in the history.
        let history = self.store.read_stream(lease.task, 1).await;
        let submitted = match &history {
            Ok(history) => history.first().map(|e| e.metadata.clone()),
            // A history this build cannot read (it will be set aside or failed): its
            // first event's metadata alone still names the trace.
            Err(_) => self
                .store
                .submitted_metadata(lease.task)
                .await
                .ok()
                .flatten(),
        };
        let trace = TraceContext::for_task(lease.task, submitted.as_ref());
        let span = tracing::info_span!(
            "reel.attempt",
            reel.task_id = %lease.task,
            reel.workflow = %lease.workflow,
            reel.attempt = lease.attempt,
            reel.worker_id = %lease.worker_id,
            reel.lease_epoch = lease.epoch,
            reel.outcome = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        telemetry::set_parent(&span, &trace);
        let ended = self
            .run_counted(lease, history, drain, abort)
            .instrument(span.clone())
            .await;
        let outcome = match &ended {
            Ok(RunOutcome::AwaitingReview) => "awaiting_review",
            Ok(RunOutcome::Completed) => "completed",
            Ok(RunOutcome::RetryScheduled { .. }) => "rescheduled",
            Ok(RunOutcome::Failed { .. }) => "failed",
            Ok(RunOutcome::Cancelled) => "cancelled",
            Ok(RunOutcome::Stopped) => "stopped",
            Ok(RunOutcome::Parked { .. }) => "parked",
            Ok(RunOutcome::Waiting { .. }) => "waiting",
            Ok(RunOutcome::NotRunnable(_)) => "not_runnable",
            Ok(RunOutcome::SetAside { .. }) => "set_aside",
            Err(Error::LeaseLost { .. }) => "lease_lost",
            Err(_) => "error",
        };
        span.record("reel.outcome", outcome);
        if matches!(&ended, Ok(RunOutcome::Failed { .. }) | Err(_)) {
            span.record("otel.status_code", "ERROR");
        }
        if let Some(metrics) = &self.metrics {
            metrics.run_ended(&lease.workflow, outcome);
        }
        ended
    }

    async fn run_counted(
        &self,
        lease: &Lease,
        history: Result<Vec<RecordedEvent>>,
        drain: CancellationToken,
        abort: CancellationToken,
    ) -> Result<RunOutcome> {
        let outcome = match self.run_claimed(lease, history, drain, abort).await {
            Err(err) if err.is_from_a_newer_build() => return self.set_aside(lease, &err).await,
            Err(err @ Error::UpgradeRefused { .. }) => return self.set_aside(lease, &err).await,
            Err(err @ Error::Decode { .. }) => return self.fail_unreadable(lease, &err).await,
            Err(Error::Conflict { .. }) => {
                // Someone else appended (an operator's cancel, usually): look again.
                let state = fold(&self.store.read_stream(lease.task, 1).await?);
                if state.cancelled {
                    RunOutcome::Cancelled
                } else {
                    RunOutcome::Stopped
                }
            }
            // A stop between items may be a cancel's doing (the worker saw its lease go).
            Ok(RunOutcome::Stopped)
                if self.store.task_status(lease.task).await? == Some(TaskStatus::CANCELLED) =>
            {
                RunOutcome::Cancelled
            }
            other => other?,
        };
        if matches!(
            outcome,
            RunOutcome::Stopped | RunOutcome::Cancelled | RunOutcome::NotRunnable(_)
        ) {
            self.store.release_lease(lease).await?;
        }
        self.settle_slots(lease, &outcome).await;
        if matches!(outcome, RunOutcome::Cancelled | RunOutcome::Failed { .. }) {
            self.park_to_settle(lease).await;
        }
        Ok(outcome)
    }

    /// After a run of a workflow that uses provider limits: a parked task keeps its slots
    /// and places until it is due (and a while after); a task whose steps are all done frees
    /// everything; any other end gives its places in the queues up and leaves the slots of
    /// its open jobs (still in flight at the provider) to end with them. Best effort: rows
    /// also expire on their own.
    async fn settle_slots(&self, lease: &Lease, outcome: &RunOutcome) {
        let uses_providers = self.registry.names().iter().any(|name| {
            self.registry
                .get(name)
                .is_some_and(|w| w.steps().iter().any(|s| s.provider.is_some()))
        });
        if !uses_providers {
            return;
        }
        let settled = match outcome {
            RunOutcome::Parked { until, .. } => {
                let parked_for = (*until - self.store.now()).to_std().unwrap_or_default();
                self.store
                    .extend_slots(lease.task, parked_for + SLOT_TTL)
                    .await
            }
            // Every job ended: nothing of the task is in flight any more.
            RunOutcome::Completed | RunOutcome::AwaitingReview => {
                self.store.release_task_slots(lease.task).await
            }
            // Jobs may still run at the provider: their slots stay counted until they
            // would have ended (a call's lapse within a minute); the places in the queues go.
            _ => self.store.withdraw_waiting(lease.task).await,
        };
        if let Err(err) = settled {
            tracing::warn!(task = %lease.task, error = %err, "cannot settle provider slots; they expire on their own");
        }
    }

    /// Fails a task whose history is corrupt (an event of a known type and version that
    /// does not decode): no build can run it. Its status is taken from the `tasks` row.
    async fn fail_unreadable(&self, lease: &Lease, err: &Error) -> Result<RunOutcome> {
        let from = self
            .store
            .task_status(lease.task)
            .await?
            .unwrap_or(TaskStatus::QUEUED);
        let reason = crate::id::truncate_for_display(
            &format!("the task's history cannot be read: {err}"),
            crate::workflow::ERROR_MESSAGE_MAX_CHARS,
        );
        tracing::error!(task = %lease.task, %reason, "failing the task");
        let events = [
            Event::TaskFailed {
                reason: reason.clone(),
                step: None,
                item: None,
            },
            Event::status_changed(from, TaskStatus::FAILED),
        ];
        let batch: Vec<NewEvent> = events.into_iter().map(NewEvent::new).collect();
        self.store
            .append(lease.task, lease.version, lease.fence(), &batch)
            .await?;
        Ok(RunOutcome::Failed { reason })
    }

    /// Releases a task whose history this build cannot read, logging why once per wait.
    async fn set_aside(&self, lease: &Lease, err: &Error) -> Result<RunOutcome> {
        let why = matches!(err, Error::UpgradeRefused { .. }).then(|| err.to_string());
        let Some(until) = self.store.set_aside(lease, why.as_deref()).await? else {
            return Err(Error::LeaseLost {
                task: lease.task,
                epoch: lease.epoch,
            });
        };
        match err {
            Error::Decode {
                version,
                event_type,
                schema_version,
                reason,
                ..
            } => tracing::warn!(
                task = %lease.task, version, event_type = %event_type, schema_version, %reason, %until,
                "this build cannot read the task's history: set aside for a newer worker"
            ),
            Error::UpgradeRefused { .. } => tracing::warn!(
                task = %lease.task, error = %err, %until,
                "set aside for a worker that serves its version"
            ),
            _ => {}
        }
        Ok(RunOutcome::SetAside {
            until,
            reason: err.to_string(),
        })
    }

    /// A run of the claimed task whose history folded to `state`.
    fn task_run(
        &self,
        lease: &Lease,
        state: &TaskState,
        drain: CancellationToken,
        abort: CancellationToken,
    ) -> Result<TaskRun> {
        // The task runs on the version it was submitted for, never on another (a worker
        // claims only the versions it serves).
        let workflow = self
            .registry
            .get_version(&state.workflow, state.workflow_version.max(1))
            .ok_or_else(|| match self.registry.get(&state.workflow) {
                Some(_) => Error::UnknownWorkflow(format!(
                    "{} version {}",
                    state.workflow,
                    state.workflow_version.max(1)
                )),
                None => Error::UnknownWorkflow(state.workflow.clone()),
            })?;
        let channel = state
            .channel_id
            .clone()
            .ok_or(Error::TaskNotFound(lease.task))?;
        Ok(TaskRun {
            store: self.store.clone(),
            overrides: self.overrides.clone(),
            log: Arc::new(Log::new(
                self.committer.clone(),
                lease,
                state.version,
                self.metrics
                    .clone()
                    .map(|m| (m, channel.as_str().to_owned())),
            )),
            workflow,
            channel,
            input: Arc::new(state.input.clone()),
            attempt: lease.attempt,
            failed_attempts: state.failed_attempts,
            outputs: std::sync::Mutex::new(Outputs::from_state(state)),
            signals: std::sync::Mutex::new(state.signals.clone()),
            receiving: tokio::sync::Mutex::new(()),
            waits: state
                .steps
                .iter()
                .map(|s| {
                    (
                        s.name.clone(),
                        StepWaits {
                            since: s.run_since,
                            since_at: s.run_since_at,
                            waits: s.waits.clone(),
                        },
                    )
                })
                .collect(),
            drain,
            cancel: abort,
        })
    }

    /// A task that failed or was cancelled while provider jobs of it ran is parked to
    /// have them polled to their end (see [`TaskRun::settle`]), unless something else
    /// already did (the cancel, a retry). Best effort: the jobs' slots lapse on their own.
    async fn park_to_settle(&self, lease: &Lease) {
        let parked = async {
            let state = fold(&self.store.read_stream(lease.task, 1).await?);
            let open = state.open_jobs();
            if open == 0 || !state.status().is_terminal() {
                return Ok(false);
            }
            if state.parked {
                // The cancel parked it until this run's lease would have ended (so that a
                // job this run was submitting gets recorded first): the run is over, so the
                // jobs can be followed now.
                self.store.wake_parked(lease.task).await?;
                return Ok(true);
            }
            let park = Event::TaskParked {
                until: self.store.now(),
                jobs: u32::try_from(open).unwrap_or(u32::MAX),
                waiting: 0,
                schedule: state.poll_schedule(),
            };
            self.store
                .append(
                    lease.task,
                    state.version,
                    lease.fence(),
                    &[NewEvent::new(park)],
                )
                .await?;
            Ok::<_, Error>(true)
        };
        match parked.await {
            Ok(true) => {
                tracing::info!(task = %lease.task, "the task ended with provider jobs open: parked to poll them to their end");
            }
            Ok(false) | Err(Error::Conflict { .. } | Error::LeaseLost { .. }) => {}
            Err(err) => {
                tracing::warn!(task = %lease.task, error = %err, "cannot park the task to settle its open jobs; their slots lapse on their own");
            }
        }
    }

    /// The version that takes the task over, when this worker does not serve the task's own.
    fn upgrade_target(&self, state: &TaskState) -> Option<Arc<Workflow>> {
        let version = state.workflow_version.max(1);
        match self.registry.get_version(&state.workflow, version) {
            Some(_) => None,
            None => self.registry.upgrade_target(&state.workflow, version),
        }
    }

    /// Moves the claimed task to `target` (`task_upgraded`, under the lease), and returns
    /// its state after the move.
    async fn upgrade(
        &self,
        lease: &Lease,
        state: &TaskState,
        target: &Workflow,
    ) -> Result<TaskState> {
        let from = state.workflow_version.max(1);
        let shape = self.store.recorded_shape(&state.workflow, from).await?;
        let mut upgraded =
            target
                .upgrade(state, shape.as_deref())
                .map_err(|reason| Error::UpgradeRefused {
                    task: lease.task,
                    workflow: state.workflow.clone(),
                    from,
                    to: target.version_number(),
                    reason,
                })?;
        if let Event::TaskUpgraded { by, .. } = &mut upgraded {
            *by = Some(lease.worker_id.clone());
        }
        let detail = crate::timeline::describe(&upgraded).unwrap_or_default();
        self.store
            .upgrade_task(
                lease.task,
                state.version,
                lease.fence(),
                NewEvent::new(upgraded),
            )
            .await?;
        tracing::info!(task = %lease.task, workflow = %state.workflow, upgrade = %detail, "task upgraded");
        Ok(fold(&self.store.read_stream(lease.task, 1).await?))
    }

    async fn run_claimed(
        &self,
        lease: &Lease,
        history: Result<Vec<RecordedEvent>>,
        drain: CancellationToken,
        abort: CancellationToken,
    ) -> Result<RunOutcome> {
        let mut state = fold(&history?);
        if let Some(target) = self.upgrade_target(&state) {
            state = self.upgrade(lease, &state, &target).await?;
        }
        if !state.status().is_runnable() || state.cancelled {
            if state.status().is_terminal() && state.open_jobs() > 0 {
                let run = self.task_run(lease, &state, drain, abort)?;
                return run.settle(&state).await;
            }
            return Ok(RunOutcome::NotRunnable(state.status()));
        }
        let run = self.task_run(lease, &state, drain, abort)?;
        if let Err(reason) = run.workflow.check_input(&run.input) {
            let error = StepError::permanent(format!("invalid input: {reason}"));
            return run.fail(state.status(), None, error).await;
        }
        // Claims that end without a failure do not use the attempt budget, so a step that
        // takes its worker down (out of memory, abort) is bounded here instead.
        let claims = lease.attempt.saturating_sub(state.budget_base);
        let limit = run.workflow.task_retry.claim_limit();
        if claims > limit {
            let error = StepError::permanent(format!(
                "claimed {claims} times without finishing (limit {limit}): a step may be taking its worker down"
            ));
            return run.fail(state.status(), None, error).await;
        }
        run.execute(state).await
    }
}

/// One claimed run of one task.
struct TaskRun {
    store: PgStore,
    overrides: Arc<Vec<ProviderLimits>>,
    log: Arc<Log>,
    workflow: Arc<Workflow>,
    channel: ChannelId,
    input: Arc<Value>,
    attempt: u32,
    /// Attempts that gave up on a transient failure since the last operator retry.
    failed_attempts: u32,
    /// Every item completed so far, from the log and this run: what later steps read.
    outputs: std::sync::Mutex<Outputs>,
    /// The signals in the log, with those this run recorded.
    signals: std::sync::Mutex<Vec<SignalRecord>>,
    /// Held while the inbox is read and its new signals recorded (one reader at a time).
    receiving: tokio::sync::Mutex<()>,
    /// Each step's recorded waits in its current run, and where that run began.
    waits: std::collections::HashMap<String, StepWaits>,
    /// No new item or retry starts once this fires.
    drain: CancellationToken,
    /// Abandons items in flight.
    cancel: CancellationToken,
}

/// Whether a call-shaped item got a slot at its provider.
enum CallSlot {
    Granted,
    /// The run is told to stop.
    Stopped,
    /// None within [`PARK_AFTER`]: the task parks.
    NoRoom,
}

/// What an item waiting for room at a provider knows of its run's other items.
#[derive(Clone, Copy)]
struct Room<'a> {
    /// How many of them hold a slot.
    holding: &'a AtomicUsize,
    /// Notified when one releases its slot.
    released: &'a tokio::sync::Notify,
    /// Cancelled once one gave up or parked: no new item starts.
    no_new_items: &'a CancellationToken,
}

/// One of a run's items holds a provider slot (counted while this lives).
struct Holding<'a>(&'a AtomicUsize);

impl<'a> Holding<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Holding(count)
    }
}

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How one call-shaped item's tries ended.
enum ItemEnd {
    /// Its completion, handed to the log (durable once the answer comes).
    Done(HandedOver),
    /// It gave up, or stopped.
    Ended(StepEnd),
}

/// A completion handed to the log, with the record its output becomes once durable.
struct HandedOver {
    answer: Answer,
    record: ItemRecord,
}

/// How running one step's missing items ended.
enum StepEnd {
    Completed,
    GaveUp {
        error: StepError,
        item: u32,
    },
    Stopped,
    /// Every item in flight waits on a job or on room at the provider.
    Parked {
        until: chrono::DateTime<Utc>,
        jobs: u32,
        waiting: u32,
        /// The open jobs' poll schedule, for the next claim.
        schedule: Vec<PollSchedule>,
        /// The key (and its cap) at which items wait for room: a slot freed while the
        /// task was parking must still wake it.
        room: Option<(String, u32)>,
        /// Items waiting for a signal or a time.
        waits: Vec<PendingWait>,
    },
}

/// A step's recorded waits in its current run, and when that run began (what signals it
/// reads: see [`crate::signal_seen_since`]).
#[derive(Clone, Debug, Default)]
struct StepWaits {
    since: u32,
    since_at: Option<chrono::DateTime<Utc>>,
    waits: Vec<WaitRecord>,
}

impl StepWaits {
    fn sees(&self, signal: &SignalRecord) -> bool {
        crate::state::signal_seen_since(signal, self.since, self.since_at)
    }

    /// Whether a signal sent at `sent_at`, recorded from now on, is this run's.
    fn sent_in_run(&self, sent_at: chrono::DateTime<Utc>) -> bool {
        self.since_at.is_none_or(|at| sent_at >= at)
    }
}

/// An item that waits (see [`StepContext::signal`]).
struct PendingWait {
    step: String,
    item: u32,
    wait: WaitFor,
}

impl StepEnd {
    /// Two reasons to park at once: the earlier end, and every wait.
    fn merge_park(self, other: StepEnd) -> StepEnd {
        match (self, other) {
            (
                StepEnd::Parked {
                    until,
                    jobs,
                    waiting,
                    schedule,
                    room,
                    mut waits,
                },
                StepEnd::Parked {
                    until: other_until,
                    room: other_room,
                    waits: other_waits,
                    ..
                },
            ) => {
                waits.extend(other_waits);
                StepEnd::Parked {
                    until: until.min(other_until),
                    jobs,
                    waiting,
                    schedule,
                    room: room.or(other_room),
                    waits,
                }
            }
            (end, _) => end,
        }
    }
}

impl TaskRun {
    async fn execute(&self, state: TaskState) -> Result<RunOutcome> {
        let mut status = state.status();
        for step in self.workflow.steps() {
            let progress = state.step(step.name());
            if progress.is_some_and(|p| p.completed) {
                continue;
            }
            // Opening events go out together, and before the step's (slow) work starts,
            // so followers see the new status at once.
            let shown = step.step_status();
            if status != shown.status {
                self.log.stage(Event::StatusChanged {
                    from: status,
                    to: shown.status,
                    to_display: Some(shown.display.to_string()),
                });
                status = shown.status;
            }
            let span = tracing::info_span!(
                "reel.step",
                reel.step = step.name(),
                reel.attempt = self.attempt,
                reel.items = tracing::field::Empty,
                reel.missing = tracing::field::Empty,
            );
            let ended = match self
                .run_step(step, progress, &span)
                .instrument(span.clone())
                .await?
            {
                Ok(ended) => ended,
                Err(error) => return self.give_up(status, step, error, None).await,
            };
            match ended {
                // Recorded with the next append, which follows at once (the next step's
                // opening, the end of the task, or the failure).
                StepEnd::Completed => self.log.stage(Event::StepCompleted {
                    step: step.name().to_owned(),
                    attempt: self.attempt,
                }),
                StepEnd::GaveUp { error, item } => {
                    return self.give_up(status, step, error, Some(item)).await;
                }
                StepEnd::Stopped => return Ok(RunOutcome::Stopped),
                parked @ StepEnd::Parked { .. } => return self.park(parked, Some(&state)).await,
            }
        }
        self.finish(status).await
    }

    /// Plans `step` (recording the plan if it is new) and runs its missing items. The
    /// inner error: the plan failed, and the step gives up.
    async fn run_step(
        &self,
        step: &Step,
        progress: Option<&StepState>,
        span: &tracing::Span,
    ) -> Result<std::result::Result<StepEnd, StepError>> {
        let plan = Plan {
            task_id: self.log.lease.task,
            attempt: self.attempt,
            input: self.input.clone(),
            outputs: Arc::new(
                self.outputs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .before_step(step.name()),
            ),
        };
        let planned = match plan_guarded(step, &plan) {
            Ok(planned) => planned,
            Err(error) => return Ok(Err(error)),
        };
        if progress.and_then(|p| p.planned) != Some(planned) {
            self.log.stage(Event::StepStarted {
                step: step.name().to_owned(),
                attempt: self.attempt,
                items: planned,
                atomic: step.atomic,
            });
        }
        self.log.append(Vec::new()).await?;
        let missing: Vec<u32> =
            progress.map_or_else(|| (1..=planned).collect(), |p| p.missing_items(planned));
        span.record("reel.items", planned);
        span.record("reel.missing", missing.len());
        Ok(Ok(match &step.work {
            Work::Calls(_) => self.run_items(step, missing).await?,
            Work::Jobs(work) => {
                let jobs = JobRun::new(self, step, work.clone(), progress, missing);
                jobs.run().await?
            }
        }))
    }

    /// Parks the task (see [`StepEnd::Parked`]): the lease goes, the poll schedule goes
    /// into the log, and a task that waits for room looks once more, now that it is
    /// parked, whether a slot freed meanwhile (no release could have woken it before).
    /// Waits not yet recorded (in `state`, the history the run started from) are recorded
    /// with the park, and so are the inbox's signals the log does not hold yet: a waited
    /// one among them makes the task due at once, and one sent after this read makes the
    /// park's own append do so (see `store::signals`).
    async fn park(&self, parked: StepEnd, state: Option<&TaskState>) -> Result<RunOutcome> {
        let StepEnd::Parked {
            until,
            jobs,
            waiting,
            schedule,
            room,
            waits,
        } = parked
        else {
            return Ok(RunOutcome::Stopped);
        };
        let mut until = until;
        // Signals sent since the items looked go in with the park: the append then knows
        // how many the log holds (a signal sent after this read makes the park due at once,
        // see `store::signals`), and one an item waits for means it runs again now.
        let (mut events, received) = if waits.is_empty() {
            (Vec::new(), Vec::new())
        } else {
            self.unrecorded_signals().await?
        };
        // (Signals known before were there for the items to read, or passed over.)
        if waits.iter().any(|w| {
            let window = self.waits.get(&w.step).cloned().unwrap_or_default();
            w.wait.signal.as_deref().is_some_and(|name| {
                received
                    .iter()
                    .any(|s| s.name == name && window.sent_in_run(s.sent_at))
            })
        }) {
            until = self.store.now();
        }
        for pending in &waits {
            let recorded = state.and_then(|s| s.step(&pending.step)).is_some_and(|s| {
                s.waits.iter().any(|w| {
                    w.item == pending.item
                        && w.signal == pending.wait.signal
                        && w.sleep == pending.wait.sleep
                        && w.until == pending.wait.until
                })
            });
            if !recorded {
                events.push(Event::WaitStarted {
                    step: pending.step.clone(),
                    item: pending.item,
                    attempt: self.attempt,
                    signal: pending.wait.signal.clone(),
                    sleep: pending.wait.sleep.clone(),
                    until: pending.wait.until,
                });
            }
        }
        events.push(Event::TaskParked {
            until,
            jobs,
            waiting,
            schedule,
        });
        self.log.append(events).await?;
        if let Some((key, cap)) = &room
            && let Err(err) = self
                .store
                .wake_if_room(key, *cap, self.log.lease.task)
                .await
        {
            tracing::warn!(task = %self.log.lease.task, %key, error = %err, "cannot look for room after parking; a freed slot or the park's end wakes the task");
        }
        let signals: Vec<String> = waits.iter().filter_map(|w| w.wait.signal.clone()).collect();
        if !waits.is_empty() && jobs == 0 && room.is_none() {
            return Ok(RunOutcome::Waiting {
                until: (until < crate::event::no_deadline()).then_some(until),
                signals,
            });
        }
        Ok(RunOutcome::Parked {
            until,
            jobs,
            waiting,
        })
    }

    /// The inbox's signals the log does not hold yet, as the events that record them
    /// (`signal_received`), and the signals themselves.
    async fn unrecorded_signals(&self) -> Result<(Vec<Event>, Vec<crate::store::InboxSignal>)> {
        // Only those sent after the last the log holds are read (by their numbers).
        let (after, known): (u32, std::collections::HashSet<(String, String)>) = {
            let signals = self.signals.lock().unwrap_or_else(|p| p.into_inner());
            (
                signals.iter().filter_map(|s| s.seq).max().unwrap_or(0),
                signals
                    .iter()
                    .map(|s| (s.name.clone(), s.signal_id.clone()))
                    .collect(),
            )
        };
        let new: Vec<_> = self
            .store
            .inbox(self.log.lease.task, after)
            .await?
            .into_iter()
            .filter(|s| !known.contains(&(s.name.clone(), s.signal_id.clone())))
            .collect();
        let events = new
            .iter()
            .map(|s| Event::SignalReceived {
                name: s.name.clone(),
                signal_id: s.signal_id.clone(),
                data: s.data.clone(),
                by: s.by.clone(),
                sent_at: s.sent_at,
                seq: s.seq,
            })
            .collect();
        Ok((events, new))
    }

    /// Reads the task's inbox and records the signals the log does not have yet
    /// (`signal_received`), so that an item reads only what the log holds. True when a
    /// signal called `name`, that a step whose run began at version `since` can see, is
    /// known now and was not when the item looked (it knew the first `seen` signals): the
    /// item runs again to read it. False: the item waits (a signal from before a redo, or
    /// one the item passed over, does not count).
    async fn receive_signal(&self, name: &str, window: &StepWaits, seen: usize) -> Result<bool> {
        let _one_reader = self.receiving.lock().await;
        let visible = |signals: &[SignalRecord]| {
            signals
                .iter()
                .skip(seen)
                .any(|s| s.name == name && window.sees(s))
        };
        if visible(&self.signals.lock().unwrap_or_else(|p| p.into_inner())) {
            // Another item recorded it meanwhile.
            return Ok(true);
        }
        let (events, new) = self.unrecorded_signals().await?;
        if new.is_empty() {
            return Ok(false);
        }
        let end = self.log.append(events).await?;
        let first = end + 1 - new.len() as u32;
        let mut signals = self.signals.lock().unwrap_or_else(|p| p.into_inner());
        for (offset, s) in new.into_iter().enumerate() {
            signals.push(SignalRecord {
                name: s.name,
                signal_id: s.signal_id,
                data: s.data,
                by: s.by,
                sent_at: s.sent_at,
                seq: s.seq,
                version: first + offset as u32,
            });
        }
        Ok(visible(&signals))
    }

    /// Polls the jobs a failed or cancelled task left open to their end, recording what
    /// each made and cost (or how it failed); nothing new is submitted. The task parks
    /// between polls like any other, and is done once no job is open.
    async fn settle(&self, state: &TaskState) -> Result<RunOutcome> {
        // Slots of items that were granted but never submitted go now: only the open jobs
        // still count against their providers' caps.
        let open: Vec<(String, u32)> = state
            .steps
            .iter()
            .flat_map(|s| s.open_jobs.keys().map(|item| (s.name.clone(), *item)))
            .collect();
        self.store
            .keep_only_job_slots(self.log.lease.task, &open)
            .await?;
        for step in self.workflow.steps() {
            let (Work::Jobs(work), Some(progress)) = (&step.work, state.step(step.name())) else {
                continue;
            };
            let orphans = self
                .store
                .orphan_jobs(self.log.lease.task, step.name())
                .await?;
            if progress.open_jobs.is_empty() && orphans.is_empty() {
                continue;
            }
            match JobRun::settling(self, step, work.clone(), progress)
                .run()
                .await?
            {
                StepEnd::Completed | StepEnd::GaveUp { .. } => {}
                StepEnd::Stopped => return Ok(RunOutcome::Stopped),
                parked @ StepEnd::Parked { .. } => return self.park(parked, None).await,
            }
        }
        // Nothing is left to follow: the task no longer waits.
        if !self.store.settled(&self.log.lease).await? {
            return Err(Error::LeaseLost {
                task: self.log.lease.task,
                epoch: self.log.lease.epoch,
            });
        }
        Ok(RunOutcome::NotRunnable(state.status()))
    }

    /// The provider limits that apply to `step`: its defaults, overridden by key.
    fn limits(&self, step: &Step) -> Option<ProviderLimits> {
        let mut limits = step.provider.clone()?;
        if let Some(given) = self.overrides.iter().find(|o| o.key == limits.key) {
            limits.max_in_flight = given.max_in_flight.or(limits.max_in_flight);
            limits.rate = given.rate.or(limits.rate);
        }
        Some(limits)
    }

    /// Waits for a request of `limits`' rate (and for its key's pause to end), unless the
    /// run is told to stop or a sibling gave up. False: stopped. Call-shaped items wait in place (they hold
    /// their worker slot while they run anyway); job steps park instead.
    async fn wait_for_request(
        &self,
        limits: &ProviderLimits,
        no_new_items: &CancellationToken,
    ) -> Result<bool> {
        loop {
            if no_new_items.is_cancelled() {
                return Ok(false);
            }
            match self.store.take_request(&limits.key, limits.rate).await? {
                None => return Ok(!no_new_items.is_cancelled()),
                Some(wait) => {
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = no_new_items.cancelled() => return Ok(false),
                        () = self.drain.cancelled() => return Ok(false),
                        () = self.cancel.cancelled() => return Ok(false),
                    }
                }
            }
        }
    }

    /// A provider said when to come back: pause its key for every worker until then.
    async fn respect_retry_after(&self, step: &Step, error: &StepError) {
        let (Some(limits), Some(wait)) = (self.limits(step), error.retry_after) else {
            return;
        };
        tracing::info!(key = %limits.key, ?wait, "provider asked to retry later: pausing its key");
        if let Err(err) = self.store.pause_provider(&limits.key, wait).await {
            tracing::warn!(key = %limits.key, error = %err, "cannot record the provider's pause");
        }
    }

    /// Takes a slot of `limits` for a call-shaped item, waiting in place for one at most
    /// [`PARK_AFTER`] while none of the step's items in this run holds one (`holding`):
    /// past that the task parks instead of holding its worker slot (the slots may be held
    /// by parked tasks that need a worker to see their jobs end). While a sibling holds
    /// one, the run is busy anyway, and the item waits for room in place.
    async fn acquire_call_slot(
        &self,
        limits: &ProviderLimits,
        step: &Step,
        item: u32,
        room: Room<'_>,
    ) -> Result<CallSlot> {
        let Some(cap) = limits.max_in_flight else {
            return Ok(CallSlot::Granted);
        };
        let owner = SlotOwner {
            task: self.log.lease.task,
            step: step.name(),
            holder: &self.log.lease.worker_id,
        };
        let started = Instant::now();
        let mut wait = Duration::from_millis(20);
        loop {
            let granted = self
                .store
                .acquire_slots(&limits.key, cap, owner, &[item], SLOT_TTL)
                .await?;
            if room.no_new_items.is_cancelled() {
                // A sibling gave up (or the run stops): no new call starts. A slot just
                // granted is settled with the run (see `run_items`).
                return Ok(CallSlot::Stopped);
            }
            if !granted.is_empty() {
                return Ok(CallSlot::Granted);
            }
            let siblings_hold = room.holding.load(Ordering::Acquire) > 0;
            if started.elapsed() >= PARK_AFTER && !siblings_hold {
                return Ok(CallSlot::NoRoom);
            }
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = room.released.notified() => {}
                () = room.no_new_items.cancelled() => return Ok(CallSlot::Stopped),
                () = self.drain.cancelled() => return Ok(CallSlot::Stopped),
                () = self.cancel.cancelled() => return Ok(CallSlot::Stopped),
            }
            // While siblings hold slots, their releases wake this item; other tasks'
            // releases are looked for at most once a second (each look locks the key).
            let longest = if siblings_hold {
                Duration::from_secs(1)
            } else {
                Duration::from_millis(250)
            };
            wait = (wait * 2).min(longest);
        }
    }

    /// A call step's items found no room at `limits`' key: the task parks until a freed
    /// slot wakes it (or the next lapse of one, at the latest [`jobs::ROOM_WAIT_MAX`]).
    async fn park_for_room(&self, limits: &ProviderLimits, waiting: u32) -> Result<StepEnd> {
        let fallback =
            self.store.now() + chrono::Duration::from_std(jobs::ROOM_WAIT_MAX).unwrap_or_default();
        let until = match self.store.next_lapse(&limits.key).await? {
            Some(lapse) => lapse.min(fallback),
            None => fallback,
        };
        Ok(StepEnd::Parked {
            until,
            jobs: 0,
            waiting,
            schedule: Vec::new(),
            room: limits
                .max_in_flight
                .map(|cap| (limits.key.to_string(), cap)),
            waits: Vec::new(),
        })
    }

    /// Every step is done: the task waits for its review, or is complete.
    async fn finish(&self, status: TaskStatus) -> Result<RunOutcome> {
        if self.workflow.has_review() {
            self.log
                .append(vec![
                    Event::status_changed(status, TaskStatus::FINAL_REVIEW),
                    Event::ReviewRequested {},
                ])
                .await?;
            return Ok(RunOutcome::AwaitingReview);
        }
        self.log
            .append(vec![
                Event::status_changed(status, TaskStatus::COMPLETED),
                Event::TaskCompleted {},
            ])
            .await?;
        Ok(RunOutcome::Completed)
    }

    /// Runs `missing` items with the step's concurrency. After the first item that gives
    /// up, no new item starts; items in flight finish and are recorded.
    ///
    /// An item's slot frees once its completion is durable; a pipelined step's (see
    /// [`Step::pipelined`]) once it is handed to the log, so the next item starts while
    /// the append is in flight and completions that arrive meanwhile share the next commit
    /// (see [`Log`]). Either way, completions of items running at once share commits, the
    /// step ends only when every completion is durable, and no item starts while too many
    /// wait or an append retries.
    async fn run_items(&self, step: &Step, missing: Vec<u32>) -> Result<StepEnd> {
        let no_new_items = CancellationToken::new();
        // What this step's items read: the earlier steps' completions (never this step's
        // own, which a resumed run would see and an uninterrupted one would not).
        let outputs = Arc::new(
            self.outputs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .before_step(step.name()),
        );
        let planned = missing.len();
        let mut completed = 0;
        // This run's items holding a provider slot: while one does, the others wait in
        // place for room instead of parking the task.
        let holding = AtomicUsize::new(0);
        // A slot an item releases: the siblings waiting for room look again at once.
        let released = tokio::sync::Notify::new();
        let mut items = futures_util::stream::iter(missing)
            .map(|item| {
                let span = item_span(step, item, self.attempt);
                let run = self.run_item(
                    step,
                    item,
                    outputs.clone(),
                    no_new_items.clone(),
                    &holding,
                    &released,
                );
                async move {
                    let ended = run.await;
                    record_item_end(&tracing::Span::current(), &ended);
                    ended
                }
                .instrument(span)
            })
            .buffer_unordered(step.width(self.limits(step).as_ref()));
        let mut recording = futures_util::stream::FuturesUnordered::new();
        let mut items_left = true;
        let mut end = StepEnd::Completed;
        let mut store_error = None;
        loop {
            let ended = tokio::select! {
                ended = items.next(), if items_left => match ended {
                    Some(ended) => ended,
                    None => {
                        items_left = false;
                        continue;
                    }
                },
                Some(recorded) = recording.next(), if !recording.is_empty() => match recorded {
                    Ok(()) => continue,
                    Err(err) => Err(err),
                },
                else => break,
            };
            // What the step's end is, by precedence: a give-up, then a park for room (the
            // items stopped after it wait too), then a stop.
            match ended {
                Ok(ItemEnd::Done(done)) => {
                    completed += 1;
                    recording.push(self.record(step, done));
                }
                Ok(ItemEnd::Ended(StepEnd::Completed)) => completed += 1,
                Ok(ItemEnd::Ended(gave_up @ StepEnd::GaveUp { .. })) => {
                    no_new_items.cancel();
                    if !matches!(end, StepEnd::GaveUp { .. }) {
                        end = gave_up;
                    }
                }
                Ok(ItemEnd::Ended(parked @ StepEnd::Parked { .. })) => {
                    no_new_items.cancel();
                    end = match end {
                        StepEnd::Completed | StepEnd::Stopped => parked,
                        current @ StepEnd::Parked { .. } => current.merge_park(parked),
                        gave_up => gave_up,
                    };
                }
                Ok(ItemEnd::Ended(StepEnd::Stopped)) => {
                    no_new_items.cancel();
                    if matches!(end, StepEnd::Completed) {
                        end = StepEnd::Stopped;
                    }
                }
                Err(err) => {
                    no_new_items.cancel();
                    store_error.get_or_insert(err);
                }
            }
        }
        // Every item of the run has ended (an abort may have cut a call off, whose slot
        // then lapses as before; a drain lets calls finish): a slot a sibling's look for
        // room granted to an item that had stopped waiting must not stay held, least of
        // all through a park. A run that lost the task leaves the slots to the new owner.
        let lost = matches!(store_error, Some(Error::LeaseLost { .. }));
        if let Some(limits) = self.limits(step)
            && let Some(cap) = limits.max_in_flight
            && !self.cancel.is_cancelled()
            && !lost
        {
            let parked_for_room = matches!(end, StepEnd::Parked { room: Some(_), .. });
            let settled = self
                .store
                .settle_call_slots(
                    &limits.key,
                    cap,
                    self.log.lease.task,
                    step.name(),
                    &self.log.lease.worker_id,
                    parked_for_room,
                )
                .await;
            if let Err(err) = settled {
                // Every completion is durable; the rows lapse on their own (SLOT_TTL).
                tracing::warn!(step = step.name(), error = %err, "cannot settle the step's provider slots; they lapse on their own");
            }
        }
        if let StepEnd::Parked {
            waiting,
            room: Some(_),
            waits,
            ..
        } = &mut end
        {
            // The items not done wait for room, but for those that wait for a signal or
            // a time.
            let left = (planned - completed).saturating_sub(waits.len());
            *waiting = u32::try_from(left).unwrap_or(u32::MAX);
        }
        match store_error {
            Some(err) => Err(err),
            None => Ok(end),
        }
    }

    /// Tries one item up to the step's policy, recording each outcome; a pipelined step's
    /// completion is returned handed over, not yet durable. A refusal that says when to
    /// come back (a 429's Retry-After) is recorded but uses no try.
    async fn run_item(
        &self,
        step: &Step,
        item: u32,
        outputs: Arc<Outputs>,
        no_new_items: CancellationToken,
        holding: &AtomicUsize,
        released: &tokio::sync::Notify,
    ) -> Result<ItemEnd> {
        let policy = step.retry;
        let mut try_number = 0;
        let mut refusals = 0;
        while try_number < policy.max_tries.max(1) {
            try_number += 1;
            tokio::select! {
                () = self.log.room() => {}
                () = no_new_items.cancelled() => {}
                () = self.drain.cancelled() => {}
                () = self.cancel.cancelled() => {}
            }
            if no_new_items.is_cancelled()
                || self.drain.is_cancelled()
                || self.cancel.is_cancelled()
            {
                return Ok(ItemEnd::Ended(StepEnd::Stopped));
            }
            let limits = self.limits(step);
            let mut held = None;
            if let Some(limits) = &limits {
                let room = Room {
                    holding,
                    released,
                    no_new_items: &no_new_items,
                };
                match self.acquire_call_slot(limits, step, item, room).await? {
                    CallSlot::Granted => held = Some(Holding::new(holding)),
                    CallSlot::Stopped => return Ok(ItemEnd::Ended(StepEnd::Stopped)),
                    CallSlot::NoRoom => {
                        return Ok(ItemEnd::Ended(self.park_for_room(limits, 1).await?));
                    }
                }
                if !self.wait_for_request(limits, &no_new_items).await? {
                    return Ok(ItemEnd::Ended(StepEnd::Stopped));
                }
            }
            let seen_signals = self.signals.lock().unwrap_or_else(|p| p.into_inner()).len();
            let ctx = self.context(step, item, try_number, outputs.clone());
            let started = Instant::now();
            let item_cancel = ctx.cancel.clone();
            let result = tokio::select! {
                result = run_guarded(step, ctx, item) => result,
                () = self.cancel.cancelled() => return Ok(ItemEnd::Ended(StepEnd::Stopped)),
                () = sleep_or_never(step.timeout) => {
                    item_cancel.cancel();
                    Err(StepError::transient(format!(
                        "timed out after {}",
                        humanize(step.timeout.unwrap_or_default())
                    )))
                }
            };
            if let Some(cap) = limits.as_ref().and_then(|l| l.max_in_flight) {
                let key = limits.as_ref().map(|l| l.key.clone()).unwrap_or_default();
                self.store
                    .release_slot(&key, cap, self.log.lease.task, step.name(), item)
                    .await?;
                released.notify_waiters();
            }
            drop(held);
            let result = result.and_then(|output| match output.unstorable() {
                Some(reason) => Err(StepError::permanent(reason)),
                None => Ok(output),
            });
            let error = match result {
                Ok(output) => {
                    let duration_ms =
                        u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                    let done = self.hand_over_completion(step, item, output, duration_ms);
                    if step.pipelined {
                        return Ok(ItemEnd::Done(done));
                    }
                    self.record(step, done).await?;
                    return Ok(ItemEnd::Ended(StepEnd::Completed));
                }
                Err(error) => error,
            };
            if let Some(wait) = error.waiting.clone() {
                let window = self.waits.get(step.name()).cloned().unwrap_or_default();
                if let Some(signal) = &wait.signal
                    && self.receive_signal(signal, &window, seen_signals).await?
                {
                    // It came while the task was parked or running: run the item again
                    // (no try used), now that the log holds it.
                    try_number -= 1;
                    continue;
                }
                let until = wait.until.unwrap_or_else(crate::event::no_deadline);
                return Ok(ItemEnd::Ended(StepEnd::Parked {
                    until,
                    jobs: 0,
                    waiting: 0,
                    schedule: Vec::new(),
                    room: None,
                    waits: vec![PendingWait {
                        step: step.name().to_owned(),
                        item,
                        wait,
                    }],
                }));
            }
            let span = tracing::Span::current();
            span.record("reel.tries", try_number);
            span.record("reel.error", error.message.as_str());
            self.respect_retry_after(step, &error).await;
            let rate_limited = error.retry_after.is_some() && !error.unanswered;
            self.log
                .append(vec![Event::ItemFailed {
                    step: step.name().to_owned(),
                    item,
                    attempt: self.attempt,
                    kind: error.kind,
                    error: error.message.clone(),
                    retry: try_number,
                    // A call has no submission to keep open: a lost answer is a failure.
                    unanswered: false,
                    retry_after_ms: error
                        .retry_after
                        .map(|wait| u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)),
                }])
                .await?;
            if rate_limited && error.kind == FailureKind::Transient {
                refusals += 1;
                if refusals <= jobs::FREE_RATE_REFUSALS {
                    try_number -= 1;
                }
            }
            if error.kind == FailureKind::Permanent || try_number >= policy.max_tries {
                return Ok(ItemEnd::Ended(StepEnd::GaveUp { error, item }));
            }
            let delay = policy
                .backoff
                .delay(try_number.max(1), rand::random::<f64>())
                .max(error.retry_after.unwrap_or_default())
                .max(jobs::rate_refusal_wait(refusals));
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.drain.cancelled() => return Ok(ItemEnd::Ended(StepEnd::Stopped)),
                () = self.cancel.cancelled() => return Ok(ItemEnd::Ended(StepEnd::Stopped)),
            }
        }
        Ok(ItemEnd::Ended(StepEnd::Stopped))
    }

    /// Records an item's completion, and keeps its output for the steps that follow.
    async fn complete(
        &self,
        step: &Step,
        item: u32,
        output: ItemOutput,
        duration_ms: u64,
    ) -> Result<()> {
        let done = self.hand_over_completion(step, item, output, duration_ms);
        self.record(step, done).await
    }

    /// Hands an item's completion to the log; [`TaskRun::record`] waits for it.
    fn hand_over_completion(
        &self,
        step: &Step,
        item: u32,
        output: ItemOutput,
        duration_ms: u64,
    ) -> HandedOver {
        let ItemOutput {
            artifact,
            cost_micros,
            output,
        } = output;
        let answer = self.log.hand_over(vec![Event::ItemCompleted {
            step: step.name().to_owned(),
            item,
            attempt: self.attempt,
            artifact: artifact.clone(),
            cost_micros,
            duration_ms,
            output: output.clone(),
        }]);
        HandedOver {
            answer,
            record: ItemRecord {
                item,
                attempt: self.attempt,
                artifact,
                cost_micros,
                duration_ms,
                version: 0,
                output,
            },
        }
    }

    /// Waits until a handed-over completion is durable, then keeps its output for the
    /// steps that follow.
    async fn record(&self, step: &Step, done: HandedOver) -> Result<()> {
        let HandedOver { answer, mut record } = done;
        record.version = self.log.written_up_to(answer).await?;
        self.outputs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(step.name(), record);
        Ok(())
    }

    fn context(
        &self,
        step: &Step,
        item: u32,
        try_number: u32,
        outputs: Arc<Outputs>,
    ) -> StepContext {
        let window = self.waits.get(step.name()).cloned().unwrap_or_default();
        let signals = self
            .signals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|s| window.sees(s))
            .cloned()
            .collect();
        let waits = window.waits;
        let store = self.store.clone();
        StepContext {
            task_id: self.log.lease.task,
            channel_id: self.channel.clone(),
            workflow: Arc::from(self.workflow.name()),
            step: step.name.clone(),
            attempt: self.attempt,
            try_number,
            item,
            input: self.input.clone(),
            outputs,
            cancel: self.cancel.child_token(),
            waits: Arc::new(WaitView {
                signals,
                waits,
                clock: Arc::new(move || store.now()),
            }),
        }
    }

    /// Ends the attempt after a failure: a permanent error or the last allowed attempt
    /// fails the task; a transient one schedules the next attempt.
    async fn give_up(
        &self,
        status: TaskStatus,
        step: &Step,
        error: StepError,
        item: Option<u32>,
    ) -> Result<RunOutcome> {
        let policy = self.workflow.task_retry;
        // This failure is the attempt budget's next one.
        let failures = self.failed_attempts + 1;
        if error.kind == FailureKind::Transient && failures < policy.max_attempts {
            let delay = policy.backoff.random_delay(failures);
            let next_run_at = self.store.now()
                + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
            let reason = describe(step, item, &error.message);
            self.log
                .append(vec![
                    Event::RetryScheduled {
                        attempt: self.attempt,
                        next_run_at,
                        reason,
                    },
                    Event::status_changed(status, TaskStatus::RETRY_SCHEDULED),
                ])
                .await?;
            return Ok(RunOutcome::RetryScheduled { next_run_at });
        }
        let error = match error.kind {
            FailureKind::Permanent => StepError {
                message: describe(step, item, &error.message),
                ..error
            },
            FailureKind::Transient => StepError {
                message: format!(
                    "gave up after {failures} attempts: {}",
                    describe(step, item, &error.message)
                ),
                ..error
            },
        };
        self.fail(status, Some((step, item)), error).await
    }

    /// Fails the task for good with `error`'s message as the reason.
    async fn fail(
        &self,
        status: TaskStatus,
        at: Option<(&Step, Option<u32>)>,
        error: StepError,
    ) -> Result<RunOutcome> {
        let reason = error.message;
        self.log
            .append(vec![
                Event::TaskFailed {
                    reason: reason.clone(),
                    step: at.map(|(step, _)| step.name().to_owned()),
                    item: at.and_then(|(_, item)| item),
                },
                Event::status_changed(status, TaskStatus::FAILED),
            ])
            .await?;
        Ok(RunOutcome::Failed { reason })
    }
}

/// Plans a step's items. A panicking plan is a permanent error (planning is a pure function
/// of the input: it would panic again), and an atomic step plans exactly one item — it is
/// one unit of work that a failure re-runs whole.
/// Sleeps for `limit`, or forever without one.
async fn sleep_or_never(limit: Option<Duration>) {
    match limit {
        Some(limit) => tokio::time::sleep(limit).await,
        None => std::future::pending().await,
    }
}

/// A duration as people write it: `1.5s`, `250ms`.
fn humanize(duration: Duration) -> String {
    if duration >= Duration::from_secs(1) {
        format!("{}s", duration.as_secs_f64())
    } else {
        format!("{}ms", duration.as_millis())
    }
}

/// The span of one item of a call step: its tries, and how it ended.
fn item_span(step: &Step, item: u32, attempt: u32) -> tracing::Span {
    tracing::info_span!(
        "reel.item",
        reel.step = step.name(),
        reel.item = item,
        reel.attempt = attempt,
        reel.tries = tracing::field::Empty,
        reel.outcome = tracing::field::Empty,
        reel.error_kind = tracing::field::Empty,
        reel.error = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    )
}

/// Records how an item ended on its span.
fn record_item_end(span: &tracing::Span, ended: &Result<ItemEnd>) {
    let outcome = match ended {
        Ok(ItemEnd::Done(_) | ItemEnd::Ended(StepEnd::Completed)) => "completed",
        Ok(ItemEnd::Ended(StepEnd::GaveUp { error, .. })) => {
            let kind = match error.kind {
                FailureKind::Transient => "transient",
                FailureKind::Permanent => "permanent",
            };
            span.record("reel.error_kind", kind);
            span.record("reel.error", error.message.as_str());
            span.record("otel.status_code", "ERROR");
            "gave_up"
        }
        Ok(ItemEnd::Ended(StepEnd::Parked { .. })) => "parked",
        Ok(ItemEnd::Ended(StepEnd::Stopped)) => "stopped",
        Err(err) => {
            span.record("reel.error", tracing::field::display(err));
            span.record("otel.status_code", "ERROR");
            "error"
        }
    };
    span.record("reel.outcome", outcome);
}

fn plan_guarded(step: &Step, plan: &Plan) -> std::result::Result<u32, StepError> {
    let planned = std::panic::catch_unwind(AssertUnwindSafe(|| step.work.plan(plan)))
        .unwrap_or_else(|panic| {
            Err(StepError::permanent(format!(
                "planning panicked: {}",
                panic_message(panic.as_ref())
            )))
        })?;
    if step.atomic && planned != 1 {
        return Err(StepError::permanent(format!(
            "an atomic step plans exactly one item, not {planned}"
        )));
    }
    Ok(planned)
}

/// Runs one item's code. A panic becomes a transient failure that the retry policies
/// bound, so a buggy step can neither take its worker down nor leave its task behind.
async fn run_guarded(
    step: &Step,
    ctx: StepContext,
    item: u32,
) -> std::result::Result<ItemOutput, StepError> {
    let Work::Calls(work) = &step.work else {
        return Err(StepError::permanent("a job step's item was run as a call"));
    };
    guarded(|| work.run(ctx, item)).await
}

/// Runs a step's code (a call, a submit, a poll); a panic is a transient failure that the
/// retry policies bound, so a buggy step can neither take its worker down nor leave its
/// task behind.
async fn guarded<T>(
    start: impl FnOnce() -> crate::workflow::BoxFuture<std::result::Result<T, StepError>>,
) -> std::result::Result<T, StepError> {
    let started = std::panic::catch_unwind(AssertUnwindSafe(start));
    let finished = match started {
        Ok(work) => AssertUnwindSafe(work).catch_unwind().await,
        Err(panic) => Err(panic),
    };
    finished.unwrap_or_else(|panic| {
        Err(StepError::transient(format!(
            "the step panicked: {}",
            panic_message(panic.as_ref())
        )))
    })
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

fn describe(step: &Step, item: Option<u32>, message: &str) -> String {
    match item {
        Some(item) if !step.atomic => format!("{} item {item}: {message}", step.name()),
        _ => format!("{}: {message}", step.name()),
    }
}
