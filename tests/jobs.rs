//! Long provider jobs against a real PostgreSQL: an item's job is submitted once and polled
//! by any later run; waiting parks the task without a worker slot; a provider's cap, rate
//! and Retry-After hold across every worker; older tasks go first at a saturated provider.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{claim, reel_cli, spawn_reel_worker, submit, wait_for_success};
use engine::testing::TestDatabase;
use engine::{
    BoxFuture, Event, ItemOutput, JobStatus, JobWork, Orchestrator, PgStore, ProviderLimits,
    Registry, RetryPolicy, RunOutcome, SlotOwner, Step, StepContext, StepError, Submission, TaskId,
    TaskStatus, Worker, WorkerOptions, Workflow,
};
use serde_json::{Value, json};
use steps::simulated::SimulatedJob;
use tokio_util::sync::CancellationToken;

/// One submission the fake provider accepted.
#[derive(Clone, Debug)]
struct Accepted {
    item: u32,
    number: u32,
    key: String,
}

/// A job-shaped provider in memory: jobs finish `duration` after their submission; the
/// first poll of submission 1 of `lose` reports the job lost.
struct FakeJobs {
    items: u32,
    duration: Duration,
    lose: Option<u32>,
    /// The first submit is accepted, but its answer times out.
    time_out_first_submit: bool,
    accepted: Mutex<Vec<Accepted>>,
    started: Mutex<HashMap<String, Instant>>,
}

impl FakeJobs {
    fn new(items: u32, duration: Duration) -> Arc<Self> {
        Arc::new(FakeJobs {
            items,
            duration,
            lose: None,
            time_out_first_submit: false,
            accepted: Mutex::new(Vec::new()),
            started: Mutex::new(HashMap::new()),
        })
    }

    fn accepted(&self) -> Vec<Accepted> {
        self.accepted.lock().expect("lock").clone()
    }
}

struct Shared(Arc<FakeJobs>);

impl JobWork for Shared {
    fn plan(&self, _input: &Value) -> Result<u32, StepError> {
        Ok(self.0.items)
    }

    fn submit(
        &self,
        _ctx: StepContext,
        item: u32,
        submission: Submission,
    ) -> BoxFuture<Result<Value, StepError>> {
        let fake = self.0.clone();
        Box::pin(async move {
            let id = format!("job-{item}-{}", submission.number);
            let first = {
                let mut accepted = fake.accepted.lock().expect("lock");
                accepted.push(Accepted {
                    item,
                    number: submission.number,
                    key: submission.idempotency_key,
                });
                accepted.len() == 1
            };
            if first && fake.time_out_first_submit {
                return Err(StepError::transient("timed out waiting for the provider"));
            }
            fake.started
                .lock()
                .expect("lock")
                .insert(id.clone(), Instant::now());
            Ok(json!({ "id": id }))
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
            let id = job["id"].as_str().unwrap_or_default().to_owned();
            if fake.lose == Some(item) && id.ends_with("-1") {
                return Ok(JobStatus::Failed(StepError::transient("job expired")));
            }
            let started = fake.started.lock().expect("lock").get(&id).copied();
            let Some(started) = started else {
                // Submitted by an earlier run of this test's process: done.
                return Ok(JobStatus::Done(ItemOutput::new(id, 100)));
            };
            let left = fake.duration.saturating_sub(started.elapsed());
            if left.is_zero() {
                Ok(JobStatus::Done(ItemOutput::new(id, 100)))
            } else {
                Ok(JobStatus::Pending {
                    next_poll: Some(left),
                })
            }
        })
    }
}

fn job_workflow(fake: &Arc<FakeJobs>) -> Workflow {
    Workflow::new("jobs").step(
        Step::jobs("render", Shared(fake.clone()))
            .poll_backoff(engine::Backoff::exponential(
                Duration::from_millis(100),
                Duration::from_secs(1),
            ))
            .retry(RetryPolicy {
                max_tries: 3,
                backoff: engine::Backoff::none(),
            })
            .provider(ProviderLimits::new("render").max_in_flight(10)),
    )
}

