//! `reel replay` and `reel audit` through the binary: golden outputs for four histories the
//! engine writes, and one corrupted history per invariant (inserted with SQL) that the
//! audit must catch, naming the task, the version and the rule.

mod common;

use std::process::Command;

use common::{Probe, run_to_rest, submit};
use engine::testing::TestDatabase;
use engine::{FailureKind, Orchestrator, PgStore, Registry, TaskId, commands};

struct Output {
    code: i32,
    stdout: String,
}

fn reel(db: &TestDatabase, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_reel"))
        .args(args)
        .env("DATABASE_URL", db.url())
        .output()
        .expect("run reel");
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
    }
}

/// A small pipeline-shaped workflow: 3 assets, composites, 4 clips, assembly.
fn workflow(probe: &Probe) -> engine::Workflow {
    let status = engine::TaskStatus::from_static;
    engine::Workflow::new("video")
        .step(probe.items("assets", status("generating_assets"), 3))
        .step(probe.once("composites", status("generating_composites")))
        .step(probe.items("video", status("generating_video"), 4))
        .step(probe.once("assembly", status("assembling")))
        .review_gate()
        .task_retry(common::immediate_task_retry(3))
}

async fn history(db: &TestDatabase, probe: Probe) -> (PgStore, TaskId) {
    let store = db.store();
    let orchestrator = Orchestrator::new(store.clone(), Registry::new().register(workflow(&probe)));
    let task = submit(&store, "video").await;
    run_to_rest(&store, &orchestrator, task).await;
    (store, task)
}

/// Replaces what differs between runs: ids, clock times, measured durations.
fn normalize(text: &str, task: TaskId) -> String {
    let text = text.replace(&task.to_string(), "<task>");
    let mut out = String::new();
    for line in text.lines() {
        let words: Vec<String> = line.split(' ').map(normalize_word).collect();
        out.push_str(&words.join(" "));
        out.push('\n');
    }
    out
}

/// `12:34:56.789` → `<time>`, `0.021s` → `<secs>`, `2026-11-28` → `<date>` (keeping
/// surrounding punctuation such as `(0.000s)` or `0.000s;`).
fn normalize_word(word: &str) -> String {
    let start = word.len() - word.trim_start_matches('(').len();
    let end = word.trim_end_matches([')', ';', ',']).len();
    if start >= end {
        return word.to_owned();
    }
    let core = &word[start..end];
    let only = |extra: &[char]| {
        core.chars()
            .all(|c| c.is_ascii_digit() || extra.contains(&c))
    };
    let replaced = if core.len() == 12 && only(&[':', '.']) {
        "<time>"
    } else if core.ends_with('s') && core.contains('.') && only(&['.', 's']) {
        "<secs>"
    } else if core.len() == 10 && only(&['-']) {
        "<date>"
    } else {
        return word.to_owned();
    };
    format!("{}{replaced}{}", &word[..start], &word[end..])
}

