//! The storyboard example's own binary (examples/storyboard.rs), built in this package so
//! that tests/waits.rs can run it as a user would.

#[path = "../../examples/storyboard.rs"]
mod example;

fn main() -> std::process::ExitCode {
    example::main()
}
