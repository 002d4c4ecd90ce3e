//! Validated identifiers: a malformed id is rejected at the edge, never stored.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::Error;

/// A task's id, which is also the id of its event stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskId(Uuid);

impl TaskId {
    /// A new random task id.
    pub fn new() -> Self {
        TaskId(Uuid::new_v4())
    }

    /// The underlying UUID.
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl Default for TaskId {
    fn default() -> Self {
        Self::new()
    }
}

impl From<Uuid> for TaskId {
    fn from(id: Uuid) -> Self {
        TaskId(id)
    }
}

impl FromStr for TaskId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Uuid::parse_str(s.trim())
            .map(TaskId)
            .map_err(|_| Error::InvalidId {
                input: truncate_for_display(s, 80),
            })
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A channel (a content team's namespace): `[a-z0-9_-]{1,64}`. Artifacts live under a
/// per-channel directory, so the id must be safe as a path component.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ChannelId(String);

impl ChannelId {
    /// The longest channel id accepted.
    pub const MAX_LEN: usize = 64;

    /// Validates a channel id.
    pub fn parse(input: &str) -> Result<Self, Error> {
        let valid = !input.is_empty()
            && input.len() <= Self::MAX_LEN
            && input
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if valid {
            Ok(ChannelId(input.to_owned()))
        } else {
            Err(Error::InvalidChannel {
                input: truncate_for_display(input, 80),
            })
        }
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for ChannelId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        ChannelId::parse(&raw).map_err(serde::de::Error::custom)
    }
}

impl FromStr for ChannelId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        ChannelId::parse(s)
    }
}

impl fmt::Display for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Cuts `s` to at most `max` characters (on a char boundary), marking the cut with `…`.
/// Used for every message that is stored in an event or logged: bounded, never flooding.
pub fn truncate_for_display(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_owned(),
        Some((cut, _)) => format!("{}…", &s[..cut]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_ids_parse_and_reject_garbage() {
        let id = TaskId::new();
        assert_eq!(id.to_string().parse::<TaskId>().ok(), Some(id));
        let err = "not-a-uuid".parse::<TaskId>().unwrap_err();
        assert!(matches!(err, Error::InvalidId { ref input } if input == "not-a-uuid"));
    }

    #[test]
    fn channel_ids_are_path_safe() {
        assert!(ChannelId::parse("history_channel-2").is_ok());
        for bad in ["", "../etc", "a/b", "UPPER", "a b", "ü", &"x".repeat(65)] {
            assert!(ChannelId::parse(bad).is_err(), "{bad:?} must be rejected");
        }
        assert!(serde_json::from_str::<ChannelId>("\"../x\"").is_err());
    }

    #[test]
    fn truncation_is_bounded_and_char_safe() {
        assert_eq!(truncate_for_display("abc", 5), "abc");
        assert_eq!(truncate_for_display("ééééé", 2), "éé…");
    }
}
