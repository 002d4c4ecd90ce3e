//! Clips made by Runway's task API, as provider jobs: `POST /v1/image_to_video` with the
//! composite as a data URI starts a task; `GET /v1/tasks/{id}` follows it until
//! `SUCCEEDED`, then the clip is downloaded from the task's output URL (which expires, so
//! at once). The engine records the task id as soon as Runway accepts it, so no clip is
//! paid for twice, whatever happens to the worker.

use std::path::PathBuf;

use base64::Engine as _;
use engine::{BoxFuture, ItemOutput, JobStatus, ProviderLimits, StepError, Submission};
use serde_json::{Value, json};

use super::config::CloudConfig;
use super::http::{Api, write_whole};
use super::{artifact_of, story};
use crate::artifacts::{Fingerprint, resolve_artifact};
use crate::provider::{ItemRequest, Provider, Shape};

/// The API version every request names (`X-Runway-Version`).
pub const API_VERSION: &str = "2024-11-06";

/// The largest data URI Runway takes as `promptImage`.
const DATA_URI_MAX_BYTES: usize = 5 * 1024 * 1024;

/// The video provider key, and its default limits: 5 tasks at once, the concurrency per
/// model of Runway's usage tier 3 (tier 1 allows 1 to 2, tier 5 20: docs.dev.runwayml.com/
/// usage/tiers). Runway has no per-second request limit. Change it with
/// `--max-in-flight runway=N`.
pub fn limits() -> ProviderLimits {
    ProviderLimits::new("runway").max_in_flight(5)
}

/// Animates the composite into one clip per item with a Runway image-to-video model.
#[derive(Clone, Debug)]
pub struct RunwayVideo {
    api: Api,
    model: String,
    seconds: u32,
    price_per_second: i64,
    root: PathBuf,
}

impl RunwayVideo {
    /// The provider for `config`'s Runway account, reading composites under `root`.
    pub fn new(config: &CloudConfig, root: impl Into<PathBuf>) -> Self {
        RunwayVideo {
            api: Api::new("runway", "RUNWAY_API_KEY", &config.runway, config.timeout),
            model: config.runway_model.clone(),
            seconds: config.clip_seconds.clamp(2, 10),
            price_per_second: config.prices.runway_second,
            root: root.into(),
        }
    }

    async fn start(&self, request: ItemRequest) -> Result<Value, StepError> {
        let key = self.api.key()?;
        let [composite] = request.sources.as_slice() else {
            return Err(StepError::permanent(format!(
                "runway: clip {} needs one composite, got {}",
                request.item,
                request.sources.len()
            )));
        };
        let path = resolve_artifact(&self.root, composite)
            .map_err(|e| StepError::permanent(format!("runway: composite: {e}")))?;
        let png = tokio::fs::read(&path).await.map_err(|e| {
            StepError::permanent(format!("runway: cannot read {}: {e}", path.display()))
        })?;
        let image = format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(&png)
        );
        if image.len() > DATA_URI_MAX_BYTES {
            return Err(StepError::permanent(format!(
                "runway: the composite is {} bytes as a data URI; Runway takes at most {DATA_URI_MAX_BYTES}",
                image.len()
            )));
        }
        let story = story(&request)?;
        let prompt: String = format!(
            "Slow cinematic camera move across the scene, part {} of {} of a film about {}.",
            request.item,
            crate::CLIPS,
            story.topic
        )
        .chars()
        .take(1000)
        .collect();
        let body = json!({
            "model": self.model,
            "promptImage": image,
            "promptText": prompt,
            "ratio": "1280:720",
            "duration": self.seconds,
            "seed": request.item,
        });
        let call = self
            .api
            .post(&self.api.url("/v1/image_to_video"))
            .bearer_auth(key.expose())
            .header("X-Runway-Version", API_VERSION)
            .json(&body);
        let answer = self.api.json(self.api.send(call).await?).await?;
        // Runway answered success: a task may exist that this answer does not name.
        let id = task_id(&answer["id"]).ok_or_else(|| {
            StepError::transient(format!("runway: the answer names no task: {answer}")).unanswered()
        })?;
        Ok(json!({ "id": id }))
    }

    async fn follow(&self, request: ItemRequest, job: Value) -> Result<JobStatus, StepError> {
        let key = self.api.key()?;
        let id = task_id(&job["id"])
            .ok_or_else(|| StepError::permanent(format!("runway: not a Runway task: {job}")))?;
        let call = self
            .api
            .get(&self.api.url(&format!("/v1/tasks/{id}")))
            .bearer_auth(key.expose())
            .header("X-Runway-Version", API_VERSION);
        let response = self.api.answer(call).await?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            // Deleted, or never known: the item is submitted anew.
            return Ok(JobStatus::Failed(StepError::transient(format!(
                "runway: task {id} is gone (404)"
            ))));
        }
        let task = self.api.json(self.api.check(response).await?).await?;
        match task["status"].as_str().unwrap_or_default() {
            // THROTTLED: over the account's concurrency, queued by Runway; still ours.
            "PENDING" | "RUNNING" | "THROTTLED" => Ok(JobStatus::Pending { next_poll: None }),
            "SUCCEEDED" => self
                .download(&request, &id, &task)
                .await
                .map(JobStatus::Done),
            "FAILED" => Ok(JobStatus::Failed(failure(&id, &task))),
            "CANCELLED" => Ok(JobStatus::Failed(StepError::transient(format!(
                "runway: task {id} was cancelled"
            )))),
            other => Err(StepError::transient(format!(
                "runway: task {id} has an unknown status {:?}",
                engine::truncate_for_display(other, 40)
            ))),
        }
    }

    /// Fetches the finished clip. The output URL is signed: no key is sent with it.
    async fn download(
        &self,
        request: &ItemRequest,
        id: &str,
        task: &Value,
    ) -> Result<ItemOutput, StepError> {
        let url = task["output"][0]
            .as_str()
            .filter(|u| u.starts_with("https://") || u.starts_with("http://"))
            .ok_or_else(|| {
                StepError::transient(format!("runway: task {id} succeeded without an output URL"))
            })?;
        let clip = self
            .api
            .body(self.api.send(self.api.get(url)).await?)
            .await?;
        if clip.is_empty() {
            return Err(StepError::transient(format!(
                "runway: task {id}'s clip is empty"
            )));
        }
        let file = format!("{:02}.mp4", request.item);
        write_whole(&request.artifact_dir.join(&file), &clip).await?;
        let details = json!({
            "runway_task": id,
            "model": self.model,
            "requested_secs": self.seconds,
            "sources": request.sources,
        });
        let cost = self.price_per_second * i64::from(self.seconds);
        ItemOutput::new(artifact_of(request, &file), cost)
            .with_output(Fingerprint::of(&clip).add_to(Some(details)))
    }
}

