//! reel behind a real PgBouncer (Debian's package, started here on a free port) in front of
//! the test server (issue 27): in transaction mode (`REEL_POOLER=transaction`, what
//! Supabase's and Neon's pooled URLs give) and in session mode — seed scenario 9 end to
//! end through the `reel` binary, ten videos with five SIGKILLs of workers, and the
//! projector keeping a board in sync with its leader lock as a lease row. A worker whose
//! claims the database refuses says so and exits non-zero instead of reporting "idle".

mod common;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::db::Pooler;
use engine::testing::PgBouncer as Bouncer;
use engine::testing::TestDatabase;
use engine::{Event, PgStore, TaskId, TaskStatus, fold};
use notion_projector::fake::{FakeNotion, FakeNotionOptions};
use notion_projector::{Metrics, Projector, ProjectorOptions};
use tokio_util::sync::CancellationToken;

fn bouncer(mode: &str) -> Bouncer {
    let server: sqlx::postgres::PgConnectOptions = engine::testing::database_url()
        .parse()
        .expect("DATABASE_URL");
    Bouncer::start(mode, server.get_host(), server.get_port())
        .unwrap_or_else(|why| panic!("cannot start PgBouncer: {why}"))
}

/// The `reel` binary on `url`, behind `pooler`.
fn reel(url: &str, pooler: &str, artifacts: &std::path::Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_reel"));
    command
        .env("DATABASE_URL", url)
        .env("REEL_POOLER", pooler)
        .env_remove("REEL_DIRECT_DATABASE_URL")
        .env("REEL_ARTIFACTS", artifacts)
        .env("REEL_TIME_SCALE", "0.00005")
        .env("REEL_LOG", "warn");
    command
}

