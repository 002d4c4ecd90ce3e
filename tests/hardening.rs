//! The failures an adversarial review found in the worker and orchestrator (issue 14),
//! each reproduced against PostgreSQL: unreadable histories, cancels of running tasks,
//! panicking steps, the attempt budget, atomic steps that plan several items.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::{Probe, claim, failure_reason, run_once, spawn_reel_worker, submit};
use engine::prelude::*;
use engine::testing::TestDatabase;
use engine::{Orchestrator, commands};
use tokio_util::sync::CancellationToken;

fn options(id: &str) -> WorkerOptions {
    WorkerOptions {
        heartbeat_interval: Duration::from_millis(100),
        poll_interval: Duration::from_millis(50),
        until_idle: true,
        ..WorkerOptions::new(id)
    }
}

async fn claims(db: &TestDatabase, task: TaskId) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE stream_id = $1 AND event_type = 'task_claimed'",
    )
    .bind(task.as_uuid())
    .fetch_one(db.pool())
    .await
    .expect("count claims")
}

/// A queued task holding an event from a newer build: an old `reel worker --until-idle`
/// claims it once, sets it aside (not failed, no attempt of its budget used) and returns.
#[tokio::test]
async fn a_history_this_build_cannot_read_is_set_aside_not_looped_on() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let task = store
        .create_task(NewTask::new(
            steps::WORKFLOW,
            ChannelId::parse("history").expect("channel"),
            serde_json::json!({"topic": "Rome"}),
        ))
        .await
        .expect("submit")
        .task_id();
    db.append_raw(task, "task_paused", 1, "{}").await;

    let artifacts = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    let out = spawn_reel_worker(db.url(), "old-build", artifacts.path(), "0.0001", &[])
        .wait_with_output()
        .expect("worker");
    assert!(out.status.success(), "{out:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "--until-idle returned after {:?}",
        started.elapsed()
    );
    assert_eq!(claims(&db, task).await, 1, "claimed once, not in a loop");
    let (status, owner, wait, marked): (String, Option<String>, f64, bool) = sqlx::query_as(
        "SELECT status, lease_owner, EXTRACT(EPOCH FROM next_run_at - now())::float8, \
                unreadable_since IS NOT NULL FROM tasks WHERE id = $1",
    )
    .bind(task.as_uuid())
    .fetch_one(db.pool())
    .await
    .expect("task row");
    assert_eq!(status, "queued", "not failed: a newer worker can run it");
    assert_eq!(owner, None, "released");
    assert!((20.0..=31.0).contains(&wait), "set aside for ~30 s: {wait}");
    assert!(marked);
}

/// The worker logs the set-aside once, naming the task, the version and the event type.
#[tokio::test]
async fn setting_aside_is_logged_once_with_what_could_not_be_read() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let task = submit(&store, "video").await;
    db.append_raw(task, "step_started", 7, "{}").await;
    let artifacts = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_reel"))
        .args(["worker", "--until-idle", "--worker-id", "old"])
        .env("DATABASE_URL", db.url())
        .env("REEL_ARTIFACTS", artifacts.path())
        .env("REEL_LOG", "warn")
        .output()
        .expect("worker");
    assert!(out.status.success());
    let logs = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = logs.lines().filter(|l| l.contains("set aside")).collect();
    assert_eq!(lines.len(), 1, "{logs}");
    for needle in [
        &task.to_string(),
        "version=2",
        "step_started",
        "schema_version=7",
    ] {
        assert!(lines[0].contains(needle), "{needle} in {}", lines[0]);
    }
}

/// Cancelling a running task stops it at the next item boundary: the item in flight
/// finishes, no other starts, and the run ends `Cancelled` (not a lost lease).
#[tokio::test]
async fn cancelling_a_running_task_stops_it_at_the_item_boundary() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let started = Arc::new(AtomicU32::new(0));
    let counter = started.clone();
    let workflow = Workflow::new("slow").step(Step::fan_out(
        "work",
        |_| Ok(5),
        move |_ctx: StepContext, _item| {
            counter.fetch_add(1, Ordering::SeqCst);
            async {
                tokio::time::sleep(Duration::from_millis(600)).await;
                Ok(ItemOutput::default())
            }
        },
    ));
    let task = submit(&store, "slow").await;
    let worker = Worker::new(
        store.clone(),
        Registry::new().register(workflow),
        options("w"),
    );
    let running = tokio::spawn(worker.run_until_idle());
    while started.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    commands::cancel(&store, task, Some("not needed".into()))
        .await
        .expect("cancel");
    let report = running.await.expect("join").expect("worker");
    assert_eq!(
        report.attempts.last().map(|a| a.outcome.clone()),
        Some(Ok(RunOutcome::Cancelled))
    );
    assert_eq!(
        started.load(Ordering::SeqCst),
        1,
        "no item started after the cancel"
    );
    let state = fold(&store.read_stream(task, 1).await.expect("read"));
    assert_eq!(state.status(), TaskStatus::CANCELLED);
    assert!(
        engine::audit::audit(task, &store.read_stream(task, 1).await.expect("read")).is_clean()
    );
}

