//! The video workflow: the steps, their item counts, statuses and retry policies.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use engine::{
    Backoff, BoxFuture, ItemOutput, JobStatus, JobWork, RetryPolicy, Step, StepContext, StepError,
    StepWork, Submission, TaskRetryPolicy, Workflow,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Fault;
use crate::artifacts::artifact_path;
use crate::provider::{ItemRequest, Provider, Providers, Shape};

/// The workflow's name (the `workflow` of its tasks).
pub const WORKFLOW: &str = "video";

/// The steps, in order.
pub const STEP_NAMES: [&str; 6] = [
    "assets",
    "composites",
    "video",
    "narration",
    "sfx",
    "assembly",
];

/// How many assets a video has (one composite combines them all).
pub const ASSETS: u32 = 22;
/// How many clips a video has (and narrations and SFX, one per clip).
pub const CLIPS: u32 = 18;

/// A video task's input.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VideoInput {
    /// What the video is about.
    pub topic: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub story_direction: Option<String>,
    /// Failures to inject (tests, demos): see [`Fault`].
    #[serde(default)]
    pub faults: Vec<Fault>,
}

/// How the pipeline runs.
#[derive(Clone, Debug)]
pub struct PipelineConfig {
    /// Artifacts go under `<root>/<channel>/<task>/<step>/`.
    pub artifacts_root: PathBuf,
    /// Multiplies waits between retries (the simulated providers take their own scale).
    pub time_scale: f64,
    /// Replaces the job steps' job timeout (see [`ProviderPlan::job_timeout`](crate::ProviderPlan::job_timeout)).
    pub job_timeout: Option<Duration>,
}

/// The video pipeline on the simulated providers, both at `time_scale` (what the `reel
/// worker`, the examples and the tests run).
pub fn simulated_video_workflow(artifacts_root: impl Into<PathBuf>, time_scale: f64) -> Workflow {
    video_workflow(
        &PipelineConfig {
            artifacts_root: artifacts_root.into(),
            time_scale,
            job_timeout: None,
        },
        crate::simulated::providers(time_scale),
    )
}

/// The video workflow's step statuses: (step, storage name, shown as). These are the names
/// the log and the Notion board have always used; they never change.
pub const STEP_STATUSES: [(&str, &str, &str); 6] = [
    ("assets", "generating_assets", "Generating Assets"),
    (
        "composites",
        "generating_composites",
        "Generating Composites",
    ),
    ("video", "generating_video", "Generating Video"),
    ("narration", "generating_audio", "Generating Audio"),
    ("sfx", "generating_sfx", "Generating SFX"),
    ("assembly", "assembling", "Assembling"),
];

/// The video pipeline: 22 assets → composites → 18 clips → 18 narrations → 18 SFX →
/// assembly → final review. Each item builds on what earlier items recorded in the log:
/// the composite on every asset, clip N on the composite, narration and SFX N on clip N,
/// the assembly on every clip, narration and SFX.
pub fn video_workflow(config: &PipelineConfig, providers: Providers) -> Workflow {
    let scaled = |secs: f64| Duration::from_secs_f64(secs * config.time_scale.max(0.0));
    let item_retry = RetryPolicy {
        max_tries: 2,
        backoff: Backoff::exponential(scaled(10.0), scaled(60.0)).with_jitter(0.2),
    };
    let step = |name: &'static str, count: u32, provider: Arc<dyn Provider>| {
        let limits = provider.limits();
        let shape = provider.shape();
        let poll_floor = provider.min_poll_interval();
        // A real API's jobs take their own time, whatever --time-scale says.
        let job_timeout = config
            .job_timeout
            .or(provider.job_life())
            .unwrap_or_else(|| scaled(900.0).max(Duration::from_secs(1)));
        let work = ProviderStep {
            count,
            provider,
            root: config.artifacts_root.clone(),
        };
        let step = match shape {
            // Jobs of one step run side by side; the provider's cap bounds them fleet-wide.
            // A clip whose polls fail for 15 minutes (the provider's own time, or scaled
            // for a simulated one) is lost; a submit that got no answer keeps its slot
            // that long.
            Shape::Job => Step::jobs(name, work)
                .poll_backoff(
                    Backoff::exponential(scaled(5.0).max(poll_floor), scaled(60.0).max(poll_floor))
                        .with_jitter(0.1),
                )
                .job_timeout(job_timeout)
                .min_poll_interval(poll_floor),
            Shape::Call if count == 1 => Step::call_with(name, work),
            Shape::Call => Step::fan_out_with(name, work),
        };
        let step = match limits {
            Some(limits) => step.provider(limits),
            None => step,
        };
        let (_, storage, display) = STEP_STATUSES
            .iter()
            .find(|(step, _, _)| *step == name)
            .copied()
            .unwrap_or((name, name, name));
        step.status(storage, display).retry(item_retry)
    };
    Workflow::new(WORKFLOW)
        .input::<VideoInput>()
        .step(step("assets", ASSETS, providers.assets))
        .step(step("composites", 1, providers.composites))
        .step(step("video", CLIPS, providers.video))
        .step(step("narration", CLIPS, providers.narration))
        .step(step("sfx", CLIPS, providers.sfx))
        .step(step("assembly", 1, providers.assembly))
        .review_gate()
        .task_retry(TaskRetryPolicy {
            max_attempts: 5,
            backoff: Backoff::exponential(scaled(60.0), scaled(3600.0)).with_jitter(0.2),
        })
}

