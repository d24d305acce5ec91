//! Spans as OTLP protobuf, encoded once when they end.
//!
//! A span is converted with opentelemetry-proto's transform
//! (`SpanData -> opentelemetry.proto.trace.v1.Span`) and encoded to bytes
//! right away: the buffer holds exactly what goes over the wire, so its byte
//! bound is the real payload size, and a span sent to two endpoints is one
//! shared allocation. A request is assembled from those bytes: the
//! `Raw*` messages below have the field numbers of
//! `ExportTraceServiceRequest`, `ResourceSpans` and `ScopeSpans`, with the
//! nested messages as already-encoded `bytes` fields. Protobuf encodes an
//! embedded message and a `bytes` field the same way (length-delimited), so
//! the result is a valid `ExportTraceServiceRequest` for any collector.

use std::sync::Arc;

use bytes::Bytes;
use opentelemetry::InstrumentationScope;
use opentelemetry_proto::tonic::common::v1::InstrumentationScope as ProtoScope;
use opentelemetry_proto::tonic::resource::v1::Resource as ProtoResource;
use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
use opentelemetry_sdk::trace::SpanData;
use opentelemetry_sdk::Resource;
use prost::Message;

/// An ended span, encoded, with what it belongs to.
#[derive(Debug, Clone)]
pub struct EncodedSpan {
    pub span: Bytes,
    pub resource: Arc<ResourceBlock>,
    pub scope: Arc<ScopeBlock>,
}

/// A job's resource, encoded once.
#[derive(Debug)]
pub struct ResourceBlock {
    pub encoded: Bytes,
    pub schema_url: String,
}

impl ResourceBlock {
    pub fn new(resource: &Resource) -> ResourceBlock {
        let with_schema = ResourceAttributesWithSchema::from(resource);
        let proto = ProtoResource {
            attributes: with_schema.attributes.0,
            dropped_attributes_count: 0,
            entity_refs: Vec::new(),
        };
        ResourceBlock {
            encoded: proto.encode_to_vec().into(),
            schema_url: with_schema.schema_url.unwrap_or_default(),
        }
    }
}

/// An instrumentation scope, encoded once per job.
#[derive(Debug, PartialEq, Eq)]
pub struct ScopeBlock {
    pub encoded: Bytes,
    pub schema_url: String,
}

impl ScopeBlock {
    pub fn new(scope: &InstrumentationScope) -> ScopeBlock {
        let proto: ProtoScope = (scope, None).into();
        ScopeBlock {
            encoded: proto.encode_to_vec().into(),
            schema_url: scope.schema_url().unwrap_or_default().to_string(),
        }
    }
}

/// Encodes one span (without its resource and scope), straight from the
/// `SpanData` ([`super::span_wire`]: the same bytes as opentelemetry-proto's
/// conversion, without building its message first).
pub fn encode_span(span: SpanData) -> Bytes {
    super::span_wire::encode(&span).into()
}

/// `ExportTraceServiceRequest` with pre-encoded parts.
#[derive(Clone, PartialEq, Message)]
pub struct RawExportRequest {
    #[prost(message, repeated, tag = "1")]
    pub resource_spans: Vec<RawResourceSpans>,
}

/// `ResourceSpans`: `resource` (1), `scope_spans` (2), `schema_url` (3).
#[derive(Clone, PartialEq, Message)]
pub struct RawResourceSpans {
    #[prost(bytes = "bytes", tag = "1")]
    pub resource: Bytes,
    #[prost(message, repeated, tag = "2")]
    pub scope_spans: Vec<RawScopeSpans>,
    #[prost(string, tag = "3")]
    pub schema_url: String,
}

/// `ScopeSpans`: `scope` (1), `spans` (2), `schema_url` (3).
#[derive(Clone, PartialEq, Message)]
pub struct RawScopeSpans {
    #[prost(bytes = "bytes", tag = "1")]
    pub scope: Bytes,
    #[prost(bytes = "bytes", repeated, tag = "2")]
    pub spans: Vec<Bytes>,
    #[prost(string, tag = "3")]
    pub schema_url: String,
}

/// One span of a request: its bytes and what it belongs to.
pub struct SpanRef<'a> {
    pub span: &'a Bytes,
    pub resource: &'a Arc<ResourceBlock>,
    pub scope: &'a Arc<ScopeBlock>,
}

