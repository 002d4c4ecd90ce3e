//! Workers against a real PostgreSQL: many workers never share a task, fencing stops a
//! stalled worker, shutdown finishes items in flight and releases leases, and a restarted
//! worker reclaims its own leases at once.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::submit;
use engine::testing::TestDatabase;
use engine::{
    Error, Event, ItemOutput, Orchestrator, PgStore, Registry, RunOutcome, Step, StepContext,
    TaskStatus, Worker, WorkerOptions, Workflow,
};
use tokio_util::sync::CancellationToken;

/// A workflow of `items` items that each take `millis`, counting starts.
fn timed_workflow(items: u32, millis: u64, started: Arc<AtomicU32>) -> Workflow {
    Workflow::new("timed")
        .step(
            Step::fan_out(
                "work",
                move |_| Ok(items),
                move |_ctx: StepContext, item| {
                    started.fetch_add(1, Ordering::SeqCst);
                    async move {
                        tokio::time::sleep(Duration::from_millis(millis)).await;
                        Ok(ItemOutput::new(format!("item-{item}"), 1))
                    }
                },
            )
            .status("generating_video", "Generating Video"),
        )
        .review_gate()
}

fn options(id: &str) -> WorkerOptions {
    WorkerOptions {
        concurrency: 2,
        lease_ttl: Duration::from_secs(10),
        heartbeat_interval: Duration::from_secs(2),
        poll_interval: Duration::from_millis(100),
        shutdown_grace: Duration::from_secs(5),
        until_idle: true,
        ..WorkerOptions::new(id)
    }
}

#[tokio::test]
async fn four_workers_on_two_hundred_tasks_never_hold_a_task_at_once() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let mut tasks = Vec::new();
    for _ in 0..200 {
        tasks.push(submit(&store, "timed").await);
    }
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let store = PgStore::new(db.pool().clone());
            let registry = Registry::new().register(timed_workflow(3, 1, Arc::default()));
            tokio::spawn(
                Worker::new(store, registry, options(&format!("worker-{w}")))
                    .run(CancellationToken::new()),
            )
        })
        .collect();
    let mut claimed = 0;
    let mut busy_workers = 0;
    for worker in workers {
        let report = tokio::time::timeout(Duration::from_secs(120), worker)
            .await
            .expect("workers finish")
            .expect("join")
            .expect("worker");
        claimed += report.claimed;
        busy_workers += u32::from(report.claimed > 0);
    }
    assert!(claimed >= 200);
    assert!(busy_workers >= 2, "the work must have been shared");

    for task in tasks {
        let events = store.read_stream(task, 1).await.expect("read");
        let mut holder: Option<String> = None;
        let mut completions: HashMap<u32, u32> = HashMap::new();
        for event in &events {
            match &event.event {
                Event::TaskClaimed { worker_id, .. } => holder = Some(worker_id.clone()),
                Event::TaskSubmitted { .. } => {}
                _ => assert_eq!(
                    event.metadata.worker_id, holder,
                    "task {task} v{}: written by a worker that did not hold it",
                    event.version
                ),
            }
            if let Event::ItemCompleted { item, .. } = &event.event {
                *completions.entry(*item).or_default() += 1;
            }
        }
        assert_eq!(completions.len(), 3, "task {task}");
        assert!(
            completions.values().all(|n| *n == 1),
            "task {task}: {completions:?}"
        );
        assert_eq!(engine::fold(&events).status(), TaskStatus::FINAL_REVIEW);
    }
}

#[tokio::test]
async fn a_stalled_worker_cannot_append_after_another_took_over() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let registry = Registry::new().register(timed_workflow(3, 1, Arc::default()));
    let orchestrator = Orchestrator::new(store.clone(), registry);
    let task = submit(&store, "timed").await;

    let stalled = store
        .claim_task(task, "stalled", Duration::from_millis(200))
        .await
        .expect("claim")
        .expect("free");
    tokio::time::sleep(Duration::from_millis(400)).await; // a GC pause past the lease
    let taker = store
        .claim_next("taker", Duration::from_secs(30), &[], &["timed".into()])
        .await
        .expect("claim")
        .expect("expired");
    assert_eq!(taker.task, task);
    assert!(taker.epoch > stalled.epoch);

    let err = orchestrator
        .run(&stalled, CancellationToken::new())
        .await
        .expect_err("fenced off");
    assert!(
        matches!(err, Error::LeaseLost { epoch, .. } if epoch == stalled.epoch),
        "{err:?}"
    );
    let outcome = orchestrator
        .run(&taker, CancellationToken::new())
        .await
        .expect("the new holder runs");
    assert_eq!(outcome, RunOutcome::AwaitingReview);
    let events = store.read_stream(task, 1).await.expect("read");
    assert!(
        events
            .iter()
            .all(|e| e.metadata.worker_id.as_deref() != Some("stalled")
                || matches!(e.event, Event::TaskClaimed { .. }))
    );
}

