//! The reference runner behind the `ci-runner` binary: a GitLab-compatible
//! runner with a shell (bash) executor, instrumented with `runner-telemetry`
//! (through its public API only).
//!
//! * [`api`]: the GitLab job API client (register, verify, request, update,
//!   trace, artifacts).
//! * [`payload`]: the job payload, read leniently.
//! * [`shell`]: bash scripts and their processes.
//! * [`trace`]: the job log: masking and incremental upload.
//! * [`job`]: one job, from payload to final status, stage by stage, with a
//!   span per stage.
//! * [`git`]: `get_sources` (`GIT_STRATEGY`, `GIT_DEPTH`, clean flags).
//! * [`cache`]: the local cache (`restore_cache`, `archive_cache`).
//! * [`artifacts`]: archiving and uploading artifacts.
//! * [`archive`]: path selection (globs), zip and gzip archives.
//! * [`functions`]: CI Functions (`run:`).
//! * [`manager`]: polling, concurrency, signals.
//! * [`config`]: `config.toml` and the flags.
//! * [`deliver`]: how long a job's log and final status are retried.
//! * [`metrics`]: `GET /metrics` (`--metrics-listen`).

pub mod api;
pub mod archive;
pub mod artifacts;
pub mod cache;
pub mod config;
pub mod deliver;
pub mod functions;
pub mod git;
pub mod job;
pub mod manager;
pub mod metrics;
pub mod payload;
pub mod shell;
pub mod trace;
