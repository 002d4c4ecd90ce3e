//! A task for every new card: with intake on, the leader polls the board for cards in the
//! intake status whose `Task ID` is empty and submits one task per card (the page id is its
//! idempotency key, and its task id is derived from the page id, so a card becomes exactly
//! one task across restarts and leader changes). The `Task ID` is written back by the
//! task's own status updates (see [`Job::card`](crate::queue::Job)), so it is owed as
//! durably as the status: a crash right after the submit loses nothing. A card that cannot
//! become a task is marked on the board (the rejected status and a reason).
//!
//! Each card is taken on its own: a card whose request or submit fails is logged and rests
//! (its own backoff) while the cards after it go on. Every request yields to status changes.
//! Only the holder of the board's intake lock (see `leadership`) takes cards in.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::time::Duration;

use engine::{ChannelId, NewTask, TaskId};
use serde_json::{Map, Value, json};
use tokio::time::Instant;
use uuid::Uuid;

use super::cards::card_task;
use super::leadership::Halt;
use super::{MAX_RETRY_AFTER, Projector, ProjectorError};
use crate::board::{Board, IntakeOptions, page_id_of, results};
use crate::notion::NotionError;
use crate::page_id::PageId;

/// How long a card intake has just marked (or given its Task ID back) is left alone while
/// it looks as it did then: the board's query may still show it as before the PATCH.
const ACTED_GRACE: Duration = Duration::from_secs(60);

/// A card whose handling failed rests for the intake interval, doubling per failure up to
/// this many intervals.
const MAX_REST_INTERVALS: u32 = 32;