/// A failed task: refused content (`SAFETY.*`, on the input or the output) is permanent —
/// Runway says not to retry it; anything else (`INTERNAL.BAD_OUTPUT.*`, an internal
/// error) is worth a new task.
fn failure(id: &str, task: &Value) -> StepError {
    let code = task["failureCode"].as_str().unwrap_or("no failure code");
    let reason = task["failure"].as_str().unwrap_or("no reason given");
    let message = format!("runway: task {id} failed: {reason} ({code})");
    if code.split('.').any(|part| part == "SAFETY") {
        StepError::permanent(message)
    } else {
        StepError::transient(message)
    }
}

/// A task id as Runway gives it (a UUID), safe to put in a path.
fn task_id(value: &Value) -> Option<String> {
    let id = value.as_str()?.trim();
    let plain = (1..=100).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    plain.then(|| id.to_owned())
}

impl Provider for RunwayVideo {
    fn shape(&self) -> Shape {
        Shape::Job
    }

    fn limits(&self) -> Option<ProviderLimits> {
        Some(limits())
    }

    /// A clip takes a minute or more: polling a task more than once a second finds
    /// nothing sooner (and `--time-scale 0` must not poll Runway in a loop).
    fn min_poll_interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs(1)
    }

    /// A 10-second clip takes Runway a few minutes; one whose polls fail for 15 minutes
    /// is lost, and a submit whose answer was lost keeps its slot that long.
    fn job_life(&self) -> Option<std::time::Duration> {
        Some(std::time::Duration::from_secs(900))
    }

    fn submit(
        &self,
        request: ItemRequest,
        _submission: Submission,
    ) -> BoxFuture<Result<Value, StepError>> {
        // Runway's API takes no idempotency key; the engine's record of the task id is
        // what keeps a clip from being paid for twice.
        let this = self.clone();
        Box::pin(async move { this.start(request).await })
    }

    fn poll(&self, request: ItemRequest, job: Value) -> BoxFuture<Result<JobStatus, StepError>> {
        let this = self.clone();
        Box::pin(async move { this.follow(request, job).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safety_failures_are_permanent_and_others_transient() {
        let task = |code: &str| json!({"status": "FAILED", "failure": "nope", "failureCode": code});
        for code in [
            "SAFETY.INPUT.TEXT",
            "SAFETY.OUTPUT.VIDEO",
            "INPUT_PREPROCESSING.SAFETY.TEXT",
        ] {
            assert_eq!(
                failure("t", &task(code)).kind,
                engine::FailureKind::Permanent,
                "{code}"
            );
        }
        for code in ["INTERNAL.BAD_OUTPUT.CODE01", "INTERNAL"] {
            assert_eq!(
                failure("t", &task(code)).kind,
                engine::FailureKind::Transient,
                "{code}"
            );
        }
        assert_eq!(task_id(&json!("../x")), None);
        assert_eq!(
            task_id(&json!("17f20503-6c24-4c16-946b-35dbbce2af2f")).as_deref(),
            Some("17f20503-6c24-4c16-946b-35dbbce2af2f")
        );
    }
}
