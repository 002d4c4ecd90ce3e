//! The video pipeline on reel: six steps — assets, composites, video, narration, sfx,
//! assembly — then human review. Each step calls a [`Provider`]; the [`simulated`] set does
//! real work on disk (deterministic artifacts under the channel's directory) with the
//! seed's costs and durations, so the whole pipeline runs anywhere in seconds; the
//! [`local`] set makes real media (PNGs, H.264 MP4s, speech) on this machine; the [`cloud`]
//! set calls the Gemini, Runway and ElevenLabs APIs. Choose one with [`ProviderSet`], or
//! one per step with [`ProviderPlan`].

mod artifacts;
pub mod cloud;
mod faults;
pub mod local;
mod pipeline;
mod provider;
mod provider_set;
pub mod simulated;

pub use artifacts::{
    ArtifactCheck, ArtifactError, Fingerprint, artifact_path, check_artifact, resolve_artifact,
};
pub use faults::{Fault, FaultParseError};
pub use pipeline::{
    ASSETS, CLIPS, PipelineConfig, STEP_NAMES, STEP_STATUSES, VideoInput, WORKFLOW,
    simulated_video_workflow, video_workflow,
};
pub use provider::{ItemRequest, Provider, Providers, Shape};
pub use provider_set::{NotReady, ProviderPlan, ProviderSet, UnknownProviderSet, UnknownStep};
