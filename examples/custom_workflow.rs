//! Run with: cargo run --example custom_workflow
//!
//! A workflow of your own: a "newsletter" whose input is typed, whose steps show their own
//! statuses ("Writing Sections", "Publishing"), and whose last step reads what the first
//! one recorded in the log. It has no review gate, so its tasks end `completed`. Section 2
//! times out on the first attempt; the retry replays the log and writes only what is
//! missing. The worker API runs it in this process until there is nothing left to do.
//! Uses the `reel_example` database on the server named by `DATABASE_URL`.

use std::time::Duration;

use anyhow::Context;
use engine::db;
use engine::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// What a newsletter task is given.
#[derive(Debug, Deserialize)]
struct Brief {
    topic: String,
    sections: u32,
}

/// What each section item records (its `item_completed` output).
#[derive(Debug, Serialize, Deserialize)]
struct Section {
    title: String,
    words: u32,
}

/// What publishing records.
#[derive(Debug, Serialize)]
struct Issue {
    sections: usize,
    words: u32,
    url: String,
}

fn newsletter() -> Workflow {
    let mut newsletter = Workflow::new("newsletter").input::<Brief>();
    // `add` returns a handle typed by the step's output: later steps read `Section`s
    // through it, and a wrong name or type does not compile.
    let sections = newsletter.add(
        Step::fan_out(
            "sections",
            // The plan and the items get the input typed (`Plan<Brief>`, `StepContext<Brief>`).
            |plan: &Plan<Brief>| Ok(plan.input.sections),
            |ctx: StepContext<Brief>, item| async move {
                if item == 2 && ctx.attempt == 1 {
                    return Err(StepError::transient("writer timed out"));
                }
                let section = Section {
                    title: format!("{} — part {item}", ctx.input.topic),
                    words: 300 + 50 * item,
                };
                Ok(Output::of(section).with_cost_micros(20_000))
            },
        )
        .status("writing_sections", "Writing Sections")
        .retry(RetryPolicy {
            max_tries: 1,
            backoff: Backoff::none(),
        }),
    );
    newsletter.add(
        Step::call("publish", move |ctx: StepContext| {
            let sections = sections.clone();
            async move {
                // Every section, in order, as the log recorded it: after a crash or a
                // retry these come from earlier attempts' events, not from memory.
                let sections = ctx.get_all(&sections)?;
                let issue = Issue {
                    sections: sections.len(),
                    words: sections.iter().map(|s| s.words).sum(),
                    url: format!("https://example.invalid/issues/{}", ctx.task_id),
                };
                let url = issue.url.clone();
                Ok(Output::of(issue).with_artifact(url))
            }
        })
        .status("publishing", "Publishing"),
    );
    newsletter.task_retry(TaskRetryPolicy {
        max_attempts: 3,
        backoff: Backoff::none(),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = dotenvy::dotenv();
    let server = std::env::var("DATABASE_URL").unwrap_or_else(|_| db::DEFAULT_URL.into());
    let store = db::open_database(&server, "reel_example", 4)
        .await
        .with_context(|| format!("is PostgreSQL running at {server}?"))?;

    let registry = Registry::new().register(newsletter());
    let input = json!({"topic": "Rust on Postgres", "sections": 3});
    let task = store
        .create_task(NewTask::new(
            "newsletter",
            ChannelId::parse("newsletters")?,
            input,
        ))
        .await?
        .task_id();
    println!("submitted newsletter task {task}");

    let options = WorkerOptions {
        poll_interval: Duration::from_millis(100),
        ..WorkerOptions::new("newsletter-worker")
    };
    let report = Worker::new(store.clone(), registry, options)
        .run_until_idle()
        .await?;
    for attempt in report.attempts.iter().filter(|a| a.task == task) {
        println!("attempt {}: {:?}", attempt.attempt, attempt.outcome);
    }

    let state = fold(&store.read_stream(task, 1).await?);
    println!(
        "task {task} is {} ({})",
        state.status(),
        state.status_display()
    );
    for resume in &state.resumes {
        println!(
            "attempt {} skipped {:?} and saved ${:.2}",
            resume.attempt,
            resume.skipped,
            resume.saved.cost_micros as f64 / 1e6
        );
    }
    if let Some(publish) = state.step("publish").and_then(|s| s.items.get(&1)) {
        println!("published: {}", publish.output.clone().unwrap_or_default());
    }
    let url = db::parse_url(&server)?.database("reel_example");
    println!(
        "\nthe reel CLI reads it from the log alone, e.g.:\n  DATABASE_URL=postgres://{}@{}:{}/reel_example cargo run -q -- replay {task}",
        url.get_username(),
        url.get_host(),
        url.get_port()
    );
    Ok(())
}