fn submissions(events: &[engine::RecordedEvent]) -> Vec<(u32, u32, u32)> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Event::ItemSubmitted {
                item,
                attempt,
                submission,
                ..
            } => Some((*item, *submission, *attempt)),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_is_submitted_once_then_polled_by_later_runs_and_waiting_parks_the_task() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let fake = FakeJobs::new(3, Duration::from_millis(1500));
    let orchestrator =
        Orchestrator::new(store.clone(), Registry::new().register(job_workflow(&fake)));
    let task = submit(&store, "jobs").await;

    // The first run submits all three jobs, then parks: they take longer than PARK_AFTER.
    let lease = claim(&store, task).await;
    let outcome = orchestrator
        .run(&lease, CancellationToken::new())
        .await
        .expect("run");
    let RunOutcome::Parked { until, jobs, .. } = outcome else {
        panic!("expected the task to park, got {outcome:?}");
    };
    assert_eq!(jobs, 3);
    let row: (Option<String>, bool, i32) =
        sqlx::query_as("SELECT lease_owner, parked, attempt FROM tasks WHERE id = $1")
            .bind(task.as_uuid())
            .fetch_one(db.pool())
            .await
            .expect("row");
    assert_eq!(row, (None, true, 1), "parked: no lease, same attempt");
    assert_eq!(
        store
            .claim_task(task, "other", Duration::from_secs(30))
            .await
            .expect("claim"),
        None,
        "a parked task is not due before its next poll"
    );
    assert!(until > chrono::Utc::now());

    // Resumed when due: polls the open jobs, submits nothing, keeps the attempt.
    tokio::time::sleep((until - chrono::Utc::now()).to_std().unwrap_or_default()).await;
    let lease = store
        .claim_task(task, "other", Duration::from_secs(30))
        .await
        .expect("claim")
        .expect("due again");
    assert_eq!(lease.attempt, 1, "waiting used no attempt");
    let outcome = orchestrator
        .run(&lease, CancellationToken::new())
        .await
        .expect("run");
    assert_eq!(outcome, RunOutcome::Completed);
    assert_eq!(fake.accepted().len(), 3, "one submission per item");

    let events = store.read_stream(task, 1).await.expect("read");
    assert_eq!(
        submissions(&events),
        [(1, 1, 1), (2, 1, 1), (3, 1, 1)],
        "(item, submission, attempt)"
    );
    let report = engine::audit::audit(task, &events);
    assert!(report.is_clean(), "{:?}", report.violations);
    assert_eq!(report.jobs_submitted, 3);
    assert_eq!(
        report.items_skipped, 0,
        "resuming a parked task is not a retry"
    );
    assert!(
        engine::fold(&events)
            .step("render")
            .is_some_and(|s| s.open_jobs.is_empty())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_stopped_after_the_submission_polls_the_job_instead_of_paying_again() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let fake = FakeJobs::new(1, Duration::from_millis(300));
    let orchestrator =
        Orchestrator::new(store.clone(), Registry::new().register(job_workflow(&fake)));
    let task = submit(&store, "jobs").await;

    // Shut down right after the submission is recorded.
    let lease = claim(&store, task).await;
    let drain = CancellationToken::new();
    let stopper = {
        let (store, drain) = (store.clone(), drain.clone());
        tokio::spawn(async move {
            loop {
                let events = store.read_stream(task, 1).await.expect("read");
                if !submissions(&events).is_empty() {
                    drain.cancel();
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let outcome = orchestrator
        .run_with(&lease, drain, CancellationToken::new())
        .await
        .expect("run");
    stopper.await.expect("stopper");
    assert_eq!(outcome, RunOutcome::Stopped);

    // A takeover (a new attempt) polls the open job.
    let lease = claim(&store, task).await;
    assert_eq!(lease.attempt, 2);
    let outcome = orchestrator
        .run(&lease, CancellationToken::new())
        .await
        .expect("run");
    assert_eq!(outcome, RunOutcome::Completed);
    assert_eq!(fake.accepted().len(), 1, "the job was paid for once");
    let events = store.read_stream(task, 1).await.expect("read");
    let completed_by = events.iter().find_map(|e| match &e.event {
        Event::ItemCompleted { attempt, .. } => Some(*attempt),
        _ => None,
    });
    assert_eq!(
        completed_by,
        Some(2),
        "the takeover completed the job attempt 1 submitted"
    );
    assert!(engine::audit::audit(task, &events).is_clean());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_job_is_submitted_anew_under_a_new_idempotency_key() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let fake = Arc::new(FakeJobs {
        lose: Some(2),
        ..Arc::into_inner(FakeJobs::new(2, Duration::from_millis(50))).expect("fresh")
    });
    let orchestrator =
        Orchestrator::new(store.clone(), Registry::new().register(job_workflow(&fake)));
    let task = submit(&store, "jobs").await;
    let outcome = common::run_to_rest(&store, &orchestrator, task).await;
    assert_eq!(outcome.last(), Some(&RunOutcome::Completed), "{outcome:?}");

    let accepted = fake.accepted();
    let item2: Vec<&Accepted> = accepted.iter().filter(|a| a.item == 2).collect();
    assert_eq!(item2.len(), 2, "{accepted:?}");
    assert_eq!((item2[0].number, item2[1].number), (1, 2));
    assert_ne!(item2[0].key, item2[1].key, "a new submission, a new key");
    let events = store.read_stream(task, 1).await.expect("read");
    assert!(events.iter().any(|e| matches!(&e.event,
        Event::ItemFailed { item: 2, error, .. } if error == "job expired")));
    let report = engine::audit::audit(task, &events);
    assert!(report.is_clean(), "{:?}", report.violations);
    assert_eq!(report.jobs_submitted, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_that_timed_out_is_sent_again_with_the_same_key() {
    // The provider may have accepted a submit whose answer never came (a timeout): the
    // retry carries the same idempotency key, so a provider that honours keys dedups it.
    let db = TestDatabase::create().await;
    let store = db.store();
    let fake = Arc::new(FakeJobs {
        time_out_first_submit: true,
        ..Arc::into_inner(FakeJobs::new(1, Duration::ZERO)).expect("fresh")
    });
    let orchestrator =
        Orchestrator::new(store.clone(), Registry::new().register(job_workflow(&fake)));
    let task = submit(&store, "jobs").await;
    let outcome = common::run_to_rest(&store, &orchestrator, task).await;
    assert_eq!(outcome.last(), Some(&RunOutcome::Completed), "{outcome:?}");
    let accepted = fake.accepted();
    assert_eq!(accepted.len(), 2, "{accepted:?}");
    assert_eq!((accepted[0].number, accepted[1].number), (1, 1));
    assert_eq!(accepted[0].key, accepted[1].key);
    let events = store.read_stream(task, 1).await.expect("read");
    assert_eq!(submissions(&events), [(1, 1, 1)], "one recorded submission");
}

/// A call-shaped provider that answers its first request with a 429 and `Retry-After`,
/// recording when each worker's requests arrived.
#[derive(Default)]
struct Limited {
    requests: Mutex<Vec<(String, Instant)>>,
}

fn limited_workflow(provider: Arc<Limited>, worker: &'static str) -> Workflow {
    Workflow::new("limited").step(
        Step::fan_out(
            "call",
            |_| Ok(2),
            move |_ctx: StepContext, _item| {
                let provider = provider.clone();
                async move {
                    let first = {
                        let mut requests = provider.requests.lock().expect("lock");
                        requests.push((worker.to_owned(), Instant::now()));
                        requests.len() == 1
                    };
                    if first {
                        return Err(StepError::transient("429 Too Many Requests")
                            .with_retry_after(Duration::from_millis(1500)));
                    }
                    Ok(ItemOutput::default())
                }
            },
        )
        .retry(RetryPolicy {
            max_tries: 3,
            backoff: engine::Backoff::none(),
        })
        .provider(ProviderLimits::new("api")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_from_one_workers_request_pauses_the_key_for_every_worker() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let provider = Arc::new(Limited::default());
    let mut tasks = Vec::new();
    for _ in 0..6 {
        tasks.push(submit(&store, "limited").await);
    }
    let worker = |id: &'static str| {
        let options = WorkerOptions {
            until_idle: true,
            concurrency: 2,
            poll_interval: Duration::from_millis(50),
            ..WorkerOptions::new(id)
        };
        Worker::new(
            store.clone(),
            Registry::new().register(limited_workflow(provider.clone(), id)),
            options,
        )
        .run_until_idle()
    };
    let (a, b) = tokio::join!(worker("a"), worker("b"));
    let (a, b) = (a.expect("worker a"), b.expect("worker b"));
    assert_eq!(a.completed + b.completed, 6);

    let requests = provider.requests.lock().expect("lock").clone();
    let (_, refused_at) = requests[0].clone();
    // Requests admitted before the 429 came back may still arrive in its first moments;
    // none may start after that until the pause is over.
    let during: Vec<_> = requests[1..]
        .iter()
        .filter(|(_, at)| {
            let after = at.duration_since(refused_at);
            after > Duration::from_millis(100) && after < Duration::from_millis(1400)
        })
        .collect();
    assert!(
        during.is_empty(),
        "requests went out during the pause: {during:?}"
    );
    let who: std::collections::HashSet<&str> = requests.iter().map(|(w, _)| w.as_str()).collect();
    assert_eq!(who.len(), 2, "both workers sent requests: {requests:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_task_takes_freed_slots_before_a_newer_one_and_dead_slots_expire() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let (oldest, older, newer) = (
        submit(&store, "w").await,
        submit(&store, "w").await,
        submit(&store, "w").await,
    );
    let owner = |task| SlotOwner {
        task,
        step: "render",
        holder: "w1",
    };
    let ttl = Duration::from_secs(30);
    assert_eq!(
        store
            .acquire_slots("k", 1, owner(oldest), &[1], ttl)
            .await
            .expect("acquire"),
        [1]
    );
    // Saturated: the older task queues; the newer one queues behind it.
    assert!(
        store
            .acquire_slots("k", 1, owner(older), &[1, 2], ttl)
            .await
            .expect("acquire")
            .is_empty()
    );
    assert!(
        store
            .acquire_slots("k", 1, owner(newer), &[1], ttl)
            .await
            .expect("acquire")
            .is_empty()
    );
    store
        .release_slot("k", 1, oldest, "render", 1)
        .await
        .expect("release");
    assert!(
        store
            .acquire_slots("k", 1, owner(newer), &[1], ttl)
            .await
            .expect("acquire")
            .is_empty(),
        "the newer task may not overtake the older one waiting"
    );
    assert_eq!(
        store
            .acquire_slots("k", 1, owner(older), &[1, 2], ttl)
            .await
            .expect("acquire"),
        [1]
    );
    assert_eq!(store.provider_in_flight("k").await.expect("count"), 1);

    // A holder that dies stops renewing: its slot frees itself.
    let short = Duration::from_millis(300);
    assert_eq!(
        store
            .acquire_slots("dead", 1, owner(oldest), &[1], short)
            .await
            .expect("acquire"),
        [1]
    );
    assert!(
        store
            .acquire_slots("dead", 1, owner(newer), &[1], short)
            .await
            .expect("acquire")
            .is_empty()
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        store
            .acquire_slots("dead", 1, owner(newer), &[1], ttl)
            .await
            .expect("acquire"),
        [1],
        "the dead holder's slot expired"
    );
}

// ---------------------------------------------------------------------------------------
// Real worker processes on the video pipeline (the simulated video step submits and polls).

/// Every job the simulated video provider accepted for `task`.
fn jobs_of(artifacts: &Path, task: TaskId) -> Vec<SimulatedJob> {
    SimulatedJob::all_under(&artifacts.join("jobs").join(task.to_string()))
}

/// The most jobs running at the provider at once: each job runs from its submission for
/// its duration.
fn most_in_flight(jobs: &[SimulatedJob]) -> usize {
    let mut edges: Vec<(u64, i32)> = jobs
        .iter()
        .flat_map(|j| {
            [
                (j.submitted_at_ms, 1),
                (j.submitted_at_ms + j.duration_ms, -1),
            ]
        })
        .collect();
    // Ends before starts at the same millisecond.
    edges.sort();
    let (mut now, mut most) = (0i32, 0i32);
    for (_, delta) in edges {
        now += delta;
        most = most.max(now);
    }
    usize::try_from(most).unwrap_or(0)
}

async fn status_of(store: &PgStore, task: TaskId) -> TaskStatus {
    store
        .task_status(task)
        .await
        .expect("status")
        .expect("the task exists")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_tasks_hold_no_worker_slot() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let artifacts = tempfile::tempdir().expect("tempdir");
    // Clips take 3 s; every other step is instant.
    let args = [
        "--concurrency",
        "1",
        "--simulate",
        "assets=0,composites=0,narration=0,sfx=0,assembly=0,video=3",
        "--max-in-flight",
        "video=100",
    ];
    let run = |n| {
        let (store, artifacts, url) = (
            store.clone(),
            artifacts.path().to_owned(),
            db.url().to_owned(),
        );
        async move {
            let tasks = common::submit_videos(&store, "jobs", n).await;
            let started = Instant::now();
            let mut worker = std::process::Command::new(env!("CARGO_BIN_EXE_reel"))
                .args([
                    "worker",
                    "--worker-id",
                    "parker",
                    "--until-idle",
                    "--time-scale",
                    "1",
                ])
                .args(args)
                .env("DATABASE_URL", &url)
                .env("REEL_ARTIFACTS", &artifacts)
                .env("REEL_LOG", "warn")
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("start reel worker");
            wait_for_success(&mut worker, Duration::from_secs(120)).await;
            for task in tasks {
                assert_eq!(status_of(&store, task).await, TaskStatus::FINAL_REVIEW);
            }
            started.elapsed()
        }
    };
    let one = run(1).await;
    let five = run(5).await;
    let ratio = five.as_secs_f64() / one.as_secs_f64();
    eprintln!("one task {one:?}, five tasks {five:?}: {ratio:.2}x");
    assert!(
        ratio < 2.5,
        "5 tasks took {ratio:.2}x one task with --concurrency 1 ({one:?} vs {five:?}): waiting held the slot"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_never_exceed_a_cap_of_5_and_older_tasks_go_first() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let artifacts = tempfile::tempdir().expect("tempdir");
    let tasks = common::submit_videos(&store, "jobs", 10).await;
    let args = ["--max-in-flight", "video=5", "--simulate", "video=200"];
    let mut workers: Vec<Child> = ["cap-a", "cap-b", "cap-c"]
        .iter()
        .map(|id| spawn_reel_worker(db.url(), id, artifacts.path(), "0.001", &args))
        .collect();
    for worker in &mut workers {
        wait_for_success(worker, Duration::from_secs(120)).await;
    }
    let mut all = Vec::new();
    let mut last_submission = Vec::new();
    for &task in &tasks {
        assert_eq!(
            status_of(&store, task).await,
            TaskStatus::FINAL_REVIEW,
            "{task}"
        );
        let jobs = jobs_of(artifacts.path(), task);
        assert_eq!(jobs.len(), 18, "task {task}: one job per clip");
        last_submission.push(jobs.iter().map(|j| j.submitted_at_ms).max().unwrap_or(0));
        all.extend(jobs);
    }
    let most = most_in_flight(&all);
    assert!(most <= 5, "the provider saw {most} jobs in flight");
    assert!(
        most >= 4,
        "the cap was never reached ({most}): the test proves nothing"
    );
    let mut in_order = last_submission.clone();
    in_order.sort();
    assert_eq!(
        last_submission, in_order,
        "tasks (oldest first) finished their submissions out of order: a newer task overtook"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_clips_wait_on_jobs_never_pays_twice_beyond_the_crash_window() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let artifacts = tempfile::tempdir().expect("tempdir");
    let tasks = common::submit_videos(&store, "jobs", 6).await;
    // Clips take 0.6 s, so kills land while they wait; the rest takes milliseconds.
    let args = [
        "--lease-ttl",
        "2",
        "--simulate",
        "video=600",
        "--max-in-flight",
        "video=8",
    ];
    let ids = ["kill-a", "kill-b", "kill-c"];
    let spawn = |id| spawn_reel_worker(db.url(), id, artifacts.path(), "0.001", &args);
    let mut workers: Vec<Child> = ids.iter().map(|id| spawn(id)).collect();
    let mut kills = 0;
    let deadline = Instant::now() + Duration::from_secs(40);
    while kills < 8 && Instant::now() < deadline {
        let (pause, victim) = {
            use rand::Rng;
            let mut rng = rand::rng();
            (
                rng.random_range(200..600),
                rng.random_range(0..workers.len()),
            )
        };
        tokio::time::sleep(Duration::from_millis(pause)).await;
        if workers[victim].try_wait().expect("poll").is_none() {
            workers[victim].kill().expect("SIGKILL");
            workers[victim].wait().expect("reap");
            kills += 1;
        }
        workers[victim] = spawn(ids[victim]);
    }
    assert!(kills >= 5, "only {kills} kills landed");
    for worker in &mut workers {
        wait_for_success(worker, Duration::from_secs(120)).await;
    }

    let mut extra = 0;
    for &task in &tasks {
        let events = store.read_stream(task, 1).await.expect("read");
        let audit = engine::audit::audit(task, &events);
        assert!(audit.is_clean(), "task {task}: {:?}", audit.violations);
        assert_eq!(engine::fold(&events).status(), TaskStatus::FINAL_REVIEW);
        let mut completed: BTreeMap<u32, u32> = BTreeMap::new();
        for event in &events {
            if let Event::ItemCompleted { step, item, .. } = &event.event
                && step == "video"
            {
                *completed.entry(*item).or_default() += 1;
            }
        }
        assert_eq!(completed.len(), 18, "task {task}");
        assert!(
            completed.values().all(|n| *n == 1),
            "task {task}: {completed:?}"
        );
        let jobs = jobs_of(artifacts.path(), task);
        let mut per_clip: BTreeMap<u32, Vec<&SimulatedJob>> = BTreeMap::new();
        for job in &jobs {
            per_clip.entry(job.item).or_default().push(job);
        }
        assert_eq!(per_clip.len(), 18);
        for (clip, jobs) in &per_clip {
            // Anything beyond one is a crash between the provider's acceptance and the
            // append: the same submission (same number, same key) sent again.
            assert!(
                jobs.iter()
                    .all(|j| j.submission == 1 && j.idempotency_key == jobs[0].idempotency_key),
                "task {task} clip {clip}: a deliberate resubmission happened: {jobs:?}"
            );
            extra += jobs.len() - 1;
        }
    }
    eprintln!("{kills} kills, {extra} clip jobs submitted twice");
    assert!(
        extra <= kills,
        "{extra} extra submissions for {kills} kills: an open submission was submitted again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_shows_submissions_and_audit_flags_two_open_ones() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let artifacts = tempfile::tempdir().expect("tempdir");
    let task = common::submit_videos(&store, "jobs", 1).await[0];
    let mut worker = spawn_reel_worker(db.url(), "replayer", artifacts.path(), "0.001", &[]);
    wait_for_success(&mut worker, Duration::from_secs(60)).await;

    let id = task.to_string();
    let replay = reel_cli(db.url(), &["replay", &id]);
    assert_eq!(replay.code, 0, "{}", replay.stderr);
    let job = &jobs_of(artifacts.path(), task)[0].id;
    assert!(
        replay.stdout.contains(&format!("job {job} (submission 1)")),
        "{}",
        replay.stdout
    );
    assert!(
        replay.stdout.contains("done after waiting"),
        "{}",
        replay.stdout
    );
    assert!(
        replay.stdout.contains("jobs submitted 18, open 0"),
        "{}",
        replay.stdout
    );
    let stats = reel_cli(db.url(), &["stats", "--json"]);
    let stats: Value = serde_json::from_str(&stats.stdout).expect("json");
    assert_eq!(stats["jobs_submitted"], 18);

    // Another task with a clip submitted twice and never closed: paid twice.
    let other = common::submit_videos(&store, "jobs", 1).await[0];
    let started = r#"{"step": "video", "attempt": 1, "items": 18}"#;
    db.append_raw(other, "step_started", 1, started).await;
    for job in ["a", "b"] {
        let submitted =
            format!(r#"{{"step": "video", "item": 3, "attempt": 1, "job": {{"id": "{job}"}}}}"#);
        db.append_raw(other, "item_submitted", 1, &submitted).await;
    }
    let audit = reel_cli(db.url(), &["audit", &other.to_string()]);
    assert_eq!(audit.code, 3, "{}{}", audit.stdout, audit.stderr);
    assert!(
        audit.stdout.contains("one_open_submission"),
        "{}",
        audit.stdout
    );
}

#[test]
fn an_unknown_provider_key_is_a_usage_error_naming_the_keys() {
    let run = reel_cli(
        "postgres://postgres@127.0.0.1:1/none",
        &["worker", "--max-in-flight", "vidoe=3"],
    );
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("vidoe"), "{}", run.stderr);
    assert!(
        run.stderr.contains("assets, narration, sfx, video"),
        "{}",
        run.stderr
    );
    let run = reel_cli(
        "postgres://x@127.0.0.1:1/none",
        &["worker", "--rate", "video=-1"],
    );
    assert_eq!(run.code, 2, "{run:?}");
}
