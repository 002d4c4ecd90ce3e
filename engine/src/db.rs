//! Connecting to PostgreSQL.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection};

use crate::error::{Error, Result};

/// A pool on `url` with bounded waits: a dead database surfaces as an error within
/// `acquire_timeout`, never as a hang.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool> {
    let options = parse_url(url)?;
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await?)
}

/// Parses a `postgres://` URL into connection options.
pub fn parse_url(url: &str) -> Result<PgConnectOptions> {
    url.parse::<PgConnectOptions>()
        .map_err(|e| Error::InvalidInput(format!("invalid database URL: {e}")))
}

/// Creates the database `options` names if it does not exist (connecting to the server's
/// `postgres` database to do so). Returns whether it was created.
pub async fn create_database_if_missing(options: &PgConnectOptions) -> Result<bool> {
    let name = options.get_database().unwrap_or("postgres").to_owned();
    let mut conn = options.clone().database("postgres").connect().await?;
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
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await?;
    let store = crate::PgStore::new(pool);
    store.migrate().await?;
    Ok(store)
}
