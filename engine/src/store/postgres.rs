//! The PostgreSQL event store.
//!
//! An append is one statement (so one implicit transaction and one round trip): the fence
//! `UPDATE tasks` runs first and takes the task's row lock, the event rows are inserted only
//! if it matched, and `pg_notify` fires at commit when the batch holds an event that
//! followers wait for (see [`Event::wakes_followers`]). Because the fence is the first write,
//! one task's transactions take their xids in version order (see DESIGN.md).

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::Row;
use sqlx::postgres::{PgConnection, PgPool};
use tracing::Instrument;
use uuid::Uuid;

use super::{Appended, Checkpoint, Created, EVENTS_CHANNEL, Fence, LogPage, NewTask};
use crate::error::{Error, Result};
use crate::event::{Event, EventRow, NewEvent, RecordedEvent};
use crate::id::{TaskId, truncate_for_display};
use crate::status::TaskStatus;
use crate::telemetry::TraceContext;

/// Whether an append gave up waiting for a row lock (see [`PgStore::append_within`]).
pub(crate) fn waited_too_long(result: &Result<Appended>) -> bool {
    matches!(result, Err(Error::Database(err)) if super::shared::lock_not_available(err))
}

/// The longest error text copied into the `tasks` row.
const LAST_ERROR_MAX_CHARS: usize = 500;

pub(super) const APPEND_SQL: &str = r#"
WITH fence AS (
    UPDATE tasks SET
        version          = $3 + cardinality($4::uuid[]),
        status           = COALESCE($9, status),
        status_display   = CASE WHEN $9 IS NULL THEN status_display ELSE $17 END,
        -- A park for a wait with signals sent that the log does not hold yet: due now.
        next_run_at      = CASE WHEN $23 AND signals_sent > signals_seen + $22 THEN now()
                                WHEN $10 THEN $11 ELSE next_run_at END,
        signals_seen     = signals_seen + $22,
        last_error       = COALESCE($12, last_error),
        lease_owner      = CASE WHEN $13 THEN NULL ELSE lease_owner END,
        lease_expires_at = CASE WHEN $13 THEN NULL ELSE lease_expires_at END,
        attempt          = COALESCE($14, attempt),
        -- Anything but a claim is written by a worker that could read the history.
        unreadable_since = CASE WHEN $18 THEN NULL ELSE unreadable_since END,
        parked           = COALESCE($19, parked),
        workflow_version = COALESCE($21, workflow_version),
        updated_at       = now()
    -- $20, if given, bounds how long the fence waits for the task's row lock (local to
    -- this statement's transaction): a shared writer gives up a row held elsewhere.
    -- An archived task's stream is not here to append to: restore it first.
    WHERE id = $1 AND version = $3 AND ($2::bigint IS NULL OR lease_epoch = $2) AND archived_at IS NULL
      AND ($20::text IS NULL OR set_config('lock_timeout', $20, true) IS NOT NULL)
    RETURNING id
), inserted AS (
    INSERT INTO events (stream_id, stream_version, event_id, event_type, schema_version, payload, metadata)
    SELECT fence.id, ($3 + e.ord)::int, e.event_id, e.event_type, e.schema_version, e.payload, e.metadata
    FROM fence,
         UNNEST($4::uuid[], $5::text[], $6::int2[], $7::jsonb[], $8::jsonb[])
             WITH ORDINALITY AS e(event_id, event_type, schema_version, payload, metadata, ord)
    RETURNING global_position
), notified AS (
    SELECT pg_notify($15, '') FROM fence WHERE $16
)
SELECT
    (SELECT count(*) FROM fence) AS fenced,
    (SELECT count(*) FROM notified) AS notified,
    COALESCE((SELECT array_agg(global_position ORDER BY global_position) FROM inserted), '{}') AS positions
"#;

const CREATE_TASK_SQL: &str = r#"
WITH task AS (
    INSERT INTO tasks (id, workflow, channel_id, status, version, notion_page_id, idempotency_key,
                       workflow_version)
    VALUES ($1, $2, $3, 'queued', 1, $4, $5, $10)
    ON CONFLICT DO NOTHING
    RETURNING id
), submitted AS (
    INSERT INTO events (stream_id, stream_version, event_id, event_type, schema_version, payload, metadata)
    SELECT task.id, 1, $6, 'task_submitted', $7, $8, $11 FROM task
    RETURNING global_position
), notified AS (
    SELECT pg_notify($9, '') FROM task
)
SELECT (SELECT count(*) FROM task) AS created, (SELECT count(*) FROM notified) AS notified
"#;

