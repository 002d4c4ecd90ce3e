//! Workflows other than the video pipeline: their own step statuses, no review gate or a
//! review gate, typed input, and later steps reading earlier steps' outputs from the log —
//! through the worker API, and through the generic `reel` commands.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{claim, reel_cli, run_to_rest, state, submit};
use engine::prelude::*;
use engine::testing::TestDatabase;
use engine::{Event, Fence, NewEvent, Orchestrator};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Deserialize)]
struct Brief {
    sections: u32,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Section {
    item: u32,
    words: u32,
}

/// Sections, then a summary built from what the sections recorded. No review gate.
fn newsletter() -> Workflow {
    Workflow::new("newsletter")
        .input::<Brief>()
        .step(
            Step::fan_out(
                "sections",
                // Both closures get the input typed: no parsing by hand.
                |plan: &Plan<Brief>| Ok(plan.input.sections),
                |ctx: StepContext<Brief>, item| async move {
                    if item == 2 && ctx.attempt == 1 {
                        return Err(StepError::transient("writer timed out"));
                    }
                    Ok(ItemOutput::value(Section {
                        item,
                        words: 100 * item,
                    })?
                    .with_cost_micros(1_000))
                },
            )
            .status("writing_sections", "Writing Sections")
            .retry(RetryPolicy {
                max_tries: 1,
                backoff: Backoff::none(),
            }),
        )
        .step(
            Step::call("summary", |ctx: StepContext| async move {
                let sections: Vec<Section> = ctx.outputs("sections")?;
                let words: u32 = sections.iter().map(|s| s.words).sum();
                ItemOutput::value(json!({"sections": sections.len(), "words": words}))
            })
            .status("summarising", "Summarising"),
        )
        .task_retry(TaskRetryPolicy {
            max_attempts: 3,
            backoff: Backoff::none(),
        })
}

fn worker(store: &PgStore, registry: Registry) -> Worker {
    let options = WorkerOptions {
        poll_interval: Duration::from_millis(50),
        ..WorkerOptions::new("workflows-test")
    };
    Worker::new(store.clone(), registry, options)
}

#[tokio::test]
async fn a_workflow_of_its_own_ends_completed_and_reads_outputs_across_steps() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let channel = ChannelId::parse("letters").expect("channel");
    let task = store
        .create_task(NewTask::new("newsletter", channel, json!({"sections": 3})))
        .await
        .expect("submit")
        .task_id();

    let report = worker(&store, Registry::new().register(newsletter()))
        .run_until_idle()
        .await
        .expect("worker");
    let outcomes: Vec<_> = report.attempts.iter().map(|a| a.outcome.clone()).collect();
    assert!(
        matches!(
            outcomes.as_slice(),
            [
                Ok(RunOutcome::RetryScheduled { .. }),
                Ok(RunOutcome::Completed)
            ]
        ),
        "{outcomes:?}"
    );
    assert_eq!(report.completed, 1);

    let events = store.read_stream(task, 1).await.expect("read");
    let state = fold(&events);
    assert_eq!(state.status(), TaskStatus::COMPLETED);
    assert_eq!(state.status_display(), "Completed");
    assert_eq!(state.reviews_requested, 0, "no review gate");
    let summary = &state.step("summary").expect("summary").items[&1];
    assert_eq!(
        summary.output,
        Some(json!({"sections": 3, "words": 600})),
        "the summary read every section's output"
    );
    // Every completion carries its output; status changes carry the workflow's names.
    for event in &events {
        match &event.event {
            Event::ItemCompleted { output, .. } => assert!(output.is_some(), "{event:?}"),
            Event::StatusChanged { to, to_display, .. } if to.as_str() == "writing_sections" => {
                assert_eq!(to_display.as_deref(), Some("Writing Sections"));
            }
            _ => {}
        }
    }
    assert!(engine::audit::audit(task, &events).is_clean());

