//! Auditing a task's history: the invariants every stream the engine writes must keep.
//!
//! A pure function over the events, like the fold (and using it): it reports every broken
//! rule with the task, the version and the rule's stable name, so an operator can find the
//! exact event. The status transition table lives here, once.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::event::{Event, RecordedEvent, StepRenamed};
use crate::id::TaskId;
use crate::state::{TaskState, Totals};
use crate::status::TaskStatus;

mod scan;

pub use scan::{ScanSummary, Scope, audit_stored, audit_up_to, scan};

/// The invariants, by stable snake_case name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// Versions run 1, 2, 3, … with no hole and no repeat.
    VersionsContiguous,
    /// The first event is `task_submitted`, and only the first.
    SubmittedFirst,
    /// No item is completed twice within one run of a step.
    ItemCompletedOnce,
    /// Every `item_completed` follows a `step_started` of its step (in the current run)
    /// and lies within that step's plan.
    CompletionInStartedStep,
    /// Status changes follow the transition table and start from the current status.
    LegalTransition,
    /// After `task_completed`, `task_cancelled` or `task_failed`, only review or retry
    /// events may follow, and the settling of provider jobs the task left open: parks and
    /// claims, the end (completion or failure) of a job that was open, and the recorded
    /// acceptance of a submit that was in flight when the task ended (before any later
    /// claim).
    NothingAfterTerminal,
    /// A resumed attempt runs only the items that were still missing when it started.
    RetrySkipsCompleted,
    /// Every event has a known type and schema version and a valid payload.
    KnownEvents,
    /// An item has at most one open provider job: no `item_submitted` while an earlier
    /// submission of the item has neither a completion nor a failure (a job paid twice).
    OneOpenSubmission,
    /// An artifact whose item recorded its size and SHA-256 is still on disk, unchanged.
    /// The pure audit cannot see files: whoever knows the artifacts' root checks this
    /// (`reel audit --artifacts DIR`).
    ArtifactIntact,
    /// A `task_upgraded` moves the task from the version it is on to a newer one, renames
    /// only steps it has history under to names it has none under, and comes before the
    /// task completed.
    UpgradeForward,
    /// An item that waited for a signal completes only once a signal of that name reached
    /// its step's run (or its wait's deadline passed); one that slept completes only once
    /// its sleep ended (by the log's clock, within a second).
    WaitHonored,
}

impl Rule {
    /// Every rule.
    pub const ALL: [Rule; 12] = [
        Rule::VersionsContiguous,
        Rule::SubmittedFirst,
        Rule::ItemCompletedOnce,
        Rule::CompletionInStartedStep,
        Rule::LegalTransition,
        Rule::NothingAfterTerminal,
        Rule::RetrySkipsCompleted,
        Rule::KnownEvents,
        Rule::OneOpenSubmission,
        Rule::ArtifactIntact,
        Rule::UpgradeForward,
        Rule::WaitHonored,
    ];
}

/// One broken rule at one event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Violation {
    pub task: TaskId,
    /// The stream version of the offending event.
    pub version: u32,
    pub rule: Rule,
    pub message: String,
}

/// A task's audit: what broke, and what the history says it cost and saved.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AuditReport {
    pub task: TaskId,
    pub status: TaskStatus,
    pub events: usize,
    pub violations: Vec<Violation>,
    /// Every item completion recorded (all runs and attempts).
    pub items_run: u32,
    /// Items a resumed attempt did not have to run again.
    pub items_skipped: u32,
    pub spent: Totals,
    pub saved: Totals,
    /// Provider jobs submitted (two-phase items; every submission, all attempts).
    pub jobs_submitted: u32,
    /// Submits that got no answer: each may have started a job the provider charges for
    /// (a possible payment the log cannot confirm). Absent when none.
    #[serde(skip_serializing_if = "is_zero")]
    pub submits_unanswered: u32,
    /// The state the history folds to (its completed items and their outputs), for checks
    /// beyond the log's own, such as the artifacts on disk. Not serialized.
    #[serde(skip)]
    pub state: TaskState,
}

impl AuditReport {
    /// True when no rule is broken.
    pub fn is_clean(&self) -> bool {
        self.violations.is_empty()
    }
}

