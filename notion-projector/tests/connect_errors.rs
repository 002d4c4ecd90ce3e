//! `notion-projector` started while PostgreSQL cannot be reached: a service, it keeps
//! trying and says so once per try; told not to wait (`--connect-timeout 0`), or facing a
//! configuration error (a missing database), it answers within 2 s with one line on stderr
//! that names the server, the cause and the fix, and exit code 1.

use std::process::Command;
use std::time::{Duration, Instant};

use sqlx::ConnectOptions;
use sqlx::postgres::PgConnectOptions;

/// What the projector printed and how long it took.
struct Answer {
    code: Option<i32>,
    stderr: String,
    took: Duration,
}

fn start_projector(database_url: &str) -> Answer {
    start_projector_with(database_url, &[])
}

fn start_projector_with(database_url: &str, args: &[&str]) -> Answer {
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_notion-projector"))
        .args(args)
        .env("DATABASE_URL", database_url)
        .env("NOTION_TOKEN", "ntn_test_token")
        .env("REEL_LOG", "warn")
        .env_remove("NOTION_PROJECTOR_METRICS_ADDR")
        .output()
        .expect("run notion-projector");
    Answer {
        code: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        took: start.elapsed(),
    }
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

/// A port nothing listens on: the kernel picks a free one for a listener we then drop.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

#[test]
fn the_projector_against_a_closed_port_says_postgres_is_not_running_and_how_to_start_it() {
    let port = closed_port();
    let answer = start_projector_with(
        &format!("postgres://postgres:s3cret-pw@127.0.0.1:{port}/postgres"),
        &["--connect-timeout", "0"],
    );
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
fn the_projector_against_a_missing_database_says_reel_migrate_creates_it() {
    let server: PgConnectOptions = engine::testing::database_url()
        .parse()
        .expect("DATABASE_URL");
    let name = format!("reel_missing_{}", uuid::Uuid::new_v4().simple());
    let options = server.database(&name);
    let answer = start_projector(options.to_url_lossy().as_ref());
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
fn the_projector_keeps_trying_while_postgres_is_down_saying_so_once_per_try() {
    let port = closed_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_notion-projector"))
        .env(
            "DATABASE_URL",
            format!("postgres://postgres:s3cret-pw@127.0.0.1:{port}/postgres"),
        )
        .env("NOTION_TOKEN", "ntn_test_token")
        .env("REEL_LOG", "warn")
        .env_remove("REEL_CONNECT_TIMEOUT")
        .env_remove("NOTION_PROJECTOR_METRICS_ADDR")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run notion-projector");
    std::thread::sleep(Duration::from_millis(3200));
    let still_running = child.try_wait().expect("poll").is_none();
    let _ = child.kill();
    let out = child.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(still_running, "it gave up: {stderr}");
    let tries = stderr
        .lines()
        .filter(|l| l.contains("connection refused") && l.contains(&format!("127.0.0.1:{port}")))
        .count();
    // 0.5 s, 1 s, 2 s apart: three or four tries in 3.2 s, one line each.
    assert!((2..=5).contains(&tries), "{tries} lines: {stderr}");
    assert!(!stderr.contains("s3cret-pw"), "{stderr}");
}
