//! Retention and archival (issue 31), against a local directory and against a real S3 API
//! (moto's server): finished tasks' streams leave PostgreSQL and still replay and audit
//! byte for byte; SIGKILLs of the archiver leave every task whole in one place; a retry
//! racing the archiver runs the task once; a follower's unread events are never deleted.

#[path = "common/archive.rs"]
mod archive;

use std::collections::BTreeSet;
use std::time::Duration;

use archive::{Target, command, placement, reel, reel_ok, run_chores, submit_chores};
use engine::testing::TestDatabase;
use engine::{TaskId, TaskStatus};
use rand::Rng;

/// Each body runs against a directory and against S3.
macro_rules! both_targets {
    ($body:ident, $dir:ident, $s3:ident) => {
        #[tokio::test]
        async fn $dir() {
            $body(Target::directory()).await;
        }

        #[tokio::test]
        async fn $s3() {
            $body(Target::s3().await).await;
        }
    };
}

/// How many times each of a chores task's items 1 to 3 ran, over every attempt.
fn run_counts(runs: &archive::Runs, task: TaskId) -> [usize; 3] {
    let runs = runs.lock().expect("runs");
    let count = |item| {
        runs.iter()
            .filter(|(t, i, _)| *t == task && *i == item)
            .count()
    };
    [count(1), count(2), count(3)]
}

fn archive_json(db: &TestDatabase, target: &Target, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "archive",
        "--finished-before",
        "0s",
        "--to",
        &target.url,
        "--json",
    ];
    args.extend_from_slice(extra);
    serde_json::from_str(&reel_ok(db, target, &args)).expect("archive --json")
}

/// What a user sees of a task: `reel replay` and `reel audit --json`.
fn views(db: &TestDatabase, target: &Target, task: TaskId) -> (String, String) {
    let id = task.to_string();
    (
        reel_ok(db, target, &["replay", &id]),
        reel_ok(db, target, &["audit", &id, "--json", "--log-only"]),
    )
}

both_targets!(
    finished_tasks_leave_the_log_and_read_the_same,
    finished_tasks_leave_the_log_and_read_the_same_in_a_directory,
    finished_tasks_leave_the_log_and_read_the_same_in_s3
);

/// 1,000 finished tasks (completed, failed, cancelled) and 50 unfinished ones: after
/// `reel archive --finished-before 0s` the log holds only the unfinished ones' events; a
/// sample of 100 archived tasks replays and audits byte for byte as before; stats are
/// unchanged; 10 restored tasks are back whole and `reel audit --all` is clean; a retried
/// archived failed task resumes by replay and runs only what was missing.
async fn finished_tasks_leave_the_log_and_read_the_same(target: Target) {
    let db = TestDatabase::create().await;
    let store = db.store();
    let runs = archive::Runs::default();
    let mut finished = submit_chores(&store, "main", 980, 10).await;
    run_chores(&store, runs.clone()).await;
    for task in submit_chores(&store, "main", 20, 0).await {
        engine::commands::cancel(&store, task, Some("not needed".into()))
            .await
            .expect("cancel");
        finished.push(task);
    }
    let unfinished: BTreeSet<TaskId> = submit_chores(&store, "later", 50, 0)
        .await
        .into_iter()
        .collect();
    // Completed, failed (every 10th) and cancelled (the last 20) ones.
    let sample: Vec<TaskId> = finished[..980]
        .iter()
        .step_by(11)
        .chain(finished[990..].iter())
        .copied()
        .collect();
    assert_eq!(sample.len(), 100);
    let before: Vec<(String, String)> = sample.iter().map(|t| views(&db, &target, *t)).collect();
    let stats_before = reel_ok(&db, &target, &["stats", "--json"]);

    let run = archive_json(&db, &target, &[]);
    assert_eq!(run["archived"], 1000, "{run}");
    let in_log: BTreeSet<TaskId> = placement(&db)
        .await
        .into_iter()
        .filter(|(_, events, _, _)| *events > 0)
        .map(|(task, ..)| task)
        .collect();
    assert_eq!(in_log, unfinished, "only the unfinished tasks' events stay");

    for (task, (replay, audit)) in sample.iter().zip(&before) {
        let (replay_after, audit_after) = views(&db, &target, *task);
        assert_eq!(&replay_after, replay, "replay of {task}");
        assert_eq!(&audit_after, audit, "audit of {task}");
    }
    assert_eq!(reel_ok(&db, &target, &["stats", "--json"]), stats_before);
    // `reel tasks` still lists them, from their rows.
    let listed = reel_ok(
        &db,
        &target,
        &["tasks", "--channel", "main", "--limit", "0", "--json"],
    );
    assert_eq!(listed.matches("\"archived_at\"").count(), 1000);

    let restored: Vec<String> = sample[..10].iter().map(TaskId::to_string).collect();
    let mut args = vec!["restore"];
    args.extend(restored.iter().map(String::as_str));
    reel_ok(&db, &target, &args);
    for (task, (replay, audit)) in sample[..10].iter().zip(&before) {
        assert_eq!(
            &views(&db, &target, *task),
            &(replay.clone(), audit.clone())
        );
    }
    let placed = placement(&db).await;
    for task in &sample[..10] {
        let (_, events, version, location) =
            placed.iter().find(|(t, ..)| t == task).expect("placed");
        assert_eq!((*events, location), (i64::from(*version), &None));
    }
    let audit_all = reel_ok(&db, &target, &["audit", "--all", "--log-only"]);
    assert!(
        audit_all.contains("audited 60 tasks: 0 with broken invariants"),
        "{audit_all}"
    );

    // A failed task still archived: retry restores it, and the resume runs only item 2.
    let failed = finished[10];
    assert_eq!(
        store.task_status(failed).await.expect("status"),
        Some(TaskStatus::FAILED)
    );
    assert!(store.archive_location(failed).await.expect("row").is_some());
    reel_ok(&db, &target, &["retry", &failed.to_string()]);
    run_chores(&store, runs.clone()).await;
    assert_eq!(
        store.task_status(failed).await.expect("status"),
        Some(TaskStatus::COMPLETED)
    );
    assert_eq!(
        run_counts(&runs, failed),
        [1, 2, 1],
        "the resume ran only what was missing: item 2 again, nothing done twice"
    );
    // A completed archived task is not restored by a retry that could not apply.
    let completed = finished[1];
    let out = reel(&db, &target, &["retry", &completed.to_string()]);
    assert!(!out.status.success());
    assert!(
        store
            .archive_location(completed)
            .await
            .expect("row")
            .is_some()
    );
}

