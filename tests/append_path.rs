//! The append path under attack (issue 18's review): a cancel during a cheap item before
//! paid ones, hundreds of items in flight, the versions items are given, and backends
//! killed before and during a run. Against a real PostgreSQL.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::{claim, completions, one_step, submit};
use engine::testing::TestDatabase;
use engine::{
    Event, Fence, ItemOutput, NewEvent, Orchestrator, Registry, RunOutcome, Step, StepContext,
    TaskId, TaskStatus, Workflow, fold,
};
use tokio_util::sync::CancellationToken;

/// A step whose item 3 is cheap (it only cancels the task: the operator's cancel lands
/// while it runs) and whose other items are paid provider calls. Item 3's completion
/// append is where the run sees the cancel (it conflicts), so item 4 — a paid call — must
/// never start: a step is not pipelined unless it says so.
#[tokio::test]
async fn a_paid_item_never_starts_after_a_cancel_the_run_could_have_seen() {
    for _ in 0..3 {
        let (_, started) = cancel_in_a_fast_item().await;
        assert_eq!(
            started,
            [1, 2, 3],
            "paid item(s) {:?} started after the cancel was committed",
            &started[3.min(started.len())..]
        );
    }
}

/// Runs the scenario once: how long item 3's cancel took, and the items started.
async fn cancel_in_a_fast_item() -> (Duration, Vec<u32>) {
    let db = TestDatabase::create().await;
    let store = db.store();
    let canceller = store.clone();
    let task_cell = Arc::new(OnceLock::<TaskId>::new());
    let cell = task_cell.clone();
    let started = Arc::new(Mutex::new(Vec::<u32>::new()));
    let log = started.clone();
    let cancel_took = Arc::new(AtomicU64::new(0));
    let took = cancel_took.clone();
    let read = Arc::new(Mutex::new(None::<(u32, TaskStatus)>));
    let video = Step::fan_out(
        "video",
        |_| Ok(6),
        move |_ctx: StepContext, item| {
            let (store, task, log, took, seen) = (
                canceller.clone(),
                *cell.get().expect("task"),
                log.clone(),
                took.clone(),
                read.clone(),
            );
            async move {
                log.lock().expect("lock").push(item);
                if item == 2 {
                    // The operator's `reel cancel` reads the task now; it commits while
                    // item 3 runs, at the version item 2's completion leaves.
                    let state = fold(&store.read_stream(task, 1).await.expect("read"));
                    *seen.lock().expect("lock") = Some((state.version + 1, state.status()));
                }
                if item == 3 {
                    // A cached item: no provider call. The operator's cancel (the append
                    // commands::cancel makes) commits while it runs.
                    let at = Instant::now();
                    let (version, status) = seen.lock().expect("lock").expect("read by item 2");
                    let events: Vec<NewEvent> = vec![
                        Event::TaskCancelled {
                            reason: Some("topic dropped".into()),
                        },
                        Event::status_changed(status, TaskStatus::CANCELLED),
                    ]
                    .into_iter()
                    .map(NewEvent::new)
                    .collect();
                    store
                        .append(task, version, Fence::Unleased, &events)
                        .await
                        .expect("cancel");
                    took.store(at.elapsed().as_micros() as u64, Ordering::SeqCst);
                }
                if item != 3 {
                    // A paid provider call.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(ItemOutput::new(format!("clip-{item}"), 1))
            }
        },
    );
    let orchestrator = one_step(&store, "video", video);
    let task = submit(&store, "video").await;
    task_cell.set(task).expect("once");
    let lease = claim(&store, task).await;
    warm_pool(&db).await;
    let outcome = orchestrator
        .run(&lease, CancellationToken::new())
        .await
        .expect("run");
    assert_eq!(outcome, RunOutcome::Cancelled);
    let took = Duration::from_micros(cancel_took.load(Ordering::SeqCst));
    let started = started.lock().expect("lock").clone();
    (took, started)
}

/// Opens several connections of the test pool at once, so later checkouts find them warm.
async fn warm_pool(db: &TestDatabase) {
    let mut warm = Vec::new();
    for _ in 0..8 {
        let pool = db.pool().clone();
        warm.push(tokio::spawn(async move {
            sqlx::query("SELECT pg_sleep(0.05)")
                .execute(&pool)
                .await
                .expect("warm");
        }));
    }
    for w in warm {
        w.await.expect("join");
    }
}

/// Many fast items with a concurrency above the log's bound on unanswered hand-overs (64):
/// the run must finish (no missed wake-up in `room()`), each item recorded once, pipelined
/// or not.
#[tokio::test]
async fn five_hundred_fast_items_at_concurrency_200_finish() {
    for pipelined in [false, true] {
        five_hundred_items(pipelined).await;
    }
}

async fn five_hundred_items(pipelined: bool) {
    let db = TestDatabase::create().await;
    let store = db.store();
    let clips = Step::fan_out(
        "clips",
        |_| Ok(500),
        |_ctx: StepContext, item| async move { Ok(ItemOutput::new(format!("clip-{item}"), 1)) },
    )
    .concurrency(200);
    let clips = if pipelined { clips.pipelined() } else { clips };
    let orchestrator = one_step(&store, "many", clips);
    let task = submit(&store, "many").await;
    let lease = claim(&store, task).await;
    let outcome = tokio::time::timeout(
        Duration::from_secs(60),
        orchestrator.run(&lease, CancellationToken::new()),
    )
    .await
    .expect("the run hung")
    .expect("run");
    assert_eq!(outcome, RunOutcome::Completed);
    let done = completions(&store, task, "clips").await;
    assert_eq!(done.len(), 500);
    assert!(done.values().all(|&n| n == 1));
    let events = store.read_stream(task, 1).await.expect("read");
    let audit = engine::audit::audit(task, &events);
    assert!(audit.is_clean(), "{:?}", audit.violations);
}

/// The step after a step of fast items reads each completion's `version` from its
/// outputs: it must be the stored `item_completed` event's version.
#[tokio::test]
async fn item_records_carry_the_stored_versions() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let seen = Arc::new(Mutex::new(Vec::<(u32, u32)>::new()));
    let record = seen.clone();
    let clips = Step::fan_out(
        "clips",
        |_| Ok(40),
        |_ctx: StepContext, item| async move { Ok(ItemOutput::new(format!("clip-{item}"), 1)) },
    )
    .concurrency(8);
    let read = Step::fan_out(
        "read",
        |_| Ok(1),
        move |ctx: StepContext, _item| {
            let record = record.clone();
            async move {
                let versions: Vec<(u32, u32)> = ctx
                    .outputs
                    .records("clips")
                    .map(|r| (r.item, r.version))
                    .collect();
                *record.lock().expect("lock") = versions;
                Ok(ItemOutput::new("read", 0))
            }
        },
    );
    let orchestrator = Orchestrator::new(
        store.clone(),
        Registry::new().register(Workflow::new("v").step(clips).step(read)),
    );
    let task = submit(&store, "v").await;
    let lease = claim(&store, task).await;
    let outcome = orchestrator
        .run(&lease, CancellationToken::new())
        .await
        .expect("run");
    assert_eq!(outcome, RunOutcome::Completed);
    let events = store.read_stream(task, 1).await.expect("read");
    let stored: Vec<(u32, u32)> = {
        let mut v: Vec<(u32, u32)> = events
            .iter()
            .filter_map(|e| match &e.event {
                Event::ItemCompleted { step, item, .. } if step == "clips" => {
                    Some((*item, e.version))
                }
                _ => None,
            })
            .collect();
        v.sort_unstable();
        v
    };
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen, stored);
    let state = fold(&events);
    assert!(state.step("read").is_some_and(|s| s.completed));
}

