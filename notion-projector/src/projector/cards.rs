//! A card for every task: a task without a Notion page gets one on the board, found by
//! its `Task ID` first, so a crash between the create and its record never makes a second
//! card; the page is recorded in `notion_cards` (rebuildable: a lost row is found again by
//! the same query).

use engine::{Event, TaskId};
use uuid::Uuid;

use super::{Projector, ProjectorError};
use crate::board::Board;
use crate::notion::NotionError;
use crate::page_id::PageId;
use crate::queue::Job;

/// Task ids of cards taken in by intake: `uuid_v5(CARD_NAMESPACE, page id)`.
const CARD_NAMESPACE: Uuid = Uuid::from_u128(0x7265_656c_2d6e_6f74_696f_6e2d_6361_7264);

/// The id of the task intake makes of the card `page` (the same on every run and leader).
pub(super) fn card_task(page: &PageId) -> TaskId {
    TaskId::from(Uuid::new_v5(&CARD_NAMESPACE, page.as_str().as_bytes()))
}

/// The task's card after [`Projector::card_of`].
pub(super) enum Card {
    /// Created with the job's status: nothing more to send.
    Created(PageId),
    /// It was on the board already: its status still needs the PATCH.
    Found(PageId),
}

impl Projector {
    /// Finds the job's card on the board or creates it (title = the task's topic, its id,
    /// channel and status). The caller holds a limiter turn for the first request; a
    /// second one waits for its own.
    pub(super) async fn card_of(
        &self,
        board: &Board,
        job: &Job,
    ) -> Result<Result<Card, NotionError>, ProjectorError> {
        let task = job.task();
        let id = task.to_string();
        match board.find_card(&self.client, &id).await {
            Ok(Some(page)) => {
                self.record_card(task, &page, false).await?;
                tracing::info!(task_id = %task, page_id = %page, "found the task's card on the board");
                return Ok(Ok(Card::Found(page)));
            }
            Ok(None) => {}
            Err(error) => return Ok(Err(error)),
        }
        let (title, channel) = self.card_text(task).await?;
        self.limiter.acquire().await;
        let created = board
            .create_card(&self.client, &id, &title, &channel, &job.target.display)
            .await;
        match created {
            Ok(page) => {
                self.metrics.request("ok");
                self.record_card(task, &page, true).await?;
                tracing::info!(task_id = %task, page_id = %page, "created the task's card on the board");
                Ok(Ok(Card::Created(page)))
            }
            Err(error) => Ok(Err(error)),
        }
    }

    /// The card's title (the task's `topic`, or its workflow and id) and channel.
    async fn card_text(&self, task: TaskId) -> Result<(String, String), ProjectorError> {
        let events = self.store.read_stream(task, 1).await?;
        let Some(Event::TaskSubmitted {
            workflow,
            channel_id,
            input,
            ..
        }) = events.first().map(|e| &e.event)
        else {
            return Ok((format!("Task {task}"), String::new()));
        };
        let title = input
            .get("topic")
            .and_then(|t| t.as_str())
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map_or_else(|| format!("{workflow} {task}"), str::to_owned);
        Ok((title, channel_id.as_str().to_owned()))
    }

    async fn record_card(
        &self,
        task: TaskId,
        page: &PageId,
        created: bool,
    ) -> Result<(), ProjectorError> {
        sqlx::query(
            "INSERT INTO notion_cards (projector, task_id, page_id, created) \
             VALUES ($1, $2, $3, $4) \
             ON CONFLICT (projector, task_id) DO UPDATE \
                SET page_id = EXCLUDED.page_id, recorded_at = now()",
        )
        .bind(&self.options.name)
        .bind(task.as_uuid())
        .bind(page.as_str())
        .bind(created)
        .execute(self.store.pool())
        .await?;
        Ok(())
    }
}
