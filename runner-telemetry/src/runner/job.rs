//! One job, from the payload to the final status: prepare the build
//! directory, get the sources, run `before_script` + `script`, then
//! `after_script`, stream the log, and report the result.
//!
//! **Architecture Invariant:** the status update to GitLab never waits for
//! telemetry. `job_execution` ends at the job's end, after the status is
//! sent its export is flushed in the background by the caller
//! ([`JobDone::flush`]).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use tokio::sync::watch;

use super::api::{GitLabClient, JobOutput, UpdateJob, UpdateResult};
use super::payload::{JobPayload, PayloadError};
use super::shell::{self, ExportVar, ScriptResult};
use super::trace::{self, JobLog, StopRequest};
use crate::job::{strip_credentials, JobOutcome, JobSpanInfo, PendingFlush};
use crate::telemetry::RunnerTelemetry;

/// Default `after_script` timeout (GitLab's).
pub const AFTER_SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);

/// What a job needs from its runner.
#[derive(Debug)]
pub struct JobContext {
    pub client: GitLabClient,
    pub runner_name: String,
    pub gitlab_url: String,
    pub builds_dir: PathBuf,
    pub telemetry: RunnerTelemetry,
}

/// The end of a job.
#[derive(Debug)]
pub struct JobDone {
    pub job_id: Option<i64>,
    pub outcome: Option<JobOutcome>,
    /// The telemetry flush, to run in the background.
    pub flush: Option<PendingFlush>,
}

/// How a job ended, with what GitLab is told.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ending {
    outcome: JobOutcome,
    /// Last line of the log.
    message: String,
}

impl Ending {
    fn success() -> Self {
        Ending {
            outcome: JobOutcome::Success,
            message: "\x1b[32;1mJob succeeded\x1b[0;m".into(),
        }
    }

    fn script_failure(code: i32) -> Self {
        Ending {
            outcome: JobOutcome::Failed {
                failure_reason: "script_failure".into(),
                exit_code: Some(code),
            },
            message: format!("\x1b[31;1mERROR: Job failed: exit code {code}\x1b[0;m"),
        }
    }

    fn system_failure(why: &str) -> Self {
        Ending {
            outcome: JobOutcome::Failed {
                failure_reason: "runner_system_failure".into(),
                exit_code: None,
            },
            message: format!("\x1b[31;1mERROR: Job failed (system failure): {why}\x1b[0;m"),
        }
    }

    fn timed_out(timeout: Duration) -> Self {
        Ending {
            outcome: JobOutcome::TimedOut,
            message: format!(
                "\x1b[31;1mERROR: Job failed: execution took longer than {}s seconds\x1b[0;m",
                timeout.as_secs()
            ),
        }
    }

    fn canceled() -> Self {
        Ending {
            outcome: JobOutcome::Canceled,
            message: "\x1b[31;1mERROR: Job failed: canceled\x1b[0;m".into(),
        }
    }

    fn is_success(&self) -> bool {
        self.outcome == JobOutcome::Success
    }
}

