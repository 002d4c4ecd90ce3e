//! `reel replay`: a task's history as a timeline, grouped by attempt, and the state it
//! folds to — at the end, or at `--at VERSION` (time travel).

use clap::Args;
use engine::timeline::{TimelineEntry, timeline};
use engine::{TaskId, TaskState, fold};
use serde::Serialize;

use super::money;

#[derive(Debug, Args)]
pub(crate) struct ReplayArgs {
    /// The task's id.
    task: String,
    /// Replay only up to this stream version.
    #[arg(long)]
    at: Option<u32>,
    /// One JSON object: {"task", "at", "timeline": [...], "state": {...}}.
    #[arg(long)]
    json: bool,
}

/// `reel replay --json`: the timeline and the folded state.
#[derive(Debug, Serialize)]
struct Replay<'a> {
    task: TaskId,
    /// The version replayed up to.
    at: u32,
    timeline: &'a [TimelineEntry],
    state: &'a TaskState,
}

pub(crate) async fn replay(url: &str, args: ReplayArgs) -> anyhow::Result<()> {
    let task: TaskId = args.task.parse()?;
    let store = engine::db::connect_store(url, 2).await?;
    // Once archived, the history is read from its archive.
    let mut events = crate::archive::history(&store, task).await?;
    anyhow::ensure!(!events.is_empty(), engine::Error::TaskNotFound(task));
    if let Some(at) = args.at {
        anyhow::ensure!(at >= 1, "--at must be a version from 1");
        events.retain(|e| e.version <= at);
    }
    let rows = timeline(&events);
    let state = fold(&events);
    if args.json {
        let at = state.version;
        println!(
            "{}",
            serde_json::to_string_pretty(&Replay {
                task,
                at,
                timeline: &rows,
                state: &state
            })?
        );
        return Ok(());
    }
    print!("{}", render(task, &rows, &state));
    Ok(())
}

/// The text form (also what the golden tests compare).
pub(crate) fn render(task: TaskId, rows: &[TimelineEntry], state: &TaskState) -> String {
    let mut out = format!(
        "task {task} ({}, channel {})\n",
        state.workflow,
        state.channel_id.as_ref().map(|c| c.as_str()).unwrap_or("?")
    );
    let mut attempt = None;
    for row in rows {
        if attempt != Some(row.attempt) {
            attempt = Some(row.attempt);
            out.push_str(&if row.attempt == 0 {
                "submitted\n".to_owned()
            } else {
                format!("attempt {}\n", row.attempt)
            });
        }
        let what = match (&row.step, row.item) {
            (Some(step), Some(item)) => format!("{step} #{item}"),
            (Some(step), None) => step.clone(),
            _ => String::new(),
        };
        let mut line = format!(
            "  {}  v{:<4} {:<16} {:<14}",
            row.recorded_at.format("%H:%M:%S%.3f"),
            row.version,
            row.event,
            what
        );
        if let Some(ms) = row.duration_ms {
            line.push_str(&format!(" {:>8.3}s", ms as f64 / 1e3));
        }
        if let Some(cost) = row.cost_micros {
            line.push_str(&format!(" {:>8}", money(cost)));
        }
        if let Some(detail) = &row.detail {
            line.push_str(&format!(" {detail}"));
        }
        if let Some(error) = &row.error {
            line.push_str(&format!(
                " error: {}",
                engine::truncate_for_display(error, 120)
            ));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out.push_str(&render_state(state));
    out
}

fn render_state(state: &TaskState) -> String {
    let mut out = format!(
        "state at v{}: {} ({})\n",
        state.version,
        state.status(),
        state.status_display()
    );
    for step in &state.steps {
        let planned = step.planned.map_or("?".to_owned(), |p| p.to_string());
        let mut line = format!(
            "  {:<12} run {} {:>3}/{:<3}",
            step.name,
            step.run,
            step.items.len(),
            planned
        );
        if step.completed {
            line.push_str(" complete");
        }
        if let Some(planned) = step.planned {
            let missing = step.missing_items(planned);
            if !missing.is_empty() && !step.completed {
                line.push_str(&format!(" missing {missing:?}"));
            }
        }
        if !step.failures.is_empty() {
            line.push_str(&format!(" failures {}", step.failures.len()));
        }
        let submitted: u32 = step.submissions.values().sum();
        if submitted > 0 {
            line.push_str(&format!(
                " jobs submitted {submitted}, open {}",
                step.open_jobs.len()
            ));
        }
        out.push_str(&line);
        out.push('\n');
    }
    let saved = state.saved();
    out.push_str(&format!(
        "  spent {} over {} items ({:.3}s); resuming skipped {} items, saved {} and {:.3}s\n",
        money(state.spent.cost_micros),
        state.spent.items,
        state.spent.duration_ms as f64 / 1e3,
        saved.items,
        money(saved.cost_micros),
        saved.duration_ms as f64 / 1e3
    ));
    if let Some(reason) = &state.failure {
        out.push_str(&format!("  failed: {reason}\n"));
    }
    out
}