    // The generic CLI works on it from the log alone (the `reel` binary knows only `video`).
    let id = task.to_string();
    let replay = reel_cli(db.url(), &["replay", &id]);
    assert_eq!(replay.code, 0, "{}", replay.stderr);
    assert!(
        replay.stdout.contains("queued -> writing_sections"),
        "{}",
        replay.stdout
    );
    assert!(
        replay.stdout.contains("completed (Completed)"),
        "{}",
        replay.stdout
    );
    let audit = reel_cli(db.url(), &["audit", &id]);
    assert_eq!(audit.code, 0, "{}", audit.stdout);
    let listed = reel_cli(db.url(), &["tasks", "--json"]);
    assert_eq!(listed.code, 0, "{}", listed.stderr);
    let rows: serde_json::Value = serde_json::from_str(&listed.stdout).expect("json");
    assert_eq!(rows[0]["status"], "completed");
    assert_eq!(rows[0]["status_display"], "Completed");
    let approve = reel_cli(db.url(), &["approve", &id]);
    assert_eq!(approve.code, 1);
    assert!(
        approve.stderr.contains("nothing to approve"),
        "{}",
        approve.stderr
    );
}

#[tokio::test]
async fn a_task_while_running_shows_its_steps_display_name_in_reel_tasks() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let gate = Arc::new(tokio::sync::Notify::new());
    let entered = Arc::new(tokio::sync::Notify::new());
    let (wait, tell) = (gate.clone(), entered.clone());
    let workflow = Workflow::new("slow").step(
        Step::call("draft", move |_ctx: StepContext| {
            let (wait, tell) = (wait.clone(), tell.clone());
            async move {
                tell.notify_one();
                wait.notified().await;
                Ok(ItemOutput::default())
            }
        })
        .status("drafting", "Drafting the Piece"),
    );
    let task = submit(&store, "slow").await;
    let running = tokio::spawn(worker(&store, Registry::new().register(workflow)).run_until_idle());
    entered.notified().await;
    let listed = reel_cli(db.url(), &["tasks", "--json", "--status", "drafting"]);
    let rows: serde_json::Value = serde_json::from_str(&listed.stdout).expect("json");
    assert_eq!(rows[0]["id"], task.to_string());
    assert_eq!(rows[0]["status_display"], "Drafting the Piece");
    gate.notify_one();
    running.await.expect("join").expect("worker");
}

/// A review workflow whose second step is interrupted: a new orchestrator (nothing in
/// memory) resumes, and the step reads the first step's outputs from the log — values
/// that only the first attempt could have produced.
#[tokio::test]
async fn outputs_come_from_the_log_after_a_crash_and_resume() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let drafted = Arc::new(AtomicU32::new(0));
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let crash = CancellationToken::new();
    let build = |crash: CancellationToken| {
        let (drafted, seen) = (drafted.clone(), seen.clone());
        Workflow::new("reviewed")
            .input::<Brief>()
            .step(Step::fan_out(
                "draft",
                |plan: &Plan| Ok(plan.input["sections"].as_u64().unwrap_or(0) as u32),
                move |_ctx: StepContext, item| {
                    drafted.fetch_add(1, Ordering::SeqCst);
                    // Unique to this call: only the log can hand it to a later process.
                    let nonce = format!("{item}-{}", uuid::Uuid::new_v4());
                    async move { ItemOutput::value(nonce) }
                },
            ))
            .step(Step::call("edit", move |ctx: StepContext| {
                let (seen, crash) = (seen.clone(), crash.clone());
                async move {
                    let drafts: Vec<String> = ctx.outputs("draft")?;
                    if ctx.attempt == 1 {
                        // The process "dies" here: nothing after this is recorded.
                        crash.cancel();
                        std::future::pending::<()>().await;
                    }
                    seen.lock().expect("lock").extend(drafts.clone());
                    ItemOutput::value(drafts.join("+"))
                }
            }))
            .review_gate()
    };

    let task = store
        .create_task(NewTask::new(
            "reviewed",
            ChannelId::parse("history").expect("channel"),
            json!({"sections": 3}),
        ))
        .await
        .expect("submit")
        .task_id();
    let first = Orchestrator::new(
        store.clone(),
        Registry::new().register(build(crash.clone())),
    );
    let lease = claim(&store, task).await;
    let outcome = first.run(&lease, crash.clone()).await.expect("first run");
    assert_eq!(outcome, RunOutcome::Stopped);
    drop(first);

    let recorded: Vec<String> = fold(&store.read_stream(task, 1).await.expect("read"))
        .step("draft")
        .expect("draft")
        .items
        .values()
        .map(|r| serde_json::from_value(r.output.clone().expect("output")).expect("string"))
        .collect();
    assert_eq!(recorded.len(), 3);

    let second = Orchestrator::new(
        store.clone(),
        Registry::new().register(build(CancellationToken::new())),
    );
    let lease = claim(&store, task).await;
    assert_eq!(lease.attempt, 2);
    let outcome = second
        .run(&lease, CancellationToken::new())
        .await
        .expect("resume");
    assert_eq!(outcome, RunOutcome::AwaitingReview);
    assert_eq!(drafted.load(Ordering::SeqCst), 3, "drafts were not redone");
    assert_eq!(*seen.lock().expect("lock"), recorded);
    let state = fold(&store.read_stream(task, 1).await.expect("read"));
    assert_eq!(state.status(), TaskStatus::FINAL_REVIEW);
    assert_eq!(
        state.step("edit").expect("edit").items[&1].output,
        Some(json!(recorded.join("+")))
    );
    let approved = engine::commands::approve(&store, task, None)
        .await
        .expect("approve");
    assert_eq!(approved.status(), TaskStatus::COMPLETED);
}

