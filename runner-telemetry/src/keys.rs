//! Attribute keys of runner spans: GitLab's `ci.*` names (what the backend's
//! views read) and the OpenTelemetry CI/CD semantic-convention equivalents
//! (`docs/contract.md` §2); and the name and per-job limit of the job's
//! spans, which both [`crate::job`] and [`crate::export`] read.

/// Name of the span that covers a whole job.
pub const JOB_SPAN_NAME: &str = "job_execution";
/// Most spans one job may create, `job_execution` included (the design's
/// limit).
pub const MAX_SPANS_PER_JOB: usize = 1000;

pub const SERVICE_VERSION: &str = "service.version";

pub const CI_JOB_ID: &str = "ci.job.id";
pub const CI_JOB_NAME: &str = "ci.job.name";
pub const CI_JOB_STAGE: &str = "ci.job.stage";
/// `success|failed|canceled|timedout`.
pub const CI_JOB_STATUS: &str = "ci.job.status";
pub const CI_JOB_FAILURE_REASON: &str = "ci.job.failure_reason";
pub const CI_JOB_EXIT_CODE: &str = "ci.job.exit_code";
pub const CI_PIPELINE_ID: &str = "ci.pipeline.id";
pub const CI_PIPELINE_SOURCE: &str = "ci.pipeline.source";
pub const CI_PROJECT_ID: &str = "ci.project.id";
pub const CI_RUNNER_ID: &str = "ci.runner.id";
pub const CI_RUNNER_EXECUTOR: &str = "ci.runner.executor";

/// Seconds the job waited in GitLab's queue (`job_info.time_in_queue_seconds`), double.
pub const CI_JOB_QUEUED_DURATION: &str = "ci.job.queued_duration";

/// Phase 2 stage metadata. Every stage span carries `ci.stage.status`:
/// `success|failed|skipped` (`skipped`: the stage ran and had nothing to do,
/// e.g. no file matched `artifacts:paths`).
pub const CI_STAGE_STATUS: &str = "ci.stage.status";
/// `prepare_executor`: the shell the scripts run in (`bash`).
pub const CI_EXECUTOR_SHELL: &str = "ci.executor.shell";
/// `get_sources`: what was done, `clone|fetch|none` (a `fetch` without a
/// usable earlier checkout is a `clone`).
pub const CI_GIT_OPERATION: &str = "ci.git.operation";
/// `get_sources`: history depth fetched, int, 0 = full history.
pub const CI_GIT_DEPTH: &str = "ci.git.depth";
/// `get_sources`: `GIT_STRATEGY` asked for, `clone|fetch|none`.
pub const CI_GIT_STRATEGY: &str = "ci.git.strategy";
/// `get_sources`: the partial-clone filter (`--filter=` in
/// `GIT_FETCH_EXTRA_FLAGS`/`GIT_CLONE_EXTRA_FLAGS`), only when there is one.
pub const CI_GIT_FILTER: &str = "ci.git.filter";
/// `step_script`, `after_script`, CI Functions: the exit code, int.
pub const CI_SCRIPT_EXIT_CODE: &str = "ci.script.exit_code";
/// `restore_cache`/`archive_cache*` (one span per cache entry): the key
/// asked for (variables expanded).
pub const CI_CACHE_KEY: &str = "ci.cache.key";
/// `restore_cache`: whether an archive was found (under the key or a
/// fallback), bool.
pub const CI_CACHE_HIT: &str = "ci.cache.hit";
/// `restore_cache`: the key that was restored, when it is a fallback key.
pub const CI_CACHE_MATCHED_KEY: &str = "ci.cache.matched_key";
/// Size of the cache archive read or written, bytes, int.
pub const CI_CACHE_SIZE_BYTES: &str = "ci.cache.size_bytes";
/// Files and directories archived (`archive_cache*`), int.
pub const CI_CACHE_COUNT: &str = "ci.cache.count";
/// `pull-push|pull|push`.
pub const CI_CACHE_POLICY: &str = "ci.cache.policy";
/// `upload_artifacts*` (one span per artifact entry): the archive's name.
pub const CI_ARTIFACT_NAME: &str = "ci.artifact.name";
/// `archive`, `junit`, `dotenv`, ...
pub const CI_ARTIFACT_TYPE: &str = "ci.artifact.type";
/// `zip` or `gzip`.
pub const CI_ARTIFACT_FORMAT: &str = "ci.artifact.format";
/// Size of the uploaded archive, bytes, int.
pub const CI_ARTIFACT_SIZE_BYTES: &str = "ci.artifact.size_bytes";
/// Files and directories in the archive, int.
pub const CI_ARTIFACT_COUNT: &str = "ci.artifact.count";

/// Phase 3, on each `ci_function` span: the invocation's `name`.
pub const CI_FUNCTION_NAME: &str = "ci.function.name";
/// The version of a `step:`/`func:` reference (`name@v1` gives `v1`);
/// `local` for inline scripts and local paths.
pub const CI_FUNCTION_VERSION: &str = "ci.function.version";
/// `success|failed`.
pub const CI_FUNCTION_STATUS: &str = "ci.function.status";
/// `script`, `step` or `func`: how the invocation was written.
pub const CI_FUNCTION_KIND: &str = "ci.function.kind";
/// The `step:`/`func:` reference without its version (credentials stripped).
pub const CI_FUNCTION_REF: &str = "ci.function.ref";
/// The NAMES of the invocation's inputs, sorted, string array. Never values.
pub const CI_FUNCTION_INPUTS: &str = "ci.function.inputs";

/// On `job_execution`: spans not created because the job reached the
/// per-job span cap, int (always set, 0 when none).
pub const CI_TELEMETRY_DROPPED_SPANS: &str = "ci.telemetry.dropped_spans";
/// On any span whose attributes were cut to fit the per-span size cap.
pub const CI_TELEMETRY_TRUNCATED: &str = "ci.telemetry.truncated";

pub const CICD_PIPELINE_NAME: &str = "cicd.pipeline.name";
pub const CICD_PIPELINE_RUN_ID: &str = "cicd.pipeline.run.id";
pub const CICD_PIPELINE_TASK_NAME: &str = "cicd.pipeline.task.name";
pub const CICD_PIPELINE_TASK_RUN_ID: &str = "cicd.pipeline.task.run.id";
pub const CICD_PIPELINE_TASK_RUN_URL_FULL: &str = "cicd.pipeline.task.run.url.full";
/// `success|failure|error|timeout|cancellation`.
pub const CICD_PIPELINE_TASK_RUN_RESULT: &str = "cicd.pipeline.task.run.result";
pub const CICD_WORKER_ID: &str = "cicd.worker.id";
pub const CICD_WORKER_NAME: &str = "cicd.worker.name";
pub const VCS_REF_HEAD_NAME: &str = "vcs.ref.head.name";
pub const VCS_REF_HEAD_REVISION: &str = "vcs.ref.head.revision";
/// Credentials stripped.
pub const VCS_REPOSITORY_URL_FULL: &str = "vcs.repository.url.full";
pub const ERROR_TYPE: &str = "error.type";