/// The engine's connections are killed by the server (pg_terminate_backend, as a failover
/// or an admin does) just before a run starts: the checkout ping replaces a dead idle
/// connection before use (a pool that skipped it for recently used connections failed
/// the run's first read here), so the run completes.
#[tokio::test]
async fn a_run_started_right_after_its_connections_were_killed_completes() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let clips = Step::fan_out(
        "clips",
        |_| Ok(4),
        |_ctx: StepContext, item| async move { Ok(ItemOutput::new(format!("clip-{item}"), 1)) },
    );
    let orchestrator = one_step(&store, "k", clips);
    let task = submit(&store, "k").await;
    let lease = claim(&store, task).await;
    // Several warm idle connections, each used within the last second.
    let pool = db.pool().clone();
    let mut warm = Vec::new();
    for _ in 0..6 {
        let pool = pool.clone();
        warm.push(tokio::spawn(async move {
            sqlx::query("SELECT pg_sleep(0.05)")
                .execute(&pool)
                .await
                .expect("warm");
        }));
    }
    for w in warm {
        w.await.expect("join");
    }
    // Kill every other backend of this database (not the killer's own).
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()) AS k",
    )
    .fetch_one(&pool)
    .await
    .expect("kill");
    assert!(killed >= 1, "killed {killed}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let outcome = orchestrator.run(&lease, CancellationToken::new()).await;
    assert!(
        matches!(outcome, Ok(RunOutcome::Completed)),
        "after {killed} backends were killed the run ended {outcome:?}"
    );
    let done = completions(&store, task, "clips").await;
    assert_eq!(done.len(), 4);
}

