//! `reel approve | reject | retry | cancel`: an operator's decisions on one task.

use clap::Args;
use engine::{PgStore, TaskId, commands};

use super::print_state;

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
    Ok((PgStore::new(engine::db::connect(url, 2).await?), task))
}

pub(crate) async fn approve(url: &str, target: TaskArg) -> anyhow::Result<()> {
    let (store, task) = open(url, &target).await?;
    print_state(&commands::approve(&store, task, None).await?, target.json)
}

pub(crate) async fn reject(url: &str, args: ReviewArgs) -> anyhow::Result<()> {
    let (store, task) = open(url, &args.target).await?;
    let workflow = steps::simulated_video_workflow("artifacts", 1.0);
    let state = commands::reject(&store, &workflow, task, &args.redo_from, args.reason).await?;
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
