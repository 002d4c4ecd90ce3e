//! The log format: event types and payloads (a public contract — see DESIGN.md).
//!
//! Names are snake_case and never renamed. A breaking payload change means a new
//! `schema_version` and an upcaster in [`upcast`], the one place old versions are read.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::id::{ChannelId, TaskId};
use crate::status::TaskStatus;

/// The newest schema version this build reads and writes. Version 2 has the payloads of
/// version 1; it marks the events a build without workflow versions must not act on (a
/// `task_submitted` for a version above 1, a `task_upgraded`): such a build cannot read
/// them, so it sets the task aside instead of running it on code it was not written for.
/// Every other event is still written as version 1, which every build reads.
pub const CURRENT_SCHEMA_VERSION: i16 = 2;

/// The schema version of events every build reads.
pub const FIRST_SCHEMA_VERSION: i16 = 1;

/// The `until` of a park that only a signal ends (a wait without a deadline): far
/// beyond any real deadline, so the task is never due by time alone.
pub fn no_deadline() -> DateTime<Utc> {
    DateTime::from_timestamp(253_402_214_400, 0).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// How a failure should be treated: retried with backoff, or final.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// Timeouts, 429, 5xx: retried with exponential backoff, then rescheduled.
    Transient,
    /// Bad input, 4xx: the task fails with the reason.
    Permanent,
}

