//! Test harness: every test gets its own fresh, migrated database on a real PostgreSQL.
//!
//! The server comes from `DATABASE_URL` (the environment, or the workspace's `.env`). A
//! template database with the migrations applied is built once per migration set, so a
//! fresh database is a fast `CREATE DATABASE … TEMPLATE`. Each database is dropped when its
//! [`TestDatabase`] is dropped (set `REEL_KEEP_TEST_DB=1` to keep it for a post-mortem).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::postgres::{PgConnectOptions, PgPool};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Executor, PgConnection};

use crate::store::{MIGRATOR, PgStore};

mod pgbouncer;

pub use pgbouncer::{PgBouncer, free_port, is_root};

/// Test databases older than this are left-overs of killed runs and are dropped.
const STALE_AFTER: Duration = Duration::from_secs(3 * 3600);

/// A fresh database for one test, dropped on drop.
#[derive(Debug)]
pub struct TestDatabase {
    name: String,
    url: String,
    admin: PgConnectOptions,
    pool: PgPool,
}

impl TestDatabase {
    /// Creates a fresh migrated database. Panics with instructions when no server answers:
    /// a test that cannot reach PostgreSQL must fail loudly, never pass silently.
    pub async fn create() -> TestDatabase {
        match Self::try_create().await {
            Ok(db) => db,
            Err(err) => panic!("{err}"),
        }
    }

    async fn try_create() -> Result<TestDatabase, String> {
        let server_url = database_url();
        let mut admin: PgConnectOptions = server_url
            .parse()
            .map_err(|e| format!("DATABASE_URL {server_url:?} is not a PostgreSQL URL: {e}"))?;
        // A loopback server with no TLS asked for: no TLS. Every `reel` process a test starts
        // would otherwise spend ~200 ms (debug build) on a handshake that tests nothing (the
        // TLS tests build their own `sslmode=verify-full` URLs).
        let loopback = matches!(admin.get_host(), "127.0.0.1" | "localhost" | "::1")
            || admin.get_host().starts_with('/');
        if loopback && !server_url.contains("sslmode") && std::env::var_os("PGSSLMODE").is_none() {
            admin = admin.ssl_mode(sqlx::postgres::PgSslMode::Disable);
        }
        let mut conn = admin
            .connect()
            .await
            .map_err(|e| no_server_message(&server_url, &e))?;
        let name = format!("reel_test_{}_{}", unix_now(), uuid::Uuid::new_v4().simple());
        create_from_template(&mut conn, &name).await?;
        let _ = conn.close().await;
        let options = admin.clone().database(&name);
        // The engine's own pool settings, so tests run the hot path the workers run.
        let pool = crate::db::pool_options(16)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.clone())
            .await
            .map_err(|e| format!("cannot connect to test database {name}: {e}"))?;
        Ok(TestDatabase {
            url: options.to_url_lossy().to_string(),
            name,
            admin,
            pool,
        })
    }

    /// The pool on the test database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A store on the test database.
    pub fn store(&self) -> PgStore {
        PgStore::new(self.pool.clone())
    }

    /// The test database's URL (for child processes and extra connections).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Writes an event row past the end of `task`'s stream as another writer would (an
    /// earlier build, a newer one, a corrupting one): `payload` as stored, no checks; the
    /// `tasks` row follows the new version. Returns that version.
    pub async fn append_raw(
        &self,
        task: crate::TaskId,
        event_type: &str,
        schema_version: i16,
        payload: &str,
    ) -> u32 {
        let version: i32 = sqlx::query_scalar(
            "INSERT INTO events (stream_id, stream_version, event_id, event_type, schema_version, payload) \
             SELECT $1, COALESCE(max(stream_version), 0) + 1, gen_random_uuid(), $2, $3, $4::jsonb \
               FROM events WHERE stream_id = $1 \
             RETURNING stream_version",
        )
        .bind(task.as_uuid())
        .bind(event_type)
        .bind(schema_version)
        .bind(payload)
        .fetch_one(&self.pool)
        .await
        .unwrap_or_else(|e| panic!("append a raw {event_type} event: {e}"));
        sqlx::query("UPDATE tasks SET version = $2 WHERE id = $1")
            .bind(task.as_uuid())
            .bind(version)
            .execute(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("bump the task's version: {e}"));
        u32::try_from(version).unwrap_or(0)
    }

    /// The test database's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if std::env::var_os("REEL_KEEP_TEST_DB").is_some() {
            eprintln!("keeping test database {}", self.name);
            return;
        }
        let name = self.name.clone();
        let admin = self.admin.clone();
        // Drop runs inside the test's runtime, which this blocks: use a runtime of our own,
        // and never touch the pool (its connections belong to the blocked runtime). FORCE
        // ends the pool's sessions server-side.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async move {
                let mut conn = admin.connect().await.ok()?;
                ddl(
                    &mut conn,
                    format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#),
                )
                .await
                .ok()
            })
        })
        .join();
        if !matches!(dropped, Ok(Some(_))) {
            eprintln!(
                "could not drop test database {}; it is dropped by a later run",
                self.name
            );
        }
    }
}

