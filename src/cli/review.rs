//! `reel approve | reject | retry | cancel`: an operator's decisions on one task.

use clap::Args;
use engine::{PgStore, TaskId, commands, fold};

use super::{UsageError, WorkerSettings, Workflows, print_state};

#[derive(Debug, Args)]
pub(crate) struct TaskArg {
    /// The task's id (a UUID).
    task: String,
    /// Print the new state as JSON.
    #[arg(long)]
    json: bool,
    /// Who is acting, recorded in the log as `cli:NAME` (default: `$USER`).
    #[arg(long, visible_alias = "actor", env = "REEL_ACTOR", value_name = "NAME")]
    by: Option<String>,
}

impl TaskArg {
    /// The actor the log records: `cli:` and `--by`, else `$USER`, else `cli`.
    fn actor(&self) -> String {
        let name = self
            .by
            .clone()
            .or_else(|| std::env::var("USER").ok())
            .map(|n| {
                n.chars()
                    .filter(|c| !c.is_control())
                    .take(60)
                    .collect::<String>()
            })
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty());
        match name {
            Some(name) => format!("cli:{name}"),
            None => "cli".to_owned(),
        }
    }
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
    let actor = target.actor();
    let state = commands::approve_as(&store, task, target.by.clone(), Some(&actor)).await?;
    print_state(&state, target.json)
}

pub(crate) async fn reject(
    url: &str,
    args: ReviewArgs,
    workflows: &dyn Workflows,
) -> anyhow::Result<()> {
    let (store, task) = open(url, &args.target).await?;
    require_review_gate(&store, task, workflows, "reject").await?;
    let actor = args.target.actor();
    let state =
        commands::reject_as(&store, task, &args.redo_from, args.reason, Some(&actor)).await?;
    print_state(&state, args.target.json)
}

#[derive(Debug, Args)]
pub(crate) struct UpgradeArgs {
    #[command(flatten)]
    target: TaskArg,
    /// The workflow version to move the task to (default: the newest this binary has).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    to_version: Option<u32>,
}

/// `reel upgrade`: moves a task to a newer version of its workflow, as that version's rules
/// allow; a refusal (exit 2) says which rule is missing and writes nothing.
pub(crate) async fn upgrade(
    url: &str,
    args: UpgradeArgs,
    workflows: &dyn Workflows,
) -> anyhow::Result<()> {
    let (store, task) = open(url, &args.target).await?;
    let registry = workflows.registry(&WorkerSettings::default());
    let to = match args.to_version {
        Some(to) => to,
        None => {
            let state = fold(&store.read_stream(task, 1).await?);
            registry
                .get(&state.workflow)
                .map_or(state.workflow_version, |w| w.version_number())
        }
    };
    match commands::upgrade(&store, &registry, task, to).await {
        Ok(state) => {
            if let Some(upgrade) = state.upgrades.last().filter(|_| !args.target.json) {
                let renamed: String = upgrade
                    .renamed
                    .iter()
                    .map(|(old, new)| format!(", {old} renamed {new}"))
                    .collect();
                println!("upgraded v{} -> v{}{renamed}", upgrade.from, upgrade.to);
            }
            print_state(&state, args.target.json)
        }
        Err(refused @ engine::Error::UpgradeRefused { .. }) => {
            Err(UsageError(refused.to_string()).into())
        }
        Err(err) => Err(err.into()),
    }
}

pub(crate) async fn retry(url: &str, target: TaskArg) -> anyhow::Result<()> {
    let (store, task) = open(url, &target).await?;
    let actor = target.actor();
    // An archived failed task comes back from its archive first, then resumes by replay.
    let state = crate::archive::retry(&store, task, Some(&actor)).await?;
    print_state(&state, target.json)
}

pub(crate) async fn cancel(url: &str, target: TaskArg) -> anyhow::Result<()> {
    let (store, task) = open(url, &target).await?;
    let actor = target.actor();
    print_state(
        &commands::cancel_as(&store, task, None, Some(&actor)).await?,
        target.json,
    )
}

#[derive(Debug, Args)]
pub(crate) struct SignalArgs {
    #[command(flatten)]
    target: TaskArg,
    /// The signal's name, as the workflow waits for it (e.g. `storyboard_approved`).
    name: String,
    /// The data it carries, as JSON (default: null).
    #[arg(long, value_name = "JSON")]
    data: Option<String>,
    /// Makes sending it again change nothing: a signal with the same name and id is
    /// received once (default: a new id, so each send counts).
    #[arg(long = "id", value_name = "ID")]
    signal_id: Option<String>,
}

/// `reel signal`: sends a task a signal; a task parked waiting for it is woken.
pub(crate) async fn signal(url: &str, args: SignalArgs) -> anyhow::Result<()> {
    let data: serde_json::Value = match &args.data {
        None => serde_json::Value::Null,
        Some(text) => serde_json::from_str(text)
            .map_err(|e| UsageError(format!("--data is not JSON: {e}")))?,
    };
    let signal_id = args
        .signal_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    for (what, value) in [("name", &args.name), ("id", &signal_id)] {
        engine::check_signal_name(what, value).map_err(|e| UsageError(e.to_string()))?;
    }
    engine::check_signal_data(&data).map_err(|e| UsageError(e.to_string()))?;
    let (store, task) = open(url, &args.target).await?;
    let actor = args.target.actor();
    let sent = commands::signal(&store, task, &args.name, &signal_id, &data, Some(&actor)).await?;
    if args.target.json {
        println!(
            "{}",
            serde_json::json!({
                "task": task.to_string(),
                "signal": args.name,
                "id": signal_id,
                "new": sent.new,
                "woke": sent.woke,
                "status": sent.status,
            })
        );
        return Ok(());
    }
    if !sent.new {
        println!(
            "task {task}: signal {} (id {signal_id}) was already sent: nothing changed",
            args.name
        );
    } else if sent.woke {
        println!(
            "task {task}: signal {} sent (id {signal_id}); the task was waiting and is due now",
            args.name
        );
    } else {
        println!(
            "task {task}: signal {} sent (id {signal_id}); the task ({}) reads it when it waits for it",
            args.name, sent.status
        );
    }
    Ok(())
}
