//! The shell executor: bash scripts generated from the job, run in their own
//! process group so a timeout or cancel kills everything they started.
//!
//! Scripts look like what GitLab Runner's bash shell writes: job variables
//! exported (file variables as paths to files holding the value), `set -eo
//! pipefail`, and each command echoed as `$ command` before it runs.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::sync::watch;

use super::payload::Variable;
use super::trace::JobLog;
use runner_telemetry::logs::Stream;

/// A variable as the script exports it.
#[derive(Clone, PartialEq, Eq)]
pub struct ExportVar {
    pub key: String,
    /// The value, or for a file variable the path of the file holding it.
    pub value: String,
}

impl std::fmt::Debug for ExportVar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportVar")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// Quotes `s` for bash, single quotes.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Whether `key` can be a shell variable name.
pub fn is_valid_name(key: &str) -> bool {
    let mut chars = key.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Expands `$NAME` and `${NAME}` in `value` from `known` (earlier variables),
/// as GitLab Runner does for non-raw variables; unknown names expand to
/// nothing, `$$` to `$`.
pub fn expand(value: &str, known: &[ExportVar]) -> String {
    let lookup = |name: &str| {
        known
            .iter()
            .rev()
            .find(|v| v.key == name)
            .map(|v| v.value.clone())
            .unwrap_or_default()
    };
    let bytes = value.as_bytes();
    let mut out = String::with_capacity(value.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'$' {
            let ch = value[i..].chars().next().expect("in bounds");
            out.push(ch);
            i += ch.len_utf8();
            continue;
        }
        let rest = &value[i + 1..];
        if rest.starts_with('$') {
            out.push('$');
            i += 2;
        } else if let Some(inner) = rest.strip_prefix('{') {
            match inner.find('}') {
                Some(end) if is_valid_name(&inner[..end]) => {
                    out.push_str(&lookup(&inner[..end]));
                    i += 1 + 1 + end + 1;
                }
                _ => {
                    out.push('$');
                    i += 1;
                }
            }
        } else {
            let len = rest
                .bytes()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == b'_')
                .count();
            let name = &rest[..len];
            if len > 0 && is_valid_name(name) {
                out.push_str(&lookup(name));
                i += 1 + len;
            } else {
                out.push('$');
                i += 1;
            }
        }
    }
    out
}

/// Turns job variables into exports: non-raw values expanded, file
/// variables written under `tmp_dir`. Returns the exports and the keys that
/// were skipped because they are not shell names.
pub fn prepare_variables(
    variables: &[Variable],
    tmp_dir: &Path,
) -> std::io::Result<(Vec<ExportVar>, Vec<String>)> {
    let mut exports: Vec<ExportVar> = Vec::new();
    let mut skipped = Vec::new();
    for variable in variables {
        if !is_valid_name(&variable.key) {
            skipped.push(variable.key.clone());
            continue;
        }
        let value = if variable.raw {
            variable.value.clone()
        } else {
            expand(&variable.value, &exports)
        };
        let value = if variable.file {
            std::fs::create_dir_all(tmp_dir)?;
            let path = tmp_dir.join(&variable.key);
            write_private(&path, value.as_bytes())?;
            path.to_string_lossy().into_owned()
        } else {
            value
        };
        exports.push(ExportVar {
            key: variable.key.clone(),
            value,
        });
    }
    Ok((exports, skipped))
}

/// Creates (or truncates) `path` for writing; a file it creates is
/// private (0600).
pub(crate) fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    create_private(path)?.write_all(data)
}

/// How a command is shown in the log: its first line, marked when collapsed.
fn display_command(command: &str) -> String {
    let command = command.trim_end_matches('\n');
    match command.split_once('\n') {
        Some((first, _)) => format!("{first} # collapsed multi-line command"),
        None => command.to_string(),
    }
}

/// A bash script: exports, `cd` into `dir`, and the commands, each echoed
/// first in GitLab's green `$ command` form.
pub fn build_script(exports: &[ExportVar], dir: &Path, commands: &[String]) -> String {
    let mut script =
        String::from("#!/usr/bin/env bash\nexec 2>&1\nset -eo pipefail\nset +o noclobber\n");
    for var in exports {
        script.push_str(&format!("export {}={}\n", var.key, shell_quote(&var.value)));
    }
    script.push_str(&format!("cd -- {}\n", shell_quote(&dir.to_string_lossy())));
    for command in commands {
        script.push_str(&format!(
            "printf '\\033[32;1m%s\\033[0;m\\n' {}\n",
            shell_quote(&format!("$ {}", display_command(command)))
        ));
        script.push_str(command);
        script.push('\n');
    }
    script
}

/// How a script ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScriptResult {
    Exited(i32),
    TimedOut,
    /// Stopped on request (cancel or abort).
    Stopped,
    /// Could not be started.
    SpawnFailed(String),
}

/// Kills a process group when dropped, unless disarmed.
struct GroupKiller {
    pgid: Option<i32>,
}

