//! `reel console` in a real browser (issue 30): headless Chromium (Debian's `chromium` and
//! `chromium-driver`) over WebDriver, on seed scenario 9. A task whose clip 7 fails moves
//! through its statuses on the tasks page without a reload, each within 2 s of its
//! `status_changed`; its page shows clips 1–6 done on attempt 1, clip 7 failed, the
//! retry's lane with 1–6 skipped and the cost saved; signing in shows Approve, and
//! Approve completes the task with the actor in the log. The test saves a screenshot of
//! the task page.

#[path = "common/console.rs"]
mod console;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use console::{TOKEN, start_console, submit};
use engine::testing::{TestDatabase, free_port};
use fantoccini::{Client, ClientBuilder, Locator};
use futures_util::FutureExt;
use std::panic::AssertUnwindSafe;

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// chromedriver on a free port, and a headless Chromium session through it.
async fn browser() -> (Driver, Client) {
    let port = free_port().expect("a free port");
    let driver = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver (Debian's chromium-driver: see the README's prerequisites)");
    let driver = Driver(driver);
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1400,1000"],
        }),
    );
    let started = Instant::now();
    loop {
        match ClientBuilder::rustls()
            .expect("a WebDriver client")
            .capabilities(capabilities.clone())
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
        {
            Ok(client) => return (driver, client),
            Err(err) => {
                assert!(
                    started.elapsed() < Duration::from_secs(20),
                    "no WebDriver session: {err}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

async fn text_of(client: &Client, css: &str) -> Option<String> {
    client.find(Locator::Css(css)).await.ok()?.text().await.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_9_in_a_browser_live_statuses_the_resume_lane_and_approve() {
    let db = TestDatabase::create().await;
    let artifacts = tempfile::tempdir().expect("tempdir");
    let console = start_console(&db, &["--token", TOKEN]);
    let (_driver, client) = browser().await;
    // The session ends (and its browser with it) whether the checks pass or panic: killing
    // chromedriver alone would leave the browser running.
    let checked = AssertUnwindSafe(scenario_9(&db, artifacts.path(), &console, &client))
        .catch_unwind()
        .await;
    let _ = client.clone().close().await;
    if let Err(panic) = checked {
        std::panic::resume_unwind(panic);
    }
}

async fn scenario_9(
    db: &TestDatabase,
    artifacts: &std::path::Path,
    console: &console::ConsoleProcess,
    client: &Client,
) {
    client.goto(&console.url).await.expect("the tasks page");
    // A reload would drop this.
    client
        .execute("window.__stayed = true;", vec![])
        .await
        .expect("script");
    tokio::time::sleep(Duration::from_millis(500)).await;

    let task = submit(
        db,
        &["--channel", "main", "--topic", "Rome", "--fail", "video:7"],
    );
    let mut worker = Command::new(env!("CARGO_BIN_EXE_reel"))
        .args([
            "worker",
            "--until-idle",
            "--time-scale",
            "0.002",
            "--artifacts",
        ])
        .arg(artifacts)
        .env("DATABASE_URL", db.url())
        .env("REEL_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start a worker");
    // What the page shows for the task, and when.
    let cell = format!("tr[data-task=\"{task}\"] td.status");
    let mut seen: Vec<(DateTime<Utc>, String)> = Vec::new();
    let started = Instant::now();
    loop {
        if let Some(text) = text_of(client, &cell).await
            && seen.last().is_none_or(|(_, last)| *last != text)
        {
            seen.push((Utc::now(), text));
        }
        let done = worker.try_wait().expect("poll the worker").is_some();
        if done && seen.last().is_some_and(|(_, s)| s == "Final Review") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the page shows {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(worker.wait().expect("worker").success());
    let stayed = client
        .execute("return window.__stayed === true;", vec![])
        .await
        .expect("script");
    assert_eq!(stayed, serde_json::json!(true), "the page was reloaded");

    // Each status change shows (it, or a later one) within 2 s of its event.
    let changes: Vec<(DateTime<Utc>, String)> = sqlx::query_as(
        "SELECT recorded_at, payload->>'to_display' FROM events \
         WHERE stream_id = $1 AND event_type = 'status_changed' ORDER BY stream_version",
    )
    .bind(task.as_uuid())
    .fetch_all(db.pool())
    .await
    .expect("status changes");
    assert!(changes.len() >= 5, "{changes:?}");
    for (i, (at, display)) in changes.iter().enumerate() {
        let later: Vec<&String> = changes[i..].iter().map(|(_, d)| d).collect();
        let shown = seen
            .iter()
            .find(|(_, text)| later.contains(&text))
            .map(|(when, _)| *when)
            .unwrap_or_else(|| panic!("{display:?} never showed: {seen:?}"));
        let lag = (shown - *at).num_milliseconds();
        assert!(
            lag <= 2000,
            "{display:?} showed {lag} ms after its event ({seen:?})"
        );
    }

    // The task's page: clip 7 failed on attempt 1, attempt 2 skipped clips 1–6.
    client
        .goto(&format!("{}/tasks/{task}", console.url))
        .await
        .expect("the task page");
    let titles: Vec<String> = {
        let marks = client
            .find_all(Locator::Css("#timeline rect.mark title"))
            .await
            .expect("marks");
        let mut titles = Vec::new();
        for mark in marks {
            titles.push(
                mark.prop("textContent")
                    .await
                    .expect("title")
                    .unwrap_or_default(),
            );
        }
        titles
    };
    assert!(
        titles.iter().any(|t| t.starts_with("video 7 failed")),
        "{titles:?}"
    );
    for clip in 1..=6 {
        assert!(
            titles
                .iter()
                .any(|t| t.starts_with(&format!("video {clip}: skipped, done in attempt 1"))),
            "clip {clip}: {titles:?}"
        );
        assert!(
            titles
                .iter()
                .any(|t| t.starts_with(&format!("video {clip}: done in"))),
            "clip {clip} done on attempt 1"
        );
    }
    let lanes = client
        .find_all(Locator::Css("#timeline text.lane-name"))
        .await
        .expect("lanes");
    let mut lane_names = Vec::new();
    for lane in lanes {
        lane_names.push(lane.text().await.expect("lane"));
    }
    assert!(
        lane_names.contains(&"video · attempt 1".to_owned()),
        "{lane_names:?}"
    );
    assert!(
        lane_names.contains(&"video · attempt 2".to_owned()),
        "{lane_names:?}"
    );
    let saved = text_of(client, "dd.saved").await.expect("saved");
    assert!(
        saved.starts_with('$') && !saved.starts_with("$0.000"),
        "{saved}"
    );
    // Clicking a mark shows its event.
    client
        .find(Locator::Css("#timeline rect.mark.failed"))
        .await
        .expect("a failed mark")
        .click()
        .await
        .expect("click");
    let detail = text_of(client, "#detail").await.unwrap_or_default();
    assert!(detail.contains("item_failed"), "{detail}");
    let shot = client.screenshot().await.expect("screenshot");
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-task.png");
    std::fs::write(&path, &shot).expect("save the screenshot");
    assert!(shot.starts_with(b"\x89PNG"), "a PNG");

    // Not signed in: no Approve. Signed in: Approve completes it, naming the actor.
    assert!(client.find(Locator::Id("approve")).await.is_err());
    client
        .goto(&format!("{}/login", console.url))
        .await
        .expect("login page");
    client
        .find(Locator::Css("input[name=name]"))
        .await
        .expect("name")
        .send_keys("Browser Bea")
        .await
        .expect("type");
    client
        .find(Locator::Css("input[name=token]"))
        .await
        .expect("token")
        .send_keys(TOKEN)
        .await
        .expect("type");
    client
        .find(Locator::Css("form button[type=submit]"))
        .await
        .expect("sign in")
        .click()
        .await
        .expect("click");
    client
        .goto(&format!("{}/tasks/{task}", console.url))
        .await
        .expect("the task page");
    client
        .find(Locator::Id("approve"))
        .await
        .expect("Approve, signed in")
        .click()
        .await
        .expect("click");
    let started = Instant::now();
    while text_of(client, "dd.status").await.as_deref() != Some("Completed") {
        assert!(started.elapsed() < Duration::from_secs(10), "not completed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let actor: Option<String> = sqlx::query_scalar(
        "SELECT metadata->>'actor' FROM events WHERE stream_id = $1 \
         AND event_type = 'review_approved'",
    )
    .bind(task.as_uuid())
    .fetch_one(db.pool())
    .await
    .expect("approved");
    assert_eq!(actor.as_deref(), Some("console:Browser Bea"));
}
