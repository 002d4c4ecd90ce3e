//! The console's one subscription of the global log, fanned out to every open browser.
//!
//! For each page of the log that names tasks, the hub reads those tasks' rows once (one
//! statement per page, whatever the number of browsers) and broadcasts each row's
//! newest state. A browser's `/live` stream (Server-Sent Events) filters what it may see
//! (the console's channels, one task for a task page); a browser too slow to keep up is
//! told to reload rather than shown a gap.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use engine::{PgStore, Subscription, SubscriptionOptions, TaskId, TaskSummary};
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::Console;

/// Changes a browser may fall behind by before it is told to reload.
const BACKLOG: usize = 1024;

/// A task's newest state, as the tasks page shows it.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Change {
    pub(crate) id: TaskId,
    pub(crate) workflow: String,
    pub(crate) channel: String,
    pub(crate) status: String,
    pub(crate) display: String,
    pub(crate) attempt: u32,
    pub(crate) version: u32,
    pub(crate) updated_at: String,
}

impl From<&TaskSummary> for Change {
    fn from(task: &TaskSummary) -> Change {
        Change {
            id: task.id,
            workflow: task.workflow.clone(),
            channel: task.channel_id.clone(),
            status: task.status.as_str().to_owned(),
            display: task.status_display.clone(),
            attempt: task.attempt,
            version: task.version,
            updated_at: task.updated_at.format("%Y-%m-%d %H:%M:%S").to_string(),
        }
    }
}

#[derive(Debug)]
pub(crate) struct Hub {
    changes: broadcast::Sender<Arc<Change>>,
}

impl Hub {
    /// Follows the log from its head (what pages already show is read with them).
    pub(crate) async fn start(store: PgStore, stop: CancellationToken) -> anyhow::Result<Hub> {
        let (changes, _) = broadcast::channel(BACKLOG);
        let head = store.log_head().await?;
        let mut subscription = Subscription::start(
            store.clone(),
            head,
            SubscriptionOptions {
                poll_interval: Duration::from_secs(1),
                batch_size: 500,
            },
        )
        .await;
        let sender = changes.clone();
        tokio::spawn(async move {
            loop {
                let page = tokio::select! {
                    page = subscription.next_page(None) => page,
                    () = stop.cancelled() => return,
                };
                let page = match page {
                    Ok(page) => page,
                    Err(err) => {
                        tracing::warn!(error = %err, "console: cannot read the log; trying again");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                let tasks: BTreeSet<TaskId> = page
                    .events
                    .iter()
                    .filter_map(|e| e.as_ref().ok())
                    .map(|e| e.stream_id)
                    .collect();
                if tasks.is_empty() || sender.receiver_count() == 0 {
                    continue;
                }
                let tasks: Vec<TaskId> = tasks.into_iter().collect();
                match store.tasks_by_id(&tasks).await {
                    Ok(rows) => {
                        for row in &rows {
                            let _ = sender.send(Arc::new(Change::from(row)));
                        }
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "console: cannot read changed tasks; browsers are told to reload");
                        let _ = sender.send(Arc::new(reload()));
                    }
                }
            }
        });
        Ok(Hub { changes })
    }
}

/// A change that names no task: "what you show may be stale, reload".
fn reload() -> Change {
    Change {
        id: TaskId::from(uuid::Uuid::nil()),
        workflow: String::new(),
        channel: String::new(),
        status: String::new(),
        display: String::new(),
        attempt: 0,
        version: 0,
        updated_at: String::new(),
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct LiveQuery {
    /// Only this task's changes (a task page).
    task: Option<TaskId>,
}

/// `GET /live`: the changes this browser may see, as Server-Sent Events (`change` with the
/// task's state as JSON; `reload` when it fell behind or the console lost the log).
pub(crate) async fn live(
    State(console): State<Arc<Console>>,
    Query(query): Query<LiveQuery>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let mut changes = console.hub.changes.subscribe();
    let stream = async_stream(move |tx| async move {
        loop {
            let received = tokio::select! {
                received = changes.recv() => received,
                // The console is shutting down: the stream ends (a browser reconnects to
                // the next console), so the shutdown does not wait on it.
                () = console.stop.cancelled() => return,
                // The browser went: stop listening now, not at the next change.
                () = tx.closed() => return,
            };
            let event = match received {
                Ok(change) if change.id.as_uuid().is_nil() => {
                    SseEvent::default().event("reload").data("")
                }
                Ok(change) => {
                    if !console.sees(&change.channel) || query.task.is_some_and(|t| t != change.id)
                    {
                        continue;
                    }
                    match SseEvent::default().event("change").json_data(&*change) {
                        Ok(event) => event,
                        Err(_) => continue,
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    SseEvent::default().event("reload").data("")
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if tx.send(Ok(event)).await.is_err() {
                return;
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// A stream fed by `produce` through a small channel (ends when `produce` returns or the
/// browser goes).
fn async_stream<F, Fut>(produce: F) -> impl Stream<Item = Result<SseEvent, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<SseEvent, Infallible>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(produce(tx));
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}
