//! The fleet's pages: the provider keys (in flight against their caps, the waiting queue,
//! pauses, rates) and what `reel stats` prints, per channel.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use engine::{ChannelId, PgStore};
use maud::html;

use super::Console;
use super::pages::{layout, page_error, store_error};
use crate::cli::audit::{Stats, gather_stats};
use crate::cli::money;

/// Entries of each key's waiting queue shown.
const QUEUE_SHOWN: u32 = 20;

/// How long the stats page's figures are kept: they come from an audit of every history
/// (as `reel stats` does), far too much work to redo for every view.
const STATS_FRESH_FOR: Duration = Duration::from_secs(30);

/// How long a view waits for figures being computed before it shows what it has.
const STATS_WAIT: Duration = Duration::from_secs(3);

/// Each visible channel's stats, computed at a moment.
#[derive(Debug)]
struct Figures {
    computed: Instant,
    at: chrono::DateTime<Utc>,
    channels: Vec<(ChannelId, Stats)>,
}

#[derive(Debug, Default)]
struct StatsState {
    figures: Option<Arc<Figures>>,
    /// A computation in flight since then.
    running_since: Option<chrono::DateTime<Utc>>,
    /// The last computation's failure, if it failed.
    failed: Option<String>,
}

/// The stats page's figures. One computation at a time runs in the background, on a small
/// pool of its own (`store`): a slow database or a big log never holds the connections
/// the other pages need, and a viewer who leaves does not waste what was computed.
#[derive(Debug)]
pub(crate) struct StatsCache {
    store: PgStore,
    state: std::sync::Mutex<StatsState>,
    done: tokio::sync::Notify,
}

impl StatsCache {
    pub(crate) fn new(store: &PgStore) -> Self {
        StatsCache {
            store: store.with_own_pool(2),
            state: std::sync::Mutex::default(),
            done: tokio::sync::Notify::new(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, StatsState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Computes the figures into the cache, and wakes the views waiting for them.
async fn compute_into(console: Arc<Console>) {
    let result = compute(&console).await;
    let cache = &console.stats;
    {
        let mut state = cache.state();
        state.running_since = None;
        match result {
            Ok(channels) => {
                state.failed = None;
                state.figures = Some(Arc::new(Figures {
                    computed: Instant::now(),
                    at: Utc::now(),
                    channels,
                }));
            }
            Err(err) => {
                tracing::error!(error = %err, "console: the stats could not be computed");
                state.failed = Some(err.to_string());
            }
        }
    }
    cache.done.notify_waiters();
}

/// `GET /providers`.
pub(crate) async fn providers(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    let caller = console.auth.caller(&headers);
    let keys = match console
        .store
        .provider_overview(&console.channels, QUEUE_SHOWN)
        .await
    {
        Ok(keys) => keys,
        Err(err) => return store_error(&err),
    };
    let now = Utc::now();
    let body = html! {
        h1 { "Providers" }
        p.hint { "Counts are fleet-wide; limits are those the live workers apply (their workflows' defaults and their --max-in-flight / --rate)." }
        table #providers {
            thead { tr { th { "provider key" } th { "in flight / cap" } th { "waiting" } th { "paused until" } th { "rate (req/s)" } th { "requests available" } th { "workers" } } }
            tbody {
                @for key in &keys {
                    tr data-key=(key.key) {
                        td { code { (key.key) } }
                        td.in-flight {
                            (key.in_flight) " / "
                            @match key.applied.as_slice() {
                                [] => { "?" }
                                [only] => { @match only.max_in_flight { Some(cap) => (cap), None => "no cap" } }
                                many => {
                                    span.bad title="workers apply different caps" {
                                        @for (i, applied) in many.iter().enumerate() {
                                            @if i > 0 { " or " }
                                            @match applied.max_in_flight { Some(cap) => (cap), None => "no cap" }
                                        }
                                    }
                                }
                            }
                        }
                        td.waiting { (key.waiting) }
                        td {
                            @if let Some(until) = key.paused_until {
                                span.bad { (until.format("%H:%M:%S")) " (" ((until - now).num_seconds().max(0)) " s)" }
                            } @else { "—" }
                        }
                        td {
                            @match key.applied.as_slice() {
                                [] => { "?" }
                                many => {
                                    @for (i, applied) in many.iter().enumerate() {
                                        @if i > 0 { " or " }
                                        @match applied.rate { Some(rate) => (format!("{rate}")), None => "no limit" }
                                    }
                                }
                            }
                        }
                        td { @match key.tokens_now() { Some(t) => (format!("{:.1}", t)), None => "—" } }
                        td { @for (i, applied) in key.applied.iter().enumerate() { @if i > 0 { ", " } (applied.workers) } }
                    }
                }
            }
        }
        @if keys.is_empty() { p { "No provider key has been used yet, and no live worker calls one." } }
        @for key in keys.iter().filter(|k| !k.queue.is_empty()) {
            h2 { "Waiting for " code { (key.key) } }
            table.queue data-key=(key.key) {
                thead { tr { th { "place" } th { "task" } th { "step" } th { "items" } th { "task since" } } }
                tbody {
                    @for queued in &key.queue {
                        tr {
                            td { (queued.place) }
                            td { a href=(format!("/tasks/{}", queued.task)) { code { (queued.task) } } }
                            td { (queued.step) }
                            td { (queued.items) }
                            td { (queued.since.format("%Y-%m-%d %H:%M:%S")) }
                        }
                    }
                }
            }
            @if (key.queue.len() as u32) == QUEUE_SHOWN { p.hint { "The first " (QUEUE_SHOWN) " shown." } }
        }
    };
    layout("Providers", Some(&caller), body).into_response()
}

/// `GET /stats`: what `reel stats --channel C` prints, for each channel the console shows.
pub(crate) async fn stats(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    let caller = console.auth.caller(&headers);
    let fresh = |state: &StatsState| {
        state
            .figures
            .clone()
            .filter(|f| f.computed.elapsed() < STATS_FRESH_FOR)
    };
    let waiting = {
        let mut state = console.stats.state();
        if let Some(figures) = fresh(&state) {
            return stats_page(&caller, &figures, None).into_response();
        }
        // Registered before the lock is let go: a computation ending now still wakes it.
        let mut waiting = Box::pin(console.stats.done.notified());
        waiting.as_mut().enable();
        if state.running_since.is_none() {
            state.running_since = Some(Utc::now());
            tokio::spawn(compute_into(console.clone()));
        }
        waiting
    };
    let _ = tokio::time::timeout(STATS_WAIT, waiting).await;
    let state = console.stats.state();
    if let Some(figures) = fresh(&state) {
        return stats_page(&caller, &figures, None).into_response();
    }
    match (&state.running_since, &state.failed, &state.figures) {
        (Some(since), _, figures) => {
            stats_page_computing(&caller, *since, figures.as_deref()).into_response()
        }
        (None, Some(_), _) => page_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "The stats could not be computed (the database did not answer); try again in a moment.",
        ),
        (None, None, _) => page_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "No figures yet; try again.",
        ),
    }
}

/// Figures still being computed: the last ones, if any, marked as such; the page reloads.
fn stats_page_computing(
    caller: &super::auth::Caller,
    since: chrono::DateTime<Utc>,
    stale: Option<&Figures>,
) -> maud::Markup {
    let note = html! {
        p.hint #computing {
            "Computing the figures (started " (since.format("%H:%M:%S")) " UTC); this page reloads until they are ready."
        }
    };
    match stale {
        Some(figures) => stats_page(caller, figures, Some(note)),
        None => layout(
            "Stats",
            Some(caller),
            html! { meta http-equiv="refresh" content="3"; h1 { "Stats" } (note) },
        ),
    }
}

