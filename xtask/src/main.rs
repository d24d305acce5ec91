//! `cargo xtask`: the project's own commands.
//!
//! - `cargo xtask demo`           the main demo (stack + fake-rails + runner)
//! - `cargo xtask test`           every check and test CI runs
//! - `cargo xtask e2e [--stack embedded|docker]`  the conformance suite only
//! - `cargo xtask bench [--gate]` every performance goal side by side (`--gate`:
//!   ratios and losses against thresholds)
//! - `cargo xtask bench ingest`   landed spans/s, engine ceiling, 5x overload
//! - `cargo xtask bench logs`     job log export, 1M lines, on vs off
//! - `cargo xtask bench-scaling`  the figures docs/scaling.md sizes from
//! - `cargo xtask stack up|down|status [--dir DIR]`
//! - `cargo xtask cluster-schema [--cluster NAME]`  the schema for a cluster

mod bench;
mod bench_ingest;
mod browser;
mod build;
mod cluster;
mod cpu_split;
mod demo;
#[cfg(test)]
mod imports;
mod scaling;
mod stack;
mod test;

use std::process::ExitCode;

const USAGE: &str = "\
Usage: cargo xtask <command>

Commands:
  demo [--contract v1|v2]       run the demo: stack, fake-rails, runner, traces
  test                          run every check and test (what CI runs)
  e2e [--stack embedded|docker] run the conformance suite against a real stack:
                                the embedded one (default) or Docker's (official images)
  bench [--gate|--short]        measure every performance goal side by side
                                (release build); --gate: short profile, fail
                                on a ratio or loss over xtask/bench-thresholds.toml
  bench ingest [--no-ceiling] [--no-overload]
                                landed spans/s vs the engine's ceiling, and a 5x overload
  bench logs [--dev-build]      only the job log export scenario (1M lines, release build)
  bench-scaling                 measure the inputs of docs/scaling.md on this machine
  stack up|down|status [--dir DIR]
                                control the embedded stack (default target/stack)
  cluster-schema [--cluster NAME]
                                print compose/sql for a sharded, replicated cluster
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("stack") => stack::run(&args[1..]),
        Some("demo") => demo::run(&args[1..]),
        Some("bench") => bench::run(&args[1..]),
        // The bench's instrumented peer (one export pipeline per process).
        Some("bench-peer") => bench::peer::run(&args[1..]),
        Some("test") => test::run_all(&args[1..]),
        Some("e2e") => test::run_e2e(&args[1..]),
        Some("cluster-schema") => cluster::run(&args[1..]),
        Some("bench-scaling") => scaling::run(&args[1..]),
        Some("-h" | "--help" | "help") | None => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some(other) => Err(anyhow::anyhow!("unknown command `{other}`\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
