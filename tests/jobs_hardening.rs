//! Provider jobs under the review that found their edges: a park keeps the item's tries and
//! the poll backoff, a paused key parks instead of holding the worker, a cancelled waiter
//! frees its place, and a running job's slot outlives a rescheduled attempt.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{claim, submit};
use engine::testing::TestDatabase;
use engine::{
    Backoff, BoxFuture, Event, ItemOutput, JobStatus, JobWork, Orchestrator, PgStore,
    ProviderLimits, Registry, RetryPolicy, RunOutcome, Step, StepContext, StepError, Submission,
    TaskId, Workflow,
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// A configurable job provider in memory.
struct Fake {
    items: u32,
    /// How long a job runs.
    duration: Duration,
    /// A job that reached its end fails (transient) instead of finishing.
    fail_at_end: bool,
    /// Hint the remaining time on Pending.
    hint: bool,
    /// Submits of these items fail (transient).
    refuse: Vec<u32>,
    submits: AtomicU32,
    polls: AtomicU32,
    started: Mutex<std::collections::HashMap<String, Instant>>,
}

impl Fake {
    fn new(items: u32, duration: Duration) -> Fake {
        Fake {
            items,
            duration,
            fail_at_end: false,
            hint: true,
            refuse: Vec::new(),
            submits: AtomicU32::new(0),
            polls: AtomicU32::new(0),
            started: Mutex::new(Default::default()),
        }
    }
}

struct Shared(Arc<Fake>);

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
            if fake.refuse.contains(&item) {
                return Err(StepError::transient("503 from submit"));
            }
            fake.submits.fetch_add(1, Ordering::SeqCst);
            let id = format!("job-{item}-{}", submission.number);
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
        _item: u32,
        job: Value,
    ) -> BoxFuture<Result<JobStatus, StepError>> {
        let fake = self.0.clone();
        Box::pin(async move {
            fake.polls.fetch_add(1, Ordering::SeqCst);
            let id = job["id"].as_str().unwrap_or_default().to_owned();
            let started = fake.started.lock().expect("lock").get(&id).copied();
            let started = started.expect("a job this fake accepted");
            let left = fake.duration.saturating_sub(started.elapsed());
            if !left.is_zero() {
                return Ok(JobStatus::Pending {
                    next_poll: fake.hint.then_some(left),
                });
            }
            if fake.fail_at_end {
                Ok(JobStatus::Failed(StepError::transient("job expired")))
            } else {
                Ok(JobStatus::Done(ItemOutput::new(id, 1)))
            }
        })
    }
}

fn workflow(fake: &Arc<Fake>, cap: u32, max_tries: u32) -> Workflow {
    Workflow::new("jobs").step(
        Step::jobs("render", Shared(fake.clone()))
            .retry(RetryPolicy {
                max_tries,
                backoff: Backoff::none(),
            })
            .provider(ProviderLimits::new("render").max_in_flight(cap)),
    )
}

/// Claims and runs `task` whenever it is due, up to `runs` times.
async fn drive(
    store: &PgStore,
    orchestrator: &Orchestrator,
    task: TaskId,
    runs: usize,
) -> Vec<RunOutcome> {
    let mut outcomes = Vec::new();
    for _ in 0..runs {
        let lease = loop {
            match store
                .claim_task(task, "review", Duration::from_secs(60))
                .await
                .expect("claim")
            {
                Some(lease) => break lease,
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let outcome = orchestrator
            .run(&lease, CancellationToken::new())
            .await
            .expect("run");
        let again = matches!(outcome, RunOutcome::Parked { .. });
        outcomes.push(outcome);
        if !again {
            break;
        }
    }
    outcomes
}

/// Finding 1: parking resets the per-item try counter, so a job that keeps failing is
/// submitted (and paid for) forever within one attempt; the retry policy never triggers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_always_fails_is_resubmitted_forever_across_parks() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let fake = Arc::new(Fake {
        fail_at_end: true,
        ..Fake::new(1, Duration::from_millis(2500))
    });
    let orchestrator = Orchestrator::new(
        store.clone(),
        Registry::new().register(workflow(&fake, 5, 3)),
    );
    let task = submit(&store, "jobs").await;
    let outcomes = drive(&store, &orchestrator, task, 8).await;
    let events = store.read_stream(task, 1).await.expect("read");
    let failed_in_attempt_1 = events
        .iter()
        .filter(|e| matches!(&e.event, Event::ItemFailed { attempt: 1, .. }))
        .count();
    eprintln!(
        "outcomes: {:?}\nsubmits: {}  item_failed in attempt 1: {failed_in_attempt_1}",
        outcomes.iter().map(std::mem::discriminant).count(),
        fake.submits.load(Ordering::SeqCst)
    );
    for o in &outcomes {
        eprintln!("  {o:?}");
    }
    assert!(
        failed_in_attempt_1 <= 3,
        "max_tries 3, yet attempt 1 recorded {failed_in_attempt_1} failed jobs and {} submissions",
        fake.submits.load(Ordering::SeqCst)
    );
}

