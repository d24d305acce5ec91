-- CI job telemetry: one row per CI span, with the CI identifiers as columns.
-- Design: CI Job Telemetry, Phase 3 (see the contract notes, section 5).
--
-- otel.ci_job_telemetry_traces_mv copies every span of the CI services
-- (ServiceName IN ('gitlab-ci-runner', 'gitlab-ci-job-router', 'gitlab-ci-rails'))
-- from otel.otel_traces into otel.ci_job_telemetry_traces on insert.
--
-- Every ci.* value is looked up in the SPAN attributes first and in the
-- RESOURCE attributes second (a non-empty span attribute wins):
--   if(SpanAttributes['k'] != '', SpanAttributes['k'], ResourceAttributes['k'])
-- This avoids the upstream bug where the MV read ci.* only from resource
-- attributes while the runner puts them on its spans, so runner spans
-- reached the table with every id at zero.
--
-- Column                     <- attribute (or span field)
--   pipeline_id               <- ci.pipeline.id (UInt64, 0 when absent or not a number)
--   pipeline_source           <- ci.pipeline.source
--   build_id                  <- ci.job.id (UInt64, 0 when absent)
--   project_id                <- ci.project.id (UInt64, 0 when absent)
--   runner_id                 <- ci.runner.id (UInt64, 0 when absent)
--   runner_manager_system_xid <- ci.runner.system_id
--   traversal_path            <- ci.namespace.traversal_path
--   job_status                <- ci.job.status
--   retry_count               <- ci.retry.count (UInt32, 0 when absent)
--   resource_type             <- 'cache' when ci.cache.key or ci.cache.hit is set,
--                                'artifact' when ci.artifact.name is set,
--                                'git' when ci.git.operation is set, else ''
--   resource_operation        <- ci.git.operation for git, else derived from the
--                                stage span name: restore_cache -> 'restore',
--                                archive_cache* -> 'archive', upload_artifacts* ->
--                                'upload', download_artifacts -> 'download', else ''
--   resource_key              <- ci.cache.key, else ci.artifact.name, else ''
--   resource_hit              <- ci.cache.hit: 1 (true), 0 (false), -1 (absent)
--   rx_bytes / tx_bytes       <- ci.network.rx_bytes / ci.network.tx_bytes (-1 when absent)
--   trace_id, span_id, parent_span_id, span_name, service_name, status_code,
--   status_message            <- TraceId, SpanId, ParentSpanId, SpanName,
--                                ServiceName, StatusCode, StatusMessage
--   start_time                <- Timestamp (span start)
--   duration_ns               <- Duration
--   metadata                  <- SpanAttributes (all of them)
--
-- Retention follows otel.otel_traces: 30 days, whole parts dropped.
CREATE TABLE IF NOT EXISTS otel.ci_job_telemetry_traces
(
    pipeline_id UInt64,
    pipeline_source LowCardinality(String),
    build_id UInt64,
    project_id UInt64,
    runner_id UInt64,
    runner_manager_system_xid String,
    trace_id String CODEC(ZSTD(1)),
    span_id String CODEC(ZSTD(1)),
    parent_span_id String CODEC(ZSTD(1)),
    traversal_path String,
    span_name LowCardinality(String),
    service_name LowCardinality(String),
    job_status LowCardinality(String),
    status_code LowCardinality(String),
    status_message String CODEC(ZSTD(1)),
    start_time DateTime64(9) CODEC(Delta(8), ZSTD(1)),
    duration_ns UInt64 CODEC(T64, ZSTD(1)),
    retry_count UInt32,
    resource_type LowCardinality(String),
    resource_operation LowCardinality(String),
    resource_key String,
    resource_hit Int8 DEFAULT -1,
    rx_bytes Int64 DEFAULT -1,
    tx_bytes Int64 DEFAULT -1,
    metadata Map(String, String) CODEC(ZSTD(1)),
    INDEX idx_trace_id trace_id TYPE bloom_filter(0.001) GRANULARITY 1,
    INDEX idx_pipeline_id pipeline_id TYPE minmax GRANULARITY 1
) ENGINE = MergeTree()
PARTITION BY toDate(start_time)
ORDER BY (traversal_path, build_id, span_name, start_time)
TTL toDateTime(start_time) + toIntervalDay(30)
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1;

