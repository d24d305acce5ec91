//! The real `ci-runner` binary against a tiny in-test job API (and in-test
//! OTLP collectors). Every wait polls with a deadline.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::job_api::{
    git_commit, git_repo, job_payload, runner_command, serve, set, start_api, Api, PARENT,
    RUNNER_TOKEN, TRACE_ID,
};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Json;
use conformance::doubles::eventually;
use conformance::doubles::otlp::{closed_port, grpc_collector, http_collector, stalled_server};
use conformance::log_lines::{field, job_line};
use serde_json::{json, Value};

const DEADLINE: Duration = Duration::from_secs(30);

/// A running `ci-runner` process and its stderr lines (with arrival time).
struct Runner {
    child: Child,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    /// Reads stderr into `lines` until the runner closes it.
    reader: Option<std::thread::JoinHandle<()>>,
    _builds: tempfile::TempDir,
}

impl Runner {
    fn start(api: SocketAddr, max_jobs: usize, extra: &[&str]) -> Runner {
        Self::start_with_env(api, max_jobs, extra, &[])
    }

    fn start_with_env(
        api: SocketAddr,
        max_jobs: usize,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Runner {
        let builds = tempfile::tempdir().unwrap();
        let mut command = runner_command(api, builds.path(), builds.path(), max_jobs, 100);
        command.args(extra).envs(env.iter().copied());
        let mut child = command.spawn().expect("ci-runner starts");
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push((Instant::now(), line));
            }
        });
        Runner {
            child,
            lines,
            reader: Some(reader),
            _builds: builds,
        }
    }

    fn log(&self) -> String {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// When the first stderr line containing `needle` arrived.
    fn line_time(&self, needle: &str) -> Option<Instant> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .find(|(_, l)| l.contains(needle))
            .map(|(t, _)| *t)
    }

    async fn wait_exit(&mut self) -> i32 {
        // (On a timeout `eventually` panics and `Drop` kills the runner.)
        let child = &mut self.child;
        let status = eventually("ci-runner to exit", DEADLINE, || {
            std::future::ready(child.try_wait().unwrap())
        })
        .await;
        // Every stderr line read: the reader ends at the pipe's end.
        if let Some(reader) = self.reader.take() {
            eventually("ci-runner's stderr read to its end", DEADLINE, || {
                std::future::ready(reader.is_finished().then_some(()))
            })
            .await;
        }
        status.code().unwrap_or(-1)
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `condition` until true, at most `DEADLINE`.
async fn until(what: &str, condition: impl Fn() -> bool) {
    eventually(what, DEADLINE, || {
        std::future::ready(condition().then_some(()))
    })
    .await
}

/// A job payload with the fields a runner must accept and ignore.
fn job(id: i64, script: &[&str], after: &[&str]) -> Value {
    let variables = json!([
        {"key": "CI_JOB_ID", "value": id.to_string(), "public": true, "masked": false},
        {"key": "CI_JOB_NAME", "value": format!("job-{id}"), "public": true, "masked": false},
        {"key": "CI_JOB_TOKEN", "value": format!("job-token-{id}-SECRET"), "public": false, "masked": true},
        {"key": "CI_PIPELINE_SOURCE", "value": "push", "public": true, "masked": false}
    ]);
    let mut job = job_payload(id, script, after, 1.0, variables);
    let extra = json!({
        "allow_git_fetch": true,
        "image": null, "services": [], "dependencies": [],
        "features": {"trace_sections": true},
        "unknown_future_field": {"nested": [1, 2, 3]}
    });
    for (key, value) in extra.as_object().unwrap() {
        job[key] = value.clone();
    }
    job
}

fn add_variable(mut job: Value, variable: Value) -> Value {
    job["variables"].as_array_mut().unwrap().push(variable);
    job
}

fn crc32(data: &[u8]) -> u32 {
    ci_runner::trace::crc32(data)
}

/// The final update of a job, checked against the recorded log.
fn assert_update(
    api: &Api,
    id: i64,
    state: &str,
    reason: Option<&str>,
    exit_code: Option<i64>,
) -> Value {
    let (body, header_token, _) = api
        .update(id)
        .unwrap_or_else(|| panic!("no status update for job {id}"));
    assert_eq!(body["state"], state, "{body}");
    assert_eq!(body["failure_reason"].as_str(), reason, "{body}");
    assert_eq!(body["exit_code"].as_i64(), exit_code, "{body}");
    let token = format!("job-token-{id}-SECRET");
    assert_eq!(body["token"], token.as_str());
    assert_eq!(header_token.as_deref(), Some(token.as_str()));
    let trace = api.lock().traces.get(&id).cloned().unwrap_or_default();
    assert_eq!(
        body["output"]["bytesize"].as_u64(),
        Some(trace.len() as u64),
        "{body}"
    );
    assert_eq!(
        body["output"]["checksum"],
        format!("crc32:{:08x}", crc32(&trace))
    );
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passing_job_succeeds_and_after_script_failure_does_not_matter() {
    let job1 = add_variable(
        job(
            1,
            &[
                "echo hello from $CI_JOB_NAME",
                "cat \"$MY_FILE\"",
                "echo \"expanded=$EXPANDED raw=$RAW\"",
            ],
            &["echo after ran", "exit 7"],
        ),
        json!({"key": "MY_FILE", "value": "file-content-here", "file": true}),
    );
    let job1 = add_variable(job1, json!({"key": "EXPANDED", "value": "id-$CI_JOB_ID"}));
    let job1 = add_variable(
        job1,
        json!({"key": "RAW", "value": "id-$CI_JOB_ID", "raw": true}),
    );
    let (api, addr) = start_api(vec![job1], |_| {}).await;
    let mut runner = Runner::start(addr, 1, &["--telemetry-disabled"]);
    assert_eq!(runner.wait_exit().await, 0, "{}", runner.log());

    assert_update(&api, 1, "success", None, None);
    let trace = api.trace(1);
    for expected in [
        "Running with ci-runner",
        "$ echo hello from $CI_JOB_NAME",
        "hello from job-1",
        "file-content-here",
        "expanded=id-1 raw=id-$CI_JOB_ID",
        "section_start:",
        "step_script",
        "after ran",
        "WARNING: after_script failed, but job will continue unaffected: exit code 7",
        "Job succeeded",
    ] {
        assert!(
            trace.contains(expected),
            "missing {expected:?} in trace:\n{trace}"
        );
    }
    let state = api.lock();
    let request = &state.requests[0];
    assert_eq!(request["token"], RUNNER_TOKEN);
    assert_eq!(request["info"]["executor"], "shell");
    assert_eq!(request["info"]["shell"], "bash");
    assert_eq!(request["info"]["features"]["trace_checksum"], true);
    assert_eq!(request["info"]["features"]["cancelable"], true);
    assert_eq!(state.verifies.len(), 1);
    assert!(state.patches.iter().all(|(_, _, status)| *status == 202));
    drop(state);
    let log = runner.log();
    assert!(log.contains("Job succeeded job_id=1 duration="), "{log}");
    assert!(
        job_line(
            &log,
            1,
            "Telemetry disabled: telemetry is disabled in the runner configuration"
        )
        .is_some(),
        "{log}"
    );
    assert!(
        !log.contains(RUNNER_TOKEN) && !log.contains("SECRET"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_job_is_a_script_failure_and_after_script_still_runs() {
    let (api, addr) = start_api(
        vec![job(
            2,
            &["echo before", "exit 3", "echo never"],
            &["echo after_script ran with $CI_JOB_STATUS"],
        )],
        |_| {},
    )
    .await;
    let mut runner = Runner::start(addr, 1, &["--telemetry-disabled"]);
    assert_eq!(runner.wait_exit().await, 0, "{}", runner.log());

    assert_update(&api, 2, "failed", Some("script_failure"), Some(3));
    let trace = api.trace(2);
    assert!(trace.contains("before"), "{trace}");
    assert!(!trace.contains("\nnever"), "{trace}");
    let after = trace
        .find("after_script ran with failed")
        .expect("after_script output");
    let error = trace
        .find("ERROR: Job failed: exit code 3")
        .expect("final line");
    assert!(after < error, "{trace}");
    assert!(
        runner
            .log()
            .contains("Job failed job_id=2 reason=script_failure exit_code=3 duration="),
        "{}",
        runner.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masked_variables_and_the_job_token_never_leave_the_process() {
    let secret = "s3cr3t-VALUE-xyz";
    let job3 = add_variable(
        job(
            3,
            &[
                "echo \"secret is $MY_SECRET\"",
                // Split across two writes (and two PATCHes): printed in halves.
                "printf 's3cr3t-VA'; sleep 1.3; printf 'LUE-xyz done\\n'",
                "echo token=$CI_JOB_TOKEN",
            ],
            &["echo after $MY_SECRET"],
        ),
        json!({"key": "MY_SECRET", "value": secret, "masked": true, "public": false}),
    );
    let (api, addr) = start_api(vec![job3], |_| {}).await;
    let mut runner = Runner::start(addr, 1, &["--telemetry-disabled"]);
    assert_eq!(runner.wait_exit().await, 0, "{}", runner.log());

    assert_update(&api, 3, "success", None, None);
    let trace = api.trace(3);
    assert!(trace.contains("secret is [MASKED]"), "{trace}");
    assert!(trace.contains("[MASKED] done"), "{trace}");
    assert!(trace.contains("token=[MASKED]"), "{trace}");
    assert!(trace.contains("after [MASKED]"), "{trace}");
    assert!(
        !trace.contains(secret) && !trace.contains("job-token-3-SECRET"),
        "{trace}"
    );
    // The halves were sent in different PATCHes, yet never in clear.
    assert!(api.lock().patches.len() >= 2);
    assert!(!runner.log().contains(secret), "{}", runner.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_timeout_kills_the_script() {
    let job4 = set(
        job(4, &["echo start", "sleep 60 & sleep 60"], &["echo after"]),
        "runner_info",
        json!({"timeout": 2}),
    );
    let (api, addr) = start_api(vec![job4], |_| {}).await;
    let mut runner = Runner::start(addr, 1, &["--telemetry-disabled"]);
    assert_eq!(runner.wait_exit().await, 0, "{}", runner.log());

    assert_update(&api, 4, "failed", Some("job_execution_timeout"), None);
    let (_, _, arrived) = api.update(4).unwrap();
    // Not before the 2 s timeout; and the 60 s script was killed, or the
    // runner would not have exited within `wait_exit`'s deadline.
    let took = arrived - api.handed_out(4).unwrap();
    assert!(took >= Duration::from_secs(2), "{took:?}");
    let trace = api.trace(4);
    assert!(
        trace.contains("execution took longer than 2s seconds"),
        "{trace}"
    );
    assert!(
        !trace.contains("after\n"),
        "after_script does not run after a timeout: {trace}"
    );
    assert!(
        runner
            .log()
            .contains("Job failed job_id=4 reason=job_execution_timeout duration="),
        "{}",
        runner.log()
    );
}

/// Runs one telemetry-enabled job against a collector that cannot take it,
/// and checks that the status arrives long before the flush deadline ends.
async fn status_is_not_delayed_by(collector_url: String, expect_deadline: bool) {
    let job5 = set(
        job(5, &["echo hi"], &[]),
        "features",
        json!({"job_telemetry": true}),
    );
    let job5 = set(
        job5,
        "trace_context",
        json!({"trace_id": TRACE_ID, "parent_span_id": PARENT}),
    );
    let (api, addr) = start_api(vec![job5], |_| {}).await;
    let mut runner = Runner::start(
        addr,
        1,
        &["--otlp-endpoint", &collector_url, "--flush-timeout", "5"],
    );

    until("the status update", || api.update(5).is_some()).await;
    // How soon is not measured: the order of the status and the end of the
    // flush is (below).
    let (_, _, status_at) = api.update(5).unwrap();
    assert_eq!(runner.wait_exit().await, 0, "{}", runner.log());
    assert_update(&api, 5, "success", None, None);

    let log = runner.log();
    let enabled = job_line(&log, 5, "Telemetry enabled").unwrap_or_else(|| panic!("{log}"));
    assert_eq!(
        (
            field(enabled, "contract"),
            field(enabled, "trace_id"),
            field(enabled, "parent_span_id")
        ),
        (Some("v1"), Some(TRACE_ID), Some(PARENT)),
        "{enabled}"
    );
    // The span is retried past the flush deadline (it stays in the runner's
    // buffer), and counted as `shutdown` when the runner stops.
    let line = |prefix: &str| {
        job_line(&log, 5, prefix)
            .unwrap_or_else(|| panic!("no `{prefix}` line in {log}"))
            .to_string()
    };
    let incomplete = line("Telemetry flush incomplete spans=");
    assert!(
        incomplete.contains(" exported=0 dropped=0 buffered="),
        "{incomplete}"
    );
    let settled = line("Telemetry settled with drops spans=");
    assert!(
        settled.contains(" exported=0 ") && settled.contains("dropped_by=shutdown="),
        "{settled}"
    );
    let flushed_at = runner.line_time("Telemetry flush incomplete").unwrap();
    assert!(
        status_at < flushed_at,
        "the status must be sent before the flush ends"
    );
    if expect_deadline {
        assert!(log.contains("deadline_exceeded=true"), "{log}");
        assert!(
            flushed_at - status_at > Duration::from_secs(3),
            "the flush waited for its deadline"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_collector_port_does_not_change_the_job() {
    status_is_not_delayed_by(format!("http://{}/v1/traces", closed_port()), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_collector_does_not_delay_the_status() {
    status_is_not_delayed_by(format!("http://{}/v1/traces", stalled_server().await), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_the_collector_from_the_binary() {
    let http = http_collector().await;
    let grpc = grpc_collector().await;
    let v1 = set(
        set(
            job(6, &["echo v1"], &[]),
            "features",
            json!({"job_telemetry": true}),
        ),
        "trace_context",
        json!({"trace_id": TRACE_ID, "parent_span_id": PARENT}),
    );
    let off = set(
        job(7, &["echo off"], &[]),
        "features",
        json!({"job_telemetry": false}),
    );
    let v2_trace = "0af7651916cd43dd8448eb211c80319c";
    let v2 = set(
        job(8, &["exit 1"], &[]),
        "features",
        json!({"tracing": {"trace_id": v2_trace, "span_parent_id": "b7ad6b7169203331",
               "otel_endpoints": [{"url": format!("grpc://{}", grpc.addr.unwrap())}]}}),
    );
    let (api, addr) = start_api(vec![v1, off, v2], |_| {}).await;
    // Headers from the environment go to the static endpoint only.
    let mut runner = Runner::start_with_env(
        addr,
        3,
        &[
            "--otlp-endpoint",
            &http.http_endpoint(),
            "--concurrent",
            "1",
        ],
        &[("OTEL_EXPORTER_OTLP_HEADERS", "x-static-auth=static-secret")],
    );
    assert_eq!(runner.wait_exit().await, 0, "{}", runner.log());
    assert_update(&api, 6, "success", None, None);
    assert_update(&api, 7, "success", None, None);
    assert_update(&api, 8, "failed", Some("script_failure"), Some(1));

    // job_execution and its stage spans (prepare_executor, get_sources,
    // step_script: job 6 has no repository, cache, artifacts or
    // after_script).
    let spans = http.wait_for(DEADLINE, |s| s.len() >= 4).await;
    assert_eq!(
        spans.len(),
        4,
        "only job 6 goes to the static endpoint: {spans:#?}"
    );
    assert!(
        spans
            .iter()
            .all(|s| s.resource.get("ci.job.id").map(String::as_str) == Some("int:6")),
        "only job 6 goes to the static endpoint: {spans:#?}"
    );
    let span = spans
        .iter()
        .find(|s| s.name == "job_execution")
        .expect("job_execution");
    assert_eq!(
        (
            span.name.as_str(),
            span.trace_id.as_str(),
            span.parent_span_id.as_str()
        ),
        ("job_execution", TRACE_ID, PARENT)
    );
    assert_eq!(span.attr("ci.job.id"), Some("int:6"));
    assert_eq!(span.attr("ci.runner.id"), Some("int:99"));
    assert_eq!(span.attr("ci.pipeline.id"), Some("int:506"));
    assert_eq!(span.attr("ci.pipeline.source"), Some("str:push"));
    assert_eq!(span.attr("ci.job.status"), Some("str:success"));
    assert_eq!(span.resource["service.name"], "str:gitlab-ci-runner");
    // The span covers the job: it started when the job was received and
    // ended after the script ran.
    assert!(span.end_ns > span.start_ns);

    let spans = grpc
        .wait_for(DEADLINE, |s| s.iter().any(|s| s.name == "job_execution"))
        .await;
    assert!(spans.iter().all(|s| s.trace_id == v2_trace), "{spans:#?}");
    let job8 = spans
        .iter()
        .find(|s| s.name == "job_execution")
        .expect("job_execution");
    assert_eq!(job8.attr("ci.job.id"), Some("int:8"));
    assert_eq!(job8.attr("ci.job.status"), Some("str:failed"));
    assert_eq!(job8.status_code, 2);

    assert_eq!(
        http.headers()[0].get("x-static-auth").map(String::as_str),
        Some("static-secret")
    );
    assert!(
        grpc.headers()
            .iter()
            .all(|h| !h.contains_key("x-static-auth")),
        "{:?}",
        grpc.headers()
    );

    let log = runner.log();
    let contract =
        |job: u64| job_line(&log, job, "Telemetry enabled").and_then(|l| field(l, "contract"));
    assert_eq!(contract(6), Some("v1"), "{log}");
    assert!(
        job_line(&log, 6, "Telemetry flushed spans=4 exported=4 dropped=0").is_some(),
        "{log}"
    );
    assert!(
        job_line(
            &log,
            7,
            "Telemetry disabled: features.job_telemetry is false"
        )
        .is_some(),
        "{log}"
    );
    assert_eq!(contract(8), Some("v2"), "{log}");
    assert_eq!(
        api.lock().requests[0]["info"]["features"]["job_telemetry"],
        true
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_are_cloned_at_the_sha_and_a_failed_clone_fails_the_job() {
    let repo = tempfile::tempdir().unwrap();
    let sha = git_repo(repo.path(), &[("README", "first version\n")]);
    std::fs::write(repo.path().join("README"), "second version\n").unwrap();
    git_commit(repo.path(), &["-am", "two"]);

    let url = repo.path().to_string_lossy().into_owned();
    let cloned = set(
        job(9, &["cat README"], &[]),
        "git_info",
        json!({"repo_url": url, "ref": "main", "sha": sha, "ref_type": "branch", "depth": 0}),
    );
    let missing = set(
        job(10, &["echo never"], &[]),
        "git_info",
        json!({"repo_url": "/nonexistent/repo.git", "ref": "main", "sha": sha}),
    );
    let (api, addr) = start_api(vec![cloned, missing], |_| {}).await;
    let mut runner = Runner::start(addr, 2, &["--telemetry-disabled"]);
    assert_eq!(runner.wait_exit().await, 0, "{}", runner.log());

    assert_update(&api, 9, "success", None, None);
    let trace = api.trace(9);
    assert!(
        trace.contains("first version"),
        "checked out at the payload's sha: {trace}"
    );
    assert!(
        trace.contains(&format!("Checking out {}", &sha[..8])),
        "{trace}"
    );
    let body = assert_update(&api, 10, "failed", Some("script_failure"), Some(128));
    assert_eq!(body["exit_code"], 128);
    assert!(!api.trace(10).contains("$ echo never"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_runner_token_exits_1_with_one_clear_line() {
    let (_api, addr) = start_api(vec![], |s| s.verify_status = 403).await;
    let mut runner = Runner::start(addr, 1, &[]);
    assert_eq!(runner.wait_exit().await, 1);
    let log = runner.log();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "{log}");
    assert!(errors[0].contains("403 Forbidden"), "{log}");
    assert!(!log.contains(RUNNER_TOKEN));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unparseable_payload_is_reported_as_a_system_failure() {
    let bad = json!({"id": 11, "token": "job-token-11-SECRET", "steps": "echo not an array"});
    let (api, addr) = start_api(vec![bad], |_| {}).await;
    let mut runner = Runner::start(addr, 1, &["--telemetry-disabled"]);
    assert_eq!(runner.wait_exit().await, 0, "{}", runner.log());
    assert_update(&api, 11, "failed", Some("runner_system_failure"), None);
    assert!(
        api.trace(11).contains("invalid job payload"),
        "{}",
        api.trace(11)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_offset_is_resynced_after_a_lost_answer() {
    let (api, addr) = start_api(
        vec![job(12, &["echo one", "sleep 1.5", "echo two"], &[])],
        |s| s.fail_first_patch.push(12),
    )
    .await;
    let mut runner = Runner::start(addr, 1, &["--telemetry-disabled"]);
    assert_eq!(runner.wait_exit().await, 0, "{}", runner.log());
    assert_update(&api, 12, "success", None, None);
    let patches: Vec<u16> = api.lock().patches.iter().map(|p| p.2).collect();
    assert_eq!(&patches[..2], &[500, 416], "{patches:?}");
    let trace = api.trace(12);
    assert_eq!(
        trace.matches("Running with ci-runner").count(),
        1,
        "{trace}"
    );
    assert!(
        trace.contains("two\n") && trace.contains("Job succeeded"),
        "{trace}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_concurrently() {
    let jobs = vec![job(13, &["sleep 1.5"], &[]), job(14, &["sleep 1.5"], &[])];
    let (api, addr) = start_api(jobs, |_| {}).await;
    let mut runner = Runner::start(addr, 2, &["--telemetry-disabled", "--concurrent", "2"]);
    assert_eq!(runner.wait_exit().await, 0, "{}", runner.log());
    let first_done = api.update(13).unwrap().2.min(api.update(14).unwrap().2);
    assert!(api.handed_out(14).unwrap() < first_done && api.handed_out(13).unwrap() < first_done);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_running_job_and_takes_no_more() {
    let jobs = vec![
        job(15, &["sleep 1.5", "echo finished"], &[]),
        job(16, &["echo second"], &[]),
    ];
    let (api, addr) = start_api(jobs, |_| {}).await;
    let mut runner = Runner::start(addr, 2, &["--telemetry-disabled", "--concurrent", "1"]);
    until("the job to start", || api.trace(15).contains("$ sleep 1.5")).await;
    runner.signal(libc::SIGTERM);
    assert_eq!(runner.wait_exit().await, 0, "{}", runner.log());
    assert_update(&api, 15, "success", None, None);
    assert!(api.trace(15).contains("finished"));
    assert!(
        api.handed_out(16).is_none(),
        "no job is taken after SIGTERM"
    );
    assert!(
        runner.log().contains("Received SIGTERM"),
        "{}",
        runner.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_signal_aborts_running_jobs() {
    let (api, addr) = start_api(vec![job(17, &["sleep 60"], &["echo after"])], |_| {}).await;
    let mut runner = Runner::start(addr, 1, &["--telemetry-disabled"]);
    until("the job to start", || api.trace(17).contains("$ sleep 60")).await;
    runner.signal(libc::SIGTERM);
    until("the first signal to be seen", || {
        runner.log().contains("Received SIGTERM")
    })
    .await;
    runner.signal(libc::SIGINT);
    // The 60 s job was aborted: the runner exits within `wait_exit`'s deadline.
    assert_eq!(runner.wait_exit().await, 0, "{}", runner.log());
    assert_update(&api, 17, "failed", Some("runner_system_failure"), None);
    assert!(api.trace(17).contains("aborted"), "{}", api.trace(17));
}

#[test]
fn register_writes_a_gitlab_runner_shaped_config() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (addr, seen) = runtime.block_on(async {
        let seen = Arc::new(Mutex::new(Vec::<Value>::new()));
        let record = seen.clone();
        let app = axum::Router::new().route(
            "/api/v4/runners",
            post(move |Json(body): Json<Value>| {
                let record = record.clone();
                async move {
                    record.lock().unwrap().push(body.clone());
                    if body["token"] == "reg-token" {
                        (
                            StatusCode::CREATED,
                            Json(json!({"id": 31, "token": "glrt-new-token"})),
                        )
                            .into_response()
                    } else {
                        StatusCode::FORBIDDEN.into_response()
                    }
                }
            }),
        );
        (serve(app).await, seen)
    });
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let register = |token: &str| {
        Command::new(env!("CARGO_BIN_EXE_ci-runner"))
            .args([
                "register",
                "--url",
                &format!("http://{addr}"),
                "--registration-token",
                token,
            ])
            .args(["--config", &config.to_string_lossy(), "--name", "box-1"])
            .output()
            .unwrap()
    };
    let out = register("reg-token");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&config).unwrap();
    let parsed = ci_runner::config::parse(&text).unwrap();
    let runner = &parsed.runners[0];
    assert_eq!(runner.name.as_deref(), Some("box-1"));
    assert_eq!(runner.id, Some(31));
    assert_eq!(runner.token.as_deref(), Some("glrt-new-token"));
    assert_eq!(runner.executor.as_deref(), Some("shell"));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("glrt-new-token"));
    assert_eq!(seen.lock().unwrap()[0]["info"]["executor"], "shell");

    let refused = register("wrong");
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("403 Forbidden"));
    assert!(Path::new(&config).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_final_status_is_retried_past_the_old_limit_honouring_retry_after() {
    // The runner used to give up after 6 attempts.
    let (api, addr) = start_api(vec![job(40, &["echo hi"], &[])], |s| {
        s.throttle_updates = 12;
    })
    .await;
    let mut runner = Runner::start(addr, 1, &["--telemetry-disabled"]);
    assert_eq!(runner.wait_exit().await, 0, "{}", runner.log());
    assert_update(&api, 40, "success", None, None);
    assert_eq!(api.lock().throttle_updates, 0);
    assert!(
        runner.log().contains("Runner stopped jobs=1 lost=0"),
        "{}",
        runner.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_status_never_accepted_is_named_and_the_runner_exits_2() {
    let (_api, addr) = start_api(vec![job(41, &["echo hi"], &[])], |s| {
        s.refuse_updates_with = Some(502);
    })
    .await;
    let mut runner = Runner::start(
        addr,
        1,
        &["--telemetry-disabled", "--final-update-limit", "1"],
    );
    assert_eq!(runner.wait_exit().await, 2, "{}", runner.log());
    let log = runner.log();
    assert!(
        job_line(&log, 41, "Could not send the job's final status")
            .is_some_and(|l| l.contains("ERROR")),
        "{log}"
    );
    assert!(log.contains("lost=1"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_job_fails_with_runner_system_failure_and_is_counted() {
    let mut panicking = job(42, &["echo never runs"], &[]);
    panicking["variables"]
        .as_array_mut()
        .unwrap()
        .push(json!({"key": "CI_RUNNER_DEBUG_PANIC", "value": "execute", "public": true}));
    let (api, addr) = start_api(vec![panicking, job(43, &["echo fine"], &[])], |_| {}).await;
    let mut runner = Runner::start(addr, 2, &["--telemetry-disabled"]);
    assert_eq!(runner.wait_exit().await, 0, "{}", runner.log());
    assert_update(&api, 42, "failed", Some("runner_system_failure"), None);
    assert!(
        api.trace(42).contains("the runner failed internally"),
        "{}",
        api.trace(42)
    );
    assert_update(&api, 43, "success", None, None);
    assert!(runner.log().contains("panicked=1"), "{}", runner.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overflowing_timeout_is_clamped_and_the_job_runs() {
    let mut overflowing = job(44, &["echo fine"], &[]);
    overflowing["runner_info"]["timeout"] = json!(u64::MAX);
    let (api, addr) = start_api(vec![overflowing], |_| {}).await;
    let mut runner = Runner::start(addr, 1, &["--telemetry-disabled"]);
    assert_eq!(runner.wait_exit().await, 0, "{}", runner.log());
    assert_update(&api, 44, "success", None, None);
    assert!(
        runner.log().contains("timeout=2629746s"),
        "{}",
        runner.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_shutdown_a_failing_final_status_is_retried_for_the_shutdown_timeout() {
    let (api, addr) = start_api(vec![job(45, &["echo hi"], &[])], |s| {
        s.refuse_updates_with = Some(503);
    })
    .await;
    let mut runner = Runner::start(
        addr,
        1,
        &["--telemetry-disabled", "--shutdown-timeout", "1"],
    );
    // The job ended and its status keeps failing (the limit is an hour).
    until("the first failed status update", || {
        job_line(&runner.log(), 45, "Status update failed").is_some()
    })
    .await;
    assert!(api.update(45).is_none());
    runner.signal(libc::SIGTERM);
    assert_eq!(runner.wait_exit().await, 2, "{}", runner.log());
    assert!(
        job_line(&runner.log(), 45, "Could not send the job's final status").is_some(),
        "{}",
        runner.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_trace_patch_is_cut_short_and_retried() {
    let (api, addr) = start_api(vec![job(46, &["echo before", "echo after"], &[])], |s| {
        s.hang_first_patch.push(46);
    })
    .await;
    let mut runner = Runner::start(addr, 1, &["--telemetry-disabled"]);
    assert_eq!(runner.wait_exit().await, 0, "{}", runner.log());
    // The status and the whole log arrived while the first PATCH still hangs.
    assert_eq!(api.lock().hanging, 1);
    assert_update(&api, 46, "success", None, None);
    let trace = api.trace(46);
    assert!(
        trace.contains("after\n") && trace.contains("Job succeeded"),
        "{trace}"
    );
}
