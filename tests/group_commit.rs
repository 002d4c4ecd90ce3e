//! Group commit: completions that arrive while an append is in flight share the next
//! commit, in order, with exact versions; a failure of the shared append reaches every
//! item in it; the steps after read every output. Against a real PostgreSQL.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{claim, completions, one_step, submit};
use engine::testing::TestDatabase;
use engine::{
    Error, Event, ItemOutput, Orchestrator, Registry, RunOutcome, Step, StepContext, TaskId,
    Workflow, fold,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const ITEMS: u32 = 18;

/// Two steps of fast items; the second reads every output of the first.
fn workflow(concurrency: usize, pipelined: bool) -> Workflow {
    let clips = Step::fan_out(
        "clips",
        |_| Ok(ITEMS),
        |_ctx: StepContext, item| async move {
            ItemOutput::new(format!("clip-{item}"), 10).with_output(json!({ "n": item }))
        },
    )
    .concurrency(concurrency);
    let clips = if pipelined { clips.pipelined() } else { clips };
    let sum = Step::fan_out(
        "sum",
        |_| Ok(1),
        |ctx: StepContext, _item| async move {
            let seen: u64 = ctx
                .outputs
                .outputs::<serde_json::Value>("clips")?
                .iter()
                .filter_map(|o| o.get("n")?.as_u64())
                .sum();
            ItemOutput::new("sum", 0).with_output(json!({ "sum": seen }))
        },
    );
    Workflow::new("group").step(clips).step(sum)
}

/// The commits (transactions) that wrote `task`'s `item_completed` events of `step`.
async fn commits(db: &TestDatabase, task: TaskId, step: &str) -> usize {
    let tx_ids: Vec<String> = sqlx::query_scalar(
        "SELECT tx_id::text FROM events \
         WHERE stream_id = $1 AND event_type = 'item_completed' AND payload->>'step' = $2",
    )
    .bind(task.as_uuid())
    .bind(step)
    .fetch_all(db.pool())
    .await
    .expect("commits");
    tx_ids.into_iter().collect::<HashSet<_>>().len()
}

#[tokio::test]
async fn completions_share_commits_in_order_and_later_steps_read_every_output() {
    // (concurrency, pipelined, the most commits 18 completions may take)
    for (concurrency, pipelined, most) in [(1, true, 9), (4, false, 17), (1, false, 18)] {
        let db = TestDatabase::create().await;
        let store = db.store();
        let orchestrator = Orchestrator::new(
            store.clone(),
            Registry::new().register(workflow(concurrency, pipelined)),
        );
        let task = submit(&store, "group").await;
        let lease = claim(&store, task).await;
        let outcome = orchestrator
            .run(&lease, CancellationToken::new())
            .await
            .expect("run");
        assert_eq!(outcome, RunOutcome::Completed);

        let events = store.read_stream(task, 1).await.expect("read");
        let versions: Vec<u32> = events.iter().map(|e| e.version).collect();
        assert_eq!(versions, (1..=events.len() as u32).collect::<Vec<_>>());
        let audit = engine::audit::audit(task, &events);
        assert!(audit.is_clean(), "{:?}", audit.violations);
        let done = completions(&store, task, "clips").await;
        assert_eq!(done.len(), ITEMS as usize);
        assert!(done.values().all(|&n| n == 1), "each item once: {done:?}");
        // Without group commit every completion is its own commit; one item at a time
        // and not pipelined, each is durable before the next starts.
        let shared = commits(&db, task, "clips").await;
        assert!(
            shared <= most,
            "concurrency {concurrency}, pipelined {pipelined}: {ITEMS} completions took {shared} commits"
        );
        // The step after saw every output, in a state that folds the same way.
        let state = fold(&events);
        let sum = state
            .step("sum")
            .and_then(|s| s.items.get(&1))
            .and_then(|i| i.output.clone());
        assert_eq!(
            sum,
            Some(json!({ "sum": (1..=u64::from(ITEMS)).sum::<u64>() }))
        );
        // The step's end is recorded after every one of its completions.
        let last_completion = events
            .iter()
            .rposition(|e| matches!(&e.event, Event::ItemCompleted { step, .. } if step == "clips"))
            .expect("completions");
        let step_completed = events
            .iter()
            .position(|e| matches!(&e.event, Event::StepCompleted { step, .. } if step == "clips"))
            .expect("step completed");
        assert!(step_completed > last_completion);
    }
}

#[tokio::test]
async fn a_lost_lease_fails_every_completion_of_the_shared_append_and_stores_none() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let pool = db.pool().clone();
    let task_cell = Arc::new(std::sync::OnceLock::<TaskId>::new());
    let cell = task_cell.clone();
    let taken = Arc::new(AtomicBool::new(false));
    let flag = taken.clone();
    // Item 5 hands the task to another worker (as an expired lease's new owner would).
    let clips = Step::fan_out(
        "clips",
        |_| Ok(ITEMS),
        move |_ctx: StepContext, item| {
            let (pool, task, flag) = (pool.clone(), *cell.get().expect("task"), flag.clone());
            async move {
                if item == 5 {
                    sqlx::query(
                        "UPDATE tasks SET lease_epoch = lease_epoch + 1, lease_owner = 'other' \
                         WHERE id = $1",
                    )
                    .bind(task.as_uuid())
                    .execute(&pool)
                    .await
                    .expect("take over");
                    flag.store(true, Ordering::SeqCst);
                }
                Ok(ItemOutput::new(format!("clip-{item}"), 10))
            }
        },
    );
    let orchestrator = one_step(&store, "group", clips.pipelined());
    let task = submit(&store, "group").await;
    task_cell.set(task).expect("once");
    let lease = claim(&store, task).await;
    let err = orchestrator
        .run(&lease, CancellationToken::new())
        .await
        .expect_err("the lease was lost");
    assert!(matches!(err, Error::LeaseLost { .. }), "{err:?}");
    assert!(taken.load(Ordering::SeqCst));
    let events = store.read_stream(task, 1).await.expect("read");
    let audit = engine::audit::audit(task, &events);
    assert!(audit.is_clean(), "{:?}", audit.violations);
    let done = completions(&store, task, "clips").await;
    assert!(
        done.len() < 5,
        "item 5 finished after the takeover and nothing after it is stored: {done:?}"
    );
    let state = fold(&events);
    assert!(state.step("clips").is_some_and(|s| !s.completed));
}

