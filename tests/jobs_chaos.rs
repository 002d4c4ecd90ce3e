//! Provider jobs under chaos, with real `reel worker` processes (issue 25): three workers
//! run ten videos whose clips go to a local fake of Runway's API that answers some submits
//! only after the client gave up (the task made anyway), fails some polls and refuses some
//! submits with 429 and Retry-After; workers are SIGKILLed and restarted throughout, and in
//! one run one worker's clock is two minutes behind the database's (libfaketime). What the
//! provider saw is checked against the log: every clip paid for once, plus the lost
//! answers the log records as possible payments, plus at most one per kill; never more in
//! flight than the cap; no slot left behind; every audit clean.
//!
//! Also here: a worker whose clock is ten minutes behind does not claim a parked task over
//! and over, and `--time-scale 0` does not poll Runway in a loop.

mod common;
mod fakes;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use engine::testing::TestDatabase;
use engine::{Event, TaskId, TaskStatus, fold};
use fakes::{Chaos, FakeCloud, FakeOptions};

/// The cap on Runway jobs in flight, fleet-wide, in these runs.
const CAP: usize = 8;

/// `reel worker` on the simulated set with the clips on the fake Runway, until killed.
fn worker(
    db: &TestDatabase,
    fake: &FakeCloud,
    id: &str,
    artifacts: &Path,
    skew: Option<&str>,
) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_reel"));
    command
        .args([
            "worker",
            "--worker-id",
            id,
            "--concurrency",
            "1",
            "--providers",
            "simulated",
            "--provider",
            "video=cloud",
            "--max-in-flight",
            &format!("runway={CAP}"),
            "--time-scale",
            "0.005",
            // A lost answer's slot is kept for the job timeout: Runway's 15 minutes would
            // hold the cap for the rest of the run; the fake's jobs take 0.6 s.
            "--job-timeout",
            "5",
            "--lease-ttl",
            "5",
        ])
        .env("DATABASE_URL", db.url())
        .env("REEL_ARTIFACTS", artifacts)
        .env("REEL_LOG", "warn")
        .env("REEL_CLOUD_TIMEOUT_SECS", "1")
        .envs(fake.env())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(offset) = skew {
        command
            .env("LD_PRELOAD", engine::testing::faketime())
            .env("FAKETIME", offset)
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    }
    command.spawn().expect("start reel worker")
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

async fn events(db: &TestDatabase, task: TaskId) -> Vec<engine::RecordedEvent> {
    db.store().read_stream(task, 1).await.expect("read")
}

async fn all_in_review(db: &TestDatabase, tasks: &[TaskId]) -> bool {
    for task in tasks {
        if fold(&events(db, *task).await).status() != TaskStatus::FINAL_REVIEW {
            return false;
        }
    }
    true
}

async fn live_slots(db: &TestDatabase) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM provider_slots WHERE expires_at >= now()")
        .fetch_one(db.pool())
        .await
        .expect("slots")
}

