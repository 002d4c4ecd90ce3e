//! A task's history as a timeline: one row per event, with the attempt it belongs to.
//! What `reel replay` prints; typed so other tools get the same shape as JSON.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::event::{Event, RecordedEvent};

/// One event of a task's history, flattened for display.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TimelineEntry {
    pub version: u32,
    pub recorded_at: DateTime<Utc>,
    /// The task attempt the event belongs to (0 before the first claim).
    pub attempt: u32,
    pub event: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_micros: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A short human description (status change, claim, review, schedule).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The timeline of `events` (in version order).
pub fn timeline(events: &[RecordedEvent]) -> Vec<TimelineEntry> {
    let mut attempt = 0;
    events
        .iter()
        .map(|recorded| {
            if let Event::TaskClaimed {
                attempt: claimed, ..
            } = recorded.event
            {
                attempt = claimed;
            }
            entry(recorded, attempt)
        })
        .collect()
}

fn entry(recorded: &RecordedEvent, attempt: u32) -> TimelineEntry {
    let mut row = TimelineEntry {
        version: recorded.version,
        recorded_at: recorded.recorded_at,
        attempt,
        event: recorded.event.event_type(),
        step: None,
        item: None,
        duration_ms: None,
        cost_micros: None,
        error: None,
        detail: None,
    };
    match &recorded.event {
        Event::TaskSubmitted {
            workflow,
            channel_id,
            ..
        } => {
            row.detail = Some(format!("workflow {workflow}, channel {channel_id}"));
        }
        Event::TaskClaimed {
            worker_id,
            lease_epoch,
            ..
        } => {
            row.detail = Some(format!("by {worker_id} (epoch {lease_epoch})"));
        }
        Event::StepStarted {
            step,
            items,
            atomic,
            ..
        } => {
            row.step = Some(step.clone());
            row.detail = Some(if *atomic {
                "atomic".to_owned()
            } else {
                format!("{items} items")
            });
        }
        Event::ItemCompleted {
            step,
            item,
            duration_ms,
            cost_micros,
            ..
        } => {
            row.step = Some(step.clone());
            row.item = Some(*item);
            row.duration_ms = Some(*duration_ms);
            row.cost_micros = Some(*cost_micros);
        }
        Event::ItemFailed {
            step,
            item,
            kind,
            error,
            retry,
            ..
        } => {
            row.step = Some(step.clone());
            row.item = Some(*item);
            row.error = Some(error.clone());
            row.detail = Some(format!("{kind:?}, try {retry}").to_lowercase());
        }
        Event::StepCompleted { step, .. } => row.step = Some(step.clone()),
        Event::StatusChanged { from, to, .. } => row.detail = Some(format!("{from} -> {to}")),
        Event::RetryScheduled {
            next_run_at,
            reason,
            ..
        } => {
            row.error = Some(reason.clone());
            row.detail = Some(format!(
                "next run at {}",
                next_run_at.format("%Y-%m-%d %H:%M:%S%.3f")
            ));
        }
        Event::TaskFailed { reason, step, item } => {
            row.step.clone_from(step);
            row.item = *item;
            row.error = Some(reason.clone());
        }
        Event::ReviewApproved { reviewer } => row.detail = reviewer.clone(),
        Event::ReviewRejected { redo_from, reason } => {
            row.detail = Some(format!(
                "redo from {redo_from}{}",
                reason
                    .as_deref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            ));
        }
        Event::TaskCancelled { reason } => row.detail = reason.clone(),
        Event::ReviewRequested {} | Event::TaskCompleted {} => {}
    }
    row
}
