//! notion-projector rows, against the fake Notion over real HTTP at Notion's 3 requests/s:
//! event → Notion latency at one status change per second; a burst of 300 status changes
//! over 100 tasks (requests sent, time to converge, 429s), then the same burst with 15% of
//! requests answering 503; the final-status p95 of healthy pages while one page is down;
//! and, with a board, status latency with intake on and off and intake's idle cost.

use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::prelude::*;
use engine::{Event, Fence, NewEvent};
use notion_projector::fake::{FakeNotion, FakeNotionOptions, RandomErrors};
use notion_projector::{BoardOptions, IntakeOptions, Metrics, Projector, ProjectorOptions};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::{Report, Sample};

const NAME: &str = "bench";

struct BenchTask {
    id: TaskId,
    page: String,
    version: u32,
    status: TaskStatus,
}

impl BenchTask {
    async fn change(&mut self, store: &PgStore, to: TaskStatus) -> anyhow::Result<()> {
        let appended = store
            .append(
                self.id,
                self.version,
                Fence::Unleased,
                &[NewEvent::new(Event::status_changed(self.status, to))],
            )
            .await?;
        self.version = appended.version;
        self.status = to;
        Ok(())
    }
}

async fn tasks(store: &PgStore, notion: &FakeNotion, n: usize) -> anyhow::Result<Vec<BenchTask>> {
    let channel = ChannelId::parse("bench-notion")?;
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let page = uuid::Uuid::new_v4().to_string();
        notion.add_page(&page);
        let mut task = NewTask::new("video", channel.clone(), json!({}));
        task.notion_page_id = Some(page.clone());
        let id = store.create_task(task).await?.task_id();
        tasks.push(BenchTask {
            id,
            page,
            version: 1,
            status: TaskStatus::QUEUED,
        });
    }
    Ok(tasks)
}

