//! Simulated providers: real work on disk, the seed's costs and durations, no network.
//!
//! Each item sleeps its nominal duration times the time scale, then writes a small,
//! deterministic artifact file, and records its size and SHA-256. Injected faults (in the
//! task input) fail on purpose.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use engine::{BoxFuture, ItemOutput, StepError};

use crate::artifacts::Fingerprint;
use crate::provider::{ItemRequest, Provider, Providers};

/// A simulated provider for one step.
#[derive(Clone, Debug)]
pub struct Simulated {
    /// The artifact file's extension.
    pub extension: &'static str,
    pub cost_micros: i64,
    /// How long the real provider takes per item.
    pub nominal: Duration,
    /// Multiplies `nominal` (0.001: a 5-minute clip takes 0.3 s).
    pub time_scale: f64,
}

impl Provider for Simulated {
    fn generate(&self, request: ItemRequest) -> BoxFuture<Result<ItemOutput, StepError>> {
        let this = self.clone();
        Box::pin(async move {
            tokio::time::sleep(this.nominal.mul_f64(this.time_scale.max(0.0))).await;
            if let Some(fault) = crate::faults::injected(&request) {
                let message = format!(
                    "simulated provider failure at {} {}",
                    request.step, request.item
                );
                return Err(if fault.permanent {
                    StepError::permanent(format!("{message} (permanent)"))
                } else {
                    StepError::transient(format!("{message} (timeout)"))
                });
            }
            let file = format!("{:02}.{}", request.item, this.extension);
            let path = request.artifact_dir.join(&file);
            let mut content = format!(
                "reel simulated {} {} for task {} (topic: {})\n",
                request.step,
                request.item,
                request.task_id,
                request.input["topic"].as_str().unwrap_or("")
            );
            for source in &request.sources {
                content.push_str(&format!("from {source}\n"));
            }
            write(&path, content.as_bytes()).await.map_err(|e| {
                StepError::transient(format!("cannot write {}: {e}", path.display()))
            })?;
            let artifact = format!(
                "{}/{}/{}/{file}",
                request.channel_id, request.task_id, request.step
            );
            let sources = (!request.sources.is_empty())
                .then(|| serde_json::json!({ "sources": request.sources }));
            ItemOutput::new(artifact, this.cost_micros)
                .with_output(Fingerprint::of(content.as_bytes()).add_to(sources))
        })
    }
}

async fn write(path: &PathBuf, content: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await?;
    }
    tokio::fs::write(path, content).await
}

/// The seed's numbers: asset ≈ $0.07, clip ≈ $0.55 and ≈ 5 min, narration ≈ $0.03,
/// SFX ≈ $0.014; composites and assembly are local work.
pub fn providers(time_scale: f64) -> Providers {
    let simulated = |extension, cost_micros, secs| -> Arc<dyn Provider> {
        Arc::new(Simulated {
            extension,
            cost_micros,
            nominal: Duration::from_secs(secs),
            time_scale,
        })
    };
    Providers {
        assets: simulated("png", 70_000, 40),
        composites: simulated("png", 0, 60),
        video: simulated("mp4", 550_000, 300),
        narration: simulated("mp3", 30_000, 30),
        sfx: simulated("wav", 14_000, 15),
        assembly: simulated("mp4", 0, 120),
    }
}