/// A task whose input does not parse as the workflow's input type fails permanently with
/// the parse error when it runs (tools that do not know the workflow cannot refuse it).
#[tokio::test]
async fn input_that_does_not_parse_fails_the_task_permanently() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let task = store
        .create_task(NewTask::new(
            "newsletter",
            ChannelId::parse("letters").expect("channel"),
            json!({"sections": "three"}),
        ))
        .await
        .expect("submit")
        .task_id();
    let report = worker(&store, Registry::new().register(newsletter()))
        .run_until_idle()
        .await
        .expect("worker");
    assert_eq!(report.failed, 1);
    let state = fold(&store.read_stream(task, 1).await.expect("read"));
    assert_eq!(state.status(), TaskStatus::FAILED);
    let reason = state.failure.expect("reason");
    assert!(
        reason.starts_with("invalid input: invalid type"),
        "{reason}"
    );
    assert_eq!(state.attempt, 1, "not retried");
}

/// `reel submit` refuses input its workflow cannot parse: exit 2, one line, nothing stored.
#[tokio::test]
async fn reel_submit_refuses_input_the_workflow_cannot_parse() {
    let db = TestDatabase::create().await;
    for args in [
        &["submit", "--channel", "history"][..],
        &[
            "submit",
            "--channel",
            "history",
            "--input",
            r#"{"topic": 5}"#,
        ],
    ] {
        let run = reel_cli(db.url(), args);
        assert_eq!(run.code, 2, "{args:?}: {}", run.stderr);
        assert_eq!(run.stderr.trim().lines().count(), 1, "{}", run.stderr);
    }
    let run = reel_cli(db.url(), &["submit", "--channel", "x", "--input", "[1]"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains("must be a JSON object"),
        "{}",
        run.stderr
    );
    let run = reel_cli(db.url(), &["submit", "--channel", "history"]);
    assert!(
        run.stderr
            .contains("invalid input for workflow \"video\": missing field `topic`"),
        "{}",
        run.stderr
    );
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(db.pool())
        .await
        .expect("count");
    assert_eq!(stored, 0);
    let run = reel_cli(
        db.url(),
        &[
            "submit",
            "--channel",
            "history",
            "--input",
            r#"{"topic": "Rome"}"#,
        ],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
}

/// Three items of one step, one at a time; each records whether it could read the item
/// before it. Item 2 fails once on attempt 1 when `flaky`.
fn sequential(flaky: bool) -> Workflow {
    Workflow::new("seq")
        .step(
            Step::fan_out(
                "parts",
                |_| Ok(3),
                move |ctx: StepContext, item| async move {
                    if flaky && item == 2 && ctx.attempt == 1 {
                        return Err(StepError::transient("flaky"));
                    }
                    let saw_prev = item > 1 && ctx.outputs.record("parts", item - 1).is_some();
                    ItemOutput::value(json!({ "saw_prev": saw_prev }))
                },
            )
            .retry(RetryPolicy {
                max_tries: 1,
                backoff: Backoff::none(),
            }),
        )
        .task_retry(TaskRetryPolicy {
            max_attempts: 3,
            backoff: Backoff::none(),
        })
}

async fn saw_prev(store: &PgStore, task: TaskId) -> Vec<bool> {
    let s = state(store, task).await;
    let step = s.step("parts").expect("parts ran");
    step.items
        .values()
        .map(|r| r.output.as_ref().expect("output")["saw_prev"] == json!(true))
        .collect()
}

/// DESIGN: "a resumed task sees exactly what an uninterrupted one would": an item never
/// reads its own step's other items, resumed or not (found by review: a resumed run used
/// to see the items its first attempt completed).
#[tokio::test]
async fn a_resumed_item_sees_what_an_uninterrupted_one_would() {
    let db = TestDatabase::create().await;
    let store = db.store();

    let clean = Orchestrator::new(store.clone(), Registry::new().register(sequential(false)));
    let t1 = submit(&store, "seq").await;
    run_to_rest(&store, &clean, t1).await;

    let flaky = Orchestrator::new(store.clone(), Registry::new().register(sequential(true)));
    let t2 = submit(&store, "seq").await;
    run_to_rest(&store, &flaky, t2).await;

    let uninterrupted = saw_prev(&store, t1).await;
    let resumed = saw_prev(&store, t2).await;
    assert_eq!(
        uninterrupted, resumed,
        "item outputs differ between an uninterrupted and a resumed run"
    );
    assert_eq!(
        uninterrupted,
        [false, false, false],
        "a step reads earlier steps only"
    );
}

/// Step "a" returns `None` as its output (serialized: JSON null); step "b" reads it back as
/// `Option<u32>`. When `flaky`, b fails once on attempt 1 so that it reads after a resume.
fn null_output(flaky: bool) -> Workflow {
    Workflow::new("nulls")
        .step(Step::call("a", |_ctx: StepContext| async move {
            ItemOutput::value(Option::<u32>::None)
        }))
        .step(
            Step::call("b", move |ctx: StepContext| async move {
                if flaky && ctx.attempt == 1 {
                    return Err(StepError::transient("flaky"));
                }
                let seen: Option<u32> = ctx.output("a", 1)?;
                ItemOutput::value(json!({ "seen": seen }))
            })
            .retry(RetryPolicy {
                max_tries: 1,
                backoff: Backoff::none(),
            }),
        )
        .task_retry(TaskRetryPolicy {
            max_attempts: 3,
            backoff: Backoff::none(),
        })
}

/// A `null` output reads back as the value it was, from memory or from the log (found by
/// review: once folded it read as "no output" and the resumed run failed).
#[tokio::test]
async fn a_null_output_reads_back_the_same_after_a_resume() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let clean = Orchestrator::new(store.clone(), Registry::new().register(null_output(false)));
    let t1 = submit(&store, "nulls").await;
    let o1 = run_to_rest(&store, &clean, t1).await;
    let flaky = Orchestrator::new(store.clone(), Registry::new().register(null_output(true)));
    let t2 = submit(&store, "nulls").await;
    let o2 = run_to_rest(&store, &flaky, t2).await;
    assert_eq!(o1.last(), Some(&RunOutcome::Completed));
    assert_eq!(o2.last(), Some(&RunOutcome::Completed), "{o2:?}");
}

/// A workflow at version `version` whose one step records which version ran it.
fn versioned(version: u32, step: &str) -> Workflow {
    Workflow::new("deployed")
        .version(version)
        .step(Step::call(step, move |_ctx: StepContext| async move {
            ItemOutput::value(json!({ "ran_on": version }))
        }))
}

/// What version the task's one step recorded, if it ran.
async fn ran_on(store: &PgStore, task: TaskId) -> Option<u64> {
    store
        .read_stream(task, 1)
        .await
        .expect("read")
        .iter()
        .find_map(|e| match &e.event {
            Event::ItemCompleted { output, .. } => output.as_ref()?.get("ran_on")?.as_u64(),
            _ => None,
        })
}

/// Issue 28: a task runs on the workflow version it was submitted for. A worker that serves
/// only version 2 leaves a version-1 task alone (its until-idle run ends without it, the
/// task still queued, no claim in its log); a worker serving both runs each task on its
/// own version's code.
#[tokio::test]
async fn a_task_runs_only_on_the_version_it_was_submitted_for() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let mut old = NewTask::new(
        "deployed",
        ChannelId::parse("deploys").expect("channel"),
        json!({}),
    );
    old.workflow_version = Some(1);
    let old = store.create_task(old).await.expect("submit v1").task_id();
    let mut new = NewTask::new(
        "deployed",
        ChannelId::parse("deploys").expect("channel"),
        json!({}),
    );
    new.workflow_version = Some(2);
    let new = store.create_task(new).await.expect("submit v2").task_id();
    assert_eq!(state(&store, old).await.workflow_version, 1);
    assert_eq!(state(&store, new).await.workflow_version, 2);

    let report = worker(&store, Registry::new().register(versioned(2, "alpha")))
        .run_until_idle()
        .await
        .expect("v2 worker");
    assert_eq!(report.claimed, 1, "only the v2 task: {report:?}");
    assert_eq!(ran_on(&store, new).await, Some(2));
    assert_eq!(ran_on(&store, old).await, None);
    assert_eq!(state(&store, old).await.attempt, 0, "never claimed");
    assert_eq!(
        store.task_status(old).await.expect("status"),
        Some(TaskStatus::QUEUED)
    );

    let both = Registry::new()
        .register(versioned(1, "a"))
        .register(versioned(2, "alpha"));
    let report = worker(&store, both)
        .run_until_idle()
        .await
        .expect("v1+v2 worker");
    assert_eq!(report.claimed, 1, "{report:?}");
    assert_eq!(
        ran_on(&store, old).await,
        Some(1),
        "v1's code ran the v1 task"
    );
    let steps: Vec<String> = state(&store, old)
        .await
        .steps
        .iter()
        .map(|s| s.name.clone())
        .collect();
    assert_eq!(steps, ["a"]);
}

