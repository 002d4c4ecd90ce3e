//! Trace rows (issue 29): what exporting every span costs the worker. The same worker
//! layout as the worker rows (4 workers x 4, 18 no-op items a task) runs with the spans
//! exported over OTLP/HTTP to a receiver in this process, and with the export off,
//! interleaved; the receiver decodes what it gets, as a collector would.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use engine::prelude::*;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use sqlx::postgres::PgPool;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::Report;
use crate::worker_bench::{ITEMS, run_workers};

const ROUNDS: usize = 3;

/// Whether spans go to the exporter now (the layer's filter asks for every span).
static EXPORTING: AtomicBool = AtomicBool::new(false);

pub(crate) async fn run(
    report: &mut Report,
    pool: &PgPool,
    store: &PgStore,
    quick: bool,
) -> anyhow::Result<()> {
    let spans = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/v1/traces", listener.local_addr()?);
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post({
            let spans = spans.clone();
            move |body: Bytes| async move {
                if let Ok(request) = ExportTraceServiceRequest::decode(body) {
                    let n: usize = request
                        .resource_spans
                        .iter()
                        .flat_map(|r| &r.scope_spans)
                        .map(|s| s.spans.len())
                        .sum();
                    spans.fetch_add(n, Ordering::Relaxed);
                }
                ""
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    let (layer, telemetry) = engine::service::otlp_layer(&url);
    let toggle =
        tracing_subscriber::filter::dynamic_filter_fn(|_, _| EXPORTING.load(Ordering::Relaxed));
    tracing_subscriber::registry()
        .with(layer.with_filter(toggle))
        .try_init()?;

    let tasks = if quick { 40 } else { 300 };
    let (mut on, mut off) = (Vec::new(), Vec::new());
    let mut exported = 0;
    for _ in 0..ROUNDS {
        for export in [true, false] {
            EXPORTING.store(export, Ordering::Relaxed);
            tracing::callsite::rebuild_interest_cache();
            let before = spans.load(Ordering::Relaxed);
            let items_per_s = run_workers(pool, store, tasks, 4, 4, false).await?;
            if export {
                // What the batch exporter still holds arrives within its schedule (5 s).
                tokio::time::sleep(Duration::from_secs(6)).await;
                exported += spans.load(Ordering::Relaxed) - before;
                on.push(items_per_s);
            } else {
                off.push(items_per_s);
            }
        }
    }
    EXPORTING.store(false, Ordering::Relaxed);
    telemetry.shutdown();
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (on, off) = (median(on), median(off));
    report.add(
        format!("4 workers x 4, every span exported over OTLP: items/s (median of {ROUNDS})"),
        on,
        "items/s",
    );
    report.add(
        "4 workers x 4, export off (interleaved): items/s",
        off,
        "items/s",
    );
    report.add(
        "items/s exporting / not exporting (goal >= 0.9)",
        on / off,
        "x",
    );
    // Warm-up tasks run too: 8 per worker slot per run.
    let items = (ROUNDS * (tasks + 8 * 16)) as f64 * f64::from(ITEMS);
    report.add(
        "spans received per item run while exporting",
        exported as f64 / items,
        "spans",
    );
    Ok(())
}
