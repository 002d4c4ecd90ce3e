//! The `reel` command line: parsing, the subcommands, and errors turned into one line on
//! stderr with an exit code scripts can rely on.

pub(crate) mod archive;
pub(crate) mod audit;
pub(crate) mod console;
mod metrics;
mod replay;
mod review;
mod submit;
mod tasks;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use engine::{Registry, TaskState};

use audit::{AuditArgs, AuditFailed, StatsArgs, audit, stats};
use replay::{ReplayArgs, replay};
use review::{
    ReviewArgs, SignalArgs, TaskArg, UpgradeArgs, approve, cancel, reject, retry, signal, upgrade,
};
use submit::{SubmitArgs, submit};
use tasks::{TasksArgs, tasks};
use worker::{WorkerArgs, worker};

/// What `reel worker` was told that a workflow's steps may need: where artifacts go, how
/// fast simulated providers and retry waits run, and which providers the video pipeline
/// calls.
#[derive(Clone, Debug)]
pub struct WorkerSettings {
    /// `--artifacts` (env `REEL_ARTIFACTS`, default `artifacts`).
    pub artifacts: PathBuf,
    /// `--time-scale` (env `REEL_TIME_SCALE`, default 0.001).
    pub time_scale: f64,
    /// `--simulate STEP=SECONDS` (env `REEL_SIMULATE`): simulated providers' item durations
    /// at real speed, by step, replacing the seed's figures.
    pub simulated_seconds: std::collections::BTreeMap<String, f64>,
    /// `--providers` (env `REEL_PROVIDERS`, default `simulated`).
    pub providers: steps::ProviderSet,
    /// `--provider STEP=NAME` (env `REEL_PROVIDER`): the steps on another set than
    /// `providers`.
    pub provider_steps: std::collections::BTreeMap<String, steps::ProviderSet>,
    /// The cloud providers' keys, URLs and prices (from the environment when a step is on
    /// the cloud set).
    pub cloud: steps::cloud::CloudConfig,
    /// `--job-timeout` (env `REEL_JOB_TIMEOUT`): replaces the job steps' job timeout.
    pub job_timeout: Option<std::time::Duration>,
}

impl WorkerSettings {
    /// Which set makes each step of the video pipeline, with the cloud settings.
    pub fn provider_plan(&self) -> steps::ProviderPlan {
        steps::ProviderPlan {
            set: self.providers,
            steps: self.provider_steps.clone(),
            cloud: self.cloud.clone(),
            job_timeout: self.job_timeout,
        }
    }
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            artifacts: PathBuf::from("artifacts"),
            time_scale: 0.001,
            simulated_seconds: std::collections::BTreeMap::new(),
            providers: steps::ProviderSet::default(),
            provider_steps: std::collections::BTreeMap::new(),
            cloud: steps::cloud::CloudConfig::default(),
            job_timeout: None,
        }
    }
}

/// The workflows a binary runs: a [`Registry`], or a function that builds one from the
/// worker's settings.
pub trait Workflows: Send + Sync + 'static {
    /// The registry for a worker (or `submit`'s input check) with these settings.
    fn registry(&self, settings: &WorkerSettings) -> Registry;

    /// Whether the binary takes the video pipeline's flags (`submit --topic
    /// --story-direction --fail`, `worker --providers --provider --simulate --time-scale
    /// --job-timeout`). Only [`VideoPipeline`] does: a binary of your own shows and
    /// accepts the engine's flags alone.
    fn video_flags(&self) -> bool {
        false
    }
}

/// The video pipeline (the `reel` binary's workflow), on the providers the worker's flags
/// name, with the pipeline's own flags.
#[derive(Clone, Copy, Debug, Default)]
pub struct VideoPipeline;

impl Workflows for VideoPipeline {
    fn registry(&self, settings: &WorkerSettings) -> Registry {
        Registry::new().register(settings.provider_plan().video_workflow(
            &settings.artifacts,
            settings.time_scale,
            &settings.simulated_seconds,
        ))
    }

