//! The one in-test job API (GitLab's runner endpoints, scriptable to fail)
//! and the fixtures shared by the tests that drive the real `ci-runner`
//! binary.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{patch, post, put};
use axum::Json;
use serde_json::{json, Value};

pub const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
pub const PARENT: &str = "00f067aa0ba902b7";
pub const RUNNER_TOKEN: &str = "glrt-runner-token-SECRET";
/// How long a hanging trace PATCH hangs: far longer than any test waits.
const HANG: Duration = Duration::from_secs(120);

/// A job payload as the job API hands it out: `id`, its job token, the job
/// info (`queued` seconds in the queue), a `script` and an `after_script`
/// step, and `variables`. Each suite adds its own fields (features, trace
/// context) with [`set`].
pub fn job_payload(
    id: i64,
    script: &[&str],
    after: &[&str],
    queued: f64,
    variables: Value,
) -> Value {
    json!({
        "id": id,
        "token": format!("job-token-{id}-SECRET"),
        "job_info": {"name": format!("job-{id}"), "stage": "test", "pipeline_id": 500 + id,
                      "project_id": 3, "project_name": "demo", "project_full_path": "group/demo",
                      "time_in_queue_seconds": queued},
        "git_info": {"repo_url": "", "ref": "main", "sha": "", "ref_type": "branch", "depth": 0},
        "runner_info": {"timeout": 60},
        "variables": variables,
        "steps": [
            {"name": "script", "script": script, "timeout": 60, "when": "on_success", "allow_failure": false},
            {"name": "after_script", "script": after, "timeout": 60, "when": "always", "allow_failure": false}
        ],
        "artifacts": [], "cache": [],
    })
}

/// `value` with `key` set to `field`.
pub fn set(mut value: Value, key: &str, field: Value) -> Value {
    value[key] = field;
    value
}

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

/// An uploaded artifact: query parameters, file name, bytes, `JOB-TOKEN`.
#[derive(Debug, Clone)]
pub struct Upload {
    pub params: HashMap<String, String>,
    pub file_name: String,
    pub data: Vec<u8>,
    pub token: Option<String>,
}

/// What the job API received, and how it is scripted to fail.
#[derive(Default)]
pub struct ApiState {
    pub verify_status: u16,
    pub jobs: VecDeque<Value>,
    pub job_tokens: HashMap<i64, String>,
    /// When each job was handed out.
    pub handed_out: HashMap<i64, Instant>,
    pub requests: Vec<Value>,
    pub verifies: Vec<Value>,
    /// (job id, body, JOB-TOKEN header, arrival)
    pub updates: Vec<(i64, Value, Option<String>, Instant)>,
    pub traces: HashMap<i64, Vec<u8>>,
    /// Artifacts uploaded, per job.
    pub uploads: HashMap<i64, Vec<Upload>>,
    /// (job id, Content-Range, status answered)
    pub patches: Vec<(i64, String, u16)>,
    /// Jobs whose first PATCH is stored but answered 500 (to force a resync).
    pub fail_first_patch: Vec<i64>,
    /// Status updates answered 503 with `Retry-After: 0` before one is
    /// accepted.
    pub throttle_updates: usize,
    /// Answer every status update with this (a GitLab that never accepts).
    pub refuse_updates_with: Option<u16>,
    /// Jobs whose first trace PATCH hangs (far longer than a test lasts).
    pub hang_first_patch: Vec<i64>,
    /// PATCH requests hanging right now.
    pub hanging: usize,
}

/// The fake job API: `/runners/verify`, `/jobs/request`, `/jobs/{id}`,
/// `/jobs/{id}/trace` and `/jobs/{id}/artifacts`, as GitLab answers them.
#[derive(Clone)]
pub struct Api(Arc<Mutex<ApiState>>);

impl Api {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, ApiState> {
        self.0.lock().unwrap()
    }

    /// The first status update for `job`: body, `JOB-TOKEN`, arrival.
    pub fn update(&self, job: i64) -> Option<(Value, Option<String>, Instant)> {
        self.lock()
            .updates
            .iter()
            .find(|u| u.0 == job)
            .map(|u| (u.1.clone(), u.2.clone(), u.3))
    }

    pub fn trace(&self, job: i64) -> String {
        trace_text(&self.lock().traces, job)
    }

    /// The last status update for `job` that is not `running`.
    pub fn final_update(&self, job: i64) -> Option<Value> {
        self.lock()
            .updates
            .iter()
            .rev()
            .find(|u| u.0 == job && u.1["state"] != "running")
            .map(|u| u.1.clone())
    }

    /// The state of `job`'s final update.
    pub fn state(&self, job: i64) -> Option<String> {
        self.final_update(job)
            .map(|u| u["state"].as_str().unwrap_or("").to_string())
    }

    pub fn handed_out(&self, job: i64) -> Option<Instant> {
        self.lock().handed_out.get(&job).copied()
    }
}

async fn verify(State(api): State<Api>, Json(body): Json<Value>) -> Response {
    let mut state = api.lock();
    state.verifies.push(body);
    match state.verify_status {
        403 => StatusCode::FORBIDDEN.into_response(),
        _ => verified(),
    }
}

