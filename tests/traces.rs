//! Traces (issue 29): a task is one trace, whatever ran it. A real OTLP/HTTP receiver (an
//! axum server decoding the protobuf the exporters send) collects the spans of real
//! processes: `reel submit`, two `reel worker`s with a SIGKILL between them, and a
//! notion-projector (`reel-projector-fixture`: the projector's own `main`) sending the
//! task's status to a fake Notion. Every span carries the trace id of the submit; nothing
//! is exported unless the standard variables say where.

mod common;
#[path = "common/deploy_fixture.rs"]
mod deploy_fixture;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use deploy_fixture::{fixture, kill, provider_tables};
use engine::TaskId;
use engine::testing::TestDatabase;
use notion_projector::fake::{FakeNotion, FakeNotionOptions};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message;

/// One span as the receiver decoded it.
#[derive(Clone, Debug)]
struct ReceivedSpan {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attributes: HashMap<String, String>,
}

impl ReceivedSpan {
    fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

/// What the receiver got: every span, and how many export requests came.
#[derive(Default)]
struct Received {
    spans: Vec<ReceivedSpan>,
    requests: usize,
}

type Shared = Arc<Mutex<Received>>;

fn text(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn attributes(attrs: &[KeyValue]) -> HashMap<String, String> {
    attrs
        .iter()
        .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `POST /v1/traces`, as a collector serves it: protobuf in, protobuf out.
async fn export(
    State(received): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, [(header::HeaderName, &'static str); 1], Vec<u8>) {
    let proto = [(header::CONTENT_TYPE, "application/x-protobuf")];
    if headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        != Some("application/x-protobuf")
    {
        return (StatusCode::UNSUPPORTED_MEDIA_TYPE, proto, Vec::new());
    }
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return (StatusCode::BAD_REQUEST, proto, Vec::new());
    };
    let mut received = received.lock().expect("receiver");
    received.requests += 1;
    for resource in request.resource_spans {
        let service = resource
            .resource
            .as_ref()
            .map(|r| attributes(&r.attributes))
            .and_then(|attrs| attrs.get("service.name").cloned())
            .unwrap_or_default();
        for scope in resource.scope_spans {
            for span in scope.spans {
                received.spans.push(ReceivedSpan {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    attributes: attributes(&span.attributes),
                });
            }
        }
    }
    (
        StatusCode::OK,
        proto,
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
}

/// An OTLP/HTTP receiver on `addr`; returns its address and what it receives.
async fn receiver(addr: &str) -> (SocketAddr, Shared) {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .unwrap_or_else(|err| panic!("the OTLP receiver cannot listen on {addr}: {err}"));
    let local = listener.local_addr().expect("address");
    let received = Shared::default();
    let app = axum::Router::new()
        .route("/v1/traces", axum::routing::post(export))
        .with_state(received.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (local, received)
}

fn spans(received: &Shared) -> Vec<ReceivedSpan> {
    received.lock().expect("receiver").spans.clone()
}

fn requests(received: &Shared) -> usize {
    received.lock().expect("receiver").requests
}

/// The variables that turn the export on, for a process named `service`.
fn otel(endpoint: SocketAddr, service: &str) -> Vec<(String, String)> {
    vec![
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
            format!("http://{endpoint}"),
        ),
        ("OTEL_SERVICE_NAME".into(), service.into()),
        // Spans leave within 100 ms of ending: a SIGKILL loses only what is still open.
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
    ]
}

fn submit(db: &TestDatabase, page: Option<&str>, envs: &[(String, String)]) -> TaskId {
    let mut command = fixture(db, "v1", 300, 400);
    command.args(["submit", "--channel", "traces", "--input", "{}"]);
    if let Some(page) = page {
        command.args(["--notion-page", page]);
    }
    let out = command
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("submit");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a task id")
}

async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn wait_for_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("poll the worker") {
            return status;
        }
        assert!(started.elapsed() < limit, "the worker did not finish");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The metadata `task_submitted` was stored with.
async fn submitted_metadata(db: &TestDatabase, task: TaskId) -> serde_json::Value {
    sqlx::query_scalar(
        "SELECT metadata FROM events WHERE stream_id = $1 AND stream_version = 1 \
           AND event_type = 'task_submitted'",
    )
    .bind(task.as_uuid())
    .fetch_one(db.pool())
    .await
    .expect("task_submitted")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_is_one_trace_across_two_workers_a_kill_and_the_projector() {
    let db = TestDatabase::create().await;
    provider_tables(&db).await;
    let (endpoint, received) = receiver("127.0.0.1:0").await;
    let notion = FakeNotion::start(FakeNotionOptions::default())
        .await
        .expect("fake Notion");
    let page = uuid::Uuid::new_v4().simple().to_string();
    notion.add_page(&page);

    let task = submit(&db, Some(&page), &otel(endpoint, "submitter"));
    wait_until("the submit's span", Duration::from_secs(10), || {
        spans(&received).iter().any(|s| s.name == "reel.submit")
    })
    .await;
    let submit_span = spans(&received)
        .into_iter()
        .find(|s| s.name == "reel.submit")
        .expect("submit span");
    assert_eq!(submit_span.service, "submitter");
    assert_eq!(
        submit_span.attr("reel.task_id"),
        Some(task.to_string().as_str())
    );
    // The log holds the submit span's context: the parent of everything that follows.
    let metadata = submitted_metadata(&db, task).await;
    assert_eq!(
        metadata["traceparent"],
        format!("00-{}-{}-01", submit_span.trace_id, submit_span.span_id)
    );
    let trace = submit_span.trace_id.clone();

    let mut projector = Command::new(env!("CARGO_BIN_EXE_reel-projector-fixture"))
        .args([
            "--database-url",
            db.url(),
            "--notion-token",
            &notion.token(),
            "--notion-api-url",
            &notion.url(),
            "--poll-interval",
            "200ms",
        ])
        .envs(otel(endpoint, "projector"))
        .env("REEL_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the projector");

    // The first worker: killed once two of its items are exported.
    let mut first = fixture(&db, "v1", 300, 400)
        .args([
            "worker",
            "--concurrency",
            "1",
            "--worker-id",
            "first",
            "--lease-ttl",
            "2",
        ])
        .envs(otel(endpoint, "worker-1"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the first worker");
    wait_until(
        "two items of the first worker",
        Duration::from_secs(30),
        || {
            spans(&received)
                .iter()
                .filter(|s| s.service == "worker-1" && s.name == "reel.item")
                .count()
                >= 2
        },
    )
    .await;
    kill(&mut first);
    let done_by_first: BTreeSet<i64> = sqlx::query_scalar(
        "SELECT (payload->>'item')::bigint FROM events WHERE stream_id = $1 \
           AND event_type = 'item_completed' AND payload->>'step' = 'frames'",
    )
    .bind(task.as_uuid())
    .fetch_all(db.pool())
    .await
    .expect("items")
    .into_iter()
    .collect();
    assert!(
        !done_by_first.is_empty() && done_by_first.len() < 6,
        "{done_by_first:?}"
    );

    // The second worker takes the task over once the lease lapses, and finishes it.
    let mut second = fixture(&db, "v1", 300, 400)
        .args(["worker", "--until-idle", "--worker-id", "second"])
        .envs(otel(endpoint, "worker-2"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the second worker");
    let status = wait_for_exit(&mut second, Duration::from_secs(60));
    assert!(status.success(), "{status}");
    wait_until("the board shows the end", Duration::from_secs(10), || {
        notion.page_value(&page).as_deref() == Some("Completed")
    })
    .await;
    wait_until(
        "the projector's request spans",
        Duration::from_secs(10),
        || {
            spans(&received).iter().any(|s| {
                s.service == "projector"
                    && s.name == "notion.sync"
                    && s.attr("reel.status") == Some("Completed")
            })
        },
    )
    .await;
    kill(&mut projector);

    let all = spans(&received);
    // One trace: every span any process exported (there is one task) is in it.
    for span in &all {
        assert_eq!(
            span.trace_id, trace,
            "{} of {} is not in the submit's trace",
            span.name, span.service
        );
    }
    let of = |service: &str, name: &str| -> Vec<&ReceivedSpan> {
        all.iter()
            .filter(|s| s.service == service && s.name == name)
            .collect()
    };
    // The second worker's attempt is a child of the submit (the first one's never ended:
    // SIGKILL), and it ran only what the first did not.
    let attempts = of("worker-2", "reel.attempt");
    assert!(!attempts.is_empty());
    for attempt in &attempts {
        assert_eq!(attempt.parent_span_id, submit_span.span_id);
        assert_eq!(
            attempt.attr("reel.task_id"),
            Some(task.to_string().as_str())
        );
    }
    assert_eq!(
        attempts.last().and_then(|a| a.attr("reel.outcome")),
        Some("completed")
    );
    let items: Vec<(&ReceivedSpan, i64)> = all
        .iter()
        .filter(|s| s.name == "reel.item")
        .map(|s| {
            let attempt = s
                .attr("reel.attempt")
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("{s:?} has no attempt"));
            (s, attempt)
        })
        .collect();
    for (span, _) in &items {
        assert_eq!(span.attr("reel.step"), Some("frames"), "{span:?}");
        let item: u32 = span
            .attr("reel.item")
            .and_then(|i| i.parse().ok())
            .unwrap_or_else(|| panic!("{span:?} has no item"));
        assert!((1..=6).contains(&item), "{span:?}");
    }
    let first_attempts: BTreeSet<i64> = items
        .iter()
        .filter(|(s, _)| s.service == "worker-1")
        .map(|(_, a)| *a)
        .collect();
    let second_attempts: BTreeSet<i64> = items
        .iter()
        .filter(|(s, _)| s.service == "worker-2")
        .map(|(_, a)| *a)
        .collect();
    assert_eq!(first_attempts.len(), 1, "{first_attempts:?}");
    assert!(
        second_attempts
            .iter()
            .all(|a| first_attempts.iter().all(|f| a > f)),
        "a later attempt: {first_attempts:?} then {second_attempts:?}"
    );
    for (span, _) in items.iter().filter(|(s, _)| s.service == "worker-2") {
        let item: i64 = span
            .attr("reel.item")
            .and_then(|i| i.parse().ok())
            .unwrap_or(0);
        assert!(
            !done_by_first.contains(&item),
            "item {item} ran again after the first worker had recorded it"
        );
    }
    // The job step's provider calls, and the appends, are in the trace too.
    for name in [
        "reel.step",
        "reel.provider.submit",
        "reel.provider.poll",
        "reel.append",
    ] {
        assert!(!of("worker-2", name).is_empty(), "no {name} span");
    }
    for span in of("worker-2", "reel.provider.submit") {
        assert_eq!(span.attr("reel.step"), Some("render"));
        assert!(span.attr("reel.item").is_some() && span.attr("reel.attempt").is_some());
    }
    let syncs = of("projector", "notion.sync");
    assert!(
        syncs
            .iter()
            .all(|s| s.attr("reel.task_id") == Some(task.to_string().as_str())),
        "{syncs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_exported_unless_the_variables_say_where() {
    let db = TestDatabase::create().await;
    provider_tables(&db).await;
    // Where an exporter with no endpoint configured would send: the OTLP/HTTP default.
    let (default_endpoint, received) = receiver("127.0.0.1:4318").await;
    // Variables that do not name an endpoint turn nothing on.
    let unset = vec![
        ("OTEL_SERVICE_NAME".to_owned(), "quiet".to_owned()),
        ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "100".to_owned()),
        (
            "OTEL_RESOURCE_ATTRIBUTES".to_owned(),
            "team=video".to_owned(),
        ),
    ];
    let quiet = submit(&db, None, &unset);
    let mut worker = fixture(&db, "v1", 20, 200)
        .args(["worker", "--until-idle"])
        .envs(unset.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start a worker");
    assert!(wait_for_exit(&mut worker, Duration::from_secs(60)).success());
    // An endpoint with the SDK disabled exports nothing either.
    let mut disabled = otel(default_endpoint, "disabled");
    disabled.push(("OTEL_SDK_DISABLED".into(), "true".into()));
    let untraced = submit(&db, None, &disabled);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(requests(&received), 0, "{:?}", spans(&received));
    for task in [quiet, untraced] {
        let metadata = submitted_metadata(&db, task).await;
        assert!(metadata.get("traceparent").is_none(), "{metadata}");
    }

    // A task submitted without a trace still is one trace: its id is the task's.
    let mut worker = fixture(&db, "v1", 20, 200)
        .args(["worker", "--until-idle"])
        .envs(otel(default_endpoint, "worker"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start a worker");
    assert!(wait_for_exit(&mut worker, Duration::from_secs(60)).success());
    let all = spans(&received);
    // One attempt, or more when the task parked on its jobs and was claimed again.
    let attempts: Vec<&ReceivedSpan> = all.iter().filter(|s| s.name == "reel.attempt").collect();
    assert!(!attempts.is_empty());
    for attempt in attempts {
        assert_eq!(
            attempt.attr("reel.task_id"),
            Some(untraced.to_string().as_str())
        );
    }
    for span in &all {
        assert_eq!(
            span.trace_id,
            untraced.as_uuid().simple().to_string(),
            "{span:?}"
        );
        assert_eq!(span.service, "worker");
    }
    assert!(all.iter().filter(|s| s.name == "reel.item").count() >= 6);
}
