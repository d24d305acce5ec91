//! In-test OTLP collectors (HTTP and gRPC) that record the decoded requests
//! they receive, and wait on their arrival without sleeping; a stalled server
//! and a closed port for the failure cases.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use prost::Message;

/// One received span, flattened with its resource and scope.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub name: String,
    pub resource: BTreeMap<String, String>,
    pub scope_name: String,
    pub scope_version: String,
    pub attributes: BTreeMap<String, String>,
    /// 0 unset, 1 ok, 2 error.
    pub status_code: i32,
    pub status_message: String,
    pub start_ns: u64,
    pub end_ns: u64,
    pub flags: u32,
}

impl ReceivedSpan {
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Renders a value with its type: `int:42`, `str:x`, `bool:true`.
fn render(value: Option<&Value>) -> String {
    match value {
        Some(Value::StringValue(s)) => format!("str:{s}"),
        Some(Value::IntValue(i)) => format!("int:{i}"),
        Some(Value::BoolValue(b)) => format!("bool:{b}"),
        Some(Value::DoubleValue(d)) => format!("double:{d}"),
        other => format!("{other:?}"),
    }
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| {
            (
                kv.key.clone(),
                render(kv.value.as_ref().and_then(|v| v.value.as_ref())),
            )
        })
        .collect()
}

fn flatten(request: &ExportTraceServiceRequest) -> Vec<ReceivedSpan> {
    let mut out = Vec::new();
    for rs in &request.resource_spans {
        let resource = rs
            .resource
            .as_ref()
            .map(|r| attributes(&r.attributes))
            .unwrap_or_default();
        for ss in &rs.scope_spans {
            let (scope_name, scope_version) = ss
                .scope
                .as_ref()
                .map(|s| (s.name.clone(), s.version.clone()))
                .unwrap_or_default();
            for span in &ss.spans {
                let status = span.status.clone().unwrap_or_default();
                out.push(ReceivedSpan {
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    name: span.name.clone(),
                    resource: resource.clone(),
                    scope_name: scope_name.clone(),
                    scope_version: scope_version.clone(),
                    attributes: attributes(&span.attributes),
                    status_code: status.code,
                    status_message: status.message,
                    start_ns: span.start_time_unix_nano,
                    end_ns: span.end_time_unix_nano,
                    flags: span.flags,
                });
            }
        }
    }
    out
}

/// A recording OTLP collector.
#[derive(Clone, Default)]
pub struct Collector {
    pub addr: Option<SocketAddr>,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    requests: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    /// Header maps of the requests received.
    headers: Arc<Mutex<Vec<BTreeMap<String, String>>>>,
    paths: Arc<Mutex<Vec<String>>>,
    arrived: Arc<Notify>,
}

impl Collector {
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap().clone()
    }

    /// The decoded requests, in arrival order.
    pub fn requests(&self) -> Vec<ExportTraceServiceRequest> {
        self.requests.lock().unwrap().clone()
    }

    pub fn headers(&self) -> Vec<BTreeMap<String, String>> {
        self.headers.lock().unwrap().clone()
    }

    pub fn paths(&self) -> Vec<String> {
        self.paths.lock().unwrap().clone()
    }

    /// Waits until `predicate` holds for the received spans, woken by each
    /// arrival, at most `deadline`; returns the spans either way.
    pub async fn wait_for(
        &self,
        deadline: Duration,
        predicate: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let arrival = self.arrived.notified();
            let spans = self.spans();
            if predicate(&spans) || tokio::time::Instant::now() >= until {
                return spans;
            }
            let _ = tokio::time::timeout_at(until, arrival).await;
        }
    }

    fn record(
        &self,
        request: &ExportTraceServiceRequest,
        headers: BTreeMap<String, String>,
        path: String,
    ) {
        self.spans.lock().unwrap().extend(flatten(request));
        self.requests.lock().unwrap().push(request.clone());
        self.headers.lock().unwrap().push(headers);
        self.paths.lock().unwrap().push(path);
        self.arrived.notify_waiters();
    }

    pub fn http_endpoint(&self) -> String {
        format!("http://{}/v1/traces", self.addr.unwrap())
    }

    pub fn grpc_endpoint(&self) -> String {
        format!("http://{}", self.addr.unwrap())
    }
}

/// An OTLP/HTTP collector accepting protobuf on any path.
pub async fn http_collector() -> Collector {
    use axum::body::Bytes;
    use axum::http::{HeaderMap, StatusCode, Uri};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector = Collector {
        addr: Some(listener.local_addr().unwrap()),
        ..Default::default()
    };
    let state = collector.clone();
    let handler = move |uri: Uri, headers: HeaderMap, body: Bytes| {
        let state = state.clone();
        async move {
            let Ok(request) = ExportTraceServiceRequest::decode(body) else {
                return (StatusCode::BAD_REQUEST, Vec::new());
            };
            let headers = headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                .collect();
            state.record(&request, headers, uri.path().to_string());
            (
                StatusCode::OK,
                ExportTraceServiceResponse::default().encode_to_vec(),
            )
        }
    };
    let app = axum::Router::new().fallback(axum::routing::post(handler));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    collector
}

#[derive(Clone)]
struct GrpcService(Collector);

#[tonic::async_trait]
impl TraceService for GrpcService {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let headers = request
            .metadata()
            .clone()
            .into_headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        self.0.record(request.get_ref(), headers, "grpc".into());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP/gRPC collector.
pub async fn grpc_collector() -> Collector {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector = Collector {
        addr: Some(listener.local_addr().unwrap()),
        ..Default::default()
    };
    let service = TraceServiceServer::new(GrpcService(collector.clone()));
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming)
            .await;
    });
    collector
}

/// A TCP server that accepts connections and never answers (a stalled
/// collector). Returns its address.
pub async fn stalled_server() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    addr
}

/// An address where nothing listens.
pub fn closed_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    addr
}
