//! A task for every new card: with intake on, the leader polls the board for cards in the
//! intake status whose `Task ID` is empty, submits one task per card (the page id is its
//! idempotency key, and its task id is derived from the page id, so a card becomes exactly
//! one task across restarts and leader changes), then writes the `Task ID` back. A card
//! that cannot become a task is marked on the board (the rejected status and a reason) and
//! is not taken again until it is edited. Every request yields to status changes.

use std::collections::HashMap;
use std::time::Duration;

use engine::{ChannelId, NewTask, TaskId};
use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::{Halt, MAX_RETRY_AFTER, Projector, ProjectorError};
use crate::board::{Board, IntakeOptions, page_id_of, results};
use crate::notion::NotionError;
use crate::page_id::PageId;

/// Task ids of cards: `uuid_v5(CARD_NAMESPACE, page id)`.
const CARD_NAMESPACE: Uuid = Uuid::from_u128(0x7265_656c_2d6e_6f74_696f_6e2d_6361_7264);

/// Why a pass over the board ended early (the next pass tries again).
#[derive(Debug, thiserror::Error)]
enum PassError {
    #[error("Notion: {0}")]
    Notion(#[from] NotionError),
    #[error(transparent)]
    Projector(#[from] ProjectorError),
}

/// Cards marked as rejected, by page, with the edit time they had: skipped until edited.
type Rejected = HashMap<PageId, Option<String>>;

impl Projector {
    /// Polls the board until `halt` (nothing without a board with intake).
    pub(super) async fn intake(&self, halt: &Halt) {
        let Some(board) = &self.board else { return };
        let Some(options) = &board.intake else { return };
        let mut rejected = Rejected::new();
        tracing::info!(data_source = %board.data_source, status = %options.status, every = ?options.interval, "taking in new cards");
        loop {
            let pass = tokio::select! {
                _ = halt.cancelled() => return,
                pass = self.intake_pass(board, options, &mut rejected) => pass,
            };
            match pass {
                Ok(0) => {}
                Ok(taken) => tracing::info!(cards = taken, "took in new cards"),
                Err(error) => {
                    tracing::warn!(error = %error, "the board's intake pass stopped: trying again at the next one");
                }
            }
            tokio::select! {
                _ = halt.cancelled() => return,
                _ = tokio::time::sleep(options.interval) => {}
            }
        }
    }

    /// One query of the board (every page of it) and its new cards; how many were handled.
    async fn intake_pass(
        &self,
        board: &Board,
        options: &IntakeOptions,
        rejected: &mut Rejected,
    ) -> Result<usize, PassError> {
        let mut conditions = vec![board.task_id.filter(json!({"is_empty": true}))];
        if let Some(status) = &board.status {
            conditions.push(status.filter(json!({"equals": options.status})));
        }
        let mut cursor: Option<String> = None;
        let mut taken = 0;
        loop {
            let mut body = json!({
                "filter": {"and": conditions},
                "sorts": [{"timestamp": "created_time", "direction": "ascending"}],
                "page_size": 100,
            });
            if let Some(cursor) = &cursor {
                body["start_cursor"] = json!(cursor);
            }
            self.limiter.acquire_yielding().await;
            let answer = self.answered(board.query(&self.client, body).await)?;
            for card in results(&answer) {
                if self.take_card(board, options, card, rejected).await? {
                    taken += 1;
                }
            }
            cursor = answer
                .get("next_cursor")
                .and_then(Value::as_str)
                .filter(|_| answer.get("has_more") == Some(&Value::Bool(true)))
                .map(str::to_owned);
            if cursor.is_none() {
                return Ok(taken);
            }
        }
    }

    /// Submits the card's task and writes its id back, or marks the card rejected.
    async fn take_card(
        &self,
        board: &Board,
        options: &IntakeOptions,
        card: &Value,
        rejected: &mut Rejected,
    ) -> Result<bool, PassError> {
        let Some(page) = page_id_of(card) else {
            return Ok(false);
        };
        let edited = card
            .get("last_edited_time")
            .and_then(Value::as_str)
            .map(str::to_owned);
        if rejected.get(&page) == Some(&edited) {
            return Ok(false);
        }
        let submitted = match task_of_card(board, options, &page, card) {
            Ok(task) => match self.store.create_task(task).await {
                Ok(created) => Ok(created.task_id()),
                Err(engine::Error::InvalidInput(reason)) => Err(reason),
                Err(other) => return Err(ProjectorError::from(other).into()),
            },
            Err(reason) => Err(reason),
        };
        match submitted {
            Ok(task) => {
                let body = json!({"properties": {
                    board.task_id.name.clone(): board.task_id.value(&task.to_string()),
                }});
                self.limiter.acquire_yielding().await;
                self.answered(self.client.patch_page(&page, body).await)?;
                tracing::info!(task_id = %task, page_id = %page, "a card became a task");
            }
            Err(reason) => {
                tracing::warn!(page_id = %page, reason = %reason, "a card cannot become a task: marked on the board, not retried until edited");
                rejected.insert(page.clone(), edited);
                let mut properties = Map::new();
                if let Some(status) = &board.status {
                    properties.insert(status.name.clone(), status.value(&options.rejected_status));
                }
                if let Some(property) = &board.reason {
                    properties.insert(property.name.clone(), property.value(&reason));
                }
                self.limiter.acquire_yielding().await;
                self.answered(
                    self.client
                        .patch_page(&page, json!({ "properties": properties }))
                        .await,
                )?;
            }
        }
        Ok(true)
    }

    /// Counts the answer, and pauses every request on a 429/529.
    fn answered(&self, result: Result<Value, NotionError>) -> Result<Value, NotionError> {
        match &result {
            Ok(_) => self.metrics.request("ok"),
            Err(error) => {
                self.metrics.request(error.outcome());
                if let NotionError::RateLimited { retry_after, .. } = error {
                    self.metrics.rate_limited.inc();
                    self.limiter.pause_for(
                        retry_after
                            .unwrap_or(Duration::from_secs(1))
                            .min(MAX_RETRY_AFTER),
                    );
                }
            }
        }
        result
    }
}

/// The task a card asks for, or why it cannot be one.
fn task_of_card(
    board: &Board,
    options: &IntakeOptions,
    page: &PageId,
    card: &Value,
) -> Result<NewTask, String> {
    let topic = board.title.read(card).ok_or_else(|| {
        format!(
            "the card has no title ({:?}): the title is the video's topic",
            board.title.name
        )
    })?;
    let channel = board
        .channel
        .as_ref()
        .and_then(|p| p.read(card))
        .or_else(|| options.channel.clone())
        .ok_or("the card has no channel and no default channel is set (--intake-channel)")?;
    let channel = ChannelId::parse(&channel).map_err(|e| e.to_string())?;
    let mut input = json!({ "topic": topic });
    if let Some(direction) = board.direction.as_ref().and_then(|p| p.read(card)) {
        input["story_direction"] = json!(direction);
    }
    let mut task = NewTask::new(options.workflow.clone(), channel, input);
    task.id = TaskId::from(Uuid::new_v5(&CARD_NAMESPACE, page.as_str().as_bytes()));
    task.notion_page_id = Some(page.to_string());
    task.idempotency_key = Some(page.to_string());
    Ok(task)
}
