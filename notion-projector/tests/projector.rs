//! The projector against a real PostgreSQL and a fake Notion over real HTTP.

mod common;

use std::time::Duration;

use common::*;
use engine::{Event, Fence, NewEvent, TaskStatus};
use notion_projector::fake::Fault;
use notion_projector::{ProjectorOptions, PropertyType};

const FIVE_S: Duration = Duration::from_secs(5);

/// Seed scenario 5: a status change shows in Notion within 5 s.
#[tokio::test]
async fn scenario_5_a_status_change_is_mirrored_within_5_seconds() {
    let db = test_db().await;
    let store = db.store();
    let notion = fake().await;
    let page = new_page_id();
    notion.add_page(&page);
    let task = new_task(&store, Some(&page)).await;
    let running = spawn(&store, client(&notion), fast_options());

    assert!(
        wait_for(FIVE_S, || notion.page_value(&page).as_deref()
            == Some("Queued"))
        .await
        .is_some(),
        "the queued task shows as Queued"
    );
    change_status(&store, task, TaskStatus::from_static("generating_assets")).await;
    change_status(
        &store,
        task,
        TaskStatus::from_static("generating_composites"),
    )
    .await;
    let took = wait_for(FIVE_S, || {
        notion.page_value(&page).as_deref() == Some("Generating Composites")
    })
    .await
    .expect("the page shows Generating Composites within 5 s");
    eprintln!("status visible after {took:?}");
    running.stop().await;
    assert!(
        notion
            .requests()
            .iter()
            .all(|r| r.page_id == dashed(&page) && r.response == 200),
        "every request went to the task's page and succeeded: {:?}",
        notion.requests()
    );
}

/// Seed scenario 6: three tasks change at once; all synced within 5 s with no 429.
#[tokio::test]
async fn scenario_6_three_simultaneous_changes_sync_within_5_seconds_without_429() {
    let db = test_db().await;
    let store = db.store();
    let notion = fake().await;
    let tasks = tasks_with_pages(&store, &notion, 3).await;
    let running = spawn(&store, client(&notion), fast_options());
    assert!(wait_caught_up(&store, "notion", FIVE_S).await);
    let sent_before = notion.requests().len();

    let changes = tasks.iter().map(|(task, _)| {
        let store = store.clone();
        let task = *task;
        async move {
            change_status(
                &store,
                task,
                TaskStatus::from_static("generating_composites"),
            )
            .await
        }
    });
    futures_util::future::join_all(changes).await;
    let took = wait_for(FIVE_S, || {
        tasks
            .iter()
            .all(|(_, page)| notion.page_value(page).as_deref() == Some("Generating Composites"))
    })
    .await
    .expect("all three pages updated within 5 s");
    eprintln!("three pages updated after {took:?}");
    running.stop().await;
    assert_eq!(notion.count(429), 0, "no request was rate limited");
    assert_eq!(
        notion.requests().len() - sent_before,
        3,
        "one request per task"
    );
}

/// A→B→C before the projector reads: only C is sent, once per task.
#[tokio::test]
async fn coalescing_sends_only_the_latest_status() {
    let db = test_db().await;
    let store = db.store();
    let notion = fake().await;
    let mut pages = Vec::new();
    for _ in 0..10 {
        let page = new_page_id();
        notion.add_page(&page);
        let task = new_task(&store, Some(&page)).await;
        for status in [
            TaskStatus::from_static("generating_assets"),
            TaskStatus::from_static("generating_composites"),
            TaskStatus::from_static("generating_video"),
        ] {
            change_status(&store, task, status).await;
        }
        pages.push(page);
    }
    let running = spawn(&store, client(&notion), fast_options());
    assert!(wait_caught_up(&store, "notion", Duration::from_secs(15)).await);
    running.stop().await;
    for page in &pages {
        assert_eq!(
            notion.page_history(page),
            vec!["Generating Video".to_owned()],
            "one request per task, with the latest status"
        );
    }
    assert_eq!(notion.requests().len(), 10);
    assert_eq!(notion.count(429), 0);

    // A restart re-reads nothing it already mirrored.
    let running = spawn(&store, client(&notion), fast_options());
    tokio::time::sleep(Duration::from_millis(800)).await;
    running.stop().await;
    assert_eq!(notion.requests().len(), 10, "nothing is sent twice");
}

