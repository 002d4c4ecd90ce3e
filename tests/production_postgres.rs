//! reel where production PostgreSQL lives (issue 27), each against a throwaway cluster or
//! database this test sets up: TLS verified end to end (`sslmode=verify-full`) and a
//! wrong CA or host name refused at once with one clear line; role-level timeouts
//! (statement 5 s, idle in transaction 10 s, lock 2 s) under workers SIGKILLed at random;
//! a worker and a projector started while PostgreSQL is stopped that keep trying and do
//! their work once it starts, while `reel tasks` fails within 2 s.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use engine::testing::TestDatabase;
use engine::{ChannelId, NewTask, TaskStatus, fold};
use notion_projector::fake::{FakeNotion, FakeNotionOptions};

fn openssl(dir: &Path, args: &[&str]) -> Result<(), String> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| format!("openssl: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A CA (`<name>.crt`, `<name>.key`) in `dir`.
fn make_ca(dir: &Path, name: &str) -> Result<(), String> {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
        ],
    )
}

/// A cluster serving TLS with a certificate for `localhost` signed by the CA `ca`.
fn tls_cluster() -> (Cluster, tempfile::TempDir) {
    let certs = tempfile::tempdir().expect("tempdir");
    make_ca(certs.path(), "ca").expect("CA");
    make_ca(certs.path(), "other-ca").expect("another CA");
    let cluster = Cluster::start_with(|dir| {
        let c = |name: &str| dir.join(name).to_string_lossy().into_owned();
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=localhost",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
            ],
        )?;
        std::fs::write(dir.join("san.cnf"), "subjectAltName=DNS:localhost\n")
            .map_err(|e| e.to_string())?;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-days",
                "2",
                "-CA",
                &certs.path().join("ca.crt").to_string_lossy(),
                "-CAkey",
                &certs.path().join("ca.key").to_string_lossy(),
                "-CAcreateserial",
                "-extfile",
                "san.cnf",
                "-out",
                "server.crt",
            ],
        )?;
        std::fs::set_permissions(
            dir.join("server.key"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .map_err(|e| e.to_string())?;
        Ok(vec![
            "ssl=on".into(),
            format!("ssl_cert_file={}", c("server.crt")),
            format!("ssl_key_file={}", c("server.key")),
        ])
    })
    .unwrap_or_else(|why| panic!("cannot start a TLS cluster: {why}"));
    (cluster, certs)
}

fn tls_url(cluster: &Cluster, host: &str, ca: &Path) -> String {
    format!(
        "postgres://postgres@{host}:{}/postgres?sslmode=verify-full&sslrootcert={}",
        cluster.port(),
        ca.display()
    )
}

