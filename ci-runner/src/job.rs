//! One job, from the payload to the final status, in GitLab Runner's build
//! stages, each a child span of `job_execution` (Phase 2) when telemetry is
//! on:
//!
//! ```text
//! prepare_executor   build directory, variables, shell (the shell executor pulls no image)
//! get_sources        git init/fetch/checkout/clean per GIT_STRATEGY, GIT_DEPTH (git.rs)
//! restore_cache      one span per cache entry whose policy pulls (cache.rs)
//! step_script        before_script + script; or, for a `run:` job, one
//!                    `ci_function` span per CI Function instead (functions.rs)
//! after_script       its own shell; failure is only a warning for the job
//! archive_cache      one span per entry whose policy pushes and whose `when`
//!                    matches; `archive_cache_on_failure` after a failure
//! upload_artifacts   one span per artifact entry whose `when` matches;
//!                    `upload_artifacts_on_failure` after a failure (artifacts.rs)
//! ```
//!
//! A stage that does not run has no span. Every stage span has
//! `ci.stage.status` (`success|failed|skipped`); a failed stage has status
//! Error with a message. Each span ends, and so is exported, when its stage
//! ends. After a timeout, cancel or abort only the log and the status
//! follow (no after_script, cache or artifacts), as before.
//!
//! Build directories are per project and stable, `<builds_dir>/<slot>/<project
//! path>`, the slot being the lowest one no running job of this process
//! holds for that project (GitLab Runner's concurrent ID, without the token
//! prefix), so `GIT_STRATEGY=fetch` finds the previous checkout.
//!
//! **Architecture Invariant:** the status update to GitLab never waits for
//! telemetry. `job_execution` ends at the job's end, after the status is
//! sent its export is flushed in the background by the caller
//! ([`JobDone::flush`]).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::FutureExt;
use opentelemetry::{Array, KeyValue, StringValue, Value as OtelValue};
use serde_json::Value;
use tokio::sync::watch;

use super::api::{GitLabClient, JobOutput, UpdateJob, UpdateResult};
use super::artifacts::{self, Preparation};
use super::cache;
use super::deliver::Patience;
use super::functions;
use super::git;
use super::payload::{CacheEntry, FunctionCall, JobPayload, PayloadError};
use super::shell::{self, ExportVar, ScriptResult};
use super::trace::{self, JobLog, StopRequest};
use runner_telemetry::job::{
    ChildSpan, JobOutcome, JobSpanInfo, JobTelemetry, PendingFlush, SpanOutcome,
};
use runner_telemetry::keys;
use runner_telemetry::negotiate::{self, NegotiationOptions};
use runner_telemetry::telemetry::RunnerTelemetry;

/// Default `after_script` timeout (GitLab's).
pub const AFTER_SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);
/// Name of the span of one CI Function invocation (Phase 3). One fixed,
/// low-cardinality name; the function's own name is `ci.function.name`.
pub const FUNCTION_SPAN_NAME: &str = "ci_function";

/// In debug builds, a job variable that makes the job's task panic (value
/// `execute`): how the tests reach the panic handling.
pub const DEBUG_PANIC_VARIABLE: &str = "CI_RUNNER_DEBUG_PANIC";

/// Stage span names (GitLab Runner's build stage names).
pub mod stages {
    pub const PREPARE_EXECUTOR: &str = "prepare_executor";
    pub const GET_SOURCES: &str = "get_sources";
    pub const RESTORE_CACHE: &str = "restore_cache";
    pub const STEP_SCRIPT: &str = "step_script";
    pub const AFTER_SCRIPT: &str = "after_script";
    pub const ARCHIVE_CACHE: &str = "archive_cache";
    pub const ARCHIVE_CACHE_ON_FAILURE: &str = "archive_cache_on_failure";
    pub const UPLOAD_ARTIFACTS: &str = "upload_artifacts";
    pub const UPLOAD_ARTIFACTS_ON_FAILURE: &str = "upload_artifacts_on_failure";
}

/// What a job needs from its runner.
#[derive(Debug)]
pub struct JobContext {
    pub client: GitLabClient,
    pub runner_name: String,
    pub gitlab_url: String,
    pub builds_dir: PathBuf,
    /// The slots of `builds_dir` in use, shared with the manager's other
    /// runners.
    pub build_dirs: BuildDirs,
    /// The local cache: `<cache_dir>/<project path>/<key>/cache.zip`.
    pub cache_dir: PathBuf,
    pub telemetry: RunnerTelemetry,
    /// How long the end of a job's log and its final status are retried.
    pub patience: Patience,
}

/// The end of a job.
#[derive(Debug)]
pub struct JobDone {
    pub job_id: Option<i64>,
    pub outcome: Option<JobOutcome>,
    /// The telemetry flush, to run in the background.
    pub flush: Option<PendingFlush>,
    /// False when GitLab never got the job's final status (the job is lost:
    /// it stays `running` there).
    pub delivered: bool,
    /// The job's task panicked; the job was failed with
    /// `runner_system_failure`.
    pub panicked: bool,
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

    /// A failure for `failure_reason`, ending the log with `message`.
    fn failed(failure_reason: &str, exit_code: Option<i32>, message: String) -> Self {
        Ending {
            outcome: JobOutcome::Failed {
                failure_reason: failure_reason.into(),
                exit_code,
            },
            message,
        }
    }

