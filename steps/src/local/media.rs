//! The moving pictures and the sound, made by ffmpeg and espeak-ng: a clip per composite
//! (a slow zoom towards its asset), speech and a sound bed per clip, and the assembly.
//! Encoding is kept cheap (x264 `ultrafast`, 15 fps): the pipeline runs on a laptop.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use engine::StepError;

use super::pictures::{FRAME, tile_centre};
use super::tools::{Tools, require_inputs};

/// Every clip's length and frame rate: 18 clips make a 72-second video.
pub const CLIP_SECONDS: u32 = 4;
pub const CLIP_FPS: u32 = 15;

/// How far a clip zooms in (the view ends at 1/1.9 of the board's width).
const ZOOM: f64 = 0.9;
/// The speaking rate narration starts at, and the fastest it is pushed to fit its clip.
const WORDS_PER_MINUTE: u32 = 160;
const FASTEST_WORDS_PER_MINUTE: u32 = 320;
/// Narration and sound mix at the same rate, in mono.
const SAMPLE_RATE: u32 = 44_100;

/// A command line, built from fixed words and values (paths, filter graphs) that go in
/// whole, whatever they contain.
#[derive(Debug, Default)]
struct Line(Vec<OsString>);

impl Line {
    /// Appends each whitespace-separated word of `words`.
    fn words(mut self, words: &str) -> Self {
        self.0.extend(words.split_whitespace().map(OsString::from));
        self
    }

    /// Appends `value` as one argument.
    fn value(mut self, value: impl Into<OsString>) -> Self {
        self.0.push(value.into());
        self
    }
}

/// Clip `item`: the board, zooming in over [`CLIP_SECONDS`] towards asset `item`'s tile
/// (eased, so it starts and stops gently), as H.264.
pub(crate) async fn clip(
    tools: &Tools,
    composite: &Path,
    item: u32,
    out: &Path,
) -> Result<(), StepError> {
    require_inputs([composite])?;
    let frames = CLIP_SECONDS * CLIP_FPS;
    let (cx, cy) = tile_centre(item);
    let (width, height) = FRAME;
    // zoompan: `on` is the output frame number; x/y are the view's top-left corner, kept
    // inside the board, so the view starts as the whole board and ends on the tile.
    let zoom = format!(
        "zoompan=z='1+{ZOOM}*(1-cos(PI*on/{last}))/2'\
         :x='max(0,min(iw-iw/zoom,{cx}-iw/zoom/2))'\
         :y='max(0,min(ih-ih/zoom,{cy}-ih/zoom/2))'\
         :d={frames}:s={width}x{height}:fps={CLIP_FPS},format=yuv420p",
        last = frames - 1,
    );
    let line = Line::default()
        .words("-i")
        .value(composite)
        .words("-vf")
        .value(zoom)
        .words(&format!(
            "-frames:v {frames} -c:v libx264 -preset ultrafast -crf 28 -r {CLIP_FPS} \
             -movflags +faststart -an"
        ))
        .value(out);
    tools.ffmpeg(&line.0, Duration::from_secs(120)).await
}

/// Speaks `line` into `out`, faster when it would not fit within `seconds`; returns the
/// speech's length in seconds.
pub(crate) async fn narration(
    tools: &Tools,
    line: &str,
    seconds: f64,
    out: &Path,
) -> Result<f64, StepError> {
    tools.speak(line, WORDS_PER_MINUTE, out).await?;
    let spoken = tools.probe(out).await?.duration_secs;
    if spoken <= seconds {
        return Ok(spoken);
    }
    let faster = (f64::from(WORDS_PER_MINUTE) * spoken / seconds * 1.05).ceil() as u32;
    tools
        .speak(line, faster.min(FASTEST_WORDS_PER_MINUTE), out)
        .await?;
    Ok(tools.probe(out).await?.duration_secs)
}