fn run_ok(command: &mut Command) -> String {
    let out = command.output().expect("run reel");
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Seed scenario 9 through the pooler: clip 7 fails, the retry resumes at clip 7 (clips
/// 1–6 never run again), the task reaches final review and is approved.
async fn scenario_9(mode: &str) {
    let db = TestDatabase::create().await;
    let bouncer = bouncer(mode);
    let url = bouncer.url(db.name());
    let dir = tempfile::tempdir().expect("tempdir");
    let pooler = if mode == "transaction" {
        "transaction"
    } else {
        "session"
    };
    let id = run_ok(reel(&url, pooler, dir.path()).args([
        "submit",
        "--channel",
        "history",
        "--topic",
        "Rome",
        "--fail",
        "video:7",
    ]));
    let task: TaskId = id.parse().expect("a task id");
    run_ok(reel(&url, pooler, dir.path()).args(["worker", "--until-idle"]));
    let events = db.store().read_stream(task, 1).await.expect("read");
    let mut runs: HashMap<u32, Vec<u32>> = HashMap::new();
    for event in &events {
        if let Event::ItemCompleted {
            step,
            item,
            attempt,
            ..
        } = &event.event
            && step == "video"
        {
            runs.entry(*item).or_default().push(*attempt);
        }
    }
    for clip in 1..=6 {
        assert_eq!(runs[&clip], [1], "clip {clip} ran once, on attempt 1");
    }
    assert_eq!(runs[&7], [2], "clip 7 ran once, on the retry");
    assert_eq!(runs.len(), 18);
    assert!(runs.values().all(|attempts| attempts.len() == 1));
    let report = engine::audit::audit(task, &events);
    assert!(report.is_clean(), "{:?}", report.violations);
    assert_eq!(fold(&events).status(), TaskStatus::FINAL_REVIEW);
    let listed = run_ok(reel(&url, pooler, dir.path()).args(["tasks", "--status", "final_review"]));
    assert!(listed.contains(&id), "{listed}");
    let approved = run_ok(reel(&url, pooler, dir.path()).args(["approve", &id]));
    assert!(approved.contains("completed"), "{approved}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_9_through_pgbouncer_in_transaction_mode() {
    scenario_9("transaction").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_9_through_pgbouncer_in_session_mode() {
    scenario_9("session").await;
}

fn worker(url: &str, id: &str, artifacts: &std::path::Path) -> Child {
    reel(url, "transaction", artifacts)
        .args([
            "worker",
            "--worker-id",
            id,
            "--until-idle",
            "--lease-ttl",
            "2",
            "--time-scale",
            "0.0001",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start reel worker")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_videos_through_pgbouncer_with_five_sigkills_lose_nothing_and_run_nothing_twice() {
    let db = TestDatabase::create().await;
    let bouncer = bouncer("transaction");
    let url = bouncer.url(db.name());
    let dir = tempfile::tempdir().expect("tempdir");
    let tasks = common::submit_videos(&db.store(), "pooled", 10).await;
    let ids = ["pooled-a", "pooled-b"];
    let mut workers: Vec<Child> = ids.iter().map(|id| worker(&url, id, dir.path())).collect();
    let mut kills = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while kills < 5 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let victim = kills % workers.len();
        if workers[victim].try_wait().expect("poll").is_none() {
            workers[victim].kill().expect("SIGKILL");
            workers[victim].wait().expect("reap");
            kills += 1;
        }
        workers[victim] = worker(&url, ids[victim], dir.path());
    }
    assert_eq!(kills, 5, "the workers finished before five kills");
    for child in &mut workers {
        common::wait_for_success(child, Duration::from_secs(120)).await;
    }
    for task in tasks {
        let events = db.store().read_stream(task, 1).await.expect("read");
        let state = fold(&events);
        assert_eq!(state.status(), TaskStatus::FINAL_REVIEW, "task {task}");
        let report = engine::audit::audit(task, &events);
        assert!(report.is_clean(), "task {task}: {:?}", report.violations);
        let mut done: HashMap<(String, u32), u32> = HashMap::new();
        for event in &events {
            if let Event::ItemCompleted { step, item, .. } = &event.event {
                *done.entry((step.clone(), *item)).or_default() += 1;
            }
        }
        assert_eq!(done.len(), 78, "task {task}: every item");
        assert!(done.values().all(|n| *n == 1), "task {task}: an item twice");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_projector_keeps_a_board_in_sync_through_pgbouncer_with_a_lease_for_its_lock() {
    // Transaction pooling and no direct URL: no LISTEN (the projector polls) and no session
    // for its leader lock (a lease row). Two projectors: one leads, the board follows.
    let db = TestDatabase::create().await;
    let bouncer = bouncer("transaction");
    let options: sqlx::postgres::PgConnectOptions = bouncer
        .url(db.name())
        .parse::<sqlx::postgres::PgConnectOptions>()
        .expect("url")
        .statement_cache_capacity(0);
    let pooled = |size: u32| {
        let options = options.clone();
        async move {
            PgStore::new(
                engine::db::pool_options(size)
                    .connect_with(options)
                    .await
                    .expect("connect through PgBouncer"),
            )
            .behind(Pooler::Transaction)
            .with_session_pool(None)
        }
    };
    let notion = FakeNotion::start(FakeNotionOptions::default())
        .await
        .expect("fake Notion");
    let mut stops = Vec::new();
    for _ in 0..2 {
        let store = pooled(4).await;
        let projector = Projector::new(
            store,
            notion.client(Duration::from_secs(2)),
            ProjectorOptions {
                poll_interval: Duration::from_millis(200),
                standby_interval: Duration::from_millis(200),
                ..ProjectorOptions::default()
            },
            Arc::new(Metrics::new()),
        );
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move { projector.run(token).await });
        stops.push(stop);
    }
    let store = pooled(8).await;
    let mut pages = Vec::new();
    for i in 0..3 {
        let page = uuid::Uuid::new_v4().simple().to_string();
        notion.add_page(&page);
        let mut task = engine::NewTask::new(
            steps::WORKFLOW,
            engine::ChannelId::parse("history").expect("channel"),
            serde_json::json!({"topic": format!("topic {i}"), "faults": []}),
        );
        task.notion_page_id = Some(page.clone());
        store.create_task(task).await.expect("submit");
        pages.push(page);
    }
    let artifacts = tempfile::tempdir().expect("tempdir");
    engine::Worker::new(
        store.clone(),
        engine::Registry::new().register(steps::simulated_video_workflow(
            artifacts.path().to_owned(),
            0.0001,
        )),
        engine::WorkerOptions {
            poll_interval: Duration::from_millis(50),
            ..engine::WorkerOptions::new("pooled-worker")
        },
    )
    .run_until_idle()
    .await
    .expect("the worker runs through the pooler");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !pages
        .iter()
        .all(|page| notion.page_value(page).as_deref() == Some("Final Review"))
    {
        assert!(
            Instant::now() < deadline,
            "the board did not follow: {:?}",
            pages
                .iter()
                .map(|p| notion.page_value(p))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let leases: Vec<String> = sqlx::query_scalar("SELECT name FROM leader_leases")
        .fetch_all(db.pool())
        .await
        .expect("leases");
    assert_eq!(
        leases,
        ["reel/notion-projector/notion"],
        "one leader, by lease"
    );
    for stop in stops {
        stop.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_claims_the_database_refuses_exits_non_zero_instead_of_idle() {
    // A role that may read but not claim: every claim is refused (permission denied).
    let db = TestDatabase::create().await;
    common::submit_videos(&db.store(), "history", 1).await;
    let role = format!("reader_{}", uuid::Uuid::new_v4().simple());
    for statement in [
        format!("CREATE ROLE {role} LOGIN"),
        format!("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}"),
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
            .execute(db.pool())
            .await
            .expect("role");
    }
    let url = db
        .url()
        .replacen("postgres://postgres@", &format!("postgres://{role}@"), 1);
    let dir = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    let out = reel(&url, "none", dir.path())
        .args(["worker", "--until-idle"])
        .output()
        .expect("run reel worker");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("permission denied"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(10), "{stderr}");
    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP OWNED BY {role}; DROP ROLE {role}"
    )))
    .execute(db.pool())
    .await;
}
