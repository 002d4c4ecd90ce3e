//! Providers: the paid, slow services a step calls. Real ones (image, video, TTS, SFX APIs)
//! implement [`Provider`] and plug in without touching the engine.

use std::path::PathBuf;
use std::sync::Arc;

use engine::{BoxFuture, ChannelId, ItemOutput, StepError, TaskId};
use serde_json::Value;

/// What a provider is asked to make: one item of one step of one task.
#[derive(Clone, Debug)]
pub struct ItemRequest {
    pub task_id: TaskId,
    pub channel_id: ChannelId,
    pub step: String,
    /// 1-based ("clip 7").
    pub item: u32,
    /// The task attempt (1 = first run).
    pub attempt: u32,
    /// The task's input (topic, story direction, ...).
    pub input: Arc<Value>,
    /// Where this item's artifact must be written (already checked to stay in its channel).
    pub artifact_dir: PathBuf,
    /// The artifacts of earlier items this one builds on, as the log recorded them (the
    /// assets for the composite, the composite for a clip, clip N for its narration and
    /// SFX, every clip, narration and SFX for the assembly).
    pub sources: Vec<String>,
}

/// A provider of one step's items. Classify errors: `StepError::transient` for timeouts,
/// 429 and 5xx; `StepError::permanent` for bad input and other 4xx.
pub trait Provider: Send + Sync + 'static {
    fn generate(&self, request: ItemRequest) -> BoxFuture<Result<ItemOutput, StepError>>;
}

/// One provider per step of the video pipeline.
#[derive(Clone)]
pub struct Providers {
    pub assets: Arc<dyn Provider>,
    pub composites: Arc<dyn Provider>,
    pub video: Arc<dyn Provider>,
    pub narration: Arc<dyn Provider>,
    pub sfx: Arc<dyn Provider>,
    pub assembly: Arc<dyn Provider>,
}

impl std::fmt::Debug for Providers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Providers").finish_non_exhaustive()
    }
}
