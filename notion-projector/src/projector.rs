//! The projector: follow the log, coalesce each task to its latest status, PATCH Notion
//! outside any transaction, then record what was handled and move the checkpoint by
//! compare-and-set.
//!
//! A request that fails transiently leaves its batch: its retry is recorded in
//! `sync_retries` and waits in the [`SendQueue`] for its due time, not in a request slot,
//! so one failing page never holds back the rest of the board. A batch's checkpoint moves
//! once each of its jobs had its first try; a crash or a new leader resumes the recorded
//! retries.
//!
//! Delivery is at-least-once: a crash between a PATCH and the checkpoint commit re-reads
//! the events, and the repeated PATCH sets the same absolute value. `notion_sync` is
//! written right after each successful PATCH, so a redelivered batch skips what already
//! reached Notion. A page's statuses never go backwards: one task has at most one request
//! in flight, and each request sends the task's newest status, read right before it.

mod cards;
mod intake;
mod leadership;
mod records;
mod send;

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use engine::SubscriptionOptions;
use engine::{Backoff, TaskId, TaskStatus};
use engine::{Checkpoint, Event, LogPage, PgStore, RecordedEvent, Subscription};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::board::{Board, BoardError, BoardOptions};
use crate::limiter::Limiter;
use crate::metrics::Metrics;
use crate::notion::{NotionClient, NotionError, PropertyType};
use crate::queue::{Job, Origin, SendQueue};

use leadership::{Halt, Locks, SideLock};
use send::{Attempt, Outcome};

/// The longest `Retry-After` honoured as given (Notion's workspace limit may ask for more
/// than a minute; a larger value is taken as a broken header).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(15 * 60);

/// The event types that set a task's status: `task_submitted` (queued) and `status_changed`.
pub const STATUS_EVENT_TYPES: [&str; 2] = ["task_submitted", "status_changed"];

/// How the projector runs. [`ProjectorOptions::default`] matches the binary's defaults.
#[derive(Clone, Debug)]
pub struct ProjectorOptions {
    /// The checkpoint's and the leader lock's name: instances with the same name share one
    /// checkpoint and only one of them leads.
    pub name: String,
    /// The Notion property that shows the status.
    pub status_property: String,
    pub property_type: PropertyType,
    /// Requests per second to Notion, on average.
    pub rate: f64,
    /// Requests allowed at once.
    pub burst: u32,
    /// The longest wait between reads when no notification arrives.
    pub poll_interval: Duration,
    /// Events read per batch.
    pub batch_size: u32,
    /// Tries after the first for 5xx, timeouts and unreachable Notion.
    pub max_retries: u32,
    /// The first retry's delay; it doubles each time (with jitter of ×0.5–1.5).
    pub retry_base: Duration,
    /// The longest retry delay after a 5xx or a timeout.
    pub retry_max: Duration,
    /// How often failures whose retries ran out are tried again.
    pub failure_retry_interval: Duration,
    /// How often a standby tries to become the leader.
    pub standby_interval: Duration,
    /// Requests in flight at once (the limiter still spaces them).
    pub concurrency: usize,
    /// How long Notion's query may lag a card's creation: after a create whose answer was
    /// lost, the task's card is only looked for this long before it is made again.
    pub card_query_lag: Duration,
    /// How long after a request with no clear answer (a timeout, a cut connection, a
    /// 502/504) Notion may still apply it (Notion gives up after 60 s): a newer status sent
    /// meanwhile is sent once more after this.
    pub late_write_window: Duration,
}

impl Default for ProjectorOptions {
    fn default() -> Self {
        ProjectorOptions {
            name: "notion".into(),
            status_property: "Status".into(),
            property_type: PropertyType::Status,
            rate: 3.0,
            burst: 1,
            poll_interval: Duration::from_millis(500),
            batch_size: 500,
            max_retries: 3,
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            failure_retry_interval: Duration::from_secs(30),
            standby_interval: Duration::from_secs(1),
            concurrency: 3,
            card_query_lag: Duration::from_secs(60),
            late_write_window: Duration::from_secs(65),
        }
    }
}

