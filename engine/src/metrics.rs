//! A worker's metrics, in the OpenMetrics text format (`reel worker --metrics-listen`).
//!
//! Two kinds of figures:
//!
//! - What this process did, counted as it happens: runs by outcome, claims, items
//!   completed and failed (counted when their event is durable, so they equal the
//!   `item_completed` / `item_failed` events the process wrote), item durations, cost,
//!   append and claim latency, leases lost.
//! - What the database says, read at scrape time by one statement (tasks per status, the
//!   age of the oldest runnable task, the provider keys' slots, waits and tokens) and kept
//!   for [`DB_FIGURES_TTL`], so that many scrapers make one query every few seconds.
//!
//! Label values are bounded: workflow, step, channel, status, provider key, outcome and
//! error kind — never a task id.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::error::Result;
use crate::event::{Event, FailureKind};
use crate::store::PgStore;

/// How long the figures read from the database are served before a scrape reads them again.
pub const DB_FIGURES_TTL: Duration = Duration::from_secs(5);

/// How long a scrape waits for the database's figures before it serves the last ones.
const DB_READ_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkflowLabel {
    workflow: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunLabels {
    workflow: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    workflow: String,
    step: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    workflow: String,
    step: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CostLabels {
    workflow: String,
    channel: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLabel {
    key: String,
}

/// When the figures were last read from the database, and last tried.
#[derive(Debug, Default)]
struct DbFigures {
    /// The last read that succeeded.
    read_at: Option<Instant>,
    /// The last read tried (a failure waits out the time to live too, so that scrapes
    /// do not pile reads onto a database that is struggling).
    tried_at: Option<Instant>,
}

/// Every figure a worker exports. Share it (`Arc`) between the worker and the server that
/// renders it; counting is lock-free.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    claims: Family<WorkflowLabel, Counter>,
    runs: Family<RunLabels, Counter>,
    items_completed: Family<StepLabels, Counter>,
    items_failed: Family<FailureLabels, Counter>,
    item_seconds: Family<StepLabels, Histogram>,
    cost: Family<CostLabels, Counter<f64, AtomicU64>>,
    append_seconds: Histogram,
    claim_seconds: Histogram,
    leases_lost: Counter,
    tasks: Family<StatusLabel, Gauge>,
    oldest_runnable: Gauge<f64, AtomicU64>,
    provider_in_flight: Family<KeyLabel, Gauge>,
    provider_cap: Family<KeyLabel, Gauge>,
    provider_waiting: Family<KeyLabel, Gauge>,
    provider_paused_until: Family<KeyLabel, Gauge<f64, AtomicU64>>,
    provider_tokens: Family<KeyLabel, Gauge<f64, AtomicU64>>,
    db_figures_age: Gauge<f64, AtomicU64>,
    db_reads_failed: Counter,
    /// Caps this worker knows (its workflows' defaults and its overrides), by key.
    caps: std::sync::Mutex<BTreeMap<String, u32>>,
    db: tokio::sync::Mutex<DbFigures>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Latency buckets from 0.5 ms to about 8 s.
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 15))
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("reel");
        let metrics = Metrics {
            claims: Family::default(),
            runs: Family::default(),
            items_completed: Family::default(),
            items_failed: Family::default(),
            // Items take from milliseconds (a call) to many minutes (a provider job).
            item_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.01, 4.0, 10))
            }),
            cost: Family::default(),
            append_seconds: latency(),
            claim_seconds: latency(),
            leases_lost: Counter::default(),
            tasks: Family::default(),
            oldest_runnable: Gauge::default(),
            provider_in_flight: Family::default(),
            provider_cap: Family::default(),
            provider_waiting: Family::default(),
            provider_paused_until: Family::default(),
            provider_tokens: Family::default(),
            db_figures_age: Gauge::default(),
            db_reads_failed: Counter::default(),
            caps: std::sync::Mutex::new(BTreeMap::new()),
            db: tokio::sync::Mutex::new(DbFigures::default()),
            registry: Registry::default(),
        };
        registry.register(
            "build",
            "The running build",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        registry.register(
            "task_claims",
            "Tasks claimed by this worker, by workflow",
            metrics.claims.clone(),
        );
        registry.register(
            "task_runs",
            "Runs of claimed tasks by how they ended (completed, awaiting_review, failed, rescheduled, parked, set_aside, cancelled, stopped, not_runnable, lease_lost, error)",
            metrics.runs.clone(),
        );
        registry.register(
            "items_completed",
            "Items completed (durable item_completed events), by workflow and step",
            metrics.items_completed.clone(),
        );
        registry.register(
            "items_failed",
            "Item failures (durable item_failed events), by workflow, step and kind (transient, permanent, unanswered, rate_limited)",
            metrics.items_failed.clone(),
        );
        registry.register(
            "item_duration_seconds",
            "How long completed items took, by workflow and step",
            metrics.item_seconds.clone(),
        );
        registry.register(
            "cost_dollars",
            "What completed items cost, by workflow and channel",
            metrics.cost.clone(),
        );
        registry.register(
            "append_duration_seconds",
            "Appends of a run's events to the log, answer included",
            metrics.append_seconds.clone(),
        );
        registry.register(
            "claim_duration_seconds",
            "Claims (found a task or not)",
            metrics.claim_seconds.clone(),
        );
        registry.register(
            "leases_lost",
            "Runs that lost their task to another worker (found by an append or by the heartbeat)",
            metrics.leases_lost.clone(),
        );
        registry.register(
            "tasks",
            "Unfinished tasks per status, final_review included (every worker's, from the database; finished ones: reel stats)",
            metrics.tasks.clone(),
        );
        registry.register(
            "oldest_runnable_task_age_seconds",
            "How long the oldest task that is due and free has waited for a worker (0: none)",
            metrics.oldest_runnable.clone(),
        );
        registry.register(
            "provider_in_flight",
            "Jobs and calls in flight at a provider key, fleet-wide (submits that got no answer included)",
            metrics.provider_in_flight.clone(),
        );
        registry.register(
            "provider_cap",
            "The cap on a provider key's jobs and calls in flight, as this worker sets it",
            metrics.provider_cap.clone(),
        );
        registry.register(
            "provider_waiting",
            "Items waiting for room at a provider key, fleet-wide",
            metrics.provider_waiting.clone(),
        );
        registry.register(
            "provider_paused_until_seconds",
            "Until when a provider key is paused (its Retry-After), as a Unix time; 0 when not paused",
            metrics.provider_paused_until.clone(),
        );
        registry.register(
            "provider_tokens",
            "Requests left in a provider key's rate bucket as of its last request",
            metrics.provider_tokens.clone(),
        );
        registry.register(
            "db_figures_age_seconds",
            "How old the figures read from the database are (tasks, oldest runnable task, provider keys); -1 before the first read",
            metrics.db_figures_age.clone(),
        );
        registry.register(
            "db_figure_reads_failed",
            "Reads of the database's figures that failed or took longer than 2 s",
            metrics.db_reads_failed.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }

    /// The caps this worker applies, by provider key (shown as `reel_provider_cap`).
    pub fn set_caps(&self, caps: impl IntoIterator<Item = (String, u32)>) {
        let mut known = self.caps.lock().unwrap_or_else(|p| p.into_inner());
        known.clear();
        known.extend(caps);
        self.provider_cap.clear();
        for (key, cap) in known.iter() {
            self.provider_cap
                .get_or_create(&KeyLabel { key: key.clone() })
                .set(i64::from(*cap));
        }
    }

    pub(crate) fn claimed(&self, workflow: &str) {
        self.claims
            .get_or_create(&WorkflowLabel {
                workflow: workflow.to_owned(),
            })
            .inc();
    }

    pub(crate) fn claim_took(&self, took: Duration) {
        self.claim_seconds.observe(took.as_secs_f64());
    }

    pub(crate) fn lease_lost(&self) {
        self.leases_lost.inc();
    }

    pub(crate) fn run_ended(&self, workflow: &str, outcome: &'static str) {
        if outcome == "lease_lost" {
            self.lease_lost();
        }
        self.runs
            .get_or_create(&RunLabels {
                workflow: workflow.to_owned(),
                outcome,
            })
            .inc();
    }

    /// A run's events are durable: counts their items, and the append's time.
    pub(crate) fn appended<'a>(
        &self,
        workflow: &str,
        channel: &str,
        events: impl IntoIterator<Item = &'a Event>,
        took: Duration,
    ) {
        self.append_seconds.observe(took.as_secs_f64());
        for event in events {
            match event {
                Event::ItemCompleted {
                    step,
                    cost_micros,
                    duration_ms,
                    ..
                } => {
                    let labels = StepLabels {
                        workflow: workflow.to_owned(),
                        step: step.clone(),
                    };
                    self.items_completed.get_or_create(&labels).inc();
                    self.item_seconds
                        .get_or_create(&labels)
                        .observe(*duration_ms as f64 / 1000.0);
                    self.cost
                        .get_or_create(&CostLabels {
                            workflow: workflow.to_owned(),
                            channel: channel.to_owned(),
                        })
                        .inc_by(*cost_micros as f64 / 1e6);
                }
                Event::ItemFailed {
                    step,
                    kind,
                    unanswered,
                    retry_after_ms,
                    ..
                } => {
                    let kind = match (kind, unanswered, retry_after_ms) {
                        (_, true, _) => "unanswered",
                        (_, false, Some(_)) => "rate_limited",
                        (FailureKind::Transient, false, None) => "transient",
                        (FailureKind::Permanent, false, None) => "permanent",
                    };
                    self.items_failed
                        .get_or_create(&FailureLabels {
                            workflow: workflow.to_owned(),
                            step: step.clone(),
                            kind,
                        })
                        .inc();
                }
                _ => {}
            }
        }
    }

    /// The exposition text, with the database's figures read first when they are older than
    /// [`DB_FIGURES_TTL`] (one reader at a time; the others wait for its figures). When the
    /// database does not answer, the last figures are served and the error returned, so
    /// that `/metrics` can say so.
    pub async fn render(&self, store: &PgStore) -> (String, std::result::Result<(), String>) {
        // Held while encoding too: a read in progress clears and refills the families.
        let mut db = self.db.lock().await;
        let read = if db.tried_at.is_some_and(|at| at.elapsed() < DB_FIGURES_TTL) {
            Ok(())
        } else {
            db.tried_at = Some(Instant::now());
            // A database that hangs must not hang the scrapes: the last figures are served.
            let read = match tokio::time::timeout(DB_READ_TIMEOUT, self.read_database(store)).await
            {
                Ok(read) => read.map_err(|err| err.to_string()),
                Err(_) => Err(format!(
                    "the database did not answer within {DB_READ_TIMEOUT:?}"
                )),
            };
            match &read {
                Ok(()) => db.read_at = Some(Instant::now()),
                Err(_) => {
                    self.db_reads_failed.inc();
                }
            }
            read
        };
        self.db_figures_age
            .set(db.read_at.map_or(-1.0, |at| at.elapsed().as_secs_f64()));
        let mut text = String::new();
        if encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        drop(db);
        (text, read)
    }

    /// Reads the database's figures now (one statement), whatever their age.
    pub async fn read_database(&self, store: &PgStore) -> Result<()> {
        // The server gives up on it too: a read abandoned by the scrape's timeout does not
        // keep running, holding one of the worker's connections.
        let mut tx = store.pool().begin().await?;
        sqlx::query("SET LOCAL statement_timeout = '2s'")
            .execute(&mut *tx)
            .await?;
        let row = store
            .rows_as::<(serde_json::Value, Option<f64>, serde_json::Value)>(DB_FIGURES_SQL)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        let (statuses, oldest, providers) = row;
        self.tasks.clear();
        if let Some(statuses) = statuses.as_object() {
            for (status, count) in statuses {
                self.tasks
                    .get_or_create(&StatusLabel {
                        status: status.clone(),
                    })
                    .set(count.as_i64().unwrap_or(0));
            }
        }
        self.oldest_runnable.set(oldest.unwrap_or(0.0).max(0.0));
        self.provider_in_flight.clear();
        self.provider_waiting.clear();
        self.provider_paused_until.clear();
        self.provider_tokens.clear();
        for provider in providers.as_array().into_iter().flatten() {
            let key = KeyLabel {
                key: provider["key"].as_str().unwrap_or_default().to_owned(),
            };
            self.provider_in_flight
                .get_or_create(&key)
                .set(provider["in_flight"].as_i64().unwrap_or(0));
            self.provider_waiting
                .get_or_create(&key)
                .set(provider["waiting"].as_i64().unwrap_or(0));
            self.provider_paused_until
                .get_or_create(&key)
                .set(provider["paused_until"].as_f64().unwrap_or(0.0));
            self.provider_tokens
                .get_or_create(&key)
                .set(provider["tokens"].as_f64().unwrap_or(0.0));
        }
        Ok(())
    }
}

