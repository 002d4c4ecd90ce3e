//! The `reel` binary end to end against a real PostgreSQL: seed scenario 9, a permanent
//! failure visible in `reel tasks`, a rejected review, and every error path.

use std::collections::HashMap;
use std::process::Command;

use engine::testing::TestDatabase;
use engine::{Event, TaskId};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn reel(db: &TestDatabase, artifacts: &std::path::Path, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_reel"))
        .args(args)
        .env("DATABASE_URL", db.url())
        .env("REEL_ARTIFACTS", artifacts)
        .env("REEL_TIME_SCALE", "0.00005")
        .env("REEL_LOG", "warn")
        .output()
        .expect("run reel");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn ok(run: Run) -> String {
    assert_eq!(run.code, 0, "stderr: {}", run.stderr);
    run.stdout.trim().to_owned()
}

/// (step, item) → the attempts on which it completed.
async fn completions(db: &TestDatabase, task: TaskId) -> HashMap<(String, u32), Vec<u32>> {
    let mut map: HashMap<(String, u32), Vec<u32>> = HashMap::new();
    for event in db.store().read_stream(task, 1).await.expect("read") {
        if let Event::ItemCompleted {
            step,
            item,
            attempt,
            ..
        } = event.event
        {
            map.entry((step, item)).or_default().push(attempt);
        }
    }
    map
}

async fn task_count(db: &TestDatabase) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(db.pool())
        .await
        .expect("count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_9_a_clip_7_failure_resumes_at_clip_7_and_is_approved() {
    let db = TestDatabase::create().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let id = ok(reel(
        &db,
        dir.path(),
        &[
            "submit",
            "--channel",
            "history",
            "--topic",
            "Rome",
            "--fail",
            "video:7",
        ],
    ));
    let task: TaskId = id.parse().expect("submit prints the task id");
    ok(reel(&db, dir.path(), &["worker", "--until-idle"]));

    let done = completions(&db, task).await;
    for clip in 1..=6 {
        assert_eq!(
            done[&("video".to_owned(), clip)],
            [1],
            "clip {clip}: attempt 1 only, never again"
        );
    }
    assert_eq!(
        done[&("video".to_owned(), 7)],
        [2],
        "clip 7: on the retry, once"
    );
    // Clips 8–18 are jobs submitted side by side with clip 7: those that finished before
    // clip 7 gave up are recorded in attempt 1, the rest (polled, not resubmitted) in 2.
    for clip in 8..=18 {
        let attempts = &done[&("video".to_owned(), clip)];
        assert!(
            attempts == &[1] || attempts == &[2],
            "clip {clip}: completed once, got {attempts:?}"
        );
    }
    let events = db.store().read_stream(task, 1).await.expect("read");
    assert!(events.iter().any(|e| matches!(&e.event, Event::ItemFailed { step, item: 7, attempt: 1, .. } if step == "video")));
    assert!(
        events
            .iter()
            .any(|e| matches!(e.event, Event::RetryScheduled { attempt: 1, .. }))
    );
    let listed = ok(reel(
        &db,
        dir.path(),
        &["tasks", "--status", "final_review", "--json"],
    ));
    assert!(listed.contains(&id), "{listed}");
    assert!(
        dir.path()
            .join("history")
            .join(&id)
            .join("video")
            .join("07.mp4")
            .exists(),
        "artifacts live under the channel"
    );

    let approved = ok(reel(&db, dir.path(), &["approve", &id]));
    assert!(approved.contains("completed"), "{approved}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_failure_fails_the_task_with_its_reason_in_reel_tasks() {
    let db = TestDatabase::create().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let id = ok(reel(
        &db,
        dir.path(),
        &[
            "submit",
            "--channel",
            "history",
            "--topic",
            "Rome",
            "--fail",
            "narration:4:permanent",
        ],
    ));
    ok(reel(&db, dir.path(), &["worker", "--until-idle"]));
    let listed = ok(reel(
        &db,
        dir.path(),
        &["tasks", "--channel", "history", "--json"],
    ));
    let tasks: serde_json::Value = serde_json::from_str(&listed).expect("json");
    let task = &tasks[0];
    assert_eq!(task["id"], id.as_str());
    assert_eq!(task["status"], "failed");
    let error = task["last_error"].as_str().expect("a reason");
    assert!(
        error.contains("narration item 4") && error.contains("permanent"),
        "{error}"
    );
    let table = ok(reel(&db, dir.path(), &["tasks", "--status", "failed"]));
    assert!(
        table.contains(&id) && table.contains("narration item 4"),
        "{table}"
    );
    assert!(
        ok(reel(
            &db,
            dir.path(),
            &["tasks", "--channel", "other", "--json"]
        ))
        .starts_with("[]")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_redo_from_narration_reruns_narration_sfx_and_assembly_only() {
    let db = TestDatabase::create().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let id = ok(reel(
        &db,
        dir.path(),
        &["submit", "--channel", "history", "--topic", "Rome"],
    ));
    ok(reel(&db, dir.path(), &["worker", "--until-idle"]));
    ok(reel(
        &db,
        dir.path(),
        &[
            "reject",
            &id,
            "--redo-from",
            "narration",
            "--reason",
            "voice too fast",
        ],
    ));
    ok(reel(&db, dir.path(), &["worker", "--until-idle"]));

    let done = completions(&db, id.parse().expect("id")).await;
    for ((step, item), runs) in &done {
        let expected = if ["narration", "sfx", "assembly"].contains(&step.as_str()) {
            2
        } else {
            1
        };
        assert_eq!(runs.len(), expected, "{step} {item}: {runs:?}");
    }
    assert_eq!(done.len(), 22 + 1 + 18 + 18 + 18 + 1);
}

#[tokio::test]
async fn bad_input_is_a_one_line_error_with_a_non_zero_exit_and_writes_nothing() {
    let db = TestDatabase::create().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let long_key = "k".repeat(201);
    let long_id = "w".repeat(3_000);
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["submit", "--channel", "../etc", "--topic", "x"],
            1,
            "invalid channel id",
        ),
        (
            &["submit", "--channel", "History", "--topic", "x"],
            1,
            "invalid channel id",
        ),
        (
            &[
                "submit",
                "--channel",
                "h",
                "--topic",
                "x",
                "--fail",
                "music:3",
            ],
            2,
            "unknown step",
        ),
        (
            &[
                "submit",
                "--channel",
                "h",
                "--topic",
                "x",
                "--fail",
                "video:0",
            ],
            2,
            "ITEM must be a number",
        ),
        (
            &[
                "submit",
                "--channel",
                "h",
                "--topic",
                "x",
                "--notion-page",
                "my-page",
            ],
            2,
            "invalid Notion page id",
        ),
        (&["approve", "not-a-uuid"], 1, "invalid task id"),
        (
            &["approve", "1b4e28ba-2fa1-11d2-883f-0016d3cca427"],
            1,
            "not found",
        ),
        (
            &[
                "reject",
                "1b4e28ba-2fa1-11d2-883f-0016d3cca427",
                "--redo-from",
                "music",
            ],
            1,
            "not found",
        ),
        (&["cancel", "zzz"], 1, "invalid task id"),
        (
            &["retry", "1b4e28ba-2fa1-11d2-883f-0016d3cca427"],
            1,
            "not found",
        ),
        (
            &["tasks", "--status", "awaiting_review"],
            2,
            "unknown status",
        ),
        (&["tasks", "--channel", "a/b"], 1, "invalid channel id"),
        (
            &["worker", "--concurrency", "0", "--until-idle"],
            2,
            "0 is not in 1..=1024",
        ),
        // Values that parse but cannot work are refused with the allowed range.
        (
            &["worker", "--time-scale", "1e300", "--until-idle"],
            2,
            "expected a number from 0 to 10",
        ),
        (
            &["worker", "--time-scale", "NaN", "--until-idle"],
            2,
            "expected a number from 0 to 10",
        ),
        (
            &["worker", "--shutdown-grace", "18446744073709551615"],
            2,
            "not in 0..=86400",
        ),
        (
            &["worker", "--lease-ttl", "18446744073709551000"],
            2,
            "not in 1..=86400",
        ),
        (&["worker", "--lease-ttl", "0"], 2, "not in 1..=86400"),
        (
            &["worker", "--concurrency", "99999999999"],
            2,
            "invalid value",
        ),
        (
            &[
                "submit",
                "--channel",
                "h",
                "--topic",
                "x",
                "--idempotency-key",
                &long_key,
            ],
            2,
            "--idempotency-key must be 1 to 200 characters",
        ),
        (
            &[
                "submit",
                "--channel",
                "h",
                "--topic",
                "x",
                "--idempotency-key",
                "",
            ],
            2,
            "--idempotency-key must be 1 to 200 characters",
        ),
        (
            &["submit", "--channel", "h", "--input", "{not json"],
            2,
            "not JSON",
        ),
        (&["submit", "--channel", "h"], 2, "missing field `topic`"),
        (&["replay", "nope"], 1, "invalid task id"),
        (
            &["replay", "1b4e28ba-2fa1-11d2-883f-0016d3cca427"],
            1,
            "not found",
        ),
        (
            &[
                "replay",
                "1b4e28ba-2fa1-11d2-883f-0016d3cca427",
                "--at",
                "x",
            ],
            2,
            "invalid value",
        ),
        (&["audit", "nope"], 1, "invalid task id"),
        (
            &["audit", "--all", "--channel", "A B"],
            1,
            "invalid channel id",
        ),
        (&["audit"], 2, "required"),
        (&["stats", "--channel", "../x"], 1, "invalid channel id"),
        (&["tasks", "--status", "Final Review"], 2, "invalid status"),
        (&["tasks", "--limit", "-1"], 2, "unexpected argument"),
        (
            &["cancel", "1b4e28ba-2fa1-11d2-883f-0016d3cca427"],
            1,
            "not found",
        ),
        (&["retry", "x"], 1, "invalid task id"),
        (&["frobnicate"], 2, "unrecognized subcommand"),
        (
            &["worker", "--worker-id", &long_id, "--until-idle"],
            2,
            "expected 1 to 200 characters",
        ),
        (
            &["worker", "--providers", "cloudy", "--until-idle"],
            2,
            "[possible values: simulated, local, cloud]",
        ),
    ];
    for (args, code, message) in cases {
        let run = reel(&db, dir.path(), args);
        assert_eq!(run.code, *code, "{args:?}: {}", run.stderr);
        assert!(run.stderr.contains(message), "{args:?}: {}", run.stderr);
        if *code == 1 {
            assert_eq!(
                run.stderr.trim().lines().count(),
                1,
                "{args:?}: one line: {}",
                run.stderr
            );
        }
    }
    // Environment values: the same rules as the flags they stand for.
    let env_cases: &[(&str, &str, &[&str], i32, &str)] = &[
        (
            "REEL_TIME_SCALE",
            "fast",
            &["worker", "--until-idle"],
            2,
            "expected a number from 0 to 10",
        ),
        (
            "REEL_TIME_SCALE",
            "-1",
            &["worker", "--until-idle"],
            2,
            "expected a number from 0 to 10",
        ),
        (
            "REEL_PROVIDER",
            "video=remote",
            &["worker", "--until-idle"],
            2,
            "unknown provider set \"remote\"",
        ),
        (
            "REEL_PROVIDERS",
            "Local",
            &["worker", "--until-idle"],
            2,
            "[possible values: simulated, local, cloud]",
        ),
        (
            "DATABASE_URL",
            "mysql://localhost/x",
            &["tasks"],
            1,
            "invalid database URL",
        ),
    ];
    for (name, value, args, code, message) in env_cases {
        let out = Command::new(env!("CARGO_BIN_EXE_reel"))
            .args(*args)
            .env("DATABASE_URL", db.url())
            .env("REEL_ARTIFACTS", dir.path())
            .env(name, value)
            .output()
            .expect("run reel");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(*code), "{name}={value}: {stderr}");
        assert!(stderr.contains(message), "{name}={value}: {stderr}");
    }
    assert_eq!(task_count(&db).await, 0, "nothing was written");

    // A task that is not in review cannot be approved; a finished one cannot be cancelled.
    let id = ok(reel(
        &db,
        dir.path(),
        &["submit", "--channel", "history", "--topic", "Rome"],
    ));
    // A page URL is stored as the dashed lower-case id the projector uses.
    let with_page = ok(reel(
        &db,
        dir.path(),
        &[
            "submit",
            "--channel",
            "history",
            "--topic",
            "Rome",
            "--notion-page",
            "https://www.notion.so/team/Rome-598337872CF94FDF8782E53DB20768A5?v=1",
        ],
    ));
    let stored: Option<String> =
        sqlx::query_scalar("SELECT notion_page_id FROM tasks WHERE id = $1::uuid")
            .bind(&with_page)
            .fetch_one(db.pool())
            .await
            .expect("stored page");
    assert_eq!(
        stored.as_deref(),
        Some("59833787-2cf9-4fdf-8782-e53db20768a5")
    );
    let run = reel(&db, dir.path(), &["approve", &id]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("is queued; cannot approve"),
        "{}",
        run.stderr
    );
    let run = reel(&db, dir.path(), &["retry", &id]);
    assert!(run.stderr.contains("cannot retry"), "{}", run.stderr);
    ok(reel(&db, dir.path(), &["cancel", &id]));
    let run = reel(&db, dir.path(), &["cancel", &id]);
    assert!(
        run.stderr.contains("is cancelled; cannot cancel"),
        "{}",
        run.stderr
    );
    let run = Command::new(env!("CARGO_BIN_EXE_reel"))
        .args(["tasks"])
        .env_remove("DATABASE_URL")
        .current_dir(dir.path())
        .output()
        .expect("run");
    assert_eq!(run.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&run.stderr).contains("DATABASE_URL"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_sends_a_failed_task_back_and_it_resumes_by_replay() {
    let db = TestDatabase::create().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let id = ok(reel(
        &db,
        dir.path(),
        &[
            "submit",
            "--channel",
            "history",
            "--topic",
            "Rome",
            "--fail",
            "sfx:5:permanent",
        ],
    ));
    ok(reel(&db, dir.path(), &["worker", "--until-idle"]));
    assert!(ok(reel(&db, dir.path(), &["tasks", "--status", "failed"])).contains(&id));
    // The provider keeps failing permanently, but everything before sfx 5 is kept.
    ok(reel(&db, dir.path(), &["retry", &id]));
    ok(reel(&db, dir.path(), &["worker", "--until-idle"]));
    let done = completions(&db, id.parse().expect("id")).await;
    assert!(
        done.values().all(|runs| runs.len() == 1),
        "nothing ran twice: {done:?}"
    );
    assert!(ok(reel(&db, dir.path(), &["tasks", "--status", "failed"])).contains(&id));
}

/// `reel tasks | head -1`: a reader that closes the pipe early is not a crash (exit 0, not
/// `println!`'s panic and exit 101).
#[tokio::test]
async fn a_closed_stdout_ends_reel_quietly() {
    let db = TestDatabase::create().await;
    let dir = tempfile::tempdir().expect("tempdir");
    for _ in 0..3 {
        ok(reel(
            &db,
            dir.path(),
            &["submit", "--channel", "history", "--topic", "Rome"],
        ));
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_reel"))
        .args(["tasks"])
        .env("DATABASE_URL", db.url())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run reel");
    // Close the reading end before reel prints anything.
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Issue 28: a task records the workflow version `reel submit` gave it (the newest the
/// binary has), `reel tasks` shows it, and a worker records the shape of each version it
/// serves. When an earlier build recorded another shape under the same version, the worker
/// warns naming the workflow, the version and what changed; with `--strict-versions` it
/// exits 2 before claiming anything.
#[tokio::test]
async fn a_changed_workflow_shape_under_the_same_version_warns_and_strict_refuses() {
    let db = TestDatabase::create().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let task = ok(reel(
        &db,
        dir.path(),
        &["submit", "--channel", "history", "--topic", "Carthage"],
    ));
    let listed: serde_json::Value =
        serde_json::from_str(&ok(reel(&db, dir.path(), &["tasks", "--json"]))).expect("json");
    assert_eq!(listed[0]["id"], task.as_str());
    assert_eq!(listed[0]["workflow_version"], 1);
    let text = ok(reel(&db, dir.path(), &["tasks"]));
    assert!(
        text.lines().next().is_some_and(|h| h.contains("version")),
        "{text}"
    );

    // What an earlier build of version 1 looked like: a step since renamed.
    sqlx::query(
        "INSERT INTO workflow_versions (workflow, version, fingerprint, shape, first_seen_at, first_seen_by) \
         VALUES ('video', 1, '00000000deadbeef', 'step clips itemized call', now() - interval '1 day', 'old-build')",
    )
    .execute(db.pool())
    .await
    .expect("record an older shape");
    let refused = reel(
        &db,
        dir.path(),
        &["worker", "--until-idle", "--strict-versions"],
    );
    assert_eq!(refused.code, 2, "stderr: {}", refused.stderr);
    for needle in [
        "\"video\"",
        "version 1",
        "old-build",
        "-step clips itemized call",
    ] {
        assert!(
            refused.stderr.contains(needle),
            "{needle}: {}",
            refused.stderr
        );
    }
    assert_eq!(refused.stderr.lines().count(), 1, "{}", refused.stderr);
    let claims: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'task_claimed'")
            .fetch_one(db.pool())
            .await
            .expect("count claims");
    assert_eq!(claims, 0, "nothing was claimed");

    // Without --strict-versions: a warning, and the work is done.
    let warned = reel(&db, dir.path(), &["worker", "--until-idle"]);
    assert_eq!(warned.code, 0, "stderr: {}", warned.stderr);
    assert!(
        warned.stderr.contains("WARN") && warned.stderr.contains("-step clips itemized call"),
        "{}",
        warned.stderr
    );
    let status: String = sqlx::query_scalar("SELECT status FROM tasks")
        .fetch_one(db.pool())
        .await
        .expect("status");
    assert_eq!(status, "final_review");
    let shapes: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM workflow_versions WHERE workflow = 'video' AND version = 1",
    )
    .fetch_one(db.pool())
    .await
    .expect("count shapes");
    assert_eq!(shapes, 2, "the older shape and this build's");
}

/// `submit --workflow` with a name this binary has no workflow for is a usage error (exit
/// 2) that names the ones it has, and nothing is queued; `--actor` names who acted, as
/// `--by` does.
#[tokio::test]
async fn an_unknown_workflow_is_refused_and_actors_are_recorded() {
    let db = TestDatabase::create().await;
    let artifacts = tempfile::tempdir().expect("tempdir");
    let refused = reel(
        &db,
        artifacts.path(),
        &[
            "submit",
            "--workflow",
            "nope",
            "--channel",
            "c",
            "--topic",
            "t",
        ],
    );
    assert_eq!(refused.code, 2, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("no workflow \"nope\"") && refused.stderr.contains("video"),
        "{}",
        refused.stderr
    );
    assert_eq!(task_count(&db).await, 0, "nothing queued");

    let task = ok(reel(
        &db,
        artifacts.path(),
        &["submit", "--channel", "c", "--topic", "t"],
    ));
    ok(reel(
        &db,
        artifacts.path(),
        &["cancel", &task, "--actor", "Dana"],
    ));
    let actor: Option<String> = sqlx::query_scalar(
        "SELECT metadata->>'actor' FROM events WHERE stream_id = $1::uuid \
         AND event_type = 'task_cancelled'",
    )
    .bind(&task)
    .fetch_one(db.pool())
    .await
    .expect("cancelled");
    assert_eq!(actor.as_deref(), Some("cli:Dana"));
}
