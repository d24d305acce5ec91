//! The runner manager: verify each runner's token, poll for jobs, run up to
//! `concurrent` of them at once, flush their telemetry in the background,
//! and stop cleanly on SIGTERM/SIGINT.
//!
//! Shutdown: the first signal stops taking jobs and lets the running ones
//! finish; a second one aborts them (reported as `runner_system_failure`).
//! Either way every job's telemetry flush gets its deadline. A job's final
//! status is retried while GitLab fails (see [`crate::deliver`]); after the
//! first signal for at most the shutdown timeout. The process exits 0, or
//! 2 when a job was lost (GitLab never got its final status, each named in
//! an ERROR line).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use super::api::{self, ApiError, GitLabClient, JobRequest};
use super::config::{RunConfig, RunnerConfig};
use super::deliver::Patience;
use super::job::{panic_message, run_job, send_status, BuildDirs, JobContext};
use super::trace::JobLog;
use futures::FutureExt;
use runner_telemetry::job::RunnerIdentity;
use runner_telemetry::secrets::strip_credentials;
use runner_telemetry::telemetry::RunnerTelemetry;

/// Longest wait between job requests after errors.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long to keep retrying the token check when GitLab is unreachable.
pub const VERIFY_PATIENCE: Duration = Duration::from_secs(30);

/// A short random ID for this runner process (`system_id`).
fn system_id() -> String {
    let bytes: [u8; 6] = rand::random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("s_{hex}")
}

struct Shared {
    semaphore: Arc<Semaphore>,
    taken: AtomicU64,
    max_jobs: Option<u64>,
    check_interval: Duration,
    shutdown: watch::Receiver<bool>,
    abort: watch::Receiver<bool>,
    jobs: Mutex<Vec<JoinHandle<()>>>,
    system_id: String,
    /// Jobs whose final status GitLab never got.
    lost: AtomicU64,
    /// Jobs whose task panicked (each failed with `runner_system_failure`).
    panicked: AtomicU64,
}

impl Shared {
    /// Reserves a job slot (for `--max-jobs`); false when all are taken.
    fn reserve(&self) -> bool {
        match self.max_jobs {
            None => {
                self.taken.fetch_add(1, Ordering::SeqCst);
                true
            }
            Some(max) => self
                .taken
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                    (n < max).then_some(n + 1)
                })
                .is_ok(),
        }
    }

    fn release(&self) {
        self.taken.fetch_sub(1, Ordering::SeqCst);
    }

    fn all_taken(&self) -> bool {
        self.max_jobs
            .is_some_and(|max| self.taken.load(Ordering::SeqCst) >= max)
    }
}

/// Runs until `--max-jobs` jobs were processed or a signal arrives. Returns
/// the process exit code.
pub async fn run(config: RunConfig) -> i32 {
    let system_id = system_id();
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (abort_tx, abort_rx) = watch::channel(false);
    if let Err(e) = spawn_signal_handler(shutdown_tx.clone(), abort_tx) {
        tracing::error!("Cannot install signal handlers: {e}");
        return 1;
    }

    // One set of telemetry metrics for the process (all runners).
    let metrics = runner_telemetry::metrics::Metrics::new();
    if let Some(addr) = config.metrics_listen {
        match crate::metrics::serve(addr, metrics.clone()).await {
            Ok(bound) => tracing::info!("Metrics listening on http://{bound}/metrics"),
            Err(e) => {
                tracing::error!("Cannot serve metrics on {addr}: {e}");
                return 1;
            }
        }
    }
    let patience = Patience {
        limit: config.final_update_limit,
        shutdown_timeout: config.shutdown_timeout,
        shutdown: shutdown_rx.clone(),
    };
    // One set of build-directory slots for the process (runners may share a
    // builds_dir).
    let build_dirs = BuildDirs::default();
    let mut contexts = Vec::new();
    for runner in &config.runners {
        let prepared = prepare_runner(
            runner,
            &system_id,
            patience.clone(),
            metrics.clone(),
            build_dirs.clone(),
        );
        match prepared.await {
            Ok(ctx) => contexts.push(ctx),
            Err(e) => {
                tracing::error!("{e}");
                return 1;
            }
        }
    }

    let shared = Arc::new(Shared {
        semaphore: Arc::new(Semaphore::new(config.concurrent)),
        taken: AtomicU64::new(0),
        max_jobs: config.max_jobs,
        check_interval: config.check_interval,
        shutdown: shutdown_rx.clone(),
        abort: abort_rx,
        jobs: Mutex::new(Vec::new()),
        system_id,
        lost: AtomicU64::new(0),
        panicked: AtomicU64::new(0),
    });
    tracing::info!(
        concurrent = config.concurrent,
        check_interval = %format_args!("{}ms", config.check_interval.as_millis()),
        runners = contexts.len(),
        max_jobs = config.max_jobs,
        "Runner started"
    );

    let contexts: Vec<Arc<JobContext>> = contexts.into_iter().map(Arc::new).collect();
    let pollers: Vec<_> = contexts
        .iter()
        .cloned()
        .zip(config.runners.iter().cloned())
        .map(|(ctx, runner)| tokio::spawn(poll(ctx, runner, shared.clone())))
        .collect();
    for poller in pollers {
        let _ = poller.await;
    }
    // No more jobs will be taken: wait for the running ones and their flushes.
    loop {
        let handles: Vec<_> =
            std::mem::take(&mut *shared.jobs.lock().unwrap_or_else(|e| e.into_inner()));
        if handles.is_empty() {
            break;
        }
        for handle in handles {
            let _ = handle.await;
        }
    }
    // Spans still buffered (a collector that was down) get a final attempt.
    for ctx in &contexts {
        ctx.telemetry.shutdown().await;
    }
    let lost = shared.lost.load(Ordering::SeqCst);
    let panicked = shared.panicked.load(Ordering::SeqCst);
    drop(shutdown_tx);
    if lost > 0 {
        tracing::error!(
            jobs = shared.taken.load(Ordering::SeqCst),
            lost,
            panicked,
            "Runner stopped: GitLab never got the final status of {lost} job(s)"
        );
        return 2;
    }
    tracing::info!(
        jobs = shared.taken.load(Ordering::SeqCst),
        lost,
        panicked,
        "Runner stopped"
    );
    0
}

