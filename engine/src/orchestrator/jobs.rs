//! Running a job step: submit each missing item once, poll the open jobs, and park the
//! task while nothing but waiting is left.
//!
//! The log decides what is open: an item with an `item_submitted` and no completion (or
//! failure) after it has a job in flight, and any run — after a crash, a takeover, a retry,
//! a park — polls it and never submits it again. A new submission happens only when the
//! provider reported the job failed or lost, and it is logged too. A submit whose answer
//! was lost may have started a job anyway: it is logged as a possible payment and its slot
//! stays taken for the job's life.
//!
//! Every time that outlives the run — a park's end, the poll schedule the park carries, a
//! job's age — is the database's (see [`PgStore::now`](crate::PgStore::now)), so a worker
//! whose clock is off neither wakes its tasks early nor lets a job look older than it is.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::Value;
use tracing::Instrument;

use super::{PARK_AFTER, SLOT_TTL, SLOT_WAIT, StepEnd, TaskRun, guarded};
use crate::error::Result;
use crate::event::{Event, FailureKind, PollSchedule};
use crate::outputs::Outputs;
use crate::state::{OpenJob, StepState};
use crate::store::SlotOwner;
use crate::workflow::{JobStatus, JobWork, ProviderLimits, Step, StepError, Submission};

/// The shortest and longest wait before a poll, whatever the provider hints or the
/// step's backoff says (a backoff scaled to zero must not poll in a loop).
const POLL_MIN: Duration = Duration::from_millis(10);
const POLL_MAX: Duration = Duration::from_secs(3600);

/// Near a job's expected end, polls fall on a grid that ends just after it (at this share
/// past it: a job that takes as long as the last ones is seen at once), spaced
/// [`NEAR_END_STEP`] of the expected duration apart, from [`NEAR_END_FROM`] of it on.
/// Before that the step's backoff applies.
const NEAR_END_MARGIN: f64 = 0.02;
const NEAR_END_FROM: f64 = 0.7;
/// A job that ends 20% sooner than expected is still seen within 8.75% of its duration.
const NEAR_END_STEP: f64 = 0.07;

/// A job past its expected end is polled again after at most this share of its age: an
/// ended job is seen within that share of its duration (the goal is a tenth, with room
/// for the poll's own round trip).
const AGE_STEP: f64 = 0.08;

/// The longest expected job duration the schedule takes (a longer one polls as if a year).
const EXPECTED_MAX: Duration = Duration::from_secs(365 * 24 * 3600);

/// Polls that must fail in a row, besides the step's job timeout, before a job counts as
/// lost: one unreadable answer after a long wait is not a lost job.
const LOST_AFTER_FAILED_POLLS: u32 = 3;

/// The longest a task waiting for room at a provider stays parked unwoken. A slot freed by
/// a release wakes it at once, and a slot kept for an unanswered submit when it lapses;
/// this covers slots that lapse with a worker that died.
pub(super) const ROOM_WAIT_MAX: Duration = Duration::from_secs(600);

/// An open job this run polls.
struct Open {
    job: Value,
    submission: u32,
    /// When the submission was recorded (the database's clock).
    submitted_at: DateTime<Utc>,
    /// Polls that answered "pending".
    polls: u32,
    /// The job's age at the last poll that answered "pending" in this run: it ended
    /// between then and the poll that saw its end.
    pending_at_age: Option<Duration>,
    /// Adopted from an orphaned submission: its age counts from the adoption.
    adopted: bool,
    /// Polls that failed in a row, and for how long (see [`PollSchedule::failing_for_ms`]).
    poll_errors: u32,
    failing_for: Duration,
    /// When the last failed poll was made (the database's clock).
    last_failed_at: Option<DateTime<Utc>>,
    next_poll: Instant,
    /// How much before `next_poll` it may be polled when another job's poll is due: jobs
    /// polled together stay together instead of drifting apart by their jitter, so a
    /// parked task wakes once per round, not once per job.
    early: Duration,
}

impl Open {
    fn from_log(
        job: &OpenJob,
        backoff: &crate::workflow::Backoff,
        now: Instant,
        db_now: DateTime<Utc>,
    ) -> Open {
        let pending_at_age = job
            .schedule
            .as_ref()
            .and_then(|planned| planned.pending_age_ms)
            .map(Duration::from_millis);
        let (next_poll, polls, poll_errors, failing_for, last_failed_at) = match &job.schedule {
            // The schedule the last park recorded.
            Some(planned) => (
                now + (planned.next_poll_at - db_now).to_std().unwrap_or_default(),
                planned.polls,
                planned.failed_polls,
                Duration::from_millis(planned.failing_for_ms),
                planned.last_failed_at,
            ),
            // No park recorded one (a crash, a log from before schedules): poll now, with
            // the backoff as far along as the job's age says.
            None => {
                let age = (db_now - job.submitted_at).to_std().unwrap_or_default();
                (now, polls_by(backoff, age), 0, Duration::ZERO, None)
            }
        };
        Open {
            job: job.job.clone(),
            submission: job.submission,
            submitted_at: job.submitted_at,
            polls,
            pending_at_age,
            adopted: false,
            poll_errors,
            failing_for,
            last_failed_at,
            next_poll,
            early: Duration::ZERO,
        }
    }

    /// A poll answered (pending, or a refusal for now): the job is not failing.
    fn answered(&mut self) {
        self.poll_errors = 0;
        self.failing_for = Duration::ZERO;
        self.last_failed_at = None;
    }

    /// A poll failed at `now`: the streak goes on by the time since the last failure, at
    /// most `longest` (the step's longest poll wait: a pause in which nobody polled — a
    /// park, a fleet outage, a provider's Retry-After — is not evidence of a lost job).
    fn failed(&mut self, now: DateTime<Utc>, longest: Duration) {
        if let Some(last) = self.last_failed_at {
            self.failing_for += (now - last).to_std().unwrap_or_default().min(longest);
        }
        self.poll_errors += 1;
        self.last_failed_at = Some(now);
    }