both_targets!(
    sigkills_of_the_archiver_leave_every_task_whole_in_one_place,
    sigkills_of_the_archiver_leave_every_task_whole_in_one_place_in_a_directory,
    sigkills_of_the_archiver_leave_every_task_whole_in_one_place_in_s3
);

/// Every task is either wholly in PostgreSQL or wholly archived (its object read back and
/// verified against its row; objects already in `verified` are not read again).
async fn check_whole_since(
    db: &TestDatabase,
    target: &Target,
    verified: &mut BTreeSet<TaskId>,
) -> usize {
    let mut archived = 0;
    for (task, events, version, location) in placement(db).await {
        match location {
            None => {
                assert_eq!(events, i64::from(version), "{task} is whole in the log");
                verified.remove(&task);
            }
            Some(location) => {
                assert_eq!(events, 0, "{task} is archived: none of its events stay");
                if verified.insert(task) {
                    let stream = reel::archive::Archive::read_with(&location, &target.env)
                        .await
                        .unwrap_or_else(|e| panic!("{task}: {e}"));
                    assert_eq!(stream.manifest.task, task);
                    assert_eq!(stream.events.len(), version as usize);
                }
                archived += 1;
            }
        }
    }
    archived
}

async fn check_whole(db: &TestDatabase, target: &Target) -> usize {
    check_whole_since(db, target, &mut BTreeSet::new()).await
}

/// SIGKILL of `reel archive` at random points, at least 10 times mid-run: after each,
/// every task is whole in one place; a rerun finishes the job.
async fn sigkills_of_the_archiver_leave_every_task_whole_in_one_place(target: Target) {
    let db = TestDatabase::create().await;
    let store = db.store();
    let total = 1500;
    submit_chores(&store, "main", total, 7).await;
    run_chores(&store, archive::Runs::default()).await;
    let mut kills = 0;
    let mut rounds = 0;
    let mut verified = BTreeSet::new();
    while kills < 10 {
        rounds += 1;
        assert!(
            rounds < 60,
            "the archiver finished too fast to be killed 10 times"
        );
        let mut child = command(
            &db,
            &target,
            &["archive", "--finished-before", "0s", "--to", &target.url],
        )
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start the archiver");
        let wait = rand::rng().random_range(30..250);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        if child.try_wait().expect("poll").is_none() {
            child.kill().expect("SIGKILL");
            kills += 1;
        }
        let _ = child.wait();
        check_whole_since(&db, &target, &mut verified).await;
    }
    let run = archive_json(&db, &target, &[]);
    assert_eq!(run["changed"], 0, "{run}");
    assert_eq!(
        check_whole(&db, &target).await,
        total,
        "all archived in the end"
    );
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(db.pool())
        .await
        .expect("count");
    assert_eq!(left, 0);
}

