//! Rolling deploys with real processes (issue 28): workers of `reel-deploy-fixture` (a
//! `reel` binary with one workflow in two versions, see `tests/bin/deploy_fixture.rs`) run
//! ten version-1 tasks; version-2 workers start and the version-1 workers are SIGKILLed in
//! the middle of items and jobs. Without upgrade rules no v1 task runs anything on v2 code,
//! the tasks show as stranded, `reel upgrade` refuses and writes nothing, and a v1 worker
//! started again finishes them. With `.accepts(1)` and the renames, every v1 task finishes
//! on v2 with one `task_upgraded`, no completed item runs again, no job is paid twice,
//! and the audit is clean. Tasks submitted after the deploy run on v2 throughout.

#[path = "common/deploy_fixture.rs"]
mod deploy_fixture;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use deploy_fixture::{kill, provider_tables};
use engine::testing::TestDatabase;
use engine::{Event, TaskId, fold};
use uuid::Uuid;

/// Seconds a claim holds a task: heartbeats (and presence beats) come every third of it.
const LEASE_TTL: u64 = 3;
const HEARTBEAT: Duration = Duration::from_secs(LEASE_TTL / 3);

fn fixture(db: &TestDatabase, workflow: &str) -> Command {
    deploy_fixture::fixture(db, workflow, 150, 4000)
}

