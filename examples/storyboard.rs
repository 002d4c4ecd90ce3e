//! Run with: cargo run --example storyboard -- migrate
//! then:     cargo run --example storyboard -- submit --input '{"topic": "Rome"}'
//!           cargo run --example storyboard -- worker --until-idle
//!           cargo run --example storyboard -- signal TASK storyboard_approved --data '{"notes": "go"}'
//!           cargo run --example storyboard -- worker --until-idle
//!           cargo run --example storyboard -- replay TASK
//!
//! A film made in steps, typed end to end, with a person in the loop and a timed release:
//! - `script` decides how many scenes the film has;
//! - `scenes` has exactly that many items: its plan reads the script's output;
//! - `storyboard` waits for the signal `storyboard_approved` before anything is paid for
//!   (the task parks, holding no worker slot, until `reel signal` sends it);
//! - `render` is the paid step: one clip per scene, each written to the artifacts
//!   directory and noted in its `renders.log`;
//! - `release_window` sleeps durably until the release time (`wait_seconds` after it was
//!   first reached), and `publish` puts it together.
//!
//! Kill the worker while the task waits and start it again: nothing runs twice, and the
//! wait picks up where the log says it stood.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use engine::prelude::*;
use serde::{Deserialize, Serialize};

/// What a film task is given.
#[derive(Debug, Deserialize)]
struct Brief {
    topic: String,
    /// How long after the renders the film is released (default 2 s).
    #[serde(default = "two")]
    wait_seconds: u64,
}

fn two() -> u64 {
    2
}

#[derive(Debug, Serialize, Deserialize)]
struct Script {
    title: String,
    scenes: u32,
}

#[derive(Debug, Serialize, Deserialize)]
struct Scene {
    number: u32,
    shot: String,
}

/// What the approver sends with `storyboard_approved`.
#[derive(Debug, Serialize, Deserialize)]
struct Approval {
    #[serde(default)]
    notes: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Clip {
    scene: u32,
    path: String,
}

/// The film workflow; `artifacts` is where its clips go (`reel worker --artifacts`).
fn film(artifacts: PathBuf) -> Workflow {
    let mut film = Workflow::new("film").input::<Brief>();
    let script = film.add(
        Step::call("script", |ctx: StepContext<Brief>| async move {
            // A real script step would ask a model; the count is what matters here.
            let scenes = 2 + (ctx.input.topic.len() as u32 % 3);
            Ok(Output::of(Script {
                title: format!("{}: a short film", ctx.input.topic),
                scenes,
            })
            .with_cost_micros(2_000))
        })
        .status("writing_script", "Writing Script"),
    );
    let scenes = film.add(
        Step::fan_out(
            "scenes",
            {
                let script = script.clone();
                move |plan: &Plan<Brief>| Ok(plan.get(&script)?.scenes)
            },
            |ctx: StepContext<Brief>, number| async move {
                Ok(Output::of(Scene {
                    number,
                    shot: format!("{}, shot {number}", ctx.input.topic),
                }))
            },
        )
        .status("drawing_scenes", "Drawing Scenes")
        .concurrency(4),
    );
    let approval = film.add(
        Step::wait_for_signal::<Approval>("storyboard", "storyboard_approved")
            .status("awaiting_storyboard", "Awaiting Storyboard Approval"),
    );
    let clips = film.add(
        Step::fan_out(
            "render",
            {
                let scenes = scenes.clone();
                move |plan: &Plan| Ok(plan.get_all(&scenes)?.len() as u32)
            },
            move |ctx: StepContext, item| {
                let (scenes, approval, artifacts) =
                    (scenes.clone(), approval.clone(), artifacts.clone());
                async move {
                    let scene = ctx.get_item(&scenes, item)?;
                    let approval = ctx.get(&approval)?;
                    let dir = artifacts.join(ctx.task_id.to_string());
                    std::fs::create_dir_all(&dir)?;
                    let path = dir.join(format!("clip-{item:02}.txt"));
                    std::fs::write(&path, format!("{} ({})\n", scene.shot, approval.notes))?;
                    // One line per paid render: what a resume must never repeat.
                    let mut log = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(dir.join("renders.log"))?;
                    writeln!(log, "render {item}")?;
                    let path = path.display().to_string();
                    Ok(Output::of(Clip {
                        scene: scene.number,
                        path: path.clone(),
                    })
                    .with_artifact(path)
                    .with_cost_micros(550_000))
                }
            },
        )
        .status("rendering", "Rendering")
        .timeout(Duration::from_secs(60)),
    );
    film.add(
        Step::call("release_window", |ctx: StepContext<Brief>| async move {
            ctx.sleep("release", Duration::from_secs(ctx.input.wait_seconds))?;
            Ok(Output::of(ctx.now()))
        })
        .status("waiting_for_release", "Waiting for Release"),
    );
    film.add(
        Step::call("publish", move |ctx: StepContext| {
            let (script, clips) = (script.clone(), clips.clone());
            async move {
                let script = ctx.get(&script)?;
                let clips = ctx.get_all(&clips)?;
                Ok(Output::of(format!(
                    "{}: {} clips",
                    script.title,
                    clips.len()
                )))
            }
        })
        .status("publishing", "Publishing"),
    );
    film
}

pub(crate) fn main() -> ExitCode {
    reel::main(|settings: &reel::WorkerSettings| {
        Registry::new().register(film(settings.artifacts.clone()))
    })
}
