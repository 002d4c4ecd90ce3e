//! Shared test harness: a video-pipeline-shaped workflow whose steps count every real call
//! and fail on demand, and a driver that claims and runs a task like a worker would.
#![allow(dead_code, unreachable_pub)]

pub mod cluster;
pub mod fake_jobs;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use engine::prelude::*;
use engine::{Backoff, Event, Lease, Orchestrator, Registry};
use serde_json::json;

/// One call of a step's code: (step, item, task attempt).
pub type Call = (String, u32, u32);

/// When a (step, item) fails.
#[derive(Clone, Debug)]
pub struct Fault {
    pub kind: FailureKind,
    /// Task attempts on which it fails; empty = every attempt.
    pub attempts: Vec<u32>,
}

/// Counts calls and injects faults into the steps it builds.
#[derive(Clone, Default)]
pub struct Probe {
    pub calls: Arc<Mutex<Vec<Call>>>,
    pub faults: Arc<Mutex<HashMap<(String, u32), Fault>>>,
}

impl Probe {
    pub fn fail(&self, step: &str, item: u32, kind: FailureKind, attempts: &[u32]) {
        self.faults.lock().expect("probe lock").insert(
            (step.to_owned(), item),
            Fault {
                kind,
                attempts: attempts.to_vec(),
            },
        );
    }

    /// Items of `step` called during `attempt`, in call order, each once.
    pub fn items_called(&self, step: &str, attempt: u32) -> Vec<u32> {
        let mut items: Vec<u32> = self
            .calls
            .lock()
            .expect("probe lock")
            .iter()
            .filter(|(s, _, a)| s == step && *a == attempt)
            .map(|(_, i, _)| *i)
            .collect();
        items.dedup();
        items
    }

    /// How many times (step, item) was called over all attempts.
    pub fn call_count(&self, step: &str, item: u32) -> usize {
        self.calls
            .lock()
            .expect("probe lock")
            .iter()
            .filter(|(s, i, _)| s == step && *i == item)
            .count()
    }

    fn call(&self, ctx: &StepContext, item: u32) -> Result<ItemOutput, StepError> {
        self.calls
            .lock()
            .expect("probe lock")
            .push((ctx.step.to_string(), item, ctx.attempt));
        let fault = self
            .faults
            .lock()
            .expect("probe lock")
            .get(&(ctx.step.to_string(), item))
            .cloned();
        if let Some(fault) = fault
            && (fault.attempts.is_empty() || fault.attempts.contains(&ctx.attempt))
        {
            let message = format!("injected failure at {} {item}", ctx.step);
            return Err(match fault.kind {
                FailureKind::Transient => StepError::transient(message),
                FailureKind::Permanent => StepError::permanent(message),
            });
        }
        Ok(ItemOutput::new(
            format!("{}/{}/{item}", ctx.task_id, ctx.step),
            1_000 * i64::from(item),
        ))
    }

    /// An itemized step with `count` items.
    pub fn items(&self, name: &str, status: TaskStatus, count: u32) -> Step {
        let probe = self.clone();
        Step::fan_out(
            name,
            move |_input| Ok(count),
            move |ctx: StepContext, item| {
                let result = probe.call(&ctx, item);
                async move { result }
            },
        )
        .status(status.as_str(), &status.default_display())
        .retry(fast_retry(2))
    }

    /// An atomic step.
    pub fn once(&self, name: &str, status: TaskStatus) -> Step {
        let probe = self.clone();
        Step::call(name, move |ctx: StepContext| {
            let result = probe.call(&ctx, 1);
            async move { result }
        })
        .status(status.as_str(), &status.default_display())
        .retry(fast_retry(2))
    }

    /// The video pipeline's shape: 22 assets, composites, 18 clips, 18 narrations, 18 SFX,
    /// assembly.
    pub fn pipeline(&self) -> Workflow {
        Workflow::new("video")
            .step(self.items("assets", TaskStatus::from_static("generating_assets"), 22))
            .step(self.once(
                "composites",
                TaskStatus::from_static("generating_composites"),
            ))
            .step(self.items("video", TaskStatus::from_static("generating_video"), 18))
            .step(self.items("narration", TaskStatus::from_static("generating_audio"), 18))
            .step(self.items("sfx", TaskStatus::from_static("generating_sfx"), 18))
            .step(self.once("assembly", TaskStatus::from_static("assembling")))
            .review_gate()
            .task_retry(immediate_task_retry(3))
    }
}

