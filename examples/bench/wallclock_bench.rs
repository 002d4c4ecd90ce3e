//! The pipeline's wall clock (issue 33): how long videos take end to end, beside the bound
//! that the providers' caps and rates allow.
//!
//! The cloud set runs against local fakes of the three APIs (`tests/fakes`, real HTTP)
//! at real latencies scaled down about 10×: every generating call (a Gemini image, a
//! Runway submit, an ElevenLabs narration or sound) answers in 1 s, a Runway job runs 10 s
//! from its creation, and a poll or download answers in 100 ms. reel's default limits
//! apply (Gemini: 10 in flight, 1 request/s; Runway: 5 jobs; ElevenLabs: 5 calls, one
//! account for speech and sound), and workers run as `reel worker --providers cloud` does
//! (default concurrency 4, time scale 1), in process, each with its own pool.
//!
//! The bound is what the caps and rates allow with no overhead at all: per step, the
//! slowest of the waves the cap makes and the spacing the rate makes, plus what the
//! local steps (composites, assembly) took in the log. For several videos it is the
//! busiest provider's total work plus the first video's way to it and the last one's
//! way out. The same rows are printed on the simulated providers, whose jobs tell when to
//! come back.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use engine::prelude::*;
use engine::{Event, RecordedEvent, Worker, WorkerOptions};
use serde_json::json;
use sqlx::postgres::PgPool;
use steps::{ProviderPlan, ProviderSet};

use crate::Report;
use crate::fakes::{FakeCloud, FakeOptions};
use crate::worker_bench::own_pool;

/// The fakes' latencies (the real APIs' scaled down about 10×).
const CALL: Duration = Duration::from_secs(1);
const JOB: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(100);

/// The simulated providers' time scale for the bench (a 5-minute clip takes 3 s).
const SIMULATED_SCALE: f64 = 0.01;

pub(crate) async fn run(report: &mut Report, pool: &PgPool, quick: bool) -> anyhow::Result<()> {
    let fake = FakeCloud::start(FakeOptions {
        job_duration: JOB,
        runway_concurrency: 1000,
        any_image: true,
        call_latency: CALL,
        poll_latency: POLL,
        ..FakeOptions::default()
    })
    .await;
    let cloud = Setup::Cloud(&fake);
    videos(report, pool, &cloud, 1, 1).await?;
    if !quick {
        videos(report, pool, &cloud, 10, 3).await?;
    }
    let counts = fake.counts();
    for (provider, cap) in [("gemini", 10), ("runway", 5), ("elevenlabs", 5)] {
        let most = match provider {
            "runway" => counts.max_open,
            _ => counts.max_calls.get(provider).copied().unwrap_or(0),
        };
        report.add(
            format!("wallclock: most in flight at the fake {provider} (cap {cap})"),
            most as f64,
            "calls",
        );
    }
    let simulated = Setup::Simulated;
    videos(report, pool, &simulated, 1, 1).await?;
    if !quick {
        videos(report, pool, &simulated, 10, 3).await?;
    }
    Ok(())
}

/// Which providers a run uses.
enum Setup<'a> {
    Cloud(&'a FakeCloud),
    Simulated,
}

impl Setup<'_> {
    fn name(&self) -> &'static str {
        match self {
            Setup::Cloud(_) => "cloud fakes",
            Setup::Simulated => "simulated",
        }
    }

    fn workflow(&self, root: &std::path::Path) -> Workflow {
        match self {
            Setup::Cloud(fake) => ProviderPlan::new(ProviderSet::Cloud)
                .with_cloud(fake.config())
                .video_workflow(root, 1.0, &BTreeMap::new()),
            Setup::Simulated => ProviderSet::Simulated.video_workflow(root, SIMULATED_SCALE),
        }
    }

    /// One provider step's work: (items, cap, requests per second, one item's time).
    fn step(&self, step: &str) -> Option<(u32, u32, Option<f64>, Duration)> {
        let scaled = |secs: f64| Duration::from_secs_f64(secs * SIMULATED_SCALE);
        match (self, step) {
            (Setup::Cloud(_), "assets") => Some((22, 10, Some(1.0), CALL)),
            (Setup::Cloud(_), "video") => Some((18, 5, None, CALL + JOB)),
            (Setup::Cloud(_), "narration" | "sfx") => Some((18, 5, None, CALL)),
            (Setup::Simulated, "assets") => Some((22, 10, None, scaled(40.0))),
            (Setup::Simulated, "video") => Some((18, 5, None, scaled(300.0))),
            (Setup::Simulated, "narration") => Some((18, 5, None, scaled(30.0))),
            (Setup::Simulated, "sfx") => Some((18, 5, None, scaled(15.0))),
            _ => None,
        }
    }
}

