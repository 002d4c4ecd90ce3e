//! `reel worker`: claim and run tasks until told to stop.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use clap::builder::{PossibleValuesParser, TypedValueParser};
use engine::{ProviderLimits, Registry, Worker, WorkerOptions};
use steps::ProviderSet;
use tokio_util::sync::CancellationToken;

use super::{UsageError, WorkerSettings, Workflows};

#[derive(Debug, Args)]
pub(crate) struct WorkerArgs {
    /// Tasks run at once (1 to 1024).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=1024))]
    concurrency: u16,
    /// Unique per process; restarting with the same id reclaims its leases at once (1 to
    /// 200 characters).
    #[arg(long, value_parser = parse_worker_id)]
    worker_id: Option<String>,
    /// Exit 0 once no task is queued, running, parked or scheduled for retry (tasks in
    /// review, or waiting for a signal without a deadline, wait for a person).
    #[arg(long)]
    until_idle: bool,
    /// Scales the simulated providers' durations and the retry and poll waits (0 to 10;
    /// 1 = real provider speed). Default 0.001, or 1 when a step is on the cloud set (a
    /// real API is polled and retried at its own pace).
    #[arg(long, env = "REEL_TIME_SCALE", value_parser = parse_time_scale)]
    time_scale: Option<f64>,
    /// Where artifacts are written (per channel, per task).
    #[arg(long, env = "REEL_ARTIFACTS", default_value = "artifacts")]
    artifacts: PathBuf,
    /// The video pipeline's providers: `simulated` (the seed's durations times
    /// --time-scale, text artifacts, the seed's costs), `local` (real PNGs, MP4s and
    /// speech made here at no cost; needs ffmpeg and espeak-ng) or `cloud` (Gemini images,
    /// Runway clips, ElevenLabs narration and SFX; keys from GEMINI_API_KEY,
    /// RUNWAY_API_KEY, ELEVENLABS_API_KEY; composites and assembly made here).
    #[arg(
        long,
        env = "REEL_PROVIDERS",
        default_value = "simulated",
        value_parser = PossibleValuesParser::new(ProviderSet::NAMES).try_map(|s| s.parse::<ProviderSet>())
    )]
    providers: ProviderSet,
    /// Puts one step on another provider set than --providers (STEP=NAME, NAME one of
    /// simulated, local, cloud; repeatable, or comma-separated in the env).
    #[arg(long = "provider", env = "REEL_PROVIDER", value_name = "STEP=NAME",
          value_delimiter = ',', value_parser = parse_step_provider)]
    provider: Vec<Option<(String, ProviderSet)>>,
    /// Seconds a claim holds a task without a heartbeat (1 to 86400).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    lease_ttl: u64,
    /// Seconds a provider job may run (and its polls keep failing) before it counts as
    /// lost — also how long a submit that got no answer keeps its slot (1 to 86400;
    /// default: the provider's own, 15 minutes for Runway).
    #[arg(long, env = "REEL_JOB_TIMEOUT", value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    job_timeout: Option<u64>,
    /// Seconds to keep trying the first connection while PostgreSQL cannot be reached
    /// (down, starting, restarting), one log line per try (default: keep trying; 0: one
    /// try, as the one-shot commands do).
    #[arg(long, env = "REEL_CONNECT_TIMEOUT", value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(0..=31_536_000))]
    connect_timeout: Option<u64>,
    /// Refuse to start (exit 2) when a workflow version's shape (its steps and their kinds,
    /// the review gate, the input type) differs from the one first recorded for that
    /// version; without it, a warning names what changed.
    #[arg(long, env = "REEL_STRICT_VERSIONS")]
    strict_versions: bool,
    /// Serve `/metrics` (OpenMetrics text) and `/healthz` here, e.g. `0.0.0.0:9188`
    /// (default: no server).
    #[arg(long, env = "REEL_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Archive tasks that finished longer ago than AGE (`30d`, `12h`) in the background,
    /// into --archive-to: one worker of the fleet at a time does it.
    #[arg(long, env = "REEL_RETAIN", value_name = "AGE", requires = "archive_to")]
    retain: Option<String>,
    /// Where --retain archives: a directory or s3://bucket/prefix (as `reel archive --to`).
    #[arg(long, env = "REEL_ARCHIVE_TO", value_name = "URL", requires = "retain")]
    archive_to: Option<String>,
    /// Tasks the background archiver archives per second at most.
    #[arg(
        long,
        env = "REEL_ARCHIVE_RATE",
        value_name = "TASKS",
        default_value_t = 20.0
    )]
    archive_rate: f64,
    /// Seconds between the background archiver's looks for finished tasks.
    #[arg(long, env = "REEL_ARCHIVE_EVERY", value_name = "SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    archive_every: u64,
    /// Seconds between the warnings this worker logs while tasks of its workflows are
    /// stranded (of a version no live worker serves or accepts); 1 to 86400.
    #[arg(long, env = "REEL_STRANDED_WARNING", value_name = "SECS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    stranded_warning: u64,
    /// Seconds items in flight may take to finish after SIGTERM (0 to 86400).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    shutdown_grace: u64,
    /// Caps the jobs or calls in flight at provider KEY across every worker (KEY=N, N from
    /// 1 to 100000; repeatable, or comma-separated in the env). Overrides the provider's
    /// default.
    #[arg(long = "max-in-flight", env = "REEL_MAX_IN_FLIGHT", value_name = "KEY=N",
          value_delimiter = ',', value_parser = parse_cap)]
    max_in_flight: Vec<Option<(String, u32)>>,
    /// Limits the requests per second to provider KEY across every worker (KEY=R, R from
    /// 0.001 to 100000; repeatable, or comma-separated in the env).
    #[arg(long = "rate", env = "REEL_RATE", value_name = "KEY=R", value_delimiter = ',',
          value_parser = parse_rate)]
    rate: Vec<Option<(String, f64)>>,
    /// Simulated providers only: the seconds one item of STEP takes at real speed, before
    /// --time-scale (STEP=SECONDS; repeatable, or comma-separated in the env). For demos and
    /// tests that need one step slower or faster than the seed's figures.
    #[arg(long = "simulate", env = "REEL_SIMULATE", value_name = "STEP=SECONDS",
          value_delimiter = ',', value_parser = parse_seconds)]
    simulate: Vec<Option<(String, f64)>>,
}

