//! Resume by replay, against a real PostgreSQL, counting real calls of the steps' code:
//! the seed's scenarios 1–4, atomic steps, permanent failures, backoff, review redo, cancel.

mod common;

use std::time::Duration;

use common::{Probe, claim, completions, run_to_rest, state, submit};
use engine::testing::TestDatabase;
use engine::{Event, FailureKind, Orchestrator, Registry, RunOutcome, TaskStatus, commands};
use tokio_util::sync::CancellationToken;

/// A transient failure at `step` item `item` on attempt 1: the retry runs exactly
/// `item..=planned` of that step, nothing before it, and every step ends complete once.
async fn resume_scenario(step: &str, item: u32, planned: u32) {
    let db = TestDatabase::create().await;
    let store = db.store();
    let probe = Probe::default();
    probe.fail(step, item, FailureKind::Transient, &[1]);
    let orchestrator = Orchestrator::new(store.clone(), Registry::new().register(probe.pipeline()));
    let task = submit(&store, "video").await;

    let outcomes = run_to_rest(&store, &orchestrator, task).await;
    assert!(
        matches!(outcomes[0], RunOutcome::RetryScheduled { .. }),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[1], RunOutcome::AwaitingReview);

    assert_eq!(probe.items_called(step, 1), (1..=item).collect::<Vec<_>>());
    assert_eq!(
        probe.items_called(step, 2),
        (item..=planned).collect::<Vec<_>>(),
        "the retry runs exactly the missing items"
    );
    for earlier in ["assets", "composites", "video", "narration", "sfx"] {
        if earlier == step {
            break;
        }
        assert!(
            probe.items_called(earlier, 2).is_empty(),
            "{earlier} must not run again"
        );
    }
    for (name, count) in [
        ("assets", 22),
        ("video", 18),
        ("narration", 18),
        ("sfx", 18),
        ("composites", 1),
        ("assembly", 1),
    ] {
        let done = completions(&store, task, name).await;
        assert_eq!(done.len(), count, "{name} completions");
        assert!(
            done.values().all(|n| *n == 1),
            "{name} has a duplicate completion: {done:?}"
        );
    }

    let events = store.read_stream(task, 1).await.expect("read");
    let audit = engine::audit::audit(task, &events);
    assert!(audit.is_clean(), "{:?}", audit.violations);
    assert_eq!(audit.items_skipped, state(&store, task).await.saved().items);
    let state = state(&store, task).await;
    assert_eq!(state.status(), TaskStatus::FINAL_REVIEW);
    let resume = &state.resumes[0];
    assert_eq!(resume.attempt, 2);
    assert_eq!(resume.skipped[step], (1..item).collect::<Vec<_>>());
    let skipped_cost: i64 = (1..item).map(|i| 1_000 * i64::from(i)).sum::<i64>();
    let earlier_cost = resume.saved.cost_micros - skipped_cost;
    assert!(
        earlier_cost >= 0,
        "savings include the skipped items of {step}"
    );
    assert_eq!(state.saved(), resume.saved);
}

#[tokio::test]
async fn scenario_1_assets_fail_at_12_and_the_retry_runs_12_to_22() {
    resume_scenario("assets", 12, 22).await;
}

#[tokio::test]
async fn scenario_2_video_fails_at_clip_7_and_the_retry_runs_7_to_18() {
    resume_scenario("video", 7, 18).await;
}

#[tokio::test]
async fn scenario_3_narration_fails_at_13_and_the_retry_runs_13_to_18() {
    resume_scenario("narration", 13, 18).await;
}

#[tokio::test]
async fn scenario_4_sfx_fails_at_9_and_the_retry_runs_9_to_18() {
    resume_scenario("sfx", 9, 18).await;
}

#[tokio::test]
async fn a_failed_atomic_step_runs_again_whole() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let probe = Probe::default();
    probe.fail("composites", 1, FailureKind::Transient, &[1]);
    let orchestrator = Orchestrator::new(store.clone(), Registry::new().register(probe.pipeline()));
    let task = submit(&store, "video").await;

    let outcomes = run_to_rest(&store, &orchestrator, task).await;
    assert_eq!(outcomes.last(), Some(&RunOutcome::AwaitingReview));
    assert_eq!(probe.items_called("composites", 1), [1]);
    assert_eq!(probe.items_called("composites", 2), [1]);
    assert!(probe.items_called("assets", 2).is_empty());
    assert_eq!(
        completions(&store, task, "composites").await.get(&1),
        Some(&1)
    );
}