    fn script_failure(code: i32) -> Self {
        Self::failed(
            "script_failure",
            Some(code),
            format!("\x1b[31;1mERROR: Job failed: exit code {code}\x1b[0;m"),
        )
    }

    /// A `script_failure` that is not a script's exit code (a CI Function
    /// that cannot be resolved, an artifact upload that failed).
    fn script_failure_because(why: &str) -> Self {
        Self::failed(
            "script_failure",
            None,
            format!("\x1b[31;1mERROR: Job failed: {why}\x1b[0;m"),
        )
    }

    fn system_failure(why: &str) -> Self {
        Self::failed(
            "runner_system_failure",
            None,
            format!("\x1b[31;1mERROR: Job failed (system failure): {why}\x1b[0;m"),
        )
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

/// How a stage ended, for its span.
#[derive(Debug, Clone, PartialEq, Eq)]
enum StageEnd {
    Success,
    /// Ran, had nothing to do.
    Skipped,
    Failed(String),
}

/// Ends a stage span with `ci.stage.status` and the matching span status.
fn end_stage(mut span: ChildSpan, end: StageEnd) {
    let (status, outcome) = match end {
        StageEnd::Success => ("success", SpanOutcome::Ok),
        StageEnd::Skipped => ("skipped", SpanOutcome::Unset),
        StageEnd::Failed(message) => ("failed", SpanOutcome::Error(message)),
    };
    span.set_attribute(KeyValue::new(keys::CI_STAGE_STATUS, status));
    span.end(outcome);
}

/// A script's result as a stage end, plus its exit code.
fn script_stage_end(result: &ScriptResult, timeout: Duration) -> (StageEnd, Option<i32>) {
    match result {
        ScriptResult::Exited(0) => (StageEnd::Success, Some(0)),
        ScriptResult::Exited(code) => (StageEnd::Failed(format!("exit code {code}")), Some(*code)),
        ScriptResult::TimedOut => (
            StageEnd::Failed(format!("execution took longer than {}s", timeout.as_secs())),
            None,
        ),
        ScriptResult::Stopped => (
            StageEnd::Failed("stopped (canceled or aborted)".into()),
            None,
        ),
        ScriptResult::SpawnFailed(why) => (StageEnd::Failed(why.clone()), None),
    }
}

/// The build directories held by running jobs. The runner manager owns one
/// set for all its runners (they may share a `builds_dir`) and hands a clone
/// to each [`JobContext`].
#[derive(Debug, Clone, Default)]
pub struct BuildDirs {
    busy: Arc<Mutex<BTreeSet<PathBuf>>>,
}

impl BuildDirs {
    /// The lowest free slot of the project: `<builds_dir>/<slot>/<path>`,
    /// held until the returned [`BuildSlot`] is dropped.
    pub fn acquire(&self, builds_dir: &Path, project_path: &str) -> BuildSlot {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let mut slot = 0;
        loop {
            let dir = shell::build_dir(builds_dir, slot, project_path);
            if busy.insert(dir.clone()) {
                return BuildSlot {
                    dir,
                    owner: self.clone(),
                };
            }
            slot += 1;
        }
    }
}

/// A project's build directory, held while its job runs.
#[derive(Debug)]
pub struct BuildSlot {
    dir: PathBuf,
    owner: BuildDirs,
}

impl Drop for BuildSlot {
    fn drop(&mut self) {
        self.owner
            .busy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.dir);
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
        job_id,
        name = ?payload.job_info.name,
        stage = ?payload.job_info.stage,
        project = ?payload.job_info.project_full_path,
        pipeline_id = payload.job_info.pipeline_id,
        timeout = %format_args!("{}s", payload.timeout_secs),
        "Job received"
    );
    let span_info = payload.span_info(&ctx.gitlab_url);
    let mut telemetry = ctx.telemetry.start_job(&raw, &span_info, received);
    if telemetry.is_enabled() && uses_derived_trace_id(ctx.telemetry.settings().negotiation, &raw) {
        if let Some(derived) = negotiate::derived_trace_context(&raw) {
            tracing::info!(
                job_id,
                trace_id = %derived.trace_id(),
                "Telemetry trace id derived from the pipeline id (the payload has no trace context): `job_execution` is a root span"
            );
        }
    }
    telemetry.mask_secrets(payload.secrets());
    if let Some(queued) = payload.job_info.time_in_queue_seconds {
        telemetry.set_attribute(KeyValue::new(keys::CI_JOB_QUEUED_DURATION, queued));
    }

    let log = JobLog::new(payload.secrets());
    if let Some(records) = telemetry.logs() {
        log.export_records(records);
    }
    let (cancel_tx, cancel_rx) = watch::channel(None::<StopRequest>);
    let uploader = tokio::spawn(trace::upload(
        ctx.client.clone(),
        job_id,
        payload.token.clone(),
        log.clone(),
        cancel_tx,
        ctx.patience.clone(),
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

    let mut job = Job {
        ctx,
        payload: &payload,
        log: &log,
        telemetry: &mut telemetry,
        abort: &abort,
        cancel: &cancel_rx,
    };
    // A panic anywhere in the job's stages fails the job (and only it).
    let executed = std::panic::AssertUnwindSafe(job.execute(&mut stop_rx))
        .catch_unwind()
        .await;
    let (ending, panicked) = match executed {
        Ok(ending) => (ending, false),
        Err(panic) => {
            let why = panic_message(panic.as_ref());
            tracing::error!(job_id, "The job's task panicked, failing the job: {why}");
            (
                Ending::system_failure(&format!("the runner failed internally: {why}")),
                true,
            )
        }
    };
    stop_watcher.abort();

    log.line("");
    log.line(&ending.message);
    log.close();
    // The whole log reaches GitLab before the final update.
    let log_complete = uploader.await.unwrap_or(false);
    let end_time = SystemTime::now();

    let delivered = send_status(
        &ctx.client,
        &payload.token,
        job_id,
        &ending.outcome,
        &log,
        &ctx.patience,
    )
    .await;
    if delivered && !log_complete {
        tracing::error!(
            job_id,
            "GitLab has the job's final status but not the end of its log"
        );
    }
    let duration = format!("{:.3}s", started.elapsed().as_secs_f64());
    match &ending.outcome {
        JobOutcome::Success => tracing::info!(job_id, duration = %duration, "Job succeeded"),
        JobOutcome::Failed {
            failure_reason,
            exit_code,
        } => tracing::info!(
            job_id,
            reason = %failure_reason,
            exit_code,
            duration = %duration,
            "Job failed"
        ),
        JobOutcome::TimedOut => tracing::info!(
            job_id,
            reason = %"job_execution_timeout",
            duration = %duration,
            "Job failed"
        ),
        JobOutcome::Canceled => tracing::info!(job_id, duration = %duration, "Job canceled"),
    }

    let flush = telemetry.finish(&ending.outcome, end_time);
    JobDone {
        job_id: Some(job_id),
        outcome: Some(ending.outcome),
        flush,
        delivered,
        panicked,
    }
}

/// The message of a panic payload.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        (*text).to_string()
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text.clone()
    } else {
        "unknown panic".to_string()
    }
}

/// Whether negotiation took the old-GitLab fallback for this payload.
fn uses_derived_trace_id(options: NegotiationOptions, raw: &Value) -> bool {
    let absent = |v: Option<&Value>| v.is_none_or(Value::is_null);
    options.derive_trace_id_from_pipeline
        && absent(raw.get("trace_context"))
        && absent(raw.get("features").and_then(|f| f.get("tracing")))
}

/// One running job: what its stages share.
struct Job<'a> {
    ctx: &'a JobContext,
    payload: &'a JobPayload,
    log: &'a JobLog,
    telemetry: &'a mut JobTelemetry,
    abort: &'a watch::Receiver<bool>,
    cancel: &'a watch::Receiver<Option<StopRequest>>,
}

