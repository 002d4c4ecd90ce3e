//! The fleet's pages: the provider keys (in flight against their caps, the waiting queue,
//! pauses, rates) and what `reel stats` prints, per channel.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use engine::ChannelId;
use maud::html;

use super::Console;
use super::pages::{layout, store_error};
use crate::cli::audit::{Stats, gather_stats};
use crate::cli::money;

/// Entries of each key's waiting queue shown.
const QUEUE_SHOWN: u32 = 20;

/// How long the stats page's figures are kept: they come from an audit of every history
/// (as `reel stats` does), far too much work to redo for every view.
const STATS_FRESH_FOR: Duration = Duration::from_secs(30);

/// Each visible channel's stats, computed at a moment.
#[derive(Debug)]
struct Figures {
    computed: Instant,
    at: chrono::DateTime<Utc>,
    channels: Vec<(ChannelId, Stats)>,
}

/// The stats page's figures, as of when they were computed.
#[derive(Debug, Default)]
pub(crate) struct StatsCache(tokio::sync::Mutex<Option<Figures>>);

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
                    @for (place, queued) in key.queue.iter().enumerate() {
                        tr {
                            td { (place + 1) }
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
    // One computation at a time: other viewers wait for it and share its result.
    let mut cache = console.stats.0.lock().await;
    let fresh = cache
        .as_ref()
        .is_some_and(|f| f.computed.elapsed() < STATS_FRESH_FOR);
    if !fresh {
        match compute(&console).await {
            Ok(channels) => {
                *cache = Some(Figures {
                    computed: Instant::now(),
                    at: Utc::now(),
                    channels,
                });
            }
            Err(err) => return store_error(&err),
        }
    }
    let Some(Figures {
        at: computed_at,
        channels: figures,
        ..
    }) = cache.as_ref()
    else {
        return store_error(&engine::Error::InvalidInput("no figures".into()));
    };
    let body = html! {
        h1 { "Stats" }
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
    layout("Stats", Some(&caller), body).into_response()
}

/// Each visible channel's stats.
async fn compute(console: &Console) -> engine::Result<Vec<(ChannelId, Stats)>> {
    let mut figures = Vec::new();
    for channel in console.store.channels().await? {
        if console.sees(channel.as_str()) {
            let stats = gather_stats(&console.store, Some(channel.clone())).await?;
            figures.push((channel, stats));
        }
    }
    Ok(figures)
}
