//! Steps as wide as their providers allow (issue 33), under SIGKILL, with real `reel
//! worker` processes on the cloud set against local fakes of the three APIs: the image,
//! speech and sound steps run several calls at once by default, the clips several jobs.
//! Workers are killed and restarted throughout; afterwards every item is complete exactly
//! once, every audit is clean, each step's files are exactly the ones the log records (so
//! the assembly, which reads its sources from the log, used those), and the fakes never
//! saw more calls or jobs in flight than each key's cap, across the fleet.

mod common;
mod fakes;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use engine::testing::TestDatabase;
use engine::{TaskId, TaskStatus, fold};
use fakes::{FakeCloud, FakeOptions};

/// The caps in these runs: below the defaults, so the three workers contend for them.
const GEMINI_CAP: usize = 4;
const ELEVENLABS_CAP: usize = 3;
const RUNWAY_CAP: usize = 3;

fn worker(db: &TestDatabase, fake: &FakeCloud, id: &str, artifacts: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_reel"))
        .args([
            "worker",
            "--worker-id",
            id,
            "--concurrency",
            "2",
            "--providers",
            "cloud",
            "--max-in-flight",
            &format!("gemini={GEMINI_CAP}"),
            "--max-in-flight",
            &format!("elevenlabs={ELEVENLABS_CAP}"),
            "--max-in-flight",
            &format!("runway={RUNWAY_CAP}"),
            "--rate",
            "gemini=50",
            "--time-scale",
            "0.01",
            "--job-timeout",
            "5",
            "--lease-ttl",
            "3",
        ])
        .env("DATABASE_URL", db.url())
        .env("REEL_ARTIFACTS", artifacts)
        .env("REEL_LOG", "warn")
        .env("REEL_CLOUD_TIMEOUT_SECS", "3")
        .envs(fake.env())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start reel worker")
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

/// The media files in a step's directory (a killed worker's partial write, `*.partial`,
/// is left aside: nothing reads it).
fn files_in(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|name| !name.starts_with('.') && !name.ends_with(".partial"))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkills_during_wide_steps_complete_each_item_once_within_every_cap() {
    let db = TestDatabase::create().await;
    let fake = FakeCloud::start(FakeOptions {
        job_duration: Duration::from_millis(800),
        runway_concurrency: 100,
        any_image: true,
        // Calls long enough that kills land while several are in flight.
        call_latency: Duration::from_millis(250),
        ..FakeOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let artifacts = dir.path().join("artifacts");
    let tasks = common::submit_videos(&db.store(), "history", 4).await;
    let ids = ["wide-1", "wide-2", "wide-3"];
    let mut workers: Vec<Child> = ids
        .iter()
        .map(|id| worker(&db, &fake, id, &artifacts))
        .collect();

    let mut kills = 0;
    let mut next_kill = Instant::now() + Duration::from_millis(1500);
    let deadline = Instant::now() + Duration::from_secs(120);
    while kills < 10 || !all_in_review(&db, &tasks).await {
        if Instant::now() >= deadline {
            let mut where_ = Vec::new();
            for task in &tasks {
                let all = events(&db, *task).await;
                let state = fold(&all);
                if state.status() != TaskStatus::FINAL_REVIEW {
                    for e in all.iter().rev().take(12).rev() {
                        eprintln!("{} {} {:?}", e.version, e.recorded_at, e.event);
                    }
                    let slots: Vec<(String, uuid::Uuid, i32, bool, String, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
                        "SELECT key, task_id, item, granted, holder, expires_at FROM provider_slots ORDER BY key",
                    )
                    .fetch_all(db.pool())
                    .await
                    .expect("slots");
                    eprintln!("slots: {slots:#?}");
                    let row: (Option<chrono::DateTime<chrono::Utc>>, bool, Option<String>) =
                        sqlx::query_as(
                            "SELECT next_run_at, parked, lease_owner FROM tasks WHERE id = $1",
                        )
                        .bind(task.as_uuid())
                        .fetch_one(db.pool())
                        .await
                        .expect("row");
                    eprintln!("row: {row:?} now {}", chrono::Utc::now());
                }
                where_.push(format!(
                    "{task}: {} {:?} {:?}",
                    state.status(),
                    state.progress(),
                    state.failure
                ));
            }
            panic!(
                "not every video reached final review in time ({kills} kills): {where_:#?}; fake {:?}",
                fake.counts().max_calls
            );
        }
        if kills < 12 && Instant::now() >= next_kill {
            let i = kills % workers.len();
            kill(&mut workers[i]);
            workers[i] = worker(&db, &fake, ids[i], &artifacts);
            kills += 1;
            next_kill = Instant::now() + Duration::from_millis(900 + 400 * (kills as u64 % 3));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for child in &mut workers {
        stop(child);
    }

    let counts = fake.counts();
    let most = |provider: &str| counts.max_calls.get(provider).copied().unwrap_or(0);
    assert!(
        most("gemini") <= GEMINI_CAP && most("elevenlabs") <= ELEVENLABS_CAP,
        "calls in flight over a cap: {:?} (caps gemini {GEMINI_CAP}, elevenlabs {ELEVENLABS_CAP})",
        counts.max_calls
    );
    assert!(
        counts.max_in_flight <= RUNWAY_CAP,
        "{} Runway tasks running at once under a cap of {RUNWAY_CAP}",
        counts.max_in_flight
    );
    // The steps ran wide (else this proves nothing about wide steps).
    assert!(
        most("gemini") >= 2 && most("elevenlabs") >= 2,
        "the call steps never ran wide: {:?}",
        counts.max_calls
    );

    for task in &tasks {
        let events = events(&db, *task).await;
        let state = fold(&events);
        for (step, count) in [
            ("assets", 22),
            ("composites", 1),
            ("video", 18),
            ("narration", 18),
            ("sfx", 18),
            ("assembly", 1),
        ] {
            let progress = state.step(step).expect("the step ran");
            let items: BTreeSet<u32> = progress.items.keys().copied().collect();
            assert_eq!(items, (1..=count).collect(), "task {task}, step {step}");
            assert!(
                progress.duplicates.is_empty(),
                "task {task}, step {step}: completed again {:?}",
                progress.duplicates
            );
            // The step's files are exactly the ones recorded: a killed run's item left
            // nothing the assembly could have picked up instead.
            let recorded: BTreeSet<String> = progress
                .items
                .values()
                .map(|r| r.artifact.rsplit('/').next().unwrap_or_default().to_owned())
                .collect();
            let step_dir = artifacts.join("history").join(task.to_string()).join(step);
            let on_disk = files_in(&step_dir);
            assert_eq!(on_disk, recorded, "task {task}, step {step}: files vs log");
        }
        let report = engine::audit::audit(*task, &events);
        assert!(report.is_clean(), "task {task}: {:?}", report.violations);
    }
    // A submit a kill cut off keeps its slot for the job's life (--job-timeout 5), as a
    // possible job at Runway; nothing else is left held.
    let settled = Instant::now() + Duration::from_secs(10);
    loop {
        let live: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM provider_slots WHERE granted AND expires_at >= now()",
        )
        .fetch_one(db.pool())
        .await
        .expect("slots");
        if live == 0 {
            break;
        }
        assert!(
            Instant::now() < settled,
            "{live} provider slots still held after every video is done"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "wide steps under {kills} kills: most in flight {:?}, Runway {} (caps {GEMINI_CAP}/{ELEVENLABS_CAP}/{RUNWAY_CAP}); \
         {} images, {} narrations, {} sounds made for {} of each recorded",
        counts.max_calls,
        counts.max_in_flight,
        counts.images,
        counts.speech,
        counts.sfx,
        tasks.len() * 18
    );
}
