-- Logs, exactly as the OpenTelemetry Collector contrib ClickHouse exporter
-- creates them at the collector version the Docker stack pins (v0.159.0).
--
-- Source (open-telemetry/opentelemetry-collector-contrib, v0.159.0):
--   exporter/clickhouseexporter/internal/sqltemplates/logs_table.sql
--   exporter/clickhouseexporter/internal/sqltemplates/logs_insert.sql
-- rendered with Database = otel, TableName = otel_logs, no cluster,
-- Engine = MergeTree(), TTL 30 days as for the traces (10_otel_traces.sql),
-- and the bloom_filter/tokenbf_v1 index branch (see 10_otel_traces.sql). The
-- template's column COMMENT clauses (documentation only) are left out.
--
-- Since v0.151.0 (contrib pull request #47720) the table has no
-- `TimestampTime` column, is partitioned by toDate(Timestamp), sorted by
-- (toStartOfFiveMinutes(Timestamp), ServiceName, Timestamp) without a separate
-- primary key, and materializes eight Kubernetes/deployment resource
-- attributes into `__otel_materialized_*` columns. Grafana's ClickHouse
-- plugin reads this layout with `otelVersion: latest` (plugin >= 4.x with the
-- v0.151 logs column map); the old one (TimestampTime) is what 0.140.0 wrote.
--
-- Writers: the Go exporter and rotel 0.0.1-alpha10 both insert (Timestamp,
-- TraceId, SpanId, TraceFlags, SeverityText, SeverityNumber, ServiceName,
-- Body, ResourceSchemaUrl, ResourceAttributes, ScopeSchemaUrl, ScopeName,
-- ScopeVersion, ScopeAttributes, LogAttributes) in RowBinary (rotel's list
-- captured on the wire); EventName takes its default, the materialized
-- columns are computed. conformance/tests/it/stack.rs pins this column list and
-- checks that rotel's inserts land.
CREATE TABLE IF NOT EXISTS otel.otel_logs
(
    Timestamp DateTime64(9) CODEC(Delta(8), ZSTD(1)),
    TraceId String CODEC(ZSTD(1)),
    SpanId String CODEC(ZSTD(1)),
    TraceFlags UInt8,
    SeverityText LowCardinality(String) CODEC(ZSTD(1)),
    SeverityNumber UInt8,
    ServiceName LowCardinality(String) CODEC(ZSTD(1)),
    Body String CODEC(ZSTD(1)),
    ResourceSchemaUrl LowCardinality(String) CODEC(ZSTD(1)),
    ResourceAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    ScopeSchemaUrl LowCardinality(String) CODEC(ZSTD(1)),
    ScopeName String CODEC(ZSTD(1)),
    ScopeVersion LowCardinality(String) CODEC(ZSTD(1)),
    ScopeAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    LogAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    EventName String CODEC(ZSTD(1)),
    `__otel_materialized_k8s.cluster.name` LowCardinality(String) MATERIALIZED ResourceAttributes['k8s.cluster.name'] CODEC(ZSTD(1)),
    `__otel_materialized_k8s.container.name` LowCardinality(String) MATERIALIZED ResourceAttributes['k8s.container.name'] CODEC(ZSTD(1)),
    `__otel_materialized_k8s.deployment.name` LowCardinality(String) MATERIALIZED ResourceAttributes['k8s.deployment.name'] CODEC(ZSTD(1)),
    `__otel_materialized_k8s.namespace.name` LowCardinality(String) MATERIALIZED ResourceAttributes['k8s.namespace.name'] CODEC(ZSTD(1)),
    `__otel_materialized_k8s.node.name` LowCardinality(String) MATERIALIZED ResourceAttributes['k8s.node.name'] CODEC(ZSTD(1)),
    `__otel_materialized_k8s.pod.name` LowCardinality(String) MATERIALIZED ResourceAttributes['k8s.pod.name'] CODEC(ZSTD(1)),
    `__otel_materialized_k8s.pod.uid` LowCardinality(String) MATERIALIZED ResourceAttributes['k8s.pod.uid'] CODEC(ZSTD(1)),
    `__otel_materialized_deployment.environment.name` LowCardinality(String) MATERIALIZED ResourceAttributes['deployment.environment.name'] CODEC(ZSTD(1)),
    INDEX idx_trace_id TraceId TYPE bloom_filter(0.001) GRANULARITY 1,
    INDEX idx_res_attr_key mapKeys(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_res_attr_value mapValues(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_scope_attr_key mapKeys(ScopeAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_scope_attr_value mapValues(ScopeAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_log_attr_key mapKeys(LogAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_log_attr_value mapValues(LogAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_lower_body lower(Body) TYPE tokenbf_v1(32768, 3, 0) GRANULARITY 8
) ENGINE = MergeTree()
PARTITION BY toDate(Timestamp)
ORDER BY (toStartOfFiveMinutes(Timestamp), ServiceName, Timestamp)
TTL toDateTime(Timestamp) + toIntervalDay(30)
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1;
