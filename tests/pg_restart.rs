//! PostgreSQL restarted mid-run: workers reconnect and carry on; every task completes and
//! nothing is lost. Runs against a throwaway cluster this test starts itself, so other
//! tests are not disturbed.

mod common;

use std::process::{Child, Command};

use common::cluster::Cluster;
use std::time::Duration;

use engine::{ChannelId, Event, NewTask, PgStore, TaskStatus};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_survive_a_postgres_restart_and_lose_nothing() {
    let cluster = Cluster::start().unwrap_or_else(|why| {
        panic!("cannot start a throwaway PostgreSQL cluster for this test (it needs initdb/pg_ctl and, as root, the postgres user): {why}")
    });
    let url = cluster.url("reel");
    let migrate = Command::new(env!("CARGO_BIN_EXE_reel"))
        .args(["migrate", "--database-url", &url])
        .output()
        .expect("migrate");
    assert!(
        migrate.status.success(),
        "{}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    let store = PgStore::new(engine::db::connect(&url, 4).await.expect("connect"));
    let channel = ChannelId::parse("restart").expect("channel");
    let mut tasks = Vec::new();
    for i in 0..12 {
        let task = NewTask::new(
            steps::WORKFLOW,
            channel.clone(),
            json!({"topic": format!("t{i}"), "faults": []}),
        );
        tasks.push(store.create_task(task).await.expect("submit").task_id());
    }
    let artifacts = tempfile::tempdir().expect("tempdir");
    let mut workers: Vec<Child> = ["r1", "r2"]
        .iter()
        .map(|id| common::spawn_reel_worker(&url, id, artifacts.path(), "0.0001", &[]))
        .collect();

    tokio::time::sleep(Duration::from_millis(700)).await;
    let unfinished = store
        .unfinished_tasks(&[steps::WORKFLOW.into()], &[])
        .await
        .expect("count");
    assert!(unfinished > 0, "the restart must hit a run in progress");
    cluster.ctl("restart").expect("restart PostgreSQL");

    for worker in &mut workers {
        common::wait_for_success(worker, Duration::from_secs(120)).await;
    }
    let store = PgStore::new(engine::db::connect(&url, 2).await.expect("reconnect"));
    for task in tasks {
        let events = store.read_stream(task, 1).await.expect("read");
        assert_eq!(
            engine::fold(&events).status(),
            TaskStatus::FINAL_REVIEW,
            "task {task}"
        );
        let completions = events
            .iter()
            .filter(|e| matches!(e.event, Event::ItemCompleted { .. }))
            .count();
        assert_eq!(completions, 78, "task {task}: every item exactly once");
    }
}

/// notion-projector through a PostgreSQL restart: it steps back, reconnects, takes the
/// leader lock again and mirrors what changed after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_projector_reconnects_after_a_postgres_restart() {
    use notion_projector::fake::{FakeNotion, FakeNotionOptions};
    use notion_projector::{Metrics, Projector, ProjectorOptions};

    let cluster = Cluster::start().unwrap_or_else(|why| {
        panic!("cannot start a throwaway PostgreSQL cluster for this test: {why}")
    });
    let url = cluster.url("reel");
    let migrate = Command::new(env!("CARGO_BIN_EXE_reel"))
        .args(["migrate", "--database-url", &url])
        .output()
        .expect("migrate");
    assert!(migrate.status.success());
    let store = PgStore::new(engine::db::connect(&url, 4).await.expect("connect"));
    let notion = FakeNotion::start(FakeNotionOptions::default())
        .await
        .expect("fake");
    let page = uuid::Uuid::new_v4().simple().to_string();
    notion.add_page(&page);
    let mut task = NewTask::new(
        "video",
        ChannelId::parse("restart").expect("channel"),
        json!({"topic": "restart"}),
    );
    task.notion_page_id = Some(page.clone());
    let task = store.create_task(task).await.expect("submit").task_id();

    let client = notion.client(Duration::from_secs(2));
    let metrics = std::sync::Arc::new(Metrics::new());
    let projector = Projector::new(
        store.clone(),
        client,
        ProjectorOptions {
            poll_interval: Duration::from_millis(200),
            ..ProjectorOptions::default()
        },
        metrics.clone(),
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn({
        let stop = shutdown.clone();
        async move { projector.run(stop).await }
    });
    let shows = |value: &'static str| {
        let notion = &notion;
        let page = &page;
        move || notion.page_value(page).as_deref() == Some(value)
    };
    assert!(wait(Duration::from_secs(5), shows("Queued")).await);

    cluster.ctl("restart").expect("restart PostgreSQL");
    let store = PgStore::new(engine::db::connect(&url, 2).await.expect("reconnect"));
    store
        .append(
            task,
            1,
            engine::Fence::Unleased,
            &[engine::NewEvent::new(Event::status_changed(
                TaskStatus::QUEUED,
                TaskStatus::from_static("generating_assets"),
            ))],
        )
        .await
        .expect("append after the restart");
    assert!(
        wait(Duration::from_secs(20), shows("Generating Assets")).await,
        "the projector mirrors changes after the restart"
    );
    assert!(metrics.is_healthy());
    shutdown.cancel();
    running.await.expect("the projector stops");
}

async fn wait(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < within {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}
