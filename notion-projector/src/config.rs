//! The binary's configuration (environment variables and flags) and its main loop.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

use crate::board::{BoardOptions, IntakeOptions};
use crate::metrics::Metrics;
use crate::notion::{
    DEFAULT_API_URL, DEFAULT_NOTION_VERSION, NotionClient, NotionConfig, PropertyType, Token,
};
use crate::projector::{Projector, ProjectorOptions};

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Mirror reel task status into Notion: follow the event log, send each task's latest
/// status to its Notion page, within Notion's rate limit, through outages. Durations take
/// `ms`, `s` or `m` (a bare number is seconds).
#[derive(Clone, Parser)]
#[command(name = "notion-projector", version)]
pub struct Config {
    /// PostgreSQL holding reel's event log.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// The Notion integration token (prefer the environment variable: flags show in `ps`).
    /// Never logged.
    #[arg(long = "notion-token", env = "NOTION_TOKEN", hide_env_values = true)]
    pub notion_token: String,
    /// Notion's API address (tests point it at a local fake).
    #[arg(long, env = "NOTION_API_URL", default_value = DEFAULT_API_URL)]
    pub notion_api_url: String,
    /// The `Notion-Version` header.
    #[arg(long, env = "NOTION_VERSION", default_value = DEFAULT_NOTION_VERSION)]
    pub notion_version: String,
    /// The page property that shows the status.
    #[arg(long, env = "NOTION_STATUS_PROPERTY", default_value = "Status")]
    pub status_property: String,
    /// Whether that property is a Status or a Select property.
    #[arg(long, value_enum, default_value_t = PropertyType::Status)]
    pub property_type: PropertyType,
    /// Requests per second to Notion, on average (Notion allows 3).
    #[arg(long, default_value_t = 3.0, value_parser = parse_rate)]
    pub rate: f64,
    /// Requests allowed back to back before the rate applies.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub burst: u32,
    /// The longest wait between reads of the log when no notification arrives.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    pub poll_interval: Duration,
    /// Events read per batch.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch_size: u32,
    /// The longest wait for one answer from Notion.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub http_timeout: Duration,
    /// Retries after a 5xx, a timeout or an unreachable Notion before the sync is recorded
    /// in `sync_failures` (and tried again on a later pass).
    #[arg(long, default_value_t = 3)]
    pub max_retries: u32,
    /// The first retry's delay; it doubles per retry, with jitter.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub retry_base: Duration,
    /// The longest retry delay after a 5xx or a timeout (`Retry-After` is honoured up to 15 min).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub retry_max: Duration,
    /// How often recorded transient failures are tried again.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub failure_retry_interval: Duration,
    /// How often a standby tries to take over.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub standby_interval: Duration,
    /// Requests in flight at once (the rate still applies).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub concurrency: u32,
    /// How long Notion's board query may lag a card's creation: after a card create whose
    /// answer was lost, the card is only looked for this long before it is made again.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub card_query_lag: Duration,
    /// How long Notion may still apply a request that got no clear answer (a timeout, a
    /// 502/504; Notion gives up after 60 s): a newer status sent meanwhile goes once more
    /// after this, so a late write never leaves an older status.
    #[arg(long, default_value = "65s", value_parser = parse_duration)]
    pub late_write_window: Duration,
    /// The checkpoint's and leader lock's name; instances with one name share one checkpoint.
    #[arg(long, env = "NOTION_PROJECTOR_NAME", default_value = "notion")]
    pub name: String,
    /// Serve `/healthz` and `/metrics` here, e.g. `0.0.0.0:9187`.
    #[arg(long, env = "NOTION_PROJECTOR_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// On the first start (no checkpoint yet), begin at the log's head instead of
    /// mirroring the whole history.
    #[arg(long)]
    pub from_now: bool,
    /// Do not apply pending migrations at start (for a role without DDL rights).
    #[arg(long)]
    pub no_migrate: bool,
    /// How long to keep trying the first connection while PostgreSQL cannot be reached
    /// (down, starting, restarting), one log line per try: seconds, or e.g. `2m` (default:
    /// keep trying; 0: one try). The same variable as `reel worker`'s.
    #[arg(long, env = "REEL_CONNECT_TIMEOUT", value_parser = parse_duration)]
    pub connect_timeout: Option<Duration>,
    /// The team's board: a Notion data source (or a database with one data source), as an
    /// id or URL. With it, every task without a page gets a card there.
    #[arg(long = "data-source", env = "NOTION_DATA_SOURCE_ID")]
    pub data_source: Option<String>,
    /// The board's title property (default: its title property, whatever its name).
    #[arg(long, env = "NOTION_TITLE_PROPERTY")]
    pub title_property: Option<String>,
    /// The board's text property holding the task id (required on the board).
    #[arg(long, env = "NOTION_TASK_ID_PROPERTY", default_value = "Task ID")]
    pub task_id_property: String,
    /// The board's property showing the channel (select or text).
    #[arg(long, env = "NOTION_CHANNEL_PROPERTY", default_value = "Channel")]
    pub channel_property: String,
    /// Also turn new cards on the board into tasks (needs --data-source).
    #[arg(long, requires = "data_source")]
    pub intake: bool,
    /// The status of cards to take in.
    #[arg(long, default_value = "Queued")]
    pub intake_status: String,
    /// The channel of a card without one.
    #[arg(long, env = "NOTION_INTAKE_CHANNEL")]
    pub intake_channel: Option<String>,
    /// The board's text property holding the story direction.
    #[arg(long, default_value = "Story direction")]
    pub direction_property: String,
    /// The workflow of tasks made from cards.
    #[arg(long, default_value = "video")]
    pub intake_workflow: String,
    /// The wait between two looks at the board.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub intake_interval: Duration,
    /// The status a card that cannot become a task is set to.
    #[arg(long, default_value = "Rejected")]
    pub rejected_status: String,
    /// The board's text property that says why a card was rejected.
    #[arg(long, default_value = "Intake error")]
    pub reason_property: String,
    /// Log lines as text or JSON (filter with `REEL_LOG`, e.g. `REEL_LOG=debug`).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("notion_api_url", &self.notion_api_url)
            .field("notion_version", &self.notion_version)
            .field("status_property", &self.status_property)
            .field("property_type", &self.property_type)
            .field("rate", &self.rate)
            .field("burst", &self.burst)
            .field("name", &self.name)
            .field("data_source", &self.data_source)
            .field("intake", &self.intake)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// The projector's options from the flags.
    pub fn projector_options(&self) -> ProjectorOptions {
        ProjectorOptions {
            name: self.name.clone(),
            status_property: self.status_property.clone(),
            property_type: self.property_type,
            rate: self.rate,
            burst: self.burst,
            poll_interval: self.poll_interval,
            batch_size: self.batch_size,
            max_retries: self.max_retries,
            retry_base: self.retry_base,
            retry_max: self.retry_max,
            failure_retry_interval: self.failure_retry_interval,
            standby_interval: self.standby_interval,
            concurrency: usize::try_from(self.concurrency).unwrap_or(1),
            card_query_lag: self.card_query_lag,
            late_write_window: self.late_write_window,
        }
    }

