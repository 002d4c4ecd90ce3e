//! The programs the local providers run (ffmpeg, ffprobe, espeak-ng): checked once when a
//! worker starts, then run per item with a time limit, their failures classified.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use engine::StepError;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// What to run to get the programs: `apt-get` on Debian and Ubuntu, where CI and the
/// developers' machines are.
pub const INSTALL_HINT: &str = "apt-get install -y ffmpeg espeak-ng";

/// How much of a program's stderr an error keeps: the end, where ffmpeg says what failed.
const STDERR_TAIL_CHARS: usize = 300;

/// Some of the programs the local providers need are not installed (or not on `PATH`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the local providers need ffmpeg, ffprobe and espeak-ng; not found: {}. Install them: {INSTALL_HINT}",
    missing.join(", ")
)]
pub struct ToolsMissing {
    /// The programs that could not be run, as configured.
    pub missing: Vec<String>,
}

/// The programs, by name (looked up on `PATH`) or path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tools {
    pub ffmpeg: PathBuf,
    pub ffprobe: PathBuf,
    pub espeak: PathBuf,
}

impl Default for Tools {
    fn default() -> Self {
        Tools {
            ffmpeg: "ffmpeg".into(),
            ffprobe: "ffprobe".into(),
            espeak: "espeak-ng".into(),
        }
    }
}

impl Tools {
    /// Runs each program's version query; names every one that cannot be started, so a
    /// worker refuses to start instead of failing at clip 7.
    pub async fn check(&self) -> Result<(), ToolsMissing> {
        let mut missing = Vec::new();
        for (program, flag) in [
            (&self.ffmpeg, "-version"),
            (&self.ffprobe, "-version"),
            (&self.espeak, "--version"),
        ] {
            let answered = Command::new(program)
                .arg(flag)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .status();
            let ran = tokio::time::timeout(Duration::from_secs(10), answered).await;
            if !matches!(ran, Ok(Ok(status)) if status.success()) {
                missing.push(program.display().to_string());
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(ToolsMissing { missing })
        }
    }

    /// Runs ffmpeg quietly (errors only, never waiting on stdin) with `args`.
    pub(crate) async fn ffmpeg(&self, args: &[OsString], limit: Duration) -> Result<(), StepError> {
        let mut all: Vec<OsString> = ["-nostdin", "-hide_banner", "-loglevel", "error", "-y"]
            .map(OsString::from)
            .to_vec();
        all.extend_from_slice(args);
        run(&self.ffmpeg, &all, None, limit).await.map(drop)
    }

    /// Speaks `text` into the WAV file `out` (English voice, `words_per_minute`).
    pub(crate) async fn speak(
        &self,
        text: &str,
        words_per_minute: u32,
        out: &Path,
    ) -> Result<(), StepError> {
        // The text goes in on stdin: nothing in it can be read as an option.
        let args = [
            "-v".into(),
            "en".into(),
            "-s".into(),
            words_per_minute.to_string().into(),
            "--stdin".into(),
            "-w".into(),
            out.as_os_str().to_owned(),
        ];
        let limit = Duration::from_secs(60);
        run(&self.espeak, &args, Some(text.as_bytes()), limit)
            .await
            .map(drop)
    }

    /// The streams and duration of a media file, by ffprobe.
    pub async fn probe(&self, path: &Path) -> Result<MediaInfo, StepError> {
        require_inputs([path])?;
        let args = [
            "-v".into(),
            "error".into(),
            "-show_entries".into(),
            "stream=codec_type,codec_name,width,height:format=duration".into(),
            "-of".into(),
            "json".into(),
            path.as_os_str().to_owned(),
        ];
        let stdout = run(&self.ffprobe, &args, None, Duration::from_secs(30)).await?;
        let probed: Probed = serde_json::from_slice(&stdout).map_err(|e| {
            StepError::permanent(format!(
                "ffprobe: unreadable answer for {}: {e}",
                path.display()
            ))
        })?;
        let duration_secs = probed
            .format
            .duration
            .as_deref()
            .and_then(|d| d.parse::<f64>().ok())
            .ok_or_else(|| {
                StepError::permanent(format!("ffprobe: {} has no duration", path.display()))
            })?;
        Ok(MediaInfo {
            streams: probed.streams,
            duration_secs,
        })
    }
}

/// What ffprobe says about a media file.
#[derive(Clone, Debug, PartialEq)]
pub struct MediaInfo {
    pub streams: Vec<Stream>,
    pub duration_secs: f64,
}

impl MediaInfo {
    /// The streams of one type (`video`, `audio`).
    pub fn streams_of(&self, codec_type: &str) -> Vec<&Stream> {
        self.streams
            .iter()
            .filter(|s| s.codec_type == codec_type)
            .collect()
    }
}

/// One stream of a media file.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Stream {
    pub codec_type: String,
    #[serde(default)]
    pub codec_name: String,
    pub width: Option<u32>,
    pub height: Option<u32>,
}

#[derive(Deserialize)]
struct Probed {
    #[serde(default)]
    streams: Vec<Stream>,
    format: ProbedFormat,
}

#[derive(Deserialize)]
struct ProbedFormat {
    duration: Option<String>,
}

