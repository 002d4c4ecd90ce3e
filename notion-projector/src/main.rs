//! `notion-projector`: mirror reel task status into Notion. See `--help` and the README.

use std::process::ExitCode;

fn main() -> ExitCode {
    notion_projector::main_from(std::env::args_os())
}
