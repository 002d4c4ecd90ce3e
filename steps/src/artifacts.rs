//! Where artifacts live: `<root>/<channel_id>/<task_id>/<step>/<file>`, nowhere else; and
//! what an item records about its artifact so that an audit can tell it is still the same
//! file (its size and SHA-256, in the item's `output`).

use std::path::{Component, Path, PathBuf};

use engine::{ChannelId, TaskId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// An artifact path that would leave its channel's directory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsafe artifact path component {0:?}")]
pub struct ArtifactError(pub String);

/// The path of an artifact, checked: `step` and `file` must be single, plain path
/// components (no separators, no `..`, not absolute), so nothing escapes the channel's
/// directory. The channel id is validated by its type.
pub fn artifact_path(
    root: &Path,
    channel: &ChannelId,
    task: TaskId,
    step: &str,
    file: &str,
) -> Result<PathBuf, ArtifactError> {
    for part in [step, file] {
        let mut components = Path::new(part).components();
        let plain =
            matches!(components.next(), Some(Component::Normal(_))) && components.next().is_none();
        if !plain || part.contains(['/', '\\', '\0']) {
            return Err(ArtifactError(engine::truncate_for_display(part, 60)));
        }
    }
    Ok(root
        .join(channel.as_str())
        .join(task.to_string())
        .join(step)
        .join(file))
}

/// The file behind an `artifact` (`<channel>/<task>/<step>/<file>`, as items record it)
/// under `root`. The log is input like any other: an artifact that is absolute or climbs
/// out of the root (`..`) is refused rather than read.
pub fn resolve_artifact(root: &Path, artifact: &str) -> Result<PathBuf, ArtifactError> {
    let relative = Path::new(artifact);
    let plain = !artifact.is_empty()
        && !artifact.contains(['\\', '\0'])
        && relative
            .components()
            .all(|part| matches!(part, Component::Normal(_)));
    if !plain {
        return Err(ArtifactError(engine::truncate_for_display(artifact, 120)));
    }
    Ok(root.join(relative))
}

/// What an item's `output` records about its artifact file: `size_bytes` and `sha256`
/// (lowercase hex). Additive fields of the public log format; outputs recorded before
/// they existed simply have none, and are not checked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub size_bytes: u64,
    pub sha256: String,
}

impl Fingerprint {
    /// The fingerprint of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        let digest = Sha256::digest(bytes);
        Fingerprint {
            size_bytes: bytes.len() as u64,
            sha256: digest.iter().map(|b| format!("{b:02x}")).collect(),
        }
    }

    /// The fingerprint of the file at `path` (read whole: artifacts are media files of at
    /// most a few tens of megabytes).
    pub async fn of_file(path: &Path) -> std::io::Result<Self> {
        Ok(Fingerprint::of(&tokio::fs::read(path).await?))
    }

    /// The fingerprint an item `output` records, if it records one.
    pub fn recorded_in(output: &serde_json::Value) -> Option<Self> {
        Fingerprint::deserialize(output).ok()
    }

    /// `output` (an object, or nothing yet) with this fingerprint's fields added.
    pub fn add_to(&self, output: Option<serde_json::Value>) -> serde_json::Value {
        let mut object = match output {
            Some(serde_json::Value::Object(object)) => object,
            _ => serde_json::Map::new(),
        };
        object.insert("size_bytes".into(), self.size_bytes.into());
        object.insert("sha256".into(), self.sha256.clone().into());
        serde_json::Value::Object(object)
    }
}

/// How an artifact on disk differs from what its item recorded.
#[derive(Debug, PartialEq, Eq)]
pub enum ArtifactCheck {
    /// Same size and SHA-256.
    Intact,
    /// No file, or it cannot be read (why).
    Missing(String),
    /// A file of another size or content.
    Changed {
        recorded: Fingerprint,
        found: Fingerprint,
    },
    /// The recorded artifact is not a path under the root.
    Unsafe,
}

/// Compares the file behind `artifact` under `root` with the fingerprint recorded for it.
pub fn check_artifact(root: &Path, artifact: &str, recorded: &Fingerprint) -> ArtifactCheck {
    let Ok(path) = resolve_artifact(root, artifact) else {
        return ArtifactCheck::Unsafe;
    };
    match std::fs::read(&path) {
        Err(e) => ArtifactCheck::Missing(e.to_string()),
        Ok(bytes) => {
            let found = Fingerprint::of(&bytes);
            if &found == recorded {
                ArtifactCheck::Intact
            } else {
                ArtifactCheck::Changed {
                    recorded: recorded.clone(),
                    found,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artifacts_stay_under_their_channel() {
        let root = Path::new("/srv/reel");
        let channel = ChannelId::parse("history").expect("channel");
        let task = TaskId::new();
        let path = artifact_path(root, &channel, task, "video", "07.mp4").expect("plain");
        assert!(path.starts_with(root.join("history")));
        for bad in ["../x", "..", "/etc/passwd", "a/b", "a\\b", "", "."] {
            assert!(
                artifact_path(root, &channel, task, "video", bad).is_err(),
                "{bad:?}"
            );
            assert!(
                artifact_path(root, &channel, task, bad, "01.png").is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn recorded_artifacts_resolve_only_below_the_root() {
        let root = Path::new("/srv/reel");
        assert_eq!(
            resolve_artifact(root, "history/t/video/07.mp4").expect("plain"),
            root.join("history/t/video/07.mp4")
        );
        for bad in ["", "/etc/passwd", "../x", "history/../../x", "a\\b", "./a"] {
            assert!(resolve_artifact(root, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_fingerprint_is_the_size_and_sha256_and_joins_an_output() {
        let print = Fingerprint::of(b"abc");
        assert_eq!(print.size_bytes, 3);
        assert_eq!(
            print.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let output = print.add_to(Some(serde_json::json!({"sources": ["a"]})));
        assert_eq!(output["sources"][0], "a");
        assert_eq!(Fingerprint::recorded_in(&output), Some(print));
        assert_eq!(
            Fingerprint::recorded_in(&serde_json::json!({"sources": []})),
            None
        );
        assert_eq!(Fingerprint::recorded_in(&serde_json::Value::Null), None);
    }

    #[test]
    fn a_changed_or_missing_file_is_told_apart_from_an_intact_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("c/t/s")).expect("mkdir");
        std::fs::write(dir.path().join("c/t/s/01.png"), b"abc").expect("write");
        let recorded = Fingerprint::of(b"abc");
        let check = |artifact| check_artifact(dir.path(), artifact, &recorded);
        assert_eq!(check("c/t/s/01.png"), ArtifactCheck::Intact);
        assert!(matches!(check("c/t/s/02.png"), ArtifactCheck::Missing(_)));
        assert_eq!(check("../01.png"), ArtifactCheck::Unsafe);
        std::fs::write(dir.path().join("c/t/s/01.png"), b"abd").expect("write");
        assert!(matches!(
            check("c/t/s/01.png"),
            ArtifactCheck::Changed { found, .. } if found.size_bytes == 3
        ));
    }
}
