//! Running a job step: submit each missing item once, poll the open jobs, and park the
//! task while nothing but waiting is left.
//!
//! The log decides what is open: an item with an `item_submitted` and no completion (or
//! failure) after it has a job in flight, and any run — after a crash, a takeover, a retry,
//! a park — polls it and never submits it again. A new submission happens only when the
//! provider reported the job failed or lost, and it is logged too.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::{PARK_AFTER, SLOT_TTL, SLOT_WAIT, StepEnd, TaskRun, guarded};
use crate::error::Result;
use crate::event::{Event, FailureKind};
use crate::outputs::Outputs;
use crate::state::StepState;
use crate::store::SlotOwner;
use crate::workflow::{JobStatus, JobWork, ProviderLimits, Step, StepError, Submission};

/// The shortest and longest wait before a poll, whatever the provider hints.
const POLL_HINT_MIN: Duration = Duration::from_millis(10);
const POLL_HINT_MAX: Duration = Duration::from_secs(3600);

/// An open job this run polls.
struct Open {
    job: Value,
    submitted_at: DateTime<Utc>,
    /// Polls that answered "pending".
    polls: u32,
    /// Polls that failed in a row.
    poll_errors: u32,
    next_poll: Instant,
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
    /// Failed tries (submits refused, jobs failed or lost) per item in this run.
    tries: BTreeMap<u32, u32>,
    /// When items that found no room at the provider try again.
    slot_retry: Option<Instant>,
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
        let mut open = BTreeMap::new();
        let mut to_submit = BTreeMap::new();
        // Failed tries of this attempt so far: a park ends the run, not the attempt, so the
        // item's retry budget carries over from the log.
        let mut tries: BTreeMap<u32, u32> = BTreeMap::new();
        for failure in progress.iter().flat_map(|p| &p.failures) {
            if failure.attempt == run.attempt {
                *tries.entry(failure.item).or_default() += 1;
            }
        }
        for item in missing {
            match progress.and_then(|p| p.open_jobs.get(&item)) {
                Some(job) => {
                    // Polls already spent on the job, by its age: the backoff goes on
                    // growing across parks instead of starting over.
                    let age = (Utc::now() - job.submitted_at).to_std().unwrap_or_default();
                    open.insert(
                        item,
                        Open {
                            job: job.job.clone(),
                            submitted_at: job.submitted_at,
                            polls: polls_by(&step.poll_backoff, age),
                            poll_errors: 0,
                            next_poll: now,
                        },
                    );
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
            tries,
            slot_retry: None,
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

    pub(super) async fn run(mut self) -> Result<StepEnd> {
        if let Some((limits, _)) = self.capped() {
            // Jobs already in flight count against the cap, whatever it says now, for as
            // long as they may run.
            for (item, open) in &self.open {
                let until = open.submitted_at
                    + chrono::Duration::from_std(self.step.job_timeout.max(SLOT_TTL))
                        .unwrap_or_default();
                self.run
                    .store
                    .hold_slots(&limits.key, self.owner(), &[*item], until.max(Utc::now()))
                    .await?;
            }
        }
        loop {
            if self.run.drain.is_cancelled() || self.run.cancel.is_cancelled() {
                return Ok(StepEnd::Stopped);
            }
            if self.open.is_empty() && self.to_submit.is_empty() {
                return Ok(StepEnd::Completed);
            }
            if let Some(end) = self.poll_due().await? {
                return Ok(end);
            }
            if let Some(end) = self.submit_ready().await? {
                return Ok(end);
            }
            if self.open.is_empty() && self.to_submit.is_empty() {
                return Ok(StepEnd::Completed);
            }
            let now = Instant::now();
            let next = self
                .open
                .values()
                .map(|o| o.next_poll)
                .chain(self.next_submit())
                .min()
                .unwrap_or(now);
            let wait = next.saturating_duration_since(now);
            if wait >= PARK_AFTER {
                let until = Utc::now() + chrono::Duration::from_std(wait).unwrap_or_default();
                return Ok(StepEnd::Parked {
                    until,
                    jobs: u32::try_from(self.open.len()).unwrap_or(u32::MAX),
                    waiting: u32::try_from(self.to_submit.len()).unwrap_or(u32::MAX),
                });
            }
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.run.drain.cancelled() => return Ok(StepEnd::Stopped),
                () = self.run.cancel.cancelled() => return Ok(StepEnd::Stopped),
            }
        }
    }

    /// When the next item could be submitted: its backoff, or the next look for room.
    fn next_submit(&self) -> Option<Instant> {
        let room = self.open.len() < self.step.concurrency;
        let earliest = self
            .to_submit
            .values()
            .map(|t| t.not_before)
            .min()
            .filter(|_| room)?;
        Some(match self.slot_retry {
            Some(retry) => earliest.max(retry),
            None => earliest,
        })
    }

    /// Polls every open job that is due, in item order.
    async fn poll_due(&mut self) -> Result<Option<StepEnd>> {
        let now = Instant::now();
        let due: Vec<u32> = self
            .open
            .iter()
            .filter(|(_, o)| o.next_poll <= now)
            .map(|(item, _)| *item)
            .collect();
        for item in due {
            if let Some(wait) = self.request_wait().await? {
                // The key is paused or its rate is spent: poll later (parking if long).
                if let Some(open) = self.open.get_mut(&item) {
                    open.next_poll = Instant::now() + wait;
                }
                continue;
            }
            let Some(open) = self.open.get(&item) else {
                continue;
            };
            let ctx = self.run.context(self.step, 1, self.outputs.clone());
            let job = open.job.clone();
            let polled = tokio::select! {
                polled = guarded(|| self.work.poll(ctx, item, job)) => polled,
                () = self.run.cancel.cancelled() => return Ok(Some(StepEnd::Stopped)),
            };
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
        let Some(open) = self.open.get_mut(&item) else {
            return Ok(None);
        };
        match polled {
            Ok(JobStatus::Pending { next_poll }) => {
                open.polls += 1;
                open.poll_errors = 0;
                let wait = match next_poll {
                    Some(hint) => hint.clamp(POLL_HINT_MIN, POLL_HINT_MAX),
                    None => step.poll_backoff.random_delay(open.polls),
                };
                open.next_poll = Instant::now() + wait;
                Ok(None)
            }
            Ok(JobStatus::Done(output)) => {
                if let Some(reason) = output.unstorable() {
                    return self.job_failed(item, StepError::permanent(reason)).await;
                }
                let waited = (Utc::now() - open.submitted_at)
                    .to_std()
                    .unwrap_or_default();
                let duration_ms = u64::try_from(waited.as_millis()).unwrap_or(u64::MAX);
                self.open.remove(&item);
                self.run.complete(step, item, output, duration_ms).await?;
                self.release(item).await?;
                Ok(None)
            }
            Ok(JobStatus::Failed(error)) => self.job_failed(item, error).await,
            Err(error) => {
                self.run.respect_retry_after(step, &error).await;
                if error.kind == FailureKind::Permanent {
                    // The poll was refused (a revoked key, say), not the job: it may still
                    // run and be paid for. Its submission stays open, so once the cause is
                    // fixed, `reel retry` polls it rather than paying again.
                    return Ok(Some(StepEnd::GaveUp {
                        error: StepError {
                            message: format!("polling job: {}", error.message),
                            ..error
                        },
                        item,
                    }));
                }
                open.poll_errors += 1;
                let unanswered = (Utc::now() - open.submitted_at)
                    .to_std()
                    .unwrap_or_default();
                if unanswered >= step.job_timeout {
                    let lost = StepError::transient(format!(
                        "job lost: no answer for {}s ({})",
                        unanswered.as_secs(),
                        error.message
                    ));
                    return self.job_failed(item, lost).await;
                }
                tracing::warn!(task = %self.run.log.lease.task, step = %step.name(), item, error = %error.message, "poll failed; polling again later");
                let wait = step
                    .poll_backoff
                    .random_delay(open.poll_errors)
                    .max(error.retry_after.unwrap_or_default());
                open.next_poll = Instant::now() + wait;
                Ok(None)
            }
        }
    }

    /// The job ended without a result: record it (closing the submission), then submit
    /// anew within the retry policy, or give up.
    async fn job_failed(&mut self, item: u32, error: StepError) -> Result<Option<StepEnd>> {
        self.open.remove(&item);
        let tries = self.failed_try(item);
        self.record_failure(item, &error, tries).await?;
        self.release(item).await?;
        Ok(self.retry_or_give_up(item, error, tries))
    }

    /// Counts a failed try of `item` and returns its number.
    fn failed_try(&mut self, item: u32) -> u32 {
        let tries = self.tries.entry(item).or_default();
        *tries += 1;
        *tries
    }

    async fn record_failure(&self, item: u32, error: &StepError, tries: u32) -> Result<()> {
        self.run.respect_retry_after(self.step, error).await;
        self.run
            .log
            .append(vec![Event::ItemFailed {
                step: self.step.name().to_owned(),
                item,
                attempt: self.run.attempt,
                kind: error.kind,
                error: error.message.clone(),
                retry: tries,
            }])
            .await?;
        Ok(())
    }

    fn retry_or_give_up(&mut self, item: u32, error: StepError, tries: u32) -> Option<StepEnd> {
        let policy = self.step.retry;
        if error.kind == FailureKind::Permanent || tries >= policy.max_tries.max(1) {
            return Some(StepEnd::GaveUp { error, item });
        }
        let wait = policy
            .backoff
            .random_delay(tries)
            .max(error.retry_after.unwrap_or_default());
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
            let until = Utc::now()
                + chrono::Duration::from_std(self.step.job_timeout.max(SLOT_TTL))
                    .unwrap_or_default();
            self.run
                .store
                .hold_slots(&limits.key, self.owner(), &[item], until)
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
        let room = self.step.concurrency.saturating_sub(self.open.len());
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
                self.slot_retry = (granted.len() < ready.len()).then(|| Instant::now() + SLOT_WAIT);
                granted
            }
            None => ready,
        };
        for item in granted {
            if self.run.drain.is_cancelled() || self.run.cancel.is_cancelled() {
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
                format!("reel/{task}/{}/{item}/{number}", self.step.name()).as_bytes(),
            )
            .to_string(),
        };
        let ctx = self.run.context(self.step, tries + 1, self.outputs.clone());
        let submitted = tokio::select! {
            submitted = guarded(|| self.work.submit(ctx, item, submission)) => submitted,
            () = self.run.cancel.cancelled() => return Ok(Some(StepEnd::Stopped)),
        };
        // A job id the log cannot store cannot be polled by a later run either.
        let submitted = submitted.and_then(|job| match crate::outputs::holds_nul(&job) {
            true => Err(StepError::permanent(
                "the provider's job id contains a NUL character, which the log cannot \
                 store; the job may still run and be charged",
            )),
            false => Ok(job),
        });
        match submitted {
            Ok(job) => {
                // Recorded before anything else: from here on, every run polls this job.
                self.run
                    .log
                    .append(vec![Event::ItemSubmitted {
                        step: self.step.name().to_owned(),
                        item,
                        attempt: self.run.attempt,
                        submission: number,
                        job: job.clone(),
                    }])
                    .await?;
                self.submissions.insert(item, number);
                self.to_submit.remove(&item);
                self.keep_slot_for_job(item).await?;
                let first_poll = self.step.poll_backoff.random_delay(1);
                self.open.insert(
                    item,
                    Open {
                        job,
                        submitted_at: Utc::now(),
                        polls: 0,
                        poll_errors: 0,
                        next_poll: Instant::now() + first_poll,
                    },
                );
                Ok(None)
            }
            Err(error) => {
                let tries = self.failed_try(item);
                self.record_failure(item, &error, tries).await?;
                self.release(item).await?;
                Ok(self.retry_or_give_up(item, error, tries))
            }
        }
    }
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
