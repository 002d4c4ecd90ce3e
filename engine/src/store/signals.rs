//! Signals: data sent to a task from outside (an approval, a choice), which a waiting
//! item reads.
//!
//! A signal is written to the task's inbox (`task_signals`), never appended under a worker
//! running the task: such an append would make the run's next append conflict, and a
//! completion of a paid item in it would be lost. The worker that runs the task next
//! records the inbox's new signals in the log (`signal_received`) before any item reads
//! them, so what an item saw is always in the log.
//!
//! Wake-ups cannot be lost: the sender locks the task's row, writes the signal, counts it
//! (`tasks.signals_sent`) and wakes the task if it is parked, in one transaction. A run
//! that parks the task for a wait records the inbox's new signals in the same append, and
//! that append (under the same row lock) makes the task due at once if more signals were
//! sent than the log holds (`tasks.signals_seen`). Either the sender sees the park, or the
//! park sees the signal, whatever becomes of the worker after its park committed.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::Row;

use super::{EVENTS_CHANNEL, PgStore};
use crate::error::{Error, Result};
use crate::id::TaskId;
use crate::status::TaskStatus;

/// The longest signal name or id.
pub const SIGNAL_NAME_MAX_CHARS: usize = 200;

/// What sending a signal did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignalSent {
    /// False: a signal with this name and id had been sent before; nothing changed (the
    /// first one's data stands).
    pub new: bool,
    /// The task was parked and is due now.
    pub woke: bool,
    /// The task's status when the signal was sent.
    pub status: TaskStatus,
}

/// A signal in a task's inbox.
#[derive(Clone, Debug, PartialEq)]
pub struct InboxSignal {
    pub name: String,
    pub signal_id: String,
    pub data: Value,
    pub by: Option<String>,
    pub sent_at: DateTime<Utc>,
    /// Its place among the task's signals in the order they were sent.
    pub seq: Option<u32>,
}

/// Checks a signal's name or id (`what`: "name" or "id"): 1 to [`SIGNAL_NAME_MAX_CHARS`]
/// visible ASCII characters; a name is letters, digits, `_`, `-`, `.` and `:` only (it
/// is an identifier the workflow's code names, shown as is by `replay`, so nothing that
/// displays as something else).
pub fn check_signal_name(what: &str, value: &str) -> Result<()> {
    if value.is_empty() || value.chars().count() > SIGNAL_NAME_MAX_CHARS {
        return Err(Error::InvalidInput(format!(
            "a signal {what} has 1 to {SIGNAL_NAME_MAX_CHARS} characters"
        )));
    }
    let allowed = |c: char| match what {
        "name" => c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'),
        _ => c.is_ascii_graphic(),
    };
    if let Some(bad) = value.chars().find(|c| !allowed(*c)) {
        return Err(Error::InvalidInput(format!(
            "a signal {what} cannot hold {bad:?}: {}",
            if what == "name" {
                "letters, digits, '_', '-', '.' and ':' only"
            } else {
                "visible ASCII characters only"
            }
        )));
    }
    Ok(())
}

/// Checks a signal's data: the log cannot store a NUL character, nor read back JSON
/// deeper than [`JSON_DEPTH_MAX`](crate::outputs::JSON_DEPTH_MAX) levels.
pub fn check_signal_data(data: &Value) -> Result<()> {
    if crate::outputs::holds_nul(data) {
        return Err(Error::InvalidInput(
            "a signal's data cannot hold a NUL character (the log cannot store it)".into(),
        ));
    }
    if crate::outputs::too_deep(data) {
        return Err(Error::InvalidInput(format!(
            "a signal's data nests deeper than {} levels (the log could not read it back)",
            crate::outputs::JSON_DEPTH_MAX
        )));
    }
    Ok(())
}

