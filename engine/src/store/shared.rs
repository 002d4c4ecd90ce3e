//! Appends to several streams in one statement and one commit.
//!
//! Each stream keeps its own fence: the `UPDATE tasks` matches only the streams whose
//! expected version (and lease epoch) hold, events are inserted only for those, and every
//! other stream writes nothing and gets the same typed answer a lone append would have got
//! (a replay of stored events, `Conflict`, `LeaseLost`, `TaskNotFound`). One stream's stale
//! lease never fails another's events.

use std::collections::HashSet;

use sqlx::Row;
use sqlx::postgres::PgConnection;
use uuid::Uuid;

use super::postgres::{EncodedBatch, RowChange, waited_too_long};
use super::{Appended, EVENTS_CHANNEL, Fence, PgStore};
use crate::error::{Error, Result};
use crate::event::NewEvent;
use crate::id::TaskId;
use crate::status::TaskStatus;

/// The shared append. The stream rows' order is the order their events take in the log:
/// `ORDER BY e.idx` makes the identity values follow it, so within the one transaction each
/// stream's events keep their version order in global order, as a lone append's do.
const APPEND_MANY_SQL: &str = r#"
WITH s AS (
    SELECT * FROM UNNEST($1::uuid[], $2::bigint[], $3::int[], $4::int[], $5::text[], $6::text[],
                         $7::bool[], $8::timestamptz[], $9::text[], $10::bool[], $11::int[],
                         $12::bool[], $13::bool[], $14::bool[], $24::int[], $25::int[],
                         $26::bool[])
        AS s(id, epoch, expected, n, status, status_display, set_next_run, next_run_at,
             last_error, release_lease, attempt, readable, parked, wakes, workflow_version,
             signals_seen, wait_park)
), fence AS (
    UPDATE tasks t SET
        version          = s.expected + s.n,
        status           = COALESCE(s.status, t.status),
        status_display   = CASE WHEN s.status IS NULL THEN t.status_display ELSE s.status_display END,
        next_run_at      = CASE WHEN s.wait_park AND t.signals_sent > t.signals_seen + s.signals_seen
                                THEN now()
                                WHEN s.set_next_run THEN s.next_run_at ELSE t.next_run_at END,
        signals_seen     = t.signals_seen + s.signals_seen,
        last_error       = COALESCE(s.last_error, t.last_error),
        lease_owner      = CASE WHEN s.release_lease THEN NULL ELSE t.lease_owner END,
        lease_expires_at = CASE WHEN s.release_lease THEN NULL ELSE t.lease_expires_at END,
        attempt          = COALESCE(s.attempt, t.attempt),
        unreadable_since = CASE WHEN s.readable THEN NULL ELSE t.unreadable_since END,
        parked           = COALESCE(s.parked, t.parked),
        workflow_version = COALESCE(s.workflow_version, t.workflow_version),
        updated_at       = now()
    FROM s
    WHERE t.id = s.id AND t.version = s.expected AND (s.epoch IS NULL OR t.lease_epoch = s.epoch)
      AND t.archived_at IS NULL
      AND ($23::text IS NULL OR set_config('lock_timeout', $23, true) IS NOT NULL)
    RETURNING t.id, s.expected, s.wakes
), inserted AS (
    INSERT INTO events (stream_id, stream_version, event_id, event_type, schema_version, payload, metadata)
    SELECT fence.id, (fence.expected + e.ord)::int, e.event_id, e.event_type, e.schema_version, e.payload, e.metadata
    FROM UNNEST($15::uuid[], $16::int[], $17::uuid[], $18::text[], $19::int2[], $20::jsonb[], $21::jsonb[])
             WITH ORDINALITY AS e(stream_id, ord, event_id, event_type, schema_version, payload, metadata, idx)
    JOIN fence ON fence.id = e.stream_id
    ORDER BY e.idx
    RETURNING stream_id, global_position
), notified AS (
    SELECT pg_notify($22, '') WHERE EXISTS (SELECT 1 FROM fence WHERE fence.wakes)
)
SELECT
    COALESCE((SELECT array_agg(id) FROM fence), '{}') AS fenced,
    (SELECT count(*) FROM notified) AS notified,
    COALESCE((SELECT array_agg(stream_id ORDER BY global_position) FROM inserted), '{}') AS streams,
    COALESCE((SELECT array_agg(global_position ORDER BY global_position) FROM inserted), '{}') AS positions
