//! `reel worker`: claim and run tasks until told to stop.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use clap::builder::{PossibleValuesParser, TypedValueParser};
use engine::{PgStore, Worker, WorkerOptions};
use steps::ProviderSet;
use tokio_util::sync::CancellationToken;

use super::{WorkerSettings, Workflows};

#[derive(Debug, Args)]
pub(crate) struct WorkerArgs {
    /// Tasks run at once (1 to 1024).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=1024))]
    concurrency: u16,
    /// Unique per process; restarting with the same id reclaims its leases at once (1 to
    /// 200 characters).
    #[arg(long, value_parser = parse_worker_id)]
    worker_id: Option<String>,
    /// Exit 0 once no task is queued, running or scheduled for retry.
    #[arg(long)]
    until_idle: bool,
    /// Scales the simulated providers' durations and the retry waits (0 to 10; 1 = real
    /// provider speed).
    #[arg(long, env = "REEL_TIME_SCALE", default_value_t = 0.001, value_parser = parse_time_scale)]
    time_scale: f64,
    /// Where artifacts are written (per channel, per task).
    #[arg(long, env = "REEL_ARTIFACTS", default_value = "artifacts")]
    artifacts: PathBuf,
    /// The video pipeline's providers: `simulated` (the seed's durations times
    /// --time-scale, text artifacts, the seed's costs) or `local` (real PNGs, MP4s and
    /// speech made here at no cost; needs ffmpeg and espeak-ng).
    #[arg(
        long,
        env = "REEL_PROVIDERS",
        default_value = "simulated",
        value_parser = PossibleValuesParser::new(ProviderSet::NAMES).try_map(|s| s.parse::<ProviderSet>())
    )]
    providers: ProviderSet,
    /// Seconds a claim holds a task without a heartbeat (1 to 86400).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    lease_ttl: u64,
    /// Seconds items in flight may take to finish after SIGTERM (0 to 86400).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    shutdown_grace: u64,
}

pub(crate) async fn worker(
    url: &str,
    args: WorkerArgs,
    workflows: &dyn Workflows,
) -> anyhow::Result<()> {
    // Before claiming anything: a missing ffmpeg is a message now, not a failure at clip 7.
    args.providers.check_ready().await?;
    let concurrency = usize::from(args.concurrency);
    let store =
        PgStore::new(engine::db::connect(url, (u32::from(args.concurrency) + 4).max(8)).await?);
    let registry = workflows.registry(&WorkerSettings {
        artifacts: args.artifacts,
        time_scale: args.time_scale,
        providers: args.providers,
    });
    let lease_ttl = Duration::from_secs(args.lease_ttl);
    let options = WorkerOptions {
        concurrency,
        lease_ttl,
        heartbeat_interval: lease_ttl / 3,
        shutdown_grace: Duration::from_secs(args.shutdown_grace),
        until_idle: args.until_idle,
        ..WorkerOptions::new(args.worker_id.unwrap_or_else(default_worker_id))
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(engine::service::cancel_on_signals(
        shutdown.clone(),
        "finishing items in flight",
    ));
    let report = Worker::new(store, registry, options)
        .run(shutdown)
        .await
        .context("worker stopped")?;
    tracing::info!(
        claimed = report.claimed,
        completed = report.completed,
        awaiting_review = report.awaiting_review,
        rescheduled = report.rescheduled,
        failed = report.failed,
        set_aside = report.set_aside,
        stopped = report.stopped,
        "worker done"
    );
    Ok(())
}

fn default_worker_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".into());
    format!("{host}-{}", std::process::id())
}

/// `--time-scale`: a number from 0 to 10 (larger values overflow the waits they scale).
fn parse_time_scale(raw: &str) -> Result<f64, String> {
    match raw.parse::<f64>() {
        Ok(scale) if (0.0..=10.0).contains(&scale) => Ok(scale),
        _ => Err("expected a number from 0 to 10".into()),
    }
}

/// `--worker-id`: 1 to 200 characters (it is stored and indexed as the lease owner).
fn parse_worker_id(raw: &str) -> Result<String, String> {
    let max = WorkerOptions::WORKER_ID_MAX_CHARS;
    if raw.is_empty() || raw.chars().count() > max {
        return Err(format!("expected 1 to {max} characters"));
    }
    Ok(raw.to_owned())
}