    /// Polls again after `wait` (never sooner than `floor`), and possibly a fifth of it
    /// sooner — but not sooner than `floor` after now.
    fn again_after(&mut self, wait: Duration, floor: Duration) {
        let floor = floor.max(POLL_MIN);
        let wait = wait.clamp(floor, POLL_MAX.max(floor));
        self.next_poll = Instant::now() + wait;
        self.early = (wait / 5).min(wait - floor);
    }
}

/// An item still to submit, from when.
struct ToSubmit {
    not_before: Instant,
}

pub(super) struct JobRun<'a> {
    run: &'a TaskRun,
    step: &'a Step,
    work: Arc<dyn JobWork>,
    limits: Option<ProviderLimits>,
    outputs: Arc<Outputs>,
    open: BTreeMap<u32, Open>,
    to_submit: BTreeMap<u32, ToSubmit>,
    /// Submissions per item so far (the next one's number is one more).
    submissions: BTreeMap<u32, u32>,
    /// The step's name in its idempotency keys: the one the task first ran it under (an
    /// upgrade may have renamed it since).
    key_name: String,
    /// Failed tries (submits refused, jobs failed or lost) per item in this attempt.
    tries: BTreeMap<u32, u32>,
    /// Rate refusals (429s) per item in this attempt (see [`FREE_RATE_REFUSALS`]).
    refusals: BTreeMap<u32, u32>,
    /// When items that found no room at the provider ask again while the run goes on.
    slot_retry: Option<Instant>,
    /// Some items found no room at the provider: a freed slot wakes the parked task.
    no_room: bool,
    /// The task ended (failed or cancelled) with these jobs open: they are polled to
    /// their end and recorded (what they cost, what they made), and nothing is submitted.
    settling: bool,
    /// Items of this step already complete in its current run.
    done: std::collections::BTreeSet<u32>,
    /// How long this step's jobs take, as the fleet saw them end (or the step's
    /// [`Step::expected_job_duration`] before any did).
    expected: Option<Duration>,
}

impl<'a> JobRun<'a> {
    pub(super) fn new(
        run: &'a TaskRun,
        step: &'a Step,
        work: Arc<dyn JobWork>,
        progress: Option<&StepState>,
        missing: Vec<u32>,
    ) -> Self {
        let now = Instant::now();
        let db_now = run.store.now();
        let mut open = BTreeMap::new();
        let mut to_submit = BTreeMap::new();
        // Failed tries of this attempt so far: a park ends the run, not the attempt, so the
        // item's retry budget carries over from the log. A refusal that said when to come
        // back (a 429) used none.
        let mut tries: BTreeMap<u32, u32> = BTreeMap::new();
        let mut refusals: BTreeMap<u32, u32> = BTreeMap::new();
        for failure in progress.iter().flat_map(|p| &p.failures) {
            if failure.attempt != run.attempt {
                continue;
            }
            let used = match failure.rate_limited() {
                true => {
                    let refused = refusals.entry(failure.item).or_default();
                    *refused += 1;
                    *refused > FREE_RATE_REFUSALS
                }
                false => true,
            };
            if used {
                *tries.entry(failure.item).or_default() += 1;
            }
        }
        for item in missing {
            match progress.and_then(|p| p.open_jobs.get(&item)) {
                Some(job) => {
                    open.insert(item, Open::from_log(job, &step.poll_backoff, now, db_now));
                }
                None => {
                    to_submit.insert(item, ToSubmit { not_before: now });
                }
            }
        }
        let outputs = Arc::new(
            run.outputs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .before_step(step.name()),
        );
        JobRun {
            run,
            step,
            work,
            limits: run.limits(step),
            outputs,
            open,
            to_submit,
            submissions: progress.map(|p| p.submissions.clone()).unwrap_or_default(),
            key_name: progress.map_or_else(|| step.name().to_owned(), |p| p.key_name().to_owned()),
            tries,
            refusals,
            slot_retry: None,
            no_room: false,
            settling: false,
            done: progress
                .map(|p| p.items.keys().copied().collect())
                .unwrap_or_default(),
            expected: step.expected_job_duration,
        }
    }

    /// A run that only polls the step's open jobs to their end (the task failed or was
    /// cancelled while they ran).
    pub(super) fn settling(
        run: &'a TaskRun,
        step: &'a Step,
        work: Arc<dyn JobWork>,
        progress: &StepState,
    ) -> Self {
        let open: Vec<u32> = progress.open_jobs.keys().copied().collect();
        JobRun {
            settling: true,
            ..JobRun::new(run, step, work, Some(progress), open)
        }
    }