"#;

/// Shared statements sent for one call, at most (see [`PgStore::append_many_within`]).
const SHARED_ROUNDS: usize = 3;

/// One stream's answer from [`PgStore::append_many_within`].
#[derive(Debug)]
pub(crate) enum Bounded {
    /// What a lone append would have answered.
    Answered(Result<Appended>),
    /// The task's row stayed locked by another transaction past the bound; nothing of
    /// this stream was written.
    Held,
}

impl Bounded {
    /// The answer of a call without a bound, which never gives up on a row.
    fn into_answer(self) -> Result<Appended> {
        match self {
            Bounded::Answered(answer) => answer,
            Bounded::Held => Err(Error::Database(sqlx::Error::Protocol(
                "the task row stayed locked by another transaction".into(),
            ))),
        }
    }
}

/// SQLSTATE 55P03: a lock wait outlasted `lock_timeout`.
pub(crate) fn lock_not_available(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.code().as_deref() == Some("55P03"))
}

/// One stream's part of a shared append (see [`PgStore::append_many_in`]).
#[derive(Clone, Copy, Debug)]
pub struct StreamAppend<'a> {
    pub stream: TaskId,
    pub expected_version: u32,
    pub fence: Fence,
    pub events: &'a [NewEvent],
}

/// The statement's parameters: one row per stream, one per event.
#[derive(Default)]
struct Columns {
    ids: Vec<Uuid>,
    epochs: Vec<Option<i64>>,
    expected: Vec<i32>,
    counts: Vec<i32>,
    statuses: Vec<Option<&'static str>>,
    displays: Vec<Option<String>>,
    set_next_run: Vec<bool>,
    next_run_at: Vec<Option<chrono::DateTime<chrono::Utc>>>,
    last_errors: Vec<Option<String>>,
    release_lease: Vec<bool>,
    attempts: Vec<Option<i32>>,
    readable: Vec<bool>,
    parked: Vec<Option<bool>>,
    wakes: Vec<bool>,
    workflow_versions: Vec<Option<i32>>,
    signals_seen: Vec<i32>,
    wait_park: Vec<bool>,
    event_streams: Vec<Uuid>,
    ords: Vec<i32>,
    event_ids: Vec<Uuid>,
    event_types: Vec<&'static str>,
    schema_versions: Vec<i16>,
    payloads: Vec<serde_json::Value>,
    metadata: Vec<serde_json::Value>,
}

