//! The Notion HTTP client: pages (set a Status, patch, create), data sources (schema,
//! query), errors classified by
//! HTTP status — never by body, since a 502 from Notion's edge is HTML, not JSON.

use std::fmt;
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::page_id::PageId;

/// The longest error text kept from a response or a transport error.
pub const ERROR_MAX_CHARS: usize = 300;

/// The longest error `code` kept from a JSON error body (Notion's are short names).
const CODE_MAX_CHARS: usize = 60;

/// Notion's default API address.
pub const DEFAULT_API_URL: &str = "https://api.notion.com";

/// The API version pinned by default (the official SDK's default).
pub const DEFAULT_NOTION_VERSION: &str = "2025-09-03";

/// An integration token. Its `Debug` and `Display` never show it, and every error text
/// built from a response or a transport failure has it scrubbed.
#[derive(Clone)]
pub struct Token(String);

impl Token {
    pub fn new(token: impl Into<String>) -> Token {
        Token(token.into())
    }

    fn expose(&self) -> &str {
        &self.0
    }

    /// `text` with every occurrence of the token replaced.
    pub fn scrub(&self, text: &str) -> String {
        if self.0.len() < 4 {
            return text.to_owned();
        }
        text.replace(&self.0, "[redacted]")
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token([redacted])")
    }
}

/// The kind of the Notion property that mirrors the status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PropertyType {
    /// A Status property: the option must already exist in the database.
    Status,
    /// A Select property: an unknown option is added by Notion.
    Select,
}

impl PropertyType {
    pub fn as_str(self) -> &'static str {
        match self {
            PropertyType::Status => "status",
            PropertyType::Select => "select",
        }
    }
}

/// Why a request did not succeed, classified for the retry policy.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotionError {
    /// 429 or 529: wait `retry_after` (Notion's `Retry-After`), pausing every request.
    #[error("HTTP {status}: rate limited (retry after {retry_after:?})")]
    RateLimited {
        status: u16,
        retry_after: Option<Duration>,
    },
    /// 409, 500, 502, 503, 504 and other 5xx: retried with backoff.
    #[error("HTTP {status}: {message}")]
    Unavailable { status: u16, message: String },
    /// No answer within the request timeout: retried with backoff.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The request did not reach Notion or its answer was cut (refused, reset, DNS):
    /// retried with backoff.
    #[error("cannot reach Notion: {0}")]
    Transport(String),
    /// 400, 401, 403, 404 and other 4xx: a retry cannot help.
    #[error("HTTP {status} {code}: {message}")]
    Rejected {
        status: u16,
        code: String,
        message: String,
    },
}

impl NotionError {
    /// Whether the same request may succeed later.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, NotionError::Rejected { .. })
    }

    /// Whether Notion may have carried the request out though it did not say so: no
    /// answer, a 5xx, or a success whose body could not be read. A 4xx or a 429 was
    /// refused.
    pub fn may_have_applied(&self) -> bool {
        !matches!(
            self,
            NotionError::Rejected { .. } | NotionError::RateLimited { .. }
        )
    }

    /// Whether the request may still be applied after this error was seen: no answer (a
    /// timeout, a cut connection) or a gateway's 502/504, behind which Notion may still
    /// work on it (Notion gives up on a request after 60 s). Notion's own 5xx answers are
    /// final.
    pub fn may_land_later(&self) -> bool {
        match self {
            NotionError::Timeout(_) | NotionError::Transport(_) => true,
            NotionError::Unavailable { status, .. } => matches!(status, 502 | 504),
            NotionError::RateLimited { .. } | NotionError::Rejected { .. } => false,
        }
    }

    /// The HTTP status, when Notion answered.
    pub fn http_status(&self) -> Option<u16> {
        match self {
            NotionError::RateLimited { status, .. }
            | NotionError::Unavailable { status, .. }
            | NotionError::Rejected { status, .. } => Some(*status),
            NotionError::Timeout(_) | NotionError::Transport(_) => None,
        }
    }

    /// A short label for metrics and logs.
    pub fn outcome(&self) -> &'static str {
        match self {
            NotionError::RateLimited { .. } => "rate_limited",
            NotionError::Unavailable { .. } => "unavailable",
            NotionError::Timeout(_) => "timeout",
            NotionError::Transport(_) => "transport",
            NotionError::Rejected { .. } => "rejected",
        }
    }
}

