//! An orchestrator's shared commits: the appends of its runs (of different tasks) that
//! wait while one is in flight go out together in the next one, one statement and one
//! commit, each stream still under its own expected version and lease (see
//! [`PgStore::append_many_in`]).
//!
//! As in a run's [`Log`](super::log::Log), nothing waits to fill a batch and there is no
//! background writer: whoever waits while nothing is in flight writes what is queued, so
//! a lone append costs what it did alone. While any of its runs is under way, the
//! committer holds one connection of the pool for its statements, if the pool has room to
//! spare ([`HOLD_SPARE`]); with no run left it gives it back (so a pool can close).
//!
//! A task row that another transaction keeps locked (a library user's own transaction,
//! say) holds up only its own run: the committer's statements wait at most [`LOCK_WAIT`]
//! for a row lock, and a task whose row stays locked is appended by its own run, alone,
//! while the others' appends go on. Such runs take turns on one connection at a time
//! (each waiting at most [`ALONE_LOCK_WAIT`] per turn), so however many rows are held,
//! they keep at most one connection of the pool besides the committer's.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use sqlx::Postgres;
use sqlx::pool::PoolConnection;
use tokio::sync::{Mutex, Semaphore, oneshot};

use crate::error::{Error, Result};
use crate::event::NewEvent;
use crate::id::TaskId;
use crate::store::{Appended, Bounded, Fence, PgStore, StreamAppend};

/// Connections of the pool that the committer leaves unheld: room for claims, heartbeats,
/// reads and provider slots, which check one out for a statement each. It keeps the
/// connection of its statement only if, with it, at most the pool's size less this many
/// are in use, so every committer on the pool (of any orchestrator or worker) leaves them
/// free.
pub const HOLD_SPARE: u32 = 4;

/// How long the committer's statements wait for a task row locked by another transaction
/// (a PostgreSQL interval). The engine's own statements hold a task row for one short
/// statement, so only a lock held elsewhere for longer makes an append give up and go
/// alone.
pub(crate) const LOCK_WAIT: &str = "100ms";

/// How long a run appending alone (its row was held past [`LOCK_WAIT`]) waits for its row
/// per turn before it lets the next such run try.
const ALONE_LOCK_WAIT: &str = "1s";

/// The pause before a run appending alone tries again, doubling up to a second.
const ALONE_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

/// The most streams one shared statement carries (the rest go in the next).
const MAX_STREAMS: usize = 64;

/// One stream's append, waiting for a statement.
struct Pending {
    stream: TaskId,
    expected: u32,
    fence: Fence,
    events: Arc<[NewEvent]>,
    answer: oneshot::Sender<Bounded>,
}

/// An orchestrator's appends, grouped while one is in flight.
#[derive(Debug)]
pub(super) struct Committer {
    store: PgStore,
    queue: std::sync::Mutex<Vec<Pending>>,
    /// Held by the one statement in flight, with the connection kept between them.
    writer: Mutex<Option<PoolConnection<Postgres>>>,
    /// Runs under way (see [`Committer::run_started`]).
    runs: AtomicUsize,
    /// The turn of the runs whose task row is held elsewhere (see [`Committer::alone`]).
    alone: Semaphore,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("stream", &self.stream)
            .field("expected", &self.expected)
            .field("events", &self.events.len())
            .finish_non_exhaustive()
    }
}

impl Committer {
    pub(super) fn new(store: PgStore) -> Self {
        Committer {
            store,
            queue: std::sync::Mutex::new(Vec::new()),
            writer: Mutex::new(None),
            runs: AtomicUsize::new(0),
            alone: Semaphore::new(1),
        }
    }

    /// A run starts using the committer: it may hold a connection until every run that
    /// started has ended ([`Committer::run_ended`]).
    pub(super) fn run_started(&self) {
        self.runs.fetch_add(1, Ordering::SeqCst);
    }

    /// A run is over; the last one gives the held connection back. A statement in flight
    /// meanwhile (a run's, which then is not the last) keeps it, and its run's end gives it
    /// back instead.
    pub(super) fn run_ended(&self) {
        if self.runs.fetch_sub(1, Ordering::SeqCst) == 1
            && let Ok(mut held) = self.writer.try_lock()
            && self.runs.load(Ordering::SeqCst) == 0
        {
            held.take();
        }
    }

    /// The stream's version as stored now.
    pub(super) async fn stream_version(&self, stream: TaskId) -> Result<u32> {
        self.store.stream_version(stream).await
    }

