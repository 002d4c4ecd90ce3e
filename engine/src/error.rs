//! The engine's one error type.

use crate::id::TaskId;

/// Everything that can go wrong in the engine, typed so callers can decide what to do.
///
/// Store failures (`Conflict`, `LeaseLost`, `Decode`, `Database`) are kept apart from input
/// errors (`InvalidId`, `InvalidChannel`, ...) so a worker knows which ones a retry can fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The stream was not at the version the append expected: someone else appended first.
    /// Nothing was written. Re-read the stream, decide again, and retry.
    #[error("conflict on task {stream}: expected version {expected}, stream is at {actual}")]
    Conflict {
        stream: TaskId,
        expected: u32,
        actual: u32,
    },

    /// The append carried a lease epoch that is no longer current: another worker claimed
    /// the task since. Nothing was written; this worker must stop working on the task.
    #[error("lease lost on task {task}: epoch {epoch} is no longer current")]
    LeaseLost { task: TaskId, epoch: i64 },

    /// A stored event could not be read as a known event type and schema version.
    #[error(
        "cannot decode event at global position {position} \
         (task {stream}, version {version}, type {event_type:?} v{schema_version}): {reason}"
    )]
    Decode {
        position: i64,
        stream: TaskId,
        version: u32,
        event_type: String,
        schema_version: i16,
        reason: String,
    },

    /// No task (stream) with this id exists.
    #[error("task {0} not found")]
    TaskNotFound(TaskId),

    /// An event id that is already stored elsewhere (another stream or version) was reused.
    #[error("event id {event_id} is already stored at another stream position")]
    EventIdReused { event_id: uuid::Uuid },

    /// An idempotency key was reused for a submission that differs from the stored one.
    #[error("idempotency key {key:?} already names task {existing} with different parameters")]
    IdempotencyKeyReused { key: String, existing: TaskId },

    /// Workflow versions whose shape here differs from the one first recorded for them
    /// (a worker with `strict_versions` refuses to start).
    #[error("{}", shape_changes(.0))]
    ShapeChanged(Vec<crate::store::ShapeChange>),

    /// The task cannot move to version `to` of its workflow: the rules `to` declares
    /// (see `Workflow::accepts`) do not cover its history, and nothing was written.
    #[error("task {task} cannot be upgraded from {workflow} v{from} to v{to}: {reason}")]
    UpgradeRefused {
        task: crate::id::TaskId,
        workflow: String,
        from: u32,
        to: u32,
        reason: String,
    },

    /// The task names a workflow this process does not know.
    #[error("unknown workflow {0:?}")]
    UnknownWorkflow(String),

    /// A step name that the task's workflow does not have.
    #[error("workflow {workflow:?} has no step {step:?} (steps: {known})")]
    UnknownStep {
        workflow: String,
        step: String,
        known: String,
    },

    /// The task is not in a status that allows the action.
    #[error("task {task} is {status}; cannot {action}")]
    InvalidState {
        task: TaskId,
        status: crate::status::TaskStatus,
        action: &'static str,
    },

    /// A review decision on a task whose workflow has no review gate.
    #[error(
        "task {task} ({workflow}) is {status}; its workflow has no review gate, so there is nothing to {action}"
    )]
    NoReview {
        task: TaskId,
        workflow: String,
        status: crate::status::TaskStatus,
        action: &'static str,
    },

    /// The task's history is in an archive (`reel archive`), not in the log: restore it
    /// first (`reel restore`, or the archive's restore in a program).
    #[error(
        "task {task}'s history is archived at {location}: restore it first (reel restore {task})"
    )]
    Archived { task: TaskId, location: String },

    /// A task id that is not a UUID.
    #[error(
        "invalid task id {input:?}: expected a UUID such as 1b4e28ba-2fa1-11d2-883f-0016d3cca427"
    )]
    InvalidId { input: String },

    /// A channel id outside `[a-z0-9_-]{1,64}`.
    #[error("invalid channel id {input:?}: use 1 to 64 characters of a-z, 0-9, '_' or '-'")]
    InvalidChannel { input: String },

    /// A value that breaks an engine limit or invariant (an empty append, a version overflow).
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// An event could not be encoded to JSON.
    #[error("cannot encode event: {0}")]
    Encode(#[from] serde_json::Error),

    /// Applying migrations failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),

    /// An append was not made because the append it was grouped with (one statement, one
    /// commit) failed for a reason that is not this error's own to copy — a database error,
    /// say — or its run stopped writing it. Nothing of it is known to be stored; the
    /// events' ids make retrying it safe.
    #[error("append to task {task} not made: {reason}")]
    AppendFailed { task: TaskId, reason: String },

    /// The database failed or could not be reached. Usually transient: retry with backoff.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),

    /// The first connection to PostgreSQL failed: the server is down, refused the login,
    /// or has no such database. The message is one line that says what to do about it;
    /// it never contains the URL's password.
    #[error("cannot connect to PostgreSQL at {host}:{port}: {cause}; {hint}")]
    Unreachable {
        host: String,
        port: u16,
        /// What went wrong, e.g. `connection refused` or `database "x" does not exist`.
        cause: String,
        /// The fix, e.g. the command that starts the server.
        hint: String,
    },
}

impl Error {
    /// A `Decode` error because the event comes from a newer build — an event type or a
    /// schema version this build does not know — rather than a corrupt payload.
    pub fn is_from_a_newer_build(&self) -> bool {
        match self {
            Error::Decode { reason, .. } => {
                reason.starts_with("unknown event type")
                    || reason.starts_with("unknown schema version")
            }
            _ => false,
        }
    }

    /// Whether PostgreSQL could not be reached or gave up on the statement for a reason
    /// of its own — the connection, the server shutting down or starting, its resources,
    /// a lock or statement timeout, a serialization failure — so the same statement may
    /// succeed later. A statement the server refused for what it says (a missing table, a
    /// prepared statement a transaction pooler lost, a permission) is not an outage: it
    /// will be refused again.
    pub fn is_outage(&self) -> bool {
        match self {
            Error::Unreachable { .. } => true,
            Error::Database(err) => match err {
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed => true,
                sqlx::Error::Database(db) => db.code().is_some_and(|code| {
                    code.starts_with("08")
                        || code.starts_with("53")
                        || code.starts_with("57P")
                        || ["40001", "40P01", "55P03", "57014"].contains(&code.as_ref())
                }),
                _ => false,
            },
            _ => false,
        }
    }

    /// Whether retrying the same operation later may succeed (database outages, conflicts).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Conflict { .. } | Error::AppendFailed { .. } => true,
            Error::Database(e) => !matches!(
                e,
                sqlx::Error::ColumnDecode { .. }
                    | sqlx::Error::Decode(_)
                    | sqlx::Error::TypeNotFound { .. }
                    | sqlx::Error::ColumnNotFound(_)
            ),
            _ => false,
        }
    }
}

/// The engine's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn shape_changes(changes: &[crate::store::ShapeChange]) -> String {
    let changes: Vec<String> = changes.iter().map(ToString::to_string).collect();
    format!(
        "refusing to start (--strict-versions): {}",
        changes.join("; ")
    )
}