/// Runs the job in `raw` (as received at `received`). `abort` turns true when
/// the runner must stop its jobs (second signal).
pub async fn run_job(
    ctx: &JobContext,
    raw: Value,
    received: SystemTime,
    abort: watch::Receiver<bool>,
) -> JobDone {
    let started = Instant::now();
    let payload = match JobPayload::from_value(&raw) {
        Ok(payload) => payload,
        Err(error) => return report_unparseable(ctx, &raw, error, received).await,
    };
    let job_id = payload.id;
    tracing::info!(
        "job={job_id} Job received name={:?} stage={:?} project={:?} pipeline={} timeout={}s",
        payload.job_info.name,
        payload.job_info.stage,
        payload.job_info.project_full_path,
        payload
            .job_info
            .pipeline_id
            .map(|p| p.to_string())
            .unwrap_or_else(|| "-".into()),
        payload.timeout_secs
    );
    let span_info = payload.span_info(&ctx.gitlab_url);
    let telemetry = ctx.telemetry.start_job(&raw, &span_info, received);

    let log = JobLog::new(payload.secrets());
    let (cancel_tx, cancel_rx) = watch::channel(None::<StopRequest>);
    let uploader = tokio::spawn(trace::upload(
        ctx.client.clone(),
        job_id,
        payload.token.clone(),
        log.clone(),
        cancel_tx,
    ));

    // One stop signal for the scripts: GitLab canceled the job, or the runner
    // aborts its jobs.
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let stop_watcher = {
        let mut cancel_rx = cancel_rx.clone();
        let mut abort = abort.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = cancel_rx.wait_for(Option::is_some) => {}
                _ = abort.wait_for(|a| *a) => {}
            }
            let _ = stop_tx.send(true);
        })
    };

    let ending = execute(ctx, &payload, &log, &mut stop_rx, &abort, &cancel_rx).await;
    stop_watcher.abort();

    log.line("");
    log.line(&ending.message);
    log.close();
    if tokio::time::timeout(Duration::from_secs(30), uploader)
        .await
        .is_err()
    {
        tracing::warn!("job={job_id} Sending the job log took longer than 30s, going on");
    }
    let end_time = SystemTime::now();

    send_status(&ctx.client, &payload.token, job_id, &ending.outcome, &log).await;
    let duration = started.elapsed().as_secs_f64();
    match &ending.outcome {
        JobOutcome::Success => tracing::info!("job={job_id} Job succeeded duration={duration:.3}s"),
        JobOutcome::Failed {
            failure_reason,
            exit_code,
        } => {
            tracing::info!(
            "job={job_id} Job failed reason={failure_reason} exit_code={} duration={duration:.3}s",
            exit_code.map(|c| c.to_string()).unwrap_or_else(|| "-".into())
        )
        }
        JobOutcome::TimedOut => tracing::info!(
            "job={job_id} Job failed reason=job_execution_timeout duration={duration:.3}s"
        ),
        JobOutcome::Canceled => tracing::info!("job={job_id} Job canceled duration={duration:.3}s"),
    }

    let flush = telemetry.finish(&ending.outcome, end_time);
    JobDone {
        job_id: Some(job_id),
        outcome: Some(ending.outcome),
        flush,
    }
}

