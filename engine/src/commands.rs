//! Operator commands on a task: review decisions, cancellation, retries and upgrades.
//!
//! Each reads the task's state, checks the action is allowed, and appends with the version
//! it read (no lease: a racing worker or operator makes the append conflict, never both win).
//! A conflict is looked at again: the worker may have appended something that changes
//! nothing for the command (a park, a poll's result), and then the command goes through;
//! if it does change something, the check says so.

use crate::error::{Error, Result};
use crate::event::{Event, NewEvent};
use crate::id::TaskId;
use crate::state::{TaskState, fold};
use crate::status::TaskStatus;
use crate::store::{Fence, PgStore};
use crate::workflow::Registry;

/// Accepts the result of a task in `final_review`: it becomes `completed`.
pub async fn approve(store: &PgStore, task: TaskId, reviewer: Option<String>) -> Result<TaskState> {
    approve_as(store, task, reviewer, None).await
}

/// [`approve`], recording who asked (`actor`: the events' `metadata.actor`).
pub async fn approve_as(
    store: &PgStore,
    task: TaskId,
    reviewer: Option<String>,
    actor: Option<&str>,
) -> Result<TaskState> {
    again_on_conflict(|| approve_once(store, task, reviewer.clone(), actor)).await
}

async fn approve_once(
    store: &PgStore,
    task: TaskId,
    reviewer: Option<String>,
    actor: Option<&str>,
) -> Result<TaskState> {
    let state = load(store, task, "approve").await?;
    require_review(task, &state, "approve")?;
    let events = vec![
        Event::ReviewApproved { reviewer },
        Event::status_changed(TaskStatus::FINAL_REVIEW, TaskStatus::COMPLETED),
        Event::TaskCompleted {},
    ];
    commit(store, task, state.version, events, actor).await
}

/// Sends a task in `final_review` back: `redo_from` and every later step run again (their
/// earlier completions are superseded); earlier steps are kept. `redo_from` must be one of
/// the steps the task's history shows: no workflow code is needed.
pub async fn reject(
    store: &PgStore,
    task: TaskId,
    redo_from: &str,
    reason: Option<String>,
) -> Result<TaskState> {
    reject_as(store, task, redo_from, reason, None).await
}

/// [`reject`], recording who asked (`actor`: the events' `metadata.actor`).
pub async fn reject_as(
    store: &PgStore,
    task: TaskId,
    redo_from: &str,
    reason: Option<String>,
    actor: Option<&str>,
) -> Result<TaskState> {
    again_on_conflict(|| reject_once(store, task, redo_from, reason.clone(), actor)).await
}

async fn reject_once(
    store: &PgStore,
    task: TaskId,
    redo_from: &str,
    reason: Option<String>,
    actor: Option<&str>,
) -> Result<TaskState> {
    let state = load(store, task, "reject").await?;
    // A step an upgrade removed is history: nothing runs it again.
    if state.step(redo_from).is_none_or(|s| s.removed_in.is_some()) {
        let known: Vec<&str> = state
            .steps
            .iter()
            .filter(|s| s.removed_in.is_none())
            .map(|s| s.name.as_str())
            .collect();
        return Err(Error::UnknownStep {
            workflow: state.workflow.clone(),
            step: crate::id::truncate_for_display(redo_from, 40),
            known: known.join(", "),
        });
    }
    require_review(task, &state, "reject")?;
    let events = vec![
        Event::ReviewRejected {
            redo_from: redo_from.to_owned(),
            reason,
        },
        Event::status_changed(TaskStatus::FINAL_REVIEW, TaskStatus::QUEUED),
    ];
    commit(store, task, state.version, events, actor).await
}

/// A review decision needs a task in `final_review`; a task that finished without ever
/// asking for one (its workflow has no review gate) gets an error that says so.
fn require_review(task: TaskId, state: &TaskState, action: &'static str) -> Result<()> {
    if state.reviews_requested == 0 && state.status() == TaskStatus::COMPLETED {
        return Err(Error::NoReview {
            task,
            workflow: state.workflow.clone(),
            status: state.status(),
            action,
        });
    }
    require(task, state, action, |s| s == TaskStatus::FINAL_REVIEW)
}

/// Cancels a task that is not finished. A worker running it stops at its next item
/// boundary (its next append conflicts and it re-reads the stream).
pub async fn cancel(store: &PgStore, task: TaskId, reason: Option<String>) -> Result<TaskState> {
    cancel_as(store, task, reason, None).await
}

