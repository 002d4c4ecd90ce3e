//! The `notion-projector` binary as real processes: SIGKILL between a PATCH and the
//! checkpoint commit, SIGKILL while retries are pending, a leader and a standby, SIGTERM,
//! logs, metrics.

mod common;

use std::time::Duration;

use common::process::Process;
use common::*;
use engine::TaskStatus;
use tokio::process::Command;

/// SIGKILL after some PATCHes of a batch reached Notion but before its checkpoint commit:
/// the restarted projector re-reads the batch and the pages end in the same state.
#[tokio::test]
async fn sigkill_between_patch_and_checkpoint_redelivers_to_the_same_state() {
    let db = test_db().await;
    let store = db.store();
    let notion = fake().await;
    let mut expected = Vec::new();
    let statuses = [
        TaskStatus::from_static("generating_assets"),
        TaskStatus::from_static("generating_video"),
        TaskStatus::from_static("generating_audio"),
        TaskStatus::from_static("assembling"),
        TaskStatus::FINAL_REVIEW,
        TaskStatus::FAILED,
    ];
    for status in statuses {
        let page = new_page_id();
        notion.add_page(&page);
        let task = new_task(&store, Some(&page)).await;
        change_status(&store, task, status).await;
        expected.push((page, status));
    }
    let first = Process::start(&db, &notion, &notion.token(), &[]);
    // Requests go out one per 333 ms; the batch's checkpoint commits after the last one.
    wait_for(Duration::from_secs(10), || notion.count(200) >= 2)
        .await
        .expect("some PATCHes reached Notion");
    first.sigkill().await;
    let landed = notion.count(200);
    assert!(
        landed < statuses.len(),
        "killed mid-batch ({landed} landed)"
    );
    assert_eq!(
        checkpoint(&store, "notion").await.map(|c| c.position),
        Some(0),
        "killed before the checkpoint commit"
    );

    let second = Process::start(&db, &notion, &notion.token(), &[]);
    assert!(wait_caught_up(&store, "notion", Duration::from_secs(15)).await);
    let (status, _) = second.sigterm().await;
    assert!(status.success(), "graceful exit: {status:?}");
    for (page, status) in &expected {
        let shown = status.default_display();
        assert_eq!(notion.page_value(page).as_deref(), Some(&*shown));
        let history = notion.page_history(page);
        assert!(
            history.iter().all(|v| *v == shown),
            "only the latest status was ever sent: {history:?}"
        );
    }
    assert!(failures(&store).await.is_empty());
}

