//! Retention rows (issue 31): the log at scale (millions of events of finished tasks,
//! written straight into the tables), its table and index sizes, the archive rate of the
//! real `reel archive` (release build) into a local directory, bytes per event in the
//! archive against in PostgreSQL, the append latency of a live task while archiving runs
//! against idle, and `reel replay` of an archived task against one in the log.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use engine::prelude::*;
use engine::{Event, Fence, NewEvent};
use serde_json::json;
use sqlx::postgres::PgPool;

use crate::{Report, Sample};

/// Events per synthetic task: submitted, claimed, status, step_started, 95 completions,
/// step_completed, status, task_completed.
const EVENTS_PER_TASK: i32 = 102;

pub(crate) async fn run(
    report: &mut Report,
    pool: &PgPool,
    store: &PgStore,
    url: &str,
    quick: bool,
) -> anyhow::Result<()> {
    // 10 million events (98,000 tasks) in full; a fiftieth of that with --quick.
    let tasks: i64 = if quick { 2_000 } else { 98_000 };
    let archived_tasks: u64 = if quick { 1_000 } else { 10_000 };
    let seeding = Instant::now();
    seed(pool, tasks).await?;
    report.add(
        format!(
            "retention: seed {} events ({tasks} finished tasks)",
            tasks * i64::from(EVENTS_PER_TASK)
        ),
        seeding.elapsed().as_secs_f64(),
        "s",
    );
    let (table, indexes, rows) = sizes(pool).await?;
    report.add(
        "retention: events table size",
        table as f64 / 1048576.0,
        "MiB",
    );
    report.add(
        "retention: events indexes size",
        indexes as f64 / 1048576.0,
        "MiB",
    );
    let pg_per_event = (table + indexes) as f64 / rows.max(1) as f64;
    report.add(
        "retention: bytes per event in PostgreSQL (table + indexes)",
        pg_per_event,
        "B",
    );

    // A live task that keeps appending, as a running pipeline does.
    let live = store
        .create_task(NewTask::new(
            "bench-live",
            ChannelId::parse("live")?,
            json!({}),
        ))
        .await?
        .task_id();
    let appends = if quick { 300 } else { 2_000 };
    let mut version = 1;
    let idle = append_loop(store, live, &mut version, appends, None).await?;

    let reel = super::audit_bench::build_reel()?;
    let archive_dir = tempfile::tempdir()?;
    let archive = |limit: u64, rate: Option<f64>| -> anyhow::Result<std::process::Child> {
        let mut args = vec![
            "archive".to_owned(),
            "--finished-before".into(),
            "0s".into(),
            "--channel".into(),
            "bench-retention".into(),
            "--limit".into(),
            limit.to_string(),
            "--to".into(),
            archive_dir.path().to_string_lossy().into_owned(),
            "--json".into(),
        ];
        if let Some(rate) = rate {
            args.extend(["--rate".into(), rate.to_string()]);
        }
        Ok(Command::new(&reel)
            .args(&args)
            .env("DATABASE_URL", url)
            .env("REEL_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()?)
    };

    // As fast as it goes (4 tasks at once), as a one-off `reel archive` does.
    let mut child = archive(archived_tasks, None)?;
    let started = Instant::now();
    let busy = append_loop(store, live, &mut version, usize::MAX, Some(&mut child)).await?;
    let output = child.wait_with_output()?;
    let wall = started.elapsed();
    anyhow::ensure!(output.status.success(), "reel archive failed");
    let run: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let events = run["events"].as_u64().unwrap_or(0);
    let bytes = run["bytes"].as_u64().unwrap_or(0);
    report.add(
        format!(
            "retention: reel archive, {} tasks: events/s",
            run["archived"]
        ),
        events as f64 / wall.as_secs_f64(),
        "ev/s",
    );
    report.add(
        "retention: bytes per event in the archive (gzip JSONL)",
        bytes as f64 / events.max(1) as f64,
        "B",
    );
    report.add("retention: append p50, idle", idle.percentile_ms(0.5), "ms");
    report.add(
        "retention: append p99, idle",
        idle.percentile_ms(0.99),
        "ms",
    );
    report.add(
        "retention: append p99, archiving at full speed",
        busy.percentile_ms(0.99),
        "ms",
    );
    report.add(
        "retention: append p99 at full speed / idle",
        busy.percentile_ms(0.99) / idle.percentile_ms(0.99),
        "x",
    );

    // Paced as `reel worker --retain` archives by default (20 tasks/s, ~2,000 events/s:
    // a thousand times what 1,000 videos a day add).
    let paced_tasks = if quick { 100 } else { 400 };
    let mut child = archive(paced_tasks, Some(20.0))?;
    let paced = append_loop(store, live, &mut version, usize::MAX, Some(&mut child)).await?;
    anyhow::ensure!(child.wait()?.success(), "reel archive --rate failed");
    let idle_again = append_loop(store, live, &mut version, appends, None).await?;
    report.add(
        "retention: append p99, idle again",
        idle_again.percentile_ms(0.99),
        "ms",
    );
    report.add(
        "retention: append p99, archiving at 20 tasks/s",
        paced.percentile_ms(0.99),
        "ms",
    );
    report.add(
        "retention: append p99 at 20 tasks/s / idle (goal <= 1.2)",
        paced.percentile_ms(0.99) / idle.percentile_ms(0.99).max(idle_again.percentile_ms(0.99)),
        "x",
    );
    let (table_after, indexes_after, _) = sizes(pool).await?;
    report.add(
        "retention: events table + indexes after archiving (before VACUUM)",
        (table_after + indexes_after) as f64 / 1048576.0,
        "MiB",
    );

    // Replay: a task still in the log, then an archived one.
    let in_log: uuid::Uuid = sqlx::query_scalar(
        "SELECT id FROM tasks WHERE channel_id = 'bench-retention' AND archived_at IS NULL LIMIT 1",
    )
    .fetch_one(pool)
    .await?;
    let archived: uuid::Uuid = sqlx::query_scalar(
        "SELECT id FROM tasks WHERE channel_id = 'bench-retention' AND archived_at IS NOT NULL LIMIT 1",
    )
    .fetch_one(pool)
    .await?;
    for (what, task) in [("in the log", in_log), ("archived", archived)] {
        let mut latencies = Vec::new();
        for _ in 0..10 {
            let at = Instant::now();
            let out = Command::new(&reel)
                .args(["replay", &task.to_string()])
                .env("DATABASE_URL", url)
                .env("REEL_LOG", "warn")
                .stdout(Stdio::null())
                .status()?;
            anyhow::ensure!(out.success(), "reel replay failed");
            latencies.push(at.elapsed());
        }
        let sample = Sample {
            latencies,
            wall: Duration::ZERO,
        };
        report.add(
            format!("retention: reel replay of a task {what} ({EVENTS_PER_TASK} events), p50"),
            sample.percentile_ms(0.5),
            "ms",
        );
    }
    Ok(())
}

/// Appends one `status_changed` at a time to `task`: `count` of them, or, with `until`,
/// until that process exits.
async fn append_loop(
    store: &PgStore,
    task: engine::TaskId,
    version: &mut u32,
    count: usize,
    mut until: Option<&mut std::process::Child>,
) -> anyhow::Result<Sample> {
    let statuses = [
        TaskStatus::from_static("generating_video"),
        TaskStatus::QUEUED,
    ];
    let started = Instant::now();
    let mut latencies = Vec::new();
    let mut at_status = TaskStatus::QUEUED;
    for i in 0..count {
        if let Some(child) = until.as_mut()
            && child.try_wait()?.is_some()
        {
            break;
        }
        let to = statuses[i % 2];
        let at = Instant::now();
        *version = store
            .append(
                task,
                *version,
                Fence::Unleased,
                &[NewEvent::new(Event::status_changed(at_status, to))],
            )
            .await?
            .version;
        latencies.push(at.elapsed());
        at_status = to;
        // A running pipeline appends an item every few milliseconds, not back to back.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(Sample {
        latencies,
        wall: started.elapsed(),
    })
}

/// The events table's and its indexes' sizes, and its row count estimate.
async fn sizes(pool: &PgPool) -> anyhow::Result<(i64, i64, i64)> {
    sqlx::query("ANALYZE events").execute(pool).await?;
    Ok(sqlx::query_as(
        "SELECT pg_table_size('events'), pg_indexes_size('events'), \
                (SELECT reltuples::bigint FROM pg_class WHERE relname = 'events')",
    )
    .fetch_one(pool)
    .await?)
}

/// Writes `tasks` finished histories straight into the tables, finished a day ago.
async fn seed(pool: &PgPool, tasks: i64) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO tasks (id, workflow, channel_id, status, version, updated_at) \
         SELECT gen_random_uuid(), 'bench-retention', 'bench-retention', 'completed', $2, \
                now() - interval '1 day' FROM generate_series(1, $1)",
    )
    .bind(tasks)
    .bind(EVENTS_PER_TASK)
    .execute(pool)
    .await?;
    // In slices, so that no statement holds millions of rows in one sort.
    let ids: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT id FROM tasks WHERE workflow = 'bench-retention' ORDER BY id")
            .fetch_all(pool)
            .await?;
    for slice in ids.chunks(5_000) {
        sqlx::query(
            r#"INSERT INTO events (stream_id, stream_version, event_id, event_type, payload, recorded_at)
            SELECT t.id, v, gen_random_uuid(),
              CASE WHEN v = 1 THEN 'task_submitted' WHEN v = 2 THEN 'task_claimed'
                   WHEN v IN (3, 101) THEN 'status_changed' WHEN v = 4 THEN 'step_started'
                   WHEN v = 100 THEN 'step_completed' WHEN v = 102 THEN 'task_completed'
                   ELSE 'item_completed' END,
              CASE WHEN v = 1 THEN '{"workflow": "bench-retention", "channel_id": "bench-retention", "input": {}}'::jsonb
                   WHEN v = 2 THEN '{"worker_id": "w", "lease_epoch": 1, "attempt": 1}'
                   WHEN v = 3 THEN '{"from": "queued", "to": "generating_video"}'
                   WHEN v = 4 THEN '{"step": "video", "attempt": 1, "items": 95}'
                   WHEN v = 100 THEN '{"step": "video", "attempt": 1}'
                   WHEN v = 101 THEN '{"from": "generating_video", "to": "completed"}'
                   WHEN v = 102 THEN '{}'
                   ELSE jsonb_build_object('step', 'video', 'item', v - 4, 'attempt', 1, 'artifact',
                        'video/' || (v - 4) || '.mp4', 'cost_micros', 550000, 'duration_ms', 300000) END,
              now() - interval '1 day'
            FROM unnest($2::uuid[]) AS t(id) CROSS JOIN generate_series(1, $1) v"#,
        )
        .bind(EVENTS_PER_TASK)
        .bind(slice)
        .execute(pool)
        .await?;
    }
    sqlx::query("VACUUM ANALYZE events").execute(pool).await?;
    Ok(())
}
