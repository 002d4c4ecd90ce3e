//! Auditing many tasks: a page of streams per query, the next pages read while the
//! current one is checked, so memory stays bounded and the database and the CPU overlap.

use std::collections::VecDeque;

use serde::Serialize;
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::{AuditReport, Rule, Violation, audit};
use crate::error::{Error, Result};
use crate::event::RecordedEvent;
use crate::id::{ChannelId, TaskId};
use crate::store::PgStore;

/// Which tasks [`scan`] audits.
#[derive(Clone, Debug, Default)]
pub struct Scope {
    /// Only this channel's tasks.
    pub channel: Option<ChannelId>,
    /// Only failed tasks.
    pub failed_only: bool,
}

/// Totals over a scan.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ScanSummary {
    pub tasks: u64,
    pub tasks_with_violations: u64,
    pub violations: u64,
}

/// The tasks audited per database round trip: bounds memory to one page of streams.
const SCAN_PAGE: usize = 200;

/// Pages whose events are being read while the current one is audited: the database
/// works on them (on other cores) while this task checks the page in hand.
const PAGES_IN_FLIGHT: usize = 2;

/// A page's task ids and the read of their events.
type PageRead = (Vec<TaskId>, JoinHandle<Result<Vec<RecordedEvent>>>);

async fn next_ids(store: &PgStore, scope: &Scope, after: Uuid) -> Result<Vec<TaskId>> {
    let ids: Vec<Uuid> =
        store
            .on_pool(async |c| {
                store.scalar(
        "SELECT id FROM tasks WHERE id > $1 AND ($2::text IS NULL OR channel_id = $2) \
         AND (NOT $3 OR status = 'failed') AND archived_at IS NULL ORDER BY id LIMIT $4",
    )
    .bind(after)
    .bind(scope.channel.as_ref().map(ChannelId::as_str))
    .bind(scope.failed_only)
    .bind(SCAN_PAGE as i64)
    .fetch_all(c).await
            })
            .await?;
    Ok(ids.into_iter().map(TaskId::from).collect())
}

/// Audits every task in `scope` whose history is in the log (archived tasks are not read),
/// a page of tasks at a time (memory stays bounded however
/// many tasks there are), handing each report to `each` as it is made.
pub async fn scan(
    store: &PgStore,
    scope: &Scope,
    mut each: impl FnMut(AuditReport),
) -> Result<ScanSummary> {
    let mut summary = ScanSummary::default();
    let mut in_flight: VecDeque<PageRead> = VecDeque::new();
    let mut after = Some(Uuid::nil());
    loop {
        while in_flight.len() < PAGES_IN_FLIGHT {
            let Some(from) = after else { break };
            let tasks = next_ids(store, scope, from).await?;
            after = tasks.last().map(TaskId::as_uuid);
            if tasks.is_empty() {
                break;
            }
            let (reader, page) = (store.clone(), tasks.clone());
            in_flight.push_back((
                tasks,
                tokio::spawn(async move { reader.read_streams(&page).await }),
            ));
        }
        let Some((tasks, reading)) = in_flight.pop_front() else {
            return Ok(summary);
        };
        let events = match reading.await {
            Ok(events) => events,
            Err(join) => std::panic::resume_unwind(join.into_panic()),
        };
        let mut record = |report: AuditReport| {
            summary.tasks += 1;
            summary.violations += report.violations.len() as u64;
            summary.tasks_with_violations += u64::from(!report.is_clean());
            each(report);
        };
        match events {
            Ok(events) => {
                for stream in events.chunk_by(|a, b| a.stream_id == b.stream_id) {
                    record(audit(stream[0].stream_id, stream));
                }
            }
            // One undecodable event must not hide the other tasks: audit this page task by task.
            Err(Error::Decode { .. }) => {
                for task in tasks {
                    record(audit_stored(store, task).await?);
                }
            }
            Err(other) => return Err(other),
        }
    }
}

/// Audits one stored task; an event that cannot be decoded is reported as a `KnownEvents`
/// violation at its version.
pub async fn audit_stored(store: &PgStore, task: TaskId) -> Result<AuditReport> {
    match store.read_stream(task, 1).await {
        Ok(events) if events.is_empty() => Err(Error::TaskNotFound(task)),
        Ok(events) => Ok(audit(task, &events)),
        Err(unreadable @ Error::Decode { version, .. }) => {
            let good = store.read_stream_until(task, version).await?;
            audit_up_to(task, &good, unreadable)
        }
        Err(other) => Err(other),
    }
}

/// The audit of a history whose events after `good` cannot be read (`unreadable`, the
/// decode error of the first of them): `good`'s audit plus a `KnownEvents` violation at
/// that event. Any other error is returned as it is.
pub fn audit_up_to(task: TaskId, good: &[RecordedEvent], unreadable: Error) -> Result<AuditReport> {
    let Error::Decode {
        position,
        version,
        event_type,
        schema_version,
        reason,
        ..
    } = unreadable
    else {
        return Err(unreadable);
    };
    let mut report = audit(task, good);
    report.violations.push(Violation {
        task,
        version,
        rule: Rule::KnownEvents,
        message: format!(
            "event at global position {position} ({event_type} v{schema_version}) cannot be read: {reason}"
        ),
    });
    Ok(report)
}
