//! Which providers the video pipeline calls: `simulated` (tests, benchmarks) or `local`
//! (real media made on this machine).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use engine::Workflow;

use crate::local::{Tools, ToolsMissing};
use crate::pipeline::{PipelineConfig, video_workflow};

/// A set of providers, one per step, chosen by name (`--providers NAME`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProviderSet {
    /// Sleeps the providers' real durations times the time scale and writes small text
    /// artifacts, with the seed's costs.
    #[default]
    Simulated,
    /// Real PNGs, MP4s and speech made on this machine (ffmpeg, espeak-ng), at no cost.
    Local,
}

impl ProviderSet {
    /// Every set's name.
    pub const NAMES: [&'static str; 2] = ["simulated", "local"];

    /// The set's name.
    pub fn name(self) -> &'static str {
        match self {
            ProviderSet::Simulated => "simulated",
            ProviderSet::Local => "local",
        }
    }

    /// The video workflow on this set, writing under `artifacts_root`; `time_scale`
    /// scales the waits between retries (and the simulated providers' durations).
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
        let config = PipelineConfig {
            artifacts_root: artifacts_root.into(),
            time_scale,
        };
        let providers = match self {
            ProviderSet::Simulated => {
                crate::simulated::providers_with(time_scale, simulated_seconds)
            }
            ProviderSet::Local => crate::local::providers(&config.artifacts_root, Tools::default()),
        };
        video_workflow(&config, providers)
    }

    /// Whether this machine can run the set: the local set needs ffmpeg, ffprobe and
    /// espeak-ng, and says which are missing and how to install them. A worker checks
    /// before it claims anything, so a missing program never fails a task at clip 7.
    pub async fn check_ready(self) -> Result<(), ToolsMissing> {
        match self {
            ProviderSet::Simulated => Ok(()),
            ProviderSet::Local => Tools::default().check().await,
        }
    }
}

impl fmt::Display for ProviderSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A provider set name that is not one of [`ProviderSet::NAMES`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown provider set {0:?} (expected one of: simulated, local)")]
pub struct UnknownProviderSet(pub String);

impl FromStr for ProviderSet {
    type Err = UnknownProviderSet;

    fn from_str(s: &str) -> Result<Self, UnknownProviderSet> {
        match s {
            "simulated" => Ok(ProviderSet::Simulated),
            "local" => Ok(ProviderSet::Local),
            other => Err(UnknownProviderSet(engine::truncate_for_display(other, 40))),
        }
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
        assert!("cloud".parse::<ProviderSet>().is_err());
        assert_eq!(ProviderSet::default(), ProviderSet::Simulated);
    }
}