/// Why one card was not handled (the next cards go on; this one is tried again later).
#[derive(Debug, thiserror::Error)]
enum CardError {
    #[error("Notion: {0}")]
    Notion(#[from] NotionError),
    #[error(transparent)]
    Projector(#[from] ProjectorError),
}

impl From<engine::Error> for CardError {
    fn from(error: engine::Error) -> CardError {
        CardError::Projector(error.into())
    }
}

impl From<sqlx::Error> for CardError {
    fn from(error: sqlx::Error) -> CardError {
        CardError::Projector(error.into())
    }
}

/// What happened to one card.
#[derive(Debug, PartialEq, Eq)]
enum Taken {
    /// A task was submitted for it (or had been, by an earlier pass).
    Submitted(TaskId),
    /// Its task existed; its Task ID was written back.
    Restored(TaskId),
    /// Marked rejected, with the reason.
    Rejected,
    /// Nothing to do now.
    Skipped,
}

/// What intake keeps in memory between passes. Losing it (a restart, a new leader) costs
/// at most a repeated request, never a task or a mark.
#[derive(Debug, Default)]
struct Memory {
    /// Cards just marked or given their Task ID back: the card's properties as seen then,
    /// and when.
    acted: HashMap<PageId, (u64, Instant)>,
    /// Cards whose handling failed: failures in a row, when to try again, and how long the
    /// rest was (the count is kept for as long again after it, so the next failure rests
    /// longer).
    resting: HashMap<PageId, (u32, Instant, Duration)>,
}

impl Memory {
    fn rests(&self, page: &PageId, now: Instant) -> bool {
        self.resting
            .get(page)
            .is_some_and(|(_, until, _)| *until > now)
    }

    fn rest(&mut self, page: &PageId, interval: Duration, now: Instant) -> Duration {
        let failures = self.resting.get(page).map_or(0, |(n, _, _)| *n) + 1;
        let wait = interval * 2u32.saturating_pow(failures - 1).min(MAX_REST_INTERVALS);
        self.resting
            .insert(page.clone(), (failures, now + wait, wait));
        wait
    }

    /// Whether intake acted on this card lately and it still looks the same.
    fn acted_lately(&self, page: &PageId, looks: u64, now: Instant) -> bool {
        self.acted
            .get(page)
            .is_some_and(|(seen, at)| *seen == looks && now.duration_since(*at) < ACTED_GRACE)
    }

    fn forget_old(&mut self, now: Instant) {
        self.acted
            .retain(|_, (_, at)| now.duration_since(*at) < ACTED_GRACE);
        // A card that failed again right after its rest must rest longer: its count goes
        // only once it has not failed for as long again (it was fixed, or left the intake
        // status).
        self.resting
            .retain(|_, (_, until, wait)| *until + *wait > now);
    }
}

impl Projector {
    /// Polls the board until `halt` (nothing without a board with intake).
    pub(super) async fn intake(&self, halt: &Halt) {
        let Some(board) = &self.board else { return };
        let Some(options) = &board.intake else { return };
        let mut memory = Memory::default();
        tracing::info!(data_source = %board.data_source, status = %options.status, every = ?options.interval, "taking in new cards");
        loop {
            // Only the holder of the board's intake lock takes cards in (one task and one
            // write per card).
            if !halt.takes_in() {
                tokio::select! {
                    _ = halt.cancelled() => return,
                    _ = tokio::time::sleep(options.interval) => {}
                }
                continue;
            }
            let pass = tokio::select! {
                _ = halt.cancelled() => return,
                pass = self.intake_pass(board, options, &mut memory) => pass,
            };
            match pass {
                Ok(0) => {}
                Ok(taken) => tracing::info!(cards = taken, "took in new cards"),
                Err(error) => {
                    tracing::warn!(error = %error, "cannot query the board: trying again at the next pass");
                }
            }
            memory.forget_old(Instant::now());
            tokio::select! {
                _ = halt.cancelled() => return,
                _ = tokio::time::sleep(options.interval) => {}
            }
        }
    }

    /// One query of the board (every page of it) and each of its new cards on its own; how
    /// many cards were handled. Only a failed query ends the pass.
    async fn intake_pass(
        &self,
        board: &Board,
        options: &IntakeOptions,
        memory: &mut Memory,
    ) -> Result<usize, NotionError> {
        let mut conditions = vec![board.task_id.filter(json!({"is_empty": true}))];
        if let Some(status) = &board.status {
            conditions.push(status.filter(json!({"equals": options.status})));
        }
        let mut cursor: Option<String> = None;
        let mut handled = 0;
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
                let Some(page) = page_id_of(card) else {
                    continue;
                };
                if memory.rests(&page, Instant::now()) {
                    continue;
                }
                match self.take_card(board, options, &page, card, memory).await {
                    Ok(Taken::Skipped) => {}
                    Ok(_) => {
                        memory.resting.remove(&page);
                        handled += 1;
                    }
                    // Not the card's fault: every request waits for the pause; the card
                    // goes again at the next pass.
                    Err(CardError::Notion(NotionError::RateLimited { .. })) => {}
                    Err(error) => {
                        let wait = memory.rest(&page, options.interval, Instant::now());
                        tracing::warn!(page_id = %page, error = %error, retry_in = ?wait, "cannot take in a card: the next cards go on, this one is tried again later");
                    }
                }
            }
            cursor = answer
                .get("next_cursor")
                .and_then(Value::as_str)
                .filter(|_| answer.get("has_more") == Some(&Value::Bool(true)))
                .map(str::to_owned);
            if cursor.is_none() {
                return Ok(handled);
            }
        }
    }

    /// Submits the card's task, gives an existing task's card its Task ID back, or marks
    /// the card rejected.
    async fn take_card(
        &self,
        board: &Board,
        options: &IntakeOptions,
        page: &PageId,
        card: &Value,
        memory: &mut Memory,
    ) -> Result<Taken, CardError> {
        if let Some(task) = self.owner_of_card(page).await? {
            return self.restore_task_id(board, page, card, task, memory).await;
        }
        let submitted = match task_of_card(board, options, page, card) {
            Ok(mut task) => {
                task.workflow_version = self.newest_version(&task.workflow).await?;
                self.store.create_task(task).await
            }
            Err(reason) => {
                return self
                    .reject(board, options, page, card, &reason, memory)
                    .await;
            }
        };
        match submitted {
            Ok(created) => {
                let task = created.task_id();
                tracing::info!(task_id = %task, page_id = %page, "a card became a task");
                Ok(Taken::Submitted(task))
            }
            // Made by an earlier pass that did not see the card as it is now (edited since).
            Err(engine::Error::IdempotencyKeyReused { existing, .. }) => {
                self.restore_task_id(board, page, card, existing, memory)
                    .await
            }
            Err(engine::Error::InvalidInput(reason)) => {
                self.reject(board, options, page, card, &reason, memory)
                    .await
            }
            Err(other) => Err(other.into()),
        }
    }