fn spawn_signal_handler(
    shutdown: watch::Sender<bool>,
    abort: watch::Sender<bool>,
) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let mut count = 0;
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            count += 1;
            if count == 1 {
                tracing::info!("Received {name}: no new jobs, finishing running jobs (signal again to abort them)");
                let _ = shutdown.send(true);
            } else {
                tracing::warn!("Received {name} again: aborting running jobs");
                let _ = abort.send(true);
            }
        }
    });
    Ok(())
}

async fn prepare_runner(
    runner: &RunnerConfig,
    system_id: &str,
    patience: Patience,
    metrics: Arc<runner_telemetry::metrics::Metrics>,
    build_dirs: BuildDirs,
) -> Result<JobContext, String> {
    let client =
        GitLabClient::new(&runner.url).map_err(|e| format!("Runner `{}`: {e}", runner.name))?;
    let mut shutdown = patience.shutdown.clone();
    let started = std::time::Instant::now();
    let mut delay = Duration::from_millis(500);
    let verified_id = loop {
        match client.verify(&runner.token, system_id).await {
            Ok(id) => break id,
            Err(ApiError::Forbidden) => {
                return Err(format!(
                    "Runner `{}`: the runner token was refused by {} (POST /api/v4/runners/verify answered 403 Forbidden)",
                    runner.name, strip_credentials(&runner.url)
                ))
            }
            Err(e) if e.is_transient() && started.elapsed() < VERIFY_PATIENCE => {
                tracing::warn!(runner = %runner.name, "Verifying the runner token failed, retrying: {e}");
                let wait = e.retry_after().unwrap_or(delay);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.wait_for(|s| *s) => return Err("Stopped before the runner token was verified".into()),
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                return Err(format!(
                    "Runner `{}`: cannot verify the runner token at {}: {e}",
                    runner.name, strip_credentials(&runner.url)
                ))
            }
        }
    };
    let identity = RunnerIdentity {
        id: verified_id.or(runner.id),
        name: runner.name.clone(),
        executor: runner.executor.clone(),
    };
    for warning in &runner.telemetry.warnings {
        tracing::warn!(runner = %runner.name, "Telemetry configuration: {warning}");
    }
    tracing::info!(
        runner = %runner.name,
        url = %strip_credentials(&runner.url),
        runner_id = identity.id,
        executor = %runner.executor,
        builds_dir = %runner.builds_dir.display(),
        cache_dir = %runner.cache_dir.display(),
        telemetry = %if runner.telemetry.enabled { "on" } else { "off" },
        static_endpoint = %runner.telemetry.endpoint,
        flush_timeout = %format_args!("{}ms", runner.telemetry.flush_timeout.as_millis()),
        "Runner verified"
    );
    Ok(JobContext {
        client,
        runner_name: runner.name.clone(),
        gitlab_url: runner.url.clone(),
        builds_dir: runner.builds_dir.clone(),
        build_dirs,
        cache_dir: runner.cache_dir.clone(),
        telemetry: RunnerTelemetry::with_metrics(runner.telemetry.clone(), identity, metrics),
        patience,
    })
}