/// The columns every event read selects, as `EventRow` expects them.
macro_rules! select_events {
    ($rest:literal) => {
        concat!(
            "SELECT global_position, tx_id::text::bigint AS tx_id, stream_id, stream_version, ",
            "event_id, event_type, schema_version, payload::text AS payload, ",
            "metadata::text AS metadata, recorded_at FROM events ",
            $rest
        )
    };
}

const READ_STREAM_SQL: &str =
    select_events!("WHERE stream_id = $1 AND stream_version >= $2 ORDER BY stream_version");

const READ_STREAM_UNTIL_SQL: &str =
    select_events!("WHERE stream_id = $1 AND stream_version < $2 ORDER BY stream_version");

const READ_STREAMS_SQL: &str =
    select_events!("WHERE stream_id = ANY($1) ORDER BY stream_id, stream_version");

// The global read. One statement, so one snapshot decides both the watermark and the rows:
// nothing at or above the oldest running xid is returned, because it may still commit below
// rows that are already visible. Only rows whose type is in $4 (or every row when $4 is
// NULL) carry their payload: the others are scanned for the checkpoint only, so a follower
// that cares about a few types neither decodes nor fails on the rest.
const READ_PAGE_SQL: &str = "SELECT global_position, tx_id::text::bigint AS tx_id, stream_id, \
       stream_version, event_id, event_type, schema_version, \
       CASE WHEN $4::text[] IS NULL OR event_type = ANY($4) THEN payload::text END AS payload, \
       metadata::text AS metadata, recorded_at FROM events \
     WHERE (tx_id, global_position) > ($1::text::xid8, $2) \
       AND tx_id < pg_snapshot_xmin(pg_current_snapshot()) \
     ORDER BY tx_id, global_position LIMIT $3";

/// The event store on a PostgreSQL pool. Cheap to clone.
#[derive(Clone, Debug)]
pub struct PgStore {
    pool: PgPool,
    /// Where session features (LISTEN) run: the pool itself unless set otherwise.
    session: Session,
    /// Statements are prepared once per connection and kept (named); false through a
    /// transaction pooler, where they are unnamed (see [`PgStore::statement`]).
    named: bool,
    /// The database's clock as seen from here (shared by the store's clones).
    clock: std::sync::Arc<super::clock::DbClock>,
}

/// Where a store's session features run.
#[derive(Clone, Debug)]
enum Session {
    /// On the store's own pool (a direct connection, or a session pooler).
    Main,
    /// On a pool of its own (a direct URL beside a transaction pooler).
    Direct(PgPool),
    /// Nowhere: the store's pool goes through a transaction pooler.
    Unavailable,
}

impl PgStore {
    /// A store on `pool` (whose database has the migrations applied: see [`PgStore::migrate`]).
    pub fn new(pool: PgPool) -> Self {
        PgStore {
            pool,
            session: Session::Main,
            named: true,
            clock: super::clock::DbClock::shared(),
        }
    }

    /// The same store for a pool behind `pooler`: through a transaction pooler every
    /// statement is unnamed (parsed on each execution, one more round trip), since a named
    /// one lives in a server session that the next transaction may not get. Set by
    /// [`crate::db::connect_store`]; a store made with [`PgStore::new`] prepares and keeps
    /// its statements.
    pub fn behind(mut self, pooler: crate::db::Pooler) -> Self {
        self.named = pooler.keeps_sessions();
        self
    }

    /// The same store (settings, pooler, session pool) on a pool of its own of at most
    /// `max_connections`, connected lazily: for long work (a scan over every history) that
    /// must never take the connections quick requests wait for.
    pub fn with_own_pool(&self, max_connections: u32) -> Self {
        let options = self.pool.options();
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(options.get_acquire_timeout())
            .connect_lazy_with((*self.pool.connect_options()).clone());
        PgStore {
            pool,
            ..self.clone()
        }
    }

    /// Whether the store's connections keep their server sessions between transactions
    /// (no transaction pooler between them and PostgreSQL).
    pub fn keeps_sessions(&self) -> bool {
        self.named
    }

