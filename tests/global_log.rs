//! The gap-safe global read and the subscription, against a real PostgreSQL: late commits,
//! rollbacks, other databases' transactions, lost LISTEN connections, and a stress run.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use engine::testing::TestDatabase;
use engine::{
    Checkpoint, Error, Event, Fence, NewEvent, NewTask, PgStore, RecordedEvent, Subscription,
    SubscriptionOptions, TaskId, TaskStatus,
};
use rand::Rng;
use serde_json::json;
use uuid::Uuid;

async fn new_task(store: &PgStore) -> TaskId {
    let channel = engine::ChannelId::parse("history").expect("channel");
    store
        .create_task(NewTask::new("video", channel, json!({})))
        .await
        .expect("create task")
        .task_id()
}

fn event() -> NewEvent {
    NewEvent::new(Event::status_changed(
        TaskStatus::QUEUED,
        TaskStatus::from_static("generating_assets"),
    ))
}

/// Reads everything readable now, in batches of `batch`, returning it and the checkpoint.
async fn drain(
    store: &PgStore,
    mut from: Checkpoint,
    batch: u32,
) -> (Vec<RecordedEvent>, Checkpoint) {
    let mut all = Vec::new();
    loop {
        let events = store
            .read_all_after(from, batch)
            .await
            .expect("global read");
        let Some(last) = events.last() else {
            return (all, from);
        };
        from = Checkpoint::after(last);
        all.extend(events);
    }
}

/// Reads until `count` events after `from` have arrived (other tests' transactions on the
/// same cluster hold the watermark back for a moment), then returns exactly what is readable.
async fn read_at_least(
    store: &PgStore,
    from: Checkpoint,
    batch: u32,
    count: usize,
) -> (Vec<RecordedEvent>, Checkpoint) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut all, mut at) = drain(store, from, batch).await;
    while all.len() < count && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (more, next) = drain(store, at, batch).await;
        all.extend(more);
        at = next;
    }
    (all, at)
}

fn ids(events: &[RecordedEvent]) -> Vec<Uuid> {
    events.iter().map(|e| e.event_id).collect()
}

async fn out_of_order_commit_is_read_once(batch: u32) {
    let db = TestDatabase::create().await;
    let store = db.store();
    let (task_a, task_b) = (new_task(&store).await, new_task(&store).await);
    let (_, start) = read_at_least(&store, Checkpoint::START, batch, 2).await;

    // A appends first (smaller position and xid) and stays open; B appends and commits.
    let (event_a, event_b) = (event(), event());
    let mut tx_a = db.pool().begin().await.expect("begin A");
    store
        .append_in(
            &mut tx_a,
            task_a,
            1,
            Fence::Unleased,
            std::slice::from_ref(&event_a),
        )
        .await
        .expect("A appends");
    store
        .append(task_b, 1, Fence::Unleased, std::slice::from_ref(&event_b))
        .await
        .expect("B appends and commits");

    let (seen, checkpoint) = drain(&store, start, batch).await;
    assert!(
        seen.is_empty(),
        "nothing at or after A's open transaction may be read: {seen:?}"
    );
    assert_eq!(checkpoint, start);

    tx_a.commit().await.expect("commit A");
    let (seen, _) = read_at_least(&store, checkpoint, batch, 2).await;
    assert_eq!(ids(&seen), [event_a.event_id, event_b.event_id]);
}

#[tokio::test]
async fn an_out_of_order_commit_is_neither_skipped_nor_repeated() {
    out_of_order_commit_is_read_once(100).await;
}

#[tokio::test]
async fn an_out_of_order_commit_is_neither_skipped_nor_repeated_with_batches_of_one() {
    out_of_order_commit_is_read_once(1).await;
}

#[tokio::test]
async fn a_rolled_back_append_never_stalls_a_global_reader() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let (task_a, task_b) = (new_task(&store).await, new_task(&store).await);
    let (_, start) = read_at_least(&store, Checkpoint::START, 10, 2).await;

    let mut tx_a = db.pool().begin().await.expect("begin");
    store
        .append_in(&mut tx_a, task_a, 1, Fence::Unleased, &[event()])
        .await
        .expect("A appends");
    tx_a.rollback().await.expect("rollback");
    let event_b = event();
    store
        .append(task_b, 1, Fence::Unleased, std::slice::from_ref(&event_b))
        .await
        .expect("B");

    let (seen, _) = read_at_least(&store, start, 10, 1).await;
    assert_eq!(ids(&seen), [event_b.event_id]);
}

#[tokio::test]
async fn an_open_transaction_in_another_database_delays_reads_but_loses_nothing() {
    let db = TestDatabase::create().await;
    let other = TestDatabase::create().await;
    let store = db.store();
    let task = new_task(&store).await;
    let (_, start) = read_at_least(&store, Checkpoint::START, 10, 1).await;

    // A write transaction in another database of the same cluster holds the oldest xid.
    let mut foreign = other.pool().begin().await.expect("begin foreign");
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *foreign)
        .await
        .expect("take an xid");
    let appended = event();
    store
        .append(task, 1, Fence::Unleased, std::slice::from_ref(&appended))
        .await
        .expect("append");

    let (seen, checkpoint) = drain(&store, start, 10).await;
    assert!(
        seen.is_empty(),
        "the watermark is cluster-wide: the read waits"
    );

    foreign.commit().await.expect("commit foreign");
    let (seen, _) = read_at_least(&store, checkpoint, 10, 1).await;
    assert_eq!(ids(&seen), [appended.event_id]);
}