/// Backends killed while a run's fast items are being appended: the appends retry, so the
/// run completes with every item recorded once and a clean history.
#[tokio::test]
async fn backends_killed_mid_run_the_appends_retry_and_the_run_completes() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let clips = Step::fan_out(
        "clips",
        |_| Ok(300),
        |_ctx: StepContext, item| async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            Ok(ItemOutput::new(format!("clip-{item}"), 1))
        },
    )
    .concurrency(8);
    let orchestrator = one_step(&store, "k2", clips);
    let task = submit(&store, "k2").await;
    let lease = claim(&store, task).await;
    let mut killer = {
        use sqlx::Connection;
        sqlx::PgConnection::connect(db.url()).await.expect("killer")
    };
    let run = orchestrator.run(&lease, CancellationToken::new());
    tokio::pin!(run);
    let mut kills = 0;
    let outcome = loop {
        tokio::select! {
            outcome = &mut run => break outcome,
            () = tokio::time::sleep(Duration::from_millis(40)), if kills < 3 => {
                let _: Vec<bool> = sqlx::query_scalar(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = current_database() AND pid <> pg_backend_pid()",
                )
                .fetch_all(&mut killer)
                .await
                .expect("kill");
                kills += 1;
            }
        }
    };
    assert!(kills > 0, "the run ended before any kill");
    assert!(
        matches!(outcome, Ok(RunOutcome::Completed)),
        "after {kills} kills the run ended {outcome:?}"
    );
    let done = completions(&store, task, "clips").await;
    assert_eq!(done.len(), 300);
    assert!(done.values().all(|&n| n == 1));
    let events = store.read_stream(task, 1).await.expect("read");
    let audit = engine::audit::audit(task, &events);
    assert!(audit.is_clean(), "{:?}", audit.violations);
}

/// PostgreSQL refuses the NUL character in `jsonb` and `text`: an item whose output holds
/// one fails at once as a permanent error that says why (not eight retries of an append
/// that cannot succeed, failing the items grouped with it), and an error message holding
/// one is stored with a replacement character.
#[tokio::test]
async fn an_output_the_log_cannot_store_fails_the_item_at_once_saying_why() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let clips = Step::fan_out(
        "clips",
        |_| Ok(4),
        |_ctx: StepContext, item| async move {
            match item {
                2 => ItemOutput::new("clip-2", 1)
                    .with_output(serde_json::json!({ "raw": "a\u{0}b" })),
                3 => Err(engine::StepError::permanent("provider said \u{0}garbage")),
                _ => Ok(ItemOutput::new(format!("clip-{item}"), 1)),
            }
        },
    )
    .concurrency(4)
    .retry(engine::RetryPolicy {
        max_tries: 1,
        ..engine::RetryPolicy::default()
    });
    let orchestrator = one_step(&store, "nul", clips);
    let task = submit(&store, "nul").await;
    let lease = claim(&store, task).await;
    let started = Instant::now();
    let outcome = orchestrator
        .run(&lease, CancellationToken::new())
        .await
        .expect("run");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    let events = store.read_stream(task, 1).await.expect("read");
    let failures: Vec<String> = events
        .iter()
        .filter_map(|e| match &e.event {
            Event::ItemFailed { item, error, .. } => Some(format!("{item}: {error}")),
            _ => None,
        })
        .collect();
    assert!(
        failures
            .iter()
            .any(|f| f.starts_with("2: ") && f.contains("NUL")),
        "{failures:?}"
    );
    assert!(
        failures.iter().all(|f| !f.contains('\u{0}')),
        "{failures:?}"
    );
    assert!(matches!(outcome, RunOutcome::Failed { .. }), "{outcome:?}");
    let done = completions(&store, task, "clips").await;
    assert!(done.contains_key(&1) && done.contains_key(&4), "{done:?}");
    let audit = engine::audit::audit(task, &events);
    assert!(audit.is_clean(), "{:?}", audit.violations);
}
