//! Which providers the video pipeline calls: `simulated` (tests, benchmarks), `local`
//! (real media made on this machine) or `cloud` (the Gemini, Runway and ElevenLabs APIs),
//! for the whole pipeline or step by step ([`ProviderPlan`]).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use engine::Workflow;

use crate::cloud::{self, CloudConfig};
use crate::local::{Tools, ToolsMissing};
use crate::pipeline::{PipelineConfig, video_workflow};
use crate::provider::Providers;

/// A set of providers, one per step, chosen by name (`--providers NAME`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProviderSet {
    /// Sleeps the providers' real durations times the time scale and writes small text
    /// artifacts, with the seed's costs.
    #[default]
    Simulated,
    /// Real PNGs, MP4s and speech made on this machine (ffmpeg, espeak-ng), at no cost.
    Local,
    /// The real APIs: Gemini images, Runway clips, ElevenLabs narration and SFX (keys from
    /// the environment, see [`CloudConfig::from_env`]); composites and the assembly made
    /// locally. Costs from [`crate::cloud::Prices`].
    Cloud,
}

impl ProviderSet {
    /// Every set's name.
    pub const NAMES: [&'static str; 3] = ["simulated", "local", "cloud"];

    /// The set's name.
    pub fn name(self) -> &'static str {
        match self {
            ProviderSet::Simulated => "simulated",
            ProviderSet::Local => "local",
            ProviderSet::Cloud => "cloud",
        }
    }

    /// The video workflow on this set, writing under `artifacts_root`; `time_scale`
    /// scales the waits between retries (and the simulated providers' durations). The
    /// cloud set reads nothing from the environment here: use a [`ProviderPlan`] with a
    /// [`CloudConfig`].
    pub fn video_workflow(self, artifacts_root: impl Into<PathBuf>, time_scale: f64) -> Workflow {
        self.video_workflow_with(artifacts_root, time_scale, &BTreeMap::new())
    }

    /// [`ProviderSet::video_workflow`], with the simulated providers' item durations (in
    /// seconds at real speed) replaced for the steps in `simulated_seconds`.
    pub fn video_workflow_with(
        self,
        artifacts_root: impl Into<PathBuf>,
        time_scale: f64,
        simulated_seconds: &BTreeMap<String, f64>,
    ) -> Workflow {
        ProviderPlan::new(self).video_workflow(artifacts_root, time_scale, simulated_seconds)
    }

    /// Whether this machine can run the set: see [`ProviderPlan::check_ready`].
    pub async fn check_ready(self) -> Result<(), NotReady> {
        ProviderPlan::new(self).check_ready().await
    }
}

impl fmt::Display for ProviderSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A provider set name that is not one of [`ProviderSet::NAMES`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown provider set {0:?} (expected one of: simulated, local, cloud)")]
pub struct UnknownProviderSet(pub String);

impl FromStr for ProviderSet {
    type Err = UnknownProviderSet;

    fn from_str(s: &str) -> Result<Self, UnknownProviderSet> {
        match s {
            "simulated" => Ok(ProviderSet::Simulated),
            "local" => Ok(ProviderSet::Local),
            "cloud" => Ok(ProviderSet::Cloud),
            other => Err(UnknownProviderSet(engine::truncate_for_display(other, 40))),
        }
    }
}

/// Which set makes each step's items: one set for the pipeline, with per-step overrides
/// (`reel worker --providers local --provider video=cloud`), and the cloud providers'
/// settings.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProviderPlan {
    /// The set of every step without an override.
    pub set: ProviderSet,
    /// Per-step overrides, by step name.
    pub steps: BTreeMap<String, ProviderSet>,
    /// Keys, URLs and prices for the steps on the cloud set.
    pub cloud: CloudConfig,
    /// How long a job step's job may run (and its polls keep failing) before it counts
    /// as lost, and how long a submit that got no answer keeps its slot, replacing the
    /// providers' own (`reel worker --job-timeout`).
    pub job_timeout: Option<std::time::Duration>,
}

/// A step name that is not one of the video pipeline's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the video pipeline has no step {0:?} (its steps: assets, composites, video, narration, sfx, assembly)"
)]
pub struct UnknownStep(pub String);

/// Why a worker cannot run its providers: it says so before it claims anything, so a
/// missing program or key never fails a task at clip 7.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NotReady {
    #[error(transparent)]
    Tools(#[from] ToolsMissing),
    /// The cloud steps' keys that are not set: (variable, the steps that need it).
    #[error(
        "the cloud providers need {}: set it in the environment (or .env)",
        .0.iter().map(|(var, steps)| format!("{var} (for {})", steps.join(", "))).collect::<Vec<_>>().join(" and ")
    )]
    Keys(Vec<(String, Vec<String>)>),
}

impl ProviderPlan {
    /// Every step on `set`, with the default cloud settings (no keys).
    pub fn new(set: ProviderSet) -> Self {
        ProviderPlan {
            set,
            ..ProviderPlan::default()
        }
    }

    /// The same plan with `step` on `set`.
    pub fn with_step(mut self, step: &str, set: ProviderSet) -> Result<Self, UnknownStep> {
        if !crate::STEP_NAMES.contains(&step) {
            return Err(UnknownStep(engine::truncate_for_display(step, 40)));
        }
        self.steps.insert(step.to_owned(), set);
        Ok(self)
    }

    /// The same plan with these cloud settings.
    pub fn with_cloud(mut self, cloud: CloudConfig) -> Self {
        self.cloud = cloud;
        self
    }

