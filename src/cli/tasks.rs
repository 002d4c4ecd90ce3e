//! `reel tasks`: list tasks, filtered by status and channel.

use clap::Args;
use engine::{ChannelId, TaskFilter, TaskStatus};

use super::{UsageError, WorkerSettings, Workflows};

#[derive(Debug, Args)]
pub(crate) struct TasksArgs {
    /// Only tasks in this status (storage name, e.g. final_review).
    #[arg(long)]
    status: Option<TaskStatus>,
    /// Only tasks of this channel.
    #[arg(long)]
    channel: Option<String>,
    /// At most this many, newest first (0: all).
    #[arg(long, default_value_t = 100)]
    limit: u32,
    /// One JSON array of task objects.
    #[arg(long)]
    json: bool,
    /// Only stranded tasks: unfinished, of a workflow version no live worker serves or
    /// accepts (a deploy dropped it). `reel upgrade` moves one to a version that accepts it.
    #[arg(long, conflicts_with_all = ["status", "channel"])]
    stranded: bool,
}

pub(crate) async fn tasks(
    url: &str,
    args: TasksArgs,
    workflows: &dyn Workflows,
) -> anyhow::Result<()> {
    let channel = args.channel.as_deref().map(ChannelId::parse).transpose()?;
    let store = engine::db::connect_store(url, 2).await?;
    let filter = TaskFilter {
        status: args.status,
        channel,
        limit: args.limit,
        ..TaskFilter::default()
    };
    let mut tasks = if args.stranded {
        store.stranded_tasks(args.limit).await?
    } else {
        store.list_tasks(&filter).await?
    };
    store.with_progress(&mut tasks).await?;
    if let Some(status) = args.status
        && tasks.is_empty()
        && !known_statuses(workflows).contains(&status)
    {
        // No task has it and no workflow here declares it: a typo, not an empty list.
        let known: Vec<&str> = known_statuses(workflows)
            .iter()
            .map(|s| s.as_str())
            .collect();
        return Err(UsageError(format!(
            "unknown status {status:?} (known: {})",
            known.join(", ")
        ))
        .into());
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&tasks)?);
        return Ok(());
    }
    if args.stranded && tasks.is_empty() {
        eprintln!("no stranded task: every unfinished task's version has a live worker");
    }
    println!(
        "{:<36}  {:<12}  {:<22}  {:>7}  {:>7}  {:>8}  last error",
        "task", "channel", "status", "attempt", "version", "progress"
    );
    // The storage name, as scripts and `--status` know it; `--json` has the display name.
    for task in tasks {
        let error = task
            .last_error
            .as_deref()
            .map(|e| engine::truncate_for_display(e, 80))
            .unwrap_or_default();
        // The running step's items done of those planned ("12/18"), "-" between steps.
        let progress = task
            .progress
            .as_ref()
            .map_or_else(|| "-".to_owned(), |p| format!("{}/{}", p.done, p.of));
        println!(
            "{:<36}  {:<12}  {:<22}  {:>7}  {:>7}  {progress:>8}  {error}",
            task.id,
            task.channel_id,
            task.status.as_str(),
            task.attempt,
            task.workflow_version
        );
    }
    Ok(())
}

/// The lifecycle statuses and those the binary's workflows declare.
fn known_statuses(workflows: &dyn Workflows) -> Vec<TaskStatus> {
    let registry = workflows.registry(&WorkerSettings::default());
    let mut known = TaskStatus::LIFECYCLE.to_vec();
    for name in registry.names() {
        if let Some(workflow) = registry.get(&name) {
            known.extend(workflow.steps().iter().map(|s| s.step_status().status));
        }
    }
    known
}
