//! The run's appender, with group commit.
//!
//! Every append of a run goes through one [`Log`], fenced by the run's lease. Events handed
//! over while an append is in flight wait, and go out together in the next append: one
//! statement, one commit, in the order they were handed over. Nothing waits to fill a
//! batch — an append starts as soon as nothing is in flight — so a lone event costs what
//! it did alone, and a burst costs one commit per round trip instead of one per event.
//!
//! Whoever waits for an answer while no append is in flight writes the batch (there is no
//! background writer): a run's futures drive its own appends, so nothing outlives the run.
//!
//! Each batch goes to the orchestrator's [`Committer`], which puts the batches of its runs
//! (of different tasks) that wait at once into one statement and one commit.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Mutex, Notify, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::commit::Committer;

use crate::error::{Error, Result};
use crate::event::{Event, EventMetadata, NewEvent};
use crate::id::TaskId;
use crate::store::Lease;

/// The most hand-overs (an item's completion, say) not yet durable that a run lets its
/// items run ahead of (see [`Log::room`]): a bound on what a crash can lose, far above
/// what one round trip gathers from no-op items.
const MAX_UNRECORDED: usize = 64;

/// Database errors an append retries (with the same event ids, so a retry after a lost
/// acknowledgement writes nothing twice) before the run gives up on it.
const APPEND_RETRIES: u32 = 8;

/// The writer's state: the stream's version.
struct Writer {
    version: u32,
}

/// The answer to events handed over: the stream's version right after the last of them.
pub(super) type Answer = oneshot::Receiver<Result<u32>>;

/// A run's appends, serialised under its lease and grouped while one is in flight.
pub(super) struct Log {
    committer: Arc<Committer>,
    pub(super) lease: Lease,
    metadata: EventMetadata,
    queue: std::sync::Mutex<Queue>,
    /// Held by the one append in flight.
    writer: Mutex<Writer>,
    /// Hand-overs whose answer has not been given yet.
    unrecorded: AtomicUsize,
    /// An append is retrying after a database error.
    troubled: AtomicBool,
    /// Woken after every append, kept or failed.
    written: Notify,
    /// Where durable events are counted, with the task's channel.
    metrics: Option<(Arc<crate::metrics::Metrics>, String)>,
}

/// Events waiting for the next append, and who waits for them.
#[derive(Default)]
struct Queue {
    events: Vec<NewEvent>,
    /// Each waiter: how many of `events` precede its answer (its own last event's end),
    /// and where the answer goes.
    waiters: Vec<(usize, oneshot::Sender<Result<u32>>)>,
}

impl Log {
    pub(super) fn new(
        committer: Arc<Committer>,
        lease: &Lease,
        version: u32,
        metrics: Option<(Arc<crate::metrics::Metrics>, String)>,
    ) -> Self {
        committer.run_started();
        let metadata = EventMetadata {
            correlation_id: Some(lease.task.as_uuid()),
            worker_id: Some(lease.worker_id.clone()),
            attempt: Some(lease.attempt),
            ..EventMetadata::default()
        };
        Log {
            committer,
            lease: lease.clone(),
            metadata,
            queue: std::sync::Mutex::new(Queue::default()),
            writer: Mutex::new(Writer { version }),
            unrecorded: AtomicUsize::new(0),
            troubled: AtomicBool::new(false),
            written: Notify::new(),
            metrics,
        }
    }

    /// Counts events that are durable now, and the append's time.
    fn count(&self, events: &[NewEvent], took: Duration) {
        if let Some((metrics, channel)) = &self.metrics {
            metrics.appended(
                &self.lease.workflow,
                channel,
                events.iter().map(|e| &e.event),
                took,
            );
        }
    }

    /// Queues `event` for the next append, unanswered (it saves a round trip at step
    /// boundaries: the next append carries it).
    pub(super) fn stage(&self, event: Event) {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        queue.events.push(self.new_event(event));
    }

    /// Appends `events` (after anything handed over before them) under the lease, and
    /// returns the stream's version after them.
    pub(super) async fn append(&self, events: Vec<Event>) -> Result<u32> {
        let answer = self.hand_over(events);
        self.written_up_to(answer).await
    }

    /// Queues `events` for the next append without waiting for it: the answer comes once
    /// they are durable, as long as someone waits for it ([`Log::written_up_to`]).
    pub(super) fn hand_over(&self, events: Vec<Event>) -> Answer {
        let (tx, rx) = oneshot::channel();
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let events: Vec<NewEvent> = events.into_iter().map(|e| self.new_event(e)).collect();
        queue.events.extend(events);
        let end = queue.events.len();
        queue.waiters.push((end, tx));
        self.unrecorded.fetch_add(1, Ordering::Relaxed);
        rx
    }