    fn video_flags(&self) -> bool {
        true
    }
}

/// The video pipeline's flags, by subcommand and argument id.
const VIDEO_FLAGS: [(&str, &str, &str); 8] = [
    ("submit", "topic", "--topic"),
    ("submit", "story_direction", "--story-direction"),
    ("submit", "faults", "--fail"),
    ("worker", "time_scale", "--time-scale"),
    ("worker", "providers", "--providers"),
    ("worker", "provider", "--provider"),
    ("worker", "simulate", "--simulate"),
    ("worker", "job_timeout", "--job-timeout"),
];

/// Parses the command line; without the video pipeline, its flags are neither shown nor
/// taken (exit 2 names the flag).
fn parse(video: bool) -> Cli {
    let mut command = Cli::command();
    if !video {
        for (sub, id, _) in VIDEO_FLAGS {
            command = command.mut_subcommand(sub, |s| s.mut_arg(id, |a| a.hide(true)));
        }
    }
    let matches = command.get_matches();
    if !video && let Some((sub, given)) = matches.subcommand() {
        for (flag_sub, id, flag) in VIDEO_FLAGS {
            if flag_sub == sub && given.value_source(id) == Some(ValueSource::CommandLine) {
                eprintln!(
                    "error: {flag} is a flag of the video pipeline's binary (`reel`), not of this one's workflows"
                );
                std::process::exit(2);
            }
        }
    }
    Cli::from_arg_matches(&matches).unwrap_or_else(|err| err.exit())
}

impl Workflows for Registry {
    fn registry(&self, _settings: &WorkerSettings) -> Registry {
        self.clone()
    }
}

impl<F> Workflows for F
where
    F: Fn(&WorkerSettings) -> Registry + Send + Sync + 'static,
{
    fn registry(&self, settings: &WorkerSettings) -> Registry {
        self(settings)
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "reel",
    version,
    about = "A durable workflow engine on an event-sourced PostgreSQL log"
)]
struct Cli {
    /// PostgreSQL URL (also read from the environment or a .env file).
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    database_url: Option<String>,

    /// Log output format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the database if it is missing and apply the schema migrations.
    Migrate,
    /// Submit a task; prints its id.
    Submit(SubmitArgs),
    /// Claim and run tasks until SIGTERM/SIGINT (a second signal exits at once).
    Worker(WorkerArgs),
    /// List tasks (newest first).
    Tasks(TasksArgs),
    /// Send a failed (or retry-scheduled) task back to the queue; it resumes by replay.
    Retry(TaskArg),
    /// Accept a task in final review: it becomes completed.
    Approve(TaskArg),
    /// Send a task in final review back: STEP and every later step run again.
    Reject(ReviewArgs),
    /// Cancel a task; a worker running it stops at the next item boundary.
    Cancel(TaskArg),
    /// Send a task a signal with data (--data JSON); a task waiting for it wakes up.
    /// Idempotent by --id.
    Signal(SignalArgs),
    /// Move a task to a newer version of its workflow, as that version's rules allow
    /// (exit 2, writing nothing, when a rule is missing).
    Upgrade(UpgradeArgs),
    /// A task's history as a timeline and the state it folds to (--at VERSION: time travel).
    Replay(ReplayArgs),
    /// Check histories' invariants; exit 3 when one is broken.
    Audit(AuditArgs),
    /// Tasks per status, failure reasons, cost spent and saved.
    Stats(StatsArgs),
    /// Watch and steer runs in a browser (read-only unless started with --token).
    Console(console::ConsoleArgs),
    /// Move finished tasks' histories out of PostgreSQL into an archive (a directory or
    /// an S3 bucket); replay, audit and stats still read them.
    Archive(archive::ArchiveArgs),
    /// Put archived tasks' histories back into PostgreSQL.
    Restore(archive::RestoreArgs),
}

