//! What `cargo xtask` (this crate's binary) and xtask's own cargo commands
//! must agree on: the environment of the workspace's compilations.

use std::process::Command;

/// Removes from `cmd` the variables `cargo run` gives the program it runs
/// (`CARGO_PKG_NAME=xtask`, `CARGO_MANIFEST_DIR`, ...), beside `CARGO`
/// (which names the cargo to use) and the library path. A cargo started
/// with them would see changed inputs where build scripts declare them
/// (ring's reruns on `CARGO_PKG_NAME` and `CARGO_MANIFEST_DIR`) and rebuild
/// ring and everything above it (rustls, tonic, the OTLP crates), which had
/// just been built: about 15 s of a clean CI run.
pub fn without_cargo_run_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(set_by_cargo_run) {
            cmd.env_remove(key);
        }
    }
}

fn set_by_cargo_run(key: &str) -> bool {
    key.starts_with("CARGO_PKG_")
        || key.starts_with("CARGO_MANIFEST_")
        || matches!(
            key,
            "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE" | "OUT_DIR"
        )
}

/// The environment of `cargo xtask test`'s compilations of the workspace's
/// own crates (the build of xtask itself, the test build and the test run),
/// so that each is compiled once; true when clippy lints them.
///
/// * **No incremental caches**, as cargo builds every dependency: the test
///   build compiles each workspace crate from scratch, and on a clean
///   checkout, as in CI, writing the caches made those compilations a third
///   slower (63 s against 42 s on 2 cores). They pay off only for small
///   edits, which `cargo test -p` and `cargo check` serve in the edit loop.
/// * **Clippy's lints as they compile**, as `cargo clippy -- -D warnings`
///   would (clippy-driver as cargo's workspace wrapper, its arguments in
///   `CLIPPY_ARGS`, which is how `cargo clippy` drives it), instead of a
///   separate `cargo clippy` whose check build shares nothing with the test
///   build: on 2 cores that second pass over every dependency cost CI about
///   90 s. Not when clippy-driver is not installed (false): then xtask runs
///   `cargo clippy` on its own.
pub fn test_build_env(cmd: &mut Command) -> bool {
    cmd.env("CARGO_INCREMENTAL", "0");
    let driver = Command::new("clippy-driver")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if driver {
        cmd.env("RUSTC_WORKSPACE_WRAPPER", "clippy-driver").env(
            "CLIPPY_ARGS",
            "-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__",
        );
    }
    driver
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_start_without_what_cargo_run_set() {
        // The test runner, like `cargo run`, sets these for this process.
        assert!(std::env::var_os("CARGO_PKG_NAME").is_some());
        assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some());
        let mut cmd = Command::new("cargo");
        without_cargo_run_env(&mut cmd);
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
