//! Where artifacts live: `<root>/<channel_id>/<task_id>/<step>/<file>`, nowhere else.

use std::path::{Component, Path, PathBuf};

use engine::{ChannelId, TaskId};

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
}
