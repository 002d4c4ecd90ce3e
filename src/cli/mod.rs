//! The `reel` subcommands.

mod audit;
mod replay;
mod review;
mod submit;
mod tasks;
mod worker;

pub(crate) use audit::{AuditArgs, AuditFailed, StatsArgs, audit, stats};
pub(crate) use replay::{ReplayArgs, replay};
pub(crate) use review::{ReviewArgs, TaskArg, approve, cancel, reject, retry};
pub(crate) use submit::{SubmitArgs, submit};
pub(crate) use tasks::{TasksArgs, tasks};
pub(crate) use worker::{WorkerArgs, worker};

use engine::TaskState;

/// One line about a task's new state, or its JSON summary.
pub(crate) fn print_state(state: &TaskState, json: bool) -> anyhow::Result<()> {
    let id = state.task_id.map(|t| t.to_string()).unwrap_or_default();
    if json {
        println!(
            "{}",
            serde_json::json!({"id": id, "status": state.status(), "version": state.version, "attempt": state.attempt})
        );
    } else {
        println!(
            "task {id}: {} ({})",
            state.status(),
            state.status().display_name()
        );
    }
    Ok(())
}

/// Micro-dollars as dollars, e.g. `$0.550`.
pub(crate) fn money(micros: i64) -> String {
    format!("${:.3}", micros as f64 / 1e6)
}