/// A missing input can only be fixed by redoing the step that made it: permanent.
pub(crate) fn require_inputs<'a>(
    paths: impl IntoIterator<Item = &'a Path>,
) -> Result<(), StepError> {
    for path in paths {
        if !path.is_file() {
            return Err(StepError::permanent(format!(
                "input {} is missing",
                path.display()
            )));
        }
    }
    Ok(())
}

/// Runs `program` with `args` (and `stdin`), killing it after `limit`; returns its stdout.
///
/// Not installed: permanent (retrying cannot install it). Timed out, killed by a signal
/// (a crash), or could not be started for another reason: transient. A non-zero exit is
/// permanent when the program says its input is missing or unreadable, transient
/// otherwise (a full disk, memory). Errors carry the end of stderr, on one line.
pub(crate) async fn run(
    program: &Path,
    args: &[OsString],
    stdin: Option<&[u8]>,
    limit: Duration,
) -> Result<Vec<u8>, StepError> {
    let name = program.display().to_string();
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                StepError::permanent(format!("{name} is not installed: {INSTALL_HINT}"))
            }
            _ => StepError::transient(format!("cannot start {name}: {e}")),
        })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text)
            .await
            .map_err(|e| StepError::transient(format!("{name}: cannot write its input: {e}")))?;
    }
    let output = match tokio::time::timeout(limit, child.wait_with_output()).await {
        Err(_) => {
            return Err(StepError::transient(format!(
                "{name} timed out after {} s",
                limit.as_secs()
            )));
        }
        Ok(Err(e)) => return Err(StepError::transient(format!("{name}: {e}"))),
        Ok(Ok(output)) => output,
    };
    if output.status.success() {
        return Ok(output.stdout);
    }
    let stderr = stderr_tail(&output.stderr);
    Err(match output.status.code() {
        None => StepError::transient(format!("{name} crashed ({}): {stderr}", output.status)),
        Some(code) if says_input_is_bad(&stderr) => {
            StepError::permanent(format!("{name} exited with {code}: {stderr}"))
        }
        Some(code) => StepError::transient(format!("{name} exited with {code}: {stderr}")),
    })
}

fn says_input_is_bad(stderr: &str) -> bool {
    [
        "No such file or directory",
        "Invalid data found when processing input",
        "does not contain any stream",
    ]
    .iter()
    .any(|sign| stderr.contains(sign))
}

/// The last [`STDERR_TAIL_CHARS`] characters of `stderr`, on one line.
fn stderr_tail(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let chars = line.chars().count();
    if chars <= STDERR_TAIL_CHARS {
        line
    } else {
        let tail: String = line.chars().skip(chars - STDERR_TAIL_CHARS).collect();
        format!("…{tail}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::FailureKind;

    fn sh(script: &str) -> Vec<OsString> {
        vec!["-c".into(), script.into()]
    }

    async fn run_sh(script: &str, limit: Duration) -> Result<Vec<u8>, StepError> {
        run(Path::new("sh"), &sh(script), None, limit).await
    }

    #[tokio::test]
    async fn failures_are_classified_and_carry_the_end_of_stderr() {
        let second = Duration::from_secs(5);
        assert_eq!(run_sh("printf ok", second).await, Ok(b"ok".to_vec()));

        let crash = run_sh("echo boom >&2; kill -SEGV $$", second).await;
        let crash = crash.expect_err("a crash");
        assert_eq!(crash.kind, FailureKind::Transient, "{crash:?}");
        assert!(crash.message.contains("boom"), "{crash:?}");

        let missing = run_sh(
            "echo 'in.png: No such file or directory' >&2; exit 1",
            second,
        )
        .await
        .expect_err("missing input");
        assert_eq!(missing.kind, FailureKind::Permanent, "{missing:?}");

        let full = run_sh("echo 'No space left on device' >&2; exit 1", second)
            .await
            .expect_err("disk full");
        assert_eq!(full.kind, FailureKind::Transient, "{full:?}");

        let slow = run_sh("sleep 5", Duration::from_millis(100))
            .await
            .expect_err("too slow");
        assert_eq!(slow.kind, FailureKind::Transient);
        assert!(slow.message.contains("timed out"), "{slow:?}");

        let long = run_sh("yes 0123456789 | head -c 100000 >&2; exit 3", second)
            .await
            .expect_err("exit 3");
        assert!(
            long.message.chars().count() < STDERR_TAIL_CHARS + 100,
            "{long:?}"
        );
    }

    #[tokio::test]
    async fn a_program_that_is_not_installed_is_permanent_and_says_what_to_install() {
        let absent = Path::new("/nonexistent/reel-test/ffmpeg");
        let err = run(absent, &[], None, Duration::from_secs(5))
            .await
            .expect_err("not installed");
        assert_eq!(err.kind, FailureKind::Permanent);
        assert!(err.message.contains(INSTALL_HINT), "{err:?}");

        let tools = Tools {
            ffmpeg: absent.into(),
            espeak: "/nonexistent/reel-test/espeak-ng".into(),
            ..Tools::default()
        };
        let missing = tools.check().await.expect_err("two are missing");
        assert_eq!(
            missing.missing,
            [
                "/nonexistent/reel-test/ffmpeg",
                "/nonexistent/reel-test/espeak-ng"
            ]
        );
        assert!(missing.to_string().contains(INSTALL_HINT), "{missing}");
    }
}