/// Why the projector stepped back (it retries by itself; `run` returns only on shutdown).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProjectorError {
    #[error(transparent)]
    Engine(#[from] engine::Error),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The leader lock's connection broke: another instance may lead now.
    #[error("lost the leader lock: {0}")]
    LeadershipLost(String),
    /// Another instance moved the checkpoint: this one is a zombie and must not write.
    #[error("checkpoint of {projector} moved by another instance (expected {expected:?})")]
    CheckpointMoved {
        projector: String,
        expected: Checkpoint,
    },
    /// The log holds transaction ids this cluster has not assigned yet: it was restored
    /// from a logical dump into another cluster. Following it would skip new events.
    #[error(
        "the log holds transaction id {highest_stored}, but this cluster's next transaction id \
         is {next_assigned}: the database was restored from a dump into another cluster, and \
         new events would sort below the restored ones and never be mirrored. Stop every reel \
         process and PostgreSQL, run `pg_resetwal -e {epoch} <data directory>` as the server's \
         owner to move the cluster's transaction ids past the restored ones, then start again \
         (notion-projector/README.md, \"Restoring from a dump\")"
    )]
    RestoredLog {
        highest_stored: u64,
        next_assigned: u64,
        /// The smallest xid epoch that puts new transaction ids above the restored ones.
        epoch: u64,
    },
}

/// Batches open at once at most. A request that hangs until its timeout holds the
/// checkpoint; reading goes on, and once this many batches wait, each new read joins the
/// youngest one, so memory stays bounded while the other tasks' statuses keep flowing.
const MAX_OPEN_BATCHES: usize = 64;

/// Waits after stepping back (database outage, lost lock, moved checkpoint): 100 ms
/// doubling to 10 s.
const STEP_BACK: Backoff =
    Backoff::exponential(Duration::from_millis(100), Duration::from_secs(10));

/// The status a task should show, and the event that set it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) task: TaskId,
    pub(crate) version: u32,
    pub(crate) status: TaskStatus,
    /// The name Notion shows: the event's `to_display` (its default for older events).
    pub(crate) display: Arc<str>,
    pub(crate) position: i64,
}

/// The log events read together, whose checkpoint moves once each of their jobs had its
/// first try (and every earlier batch's checkpoint moved).
#[derive(Debug)]
struct Batch {
    id: u64,
    end: Checkpoint,
    /// Fresh jobs without a first outcome yet.
    outstanding: usize,
    /// Failures found while reading it (undecodable events, invalid page ids).
    failures: Vec<Failure>,
}

impl Batch {
    /// Takes in a later read of the same id (see [`MAX_OPEN_BATCHES`]).
    fn join(&mut self, later: Batch) {
        debug_assert_eq!(self.id, later.id);
        self.end = later.end;
        self.outstanding += later.outstanding;
        self.failures.extend(later.failures);
    }
}

/// What a leader holds between two turns of its loop.
struct Leading<'a> {
    checkpoint: Checkpoint,
    /// The subscription, while no read holds it.
    subscription: Option<Subscription>,
    /// The read in progress, kept across turns of the loop: a read dropped half-way would
    /// start over at every answer and every turn.
    reading: Option<Reading>,
    queue: SendQueue,
    /// Batches whose checkpoints wait for their jobs' first tries, oldest first. Reading
    /// goes on meanwhile (past [`MAX_OPEN_BATCHES`], reads join the youngest): one slow
    /// request holds back the checkpoint, never the other tasks' statuses.
    batches: VecDeque<Batch>,
    /// The id of the next batch read.
    next_batch: u64,
    in_flight: FuturesUnordered<Sending<'a>>,
    /// The wait for the limiter's next request, started when a job is ready.
    turn: Option<Turn<'a>>,
    /// Requests in flight at once.
    slots: usize,
    /// Halted: no new read and no new request; requests in flight finish.
    stopping: bool,
}

