//! The embedded stack end to end: spans exported with the stock
//! `opentelemetry-otlp` exporter land in ClickHouse through the real collector,
//! and the CI materialized view picks up exactly the CI services' spans.

use std::time::{Duration, SystemTime};

use conformance::process::{self, wait_for};
use conformance::trace::{self, StoredSpan};
use conformance::{ClickHouse, Stack, StackOptions};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};
use opentelemetry_sdk::Resource;
use serde_json::Value;

const LANDING_DEADLINE: Duration = Duration::from_secs(20);

fn random_trace_id() -> TraceId {
    TraceId::from_bytes(rand::random::<u128>().max(1).to_be_bytes())
}

fn random_span_id() -> SpanId {
    SpanId::from_bytes(rand::random::<u64>().max(1).to_be_bytes())
}

/// A finished span of 250 ms that ended just now (the exporter's TTL drops
/// old timestamps, so tests use current ones).
fn span(
    trace_id: TraceId,
    parent: SpanId,
    name: &'static str,
    attributes: Vec<KeyValue>,
) -> SpanData {
    let end = SystemTime::now();
    SpanData {
        span_context: SpanContext::new(
            trace_id,
            random_span_id(),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        ),
        parent_span_id: parent,
        parent_span_is_remote: true,
        span_kind: SpanKind::Internal,
        name: name.into(),
        start_time: end - Duration::from_millis(250),
        end_time: end,
        attributes,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: Status::Ok,
        instrumentation_scope: InstrumentationScope::builder("conformance").build(),
    }
}

fn resource(service: &str, extra: Vec<KeyValue>) -> Resource {
    Resource::builder_empty()
        .with_service_name(service.to_string())
        .with_attributes(extra)
        .build()
}

#[derive(Clone, Copy)]
enum Transport {
    Http,
    Grpc,
}

/// Exports `spans` with the stock OTLP exporter, as a runner would (the async
/// reqwest client for HTTP, the same the runner uses; tonic for gRPC).
fn export(stack: &Stack, transport: Transport, resource: &Resource, spans: Vec<SpanData>) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut exporter = match transport {
            Transport::Http => opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(format!("{}/v1/traces", stack.endpoints().otlp_http))
                .build(),
            Transport::Grpc => opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(stack.endpoints().otlp_grpc.clone())
                .build(),
        }
        .expect("building the OTLP exporter");
        exporter.set_resource(resource);
        exporter
            .export(spans)
            .await
            .expect("the collector accepted the spans");
    });
}

fn spans_of_trace(clickhouse: &ClickHouse, trace_id: TraceId, expected: usize) -> Vec<StoredSpan> {
    wait_for(
        "the spans to land in otel.otel_traces",
        LANDING_DEADLINE,
        || {
            let spans = trace::spans_of_trace(clickhouse, &trace_id.to_string())?;
            Ok((spans.len() >= expected).then_some(spans))
        },
    )
    .unwrap()
}

fn check_span_lands(transport: Transport) {
    let stack = Stack::start(StackOptions::isolated()).unwrap();
    let clickhouse = stack.clickhouse();
    let trace_id = random_trace_id();
    let parent = random_span_id();
    let sent = span(
        trace_id,
        parent,
        "job_execution",
        vec![
            KeyValue::new("ci.job.id", 4242_i64),
            KeyValue::new("ci.job.status", "success"),
        ],
    );
    let span_id = sent.span_context.span_id();
    export(
        &stack,
        transport,
        &resource("gitlab-ci-runner", vec![]),
        vec![sent],
    );

    let spans = spans_of_trace(&clickhouse, trace_id, 1);
    assert_eq!(spans.len(), 1, "{spans:#?}");
    let span = &spans[0];
    assert_eq!(span.trace_id, trace_id.to_string());
    assert_eq!(span.span_id, span_id.to_string());
    assert_eq!(span.parent_span_id, parent.to_string());
    assert_eq!(span.name, "job_execution");
    assert_eq!(span.service, "gitlab-ci-runner");
    assert_eq!(span.scope, "conformance");
    assert_eq!(span.attribute("ci.job.id"), Some("4242"));
    assert_eq!(span.attribute("ci.job.status"), Some("success"));
    assert_eq!(span.duration_ns, 250_000_000, "Duration is in nanoseconds");

    // The trace-id lookup table is fed by its materialized view.
    let lookups = wait_for("otel_traces_trace_id_ts", LANDING_DEADLINE, || {
        let n = clickhouse.count(&format!(
            "SELECT count() FROM otel.otel_traces_trace_id_ts WHERE TraceId = '{trace_id}'"
        ))?;
        Ok((n > 0).then_some(n))
    })
    .unwrap();
    assert!(lookups >= 1);
}

