//! Waits anywhere, durably (issue 32): signals and sleeps park a task, holding no worker
//! slot; a signal is idempotent by its id, lands in the log before an item reads it, and
//! survives a SIGKILL of the worker that waited for it; a sleep's end is recorded once.
//! Plans sized by earlier results, typed outputs, and the per-try timeout, through the
//! storyboard example's own binary and the library.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use engine::prelude::*;
use engine::testing::TestDatabase;
use engine::{Event, Orchestrator, RecordedEvent};
use serde::{Deserialize, Serialize};

const STORYBOARD: &str = env!("CARGO_BIN_EXE_reel-storyboard-fixture");

fn storyboard(db: &TestDatabase) -> Command {
    let mut command = Command::new(STORYBOARD);
    command
        .env("DATABASE_URL", db.url())
        .env("REEL_LOG", "warn");
    command
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn cli(db: &TestDatabase, args: &[&str]) -> Run {
    let out = storyboard(db)
        .args(args)
        .output()
        .expect("run the storyboard binary");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn worker(db: &TestDatabase, artifacts: &std::path::Path, extra: &[&str]) -> Child {
    storyboard(db)
        .args(["worker", "--artifacts"])
        .arg(artifacts)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the storyboard worker")
}

async fn events(store: &PgStore, task: TaskId) -> Vec<RecordedEvent> {
    store.read_stream(task, 1).await.expect("read the stream")
}

fn count(events: &[RecordedEvent], event_type: &str) -> usize {
    events
        .iter()
        .filter(|e| e.event.event_type() == event_type)
        .count()
}

/// The must-show of issue 32: the example's `script` sizes `scenes`; the task waits for
/// `storyboard_approved` before the paid `render`; the worker is SIGKILLed while it
/// waits; `reel signal` (sent twice with one id) wakes it; a new worker finishes it after
/// the release sleep. No item runs twice, the signal is in the log once, and `replay`
/// shows the wait.
#[tokio::test]
async fn a_storyboard_waits_for_its_signal_through_a_sigkill() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let artifacts = tempfile::tempdir().expect("artifacts dir");
    let submitted = cli(
        &db,
        &[
            "submit",
            "--channel",
            "films",
            "--input",
            r#"{"topic": "Rome", "wait_seconds": 1}"#,
        ],
    );
    assert_eq!(submitted.code, 0, "{}", submitted.stderr);
    let task: TaskId = submitted.stdout.trim().parse().expect("a task id");

    let mut first = worker(&db, artifacts.path(), &[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let state = common::state(&store, task).await;
        if state.parked && state.status().as_str() == "awaiting_storyboard" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the task never parked on its storyboard: {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The task holds no lease while it waits: the worker is not running it.
    assert_eq!(common::lease_owner(&db, task).await, None);
    first.kill().expect("SIGKILL the worker");
    first.wait().expect("reap");

    let history = events(&store, task).await;
    let state = fold(&history);
    // `scenes` was sized by the script's output (2 + len("Rome") % 3 = 3 scenes).
    assert_eq!(state.step("script").and_then(|s| s.planned), Some(1));
    assert_eq!(state.step("scenes").and_then(|s| s.planned), Some(3));
    assert!(
        state.step("render").is_none(),
        "nothing paid before approval"
    );
    assert_eq!(count(&history, "wait_started"), 1);

    let sent = cli(
        &db,
        &[
            "signal",
            &task.to_string(),
            "storyboard_approved",
            "--data",
            r#"{"notes": "warmer light"}"#,
            "--id",
            "approval-1",
            "--actor",
            "alice",
        ],
    );
    assert_eq!(sent.code, 0, "{}", sent.stderr);
    assert!(sent.stdout.contains("due now"), "{}", sent.stdout);
    let again = cli(
        &db,
        &[
            "signal",
            &task.to_string(),
            "storyboard_approved",
            "--data",
            r#"{"notes": "something else"}"#,
            "--id",
            "approval-1",
        ],
    );
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(again.stdout.contains("nothing changed"), "{}", again.stdout);

    let mut second = worker(&db, artifacts.path(), &["--until-idle"]);
    common::wait_for_success(&mut second, Duration::from_secs(60)).await;

    let history = events(&store, task).await;
    let state = fold(&history);
    assert_eq!(state.status(), TaskStatus::COMPLETED, "{history:#?}");
    for step in &state.steps {
        assert!(
            step.duplicates.is_empty(),
            "{} ran an item twice",
            step.name
        );
        assert!(
            step.failures.is_empty(),
            "{}: {:?}",
            step.name,
            step.failures
        );
        assert!(step.superseded.is_empty());
    }
    assert_eq!(count(&history, "item_completed"), 1 + 3 + 1 + 3 + 1 + 1);
    // The paid renders ran once each, by the provider's own ledger.
    let ledger =
        std::fs::read_to_string(artifacts.path().join(task.to_string()).join("renders.log"))
            .expect("renders.log");
    let mut renders: Vec<&str> = ledger.lines().collect();
    renders.sort_unstable();
    assert_eq!(renders, ["render 1", "render 2", "render 3"]);
    // The signal is in the log once, with the first send's data and its sender.
    let signals: Vec<&Event> = history
        .iter()
        .map(|e| &e.event)
        .filter(|e| e.event_type() == "signal_received")
        .collect();
    assert_eq!(signals.len(), 1, "{signals:?}");
    let Event::SignalReceived {
        name,
        signal_id,
        data,
        by,
        ..
    } = signals[0]
    else {
        unreachable!()
    };
    assert_eq!(
        (name.as_str(), signal_id.as_str(), by.as_deref()),
        ("storyboard_approved", "approval-1", Some("cli:alice"))
    );
    assert_eq!(data["notes"], "warmer light");
    // The render read the approval; the release slept once, recorded once.
    let clip = std::fs::read_to_string(artifacts.path().join(task.to_string()).join("clip-01.txt"))
        .expect("clip 1");
    assert!(clip.contains("warmer light"), "{clip}");
    let sleeps: Vec<_> = state
        .step("release_window")
        .map(|s| s.waits.clone())
        .unwrap_or_default();
    assert_eq!(sleeps.len(), 1, "{sleeps:?}");
    assert_eq!(sleeps[0].sleep.as_deref(), Some("release"));

    let replay = cli(&db, &["replay", &task.to_string()]);
    assert_eq!(replay.code, 0, "{}", replay.stderr);
    assert!(
        replay
            .stdout
            .contains("waiting for signal storyboard_approved"),
        "{}",
        replay.stdout
    );
    assert!(
        replay.stdout.contains("until a signal comes"),
        "{}",
        replay.stdout
    );
    assert!(
        replay.stdout.contains("signal_received"),
        "{}",
        replay.stdout
    );
    assert!(
        replay.stdout.contains("sleep release until"),
        "{}",
        replay.stdout
    );
    let audit = cli(&db, &["audit", &task.to_string()]);
    assert_eq!(audit.code, 0, "{}{}", audit.stdout, audit.stderr);

    // A finished task takes no more signals.
    let late = cli(&db, &["signal", &task.to_string(), "storyboard_approved"]);
    assert_eq!(late.code, 1, "{}", late.stdout);
    assert!(late.stderr.contains("completed"), "{}", late.stderr);
    // Bad input is refused before anything is written.
    let bad = cli(&db, &["signal", &task.to_string(), "x", "--data", "{nope"]);
    assert_eq!(bad.code, 2, "{}", bad.stderr);
}

#[derive(Debug, Serialize, Deserialize)]
struct Go {
    go: bool,
}

/// A one-step approval workflow: `approve` waits for `go`, then `work` counts its runs.
fn gated(runs: Arc<AtomicU32>) -> Workflow {
    let mut workflow = Workflow::new("gated");
    let approval = workflow.add(Step::wait_for_signal::<Go>("approve", "go"));
    workflow.add(Step::call("work", move |ctx: StepContext| {
        let (runs, approval) = (runs.clone(), approval.clone());
        async move {
            let go = ctx.get(&approval)?;
            runs.fetch_add(1, Ordering::SeqCst);
            Ok(Output::of(go.go))
        }
    }));
    workflow
}

/// Sends `task` the signal `go` with `data`, idempotent by `id`, from nobody in particular.
async fn send_go(
    store: &PgStore,
    task: TaskId,
    id: &str,
    data: &serde_json::Value,
) -> engine::Result<engine::SignalSent> {
    engine::commands::signal(store, task, "go", id, data, None).await
}

/// A new task of [`gated`].
async fn gated_task(store: &PgStore) -> TaskId {
    store
        .create_task(NewTask::new(
            "gated",
            ChannelId::parse("gates").expect("channel"),
            serde_json::json!({}),
        ))
        .await
        .expect("submit")
        .task_id()
}

/// A worker (one slot) that runs until idle, within 30 s.
async fn until_idle(store: &PgStore, registry: &Registry) -> engine::WorkerReport {
    tokio::time::timeout(
        Duration::from_secs(30),
        Worker::new(store.clone(), registry.clone(), options(1)).run_until_idle(),
    )
    .await
    .expect("an until-idle worker is not kept by tasks waiting for a signal")
    .expect("worker")
}

fn quick() -> Workflow {
    Workflow::new("quick").step(Step::call("only", |_ctx: StepContext| async {
        Ok(Output::of("done"))
    }))
}

fn options(concurrency: usize) -> WorkerOptions {
    WorkerOptions {
        concurrency,
        poll_interval: Duration::from_millis(50),
        ..WorkerOptions::new("waits-test")
    }
}

/// With one worker slot, five tasks waiting for a signal and one that does not: the other
/// task runs (the waiting ones hold no slot), and a worker running until idle stops with
/// the five still waiting. A signal sent twice with one id is received once; each task
/// then finishes, its gated work run once.
#[tokio::test]
async fn waiting_tasks_hold_no_worker_slot_and_a_repeated_signal_changes_nothing() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let runs = Arc::new(AtomicU32::new(0));
    let registry = Registry::new()
        .register(gated(runs.clone()))
        .register(quick());
    let channel = ChannelId::parse("gates").expect("channel");
    let mut waiting = Vec::new();
    for _ in 0..5 {
        let task = gated_task(&store).await;
        waiting.push(task);
    }
    let other = store
        .create_task(NewTask::new(
            "quick",
            channel.clone(),
            serde_json::json!({}),
        ))
        .await
        .expect("submit")
        .task_id();

    let report = until_idle(&store, &registry).await;
    assert_eq!(report.waiting, 5, "{report:?}");
    assert_eq!(report.completed, 1, "{report:?}");
    assert_eq!(
        common::state(&store, other).await.status(),
        TaskStatus::COMPLETED
    );
    for task in &waiting {
        let state = common::state(&store, *task).await;
        assert!(state.parked, "{task} is not parked");
        assert_eq!(common::lease_owner(&db, *task).await, None);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0);

    // One signal id, sent twice with different data: the first stands.
    let first = engine::commands::signal(
        &store,
        waiting[0],
        "go",
        "once",
        &serde_json::json!({"go": true}),
        Some("cli:bob"),
    )
    .await
    .expect("signal");
    assert!(first.new && first.woke, "{first:?}");
    let repeated = send_go(
        &store,
        waiting[0],
        "once",
        &serde_json::json!({"go": false}),
    )
    .await
    .expect("signal again");
    assert!(!repeated.new && !repeated.woke, "{repeated:?}");
    for task in &waiting[1..] {
        send_go(&store, *task, "s", &serde_json::json!({"go": true}))
            .await
            .expect("signal");
    }
    let report = until_idle(&store, &registry).await;
    assert_eq!(report.completed, 5, "{report:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 5, "each gated work ran once");
    for task in &waiting {
        let history = events(&store, *task).await;
        assert_eq!(count(&history, "signal_received"), 1);
        assert_eq!(count(&history, "wait_started"), 1);
        let state = fold(&history);
        assert_eq!(state.status(), TaskStatus::COMPLETED);
        assert_eq!(
            state
                .step("work")
                .and_then(|s| s.items.get(&1))
                .and_then(|r| r.output.clone()),
            Some(serde_json::json!(true))
        );
    }
}

/// A signal sent before the task reaches its wait is read at the wait, without parking;
/// a signal to a task that does not exist, or with an empty name, is refused.
#[tokio::test]
async fn a_signal_sent_early_is_read_without_parking() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let runs = Arc::new(AtomicU32::new(0));
    let registry = Registry::new().register(gated(runs.clone()));
    let task = gated_task(&store).await;
    let sent = send_go(&store, task, "early", &serde_json::json!({"go": true}))
        .await
        .expect("signal");
    assert!(
        sent.new && !sent.woke,
        "a queued task is not parked: {sent:?}"
    );
    let report = until_idle(&store, &registry).await;
    assert_eq!((report.completed, report.waiting), (1, 0), "{report:?}");
    let history = events(&store, task).await;
    assert_eq!(count(&history, "wait_started"), 0);
    assert_eq!(count(&history, "task_parked"), 0);
    assert_eq!(count(&history, "signal_received"), 1);

    let missing = send_go(&store, TaskId::new(), "x", &serde_json::Value::Null)
        .await
        .expect_err("no such task");
    assert!(
        matches!(missing, engine::Error::TaskNotFound(_)),
        "{missing}"
    );
    let empty = engine::commands::signal(&store, task, " ", "x", &serde_json::Value::Null, None)
        .await
        .expect_err("an empty name");
    assert!(matches!(empty, engine::Error::InvalidInput(_)), "{empty}");
}

/// A sleep parks the task until its end, recorded once: a run before the end (a restart)
/// parks again until the same time, writing no second wait; after it, the task goes on.
#[tokio::test]
async fn a_sleep_ends_at_the_time_first_recorded() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let workflow = Workflow::new("sleepy")
        .step(Step::sleep("nap", Duration::from_secs(2)))
        .step(Step::call("after", |_ctx: StepContext| async {
            Ok(Output::of(1))
        }));
    let orchestrator = Orchestrator::new(store.clone(), Registry::new().register(workflow));
    let task = common::submit(&store, "sleepy").await;
    let RunOutcome::Waiting {
        until: Some(until),
        signals,
    } = common::run_once(&store, &orchestrator, task).await
    else {
        panic!("the task should wait for its sleep");
    };
    assert!(signals.is_empty());
    // A claim before the end: it parks again, until the same time, and records nothing new.
    sqlx::query("UPDATE tasks SET next_run_at = now() WHERE id = $1")
        .bind(task.as_uuid())
        .execute(store.pool())
        .await
        .expect("make it due early");
    let again = common::run_once(&store, &orchestrator, task).await;
    assert_eq!(
        again,
        RunOutcome::Waiting {
            until: Some(until),
            signals: Vec::new()
        }
    );
    assert_eq!(count(&events(&store, task).await, "wait_started"), 1);
    // Once the end has come, the sleep is over.
    tokio::time::sleep((until - store.now()).to_std().unwrap_or_default()).await;
    assert_eq!(
        common::run_once(&store, &orchestrator, task).await,
        RunOutcome::Completed
    );
    let state = common::state(&store, task).await;
    let woke: chrono::DateTime<chrono::Utc> = serde_json::from_value(
        state
            .step("nap")
            .and_then(|s| s.items[&1].output.clone())
            .expect("output"),
    )
    .expect("a time");
    assert!(woke >= until, "{woke} < {until}");
}

/// A try past its step's timeout is abandoned and recorded as a transient failure; the
/// next try runs.
#[tokio::test]
async fn a_try_past_its_timeout_is_a_transient_failure() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let tries = Arc::new(AtomicU32::new(0));
    let counted = tries.clone();
    let step = Step::fan_out(
        "slow",
        |_| Ok(1),
        move |ctx: StepContext, _item| {
            let first = counted.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                if first {
                    // Stops early when told to: the timeout fires the item's token.
                    ctx.cancel.cancelled().await;
                }
                Ok(Output::of(ctx.try_number))
            }
        },
    )
    .timeout(Duration::from_millis(200))
    .retry(common::fast_retry(2));
    let orchestrator = common::one_step(&store, "timed", step);
    let task = common::submit(&store, "timed").await;
    assert_eq!(
        common::run_once(&store, &orchestrator, task).await,
        RunOutcome::Completed
    );
    let state = common::state(&store, task).await;
    let slow = state.step("slow").expect("slow");
    assert_eq!(slow.failures.len(), 1, "{:?}", slow.failures);
    assert_eq!(slow.failures[0].kind, FailureKind::Transient);
    assert_eq!(slow.failures[0].error, "timed out after 200ms");
    assert_eq!(slow.items[&1].output, Some(serde_json::json!(2)));
}