fn is_zero(value: &u32) -> bool {
    *value == 0
}

/// Whether a task may move from `from` to `to`. A step's status (any status that is not
/// one of the lifecycle's) is "working": the table holds for every workflow.
pub fn transition_allowed(from: TaskStatus, to: TaskStatus) -> bool {
    let working = TaskStatus::is_step_status;
    // How a run can end before, between or after its steps; `completed` only after the last
    // step (workflows without a review gate) or after a review.
    let stops = [
        TaskStatus::FINAL_REVIEW,
        TaskStatus::FAILED,
        TaskStatus::CANCELLED,
        TaskStatus::RETRY_SCHEDULED,
    ];
    if from == TaskStatus::QUEUED || from == TaskStatus::RETRY_SCHEDULED {
        working(to)
            || stops.contains(&to)
            || (from == TaskStatus::RETRY_SCHEDULED && to == TaskStatus::QUEUED)
    } else if working(from) {
        working(to) || stops.contains(&to) || to == TaskStatus::COMPLETED
    } else if from == TaskStatus::FINAL_REVIEW {
        to == TaskStatus::COMPLETED || to == TaskStatus::QUEUED || to == TaskStatus::CANCELLED
    } else if from == TaskStatus::FAILED {
        to == TaskStatus::QUEUED
    } else {
        false
    }
}

/// Audits one task's stream (in version order).
pub fn audit(task: TaskId, events: &[RecordedEvent]) -> AuditReport {
    let mut checker = Checker {
        task,
        violations: Vec::new(),
        state: TaskState::default(),
        terminal: None,
        claimed_since_terminal: false,
        resumed_with: BTreeMap::new(),
    };
    for (index, event) in events.iter().enumerate() {
        checker.check(index, event);
        checker.state.apply(event);
    }
    let state = checker.state;
    let saved = state.saved();
    AuditReport {
        task,
        status: state.status(),
        events: events.len(),
        violations: checker.violations,
        items_run: state.spent.items,
        items_skipped: saved.items,
        spent: state.spent,
        saved,
        jobs_submitted: state.jobs_submitted,
        submits_unanswered: state.submits_unanswered,
        state,
    }
}

struct Checker {
    task: TaskId,
    violations: Vec<Violation>,
    /// The state before the event being checked.
    state: TaskState,
    /// The terminal event seen last, until a retry or review reopens the task.
    terminal: Option<&'static str>,
    /// A claim came after the terminal event (a worker settling the task's open jobs).
    claimed_since_terminal: bool,
    /// Per step: the items already complete when the current attempt claimed the task.
    resumed_with: BTreeMap<String, BTreeSet<u32>>,
}

impl Checker {
    fn flag(&mut self, version: u32, rule: Rule, message: String) {
        self.violations.push(Violation {
            task: self.task,
            version,
            rule,
            message,
        });
    }

    fn check(&mut self, index: usize, recorded: &RecordedEvent) {
        let version = recorded.version;
        let expected = u32::try_from(index + 1).unwrap_or(u32::MAX);
        if version != expected {
            self.flag(
                version,
                Rule::VersionsContiguous,
                format!("expected version {expected}, found {version}"),
            );
        }
        let submitted = matches!(recorded.event, Event::TaskSubmitted { .. });
        if submitted != (index == 0) {
            let message = if submitted {
                "task_submitted after the first event"
            } else {
                "the first event is not task_submitted"
            };
            self.flag(version, Rule::SubmittedFirst, message.to_owned());
        }
        self.check_terminal(version, &recorded.event);
        match &recorded.event {
            Event::TaskClaimed { .. } => {
                self.resumed_with = self
                    .state
                    .steps
                    .iter()
                    .map(|s| (s.name.clone(), s.items.keys().copied().collect()))
                    .collect();
            }
            Event::ItemCompleted { step, item, .. } => {
                self.check_completion(version, step, *item);
                self.check_waits(version, step, *item, recorded.recorded_at);
            }
            Event::ItemSubmitted { step, item, .. } => {
                if let Some(open) = self.state.step(step).and_then(|s| s.open_jobs.get(item)) {
                    self.flag(
                        version,
                        Rule::OneOpenSubmission,
                        format!(
                            "{step} item {item} submitted again while its submission at version {} is still open",
                            open.version
                        ),
                    );
                }
            }
            Event::StatusChanged { from, to, .. } => {
                let current = self.state.status();
                if *from != current {
                    self.flag(
                        version,
                        Rule::LegalTransition,
                        format!("status_changed from {from}, but the task is {current}"),
                    );
                } else if !transition_allowed(*from, *to) {
                    self.flag(
                        version,
                        Rule::LegalTransition,
                        format!("{from} -> {to} is not an allowed transition"),
                    );
                }
            }
            Event::TaskUpgraded {
                from, to, renamed, ..
            } => self.check_upgrade(version, *from, *to, renamed),
            Event::ReviewRejected { redo_from, .. } => {
                // The redone steps start afresh: their earlier items are not "already complete".
                if let Some(first) = self.state.steps.iter().position(|s| &s.name == redo_from) {
                    for step in &self.state.steps[first..] {
                        self.resumed_with.remove(&step.name);
                    }
                }
            }
            _ => {}
        }
    }