#[test]
fn a_span_exported_over_otlp_http_lands_in_otel_traces() {
    check_span_lands(Transport::Http);
}

#[test]
fn a_span_exported_over_otlp_grpc_lands_in_otel_traces() {
    check_span_lands(Transport::Grpc);
}

#[test]
fn ci_job_telemetry_traces_holds_the_ci_services_spans_only() {
    let stack = Stack::start(StackOptions::isolated()).unwrap();
    let clickhouse = stack.clickhouse();
    let trace_id = random_trace_id();
    let parent = random_span_id();
    let ids = |job: i64| {
        vec![
            KeyValue::new("ci.job.id", job),
            KeyValue::new("ci.pipeline.id", 777_i64),
            KeyValue::new("ci.project.id", 12_i64),
        ]
    };
    // IDs as span attributes (what the runner does) ...
    export(
        &stack,
        Transport::Http,
        &resource("gitlab-ci-runner", vec![]),
        vec![span(trace_id, parent, "job_execution", ids(1001))],
    );
    // ... or as resource attributes (what the upstream MV expected) ...
    export(
        &stack,
        Transport::Grpc,
        &resource("gitlab-ci-runner", ids(1002)),
        vec![span(trace_id, parent, "get_sources", vec![])],
    );
    // ... and a service that is not CI, with the same attributes.
    export(
        &stack,
        Transport::Http,
        &resource("payments-api", vec![]),
        vec![span(trace_id, parent, "charge_card", ids(1003))],
    );

    // All three are in otel_traces: from here on, absence means something.
    spans_of_trace(&clickhouse, trace_id, 3);
    let rows = wait_for("ci_job_telemetry_traces", LANDING_DEADLINE, || {
        let rows = trace::ci_rows(&clickhouse, &format!("trace_id = '{trace_id}'"))?;
        Ok((rows.len() >= 2).then_some(rows))
    })
    .unwrap();
    let summary: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{} {} {} {} {}",
                r.build_id, r.pipeline_id, r.project_id, r.span_name, r.service_name
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            "1001 777 12 job_execution gitlab-ci-runner",
            "1002 777 12 get_sources gitlab-ci-runner",
        ]
    );
}

#[test]
fn dropping_a_stack_stops_its_processes() {
    let stack = Stack::start(StackOptions::isolated()).unwrap();
    let ports: Vec<u16> = [
        &stack.endpoints().clickhouse_url,
        &stack.endpoints().otlp_http,
        &stack.endpoints().otlp_grpc,
    ]
    .iter()
    .map(|u| u.rsplit(':').next().unwrap().parse().unwrap())
    .collect();
    assert!(ports.iter().all(|p| process::port_open(*p)));
    let dir = stack.dir().to_path_buf();
    drop(stack);
    for port in ports {
        assert!(
            !process::port_open(port),
            "port {port} still answers after drop"
        );
    }
    assert!(!dir.exists(), "the isolated stack's directory is removed");
}

/// Stops a detached stack when the test ends, pass or fail.
struct DownOnDrop(std::path::PathBuf);

