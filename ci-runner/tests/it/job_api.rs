//! Pieces of the in-test job API (GitLab's runner endpoints) and fixtures
//! shared by the tests that drive the real `ci-runner` binary.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

pub const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
pub const PARENT: &str = "00f067aa0ba902b7";
pub const RUNNER_TOKEN: &str = "glrt-runner-token-SECRET";

/// Serves `app` on a free local port; returns its address.
pub async fn serve(app: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

/// The answer to a successful `POST /runners/verify`.
pub fn verified() -> Response {
    (
        StatusCode::OK,
        Json(json!({"id": 99, "token": RUNNER_TOKEN})),
    )
        .into_response()
}

/// The `JOB-TOKEN` header, when present and text.
pub fn job_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get("JOB-TOKEN")
        .and_then(|v| v.to_str().ok())
        .map(String::from)
}

/// Where a `Content-Range` (`start-end`) starts; `usize::MAX` when it does
/// not parse.
pub fn range_start(range: &str) -> usize {
    range
        .split('-')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(usize::MAX)
}

/// 416 with the size the trace has.
pub fn range_not_satisfiable(size: usize) -> Response {
    (
        StatusCode::RANGE_NOT_SATISFIABLE,
        [("Range", format!("0-{size}"))],
    )
        .into_response()
}

/// The trace received for `job`, as text.
pub fn trace_text(traces: &HashMap<i64, Vec<u8>>, job: i64) -> String {
    String::from_utf8_lossy(traces.get(&job).map(Vec::as_slice).unwrap_or_default()).into_owned()
}

/// `ci-runner run` against the job API at `api`, with quiet stdio but a
/// piped stderr, `HOME` at `home`, and no `OTEL_*`, `GITLAB_TRACING` or
/// `CI_RUNNER_LOG` from the test's environment.
pub fn runner_command(
    api: SocketAddr,
    builds_dir: &Path,
    home: &Path,
    max_jobs: usize,
    check_interval_ms: u64,
) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ci-runner"));
    command
        .arg("run")
        .args(["--url", &format!("http://{api}")])
        .args(["--token", RUNNER_TOKEN])
        .args(["--builds-dir", &builds_dir.to_string_lossy()])
        .args(["--max-jobs", &max_jobs.to_string()])
        .args(["--check-interval", &check_interval_ms.to_string()])
        .env("HOME", home)
        .env_remove("CI_RUNNER_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (key, _) in std::env::vars() {
        if key.starts_with("OTEL_") || key == "GITLAB_TRACING" {
            command.env_remove(key);
        }
    }
    command
}

/// Runs `git args` in `dir`, checks that it succeeded; returns its trimmed
/// stdout.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// `git commit -q` in `dir` with `args` (such as `-m one`), as a test user.
pub fn git_commit(dir: &Path, args: &[&str]) {
    let mut all = vec![
        "-c",
        "user.email=t@example.com",
        "-c",
        "user.name=t",
        "commit",
        "-q",
    ];
    all.extend_from_slice(args);
    git(dir, &all);
}

/// A git repository with `files` committed on `main`; returns the commit.
pub fn git_repo(dir: &Path, files: &[(&str, &str)]) -> String {
    std::fs::create_dir_all(dir).unwrap();
    git(dir, &["init", "-q", "-b", "main"]);
    for (name, content) in files {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }
    git(dir, &["add", "."]);
    git_commit(dir, &["-m", "one"]);
    git(dir, &["rev-parse", "HEAD"])
}