/// Seed scenario 7: a 503 outage: retries with backoff, the log keeps moving, retries
/// run out into `sync_failures`, and a later pass succeeds once Notion is back.
#[tokio::test]
async fn scenario_7_an_outage_is_retried_recorded_and_caught_up() {
    let db = test_db().await;
    let store = db.store();
    let notion = fake().await;
    let page = new_page_id();
    notion.add_page(&page);
    notion.set_outage(Some(503));
    let task = new_task(&store, Some(&page)).await;
    let options = ProjectorOptions {
        max_retries: 3,
        retry_base: Duration::from_millis(300),
        failure_retry_interval: Duration::from_secs(2),
        ..fast_options()
    };
    let running = spawn(&store, client(&notion), options);

    // The pipeline is not held up: its appends go on while Notion is down.
    for status in [
        TaskStatus::from_static("generating_assets"),
        TaskStatus::from_static("generating_composites"),
    ] {
        tokio::time::timeout(Duration::from_secs(1), change_status(&store, task, status))
            .await
            .expect("appends never wait for Notion");
    }
    // The checkpoint moves on while the retries wait in `sync_retries`; they run out into
    // a retryable failure.
    assert!(wait_caught_up(&store, "notion", Duration::from_secs(10)).await);
    let rows = wait_failures(&store, Duration::from_secs(10), |rows| !rows.is_empty()).await;
    assert!(!rows.is_empty(), "a sync failure is recorded");
    assert!(
        rows.iter()
            .all(|f| f.http_status == Some(503) && f.retryable && !f.resolved)
    );
    let tries: Vec<_> = notion.requests().iter().map(|r| r.at).collect();
    assert!(tries.len() >= 4, "1 try + 3 retries, got {}", tries.len());
    // The chain that ran out into the failure: its try and 3 retries are the last four
    // requests (a newer status read meanwhile replaced an earlier chain and started anew).
    let gaps: Vec<Duration> = tries[tries.len() - 4..]
        .windows(2)
        .map(|w| w[1] - w[0])
        .collect();
    assert!(
        gaps[2] > gaps[0],
        "the waits between retries grow (backoff): {gaps:?}"
    );
    assert_eq!(notion.page_value(&page), None, "nothing reached Notion yet");

    // Notion comes back: the later pass mirrors the latest status and resolves the row.
    notion.set_outage(None);
    wait_for(Duration::from_secs(10), || {
        notion.page_value(&page).as_deref() == Some("Generating Composites")
    })
    .await
    .expect("caught up after the outage");
    tokio::time::sleep(Duration::from_millis(300)).await;
    running.stop().await;
    assert!(
        failures(&store).await.iter().all(|f| f.resolved),
        "the failure is resolved by the successful pass"
    );
    assert_eq!(notion.count(429), 0);
}

/// A 429 with `Retry-After: 2`: no request for 2 s, and the checkpoint waits too.
#[tokio::test]
async fn retry_after_pauses_everything_and_holds_the_checkpoint() {
    let db = test_db().await;
    let store = db.store();
    let notion = fake().await;
    let pages: Vec<String> = (0..2).map(|_| new_page_id()).collect();
    let mut tasks = Vec::new();
    for page in &pages {
        notion.add_page(page);
        tasks.push(new_task(&store, Some(page)).await);
    }
    let running = spawn(&store, client(&notion), fast_options());
    assert!(wait_caught_up(&store, "notion", FIVE_S).await);
    let before = checkpoint(&store, "notion").await.expect("checkpoint");
    let sent = notion.requests().len();

    notion.inject([Fault::RateLimited {
        retry_after_secs: 2,
    }]);
    for task in &tasks {
        change_status(&store, *task, TaskStatus::from_static("generating_assets")).await;
    }
    wait_for(FIVE_S, || notion.count(429) == 1)
        .await
        .expect("the 429 arrives");
    let limited_at = notion.requests()[sent].at;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        checkpoint(&store, "notion").await,
        Some(before),
        "the checkpoint does not move while the batch waits"
    );
    wait_for(FIVE_S, || {
        pages
            .iter()
            .all(|p| notion.page_value(p).as_deref() == Some("Generating Assets"))
    })
    .await
    .expect("both pages updated after the pause");
    running.stop().await;
    let after: Vec<_> = notion.requests()[sent + 1..].iter().map(|r| r.at).collect();
    assert!(!after.is_empty());
    for at in after {
        assert!(
            at - limited_at >= Duration::from_millis(1990),
            "a request came {:?} after the 429",
            at - limited_at
        );
    }
}