both_targets!(
    a_retry_racing_the_archiver_runs_the_task_once,
    a_retry_racing_the_archiver_runs_the_task_once_in_a_directory,
    a_retry_racing_the_archiver_runs_the_task_once_in_s3
);

/// `reel retry` of failed tasks racing `reel archive` of the same tasks: whichever wins,
/// both succeed, and each task's resume runs once (item 2, once), none is left archived.
async fn a_retry_racing_the_archiver_runs_the_task_once(target: Target) {
    let db = TestDatabase::create().await;
    let store = db.store();
    let runs = archive::Runs::default();
    let tasks = submit_chores(&store, "main", 40, 1).await;
    run_chores(&store, runs.clone()).await;
    for round in 0..2 {
        let mut archiver = command(
            &db,
            &target,
            &["archive", "--finished-before", "0s", "--to", &target.url],
        )
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("archiver");
        let mut retries = Vec::new();
        for task in tasks.iter().skip(round * 20).take(20) {
            tokio::time::sleep(Duration::from_millis(rand::rng().random_range(0..15))).await;
            retries.push(
                command(&db, &target, &["retry", &task.to_string()])
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .expect("retry"),
            );
        }
        for mut retry in retries {
            assert!(
                retry.wait().expect("retry").success(),
                "every retry succeeds"
            );
        }
        assert!(archiver.wait().expect("archiver").success());
    }
    run_chores(&store, runs.clone()).await;
    for task in &tasks {
        assert_eq!(
            store.task_status(*task).await.expect("status"),
            Some(TaskStatus::COMPLETED)
        );
        assert!(store.archive_location(*task).await.expect("row").is_none());
        assert_eq!(
            run_counts(&runs, *task),
            [1, 2, 1],
            "{task}: items 1 and 3 ran once, item 2 failed once and ran once more"
        );
        let audit = reel(&db, &target, &["audit", &task.to_string(), "--log-only"]);
        assert!(audit.status.success(), "{task} audits clean");
    }
}

both_targets!(
    a_followers_unread_events_are_never_deleted,
    a_followers_unread_events_are_never_deleted_in_a_directory,
    a_followers_unread_events_are_never_deleted_in_s3
);

/// With the projector's checkpoint behind (stopped at the start of the log), nothing is
/// archived; once it has read everything, all is; tasks that finished after it stopped
/// again stay.
async fn a_followers_unread_events_are_never_deleted(target: Target) {
    let db = TestDatabase::create().await;
    let store = db.store();
    submit_chores(&store, "main", 30, 0).await;
    run_chores(&store, archive::Runs::default()).await;
    store
        .load_checkpoint("notion-projector")
        .await
        .expect("a checkpoint at the start");
    let run = archive_json(&db, &target, &[]);
    assert_eq!(
        (run["archived"].as_u64(), run["follower_behind"].as_u64()),
        (Some(0), Some(30)),
        "{run}"
    );
    assert_eq!(run["followers"], serde_json::json!(["notion-projector"]));
    assert_eq!(check_whole(&db, &target).await, 0);

    store
        .checkpoint_at_head("notion-projector", false)
        .await
        .expect("the projector caught up");
    // A sync still to retry is a read still to come: that task stays too, until it is done.
    let pending: uuid::Uuid = sqlx::query_scalar("SELECT id FROM tasks LIMIT 1")
        .fetch_one(db.pool())
        .await
        .expect("a task");
    sqlx::query(
        "INSERT INTO sync_retries (projector, task_id, version, global_position, tries, due_at, error) \
         VALUES ('notion-projector', $1, 1, 1, 1, now(), '503')",
    )
    .bind(pending)
    .execute(db.pool())
    .await
    .expect("a pending retry");
    submit_chores(&store, "main", 10, 0).await;
    run_chores(&store, archive::Runs::default()).await;
    let run = archive_json(&db, &target, &[]);
    assert_eq!(
        (run["archived"].as_u64(), run["follower_behind"].as_u64()),
        (Some(29), Some(11)),
        "{run}"
    );
    assert_eq!(check_whole(&db, &target).await, 29);
    assert!(
        store
            .archive_location(TaskId::from(pending))
            .await
            .expect("row")
            .is_none()
    );
}

