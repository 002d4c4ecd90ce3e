//! Shared commits across tasks (issue 18): one statement appends to several streams, each
//! under its own version and lease, and answers each exactly as a lone append would; the
//! runs of one orchestrator share commits without losing an item or a fence. Against a
//! real PostgreSQL.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{claim, completions, one_step, submit};
use engine::testing::TestDatabase;
use engine::{
    Error, Event, Fence, ItemOutput, NewEvent, RunOutcome, Step, StepContext, StreamAppend, TaskId,
    TaskStatus,
};
use sqlx::Row;
use tokio_util::sync::CancellationToken;

fn completion(item: u32) -> NewEvent {
    NewEvent::new(Event::ItemCompleted {
        step: "clips".into(),
        item,
        attempt: 1,
        artifact: format!("clip-{item}"),
        cost_micros: 10,
        duration_ms: 1,
        output: None,
    })
}

/// `(stream, version, tx_id, global_position)` of every event of `streams`.
async fn stored(db: &TestDatabase, streams: &[TaskId]) -> Vec<(TaskId, u32, String, i64)> {
    let ids: Vec<uuid::Uuid> = streams.iter().map(TaskId::as_uuid).collect();
    sqlx::query(
        "SELECT stream_id, stream_version, tx_id::text AS tx, global_position FROM events \
         WHERE stream_id = ANY($1) ORDER BY global_position",
    )
    .bind(&ids)
    .fetch_all(db.pool())
    .await
    .expect("events")
    .iter()
    .map(|r| {
        (
            TaskId::from(r.get::<uuid::Uuid, _>("stream_id")),
            r.get::<i32, _>("stream_version") as u32,
            r.get::<String, _>("tx"),
            r.get::<i64, _>("global_position"),
        )
    })
    .collect()
}

