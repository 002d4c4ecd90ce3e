//! The task status: one enum, the single source of truth for storage and display names.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where a task stands. The storage name (`as_str`) is what the log and the `tasks` table
/// hold; the display name is what people see (Notion, the CLI's tables).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    Queued,
    GeneratingAssets,
    GeneratingComposites,
    GeneratingVideo,
    /// Narration: shown as "Generating Audio".
    GeneratingAudio,
    GeneratingSfx,
    Assembling,
    RetryScheduled,
    /// Waiting for a human: never called "awaiting_review".
    FinalReview,
    Completed,
    Failed,
    Cancelled,
}

impl TaskStatus {
    /// Every status, in pipeline order.
    pub const ALL: [TaskStatus; 12] = [
        TaskStatus::Queued,
        TaskStatus::GeneratingAssets,
        TaskStatus::GeneratingComposites,
        TaskStatus::GeneratingVideo,
        TaskStatus::GeneratingAudio,
        TaskStatus::GeneratingSfx,
        TaskStatus::Assembling,
        TaskStatus::RetryScheduled,
        TaskStatus::FinalReview,
        TaskStatus::Completed,
        TaskStatus::Failed,
        TaskStatus::Cancelled,
    ];

    /// The stable snake_case storage name (the log format; never renamed).
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Queued => "queued",
            TaskStatus::GeneratingAssets => "generating_assets",
            TaskStatus::GeneratingComposites => "generating_composites",
            TaskStatus::GeneratingVideo => "generating_video",
            TaskStatus::GeneratingAudio => "generating_audio",
            TaskStatus::GeneratingSfx => "generating_sfx",
            TaskStatus::Assembling => "assembling",
            TaskStatus::RetryScheduled => "retry_scheduled",
            TaskStatus::FinalReview => "final_review",
            TaskStatus::Completed => "completed",
            TaskStatus::Failed => "failed",
            TaskStatus::Cancelled => "cancelled",
        }
    }

    /// The human name shown in Notion and tables.
    pub fn display_name(self) -> &'static str {
        match self {
            TaskStatus::Queued => "Queued",
            TaskStatus::GeneratingAssets => "Generating Assets",
            TaskStatus::GeneratingComposites => "Generating Composites",
            TaskStatus::GeneratingVideo => "Generating Video",
            TaskStatus::GeneratingAudio => "Generating Audio",
            TaskStatus::GeneratingSfx => "Generating SFX",
            TaskStatus::Assembling => "Assembling",
            TaskStatus::RetryScheduled => "Retry Scheduled",
            TaskStatus::FinalReview => "Final Review",
            TaskStatus::Completed => "Completed",
            TaskStatus::Failed => "Failed",
            TaskStatus::Cancelled => "Cancelled",
        }
    }

    /// What the status means, for docs and help texts.
    pub fn description(self) -> &'static str {
        match self {
            TaskStatus::Queued => "submitted (or sent back by a review), waiting for a worker",
            TaskStatus::GeneratingAssets => "the assets step runs",
            TaskStatus::GeneratingComposites => "the composites step runs",
            TaskStatus::GeneratingVideo => "the video step runs",
            TaskStatus::GeneratingAudio => "the narration step runs",
            TaskStatus::GeneratingSfx => "the sound-effects step runs",
            TaskStatus::Assembling => "the assembly step runs",
            TaskStatus::RetryScheduled => {
                "an attempt gave up on a transient error; resumes at next_run_at"
            }
            TaskStatus::FinalReview => {
                "every step is done; waiting for a human to approve or reject"
            }
            TaskStatus::Completed => "approved; done for good",
            TaskStatus::Failed => {
                "a permanent error or the attempt limit; the reason is in the log"
            }
            TaskStatus::Cancelled => "stopped by an operator",
        }
    }

    /// No work follows without a human or operator (`completed`, `failed`, `cancelled`).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskStatus::Completed | TaskStatus::Failed | TaskStatus::Cancelled
        )
    }

    /// A worker may pick the task up in this status (when its lease is free and it is due).
    pub fn is_runnable(self) -> bool {
        !self.is_terminal() && self != TaskStatus::FinalReview
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A status name that is not one of [`TaskStatus::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown status {0:?}")]
pub struct UnknownStatus(pub String);

impl FromStr for TaskStatus {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<Self, UnknownStatus> {
        TaskStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| UnknownStatus(crate::id::truncate_for_display(s, 40)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_names_round_trip_and_match_serde() {
        for status in TaskStatus::ALL {
            assert_eq!(status.as_str().parse::<TaskStatus>(), Ok(status));
            let json = serde_json::to_value(status).expect("serialize");
            assert_eq!(json, serde_json::Value::from(status.as_str()));
        }
        assert!("awaiting_review".parse::<TaskStatus>().is_err());
    }

    #[test]
    fn final_review_is_shown_as_final_review() {
        assert_eq!(TaskStatus::FinalReview.display_name(), "Final Review");
        assert_eq!(
            TaskStatus::GeneratingAudio.display_name(),
            "Generating Audio"
        );
    }
}
