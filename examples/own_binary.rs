//! Run with: cargo run --example own_binary -- submit --channel news --input '{"topic": "Rust"}'
//! then:     cargo run --example own_binary -- worker --until-idle
//!
//! The smallest complete workflow and worker binary: two steps with their own statuses,
//! the second reading the first's outputs from the log, typed input, and the whole `reel`
//! command line (migrate, submit, worker, tasks, replay, audit, stats, approve, reject,
//! retry, cancel) for it. Uses the database `DATABASE_URL` names (run `migrate` first).

use std::process::ExitCode;

use engine::prelude::*;
use serde::Deserialize;

#[derive(Deserialize)]
struct Input {
    topic: String,
}

fn digest() -> Workflow {
    Workflow::new("digest")
        .input::<Input>()
        .step(
            Step::fan_out(
                "headlines",
                |_input| Ok(3),
                |ctx: StepContext, item| async move {
                    let input: Input = ctx.input()?;
                    ItemOutput::value(format!("{} headline {item}", input.topic))
                },
            )
            .status("collecting_headlines", "Collecting Headlines"),
        )
        .step(
            Step::call("send", |ctx: StepContext| async move {
                let headlines: Vec<String> = ctx.outputs("headlines")?;
                ItemOutput::value(headlines.join(" / "))
            })
            .status("sending", "Sending"),
        )
}

fn main() -> ExitCode {
    reel::main(Registry::new().register(digest()))
}