async fn request_job(State(api): State<Api>, Json(body): Json<Value>) -> Response {
    let mut state = api.lock();
    state.requests.push(body);
    match state.jobs.pop_front() {
        Some(job) => {
            if let Some(id) = job.get("id").and_then(Value::as_i64) {
                state.handed_out.insert(id, Instant::now());
                if let Some(token) = job.get("token").and_then(Value::as_str) {
                    state.job_tokens.insert(id, token.to_string());
                }
            }
            (StatusCode::CREATED, Json(job)).into_response()
        }
        None => (StatusCode::NO_CONTENT, [("X-GitLab-Last-Update", "lu-1")]).into_response(),
    }
}

async fn update_job(
    State(api): State<Api>,
    UrlPath(id): UrlPath<i64>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let token = job_token(&headers);
    let mut state = api.lock();
    if let Some(status) = state.refuse_updates_with {
        return StatusCode::from_u16(status).unwrap().into_response();
    }
    if state.throttle_updates > 0 {
        state.throttle_updates -= 1;
        return (StatusCode::SERVICE_UNAVAILABLE, [("Retry-After", "0")]).into_response();
    }
    state.updates.push((id, body, token, Instant::now()));
    StatusCode::OK.into_response()
}

async fn patch_trace(
    State(api): State<Api>,
    UrlPath(id): UrlPath<i64>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let hang = {
        let mut state = api.lock();
        match state.hang_first_patch.iter().position(|j| *j == id) {
            Some(i) => {
                state.hang_first_patch.remove(i);
                state.hanging += 1;
                true
            }
            None => false,
        }
    };
    if hang {
        // Far longer than the test waits: the runner must not wait it out.
        tokio::time::sleep(HANG).await;
        api.lock().hanging -= 1;
        return StatusCode::GATEWAY_TIMEOUT.into_response();
    }
    let mut state = api.lock();
    let token = job_token(&headers).unwrap_or_default();
    if state.job_tokens.get(&id) != Some(&token) {
        return StatusCode::FORBIDDEN.into_response();
    }
    let Some(range) = headers
        .get("Content-Range")
        .and_then(|v| v.to_str().ok())
        .map(String::from)
    else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let start = range_start(&range);
    let trace = state.traces.entry(id).or_default();
    let size = trace.len();
    if start != size {
        state.patches.push((id, range, 416));
        return range_not_satisfiable(size);
    }
    trace.extend_from_slice(&body);
    let size = trace.len();
    if let Some(i) = state.fail_first_patch.iter().position(|j| *j == id) {
        state.fail_first_patch.remove(i);
        state.patches.push((id, range, 500));
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    state.patches.push((id, range, 202));
    (
        StatusCode::ACCEPTED,
        [
            ("Range", format!("0-{size}")),
            ("Job-Status", "running".to_string()),
        ],
    )
        .into_response()
}

/// The `file` part of a multipart body, parsed by hand.
fn multipart_file(headers: &HeaderMap, body: &[u8]) -> Option<(String, Vec<u8>)> {
    let content_type = headers.get("content-type")?.to_str().ok()?;
    let boundary = content_type.split("boundary=").nth(1)?.trim_matches('"');
    let delimiter = format!("--{boundary}");
    let text = body;
    let mut parts = Vec::new();
    let mut rest = text;
    while let Some(at) = find_bytes(rest, delimiter.as_bytes()) {
        rest = &rest[at + delimiter.len()..];
        parts.push(rest);
    }
    for part in parts {
        let header_end = find_bytes(part, b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&part[..header_end]).into_owned();
        if !head.contains("name=\"file\"") {
            continue;
        }
        let name = head
            .split("filename=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap_or_default()
            .to_string();
        let content = &part[header_end + 4..];
        let end = find_bytes(content, format!("\r\n{delimiter}").as_bytes())?;
        return Some((name, content[..end].to_vec()));
    }
    None
}

fn find_bytes(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

async fn upload_artifacts(
    State(api): State<Api>,
    UrlPath(id): UrlPath<i64>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some((file_name, data)) = multipart_file(&headers, &body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let token = job_token(&headers);
    api.lock().uploads.entry(id).or_default().push(Upload {
        params,
        file_name,
        data,
        token,
    });
    (StatusCode::CREATED, Json(json!({"id": id}))).into_response()
}

/// Starts the job API handing out `jobs` in order, scripted by `configure`.
pub async fn start_api(
    jobs: Vec<Value>,
    configure: impl FnOnce(&mut ApiState),
) -> (Api, SocketAddr) {
    let mut state = ApiState {
        verify_status: 200,
        jobs: jobs.into(),
        ..Default::default()
    };
    configure(&mut state);
    let api = Api(Arc::new(Mutex::new(state)));
    let app = axum::Router::new()
        .route("/api/v4/runners/verify", post(verify))
        .route("/api/v4/jobs/request", post(request_job))
        .route("/api/v4/jobs/{id}", put(update_job))
        .route("/api/v4/jobs/{id}/trace", patch(patch_trace))
        .route("/api/v4/jobs/{id}/artifacts", post(upload_artifacts))
        .with_state(api.clone());
    (api, serve(app).await)
}
