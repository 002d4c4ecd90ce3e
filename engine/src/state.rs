//! The fold: a task's state is its history, replayed.
//!
//! `fold` is pure and synchronous — no I/O, no clock — and is the only interpretation of
//! events: the orchestrator decides what to run from it, the CLI and audits print it.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use crate::event::{Event, FailureKind, PollSchedule, RecordedEvent};
use crate::id::{ChannelId, TaskId};
use crate::status::TaskStatus;

/// Replays `events` (in stream order) into the task's state.
pub fn fold<'a>(events: impl IntoIterator<Item = &'a RecordedEvent>) -> TaskState {
    let mut state = TaskState::default();
    for event in events {
        state.apply(event);
    }
    state
}

/// One completed item, as recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ItemRecord {
    pub item: u32,
    pub attempt: u32,
    pub artifact: String,
    pub cost_micros: i64,
    pub duration_ms: u64,
    /// The stream version of the `item_completed` event.
    pub version: u32,
    /// The step's result (absent when the item returned none, and in logs recorded
    /// before outputs existed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
}

/// One failed try of an item.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ItemFailure {
    pub item: u32,
    pub attempt: u32,
    pub kind: FailureKind,
    pub error: String,
    pub retry: u32,
    pub version: u32,
    /// A submit that got no answer: the provider may have accepted (and charge for) it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unanswered: bool,
    /// The provider refused for now and said when to come back (a 429): no try was used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl ItemFailure {
    /// A refusal for now (a 429 with its wait), which uses none of the item's tries.
    pub fn rate_limited(&self) -> bool {
        self.retry_after_ms.is_some() && !self.unanswered
    }
}

/// A provider job submitted for an item and not yet closed (no completion, no failure
/// since): what a run polls instead of submitting again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OpenJob {
    pub item: u32,
    /// The task attempt that submitted it.
    pub attempt: u32,
    /// The item's submission number (1 = first).
    pub submission: u32,
    /// What the provider returned on acceptance: its job id and whatever polling needs.
    pub job: Value,
    /// When the submission was recorded.
    pub submitted_at: DateTime<Utc>,
    /// The stream version of the `item_submitted` event.
    pub version: u32,
    /// Its poll schedule as of the last park (none before the first).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schedule: Option<PollSchedule>,
}

/// Cost and time, summed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub items: u32,
    pub cost_micros: i64,
    pub duration_ms: u64,
}

impl Totals {
    fn add(&mut self, record: &ItemRecord) {
        self.items += 1;
        self.cost_micros += record.cost_micros;
        self.duration_ms += record.duration_ms;
    }
}

/// How far the running step is (what `reel tasks` shows as "12/18").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct StepProgress {
    pub step: String,
    /// Items complete in the step's current run.
    pub done: u32,
    /// Items it planned.
    pub of: u32,
}

/// A step's progress in its current run (a rejected review starts a new run).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StepState {
    pub name: String,
    /// 1 for the first run; +1 each time a review rejection sends the task back here.
    pub run: u32,
    /// Items planned by the latest `step_started` of this run (None: not started).
    pub planned: Option<u32>,
    pub atomic: bool,
    pub completed: bool,
    /// Completions of this run, by item.
    pub items: BTreeMap<u32, ItemRecord>,
    pub failures: Vec<ItemFailure>,
    /// Completions of earlier runs, replaced by a redo (kept for cost accounting).
    pub superseded: Vec<ItemRecord>,
    /// Items completed again although already complete in this run (ignored; audits report).
    pub duplicates: Vec<u32>,
    /// Provider jobs submitted in this run and still open, by item.
    pub open_jobs: BTreeMap<u32, OpenJob>,
    /// Submissions per item over every run (the next submission's number is one more).
    pub submissions: BTreeMap<u32, u32>,
    /// The name the step had when the task first ran it, when an upgrade renamed it since
    /// (provider idempotency keys keep using it, so a submit retried across the rename
    /// is still recognised by the provider).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_name: Option<String>,
    /// The workflow version whose upgrade removed the step: its history stays, nothing
    /// runs it again, and no later step may take its name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub removed_in: Option<u32>,
    /// Waits its items started in this run (see [`Event::WaitStarted`]), in log order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub waits: Vec<WaitRecord>,
    /// The stream version where this run began (0 for the first run; a rejected review's
    /// version for a redo): only signals received after it count for its waits, so a
    /// redone step waits for a new signal.
    #[serde(skip_serializing_if = "is_zero")]
    pub run_since: u32,
    /// When this run began (the rejected review's time): a signal sent before it, even if
    /// a worker records it only later, is the earlier run's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_since_at: Option<DateTime<Utc>>,
}