    /// Appends `events` to `stream` at `expected` under `fence`, with whatever other
    /// streams' appends are waiting when the statement goes out.
    ///
    /// If the run writing a batch that holds these events is dropped mid-statement, they
    /// are appended again with the same event ids, so a statement that did commit reads
    /// back as a replay and one that did not is written now.
    pub(super) async fn commit(
        &self,
        stream: TaskId,
        expected: u32,
        fence: Fence,
        events: Arc<[NewEvent]>,
    ) -> Result<Appended> {
        if !self.store.keeps_sessions() {
            // Behind a transaction pooler each append is a transaction of its own (see
            // `PgStore::append`): there is no session to hold, and a shared statement's
            // retries would run in one aborted transaction.
            return self.store.append(stream, expected, fence, &events).await;
        }
        let mut answer = self.enqueue(stream, expected, fence, events.clone());
        let result = loop {
            if let Some(result) = self.answered(&mut answer, stream, expected, fence, &events) {
                break result;
            }
            let mut held = self.writer.lock().await;
            // The statement this one waited for may have carried these events.
            if let Some(result) = self.answered(&mut answer, stream, expected, fence, &events) {
                break result;
            }
            // Ours is queued: statements answer before they let the writer go.
            let batch = self.take_batch();
            let answers = self.write(&mut held, &batch).await;
            for (pending, result) in batch.into_iter().zip(answers) {
                // A waiter that has gone (its run is being torn down) needs no answer.
                let _ = pending.answer.send(result);
            }
            drop(held);
        };
        match result {
            Bounded::Answered(result) => result,
            Bounded::Held => self.alone(stream, expected, fence, &events).await,
        }
    }

    /// Appends to a stream whose task row another transaction holds locked, outside the
    /// committer so the other runs' appends go on: one such run at a time waits for its
    /// row, at most [`ALONE_LOCK_WAIT`], then lets the next try, until its row is free.
    /// Each try is a transaction that commits only once its statement has answered.
    async fn alone(
        &self,
        stream: TaskId,
        expected: u32,
        fence: Fence,
        events: &[NewEvent],
    ) -> Result<Appended> {
        tracing::warn!(task = %stream, "task row locked by another transaction; the run waits for it");
        let mut pause = ALONE_PAUSE;
        loop {
            let attempt = {
                // The semaphore is never closed.
                let Ok(_turn) = self.alone.acquire().await else {
                    return Err(Error::Database(sqlx::Error::PoolClosed));
                };
                let mut conn = self.store.pool().acquire().await?;
                // In a transaction of its own: if the run is dropped while the statement
                // waits for the row, the statement's work is rolled back, not committed
                // once the row frees (after the run ended, its lease perhaps given up).
                let mut tx = sqlx::Connection::begin(&mut *conn).await?;
                let appended = self
                    .store
                    .append_within(
                        &mut tx,
                        stream,
                        expected,
                        fence,
                        events,
                        Some(ALONE_LOCK_WAIT),
                    )
                    .await;
                if appended.is_ok() {
                    tx.commit().await?;
                }
                appended
            };
            if !crate::store::waited_too_long(&attempt) {
                return attempt;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(std::time::Duration::from_secs(1));
        }
    }

    /// The answer, if it has come. If the run that took these events into its statement
    /// was dropped before answering, they are queued again (same event ids) for the next.
    fn answered(
        &self,
        answer: &mut oneshot::Receiver<Bounded>,
        stream: TaskId,
        expected: u32,
        fence: Fence,
        events: &Arc<[NewEvent]>,
    ) -> Option<Bounded> {
        match answer.try_recv() {
            Ok(result) => Some(result),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => {
                *answer = self.enqueue(stream, expected, fence, events.clone());
                None
            }
        }
    }

    fn enqueue(
        &self,
        stream: TaskId,
        expected: u32,
        fence: Fence,
        events: Arc<[NewEvent]>,
    ) -> oneshot::Receiver<Bounded> {
        let (tx, rx) = oneshot::channel();
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Pending {
                stream,
                expected,
                fence,
                events,
                answer: tx,
            });
        rx
    }

    /// The queued appends for the next statement, oldest first: at most one per stream
    /// (a later one for the same stream waits for the next statement, so it sees the
    /// version the earlier one leaves) and at most [`MAX_STREAMS`]. An append whose waiter
    /// has gone (its run was dropped while it queued) is dropped too: nothing of a run is
    /// written after it ended, when its lease may already be given up.
    fn take_batch(&self) -> Vec<Pending> {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let mut batch: Vec<Pending> = Vec::new();
        let mut rest = Vec::new();
        for pending in queue.drain(..) {
            if pending.answer.is_closed() {
                continue;
            }
            if batch.len() < MAX_STREAMS && batch.iter().all(|b| b.stream != pending.stream) {
                batch.push(pending);
            } else {
                rest.push(pending);
            }
        }
        *queue = rest;
        batch
    }