/// Workers starting together record the same new shape at once: each finds the shape
/// first recorded, and none sees a change. (The first version read the first shape in the
/// same statement as its insert, whose snapshot missed a row a concurrent worker had just
/// committed: "no rows returned", and the worker exited.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_starting_together_record_one_shape_without_failing() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let registry = Registry::new()
        .register(versioned(1, "a"))
        .register(versioned(2, "alpha"));
    for round in 0..5 {
        let starting: Vec<_> = (0..8)
            .map(|n| {
                let (store, registry) = (store.clone(), registry.clone());
                tokio::spawn(async move {
                    store
                        .record_workflow_versions(&registry, &format!("w{round}-{n}"))
                        .await
                })
            })
            .collect();
        for started in starting {
            let changes = started.await.expect("join").expect("recorded");
            assert!(changes.is_empty(), "{changes:?}");
        }
        sqlx::query("DELETE FROM workflow_versions")
            .execute(db.pool())
            .await
            .expect("start over");
    }
}

/// Review of issue 28: a task for version 0 (or past what the `tasks` row holds) is refused
/// at submit, naming the range; nothing is written. (Before: stored as version 0, which no
/// worker ever claims.)
#[tokio::test]
async fn a_task_for_version_0_is_refused() {
    let db = TestDatabase::create().await;
    let store = db.store();
    for version in [0, u32::MAX] {
        let mut task = NewTask::new(
            "deployed",
            ChannelId::parse("deploys").expect("channel"),
            json!({}),
        );
        task.workflow_version = Some(version);
        let err = store.create_task(task).await.expect_err("refused");
        assert!(matches!(err, engine::Error::InvalidInput(_)), "{err}");
        assert!(err.to_string().contains("workflow version"), "{err}");
    }
    let tasks: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(db.pool())
        .await
        .expect("count");
    assert_eq!(tasks, 0);
}

