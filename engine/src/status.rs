//! Task statuses: the engine's lifecycle, plus whatever statuses workflows declare for their
//! steps.
//!
//! A status is its storage name: snake_case, at most [`TaskStatus::MAX_LEN`] bytes, what the
//! log and the `tasks` table hold. The engine owns the lifecycle statuses (`queued`,
//! `retry_scheduled`, `final_review`, `completed`, `failed`, `cancelled`); every other
//! status is a step's, declared by its workflow together with the name people see
//! ([`Step::status`](crate::Step::status)). `status_changed` events carry that display name
//! (`to_display`), so tools and sidecars show it without the workflow's code.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;
use std::sync::{LazyLock, Mutex};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Where a task stands: a storage name, compared and copied like a number.
///
/// Lifecycle statuses are associated constants; a workflow's step statuses come from
/// [`TaskStatus::parse`] (or [`TaskStatus::from_static`] in a `const`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskStatus(&'static str);

impl TaskStatus {
    /// Submitted (or sent back by a review, or retried by an operator), waiting for a worker.
    pub const QUEUED: TaskStatus = TaskStatus("queued");
    /// An attempt gave up on a transient error; the task resumes at `next_run_at`.
    pub const RETRY_SCHEDULED: TaskStatus = TaskStatus("retry_scheduled");
    /// Every step is done; a human has to approve or reject (workflows with a review gate).
    pub const FINAL_REVIEW: TaskStatus = TaskStatus("final_review");
    /// Done for good.
    pub const COMPLETED: TaskStatus = TaskStatus("completed");
    /// A permanent error or the attempt limit; the reason is in the log.
    pub const FAILED: TaskStatus = TaskStatus("failed");
    /// Stopped by an operator.
    pub const CANCELLED: TaskStatus = TaskStatus("cancelled");

    /// The statuses the engine owns, in lifecycle order.
    pub const LIFECYCLE: [TaskStatus; 6] = [
        TaskStatus::QUEUED,
        TaskStatus::RETRY_SCHEDULED,
        TaskStatus::FINAL_REVIEW,
        TaskStatus::COMPLETED,
        TaskStatus::FAILED,
        TaskStatus::CANCELLED,
    ];

    /// The longest storage name, in bytes (the `tasks.status` CHECK says the same).
    pub const MAX_LEN: usize = 64;

    /// A status from a static name, checked at compile time when used in a `const`.
    ///
    /// # Panics
    /// When `name` is not snake_case (`[a-z][a-z0-9_]*`) of at most [`TaskStatus::MAX_LEN`] bytes.
    pub const fn from_static(name: &'static str) -> TaskStatus {
        assert!(is_valid_name(name), "a status is snake_case, 1 to 64 bytes");
        TaskStatus(name)
    }

    /// A status from its storage name. Names are interned: each distinct name is stored once
    /// for the life of the process, so statuses stay `Copy`.
    pub fn parse(name: &str) -> Result<TaskStatus, InvalidStatus> {
        if !is_valid_name(name) {
            return Err(InvalidStatus(crate::id::truncate_for_display(name, 40)));
        }
        if let Some(known) = TaskStatus::LIFECYCLE
            .into_iter()
            .chain(LEGACY_STEP_STATUSES.iter().map(|(status, _)| *status))
            .find(|s| s.0 == name)
        {
            return Ok(known);
        }
        let mut interned = INTERNED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(existing) = interned.get(name) {
            return Ok(TaskStatus(existing));
        }
        let leaked: &'static str = Box::leak(name.to_owned().into_boxed_str());
        interned.insert(leaked);
        Ok(TaskStatus(leaked))
    }

    /// The stable snake_case storage name (the log format; never renamed).
    pub fn as_str(self) -> &'static str {
        self.0
    }

    /// One of the engine's own statuses (not a step's).
    pub fn is_lifecycle(self) -> bool {
        TaskStatus::LIFECYCLE.contains(&self)
    }

    /// No work follows without a human or operator (`completed`, `failed`, `cancelled`).
    pub fn is_terminal(self) -> bool {
        self == TaskStatus::COMPLETED || self == TaskStatus::FAILED || self == TaskStatus::CANCELLED
    }

    /// A worker may pick the task up in this status (when its lease is free and it is due).
    pub fn is_runnable(self) -> bool {
        !self.is_terminal() && self != TaskStatus::FINAL_REVIEW
    }

    /// A step runs in this status (it is not one of the lifecycle's).
    pub fn is_step_status(self) -> bool {
        !self.is_lifecycle()
    }

    /// The name shown for this status when the log does not say (`status_changed` events
    /// recorded before `to_display` existed): the lifecycle's names, the names the video
    /// workflow's statuses had before workflows declared their own, else the storage name
    /// in title case (`generating_video` → "Generating Video").
    pub fn default_display(self) -> Cow<'static, str> {
        if let Some(name) = LIFECYCLE_DISPLAY
            .iter()
            .chain(LEGACY_STEP_STATUSES)
            .find(|(status, _)| *status == self)
            .map(|(_, name)| *name)
        {
            return Cow::Borrowed(name);
        }
        Cow::Owned(title_case(self.0))
    }

    /// What a lifecycle status means, for docs and help texts (`None` for a step's status).
    pub fn lifecycle_description(self) -> Option<&'static str> {
        let text = match self.0 {
            "queued" => "submitted (or sent back by a review), waiting for a worker",
            "retry_scheduled" => "an attempt gave up on a transient error; resumes at next_run_at",
            "final_review" => "every step is done; waiting for a human to approve or reject",
            "completed" => "done for good (approved, or finished by a workflow without review)",
            "failed" => "a permanent error or the attempt limit; the reason is in the log",
            "cancelled" => "stopped by an operator",
            _ => return None,
        };
        Some(text)
    }
}

