//! `cargo xtask test` (everything CI runs) and `cargo xtask e2e`.

use std::process::Command;

use crate::build::{build_binaries, cargo, step};

use anyhow::{bail, Context, Result};
use conformance::docker::Backend;
use conformance::paths;
use xtask_launch::test_build_env;

/// Formatting, the chDB server's own tests, every Rust test (unit,
/// integration and conformance) in a build linted by clippy, then the bench
/// gate (`cargo xtask bench --gate --dev-build`: ratios and losses against
/// `xtask/bench-thresholds.toml`). Stops at the first failure.
///
/// The test build runs in the background while the Python environment and
/// the browser are installed and the chDB server's tests run: those mostly
/// wait on the network and the disk, the build on the CPU.
pub fn run_all(args: &[String]) -> Result<()> {
    let root = paths::repo_root();
    step(
        "cargo fmt --check",
        cargo().args(["fmt", "--all", "--", "--check"]),
    )?;
    let (mut build, mut tests) = (test_build(), rust_tests(&["--workspace"], args));
    // As `cargo xtask` built xtask itself, so that the workspace's crates
    // are compiled once.
    let linted = test_build_env(&mut build) && test_build_env(&mut tests);
    if !linted {
        step("cargo clippy", &mut clippy())?;
    }
    println!("==> Rust test build, in the background (clippy's lints, -D warnings: {linted})");
    let mut building = build.spawn().context("starting the Rust test build")?;
    let prepared = (|| -> Result<()> {
        let venv = conformance::venv::ensure(&mut |line| println!("  {line}"))?;
        crate::browser::ensure_chromium()?;
        step(
            "chDB HTTP server tests",
            Command::new(venv.python())
                .args(["-m", "unittest", "discover", "-s"])
                .arg(root.join("compose").join("chdb-server"))
                .arg("-v"),
        )
    })();
    let built = building.wait().context("waiting for the Rust test build")?;
    prepared?;
    if !built.success() {
        bail!("the Rust test build failed ({built}); its errors are above");
    }
    // No separate `cargo build --bins`: the test build makes every binary
    // the suite starts (each package with integration tests gets its
    // binaries built, `otel-child` included), with the features of the test
    // build; a plain build first would compile much of the workspace twice.
    step("Rust tests", &mut tests)?;
    // The gate on the debug build the tests already have: a release build of
    // the workspace would more than double CI's time. Ratios and losses are
    // what it gates, and the thresholds hold for both builds.
    println!("==> cargo xtask bench --gate --dev-build");
    crate::bench::run(&["--gate".to_string(), "--dev-build".to_string()])
}

/// What `rust_tests(&["--workspace"], ..)` builds, built only, quietly
/// (the compiler's diagnostics still show).
fn test_build() -> Command {
    let mut cmd = cargo();
    if nextest_installed() {
        cmd.args(["nextest", "run", "--no-run", "--cargo-quiet"]);
    } else {
        cmd.args(["test", "--no-run", "--quiet"]);
    }
    cmd.arg("--workspace");
    cmd
}

/// The conformance suite alone: `--stack embedded` (default) or `--stack
/// docker`; the other arguments go to the test runner.
pub fn run_e2e(args: &[String]) -> Result<()> {
    let (stack, rest) = stack_choice(args)?;
    match stack {
        Backend::Embedded => {
            conformance::venv::ensure(&mut |line| println!("  {line}"))?;
            crate::browser::ensure_chromium()?;
            build_binaries()?;
            step(
                "conformance suite",
                &mut rust_tests(&["-p", "conformance"], &rest),
            )
        }
        Backend::Docker => {
            // One line, and a failure: a Docker run that did not happen must
            // never look like one that passed.
            if let Err(e) = conformance::docker::engine_answers() {
                bail!(
                    "{}; `--stack docker` needs a Docker engine, run the embedded default instead: cargo xtask e2e",
                    one_line(&e)
                );
            }
            build_binaries()?;
            let mut tests = rust_tests(&["-p", "conformance", "--features", "docker"], &rest);
            tests.env(conformance::docker::STACK_ENV, "docker");
            step("conformance suite on the Docker stack", &mut tests)
        }
    }
}

/// `--stack NAME` out of `args`; the rest in order.
fn stack_choice(args: &[String]) -> Result<(Backend, Vec<String>)> {
    let mut stack = Backend::Embedded;
    let mut rest = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let value = match arg.strip_prefix("--stack=") {
            Some(value) => Some(value.to_string()),
            None if arg == "--stack" => Some(args.next().cloned().unwrap_or_default()),
            None => None,
        };
        match value.as_deref() {
            None => rest.push(arg.clone()),
            Some("embedded") => stack = Backend::Embedded,
            Some("docker") => stack = Backend::Docker,
            Some(other) => bail!("--stack {other:?}: expected `embedded` or `docker`"),
        }
    }
    Ok((stack, rest))
}

fn one_line(error: &anyhow::Error) -> String {
    format!("{error:#}").replace('\n', " ")
}

/// `cargo nextest run` when nextest is installed (each test in its own
/// process, so each has its own stack), `cargo test` otherwise.
fn rust_tests(selection: &[&str], extra: &[String]) -> Command {
    let mut cmd = cargo();
    if nextest_installed() {
        cmd.args(["nextest", "run", "--no-fail-fast"]);
    } else {
        cmd.args(["test", "--no-fail-fast"]);
    }
    cmd.args(selection).args(extra);
    cmd
}

fn nextest_installed() -> bool {
    Command::new("cargo")
        .args(["nextest", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `cargo clippy --workspace --all-targets -- -D warnings`.
fn clippy() -> Command {
    let mut cmd = cargo();
    cmd.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    cmd
}
