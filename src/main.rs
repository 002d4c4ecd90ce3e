//! `reel`: the command line of the reel workflow engine, with the video pipeline (on the
//! providers `reel worker --providers` names: simulated by default, local or cloud) as its
//! workflow. The commands live in the library (`reel::main`), so a binary of your own gets
//! them for your workflows.

use std::process::ExitCode;

use engine::Registry;

fn main() -> ExitCode {
    reel::main(|settings: &reel::WorkerSettings| {
        Registry::new().register(settings.provider_plan().video_workflow(
            &settings.artifacts,
            settings.time_scale,
            &settings.simulated_seconds,
        ))
    })
}