#[tokio::test]
async fn by_default_each_item_is_durable_before_the_next_starts() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let pool = db.pool().clone();
    let task_cell = Arc::new(std::sync::OnceLock::<TaskId>::new());
    let cell = task_cell.clone();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    let clips = Step::fan_out(
        "clips",
        |_| Ok(6),
        move |_ctx: StepContext, item| {
            let (pool, task, record) = (pool.clone(), *cell.get().expect("task"), record.clone());
            async move {
                // How many completions another connection can read as this item starts.
                let readable: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM events \
                     WHERE stream_id = $1 AND event_type = 'item_completed'",
                )
                .bind(task.as_uuid())
                .fetch_one(&pool)
                .await
                .expect("count");
                record.lock().expect("lock").push((item, readable));
                Ok(ItemOutput::new(format!("clip-{item}"), 10))
            }
        },
    );
    let orchestrator = one_step(&store, "group", clips);
    let task = submit(&store, "group").await;
    task_cell.set(task).expect("once");
    let lease = claim(&store, task).await;
    let outcome = orchestrator
        .run(&lease, CancellationToken::new())
        .await
        .expect("run");
    assert_eq!(outcome, RunOutcome::Completed);
    let seen = seen.lock().expect("lock").clone();
    let expected: Vec<(u32, i64)> = (1..=6).map(|i| (i, i64::from(i) - 1)).collect();
    assert_eq!(seen, expected, "item n starts with items 1..n-1 readable");
}

/// An orchestrator keeps one connection for its runs' appends (shared between them) only
/// while the pool keeps `HOLD_SPARE` connections that nothing holds (for claims,
/// heartbeats and reads): four runs on a pool of six hold one between them, whatever their
/// items do.
#[tokio::test]
async fn runs_hold_connections_only_while_the_pool_keeps_its_spare() {
    let db = TestDatabase::create().await;
    let max = engine::HOLD_SPARE + 2;
    let pool = engine::db::pool_options(max)
        .connect(db.url())
        .await
        .expect("pool");
    let store = engine::PgStore::new(pool.clone());
    let clips = Step::fan_out(
        "clips",
        |_| Ok(3),
        |_ctx: StepContext, item| async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok(ItemOutput::new(format!("clip-{item}"), 10))
        },
    );
    let orchestrator = one_step(&store, "group", clips);
    let mut runs = Vec::new();
    for _ in 0..4 {
        let task = submit(&store, "group").await;
        let lease = claim(&store, task).await;
        let orchestrator = orchestrator.clone();
        runs.push(tokio::spawn(async move {
            orchestrator.run(&lease, CancellationToken::new()).await
        }));
    }
    // While the items sleep, what the runs keep checked out is what they hold.
    let mut least = u32::MAX;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        least = least.min(pool.size() - pool.num_idle() as u32);
    }
    for run in runs {
        assert_eq!(
            run.await.expect("join").expect("run"),
            RunOutcome::Completed
        );
    }
    assert_eq!(
        least, 1,
        "the runs share one held connection ({least} held of a pool of {max})"
    );
    // With no run left, it is given back: the pool closes.
    tokio::time::timeout(Duration::from_secs(5), pool.close())
        .await
        .expect("the pool closes while the orchestrator lives");
    drop(orchestrator);
}
