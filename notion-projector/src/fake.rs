//! A local fake of the part of Notion's API the projector uses, over real HTTP, for tests
//! and the bench (feature `fake`).
//!
//! It answers `PATCH /v1/pages/{id}` and `GET /v1/pages/{id}` with Notion's shapes and
//! checks what Notion checks: 401 without the right bearer token, 400 `missing_version`
//! without `Notion-Version`, 400 `validation_error` for a malformed id, an unknown
//! property, a payload of the wrong property type or an unknown status option, 404
//! `object_not_found` for an unknown page, and a token bucket (3 requests/s by default)
//! answering 429 `rate_limited` with `Retry-After`. Faults are injectable: a queue of
//! one-shot faults (any status, a 502 as HTML like Notion's edge, a 429, a delay), an
//! outage answering one status to everything, an outage of one page, a share of requests
//! answered with an error at random (seeded: the same requests fail on every run), and a
//! latency on every answer. Every request is recorded with its arrival time and the answer
//! it got, and every page keeps the history of the values it was set to.
//!
//! Boards (`FakeNotion::add_board`) add data sources: `GET /v1/databases/{id}`,
//! `GET /v1/data_sources/{id}` (the schema), `POST /v1/data_sources/{id}/query` (filters
//! on title, rich text, select and status, `and`/`or`, cursors) and `POST /v1/pages` with a
//! data source parent, checked against the schema as Notion checks it.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::notion::{DEFAULT_NOTION_VERSION, NotionClient, NotionConfig, PropertyType, Token};
use crate::page_id::PageId;

mod board;

pub use board::FakeBoard;

/// How the fake behaves.
#[derive(Clone, Debug)]
pub struct FakeNotionOptions {
    /// The bearer token it accepts.
    pub token: String,
    /// The token bucket: requests per second on average...
    pub rate: f64,
    /// ...and at most this many at once.
    pub burst: f64,
    /// The `Retry-After` its 429s carry, in seconds.
    pub retry_after_secs: u64,
}

impl Default for FakeNotionOptions {
    fn default() -> Self {
        FakeNotionOptions {
            token: "ntn_fake_token_for_tests".into(),
            rate: 3.0,
            burst: 3.0,
            retry_after_secs: 1,
        }
    }
}

/// A one-shot fault: the next request that passes authentication and the rate limit gets it.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer this status with Notion's JSON error body (e.g. 500, 503, 504, 409).
    Status(u16),
    /// A 502 whose body is HTML, as Notion's edge sends it.
    BadGatewayHtml,
    /// A 429 with `Retry-After` of this many seconds.
    RateLimited { retry_after_secs: u64 },
    /// Wait this long, then answer normally (past the client's timeout: a timeout). The
    /// request is applied before the wait.
    Delay(Duration),
    /// Wait this long, then apply the request and answer: a request Notion works on slowly,
    /// which still lands after a client that gave up on it.
    Stall(Duration),
    /// Apply the request and answer 200, but with a body cut short (not readable as JSON),
    /// as when the connection breaks while the answer is read.
    GarbledSuccess,
    /// Answer 400 with the request's `Authorization` header echoed back, as a broken
    /// server or proxy might: in the JSON error's `code` (`json_code`), or in a non-JSON
    /// body after `offset` characters of text.
    EchoAuthorization { json_code: bool, offset: usize },
}

/// A share of requests answered with an error, drawn from a seeded generator: the n-th
/// request after [`FakeNotion::set_random_errors`] fails or not the same way on every run.
#[derive(Clone, Copy, Debug)]
pub struct RandomErrors {
    /// The share of requests that fail, 0 to 1 (0.15: 15%).
    pub rate: f64,
    /// The status they get (e.g. 500, 502 as HTML, 503).
    pub status: u16,
    pub seed: u64,
}

/// One request the fake received.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub at: Instant,
    pub method: String,
    /// The request's path, e.g. `/v1/data_sources/{id}/query`.
    pub path: String,
    /// The page id from the path, dashed lower-case when it is a valid id (as sent otherwise).
    pub page_id: String,
    /// The option name the body asked for, when it had one.
    pub value: Option<String>,
    /// The status the fake answered.
    pub response: u16,
    /// The `Authorization` header as received (tests check what the client sent).
    pub authorization: Option<String>,
}

