//! A card for every task: a task without a Notion page gets one on the board, made by the
//! board's owner only (one card per task however many projectors mirror the board), found
//! by its `Task ID` first, and written down before it is sent, so neither a crash between
//! the create and its record nor a lost answer makes a second card. The page is recorded
//! in `notion_cards` with its board (rebuildable: a lost row is found again by the query).

use std::time::Duration;

use engine::{Event, TaskId};
use tokio::time::Instant;
use uuid::Uuid;

use super::leadership::Halt;
use super::{Projector, ProjectorError};
use crate::board::Board;
use crate::notion::NotionError;
use crate::page_id::PageId;
use crate::queue::Job;

/// Why a card job waits, as `sync_retries.error` shows it.
pub(super) const WAITING_FOR_OWNER: &str =
    "waiting for the board's card owner (another projector) to make the card";
const LOCKS_NOT_HELD: &str =
    "the leader's lock session does not hold the board's locks: the card is not made now";
const WAITING_FOR_QUERY: &str =
    "a create of the card got no answer: waiting for the board's query to show the card";

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
    /// It was on the board already (found by a query): its status still needs the PATCH,
    /// which waits for a turn of its own.
    Found(PageId),
    /// Recorded already (by the board's owner, or earlier): no request was made, so the
    /// PATCH takes the turn the caller holds.
    Recorded(PageId),
    /// Not made yet, and not to be made by this projector now: look again after the wait.
    /// Another projector owns the board's cards, or a create of ours got no answer and the
    /// query may not show its card yet.
    NotYet(Duration, &'static str),
    /// This leader stopped (its lock lost) before the create: nothing was sent.
    Abandoned,
}

/// The longest wait before looking again for a card not made yet.
const MAX_LOOK_AGAIN: Duration = Duration::from_secs(30);

impl Projector {
    /// Finds the job's card (recorded, or on the board by its Task ID) or, on the board's
    /// owner only, creates it (title = the task's topic, its id, channel and status). The
    /// caller holds a limiter turn for the first request; a second one waits for its own.
    /// A create is written down before it is sent: after one whose answer was lost, the
    /// projector only looks for the card for `card_query_lag` (Notion's query can lag its
    /// writes), then makes it again if the query still does not show it.
    pub(super) async fn card_of(
        &self,
        board: &Board,
        job: &Job,
        halt: &Halt,
        turn: Instant,
    ) -> Result<Result<Card, NotionError>, ProjectorError> {
        let task = job.task();
        if let Some(page) = self.recorded_card(board, task).await? {
            self.record_card(board, task, &page, false).await?;
            return Ok(Ok(Card::Recorded(page)));
        }
        // Looks again after 1 s, doubling to 30 s.
        let look_again = Duration::from_secs(1)
            .saturating_mul(2u32.saturating_pow(job.waits))
            .min(MAX_LOOK_AGAIN);
        if !halt.owns_board() {
            return Ok(Ok(Card::NotYet(look_again, WAITING_FOR_OWNER)));
        }
        let id = task.to_string();
        self.limiter.on_time(turn).await;
        match board.find_card(&self.client, &id).await {
            Ok(Some(page)) => {
                self.metrics.request("ok");
                self.record_card(board, task, &page, false).await?;
                tracing::info!(task_id = %task, page_id = %page, "found the task's card on the board");
                return Ok(Ok(Card::Found(page)));
            }
            Ok(None) => self.metrics.request("ok"),
            Err(error) => return Ok(Err(error)),
        }
        if let Some(left) = self.unanswered_create(board, task).await? {
            let wait = left.min(look_again);
            tracing::info!(task_id = %task, retry_in = ?wait, "a create of the task's card got no answer: looking for the card before making another");
            return Ok(Ok(Card::NotYet(wait, WAITING_FOR_QUERY)));
        }
        let (title, channel) = self.card_text(task).await?;
        // The create's own turn first: the pending create is stamped when it leaves, so
        // the wait for the card to show in the query counts from then, however long the
        // turn took (a stamp before the wait could end that window before the create was
        // even sent, and a lost answer would then make a second card).
        let turn = self.limiter.acquire().await;
        // Before the one request that must not go out twice: the watchdog would notice a
        // lost lock only at its next ping (and while this waits for its turn, a lost lock
        // abandons it).
        if !self.still_owns_board(halt, board).await? {
            if halt.stop.is_cancelled() {
                return Ok(Ok(Card::Abandoned));
            }
            // The watchdog has not noticed yet: wait as a recorded retry (a new leader
            // resumes it), never drop the job while this leader goes on.
            return Ok(Ok(Card::NotYet(look_again, LOCKS_NOT_HELD)));
        }
        // Stamped right before it leaves (one statement): a turn made late by the check is
        // taken again first.
        self.limiter.on_time(turn).await;
        self.note_create(board, task).await?;
        let created = board
            .create_card(&self.client, &id, &title, &channel, &job.target.display)
            .await;
        match created {
            Ok(page) => {
                self.metrics.request("ok");
                self.record_card(board, task, &page, true).await?;
                tracing::info!(task_id = %task, page_id = %page, "created the task's card on the board");
                Ok(Ok(Card::Created(page)))
            }
            Err(error) => {
                if !error.may_have_applied() {
                    self.forget_create(board, task).await?;
                }
                Ok(Err(error))
            }
        }
    }

