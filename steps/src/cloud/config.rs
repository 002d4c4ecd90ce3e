//! What the cloud providers are configured with: each account's key and base URL, the
//! models and voice, the request timeout, and the price table costs are recorded from.
//! Read from the environment by [`CloudConfig::from_env`] (the names are listed there).

use std::fmt;
use std::time::Duration;

/// An API key. It is sent in a request header and nowhere else: its `Debug` hides it,
/// it has no `Display`, and error messages are scrubbed of it before they are stored.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// A key as the provider issued it (surrounding whitespace dropped).
    pub fn new(key: impl AsRef<str>) -> Self {
        ApiKey(key.as_ref().trim().to_owned())
    }

    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// One provider account: its key (if given) and the API's base URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub key: Option<ApiKey>,
    /// Without a trailing slash, e.g. `https://api.dev.runwayml.com`.
    pub base_url: String,
}

impl Account {
    fn new(base_url: &str) -> Self {
        Account {
            key: None,
            base_url: base_url.to_owned(),
        }
    }
}

/// What the cloud providers charge, in micro-dollars, as recorded in each item's
/// `cost_micros`. The defaults are the published list prices of the models
/// [`CloudConfig`] uses, read in mid-2026; override them (`REEL_CLOUD_PRICES`) when your
/// plan or the prices differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prices {
    /// One generated image. Gemini 2.5 Flash Image: $30 per 1M output tokens, 1,290 tokens
    /// per image up to 1024×1024 = $0.039 (ai.google.dev/gemini-api/docs/pricing).
    pub gemini_image: i64,
    /// One second of generated video. Runway gen4_turbo: 5 credits per second at $0.01 per
    /// credit = $0.05 (docs.dev.runwayml.com, pricing).
    pub runway_second: i64,
    /// 1,000 characters of speech. ElevenLabs Multilingual v2: $0.10 per 1,000 characters
    /// (elevenlabs.io/pricing/api).
    pub elevenlabs_1k_chars: i64,
    /// One sound effect. ElevenLabs sound effects: $0.12 per generation
    /// (elevenlabs.io/pricing/api).
    pub elevenlabs_sfx: i64,
}

impl Default for Prices {
    fn default() -> Self {
        Prices {
            gemini_image: 39_000,
            runway_second: 50_000,
            elevenlabs_1k_chars: 100_000,
            elevenlabs_sfx: 120_000,
        }
    }
}

impl Prices {
    /// The names `REEL_CLOUD_PRICES` takes (`NAME=DOLLARS`, comma-separated).
    pub const NAMES: [&'static str; 4] = [
        "gemini_image",
        "runway_second",
        "elevenlabs_1k_chars",
        "elevenlabs_sfx",
    ];

    /// These prices with the overrides in `list` (`gemini_image=0.04,runway_second=0.1`,
    /// in dollars).
    pub fn with_overrides(mut self, list: &str) -> Result<Self, ConfigError> {
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let bad = || ConfigError::Price(engine::truncate_for_display(entry, 60));
            let (name, dollars) = entry.split_once('=').ok_or_else(bad)?;
            let dollars: f64 = dollars.trim().parse().map_err(|_| bad())?;
            if !(0.0..=1000.0).contains(&dollars) {
                return Err(bad());
            }
            let micros = (dollars * 1e6).round() as i64;
            match name.trim() {
                "gemini_image" => self.gemini_image = micros,
                "runway_second" => self.runway_second = micros,
                "elevenlabs_1k_chars" => self.elevenlabs_1k_chars = micros,
                "elevenlabs_sfx" => self.elevenlabs_sfx = micros,
                _ => return Err(bad()),
            }
        }
        Ok(self)
    }
}

/// The cloud providers' settings.
#[derive(Clone, Debug, PartialEq)]
pub struct CloudConfig {
    /// Images (`GEMINI_API_KEY`, `GEMINI_API_URL`).
    pub gemini: Account,
    /// Video (`RUNWAY_API_KEY`, `RUNWAY_API_URL`).
    pub runway: Account,
    /// Narration and sound effects (`ELEVENLABS_API_KEY`, `ELEVENLABS_API_URL`).
    pub elevenlabs: Account,
    /// The Gemini model that draws the assets.
    pub gemini_model: String,
    /// The Runway model that animates each composite.
    pub runway_model: String,
    /// Each clip's length, in seconds (Runway takes 2 to 10).
    pub clip_seconds: u32,
    /// The ElevenLabs voice (`ELEVENLABS_VOICE_ID`).
    pub voice_id: String,
    /// The ElevenLabs speech model.
    pub speech_model: String,
    /// How long one request (a call, a submit, a poll, a download) may take.
    pub timeout: Duration,
    pub prices: Prices,
}

/// The base URLs of the real APIs.
pub const GEMINI_URL: &str = "https://generativelanguage.googleapis.com";
pub const RUNWAY_URL: &str = "https://api.dev.runwayml.com";
pub const ELEVENLABS_URL: &str = "https://api.elevenlabs.io";
/// "George", one of ElevenLabs' premade voices (the one their API reference's examples use).
pub const DEFAULT_VOICE_ID: &str = "JBFqnCBsd6RMkjVDRZzb";

impl Default for CloudConfig {
    fn default() -> Self {
        CloudConfig {
            gemini: Account::new(GEMINI_URL),
            runway: Account::new(RUNWAY_URL),
            elevenlabs: Account::new(ELEVENLABS_URL),
            gemini_model: "gemini-2.5-flash-image".into(),
            runway_model: "gen4_turbo".into(),
            clip_seconds: 5,
            voice_id: DEFAULT_VOICE_ID.into(),
            speech_model: "eleven_multilingual_v2".into(),
            timeout: Duration::from_secs(120),
            prices: Prices::default(),
        }
    }
}

