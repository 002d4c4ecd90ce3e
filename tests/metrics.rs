//! Worker metrics (issue 29): `reel worker --metrics-listen` scraped while real worker
//! processes run (`reel-deploy-fixture`, see `tests/bin/deploy_fixture.rs`), the text parsed
//! with an OpenMetrics parser. Items completed by step equal the `item_completed` events the
//! worker wrote; a provider key at its cap reads in flight = cap with items waiting; the age
//! of the oldest runnable task grows while no worker runs it.

mod common;
#[path = "common/deploy_fixture.rs"]
mod deploy_fixture;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use deploy_fixture::{kill, provider_tables};
use engine::testing::{TestDatabase, free_port};
use openmetrics_parser::{MetricsExposition, OpenMetricsType, OpenMetricsValue};

fn fixture(db: &TestDatabase, workflow: &str, job_ms: u64) -> Command {
    deploy_fixture::fixture(db, workflow, 20, job_ms)
}

/// A worker of `workflow` serving metrics on a free port; returns it and the port.
fn worker(db: &TestDatabase, workflow: &str, job_ms: u64, envs: &[(&str, &str)]) -> (Child, u16) {
    let port = free_port().expect("a free port");
    let child = fixture(db, workflow, job_ms)
        .args([
            "worker",
            "--concurrency",
            "4",
            "--metrics-listen",
            &format!("127.0.0.1:{port}"),
        ])
        .envs(envs.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start a fixture worker");
    (child, port)
}

fn submit(db: &TestDatabase, workflow: &str, n: usize) {
    for _ in 0..n {
        let out = fixture(db, workflow, 0)
            .args(["submit", "--channel", "metrics", "--input", "{}"])
            .output()
            .expect("submit");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

type Exposition = MetricsExposition<OpenMetricsType, OpenMetricsValue>;

/// `/metrics`, parsed (waiting for the server to listen).
async fn scrape(port: u16) -> Exposition {
    let started = Instant::now();
    loop {
        match reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await {
            Ok(answer) => {
                assert!(answer.status().is_success(), "{}", answer.status());
                let content_type = answer.headers()["content-type"]
                    .to_str()
                    .expect("ascii")
                    .to_owned();
                assert!(
                    content_type.starts_with("application/openmetrics-text"),
                    "{content_type}"
                );
                let text = answer.text().await.expect("text");
                return openmetrics_parser::openmetrics::parse_openmetrics(&text)
                    .unwrap_or_else(|e| panic!("not OpenMetrics: {e:?}\n{text}"));
            }
            Err(err) => {
                assert!(
                    started.elapsed() < Duration::from_secs(20),
                    "no metrics server: {err}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The value of `family`'s sample with these labels (counters, gauges, info).
fn value(exposition: &Exposition, family: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let family = exposition.families.get(family)?;
    family.iter_samples().find_map(|sample| {
        let set = sample.get_labelset().ok()?;
        labels
            .iter()
            .all(|(name, value)| set.get_label_value(name) == Some(*value))
            .then(|| match &sample.value {
                OpenMetricsValue::Counter(counter) => counter.value.as_f64(),
                OpenMetricsValue::Gauge(n) | OpenMetricsValue::Unknown(n) => n.as_f64(),
                OpenMetricsValue::Info => 1.0,
                OpenMetricsValue::Histogram(h) => h.count.map_or(0.0, |c| c as f64),
                other => panic!("unexpected {other:?}"),
            })
    })
}

async fn events(db: &TestDatabase, event_type: &str, step: &str) -> f64 {
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type = $1 AND payload->>'step' = $2",
    )
    .bind(event_type)
    .bind(step)
    .fetch_one(db.pool())
    .await
    .expect("count");
    n as f64
}

async fn all_completed(db: &TestDatabase) -> bool {
    let open: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE status <> 'completed'")
        .fetch_one(db.pool())
        .await
        .expect("count");
    open == 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_counted_by_a_worker_equal_the_events_it_wrote() {
    let db = TestDatabase::create().await;
    provider_tables(&db).await;
    submit(&db, "v1", 3);
    let (mut child, port) = worker(&db, "v1", 200, &[]);
    let started = Instant::now();
    while !all_completed(&db).await {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "tasks not completed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = scrape(port).await;
    for step in ["frames", "render"] {
        let labels = [("workflow", "deployed"), ("step", step)];
        assert_eq!(
            value(&metrics, "reel_items_completed", &labels),
            Some(events(&db, "item_completed", step).await),
            "{step}"
        );
        assert_eq!(
            value(&metrics, "reel_item_duration_seconds", &labels),
            Some(events(&db, "item_completed", step).await),
            "one duration per item of {step}"
        );
    }
    assert_eq!(
        value(&metrics, "reel_items_completed", &[("step", "frames")]),
        Some(18.0)
    );
    assert_eq!(
        value(
            &metrics,
            "reel_task_runs",
            &[("workflow", "deployed"), ("outcome", "completed")]
        ),
        Some(3.0)
    );
    assert!(value(&metrics, "reel_task_claims", &[("workflow", "deployed")]) >= Some(3.0));
    // Unfinished tasks only: all three completed.
    assert_eq!(
        value(&metrics, "reel_tasks", &[("status", "completed")]),
        None
    );
    assert_eq!(
        value(&metrics, "reel_tasks", &[("status", "final_review")]),
        Some(0.0)
    );
    let age = value(&metrics, "reel_db_figures_age_seconds", &[]).expect("age");
    assert!(
        (0.0..engine::metrics::DB_FIGURES_TTL.as_secs_f64()).contains(&age),
        "{age}"
    );
    assert_eq!(
        value(&metrics, "reel_db_figure_reads_failed", &[]),
        Some(0.0)
    );
    assert_eq!(
        value(&metrics, "reel_oldest_runnable_task_age_seconds", &[]),
        Some(0.0)
    );
    assert!(value(&metrics, "reel_append_duration_seconds", &[]) > Some(0.0));
    assert!(value(&metrics, "reel_claim_duration_seconds", &[]) > Some(0.0));
    assert_eq!(
        value(
            &metrics,
            "reel_build",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    let health = reqwest::get(format!("http://127.0.0.1:{port}/healthz"))
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);
    kill(&mut child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_key_at_its_cap_reads_full_with_items_waiting() {
    let db = TestDatabase::create().await;
    provider_tables(&db).await;
    submit(&db, "v1", 3);
    let (mut child, port) = worker(&db, "v1", 30_000, &[("FIXTURE_CAP", "2")]);
    // Three tasks, two jobs each, at most two in flight: once two are accepted, the rest
    // wait for room.
    let started = Instant::now();
    let metrics = loop {
        let metrics = scrape(port).await;
        let waiting = value(&metrics, "reel_provider_waiting", &[("key", "fixture")]);
        if value(&metrics, "reel_provider_in_flight", &[("key", "fixture")]) == Some(2.0)
            && waiting >= Some(1.0)
        {
            break metrics;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "never at the cap"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(
        value(&metrics, "reel_provider_cap", &[("key", "fixture")]),
        Some(2.0)
    );
    let accepted: i64 = sqlx::query_scalar("SELECT count(*) FROM fixture_jobs")
        .fetch_one(db.pool())
        .await
        .expect("count");
    assert_eq!(accepted, 2, "the provider holds exactly the cap");
    kill(&mut child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oldest_runnable_task_ages_while_no_worker_runs_it() {
    let db = TestDatabase::create().await;
    provider_tables(&db).await;
    // A v1 task, and only a v2 worker (no upgrade rules): nobody runs it.
    submit(&db, "v1", 1);
    let (mut child, port) = worker(&db, "v2", 1500, &[]);
    let first = value(
        &scrape(port).await,
        "reel_oldest_runnable_task_age_seconds",
        &[],
    )
    .expect("age");
    // The database's figures are read again once they are older than their time to live.
    tokio::time::sleep(engine::metrics::DB_FIGURES_TTL + Duration::from_secs(1)).await;
    let later = value(
        &scrape(port).await,
        "reel_oldest_runnable_task_age_seconds",
        &[],
    )
    .expect("age");
    assert!(
        later >= first + engine::metrics::DB_FIGURES_TTL.as_secs_f64(),
        "{first} then {later}"
    );
    assert_eq!(
        value(&scrape(port).await, "reel_tasks", &[("status", "queued")]),
        Some(1.0)
    );
    kill(&mut child);
}

/// Review of issue 29: while PostgreSQL is down, `/metrics` still answers at once with the
/// last figures, says how old they are and counts the failed reads; `/healthz` says 503
/// within its 2 s bound; both recover when the server is back. Against a throwaway cluster
/// this test stops and starts itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_during_a_database_outage_serves_the_last_figures_and_says_how_old() {
    let cluster = common::cluster::Cluster::start()
        .unwrap_or_else(|why| panic!("cannot start a throwaway PostgreSQL cluster: {why}"));
    let url = cluster.url("reel");
    let migrate = Command::new(env!("CARGO_BIN_EXE_reel"))
        .args(["migrate", "--database-url", &url])
        .output()
        .expect("migrate");
    assert!(
        migrate.status.success(),
        "{}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    let port = free_port().expect("a free port");
    let mut child = Command::new(env!("CARGO_BIN_EXE_reel"))
        .args(["worker", "--metrics-listen", &format!("127.0.0.1:{port}")])
        .env("DATABASE_URL", &url)
        .env("REEL_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start reel worker");
    let before = scrape(port).await;
    assert!(value(&before, "reel_db_figures_age_seconds", &[]) < Some(1.0));
    let health = |port: u16| async move {
        reqwest::get(format!("http://127.0.0.1:{port}/healthz"))
            .await
            .expect("healthz")
    };
    assert_eq!(health(port).await.status(), 200);

    cluster.ctl("stop").expect("stop PostgreSQL");
    tokio::time::sleep(engine::metrics::DB_FIGURES_TTL + Duration::from_millis(500)).await;
    let asked = Instant::now();
    let during = scrape(port).await;
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "a scrape waits at most 2 s"
    );
    assert!(value(&during, "reel_db_figure_reads_failed", &[]) >= Some(1.0));
    assert!(
        value(&during, "reel_db_figures_age_seconds", &[])
            >= Some(engine::metrics::DB_FIGURES_TTL.as_secs_f64()),
        "the figures say they are old"
    );
    assert!(
        value(&during, "reel_tasks", &[("status", "final_review")]).is_some(),
        "the last figures are still served"
    );
    let asked = Instant::now();
    let answer = health(port).await;
    assert_eq!(answer.status(), 503);
    assert!(asked.elapsed() < Duration::from_secs(3));
    let body = answer.text().await.expect("body");
    assert!(
        !body.contains("127.0.0.1") && !body.contains("postgres"),
        "{body}"
    );

    cluster.ctl("start").expect("start PostgreSQL");
    let started = Instant::now();
    while health(port).await.status() != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "/healthz never recovered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let started = Instant::now();
    loop {
        let after = scrape(port).await;
        if value(&after, "reel_db_figures_age_seconds", &[]) < Some(1.0) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "figures never fresh again"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    kill(&mut child);
}
