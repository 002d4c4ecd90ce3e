//! Talking to a provider's API: one client per account, and every failure classified the
//! same way — 429 (with the provider's wait), 408, 5xx and timeouts are transient; other
//! 4xx are permanent, with the provider's own message, truncated and scrubbed of the key.

use std::path::Path;
use std::time::Duration;

use engine::StepError;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{RequestBuilder, Response, StatusCode};
use serde_json::Value;

use super::config::{Account, ApiKey};

/// How much of a provider's error message is kept.
const MESSAGE_MAX_CHARS: usize = 300;
/// The longest wait a provider can ask for (a longer one is taken as this).
const RETRY_AFTER_MAX: Duration = Duration::from_secs(3600);

/// One provider account's API.
#[derive(Clone, Debug)]
pub(crate) struct Api {
    /// The provider's name in messages and errors (`gemini`, `runway`, `elevenlabs`).
    pub(crate) provider: &'static str,
    /// The variable the key comes from, named when it is missing or refused.
    key_var: &'static str,
    account: Account,
    client: reqwest::Client,
    timeout: Duration,
}

impl Api {
    pub(crate) fn new(
        provider: &'static str,
        key_var: &'static str,
        account: &Account,
        timeout: Duration,
    ) -> Self {
        // A client without a global timeout: each request sets its own.
        let client = reqwest::Client::builder()
            .connect_timeout(timeout.min(Duration::from_secs(30)))
            .build()
            .unwrap_or_default();
        Api {
            provider,
            key_var,
            account: account.clone(),
            client,
            timeout,
        }
    }

    /// The account's key; without one, every item fails permanently (a worker checks for
    /// the keys it needs before it starts, so this is a library user's mistake).
    pub(crate) fn key(&self) -> Result<&ApiKey, StepError> {
        self.account.key.as_ref().ok_or_else(|| {
            StepError::permanent(format!(
                "{}: no API key ({} is not set)",
                self.provider, self.key_var
            ))
        })
    }