#[tokio::test]
async fn a_shared_append_answers_each_stream_as_a_lone_append_would() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let (a, f) = (submit(&store, "w").await, submit(&store, "w").await);
    let (b, c, e) = (
        submit(&store, "w").await,
        submit(&store, "w").await,
        submit(&store, "w").await,
    );
    let missing = TaskId::new();
    let (lease_a, lease_b, lease_f) = (
        claim(&store, a).await,
        claim(&store, b).await,
        claim(&store, f).await,
    );
    // B's lease is taken by another worker; E's events were stored by an earlier try
    // whose acknowledgement was lost.
    sqlx::query("UPDATE tasks SET lease_epoch = lease_epoch + 1 WHERE id = $1")
        .bind(b.as_uuid())
        .execute(db.pool())
        .await
        .expect("take over");
    let replayed = [completion(1)];
    store
        .append(e, 1, Fence::Unleased, &replayed)
        .await
        .expect("first try");

    let a_events = [completion(1), completion(2)];
    let f_events = [
        NewEvent::new(Event::status_changed(
            TaskStatus::QUEUED,
            TaskStatus::FINAL_REVIEW,
        )),
        completion(1),
    ];
    let one = [completion(1)];
    let appends = [
        StreamAppend {
            stream: a,
            expected_version: lease_a.version,
            fence: lease_a.fence(),
            events: &a_events,
        },
        StreamAppend {
            stream: b,
            expected_version: lease_b.version,
            fence: lease_b.fence(),
            events: &one,
        },
        StreamAppend {
            stream: c,
            expected_version: 5,
            fence: Fence::Unleased,
            events: &one,
        },
        StreamAppend {
            stream: missing,
            expected_version: 1,
            fence: Fence::Unleased,
            events: &one,
        },
        StreamAppend {
            stream: e,
            expected_version: 1,
            fence: Fence::Unleased,
            events: &replayed,
        },
        StreamAppend {
            stream: f,
            expected_version: lease_f.version,
            fence: lease_f.fence(),
            events: &f_events,
        },
    ];
    let mut followers = sqlx::postgres::PgListener::connect_with(db.pool())
        .await
        .expect("listener");
    followers
        .listen(engine::EVENTS_CHANNEL)
        .await
        .expect("listen");
    let mut conn = db.pool().acquire().await.expect("conn");
    let answers = store.append_many_in(&mut conn, &appends).await;
    assert_eq!(answers.len(), appends.len());
    // F's status change wakes followers, as it would alone.
    tokio::time::timeout(Duration::from_secs(5), followers.recv())
        .await
        .expect("followers are woken")
        .expect("notification");

    let a_done = answers[0].as_ref().expect("A is written");
    assert_eq!(a_done.version, lease_a.version + 2);
    assert!(!a_done.replayed);
    assert!(matches!(answers[1], Err(Error::LeaseLost { task, .. }) if task == b));
    assert!(
        matches!(answers[2], Err(Error::Conflict { stream, expected: 5, actual: 1 }) if stream == c)
    );
    assert!(matches!(answers[3], Err(Error::TaskNotFound(task)) if task == missing));
    let e_done = answers[4].as_ref().expect("E's events were already there");
    assert!(e_done.replayed && e_done.version == 2);
    let f_done = answers[5].as_ref().expect("F is written");
    assert_eq!(f_done.version, lease_f.version + 2);

    // B, C and E wrote nothing; A and F wrote in one commit, A's events first, each in
    // version order, at the positions the answers give.
    let rows = stored(&db, &[a, b, c, e, f]).await;
    let count = |s: TaskId| rows.iter().filter(|r| r.0 == s).count();
    assert_eq!(
        (count(b), count(c), count(e)),
        (2, 1, 2),
        "B: submitted + claimed; C: submitted; E: submitted + its first try"
    );
    let shared: Vec<_> = rows
        .iter()
        .filter(|r| (r.0 == a || r.0 == f) && r.1 > lease_a.version.min(lease_f.version))
        .collect();
    assert_eq!(shared.len(), 4);
    assert!(shared.iter().all(|r| r.2 == shared[0].2), "one commit");
    let order: Vec<(TaskId, u32)> = shared.iter().map(|r| (r.0, r.1)).collect();
    assert_eq!(
        order,
        vec![
            (a, lease_a.version + 1),
            (a, lease_a.version + 2),
            (f, lease_f.version + 1),
            (f, lease_f.version + 2)
        ]
    );
    let positions: Vec<i64> = shared.iter().map(|r| r.3).collect();
    assert_eq!(a_done.positions, positions[..2]);
    assert_eq!(f_done.positions, positions[2..]);
    // Each stream's row moved with its own events: F's status, both versions.
    let row = |t: TaskId| {
        sqlx::query("SELECT version, status FROM tasks WHERE id = $1")
            .bind(t.as_uuid())
            .fetch_one(db.pool())
    };
    let a_row = row(a).await.expect("a");
    let f_row = row(f).await.expect("f");
    assert_eq!(a_row.get::<i32, _>("version") as u32, a_done.version);
    assert_eq!(f_row.get::<i32, _>("version") as u32, f_done.version);
    assert_eq!(f_row.get::<String, _>("status"), "final_review");
    assert_ne!(a_row.get::<String, _>("status"), "final_review");
}

#[tokio::test]
async fn a_reused_event_id_in_a_shared_append_fails_only_its_stream() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let (a, b, other) = (
        submit(&store, "w").await,
        submit(&store, "w").await,
        submit(&store, "w").await,
    );
    let taken = completion(1);
    store
        .append(other, 1, Fence::Unleased, std::slice::from_ref(&taken))
        .await
        .expect("other");
    let a_events = [completion(1)];
    let b_events = [NewEvent {
        event_id: taken.event_id,
        ..completion(2)
    }];
    let appends = [
        StreamAppend {
            stream: a,
            expected_version: 1,
            fence: Fence::Unleased,
            events: &a_events,
        },
        StreamAppend {
            stream: b,
            expected_version: 1,
            fence: Fence::Unleased,
            events: &b_events,
        },
    ];
    let mut conn = db.pool().acquire().await.expect("conn");
    let answers = store.append_many_in(&mut conn, &appends).await;
    assert_eq!(answers[0].as_ref().expect("A is written").version, 2);
    assert!(
        matches!(answers[1], Err(Error::EventIdReused { event_id }) if event_id == taken.event_id),
        "{:?}",
        answers[1]
    );
    assert_eq!(store.stream_version(a).await.expect("a"), 2);
    assert_eq!(store.stream_version(b).await.expect("b"), 1);
}

