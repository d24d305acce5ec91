//! The Rails query layer of CI job telemetry: a job's or a pipeline's spans
//! read back from ClickHouse and shaped for the API and the pages.
//!
//! Over the wire: ClickHouse's HTTP interface through the `clickhouse`
//! crate. Every lookup first reads the trace's time bounds from
//! `otel.otel_traces_trace_id_ts` (the collector exporter's trace-id lookup
//! table, keyed by `TraceId`), then reads `otel.ci_job_telemetry_traces` by
//! the CI view's keys (`build_id` or `pipeline_id`, and `trace_id`) inside
//! those bounds, so a lookup touches the partitions of that trace only.
//! Log records come from `otel.otel_logs`, bounded the same way.
//!
//! - `query`: the [`Reader`] and its SQL;
//! - `tree`: spans -> the job tree and the pipeline summary (no I/O).

mod query;
mod tree;

use std::path::PathBuf;

pub use query::{QueryError, RawLog, RawSpan, Reader, TraceBounds};
pub use tree::{
    job_telemetry, pipeline_telemetry, rfc3339_nanos, JobSummary, JobTelemetry, LogRecord,
    PipelineJob, PipelineSummary, PipelineTelemetry, Side, Span, StageSummary, NOT_ARRIVED,
};

/// Where the stored traces are read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClickHouseSettings {
    /// ClickHouse's HTTP interface, e.g. `http://127.0.0.1:8123`.
    pub url: String,
    pub user: String,
    /// A file holding the password (trailing whitespace ignored); none: empty.
    pub password_file: Option<PathBuf>,
    /// The database of the telemetry tables.
    pub database: String,
}

/// The database the stack's SQL creates (`compose/sql`).
pub const DEFAULT_DATABASE: &str = "otel";
/// ClickHouse's default user.
pub const DEFAULT_USER: &str = "default";
