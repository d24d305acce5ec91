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

/// Cargo, in the repository, with the environment `cargo xtask` was given.
///
/// `cargo run` gives xtask's process the variables it gives a crate's
/// build (`CARGO_PKG_NAME=xtask`, `CARGO_MANIFEST_DIR`, ...). A cargo started
/// with them would see changed inputs where build scripts declare them
/// (ring's reruns on `CARGO_PKG_NAME` and `CARGO_MANIFEST_DIR`) and rebuild
/// ring and everything above it (rustls, tonic, the OTLP crates), which
/// `cargo xtask` had just built: about 15 s of a clean CI run.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(paths::repo_root());
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(set_by_cargo_run) {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// What `cargo run` sets for the program it runs, beside `CARGO` (which
/// names the cargo to use) and the library path.
fn set_by_cargo_run(key: &str) -> bool {
    key.starts_with("CARGO_PKG_")
        || key.starts_with("CARGO_MANIFEST_")
        || matches!(
            key,
            "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE" | "OUT_DIR"
        )
}

pub fn step(name: &str, cmd: &mut Command) -> Result<()> {
    println!("==> {name}");
    let status = cmd.status().with_context(|| format!("starting {name}"))?;
    if !status.success() {
        bail!("{name} failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cargo_starts_without_what_cargo_run_set() {
        // The test runner, like `cargo run`, sets these for this process.
        assert!(std::env::var_os("CARGO_PKG_NAME").is_some());
        assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some());
        let cmd = cargo();
        let removed: Vec<_> = cmd
            .get_envs()
            .filter(|(_, value)| value.is_none())
            .filter_map(|(key, _)| key.to_str())
            .collect();
        assert!(removed.contains(&"CARGO_PKG_NAME"), "{removed:?}");
        assert!(removed.contains(&"CARGO_MANIFEST_DIR"), "{removed:?}");
        assert!(!removed.contains(&"CARGO"), "{removed:?}");
    }
}