/// Four runs of one orchestrator whose items finish together share commits; each task's
/// history stays exact, and a lost lease stops its own run only.
#[tokio::test]
async fn runs_of_one_orchestrator_share_commits_and_a_lost_lease_stays_their_own() {
    const ITEMS: u32 = 18;
    let db = TestDatabase::create().await;
    let store = db.store();
    let pool = db.pool().clone();
    let tasks: Vec<TaskId> = {
        let mut tasks = Vec::new();
        for _ in 0..4 {
            tasks.push(submit(&store, "shared").await);
        }
        tasks
    };
    let lost = tasks[1];
    let barrier = Arc::new(tokio::sync::Barrier::new(tasks.len()));
    let taken = Arc::new(AtomicBool::new(false));
    let flag = taken.clone();
    // Every task's first item waits for the others', so their completions arrive together;
    // item 5 of one task hands it to another worker.
    let clips = Step::fan_out(
        "clips",
        |_| Ok(ITEMS),
        move |ctx: StepContext, item| {
            let (pool, barrier, flag) = (pool.clone(), barrier.clone(), flag.clone());
            async move {
                if item == 1 {
                    barrier.wait().await;
                }
                if item == 5 && ctx.task_id == lost {
                    sqlx::query("UPDATE tasks SET lease_epoch = lease_epoch + 1 WHERE id = $1")
                        .bind(ctx.task_id.as_uuid())
                        .execute(&pool)
                        .await
                        .expect("take over");
                    flag.store(true, Ordering::SeqCst);
                }
                Ok(ItemOutput::new(format!("clip-{item}"), 10))
            }
        },
    );
    let orchestrator = one_step(&store, "shared", clips);
    let mut runs = Vec::new();
    for &task in &tasks {
        let lease = claim(&store, task).await;
        let orchestrator = orchestrator.clone();
        runs.push(tokio::spawn(async move {
            orchestrator.run(&lease, CancellationToken::new()).await
        }));
    }
    for (task, run) in tasks.iter().zip(runs) {
        let outcome = run.await.expect("join");
        if *task == lost {
            assert!(
                matches!(outcome, Err(Error::LeaseLost { .. })),
                "{outcome:?}"
            );
        } else {
            assert_eq!(outcome.expect("run"), RunOutcome::Completed);
        }
    }
    assert!(taken.load(Ordering::SeqCst));
    for &task in &tasks {
        let events = store.read_stream(task, 1).await.expect("read");
        let versions: Vec<u32> = events.iter().map(|e| e.version).collect();
        assert_eq!(versions, (1..=events.len() as u32).collect::<Vec<_>>());
        let audit = engine::audit::audit(task, &events);
        assert!(audit.is_clean(), "{:?}", audit.violations);
        let done = completions(&store, task, "clips").await;
        assert!(done.values().all(|&n| n == 1), "each item once: {done:?}");
        if task == lost {
            assert!(done.len() < 5, "nothing after the takeover: {done:?}");
        } else {
            assert_eq!(done.len(), ITEMS as usize);
        }
    }
    // Some commit carried completions of several tasks.
    let rows = stored(&db, &tasks).await;
    let mut streams_by_commit: HashMap<&str, HashSet<TaskId>> = HashMap::new();
    for (stream, _, tx, _) in &rows {
        streams_by_commit.entry(tx).or_default().insert(*stream);
    }
    let widest = streams_by_commit.values().map(HashSet::len).max();
    assert!(
        widest >= Some(2),
        "no commit carried more than one task's events"
    );
}

/// A workflow `w` of one step, `clips`, of three no-op items.
fn three_clips(store: &engine::PgStore) -> engine::Orchestrator {
    let clips = Step::fan_out(
        "clips",
        |_| Ok(3),
        |_ctx: StepContext, item| async move { Ok(ItemOutput::new(format!("clip-{item}"), 1)) },
    );
    one_step(store, "w", clips)
}

/// Waits until some statement of the test database waits on `wait_event_type` (`Lock`
/// for a row lock, `Timeout` for a `pg_sleep`).
async fn wait_for_wait(db: &TestDatabase, wait_event_type: &str) {
    for _ in 0..200 {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = $1",
        )
        .bind(wait_event_type)
        .fetch_one(db.pool())
        .await
        .expect("activity");
        if waiting > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no statement ever waited on {wait_event_type}");
}