    /// Runs `work` on a connection of the pool. Behind a transaction pooler it runs in a
    /// transaction of its own, committed when `work` succeeds: the pooler gives each
    /// transaction, not each connection, a server session, and an unnamed statement is
    /// parsed in one round trip and executed in the next (sqlx syncs between them), which
    /// must reach the same session.
    pub async fn on_pool<T>(
        &self,
        work: impl AsyncFnOnce(&mut PgConnection) -> std::result::Result<T, sqlx::Error>,
    ) -> Result<T> {
        if self.named {
            let mut conn = self.pool.acquire().await?;
            return Ok(work(&mut conn).await?);
        }
        let mut tx = self.pool.begin().await?;
        let done = work(&mut tx).await?;
        tx.commit().await?;
        Ok(done)
    }

    /// A statement as the store makes its own: named and kept per connection, or unnamed
    /// behind a transaction pooler (see [`PgStore::behind`]). Sidecars run their own SQL
    /// with it (and [`PgStore::on_pool`]), so that it works wherever the store does.
    pub fn statement(
        &self,
        sql: &'static str,
    ) -> sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments> {
        sqlx::query(sql).persistent(self.named)
    }

    /// [`PgStore::statement`] for one column of each row.
    pub fn scalar<O>(
        &self,
        sql: &'static str,
    ) -> sqlx::query::QueryScalar<'static, sqlx::Postgres, O, sqlx::postgres::PgArguments>
    where
        (O,): for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
    {
        sqlx::query_scalar(sql).persistent(self.named)
    }

    /// [`PgStore::statement`] for rows read as `O`.
    pub fn rows_as<O>(
        &self,
        sql: &'static str,
    ) -> sqlx::query::QueryAs<'static, sqlx::Postgres, O, sqlx::postgres::PgArguments>
    where
        O: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
    {
        sqlx::query_as(sql).persistent(self.named)
    }

    /// The same store with its session features (LISTEN for wake-ups) on `pool` — a
    /// direct connection when the store's own pool goes through a transaction pooler —
    /// or, with `None`, nowhere: its readers and workers then poll.
    pub fn with_session_pool(mut self, pool: Option<PgPool>) -> Self {
        self.session = match pool {
            Some(pool) => Session::Direct(pool),
            None => Session::Unavailable,
        };
        self
    }

    /// The pool on which session features work (`None`: none does).
    pub fn session_pool(&self) -> Option<&PgPool> {
        match &self.session {
            Session::Main => Some(&self.pool),
            Session::Direct(pool) => Some(pool),
            Session::Unavailable => None,
        }
    }

    pub(crate) fn clock(&self) -> &super::clock::DbClock {
        &self.clock
    }

    /// Applies the embedded migrations (idempotent; safe to run from several processes:
    /// they take a session advisory lock). Behind a transaction pooler they run over the
    /// session pool (`REEL_DIRECT_DATABASE_URL`), and without one they are refused, saying
    /// so: a lock taken in one pooled transaction may be left on a server session.
    pub async fn migrate(&self) -> Result<()> {
        let pool = match (&self.session, self.named) {
            (_, true) => &self.pool,
            (Session::Direct(direct), false) => direct,
            (_, false) => {
                return Err(Error::InvalidInput(format!(
                    "migrations need a session (they hold an advisory lock), which a \
                     transaction pooler does not keep: set {} to a URL straight to \
                     PostgreSQL, or run `reel migrate` with DATABASE_URL pointing there",
                    crate::db::DIRECT_URL_VAR
                )));
            }
        };
        super::MIGRATOR.run(pool).await?;
        Ok(())
    }

    /// The pool the store runs on.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Appends inside a transaction the caller holds open (to compose an append with other
    /// writes). The events become visible, and global readers move past them, at commit.
    pub async fn append_in(
        &self,
        conn: &mut PgConnection,
        stream: TaskId,
        expected_version: u32,
        fence: Fence,
        events: &[NewEvent],
    ) -> Result<Appended> {
        self.append_within(conn, stream, expected_version, fence, events, None)
            .await
    }