fn golden(name: &str, actual: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("REEL_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).expect("write golden");
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (REEL_UPDATE_GOLDEN=1 writes it)", path.display()));
    assert_eq!(actual, expected, "{name} differs from its golden file");
}

async fn golden_replay_and_audit(name: &str, db: &TestDatabase, task: TaskId) {
    if std::env::var_os("REEL_UPDATE_FIXTURES").is_some() {
        record_fixture(name, db, task).await;
    }
    let replay = reel(db, &["replay", &task.to_string()]);
    assert_eq!(replay.code, 0);
    golden(
        &format!("{name}.replay.txt"),
        &normalize(&replay.stdout, task),
    );
    let audit = reel(db, &["audit", &task.to_string()]);
    assert_eq!(audit.code, 0, "{}", audit.stdout);
    golden(
        &format!("{name}.audit.txt"),
        &normalize(&audit.stdout, task),
    );
}

#[tokio::test]
async fn golden_a_clean_run() {
    let db = TestDatabase::create().await;
    let (_, task) = history(&db, Probe::default()).await;
    golden_replay_and_audit("clean", &db, task).await;
    let at = reel(&db, &["replay", &task.to_string(), "--at", "8"]);
    golden("clean.at8.replay.txt", &normalize(&at.stdout, task));
}

#[tokio::test]
async fn golden_a_run_resumed_at_clip_3() {
    let db = TestDatabase::create().await;
    let probe = Probe::default();
    probe.fail("video", 3, FailureKind::Transient, &[1]);
    let (_, task) = history(&db, probe).await;
    golden_replay_and_audit("resumed", &db, task).await;
}

#[tokio::test]
async fn golden_a_permanent_failure() {
    let db = TestDatabase::create().await;
    let probe = Probe::default();
    probe.fail("video", 2, FailureKind::Permanent, &[]);
    let (_, task) = history(&db, probe).await;
    golden_replay_and_audit("permanent", &db, task).await;
}

#[tokio::test]
async fn golden_a_rejected_and_redone_review() {
    let db = TestDatabase::create().await;
    let probe = Probe::default();
    let (store, task) = history(&db, probe.clone()).await;
    commands::reject(&store, task, "video", Some("too dark".into()))
        .await
        .expect("reject");
    let orchestrator = Orchestrator::new(store.clone(), Registry::new().register(workflow(&probe)));
    run_to_rest(&store, &orchestrator, task).await;
    commands::approve(&store, task, Some("ana".into()))
        .await
        .expect("approve");
    golden_replay_and_audit("redone", &db, task).await;
}

fn fixture_path(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(format!("{name}.events.jsonl"))
}

/// Writes the task's rows of `events` as they are stored (one JSON object a line): a log
/// recorded by this build, which later builds must replay and audit to the same goldens.
async fn record_fixture(name: &str, db: &TestDatabase, task: TaskId) {
    let rows: Vec<String> = sqlx::query_scalar(
        "SELECT json_build_object('stream_id', stream_id, 'stream_version', stream_version, \
           'event_id', event_id, 'event_type', event_type, 'schema_version', schema_version, \
           'payload', payload, 'metadata', metadata, 'recorded_at', recorded_at)::text \
         FROM events WHERE stream_id = $1 ORDER BY stream_version",
    )
    .bind(task.as_uuid())
    .fetch_all(db.pool())
    .await
    .expect("read events");
    std::fs::write(fixture_path(name), rows.join("\n") + "\n").expect("write fixture");
}

/// Loads a recorded log into `db` row for row (and the task row it implies).
async fn load_fixture(name: &str, db: &TestDatabase) -> TaskId {
    let text = std::fs::read_to_string(fixture_path(name)).expect("read fixture");
    let mut task = None;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let row: serde_json::Value = serde_json::from_str(line).expect("fixture row");
        let id: uuid::Uuid = row["stream_id"]
            .as_str()
            .expect("id")
            .parse()
            .expect("uuid");
        if row["stream_version"] == 1 {
            sqlx::query(
                "INSERT INTO tasks (id, workflow, channel_id, status, version) \
                 VALUES ($1, $2, $3, 'queued', 1)",
            )
            .bind(id)
            .bind(row["payload"]["workflow"].as_str())
            .bind(row["payload"]["channel_id"].as_str())
            .execute(db.pool())
            .await
            .expect("insert task");
        }
        sqlx::query(
            "INSERT INTO events (stream_id, stream_version, event_id, event_type, schema_version, \
               payload, metadata, recorded_at) \
             SELECT r.stream_id, r.stream_version, r.event_id, r.event_type, r.schema_version, \
               r.payload, r.metadata, r.recorded_at \
             FROM json_populate_record(null::events, $1::json) r",
        )
        .bind(line)
        .execute(db.pool())
        .await
        .expect("insert fixture event");
        task = Some(TaskId::from(id));
    }
    task.expect("a non-empty fixture")
}

/// Logs recorded by earlier builds (tests/fixtures) replay and audit exactly as the goldens say.
#[tokio::test]
async fn recorded_logs_replay_and_audit_as_before() {
    for name in ["clean", "resumed", "permanent", "redone"] {
        let db = TestDatabase::create().await;
        let task = load_fixture(name, &db).await;
        let replay = reel(&db, &["replay", &task.to_string()]);
        assert_eq!(replay.code, 0, "{name}");
        let expected = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(format!("tests/golden/{name}.replay.txt")),
        )
        .expect("golden");
        assert_eq!(normalize(&replay.stdout, task), expected, "{name} replay");
        let audit = reel(&db, &["audit", &task.to_string()]);
        assert_eq!(audit.code, 0, "{name}: {}", audit.stdout);
        let expected = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(format!("tests/golden/{name}.audit.txt")),
        )
        .expect("golden");
        assert_eq!(normalize(&audit.stdout, task), expected, "{name} audit");
    }
}

/// Appends a raw row after the stream's last version (+ `skip`), as a corrupting writer would.
async fn corrupt(
    db: &TestDatabase,
    task: TaskId,
    skip: i32,
    event_type: &str,
    payload: serde_json::Value,
) -> u32 {
    let version: i32 = sqlx::query_scalar(
        "INSERT INTO events (stream_id, stream_version, event_id, event_type, payload) \
         SELECT $1, max(stream_version) + 1 + $2, gen_random_uuid(), $3, $4 FROM events WHERE stream_id = $1 \
         RETURNING stream_version",
    )
    .bind(task.as_uuid())
    .bind(skip)
    .bind(event_type)
    .bind(payload)
    .fetch_one(db.pool())
    .await
    .expect("insert corrupt event");
    version as u32
}

