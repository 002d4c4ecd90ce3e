//! Wait rows (issue 32): how long parking a task on a signal takes, how soon a signal
//! makes its item run, and that a waiting task costs nothing while it waits.
//!
//! `TASKS` tasks of a one-step workflow wait for the signal `go`; a worker (4 at a time)
//! parks them all, then runs on while the signals are sent one after another; each item
//! notes when it ran. Workers run in this process, with pools built as `reel worker`
//! builds them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use engine::prelude::*;
use engine::{Worker, commands};
use sqlx::postgres::PgPool;
use tokio_util::sync::CancellationToken;

use crate::worker_bench::{options, own_pool};
use crate::{Report, Sample};

fn gated(ran: Arc<Mutex<HashMap<TaskId, Instant>>>) -> Workflow {
    Workflow::new("gated").step(Step::call("approve", move |ctx: StepContext| {
        let ran = ran.clone();
        async move {
            let go: bool = ctx.signal("go")?;
            ran.lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(ctx.task_id, Instant::now());
            Ok(Output::of(go))
        }
    }))
}

pub(crate) async fn run(
    report: &mut Report,
    pool: &PgPool,
    store: &PgStore,
    quick: bool,
) -> anyhow::Result<()> {
    let tasks = if quick { 50 } else { 300 };
    let ran = Arc::new(Mutex::new(HashMap::new()));
    let registry = Registry::new().register(gated(ran.clone()));
    let channel = ChannelId::parse("waits")?;
    let mut ids = Vec::with_capacity(tasks);
    for _ in 0..tasks {
        let task = store
            .create_task(NewTask::new(
                "gated",
                channel.clone(),
                serde_json::json!({}),
            ))
            .await?
            .task_id();
        ids.push(task);
    }
    // Parking: claim, run the item to its wait, record the wait and park, for every task.
    let started = Instant::now();
    let parking = Worker::new(
        own_pool(pool).await?,
        registry.clone(),
        options("waits-park", true),
    )
    .run_until_idle()
    .await?;
    let parked_in = started.elapsed();
    anyhow::ensure!(
        parking.waiting == tasks as u64,
        "expected {tasks} waiting runs: {parking:?}"
    );
    report.add(
        format!("waits: park {tasks} tasks on a signal (4 at a time), per task"),
        parked_in.as_secs_f64() * 1e3 / tasks as f64,
        "ms",
    );
    // Waiting costs nothing: a worker with every task parked claims nothing.
    let idle_store = own_pool(pool).await?;
    let before = statements(pool).await?;
    let stop = CancellationToken::new();
    let idle = tokio::spawn({
        let (registry, stop) = (registry.clone(), stop.clone());
        async move {
            Worker::new(idle_store, registry, options("waits-idle", false))
                .run(stop)
                .await
        }
    });
    tokio::time::sleep(Duration::from_secs(if quick { 2 } else { 5 })).await;
    let after = statements(pool).await?;
    let window = if quick { 2.0 } else { 5.0 };
    report.add(
        format!("waits: idle worker, {tasks} tasks waiting, transactions/s"),
        (after - before) as f64 / window,
        "/s",
    );
    // Wake-ups: a signal, then the item runs (the idle worker above is the one woken).
    let mut sent = Vec::with_capacity(tasks);
    let wall = Instant::now();
    for task in &ids {
        sent.push((*task, Instant::now()));
        commands::signal(store, *task, "go", "bench", &serde_json::json!(true), None).await?;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while ran.lock().unwrap_or_else(|p| p.into_inner()).len() < tasks {
        anyhow::ensure!(Instant::now() < deadline, "signalled tasks did not run");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let wall = wall.elapsed();
    stop.cancel();
    idle.await??;
    let ran = ran.lock().unwrap_or_else(|p| p.into_inner());
    let latencies = sent
        .iter()
        .filter_map(|(task, at)| ran.get(task).map(|r| r.saturating_duration_since(*at)))
        .collect();
    let sample = Sample { latencies, wall };
    report.add(
        "waits: signal sent -> its item runs, p50",
        sample.percentile_ms(0.5),
        "ms",
    );
    report.add(
        "waits: signal sent -> its item runs, p95",
        sample.percentile_ms(0.95),
        "ms",
    );
    Ok(())
}

/// Transactions the server has finished so far in the bench database (each autocommit
/// query of a worker is one).
async fn statements(pool: &PgPool) -> anyhow::Result<i64> {
    let (commits, rollbacks): (i64, i64) = sqlx::query_as(
        "SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(pool)
    .await?;
    Ok(commits + rollbacks)
}