    /// [`PgStore::append_in`], giving up (a database error with SQLSTATE `55P03`, see
    /// [`waited_too_long`]) if the task's row stays locked by another transaction for
    /// longer than `lock_wait` (a PostgreSQL interval, e.g. `"100ms"`), having written
    /// nothing.
    pub(crate) async fn append_within(
        &self,
        conn: &mut PgConnection,
        stream: TaskId,
        expected_version: u32,
        fence: Fence,
        events: &[NewEvent],
        lock_wait: Option<&str>,
    ) -> Result<Appended> {
        let batch = EncodedBatch::new(stream, expected_version, events)?;
        let change = RowChange::from_events(events);
        let outcome = self
            .statement(APPEND_SQL)
            .bind(stream.as_uuid())
            .bind(fence.epoch())
            .bind(batch.expected)
            .bind(&batch.event_ids)
            .bind(&batch.event_types)
            .bind(&batch.schema_versions)
            .bind(&batch.payloads)
            .bind(&batch.metadata)
            .bind(change.status.map(TaskStatus::as_str))
            .bind(change.next_run_at.is_some())
            .bind(change.next_run_at.flatten())
            .bind(change.last_error)
            .bind(change.release_lease)
            .bind(change.attempt)
            .bind(EVENTS_CHANNEL)
            .bind(change.wakes)
            .bind(change.status_display)
            .bind(change.readable)
            .bind(change.parked)
            .bind(lock_wait)
            .bind(change.workflow_version)
            .bind(change.signals_seen)
            .bind(change.wait_park)
            .fetch_one(&mut *conn)
            .await;
        let row = match outcome {
            Ok(row) => row,
            Err(err) => {
                return Err(self
                    .translate_insert_error(err, stream, expected_version, events)
                    .await);
            }
        };
        if row.try_get::<i64, _>("fenced")? == 1 {
            let positions: Vec<i64> = row.try_get("positions")?;
            return Ok(Appended {
                version: expected_version + batch.len,
                positions,
                replayed: false,
            });
        }
        self.explain_rejection(stream, expected_version, fence, events)
            .await
    }

    /// Why the fence matched no row: a replay of stored events (success), a lost lease,
    /// a version conflict, or a missing task. Reads committed state through the pool.
    pub(super) async fn explain_rejection(
        &self,
        stream: TaskId,
        expected: u32,
        fence: Fence,
        events: &[NewEvent],
    ) -> Result<Appended> {
        if let Some(version) = self.already_stored(stream, expected, events).await? {
            return Ok(Appended {
                version,
                positions: Vec::new(),
                replayed: true,
            });
        }
        let row = self
            .on_pool(async |c| {
                self.statement("SELECT version, lease_epoch FROM tasks WHERE id = $1")
                    .bind(stream.as_uuid())
                    .fetch_optional(c)
                    .await
            })
            .await?;
        let Some(row) = row else {
            return Err(Error::TaskNotFound(stream));
        };
        let actual = version_from_db(row.try_get("version")?);
        let current_epoch: i64 = row.try_get("lease_epoch")?;
        match fence {
            Fence::Lease { epoch } if epoch != current_epoch => Err(Error::LeaseLost {
                task: stream,
                epoch,
            }),
            _ => Err(Error::Conflict {
                stream,
                expected,
                actual,
            }),
        }
    }

    /// If every event id is already stored in this stream at the position this append
    /// would have given it, returns the version after them.
    async fn already_stored(
        &self,
        stream: TaskId,
        expected: u32,
        events: &[NewEvent],
    ) -> Result<Option<u32>> {
        let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
        let rows = self
            .on_pool(async |c| {
                self.statement(
            "SELECT event_id, stream_id, stream_version FROM events WHERE event_id = ANY($1)",
        )
        .bind(&ids)
        .fetch_all(c).await
            })
            .await?;
        if rows.is_empty() {
            return Ok(None);
        }
        for (offset, event) in events.iter().enumerate() {
            let wanted = i64::from(expected) + offset as i64 + 1;
            let stored = rows
                .iter()
                .find(|r| r.try_get::<Uuid, _>("event_id").ok() == Some(event.event_id));
            let Some(stored) = stored else {
                return Ok(None);
            };
            let same_place = stored.try_get::<Uuid, _>("stream_id")? == stream.as_uuid()
                && i64::from(stored.try_get::<i32, _>("stream_version")?) == wanted;
            if !same_place {
                return Err(Error::EventIdReused {
                    event_id: event.event_id,
                });
            }
        }
        Ok(Some(expected + events.len() as u32))
    }