    /// One statement for `batch`, on the held connection or on one checked out for it
    /// (and kept if the pool has room to spare). A database error lets the connection go:
    /// it may be the broken part.
    async fn write(
        &self,
        held: &mut Option<PoolConnection<Postgres>>,
        batch: &[Pending],
    ) -> Vec<Bounded> {
        let appends: Vec<StreamAppend<'_>> = batch
            .iter()
            .map(|p| StreamAppend {
                stream: p.stream,
                expected_version: p.expected,
                fence: p.fence,
                events: &p.events,
            })
            .collect();
        let pool = self.store.pool();
        let mut conn = match held.take() {
            Some(conn) => conn,
            None => match pool.acquire().await {
                Ok(conn) => conn,
                Err(err) => {
                    return batch
                        .iter()
                        .map(|_| Bounded::Answered(Err(Error::Database(copy_pool_error(&err)))))
                        .collect();
                }
            },
        };
        let answers = self
            .store
            .append_many_within(&mut conn, &appends, Some(LOCK_WAIT))
            .await;
        let broken = answers
            .iter()
            .any(|a| matches!(a, Bounded::Answered(Err(Error::Database(_)))));
        let in_use = pool.size().saturating_sub(pool.num_idle() as u32);
        if !broken
            && self.runs.load(Ordering::SeqCst) > 0
            && in_use + HOLD_SPARE <= pool.options().get_max_connections()
        {
            *held = Some(conn);
        }
        answers
    }
}

/// The pool's failure to give a connection, for each waiter (a `sqlx::Error` cannot be
/// cloned): a database error, which the run's log retries.
fn copy_pool_error(err: &sqlx::Error) -> sqlx::Error {
    match err {
        sqlx::Error::PoolTimedOut => sqlx::Error::PoolTimedOut,
        sqlx::Error::PoolClosed => sqlx::Error::PoolClosed,
        other => sqlx::Error::Protocol(format!("no connection for the append: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::task::Poll;
    use std::time::Duration;

    use super::*;
    use crate::event::Event;
    use crate::store::NewTask;
    use crate::testing::TestDatabase;

    fn completion(item: u32) -> Arc<[NewEvent]> {
        Arc::from(vec![NewEvent::new(Event::ItemCompleted {
            step: "clips".into(),
            item,
            attempt: 1,
            artifact: format!("clip-{item}"),
            cost_micros: 0,
            duration_ms: 0,
            output: None,
        })])
    }

    async fn task(store: &PgStore) -> TaskId {
        let channel = crate::id::ChannelId::parse("c").expect("channel");
        store
            .create_task(NewTask::new("w", channel, serde_json::json!({})))
            .await
            .expect("task")
            .task_id()
    }

    /// Polls `future` once.
    fn poll_once<F: Future>(future: std::pin::Pin<&mut F>) -> Poll<F::Output> {
        let waker = futures_util::task::noop_waker();
        future.poll(&mut std::task::Context::from_waker(&waker))
    }

    /// The run writing a shared statement is dropped mid-statement: the other stream of
    /// that statement is still appended exactly once, and its waiter answered.
    #[tokio::test]
    async fn a_dropped_writer_leaves_the_others_in_its_statement_answered() {
        let db = TestDatabase::create().await;
        let store = db.store();
        let (a, b) = (task(&store).await, task(&store).await);
        let committer = Committer::new(store.clone());
        committer.run_started();

        // Both queue while the writer is busy, so one statement takes both.
        let busy = committer.writer.lock().await;
        // Boxed, so that dropping it drops the future (a `pin!` would only drop the borrow).
        let mut first = Box::pin(committer.commit(a, 1, Fence::Unleased, completion(1)));
        let mut second = pin!(committer.commit(b, 1, Fence::Unleased, completion(1)));
        assert!(poll_once(first.as_mut()).is_pending());
        assert!(poll_once(second.as_mut()).is_pending());
        drop(busy);
        // The first takes the writer and sends the statement for both; then it is dropped.
        for _ in 0..3 {
            if poll_once(first.as_mut()).is_ready() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(committer.queue.lock().expect("queue").is_empty(), "taken");
        drop(first);

        let appended = tokio::time::timeout(Duration::from_secs(10), second)
            .await
            .expect("answered")
            .expect("appended");
        assert_eq!(appended.version, 2);
        assert_eq!(store.stream_version(b).await.expect("b"), 2);
        let a_version = store.stream_version(a).await.expect("a");
        assert!(a_version == 1 || a_version == 2, "{a_version}");
        committer.run_ended();
    }

    /// A run dropped (aborted) while its append waits for the writer writes nothing after
    /// it ended, and its lease run again is not in the way of an orphan. (Found by review:
    /// the queued append was written by the next statement of any other run.)
    #[tokio::test]
    async fn a_dropped_waiter_writes_nothing_after_it_ended() {
        let db = TestDatabase::create().await;
        let store = db.store();
        let (a, b) = (task(&store).await, task(&store).await);
        let committer = Committer::new(store.clone());
        committer.run_started();

        let busy = committer.writer.lock().await;
        let mut aborted = Box::pin(committer.commit(a, 1, Fence::Unleased, completion(1)));
        assert!(poll_once(aborted.as_mut()).is_pending());
        drop(aborted);
        drop(busy);
        let other = committer.commit(b, 1, Fence::Unleased, completion(1));
        assert_eq!(other.await.expect("b").version, 2);
        assert_eq!(store.stream_version(a).await.expect("a"), 1, "nothing of A");
        // Run again at the same version, A is written as if nothing had queued before.
        let again = committer.commit(a, 1, Fence::Unleased, completion(1));
        assert_eq!(again.await.expect("a again").version, 2);
        committer.run_ended();
    }
}
