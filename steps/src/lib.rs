//! The video pipeline on reel: six steps — assets, composites, video, narration, sfx,
//! assembly — then human review. Each step calls a [`Provider`]; the [`simulated`] set does
//! real work on disk (deterministic artifacts under the channel's directory) with the
//! seed's costs and durations, so the whole pipeline runs anywhere in seconds.

mod artifacts;
mod faults;
mod pipeline;
mod provider;
pub mod simulated;

pub use artifacts::{ArtifactError, artifact_path};
pub use faults::{Fault, FaultParseError};
pub use pipeline::{
    PipelineConfig, STEP_NAMES, STEP_STATUSES, VideoInput, WORKFLOW, simulated_video_workflow,
    video_workflow,
};
pub use provider::{ItemRequest, Provider, Providers, Shape};
