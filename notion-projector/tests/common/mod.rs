//! Shared harness: a test database, a fake Notion over real HTTP, tasks whose status
//! changes are appended like the engine appends them, and a projector running in-process.
#![allow(dead_code, unreachable_pub)]

pub mod board;
pub mod process;

use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::testing::TestDatabase;
use engine::{ChannelId, Checkpoint, Event, Fence, NewEvent, NewTask, PgStore};
use engine::{TaskId, TaskStatus};
use notion_projector::fake::{FakeNotion, FakeNotionOptions};
use notion_projector::{Metrics, NotionClient, Projector, ProjectorOptions, PropertyType};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub async fn fake() -> FakeNotion {
    FakeNotion::start(FakeNotionOptions::default())
        .await
        .expect("start the fake Notion")
}

/// Options with short waits so tests run in seconds.
pub fn fast_options() -> ProjectorOptions {
    ProjectorOptions {
        poll_interval: Duration::from_millis(200),
        retry_base: Duration::from_millis(100),
        retry_max: Duration::from_secs(5),
        failure_retry_interval: Duration::from_secs(1),
        standby_interval: Duration::from_millis(200),
        ..ProjectorOptions::default()
    }
}

pub fn client(fake: &FakeNotion) -> NotionClient {
    client_with_token(fake, &fake.token())
}

pub fn client_with_token(fake: &FakeNotion, token: &str) -> NotionClient {
    fake.client_with_token(token, Duration::from_secs(2))
}

/// A projector running in this process until [`Running::stop`].
pub struct Running {
    pub shutdown: CancellationToken,
    pub handle: JoinHandle<()>,
    pub metrics: Arc<Metrics>,
}

impl Running {
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.handle)
            .await
            .expect("the projector stops within 10 s after shutdown")
            .expect("the projector task does not panic");
    }
}

pub fn spawn(store: &PgStore, client: NotionClient, options: ProjectorOptions) -> Running {
    let metrics = Arc::new(Metrics::new());
    let projector = Projector::new(store.clone(), client, options, metrics.clone());
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let handle = tokio::spawn(async move { projector.run(stop).await });
    Running {
        shutdown,
        handle,
        metrics,
    }
}

/// A fresh page id in the undashed form users paste.
pub fn new_page_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Creates a task (queued) with an optional Notion page.
pub async fn new_task(store: &PgStore, page: Option<&str>) -> TaskId {
    let mut task = NewTask::new(
        "video",
        ChannelId::parse("notion-tests").expect("channel"),
        json!({"topic": "projector"}),
    );
    task.notion_page_id = page.map(str::to_owned);
    store
        .create_task(task)
        .await
        .expect("create task")
        .task_id()
}

/// `n` queued tasks, each with its own page on `notion`.
pub async fn tasks_with_pages(
    store: &PgStore,
    notion: &FakeNotion,
    n: usize,
) -> Vec<(TaskId, String)> {
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let page = new_page_id();
        notion.add_page(&page);
        tasks.push((new_task(store, Some(&page)).await, page));
    }
    tasks
}

/// Appends `status_changed` from the task's current status to `to`, as the orchestrator
/// would; returns the new stream version.
pub async fn change_status(store: &PgStore, task: TaskId, to: TaskStatus) -> u32 {
    let events = store.read_stream(task, 1).await.expect("read stream");
    let from = engine::fold(&events).status();
    let version = events.last().map_or(0, |e| e.version);
    store
        .append(
            task,
            version,
            Fence::Unleased,
            &[NewEvent::new(Event::status_changed(from, to))],
        )
        .await
        .expect("append status change")
        .version
}

/// Polls `check` every 20 ms until it holds or `within` passes; returns the time it took.
pub async fn wait_for(within: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if check() {
            return Some(start.elapsed());
        }
        if start.elapsed() > within {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The stored checkpoint of the projector `name`.
pub async fn checkpoint(store: &PgStore, name: &str) -> Option<Checkpoint> {
    let row: Option<(String, i64)> = sqlx::query_as(
        "SELECT last_tx_id::text, last_position FROM projector_checkpoints WHERE projector = $1",
    )
    .bind(name)
    .fetch_optional(store.pool())
    .await
    .expect("read checkpoint");
    row.map(|(tx, position)| Checkpoint {
        tx_id: tx.parse().expect("xid8"),
        position,
    })
}

/// The last global position in the log.
pub async fn head(store: &PgStore) -> i64 {
    sqlx::query_scalar("SELECT COALESCE(max(global_position), 0) FROM events")
        .fetch_one(store.pool())
        .await
        .expect("head")
}

/// Whether every event in the log is behind the projector's checkpoint.
pub async fn caught_up(store: &PgStore, name: &str) -> bool {
    sqlx::query_scalar(
        "SELECT NOT EXISTS (SELECT 1 FROM events e, projector_checkpoints c \
          WHERE c.projector = $1 AND (e.tx_id, e.global_position) > (c.last_tx_id, c.last_position)) \
           AND EXISTS (SELECT 1 FROM projector_checkpoints WHERE projector = $1)",
    )
    .bind(name)
    .fetch_one(store.pool())
    .await
    .expect("compare the checkpoint with the log")
}

/// Waits until the checkpoint is past every event in the log (everything handled).
pub async fn wait_caught_up(store: &PgStore, name: &str, within: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < within {
        if caught_up(store, name).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// One `sync_failures` row.
#[derive(Debug, sqlx::FromRow)]
pub struct FailureRow {
    pub task_id: uuid::Uuid,
    pub http_status: Option<i32>,
    pub error: String,
    pub attempts: i32,
    pub retryable: bool,
    pub resolved: bool,
}

pub async fn failures(store: &PgStore) -> Vec<FailureRow> {
    sqlx::query_as(
        "SELECT task_id, http_status, error, attempts, retryable, resolved_at IS NOT NULL AS resolved \
           FROM sync_failures ORDER BY global_position",
    )
    .fetch_all(store.pool())
    .await
    .expect("read sync_failures")
}

/// Polls `sync_failures` every 50 ms until `done` holds or `within` passes; returns the
/// last rows read.
pub async fn wait_failures(
    store: &PgStore,
    within: Duration,
    done: impl Fn(&[FailureRow]) -> bool,
) -> Vec<FailureRow> {
    let start = Instant::now();
    loop {
        let rows = failures(store).await;
        if done(&rows) || start.elapsed() > within {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn test_db() -> TestDatabase {
    TestDatabase::create().await
}

pub fn display(status: TaskStatus) -> String {
    status.default_display().into_owned()
}

pub const STATUS: PropertyType = PropertyType::Status;

/// The dashed lower-case form the fake records.
pub fn dashed(page: &str) -> String {
    notion_projector::PageId::parse(page)
        .expect("a valid page id")
        .to_string()
}