    /// `path` (starting with `/`) under the account's base URL.
    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.account.base_url)
    }

    pub(crate) fn get(&self, url: &str) -> RequestBuilder {
        self.client.get(url).timeout(self.timeout)
    }

    pub(crate) fn post(&self, url: &str) -> RequestBuilder {
        self.client.post(url).timeout(self.timeout)
    }

    /// Sends `request`; a response that is not a success becomes the classified error.
    pub(crate) async fn send(&self, request: RequestBuilder) -> Result<Response, StepError> {
        let response = self.answer(request).await?;
        self.check(response).await
    }

    /// Sends `request`; only a request that got no answer is an error.
    pub(crate) async fn answer(&self, request: RequestBuilder) -> Result<Response, StepError> {
        request.send().await.map_err(|e| self.unsent(&e))
    }

    /// `response` when it is a success, else the classified error.
    pub(crate) async fn check(&self, response: Response) -> Result<Response, StepError> {
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let headers = response.headers().clone();
        let body = response.text().await.unwrap_or_default();
        Err(self.refused(status, &headers, &body))
    }

    /// The body of a successful response.
    pub(crate) async fn body(&self, response: Response) -> Result<Vec<u8>, StepError> {
        response
            .bytes()
            .await
            .map(|b| b.to_vec())
            .map_err(|e| self.unsent(&e))
    }

    /// The JSON body of a successful response.
    pub(crate) async fn json(&self, response: Response) -> Result<Value, StepError> {
        let bytes = self.body(response).await?;
        // A success the provider sent, unreadable: it acted on the request.
        serde_json::from_slice(&bytes).map_err(|e| {
            StepError::transient(format!("{}: unreadable answer: {e}", self.provider)).unanswered()
        })
    }

    /// A request that got no answer: always worth another try. Unless it never left
    /// (it could not connect, or could not be built), the provider may have acted on it:
    /// the error says so ([`StepError::unanswered`]).
    fn unsent(&self, error: &reqwest::Error) -> StepError {
        let what = if error.is_timeout() {
            format!(
                "no answer within {} s (timeout)",
                self.timeout.as_secs_f64()
            )
        } else if error.is_connect() {
            "cannot connect".to_owned()
        } else {
            "the request failed".to_owned()
        };
        // Without the URL: it is long, and says nothing the step does not.
        let detail = self.scrub(&error_chain(error));
        let failed = StepError::transient(format!("{}: {what}: {detail}", self.provider));
        if error.is_connect() || error.is_builder() {
            failed
        } else {
            failed.unanswered()
        }
    }

    /// The error a refused request is: the status classified, the provider's message kept.
    pub(crate) fn refused(&self, status: StatusCode, headers: &HeaderMap, body: &str) -> StepError {
        let parsed: Option<Value> = serde_json::from_str(body).ok();
        let message = parsed
            .as_ref()
            .and_then(provider_message)
            .unwrap_or_else(|| body.trim().to_owned());
        let message = engine::truncate_for_display(&self.scrub(&message), MESSAGE_MAX_CHARS);
        let (provider, code) = (self.provider, status.as_u16());
        match status {
            StatusCode::TOO_MANY_REQUESTS => {
                let error =
                    StepError::transient(format!("{provider}: rate limited ({code}): {message}"));
                let wait = retry_after(headers).or_else(|| parsed.as_ref().and_then(retry_delay));
                match wait {
                    Some(wait) => error.with_retry_after(wait.min(RETRY_AFTER_MAX)),
                    None => error,
                }
            }
            StatusCode::REQUEST_TIMEOUT => {
                StepError::transient(format!("{provider}: timed out ({code}): {message}"))
            }
            // 503 means "not now" (nothing was done); any other 5xx may come from a
            // gateway after the provider acted on the request.
            StatusCode::SERVICE_UNAVAILABLE => StepError::transient(format!(
                "{provider}: server error ({code}), worth another try: {message}"
            )),
            s if s.is_server_error() => StepError::transient(format!(
                "{provider}: server error ({code}), worth another try: {message}"
            ))
            .unanswered(),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => StepError::permanent(format!(
                "{provider}: the key was refused ({code}; check {}): {message}",
                self.key_var
            )),
            _ if parsed.as_ref().is_some_and(names_a_bad_key) => StepError::permanent(format!(
                "{provider}: the key was refused ({code}; check {}): {message}",
                self.key_var
            )),
            _ => StepError::permanent(format!(
                "{provider}: refused the request ({code}): {message}"
            )),
        }
    }

    /// `text` without the key in it (providers quote a wrong key back).
    pub(crate) fn scrub(&self, text: &str) -> String {
        match self.account.key.as_ref().map(ApiKey::expose) {
            Some(key) if key.len() >= 4 => text.replace(key, "[redacted]"),
            _ => text.to_owned(),
        }
    }
}

/// The error and its sources on one line, without a URL.
fn error_chain(error: &reqwest::Error) -> String {
    let mut line = String::new();
    let mut source: Option<&dyn std::error::Error> = Some(error);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
        source = cause.source();
    }
    if let Some(url) = error.url() {
        line = line
            .replace(&format!(" ({url})"), "")
            .replace(url.as_str(), "");
    }
    engine::truncate_for_display(&line, MESSAGE_MAX_CHARS)
}

/// The human-readable message in a provider's error body: Gemini's `error.message`,
/// Runway's `error`, ElevenLabs' `detail.message` (or its 422 list of `loc`/`msg`).
fn provider_message(body: &Value) -> Option<String> {
    let text = |v: &Value| v.as_str().map(str::to_owned);
    if let Some(error) = body.get("error") {
        return text(error).or_else(|| error.get("message").and_then(text));
    }
    match body.get("detail")? {
        Value::String(detail) => Some(detail.clone()),
        Value::Array(problems) => Some(
            problems
                .iter()
                .map(|p| {
                    let loc = p["loc"]
                        .as_array()
                        .map(|l| {
                            l.iter()
                                .map(|part| part.to_string().trim_matches('"').to_owned())
                                .collect::<Vec<_>>()
                                .join(".")
                        })
                        .unwrap_or_default();
                    format!("{loc}: {}", p["msg"].as_str().unwrap_or("invalid"))
                })
                .collect::<Vec<_>>()
                .join("; "),
        ),
        detail => detail
            .get("message")
            .and_then(text)
            .or_else(|| Some(detail.to_string())),
    }
}