    /// Waits for `answer`, writing the queued batch whenever no append is in flight.
    pub(super) async fn written_up_to(&self, mut answer: Answer) -> Result<u32> {
        loop {
            if let Some(result) = answered(&mut answer, self.lease.task) {
                return result;
            }
            let mut writer = self.writer.lock().await;
            // The append this one waited for may have carried these events.
            if let Some(result) = answered(&mut answer, self.lease.task) {
                return result;
            }
            let (events, waiters) = {
                let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                (
                    std::mem::take(&mut queue.events),
                    std::mem::take(&mut queue.waiters),
                )
            };
            let base = writer.version;
            let written = if events.is_empty() {
                Ok(base)
            } else {
                let span = append_span(&events, base);
                self.write(&mut writer, events.into())
                    .instrument(span)
                    .await
            };
            self.unrecorded.fetch_sub(waiters.len(), Ordering::Relaxed);
            for (end, waiter) in waiters {
                let answer = match &written {
                    Ok(_) => Ok(base + end as u32),
                    Err(err) => Err(shared(err, self.lease.task)),
                };
                // A waiter that has gone (its run is being torn down) needs no answer.
                let _ = waiter.send(answer);
            }
            drop(writer);
            self.written.notify_waiters();
        }
    }

    /// Waits until an item may start: fewer than [`MAX_UNRECORDED`] hand-overs wait for their
    /// append, and no append is retrying after a database error (a run whose log is in
    /// trouble runs nothing new it might not be able to record).
    pub(super) async fn room(&self) {
        loop {
            let written = self.written.notified();
            tokio::pin!(written);
            // Registered before the check, so a write in between still wakes this wait.
            written.as_mut().enable();
            if self.unrecorded.load(Ordering::Relaxed) < MAX_UNRECORDED
                && !self.troubled.load(Ordering::Relaxed)
            {
                return;
            }
            written.await;
        }
    }

