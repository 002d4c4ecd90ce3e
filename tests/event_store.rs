//! The event store against a real PostgreSQL: optimistic concurrency, idempotent appends,
//! lease fencing, decoding errors, and task creation. Every test has its own database.

use engine::testing::TestDatabase;
use engine::{Created, Error, Event, Fence, NewEvent, NewTask, PgStore, TaskId, TaskStatus};
use serde_json::json;

fn channel() -> engine::ChannelId {
    engine::ChannelId::parse("history").expect("valid channel")
}

async fn new_task(store: &PgStore) -> TaskId {
    store
        .create_task(NewTask::new("video", channel(), json!({"topic": "Rome"})))
        .await
        .expect("create task")
        .task_id()
}

fn status(from: TaskStatus, to: TaskStatus) -> NewEvent {
    NewEvent::new(Event::status_changed(from, to))
}

async fn versions(store: &PgStore, task: TaskId) -> Vec<u32> {
    store
        .read_stream(task, 1)
        .await
        .expect("read")
        .iter()
        .map(|e| e.version)
        .collect()
}

#[tokio::test]
async fn create_task_writes_the_submitted_event_and_the_row() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let task = new_task(&store).await;

    let events = store.read_stream(task, 1).await.expect("read");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].version, 1);
    assert!(
        matches!(&events[0].event, Event::TaskSubmitted { workflow, .. } if workflow == "video")
    );
    let (status, version): (String, i32) =
        sqlx::query_as("SELECT status, version FROM tasks WHERE id = $1")
            .bind(task.as_uuid())
            .fetch_one(db.pool())
            .await
            .expect("row");
    assert_eq!((status.as_str(), version), ("queued", 1));
}

#[tokio::test]
async fn a_repeated_submit_with_the_same_key_returns_the_same_task() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let mut first = NewTask::new("video", channel(), json!({"topic": "Rome"}));
    first.idempotency_key = Some("req-42".into());
    let mut again = first.clone();
    again.id = TaskId::new();

    let created = store.create_task(first).await.expect("first submit");
    let repeated = store.create_task(again.clone()).await.expect("repeat");
    assert!(matches!(created, Created::New(_)));
    assert_eq!(repeated, Created::Existing(created.task_id()));

    again.input = json!({"topic": "Carthage"});
    let err = store.create_task(again).await.expect_err("different input");
    assert!(
        matches!(err, Error::IdempotencyKeyReused { existing, .. } if existing == created.task_id())
    );
    let tasks: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(db.pool())
        .await
        .expect("count");
    assert_eq!(tasks, 1);
}

#[tokio::test]
async fn append_advances_the_version_and_the_derived_row() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let task = new_task(&store).await;

    let appended = store
        .append(
            task,
            1,
            Fence::Unleased,
            &[
                status(
                    TaskStatus::QUEUED,
                    TaskStatus::from_static("generating_assets"),
                ),
                status(
                    TaskStatus::from_static("generating_assets"),
                    TaskStatus::from_static("generating_composites"),
                ),
            ],
        )
        .await
        .expect("append");
    assert_eq!(appended.version, 3);
    assert_eq!(appended.positions.len(), 2);
    assert!(!appended.replayed);
    assert_eq!(versions(&store, task).await, [1, 2, 3]);
    let status: String = sqlx::query_scalar("SELECT status FROM tasks WHERE id = $1")
        .bind(task.as_uuid())
        .fetch_one(db.pool())
        .await
        .expect("row");
    assert_eq!(status, "generating_composites");
}

#[tokio::test]
async fn two_concurrent_appends_at_the_same_version_one_wins_one_conflicts() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let task = new_task(&store).await;

    // A holds its append open; B appends at the same expected version and must wait on
    // the task's row, then lose.
    let mut tx_a = db.pool().begin().await.expect("begin");
    store
        .append_in(
            &mut tx_a,
            task,
            1,
            Fence::Unleased,
            &[status(
                TaskStatus::QUEUED,
                TaskStatus::from_static("generating_assets"),
            )],
        )
        .await
        .expect("A appends");
    let store_b = store.clone();
    let b = tokio::spawn(async move {
        store_b
            .append(
                task,
                1,
                Fence::Unleased,
                &[status(TaskStatus::QUEUED, TaskStatus::CANCELLED)],
            )
            .await
    });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(!b.is_finished(), "B must wait for A's row lock");
    tx_a.commit().await.expect("commit A");

    let err = b.await.expect("join").expect_err("B must conflict");
    assert!(
        matches!(err, Error::Conflict { stream, expected: 1, actual: 2 } if stream == task),
        "{err:?}"
    );
    assert_eq!(versions(&store, task).await, [1, 2]);
}