    fn check_upgrade(&mut self, version: u32, from: u32, to: u32, renamed: &[StepRenamed]) {
        let current = self.state.workflow_version.max(1);
        if from != current || to <= from {
            self.flag(
                version,
                Rule::UpgradeForward,
                format!("task_upgraded v{from} -> v{to}, but the task is on v{current}"),
            );
        }
        if self.state.status() == TaskStatus::COMPLETED {
            self.flag(
                version,
                Rule::UpgradeForward,
                format!("task_upgraded while the task is {}", self.state.status()),
            );
        }
        for rename in renamed {
            if self.state.step(&rename.to).is_some() {
                self.flag(
                    version,
                    Rule::UpgradeForward,
                    format!(
                        "{} renamed {}, but the task already has history under {}",
                        rename.from, rename.to, rename.to
                    ),
                );
            }
            // What was done before the rename is still done after it.
            if let Some(done) = self.resumed_with.remove(&rename.from) {
                self.resumed_with.insert(rename.to.clone(), done);
            }
        }
    }

    fn check_completion(&mut self, version: u32, step: &str, item: u32) {
        let progress = self.state.step(step);
        let planned = progress.and_then(|p| p.planned);
        let first = progress.and_then(|p| p.items.get(&item)).map(|r| r.version);
        let resumed = self
            .resumed_with
            .get(step)
            .is_some_and(|done| done.contains(&item));
        match planned {
            None => self.flag(
                version,
                Rule::CompletionInStartedStep,
                format!("{step} item {item} completed, but {step} was not started"),
            ),
            Some(planned) if item == 0 || item > planned => self.flag(
                version,
                Rule::CompletionInStartedStep,
                format!("{step} item {item} is outside the plan of {planned}"),
            ),
            Some(_) => {}
        }
        if let Some(first) = first {
            let (rule, why) = if resumed {
                (Rule::RetrySkipsCompleted, "a resumed attempt ran it again")
            } else {
                (Rule::ItemCompletedOnce, "completed twice in one run")
            };
            self.flag(
                version,
                rule,
                format!("{step} item {item}: {why} (first at version {first})"),
            );
        }
    }

    fn check_waits(
        &mut self,
        version: u32,
        step: &str,
        item: u32,
        at: chrono::DateTime<chrono::Utc>,
    ) {
        let Some(progress) = self.state.step(step) else {
            return;
        };
        // The log's clock against the worker's estimate of it: a second of slack.
        let passed = |until: Option<chrono::DateTime<chrono::Utc>>| {
            until.is_some_and(|until| at + chrono::Duration::seconds(1) >= until)
        };
        let mut broken = Vec::new();
        for wait in progress.waits.iter().filter(|w| w.item == item) {
            if let Some(name) = &wait.signal
                && self.state.signal_for(step, name).is_none()
                && !passed(wait.until)
            {
                broken.push(format!(
                    "{step} item {item} completed without the signal {name} it waited for (wait at version {})",
                    wait.version
                ));
            }
            if let Some(name) = &wait.sleep
                && wait.until.is_some()
                && !passed(wait.until)
            {
                broken.push(format!(
                    "{step} item {item} completed before its sleep {name} ended (wait at version {})",
                    wait.version
                ));
            }
        }
        for message in broken {
            self.flag(version, Rule::WaitHonored, message);
        }
    }