/// One statement for every figure read from the database, each bounded by the work in
/// flight rather than the table's size: the unfinished tasks per status and the oldest due
/// and free one (both through the claim's partial index, which holds only tasks that may
/// run, and `tasks_status` for `final_review`), and each provider key's slots (through the
/// slots' queue index). Finished tasks are not counted here (`reel stats` does).
///
/// The oldest is the earliest due; it waits from when it became due, or from when its last
/// lease ended (an expired lease's end, a released one's `updated_at`), whichever is later:
/// a task released a moment ago has not waited since it was created.
const DB_FIGURES_SQL: &str = r#"
SELECT
    (SELECT COALESCE(jsonb_object_agg(status, n), '{}'::jsonb)
       FROM (SELECT status, count(*) AS n FROM tasks
              WHERE status NOT IN ('final_review', 'completed', 'failed', 'cancelled')
              GROUP BY status
             UNION ALL
             SELECT 'final_review', count(*) FROM tasks WHERE status = 'final_review') AS s) AS statuses,
    (SELECT extract(epoch FROM now() - max(waiting.since))::float8 FROM (
        SELECT GREATEST(COALESCE(next_run_at, created_at), lease_expires_at, updated_at) AS since
          FROM tasks
         WHERE status NOT IN ('final_review', 'completed', 'failed', 'cancelled')
           AND COALESCE(next_run_at, created_at) <= now()
           AND (lease_owner IS NULL OR lease_expires_at < now())
         ORDER BY COALESCE(next_run_at, created_at)
         LIMIT 1) AS waiting) AS oldest,
    (SELECT COALESCE(jsonb_agg(jsonb_build_object(
                'key', k.key,
                'tokens', k.tokens,
                'paused_until', CASE WHEN k.paused_until > now()
                                     THEN extract(epoch FROM k.paused_until)::float8 END,
                'in_flight', (SELECT count(*) FROM provider_slots s
                               WHERE s.key = k.key AND s.granted AND s.expires_at > now()),
                'waiting', (SELECT count(*) FROM provider_slots s
                             WHERE s.key = k.key AND NOT s.granted AND s.expires_at > now()))),
                '[]'::jsonb)
       FROM provider_keys k) AS providers
"#;