    /// The set that makes `step`'s items.
    pub fn set_for(&self, step: &str) -> ProviderSet {
        self.steps.get(step).copied().unwrap_or(self.set)
    }

    /// Whether any step is on `set`.
    pub fn uses(&self, set: ProviderSet) -> bool {
        crate::STEP_NAMES
            .iter()
            .any(|step| self.set_for(step) == set)
    }

    /// Whether this machine can run the plan: the local and cloud sets need ffmpeg,
    /// ffprobe and espeak-ng (the cloud set composes and assembles locally), and each cloud
    /// step its provider's key.
    pub async fn check_ready(&self) -> Result<(), NotReady> {
        let mut missing: Vec<(String, Vec<String>)> = Vec::new();
        for step in crate::STEP_NAMES {
            if self.set_for(step) != ProviderSet::Cloud || self.cloud.has_key_for(step) {
                continue;
            }
            let Some(var) = cloud::key_variable(step) else {
                continue;
            };
            match missing.iter_mut().find(|(v, _)| v == var) {
                Some((_, steps)) => steps.push(step.to_owned()),
                None => missing.push((var.to_owned(), vec![step.to_owned()])),
            }
        }
        if !missing.is_empty() {
            return Err(NotReady::Keys(missing));
        }
        if self.uses(ProviderSet::Local) || self.uses(ProviderSet::Cloud) {
            Tools::default().check().await?;
        }
        Ok(())
    }

    /// The video workflow on this plan, writing under `artifacts_root`; `time_scale`
    /// scales the waits between retries and polls (and the simulated providers'
    /// durations, replaced for the steps in `simulated_seconds`).
    pub fn video_workflow(
        &self,
        artifacts_root: impl Into<PathBuf>,
        time_scale: f64,
        simulated_seconds: &BTreeMap<String, f64>,
    ) -> Workflow {
        let config = PipelineConfig {
            artifacts_root: artifacts_root.into(),
            time_scale,
            job_timeout: self.job_timeout,
        };
        let root = &config.artifacts_root;
        let make = |set| match set {
            ProviderSet::Simulated => {
                crate::simulated::providers_with(time_scale, simulated_seconds)
            }
            ProviderSet::Local => crate::local::providers(root, Tools::default()),
            ProviderSet::Cloud => cloud::providers(&self.cloud, root, Tools::default()),
        };
        let mut made: BTreeMap<ProviderSet, Providers> = BTreeMap::new();
        let mut pick = |step: &str| {
            let set = self.set_for(step);
            let providers = made.entry(set).or_insert_with(|| make(set));
            match step {
                "assets" => providers.assets.clone(),
                "composites" => providers.composites.clone(),
                "video" => providers.video.clone(),
                "narration" => providers.narration.clone(),
                "sfx" => providers.sfx.clone(),
                _ => providers.assembly.clone(),
            }
        };
        let providers = Providers {
            assets: pick("assets"),
            composites: pick("composites"),
            video: pick("video"),
            narration: pick("narration"),
            sfx: pick("sfx"),
            assembly: pick("assembly"),
        };
        video_workflow(&config, providers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_parse_by_name_and_build_the_same_workflow() {
        for name in ProviderSet::NAMES {
            let set: ProviderSet = name.parse().expect("a known set");
            assert_eq!(set.to_string(), name);
            let workflow = set.video_workflow("artifacts", 0.001);
            let steps: Vec<&str> = workflow.steps().iter().map(|s| s.name()).collect();
            assert_eq!(steps, crate::STEP_NAMES);
        }
        assert!("remote".parse::<ProviderSet>().is_err());
        assert_eq!(ProviderSet::default(), ProviderSet::Simulated);
    }

    #[test]
    fn a_plan_overrides_steps_and_names_the_keys_its_cloud_steps_lack() {
        let plan = ProviderPlan::new(ProviderSet::Simulated)
            .with_step("video", ProviderSet::Cloud)
            .expect("a step");
        assert_eq!(plan.set_for("video"), ProviderSet::Cloud);
        assert_eq!(plan.set_for("assets"), ProviderSet::Simulated);
        assert!(plan.clone().with_step("clips", ProviderSet::Local).is_err());
        let workflow = plan.video_workflow("artifacts", 0.001, &BTreeMap::new());
        let video = &workflow.steps()[2];
        assert_eq!(video.provider_limits().map(|l| &*l.key), Some("runway"));
        assert!(video.is_jobs());
        let ready = futures_now(plan.check_ready());
        assert_eq!(
            ready.expect_err("no key").to_string(),
            "the cloud providers need RUNWAY_API_KEY (for video): set it in the environment (or .env)"
        );
        let cloud = ProviderPlan::new(ProviderSet::Cloud);
        let err = futures_now(cloud.check_ready())
            .expect_err("no keys")
            .to_string();
        assert!(err.contains("GEMINI_API_KEY (for assets)"), "{err}");
        assert!(
            err.contains("ELEVENLABS_API_KEY (for narration, sfx)"),
            "{err}"
        );
        let limits: Vec<String> = cloud
            .video_workflow("artifacts", 1.0, &BTreeMap::new())
            .steps()
            .iter()
            .map(|s| {
                s.provider_limits()
                    .map(|l| l.key.to_string())
                    .unwrap_or_default()
            })
            .collect();
        assert_eq!(
            limits,
            ["gemini", "", "runway", "elevenlabs", "elevenlabs", ""]
        );
    }

    /// Runs a future that finishes without waiting on anything.
    fn futures_now<T>(future: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
            .block_on(future)
    }
}
