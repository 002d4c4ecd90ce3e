//! Worker rows: throughput of 1, 2 and 4 workers (4 tasks at a time each) and of 4 workers
//! of one task at a time, against one client's raw commits/s; a restarted worker's time to its first
//! item, the time from a task becoming runnable to its claim, and one claim's latency with
//! a short and a long queue.
//!
//! Workers run in this process, each with its own connection pool built as `reel worker`
//! builds it (as separate processes would have); items are no-ops, so the rows measure the engine and the database.

use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::prelude::*;
use engine::{Worker, WorkerOptions, db};
use serde_json::json;
use sqlx::ConnectOptions;
use sqlx::postgres::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::Report;
use crate::store_bench::{Via, concurrently, raw_inserts};

pub(crate) const ITEMS: u32 = 18;

pub(crate) fn noop_workflow(first_item: Option<Arc<Notify>>) -> Workflow {
    noop_steps(first_item, false)
}

/// The no-op workflow with its step pipelined (`Step::pipelined`): the next item starts
/// while the last one's completion is being written, so completions share commits.
pub(crate) fn pipelined_noop_workflow() -> Workflow {
    noop_steps(None, true)
}

fn noop_steps(first_item: Option<Arc<Notify>>, pipelined: bool) -> Workflow {
    let step = Step::fan_out(
        "clips",
        |_| Ok(ITEMS),
        move |_ctx: StepContext, item| {
            if let Some(first) = &first_item {
                first.notify_one();
            }
            async move { Ok(ItemOutput::new(format!("clip-{item}"), 0)) }
        },
    );
    Workflow::new("noop").step(if pipelined { step.pipelined() } else { step })
}

pub(crate) fn options(id: &str, until_idle: bool) -> WorkerOptions {
    WorkerOptions {
        concurrency: 4,
        poll_interval: Duration::from_millis(200),
        until_idle,
        ..WorkerOptions::new(id)
    }
}

/// How many times each worker layout runs.
const ROUNDS: usize = 3;

/// A worker pool's size: what `reel worker` gives up to 4 tasks at a time.
const POOL_SIZE: u32 = 8;

/// A worker's own pool, built as `reel worker` builds it (`engine::db::connect`), so the
/// engine's pool settings are measured.
pub(crate) async fn own_pool(pool: &PgPool) -> anyhow::Result<PgStore> {
    let url = pool.connect_options().to_url_lossy().to_string();
    Ok(PgStore::new(db::connect(&url, POOL_SIZE).await?))
}

/// Opens `n` of the pool's connections at once (and gives them back).
async fn warm(pool: &PgPool, n: u32) -> anyhow::Result<()> {
    let conns = futures_util::future::try_join_all((0..n).map(|_| pool.acquire())).await?;
    drop(conns);
    Ok(())
}

/// How long opening one new connection takes, through a pool of the server's URL as given
/// (TLS as the server offers it) and with TLS off.
async fn connect_ms(report: &mut Report, pool: &PgPool) -> anyhow::Result<()> {
    let url = pool.connect_options().to_url_lossy().to_string();
    let plain = format!(
        "{url}{}sslmode=disable",
        if url.contains('?') { "&" } else { "?" }
    );
    for (label, url) in [
        ("TLS as offered", url.as_str()),
        ("sslmode=disable", plain.as_str()),
    ] {
        let options = db::parse_url(url)?;
        let mut took = Vec::new();
        for _ in 0..5 {
            let started = Instant::now();
            let conn = options.connect().await?;
            took.push(started.elapsed());
            sqlx::Connection::close(conn).await?;
        }
        took.sort();
        report.add(
            format!("open one connection p50 ({label})"),
            took[took.len() / 2].as_secs_f64() * 1e3,
            "ms",
        );
    }
    Ok(())
}

pub(crate) async fn submit(store: &PgStore, n: usize) -> anyhow::Result<()> {
    let channel = ChannelId::parse("bench")?;
    for _ in 0..n {
        store
            .create_task(NewTask::new("noop", channel.clone(), json!({})))
            .await?;
    }
    Ok(())
}