#[tokio::test]
async fn a_permanent_error_fails_the_task_with_its_reason_and_no_retry() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let probe = Probe::default();
    probe.fail("video", 4, FailureKind::Permanent, &[]);
    let orchestrator = Orchestrator::new(store.clone(), Registry::new().register(probe.pipeline()));
    let task = submit(&store, "video").await;

    let outcomes = run_to_rest(&store, &orchestrator, task).await;
    assert_eq!(outcomes.len(), 1);
    let RunOutcome::Failed { reason } = &outcomes[0] else {
        panic!("{outcomes:?}")
    };
    assert!(
        reason.contains("video item 4") && reason.contains("injected failure"),
        "{reason}"
    );
    assert_eq!(
        probe.call_count("video", 4),
        1,
        "a permanent error is not retried"
    );
    let state = state(&store, task).await;
    assert_eq!(state.status(), TaskStatus::FAILED);
    assert_eq!(state.failure.as_deref(), Some(reason.as_str()));
    assert!(state.retries.is_empty());
    let failure = &state.step("video").expect("video").failures[0];
    assert_eq!((failure.item, failure.kind), (4, FailureKind::Permanent));
    let (status, last_error): (String, Option<String>) =
        sqlx::query_as("SELECT status, last_error FROM tasks WHERE id = $1")
            .bind(task.as_uuid())
            .fetch_one(db.pool())
            .await
            .expect("row");
    assert_eq!(
        (status.as_str(), last_error.as_deref()),
        ("failed", Some(reason.as_str()))
    );
    assert!(
        store
            .claim_task(task, "w", Duration::from_secs(5))
            .await
            .expect("claim")
            .is_none()
    );
}

#[tokio::test]
async fn a_transient_error_is_retried_with_growing_backoff_then_rescheduled() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let probe = Probe::default();
    probe.fail("assets", 3, FailureKind::Transient, &[]);
    let policy = engine::RetryPolicy {
        max_tries: 4,
        backoff: engine::Backoff {
            initial: Duration::from_millis(40),
            multiplier: 2.0,
            max: Duration::from_secs(1),
            jitter: 0.0,
        },
    };
    let workflow = engine::Workflow::new("video")
        .step(
            probe
                .items("assets", TaskStatus::from_static("generating_assets"), 5)
                .retry(policy),
        )
        .review_gate()
        .task_retry(engine::TaskRetryPolicy {
            max_attempts: 2,
            backoff: engine::Backoff {
                initial: Duration::from_secs(600),
                multiplier: 2.0,
                max: Duration::from_secs(3600),
                jitter: 0.0,
            },
        });
    let orchestrator = Orchestrator::new(store.clone(), Registry::new().register(workflow));
    let task = submit(&store, "video").await;

    let lease = claim(&store, task).await;
    let outcome = orchestrator
        .run(&lease, CancellationToken::new())
        .await
        .expect("run");
    let RunOutcome::RetryScheduled { next_run_at } = outcome else {
        panic!("{outcome:?}")
    };
    let wait = next_run_at - chrono::Utc::now();
    assert!(
        wait > chrono::Duration::seconds(590),
        "rescheduled per the task policy: {wait}"
    );

    let failures: Vec<_> = store
        .read_stream(task, 1)
        .await
        .expect("read")
        .into_iter()
        .filter(|e| matches!(e.event, Event::ItemFailed { .. }))
        .collect();
    assert_eq!(failures.len(), 4, "four tries, each recorded");
    let gaps: Vec<i64> = failures
        .windows(2)
        .map(|w| (w[1].recorded_at - w[0].recorded_at).num_milliseconds())
        .collect();
    assert!(
        gaps[0] >= 40 && gaps[1] >= 80 && gaps[2] >= 160,
        "backoff must grow: {gaps:?}"
    );
    assert!(
        store
            .claim_task(task, "w", Duration::from_secs(5))
            .await
            .expect("claim")
            .is_none(),
        "not due yet"
    );
    let row: (
        String,
        Option<chrono::DateTime<chrono::Utc>>,
        Option<String>,
    ) = sqlx::query_as("SELECT status, next_run_at, lease_owner FROM tasks WHERE id = $1")
        .bind(task.as_uuid())
        .fetch_one(db.pool())
        .await
        .expect("row");
    assert_eq!(row.0, "retry_scheduled");
    assert!(
        row.1
            .is_some_and(|t| (t - next_run_at).num_milliseconds().abs() <= 1),
        "tasks.next_run_at mirrors the event"
    );
    assert_eq!(row.2, None, "the lease is released");
}