CREATE MATERIALIZED VIEW IF NOT EXISTS otel.ci_job_telemetry_traces_mv
TO otel.ci_job_telemetry_traces
AS SELECT
    toUInt64OrZero(if(SpanAttributes['ci.pipeline.id'] != '', SpanAttributes['ci.pipeline.id'], ResourceAttributes['ci.pipeline.id'])) AS pipeline_id,
    if(SpanAttributes['ci.pipeline.source'] != '', SpanAttributes['ci.pipeline.source'], ResourceAttributes['ci.pipeline.source']) AS pipeline_source,
    toUInt64OrZero(if(SpanAttributes['ci.job.id'] != '', SpanAttributes['ci.job.id'], ResourceAttributes['ci.job.id'])) AS build_id,
    toUInt64OrZero(if(SpanAttributes['ci.project.id'] != '', SpanAttributes['ci.project.id'], ResourceAttributes['ci.project.id'])) AS project_id,
    toUInt64OrZero(if(SpanAttributes['ci.runner.id'] != '', SpanAttributes['ci.runner.id'], ResourceAttributes['ci.runner.id'])) AS runner_id,
    if(SpanAttributes['ci.runner.system_id'] != '', SpanAttributes['ci.runner.system_id'], ResourceAttributes['ci.runner.system_id']) AS runner_manager_system_xid,
    TraceId AS trace_id,
    SpanId AS span_id,
    ParentSpanId AS parent_span_id,
    if(SpanAttributes['ci.namespace.traversal_path'] != '', SpanAttributes['ci.namespace.traversal_path'], ResourceAttributes['ci.namespace.traversal_path']) AS traversal_path,
    SpanName AS span_name,
    ServiceName AS service_name,
    if(SpanAttributes['ci.job.status'] != '', SpanAttributes['ci.job.status'], ResourceAttributes['ci.job.status']) AS job_status,
    StatusCode AS status_code,
    StatusMessage AS status_message,
    Timestamp AS start_time,
    Duration AS duration_ns,
    toUInt32OrZero(if(SpanAttributes['ci.retry.count'] != '', SpanAttributes['ci.retry.count'], ResourceAttributes['ci.retry.count'])) AS retry_count,
    multiIf(
        if(SpanAttributes['ci.cache.key'] != '', SpanAttributes['ci.cache.key'], ResourceAttributes['ci.cache.key']) != ''
            OR if(SpanAttributes['ci.cache.hit'] != '', SpanAttributes['ci.cache.hit'], ResourceAttributes['ci.cache.hit']) != '', 'cache',
        if(SpanAttributes['ci.artifact.name'] != '', SpanAttributes['ci.artifact.name'], ResourceAttributes['ci.artifact.name']) != '', 'artifact',
        if(SpanAttributes['ci.git.operation'] != '', SpanAttributes['ci.git.operation'], ResourceAttributes['ci.git.operation']) != '', 'git',
        '') AS resource_type,
    multiIf(
        if(SpanAttributes['ci.git.operation'] != '', SpanAttributes['ci.git.operation'], ResourceAttributes['ci.git.operation']) != '',
            if(SpanAttributes['ci.git.operation'] != '', SpanAttributes['ci.git.operation'], ResourceAttributes['ci.git.operation']),
        SpanName = 'restore_cache', 'restore',
        startsWith(SpanName, 'archive_cache'), 'archive',
        startsWith(SpanName, 'upload_artifacts'), 'upload',
        SpanName = 'download_artifacts', 'download',
        '') AS resource_operation,
    multiIf(
        if(SpanAttributes['ci.cache.key'] != '', SpanAttributes['ci.cache.key'], ResourceAttributes['ci.cache.key']) != '',
            if(SpanAttributes['ci.cache.key'] != '', SpanAttributes['ci.cache.key'], ResourceAttributes['ci.cache.key']),
        if(SpanAttributes['ci.artifact.name'] != '', SpanAttributes['ci.artifact.name'], ResourceAttributes['ci.artifact.name'])) AS resource_key,
    toInt8(multiIf(
        lower(if(SpanAttributes['ci.cache.hit'] != '', SpanAttributes['ci.cache.hit'], ResourceAttributes['ci.cache.hit'])) IN ('true', '1'), 1,
        lower(if(SpanAttributes['ci.cache.hit'] != '', SpanAttributes['ci.cache.hit'], ResourceAttributes['ci.cache.hit'])) IN ('false', '0'), 0,
        -1)) AS resource_hit,
    ifNull(toInt64OrNull(if(SpanAttributes['ci.network.rx_bytes'] != '', SpanAttributes['ci.network.rx_bytes'], ResourceAttributes['ci.network.rx_bytes'])), -1) AS rx_bytes,
    ifNull(toInt64OrNull(if(SpanAttributes['ci.network.tx_bytes'] != '', SpanAttributes['ci.network.tx_bytes'], ResourceAttributes['ci.network.tx_bytes'])), -1) AS tx_bytes,
    CAST(SpanAttributes, 'Map(String, String)') AS metadata
FROM otel.otel_traces
WHERE ServiceName IN ('gitlab-ci-runner', 'gitlab-ci-job-router', 'gitlab-ci-rails');