/// From now on, an append to `stream` stalls inside its statement (no lock wait: a
/// trigger sleeps) until [`unstall`] runs.
async fn stall_appends_to(db: &TestDatabase, stream: TaskId) {
    for ddl in [
        "CREATE TABLE stalled (stream uuid PRIMARY KEY)",
        "CREATE FUNCTION stall() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           WHILE EXISTS (SELECT 1 FROM stalled WHERE stream = NEW.stream_id) LOOP \
             PERFORM pg_sleep(0.01); \
           END LOOP; \
           RETURN NEW; \
         END $$",
        "CREATE TRIGGER stall BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION stall()",
    ] {
        sqlx::query(ddl).execute(db.pool()).await.expect("stall");
    }
    sqlx::query("INSERT INTO stalled VALUES ($1)")
        .bind(stream.as_uuid())
        .execute(db.pool())
        .await
        .expect("stall");
}

async fn unstall(db: &TestDatabase) {
    sqlx::query("DELETE FROM stalled")
        .execute(db.pool())
        .await
        .expect("unstall");
}

/// A task row held by another transaction (a library user's open transaction, say)
/// stalls that task's own run only: the other runs of the orchestrator carry on, and
/// once the row is free, the held task runs to the end too. (Found by review: the shared
/// statement waited on the row with every run's appends behind it.)
#[tokio::test]
async fn a_task_row_held_elsewhere_stalls_only_its_own_run() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let orchestrator = three_clips(&store);
    let (a, b) = (submit(&store, "w").await, submit(&store, "w").await);
    let (lease_a, lease_b) = (claim(&store, a).await, claim(&store, b).await);
    let mut side = db.pool().begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE")
        .bind(b.as_uuid())
        .execute(&mut *side)
        .await
        .expect("lock");
    let run_b = {
        let orchestrator = orchestrator.clone();
        tokio::spawn(async move { orchestrator.run(&lease_b, CancellationToken::new()).await })
    };
    wait_for_wait(&db, "Lock").await;
    let outcome = tokio::time::timeout(
        Duration::from_secs(10),
        orchestrator.run(&lease_a, CancellationToken::new()),
    )
    .await
    .expect("A runs while B's row is held")
    .expect("run a");
    assert_eq!(outcome, RunOutcome::Completed);
    assert!(!run_b.is_finished(), "B waits for its row");
    assert_eq!(
        store.stream_version(b).await.expect("b"),
        2,
        "nothing of B is written while its row is held"
    );
    side.commit().await.expect("unlock");
    assert_eq!(
        run_b.await.expect("join").expect("run b"),
        RunOutcome::Completed
    );
    for task in [a, b] {
        assert_eq!(completions(&store, task, "clips").await.len(), 3);
        let events = store.read_stream(task, 1).await.expect("read");
        let audit = engine::audit::audit(task, &events);
        assert!(audit.is_clean(), "{:?}", audit.violations);
    }
}

/// Sessions of the test database waiting on a lock, read on `monitor` (a connection
/// outside the pool under test).
async fn lock_waiters(monitor: &mut sqlx::PgConnection) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .fetch_one(&mut *monitor)
    .await
    .expect("activity")
}