/// A v1 task of `deployed` whose step `a` completed two items (appended as a worker would).
async fn v1_task_with_history(store: &PgStore) -> TaskId {
    let mut task = NewTask::new(
        "deployed",
        ChannelId::parse("deploys").expect("channel"),
        json!({}),
    );
    task.workflow_version = Some(1);
    let task = store.create_task(task).await.expect("submit").task_id();
    let mut events = vec![Event::StepStarted {
        step: "a".into(),
        attempt: 1,
        items: 2,
        atomic: false,
    }];
    events.extend((1..=2).map(|item| Event::ItemCompleted {
        step: "a".into(),
        item,
        attempt: 1,
        artifact: format!("a/{item}"),
        cost_micros: 100,
        duration_ms: 1,
        output: Some(json!({ "item": item })),
    }));
    let batch: Vec<NewEvent> = events.into_iter().map(NewEvent::new).collect();
    store
        .append(task, 1, Fence::Unleased, &batch)
        .await
        .expect("history");
    task
}

fn two_steps(version: u32, first: &str) -> Workflow {
    Workflow::new("deployed")
        .version(version)
        .step(Step::fan_out(
            first,
            |_: &engine::Plan| Ok(2),
            |_ctx: StepContext, _item| async { ItemOutput::value("made") },
        ))
        .step(Step::call("b", |_ctx: StepContext| async {
            ItemOutput::value("b")
        }))
}

