//! Run with: cargo run --example video_pipeline
//!
//! The content team's pipeline on reel, start to finish: a video task whose clip 7 fails
//! on the first attempt. The worker generates 22 assets, the composites and clips 1–6,
//! fails at clip 7, reschedules, and the retry replays the log and runs only clips 7–18
//! before narration, sound effects, assembly and final review. Uses the `reel_example`
//! database on the server named by `DATABASE_URL`; artifacts go to `target/reel-artifacts`.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use engine::prelude::*;
use engine::{Checkpoint, Event, RecordedEvent, Subscription, SubscriptionOptions, db};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// Simulated providers at this speed: a 5-minute clip takes 0.15 s.
const TIME_SCALE: f64 = 0.0005;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = dotenvy::dotenv();
    let server = std::env::var("DATABASE_URL").unwrap_or_else(|_| db::DEFAULT_URL.into());
    let store = db::open_database(&server, "reel_example", 8)
        .await
        .with_context(|| format!("is PostgreSQL running at {server}?"))?;

    // Follow the log from here on: the progress bars are a projection of it.
    let start = store
        .read_all_after(Checkpoint::START, u32::MAX)
        .await?
        .last()
        .map_or(Checkpoint::START, Checkpoint::after);
    let faults = [steps::Fault {
        step: "video".into(),
        item: 7,
        permanent: false,
    }];
    let input =
        json!({"topic": "The fall of Rome", "story_direction": "dramatic", "faults": faults});
    let task = store
        .create_task(NewTask::new(
            steps::WORKFLOW,
            ChannelId::parse("history")?,
            input,
        ))
        .await?
        .task_id();
    println!("submitted task {task} (clip 7 will time out on the first attempt)\n");

    let registry = Registry::new().register(steps::simulated_video_workflow(
        "target/reel-artifacts",
        TIME_SCALE,
    ));
    let worker_options = WorkerOptions {
        until_idle: true,
        poll_interval: Duration::from_millis(100),
        ..WorkerOptions::new("example-worker")
    };
    let worker = tokio::spawn(
        Worker::new(store.clone(), registry, worker_options).run(CancellationToken::new()),
    );

    let follow = SubscriptionOptions {
        poll_interval: Duration::from_millis(50),
        batch_size: 500,
    };
    let mut log = Subscription::start(store.clone(), start, follow).await;
    let mut bars = Bars::new();
    while !worker.is_finished() || bars.behind(&store, &log).await? {
        if let Ok(batch) = tokio::time::timeout(Duration::from_millis(200), log.next_batch()).await
        {
            for event in batch?.iter().filter(|e| e.stream_id == task) {
                bars.show(event);
            }
        }
    }
    worker.await??;
    summary(&fold(&store.read_stream(task, 1).await?));
    Ok(())
}

/// One progress bar per step, driven by the task's events.
struct Bars {
    multi: MultiProgress,
    steps: HashMap<String, ProgressBar>,
}

impl Bars {
    fn new() -> Self {
        Bars {
            multi: MultiProgress::new(),
            steps: HashMap::new(),
        }
    }

    /// Whether the log holds events the bars have not shown yet.
    async fn behind(&self, store: &PgStore, log: &Subscription) -> anyhow::Result<bool> {
        Ok(!store.read_all_after(log.position(), 1).await?.is_empty())
    }

    fn show(&mut self, recorded: &RecordedEvent) {
        match &recorded.event {
            Event::TaskClaimed { attempt, .. } => {
                self.say(format!("attempt {attempt}: claimed, replaying the log"))
            }
            Event::StepStarted { step, items, .. } => {
                let bar = self.steps.entry(step.clone()).or_insert_with(|| {
                    let bar = self.multi.add(ProgressBar::new(u64::from(*items)));
                    let style = ProgressStyle::with_template(
                        "{prefix:>11} [{bar:36}] {pos:>2}/{len:2} {msg}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> ");
                    bar.set_style(style);
                    bar.set_prefix(step.clone());
                    bar
                });
                bar.set_length(u64::from(*items));
            }
            Event::ItemCompleted {
                step,
                item,
                cost_micros,
                ..
            } => {
                if let Some(bar) = self.steps.get(step) {
                    bar.inc(1);
                    bar.set_message(format!("#{item} ${:.3}", *cost_micros as f64 / 1e6));
                }
            }
            Event::ItemFailed {
                step,
                item,
                error,
                retry,
                ..
            } => {
                self.say(format!("{step} {item} failed (try {retry}): {error}"));
            }
            Event::StepCompleted { step, .. } => {
                if let Some(bar) = self.steps.get(step) {
                    bar.finish_with_message("done");
                    if self.multi.is_hidden() {
                        println!(
                            "{step}: {}/{} done",
                            bar.position(),
                            bar.length().unwrap_or(0)
                        );
                    }
                }
            }
            Event::RetryScheduled {
                reason,
                next_run_at,
                ..
            } => {
                self.say(format!(
                    "retry scheduled for {} ({reason})",
                    next_run_at.format("%H:%M:%S%.3f")
                ));
            }
            event @ Event::StatusChanged { .. } => {
                let shown = event.display_of_new_status().unwrap_or_default();
                self.say(format!("status → {shown}"));
            }
            _ => {}
        }
    }

    /// A line above the bars (plain output when stdout is not a terminal).
    fn say(&self, line: String) {
        if self.multi.is_hidden() {
            println!("{line}");
        } else {
            let _ = self.multi.println(line);
        }
    }
}

fn summary(state: &TaskState) {
    let saved = state.saved();
    let skipped: usize = state
        .resumes
        .iter()
        .flat_map(|r| r.skipped.values())
        .map(Vec::len)
        .sum();
    println!(
        "\ntask {} is {}",
        state.task_id.map(|t| t.to_string()).unwrap_or_default(),
        state.status_display()
    );
    println!("  items run:                  {}", state.spent.items);
    println!("  items skipped on resume:    {skipped}");
    println!(
        "  cost spent:                 ${:.2}",
        state.spent.cost_micros as f64 / 1e6
    );
    println!(
        "  cost saved by resuming:     ${:.2}",
        saved.cost_micros as f64 / 1e6
    );
    println!(
        "  time saved by resuming:     {:.1} s at this run's speed (≈ {:.0} min at real provider speed)",
        saved.duration_ms as f64 / 1e3,
        saved.duration_ms as f64 / 1e3 / TIME_SCALE / 60.0
    );
    println!("\nnext: reel approve <task> or reel reject <task> --redo-from <step>");
}