/// Finding 1b: the same with a submit that keeps failing and the default item backoff
/// (1 s +-20%): whenever the backoff is >= PARK_AFTER the task parks and forgets its tries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_submit_with_a_parking_backoff_is_retried_forever() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let fake = Arc::new(Fake {
        refuse: vec![1],
        ..Fake::new(1, Duration::from_millis(100))
    });
    let wf = Workflow::new("jobs").step(
        Step::jobs("render", Shared(fake.clone()))
            .retry(RetryPolicy {
                max_tries: 2,
                backoff: Backoff::exponential(Duration::from_millis(1500), Duration::from_secs(2)),
            })
            .provider(ProviderLimits::new("render").max_in_flight(5)),
    );
    let orchestrator = Orchestrator::new(store.clone(), Registry::new().register(wf));
    let task = submit(&store, "jobs").await;
    let outcomes = drive(&store, &orchestrator, task, 5).await;
    let events = store.read_stream(task, 1).await.expect("read");
    let failed = events
        .iter()
        .filter(|e| matches!(&e.event, Event::ItemFailed { attempt: 1, .. }))
        .count();
    for o in &outcomes {
        eprintln!("  {o:?}");
    }
    assert!(
        failed <= 2,
        "max_tries 2, yet attempt 1 tried the submit {failed} times ({} runs, all parked)",
        outcomes.len()
    );
}

/// Finding 2: the poll backoff restarts at its first step after every park, so a job
/// without provider hints is polled (and the task claimed, parked, logged) about every
/// second for its whole life instead of backing off to 30 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parking_resets_the_poll_backoff() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let fake = Arc::new(Fake {
        hint: false,
        ..Fake::new(1, Duration::from_secs(12))
    });
    // The default poll backoff: 1 s doubling to 30 s, +-10%.
    let wf = Workflow::new("jobs").step(
        Step::jobs("render", Shared(fake.clone()))
            .provider(ProviderLimits::new("render").max_in_flight(5)),
    );
    let orchestrator = Orchestrator::new(store.clone(), Registry::new().register(wf));
    let task = submit(&store, "jobs").await;
    let outcomes = drive(&store, &orchestrator, task, 100).await;
    let events = store.read_stream(task, 1).await.expect("read");
    let parks = events
        .iter()
        .filter(|e| matches!(&e.event, Event::TaskParked { .. }))
        .count();
    let polls = fake.polls.load(Ordering::SeqCst);
    eprintln!(
        "last outcome {:?}; polls {polls}, parks/claims {parks}",
        outcomes.last()
    );
    // 1, 2, 4, 8 s of backoff: polled at ~1, 3, 7 and 15 s -> 4 polls for a 12 s job.
    assert!(
        polls <= 5,
        "a 12 s job polled {polls} times with {parks} parks (task_parked events) under a 1->30 s backoff"
    );
}

/// Finding 3: a Retry-After pause is slept in place (lease and worker slot held) instead
/// of parking the task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_key_holds_the_worker_slot_instead_of_parking() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let fake = Arc::new(Fake::new(1, Duration::from_millis(100)));
    let orchestrator = Orchestrator::new(
        store.clone(),
        Registry::new().register(workflow(&fake, 5, 3)),
    );
    let task = submit(&store, "jobs").await;
    store
        .pause_provider("render", Duration::from_secs(6))
        .await
        .expect("pause");
    let lease = claim(&store, task).await;
    let started = Instant::now();
    let outcome = orchestrator
        .run(&lease, CancellationToken::new())
        .await
        .expect("run");
    let held = started.elapsed();
    eprintln!("outcome {outcome:?} after {held:?}");
    assert!(
        held < Duration::from_secs(2),
        "the run held its lease and worker slot for {held:?} waiting out the pause ({outcome:?})"
    );
}