fn reel(url: &str, artifacts: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_reel"))
        .args(args)
        .env("DATABASE_URL", url)
        .env("REEL_ARTIFACTS", artifacts)
        .env("REEL_TIME_SCALE", "0.00005")
        .env("REEL_LOG", "warn")
        .env_remove("REEL_POOLER")
        .env_remove("REEL_DIRECT_DATABASE_URL")
        .output()
        .expect("run reel")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_verify_full_works_end_to_end_and_a_wrong_ca_or_host_fails_fast_in_one_line() {
    let (cluster, certs) = tls_cluster();
    let url = tls_url(&cluster, "localhost", &certs.path().join("ca.crt"));
    let dir = tempfile::tempdir().expect("tempdir");
    for args in [
        vec!["migrate"],
        vec!["submit", "--channel", "history", "--topic", "Rome"],
        vec!["worker", "--until-idle"],
    ] {
        let out = reel(&url, dir.path(), &args);
        assert!(
            out.status.success(),
            "reel {args:?} over TLS: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let listed = reel(&url, dir.path(), &["tasks", "--status", "final_review"]);
    assert!(String::from_utf8_lossy(&listed.stdout).contains("final_review"));
    // The server saw TLS from reel's connections.
    let store = engine::db::connect_store(&url, 8)
        .await
        .expect("connect over TLS");
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(store.pool())
        .await
        .expect("pg_stat_ssl");
    assert!(ssl);

    // The projector over TLS: the board follows a task.
    let notion = FakeNotion::start(FakeNotionOptions::default())
        .await
        .expect("fake Notion");
    let page = uuid::Uuid::new_v4().simple().to_string();
    notion.add_page(&page);
    let mut task = NewTask::new(
        steps::WORKFLOW,
        ChannelId::parse("history").expect("channel"),
        serde_json::json!({"topic": "Carthage", "faults": []}),
    );
    task.notion_page_id = Some(page.clone());
    store.create_task(task).await.expect("submit");
    let projector = notion_projector::Projector::new(
        store.clone(),
        notion.client(Duration::from_secs(2)),
        notion_projector::ProjectorOptions {
            poll_interval: Duration::from_millis(200),
            ..notion_projector::ProjectorOptions::default()
        },
        Arc::new(notion_projector::Metrics::new()),
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move { projector.run(token).await });
    assert!(
        reel(&url, dir.path(), &["worker", "--until-idle"])
            .status
            .success()
    );
    common::wait_until(Duration::from_secs(15), || {
        notion.page_value(&page).as_deref() == Some("Final Review")
    })
    .await
    .expect("the board followed over TLS");
    stop.cancel();

    // A CA that did not sign the server's certificate, and a host the certificate does
    // not name: refused at once, one line, saying what to check.
    for (bad, what) in [
        (
            tls_url(&cluster, "localhost", &certs.path().join("other-ca.crt")),
            "UnknownIssuer",
        ),
        (
            tls_url(&cluster, "127.0.0.1", &certs.path().join("ca.crt")),
            "not valid for name",
        ),
    ] {
        let started = Instant::now();
        let out = reel(&bad, dir.path(), &["tasks"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(started.elapsed() < Duration::from_secs(2), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains("TLS") && stderr.contains(what), "{stderr}");
        assert!(stderr.contains("sslrootcert"), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_level_timeouts_under_sigkills_lose_nothing_and_run_nothing_twice() {
    let db = TestDatabase::create().await;
    for setting in [
        "statement_timeout = '5s'",
        "idle_in_transaction_session_timeout = '10s'",
        "lock_timeout = '2s'",
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "ALTER DATABASE \"{}\" SET {setting}",
            db.name()
        )))
        .execute(db.pool())
        .await
        .expect("set the limit");
    }
    let store = db.store();
    let tasks = common::submit_videos(&store, "limits", 12).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ids = ["limited-a", "limited-b", "limited-c"];
    let spawn = |id: &str| {
        common::spawn_reel_worker(db.url(), id, dir.path(), "0.00001", &["--lease-ttl", "2"])
    };
    let mut workers: Vec<_> = ids.iter().map(|id| spawn(id)).collect();
    let mut kills = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while kills < 10 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(150 + 50 * (kills % 4) as u64)).await;
        let victim = kills % workers.len();
        if workers[victim].try_wait().expect("poll").is_none() {
            workers[victim].kill().expect("SIGKILL");
            workers[victim].wait().expect("reap");
            kills += 1;
        }
        workers[victim] = spawn(ids[victim]);
    }
    assert!(kills >= 10, "only {kills} kills landed");
    for worker in &mut workers {
        common::wait_for_success(worker, Duration::from_secs(120)).await;
    }
    let limits: String = sqlx::query_scalar(
        "SELECT string_agg(setting, ',' ORDER BY setting) FROM unnest( \
           (SELECT setconfig FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase \
             WHERE d.datname = current_database())) AS setting",
    )
    .fetch_one(db.pool())
    .await
    .expect("settings");
    assert!(limits.contains("lock_timeout=2s"), "{limits}");
    common::assert_videos_exactly_once(&store, &tasks).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_and_a_projector_started_while_postgres_is_stopped_do_their_work_once_it_starts() {
    let cluster = Cluster::start().unwrap_or_else(|why| panic!("cannot start a cluster: {why}"));
    let url = cluster.url("postgres");
    let store = engine::db::connect_store(&url, 2).await.expect("connect");
    store.migrate().await.expect("migrate");
    let notion = FakeNotion::start(FakeNotionOptions::default())
        .await
        .expect("fake Notion");
    let page = uuid::Uuid::new_v4().simple().to_string();
    notion.add_page(&page);
    let mut task = NewTask::new(
        steps::WORKFLOW,
        ChannelId::parse("history").expect("channel"),
        serde_json::json!({"topic": "Byzantium", "faults": []}),
    );
    task.notion_page_id = Some(page.clone());
    let task = store.create_task(task).await.expect("submit").task_id();
    store.pool().close().await;
    cluster.ctl("stop").expect("stop PostgreSQL");

    let dir = tempfile::tempdir().expect("tempdir");
    // One-shot commands still fail fast.
    let started = Instant::now();
    let out = reel(&url, dir.path(), &["tasks"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(started.elapsed() < Duration::from_secs(2));

    let log = dir.path().join("worker.log");
    let mut worker = Command::new(env!("CARGO_BIN_EXE_reel"))
        .args(["worker", "--until-idle", "--time-scale", "0.0001"])
        .env("DATABASE_URL", &url)
        .env("REEL_ARTIFACTS", dir.path())
        .env("REEL_LOG", "warn")
        .env_remove("REEL_CONNECT_TIMEOUT")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start reel worker");
    let config = <notion_projector::Config as clap::Parser>::try_parse_from([
        "notion-projector",
        "--database-url",
        &url,
        "--notion-token",
        &notion.token(),
        "--notion-api-url",
        &notion.url(),
        "--poll-interval",
        "200ms",
    ])
    .expect("projector flags");
    let projector = tokio::spawn(notion_projector::run(config));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        worker.try_wait().expect("poll").is_none(),
        "the worker gave up"
    );
    assert!(!projector.is_finished(), "the projector gave up");
    let tries = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("cannot connect to PostgreSQL"))
        .count();
    assert!((2..=5).contains(&tries), "{tries} tries logged");

    cluster.ctl("start").expect("start PostgreSQL");
    common::wait_for_success(&mut worker, Duration::from_secs(60)).await;
    let store = engine::db::connect_store(&url, 2).await.expect("connect");
    let state = fold(&store.read_stream(task, 1).await.expect("read"));
    assert_eq!(state.status(), TaskStatus::FINAL_REVIEW);
    common::wait_until(Duration::from_secs(15), || {
        notion.page_value(&page).as_deref() == Some("Final Review")
    })
    .await
    .expect("the projector synced the page once PostgreSQL was up");
    projector.abort();
}

/// The most connections named `application_name` open at once while `running` is true,
/// sampled every 20 ms.
async fn peak_connections(
    pool: &sqlx::PgPool,
    application_name: &str,
    mut running: impl FnMut() -> bool,
) -> i64 {
    let mut peak = 0;
    while running() {
        let open: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1")
                .bind(application_name)
                .fetch_one(pool)
                .await
                .expect("count connections");
        peak = peak.max(open);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    peak
}

/// docs/production-postgres.md, "Connections": a worker with `--concurrency 4` running 12
/// videos opens at most max(4 + 4, 8) + 1 connections (its pool and LISTEN), and a
/// projector at most 4 + 2 (its pool, its locks' session and LISTEN), counted in
/// `pg_stat_activity` by the `application_name` their URLs carry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_stay_within_what_the_docs_say() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let page = uuid::Uuid::new_v4().simple().to_string();
    for n in 0..12 {
        let mut task = NewTask::new(
            steps::WORKFLOW,
            ChannelId::parse("history").expect("channel"),
            serde_json::json!({"topic": format!("Byzantium {n}"), "faults": []}),
        );
        task.notion_page_id = (n == 0).then(|| page.clone());
        store.create_task(task).await.expect("submit");
    }
    let named = |name: &str| {
        let separator = if db.url().contains('?') { '&' } else { '?' };
        format!("{}{separator}application_name={name}", db.url())
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut worker = Command::new(env!("CARGO_BIN_EXE_reel"))
        .args(["worker", "--until-idle", "--concurrency", "4"])
        .env("DATABASE_URL", named("docs-worker"))
        .env("REEL_ARTIFACTS", dir.path())
        .env("REEL_TIME_SCALE", "0.0002")
        .env("REEL_LOG", "warn")
        .env_remove("REEL_POOLER")
        .env_remove("REEL_DIRECT_DATABASE_URL")
        .stdout(Stdio::null())
        .spawn()
        .expect("start reel worker");
    let mut exited = None;
    let worker_peak = peak_connections(db.pool(), "docs-worker", || {
        exited = worker.try_wait().expect("poll the worker");
        exited.is_none()
    })
    .await;
    assert!(exited.is_some_and(|s| s.success()), "{exited:?}");
    let queued: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tasks WHERE status <> 'final_review'")
            .fetch_one(db.pool())
            .await
            .expect("count tasks");
    assert_eq!(queued, 0, "every video reached final review");
    eprintln!("worker --concurrency 4: at most {worker_peak} connections");
    assert!((2..=9).contains(&worker_peak), "{worker_peak}");

    let notion = FakeNotion::start(FakeNotionOptions::default())
        .await
        .expect("fake Notion");
    notion.add_page(&page);
    let config = <notion_projector::Config as clap::Parser>::try_parse_from([
        "notion-projector",
        "--database-url",
        &named("docs-projector"),
        "--notion-token",
        &notion.token(),
        "--notion-api-url",
        &notion.url(),
        "--poll-interval",
        "200ms",
    ])
    .expect("projector flags");
    let projector = tokio::spawn(notion_projector::run(config));
    let started = Instant::now();
    let projector_peak = peak_connections(db.pool(), "docs-projector", || {
        started.elapsed() < Duration::from_secs(5)
    })
    .await;
    projector.abort();
    assert_eq!(
        notion.page_value(&page).as_deref(),
        Some("Final Review"),
        "the projector worked while it was counted"
    );
    eprintln!("notion-projector: at most {projector_peak} connections");
    assert!((2..=6).contains(&projector_peak), "{projector_peak}");
}
