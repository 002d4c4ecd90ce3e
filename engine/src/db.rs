//! Connecting to PostgreSQL.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection};

use crate::error::{Error, Result};

/// The longest wait for the first connection. Refusals and missing databases answer at
/// once; this bounds a host that swallows packets, with room for a busy server's login.
const FIRST_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The README's way to start the local cluster: the fix for a server that is not running.
const START_HINT: &str = "is it running? Start it with \
    `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` \
    or point DATABASE_URL at a running server";

/// What stands between `DATABASE_URL` and PostgreSQL (`REEL_POOLER`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Pooler {
    /// Nothing (`none`, the default), or a pooler that gives each client a server
    /// session of its own (`session`): everything works as on a direct connection.
    #[default]
    None,
    /// Session pooling (PgBouncer's `pool_mode = session`): as [`Pooler::None`].
    Session,
    /// Transaction pooling (PgBouncer's `pool_mode = transaction`, Supabase's and Neon's
    /// pooled URLs): every transaction may run on another server session. reel then
    /// prepares no named statements and keeps no session state across transactions;
    /// what needs a session (LISTEN for wake-ups, a projector's leader lock) goes over
    /// `REEL_DIRECT_DATABASE_URL` when it is given, and otherwise falls back to polling
    /// and a lease row.
    Transaction,
}

impl Pooler {
    /// The variable that names the pooler.
    pub const VAR: &'static str = "REEL_POOLER";

    /// Parses `none`, `session` or `transaction` (an empty value is `none`).
    pub fn parse(raw: &str) -> Result<Pooler> {
        match raw.trim().to_ascii_lowercase().as_str() {
            "" | "none" => Ok(Pooler::None),
            "session" => Ok(Pooler::Session),
            "transaction" => Ok(Pooler::Transaction),
            _ => Err(Error::InvalidInput(format!(
                "{}={:?}: expected none, session or transaction",
                Pooler::VAR,
                crate::id::truncate_for_display(raw, 40)
            ))),
        }
    }

    /// The pooler `REEL_POOLER` names (none when unset).
    pub fn from_env() -> Result<Pooler> {
        std::env::var(Pooler::VAR).map_or(Ok(Pooler::None), |raw| Pooler::parse(&raw))
    }

    /// Whether a connection of the pool keeps its server session between transactions.
    pub fn keeps_sessions(self) -> bool {
        self != Pooler::Transaction
    }
}

/// The variable that names a URL straight to PostgreSQL (or through a session pooler), for
/// what needs a session when `DATABASE_URL` goes through a transaction pooler.
pub const DIRECT_URL_VAR: &str = "REEL_DIRECT_DATABASE_URL";

/// A pool on `url` with bounded waits: a dead database surfaces as an error within
/// `acquire_timeout`, never as a hang. Through a transaction pooler (`REEL_POOLER`, see
/// [`Pooler`]) its connections prepare no named statements.
///
/// One connection is made first, so a server that is down, refuses the login or lacks the
/// database fails at once with [`Error::Unreachable`] (a one-line cause and fix) instead of
/// the pool's timeout after 10 s. Later outages are the pool's business: it reconnects.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool> {
    pool(options_for(url, Pooler::from_env()?)?, max_connections).await
}

/// A store on `url` (see [`connect`]) with its session features placed as the
/// environment says: on the pool itself, over `REEL_DIRECT_DATABASE_URL` (a pool of one
/// connection), or nowhere (a transaction pooler without a direct URL: the store polls,
/// and says so once).
pub async fn connect_store(url: &str, max_connections: u32) -> Result<crate::PgStore> {
    let pooler = Pooler::from_env()?;
    let main = pool(options_for(url, pooler)?, max_connections).await?;
    let store = crate::PgStore::new(main).behind(pooler);
    let direct = std::env::var(DIRECT_URL_VAR)
        .ok()
        .filter(|u| !u.trim().is_empty());
    Ok(match (direct, pooler.keeps_sessions()) {
        (Some(direct), _) => {
            let session = pool(options_for(&direct, Pooler::None)?, 2).await?;
            store.with_session_pool(Some(session))
        }
        (None, true) => store,
        (None, false) => {
            tracing::debug!(
                "{}=transaction without {DIRECT_URL_VAR}: no LISTEN through the pooler, so \
                 workers look for work every poll interval and followers poll the log",
                Pooler::VAR
            );
            store.with_session_pool(None)
        }
    })
}