impl Drop for DownOnDrop {
    fn drop(&mut self) {
        let _ = conformance::stack::down(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_detached_stack_keeps_its_data_across_down_and_up() {
    let dir = StackOptions::isolated().dir;
    let _guard = DownOnDrop(dir.clone());
    let endpoints = Stack::start(StackOptions::detached(&dir))
        .unwrap()
        .detach()
        .unwrap();
    let states = conformance::stack::components(&dir);
    assert!(states.iter().all(|c| c.running), "{states:?}");

    let trace_id = random_trace_id();
    let stack_view = endpoints.clickhouse();
    stack_view
        .execute(&format!(
            "INSERT INTO otel.otel_traces (Timestamp, TraceId, SpanId, SpanName, ServiceName) \
             VALUES (now64(9), '{trace_id}', '{}', 'kept', 'conformance')",
            random_span_id()
        ))
        .unwrap();

    let report = conformance::stack::down(&dir).unwrap();
    assert_eq!(report.len(), 2, "{report:?}");
    assert!(conformance::stack::components(&dir)
        .iter()
        .all(|c| !c.running));
    // A second down tolerates the missing (or stale) PID files.
    conformance::stack::down(&dir).unwrap();

    let endpoints = Stack::start(StackOptions::detached(&dir))
        .unwrap()
        .detach()
        .unwrap();
    let kept = endpoints
        .clickhouse()
        .count(&format!(
            "SELECT count() FROM otel.otel_traces WHERE TraceId = '{trace_id}'"
        ))
        .unwrap();
    assert_eq!(
        kept, 1,
        "the row written before `down` is still there after `up`"
    );
}

#[test]
fn a_log_record_lands_in_otel_logs() {
    let stack = Stack::start(StackOptions::isolated()).unwrap();
    let trace_id = random_trace_id();
    let now_ns = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let text =
        |key: &str, value: &str| serde_json::json!({"key": key, "value": {"stringValue": value}});
    let payload = serde_json::json!({"resourceLogs": [{
        "resource": {"attributes": [text("service.name", "gitlab-ci-runner")]},
        "scopeLogs": [{"scope": {"name": "conformance"}, "logRecords": [{
            "timeUnixNano": now_ns.to_string(),
            "severityText": "WARN",
            "severityNumber": 13,
            "body": {"stringValue": "a log line"},
            "traceId": trace_id.to_string(),
            "attributes": [text("ci.job.id", "77")],
        }]}],
    }]});
    let response = ureq::post(format!("{}/v1/logs", stack.endpoints().otlp_http))
        .header("Content-Type", "application/json")
        .send(payload.to_string())
        .unwrap();
    assert_eq!(response.status(), 200);

    let clickhouse = stack.clickhouse();
    let records = wait_for("the log record in otel.otel_logs", LANDING_DEADLINE, || {
        let records = trace::log_records(&clickhouse, &format!("TraceId = '{trace_id}'"))?;
        Ok((!records.is_empty()).then_some(records))
    })
    .unwrap();
    let record = &records[0];
    assert_eq!(
        (
            record.severity_text.as_str(),
            record.service_name.as_str(),
            record.body.as_str()
        ),
        ("WARN", "gitlab-ci-runner", "a log line")
    );
    assert_eq!(record.log_attributes, [("ci.job.id".into(), "77".into())]);
}

/// The columns (name, type, default kind) and keys the contrib ClickHouse
/// exporter's DDL gives a table, at the collector version the Docker stack
/// pins. Source: open-telemetry/opentelemetry-collector-contrib v0.159.0,
/// `exporter/clickhouseexporter/internal/sqltemplates/traces_table.sql` and
/// `logs_table.sql` (Nested columns as ClickHouse lists them, one array per
/// field).
struct ExporterTable {
    name: &'static str,
    columns: &'static [(&'static str, &'static str, &'static str)],
    partition_key: &'static str,
    sorting_key: &'static str,
}

const MAP: &str = "Map(LowCardinality(String), String)";
const LC: &str = "LowCardinality(String)";

const EXPORTER_TABLES: &[ExporterTable] = &[
    ExporterTable {
        name: "otel_traces",
        columns: &[
            ("Timestamp", "DateTime64(9)", ""),
            ("TraceId", "String", ""),
            ("SpanId", "String", ""),
            ("ParentSpanId", "String", ""),
            ("TraceState", "String", ""),
            ("SpanName", LC, ""),
            ("SpanKind", LC, ""),
            ("ServiceName", LC, ""),
            ("ResourceAttributes", MAP, ""),
            ("ScopeName", "String", ""),
            ("ScopeVersion", "String", ""),
            ("SpanAttributes", MAP, ""),
            ("Duration", "UInt64", ""),
            ("StatusCode", LC, ""),
            ("StatusMessage", "String", ""),
            ("Events.Timestamp", "Array(DateTime64(9))", ""),
            ("Events.Name", "Array(LowCardinality(String))", ""),
            (
                "Events.Attributes",
                "Array(Map(LowCardinality(String), String))",
                "",
            ),
            ("Links.TraceId", "Array(String)", ""),
            ("Links.SpanId", "Array(String)", ""),
            ("Links.TraceState", "Array(String)", ""),
            (
                "Links.Attributes",
                "Array(Map(LowCardinality(String), String))",
                "",
            ),
            ("ResourceAttributeItems", "Array(String)", "ALIAS"),
            ("SpanAttributeItems", "Array(String)", "ALIAS"),
        ],
        partition_key: "toDate(Timestamp)",
        sorting_key: "ServiceName, SpanName, toDateTime(Timestamp), Timestamp",
    },
    ExporterTable {
        name: "otel_traces_trace_id_ts",
        columns: &[
            ("TraceId", "String", ""),
            ("Start", "SimpleAggregateFunction(min, DateTime)", ""),
            ("End", "SimpleAggregateFunction(max, DateTime)", ""),
        ],
        partition_key: "toStartOfWeek(Start)",
        sorting_key: "TraceId",
    },
    // Changed in v0.151.0: no TimestampTime, a time-bucketed sort key and
    // materialized Kubernetes attributes.
    ExporterTable {
        name: "otel_logs",
        columns: &[
            ("Timestamp", "DateTime64(9)", ""),
            ("TraceId", "String", ""),
            ("SpanId", "String", ""),
            ("TraceFlags", "UInt8", ""),
            ("SeverityText", LC, ""),
            ("SeverityNumber", "UInt8", ""),
            ("ServiceName", LC, ""),
            ("Body", "String", ""),
            ("ResourceSchemaUrl", LC, ""),
            ("ResourceAttributes", MAP, ""),
            ("ScopeSchemaUrl", LC, ""),
            ("ScopeName", "String", ""),
            ("ScopeVersion", LC, ""),
            ("ScopeAttributes", MAP, ""),
            ("LogAttributes", MAP, ""),
            ("EventName", "String", ""),
            ("__otel_materialized_k8s.cluster.name", LC, "MATERIALIZED"),
            ("__otel_materialized_k8s.container.name", LC, "MATERIALIZED"),
            (
                "__otel_materialized_k8s.deployment.name",
                LC,
                "MATERIALIZED",
            ),
            ("__otel_materialized_k8s.namespace.name", LC, "MATERIALIZED"),
            ("__otel_materialized_k8s.node.name", LC, "MATERIALIZED"),
            ("__otel_materialized_k8s.pod.name", LC, "MATERIALIZED"),
            ("__otel_materialized_k8s.pod.uid", LC, "MATERIALIZED"),
            (
                "__otel_materialized_deployment.environment.name",
                LC,
                "MATERIALIZED",
            ),
        ],
        partition_key: "toDate(Timestamp)",
        sorting_key: "toStartOfFiveMinutes(Timestamp), ServiceName, Timestamp",
    },
];

#[test]
fn the_schema_has_the_pinned_exporter_versions_columns_and_keys() {
    let stack = Stack::start(StackOptions::isolated()).unwrap();
    let clickhouse = stack.clickhouse();
    for table in EXPORTER_TABLES {
        let columns: Vec<String> = clickhouse
            .json_rows(&format!(
                "SELECT name, type, default_kind FROM system.columns \
                 WHERE database = 'otel' AND table = '{}' ORDER BY position",
                table.name
            ))
            .unwrap()
            .iter()
            .map(|r| {
                format!(
                    "{} {} {}",
                    text(&r["name"]),
                    text(&r["type"]),
                    text(&r["default_kind"])
                )
            })
            .collect();
        let expected: Vec<String> = table
            .columns
            .iter()
            .map(|(name, kind, default)| format!("{name} {kind} {default}"))
            .collect();
        assert_eq!(columns, expected, "columns of otel.{}", table.name);
        let keys = clickhouse
            .json_rows(&format!(
                "SELECT partition_key, sorting_key FROM system.tables \
                 WHERE database = 'otel' AND name = '{}'",
                table.name
            ))
            .unwrap();
        assert_eq!(
            key(&keys[0]["partition_key"]),
            table.partition_key,
            "{}",
            table.name
        );
        assert_eq!(
            key(&keys[0]["sorting_key"]),
            table.sorting_key,
            "{}",
            table.name
        );
    }
}

/// A table key as ClickHouse lists it, without the parentheses some versions
/// keep around a one-column key (`(TraceId)`).
fn key(value: &Value) -> String {
    let key = text(value);
    match key.strip_prefix('(').and_then(|k| k.strip_suffix(')')) {
        Some(inner) if !inner.contains(',') => inner.to_string(),
        _ => key,
    }
}

/// rotel writes logs with a fixed column list (the 15 columns of the
/// exporter's `logs_insert.sql`): they must all exist in the pinned schema.
#[test]
fn a_log_record_exported_over_otlp_lands_in_otel_logs() {
    let stack = Stack::start(StackOptions::isolated()).unwrap();
    let clickhouse = stack.clickhouse();
    let trace_id = random_trace_id();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let payload = serde_json::json!({
        "resourceLogs": [{
            "resource": { "attributes": [
                { "key": "service.name", "value": { "stringValue": "gitlab-ci-runner" } },
                { "key": "k8s.namespace.name", "value": { "stringValue": "runners" } }
            ]},
            "scopeLogs": [{
                "scope": { "name": "gitlab-ci-runner" },
                "logRecords": [{
                    "timeUnixNano": now.to_string(),
                    "severityText": "WARN",
                    "severityNumber": 13,
                    "body": { "stringValue": "cache miss" },
                    "traceId": trace_id.to_string(),
                    "attributes": [{ "key": "ci.job.id", "value": { "intValue": "4242" } }]
                }]
            }]
        }]
    });
    let response = ureq::post(&format!("{}/v1/logs", stack.endpoints().otlp_http))
        .header("Content-Type", "application/json")
        .send(payload.to_string())
        .expect("the collector accepted the log record");
    assert_eq!(response.status(), 200);

    let rows = wait_for(
        "the log record to land in otel.otel_logs",
        LANDING_DEADLINE,
        || {
            let rows = clickhouse.json_rows(&format!(
            "SELECT ServiceName, SeverityText, SeverityNumber, Body, LogAttributes, EventName, \
             `__otel_materialized_k8s.namespace.name` AS namespace \
             FROM otel.otel_logs WHERE TraceId = '{trace_id}'"
        ))?;
            Ok((!rows.is_empty()).then_some(rows))
        },
    )
    .unwrap();
    assert_eq!(rows.len(), 1, "{rows:#?}");
    let row = &rows[0];
    assert_eq!(row["ServiceName"], "gitlab-ci-runner");
    assert_eq!(row["SeverityText"], "WARN");
    assert_eq!(text(&row["SeverityNumber"]), "13");
    assert_eq!(row["Body"], "cache miss");
    assert_eq!(row["LogAttributes"]["ci.job.id"], "4242");
    assert_eq!(row["EventName"], "", "filled by its default");
    assert_eq!(
        row["namespace"], "runners",
        "materialized from the resource"
    );
}

/// A JSON value as text (strings unquoted).
fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
