//! notion-projector: the sidecar that mirrors reel task status into Notion.
//!
//! It follows the event log gap-safely from a `(tx_id, global_position)` checkpoint
//! (woken by NOTIFY, polling as a fallback), keeps only each task's latest status
//! (A→B→C sends C), and PATCHes the task's Notion page within the token's rate budget,
//! which every projector using the token shares through PostgreSQL.
//! 429/529 pause every request for `Retry-After`; 5xx, timeouts and an unreachable Notion
//! are retried with exponential backoff and jitter, then recorded in `sync_failures` and
//! tried again on a later pass; 400/401/403/404 are recorded and never retried. The
//! checkpoint moves by compare-and-set only past handled events, and no Notion call is
//! made inside a database transaction. One instance leads (a session advisory lock);
//! others wait as standbys. With a board, one leader per board owns its cards (a second
//! lock), so projectors sharing a board make one card per task. The pipeline never waits
//! for any of this.
//!
//! The binary (`notion-projector --help`) wires [`Config`] to [`Projector`]; tests and
//! the bench drive the same pieces, against [`fake::FakeNotion`] (feature `fake`).

mod board;
mod config;
#[cfg(feature = "fake")]
pub mod fake;
mod limiter;
pub mod metrics;
pub mod notion;
mod page_id;
mod projector;
mod queue;

pub use board::{Board, BoardError, BoardOptions, IntakeOptions};
pub use config::{Config, LogFormat, main_from, run};
pub use limiter::Limiter;
pub use metrics::Metrics;
pub use notion::{NotionClient, NotionConfig, NotionError, PropertyType, Token};
pub use page_id::{InvalidPageId, PageId};
pub use projector::{
    MAX_RETRY_AFTER, Projector, ProjectorError, ProjectorOptions, STATUS_EVENT_TYPES,
    checkpoint_at_head,
};