    fn check_terminal(&mut self, version: u32, event: &Event) {
        let reopens = matches!(
            event,
            Event::StatusChanged {
                to: TaskStatus::QUEUED,
                ..
            } | Event::ReviewRequested {}
                | Event::ReviewApproved { .. }
                | Event::ReviewRejected { .. }
        );
        // The terminal event's own status change travels in the same append.
        let own_status = match (self.terminal, event) {
            (Some("task_failed"), Event::StatusChanged { to, .. }) => *to == TaskStatus::FAILED,
            (Some("task_cancelled"), Event::StatusChanged { to, .. }) => {
                *to == TaskStatus::CANCELLED
            }
            _ => false,
        };
        if let Some(terminal) = self.terminal {
            if reopens {
                self.terminal = None;
            } else if !own_status && !self.settles(terminal, event) {
                self.flag(
                    version,
                    Rule::NothingAfterTerminal,
                    format!("{} after {terminal}", event.event_type()),
                );
            }
        }
        match event {
            Event::TaskCompleted {} | Event::TaskCancelled { .. } => {
                self.terminal = Some(event.event_type());
                self.claimed_since_terminal = false;
            }
            // The failure's own status change rides with it.
            Event::TaskFailed { .. } => {
                self.terminal = Some("task_failed");
                self.claimed_since_terminal = false;
            }
            Event::TaskClaimed { .. } => self.claimed_since_terminal = true,
            _ => {}
        }
    }