#[tokio::test]
async fn racing_writers_leave_dense_versions() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let task = new_task(&store).await;

    let writers = (0..6).map(|_| {
        let store = store.clone();
        tokio::spawn(async move {
            let (mut wins, mut conflicts) = (0, 0);
            while wins < 10 {
                let expected = store.stream_version(task).await.expect("version");
                let event = status(TaskStatus::QUEUED, TaskStatus::QUEUED);
                match store
                    .append(task, expected, Fence::Unleased, &[event])
                    .await
                {
                    Ok(_) => wins += 1,
                    Err(Error::Conflict { .. }) => conflicts += 1,
                    Err(other) => panic!("unexpected {other:?}"),
                }
            }
            conflicts
        })
    });
    let mut conflicts = 0;
    for writer in writers.collect::<Vec<_>>() {
        conflicts += writer.await.expect("join");
    }
    assert_eq!(versions(&store, task).await, (1..=61).collect::<Vec<_>>());
    assert!(
        conflicts > 0,
        "six writers racing on one stream must have conflicted"
    );
}

#[tokio::test]
async fn reappending_the_same_event_ids_after_a_lost_ack_writes_nothing() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let task = new_task(&store).await;
    let batch = [
        status(
            TaskStatus::QUEUED,
            TaskStatus::from_static("generating_assets"),
        ),
        status(
            TaskStatus::from_static("generating_assets"),
            TaskStatus::from_static("generating_composites"),
        ),
    ];

    let first = store
        .append(task, 1, Fence::Unleased, &batch)
        .await
        .expect("first");
    let again = store
        .append(task, 1, Fence::Unleased, &batch)
        .await
        .expect("retry");
    assert_eq!(again.version, first.version);
    assert!(again.replayed);
    assert!(again.positions.is_empty());
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_id = $1")
        .bind(batch[0].event_id)
        .fetch_one(db.pool())
        .await
        .expect("count");
    assert_eq!(rows, 1);
    assert_eq!(versions(&store, task).await, [1, 2, 3]);

    // The same id at another position is not a replay: it is refused, and nothing is written.
    let err = store
        .append(task, 3, Fence::Unleased, &batch[..1])
        .await
        .expect_err("id reused at another position");
    assert!(
        matches!(err, Error::EventIdReused { event_id } if event_id == batch[0].event_id),
        "{err:?}"
    );
    assert_eq!(versions(&store, task).await, [1, 2, 3]);
}

#[tokio::test]
async fn an_append_with_a_stale_lease_epoch_is_fenced_off() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let task = new_task(&store).await;
    // Another worker claimed the task since this one took epoch 1.
    sqlx::query("UPDATE tasks SET lease_epoch = 2, lease_owner = 'worker-b' WHERE id = $1")
        .bind(task.as_uuid())
        .execute(db.pool())
        .await
        .expect("claim");

    let event = status(
        TaskStatus::QUEUED,
        TaskStatus::from_static("generating_assets"),
    );
    let err = store
        .append(
            task,
            1,
            Fence::Lease { epoch: 1 },
            std::slice::from_ref(&event),
        )
        .await
        .expect_err("stale epoch");
    assert!(
        matches!(err, Error::LeaseLost { task: t, epoch: 1 } if t == task),
        "{err:?}"
    );
    assert_eq!(versions(&store, task).await, [1]);

    store
        .append(task, 1, Fence::Lease { epoch: 2 }, &[event])
        .await
        .expect("the current epoch appends");
    assert_eq!(versions(&store, task).await, [1, 2]);
}

#[tokio::test]
async fn appending_to_a_missing_task_is_a_typed_error() {
    let db = TestDatabase::create().await;
    let missing = TaskId::new();
    let err = db
        .store()
        .append(
            missing,
            0,
            Fence::Unleased,
            &[status(TaskStatus::QUEUED, TaskStatus::QUEUED)],
        )
        .await
        .expect_err("no such task");
    assert!(matches!(err, Error::TaskNotFound(t) if t == missing));
    let err = db
        .store()
        .append(missing, 0, Fence::Unleased, &[])
        .await
        .expect_err("empty");
    assert!(matches!(err, Error::InvalidInput(_)));
}

