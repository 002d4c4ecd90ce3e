//! What the archive tests share: archive targets (a local directory, or a bucket of a real
//! S3 API, moto's server started here), a small workflow run by an in-process worker to
//! make many finished tasks quickly, and the `reel` commands run against a target.
#![allow(dead_code, unreachable_pub)]

use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use engine::prelude::*;
use engine::testing::{TestDatabase, free_port};
use engine::{Backoff, Registry, TaskId};
use serde_json::json;

/// Where archives go in a test, and what a `reel` process needs to reach it.
pub struct Target {
    pub url: String,
    pub env: Vec<(String, String)>,
    _dir: Option<tempfile::TempDir>,
    _moto: Option<Moto>,
}

impl Target {
    /// A fresh local directory.
    pub fn directory() -> Target {
        let dir = tempfile::tempdir().expect("tempdir");
        Target {
            url: dir
                .path()
                .join("archive")
                .to_str()
                .expect("path")
                .to_owned(),
            env: Vec::new(),
            _dir: Some(dir),
            _moto: None,
        }
    }

    /// A fresh bucket of moto's S3 server (the real S3 REST API, from PyPI's `moto`).
    pub async fn s3() -> Target {
        let moto = Moto::start().await;
        let env = moto.env();
        Target {
            // A prefix with characters the object store escapes in keys.
            url: "s3://reel-archive/runs~x[1]".to_owned(),
            env,
            _dir: None,
            _moto: Some(moto),
        }
    }
}

/// moto's S3 server on a free port, with one bucket; killed when dropped.
pub struct Moto {
    child: Child,
    pub endpoint: String,
}

impl Moto {
    pub async fn start() -> Moto {
        let port = free_port().expect("a free port");
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server (pip install 'moto[server]': see the README's prerequisites)");
        let endpoint = format!("http://127.0.0.1:{port}");
        let moto = Moto { child, endpoint };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // Creating the bucket is also the readiness check.
            let created = http
                .put(format!("{}/reel-archive", moto.endpoint))
                .send()
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            if created {
                break;
            }
            assert!(Instant::now() < deadline, "moto_server did not start");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        moto
    }

    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ALLOW_HTTP", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A process SIGKILLed when dropped (a failing test leaves none behind).
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `reel ARGS` against `db`, with `target`'s environment.
pub fn reel(db: &TestDatabase, target: &Target, args: &[&str]) -> Output {
    command(db, target, args).output().expect("run reel")
}

pub fn command(db: &TestDatabase, target: &Target, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_reel"));
    command
        .args(args)
        // Hundreds of short processes: a TLS handshake each (debug build, ~200 ms) would be
        // most of the test's time, and the test server is on loopback.
        .env(
            "DATABASE_URL",
            db.url().replace("sslmode=prefer", "sslmode=disable"),
        )
        .env("REEL_LOG", "warn")
        .envs(target.env.iter().map(|(k, v)| (k, v)));
    command
}

/// `reel ARGS`, which must succeed; its stdout.
pub fn reel_ok(db: &TestDatabase, target: &Target, args: &[&str]) -> String {
    let out = reel(db, target, args);
    assert!(
        out.status.success(),
        "reel {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// Runs of each (task, item) of the `chores` workflow, counted by its steps.
pub type Runs = Arc<Mutex<Vec<(TaskId, u32, u32)>>>;

/// `chores`: `n` items that each cost 10,000 micros, then a summary. An input with
/// `"fail": true` fails item 2 permanently on the first attempt (the task fails; a retry
/// resumes and completes it).
pub fn chores(runs: Runs) -> Workflow {
    Workflow::new("chores")
        .step(
            Step::fan_out(
                "work",
                |plan: &Plan| Ok(plan.input["n"].as_u64().unwrap_or(3) as u32),
                move |ctx: StepContext, item| {
                    let runs = runs.clone();
                    async move {
                        runs.lock()
                            .expect("runs")
                            .push((ctx.task_id, item, ctx.attempt));
                        let input: serde_json::Value = ctx.input()?;
                        if input["fail"] == json!(true) && item == 2 && ctx.attempt == 1 {
                            return Err(StepError::permanent("item 2 refused the first time"));
                        }
                        Ok(ItemOutput::value(json!({"item": item}))?.with_cost_micros(10_000))
                    }
                },
            )
            .retry(RetryPolicy {
                max_tries: 1,
                backoff: Backoff::none(),
            }),
        )
        .step(Step::call("summary", |_ctx: StepContext| async {
            ItemOutput::value("done")
        }))
}

/// Submits `n` chores tasks on `channel` (every `fail_every`-th one failing; 0: none).
pub async fn submit_chores(
    store: &PgStore,
    channel: &str,
    n: usize,
    fail_every: usize,
) -> Vec<TaskId> {
    let channel = ChannelId::parse(channel).expect("channel");
    let mut tasks = Vec::new();
    for i in 0..n {
        let fail = fail_every > 0 && i % fail_every == 0;
        let task = store
            .create_task(NewTask::new(
                "chores",
                channel.clone(),
                json!({"n": 3, "fail": fail}),
            ))
            .await
            .expect("submit")
            .task_id();
        tasks.push(task);
    }
    tasks
}

/// Runs every chores task until nothing is left to do, in this process.
pub async fn run_chores(store: &PgStore, runs: Runs) {
    let registry = Registry::new().register(chores(runs));
    let mut options = engine::WorkerOptions::new("chores-worker");
    options.concurrency = 16;
    engine::Worker::new(store.clone(), registry, options)
        .run_until_idle()
        .await
        .expect("worker");
}

/// Each task's (events in the log, row version, archive location).
pub async fn placement(db: &TestDatabase) -> Vec<(TaskId, i64, i32, Option<String>)> {
    let rows: Vec<(uuid::Uuid, i64, i32, Option<String>)> = sqlx::query_as(
        "SELECT t.id, (SELECT count(*) FROM events e WHERE e.stream_id = t.id), t.version, \
                t.archive_location FROM tasks t ORDER BY t.id",
    )
    .fetch_all(db.pool())
    .await
    .expect("placement");
    rows.into_iter()
        .map(|(id, n, v, l)| (TaskId::from(id), n, v, l))
        .collect()
}
