//! Wait rows (issue 32): how long parking a task on a signal takes, how soon a signal
//! makes its item run, and that a waiting task costs nothing while it waits.
//!
//! 300 tasks of a one-step workflow wait for the signal `go`; a worker (4 at a time)
//! parks them all; an idle worker's look for work is timed with none and with all of them
//! waiting; then a worker runs while the signals are sent one after another, and each
//! item notes when it ran. Workers run in this process, with pools built as `reel worker`
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
    let looks = if quick { 200 } else { 1000 };
    // An idle worker looks for work once per poll interval (or notification), whatever
    // waits; what a look costs with nothing waiting, for the row below.
    let idle_nothing = idle_claim_p50(store, looks).await?;
    report.add(
        "waits: idle worker's look for work, no task waiting, p50",
        idle_nothing,
        "ms",
    );
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
    // Waiting costs nothing: the same look, with every task parked.
    sqlx::raw_sql("ANALYZE tasks").execute(pool).await?;
    let idle_waiting = idle_claim_p50(store, looks).await?;
    report.add(
        format!("waits: idle worker's look for work, {tasks} tasks waiting, p50"),
        idle_waiting,
        "ms",
    );
    report.add(
        "waits: look for work, waiting / none (goal <= 1.2)",
        idle_waiting / idle_nothing.max(f64::MIN_POSITIVE),
        "x",
    );
    // The worker that is woken.
    let idle_store = own_pool(pool).await?;
    let stop = CancellationToken::new();
    let idle = tokio::spawn({
        let (registry, stop) = (registry.clone(), stop.clone());
        async move {
            Worker::new(idle_store, registry, options("waits-woken", false))
                .run(stop)
                .await
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Wake-ups: a signal, then the item runs (in the worker just started).
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

/// The p50 of an idle worker's look for work (a claim that finds nothing due), in ms.
async fn idle_claim_p50(store: &PgStore, looks: usize) -> anyhow::Result<f64> {
    let served = [engine::WorkflowVersion::from("gated")];
    let mut latencies = Vec::with_capacity(looks);
    let started = Instant::now();
    for _ in 0..looks {
        let look = Instant::now();
        let claimed = store
            .claim_next("waits-bench", Duration::from_secs(60), &[], &served)
            .await?;
        anyhow::ensure!(claimed.is_none(), "nothing should be due");
        latencies.push(look.elapsed());
    }
    Ok(Sample {
        latencies,
        wall: started.elapsed(),
    }
    .percentile_ms(0.5))
}