async fn assert_caught(db: &TestDatabase, task: TaskId, version: u32, rule: &str) {
    let out = reel(db, &["audit", &task.to_string()]);
    assert_eq!(out.code, 3, "a broken invariant exits 3: {}", out.stdout);
    assert!(out.stdout.contains(&task.to_string()), "{}", out.stdout);
    assert!(
        out.stdout.contains(&format!("  v{version} {rule}: ")),
        "expected v{version} {rule} in:\n{}",
        out.stdout
    );
    let json = reel(db, &["audit", &task.to_string(), "--json"]);
    let report: serde_json::Value = serde_json::from_str(json.stdout.trim()).expect("json report");
    let found = report["violations"]
        .as_array()
        .expect("violations")
        .iter()
        .any(|v| v["rule"] == rule && v["version"] == version);
    assert!(found, "{report}");
}

fn item(step: &str, item: u32, attempt: u32) -> serde_json::Value {
    serde_json::json!({"step": step, "item": item, "attempt": attempt, "artifact": "x", "cost_micros": 1, "duration_ms": 1})
}

#[tokio::test]
async fn each_invariant_is_caught_in_a_corrupted_history() {
    let db = TestDatabase::create().await;
    let clean = || async { history(&db, Probe::default()).await.1 };

    let task = clean().await;
    let version = corrupt(&db, task, 1, "review_requested", serde_json::json!({})).await;
    assert_caught(&db, task, version, "versions_contiguous").await;

    let task = clean().await;
    let payload = serde_json::json!({"workflow": "video", "channel_id": "history", "input": {}});
    let version = corrupt(&db, task, 0, "task_submitted", payload).await;
    assert_caught(&db, task, version, "submitted_first").await;

    let task = clean().await;
    let version = corrupt(&db, task, 0, "item_completed", item("video", 2, 1)).await;
    assert_caught(&db, task, version, "item_completed_once").await;

    let task = clean().await;
    let version = corrupt(&db, task, 0, "item_completed", item("music", 1, 1)).await;
    assert_caught(&db, task, version, "completion_in_started_step").await;

    let task = clean().await;
    let version = corrupt(
        &db,
        task,
        0,
        "status_changed",
        serde_json::json!({"from": "final_review", "to": "generating_video"}),
    )
    .await;
    assert_caught(&db, task, version, "legal_transition").await;

    let task = clean().await;
    commands::approve(&db.store(), task, None)
        .await
        .expect("approve");
    let version = corrupt(
        &db,
        task,
        0,
        "step_started",
        serde_json::json!({"step": "video", "attempt": 1, "items": 4}),
    )
    .await;
    assert_caught(&db, task, version, "nothing_after_terminal").await;

    let task = clean().await;
    corrupt(
        &db,
        task,
        0,
        "task_claimed",
        serde_json::json!({"worker_id": "w", "lease_epoch": 9, "attempt": 2}),
    )
    .await;
    let version = corrupt(&db, task, 0, "item_completed", item("assets", 1, 2)).await;
    assert_caught(&db, task, version, "retry_skips_completed").await;

    let task = clean().await;
    let version = corrupt(&db, task, 0, "task_exploded", serde_json::json!({})).await;
    assert_caught(&db, task, version, "known_events").await;

    // --all streams every task and exits 3; the clean ones are reported ok.
    let healthy = clean().await;
    let all = reel(&db, &["audit", "--all"]);
    assert_eq!(all.code, 3);
    assert!(
        all.stdout.contains(&format!("task {healthy}: ok")),
        "{}",
        all.stdout
    );
    assert!(
        all.stdout
            .contains("audited 9 tasks: 8 with broken invariants"),
        "{}",
        all.stdout
    );
}

#[tokio::test]
async fn stats_count_statuses_and_rank_failure_reasons() {
    let db = TestDatabase::create().await;
    for failing in [2, 3] {
        let probe = Probe::default();
        probe.fail("video", failing, FailureKind::Permanent, &[]);
        history(&db, probe).await;
    }
    history(&db, Probe::default()).await;
    let out = reel(&db, &["stats", "--json"]);
    assert_eq!(out.code, 0);
    let stats: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(stats["tasks"], 3);
    assert_eq!(stats["by_status"]["failed"], 2);
    assert_eq!(stats["by_status"]["final_review"], 1);
    let top = &stats["failure_reasons"][0];
    assert_eq!(
        top[1], 2,
        "video item 2 and 3 failures fold into one reason: {stats}"
    );
    assert!(
        top[0].as_str().expect("reason").starts_with("video item N"),
        "{stats}"
    );
}