pub(crate) async fn run(report: &mut Report, store: &PgStore, quick: bool) -> anyhow::Result<()> {
    let notion = FakeNotion::start(FakeNotionOptions::default()).await?;
    let mut nominal = tasks(store, &notion, if quick { 8 } else { 30 }).await?;
    let mut burst_tasks = tasks(store, &notion, 100).await?;
    let mut faulty_tasks = tasks(store, &notion, 100).await?;
    let mut down_tasks = tasks(store, &notion, 30).await?;
    // The projector starts at the log's head: the new tasks' Queued counts as mirrored.
    notion_projector::checkpoint_at_head(store, NAME, false).await?;
    let client = notion.client(Duration::from_secs(10));
    let options = ProjectorOptions {
        name: NAME.into(),
        ..ProjectorOptions::default()
    };
    let projector = Projector::new(store.clone(), client, options, Arc::new(Metrics::new()));
    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let stop = shutdown.clone();
        async move { projector.run(stop).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;

    let sample = one_change_per_second(store, &notion, &mut nominal).await?;
    report.add(
        "projector: event → Notion p50, 1 change/s",
        sample.percentile_ms(0.5),
        "ms",
    );
    report.add(
        "projector: event → Notion p95, 1 change/s (goal ≤ 1000)",
        sample.percentile_ms(0.95),
        "ms",
    );

    burst(report, store, &notion, &mut burst_tasks, "").await?;
    notion.set_random_errors(Some(RandomErrors {
        rate: 0.15,
        status: 503,
        seed: 16,
    }));
    burst(report, store, &notion, &mut faulty_tasks, " with 15% 5xx").await?;
    notion.set_random_errors(None);
    one_page_down(report, store, &notion, &mut down_tasks).await?;
    shutdown.cancel();
    let _ = running.await;
    board_rows(report, store, quick).await
}

/// The board's rows: status latency at one change per second with a second projector that
/// also runs intake (at its default 10 s interval) against the same budget, beside one that
/// does not; and the requests intake spends per minute on an idle board.
async fn board_rows(report: &mut Report, store: &PgStore, quick: bool) -> anyhow::Result<()> {
    const BOARD: [(&str, &str); 6] = [
        ("Name", "title"),
        ("Task ID", "rich_text"),
        ("Channel", "select"),
        ("Status", "status"),
        ("Story direction", "rich_text"),
        ("Intake error", "rich_text"),
    ];
    let changes = if quick { 8 } else { 30 };
    for intake in [false, true] {
        let notion = FakeNotion::start(FakeNotionOptions::default()).await?;
        let board = notion.add_board(&BOARD);
        let mut nominal = tasks(store, &notion, changes).await?;
        let name = if intake {
            "bench-intake"
        } else {
            "bench-no-intake"
        };
        notion_projector::checkpoint_at_head(store, name, false).await?;
        let options = ProjectorOptions {
            name: name.into(),
            ..ProjectorOptions::default()
        };
        let client = notion.client(Duration::from_secs(10));
        let mut projector =
            Projector::new(store.clone(), client, options, Arc::new(Metrics::new()));
        let mut board_options = BoardOptions::new(board.data_source_id.clone());
        board_options.intake = intake.then(|| IntakeOptions {
            channel: Some("board".into()),
            ..IntakeOptions::default()
        });
        projector.open_board(&board_options).await?;
        let shutdown = CancellationToken::new();
        let running = tokio::spawn({
            let stop = shutdown.clone();
            async move { projector.run(stop).await }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        let sample = one_change_per_second(store, &notion, &mut nominal).await?;
        let how = if intake { "intake on" } else { "intake off" };
        report.add(
            format!("projector + board: event → Notion p95, 1 change/s, {how}"),
            sample.percentile_ms(0.95),
            "ms",
        );
        if intake {
            // The board is idle now: count what intake alone asks of Notion.
            let window = Duration::from_secs(if quick { 20 } else { 60 });
            let before = Instant::now();
            tokio::time::sleep(window).await;
            let queries = notion
                .requests()
                .iter()
                .filter(|r| r.at.into_std() >= before && r.path.ends_with("/query"))
                .count();
            report.add(
                "projector + board: intake requests per minute, idle board (default 10 s)",
                queries as f64 * 60.0 / window.as_secs_f64(),
                "req/min",
            );
        }
        shutdown.cancel();
        let _ = running.await;
    }
    Ok(())
}

/// One status change per second, one per task, each timed from before its append to the
/// fake's receipt of the PATCH that carries it.
async fn one_change_per_second(
    store: &PgStore,
    notion: &FakeNotion,
    tasks: &mut [BenchTask],
) -> anyhow::Result<Sample> {
    let started = Instant::now();
    let mut latencies = Vec::new();
    for task in tasks {
        let tick = Instant::now();
        let seen = notion.requests().len();
        task.change(store, TaskStatus::from_static("generating_assets"))
            .await?;
        let arrived = wait_request(notion, seen, &task.page, Duration::from_secs(10)).await;
        latencies.push(arrived.map_or(Duration::from_secs(10), |at| at.into_std() - tick));
        tokio::time::sleep_until((tick + Duration::from_secs(1)).into()).await;
    }
    Ok(Sample {
        latencies,
        wall: started.elapsed(),
    })
}

/// 300 changes over 100 tasks, in three rounds over all tasks: requests, time to converge,
/// 429s and 503s.
async fn burst(
    report: &mut Report,
    store: &PgStore,
    notion: &FakeNotion,
    burst: &mut [BenchTask],
    label: &str,
) -> anyhow::Result<()> {
    let sent_before = notion.requests().len();
    let limited_before = notion.count(429);
    let failed_before = notion.count(503);
    let started = Instant::now();
    for status in [
        TaskStatus::from_static("generating_assets"),
        TaskStatus::from_static("generating_composites"),
        TaskStatus::from_static("generating_video"),
    ] {
        for task in burst.iter_mut() {
            task.change(store, status).await?;
        }
    }
    let appended = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(180);
    while !burst
        .iter()
        .all(|t| notion.page_value(&t.page).as_deref() == Some("Generating Video"))
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the burst{label} did not converge in 180 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let converged = started.elapsed();
    report.add(
        format!("projector: burst{label}, 300 changes / 100 tasks, appended in"),
        appended.as_secs_f64(),
        "s",
    );
    report.add(
        format!("projector: burst{label}, requests sent (goal 100 + retries)"),
        (notion.requests().len() - sent_before) as f64,
        "requests",
    );
    report.add(
        format!("projector: burst{label}, time to converge (100/3 s = 33.3 s)"),
        converged.as_secs_f64(),
        "s",
    );
    report.add(
        format!("projector: burst{label}, 429s (goal 0)"),
        (notion.count(429) - limited_before) as f64,
        "responses",
    );
    if notion.count(503) > failed_before {
        report.add(
            format!("projector: burst{label}, 503s"),
            (notion.count(503) - failed_before) as f64,
            "responses",
        );
    }
    Ok(())
}

/// One page answering 503 to every request while 29 healthy tasks finish together: the
/// healthy pages' final-status p95, against N/3 + 1 s for the N = 30 pages.
async fn one_page_down(
    report: &mut Report,
    store: &PgStore,
    notion: &FakeNotion,
    tasks: &mut [BenchTask],
) -> anyhow::Result<()> {
    let Some((down, healthy)) = tasks.split_first_mut() else {
        return Ok(());
    };
    notion.set_page_outage(&down.page, Some(503));
    let seen = notion.requests().len();
    down.change(store, TaskStatus::FINAL_REVIEW).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !notion.requests()[seen..].iter().any(|r| r.response == 503) {
        anyhow::ensure!(Instant::now() < deadline, "the page down was never tried");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut changed = Vec::with_capacity(healthy.len());
    for task in healthy.iter_mut() {
        changed.push(tokio::time::Instant::now());
        task.change(store, TaskStatus::FINAL_REVIEW).await?;
    }
    let mut latencies = Vec::with_capacity(healthy.len());
    for (task, at) in healthy.iter().zip(changed) {
        let arrived = wait_request(notion, seen, &task.page, Duration::from_secs(60)).await;
        latencies.push(arrived.map_or(Duration::from_secs(60), |landed| landed - at));
    }
    notion.set_page_outage(&down.page, None);
    let sample = Sample {
        latencies,
        wall: Duration::ZERO,
    };
    let bound = tasks.len() as f64 / 3.0 + 1.0;
    report.add(
        format!(
            "projector: one page down, healthy final-status p95 (goal ≤ {:.0})",
            bound * 1e3
        ),
        sample.percentile_ms(0.95),
        "ms",
    );
    Ok(())
}

/// When the first request after index `seen` for `page` arrived.
async fn wait_request(
    notion: &FakeNotion,
    seen: usize,
    page: &str,
    within: Duration,
) -> Option<tokio::time::Instant> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(request) = notion.requests()[seen..]
            .iter()
            .find(|r| r.page_id == page && r.response == 200)
        {
            return Some(request.at);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    None
}
