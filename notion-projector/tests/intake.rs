//! The board's intake when cards go wrong (issue 26): one bad card never stops the others,
//! a card's Task ID is owed with its task (written back even after a SIGKILL and after the
//! card left the intake status), a card the projector made never becomes a second task,
//! and rejected cards are marked (even after a failed marking) and taken again once fixed.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::board::*;
use common::process::Process;
use common::*;
use engine::TaskStatus;
use notion_projector::ProjectorOptions;
use notion_projector::fake::{FakeBoard, FakeNotion};
use serde_json::{Value, json};

/// The intake flags of the binary, every 300 ms into channel `board`.
fn intake_args(board: &FakeBoard) -> Vec<String> {
    [
        "--data-source",
        &board.data_source_id,
        "--intake",
        "--intake-channel",
        "board",
        "--intake-interval",
        "300ms",
    ]
    .map(str::to_owned)
    .to_vec()
}

fn args(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// Whether the card's Task ID names the task made from it.
async fn written_back(
    store: &engine::PgStore,
    notion: &FakeNotion,
    board: &FakeBoard,
    page: &str,
) -> bool {
    let Some(task) = task_of_page(store, page).await else {
        return false;
    };
    text(&card_by_id(notion, board, page), "Task ID") == Some(task.to_string())
}

/// Polls until every page in `pages` has its Task ID written back, or `within` passes.
async fn wait_written_back(
    store: &engine::PgStore,
    notion: &FakeNotion,
    board: &FakeBoard,
    pages: &[String],
    within: Duration,
) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < within {
        let mut all = true;
        for page in pages {
            all &= written_back(store, notion, board, page).await;
        }
        if all {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Bad cards first on the board (a title with U+0000, which PostgreSQL refuses; a card
/// whose PATCH always answers 503; a card edited after its task was made but before its
/// Task ID was written back), then good ones: every good card becomes a task with its Task
/// ID, the NUL title is marked with a reason, and the edited card keeps its first task.
/// (Before: the first failing card ended every pass, and sorted first again.)
#[tokio::test]
async fn one_bad_card_never_stops_the_intake_of_the_others() {
    let db = test_db().await;
    let store = db.store();
    let notion = fake().await;
    let board = notion.add_board(&BOARD);
    // The edited card: its task is made, its write-back fails, the projector stops; then
    // someone edits the card.
    let edited = notion.add_card(&board, card("Glaciers")).expect("add card");
    notion.set_page_outage(&edited, Some(503));
    let first = spawn_with_board(&store, &notion, &board, Some(fast_intake())).await;
    wait_for(Duration::from_secs(10), || notion.count(503) >= 1)
        .await
        .expect("the edited card's task was made and its write-back answered 503");
    first.stop().await;
    let edited_task = task_of_page(&store, &edited)
        .await
        .expect("the edited card's task");
    notion
        .edit_card(
            &edited,
            json!({"Name": {"title": [{"text": {"content": "Glaciers, retold"}}]}}),
        )
        .expect("edit the card");
    notion.set_page_outage(&edited, None);

    let nul = notion
        .add_card(&board, card("Deep sea\u{0}vents"))
        .expect("add card");
    let broken = notion
        .add_card(&board, card("Coral reefs"))
        .expect("add card");
    notion.set_page_outage(&broken, Some(503));
    let mut good = Vec::new();
    for n in 0..5 {
        good.push(
            notion
                .add_card(&board, card(&format!("Tides {n}")))
                .expect("add card"),
        );
    }
    let running = spawn_with_board(&store, &notion, &board, Some(fast_intake())).await;
    let all_good = wait_written_back(&store, &notion, &board, &good, Duration::from_secs(20)).await;
    let edited_back = wait_written_back(
        &store,
        &notion,
        &board,
        std::slice::from_ref(&edited),
        Duration::from_secs(10),
    )
    .await;
    let marked = wait_for(Duration::from_secs(10), || {
        text(&card_by_id(&notion, &board, &nul), "Status").as_deref() == Some("Rejected")
    })
    .await;
    running.stop().await;
    assert!(
        all_good,
        "every good card got its task: {:#?}",
        notion.cards(&board)
    );
    assert!(edited_back, "the edited card shows its task's id");
    assert_eq!(
        task_of_page(&store, &edited).await,
        Some(edited_task),
        "still its first task"
    );
    assert!(marked.is_some(), "the NUL title is marked rejected");
    let reason = text(&card_by_id(&notion, &board, &nul), "Intake error").unwrap_or_default();
    assert!(reason.contains("U+0000"), "{reason}");
    assert!(task_of_page(&store, &nul).await.is_none());
    assert!(
        task_of_page(&store, &broken).await.is_some(),
        "the 503 card is a task too"
    );
    assert_eq!(
        task_count(&store).await,
        7,
        "one task per good card, the edited and the 503 one"
    );
}

/// SIGKILL between making a card's task and writing its Task ID back; the task then moves
/// on, and a projector without intake mirrors that (the card leaves Queued, so intake
/// never matches it again): the Task ID is written anyway, because it is owed with the
/// task's own status updates. (Before: the card kept an empty Task ID for good.)
#[tokio::test]
async fn a_task_id_owed_across_a_sigkill_is_written_after_the_card_moved_on() {
    let db = test_db().await;
    let store = db.store();
    let notion = fake().await;
    let board = notion.add_board(&BOARD);
    let page = notion.add_card(&board, card("Auroras")).expect("add card");
    // Every request to the card hangs: the write-back cannot land before the kill.
    notion.set_page_stall(&page, Some(Duration::from_secs(30)));
    let intake = intake_args(&board);
    let first = Process::start(&db, &notion, &notion.token(), &args(&intake));
    let mut task = None;
    for _ in 0..200 {
        task = task_of_page(&store, &page).await;
        if task.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let task = engine::TaskId::from(task.expect("the card's task was made"));
    first.sigkill().await;
    notion.set_page_stall(&page, None);
    assert_eq!(text(&card_by_id(&notion, &board, &page), "Task ID"), None);
    for status in ["generating_assets", "generating_video", "final_review"] {
        change_status(&store, task, TaskStatus::from_static(status)).await;
    }
    // A projector without intake (a leader of another build, or intake switched off).
    let status_only = ["--data-source", board.data_source_id.as_str()];
    let second = Process::start(&db, &notion, &notion.token(), &status_only);
    wait_for(Duration::from_secs(10), || {
        text(&card_by_id(&notion, &board, &page), "Status").as_deref() == Some("Final Review")
    })
    .await
    .expect("the card follows its task");
    let written = wait_written_back(
        &store,
        &notion,
        &board,
        std::slice::from_ref(&page),
        Duration::from_secs(5),
    )
    .await;
    let (status, log) = second.sigterm().await;
    assert!(status.success(), "{log}");
    assert!(
        written,
        "the Task ID is written with the status: {:#?}",
        card_by_id(&notion, &board, &page)
    );
    // Intake, back: the card is no new card.
    let third = Process::start(&db, &notion, &notion.token(), &args(&intake));
    assert!(
        third
            .wait_log("taking in new cards", Duration::from_secs(10))
            .await
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (status, log) = third.sigterm().await;
    assert!(status.success(), "{log}");
    assert_eq!(task_count(&store).await, 1);
    assert!(written_back(&store, &notion, &board, &page).await);
}

/// A card the projector made for a task: someone clears its Task ID. Intake must not make
/// a second task of it; the Task ID comes back. (Before: a second task, one card.)
#[tokio::test]
async fn clearing_the_task_id_of_a_card_the_projector_made_makes_no_second_task() {
    let db = test_db().await;
    let store = db.store();
    let notion = fake().await;
    let board = notion.add_board(&BOARD);
    let task = new_task(&store, None).await;
    let running = spawn_with_board(&store, &notion, &board, Some(fast_intake())).await;
    wait_for(Duration::from_secs(10), || {
        notion
            .cards(&board)
            .iter()
            .any(|c| text(c, "Task ID") == Some(task.to_string()))
    })
    .await
    .expect("the task's card is made");
    let page = notion.cards(&board)[0]["id"]
        .as_str()
        .expect("card id")
        .to_owned();
    notion
        .edit_card(&page, json!({"Task ID": {"rich_text": []}}))
        .expect("clear the Task ID");
    let restored = wait_for(Duration::from_secs(10), || {
        text(&card_by_id(&notion, &board, &page), "Task ID") == Some(task.to_string())
    })
    .await;
    // A few more passes: nothing else happens.
    tokio::time::sleep(Duration::from_secs(1)).await;
    running.stop().await;
    assert_eq!(task_count(&store).await, 1, "no second task for the card");
    assert_eq!(notion.cards(&board).len(), 1);
    assert!(restored.is_some(), "the Task ID comes back");
}

/// A rejected card fixed within the same minute (Notion rounds `last_edited_time` to the
/// minute) is taken in at the next pass. (Before: ignored until the minute turned.)
#[tokio::test]
async fn a_rejected_card_fixed_within_the_minute_is_taken() {
    let db = test_db().await;
    let store = db.store();
    let notion = fake().await;
    let board = notion.add_board(&BOARD);
    let page = notion
        .add_card(&board, json!({"Status": {"status": {"name": "Queued"}}}))
        .expect("add card");
    let running = spawn_with_board(&store, &notion, &board, Some(fast_intake())).await;
    wait_for(Duration::from_secs(10), || {
        text(&card_by_id(&notion, &board, &page), "Status").as_deref() == Some("Rejected")
    })
    .await
    .expect("the untitled card is marked rejected");
    let before = card_by_id(&notion, &board, &page)["last_edited_time"].clone();
    notion
        .edit_card(
            &page,
            json!({
                "Name": {"title": [{"text": {"content": "Fixed title"}}]},
                "Status": {"status": {"name": "Queued"}},
            }),
        )
        .expect("fix the card");
    assert_eq!(
        card_by_id(&notion, &board, &page)["last_edited_time"],
        before,
        "edited within the same minute"
    );
    let taken = wait_for(Duration::from_secs(5), || {
        text(&card_by_id(&notion, &board, &page), "Task ID").is_some()
    })
    .await;
    running.stop().await;
    assert!(taken.is_some(), "{:#?}", card_by_id(&notion, &board, &page));
    assert_eq!(task_count(&store).await, 1);
}

/// The PATCH that marks a card rejected answers 503: the card is marked once Notion
/// answers again. (Before: listed as rejected before the PATCH, it stayed Queued, never
/// marked.)
#[tokio::test]
async fn a_card_whose_marking_failed_is_marked_later() {
    let db = test_db().await;
    let store = db.store();
    let notion = fake().await;
    let board = notion.add_board(&BOARD);
    let page = notion
        .add_card(&board, json!({"Status": {"status": {"name": "Queued"}}}))
        .expect("add card");
    notion.set_page_outage(&page, Some(503));
    let running = spawn_with_board(&store, &notion, &board, Some(fast_intake())).await;
    wait_for(Duration::from_secs(10), || notion.count(503) >= 1)
        .await
        .expect("the marking answered 503");
    notion.set_page_outage(&page, None);
    let marked = wait_for(Duration::from_secs(10), || {
        text(&card_by_id(&notion, &board, &page), "Status").as_deref() == Some("Rejected")
    })
    .await;
    running.stop().await;
    assert!(
        marked.is_some(),
        "{:#?}",
        card_by_id(&notion, &board, &page)
    );
    assert_eq!(task_count(&store).await, 0);
}

/// A small seeded generator for the kill schedule (the seed is printed).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n
    }
}

/// Must show (issue 26): intake of a board mixing good and bad cards, with the projector
/// SIGKILLed at random points 12 times while its tasks move on. Every good card becomes
/// exactly one task with its Task ID written back; the bad ones are marked with a reason.
#[tokio::test]
async fn intake_of_mixed_cards_across_twelve_sigkills_makes_each_good_card_one_task() {
    let db = test_db().await;
    let store = db.store();
    let notion = fake().await;
    let board = notion.add_board(&BOARD);
    let mut bad = Vec::new();
    bad.push(
        notion
            .add_card(&board, json!({"Status": {"status": {"name": "Queued"}}}))
            .expect("untitled"),
    );
    bad.push(
        notion
            .add_card(&board, card("Null\u{0}byte"))
            .expect("NUL title"),
    );
    let mut no_channel = card("Bad channel");
    no_channel["Channel"] = json!({"select": {"name": "../etc"}});
    bad.push(
        notion
            .add_card(&board, no_channel)
            .expect("invalid channel"),
    );
    let broken = notion
        .add_card(&board, card("Always 503"))
        .expect("503 card");
    notion.set_page_outage(&broken, Some(503));
    let mut good = Vec::new();
    for n in 0..20 {
        good.push(
            notion
                .add_card(&board, card(&format!("Rivers {n}")))
                .expect("add card"),
        );
    }
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(26, |d| d.as_nanos() as u64);
    eprintln!("kill schedule seed {seed}");
    let mut rng = Rng(seed);
    let intake = intake_args(&board);
    let mut moved: HashSet<uuid::Uuid> = HashSet::new();
    let mut edited: HashMap<String, ()> = HashMap::new();
    for kill in 0..12 {
        let process = Process::start(&db, &notion, &notion.token(), &args(&intake));
        let run_for = Duration::from_millis(300 + rng.below(3700));
        let until = std::time::Instant::now() + run_for;
        while std::time::Instant::now() < until {
            // Tasks move on as workers would take them; some cards are edited meanwhile.
            for page in &good {
                if let Some(task) = task_of_page(&store, page).await
                    && moved.insert(task)
                {
                    let task = engine::TaskId::from(task);
                    change_status(&store, task, TaskStatus::from_static("generating_assets")).await;
                    change_status(&store, task, TaskStatus::FINAL_REVIEW).await;
                }
                if rng.below(40) == 0 && edited.insert(page.clone(), ()).is_none() {
                    notion
                        .edit_card(page, json!({"Story direction": {"rich_text": [{"text": {"content": "edited"}}]}}))
                        .expect("edit a card");
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let leading = process.log().contains("leading");
        process.sigkill().await;
        let with_id = notion
            .cards(&board)
            .iter()
            .filter(|c| text(c, "Task ID").is_some())
            .count();
        eprintln!(
            "kill {} after {run_for:?} (led: {leading}): {} tasks, {with_id} Task IDs on the board",
            kill + 1,
            task_count(&store).await
        );
    }
    let last = Process::start(&db, &notion, &notion.token(), &args(&intake));
    let all_good = wait_written_back(&store, &notion, &board, &good, Duration::from_secs(40)).await;
    let all_marked = wait_for(Duration::from_secs(20), || {
        bad.iter().all(|page| {
            let card = card_by_id(&notion, &board, page);
            text(&card, "Status").as_deref() == Some("Rejected")
                && text(&card, "Intake error").is_some()
        })
    })
    .await;
    let (status, log) = last.sigterm().await;
    assert!(status.success(), "{log}");
    assert!(!log.contains(&notion.token()), "the token is never logged");
    assert!(
        all_good,
        "every good card has its task's id: {:#?}",
        notion.cards(&board)
    );
    assert!(
        all_marked.is_some(),
        "every bad card is marked: {:#?}",
        notion.cards(&board)
    );
    let pages: Vec<(uuid::Uuid, Option<String>)> =
        sqlx::query_as("SELECT id, notion_page_id FROM tasks")
            .fetch_all(store.pool())
            .await
            .expect("tasks");
    assert_eq!(
        pages.len(),
        good.len() + 1,
        "one task per good card, and the 503 card's"
    );
    let distinct: HashSet<&Option<String>> = pages.iter().map(|(_, page)| page).collect();
    assert_eq!(distinct.len(), pages.len(), "no card became two tasks");
    for page in &bad {
        assert!(task_of_page(&store, page).await.is_none());
    }
    let cards: Vec<Value> = notion.cards(&board);
    assert_eq!(cards.len(), good.len() + bad.len() + 1, "no card was made");
}

/// Review of issue 26: a task submitted by hand with a card's page as its Notion page
/// (`reel submit --notion-page`, here the page's URL) while the card sits Queued with an
/// empty Task ID. Intake must see that the card has its task: no second task, and the
/// card gets that task's id. (Before: intake made a second task of the card.)
#[tokio::test]
async fn a_card_a_submitted_task_names_as_its_page_never_becomes_a_second_task() {
    let db = test_db().await;
    let store = db.store();
    let notion = fake().await;
    let board = notion.add_board(&BOARD);
    let page = notion
        .add_card(&board, card("Volcanoes"))
        .expect("add card");
    let url = format!("https://www.notion.so/Volcanoes-{}", page.replace('-', ""));
    let task = new_task(&store, Some(&url)).await;
    let running = spawn_with_board(&store, &notion, &board, Some(fast_intake())).await;
    let written = wait_for(Duration::from_secs(10), || {
        text(&card_by_id(&notion, &board, &page), "Task ID") == Some(task.to_string())
    })
    .await;
    // A few more passes: nothing else happens.
    tokio::time::sleep(Duration::from_secs(1)).await;
    running.stop().await;
    assert_eq!(task_count(&store).await, 1, "no second task for the card");
    assert!(
        written.is_some(),
        "the card shows its task's id: {:#?}",
        notion.cards(&board)
    );
}

/// Review of issue 26: two projectors on one board, and the one that owns the board's
/// cards has no intake (it mirrors a second property). The one with intake must still take
/// the new cards in. (Before: only the card owner took cards in, so none was.)
#[tokio::test]
async fn intake_runs_on_the_projector_that_has_it_whoever_owns_the_cards() {
    let db = test_db().await;
    let store = db.store();
    let notion = fake().await;
    let board = notion.add_board(&BOARD);
    let mirror_only = spawn_with_board_options(
        &store,
        &notion,
        &board,
        None,
        ProjectorOptions {
            name: "mirror".into(),
            ..fast_options()
        },
    )
    .await;
    // It leads and owns the board's cards (two advisory locks) before the other starts.
    let mut owns = false;
    for _ in 0..100 {
        let locks: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_one(store.pool())
        .await
        .expect("count advisory locks");
        if locks >= 2 {
            owns = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(owns, "the first projector owns the board");
    let with_intake = spawn_with_board(&store, &notion, &board, Some(fast_intake())).await;
    let mut cards = Vec::new();
    for n in 0..3 {
        cards.push(
            notion
                .add_card(&board, card(&format!("Rivers {n}")))
                .expect("add card"),
        );
    }
    let taken = wait_written_back(&store, &notion, &board, &cards, Duration::from_secs(15)).await;
    with_intake.stop().await;
    mirror_only.stop().await;
    assert!(
        taken,
        "every card became a task: {:#?}",
        notion.cards(&board)
    );
    assert_eq!(task_count(&store).await, 3);
}

/// Review of issue 28: after a deploy of version 2 (its worker recorded its versions at
/// start), a card taken in is a version-2 task, which the version-2 worker runs. (Before:
/// intake made every task version 1, which no version-2 worker claims.)
#[tokio::test]
async fn a_card_taken_in_after_a_v2_deploy_is_a_task_a_v2_worker_runs() {
    use engine::prelude::*;
    let db = test_db().await;
    let store = db.store();
    let v2 = || {
        Registry::new().register(
            Workflow::new("video")
                .version(2)
                .step(Step::call("render", |_ctx: StepContext| async move {
                    ItemOutput::value(json!({}))
                })),
        )
    };
    store
        .record_workflow_versions(&v2(), "v2-worker")
        .await
        .expect("the v2 worker records its versions");
    let notion = fake().await;
    let board = notion.add_board(&BOARD);
    let page = notion.add_card(&board, card("Glaciers")).expect("add card");
    let running = spawn_with_board(&store, &notion, &board, Some(fast_intake())).await;
    let taken = wait_for(Duration::from_secs(10), || {
        text(&card_by_id(&notion, &board, &page), "Task ID").is_some()
    })
    .await;
    running.stop().await;
    assert!(taken.is_some(), "the card became a task");
    let version: i32 = sqlx::query_scalar("SELECT workflow_version FROM tasks")
        .fetch_one(store.pool())
        .await
        .expect("the task's version");
    assert_eq!(version, 2);
    let options = WorkerOptions {
        poll_interval: Duration::from_millis(50),
        ..WorkerOptions::new("v2-worker")
    };
    let report = Worker::new(store.clone(), v2(), options)
        .run_until_idle()
        .await
        .expect("v2 worker");
    assert_eq!(
        report.claimed, 1,
        "the v2 worker ran the card's task: {report:?}"
    );
}

/// Review of issue 26: a page id the projector reads as the card's page (`<id>\r\n`: the
/// projector trims white space) names the card for intake too: no second task.
#[tokio::test]
async fn a_page_id_with_trailing_white_space_still_names_its_card() {
    let db = test_db().await;
    let store = db.store();
    let notion = fake().await;
    let board = notion.add_board(&BOARD);
    let page = notion
        .add_card(&board, card("Volcanoes"))
        .expect("add card");
    let raw = format!("{}\r\n", page.replace('-', ""));
    let _task = new_task(&store, Some(&raw)).await;
    let running = spawn_with_board(&store, &notion, &board, Some(fast_intake())).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    running.stop().await;
    assert_eq!(task_count(&store).await, 1, "no second task for the card");
}

/// Review of issue 26: a page id the projector refuses (`page-<id>`) names no card: the
/// card is taken in as a task of its own. (Before: the SQL key took the last 32 hex digits
/// of anything, so intake thought the card owned and never took it in.)
#[tokio::test]
async fn a_page_id_the_projector_refuses_names_no_card() {
    let db = test_db().await;
    let store = db.store();
    let notion = fake().await;
    let board = notion.add_board(&BOARD);
    let page = notion.add_card(&board, card("Rivers")).expect("add card");
    let raw = format!("page-{}", page.replace('-', ""));
    let _task = new_task(&store, Some(&raw)).await;
    let running = spawn_with_board(&store, &notion, &board, Some(fast_intake())).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    running.stop().await;
    assert_eq!(
        task_count(&store).await,
        2,
        "the card became a task of its own"
    );
}

/// The SQL key and `PageId::parse` agree on every form either accepts or refuses.
#[tokio::test]
async fn the_sql_page_key_reads_page_ids_as_the_projector_does() {
    let db = test_db().await;
    let hex = "598337872cf94fdf8782e53db20768a5";
    let dashed = "59833787-2cf9-4fdf-8782-e53db20768a5";
    let forms = [
        hex.to_owned(),
        dashed.to_owned(),
        hex.to_uppercase(),
        format!("  {hex}\r\n"),
        format!("{hex}\t"),
        format!("{hex}\u{a0}"),
        format!("https://www.notion.so/Title-{hex}"),
        format!("https://www.notion.so/Title-{hex}?v=0123456789abcdef0123456789abcdef"),
        format!("https://www.notion.so/{hex}/"),
        format!("https://www.notion.so/Title-{dashed}"),
        format!("x{hex}"),
        format!("1{hex}"),
        format!("page-{hex}"),
        "not a page".to_owned(),
    ];
    for raw in forms {
        let sql: Option<String> = sqlx::query_scalar("SELECT reel_notion_page_key($1)")
            .bind(&raw)
            .fetch_one(db.pool())
            .await
            .expect("key");
        let rust = notion_projector::PageId::parse(&raw)
            .ok()
            .map(|p| p.as_str().replace('-', ""));
        assert_eq!(sql, rust, "{raw:?}");
    }
}
