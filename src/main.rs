//! `reel`: the command line of the reel workflow engine, with the video pipeline (on the
//! providers `reel worker --providers` names: simulated by default, local or cloud) as its
//! workflow. The commands live in the library (`reel::main`), so a binary of your own gets
//! them for your workflows.

use std::process::ExitCode;

fn main() -> ExitCode {
    reel::main(reel::VideoPipeline)
}