#[tokio::test]
async fn the_task_fails_when_its_attempts_are_spent() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let probe = Probe::default();
    probe.fail("video", 2, FailureKind::Transient, &[]);
    let orchestrator = Orchestrator::new(store.clone(), Registry::new().register(probe.pipeline()));
    let task = submit(&store, "video").await;

    let outcomes = run_to_rest(&store, &orchestrator, task).await;
    assert_eq!(outcomes.len(), 3, "three attempts: {outcomes:?}");
    let RunOutcome::Failed { reason } = outcomes.last().expect("outcome") else {
        panic!("{outcomes:?}")
    };
    assert!(reason.starts_with("gave up after 3 attempts"), "{reason}");
    assert_eq!(
        probe.call_count("video", 1),
        1,
        "clip 1 ran once over three attempts"
    );
}

#[tokio::test]
async fn approve_completes_and_reject_redoes_exactly_the_steps_from_there_on() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let probe = Probe::default();
    let workflow = probe.pipeline();
    let orchestrator = Orchestrator::new(store.clone(), Registry::new().register(workflow.clone()));
    let task = submit(&store, "video").await;
    assert_eq!(
        run_to_rest(&store, &orchestrator, task).await,
        [RunOutcome::AwaitingReview]
    );

    let rejected = commands::reject(&store, task, "narration", Some("voice too fast".into()))
        .await
        .expect("reject");
    assert_eq!(rejected.status(), TaskStatus::QUEUED);
    assert_eq!(
        run_to_rest(&store, &orchestrator, task).await,
        [RunOutcome::AwaitingReview]
    );

    for kept in ["assets", "composites", "video"] {
        assert!(
            probe.items_called(kept, 2).is_empty(),
            "{kept} must be kept"
        );
    }
    assert_eq!(
        probe.items_called("narration", 2),
        (1..=18).collect::<Vec<_>>()
    );
    assert_eq!(probe.items_called("sfx", 2), (1..=18).collect::<Vec<_>>());
    assert_eq!(probe.items_called("assembly", 2), [1]);
    let state = state(&store, task).await;
    assert_eq!(state.step("narration").expect("narration").run, 2);
    assert_eq!(
        state.step("narration").expect("narration").superseded.len(),
        18
    );
    assert_eq!(state.step("video").expect("video").run, 1);

    let err = commands::reject(&store, task, "music", None)
        .await
        .expect_err("unknown step");
    assert!(matches!(err, engine::Error::UnknownStep { .. }), "{err:?}");
    let approved = commands::approve(&store, task, Some("ana".into()))
        .await
        .expect("approve");
    assert_eq!(approved.status(), TaskStatus::COMPLETED);
    let events = store.read_stream(task, 1).await.expect("read");
    let audit = engine::audit::audit(task, &events);
    assert!(
        audit.is_clean(),
        "a rejected-and-redone history is sound: {:?}",
        audit.violations
    );
    let err = commands::approve(&store, task, None)
        .await
        .expect_err("already completed");
    assert!(
        matches!(
            err,
            engine::Error::InvalidState {
                status: TaskStatus::COMPLETED,
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn cancel_takes_effect_at_the_next_item_boundary() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let probe = Probe::default();
    let canceller = store.clone();
    let task_cell = std::sync::Arc::new(std::sync::OnceLock::new());
    let cell = task_cell.clone();
    let counted = probe.clone();
    // The operator cancels while clip 3 is being generated.
    let video = engine::Step::fan_out(
        "video",
        |_| Ok(18),
        move |ctx: engine::StepContext, item| {
            let (store, task, probe) = (
                canceller.clone(),
                *cell.get().expect("task id"),
                counted.clone(),
            );
            async move {
                probe
                    .calls
                    .lock()
                    .expect("probe lock")
                    .push(("video".into(), item, ctx.attempt));
                if item == 3 {
                    commands::cancel(&store, task, Some("topic dropped".into()))
                        .await
                        .expect("cancel");
                }
                Ok(engine::ItemOutput::new(format!("clip-{item}"), 1))
            }
        },
    );
    let workflow = engine::Workflow::new("video").step(video).review_gate();
    let orchestrator = Orchestrator::new(store.clone(), Registry::new().register(workflow));
    let task = submit(&store, "video").await;
    task_cell.set(task).expect("set once");

    let lease = claim(&store, task).await;
    let outcome = orchestrator
        .run(&lease, CancellationToken::new())
        .await
        .expect("run");
    assert_eq!(outcome, RunOutcome::Cancelled);
    assert_eq!(
        probe.items_called("video", 1),
        [1, 2, 3],
        "no item starts after the cancel"
    );
    let events = store.read_stream(task, 1).await.expect("read");
    let audit = engine::audit::audit(task, &events);
    assert!(audit.is_clean(), "{:?}", audit.violations);
    let state = state(&store, task).await;
    assert_eq!(state.status(), TaskStatus::CANCELLED);
    assert_eq!(
        completions(&store, task, "video").await.len(),
        2,
        "clip 3 finished after the cancel: not recorded"
    );
}

/// A pipelined step's next item may start before the run learns of a cancel from its
/// append (see `Step::pipelined`): the run still ends cancelled, and nothing is recorded
/// after the cancel.
#[tokio::test]
async fn a_cancel_during_a_pipelined_step_stops_the_run_and_nothing_follows_it() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let probe = Probe::default();
    let canceller = store.clone();
    let task_cell = std::sync::Arc::new(std::sync::OnceLock::new());
    let cell = task_cell.clone();
    let counted = probe.clone();
    let video = engine::Step::fan_out(
        "video",
        |_| Ok(18),
        move |ctx: engine::StepContext, item| {
            let (store, task, probe) = (
                canceller.clone(),
                *cell.get().expect("task id"),
                counted.clone(),
            );
            async move {
                probe
                    .calls
                    .lock()
                    .expect("probe lock")
                    .push(("video".into(), item, ctx.attempt));
                if item == 3 {
                    commands::cancel(&store, task, Some("topic dropped".into()))
                        .await
                        .expect("cancel");
                }
                Ok(engine::ItemOutput::new(format!("clip-{item}"), 1))
            }
        },
    )
    .pipelined();
    let workflow = engine::Workflow::new("video").step(video).review_gate();
    let orchestrator = Orchestrator::new(store.clone(), Registry::new().register(workflow));
    let task = submit(&store, "video").await;
    task_cell.set(task).expect("set once");

    let lease = claim(&store, task).await;
    let outcome = orchestrator
        .run(&lease, CancellationToken::new())
        .await
        .expect("run");
    assert_eq!(outcome, RunOutcome::Cancelled);
    assert_eq!(probe.items_called("video", 1)[..3], [1, 2, 3]);
    let events = store.read_stream(task, 1).await.expect("read");
    let audit = engine::audit::audit(task, &events);
    assert!(audit.is_clean(), "{:?}", audit.violations);
    let cancelled_at = events
        .iter()
        .position(|e| matches!(e.event, Event::TaskCancelled { .. }))
        .expect("the cancel is recorded");
    assert!(
        events[cancelled_at + 1..]
            .iter()
            .all(|e| matches!(e.event, Event::StatusChanged { .. })),
        "nothing but the cancel's status change follows it: {:?}",
        &events[cancelled_at..]
    );
    assert!(completions(&store, task, "video").await.len() <= 2);
    assert_eq!(state(&store, task).await.status(), TaskStatus::CANCELLED);
}