impl Leading<'_> {
    fn may_send(&self) -> bool {
        !self.stopping && self.in_flight.len() < self.slots
    }

    /// When a waiting retry comes due, while nothing else would wake the loop for it.
    fn next_due(&self) -> Option<Instant> {
        self.queue
            .next_due()
            .filter(|_| self.turn.is_none() && self.may_send())
    }

    fn stop(&mut self) {
        self.stopping = true;
        self.turn = None;
        self.reading = None;
    }
}

/// A wait for the limiter's next request.
type Turn<'a> = Pin<Box<dyn Future<Output = Instant> + Send + 'a>>;

/// One try of one job.
type Sending<'a> = Pin<Box<dyn Future<Output = Result<Attempt, ProjectorError>> + Send + 'a>>;

/// A read of the log's next page, which gives the subscription back with the page.
type Reading = Pin<Box<dyn Future<Output = (Subscription, engine::Result<LogPage>)> + Send>>;

/// A row for `sync_failures`.
#[derive(Clone, Debug)]
struct Failure {
    position: i64,
    task: TaskId,
    http_status: Option<u16>,
    error: String,
    retryable: bool,
}

/// The sidecar. Build one with [`Projector::new`], then [`Projector::run`] it.
#[derive(Debug)]
pub struct Projector {
    store: PgStore,
    client: NotionClient,
    limiter: Limiter,
    options: ProjectorOptions,
    metrics: Arc<Metrics>,
    /// The team's board, when cards are created for tasks (and, with intake, read back).
    board: Option<Board>,
}

impl Projector {
    pub fn new(
        store: PgStore,
        client: NotionClient,
        options: ProjectorOptions,
        metrics: Arc<Metrics>,
    ) -> Projector {
        // Notion's limit is the token's: its budget is shared, in PostgreSQL, with every
        // projector that uses the token.
        let limiter =
            Limiter::new(options.rate, options.burst).shared(store.clone(), client.budget_key());
        Projector {
            limiter,
            store,
            client,
            options,
            metrics,
            board: None,
        }
    }

    /// Uses the board: reads its schema now (through the projector's limiter), then
    /// creates the card of every task without a page and, with intake, a task for every
    /// new card. Fails naming a required property the board lacks.
    pub async fn open_board(&mut self, options: &BoardOptions) -> Result<&Board, BoardError> {
        let board = Board::open(
            &self.client,
            &self.limiter,
            options,
            &self.options.status_property,
        )
        .await?;
        Ok(self.board.insert(board))
    }

    /// [`Projector::open_board`], waiting out Notion being down, slow or rate limiting
    /// (each wait logged: 1 s doubling to 30 s, or the `Retry-After`), so that a restarting
    /// instance does not crash-loop on an outage. `None` when `shutdown` came first; a board
    /// Notion refuses (4xx) or that lacks a required property is an error at once.
    pub async fn open_board_patiently(
        &mut self,
        options: &BoardOptions,
        shutdown: &CancellationToken,
    ) -> Result<Option<&Board>, BoardError> {
        let backoff =
            Backoff::exponential(Duration::from_secs(1), Duration::from_secs(30)).with_jitter(0.2);
        let mut outages = 0;
        loop {
            let opened = tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                opened = Board::open(&self.client, &self.limiter, options, &self.options.status_property) => opened,
            };
            let error = match opened {
                Ok(board) => return Ok(Some(self.board.insert(board))),
                Err(error) if error.is_transient() => error,
                Err(error) => return Err(error),
            };
            let wait = match &error {
                BoardError::Notion(NotionError::RateLimited { retry_after, .. }) => retry_after
                    .unwrap_or(Duration::from_secs(1))
                    .min(MAX_RETRY_AFTER),
                _ => {
                    outages += 1;
                    backoff.random_delay(outages)
                }
            };
            tracing::warn!(error = %error, retry_in = ?wait, "cannot open the board yet: trying again");
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Leads (or waits as a standby) until `shutdown`; steps back and retries after
    /// database outages, a lost leader lock or a moved checkpoint.
    pub async fn run(&self, shutdown: CancellationToken) {
        let mut outages = 0;
        while !shutdown.is_cancelled() {
            let started = Instant::now();
            match self.standby_then_lead(&shutdown).await {
                Ok(()) => {}
                Err(err) => {
                    self.metrics.leader.set(0);
                    if matches!(err, ProjectorError::Database(_) | ProjectorError::Engine(_)) {
                        self.metrics.set_healthy(false);
                    }
                    // A leadership that lasted a while starts the backoff over.
                    outages = if started.elapsed() > Duration::from_secs(30) {
                        1
                    } else {
                        outages + 1
                    };
                    let backoff = STEP_BACK.delay(outages, 0.5);
                    tracing::warn!(error = %err, retry_in = ?backoff, "projector stepped back");
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(backoff) => {}
                    }
                }
            }
        }
        tracing::info!("projector stopped");
    }

