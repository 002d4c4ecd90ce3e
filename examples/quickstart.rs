//! Run with: cargo run --example quickstart
//!
//! The event store in one screen: create a task, append what happened to it, then replay
//! its stream and the global log. Uses the `reel_example` database on the server named by
//! `DATABASE_URL` (environment or `.env`), creating and migrating it if needed.

use anyhow::Context;
use engine::prelude::*;
use engine::{Checkpoint, Event, Fence, NewEvent, db};
use serde_json::json;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = dotenvy::dotenv();
    let server = std::env::var("DATABASE_URL").unwrap_or_else(|_| db::DEFAULT_URL.into());
    let store = db::open_database(&server, "reel_example", 2)
        .await
        .with_context(|| format!("is PostgreSQL running at {server}?"))?;

    let channel = ChannelId::parse("history")?;
    let task = store
        .create_task(NewTask::new(
            "video",
            channel,
            json!({"topic": "The fall of Rome"}),
        ))
        .await?
        .task_id();
    println!("task {task}");

    let events = [
        Event::StatusChanged {
            from: TaskStatus::QUEUED,
            to: TaskStatus::from_static("generating_video"),
            to_display: Some("Generating Video".into()),
        },
        Event::StepStarted {
            step: "video".into(),
            attempt: 1,
            items: 3,
            atomic: false,
        },
        Event::ItemCompleted {
            step: "video".into(),
            item: 1,
            attempt: 1,
            artifact: "video/01.mp4".into(),
            cost_micros: 550_000,
            duration_ms: 300_000,
            output: None,
        },
        Event::ItemFailed {
            step: "video".into(),
            item: 2,
            attempt: 1,
            kind: FailureKind::Transient,
            error: "provider timeout".into(),
            retry: 1,
            unanswered: false,
            retry_after_ms: None,
        },
    ];
    let batch: Vec<NewEvent> = events.into_iter().map(NewEvent::new).collect();
    let appended = store.append(task, 1, Fence::Unleased, &batch).await?;
    println!(
        "appended {} events; the stream is at version {}",
        batch.len(),
        appended.version
    );

    // A second append at the same expected version is a conflict, never an overwrite.
    let stale = NewEvent::new(Event::TaskCancelled { reason: None });
    match store.append(task, 1, Fence::Unleased, &[stale]).await {
        Err(engine::Error::Conflict {
            expected, actual, ..
        }) => {
            println!("a stale append was refused: expected version {expected}, stream at {actual}")
        }
        other => anyhow::bail!("expected a conflict, got {other:?}"),
    }

    println!("\nreplay of task {task}:");
    for event in store.read_stream(task, 1).await? {
        println!(
            "  v{:<2} {:<16} {}",
            event.version,
            event.event.event_type(),
            serde_json::to_string(&event.event.encode()?.1)?
        );
    }

    // The fold: the same pure function the orchestrator and the audit tools use.
    let state = fold(&store.read_stream(task, 1).await?);
    let video = state.step("video").context("the video step started")?;
    let planned = video.planned.unwrap_or(0);
    println!(
        "\nstate: {} ({}), clips completed {:?}, clips still to run {:?}, spent ${:.2}",
        state.status_display(),
        state.status(),
        video.items.keys().collect::<Vec<_>>(),
        video.missing_items(planned),
        state.spent.cost_micros as f64 / 1e6
    );

    let global = store.read_all_after(Checkpoint::START, 10_000).await?;
    println!(
        "the global log holds {} committed events across all tasks",
        global.len()
    );
    Ok(())
}