fn is_zero(value: &u32) -> bool {
    *value == 0
}

/// A durable wait an item started (see [`Event::WaitStarted`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WaitRecord {
    pub item: u32,
    pub attempt: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sleep: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
    /// The stream version of the `wait_started` event.
    pub version: u32,
}

/// Whether a run that began at stream version `since` (at `since_at`) reads `signal`.
pub fn signal_seen_since(
    signal: &SignalRecord,
    since: u32,
    since_at: Option<DateTime<Utc>>,
) -> bool {
    signal.version > since && since_at.is_none_or(|at| signal.sent_at >= at)
}

/// A signal the task received (see [`Event::SignalReceived`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SignalRecord {
    pub name: String,
    pub signal_id: String,
    pub data: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    pub sent_at: DateTime<Utc>,
    /// Its place among the task's signals in the order they were sent (absent in logs
    /// that did not record it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u32>,
    /// The stream version of the `signal_received` event.
    pub version: u32,
}

impl StepState {
    /// Whether this run of the step reads `signal`: recorded after the run began and sent
    /// after it began (a redone step waits for a new signal).
    pub fn sees(&self, signal: &SignalRecord) -> bool {
        signal_seen_since(signal, self.run_since, self.run_since_at)
    }

    /// The wait `item` recorded for the signal `signal` in this run, if any.
    pub fn signal_wait(&self, item: u32, signal: &str) -> Option<&WaitRecord> {
        self.waits
            .iter()
            .find(|w| w.item == item && w.signal.as_deref() == Some(signal))
    }

    /// The wait `item` recorded for its sleep called `sleep` in this run, if any: its
    /// `until` is when the sleep ends.
    pub fn sleep_wait(&self, item: u32, sleep: &str) -> Option<&WaitRecord> {
        self.waits
            .iter()
            .find(|w| w.item == item && w.sleep.as_deref() == Some(sleep))
    }

    /// The name provider idempotency keys are derived from: the step's first name.
    pub fn key_name(&self) -> &str {
        self.first_name.as_deref().unwrap_or(&self.name)
    }

    /// Items of `1..=planned` with no completion in this run, in order. `planned` is the
    /// step's plan now: completions beyond it are ignored (see [`StepState::extra_items`]).
    pub fn missing_items(&self, planned: u32) -> Vec<u32> {
        (1..=planned)
            .filter(|i| !self.items.contains_key(i))
            .collect()
    }

    /// Completed items beyond `planned` (the plan shrank): ignored for progress, reported.
    pub fn extra_items(&self, planned: u32) -> Vec<u32> {
        self.items
            .keys()
            .copied()
            .filter(|i| *i > planned || *i == 0)
            .collect()
    }
}

/// A scheduled retry of the whole task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RetryRecord {
    pub attempt: u32,
    pub next_run_at: DateTime<Utc>,
    pub reason: String,
}

/// What a resumed attempt did not have to redo.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ResumeRecord {
    /// The attempt that resumed.
    pub attempt: u32,
    /// Items already complete when it started, by step.
    pub skipped: BTreeMap<String, Vec<u32>>,
    /// Their recorded cost and time: what resuming saved.
    pub saved: Totals,
}

/// A move to a newer workflow version (see [`Event::TaskUpgraded`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UpgradeRecord {
    pub from: u32,
    pub to: u32,
    /// Steps renamed, old name to new.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub renamed: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// The stream version of the `task_upgraded` event.
    pub version: u32,
}

/// The human review's outcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ReviewOutcome {
    Approved {
        reviewer: Option<String>,
    },
    Rejected {
        redo_from: String,
        reason: Option<String>,
    },
}

fn is_first_version(version: &u32) -> bool {
    *version <= 1
}