/// Issue 28: `reel upgrade`'s command refuses, writing nothing, when v2 does not accept v1,
/// when a step the task ran has no rule, and while a worker holds the task; with the rules
/// it records `task_upgraded` (schema version 2), moves the `tasks` row to v2 and the task's
/// provider slots to the step's new name, and the completed items read under it.
#[tokio::test]
async fn an_operator_upgrade_checks_the_rules_and_carries_the_history() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let task = v1_task_with_history(&store).await;
    sqlx::query("INSERT INTO provider_keys (key) VALUES ('k')")
        .execute(db.pool())
        .await
        .expect("key");
    sqlx::query(
        "INSERT INTO provider_slots (key, task_id, step, item, priority, granted, holder, expires_at) \
         VALUES ('k', $1, 'a', 3, now(), true, 'w', now() + interval '1 hour')",
    )
    .bind(task.as_uuid())
    .execute(db.pool())
    .await
    .expect("slot");
    let before = store.read_stream(task, 1).await.expect("read").len();
    let written = || async { store.read_stream(task, 1).await.expect("read").len() };

    let refusals = [
        (
            Registry::new().register(two_steps(2, "alpha")),
            ".accepts(1)",
        ),
        (
            Registry::new().register(two_steps(2, "alpha").accepts(1)),
            r#".renamed("a", NEW)"#,
        ),
        (
            Registry::new().register(two_steps(3, "alpha").accepts(1)),
            "this binary has v3 of it, not v2",
        ),
    ];
    for (registry, missing) in refusals {
        let err = engine::commands::upgrade(&store, &registry, task, 2)
            .await
            .expect_err("refused");
        assert!(
            matches!(err, engine::Error::UpgradeRefused { .. })
                && err.to_string().contains(missing),
            "{err}"
        );
        assert_eq!(written().await, before, "nothing written");
    }

    let rules = Registry::new().register(two_steps(2, "alpha").accepts(1).renamed("a", "alpha"));
    let lease = store
        .claim_next(
            "holder",
            Duration::from_secs(30),
            &[],
            &[WorkflowVersion::new("deployed", 1)],
        )
        .await
        .expect("claim")
        .expect("claimed");
    let err = engine::commands::upgrade(&store, &rules, task, 2)
        .await
        .expect_err("held");
    assert!(err.to_string().contains("lease"), "{err}");
    store.release_lease(&lease).await.expect("release");
    let held = written().await;

    let state = engine::commands::upgrade(&store, &rules, task, 2)
        .await
        .expect("upgraded");
    assert_eq!(written().await, held + 1);
    assert_eq!(state.workflow_version, 2);
    let alpha = state.step("alpha").expect("a is alpha now");
    assert_eq!(alpha.items.len(), 2);
    assert_eq!(alpha.key_name(), "a");
    assert!(state.step("a").is_none());
    assert_eq!(
        state.upgrades[0].by.as_deref(),
        Some("operator"),
        "{:?}",
        state.upgrades
    );
    let (row_version, schema, slot_step): (i32, i16, String) = sqlx::query_as(
        "SELECT t.workflow_version, e.schema_version, s.step FROM tasks t \
           JOIN events e ON e.stream_id = t.id AND e.event_type = 'task_upgraded' \
           JOIN provider_slots s ON s.task_id = t.id WHERE t.id = $1",
    )
    .bind(task.as_uuid())
    .fetch_one(db.pool())
    .await
    .expect("row");
    assert_eq!((row_version, schema, slot_step.as_str()), (2, 2, "alpha"));

    // A v2 worker runs what is left: `b` only (alpha's items are done).
    let report = worker(&store, rules)
        .run_until_idle()
        .await
        .expect("worker");
    assert_eq!(report.completed, 1, "{report:?}");
    let done = state_of(&store, task).await;
    assert_eq!(done.step("alpha").expect("alpha").items.len(), 2);
    assert_eq!(
        done.spent.items, 3,
        "two items of a, then b: nothing ran twice"
    );
}

