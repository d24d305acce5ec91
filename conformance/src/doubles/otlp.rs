//! The one in-test OTLP collector: it serves OTLP/HTTP (`/v1/traces`,
//! `/v1/logs`) and OTLP/gRPC (the trace and logs services) on one port, in
//! plain text or TLS, records every decoded request with its headers and
//! arrival time, answers each from a script (200, any HTTP status with
//! headers and body, partial success, gRPC statuses with google.rpc
//! `RetryInfo`, stall, reset), and wakes waiters on each arrival (no
//! sleeping). It counts what it accepted, and can keep only those counts
//! (`counting_only`, for the bench, where keeping every request would weigh
//! on the measurement). Plus a server that accepts and never reads, and a closed port.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tokio::time::Instant;

use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{
    LogsService, LogsServiceServer,
};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsPartialSuccess, ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::logs::v1::LogRecord;
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

/// How the collector answers one request. Over the other protocol an answer
/// is translated: an HTTP status over gRPC becomes the code OTLP pairs with
/// it (429, 502, 503, 504: `UNAVAILABLE`; 400: `INVALID_ARGUMENT`; other
/// errors `UNKNOWN`), a gRPC status over HTTP becomes 503 for `UNAVAILABLE`
/// and `RESOURCE_EXHAUSTED` (with `Retry-After` from its `RetryInfo`) and
/// 400 otherwise.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// 200 (gRPC `OK`) with an empty export response.
    Ok,
    /// An HTTP status with headers and a text body (no export response).
    Http {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
    /// Success with OTLP `partial_success`: `rejected` spans or records.
    PartialSuccess { rejected: i64, message: String },
    /// A gRPC status, with a google.rpc `RetryInfo` detail when
    /// `retry_delay` is set.
    Grpc {
        code: tonic::Code,
        message: String,
        retry_delay: Option<Duration>,
    },
    /// Reads the request and never answers (the client's timeout ends it).
    Stall,
    /// Reads the request and closes the connection without an answer.
    Reset,
}

impl Answer {
    /// An HTTP `status` with no body.
    pub fn status(status: u16) -> Self {
        Answer::Http {
            status,
            headers: Vec::new(),
            body: String::new(),
        }
    }

    /// An HTTP `status` with a text `body`.
    pub fn with_body(status: u16, body: &str) -> Self {
        Answer::Http {
            status,
            headers: Vec::new(),
            body: body.to_string(),
        }
    }

    /// An HTTP `status` with `Retry-After: retry_after`.
    pub fn retry_after(status: u16, retry_after: &str) -> Self {
        Answer::Http {
            status,
            headers: vec![("retry-after".into(), retry_after.into())],
            body: String::new(),
        }
    }

    /// Success rejecting `rejected` items.
    pub fn partial_success(rejected: i64, message: &str) -> Self {
        Answer::PartialSuccess {
            rejected,
            message: message.to_string(),
        }
    }

    /// A gRPC status without details.
    pub fn grpc(code: tonic::Code, message: &str) -> Self {
        Answer::Grpc {
            code,
            message: message.to_string(),
            retry_delay: None,
        }
    }

    /// `RESOURCE_EXHAUSTED` with a google.rpc `RetryInfo` of `delay`.
    pub fn resource_exhausted_retry_info(message: &str, delay: Duration) -> Self {
        Answer::Grpc {
            code: tonic::Code::ResourceExhausted,
            message: message.to_string(),
            retry_delay: Some(delay),
        }
    }

    /// The HTTP status this answer carries over HTTP (0 for stall and reset).
    pub fn http_status(&self) -> u16 {
        match self {
            Answer::Ok | Answer::PartialSuccess { .. } => 200,
            Answer::Http { status, .. } => *status,
            Answer::Grpc { code, .. } => match code {
                tonic::Code::Ok => 200,
                tonic::Code::Unavailable | tonic::Code::ResourceExhausted => 503,
                _ => 400,
            },
            Answer::Stall | Answer::Reset => 0,
        }
    }

