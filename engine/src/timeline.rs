//! A task's history as a timeline: one row per event, with the attempt it belongs to.
//! What `reel replay` prints; typed so other tools get the same shape as JSON.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

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
    // When each item's open job was submitted: a completion shows the wait on it.
    let mut submitted: HashMap<(&str, u32), (DateTime<Utc>, String)> = HashMap::new();
    events
        .iter()
        .map(|recorded| {
            if let Event::TaskClaimed {
                attempt: claimed, ..
            } = recorded.event
            {
                attempt = claimed;
            }
            let mut row = entry(recorded, attempt);
            match &recorded.event {
                Event::ItemSubmitted {
                    step, item, job, ..
                } => {
                    submitted.insert((step, *item), (recorded.recorded_at, job_id(job)));
                }
                Event::ItemCompleted { step, item, .. } => {
                    if let Some((at, job)) = submitted.remove(&(step.as_str(), *item)) {
                        let waited = (recorded.recorded_at - at).num_milliseconds().max(0);
                        row.detail = Some(format!(
                            "job {job} done after waiting {:.3}s",
                            waited as f64 / 1e3
                        ));
                    }
                }
                Event::ItemFailed { step, item, .. } => {
                    if let Some((_, job)) = submitted.remove(&(step.as_str(), *item)) {
                        let detail = row.detail.take().unwrap_or_default();
                        row.detail = Some(format!("{detail}; job {job} closed"));
                    }
                }
                _ => {}
            }
            row
        })
        .collect()
}

/// The provider's job id as recorded: the job's `id` (or `job_id`, `task_id`) field, or
/// the job itself when it is a string.
pub fn job_id(job: &Value) -> String {
    let id = ["id", "job_id", "task_id"]
        .iter()
        .find_map(|k| job.get(k))
        .unwrap_or(job);
    let text = match id {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    crate::id::truncate_for_display(&text, 80)
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
            unanswered,
            retry_after_ms,
            ..
        } => {
            row.step = Some(step.clone());
            row.item = Some(*item);
            row.error = Some(error.clone());
            let mut detail = format!("{kind:?}, try {retry}").to_lowercase();
            if *unanswered {
                detail.push_str(", submit unanswered: the provider may have started a job");
            }
            if let Some(wait) = retry_after_ms {
                detail.push_str(&format!(
                    ", come back in {:.1}s (no try used)",
                    *wait as f64 / 1000.0
                ));
            }
            row.detail = Some(detail);
        }
        Event::ItemSubmitted {
            step,
            item,
            submission,
            job,
            ..
        } => {
            row.step = Some(step.clone());
            row.item = Some(*item);
            row.detail = Some(format!("job {} (submission {submission})", job_id(job)));
        }
        Event::TaskParked {
            until,
            jobs,
            waiting,
            ..
        } => {
            let mut detail = if *until >= crate::event::no_deadline() {
                "until a signal comes".to_owned()
            } else {
                format!("until {}", until.format("%Y-%m-%d %H:%M:%S%.3f"))
            };
            if *jobs > 0 || *waiting == 0 && *until < crate::event::no_deadline() {
                detail.push_str(&format!(
                    ": {jobs} job{} open",
                    if *jobs == 1 { "" } else { "s" }
                ));
            }
            if *waiting > 0 {
                detail.push_str(&format!(", {waiting} waiting for the provider"));
            }
            row.detail = Some(detail);
        }
        Event::StepCompleted { step, .. } => row.step = Some(step.clone()),
        Event::WaitStarted {
            step,
            item,
            signal,
            sleep,
            until,
            ..
        } => {
            row.step = Some(step.clone());
            row.item = Some(*item);
            let until = until.map(|u| u.format("%Y-%m-%d %H:%M:%S%.3f").to_string());
            row.detail = Some(match (signal, sleep, until) {
                (Some(signal), _, Some(until)) => {
                    format!("waiting for signal {signal} (until {until})")
                }
                (Some(signal), _, None) => format!("waiting for signal {signal}"),
                (None, Some(sleep), Some(until)) => format!("sleep {sleep} until {until}"),
                (None, _, until) => format!("waiting until {}", until.unwrap_or_default()),
            });
        }
        Event::SignalReceived {
            name,
            signal_id,
            by,
            sent_at,
            ..
        } => {
            row.detail = Some(format!(
                "{name} (id {signal_id}{}, sent {})",
                by.as_deref()
                    .map(|b| format!(", by {b}"))
                    .unwrap_or_default(),
                sent_at.format("%Y-%m-%d %H:%M:%S%.3f")
            ));
        }
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
        Event::TaskUpgraded { .. } => row.detail = describe(&recorded.event),
        Event::ReviewRequested {} | Event::TaskCompleted {} => {}
    }
    row
}

/// What an upgrade did, in a line (`None` for other events): `v1 -> v2, a renamed alpha,
/// added c (by w-1)`.
pub fn describe(event: &Event) -> Option<String> {
    let Event::TaskUpgraded {
        from,
        to,
        renamed,
        added,
        removed,
        by,
        ..
    } = event
    else {
        return None;
    };
    let mut detail = format!("v{from} -> v{to}");
    for rename in renamed {
        detail.push_str(&format!(", {} renamed {}", rename.from, rename.to));
    }
    if !added.is_empty() {
        detail.push_str(&format!(", added {}", added.join(" ")));
    }
    if !removed.is_empty() {
        detail.push_str(&format!(", removed {}", removed.join(" ")));
    }
    if let Some(by) = by {
        detail.push_str(&format!(" (by {by})"));
    }
    Some(detail)
}
