//! The worker: claims runnable tasks and runs them, many at once, until told to stop.
//!
//! Workers coordinate only through PostgreSQL: a claim is a `FOR UPDATE SKIP LOCKED` pick
//! that bumps the task's lease epoch, a heartbeat extends the lease while the task runs,
//! and every append is fenced by the epoch. A crashed worker's leases expire and another
//! worker resumes its tasks by replay; a worker restarted with the same id reclaims its
//! own leases at once.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::id::TaskId;
use crate::orchestrator::{Orchestrator, RunOutcome, SLOT_TTL};
use crate::status::TaskStatus;
use crate::store::{Lease, PgStore, WakeUps};
use crate::workflow::{Backoff, ProviderLimits, Registry, WorkflowVersion};

/// Waits after a failed claim while the database is unreachable: 100 ms doubling to 10 s.
const OUTAGE_BACKOFF: Backoff =
    Backoff::exponential(Duration::from_millis(100), Duration::from_secs(10));

/// How long a worker that runs until idle waits out an outage (claims or counts failing
/// because PostgreSQL cannot be reached) before it gives up with the error: long enough
/// for a server restart, short enough that a script learns something is wrong. A
/// statement the server refuses outright ends it at once. A long-running worker waits for
/// as long as it takes.
pub const UNTIL_IDLE_OUTAGE_LIMIT: Duration = Duration::from_secs(60);

/// How a worker behaves.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// Unique per process; a restart with the same id reclaims that process's leases.
    pub worker_id: String,
    /// Tasks run at once.
    pub concurrency: usize,
    /// How long a claim (or heartbeat) holds a task.
    pub lease_ttl: Duration,
    /// How often running tasks' leases are extended (well under `lease_ttl`).
    pub heartbeat_interval: Duration,
    /// The longest wait between looks for work when no notification arrives.
    pub poll_interval: Duration,
    /// After shutdown is requested: how long items in flight may take to finish before
    /// they are abandoned (and their tasks released for another worker).
    pub shutdown_grace: Duration,
    /// Return once no task is queued, running, parked or scheduled for retry (and keep
    /// every attempt's outcome in the report). A task waiting for a signal without a
    /// deadline waits for a person, as one in review does: it does not keep the worker.
    pub until_idle: bool,
    /// Provider limits that replace the workflows' defaults, by key (a field set here wins).
    pub provider_limits: Vec<ProviderLimits>,
    /// Refuse to start (with [`Error::ShapeChanged`]) when a workflow version's shape here
    /// differs from the one first recorded for it; otherwise a warning says what changed.
    pub strict_versions: bool,
    /// How often the worker warns while tasks of its workflows are stranded (of a version
    /// no live worker claims); the first look comes one heartbeat after start.
    pub stranded_warning_interval: Duration,
    /// Where the worker counts its claims, runs, items and appends (see
    /// [`crate::metrics::Metrics`]); `None`: nowhere.
    pub metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
}

impl WorkerOptions {
    /// The longest worker id (it is stored, and indexed, as the lease owner).
    pub const WORKER_ID_MAX_CHARS: usize = 200;

    /// Defaults for a worker called `worker_id`.
    pub fn new(worker_id: impl Into<String>) -> Self {
        WorkerOptions {
            worker_id: worker_id.into(),
            concurrency: 4,
            lease_ttl: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(10),
            poll_interval: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(30),
            until_idle: false,
            provider_limits: Vec::new(),
            strict_versions: false,
            stranded_warning_interval: Duration::from_secs(300),
            metrics: None,
        }
    }
}

/// The provider limits a worker applies, by key: its workflows' defaults (the tightest
/// where steps share a key), then its overrides (`--max-in-flight`, `--rate`).
fn effective_limits(
    registry: &Registry,
    overrides: &[ProviderLimits],
) -> std::collections::BTreeMap<String, ProviderLimits> {
    let mut limits = registry.providers();
    for given in overrides {
        let known = limits
            .entry(given.key.to_string())
            .or_insert_with(|| ProviderLimits::new(&given.key));
        known.max_in_flight = given.max_in_flight.or(known.max_in_flight);
        known.rate = given.rate.or(known.rate);
    }
    limits
}