/// 404 and 401: one request each, a `sync_failures` row, the checkpoint moves on.
#[tokio::test]
async fn not_found_and_unauthorized_are_recorded_not_retried() {
    let db = test_db().await;
    let store = db.store();
    let notion = fake().await;
    let known = new_page_id();
    notion.add_page(&known);
    let unknown = new_page_id();
    let missing_task = new_task(&store, Some(&unknown)).await;
    let ok_task = new_task(&store, Some(&known)).await;
    let running = spawn(&store, client(&notion), fast_options());
    assert!(wait_caught_up(&store, "notion", FIVE_S).await);
    tokio::time::sleep(Duration::from_millis(1500)).await; // a failure pass or more
    running.stop().await;

    assert_eq!(notion.page_value(&known).as_deref(), Some("Queued"));
    let to_unknown = notion
        .requests()
        .iter()
        .filter(|r| r.page_id == dashed(&unknown))
        .count();
    assert_eq!(to_unknown, 1, "a 404 is not retried");
    let rows = failures(&store).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].task_id, missing_task.as_uuid());
    assert_eq!(rows[0].http_status, Some(404));
    assert!(!rows[0].retryable);
    assert!(
        rows[0].error.contains("object_not_found"),
        "{}",
        rows[0].error
    );
    let _ = ok_task;

    // 401: a wrong token gets one request per task, recorded, and no retry storm.
    let db = test_db().await;
    let store = db.store();
    let notion = fake().await;
    let page = new_page_id();
    notion.add_page(&page);
    let task = new_task(&store, Some(&page)).await;
    change_status(&store, task, TaskStatus::from_static("generating_assets")).await;
    let running = spawn(
        &store,
        client_with_token(&notion, "ntn_wrong_token_0123456789"),
        fast_options(),
    );
    assert!(wait_caught_up(&store, "notion", FIVE_S).await);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    running.stop().await;
    // At most one request per status event, never a retry. Usually the two events are
    // read together and only the newest status is sent. But the log's watermark is
    // cluster-wide, so another database's open transaction (tests running beside this
    // one) can hold the second event back until the first was handled: then each event
    // sends once, and both send the task's newest status (the projector sends what is
    // current, not what the event said), so the same value may go twice.
    let requests = notion.requests();
    assert!((1..=2).contains(&requests.len()), "{requests:?}");
    assert_eq!(
        requests.last().and_then(|r| r.value.as_deref()),
        Some("Generating Assets")
    );
    assert_eq!(notion.count(401), requests.len());
    let rows = failures(&store).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].http_status, Some(401));
    assert!(
        !rows[0].error.contains("ntn_wrong_token"),
        "{}",
        rows[0].error
    );
}

/// Two appends to one task committing in inverted xid order (the later version has the
/// older xid): both are read, and the page ends with the higher version's status — also
/// when each batch holds a single event.
#[tokio::test]
async fn out_of_order_commits_end_with_the_higher_versions_status() {
    for batch_size in [500, 1] {
        let db = test_db().await;
        let store = db.store();
        let notion = fake().await;
        let page = new_page_id();
        notion.add_page(&page);
        let task = new_task(&store, Some(&page)).await;
        let running = spawn(
            &store,
            client(&notion),
            ProjectorOptions {
                batch_size,
                ..fast_options()
            },
        );
        assert!(wait_caught_up(&store, "notion", FIVE_S).await);

        // T1 takes its xid first, then waits; T2 appends version 2 and commits; T1 then
        // appends version 3 and commits. Version 3 has the older xid.
        let mut t1 = store.pool().begin().await.expect("begin");
        sqlx::query("SELECT pg_current_xact_id()")
            .execute(&mut *t1)
            .await
            .expect("take an xid");
        change_status(&store, task, TaskStatus::from_static("generating_assets")).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            notion.page_value(&page).as_deref(),
            Some("Queued"),
            "version 2 waits behind the older open transaction"
        );
        store
            .append_in(
                &mut t1,
                task,
                2,
                Fence::Unleased,
                &[NewEvent::new(Event::status_changed(
                    TaskStatus::from_static("generating_assets"),
                    TaskStatus::from_static("generating_composites"),
                ))],
            )
            .await
            .expect("append version 3 in the older transaction");
        t1.commit().await.expect("commit");

        assert!(wait_caught_up(&store, "notion", FIVE_S).await);
        tokio::time::sleep(Duration::from_millis(300)).await;
        running.stop().await;
        assert_eq!(
            notion.page_value(&page).as_deref(),
            Some("Generating Composites"),
            "batch size {batch_size}: history {:?}",
            notion.page_history(&page)
        );
        let applied: i32 =
            sqlx::query_scalar("SELECT applied_version FROM notion_sync WHERE task_id = $1")
                .bind(task.as_uuid())
                .fetch_one(store.pool())
                .await
                .expect("notion_sync row");
        assert_eq!(applied, 3);
    }
}