/// The least time `items` items take at `cap` at once, `rate` requests per second, each
/// taking `each`.
fn step_bound(items: u32, cap: u32, rate: Option<f64>, each: Duration) -> Duration {
    let waves = each * items.div_ceil(cap.max(1));
    let paced = rate.map_or(Duration::ZERO, |rate| {
        Duration::from_secs_f64(f64::from(items.saturating_sub(1)) / rate) + each
    });
    waves.max(paced)
}

/// Runs `n` videos through `workers` workers and reports the wall clock beside the bound.
async fn videos(
    report: &mut Report,
    pool: &PgPool,
    setup: &Setup<'_>,
    n: usize,
    workers: usize,
) -> anyhow::Result<()> {
    sqlx::query("DELETE FROM tasks WHERE workflow = 'video'")
        .execute(pool)
        .await?;
    sqlx::query("DELETE FROM provider_slots")
        .execute(pool)
        .await?;
    sqlx::query("DELETE FROM job_durations")
        .execute(pool)
        .await?;
    let root = tempfile::tempdir()?;
    let registry = Registry::new().register(setup.workflow(root.path()));
    let store = PgStore::new(pool.clone());
    let channel = ChannelId::parse("wallclock")?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..n {
        let input = json!({"topic": format!("wall clock {i}")});
        let created = store
            .create_task(NewTask::new("video", channel.clone(), input))
            .await?;
        tasks.push(created.task_id());
    }
    let mut running = Vec::new();
    for w in 0..workers {
        let options = WorkerOptions {
            until_idle: true,
            ..WorkerOptions::new(format!("wallclock-{w}"))
        };
        let worker = Worker::new(own_pool(pool).await?, registry.clone(), options);
        running.push(tokio::spawn(worker.run_until_idle()));
    }
    for worker in running {
        worker.await??;
    }
    let wall = started.elapsed();
    let mut steps: BTreeMap<String, (Duration, u32)> = BTreeMap::new();
    let mut local = BTreeMap::new();
    let mut lags = Vec::new();
    for task in &tasks {
        let events = store.read_stream(*task, 1).await?;
        let state = engine::fold(&events);
        anyhow::ensure!(
            state.status() == TaskStatus::FINAL_REVIEW,
            "video {task} ended {} ({:?})",
            state.status(),
            state.failure
        );
        step_times(&events, &mut steps);
        for step in ["composites", "assembly"] {
            let took = state
                .step(step)
                .map(|s| s.items.values().map(|r| r.duration_ms).sum::<u64>())
                .unwrap_or(0);
            let slowest = local.entry(step).or_insert(Duration::ZERO);
            *slowest = (*slowest).max(Duration::from_millis(took));
        }
        if let Setup::Cloud(fake) = setup {
            lags.extend(job_lags(&events, fake));
        }
    }
    let local_time: Duration = local.values().sum();
    let bound = bound(setup, n, local_time);
    let what = format!(
        "wallclock: {n} video(s), {workers} worker(s), {}",
        setup.name()
    );
    report.add(format!("{what}: wall"), wall.as_secs_f64(), "s");
    report.add(format!("{what}: bound"), bound.as_secs_f64(), "s");
    report.add(
        format!(
            "{what}: ratio (goal {})",
            if n == 1 { "1.15" } else { "1.2" }
        ),
        wall.as_secs_f64() / bound.as_secs_f64(),
        "x",
    );
    if n == 1 {
        for (step, (took, _)) in &steps {
            let step_bound = setup
                .step(step)
                .map(|(items, cap, rate, each)| step_bound(items, cap, rate, each))
                .or_else(|| local.get(step.as_str()).copied())
                .unwrap_or_default();
            report.add(
                format!(
                    "{what}: step {step} (bound {:.1} s)",
                    step_bound.as_secs_f64()
                ),
                took.as_secs_f64(),
                "s",
            );
        }
    }
    if !lags.is_empty() {
        lags.sort();
        let pick = |p: f64| lags[((lags.len() as f64 - 1.0) * p).round() as usize];
        for (label, p) in [("p50", 0.5), ("p95", 0.95)] {
            report.add(
                format!(
                    "{what}: job end → item_completed {label}, % of the {} s job",
                    JOB.as_secs()
                ),
                pick(p).as_secs_f64() / JOB.as_secs_f64() * 100.0,
                "%",
            );
        }
    }
    Ok(())
}