    /// Whether the request was accepted (its items count as delivered,
    /// except those a partial success rejects).
    pub fn accepts(&self) -> bool {
        (200..300).contains(&self.http_status())
    }

    fn grpc_status(&self) -> Option<tonic::Status> {
        use tonic_types::{ErrorDetails, StatusExt};
        match self {
            Answer::Ok | Answer::PartialSuccess { .. } | Answer::Stall | Answer::Reset => None,
            Answer::Http { status, body, .. } => {
                let code = match status {
                    200..=299 => return None,
                    429 | 502 | 503 | 504 => tonic::Code::Unavailable,
                    400 => tonic::Code::InvalidArgument,
                    _ => tonic::Code::Unknown,
                };
                Some(tonic::Status::new(code, body.clone()))
            }
            Answer::Grpc {
                code: tonic::Code::Ok,
                ..
            } => None,
            Answer::Grpc {
                code,
                message,
                retry_delay: Some(delay),
            } => Some(tonic::Status::with_error_details(
                *code,
                message.clone(),
                ErrorDetails::with_retry_info(Some(*delay)),
            )),
            Answer::Grpc { code, message, .. } => Some(tonic::Status::new(*code, message.clone())),
        }
    }
}

/// Which OTLP signal a request carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Traces,
    Logs,
}

/// One request the collector received, decoded, with how it was answered.
#[derive(Debug, Clone)]
pub struct Received {
    /// When it arrived (tokio's clock, so paused-clock tests can read it).
    pub at: Instant,
    pub signal: Signal,
    /// The HTTP path, or the gRPC method path.
    pub path: String,
    pub grpc: bool,
    /// Header (gRPC: metadata) names in lower case, and values.
    pub headers: BTreeMap<String, String>,
    /// The decoded trace request (`None` for logs or an undecodable body).
    pub traces: Option<ExportTraceServiceRequest>,
    /// The decoded logs request (`None` for traces or an undecodable body).
    pub logs: Option<ExportLogsServiceRequest>,
    pub answer: Answer,
}

impl Received {
    /// The request's spans, flattened.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.traces.as_ref().map(flatten).unwrap_or_default()
    }

    /// (span ID in hex, name) of each span in the request.
    pub fn span_ids(&self) -> Vec<(String, String)> {
        self.spans()
            .into_iter()
            .map(|s| (s.span_id, s.name))
            .collect()
    }

    /// The request's log records.
    pub fn log_records(&self) -> Vec<LogRecord> {
        self.logs
            .iter()
            .flat_map(|r| &r.resource_logs)
            .flat_map(|rl| &rl.scope_logs)
            .flat_map(|sl| sl.log_records.iter().cloned())
            .collect()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

type Responder = Arc<dyn Fn(&Received) -> Answer + Send + Sync>;

/// What a collector accepted: requests (decoded, answered with a 2xx or
/// gRPC `OK`) and the spans and log records in them (a partial success's
/// rejected items are not subtracted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub requests: u64,
    pub spans: u64,
    pub log_records: u64,
}

impl Counts {
    fn add(&mut self, request: &Received) {
        if request.traces.is_none() && request.logs.is_none() {
            return;
        }
        self.requests += 1;
        let spans: usize = request
            .traces
            .iter()
            .flat_map(|r| &r.resource_spans)
            .flat_map(|rs| &rs.scope_spans)
            .map(|ss| ss.spans.len())
            .sum();
        let records: usize = request
            .logs
            .iter()
            .flat_map(|r| &r.resource_logs)
            .flat_map(|rl| &rl.scope_logs)
            .map(|sl| sl.log_records.len())
            .sum();
        self.spans += spans as u64;
        self.log_records += records as u64;
    }
}

#[derive(Default)]
struct State {
    received: Vec<Received>,
    counts: Counts,
    /// Count requests, do not keep them.
    counting_only: bool,
    script: VecDeque<Answer>,
    otherwise: Option<Responder>,
}