/// Tasks without a page are skipped without a request; an invalid page id is a failure
/// row, never a request.
#[tokio::test]
async fn tasks_without_a_page_are_skipped() {
    let db = test_db().await;
    let store = db.store();
    let notion = fake().await;
    let page = new_page_id();
    notion.add_page(&page);
    let silent = new_task(&store, None).await;
    let invalid = new_task(&store, Some("not-a-page")).await;
    change_status(&store, silent, TaskStatus::from_static("generating_assets")).await;
    let mirrored = new_task(&store, Some(&page)).await;
    let running = spawn(&store, client(&notion), fast_options());
    assert!(wait_caught_up(&store, "notion", FIVE_S).await);
    let metrics = running.metrics.clone();
    running.stop().await;
    assert_eq!(
        notion.requests().len(),
        1,
        "only the task with a page is sent"
    );
    assert_eq!(notion.page_value(&page).as_deref(), Some("Queued"));
    let rows = failures(&store).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].task_id, invalid.as_uuid());
    assert!(rows[0].error.contains("invalid Notion page id"));
    assert!(
        metrics
            .render()
            .contains("notion_projector_skipped_total{reason=\"no_page\"} 1")
    );
    let _ = mirrored;
}

/// 502 as HTML, 500, 504 and a timeout are all retried until the status lands.
#[tokio::test]
async fn html_502_5xx_and_timeouts_are_retried() {
    let db = test_db().await;
    let store = db.store();
    let notion = fake().await;
    let page = new_page_id();
    notion.add_page(&page);
    notion.inject([
        Fault::BadGatewayHtml,
        Fault::Status(500),
        Fault::Delay(Duration::from_secs(3)), // past the client's 2 s timeout
    ]);
    let _task = new_task(&store, Some(&page)).await;
    let running = spawn(
        &store,
        client(&notion),
        ProjectorOptions {
            max_retries: 4,
            ..fast_options()
        },
    );
    // (The delayed request may still land after the client gave up, as with Notion.)
    let metrics = running.metrics.clone();
    wait_for(Duration::from_secs(15), || {
        metrics
            .render()
            .contains("notion_projector_requests_total{outcome=\"ok\"} 1")
    })
    .await
    .expect("a request succeeds after the faults");
    assert_eq!(notion.page_value(&page).as_deref(), Some("Queued"));
    running.stop().await;
    assert!(failures(&store).await.is_empty());
    let text = metrics.render();
    for line in [
        "notion_projector_requests_total{outcome=\"unavailable\"} 2",
        "notion_projector_requests_total{outcome=\"timeout\"} 1",
        "notion_projector_requests_total{outcome=\"ok\"} 1",
        "notion_projector_retries_total 3",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
}

/// A Select property gets the select payload; the fake refuses a status payload there.
#[tokio::test]
async fn select_properties_get_the_select_shape() {
    let db = test_db().await;
    let store = db.store();
    let notion = fake().await;
    let page = new_page_id();
    notion.add_page_with(&page, "Stage", PropertyType::Select);
    let task = new_task(&store, Some(&page)).await;
    change_status(&store, task, TaskStatus::FINAL_REVIEW).await;
    let running = spawn(
        &store,
        client(&notion),
        ProjectorOptions {
            status_property: "Stage".into(),
            property_type: PropertyType::Select,
            ..fast_options()
        },
    );
    wait_for(FIVE_S, || {
        notion.page_value(&page).as_deref() == Some("Final Review")
    })
    .await
    .expect("select set to the display name");
    running.stop().await;
    assert!(failures(&store).await.is_empty());
}

/// Another instance moving the checkpoint makes this one's compare-and-set fail: it
/// steps back and resumes from the stored checkpoint instead of overwriting it.
#[tokio::test]
async fn a_moved_checkpoint_is_never_overwritten() {
    let db = test_db().await;
    let store = db.store();
    let notion = fake().await;
    let page = new_page_id();
    notion.add_page(&page);
    let task = new_task(&store, Some(&page)).await;
    let running = spawn(&store, client(&notion), fast_options());
    assert!(wait_caught_up(&store, "notion", FIVE_S).await);

    // Another instance has moved the stored checkpoint far ahead (past any xid in use).
    let jumped: String = sqlx::query_scalar(
        "UPDATE projector_checkpoints \
            SET last_tx_id = (pg_current_xact_id()::text::bigint + 1000000)::text::xid8 \
          WHERE projector = 'notion' RETURNING last_tx_id::text",
    )
    .fetch_one(store.pool())
    .await
    .expect("move the checkpoint");
    change_status(&store, task, TaskStatus::from_static("generating_assets")).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stored = checkpoint(&store, "notion").await.expect("checkpoint");
    assert_eq!(
        stored.tx_id.to_string(),
        jumped,
        "the compare-and-set failed instead of moving the checkpoint back"
    );
    running.stop().await;
}

/// Resetting the checkpoint and the mirror state rebuilds the same mirror from the log.
#[tokio::test]
async fn a_reset_checkpoint_rebuilds_the_same_mirror() {
    let db = test_db().await;
    let store = db.store();
    let notion = fake().await;
    let mut pages = Vec::new();
    for status in [
        TaskStatus::from_static("generating_video"),
        TaskStatus::FINAL_REVIEW,
        TaskStatus::QUEUED,
    ] {
        let page = new_page_id();
        notion.add_page(&page);
        let task = new_task(&store, Some(&page)).await;
        if status != TaskStatus::QUEUED {
            change_status(&store, task, status).await;
        }
        pages.push((page, status));
    }
    let running = spawn(&store, client(&notion), fast_options());
    assert!(wait_caught_up(&store, "notion", FIVE_S).await);
    running.stop().await;
    let first: Vec<_> = pages.iter().map(|(p, _)| notion.page_value(p)).collect();

    sqlx::raw_sql("UPDATE projector_checkpoints SET last_tx_id = '0', last_position = 0; TRUNCATE notion_sync")
        .execute(store.pool())
        .await
        .expect("reset");
    let rebuilt = fake().await;
    for (page, _) in &pages {
        rebuilt.add_page(page);
    }
    let running = spawn(&store, client(&rebuilt), fast_options());
    assert!(wait_caught_up(&store, "notion", FIVE_S).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    running.stop().await;
    let second: Vec<_> = pages.iter().map(|(p, _)| rebuilt.page_value(p)).collect();
    assert_eq!(first, second);
    for ((_, status), value) in pages.iter().zip(&second) {
        assert_eq!(value.as_deref(), Some(&*status.default_display()));
    }
}

/// A task that changes again while its request waits for the rate limiter is sent once,
/// with the newest status (the later events are then skipped as already mirrored).
#[tokio::test]
async fn changes_while_waiting_for_the_limiter_coalesce_into_one_request() {
    let db = test_db().await;
    let store = db.store();
    let notion = fake().await;
    let tasks = tasks_with_pages(&store, &notion, 6).await;
    let running = spawn(&store, client(&notion), fast_options());
    wait_for(FIVE_S, || !notion.requests().is_empty())
        .await
        .expect("the first request");
    // Six requests at 3/s take ~2 s, in log order: the last task's turn comes after these
    // changes.
    let (last, last_page) = tasks.last().expect("tasks").clone();
    change_status(&store, last, TaskStatus::from_static("generating_assets")).await;
    change_status(
        &store,
        last,
        TaskStatus::from_static("generating_composites"),
    )
    .await;
    assert!(wait_caught_up(&store, "notion", Duration::from_secs(10)).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    running.stop().await;
    assert_eq!(
        notion.page_history(&last_page),
        vec!["Generating Composites".to_owned()]
    );
    assert_eq!(notion.requests().len(), 6, "one request per task");
}

/// A status event the projector cannot decode (a newer schema version) is recorded as a
/// sync failure naming its task; the checkpoint moves on and later changes still sync.
#[tokio::test]
async fn an_undecodable_status_event_is_recorded_and_passed() {
    let db = test_db().await;
    let store = db.store();
    let notion = fake().await;
    let page = new_page_id();
    notion.add_page(&page);
    let task = new_task(&store, Some(&page)).await;
    // An event from the future.
    db.append_raw(task, "status_changed", 99, r#"{"to": "somewhere_new"}"#)
        .await;
    let running = spawn(&store, client(&notion), fast_options());
    assert!(wait_caught_up(&store, "notion", FIVE_S).await);
    let rows = failures(&store).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].task_id, task.as_uuid());
    assert!(rows[0].error.contains("cannot decode"), "{}", rows[0].error);
    assert!(!rows[0].retryable);

    // The next change of the same task syncs (and resolves the failure).
    store
        .append(
            task,
            2,
            Fence::Unleased,
            &[NewEvent::new(Event::status_changed(
                TaskStatus::QUEUED,
                TaskStatus::from_static("generating_assets"),
            ))],
        )
        .await
        .expect("append");
    wait_for(FIVE_S, || {
        notion.page_value(&page).as_deref() == Some("Generating Assets")
    })
    .await
    .expect("later changes sync");
    tokio::time::sleep(Duration::from_millis(200)).await;
    running.stop().await;
    assert!(failures(&store).await.iter().all(|f| f.resolved));
}

/// No transaction is open while Notion takes its time: the watermark of every reader of
/// the log never waits on Notion.
#[tokio::test]
async fn no_transaction_is_open_while_a_request_is_in_flight() {
    let db = test_db().await;
    let store = db.store();
    let notion = fake().await;
    notion.set_latency(Duration::from_millis(1500));
    let _tasks = tasks_with_pages(&store, &notion, 2).await;
    let running = spawn(&store, client(&notion), fast_options());
    // Each answer takes 1.5 s and the fake records a request when it answers: sample the
    // server's sessions until both tasks' requests are answered, so the samples cover them
    // in flight however long the projector takes to start on a busy machine (a fixed 3 s
    // window missed them when tests ran side by side).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while notion.requests().len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "no answered requests within 30 s"
        );
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
              WHERE datname = current_database() AND pid <> pg_backend_pid() \
                AND (state LIKE 'idle in transaction%' OR xact_start < now() - interval '500 ms')",
        )
        .fetch_one(store.pool())
        .await
        .expect("pg_stat_activity");
        assert_eq!(open, 0, "a transaction stays open during a Notion call");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.stop().await;
}