async fn poll(ctx: Arc<JobContext>, runner: RunnerConfig, shared: Arc<Shared>) {
    let info = api::runner_info(
        &runner.name,
        &runner.executor,
        &runner.shell,
        runner.telemetry.enabled,
    );
    let mut shutdown = shared.shutdown.clone();
    let mut last_update: Option<String> = None;
    let mut backoff = shared.check_interval;
    let mut failures: u64 = 0;
    loop {
        if *shutdown.borrow() || shared.all_taken() {
            return;
        }
        let permit = tokio::select! {
            permit = shared.semaphore.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            _ = shutdown.wait_for(|s| *s) => return,
        };
        if !shared.reserve() {
            return;
        }
        let wait = match ctx
            .client
            .request_job(
                &runner.token,
                &shared.system_id,
                last_update.as_deref(),
                &info,
            )
            .await
        {
            Ok(JobRequest::Job(raw)) => {
                let received = SystemTime::now();
                recovered(&runner.name, &mut failures);
                backoff = shared.check_interval;
                let ctx = ctx.clone();
                let abort = shared.abort.clone();
                let shared_job = shared.clone();
                let handle = tokio::spawn(async move {
                    let reportable = job_id_and_token(&raw);
                    let done = std::panic::AssertUnwindSafe(run_job(&ctx, raw, received, abort))
                        .catch_unwind()
                        .await;
                    drop(permit);
                    match done {
                        Ok(done) => {
                            if done.panicked {
                                shared_job.panicked.fetch_add(1, Ordering::SeqCst);
                            }
                            if !done.delivered {
                                shared_job.lost.fetch_add(1, Ordering::SeqCst);
                            }
                            if let Some(flush) = done.flush {
                                ctx.telemetry.flush_job(flush).await;
                            }
                        }
                        Err(panic) => {
                            shared_job.panicked.fetch_add(1, Ordering::SeqCst);
                            let why = panic_message(panic.as_ref());
                            if !report_panicked(&ctx, reportable, &why).await {
                                shared_job.lost.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    }
                });
                shared
                    .jobs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(handle);
                continue;
            }
            Ok(JobRequest::NoJob {
                last_update: update,
            }) => {
                if update.is_some() {
                    last_update = update;
                }
                recovered(&runner.name, &mut failures);
                backoff = shared.check_interval;
                shared.check_interval
            }
            Err(ApiError::Forbidden) => {
                tracing::error!(
                    runner = %runner.name,
                    "Job request answered 403 Forbidden: is the runner token still valid?"
                );
                backoff = (backoff * 2).min(MAX_BACKOFF);
                backoff
            }
            Err(ApiError::InvalidResponse(e)) => {
                tracing::error!(
                    runner = %runner.name,
                    "Received a job that cannot be read or reported: {e}"
                );
                shared.check_interval
            }
            Err(e) => {
                // GitLab failing (5xx, 429, down): ask again at the check
                // interval, or when it said, so polling resumes as soon as
                // GitLab answers again. One line when it starts failing.
                if failures == 0 {
                    tracing::warn!(runner = %runner.name, "Job request failed, retrying: {e}");
                }
                failures += 1;
                e.retry_after().unwrap_or(shared.check_interval)
            }
        };

        shared.release();
        drop(permit);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// Logs that job requests work again after `failures` failed ones.
fn recovered(runner: &str, failures: &mut u64) {
    if *failures > 0 {
        tracing::info!(runner = %runner, "Job requests work again after {failures} failed");
        *failures = 0;
    }
}

/// The job's ID and token, read before anything else can go wrong.
fn job_id_and_token(raw: &serde_json::Value) -> Option<(i64, String)> {
    let id = raw.get("id").and_then(|v| {
        v.as_i64()
            .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
    })?;
    let token = raw.get("token").and_then(|v| v.as_str())?;
    (!token.is_empty()).then(|| (id, token.to_string()))
}

/// A job whose task panicked before it could report itself: fail it with
/// `runner_system_failure`. Returns whether GitLab got the final status.
async fn report_panicked(ctx: &JobContext, job: Option<(i64, String)>, why: &str) -> bool {
    let Some((job_id, token)) = job else {
        tracing::error!(
            "A job's task panicked and its payload has no ID and token to report it with: {why}"
        );
        return false;
    };
    tracing::error!(job_id, "The job's task panicked, failing the job: {why}");
    let log = JobLog::new(vec![token.clone()]);
    log.line(&format!(
        "\x1b[31;1mERROR: Job failed (system failure): the runner failed internally: {why}\x1b[0;m"
    ));
    log.close();
    let outcome = runner_telemetry::job::JobOutcome::Failed {
        failure_reason: "runner_system_failure".into(),
        exit_code: None,
    };
    send_status(&ctx.client, &token, job_id, &outcome, &log, &ctx.patience).await
}