    /// Maps a failed append statement to a typed error. Unique violations mean a racing
    /// writer or a reused event id; anything else is a database error.
    async fn translate_insert_error(
        &self,
        err: sqlx::Error,
        stream: TaskId,
        expected: u32,
        events: &[NewEvent],
    ) -> Error {
        let constraint = match &err {
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                db.constraint().map(str::to_owned)
            }
            _ => return Error::Database(err),
        };
        match constraint.as_deref() {
            Some("events_event_id_key") => {
                match self.already_stored(stream, expected, events).await {
                    Err(e) => e,
                    Ok(_) => Error::EventIdReused {
                        event_id: events.first().map(|e| e.event_id).unwrap_or_default(),
                    },
                }
            }
            _ => {
                let actual = self.stream_version(stream).await.unwrap_or(expected);
                Error::Conflict {
                    stream,
                    expected,
                    actual,
                }
            }
        }
    }

    /// Several whole streams in one query, grouped by stream and in version order (for
    /// scans that walk many tasks a page at a time).
    pub async fn read_streams(&self, streams: &[TaskId]) -> Result<Vec<RecordedEvent>> {
        let ids: Vec<Uuid> = streams.iter().map(TaskId::as_uuid).collect();
        self.fetch_events(self.statement(READ_STREAMS_SQL).bind(ids))
            .await
    }

    /// The stream's events before `version` (to read up to an undecodable event).
    pub async fn read_stream_until(
        &self,
        stream: TaskId,
        version: u32,
    ) -> Result<Vec<RecordedEvent>> {
        let until = i32::try_from(version).unwrap_or(i32::MAX);
        self.fetch_events(
            self.statement(READ_STREAM_UNTIL_SQL)
                .bind(stream.as_uuid())
                .bind(until),
        )
        .await
    }

    /// The stream's current version as committed (0 if it has no events).
    pub async fn stream_version(&self, stream: TaskId) -> Result<u32> {
        let version: Option<i32> = self
            .on_pool(async |c| {
                self.scalar("SELECT max(stream_version) FROM events WHERE stream_id = $1")
                    .bind(stream.as_uuid())
                    .fetch_one(c)
                    .await
            })
            .await?;
        Ok(version.map(version_from_db).unwrap_or(0))
    }

    async fn existing_task(&self, task: &NewTask) -> Result<Created> {
        let row = self
            .on_pool(async |c| {
                self.statement(
                    "SELECT t.id, t.workflow, t.channel_id, t.idempotency_key, \
                    COALESCE(e.payload -> 'input', t.archive_summary -> 'input') AS input \
             FROM tasks t LEFT JOIN events e ON e.stream_id = t.id AND e.stream_version = 1 \
             WHERE t.id = $1 OR t.idempotency_key = $2 \
             ORDER BY (t.idempotency_key IS NOT DISTINCT FROM $2) DESC LIMIT 1",
                )
                .bind(task.id.as_uuid())
                .bind(task.idempotency_key.as_deref())
                .fetch_optional(c)
                .await
            })
            .await?;
        let Some(row) = row else {
            // The conflicting insert rolled back meanwhile: the caller may simply retry.
            return Err(Error::Conflict {
                stream: task.id,
                expected: 0,
                actual: 0,
            });
        };
        let existing = TaskId::from(row.try_get::<Uuid, _>("id")?);
        // An archived task's input was kept on its row when its stream left the log.
        let same = row.try_get::<String, _>("workflow")? == task.workflow
            && row.try_get::<String, _>("channel_id")? == task.channel_id.as_str()
            && row.try_get::<Option<Value>, _>("input")?.as_ref() == Some(&task.input);
        match (&task.idempotency_key, same) {
            (_, true) => Ok(Created::Existing(existing)),
            (Some(key), false)
                if row
                    .try_get::<Option<String>, _>("idempotency_key")?
                    .as_ref()
                    == Some(key) =>
            {
                Err(Error::IdempotencyKeyReused {
                    key: truncate_for_display(key, 80),
                    existing,
                })
            }
            _ => Err(Error::Conflict {
                stream: task.id,
                expected: 0,
                actual: 1,
            }),
        }
    }

    /// Up to `limit` committed events after `checkpoint` in global order (gap-safe, like
    /// [`PgStore::read_all_after`]), decoding only those whose type is in `types` (every
    /// type when `None`). Each matching row decodes on its own, so one undecodable event is
    /// an `Err` in its place rather than a failed page; [`LogPage::end`] covers every row
    /// scanned, matching or not.
    pub async fn read_page(
        &self,
        checkpoint: Checkpoint,
        limit: u32,
        types: Option<&[&str]>,
    ) -> Result<LogPage> {
        let rows = self
            .on_pool(async |c| {
                self.statement(READ_PAGE_SQL)
                    .bind(checkpoint.tx_id.to_string())
                    .bind(checkpoint.position)
                    .bind(i64::from(limit))
                    .bind(types)
                    .fetch_all(c)
                    .await
            })
            .await?;
        let mut page = LogPage {
            events: Vec::new(),
            end: None,
            scanned: rows.len(),
        };
        for row in &rows {
            let global_position: i64 = row.try_get("global_position")?;
            let tx_id: i64 = row.try_get("tx_id")?;
            page.end = Some(Checkpoint {
                tx_id: u64::try_from(tx_id).unwrap_or(0),
                position: global_position,
            });
            if row.try_get::<Option<String>, _>("payload")?.is_some() {
                page.events.push(
                    <EventRow as sqlx::FromRow<_>>::from_row(row)
                        .map_err(Error::from)
                        .and_then(EventRow::decode),
                );
            }
        }
        Ok(page)
    }

    async fn fetch_events(
        &self,
        query: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<Vec<RecordedEvent>> {
        let rows = self.on_pool(async |c| query.fetch_all(c).await).await?;
        rows.iter()
            .map(|row| {
                <EventRow as sqlx::FromRow<_>>::from_row(row)
                    .map_err(Error::from)
                    .and_then(EventRow::decode)
            })
            .collect()
    }
}

