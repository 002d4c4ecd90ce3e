//! A `notion-projector` binary run as a real process, for SIGKILL and SIGTERM tests.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use engine::testing::TestDatabase;
use notion_projector::fake::FakeNotion;
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

use super::wait_for;

/// A running `notion-projector` whose stderr is collected.
pub struct Process {
    pub child: Child,
    log: Arc<Mutex<String>>,
}

impl Process {
    pub fn start(db: &TestDatabase, notion: &FakeNotion, token: &str, extra: &[&str]) -> Process {
        // Short waits for tests, unless `extra` sets its own.
        let defaults = [
            ("--poll-interval", "200ms"),
            ("--retry-base", "100ms"),
            ("--failure-retry-interval", "1s"),
            ("--standby-interval", "200ms"),
            ("--http-timeout", "2s"),
        ]
        .into_iter()
        .filter(|(flag, _)| !extra.contains(flag))
        .flat_map(|(flag, value)| [flag, value]);
        let mut child = Command::new(env!("CARGO_BIN_EXE_notion-projector"))
            .args(defaults)
            .args(extra)
            .env("DATABASE_URL", db.url())
            .env("NOTION_TOKEN", token)
            .env("NOTION_API_URL", notion.url())
            .env("REEL_LOG", "debug")
            .env_remove("NOTION_PROJECTOR_METRICS_ADDR")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start notion-projector");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = log.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut log = sink.lock().expect("log");
                log.push_str(&line);
                log.push('\n');
            }
        });
        Process { child, log }
    }

    pub fn log(&self) -> String {
        self.log.lock().expect("log").clone()
    }

    pub async fn wait_log(&self, needle: &str, within: Duration) -> bool {
        wait_for(within, || self.log().contains(needle))
            .await
            .is_some()
    }

    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    pub async fn sigkill(mut self) {
        self.signal("-KILL");
        let _ = self.child.wait().await;
    }

    /// SIGTERM, then the exit status (within 10 s).
    pub async fn sigterm(mut self) -> (std::process::ExitStatus, String) {
        self.signal("-TERM");
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("exits within 10 s of SIGTERM")
            .expect("wait");
        tokio::time::sleep(Duration::from_millis(100)).await;
        (status, self.log())
    }
}
