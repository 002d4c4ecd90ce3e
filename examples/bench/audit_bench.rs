//! Audit rows: `reel audit --all` over many tasks of ~100 events — wall time and peak
//! memory of the real binary (built here in release mode), sampled from /proc.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::postgres::PgPool;

use crate::Report;

/// Events per synthetic task: submitted, claimed, status, step_started, 95 completions,
/// step_completed, status, review_requested.
const EVENTS_PER_TASK: i32 = 102;

pub(crate) async fn run(
    report: &mut Report,
    pool: &PgPool,
    url: &str,
    quick: bool,
) -> anyhow::Result<()> {
    let tasks = if quick { 1_000 } else { 10_000 };
    seed(pool, tasks).await?;
    let reel = build_reel()?;
    let started = Instant::now();
    let mut child = Command::new(&reel)
        .args(["audit", "--all", "--channel", "bench-audit"])
        .env("DATABASE_URL", url)
        .env("REEL_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()?;
    let mut peak_kib = 0;
    let status = loop {
        if let Some(kib) = peak_rss_kib(child.id()) {
            peak_kib = peak_kib.max(kib);
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let wall = started.elapsed();
    anyhow::ensure!(
        status.success(),
        "reel audit --all found problems or failed: {status}"
    );
    report.add(
        format!("reel audit --all: {tasks} tasks x {EVENTS_PER_TASK} events, wall (goal < 10 s)"),
        wall.as_secs_f64(),
        "s",
    );
    report.add(
        "reel audit --all: peak RSS (goal < 200 MB)",
        peak_kib as f64 / 1024.0,
        "MiB",
    );
    Ok(())
}

/// Writes `tasks` valid histories straight into the tables (fast, one statement each).
async fn seed(pool: &PgPool, tasks: i64) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO tasks (id, workflow, channel_id, status, version) \
         SELECT gen_random_uuid(), 'bench-audit', 'bench-audit', 'final_review', $2 FROM generate_series(1, $1)",
    )
    .bind(tasks)
    .bind(EVENTS_PER_TASK)
    .execute(pool)
    .await?;
    sqlx::query(
        r#"INSERT INTO events (stream_id, stream_version, event_id, event_type, payload)
        SELECT t.id, v, gen_random_uuid(),
          CASE WHEN v = 1 THEN 'task_submitted' WHEN v = 2 THEN 'task_claimed'
               WHEN v IN (3, 101) THEN 'status_changed' WHEN v = 4 THEN 'step_started'
               WHEN v = 100 THEN 'step_completed' WHEN v = 102 THEN 'review_requested'
               ELSE 'item_completed' END,
          CASE WHEN v = 1 THEN '{"workflow": "bench-audit", "channel_id": "bench-audit", "input": {}}'::jsonb
               WHEN v = 2 THEN '{"worker_id": "w", "lease_epoch": 1, "attempt": 1}'
               WHEN v = 3 THEN '{"from": "queued", "to": "generating_video"}'
               WHEN v = 4 THEN '{"step": "video", "attempt": 1, "items": 95}'
               WHEN v = 100 THEN '{"step": "video", "attempt": 1}'
               WHEN v = 101 THEN '{"from": "generating_video", "to": "final_review"}'
               WHEN v = 102 THEN '{}'
               ELSE jsonb_build_object('step', 'video', 'item', v - 4, 'attempt', 1, 'artifact',
                    'video/' || (v - 4) || '.mp4', 'cost_micros', 550000, 'duration_ms', 300000) END
        FROM tasks t CROSS JOIN generate_series(1, $1) v WHERE t.workflow = 'bench-audit'"#,
    )
    .bind(EVENTS_PER_TASK)
    .execute(pool)
    .await?;
    sqlx::query("ANALYZE events").execute(pool).await?;
    Ok(())
}

/// Builds the `reel` binary next to this bench (same profile) and returns its path.
pub(crate) fn build_reel() -> anyhow::Result<std::path::PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let release = !cfg!(debug_assertions);
    let mut build = Command::new(cargo);
    build.args(["build", "-q", "--bin", "reel"]);
    if release {
        build.arg("--release");
    }
    anyhow::ensure!(build.status()?.success(), "cannot build the reel binary");
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|examples| examples.parent())
        .ok_or_else(|| anyhow::anyhow!("no target dir"))?;
    Ok(dir.join("reel"))
}

/// The process's peak resident set so far (VmHWM), from /proc.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmHWM:")
}

/// A memory field of a process's `/proc/PID/status` (`VmRSS:`, `VmHWM:`), in KiB.
pub(crate) fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
