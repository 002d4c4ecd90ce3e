//! reel's engine: a durable workflow engine on an event-sourced log in PostgreSQL.
//!
//! Every fact about a task is an immutable event appended to the task's stream. The
//! store ([`PgStore`]) appends with optimistic concurrency and lease fencing, reads one
//! stream in version order, and reads all streams in a gap-safe global order for
//! projectors ([`Subscription`]).
//!
//! ```no_run
//! use engine::prelude::*;
//!
//! # async fn demo(pool: sqlx::PgPool) -> engine::Result<()> {
//! let store = PgStore::new(pool);
//! store.migrate().await?;
//! let channel = ChannelId::parse("history")?;
//! let task = store
//!     .create_task(NewTask::new("video", channel, serde_json::json!({"topic": "Rome"})))
//!     .await?
//!     .task_id();
//! let events = store.read_stream(task, 1).await?;
//! assert_eq!(events[0].event.event_type(), "task_submitted");
//! # Ok(())
//! # }
//! ```

pub mod audit;
pub mod commands;
pub mod db;
mod error;
mod event;
mod id;
pub mod metrics;
mod orchestrator;
mod outputs;
#[cfg(feature = "service")]
pub mod service;
mod state;
mod status;
mod store;
pub mod telemetry;
#[cfg(feature = "test-util")]
pub mod testing;
pub mod timeline;
mod worker;
mod workflow;

pub use error::{Error, Result};
pub use event::no_deadline;
pub use event::{
    CURRENT_SCHEMA_VERSION, Event, EventMetadata, FIRST_SCHEMA_VERSION, FailureKind, NewEvent,
    PollSchedule, RecordedEvent, StepRenamed, upcast,
};
pub use id::{ChannelId, TaskId, truncate_for_display};
pub use orchestrator::{HOLD_SPARE, Orchestrator, PARK_AFTER, RunOutcome, SLOT_TTL};
pub use outputs::{ItemOutput, JSON_DEPTH_MAX, Output, Outputs, too_deep};
pub use state::{
    ItemFailure, ItemRecord, OpenJob, ResumeRecord, RetryRecord, ReviewOutcome, SignalRecord,
    StepProgress, StepState, TaskState, Totals, UpgradeRecord, WaitRecord, fold, signal_seen_since,
};
pub use status::{InvalidStatus, TaskStatus};
pub use store::TxIdHorizon;
pub use store::{
    Appended, AppliedLimits, Checkpoint, Created, EVENTS_CHANNEL, Fence, Lease, LogPage, MIGRATOR,
    NewTask, OrphanJob, PROGRESS_MAX_TASKS, PgStore, ProviderOverview, QueuedItems, ShapeChange,
    SlotOwner, Stranded, StreamAppend, Subscription, SubscriptionOptions, TaskCursor, TaskFilter,
    TaskSummary,
};
pub use store::{ArchiveCandidate, ArchiveCommit, ArchiveFilter, RestoreOutcome, StoredEvent};
pub use store::{
    InboxSignal, SIGNAL_NAME_MAX_CHARS, SignalSent, check_signal_data, check_signal_name,
};
/// The token a step's [`StepContext::cancel`] is: long work watches it to stop early.
pub use tokio_util::sync::CancellationToken;
pub use worker::{Attempt, UNTIL_IDLE_OUTAGE_LIMIT, Worker, WorkerOptions, WorkerReport};
pub use workflow::{
    Backoff, BoxFuture, DEFAULT_JOB_TIMEOUT, DEFAULT_POLL_BACKOFF, ERROR_MESSAGE_MAX_CHARS,
    JobStatus, JobWork, Plan, ProviderLimits, RATE_PACED_WIDTH, Registry, RetryPolicy, Step,
    StepContext, StepError, StepRef, StepStatus, StepWork, Submission, TaskRetryPolicy, WaitFor,
    Workflow, WorkflowVersion,
};

/// What a workflow author imports: defining workflows and steps (typed outputs, plans,
/// handles, waits, cancellation), running them with a worker, and reading a task's folded
/// state. Storage (appends, leases, global reads) is not here: import it from the crate
/// root when you need it.
pub mod prelude {
    pub use crate::{
        Attempt, Backoff, CancellationToken, ChannelId, FailureKind, ItemOutput, JobStatus,
        JobWork, NewTask, Output, PgStore, Plan, ProviderLimits, Registry, RetryPolicy, RunOutcome,
        Step, StepContext, StepError, StepRef, StepWork, Submission, TaskId, TaskRetryPolicy,
        TaskState, TaskStatus, Worker, WorkerOptions, WorkerReport, Workflow, WorkflowVersion,
        fold,
    };
}
