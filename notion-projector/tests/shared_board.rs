//! Two projectors on one board (issue 26): the README's "a Status and a Stage property"
//! set-up, as two `notion-projector` processes with different names and property names
//! on one token. One card per task (one board, one card owner) and never more than 3
//! requests in any second at Notion (one token, one budget).

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::board::*;
use common::process::Process;
use common::*;
use engine::TaskStatus;
use notion_projector::fake::{FakeNotion, FakeNotionOptions, RecordedRequest};

/// The most requests that arrived within any one second.
fn peak_per_second(requests: &[RecordedRequest]) -> usize {
    let mut at: Vec<_> = requests.iter().map(|r| r.at).collect();
    at.sort();
    (0..at.len())
        .map(|i| {
            at[i..]
                .iter()
                .take_while(|t| t.duration_since(at[i]) < Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// Must show (issue 26): 10 tasks without pages, two projectors ("status" sets Status,
/// "stage" sets a Stage select) on one board and one token, each task moving twice: 10
/// cards, each showing the final status in both properties, and at most 3 requests in any
/// second at the fake, whose query lags its writes by 3 s. (Before: a second card for tasks
/// whose card the other projector's query did not show yet, 6 requests in one second and
/// 429s.)
#[tokio::test]
async fn two_projectors_on_one_board_make_one_card_per_task_within_one_budget() {
    let db = test_db().await;
    let store = db.store();
    // A fake that allows bursts of 10: the rate seen is the projectors' own, not one its
    // 429s shaped.
    let notion = FakeNotion::start(FakeNotionOptions {
        rate: 10.0,
        burst: 10.0,
        ..FakeNotionOptions::default()
    })
    .await
    .expect("start the fake Notion");
    let mut properties = BOARD.to_vec();
    properties.push(("Stage", "select"));
    let board = notion.add_board(&properties);
    // Notion's query lags its writes: one projector's query does not show the other's new
    // card at once.
    notion.set_query_lag(Duration::from_secs(3));
    let status = [
        "--name",
        "status",
        "--data-source",
        board.data_source_id.as_str(),
    ];
    let stage = [
        "--name",
        "stage",
        "--data-source",
        board.data_source_id.as_str(),
        "--status-property",
        "Stage",
    ];
    let first = Process::start(&db, &notion, &notion.token(), &status);
    let second = Process::start(&db, &notion, &notion.token(), &stage);
    for process in [&first, &second] {
        assert!(process.wait_log("leading", Duration::from_secs(20)).await);
    }
    // Both follow the log: they meet each new task at the same moment.
    let mut tasks = Vec::new();
    for _ in 0..10 {
        tasks.push(new_task(&store, None).await);
    }
    let both_show = |value: &str| {
        let cards = notion.cards(&board);
        cards.len() >= tasks.len()
            && cards.iter().all(|c| {
                text(c, "Status").as_deref() == Some(value)
                    && text(c, "Stage").as_deref() == Some(value)
            })
    };
    wait_for(Duration::from_secs(40), || both_show("Queued"))
        .await
        .unwrap_or_else(|| {
            let cards = notion.cards(&board);
            let ids: HashSet<String> = cards.iter().filter_map(|c| text(c, "Task ID")).collect();
            panic!(
                "{} cards for {} tasks ({} Task IDs), not each showing Queued in both properties",
                cards.len(),
                tasks.len(),
                ids.len()
            )
        });
    for step in [
        TaskStatus::from_static("generating_assets"),
        TaskStatus::FINAL_REVIEW,
    ] {
        for task in &tasks {
            change_status(&store, *task, step).await;
        }
    }
    let done = wait_for(Duration::from_secs(40), || both_show("Final Review")).await;
    let (first_status, first_log) = first.sigterm().await;
    let (second_status, second_log) = second.sigterm().await;
    assert!(first_status.success(), "{first_log}");
    assert!(second_status.success(), "{second_log}");
    assert!(done.is_some(), "{:#?}", notion.cards(&board));
    let cards = notion.cards(&board);
    let ids: HashSet<String> = cards.iter().filter_map(|c| text(c, "Task ID")).collect();
    let expected: HashSet<String> = tasks.iter().map(ToString::to_string).collect();
    assert_eq!(cards.len(), tasks.len(), "one card per task");
    assert_eq!(ids, expected);
    let requests = notion.requests();
    let peak = peak_per_second(&requests);
    eprintln!(
        "{} requests, peak {peak} in one second, {} answered 429",
        requests.len(),
        notion.count(429)
    );
    assert!(peak <= 3, "peak {peak} requests in one second");
    let owner_logs = [&first_log, &second_log]
        .iter()
        .filter(|log| log.contains("another projector owns the board's cards"))
        .count();
    assert_eq!(owner_logs, 1, "one of the two owns the board's cards");
}
