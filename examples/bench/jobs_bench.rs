//! Provider-job rows: items in flight against a provider's cap under saturation, the
//! database load of an idle worker with 0 and with 1,000 parked tasks, and the time from a
//! job finishing at the provider to the engine seeing it done.
//!
//! The provider is an in-memory fake shared by in-process workers (each with its own
//! connection pool, as separate processes would have): a job runs for a fixed duration
//! from its submission, and the fake records what it saw.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use engine::prelude::*;
use engine::{BoxFuture, Event, ProviderLimits, Submission, Worker, WorkerOptions};
use serde_json::{Value, json};
use sqlx::postgres::{PgPool, PgPoolOptions};
use tokio_util::sync::CancellationToken;

use crate::Report;
use crate::worker_bench::own_pool;

/// What the fake provider saw of one job.
#[derive(Clone, Copy)]
struct Seen {
    submitted: Instant,
    /// When it finished at the provider.
    done: Instant,
    /// The first poll that found it done.
    seen_done: Option<Instant>,
}

struct FakeProvider {
    duration: Duration,
    /// Whether polls tell when to come back (like the simulated providers) or not (like
    /// Runway's task API).
    hints: bool,
    jobs: Mutex<Vec<Seen>>,
}

struct Jobs(Arc<FakeProvider>, u32);

impl JobWork for Jobs {
    fn plan(&self, _input: &Value) -> Result<u32, StepError> {
        Ok(self.1)
    }

    fn submit(&self, _: StepContext, _: u32, _: Submission) -> BoxFuture<Result<Value, StepError>> {
        let fake = self.0.clone();
        Box::pin(async move {
            let now = Instant::now();
            let mut jobs = fake.jobs.lock().expect("lock");
            jobs.push(Seen {
                submitted: now,
                done: now + fake.duration,
                seen_done: None,
            });
            Ok(json!({ "id": jobs.len() - 1 }))
        })
    }

    fn poll(&self, _: StepContext, _: u32, job: Value) -> BoxFuture<Result<JobStatus, StepError>> {
        let fake = self.0.clone();
        Box::pin(async move {
            let index = job["id"].as_u64().unwrap_or(0) as usize;
            let now = Instant::now();
            let mut jobs = fake.jobs.lock().expect("lock");
            let Some(seen) = jobs.get_mut(index) else {
                return Ok(JobStatus::Failed(StepError::transient("unknown job")));
            };
            if now < seen.done {
                let next_poll = fake.hints.then(|| seen.done - now);
                return Ok(JobStatus::Pending { next_poll });
            }
            seen.seen_done.get_or_insert(now);
            Ok(JobStatus::Done(ItemOutput::new(format!("job-{index}"), 0)))
        })
    }
}

fn workflow(fake: &Arc<FakeProvider>, items: u32, cap: u32, first_poll: Duration) -> Workflow {
    Workflow::new("jobs").step(
        Step::jobs("render", Jobs(fake.clone(), items))
            .poll_backoff(Backoff::exponential(first_poll, Duration::from_secs(30)))
            .provider(ProviderLimits::new("render").max_in_flight(cap)),
    )
}

async fn submit(store: &PgStore, n: usize) -> anyhow::Result<Vec<TaskId>> {
    let channel = ChannelId::parse("bench")?;
    let mut tasks = Vec::new();
    for _ in 0..n {
        let created = store
            .create_task(NewTask::new("jobs", channel.clone(), json!({})))
            .await?;
        tasks.push(created.task_id());
    }
    Ok(tasks)
}

/// Runs `workers` in-process workers until nothing is left.
async fn run_workers(
    pool: &PgPool,
    registry: &Registry,
    workers: usize,
    concurrency: usize,
) -> anyhow::Result<()> {
    let mut running = Vec::new();
    for w in 0..workers {
        let options = WorkerOptions {
            concurrency,
            poll_interval: Duration::from_millis(200),
            ..WorkerOptions::new(format!("jobs-bench-{w}"))
        };
        let worker = Worker::new(own_pool(pool).await?, registry.clone(), options);
        running.push(tokio::spawn(worker.run_until_idle()));
    }
    for worker in running {
        worker.await??;
    }
    Ok(())
}

async fn clear(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query("DELETE FROM tasks WHERE workflow = 'jobs'")
        .execute(pool)
        .await?;
    sqlx::query("DELETE FROM provider_slots")
        .execute(pool)
        .await?;
    Ok(())
}

pub(crate) async fn run(report: &mut Report, pool: &PgPool, quick: bool) -> anyhow::Result<()> {
    saturation(report, pool, quick).await?;
    idle_load(report, pool, quick).await?;
    resume_latency(report, pool, quick).await?;
    waiting_events(report, pool, quick).await?;
    Ok(())
}