    /// One append of `events` at the writer's version, retrying database errors with the
    /// same event ids; moves the version on success.
    async fn write(&self, writer: &mut Writer, events: Arc<[NewEvent]>) -> Result<u32> {
        let mut delay = Duration::from_millis(50);
        let mut retry = 0;
        let started = std::time::Instant::now();
        let written = loop {
            retry += 1;
            let appended = self
                .committer
                .commit(
                    self.lease.task,
                    writer.version,
                    self.lease.fence(),
                    events.clone(),
                )
                .await;
            match appended {
                Ok(appended) => {
                    writer.version = appended.version;
                    self.count(&events, started.elapsed());
                    break Ok(appended.version);
                }
                // A value the database refuses (class 22, data exception) is refused again.
                Err(Error::Database(err)) if retry <= APPEND_RETRIES && !refused_data(&err) => {
                    self.troubled.store(true, Ordering::Relaxed);
                    tracing::warn!(task = %self.lease.task, error = %err, "append failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(err) => break Err(err),
            }
        };
        self.troubled.store(false, Ordering::Relaxed);
        written
    }

    /// Appends `event` under the lease until it is stored: what the provider accepted (and
    /// charges for) must reach the log, or a later run would pay for the item again.
    ///
    /// Unlike [`Log::append`], database errors are retried without a bound (an outage of
    /// any length), with the same event id, so an append whose acknowledgement was lost is
    /// never written twice; and an operator's append in between (a cancel: no new claim,
    /// so the lease still fences) moves the run's version on instead of ending the run.
    /// Only a lost lease (another worker claimed the task), a refused value or `stop`
    /// ends the retries. Returns whether the stream moved under the run (someone else
    /// appended): the caller re-reads the task before going on.
    pub(super) async fn record(&self, event: Event, stop: &CancellationToken) -> Result<bool> {
        let new = self.new_event(event);
        let events: Arc<[NewEvent]> = Arc::from(vec![new]);
        let writer = self.writer.lock().await;
        let span = append_span(&events, writer.version);
        self.record_locked(writer, events, stop)
            .instrument(span)
            .await
    }

    async fn record_locked(
        &self,
        mut writer: tokio::sync::MutexGuard<'_, Writer>,
        events: Arc<[NewEvent]>,
        stop: &CancellationToken,
    ) -> Result<bool> {
        let mut moved = false;
        let mut delay = Duration::from_millis(50);
        let started = std::time::Instant::now();
        loop {
            let appended = self
                .committer
                .commit(
                    self.lease.task,
                    writer.version,
                    self.lease.fence(),
                    events.clone(),
                )
                .await;
            match appended {
                Ok(appended) => {
                    writer.version = appended.version;
                    self.count(&events, started.elapsed());
                    break;
                }
                Err(Error::Conflict { actual, .. }) => {
                    writer.version = actual;
                    moved = true;
                }
                // Stored by an earlier try whose answer was lost: find where the stream is.
                Err(Error::EventIdReused { .. }) => {
                    writer.version = self.committer.stream_version(self.lease.task).await?;
                    self.count(&events, started.elapsed());
                    break;
                }
                Err(Error::Database(err)) if refused_data(&err) => {
                    return Err(Error::Database(err));
                }
                Err(err @ (Error::Database(_) | Error::AppendFailed { .. })) => {
                    self.troubled.store(true, Ordering::Relaxed);
                    tracing::warn!(task = %self.lease.task, error = %err, ?delay, "cannot record a job the provider accepted; retrying until it is recorded");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = stop.cancelled() => {
                            self.troubled.store(false, Ordering::Relaxed);
                            return Err(err);
                        }
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(err) => {
                    self.troubled.store(false, Ordering::Relaxed);
                    return Err(err);
                }
            }
        }
        self.troubled.store(false, Ordering::Relaxed);
        drop(writer);
        self.written.notify_waiters();
        Ok(moved)
    }

    fn new_event(&self, event: Event) -> NewEvent {
        NewEvent::new(storable(event)).with_metadata(self.metadata.clone())
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        self.committer.run_ended();
    }
}

/// The span of one append: how many events, their types, and the version they follow.
fn append_span(events: &[NewEvent], version: u32) -> tracing::Span {
    let span = tracing::info_span!(
        "reel.append",
        reel.events = events.len(),
        reel.event_types = tracing::field::Empty,
        reel.after_version = version,
    );
    // Only when someone records it: the append is the hot path.
    if !span.is_disabled() {
        let mut types: Vec<&str> = events.iter().map(|e| e.event.event_type()).collect();
        types.dedup();
        span.record("reel.event_types", types.join(",").as_str());
    }
    span
}

/// Whether the database refused a value in the statement (SQLSTATE class 22), which no
/// retry changes.
fn refused_data(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .and_then(|db| db.code())
        .is_some_and(|code| code.starts_with("22"))
}

/// The event with the NUL characters of its messages replaced: a step's error text is
/// free-form (and `StepError`'s fields are public), but PostgreSQL stores no NUL, and a
/// failure must always be recordable.
fn storable(event: Event) -> Event {
    let clean = |text: String| {
        if text.contains('\0') {
            text.replace('\0', "\u{FFFD}")
        } else {
            text
        }
    };
    match event {
        Event::ItemFailed {
            step,
            item,
            attempt,
            kind,
            error,
            retry,
            unanswered,
            retry_after_ms,
        } => Event::ItemFailed {
            step,
            item,
            attempt,
            kind,
            error: clean(error),
            retry,
            unanswered,
            retry_after_ms,
        },
        Event::TaskFailed { reason, step, item } => Event::TaskFailed {
            reason: clean(reason),
            step,
            item,
        },
        Event::RetryScheduled {
            attempt,
            next_run_at,
            reason,
        } => Event::RetryScheduled {
            attempt,
            next_run_at,
            reason: clean(reason),
        },
        other => other,
    }
}

/// The answer, if it has come. A dropped sender means the run is being torn down.
fn answered(answer: &mut Answer, task: TaskId) -> Option<Result<u32>> {
    match answer.try_recv() {
        Ok(result) => Some(result),
        Err(oneshot::error::TryRecvError::Empty) => None,
        Err(oneshot::error::TryRecvError::Closed) => Some(Err(Error::AppendFailed {
            task,
            reason: "the run writing it stopped".into(),
        })),
    }
}

/// The failure of a batch, for each of its waiters: the typed errors as they are, the
/// database's (which cannot be copied) by its message.
fn shared(err: &Error, task: TaskId) -> Error {
    match err {
        Error::Conflict {
            stream,
            expected,
            actual,
        } => Error::Conflict {
            stream: *stream,
            expected: *expected,
            actual: *actual,
        },
        Error::LeaseLost { task, epoch } => Error::LeaseLost {
            task: *task,
            epoch: *epoch,
        },
        Error::TaskNotFound(task) => Error::TaskNotFound(*task),
        Error::EventIdReused { event_id } => Error::EventIdReused {
            event_id: *event_id,
        },
        Error::InvalidInput(reason) => Error::InvalidInput(reason.clone()),
        other => Error::AppendFailed {
            task,
            reason: crate::id::truncate_for_display(
                &other.to_string(),
                crate::workflow::ERROR_MESSAGE_MAX_CHARS,
            ),
        },
    }
}