pub(crate) async fn run(
    report: &mut Report,
    pool: &PgPool,
    store: &PgStore,
    quick: bool,
) -> anyhow::Result<()> {
    let tasks = if quick { 40 } else { 500 };
    let raw4 = concurrently(4, |_| {
        raw_inserts(pool.clone(), if quick { 200 } else { 1000 }, Via::Pool)
    })
    .await?;
    report.add(
        "raw INSERT rows/s (4 clients, pool, same run)",
        raw4.per_second(),
        "rows/s",
    );
    // One client's commits/s on a held connection: what "4 tasks at a time" should beat,
    // since 4 tasks in flight can share the server's commit work.
    let raw1 = raw_inserts(pool.clone(), if quick { 300 } else { 1500 }, Via::Held).await?;
    report.add(
        "raw INSERT commits/s (one client, held, same run)",
        raw1.per_second(),
        "rows/s",
    );
    // Each layout runs `ROUNDS` times, interleaved (so drift on the shared machine hits
    // them alike); the rows give each one's median.
    let layouts = [
        (1, 4, false),
        (2, 4, false),
        (4, 4, false),
        (4, 1, false),
        (1, 4, true),
        (4, 1, true),
    ];
    let mut runs: Vec<Vec<f64>> = vec![Vec::new(); layouts.len()];
    for _ in 0..ROUNDS {
        for (i, &(workers, concurrency, pipelined)) in layouts.iter().enumerate() {
            runs[i].push(run_workers(pool, store, tasks, workers, concurrency, pipelined).await?);
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    for (&(workers, concurrency, pipelined), items) in layouts.iter().zip(runs) {
        let items_per_s = median(items);
        let layout = format!(
            "{workers} worker(s) x concurrency {concurrency}{}",
            if pipelined { ", pipelined steps" } else { "" }
        );
        report.add(
            format!("{layout}: items/s (18 no-op items a task, median of {ROUNDS})"),
            items_per_s,
            "items/s",
        );
        if workers * concurrency == 4 {
            report.add(
                format!(
                    "{layout} (4 tasks at a time): items/s / raw INSERT commits/s of one \
                     client (held) (goal >= 1.5)"
                ),
                items_per_s / raw1.per_second(),
                "x",
            );
        }
        if (workers, concurrency, pipelined) == (4, 4, false) {
            report.add(
                "4 workers x 4: items/s / raw INSERT rows/s, 4 clients (goal >= 0.7)",
                items_per_s / raw4.per_second(),
                "x",
            );
        }
    }
    connect_ms(report, pool).await?;
    scrape_ms(report, pool, store, if quick { 5 } else { 20 }).await?;
    restart_to_first_item(report, pool, store).await?;
    runnable_to_claimed(report, pool, store, if quick { 10 } else { 40 }).await?;
    for queued in [10, 200_000] {
        let p50 = claim_p50s(
            pool,
            store,
            queued,
            0,
            1,
            &[vec![1]],
            if quick { 50 } else { 300 },
        )
        .await?[0];
        report.add(
            format!("claim p50 with {queued} queued tasks (goal < 5)"),
            p50,
            "ms",
        );
    }
    // Issue 28: one queue spread over three versions of the workflow; claims serving all
    // three and claims serving one of them, interleaved, so both see the same table.
    let claims = if quick { 50 } else { 300 };
    let p50 = claim_p50s(
        pool,
        store,
        200_000,
        0,
        3,
        &[vec![1, 2, 3], vec![1]],
        claims,
    )
    .await?;
    report.add(
        "claim p50 with 200000 queued tasks across 3 versions, serving all 3",
        p50[0],
        "ms",
    );
    report.add(
        "claim p50, same queue, serving 1 of the 3 (interleaved with the row above)",
        p50[1],
        "ms",
    );
    report.add(
        "claim p50 serving 3 versions / serving 1 (goal <= 1.2)",
        p50[0] / p50[1],
        "x",
    );
    // Finished tasks are older than the queue, so first in due order: the claim's index
    // must not hold them.
    let p50 = claim_p50s(pool, store, 200_000, 200_000, 3, &[vec![1, 2, 3]], claims).await?;
    report.add(
        "claim p50 with 200000 queued and 200000 finished tasks, 3 versions served",
        p50[0],
        "ms",
    );
    Ok(())
}

/// Runs `tasks` new tasks on `workers` workers of `concurrency` each, each worker with its
/// own pool; returns items/s.
pub(crate) async fn run_workers(
    pool: &PgPool,
    store: &PgStore,
    tasks: usize,
    workers: usize,
    concurrency: usize,
    pipelined: bool,
) -> anyhow::Result<f64> {
    // Each worker's connections are opened, and its statements prepared on them, before
    // the clock starts: a long-running worker does that once. (With TLS each connection
    // costs sqlx 0.9 about 90 ms: see `connect_ms`.)
    let mut stores = Vec::new();
    for _ in 0..workers {
        let worker_store = own_pool(pool).await?;
        warm(worker_store.pool(), POOL_SIZE).await?;
        stores.push(worker_store);
    }
    let layout = |stores: &[PgStore], name: &str| -> Vec<Worker> {
        stores
            .iter()
            .enumerate()
            .map(|(w, worker_store)| {
                let workflow = if pipelined {
                    pipelined_noop_workflow()
                } else {
                    noop_workflow(None)
                };
                Worker::new(
                    worker_store.clone(),
                    Registry::new().register(workflow),
                    WorkerOptions {
                        concurrency,
                        ..options(&format!("{name}-{w}"), true)
                    },
                )
            })
            .collect()
    };
    submit(store, 8 * workers * concurrency).await?;
    let warming: Vec<_> = layout(&stores, "warm")
        .into_iter()
        .map(|worker| tokio::spawn(worker.run(CancellationToken::new())))
        .collect();
    for worker in warming {
        worker.await??;
    }
    submit(store, tasks).await?;
    let started = Instant::now();
    let running: Vec<_> = layout(&stores, "bench")
        .into_iter()
        .map(|worker| tokio::spawn(worker.run(CancellationToken::new())))
        .collect();
    for worker in running {
        worker.await??;
    }
    Ok(tasks as f64 * f64::from(ITEMS) / started.elapsed().as_secs_f64())
}

/// `claim_next` latency with `queued` runnable tasks (and `finished` completed ones, a day
/// older) spread over `versions` versions, for each set of versions in `served`: the sets
/// take turns, claim after claim, so that each sees the same table. Each claim is released
/// again, so the queue keeps its length. The tasks are removed afterwards (they belong to
/// no workflow the other rows run), and the table vacuumed, so that the next row starts
/// from a clean index. Returns each set's p50, in milliseconds.
async fn claim_p50s(
    pool: &PgPool,
    store: &PgStore,
    queued: u32,
    finished: u32,
    versions: u32,
    served: &[Vec<u32>],
    claims: usize,
) -> anyhow::Result<Vec<f64>> {
    sqlx::query(
        "INSERT INTO tasks (id, workflow, workflow_version, channel_id, status, version, created_at) \
         SELECT gen_random_uuid(), 'claim_bench', 1 + n % $2, 'bench', 'completed', 1, \
                now() - interval '1 day' \
           FROM generate_series(1, $1) AS n",
    )
    .bind(i32::try_from(finished)?)
    .bind(i32::try_from(versions)?)
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO tasks (id, workflow, workflow_version, channel_id, status, version) \
         SELECT gen_random_uuid(), 'claim_bench', 1 + n % $2, 'bench', 'queued', 1 \
           FROM generate_series(1, $1) AS n",
    )
    .bind(i32::try_from(queued)?)
    .bind(i32::try_from(versions)?)
    .execute(pool)
    .await?;
    sqlx::raw_sql("ANALYZE tasks").execute(pool).await?;
    let sets: Vec<Vec<engine::WorkflowVersion>> = served
        .iter()
        .map(|set| {
            set.iter()
                .map(|v| engine::WorkflowVersion::new("claim_bench", *v))
                .collect()
        })
        .collect();
    let mut latencies = vec![Vec::with_capacity(claims); sets.len()];
    for _ in 0..claims {
        for (set, took) in sets.iter().zip(&mut latencies) {
            let started = Instant::now();
            let lease = store
                .claim_next("claim-bench", Duration::from_secs(60), &[], set)
                .await?
                .ok_or_else(|| anyhow::anyhow!("nothing to claim"))?;
            took.push(started.elapsed());
            store.release_lease(&lease).await?;
        }
    }
    sqlx::raw_sql(
        "DELETE FROM events WHERE stream_id IN (SELECT id FROM tasks WHERE workflow = 'claim_bench'); \
         DELETE FROM tasks WHERE workflow = 'claim_bench'",
    )
    .execute(pool)
    .await?;
    // A statement of its own: VACUUM cannot run inside the implicit transaction of several.
    sqlx::raw_sql("VACUUM tasks").execute(pool).await?;
    Ok(latencies
        .into_iter()
        .map(|mut took| {
            took.sort();
            took[took.len() / 2].as_secs_f64() * 1e3
        })
        .collect())
}

/// One `/metrics` scrape's database read (one statement: tasks per status, the oldest
/// runnable task, the provider keys) with 100,000 tasks in the table, 90% of them finished.
async fn scrape_ms(
    report: &mut Report,
    pool: &PgPool,
    store: &PgStore,
    reads: usize,
) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO tasks (id, workflow, channel_id, status, version, created_at) \
         SELECT gen_random_uuid(), 'scrape_bench', 'bench', \
                CASE WHEN n % 10 = 0 THEN 'queued' ELSE 'completed' END, 1, \
                now() - make_interval(secs => n) \
           FROM generate_series(1, 100000) AS n",
    )
    .execute(pool)
    .await?;
    sqlx::raw_sql("ANALYZE tasks").execute(pool).await?;
    let metrics = engine::metrics::Metrics::new();
    let mut took = Vec::with_capacity(reads);
    for _ in 0..reads {
        let started = Instant::now();
        metrics.read_database(store).await?;
        took.push(started.elapsed());
    }
    sqlx::raw_sql("DELETE FROM tasks WHERE workflow = 'scrape_bench'")
        .execute(pool)
        .await?;
    sqlx::raw_sql("VACUUM tasks").execute(pool).await?;
    took.sort();
    report.add(
        "/metrics database read p50 with 100000 tasks (1 statement, cached 5 s)",
        took[took.len() / 2].as_secs_f64() * 1e3,
        "ms",
    );
    Ok(())
}