/// [`cancel`], recording who asked (`actor`: the events' `metadata.actor`).
pub async fn cancel_as(
    store: &PgStore,
    task: TaskId,
    reason: Option<String>,
    actor: Option<&str>,
) -> Result<TaskState> {
    again_on_conflict(|| cancel_once(store, task, reason.clone(), actor)).await
}

async fn cancel_once(
    store: &PgStore,
    task: TaskId,
    reason: Option<String>,
    actor: Option<&str>,
) -> Result<TaskState> {
    let state = match load(store, task, "cancel").await {
        Err(err @ Error::Decode { .. }) => {
            return cancel_unreadable(store, task, reason, err, actor).await;
        }
        other => other?,
    };
    require(task, &state, "cancel", |s| !s.is_terminal())?;
    let mut events = vec![
        Event::TaskCancelled { reason },
        Event::status_changed(state.status(), TaskStatus::CANCELLED),
    ];
    // Provider jobs still in flight are paid for: they are polled to their end and what
    // they made and cost recorded. The task is parked for a worker to do that — once the
    // lease of a worker running it now would have ended, so that a job it is submitting
    // this moment is recorded first (its worker sees the cancel and records it).
    let open = state.open_jobs();
    if open > 0 {
        store.sync_clock().await?;
        let now = store.now();
        let until = store
            .lease_held_until(task)
            .await?
            .map_or(now, |held| held.max(now));
        events.push(Event::TaskParked {
            until,
            jobs: u32::try_from(open).unwrap_or(u32::MAX),
            waiting: 0,
            schedule: state.poll_schedule(),
        });
    }
    let cancelled = commit(store, task, state.version, events, actor).await?;
    // A parked task's places in its providers' queues would hold newer tasks back; its
    // jobs still in flight keep their slots until they end.
    store.withdraw_waiting(task).await?;
    Ok(cancelled)
}

/// Sends `task` the signal `name` carrying `data`, idempotent by `signal_id` (see
/// [`PgStore::send_signal`]), as `actor`. A task parked waiting for it is woken; a task
/// not waiting yet reads it when it does.
pub async fn signal(
    store: &PgStore,
    task: TaskId,
    name: &str,
    signal_id: &str,
    data: &serde_json::Value,
    actor: Option<&str>,
) -> Result<crate::store::SignalSent> {
    store.send_signal(task, name, signal_id, data, actor).await
}

/// Sends a `failed` task (or one waiting for its scheduled retry) back to the queue to
/// run now, with a fresh attempt budget. It resumes by replay: completed items are kept.
pub async fn retry(store: &PgStore, task: TaskId) -> Result<TaskState> {
    retry_as(store, task, None).await
}

/// [`retry`], recording who asked (`actor`: the events' `metadata.actor`).
pub async fn retry_as(store: &PgStore, task: TaskId, actor: Option<&str>) -> Result<TaskState> {
    again_on_conflict(|| retry_once(store, task, actor)).await
}

async fn retry_once(store: &PgStore, task: TaskId, actor: Option<&str>) -> Result<TaskState> {
    let state = load(store, task, "retry").await?;
    require(task, &state, "retry", |s| {
        s == TaskStatus::FAILED || s == TaskStatus::RETRY_SCHEDULED
    })?;
    let events = vec![Event::status_changed(state.status(), TaskStatus::QUEUED)];
    commit(store, task, state.version, events, actor).await
}

/// Moves a task to version `to` of its workflow (`task_upgraded`, by `operator`), as the
/// rules that version declares allow (see `Workflow::accepts`); refuses, writing nothing,
/// when they do not cover the task's history, when `registry` lacks version `to`, or while
/// a worker holds the task (it would be changed under a run in flight).
pub async fn upgrade(
    store: &PgStore,
    registry: &Registry,
    task: TaskId,
    to: u32,
) -> Result<TaskState> {
    again_on_conflict(|| upgrade_once(store, registry, task, to)).await
}