/// What the stages after `prepare_executor` work in.
struct Workspace {
    slot: BuildSlot,
    tmp: PathBuf,
    exports: Vec<ExportVar>,
}

impl Workspace {
    /// Writes `script` to `file_name` in the temporary directory and runs it
    /// in the build directory.
    async fn run_script(
        &self,
        file_name: impl AsRef<Path>,
        script: &str,
        deadline: tokio::time::Instant,
        log: &JobLog,
        stop: &mut watch::Receiver<bool>,
    ) -> ScriptResult {
        shell::run_script(
            &self.tmp.join(file_name),
            script,
            self.dir(),
            deadline,
            log,
            stop,
        )
        .await
    }

    fn dir(&self) -> &Path {
        &self.slot.dir
    }
}

impl Job<'_> {
    fn job_id(&self) -> i64 {
        self.payload.id
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.payload.timeout_secs)
    }

    /// The ending of a script that did not exit 0.
    fn ending_of(&self, result: &ScriptResult) -> Option<Ending> {
        match result {
            ScriptResult::Exited(0) => None,
            ScriptResult::Exited(code) => Some(Ending::script_failure(*code)),
            ScriptResult::TimedOut => Some(Ending::timed_out(self.timeout())),
            ScriptResult::Stopped => Some(self.stopped()),
            ScriptResult::SpawnFailed(why) => Some(Ending::system_failure(why)),
        }
    }

    fn stopped(&self) -> Ending {
        if *self.abort.borrow() {
            Ending::system_failure("the runner is shutting down and aborted the job")
        } else if self.cancel.borrow().is_some() {
            Ending::canceled()
        } else {
            Ending::system_failure("the job was stopped")
        }
    }

    async fn execute(&mut self, stop: &mut watch::Receiver<bool>) -> Ending {
        // Debug builds only: a job can ask for a panic, so the tests can show
        // that a panic fails that job and nothing else.
        #[cfg(debug_assertions)]
        if self.payload.variable(DEBUG_PANIC_VARIABLE) == Some("execute") {
            panic!("{DEBUG_PANIC_VARIABLE} asked for a panic");
        }
        let deadline = deadline_after(self.timeout());
        self.log.line(&format!(
            "\x1b[0KRunning with ci-runner {} (reference runner)",
            env!("CARGO_PKG_VERSION")
        ));
        self.log
            .line(&format!("\x1b[0K  on {}", self.ctx.runner_name));

        let workspace = match self.prepare_executor() {
            Ok(workspace) => workspace,
            Err(ending) => return ending,
        };

        let mut ending = self.get_sources(&workspace, deadline, stop).await;
        if ending.is_none() {
            self.restore_cache(&workspace).await;
            ending = Some(match &self.payload.run {
                Some(calls) => self.run_functions(calls, &workspace, deadline, stop).await,
                None => self.step_script(&workspace, deadline, stop).await,
            });
        }
        let mut ending = ending.expect("set above");

        // after_script, cache and artifacts run after success and failure
        // alike; not after a timeout, cancel or abort.
        let eligible = matches!(
            ending.outcome,
            JobOutcome::Success | JobOutcome::Failed { .. }
        ) && !*stop.borrow();
        if eligible {
            self.after_script(&workspace, &ending, stop).await;
            self.archive_caches(&workspace, ending.is_success()).await;
            if let Some(failed) = self.upload_artifacts(&workspace, ending.is_success()).await {
                if ending.is_success() {
                    ending = failed;
                }
            }
        }

        self.log.section_start(
            "cleanup_file_variables",
            "Cleaning up project directory and file based variables",
        );
        if let Err(e) = std::fs::remove_dir_all(&workspace.tmp) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(
                    job_id = self.job_id(),
                    "Cannot remove `{}`: {e}",
                    workspace.tmp.display()
                );
            }
        }
        self.log.section_end("cleanup_file_variables");
        drop(workspace);
        ending
    }

    /// `prepare_executor` (and GitLab's `prepare_script`): the build
    /// directory and the job's variables.
    fn prepare_executor(&mut self) -> Result<Workspace, Ending> {
        let job_id = self.job_id();
        let log = self.log;
        let span = self.telemetry.child(
            stages::PREPARE_EXECUTOR,
            vec![
                KeyValue::new(keys::CI_RUNNER_EXECUTOR, "shell"),
                KeyValue::new(keys::CI_EXECUTOR_SHELL, "bash"),
            ],
        );
        log.section_start("prepare_executor", "Preparing the \"shell\" executor");
        log.line("\x1b[0KUsing Shell (bash) executor...");
        if let Some(image) = &self.payload.image {
            // As GitLab Runner's shell executor: the image is not used.
            log.line(&format!(
                "\x1b[0;33mWARNING: the shell executor runs the job on the host: image `{image}` is ignored\x1b[0;m"
            ));
            tracing::info!(job_id, "The shell executor ignores image `{image}`");
        }
        log.section_end("prepare_executor");

        log.section_start("prepare_script", "Preparing environment");
        log.line(&format!("Running on {}...", super::config::hostname()));
        let slot = self.ctx.build_dirs.acquire(
            &self.ctx.builds_dir,
            &self.payload.job_info.project_full_path,
        );
        let tmp = tmp_dir(&slot.dir);
        let prepared = prepare_dirs(&slot.dir, &tmp).and_then(|()| {
            let mut variables = self.payload.variables.clone();
            variables.extend(runner_variables(&self.ctx.builds_dir, &slot.dir));
            shell::prepare_variables(&variables, &tmp)
        });
        log.section_end("prepare_script");
        match prepared {
            Ok((exports, skipped)) => {
                for key in skipped {
                    log.line(&format!(
                        "\x1b[0;33mWARNING: variable `{key}` is not a valid shell name and was not exported\x1b[0;m"
                    ));
                }
                end_stage(span, StageEnd::Success);
                Ok(Workspace { slot, tmp, exports })
            }
            Err(e) => {
                tracing::error!(
                    job_id,
                    "Cannot prepare the build directory `{}`: {e}",
                    slot.dir.display()
                );
                let why = format!("cannot prepare the build directory: {e}");
                end_stage(span, StageEnd::Failed(why.clone()));
                Err(Ending::system_failure(&why))
            }
        }
    }

    /// `get_sources`: `None` when the job goes on.
    async fn get_sources(
        &mut self,
        ws: &Workspace,
        deadline: tokio::time::Instant,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<Ending> {
        let log = self.log;
        log.section_start("get_sources", "Getting source from Git repository");
        let plan = match git::plan(self.payload, ws.dir()) {
            Ok(plan) => plan,
            Err(why) => {
                let span = self.telemetry.child(stages::GET_SOURCES, vec![]);
                log.line(&format!("\x1b[31;1mERROR: {why}\x1b[0;m"));
                log.section_end("get_sources");
                end_stage(span, StageEnd::Failed(why.clone()));
                return Some(Ending::system_failure(&why));
            }
        };
        let mut attributes = vec![
            KeyValue::new(keys::CI_GIT_STRATEGY, plan.strategy.as_str()),
            KeyValue::new(keys::CI_GIT_OPERATION, plan.operation),
            KeyValue::new(keys::CI_GIT_DEPTH, plan.depth),
        ];
        if let Some(filter) = &plan.filter {
            attributes.push(KeyValue::new(keys::CI_GIT_FILTER, filter.clone()));
        }
        let span = self.telemetry.child(stages::GET_SOURCES, attributes);
        let reset = match (plan.strategy, plan.operation) {
            (git::Strategy::Empty, _) | (_, "clone") => recreate_dir(ws.dir()),
            _ => Ok(()),
        };
        if let Err(e) = reset {
            let why = format!("cannot clean the build directory: {e}");
            log.section_end("get_sources");
            end_stage(span, StageEnd::Failed(why.clone()));
            return Some(Ending::system_failure(&why));
        }
        if plan.operation == "none" {
            log.line(match plan.strategy {
                git::Strategy::Empty => {
                    "\x1b[0KSkipping Git repository setup and creating an empty build directory"
                }
                _ if self.payload.git_info.repo_url.is_empty() => {
                    "\x1b[0KSkipping Git repository setup: the job has no repository URL"
                }
                _ => "\x1b[0KSkipping Git repository setup",
            });
            log.section_end("get_sources");
            end_stage(span, StageEnd::Success);
            return None;
        }
        log.line(&git::describe(&self.payload.git_info));
        let commands = git::commands(&plan, &self.payload.git_info);
        // Quiet: the clone URL may hold the job token (masked anyway).
        let script = build_quiet_script(&ws.exports, ws.dir(), &commands);
        let result = ws
            .run_script("get_sources.sh", &script, deadline, log, stop)
            .await;
        log.section_end("get_sources");
        let (end, _) = script_stage_end(&result, self.timeout());
        end_stage(
            span,
            match end {
                StageEnd::Failed(why) => StageEnd::Failed(format!("git failed: {why}")),
                other => other,
            },
        );
        self.ending_of(&result)
    }

    /// Opens a cache stage span for `entry` (with its policy) and resolves
    /// the entry's key onto it. When the key does not resolve, logs a
    /// warning ending in `not_done`, fails the span and returns `None`.
    fn cache_stage(
        &mut self,
        name: &'static str,
        entry: &CacheEntry,
        ws: &Workspace,
        not_done: &str,
    ) -> Option<(ChildSpan, String)> {
        let mut span = self.telemetry.child(
            name,
            vec![KeyValue::new(keys::CI_CACHE_POLICY, entry.policy.clone())],
        );
        match cache::resolve_key(&entry.key, &ws.exports) {
            Ok(key) => {
                span.set_attribute(KeyValue::new(keys::CI_CACHE_KEY, key.clone()));
                Some((span, key))
            }
            Err(why) => {
                self.log
                    .line(&format!("\x1b[0;33mWARNING: {why}: {not_done}\x1b[0;m"));
                span.set_attribute(KeyValue::new(keys::CI_CACHE_KEY, entry.key.clone()));
                end_stage(span, StageEnd::Failed(why));
                None
            }
        }
    }

    /// `restore_cache`: one span per entry that pulls. Never fails the job.
    async fn restore_cache(&mut self, ws: &Workspace) {
        let entries: Vec<_> = self
            .payload
            .caches
            .iter()
            .filter(|c| c.policy != "push")
            .cloned()
            .collect();
        if entries.is_empty() {
            return;
        }
        let log = self.log;
        log.section_start("restore_cache", "Restoring cache");
        for entry in entries {
            let Some((mut span, key)) =
                self.cache_stage(stages::RESTORE_CACHE, &entry, ws, "cache not restored")
            else {
                continue;
            };
            let (candidates, warnings) = cache::restore_candidates(
                &entry,
                &key,
                &ws.exports,
                self.payload.variable(cache::CACHE_FALLBACK_KEY),
            );
            for warning in warnings {
                log.line(&format!("\x1b[0;33mWARNING: {warning}\x1b[0;m"));
            }
            let cache_dir = self.ctx.cache_dir.clone();
            let project = self.payload.job_info.project_full_path.clone();
            let dir = ws.dir().to_path_buf();
            let restored = tokio::task::spawn_blocking(move || {
                cache::restore(&cache_dir, &project, &candidates, &dir)
            })
            .await
            .unwrap_or_else(|e| Err(format!("restoring the cache panicked: {e}")));
            match restored {
                Ok(restored) => {
                    for line in &restored.lines {
                        log.line(line);
                    }
                    let hit = restored.matched.is_some();
                    span.set_attribute(KeyValue::new(keys::CI_CACHE_HIT, hit));
                    if hit {
                        span.set_attribute(KeyValue::new(
                            keys::CI_CACHE_SIZE_BYTES,
                            restored.size_bytes as i64,
                        ));
                    }
                    if let Some(matched) = restored.matched.filter(|m| *m != key) {
                        span.set_attribute(KeyValue::new(keys::CI_CACHE_MATCHED_KEY, matched));
                    }
                    end_stage(span, StageEnd::Success);
                }
                Err(why) => {
                    log.line(&format!("\x1b[0;33mWARNING: {why}\x1b[0;m"));
                    span.set_attribute(KeyValue::new(keys::CI_CACHE_HIT, false));
                    end_stage(span, StageEnd::Failed(why));
                }
            }
        }
        log.section_end("restore_cache");
    }

    /// `step_script`: `before_script` + `script` in one shell.
    async fn step_script(
        &mut self,
        ws: &Workspace,
        deadline: tokio::time::Instant,
        stop: &mut watch::Receiver<bool>,
    ) -> Ending {
        let commands = self
            .payload
            .step("script")
            .map(|s| s.script.clone())
            .unwrap_or_default();
        let mut span = self.telemetry.child(stages::STEP_SCRIPT, vec![]);
        self.log.section_start(
            "step_script",
            "Executing \"step_script\" stage of the job script",
        );
        let mut exports = ws.exports.clone();
        exports.extend(trace_context_env(&span));
        let script = shell::build_script(&exports, ws.dir(), &commands);
        let result = ws
            .run_script("step_script.sh", &script, deadline, self.log, stop)
            .await;
        self.log.section_end("step_script");
        let (end, code) = script_stage_end(&result, self.timeout());
        if let Some(code) = code {
            span.set_attribute(KeyValue::new(keys::CI_SCRIPT_EXIT_CODE, i64::from(code)));
        }
        end_stage(span, end);
        self.ending_of(&result).unwrap_or_else(Ending::success)
    }

    /// CI Functions, in order, in place of `step_script`; the first failure
    /// ends the job.
    async fn run_functions(
        &mut self,
        calls: &[FunctionCall],
        ws: &Workspace,
        deadline: tokio::time::Instant,
        stop: &mut watch::Receiver<bool>,
    ) -> Ending {
        let log = self.log;
        log.section_start("step_run", "Executing \"step_run\" stage of the job script");
        let mut ending = Ending::success();
        for (index, call) in calls.iter().enumerate() {
            let mut span = self
                .telemetry
                .child(FUNCTION_SPAN_NAME, function_attributes(call));
            log.line(&format!(
                "\x1b[32;1mRunning function `{}` ({} of {})\x1b[0;m",
                call.name,
                index + 1,
                calls.len()
            ));
            let resolved = functions::resolve(call, ws.dir(), &ws.exports);
            let resolved = match resolved {
                Ok(resolved) => resolved,
                Err(why) => {
                    log.line(&format!(
                        "\x1b[31;1mERROR: function `{}`: {why}\x1b[0;m",
                        call.name
                    ));
                    span.set_attribute(KeyValue::new(keys::CI_FUNCTION_STATUS, "failed"));
                    span.end(SpanOutcome::Error(why.clone()));
                    ending = Ending::script_failure_because(&format!(
                        "function `{}` failed: {why}",
                        call.name
                    ));
                    break;
                }
            };
            let script = resolved.script(&ws.exports, ws.dir());
            let result = ws
                .run_script(format!("function_{index}.sh"), &script, deadline, log, stop)
                .await;
            let (end, code) = script_stage_end(&result, self.timeout());
            if let Some(code) = code {
                span.set_attribute(KeyValue::new(keys::CI_SCRIPT_EXIT_CODE, i64::from(code)));
            }
            match end {
                StageEnd::Failed(why) => {
                    span.set_attribute(KeyValue::new(keys::CI_FUNCTION_STATUS, "failed"));
                    span.end(SpanOutcome::Error(format!(
                        "function `{}`: {why}",
                        call.name
                    )));
                    ending = self.ending_of(&result).unwrap_or_else(Ending::success);
                    break;
                }
                _ => {
                    span.set_attribute(KeyValue::new(keys::CI_FUNCTION_STATUS, "success"));
                    span.end(SpanOutcome::Ok);
                }
            }
        }
        log.section_end("step_run");
        ending
    }

    /// `after_script`, in its own shell; its failure is a warning.
    async fn after_script(
        &mut self,
        ws: &Workspace,
        ending: &Ending,
        stop: &mut watch::Receiver<bool>,
    ) {
        let Some(step) = self
            .payload
            .step("after_script")
            .filter(|s| !s.script.is_empty())
        else {
            return;
        };
        let log = self.log;
        let mut span = self.telemetry.child(stages::AFTER_SCRIPT, vec![]);
        log.section_start("after_script", "Running after_script");
        let limit = step
            .timeout_secs
            .map(Duration::from_secs)
            .unwrap_or(AFTER_SCRIPT_TIMEOUT)
            .min(self.timeout());
        let mut exports = ws.exports.clone();
        exports.push(ExportVar {
            key: "CI_JOB_STATUS".into(),
            value: if ending.is_success() {
                "success"
            } else {
                "failed"
            }
            .into(),
        });
        let script = shell::build_script(&exports, ws.dir(), &step.script);
        let after_deadline = deadline_after(limit);
        let result = ws
            .run_script("after_script.sh", &script, after_deadline, log, stop)
            .await;
        match &result {
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
        let (end, code) = script_stage_end(&result, limit);
        if let Some(code) = code {
            span.set_attribute(KeyValue::new(keys::CI_SCRIPT_EXIT_CODE, i64::from(code)));
        }
        end_stage(span, end);
    }

    /// `archive_cache` / `archive_cache_on_failure`: one span per entry
    /// that pushes and whose `when` matches. Never fails the job.
    async fn archive_caches(&mut self, ws: &Workspace, success: bool) {
        let entries: Vec<_> = self
            .payload
            .caches
            .iter()
            .filter(|c| c.policy != "pull" && when_matches(&c.when, success))
            .cloned()
            .collect();
        if entries.is_empty() {
            return;
        }
        let (name, section) = if success {
            (stages::ARCHIVE_CACHE, "Saving cache for successful job")
        } else {
            (
                stages::ARCHIVE_CACHE_ON_FAILURE,
                "Saving cache for failed job",
            )
        };
        let log = self.log;
        log.section_start(name, section);
        for entry in entries {
            let Some((mut span, key)) = self.cache_stage(name, &entry, ws, "cache not saved")
            else {
                continue;
            };
            let cache_dir = self.ctx.cache_dir.clone();
            let project = self.payload.job_info.project_full_path.clone();
            let dir = ws.dir().to_path_buf();
            let archived = tokio::task::spawn_blocking(move || {
                cache::archive(&cache_dir, &project, &key, &entry, &dir)
            })
            .await
            .unwrap_or_else(|e| Err(format!("archiving the cache panicked: {e}")));
            match archived {
                Ok(archived) => {
                    for line in &archived.lines {
                        log.line(line);
                    }
                    span.set_attribute(KeyValue::new(
                        keys::CI_CACHE_SIZE_BYTES,
                        archived.size_bytes as i64,
                    ));
                    span.set_attribute(KeyValue::new(
                        keys::CI_CACHE_COUNT,
                        archived.entries as i64,
                    ));
                    let end = if archived.entries == 0 {
                        StageEnd::Skipped
                    } else {
                        StageEnd::Success
                    };
                    end_stage(span, end);
                }
                Err(why) => {
                    log.line(&format!("\x1b[0;33mWARNING: {why}\x1b[0;m"));
                    end_stage(span, StageEnd::Failed(why));
                }
            }
        }
        log.section_end(name);
    }

    /// `upload_artifacts` / `upload_artifacts_on_failure`: one span per
    /// entry whose `when` matches. Returns the job's new ending when an
    /// upload failed.
    async fn upload_artifacts(&mut self, ws: &Workspace, success: bool) -> Option<Ending> {
        let entries: Vec<_> = self
            .payload
            .artifacts
            .iter()
            .filter(|a| when_matches(&a.when, success))
            .cloned()
            .collect();
        if entries.is_empty() {
            return None;
        }
        let (name, section) = if success {
            (
                stages::UPLOAD_ARTIFACTS,
                "Uploading artifacts for successful job",
            )
        } else {
            (
                stages::UPLOAD_ARTIFACTS_ON_FAILURE,
                "Uploading artifacts for failed job",
            )
        };
        let log = self.log;
        log.section_start(name, section);
        let mut failed = None;
        for entry in entries {
            let artifact_name = artifacts::artifact_name(&entry, &ws.exports);
            let mut span = self.telemetry.child(
                name,
                vec![
                    KeyValue::new(keys::CI_ARTIFACT_NAME, artifact_name),
                    KeyValue::new(keys::CI_ARTIFACT_TYPE, entry.artifact_type.clone()),
                    KeyValue::new(keys::CI_ARTIFACT_FORMAT, entry.artifact_format.clone()),
                ],
            );
            let exports = ws.exports.clone();
            let dir = ws.dir().to_path_buf();
            let tmp = ws.tmp.clone();
            let prepared = tokio::task::spawn_blocking(move || {
                artifacts::prepare(&entry, &exports, &dir, &tmp)
            })
            .await
            .unwrap_or_else(|e| Err(format!("archiving the artifacts panicked: {e}")));
            let prepared = match prepared {
                Ok(Preparation::Ready(prepared)) => prepared,
                Ok(Preparation::Nothing { lines, .. }) => {
                    for line in &lines {
                        log.line(line);
                    }
                    span.set_attribute(KeyValue::new(keys::CI_ARTIFACT_COUNT, 0_i64));
                    end_stage(span, StageEnd::Skipped);
                    continue;
                }
                Err(why) => {
                    log.line(&format!("\x1b[31;1mERROR: {why}\x1b[0;m"));
                    end_stage(span, StageEnd::Failed(why.clone()));
                    failed.get_or_insert(Ending::script_failure_because(&why));
                    continue;
                }
            };
            for line in &prepared.lines {
                log.line(line);
            }
            span.set_attribute(KeyValue::new(
                keys::CI_ARTIFACT_SIZE_BYTES,
                prepared.upload.data.len() as i64,
            ));
            span.set_attribute(KeyValue::new(
                keys::CI_ARTIFACT_COUNT,
                prepared.entries as i64,
            ));
            match artifacts::upload(
                &self.ctx.client,
                self.job_id(),
                &self.payload.token,
                &prepared.upload,
            )
            .await
            {
                Ok(line) => {
                    log.line(&line);
                    end_stage(span, StageEnd::Success);
                }
                Err(why) => {
                    log.line(&format!("\x1b[31;1mERROR: {why}\x1b[0;m"));
                    end_stage(span, StageEnd::Failed(why.clone()));
                    failed.get_or_insert(Ending::script_failure_because(&why));
                }
            }
        }
        log.section_end(name);
        failed
    }
}

/// `TRACEPARENT` (and `TRACESTATE`) of `span`, as OpenTelemetry's
/// environment-variable carrier specifies, so that instrumented tools in the
/// job join its trace (with their own exporter settings). None when the
/// span does not record (telemetry off).
fn trace_context_env(span: &ChildSpan) -> Vec<ExportVar> {
    let Some(context) = span.span_context().filter(|c| c.is_valid()) else {
        return Vec::new();
    };
    let mut vars = vec![ExportVar {
        key: "TRACEPARENT".into(),
        value: format!(
            "00-{}-{}-{:02x}",
            context.trace_id(),
            context.span_id(),
            context.trace_flags().to_u8()
        ),
    }];
    let state = context.trace_state().header();
    if !state.is_empty() {
        vars.push(ExportVar {
            key: "TRACESTATE".into(),
            value: state,
        });
    }
    vars
}

/// `now + timeout`, or a year from now when that does not fit an `Instant`
/// (payload values are clamped, this is the last line of defence).
fn deadline_after(timeout: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(timeout)
        .or_else(|| now.checked_add(Duration::from_secs(365 * 86_400)))
        .unwrap_or(now)
}

/// Whether a `when` (`on_success|on_failure|always`) applies.
fn when_matches(when: &str, success: bool) -> bool {
    match when {
        "always" => true,
        "on_failure" => !success,
        _ => success,
    }
}

/// The attributes a `ci_function` span starts with: names, never values.
fn function_attributes(call: &FunctionCall) -> Vec<KeyValue> {
    let mut attributes = vec![
        KeyValue::new(keys::CI_FUNCTION_NAME, call.name.clone()),
        KeyValue::new(keys::CI_FUNCTION_VERSION, call.version()),
        KeyValue::new(keys::CI_FUNCTION_KIND, call.kind_name()),
        KeyValue::new(
            keys::CI_FUNCTION_INPUTS,
            OtelValue::Array(Array::String(
                call.input_names()
                    .into_iter()
                    .map(StringValue::from)
                    .collect(),
            )),
        ),
    ];
    if let Some(reference) = call.reference() {
        attributes.push(KeyValue::new(keys::CI_FUNCTION_REF, reference));
    }
    attributes
}

/// `<build dir>.tmp`: scripts and file variables, removed after the job.
fn tmp_dir(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    dir.with_file_name(name)
}

/// The build directory is kept (`get_sources` decides what to do with it);
/// the tmp directory starts empty.
fn prepare_dirs(dir: &Path, tmp: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    recreate_dir(tmp)
}

fn recreate_dir(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(dir)
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

/// `PUT /api/v4/jobs/:id`, retried with backoff (honouring `Retry-After`)
/// on 5xx, 429, timeouts and network errors, and while GitLab answers 202,
/// for as long as `patience` allows. Returns whether GitLab accepted or
/// refused it for good (a 4xx other than 429: the job is no longer ours);
/// false means the status is lost, said in an ERROR line.
pub async fn send_status(
    client: &GitLabClient,
    job_token: &str,
    job_id: i64,
    outcome: &JobOutcome,
    log: &JobLog,
    patience: &Patience,
) -> bool {
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
    let mut attempts = patience.start();
    let mut failing_since: Option<std::time::Instant> = None;
    let mut next_warning = 1;
    loop {
        let attempt = attempts.attempts() + 1;
        let retry_after = match client.update_job(job_token, &update).await {
            Ok(UpdateResult::Accepted) => {
                if let Some(since) = failing_since {
                    tracing::info!(
                        job_id,
                        attempts = attempt,
                        "Final status delivered after {attempt} attempts ({:.1}s of errors)",
                        since.elapsed().as_secs_f64()
                    );
                }
                return true;
            }
            Ok(UpdateResult::Pending) => {
                tracing::debug!(
                    job_id,
                    attempt,
                    "Status update accepted, GitLab still processing"
                );
                None
            }
            Ok(UpdateResult::Rejected(code)) => {
                tracing::warn!(
                    job_id,
                    status = code,
                    "GitLab refused the status update with HTTP {code}"
                );
                return true;
            }
            Err(e) => {
                failing_since.get_or_insert_with(std::time::Instant::now);
                // One line when it starts failing, then one every 10 attempts.
                if attempt >= next_warning {
                    next_warning = attempt + 10;
                    tracing::warn!(
                        job_id,
                        attempt,
                        "Status update failed (attempt {attempt}), retrying: {e}"
                    );
                }
                e.retry_after()
            }
        };
        if !attempts.wait(retry_after).await {
            tracing::error!(
                job_id,
                attempts = attempt,
                "Could not send the job's final status to GitLab after {attempt} attempts: the job is lost (it stays `running` in GitLab)"
            );
            return false;
        }
    }
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
            delivered: false,
            panicked: false,
        };
    };
    tracing::error!(
        job_id,
        "Invalid job payload, reporting the job failed: {error}"
    );
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
    trace::upload(
        ctx.client.clone(),
        job_id,
        token.clone(),
        log.clone(),
        cancel_tx,
        ctx.patience.clone(),
    )
    .await;
    let end_time = SystemTime::now();
    let delivered = send_status(
        &ctx.client,
        &token,
        job_id,
        &ending.outcome,
        &log,
        &ctx.patience,
    )
    .await;
    tracing::info!(job_id, reason = %"runner_system_failure", "Job failed");
    let flush = telemetry.finish(&ending.outcome, end_time);
    JobDone {
        job_id: Some(job_id),
        outcome: Some(ending.outcome),
        flush,
        delivered,
        panicked: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_slots_are_held_until_dropped_and_belong_to_their_owner() {
        let root = Path::new("/builds");
        let dirs = BuildDirs::default();
        let first = dirs.acquire(root, "g/p");
        let second = dirs.acquire(root, "g/p");
        assert_eq!(first.dir, root.join("0/g/p"));
        assert_eq!(second.dir, root.join("1/g/p"));
        assert_eq!(dirs.acquire(root, "g/q").dir, root.join("0/g/q"));
        drop(first);
        assert_eq!(dirs.acquire(root, "g/p").dir, root.join("0/g/p"));
        // Another manager's slots are its own.
        assert_eq!(
            BuildDirs::default().acquire(root, "g/p").dir,
            root.join("0/g/p")
        );
    }
}
