//! `reel-deploy-fixture`: the `reel` command line with a small workflow in two versions,
//! for the rolling-deploy tests (`tests/deploys.rs`), which run it as real worker processes
//! and SIGKILL them, and the worker metrics tests (`tests/metrics.rs`). `FIXTURE_WORKFLOW` picks what the binary registers:
//!
//! - `v1`: step `frames` (6 items, a call each), then `render` (2 provider jobs);
//! - `v2`: `stills` (6 items), `film` (2 jobs), then `captions` (once) — no upgrade rules;
//! - `v2-accepts`: `v2` that takes over v1 tasks (`frames` renamed `stills`, `render`
//!   renamed `film`).
//!
//! The "provider" is a table in the test's database: every item run is a row of
//! `fixture_runs` (with the version whose code ran it), every submit request a row of
//! `fixture_submits`, and every job the provider accepted (once per idempotency key, as a
//! provider that honours keys does) a row of `fixture_jobs`; a job is done `FIXTURE_JOB_MS`
//! after it was accepted.

use std::process::ExitCode;
use std::time::Duration;

use engine::prelude::*;
use engine::{BoxFuture, Submission};
use serde_json::{Value, json};
use sqlx::postgres::{PgPool, PgPoolOptions};

fn millis(name: &str, default: u64) -> Duration {
    Duration::from_millis(
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

fn pool() -> PgPool {
    let url = std::env::var("DATABASE_URL").unwrap_or_default();
    PgPoolOptions::new()
        .max_connections(4)
        .connect_lazy(&url)
        .expect("DATABASE_URL")
}

fn transient(err: sqlx::Error) -> StepError {
    StepError::transient(format!("fixture provider: {err}"))
}

/// A call step: each item is a row of `fixture_runs`, then a few naps.
fn calls(name: &'static str, version: u32, items: u32, db: PgPool) -> Step {
    let nap = millis("FIXTURE_ITEM_MS", 200);
    Step::fan_out(
        name,
        move |_: &Plan| Ok(items),
        move |ctx: StepContext, item: u32| {
            let db = db.clone();
            async move {
                sqlx::query(
                    "INSERT INTO fixture_runs (task_id, step, item, version) VALUES ($1, $2, $3, $4)",
                )
                .bind(ctx.task_id.as_uuid())
                .bind(name)
                .bind(item as i32)
                .bind(version as i32)
                .execute(&db)
                .await
                .map_err(transient)?;
                // From one to four naps, by task: tasks drift apart, so that a kill finds
                // some in the middle of their calls and others waiting on their jobs.
                let naps = 1 + (ctx.task_id.as_uuid().as_u128() % 4) as u32;
                tokio::time::sleep(nap * naps).await;
                ItemOutput::value(json!({ "ran_on": version }))
            }
        },
    )
}

/// A job step whose provider is the `fixture_jobs` table.
struct Jobs {
    version: u32,
    items: u32,
    db: PgPool,
    takes: Duration,
}

impl JobWork for Jobs {
    fn plan(&self, _input: &Value) -> Result<u32, StepError> {
        Ok(self.items)
    }

    fn submit(
        &self,
        ctx: StepContext,
        item: u32,
        submission: Submission,
    ) -> BoxFuture<Result<Value, StepError>> {
        let (db, version) = (self.db.clone(), self.version);
        Box::pin(async move {
            let key = submission.idempotency_key;
            sqlx::query(
                "INSERT INTO fixture_submits (key, task_id, item, version) VALUES ($1, $2, $3, $4)",
            )
            .bind(&key)
            .bind(ctx.task_id.as_uuid())
            .bind(item as i32)
            .bind(version as i32)
            .execute(&db)
            .await
            .map_err(transient)?;
            sqlx::query(
                "INSERT INTO fixture_jobs (key, task_id, item, version) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (key) DO NOTHING",
            )
            .bind(&key)
            .bind(ctx.task_id.as_uuid())
            .bind(item as i32)
            .bind(version as i32)
            .execute(&db)
            .await
            .map_err(transient)?;
            Ok(json!({ "key": key }))
        })
    }

    fn poll(
        &self,
        _ctx: StepContext,
        _item: u32,
        job: Value,
    ) -> BoxFuture<Result<JobStatus, StepError>> {
        let (db, version, takes) = (self.db.clone(), self.version, self.takes);
        Box::pin(async move {
            let key = job["key"].as_str().unwrap_or_default().to_owned();
            let done: Option<bool> = sqlx::query_scalar(
                "SELECT now() - accepted_at >= make_interval(secs => $2) FROM fixture_jobs WHERE key = $1",
            )
            .bind(&key)
            .bind(takes.as_secs_f64())
            .fetch_optional(&db)
            .await
            .map_err(transient)?;
            match done {
                None => Ok(JobStatus::Failed(StepError::transient(format!(
                    "no job {key}"
                )))),
                Some(true) => Ok(JobStatus::Done(ItemOutput::value(
                    json!({ "polled_on": version }),
                )?)),
                Some(false) => Ok(JobStatus::Pending {
                    next_poll: Some(Duration::from_millis(1000)),
                }),
            }
        })
    }
}

/// `FIXTURE_CAP=N` puts the job steps on provider key `fixture`, at most N jobs in flight.
fn jobs(name: &'static str, version: u32, db: PgPool) -> Step {
    let step = Step::jobs(
        name,
        Jobs {
            version,
            items: 2,
            db,
            takes: millis("FIXTURE_JOB_MS", 1500),
        },
    )
    .min_poll_interval(Duration::from_millis(100));
    match std::env::var("FIXTURE_CAP")
        .ok()
        .and_then(|cap| cap.parse().ok())
    {
        Some(cap) => step.provider(engine::ProviderLimits::new("fixture").max_in_flight(cap)),
        None => step,
    }
}

fn v1(db: &PgPool) -> Workflow {
    Workflow::new("deployed")
        .step(calls("frames", 1, 6, db.clone()))
        .step(jobs("render", 1, db.clone()))
}

fn v2(db: &PgPool) -> Workflow {
    Workflow::new("deployed")
        .version(2)
        .step(calls("stills", 2, 6, db.clone()))
        .step(jobs("film", 2, db.clone()))
        .step(calls("captions", 2, 1, db.clone()))
}

fn main() -> ExitCode {
    reel::main(|_settings: &reel::WorkerSettings| {
        let db = pool();
        match std::env::var("FIXTURE_WORKFLOW").as_deref() {
            Ok("v2") => Registry::new().register(v2(&db)),
            Ok("v2-accepts") => Registry::new().register(
                v2(&db)
                    .accepts(1)
                    .renamed("frames", "stills")
                    .renamed("render", "film"),
            ),
            _ => Registry::new().register(v1(&db)),
        }
    })
}