/// [`connect_store`] for a long-running service: while PostgreSQL cannot be reached (down,
/// starting, restarting) it says so on one line per try and tries again, 0.5 s doubling to
/// 10 s apart, until it connects, `limit` (if any) has passed, or `stop` fires.
/// Configuration errors (a bad URL, a refused password) fail at once.
pub async fn connect_store_waiting(
    url: &str,
    max_connections: u32,
    limit: Option<Duration>,
    stop: &tokio_util::sync::CancellationToken,
) -> Result<crate::PgStore> {
    let started = std::time::Instant::now();
    let mut wait = Duration::from_millis(500);
    for attempt in 1u32.. {
        let err = match connect_store(url, max_connections).await {
            Ok(store) => {
                if attempt > 1 {
                    tracing::info!(attempt, "connected to PostgreSQL");
                }
                return Ok(store);
            }
            Err(err @ Error::Unreachable { .. }) if worth_waiting_for(&err) => err,
            Err(err) => return Err(err),
        };
        if limit.is_some_and(|limit| started.elapsed() + wait > limit) {
            return Err(err);
        }
        tracing::warn!(attempt, retry_in = ?wait, "{err}");
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stop.cancelled() => return Err(err),
        }
        wait = (wait * 2).min(Duration::from_secs(10));
    }
    unreachable!("the loop returns")
}

/// Whether a failed first connection may succeed later without anyone changing the
/// configuration: the server is down, starting or not answering — not a refused login or
/// a missing database.
fn worth_waiting_for(err: &Error) -> bool {
    match err {
        Error::Unreachable { cause, .. } => {
            !(cause.starts_with("authentication failed")
                || cause.contains("does not exist")
                || cause.contains("no pg_hba.conf entry")
                || cause.contains("certificate")
                || cause.contains("TLS"))
        }
        _ => false,
    }
}

/// The connection options for `url` behind `pooler`.
fn options_for(url: &str, pooler: Pooler) -> Result<PgConnectOptions> {
    let options = parse_url(url)?;
    Ok(match pooler {
        // Named prepared statements live in a server session; through a transaction
        // pooler the next transaction may run on another one.
        Pooler::Transaction => options.statement_cache_capacity(0),
        Pooler::None | Pooler::Session => options,
    })
}

/// A pool on `options` once one connection has shown the server lets us in. The pool
/// cannot adopt that connection, so it is closed and the pool opens its own on first use.
async fn pool(options: PgConnectOptions, max_connections: u32) -> Result<PgPool> {
    let _ = first_connection(&options).await?.close().await;
    Ok(pool_options(max_connections).connect_lazy_with(options))
}

/// The engine's pool settings: bounded waits (a dead database is an error within 10 s,
/// never a hang). Every checkout pings its connection first (sqlx's default), so one a
/// server restart or a killed backend left dead is replaced instead of failing a query;
/// the hot path does not pay it, since an orchestrator keeps one connection for its runs'
/// appends (see [`crate::HOLD_SPARE`]). Use these options for a pool you build yourself.
pub fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
}

/// One connection within [`FIRST_CONNECT_TIMEOUT`], its failure explained.
async fn first_connection(options: &PgConnectOptions) -> Result<PgConnection> {
    match tokio::time::timeout(FIRST_CONNECT_TIMEOUT, options.connect()).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(err)) => Err(unreachable(options, explain(options, &err))),
        Err(_elapsed) => Err(unreachable(
            options,
            (
                format!("no answer within {} s", FIRST_CONNECT_TIMEOUT.as_secs()),
                START_HINT.to_owned(),
            ),
        )),
    }
}

/// The error for a failed first connection. Built from the options, never from the URL
/// text, so a password cannot end up in the message.
fn unreachable(options: &PgConnectOptions, (cause, hint): (String, String)) -> Error {
    let host = match options.get_socket() {
        Some(socket) => socket.display().to_string(),
        None => options.get_host().to_owned(),
    };
    Error::Unreachable {
        host,
        port: options.get_port(),
        cause,
        hint,
    }
}

