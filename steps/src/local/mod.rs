//! Local providers: real media on any machine, from the earlier steps' artifacts as the
//! log recorded them. Assets are PNG colour cards and the composite a 1280×720 board, drawn
//! in-process; clips are H.264 MP4s made by ffmpeg from the composite; narration is
//! espeak-ng speech of a script written from the topic; SFX are ffmpeg's synthesis
//! sources; the assembly is one MP4 of the clips in order with narration and SFX mixed.
//!
//! Local work charges nothing, so every item costs 0. Each output records its artifact's
//! size and SHA-256 (see [`crate::Fingerprint`]). ffmpeg, ffprobe and
//! espeak-ng must be installed: [`Tools::check`] says so when a worker starts.

mod media;
pub(crate) mod pictures;
mod script;
mod text;
mod tools;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use engine::{BoxFuture, ItemOutput, StepError};
use serde_json::{Value, json};

use crate::VideoInput;
use crate::artifacts::{Fingerprint, resolve_artifact};
use crate::provider::{ItemRequest, Provider, Providers};
use media::Scene;
use pictures::Story;

pub use media::{CLIP_FPS, CLIP_SECONDS};
pub use tools::{INSTALL_HINT, MediaInfo, Stream, Tools, ToolsMissing};

/// The local provider set, writing under `artifacts_root` (the root the pipeline's
/// artifacts are recorded relative to) with `tools`.
pub fn providers(artifacts_root: impl Into<PathBuf>, tools: Tools) -> Providers {
    let root: PathBuf = artifacts_root.into();
    let tools = Arc::new(tools);
    let local = |make: Make| -> Arc<dyn Provider> {
        Arc::new(Local {
            make,
            root: root.clone(),
            tools: tools.clone(),
        })
    };
    Providers {
        assets: local(Make::Card),
        composites: local(Make::Board),
        video: local(Make::Clip),
        narration: local(Make::Speech),
        sfx: local(Make::SoundBed),
        assembly: local(Make::Final),
    }
}

/// Clip `item`'s narration line (the cloud narration speaks the same script).
pub(crate) fn narration_line(story: &Story, item: u32) -> String {
    script::narration_line(story, item, crate::CLIPS)
}

/// What a local provider makes.
#[derive(Clone, Copy, Debug)]
enum Make {
    Card,
    Board,
    Clip,
    Speech,
    SoundBed,
    Final,
}

impl Make {
    fn extension(self) -> &'static str {
        match self {
            Make::Card | Make::Board => "png",
            Make::Clip | Make::Final => "mp4",
            Make::Speech | Make::SoundBed => "wav",
        }
    }
}

#[derive(Clone, Debug)]
struct Local {
    make: Make,
    root: PathBuf,
    tools: Arc<Tools>,
}

/// One item's job: what it builds on and where its file goes.
struct Job {
    request: ItemRequest,
    story: Story,
    sources: Vec<PathBuf>,
    out: PathBuf,
}

impl Provider for Local {
    fn generate(&self, request: ItemRequest) -> BoxFuture<Result<ItemOutput, StepError>> {
        let this = self.clone();
        Box::pin(async move {
            if let Some(fault) = crate::faults::injected(&request) {
                let message = format!("injected failure at {} {}", request.step, request.item);
                return Err(if fault.permanent {
                    StepError::permanent(format!("{message} (permanent)"))
                } else {
                    StepError::transient(format!("{message} (timeout)"))
                });
            }
            let job = this.job(request).await?;
            let details = this.make(&job).await?;
            finish(job, details).await
        })
    }
}