/// Ten videos, three workers, at least ten SIGKILLs, the fake misbehaving throughout.
async fn chaos_run(skew: Option<&str>) {
    let db = TestDatabase::create().await;
    let fake = FakeCloud::start(FakeOptions {
        job_duration: Duration::from_millis(600),
        runway_concurrency: 100,
        any_image: true,
        chaos: Chaos {
            slow_answer_every: Some((13, Duration::from_millis(2500))),
            failing_poll_every: Some(5),
            rate_limit_every: Some((17, 1)),
        },
        ..FakeOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let artifacts = dir.path().join("artifacts");
    let tasks = common::submit_videos(&db.store(), "history", 10).await;
    let ids = ["chaos-1", "chaos-2", "chaos-3"];
    // The first worker is the one whose clock is off, in the skewed run.
    let mut workers: Vec<Child> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| worker(&db, &fake, id, &artifacts, skew.filter(|_| i == 0)))
        .collect();

    let mut kills = 0;
    let mut next_kill = Instant::now() + Duration::from_millis(2500);
    let deadline = Instant::now() + Duration::from_secs(300);
    while !all_in_review(&db, &tasks).await {
        assert!(
            Instant::now() < deadline,
            "not every video reached final review in time ({kills} kills)"
        );
        if kills < 12 && Instant::now() >= next_kill {
            let i = kills % workers.len();
            kill(&mut workers[i]);
            workers[i] = worker(&db, &fake, ids[i], &artifacts, skew.filter(|_| i == 0));
            kills += 1;
            next_kill = Instant::now() + Duration::from_millis(1500 + 700 * (kills as u64 % 3));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for child in &mut workers {
        stop(child);
    }
    assert!(
        kills >= 10,
        "only {kills} kills landed before the run ended"
    );

    let counts = fake.counts();
    assert!(
        counts.max_in_flight <= CAP,
        "{} jobs in flight at Runway under a cap of {CAP}",
        counts.max_in_flight
    );
    assert!(counts.slow_answers > 0 && counts.failed_polls > 0 && counts.rate_limited_submits > 0);

    let (mut recorded, mut unanswered) = (0, 0);
    for task in &tasks {
        let events = events(&db, *task).await;
        let state = fold(&events);
        let video = state.step("video").expect("video ran");
        let items: BTreeSet<u32> = video.items.keys().copied().collect();
        assert_eq!(items, (1..=18).collect(), "task {task}");
        assert!(
            video.duplicates.is_empty(),
            "task {task}: {:?}",
            video.duplicates
        );
        // Every submission recorded is a clip, or a job that failed and was replaced.
        let submitted = events
            .iter()
            .filter(|e| matches!(&e.event, Event::ItemSubmitted { step, .. } if step == "video"))
            .count();
        let closed = events
            .iter()
            .filter(|e| {
                matches!(&e.event, Event::ItemFailed { step, unanswered: false, retry_after_ms: None, .. }
                    if step == "video")
            })
            .count();
        assert!(
            submitted <= 18 + closed,
            "task {task}: {submitted} submissions"
        );
        recorded += submitted;
        unanswered += events
            .iter()
            .filter(|e| {
                matches!(&e.event, Event::ItemFailed { step, unanswered: true, .. } if step == "video")
            })
            .count();
        let report = engine::audit::audit(*task, &events);
        assert!(report.is_clean(), "task {task}: {:?}", report.violations);
    }
    let at_provider = counts.submissions.len();
    assert!(
        at_provider >= recorded,
        "the log records {recorded} submissions, Runway made {at_provider} tasks"
    );
    let unaccounted = at_provider - recorded;
    assert!(
        unaccounted <= unanswered + kills,
        "Runway made {at_provider} tasks: {recorded} recorded, {unanswered} lost answers \
         recorded, {kills} kills — {unaccounted} unaccounted for"
    );
    assert!(unanswered > 0, "no lost answer was recorded");

    // The slots of lost answers lapse with their jobs' life (--job-timeout 5); nothing
    // else is left.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(live_slots(&db).await, 0, "provider slots left behind");
    eprintln!(
        "chaos run (skew {skew:?}): {kills} kills; Runway made {at_provider} tasks for 180 clips: \
         {recorded} recorded, {unanswered} answers lost and recorded; max in flight {} (cap {CAP}); \
         {} slow answers, {} failed polls, {} 429s",
        counts.max_in_flight, counts.slow_answers, counts.failed_polls, counts.rate_limited_submits
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_over_three_workers_pays_each_clip_once_and_keeps_the_cap() {
    chaos_run(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_with_a_worker_two_minutes_behind_holds_the_same() {
    chaos_run(Some("-120s")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_ten_minutes_behind_parks_its_tasks_until_their_polls_are_due() {
    // The worker's clock is 600 s behind the database's. A park "until" its own clock says
    // would be ten minutes in the database's past: the task would be claimed again at once,
    // thousands of times a minute. Parks follow the database's clock.
    let db = TestDatabase::create().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let task = common::submit_videos(&db.store(), "history", 1).await[0];
    let mut child = Command::new(env!("CARGO_BIN_EXE_reel"))
        .args([
            "worker",
            "--worker-id",
            "behind",
            "--until-idle",
            "--time-scale",
            "0.01",
            // Each clip's job takes 5 s; the simulated provider hints when it is done.
            "--simulate",
            "video=500",
        ])
        .env("DATABASE_URL", db.url())
        .env("REEL_ARTIFACTS", dir.path())
        .env("REEL_LOG", "warn")
        .env("LD_PRELOAD", engine::testing::faketime())
        .env("FAKETIME", "-600s")
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start reel worker");
    common::wait_for_success(&mut child, Duration::from_secs(120)).await;
    let events = events(&db, task).await;
    let state = fold(&events);
    assert_eq!(state.status(), TaskStatus::FINAL_REVIEW);
    let claims = events
        .iter()
        .filter(|e| matches!(e.event, Event::TaskClaimed { .. }))
        .count();
    let parks = events
        .iter()
        .filter(|e| matches!(e.event, Event::TaskParked { .. }))
        .count();
    // 18 clips of 5 s at a cap of 5: four waves, each a park or two.
    assert!(
        claims <= 12 && parks <= 11,
        "{claims} claims and {parks} parks for one video"
    );
    let report = engine::audit::audit(task, &events);
    assert!(report.is_clean(), "{:?}", report.violations);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runway_is_polled_at_most_once_a_second_per_job_at_time_scale_0() {
    let db = TestDatabase::create().await;
    let fake = FakeCloud::start(FakeOptions {
        job_duration: Duration::from_secs(3),
        runway_concurrency: 100,
        any_image: true,
        ..FakeOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let tasks = common::submit_videos(&db.store(), "history", 1).await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_reel"))
        .args([
            "worker",
            "--until-idle",
            "--providers",
            "simulated",
            "--provider",
            "video=cloud",
            "--time-scale",
            "0",
        ])
        .env("DATABASE_URL", db.url())
        .env("REEL_ARTIFACTS", dir.path())
        .env("REEL_LOG", "warn")
        .envs(fake.env())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start reel worker");
    common::wait_for_success(&mut child, Duration::from_secs(120)).await;
    assert_eq!(
        fold(&events(&db, tasks[0]).await).status(),
        TaskStatus::FINAL_REVIEW
    );
    let counts = fake.counts();
    for (task, times) in &counts.poll_times {
        for pair in times.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap >= Duration::from_millis(990),
                "Runway task {task} polled twice {gap:?} apart"
            );
        }
        assert!(times.len() <= 5, "a 3 s job polled {} times", times.len());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_max_in_flight_setting_is_no_setting() {
    let db = TestDatabase::create().await;
    let dir = tempfile::tempdir().expect("tempdir");
    common::submit_videos(&db.store(), "history", 1).await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_reel"))
        .args(["worker", "--until-idle"])
        .env("DATABASE_URL", db.url())
        .env("REEL_ARTIFACTS", dir.path())
        .env("REEL_MAX_IN_FLIGHT", "")
        .env("REEL_RATE", "")
        .env("REEL_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start reel worker");
    common::wait_for_success(&mut child, Duration::from_secs(60)).await;
}