async fn execute(
    ctx: &JobContext,
    payload: &JobPayload,
    log: &JobLog,
    stop: &mut watch::Receiver<bool>,
    abort: &watch::Receiver<bool>,
    cancel: &watch::Receiver<Option<StopRequest>>,
) -> Ending {
    let job_id = payload.id;
    let timeout = Duration::from_secs(payload.timeout_secs);
    let deadline = tokio::time::Instant::now() + timeout;
    let stopped = || {
        if *abort.borrow() {
            Ending::system_failure("the runner is shutting down and aborted the job")
        } else if cancel.borrow().is_some() {
            Ending::canceled()
        } else {
            Ending::system_failure("the job was stopped")
        }
    };

    log.line(&format!(
        "\x1b[0KRunning with ci-runner {} (reference runner)",
        env!("CARGO_PKG_VERSION")
    ));
    log.line(&format!("\x1b[0K  on {}", ctx.runner_name));

    log.section_start("prepare_executor", "Preparing the \"shell\" executor");
    log.line("\x1b[0KUsing Shell (bash) executor...");
    log.section_end("prepare_executor");

    log.section_start("prepare_script", "Preparing environment");
    log.line(&format!("Running on {}...", super::config::hostname()));
    let dir = shell::build_dir(&ctx.builds_dir, &payload.job_info.project_full_path, job_id);
    let tmp = tmp_dir(&dir);
    let prepared = prepare_dirs(&dir, &tmp).and_then(|()| {
        let mut variables = payload.variables.clone();
        variables.extend(runner_variables(&ctx.builds_dir, &dir));
        shell::prepare_variables(&variables, &tmp)
    });
    let exports = match prepared {
        Ok((exports, skipped)) => {
            for key in skipped {
                log.line(&format!(
                    "\x1b[0;33mWARNING: variable `{key}` is not a valid shell name and was not exported\x1b[0;m"
                ));
            }
            exports
        }
        Err(e) => {
            log.section_end("prepare_script");
            tracing::error!(
                "job={job_id} Cannot prepare the build directory `{}`: {e}",
                dir.display()
            );
            return Ending::system_failure(&format!("cannot prepare the build directory: {e}"));
        }
    };
    log.section_end("prepare_script");

    let result = get_sources(payload, &exports, &dir, &tmp, deadline, log, stop).await;
    let mut ending = match result {
        None | Some(ScriptResult::Exited(0)) => None,
        Some(ScriptResult::Exited(code)) => Some(Ending::script_failure(code)),
        Some(ScriptResult::TimedOut) => Some(Ending::timed_out(timeout)),
        Some(ScriptResult::Stopped) => Some(stopped()),
        Some(ScriptResult::SpawnFailed(why)) => Some(Ending::system_failure(&why)),
    };

    if ending.is_none() {
        let commands = payload
            .step("script")
            .map(|s| s.script.clone())
            .unwrap_or_default();
        log.section_start(
            "step_script",
            "Executing \"step_script\" stage of the job script",
        );
        let script = shell::build_script(&exports, &dir, &commands);
        let result = shell::run_script(
            &tmp.join("step_script.sh"),
            &script,
            &dir,
            deadline,
            log,
            stop,
        )
        .await;
        log.section_end("step_script");
        ending = Some(match result {
            ScriptResult::Exited(0) => Ending::success(),
            ScriptResult::Exited(code) => Ending::script_failure(code),
            ScriptResult::TimedOut => Ending::timed_out(timeout),
            ScriptResult::Stopped => stopped(),
            ScriptResult::SpawnFailed(why) => Ending::system_failure(&why),
        });
    }
    let ending = ending.expect("set above");

    // after_script runs after success and failure alike, in its own shell;
    // not after a timeout, cancel or abort (GitLab's behaviour), and its
    // failure does not change the job's result.
    let after = payload
        .step("after_script")
        .filter(|s| !s.script.is_empty());
    let eligible = matches!(
        ending.outcome,
        JobOutcome::Success | JobOutcome::Failed { .. }
    ) && !*stop.borrow();
    if let (Some(step), true) = (after, eligible) {
        log.section_start("after_script", "Running after_script");
        let limit = step
            .timeout_secs
            .map(Duration::from_secs)
            .unwrap_or(AFTER_SCRIPT_TIMEOUT)
            .min(timeout);
        let mut exports = exports.clone();
        exports.push(ExportVar {
            key: "CI_JOB_STATUS".into(),
            value: if ending.is_success() {
                "success"
            } else {
                "failed"
            }
            .into(),
        });
        let script = shell::build_script(&exports, &dir, &step.script);
        let after_deadline = tokio::time::Instant::now() + limit;
        let result = shell::run_script(
            &tmp.join("after_script.sh"),
            &script,
            &dir,
            after_deadline,
            log,
            stop,
        )
        .await;
        match result {
            ScriptResult::Exited(0) => {}
            ScriptResult::Exited(code) => log.line(&format!(
                "\x1b[0;33mWARNING: after_script failed, but job will continue unaffected: exit code {code}\x1b[0;m"
            )),
            ScriptResult::TimedOut => log.line(&format!(
                "\x1b[0;33mWARNING: after_script failed, but job will continue unaffected: execution took longer than {}s\x1b[0;m",
                limit.as_secs()
            )),
            ScriptResult::Stopped => log.line("\x1b[0;33mWARNING: after_script was stopped\x1b[0;m"),
            ScriptResult::SpawnFailed(why) => log.line(&format!(
                "\x1b[0;33mWARNING: after_script failed, but job will continue unaffected: {why}\x1b[0;m"
            )),
        }
        log.section_end("after_script");
    }

    log.section_start(
        "cleanup_file_variables",
        "Cleaning up project directory and file based variables",
    );
    if let Err(e) = std::fs::remove_dir_all(&tmp) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("job={job_id} Cannot remove `{}`: {e}", tmp.display());
        }
    }
    log.section_end("cleanup_file_variables");
    ending
}