    /// The newest version of `workflow` its workers have recorded (`workflow_versions`), for
    /// the tasks intake makes: the projector has no registry, and a task of a version no
    /// worker serves would wait forever. `None` (version 1) before any worker recorded one.
    async fn newest_version(&self, workflow: &str) -> Result<Option<u32>, engine::Error> {
        let newest: Option<i32> = self
            .store
            .on_pool(async |c| {
                self.store
                    .scalar("SELECT max(version) FROM workflow_versions WHERE workflow = $1")
                    .bind(workflow)
                    .fetch_one(c)
                    .await
            })
            .await?;
        Ok(newest.and_then(|v| u32::try_from(v).ok()))
    }

    /// The task that owns the card `page` already, if any: the task intake made of it, the
    /// task the projector made it for (whatever its Task ID shows now), or a task submitted
    /// with the page as its Notion page (`reel submit --notion-page`, in any of its forms).
    async fn owner_of_card(&self, page: &PageId) -> Result<Option<TaskId>, engine::Error> {
        let owner: Option<Uuid> = self
            .store
            .on_pool(async |c| {
                self.store
                    .scalar(
                        "SELECT id FROM tasks WHERE id = $2 \
             UNION ALL SELECT task_id FROM notion_cards WHERE page_id = $1 \
             UNION ALL (SELECT id FROM tasks \
                         WHERE notion_page_id IS NOT NULL \
                           AND reel_notion_page_key(notion_page_id) = $3 \
                         ORDER BY created_at LIMIT 1) \
             LIMIT 1",
                    )
                    .bind(page.as_str())
                    .bind(card_task(page).as_uuid())
                    .bind(page.as_str().replace('-', ""))
                    .fetch_optional(c)
                    .await
            })
            .await?;
        Ok(owner.map(TaskId::from))
    }

    /// A card with an empty Task ID whose task exists. Until the task's status was first
    /// sent, that send owes the Task ID (nothing to do here). After it, the Task ID was
    /// cleared on the board: it is written back.
    async fn restore_task_id(
        &self,
        board: &Board,
        page: &PageId,
        card: &Value,
        task: TaskId,
        memory: &mut Memory,
    ) -> Result<Taken, CardError> {
        let sent: bool = self
            .store
            .on_pool(async |c| {
                self.store.scalar(
            "SELECT EXISTS (SELECT 1 FROM notion_sync WHERE projector = $1 AND task_id = $2)",
        )
        .bind(&self.options.name)
        .bind(task.as_uuid())
        .fetch_one(c).await
            })
            .await?;
        let looks = fingerprint(card);
        if !sent || memory.acted_lately(page, looks, Instant::now()) {
            return Ok(Taken::Skipped);
        }
        let body = json!({"properties": {
            board.task_id.name.clone(): board.task_id.value(&task.to_string()),
        }});
        self.limiter.acquire_yielding().await;
        self.answered(self.client.patch_page(page, body).await)?;
        memory.acted.insert(page.clone(), (looks, Instant::now()));
        tracing::info!(task_id = %task, page_id = %page, "the card's Task ID was empty: written back");
        Ok(Taken::Restored(task))
    }

