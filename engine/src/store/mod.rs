//! The event store on PostgreSQL: appends, stream and global reads, leases, checkpoints.

mod archive;
mod checkpoint;
mod clock;
mod durations;
mod leader;
mod lease;
mod listing;
mod orphans;
mod postgres;
mod presence;
mod providers;
mod shared;
mod signals;
mod subscription;
mod versions;
mod wakeup;

use serde_json::Value;

pub use archive::{ArchiveCandidate, ArchiveCommit, ArchiveFilter, RestoreOutcome, StoredEvent};
pub use checkpoint::TxIdHorizon;
pub use lease::Lease;
pub use listing::{PROGRESS_MAX_TASKS, TaskCursor, TaskFilter, TaskSummary};
pub use orphans::OrphanJob;
pub use postgres::PgStore;
pub(crate) use postgres::waited_too_long;
pub use presence::Stranded;
pub use providers::{AppliedLimits, ProviderOverview, QueuedItems, SlotOwner};
pub(crate) use shared::Bounded;
pub use shared::StreamAppend;
pub use signals::{
    InboxSignal, SIGNAL_NAME_MAX_CHARS, SignalSent, check_signal_data, check_signal_name,
};
pub use subscription::{Subscription, SubscriptionOptions};
pub use versions::ShapeChange;
pub(crate) use wakeup::WakeUps;

use crate::error::Result;
use crate::event::RecordedEvent;
use crate::id::{ChannelId, TaskId};

/// The migrations of the workspace's `migrations/` folder, embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// The `pg_notify` channel every append signals (with an empty payload) at commit.
pub const EVENTS_CHANNEL: &str = "reel_events";

/// What an append must prove besides the expected version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fence {
    /// The appender holds the task's lease at this epoch; a newer claim makes the append
    /// fail with `LeaseLost`. Workers always append with this.
    Lease { epoch: i64 },
    /// No lease is checked: only the expected version guards the append. For operator
    /// commands (approve, reject, cancel) that race workers through optimistic concurrency.
    Unleased,
}

impl Fence {
    pub(crate) fn epoch(self) -> Option<i64> {
        match self {
            Fence::Lease { epoch } => Some(epoch),
            Fence::Unleased => None,
        }
    }
}

/// The result of a successful append.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Appended {
    /// The stream's version after the append: the next append's expected version.
    pub version: u32,
    /// The global positions of the appended events (empty when `replayed`).
    pub positions: Vec<i64>,
    /// The same events were already stored at these versions (a retried append after a
    /// lost acknowledgement): nothing was written.
    pub replayed: bool,
}

/// A global reader's position: the pair `(tx_id, global_position)`, never the position
/// alone (identity values are drawn before commit, so positions commit out of order).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Checkpoint {
    pub tx_id: u64,
    pub position: i64,
}

impl Checkpoint {
    /// The start of the log.
    pub const START: Checkpoint = Checkpoint {
        tx_id: 0,
        position: 0,
    };

    /// The checkpoint just past `event`.
    pub fn after(event: &RecordedEvent) -> Checkpoint {
        Checkpoint {
            tx_id: event.tx_id,
            position: event.global_position,
        }
    }
}

/// One read of the global log with a type filter: see [`PgStore::read_page`].
#[derive(Debug)]
pub struct LogPage {
    /// The matching events in global order, each decoded on its own: an event that cannot
    /// be decoded is a typed `Decode` error naming its position, in its place.
    pub events: Vec<Result<RecordedEvent>>,
    /// The checkpoint just past the last row scanned, matching or not (`None`: nothing new).
    pub end: Option<Checkpoint>,
    /// How many rows the read scanned, matching or not.
    pub scanned: usize,
}

/// A task to create: its first event (`task_submitted`) and its `tasks` row.
#[derive(Clone, Debug)]
pub struct NewTask {
    pub id: TaskId,
    pub workflow: String,
    pub channel_id: ChannelId,
    pub input: Value,
    pub notion_page_id: Option<String>,
    /// A repeated submit with the same key returns the task created by the first one.
    pub idempotency_key: Option<String>,
    /// The workflow version the task is for (`None`: version 1). `reel submit` sets the
    /// newest version its registry has.
    pub workflow_version: Option<u32>,
    /// The parent of the task's trace (a `TRACEPARENT` from outside, say). The submit's
    /// span is its child, or (`None`) the caller's current span's; with feature `otel`
    /// and an OpenTelemetry layer, the submit span's context is what the log stores, and
    /// without them this parent itself. See [`crate::telemetry`].
    pub trace: Option<crate::telemetry::TraceContext>,
}

impl NewTask {
    /// The longest idempotency key (longer keys would overflow the unique index).
    pub const IDEMPOTENCY_KEY_MAX_CHARS: usize = 200;

    /// A task of `workflow` on `channel` with `input`, a fresh id and no Notion page.
    pub fn new(workflow: impl Into<String>, channel_id: ChannelId, input: Value) -> Self {
        NewTask {
            id: TaskId::new(),
            workflow: workflow.into(),
            channel_id,
            input,
            notion_page_id: None,
            idempotency_key: None,
            workflow_version: None,
            trace: None,
        }
    }
}

/// The outcome of [`PgStore::create_task`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Created {
    /// A new task was stored.
    New(TaskId),
    /// The idempotency key named an existing task with the same parameters.
    Existing(TaskId),
}

impl Created {
    /// The task's id, new or existing.
    pub fn task_id(self) -> TaskId {
        match self {
            Created::New(id) | Created::Existing(id) => id,
        }
    }
}