/// Two projectors with different names (two boards) each mirror every task: one's
/// `notion_sync` rows never make the other skip a task as already mirrored.
#[tokio::test]
async fn two_projectors_with_different_names_each_mirror_every_task() {
    let db = test_db().await;
    let store = db.store();
    let board_a = fake().await;
    let board_b = fake().await;
    let page = new_page_id();
    board_a.add_page(&page);
    board_b.add_page(&page);
    let task = new_task(&store, Some(&page)).await;
    change_status(&store, task, TaskStatus::from_static("generating_assets")).await;
    for (name, board) in [("board-a", &board_a), ("board-b", &board_b)] {
        let options = ProjectorOptions {
            name: name.into(),
            ..fast_options()
        };
        let running = spawn(&store, client(board), options);
        assert!(wait_caught_up(&store, name, FIVE_S).await);
        running.stop().await;
    }
    assert_eq!(
        board_a.page_value(&page).as_deref(),
        Some("Generating Assets")
    );
    assert_eq!(
        board_b.page_value(&page).as_deref(),
        Some("Generating Assets"),
        "the second projector mirrors the task too"
    );
}

/// A retryable sync failure whose task's history holds an event this build cannot decode:
/// the retry pass records the decode error (not retryable) and the projector goes on
/// mirroring other tasks, instead of failing its leadership on every pass.
#[tokio::test]
async fn a_failed_sync_with_an_undecodable_history_is_recorded_and_passed() {
    let db = test_db().await;
    let store = db.store();
    let notion = fake().await;
    let page = new_page_id();
    notion.add_page(&page);
    let poisoned = new_task(&store, Some(&page)).await;
    db.append_raw(poisoned, "task_paused_by_a_newer_build", 1, "{}")
        .await;
    sqlx::query(
        "INSERT INTO sync_failures (projector, global_position, task_id, http_status, error, retryable) \
         SELECT 'notion', 1, $1, 503, 'Notion unavailable', true",
    )
    .bind(poisoned.as_uuid())
    .execute(store.pool())
    .await
    .expect("a failed sync of the poisoned task");
    checkpoint_past_every_event(&store).await;
    let running = spawn(&store, client(&notion), fast_options());
    let other_page = new_page_id();
    notion.add_page(&other_page);
    let other = new_task(&store, Some(&other_page)).await;
    change_status(&store, other, TaskStatus::from_static("generating_video")).await;
    wait_for(FIVE_S, || {
        notion.page_value(&other_page).as_deref() == Some("Generating Video")
    })
    .await
    .expect("other tasks are still mirrored");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let rows = failures(&store).await;
    assert!(
        rows.iter()
            .all(|f| f.task_id == poisoned.as_uuid() && !f.retryable),
        "{rows:?}"
    );
    assert!(
        rows.iter().any(|f| f.error.contains("cannot decode")
            && f.error.contains("task_paused_by_a_newer_build")),
        "{rows:?}"
    );
    assert_eq!(running.metrics.leader.get(), 1, "still leading");
    running.stop().await;
}

