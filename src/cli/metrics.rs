//! `reel worker --metrics-listen ADDR`: `/metrics` (OpenMetrics text, see
//! [`engine::metrics::Metrics`]) and `/healthz` for a running worker.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use engine::PgStore;
use engine::metrics::Metrics;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug)]
struct Served {
    metrics: Arc<Metrics>,
    store: PgStore,
}

/// Serves `/metrics` and `/healthz` on `addr` until `shutdown`; returns the bound address.
pub(crate) async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    store: PgStore,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(healthz))
        .with_state(Served { metrics, store });
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

/// The figures; when the database does not answer, the last ones it gave (and the
/// process's own counts) with a warning in the log: a scrape never fails for an outage.
async fn render(State(served): State<Served>) -> impl IntoResponse {
    let (text, read) = served.metrics.render(&served.store).await;
    if let Err(err) = read {
        tracing::warn!(error = %err, "/metrics: cannot read the database's figures; serving the last ones");
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
}

/// 200 while the database answers within 2 s, 503 while it does not (the error goes to
/// the log, not to whoever asks: it may name hosts and users).
async fn healthz(State(served): State<Served>) -> impl IntoResponse {
    let answered =
        tokio::time::timeout(std::time::Duration::from_secs(2), served.store.sync_clock()).await;
    match answered {
        Ok(Ok(_)) => (
            StatusCode::OK,
            axum::Json(serde_json::json!({"status": "ok"})),
        ),
        Ok(Err(err)) => {
            tracing::warn!(error = %err, "/healthz: the database does not answer");
            unavailable()
        }
        Err(_) => {
            tracing::warn!("/healthz: the database did not answer within 2 s");
            unavailable()
        }
    }
}

fn unavailable() -> (StatusCode, axum::Json<serde_json::Value>) {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(serde_json::json!({"status": "database unreachable"})),
    )
}