/// A binary of your own (`reel::main`) shows and takes the engine's flags alone: the video
/// pipeline's are neither in its help nor accepted (exit 2, naming the flag), and its
/// submit puts nothing of the pipeline's in the input. The `reel` binary keeps them.
#[tokio::test]
async fn a_binary_of_your_own_has_only_the_engines_flags() {
    let db = TestDatabase::create().await;
    let video_flags = [
        "--topic",
        "--story-direction",
        "--fail",
        "--providers",
        "--provider",
        "--simulate",
        "--time-scale",
        "--job-timeout",
    ];
    let own_help = |sub: &str| cli(&db, &[sub, "--help"]).stdout;
    let reel_help = |sub: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_reel"))
            .args([sub, "--help"])
            .output()
            .expect("reel --help");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let flags = |help: &str| -> Vec<String> {
        help.lines()
            .filter_map(|l| l.trim_start().strip_prefix("--"))
            .filter_map(|l| l.split([' ', ',']).next())
            .map(|f| format!("--{f}"))
            .collect()
    };
    for sub in ["submit", "worker"] {
        let own = flags(&own_help(sub));
        let reel = flags(&reel_help(sub));
        for flag in video_flags {
            assert!(
                !own.contains(&flag.to_owned()),
                "{sub} shows {flag}: {own:?}"
            );
        }
        assert!(own.contains(&"--channel".to_owned()) || sub == "worker");
        assert!(own.contains(&"--concurrency".to_owned()) || sub == "submit");
        let video_here: Vec<&str> = video_flags
            .iter()
            .copied()
            .filter(|f| reel.contains(&(*f).to_owned()))
            .collect();
        assert!(
            !video_here.is_empty(),
            "reel {sub} lost its flags: {reel:?}"
        );
    }
    let refused = cli(&db, &["submit", "--channel", "films", "--topic", "Rome"]);
    assert_eq!(refused.code, 2, "{}", refused.stderr);
    assert!(refused.stderr.contains("--topic"), "{}", refused.stderr);
    let refused = cli(&db, &["worker", "--providers", "local", "--until-idle"]);
    assert_eq!(refused.code, 2, "{}", refused.stderr);

    let submitted = cli(
        &db,
        &[
            "submit",
            "--channel",
            "films",
            "--input",
            r#"{"topic": "Rome"}"#,
        ],
    );
    assert_eq!(submitted.code, 0, "{}", submitted.stderr);
    let task: TaskId = submitted.stdout.trim().parse().expect("id");
    let state = common::state(&db.store(), task).await;
    assert_eq!(state.input, serde_json::json!({"topic": "Rome"}));
}