/// A step that panics is a transient failure bounded by the retry policies: the task fails
/// with the panic's message and `--until-idle` returns.
#[tokio::test]
async fn a_panicking_step_fails_its_task_and_the_worker_moves_on() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let workflow = Workflow::new("buggy")
        .step(
            Step::fan_out(
                "work",
                |_| Ok(2),
                |_ctx: StepContext, item| async move {
                    if item == 2 {
                        panic!("index out of bounds: the len is 1 but the index is 1");
                    }
                    Ok(ItemOutput::default())
                },
            )
            .retry(RetryPolicy {
                max_tries: 2,
                backoff: Backoff::none(),
            }),
        )
        .task_retry(TaskRetryPolicy {
            max_attempts: 2,
            backoff: Backoff::none(),
        });
    let task = submit(&store, "buggy").await;
    let report = tokio::time::timeout(
        Duration::from_secs(20),
        Worker::new(
            store.clone(),
            Registry::new().register(workflow),
            options("w"),
        )
        .run_until_idle(),
    )
    .await
    .expect("until-idle returns")
    .expect("worker");
    assert_eq!(report.failed, 1);
    let state = fold(&store.read_stream(task, 1).await.expect("read"));
    assert_eq!(state.status(), TaskStatus::FAILED);
    let reason = state.failure.clone().expect("reason");
    assert!(
        reason.contains("the step panicked: index out of bounds"),
        "{reason}"
    );
    assert_eq!(
        state.step("work").expect("work").items.len(),
        1,
        "item 1 kept"
    );
}

/// Claims that end without a failure (shutdowns, takeovers) do not use up the attempt
/// budget: after three interrupted runs, a transient failure still schedules a retry.
#[tokio::test]
async fn the_attempt_budget_counts_failures_not_claims() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let failing = fail.clone();
    let workflow = Workflow::new("budget")
        .step(
            Step::fan_out(
                "work",
                |_| Ok(1),
                move |_ctx: StepContext, _item| {
                    let fail = failing.load(Ordering::SeqCst);
                    async move {
                        if fail {
                            Err(StepError::transient("provider timeout"))
                        } else {
                            std::future::pending::<Result<ItemOutput, StepError>>().await
                        }
                    }
                },
            )
            .retry(RetryPolicy {
                max_tries: 1,
                backoff: Backoff::none(),
            }),
        )
        .task_retry(TaskRetryPolicy {
            max_attempts: 2,
            backoff: Backoff::none(),
        });
    let orchestrator = Orchestrator::new(store.clone(), Registry::new().register(workflow));
    let task = submit(&store, "budget").await;
    for _ in 0..3 {
        let lease = claim(&store, task).await;
        let drain = CancellationToken::new();
        let abort = CancellationToken::new();
        let stopper = abort.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            stopper.cancel();
        });
        let outcome = orchestrator
            .run_with(&lease, drain, abort)
            .await
            .expect("run");
        assert_eq!(outcome, RunOutcome::Stopped);
    }
    fail.store(true, Ordering::SeqCst);
    let lease = claim(&store, task).await;
    assert_eq!(lease.attempt, 4);
    let outcome = orchestrator
        .run(&lease, CancellationToken::new())
        .await
        .expect("run");
    assert!(
        matches!(outcome, RunOutcome::RetryScheduled { .. }),
        "the first failure of a budget of 2 is retried: {outcome:?}"
    );
    let outcome = run_once(&store, &orchestrator, task).await;
    let reason = failure_reason(outcome);
    assert!(reason.starts_with("gave up after 2 attempts"), "{reason}");
}

/// An atomic step is one unit of work: one that plans several items is refused, so it can
/// never resume item by item.
#[tokio::test]
async fn an_atomic_step_that_plans_several_items_fails_permanently() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let workflow = Workflow::new("atomic").step(Step::call_with("render", PlanOf3));
    let orchestrator = Orchestrator::new(store.clone(), Registry::new().register(workflow));
    let task = submit(&store, "atomic").await;
    let outcome = run_once(&store, &orchestrator, task).await;
    let reason = failure_reason(outcome);
    assert!(
        reason.contains("an atomic step plans exactly one item, not 3"),
        "{reason}"
    );
    let state = fold(&store.read_stream(task, 1).await.expect("read"));
    assert!(state.step("render").is_none_or(|s| s.items.is_empty()));
}

