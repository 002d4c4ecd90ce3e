//! `notion-projector`: mirror reel task status into Notion. See `--help` and the README.

use std::process::ExitCode;

use clap::Parser;
use notion_projector::Config;

fn main() -> ExitCode {
    let _ = dotenvy::dotenv();
    let config = Config::parse();
    config.init_logging();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(notion_projector::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
