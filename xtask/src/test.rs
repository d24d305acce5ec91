//! `cargo xtask test` (everything CI runs) and `cargo xtask e2e`.

use std::process::Command;

use anyhow::{bail, Context, Result};
use conformance::docker::Backend;
use conformance::paths;

/// Formatting, the chDB server's own tests, every Rust test (unit,
/// integration and conformance) in a build linted by clippy, then the bench gate (`cargo xtask bench
/// --gate --dev-build`: ratios and losses against `xtask/bench-thresholds.toml`). Stops
/// at the first failure.
pub fn run_all(args: &[String]) -> Result<()> {
    let root = paths::repo_root();
    step(
        "cargo fmt --check",
        cargo().args(["fmt", "--all", "--", "--check"]),
    )?;
    let venv = conformance::venv::ensure(&mut |line| println!("  {line}"))?;
    crate::browser::ensure_chromium()?;
    // No separate `cargo build --bins`: the test build makes every binary
    // the suite starts (each package with integration tests gets its
    // binaries built, `otel-child` included), with the features of the test
    // build; a plain build first would compile much of the workspace twice.
    step(
        "chDB HTTP server tests",
        Command::new(venv.python())
            .args(["-m", "unittest", "discover", "-s"])
            .arg(root.join("compose").join("chdb-server"))
            .arg("-v"),
    )?;
    let mut tests = rust_tests(&["--workspace"], args);
    if lint_while_building(&mut tests) {
        step(
            "Rust tests (built with clippy's lints, -D warnings)",
            &mut tests,
        )?;
    } else {
        step("cargo clippy", &mut clippy())?;
        step("Rust tests", &mut tests)?;
    }
    // The gate on the debug build the tests already have: a release build of
    // the workspace would more than double CI's time. Ratios and losses are
    // what it gates, and the thresholds hold for both builds.
    println!("==> cargo xtask bench --gate --dev-build");
    crate::bench::run(&["--gate".to_string(), "--dev-build".to_string()])
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

/// Makes the test build run clippy's lints as it compiles the workspace's
/// own crates, as `cargo clippy -- -D warnings` would (clippy-driver as
/// cargo's workspace wrapper, its arguments in `CLIPPY_ARGS`, which is how
/// `cargo clippy` drives it), instead of a separate `cargo clippy` whose
/// check build shares nothing with the test build: on 2 cores that second
/// pass over every dependency cost CI about 90 s. The test build covers the
/// targets `--all-targets` does (every library, binary and integration test,
/// in and out of `cfg(test)`; the workspace has no benches or examples).
/// False when clippy-driver is not installed: then clippy runs on its own.
fn lint_while_building(tests: &mut Command) -> bool {
    let driver = Command::new("clippy-driver")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if driver {
        tests.env("RUSTC_WORKSPACE_WRAPPER", "clippy-driver").env(
            "CLIPPY_ARGS",
            "-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__",
        );
    }
    driver
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