/// A worker died holding a task's lease; the same worker id starts again.
async fn restart_to_first_item(
    report: &mut Report,
    pool: &PgPool,
    store: &PgStore,
) -> anyhow::Result<()> {
    submit(store, 1).await?;
    store
        .claim_next("phoenix", Duration::from_secs(60), &[], &["noop".into()])
        .await?
        .ok_or_else(|| anyhow::anyhow!("nothing to claim"))?;
    let first = Arc::new(Notify::new());
    let registry = Registry::new().register(noop_workflow(Some(first.clone())));
    let started = Instant::now();
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(
        Worker::new(own_pool(pool).await?, registry, options("phoenix", true))
            .run(shutdown.clone()),
    );
    first.notified().await;
    report.add(
        "restarted worker: start to first new item (goal < 500)",
        started.elapsed().as_secs_f64() * 1e3,
        "ms",
    );
    worker.await??;
    Ok(())
}

/// An idle worker (listening) and tasks submitted one by one: submit → task_claimed.
async fn runnable_to_claimed(
    report: &mut Report,
    pool: &PgPool,
    store: &PgStore,
    n: usize,
) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let registry = Registry::new().register(noop_workflow(None));
    let worker = tokio::spawn(
        Worker::new(own_pool(pool).await?, registry, options("idle", false)).run(shutdown.clone()),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let channel = ChannelId::parse("bench")?;
    let mut latencies = Vec::with_capacity(n);
    for _ in 0..n {
        let task = store
            .create_task(NewTask::new("noop", channel.clone(), json!({})))
            .await?
            .task_id();
        let submitted = Instant::now();
        loop {
            let claimed: Option<i64> = sqlx::query_scalar(
                "SELECT lease_epoch FROM tasks WHERE id = $1 AND lease_epoch > 0",
            )
            .bind(task.as_uuid())
            .fetch_optional(pool)
            .await?;
            if claimed.is_some() {
                latencies.push(submitted.elapsed());
                break;
            }
            anyhow::ensure!(
                submitted.elapsed() < Duration::from_secs(10),
                "task {task} never claimed"
            );
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    shutdown.cancel();
    worker.await??;
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    report.add(
        "runnable -> claimed p50 (idle worker, NOTIFY; goal < 50)",
        ms(latencies[latencies.len() / 2]),
        "ms",
    );
    report.add(
        "runnable -> claimed p95",
        ms(latencies[latencies.len() * 95 / 100]),
        "ms",
    );
    Ok(())
}