/// docs/workflows.md: its flag table names `reel signal`'s flags, and its commands parse;
/// the README's own-workflow program is examples/own_binary.rs (which CI compiles).
#[test]
fn the_workflow_docs_match_the_binaries() {
    let root = env!("CARGO_MANIFEST_DIR");
    let docs = std::fs::read_to_string(format!("{root}/docs/workflows.md")).expect("docs");
    let reel = env!("CARGO_BIN_EXE_reel");
    let help = Command::new(reel)
        .args(["signal", "--help"])
        .output()
        .expect("help");
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let rows: Vec<&str> = docs.lines().filter(|l| l.starts_with("| `--")).collect();
    assert_eq!(rows.len(), 4, "the signal flag table");
    for row in rows {
        let flag = row[3..].split([' ', '`']).next().expect("a flag");
        assert!(help.contains(flag), "{flag} is documented but not a flag");
    }
    for line in docs.lines().filter(|l| l.starts_with("reel ")) {
        // As a shell reads it (the JSON is quoted), with the binary built here.
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("\"$REEL\" {} --help", &line["reel ".len()..]))
            .env("REEL", reel)
            .output()
            .expect("parse");
        assert!(
            out.status.success(),
            "{line}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let readme = std::fs::read_to_string(format!("{root}/README.md")).expect("README");
    let start = readme
        .find("```rust\nuse std::process::ExitCode;")
        .expect("the README's program");
    let block = &readme[start + "```rust\n".len()..];
    let block = &block[..block.find("```\n").expect("its end")];
    let example =
        std::fs::read_to_string(format!("{root}/examples/own_binary.rs")).expect("own_binary");
    let code = &example[example.find("use std::process::ExitCode;").expect("code")..];
    assert_eq!(
        block, code,
        "README's program and examples/own_binary.rs differ"
    );
}

/// A review that sends the waiting step back makes it wait for a new signal: the one it
/// already had, and one sent while the task was in review, are from before the redo. (The
/// first used to be read as present and absent at once, and the item ran again without
/// end; the second satisfied the redone wait.)
#[tokio::test]
async fn a_redone_step_waits_for_a_new_signal() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let runs = Arc::new(AtomicU32::new(0));
    let registry = Registry::new().register(gated(runs.clone()).review_gate());
    let task = gated_task(&store).await;
    let send = |id: &'static str, go: bool| {
        let store = store.clone();
        async move {
            engine::commands::signal(&store, task, "go", id, &serde_json::json!({"go": go}), None)
                .await
                .expect("signal")
        }
    };
    send("first", true).await;
    let report = until_idle(&store, &registry).await;
    assert_eq!(report.awaiting_review, 1, "{report:?}");
    // Sent while the task is in review, before the rejection: the earlier run's, although
    // no worker records it until after the rejection (the second review caught this).
    send("during_review", true).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    engine::commands::reject(&store, task, "approve", Some("again".into()))
        .await
        .expect("reject");
    let report = until_idle(&store, &registry).await;
    assert_eq!(report.waiting, 1, "{report:?}");
    let state = common::state(&store, task).await;
    assert!(state.parked);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the work waits for the new signal"
    );
    send("second", false).await;
    let report = until_idle(&store, &registry).await;
    assert_eq!(report.awaiting_review, 1, "{report:?}");
    let state = common::state(&store, task).await;
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert_eq!(
        state
            .step("work")
            .and_then(|s| s.items.get(&1))
            .and_then(|r| r.output.clone()),
        Some(serde_json::json!(false)),
        "the redo read the new signal's data"
    );
}