    async fn standby_then_lead(&self, shutdown: &CancellationToken) -> Result<(), ProjectorError> {
        let mut locks = Locks::open(&self.store).await?;
        let mut announced = false;
        loop {
            let acquired = locks.try_lock(&self.lock_name()).await?;
            self.metrics.set_healthy(true);
            if acquired {
                break;
            }
            if !announced {
                tracing::info!(projector = %self.options.name, "another instance leads: waiting as standby");
                announced = true;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(self.options.standby_interval) => {}
            }
        }
        tracing::info!(projector = %self.options.name, "leading");
        self.metrics.leader.set(1);
        let holder = locks.holder().await?;
        // With a board: its card owner is whichever projector's leader holds its lock.
        let board_lock = self.board.as_ref().map(leadership::board_lock_name);
        let owns_board = match &board_lock {
            Some(name) => locks.try_lock(name).await?,
            None => false,
        };
        if board_lock.is_some() && !owns_board {
            tracing::info!(
                "another projector owns the board's cards: this one mirrors its statuses to the cards that one makes"
            );
        }
        // With intake on: whichever such projector's leader holds the board's intake lock
        // takes its new cards in.
        let intake_lock = self
            .board
            .as_ref()
            .filter(|board| board.intake.is_some())
            .map(leadership::intake_lock_name);
        let takes_in = match &intake_lock {
            Some(name) => locks.try_lock(name).await?,
            None => false,
        };
        if intake_lock.is_some() && !takes_in {
            tracing::info!(
                "another projector takes the board's new cards in: this one stands by for it"
            );
        }
        // The locks live as long as they are kept: a watchdog keeps them, and halts this
        // leader as soon as they are lost (another instance may take them then).
        let halt = Halt {
            stop: shutdown.child_token(),
            lock_lost: CancellationToken::new(),
            holder,
            owns_board: Arc::new(AtomicBool::new(owns_board)),
            takes_in: Arc::new(AtomicBool::new(takes_in)),
        };
        let side_locks = board_lock
            .map(|name| SideLock {
                name,
                held: halt.owns_board.clone(),
                taken_over: "owning the board's cards (the board's former owner stopped)",
            })
            .into_iter()
            .chain(intake_lock.map(|name| SideLock {
                name,
                held: halt.takes_in.clone(),
                taken_over: "taking the board's new cards in (the former intake stopped)",
            }))
            .collect();
        let done = CancellationToken::new();
        let watchdog = tokio::spawn(leadership::watch_lock(
            locks,
            halt.clone(),
            done.clone(),
            side_locks,
        ));
        // Intake runs beside the leader and stops with it (it shares the limiter, yielding
        // to status changes).
        let intake_halt = halt.child();
        let (result, ()) = tokio::join!(
            async {
                let result = self.lead(&halt).await;
                intake_halt.stop.cancel();
                result
            },
            self.intake(&intake_halt)
        );
        done.cancel();
        self.metrics.leader.set(0);
        if let Ok(Some(locks)) = watchdog.await {
            locks.release().await;
        }
        match result {
            Ok(()) if !shutdown.is_cancelled() => Err(ProjectorError::LeadershipLost(
                "the lock connection failed".into(),
            )),
            other => other,
        }
    }

