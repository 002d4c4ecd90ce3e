//! Run with: cargo run --example video_pipeline
//! (or `cargo run --example video_pipeline -- --providers simulated` for the simulated
//! providers, in seconds)
//!
//! The content team's pipeline on reel, start to finish: a video task whose clip 7 fails
//! on the first attempt. The worker makes 22 assets, the composite and clips 1–6, fails at
//! clip 7, reschedules, and the retry replays the log and makes only clips 7–18 before
//! narration, sound effects, assembly and final review. With the local providers (the
//! default) every artifact is real media — PNG cards, H.264 clips made by ffmpeg, speech
//! by espeak-ng — and the run ends with a real MP4 to watch (needs
//! `apt-get install -y ffmpeg espeak-ng`). Uses the `reel_example` database on the server
//! named by `DATABASE_URL`; artifacts go to `target/reel-artifacts`.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use clap::builder::{PossibleValuesParser, TypedValueParser};
use engine::prelude::*;
use engine::{Checkpoint, Event, RecordedEvent, Subscription, SubscriptionOptions, db};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::json;
use steps::ProviderSet;
use tokio_util::sync::CancellationToken;

/// Retry waits (and the simulated providers) at this speed: a 5-minute simulated clip
/// takes 0.15 s, the 60-second wait before a retry 30 ms.
const TIME_SCALE: f64 = 0.0005;

const ARTIFACTS: &str = "target/reel-artifacts";

#[derive(Debug, Parser)]
struct Args {
    /// `local`: real media made on this machine; `simulated`: the seed's durations, scaled.
    #[arg(
        long,
        default_value = "local",
        value_parser = PossibleValuesParser::new(["local", "simulated"]).try_map(|s| s.parse::<ProviderSet>())
    )]
    providers: ProviderSet,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let providers = Args::parse().providers;
    providers.check_ready().await?;
    let started = Instant::now();
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

    let registry = Registry::new().register(providers.video_workflow(ARTIFACTS, TIME_SCALE));
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
    let state = fold(&store.read_stream(task, 1).await?);
    summary(&state, providers);
    if providers == ProviderSet::Local {
        final_video(&state).await?;
    }
    println!("\nran in {:.1} s", started.elapsed().as_secs_f64());
    println!("next: reel approve <task> or reel reject <task> --redo-from <step>");
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

fn summary(state: &TaskState, providers: ProviderSet) {
    let saved = state.saved();
    let mut skipped: Vec<String> = Vec::new();
    for resume in &state.resumes {
        for (step, items) in &resume.skipped {
            skipped.push(format!("{step} {}", items.len()));
        }
    }
    println!(
        "\ntask {} is {}",
        state.task_id.map(|t| t.to_string()).unwrap_or_default(),
        state.status_display()
    );
    println!("  providers:                  {providers}");
    println!("  items run:                  {}", state.spent.items);
    println!(
        "  items skipped on resume:    {} ({})",
        saved.items,
        skipped.join(", ")
    );
    println!(
        "  cost spent:                 ${:.2}",
        state.spent.cost_micros as f64 / 1e6
    );
    let seconds = saved.duration_ms as f64 / 1e3;
    match providers {
        ProviderSet::Simulated => {
            println!(
                "  cost saved by resuming:     ${:.2}",
                saved.cost_micros as f64 / 1e6
            );
            println!(
                "  time saved by resuming:     {seconds:.1} s at this run's speed (≈ {:.0} min at real provider speed)",
                seconds / TIME_SCALE / 60.0
            );
        }
        // The example offers no cloud set (`reel worker --providers cloud` does).
        ProviderSet::Local | ProviderSet::Cloud => {
            // Made on this machine: nothing was charged, so resuming saved no money — it
            // saved the work of making those items again.
            println!("  (local providers charge nothing; resuming saved the work, not money)");
            println!("  time saved by resuming:     {seconds:.1} s of work not done again");
        }
    }
}

/// Where the assembled video is, how long it runs and how big it is (ffprobe).
async fn final_video(state: &TaskState) -> anyhow::Result<()> {
    let record = state
        .step("assembly")
        .and_then(|step| step.items.get(&1))
        .context("the task has no assembly")?;
    let path = steps::resolve_artifact(Path::new(ARTIFACTS), &record.artifact)?;
    let info = steps::local::Tools::default()
        .probe(&path)
        .await
        .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message))?;
    let bytes = std::fs::metadata(&path)?.len();
    let streams: Vec<String> = info
        .streams
        .iter()
        .map(|s| match (s.width, s.height) {
            (Some(w), Some(h)) => format!("{} {}×{h}", s.codec_name, w),
            _ => format!("{} {}", s.codec_type, s.codec_name),
        })
        .collect();
    println!("\nfinal video: {}", path.display());
    println!(
        "  {:.1} s, {:.1} MB, {}",
        info.duration_secs,
        bytes as f64 / 1e6,
        streams.join(" + ")
    );
    Ok(())
}