/// Bad input caught after parsing (a task input its workflow refuses): exit code 2, like
/// the usage errors clap reports.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct UsageError(pub(crate) String);

/// Runs the `reel` command line with `workflows`. Exit codes: 0 success, 1 failure (the
/// error is printed on one line), 2 bad usage, 3 `audit` found broken invariants.
pub fn main(workflows: impl Workflows) -> ExitCode {
    exit_quietly_on_a_closed_stdout();
    let _ = dotenvy::dotenv();
    let cli = parse(workflows.video_flags());
    let telemetry = engine::service::init_logging(cli.log_format == LogFormat::Json);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli, &workflows));
    // The last spans (a submit's, say) go out before the process ends.
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if err.downcast_ref::<AuditFailed>().is_some() => {
            eprintln!("audit: {err}");
            ExitCode::from(3)
        }
        Err(err) if err.downcast_ref::<UsageError>().is_some() => {
            eprintln!("error: {}", one_line(&err));
            ExitCode::from(2)
        }
        Err(err) => {
            eprintln!("error: {}", one_line(&err));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, workflows: &dyn Workflows) -> anyhow::Result<()> {
    let url = cli
        .database_url
        .context("no database: set DATABASE_URL or pass --database-url")?;
    match cli.command {
        Command::Migrate => migrate(&url).await?,
        Command::Submit(args) => submit(&url, args, workflows).await?,
        Command::Worker(args) => worker(&url, args, workflows).await?,
        Command::Tasks(args) => tasks(&url, args, workflows).await?,
        Command::Retry(args) => retry(&url, args).await?,
        Command::Approve(args) => approve(&url, args, workflows).await?,
        Command::Reject(args) => reject(&url, args, workflows).await?,
        Command::Cancel(args) => cancel(&url, args).await?,
        Command::Signal(args) => signal(&url, args).await?,
        Command::Upgrade(args) => upgrade(&url, args, workflows).await?,
        Command::Replay(args) => replay(&url, args).await?,
        Command::Audit(args) => audit(&url, args).await?,
        Command::Stats(args) => stats(&url, args).await?,
        Command::Console(args) => console::console(&url, args).await?,
        Command::Archive(args) => archive::archive(&url, args).await?,
        Command::Restore(args) => archive::restore_tasks(&url, args).await?,
    }
    Ok(())
}

async fn migrate(url: &str) -> anyhow::Result<()> {
    let options = engine::db::parse_url(url)?;
    if engine::db::create_database_if_missing(&options).await? {
        println!(
            "created database {}",
            options.get_database().unwrap_or("postgres")
        );
    }
    let store = engine::db::connect_store(url, 2).await?;
    store.migrate().await?;
    println!("migrations applied");
    Ok(())
}

/// `reel tasks | head -1` closes stdout while reel still prints: stop quietly with exit 0,
/// as a command-line tool should, instead of `println!`'s panic (exit 101). Rust ignores
/// SIGPIPE, and restoring it would take `unsafe`; the panic is the one place this shows.
fn exit_quietly_on_a_closed_stdout() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(0);
        }
        report(info);
    }));
}

/// The error and its causes on one line, without repeating a cause that a message above
/// already quotes (library errors often embed their source's text).
fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line.replace('\n', " ")
}

/// One line about a task's new state, or its JSON summary.
pub(crate) fn print_state(state: &TaskState, json: bool) -> anyhow::Result<()> {
    let id = state.task_id.map(|t| t.to_string()).unwrap_or_default();
    if json {
        println!(
            "{}",
            serde_json::json!({"id": id, "status": state.status(), "status_display": state.status_display(), "version": state.version, "attempt": state.attempt})
        );
    } else {
        println!("task {id}: {} ({})", state.status(), state.status_display());
    }
    Ok(())
}

/// Micro-dollars as dollars, e.g. `$0.550`.
pub(crate) fn money(micros: i64) -> String {
    format!("${:.3}", micros as f64 / 1e6)
}