fn stats_page(
    caller: &super::auth::Caller,
    figures: &Figures,
    note: Option<maud::Markup>,
) -> maud::Markup {
    let (computed_at, figures) = (figures.at, &figures.channels);
    let body = html! {
        @if note.is_some() { meta http-equiv="refresh" content="3"; }
        h1 { "Stats" }
        @if let Some(note) = note { (note) }
        p.hint { "As " code { "reel stats --channel C" } " prints them, computed at " (computed_at.format("%H:%M:%S")) " UTC (kept " (STATS_FRESH_FOR.as_secs()) " s)." }
        table #stats {
            thead { tr { th { "channel" } th { "tasks" } th { "by status" } th { "spent" } th { "items run" } th { "skipped by resuming" } th { "saved" } th { "provider jobs" } } }
            tbody {
                @for (channel, s) in figures {
                    tr data-channel=(channel.as_str()) {
                        td { a href=(format!("/?channel={}", super::pages::urlencode(channel.as_str()))) { (channel.as_str()) } }
                        td.tasks { (s.tasks) }
                        td { @for (status, n) in &s.by_status { (status) " " (n) br; } }
                        td.spent { (money(s.spent_micros)) }
                        td { (s.items_run) }
                        td { (s.items_skipped) }
                        td.saved { (money(s.saved_micros)) }
                        td {
                            (s.jobs_submitted)
                            @if s.submits_unanswered > 0 { br; span.bad { (s.submits_unanswered) " unanswered (may be charged)" } }
                        }
                    }
                }
            }
        }
        @if figures.is_empty() { p { "No tasks." } }
        @for (channel, s) in figures.iter().filter(|(_, s)| !s.failure_reasons.is_empty()) {
            h2 { "Failure reasons in " (channel.as_str()) }
            table.reasons {
                tbody { @for (reason, n) in &s.failure_reasons { tr { td { (n) } td.error { (engine::truncate_for_display(reason, 200)) } } } }
            }
        }
    };
    layout("Stats", Some(caller), body)
}

/// Each visible channel's stats.
async fn compute(console: &Console) -> engine::Result<Vec<(ChannelId, Stats)>> {
    let store = &console.stats.store;
    let mut figures = Vec::new();
    for channel in store.channels().await? {
        if console.sees(channel.as_str()) {
            let stats = gather_stats(store, Some(channel.clone())).await?;
            figures.push((channel, stats));
        }
    }
    Ok(figures)
}