#[tokio::test]
async fn shutdown_lets_the_item_in_flight_finish_and_releases_the_lease() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let started = Arc::new(AtomicU32::new(0));
    let registry = Registry::new().register(timed_workflow(5, 400, started.clone()));
    let task = submit(&store, "timed").await;
    let shutdown = CancellationToken::new();
    let options = WorkerOptions {
        until_idle: false,
        concurrency: 1,
        ..options("graceful")
    };
    let worker = tokio::spawn(Worker::new(store.clone(), registry, options).run(shutdown.clone()));

    while started.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await; // item 1 is in flight
    shutdown.cancel();
    let report = tokio::time::timeout(Duration::from_secs(10), worker)
        .await
        .expect("stops")
        .expect("join")
        .expect("worker");
    assert_eq!(report.stopped, 1);
    assert_eq!(
        started.load(Ordering::SeqCst),
        1,
        "no item starts after the signal"
    );

    let state = common::state(&store, task).await;
    assert_eq!(
        state.step("work").expect("work").items.len(),
        1,
        "the item in flight finished and was recorded"
    );
    let owner = common::lease_owner(&db, task).await;
    assert_eq!(owner, None, "the lease is released");
    let next = store
        .claim_next("other", Duration::from_secs(30), &[], &["timed".into()])
        .await
        .expect("claim");
    assert_eq!(
        next.map(|l| l.task),
        Some(task),
        "another worker resumes at once"
    );
}

#[tokio::test]
async fn a_restarted_worker_reclaims_its_own_lease_at_once() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let task = submit(&store, "timed").await;
    // The worker claimed the task, then its process died: the lease has 60 s to run.
    let crashed = store
        .claim_task(task, "worker-7", Duration::from_secs(60))
        .await
        .expect("claim")
        .expect("free");
    assert!(
        store
            .claim_next("worker-8", Duration::from_secs(60), &[], &["timed".into()])
            .await
            .expect("claim")
            .is_none(),
        "others wait for expiry"
    );

    let registry = Registry::new().register(timed_workflow(3, 1, Arc::default()));
    let restarted = Instant::now();
    let report = Worker::new(store.clone(), registry, options("worker-7"))
        .run(CancellationToken::new())
        .await
        .expect("worker");
    assert_eq!(report.awaiting_review, 1);
    assert!(
        restarted.elapsed() < Duration::from_secs(3),
        "reclaimed at once: {:?}",
        restarted.elapsed()
    );
    let claims: HashSet<i64> = store
        .read_stream(task, 1)
        .await
        .expect("read")
        .iter()
        .filter_map(|e| match e.event {
            Event::TaskClaimed { lease_epoch, .. } => Some(lease_epoch),
            _ => None,
        })
        .collect();
    assert_eq!(claims.len(), 2);
    assert!(claims.iter().all(|&e| e >= crashed.epoch));
}

#[tokio::test]
async fn a_lost_lease_stops_the_task_in_this_process() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let started = Arc::new(AtomicU32::new(0));
    let registry = Registry::new().register(timed_workflow(20, 100, started.clone()));
    let task = submit(&store, "timed").await;
    let options = WorkerOptions {
        until_idle: false,
        concurrency: 1,
        lease_ttl: Duration::from_secs(2),
        heartbeat_interval: Duration::from_millis(100),
        ..options("loser")
    };
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(Worker::new(store.clone(), registry, options).run(shutdown.clone()));
    while started.load(Ordering::SeqCst) < 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Another worker claims the task over this one's head (its epoch moves on).
    let version: i32 = sqlx::query_scalar(
        "UPDATE tasks SET lease_epoch = lease_epoch + 1, lease_owner = 'thief' WHERE id = $1 RETURNING version",
    )
    .bind(task.as_uuid())
    .fetch_one(db.pool())
    .await
    .expect("steal");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let starts_after_loss = started.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        started.load(Ordering::SeqCst),
        starts_after_loss,
        "no item starts once the lease is lost"
    );
    shutdown.cancel();
    let report = worker.await.expect("join").expect("worker");
    assert_eq!(report.stopped, 1);
    let written_after = store
        .read_stream(task, version as u32 + 1)
        .await
        .expect("read");
    assert!(
        written_after.is_empty(),
        "the fenced-off worker wrote {written_after:?}"
    );
}

