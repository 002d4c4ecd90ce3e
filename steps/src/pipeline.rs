//! The video workflow: the steps, their item counts, statuses and retry policies.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use engine::{
    Backoff, BoxFuture, ItemOutput, RetryPolicy, Step, StepContext, StepError, StepWork,
    TaskRetryPolicy, TaskStatus, Workflow,
};
use serde_json::Value;

use crate::artifacts::artifact_path;
use crate::provider::{ItemRequest, Provider, Providers};

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

/// How the pipeline runs.
#[derive(Clone, Debug)]
pub struct PipelineConfig {
    /// Artifacts go under `<root>/<channel>/<task>/<step>/`.
    pub artifacts_root: PathBuf,
    /// Multiplies waits between retries (the simulated providers take their own scale).
    pub time_scale: f64,
}

/// The video pipeline on the simulated providers, both at `time_scale` (what the `reel
/// worker`, the examples and the tests run).
pub fn simulated_video_workflow(artifacts_root: impl Into<PathBuf>, time_scale: f64) -> Workflow {
    video_workflow(
        &PipelineConfig {
            artifacts_root: artifacts_root.into(),
            time_scale,
        },
        crate::simulated::providers(time_scale),
    )
}

/// The video pipeline: 22 assets → composites → 18 clips → 18 narrations → 18 SFX →
/// assembly → final review.
pub fn video_workflow(config: &PipelineConfig, providers: Providers) -> Workflow {
    let scaled = |secs: f64| Duration::from_secs_f64(secs * config.time_scale.max(0.0));
    let item_retry = RetryPolicy {
        max_tries: 2,
        backoff: Backoff {
            initial: scaled(10.0),
            multiplier: 2.0,
            max: scaled(60.0),
            jitter: 0.2,
        },
    };
    let step = |name: &'static str, status, count: u32, provider: Arc<dyn Provider>| {
        let work = ProviderStep {
            count,
            provider,
            root: config.artifacts_root.clone(),
        };
        let step = if count == 1 {
            Step::atomic(name, status, work)
        } else {
            Step::itemized(name, status, work)
        };
        step.retry(item_retry)
    };
    Workflow::new(WORKFLOW)
        .step(step(
            "assets",
            TaskStatus::GeneratingAssets,
            22,
            providers.assets,
        ))
        .step(step(
            "composites",
            TaskStatus::GeneratingComposites,
            1,
            providers.composites,
        ))
        .step(step(
            "video",
            TaskStatus::GeneratingVideo,
            18,
            providers.video,
        ))
        .step(step(
            "narration",
            TaskStatus::GeneratingAudio,
            18,
            providers.narration,
        ))
        .step(step("sfx", TaskStatus::GeneratingSfx, 18, providers.sfx))
        .step(step(
            "assembly",
            TaskStatus::Assembling,
            1,
            providers.assembly,
        ))
        .task_retry(TaskRetryPolicy {
            max_attempts: 5,
            backoff: Backoff {
                initial: scaled(60.0),
                multiplier: 2.0,
                max: scaled(3600.0),
                jitter: 0.2,
            },
        })
}

/// A step that asks its provider for each item.
struct ProviderStep {
    count: u32,
    provider: Arc<dyn Provider>,
    root: PathBuf,
}

impl StepWork for ProviderStep {
    fn plan(&self, _input: &Value) -> Result<u32, StepError> {
        Ok(self.count)
    }

    fn run(&self, ctx: StepContext, item: u32) -> BoxFuture<Result<ItemOutput, StepError>> {
        let dir = artifact_path(&self.root, &ctx.channel_id, ctx.task_id, &ctx.step, "_")
            .map(|p| p.parent().map(PathBuf::from).unwrap_or_default())
            .map_err(|e| StepError::permanent(e.to_string()));
        let dir = match dir {
            Ok(dir) => dir,
            Err(e) => return Box::pin(async move { Err(e) }),
        };
        self.provider.generate(ItemRequest {
            task_id: ctx.task_id,
            channel_id: ctx.channel_id,
            step: ctx.step.to_string(),
            item,
            attempt: ctx.attempt,
            input: ctx.input,
            artifact_dir: dir,
        })
    }
}