/// SIGKILL while retries are pending, with the checkpoint already past their events: the
/// restarted projector resumes them from `sync_retries`, every page ends on its task's
/// latest status, and no page ever shows an older status after a newer one.
#[tokio::test]
async fn sigkill_while_retries_are_pending_loses_nothing_and_never_goes_back() {
    let db = test_db().await;
    let store = db.store();
    let notion = fake().await;
    let tasks = tasks_with_pages(&store, &notion, 6).await;
    let (failing, healthy) = tasks.split_at(2);
    for (_, page) in failing {
        notion.set_page_outage(page, Some(503));
    }
    // Retries 0.5 to 3 s apart, never running out while the test needs them pending.
    let retries = [
        "--retry-base",
        "1s",
        "--retry-max",
        "3s",
        "--max-retries",
        "100",
    ];
    let first = Process::start(&db, &notion, &notion.token(), &retries);
    assert!(first.wait_log("leading", Duration::from_secs(10)).await);
    for status in &PIPELINE[..3] {
        for (task, _) in &tasks {
            change_status(&store, *task, *status).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Every failing task's latest status waits for a retry, and the checkpoint is past it.
    let latest = PIPELINE[2];
    let pending = wait_for_rows(&store, failing.len(), Duration::from_secs(20)).await;
    assert_eq!(
        pending,
        failing.len(),
        "each failing task has a pending retry"
    );
    assert!(wait_caught_up(&store, "notion", Duration::from_secs(10)).await);
    for (_, page) in healthy {
        assert_eq!(
            notion.page_value(page).as_deref(),
            Some(&*latest.default_display())
        );
    }
    first.sigkill().await;

    // While it is down: one failing and one healthy task move on; the others do not, so
    // only their recorded retries can bring their pages up to date. Notion recovers.
    for (task, _) in [&failing[0], &healthy[0]] {
        change_status(&store, *task, PIPELINE[3]).await;
    }
    for (_, page) in failing {
        notion.set_page_outage(page, None);
    }
    let second = Process::start(&db, &notion, &notion.token(), &retries);
    let expected: Vec<(String, TaskStatus)> = tasks
        .iter()
        .enumerate()
        .map(|(i, (_, page))| {
            let moved_on = i == 0 || i == failing.len();
            (page.clone(), PIPELINE[if moved_on { 3 } else { 2 }])
        })
        .collect();
    let converged = wait_for(Duration::from_secs(20), || {
        expected.iter().all(|(page, status)| {
            notion.page_value(page).as_deref() == Some(&*status.default_display())
        })
    })
    .await;
    let (status, log) = second.sigterm().await;
    assert!(
        converged.is_some(),
        "every page ends on its task's latest status: {:?}\n{log}",
        expected
            .iter()
            .map(|(page, _)| notion.page_history(page))
            .collect::<Vec<_>>()
    );
    assert!(status.success(), "graceful exit: {status:?}");
    assert!(log.contains("resuming pending retries"), "{log}");
    for (page, _) in &expected {
        let history = notion.page_history(page);
        let order: Vec<usize> = history
            .iter()
            .map(|shown| {
                ["Queued"]
                    .into_iter()
                    .map(str::to_owned)
                    .chain(PIPELINE.iter().map(|s| s.default_display().into_owned()))
                    .position(|name| name == *shown)
                    .expect("a known status")
            })
            .collect();
        assert!(
            order.windows(2).all(|w| w[0] <= w[1]),
            "an older status after a newer one: {history:?}"
        );
    }
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM sync_retries")
        .fetch_one(store.pool())
        .await
        .expect("count sync_retries");
    assert_eq!(left, 0, "every pending retry was resolved");
}

/// Statuses a task goes through, in order.
const PIPELINE: [TaskStatus; 4] = [
    TaskStatus::from_static("generating_assets"),
    TaskStatus::from_static("generating_video"),
    TaskStatus::from_static("assembling"),
    TaskStatus::FINAL_REVIEW,
];

/// Waits until `sync_retries` holds `n` rows each at its task's latest version; returns
/// the count of such rows at the end.
async fn wait_for_rows(store: &engine::PgStore, n: usize, within: Duration) -> usize {
    let start = std::time::Instant::now();
    loop {
        let current: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM sync_retries r \
              WHERE r.version = (SELECT max(stream_version) FROM events e WHERE e.stream_id = r.task_id)",
        )
        .fetch_one(store.pool())
        .await
        .expect("count sync_retries");
        let current = usize::try_from(current).unwrap_or(0);
        if current >= n || start.elapsed() > within {
            return current;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Two instances: only the leader sends. SIGKILL the leader: the standby takes over and
/// mirrors everything, including what changed around the kill.
#[tokio::test]
async fn a_standby_takes_over_when_the_leader_dies_and_skips_nothing() {
    let db = test_db().await;
    let store = db.store();
    // One fake per instance tells who sent what.
    let notion_a = fake().await;
    let notion_b = fake().await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let page = new_page_id();
        notion_a.add_page(&page);
        notion_b.add_page(&page);
        tasks.push((new_task(&store, Some(&page)).await, page));
    }
    let leader = Process::start(&db, &notion_a, &notion_a.token(), &[]);
    assert!(leader.wait_log("leading", Duration::from_secs(10)).await);
    let standby = Process::start(&db, &notion_b, &notion_b.token(), &[]);
    assert!(
        standby
            .wait_log("waiting as standby", Duration::from_secs(10))
            .await
    );

    for (task, _) in &tasks {
        change_status(&store, *task, TaskStatus::from_static("generating_assets")).await;
    }
    wait_for(Duration::from_secs(10), || {
        tasks
            .iter()
            .all(|(_, p)| notion_a.page_value(p).as_deref() == Some("Generating Assets"))
    })
    .await
    .expect("the leader mirrors");
    assert!(wait_caught_up(&store, "notion", Duration::from_secs(5)).await);
    assert_eq!(notion_b.requests().len(), 0, "the standby sends nothing");

    // Changes right before and after the kill.
    change_status(
        &store,
        tasks[0].0,
        TaskStatus::from_static("generating_composites"),
    )
    .await;
    leader.sigkill().await;
    let sent_by_a = notion_a.requests().len();
    for (task, _) in &tasks {
        change_status(&store, *task, TaskStatus::from_static("generating_video")).await;
    }
    let took = wait_for(Duration::from_secs(15), || {
        tasks
            .iter()
            .all(|(_, p)| notion_b.page_value(p).as_deref() == Some("Generating Video"))
    })
    .await
    .expect("the standby took over and mirrored every task");
    eprintln!("standby caught up {took:?} after the kill");
    assert!(standby.log().contains("leading"));
    assert!(wait_caught_up(&store, "notion", Duration::from_secs(5)).await);
    let _ = standby.sigterm().await;
    assert_eq!(
        notion_a.requests().len(),
        sent_by_a,
        "the dead leader sends nothing"
    );
    assert_eq!(notion_a.count(429) + notion_b.count(429), 0);
}

/// The token never appears in the logs, even when every request fails; tasks without a
/// page are logged; SIGTERM exits 0.
#[tokio::test]
async fn the_token_never_appears_in_logs_and_skips_are_logged() {
    let db = test_db().await;
    let store = db.store();
    let notion = fake().await;
    let page = new_page_id();
    notion.add_page(&page);
    let no_page = new_task(&store, None).await;
    let task = new_task(&store, Some(&page)).await;
    change_status(&store, task, TaskStatus::from_static("generating_assets")).await;
    let secret = "ntn_SECRET_must_never_be_logged_4242";
    // A wrong token: every request gets 401.
    let process = Process::start(&db, &notion, secret, &["--log-format", "json"]);
    assert!(wait_caught_up(&store, "notion", Duration::from_secs(10)).await);
    // Then an unreachable Notion: transport errors, retries, a recorded failure.
    notion.stop();
    change_status(
        &store,
        task,
        TaskStatus::from_static("generating_composites"),
    )
    .await;
    assert!(wait_caught_up(&store, "notion", Duration::from_secs(15)).await);
    // Its retries run out into a failure.
    wait_failures(&store, Duration::from_secs(15), |rows| {
        rows.iter().any(|f| f.http_status.is_none())
    })
    .await;
    let (status, log) = process.sigterm().await;
    assert!(status.success(), "SIGTERM exits 0: {status:?}\n{log}");

    assert!(
        !log.contains(secret),
        "the token leaked into the log:\n{log}"
    );
    assert!(
        !log.contains("SECRET_must"),
        "part of the token leaked:\n{log}"
    );
    assert!(log.contains("401"), "the 401 is logged:\n{log}");
    assert!(
        log.contains("cannot reach Notion"),
        "the outage is logged:\n{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("no notion_page_id") && l.contains(&no_page.to_string())),
        "the skipped task is logged with its id:\n{log}"
    );
    let rows = failures(&store).await;
    assert!(
        rows.iter()
            .any(|f| f.http_status == Some(401) && !f.retryable)
    );
    assert!(
        rows.iter().any(|f| f.http_status.is_none() && f.retryable),
        "{rows:?}"
    );
    assert!(rows.iter().all(|f| !f.error.contains("SECRET")));
    for request in notion.requests() {
        assert_eq!(
            request.authorization.as_deref(),
            Some(&*format!("Bearer {secret}"))
        );
    }
}

/// `/healthz` and `/metrics` over HTTP, and a clear error for a missing token.
#[tokio::test]
async fn serves_health_and_metrics() {
    let db = test_db().await;
    let store = db.store();
    let notion = fake().await;
    let page = new_page_id();
    notion.add_page(&page);
    new_task(&store, Some(&page)).await;
    let process = Process::start(
        &db,
        &notion,
        &notion.token(),
        &["--metrics-addr", "127.0.0.1:0"],
    );
    assert!(
        process
            .wait_log("serving /healthz", Duration::from_secs(10))
            .await
    );
    let log = process.log();
    let addr = log
        .lines()
        .find(|l| l.contains("serving /healthz"))
        .and_then(|l| l.split("bound=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("bound address in the log")
        .to_owned();
    assert!(wait_caught_up(&store, "notion", Duration::from_secs(10)).await);
    let http = reqwest::Client::new();
    let health = http
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .expect("GET /healthz");
    assert_eq!(health.status(), 200);
    let body: serde_json::Value = health.json().await.expect("json");
    assert_eq!(body["role"], "leader");
    let metrics = http
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("text");
    for needle in [
        "notion_projector_requests_total{outcome=\"ok\"} 1",
        "notion_projector_lag_events 0",
        "notion_projector_lag_seconds 0.0",
        "notion_projector_leader 1",
        "notion_projector_open_sync_failures 0",
        "notion_projector_rate_limited_total 0",
    ] {
        assert!(metrics.contains(needle), "missing {needle:?} in\n{metrics}");
    }
    let _ = process.sigterm().await;

    let missing = Command::new(env!("CARGO_BIN_EXE_notion-projector"))
        .env("DATABASE_URL", db.url())
        .env_remove("NOTION_TOKEN")
        .output()
        .await
        .expect("run");
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("NOTION_TOKEN"));
}

/// `--from-now` skips the history on the first start only: what changes while the
/// projector is stopped is still mirrored after a restart with the same flag.
#[tokio::test]
async fn from_now_skips_history_only_on_the_first_start() {
    let db = test_db().await;
    let store = db.store();
    let notion = fake().await;
    let tasks = tasks_with_pages(&store, &notion, 2).await;
    let (old, old_page) = tasks[0].clone();
    let (new, new_page) = tasks[1].clone();
    change_status(&store, old, TaskStatus::from_static("generating_assets")).await;

    let first = Process::start(&db, &notion, &notion.token(), &["--from-now"]);
    assert!(first.wait_log("leading", Duration::from_secs(10)).await);
    change_status(&store, new, TaskStatus::from_static("generating_assets")).await;
    wait_for(Duration::from_secs(5), || {
        notion.page_value(&new_page).as_deref() == Some("Generating Assets")
    })
    .await
    .expect("a change after the start is mirrored");
    let _ = first.sigterm().await;
    assert_eq!(
        notion.page_value(&old_page),
        None,
        "the history was skipped"
    );

    change_status(
        &store,
        old,
        TaskStatus::from_static("generating_composites"),
    )
    .await;
    let second = Process::start(&db, &notion, &notion.token(), &["--from-now"]);
    wait_for(Duration::from_secs(5), || {
        notion.page_value(&old_page).as_deref() == Some("Generating Composites")
    })
    .await
    .expect("a change made while stopped is mirrored after the restart");
    let _ = second.sigterm().await;
    assert_eq!(notion.requests().len(), 2);
}

/// A log restored from a dump into another cluster holds transaction ids ahead of the new
/// cluster's counter (simulated here by one such row): the projector refuses to start,
/// naming the cause and the remedy, instead of skipping every new event.
#[tokio::test]
async fn a_log_restored_into_another_cluster_is_refused_at_start() {
    let db = test_db().await;
    let store = db.store();
    let notion = fake().await;
    let task = new_task(&store, None).await;
    sqlx::query(
        "INSERT INTO events (stream_id, stream_version, event_id, event_type, payload, tx_id) \
         VALUES ($1, 2, gen_random_uuid(), 'status_changed', \
                 '{\"from\": \"queued\", \"to\": \"generating_assets\"}', \
                 ((pg_current_xact_id()::text::bigint + 1000000)::text)::xid8)",
    )
    .bind(task.as_uuid())
    .execute(store.pool())
    .await
    .expect("a row as a restore from an older, busier cluster leaves it");
    let mut process = Process::start(&db, &notion, &notion.token(), &[]);
    let status = tokio::time::timeout(Duration::from_secs(10), process.child.wait())
        .await
        .expect("refuses to start within 10 s")
        .expect("wait");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let log = process.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("restored from a dump"), "{log}");
    assert!(log.contains("pg_resetwal -e 1"), "{log}");
    assert!(notion.requests().is_empty());
}
