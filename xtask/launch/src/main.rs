//! `cargo xtask ARGS` (the alias in `.cargo/config.toml`): builds xtask,
//! then runs it with ARGS.
//!
//! For `cargo xtask test` (what CI runs) it builds xtask the way the test
//! build compiles the workspace (clippy's lints as the workspace wrapper, no
//! incremental caches: [`xtask_launch::test_build_env`]), so that the workspace
//! crates xtask is made of (runner-telemetry, conformance, xtask) are
//! compiled once, for both. Built by `cargo run` instead, they were compiled
//! twice on a clean checkout: about 14 s of a CI run on 2 cores. This crate
//! has no dependencies, so it costs a second to build itself.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use xtask_launch::{test_build_env, without_cargo_run_env};

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let root = repo_root();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(&cargo);
    without_cargo_run_env(&mut build);
    build
        .current_dir(&root)
        .args(["build", "--quiet", "--package", "xtask", "--bin", "xtask"]);
    if args.first().is_some_and(|a| a == "test") {
        test_build_env(&mut build);
    }
    match build.status() {
        Ok(status) if status.success() => {}
        Ok(status) => {
            eprintln!("error: building xtask failed ({status})");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("error: cannot run cargo to build xtask: {e}");
            return ExitCode::FAILURE;
        }
    }
    let xtask = target_dir(&root).join("debug").join("xtask");
    let mut run = Command::new(&xtask);
    without_cargo_run_env(&mut run);
    let error = run.args(&args).exec();
    eprintln!("error: cannot run {}: {error}", xtask.display());
    ExitCode::FAILURE
}

/// The workspace root: this crate is `xtask/launch/`.
fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .and_then(Path::parent)
        .map_or_else(|| manifest.to_path_buf(), Path::to_path_buf)
}

/// `CARGO_TARGET_DIR` (relative to the root), else `target/`.
fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from) {
        Some(dir) if dir.is_relative() => root.join(dir),
        Some(dir) => dir,
        None => root.join("target"),
    }
}