/// How to reach Notion.
#[derive(Clone, Debug)]
pub struct NotionConfig {
    /// `https://api.notion.com`, or a local fake in tests.
    pub api_url: String,
    pub token: Token,
    /// The `Notion-Version` header.
    pub version: String,
    /// The longest wait for one answer.
    pub timeout: Duration,
}

/// A client for Notion's pages and data sources. Cheap to clone.
#[derive(Clone, Debug)]
pub struct NotionClient {
    http: reqwest::Client,
    base: String,
    /// `Bearer <token>`, marked sensitive so no debug output shows it.
    authorization: HeaderValue,
    /// Kept to scrub error texts.
    token: Token,
    timeout: Duration,
}

/// The client could not be built (an invalid header value in the configuration).
#[derive(Debug, thiserror::Error)]
#[error("invalid Notion client configuration: {0}")]
pub struct ConfigError(String);

impl NotionClient {
    pub fn new(config: NotionConfig) -> Result<NotionClient, ConfigError> {
        let mut headers = HeaderMap::new();
        let version = HeaderValue::from_str(&config.version)
            .map_err(|_| ConfigError("NOTION_VERSION is not a valid header value".into()))?;
        headers.insert("Notion-Version", version);
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("reel-notion-projector/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ConfigError(config.token.scrub(&e.to_string())))?;
        // A token that cannot be a header value would fail every request: say so now,
        // without echoing it.
        let mut authorization = HeaderValue::from_str(&format!("Bearer {}", config.token.expose()))
            .map_err(|_| {
                ConfigError("NOTION_TOKEN holds characters not allowed in a header".into())
            })?;
        authorization.set_sensitive(true);
        Ok(NotionClient {
            http,
            base: config.api_url.trim_end_matches('/').to_owned(),
            authorization,
            token: config.token,
            timeout: config.timeout,
        })
    }

    /// The name of this token's request budget: a SHA-256 of the token (hex), never the
    /// token itself. Every projector using the token gets the same name, whatever its API
    /// address.
    pub fn budget_key(&self) -> String {
        use sha2::{Digest, Sha256};
        let digest = Sha256::new()
            .chain_update(b"reel/notion-projector/budget\0")
            .chain_update(self.token.expose().as_bytes())
            .finalize();
        digest.iter().map(|byte| format!("{byte:02x}")).collect()
    }

    /// Sets the page's `property` (a Status or Select property) to the option `name`.
    pub async fn set_status(
        &self,
        page: &PageId,
        property: &str,
        kind: PropertyType,
        name: &str,
    ) -> Result<(), NotionError> {
        let body = json!({ "properties": { property: { kind.as_str(): { "name": name } } } });
        self.patch_page(page, body).await.map(|_| ())
    }

    /// `PATCH /v1/pages/{page}` with `body` (`{"properties": …}`); the page object back.
    pub async fn patch_page(&self, page: &PageId, body: Value) -> Result<Value, NotionError> {
        self.send(Method::PATCH, &format!("/v1/pages/{page}"), Some(body))
            .await
    }

    /// `GET` of an API path such as `/v1/data_sources/{id}`: the JSON answer.
    pub async fn get(&self, path: &str) -> Result<Value, NotionError> {
        self.send(Method::GET, path, None).await
    }

    /// `POST` of `body` to an API path such as `/v1/pages`: the JSON answer.
    pub async fn post(&self, path: &str, body: Value) -> Result<Value, NotionError> {
        self.send(Method::POST, path, Some(body)).await
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, NotionError> {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header(AUTHORIZATION, self.authorization.clone());
        if let Some(body) = &body {
            request = request.json(body);
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(err) => return Err(self.transport_error(&err)),
        };
        let status = response.status();
        if status.is_success() {
            let bytes = match response.bytes().await {
                Ok(bytes) => bytes,
                Err(err) => return Err(self.transport_error(&err)),
            };
            // An empty or non-JSON success body carries nothing the caller reads.
            return Ok(serde_json::from_slice(&bytes).unwrap_or(Value::Null));
        }
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let text = response.text().await.unwrap_or_default();
        Err(self.classify(status, retry_after, &text))
    }

    fn classify(
        &self,
        status: StatusCode,
        retry_after: Option<Duration>,
        body: &str,
    ) -> NotionError {
        let code = status.as_u16();
        // Scrub the whole body before anything is cut from it: a token that straddles a
        // cut would escape the scrub, half of it kept.
        let (error_code, message) = parse_error_body(&self.token.scrub(body));
        let message = truncate(&message);
        let error_code = error_code.map(|code| engine::truncate_for_display(&code, CODE_MAX_CHARS));
        match code {
            429 | 529 => NotionError::RateLimited {
                status: code,
                retry_after,
            },
            409 | 500..=599 => NotionError::Unavailable {
                status: code,
                message,
            },
            _ => NotionError::Rejected {
                status: code,
                code: error_code.unwrap_or_else(|| "unknown".into()),
                message,
            },
        }
    }

    fn transport_error(&self, err: &reqwest::Error) -> NotionError {
        if err.is_timeout() {
            return NotionError::Timeout(self.timeout);
        }
        let mut text = err.to_string();
        let mut source = std::error::Error::source(err);
        while let Some(cause) = source {
            let line = cause.to_string();
            if !text.contains(&line) {
                text.push_str(": ");
                text.push_str(&line);
            }
            source = cause.source();
        }
        NotionError::Transport(truncate(&self.token.scrub(&text)))
    }
}

/// `code` and `message` of Notion's JSON error body; for anything else (the HTML of a 502
/// from the edge, an empty body) no code and a short description of what came back.
fn parse_error_body(body: &str) -> (Option<String>, String) {
    if let Ok(value) = serde_json::from_str::<serde_json::Value>(body) {
        let code = value
            .get("code")
            .and_then(|c| c.as_str())
            .map(str::to_owned);
        let message = value
            .get("message")
            .and_then(|m| m.as_str())
            .map(str::to_owned);
        if code.is_some() || message.is_some() {
            return (code, message.unwrap_or_default());
        }
    }
    let trimmed = body.trim();
    if trimmed.is_empty() {
        (None, "empty response body".into())
    } else if trimmed.starts_with('<') {
        (None, "non-JSON (HTML) response body".into())
    } else {
        (None, trimmed.chars().take(120).collect())
    }
}

/// `Retry-After` as delta-seconds or an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    if let Ok(seconds) = value.parse::<f64>()
        && seconds.is_finite()
        && seconds >= 0.0
    {
        return Some(Duration::from_secs_f64(seconds));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let wait = at.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Some(wait.to_std().unwrap_or(Duration::ZERO))
}

fn truncate(text: &str) -> String {
    engine::truncate_for_display(text, ERROR_MAX_CHARS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_accepts_seconds_and_dates() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(" 0 "), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("1.5"), Some(Duration::from_millis(1500)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
        assert_eq!(parse_retry_after("-3"), None);
    }

    #[test]
    fn error_bodies_json_html_and_empty() {
        assert_eq!(
            parse_error_body(
                r#"{"object":"error","status":404,"code":"object_not_found","message":"Could not find page"}"#
            ),
            (
                Some("object_not_found".into()),
                "Could not find page".into()
            )
        );
        assert_eq!(
            parse_error_body("<html><body>502 Bad Gateway</body></html>"),
            (None, "non-JSON (HTML) response body".into())
        );
        assert_eq!(parse_error_body(""), (None, "empty response body".into()));
    }

    #[test]
    fn a_token_echoed_in_an_error_body_is_scrubbed_before_any_cut() {
        let token = "ntn_supersecret_value_0123456789";
        let client = NotionClient::new(NotionConfig {
            api_url: "http://127.0.0.1:9".into(),
            token: Token::new(token),
            version: DEFAULT_NOTION_VERSION.into(),
            timeout: Duration::from_secs(1),
        })
        .expect("client");
        let echoed = format!("Bearer {token}");
        let bodies = [
            json!({"object": "error", "code": echoed, "message": "m"}).to_string(),
            format!("{}{echoed} refused", "x".repeat(110)),
        ];
        for body in bodies {
            let error = client.classify(StatusCode::BAD_REQUEST, None, &body);
            let text = format!("{error} {error:?}");
            assert!(!text.contains("ntn_supersecret"), "{text}");
            assert!(!text.contains("ntn_s"), "no piece of it either: {text}");
        }
    }

    #[test]
    fn the_token_never_shows() {
        let token = Token::new("ntn_supersecret_value");
        assert_eq!(format!("{token:?}"), "Token([redacted])");
        assert_eq!(
            token.scrub("bad header Bearer ntn_supersecret_value"),
            "bad header Bearer [redacted]"
        );
    }
}
