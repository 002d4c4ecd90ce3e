//! Providers: the paid, slow services a step calls. Real ones (image, video, TTS, SFX APIs)
//! implement [`Provider`] and plug in without touching the engine.

use std::path::PathBuf;
use std::sync::Arc;

use engine::{
    BoxFuture, ChannelId, ItemOutput, JobStatus, ProviderLimits, StepError, Submission, TaskId,
};
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

/// How a provider makes an item: one call, or a job submitted then polled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// [`Provider::generate`] returns the item.
    Call,
    /// [`Provider::submit`] starts a job, [`Provider::poll`] follows it (slow APIs: the
    /// engine records the submission, never pays for it twice, and parks the task while
    /// it waits).
    Job,
}

/// A provider of one step's items. Classify errors: `StepError::transient` for timeouts,
/// 429 (with `with_retry_after` when the provider says when) and 5xx;
/// `StepError::permanent` for bad input and other 4xx. A call-shaped provider implements
/// `generate`; a job-shaped one returns [`Shape::Job`] and implements `submit` and `poll`.
pub trait Provider: Send + Sync + 'static {
    /// Makes the item in one call (call-shaped providers).
    fn generate(&self, request: ItemRequest) -> BoxFuture<Result<ItemOutput, StepError>> {
        let _ = request;
        Box::pin(async {
            Err(StepError::permanent(
                "this provider submits jobs; it has no one-call generate",
            ))
        })
    }

    /// Whether the provider makes items in one call or as jobs.
    fn shape(&self) -> Shape {
        Shape::Call
    }

    /// The shortest wait between two polls of one job, whatever `--time-scale` makes of
    /// the step's poll backoff: a real API is never polled in a loop (default: none).
    fn min_poll_interval(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }

    /// How long one of its jobs may run, in real time (`--time-scale` does not apply): a
    /// job whose polls fail that long is lost, and a submit that got no answer keeps its
    /// slot that long. `None`: the pipeline's default (15 minutes, scaled).
    fn job_life(&self) -> Option<std::time::Duration> {
        None
    }

    /// The provider account's key and default limits (jobs or calls in flight, requests
    /// per second), enforced across every worker; `None`: unlimited.
    fn limits(&self) -> Option<ProviderLimits> {
        None
    }

    /// Starts the item's job; returns what polling it needs (job-shaped providers).
    fn submit(
        &self,
        request: ItemRequest,
        submission: Submission,
    ) -> BoxFuture<Result<Value, StepError>> {
        let _ = (request, submission);
        Box::pin(async { Err(StepError::permanent("this provider does not submit jobs")) })
    }

    /// Follows a job `submit` returned (job-shaped providers).
    fn poll(&self, request: ItemRequest, job: Value) -> BoxFuture<Result<JobStatus, StepError>> {
        let _ = (request, job);
        Box::pin(async { Err(StepError::permanent("this provider does not submit jobs")) })
    }
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