    fn lock_name(&self) -> String {
        format!("reel/notion-projector/{}", self.options.name)
    }

    /// Follows the log until `halt`: reads batches, queues their jobs, and moves the
    /// checkpoint past a batch once each of its jobs (and of every earlier batch) had its
    /// first try (a job waiting for a retry is in `sync_retries` by then); reading goes on
    /// while a batch waits, and due retries go out beside fresh changes.
    async fn lead(&self, halt: &Halt) -> Result<(), ProjectorError> {
        let mut leading = self.start_leading().await?;
        let mut failure_pass = tokio::time::interval(self.options.failure_retry_interval);
        failure_pass.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.prepare_turn(&mut leading).await?;
            if leading.stopping && leading.in_flight.is_empty() {
                // Halted: a batch whose jobs did not all have their try is redelivered.
                return Ok(());
            }
            let next_due = leading.next_due();
            tokio::select! {
                biased;
                _ = halt.cancelled(), if !leading.stopping => leading.stop(),
                Some(attempt) = leading.in_flight.next() => {
                    self.settle(attempt?, &mut leading.queue, &mut leading.batches);
                }
                turn = wait_for_turn(&mut leading.turn), if leading.turn.is_some() => {
                    leading.turn = None;
                    // The job that asked for the turn may be gone (a newer status replaced
                    // it): the turn then goes unused, which only slows down.
                    if let Some(job) = leading.queue.pop_ready(Instant::now()) {
                        leading.in_flight.push(Box::pin(self.attempt(job, halt, turn)));
                    }
                }
                _ = tokio::time::sleep_until(next_due.unwrap_or_else(Instant::now)), if next_due.is_some() => {}
                _ = failure_pass.tick(), if !leading.stopping => {
                    self.enqueue_failures(&mut leading.queue).await?;
                }
                (following, page) = wait_for_page(&mut leading.reading), if leading.reading.is_some() => {
                    leading.reading = None;
                    leading.subscription = Some(following);
                    let page = page?;
                    self.metrics.set_healthy(true);
                    if let Some(end) = page.end {
                        // At the cap, the read joins the youngest open batch: its checkpoint
                        // then waits for both, which only widens what a crash reads again.
                        let joined = leading
                            .batches
                            .back()
                            .map(|youngest| youngest.id)
                            .filter(|_| leading.batches.len() >= MAX_OPEN_BATCHES);
                        let id = joined.unwrap_or_else(|| {
                            leading.next_batch += 1;
                            leading.next_batch - 1
                        });
                        let batch = self
                            .read_batch(id, page.events, end, &mut leading.queue, halt.owns_board())
                            .await?;
                        match leading.batches.back_mut().filter(|_| joined.is_some()) {
                            Some(youngest) => youngest.join(batch),
                            None => leading.batches.push_back(batch),
                        }
                    }
                }
            }
        }
    }

    /// A new leader's state: its checkpoint, a subscription from there, and the pending
    /// retries of earlier leaders in its queue.
    async fn start_leading(&self) -> Result<Leading<'_>, ProjectorError> {
        let checkpoint = self.store.load_checkpoint(&self.options.name).await?;
        tracing::info!(
            tx_id = checkpoint.tx_id,
            position = checkpoint.position,
            "reading the log after the checkpoint"
        );
        let options = SubscriptionOptions {
            poll_interval: self.options.poll_interval,
            batch_size: self.options.batch_size,
        };
        let subscription = Subscription::start(self.store.clone(), checkpoint, options).await;
        self.claim_unboarded_cards().await?;
        let mut queue = SendQueue::default();
        self.load_retries(&mut queue).await?;
        Ok(Leading {
            checkpoint,
            subscription: Some(subscription),
            reading: None,
            queue,
            batches: VecDeque::new(),
            next_batch: 0,
            in_flight: FuturesUnordered::new(),
            turn: None,
            slots: self.options.concurrency.max(1),
            stopping: false,
        })
    }

    /// Between two turns of the loop: commits the oldest batches whose jobs all had their
    /// first try (in one transaction), asks the limiter for a turn when a job is ready and a
    /// slot is free, and starts the next read.
    async fn prepare_turn<'a>(&'a self, leading: &mut Leading<'a>) -> Result<(), ProjectorError> {
        let mut end = None;
        let mut failures = Vec::new();
        while let Some(done) = leading.batches.pop_front_if(|b| b.outstanding == 0) {
            end = Some(done.end);
            failures.extend(done.failures);
        }
        if let Some(end) = end {
            self.commit(Some((leading.checkpoint, end)), &failures)
                .await?;
            leading.checkpoint = end;
        }
        let waiting = leading.queue.waiting_retries();
        self.metrics
            .pending_retries
            .set(i64::try_from(waiting).unwrap_or(i64::MAX));
        if leading.turn.is_none() && leading.may_send() && leading.queue.has_ready(Instant::now()) {
            leading.turn = Some(Box::pin(self.limiter.acquire()));
        }
        if !leading.stopping
            && let Some(mut following) = leading.subscription.take()
        {
            leading.reading = Some(Box::pin(async move {
                let page = following.next_page(Some(&STATUS_EVENT_TYPES)).await;
                (following, page)
            }));
        }
        Ok(())
    }

    /// Coalesces a page of events to each task's latest status and queues what needs a
    /// request; the batch's checkpoint waits for those requests' first tries (a task whose
    /// fresh job from an earlier batch still waits joins that job instead).
    async fn read_batch(
        &self,
        id: u64,
        events: Vec<engine::Result<RecordedEvent>>,
        end: Checkpoint,
        queue: &mut SendQueue,
        owns_board: bool,
    ) -> Result<Batch, ProjectorError> {
        let mut failures = Vec::new();
        let mut latest: HashMap<TaskId, Target> = HashMap::new();
        for event in events {
            match event {
                Ok(event) => {
                    self.metrics.events.inc();
                    if let Some(target) = target_of(&event) {
                        match latest.entry(target.task) {
                            Entry::Occupied(mut newest) => {
                                if target.version > newest.get().version {
                                    newest.insert(target);
                                }
                            }
                            Entry::Vacant(slot) => {
                                slot.insert(target);
                            }
                        }
                    }
                }
                Err(engine::Error::Decode {
                    position,
                    stream,
                    reason,
                    ..
                }) => {
                    tracing::error!(task_id = %stream, position, %reason, "cannot decode a status event: recorded as a sync failure");
                    failures.push(Failure {
                        position,
                        task: stream,
                        http_status: None,
                        error: format!("cannot decode event: {reason}"),
                        retryable: false,
                    });
                }
                Err(other) => return Err(other.into()),
            }
        }
        // Oldest change first: under the rate limit, tasks are served in log order.
        let mut targets: Vec<Target> = latest.into_values().collect();
        targets.sort_by_key(|t| t.position);
        let (jobs, _settled) = self.plan(targets, &mut failures).await?;
        let mut outstanding = 0;
        for job in jobs {
            if job.page.is_none() && !owns_board {
                // The board's owner makes the card: wait for it as a retry (it needs no
                // request until then), so the batch does not wait.
                self.wait_for_card(job, queue).await?;
                continue;
            }
            let job = Job {
                batch: Some(id),
                ..job
            };
            if queue.push_fresh(job) {
                outstanding += 1;
            }
        }
        Ok(Batch {
            id,
            end,
            outstanding,
            failures,
        })
    }

    /// Takes an answered request back into the queue: a retry waits for its due time, a
    /// rate-limited request goes again (not a try), and a fresh job's first outcome counts
    /// towards its batch.
    fn settle(&self, attempt: Attempt, queue: &mut SendQueue, batches: &mut VecDeque<Batch>) {
        let Attempt { mut job, outcome } = attempt;
        let task = job.task();
        queue.finish(task);
        let mut settled = Vec::new();
        if !matches!(outcome, Outcome::RateLimited | Outcome::Interrupted) {
            settled.extend(job.batch.take());
        }
        match outcome {
            Outcome::Synced | Outcome::SyncedUnsettled(_) => {
                if let Some(covered) = queue.drop_fresh_covered(task, job.target.version) {
                    self.metrics.skip("up_to_date", 1);
                    settled.extend(covered.batch);
                }
                if let Outcome::SyncedUnsettled(due) = outcome {
                    job.origin = Origin::Retry;
                    queue.push_retry(job, due);
                }
            }
            Outcome::RateLimited => match job.origin {
                Origin::Fresh => queue.push_fresh_front(job),
                Origin::Retry => {
                    queue.push_retry(job, Instant::now());
                }
            },
            Outcome::RetryAt(due) => {
                job.origin = Origin::Retry;
                queue.push_retry(job, due);
            }
            Outcome::Failed => {}
            // Halted before its answer: a fresh job's batch is redelivered, a retry stays
            // in `sync_retries` for the next leader.
            Outcome::Interrupted => {}
        }
        for id in settled {
            if let Some(batch) = batches.iter_mut().find(|b| b.id == id) {
                batch.outstanding = batch.outstanding.saturating_sub(1);
            }
        }
    }

    /// Refuses to follow a log restored from a dump into another cluster (see
    /// [`ProjectorError::RestoredLog`]); the binary checks this before it starts.
    pub async fn preflight(&self) -> Result<(), ProjectorError> {
        let horizon = self.store.tx_id_horizon().await?;
        if horizon.is_ahead() {
            return Err(ProjectorError::RestoredLog {
                highest_stored: horizon.highest_stored,
                next_assigned: horizon.next_assigned,
                epoch: (horizon.highest_stored >> 32) + 1,
            });
        }
        Ok(())
    }
}