/// One fact about a task. The variant is stored as `event_type`, its fields as `payload`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "payload", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    /// The task exists: its workflow, channel and input. Always version 1 of a stream.
    TaskSubmitted {
        workflow: String,
        channel_id: ChannelId,
        input: Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        notion_page_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        idempotency_key: Option<String>,
        /// The version of the workflow the task was submitted for. Absent: version 1 (every
        /// task recorded before workflows had versions, and tasks submitted without one).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        workflow_version: Option<u32>,
    },
    /// A worker took the task: the lease epoch that fences its appends and the task attempt.
    TaskClaimed {
        worker_id: String,
        lease_epoch: i64,
        attempt: u32,
    },
    /// A step began (or began again) with `items` planned (1 for an atomic step).
    StepStarted {
        step: String,
        attempt: u32,
        items: u32,
        #[serde(default)]
        atomic: bool,
    },
    /// One item is done: what it produced, what it cost, how long it took.
    ItemCompleted {
        step: String,
        /// 1-based, as users count ("clip 7").
        item: u32,
        attempt: u32,
        artifact: String,
        cost_micros: i64,
        duration_ms: u64,
        /// The step's result, which later steps read (absent in logs recorded before
        /// outputs existed, and for items that return none). A recorded `null` stays a
        /// value: it reads back as `Some(Null)`, as the step returned it.
        #[serde(
            default,
            skip_serializing_if = "Option::is_none",
            deserialize_with = "present"
        )]
        output: Option<Value>,
    },
    /// A provider accepted a job for one item (a two-phase item): `job` holds what any
    /// later run needs to poll it. Until the item's completion (or an `item_failed` that
    /// closes the job) the item has an open submission, and runs poll it, never submit it
    /// again.
    ItemSubmitted {
        step: String,
        item: u32,
        attempt: u32,
        /// 1 for the item's first submission, +1 for each new one (a lost or failed job,
        /// a redo after review): part of the idempotency key sent to the provider.
        #[serde(default = "one")]
        submission: u32,
        job: Value,
    },
    /// One try of an item failed; `kind` says whether it will be retried. For a two-phase
    /// item this closes its open submission (the job failed, was lost, or its submit was
    /// refused).
    ItemFailed {
        step: String,
        item: u32,
        attempt: u32,
        kind: FailureKind,
        error: String,
        /// The in-process try number within this attempt (1 = first try).
        #[serde(default = "one")]
        retry: u32,
        /// A submit that got no answer (a timeout, a dropped connection, a gateway
        /// error): the provider may have accepted the job and charge for it. Such a
        /// failure closes nothing (no submission was recorded) and counts as a possible
        /// payment in `reel stats` and the audit. Absent (false) for any other failure.
        #[serde(default, skip_serializing_if = "is_false")]
        unanswered: bool,
        /// The provider refused for now and said when to come back (a 429's
        /// `Retry-After`, in milliseconds): the key was paused, and the refusal used none
        /// of the item's tries. Absent for any other failure.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
    /// Every planned item of the step has a completion.
    StepCompleted { step: String, attempt: u32 },
    /// The task moved from one status to another (storage names), and the name `to` is
    /// shown as (absent in logs recorded before workflows declared their statuses: see
    /// [`TaskStatus::default_display`]).
    StatusChanged {
        from: TaskStatus,
        to: TaskStatus,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to_display: Option<String>,
    },
    /// The attempt gave up for now; a worker may resume the task by replay at `next_run_at`.
    RetryScheduled {
        attempt: u32,
        next_run_at: DateTime<Utc>,
        reason: String,
    },
    /// The task cannot succeed: a permanent error or the attempt limit.
    TaskFailed {
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        step: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        item: Option<u32>,
    },
    /// Every step is done; a human has to look.
    ReviewRequested {},
    /// The human accepted the result.
    ReviewApproved {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reviewer: Option<String>,
    },
    /// The human sent the task back: `redo_from` and every later step run again.
    ReviewRejected {
        redo_from: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// The task is done for good.
    TaskCompleted {},
    /// An operator stopped the task; it takes effect at the next item boundary.
    TaskCancelled {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// Every item in flight waits on a provider job (or on a provider's capacity): the
    /// lease is released until `until`, the status and the attempt stay as they are, and
    /// the next claim resumes the same attempt.
    TaskParked {
        until: DateTime<Utc>,
        /// Open jobs being waited on.
        jobs: u32,
        /// Items waiting for room at a provider (its cap, its rate, or its Retry-After).
        #[serde(default)]
        waiting: u32,
        /// When each open job is polled next, and how its polls went so far: the next
        /// claim follows this schedule instead of polling every job at once (absent in
        /// logs recorded before it existed, and when no job is open).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        schedule: Vec<PollSchedule>,
    },
    /// The task moved to a newer version of its workflow (see `Workflow::accepts`): the
    /// steps it has history in carry over under their names in version `to` (`renamed`:
    /// their completed items, outputs and open jobs move to the new name), steps of `to`
    /// it never ran are `added` (they run), and steps `to` no longer has are `removed`
    /// (their events stay in the log and their outputs readable). Written with schema
    /// version 2 (see [`CURRENT_SCHEMA_VERSION`]).
    TaskUpgraded {
        from: u32,
        to: u32,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        renamed: Vec<StepRenamed>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        added: Vec<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        removed: Vec<String>,
        /// The steps of version `to`, in order: what "this step and every later one" means
        /// from here on (a review's `redo_from`), whatever order the task first ran them in.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        steps: Vec<String>,
        /// Who moved it: a worker's id, or `operator` (`reel upgrade`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
    },
    /// An item waits durably: for a signal (`signal`), for a time (`until`: a sleep
    /// called `sleep`), or both (a signal with a deadline). Recorded once per wait (a run
    /// that finds the item still waiting records nothing new); the task then parks, holding
    /// no worker slot, until the signal arrives or the time comes. A sleep's `until` is
    /// fixed here, by the database's clock: a later run wakes at the same time.
    WaitStarted {
        step: String,
        item: u32,
        attempt: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sleep: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        until: Option<DateTime<Utc>>,
    },
    /// A signal reached the task (`reel signal`, or the library's
    /// [`PgStore::send_signal`](crate::PgStore::send_signal)): its name, the id that
    /// makes sending it again change nothing, the data it carries, who sent it and when.
    /// A worker records it when it next runs the task, before any item reads it.
    SignalReceived {
        name: String,
        signal_id: String,
        #[serde(default)]
        data: Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
        sent_at: DateTime<Utc>,
        /// Its place among the task's signals in the order they were sent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seq: Option<u32>,
    },
}

/// A step that an upgrade renamed (see [`Event::TaskUpgraded`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRenamed {
    pub from: String,
    pub to: String,
}

/// One open job's poll schedule, carried across a park (see [`Event::TaskParked`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PollSchedule {
    pub step: String,
    pub item: u32,
    /// The submission polled (a schedule of an older submission is ignored).
    pub submission: u32,
    /// When it is due, by the database's clock.
    pub next_poll_at: DateTime<Utc>,
    /// Polls that answered "pending" so far: where the poll backoff stands.
    #[serde(default)]
    pub polls: u32,
    /// Polls that failed in a row (the request, not the job).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub failed_polls: u32,
    /// How long the job's polls have been failing, in milliseconds: the time between
    /// consecutive failed polls, each gap counted at most up to the step's longest poll
    /// wait (a pause in which nobody polled is not evidence). The job counts as lost once
    /// this reaches the step's job timeout, after at least three failed polls.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub failing_for_ms: u64,
    /// When the last failed poll was made (absent when the last poll answered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failed_at: Option<DateTime<Utc>>,
    /// The job's age, in milliseconds, at the last poll that answered "pending": it ends
    /// after that (what the step learns how long its jobs take from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_age_ms: Option<u64>,
}