/// Writing and reading one task's stream.
impl PgStore {
    /// Creates a task: its `task_submitted` event (version 1) and its `tasks` row,
    /// atomically. With an idempotency key, a repeat returns the existing task.
    pub async fn create_task(&self, task: NewTask) -> Result<Created> {
        let span = tracing::info_span!(
            "reel.submit",
            reel.task_id = %task.id,
            reel.workflow = %task.workflow,
            reel.channel = %task.channel_id,
            reel.existing = tracing::field::Empty,
        );
        if let Some(parent) = &task.trace {
            crate::telemetry::set_parent(&span, parent);
        }
        let created = self
            .create_task_in(task, &span)
            .instrument(span.clone())
            .await;
        // A repeat with an idempotency key names the task that exists (its trace is the
        // first submit's).
        if let Ok(created) = &created {
            span.record("reel.task_id", tracing::field::display(created.task_id()));
            span.record("reel.existing", matches!(created, Created::Existing(_)));
        }
        created
    }

    async fn create_task_in(&self, task: NewTask, span: &tracing::Span) -> Result<Created> {
        if let Some(key) = &task.idempotency_key
            && (key.is_empty() || key.chars().count() > NewTask::IDEMPOTENCY_KEY_MAX_CHARS)
        {
            return Err(Error::InvalidInput(format!(
                "an idempotency key is 1 to {} characters",
                NewTask::IDEMPOTENCY_KEY_MAX_CHARS
            )));
        }
        if crate::outputs::too_deep(&task.input) {
            return Err(Error::InvalidInput(format!(
                "a task's input nests deeper than {} levels (the log could not read it back)",
                crate::outputs::JSON_DEPTH_MAX
            )));
        }
        if let Some(version) = task.workflow_version
            && (version == 0 || i32::try_from(version).is_err())
        {
            return Err(Error::InvalidInput(format!(
                "a workflow version is 1 to {}, not {version}",
                i32::MAX
            )));
        }
        let submitted = Event::TaskSubmitted {
            workflow: task.workflow.clone(),
            channel_id: task.channel_id.clone(),
            input: task.input.clone(),
            notion_page_id: task.notion_page_id.clone(),
            idempotency_key: task.idempotency_key.clone(),
            workflow_version: task.workflow_version,
        };
        let (_, payload) = submitted.encode()?;
        let schema_version = submitted.schema_version();
        // Deterministic: a retried create after a lost acknowledgement writes nothing new.
        let event_id = Uuid::new_v5(&task.id.as_uuid(), b"task_submitted");
        let mut metadata = crate::event::EventMetadata::default();
        // The submit's own span (a child of `task.trace` or of the caller's span) when an
        // OpenTelemetry layer records it; else the given parent, if any.
        if let Some(trace) = TraceContext::of_span(span).or_else(|| task.trace.clone()) {
            trace.write_to(&mut metadata);
        }
        let metadata = serde_json::to_value(&metadata)?;
        let row = self
            .on_pool(async |c| {
                self.statement(CREATE_TASK_SQL)
                    .bind(task.id.as_uuid())
                    .bind(&task.workflow)
                    .bind(task.channel_id.as_str())
                    .bind(task.notion_page_id.as_deref())
                    .bind(task.idempotency_key.as_deref())
                    .bind(event_id)
                    .bind(schema_version)
                    .bind(payload)
                    .bind(EVENTS_CHANNEL)
                    .bind(i32::try_from(task.workflow_version.unwrap_or(1)).unwrap_or(1))
                    .bind(&metadata)
                    .fetch_one(c)
                    .await
            })
            .await?;
        if row.try_get::<i64, _>("created")? == 1 {
            return Ok(Created::New(task.id));
        }
        self.existing_task(&task).await
    }