#[tokio::test]
async fn a_worker_claims_only_tasks_of_workflows_it_knows() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let foreign = submit(&store, "someone-elses-workflow").await;
    let mine = submit(&store, "timed").await;
    let registry = Registry::new().register(timed_workflow(2, 1, Arc::default()));
    let report = tokio::time::timeout(
        Duration::from_secs(20),
        Worker::new(store.clone(), registry, options("picky")).run(CancellationToken::new()),
    )
    .await
    .expect("until-idle ignores other workflows' tasks")
    .expect("worker");
    assert_eq!(report.claimed, 1);
    assert_eq!(
        common::state(&store, mine).await.status(),
        TaskStatus::FINAL_REVIEW
    );
    let untouched = common::state(&store, foreign).await;
    assert_eq!(
        (untouched.status(), untouched.attempt),
        (TaskStatus::QUEUED, 0)
    );
}

/// A claim reads a few rows, however many tasks are queued: with 20,000 queued tasks, and
/// 20,000 older ones of a workflow the worker does not run, five claims read fewer than
/// 1,000 rows of `tasks` in all (sequential and index reads, counted by PostgreSQL's
/// statistics), where a scan-and-sort claim reads every runnable task.
#[tokio::test]
async fn a_claim_reads_a_few_rows_whatever_the_queue_length() {
    let db = TestDatabase::create().await;
    sqlx::raw_sql(
        "INSERT INTO tasks (id, workflow, channel_id, status, version, created_at) \
         SELECT gen_random_uuid(), 'other', 'history', 'queued', 1, \
                now() - interval '2 hours' + n * interval '1 ms' \
           FROM generate_series(1, 20000) AS n; \
         INSERT INTO tasks (id, workflow, channel_id, status, version, created_at) \
         SELECT gen_random_uuid(), 'timed', 'history', 'queued', 1, \
                now() - interval '1 hour' + n * interval '1 ms' \
           FROM generate_series(1, 20000) AS n; \
         INSERT INTO events (stream_id, stream_version, event_id, event_type, payload) \
         SELECT id, 1, gen_random_uuid(), 'task_submitted', \
                jsonb_build_object('workflow', workflow, 'channel_id', channel_id, 'input', '{}'::jsonb) \
           FROM tasks; \
         ANALYZE tasks",
    )
    .execute(db.pool())
    .await
    .expect("queue 40,000 tasks");
    let rows_read = || async {
        let (read, updated): (i64, i64) = sqlx::query_as(
            "SELECT (COALESCE(seq_tup_read, 0) + COALESCE(idx_tup_fetch, 0))::bigint, \
                    n_tup_upd FROM pg_stat_user_tables WHERE relname = 'tasks'",
        )
        .fetch_one(db.pool())
        .await
        .expect("pg_stat_user_tables");
        (read, updated)
    };
    // The set-up's own scan of `tasks` (the events insert) is counted when its session
    // flushes its statistics: wait for that, or it lands among the claims' reads.
    let started = Instant::now();
    loop {
        let inserted: i64 =
            sqlx::query_scalar("SELECT n_tup_ins FROM pg_stat_user_tables WHERE relname = 'tasks'")
                .fetch_one(db.pool())
                .await
                .expect("pg_stat_user_tables");
        if inserted >= 40_000 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the set-up's statistics were never flushed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (read_before, updated_before) = rows_read().await;

    // One connection, so the claims' statistics are flushed together, when it goes idle.
    let claimer = PgStore::new(
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(db.url())
            .await
            .expect("connect"),
    );
    let mut claimed = Vec::new();
    for _ in 0..5 {
        let lease = claimer
            .claim_next("w1", Duration::from_secs(30), &claimed, &["timed".into()])
            .await
            .expect("claim")
            .expect("a task to claim");
        claimed.push(lease.task);
    }
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(claimer.pool())
        .await
        .expect("flush statistics");
    let started = Instant::now();
    let read_after = loop {
        let (read, updated) = rows_read().await;
        if updated >= updated_before + 5 {
            break read;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the claims' statistics were never flushed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let oldest: Vec<uuid::Uuid> = sqlx::query_scalar(
        "SELECT id FROM tasks WHERE workflow = 'timed' ORDER BY created_at LIMIT 5",
    )
    .fetch_all(db.pool())
    .await
    .expect("oldest tasks");
    assert_eq!(
        claimed.iter().map(|t| t.as_uuid()).collect::<Vec<_>>(),
        oldest,
        "the oldest tasks are claimed first"
    );
    assert!(
        read_after - read_before < 1000,
        "5 claims read {} rows of tasks",
        read_after - read_before
    );
}
