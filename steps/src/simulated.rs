//! Simulated providers: real work on disk, the seed's costs and durations, no network.
//!
//! Each item takes its nominal duration times the time scale, then writes a small,
//! deterministic artifact file, and records its size and SHA-256. Injected faults (in the task input) fail on purpose. The
//! video provider is job-shaped like the real video APIs: a submit records a job on disk
//! (so jobs outlive the workers that submitted them, as a provider's do) and returns its
//! id; polls answer "pending" until its duration has passed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use engine::{BoxFuture, ItemOutput, JobStatus, ProviderLimits, StepError, Submission};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::artifacts::Fingerprint;
use crate::provider::{ItemRequest, Provider, Providers, Shape};

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
    /// Call or job.
    pub shape: Shape,
    /// The account's key and default limits (`None`: local work, unlimited).
    pub limits: Option<ProviderLimits>,
}

/// A simulated job, as the simulated provider keeps it: one file per submission, under the
/// item's artifact directory (`.jobs/<id>.json`). Tests count them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SimulatedJob {
    pub id: String,
    pub item: u32,
    pub submission: u32,
    pub idempotency_key: String,
    /// Milliseconds since the Unix epoch.
    pub submitted_at_ms: u64,
    pub duration_ms: u64,
}

impl SimulatedJob {
    /// Every job submitted for items under `dir` (an artifacts root, a task's or a step's
    /// directory), in no particular order.
    pub fn all_under(dir: &Path) -> Vec<SimulatedJob> {
        let mut jobs = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.parent().and_then(Path::file_name) == Some(".jobs".as_ref())
                    && path.extension() == Some("json".as_ref())
                    && let Some(job) = std::fs::read(&path)
                        .ok()
                        .and_then(|b| serde_json::from_slice(&b).ok())
                {
                    jobs.push(job);
                }
            }
        }
        jobs
    }
}

impl Simulated {
    fn duration(&self) -> Duration {
        self.nominal.mul_f64(self.time_scale.max(0.0))
    }

    /// Writes the item's artifact and returns its output, or the injected fault.
    async fn finish(&self, request: &ItemRequest) -> Result<ItemOutput, StepError> {
        if let Some(fault) = crate::faults::injected(request) {
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
        let file = format!("{:02}.{}", request.item, self.extension);
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
        write(&path, content.as_bytes())
            .await
            .map_err(|e| StepError::transient(format!("cannot write {}: {e}", path.display())))?;
        let artifact = format!(
            "{}/{}/{}/{file}",
            request.channel_id, request.task_id, request.step
        );
        let sources = (!request.sources.is_empty())
            .then(|| serde_json::json!({ "sources": request.sources }));
        ItemOutput::new(artifact, self.cost_micros)
            .with_output(Fingerprint::of(content.as_bytes()).add_to(sources))
    }
}

impl Provider for Simulated {
    fn generate(&self, request: ItemRequest) -> BoxFuture<Result<ItemOutput, StepError>> {
        let this = self.clone();
        Box::pin(async move {
            tokio::time::sleep(this.duration()).await;
            this.finish(&request).await
        })
    }

    fn shape(&self) -> Shape {
        self.shape
    }

    fn limits(&self) -> Option<ProviderLimits> {
        self.limits.clone()
    }

    fn submit(
        &self,
        request: ItemRequest,
        submission: Submission,
    ) -> BoxFuture<Result<Value, StepError>> {
        let duration = self.duration();
        Box::pin(async move {
            let job = SimulatedJob {
                id: uuid::Uuid::new_v4().to_string(),
                item: request.item,
                submission: submission.number,
                idempotency_key: submission.idempotency_key,
                submitted_at_ms: now_ms(),
                duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
            };
            let path = job_path(&request.artifact_dir, &job.id);
            let bytes =
                serde_json::to_vec(&job).map_err(|e| StepError::permanent(e.to_string()))?;
            // Write then rename: a job file is whole or absent, whatever kills the worker.
            let partial = path.with_extension("partial");
            write(&partial, &bytes)
                .await
                .and(tokio::fs::rename(&partial, &path).await)
                .map_err(|e| StepError::transient(format!("cannot record the job: {e}")))?;
            Ok(serde_json::json!({ "id": job.id }))
        })
    }