    /// Whether `event`, after `terminal`, belongs to settling the jobs the task left open.
    fn settles(&self, terminal: &str, event: &Event) -> bool {
        if terminal == "task_completed" {
            return false;
        }
        let was_open = |step: &str, item: &u32| {
            self.state
                .step(step)
                .is_some_and(|s| s.open_jobs.contains_key(item))
        };
        let was_done = |step: &str, item: &u32| {
            self.state
                .step(step)
                .is_some_and(|s| s.items.contains_key(item))
        };
        match event {
            // Settling may need a newer version (the task's own is no longer deployed), and
            // a failed task may be moved to one before it is retried.
            Event::TaskClaimed { .. } | Event::TaskParked { .. } | Event::TaskUpgraded { .. } => {
                true
            }
            Event::ItemCompleted { step, item, .. } => was_open(step, item),
            // The submit in flight when the task ended, answered or not: once, from the
            // run that was going (no claim since), for an item neither done nor open.
            Event::ItemFailed {
                step,
                item,
                unanswered: true,
                ..
            }
            | Event::ItemSubmitted { step, item, .. } => {
                !self.claimed_since_terminal && !was_done(step, item) && !was_open(step, item)
            }
            Event::ItemFailed { step, item, .. } => was_open(step, item),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::FailureKind;
    use crate::id::ChannelId;

    fn history(events: Vec<Event>) -> (TaskId, Vec<RecordedEvent>) {
        let task = TaskId::new();
        (task, RecordedEvent::in_memory_stream(task, events))
    }

    fn submitted() -> Event {
        Event::TaskSubmitted {
            workflow: "video".into(),
            channel_id: ChannelId::parse("history").expect("channel"),
            input: serde_json::json!({}),
            notion_page_id: None,
            idempotency_key: None,
            workflow_version: None,
        }
    }

    fn claimed(attempt: u32) -> Event {
        Event::TaskClaimed {
            worker_id: "w".into(),
            lease_epoch: i64::from(attempt),
            attempt,
        }
    }

    fn started(items: u32) -> Event {
        Event::StepStarted {
            step: "video".into(),
            attempt: 1,
            items,
            atomic: false,
        }
    }

    fn done(item: u32, attempt: u32) -> Event {
        Event::ItemCompleted {
            step: "video".into(),
            item,
            attempt,
            artifact: format!("clip-{item}"),
            cost_micros: 550_000,
            duration_ms: 300_000,
            output: None,
        }
    }

    fn status(from: TaskStatus, to: TaskStatus) -> Event {
        Event::status_changed(from, to)
    }

    /// A run that fails at clip 3, is rescheduled and resumes: the shape the engine writes.
    fn resumed_run() -> Vec<Event> {
        vec![
            submitted(),
            claimed(1),
            status(
                TaskStatus::QUEUED,
                TaskStatus::from_static("generating_video"),
            ),
            started(4),
            done(1, 1),
            done(2, 1),
            Event::ItemFailed {
                step: "video".into(),
                item: 3,
                attempt: 1,
                kind: FailureKind::Transient,
                error: "timeout".into(),
                retry: 1,
                unanswered: false,
                retry_after_ms: None,
            },
            Event::RetryScheduled {
                attempt: 1,
                next_run_at: chrono::DateTime::UNIX_EPOCH,
                reason: "video item 3".into(),
            },
            status(
                TaskStatus::from_static("generating_video"),
                TaskStatus::RETRY_SCHEDULED,
            ),
            claimed(2),
            status(
                TaskStatus::RETRY_SCHEDULED,
                TaskStatus::from_static("generating_video"),
            ),
            done(3, 2),
            done(4, 2),
            Event::StepCompleted {
                step: "video".into(),
                attempt: 2,
            },
            status(
                TaskStatus::from_static("generating_video"),
                TaskStatus::FINAL_REVIEW,
            ),
            Event::ReviewRequested {},
            Event::ReviewApproved { reviewer: None },
            status(TaskStatus::FINAL_REVIEW, TaskStatus::COMPLETED),
            Event::TaskCompleted {},
        ]
    }

    fn rules(events: Vec<Event>) -> Vec<(u32, Rule)> {
        let (task, recorded) = history(events);
        audit(task, &recorded)
            .violations
            .iter()
            .map(|v| (v.version, v.rule))
            .collect()
    }

    #[test]
    fn a_clean_resumed_run_passes_and_reports_what_resuming_saved() {
        let (task, recorded) = history(resumed_run());
        let report = audit(task, &recorded);
        assert!(report.is_clean(), "{:?}", report.violations);
        assert_eq!((report.items_run, report.items_skipped), (4, 2));
        assert_eq!(report.saved.cost_micros, 1_100_000);
        assert_eq!(report.status, TaskStatus::COMPLETED);
    }

    #[test]
    fn each_rule_is_caught_at_its_version() {
        let (task, mut recorded) = history(resumed_run());
        recorded.remove(4);
        let report = audit(task, &recorded);
        assert!(
            report
                .violations
                .iter()
                .any(|v| v.rule == Rule::VersionsContiguous && v.version == 6)
        );

        let mut twice = resumed_run();
        twice.insert(6, done(2, 1));
        assert!(rules(twice).contains(&(7, Rule::ItemCompletedOnce)));

        let mut rerun = resumed_run();
        rerun.insert(11, done(1, 2));
        assert!(rules(rerun).contains(&(12, Rule::RetrySkipsCompleted)));

        let mut unstarted = resumed_run();
        unstarted.remove(3);
        assert!(rules(unstarted).contains(&(4, Rule::CompletionInStartedStep)));

        let mut outside = resumed_run();
        outside.insert(6, done(9, 1));
        assert!(rules(outside).contains(&(7, Rule::CompletionInStartedStep)));

        let mut illegal = resumed_run();
        illegal.insert(2, status(TaskStatus::QUEUED, TaskStatus::COMPLETED));
        assert!(rules(illegal).contains(&(3, Rule::LegalTransition)));

        let mut after = resumed_run();
        after.push(done(4, 3));
        let found = rules(after);
        assert!(
            found.contains(&(20, Rule::NothingAfterTerminal)),
            "{found:?}"
        );

        let mut second_submit = resumed_run();
        second_submit.insert(1, submitted());
        assert!(rules(second_submit).contains(&(2, Rule::SubmittedFirst)));
    }

    /// An item that waited for `go` (or slept an hour), completed with or without it.
    #[test]
    fn an_item_that_waited_completes_only_after_its_signal_or_its_sleep() {
        let waited = |signal: Option<&str>, sleep: Option<&str>, until, received: bool| {
            let mut events = vec![
                submitted(),
                claimed(1),
                started(1),
                Event::WaitStarted {
                    step: "video".into(),
                    item: 1,
                    attempt: 1,
                    signal: signal.map(str::to_owned),
                    sleep: sleep.map(str::to_owned),
                    until,
                },
                Event::TaskParked {
                    until: crate::event::no_deadline(),
                    jobs: 0,
                    waiting: 0,
                    schedule: Vec::new(),
                },
                claimed(1),
            ];
            if received {
                events.push(Event::SignalReceived {
                    name: "go".into(),
                    signal_id: "1".into(),
                    data: serde_json::Value::Null,
                    by: None,
                    sent_at: chrono::Utc::now(),
                    seq: Some(1),
                });
            }
            events.push(done(1, 1));
            rules(events)
        };
        let at_done = |received: bool| if received { 8 } else { 7 };
        assert_eq!(
            waited(Some("go"), None, None, false),
            [(at_done(false), Rule::WaitHonored)]
        );
        assert!(waited(Some("go"), None, None, true).is_empty());
        // A deadline that passed ends the wait without the signal (in-memory events are
        // recorded at the epoch).
        let past = chrono::DateTime::UNIX_EPOCH - chrono::Duration::minutes(1);
        assert!(waited(Some("go"), None, Some(past), false).is_empty());
        let later = chrono::DateTime::UNIX_EPOCH + chrono::Duration::hours(1);
        assert_eq!(
            waited(None, Some("nap"), Some(later), false),
            [(at_done(false), Rule::WaitHonored)]
        );
        assert!(waited(None, Some("nap"), Some(past), false).is_empty());
    }

    fn upgrade(from: u32, renamed: &[(&str, &str)]) -> Event {
        Event::TaskUpgraded {
            from,
            to: from + 1,
            renamed: renamed
                .iter()
                .map(|(from, to)| crate::event::StepRenamed {
                    from: (*from).into(),
                    to: (*to).into(),
                })
                .collect(),
            added: Vec::new(),
            removed: Vec::new(),
            steps: Vec::new(),
            by: Some("w".into()),
        }
    }

    /// [`resumed_run`], upgraded to v2 right after its second claim with `video` renamed
    /// `clips`: what follows names the new step.
    fn upgraded_run() -> Vec<Event> {
        let mut events = resumed_run();
        events.insert(10, upgrade(1, &[("video", "clips")]));
        for event in &mut events[11..] {
            match event {
                Event::ItemCompleted { step, .. } | Event::StepCompleted { step, .. } => {
                    *step = "clips".into();
                }
                _ => {}
            }
        }
        events
    }

    #[test]
    fn an_upgrade_carries_the_renamed_steps_history() {
        let (task, recorded) = history(upgraded_run());
        let report = audit(task, &recorded);
        assert!(report.is_clean(), "{:?}", report.violations);
        assert_eq!((report.items_run, report.items_skipped), (4, 2));
        let steps: Vec<&str> = report.state.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(steps, ["clips"]);
        assert_eq!(report.state.steps[0].key_name(), "video");
        assert_eq!(report.state.workflow_version, 2);
        assert_eq!(report.state.upgrades.len(), 1);

        // An item completed before the upgrade, run again after it.
        let mut rerun = upgraded_run();
        rerun.insert(12, done_in("clips", 1, 2));
        assert!(rules(rerun).contains(&(13, Rule::RetrySkipsCompleted)));

        // From a version the task is not on; onto a step with history; after completion.
        let mut skipped = resumed_run();
        skipped.insert(10, upgrade(2, &[]));
        assert!(rules(skipped).contains(&(11, Rule::UpgradeForward)));
        let mut merged = resumed_run();
        merged.insert(10, upgrade(1, &[("video", "video")]));
        assert!(rules(merged).contains(&(11, Rule::UpgradeForward)));
        let mut late = resumed_run();
        late.push(upgrade(1, &[]));
        let found = rules(late);
        assert!(found.contains(&(20, Rule::UpgradeForward)), "{found:?}");
    }

    fn done_in(step: &str, item: u32, attempt: u32) -> Event {
        let mut event = done(item, attempt);
        if let Event::ItemCompleted { step: named, .. } = &mut event {
            *named = step.into();
        }
        event
    }

    /// Review of issue 28: a cancelled task with an open job, upgraded by the worker that
    /// settles it, is the engine's own path: the audit accepts it.
    #[test]
    fn settling_a_cancelled_task_on_a_newer_version_is_clean() {
        let events = vec![
            submitted(),
            claimed(1),
            status(
                TaskStatus::QUEUED,
                TaskStatus::from_static("generating_video"),
            ),
            started(1),
            Event::ItemSubmitted {
                step: "video".into(),
                item: 1,
                attempt: 1,
                submission: 1,
                job: serde_json::json!({"id": "j"}),
            },
            Event::TaskCancelled { reason: None },
            status(
                TaskStatus::from_static("generating_video"),
                TaskStatus::CANCELLED,
            ),
            claimed(2),
            upgrade(1, &[("video", "clips")]),
            done_in("clips", 1, 2),
        ];
        let found = rules(events);
        assert!(found.is_empty(), "{found:?}");
    }

    /// Review of issue 28: after an upgrade that adds a step before one already done, "redo
    /// from a step" follows the new version's order, not the order the steps first ran in.
    #[test]
    fn a_redo_after_an_upgrade_follows_the_new_versions_order() {
        let step_done = |step: &str| {
            [
                Event::StepStarted {
                    step: step.into(),
                    attempt: 1,
                    items: 1,
                    atomic: true,
                },
                done_in(step, 1, 1),
            ]
        };
        let mut events = vec![submitted(), claimed(1)];
        events.extend(step_done("a"));
        let mut upgraded = upgrade(1, &[]);
        if let Event::TaskUpgraded { steps, .. } = &mut upgraded {
            *steps = vec!["pre".into(), "a".into(), "b".into()];
        }
        events.push(upgraded);
        events.extend(step_done("pre"));
        events.extend(step_done("b"));
        events.push(Event::ReviewRejected {
            redo_from: "a".into(),
            reason: None,
        });
        let (_, recorded) = history(events);
        let state = crate::state::fold(&recorded);
        let order: Vec<&str> = state.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(order, ["pre", "a", "b"]);
        let kept: Vec<usize> = state.steps.iter().map(|s| s.items.len()).collect();
        assert_eq!(kept, [1, 0, 0], "pre comes before a: it is not redone");
    }

    #[test]
    fn a_failed_task_may_be_retried() {
        let events = vec![
            submitted(),
            claimed(1),
            Event::TaskFailed {
                reason: "bad input".into(),
                step: None,
                item: None,
            },
            status(TaskStatus::QUEUED, TaskStatus::FAILED),
            status(TaskStatus::FAILED, TaskStatus::QUEUED),
            claimed(2),
        ];
        assert_eq!(rules(events), []);
    }

    #[test]
    fn the_transition_table_allows_the_engine_paths_and_nothing_out_of_completed() {
        assert!(transition_allowed(
            TaskStatus::QUEUED,
            TaskStatus::from_static("generating_assets")
        ));
        assert!(transition_allowed(
            TaskStatus::FINAL_REVIEW,
            TaskStatus::QUEUED
        ));
        assert!(!transition_allowed(
            TaskStatus::COMPLETED,
            TaskStatus::QUEUED
        ));
        assert!(!transition_allowed(
            TaskStatus::CANCELLED,
            TaskStatus::QUEUED
        ));
        assert!(!transition_allowed(
            TaskStatus::QUEUED,
            TaskStatus::COMPLETED
        ));
        // Any workflow's step statuses are working statuses; a workflow without a review
        // gate ends `completed` straight from its last step.
        let writing = TaskStatus::from_static("writing_sections");
        let publishing = TaskStatus::from_static("publishing");
        assert!(transition_allowed(TaskStatus::QUEUED, writing));
        assert!(transition_allowed(writing, publishing));
        assert!(transition_allowed(publishing, TaskStatus::COMPLETED));
        assert!(!transition_allowed(TaskStatus::COMPLETED, writing));
    }
}
