//! The cloud providers against local fakes of their APIs (tests/fakes): every failure
//! classified as the providers document it, and the whole pipeline through `reel worker
//! --providers cloud` against a real PostgreSQL — to final review with 22 images, 18
//! Runway tasks (none submitted twice, across a SIGKILL while they run), 18 narrations and
//! 18 sound effects, never more than 5 tasks open at Runway; a wrong key fails the task
//! at once, naming the provider. No test reaches the internet. Needs ffmpeg.

mod common;
mod fakes;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::reel_cli;
use engine::testing::TestDatabase;
use engine::{
    ChannelId, Event, FailureKind, ItemOutput, JobStatus, StepError, Submission, TaskId,
    TaskStatus, fold,
};
use fakes::{Endpoint, FakeCloud, FakeOptions, Fault, JobEnd};
use serde_json::{Value, json};
use steps::cloud::{ElevenLabsAudio, GeminiImages, RunwayVideo, Sound};
use steps::local::Tools;
use steps::{ItemRequest, Provider};

/// An item request of `step` for a task on channel `history`, writing under `root`.
fn request(root: &Path, task: TaskId, step: &str, item: u32, sources: Vec<String>) -> ItemRequest {
    ItemRequest {
        task_id: task,
        channel_id: ChannelId::parse("history").expect("channel"),
        step: step.into(),
        item,
        attempt: 1,
        input: Arc::new(json!({"topic": "The fall of Rome", "story_direction": "dramatic"})),
        artifact_dir: root.join("history").join(task.to_string()).join(step),
        sources,
    }
}

/// Writes `bytes` as `step`'s item file and returns its artifact.
fn source(root: &Path, task: TaskId, step: &str, file: &str, bytes: &[u8]) -> String {
    let dir = root.join("history").join(task.to_string()).join(step);
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join(file), bytes).expect("write");
    format!("history/{task}/{step}/{file}")
}

fn transient_after(result: Result<impl std::fmt::Debug, StepError>, wait: Duration) -> StepError {
    let error = result.expect_err("a failure");
    assert_eq!(error.kind, FailureKind::Transient, "{error:?}");
    assert_eq!(error.retry_after, Some(wait), "{error:?}");
    error
}

fn permanent(result: Result<impl std::fmt::Debug, StepError>) -> StepError {
    let error = result.expect_err("a failure");
    assert_eq!(error.kind, FailureKind::Permanent, "{error:?}");
    error
}

