//! Console rows (issue 30): a task page with 10,000 events; the tasks page over 100,000
//! tasks (unfiltered, by status, by text); what 50 browsers on the live stream add in
//! database transactions per second, against one browser, under the same stream of
//! status changes; and the console's memory with 50 browsers connected. The console
//! (`reel::console_router`) runs in a child process of its own (this program started with
//! [`CHILD_FLAG`]), served over real HTTP, so its resident memory is its own.

use std::time::{Duration, Instant};

use engine::prelude::*;
use engine::{Event, Fence, NewEvent};
use serde_json::json;
use sqlx::postgres::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{Report, Sample};

pub(crate) async fn run(
    report: &mut Report,
    pool: &PgPool,
    store: &PgStore,
    quick: bool,
) -> anyhow::Result<()> {
    let console = Child::start()?;
    let url = console.url.clone();
    let http = reqwest::Client::new();
    let rounds = if quick { 5 } else { 20 };

    // A task with 10,000 events: a step of 9,998 completed items.
    let task = store
        .create_task(NewTask::new(
            "bench",
            ChannelId::parse("console")?,
            json!({}),
        ))
        .await?
        .task_id();
    let mut version = 1;
    let mut events = vec![NewEvent::new(Event::StepStarted {
        step: "clips".into(),
        attempt: 1,
        items: 9_998,
        atomic: false,
    })];
    for item in 1..=9_998 {
        events.push(NewEvent::new(Event::ItemCompleted {
            step: "clips".into(),
            item,
            attempt: 1,
            artifact: format!("clips/{item}.mp4"),
            cost_micros: 550_000,
            duration_ms: 300,
            output: None,
        }));
        if events.len() == 500 {
            version = store
                .append(task, version, Fence::Unleased, &events)
                .await?
                .version;
            events.clear();
        }
    }
    store
        .append(task, version, Fence::Unleased, &events)
        .await?;
    let page = timed(&http, &format!("{url}/tasks/{task}"), rounds).await?;
    report.add(
        "console: a task page with 10,000 events, p50 (goal <= 300)",
        page.percentile_ms(0.5),
        "ms",
    );

    // 100,000 tasks (rows only: the list reads nothing else).
    sqlx::query(
        "INSERT INTO tasks (id, workflow, channel_id, status, version, created_at, updated_at) \
         SELECT gen_random_uuid(), 'bench', 'c' || (n % 20), \
                (ARRAY['queued','completed','failed','final_review'])[1 + n % 4], 1, \
                now() - n * interval '1 second', now() \
         FROM generate_series(1, 100000) AS n",
    )
    .execute(pool)
    .await?;
    sqlx::query("ANALYZE tasks").execute(pool).await?;
    for (what, query) in [
        ("unfiltered", ""),
        ("status=failed", "?status=failed"),
        ("channel=c7", "?channel=c7"),
        ("text search", "?q=final"),
    ] {
        let sample = timed(&http, &format!("{url}/{query}"), rounds).await?;
        report.add(
            format!("console: tasks page over 100,000 tasks, {what}, p50 (goal <= 100)"),
            sample.percentile_ms(0.5),
            "ms",
        );
    }

    // The live stream: the same changes with 1 browser and with 50, interleaved 3 times
    // (the changes' own transactions are most of the figure, and vary a little).
    let (mut ones, mut fifties, mut with_fifty) = (Vec::new(), Vec::new(), Vec::new());
    let idle = console.rss_kib();
    for _ in 0..3 {
        ones.push(live_load(store, pool, &url, 1, &console).await?.0);
        let (rate, rss) = live_load(store, pool, &url, 50, &console).await?;
        fifties.push(rate);
        with_fifty.push(rss as f64 / 1024.0);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (one, fifty) = (median(ones), median(fifties));
    report.add(
        "console: database transactions/s, 1 browser on /live (10 tasks x 5 changes/s)",
        one,
        "tx/s",
    );
    report.add(
        "console: database transactions/s, 50 browsers on /live, same changes",
        fifty,
        "tx/s",
    );
    report.add(
        "console: transactions/s added by 49 more browsers (goal <= 1; median of 3)",
        fifty - one,
        "tx/s",
    );
    report.add(
        "console: process resident memory, no browser",
        idle as f64 / 1024.0,
        "MiB",
    );
    report.add(
        "console: process resident memory, 50 browsers on /live (median of 3)",
        median(with_fifty),
        "MiB",
    );
    Ok(())
}

/// The argument that makes the bench program serve the console instead.
pub(crate) const CHILD_FLAG: &str = "--console-child";

/// Serves the console over `url`'s database on a free loopback port, printing the port
/// first; ends when its parent closes its stdin.
pub(crate) async fn serve_child(url: &str) -> anyhow::Result<()> {
    let store = engine::db::connect_store(url, 4).await?;
    let stop = CancellationToken::new();
    let app = reel::console_router(store, None, Vec::new(), stop.clone()).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("{}", listener.local_addr()?);
    let ended = stop.clone();
    std::thread::spawn(move || {
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
        ended.cancel();
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await?;
    Ok(())
}

/// The console's process (killed when dropped).
struct Child {
    process: std::process::Child,
    url: String,
}

impl Child {
    fn start() -> anyhow::Result<Child> {
        use std::io::BufRead;
        let mut process = std::process::Command::new(std::env::current_exe()?)
            .arg(CHILD_FLAG)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        std::io::BufReader::new(process.stdout.take().expect("piped")).read_line(&mut line)?;
        let address = line.trim();
        anyhow::ensure!(!address.is_empty(), "the console child did not start");
        Ok(Child {
            url: format!("http://{address}"),
            process,
        })
    }

    /// The console process's resident memory, in KiB.
    fn rss_kib(&self) -> u64 {
        super::audit_bench::proc_status_kib(self.process.id(), "VmRSS:").unwrap_or(0)
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// `rounds` GETs of `url` (after one to warm up).
async fn timed(http: &reqwest::Client, url: &str, rounds: usize) -> anyhow::Result<Sample> {
    http.get(url)
        .send()
        .await?
        .error_for_status()?
        .bytes()
        .await?;
    let started = Instant::now();
    let mut latencies = Vec::new();
    for _ in 0..rounds {
        let at = Instant::now();
        http.get(url)
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?;
        latencies.push(at.elapsed());
    }
    Ok(Sample {
        latencies,
        wall: started.elapsed(),
    })
}

/// With `browsers` reading `/live`, 10 tasks change status 5 times a second each for
/// 6 s. Returns the database's transactions per second meanwhile (the changes' own
/// included: the same in every call) and the process's RSS with the browsers connected.
async fn live_load(
    store: &PgStore,
    pool: &PgPool,
    url: &str,
    browsers: usize,
    console: &Child,
) -> anyhow::Result<(f64, u64)> {
    let mut streams = Vec::new();
    for _ in 0..browsers {
        let response = reqwest::get(format!("{url}/live")).await?;
        let mut response = response;
        streams.push(tokio::spawn(async move {
            let mut bytes = 0usize;
            while let Ok(Some(chunk)) = response.chunk().await {
                bytes += chunk.len();
            }
            bytes
        }));
    }
    let channel = ChannelId::parse("live")?;
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let id = store
            .create_task(NewTask::new("bench", channel.clone(), json!({})))
            .await?
            .task_id();
        tasks.push((id, 1u32, TaskStatus::QUEUED));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let commits = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database \
             WHERE datname = current_database()",
        )
        .fetch_one(pool)
        .await
    };
    let before = commits().await?;
    let started = Instant::now();
    let statuses = [
        TaskStatus::from_static("generating_video"),
        TaskStatus::QUEUED,
    ];
    let mut tick = 0;
    while started.elapsed() < Duration::from_secs(6) {
        for (id, version, status) in &mut tasks {
            let to = statuses[tick % 2];
            *version = store
                .append(
                    *id,
                    *version,
                    Fence::Unleased,
                    &[NewEvent::new(Event::status_changed(*status, to))],
                )
                .await?
                .version;
            *status = to;
        }
        tick += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // pg_stat_database is updated when a backend reports (at most every 500 ms idle).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let rate = (commits().await? - before) as f64 / started.elapsed().as_secs_f64();
    let rss = console.rss_kib();
    for stream in streams {
        stream.abort();
    }
    Ok((rate, rss))
}
