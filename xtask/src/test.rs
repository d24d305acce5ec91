//! `cargo xtask test` (everything CI runs) and `cargo xtask e2e`.

use std::process::Command;

use anyhow::{bail, Context, Result};
use conformance::paths;

/// Formatting, lints, the chDB server's own tests, every Rust test (unit,
/// integration and conformance), then the bench gate (`cargo xtask bench
/// --gate`: ratios and losses against `xtask/bench-thresholds.toml`). Stops
/// at the first failure.
pub fn run_all(args: &[String]) -> Result<()> {
    let root = paths::repo_root();
    step(
        "cargo fmt --check",
        cargo().args(["fmt", "--all", "--", "--check"]),
    )?;
    step(
        "cargo clippy",
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    let venv = conformance::venv::ensure(&mut |line| println!("  {line}"))?;
    build_binaries()?;
    step(
        "chDB HTTP server tests",
        Command::new(venv.python())
            .args(["-m", "unittest", "discover", "-s"])
            .arg(root.join("compose").join("chdb-server"))
            .arg("-v"),
    )?;
    step("Rust tests", &mut rust_tests(&["--workspace"], args))?;
    println!("==> cargo xtask bench --gate");
    crate::bench::run(&["--gate".to_string()])
}

/// The conformance suite alone.
pub fn run_e2e(args: &[String]) -> Result<()> {
    conformance::venv::ensure(&mut |line| println!("  {line}"))?;
    build_binaries()?;
    step(
        "conformance suite",
        &mut rust_tests(&["-p", "conformance"], args),
    )
}

/// `cargo nextest run` when nextest is installed (each test in its own
/// process, so each has its own stack), `cargo test` otherwise.
fn rust_tests(selection: &[&str], extra: &[String]) -> Command {
    let nextest = Command::new("cargo")
        .args(["nextest", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    let mut cmd = cargo();
    if nextest {
        cmd.args(["nextest", "run", "--no-fail-fast"]);
    } else {
        cmd.args(["test", "--no-fail-fast"]);
    }
    cmd.args(selection).args(extra);
    cmd
}

/// The suite starts fake-rails and the runner as processes: build them first.
pub fn build_binaries() -> Result<()> {
    step(
        "cargo build --workspace --bins",
        cargo().args(["build", "--workspace", "--bins"]),
    )
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(paths::repo_root());
    cmd
}

fn step(name: &str, cmd: &mut Command) -> Result<()> {
    println!("==> {name}");
    let status = cmd.status().with_context(|| format!("starting {name}"))?;
    if !status.success() {
        bail!("{name} failed ({status})");
    }
    Ok(())
}
