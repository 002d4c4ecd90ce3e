//! `reel`: the command line of the reel workflow engine, with the video pipeline (on the
//! simulated providers) as its workflow. The commands live in the library (`reel::main`),
//! so a binary of your own gets them for your workflows.

use std::process::ExitCode;

use engine::Registry;

fn main() -> ExitCode {
    reel::main(|settings: &reel::WorkerSettings| {
        Registry::new().register(steps::video_workflow(
            &steps::PipelineConfig {
                artifacts_root: settings.artifacts.clone(),
                time_scale: settings.time_scale,
            },
            steps::simulated::providers_with(settings.time_scale, &settings.simulated_seconds),
        ))
    })
}
