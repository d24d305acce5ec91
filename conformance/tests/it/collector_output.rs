//! What the embedded stack's collector (rotel 0.0.1a15) writes into
//! `otel.otel_traces` where it differs from the official collector's
//! ClickHouse exporter (opentelemetry-collector-contrib, which stores every
//! attribute as `pcommon.Value.AsString()`), pinned one by one. A newer
//! collector that fixes a difference makes its line here fail: update the
//! line and the table in `compose/README.md` ("Differences from the official
//! exporter") together.

use std::time::{SystemTime, UNIX_EPOCH};

use conformance::process::wait_for;
use conformance::{Stack, StackOptions};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{
    any_value::Value, AnyValue, ArrayValue, KeyValue, KeyValueList,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, ResourceSpans, ScopeSpans, Span};
use prost::Message;

fn attribute(key: &str, value: Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn string(value: &str) -> AnyValue {
    AnyValue {
        value: Some(Value::StringValue(value.into())),
    }
}

/// (attribute, value sent, stored by rotel 0.0.1a15, stored by the official exporter)
fn attributes() -> Vec<(&'static str, Value, &'static str, &'static str)> {
    vec![
        ("same.string", Value::StringValue("a".into()), "a", "a"),
        ("same.int", Value::IntValue(42), "42", "42"),
        ("same.bool", Value::BoolValue(true), "true", "true"),
        ("same.double", Value::DoubleValue(1.5), "1.5", "1.5"),
        (
            "differs.double_integral",
            Value::DoubleValue(2.0),
            "2.0",
            "2",
        ),
        (
            "differs.bytes",
            Value::BytesValue(vec![0xde, 0xad, 0xbe, 0xef]),
            "deadbeef",
            "3q2+7w==",
        ),
        (
            "differs.array",
            Value::ArrayValue(ArrayValue {
                values: vec![string("a"), string("b")],
            }),
            r#"{"values":[{"stringValue":"a"},{"stringValue":"b"}]}"#,
            r#"["a","b"]"#,
        ),
        (
            "differs.map",
            Value::KvlistValue(KeyValueList {
                values: vec![KeyValue {
                    key: "k".into(),
                    value: Some(string("v")),
                    ..Default::default()
                }],
            }),
            r#"{"values":[{"key":"k","value":{"stringValue":"v"}}]}"#,
            r#"{"k":"v"}"#,
        ),
    ]
}

/// (span kind sent, stored by rotel 0.0.1a15, stored by the official exporter)
const KINDS: [(SpanKind, &str, &str); 6] = [
    (SpanKind::Unspecified, "Unspecified", "Unspecified"),
    (SpanKind::Internal, "Internal", "Internal"),
    (SpanKind::Server, "Server", "Server"),
    (SpanKind::Client, "Client", "Client"),
    (SpanKind::Producer, "Producer", "Producer"),
    (SpanKind::Consumer, "client", "Consumer"),
];

#[test]
fn attribute_values_and_span_kinds_are_stored_as_pinned() {
    let stack = Stack::start(StackOptions::isolated()).unwrap();
    let clickhouse = stack.clickhouse();
    let trace_id = rand::random::<u128>().max(1).to_be_bytes();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let spans: Vec<Span> = KINDS
        .iter()
        .enumerate()
        .map(|(i, (kind, _, _))| Span {
            trace_id: trace_id.to_vec(),
            span_id: (i as u64 + 1).to_be_bytes().to_vec(),
            name: format!("kind-{i}"),
            kind: *kind as i32,
            start_time_unix_nano: now - 1_000,
            end_time_unix_nano: now,
            attributes: attributes()
                .into_iter()
                .map(|(key, value, _, _)| attribute(key, value))
                .collect(),
            ..Default::default()
        })
        .collect();
    let request = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![attribute(
                    "service.name",
                    Value::StringValue("pinning".into()),
                )],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    let status = ureq::post(&format!("{}/v1/traces", stack.endpoints().otlp_http))
        .header("Content-Type", "application/x-protobuf")
        .send(&request.encode_to_vec()[..])
        .unwrap()
        .status();
    assert_eq!(status, 200);

    let trace = hex::encode(trace_id);
    let rows = wait_for(
        "the spans to land",
        std::time::Duration::from_secs(20),
        || {
            let rows = clickhouse.json_rows(&format!(
                "SELECT SpanName, SpanKind, SpanAttributes FROM otel.otel_traces \
                 WHERE TraceId = '{trace}' ORDER BY SpanName"
            ))?;
            Ok((rows.len() == KINDS.len()).then_some(rows))
        },
    )
    .unwrap();

    let mut stored = Vec::new();
    let mut pinned = Vec::new();
    for (i, (kind, rotel, official)) in KINDS.iter().enumerate() {
        stored.push(format!(
            "{kind:?}: {}",
            rows[i]["SpanKind"].as_str().unwrap()
        ));
        pinned.push(format!("{kind:?}: {rotel}"));
        if rotel != official {
            println!("span kind {kind:?}: rotel {rotel:?}, official exporter {official:?}");
        }
    }
    for (key, _, rotel, official) in attributes() {
        let value = rows[0]["SpanAttributes"][key]
            .as_str()
            .unwrap_or("<missing>");
        stored.push(format!("{key}: {value}"));
        pinned.push(format!("{key}: {rotel}"));
        if rotel != official {
            println!("attribute {key}: rotel {rotel:?}, official exporter {official:?}");
        }
    }
    assert_eq!(stored, pinned);
}
