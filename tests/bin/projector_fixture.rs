//! `reel-projector-fixture`: the `notion-projector` program (its own `main`), built in the
//! `reel` package so that this package's tests (tests/traces.rs) can run it as a process.

use std::process::ExitCode;

fn main() -> ExitCode {
    notion_projector::main_from(std::env::args_os())
}