/// The display names of the lifecycle statuses.
const LIFECYCLE_DISPLAY: &[(TaskStatus, &str)] = &[
    (TaskStatus::QUEUED, "Queued"),
    (TaskStatus::RETRY_SCHEDULED, "Retry Scheduled"),
    (TaskStatus::FINAL_REVIEW, "Final Review"),
    (TaskStatus::COMPLETED, "Completed"),
    (TaskStatus::FAILED, "Failed"),
    (TaskStatus::CANCELLED, "Cancelled"),
];

/// The step statuses the engine knew before workflows declared their own, with the names
/// they were shown as. Logs recorded then carry no `to_display`; these keep them reading
/// (and mirroring to Notion) exactly as before. Never extended: new statuses carry their
/// display name in the log.
const LEGACY_STEP_STATUSES: &[(TaskStatus, &str)] = &[
    (TaskStatus("generating_assets"), "Generating Assets"),
    (TaskStatus("generating_composites"), "Generating Composites"),
    (TaskStatus("generating_video"), "Generating Video"),
    (TaskStatus("generating_audio"), "Generating Audio"),
    (TaskStatus("generating_sfx"), "Generating SFX"),
    (TaskStatus("assembling"), "Assembling"),
];

/// Statuses met at run time (from the log or a workflow), stored once each.
static INTERNED: LazyLock<Mutex<HashSet<&'static str>>> =
    LazyLock::new(|| Mutex::new(HashSet::new()));

/// `[a-z][a-z0-9_]*`, 1 to [`TaskStatus::MAX_LEN`] bytes.
const fn is_valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() > TaskStatus::MAX_LEN || !bytes[0].is_ascii_lowercase() {
        return false;
    }
    let mut i = 1;
    while i < bytes.len() {
        let b = bytes[i];
        if !(b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
            return false;
        }
        i += 1;
    }
    true
}

/// `generating_video` → "Generating Video".
pub(crate) fn title_case(snake: &str) -> String {
    snake
        .split('_')
        .filter(|word| !word.is_empty())
        .map(|word| {
            let mut chars = word.chars();
            chars.next().map_or_else(String::new, |first| {
                first.to_ascii_uppercase().to_string() + chars.as_str()
            })
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A storage name for `text` (a step's name): lower-cased, runs of anything but letters and
/// digits made one `_`, a leading `s_` when it does not start with a letter, cut to fit.
pub(crate) fn snake_case(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.is_empty() && !out.ends_with('_') {
            out.push('_');
        }
    }
    let mut out = out.trim_end_matches('_').to_owned();
    if !out.starts_with(|c: char| c.is_ascii_lowercase()) {
        out.insert_str(0, "s_");
    }
    out.truncate(TaskStatus::MAX_LEN);
    out.trim_end_matches('_').to_owned()
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl fmt::Debug for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.0, f)
    }
}

impl Serialize for TaskStatus {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.0)
    }
}

impl<'de> Deserialize<'de> for TaskStatus {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = Cow::<'de, str>::deserialize(deserializer)?;
        TaskStatus::parse(&name).map_err(serde::de::Error::custom)
    }
}

/// A status name that is not snake_case of at most [`TaskStatus::MAX_LEN`] bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid status {0:?}: a status is snake_case ([a-z][a-z0-9_]*), at most 64 bytes")]
pub struct InvalidStatus(pub String);

impl FromStr for TaskStatus {
    type Err = InvalidStatus;

    fn from_str(s: &str) -> Result<Self, InvalidStatus> {
        TaskStatus::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_names_round_trip_and_match_serde() {
        for status in TaskStatus::LIFECYCLE {
            assert_eq!(status.as_str().parse::<TaskStatus>(), Ok(status));
            let json = serde_json::to_value(status).expect("serialize");
            assert_eq!(json, serde_json::Value::from(status.as_str()));
            assert_eq!(
                serde_json::from_value::<TaskStatus>(json).ok(),
                Some(status)
            );
        }
        let custom = TaskStatus::parse("writing_sections").expect("valid");
        assert_eq!(
            custom,
            TaskStatus::parse("writing_sections").expect("valid")
        );
        assert_eq!(custom.as_str(), "writing_sections");
        assert!(custom.is_step_status() && custom.is_runnable());
    }

    #[test]
    fn names_must_be_snake_case_and_bounded() {
        for bad in ["", "Queued", "1st", "a-b", "a b", "é", &"a".repeat(65)] {
            assert!(TaskStatus::parse(bad).is_err(), "{bad:?}");
            assert!(serde_json::from_value::<TaskStatus>(bad.into()).is_err());
        }
        assert!(TaskStatus::parse(&"a".repeat(64)).is_ok());
    }

    #[test]
    fn final_review_is_shown_as_final_review_and_old_names_keep_theirs() {
        assert_eq!(TaskStatus::FINAL_REVIEW.default_display(), "Final Review");
        let sfx = TaskStatus::parse("generating_sfx").expect("valid");
        assert_eq!(sfx.default_display(), "Generating SFX");
        let audio = TaskStatus::parse("generating_audio").expect("valid");
        assert_eq!(audio.default_display(), "Generating Audio");
        let custom = TaskStatus::parse("writing_sections").expect("valid");
        assert_eq!(custom.default_display(), "Writing Sections");
    }

    #[test]
    fn step_names_become_storage_names() {
        assert_eq!(snake_case("Video Clips"), "video_clips");
        assert_eq!(snake_case("9lives"), "s_9lives");
        assert_eq!(snake_case("--"), "s");
        assert!(is_valid_name(&snake_case(&"x".repeat(200))));
    }
}