fn is_zero_u64(value: &u64) -> bool {
    *value == 0
}

fn is_false(value: &bool) -> bool {
    !*value
}

fn is_zero(value: &u32) -> bool {
    *value == 0
}

fn one() -> u32 {
    1
}

/// A field that is there, whatever its value (`null` included); `default` covers absence.
fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(deserializer).map(Some)
}

impl Event {
    /// A `status_changed` to a lifecycle status (shown as its default name).
    pub fn status_changed(from: TaskStatus, to: TaskStatus) -> Event {
        Event::StatusChanged {
            from,
            to,
            to_display: Some(to.default_display().into_owned()),
        }
    }

    /// The name a `status_changed` event's new status is shown as: the recorded one, or the
    /// default for logs recorded before display names were (`None` for other events).
    pub fn display_of_new_status(&self) -> Option<std::borrow::Cow<'_, str>> {
        match self {
            Event::StatusChanged {
                to_display: Some(name),
                ..
            } => Some(std::borrow::Cow::Borrowed(name.as_str())),
            Event::StatusChanged { to, .. } => Some(to.default_display()),
            _ => None,
        }
    }

    /// Every event type name, as stored in `events.event_type`.
    pub const TYPES: [&'static str; 19] = [
        "task_submitted",
        "task_claimed",
        "step_started",
        "item_submitted",
        "item_completed",
        "item_failed",
        "step_completed",
        "status_changed",
        "retry_scheduled",
        "task_failed",
        "review_requested",
        "review_approved",
        "review_rejected",
        "task_completed",
        "task_cancelled",
        "task_parked",
        "task_upgraded",
        "wait_started",
        "signal_received",
    ];

    /// The stored `event_type` of this event.
    pub fn event_type(&self) -> &'static str {
        match self {
            Event::TaskSubmitted { .. } => "task_submitted",
            Event::TaskClaimed { .. } => "task_claimed",
            Event::StepStarted { .. } => "step_started",
            Event::ItemSubmitted { .. } => "item_submitted",
            Event::ItemCompleted { .. } => "item_completed",
            Event::ItemFailed { .. } => "item_failed",
            Event::StepCompleted { .. } => "step_completed",
            Event::StatusChanged { .. } => "status_changed",
            Event::RetryScheduled { .. } => "retry_scheduled",
            Event::TaskFailed { .. } => "task_failed",
            Event::ReviewRequested { .. } => "review_requested",
            Event::ReviewApproved { .. } => "review_approved",
            Event::ReviewRejected { .. } => "review_rejected",
            Event::TaskCompleted { .. } => "task_completed",
            Event::TaskCancelled { .. } => "task_cancelled",
            Event::TaskParked { .. } => "task_parked",
            Event::TaskUpgraded { .. } => "task_upgraded",
            Event::WaitStarted { .. } => "wait_started",
            Event::SignalReceived { .. } => "signal_received",
        }
    }

    /// The schema version the event is written with: 2 for the events a build without
    /// workflow versions must not act on (see [`CURRENT_SCHEMA_VERSION`]), 1 otherwise.
    pub fn schema_version(&self) -> i16 {
        match self {
            Event::TaskSubmitted {
                workflow_version: Some(version),
                ..
            } if *version > 1 => CURRENT_SCHEMA_VERSION,
            Event::TaskUpgraded { .. } => CURRENT_SCHEMA_VERSION,
            _ => FIRST_SCHEMA_VERSION,
        }
    }

    /// Whether appending this event should wake followers at once (`pg_notify`): status,
    /// scheduling and review changes do. Per-item progress does not — NOTIFY costs about
    /// as much as the append itself at commit, and followers pick such events up on their
    /// next poll or the next wake-up (a reader always reads everything committed so far).
    pub fn wakes_followers(&self) -> bool {
        !matches!(
            self,
            Event::TaskClaimed { .. }
                | Event::StepStarted { .. }
                | Event::ItemSubmitted { .. }
                | Event::TaskParked { .. }
                | Event::ItemCompleted { .. }
                | Event::ItemFailed { .. }
                | Event::StepCompleted { .. }
        )
    }

    /// Splits the event into its stored `(event_type, payload)`.
    pub fn encode(&self) -> Result<(&'static str, Value)> {
        let mut tagged = serde_json::to_value(self)?;
        let payload = tagged
            .get_mut("payload")
            .map(Value::take)
            .unwrap_or_else(|| Value::Object(Default::default()));
        Ok((self.event_type(), payload))
    }

    /// Reads a stored event of the current schema version (see [`upcast`] for older ones).
    fn decode_current(event_type: &str, payload: Value) -> Result<Event, String> {
        if !Event::TYPES.contains(&event_type) {
            return Err(format!("unknown event type {event_type:?}"));
        }
        let tagged = serde_json::json!({ "type": event_type, "payload": payload });
        serde_json::from_value(tagged).map_err(|e| format!("invalid payload: {e}"))
    }

    /// Reads a stored event of the current schema version straight from its JSON text.
    /// With the tag written first, serde reads the payload without buffering it, and no
    /// intermediate `Value` is built: the replay hot path.
    fn decode_current_text(event_type: &str, payload: &str) -> Result<Event, String> {
        if !Event::TYPES.contains(&event_type) {
            return Err(format!("unknown event type {event_type:?}"));
        }
        // `event_type` is one of TYPES (plain snake_case): safe to splice into JSON.
        let tagged = format!(r#"{{"type":"{event_type}","payload":{payload}}}"#);
        serde_json::from_str(&tagged).map_err(|e| format!("invalid payload: {e}"))
    }
}