/// A worker's presence: a heartbeat that says which versions it claims (see
/// [`PgStore::worker_beat`]), and a warning while tasks of its workflows are stranded.
#[derive(Clone, Debug)]
struct Presence {
    store: PgStore,
    worker_id: String,
    claims: Vec<WorkflowVersion>,
    /// The provider limits this worker applies, published with each beat.
    providers: Vec<ProviderLimits>,
    /// The workflows whose stranded tasks this worker warns about.
    workflows: Vec<String>,
    heartbeat: Duration,
    warn_every: Duration,
}

impl Presence {
    /// Beats every heartbeat until `stop`, then removes the worker's row. A beat missed
    /// (the database away) is tried again at the next; the worker goes on meanwhile.
    async fn run(self, stop: CancellationToken) {
        // Two beats per heartbeat interval, each good for one interval: a worker that dies
        // counts as gone within one heartbeat interval, and one late beat is tolerated.
        let ttl = self.heartbeat;
        let every = self.heartbeat / 2;
        let mut next_warning = Instant::now() + self.heartbeat;
        let mut failing = false;
        loop {
            let beat_at = tokio::time::Instant::now();
            match self
                .store
                .worker_beat(&self.worker_id, &self.claims, &self.providers, ttl)
                .await
            {
                Ok(()) => failing = false,
                // Once per streak: while the database is away, the claims say so too.
                Err(err) if !std::mem::replace(&mut failing, true) => {
                    tracing::warn!(worker = %self.worker_id, error = %err, "cannot say this worker is alive: other workers may list its versions' tasks as stranded");
                }
                Err(_) => {}
            }
            if Instant::now() >= next_warning {
                // Apart from the beats: a slow count must not make this worker look gone.
                let presence = self.clone();
                tokio::spawn(async move { presence.warn_if_stranded().await });
                next_warning = Instant::now() + self.warn_every;
            }
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep_until(beat_at + every) => {}
            }
        }
        if let Err(err) = self.store.worker_left(&self.worker_id).await {
            tracing::debug!(worker = %self.worker_id, error = %err, "cannot remove this worker's presence; it expires on its own");
        }
    }

    /// Warns, once per stranded version of this worker's workflows, with the count.
    async fn warn_if_stranded(&self) {
        match self.store.stranded().await {
            Ok(stranded) => {
                for group in stranded
                    .iter()
                    .filter(|s| self.workflows.contains(&s.workflow))
                {
                    tracing::warn!(
                        worker = %self.worker_id, workflow = %group.workflow, version = group.version, tasks = group.tasks,
                        "{} task(s) of {} v{} are stranded: no live worker serves or accepts v{}, or the workers that claimed them set them aside (reel tasks --stranded shows why; reel upgrade TASK --to-version N)",
                        group.tasks, group.workflow, group.version, group.version
                    );
                }
            }
            Err(err) => {
                tracing::warn!(worker = %self.worker_id, error = %err, "cannot look for stranded tasks")
            }
        }
    }
}

/// One claimed run of a task, and how it ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Attempt {
    pub task: TaskId,
    /// The task attempt this run was (1 = the first claim).
    pub attempt: u32,
    /// How the run ended, or why it broke off (a lost lease, a database error).
    pub outcome: std::result::Result<RunOutcome, String>,
}

/// What a worker did before it returned.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WorkerReport {
    pub claimed: u64,
    pub awaiting_review: u64,
    /// Runs that finished a task of a workflow without a review gate.
    pub completed: u64,
    pub rescheduled: u64,
    pub failed: u64,
    /// Runs that stopped early (shutdown, lost lease, conflicts, errors).
    pub stopped: u64,
    /// Tasks released because this build cannot read their history (see
    /// [`RunOutcome::SetAside`]).
    pub set_aside: u64,
    /// Runs that parked their task to wait on provider jobs (see [`RunOutcome::Parked`]).
    pub parked: u64,
    /// Runs that parked their task to wait for a signal or a time (see
    /// [`RunOutcome::Waiting`]).
    pub waiting: u64,
    /// Every run, in the order they ended — kept only by a worker that runs until idle (a
    /// long-running worker would hold them forever).
    pub attempts: Vec<Attempt>,
}

