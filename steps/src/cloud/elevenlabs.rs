//! Narration and sound effects by ElevenLabs: `POST /v1/text-to-speech/{voice_id}` speaks
//! each clip's line; `POST /v1/sound-generation` makes a sound bed as long as its clip.
//! Both answer with the audio itself (MP3, 44.1 kHz, 128 kb/s).

use std::path::PathBuf;
use std::sync::Arc;

use engine::{BoxFuture, ItemOutput, ProviderLimits, StepError};
use serde_json::json;

use super::config::CloudConfig;
use super::http::{Api, write_whole};
use super::{artifact_of, story};
use crate::artifacts::{Fingerprint, resolve_artifact};
use crate::local::Tools;
use crate::provider::{ItemRequest, Provider};

/// The audio format asked for (ElevenLabs' default, named so it never changes under us).
const OUTPUT_FORMAT: &str = "mp3_44100_128";
/// The lengths sound generation takes, in seconds.
const SFX_SECONDS: (f64, f64) = (0.5, 30.0);

/// The narration and SFX provider key (one account serves both), and its default limits:
/// 5 requests at once, the concurrency of ElevenLabs' Creator plan (Free 2, Starter 3,
/// Pro 10, Scale and Business 15: help.elevenlabs.io, "API Error Code 429"). ElevenLabs
/// limits concurrency, not requests per second. Change it with
/// `--max-in-flight elevenlabs=N`.
pub fn limits() -> ProviderLimits {
    ProviderLimits::new("elevenlabs").max_in_flight(5)
}

/// What an ElevenLabs provider makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sound {
    /// The clip's narration line, spoken.
    Speech,
    /// A sound bed as long as the clip.
    Effects,
}

/// Narration or sound effects per clip from ElevenLabs.
#[derive(Clone, Debug)]
pub struct ElevenLabsAudio {
    api: Api,
    sound: Sound,
    voice_id: String,
    speech_model: String,
    price_1k_chars: i64,
    price_sfx: i64,
    root: PathBuf,
    tools: Arc<Tools>,
}

impl ElevenLabsAudio {
    /// The provider of `sound` for `config`'s ElevenLabs account; clips are read under
    /// `root` and measured with `tools` (ffprobe).
    pub fn new(config: &CloudConfig, sound: Sound, root: impl Into<PathBuf>, tools: Tools) -> Self {
        ElevenLabsAudio {
            api: Api::new(
                "elevenlabs",
                "ELEVENLABS_API_KEY",
                &config.elevenlabs,
                config.timeout,
            ),
            sound,
            voice_id: config.voice_id.clone(),
            speech_model: config.speech_model.clone(),
            price_1k_chars: config.prices.elevenlabs_1k_chars,
            price_sfx: config.prices.elevenlabs_sfx,
            root: root.into(),
            tools: Arc::new(tools),
        }
    }

    async fn make(&self, request: ItemRequest) -> Result<ItemOutput, StepError> {
        let key = self.api.key()?;
        if self.voice_id.is_empty() || !self.voice_id.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(StepError::permanent(format!(
                "elevenlabs: bad voice id {:?}",
                engine::truncate_for_display(&self.voice_id, 64)
            )));
        }
        let (path, body, cost, details) = match self.sound {
            Sound::Speech => {
                let story = story(&request)?;
                let line = crate::local::narration_line(&story, request.item);
                let chars = i64::try_from(line.chars().count()).unwrap_or(i64::MAX);
                // Charged per character: a started thousand is not rounded up.
                let cost = (self.price_1k_chars * chars + 999) / 1000;
                let body = json!({"text": line, "model_id": self.speech_model});
                let details = json!({"script": line, "voice_id": self.voice_id});
                (
                    format!("/v1/text-to-speech/{}", self.voice_id),
                    body,
                    cost,
                    details,
                )
            }
            Sound::Effects => {
                let seconds = self.clip_seconds(&request).await?;
                let story = story(&request)?;
                let text = format!(
                    "Soft ambient soundscape for a documentary scene about {}, scene {} of {}",
                    story.topic,
                    request.item,
                    crate::CLIPS
                );
                let body = json!({
                    "text": text,
                    "duration_seconds": seconds,
                    "prompt_influence": 0.3,
                });
                let details = json!({"prompt": text, "duration_secs": seconds});
                (
                    "/v1/sound-generation".to_owned(),
                    body,
                    self.price_sfx,
                    details,
                )
            }
        };
        let url = self
            .api
            .url(&format!("{path}?output_format={OUTPUT_FORMAT}"));
        let call = self
            .api
            .post(&url)
            .header("xi-api-key", key.expose())
            .json(&body);
        let audio = self.api.body(self.api.send(call).await?).await?;
        if audio.is_empty() {
            return Err(StepError::transient(
                "elevenlabs: the audio came back empty",
            ));
        }
        let file = format!("{:02}.mp3", request.item);
        write_whole(&request.artifact_dir.join(&file), &audio).await?;
        let mut details = details;
        if let Some(map) = details.as_object_mut() {
            map.insert("sources".into(), json!(request.sources));
        }
        ItemOutput::new(artifact_of(&request, &file), cost)
            .with_output(Fingerprint::of(&audio).add_to(Some(details)))
    }

    /// The length of the clip this sound bed is for, within what sound generation takes.
    async fn clip_seconds(&self, request: &ItemRequest) -> Result<f64, StepError> {
        let [clip] = request.sources.as_slice() else {
            return Err(StepError::permanent(format!(
                "elevenlabs: sfx {} needs one clip, got {}",
                request.item,
                request.sources.len()
            )));
        };
        let path = resolve_artifact(&self.root, clip)
            .map_err(|e| StepError::permanent(format!("elevenlabs: clip: {e}")))?;
        let seconds = self.tools.probe(&path).await?.duration_secs;
        Ok((seconds * 100.0)
            .round()
            .clamp(SFX_SECONDS.0 * 100.0, SFX_SECONDS.1 * 100.0)
            / 100.0)
    }
}

impl Provider for ElevenLabsAudio {
    fn generate(&self, request: ItemRequest) -> BoxFuture<Result<ItemOutput, StepError>> {
        let this = self.clone();
        Box::pin(async move { this.make(request).await })
    }

    fn limits(&self) -> Option<ProviderLimits> {
        Some(limits())
    }
}
