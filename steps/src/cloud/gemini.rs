//! Assets drawn by the Gemini API: `POST /v1beta/models/{model}:generateContent` with the
//! image response modality; the image comes back inline, as base64 PNG.

use base64::Engine as _;
use engine::{BoxFuture, ItemOutput, ProviderLimits, StepError};
use serde_json::{Value, json};

use super::config::CloudConfig;
use super::http::{Api, write_whole};
use super::{artifact_of, story};
use crate::artifacts::Fingerprint;
use crate::provider::{ItemRequest, Provider};

/// The assets' provider key, and its default limits. Google publishes the Gemini API's
/// limits per project and model in AI Studio rather than as one table (ai.google.dev/
/// gemini-api/docs/rate-limits); 10 images at once and 1 request per second (60 RPM)
/// stay inside the paid Tier 1 limits of the image models. Raise them with
/// `--max-in-flight gemini=N --rate gemini=R`.
pub fn limits() -> ProviderLimits {
    ProviderLimits::new("gemini").max_in_flight(10).rate(1.0)
}

/// Draws one asset per item with a Gemini image model.
#[derive(Clone, Debug)]
pub struct GeminiImages {
    api: Api,
    model: String,
    price: i64,
}

impl GeminiImages {
    /// The provider for `config`'s Gemini account and model.
    pub fn new(config: &CloudConfig) -> Self {
        GeminiImages {
            api: Api::new("gemini", "GEMINI_API_KEY", &config.gemini, config.timeout),
            model: config.gemini_model.clone(),
            price: config.prices.gemini_image,
        }
    }

    async fn draw(&self, request: ItemRequest) -> Result<ItemOutput, StepError> {
        let key = self.api.key()?;
        if !self
            .model
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
        {
            return Err(StepError::permanent(format!(
                "gemini: bad model name {:?}",
                self.model
            )));
        }
        let story = story(&request)?;
        let prompt = format!(
            "A cinematic 16:9 illustration for a documentary video about {}{}. \
             Image {} of {}: one distinct scene. No text or lettering.",
            story.topic,
            story
                .direction
                .as_deref()
                .map(|d| format!(", told in a {d} style"))
                .unwrap_or_default(),
            request.item,
            crate::ASSETS
        );
        let body = json!({
            "contents": [{"parts": [{"text": prompt}]}],
            "generationConfig": {
                "responseModalities": ["IMAGE"],
                "imageConfig": {"aspectRatio": "16:9"}
            }
        });
        let url = self
            .api
            .url(&format!("/v1beta/models/{}:generateContent", self.model));
        let call = self
            .api
            .post(&url)
            .header("x-goog-api-key", key.expose())
            .json(&body);
        let answer = self.api.json(self.api.send(call).await?).await?;
        let png = self.image_in(&answer, request.item)?;
        let file = format!("{:02}.png", request.item);
        write_whole(&request.artifact_dir.join(&file), &png).await?;
        let details = json!({
            "model": answer["modelVersion"].as_str().unwrap_or(&self.model),
            "prompt": prompt,
        });
        ItemOutput::new(artifact_of(&request, &file), self.price)
            .with_output(Fingerprint::of(&png).add_to(Some(details)))
    }

    /// The PNG in the answer. A blocked prompt answers 200 without one (the finish or
    /// block reason says why): retrying the same prompt cannot help.
    fn image_in(&self, answer: &Value, item: u32) -> Result<Vec<u8>, StepError> {
        let candidate = &answer["candidates"][0];
        let parts = candidate["content"]["parts"].as_array();
        let inline = parts.into_iter().flatten().find_map(|part| {
            let data = part.get("inlineData").or_else(|| part.get("inline_data"))?;
            let mime = data
                .get("mimeType")
                .or_else(|| data.get("mime_type"))
                .and_then(Value::as_str)
                .unwrap_or_default();
            Some((mime.to_owned(), data["data"].as_str()?.to_owned()))
        });
        let Some((mime, data)) = inline else {
            let reason = candidate["finishReason"]
                .as_str()
                .or_else(|| answer["promptFeedback"]["blockReason"].as_str())
                .unwrap_or("no reason given");
            return Err(StepError::permanent(format!(
                "gemini: no image for asset {item} ({reason})"
            )));
        };
        if mime != "image/png" {
            return Err(StepError::permanent(format!(
                "gemini: asset {item} came as {mime}, not image/png"
            )));
        }
        let png = base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map_err(|e| {
                StepError::transient(format!("gemini: asset {item} is not base64: {e}"))
            })?;
        if !png.starts_with(b"\x89PNG\r\n\x1a\n") {
            return Err(StepError::transient(format!(
                "gemini: asset {item} is not a PNG"
            )));
        }
        Ok(png)
    }
}

impl Provider for GeminiImages {
    fn generate(&self, request: ItemRequest) -> BoxFuture<Result<ItemOutput, StepError>> {
        let this = self.clone();
        Box::pin(async move { this.draw(request).await })
    }

    fn limits(&self) -> Option<ProviderLimits> {
        Some(limits())
    }
}
