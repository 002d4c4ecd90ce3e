//! `reel console`: watch and steer runs in a browser.
//!
//! An HTTP server (axum) that reads the log and the `tasks` rows only, as `replay` and
//! `audit` do: it needs no workflow code. Pages are rendered on the server (maud, compiled
//! into the binary) with a little plain JavaScript for live updates. Live updates come
//! from **one** subscription of the global log per console process ([`hub`]), fanned out
//! to every open browser over Server-Sent Events: browsers add no database reads.
//!
//! Read-only unless started with a token; actions (approve, reject, retry, cancel) go
//! through the same engine commands as the CLI and record who did them ([`auth`]).

mod auth;
mod files;
mod hub;
mod ops;
mod pages;
mod svg;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};
use clap::Args;
use engine::{ChannelId, PgStore};
use tokio_util::sync::CancellationToken;

use super::UsageError;

/// The console's listening address when none is given: loopback only.
pub(crate) const DEFAULT_LISTEN: &str = "127.0.0.1:7878";

#[derive(Debug, Args)]
pub(crate) struct ConsoleArgs {
    /// Where to listen. Off loopback, a token is required.
    #[arg(long, env = "REEL_CONSOLE_LISTEN", default_value = DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Actions (approve, reject, retry, cancel) need this token: a browser signs in with
    /// it, a script sends it as `Authorization: Bearer`. Without it the console is
    /// read-only.
    #[arg(long, env = "REEL_CONSOLE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Only these channels are visible (repeatable); a task elsewhere is "not found".
    #[arg(long = "channel", value_name = "CHANNEL")]
    channels: Vec<String>,
    /// Where the workers write artifacts (as `reel worker --artifacts`): a task's images,
    /// audio and video are shown on its page, served from that task's directory only.
    #[arg(long, value_name = "DIR")]
    artifacts: Option<PathBuf>,
}

/// What a console shows and allows, beyond the database it reads.
#[derive(Clone, Debug, Default)]
pub struct ConsoleOptions {
    /// Allows actions (approve, reject, retry, cancel) to whoever presents it.
    pub token: Option<String>,
    /// Only these channels are visible (empty: all).
    pub channels: Vec<ChannelId>,
    /// The artifacts root (`reel worker --artifacts`): media shown on task pages.
    pub artifacts: Option<PathBuf>,
}

/// What every handler shares.
#[derive(Debug)]
pub(crate) struct Console {
    store: PgStore,
    auth: auth::Auth,
    /// Empty: every channel.
    channels: Vec<ChannelId>,
    hub: hub::Hub,
    /// The artifacts root, if media are shown.
    artifacts: Option<PathBuf>,
    /// The stats page's figures, computed by one request at a time and kept a while.
    stats: ops::StatsCache,
    /// Ends the live streams (a shutdown waits for open connections to close).
    stop: CancellationToken,
}

impl Console {
    /// Whether a task of `channel` may be shown.
    fn sees(&self, channel: &str) -> bool {
        self.channels.is_empty() || self.channels.iter().any(|c| c.as_str() == channel)
    }
}

pub(crate) async fn console(url: &str, args: ConsoleArgs) -> anyhow::Result<()> {
    let token = args.token.filter(|t| !t.trim().is_empty());
    if !args.listen.ip().is_loopback() && token.is_none() {
        return Err(UsageError(format!(
            "--listen {} is reachable from other machines: set --token (or \
             REEL_CONSOLE_TOKEN) so that only operators can act, or listen on 127.0.0.1",
            args.listen
        ))
        .into());
    }
    if let Some(token) = &token
        && token.trim().chars().count() < auth::MIN_TOKEN_CHARS
    {
        return Err(UsageError(format!(
            "--token must be at least {} characters",
            auth::MIN_TOKEN_CHARS
        ))
        .into());
    }
    let channels = args
        .channels
        .iter()
        .map(|c| ChannelId::parse(c))
        .collect::<Result<Vec<_>, _>>()?;
    let shutdown = CancellationToken::new();
    tokio::spawn(engine::service::cancel_on_signals(
        shutdown.clone(),
        "closing the console",
    ));
    // A service waits for the database (a restart, a server still starting).
    let store = engine::db::connect_store_waiting(url, 4, None, &shutdown).await?;
    let actions = token.is_some();
    if let Some(root) = &args.artifacts
        && !root.is_dir()
    {
        return Err(
            UsageError(format!("--artifacts {} is not a directory", root.display())).into(),
        );
    }
    let options = ConsoleOptions {
        token,
        channels,
        artifacts: args.artifacts,
    };
    let mut app = console_router_with(store, options, shutdown.clone()).await?;
    if args.listen.ip().is_loopback() {
        // Only this machine reaches it, so only its own address may name it: a page of
        // another site resolving its name to 127.0.0.1 (DNS rebinding) is refused.
        let allowed = Arc::new(auth::loopback_hosts(args.listen));
        app = app.layer(axum::middleware::from_fn(move |request, next| {
            auth::check_host(allowed.clone(), request, next)
        }));
    }
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    tracing::info!(listen = %listener.local_addr()?, actions, "reel console serving");
    // A line scripts (and the tests) can wait for: where the console listens.
    println!("console listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    Ok(())
}

/// The console as an axum [`Router`], to serve from a program of your own (what
/// `reel console` serves): `token` allows actions, `channels` (empty: all) limits what it
/// shows. Its live updates follow the log until `stop`.
pub async fn console_router(
    store: PgStore,
    token: Option<String>,
    channels: Vec<ChannelId>,
    stop: CancellationToken,
) -> anyhow::Result<Router> {
    let options = ConsoleOptions {
        token,
        channels,
        artifacts: None,
    };
    console_router_with(store, options, stop).await
}

/// The console as an axum [`Router`], with every option (see [`ConsoleOptions`]).
pub async fn console_router_with(
    store: PgStore,
    options: ConsoleOptions,
    stop: CancellationToken,
) -> anyhow::Result<Router> {
    let console = Arc::new(Console {
        hub: hub::Hub::start(store.clone(), stop.clone()).await?,
        stop,
        stats: ops::StatsCache::new(&store),
        store,
        auth: auth::Auth::new(options.token),
        channels: options.channels,
        // Canonical: a served file must lie under it once the kernel resolved its path.
        artifacts: options
            .artifacts
            .map(|root| root.canonicalize().unwrap_or(root)),
    });
    Ok(router(console))
}

fn router(console: Arc<Console>) -> Router {
    Router::new()
        .route("/", get(pages::tasks))
        .route("/tasks/{id}", get(pages::task))
        .route("/tasks/{id}/{action}", post(pages::action))
        .route("/tasks/{id}/files/{step}/{file}", get(files::artifact))
        .route("/providers", get(ops::providers))
        .route("/stats", get(ops::stats))
        .route("/live", get(hub::live))
        .route("/login", get(auth::login_form).post(auth::login))
        .route("/logout", post(auth::logout))
        .route("/static/console.js", get(pages::script))
        .route("/static/console.css", get(pages::style))
        .fallback(pages::not_found)
        .with_state(console)
}