/// The bound for `n` videos: one video's steps one after the other; for several, the
/// busiest provider's whole work (every video's) plus the steps before it for the first
/// video and after it for the last.
fn bound(setup: &Setup<'_>, n: usize, local: Duration) -> Duration {
    let n_items = |items: u32| items * u32::try_from(n).unwrap_or(u32::MAX);
    let order = ["assets", "video", "narration", "sfx"];
    let one: Vec<Duration> = order
        .iter()
        .map(|step| {
            setup
                .step(step)
                .map(|(items, cap, rate, each)| step_bound(items, cap, rate, each))
                .unwrap_or_default()
        })
        .collect();
    if n == 1 {
        return one.iter().sum::<Duration>() + local;
    }
    // Narration and SFX share one ElevenLabs account (and the simulated ones' caps are
    // their own): for the cloud set they are one provider's work.
    let shared_audio = matches!(setup, Setup::Cloud(_));
    let mut best = Duration::ZERO;
    for (i, step) in order.iter().enumerate() {
        let Some((items, cap, rate, each)) = setup.step(step) else {
            continue;
        };
        let mut whole = step_bound(n_items(items), cap, rate, each);
        if shared_audio && *step == "narration" {
            whole = step_bound(n_items(items) * 2, cap, rate, each);
        }
        let before: Duration = one[..i].iter().sum();
        let after: Duration = if shared_audio && *step == "narration" {
            Duration::ZERO
        } else {
            one[i + 1..].iter().sum()
        };
        best = best.max(before + whole + after + local);
    }
    best
}

/// Each step's time in the stream (its first `step_started` to its `step_completed`),
/// the longest over the videos.
fn step_times(events: &[RecordedEvent], steps: &mut BTreeMap<String, (Duration, u32)>) {
    let mut began = BTreeMap::new();
    for event in events {
        match &event.event {
            Event::StepStarted { step, .. } => {
                began.entry(step.clone()).or_insert(event.recorded_at);
            }
            Event::StepCompleted { step, .. } => {
                if let Some(start) = began.get(step) {
                    let took = (event.recorded_at - *start).to_std().unwrap_or_default();
                    let entry = steps.entry(step.clone()).or_default();
                    entry.0 = entry.0.max(took);
                    entry.1 += 1;
                }
            }
            _ => {}
        }
    }
}

/// For each Runway job of the stream: the time from its end at the fake to the item's
/// `item_completed` in the log.
fn job_lags(events: &[RecordedEvent], fake: &FakeCloud) -> Vec<Duration> {
    let ends = fake.counts().job_ends;
    let mut jobs = BTreeMap::new();
    let mut lags = Vec::new();
    for event in events {
        match &event.event {
            Event::ItemSubmitted { item, job, .. } => {
                if let Some(id) = job["id"].as_str() {
                    jobs.insert(*item, id.to_owned());
                }
            }
            Event::ItemCompleted { step, item, .. } if step == "video" => {
                let Some(times) = jobs.get(item).and_then(|id| ends.get(id)) else {
                    continue;
                };
                let completed: std::time::SystemTime = event.recorded_at.into();
                lags.push(completed.duration_since(times.ended).unwrap_or_default());
            }
            _ => {}
        }
    }
    lags
}
