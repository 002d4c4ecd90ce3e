//! Run with: cargo run --example notion_sync
//!
//! The video pipeline with notion-projector beside it, against a local fake of Notion's
//! API (real HTTP, Notion's shapes and its 3 requests/s limit). Clip 7 fails once; watch
//! the task's Notion page follow the pipeline — and the page keep up while the pipeline
//! never waits for it. For the real Notion, run the binary instead:
//! `NOTION_TOKEN=ntn_… cargo run -p notion-projector` (see notion-projector/README.md).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use engine::prelude::*;
use engine::{Worker, WorkerOptions, db};
use notion_projector::fake::{FakeNotion, FakeNotionOptions};
use notion_projector::{Metrics, Projector, ProjectorOptions};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const TIME_SCALE: f64 = 0.001;
const PROJECTOR: &str = "notion-example";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = dotenvy::dotenv();
    let server = std::env::var("DATABASE_URL").unwrap_or_else(|_| db::DEFAULT_URL.into());
    let store = db::open_database(&server, "reel_example", 8)
        .await
        .with_context(|| format!("is PostgreSQL running at {server}?"))?;

    let notion = FakeNotion::start(FakeNotionOptions::default()).await?;
    let page = uuid::Uuid::new_v4().simple().to_string();
    notion.add_page(&page);
    println!("fake Notion at {} with page {page}", notion.url());

    // This example's projector starts at the log's head: earlier runs' tasks are not ours.
    notion_projector::checkpoint_at_head(&store, PROJECTOR, false).await?;
    let client = notion.client(Duration::from_secs(10));
    let metrics = Arc::new(Metrics::new());
    let projector = Projector::new(
        store.clone(),
        client,
        ProjectorOptions {
            name: PROJECTOR.into(),
            ..ProjectorOptions::default()
        },
        metrics.clone(),
    );
    let stop_projector = CancellationToken::new();
    let projecting = tokio::spawn({
        let stop = stop_projector.clone();
        async move { projector.run(stop).await }
    });

    let mut task = NewTask::new(
        steps::WORKFLOW,
        ChannelId::parse("history")?,
        json!({"topic": "The fall of Rome", "faults": [{"step": "video", "item": 7, "permanent": false}]}),
    );
    task.notion_page_id = Some(page.clone());
    let task = store.create_task(task).await?.task_id();
    println!("submitted task {task} (clip 7 will time out on the first attempt)\n");

    let registry = Registry::new().register(steps::simulated_video_workflow(
        "target/reel-artifacts",
        TIME_SCALE,
    ));
    let options = WorkerOptions {
        until_idle: true,
        poll_interval: Duration::from_millis(100),
        ..WorkerOptions::new("notion-example-worker")
    };
    let started = Instant::now();
    let worker =
        tokio::spawn(Worker::new(store.clone(), registry, options).run(CancellationToken::new()));

    // Print the page's changes as the fake receives them, until the board shows the end.
    let mut shown = 0;
    let mut pipeline_done: Option<Duration> = None;
    loop {
        for request in notion.requests().iter().skip(shown) {
            shown += 1;
            println!(
                "  [{:>6.2} s] Notion ← PATCH page: Status = {:<22} ({})",
                request.at.duration_since(started.into()).as_secs_f64(),
                request.value.as_deref().unwrap_or("-"),
                request.response
            );
        }
        if pipeline_done.is_none() && worker.is_finished() {
            pipeline_done = Some(started.elapsed());
        }
        if pipeline_done.is_some() && notion.page_value(&page).as_deref() == Some("Final Review") {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "the board did not reach Final Review in 120 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_projector.cancel();
    let _ = projecting.await;
    let report = worker.await??;
    let state = engine::fold(&store.read_stream(task, 1).await?);
    println!(
        "\npipeline: {} in {:.1} s ({report:?})",
        state.status(),
        pipeline_done.unwrap_or_default().as_secs_f64()
    );
    println!(
        "board:    {} after {} requests, {} rate limited; intermediate statuses a later \
         one overtook were coalesced",
        notion.page_value(&page).unwrap_or_default(),
        notion.requests().len(),
        notion.count(429),
    );
    Ok(())
}