    /// The card recorded for the task on this board (by any projector), or by this
    /// projector.
    async fn recorded_card(
        &self,
        board: &Board,
        task: TaskId,
    ) -> Result<Option<PageId>, ProjectorError> {
        let page: Option<String> = self
            .store
            .on_pool(async |c| {
                self.store
                    .scalar(
                        "SELECT page_id FROM notion_cards \
              WHERE task_id = $1 AND (projector = $2 OR data_source = $3) \
              ORDER BY projector = $2 DESC, recorded_at LIMIT 1",
                    )
                    .bind(task.as_uuid())
                    .bind(&self.options.name)
                    .bind(&board.data_source)
                    .fetch_optional(c)
                    .await
            })
            .await?;
        Ok(page.and_then(|p| PageId::parse(&p).ok()))
    }

    /// How much longer to look before making the task's card again, after a create whose
    /// answer was not heard.
    async fn unanswered_create(
        &self,
        board: &Board,
        task: TaskId,
    ) -> Result<Option<Duration>, ProjectorError> {
        let left: Option<f64> = self
            .store
            .on_pool(async |c| {
                self.store.scalar(
            "SELECT extract(epoch FROM sent_at + make_interval(secs => $3) - now())::float8 \
               FROM notion_card_creates WHERE data_source = $1 AND task_id = $2",
        )
        .bind(&board.data_source)
        .bind(task.as_uuid())
        .bind(self.options.card_query_lag.as_secs_f64())
        .fetch_optional(c).await
            })
            .await?;
        Ok(left
            .filter(|left| *left > 0.0)
            .map(|left| Duration::try_from_secs_f64(left).unwrap_or_default()))
    }

    async fn note_create(&self, board: &Board, task: TaskId) -> Result<(), ProjectorError> {
        self.store
            .on_pool(async |c| {
                self.store.statement(
            "INSERT INTO notion_card_creates (data_source, task_id, projector) VALUES ($1, $2, $3) \
             ON CONFLICT (data_source, task_id) DO UPDATE \
                SET sent_at = now(), projector = EXCLUDED.projector",
        )
        .bind(&board.data_source)
        .bind(task.as_uuid())
        .bind(&self.options.name)
        .execute(c).await
            })
            .await?;
        Ok(())
    }

    async fn forget_create(&self, board: &Board, task: TaskId) -> Result<(), ProjectorError> {
        self.store
            .on_pool(async |c| {
                self.store
                    .statement(
                        "DELETE FROM notion_card_creates WHERE data_source = $1 AND task_id = $2",
                    )
                    .bind(&board.data_source)
                    .bind(task.as_uuid())
                    .execute(c)
                    .await
            })
            .await?;
        Ok(())
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

    /// Records the task's card on this board (and ends a pending create of it).
    async fn record_card(
        &self,
        board: &Board,
        task: TaskId,
        page: &PageId,
        created: bool,
    ) -> Result<(), ProjectorError> {
        self.store
            .on_pool(async |c| {
                self.store
                    .statement(
                        "WITH recorded AS ( \
                INSERT INTO notion_cards (projector, task_id, page_id, created, data_source) \
                VALUES ($1, $2, $3, $4, $5) \
                ON CONFLICT (projector, task_id) DO UPDATE \
                   SET page_id = EXCLUDED.page_id, data_source = EXCLUDED.data_source, \
                       recorded_at = now() \
                RETURNING 1) \
             DELETE FROM notion_card_creates WHERE data_source = $5 AND task_id = $2",
                    )
                    .bind(&self.options.name)
                    .bind(task.as_uuid())
                    .bind(page.as_str())
                    .bind(created)
                    .bind(&board.data_source)
                    .execute(c)
                    .await
            })
            .await?;
        Ok(())
    }

    /// Gives this projector's cards from before boards were recorded their board (a
    /// projector mirrors one board), so the board's other projectors find them.
    pub(super) async fn claim_unboarded_cards(&self) -> Result<(), ProjectorError> {
        let Some(board) = &self.board else {
            return Ok(());
        };
        self.store
            .on_pool(async |c| {
                self.store.statement(
            "UPDATE notion_cards SET data_source = $2 WHERE projector = $1 AND data_source IS NULL",
        )
        .bind(&self.options.name)
        .bind(&board.data_source)
        .execute(c).await
            })
            .await?;
        Ok(())
    }
}
