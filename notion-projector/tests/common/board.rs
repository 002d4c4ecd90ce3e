//! Boards on the fake Notion: the team's schema, cards as people make them, and a
//! projector in this process with the board opened.

use std::sync::Arc;
use std::time::Duration;

use engine::PgStore;
use notion_projector::fake::{FakeBoard, FakeNotion};
use notion_projector::{
    BoardOptions, IntakeOptions, Metrics, NotionClient, Projector, ProjectorOptions,
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{Running, client, fast_options};

/// The content team's board.
pub const BOARD: [(&str, &str); 6] = [
    ("Name", "title"),
    ("Task ID", "rich_text"),
    ("Channel", "select"),
    ("Status", "status"),
    ("Story direction", "rich_text"),
    ("Intake error", "rich_text"),
];

/// A card property's text, `None` when empty.
pub fn text(card: &Value, property: &str) -> Option<String> {
    FakeNotion::card_text(card, property).filter(|t| !t.is_empty())
}

/// The card with page id `page` (dashed or not).
pub fn card_by_id(notion: &FakeNotion, board: &FakeBoard, page: &str) -> Value {
    let page = super::dashed(page);
    notion
        .cards(board)
        .into_iter()
        .find(|c| c["id"] == page.as_str())
        .unwrap_or_else(|| panic!("no card {page}"))
}

pub async fn task_count(store: &PgStore) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(store.pool())
        .await
        .expect("count tasks")
}

/// The task whose Notion page is `page`, if any.
pub async fn task_of_page(store: &PgStore, page: &str) -> Option<uuid::Uuid> {
    sqlx::query_scalar("SELECT id FROM tasks WHERE notion_page_id = $1")
        .bind(super::dashed(page))
        .fetch_optional(store.pool())
        .await
        .expect("read tasks")
}

/// A Queued card with this title, as a person puts it on the board.
pub fn card(title: &str) -> Value {
    json!({
        "Name": {"title": [{"text": {"content": title}}]},
        "Status": {"status": {"name": "Queued"}},
        "Story direction": {"rich_text": [{"text": {"content": "calm, for kids"}}]},
    })
}

/// Intake every 300 ms into channel `board`.
pub fn fast_intake() -> IntakeOptions {
    IntakeOptions {
        channel: Some("board".into()),
        interval: Duration::from_millis(300),
        ..IntakeOptions::default()
    }
}

/// A projector in this process with `fast_options`, with the board opened.
pub async fn spawn_with_board(
    store: &PgStore,
    notion: &FakeNotion,
    board: &FakeBoard,
    intake: Option<IntakeOptions>,
) -> Running {
    spawn_with_board_options(store, notion, board, intake, fast_options()).await
}

/// A projector in this process with `options`, with the board opened.
pub async fn spawn_with_board_options(
    store: &PgStore,
    notion: &FakeNotion,
    board: &FakeBoard,
    intake: Option<IntakeOptions>,
    options: ProjectorOptions,
) -> Running {
    run(open_board(store, client(notion), board, intake, options).await)
}

/// A projector with the board opened, not running yet.
pub async fn open_board(
    store: &PgStore,
    client: NotionClient,
    board: &FakeBoard,
    intake: Option<IntakeOptions>,
    options: ProjectorOptions,
) -> Projector {
    let mut projector = Projector::new(store.clone(), client, options, Arc::new(Metrics::new()));
    let mut board_options = BoardOptions::new(board.data_source_id.clone());
    board_options.intake = intake;
    projector
        .open_board(&board_options)
        .await
        .expect("open the board");
    projector
}

/// Runs `projector` in this process until [`Running::stop`].
pub fn run(projector: Projector) -> Running {
    let metrics = projector.metrics().clone();
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let handle = tokio::spawn(async move { projector.run(stop).await });
    Running {
        shutdown,
        handle,
        metrics,
    }
}