pub(crate) async fn worker(
    url: &str,
    args: WorkerArgs,
    workflows: &dyn Workflows,
) -> anyhow::Result<()> {
    let settings = settings(&args)?;
    // Before claiming anything: a missing ffmpeg or key is a message now, not a failure at
    // clip 7.
    settings.provider_plan().check_ready().await?;
    let concurrency = usize::from(args.concurrency);
    let registry = workflows.registry(&settings);
    for (step, _) in args.simulate.iter().flatten() {
        let known = registry.names().iter().any(|name| {
            registry
                .get(name)
                .is_some_and(|w| w.step_index(step).is_some())
        });
        if !known {
            return Err(UsageError(format!(
                "--simulate {:?}: no workflow of this worker has that step",
                engine::truncate_for_display(step, 40)
            ))
            .into());
        }
    }
    let provider_limits =
        provider_limits(&registry, &given(&args.max_in_flight), &given(&args.rate))?;
    let retention = match (&args.retain, &args.archive_to) {
        (Some(age), Some(to)) => Some(super::archive::Retention::new(
            age,
            to,
            args.archive_rate,
            Duration::from_secs(args.archive_every),
        )?),
        _ => None,
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(engine::service::cancel_on_signals(
        shutdown.clone(),
        "finishing items in flight",
    ));
    // A service waits for the database (a restart, a server still starting); the one-shot
    // commands fail at once.
    let store = engine::db::connect_store_waiting(
        url,
        (u32::from(args.concurrency) + 4).max(8),
        args.connect_timeout.map(Duration::from_secs),
        &shutdown,
    )
    .await?;
    let metrics = match args.metrics_listen {
        Some(addr) => {
            let metrics = std::sync::Arc::new(engine::metrics::Metrics::new());
            let bound =
                super::metrics::serve(addr, metrics.clone(), store.clone(), shutdown.clone())
                    .await
                    .with_context(|| format!("cannot serve metrics on {addr}"))?;
            tracing::info!(%bound, "serving /metrics and /healthz");
            Some(metrics)
        }
        None => None,
    };
    let worker_id = args.worker_id.unwrap_or_else(default_worker_id);
    let archiver = retention.map(|retention| {
        tokio::spawn(retention.run(store.clone(), worker_id.clone(), shutdown.clone()))
    });
    let lease_ttl = Duration::from_secs(args.lease_ttl);
    let options = WorkerOptions {
        concurrency,
        lease_ttl,
        heartbeat_interval: lease_ttl / 3,
        shutdown_grace: Duration::from_secs(args.shutdown_grace),
        until_idle: args.until_idle,
        provider_limits,
        strict_versions: args.strict_versions,
        stranded_warning_interval: Duration::from_secs(args.stranded_warning),
        metrics,
        ..WorkerOptions::new(worker_id)
    };
    let report = Worker::new(store, registry, options)
        .run(shutdown.clone())
        .await;
    // The background archiver stops with the worker (an --until-idle run ends it here).
    shutdown.cancel();
    if let Some(archiver) = archiver {
        let _ = archiver.await;
    }
    let report = match report {
        Err(refused @ engine::Error::ShapeChanged(_)) => {
            return Err(UsageError(refused.to_string()).into());
        }
        other => other.context("worker stopped")?,
    };
    tracing::info!(
        claimed = report.claimed,
        completed = report.completed,
        awaiting_review = report.awaiting_review,
        rescheduled = report.rescheduled,
        failed = report.failed,
        set_aside = report.set_aside,
        parked = report.parked,
        stopped = report.stopped,
        "worker done"
    );
    Ok(())
}

/// What the workflows are built with: the provider plan (with the cloud settings from the
/// environment when a step is on the cloud set) and the time scale it implies.
fn settings(args: &WorkerArgs) -> anyhow::Result<WorkerSettings> {
    let mut plan = steps::ProviderPlan::new(args.providers);
    for (step, set) in args.provider.iter().flatten() {
        plan = plan
            .with_step(step, *set)
            .map_err(|e| UsageError(format!("--provider: {e}")))?;
    }
    let on_cloud = plan.uses(ProviderSet::Cloud);
    if on_cloud {
        let cloud = steps::cloud::CloudConfig::from_env().map_err(|e| UsageError(e.to_string()))?;
        plan = plan.with_cloud(cloud);
    }
    Ok(WorkerSettings {
        artifacts: args.artifacts.clone(),
        time_scale: args
            .time_scale
            .unwrap_or(if on_cloud { 1.0 } else { 0.001 }),
        simulated_seconds: args.simulate.iter().flatten().cloned().collect(),
        providers: plan.set,
        provider_steps: plan.steps,
        cloud: plan.cloud,
        job_timeout: args.job_timeout.map(Duration::from_secs),
    })
}

/// The `--max-in-flight` and `--rate` overrides, by key; a key no workflow's step calls is
/// a usage error (a typo would otherwise leave the real provider uncapped).
fn provider_limits(
    registry: &Registry,
    caps: &[(String, u32)],
    rates: &[(String, f64)],
) -> anyhow::Result<Vec<ProviderLimits>> {
    let known = registry.providers();
    let mut limits: Vec<ProviderLimits> = Vec::new();
    let keys = caps
        .iter()
        .map(|(k, _)| k)
        .chain(rates.iter().map(|(k, _)| k));
    for key in keys {
        if !known.contains_key(key) {
            let names: Vec<&str> = known.keys().map(String::as_str).collect();
            return Err(UsageError(format!(
                "no step calls a provider {:?}: the keys are {}",
                engine::truncate_for_display(key, 40),
                if names.is_empty() {
                    "(none)".to_owned()
                } else {
                    names.join(", ")
                }
            ))
            .into());
        }
        if !limits.iter().any(|l| &*l.key == key) {
            limits.push(ProviderLimits::new(key));
        }
    }
    for limit in &mut limits {
        if let Some((_, cap)) = caps.iter().rev().find(|(k, _)| *k == *limit.key) {
            limit.max_in_flight = Some(*cap);
        }
        if let Some((_, rate)) = rates.iter().rev().find(|(k, _)| *k == *limit.key) {
            limit.rate = Some(*rate);
        }
    }
    for (key, defaults) in &known {
        let given = limits.iter().find(|l| &*l.key == key);
        tracing::info!(
            provider = %key,
            max_in_flight = ?given.and_then(|l| l.max_in_flight).or(defaults.max_in_flight),
            rate = ?given.and_then(|l| l.rate).or(defaults.rate),
            "provider limits"
        );
    }
    Ok(limits)
}

/// The values of a repeatable `KEY=VALUE` setting, without the blank ones: an empty
/// environment variable (`REEL_MAX_IN_FLIGHT=`) or a trailing comma sets nothing.
fn given<T: Clone>(values: &[Option<T>]) -> Vec<T> {
    values.iter().flatten().cloned().collect()
}

/// `None` for a blank value (see [`given`]), else `parse` of it.
fn unless_blank<T>(
    raw: &str,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<Option<T>, String> {
    if raw.trim().is_empty() {
        Ok(None)
    } else {
        parse(raw).map(Some)
    }
}

/// Splits `KEY=VALUE` with a non-empty key of at most 100 characters.
fn key_value(raw: &str) -> Result<(String, &str), String> {
    let (key, value) = raw
        .split_once('=')
        .ok_or_else(|| "expected KEY=VALUE".to_owned())?;
    let key = key.trim();
    if key.is_empty() || key.chars().count() > 100 {
        return Err("expected KEY=VALUE with a key of 1 to 100 characters".into());
    }
    Ok((key.to_owned(), value.trim()))
}

/// `--max-in-flight KEY=N`: N from 1 to 100000.
fn parse_cap(raw: &str) -> Result<Option<(String, u32)>, String> {
    unless_blank(raw, |raw| {
        let (key, value) = key_value(raw)?;
        match value.parse::<u32>() {
            Ok(n) if (1..=100_000).contains(&n) => Ok((key, n)),
            _ => Err(format!("expected {key}=N with N from 1 to 100000")),
        }
    })
}

/// `--rate KEY=R`: requests per second, from 0.001 to 100000.
fn parse_rate(raw: &str) -> Result<Option<(String, f64)>, String> {
    unless_blank(raw, |raw| {
        let (key, value) = key_value(raw)?;
        match value.parse::<f64>() {
            Ok(r) if (0.001..=100_000.0).contains(&r) => Ok((key, r)),
            _ => Err(format!("expected {key}=R with R from 0.001 to 100000")),
        }
    })
}

/// `--provider STEP=NAME`: NAME one of the provider sets (the step is checked later,
/// against the pipeline).
fn parse_step_provider(raw: &str) -> Result<Option<(String, ProviderSet)>, String> {
    unless_blank(raw, |raw| {
        let (step, name) = key_value(raw)?;
        let set = name.parse::<ProviderSet>().map_err(|e| e.to_string())?;
        Ok((step, set))
    })
}

/// `--simulate STEP=SECONDS`: from 0 to 86400.
fn parse_seconds(raw: &str) -> Result<Option<(String, f64)>, String> {
    unless_blank(raw, |raw| {
        let (key, value) = key_value(raw)?;
        match value.parse::<f64>() {
            Ok(s) if (0.0..=86_400.0).contains(&s) => Ok((key, s)),
            _ => Err(format!("expected {key}=SECONDS from 0 to 86400")),
        }
    })
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
