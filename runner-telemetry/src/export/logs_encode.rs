//! Log records as OTLP protobuf, encoded once when they are emitted.
//!
//! The export path of spans carries log records unchanged: a record is
//! encoded to the bytes of an `opentelemetry.proto.logs.v1.LogRecord` right
//! away, and a request is assembled by [`super::encode::build_request`].
//! `ExportLogsServiceRequest`, `ResourceLogs` and `ScopeLogs` have the same
//! field numbers as their trace counterparts (`resource_logs` = 1;
//! `resource` = 1, `scope_logs` = 2, `schema_url` = 3; `scope` = 1,
//! `log_records` = 2, `schema_url` = 3), and so do the responses
//! (`partial_success` = 1, `rejected_log_records` = 1, `error_message` = 2):
//! one raw request type serves both signals. Only the gRPC method and the
//! HTTP path differ ([`Signal`]).
//!
//! `LogRecord` is written here as its own prost message (the field numbers of
//! `logs/v1/logs.proto`) so that the library does not need
//! opentelemetry-proto's `logs` feature, which pulls in the SDK's log side.

use bytes::Bytes;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
use prost::Message;

/// What a worker exports: spans or log records. Each endpoint gets one
/// worker per signal; both share the runner's buffer and its budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Signal {
    Traces,
    Logs,
}

impl Signal {
    pub fn as_str(self) -> &'static str {
        match self {
            Signal::Traces => "traces",
            Signal::Logs => "logs",
        }
    }

    /// The gRPC method of the signal's collector service.
    pub fn grpc_path(self) -> &'static str {
        match self {
            Signal::Traces => GRPC_EXPORT_PATH,
            Signal::Logs => GRPC_LOGS_EXPORT_PATH,
        }
    }
}

/// `TraceService/Export`, the gRPC method of OTLP traces.
pub const GRPC_EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
/// `LogsService/Export`.
pub const GRPC_LOGS_EXPORT_PATH: &str = "/opentelemetry.proto.collector.logs.v1.LogsService/Export";

/// `SeverityNumber` values used by the runner.
pub mod severity {
    pub const INFO: i32 = 9;
    pub const WARN: i32 = 13;
    pub const ERROR: i32 = 17;
}

/// `opentelemetry.proto.logs.v1.LogRecord`.
#[derive(Clone, PartialEq, Message)]
pub struct RawLogRecord {
    #[prost(fixed64, tag = "1")]
    pub time_unix_nano: u64,
    #[prost(int32, tag = "2")]
    pub severity_number: i32,
    #[prost(string, tag = "3")]
    pub severity_text: String,
    #[prost(message, optional, tag = "5")]
    pub body: Option<AnyValue>,
    #[prost(message, repeated, tag = "6")]
    pub attributes: Vec<KeyValue>,
    #[prost(uint32, tag = "7")]
    pub dropped_attributes_count: u32,
    #[prost(fixed32, tag = "8")]
    pub flags: u32,
    #[prost(bytes = "vec", tag = "9")]
    pub trace_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "10")]
    pub span_id: Vec<u8>,
    #[prost(fixed64, tag = "11")]
    pub observed_time_unix_nano: u64,
}

impl RawLogRecord {
    pub fn encode_bytes(&self) -> Bytes {
        self.encode_to_vec().into()
    }
}

/// A string attribute.
pub fn string_attribute(key: &str, value: impl Into<String>) -> KeyValue {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    KeyValue {
        key: key.to_string(),
        key_strindex: 0,
        value: Some(AnyValue {
            value: Some(Value::StringValue(value.into())),
        }),
    }
}

/// An integer attribute.
pub fn int_attribute(key: &str, value: i64) -> KeyValue {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    KeyValue {
        key: key.to_string(),
        key_strindex: 0,
        value: Some(AnyValue {
            value: Some(Value::IntValue(value)),
        }),
    }
}

/// A string body.
pub fn string_body(text: impl Into<String>) -> Option<AnyValue> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    Some(AnyValue {
        value: Some(Value::StringValue(text.into())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::encode::{build_request, ResourceBlock, ScopeBlock, SpanRef};
    use opentelemetry::InstrumentationScope;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
    use opentelemetry_sdk::Resource;
    use std::sync::Arc;

    /// `ExportLogsServiceRequest` -> `ResourceLogs` -> `ScopeLogs`, decoded
    /// with our own messages of the logs field numbers.
    #[derive(Clone, PartialEq, Message)]
    struct LogsRequest {
        #[prost(message, repeated, tag = "1")]
        resource_logs: Vec<ResourceLogs>,
    }
    #[derive(Clone, PartialEq, Message)]
    struct ResourceLogs {
        #[prost(message, optional, tag = "1")]
        resource: Option<opentelemetry_proto::tonic::resource::v1::Resource>,
        #[prost(message, repeated, tag = "2")]
        scope_logs: Vec<ScopeLogs>,
    }
    #[derive(Clone, PartialEq, Message)]
    struct ScopeLogs {
        #[prost(message, optional, tag = "1")]
        scope: Option<opentelemetry_proto::tonic::common::v1::InstrumentationScope>,
        #[prost(message, repeated, tag = "2")]
        log_records: Vec<RawLogRecord>,
    }

    #[test]
    fn a_raw_request_of_records_decodes_as_logs() {
        let resource = Arc::new(ResourceBlock::new(
            &Resource::builder_empty().with_service_name("svc").build(),
        ));
        let scope = Arc::new(ScopeBlock::new(
            &InstrumentationScope::builder("gitlab-ci-runner").build(),
        ));
        let records: Vec<Bytes> = ["one", "two"]
            .iter()
            .map(|text| {
                RawLogRecord {
                    time_unix_nano: 5,
                    severity_number: severity::INFO,
                    severity_text: "INFO".into(),
                    body: string_body(*text),
                    attributes: vec![int_attribute("ci.job.id", 7)],
                    trace_id: vec![1; 16],
                    span_id: vec![2; 8],
                    observed_time_unix_nano: 6,
                    ..Default::default()
                }
                .encode_bytes()
            })
            .collect();
        let raw = build_request(records.iter().map(|r| SpanRef {
            span: r,
            resource: &resource,
            scope: &scope,
        }));
        let decoded = LogsRequest::decode(raw.encode_to_vec().as_slice()).unwrap();
        let logs = &decoded.resource_logs[0].scope_logs[0];
        assert_eq!(logs.scope.as_ref().unwrap().name, "gitlab-ci-runner");
        let bodies: Vec<_> = logs
            .log_records
            .iter()
            .map(|r| format!("{:?}", r.body.as_ref().unwrap().value))
            .collect();
        assert_eq!(
            bodies,
            ["Some(StringValue(\"one\"))", "Some(StringValue(\"two\"))"]
        );
        assert_eq!(logs.log_records[0].span_id, vec![2; 8]);
        // A logs response decodes as the trace response (same numbers).
        let _ = ExportTraceServiceResponse::decode(&[][..]).unwrap();
    }
}
