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

/// A pool on `url` with bounded waits: a dead database surfaces as an error within
/// `acquire_timeout`, never as a hang.
///
/// One connection is made first, so a server that is down, refuses the login or lacks the
/// database fails at once with [`Error::Unreachable`] (a one-line cause and fix) instead of
/// the pool's timeout after 10 s. Later outages are the pool's business: it reconnects.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool> {
    pool(parse_url(url)?, max_connections).await
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
        sqlx::Error::Io(io) => (io.to_string(), START_HINT),
        sqlx::Error::Database(refusal) => explain_refusal(options, refusal.as_ref()),
        other => (other.to_string(), "check DATABASE_URL"),
    };
    (cause.replace('\n', " "), hint.to_owned())
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