/// A worker process's engine: options → service → `run(shutdown)`.
#[derive(Debug)]
pub struct Worker {
    store: PgStore,
    orchestrator: Orchestrator,
    /// Only tasks of these workflow versions are claimed: those served, and the older ones
    /// a served version takes over.
    served: Vec<WorkflowVersion>,
    /// The workflow versions served, whose shapes are recorded at start.
    registry: Registry,
    options: WorkerOptions,
}

impl Worker {
    /// A worker over `store` running the workflows of `registry`.
    pub fn new(store: PgStore, registry: Registry, options: WorkerOptions) -> Self {
        let served = registry.claimable();
        let mut orchestrator = Orchestrator::new(store.clone(), registry.clone())
            .with_provider_limits(options.provider_limits.clone());
        if let Some(metrics) = &options.metrics {
            orchestrator = orchestrator.with_metrics(metrics.clone());
            metrics.set_caps(
                effective_limits(&registry, &options.provider_limits)
                    .into_values()
                    .filter_map(|limits| Some((limits.key.to_string(), limits.max_in_flight?))),
            );
        }
        Worker {
            store,
            orchestrator,
            served,
            registry,
            options,
        }
    }

    /// Runs tasks in this process until nothing is queued, running or scheduled for retry
    /// among this worker's workflows, then returns what each attempt did: how a program, an
    /// example or a test runs its workflows without writing a claim loop.
    pub async fn run_until_idle(mut self) -> Result<WorkerReport> {
        self.options.until_idle = true;
        self.run(CancellationToken::new()).await
    }

    /// Claims and runs tasks until `shutdown` fires (or, with `until_idle`, until there is
    /// nothing left to do). On shutdown it stops claiming, lets items in flight finish for
    /// up to the grace period, abandons the rest, and releases every lease it holds.
    pub async fn run(self, shutdown: CancellationToken) -> Result<WorkerReport> {
        let id = &self.options.worker_id;
        if id.is_empty() || id.chars().count() > WorkerOptions::WORKER_ID_MAX_CHARS {
            return Err(Error::InvalidInput(format!(
                "a worker id is 1 to {} characters",
                WorkerOptions::WORKER_ID_MAX_CHARS
            )));
        }
        // Each served version's shape: recorded, and checked against the one first recorded.
        let Some(changes) = self.record_versions(&shutdown).await? else {
            return Ok(WorkerReport::default());
        };
        if self.options.strict_versions && !changes.is_empty() {
            return Err(Error::ShapeChanged(changes));
        }
        for change in &changes {
            tracing::warn!(worker = %id, workflow = %change.workflow, version = change.version, "{change}");
        }
        let presence = Presence {
            store: self.store.clone(),
            worker_id: id.clone(),
            claims: self.served.clone(),
            providers: effective_limits(&self.registry, &self.options.provider_limits)
                .into_values()
                .collect(),
            workflows: self.registry.names(),
            heartbeat: self.options.heartbeat_interval,
            warn_every: self.options.stranded_warning_interval,
        };
        let present = CancellationToken::new();
        let beating = tokio::spawn(presence.clone().run(present.clone()));
        let served = self.serve(shutdown).await;
        present.cancel();
        let _ = beating.await;
        if self.options.until_idle && served.is_ok() {
            presence.warn_if_stranded().await;
        }
        served
    }

