//! Driving `reel-deploy-fixture` (tests/bin/deploy_fixture.rs): its command with a test
//! database, the tables its "provider" writes, and a kill. Shared by tests/deploys.rs and
//! tests/metrics.rs (included with `#[path]`, not through `common`).
#![allow(dead_code, unreachable_pub)]

use std::process::{Child, Command};

use engine::testing::TestDatabase;

pub const FIXTURE: &str = env!("CARGO_BIN_EXE_reel-deploy-fixture");

/// The fixture with `workflow` registered (`v1`, `v2`, `v2-accepts`) on `db`, items of
/// `item_ms` milliseconds (a base: one to four of them, by task) and jobs of `job_ms`.
pub fn fixture(db: &TestDatabase, workflow: &str, item_ms: u64, job_ms: u64) -> Command {
    let mut command = Command::new(FIXTURE);
    command
        .env("DATABASE_URL", db.url())
        .env("FIXTURE_WORKFLOW", workflow)
        .env("FIXTURE_ITEM_MS", item_ms.to_string())
        .env("FIXTURE_JOB_MS", job_ms.to_string())
        .env("REEL_LOG", "warn");
    command
}

/// The tables the fixture's steps write: every item run, every submit request, and every
/// job the provider accepted (once per idempotency key).
pub async fn provider_tables(db: &TestDatabase) {
    for sql in [
        "CREATE TABLE fixture_runs (task_id uuid, step text, item int, version int, at timestamptz DEFAULT clock_timestamp())",
        "CREATE TABLE fixture_submits (key text, task_id uuid, item int, version int)",
        "CREATE TABLE fixture_jobs (key text PRIMARY KEY, task_id uuid, item int, version int, accepted_at timestamptz DEFAULT clock_timestamp())",
    ] {
        sqlx::query(sql).execute(db.pool()).await.expect(sql);
    }
}

/// SIGKILL, then reap.
pub fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}
