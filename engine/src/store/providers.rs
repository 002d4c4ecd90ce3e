//! Provider limits across the fleet: the jobs or calls in flight at each provider key, its
//! request rate, and the pause a 429 put on it — kept in PostgreSQL, so any number of
//! worker processes together stay under them.
//!
//! A slot is a leased row of `provider_slots` (a crashed worker's rows expire). Items ask
//! for slots in batches; a batch is granted in the order of the fleet-wide queue (task age,
//! then task, step and item), so a newer task never overtakes an older one waiting at a
//! saturated provider. Acquisitions of one key serialise on its `provider_keys` row.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::{EVENTS_CHANNEL, PgStore};
use crate::error::Result;
use crate::id::{ChannelId, TaskId};

/// Where an item's slot request comes from.
#[derive(Clone, Copy, Debug)]
pub struct SlotOwner<'a> {
    pub task: TaskId,
    pub step: &'a str,
    /// The worker holding the task (whose heartbeats keep the rows alive).
    pub holder: &'a str,
}

/// A provider key as the fleet sees it now (the console's providers page).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ProviderOverview {
    pub key: String,
    /// Jobs or calls in flight (granted slots, unanswered submits included).
    pub in_flight: u64,
    /// Items waiting for a slot, fleet-wide.
    pub waiting: u64,
    /// No request goes out before this (a provider's Retry-After), if it is still ahead.
    pub paused_until: Option<DateTime<Utc>>,
    /// The request bucket as last written (`None`: no request taken yet), and how long ago.
    pub tokens: Option<f64>,
    pub refilled_secs_ago: Option<f64>,
    /// The limits live workers apply to this key, each with how many workers apply it:
    /// more than one entry means the workers disagree. Empty: no live worker calls it.
    pub applied: Vec<AppliedLimits>,
    /// The head of the waiting queue (in grant order), of the tasks the caller may see.
    pub queue: Vec<QueuedItems>,
}

impl ProviderOverview {
    /// The rate, when every live worker applies the same one.
    pub fn rate(&self) -> Option<f64> {
        match self.applied.as_slice() {
            [only] => only.rate,
            _ => None,
        }
    }

    /// The request tokens available now, refilled at the rate the workers agree on.
    pub fn tokens_now(&self) -> Option<f64> {
        let (tokens, ago, rate) = (self.tokens?, self.refilled_secs_ago?, self.rate()?);
        Some((tokens + rate * ago.max(0.0)).min(rate.max(1.0)))
    }
}

/// One set of limits applied to a key, and how many live workers apply it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AppliedLimits {
    pub max_in_flight: Option<u32>,
    pub rate: Option<f64>,
    pub workers: u32,
}

/// Items of one task's step waiting for slots of a key.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct QueuedItems {
    /// Its place in the whole queue (1: next), counting waiters the caller may not see.
    pub place: u64,
    pub task: TaskId,
    pub step: String,
    pub items: u32,
    /// Its place in the queue: the task's age.
    pub since: DateTime<Utc>,
}

// Every key known to the slots table or to a live worker; counts are fleet-wide, the queue
// lists only tasks of the channels `$1` (empty: all), at most `$2` entries per key, each
// with its place in the whole queue.
const OVERVIEW_SQL: &str = r#"
WITH keys AS (
    SELECT key FROM provider_keys
    UNION
    SELECT jsonb_object_keys(providers) FROM workers WHERE expires_at > now()
)
SELECT keys.key,
       (SELECT count(*) FROM provider_slots s
         WHERE s.key = keys.key AND s.granted AND s.expires_at > now()) AS in_flight,
       (SELECT count(*) FROM provider_slots s
         WHERE s.key = keys.key AND NOT s.granted AND s.expires_at > now()) AS waiting,
       CASE WHEN k.paused_until > now() THEN k.paused_until END AS paused_until,
       k.tokens,
       extract(epoch FROM now() - k.refilled_at)::float8 AS refilled_secs_ago,
       COALESCE((SELECT jsonb_agg(l.limits || jsonb_build_object('workers', l.n)
                                  ORDER BY l.n DESC, l.limits::text)
                   FROM (SELECT w.providers -> keys.key AS limits, count(*) AS n
                           FROM workers w
                          WHERE w.expires_at > now() AND w.providers ? keys.key
                          GROUP BY 1) AS l), '[]'::jsonb) AS applied,
       COALESCE((SELECT jsonb_agg(jsonb_build_object('place', q.place, 'task', q.task_id,
                                                     'step', q.step, 'items', q.n,
                                                     'since', q.since)
                                  ORDER BY q.place)
                   FROM (SELECT w.*, t.channel_id FROM (
                            SELECT s.task_id, s.step, count(*) AS n, min(s.priority) AS since,
                                   row_number() OVER (ORDER BY min(s.priority), s.task_id, s.step)
                                       AS place
                              FROM provider_slots s
                             WHERE s.key = keys.key AND NOT s.granted AND s.expires_at > now()
                             GROUP BY s.task_id, s.step) AS w
                         JOIN tasks t ON t.id = w.task_id
                         WHERE cardinality($1::text[]) = 0 OR t.channel_id = ANY($1)
                         ORDER BY w.place
                         LIMIT $2) AS q), '[]'::jsonb) AS queue
