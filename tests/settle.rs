//! A failed or cancelled task settles the provider jobs it left open (issue 25, and its
//! review): they are polled to their end and their cost recorded, whatever happens to the
//! workers doing it, and nothing is paid for twice — not after a revoked key and a retry,
//! not after a cancel that lands while a submit is in flight or while a dead worker's lease
//! is still live.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::fake_jobs::*;
use engine::testing::TestDatabase;
use engine::{
    BoxFuture, Event, JobStatus, JobWork, PgStore, ProviderLimits, StepContext, StepError,
    Submission, TaskId, TaskStatus, fold,
};
use serde_json::Value;

/// Waits until no job of `task` is open in its log, or panics after `limit`.
async fn wait_until_settled(store: &PgStore, task: TaskId, limit: Duration) {
    let deadline = Instant::now() + limit;
    while fold(&events(store, task).await).open_jobs() > 0 {
        assert!(
            Instant::now() < deadline,
            "task {task}'s jobs were never settled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `task` has `jobs` open jobs, or panics after 10 s.
async fn wait_for_open_jobs(store: &PgStore, task: TaskId, jobs: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while fold(&events(store, task).await).open_jobs() < jobs {
        assert!(
            Instant::now() < deadline,
            "task {task} never opened {jobs} jobs"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn row(store: &PgStore, task: TaskId) -> (bool, Option<String>, String) {
    sqlx::query_as("SELECT parked, lease_owner, status FROM tasks WHERE id = $1")
        .bind(task.as_uuid())
        .fetch_one(store.pool())
        .await
        .expect("row")
}

/// Fails the first `n` polls with a permanent error (a revoked key).
struct Revoked(Arc<Fake>, Arc<AtomicU32>);

impl JobWork for Revoked {
    fn plan(&self, input: &Value) -> Result<u32, StepError> {
        Provider(self.0.clone()).plan(input)
    }
    fn submit(
        &self,
        ctx: StepContext,
        item: u32,
        submission: Submission,
    ) -> BoxFuture<Result<Value, StepError>> {
        Provider(self.0.clone()).submit(ctx, item, submission)
    }
    fn poll(
        &self,
        ctx: StepContext,
        item: u32,
        job: Value,
    ) -> BoxFuture<Result<JobStatus, StepError>> {
        if self.1.load(Ordering::SeqCst) > 0 {
            self.1.fetch_sub(1, Ordering::SeqCst);
            return Box::pin(async { Err(StepError::permanent("401: the key was refused")) });
        }
        Provider(self.0.clone()).poll(ctx, item, job)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_then_a_retry_polls_the_open_job_instead_of_paying_again() {
    // The key is refused on the first two polls: the task fails, and its job — still
    // running, still charged — stays open. Once the key is fixed, `reel retry` polls it.
    let db = TestDatabase::create().await;
    let store = db.store();
    let fake = Arc::new(Fake {
        hint: true,
        ..Fake::new(Duration::from_millis(800))
    });
    let refusals = Arc::new(AtomicU32::new(2));
    let step = engine::Step::jobs("render", Revoked(fake.clone(), refusals.clone()))
        .provider(ProviderLimits::new("render").max_in_flight(2));
    let task = submit_items(&store, 1).await;
    let worker = start_worker(&store, registry(step), 2);
    wait_for_status(&store, task, TaskStatus::FAILED, Duration::from_secs(10)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while refusals.load(Ordering::SeqCst) > 0 {
        assert!(Instant::now() < deadline, "the settle never polled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        fold(&events(&store, task).await).open_jobs(),
        1,
        "a refused poll does not close the job"
    );
    engine::commands::retry(&store, task).await.expect("retry");
    wait_for_status(&store, task, TaskStatus::COMPLETED, Duration::from_secs(15)).await;
    worker.cancel();
    assert_eq!(fake.created_for(1), 1, "the job was paid for once");
    let events = events(&store, task).await;
    assert_eq!(
        count(&events, |e| matches!(e, Event::ItemSubmitted { .. })),
        1
    );
    audit_clean(task, &events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_dies_while_settling_leaves_the_task_to_the_next() {
    // A cancelled task with two open jobs is claimed to settle them by a worker that then
    // dies (it never runs the claim). Once its lease ends, another worker settles them.
    let db = TestDatabase::create().await;
    let store = db.store();
    let fake = Arc::new(Fake {
        hint: true,
        ..Fake::new(Duration::from_secs(2))
    });
    let step = jobs_step(&fake).provider(ProviderLimits::new("render").max_in_flight(2));
    let task = submit_items(&store, 2).await;
    let registry = registry(step);
    let first = start_worker(&store, registry.clone(), 2);
    wait_for_open_jobs(&store, task, 2).await;
    first.cancel();
    tokio::time::sleep(Duration::from_millis(500)).await;
    engine::commands::cancel(&store, task, None)
        .await
        .expect("cancel");
    let doomed = store
        .claim_next("doomed", Duration::from_secs(2), &[], &["jobs".into()])
        .await
        .expect("claim")
        .expect("the settle is claimable");
    assert_eq!(doomed.task, task);
    let (parked, owner, status) = row(&store, task).await;
    assert!(parked, "a settle claim keeps the task parked");
    assert_eq!(
        (owner.as_deref(), status.as_str()),
        (Some("doomed"), "cancelled")
    );

    let second = start_worker(&store, registry, 2);
    wait_until_settled(&store, task, Duration::from_secs(15)).await;
    wait_for_no_slots(&store, task, Duration::from_secs(5)).await;
    second.cancel();
    let state = fold(&events(&store, task).await);
    assert_eq!(state.spent.items, 2, "both jobs' results and cost recorded");
    assert_eq!(fake.created(), 2);
    let (parked, owner, _) = row(&store, task).await;
    assert!(
        !parked && owner.is_none(),
        "settled: no longer parked or leased"
    );
    audit_clean(task, &events(&store, task).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_while_a_dead_workers_lease_is_live_still_settles_the_jobs() {
    // The worker that holds the task's lease is dead (it claimed and never ran), the lease
    // not yet expired. The cancel parks the task until that lease would end; then any
    // worker settles its jobs.
    let db = TestDatabase::create().await;
    let store = db.store();
    let fake = Arc::new(Fake {
        hint: true,
        ..Fake::new(Duration::from_secs(3))
    });
    let step = jobs_step(&fake).provider(ProviderLimits::new("render").max_in_flight(2));
    let task = submit_items(&store, 2).await;
    let registry = registry(step);
    let first = start_worker(&store, registry.clone(), 2);
    wait_for_open_jobs(&store, task, 2).await;
    first.cancel();
    // Parked on its jobs: a "dead" worker takes it and never comes back.
    let deadline = Instant::now() + Duration::from_secs(10);
    let _dead = loop {
        if let Some(lease) = store
            .claim_task(task, "dead", Duration::from_secs(2))
            .await
            .expect("claim")
        {
            break lease;
        }
        // Due at its next poll; make it due now.
        sqlx::query("UPDATE tasks SET next_run_at = now() WHERE id = $1 AND parked")
            .bind(task.as_uuid())
            .execute(store.pool())
            .await
            .expect("due");
        assert!(Instant::now() < deadline, "never claimable");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    engine::commands::cancel(&store, task, None)
        .await
        .expect("cancel");
    let second = start_worker(&store, registry, 2);
    wait_until_settled(&store, task, Duration::from_secs(15)).await;
    second.cancel();
    assert_eq!(fold(&events(&store, task).await).spent.items, 2);
    assert_eq!(fake.created(), 2);
    audit_clean(task, &events(&store, task).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_submit_answer_during_a_cancel_is_recorded_and_keeps_its_slot() {
    // The operator cancels while a submit is in flight; the provider starts the job but
    // its answer is lost. The possible payment is in the log, and its slot is kept for
    // the job's life.
    let db = TestDatabase::create().await;
    let store = db.store();
    let fake = Arc::new(Fake::new(Duration::from_secs(120)));
    fake.fates
        .lock()
        .expect("lock")
        .push_back(SubmitFate::LoseAnswer);
    let gate = Arc::new(tokio::sync::Notify::new());
    let entered = Arc::new(AtomicU32::new(0));
    struct Gated(Arc<Fake>, Arc<tokio::sync::Notify>, Arc<AtomicU32>);
    impl JobWork for Gated {
        fn plan(&self, input: &Value) -> Result<u32, StepError> {
            Provider(self.0.clone()).plan(input)
        }
        fn submit(
            &self,
            ctx: StepContext,
            item: u32,
            submission: Submission,
        ) -> BoxFuture<Result<Value, StepError>> {
            let (fake, gate, entered) = (self.0.clone(), self.1.clone(), self.2.clone());
            Box::pin(async move {
                entered.fetch_add(1, Ordering::SeqCst);
                gate.notified().await;
                Provider(fake).submit(ctx, item, submission).await
            })
        }
        fn poll(
            &self,
            ctx: StepContext,
            item: u32,
            job: Value,
        ) -> BoxFuture<Result<JobStatus, StepError>> {
            Provider(self.0.clone()).poll(ctx, item, job)
        }
    }
    let step = engine::Step::jobs("render", Gated(fake.clone(), gate.clone(), entered.clone()))
        .job_timeout(Duration::from_secs(3600))
        .provider(ProviderLimits::new("render").max_in_flight(3));
    let task = submit_items(&store, 1).await;
    let worker = start_worker(&store, registry(step), 2);
    let deadline = Instant::now() + Duration::from_secs(10);
    while entered.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the submit never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    engine::commands::cancel(&store, task, None)
        .await
        .expect("cancel");
    gate.notify_one();
    let deadline = Instant::now() + Duration::from_secs(10);
    while fold(&events(&store, task).await).submits_unanswered == 0 {
        assert!(
            Instant::now() < deadline,
            "the lost answer was never recorded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.cancel();
    let kept: f64 = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM max(expires_at) - now())::float8 FROM provider_slots \
         WHERE task_id = $1 AND unanswered > 0",
    )
    .bind(task.as_uuid())
    .fetch_one(store.pool())
    .await
    .expect("slot");
    assert!(
        kept > 3000.0,
        "the lost job's slot is kept for the job timeout ({kept} s left)"
    );
    assert_eq!(status(&store, task).await, TaskStatus::CANCELLED);
    audit_clean(task, &events(&store, task).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_of_a_task_settling_its_jobs_starts_a_new_attempt_and_frees_unsubmitted_slots() {
    // Item 3's submit is refused for good while 1 and 2 run (8 s jobs): the task fails and
    // settles them. Item 4 had a slot and no job: it is freed at once, not held through
    // the settle. A retry during the settle starts attempt 2 with a fresh budget.
    let db = TestDatabase::create().await;
    let store = db.store();
    let fake = Arc::new(Fake {
        hint: true,
        ..Fake::new(Duration::from_secs(8))
    });
    {
        let mut fates = fake.fates.lock().expect("lock");
        fates.push_back(SubmitFate::Accept);
        fates.push_back(SubmitFate::Accept);
        fates.push_back(SubmitFate::Refuse(StepError::permanent("400: bad prompt")));
    }
    let step = jobs_step(&fake).provider(ProviderLimits::new("render").max_in_flight(4));
    let task = submit_items(&store, 4).await;
    let worker = start_worker(&store, registry(step), 2);
    wait_for_status(&store, task, TaskStatus::FAILED, Duration::from_secs(10)).await;
    // The settle claim frees the slots of items without a job (3 and 4).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let items: Vec<i32> = sqlx::query_scalar(
            "SELECT item FROM provider_slots WHERE task_id = $1 AND expires_at >= now() ORDER BY item",
        )
        .bind(task.as_uuid())
        .fetch_all(store.pool())
        .await
        .expect("slots");
        if items == [1, 2] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "slots held while settling: {items:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    engine::commands::retry(&store, task).await.expect("retry");
    wait_for_status(&store, task, TaskStatus::COMPLETED, Duration::from_secs(30)).await;
    worker.cancel();
    let events = events(&store, task).await;
    let attempts: Vec<u32> = events
        .iter()
        .filter_map(|e| match e.event {
            Event::TaskClaimed { attempt, .. } => Some(attempt),
            _ => None,
        })
        .collect();
    assert_eq!(
        attempts.last(),
        Some(&2),
        "the retry's claims run attempt 2: {attempts:?}"
    );
    for item in 1..=4 {
        assert_eq!(fake.created_for(item), 1, "item {item}");
    }
    audit_clean(task, &events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_task_parked_for_room_leaves_nothing_waiting() {
    // B waits for room behind A (cap 1) and is cancelled: it is no longer parked, so a
    // worker running until idle returns once A is done.
    let db = TestDatabase::create().await;
    let store = db.store();
    let fake = Arc::new(Fake {
        hint: true,
        ..Fake::new(Duration::from_secs(2))
    });
    let step = jobs_step(&fake).provider(ProviderLimits::new("render").max_in_flight(1));
    let registry = registry(step);
    let a = submit_items(&store, 1).await;
    let worker = start_worker(&store, registry.clone(), 2);
    wait_for_open_jobs(&store, a, 1).await;
    let b = submit_items(&store, 1).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(&events(&store, b).await, |e| {
        matches!(e, Event::TaskParked { waiting: 1, .. })
    }) == 0
    {
        assert!(Instant::now() < deadline, "B never parked for room");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    engine::commands::cancel(&store, b, None)
        .await
        .expect("cancel");
    let (parked, _, status) = row(&store, b).await;
    assert!(!parked, "a cancelled task waits for nothing");
    assert_eq!(status, "cancelled");
    worker.cancel();
    let report = tokio::time::timeout(
        Duration::from_secs(20),
        engine::Worker::new(
            store.clone(),
            registry,
            engine::WorkerOptions {
                poll_interval: Duration::from_millis(100),
                ..engine::WorkerOptions::new("idle")
            },
        )
        .run_until_idle(),
    )
    .await
    .expect("the worker found nothing left to wait for")
    .expect("run");
    assert!(report.claimed >= 1);
    assert_eq!(status_of(&store, a).await, TaskStatus::COMPLETED);
}

async fn status_of(store: &PgStore, task: TaskId) -> TaskStatus {
    fold(&events(store, task).await).status()
}
