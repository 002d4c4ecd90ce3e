//! Local fakes of the cloud providers' APIs, over real HTTP (axum), speaking the shapes
//! `shared/reference/providers.md` records: Gemini's `generateContent` with an inline
//! base64 PNG, Runway's `image_to_video` tasks (PENDING → RUNNING → SUCCEEDED or FAILED,
//! THROTTLED beyond the account's concurrency, an output URL to download), ElevenLabs'
//! speech and sound generation answering MP3 bytes. Each checks its key and the request's
//! shape the way the provider does, and answers injected faults: a status with the
//! provider's error body, a 429 with `Retry-After` (or Gemini's `RetryInfo.retryDelay`),
//! a slow answer, an error that quotes the key back. Everything is counted: requests,
//! successes, Runway submissions (with their seed, which the pipeline sets to the clip
//! number) and the most tasks open at once.

#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use serde_json::{Value, json};
use steps::cloud::{Account, ApiKey, CloudConfig};

pub const GEMINI_KEY: &str = "fake-gemini-key-0123456789";
pub const RUNWAY_KEY: &str = "fake-runway-key-0123456789";
pub const ELEVENLABS_KEY: &str = "fake-elevenlabs-key-0123456789";
pub const VOICE_ID: &str = "FakeVoice01";

/// The endpoints faults can be injected into.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Gemini,
    RunwaySubmit,
    RunwayPoll,
    Speech,
    SoundEffects,
}