#[derive(Debug)]
pub(crate) struct FakePage {
    /// The status property ("" on a board without one).
    property: String,
    kind: PropertyType,
    value: Option<String>,
    history: Vec<String>,
    /// Set for a card of a board (a page whose parent is a data source).
    card: Option<board::Card>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

#[derive(Debug)]
pub(crate) struct FakeState {
    options: FakeNotionOptions,
    pages: HashMap<String, FakePage>,
    bucket: Bucket,
    faults: VecDeque<Fault>,
    outage: Option<u16>,
    page_outages: HashMap<String, u16>,
    random_errors: Option<(RandomErrors, SplitMix64)>,
    latency: Duration,
    requests: Vec<RecordedRequest>,
    boards: board::Boards,
    /// Added to every `POST /v1/pages` answer, after the page is created.
    create_delay: Duration,
    /// Requests to these pages wait this long before they are applied and answered.
    page_stalls: HashMap<String, Duration>,
    /// Cards younger than this are not yet seen by queries (Notion's query lags its writes).
    query_lag: Duration,
    /// When the fake started: its pages' `last_edited_time` counts minutes from here.
    started: Instant,
}

/// SplitMix64: a small seeded generator, enough to spread faults (not for secrets).
#[derive(Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    /// The next value in [0, 1).
    fn next_unit(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub(crate) type Shared = Arc<Mutex<FakeState>>;

/// A running fake Notion on 127.0.0.1. Stops when dropped.
#[derive(Debug)]
pub struct FakeNotion {
    addr: SocketAddr,
    state: Shared,
    stop: CancellationToken,
}

impl FakeNotion {
    /// Starts a fake on a free local port.
    pub async fn start(options: FakeNotionOptions) -> std::io::Result<FakeNotion> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state: Shared = Arc::new(Mutex::new(FakeState {
            bucket: Bucket {
                tokens: options.burst,
                last: Instant::now(),
            },
            options,
            pages: HashMap::new(),
            faults: VecDeque::new(),
            outage: None,
            page_outages: HashMap::new(),
            random_errors: None,
            latency: Duration::ZERO,
            requests: Vec::new(),
            boards: board::Boards::default(),
            create_delay: Duration::ZERO,
            page_stalls: HashMap::new(),
            query_lag: Duration::ZERO,
            started: Instant::now(),
        }));
        let app = Router::new()
            .route("/v1/pages/{page_id}", get(get_page).patch(patch_page))
            .route("/v1/pages", post(board::create_page))
            .route("/v1/databases/{id}", get(board::get_database))
            .route("/v1/data_sources/{id}", get(board::get_data_source))
            .route("/v1/data_sources/{id}/query", post(board::query))
            .with_state(state.clone());
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stopped.cancelled().await })
                .await;
        });
        Ok(FakeNotion { addr, state, stop })
    }

    /// The base URL to give the projector as `NOTION_API_URL`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client for this fake with its token, the default `Notion-Version` and `timeout`.
    pub fn client(&self, timeout: Duration) -> NotionClient {
        self.client_with_token(&self.token(), timeout)
    }

    /// A client for this fake that sends `token` (a wrong one gets 401s).
    pub fn client_with_token(&self, token: &str, timeout: Duration) -> NotionClient {
        let config = NotionConfig {
            api_url: self.url(),
            token: Token::new(token),
            version: DEFAULT_NOTION_VERSION.into(),
            timeout,
        };
        match NotionClient::new(config) {
            Ok(client) => client,
            // Only a token with characters a header cannot carry gets here: a test's bug.
            Err(err) => panic!("a client for the fake Notion: {err}"),
        }
    }

    /// The token the fake accepts.
    pub fn token(&self) -> String {
        self.lock().options.token.clone()
    }

    fn lock(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a page in a data source whose `Status` property is of type status.
    pub fn add_page(&self, id: &str) {
        self.add_page_with(id, "Status", PropertyType::Status);
    }

    /// Adds a page whose status lives in `property` of type `kind`.
    pub fn add_page_with(&self, id: &str, property: &str, kind: PropertyType) {
        let key = normalise(id).unwrap_or_else(|| id.to_owned());
        self.lock().pages.insert(
            key,
            FakePage {
                property: property.to_owned(),
                kind,
                value: None,
                history: Vec::new(),
                card: None,
            },
        );
    }

    /// The option the page shows now.
    pub fn page_value(&self, id: &str) -> Option<String> {
        let key = normalise(id)?;
        self.lock().pages.get(&key).and_then(|p| p.value.clone())
    }

    /// Every value the page was set to, in order.
    pub fn page_history(&self, id: &str) -> Vec<String> {
        let Some(key) = normalise(id) else {
            return Vec::new();
        };
        self.lock()
            .pages
            .get(&key)
            .map(|p| p.history.clone())
            .unwrap_or_default()
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.lock().requests.clone()
    }

    /// How many requests got `status`.
    pub fn count(&self, status: u16) -> usize {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.response == status)
            .count()
    }

    /// Queues one-shot faults for the next requests.
    pub fn inject(&self, faults: impl IntoIterator<Item = Fault>) {
        self.lock().faults.extend(faults);
    }

    /// Answers every request with `status` (a JSON error) until set back to `None`.
    pub fn set_outage(&self, status: Option<u16>) {
        self.lock().outage = status;
    }

    /// Answers every request to page `id` with `status` (a JSON error, or HTML for 502)
    /// until set back to `None`; other pages are served as usual.
    pub fn set_page_outage(&self, id: &str, status: Option<u16>) {
        let key = normalise(id).unwrap_or_else(|| id.to_owned());
        let mut state = self.lock();
        match status {
            Some(status) => state.page_outages.insert(key, status),
            None => state.page_outages.remove(&key),
        };
    }

    /// Answers a share of the requests that pass the rate limit with an error, at random
    /// from a seed; `None` stops it.
    pub fn set_random_errors(&self, errors: Option<RandomErrors>) {
        self.lock().random_errors = errors.map(|e| (e, SplitMix64(e.seed)));
    }

    /// Delays every answer by `latency`.
    pub fn set_latency(&self, latency: Duration) {
        self.lock().latency = latency;
    }

    /// Delays every `POST /v1/pages` answer by `delay`, after the page is created: a
    /// client that gives up or dies meanwhile has made a card it did not hear about.
    pub fn set_create_delay(&self, delay: Duration) {
        self.lock().create_delay = delay;
    }

    /// Holds every request to page `id` for `stall` before it is applied and answered (a
    /// request that hangs at Notion); `None` ends it for requests that arrive later.
    pub fn set_page_stall(&self, id: &str, stall: Option<Duration>) {
        let key = normalise(id).unwrap_or_else(|| id.to_owned());
        let mut state = self.lock();
        match stall {
            Some(stall) => state.page_stalls.insert(key, stall),
            None => state.page_stalls.remove(&key),
        };
    }

    /// Hides cards from queries until they are `lag` old, as Notion's query may lag its
    /// writes (a create's page is found by a query only later).
    pub fn set_query_lag(&self, lag: Duration) {
        self.lock().query_lag = lag;
    }

    /// Stops answering (the port closes).
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for FakeNotion {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub(crate) fn normalise(id: &str) -> Option<String> {
    PageId::parse(id).ok().map(|p| p.as_str().to_owned())
}

async fn get_page(
    State(state): State<Shared>,
    Path(page_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let path = format!("/v1/pages/{page_id}");
    handle(state, "GET", path, page_id, headers, None, Route::Page).await
}

async fn patch_page(
    State(state): State<Shared>,
    Path(page_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = format!("/v1/pages/{page_id}");
    handle(
        state,
        "PATCH",
        path,
        page_id,
        headers,
        Some(body),
        Route::Page,
    )
    .await
}

/// What a request asks for, past the checks every request gets.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Route {
    /// `GET` or `PATCH /v1/pages/{id}`.
    Page,
    /// `POST /v1/pages`.
    CreatePage,
    /// `GET /v1/databases/{id}`.
    Database,
    /// `GET /v1/data_sources/{id}`.
    DataSource,
    /// `POST /v1/data_sources/{id}/query`.
    Query,
}

/// Handles a request. The latency (`set_latency`) is the network's: a client that gives up
/// meanwhile closes the connection and the request never arrives. Past it the request has
/// arrived, and like Notion the fake carries it out to the end even when the client gives
/// up on it (a stall, `set_page_stall` or `Fault::Stall`, is Notion working slowly).
pub(crate) async fn handle(
    state: Shared,
    method: &'static str,
    path: String,
    page_id: String,
    headers: HeaderMap,
    body: Option<Bytes>,
    route: Route,
) -> Response {
    let at = Instant::now();
    let latency = state.lock().map(|s| s.latency).unwrap_or_default();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let handled = tokio::spawn(handle_detached(
        state, method, path, page_id, headers, body, route, at,
    ));
    handled
        .await
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

#[allow(clippy::too_many_arguments)]
async fn handle_detached(
    state: Shared,
    method: &'static str,
    path: String,
    page_id: String,
    headers: HeaderMap,
    body: Option<Bytes>,
    route: Route,
    at: Instant,
) -> Response {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let parsed: Option<Value> = body.as_ref().and_then(|b| serde_json::from_slice(b).ok());
    let value = parsed.as_ref().and_then(requested_value);
    let stall = {
        let s = state.lock().unwrap_or_else(|e| e.into_inner());
        normalise(&page_id).and_then(|key| s.page_stalls.get(&key).copied())
    };
    if let Some(stall) = stall {
        tokio::time::sleep(stall).await;
    }
    let passed = {
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        gate(&mut s, &page_id, &headers)
    };
    if let Ok(Pass {
        stall: Some(stall), ..
    }) = &passed
    {
        tokio::time::sleep(*stall).await;
    }
    let (answer, delay, garbled) = {
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        match passed {
            Err(answer) => (answer, None, false),
            Ok(pass) => {
                let answer = match route {
                    Route::Page => page_answer(&mut s, &page_id, body.as_deref(), parsed.as_ref()),
                    other => board::answer(&mut s, other, &page_id, parsed.as_ref()),
                };
                let delay = match route {
                    Route::CreatePage if !s.create_delay.is_zero() => {
                        Some(pass.delay.unwrap_or_default() + s.create_delay)
                    }
                    _ => pass.delay,
                };
                (answer, delay, pass.garbled)
            }
        }
    };
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    let (status, response) = match answer {
        Answer::Page(page) if garbled => {
            let text = page.to_string();
            let cut: String = text.chars().take(text.chars().count() / 2).collect();
            (
                200,
                (
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, "application/json")],
                    cut,
                )
                    .into_response(),
            )
        }
        Answer::Page(page) => (200, (StatusCode::OK, axum::Json(page)).into_response()),
        Answer::Echo { json_code, offset } => {
            let echoed = authorization.clone().unwrap_or_default();
            let response = if json_code {
                error_response(400, &echoed, "Bad request.", None)
            } else {
                let text = format!("{}{echoed} was refused", "x".repeat(offset));
                (
                    StatusCode::BAD_REQUEST,
                    [(header::CONTENT_TYPE, "text/plain")],
                    text,
                )
                    .into_response()
            };
            (400, response)
        }
        Answer::Error {
            status,
            code,
            message,
            retry_after,
        } => (status, error_response(status, code, &message, retry_after)),
        Answer::Html(status) => (
            status,
            (
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                [(header::CONTENT_TYPE, "text/html")],
                "<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center><hr><center>cloudflare</center></body></html>",
            )
                .into_response(),
        ),
    };
    if let Ok(mut s) = state.lock() {
        s.requests.push(RecordedRequest {
            at,
            method: method.to_owned(),
            path,
            page_id: normalise(&page_id).unwrap_or(page_id),
            value,
            response: status,
            authorization,
        });
    }
    response
}

pub(crate) enum Answer {
    Page(Value),
    Error {
        status: u16,
        code: &'static str,
        message: String,
        retry_after: Option<u64>,
    },
    Html(u16),
    /// A 400 that echoes the request's `Authorization` header (see [`Fault::EchoAuthorization`]).
    Echo {
        json_code: bool,
        offset: usize,
    },
}

/// A request past the checks every request gets, and the faults it still carries.
#[derive(Debug, Default)]
struct Pass {
    /// Answer this much later (after applying).
    delay: Option<Duration>,
    /// Apply this much later.
    stall: Option<Duration>,
    /// Answer 200 with a cut body.
    garbled: bool,
}

pub(crate) fn error(status: u16, code: &'static str, message: impl Into<String>) -> Answer {
    Answer::Error {
        status,
        code,
        message: message.into(),
        retry_after: None,
    }
}

/// The checks every request gets, in the order Notion makes them: authentication,
/// version, rate limit, injected faults (`page_id`'s outage too); what is left to do to a
/// request that passes.
fn gate(s: &mut FakeState, page_id: &str, headers: &HeaderMap) -> Result<Pass, Answer> {
    let expected = format!("Bearer {}", s.options.token);
    if headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        != Some(expected.as_str())
    {
        return Err(error(401, "unauthorized", "API token is invalid."));
    }
    if headers.get("notion-version").is_none() {
        return Err(error(
            400,
            "missing_version",
            "Notion-Version header failed validation: Notion-Version header should be defined, instead was `undefined`.",
        ));
    }
    let now = Instant::now();
    let elapsed = now.duration_since(s.bucket.last).as_secs_f64();
    s.bucket.tokens = (s.bucket.tokens + elapsed * s.options.rate).min(s.options.burst);
    s.bucket.last = now;
    if s.bucket.tokens < 1.0 {
        return Err(Answer::Error {
            status: 429,
            code: "rate_limited",
            message: "You have been rate limited. Please try again in a few minutes.".into(),
            retry_after: Some(s.options.retry_after_secs),
        });
    }
    s.bucket.tokens -= 1.0;
    let mut pass = Pass::default();
    if let Some(status) = s.outage {
        return Err(outage_answer(status));
    }
    if let Some(status) = normalise(page_id).and_then(|key| s.page_outages.get(&key).copied()) {
        return Err(outage_answer(status));
    }
    if let Some((errors, random)) = &mut s.random_errors
        && random.next_unit() < errors.rate
    {
        return Err(outage_answer(errors.status));
    }
    match s.faults.pop_front() {
        Some(Fault::Status(status)) => return Err(outage_answer(status)),
        Some(Fault::BadGatewayHtml) => return Err(Answer::Html(502)),
        Some(Fault::RateLimited { retry_after_secs }) => {
            return Err(Answer::Error {
                status: 429,
                code: "rate_limited",
                message: "You have been rate limited. Please try again in a few minutes.".into(),
                retry_after: Some(retry_after_secs),
            });
        }
        Some(Fault::Delay(d)) => pass.delay = Some(d),
        Some(Fault::Stall(d)) => pass.stall = Some(d),
        Some(Fault::GarbledSuccess) => pass.garbled = true,
        Some(Fault::EchoAuthorization { json_code, offset }) => {
            return Err(Answer::Echo { json_code, offset });
        }
        None => {}
    }
    Ok(pass)
}
/// The answer to `GET`/`PATCH /v1/pages/{id}`: the id, the page, the body.
fn page_answer(
    s: &mut FakeState,
    page_id: &str,
    body: Option<&[u8]>,
    parsed: Option<&Value>,
) -> Answer {
    let Some(key) = normalise(page_id) else {
        return error(
            400,
            "validation_error",
            format!(
                "path failed validation: path.page_id should be a valid uuid, instead was `\"{page_id}\"`."
            ),
        );
    };
    let Some(page) = s.pages.get_mut(&key) else {
        return error(
            404,
            "object_not_found",
            format!(
                "Could not find page with ID: {key}. Make sure the relevant pages and databases are shared with your integration."
            ),
        );
    };
    if body.is_some() {
        let Some(parsed) = parsed else {
            return error(400, "invalid_json", "Error parsing JSON body.");
        };
        let schema = page
            .card
            .as_ref()
            .and_then(|card| s.boards.schema(&card.data_source));
        if let Err(message) = apply(page, parsed, schema) {
            return error(400, "validation_error", message);
        }
    }
    Answer::Page(page_object(&key, page, s.started))
}

fn outage_answer(status: u16) -> Answer {
    match status {
        502 => Answer::Html(502),
        429 | 529 => Answer::Error {
            status,
            code: if status == 429 {
                "rate_limited"
            } else {
                "service_overload"
            },
            message: "Please try again later.".into(),
            retry_after: Some(1),
        },
        500 => error(500, "internal_server_error", "Unexpected error occurred."),
        503 => error(
            503,
            "service_unavailable",
            "Notion is unavailable, please try again later.",
        ),
        504 => error(
            504,
            "gateway_timeout",
            "Notion timed out while processing the request.",
        ),
        409 => error(
            409,
            "conflict_error",
            "Conflict occurred while saving. Please try again.",
        ),
        other => error(other, "internal_server_error", "Injected failure."),
    }
}

fn requested_value(body: &Value) -> Option<String> {
    let properties = body.get("properties")?.as_object()?;
    properties.values().find_map(|v| {
        ["status", "select"]
            .iter()
            .find_map(|k| v.get(k)?.get("name")?.as_str().map(str::to_owned))
    })
}

/// Applies a `properties` body to the page, or says why Notion would refuse it.
fn apply(page: &mut FakePage, body: &Value, schema: Option<&board::Schema>) -> Result<(), String> {
    let Some(object) = body.as_object() else {
        return Err("body failed validation: body should be an object.".into());
    };
    if let Some(key) = object.keys().find(|k| k.as_str() != "properties") {
        return Err(format!(
            "body failed validation: {key} is not an allowed property."
        ));
    }
    let Some(properties) = object.get("properties").and_then(Value::as_object) else {
        return Ok(());
    };
    if let Some(schema) = schema {
        return board::apply_card(page, properties, schema);
    }
    for (name, value) in properties {
        if *name != page.property {
            return Err(format!("{name} is not a property that exists."));
        }
        let kind = page.kind.as_str();
        let Some(option) = value.get(kind) else {
            return Err(format!("{name} is expected to be {kind}."));
        };
        let Some(option_name) = option.get("name").and_then(Value::as_str) else {
            return Err(format!(
                "body failed validation: body.properties.{name}.{kind}.name should be defined."
            ));
        };
        if option_name.is_empty()
            || option_name.chars().count() > 2000
            || (option_name.contains(',') && page.kind == PropertyType::Select)
        {
            return Err(format!("Invalid select option name: {option_name}"));
        }
        if page.kind == PropertyType::Status && !BOARD_STATUS_OPTIONS.contains(&option_name) {
            return Err(format!(
                "Invalid status option. Status option \"{option_name}\" does not exist."
            ));
        }
        page.value = Some(option_name.to_owned());
        page.history.push(option_name.to_owned());
    }
    Ok(())
}

/// The options of the fake board's Status property: the engine's lifecycle and the video
/// workflow's step statuses, as the content team's board has them. Notion refuses any
/// other name for a status property.
pub(crate) const BOARD_STATUS_OPTIONS: [&str; 13] = [
    "Queued",
    "Generating Assets",
    "Generating Composites",
    "Generating Video",
    "Generating Audio",
    "Generating SFX",
    "Assembling",
    "Retry Scheduled",
    "Final Review",
    "Completed",
    "Failed",
    "Cancelled",
    "Rejected",
];

fn page_object(id: &str, page: &FakePage, started: Instant) -> Value {
    if let Some(card) = &page.card {
        return board::card_object(id, card, started);
    }
    let kind = page.kind.as_str();
    let option = page
        .value
        .as_ref()
        .map(|name| json!({"id": format!("opt-{}", name.len()), "name": name, "color": "default"}));
    json!({
        "object": "page",
        "id": id,
        "parent": {"type": "data_source_id", "data_source_id": "00000000-0000-4000-8000-000000000001"},
        "in_trash": false,
        "properties": { page.property.clone(): {"id": "%3FsVd", "type": kind, kind: option} },
    })
}

pub(crate) fn error_response(
    status: u16,
    code: &str,
    message: &str,
    retry_after: Option<u64>,
) -> Response {
    let request_id = uuid::Uuid::new_v4().to_string();
    let body = json!({
        "object": "error",
        "status": status,
        "code": code,
        "message": message,
        "request_id": request_id,
    });
    let mut response = (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        axum::Json(body),
    )
        .into_response();
    if let Ok(id) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-notion-request-id", id);
    }
    if let Some(seconds) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}