/// Brings a stored payload of any known schema version to the current one. The single
/// place where old versions are understood; an unknown version is an error, never a guess.
pub fn upcast(event_type: &str, schema_version: i16, payload: Value) -> Result<Value, String> {
    match schema_version {
        FIRST_SCHEMA_VERSION | CURRENT_SCHEMA_VERSION => Ok(payload),
        other => Err(format!(
            "unknown schema version {other} for {event_type:?} (this build reads up to {CURRENT_SCHEMA_VERSION})"
        )),
    }
}

/// Who caused an event and in which context; stored as `events.metadata`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMetadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// The W3C `traceparent` of the span that submitted the task (on `task_submitted`
    /// only): every later span of the task joins its trace (see [`crate::telemetry`]).
    /// Read leniently: a value that is not a string (another writer's) reads as none, as
    /// an unknown key would, and never makes the event unreadable.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "string_or_none"
    )]
    pub traceparent: Option<String>,
    /// Who asked for an operator's command (approve, reject, retry, cancel), when the
    /// tool that sent it knows: the console records its signed-in name. Read leniently.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "string_or_none"
    )]
    pub actor: Option<String>,
    /// The W3C `tracestate` that came with `traceparent` (read as leniently).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "string_or_none"
    )]
    pub tracestate: Option<String>,
}

/// A string, or `None` for any other JSON value.
fn string_or_none<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<Option<String>, D::Error> {
    Ok(match Value::deserialize(deserializer)? {
        Value::String(text) => Some(text),
        _ => None,
    })
}

