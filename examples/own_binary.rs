//! Run with: cargo run --example own_binary -- submit --channel news --input '{"topic": "Rust"}'
//! then:     cargo run --example own_binary -- worker --until-idle
//!
//! The smallest complete workflow and worker binary: two steps with their own statuses,
//! the second reading the first's outputs from the log through a typed handle, typed
//! input, and the whole `reel` command line (migrate, submit, worker, tasks, replay, audit,
//! stats, signal, approve, reject, retry, cancel) for it. Uses the database `DATABASE_URL` names (run `migrate` first).

use std::process::ExitCode;

use engine::prelude::*;
use serde::Deserialize;

#[derive(Deserialize)]
struct Input {
    topic: String,
}

fn digest() -> Workflow {
    let mut digest = Workflow::new("digest").input::<Input>(); // `submit` checks the input
    let headlines = digest.add(
        Step::fan_out(
            "headlines",
            |_plan: &Plan<Input>| Ok(3),
            |ctx: StepContext<Input>, item| async move {
                Ok(Output::of(format!("{} headline {item}", ctx.input.topic)))
            },
        )
        .status("collecting_headlines", "Collecting Headlines"),
    );
    digest.add(
        Step::call("send", move |ctx: StepContext| {
            let headlines = headlines.clone();
            async move {
                let headlines: Vec<String> = ctx.get_all(&headlines)?; // from the log
                Ok(Output::of(headlines.join(" / ")))
            }
        })
        .status("sending", "Sending"),
    );
    digest
}

fn main() -> ExitCode {
    reel::main(Registry::new().register(digest()))
}