FROM keys LEFT JOIN provider_keys k ON k.key = keys.key
ORDER BY keys.key
"#;

const ENSURE_KEY_SQL: &str = "INSERT INTO provider_keys (key) VALUES ($1) ON CONFLICT DO NOTHING";

// Locks the key's row: acquisitions, releases and the look for room after a park take
// their turns on it, and each statement after it sees what the one before it committed
// (so a freed slot and a waiter that is parking can never miss each other).
const LOCK_KEY_SQL: &str = "SELECT 1 FROM provider_keys WHERE key = $1 FOR UPDATE";

// Times are the database's: `expires_at` is `$8` (or now) plus `$5` seconds, and never
// sooner than `$9` seconds from now.
const REGISTER_SQL: &str = r#"
INSERT INTO provider_slots (key, task_id, step, item, priority, granted, holder, expires_at)
SELECT $1, $2, $3, i,
       COALESCE((SELECT created_at FROM tasks WHERE id = $2), now()),
       $6, $4,
       GREATEST(COALESCE($8::timestamptz, now()) + make_interval(secs => $5),
                now() + make_interval(secs => $9))
FROM unnest($7::int[]) AS i
ON CONFLICT (key, task_id, step, item, unanswered) DO UPDATE SET
    holder     = excluded.holder,
    -- A granted row may stand for a job in flight: never shorten its life.
    expires_at = CASE WHEN provider_slots.granted
                      THEN GREATEST(provider_slots.expires_at, excluded.expires_at)
                      ELSE excluded.expires_at END,
    granted    = provider_slots.granted OR excluded.granted
"#;

// Grants this task's waiting rows that fall within the free slots, counting every older
// waiter (of any task) ahead of them: the queue is fleet-wide and ordered by task age.
// Every granted row counts, the ones kept for unanswered submits included.
const GRANT_SQL: &str = r#"
WITH held AS (
    SELECT count(*) AS n FROM provider_slots WHERE key = $1 AND granted
), queue AS (
    SELECT task_id, step, item,
           row_number() OVER (ORDER BY priority, task_id, step, item) AS place
    FROM provider_slots WHERE key = $1 AND NOT granted
)
UPDATE provider_slots AS s SET granted = true
FROM queue, held
WHERE s.key = $1 AND s.task_id = $2 AND s.step = $3 AND s.unanswered = 0
  AND queue.task_id = s.task_id AND queue.step = s.step AND queue.item = s.item
  AND held.n + queue.place <= $4
"#;

const GRANTED_SQL: &str = "SELECT item FROM provider_slots \
     WHERE key = $1 AND task_id = $2 AND step = $3 AND unanswered = 0 AND granted \
       AND item = ANY($4) ORDER BY item";