/// `checkpoint_at_head` (`--from-now`) while a transaction is in flight: its status
/// change, committed after the checkpoint was set, is still mirrored.
#[tokio::test]
async fn from_now_never_skips_a_transaction_in_flight() {
    let db = test_db().await;
    let store = db.store();
    let notion = fake().await;
    let tasks = tasks_with_pages(&store, &notion, 2).await;
    let (slow, slow_page) = tasks[0].clone();
    let (fast, _) = tasks[1].clone();

    // The slow append takes its xid first and stays open; a later one commits before it.
    let mut open = store.pool().begin().await.expect("begin");
    store
        .append_in(
            &mut open,
            slow,
            1,
            Fence::Unleased,
            &[NewEvent::new(Event::status_changed(
                TaskStatus::QUEUED,
                TaskStatus::from_static("generating_assets"),
            ))],
        )
        .await
        .expect("append in the open transaction");
    change_status(&store, fast, TaskStatus::from_static("generating_video")).await;
    notion_projector::checkpoint_at_head(&store, "notion", false)
        .await
        .expect("start at the head");
    open.commit().await.expect("commit the slow append");

    let running = spawn(&store, client(&notion), fast_options());
    let mirrored = wait_for(FIVE_S, || {
        notion.page_value(&slow_page).as_deref() == Some("Generating Assets")
    })
    .await;
    running.stop().await;
    assert!(
        mirrored.is_some(),
        "the change committed after --from-now is mirrored"
    );
}