    /// Marks the card rejected with `reason` (once: a card that still looks as it did when
    /// marked is left alone for a while, then marked again if it is still in the intake
    /// status). Remembered only once the mark landed.
    async fn reject(
        &self,
        board: &Board,
        options: &IntakeOptions,
        page: &PageId,
        card: &Value,
        reason: &str,
        memory: &mut Memory,
    ) -> Result<Taken, CardError> {
        let looks = fingerprint(card);
        if memory.acted_lately(page, looks, Instant::now()) {
            return Ok(Taken::Skipped);
        }
        let mut properties = Map::new();
        if let Some(status) = &board.status {
            properties.insert(status.name.clone(), status.value(&options.rejected_status));
        }
        if let Some(property) = &board.reason {
            properties.insert(property.name.clone(), property.value(reason));
        }
        self.limiter.acquire_yielding().await;
        self.answered(
            self.client
                .patch_page(page, json!({ "properties": properties }))
                .await,
        )?;
        memory.acted.insert(page.clone(), (looks, Instant::now()));
        tracing::warn!(page_id = %page, reason = %reason, "a card cannot become a task: marked on the board");
        Ok(Taken::Rejected)
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

/// The card's properties, hashed: whether it changed since intake last acted on it.
fn fingerprint(card: &Value) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    card.get("properties")
        .map(Value::to_string)
        .unwrap_or_default()
        .hash(&mut hasher);
    hasher.finish()
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
    let direction = board.direction.as_ref().and_then(|p| p.read(card));
    // PostgreSQL stores no NUL character in text or JSON: say so on the card.
    for (what, text) in [
        ("title", Some(&topic)),
        ("channel", Some(&channel)),
        ("story direction", direction.as_ref()),
    ] {
        if text.is_some_and(|t| t.contains('\0')) {
            return Err(format!(
                "the card's {what} holds a NUL character (U+0000), which cannot be stored: remove it"
            ));
        }
    }
    let channel = ChannelId::parse(&channel).map_err(|e| e.to_string())?;
    let mut input = json!({ "topic": topic });
    if let Some(direction) = direction {
        input["story_direction"] = json!(direction);
    }
    let mut task = NewTask::new(options.workflow.clone(), channel, input);
    task.id = card_task(page);
    task.notion_page_id = Some(page.to_string());
    task.idempotency_key = Some(page.to_string());
    Ok(task)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_card_rests_longer_each_time_up_to_a_cap() {
        let mut memory = Memory::default();
        let page = PageId::parse("598337872cf94fdf8782e53db20768a5").expect("page id");
        let now = Instant::now();
        let interval = Duration::from_secs(10);
        let waits: Vec<Duration> = (0..8).map(|_| memory.rest(&page, interval, now)).collect();
        assert_eq!(waits[0], interval);
        assert_eq!(waits[1], interval * 2);
        assert_eq!(waits[7], interval * MAX_REST_INTERVALS);
        assert!(memory.rests(&page, now));
        assert!(!memory.rests(&page, now + interval * MAX_REST_INTERVALS));
    }

    /// Review of issue 26: the pass after a rest forgot the failures, so a card that kept
    /// failing rested one interval each time and never backed off.
    #[test]
    fn a_card_failing_again_after_its_rest_rests_longer() {
        let mut memory = Memory::default();
        let page = PageId::parse("598337872cf94fdf8782e53db20768a5").expect("page id");
        let interval = Duration::from_secs(10);
        let mut now = Instant::now();
        let mut waits = Vec::new();
        for _ in 0..4 {
            let wait = memory.rest(&page, interval, now);
            waits.push(wait);
            // The passes go on while it rests; the first pass after its rest tries it.
            now += wait;
            memory.forget_old(now);
            now += interval / 2;
            memory.forget_old(now);
            assert!(!memory.rests(&page, now));
        }
        assert_eq!(waits, [1, 2, 4, 8].map(|n| interval * n));
        // Quiet for as long again as its last rest: forgotten.
        memory.forget_old(now + interval * 8);
        assert!(memory.resting.is_empty());
    }

    #[test]
    fn a_card_acted_on_is_left_alone_only_while_it_looks_the_same() {
        let mut memory = Memory::default();
        let page = PageId::parse("598337872cf94fdf8782e53db20768a5").expect("page id");
        let before = json!({"properties": {"Name": {"title": []}}});
        let fixed = json!({"properties": {"Name": {"title": [{"plain_text": "Whales"}]}}});
        let now = Instant::now();
        memory
            .acted
            .insert(page.clone(), (fingerprint(&before), now));
        assert!(memory.acted_lately(&page, fingerprint(&before), now));
        assert!(!memory.acted_lately(&page, fingerprint(&fixed), now));
        assert!(!memory.acted_lately(&page, fingerprint(&before), now + ACTED_GRACE));
    }
}