/// Everything known about a task, rebuilt from its events.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct TaskState {
    pub task_id: Option<TaskId>,
    pub workflow: String,
    /// The workflow version the task was submitted for (1 for tasks recorded before
    /// versions; 0 before `task_submitted` was applied).
    #[serde(skip_serializing_if = "is_first_version")]
    pub workflow_version: u32,
    pub channel_id: Option<ChannelId>,
    pub input: Value,
    pub notion_page_id: Option<String>,
    pub status: Option<TaskStatus>,
    /// The name the status is shown as, when the log recorded one (see
    /// [`TaskState::status_display`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_shown_as: Option<String>,
    /// The version of the last applied event: the next append's expected version.
    pub version: u32,
    /// The current task attempt (the number of claims so far).
    pub attempt: u32,
    /// Attempts made before the last operator retry (they do not count against the
    /// workflow's attempt limit).
    pub budget_base: u32,
    /// Attempts that gave up on a transient failure (`retry_scheduled`) since the last
    /// operator retry: what the workflow's attempt limit counts. Claims that ended
    /// otherwise (a shutdown, a takeover, a crash) do not use up the budget.
    #[serde(skip)]
    pub failed_attempts: u32,
    pub steps: Vec<StepState>,
    /// Moves to newer versions of the workflow, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub upgrades: Vec<UpgradeRecord>,
    pub retries: Vec<RetryRecord>,
    pub resumes: Vec<ResumeRecord>,
    pub failure: Option<String>,
    pub reviews_requested: u32,
    pub review: Option<ReviewOutcome>,
    pub cancelled: bool,
    /// Everything spent, including superseded runs and items later redone.
    pub spent: Totals,
    /// Provider jobs submitted (every `item_submitted`, all runs and attempts).
    pub jobs_submitted: u32,
    /// Submits that got no answer (each may have started a job the provider charges for).
    pub submits_unanswered: u32,
    /// Times the task was parked to wait on provider jobs.
    pub parks: u32,
    /// Signals received, in log order (see [`Event::SignalReceived`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub signals: Vec<SignalRecord>,
    /// The (name, id) of each signal received: a repeat changes nothing.
    #[serde(skip)]
    signal_keys: std::collections::HashSet<(String, String)>,
    /// Parked: the next claim resumes the current attempt (set by `task_parked`, cleared
    /// by the claim that follows it).
    #[serde(skip)]
    pub parked: bool,
    /// The step whose `step_started` came last, and the status the task had then: while
    /// the task still has it, that step is the one running (see [`TaskState::progress`]).
    #[serde(skip)]
    running_step: Option<(String, TaskStatus)>,
    /// Position of each step in `steps`, by name (replay stays linear in the events).
    #[serde(skip)]
    step_index: HashMap<String, usize>,
    /// The step order of the version the task was last upgraded to: where a step that
    /// starts later takes its place in `steps` (empty: the order steps first ran in).
    #[serde(skip)]
    step_order: Vec<String>,
}

impl TaskState {
    /// The task's status (`queued` before any event).
    pub fn status(&self) -> TaskStatus {
        self.status.unwrap_or(TaskStatus::QUEUED)
    }