/// (d) What waiting on a long job writes to the log: events per task-hour while a task
/// waits on a 2-hour job with no hint (the video step's backoff, 5 s doubling to 60 s), on
/// its own, and with a second item waiting for room behind it (a cap of 1). Run at a
/// scale of 1/50 (a 2-hour job takes 144 s; `--quick`: a 20-minute one) and counted over
/// the job's whole wait: the log grows with the poll schedule, not with a timer.
async fn waiting_events(report: &mut Report, pool: &PgPool, quick: bool) -> anyhow::Result<()> {
    let scale = 0.02;
    let job = Duration::from_secs(if quick { 1200 } else { 7200 });
    let backoff = Backoff::exponential(
        Duration::from_secs(5).mul_f64(scale),
        Duration::from_secs(60).mul_f64(scale),
    )
    .with_jitter(0.1);
    let mut registry = Registry::new();
    let mut fakes = Vec::new();
    for (name, items) in [("alone", 1), ("behind", 2)] {
        let fake = Arc::new(FakeProvider {
            duration: job.mul_f64(scale),
            hints: false,
            jobs: Mutex::new(Vec::new()),
        });
        registry = registry.register(
            Workflow::new(name).step(
                Step::jobs("render", Jobs(fake.clone(), items))
                    .poll_backoff(backoff)
                    .job_timeout(Duration::from_secs(3600))
                    .provider(ProviderLimits::new(name).max_in_flight(1)),
            ),
        );
        fakes.push(fake);
    }
    let store = PgStore::new(pool.clone());
    let channel = ChannelId::parse("bench")?;
    let mut tasks = Vec::new();
    for name in ["alone", "behind"] {
        let created = store
            .create_task(NewTask::new(name, channel.clone(), json!({})))
            .await?;
        tasks.push(created.task_id());
    }
    run_workers(pool, &registry, 1, 4).await?;
    let hours = job.as_secs_f64() / 3600.0;
    for (task, how) in tasks
        .iter()
        .zip(["on its own", "with an item waiting for room"])
    {
        let events = store.read_stream(*task, 1).await?;
        let submitted = events
            .iter()
            .position(|e| matches!(e.event, Event::ItemSubmitted { .. }))
            .unwrap_or(0);
        let done = events
            .iter()
            .position(|e| matches!(e.event, Event::ItemCompleted { .. }))
            .unwrap_or(events.len());
        let waiting = done.saturating_sub(submitted + 1);
        report.add(
            format!("jobs: waiting on a 2 h job {how}: events per task-hour (poll schedule, not a timer)"),
            waiting as f64 / hours,
            "events/h",
        );
    }
    sqlx::query("DELETE FROM tasks WHERE workflow IN ('alone', 'behind')")
        .execute(pool)
        .await?;
    clear(pool).await
}

/// (a) Three workers, ten tasks of 18 jobs, a cap of 5: how close to the cap the fleet
/// keeps the provider, and never above it. Jobs are polled first after a fifth of their
/// duration, then as the provider hints.
async fn saturation(report: &mut Report, pool: &PgPool, quick: bool) -> anyhow::Result<()> {
    let cap = 5;
    let duration = Duration::from_millis(if quick { 100 } else { 250 });
    let fake = Arc::new(FakeProvider {
        duration,
        hints: true,
        jobs: Mutex::new(Vec::new()),
    });
    let registry = Registry::new().register(workflow(&fake, 18, cap, duration / 5));
    let store = PgStore::new(pool.clone());
    submit(&store, 10).await?;
    run_workers(pool, &registry, 3, 4).await?;
    let jobs = fake.jobs.lock().expect("lock").clone();
    let first = jobs.iter().map(|j| j.submitted).min().expect("jobs ran");
    let last = jobs.iter().map(|j| j.done).max().expect("jobs ran");
    let mut edges: Vec<(Instant, i32)> = jobs
        .iter()
        .flat_map(|j| [(j.submitted, 1), (j.done, -1)])
        .collect();
    edges.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut now, mut most) = (0, 0);
    for (_, delta) in edges {
        now += delta;
        most = most.max(now);
    }
    let busy = duration.as_secs_f64() * jobs.len() as f64;
    let mean = busy / (last - first).as_secs_f64();
    report.add(
        format!("jobs: 3 workers x 10 tasks x 18 jobs of {duration:?}: cap"),
        f64::from(cap),
        "jobs",
    );
    report.add(
        "jobs: most in flight at the provider (goal <= cap)",
        f64::from(most),
        "jobs",
    );
    report.add(
        "jobs: mean in flight while saturated (goal close to cap)",
        mean,
        "jobs",
    );
    report.add(
        "jobs: provider kept busy (mean in flight / cap)",
        mean / f64::from(cap),
        "x",
    );
    clear(pool).await
}

