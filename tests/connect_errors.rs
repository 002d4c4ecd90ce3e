//! `reel` when PostgreSQL cannot be reached: within 2 s, one line on stderr that names the
//! server, the cause and the fix, and exit code 1 (not the pool's timeout after 10 s).

use std::process::Command;
use std::time::{Duration, Instant};

use sqlx::ConnectOptions;
use sqlx::postgres::PgConnectOptions;

/// What `reel` printed and how long it took.
struct Answer {
    code: Option<i32>,
    stderr: String,
    took: Duration,
}

fn reel_tasks(database_url: &str) -> Answer {
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_reel"))
        .arg("tasks")
        .env("DATABASE_URL", database_url)
        .env("REEL_LOG", "warn")
        .output()
        .expect("run reel");
    Answer {
        code: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        took: start.elapsed(),
    }
}

/// A port nothing listens on: the kernel picks a free one for a listener we then drop.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").port()
}

/// The test server with a database that does not exist, and that database's name.
fn missing_database() -> (PgConnectOptions, String) {
    let server: PgConnectOptions = engine::testing::database_url()
        .parse()
        .expect("DATABASE_URL");
    let name = format!("reel_missing_{}", uuid::Uuid::new_v4().simple());
    (server.database(&name), name)
}

fn assert_one_line_within_2s(answer: &Answer, expected: &[&str]) {
    assert_eq!(answer.code, Some(1), "stderr: {}", answer.stderr);
    assert!(
        answer.took < Duration::from_secs(2),
        "took {:?}: {}",
        answer.took,
        answer.stderr
    );
    assert_eq!(answer.stderr.lines().count(), 1, "{}", answer.stderr);
    for text in expected {
        assert!(
            answer.stderr.contains(text),
            "{text:?} missing from: {}",
            answer.stderr
        );
    }
}

#[test]
fn reel_against_a_closed_port_says_postgres_is_not_running_and_how_to_start_it() {
    let port = closed_port();
    let answer = reel_tasks(&format!(
        "postgres://postgres:s3cret-pw@127.0.0.1:{port}/postgres"
    ));
    assert_one_line_within_2s(
        &answer,
        &[
            &format!("127.0.0.1:{port}"),
            "connection refused",
            "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
        ],
    );
    assert!(!answer.stderr.contains("s3cret-pw"), "{}", answer.stderr);
}

#[test]
fn reel_against_a_missing_database_says_reel_migrate_creates_it() {
    let (options, name) = missing_database();
    let answer = reel_tasks(options.to_url_lossy().as_ref());
    assert_one_line_within_2s(
        &answer,
        &[
            &format!("{}:{}", options.get_host(), options.get_port()),
            &format!("database \"{name}\" does not exist"),
            "`reel migrate` creates it",
        ],
    );
}

#[test]
fn reel_worker_keeps_trying_while_postgres_is_down_and_gives_up_only_when_told() {
    // A service waits for the database, one line per try; `--connect-timeout` bounds it.
    let port = closed_port();
    let url = format!("postgres://postgres:s3cret-pw@127.0.0.1:{port}/postgres");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_reel"))
        .args(["worker", "--until-idle"])
        .env("DATABASE_URL", &url)
        .env("REEL_LOG", "warn")
        .env_remove("REEL_CONNECT_TIMEOUT")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run reel worker");
    std::thread::sleep(std::time::Duration::from_millis(3200));
    let still_running = child.try_wait().expect("poll").is_none();
    let _ = child.kill();
    let out = child.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(still_running, "it gave up: {stderr}");
    let tries = stderr
        .lines()
        .filter(|l| l.contains("connection refused"))
        .count();
    assert!((2..=5).contains(&tries), "{tries} lines: {stderr}");
    assert!(!stderr.contains("s3cret-pw"), "{stderr}");

    let started = std::time::Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_reel"))
        .args(["worker", "--until-idle", "--connect-timeout", "2"])
        .env("DATABASE_URL", &url)
        .env("REEL_LOG", "warn")
        .output()
        .expect("run reel worker");
    let took = started.elapsed();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        took >= std::time::Duration::from_millis(1400) && took < std::time::Duration::from_secs(4),
        "gave up after {took:?}"
    );
}