impl State {
    /// The scripted answer to `request`, else the responder's, else `Ok`.
    fn next_answer(&mut self, request: &Received) -> Answer {
        match self.script.pop_front() {
            Some(answer) => answer,
            None => match &self.otherwise {
                Some(responder) => responder(request),
                None => Answer::Ok,
            },
        }
    }
}

/// An OTLP/HTTP body as the request of `signal`, if it decodes.
fn decode(
    signal: Signal,
    body: &[u8],
) -> (
    Option<ExportTraceServiceRequest>,
    Option<ExportLogsServiceRequest>,
) {
    match signal {
        Signal::Traces => (ExportTraceServiceRequest::decode(body).ok(), None),
        Signal::Logs => (None, ExportLogsServiceRequest::decode(body).ok()),
    }
}

/// The scriptable recording collector. Clones share their state.
#[derive(Clone, Default)]
pub struct Collector {
    pub addr: Option<SocketAddr>,
    tls: bool,
    state: Arc<Mutex<State>>,
    arrived: Arc<Notify>,
    connections: Arc<AtomicUsize>,
}

/// One connection's handle, in each request's extensions: `Reset` closes it.
#[derive(Clone)]
struct Connection(Arc<Notify>);

impl Collector {
    /// A collector on a free local port, answering `Ok` until scripted.
    pub async fn start() -> Collector {
        Self::serve(None).await
    }

