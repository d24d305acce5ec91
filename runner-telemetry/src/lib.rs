//! CI job telemetry for runners.
//!
//! Negotiates telemetry from a GitLab job payload ([`mod@negotiate`]), resolves
//! the runner manager's export configuration ([`config`]), emits the
//! `job_execution` span and its children ([`job`]) and exports them over
//! OTLP without ever holding up the job ([`export`]); [`telemetry`] ties
//! these together per runner. The reference runner (`ci-runner`, its own
//! crate) embeds this library through its public API only.
//!
//! Errors are typed: [`ConfigError`] (a bad value, or a file that cannot be
//! read), [`SetupError`] (an export target that cannot be used),
//! [`DisabledReason`] with [`SkipReason`] and [`RunnerReason`] (why a job's
//! telemetry is off).
//!
//! **Architecture Invariant:** `runner-telemetry` knows nothing about
//! ClickHouse; it speaks OTLP and the GitLab job API, nothing else.

pub mod config;
pub mod export;
pub mod job;
pub mod keys;
pub mod logs;
pub mod metrics;
pub mod negotiate;
pub mod secrets;
pub mod telemetry;

pub use config::{ConfigError, ExportSettings, TelemetryOverrides, TelemetrySettings};
pub use export::{DropReason, ExportHub};
pub use export::{ExportTarget, FlushReport, SetupError, SpanSink};
pub use job::{
    ChildSpan, JobOutcome, JobSpanInfo, JobTelemetry, PendingFlush, RunnerIdentity, SpanOutcome,
};
pub use negotiate::{
    negotiate, negotiate_with, DisabledReason, Negotiation, NegotiationOptions, RunnerReason,
    SkipReason, TelemetryPlan, TraceContext,
};
pub use telemetry::RunnerTelemetry;