/// Review of issue 32: a signal sent after the parking run last read the inbox, but before
/// its park committed, found the task not parked (nothing to wake) — and the run, killed
/// or failing before it looked again, left the task parked until a signal that had come.
/// The park's own append now makes the task due when more signals were sent than the log
/// holds. Here the sender commits while the park waits for the task's row.
#[tokio::test]
async fn a_signal_sent_while_the_run_parks_wakes_the_task() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let (looked, mut looked_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let workflow = Workflow::new("racy").step(Step::call("approve", move |ctx: StepContext| {
        let looked = looked.clone();
        async move {
            let go = ctx.signal::<bool>("go");
            if go.is_err() {
                // Gives the test its moment: it takes the task's row before the park.
                let _ = looked.send(());
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Ok(Output::of(go?))
        }
    }));
    let registry = Registry::new().register(workflow);
    let orchestrator = Orchestrator::new(store.clone(), registry.clone());
    let task = common::submit(&store, "racy").await;
    let run = tokio::spawn({
        let store = store.clone();
        async move { common::run_once(&store, &orchestrator, task).await }
    });
    looked_rx
        .recv()
        .await
        .expect("the item looked for its signal");
    let mut sender = store.pool().begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE")
        .bind(task.as_uuid())
        .execute(&mut *sender)
        .await
        .expect("lock the row");
    // The run reads the inbox (empty) and its park now waits for the row.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!run.is_finished(), "the park should wait for the row");
    // What `send_signal` writes for a task that is not parked (yet): nothing to wake.
    sqlx::query(
        "INSERT INTO task_signals (task_id, name, signal_id, data) VALUES ($1, 'go', 'g', 'true')",
    )
    .bind(task.as_uuid())
    .execute(&mut *sender)
    .await
    .expect("insert");
    sqlx::query("UPDATE tasks SET signals_sent = signals_sent + 1 WHERE id = $1")
        .bind(task.as_uuid())
        .execute(&mut *sender)
        .await
        .expect("count");
    sender.commit().await.expect("commit");
    let outcome = run.await.expect("run");
    assert!(matches!(outcome, RunOutcome::Waiting { .. }), "{outcome:?}");
    let due: bool = sqlx::query_scalar("SELECT next_run_at <= now() FROM tasks WHERE id = $1")
        .bind(task.as_uuid())
        .fetch_one(store.pool())
        .await
        .expect("due");
    assert!(
        due,
        "the park left the task waiting for a signal that had come"
    );
    let report = until_idle(&store, &registry).await;
    assert_eq!(report.completed, 1, "{report:?}");
}

/// Review of issue 32: a signal whose data the step cannot read (sent with no data, say)
/// used to fail the task for good, and a corrected one could not help. It is passed over:
/// the task keeps waiting, and a corrected signal (a new id) is the one read.
#[tokio::test]
async fn a_signal_the_step_cannot_read_is_passed_over() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let runs = Arc::new(AtomicU32::new(0));
    let registry = Registry::new().register(gated(runs.clone()));
    let task = gated_task(&store).await;
    until_idle(&store, &registry).await;
    for (id, data) in [
        ("empty", serde_json::Value::Null),
        ("typo", serde_json::json!({"og": 1})),
    ] {
        engine::commands::signal(&store, task, "go", id, &data, None)
            .await
            .expect("signal");
    }
    let report = until_idle(&store, &registry).await;
    assert_eq!((report.waiting, report.failed), (1, 0), "{report:?}");
    let state = common::state(&store, task).await;
    assert_eq!(state.signals.len(), 2, "both are in the log");
    assert!(state.parked);
    send_go(&store, task, "fixed", &serde_json::json!({"go": true}))
        .await
        .expect("signal");
    let report = until_idle(&store, &registry).await;
    assert_eq!(report.completed, 1, "{report:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // Names and data the log could not show or store are refused.
    for (name, data) in [
        ("go\u{200b}", serde_json::Value::Null),
        ("a b", serde_json::Value::Null),
        ("go", serde_json::json!({"x": "\u{0}"})),
    ] {
        let task = common::submit(&store, "gated").await;
        let refused = engine::commands::signal(&store, task, name, "x", &data, None)
            .await
            .expect_err("refused");
        assert!(
            matches!(refused, engine::Error::InvalidInput(_)),
            "{refused}"
        );
    }
}

/// Review of issue 32: JSON nested deeper than the log can read back (serde_json stops at
/// 128 levels, and an event wraps a value in a few more) is refused where it comes in — a
/// signal's data, a task's input, an item's output — instead of breaking the task's
/// history for every later read.
#[tokio::test]
async fn json_the_log_could_not_read_back_is_refused() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let deep = |levels: usize| -> serde_json::Value {
        serde_json::from_str(&format!("{}{}", "[".repeat(levels), "]".repeat(levels)))
            .expect("json")
    };
    let fine = common::submit(&store, "gated").await;
    let refused = send_go(&store, fine, "deep", &deep(126))
        .await
        .expect_err("too deep");
    assert!(
        matches!(refused, engine::Error::InvalidInput(_)),
        "{refused}"
    );
    send_go(&store, fine, "ok", &deep(60))
        .await
        .expect("60 levels are fine");
    let input = serde_json::json!({ "x": deep(126) });
    let refused = store
        .create_task(NewTask::new(
            "gated",
            ChannelId::parse("c").expect("c"),
            input,
        ))
        .await
        .expect_err("too deep");
    assert!(
        matches!(refused, engine::Error::InvalidInput(_)),
        "{refused}"
    );
    let data = "[".repeat(126) + &"]".repeat(126);
    let cli_signal = cli(&db, &["signal", &fine.to_string(), "go", "--data", &data]);
    assert_eq!(cli_signal.code, 2, "{}", cli_signal.stderr);
    let input = format!(r#"{{"x": {data}}}"#);
    let cli_submit = cli(&db, &["submit", "--channel", "c", "--input", &input]);
    assert_eq!(cli_submit.code, 2, "{}", cli_submit.stderr);

    let step = Step::call("deep", |_ctx: StepContext| async {
        let value: serde_json::Value =
            serde_json::from_str(&format!("{}{}", "[".repeat(126), "]".repeat(126)))?;
        Ok(Output::of(value))
    })
    .retry(common::fast_retry(1));
    let orchestrator = common::one_step(&store, "deep", step);
    let task = common::submit(&store, "deep").await;
    let outcome = common::run_once(&store, &orchestrator, task).await;
    assert!(
        common::failure_reason(outcome).contains("deeper than 64 levels"),
        "the output is refused, permanently"
    );
    // The history still reads.
    let audit = cli(&db, &["audit", &task.to_string()]);
    assert_eq!(audit.code, 0, "{}{}", audit.stdout, audit.stderr);
}
