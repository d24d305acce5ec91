//! The SQL of the query layer, through the `clickhouse` crate.

use std::time::Duration;

use clickhouse::{Client, Row};
use serde::Deserialize;

use super::ClickHouseSettings;

/// At most this many spans are read for one job (the design's limit is 1000
/// runner spans a job, plus Rails' three).
pub const MAX_SPANS_PER_JOB: u64 = 2000;
/// At most this many spans are read for one pipeline.
pub const MAX_SPANS_PER_PIPELINE: u64 = 50_000;
/// At most this many log records are read for one job.
pub const MAX_LOGS_PER_JOB: u64 = 10_000;
/// How long one query may take before the request fails.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("cannot read the ClickHouse password file `{path}`: {source}")]
    PasswordFile {
        path: String,
        source: std::io::Error,
    },
    #[error("ClickHouse query failed: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error("ClickHouse did not answer within {0:?}")]
    Timeout(Duration),
}

/// The first and last span start of a trace, from the lookup table
/// (whole seconds, as the table stores them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Row, Deserialize)]
pub struct TraceBounds {
    pub start: u32,
    pub end: u32,
}

/// One row of `ci_job_telemetry_traces`.
#[derive(Debug, Clone, PartialEq, Eq, Row, Deserialize)]
pub struct RawSpan {
    pub build_id: u64,
    pub span_id: String,
    pub parent_span_id: String,
    pub span_name: String,
    pub service_name: String,
    pub status_code: String,
    pub status_message: String,
    /// Unix nanoseconds.
    pub start_ns: i64,
    pub duration_ns: u64,
    pub metadata: Vec<(String, String)>,
}

/// One row of `otel_logs`.
#[derive(Debug, Clone, PartialEq, Eq, Row, Deserialize)]
pub struct RawLog {
    /// Unix nanoseconds.
    pub time_ns: i64,
    pub span_id: String,
    pub severity: String,
    pub body: String,
}

/// Reads stored telemetry. Cloning is cheap (one connection pool).
#[derive(Clone)]
pub struct Reader {
    client: Client,
    database: String,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

impl Reader {
    /// Builds the client; reads the password file once.
    pub fn new(settings: &ClickHouseSettings) -> Result<Reader, QueryError> {
        let password = match &settings.password_file {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|source| QueryError::PasswordFile {
                    path: path.display().to_string(),
                    source,
                })?
                .trim_end()
                .to_string(),
            None => String::new(),
        };
        // The crate's defaults: RowBinaryWithNamesAndTypes, schema validation
        // and lz4 compression, all of which the embedded endpoint speaks.
        let client = Client::default()
            .with_url(settings.url.trim_end_matches('/'))
            .with_user(settings.user.clone())
            .with_password(password);
        Ok(Reader {
            client,
            database: settings.database.clone(),
        })
    }

    async fn timed<T>(
        &self,
        query: impl std::future::Future<Output = clickhouse::error::Result<T>>,
    ) -> Result<T, QueryError> {
        match tokio::time::timeout(QUERY_TIMEOUT, query).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(QueryError::Timeout(QUERY_TIMEOUT)),
        }
    }

    /// The trace's bounds from the trace-id lookup table; `None` when no span
    /// of it has arrived.
    pub async fn trace_bounds(&self, trace_id: &str) -> Result<Option<TraceBounds>, QueryError> {
        let sql = format!(
            "SELECT toUInt32(toUnixTimestamp(min(Start))) AS start, \
                    toUInt32(toUnixTimestamp(max(End))) AS end \
             FROM {db}.otel_traces_trace_id_ts WHERE TraceId = ? GROUP BY TraceId",
            db = self.database
        );
        let query = self.client.query(&sql).bind(trace_id);
        self.timed(query.fetch_optional::<TraceBounds>()).await
    }

    fn span_sql(&self, key: &str, limit: u64) -> String {
        // Bounds: the lookup table keeps whole seconds of span starts, so the
        // upper bound is the next second.
        format!(
            "SELECT build_id, span_id, parent_span_id, \
                    toString(span_name) AS span_name, toString(service_name) AS service_name, \
                    toString(status_code) AS status_code, status_message, \
                    toUnixTimestamp64Nano(start_time) AS start_ns, duration_ns, metadata \
             FROM {db}.ci_job_telemetry_traces \
             WHERE {key} = ? AND trace_id = ? \
               AND start_time >= toDateTime(?) AND start_time < toDateTime(?) \
             ORDER BY start_time, span_name \
             LIMIT 1 BY span_id \
             LIMIT {limit}",
            db = self.database
        )
    }

    /// The spans of one job (`build_id`) of a trace.
    pub async fn job_spans(
        &self,
        trace_id: &str,
        bounds: TraceBounds,
        job_id: u64,
    ) -> Result<Vec<RawSpan>, QueryError> {
        let sql = self.span_sql("build_id", MAX_SPANS_PER_JOB);
        let query = self
            .client
            .query(&sql)
            .bind(job_id)
            .bind(trace_id)
            .bind(bounds.start)
            .bind(bounds.end.saturating_add(1));
        self.timed(query.fetch_all::<RawSpan>()).await
    }

    /// The spans of every job of one pipeline of a trace.
    pub async fn pipeline_spans(
        &self,
        trace_id: &str,
        bounds: TraceBounds,
        pipeline_id: u64,
    ) -> Result<Vec<RawSpan>, QueryError> {
        let sql = self.span_sql("pipeline_id", MAX_SPANS_PER_PIPELINE);
        let query = self
            .client
            .query(&sql)
            .bind(pipeline_id)
            .bind(trace_id)
            .bind(bounds.start)
            .bind(bounds.end.saturating_add(1));
        self.timed(query.fetch_all::<RawSpan>()).await
    }

    /// Log records of a job: those of its spans, and those that carry its
    /// `ci.job.id` without a span, between `from_s` and `to_s` (Unix seconds,
    /// inclusive).
    pub async fn job_logs(
        &self,
        trace_id: &str,
        job_id: u64,
        span_ids: &[String],
        from_s: u32,
        to_s: u32,
    ) -> Result<Vec<RawLog>, QueryError> {
        let sql = format!(
            "SELECT toUnixTimestamp64Nano(Timestamp) AS time_ns, SpanId AS span_id, \
                    toString(SeverityText) AS severity, Body AS body \
             FROM {db}.otel_logs \
             WHERE TimestampTime >= toDateTime(?) AND TimestampTime <= toDateTime(?) \
               AND TraceId = ? \
               AND (has(?, SpanId) OR ResourceAttributes['ci.job.id'] = ? OR LogAttributes['ci.job.id'] = ?) \
             ORDER BY Timestamp \
             LIMIT {MAX_LOGS_PER_JOB}",
            db = self.database
        );
        let job = job_id.to_string();
        let query = self
            .client
            .query(&sql)
            .bind(from_s)
            .bind(to_s)
            .bind(trace_id)
            .bind(span_ids)
            .bind(&job)
            .bind(&job);
        self.timed(query.fetch_all::<RawLog>()).await
    }
}