/// An event to append. The `event_id` makes the append idempotent: appending the same id
/// at the same stream position again is a success that writes nothing.
#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent {
    pub event_id: Uuid,
    pub event: Event,
    pub metadata: EventMetadata,
}

impl NewEvent {
    /// An event with a fresh random id and empty metadata.
    pub fn new(event: Event) -> Self {
        NewEvent {
            event_id: Uuid::new_v4(),
            event,
            metadata: EventMetadata::default(),
        }
    }

    /// Uses a caller-chosen id (deterministic ids make retried appends idempotent).
    pub fn with_id(mut self, event_id: Uuid) -> Self {
        self.event_id = event_id;
        self
    }

    /// Attaches metadata.
    pub fn with_metadata(mut self, metadata: EventMetadata) -> Self {
        self.metadata = metadata;
        self
    }
}

/// An event as stored in the log, decoded and upcast to the current schema.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordedEvent {
    pub global_position: i64,
    /// The writing transaction's id (`xid8`): with `global_position`, the global-order key.
    pub tx_id: u64,
    pub stream_id: TaskId,
    /// 1-based position in the task's stream.
    pub version: u32,
    pub event_id: Uuid,
    /// The schema version the event was written with (before upcasting).
    pub schema_version: i16,
    pub event: Event,
    pub metadata: EventMetadata,
    pub recorded_at: DateTime<Utc>,
}

impl RecordedEvent {
    /// An event as if it had been read at `version` of `stream`: the global position and
    /// transaction id equal the version, the time is the Unix epoch. For building histories
    /// in memory — tests of a workflow's fold, benches, tools.
    pub fn in_memory(stream: TaskId, version: u32, event: Event) -> Self {
        RecordedEvent {
            global_position: i64::from(version),
            tx_id: u64::from(version),
            stream_id: stream,
            version,
            event_id: Uuid::new_v4(),
            schema_version: event.schema_version(),
            event,
            metadata: EventMetadata::default(),
            recorded_at: DateTime::UNIX_EPOCH,
        }
    }

    /// `events` as a stream of `stream`, versions 1, 2, 3, … (see [`RecordedEvent::in_memory`]).
    pub fn in_memory_stream(stream: TaskId, events: impl IntoIterator<Item = Event>) -> Vec<Self> {
        (1..)
            .zip(events)
            .map(|(version, event)| Self::in_memory(stream, version, event))
            .collect()
    }
}

/// A row of `events` before decoding (`payload` and `metadata` as JSON text).
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct EventRow {
    pub(crate) global_position: i64,
    pub(crate) tx_id: i64,
    pub(crate) stream_id: Uuid,
    pub(crate) stream_version: i32,
    pub(crate) event_id: Uuid,
    pub(crate) event_type: String,
    pub(crate) schema_version: i16,
    pub(crate) payload: String,
    pub(crate) metadata: String,
    pub(crate) recorded_at: DateTime<Utc>,
}