    fn poll(&self, request: ItemRequest, job: Value) -> BoxFuture<Result<JobStatus, StepError>> {
        let this = self.clone();
        Box::pin(async move {
            let id = job
                .get("id")
                .and_then(Value::as_str)
                .and_then(|id| uuid::Uuid::parse_str(id).ok())
                .ok_or_else(|| StepError::permanent(format!("not a simulated job: {job}")))?;
            let path = job_path(&request.artifact_dir, &id.to_string());
            let recorded: SimulatedJob = match tokio::fs::read(&path).await {
                Ok(bytes) => serde_json::from_slice(&bytes)
                    .map_err(|e| StepError::transient(format!("unreadable job {id}: {e}")))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Ok(JobStatus::Failed(StepError::transient(format!(
                        "job {id} is unknown to the provider (lost)"
                    ))));
                }
                Err(e) => return Err(StepError::transient(format!("cannot read job {id}: {e}"))),
            };
            let ready_at = recorded
                .submitted_at_ms
                .saturating_add(recorded.duration_ms);
            let now = now_ms();
            if now < ready_at {
                return Ok(JobStatus::Pending {
                    next_poll: Some(Duration::from_millis(ready_at - now)),
                });
            }
            Ok(match this.finish(&request).await {
                Ok(output) => JobStatus::Done(output),
                Err(error) => JobStatus::Failed(error),
            })
        })
    }
}

fn job_path(artifact_dir: &Path, id: &str) -> PathBuf {
    artifact_dir.join(".jobs").join(format!("{id}.json"))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

async fn write(path: &Path, content: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await?;
    }
    tokio::fs::write(path, content).await
}

/// The seed's numbers: asset ≈ $0.07, clip ≈ $0.55 and ≈ 5 min, narration ≈ $0.03,
/// SFX ≈ $0.014; composites and assembly are local work. Each paid step is its own
/// provider account, keyed by the step's name, with a cap on items in flight across the
/// fleet: 10 image requests, 5 video jobs (a Runway-like tier), 5 narrations and 5 sound
/// effects at once (an ElevenLabs-like plan).
pub fn providers(time_scale: f64) -> Providers {
    providers_with(time_scale, &std::collections::BTreeMap::new())
}

/// [`providers`] with some steps' item durations (seconds at real speed) replaced.
pub fn providers_with(
    time_scale: f64,
    seconds: &std::collections::BTreeMap<String, f64>,
) -> Providers {
    let simulated = |step: &str, extension, cost_micros, secs: u64, shape, cap: Option<u32>| {
        let secs = seconds.get(step).copied().unwrap_or(secs as f64);
        let provider: Arc<dyn Provider> = Arc::new(Simulated {
            extension,
            cost_micros,
            nominal: Duration::from_secs_f64(secs.clamp(0.0, 86_400.0)),
            time_scale,
            shape,
            limits: cap.map(|cap| ProviderLimits::new(step).max_in_flight(cap)),
        });
        provider
    };
    Providers {
        assets: simulated("assets", "png", 70_000, 40, Shape::Call, Some(10)),
        composites: simulated("composites", "png", 0, 60, Shape::Call, None),
        video: simulated("video", "mp4", 550_000, 300, Shape::Job, Some(5)),
        narration: simulated("narration", "mp3", 30_000, 30, Shape::Call, Some(5)),
        sfx: simulated("sfx", "wav", 14_000, 15, Shape::Call, Some(5)),
        assembly: simulated("assembly", "mp4", 0, 120, Shape::Call, None),
    }
}