fn transient(result: Result<impl std::fmt::Debug, StepError>) -> StepError {
    let error = result.expect_err("a failure");
    assert_eq!(error.kind, FailureKind::Transient, "{error:?}");
    error
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemini_images_and_each_failure_class() {
    let fake = FakeCloud::start(FakeOptions::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let task = TaskId::new();
    let gemini = GeminiImages::new(&fake.config());
    let asset = || gemini.generate(request(dir.path(), task, "assets", 3, vec![]));

    let made: ItemOutput = asset().await.expect("an image");
    assert_eq!(made.artifact, format!("history/{task}/assets/03.png"));
    assert_eq!(made.cost_micros, 39_000);
    let file = std::fs::read(dir.path().join(&made.artifact)).expect("the image on disk");
    assert_eq!(file, fake.png());
    assert_eq!(
        made.output.as_ref().expect("an output")["size_bytes"],
        file.len()
    );

    // 429: Gemini's wait is in the body (RetryInfo), not a header.
    fake.fail_next(Endpoint::Gemini, Fault::RetryInfo { delay: "7s" });
    let error = transient_after(asset().await, Duration::from_secs(7));
    assert!(
        error.message.contains("gemini: rate limited (429)"),
        "{}",
        error.message
    );
    fake.fail_next(
        Endpoint::Gemini,
        Fault::RateLimited {
            retry_after_secs: 2,
        },
    );
    transient_after(asset().await, Duration::from_secs(2));
    for status in [500, 503] {
        fake.fail_next(Endpoint::Gemini, Fault::Status(status));
        let error = transient(asset().await);
        assert!(
            error.message.contains(&format!("({status})")),
            "{}",
            error.message
        );
    }
    // A timeout: the fake answers after the client stopped waiting.
    let mut slow = fake.config();
    slow.timeout = Duration::from_millis(300);
    fake.fail_next(Endpoint::Gemini, Fault::Delay(Duration::from_secs(2)));
    let error = transient(
        GeminiImages::new(&slow)
            .generate(request(dir.path(), task, "assets", 4, vec![]))
            .await,
    );
    assert!(error.message.contains("timeout"), "{}", error.message);
    for status in [400, 403] {
        fake.fail_next(Endpoint::Gemini, Fault::Status(status));
        let error = permanent(asset().await);
        assert!(
            error
                .message
                .contains(&format!("injected failure {status}")),
            "{}",
            error.message
        );
    }
    // A blocked prompt: 200 without an image.
    fake.fail_next(
        Endpoint::Gemini,
        Fault::NoImage {
            reason: "IMAGE_SAFETY",
        },
    );
    let error = permanent(asset().await);
    assert!(error.message.contains("IMAGE_SAFETY"), "{}", error.message);
    // A wrong key: Gemini's 400 API_KEY_INVALID, named as the key's fault.
    let mut wrong = fake.config();
    wrong.gemini.key = Some(steps::cloud::ApiKey::new("not-the-key-at-all"));
    let error = permanent(
        GeminiImages::new(&wrong)
            .generate(request(dir.path(), task, "assets", 5, vec![]))
            .await,
    );
    assert!(
        error.message.contains("GEMINI_API_KEY"),
        "{}",
        error.message
    );
    assert!(
        error.message.contains("API key not valid"),
        "{}",
        error.message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elevenlabs_speech_and_sound_and_each_failure_class() {
    let fake = FakeCloud::start(FakeOptions::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let task = TaskId::new();
    let clip = source(dir.path(), task, "video", "02.mp4", &fake.clip());
    let config = fake.config();
    let voice = ElevenLabsAudio::new(&config, Sound::Speech, dir.path(), Tools::default());
    let sfx = ElevenLabsAudio::new(&config, Sound::Effects, dir.path(), Tools::default());
    let speak = || {
        voice.generate(request(
            dir.path(),
            task,
            "narration",
            2,
            vec![clip.clone()],
        ))
    };

    let spoken = speak().await.expect("speech");
    let script = spoken
        .output
        .as_ref()
        .and_then(|o| o["script"].as_str())
        .expect("a script")
        .to_owned();
    assert_eq!(
        spoken.cost_micros,
        i64::try_from(script.chars().count()).expect("short") * 100
    );
    let sound = sfx
        .generate(request(dir.path(), task, "sfx", 2, vec![clip.clone()]))
        .await
        .expect("a sound");
    assert_eq!(sound.cost_micros, 120_000);
    assert_eq!(
        sound.output.as_ref().expect("an output")["duration_secs"],
        2.0,
        "as long as its clip"
    );
    assert!(dir.path().join(&sound.artifact).exists());

    fake.fail_next(
        Endpoint::Speech,
        Fault::RateLimited {
            retry_after_secs: 3,
        },
    );
    transient_after(speak().await, Duration::from_secs(3));
    fake.fail_next(Endpoint::SoundEffects, Fault::Status(500));
    transient(
        sfx.generate(request(dir.path(), task, "sfx", 2, vec![clip.clone()]))
            .await,
    );
    fake.fail_next(Endpoint::Speech, Fault::Status(422));
    let error = permanent(speak().await);
    assert!(
        error.message.contains("body.text: injected failure 422"),
        "{}",
        error.message
    );
    // A provider that quotes the key back: the message keeps everything but the key.
    fake.fail_next(Endpoint::Speech, Fault::QuoteKey(401));
    let error = permanent(speak().await);
    assert!(
        !error.message.contains(fakes::ELEVENLABS_KEY),
        "{}",
        error.message
    );
    assert!(
        error
            .message
            .contains("Incorrect API key provided: [redacted]"),
        "{}",
        error.message
    );
    assert!(
        error.message.contains("ELEVENLABS_API_KEY"),
        "{}",
        error.message
    );
    let mut long = fake.config();
    long.elevenlabs.key = Some(steps::cloud::ApiKey::new("wrong-eleven-key"));
    let error = permanent(
        ElevenLabsAudio::new(&long, Sound::Speech, dir.path(), Tools::default())
            .generate(request(
                dir.path(),
                task,
                "narration",
                1,
                vec![clip.clone()],
            ))
            .await,
    );
    assert!(
        error
            .message
            .starts_with("elevenlabs: the key was refused (401"),
        "{}",
        error.message
    );
}

/// Polls `job` until it is no longer pending (at most 5 s).
async fn settle(runway: &RunwayVideo, request: &ItemRequest, job: Value) -> JobStatus {
    let started = Instant::now();
    loop {
        let status = runway
            .poll(request.clone(), job.clone())
            .await
            .expect("a poll");
        if !matches!(status, JobStatus::Pending { .. })
            || started.elapsed() > Duration::from_secs(5)
        {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runway_tasks_and_each_failure_class() {
    let options = FakeOptions {
        job_duration: Duration::from_millis(200),
        runway_concurrency: 1,
        ..FakeOptions::default()
    };
    let fake = FakeCloud::start(options).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let task = TaskId::new();
    let composite = source(dir.path(), task, "composites", "01.png", &fake.png());
    let runway = RunwayVideo::new(&fake.config(), dir.path());
    let clip = |item| request(dir.path(), task, "video", item, vec![composite.clone()]);
    let submission = |number| Submission {
        number,
        idempotency_key: format!("key-{number}"),
    };
    assert_eq!(runway.shape(), steps::Shape::Job);

    let first = runway
        .submit(clip(1), submission(1))
        .await
        .expect("accepted");
    let second = runway
        .submit(clip(2), submission(1))
        .await
        .expect("accepted");
    // Over the account's concurrency, Runway queues the task: THROTTLED is still pending.
    let queued = runway.poll(clip(2), second.clone()).await.expect("a poll");
    assert_eq!(queued, JobStatus::Pending { next_poll: None });
    assert!(fake.counts().throttled_answers >= 1);
    let JobStatus::Done(done) = settle(&runway, &clip(1), first).await else {
        panic!("clip 1 should succeed");
    };
    assert_eq!(done.artifact, format!("history/{task}/video/01.mp4"));
    assert_eq!(done.cost_micros, 250_000, "5 s at $0.05");
    assert_eq!(
        std::fs::read(dir.path().join(&done.artifact)).expect("clip"),
        fake.clip()
    );
    assert!(matches!(
        settle(&runway, &clip(2), second).await,
        JobStatus::Done(_)
    ));
    assert!(
        !fake.counts().download_had_auth,
        "the key went to the output host"
    );

    // A task refused for its content is not retried; a bad output is.
    fake.end_next_job(JobEnd::Fail {
        code: "SAFETY.INPUT.IMAGE",
    });
    let job = runway
        .submit(clip(3), submission(1))
        .await
        .expect("accepted");
    let JobStatus::Failed(error) = settle(&runway, &clip(3), job).await else {
        panic!("the task should fail");
    };
    assert_eq!(error.kind, FailureKind::Permanent, "{error:?}");
    assert!(
        error.message.contains("SAFETY.INPUT.IMAGE"),
        "{}",
        error.message
    );
    fake.end_next_job(JobEnd::Fail {
        code: "INTERNAL.BAD_OUTPUT.CODE01",
    });
    let job = runway
        .submit(clip(4), submission(1))
        .await
        .expect("accepted");
    let JobStatus::Failed(error) = settle(&runway, &clip(4), job).await else {
        panic!("the task should fail");
    };
    assert_eq!(error.kind, FailureKind::Transient, "{error:?}");
    // A task Runway no longer knows is lost: submitted anew.
    let lost = runway
        .poll(
            clip(5),
            json!({"id": "00000000-0000-0000-0000-000000000000"}),
        )
        .await
        .expect("a poll");
    assert!(matches!(lost, JobStatus::Failed(e) if e.kind == FailureKind::Transient));

    fake.fail_next(
        Endpoint::RunwaySubmit,
        Fault::RateLimited {
            retry_after_secs: 4,
        },
    );
    transient_after(
        runway.submit(clip(6), submission(1)).await,
        Duration::from_secs(4),
    );
    for status in [502, 503, 504] {
        fake.fail_next(Endpoint::RunwaySubmit, Fault::Status(status));
        transient(runway.submit(clip(6), submission(1)).await);
    }
    fake.fail_next(Endpoint::RunwayPoll, Fault::Status(503));
    transient(runway.poll(clip(6), json!({"id": "x"})).await);
    fake.fail_next(Endpoint::RunwaySubmit, Fault::Status(400));
    let error = permanent(runway.submit(clip(6), submission(1)).await);
    assert!(
        error
            .message
            .contains("runway: refused the request (400): injected failure 400"),
        "{}",
        error.message
    );
    let mut wrong = fake.config();
    wrong.runway.key = Some(steps::cloud::ApiKey::new("wrong-runway-key"));
    let error = permanent(
        RunwayVideo::new(&wrong, dir.path())
            .submit(clip(7), submission(1))
            .await,
    );
    assert!(
        error.message.contains("RUNWAY_API_KEY"),
        "{}",
        error.message
    );
}

/// A `reel worker --providers cloud` on the fakes, its stderr kept in `log`.
fn cloud_worker(
    db: &TestDatabase,
    fake: &FakeCloud,
    artifacts: &Path,
    log: &Path,
    env: &[(&str, &str)],
) -> Child {
    let stderr = std::fs::File::create(log).expect("a log file");
    Command::new(env!("CARGO_BIN_EXE_reel"))
        .args([
            "worker",
            "--worker-id",
            "cloud-worker",
            "--until-idle",
            "--providers",
            "cloud",
            "--time-scale",
            "0.001",
            // Gemini's default of 1 request/s would make 22 assets take 22 s here.
            "--rate",
            "gemini=50",
            "--log-format",
            "json",
        ])
        .env("DATABASE_URL", db.url())
        .env("REEL_ARTIFACTS", artifacts)
        .env("REEL_LOG", "info")
        .envs(fake.env())
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("start reel worker")
}

fn submit_video(db: &TestDatabase) -> TaskId {
    let run = reel_cli(
        db.url(),
        &[
            "submit",
            "--channel",
            "history",
            "--topic",
            "The fall of Rome",
        ],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    run.stdout
        .trim()
        .parse()
        .expect("submit prints the task id")
}

async fn events(db: &TestDatabase, task: TaskId) -> Vec<engine::RecordedEvent> {
    db.store().read_stream(task, 1).await.expect("read")
}

async fn wait_for_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("poll the worker") {
            return status;
        }
        assert!(
            started.elapsed() < limit,
            "the worker did not finish within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cloud_set_reaches_final_review_and_a_sigkill_pays_for_no_clip_twice() {
    let db = TestDatabase::create().await;
    let fake = FakeCloud::start(FakeOptions {
        job_duration: Duration::from_secs(2),
        runway_concurrency: 20,
        ..FakeOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let task = submit_video(&db);
    let logs = [
        dir.path().join("worker-1.log"),
        dir.path().join("worker-2.log"),
    ];
    let artifacts = dir.path().join("artifacts");

    // Kill the worker once 5 clips are on Runway and recorded: the cap holds the rest back,
    // so nothing is on its way to Runway when the process dies.
    let mut first = cloud_worker(&db, &fake, &artifacts, &logs[0], &[]);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let submitted = events(&db, task)
            .await
            .iter()
            .filter(|e| matches!(&e.event, Event::ItemSubmitted { step, .. } if step == "video"))
            .count();
        if submitted >= 5 {
            break;
        }
        assert!(
            first.try_wait().expect("poll").is_none(),
            "the worker exited early"
        );
        assert!(Instant::now() < deadline, "no clip was submitted in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill().expect("SIGKILL");
    first.wait().expect("reaped");
    let at_kill = fake.counts();
    assert_eq!(
        at_kill.submissions.len(),
        5,
        "the cap of 5 held at the kill"
    );

    let mut second = cloud_worker(&db, &fake, &artifacts, &logs[1], &[]);
    let status = wait_for_exit(&mut second, Duration::from_secs(150)).await;
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(&logs[1]).unwrap_or_default()
    );

    let events = events(&db, task).await;
    let state = fold(&events);
    assert_eq!(
        state.status(),
        TaskStatus::FINAL_REVIEW,
        "{:?}",
        state.failure
    );
    let counts = fake.counts();
    assert_eq!((counts.gemini_requests, counts.images), (22, 22));
    let mut seeds = counts.submissions.clone();
    seeds.sort_unstable();
    assert_eq!(
        seeds,
        (1..=18).collect::<Vec<u64>>(),
        "each clip submitted once"
    );
    assert_eq!(counts.runway_submit_requests, 18);
    assert_eq!(counts.downloads, 18);
    assert!(!counts.download_had_auth);
    assert_eq!((counts.speech_requests, counts.speech), (18, 18));
    assert_eq!((counts.sfx_requests, counts.sfx), (18, 18));
    assert_eq!(
        counts.max_open, 5,
        "Runway's cap of 5: reached, never exceeded"
    );

    // Every item once in the log, at the price table's cost.
    let mut completed: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    let mut cost: BTreeMap<&str, i64> = BTreeMap::new();
    let mut submitted = 0;
    for event in &events {
        match &event.event {
            Event::ItemCompleted {
                step,
                item,
                cost_micros,
                ..
            } => {
                completed.entry(step.as_str()).or_default().push(*item);
                *cost.entry(step.as_str()).or_default() += cost_micros;
            }
            Event::ItemSubmitted { .. } => submitted += 1,
            _ => {}
        }
    }
    assert_eq!(submitted, 18, "no clip's task recorded twice");
    for (step, count) in [
        ("assets", 22),
        ("composites", 1),
        ("video", 18),
        ("narration", 18),
        ("sfx", 18),
        ("assembly", 1),
    ] {
        let items = &completed[step];
        assert_eq!(items.len(), count, "{step}: {items:?}");
    }
    assert_eq!(cost["assets"], 22 * 39_000);
    assert_eq!(cost["video"], 18 * 250_000);
    assert_eq!(cost["sfx"], 18 * 120_000);
    assert!(cost["narration"] > 0);
    assert_eq!(cost["composites"] + cost["assembly"], 0, "made locally");
    assert_eq!(state.spent.cost_micros, cost.values().sum::<i64>());

    // The final video: the 2-second clips in order, with sound.
    let record = state
        .step("assembly")
        .and_then(|s| s.items.get(&1))
        .expect("assembled");
    let video = Tools::default()
        .probe(&artifacts.join(&record.artifact))
        .await
        .expect("a video");
    assert_eq!(video.streams_of("video").len(), 1);
    assert_eq!(video.streams_of("audio").len(), 1);
    assert!(
        (video.duration_secs - 36.0).abs() < 0.5,
        "{}",
        video.duration_secs
    );

    // No key in the log or the worker's output.
    let log_text =
        serde_json::to_string(&events.iter().map(|e| &e.event).collect::<Vec<_>>()).expect("json");
    for key in [fakes::GEMINI_KEY, fakes::RUNWAY_KEY, fakes::ELEVENLABS_KEY] {
        assert!(!log_text.contains(key));
        for log in &logs {
            assert!(
                !std::fs::read_to_string(log)
                    .unwrap_or_default()
                    .contains(key)
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_fails_the_task_at_once_naming_the_provider() {
    let db = TestDatabase::create().await;
    let fake = FakeCloud::start(FakeOptions::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let task = submit_video(&db);
    let log = dir.path().join("worker.log");
    let wrong = "sk-wrong-key-for-gemini";
    let mut worker = cloud_worker(
        &db,
        &fake,
        &dir.path().join("a"),
        &log,
        &[("GEMINI_API_KEY", wrong)],
    );
    let status = wait_for_exit(&mut worker, Duration::from_secs(60)).await;
    assert!(status.success());

    let events = events(&db, task).await;
    let state = fold(&events);
    assert_eq!(state.status(), TaskStatus::FAILED);
    let reason = state.failure.clone().unwrap_or_default();
    assert!(reason.contains("gemini: the key was refused"), "{reason}");
    assert!(reason.contains("GEMINI_API_KEY"), "{reason}");
    // The assets step is as wide as Gemini's cap (10): its first wave goes out at once,
    // is refused, and nothing follows it (no retry, no second wave).
    let requests = fake.counts().gemini_requests;
    assert!(
        (1..=10).contains(&requests),
        "{requests} requests: one wave of refusals, no retry storm"
    );
    assert!(
        !events
            .iter()
            .any(|e| matches!(e.event, Event::RetryScheduled { .. }))
    );
    let everything = format!(
        "{}{}",
        serde_json::to_string(&events.iter().map(|e| &e.event).collect::<Vec<_>>()).expect("json"),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(!everything.contains(wrong), "the key was written down");
}

#[test]
fn a_worker_without_a_cloud_steps_key_refuses_to_start_naming_it() {
    let run = |args: &[&str], env: &[(&str, &str)]| {
        Command::new(env!("CARGO_BIN_EXE_reel"))
            .args(args)
            .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/unused")
            .env_remove("GEMINI_API_KEY")
            .env_remove("RUNWAY_API_KEY")
            .env_remove("ELEVENLABS_API_KEY")
            .envs(env.iter().copied())
            .output()
            .expect("run reel")
    };
    let out = run(
        &[
            "worker",
            "--providers",
            "simulated",
            "--provider",
            "video=cloud",
        ],
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("RUNWAY_API_KEY (for video)"), "{stderr}");
    assert!(!stderr.contains("GEMINI_API_KEY"), "{stderr}");
    let out = run(
        &["worker", "--providers", "cloud"],
        &[("GEMINI_API_KEY", "k")],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("RUNWAY_API_KEY (for video) and ELEVENLABS_API_KEY (for narration, sfx)"),
        "{stderr}"
    );
    for bad in ["clips=cloud", "video=remote", "video"] {
        let out = run(&["worker", "--provider", bad], &[]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{bad}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = run(
        &["worker", "--providers", "cloud"],
        &[("GEMINI_API_URL", "ftp://x")],
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("GEMINI_API_URL"));
}