/// One outside transaction holds the rows of as many tasks as the pool has connections,
/// each with its run under way. Those runs take turns waiting for their rows on one
/// connection, so the pool keeps room for everything else: a read, and an unrelated
/// task's run, which completes. Once the rows are free, every held run completes too.
/// (Found by review: each held run waited alone on a pooled connection of its own, and
/// the pool had nothing left.)
#[tokio::test]
async fn rows_held_elsewhere_leave_the_pool_room_for_the_rest() {
    use sqlx::Connection;
    let db = TestDatabase::create().await;
    let store = db.store();
    let size = store.pool().options().get_max_connections() as usize;
    let orchestrator = three_clips(&store);
    let mut held = Vec::new();
    for _ in 0..size {
        held.push(submit(&store, "w").await);
    }
    let free = submit(&store, "w").await;
    let mut leases = Vec::new();
    for task in &held {
        leases.push(claim(&store, *task).await);
    }
    let lease_free = claim(&store, free).await;
    let ids: Vec<uuid::Uuid> = held.iter().map(TaskId::as_uuid).collect();
    let mut side = sqlx::PgConnection::connect(db.url()).await.expect("side");
    let mut monitor = sqlx::PgConnection::connect(db.url())
        .await
        .expect("monitor");
    sqlx::query("BEGIN")
        .execute(&mut side)
        .await
        .expect("begin");
    sqlx::query("SELECT 1 FROM tasks WHERE id = ANY($1) FOR UPDATE")
        .bind(&ids)
        .execute(&mut side)
        .await
        .expect("lock");
    let runs: Vec<_> = leases
        .into_iter()
        .map(|lease| {
            let orchestrator = orchestrator.clone();
            tokio::spawn(async move { orchestrator.run(&lease, CancellationToken::new()).await })
        })
        .collect();
    let mut most_waiting = 0;
    for _ in 0..30 {
        most_waiting = most_waiting.max(lock_waiters(&mut monitor).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        most_waiting <= 2,
        "{most_waiting} sessions waited on the held rows at once"
    );
    let read = tokio::time::timeout(Duration::from_secs(5), store.stream_version(free)).await;
    assert!(matches!(read, Ok(Ok(2))), "a read on the pool: {read:?}");
    let outcome = tokio::time::timeout(
        Duration::from_secs(10),
        orchestrator.run(&lease_free, CancellationToken::new()),
    )
    .await
    .expect("the unrelated run completes while the rows are held")
    .expect("run");
    assert_eq!(outcome, RunOutcome::Completed);
    assert_eq!(completions(&store, free, "clips").await.len(), 3);
    for &task in &held {
        assert_eq!(store.stream_version(task).await.expect("held"), 2);
    }

    sqlx::query("COMMIT")
        .execute(&mut side)
        .await
        .expect("unlock");
    for run in runs {
        let outcome = tokio::time::timeout(Duration::from_secs(60), run)
            .await
            .expect("a held run completes once its row is free")
            .expect("join")
            .expect("run");
        assert_eq!(outcome, RunOutcome::Completed);
    }
    for task in held {
        assert_eq!(completions(&store, task, "clips").await.len(), 3);
        let events = store.read_stream(task, 1).await.expect("read");
        let audit = engine::audit::audit(task, &events);
        assert!(audit.is_clean(), "{:?}", audit.violations);
    }
}

/// A run aborted (`JoinHandle::abort`) while its append waits behind another run's
/// (stalled) statement writes nothing after it ends: not after its lease is given up, and not in
/// the way of the same lease run again. (Found by review: the queued append was written
/// by the next statement of any other run.)
#[tokio::test]
async fn an_aborted_run_writes_nothing_after_it_ended() {
    for rerun in [false, true] {
        let db = TestDatabase::create().await;
        let store = db.store();
        let orchestrator = three_clips(&store);
        let (a, b) = (submit(&store, "w").await, submit(&store, "w").await);
        let (lease_a, lease_b) = (claim(&store, a).await, claim(&store, b).await);
        // B's first append goes out and stalls in its statement.
        stall_appends_to(&db, b).await;
        let run_b = {
            let orchestrator = orchestrator.clone();
            tokio::spawn(async move { orchestrator.run(&lease_b, CancellationToken::new()).await })
        };
        wait_for_wait(&db, "Timeout").await;
        // A's first append queues behind it; then A's run is aborted.
        let run_a = {
            let (orchestrator, lease_a) = (orchestrator.clone(), lease_a.clone());
            tokio::spawn(async move { orchestrator.run(&lease_a, CancellationToken::new()).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        run_a.abort();
        assert!(run_a.await.expect_err("aborted").is_cancelled());
        assert_eq!(
            store.stream_version(a).await.expect("a"),
            2,
            "submitted + claimed"
        );
        if rerun {
            // The same lease, run again while B still waits: it runs to the end.
            let again = {
                let orchestrator = orchestrator.clone();
                tokio::spawn(
                    async move { orchestrator.run(&lease_a, CancellationToken::new()).await },
                )
            };
            tokio::time::sleep(Duration::from_millis(300)).await;
            unstall(&db).await;
            let outcome = again.await.expect("join").expect("run a again");
            assert_eq!(outcome, RunOutcome::Completed);
        } else {
            // Whoever aborted it gives the lease up.
            assert!(store.release_lease(&lease_a).await.expect("release"));
            unstall(&db).await;
        }
        assert_eq!(
            run_b.await.expect("join").expect("run b"),
            RunOutcome::Completed
        );
        if !rerun {
            let events = store.read_stream(a, 1).await.expect("read");
            assert_eq!(
                events.len(),
                2,
                "the aborted run's events were written after it ended: {:?}",
                events.iter().skip(2).map(|e| &e.event).collect::<Vec<_>>()
            );
        }
    }
}

/// A run aborted while it appends alone (its task row held by an outside transaction)
/// writes nothing after it ended, though its statement still waits in the server for the
/// row: not after whoever aborted it gave the lease up, and not in the way of the same
/// lease run again. The same contract as `an_aborted_run_writes_nothing_after_it_ended`,
/// on the alone path. (Found by review: the waiting statement committed once the row
/// freed.)
#[tokio::test]
async fn a_run_aborted_while_alone_writes_nothing_after_it_ended() {
    use sqlx::Connection;
    for rerun in [false, true] {
        let db = TestDatabase::create().await;
        let store = db.store();
        let orchestrator = three_clips(&store);
        let a = submit(&store, "w").await;
        let lease_a = claim(&store, a).await;
        let mut side = sqlx::PgConnection::connect(db.url()).await.expect("side");
        let mut monitor = sqlx::PgConnection::connect(db.url())
            .await
            .expect("monitor");
        sqlx::query("BEGIN")
            .execute(&mut side)
            .await
            .expect("begin");
        sqlx::query("SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE")
            .bind(a.as_uuid())
            .execute(&mut side)
            .await
            .expect("lock");
        let run_a = {
            let (orchestrator, lease_a) = (orchestrator.clone(), lease_a.clone());
            tokio::spawn(async move { orchestrator.run(&lease_a, CancellationToken::new()).await })
        };
        // A's append waits alone: a lock wait older than the committer's 100 ms bound.
        let mut alone = false;
        for _ in 0..200 {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND wait_event_type = 'Lock' AND clock_timestamp() - query_start > interval '250 ms'",
            )
            .fetch_one(&mut monitor)
            .await
            .expect("activity");
            if waiting > 0 {
                alone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(alone, "A's run never waited alone");
        run_a.abort();
        assert!(run_a.await.expect_err("aborted").is_cancelled());
        assert_eq!(
            store.stream_version(a).await.expect("a"),
            2,
            "submitted + claimed"
        );
        if rerun {
            // The same lease, run again while the row is still held: it runs to the end.
            let again = {
                let orchestrator = orchestrator.clone();
                tokio::spawn(
                    async move { orchestrator.run(&lease_a, CancellationToken::new()).await },
                )
            };
            tokio::time::sleep(Duration::from_millis(250)).await;
            sqlx::query("COMMIT")
                .execute(&mut side)
                .await
                .expect("unlock");
            let outcome = tokio::time::timeout(Duration::from_secs(30), again)
                .await
                .expect("rerun ends")
                .expect("join")
                .expect("run a again");
            assert_eq!(outcome, RunOutcome::Completed, "the same lease run again");
        } else {
            // Whoever aborted it gives the lease up; then the outside transaction ends.
            let release = {
                let (store, lease_a) = (store.clone(), lease_a.clone());
                tokio::spawn(async move { store.release_lease(&lease_a).await })
            };
            tokio::time::sleep(Duration::from_millis(50)).await;
            sqlx::query("COMMIT")
                .execute(&mut side)
                .await
                .expect("unlock");
            assert!(release.await.expect("join").expect("release"));
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let events = store.read_stream(a, 1).await.expect("read");
            assert_eq!(
                events.len(),
                2,
                "the aborted run's events were written after it ended: {:?}",
                events.iter().skip(2).map(|e| &e.event).collect::<Vec<_>>()
            );
        }
    }
}