/// `tries` tries per item, 5 ms apart.
pub fn fast_retry(tries: u32) -> RetryPolicy {
    RetryPolicy {
        max_tries: tries,
        backoff: Backoff {
            initial: Duration::from_millis(5),
            multiplier: 2.0,
            max: Duration::from_millis(50),
            jitter: 0.0,
        },
    }
}

/// `attempts` task attempts, the next one due at once.
pub fn immediate_task_retry(attempts: u32) -> TaskRetryPolicy {
    TaskRetryPolicy {
        max_attempts: attempts,
        backoff: Backoff {
            initial: Duration::ZERO,
            multiplier: 1.0,
            max: Duration::ZERO,
            jitter: 0.0,
        },
    }
}

pub async fn submit(store: &PgStore, workflow: &str) -> TaskId {
    let channel = ChannelId::parse("history").expect("channel");
    store
        .create_task(NewTask::new(workflow, channel, json!({"topic": "Rome"})))
        .await
        .expect("submit")
        .task_id()
}

pub async fn claim(store: &PgStore, task: TaskId) -> Lease {
    store
        .claim_task(task, "test-worker", Duration::from_secs(60))
        .await
        .expect("claim")
        .expect("the task is claimable")
}

/// Claims `task` and runs it once.
pub async fn run_once(store: &PgStore, orchestrator: &Orchestrator, task: TaskId) -> RunOutcome {
    let lease = claim(store, task).await;
    orchestrator
        .run(&lease, tokio_util::sync::CancellationToken::new())
        .await
        .expect("run")
}

/// The reason of a run that failed the task (panics on any other outcome).
pub fn failure_reason(outcome: RunOutcome) -> String {
    match outcome {
        RunOutcome::Failed { reason } => reason,
        other => panic!("expected the task to fail: {other:?}"),
    }
}

/// Claims and runs `task` until it stops being runnable; returns every run's outcome.
pub async fn run_to_rest(
    store: &PgStore,
    orchestrator: &Orchestrator,
    task: TaskId,
) -> Vec<RunOutcome> {
    let mut outcomes = Vec::new();
    for _ in 0..10 {
        let Some(lease) = store
            .claim_task(task, "test-worker", Duration::from_secs(60))
            .await
            .expect("claim")
        else {
            break;
        };
        let outcome = orchestrator
            .run(&lease, tokio_util::sync::CancellationToken::new())
            .await
            .expect("run");
        let again = matches!(
            outcome,
            RunOutcome::RetryScheduled { .. } | RunOutcome::Parked { .. }
        );
        if let RunOutcome::Parked { until, .. } = &outcome {
            let wait = (*until - chrono::Utc::now()).to_std().unwrap_or_default();
            tokio::time::sleep(wait + Duration::from_millis(5)).await;
        }
        outcomes.push(outcome);
        if !again {
            break;
        }
    }
    outcomes
}

pub async fn state(store: &PgStore, task: TaskId) -> TaskState {
    fold(&store.read_stream(task, 1).await.expect("read"))
}

/// How many `item_completed` events each item of `step` has in the log (current and
/// superseded runs together).
pub async fn completions(store: &PgStore, task: TaskId, step: &str) -> HashMap<u32, usize> {
    let mut counts = HashMap::new();
    for event in store.read_stream(task, 1).await.expect("read") {
        if let Event::ItemCompleted { step: s, item, .. } = &event.event
            && s == step
        {
            *counts.entry(*item).or_insert(0) += 1;
        }
    }
    counts
}

/// Starts a `reel worker --until-idle` process on `database_url`.
pub fn spawn_reel_worker(
    database_url: &str,
    id: &str,
    artifacts: &std::path::Path,
    time_scale: &str,
    extra: &[&str],
) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_reel"))
        .args([
            "worker",
            "--worker-id",
            id,
            "--concurrency",
            "4",
            "--until-idle",
            "--time-scale",
            time_scale,
        ])
        .args(extra)
        .env("DATABASE_URL", database_url)
        .env("REEL_ARTIFACTS", artifacts)
        .env("REEL_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start reel worker")
}

