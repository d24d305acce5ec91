-- Spans, exactly as the OpenTelemetry Collector contrib ClickHouse exporter
-- creates them at the collector version the Docker stack pins (v0.159.0; the
-- traces tables kept their columns, types and keys from 0.140.0 to 0.159.0,
-- only otel_logs changed, see 20_otel_logs.sql).
--
-- Source (open-telemetry/opentelemetry-collector-contrib, v0.159.0):
--   exporter/clickhouseexporter/internal/sqltemplates/traces_table.sql
--   exporter/clickhouseexporter/internal/sqltemplates/traces_id_ts_lookup_table.sql
--   exporter/clickhouseexporter/internal/sqltemplates/traces_id_ts_lookup_mv.sql
--   exporter/clickhouseexporter/exporter_traces.go (how the templates are rendered)
-- rendered with Database = otel, TableName = otel_traces, no cluster,
-- Engine = MergeTree() for otel_traces and AggregatingMergeTree() for the
-- trace id lookup table (traceIDTsTableEngineString), and a TTL of 30 days
-- (ttl: 720h, rendered by GenerateTTLExpr as `TTL toDateTime(Timestamp) + toIntervalDay(30)`).
--
-- Index choice: the template renders bloom_filter/tokenbf_v1 indexes for
-- ClickHouse < 26.2 and `text(tokenizer = 'array')` indexes for >= 26.2.
-- We keep the bloom_filter branch: it runs on every ClickHouse version (chDB
-- 26.9 and whatever clickhouse-server image the Docker stack pins). Columns,
-- types, codecs, engines, partitioning, keys and TTL do not depend on it.
--
-- Writers: the collectors insert (Timestamp, TraceId, SpanId, ParentSpanId,
-- TraceState, SpanName, SpanKind, ServiceName, ResourceAttributes, ScopeName,
-- ScopeVersion, SpanAttributes, Duration, StatusCode, StatusMessage,
-- Events.Timestamp, Events.Name, Events.Attributes, Links.TraceId,
-- Links.SpanId, Links.TraceState, Links.Attributes) in RowBinary. rotel
-- 0.0.1-alpha10 sends exactly this list (captured on the wire), into
-- `otel_traces` with `database=otel` as a URL parameter.
--
-- Beware the TTL with ttl_only_drop_parts: rows older than 30 days vanish at
-- the next merge. Tests must use current timestamps.
CREATE TABLE IF NOT EXISTS otel.otel_traces
(
    Timestamp DateTime64(9) CODEC(Delta(8), ZSTD(1)),
    TraceId String CODEC(ZSTD(1)),
    SpanId String CODEC(ZSTD(1)),
    ParentSpanId String CODEC(ZSTD(1)),
    TraceState String CODEC(ZSTD(1)),
    SpanName LowCardinality(String) CODEC(ZSTD(1)),
    SpanKind LowCardinality(String) CODEC(ZSTD(1)),
    ServiceName LowCardinality(String) CODEC(ZSTD(1)),
    ResourceAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    ScopeName String CODEC(ZSTD(1)),
    ScopeVersion String CODEC(ZSTD(1)),
    SpanAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    Duration UInt64 CODEC(T64, ZSTD(1)),
    StatusCode LowCardinality(String) CODEC(ZSTD(1)),
    StatusMessage String CODEC(ZSTD(1)),
    Events Nested (
        Timestamp DateTime64(9),
        Name LowCardinality(String),
        Attributes Map(LowCardinality(String), String)
    ) CODEC(ZSTD(1)),
    Links Nested (
        TraceId String,
        SpanId String,
        TraceState String,
        Attributes Map(LowCardinality(String), String)
    ) CODEC(ZSTD(1)),
    ResourceAttributeItems Array(String) ALIAS arrayMap(kv -> concat(kv.1, '=', kv.2), CAST(ResourceAttributes, 'Array(Tuple(String, String))')),
    SpanAttributeItems Array(String) ALIAS arrayMap(kv -> concat(kv.1, '=', kv.2), CAST(SpanAttributes, 'Array(Tuple(String, String))')),
    INDEX idx_trace_id TraceId TYPE bloom_filter(0.001) GRANULARITY 1,
    INDEX idx_res_attr_key mapKeys(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_res_attr_value mapValues(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_span_attr_key mapKeys(SpanAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_span_attr_value mapValues(SpanAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_duration Duration TYPE minmax GRANULARITY 1,
    INDEX idx_lower_span_name lower(SpanName) TYPE tokenbf_v1(32768, 3, 0) GRANULARITY 8
) ENGINE = MergeTree()
PARTITION BY toDate(Timestamp)
PRIMARY KEY (ServiceName, SpanName, toDateTime(Timestamp))
ORDER BY (ServiceName, SpanName, toDateTime(Timestamp), Timestamp)
TTL toDateTime(Timestamp) + toIntervalDay(30)
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1;

-- First and last span time of every trace, for time-bounded trace lookups.
CREATE TABLE IF NOT EXISTS otel.otel_traces_trace_id_ts
(
    TraceId String CODEC(ZSTD(1)),
    Start SimpleAggregateFunction(min, DateTime) CODEC(ZSTD(1)),
    End SimpleAggregateFunction(max, DateTime) CODEC(ZSTD(1))
) ENGINE = AggregatingMergeTree()
PARTITION BY toStartOfWeek(Start)
ORDER BY (TraceId)
TTL toDateTime(Start) + toIntervalDay(30)
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1;

CREATE MATERIALIZED VIEW IF NOT EXISTS otel.otel_traces_trace_id_ts_mv
TO otel.otel_traces_trace_id_ts
AS SELECT
    TraceId,
    min(toDateTime(Timestamp)) AS Start,
    max(toDateTime(Timestamp)) AS End
FROM otel.otel_traces
WHERE TraceId != ''
GROUP BY TraceId;