/// Groups spans by resource (the same job) and scope, keeping their order
/// within each group.
pub fn build_request<'a>(spans: impl IntoIterator<Item = SpanRef<'a>>) -> RawExportRequest {
    let mut groups: Vec<(&Arc<ResourceBlock>, RawResourceSpans)> = Vec::new();
    for s in spans {
        let index = match groups.iter().position(|(r, _)| Arc::ptr_eq(r, s.resource)) {
            Some(i) => i,
            None => {
                groups.push((
                    s.resource,
                    RawResourceSpans {
                        resource: s.resource.encoded.clone(),
                        scope_spans: Vec::new(),
                        schema_url: s.resource.schema_url.clone(),
                    },
                ));
                groups.len() - 1
            }
        };
        let resource_spans = &mut groups[index].1;
        let scope = match resource_spans
            .scope_spans
            .iter()
            .position(|ss| ss.scope == s.scope.encoded && ss.schema_url == s.scope.schema_url)
        {
            Some(i) => i,
            None => {
                resource_spans.scope_spans.push(RawScopeSpans {
                    scope: s.scope.encoded.clone(),
                    spans: Vec::new(),
                    schema_url: s.scope.schema_url.clone(),
                });
                resource_spans.scope_spans.len() - 1
            }
        };
        resource_spans.scope_spans[scope].spans.push(s.span.clone());
    }
    RawExportRequest {
        resource_spans: groups.into_iter().map(|(_, rs)| rs).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{
        SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
    };
    use opentelemetry::KeyValue;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};
    use std::time::{Duration, SystemTime};

    fn span(name: &'static str, id: u64, scope: &InstrumentationScope) -> SpanData {
        SpanData {
            span_context: SpanContext::new(
                TraceId::from(7u128),
                SpanId::from(id),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            parent_span_id: SpanId::from(1u64),
            parent_span_is_remote: true,
            span_kind: SpanKind::Internal,
            name: name.into(),
            start_time: SystemTime::UNIX_EPOCH + Duration::from_secs(10),
            end_time: SystemTime::UNIX_EPOCH + Duration::from_secs(11),
            attributes: vec![KeyValue::new("ci.job.id", 42)],
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: Status::error("boom"),
            instrumentation_scope: scope.clone(),
        }
    }

    #[test]
    fn raw_request_decodes_as_the_real_message() {
        let scope_a = InstrumentationScope::builder("a").with_version("1").build();
        let scope_b = InstrumentationScope::builder("b").build();
        let job1 = Arc::new(ResourceBlock::new(
            &Resource::builder_empty()
                .with_service_name("svc")
                .with_attribute(KeyValue::new("ci.job.id", 1))
                .build(),
        ));
        let job2 = Arc::new(ResourceBlock::new(
            &Resource::builder_empty().with_service_name("svc2").build(),
        ));
        let (a, b) = (
            Arc::new(ScopeBlock::new(&scope_a)),
            Arc::new(ScopeBlock::new(&scope_b)),
        );
        let spans = [
            (encode_span(span("s1", 2, &scope_a)), &job1, &a),
            (encode_span(span("s2", 3, &scope_b)), &job1, &b),
            (encode_span(span("s3", 4, &scope_a)), &job2, &a),
            (encode_span(span("s4", 5, &scope_a)), &job1, &a),
        ];
        let raw = build_request(spans.iter().map(|(s, r, sc)| SpanRef {
            span: s,
            resource: r,
            scope: sc,
        }));
        let decoded = ExportTraceServiceRequest::decode(raw.encode_to_vec().as_slice()).unwrap();
        let summary: Vec<String> = decoded
            .resource_spans
            .iter()
            .map(|rs| {
                let service = rs
                    .resource
                    .as_ref()
                    .unwrap()
                    .attributes
                    .iter()
                    .find(|kv| kv.key == "service.name")
                    .and_then(|kv| kv.value.as_ref())
                    .and_then(|v| v.value.clone());
                let scopes: Vec<String> = rs
                    .scope_spans
                    .iter()
                    .map(|ss| {
                        let names: Vec<&str> = ss.spans.iter().map(|s| s.name.as_str()).collect();
                        format!("{}:{}", ss.scope.as_ref().unwrap().name, names.join(","))
                    })
                    .collect();
                format!("{service:?} {}", scopes.join(" "))
            })
            .collect();
        assert_eq!(
            summary,
            [
                "Some(StringValue(\"svc\")) a:s1,s4 b:s2",
                "Some(StringValue(\"svc2\")) a:s3"
            ]
        );
        let s1 = &decoded.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(s1.span_id, 2u64.to_be_bytes());
        assert_eq!(s1.parent_span_id, 1u64.to_be_bytes());
        assert_eq!(s1.start_time_unix_nano, 10_000_000_000);
        assert_eq!(s1.status.as_ref().unwrap().message, "boom");
        assert_eq!(
            decoded.resource_spans[0].scope_spans[0]
                .scope
                .as_ref()
                .unwrap()
                .version,
            "1"
        );
    }
}
