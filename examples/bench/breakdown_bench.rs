//! Where an item's time goes: the engine's two hot paths run through a counting proxy
//! ([`Wire`]), with TLS as the server offers it (`sslmode=prefer`, the default) and without,
//! and every total is divided by the items run: round trips, statements, bytes and
//! transactions per item, and the wall time split into waiting on the server and the rest.

use std::time::{Duration, Instant};

use engine::prelude::*;
use engine::{Orchestrator, Worker, db};
use serde_json::json;
use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgSslMode};
use tokio_util::sync::CancellationToken;

use crate::Report;
use crate::engine_bench::claim;
use crate::wire::{Wire, WireCounts};
use crate::worker_bench::{ITEMS, noop_workflow, options, pipelined_noop_workflow, submit};

pub(crate) async fn run(
    report: &mut Report,
    pool: &PgPool,
    store: &PgStore,
    quick: bool,
) -> anyhow::Result<()> {
    let direct = pool.connect_options().as_ref().clone();
    let wire = Wire::start(direct.get_host(), direct.get_port()).await?;
    let proxied = direct
        .host("127.0.0.1")
        .port(wire.addr().port())
        .database("reel_bench");
    for (mode, tls) in [(PgSslMode::Prefer, true), (PgSslMode::Disable, false)] {
        let start = wire.snapshot();
        let through = proxied.clone().ssl_mode(mode);
        let label = if tls { "tls" } else { "plain" };
        for (workflow, scenario) in [
            (noop_workflow(None), "one-task"),
            (pipelined_noop_workflow(), "one-task pipelined"),
        ] {
            let (tasks, wall, counts, xacts) = one_task(
                &wire,
                pool,
                store,
                through.clone(),
                workflow,
                if quick { 10 } else { 40 },
            )
            .await?;
            rows(
                report,
                &format!("{scenario} {label}"),
                tls,
                tasks,
                wall,
                &counts,
                xacts,
            );
        }
        let (tasks, wall, counts, xacts) =
            four_at_a_time(&wire, pool, store, &through, if quick { 20 } else { 100 }).await?;
        rows(
            report,
            &format!("4-at-a-time {label}"),
            tls,
            tasks,
            wall,
            &counts,
            xacts,
        );
        check_tls(&wire.snapshot().since(&start), tls)?;
    }
    Ok(())
}

/// What one measured run did: tasks, wall time, the wire's counts, committed transactions.
type Measured = (usize, Duration, WireCounts, i64);

/// Scenario A, `engine_bench::orchestrator_overhead` through the proxy: tasks claimed and
/// run one after another, on a pool like the bench's own (no ping before a checkout).
async fn one_task(
    wire: &Wire,
    pool: &PgPool,
    store: &PgStore,
    through: PgConnectOptions,
    workflow: Workflow,
    tasks: usize,
) -> anyhow::Result<Measured> {
    let proxied = PgStore::new(
        PgPoolOptions::new()
            .max_connections(8)
            .test_before_acquire(false)
            .connect_with(through)
            .await?,
    );
    let orchestrator = Orchestrator::new(proxied.clone(), Registry::new().register(workflow));
    // Two warm-up tasks: connections made and statements prepared before measuring.
    let warm = create(store, 2).await?;
    let ids = create(store, tasks).await?;
    for task in warm {
        orchestrator
            .run(&claim(&proxied, task).await?, CancellationToken::new())
            .await?;
    }
    let mark = Mark::take(pool, proxied.pool(), wire).await?;
    for task in ids {
        let lease = claim(&proxied, task).await?;
        let outcome = orchestrator.run(&lease, CancellationToken::new()).await?;
        anyhow::ensure!(
            outcome == RunOutcome::Completed,
            "unexpected outcome {outcome:?}"
        );
    }
    let (wall, counts, xacts) = mark.finish(pool, proxied.pool(), wire).await?;
    proxied.pool().close().await;
    Ok((tasks, wall, counts, xacts))
}

/// Scenario B: one worker running 4 tasks at a time, its pool built as `reel worker` builds
/// it (`engine::db::connect`), so the engine's own pool settings are what is measured.
async fn four_at_a_time(
    wire: &Wire,
    pool: &PgPool,
    store: &PgStore,
    through: &PgConnectOptions,
    tasks: usize,
) -> anyhow::Result<Measured> {
    let url = through.to_url_lossy().to_string();
    let proxied = PgStore::new(db::connect(&url, 8).await?);
    let registry = Registry::new().register(noop_workflow(None));
    submit(store, 4).await?;
    Worker::new(
        proxied.clone(),
        registry.clone(),
        options("breakdown-warm", true),
    )
    .run(CancellationToken::new())
    .await?;
    submit(store, tasks).await?;
    let mark = Mark::take(pool, proxied.pool(), wire).await?;
    Worker::new(proxied.clone(), registry, options("breakdown", true))
        .run(CancellationToken::new())
        .await?;
    let (wall, counts, xacts) = mark.finish(pool, proxied.pool(), wire).await?;
    proxied.pool().close().await;
    Ok((tasks, wall, counts, xacts))
}