    /// The claim loop of [`Worker::run`].
    async fn serve(&self, shutdown: CancellationToken) -> Result<WorkerReport> {
        let drain = shutdown.child_token();
        let abort = CancellationToken::new();
        let mut running: JoinSet<(Lease, Result<RunOutcome>)> = JoinSet::new();
        let mut in_flight = InFlight::default();
        let mut report = WorkerReport::default();
        if self.store.session_pool().is_none() {
            tracing::info!(worker = %self.options.worker_id, poll = ?self.options.poll_interval, "no session for LISTEN (a transaction pooler without REEL_DIRECT_DATABASE_URL): looking for work every poll interval");
        }
        let mut wake_ups = WakeUps::start(self.store.session_pool().cloned()).await;
        let mut outages = 0;
        let mut outage_since: Option<Instant> = None;
        // When tasks this worker parked are due again: look for work then, not a poll later.
        let mut due_parked = std::collections::BTreeSet::new();
        match self.store.sync_clock().await {
            Ok(offset) if offset.num_milliseconds().abs() >= 1000 => {
                tracing::warn!(worker = %self.options.worker_id, offset_ms = offset.num_milliseconds(), "this machine's clock is off the database's; the worker keeps time by the database's");
            }
            Ok(_) => {}
            // Claims measure it too; a database that does not answer yet is retried below.
            Err(err) => tracing::debug!(error = %err, "cannot read the database's clock yet"),
        }

        while !shutdown.is_cancelled() {
            match self
                .fill(&mut running, &mut in_flight, &drain, &abort)
                .await
            {
                Ok(claimed) => {
                    report.claimed += claimed;
                    outages = 0;
                    outage_since = None;
                }
                Err(err) => {
                    if self.gives_up_on(&err, *outage_since.get_or_insert_with(Instant::now)) {
                        tracing::error!(worker = %self.options.worker_id, error = %err, "cannot claim: giving up");
                        self.drain(running, in_flight, report, abort).await?;
                        return Err(err);
                    }
                    outages += 1;
                    let wait = OUTAGE_BACKOFF.delay(outages, 0.5);
                    tracing::warn!(worker = %self.options.worker_id, error = %err, ?wait, "cannot claim; retrying");
                    sleep_or(wait, &shutdown).await;
                    continue;
                }
            }
            if self.options.until_idle && running.is_empty() {
                match self
                    .store
                    .unfinished_tasks(&self.served, &in_flight.given_up())
                    .await
                {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(err) => {
                        if self.gives_up_on(&err, *outage_since.get_or_insert_with(Instant::now)) {
                            tracing::error!(worker = %self.options.worker_id, error = %err, "cannot count unfinished tasks: giving up");
                            self.drain(running, in_flight, report, abort).await?;
                            return Err(err);
                        }
                        tracing::warn!(error = %err, "cannot count unfinished tasks; retrying");
                    }
                }
            }
            let full = running.len() >= self.options.concurrency;
            // Park ends are the database's times: compare them with its clock.
            let now = self.store.now();
            due_parked.retain(|at: &chrono::DateTime<chrono::Utc>| *at > now);
            let poll = due_parked
                .first()
                .and_then(|at| (*at - now).to_std().ok())
                .map_or(self.options.poll_interval, |until| {
                    until.min(self.options.poll_interval)
                });
            tokio::select! {
                () = shutdown.cancelled() => {}
                Some(joined) = running.join_next_with_id(), if !running.is_empty() => {
                    if let Ok((_, (_, Ok(RunOutcome::Parked { until, .. }
                        | RunOutcome::Waiting { until: Some(until), .. })))) = &joined
                    {
                        due_parked.insert(*until);
                    }
                    record(&mut report, &mut in_flight, joined, self.options.until_idle);
                }
                _ = wake_ups.wait(poll), if !full => {}
            }
        }
        self.drain(running, in_flight, report, abort).await
    }

    /// Whether a worker running until idle stops on `err` (a database error since `since`):
    /// a refusal at once, an outage past [`UNTIL_IDLE_OUTAGE_LIMIT`]. "Idle" must mean that
    /// nothing is left, never that the database could not say.
    fn gives_up_on(&self, err: &Error, since: Instant) -> bool {
        self.options.until_idle && (!err.is_outage() || since.elapsed() >= UNTIL_IDLE_OUTAGE_LIMIT)
    }

    /// Claims until the worker is full or nothing is claimable; returns how many it claimed.
    async fn fill(
        &self,
        running: &mut JoinSet<(Lease, Result<RunOutcome>)>,
        in_flight: &mut InFlight,
        drain: &CancellationToken,
        abort: &CancellationToken,
    ) -> Result<u64> {
        let mut claimed = 0;
        while running.len() < self.options.concurrency && !drain.is_cancelled() {
            let busy = in_flight.not_to_claim();
            let started = Instant::now();
            let claimed_now = self
                .store
                .claim_next(
                    &self.options.worker_id,
                    self.options.lease_ttl,
                    &busy,
                    &self.served,
                )
                .await?;
            if let Some(metrics) = &self.options.metrics {
                metrics.claim_took(started.elapsed());
                if let Some(lease) = &claimed_now {
                    metrics.claimed(&lease.workflow);
                }
            }
            let Some(lease) = claimed_now else {
                break;
            };
            tracing::info!(task = %lease.task, attempt = lease.attempt, epoch = lease.epoch, "claimed");
            claimed += 1;
            let run = TaskRunner {
                store: self.store.clone(),
                orchestrator: self.orchestrator.clone(),
                lease,
                ttl: self.options.lease_ttl,
                heartbeat: self.options.heartbeat_interval,
                metrics: self.options.metrics.clone(),
            };
            let (drain, abort) = (drain.clone(), abort.child_token());
            let task = run.lease.task;
            let handle = running.spawn(async move {
                let outcome = run.run(drain, abort).await;
                (run.lease, outcome)
            });
            in_flight.runs.insert(handle.id(), task);
        }
        Ok(claimed)
    }

