//! Where things are in the repository.

use std::path::PathBuf;

/// The workspace root (the folder holding `Cargo.toml`, `compose/`, ...).
pub fn repo_root() -> PathBuf {
    // `conformance/` is a direct child of the workspace root.
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// `compose/`: the stack definitions shared by the embedded and Docker stacks.
pub fn compose_dir() -> PathBuf {
    repo_root().join("compose")
}

/// The one copy of the ClickHouse schema.
pub fn sql_dir() -> PathBuf {
    compose_dir().join("sql")
}

/// The project-local Python virtual environment (ignored by git).
pub fn venv_dir() -> PathBuf {
    std::env::var_os("CI_TELEMETRY_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv"))
}

/// Cargo's target directory, where test stacks put their data.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| {
            if p.is_relative() {
                repo_root().join(p)
            } else {
                p
            }
        })
        .unwrap_or_else(|| repo_root().join("target"))
}

/// A binary of this workspace, built by `cargo xtask test|e2e|demo` (or any
/// `cargo build --workspace --bins`) before the suite runs. The suite does
/// not run cargo itself: `cargo test` holds the build lock while tests run.
/// `CONFORMANCE_<NAME>_BIN` (upper case, `-` as `_`) names another binary.
pub fn workspace_binary(name: &str) -> anyhow::Result<PathBuf> {
    let var = format!(
        "CONFORMANCE_{}_BIN",
        name.to_ascii_uppercase().replace('-', "_")
    );
    if let Some(path) = std::env::var_os(&var) {
        return Ok(PathBuf::from(path));
    }
    let profile_dir = std::env::current_exe()
        .ok()
        .and_then(|exe| {
            // target/<profile>/deps/<test-binary>
            exe.parent()?.parent().map(PathBuf::from)
        })
        .unwrap_or_else(|| target_dir().join("debug"));
    let candidate = profile_dir.join(name);
    if candidate.is_file() {
        return Ok(candidate);
    }
    let fallback = target_dir().join("debug").join(name);
    if fallback.is_file() {
        return Ok(fallback);
    }
    anyhow::bail!(
        "the `{name}` binary is not built ({} is missing): run `cargo build --workspace --bins` or `cargo xtask e2e`, or set {var}",
        candidate.display()
    )
}