/// `<build dir>.tmp`: scripts and file variables, removed after the job.
fn tmp_dir(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    dir.with_file_name(name)
}

fn prepare_dirs(dir: &Path, tmp: &Path) -> std::io::Result<()> {
    for d in [dir, tmp] {
        match std::fs::remove_dir_all(d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::create_dir_all(d)?;
    }
    Ok(())
}

/// Variables the runner adds, as GitLab Runner does.
fn runner_variables(builds_dir: &Path, dir: &Path) -> Vec<super::payload::Variable> {
    let var = |key: &str, value: String| super::payload::Variable {
        key: key.into(),
        value,
        public: true,
        raw: true,
        ..Default::default()
    };
    vec![
        var("CI_BUILDS_DIR", builds_dir.to_string_lossy().into_owned()),
        var("CI_PROJECT_DIR", dir.to_string_lossy().into_owned()),
        var("CI_SERVER", "yes".into()),
    ]
}

/// Clones the repository into the build directory when the job has one and
/// `GIT_STRATEGY` is not `none`. `fetch` behaves like `clone` here: the
/// build directory is always fresh. A failing clone fails the job with
/// `script_failure` and git's exit code, as in GitLab Runner (its
/// `get_sources` stage is a script like any other).
async fn get_sources(
    payload: &JobPayload,
    exports: &[ExportVar],
    dir: &Path,
    tmp: &Path,
    deadline: tokio::time::Instant,
    log: &JobLog,
    stop: &mut watch::Receiver<bool>,
) -> Option<ScriptResult> {
    let git = &payload.git_info;
    let strategy = payload.variable("GIT_STRATEGY").unwrap_or("clone");
    log.section_start("get_sources", "Getting source from Git repository");
    if strategy == "none" {
        log.line("\x1b[0KSkipping Git repository setup");
        log.section_end("get_sources");
        return None;
    }
    if git.repo_url.is_empty() {
        log.line("\x1b[0KSkipping Git repository setup: the job has no repository URL");
        log.section_end("get_sources");
        return None;
    }
    let depth = payload
        .variable("GIT_DEPTH")
        .and_then(|d| d.parse::<i64>().ok())
        .unwrap_or(git.depth);
    let display_url = strip_credentials(&git.repo_url);
    let mut commands = vec!["export GIT_TERMINAL_PROMPT=0".to_string()];
    let depth_args = if depth > 0 {
        format!("--depth {depth} ")
    } else {
        String::new()
    };
    if depth > 0 {
        commands.push(format!(
            "echo {}",
            shell::shell_quote(&format!(
                "Fetching changes with git depth set to {depth}..."
            ))
        ));
    } else {
        commands.push("echo 'Fetching changes...'".into());
    }
    commands.push(format!(
        "echo {}",
        shell::shell_quote(&format!("Cloning {display_url}"))
    ));
    let branch = match (git.ref_type.as_str(), depth > 0 && !git.git_ref.is_empty()) {
        ("branch" | "tag", true) => format!("--branch {} ", shell::shell_quote(&git.git_ref)),
        _ => String::new(),
    };
    commands.push(format!(
        "git clone -q --no-checkout {depth_args}{branch}-- {} .",
        shell::shell_quote(&git.repo_url)
    ));
    let target = if git.sha.is_empty() {
        git.git_ref.clone()
    } else {
        git.sha.clone()
    };
    if !target.is_empty() {
        let short: String = target.chars().take(8).collect();
        commands.push(format!(
            "echo {}",
            shell::shell_quote(&format!(
                "Checking out {short} as detached HEAD (ref is {})...",
                git.git_ref
            ))
        ));
        commands.push(format!(
            "git -c advice.detachedHead=false checkout -q -f {}",
            shell::shell_quote(&target)
        ));
    }
    // Run quietly: the clone URL may hold the job token (masked anyway).
    let script = build_quiet_script(exports, dir, &commands);
    let result = shell::run_script(
        &tmp.join("get_sources.sh"),
        &script,
        dir,
        deadline,
        log,
        stop,
    )
    .await;
    log.section_end("get_sources");
    Some(result)
}

/// A script that runs `commands` without echoing them.
fn build_quiet_script(exports: &[ExportVar], dir: &Path, commands: &[String]) -> String {
    let mut script = String::from("#!/usr/bin/env bash\nexec 2>&1\nset -eo pipefail\n");
    for var in exports {
        script.push_str(&format!(
            "export {}={}\n",
            var.key,
            shell::shell_quote(&var.value)
        ));
    }
    script.push_str(&format!(
        "cd -- {}\n",
        shell::shell_quote(&dir.to_string_lossy())
    ));
    for command in commands {
        script.push_str(command);
        script.push('\n');
    }
    script
}

/// `PUT /api/v4/jobs/:id`, retried on 5xx and network errors (about 15 s in
/// all) and while GitLab answers 202.
async fn send_status(
    client: &GitLabClient,
    job_token: &str,
    job_id: i64,
    outcome: &JobOutcome,
    log: &JobLog,
) {
    let (checksum, bytesize) = log.checksum();
    let (state, failure_reason, exit_code) = match outcome {
        JobOutcome::Success => ("success", None, None),
        JobOutcome::Failed {
            failure_reason,
            exit_code,
        } => ("failed", Some(failure_reason.clone()), *exit_code),
        JobOutcome::TimedOut => ("failed", Some("job_execution_timeout".to_string()), None),
        JobOutcome::Canceled => ("failed", Some("job_canceled".to_string()), None),
    };
    let update = UpdateJob {
        job_id,
        state: state.into(),
        failure_reason,
        exit_code,
        output: JobOutput { checksum, bytesize },
    };
    let mut delay = Duration::from_millis(500);
    for attempt in 1..=6 {
        match client.update_job(job_token, &update).await {
            Ok(UpdateResult::Accepted) => return,
            Ok(UpdateResult::Pending) => {
                tracing::debug!("job={job_id} Status update accepted, GitLab still processing (attempt {attempt})");
            }
            Ok(UpdateResult::Rejected(code)) => {
                tracing::warn!("job={job_id} GitLab refused the status update with HTTP {code}");
                return;
            }
            Err(e) => tracing::warn!("job={job_id} Status update failed (attempt {attempt}): {e}"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(4));
    }
    tracing::error!("job={job_id} Could not send the job's final status to GitLab");
}

/// A payload that cannot be run: report it failed with
/// `runner_system_failure` when its ID and token can be read.
async fn report_unparseable(
    ctx: &JobContext,
    raw: &Value,
    error: PayloadError,
    received: SystemTime,
) -> JobDone {
    let Some((job_id, token)) = error.id_and_token.clone() else {
        tracing::error!("Received a job payload that cannot be run or reported: {error}");
        return JobDone {
            job_id: None,
            outcome: None,
            flush: None,
        };
    };
    tracing::error!("job={job_id} Invalid job payload, reporting the job failed: {error}");
    let info = JobSpanInfo {
        job_id,
        ..Default::default()
    };
    let telemetry = ctx.telemetry.start_job(raw, &info, received);
    let log = JobLog::new(vec![token.clone()]);
    log.line(&format!(
        "\x1b[0KRunning with ci-runner {}",
        env!("CARGO_PKG_VERSION")
    ));
    let ending = Ending::system_failure(&format!("invalid job payload: {error}"));
    log.line(&ending.message);
    log.close();
    let (cancel_tx, _cancel_rx) = watch::channel(None);
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        trace::upload(
            ctx.client.clone(),
            job_id,
            token.clone(),
            log.clone(),
            cancel_tx,
        ),
    )
    .await;
    let end_time = SystemTime::now();
    send_status(&ctx.client, &token, job_id, &ending.outcome, &log).await;
    tracing::info!("job={job_id} Job failed reason=runner_system_failure exit_code=-");
    let flush = telemetry.finish(&ending.outcome, end_time);
    JobDone {
        job_id: Some(job_id),
        outcome: Some(ending.outcome),
        flush,
    }
}