/// libfaketime (Debian's `libfaketime`, installed by `.ci/run` and the README's
/// prerequisites) under the machine's multiarch directory: `LD_PRELOAD` it with `FAKETIME`
/// to run a process whose clock is off.
pub fn faketime() -> String {
    std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|dir| dir.path().join("faketime/libfaketime.so.1"))
        .find(|lib| lib.exists())
        .map(|lib| lib.to_string_lossy().into_owned())
        .expect("libfaketime (apt-get install -y libfaketime)")
}

/// `DATABASE_URL` from the environment, else from the nearest `.env`, else the local default.
pub fn database_url() -> String {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        return url;
    }
    let _ = dotenvy::dotenv();
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

fn no_server_message(url: &str, err: &sqlx::Error) -> String {
    format!(
        "cannot reach PostgreSQL at {url}: {err}\n\
         The database tests need a running PostgreSQL (14 or newer). Start one, e.g. on Debian:\n  \
         pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start\n\
         or point DATABASE_URL (environment or .env) at a server you can create databases on."
    )
}

/// Builds the template database for the current migration set once (across processes:
/// serialised by an advisory lock) and returns its name: `reel_template_<digest>_<unix
/// time>`, so that checkouts with other migration sets sharing the server (branches,
/// worktrees) keep their own templates until they are stale.
async fn ensure_template(conn: &mut PgConnection) -> Result<String, String> {
    let digest = MIGRATOR.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, m| {
        m.checksum.iter().fold(hash, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
        })
    });
    let prefix = format!("reel_template_{digest:016x}_");
    let sql_err = |e: sqlx::Error| format!("preparing the template database: {e}");
    conn.execute("SELECT pg_advisory_lock(7348012)")
        .await
        .map_err(sql_err)?;
    let result = async {
        let existing: Option<String> = sqlx::query_scalar(
            "SELECT datname FROM pg_database WHERE starts_with(datname, $1) \
              AND datname NOT LIKE '%\\_building' ORDER BY datname DESC LIMIT 1",
        )
        .bind(&prefix)
        .fetch_optional(&mut *conn)
        .await
        .map_err(sql_err)?;
        if let Some(template) = existing {
            return Ok(template);
        }
        let template = format!("{prefix}{}", unix_now());
        {
            drop_stale(conn).await.map_err(sql_err)?;
            let building = format!("{template}_building");
            ddl(
                conn,
                format!(r#"DROP DATABASE IF EXISTS "{building}" WITH (FORCE)"#),
            )
            .await
            .map_err(sql_err)?;
            ddl(conn, format!(r#"CREATE DATABASE "{building}""#))
                .await
                .map_err(sql_err)?;
            migrate_database(&building).await?;
            ddl(
                conn,
                format!(r#"ALTER DATABASE "{building}" RENAME TO "{template}""#),
            )
            .await
            .map_err(sql_err)?;
        }
        Ok(template)
    }
    .await;
    let _ = conn.execute("SELECT pg_advisory_unlock(7348012)").await;
    result
}

async fn migrate_database(name: &str) -> Result<(), String> {
    let url = database_url();
    let options: PgConnectOptions = url.parse().map_err(|e| format!("{e}"))?;
    let mut target = options
        .database(name)
        .connect()
        .await
        .map_err(|e| format!("connecting to {name}: {e}"))?;
    MIGRATOR
        .run(&mut target)
        .await
        .map_err(|e| format!("migrating {name}: {e}"))?;
    let _ = target.close().await;
    Ok(())
}

async fn create_from_template(conn: &mut PgConnection, name: &str) -> Result<(), String> {
    // A template being copied must have no other sessions; another process's copy can
    // briefly hold one, so retry a few times (and build the template again if another
    // checkout's stale sweep removed it).
    let mut last = String::new();
    for _ in 0..50 {
        let template = ensure_template(conn).await?;
        let sql = format!(r#"CREATE DATABASE "{name}" TEMPLATE "{template}""#);
        match ddl(conn, sql).await {
            Ok(_) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("cannot create test database {name}: {last}"))
}

/// Drops test databases left behind by killed runs, and templates not built in the last
/// hours (older migration sets; names without a time are from older harnesses).
async fn drop_stale(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    let names: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'reel\\_test\\_%' OR datname LIKE 'reel\\_template\\_%'")
            .fetch_all(&mut *conn)
            .await?;
    let cutoff = unix_now().saturating_sub(STALE_AFTER.as_secs());
    for name in names {
        let created = match name.strip_prefix("reel_test_") {
            Some(rest) => rest.split('_').next(),
            None => name.rsplit('_').next(),
        }
        .and_then(|secs| secs.parse::<u64>().ok());
        let stale = created.is_none_or(|secs| secs < cutoff);
        if stale {
            ddl(
                conn,
                format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#),
            )
            .await?;
        }
    }
    Ok(())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Runs a statement built from names this module generated itself (never user input).
async fn ddl(conn: &mut PgConnection, sql: String) -> Result<(), sqlx::Error> {
    conn.execute(AssertSqlSafe(sql)).await.map(|_| ())
}