/// The artifacts an item of `step` builds on, read from the log through the context.
fn sources(ctx: &StepContext, item: u32) -> Result<Vec<String>, StepError> {
    let all = |step: &str| -> Vec<String> {
        ctx.outputs
            .records(step)
            .map(|record| record.artifact.clone())
            .collect()
    };
    Ok(match &*ctx.step {
        "composites" => all("assets"),
        "video" => vec![ctx.artifact("composites", 1)?.to_owned()],
        "narration" | "sfx" => vec![ctx.artifact("video", item)?.to_owned()],
        "assembly" => ["video", "narration", "sfx"]
            .into_iter()
            .flat_map(all)
            .collect(),
        _ => Vec::new(),
    })
}

/// A step that asks its provider for each item.
struct ProviderStep {
    count: u32,
    provider: Arc<dyn Provider>,
    root: PathBuf,
}

impl ProviderStep {
    fn request(&self, ctx: &StepContext, item: u32) -> Result<ItemRequest, StepError> {
        artifact_path(&self.root, &ctx.channel_id, ctx.task_id, &ctx.step, "_")
            .map(|p| p.parent().map(PathBuf::from).unwrap_or_default())
            .map_err(|e| StepError::permanent(e.to_string()))
            .and_then(|dir| {
                Ok(ItemRequest {
                    sources: sources(ctx, item)?,
                    task_id: ctx.task_id,
                    channel_id: ctx.channel_id.clone(),
                    step: ctx.step.to_string(),
                    item,
                    attempt: ctx.attempt,
                    input: ctx.input.clone(),
                    artifact_dir: dir,
                })
            })
    }
}

impl StepWork for ProviderStep {
    fn plan(&self, _input: &Value) -> Result<u32, StepError> {
        Ok(self.count)
    }

    fn run(&self, ctx: StepContext, item: u32) -> BoxFuture<Result<ItemOutput, StepError>> {
        match self.request(&ctx, item) {
            Ok(request) => self.provider.generate(request),
            Err(e) => Box::pin(async move { Err(e) }),
        }
    }
}

impl JobWork for ProviderStep {
    fn plan(&self, _input: &Value) -> Result<u32, StepError> {
        Ok(self.count)
    }

    fn submit(
        &self,
        ctx: StepContext,
        item: u32,
        submission: Submission,
    ) -> BoxFuture<Result<Value, StepError>> {
        match self.request(&ctx, item) {
            Ok(request) => self.provider.submit(request, submission),
            Err(e) => Box::pin(async move { Err(e) }),
        }
    }

    fn poll(
        &self,
        ctx: StepContext,
        item: u32,
        job: Value,
    ) -> BoxFuture<Result<JobStatus, StepError>> {
        match self.request(&ctx, item) {
            Ok(request) => self.provider.poll(request, job),
            Err(e) => Box::pin(async move { Err(e) }),
        }
    }
}