/// Finding 4: a cancelled task that was parked waiting for room keeps its place in the
/// provider queue: newer tasks cannot get an idle slot until its row expires (~65 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_parked_waiter_blocks_the_key() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let fake = Arc::new(Fake::new(1, Duration::from_secs(4)));
    let orchestrator = Orchestrator::new(
        store.clone(),
        Registry::new().register(workflow(&fake, 1, 3)),
    );
    let a = submit(&store, "jobs").await;
    let b = submit(&store, "jobs").await;
    let c = submit(&store, "jobs").await;

    let outcome = common::run_once(&store, &orchestrator, a).await;
    assert!(
        matches!(outcome, RunOutcome::Parked { jobs: 1, .. }),
        "{outcome:?}"
    );
    let outcome = common::run_once(&store, &orchestrator, b).await;
    assert!(
        matches!(outcome, RunOutcome::Parked { waiting: 1, .. }),
        "{outcome:?}"
    );
    engine::commands::cancel(&store, b, Some("operator".into()))
        .await
        .expect("cancel");
    // A finishes: its slot frees.
    let outcomes = drive(&store, &orchestrator, a, 10).await;
    assert_eq!(outcomes.last(), Some(&RunOutcome::Completed));
    assert_eq!(store.provider_in_flight("render").await.expect("count"), 0);

    let outcome = common::run_once(&store, &orchestrator, c).await;
    let rows: Vec<(String, bool, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "SELECT task_id::text, granted, expires_at FROM provider_slots ORDER BY priority",
    )
    .fetch_all(db.pool())
    .await
    .expect("rows");
    eprintln!("b = {b}\nrows {rows:?}");
    assert!(
        matches!(outcome, RunOutcome::Parked { jobs: 1, .. }),
        "nothing is in flight at a cap of 1, yet c got no slot: {outcome:?}"
    );
}

/// Finding 5: a task rescheduled (or parked) past its slot rows' expiry loses the slots of
/// jobs still running at the provider; others are granted them and the provider sees more
/// jobs than the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_of_open_jobs_expire_before_a_rescheduled_task_returns() {
    let db = TestDatabase::create().await;
    let store = db.store();
    // Item 1's job runs 10 minutes; item 2's submit is refused (1 try): the attempt gives
    // up with item 1's job open and in flight.
    let fake = Arc::new(Fake {
        refuse: vec![2],
        ..Fake::new(2, Duration::from_secs(600))
    });
    let wf = workflow(&fake, 2, 1).task_retry(engine::TaskRetryPolicy {
        max_attempts: 5,
        backoff: Backoff::exponential(Duration::from_secs(120), Duration::from_secs(600)),
    });
    let other = Arc::new(Fake::new(1, Duration::from_secs(600)));
    let orchestrator = Orchestrator::new(
        store.clone(),
        Registry::new().register(wf).register(
            Workflow::new("other").step(
                Step::jobs("render", Shared(other.clone()))
                    .provider(ProviderLimits::new("render").max_in_flight(2)),
            ),
        ),
    );
    let t1 = submit(&store, "jobs").await;
    let outcome = common::run_once(&store, &orchestrator, t1).await;
    eprintln!("t1: {outcome:?}");
    let row: (
        chrono::DateTime<chrono::Utc>,
        Option<chrono::DateTime<chrono::Utc>>,
    ) = sqlx::query_as(
        "SELECT s.expires_at, t.next_run_at FROM provider_slots s JOIN tasks t ON t.id = s.task_id \
             WHERE s.task_id = $1 AND s.granted",
    )
    .bind(t1.as_uuid())
    .fetch_one(db.pool())
    .await
    .expect("t1 still holds item 1's slot");
    eprintln!("slot expires {} ; task due again {:?}", row.0, row.1);
    // What a minute later looks like (expires_at shifted instead of sleeping 61 s): a
    // newer task is granted the slot of a job that is still running at the provider.
    sqlx::query("UPDATE provider_slots SET expires_at = expires_at - interval '61 seconds'")
        .execute(db.pool())
        .await
        .expect("shift");
    let t2 = submit(&store, "other").await;
    let outcome = common::run_once(&store, &orchestrator, t2).await;
    eprintln!(
        "t2: {outcome:?}; jobs running at the provider for key render: {} (cap 2)",
        fake.submits.load(Ordering::SeqCst) + other.submits.load(Ordering::SeqCst)
    );
    let t3 = submit(&store, "other").await;
    let outcome = common::run_once(&store, &orchestrator, t3).await;
    eprintln!(
        "t3: {outcome:?}; jobs running at the provider for key render: {} (cap 2)",
        fake.submits.load(Ordering::SeqCst) + other.submits.load(Ordering::SeqCst)
    );
    assert!(
        row.1.is_some_and(|due| row.0 >= due),
        "the slot of item 1's running job expires at {} before the task returns at {:?}",
        row.0,
        row.1
    );
}
