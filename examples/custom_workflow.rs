//! Run with: cargo run --example custom_workflow
//!
//! A workflow of your own in a few lines: a two-step "newsletter" (write 3 sections, then
//! publish once). Section 2 times out on the first attempt; the retry runs only what is
//! missing. Uses the `reel_example` database on the server named by `DATABASE_URL`.

use std::time::Duration;

use anyhow::Context;
use engine::prelude::*;
use engine::{Backoff, db};
use serde_json::json;
use tokio_util::sync::CancellationToken;

fn newsletter() -> Workflow {
    let no_wait = Backoff {
        initial: Duration::ZERO,
        multiplier: 1.0,
        max: Duration::ZERO,
        jitter: 0.0,
    };
    Workflow::new("newsletter")
        .step(
            Step::items(
                "sections",
                TaskStatus::GeneratingAssets,
                |input| Ok(input["sections"].as_u64().unwrap_or(3) as u32),
                |ctx: StepContext, item| async move {
                    if item == 2 && ctx.attempt == 1 {
                        return Err(StepError::transient("writer timed out"));
                    }
                    Ok(ItemOutput::new(
                        format!("{}/section-{item}.md", ctx.channel_id),
                        20_000,
                    ))
                },
            )
            .retry(RetryPolicy {
                max_tries: 2,
                backoff: no_wait,
            }),
        )
        .step(Step::once(
            "publish",
            TaskStatus::Assembling,
            |ctx: StepContext| async move {
                Ok(ItemOutput::new(
                    format!("https://example.invalid/{}", ctx.task_id),
                    0,
                ))
            },
        ))
        .task_retry(TaskRetryPolicy {
            max_attempts: 3,
            backoff: no_wait,
        })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = dotenvy::dotenv();
    let server = std::env::var("DATABASE_URL").unwrap_or_else(|_| db::DEFAULT_URL.into());
    let store = db::open_database(&server, "reel_example", 4)
        .await
        .with_context(|| format!("is PostgreSQL running at {server}?"))?;

    let orchestrator = Orchestrator::new(store.clone(), Registry::new().register(newsletter()));
    let channel = ChannelId::parse("newsletters")?;
    let task = store
        .create_task(NewTask::new("newsletter", channel, json!({"sections": 3})))
        .await?
        .task_id();

    loop {
        let Some(lease) = store
            .claim_task(task, "example-worker", Duration::from_secs(30))
            .await?
        else {
            break;
        };
        let outcome = orchestrator.run(&lease, CancellationToken::new()).await?;
        println!("attempt {}: {outcome:?}", lease.attempt);
        if !matches!(outcome, RunOutcome::RetryScheduled { .. }) {
            break;
        }
    }

    let state = fold(&store.read_stream(task, 1).await?);
    println!("task {task} is {}", state.status().display_name());
    for resume in &state.resumes {
        println!(
            "attempt {} skipped {:?} and saved ${:.2}",
            resume.attempt,
            resume.skipped,
            resume.saved.cost_micros as f64 / 1e6
        );
    }
    Ok(())
}