    /// The board's options, when a data source is given.
    pub fn board_options(&self) -> Option<BoardOptions> {
        let data_source = self.data_source.clone()?;
        let intake = self.intake.then(|| IntakeOptions {
            status: self.intake_status.clone(),
            channel: self.intake_channel.clone(),
            direction_property: self.direction_property.clone(),
            workflow: self.intake_workflow.clone(),
            interval: self.intake_interval,
            rejected_status: self.rejected_status.clone(),
            reason_property: self.reason_property.clone(),
        });
        Some(BoardOptions {
            data_source,
            title_property: self.title_property.clone(),
            task_id_property: self.task_id_property.clone(),
            channel_property: self.channel_property.clone(),
            intake,
        })
    }

    /// Installs the tracing subscriber (stderr; `REEL_LOG` filter, default `info`), and
    /// the span exporter when the `OTEL_EXPORTER_OTLP_*` variables ask for one: keep the
    /// returned value until the process ends (dropping it flushes the last spans).
    pub fn init_logging(&self) -> engine::service::Telemetry {
        engine::service::init_logging(self.log_format == LogFormat::Json)
    }
}

/// The `notion-projector` program: its flags from `args` (the program name first) and the
/// environment (`.env` too), logging and span export set up, run until SIGTERM/SIGINT.
pub fn main_from<I, T>(args: I) -> std::process::ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use std::process::ExitCode;
    let _ = dotenvy::dotenv();
    let config = Config::parse_from(args);
    let telemetry = config.init_logging();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(config));
    // The last spans go out before the runtime (and the process) ends.
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the projector until SIGTERM/SIGINT (a second signal exits at once).
pub async fn run(config: Config) -> anyhow::Result<()> {
    let token = Token::new(config.notion_token.clone());
    anyhow::ensure!(
        !config.notion_token.trim().is_empty(),
        "NOTION_TOKEN is empty"
    );
    let client = NotionClient::new(NotionConfig {
        api_url: config.notion_api_url.clone(),
        token,
        version: config.notion_version.clone(),
        timeout: config.http_timeout,
    })?;
    let shutdown = CancellationToken::new();
    tokio::spawn(engine::service::cancel_on_signals(
        shutdown.clone(),
        "finishing requests in flight",
    ));
    // A service waits for the database (a restart, a server still starting); the engine's
    // error names the server, the cause and the fix on one line per try.
    let store = engine::db::connect_store_waiting(
        &config.database_url,
        4,
        config.connect_timeout,
        &shutdown,
    )
    .await?;
    if !config.no_migrate {
        store.migrate().await.context("cannot apply migrations")?;
    }
    let metrics = Arc::new(Metrics::new());
    let mut projector = Projector::new(
        store.clone(),
        client,
        config.projector_options(),
        metrics.clone(),
    );
    // Served while the board opens, so a liveness probe does not restart an instance
    // that waits out a Notion outage.
    if let Some(addr) = config.metrics_addr {
        let bound = crate::metrics::serve(
            addr,
            metrics.clone(),
            store.clone(),
            config.name.clone(),
            shutdown.clone(),
        )
        .await
        .with_context(|| format!("cannot serve metrics on {addr}"))?;
        tracing::info!(%bound, "serving /healthz and /metrics");
    }
    if let Some(board) = config.board_options() {
        let opened = projector
            .open_board_patiently(&board, &shutdown)
            .await
            .context("cannot use the board")?;
        let Some(opened) = opened else {
            return Ok(());
        };
        tracing::info!(
            data_source = opened.data_source(),
            intake = config.intake,
            "using the board"
        );
    }
    projector
        .preflight()
        .await
        .context("refusing to follow this log")?;
    if config.from_now {
        crate::projector::checkpoint_at_head(&store, &config.name, true)
            .await
            .context("cannot set the starting checkpoint")?;
    }
    tracing::info!(
        api = %config.notion_api_url,
        version = %config.notion_version,
        property = %config.status_property,
        rate = config.rate,
        "notion-projector starting"
    );
    projector.run(shutdown).await;
    Ok(())
}

fn parse_rate(text: &str) -> Result<f64, String> {
    let rate: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if rate.is_finite() && rate > 0.0 && rate <= 1000.0 {
        Ok(rate)
    } else {
        Err("the rate must be above 0 and at most 1000 requests/s".into())
    }
}

/// `250ms`, `2s`, `1.5s`, `1m`, or a bare number of seconds.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60.0)
    } else {
        (text, 1.0)
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 500ms, 2s, 1m)"))?;
    if !value.is_finite() || value < 0.0 || value * scale > 86_400.0 {
        return Err(format!("{text:?} is out of range (0 to 24 h)"));
    }
    Ok(Duration::from_secs_f64(value * scale))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("2d").is_err());
    }

    #[test]
    fn the_token_is_not_in_debug_output() {
        let config = Config::parse_from([
            "notion-projector",
            "--database-url",
            "postgres://localhost/x",
            "--notion-token",
            "ntn_do_not_print_me",
        ]);
        assert!(!format!("{config:?}").contains("ntn_do_not_print_me"));
        assert_eq!(config.rate, 3.0);
        assert_eq!(config.status_property, "Status");
        assert_eq!(config.notion_version, "2025-09-03");
        assert!(parse_rate("0").is_err());
    }
}