    /// As `start`, over TLS with the PEM certificate chain and key given
    /// (ALPN `h2` and `http/1.1`). Endpoints use `localhost`.
    pub async fn start_tls(cert_pem: &str, key_pem: &str) -> Collector {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs: Vec<CertificateDer> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .expect("a PEM certificate chain");
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("a PEM key");
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("a certificate and its key");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Self::serve(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))).await
    }

    async fn serve(tls: Option<tokio_rustls::TlsAcceptor>) -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let collector = Collector {
            addr: Some(listener.local_addr().unwrap()),
            tls: tls.is_some(),
            ..Default::default()
        };
        let router = collector.router();
        let connections = collector.connections.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                connections.fetch_add(1, Ordering::SeqCst);
                let router = router.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        None => serve_connection(stream, router).await,
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                serve_connection(stream, router).await;
                            }
                        }
                    }
                });
            }
        });
        collector
    }

    fn router(&self) -> axum::Router {
        let grpc = tonic::service::Routes::new(TraceServiceServer::new(Grpc(self.clone())))
            .add_service(LogsServiceServer::new(Grpc(self.clone())))
            .into_axum_router();
        let state = self.clone();
        grpc.fallback(axum::routing::post(
            move |connection: axum::Extension<Connection>,
                  uri: axum::http::Uri,
                  headers: axum::http::HeaderMap,
                  body: axum::body::Bytes| {
                let state = state.clone();
                async move { state.http(connection.0, uri, headers, body).await }
            },
        ))
    }

    async fn http(
        &self,
        connection: Connection,
        uri: axum::http::Uri,
        headers: axum::http::HeaderMap,
        body: axum::body::Bytes,
    ) -> axum::response::Response {
        use axum::response::IntoResponse;
        let path = uri.path().to_string();
        let signal = if path.ends_with("/logs") {
            Signal::Logs
        } else {
            Signal::Traces
        };
        let headers = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let mut received = Received {
            at: Instant::now(),
            signal,
            path,
            grpc: false,
            headers,
            traces: None,
            logs: None,
            answer: Answer::Ok,
        };
        let counting_only = self.state.lock().unwrap().counting_only;
        let (answer, decoded) = if counting_only {
            self.count(received, body)
        } else {
            (received.traces, received.logs) = decode(signal, &body);
            let decoded = received.traces.is_some() || received.logs.is_some();
            (self.record(received), decoded)
        };
        if !decoded {
            return (axum::http::StatusCode::BAD_REQUEST, "not OTLP protobuf").into_response();
        }
        let protobuf = |bytes: Vec<u8>| {
            (
                [(axum::http::header::CONTENT_TYPE, "application/x-protobuf")],
                bytes,
            )
                .into_response()
        };
        match answer {
            Answer::Stall => std::future::pending().await,
            Answer::Reset => {
                connection.0.notify_one();
                std::future::pending().await
            }
            Answer::Ok => protobuf(partial_success(signal, 0, "")),
            Answer::PartialSuccess { rejected, message } => {
                protobuf(partial_success(signal, rejected, &message))
            }
            Answer::Http {
                status,
                headers,
                body,
            } => {
                let mut response = axum::http::Response::builder().status(status);
                for (name, value) in headers {
                    response = response.header(name, value);
                }
                response.body(axum::body::Body::from(body)).unwrap()
            }
            grpc @ Answer::Grpc { .. } => {
                let status = grpc.http_status();
                let mut response = axum::http::Response::builder().status(status);
                if let Answer::Grpc {
                    retry_delay: Some(delay),
                    ..
                } = &grpc
                {
                    response = response.header("retry-after", delay.as_secs().max(1).to_string());
                }
                response.body(axum::body::Body::empty()).unwrap()
            }
        }
    }

    /// Records `request`, wakes the waiters and returns its answer.
    fn record(&self, mut request: Received) -> Answer {
        let answer = {
            let mut state = self.state.lock().unwrap();
            let answer = state.next_answer(&request);
            if answer.accepts() {
                state.counts.add(&request);
            }
            if !state.counting_only {
                request.answer = answer.clone();
                state.received.push(request);
            }
            answer
        };
        self.arrived.notify_waiters();
        answer
    }

    /// `record` when `counting_only`, over HTTP: answers from the path and
    /// headers, then decodes and counts the body only if the answer accepts
    /// it (a refusal costs no decode, as at a collector shedding load).
    /// Returns the answer and whether the body decoded (true if refused).
    fn count(&self, mut request: Received, body: axum::body::Bytes) -> (Answer, bool) {
        let answer = self.state.lock().unwrap().next_answer(&request);
        let mut decoded = true;
        if answer.accepts() {
            (request.traces, request.logs) = decode(request.signal, &body);
            decoded = request.traces.is_some() || request.logs.is_some();
            self.state.lock().unwrap().counts.add(&request);
        }
        self.arrived.notify_waiters();
        (answer, decoded)
    }

    /// Queues answers for the next requests, in order (after any queued).
    pub fn script(&self, answers: impl IntoIterator<Item = Answer>) -> &Self {
        self.state.lock().unwrap().script.extend(answers);
        self
    }

    /// The answer once the script is used up (`Ok` until set).
    pub fn otherwise(&self, answer: Answer) -> &Self {
        self.answer_with(move |_| answer.clone())
    }

    /// Answers computed from each request once the script is used up.
    pub fn answer_with(
        &self,
        responder: impl Fn(&Received) -> Answer + Send + Sync + 'static,
    ) -> &Self {
        self.state.lock().unwrap().otherwise = Some(Arc::new(responder));
        self
    }

    /// From now on, counts each request (`counts`) and drops it instead of
    /// keeping it (`received` stays empty): what a bench needs. Over HTTP
    /// the answer comes first (a responder sees no decoded body) and only
    /// accepted requests are decoded, as a collector shedding load would.
    pub fn counting_only(&self) -> &Self {
        self.state.lock().unwrap().counting_only = true;
        self
    }

    /// Forgets the requests received and the counts (the script and the
    /// answers stay).
    pub fn clear(&self) -> &Self {
        let mut state = self.state.lock().unwrap();
        state.received.clear();
        state.counts = Counts::default();
        self
    }

    /// What was accepted since the start (or `clear`).
    pub fn counts(&self) -> Counts {
        self.state.lock().unwrap().counts
    }

    /// Waits until `predicate` holds for the counts, woken by each arrival,
    /// at most `deadline`; returns them either way.
    pub async fn wait_for_counts(
        &self,
        deadline: Duration,
        predicate: impl Fn(&Counts) -> bool,
    ) -> Counts {
        self.wait_on(deadline, || self.counts(), predicate).await
    }

    /// Reads `read` until `predicate` holds for it, woken by each arrival,
    /// at most `deadline`; returns the last reading either way.
    async fn wait_on<T>(
        &self,
        deadline: Duration,
        read: impl Fn() -> T,
        predicate: impl Fn(&T) -> bool,
    ) -> T {
        let until = Instant::now() + deadline;
        loop {
            let arrival = self.arrived.notified();
            let value = read();
            if predicate(&value) || Instant::now() >= until {
                return value;
            }
            let _ = tokio::time::timeout_at(until, arrival).await;
        }
    }

    /// Every request, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    /// The spans of every trace request received (answered or not).
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.received().iter().flat_map(Received::spans).collect()
    }

    /// The spans of the trace requests that were accepted, less none: a
    /// partial success's rejected spans are not told apart.
    pub fn accepted_spans(&self) -> Vec<ReceivedSpan> {
        self.received()
            .iter()
            .filter(|r| r.answer.accepts())
            .flat_map(Received::spans)
            .collect()
    }

    /// The decoded trace requests, in arrival order.
    pub fn requests(&self) -> Vec<ExportTraceServiceRequest> {
        self.received()
            .into_iter()
            .filter_map(|r| r.traces)
            .collect()
    }

    /// The decoded logs requests, in arrival order.
    pub fn log_requests(&self) -> Vec<ExportLogsServiceRequest> {
        self.received().into_iter().filter_map(|r| r.logs).collect()
    }

    /// The log records of every logs request, in arrival order.
    pub fn log_records(&self) -> Vec<LogRecord> {
        self.received()
            .iter()
            .flat_map(Received::log_records)
            .collect()
    }

    /// The header maps of the requests received.
    pub fn headers(&self) -> Vec<BTreeMap<String, String>> {
        self.received().into_iter().map(|r| r.headers).collect()
    }

    pub fn paths(&self) -> Vec<String> {
        self.received().into_iter().map(|r| r.path).collect()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Waits until `predicate` holds for the requests received, woken by
    /// each arrival, at most `deadline`; returns them either way.
    pub async fn wait_until(
        &self,
        deadline: Duration,
        predicate: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        self.wait_on(deadline, || self.received(), |received| predicate(received))
            .await
    }

    /// Waits until `n` requests arrived, at most `deadline`.
    pub async fn wait_for_requests(&self, n: usize, deadline: Duration) -> Vec<Received> {
        self.wait_until(deadline, |r| r.len() >= n).await
    }

    /// Waits until `predicate` holds for the received spans, woken by each
    /// arrival, at most `deadline`; returns the spans either way.
    pub async fn wait_for(
        &self,
        deadline: Duration,
        predicate: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        let received = self
            .wait_until(deadline, |received| {
                let spans: Vec<ReceivedSpan> = received.iter().flat_map(Received::spans).collect();
                predicate(&spans)
            })
            .await;
        received.iter().flat_map(Received::spans).collect()
    }

    fn base(&self) -> String {
        let addr = self.addr.unwrap();
        if self.tls {
            format!("https://localhost:{}", addr.port())
        } else {
            format!("http://{addr}")
        }
    }

    /// The OTLP/HTTP traces URL.
    pub fn http_endpoint(&self) -> String {
        format!("{}/v1/traces", self.base())
    }

    /// The OTLP/HTTP logs URL.
    pub fn logs_endpoint(&self) -> String {
        format!("{}/v1/logs", self.base())
    }

    /// The OTLP/gRPC URL (`http://` or `https://`).
    pub fn grpc_endpoint(&self) -> String {
        self.base()
    }
}