/// A step whose plan says 3 items.
struct PlanOf3;

impl StepWork for PlanOf3 {
    fn plan(&self, _input: &serde_json::Value) -> Result<u32, StepError> {
        Ok(3)
    }

    fn run(
        &self,
        _ctx: StepContext,
        _item: u32,
    ) -> engine::BoxFuture<Result<ItemOutput, StepError>> {
        Box::pin(async { Ok(ItemOutput::default()) })
    }
}

/// A step that takes its worker down never records a failure, so the attempt budget does
/// not see it; the claim limit does (found by review: such a task was claimed forever).
#[tokio::test]
async fn a_task_whose_claims_keep_dying_fails_at_the_claim_limit() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let policy = TaskRetryPolicy {
        max_attempts: 3,
        backoff: Backoff::none(),
    };
    let limit = policy.claim_limit();
    let workflow = Workflow::new("crashy")
        .step(Step::call("work", |_ctx: StepContext| async {
            Ok(ItemOutput::default())
        }))
        .task_retry(policy);
    let task = submit(&store, "crashy").await;
    // Workers that die mid-item: their leases expire, nothing else is recorded.
    for i in 0..limit {
        store
            .claim_task(task, &format!("dies-{i}"), Duration::from_millis(1))
            .await
            .expect("claim")
            .expect("claimable");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let orchestrator = Orchestrator::new(store.clone(), Registry::new().register(workflow));
    let outcome = run_once(&store, &orchestrator, task).await;
    let reason = failure_reason(outcome);
    assert!(
        reason.starts_with(&format!("claimed {} times without finishing", limit + 1)),
        "{reason}"
    );
}

/// A corrupt history (a known event type and version whose payload does not decode) is
/// not "from a newer build": no build can run it, so the task fails with the reason
/// instead of being set aside forever; and an operator can cancel a task whose history
/// cannot be read (found by review).
#[tokio::test]
async fn a_corrupt_history_fails_the_task_and_unreadable_tasks_can_be_cancelled() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let corrupt = submit(&store, "video").await;
    db.append_raw(corrupt, "item_completed", 1, "{}").await;
    let orchestrator = Orchestrator::new(
        store.clone(),
        Registry::new().register(Probe::default().pipeline()),
    );
    let outcome = run_once(&store, &orchestrator, corrupt).await;
    let reason = failure_reason(outcome);
    assert!(reason.contains("cannot be read"), "{reason}");
    assert_eq!(
        store.task_status(corrupt).await.expect("status"),
        Some(TaskStatus::FAILED)
    );

    let newer = submit(&store, "video").await;
    db.append_raw(newer, "task_paused", 1, "{}").await;
    let cancelled = commands::cancel(&store, newer, Some("stuck".into()))
        .await
        .expect("cancel an unreadable task");
    assert_eq!(cancelled.status(), TaskStatus::CANCELLED);
    assert_eq!(
        store.task_status(newer).await.expect("status"),
        Some(TaskStatus::CANCELLED)
    );
}

/// A task an older worker set aside is still work for a worker that can read it:
/// `--until-idle` waits for it and runs it when it is due (found by review: it returned).
#[tokio::test]
async fn until_idle_waits_for_a_task_another_worker_set_aside() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let task = submit(&store, "video").await;
    // What an older worker leaves behind: marked unreadable, due in a moment.
    sqlx::query(
        "UPDATE tasks SET unreadable_since = now(), next_run_at = now() + interval '300 ms' \
         WHERE id = $1",
    )
    .bind(task.as_uuid())
    .execute(db.pool())
    .await
    .expect("set aside");
    let report = tokio::time::timeout(
        Duration::from_secs(20),
        Worker::new(
            store.clone(),
            Registry::new().register(Probe::default().pipeline()),
            options("newer"),
        )
        .run_until_idle(),
    )
    .await
    .expect("returns")
    .expect("worker");
    assert_eq!(report.awaiting_review, 1, "{report:?}");
    let marked: bool =
        sqlx::query_scalar("SELECT unreadable_since IS NOT NULL FROM tasks WHERE id = $1")
            .bind(task.as_uuid())
            .fetch_one(db.pool())
            .await
            .expect("row");
    assert!(
        !marked,
        "the first append of a worker that can read it clears the mark"
    );
}