async fn state_of(store: &PgStore, task: TaskId) -> TaskState {
    fold(&store.read_stream(task, 1).await.expect("read"))
}

/// Issue 28: a task of a version no live worker claims is stranded while a worker serving
/// another version runs; the worker's presence row goes when it stops. A worker that
/// accepts the version takes it over (upgrading it at its claim).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_no_live_worker_claims_is_stranded_until_one_accepts_it() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let task = v1_task_with_history(&store).await;
    let options = WorkerOptions {
        poll_interval: Duration::from_millis(50),
        heartbeat_interval: Duration::from_millis(200),
        ..WorkerOptions::new("v2-only")
    };
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(
        Worker::new(
            store.clone(),
            Registry::new().register(two_steps(2, "alpha")),
            options,
        )
        .run(shutdown.clone()),
    );
    let mut stranded = Vec::new();
    for _ in 0..100 {
        stranded = store.stranded().await.expect("stranded");
        let live: i64 = sqlx::query_scalar("SELECT count(*) FROM workers WHERE expires_at > now()")
            .fetch_one(db.pool())
            .await
            .expect("workers");
        if live == 1 && !stranded.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        stranded,
        [engine::Stranded {
            workflow: "deployed".into(),
            version: 1,
            tasks: 1
        }]
    );
    let listed = store.stranded_tasks(0).await.expect("list");
    assert_eq!(listed.iter().map(|t| t.id).collect::<Vec<_>>(), [task]);
    shutdown.cancel();
    running.await.expect("join").expect("worker");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM workers")
        .fetch_one(db.pool())
        .await
        .expect("workers");
    assert_eq!(rows, 0, "a worker that stops removes its presence");
    assert_eq!(
        state_of(&store, task).await.attempt,
        0,
        "the v2 worker never claimed it"
    );

    let accepting =
        Registry::new().register(two_steps(2, "alpha").accepts(1).renamed("a", "alpha"));
    let report = worker(&store, accepting)
        .run_until_idle()
        .await
        .expect("worker");
    assert_eq!(report.completed, 1, "{report:?}");
    let done = state_of(&store, task).await;
    assert_eq!(done.workflow_version, 2);
    assert_eq!(done.upgrades[0].by.as_deref(), Some("workflows-test"));
    assert_eq!(done.spent.items, 3);
    assert!(store.stranded().await.expect("stranded").is_empty());
}

/// Review of issue 28: workers recording two different shapes for one version at the same
/// moment agree on which came first: every worker of the other shape sees the change. (The
/// first version ordered by insert time, and two inserts racing each saw only their own.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_shapes_recorded_at_once_agree_on_the_first() {
    let db = TestDatabase::create().await;
    let store = db.store();
    for round in 0..5 {
        let starting: Vec<_> = (0..8)
            .map(|n| {
                let store = store.clone();
                let step = if n % 2 == 0 { "a" } else { "alpha" };
                let registry = Registry::new().register(versioned(1, step));
                tokio::spawn(async move {
                    let changes = store
                        .record_workflow_versions(&registry, &format!("w{round}-{n}"))
                        .await
                        .expect("recorded");
                    (step, changes.is_empty())
                })
            })
            .collect();
        let mut unchanged = std::collections::BTreeSet::new();
        let mut changed = std::collections::BTreeSet::new();
        for started in starting {
            let (step, same) = started.await.expect("join");
            if same {
                unchanged.insert(step);
            } else {
                changed.insert(step);
            }
        }
        assert_eq!(unchanged.len(), 1, "one shape is the first: {unchanged:?}");
        assert_eq!(
            changed.len(),
            1,
            "the other is seen as a change: {changed:?}"
        );
        assert!(unchanged.is_disjoint(&changed));
        sqlx::query("DELETE FROM workflow_versions")
            .execute(db.pool())
            .await
            .expect("start over");
    }
}

