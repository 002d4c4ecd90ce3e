//! reel's command line as a library: the `reel` binary is this with the video workflow
//! registered, and your own binary gets the same commands for your own workflows.
//!
//! ```no_run
//! use std::process::ExitCode;
//!
//! use engine::prelude::*;
//!
//! fn newsletter() -> Workflow {
//!     Workflow::new("newsletter").step(Step::call("publish", |_ctx: StepContext| async {
//!         ItemOutput::value("published")
//!     }))
//! }
//!
//! fn main() -> ExitCode {
//!     // migrate, submit, worker, tasks, replay, audit, stats, approve, reject, retry, cancel,
//!     // upgrade
//!     reel::main(Registry::new().register(newsletter()))
//! }
//! ```

pub mod archive;
mod cli;

pub use cli::console::{ConsoleOptions, console_router, console_router_with};
pub use cli::{VideoPipeline, WorkerSettings, Workflows, main};
