//! Run with: cargo run --release --example bench [-- --json] [-- --quick]
//!
//! reel's benchmark program: prints a table (or, with `--json`, one JSON object per row with
//! `name`, `value`, `unit`). Everything runs against the same PostgreSQL server in the same
//! run, so ratios compare like with like. It uses (and recreates) the `reel_bench` database
//! on the server named by `DATABASE_URL`. `--quick` runs fewer iterations; `--only NAME`
//! (store, engine, worker, breakdown, projector, jobs, pooler, audit, traces, console,
//! retention, waits, wallclock) runs one group
//! of rows.

mod audit_bench;
mod breakdown_bench;
mod console_bench;
mod engine_bench;
/// The local fakes of the cloud APIs the tests use (real HTTP).
#[path = "../../tests/fakes/mod.rs"]
mod fakes;
mod jobs_bench;
mod pooler_bench;
mod projector_bench;
mod retention_bench;
mod store_bench;
mod trace_bench;
mod waits_bench;
mod wallclock_bench;
mod wire;
mod worker_bench;

use std::time::Duration;

use anyhow::Context;
use engine::db;
use engine::prelude::*;
use serde_json::json;
use sqlx::postgres::{PgPool, PgPoolOptions};

/// Prints rows as a table, or as JSON lines with `--json`.
pub(crate) struct Report {
    json: bool,
}

impl Report {
    pub(crate) fn add(&mut self, name: impl Into<String>, value: f64, unit: &'static str) {
        let name = name.into();
        if self.json {
            println!("{}", json!({"name": name, "value": value, "unit": unit}));
        } else {
            println!("{name:<60} {value:>12.3} {unit}");
        }
    }
}

/// Latencies of one measured loop.
pub(crate) struct Sample {
    pub(crate) latencies: Vec<Duration>,
    pub(crate) wall: Duration,
}

impl Sample {
    pub(crate) fn percentile_ms(&self, p: f64) -> f64 {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted
            .get(index)
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    }

    pub(crate) fn per_second(&self) -> f64 {
        self.latencies.len() as f64 / self.wall.as_secs_f64()
    }

    pub(crate) fn merge(samples: Vec<Sample>, wall: Duration) -> Sample {
        let latencies = samples.into_iter().flat_map(|s| s.latencies).collect();
        Sample { latencies, wall }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = dotenvy::dotenv();
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(console_bench::CHILD_FLAG) {
        // The console group's console, in a process of its own (its memory is its own).
        return console_bench::serve_child(&bench_url()?).await;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let mut report = Report {
        json: args.iter().any(|a| a == "--json"),
    };
    let iterations = if quick { 300 } else { 3000 };

    let pool = fresh_database().await?;
    let store = PgStore::new(pool.clone());
    store.migrate().await?;
    sqlx::query("CREATE TABLE bench_raw (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v bigint NOT NULL, payload jsonb NOT NULL)")
        .execute(&pool)
        .await?;
    if !report.json {
        println!("{:<60} {:>12} unit", "benchmark", "value");
        println!("{}", "-".repeat(75));
    }

    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let runs = |group: &str| only.as_deref().is_none_or(|o| o == group);
    if runs("store") {
        store_bench::run(&mut report, &pool, &store, iterations).await?;
    }
    if runs("engine") {
        engine_bench::run(&mut report, &pool, &store, quick).await?;
    }
    if runs("worker") {
        worker_bench::run(&mut report, &pool, &store, quick).await?;
    }
    if runs("breakdown") {
        breakdown_bench::run(&mut report, &pool, &store, quick).await?;
    }
    if runs("projector") {
        projector_bench::run(&mut report, &store, quick).await?;
    }
    if runs("jobs") {
        jobs_bench::run(&mut report, &pool, quick).await?;
    }
    if runs("pooler") {
        pooler_bench::run(&mut report, &pool, &store, quick).await?;
    }
    if runs("console") {
        console_bench::run(&mut report, &pool, &store, quick).await?;
    }
    if runs("traces") {
        trace_bench::run(&mut report, &pool, &store, quick).await?;
    }
    if runs("retention") {
        retention_bench::run(&mut report, &pool, &store, &bench_url()?, quick).await?;
    }
    if runs("waits") {
        waits_bench::run(&mut report, &pool, &store, quick).await?;
    }
    if runs("wallclock") {
        wallclock_bench::run(&mut report, &pool, quick).await?;
    }
    if runs("audit") {
        audit_bench::run(&mut report, &pool, &bench_url()?, quick).await?;
    }
    Ok(())
}

/// Drops and recreates `reel_bench`, so every run starts from the same empty state.
fn server_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| db::DEFAULT_URL.into())
}

/// The URL of the bench's own database.
fn bench_url() -> anyhow::Result<String> {
    let options = db::parse_url(&server_url())?.database("reel_bench");
    Ok(sqlx::ConnectOptions::to_url_lossy(&options).to_string())
}

async fn fresh_database() -> anyhow::Result<PgPool> {
    let server = server_url();
    let options = db::parse_url(&server)?;
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options.clone().database("postgres"))
        .await
        .with_context(|| format!("is PostgreSQL running at {server}?"))?;
    sqlx::raw_sql("DROP DATABASE IF EXISTS reel_bench WITH (FORCE)")
        .execute(&admin)
        .await?;
    sqlx::raw_sql("CREATE DATABASE reel_bench")
        .execute(&admin)
        .await?;
    admin.close().await;
    Ok(PgPoolOptions::new()
        .max_connections(8)
        .test_before_acquire(false)
        .connect_with(options.database("reel_bench"))
        .await?)
}