/// Transactions the database committed or rolled back, per second, over `window`. Backends
/// report their counts when they go idle, at most every second, and an idle backend's last
/// counts can arrive up to 10 s later (PostgreSQL 15): callers let the setup's backends exit
/// first, so what is counted is the worker's.
async fn transactions_per_second(pool: &PgPool, window: Duration) -> anyhow::Result<f64> {
    let count = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database \
             WHERE datname = current_database()",
        )
        .fetch_one(pool)
        .await
    };
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before = count().await?;
    tokio::time::sleep(window).await;
    let after = count().await?;
    // Our own read is a transaction too.
    Ok((after - before - 1) as f64 / window.as_secs_f64())
}

/// (b) One idle worker's load on the database: with nothing to do, and with 1,000 tasks
/// parked on provider jobs (due in an hour). The claim looks only at due tasks through
/// an index, so the parked ones cost nothing.
async fn idle_load(report: &mut Report, pool: &PgPool, quick: bool) -> anyhow::Result<()> {
    let window = Duration::from_secs(if quick { 4 } else { 10 });
    let fake = Arc::new(FakeProvider {
        duration: Duration::from_secs(3600),
        hints: true,
        jobs: Mutex::new(Vec::new()),
    });
    let registry = Registry::new().register(workflow(&fake, 1, 100, Duration::from_secs(1)));
    // Everything but the worker runs on a pool of one connection that is closed before
    // each window, and earlier rows' counts are let through first.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let quiet = one_connection(pool).await?;
    let baseline = transactions_per_second(&quiet, window).await?;
    for parked in [0, 1000] {
        if parked > 0 {
            let setup = own_pool(pool).await?;
            let tasks = submit(&setup, parked).await?;
            let ids: Vec<uuid::Uuid> = tasks.iter().map(TaskId::as_uuid).collect();
            sqlx::query(
                "UPDATE tasks SET parked = true, next_run_at = now() + interval '1 hour', \
                 status = 'render' WHERE id = ANY($1)",
            )
            .bind(&ids)
            .execute(setup.pool())
            .await?;
            setup.pool().close().await;
        }
        let shutdown = CancellationToken::new();
        let worker = Worker::new(
            own_pool(pool).await?,
            registry.clone(),
            WorkerOptions::new("idle-bench"),
        );
        let running = tokio::spawn(worker.run(shutdown.clone()));
        let rate = transactions_per_second(&quiet, window).await? - baseline;
        shutdown.cancel();
        running.await??;
        report.add(
            format!("jobs: idle worker, {parked} parked tasks: transactions/s (goal <= 5, flat)"),
            rate,
            "tx/s",
        );
    }
    clear(pool).await
}

async fn one_connection(pool: &PgPool) -> anyhow::Result<PgPool> {
    let options = pool.connect_options().as_ref().clone();
    Ok(PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await?)
}

/// (c) From a job finishing at the provider to the engine seeing it done, with a provider
/// that says when to come back and one that does not (the step's poll backoff: 1 s
/// doubling to 30 s). Jobs take 3 s, so the tasks park in between.
async fn resume_latency(report: &mut Report, pool: &PgPool, quick: bool) -> anyhow::Result<()> {
    let tasks = if quick { 5 } else { 20 };
    for hints in [true, false] {
        let fake = Arc::new(FakeProvider {
            duration: Duration::from_secs(3),
            hints,
            jobs: Mutex::new(Vec::new()),
        });
        let registry = Registry::new().register(workflow(&fake, 1, 100, Duration::from_secs(1)));
        submit(&PgStore::new(pool.clone()), tasks).await?;
        // A slot for every task: the row measures polling and resuming, not queueing.
        run_workers(pool, &registry, 1, tasks).await?;
        let mut latencies: Vec<Duration> = fake
            .jobs
            .lock()
            .expect("lock")
            .iter()
            .filter_map(|j| j.seen_done.map(|seen| seen - j.done))
            .collect();
        latencies.sort();
        let at = |p: f64| {
            let i = ((latencies.len() as f64 - 1.0) * p).round() as usize;
            latencies.get(i).map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
        };
        let how = if hints {
            "provider hints when"
        } else {
            "no hint, 1 s doubling backoff"
        };
        report.add(
            format!("jobs: job done -> seen done p50 ({how})"),
            at(0.5),
            "ms",
        );
        report.add(
            format!("jobs: job done -> seen done p95 ({how})"),
            at(0.95),
            "ms",
        );
        clear(pool).await?;
    }
    Ok(())
}
