//! The video pipeline with notion-projector beside it (seed scenarios 5, 7 and 9): the
//! board follows the pipeline within seconds, and the pipeline never waits for Notion —
//! the same speed when Notion is slow or down, complete regardless, caught up afterwards.

use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::testing::TestDatabase;
use engine::{ChannelId, NewTask, PgStore, Registry, TaskId, TaskStatus, Worker, WorkerOptions};
use notion_projector::fake::{FakeNotion, FakeNotionOptions};
use notion_projector::{Metrics, Projector, ProjectorOptions};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const TIME_SCALE: f64 = 0.001;

async fn submit(store: &PgStore, page: &str, fail_clip_7: bool) -> TaskId {
    let faults = if fail_clip_7 {
        json!([{"step": "video", "item": 7, "permanent": false}])
    } else {
        json!([])
    };
    let mut task = NewTask::new(
        steps::WORKFLOW,
        ChannelId::parse("history").expect("channel"),
        json!({"topic": "The fall of Rome", "faults": faults}),
    );
    task.notion_page_id = Some(page.to_owned());
    store.create_task(task).await.expect("submit").task_id()
}

/// Runs a worker until no task is left; returns how long it took.
async fn run_pipeline(store: &PgStore, artifacts: &std::path::Path) -> Duration {
    let registry = Registry::new().register(steps::simulated_video_workflow(
        artifacts.to_owned(),
        TIME_SCALE,
    ));
    let options = WorkerOptions {
        until_idle: true,
        poll_interval: Duration::from_millis(50),
        ..WorkerOptions::new("notion-sync-test")
    };
    let started = Instant::now();
    Worker::new(store.clone(), registry, options)
        .run(CancellationToken::new())
        .await
        .expect("the worker runs");
    started.elapsed()
}

fn start_projector(store: &PgStore, notion: &FakeNotion) -> CancellationToken {
    let client = notion.client(Duration::from_secs(2));
    let options = ProjectorOptions {
        poll_interval: Duration::from_millis(200),
        retry_base: Duration::from_millis(200),
        failure_retry_interval: Duration::from_secs(1),
        ..ProjectorOptions::default()
    };
    let projector = Projector::new(store.clone(), client, options, Arc::new(Metrics::new()));
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move { projector.run(stop).await });
    shutdown
}

async fn db_status(store: &PgStore, task: TaskId) -> TaskStatus {
    let events = store.read_stream(task, 1).await.expect("read");
    engine::fold(&events).status()
}

/// Polls until `check` holds; the time it took, or `None` after `within`.
async fn wait_for(within: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() <= within {
        if check() {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// A test database, an artifacts directory and a fake Notion.
async fn setup() -> (TestDatabase, tempfile::TempDir, FakeNotion) {
    let db = TestDatabase::create().await;
    let artifacts = tempfile::tempdir().expect("tempdir");
    let notion = FakeNotion::start(FakeNotionOptions::default())
        .await
        .expect("fake");
    (db, artifacts, notion)
}

/// Scenario 9 with Notion: clip 7 fails, the retry resumes at clip 7; the page follows
/// the pipeline (Generating Video within 5 s of the change) and ends on Final Review.
#[tokio::test]
async fn the_board_follows_the_pipeline_within_5_seconds() {
    let (db, artifacts, notion) = setup().await;
    let store = db.store();
    let page = uuid::Uuid::new_v4().simple().to_string();
    notion.add_page(&page);
    let shutdown = start_projector(&store, &notion);
    let task = submit(&store, &page, true).await;

    let pipeline = tokio::spawn({
        let store = store.clone();
        let root = artifacts.path().to_owned();
        async move { run_pipeline(&store, &root).await }
    });
    // The moment the log says generating_video, the board has 5 s to show it.
    let deadline = Instant::now() + Duration::from_secs(60);
    while db_status(&store, task).await != TaskStatus::from_static("generating_video") {
        assert!(
            Instant::now() < deadline,
            "the task never reached generating_video"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = wait_for(Duration::from_secs(5), || {
        notion
            .page_history(&page)
            .iter()
            .any(|v| v == "Generating Video")
    })
    .await
    .expect("Generating Video shows within 5 s");
    eprintln!("Generating Video on the board {took:?} after the log said so");

    pipeline.await.expect("pipeline");
    assert_eq!(db_status(&store, task).await, TaskStatus::FINAL_REVIEW);
    wait_for(Duration::from_secs(5), || {
        notion.page_value(&page).as_deref() == Some("Final Review")
    })
    .await
    .expect("Final Review shows within 5 s");
    shutdown.cancel();
    // Coalescing may skip short-lived statuses, never reorder them: the page went through
    // the pipeline's statuses in the log's order.
    let history = notion.page_history(&page);
    eprintln!("page history: {history:?}");
    let log_order: Vec<String> = store
        .read_stream(task, 1)
        .await
        .expect("read")
        .iter()
        .filter_map(|e| match &e.event {
            engine::Event::TaskSubmitted { .. } => Some("Queued".to_owned()),
            event => event.display_of_new_status().map(|name| name.into_owned()),
        })
        .collect();
    let mut rest = log_order.iter();
    for value in &history {
        assert!(
            rest.any(|v| v == value),
            "{value} out of order: page {history:?}, log {log_order:?}"
        );
    }
    assert_eq!(notion.count(429), 0);
}

/// Scenario 5 and 7: the same pipeline takes the same time whether Notion answers, is
/// slow, or is down (503 on every request); it completes regardless, its status is in
/// PostgreSQL, and the projector catches the page up when Notion returns.
#[tokio::test]
async fn the_pipeline_never_waits_for_notion() {
    let (db, artifacts, notion) = setup().await;
    let store = db.store();
    let shutdown = start_projector(&store, &notion);

    let healthy_page = uuid::Uuid::new_v4().simple().to_string();
    notion.add_page(&healthy_page);
    let healthy = submit(&store, &healthy_page, false).await;
    let with_notion = run_pipeline(&store, artifacts.path()).await;
    assert_eq!(db_status(&store, healthy).await, TaskStatus::FINAL_REVIEW);

    // Notion down: every answer is a 503, after a 1 s wait.
    notion.set_outage(Some(503));
    notion.set_latency(Duration::from_secs(1));
    let down_page = uuid::Uuid::new_v4().simple().to_string();
    notion.add_page(&down_page);
    let down = submit(&store, &down_page, false).await;
    let without_notion = run_pipeline(&store, artifacts.path()).await;
    eprintln!("pipeline with Notion up {with_notion:?}, down and slow {without_notion:?}");
    assert_eq!(
        db_status(&store, down).await,
        TaskStatus::FINAL_REVIEW,
        "the pipeline completes while Notion is down"
    );
    assert!(
        without_notion < with_notion * 2 + Duration::from_secs(1),
        "the pipeline slowed down with Notion down: {without_notion:?} vs {with_notion:?}"
    );
    assert!(notion.count(503) >= 1, "the projector did try Notion");
    assert_ne!(
        notion.page_value(&down_page).as_deref(),
        Some("Final Review")
    );

    notion.set_outage(None);
    notion.set_latency(Duration::ZERO);
    wait_for(Duration::from_secs(15), || {
        notion.page_value(&down_page).as_deref() == Some("Final Review")
    })
    .await
    .expect("the projector catches up once Notion is back");
    shutdown.cancel();
}
