//! Starting `reel console` as a process for a test database, and the `reel` commands the
//! console tests run. Shared by tests/console.rs and tests/console_browser.rs (included
//! with `#[path]`).
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};

use engine::TaskId;
use engine::testing::{TestDatabase, free_port};

pub const TOKEN: &str = "console-test-token-0123456789";

/// A running console: its process and its base URL. Killed when dropped.
pub struct ConsoleProcess {
    pub child: Child,
    pub url: String,
}

impl Drop for ConsoleProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `reel console` on a free loopback port with `args`; returns once it listens.
pub fn start_console(db: &TestDatabase, args: &[&str]) -> ConsoleProcess {
    let port = free_port().expect("a free port");
    let listen = format!("127.0.0.1:{port}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_reel"))
        .args(["console", "--listen", &listen])
        .args(args)
        .env("DATABASE_URL", db.url())
        .env("REEL_LOG", "warn")
        .env_remove("REEL_CONSOLE_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start reel console");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("the console's first line");
    assert!(line.starts_with("console listening on"), "{line:?}");
    ConsoleProcess {
        child,
        url: format!("http://{listen}"),
    }
}

pub fn reel(db: &TestDatabase, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_reel"))
        .args(args)
        .env("DATABASE_URL", db.url())
        .env("REEL_LOG", "warn")
        .output()
        .expect("run reel")
}

/// `reel submit` with `args`; the new task's id.
pub fn submit(db: &TestDatabase, args: &[&str]) -> TaskId {
    let mut all = vec!["submit"];
    all.extend_from_slice(args);
    let out = reel(db, &all);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a task id")
}

/// Runs the video pipeline's workers until nothing is left to do.
pub fn run_until_idle(db: &TestDatabase, artifacts: &std::path::Path) {
    let out = reel(
        db,
        &[
            "worker",
            "--until-idle",
            "--artifacts",
            artifacts.to_str().expect("path"),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub async fn event_count(db: &TestDatabase, task: TaskId) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events WHERE stream_id = $1")
        .bind(task.as_uuid())
        .fetch_one(db.pool())
        .await
        .expect("count")
}
