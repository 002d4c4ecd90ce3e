//! Append latency and throughput against a raw single-row INSERT on the same server.

use std::time::Instant;

use engine::prelude::*;
use engine::{Event, Fence, NewEvent};
use serde_json::json;
use sqlx::postgres::PgPool;

use crate::{Report, Sample};

/// How a measured loop reaches the database.
#[derive(Clone, Copy)]
pub(crate) enum Via {
    /// One connection held for the whole loop: the database's own cost.
    Held,
    /// A pool checkout per operation, as applications run (sqlx pings a connection on
    /// release, so each checkout costs an extra round trip).
    Pool,
}

/// Prints the store rows.
pub(crate) async fn run(
    report: &mut Report,
    pool: &PgPool,
    store: &PgStore,
    n: usize,
) -> anyhow::Result<()> {
    // Warm both paths (connections, plans, caches) before measuring.
    raw_inserts(pool.clone(), n / 10, Via::Pool).await?;
    let warm = new_task(store).await?;
    appends(store.clone(), warm, n / 10, Via::Pool).await?;

    for (via, label) in [(Via::Held, "held connection"), (Via::Pool, "pool")] {
        let raw = raw_inserts(pool.clone(), n, via).await?;
        report.add(
            format!("raw INSERT commit p50 ({label})"),
            raw.percentile_ms(0.50),
            "ms",
        );
        report.add(
            format!("raw INSERT commit p95 ({label})"),
            raw.percentile_ms(0.95),
            "ms",
        );
        report.add(
            format!("raw INSERT rows/s ({label})"),
            raw.per_second(),
            "rows/s",
        );
        let task = new_task(store).await?;
        let one = appends(store.clone(), task, n, via).await?;
        report.add(
            format!("append p50 ({label})"),
            one.percentile_ms(0.50),
            "ms",
        );
        report.add(
            format!("append p95 ({label})"),
            one.percentile_ms(0.95),
            "ms",
        );
        report.add(
            format!("append events/s ({label})"),
            one.per_second(),
            "events/s",
        );
        report.add(
            format!("append p50 / raw INSERT p50 ({label}; goal <= 1.3)"),
            one.percentile_ms(0.5) / raw.percentile_ms(0.5),
            "x",
        );
    }
    let floor_task = new_task(store).await?;
    let floor = fence_and_insert_floor(pool.clone(), floor_task, n).await?;
    report.add(
        "fence UPDATE + event INSERT, bare SQL p50 (held)",
        floor.percentile_ms(0.50),
        "ms",
    );

    let raw4 = concurrently(4, |_| raw_inserts(pool.clone(), n / 4, Via::Pool)).await?;
    report.add(
        "raw INSERT rows/s (4 clients, pool)",
        raw4.per_second(),
        "rows/s",
    );
    let mut tasks = Vec::new();
    for _ in 0..4 {
        tasks.push(new_task(store).await?);
    }
    let four = concurrently(4, |i| appends(store.clone(), tasks[i], n / 4, Via::Pool)).await?;
    report.add(
        "append events/s (4 writers, pool)",
        four.per_second(),
        "events/s",
    );
    report.add(
        "append p50 (4 writers, pool)",
        four.percentile_ms(0.50),
        "ms",
    );
    report.add(
        "append p95 (4 writers, pool)",
        four.percentile_ms(0.95),
        "ms",
    );
    report.add(
        "append events/s / raw rows/s (4 clients)",
        four.per_second() / raw4.per_second(),
        "x",
    );
    Ok(())
}

pub(crate) async fn new_task(store: &PgStore) -> anyhow::Result<TaskId> {
    let channel = ChannelId::parse("bench")?;
    Ok(store
        .create_task(NewTask::new("bench", channel, json!({})))
        .await?
        .task_id())
}

pub(crate) async fn raw_inserts(pool: PgPool, n: usize, via: Via) -> anyhow::Result<Sample> {
    let mut held = pool.acquire().await?;
    let payload = json!({"from": "queued", "to": "generating_assets"});
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        let insert = sqlx::query("INSERT INTO bench_raw (v, payload) VALUES ($1, $2)")
            .bind(i as i64)
            .bind(&payload);
        match via {
            Via::Held => insert.execute(&mut *held).await?,
            Via::Pool => insert.execute(&pool).await?,
        };
        latencies.push(t.elapsed());
    }
    Ok(Sample {
        latencies,
        wall: started.elapsed(),
    })
}

/// The least any fenced append can cost here: the fence UPDATE and one event INSERT in one
/// hand-written statement, with no version check, encoding or error translation.
async fn fence_and_insert_floor(pool: PgPool, task: TaskId, n: usize) -> anyhow::Result<Sample> {
    let mut conn = pool.acquire().await?;
    let payload = json!({"step": "video", "item": 3, "attempt": 1, "artifact": "video/3.mp4", "cost_micros": 550000, "duration_ms": 300000});
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        sqlx::query(
            "WITH fence AS (UPDATE tasks SET version = version + 1, updated_at = now() WHERE id = $1 RETURNING id, version) \
             INSERT INTO events (stream_id, stream_version, event_id, event_type, payload) \
             SELECT id, version, gen_random_uuid(), 'item_completed', $2 FROM fence",
        )
        .bind(task.as_uuid())
        .bind(&payload)
        .execute(&mut *conn)
        .await?;
        latencies.push(t.elapsed());
    }
    Ok(Sample {
        latencies,
        wall: started.elapsed(),
    })
}

/// The hot path's event: one item completion.
fn item_completed(i: usize) -> NewEvent {
    NewEvent::new(Event::ItemCompleted {
        step: "video".into(),
        item: i as u32 + 1,
        attempt: 1,
        artifact: format!("video/{i}.mp4"),
        cost_micros: 550_000,
        duration_ms: 300_000,
        output: None,
    })
}

async fn appends(store: PgStore, task: TaskId, n: usize, via: Via) -> anyhow::Result<Sample> {
    let mut held = store.pool().acquire().await?;
    let mut version = store.stream_version(task).await?;
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(n);
    for i in 0..n {
        let event = [item_completed(i)];
        let t = Instant::now();
        let appended = match via {
            Via::Held => {
                store
                    .append_in(&mut held, task, version, Fence::Unleased, &event)
                    .await?
            }
            Via::Pool => store.append(task, version, Fence::Unleased, &event).await?,
        };
        version = appended.version;
        latencies.push(t.elapsed());
    }
    Ok(Sample {
        latencies,
        wall: started.elapsed(),
    })
}

/// Runs `clients` copies of a measured loop at once; throughput is over the shared wall time.
pub(crate) async fn concurrently<F, Fut>(clients: usize, make: F) -> anyhow::Result<Sample>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Sample>> + Send + 'static,
{
    let started = Instant::now();
    let handles: Vec<_> = (0..clients).map(|i| tokio::spawn(make(i))).collect();
    let mut samples = Vec::new();
    for handle in handles {
        samples.push(handle.await??);
    }
    Ok(Sample::merge(samples, started.elapsed()))
}