/// A worker process of `workflow`, its log in `log` (when given).
fn worker(db: &TestDatabase, workflow: &str, id: &str, log: Option<&std::path::Path>) -> Child {
    let stderr = match log {
        Some(path) => Stdio::from(std::fs::File::create(path).expect("log file")),
        None => Stdio::null(),
    };
    fixture(db, workflow)
        .args([
            "worker",
            "--worker-id",
            id,
            "--concurrency",
            "5",
            "--lease-ttl",
            &LEASE_TTL.to_string(),
            "--stranded-warning",
            "1",
            "--shutdown-grace",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("start a fixture worker")
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn cli(db: &TestDatabase, workflow: &str, args: &[&str]) -> Run {
    let out = fixture(db, workflow)
        .args(args)
        .output()
        .expect("run the fixture");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn submit(db: &TestDatabase, workflow: &str) -> TaskId {
    let run = cli(
        db,
        workflow,
        &["submit", "--channel", "deploys", "--input", "{}"],
    );
    assert_eq!(run.code, 0, "submit: {}", run.stderr);
    run.stdout.trim().parse().expect("a task id")
}

/// Counts per task of one SQL query's `(task_id, n)` rows.
async fn per_task(db: &TestDatabase, sql: &'static str) -> BTreeMap<Uuid, i64> {
    sqlx::query_as::<_, (Uuid, i64)>(sql)
        .fetch_all(db.pool())
        .await
        .expect(sql)
        .into_iter()
        .collect()
}

/// Waits until `done` holds, checking every 100 ms, for at most `limit`.
async fn wait_until<F, Fut>(limit: Duration, what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !done().await {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn completed(db: &TestDatabase, tasks: &[TaskId]) -> usize {
    let ids: Vec<Uuid> = tasks.iter().map(TaskId::as_uuid).collect();
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tasks WHERE id = ANY($1) AND status = 'completed'",
    )
    .bind(&ids)
    .fetch_one(db.pool())
    .await
    .expect("count");
    usize::try_from(n).unwrap_or(0)
}

/// Ten v1 tasks under way on two v1 workers: every one has frames done, at least five have
/// render jobs open, the others are in the middle of their frames, none is finished — and then v2 workers start
/// and the v1 workers are SIGKILLed. Returns the v1 tasks.
async fn deploy_v2_and_kill_v1(
    db: &TestDatabase,
    v2: &str,
    logs: &std::path::Path,
) -> (Vec<TaskId>, Vec<Child>) {
    provider_tables(db).await;
    let v1_tasks: Vec<TaskId> = (0..10).map(|_| submit(db, "v1")).collect();
    let mut v1_workers = vec![
        worker(db, "v1", "v1-a", None),
        worker(db, "v1", "v1-b", None),
    ];
    wait_until(Duration::from_secs(30), "v1 tasks under way", || async {
        let frames = per_task(
            db,
            "SELECT stream_id, count(*) FROM events WHERE event_type = 'item_completed' \
              AND payload->>'step' = 'frames' GROUP BY stream_id",
        )
        .await;
        let renders = per_task(
            db,
            "SELECT stream_id, count(*) FROM events WHERE event_type = 'item_submitted' GROUP BY stream_id",
        )
        .await;
        frames.len() == 10 && renders.len() >= 5
    })
    .await;
    let v2_workers = vec![
        worker(db, v2, "v2-a", Some(&logs.join("v2-a.log"))),
        worker(db, v2, "v2-b", None),
    ];
    for v1 in &mut v1_workers {
        kill(v1);
    }
    assert_eq!(
        completed(db, &v1_tasks).await,
        0,
        "every v1 task was in flight at the kill"
    );
    (v1_tasks, v2_workers)
}

async fn history(db: &TestDatabase, task: TaskId) -> Vec<engine::RecordedEvent> {
    db.store().read_stream(task, 1).await.expect("read")
}

fn uuids(tasks: &[TaskId]) -> Vec<Uuid> {
    tasks.iter().map(TaskId::as_uuid).collect()
}

/// Items run by version-2 code for these tasks (`fixture_runs` and `fixture_submits`).
async fn v2_work_on(db: &TestDatabase, tasks: &[TaskId]) -> i64 {
    sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM fixture_runs WHERE version = 2 AND task_id = ANY($1)) \
              + (SELECT count(*) FROM fixture_submits WHERE version = 2 AND task_id = ANY($1))",
    )
    .bind(uuids(tasks))
    .fetch_one(db.pool())
    .await
    .expect("count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_without_upgrade_rules_strands_v1_tasks_until_a_v1_worker_returns() {
    let db = TestDatabase::create().await;
    let logs = tempfile::tempdir().expect("logs");
    let (v1_tasks, mut v2_workers) = deploy_v2_and_kill_v1(&db, "v2", logs.path()).await;
    let killed_at = Instant::now();
    let v2_tasks: Vec<TaskId> = (0..2).map(|_| submit(&db, "v2")).collect();

    // Stranded within a heartbeat interval of the kill (the dead workers' presence lapses;
    // the margin is for the listing's own process), and listed by `reel tasks --stranded`.
    let mut stranded: Vec<TaskId> = Vec::new();
    while stranded.len() < v1_tasks.len() {
        assert!(
            killed_at.elapsed() < HEARTBEAT + Duration::from_millis(500),
            "the v1 tasks shown as stranded: {stranded:?}"
        );
        let run = cli(&db, "v2", &["tasks", "--stranded", "--json"]);
        assert_eq!(run.code, 0, "{}", run.stderr);
        let listed: Vec<serde_json::Value> = serde_json::from_str(&run.stdout).expect("json");
        stranded = listed
            .iter()
            .map(|t| t["id"].as_str().unwrap_or_default().parse().expect("id"))
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = killed_at.elapsed();
    stranded.sort();
    let mut expected = v1_tasks.clone();
    expected.sort();
    assert_eq!(stranded, expected, "exactly the v1 tasks are stranded");
    eprintln!("stranded shown {took:?} after the kill (heartbeat {HEARTBEAT:?})");

    // `reel upgrade` without the rules: exit 2, saying which rule is missing, nothing written.
    let task = v1_tasks[0];
    let before = history(&db, task).await.len();
    let run = cli(
        &db,
        "v2",
        &["upgrade", &task.to_string(), "--to-version", "2"],
    );
    assert_eq!(run.code, 2, "stdout {} stderr {}", run.stdout, run.stderr);
    assert!(run.stderr.contains(".accepts(1)"), "{}", run.stderr);
    assert_eq!(history(&db, task).await.len(), before, "nothing written");

    // The v2 workers warn about them while they wait, and run the new tasks.
    wait_until(
        Duration::from_secs(30),
        "the v2 tasks completed",
        || async { completed(&db, &v2_tasks).await == v2_tasks.len() },
    )
    .await;
    let log = std::fs::read_to_string(logs.path().join("v2-a.log")).expect("log");
    assert!(
        log.contains("stranded") && log.contains("deployed v1"),
        "the v2 worker warned: {log}"
    );
    assert_eq!(
        v2_work_on(&db, &v1_tasks).await,
        0,
        "no v1 task ran anything on v2 code"
    );

    // A v1 worker started again finishes them on v1.
    let mut v1_again = worker(&db, "v1", "v1-c", None);
    wait_until(
        Duration::from_secs(60),
        "the v1 tasks completed",
        || async { completed(&db, &v1_tasks).await == v1_tasks.len() },
    )
    .await;
    assert_eq!(v2_work_on(&db, &v1_tasks).await, 0);
    for task in &v1_tasks {
        let state = fold(&history(&db, *task).await);
        assert_eq!(state.workflow_version, 1);
        assert!(state.upgrades.is_empty());
        let steps: Vec<&str> = state.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(steps, ["frames", "render"]);
    }
    let v1_on_new: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM fixture_runs WHERE version = 1 AND task_id = ANY($1)",
    )
    .bind(uuids(&v2_tasks))
    .fetch_one(db.pool())
    .await
    .expect("count");
    assert_eq!(v1_on_new, 0, "the new tasks ran on v2 throughout");
    let audit = cli(&db, "v2", &["audit", "--all", "--log-only"]);
    assert_eq!(audit.code, 0, "{} {}", audit.stdout, audit.stderr);

    kill(&mut v1_again);
    for child in &mut v2_workers {
        kill(child);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_with_upgrade_rules_finishes_v1_tasks_on_v2_without_running_anything_twice() {
    let db = TestDatabase::create().await;
    let logs = tempfile::tempdir().expect("logs");
    let (v1_tasks, mut v2_workers) = deploy_v2_and_kill_v1(&db, "v2-accepts", logs.path()).await;
    let v2_tasks: Vec<TaskId> = (0..2).map(|_| submit(&db, "v2-accepts")).collect();
    let all: Vec<TaskId> = v1_tasks.iter().chain(&v2_tasks).copied().collect();
    wait_until(
        Duration::from_secs(60),
        "every task completed on v2",
        || async { completed(&db, &all).await == all.len() },
    )
    .await;

    let mut carried_open_jobs = 0;
    for task in &v1_tasks {
        let events = history(&db, *task).await;
        let upgrades: Vec<&Event> = events
            .iter()
            .map(|e| &e.event)
            .filter(|e| matches!(e, Event::TaskUpgraded { .. }))
            .collect();
        assert_eq!(upgrades.len(), 1, "task {task}: {upgrades:?}");
        let state = fold(&events);
        assert_eq!(state.workflow_version, 2);
        let steps: Vec<&str> = state.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(steps, ["stills", "film", "captions"], "task {task}");
        // Every item once: six stills, two films, one caption, whoever ran them.
        let completions = |step: &str| {
            events
                .iter()
                .filter(|e| matches!(&e.event, Event::ItemCompleted { step: s, .. } if s == step))
                .count()
        };
        assert_eq!(
            completions("frames") + completions("stills"),
            6,
            "task {task}"
        );
        assert_eq!(
            completions("render") + completions("film"),
            2,
            "task {task}"
        );
        assert_eq!(completions("captions"), 1, "task {task}");
        let submitted_before_upgrade = events
            .iter()
            .take_while(|e| !matches!(e.event, Event::TaskUpgraded { .. }))
            .filter(|e| matches!(e.event, Event::ItemSubmitted { .. }))
            .count();
        let submitted_after = events
            .iter()
            .skip_while(|e| !matches!(e.event, Event::TaskUpgraded { .. }))
            .filter(|e| matches!(e.event, Event::ItemSubmitted { .. }))
            .count();
        assert_eq!(
            submitted_before_upgrade + submitted_after,
            2,
            "task {task}: one submission per job"
        );
        if submitted_before_upgrade > 0 {
            carried_open_jobs += 1;
        }
        // No frame completed on v1 ran again on v2.
        let done_on_v1: Vec<i32> = events
            .iter()
            .filter_map(|e| match &e.event {
                Event::ItemCompleted { step, item, .. } if step == "frames" => {
                    Some(i32::try_from(*item).expect("item"))
                }
                _ => None,
            })
            .collect();
        let rerun: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM fixture_runs WHERE task_id = $1 AND version = 2 AND item = ANY($2) AND step = 'stills'",
        )
        .bind(task.as_uuid())
        .bind(&done_on_v1)
        .fetch_one(db.pool())
        .await
        .expect("count");
        assert_eq!(
            rerun, 0,
            "task {task}: frames {done_on_v1:?} ran again on v2"
        );
    }
    assert!(
        carried_open_jobs >= 5,
        "open render jobs carried to film: {carried_open_jobs}"
    );
    // The provider accepted exactly one job per item: twenty for the v1 tasks.
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM fixture_jobs WHERE task_id = ANY($1)")
        .bind(uuids(&v1_tasks))
        .fetch_one(db.pool())
        .await
        .expect("count");
    assert_eq!(jobs, 20, "no job paid twice");
    // New tasks ran v2 throughout, never upgraded.
    for task in &v2_tasks {
        let state = fold(&history(&db, *task).await);
        assert_eq!(state.workflow_version, 2);
        assert!(state.upgrades.is_empty());
    }
    let stranded = cli(&db, "v2-accepts", &["tasks", "--stranded", "--json"]);
    assert_eq!(stranded.stdout.trim(), "[]", "{}", stranded.stderr);
    let audit = cli(&db, "v2-accepts", &["audit", "--all", "--log-only"]);
    assert_eq!(audit.code, 0, "{} {}", audit.stdout, audit.stderr);
    for child in &mut v2_workers {
        kill(child);
    }
}