/// Puts the checkpoint of projector `name` at the log's head, so that everything in the log
/// now counts as mirrored and only later changes are sent. With `only_if_new`, a projector
/// that already has a checkpoint keeps it (the binary's `--from-now`); otherwise the
/// checkpoint is moved (for demos and benchmarks that share a database). Use while no
/// instance of `name` runs: a running leader's compare-and-set then fails and it re-reads.
pub async fn checkpoint_at_head(
    store: &PgStore,
    name: &str,
    only_if_new: bool,
) -> Result<(), ProjectorError> {
    store.checkpoint_at_head(name, only_if_new).await?;
    Ok(())
}

/// The status an event sets, if it sets one.
fn target_of(event: &RecordedEvent) -> Option<Target> {
    let (status, display) = match &event.event {
        Event::TaskSubmitted { .. } => (TaskStatus::QUEUED, TaskStatus::QUEUED.default_display()),
        Event::StatusChanged { to, .. } => (*to, event.event.display_of_new_status()?),
        _ => return None,
    };
    Some(Target {
        task: event.stream_id,
        version: event.version,
        status,
        display: Arc::from(display),
        position: event.global_position,
    })
}

/// Waits for the read in progress (forever when there is none).
async fn wait_for_page(reading: &mut Option<Reading>) -> (Subscription, engine::Result<LogPage>) {
    match reading {
        Some(reading) => reading.as_mut().await,
        None => std::future::pending().await,
    }
}

/// Waits for the limiter's turn in progress (forever when there is none); the turn's time.
async fn wait_for_turn(turn: &mut Option<Turn<'_>>) -> Instant {
    match turn {
        Some(turn) => turn.as_mut().await,
        None => std::future::pending().await,
    }
}
