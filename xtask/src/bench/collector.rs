//! An OTLP collector in the bench process (HTTP/protobuf and gRPC on
//! 127.0.0.1) that counts the spans it accepts, and can be scripted to
//! answer 503 (gRPC `UNAVAILABLE`) with `Retry-After` for a while, or to
//! stall (read the request, never answer).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;

#[derive(Debug, Default)]
struct State {
    spans: AtomicU64,
    requests: AtomicU64,
    refused: AtomicU64,
    refuse_until: Mutex<Option<Instant>>,
    stalled: AtomicBool,
    /// When each job status update (`PUT /api/v4/jobs/:id`) arrived.
    statuses: Mutex<Vec<Instant>>,
}

impl State {
    fn refusing(&self) -> bool {
        let until = *self.refuse_until.lock().unwrap_or_else(|e| e.into_inner());
        until.is_some_and(|t| Instant::now() < t)
    }

    fn accept(&self, request: &ExportTraceServiceRequest) {
        let spans: usize = request
            .resource_spans
            .iter()
            .flat_map(|rs| &rs.scope_spans)
            .map(|ss| ss.spans.len())
            .sum();
        self.spans.fetch_add(spans as u64, Ordering::SeqCst);
        self.requests.fetch_add(1, Ordering::SeqCst);
    }
}

pub struct Collector {
    /// `http://127.0.0.1:PORT` (traces at `/v1/traces`).
    pub http_url: String,
    /// `http://127.0.0.1:PORT` for gRPC.
    pub grpc_url: String,
    state: Arc<State>,
    _runtime: tokio::runtime::Runtime,
}

impl Collector {
    pub fn start() -> Result<Collector> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("bench-collector")
            .enable_all()
            .build()?;
        let state = Arc::new(State::default());
        let (http, grpc) = runtime.block_on(async {
            let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            anyhow::Ok((http, grpc))
        })?;
        let (http_addr, grpc_addr) = (http.local_addr()?, grpc.local_addr()?);
        runtime.spawn(serve_http(http, state.clone()));
        let service = TraceServiceServer::new(Grpc(state.clone()))
            .max_decoding_message_size(64 * 1024 * 1024);
        runtime.spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(grpc)),
        );
        Ok(Collector {
            http_url: url(http_addr),
            grpc_url: url(grpc_addr),
            state,
            _runtime: runtime,
        })
    }

    pub fn spans(&self) -> u64 {
        self.state.spans.load(Ordering::SeqCst)
    }

    /// Export requests accepted since the last reset.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Forgets what was counted and answers normally again.
    pub fn reset(&self) {
        self.state.spans.store(0, Ordering::SeqCst);
        self.state.requests.store(0, Ordering::SeqCst);
        self.state.refused.store(0, Ordering::SeqCst);
        self.state.stalled.store(false, Ordering::SeqCst);
        *self
            .state
            .refuse_until
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// 503 + `Retry-After: 1` (gRPC: `UNAVAILABLE`) for `duration` from now.
    pub fn refuse_for(&self, duration: Duration) {
        *self
            .state
            .refuse_until
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + duration);
    }

    /// When the last job status update arrived.
    pub fn last_status(&self) -> Option<Instant> {
        self.state
            .statuses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last()
            .copied()
    }

    /// Reads requests and never answers them.
    pub fn stall(&self, stalled: bool) {
        self.state.stalled.store(stalled, Ordering::SeqCst);
    }

    /// Polls until `expected` spans arrived or `deadline` passed; the count.
    pub fn wait_for_spans(&self, expected: u64, deadline: Duration) -> u64 {
        let until = Instant::now() + deadline;
        loop {
            let spans = self.spans();
            if spans >= expected || Instant::now() >= until {
                return spans;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn url(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

async fn serve_http(listener: tokio::net::TcpListener, state: Arc<State>) {
    while let Ok((stream, _)) = listener.accept().await {
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| handle(request, state.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(
    request: Request<Incoming>,
    state: Arc<State>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let arrived = Instant::now();
    let is_status = request.uri().path().starts_with("/api/v4/jobs/");
    // Read the whole body first, or the connection cannot be reused.
    let body = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return Ok(status(400)),
    };
    if is_status {
        state
            .statuses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(arrived);
        return Ok(status(200));
    }
    if state.stalled.load(Ordering::SeqCst) {
        std::future::pending::<()>().await;
    }
    if state.refusing() {
        state.refused.fetch_add(1, Ordering::SeqCst);
        let mut response = status(503);
        response
            .headers_mut()
            .insert("retry-after", hyper::header::HeaderValue::from_static("1"));
        return Ok(response);
    }
    let Ok(decoded) = ExportTraceServiceRequest::decode(body) else {
        return Ok(status(400));
    };
    state.accept(&decoded);
    let mut response = Response::new(Full::new(Bytes::from(
        ExportTraceServiceResponse::default().encode_to_vec(),
    )));
    response.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/x-protobuf"),
    );
    Ok(response)
}

fn status(code: u16) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = hyper::StatusCode::from_u16(code).unwrap_or_default();
    response
}

struct Grpc(Arc<State>);

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if self.0.stalled.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if self.0.refusing() {
            self.0.refused.fetch_add(1, Ordering::SeqCst);
            return Err(tonic::Status::unavailable("refusing for the bench"));
        }
        self.0.accept(request.get_ref());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Starts a collector or says why not.
pub fn start() -> Result<Collector> {
    Collector::start().context("starting the bench's OTLP collector")
}
