//! The video pipeline on the local providers through the `reel` binary against a real
//! PostgreSQL: real media from start to finish (a clip 7 failure resumed at clip 7, a
//! final MP4 as long as its clips), and a worker that refuses to start without ffmpeg.
//! Needs ffmpeg, ffprobe and espeak-ng (`apt-get install -y ffmpeg espeak-ng`).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use engine::testing::TestDatabase;
use engine::{Event, TaskId, TaskStatus, fold};
use steps::Fingerprint;
use steps::local::{CLIP_SECONDS, Tools};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn reel(db: &TestDatabase, artifacts: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_reel"))
        .args(args)
        .env("DATABASE_URL", db.url())
        .env("REEL_ARTIFACTS", artifacts)
        .env("REEL_TIME_SCALE", "0.00005")
        .env("REEL_LOG", "warn")
        .envs(env.iter().copied())
        .output()
        .expect("run reel");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn submit(db: &TestDatabase, artifacts: &Path) -> TaskId {
    let args = [
        "submit",
        "--channel",
        "history",
        "--topic",
        "The fall of Rome",
        "--fail",
        "video:7",
    ];
    let run = reel(db, artifacts, &args, &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    run.stdout
        .trim()
        .parse()
        .expect("submit prints the task id")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_pipeline_makes_a_real_video_and_resumes_at_clip_7() {
    let db = TestDatabase::create().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let task = submit(&db, dir.path());
    let worker = reel(
        &db,
        dir.path(),
        &["worker", "--until-idle", "--providers", "local"],
        &[],
    );
    assert_eq!(worker.code, 0, "{}", worker.stderr);

    let events = db.store().read_stream(task, 1).await.expect("read");
    let state = fold(&events);
    assert_eq!(
        state.status(),
        TaskStatus::FINAL_REVIEW,
        "{:?}",
        state.failure
    );
    assert_eq!(state.spent.cost_micros, 0, "local work charges nothing");
    // Clip 7 failed on attempt 1; attempt 2 made clips 7–18 and nothing before them.
    let mut attempts: BTreeMap<(String, u32), Vec<u32>> = BTreeMap::new();
    let mut fingerprints = 0;
    for event in &events {
        if let Event::ItemCompleted {
            step,
            item,
            attempt,
            output,
            ..
        } = &event.event
        {
            attempts
                .entry((step.clone(), *item))
                .or_default()
                .push(*attempt);
            fingerprints +=
                usize::from(output.as_ref().and_then(Fingerprint::recorded_in).is_some());
        }
    }
    for clip in 1..=18 {
        let expected = if clip < 7 { [1] } else { [2] };
        assert_eq!(
            attempts[&("video".to_owned(), clip)],
            expected,
            "clip {clip}"
        );
    }
    assert!(
        attempts
            .iter()
            .all(|((step, _), a)| step == "video" || a.len() == 1)
    );
    assert_eq!(
        fingerprints,
        22 + 1 + 18 * 3 + 1,
        "every artifact's size and sha256"
    );

    // The final video: one H.264 picture, one sound track, as long as the 18 clips.
    let assembly = &state.step("assembly").expect("assembled").items[&1];
    let video = steps::resolve_artifact(dir.path(), &assembly.artifact).expect("path");
    let info = Tools::default().probe(&video).await.expect("ffprobe");
    let picture = info.streams_of("video");
    assert_eq!(picture.len(), 1, "{info:?}");
    assert_eq!(
        (
            picture[0].codec_name.as_str(),
            picture[0].width,
            picture[0].height
        ),
        ("h264", Some(1280), Some(720))
    );
    assert_eq!(info.streams_of("audio").len(), 1, "{info:?}");
    let clips: f64 = state
        .step("video")
        .expect("clips")
        .items
        .values()
        .map(|clip| {
            clip.output
                .as_ref()
                .and_then(|o| o["duration_secs"].as_f64())
                .unwrap_or(0.0)
        })
        .sum();
    assert!(
        (clips - 18.0 * f64::from(CLIP_SECONDS)).abs() < 0.2,
        "{clips}"
    );
    assert!(
        (info.duration_secs - clips).abs() < 0.25,
        "{} vs {clips}",
        info.duration_secs
    );

    let audit = reel(&db, dir.path(), &["audit", &task.to_string()], &[]);
    assert_eq!(
        audit.code, 0,
        "every artifact is as recorded: {}",
        audit.stdout
    );
}

#[tokio::test]
async fn a_worker_without_ffmpeg_refuses_to_start_and_says_what_to_install() {
    let db = TestDatabase::create().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let task = submit(&db, dir.path());
    let empty = tempfile::tempdir().expect("a PATH with nothing on it");
    let path = empty.path().to_str().expect("utf-8 path");
    for (args, env) in [
        (
            vec!["worker", "--until-idle", "--providers", "local"],
            vec![("PATH", path)],
        ),
        (
            vec!["worker", "--until-idle"],
            vec![("PATH", path), ("REEL_PROVIDERS", "local")],
        ),
    ] {
        let run = reel(&db, dir.path(), &args, &env);
        assert_eq!(run.code, 1, "{}", run.stderr);
        for needed in [
            "ffmpeg",
            "ffprobe",
            "espeak-ng",
            "apt-get install -y ffmpeg espeak-ng",
        ] {
            assert!(run.stderr.contains(needed), "{needed}: {}", run.stderr);
        }
        assert_eq!(run.stderr.lines().count(), 1, "one line: {}", run.stderr);
    }
    let events = db.store().read_stream(task, 1).await.expect("read");
    assert_eq!(events.len(), 1, "nothing was claimed: {events:?}");
}