impl Columns {
    /// The parameters for `batch`; an event that cannot be encoded fails the lot.
    fn of(batch: &[StreamAppend<'_>]) -> Result<Columns> {
        let mut columns = Columns::default();
        for append in batch {
            let encoded = EncodedBatch::new(append.stream, append.expected_version, append.events)?;
            columns.push(append, encoded);
        }
        Ok(columns)
    }

    fn push(&mut self, append: &StreamAppend<'_>, batch: EncodedBatch) {
        let change = RowChange::from_events(append.events);
        let uuid = append.stream.as_uuid();
        self.ids.push(uuid);
        self.epochs.push(append.fence.epoch());
        self.expected.push(batch.expected);
        self.counts
            .push(i32::try_from(batch.len).unwrap_or(i32::MAX));
        self.statuses.push(change.status.map(TaskStatus::as_str));
        self.displays.push(change.status_display);
        self.set_next_run.push(change.next_run_at.is_some());
        self.next_run_at.push(change.next_run_at.flatten());
        self.last_errors.push(change.last_error);
        self.release_lease.push(change.release_lease);
        self.attempts.push(change.attempt);
        self.readable.push(change.readable);
        self.parked.push(change.parked);
        self.wakes.push(change.wakes);
        self.workflow_versions.push(change.workflow_version);
        self.signals_seen.push(change.signals_seen);
        self.wait_park.push(change.wait_park);
        for (ord, _) in (1..).zip(append.events) {
            self.event_streams.push(uuid);
            self.ords.push(ord);
        }
        self.event_ids.extend(batch.event_ids);
        self.event_types.extend(batch.event_types);
        self.schema_versions.extend(batch.schema_versions);
        self.payloads.extend(batch.payloads);
        self.metadata.extend(batch.metadata);
    }
}

impl PgStore {
    /// Appends to several streams in one statement and one commit on `conn`, each under its
    /// own expected version and fence, and answers each as [`PgStore::append_in`] would
    /// have: the streams whose fence holds are written together; any other writes nothing
    /// and gets its own typed answer (a replay of the same events, `Conflict`, `LeaseLost`,
    /// `TaskNotFound`), never failing the rest.
    ///
    /// A stream named twice, a batch the database refuses as a whole (a reused event id,
    /// say) or a single stream is appended one stream at a time, in order, so that every
    /// answer stays exact.
    pub async fn append_many_in(
        &self,
        conn: &mut PgConnection,
        appends: &[StreamAppend<'_>],
    ) -> Vec<Result<Appended>> {
        self.append_many_within(conn, appends, None)
            .await
            .into_iter()
            .map(Bounded::into_answer)
            .collect()
    }

    /// [`PgStore::append_many_in`], each statement giving up on a task row that another
    /// transaction keeps locked for longer than `lock_wait` (see
    /// [`PgStore::append_within`]): such a stream answers [`Bounded::Held`], having written
    /// nothing, and the others are appended without it.
    ///
    /// A shared statement that gives up is sent again without the rows a probe finds
    /// locked (`FOR NO KEY UPDATE SKIP LOCKED`, the lock the fence takes), so it costs one
    /// wait for all of them, not one per stream.
    pub(crate) async fn append_many_within(
        &self,
        conn: &mut PgConnection,
        appends: &[StreamAppend<'_>],
        lock_wait: Option<&str>,
    ) -> Vec<Bounded> {
        let mut answers: Vec<Option<Bounded>> = appends.iter().map(|_| None).collect();
        let mut pending: Vec<usize> = (0..appends.len()).collect();
        let mut seen = HashSet::new();
        let distinct = appends.iter().all(|a| seen.insert(a.stream));
        // A few rounds: a row may be locked, or let go, between the probe and the statement.
        for _ in 0..SHARED_ROUNDS {
            let batch: Vec<StreamAppend<'_>> = pending.iter().map(|&i| appends[i]).collect();
            if batch.len() < 2 || !distinct {
                break;
            }
            let Ok(columns) = Columns::of(&batch) else {
                break;
            };
            match self.shared_statement(conn, &columns, lock_wait).await {
                Ok(written) => {
                    let written = self.answers(&batch, written).await;
                    for (&i, answer) in pending.iter().zip(written) {
                        answers[i] = Some(Bounded::Answered(answer));
                    }
                    pending.clear();
                }
                Err(err) if lock_wait.is_some() && lock_not_available(&err) => {
                    let Ok(held) = self.held_rows(conn, &batch).await else {
                        break;
                    };
                    pending.retain(|&i| {
                        let keep = !held.contains(&appends[i].stream.as_uuid());
                        if !keep {
                            answers[i] = Some(Bounded::Held);
                        }
                        keep
                    });
                    continue;
                }
                Err(_) => {}
            }
            break;
        }
        for i in pending {
            let a = appends[i];
            let result = self
                .append_within(
                    conn,
                    a.stream,
                    a.expected_version,
                    a.fence,
                    a.events,
                    lock_wait,
                )
                .await;
            answers[i] = Some(if lock_wait.is_some() && waited_too_long(&result) {
                Bounded::Held
            } else {
                Bounded::Answered(result)
            });
        }
        answers
            .into_iter()
            .map(|answer| answer.unwrap_or(Bounded::Held))
            .collect()
    }

    /// Which of `batch`'s task rows another transaction holds locked now.
    async fn held_rows(
        &self,
        conn: &mut PgConnection,
        batch: &[StreamAppend<'_>],
    ) -> std::result::Result<HashSet<Uuid>, sqlx::Error> {
        let ids: Vec<Uuid> = batch.iter().map(|a| a.stream.as_uuid()).collect();
        let free: Vec<Uuid> = self
            .scalar("SELECT id FROM tasks WHERE id = ANY($1) FOR NO KEY UPDATE SKIP LOCKED")
            .bind(&ids)
            .fetch_all(&mut *conn)
            .await?;
        Ok(ids.into_iter().filter(|id| !free.contains(id)).collect())
    }

    async fn shared_statement(
        &self,
        conn: &mut PgConnection,
        c: &Columns,
        lock_wait: Option<&str>,
    ) -> std::result::Result<Written, sqlx::Error> {
        let row = self
            .statement(APPEND_MANY_SQL)
            .bind(&c.ids)
            .bind(&c.epochs)
            .bind(&c.expected)
            .bind(&c.counts)
            .bind(&c.statuses)
            .bind(&c.displays)
            .bind(&c.set_next_run)
            .bind(&c.next_run_at)
            .bind(&c.last_errors)
            .bind(&c.release_lease)
            .bind(&c.attempts)
            .bind(&c.readable)
            .bind(&c.parked)
            .bind(&c.wakes)
            .bind(&c.event_streams)
            .bind(&c.ords)
            .bind(&c.event_ids)
            .bind(&c.event_types)
            .bind(&c.schema_versions)
            .bind(&c.payloads)
            .bind(&c.metadata)
            .bind(EVENTS_CHANNEL)
            .bind(lock_wait)
            .bind(&c.workflow_versions)
            .bind(&c.signals_seen)
            .bind(&c.wait_park)
            .fetch_one(&mut *conn)
            .await?;
        Ok(Written {
            fenced: row.try_get("fenced")?,
            streams: row.try_get("streams")?,
            positions: row.try_get("positions")?,
        })
    }

    /// Each stream's answer: its positions if its fence held, else why not.
    async fn answers(
        &self,
        appends: &[StreamAppend<'_>],
        written: Written,
    ) -> Vec<Result<Appended>> {
        let mut answers = Vec::with_capacity(appends.len());
        for append in appends {
            let uuid = append.stream.as_uuid();
            if written.fenced.contains(&uuid) {
                let positions = written
                    .streams
                    .iter()
                    .zip(&written.positions)
                    .filter(|(stream, _)| **stream == uuid)
                    .map(|(_, position)| *position)
                    .collect();
                answers.push(Ok(Appended {
                    version: append.expected_version + append.events.len() as u32,
                    positions,
                    replayed: false,
                }));
            } else {
                answers.push(
                    self.explain_rejection(
                        append.stream,
                        append.expected_version,
                        append.fence,
                        append.events,
                    )
                    .await,
                );
            }
        }
        answers
    }
}

/// What the shared statement wrote.
struct Written {
    fenced: Vec<Uuid>,
    streams: Vec<Uuid>,
    positions: Vec<i64>,
}

#[cfg(test)]
mod tests {
    use super::{APPEND_MANY_SQL, Bounded, StreamAppend};
    use crate::event::{Event, NewEvent};
    use crate::id::TaskId;
    use crate::store::postgres::APPEND_SQL;
    use crate::store::{Fence, NewTask, PgStore};
    use crate::testing::TestDatabase;

    async fn task(store: &PgStore) -> TaskId {
        let channel = crate::id::ChannelId::parse("c").expect("channel");
        store
            .create_task(NewTask::new("w", channel, serde_json::json!({})))
            .await
            .expect("task")
            .task_id()
    }

    /// With a bound, rows held by another transaction answer `Held` (nothing written) and
    /// the other streams still share one statement: a probe finds every held row after
    /// one wait, rather than one wait per stream.
    #[tokio::test]
    async fn a_bounded_shared_append_leaves_out_the_held_rows_and_shares_the_rest() {
        let db = TestDatabase::create().await;
        let store = db.store();
        let mut tasks = Vec::new();
        for _ in 0..5 {
            tasks.push(task(&store).await);
        }
        let held = [tasks[1], tasks[2], tasks[4]];
        let mut side = db.pool().begin().await.expect("begin");
        let ids: Vec<uuid::Uuid> = held.iter().map(TaskId::as_uuid).collect();
        sqlx::query("SELECT 1 FROM tasks WHERE id = ANY($1) FOR UPDATE")
            .bind(&ids)
            .execute(&mut *side)
            .await
            .expect("lock");
        let events: Vec<[NewEvent; 1]> = tasks
            .iter()
            .map(|_| {
                [NewEvent::new(Event::ItemCompleted {
                    step: "clips".into(),
                    item: 1,
                    attempt: 1,
                    artifact: "clip-1".into(),
                    cost_micros: 0,
                    duration_ms: 0,
                    output: None,
                })]
            })
            .collect();
        let appends: Vec<StreamAppend<'_>> = tasks
            .iter()
            .zip(&events)
            .map(|(&stream, events)| StreamAppend {
                stream,
                expected_version: 1,
                fence: Fence::Unleased,
                events,
            })
            .collect();
        let mut conn = db.pool().acquire().await.expect("conn");
        let answers = store
            .append_many_within(&mut conn, &appends, Some("100ms"))
            .await;
        for (task, answer) in tasks.iter().zip(&answers) {
            if held.contains(task) {
                assert!(matches!(answer, Bounded::Held), "{answer:?}");
                assert_eq!(store.stream_version(*task).await.expect("held"), 1);
            } else {
                assert!(
                    matches!(answer, Bounded::Answered(Ok(a)) if a.version == 2),
                    "{answer:?}"
                );
            }
        }
        let commits: i64 = sqlx::query_scalar(
            "SELECT count(DISTINCT tx_id::text) FROM events WHERE stream_id = ANY($1) AND stream_version = 2",
        )
        .bind([tasks[0].as_uuid(), tasks[3].as_uuid()])
        .fetch_one(db.pool())
        .await
        .expect("commits");
        assert_eq!(commits, 1, "the free streams share one statement");
        side.commit().await.expect("unlock");
        // Unbounded, the same call waits for the rows and writes them.
        let again = store.append_many_in(&mut conn, &appends).await;
        assert!(
            again.iter().all(|a| matches!(a, Ok(a) if a.version == 2)),
            "{again:?}"
        );
    }

    /// The columns a statement's fence `UPDATE tasks … SET` assigns.
    fn assigned(sql: &str) -> Vec<String> {
        let set = sql
            .split_once(" SET")
            .and_then(|(_, rest)| rest.split_once("WHERE"))
            .map(|(set, _)| set)
            .expect("an UPDATE … SET … WHERE");
        let mut columns: Vec<String> = set
            .lines()
            .filter_map(|line| line.trim().split_once('='))
            .map(|(column, _)| column.trim().to_owned())
            .filter(|column| !column.is_empty() && !column.starts_with("--"))
            .collect();
        columns.sort();
        columns
    }

    /// The lone and the shared append keep separate statements (the lone one is tuned for
    /// a lone item's latency), so a `tasks` column that one maintains and the other does
    /// not would make the status row depend on whether a batch shared a commit.
    #[test]
    fn the_lone_and_the_shared_append_maintain_the_same_task_columns() {
        let lone = assigned(APPEND_SQL);
        assert!(lone.len() >= 10, "{lone:?}");
        assert_eq!(lone, assigned(APPEND_MANY_SQL));
    }
}