    /// Records the served versions' shapes, waiting out an outage as claims do (a worker
    /// started during a restart of PostgreSQL keeps trying; one running until idle gives
    /// up after [`UNTIL_IDLE_OUTAGE_LIMIT`]). `None`: shutdown came first.
    async fn record_versions(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Option<Vec<crate::store::ShapeChange>>> {
        let since = Instant::now();
        let mut outages = 0;
        loop {
            outages += 1;
            let err = match self
                .store
                .record_workflow_versions(&self.registry, &self.options.worker_id)
                .await
            {
                Ok(changes) => return Ok(Some(changes)),
                Err(err) if err.is_outage() && !self.gives_up_on(&err, since) => err,
                Err(err) => return Err(err),
            };
            let wait = OUTAGE_BACKOFF.delay(outages, 0.5);
            tracing::warn!(worker = %self.options.worker_id, error = %err, retry_in = ?wait, "cannot record the workflow versions this worker serves: trying again");
            tokio::select! {
                () = shutdown.cancelled() => return Ok(None),
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Shutdown: no new items; wait for items in flight up to the grace period; then abandon
    /// what is left. Every run releases its lease as it stops.
    async fn drain(
        &self,
        mut running: JoinSet<(Lease, Result<RunOutcome>)>,
        mut in_flight: InFlight,
        mut report: WorkerReport,
        abort: CancellationToken,
    ) -> Result<WorkerReport> {
        if !running.is_empty() {
            tracing::info!(tasks = running.len(), grace = ?self.options.shutdown_grace, "stopping: letting items in flight finish");
        }
        let deadline = Instant::now() + self.options.shutdown_grace;
        while !running.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, running.join_next_with_id()).await {
                Ok(Some(joined)) => {
                    record(&mut report, &mut in_flight, joined, self.options.until_idle)
                }
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(
                        tasks = running.len(),
                        "grace period over: abandoning items in flight"
                    );
                    abort.cancel();
                    while let Some(joined) = running.join_next_with_id().await {
                        record(&mut report, &mut in_flight, joined, self.options.until_idle);
                    }
                }
            }
        }
        Ok(report)
    }
}

fn record(
    report: &mut WorkerReport,
    in_flight: &mut InFlight,
    joined: std::result::Result<
        (tokio::task::Id, (Lease, Result<RunOutcome>)),
        tokio::task::JoinError,
    >,
    keep_attempts: bool,
) {
    let (lease, outcome) = match joined {
        Ok((id, done)) => {
            in_flight.runs.remove(&id);
            done
        }
        Err(err) => {
            // Step panics are failures the orchestrator records; this is the engine's own.
            // The task's lease expires for other workers; this process leaves it alone.
            let task = in_flight.runs.remove(&err.id());
            tracing::error!(task = ?task, error = %err, "a task run panicked: this worker will not claim the task again");
            in_flight.broken.extend(task);
            report.stopped += 1;
            return;
        }
    };
    let task = lease.task;
    if keep_attempts {
        report.attempts.push(Attempt {
            task,
            attempt: lease.attempt,
            outcome: outcome
                .as_ref()
                .map(Clone::clone)
                .map_err(ToString::to_string),
        });
    }
    match outcome {
        Ok(RunOutcome::AwaitingReview) => report.awaiting_review += 1,
        Ok(RunOutcome::Completed) => report.completed += 1,
        Ok(RunOutcome::SetAside { .. }) => {
            in_flight.set_aside.insert(task);
            report.set_aside += 1;
        }
        Ok(RunOutcome::Parked {
            until,
            jobs,
            waiting,
        }) => {
            tracing::debug!(%task, %until, jobs, waiting, "parked: waiting on provider jobs");
            report.parked += 1;
        }
        Ok(RunOutcome::Waiting { until, signals }) => {
            tracing::info!(%task, ?until, ?signals, "waiting: parked until a signal or a time");
            report.waiting += 1;
        }
        Ok(RunOutcome::RetryScheduled { next_run_at }) => {
            tracing::info!(%task, %next_run_at, "retry scheduled");
            report.rescheduled += 1;
        }
        Ok(RunOutcome::Failed { reason }) => {
            tracing::warn!(%task, %reason, "task failed");
            report.failed += 1;
        }
        Ok(other) => {
            tracing::info!(%task, outcome = ?other, "run stopped");
            report.stopped += 1;
        }
        Err(Error::LeaseLost { epoch, .. }) => {
            tracing::warn!(%task, epoch, "lease lost: another worker owns the task now");
            report.stopped += 1;
        }
        Err(err) => {
            tracing::error!(%task, error = %err, "task run failed; it resumes when its lease expires");
            report.stopped += 1;
        }
    }
}

/// The tasks this process runs, by the tokio task that runs each; those whose run broke
/// (panicked), which it leaves to other workers; and those it set aside as unreadable.
#[derive(Default)]
struct InFlight {
    runs: HashMap<tokio::task::Id, TaskId>,
    broken: HashSet<TaskId>,
    set_aside: HashSet<TaskId>,
}

impl InFlight {
    /// What a claim must skip: what runs here, and what broke here.
    fn not_to_claim(&self) -> Vec<TaskId> {
        self.runs.values().chain(&self.broken).copied().collect()
    }

