//! The pages: the task list, a task, the actions, and the errors. Everything a user or a
//! provider typed (task input, reasons, error texts, display names) goes through maud,
//! which escapes it.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use engine::audit::audit;
use engine::timeline::timeline;
use engine::{ChannelId, TaskCursor, TaskFilter, TaskId, TaskStatus, commands};
use maud::{DOCTYPE, Markup, html};
use serde::Deserialize;

use super::Console;
use super::auth::Caller;
use super::files::{Media, artifact_url};
use crate::cli::money;

/// Tasks per page of the list.
const PAGE: u32 = 50;

/// The longest payload shown for one event (the rest is cut, and says so).
const PAYLOAD_MAX_CHARS: usize = 4000;

/// The page frame: title, navigation, who is signed in.
pub(crate) fn layout(title: &str, caller: Option<&Caller>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · reel console" }
                link rel="stylesheet" href="/static/console.css";
                script src="/static/console.js" defer {}
            }
            body {
                nav {
                    span.links {
                        a href="/" { "reel console" }
                        a href="/providers" { "Providers" }
                        a href="/stats" { "Stats" }
                    }
                    span.who {
                        @match caller {
                            Some(caller) if caller.may_act() => {
                                "signed in as " strong { (caller.name().unwrap_or_default()) }
                                form.inline method="post" action="/logout" {
                                    button type="submit" { "Sign out" }
                                }
                            }
                            _ => { a href="/login" { "Sign in to act" } }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

pub(crate) fn page_error(status: StatusCode, message: &str) -> Response {
    let title = status.canonical_reason().unwrap_or("Error");
    (
        status,
        layout(title, None, html! { h1 { (title) } p.error { (message) } }),
    )
        .into_response()
}

pub(crate) async fn not_found() -> Response {
    page_error(StatusCode::NOT_FOUND, "No such page.")
}

fn no_such_task() -> Response {
    page_error(StatusCode::NOT_FOUND, "No such task.")
}

pub(crate) fn store_error(err: &engine::Error) -> Response {
    tracing::error!(error = %err, "console: the database did not answer");
    page_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "The database did not answer; try again in a moment.",
    )
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct ListQuery {
    channel: Option<String>,
    status: Option<String>,
    workflow: Option<String>,
    q: Option<String>,
    after: Option<String>,
}

fn nonempty(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

/// `GET /`: the tasks, newest first, filtered, a page at a time, with counts per status;
/// rows change and new tasks appear as the log moves (`/live`).
pub(crate) async fn tasks(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Query(query): Query<ListQuery>,
) -> Response {
    let caller = console.auth.caller(&headers);
    let channel = match nonempty(&query.channel).map(ChannelId::parse).transpose() {
        Ok(channel) => channel,
        Err(err) => return page_error(StatusCode::BAD_REQUEST, &err.to_string()),
    };
    let status = match nonempty(&query.status)
        .map(str::parse::<TaskStatus>)
        .transpose()
    {
        Ok(status) => status,
        Err(err) => return page_error(StatusCode::BAD_REQUEST, &err.to_string()),
    };
    let after = match nonempty(&query.after).map(TaskCursor::parse).transpose() {
        Ok(after) => after,
        Err(err) => return page_error(StatusCode::BAD_REQUEST, &err.to_string()),
    };
    // PostgreSQL stores no NUL: a text holding one matches nothing, and says so.
    if [&query.q, &query.workflow]
        .iter()
        .any(|v| v.as_deref().is_some_and(|v| v.contains('\0')))
    {
        return page_error(StatusCode::BAD_REQUEST, "A filter holds a NUL character.");
    }
    // A channel outside the console's reads as empty, like an unknown one.
    let outside = channel.as_ref().is_some_and(|c| !console.sees(c.as_str()));
    let filter = TaskFilter {
        status,
        channel,
        limit: PAGE + 1,
        workflow: nonempty(&query.workflow).map(str::to_owned),
        channels: console.channels.clone(),
        text: nonempty(&query.q).map(str::to_owned),
        after,
    };
    let (mut rows, counts) = if outside {
        (Vec::new(), Vec::new())
    } else {
        let rows = match console.store.list_tasks(&filter).await {
            Ok(rows) => rows,
            Err(err) => return store_error(&err),
        };
        let counts = match console.store.count_tasks_by_status(&filter).await {
            Ok(counts) => counts,
            Err(err) => return store_error(&err),
        };
        (rows, counts)
    };
    let more = rows.len() > PAGE as usize;
    rows.truncate(PAGE as usize);
    let next = more
        .then(|| rows.last().map(|t| TaskCursor::of(t).encode()))
        .flatten();
    let first_page = after.is_none();
    let filtered = status.is_some() || filter.workflow.is_some() || filter.text.is_some();
    let keep = |extra: &[(&str, &str)]| -> String {
        let mut pairs: Vec<(String, String)> = Vec::new();
        for (key, value) in [
            ("channel", &query.channel),
            ("status", &query.status),
            ("workflow", &query.workflow),
            ("q", &query.q),
        ] {
            if let Some(value) = nonempty(value) {
                pairs.push((key.to_owned(), value.to_owned()));
            }
        }
        for (key, value) in extra {
            pairs.retain(|(k, _)| k != key);
            pairs.push(((*key).to_owned(), (*value).to_owned()));
        }
        let encoded: Vec<String> = pairs
            .iter()
            .map(|(k, v)| format!("{k}={}", urlencode(v)))
            .collect();
        format!("/?{}", encoded.join("&"))
    };
    let body = html! {
        h1 { "Tasks" }
        form.filters method="get" action="/" {
            input name="q" placeholder="search id, status, error…" value=[nonempty(&query.q)];
            input name="channel" placeholder="channel" value=[nonempty(&query.channel)];
            input name="workflow" placeholder="workflow" value=[nonempty(&query.workflow)];
            input name="status" placeholder="status (e.g. failed)" value=[nonempty(&query.status)];
            button type="submit" { "Filter" }
            a href="/" { "clear" }
        }
        p.counts {
            @for (status, n) in &counts {
                a href=(keep(&[("status", status.as_str())])) data-status=(status.as_str()) {
                    (status.as_str()) " " span.n { (n) }
                }
                " "
            }
        }
        table #tasks data-live=(if first_page && !filtered { "prepend" } else { "update" })
            data-channel=[nonempty(&query.channel)] {
            thead { tr { th { "task" } th { "workflow" } th { "channel" } th { "status" } th { "attempt" } th { "updated" } } }
            tbody {
                @for task in &rows {
                    tr data-task=(task.id) {
                        td { a href=(format!("/tasks/{}", task.id)) { code { (short(task.id)) } } }
                        td { (task.workflow) }
                        td { (task.channel_id) }
                        td.status data-status=(task.status.as_str()) { (task.status_display) }
                        td { (task.attempt) }
                        td { (task.updated_at.format("%Y-%m-%d %H:%M:%S")) }
                    }
                }
            }
        }
        @if rows.is_empty() { p { "No tasks." } }
        @if let Some(next) = next {
            p { a.next href=(keep(&[("after", &next)])) { "Older tasks →" } }
        }
    };
    layout("Tasks", Some(&caller), body).into_response()
}

fn short(task: TaskId) -> String {
    task.to_string()[..8].to_owned()
}

pub(crate) fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct TaskQuery {
    /// Time travel: the task as it was at this version (empty: now).
    at: Option<String>,
}

/// `?at=`: empty is now; otherwise a version from 1.
fn version_at(at: Option<&str>) -> Result<Option<u32>, Box<Response>> {
    match at.map(str::trim).filter(|a| !a.is_empty()) {
        None => Ok(None),
        Some(text) => match text.parse::<u32>() {
            Ok(version) if version >= 1 => Ok(Some(version)),
            _ => Err(Box::new(page_error(
                StatusCode::BAD_REQUEST,
                "A version to travel to is a number from 1.",
            ))),
        },
    }
}

/// A task id from the path: malformed is a 400.
pub(crate) fn task_id(raw: &str) -> Result<TaskId, Box<Response>> {
    raw.parse().map_err(|_| {
        Box::new(page_error(
            StatusCode::BAD_REQUEST,
            "That is not a task id (a UUID).",
        ))
    })
}

/// `GET /tasks/{id}`: the task's state, audit verdict, timeline and events.
pub(crate) async fn task(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    Query(query): Query<TaskQuery>,
) -> Response {
    let task = match task_id(&raw) {
        Ok(task) => task,
        Err(response) => return *response,
    };
    let at = match version_at(query.at.as_deref()) {
        Ok(at) => at,
        Err(response) => return *response,
    };
    let caller = console.auth.caller(&headers);
    let row = match console.store.tasks_by_id(&[task]).await {
        Ok(mut rows) => rows.pop(),
        Err(err) => return store_error(&err),
    };
    let Some(row) = row.filter(|r| console.sees(&r.channel_id)) else {
        return no_such_task();
    };
    let events = match (at, row.archived_at) {
        // An archived task's history is read from its archive.
        (_, Some(_)) => match crate::archive::history(&console.store, task).await {
            Ok(mut events) => {
                events.retain(|e| at.is_none_or(|at| e.version <= at));
                Ok(events)
            }
            Err(crate::archive::ArchiveError::Engine(err)) => Err(err),
            Err(err) => {
                return page_error(
                    StatusCode::BAD_GATEWAY,
                    &format!("The task's archive cannot be read: {err}"),
                );
            }
        },
        (Some(at), None) => {
            console
                .store
                .read_stream_until(task, at.saturating_add(1))
                .await
        }
        (None, None) => console.store.read_stream(task, 1).await,
    };
    let events = match events {
        Ok(events) => events,
        Err(err @ engine::Error::Decode { .. }) => {
            return page_error(
                StatusCode::UNPROCESSABLE_ENTITY,
                &format!("This build cannot read the task's history: {err}"),
            );
        }
        Err(err) => return store_error(&err),
    };
    let report = audit(task, &events);
    let state = &report.state;
    let head = row.version;
    let at = at.filter(|&at| at < head);
    let running = at.is_none() && !state.status().is_terminal();
    let rows = timeline(&events);
    let input = events.first().and_then(|e| match &e.event {
        engine::Event::TaskSubmitted { input, .. } => serde_json::to_string_pretty(input).ok(),
        _ => None,
    });
    let status = state.status();
    let csrf = caller.csrf().to_owned();
    let action = |name: &str| format!("/tasks/{task}/{name}");
    let steps: Vec<&str> = state
        .steps
        .iter()
        .filter(|s| s.removed_in.is_none())
        .map(|s| s.name.as_str())
        .collect();
    // The current runs' files, by step (what the audit checks on disk).
    type Files = Vec<(u32, String, Media)>;
    let media: Vec<(&str, Files)> = state
        .steps
        .iter()
        .filter(|s| s.removed_in.is_none())
        .map(|s| {
            let files = s
                .items
                .values()
                .filter_map(|r| {
                    let (url, kind) = artifact_url(task, &row.channel_id, &r.artifact)?;
                    Some((r.item, url, kind))
                })
                .collect::<Vec<_>>();
            (s.name.as_str(), files)
        })
        .filter(|(_, files)| !files.is_empty())
        .collect();
    let body = html! {
        h1 { "Task " code { (task) } }
        @if let Some(at) = at {
            p.travel { "As it was at version " strong { (at) } " of " (head) ". "
                a href=(format!("/tasks/{task}")) { "Back to now" } }
        }
        @if let Some(archived) = row.archived_at {
            p.travel #archived { "Archived at " (archived.format("%Y-%m-%d %H:%M:%S")) " UTC: its history is read from its archive." }
        }
        dl.facts #facts data-task=(task) data-live=(if running { "on" } else { "off" }) {
            dt { "status" } dd.status data-status=(status.as_str()) { (state.status_display()) }
            dt { "workflow" } dd { (state.workflow) " v" (row.workflow_version) }
            dt { "channel" } dd { (row.channel_id) }
            dt { "attempt" } dd { (state.attempt) }
            dt { "spent" } dd { (money(report.spent.cost_micros)) " · " (report.items_run) " items run" }
            dt { "saved by resuming" } dd.saved { (money(report.saved.cost_micros)) " · " (report.items_skipped) " items skipped" }
            dt { "audit" } dd {
                @if report.is_clean() { span.ok { "clean" } }
                @else {
                    span.bad { (report.violations.len()) " invariant(s) broken" }
                    ul { @for v in &report.violations { li { "v" (v.version) " " (v.message) } } }
                }
            }
            @if let Some(failure) = &state.failure { dt { "failure" } dd.error { (failure) } }
        }
        @if caller.may_act() && at.is_none() {
            section.actions {
                @if status == TaskStatus::FINAL_REVIEW {
                    form method="post" action=(action("approve")) {
                        input type="hidden" name="csrf" value=(csrf);
                        button #approve type="submit" { "Approve" }
                    }
                    form method="post" action=(action("reject")) {
                        input type="hidden" name="csrf" value=(csrf);
                        label { "Redo from " select name="redo_from" { @for s in &steps { option value=(s) { (s) } } } }
                        input name="reason" placeholder="why" maxlength="500";
                        button #reject type="submit" { "Reject" }
                    }
                }
                @if status == TaskStatus::FAILED || status == TaskStatus::RETRY_SCHEDULED {
                    form method="post" action=(action("retry")) {
                        input type="hidden" name="csrf" value=(csrf);
                        button #retry type="submit" { "Retry" }
                    }
                }
                @if !status.is_terminal() {
                    form method="post" action=(action("cancel")) {
                        input type="hidden" name="csrf" value=(csrf);
                        input name="reason" placeholder="why" maxlength="500";
                        button #cancel type="submit" { "Cancel" }
                    }
                }
            }
        }
        h2 { "Timeline" }
        p.legend {
            span.key.done {} "done " span.key.waiting {} "job wait " span.key.failed {} "failed "
            span.key.skipped {} "skipped by a resume " span.key.parked {} "parked " span.key.review {} "review"
        }
        div #timeline { (super::svg::timeline(&events, &state.resumes, running.then(chrono::Utc::now))) }
        div #detail { p { "Click a mark to see its event." } }
        form.travel method="get" action=(format!("/tasks/{task}")) {
            label { "Time travel to version " input type="number" name="at" min="1" max=(head) value=(at.unwrap_or(head)); }
            button type="submit" { "Show" }
        }
        @if console.artifacts.is_some() && !media.is_empty() {
            h2 { "Artifacts" }
            @for (step, files) in &media {
                h3 { (step) }
                div.media {
                    @for (item, url, kind) in files {
                        figure {
                            @match kind {
                                Media::Image => { a href=(url) { img src=(url) loading="lazy" alt=(format!("{step} {item}")); } }
                                Media::Audio => { audio controls preload="none" src=(url) {} }
                                Media::Video => { video controls preload="metadata" src=(url) {} }
                                Media::Text => { a href=(url) { "open" } }
                            }
                            figcaption { (step) " " (item) }
                        }
                    }
                }
            }
        }
        @if let Some(input) = input { h2 { "Input" } pre.input { (input) } }
        h2 { "Events" }
        table.events {
            thead { tr { th { "v" } th { "at" } th { "attempt" } th { "event" } th { "step" } th { "item" } th { "detail" } } }
            tbody {
                @for (row, recorded) in rows.iter().zip(&events) {
                    tr id=(format!("v{}", row.version)) {
                        td { a href=(format!("/tasks/{task}?at={}", row.version)) { (row.version) } }
                        td { (row.recorded_at.format("%H:%M:%S%.3f")) }
                        td { (row.attempt) }
                        td { (row.event) }
                        td { (row.step.as_deref().unwrap_or_default()) }
                        td { @if let Some(item) = row.item { (item) } }
                        td {
                            @if let Some(cost) = row.cost_micros { (money(cost)) " " }
                            @if let Some(error) = &row.error { span.error { (engine::truncate_for_display(error, 300)) } " " }
                            @if let Some(detail) = &row.detail { (detail) }
                            @if let Some(actor) = &recorded.metadata.actor { " by " strong { (actor) } }
                        }
                    }
                }
            }
        }
        // Each event's payload, shown when its mark is clicked.
        div #payloads hidden {
            @for recorded in &events {
                div id=(format!("ev-{}", recorded.version)) {
                    h3 { "v" (recorded.version) " " (recorded.event.event_type()) " at " (recorded.recorded_at.format("%H:%M:%S%.3f")) }
                    pre { (payload(&recorded.event)) }
                }
            }
        }
    };
    layout(&format!("Task {}", short(task)), Some(&caller), body).into_response()
}

/// An event's payload as pretty JSON, cut at [`PAYLOAD_MAX_CHARS`].
fn payload(event: &engine::Event) -> String {
    let text = event
        .encode()
        .ok()
        .and_then(|(_, payload)| serde_json::to_string_pretty(&payload).ok())
        .unwrap_or_default();
    if text.chars().count() > PAYLOAD_MAX_CHARS {
        let cut: String = text.chars().take(PAYLOAD_MAX_CHARS).collect();
        format!("{cut}\n… (cut at {PAYLOAD_MAX_CHARS} characters)")
    } else {
        text
    }
}

/// The action's form fields. A body that is not a form (a script's empty POST) has none:
/// the credential check, not the parser, decides what happens to it.
fn action_form(body: &[u8]) -> ActionForm {
    serde_urlencoded::from_bytes(body).unwrap_or_default()
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct ActionForm {
    csrf: Option<String>,
    reason: Option<String>,
    redo_from: Option<String>,
}

/// What the actions share: the task (404 outside the console's channels), the caller
/// allowed to act, then the command; back to the task's page, or the command's refusal.
async fn act<F, Fut>(
    console: Arc<Console>,
    headers: HeaderMap,
    raw: String,
    form: ActionForm,
    command: F,
) -> Response
where
    F: FnOnce(Arc<Console>, TaskId, String, ActionForm) -> Fut,
    Fut: std::future::Future<Output = engine::Result<engine::TaskState>>,
{
    let task = match task_id(&raw) {
        Ok(task) => task,
        Err(response) => return *response,
    };
    let caller = match console.auth.check_action(&headers, form.csrf.as_deref()) {
        Ok(caller) => caller,
        Err(refusal) => return refusal.into_response(),
    };
    match console.store.tasks_by_id(&[task]).await {
        Ok(rows) if rows.iter().any(|r| console.sees(&r.channel_id)) => {}
        Ok(_) => return no_such_task(),
        Err(err) => return store_error(&err),
    }
    let actor = format!("console:{}", caller.name().unwrap_or("unknown"));
    match command(console, task, actor, form).await {
        Ok(_) => Redirect::to(&format!("/tasks/{task}")).into_response(),
        Err(
            err @ (engine::Error::InvalidState { .. }
            | engine::Error::NoReview { .. }
            | engine::Error::UnknownStep { .. }),
        ) => page_error(StatusCode::CONFLICT, &err.to_string()),
        Err(engine::Error::TaskNotFound(_)) => no_such_task(),
        Err(err) => store_error(&err),
    }
}

fn reason(form: &ActionForm) -> Option<String> {
    nonempty(&form.reason).map(|r| r.chars().take(500).collect())
}

/// The operator's actions, by the name in their URL.
#[derive(Clone, Copy, Debug)]
enum Action {
    Approve,
    Reject,
    Retry,
    Cancel,
}

/// `POST /tasks/{id}/{approve|reject|retry|cancel}`.
pub(crate) async fn action(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Path((raw, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let action = match name.as_str() {
        "approve" => Action::Approve,
        "reject" => Action::Reject,
        "retry" => Action::Retry,
        "cancel" => Action::Cancel,
        _ => return not_found().await,
    };
    let form = action_form(&body);
    act(
        console,
        headers,
        raw,
        form,
        async move |console, task, actor, form| {
            let store = &console.store;
            let by = Some(actor.as_str());
            match action {
                Action::Approve => commands::approve_as(store, task, Some(actor.clone()), by).await,
                Action::Reject => {
                    let redo_from = nonempty(&form.redo_from).unwrap_or_default().to_owned();
                    commands::reject_as(store, task, &redo_from, reason(&form), by).await
                }
                Action::Retry => match crate::archive::retry(store, task, by).await {
                    Ok(state) => Ok(state),
                    Err(crate::archive::ArchiveError::Engine(err)) => Err(err),
                    Err(err) => Err(engine::Error::InvalidInput(err.to_string())),
                },
                Action::Cancel => commands::cancel_as(store, task, reason(&form), by).await,
            }
        },
    )
    .await
}

pub(crate) async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("console.js"),
    )
}

pub(crate) async fn style() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("console.css"),
    )
}