// The parked tasks at the head of the key's queue: the owners of the first `$3` waiting
// rows (`$2`: a task left out). Their next claim becomes due now, and workers hear of it.
const WAKE_HEAD_SQL: &str = r#"
WITH head AS (
    SELECT task_id FROM provider_slots
    WHERE key = $1 AND NOT granted AND expires_at >= now() AND task_id IS DISTINCT FROM $2
    ORDER BY priority, task_id, step, item
    LIMIT $3
), next AS (
    SELECT DISTINCT task_id FROM head
), woken AS (
    UPDATE tasks SET next_run_at = now()
    FROM next
    WHERE tasks.id = next.task_id AND tasks.parked AND tasks.lease_owner IS NULL
      AND tasks.next_run_at > now()
    RETURNING tasks.id
)
SELECT count(*) AS woken FROM (SELECT pg_notify($4, '') FROM woken) AS n
"#;

// After a park: wakes the task again at once if, by now, one of its waiting rows of the
// key would be granted (a slot freed between its last look and its park).
const ROOM_NOW_SQL: &str = r#"
WITH held AS (
    SELECT count(*) AS n FROM provider_slots WHERE key = $1 AND granted
), queue AS (
    SELECT task_id, row_number() OVER (ORDER BY priority, task_id, step, item) AS place
    FROM provider_slots WHERE key = $1 AND NOT granted AND expires_at >= now()
), woken AS (
    UPDATE tasks SET next_run_at = now()
    WHERE tasks.id = $2 AND tasks.parked AND tasks.lease_owner IS NULL
      AND tasks.next_run_at > now()
      AND EXISTS (SELECT 1 FROM queue, held
                  WHERE queue.task_id = $2 AND held.n + queue.place <= $3)
    RETURNING tasks.id
)
SELECT count(*) AS woken FROM (SELECT pg_notify($4, '') FROM woken) AS n
"#;

// One request of the key's rate: refill the bucket (burst: one second's worth, at least
// one request), then take a token unless the bucket is short or the key is paused.
const TAKE_REQUEST_SQL: &str = r#"
WITH k AS (
    SELECT key,
           LEAST(GREATEST($2::float8, 1.0),
                 tokens + $2::float8 * EXTRACT(EPOCH FROM now() - refilled_at)::float8) AS avail,
           COALESCE(EXTRACT(EPOCH FROM paused_until - now())::float8, 0.0) AS paused_for
    FROM provider_keys WHERE key = $1
    FOR UPDATE
)
UPDATE provider_keys AS p SET
    tokens      = CASE WHEN k.avail >= 1.0 AND k.paused_for <= 0.0 THEN k.avail - 1.0 ELSE k.avail END,
    refilled_at = now()
FROM k
WHERE p.key = k.key
RETURNING k.avail >= 1.0 AND k.paused_for <= 0.0 AS granted,
          GREATEST(k.paused_for, (1.0 - k.avail) / GREATEST($2::float8, 1e-9)) AS wait_secs
"#;

impl PgStore {
    /// Every provider key: in flight, waiting, paused until, the request bucket, the
    /// limits live workers apply, and the head of its queue (at most `queue` entries) among
    /// the tasks of `channels` (empty: every channel).
    pub async fn provider_overview(
        &self,
        channels: &[ChannelId],
        queue: u32,
    ) -> Result<Vec<ProviderOverview>> {
        let channels: Vec<&str> = channels.iter().map(ChannelId::as_str).collect();
        let rows = self
            .on_pool(async |c| {
                self.statement(OVERVIEW_SQL)
                    .bind(&channels)
                    .bind(i64::from(queue))
                    .fetch_all(c)
                    .await
            })
            .await?;
        fn decode<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T> {
            serde_json::from_value(value).map_err(|e| sqlx::Error::Decode(e.into()).into())
        }
        rows.into_iter()
            .map(|row| {
                Ok(ProviderOverview {
                    key: row.try_get("key")?,
                    in_flight: u64::try_from(row.try_get::<i64, _>("in_flight")?).unwrap_or(0),
                    waiting: u64::try_from(row.try_get::<i64, _>("waiting")?).unwrap_or(0),
                    paused_until: row.try_get("paused_until")?,
                    tokens: row.try_get("tokens")?,
                    refilled_secs_ago: row.try_get("refilled_secs_ago")?,
                    applied: decode(row.try_get("applied")?)?,
                    queue: decode(row.try_get("queue")?)?,
                })
            })
            .collect()
    }

