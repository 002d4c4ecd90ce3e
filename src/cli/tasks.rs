//! `reel tasks`: list tasks, filtered by status and channel.

use clap::Args;
use engine::{ChannelId, PgStore, TaskFilter, TaskStatus};

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
}

pub(crate) async fn tasks(url: &str, args: TasksArgs) -> anyhow::Result<()> {
    let channel = args.channel.as_deref().map(ChannelId::parse).transpose()?;
    let store = PgStore::new(engine::db::connect(url, 2).await?);
    let filter = TaskFilter {
        status: args.status,
        channel,
        limit: args.limit,
    };
    let tasks = store.list_tasks(&filter).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&tasks)?);
        return Ok(());
    }
    println!(
        "{:<36}  {:<12}  {:<22}  {:>7}  last error",
        "task", "channel", "status", "attempt"
    );
    for task in tasks {
        let error = task
            .last_error
            .as_deref()
            .map(|e| engine::truncate_for_display(e, 80))
            .unwrap_or_default();
        println!(
            "{:<36}  {:<12}  {:<22}  {:>7}  {error}",
            task.id,
            task.channel_id,
            task.status.as_str(),
            task.attempt
        );
    }
    Ok(())
}