/// Gemini answers a wrong key with 400 `INVALID_ARGUMENT` and `ErrorInfo.reason =
/// API_KEY_INVALID`.
fn names_a_bad_key(body: &Value) -> bool {
    body["error"]["details"]
        .as_array()
        .is_some_and(|details| details.iter().any(|d| d["reason"] == "API_KEY_INVALID"))
}

/// A `Retry-After` header in seconds (the form these providers send).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let secs: f64 = value.parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(1e6)))
}

/// Gemini's wait: `error.details[]` of type `google.rpc.RetryInfo`, `retryDelay` such as
/// `"17s"` or `"0.5s"` (a protobuf Duration in JSON).
fn retry_delay(body: &Value) -> Option<Duration> {
    body["error"]["details"].as_array()?.iter().find_map(|d| {
        let is_retry_info = d["@type"]
            .as_str()
            .is_some_and(|t| t.ends_with("RetryInfo"));
        let delay = d["retryDelay"].as_str()?.trim().strip_suffix('s')?;
        let secs: f64 = delay.parse().ok()?;
        (is_retry_info && secs.is_finite() && secs >= 0.0)
            .then(|| Duration::from_secs_f64(secs.min(1e6)))
    })
}

/// Writes `bytes` to `path` whole: a temporary file, renamed.
pub(crate) async fn write_whole(path: &Path, bytes: &[u8]) -> Result<(), StepError> {
    let cannot =
        |e: std::io::Error| StepError::transient(format!("cannot write {}: {e}", path.display()));
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await.map_err(cannot)?;
    }
    let partial = path.with_extension("partial");
    tokio::fs::write(&partial, bytes).await.map_err(cannot)?;
    tokio::fs::rename(&partial, path).await.map_err(cannot)
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn api() -> Api {
        let account = Account {
            key: Some(ApiKey::new("sekret-key-123")),
            base_url: "http://127.0.0.1:9".into(),
        };
        Api::new("gemini", "GEMINI_API_KEY", &account, Duration::from_secs(1))
    }

    #[test]
    fn waits_come_from_retry_after_or_gemini_retry_info() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("3"));
        let error = api().refused(StatusCode::TOO_MANY_REQUESTS, &headers, "{}");
        assert_eq!(error.retry_after, Some(Duration::from_secs(3)));
        let body = r#"{"error":{"code":429,"message":"Resource exhausted","status":"RESOURCE_EXHAUSTED",
            "details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"1.5s"}]}}"#;
        let error = api().refused(StatusCode::TOO_MANY_REQUESTS, &HeaderMap::new(), body);
        assert_eq!(error.kind, engine::FailureKind::Transient);
        assert_eq!(error.retry_after, Some(Duration::from_millis(1500)));
        assert!(
            error.message.contains("Resource exhausted"),
            "{}",
            error.message
        );
    }

    #[test]
    fn messages_are_the_providers_scrubbed_and_truncated() {
        let body = format!(
            r#"{{"detail":{{"status":"invalid_api_key","message":"Invalid key sekret-key-123 {}"}}}}"#,
            "x".repeat(1000)
        );
        let error = api().refused(StatusCode::UNAUTHORIZED, &HeaderMap::new(), &body);
        assert_eq!(error.kind, engine::FailureKind::Permanent);
        assert!(
            !error.message.contains("sekret-key-123"),
            "{}",
            error.message
        );
        assert!(error.message.contains("[redacted]"));
        assert!(error.message.contains("GEMINI_API_KEY"));
        assert!(error.message.chars().count() < 400);
        let body =
            r#"{"detail":[{"loc":["body","text"],"msg":"field required","type":"missing"}]}"#;
        let error = api().refused(StatusCode::UNPROCESSABLE_ENTITY, &HeaderMap::new(), body);
        assert!(
            error.message.contains("body.text: field required"),
            "{}",
            error.message
        );
        let body = r#"{"error":{"code":400,"message":"API key not valid.","status":"INVALID_ARGUMENT",
            "details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID"}]}}"#;
        let error = api().refused(StatusCode::BAD_REQUEST, &HeaderMap::new(), body);
        assert!(
            error.message.contains("key was refused"),
            "{}",
            error.message
        );
        let error = api().refused(
            StatusCode::BAD_GATEWAY,
            &HeaderMap::new(),
            "<html>bad</html>",
        );
        assert_eq!(error.kind, engine::FailureKind::Transient);
    }
}