async fn create(store: &PgStore, n: usize) -> anyhow::Result<Vec<TaskId>> {
    let channel = ChannelId::parse("bench")?;
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        let task = NewTask::new("noop", channel.clone(), json!({}));
        ids.push(store.create_task(task).await?.task_id());
    }
    Ok(ids)
}

/// The start of a measured run: the wire's counts and the database's commits.
struct Mark {
    counts: WireCounts,
    commits: i64,
    started: Instant,
}

impl Mark {
    async fn take(pool: &PgPool, proxied: &PgPool, wire: &Wire) -> anyhow::Result<Mark> {
        let (commits, _) = commits(pool, proxied).await?;
        Ok(Mark {
            counts: wire.snapshot(),
            commits,
            started: Instant::now(),
        })
    }

    async fn finish(
        self,
        pool: &PgPool,
        proxied: &PgPool,
        wire: &Wire,
    ) -> anyhow::Result<(Duration, WireCounts, i64)> {
        let wall = self.started.elapsed();
        let counts = wire.snapshot().since(&self.counts);
        let (commits, flushes) = commits(pool, proxied).await?;
        // Not the run's: this mark's flushes, and the read of the start's count.
        Ok((wall, counts, commits - flushes - 1 - self.commits))
    }
}

/// `reel_bench`'s committed transactions (every client's), and how many of them were this
/// call's own. A backend reports its counts lazily: at most once a second, and one that
/// goes idle within a second of its last report waits 10 s. So every idle connection of
/// both pools is first told to report (`pg_stat_force_next_flush`, one transaction each).
async fn commits(pool: &PgPool, proxied: &PgPool) -> anyhow::Result<(i64, i64)> {
    let mut flushes = 0;
    for pool in [pool, proxied] {
        let mut idle = Vec::new();
        while let Some(conn) = pool.try_acquire() {
            idle.push(conn);
        }
        for conn in &mut idle {
            sqlx::query("SELECT pg_stat_force_next_flush()")
                .execute(&mut **conn)
                .await?;
        }
        flushes += idle.len() as i64;
    }
    let commits =
        sqlx::query_scalar("SELECT xact_commit FROM pg_stat_database WHERE datname = 'reel_bench'")
            .fetch_one(pool)
            .await?;
    Ok((commits, flushes))
}

/// `sslmode=prefer` must really have run over TLS (the server has `ssl = on`), and
/// `disable` must not: otherwise the rows would compare nothing.
fn check_tls(counts: &WireCounts, tls: bool) -> anyhow::Result<()> {
    let expected = if tls { counts.connections } else { 0 };
    anyhow::ensure!(
        counts.tls_connections == expected,
        "{} of {} connections through the proxy used TLS (expected {expected})",
        counts.tls_connections,
        counts.connections
    );
    Ok(())
}

fn rows(
    report: &mut Report,
    label: &str,
    tls: bool,
    tasks: usize,
    wall: Duration,
    counts: &WireCounts,
    xacts: i64,
) {
    let items = tasks as f64 * f64::from(ITEMS);
    let per = |n: u64| n as f64 / items;
    let ms = |ns: u64| ns as f64 / 1e6 / items;
    let name = |what: &str| format!("breakdown {label}: {what}");
    let wall_ns = u64::try_from(wall.as_nanos()).unwrap_or(u64::MAX);
    report.add(name("items/s"), items / wall.as_secs_f64(), "items/s");
    report.add(name("wall ms per item"), ms(wall_ns), "ms");
    report.add(name("round trips per item"), per(counts.round_trips), "x");
    if !tls {
        report.add(
            name("statements per item (Query + Execute)"),
            per(counts.statements()),
            "x",
        );
        report.add(
            name("parses per item (statements prepared anew)"),
            per(counts.parses),
            "x",
        );
        report.add(
            name("pings per item (round trips of a lone Sync)"),
            per(counts.pings),
            "x",
        );
    }
    report.add(name("bytes to server per item"), per(counts.to_server), "B");
    report.add(name("bytes to client per item"), per(counts.to_client), "B");
    report.add(
        name("transactions per item (xact_commit of reel_bench: all its clients)"),
        xacts as f64 / items,
        "x",
    );
    report.add(
        name("ms per item waiting on the server (summed over connections)"),
        ms(counts.waiting_ns),
        "ms",
    );
    report.add(
        name("ms per item in the engine (wall - server busy; incl. the proxy hop)"),
        ms(wall_ns.saturating_sub(counts.busy_ns)),
        "ms",
    );
}