impl PgStore {
    /// Sends the signal `name` with `data` to `task`, idempotent by `signal_id`: sending
    /// the same name and id again changes nothing. A parked task is woken. Refused for a
    /// task that is completed, cancelled or archived (nothing of it will run again), and
    /// for one that does not exist.
    pub async fn send_signal(
        &self,
        task: TaskId,
        name: &str,
        signal_id: &str,
        data: &Value,
        by: Option<&str>,
    ) -> Result<SignalSent> {
        check_signal_name("name", name)?;
        check_signal_name("id", signal_id)?;
        check_signal_data(data)?;
        let mut tx = self.pool().begin().await?;
        // The row lock orders this with a run's park (which updates the row): see the
        // module's note.
        let row = self
            .statement(
                "SELECT status, archived_at IS NOT NULL AS archived FROM tasks WHERE id = $1 FOR UPDATE",
            )
            .bind(task.as_uuid())
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            return Err(Error::TaskNotFound(task));
        };
        let status: String = row.try_get("status")?;
        let status = TaskStatus::parse(&status).map_err(|e| Error::InvalidInput(e.to_string()))?;
        let archived: bool = row.try_get("archived")?;
        if archived || status == TaskStatus::COMPLETED || status == TaskStatus::CANCELLED {
            return Err(Error::InvalidState {
                task,
                status,
                action: "signal",
            });
        }
        let inserted = self
            .statement(
                "INSERT INTO task_signals (task_id, name, signal_id, data, sent_by) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            )
            .bind(task.as_uuid())
            .bind(name)
            .bind(signal_id)
            .bind(data)
            .bind(by)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        // Counted and numbered (see the module's note), and a parked task woken.
        let woken = if inserted > 0 {
            let row = self
                .statement(
                    "UPDATE tasks SET signals_sent = signals_sent + 1, \
                            next_run_at = CASE WHEN parked AND lease_owner IS NULL \
                                                AND next_run_at > now() \
                                               THEN now() ELSE next_run_at END \
                     WHERE id = $1 \
                     RETURNING signals_sent, \
                               parked AND lease_owner IS NULL AND next_run_at = now() AS woke",
                )
                .bind(task.as_uuid())
                .fetch_one(&mut *tx)
                .await?;
            let seq: i32 = row.try_get("signals_sent")?;
            self.statement(
                "UPDATE task_signals SET seq = $4 \
                 WHERE task_id = $1 AND name = $2 AND signal_id = $3",
            )
            .bind(task.as_uuid())
            .bind(name)
            .bind(signal_id)
            .bind(seq)
            .execute(&mut *tx)
            .await?;
            row.try_get::<bool, _>("woke")?
        } else {
            false
        };
        if woken {
            self.statement("SELECT pg_notify($1, '')")
                .bind(EVENTS_CHANNEL)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(SignalSent {
            new: inserted > 0,
            woke: woken,
            status,
        })
    }

    /// The signals in `task`'s inbox sent after the `after`-th (by `seq`; 0: all), in the
    /// order they were sent, with any that have no `seq` (sent before it was kept).
    pub async fn inbox(&self, task: TaskId, after: u32) -> Result<Vec<InboxSignal>> {
        let after = i32::try_from(after).unwrap_or(i32::MAX);
        let rows = self
            .on_pool(async |c| {
                self.statement(
                    "SELECT name, signal_id, data, sent_by, sent_at, seq FROM task_signals \
                     WHERE task_id = $1 AND (seq > $2 OR seq IS NULL) \
                     ORDER BY seq NULLS FIRST, sent_at, name, signal_id",
                )
                .bind(task.as_uuid())
                .bind(after)
                .fetch_all(c)
                .await
            })
            .await?;
        rows.iter()
            .map(|row| {
                Ok(InboxSignal {
                    name: row.try_get("name")?,
                    signal_id: row.try_get("signal_id")?,
                    data: row.try_get("data")?,
                    by: row.try_get("sent_by")?,
                    sent_at: row.try_get("sent_at")?,
                    seq: row
                        .try_get::<Option<i32>, _>("seq")?
                        .and_then(|seq| u32::try_from(seq).ok()),
                })
            })
            .collect()
    }
}
