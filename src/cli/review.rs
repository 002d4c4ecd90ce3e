//! `reel approve | reject | retry | cancel`: an operator's decisions on one task.

use clap::Args;
use engine::{PgStore, TaskId, commands, fold};

use super::{WorkerSettings, Workflows, print_state};

#[derive(Debug, Args)]
pub(crate) struct TaskArg {
    /// The task's id (a UUID).
    task: String,
    /// Print the new state as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct ReviewArgs {
    #[command(flatten)]
    target: TaskArg,
    /// Run this step and every later one again.
    #[arg(long)]
    redo_from: String,
    /// Why (kept in the log).
    #[arg(long)]
    reason: Option<String>,
}

async fn open(url: &str, target: &TaskArg) -> anyhow::Result<(PgStore, TaskId)> {
    // Validate before connecting: a malformed id never reaches the database.
    let task: TaskId = target.task.parse()?;
    Ok((engine::db::connect_store(url, 2).await?, task))
}

/// A review decision on a task whose workflow (known to this binary) has no review gate
/// is refused before anything else is looked at.
async fn require_review_gate(
    store: &PgStore,
    task: TaskId,
    workflows: &dyn Workflows,
    action: &'static str,
) -> anyhow::Result<()> {
    let state = fold(&store.read_stream(task, 1).await?);
    let registry = workflows.registry(&WorkerSettings::default());
    match registry.get(&state.workflow) {
        Some(workflow) if !workflow.has_review() => Err(engine::Error::NoReview {
            task,
            workflow: state.workflow.clone(),
            status: state.status(),
            action,
        }
        .into()),
        _ => Ok(()),
    }
}

pub(crate) async fn approve(
    url: &str,
    target: TaskArg,
    workflows: &dyn Workflows,
) -> anyhow::Result<()> {
    let (store, task) = open(url, &target).await?;
    require_review_gate(&store, task, workflows, "approve").await?;
    print_state(&commands::approve(&store, task, None).await?, target.json)
}

pub(crate) async fn reject(
    url: &str,
    args: ReviewArgs,
    workflows: &dyn Workflows,
) -> anyhow::Result<()> {
    let (store, task) = open(url, &args.target).await?;
    require_review_gate(&store, task, workflows, "reject").await?;
    let state = commands::reject(&store, task, &args.redo_from, args.reason).await?;
    print_state(&state, args.target.json)
}

pub(crate) async fn retry(url: &str, target: TaskArg) -> anyhow::Result<()> {
    let (store, task) = open(url, &target).await?;
    print_state(&commands::retry(&store, task).await?, target.json)
}

pub(crate) async fn cancel(url: &str, target: TaskArg) -> anyhow::Result<()> {
    let (store, task) = open(url, &target).await?;
    print_state(&commands::cancel(&store, task, None).await?, target.json)
}