/// A setting of the cloud providers that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("{name} must be an http:// or https:// URL, got {value:?}")]
    Url { name: &'static str, value: String },
    #[error("ELEVENLABS_VOICE_ID must be a voice id (letters and digits, 1 to 64), got {0:?}")]
    Voice(String),
    #[error(
        "REEL_CLOUD_PRICES: {0:?} is not NAME=DOLLARS (0 to 1000) with NAME one of gemini_image, runway_second, elevenlabs_1k_chars, elevenlabs_sfx"
    )]
    Price(String),
    #[error("REEL_CLOUD_TIMEOUT_SECS must be a number of seconds from 1 to 3600, got {0:?}")]
    Timeout(String),
}

impl CloudConfig {
    /// The settings from the process environment: `GEMINI_API_KEY`, `GEMINI_API_URL`,
    /// `RUNWAY_API_KEY`, `RUNWAY_API_URL`, `ELEVENLABS_API_KEY`, `ELEVENLABS_API_URL`,
    /// `ELEVENLABS_VOICE_ID`, `REEL_CLOUD_PRICES` and `REEL_CLOUD_TIMEOUT_SECS`; anything
    /// unset keeps its default. A missing key is not an error here:
    /// [`crate::ProviderPlan::check_ready`] names the keys the chosen steps need.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`CloudConfig::from_env`] with the variables read through `var`.
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let set = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let mut config = CloudConfig::default();
        for (account, key, url) in [
            (&mut config.gemini, "GEMINI_API_KEY", "GEMINI_API_URL"),
            (&mut config.runway, "RUNWAY_API_KEY", "RUNWAY_API_URL"),
            (
                &mut config.elevenlabs,
                "ELEVENLABS_API_KEY",
                "ELEVENLABS_API_URL",
            ),
        ] {
            account.key = set(key).map(ApiKey::new);
            if let Some(value) = set(url) {
                account.base_url = base_url(url, &value)?;
            }
        }
        if let Some(voice) = set("ELEVENLABS_VOICE_ID") {
            let voice = voice.trim();
            let plain =
                (1..=64).contains(&voice.len()) && voice.chars().all(|c| c.is_ascii_alphanumeric());
            if !plain {
                return Err(ConfigError::Voice(engine::truncate_for_display(voice, 64)));
            }
            config.voice_id = voice.to_owned();
        }
        if let Some(prices) = set("REEL_CLOUD_PRICES") {
            config.prices = config.prices.with_overrides(&prices)?;
        }
        if let Some(secs) = set("REEL_CLOUD_TIMEOUT_SECS") {
            config.timeout = secs
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|s| (1.0..=3600.0).contains(s))
                .map(Duration::from_secs_f64)
                .ok_or_else(|| ConfigError::Timeout(engine::truncate_for_display(&secs, 40)))?;
        }
        Ok(config)
    }
}

fn base_url(name: &'static str, value: &str) -> Result<String, ConfigError> {
    let value = value.trim().trim_end_matches('/');
    let scheme = value
        .strip_prefix("https://")
        .or_else(|| value.strip_prefix("http://"));
    match scheme {
        Some(rest) if !rest.is_empty() && !rest.contains(char::is_whitespace) => {
            Ok(value.to_owned())
        }
        _ => Err(ConfigError::Url {
            name,
            value: engine::truncate_for_display(value, 80),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn the_environment_sets_keys_urls_voice_prices_and_timeout() {
        let config = CloudConfig::from_lookup(lookup(&[
            ("GEMINI_API_KEY", " g-key "),
            ("RUNWAY_API_URL", "http://127.0.0.1:9/"),
            ("ELEVENLABS_VOICE_ID", "abc123"),
            ("REEL_CLOUD_PRICES", "runway_second=0.1, elevenlabs_sfx=0"),
            ("REEL_CLOUD_TIMEOUT_SECS", "2.5"),
        ]))
        .expect("valid");
        assert_eq!(config.gemini.key, Some(ApiKey::new("g-key")));
        assert_eq!(config.gemini.base_url, GEMINI_URL);
        assert_eq!(config.runway.key, None);
        assert_eq!(config.runway.base_url, "http://127.0.0.1:9");
        assert_eq!(config.voice_id, "abc123");
        assert_eq!(config.prices.runway_second, 100_000);
        assert_eq!(config.prices.elevenlabs_sfx, 0);
        assert_eq!(config.prices.gemini_image, 39_000);
        assert_eq!(config.timeout, Duration::from_millis(2500));
        assert_eq!(
            format!("{:?}", config.gemini.key),
            "Some(ApiKey(<redacted>))"
        );
    }

    #[test]
    fn bad_settings_are_refused_by_name() {
        for (pairs, expected) in [
            (("GEMINI_API_URL", "ftp://x"), "GEMINI_API_URL"),
            (("ELEVENLABS_VOICE_ID", "../x"), "ELEVENLABS_VOICE_ID"),
            (
                ("REEL_CLOUD_PRICES", "gemini_image=-1"),
                "REEL_CLOUD_PRICES",
            ),
            (("REEL_CLOUD_PRICES", "video=1"), "REEL_CLOUD_PRICES"),
            (("REEL_CLOUD_TIMEOUT_SECS", "0"), "REEL_CLOUD_TIMEOUT_SECS"),
        ] {
            let err = CloudConfig::from_lookup(lookup(&[pairs])).expect_err("refused");
            assert!(err.to_string().contains(expected), "{err}");
        }
    }
}
