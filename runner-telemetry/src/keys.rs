//! Attribute keys of runner spans: GitLab's `ci.*` names (what the backend's
//! views read) and the OpenTelemetry CI/CD semantic-convention equivalents.

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

/// Phase 2 stage metadata.
pub const CI_STAGE_STATUS: &str = "ci.stage.status";
pub const CI_GIT_OPERATION: &str = "ci.git.operation";
pub const CI_GIT_DEPTH: &str = "ci.git.depth";
pub const CI_GIT_STRATEGY: &str = "ci.git.strategy";

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