impl GroupKiller {
    fn kill(&mut self) {
        if let Some(pgid) = self.pgid {
            // SAFETY: kill(2) with a negative pid signals the process group we
            // created; it has no memory-safety preconditions.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether an environment variable of the runner's process is the runner's
/// own setting, kept from jobs: its telemetry settings and credentials
/// (`OTEL_*`, `CI_TELEMETRY_*`, `GITLAB_TRACING`), its own flags
/// (`CI_RUNNER_*`), and a trace context of its own (`TRACEPARENT`,
/// `TRACESTATE`: a job gets that of its `step_script` span instead). A job's
/// own variables of these names still reach it (they are exported by its
/// script).
pub fn is_runner_setting(name: &str) -> bool {
    ["OTEL_", "CI_TELEMETRY_", "CI_RUNNER_"]
        .iter()
        .any(|prefix| name.starts_with(prefix))
        || ["GITLAB_TRACING", "TRACEPARENT", "TRACESTATE", "BAGGAGE"].contains(&name)
}

/// Runs `script` (written to `path`) with bash in `cwd`, streaming its output
/// to `log`, until it exits, `deadline` passes, or `stop` turns true. Leftover
/// processes of its group are killed when it ends.
pub async fn run_script(
    path: &Path,
    script: &str,
    cwd: &Path,
    deadline: tokio::time::Instant,
    log: &JobLog,
    stop: &mut watch::Receiver<bool>,
) -> ScriptResult {
    if let Err(e) = write_private(path, script.as_bytes()) {
        return ScriptResult::SpawnFailed(format!("cannot write the script: {e}"));
    }
    let mut command = tokio::process::Command::new("bash");
    command
        .arg("--noprofile")
        .arg("--norc")
        .arg(path)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(is_runner_setting) {
            command.env_remove(&name);
        }
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => return ScriptResult::SpawnFailed(format!("cannot start bash: {e}")),
    };
    let mut killer = GroupKiller {
        pgid: child.id().map(|id| id as i32),
    };
    let readers: Vec<_> = [
        child.stdout.take().map(|s| {
            (
                Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                Stream::Stdout,
            )
        }),
        child.stderr.take().map(|s| {
            (
                Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                Stream::Stderr,
            )
        }),
    ]
    .into_iter()
    .flatten()
    .map(|(mut pipe, stream)| {
        let log = log.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            loop {
                match pipe.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => log.write_stream(&buf[..n], stream),
                }
            }
        })
    })
    .collect();

    let result = tokio::select! {
        status = child.wait() => match status {
            Ok(status) => ScriptResult::Exited(
                status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
            ),
            Err(e) => ScriptResult::SpawnFailed(format!("waiting for bash failed: {e}")),
        },
        _ = tokio::time::sleep_until(deadline) => ScriptResult::TimedOut,
        _ = stop.wait_for(|stop| *stop) => ScriptResult::Stopped,
    };
    // Whatever is left of the group goes: background jobs, or everything on
    // timeout and stop.
    killer.kill();
    killer.pgid = None;
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    for reader in readers {
        // A grandchild that left the group may hold the pipe open.
        if tokio::time::timeout(Duration::from_secs(2), reader)
            .await
            .is_err()
        {
            tracing::debug!("Output reader did not finish after the script ended");
        }
    }
    result
}

/// The build directory of a project in a slot: `<builds_dir>/<slot>/<project
/// path>`, with the project path sanitised (no `..`, no absolute
/// components).
pub fn build_dir(builds_dir: &Path, slot: usize, project_path: &str) -> PathBuf {
    let mut dir = builds_dir.join(slot.to_string());
    let mut any = false;
    for part in project_path.split('/') {
        if part.is_empty() || part == "." || part == ".." {
            continue;
        }
        let clean: String = part
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        dir.push(clean);
        any = true;
    }
    if !any {
        dir.push("project");
    }
    dir
}

#[cfg(test)]
mod tests {
    use super::*;

    fn var(key: &str, value: &str) -> ExportVar {
        ExportVar {
            key: key.into(),
            value: value.into(),
        }
    }

    #[test]
    fn expansion() {
        let known = [var("A", "1"), var("B_2", "two")];
        let check =
            |input: &str, expected: &str| assert_eq!(expand(input, &known), expected, "{input}");
        check("plain", "plain");
        check("$A", "1");
        check("x${B_2}y", "xtwoy");
        check("$A$B_2", "1two");
        check("$UNKNOWN!", "!");
        check("$$A", "$A");
        check("cost: 5$", "cost: 5$");
        check("${not closed", "${not closed");
        check("é$A", "é1");
    }

    #[test]
    fn quoting_and_names() {
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert!(is_valid_name("CI_JOB_ID"));
        assert!(is_valid_name("_x1"));
        assert!(!is_valid_name("1A"));
        assert!(!is_valid_name("A-B"));
        assert!(!is_valid_name(""));
    }

    #[test]
    fn build_dirs() {
        let root = Path::new("/b");
        assert_eq!(
            build_dir(root, 0, "group/proj"),
            Path::new("/b/0/group/proj")
        );
        assert_eq!(build_dir(root, 2, "../../etc"), Path::new("/b/2/etc"));
        assert_eq!(build_dir(root, 0, ""), Path::new("/b/0/project"));
        assert_eq!(build_dir(root, 1, "g/we ird"), Path::new("/b/1/g/we_ird"));
    }

    #[test]
    fn scripts_echo_commands() {
        let script = build_script(
            &[var("A", "it's")],
            Path::new("/tmp/x"),
            &["echo hi".into(), "if true; then\n  echo multi\nfi".into()],
        );
        assert!(script.contains("export A='it'\\''s'\n"), "{script}");
        assert!(script.contains("set -eo pipefail"));
        assert!(script.contains("'$ echo hi'"));
        assert!(script.contains("'$ if true; then # collapsed multi-line command'"));
    }
}