/// The cause and the fix of a failed connection attempt, on one line.
fn explain(options: &PgConnectOptions, err: &sqlx::Error) -> (String, String) {
    let (cause, hint) = match err {
        sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            ("connection refused".to_owned(), START_HINT)
        }
        // A refused certificate arrives as an I/O error from the TLS handshake.
        sqlx::Error::Io(io) if looks_like_tls(&io.to_string()) => (format!("TLS: {io}"), TLS_HINT),
        sqlx::Error::Io(io) => (io.to_string(), START_HINT),
        sqlx::Error::Database(refusal) => explain_refusal(options, refusal.as_ref()),
        sqlx::Error::Tls(tls) => (format!("TLS: {tls}"), TLS_HINT),
        other => (other.to_string(), "check DATABASE_URL"),
    };
    (cause.replace('\n', " "), hint.to_owned())
}

/// What to check when the server's certificate is refused.
const TLS_HINT: &str = "check sslrootcert (the CA that signed the server's certificate) and \
    that the host in DATABASE_URL is one the certificate names";

/// Whether an I/O error's text is a TLS handshake's refusal.
fn looks_like_tls(text: &str) -> bool {
    let text = text.to_ascii_lowercase();
    ["certificate", "handshake", "tls", "ssl"]
        .iter()
        .any(|word| text.contains(word))
}

/// The server answered and refused the session (SQLSTATE class 28, 3D, 57, ...).
fn explain_refusal(
    options: &PgConnectOptions,
    refusal: &dyn sqlx::error::DatabaseError,
) -> (String, &'static str) {
    match refusal.code().as_deref() {
        // invalid_catalog_name
        Some("3D000") => (
            format!(
                "database \"{}\" does not exist",
                options.get_database().unwrap_or("postgres")
            ),
            "`reel migrate` creates it",
        ),
        // invalid_password (the message names the user; the password is never echoed)
        Some("28P01") => (
            format!(
                "authentication failed for user \"{}\"",
                options.get_username()
            ),
            "check the user and password in DATABASE_URL",
        ),
        // invalid_authorization_specification: no pg_hba.conf entry, or no such role
        Some("28000") => (
            refusal.message().to_owned(),
            "check the user in DATABASE_URL and the server's pg_hba.conf",
        ),
        // cannot_connect_now: starting up, shutting down or in recovery
        Some("57P03") => (refusal.message().to_owned(), "try again in a moment"),
        _ => (refusal.message().to_owned(), "check DATABASE_URL"),
    }
}

/// Parses a `postgres://` URL into connection options.
pub fn parse_url(url: &str) -> Result<PgConnectOptions> {
    // The driver reads any scheme as PostgreSQL's: say so before it dials a MySQL URL.
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(Error::InvalidInput(
            "invalid database URL: expected postgres://user@host:port/database".into(),
        ));
    }
    url.parse::<PgConnectOptions>()
        .map_err(|e| Error::InvalidInput(format!("invalid database URL: {e}")))
}

/// Creates the database `options` names if it does not exist (connecting to the server's
/// `postgres` database to do so). Returns whether it was created.
pub async fn create_database_if_missing(options: &PgConnectOptions) -> Result<bool> {
    let name = options.get_database().unwrap_or("postgres").to_owned();
    let mut conn = first_connection(&options.clone().database("postgres")).await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut conn)
            .await?;
    if !exists {
        let quoted = name.replace('"', "\"\"");
        let created = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            r#"CREATE DATABASE "{quoted}""#
        )))
        .execute(&mut conn)
        .await;
        match created {
            Ok(_) => {}
            // Another process created it meanwhile: that is what we wanted.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
            Err(e) => return Err(e.into()),
        }
    }
    let _ = conn.close().await;
    Ok(!exists)
}

/// The server the tools and examples use when `DATABASE_URL` is not set.
pub const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Opens the database `name` on the server at `server_url` for a tool or example that owns
/// it: creates it if missing, connects with up to `max_connections`, applies migrations.
pub async fn open_database(
    server_url: &str,
    name: &str,
    max_connections: u32,
) -> Result<crate::PgStore> {
    let options = parse_url(server_url)?.database(name);
    create_database_if_missing(&options).await?;
    let store = crate::PgStore::new(pool(options, max_connections).await?);
    store.migrate().await?;
    Ok(store)
}
