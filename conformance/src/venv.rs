//! The project-local Python environment that holds the stack's registry
//! packages: `chdb-core` (the ClickHouse engine) and `rotel` (the collector).
//!
//! Installed once from `compose/requirements.txt` (the pins) and, when it is
//! there, `compose/requirements-test.txt` beside it (clients the tests use);
//! a marker file holding a hash of those files makes the second call free. Concurrent callers
//! (parallel test processes) serialise on a lock file.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::paths;

/// A ready environment.
#[derive(Debug, Clone)]
pub struct Venv {
    pub dir: PathBuf,
}

impl Venv {
    pub fn python(&self) -> PathBuf {
        self.dir.join("bin").join("python")
    }

    /// The collector binary shipped inside the `rotel` wheel.
    pub fn rotel_agent(&self) -> Result<PathBuf> {
        let lib = self.dir.join("lib");
        for entry in fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))? {
            let candidate = entry?.path().join("site-packages/rotel/rotel-agent");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
        bail!(
            "the `rotel-agent` binary is missing from {}; delete that folder and run `cargo xtask stack up` again",
            self.dir.display()
        )
    }
}

/// Makes sure the environment exists and holds the pinned packages, installing
/// them when needed. `progress` receives one line per step a person would want
/// to see (the first install downloads ~200 MB).
pub fn ensure(progress: &mut dyn FnMut(&str)) -> Result<Venv> {
    let python3 = std::env::var_os("PYTHON3")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("python3"));
    ensure_at(
        &paths::venv_dir(),
        &python3,
        &paths::compose_dir().join("requirements.txt"),
        progress,
    )
}

/// [`ensure`] with every input explicit.
pub fn ensure_at(
    dir: &Path,
    python3: &Path,
    requirements: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Venv> {
    let dir = dir.to_path_buf();
    let mut pins = fs::read_to_string(requirements)
        .with_context(|| format!("reading {}", requirements.display()))?;
    let test_requirements = requirements.with_file_name("requirements-test.txt");
    let test_requirements = test_requirements.is_file().then_some(test_requirements);
    if let Some(path) = &test_requirements {
        pins.push_str(
            &fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        );
    }
    let want = format!("{:016x}\n", fnv1a(pins.as_bytes()));
    let marker = dir.join(".ci-telemetry-installed");
    let venv = Venv { dir: dir.clone() };
    if fs::read_to_string(&marker).ok().as_deref() == Some(want.as_str()) {
        return Ok(venv);
    }

    if let Some(parent) = dir.parent() {
        fs::create_dir_all(parent)?;
    }
    let _lock = FileLock::acquire(&dir.with_extension("lock"))?;
    // Another process may have finished the install while we waited.
    if fs::read_to_string(&marker).ok().as_deref() == Some(want.as_str()) {
        return Ok(venv);
    }

    check_python3(python3)?;
    if !venv.python().is_file() {
        progress(&format!(
            "Creating the Python environment in {}",
            dir.display()
        ));
        run_quiet(
            Command::new(python3).arg("-m").arg("venv").arg(&dir),
            "python3 -m venv",
            "install Python's venv module (Debian: apt-get install python3-venv) and try again",
        )?;
    }
    progress("Installing chdb-core and rotel from PyPI (first run only, ~200 MB)");
    let mut pip = Command::new(venv.python());
    pip.args([
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        // Python compiles a module the first time it is imported; compiling
        // every file of every package at install time cost 8 s of CPU.
        "--no-compile",
        "-q",
        "-r",
    ])
    .arg(requirements);
    if let Some(path) = &test_requirements {
        pip.arg("-r").arg(path);
    }
    run_quiet(
        &mut pip,
        "pip install -r compose/requirements.txt",
        "check that PyPI is reachable (a proxy may need PIP_INDEX_URL) and try again",
    )?;
    let mut f = File::create(&marker)?;
    f.write_all(want.as_bytes())?;
    Ok(venv)
}

fn check_python3(python3: &Path) -> Result<()> {
    match Command::new(python3).arg("--version").output() {
        Ok(out) if out.status.success() => Ok(()),
        _ => bail!(
            "python3 was not found (the embedded stack's ClickHouse engine, chDB, ships only for Python): install Python 3.9 or newer, or point PYTHON3 at one"
        ),
    }
}

/// Runs a setup command, turning a failure into one line of cause and what to do.
fn run_quiet(cmd: &mut Command, what: &str, remedy: &str) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("`{what}` could not be started; {remedy}"))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let cause = stderr
        .lines()
        .rev()
        .find(|l| l.contains("ERROR") || l.contains("Error") || l.contains("error"))
        .or_else(|| stderr.lines().rev().find(|l| !l.trim().is_empty()))
        .unwrap_or("no output")
        .trim();
    bail!("`{what}` failed: {cause}; {remedy}")
}

/// FNV-1a, enough to notice that the pins changed.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    })
}

/// An exclusive `flock` held until dropped.
pub(crate) struct FileLock {
    _file: File,
}

impl FileLock {
    pub(crate) fn acquire(path: &Path) -> Result<FileLock> {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening lock file {}", path.display()))?;
        // SAFETY: flock on a file descriptor we own; blocks until granted.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            bail!(
                "locking {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(FileLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::ensure_at;
    use std::path::Path;

    #[test]
    fn a_missing_python_is_one_line_with_what_to_do() {
        let dir = std::env::temp_dir().join(format!("venv-test-{}", std::process::id()));
        let requirements = dir.join("requirements.txt");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&requirements, "chdb-core==26.9.0\n").unwrap();
        let error = ensure_at(
            &dir.join("venv"),
            Path::new("/nonexistent/python3"),
            &requirements,
            &mut |_| {},
        )
        .unwrap_err();
        let message = format!("{error:#}");
        assert!(!message.contains('\n'), "one line: {message}");
        assert!(message.contains("python3 was not found"), "{message}");
        assert!(
            message.contains("install Python"),
            "says what to do: {message}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_download_is_one_line_with_what_to_do() {
        let dir = std::env::temp_dir().join(format!("venv-test-dl-{}", std::process::id()));
        let requirements = dir.join("requirements.txt");
        std::fs::create_dir_all(&dir).unwrap();
        // A package that cannot exist: pip fails the way a download does.
        std::fs::write(
            &requirements,
            "this-package-does-not-exist-ci-telemetry==0.0.0\n",
        )
        .unwrap();
        let error = ensure_at(
            &dir.join("venv"),
            Path::new("python3"),
            &requirements,
            &mut |_| {},
        )
        .unwrap_err();
        let message = format!("{error:#}");
        assert!(!message.contains('\n'), "one line: {message}");
        assert!(message.contains("pip install"), "{message}");
        assert!(message.contains("PyPI"), "says what to do: {message}");
        assert!(!message.contains("Traceback"), "{message}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