    /// Appends `events` at `expected_version + 1 ..` in one short transaction, if the
    /// stream is at `expected_version` and the fence holds. Errors: `Conflict`,
    /// `LeaseLost`, `TaskNotFound`, `EventIdReused`; a failed append writes nothing.
    pub async fn append(
        &self,
        stream: TaskId,
        expected_version: u32,
        fence: Fence,
        events: &[NewEvent],
    ) -> Result<Appended> {
        if self.named {
            let mut conn = self.pool.acquire().await?;
            return self
                .append_in(&mut conn, stream, expected_version, fence, events)
                .await;
        }
        // Behind a transaction pooler: the statement in a transaction of its own (see
        // `on_pool`); a refused append rolls back as the transaction is dropped.
        let mut tx = self.pool.begin().await?;
        let appended = self
            .append_in(&mut tx, stream, expected_version, fence, events)
            .await?;
        tx.commit().await?;
        Ok(appended)
    }

    /// The stream's events with version ≥ `from_version`, in version order.
    pub async fn read_stream(
        &self,
        stream: TaskId,
        from_version: u32,
    ) -> Result<Vec<RecordedEvent>> {
        let from = i32::try_from(from_version).unwrap_or(i32::MAX);
        self.fetch_events(
            self.statement(READ_STREAM_SQL)
                .bind(stream.as_uuid())
                .bind(from),
        )
        .await
    }
}

/// Reading every stream in one global order, gap-safely.
impl PgStore {
    /// Up to `limit` committed events after `checkpoint`, ordered by `(tx_id,
    /// global_position)`, never returning an event while an older transaction might still
    /// commit before it.
    pub async fn read_all_after(
        &self,
        checkpoint: Checkpoint,
        limit: u32,
    ) -> Result<Vec<RecordedEvent>> {
        self.read_page(checkpoint, limit, None)
            .await?
            .events
            .into_iter()
            .collect()
    }
}

fn version_from_db(version: i32) -> u32 {
    u32::try_from(version).unwrap_or(0)
}

/// The events of one append, as the column arrays the statement unnests.
pub(super) struct EncodedBatch {
    pub(super) expected: i32,
    pub(super) len: u32,
    pub(super) event_ids: Vec<Uuid>,
    pub(super) event_types: Vec<&'static str>,
    pub(super) schema_versions: Vec<i16>,
    pub(super) payloads: Vec<Value>,
    pub(super) metadata: Vec<Value>,
}

impl EncodedBatch {
    pub(super) fn new(stream: TaskId, expected_version: u32, events: &[NewEvent]) -> Result<Self> {
        if events.is_empty() {
            return Err(Error::InvalidInput(format!(
                "empty append to task {stream}"
            )));
        }
        let len = u32::try_from(events.len())
            .map_err(|_| Error::InvalidInput("append too large".into()))?;
        let expected = i32::try_from(expected_version)
            .ok()
            .filter(|v| v.checked_add(len as i32).is_some())
            .ok_or_else(|| {
                Error::InvalidInput(format!("stream version overflow on task {stream}"))
            })?;
        let mut batch = EncodedBatch {
            expected,
            len,
            event_ids: Vec::with_capacity(events.len()),
            event_types: Vec::with_capacity(events.len()),
            schema_versions: Vec::with_capacity(events.len()),
            payloads: Vec::with_capacity(events.len()),
            metadata: Vec::with_capacity(events.len()),
        };
        for new in events {
            let (event_type, payload) = new.event.encode()?;
            batch.event_ids.push(new.event_id);
            batch.event_types.push(event_type);
            batch.schema_versions.push(new.event.schema_version());
            batch.payloads.push(payload);
            batch.metadata.push(serde_json::to_value(&new.metadata)?);
        }
        Ok(batch)
    }
}