    fn owner(&self) -> SlotOwner<'_> {
        SlotOwner {
            task: self.run.log.lease.task,
            step: self.step.name(),
            holder: &self.run.log.lease.worker_id,
        }
    }

    /// Takes one request of the provider's rate; `Some(wait)` when the key is paused or
    /// its bucket is empty (short waits are slept here, long ones returned).
    async fn request_wait(&self) -> Result<Option<Duration>> {
        let Some(limits) = &self.limits else {
            return Ok(None);
        };
        loop {
            match self
                .run
                .store
                .take_request(&limits.key, limits.rate)
                .await?
            {
                None => return Ok(None),
                Some(wait) if wait >= PARK_AFTER => return Ok(Some(wait)),
                Some(wait) => {
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = self.run.drain.cancelled() => return Ok(Some(wait)),
                        () = self.run.cancel.cancelled() => return Ok(Some(wait)),
                    }
                }
            }
        }
    }

    fn capped(&self) -> Option<(&ProviderLimits, u32)> {
        let limits = self.limits.as_ref()?;
        Some((limits, limits.max_in_flight?))
    }

    /// Jobs open at once in this run (see [`Step::width`]).
    fn width(&self) -> usize {
        self.step.width(self.limits.as_ref())
    }

    fn stopping(&self) -> bool {
        self.run.drain.is_cancelled() || self.run.cancel.is_cancelled()
    }

    fn done(&self) -> bool {
        self.open.is_empty() && self.to_submit.is_empty()
    }

    pub(super) async fn run(mut self) -> Result<StepEnd> {
        // Only the poll schedule depends on it: without it (a worker deployed before the
        // migration, a failed read), polls follow the job's age.
        match self
            .run
            .store
            .expected_job_duration(&self.run.workflow.name, self.step.name())
            .await
        {
            Ok(learned) => self.expected = learned.or(self.expected),
            Err(err) => tracing::warn!(
                step = self.step.name(),
                error = %err,
                "cannot read how long the step's jobs take; polls follow each job's age"
            ),
        }
        if self.adopt_orphans().await? {
            return Ok(StepEnd::Stopped);
        }
        if let Some((limits, _)) = self.capped() {
            // Jobs already in flight count against the cap, whatever it says now, for as
            // long as they may run (their rows normally exist already: this renews them).
            let items: Vec<u32> = self.open.keys().copied().collect();
            self.run
                .store
                .hold_slots(&limits.key, self.owner(), &items, SLOT_TTL, None)
                .await?;
        }
        loop {
            if self.stopping() {
                return Ok(StepEnd::Stopped);
            }
            if self.done() {
                return Ok(StepEnd::Completed);
            }
            if let Some(end) = self.poll_due().await? {
                return Ok(end);
            }
            if !self.settling
                && let Some(end) = self.submit_ready().await?
            {
                return Ok(end);
            }
            if self.done() {
                return Ok(StepEnd::Completed);
            }
            let now = Instant::now();
            let next = self
                .open
                .values()
                .map(|o| o.next_poll)
                .chain(self.next_submit())
                .min()
                .unwrap_or(now + SLOT_WAIT);
            let wait = next.saturating_duration_since(now);
            if wait >= PARK_AFTER {
                return self.park().await;
            }
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.run.drain.cancelled() => return Ok(StepEnd::Stopped),
                () = self.run.cancel.cancelled() => return Ok(StepEnd::Stopped),
            }
        }
    }

    /// Takes in the jobs the provider accepted for this step that an earlier run could not
    /// record (it lost the lease meanwhile; see [`crate::OrphanJob`]): an item neither done
    /// nor open gets the job as its submission, recorded now and polled like any other; a
    /// job for an item that is done or has another job open was paid for nothing and is
    /// recorded as a possible payment. True: someone else appended meanwhile (stop).
    async fn adopt_orphans(&mut self) -> Result<bool> {
        let task = self.run.log.lease.task;
        for orphan in self.run.store.orphan_jobs(task, self.step.name()).await? {
            let item = orphan.item;
            let moved = if self.done.contains(&item) || self.open.contains_key(&item) {
                if self
                    .open
                    .get(&item)
                    .is_some_and(|o| o.submission == orphan.submission)
                {
                    false
                } else {
                    tracing::warn!(%task, step = %self.step.name(), item, job = %orphan.job, "a job accepted while the lease was lost is not needed: recorded as a possible payment");
                    let error = StepError::transient(format!(
                        "a job the provider accepted while its worker had lost the lease \
                         ({}) was not needed",
                        crate::id::truncate_for_display(&orphan.job.to_string(), 200)
                    ))
                    .unanswered();
                    let moved = self
                        .run
                        .log
                        .record(self.failure(item, &error, 0), &self.run.cancel)
                        .await?;
                    self.keep_slot_for_unanswered(item).await?;
                    moved
                }
            } else {
                tracing::info!(%task, step = %self.step.name(), item, job = %orphan.job, "recording a job accepted while its worker had lost the lease");
                let moved = self
                    .run
                    .log
                    .record(
                        Event::ItemSubmitted {
                            step: self.step.name().to_owned(),
                            item,
                            attempt: self.run.attempt,
                            submission: orphan.submission,
                            job: orphan.job.clone(),
                        },
                        &self.run.cancel,
                    )
                    .await?;
                let number = self.submissions.entry(item).or_default();
                *number = (*number).max(orphan.submission);
                self.to_submit.remove(&item);
                self.keep_slot_for_job(item).await?;
                self.open.insert(
                    item,
                    Open {
                        job: orphan.job.clone(),
                        submission: orphan.submission,
                        submitted_at: self.run.store.now(),
                        polls: 0,
                        pending_at_age: None,
                        // When the provider took it is unknown: its end teaches nothing.
                        adopted: true,
                        poll_errors: 0,
                        failing_for: Duration::ZERO,
                        last_failed_at: None,
                        next_poll: Instant::now(),
                        early: Duration::ZERO,
                    },
                );
                moved
            };
            self.run.store.forget_orphan_job(task, &orphan).await?;
            if moved {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// When the next item could be submitted while the run goes on: its backoff, or the
    /// next look for room.
    fn next_submit(&self) -> Option<Instant> {
        if self.settling || self.open.len() >= self.width() {
            return None;
        }
        let earliest = self.to_submit.values().map(|t| t.not_before).min()?;
        Some(match self.slot_retry {
            Some(retry) => earliest.max(retry),
            None => earliest,
        })
    }

    /// Everything left waits at least [`PARK_AFTER`]: the task is parked until the first
    /// of its open jobs' next polls and its items' next chance at a submit, with the poll
    /// schedule in the log. Items waiting for room do not set a time (a freed slot wakes
    /// the task) beyond the next lapse of a slot and [`ROOM_WAIT_MAX`].
    async fn park(&self) -> Result<StepEnd> {
        let now = Instant::now();
        let db_now = self.run.store.now();
        let at = |instant: Instant| {
            db_now
                + chrono::Duration::from_std(instant.saturating_duration_since(now))
                    .unwrap_or_default()
        };
        let mut until = self.open.values().map(|o| at(o.next_poll)).min();
        let submit_at = if self.settling || self.to_submit.is_empty() {
            None
        } else if self.no_room {
            let fallback = db_now + chrono::Duration::from_std(ROOM_WAIT_MAX).unwrap_or_default();
            let lapse = match self.capped() {
                Some((limits, _)) => self.run.store.next_lapse(&limits.key).await?,
                None => None,
            };
            Some(lapse.map_or(fallback, |lapse| lapse.min(fallback)))
        } else if self.open.len() >= self.width() {
            // The step's own concurrency is full: an open job's end (a poll) frees it.
            None
        } else {
            self.to_submit.values().map(|t| at(t.not_before)).min()
        };
        until = match (until, submit_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let schedule = self
            .open
            .iter()
            .map(|(item, open)| PollSchedule {
                step: self.step.name().to_owned(),
                item: *item,
                submission: open.submission,
                next_poll_at: at(open.next_poll),
                polls: open.polls,
                failed_polls: open.poll_errors,
                failing_for_ms: u64::try_from(open.failing_for.as_millis()).unwrap_or(u64::MAX),
                last_failed_at: open.last_failed_at,
                pending_age_ms: open
                    .pending_at_age
                    .map(|age| u64::try_from(age.as_millis()).unwrap_or(u64::MAX)),
            })
            .collect();
        let room = match (self.no_room, self.capped()) {
            (true, Some((limits, cap))) => Some((limits.key.to_string(), cap)),
            _ => None,
        };
        Ok(StepEnd::Parked {
            until: until.unwrap_or(db_now),
            jobs: u32::try_from(self.open.len()).unwrap_or(u32::MAX),
            waiting: u32::try_from(self.to_submit.len()).unwrap_or(u32::MAX),
            schedule,
            room,
            waits: Vec::new(),
        })
    }

    /// Polls every open job that is due, in item order, and with them those due soon
    /// enough to go in the same round (see [`Open::early`]).
    async fn poll_due(&mut self) -> Result<Option<StepEnd>> {
        let now = Instant::now();
        if !self.open.values().any(|o| o.next_poll <= now) {
            return Ok(None);
        }
        let due: Vec<u32> = self
            .open
            .iter()
            .filter(|(_, o)| o.next_poll <= now + o.early)
            .map(|(item, _)| *item)
            .collect();
        for item in due {
            if let Some(wait) = self.request_wait().await? {
                // The key is paused or its rate is spent: poll later (parking if long).
                if let Some(open) = self.open.get_mut(&item) {
                    open.next_poll = Instant::now() + wait;
                    open.early = Duration::ZERO;
                }
                continue;
            }
            let Some(open) = self.open.get(&item) else {
                continue;
            };
            let ctx = self.run.context(self.step, item, 1, self.outputs.clone());
            let job = open.job.clone();
            let span = provider_span("reel.provider.poll", self.step, item, self.run.attempt);
            let polled = tokio::select! {
                polled = guarded(|| self.work.poll(ctx, item, job)).instrument(span.clone()) => polled,
                () = self.run.cancel.cancelled() => return Ok(Some(StepEnd::Stopped)),
            };
            record_call(
                &span,
                polled.as_ref().map(|status| match status {
                    JobStatus::Pending { .. } => "pending",
                    JobStatus::Done(_) => "done",
                    JobStatus::Failed(_) => "job_failed",
                }),
            );
            if let Some(end) = self.polled(item, polled).await? {
                return Ok(Some(end));
            }
        }
        Ok(None)
    }

    async fn polled(
        &mut self,
        item: u32,
        polled: std::result::Result<JobStatus, StepError>,
    ) -> Result<Option<StepEnd>> {
        let step = self.step;
        let db_now = self.run.store.now();
        let Some(open) = self.open.get_mut(&item) else {
            return Ok(None);
        };
        match polled {
            Ok(JobStatus::Pending { next_poll }) => {
                open.polls += 1;
                open.answered();
                let age = (db_now - open.submitted_at).to_std().unwrap_or_default();
                open.pending_at_age = Some(age);
                match next_poll {
                    Some(hint) => {
                        // A provider's hint is when to come back: go then, not much sooner.
                        open.again_after(hint, step.min_poll_interval);
                        open.early /= 4;
                    }
                    None => {
                        let wait = unhinted_wait(
                            step.poll_backoff.random_delay(open.polls),
                            age,
                            self.expected,
                            step.min_poll_interval,
                        );
                        open.again_after(wait, step.min_poll_interval);
                    }
                }
                Ok(None)
            }
            Ok(JobStatus::Done(output)) => {
                if let Some(reason) = output.unstorable() {
                    return self.job_failed(item, StepError::permanent(reason)).await;
                }
                let waited = (db_now - open.submitted_at).to_std().unwrap_or_default();
                let duration_ms = u64::try_from(waited.as_millis()).unwrap_or(u64::MAX);
                let sample = learned_sample(open.pending_at_age, waited, self.expected)
                    .filter(|_| !open.adopted);
                self.open.remove(&item);
                self.run.complete(step, item, output, duration_ms).await?;
                self.release(item).await?;
                if let Some(took) = sample {
                    self.learn(took).await;
                }
                Ok(None)
            }
            Ok(JobStatus::Failed(error)) => self.job_failed(item, error).await,
            Err(error) => self.poll_failed(item, error, db_now).await,
        }
    }

    /// A job ended after `took`: the step's expected job duration moves toward it. The
    /// completion is durable already; a failure here only leaves the expectation as it was.
    async fn learn(&mut self, took: Duration) {
        let workflow = &self.run.workflow.name;
        match self
            .run
            .store
            .observe_job_duration(workflow, self.step.name(), took)
            .await
        {
            Ok(expected) => self.expected = Some(expected),
            Err(err) => tracing::warn!(
                step = self.step.name(),
                error = %err,
                "cannot record how long the job took"
            ),
        }
    }

    /// A poll failed (the request, not the job).
    async fn poll_failed(
        &mut self,
        item: u32,
        error: StepError,
        db_now: DateTime<Utc>,
    ) -> Result<Option<StepEnd>> {
        let step = self.step;
        self.run.respect_retry_after(step, &error).await;
        if error.kind == FailureKind::Permanent {
            let error = StepError {
                message: format!("polling job: {}", error.message),
                unanswered: false,
                ..error
            };
            if self.settling {
                // The poll was refused (a revoked key, say), not the job: nobody can
                // follow it now. Its submission stays open — a `reel retry`, once the
                // cause is fixed, polls it instead of paying again — and its slot is kept
                // for as long as it may run.
                tracing::error!(task = %self.run.log.lease.task, step = %step.name(), item, error = %error.message, "cannot follow a job the task left open; it stays open, its slot kept for the job's life");
                self.open.remove(&item);
                self.keep_slot_for_job(item).await?;
                return Ok(None);
            }
            // Its submission stays open, so once the cause is fixed, `reel retry` polls it
            // rather than paying again.
            return Ok(Some(StepEnd::GaveUp { error, item }));
        }
        let Some(open) = self.open.get_mut(&item) else {
            return Ok(None);
        };
        if let Some(wait) = error.retry_after {
            // A rate refusal is an answer: the provider is there, and says when to come
            // back. It says nothing of the job.
            open.answered();
            open.again_after(wait, step.min_poll_interval);
            open.early = Duration::ZERO;
            return Ok(None);
        }
        open.failed(db_now, step.poll_backoff.max.max(POLL_MIN));
        if open.poll_errors >= LOST_AFTER_FAILED_POLLS && open.failing_for >= step.job_timeout {
            let lost = StepError::transient(format!(
                "job lost: its polls failed for {}s ({} in a row; {})",
                open.failing_for.as_secs(),
                open.poll_errors,
                error.message
            ));
            return self.job_failed(item, lost).await;
        }
        tracing::warn!(task = %self.run.log.lease.task, step = %step.name(), item, error = %error.message, "poll failed; polling again later");
        let wait = step.poll_backoff.random_delay(open.poll_errors);
        open.again_after(wait, step.min_poll_interval);
        Ok(None)
    }

    /// The job ended without a result: record it (closing the submission), then submit
    /// anew within the retry policy, or give up (a settling task records it and goes on).
    async fn job_failed(&mut self, item: u32, error: StepError) -> Result<Option<StepEnd>> {
        // An answer about the job closes its submission, whatever the step marked.
        let error = StepError {
            unanswered: false,
            ..error
        };
        self.open.remove(&item);
        let tries = self.failed_try(item);
        self.record_failure(item, &error, tries).await?;
        self.release(item).await?;
        if self.settling {
            return Ok(None);
        }
        Ok(self.retry_or_give_up(item, error, tries))
    }

    /// Counts a failed try of `item` and returns its number.
    fn failed_try(&mut self, item: u32) -> u32 {
        let tries = self.tries.entry(item).or_default();
        *tries += 1;
        *tries
    }

    fn failure(&self, item: u32, error: &StepError, tries: u32) -> Event {
        Event::ItemFailed {
            step: self.step.name().to_owned(),
            item,
            attempt: self.run.attempt,
            kind: error.kind,
            error: error.message.clone(),
            retry: tries,
            unanswered: error.unanswered,
            retry_after_ms: error
                .retry_after
                .map(|wait| u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)),
        }
    }

    async fn record_failure(&self, item: u32, error: &StepError, tries: u32) -> Result<()> {
        self.run.respect_retry_after(self.step, error).await;
        self.run
            .log
            .append(vec![self.failure(item, error, tries)])
            .await?;
        Ok(())
    }

    fn retry_or_give_up(&mut self, item: u32, error: StepError, tries: u32) -> Option<StepEnd> {
        let policy = self.step.retry;
        if error.kind == FailureKind::Permanent || tries >= policy.max_tries.max(1) {
            return Some(StepEnd::GaveUp { error, item });
        }
        let refusals = self.refusals.get(&item).copied().unwrap_or(0);
        let wait = policy
            .backoff
            .random_delay(tries.max(1))
            .max(error.retry_after.unwrap_or_default())
            .max(rate_refusal_wait(refusals));
        self.to_submit.insert(
            item,
            ToSubmit {
                not_before: Instant::now() + wait,
            },
        );
        None
    }

    /// A submitted job is in flight at the provider whether or not its worker lives: its
    /// slot stays counted for as long as the job may run (the step's job timeout), not just
    /// a lease, and is freed when the job ends.
    async fn keep_slot_for_job(&self, item: u32) -> Result<()> {
        if let Some((limits, _)) = self.capped() {
            self.run
                .store
                .hold_slots(
                    &limits.key,
                    self.owner(),
                    &[item],
                    self.step.job_timeout.max(SLOT_TTL),
                    None,
                )
                .await?;
        }
        Ok(())
    }

    /// A job may run at the provider without a submission the log can poll (its submit's
    /// answer was lost): its slot is kept, apart from the item, for the job's life.
    async fn keep_slot_for_unanswered(&self, item: u32) -> Result<()> {
        if let Some((limits, _)) = self.capped() {
            self.run
                .store
                .keep_slot_for_unanswered(&limits.key, self.owner(), item, self.step.job_timeout)
                .await?;
        }
        Ok(())
    }

    /// Frees `item`'s slot; the next pass looks for room again at once.
    async fn release(&mut self, item: u32) -> Result<()> {
        if let Some((limits, cap)) = self.capped() {
            self.run
                .store
                .release_slot(
                    &limits.key,
                    cap,
                    self.run.log.lease.task,
                    self.step.name(),
                    item,
                )
                .await?;
            self.slot_retry = None;
        }
        Ok(())
    }

    /// Submits the items whose turn it is, in item order, as far as the step's concurrency
    /// and the provider's room allow.
    async fn submit_ready(&mut self) -> Result<Option<StepEnd>> {
        let now = Instant::now();
        if self.slot_retry.is_some_and(|at| at > now) {
            return Ok(None);
        }
        let room = self.width().saturating_sub(self.open.len());
        let ready: Vec<u32> = self
            .to_submit
            .iter()
            .filter(|(_, t)| t.not_before <= now)
            .map(|(item, _)| *item)
            .take(room)
            .collect();
        if ready.is_empty() {
            return Ok(None);
        }
        let granted = match self.capped() {
            Some((limits, cap)) => {
                let granted = self
                    .run
                    .store
                    .acquire_slots(&limits.key, cap, self.owner(), &ready, SLOT_TTL)
                    .await?;
                self.no_room = granted.len() < ready.len();
                self.slot_retry = self.no_room.then(|| Instant::now() + SLOT_WAIT);
                granted
            }
            None => ready,
        };
        for item in granted {
            if self.stopping() {
                return Ok(Some(StepEnd::Stopped));
            }
            if let Some(wait) = self.request_wait().await? {
                // Keep the slot; submit when the key may send again (parking if long).
                if let Some(next) = self.to_submit.get_mut(&item) {
                    next.not_before = Instant::now() + wait;
                }
                break;
            }
            if let Some(end) = self.submit(item).await? {
                return Ok(Some(end));
            }
        }
        Ok(None)
    }

    async fn submit(&mut self, item: u32) -> Result<Option<StepEnd>> {
        let tries = self.tries.get(&item).copied().unwrap_or(0);
        let number = self.submissions.get(&item).copied().unwrap_or(0) + 1;
        let task = self.run.log.lease.task;
        let submission = Submission {
            number,
            idempotency_key: uuid::Uuid::new_v5(
                &uuid::Uuid::NAMESPACE_OID,
                format!("reel/{task}/{}/{item}/{number}", self.key_name).as_bytes(),
            )
            .to_string(),
        };
        let ctx = self
            .run
            .context(self.step, item, tries + 1, self.outputs.clone());
        let span = provider_span("reel.provider.submit", self.step, item, self.run.attempt);
        span.record("reel.submission", number);
        let submitted = tokio::select! {
            submitted = guarded(|| self.work.submit(ctx, item, submission)).instrument(span.clone()) => submitted,
            () = self.run.cancel.cancelled() => return Ok(Some(StepEnd::Stopped)),
        };
        record_call(&span, submitted.as_ref().map(|_| "accepted"));
        // A job id the log cannot store cannot be polled by a later run either.
        let submitted = submitted.and_then(|job| match crate::outputs::holds_nul(&job) {
            true => Err(StepError::permanent(
                "the provider's job id contains a NUL character, which the log cannot \
                 store; the job may still run and be charged",
            )
            .unanswered()),
            false => Ok(job),
        });
        // Waits are for call steps: a submit that asks to wait would be retried as a
        // failure until the step gives up. Say so instead.
        let submitted = submitted.map_err(|error| match error.waiting {
            Some(_) => StepError::permanent(format!(
                "{}: a job step's submit cannot wait; wait in a call step before it",
                error.message
            )),
            None => error,
        });
        match submitted {
            Ok(job) => self.accepted(item, number, job).await,
            Err(error) => self.refused(item, error).await,
        }
    }

    /// The provider accepted the job: recorded before anything else (whatever it takes),
    /// so from here on every run polls it.
    async fn accepted(&mut self, item: u32, number: u32, job: Value) -> Result<Option<StepEnd>> {
        let moved = self
            .run
            .log
            .record(
                Event::ItemSubmitted {
                    step: self.step.name().to_owned(),
                    item,
                    attempt: self.run.attempt,
                    submission: number,
                    job: job.clone(),
                },
                &self.run.cancel,
            )
            .await;
        let moved = match moved {
            Ok(moved) => moved,
            Err(err) => return Err(self.orphaned(item, number, job, err).await),
        };
        self.submissions.insert(item, number);
        self.to_submit.remove(&item);
        self.keep_slot_for_job(item).await?;
        let mut open = Open {
            job,
            submission: number,
            submitted_at: self.run.store.now(),
            polls: 0,
            pending_at_age: None,
            adopted: false,
            poll_errors: 0,
            failing_for: Duration::ZERO,
            last_failed_at: None,
            next_poll: Instant::now(),
            early: Duration::ZERO,
        };
        open.again_after(
            self.step.poll_backoff.random_delay(1),
            self.step.min_poll_interval,
        );
        self.open.insert(item, open);
        // Someone else appended meanwhile (an operator's cancel): stop and let the run
        // read the task again; the job is recorded and will be followed.
        Ok(moved.then_some(StepEnd::Stopped))
    }

    /// The provider accepted a job that the log could not take (`err`): the lease was
    /// lost (another worker has the task), or the run was told to stop. The job is kept
    /// where the task's next run adopts it ([`JobRun::adopt_orphans`]) instead of paying
    /// for the item again. Returns `err`.
    async fn orphaned(
        &self,
        item: u32,
        submission: u32,
        job: Value,
        err: crate::Error,
    ) -> crate::Error {
        let task = self.run.log.lease.task;
        let orphan = crate::OrphanJob {
            step: self.step.name().to_owned(),
            item,
            submission,
            job,
        };
        let mut wait = Duration::from_millis(100);
        for _ in 0..20 {
            match self
                .run
                .store
                .keep_orphan_job(task, &orphan, &self.run.log.lease.worker_id)
                .await
            {
                Ok(()) => {
                    tracing::warn!(%task, step = %self.step.name(), item, job = %orphan.job, error = %err, "a job the provider accepted could not be recorded; kept for the task's next run to adopt");
                    return err;
                }
                Err(keep) => {
                    tracing::warn!(%task, error = %keep, "cannot keep the job for adoption yet; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
        tracing::error!(%task, step = %self.step.name(), item, job = %orphan.job, error = %err, "a job the provider accepted could not be recorded nor kept: a later run may pay for the item again");
        err
    }

    /// The submit failed. A refusal that said when to come back (a 429) uses no try; one
    /// whose answer was lost may have started a job, whose slot is kept for its life.
    async fn refused(&mut self, item: u32, error: StepError) -> Result<Option<StepEnd>> {
        let rate_limited = error.retry_after.is_some() && !error.unanswered;
        let counts = match rate_limited {
            true => {
                let refusals = self.refusals.entry(item).or_default();
                *refusals += 1;
                *refusals > FREE_RATE_REFUSALS
            }
            false => true,
        };
        let tries = match counts {
            true => self.failed_try(item),
            false => self.tries.get(&item).copied().unwrap_or(0),
        };
        // A refusal that uses no try is recorded as the try it was (the next one).
        let try_number = if counts { tries } else { tries + 1 };
        if error.unanswered {
            // A possible payment: recorded whatever it takes, like an acceptance (an
            // operator's cancel in between does not drop it), and its slot kept for the
            // job's life.
            tracing::warn!(task = %self.run.log.lease.task, step = %self.step.name(), item, error = %error.message, "a submit got no answer: the provider may have started (and charge for) a job; its slot is kept for the job's life");
            let moved = self
                .run
                .log
                .record(self.failure(item, &error, try_number), &self.run.cancel)
                .await?;
            self.keep_slot_for_unanswered(item).await?;
            if moved {
                return Ok(Some(StepEnd::Stopped));
            }
        } else {
            self.record_failure(item, &error, try_number).await?;
            self.release(item).await?;
        }
        Ok(self.retry_or_give_up(item, error, tries))
    }
}

/// Rate refusals (a 429 with its wait) an item may get in one attempt before each further
/// one uses up a try: a provider that keeps refusing (a spent daily quota) ends the item
/// within the step's retry policy instead of retrying forever.
pub(super) const FREE_RATE_REFUSALS: u32 = 5;

/// The least wait after the `refusals`-th rate refusal of an item, whatever the provider
/// said (a `Retry-After: 0` must not make a loop): 100 ms doubling to 5 s.
/// How long to wait before polling a job that is still running, when the provider gave no
/// hint: `backoff` (the step's wait for this poll) while no job of the step was seen to
/// end, or while the job is far from its `expected` end; near the end, the grid of
/// [`NEAR_END_STEP`]s that ends just past it; past it, at most [`AGE_STEP`] of the job's
/// `age`. Never less than `floor`. Once the step knows how long its jobs take, a job that
/// ended is so seen within a tenth of its duration (given a floor that allows it), at the
/// cost of a few polls near its end.
pub(super) fn unhinted_wait(
    backoff: Duration,
    age: Duration,
    expected: Option<Duration>,
    floor: Duration,
) -> Duration {
    let floor = floor.max(POLL_MIN);
    let by_age = || backoff.min(age.mul_f64(AGE_STEP)).max(floor);
    // Until a job of the step was seen to end, the backoff: what it costs to poll a job
    // more often is not worth paying before anyone knows when jobs end.
    let Some(expected) = expected
        .filter(|e| !e.is_zero())
        .map(|e| e.min(EXPECTED_MAX))
    else {
        return backoff.max(floor);
    };
    let anchor = expected.mul_f64(1.0 + NEAR_END_MARGIN).as_secs_f64();
    let age_s = age.as_secs_f64();
    if age_s >= anchor {
        return by_age();
    }
    let step = expected.mul_f64(NEAR_END_STEP).max(floor).as_secs_f64();
    // The grid's points are anchor - k·step; the next one after `age`, and the first one
    // of the near end.
    let next = anchor - ((anchor - age_s) / step).floor() * step;
    let first = anchor - ((anchor - expected.as_secs_f64() * NEAR_END_FROM) / step).floor() * step;
    let wait = if next < first {
        backoff.min(Duration::from_secs_f64(first - age_s))
    } else {
        Duration::from_secs_f64(next - age_s)
    };
    wait.max(floor)
}

/// What a job that ended teaches about the step's job durations: it ended after the last
/// poll that answered "pending" (`pending`, its age then) and by the poll that saw it
/// (`seen`). Nothing when no "pending" is known (an adopted orphan's
/// submission time is unknown too), or when the interval is wide (a pause, an outage or a
/// long park between the polls) and the job took longer than expected: such a sample
/// would only stretch the expectation. One that ended sooner than expected, or the step's
/// first, is taken whatever the interval (it makes polls come sooner, never later).
fn learned_sample(
    pending: Option<Duration>,
    seen: Duration,
    expected: Option<Duration>,
) -> Option<Duration> {
    let pending = pending.filter(|p| *p <= seen)?;
    let Some(expected) = expected else {
        // The step's first: the middle, however wide (it replaces knowing nothing).
        return Some((pending + seen) / 2);
    };
    // The near-end grid ends just past the expected end: the sample is the expectation
    // that would have put the grid's end on the poll that saw it. A job seen there took
    // what was expected (no drift); one seen a step later raises the expectation by a
    // fifth of the step, until the grid's end is just past the jobs' end.
    let sample = seen.div_f64(1.0 + NEAR_END_MARGIN);
    let narrow = seen - pending <= seen / 4;
    (narrow || sample < expected).then_some(sample)
}

pub(super) fn rate_refusal_wait(refusals: u32) -> Duration {
    if refusals == 0 {
        return Duration::ZERO;
    }
    crate::workflow::Backoff::exponential(Duration::from_millis(100), Duration::from_secs(5))
        .delay(refusals, 0.5)
}

/// How many polls `backoff` would have made in `age` (its delays summed, without jitter).
fn polls_by(backoff: &crate::workflow::Backoff, age: Duration) -> u32 {
    let mut spent = Duration::ZERO;
    for polls in 0..64 {
        spent += backoff.delay(polls + 1, 0.5);
        if spent > age || backoff.delay(polls + 1, 0.5).is_zero() {
            return polls;
        }
    }
    64
}

/// The span of one provider call of a job step (`reel.provider.submit` or `.poll`).
fn provider_span(name: &'static str, step: &Step, item: u32, attempt: u32) -> tracing::Span {
    // A span's name is fixed at its callsite: one callsite per name.
    match name {
        "reel.provider.submit" => tracing::info_span!(
            "reel.provider.submit",
            reel.step = step.name(),
            reel.item = item,
            reel.attempt = attempt,
            reel.submission = tracing::field::Empty,
            reel.outcome = tracing::field::Empty,
            reel.error = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        ),
        _ => tracing::info_span!(
            "reel.provider.poll",
            reel.step = step.name(),
            reel.item = item,
            reel.attempt = attempt,
            reel.outcome = tracing::field::Empty,
            reel.error = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        ),
    }
}

/// Records a provider call's answer on its span.
fn record_call(span: &tracing::Span, answer: std::result::Result<&'static str, &StepError>) {
    match answer {
        Ok(outcome) => span.record("reel.outcome", outcome),
        Err(error) => {
            span.record("reel.error", error.message.as_str());
            span.record("otel.status_code", "ERROR");
            span.record("reel.outcome", "failed")
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workflow::Backoff;
    use proptest::prelude::*;

    /// When a job that ends at `ends` is first seen, and how many polls that took, when
    /// polled after `first` and then by [`unhinted_wait`] (jitter at `unit`).
    fn seen(
        backoff: &Backoff,
        ends: Duration,
        expected: Option<Duration>,
        floor: Duration,
        unit: f64,
    ) -> (Duration, u32) {
        let mut at = backoff.delay(1, unit).max(floor);
        let mut polls = 1;
        while at < ends {
            at += unhinted_wait(backoff.delay(polls + 1, unit), at, expected, floor);
            polls += 1;
        }
        (at, polls)
    }

    proptest! {
        /// A job is seen within a tenth of its duration once the step knows roughly how
        /// long its jobs take (a job may take 20% longer or shorter than expected), as
        /// long as the floor allows it; before that, within its backoff's wait.
        #[test]
        fn an_ended_job_is_seen_within_a_tenth_of_its_duration(
            ends_ms in 2_000u64..3_600_000,
            known in any::<bool>(),
            off in -0.2f64..0.25,
            unit in 0.0f64..1.0,
        ) {
            let backoff = Backoff::exponential(Duration::from_secs(5), Duration::from_secs(60))
                .with_jitter(0.1);
            let ends = Duration::from_millis(ends_ms);
            let floor = Duration::from_secs(1).min(ends / 12);
            let expected = known.then(|| ends.mul_f64(1.0 + off));
            let (at, _) = seen(&backoff, ends, expected, floor, unit);
            let lag = at.saturating_sub(ends);
            let allowed = match expected {
                Some(_) => (ends / 10).max(backoff.delay(1, unit).max(floor)),
                None => backoff.max,
            };
            prop_assert!(
                lag <= allowed,
                "a job of {ends:?} seen {lag:?} late (expected {expected:?})"
            );
        }
    }

    /// A job's end teaches the middle of the interval it ended in, unless the interval is
    /// wide and the job looks longer than expected (a pause between two polls must not
    /// stretch the expectation); one that ended sooner is always taken.
    #[test]
    fn a_sample_comes_from_a_narrow_interval_or_a_sooner_end() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        // Seen by the grid's last poll, 2% past the expected 10 s: as expected.
        assert_eq!(
            learned_sample(Some(s(9)), ms(10_200), Some(s(10))),
            Some(s(10))
        );
        // The step's first, seen by the backoff: the middle.
        assert_eq!(learned_sample(Some(s(5)), s(15), None), Some(s(10)));
        assert_eq!(learned_sample(None, s(10), Some(s(10))), None);
        // An hour's pause between "pending" at 4 min and the end seen at 64 min.
        assert_eq!(learned_sample(Some(s(240)), s(3840), Some(s(300))), None);
        // Ended well before the expected 5 minutes, seen by a backoff poll.
        assert_eq!(
            learned_sample(Some(s(60)), ms(122_400), Some(s(300))),
            Some(s(120))
        );
        assert_eq!(learned_sample(Some(s(11)), s(10), None), None);
    }

    /// An expected duration of any size polls sooner or later, without a panic.
    #[test]
    fn huge_expected_durations_do_not_overflow() {
        let backoff = Duration::from_secs(5);
        for expected in [
            Duration::MAX,
            Duration::from_secs(u64::MAX / 2),
            Duration::from_nanos(1),
        ] {
            for age in [
                Duration::ZERO,
                Duration::from_secs(1),
                Duration::from_secs(86_400 * 400),
            ] {
                let wait = unhinted_wait(backoff, age, Some(expected), Duration::ZERO);
                assert!(
                    wait >= POLL_MIN && wait <= backoff.max(POLL_MIN),
                    "{wait:?}"
                );
            }
        }
    }

    /// Knowing the duration sees a job's end within a tenth of it, at a few polls more
    /// than the backoff alone, all near the end.
    #[test]
    fn a_known_duration_sees_the_end_sooner_for_a_few_polls() {
        let backoff =
            Backoff::exponential(Duration::from_secs(5), Duration::from_secs(60)).with_jitter(0.1);
        let floor = Duration::from_secs(1);
        for ends in [
            Duration::from_secs(10),
            Duration::from_secs(70),
            Duration::from_secs(300),
        ] {
            let (cold_at, cold) = seen(&backoff, ends, None, floor, 0.5);
            let (at, known) = seen(&backoff, ends, Some(ends), floor, 0.5);
            assert!(
                at - ends <= ends / 10,
                "{ends:?}: seen {:?} late",
                at - ends
            );
            assert!(at <= cold_at, "{ends:?}: known {at:?}, cold {cold_at:?}");
            assert!(
                known <= cold + 8,
                "{ends:?}: {known} polls known vs {cold} cold"
            );
        }
    }
}