    /// Asks for a slot of `key` (at most `cap` in flight fleet-wide) for each of `items`,
    /// in order, and returns the items granted (already granted ones included). The
    /// others stay queued as waiters for `ttl`, holding their place for the task.
    pub async fn acquire_slots(
        &self,
        key: &str,
        cap: u32,
        owner: SlotOwner<'_>,
        items: &[u32],
        ttl: Duration,
    ) -> Result<Vec<u32>> {
        let items = to_i32(items);
        let mut tx = self.pool().begin().await?;
        self.statement(ENSURE_KEY_SQL)
            .bind(key)
            .execute(&mut *tx)
            .await?;
        self.statement(LOCK_KEY_SQL)
            .bind(key)
            .execute(&mut *tx)
            .await?;
        // Expired rows, and places still held by tasks that ended (a cancel while parked).
        self.statement(
            "DELETE FROM provider_slots AS s WHERE s.key = $1 AND (s.expires_at < now() \
               OR (NOT s.granted AND EXISTS (SELECT 1 FROM tasks t WHERE t.id = s.task_id \
                   AND t.status IN ('completed', 'failed', 'cancelled'))))",
        )
        .bind(key)
        .execute(&mut *tx)
        .await?;
        register(
            self,
            &mut tx,
            key,
            owner,
            &items,
            Life::from_now(ttl),
            false,
        )
        .await?;
        self.statement(GRANT_SQL)
            .bind(key)
            .bind(owner.task.as_uuid())
            .bind(owner.step)
            .bind(i64::from(cap))
            .execute(&mut *tx)
            .await?;
        let granted: Vec<i32> = self
            .scalar(GRANTED_SQL)
            .bind(key)
            .bind(owner.task.as_uuid())
            .bind(owner.step)
            .bind(&items)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(granted
            .into_iter()
            .filter_map(|i| u32::try_from(i).ok())
            .collect())
    }

    /// Records slots of `key` as held by `items`, whatever the cap: their jobs are in
    /// flight at the provider (a submission just recorded, or a resumed run's open ones),
    /// and the count must say so. Each is held until `life` after `since` (the database's
    /// now when `None`), and at least [`SLOT_TTL`](crate::SLOT_TTL) from now; a slot
    /// already held longer keeps its time.
    pub async fn hold_slots(
        &self,
        key: &str,
        owner: SlotOwner<'_>,
        items: &[u32],
        life: Duration,
        since: Option<DateTime<Utc>>,
    ) -> Result<()> {
        if items.is_empty() {
            return Ok(());
        }
        let items = to_i32(items);
        let mut tx = self.pool().begin().await?;
        self.statement(ENSURE_KEY_SQL)
            .bind(key)
            .execute(&mut *tx)
            .await?;
        let life = Life {
            secs: life.as_secs_f64(),
            since,
            floor_secs: crate::SLOT_TTL.as_secs_f64(),
        };
        register(self, &mut tx, key, owner, &items, life, true).await?;
        tx.commit().await?;
        Ok(())
    }