#[tokio::test]
async fn unknown_event_types_and_schema_versions_are_decode_errors_with_their_position() {
    let db = TestDatabase::create().await;
    let store = db.store();
    for (event_type, schema_version) in [("task_exploded", 1_i16), ("status_changed", 9)] {
        let task = new_task(&store).await;
        let position: i64 = sqlx::query_scalar(
            "INSERT INTO events (stream_id, stream_version, event_id, event_type, schema_version, payload) \
             VALUES ($1, 2, gen_random_uuid(), $2, $3, '{\"from\": \"queued\", \"to\": \"failed\"}') \
             RETURNING global_position",
        )
        .bind(task.as_uuid())
        .bind(event_type)
        .bind(schema_version)
        .fetch_one(db.pool())
        .await
        .expect("insert corrupt event");

        let err = store
            .read_stream(task, 1)
            .await
            .expect_err("decode must fail");
        match err {
            Error::Decode {
                position: p,
                stream,
                version,
                event_type: t,
                schema_version: v,
                ..
            } => {
                assert_eq!((p, stream, version), (position, task, 2));
                assert_eq!((t.as_str(), v), (event_type, schema_version));
            }
            other => panic!("expected Decode, got {other:?}"),
        }
    }
}

/// A claim builds its `task_claimed` event in SQL (its epoch and attempt come from the
/// claim's own update): stored, it must be byte-for-byte what the engine's encoding gives,
/// and the `tasks` row must move with it.
#[tokio::test]
async fn a_claim_is_stored_as_its_event_encodes() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let task = new_task(&store).await;
    let mut version = 1;
    for (claim, attempt) in [(1, 1), (2, 2)] {
        let lease = match claim {
            1 => {
                store
                    .claim_task(task, "worker-a", std::time::Duration::from_secs(30))
                    .await
            }
            _ => {
                store
                    .claim_next(
                        "worker-b",
                        std::time::Duration::from_secs(30),
                        &[],
                        &["video".into()],
                    )
                    .await
            }
        }
        .expect("claim")
        .expect("claimable");
        if claim == 1 {
            // Let the second claim take over an expired lease.
            sqlx::query("UPDATE tasks SET lease_expires_at = now() - interval '1 s' WHERE id = $1")
                .bind(task.as_uuid())
                .execute(db.pool())
                .await
                .expect("expire");
        }
        version += 1;
        assert_eq!(lease.version, version);
        assert_eq!(lease.attempt, attempt);
        let expected_event = Event::TaskClaimed {
            worker_id: lease.worker_id.clone(),
            lease_epoch: lease.epoch,
            attempt,
        };
        let (event_type, payload) = expected_event.encode().expect("encode");
        let metadata = serde_json::to_value(engine::EventMetadata {
            correlation_id: Some(task.as_uuid()),
            worker_id: Some(lease.worker_id.clone()),
            attempt: Some(attempt),
            ..Default::default()
        })
        .expect("metadata");
        let row: (String, i16, serde_json::Value, serde_json::Value) = sqlx::query_as(
            "SELECT event_type, schema_version, payload, metadata FROM events \
             WHERE stream_id = $1 AND stream_version = $2",
        )
        .bind(task.as_uuid())
        .bind(version as i32)
        .fetch_one(db.pool())
        .await
        .expect("the claim's event");
        assert_eq!(
            row,
            (
                event_type.to_owned(),
                engine::FIRST_SCHEMA_VERSION,
                payload,
                metadata
            )
        );
        let stored = store.read_stream(task, version).await.expect("read");
        assert_eq!(stored[0].event, expected_event);
        let (row_version, row_attempt, epoch): (i32, i32, i64) =
            sqlx::query_as("SELECT version, attempt, lease_epoch FROM tasks WHERE id = $1")
                .bind(task.as_uuid())
                .fetch_one(db.pool())
                .await
                .expect("row");
        assert_eq!(
            (row_version as u32, row_attempt as u32, epoch),
            (version, attempt, lease.epoch)
        );
        // The lease fences the next append at the claim's version.
        store
            .append(
                task,
                lease.version,
                lease.fence(),
                &[NewEvent::new(Event::StepStarted {
                    step: "assets".into(),
                    attempt,
                    items: 1,
                    atomic: false,
                })],
            )
            .await
            .expect("append under the new lease");
        version += 1;
    }
}
