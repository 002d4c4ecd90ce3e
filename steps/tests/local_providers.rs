//! The local providers, step by step, on a small video (3 assets, 2 clips): each makes a
//! valid file of the right kind from the files before it (PNG sizes, ffprobe's streams and
//! durations), records its size and SHA-256, and a missing input fails for good.
//! Needs ffmpeg, ffprobe and espeak-ng (`apt-get install -y ffmpeg espeak-ng`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use engine::{ChannelId, FailureKind, ItemOutput, TaskId};
use serde_json::json;
use steps::local::{CLIP_SECONDS, Tools};
use steps::{Fingerprint, ItemRequest, Provider, Providers};

struct Video {
    root: PathBuf,
    task: TaskId,
    providers: Providers,
}

impl Video {
    fn new(root: &Path) -> Self {
        Video {
            root: root.to_owned(),
            task: TaskId::new(),
            providers: steps::local::providers(root, Tools::default()),
        }
    }

    fn request(&self, step: &str, item: u32, sources: &[&str]) -> ItemRequest {
        let channel = ChannelId::parse("history").expect("channel");
        ItemRequest {
            task_id: self.task,
            channel_id: channel.clone(),
            step: step.into(),
            item,
            attempt: 1,
            input: Arc::new(json!({"topic": "The fall of Rome", "story_direction": "dramatic"})),
            artifact_dir: steps::artifact_path(&self.root, &channel, self.task, step, "_")
                .expect("path")
                .parent()
                .expect("dir")
                .to_owned(),
            sources: sources.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn provider(&self, step: &str) -> &dyn Provider {
        match step {
            "assets" => &*self.providers.assets,
            "composites" => &*self.providers.composites,
            "video" => &*self.providers.video,
            "narration" => &*self.providers.narration,
            "sfx" => &*self.providers.sfx,
            _ => &*self.providers.assembly,
        }
    }

    /// Runs one item; checks its cost and fingerprint; returns its output and file.
    async fn make(&self, step: &str, item: u32, sources: &[&str]) -> (ItemOutput, PathBuf) {
        let output = self
            .provider(step)
            .generate(self.request(step, item, sources))
            .await
            .unwrap_or_else(|e| panic!("{step} {item}: {e}"));
        assert_eq!(output.cost_micros, 0, "local work charges nothing");
        let file = steps::resolve_artifact(&self.root, &output.artifact).expect("under the root");
        let recorded = output
            .output
            .as_ref()
            .and_then(Fingerprint::recorded_in)
            .expect("size and sha256 recorded");
        let bytes = std::fs::read(&file).expect("the artifact exists");
        assert_eq!(Fingerprint::of(&bytes), recorded, "{step} {item}");
        (output, file)
    }
}

fn assert_close(actual: f64, expected: f64, what: &str) {
    assert!(
        (actual - expected).abs() < 0.15,
        "{what}: {actual} s, expected {expected} s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_local_step_makes_a_valid_file_from_the_ones_before() {
    let dir = tempfile::tempdir().expect("tempdir");
    let video = Video::new(dir.path());
    let tools = Tools::default();
    tools
        .check()
        .await
        .expect("ffmpeg and espeak-ng are installed");

    let mut assets = Vec::new();
    for item in 1..=3 {
        let (out, file) = video.make("assets", item, &[]).await;
        assert_eq!(image::image_dimensions(&file).expect("a PNG"), (640, 360));
        assets.push(out.artifact);
    }
    let asset_refs: Vec<&str> = assets.iter().map(String::as_str).collect();
    let (composite, file) = video.make("composites", 1, &asset_refs).await;
    assert_eq!(image::image_dimensions(&file).expect("a PNG"), (1280, 720));
    assert_eq!(
        composite.output.as_ref().expect("output")["sources"],
        json!(assets)
    );

    let (mut clips, mut voices, mut beds) = (Vec::new(), Vec::new(), Vec::new());
    for item in 1..=2 {
        let (clip, file) = video.make("video", item, &[&composite.artifact]).await;
        let info = tools.probe(&file).await.expect("probe the clip");
        let streams = info.streams_of("video");
        assert_eq!(streams.len(), 1, "{info:?}");
        assert_eq!(streams[0].codec_name, "h264");
        assert_eq!(
            (streams[0].width, streams[0].height),
            (Some(1280), Some(720))
        );
        assert!(info.streams_of("audio").is_empty());
        assert_close(info.duration_secs, f64::from(CLIP_SECONDS), "a clip");

        let (voice, file) = video.make("narration", item, &[&clip.artifact]).await;
        let info = tools.probe(&file).await.expect("probe the narration");
        assert_eq!(info.streams_of("audio").len(), 1, "{info:?}");
        assert!(
            info.duration_secs > 0.5 && info.duration_secs <= f64::from(CLIP_SECONDS),
            "speech that fits its clip: {info:?}"
        );
        let script = voice.output.as_ref().expect("output")["script"].clone();
        assert!(script.as_str().is_some_and(|s| !s.is_empty()), "{script}");

        let (bed, file) = video.make("sfx", item, &[&clip.artifact]).await;
        let info = tools.probe(&file).await.expect("probe the sfx");
        assert_eq!(info.streams_of("audio").len(), 1, "{info:?}");
        assert_close(info.duration_secs, f64::from(CLIP_SECONDS), "a sound bed");
        clips.push(clip.artifact);
        voices.push(voice.artifact);
        beds.push(bed.artifact);
    }

    // A line too long for its clip at the usual pace is spoken faster, to fit.
    let mut long = video.request("narration", 1, &[&clips[0]]);
    long.input = Arc::new(
        json!({"topic": "The long and winding decline and fall of the Western Roman Empire in late antiquity"}),
    );
    long.step = "narration_long".into();
    long.artifact_dir = dir.path().join("long");
    let spoken = video
        .provider("narration")
        .generate(long)
        .await
        .expect("a long line");
    let seconds = spoken.output.as_ref().expect("output")["duration_secs"].as_f64();
    assert!(
        seconds.is_some_and(|s| s <= f64::from(CLIP_SECONDS)),
        "{seconds:?}"
    );

    let sources: Vec<&str> = clips
        .iter()
        .chain(&voices)
        .chain(&beds)
        .map(String::as_str)
        .collect();
    let (assembly, file) = video.make("assembly", 1, &sources).await;
    let info = tools.probe(&file).await.expect("probe the video");
    let picture = info.streams_of("video");
    assert_eq!(picture.len(), 1, "{info:?}");
    assert_eq!(picture[0].codec_name, "h264");
    assert_eq!(info.streams_of("audio").len(), 1, "{info:?}");
    assert_close(
        info.duration_secs,
        2.0 * f64::from(CLIP_SECONDS),
        "the video",
    );
    assert_eq!(assembly.output.as_ref().expect("output")["clips"], 2);
}

#[tokio::test]
async fn a_missing_input_fails_for_good_and_a_fault_fails_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let video = Video::new(dir.path());
    let gone = format!("history/{}/video/07.mp4", video.task);
    for step in ["composites", "video", "narration", "sfx", "assembly"] {
        let err = video
            .provider(step)
            .generate(video.request(step, 7, &[&gone]))
            .await
            .expect_err("nothing to build on");
        assert_eq!(err.kind, FailureKind::Permanent, "{step}: {err:?}");
        assert!(err.message.contains("07.mp4"), "{err:?}");
    }
    let escape = video
        .provider("video")
        .generate(video.request("video", 1, &["../../etc/passwd"]))
        .await
        .expect_err("a source outside the root");
    assert_eq!(escape.kind, FailureKind::Permanent);

    let mut faulty = video.request("assets", 7, &[]);
    faulty.input = Arc::new(json!({"topic": "Rome", "faults": [{"step": "assets", "item": 7}]}));
    let err = video
        .provider("assets")
        .generate(faulty.clone())
        .await
        .expect_err("injected");
    assert_eq!(err.kind, FailureKind::Transient);
    faulty.attempt = 2;
    video
        .provider("assets")
        .generate(faulty)
        .await
        .expect("the fault fires on the first attempt only");
}