/// Waits for `child` to exit successfully within `limit`.
pub async fn wait_for_success(child: &mut std::process::Child, limit: Duration) {
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("poll the child") {
            assert!(status.success(), "a worker exited with {status}");
            return;
        }
        assert!(
            started.elapsed() < limit,
            "a worker did not finish within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Who holds `task`'s lease now, per the `tasks` row.
pub async fn lease_owner(db: &engine::testing::TestDatabase, task: TaskId) -> Option<String> {
    sqlx::query_scalar("SELECT lease_owner FROM tasks WHERE id = $1")
        .bind(task.as_uuid())
        .fetch_one(db.pool())
        .await
        .expect("the task's row")
}

/// What a `reel` command printed and how it exited.
#[derive(Debug)]
pub struct CliRun {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the `reel` binary with `args` against `database_url`.
pub fn reel_cli(database_url: &str, args: &[&str]) -> CliRun {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_reel"))
        .args(args)
        .env("DATABASE_URL", database_url)
        .env("REEL_LOG", "warn")
        .output()
        .expect("run reel");
    CliRun {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Submits `n` video tasks on `channel`, topics "topic 0", "topic 1", …, without faults.
pub async fn submit_videos(store: &PgStore, channel: &str, n: usize) -> Vec<TaskId> {
    let channel = ChannelId::parse(channel).expect("channel");
    let mut tasks = Vec::new();
    for i in 0..n {
        let input = json!({"topic": format!("topic {i}"), "faults": []});
        tasks.push(
            store
                .create_task(NewTask::new(steps::WORKFLOW, channel.clone(), input))
                .await
                .expect("submit")
                .task_id(),
        );
    }
    tasks
}

/// An orchestrator on `store` for a workflow of the single `step`.
pub fn one_step<O>(store: &PgStore, workflow: &str, step: engine::Step<O>) -> Orchestrator {
    Orchestrator::new(
        store.clone(),
        Registry::new().register(engine::Workflow::new(workflow).step(step)),
    )
}

/// Every task in final_review, and each (step, item) of its current runs completed once.
pub async fn assert_videos_exactly_once(store: &PgStore, tasks: &[TaskId]) {
    for &task in tasks {
        let events = store.read_stream(task, 1).await.expect("read");
        let state = engine::fold(&events);
        assert_eq!(state.status(), TaskStatus::FINAL_REVIEW, "task {task}");
        let audit = engine::audit::audit(task, &events);
        assert!(audit.is_clean(), "task {task}: {:?}", audit.violations);
        let mut completions: HashMap<(String, u32), u32> = HashMap::new();
        for event in &events {
            if let Event::ItemCompleted { step, item, .. } = &event.event {
                *completions.entry((step.clone(), *item)).or_default() += 1;
            }
        }
        assert_eq!(
            completions.len(),
            22 + 1 + 18 + 18 + 18 + 1,
            "task {task}: every item completed"
        );
        let twice: Vec<_> = completions.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            twice.is_empty(),
            "task {task}: completed more than once: {twice:?}"
        );
        assert_assembly_built_on_the_log(&state, task);
    }
}

/// The assembly read every clip, narration and SFX from the log — whichever worker, in
/// whichever process, recorded them — and its output names exactly those artifacts.
fn assert_assembly_built_on_the_log(state: &engine::TaskState, task: TaskId) {
    let recorded: Vec<String> = ["video", "narration", "sfx"]
        .into_iter()
        .flat_map(|step| {
            state
                .step(step)
                .map(|s| {
                    s.items
                        .values()
                        .map(|r| r.artifact.clone())
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(recorded.len(), 54, "task {task}");
    let assembly = state.step("assembly").and_then(|s| s.items.get(&1));
    let sources = assembly
        .and_then(|record| record.output.as_ref())
        .and_then(|output| output.get("sources"))
        .cloned();
    assert_eq!(
        sources,
        Some(serde_json::json!(recorded)),
        "task {task}: the assembly's sources are the recorded artifacts"
    );
}

/// Polls until `check` holds; the time it took, or `None` after `within`.
pub async fn wait_until(within: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let start = std::time::Instant::now();
    while start.elapsed() <= within {
        if check() {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}
