//! Operator commands on a task: review decisions and cancellation.
//!
//! Each reads the task's state, checks the action is allowed, and appends with the version
//! it read (no lease: a racing worker or operator makes the append conflict, never both win).

use crate::error::{Error, Result};
use crate::event::{Event, NewEvent};
use crate::id::TaskId;
use crate::state::{TaskState, fold};
use crate::status::TaskStatus;
use crate::store::{EventStore, Fence, PgStore};
use crate::workflow::Workflow;

/// Accepts the result of a task in `final_review`: it becomes `completed`.
pub async fn approve(store: &PgStore, task: TaskId, reviewer: Option<String>) -> Result<TaskState> {
    let state = load(store, task).await?;
    require(task, &state, "approve", |s| s == TaskStatus::FinalReview)?;
    let events = vec![
        Event::ReviewApproved { reviewer },
        Event::StatusChanged {
            from: TaskStatus::FinalReview,
            to: TaskStatus::Completed,
        },
        Event::TaskCompleted {},
    ];
    commit(store, task, state.version, events).await
}

/// Sends a task in `final_review` back: `redo_from` and every later step run again (their
/// earlier completions are superseded); earlier steps are kept.
pub async fn reject(
    store: &PgStore,
    workflow: &Workflow,
    task: TaskId,
    redo_from: &str,
    reason: Option<String>,
) -> Result<TaskState> {
    if workflow.step_index(redo_from).is_none() {
        let known: Vec<&str> = workflow.steps().iter().map(|s| s.name()).collect();
        return Err(Error::UnknownStep {
            workflow: workflow.name().to_owned(),
            step: crate::id::truncate_for_display(redo_from, 40),
            known: known.join(", "),
        });
    }
    let state = load(store, task).await?;
    require(task, &state, "reject", |s| s == TaskStatus::FinalReview)?;
    let events = vec![
        Event::ReviewRejected {
            redo_from: redo_from.to_owned(),
            reason,
        },
        Event::StatusChanged {
            from: TaskStatus::FinalReview,
            to: TaskStatus::Queued,
        },
    ];
    commit(store, task, state.version, events).await
}

/// Cancels a task that is not finished. A worker running it stops at its next item
/// boundary (its next append conflicts and it re-reads the stream).
pub async fn cancel(store: &PgStore, task: TaskId, reason: Option<String>) -> Result<TaskState> {
    let state = load(store, task).await?;
    require(task, &state, "cancel", |s| !s.is_terminal())?;
    let events = vec![
        Event::TaskCancelled { reason },
        Event::StatusChanged {
            from: state.status(),
            to: TaskStatus::Cancelled,
        },
    ];
    commit(store, task, state.version, events).await
}

/// Sends a `failed` task (or one waiting for its scheduled retry) back to the queue to
/// run now, with a fresh attempt budget. It resumes by replay: completed items are kept.
pub async fn retry(store: &PgStore, task: TaskId) -> Result<TaskState> {
    let state = load(store, task).await?;
    require(task, &state, "retry", |s| {
        matches!(s, TaskStatus::Failed | TaskStatus::RetryScheduled)
    })?;
    let events = vec![Event::StatusChanged {
        from: state.status(),
        to: TaskStatus::Queued,
    }];
    commit(store, task, state.version, events).await
}

async fn load(store: &PgStore, task: TaskId) -> Result<TaskState> {
    let events = store.read_stream(task, 1).await?;
    if events.is_empty() {
        return Err(Error::TaskNotFound(task));
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
) -> Result<TaskState> {
    let batch: Vec<NewEvent> = events.into_iter().map(NewEvent::new).collect();
    store.append(task, version, Fence::Unleased, &batch).await?;
    load(store, task).await
}
