//! `/healthz` and Prometheus `/metrics` (OpenMetrics text) for the projector.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use engine::PgStore;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// Every figure the projector exports. Cheap to share (`Arc`); counters are lock-free.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Requests to Notion by outcome: ok, rate_limited, unavailable, timeout, transport, rejected.
    pub requests: Family<OutcomeLabel, Counter>,
    /// Requests sent again after a retryable failure (429s included).
    pub retries: Counter,
    /// 429 and 529 answers.
    pub rate_limited: Counter,
    /// Rows written to `sync_failures`.
    pub sync_failures: Counter,
    /// Status events read from the log.
    pub events: Counter,
    /// Tasks not sent: up_to_date (coalesced or already mirrored), no_page.
    pub skipped: Family<ReasonLabel, Counter>,
    /// 1 while this instance leads.
    pub leader: Gauge,
    /// Events in the log past the checkpoint (approximate: by global position).
    pub lag_events: Gauge,
    /// Age of the oldest event past the checkpoint, 0 when caught up.
    pub lag_seconds: Gauge<f64, AtomicU64>,
    /// Unresolved `sync_failures` rows.
    pub open_failures: Gauge,
    /// Statuses waiting for a retry (the leader's queue; `sync_retries` holds them too).
    pub pending_retries: Gauge,
    healthy: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("notion_projector");
        let requests = Family::<OutcomeLabel, Counter>::default();
        let retries = Counter::default();
        let rate_limited = Counter::default();
        let sync_failures = Counter::default();
        let events = Counter::default();
        let skipped = Family::<ReasonLabel, Counter>::default();
        let leader = Gauge::default();
        let lag_events = Gauge::default();
        let lag_seconds = Gauge::<f64, AtomicU64>::default();
        let open_failures = Gauge::default();
        let pending_retries = Gauge::default();
        registry.register(
            "requests",
            "Requests to Notion by outcome",
            requests.clone(),
        );
        registry.register(
            "retries",
            "Requests sent again after a retryable failure",
            retries.clone(),
        );
        registry.register(
            "rate_limited",
            "429 and 529 answers from Notion",
            rate_limited.clone(),
        );
        registry.register(
            "sync_failures",
            "Sync failures recorded",
            sync_failures.clone(),
        );
        registry.register("events", "Status events read from the log", events.clone());
        registry.register("skipped", "Tasks not sent, by reason", skipped.clone());
        registry.register("leader", "1 while this instance leads", leader.clone());
        registry.register(
            "lag_events",
            "Events in the log past the checkpoint",
            lag_events.clone(),
        );
        registry.register(
            "lag_seconds",
            "Age of the oldest event past the checkpoint",
            lag_seconds.clone(),
        );
        registry.register(
            "open_sync_failures",
            "Unresolved sync failures",
            open_failures.clone(),
        );
        registry.register(
            "pending_retries",
            "Statuses waiting for a retry after a transient failure",
            pending_retries.clone(),
        );
        Metrics {
            registry,
            requests,
            retries,
            rate_limited,
            sync_failures,
            events,
            skipped,
            leader,
            lag_events,
            lag_seconds,
            open_failures,
            pending_retries,
            healthy: AtomicBool::new(true),
        }
    }

    /// Counts one request's outcome.
    pub fn request(&self, outcome: &'static str) {
        self.requests.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// Counts `tasks` not sent for `reason`.
    pub fn skip(&self, reason: &'static str, tasks: usize) {
        self.skipped
            .get_or_create(&ReasonLabel { reason })
            .inc_by(u64::try_from(tasks).unwrap_or(u64::MAX));
    }

    /// Whether the last database interaction succeeded.
    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut text = String::new();
        if encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }

    /// Reads lag and open failures from the database (the checkpoint is there, so a standby
    /// reports the leader's lag too). Keeps the old values when the database is away.
    pub async fn refresh_from_db(&self, store: &PgStore, projector: &str) {
        const LAG_SQL: &str = "SELECT c.last_position, \
                    COALESCE((SELECT max(global_position) FROM events), 0), \
                    (SELECT extract(epoch FROM now() - e.recorded_at)::float8 FROM events e \
                      WHERE (e.tx_id, e.global_position) > (c.last_tx_id, c.last_position) \
                      ORDER BY e.tx_id, e.global_position LIMIT 1), \
                    (SELECT count(*) FROM sync_failures f \
                      WHERE f.projector = c.projector AND f.resolved_at IS NULL) \
               FROM projector_checkpoints c WHERE c.projector = $1";
        let query = store.on_pool(async |c| {
            store
                .rows_as::<(i64, i64, Option<f64>, i64)>(LAG_SQL)
                .bind(projector)
                .fetch_optional(c)
                .await
        });
        match tokio::time::timeout(Duration::from_secs(2), query).await {
            Ok(Ok(Some((position, head, age, open)))) => {
                self.lag_events.set((head - position).max(0));
                self.lag_seconds.set(age.unwrap_or(0.0).max(0.0));
                self.open_failures.set(open);
            }
            Ok(Ok(None)) => {}
            Ok(Err(err)) => tracing::debug!(error = %err, "cannot read lag for /metrics"),
            Err(_) => tracing::debug!("reading lag for /metrics timed out"),
        }
    }
}

#[derive(Clone, Debug)]
struct MetricsState {
    metrics: Arc<Metrics>,
    store: PgStore,
    projector: String,
}

/// Serves `/healthz` and `/metrics` on `addr` until `shutdown`; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    store: PgStore,
    projector: String,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(render))
        .with_state(MetricsState {
            metrics,
            store,
            projector,
        });
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(err) = served {
            tracing::error!(error = %err, "metrics server stopped");
        }
    });
    Ok(bound)
}

async fn healthz(State(state): State<MetricsState>) -> impl IntoResponse {
    let role = if state.metrics.leader.get() == 1 {
        "leader"
    } else {
        "standby"
    };
    if state.metrics.is_healthy() {
        (
            StatusCode::OK,
            axum::Json(serde_json::json!({"status": "ok", "role": role})),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({"status": "database unreachable", "role": role})),
        )
    }
}

async fn render(State(state): State<MetricsState>) -> impl IntoResponse {
    state
        .metrics
        .refresh_from_db(&state.store, &state.projector)
        .await;
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
}