/// How a batch of events changes the derived `tasks` row (kept in the append's statement).
#[derive(Debug, Default)]
pub(super) struct RowChange {
    pub(super) status: Option<TaskStatus>,
    /// The new status's display name, when the event records one.
    pub(super) status_display: Option<String>,
    /// `Some(x)`: set `next_run_at` to `x`.
    pub(super) next_run_at: Option<Option<DateTime<Utc>>>,
    pub(super) last_error: Option<String>,
    pub(super) release_lease: bool,
    pub(super) attempt: Option<i32>,
    /// `Some(x)`: set `parked` to `x`.
    pub(super) parked: Option<bool>,
    /// The batch holds an event followers wait for: the append notifies them at commit.
    pub(super) wakes: bool,
    /// The batch holds more than a claim: its writer could read the history, so the task
    /// is no longer set aside as unreadable.
    pub(super) readable: bool,
    /// The task moved to this workflow version (`task_upgraded`).
    pub(super) workflow_version: Option<i32>,
    /// Signals the batch records (`signal_received`).
    pub(super) signals_seen: i32,
    /// The batch parks the task for a wait (no job open, nothing waiting for room): it is
    /// due at once if signals were sent that the log does not hold.
    pub(super) wait_park: bool,
}

impl RowChange {
    pub(super) fn from_events(events: &[NewEvent]) -> Self {
        let mut change = RowChange::default();
        for new in events {
            change.wakes |= new.event.wakes_followers();
            change.readable |= !matches!(new.event, Event::TaskClaimed { .. });
            match &new.event {
                Event::StatusChanged { to, to_display, .. } => {
                    change.status = Some(*to);
                    change.status_display.clone_from(to_display);
                    if *to == TaskStatus::QUEUED {
                        // Sent back to the queue (review rejected, operator retry): run now,
                        // a new attempt (a retry may come while the task settles its jobs).
                        change.next_run_at = Some(None);
                        change.parked = Some(false);
                    }
                }
                Event::TaskClaimed { attempt, .. } => {
                    change.attempt = i32::try_from(*attempt).ok();
                    change.next_run_at = Some(None);
                    change.parked = Some(false);
                }
                Event::SignalReceived { .. } => change.signals_seen += 1,
                Event::TaskParked {
                    until,
                    jobs,
                    waiting,
                    ..
                } => {
                    change.wait_park = *jobs == 0 && *waiting == 0;
                    change.next_run_at = Some(Some(*until));
                    change.release_lease = true;
                    change.parked = Some(true);
                }
                Event::RetryScheduled {
                    next_run_at,
                    reason,
                    ..
                } => {
                    change.next_run_at = Some(Some(*next_run_at));
                    change.last_error = Some(truncate_for_display(reason, LAST_ERROR_MAX_CHARS));
                    change.release_lease = true;
                }
                Event::ItemFailed { error, .. } => {
                    change.last_error = Some(truncate_for_display(error, LAST_ERROR_MAX_CHARS));
                }
                Event::TaskFailed { reason, .. } => {
                    change.last_error = Some(truncate_for_display(reason, LAST_ERROR_MAX_CHARS));
                    change.release_lease = true;
                    // No longer waiting: a park that follows (to settle open jobs) sets
                    // it again.
                    change.parked = Some(false);
                }
                Event::TaskCancelled { .. } => {
                    change.release_lease = true;
                    change.parked = Some(false);
                }
                Event::ReviewRequested {} | Event::TaskCompleted {} => {
                    change.release_lease = true;
                }
                Event::TaskUpgraded { to, .. } => {
                    change.workflow_version = i32::try_from(*to).ok();
                }
                _ => {}
            }
        }
        change
    }
}