    /// A submit of `item` got no answer (a timeout, a dropped connection): the provider
    /// may have started the job, and charges for it. Its item's slot becomes the lost
    /// job's, a row of its own held for `life` (the job's expected life) whatever happens
    /// to the task, so the cap keeps counting it; the item asks for a slot anew if it
    /// submits again.
    pub async fn keep_slot_for_unanswered(
        &self,
        key: &str,
        owner: SlotOwner<'_>,
        item: u32,
        life: Duration,
    ) -> Result<()> {
        let item = i32::try_from(item).unwrap_or(i32::MAX);
        let mut tx = self.pool().begin().await?;
        self.statement(ENSURE_KEY_SQL)
            .bind(key)
            .execute(&mut *tx)
            .await?;
        self.statement(LOCK_KEY_SQL)
            .bind(key)
            .execute(&mut *tx)
            .await?;
        self.statement(
            "INSERT INTO provider_slots \
                 (key, task_id, step, item, unanswered, priority, granted, holder, expires_at) \
             SELECT $1, $2, $3, $4, \
                    (SELECT COALESCE(max(unanswered), 0) + 1 FROM provider_slots \
                     WHERE key = $1 AND task_id = $2 AND step = $3 AND item = $4), \
                    now(), true, $5, now() + make_interval(secs => $6)",
        )
        .bind(key)
        .bind(owner.task.as_uuid())
        .bind(owner.step)
        .bind(item)
        .bind(owner.holder)
        .bind(life.as_secs_f64())
        .execute(&mut *tx)
        .await?;
        // The item's own row goes: its slot is the lost job's now.
        self.statement(
            "DELETE FROM provider_slots \
             WHERE key = $1 AND task_id = $2 AND step = $3 AND item = $4 AND unanswered = 0",
        )
        .bind(key)
        .bind(owner.task.as_uuid())
        .bind(owner.step)
        .bind(item)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Frees `item`'s slot of `key` (its job or call ended), waking the parked tasks at
    /// the head of the key's queue (as many waiting items as the cap admits).
    pub async fn release_slot(
        &self,
        key: &str,
        cap: u32,
        task: TaskId,
        step: &str,
        item: u32,
    ) -> Result<()> {
        let mut tx = self.pool().begin().await?;
        self.statement(LOCK_KEY_SQL)
            .bind(key)
            .execute(&mut *tx)
            .await?;
        let gone: Option<bool> = self
            .scalar(
                "DELETE FROM provider_slots \
             WHERE key = $1 AND task_id = $2 AND step = $3 AND item = $4 AND unanswered = 0 \
             RETURNING granted",
            )
            .bind(key)
            .bind(task.as_uuid())
            .bind(step)
            .bind(i32::try_from(item).unwrap_or(i32::MAX))
            .fetch_optional(&mut *tx)
            .await?;
        if gone == Some(true) {
            wake_head(self, &mut tx, key, Some(task), cap).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// A call step's run of `task` ended with none of its items in flight: the slots of
    /// `key` its items still hold — granted to an item that had given up waiting, by a
    /// sibling's look for room — go back to the queue (`keep_places`: the task parks
    /// waiting for room, and its places stand) or away, and the freed room wakes the
    /// parked tasks at the head of the queue. A parked task never holds room it does not
    /// use. Only rows `holder` registered last are touched (a worker that lost the task
    /// leaves the new owner's alone), and, whoever held them, those of items the log holds
    /// complete; slots kept for unanswered calls stay.
    pub async fn settle_call_slots(
        &self,
        key: &str,
        cap: u32,
        task: TaskId,
        step: &str,
        holder: &str,
        keep_places: bool,
    ) -> Result<()> {
        let mut tx = self.pool().begin().await?;
        self.statement(LOCK_KEY_SQL)
            .bind(key)
            .execute(&mut *tx)
            .await?;
        let sql = if keep_places {
            "WITH freed AS (UPDATE provider_slots SET granted = false \
               WHERE key = $1 AND task_id = $2 AND step = $3 AND granted AND unanswered = 0 \
                 AND holder = $4 \
               RETURNING 1) SELECT count(*) FROM freed"
        } else {
            "WITH freed AS (DELETE FROM provider_slots \
               WHERE key = $1 AND task_id = $2 AND step = $3 AND unanswered = 0 \
                 AND holder = $4 \
               RETURNING granted) SELECT count(*) FILTER (WHERE granted) FROM freed"
        };
        let mut freed: i64 = self
            .scalar(sql)
            .bind(key)
            .bind(task.as_uuid())
            .bind(step)
            .bind(holder)
            .fetch_one(&mut *tx)
            .await?;
        // Whoever held them: the slots of items the log holds complete (a worker that died
        // between an item's completion and its release; nothing of it is in flight).
        freed += self
            .scalar::<i64>(
                "WITH freed AS (DELETE FROM provider_slots s \
                   WHERE s.key = $1 AND s.task_id = $2 AND s.step = $3 AND s.unanswered = 0 \
                     AND EXISTS (SELECT 1 FROM events e WHERE e.stream_id = s.task_id \
                       AND e.event_type = 'item_completed' AND e.payload->>'step' = s.step \
                       AND e.payload->>'item' = s.item::text) \
                   RETURNING granted) SELECT count(*) FILTER (WHERE granted) FROM freed",
            )
            .bind(key)
            .bind(task.as_uuid())
            .bind(step)
            .fetch_one(&mut *tx)
            .await?;
        if freed > 0 {
            wake_head(self, &mut tx, key, Some(task), cap).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// After `task` parked waiting for room at `key`: if a slot freed meanwhile (between
    /// its last look and its park, when no release could see it parked), wakes it now.
    /// Returns whether it was woken.
    pub async fn wake_if_room(&self, key: &str, cap: u32, task: TaskId) -> Result<bool> {
        let mut tx = self.pool().begin().await?;
        self.statement(LOCK_KEY_SQL)
            .bind(key)
            .execute(&mut *tx)
            .await?;
        let woken: i64 = self
            .scalar(ROOM_NOW_SQL)
            .bind(key)
            .bind(task.as_uuid())
            .bind(i64::from(cap))
            .bind(EVENTS_CHANNEL)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(woken > 0)
    }

    /// When room may next appear at `key` without anyone releasing it: the earliest end of
    /// a slot kept for an unanswered submit (those lapse rather than being released).
    pub async fn next_lapse(&self, key: &str) -> Result<Option<DateTime<Utc>>> {
        self.on_pool(async |c| {
            self.scalar(
                "SELECT min(expires_at) FROM provider_slots \
             WHERE key = $1 AND granted AND unanswered > 0 AND expires_at >= now()",
            )
            .bind(key)
            .fetch_one(c)
            .await
        })
        .await
    }

    /// Drops the task's waiting rows (its run no longer asks for those slots, or it was
    /// cancelled).
    pub async fn withdraw_waiting(&self, task: TaskId) -> Result<()> {
        self.on_pool(async |c| {
            self.statement("DELETE FROM provider_slots WHERE task_id = $1 AND NOT granted")
                .bind(task.as_uuid())
                .execute(c)
                .await
        })
        .await?;
        Ok(())
    }

    /// Frees the task's slots and places but those of its open jobs (`open`: step and
    /// item): a task that ended with jobs open keeps counting them, and nothing else.
    pub async fn keep_only_job_slots(&self, task: TaskId, open: &[(String, u32)]) -> Result<()> {
        const KEEP_SQL: &str = "DELETE FROM provider_slots AS s WHERE s.task_id = $1 \
             AND s.unanswered = 0 \
             AND NOT EXISTS (SELECT 1 FROM unnest($2::text[], $3::int[]) AS o(step, item) \
                             WHERE o.step = s.step AND o.item = s.item)";
        let steps: Vec<&str> = open.iter().map(|(step, _)| step.as_str()).collect();
        let items: Vec<i32> = open
            .iter()
            .map(|(_, item)| i32::try_from(*item).unwrap_or(i32::MAX))
            .collect();
        self.on_pool(async |c| {
            self.statement(KEEP_SQL)
                .bind(task.as_uuid())
                .bind(&steps)
                .bind(&items)
                .execute(c)
                .await
        })
        .await?;
        Ok(())
    }

    /// Frees every slot and place the task holds for its items (its run ended for good);
    /// the slots kept for its unanswered submits stay until their jobs would have ended.
    pub async fn release_task_slots(&self, task: TaskId) -> Result<()> {
        self.on_pool(async |c| {
            self.statement("DELETE FROM provider_slots WHERE task_id = $1 AND unanswered = 0")
                .bind(task.as_uuid())
                .execute(c)
                .await
        })
        .await?;
        Ok(())
    }

    /// Keeps the task's slots and places until at least `keep` from now, by the database's
    /// clock (a heartbeat, or a park). Slots kept for unanswered submits keep their own end.
    pub async fn extend_slots(&self, task: TaskId, keep: Duration) -> Result<()> {
        self.on_pool(async |c| {
            self.statement(
                "UPDATE provider_slots \
             SET expires_at = GREATEST(expires_at, now() + make_interval(secs => $2)) \
             WHERE task_id = $1 AND unanswered = 0",
            )
            .bind(task.as_uuid())
            .bind(keep.as_secs_f64())
            .execute(c)
            .await
        })
        .await?;
        Ok(())
    }

    /// Takes one request of `key`'s rate (`per_second`; `None`: no rate limit, only the
    /// pause applies). `None` back: go now. `Some(wait)`: the bucket is empty or the key is
    /// paused; ask again after `wait`.
    pub async fn take_request(
        &self,
        key: &str,
        per_second: Option<f64>,
    ) -> Result<Option<Duration>> {
        let rate = per_second.filter(|r| *r > 0.0).unwrap_or(1e9);
        for _ in 0..2 {
            let row = self
                .on_pool(async |c| {
                    self.statement(TAKE_REQUEST_SQL)
                        .bind(key)
                        .bind(rate)
                        .fetch_optional(c)
                        .await
                })
                .await?;
            let Some(row) = row else {
                self.on_pool(async |c| self.statement(ENSURE_KEY_SQL).bind(key).execute(c).await)
                    .await?;
                continue;
            };
            if row.try_get::<bool, _>("granted")? {
                return Ok(None);
            }
            let wait: f64 = row.try_get("wait_secs")?;
            return Ok(Some(Duration::from_secs_f64(wait.clamp(0.001, 86_400.0))));
        }
        Ok(None)
    }

    /// Pauses `key` for every worker for `wait` from now, by the database's clock (a
    /// provider's Retry-After); a pause never shortens one already in place.
    pub async fn pause_provider(&self, key: &str, wait: Duration) -> Result<()> {
        self.on_pool(async |c| {
            self.statement(
                "INSERT INTO provider_keys (key, paused_until) \
             VALUES ($1, now() + make_interval(secs => $2)) \
             ON CONFLICT (key) DO UPDATE SET paused_until = \
                 GREATEST(provider_keys.paused_until, excluded.paused_until)",
            )
            .bind(key)
            .bind(wait.as_secs_f64().min(86_400.0 * 366.0))
            .execute(c)
            .await
        })
        .await?;
        Ok(())
    }

    /// Slots of `key` granted and not expired now (what the fleet has in flight there,
    /// the jobs of unanswered submits included).
    pub async fn provider_in_flight(&self, key: &str) -> Result<i64> {
        const IN_FLIGHT_SQL: &str = "SELECT count(*) FROM provider_slots WHERE key = $1 AND granted AND expires_at >= now()";
        self.on_pool(async |c| self.scalar(IN_FLIGHT_SQL).bind(key).fetch_one(c).await)
            .await
    }
}

/// How long a registered row lives, by the database's clock: `secs` after `since` (now
/// when `None`), and at least `floor_secs` from now.
struct Life {
    secs: f64,
    since: Option<DateTime<Utc>>,
    floor_secs: f64,
}

impl Life {
    fn from_now(ttl: Duration) -> Life {
        Life {
            secs: ttl.as_secs_f64(),
            since: None,
            floor_secs: 0.0,
        }
    }
}

async fn register(
    store: &PgStore,
    tx: &mut sqlx::PgConnection,
    key: &str,
    owner: SlotOwner<'_>,
    items: &[i32],
    life: Life,
    granted: bool,
) -> Result<()> {
    store
        .statement(REGISTER_SQL)
        .bind(key)
        .bind(owner.task.as_uuid())
        .bind(owner.step)
        .bind(owner.holder)
        .bind(life.secs)
        .bind(granted)
        .bind(items)
        .bind(life.since)
        .bind(life.floor_secs)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Wakes the parked owners of the first `cap` waiting rows of `key` (but `except`).
async fn wake_head(
    store: &PgStore,
    tx: &mut sqlx::PgConnection,
    key: &str,
    except: Option<TaskId>,
    cap: u32,
) -> Result<i64> {
    Ok(store
        .scalar(WAKE_HEAD_SQL)
        .bind(key)
        .bind(except.map(|t| t.as_uuid()))
        .bind(i64::from(cap))
        .bind(EVENTS_CHANNEL)
        .fetch_one(&mut *tx)
        .await?)
}

fn to_i32(items: &[u32]) -> Vec<i32> {
    items
        .iter()
        .map(|&i| i32::try_from(i).unwrap_or(i32::MAX))
        .collect()
}