/// Review of issue 28: the claim's index by workflow version holds only tasks that may run
/// again (as the index it replaced did). Without the condition a claim walked every finished
/// task of a version before the first runnable one: 11 ms instead of 0.5 with 200,000
/// finished tasks (see the bench's claim rows).
#[tokio::test]
async fn the_claim_index_holds_only_tasks_that_may_run() {
    let db = TestDatabase::create().await;
    let definition: String =
        sqlx::query_scalar("SELECT pg_get_indexdef('tasks_workflow_version_due'::regclass)")
            .fetch_one(db.pool())
            .await
            .expect("the claim's index");
    assert!(
        definition.contains("(workflow, workflow_version, COALESCE(next_run_at, created_at))")
            && definition.contains("WHERE (status <> ALL")
            && ["final_review", "completed", "failed", "cancelled"]
                .iter()
                .all(|s| definition.contains(s)),
        "{definition}"
    );
}

/// Review of issue 28: a worker whose version accepts v1 but lacks a rule for a step the
/// task ran sets the task aside, saying which rule is missing (`reel tasks`' last error),
/// and the task counts as stranded although that worker claims its version. Once an
/// operator moves it by hand with the rule, it is due at once (no set-aside back-off) and a
/// worker runs it.
#[tokio::test]
async fn a_refused_upgrade_is_stranded_and_says_why_until_an_operator_moves_it() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let task = v1_task_with_history(&store).await;
    let forgot = Registry::new().register(two_steps(2, "alpha").accepts(1));
    let report = worker(&store, forgot)
        .run_until_idle()
        .await
        .expect("worker");
    assert_eq!(report.set_aside, 1, "{report:?}");
    let listed = store.stranded_tasks(0).await.expect("stranded");
    assert_eq!(listed.len(), 1);
    let error = listed[0].last_error.as_deref().unwrap_or_default();
    assert!(error.contains(r#".renamed("a", NEW)"#), "{error}");
    assert!(
        listed[0].next_run_at > Some(chrono::Utc::now()),
        "set aside for a while"
    );

    let rules = Registry::new().register(two_steps(2, "alpha").accepts(1).renamed("a", "alpha"));
    engine::commands::upgrade(&store, &rules, task, 2)
        .await
        .expect("upgraded by hand");
    let report = worker(&store, rules)
        .run_until_idle()
        .await
        .expect("worker");
    assert_eq!(report.completed, 1, "due at once: {report:?}");
    assert!(store.stranded().await.expect("stranded").is_empty());
    let done = state_of(&store, task).await;
    assert_eq!(done.spent.items, 3, "alpha's two items were not run again");
}

/// Review of issue 28: a step an upgrade removed is history: a review cannot send the task
/// back to it (that redid every step, the ones before it included).
#[tokio::test]
async fn a_review_cannot_redo_from_a_removed_step() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let task = v1_task_with_history(&store).await;
    let without_a = Workflow::new("deployed")
        .version(2)
        .step(Step::call("b", |_ctx: StepContext| async {
            ItemOutput::value("b")
        }))
        .accepts(1)
        .removed("a");
    let state = engine::commands::upgrade(&store, &Registry::new().register(without_a), task, 2)
        .await
        .expect("upgraded");
    assert_eq!(state.step("a").and_then(|s| s.removed_in), Some(2));
    assert_eq!(
        state.step("a").map(|s| s.items.len()),
        Some(2),
        "its history stays"
    );
    let err = engine::commands::reject(&store, task, "a", None)
        .await
        .expect_err("refused");
    assert!(matches!(err, engine::Error::UnknownStep { .. }), "{err}");
}