impl Local {
    async fn job(&self, request: ItemRequest) -> Result<Job, StepError> {
        let input: VideoInput = serde_json::from_value((*request.input).clone())
            .map_err(|e| StepError::permanent(format!("invalid input: {e}")))?;
        let sources = request
            .sources
            .iter()
            .map(|artifact| {
                resolve_artifact(&self.root, artifact)
                    .map_err(|e| StepError::permanent(format!("source artifact: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        tokio::fs::create_dir_all(&request.artifact_dir)
            .await
            .map_err(|e| {
                StepError::transient(format!(
                    "cannot create {}: {e}",
                    request.artifact_dir.display()
                ))
            })?;
        let out =
            request
                .artifact_dir
                .join(format!("{:02}.{}", request.item, self.make.extension()));
        Ok(Job {
            story: Story {
                topic: input.topic,
                direction: input.story_direction,
            },
            request,
            sources,
            out,
        })
    }

    /// Makes the item's file; returns what its output records besides the fingerprint.
    async fn make(&self, job: &Job) -> Result<Value, StepError> {
        let (tools, item) = (&*self.tools, job.request.item);
        Ok(match self.make {
            Make::Card => {
                draw_card(job).await?;
                json!({"width": pictures::CARD.0, "height": pictures::CARD.1})
            }
            Make::Board => {
                draw_board(job).await?;
                json!({"width": pictures::FRAME.0, "height": pictures::FRAME.1})
            }
            Make::Clip => {
                media::clip(tools, only_source(job)?, item, &job.out).await?;
                json!({"duration_secs": probe_secs(tools, &job.out).await?})
            }
            Make::Speech => {
                let seconds = probe_secs(tools, only_source(job)?).await?;
                let line = script::narration_line(&job.story, item, crate::CLIPS);
                let spoken = media::narration(tools, &line, seconds, &job.out).await?;
                json!({"script": line, "duration_secs": spoken})
            }
            Make::SoundBed => {
                let seconds = probe_secs(tools, only_source(job)?).await?;
                media::sound_bed(tools, item, seconds, &job.out).await?;
                json!({"duration_secs": seconds})
            }
            Make::Final => {
                let (clips, seconds) = assemble(tools, job).await?;
                json!({"clips": clips, "duration_secs": seconds})
            }
        })
    }
}

/// The item's output: its details, the sources it was built from, and the fingerprint of
/// the file it made. Local work costs nothing.
async fn finish(job: Job, mut details: Value) -> Result<ItemOutput, StepError> {
    let request = &job.request;
    let print = Fingerprint::of_file(&job.out)
        .await
        .map_err(|e| StepError::transient(format!("cannot read {}: {e}", job.out.display())))?;
    if let Some(details) = details.as_object_mut()
        && !request.sources.is_empty()
    {
        details.insert("sources".into(), json!(request.sources));
    }
    let file = job
        .out
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let artifact = format!(
        "{}/{}/{}/{file}",
        request.channel_id, request.task_id, request.step
    );
    ItemOutput::new(artifact, 0).with_output(print.add_to(Some(details)))
}

fn only_source(job: &Job) -> Result<&Path, StepError> {
    match job.sources.as_slice() {
        [one] => Ok(one),
        other => Err(StepError::permanent(format!(
            "{} {} expects one source, got {}",
            job.request.step,
            job.request.item,
            other.len()
        ))),
    }
}

async fn probe_secs(tools: &Tools, path: &Path) -> Result<f64, StepError> {
    Ok(tools.probe(path).await?.duration_secs)
}

/// Runs picture work (CPU-bound) off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StepError> + Send + 'static,
) -> Result<T, StepError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| StepError::transient(format!("drawing stopped: {e}")))?
}

async fn draw_card(job: &Job) -> Result<(), StepError> {
    let (story, item, out) = (job.story.clone(), job.request.item, job.out.clone());
    blocking(move || {
        let card = pictures::asset_card(&story, item, crate::ASSETS, &text::font()?);
        save_png(&card, &out)
    })
    .await
}

async fn draw_board(job: &Job) -> Result<(), StepError> {
    tools::require_inputs(job.sources.iter().map(PathBuf::as_path))?;
    let (story, sources, out) = (job.story.clone(), job.sources.clone(), job.out.clone());
    blocking(move || {
        let assets = sources
            .iter()
            .map(|path| {
                image::open(path).map(|i| i.to_rgb8()).map_err(|e| {
                    StepError::permanent(format!("asset {} is unreadable: {e}", path.display()))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let board = pictures::composite(&story, &assets, &text::font()?);
        save_png(&board, &out)
    })
    .await
}

fn save_png(image: &image::RgbImage, out: &Path) -> Result<(), StepError> {
    image
        .save_with_format(out, image::ImageFormat::Png)
        .map_err(|e| StepError::transient(format!("cannot write {}: {e}", out.display())))
}

/// The assembly's scenes from its sources (every clip, then every narration, then every
/// SFX, each in item order, as the pipeline lists them), made into the final video;
/// returns the number of clips and the video's length, checked against the clips'.
async fn assemble(tools: &Tools, job: &Job) -> Result<(usize, f64), StepError> {
    tools::require_inputs(job.sources.iter().map(PathBuf::as_path))?;
    let of_step = |step: &str| -> Vec<PathBuf> {
        job.request
            .sources
            .iter()
            .zip(&job.sources)
            .filter(|(artifact, _)| artifact.split('/').nth(2) == Some(step))
            .map(|(_, path)| path.clone())
            .collect()
    };
    let (clips, voices, beds) = (of_step("video"), of_step("narration"), of_step("sfx"));
    if clips.is_empty() || clips.len() != voices.len() || clips.len() != beds.len() {
        return Err(StepError::permanent(format!(
            "the assembly needs as many clips, narrations and SFX; got {}, {} and {}",
            clips.len(),
            voices.len(),
            beds.len()
        )));
    }
    let mut scenes = Vec::with_capacity(clips.len());
    for ((clip, narration), sfx) in clips.into_iter().zip(voices).zip(beds) {
        let seconds = probe_secs(tools, &clip).await?;
        scenes.push(Scene {
            clip,
            narration,
            sfx,
            seconds,
        });
    }
    media::assemble(tools, &scenes, &job.request.artifact_dir, &job.out).await?;
    let expected: f64 = scenes.iter().map(|s| s.seconds).sum();
    let made = tools.probe(&job.out).await?;
    let shape = (
        made.streams_of("video").len(),
        made.streams_of("audio").len(),
    );
    if shape != (1, 1) || (made.duration_secs - expected).abs() > 0.25 {
        return Err(StepError::permanent(format!(
            "the assembly came out wrong: {} video and {} audio streams, {:.2} s for clips of {expected:.2} s",
            shape.0, shape.1, made.duration_secs
        )));
    }
    Ok((scenes.len(), made.duration_secs))
}