impl EventRow {
    /// Decodes the row; an unknown type, version or payload is a typed `Decode` error that
    /// names the event's position.
    pub(crate) fn decode(self) -> Result<RecordedEvent> {
        let version = u32::try_from(self.stream_version).unwrap_or(0);
        let fail = |reason: String| Error::Decode {
            position: self.global_position,
            stream: TaskId::from(self.stream_id),
            version,
            event_type: crate::id::truncate_for_display(&self.event_type, 64),
            schema_version: self.schema_version,
            reason,
        };
        // Versions 1 and 2 share their payloads: both take the fast path.
        let event = if matches!(
            self.schema_version,
            FIRST_SCHEMA_VERSION | CURRENT_SCHEMA_VERSION
        ) {
            Event::decode_current_text(&self.event_type, &self.payload).map_err(&fail)?
        } else {
            let stored: Value = serde_json::from_str(&self.payload)
                .map_err(|e| fail(format!("invalid payload: {e}")))?;
            let payload = upcast(&self.event_type, self.schema_version, stored).map_err(&fail)?;
            Event::decode_current(&self.event_type, payload).map_err(&fail)?
        };
        let metadata = serde_json::from_str(&self.metadata)
            .map_err(|e| fail(format!("invalid metadata: {e}")))?;
        Ok(RecordedEvent {
            global_position: self.global_position,
            tx_id: u64::try_from(self.tx_id).unwrap_or(0),
            stream_id: TaskId::from(self.stream_id),
            version,
            event_id: self.event_id,
            schema_version: self.schema_version,
            event,
            metadata,
            recorded_at: self.recorded_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_context_of_another_type_reads_as_none_and_the_rest_as_written() {
        for stored in [
            r#"{"traceparent": {"v": 1}, "attempt": 3}"#,
            r#"{"traceparent": null, "tracestate": 5, "attempt": 3}"#,
            r#"{"traceparent": ["00"], "tracestate": true, "attempt": 3}"#,
        ] {
            let metadata: EventMetadata = serde_json::from_str(stored).expect(stored);
            assert_eq!(metadata.traceparent, None, "{stored}");
            assert_eq!(metadata.tracestate, None, "{stored}");
            assert_eq!(metadata.attempt, Some(3), "{stored}");
        }
        let metadata: EventMetadata =
            serde_json::from_str(r#"{"traceparent": "00-x", "tracestate": "a=b"}"#).expect("ok");
        assert_eq!(metadata.traceparent.as_deref(), Some("00-x"));
        assert_eq!(metadata.tracestate.as_deref(), Some("a=b"));
        assert_eq!(
            serde_json::to_string(&EventMetadata::default()).expect("encode"),
            "{}"
        );
    }

    fn samples() -> Vec<Event> {
        vec![
            Event::TaskSubmitted {
                workflow: "video".into(),
                channel_id: ChannelId::parse("history").expect("valid"),
                input: serde_json::json!({"topic": "Rome"}),
                notion_page_id: None,
                idempotency_key: None,
                workflow_version: Some(2),
            },
            Event::ItemCompleted {
                step: "video".into(),
                item: 7,
                attempt: 2,
                artifact: "video/07.mp4".into(),
                cost_micros: 550_000,
                duration_ms: 300_000,
                output: None,
            },
            Event::StatusChanged {
                from: TaskStatus::parse("generating_video").expect("valid"),
                to: TaskStatus::parse("generating_audio").expect("valid"),
                to_display: Some("Generating Audio".into()),
            },
            Event::ItemCompleted {
                step: "sections".into(),
                item: 2,
                attempt: 1,
                artifact: String::new(),
                cost_micros: 0,
                duration_ms: 5,
                output: Some(serde_json::json!({"words": 120})),
            },
            Event::ReviewRequested {},
            Event::WaitStarted {
                step: "storyboard".into(),
                item: 1,
                attempt: 1,
                signal: Some("storyboard_approved".into()),
                sleep: None,
                until: None,
            },
            Event::SignalReceived {
                name: "storyboard_approved".into(),
                signal_id: "s-1".into(),
                data: serde_json::json!({"approved": true}),
                by: Some("alice".into()),
                sent_at: DateTime::parse_from_rfc3339("2026-12-07T10:00:00Z")
                    .expect("time")
                    .with_timezone(&Utc),
                seq: Some(1),
            },
        ]
    }

    #[test]
    fn encode_then_decode_is_identity_for_every_sample() {
        for event in samples() {
            let (event_type, payload) = event.encode().expect("encode");
            assert_eq!(event_type, event.event_type());
            assert!(
                payload.is_object(),
                "{event_type} payload must be an object"
            );
            let text = payload.to_string();
            assert_eq!(
                Event::decode_current(event_type, payload),
                Ok(event.clone())
            );
            assert_eq!(Event::decode_current_text(event_type, &text), Ok(event));
        }
    }

    #[test]
    fn item_completed_payload_uses_the_documented_field_names() {
        let (_, payload) = samples()[1].encode().expect("encode");
        let mut keys: Vec<_> = payload
            .as_object()
            .expect("object")
            .keys()
            .cloned()
            .collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "artifact",
                "attempt",
                "cost_micros",
                "duration_ms",
                "item",
                "step"
            ]
        );
    }

    #[test]
    fn events_recorded_before_outputs_and_display_names_still_decode() {
        let old = r#"{"step":"video","item":7,"attempt":2,"artifact":"a","cost_micros":1,"duration_ms":2}"#;
        let event = Event::decode_current_text("item_completed", old).expect("decodes");
        assert!(matches!(event, Event::ItemCompleted { output: None, .. }));
        let old = r#"{"from":"generating_video","to":"generating_sfx"}"#;
        let event = Event::decode_current_text("status_changed", old).expect("decodes");
        assert_eq!(
            event.display_of_new_status().as_deref(),
            Some("Generating SFX")
        );
        let (_, payload) = event.encode().expect("encode");
        assert_eq!(payload.to_string(), old, "re-encoding adds no field");
    }

    #[test]
    fn a_null_output_reads_back_as_a_value() {
        let stored = r#"{"step":"a","item":1,"attempt":1,"artifact":"","cost_micros":0,"duration_ms":1,"output":null}"#;
        let event = Event::decode_current_text("item_completed", stored).expect("decodes");
        assert!(
            matches!(
                event,
                Event::ItemCompleted {
                    output: Some(Value::Null),
                    ..
                }
            ),
            "{event:?}"
        );
        let (_, payload) = event.encode().expect("encode");
        let stored: Value = serde_json::from_str(stored).expect("json");
        assert_eq!(payload, stored, "written back with its null");
    }

    #[test]
    fn event_type_names_cover_every_variant() {
        for event in samples() {
            assert!(Event::TYPES.contains(&event.event_type()));
        }
    }

    #[test]
    fn unknown_types_and_versions_are_errors() {
        assert!(Event::decode_current("task_exploded", serde_json::json!({})).is_err());
        assert!(upcast("task_submitted", 99, serde_json::json!({})).is_err());
        assert!(upcast("task_submitted", 0, serde_json::json!({})).is_err());
    }

    #[test]
    fn what_an_older_build_must_not_act_on_is_written_as_schema_version_2() {
        let submitted = |version| Event::TaskSubmitted {
            workflow: "video".into(),
            channel_id: ChannelId::parse("history").expect("valid"),
            input: Value::Null,
            notion_page_id: None,
            idempotency_key: None,
            workflow_version: version,
        };
        assert_eq!(submitted(None).schema_version(), FIRST_SCHEMA_VERSION);
        assert_eq!(submitted(Some(1)).schema_version(), FIRST_SCHEMA_VERSION);
        assert_eq!(submitted(Some(2)).schema_version(), CURRENT_SCHEMA_VERSION);
        let upgraded = Event::TaskUpgraded {
            from: 1,
            to: 2,
            renamed: vec![StepRenamed {
                from: "clips".into(),
                to: "video".into(),
            }],
            added: vec!["captions".into()],
            removed: Vec::new(),
            steps: vec!["video".into(), "captions".into()],
            by: Some("operator".into()),
        };
        assert_eq!(upgraded.schema_version(), CURRENT_SCHEMA_VERSION);
        assert_eq!(
            Event::TaskCompleted {}.schema_version(),
            FIRST_SCHEMA_VERSION
        );
        let (event_type, payload) = upgraded.encode().expect("encode");
        assert_eq!(event_type, "task_upgraded");
        assert_eq!(
            payload,
            serde_json::json!({"from": 1, "to": 2, "renamed": [{"from": "clips", "to": "video"}],
                               "added": ["captions"], "steps": ["video", "captions"],
                               "by": "operator"})
        );
        // Both schema versions read the same payloads; a third is refused.
        for version in [FIRST_SCHEMA_VERSION, CURRENT_SCHEMA_VERSION] {
            assert_eq!(
                upcast(event_type, version, payload.clone()),
                Ok(payload.clone())
            );
        }
        assert!(upcast(event_type, 3, payload.clone()).is_err());
        assert_eq!(
            Event::decode_current(event_type, payload).expect("decode"),
            upgraded
        );
    }
}