/// More than a pass's worth of failed syncs whose tasks have no page (nothing to send)
/// never hide another task's failure: they are resolved, and the others are retried.
#[tokio::test]
async fn failures_with_nothing_to_send_never_hide_the_others() {
    let db = test_db().await;
    let store = db.store();
    let notion = fake().await;
    let mut stuck = Vec::new();
    for _ in 0..101 {
        stuck.push(new_task(&store, None).await.as_uuid());
    }
    let page = new_page_id();
    notion.add_page(&page);
    let mut task = engine::NewTask::new(
        "video",
        engine::ChannelId::parse("notion-tests").expect("channel"),
        serde_json::json!({"topic": "last in uuid order"}),
    );
    task.id = engine::TaskId::from(uuid::Uuid::from_u128(u128::MAX - 1));
    task.notion_page_id = Some(page.clone());
    let last = store
        .create_task(task)
        .await
        .expect("create task")
        .task_id();
    sqlx::query(
        "INSERT INTO sync_failures (projector, global_position, task_id, http_status, error, retryable) \
         SELECT 'notion', row_number() OVER (), id, 503, 'Notion unavailable', true \
           FROM unnest($1::uuid[]) AS id",
    )
    .bind(stuck.iter().copied().chain([last.as_uuid()]).collect::<Vec<_>>())
    .execute(store.pool())
    .await
    .expect("record failed syncs");
    checkpoint_past_every_event(&store).await;
    let running = spawn(&store, client(&notion), fast_options());
    let retried = wait_for(Duration::from_secs(8), || {
        notion.page_value(&page).as_deref() == Some("Queued")
    })
    .await;
    assert!(retried.is_some(), "the task with a page is retried");
    let started = std::time::Instant::now();
    loop {
        let open: Vec<_> = failures(&store)
            .await
            .into_iter()
            .filter(|f| !f.resolved)
            .collect();
        if open.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "failures with nothing to send are resolved: {open:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.stop().await;
}

/// A leader whose lock is gone abandons its request in flight: the new leader's newer
/// status is not overwritten by the old leader's late answer.
#[tokio::test]
async fn a_leader_that_lost_its_lock_does_not_land_a_stale_status() {
    let db = test_db().await;
    let store = db.store();
    let notion = fake().await;
    let page = new_page_id();
    notion.add_page(&page);
    let task = new_task(&store, Some(&page)).await;
    notion.set_latency(Duration::from_secs(4));
    let old = spawn(
        &store,
        notion.client(Duration::from_secs(10)),
        fast_options(),
    );
    wait_for(FIVE_S, || old.metrics.leader.get() == 1)
        .await
        .expect("the first instance leads");
    // Its PATCH ("Queued") is now waiting for the slow answer.
    tokio::time::sleep(Duration::from_millis(500)).await;
    change_status(&store, task, TaskStatus::from_static("generating_assets")).await;
    notion.set_latency(Duration::ZERO);
    let terminated: bool = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_locks \
          WHERE locktype = 'advisory' AND granted AND database = \
                (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_one(store.pool())
    .await
    .expect("terminate the leader lock's session");
    assert!(terminated);
    let new = spawn(&store, client(&notion), fast_options());
    wait_for(FIVE_S, || {
        notion.page_value(&page).as_deref() == Some("Generating Assets")
    })
    .await
    .expect("the new leader mirrors the newer status");
    // The old request would have been answered 4 s after it was sent.
    tokio::time::sleep(Duration::from_secs(4)).await;
    old.stop().await;
    new.stop().await;
    assert_eq!(
        notion.page_value(&page).as_deref(),
        Some("Generating Assets"),
        "history: {:?}",
        notion.page_history(&page)
    );
}

/// Puts the `notion` checkpoint past every event (all committed here), so that only the
/// retry pass of failed syncs sends anything.
async fn checkpoint_past_every_event(store: &engine::PgStore) {
    sqlx::query(
        "INSERT INTO projector_checkpoints (projector, last_tx_id, last_position) \
         SELECT 'notion', tx_id, global_position FROM events \
          ORDER BY tx_id DESC, global_position DESC LIMIT 1 \
         ON CONFLICT (projector) DO UPDATE \
            SET last_tx_id = EXCLUDED.last_tx_id, last_position = EXCLUDED.last_position",
    )
    .execute(store.pool())
    .await
    .expect("move the checkpoint past every event");
}

/// Status changes recorded before `to_display` existed reach the board under the names
/// they always had; a workflow's own status reaches it under the name it recorded.
#[tokio::test]
async fn old_status_events_keep_their_names_and_new_ones_carry_theirs() {
    let db = test_db().await;
    let store = db.store();
    let notion = fake().await;
    let (old, custom) = (new_page_id(), new_page_id());
    notion.add_page(&old);
    notion.add_page(&custom);
    let task = new_task(&store, Some(&old)).await;
    // As an earlier build wrote it: no `to_display`.
    db.append_raw(
        task,
        "status_changed",
        1,
        r#"{"from": "generating_video", "to": "generating_sfx"}"#,
    )
    .await;
    let other = new_task(&store, Some(&custom)).await;
    store
        .append(
            other,
            1,
            Fence::Unleased,
            &[NewEvent::new(Event::StatusChanged {
                from: TaskStatus::QUEUED,
                to: TaskStatus::from_static("generating_sfx"),
                to_display: Some("Generating SFX".into()),
            })],
        )
        .await
        .expect("append");
    let running = spawn(&store, client(&notion), fast_options());
    assert!(wait_caught_up(&store, "notion", FIVE_S).await);
    running.stop().await;
    assert_eq!(notion.page_value(&old).as_deref(), Some("Generating SFX"));
    assert_eq!(
        notion.page_value(&custom).as_deref(),
        Some("Generating SFX")
    );
    assert!(failures(&store).await.is_empty());
}

/// A server or proxy that echoes the `Authorization` header into its error — in the JSON
/// error's `code`, or in a non-JSON body where the token straddles the 120-character cut —
/// never gets any piece of the token into an error text. (Before: the `code` was not
/// scrubbed, and a non-JSON body was cut before it was scrubbed.)
#[tokio::test]
async fn an_echoed_token_never_reaches_an_error_text() {
    let notion = fake().await;
    let page = new_page_id();
    notion.add_page(&page);
    let client = client(&notion);
    let token = notion.token();
    let page = notion_projector::PageId::parse(&page).expect("page id");
    // "Bearer " is 7 characters: offsets 100 and 105 put the cut inside the token.
    for (json_code, offset) in [(true, 0), (false, 0), (false, 100), (false, 105)] {
        notion.inject([Fault::EchoAuthorization { json_code, offset }]);
        let error = client
            .set_status(&page, "Status", STATUS, "Queued")
            .await
            .expect_err("a 400");
        for text in [error.to_string(), format!("{error:?}")] {
            let leaked = (0..token.len() - 5).find(|&i| text.contains(&token[i..i + 6]));
            assert!(
                leaked.is_none(),
                "a piece of the token in {text:?} (json_code {json_code}, offset {offset})"
            );
        }
    }
}

/// Suspected in issue 26, confirmed: a PATCH that timed out at the client, which Notion
/// applied later, after the task's newer status had landed: the page must end on the
/// newest status. (Before: it ended on the older one.)
#[tokio::test]
async fn a_timed_out_patch_that_lands_late_never_leaves_an_older_status() {
    let db = test_db().await;
    let store = db.store();
    let notion = fake().await;
    let page = new_page_id();
    notion.add_page(&page);
    let task = new_task(&store, Some(&page)).await;
    let running = spawn(&store, notion.client(Duration::from_secs(1)), late_writes());
    wait_for(FIVE_S, || {
        notion.page_value(&page).as_deref() == Some("Queued")
    })
    .await
    .expect("Queued");
    // Notion works on the next PATCH for 3 s; the client gives up after 1 s.
    notion.set_page_stall(&page, Some(Duration::from_secs(3)));
    change_status(&store, task, TaskStatus::from_static("generating_assets")).await;
    let metrics = running.metrics.clone();
    wait_for(FIVE_S, || {
        metrics
            .render()
            .contains("notion_projector_requests_total{outcome=\"timeout\"} 1")
    })
    .await
    .expect("the PATCH timed out");
    notion.set_page_stall(&page, None);
    change_status(&store, task, TaskStatus::from_static("generating_video")).await;
    wait_for(FIVE_S, || {
        notion
            .page_history(&page)
            .iter()
            .any(|v| v == "Generating Video")
    })
    .await
    .expect("the newer status lands");
    // The stalled PATCH lands 3 s after it was sent, after the newer status.
    let ended = wait_for(Duration::from_secs(12), || {
        let history = notion.page_history(&page);
        history.iter().any(|v| v == "Generating Assets")
            && notion.page_value(&page).as_deref() == Some("Generating Video")
    })
    .await;
    running.stop().await;
    assert!(
        ended.is_some(),
        "the page ends on the newest status: {:?}",
        notion.page_history(&page)
    );
}

/// Options for the late-write test: Notion may apply an unanswered request for 4 s.
fn late_writes() -> ProjectorOptions {
    ProjectorOptions {
        late_write_window: Duration::from_secs(4),
        ..fast_options()
    }
}