/// Two `reel archive` runs at once over the same tasks: both succeed, every task is
/// archived once and whole, and neither reports a corruption that is not there.
#[tokio::test]
async fn two_archivers_at_once_agree() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let target = Target::directory();
    submit_chores(&store, "main", 300, 5).await;
    run_chores(&store, archive::Runs::default()).await;
    let args = [
        "archive",
        "--finished-before",
        "0s",
        "--to",
        &target.url,
        "--json",
    ];
    let (a, b) = (
        command(&db, &target, &args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("a"),
        command(&db, &target, &args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("b"),
    );
    let mut archived = 0;
    for child in [a, b] {
        let out = child.wait_with_output().expect("archiver");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let run: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(run["changed"], 0, "{run}");
        archived += run["archived"].as_u64().expect("archived");
    }
    assert_eq!(archived, 300, "each task archived by one of them");
    assert_eq!(check_whole(&db, &target).await, 300);
}

/// An archived task on the console: its page reads the archive and says so, and Retry
/// restores it first. A submit repeating an archived task's idempotency key gets that
/// task back, not a second one.
#[tokio::test]
async fn archived_tasks_on_the_console_and_resubmitted_keys() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let target = Target::directory();
    let mut keyed = engine::NewTask::new(
        "chores",
        engine::ChannelId::parse("main").expect("channel"),
        serde_json::json!({"n": 3, "fail": true}),
    );
    keyed.idempotency_key = Some("order-17".into());
    let failed = store
        .create_task(keyed.clone())
        .await
        .expect("submit")
        .task_id();
    run_chores(&store, archive::Runs::default()).await;
    let before = reel_ok(&db, &target, &["replay", &failed.to_string()]);
    assert_eq!(archive_json(&db, &target, &[])["archived"], 1);

    let first_location = store
        .archive_location(failed)
        .await
        .expect("row")
        .expect("archived");
    keyed.id = TaskId::new();
    let again = store
        .create_task(keyed.clone())
        .await
        .expect("the same key again");
    keyed.id = TaskId::new();
    keyed.input = serde_json::json!({"n": 4});
    let refused = store.create_task(keyed).await;
    assert!(
        matches!(refused, Err(engine::Error::IdempotencyKeyReused { .. })),
        "the key with another input is refused, archived or not: {refused:?}"
    );
    assert_eq!(
        again.task_id(),
        failed,
        "the archived task is the one with that key"
    );
    assert_eq!(
        reel_ok(&db, &target, &["replay", &failed.to_string()]),
        before
    );

    let token = "archive-console-token-0123456789";
    let port = engine::testing::free_port().expect("port");
    let mut console = command(
        &db,
        &target,
        &[
            "console",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--token",
            token,
        ],
    )
    .stdout(std::process::Stdio::piped())
    .spawn()
    .expect("console");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(console.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("listening");
    let url = format!("http://127.0.0.1:{port}");
    let page = reqwest::get(format!("{url}/tasks/{failed}"))
        .await
        .expect("page")
        .text()
        .await
        .expect("body");
    assert!(page.contains("id=\"archived\""), "{page}");
    assert!(
        page.contains("work 2 failed"),
        "the timeline from the archive: {page}"
    );
    let retried = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
        .post(format!("{url}/tasks/{failed}/retry"))
        .bearer_auth(token)
        .header("X-Reel-Actor", "ops")
        .send()
        .await
        .expect("retry");
    let _ = console.kill();
    let _ = console.wait();
    assert_eq!(retried.status(), reqwest::StatusCode::SEE_OTHER);
    assert!(store.archive_location(failed).await.expect("row").is_none());
    assert_eq!(
        store.task_status(failed).await.expect("status"),
        Some(TaskStatus::QUEUED)
    );

    // Run and archived again: the newer history gets an object of its own. An archiver
    // still holding the older history (picked before the retry, stalled) would write to
    // the older name, never over the newer one.
    run_chores(&store, archive::Runs::default()).await;
    assert_eq!(archive_json(&db, &target, &[])["archived"], 1);
    let second_location = store
        .archive_location(failed)
        .await
        .expect("row")
        .expect("archived");
    assert_ne!(first_location, second_location);
    let older = reel::archive::Archive::read(&first_location)
        .await
        .expect("the older object");
    let newer = reel::archive::Archive::read(&second_location)
        .await
        .expect("the newer object");
    assert!(older.events.len() < newer.events.len());
    assert_eq!(
        newer.events.len() as i32,
        placement(&db)
            .await
            .into_iter()
            .find(|(t, ..)| *t == failed)
            .map(|(_, _, version, _)| version)
            .expect("row")
    );
}

/// `reel worker --retain AGE --archive-to URL` on two workers: one archives at a time (it
/// holds the lead), and when it is SIGKILLed the other takes over.
#[tokio::test]
async fn workers_retain_finished_tasks_one_leader_at_a_time() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let target = Target::directory();
    let artifacts = tempfile::tempdir().expect("tempdir");
    submit_chores(&store, "main", 20, 0).await;
    run_chores(&store, archive::Runs::default()).await;
    let worker = |id: &str| {
        command(
            &db,
            &target,
            &[
                "worker",
                "--worker-id",
                id,
                "--retain",
                "0s",
                "--archive-to",
                &target.url,
                "--archive-every",
                "1",
                "--artifacts",
                artifacts.path().to_str().expect("path"),
            ],
        )
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("worker")
    };
    let mut workers = vec![
        ("w1", archive::KillOnDrop(worker("w1"))),
        ("w2", archive::KillOnDrop(worker("w2"))),
    ];
    let archived_all = |expected: usize| {
        let db = &db;
        let target = &target;
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(40);
            while check_whole(db, target).await < expected {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the background archiver archived {expected} tasks"
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    archived_all(20).await;
    let leader: String =
        sqlx::query_scalar("SELECT holder FROM leader_leases WHERE name = 'reel-archiver'")
            .fetch_one(db.pool())
            .await
            .expect("a leader");
    let at = workers
        .iter()
        .position(|(id, _)| *id == leader)
        .expect("a worker leads");
    // Dropped: SIGKILLed.
    drop(workers.remove(at));

    submit_chores(&store, "main", 20, 0).await;
    run_chores(&store, archive::Runs::default()).await;
    archived_all(40).await;
    let now: String =
        sqlx::query_scalar("SELECT holder FROM leader_leases WHERE name = 'reel-archiver'")
            .fetch_one(db.pool())
            .await
            .expect("a leader");
    assert_ne!(now, leader, "the other worker took over");
}

/// docs/retention.md's flag tables name only flags `reel archive` or `reel worker` have,
/// with the env variables they read; its commands parse.
#[test]
fn the_documented_flags_are_the_archivers() {
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/retention.md"))
        .expect("docs/retention.md");
    let help = |command: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_reel"))
            .args([command, "--help"])
            .output()
            .expect("help");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let helps = format!("{}{}{}", help("archive"), help("worker"), help("restore"));
    let rows: Vec<&str> = docs.lines().filter(|l| l.starts_with("| `--")).collect();
    assert!(rows.len() >= 10, "the flag tables");
    for row in rows {
        let flag = row[3..].split([' ', '`']).next().expect("a flag");
        assert!(helps.contains(flag), "{flag} is documented but not a flag");
        for env in row.split('`').filter(|w| w.starts_with("REEL_")) {
            assert!(helps.contains(&format!("env: {env}")), "{env} for {flag}");
        }
    }
    for line in docs.lines().filter(|l| l.starts_with("reel ")) {
        let command = line.split('#').next().expect("command").trim();
        let words: Vec<&str> = command.split_whitespace().skip(1).collect();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_reel"))
            .args(&words)
            .arg("--help")
            .output()
            .expect("parse");
        assert!(
            out.status.success(),
            "{command}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// An archiver whose clock is two days ahead of the database's takes an age from the
/// database's clock: `--finished-before 1d` archives nothing that finished just now.
#[tokio::test]
async fn an_archiver_with_a_clock_ahead_goes_by_the_databases() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let target = Target::directory();
    submit_chores(&store, "main", 5, 0).await;
    run_chores(&store, archive::Runs::default()).await;
    let faketime = engine::testing::faketime();
    let out = command(
        &db,
        &target,
        &[
            "archive",
            "--finished-before",
            "1d",
            "--to",
            &target.url,
            "--json",
        ],
    )
    .env("LD_PRELOAD", faketime)
    .env("FAKETIME", "+2d")
    .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
    .output()
    .expect("archive");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(run["archived"], 0, "{run}");
    assert_eq!(check_whole(&db, &target).await, 0);
}