#[tokio::test]
async fn the_subscription_survives_its_listen_connection_being_killed() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let task = new_task(&store).await;
    let poll_interval = Duration::from_millis(300);
    let options = SubscriptionOptions {
        poll_interval,
        batch_size: 50,
    };
    let mut subscription = Subscription::start(store.clone(), Checkpoint::START, options).await;
    let first = subscription.next_batch().await.expect("task_submitted");
    assert_eq!(first.len(), 1);

    for (round, version) in (0..5).zip(1u32..) {
        // Kill every LISTEN connection on this database, then append while it is down.
        let killed: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND query ILIKE 'LISTEN%' AND pid <> pg_backend_pid()",
        )
        .fetch_all(db.pool())
        .await
        .expect("terminate");
        assert!(
            round > 0 || !killed.is_empty(),
            "the subscription must be listening"
        );

        let appended = event();
        store
            .append(
                task,
                version,
                Fence::Unleased,
                std::slice::from_ref(&appended),
            )
            .await
            .expect("append");
        let started = Instant::now();
        let batch = tokio::time::timeout(Duration::from_secs(5), subscription.next_batch())
            .await
            .expect("the event must arrive")
            .expect("read");
        assert_eq!(ids(&batch), [appended.event_id]);
        let waited = started.elapsed();
        // One poll interval, plus room for the cluster-wide read horizon: other tests'
        // transactions on the shared server hold the gap-safe read back for a moment.
        assert!(
            waited <= poll_interval * 2 + Duration::from_millis(1000),
            "round {round}: took {waited:?}, more than a poll interval and the horizon's slack"
        );
    }
}

#[tokio::test]
async fn the_subscription_wakes_on_notify_before_the_poll_interval() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let task = new_task(&store).await;
    // A poll interval far longer than the test: only the notification can wake it in time.
    let options = SubscriptionOptions {
        poll_interval: Duration::from_secs(30),
        batch_size: 50,
    };
    let mut subscription = Subscription::start(store.clone(), Checkpoint::START, options).await;
    subscription.next_batch().await.expect("task_submitted");

    let waiter = tokio::spawn(async move {
        let batch = subscription.next_batch().await.expect("read");
        (batch.len(), Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    store
        .append(task, 1, Fence::Unleased, &[event()])
        .await
        .expect("append");
    let appended_at = Instant::now();
    let (received, at) = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("woken by NOTIFY")
        .expect("join");
    assert_eq!(received, 1);
    assert!(at.duration_since(appended_at) < Duration::from_secs(2));
}

/// Several writers with random commit delays and ~10% rollbacks, racing on shared streams,
/// while a subscription with small batches follows the log: it must receive exactly the
/// committed events, each once, and every stream's versions in increasing order.
#[tokio::test]
async fn stress_the_reader_receives_exactly_the_committed_events() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        tasks.push(new_task(&store).await);
    }
    let options = SubscriptionOptions {
        poll_interval: Duration::from_millis(100),
        batch_size: 7,
    };
    let mut subscription = Subscription::start(store.clone(), Checkpoint::START, options).await;

    let writers: Vec<_> = (0..6)
        .map(|w| {
            let (store, pool, task) = (store.clone(), db.pool().clone(), tasks[w % tasks.len()]);
            tokio::spawn(async move {
                let mut committed = Vec::new();
                let deadline = Instant::now() + Duration::from_secs(4);
                while committed.len() < 40 && Instant::now() < deadline {
                    let (delay, roll_back) = {
                        let mut rng = rand::rng();
                        (rng.random_range(0..15), rng.random_bool(0.1))
                    };
                    let expected = store.stream_version(task).await.expect("version");
                    let mut tx = pool.begin().await.expect("begin");
                    let batch = [event(), event()];
                    match store
                        .append_in(&mut tx, task, expected, Fence::Unleased, &batch)
                        .await
                    {
                        Ok(_) => {}
                        Err(Error::Conflict { .. }) => continue,
                        Err(other) => panic!("unexpected {other:?}"),
                    }
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                    if roll_back {
                        tx.rollback().await.expect("rollback");
                    } else {
                        tx.commit().await.expect("commit");
                        committed.extend(batch.iter().map(|e| e.event_id));
                    }
                }
                committed
            })
        })
        .collect();

    let mut received: Vec<RecordedEvent> = Vec::new();
    let reader = async {
        loop {
            received.extend(subscription.next_batch().await.expect("read"));
        }
    };
    let mut committed = HashSet::new();
    let writers_done = async {
        for writer in writers {
            committed.extend(writer.await.expect("join"));
        }
    };
    tokio::select! {
        _ = reader => unreachable!("the reader loops forever"),
        _ = writers_done => {}
    }
    // Writers are done: let the reader catch up with what remains.
    let expected_total = committed.len() + tasks.len();
    let deadline = Instant::now() + Duration::from_secs(10);
    while received.len() < expected_total && Instant::now() < deadline {
        if let Ok(batch) =
            tokio::time::timeout(Duration::from_secs(1), subscription.next_batch()).await
        {
            received.extend(batch.expect("read"));
        }
    }

    let received_ids: Vec<Uuid> = received
        .iter()
        .filter(|e| !matches!(e.event, Event::TaskSubmitted { .. }))
        .map(|e| e.event_id)
        .collect();
    let unique: HashSet<Uuid> = received_ids.iter().copied().collect();
    assert_eq!(
        unique.len(),
        received_ids.len(),
        "an event was delivered twice"
    );
    assert_eq!(unique, committed, "delivered set must equal committed set");
    assert!(
        committed.len() > 100,
        "the stress run committed too little: {}",
        committed.len()
    );

    let mut last_version: HashMap<TaskId, u32> = HashMap::new();
    for e in &received {
        let last = last_version.entry(e.stream_id).or_insert(0);
        assert_eq!(
            e.version,
            *last + 1,
            "task {} versions out of order",
            e.stream_id
        );
        *last = e.version;
    }
}