/// A one-shot fault: the next request to its endpoint with the right key gets it.
#[derive(Clone, Debug)]
pub enum Fault {
    /// This status with the provider's error body.
    Status(u16),
    /// 429 with `Retry-After: secs`.
    RateLimited { retry_after_secs: u64 },
    /// Gemini's 429: `RESOURCE_EXHAUSTED` with `RetryInfo.retryDelay` (e.g. "7s"), no header.
    RetryInfo { delay: &'static str },
    /// Wait this long, then answer normally.
    Delay(Duration),
    /// This status, with a message quoting the key the request carried.
    QuoteKey(u16),
    /// Gemini: 200 without an image, `finishReason` naming why.
    NoImage { reason: &'static str },
}

/// How a Runway task submitted next ends.
#[derive(Clone, Debug)]
pub enum JobEnd {
    Succeed,
    Fail { code: &'static str },
}

/// How the fakes behave.
#[derive(Clone, Debug)]
pub struct FakeOptions {
    /// How long a Runway task runs once it is RUNNING.
    pub job_duration: Duration,
    /// Tasks RUNNING at once; later ones are THROTTLED until one finishes.
    pub runway_concurrency: usize,
    /// Runway takes any `promptImage` data URI (the simulated composites are text), and
    /// a task runs from its creation (so one nobody polls still ends).
    pub any_image: bool,
    /// Faults that keep coming, for chaos runs.
    pub chaos: Chaos,
    /// How long a generating call takes to answer (Gemini, a Runway submit, ElevenLabs'
    /// speech and sound), like the real APIs' latencies scaled down.
    pub call_latency: Duration,
    /// How long a Runway poll or download takes to answer.
    pub poll_latency: Duration,
}

/// Faults on every Nth Runway request (counted per endpoint, from 1).
#[derive(Clone, Debug, Default)]
pub struct Chaos {
    /// Every Nth image-to-video request creates its task, then answers only after this
    /// wait (past the client's timeout, the answer is lost after Runway acted).
    pub slow_answer_every: Option<(u32, Duration)>,
    /// Every Nth task poll answers 503.
    pub failing_poll_every: Option<u32>,
    /// Every Nth image-to-video request is refused with 429 and `Retry-After: secs`,
    /// before any task is made.
    pub rate_limit_every: Option<(u32, u64)>,
}

impl Default for FakeOptions {
    fn default() -> Self {
        FakeOptions {
            job_duration: Duration::from_millis(300),
            runway_concurrency: 20,
            any_image: false,
            chaos: Chaos::default(),
            call_latency: Duration::ZERO,
            poll_latency: Duration::ZERO,
        }
    }
}

/// One Runway task.
#[derive(Clone, Debug)]
struct Task {
    seed: u64,
    end: JobEnd,
    started: Option<Instant>,
    /// A poll was answered with its end (SUCCEEDED or FAILED).
    collected: bool,
}

/// What the fakes counted.
#[derive(Clone, Debug, Default)]
pub struct Counts {
    pub gemini_requests: u32,
    pub images: u32,
    pub runway_submit_requests: u32,
    /// Accepted submissions' seeds, in order.
    pub submissions: Vec<u64>,
    pub polls: u32,
    pub throttled_answers: u32,
    pub downloads: u32,
    /// A download carried an `Authorization` header (the key sent to the output host).
    pub download_had_auth: bool,
    /// The most tasks submitted and not yet collected, at any moment.
    pub max_open: usize,
    /// The most tasks in flight at Runway at once: created and not yet at their end,
    /// whether or not anyone polls them (`any_image` runs only).
    pub max_in_flight: usize,
    /// Image-to-video requests answered with a task id only after a delay (chaos).
    pub slow_answers: u32,
    /// Polls answered with 503, and submits refused with 429 (chaos).
    pub failed_polls: u32,
    pub rate_limited_submits: u32,
    /// Every poll's time, by task id.
    pub poll_times: BTreeMap<String, Vec<Instant>>,
    pub speech_requests: u32,
    pub speech: u32,
    pub sfx_requests: u32,
    pub sfx: u32,
    /// The most generating calls answered at once, by provider ("gemini", "runway" for
    /// submits, "elevenlabs" for speech and sound together: one account).
    pub max_calls: BTreeMap<&'static str, usize>,
    /// Each Runway task's end (`any_image` runs: creation plus the job's duration) and
    /// when a poll first answered it, by task id (wall clock, to compare with the log's).
    pub job_ends: BTreeMap<String, JobTimes>,
}

/// When a Runway task ended, and when a poll first saw it.
#[derive(Clone, Copy, Debug)]
pub struct JobTimes {
    pub ended: std::time::SystemTime,
    pub seen: Option<std::time::SystemTime>,
}

/// A generating call in progress at one provider, counted until dropped.
struct Call {
    shared: Arc<Shared>,
    provider: &'static str,
}

impl Call {
    /// Counts a call at `provider`, then waits the call latency.
    async fn start(shared: &Arc<Shared>, provider: &'static str) -> Call {
        let latency = {
            let mut inner = shared.lock();
            let now = inner.calls.entry(provider).or_default();
            *now += 1;
            let now = *now;
            let most = inner.counts.max_calls.entry(provider).or_default();
            *most = (*most).max(now);
            inner.options.call_latency
        };
        let call = Call {
            shared: shared.clone(),
            provider,
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        call
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if let Some(now) = self.shared.lock().calls.get_mut(self.provider) {
            *now = now.saturating_sub(1);
        }
    }
}

/// Waits a poll's or download's latency.
async fn poll_latency(shared: &Shared) {
    let latency = shared.lock().options.poll_latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
}

/// The media every answer carries, made once by ffmpeg.
struct Media {
    png: Vec<u8>,
    mp4: Vec<u8>,
    mp3: Vec<u8>,
}

struct Inner {
    options: FakeOptions,
    faults: HashMap<Endpoint, VecDeque<Fault>>,
    job_ends: VecDeque<JobEnd>,
    tasks: BTreeMap<String, Task>,
    order: Vec<String>,
    counts: Counts,
    /// Generating calls in progress, by provider.
    calls: HashMap<&'static str, usize>,
}

struct Shared {
    url: String,
    media: Media,
    inner: Mutex<Inner>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The three fakes on one local port (their paths do not overlap).
pub struct FakeCloud {
    pub url: String,
    shared: Arc<Shared>,
}

impl FakeCloud {
    pub async fn start(options: FakeOptions) -> FakeCloud {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let shared = Arc::new(Shared {
            url: url.clone(),
            media: Media::make(),
            inner: Mutex::new(Inner {
                options,
                faults: HashMap::new(),
                job_ends: VecDeque::new(),
                tasks: BTreeMap::new(),
                order: Vec::new(),
                counts: Counts::default(),
                calls: HashMap::new(),
            }),
        });
        let app = Router::new()
            .route("/v1beta/models/{call}", post(gemini))
            .route("/v1/image_to_video", post(runway_submit))
            .route("/v1/tasks/{id}", get(runway_poll))
            .route("/outputs/{file}", get(download))
            .route("/v1/text-to-speech/{voice}", post(speech))
            .route("/v1/sound-generation", post(sound_effects))
            .with_state(shared.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeCloud { url, shared }
    }

    /// Queues `fault` for the next request to `endpoint`.
    pub fn fail_next(&self, endpoint: Endpoint, fault: Fault) {
        self.shared
            .lock()
            .faults
            .entry(endpoint)
            .or_default()
            .push_back(fault);
    }

    /// How the next submitted Runway task ends (default: it succeeds).
    pub fn end_next_job(&self, end: JobEnd) {
        self.shared.lock().job_ends.push_back(end);
    }

    pub fn counts(&self) -> Counts {
        self.shared.lock().counts.clone()
    }

    /// The cloud settings that reach these fakes with the right keys.
    pub fn config(&self) -> CloudConfig {
        let account = |key: &str| Account {
            key: Some(ApiKey::new(key)),
            base_url: self.url.clone(),
        };
        CloudConfig {
            gemini: account(GEMINI_KEY),
            runway: account(RUNWAY_KEY),
            elevenlabs: account(ELEVENLABS_KEY),
            voice_id: VOICE_ID.into(),
            timeout: Duration::from_secs(10),
            ..CloudConfig::default()
        }
    }

    /// The environment a `reel worker` needs to reach these fakes with the right keys.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("GEMINI_API_KEY", GEMINI_KEY.into()),
            ("GEMINI_API_URL", self.url.clone()),
            ("RUNWAY_API_KEY", RUNWAY_KEY.into()),
            ("RUNWAY_API_URL", self.url.clone()),
            ("ELEVENLABS_API_KEY", ELEVENLABS_KEY.into()),
            ("ELEVENLABS_API_URL", self.url.clone()),
            ("ELEVENLABS_VOICE_ID", VOICE_ID.into()),
        ]
    }

    /// The clip every finished task answers with (what a test writes as a source).
    pub fn clip(&self) -> Vec<u8> {
        self.shared.media.mp4.clone()
    }

    pub fn png(&self) -> Vec<u8> {
        self.shared.media.png.clone()
    }
}

impl Media {
    fn make() -> Media {
        let dir = tempfile::tempdir().expect("tempdir");
        let run = |args: &str, out: &str| -> Vec<u8> {
            let path = dir.path().join(out);
            let status = std::process::Command::new("ffmpeg")
                .args(["-hide_banner", "-loglevel", "error", "-y"])
                .args(args.split_whitespace())
                .arg(&path)
                .status()
                .expect("ffmpeg (apt-get install -y ffmpeg)");
            assert!(status.success(), "ffmpeg {args}");
            std::fs::read(&path).expect("read the media")
        };
        Media {
            png: run(
                "-f lavfi -i color=c=teal:s=320x180 -frames:v 1",
                "image.png",
            ),
            mp4: run(
                "-f lavfi -i testsrc=s=320x180:r=15:d=2 -c:v libx264 -preset ultrafast \
                 -pix_fmt yuv420p -movflags +faststart",
                "clip.mp4",
            ),
            mp3: run(
                "-f lavfi -i sine=f=440:d=1.5 -c:a libmp3lame -b:a 64k",
                "sound.mp3",
            ),
        }
    }
}

fn json_response(status: u16, body: Value) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, axum::Json(body)).into_response()
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

/// The provider's error body for `status`.
fn error_body(endpoint: Endpoint, status: u16, message: &str) -> Value {
    match endpoint {
        Endpoint::Gemini => {
            let name = match status {
                400 => "INVALID_ARGUMENT",
                403 => "PERMISSION_DENIED",
                429 => "RESOURCE_EXHAUSTED",
                503 => "UNAVAILABLE",
                _ => "INTERNAL",
            };
            json!({"error": {"code": status, "message": message, "status": name}})
        }
        Endpoint::RunwaySubmit | Endpoint::RunwayPoll => json!({"error": message}),
        Endpoint::Speech | Endpoint::SoundEffects => match status {
            422 => {
                json!({"detail": [{"loc": ["body", "text"], "msg": message, "type": "value_error"}]})
            }
            _ => {
                json!({"detail": {"type": "error", "code": "fake", "status": "fake_error", "message": message, "request_id": "req-1"}})
            }
        },
    }
}

/// The fault queued for `endpoint`, answered; `None`: answer normally.
async fn fault(shared: &Shared, endpoint: Endpoint, key: &str) -> Option<Response> {
    let next = shared
        .lock()
        .faults
        .get_mut(&endpoint)
        .and_then(VecDeque::pop_front)?;
    Some(match next {
        Fault::Status(status) => json_response(
            status,
            error_body(endpoint, status, &format!("injected failure {status}")),
        ),
        Fault::RateLimited { retry_after_secs } => {
            let mut response = json_response(
                429,
                error_body(endpoint, 429, "too_many_concurrent_requests"),
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            response
        }
        Fault::RetryInfo { delay } => json_response(
            429,
            json!({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED",
            "message": "You exceeded your current quota, please check your plan and billing details.",
            "details": [
                {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": []},
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}
            ]}}),
        ),
        Fault::Delay(wait) => {
            tokio::time::sleep(wait).await;
            return None;
        }
        Fault::QuoteKey(status) => json_response(
            status,
            error_body(
                endpoint,
                status,
                &format!("Incorrect API key provided: {key}"),
            ),
        ),
        Fault::NoImage { reason } => json_response(
            200,
            json!({"candidates": [{"content": {"parts": [], "role": "model"}, "finishReason": reason}],
                   "modelVersion": "gemini-2.5-flash-image"}),
        ),
    })
}

async fn gemini(
    State(shared): State<Arc<Shared>>,
    Path(call): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    shared.lock().counts.gemini_requests += 1;
    let key = header_str(&headers, "x-goog-api-key");
    if key.is_empty() {
        return json_response(
            403,
            error_body(
                Endpoint::Gemini,
                403,
                "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.",
            ),
        );
    }
    if key != GEMINI_KEY {
        return json_response(
            400,
            json!({"error": {"code": 400, "message": "API key not valid. Please pass a valid API key.",
                "status": "INVALID_ARGUMENT",
                "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID", "domain": "googleapis.com"}]}}),
        );
    }
    if let Some(answer) = fault(&shared, Endpoint::Gemini, key).await {
        return answer;
    }
    let _call = Call::start(&shared, "gemini").await;
    let request: Value = serde_json::from_slice(&body).unwrap_or_default();
    let prompt = request["contents"][0]["parts"][0]["text"]
        .as_str()
        .unwrap_or_default();
    let wants_image = request["generationConfig"]["responseModalities"]
        .as_array()
        .is_some_and(|m| m.iter().any(|v| v == "IMAGE"));
    if !call.ends_with(":generateContent") || prompt.is_empty() || !wants_image {
        return json_response(
            400,
            error_body(Endpoint::Gemini, 400, "Invalid JSON payload received."),
        );
    }
    shared.lock().counts.images += 1;
    let data = base64::engine::general_purpose::STANDARD.encode(&shared.media.png);
    json_response(
        200,
        json!({
            "candidates": [{"content": {"parts": [{"inlineData": {"mimeType": "image/png", "data": data}}],
                "role": "model"}, "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": 30, "candidatesTokenCount": 1290, "totalTokenCount": 1320},
            "modelVersion": "gemini-2.5-flash-image",
            "responseId": "fake-response"
        }),
    )
}

/// Runway's checks on every request: the bearer key and the API version.
fn runway_refusal(headers: &HeaderMap) -> Option<Response> {
    let key = header_str(headers, "authorization");
    if key != format!("Bearer {RUNWAY_KEY}") {
        return Some(json_response(401, json!({"error": "Invalid API key"})));
    }
    if header_str(headers, "x-runway-version") != steps::cloud::RUNWAY_API_VERSION {
        return Some(json_response(
            400,
            json!({"error": "Invalid or missing X-Runway-Version header"}),
        ));
    }
    None
}

async fn runway_submit(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    shared.lock().counts.runway_submit_requests += 1;
    if let Some(refused) = runway_refusal(&headers) {
        return refused;
    }
    let key = header_str(&headers, "authorization").trim_start_matches("Bearer ");
    if let Some(answer) = fault(&shared, Endpoint::RunwaySubmit, key).await {
        return answer;
    }
    let _call = Call::start(&shared, "runway").await;
    let (chaos, any_image) = {
        let inner = shared.lock();
        (inner.options.chaos.clone(), inner.options.any_image)
    };
    let number = shared.lock().counts.runway_submit_requests;
    if let Some((every, secs)) = chaos.rate_limit_every
        && number % every == 0
    {
        shared.lock().counts.rate_limited_submits += 1;
        let mut response = json_response(429, json!({"error": "You have exceeded your quota"}));
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        return response;
    }
    let request: Value = serde_json::from_slice(&body).unwrap_or_default();
    let checked = if any_image {
        Ok(())
    } else {
        check_image_to_video(&request)
    };
    if let Err(problem) = checked {
        return json_response(400, json!({"error": problem}));
    }
    let id = uuid::Uuid::new_v4().to_string();
    {
        let mut inner = shared.lock();
        let end = inner.job_ends.pop_front().unwrap_or(JobEnd::Succeed);
        let seed = request["seed"].as_u64().unwrap_or_default();
        inner.tasks.insert(
            id.clone(),
            Task {
                seed,
                end,
                started: any_image.then(Instant::now),
                collected: false,
            },
        );
        inner.order.push(id.clone());
        inner.counts.submissions.push(seed);
        if any_image {
            let ended = std::time::SystemTime::now() + inner.options.job_duration;
            inner
                .counts
                .job_ends
                .insert(id.clone(), JobTimes { ended, seen: None });
        }
        let open = inner.tasks.values().filter(|t| !t.collected).count();
        inner.counts.max_open = inner.counts.max_open.max(open);
        let duration = inner.options.job_duration;
        let in_flight = inner
            .tasks
            .values()
            .filter(|t| t.started.is_none_or(|at| at.elapsed() < duration))
            .count();
        inner.counts.max_in_flight = inner.counts.max_in_flight.max(in_flight);
    }
    if let Some((every, wait)) = chaos.slow_answer_every
        && number % every == 0
    {
        shared.lock().counts.slow_answers += 1;
        tokio::time::sleep(wait).await;
    }
    json_response(200, json!({ "id": id }))
}

/// What Runway checks in an image-to-video request.
fn check_image_to_video(request: &Value) -> Result<(), String> {
    let image = request["promptImage"].as_str().unwrap_or_default();
    let data = image
        .strip_prefix("data:image/png;base64,")
        .ok_or("promptImage must be an HTTPS URL or a data URI")?;
    let png = base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|_| "promptImage is not valid base64")?;
    if !png.starts_with(b"\x89PNG") {
        return Err("promptImage is not an image".into());
    }
    if request["model"].as_str().unwrap_or_default().is_empty() {
        return Err("model is required".into());
    }
    if request["ratio"] != "1280:720" {
        return Err("ratio is invalid".into());
    }
    match request["duration"].as_u64() {
        Some(2..=10) => {}
        _ => return Err("duration must be an integer from 2 to 10".into()),
    }
    if request["promptText"]
        .as_str()
        .is_some_and(|t| t.encode_utf16().count() > 1000)
    {
        return Err("promptText is too long".into());
    }
    Ok(())
}

async fn runway_poll(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let number = {
        let mut inner = shared.lock();
        inner.counts.polls += 1;
        inner
            .counts
            .poll_times
            .entry(id.clone())
            .or_default()
            .push(Instant::now());
        inner.counts.polls
    };
    if let Some(refused) = runway_refusal(&headers) {
        return refused;
    }
    let key = header_str(&headers, "authorization").trim_start_matches("Bearer ");
    if let Some(answer) = fault(&shared, Endpoint::RunwayPoll, key).await {
        return answer;
    }
    poll_latency(&shared).await;
    let failing = shared.lock().options.chaos.failing_poll_every;
    if failing.is_some_and(|every| number % every == 0) {
        shared.lock().counts.failed_polls += 1;
        return json_response(503, json!({"error": "Service temporarily unavailable"}));
    }
    let mut guard = shared.lock();
    let inner = &mut *guard;
    advance(inner);
    let duration = inner.options.job_duration;
    let Some(task) = inner.tasks.get_mut(&id) else {
        return json_response(404, json!({"error": "Task not found"}));
    };
    let created = "2026-01-01T00:00:00.000Z";
    let answer = match (task.started, &task.end) {
        (None, _) => json!({"id": id, "status": "THROTTLED", "createdAt": created}),
        (Some(at), _) if at.elapsed() < duration => {
            json!({"id": id, "status": "RUNNING", "createdAt": created, "progress": 0.5})
        }
        (Some(_), JobEnd::Succeed) => {
            task.collected = true;
            if let Some(times) = inner.counts.job_ends.get_mut(&id)
                && times.seen.is_none()
            {
                times.seen = Some(std::time::SystemTime::now());
            }
            json!({"id": id, "status": "SUCCEEDED", "createdAt": created,
                   "output": [format!("{}/outputs/{id}.mp4", shared.url)]})
        }
        (Some(_), JobEnd::Fail { code }) => {
            task.collected = true;
            json!({"id": id, "status": "FAILED", "createdAt": created,
                   "failure": "The generation failed.", "failureCode": code})
        }
    };
    if answer["status"] == "THROTTLED" {
        inner.counts.throttled_answers += 1;
    }
    json_response(200, answer)
}

/// Starts the oldest throttled tasks while fewer than the concurrency run.
fn advance(inner: &mut Inner) {
    let duration = inner.options.job_duration;
    let mut running = inner
        .tasks
        .values()
        .filter(|t| t.started.is_some_and(|at| at.elapsed() < duration))
        .count();
    for id in &inner.order {
        if running >= inner.options.runway_concurrency {
            break;
        }
        if let Some(task) = inner.tasks.get_mut(id)
            && task.started.is_none()
        {
            task.started = Some(Instant::now());
            running += 1;
        }
    }
}

async fn download(
    State(shared): State<Arc<Shared>>,
    Path(file): Path<String>,
    headers: HeaderMap,
) -> Response {
    poll_latency(&shared).await;
    let mut inner = shared.lock();
    inner.counts.downloads += 1;
    if headers.contains_key(header::AUTHORIZATION) {
        inner.counts.download_had_auth = true;
    }
    let id = file.trim_end_matches(".mp4");
    if !inner.tasks.contains_key(id) {
        return (StatusCode::NOT_FOUND, "no such output").into_response();
    }
    (
        [(header::CONTENT_TYPE, "video/mp4")],
        shared.media.mp4.clone(),
    )
        .into_response()
}

/// ElevenLabs' checks: the key and the output format.
fn elevenlabs_refusal(headers: &HeaderMap, query: &HashMap<String, String>) -> Option<Response> {
    if header_str(headers, "xi-api-key") != ELEVENLABS_KEY {
        return Some(json_response(
            401,
            json!({"detail": {"status": "invalid_api_key", "message": "Invalid API key"}}),
        ));
    }
    let format = query
        .get("output_format")
        .map(String::as_str)
        .unwrap_or("mp3_44100_128");
    if !["mp3_44100_128", "mp3_44100_64", "pcm_16000", "pcm_44100"].contains(&format) {
        return Some(json_response(
            422,
            json!({"detail": [{"loc": ["query", "output_format"], "msg": "invalid output format", "type": "value_error"}]}),
        ));
    }
    None
}

fn audio(bytes: &[u8]) -> Response {
    ([(header::CONTENT_TYPE, "audio/mpeg")], bytes.to_vec()).into_response()
}

async fn speech(
    State(shared): State<Arc<Shared>>,
    Path(voice): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    shared.lock().counts.speech_requests += 1;
    if let Some(refused) = elevenlabs_refusal(&headers, &query) {
        return refused;
    }
    if let Some(answer) = fault(
        &shared,
        Endpoint::Speech,
        header_str(&headers, "xi-api-key"),
    )
    .await
    {
        return answer;
    }
    let _call = Call::start(&shared, "elevenlabs").await;
    let request: Value = serde_json::from_slice(&body).unwrap_or_default();
    if voice != VOICE_ID {
        return json_response(
            404,
            json!({"detail": {"status": "voice_not_found", "message": "A voice with the voice_id was not found."}}),
        );
    }
    if request["text"].as_str().unwrap_or_default().is_empty() {
        return json_response(422, error_body(Endpoint::Speech, 422, "field required"));
    }
    shared.lock().counts.speech += 1;
    audio(&shared.media.mp3)
}

async fn sound_effects(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    shared.lock().counts.sfx_requests += 1;
    if let Some(refused) = elevenlabs_refusal(&headers, &query) {
        return refused;
    }
    if let Some(answer) = fault(
        &shared,
        Endpoint::SoundEffects,
        header_str(&headers, "xi-api-key"),
    )
    .await
    {
        return answer;
    }
    let _call = Call::start(&shared, "elevenlabs").await;
    let request: Value = serde_json::from_slice(&body).unwrap_or_default();
    let seconds_ok = request["duration_seconds"]
        .as_f64()
        .is_none_or(|s| (0.5..=30.0).contains(&s));
    if request["text"].as_str().unwrap_or_default().is_empty() || !seconds_ok {
        return json_response(
            422,
            json!({"detail": [{"loc": ["body", "duration_seconds"], "msg": "must be from 0.5 to 30", "type": "value_error"}]}),
        );
    }
    shared.lock().counts.sfx += 1;
    audio(&shared.media.mp3)
}