/// A sound bed of `seconds` for clip `item`: brown noise (seeded by the item) under a
/// slow-pulsing tone from a pentatonic scale, faded in and out.
pub(crate) async fn sound_bed(
    tools: &Tools,
    item: u32,
    seconds: f64,
    out: &Path,
) -> Result<(), StepError> {
    const SCALE: [f64; 5] = [196.0, 220.0, 261.63, 293.66, 329.63];
    let tone = SCALE[item as usize % SCALE.len()] * if item.is_multiple_of(2) { 1.0 } else { 0.5 };
    let pulse = 1.5 + f64::from(item % 4) * 0.75;
    let noise = format!("anoisesrc=d={seconds}:c=brown:r={SAMPLE_RATE}:a=0.3:seed={item}");
    let sine = format!("sine=f={tone}:d={seconds}:r={SAMPLE_RATE}");
    let fade_out = (seconds - 0.6).max(0.0);
    let mix = format!(
        "[1]volume=0.25,tremolo=f={pulse}:d=0.7[tone];\
         [0][tone]amix=inputs=2:duration=first:normalize=0,\
         afade=t=in:d=0.4,afade=t=out:st={fade_out}:d=0.6"
    );
    let line = Line::default()
        .words("-f lavfi -i")
        .value(noise)
        .words("-f lavfi -i")
        .value(sine)
        .words("-filter_complex")
        .value(mix)
        .words("-ac 1 -c:a pcm_s16le")
        .value(out);
    tools.ffmpeg(&line.0, Duration::from_secs(60)).await
}

/// One clip's pieces for the assembly.
#[derive(Clone, Debug)]
pub(crate) struct Scene {
    pub(crate) clip: PathBuf,
    pub(crate) narration: PathBuf,
    pub(crate) sfx: PathBuf,
    pub(crate) seconds: f64,
}

/// The final video: the clips in order (copied, not re-encoded), over an audio track
/// where each clip's narration is mixed with its sound bed, padded or cut to the clip's
/// length — so the video lasts exactly as long as its clips together.
pub(crate) async fn assemble(
    tools: &Tools,
    scenes: &[Scene],
    work_dir: &Path,
    out: &Path,
) -> Result<(), StepError> {
    require_inputs(
        scenes
            .iter()
            .flat_map(|s| [s.clip.as_path(), s.narration.as_path(), s.sfx.as_path()]),
    )?;
    let list = work_dir.join("clips.txt");
    let mut listing = String::new();
    for scene in scenes {
        let path = std::path::absolute(&scene.clip)
            .map_err(|e| StepError::transient(format!("{}: {e}", scene.clip.display())))?;
        listing.push_str(&format!("file '{}'\n", concat_quoted(&path)));
    }
    tokio::fs::write(&list, listing)
        .await
        .map_err(|e| StepError::transient(format!("cannot write {}: {e}", list.display())))?;

    let mut line = Line::default().words("-f concat -safe 0 -i").value(&list);
    let mut graph = String::new();
    for (n, scene) in scenes.iter().enumerate() {
        line = line
            .words("-i")
            .value(&scene.narration)
            .words("-i")
            .value(&scene.sfx);
        let (voice, bed, seconds) = (1 + 2 * n, 2 + 2 * n, scene.seconds);
        let fit = format!("aformat=sample_rates={SAMPLE_RATE}:channel_layouts=mono");
        graph.push_str(&format!(
            "[{voice}:a]{fit},apad,atrim=0:{seconds}[v{n}];\
             [{bed}:a]{fit},volume=0.4,apad,atrim=0:{seconds}[b{n}];\
             [v{n}][b{n}]amix=inputs=2:duration=first:normalize=0[m{n}];"
        ));
    }
    for n in 0..scenes.len() {
        graph.push_str(&format!("[m{n}]"));
    }
    graph.push_str(&format!("concat=n={}:v=0:a=1[audio]", scenes.len()));
    let line = line
        .words("-filter_complex")
        .value(graph)
        .words("-map 0:v -map [audio] -c:v copy -c:a aac -b:a 96k -movflags +faststart")
        .value(out);
    let made = tools.ffmpeg(&line.0, Duration::from_secs(300)).await;
    let _ = tokio::fs::remove_file(&list).await;
    made
}

/// A path inside single quotes in an ffmpeg concat list (`'` written as `'\''`).
fn concat_quoted(path: &Path) -> String {
    path.display().to_string().replace('\'', r"'\''")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concat_lists_quote_paths_with_quotes() {
        assert_eq!(concat_quoted(Path::new("/a/it's.mp4")), r"/a/it'\''s.mp4");
    }
}