fn partial_success(signal: Signal, rejected: i64, message: &str) -> Vec<u8> {
    let message = message.to_string();
    match signal {
        Signal::Traces => ExportTraceServiceResponse {
            partial_success: (rejected > 0).then_some(ExportTracePartialSuccess {
                rejected_spans: rejected,
                error_message: message,
            }),
        }
        .encode_to_vec(),
        Signal::Logs => ExportLogsServiceResponse {
            partial_success: (rejected > 0).then_some(ExportLogsPartialSuccess {
                rejected_log_records: rejected,
                error_message: message,
            }),
        }
        .encode_to_vec(),
    }
}

/// Serves one connection (HTTP/1.1 or HTTP/2) until it ends or a `Reset`
/// answer closes it.
async fn serve_connection<S>(stream: S, router: axum::Router)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use hyper::service::Service;
    let reset = Arc::new(Notify::new());
    let connection = Connection(reset.clone());
    let service = hyper_util::service::TowerToHyperService::new(router);
    let service = hyper::service::service_fn(move |mut request: hyper::Request<_>| {
        request.extensions_mut().insert(connection.clone());
        service.call(request)
    });
    let builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    let serving = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    tokio::select! {
        _ = serving => {}
        _ = reset.notified() => {}
    }
}

#[derive(Clone)]
struct Grpc(Collector);

