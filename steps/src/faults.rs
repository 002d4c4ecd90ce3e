//! Fault injection that travels in the task input: `video:7` fails clip 7 with a transient
//! error on the task's first attempt only; `video:7:permanent` fails it for good.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// One injected failure.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    pub step: String,
    pub item: u32,
    #[serde(default)]
    pub permanent: bool,
}

/// A `--fail` value that is not `STEP:ITEM[:permanent]` with a known step.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid fault {input:?}: {reason} (expected STEP:ITEM[:permanent], STEP one of {steps})")]
pub struct FaultParseError {
    pub input: String,
    pub reason: &'static str,
    pub steps: String,
}

impl FromStr for Fault {
    type Err = FaultParseError;

    fn from_str(s: &str) -> Result<Self, FaultParseError> {
        let fail = |reason| FaultParseError {
            input: engine::truncate_for_display(s, 60),
            reason,
            steps: crate::STEP_NAMES.join(", "),
        };
        let mut parts = s.split(':');
        let step = parts.next().unwrap_or_default();
        if !crate::STEP_NAMES.contains(&step) {
            return Err(fail("unknown step"));
        }
        let item = parts
            .next()
            .and_then(|i| i.parse::<u32>().ok())
            .filter(|i| *i >= 1)
            .ok_or_else(|| fail("ITEM must be a number from 1"))?;
        let permanent = match parts.next() {
            None => false,
            Some("permanent") => true,
            Some(_) => return Err(fail("the third part can only be 'permanent'")),
        };
        if parts.next().is_some() {
            return Err(fail("too many parts"));
        }
        Ok(Fault {
            step: step.to_owned(),
            item,
            permanent,
        })
    }
}

impl Fault {
    /// Whether this fault fires for `step`/`item` on task attempt `attempt`.
    pub fn fires(&self, step: &str, item: u32, attempt: u32) -> bool {
        self.step == step && self.item == item && (self.permanent || attempt == 1)
    }
}

/// The fault in `request`'s task input that fires for this item and attempt, if any (the
/// simulated and the local providers both honour them).
pub(crate) fn injected(request: &crate::ItemRequest) -> Option<Fault> {
    let faults: Vec<Fault> = serde_json::from_value(request.input.get("faults")?.clone()).ok()?;
    faults
        .into_iter()
        .find(|f| f.fires(&request.step, request.item, request.attempt))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_and_reject_garbage() {
        assert_eq!(
            "video:7".parse(),
            Ok(Fault {
                step: "video".into(),
                item: 7,
                permanent: false
            })
        );
        assert!(
            "video:7:permanent"
                .parse::<Fault>()
                .expect("valid")
                .permanent
        );
        for bad in [
            "music:1",
            "video",
            "video:0",
            "video:x",
            "video:7:sometimes",
            "video:7:permanent:x",
        ] {
            assert!(bad.parse::<Fault>().is_err(), "{bad}");
        }
    }

    #[test]
    fn transient_faults_fire_on_the_first_attempt_only() {
        let fault: Fault = "video:7".parse().expect("valid");
        assert!(fault.fires("video", 7, 1));
        assert!(!fault.fires("video", 7, 2));
        assert!(!fault.fires("video", 8, 1));
    }
}
