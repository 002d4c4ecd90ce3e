//! A job provider in memory that counts what reached it, and the helpers the provider-job
//! tests share: a worker in this process, waits on a task's status, the audit.

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use engine::{
    Backoff, BoxFuture, Event, ItemOutput, JobStatus, JobWork, PgStore, Registry, RetryPolicy,
    Step, StepContext, StepError, Submission, TaskId, TaskStatus, Worker, WorkerOptions, Workflow,
    fold,
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// One job the fake provider created.
#[derive(Clone, Debug)]
pub struct Job {
    pub id: String,
    pub item: u32,
    pub created: Instant,
    pub duration: Duration,
}

/// What the next submit call meets (in call order; past the queue, an acceptance).
#[derive(Clone, Debug)]
pub enum SubmitFate {
    Accept,
    /// The job is created, but its answer is lost (a timeout after the provider acted).
    LoseAnswer,
    /// Refused before any job is made.
    Refuse(StepError),
}

/// A job provider in memory that counts what reached it.
#[derive(Default)]
pub struct Fake {
    /// Durations of the jobs created next, in order (then `usual`).
    pub durations: Mutex<VecDeque<Duration>>,
    pub usual: Duration,
    /// Pending answers carry the time left as the hint.
    pub hint: bool,
    /// The first poll of a job hints this (instead of the time left).
    pub first_hint: Option<Duration>,
    /// Jobs from this one on (0-based, in creation order) hint the time left, whatever
    /// `hint` says.
    pub hint_from_job: Option<usize>,
    pub fates: Mutex<VecDeque<SubmitFate>>,
    /// Poll calls (1-based, counted over all jobs) that fail as a transient error.
    pub failing_polls: Mutex<BTreeSet<u32>>,
    /// What the next poll calls answer, in order: `Some(error)`, or `None` for the job's
    /// state (past the queue, the job's state).
    pub poll_answers: Mutex<VecDeque<Option<StepError>>>,
    pub submit_calls: AtomicU32,
    pub poll_calls: AtomicU32,
    pub jobs: Mutex<Vec<Job>>,
    /// (job id, when) of every poll.
    pub polls: Mutex<Vec<(String, Instant)>>,
    /// The most jobs running at the provider at once (created, not yet past their end).
    pub max_running: AtomicUsize,
}

impl Fake {
    pub fn new(usual: Duration) -> Fake {
        Fake {
            usual,
            ..Fake::default()
        }
    }

    pub fn create(&self, item: u32) -> String {
        let duration = self
            .durations
            .lock()
            .expect("lock")
            .pop_front()
            .unwrap_or(self.usual);
        let mut jobs = self.jobs.lock().expect("lock");
        let id = format!("job-{}", jobs.len() + 1);
        let now = Instant::now();
        jobs.push(Job {
            id: id.clone(),
            item,
            created: now,
            duration,
        });
        let running = jobs.iter().filter(|j| now < j.created + j.duration).count();
        self.max_running.fetch_max(running, Ordering::SeqCst);
        id
    }

    pub fn created(&self) -> usize {
        self.jobs.lock().expect("lock").len()
    }

    pub fn created_for(&self, item: u32) -> usize {
        self.jobs
            .lock()
            .expect("lock")
            .iter()
            .filter(|j| j.item == item)
            .count()
    }

    pub fn polls_of(&self, id: &str) -> Vec<Instant> {
        self.polls
            .lock()
            .expect("lock")
            .iter()
            .filter(|(j, _)| j == id)
            .map(|(_, at)| *at)
            .collect()
    }
}

pub struct Provider(pub Arc<Fake>);

impl JobWork for Provider {
    fn plan(&self, input: &Value) -> Result<u32, StepError> {
        Ok(input["items"].as_u64().map_or(2, |n| n as u32))
    }

    fn submit(
        &self,
        _ctx: StepContext,
        item: u32,
        _submission: Submission,
    ) -> BoxFuture<Result<Value, StepError>> {
        let fake = self.0.clone();
        Box::pin(async move {
            fake.submit_calls.fetch_add(1, Ordering::SeqCst);
            let fate = fake
                .fates
                .lock()
                .expect("lock")
                .pop_front()
                .unwrap_or(SubmitFate::Accept);
            match fate {
                SubmitFate::Accept => Ok(json!({ "id": fake.create(item) })),
                SubmitFate::LoseAnswer => {
                    fake.create(item);
                    Err(StepError::transient("no answer within 1 s (timeout)").unanswered())
                }
                SubmitFate::Refuse(error) => Err(error),
            }
        })
    }

    fn poll(
        &self,
        _ctx: StepContext,
        item: u32,
        job: Value,
    ) -> BoxFuture<Result<JobStatus, StepError>> {
        let fake = self.0.clone();
        Box::pin(async move {
            let call = fake.poll_calls.fetch_add(1, Ordering::SeqCst) + 1;
            let id = job["id"].as_str().unwrap_or_default().to_owned();
            let first = fake.polls_of(&id).is_empty();
            fake.polls
                .lock()
                .expect("lock")
                .push((id.clone(), Instant::now()));
            if fake.failing_polls.lock().expect("lock").contains(&call) {
                return Err(StepError::transient("503 from the poll"));
            }
            if let Some(Some(error)) = fake.poll_answers.lock().expect("lock").pop_front() {
                return Err(error);
            }
            let (index, job) = fake
                .jobs
                .lock()
                .expect("lock")
                .iter()
                .enumerate()
                .find(|(_, j)| j.id == id)
                .map(|(i, j)| (i, j.clone()))
                .expect("a job this fake made");
            let hints = fake.hint || fake.hint_from_job.is_some_and(|from| index >= from);
            let left = job.duration.saturating_sub(job.created.elapsed());
            if !left.is_zero() {
                let hint = match (first, fake.first_hint) {
                    (true, Some(hint)) => Some(hint),
                    _ => hints.then_some(left),
                };
                return Ok(JobStatus::Pending { next_poll: hint });
            }
            Ok(JobStatus::Done(
                ItemOutput::new(format!("clips/{item}.mp4"), 100_000)
                    .with_output(json!({ "job": id }))
                    .expect("output"),
            ))
        })
    }
}

pub fn jobs_step(fake: &Arc<Fake>) -> Step {
    Step::jobs("render", Provider(fake.clone())).retry(RetryPolicy {
        max_tries: 3,
        backoff: Backoff::none(),
    })
}

pub fn fixed(every: Duration) -> Backoff {
    Backoff::exponential(every, every)
}

pub fn registry(step: Step) -> Registry {
    Registry::new().register(Workflow::new("jobs").step(step))
}

pub async fn submit_items(store: &PgStore, items: u32) -> TaskId {
    let channel = engine::ChannelId::parse("history").expect("channel");
    store
        .create_task(engine::NewTask::new(
            "jobs",
            channel,
            json!({ "items": items }),
        ))
        .await
        .expect("submit")
        .task_id()
}

/// A worker in this process until the returned token fires.
pub fn start_worker(store: &PgStore, registry: Registry, concurrency: usize) -> CancellationToken {
    let shutdown = CancellationToken::new();
    let options = WorkerOptions {
        concurrency,
        poll_interval: Duration::from_millis(100),
        heartbeat_interval: Duration::from_millis(500),
        shutdown_grace: Duration::from_millis(200),
        ..WorkerOptions::new(format!("w-{}", uuid::Uuid::new_v4()))
    };
    let worker = Worker::new(store.clone(), registry, options);
    let token = shutdown.clone();
    tokio::spawn(async move { worker.run(token).await });
    shutdown
}

pub async fn events(store: &PgStore, task: TaskId) -> Vec<engine::RecordedEvent> {
    store.read_stream(task, 1).await.expect("read")
}

pub async fn status(store: &PgStore, task: TaskId) -> TaskStatus {
    fold(&events(store, task).await).status()
}

/// Waits until `task` is `wanted`, or panics after `limit`.
pub async fn wait_for_status(store: &PgStore, task: TaskId, wanted: TaskStatus, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let now = status(store, task).await;
        if now == wanted {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "task {task} is {now}, not {wanted}, after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn count(events: &[engine::RecordedEvent], what: impl Fn(&Event) -> bool) -> usize {
    events.iter().filter(|e| what(&e.event)).count()
}

pub fn audit_clean(task: TaskId, events: &[engine::RecordedEvent]) -> engine::audit::AuditReport {
    let report = engine::audit::audit(task, events);
    assert!(report.is_clean(), "{:?}", report.violations);
    report
}

/// Waits until `task` holds no live provider slot (a job's slot is freed just after its
/// end is recorded), or panics after `limit`.
pub async fn wait_for_no_slots(store: &PgStore, task: TaskId, limit: Duration) {
    let deadline = Instant::now() + limit;
    while live_slots(store, task).await > 0 {
        assert!(Instant::now() < deadline, "task {task} still holds slots");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn live_slots(store: &PgStore, task: TaskId) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM provider_slots WHERE task_id = $1 AND expires_at >= now()",
    )
    .bind(task.as_uuid())
    .fetch_one(store.pool())
    .await
    .expect("slots")
}
