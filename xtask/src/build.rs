//! Running cargo from xtask: the workspace's binaries, each step announced
//! and its failure named. Below every command module (`test`, `demo`,
//! `bench`).

use std::process::Command;

use anyhow::{bail, Context, Result};
use conformance::paths;

/// The suite starts fake-rails and the runner as processes: build them first.
pub fn build_binaries() -> Result<()> {
    step(
        "cargo build --workspace --bins",
        cargo().args(["build", "--workspace", "--bins"]),
    )
}

/// Cargo, in the repository, without what `cargo run` set for xtask
/// ([`xtask_launch::without_cargo_run_env`]).
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(paths::repo_root());
    xtask_launch::without_cargo_run_env(&mut cmd);
    cmd
}

pub fn step(name: &str, cmd: &mut Command) -> Result<()> {
    println!("==> {name}");
    let status = cmd.status().with_context(|| format!("starting {name}"))?;
    if !status.success() {
        bail!("{name} failed ({status})");
    }
    Ok(())
}
