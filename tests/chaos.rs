//! Real worker processes, killed with SIGKILL at random moments and restarted: every task
//! still reaches final_review and every item is recorded exactly once. And SIGTERM: the
//! item in flight finishes, the lease is released, another worker resumes at once.

mod common;

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use engine::Event;
use engine::testing::TestDatabase;
use rand::Rng;

fn spawn_worker(
    db: &TestDatabase,
    id: &str,
    artifacts: &std::path::Path,
    time_scale: &str,
) -> Child {
    common::spawn_reel_worker(db.url(), id, artifacts, time_scale, &["--lease-ttl", "2"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_workers_at_random_and_every_item_completes_exactly_once() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let artifacts = tempfile::tempdir().expect("tempdir");
    let tasks = common::submit_videos(&store, "chaos", 24).await;
    // A 5-minute clip takes 3 ms: items take milliseconds, the run takes seconds.
    let scale = "0.00001";
    let ids = ["chaos-a", "chaos-b", "chaos-c"];
    let mut workers: Vec<Child> = ids
        .iter()
        .map(|id| spawn_worker(&db, id, artifacts.path(), scale))
        .collect();

    let deadline = Instant::now() + Duration::from_secs(60);
    let mut kills = 0;
    while kills < 20 && Instant::now() < deadline {
        let (pause, victim) = {
            let mut rng = rand::rng();
            (
                rng.random_range(50..250),
                rng.random_range(0..workers.len()),
            )
        };
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let worker = &mut workers[victim];
        if worker.try_wait().expect("poll").is_none() {
            worker.kill().expect("SIGKILL");
            worker.wait().expect("reap");
            kills += 1;
        }
        // Restarted with the same id: it reclaims its own leases at once.
        workers[victim] = spawn_worker(&db, ids[victim], artifacts.path(), scale);
    }
    assert!(
        kills >= 20,
        "only {kills} kills happened: the workers finished too early"
    );

    for worker in &mut workers {
        common::wait_for_success(worker, Duration::from_secs(90)).await;
    }
    common::assert_videos_exactly_once(&store, &tasks).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_item_in_flight_releases_the_lease_and_another_worker_resumes() {
    let db = TestDatabase::create().await;
    let store = db.store();
    let artifacts = tempfile::tempdir().expect("tempdir");
    let task = common::submit_videos(&store, "chaos", 1).await[0];
    // An asset takes 40 s nominal: 0.4 s at this scale.
    let mut worker = spawn_worker(&db, "graceful", artifacts.path(), "0.01");

    let started = Instant::now();
    while store
        .read_stream(task, 1)
        .await
        .expect("read")
        .iter()
        .all(|e| !matches!(e.event, Event::StepStarted { .. }))
    {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the worker never started the task"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The first wave of assets is in flight: the step is as wide as the simulated image
    // provider's cap, 10.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let signalled = Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .expect("kill");
    assert!(signalled.success());
    let status = worker.wait().expect("exit");
    assert!(status.success(), "graceful exit, got {status}");

    let state = engine::fold(&store.read_stream(task, 1).await.expect("read"));
    let assets = state.step("assets").expect("assets");
    let recorded: Vec<u32> = assets.items.keys().copied().collect();
    assert_eq!(
        recorded,
        (1..=10).collect::<Vec<u32>>(),
        "the assets in flight finished and were recorded; no other started"
    );
    // `reel tasks` shows where the step stands: 10 of its 22 assets.
    let tasks = |json: bool| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_reel"));
        command.args(["tasks", "--channel", "chaos"]);
        if json {
            command.arg("--json");
        }
        let out = command
            .env("DATABASE_URL", db.url())
            .output()
            .expect("reel tasks");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    };
    let table = tasks(false);
    let row = table
        .lines()
        .find(|line| line.contains(&task.to_string()))
        .expect("the task is listed");
    assert!(
        table.lines().next().is_some_and(|h| h.contains("progress"))
            && row.contains("generating_assets")
            && row.contains("10/22"),
        "{table}"
    );
    let listed: serde_json::Value = serde_json::from_str(&tasks(true)).expect("json");
    assert_eq!(
        listed[0]["progress"],
        serde_json::json!({"step": "assets", "done": 10, "of": 22})
    );
    let owner = common::lease_owner(&db, task).await;
    assert_eq!(owner, None, "the lease is released");
    let next = store
        .claim_next(
            "successor",
            Duration::from_secs(30),
            &[],
            &[steps::WORKFLOW.into()],
        )
        .await
        .expect("claim");
    assert_eq!(
        next.map(|l| l.task),
        Some(task),
        "another worker takes over at once"
    );
}