/// `reel stats --channel C` counts only C's tasks, failure reasons included (channel
/// isolation: another channel's errors never show).
#[tokio::test]
async fn stats_with_a_channel_rank_only_that_channels_failure_reasons() {
    let db = TestDatabase::create().await;
    let mut failed = Vec::new();
    for failing in [2, 3] {
        let probe = Probe::default();
        probe.fail("video", failing, FailureKind::Permanent, &[]);
        failed.push(history(&db, probe).await.1);
    }
    sqlx::query("UPDATE tasks SET channel_id = 'elsewhere' WHERE id = $1")
        .bind(failed[1].as_uuid())
        .execute(db.store().pool())
        .await
        .expect("move one failed task to another channel");
    let out = reel(&db, &["stats", "--channel", "history", "--json"]);
    assert_eq!(out.code, 0);
    let stats: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(stats["by_status"]["failed"], 1, "{stats}");
    assert_eq!(
        stats["failure_reasons"],
        serde_json::json!([[stats["failure_reasons"][0][0].clone(), 1]]),
        "only the history channel's failure is counted: {stats}"
    );
}

/// `reel audit` with the artifacts' root checks every file an item recorded a size and
/// SHA-256 for: a changed and a missing artifact are violations at their item's version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_reports_an_artifact_changed_or_missing_on_disk() {
    let db = TestDatabase::create().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let artifacts = dir.path().to_str().expect("utf-8 path");
    let with_root = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_reel"))
            .args(args)
            .env("DATABASE_URL", db.url())
            .env("REEL_ARTIFACTS", artifacts)
            .env("REEL_TIME_SCALE", "0.00005")
            .output()
            .expect("run reel");
        Output {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        }
    };
    let submitted = with_root(&["submit", "--channel", "history", "--topic", "Rome"]);
    let id = submitted.stdout.trim().to_owned();
    assert_eq!(with_root(&["worker", "--until-idle"]).code, 0);
    let audit = with_root(&["audit", &id]);
    assert_eq!(audit.code, 0, "{}", audit.stdout);

    let task: TaskId = id.parse().expect("task id");
    let events = db.store().read_stream(task, 1).await.expect("read");
    let version_of = |step: &str, item: u32| {
        events
            .iter()
            .find(|e| matches!(&e.event, engine::Event::ItemCompleted { step: s, item: i, .. } if s == step && *i == item))
            .map(|e| e.version)
            .expect("completed")
    };
    let file = |step: &str, name: &str| dir.path().join("history").join(&id).join(step).join(name);
    std::fs::write(file("video", "07.mp4"), b"not the clip that was made").expect("change");
    std::fs::remove_file(file("narration", "03.mp3")).expect("remove");

    let audit = with_root(&["audit", &id]);
    assert_eq!(audit.code, 3, "{}", audit.stdout);
    let changed = format!(
        "  v{} artifact_intact: history/{id}/video/07.mp4 changed",
        version_of("video", 7)
    );
    let missing = format!(
        "  v{} artifact_intact: history/{id}/narration/03.mp3 is missing",
        version_of("narration", 3)
    );
    for expected in [&changed, &missing] {
        assert!(
            audit.stdout.contains(expected.as_str()),
            "{expected} in:\n{}",
            audit.stdout
        );
    }
    let all = with_root(&["audit", "--all", "--json"]);
    assert_eq!(all.code, 3);
    let summary = all.stdout.lines().last().expect("a summary line");
    assert!(summary.contains(r#""violations":2"#), "{summary}");
    assert!(
        all.stdout.contains(r#""rule":"artifact_intact""#),
        "{}",
        all.stdout
    );
    // The log itself is sound: checking only the log passes.
    assert_eq!(with_root(&["audit", &id, "--log-only"]).code, 0);
    // Pointed at no directory at all: one violation that says so, not one per file.
    let nowhere = dir.path().join("nowhere");
    let lost = with_root(&[
        "audit",
        &id,
        "--artifacts",
        nowhere.to_str().expect("utf-8"),
    ]);
    assert_eq!(lost.code, 3);
    assert!(lost.stdout.contains("1 violation(s)"), "{}", lost.stdout);
    assert!(
        lost.stdout
            .contains("78 recorded artifacts cannot be checked"),
        "{}",
        lost.stdout
    );
}