    /// What `--until-idle` does not wait for: what this worker cannot run.
    fn given_up(&self) -> Vec<TaskId> {
        self.broken.iter().chain(&self.set_aside).copied().collect()
    }
}

/// One claimed task: its run, and the heartbeat that keeps its lease.
struct TaskRunner {
    store: PgStore,
    orchestrator: Orchestrator,
    lease: Lease,
    ttl: Duration,
    heartbeat: Duration,
    metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
}

impl TaskRunner {
    async fn run(&self, drain: CancellationToken, abort: CancellationToken) -> Result<RunOutcome> {
        // This task's own "no new item": fired by the worker's drain, or by a cancel.
        let stop = drain.child_token();
        let run = self
            .orchestrator
            .run_with(&self.lease, stop.clone(), abort.clone());
        tokio::pin!(run);
        tokio::select! {
            outcome = &mut run => outcome,
            lost = self.keep_lease(&stop, &abort) => {
                let outcome = run.await;
                // A loss the run itself did not see (it was abandoned) is counted here.
                if lost
                    && !matches!(outcome, Err(Error::LeaseLost { .. }))
                    && let Some(metrics) = &self.metrics
                {
                    metrics.lease_lost();
                }
                outcome
            }
        }
    }

    /// Extends the lease every heartbeat; returns once it is gone: whether another worker
    /// took it (rather than a cancel). A cancelled task (its cancel released the lease)
    /// stops at the next item boundary — the item in flight finishes; any other loss
    /// abandons the run at once.
    async fn keep_lease(&self, stop: &CancellationToken, abort: &CancellationToken) -> bool {
        loop {
            tokio::time::sleep(self.heartbeat).await;
            match self.store.extend_lease(&self.lease, self.ttl).await {
                Ok(true) => {
                    if let Err(err) = self.store.extend_slots(self.lease.task, SLOT_TTL).await {
                        tracing::warn!(task = %self.lease.task, error = %err, "cannot extend provider slots");
                    }
                }
                Ok(false) => {
                    let task = self.lease.task;
                    if let Ok(Some(TaskStatus::CANCELLED)) = self.store.task_status(task).await {
                        tracing::info!(%task, "task cancelled: stopping at the next item boundary");
                        stop.cancel();
                        return false;
                    }
                    tracing::warn!(%task, epoch = self.lease.epoch, "lease lost; abandoning the task");
                    abort.cancel();
                    return true;
                }
                Err(err) => {
                    tracing::warn!(task = %self.lease.task, error = %err, "heartbeat failed; retrying")
                }
            }
        }
    }
}

async fn sleep_or(wait: Duration, shutdown: &CancellationToken) {
    tokio::select! {
        () = tokio::time::sleep(wait) => {}
        () = shutdown.cancelled() => {}
    }
}