impl Grpc {
    fn receive<T>(
        &self,
        request: &tonic::Request<T>,
        signal: Signal,
        path: &str,
    ) -> (Received, Option<Connection>) {
        let headers = request
            .metadata()
            .clone()
            .into_headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let received = Received {
            at: Instant::now(),
            signal,
            path: path.to_string(),
            grpc: true,
            headers,
            traces: None,
            logs: None,
            answer: Answer::Ok,
        };
        (received, request.extensions().get::<Connection>().cloned())
    }

    /// Waits out `Stall` and `Reset`; the gRPC error of the others.
    async fn settle(answer: &Answer, connection: Option<Connection>) -> Result<(), tonic::Status> {
        match answer {
            Answer::Stall => std::future::pending().await,
            Answer::Reset => {
                if let Some(connection) = connection {
                    connection.0.notify_one();
                }
                std::future::pending().await
            }
            other => match other.grpc_status() {
                Some(status) => Err(status),
                None => Ok(()),
            },
        }
    }

    fn rejected(answer: &Answer) -> (i64, String) {
        match answer {
            Answer::PartialSuccess { rejected, message } => (*rejected, message.clone()),
            _ => (0, String::new()),
        }
    }
}

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let (mut received, connection) = self.receive(
            &request,
            Signal::Traces,
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
        );
        received.traces = Some(request.into_inner());
        let answer = self.0.record(received);
        Self::settle(&answer, connection).await?;
        let (rejected, message) = Self::rejected(&answer);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: (rejected > 0).then_some(ExportTracePartialSuccess {
                rejected_spans: rejected,
                error_message: message,
            }),
        }))
    }
}

#[tonic::async_trait]
impl LogsService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        let (mut received, connection) = self.receive(
            &request,
            Signal::Logs,
            "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
        );
        received.logs = Some(request.into_inner());
        let answer = self.0.record(received);
        Self::settle(&answer, connection).await?;
        let (rejected, message) = Self::rejected(&answer);
        Ok(tonic::Response::new(ExportLogsServiceResponse {
            partial_success: (rejected > 0).then_some(ExportLogsPartialSuccess {
                rejected_log_records: rejected,
                error_message: message,
            }),
        }))
    }
}

/// A collector serving OTLP/HTTP (and gRPC: it is the same collector).
pub async fn http_collector() -> Collector {
    Collector::start().await
}

/// A collector serving OTLP/gRPC (and HTTP: it is the same collector).
pub async fn grpc_collector() -> Collector {
    Collector::start().await
}

/// A TCP server that accepts connections and never reads or answers (a
/// collector stalled below HTTP). Returns its address and the count of
/// connections accepted.
pub async fn stalled_server_counting() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            held.push(stream);
        }
    });
    (addr, accepted)
}

/// `stalled_server_counting` without the count.
pub async fn stalled_server() -> SocketAddr {
    stalled_server_counting().await.0
}

/// An address where nothing listens.
pub fn closed_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    addr
}