async fn upgrade_once(
    store: &PgStore,
    registry: &Registry,
    task: TaskId,
    to: u32,
) -> Result<TaskState> {
    let state = load(store, task, "upgrade").await?;
    let from = state.workflow_version.max(1);
    let refused = |reason: String| Error::UpgradeRefused {
        task,
        workflow: state.workflow.clone(),
        from,
        to,
        reason,
    };
    let Some(target) = registry.get_version(&state.workflow, to) else {
        let known: Vec<String> = registry
            .versions()
            .iter()
            .filter(|w| w.name() == state.workflow)
            .map(|w| format!("v{}", w.version_number()))
            .collect();
        return Err(refused(if known.is_empty() {
            format!("this binary does not have workflow {:?}", state.workflow)
        } else {
            format!("this binary has {} of it, not v{to}", known.join(", "))
        }));
    };
    let shape = store.recorded_shape(&state.workflow, from).await?;
    let mut upgraded = target.upgrade(&state, shape.as_deref()).map_err(&refused)?;
    if let Some(until) = store.lease_held_until(task).await? {
        return Err(refused(format!(
            "a worker holds it (its lease lasts until {}): upgrade it once the lease ends",
            until.format("%Y-%m-%d %H:%M:%S UTC")
        )));
    }
    if let Event::TaskUpgraded { by, .. } = &mut upgraded {
        *by = Some("operator".to_owned());
    }
    store
        .upgrade_task(
            task,
            state.version,
            Fence::Unleased,
            NewEvent::new(upgraded),
        )
        .await?;
    load(store, task, "upgrade").await
}

/// Cancels a task whose history this build cannot fold, from its `tasks` row: an
/// operator can always stop a task, whatever its log holds.
async fn cancel_unreadable(
    store: &PgStore,
    task: TaskId,
    reason: Option<String>,
    err: Error,
    actor: Option<&str>,
) -> Result<TaskState> {
    let Some(status) = store.task_status(task).await? else {
        return Err(err);
    };
    if status.is_terminal() {
        return Err(Error::InvalidState {
            task,
            status,
            action: "cancel",
        });
    }
    let version = store.stream_version(task).await?;
    let events = [
        Event::TaskCancelled { reason },
        Event::status_changed(status, TaskStatus::CANCELLED),
    ];
    let batch = with_actor(events.into(), actor);
    let appended = store.append(task, version, Fence::Unleased, &batch).await?;
    let mut state = TaskState::default();
    state.task_id = Some(task);
    state.status = Some(TaskStatus::CANCELLED);
    state.version = appended.version;
    state.cancelled = true;
    Ok(state)
}

/// How often a command that conflicted with another append reads the task again.
const CONFLICT_RETRIES: u32 = 10;

/// Runs a command, again while it conflicts with a concurrent append (up to
/// [`CONFLICT_RETRIES`] times): each try reads the task afresh and checks it again.
async fn again_on_conflict<F, Fut>(mut command: F) -> Result<TaskState>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<TaskState>>,
{
    for _ in 0..CONFLICT_RETRIES {
        match command().await {
            Err(Error::Conflict { .. }) => continue,
            done => return done,
        }
    }
    command().await
}

/// The task's state for `action`. An archived task is finished: only a failed one can be
/// retried or upgraded, after a restore (`Archived` says so); any other action is refused
/// as its status refuses it.
async fn load(store: &PgStore, task: TaskId, action: &'static str) -> Result<TaskState> {
    let events = store.read_stream(task, 1).await?;
    if events.is_empty() {
        let Some(location) = store.archive_location(task).await? else {
            return Err(Error::TaskNotFound(task));
        };
        let status = store
            .task_status(task)
            .await?
            .unwrap_or(TaskStatus::COMPLETED);
        return Err(
            if status == TaskStatus::FAILED && matches!(action, "retry" | "upgrade") {
                Error::Archived { task, location }
            } else {
                Error::InvalidState {
                    task,
                    status,
                    action,
                }
            },
        );
    }
    Ok(fold(&events))
}

fn require(
    task: TaskId,
    state: &TaskState,
    action: &'static str,
    allowed: impl Fn(TaskStatus) -> bool,
) -> Result<()> {
    if allowed(state.status()) {
        Ok(())
    } else {
        Err(Error::InvalidState {
            task,
            status: state.status(),
            action,
        })
    }
}

async fn commit(
    store: &PgStore,
    task: TaskId,
    version: u32,
    events: Vec<Event>,
    actor: Option<&str>,
) -> Result<TaskState> {
    let batch = with_actor(events, actor);
    store.append(task, version, Fence::Unleased, &batch).await?;
    load(store, task, "load").await
}

/// The events to append, each with `actor` (if any) in its metadata.
fn with_actor(events: Vec<Event>, actor: Option<&str>) -> Vec<NewEvent> {
    let metadata = crate::event::EventMetadata {
        actor: actor.map(str::to_owned),
        ..Default::default()
    };
    events
        .into_iter()
        .map(|event| NewEvent::new(event).with_metadata(metadata.clone()))
        .collect()
}
