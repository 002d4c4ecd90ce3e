//! Pooler rows (issue 27): worker throughput straight to PostgreSQL and through a real
//! PgBouncer (Debian's, started here) in session and in transaction mode, one worker and
//! four (4 tasks at a time each), no-op items. Behind a transaction pooler every statement
//! is unnamed (parsed each time) and runs in a transaction of its own, and appends are not
//! shared between tasks: these rows say what that costs.

use std::time::Instant;

use engine::db::Pooler;
use engine::prelude::*;
use engine::testing::PgBouncer;
use engine::{Registry, Worker, WorkerOptions};
use sqlx::ConnectOptions;
use sqlx::postgres::PgPool;
use tokio_util::sync::CancellationToken;

use crate::Report;
use crate::worker_bench::{ITEMS, noop_workflow, options, submit};

/// A worker pool's size, as `reel worker --concurrency 4` makes it.
const POOL_SIZE: u32 = 8;

/// How a worker reaches the server.
struct Route {
    name: &'static str,
    url: String,
    pooler: Pooler,
}

async fn worker_store(route: &Route) -> anyhow::Result<PgStore> {
    let mut options = engine::db::parse_url(&route.url)?;
    if route.pooler == Pooler::Transaction {
        options = options.statement_cache_capacity(0);
    }
    let pool = engine::db::pool_options(POOL_SIZE)
        .connect_with(options)
        .await?;
    // Open the pool's connections before the clock starts, as a running worker has.
    let conns = futures_util::future::try_join_all((0..POOL_SIZE).map(|_| pool.acquire())).await?;
    drop(conns);
    let store = PgStore::new(pool).behind(route.pooler);
    Ok(match route.pooler {
        Pooler::Transaction => store.with_session_pool(None),
        Pooler::None | Pooler::Session => store,
    })
}

/// `tasks` tasks of 18 no-op items on `workers` workers of 4 tasks at a time: items/s.
async fn items_per_second(
    route: &Route,
    store: &PgStore,
    workers: usize,
    tasks: usize,
) -> anyhow::Result<f64> {
    let mut stores = Vec::new();
    for _ in 0..workers {
        stores.push(worker_store(route).await?);
    }
    submit(store, tasks).await?;
    let started = Instant::now();
    let running: Vec<_> = stores
        .into_iter()
        .enumerate()
        .map(|(w, worker_store)| {
            let worker = Worker::new(
                worker_store,
                Registry::new().register(noop_workflow(None)),
                WorkerOptions {
                    concurrency: 4,
                    ..options(&format!("pooler-{}-{w}", route.name), true)
                },
            );
            tokio::spawn(worker.run(CancellationToken::new()))
        })
        .collect();
    for worker in running {
        worker.await??;
    }
    Ok(tasks as f64 * f64::from(ITEMS) / started.elapsed().as_secs_f64())
}

pub(crate) async fn run(
    report: &mut Report,
    pool: &PgPool,
    store: &PgStore,
    quick: bool,
) -> anyhow::Result<()> {
    let tasks = if quick { 40 } else { 200 };
    let server = pool.connect_options();
    let direct = server.to_url_lossy().to_string();
    let database = server.get_database().unwrap_or("postgres").to_owned();
    let session = PgBouncer::start("session", server.get_host(), server.get_port())
        .map_err(anyhow::Error::msg)?;
    let transaction = PgBouncer::start("transaction", server.get_host(), server.get_port())
        .map_err(anyhow::Error::msg)?;
    let routes = [
        Route {
            name: "direct",
            url: direct,
            pooler: Pooler::None,
        },
        Route {
            name: "PgBouncer session",
            url: session.url(&database),
            pooler: Pooler::Session,
        },
        Route {
            name: "PgBouncer transaction",
            url: transaction.url(&database),
            pooler: Pooler::Transaction,
        },
    ];
    for workers in [1, 4] {
        for route in &routes {
            let rate = items_per_second(route, store, workers, tasks).await?;
            report.add(
                format!("pooler: {} x 4 tasks, {}: items/s", workers, route.name),
                rate,
                "items/s",
            );
        }
    }
    Ok(())
}
