//! Cloud providers: the APIs the pipeline was written for. Assets are drawn by the Gemini
//! API, clips made by Runway (a two-phase job: a task submitted once, then polled),
//! narration and sound effects by ElevenLabs; composites and the assembly are made here,
//! by the local providers.
//!
//! Each account is a provider key with default limits from its published tier
//! (`gemini`, `runway`, `elevenlabs` — narration and SFX share one account); every item
//! records its cost from [`Prices`], and its artifact's size and SHA-256. Failures are
//! classified as the providers document them: 429 (with `Retry-After`, or Gemini's
//! `RetryInfo.retryDelay`), 408, 5xx and timeouts are transient; 400, 401, 403, 422 and a
//! Runway task refused for its content (`SAFETY.*`) are permanent, with the provider's
//! message truncated and scrubbed of the key. Keys are sent in headers and never logged
//! or stored.

mod config;
mod elevenlabs;
mod gemini;
mod http;
mod runway;

use std::path::PathBuf;
use std::sync::Arc;

use engine::StepError;

pub use config::{
    Account, ApiKey, CloudConfig, ConfigError, DEFAULT_VOICE_ID, ELEVENLABS_URL, GEMINI_URL,
    Prices, RUNWAY_URL,
};
pub use elevenlabs::{ElevenLabsAudio, Sound, limits as elevenlabs_limits};
pub use gemini::{GeminiImages, limits as gemini_limits};
pub use runway::{API_VERSION as RUNWAY_API_VERSION, RunwayVideo, limits as runway_limits};

use crate::VideoInput;
use crate::local::Tools;
use crate::local::pictures::Story;
use crate::provider::{ItemRequest, Provider, Providers};

/// The cloud provider set, writing under `artifacts_root`: Gemini assets, Runway clips,
/// ElevenLabs narration and SFX, and the local composites and assembly (with `tools`).
pub fn providers(
    config: &CloudConfig,
    artifacts_root: impl Into<PathBuf>,
    tools: Tools,
) -> Providers {
    let root: PathBuf = artifacts_root.into();
    let local = crate::local::providers(&root, tools.clone());
    let audio = |sound| -> Arc<dyn Provider> {
        Arc::new(ElevenLabsAudio::new(config, sound, &root, tools.clone()))
    };
    Providers {
        assets: Arc::new(GeminiImages::new(config)),
        composites: local.composites,
        video: Arc::new(RunwayVideo::new(config, &root)),
        narration: audio(Sound::Speech),
        sfx: audio(Sound::Effects),
        assembly: local.assembly,
    }
}

/// The environment variable holding the key a cloud step needs (`None`: the step is
/// made locally, even in the cloud set).
pub fn key_variable(step: &str) -> Option<&'static str> {
    match step {
        "assets" => Some("GEMINI_API_KEY"),
        "video" => Some("RUNWAY_API_KEY"),
        "narration" | "sfx" => Some("ELEVENLABS_API_KEY"),
        _ => None,
    }
}

impl CloudConfig {
    /// Whether the key a cloud `step` needs is set (steps made locally need none).
    pub fn has_key_for(&self, step: &str) -> bool {
        match step {
            "assets" => self.gemini.key.is_some(),
            "video" => self.runway.key.is_some(),
            "narration" | "sfx" => self.elevenlabs.key.is_some(),
            _ => true,
        }
    }
}

/// The story the request's task tells.
fn story(request: &ItemRequest) -> Result<Story, StepError> {
    let input: VideoInput = serde_json::from_value((*request.input).clone())
        .map_err(|e| StepError::permanent(format!("invalid input: {e}")))?;
    Ok(Story {
        topic: input.topic,
        direction: input.story_direction,
    })
}

/// The artifact an item records for `file` in its step's directory.
fn artifact_of(request: &ItemRequest, file: &str) -> String {
    format!(
        "{}/{}/{}/{file}",
        request.channel_id, request.task_id, request.step
    )
}
