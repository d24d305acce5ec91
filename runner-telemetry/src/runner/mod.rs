//! The reference runner behind the `ci-runner` binary: a GitLab-compatible
//! runner with a shell (bash) executor, instrumented with this crate's
//! telemetry.
//!
//! * [`api`]: the GitLab job API client (register, verify, request, update,
//!   trace).
//! * [`payload`]: the job payload, read leniently.
//! * [`shell`]: bash scripts and their processes.
//! * [`trace`]: the job log: masking and incremental upload.
//! * [`job`]: one job, from payload to final status.
//! * [`manager`]: polling, concurrency, signals.
//! * [`config`]: `config.toml` and the flags.

pub mod api;
pub mod config;
pub mod job;
pub mod manager;
pub mod payload;
pub mod shell;
pub mod trace;
