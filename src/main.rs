//! `reel`: the command line of the reel workflow engine.
//!
//! Thin by design: parse, set up logging, call into the libraries, and turn errors into
//! one line on stderr and a non-zero exit code that scripts can rely on.

mod cli;

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use engine::PgStore;

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
    /// Submit a video task; prints its id.
    Submit(cli::SubmitArgs),
    /// Claim and run tasks until SIGTERM/SIGINT (a second signal exits at once).
    Worker(cli::WorkerArgs),
    /// List tasks (newest first).
    Tasks(cli::TasksArgs),
    /// Send a failed (or retry-scheduled) task back to the queue; it resumes by replay.
    Retry(cli::TaskArg),
    /// Accept a task in final review: it becomes completed.
    Approve(cli::TaskArg),
    /// Send a task in final review back: STEP and every later step run again.
    Reject(cli::ReviewArgs),
    /// Cancel a task; a worker running it stops at the next item boundary.
    Cancel(cli::TaskArg),
    /// A task's history as a timeline and the state it folds to (--at VERSION: time travel).
    Replay(cli::ReplayArgs),
    /// Check histories' invariants; exit 3 when one is broken.
    Audit(cli::AuditArgs),
    /// Tasks per status, failure reasons, cost spent and saved.
    Stats(cli::StatsArgs),
}

/// Exit codes: 0 success, 1 failure (the error is printed on one line), 2 bad usage,
/// 3 `reel audit` found broken invariants.
fn main() -> ExitCode {
    let _ = dotenvy::dotenv();
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if err.downcast_ref::<cli::AuditFailed>().is_some() => {
            eprintln!("audit: {err}");
            ExitCode::from(3)
        }
        Err(err) => {
            eprintln!("error: {}", one_line(&err));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let url = cli
        .database_url
        .context("no database: set DATABASE_URL or pass --database-url")?;
    match cli.command {
        Command::Migrate => {
            let options = engine::db::parse_url(&url)?;
            if engine::db::create_database_if_missing(&options).await? {
                println!(
                    "created database {}",
                    options.get_database().unwrap_or("postgres")
                );
            }
            let store = PgStore::new(engine::db::connect(&url, 2).await?);
            store.migrate().await?;
            println!("migrations applied");
        }
        Command::Submit(args) => cli::submit(&url, args).await?,
        Command::Worker(args) => cli::worker(&url, args).await?,
        Command::Tasks(args) => cli::tasks(&url, args).await?,
        Command::Retry(args) => cli::retry(&url, args).await?,
        Command::Approve(args) => cli::approve(&url, args).await?,
        Command::Reject(args) => cli::reject(&url, args).await?,
        Command::Cancel(args) => cli::cancel(&url, args).await?,
        Command::Replay(args) => cli::replay(&url, args).await?,
        Command::Audit(args) => cli::audit(&url, args).await?,
        Command::Stats(args) => cli::stats(&url, args).await?,
    }
    Ok(())
}

fn init_logging(format: LogFormat) {
    engine::service::init_logging(format == LogFormat::Json);
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