    /// The name the status is shown as: the one the log recorded with it, else the
    /// status's default (logs recorded before display names were).
    pub fn status_display(&self) -> std::borrow::Cow<'_, str> {
        match &self.status_shown_as {
            Some(name) => std::borrow::Cow::Borrowed(name),
            None => self.status().default_display(),
        }
    }

    /// How far the running step is: its items done in this run, of those it planned
    /// (`None` while no step runs: queued, parked between steps, in review, ended).
    pub fn progress(&self) -> Option<StepProgress> {
        let (name, status) = self.running_step.as_ref()?;
        if self.status() != *status || !status.is_step_status() {
            return None;
        }
        let step = self.step(name)?;
        let of = step.planned?;
        if step.completed {
            return None;
        }
        let done = step
            .items
            .keys()
            .filter(|&&i| (1..=of).contains(&i))
            .count();
        Some(StepProgress {
            step: name.clone(),
            done: u32::try_from(done).unwrap_or(u32::MAX),
            of,
        })
    }

    /// The state of `step` in its current run, if it ever started.
    pub fn step(&self, name: &str) -> Option<&StepState> {
        self.step_index.get(name).map(|&i| &self.steps[i])
    }

    /// The first signal called `name` that `step`'s current run can see (received after
    /// the run began: a redone step waits for a new one).
    pub fn signal_for(&self, step: &str, name: &str) -> Option<&SignalRecord> {
        let step = self.step(step);
        self.signals
            .iter()
            .find(|s| s.name == name && step.is_none_or(|step| step.sees(s)))
    }

    /// Whether a signal with this name and id was received.
    pub fn has_signal(&self, name: &str, signal_id: &str) -> bool {
        self.signal_keys
            .contains(&(name.to_owned(), signal_id.to_owned()))
    }

    /// The highest `seq` of the signals the log holds (0: none).
    pub fn last_signal_seq(&self) -> u32 {
        self.signals.iter().filter_map(|s| s.seq).max().unwrap_or(0)
    }

    /// Provider jobs submitted and not yet closed, over every step.
    pub fn open_jobs(&self) -> usize {
        self.steps.iter().map(|s| s.open_jobs.len()).sum()
    }

    /// The open jobs' poll schedules as the last park recorded them.
    pub fn poll_schedule(&self) -> Vec<PollSchedule> {
        self.steps
            .iter()
            .flat_map(|step| step.open_jobs.values())
            .filter_map(|open| open.schedule.clone())
            .collect()
    }

    /// What all resumes saved, summed.
    pub fn saved(&self) -> Totals {
        self.resumes.iter().fold(Totals::default(), |mut sum, r| {
            sum.items += r.saved.items;
            sum.cost_micros += r.saved.cost_micros;
            sum.duration_ms += r.saved.duration_ms;
            sum
        })
    }

    /// Applies one event. Events at or below the current version were already applied
    /// (a redelivery) and change nothing.
    pub fn apply(&mut self, recorded: &RecordedEvent) {
        if recorded.version <= self.version {
            return;
        }
        self.version = recorded.version;
        self.task_id.get_or_insert(recorded.stream_id);
        let version = recorded.version;
        match &recorded.event {
            Event::TaskSubmitted {
                workflow,
                channel_id,
                input,
                notion_page_id,
                workflow_version,
                ..
            } => {
                self.workflow.clone_from(workflow);
                self.workflow_version = workflow_version.unwrap_or(1);
                self.channel_id = Some(channel_id.clone());
                self.input = input.clone();
                self.notion_page_id.clone_from(notion_page_id);
                self.status.get_or_insert(TaskStatus::QUEUED);
            }
            Event::TaskClaimed { attempt, .. } => {
                if std::mem::take(&mut self.parked) {
                    // Resuming a parked task continues its attempt: nothing was redone.
                    self.attempt = self.attempt.max(*attempt);
                } else {
                    self.claimed(*attempt);
                }
            }
            Event::ItemSubmitted {
                step,
                item,
                attempt,
                submission,
                job,
            } => {
                self.jobs_submitted += 1;
                let state = self.step_mut(step);
                let count = state.submissions.entry(*item).or_default();
                *count = (*count).max(*submission);
                state.open_jobs.insert(
                    *item,
                    OpenJob {
                        item: *item,
                        attempt: *attempt,
                        submission: *submission,
                        job: job.clone(),
                        submitted_at: recorded.recorded_at,
                        version,
                        schedule: None,
                    },
                );
            }
            Event::TaskParked { schedule, .. } => {
                self.parks += 1;
                self.parked = true;
                for planned in schedule {
                    let Some(&index) = self.step_index.get(&planned.step) else {
                        continue;
                    };
                    if let Some(open) = self.steps[index].open_jobs.get_mut(&planned.item)
                        && open.submission == planned.submission
                    {
                        open.schedule = Some(planned.clone());
                    }
                }
            }
            Event::StepStarted {
                step,
                items,
                atomic,
                ..
            } => {
                self.running_step = Some((step.clone(), self.status()));
                let state = self.step_mut(step);
                state.planned = Some(*items);
                state.atomic = *atomic;
            }
            Event::ItemCompleted {
                step,
                item,
                attempt,
                artifact,
                cost_micros,
                duration_ms,
                output,
            } => {
                let record = ItemRecord {
                    item: *item,
                    attempt: *attempt,
                    artifact: artifact.clone(),
                    cost_micros: *cost_micros,
                    duration_ms: *duration_ms,
                    version,
                    output: output.clone(),
                };
                self.spent.add(&record);
                let state = self.step_mut(step);
                state.open_jobs.remove(item);
                if state.items.contains_key(item) {
                    state.duplicates.push(*item);
                } else {
                    state.items.insert(*item, record);
                }
            }
            Event::ItemFailed {
                step,
                item,
                attempt,
                kind,
                error,
                retry,
                unanswered,
                retry_after_ms,
            } => {
                if *unanswered {
                    self.submits_unanswered += 1;
                }
                let state = self.step_mut(step);
                if !unanswered {
                    // It closes the item's open submission (the job failed or was lost); an
                    // unanswered submit had none recorded.
                    state.open_jobs.remove(item);
                }
                state.failures.push(ItemFailure {
                    item: *item,
                    attempt: *attempt,
                    kind: *kind,
                    error: error.clone(),
                    retry: *retry,
                    version,
                    unanswered: *unanswered,
                    retry_after_ms: *retry_after_ms,
                });
            }
            Event::StepCompleted { step, .. } => self.step_mut(step).completed = true,
            Event::WaitStarted {
                step,
                item,
                attempt,
                signal,
                sleep,
                until,
            } => self.step_mut(step).waits.push(WaitRecord {
                item: *item,
                attempt: *attempt,
                signal: signal.clone(),
                sleep: sleep.clone(),
                until: *until,
                version,
            }),
            Event::SignalReceived {
                name,
                signal_id,
                data,
                by,
                sent_at,
                seq,
            } => {
                if self.signal_keys.insert((name.clone(), signal_id.clone())) {
                    self.signals.push(SignalRecord {
                        name: name.clone(),
                        signal_id: signal_id.clone(),
                        data: data.clone(),
                        by: by.clone(),
                        sent_at: *sent_at,
                        seq: *seq,
                        version,
                    });
                }
            }
            Event::StatusChanged {
                from,
                to,
                to_display,
            } => {
                if *to == TaskStatus::QUEUED
                    && (*from == TaskStatus::FAILED || *from == TaskStatus::RETRY_SCHEDULED)
                {
                    // An operator retry: the task gets a fresh attempt budget.
                    self.budget_base = self.attempt;
                    self.failed_attempts = 0;
                }
                if *to == TaskStatus::QUEUED {
                    // Back in the queue (a retry of a task that was settling its jobs): the
                    // next claim starts an attempt of its own.
                    self.parked = false;
                }
                self.status = Some(*to);
                self.status_shown_as.clone_from(to_display);
            }
            Event::RetryScheduled {
                attempt,
                next_run_at,
                reason,
            } => {
                self.failed_attempts += 1;
                self.retries.push(RetryRecord {
                    attempt: *attempt,
                    next_run_at: *next_run_at,
                    reason: reason.clone(),
                });
            }
            Event::TaskFailed { reason, .. } => {
                self.failure = Some(reason.clone());
                // Waiting is over; a park that follows (to settle open jobs) sets it again.
                self.parked = false;
            }
            Event::ReviewRequested {} => {
                self.reviews_requested += 1;
                self.review = None;
            }
            Event::ReviewApproved { reviewer } => {
                self.review = Some(ReviewOutcome::Approved {
                    reviewer: reviewer.clone(),
                });
            }
            Event::ReviewRejected { redo_from, reason } => {
                self.supersede_from(redo_from, version, recorded.recorded_at);
                self.review = Some(ReviewOutcome::Rejected {
                    redo_from: redo_from.clone(),
                    reason: reason.clone(),
                });
            }
            Event::TaskCompleted {} => {}
            Event::TaskCancelled { .. } => {
                self.cancelled = true;
                self.parked = false;
            }
            Event::TaskUpgraded {
                from,
                to,
                renamed,
                removed,
                steps,
                by,
                ..
            } => {
                for rename in renamed {
                    self.rename_step(&rename.from, &rename.to);
                }
                for name in removed {
                    if let Some(&index) = self.step_index.get(name) {
                        self.steps[index].removed_in.get_or_insert(*to);
                    }
                }
                self.order_steps(steps);
                self.workflow_version = *to;
                self.upgrades.push(UpgradeRecord {
                    from: *from,
                    to: *to,
                    renamed: renamed
                        .iter()
                        .map(|r| (r.from.clone(), r.to.clone()))
                        .collect(),
                    by: by.clone(),
                    version,
                });
            }
        }
    }

    /// An upgrade put the steps in the new version's `order`: the steps it no longer has
    /// first (their history stays, and nothing redoes them), then its own in its order.
    /// `supersede_from` reads "this step and every later one" in this order.
    fn order_steps(&mut self, order: &[String]) {
        if order.is_empty() {
            return;
        }
        order.clone_into(&mut self.step_order);
        let rank = |step: &StepState| order.iter().position(|name| *name == step.name);
        // A stable sort: removed steps keep the order they ran in.
        self.steps
            .sort_by_key(|step| rank(step).map_or(0, |at| at + 1));
        self.index_steps();
    }

    fn index_steps(&mut self) {
        self.step_index = self
            .steps
            .iter()
            .enumerate()
            .map(|(index, step)| (step.name.clone(), index))
            .collect();
    }

    /// An upgrade renamed step `from` to `to`: its history (items, outputs, open jobs,
    /// submissions) continues under the new name. A name the task has no history under,
    /// or a new name it already has history under, changes nothing (the upgrade refuses
    /// the latter before it is recorded).
    fn rename_step(&mut self, from: &str, to: &str) {
        if self.step_index.contains_key(to) {
            return;
        }
        let Some(index) = self.step_index.remove(from) else {
            return;
        };
        let step = &mut self.steps[index];
        if step.first_name.is_none() {
            step.first_name = Some(std::mem::replace(&mut step.name, to.to_owned()));
        } else {
            to.clone_into(&mut step.name);
        }
        self.step_index.insert(to.to_owned(), index);
        if let Some((running, _)) = &mut self.running_step
            && running == from
        {
            to.clone_into(running);
        }
    }

    fn claimed(&mut self, attempt: u32) {
        let resumes = self.attempt > 0;
        self.attempt = attempt;
        if !resumes {
            return;
        }
        let mut record = ResumeRecord {
            attempt,
            ..ResumeRecord::default()
        };
        for step in &self.steps {
            if step.items.is_empty() {
                continue;
            }
            record
                .skipped
                .insert(step.name.clone(), step.items.keys().copied().collect());
            for item in step.items.values() {
                record.saved.add(item);
            }
        }
        if record.saved.items > 0 {
            self.resumes.push(record);
        }
    }

    fn step_mut(&mut self, name: &str) -> &mut StepState {
        let index = match self.step_index.get(name) {
            Some(&index) => index,
            None => {
                let step = StepState {
                    name: name.to_owned(),
                    run: 1,
                    ..StepState::default()
                };
                // After an upgrade, a step that starts takes its place in the version's order.
                let rank = |name: &str| self.step_order.iter().position(|n| n == name);
                match rank(name) {
                    Some(at) => {
                        let index = self
                            .steps
                            .iter()
                            .position(|s| rank(&s.name).is_some_and(|other| other > at))
                            .unwrap_or(self.steps.len());
                        self.steps.insert(index, step);
                        self.index_steps();
                        index
                    }
                    None => {
                        self.steps.push(step);
                        self.step_index
                            .insert(name.to_owned(), self.steps.len() - 1);
                        self.steps.len() - 1
                    }
                }
            }
        };
        &mut self.steps[index]
    }

    /// A rejected review sends the task back to `redo_from`: that step and every step that
    /// started after it begin a new run; their completions are superseded.
    fn supersede_from(&mut self, redo_from: &str, version: u32, at: DateTime<Utc>) {
        let Some(&first) = self.step_index.get(redo_from) else {
            return;
        };
        for step in &mut self.steps[first..] {
            let old = std::mem::take(&mut step.items);
            step.superseded.extend(old.into_values());
            step.open_jobs.clear();
            step.run += 1;
            step.planned = None;
            step.completed = false;
            step.waits.clear();
            step.run_since = version;
            step.run_since_at = Some(at);
        }
    }
}
