//! The export path of one job: from a span ending to an OTLP request, with an
//! account of every span.
//!
//! ```text
//! span.end() ──> JobSpanProcessor::on_end ──try_send──> queue (per sink) ──> export task ──> SpanSink::export
//!                  (never blocks; full queue = dropped, counted)           (tokio task on the runner's runtime)
//! ```
//!
//! * A span is handed to its sinks as soon as it ends (streaming: Phase 2
//!   stage spans leave while the job still runs), never batched until job
//!   end. The SDK's `BatchSpanProcessor` is not used: it runs its own thread
//!   with a blocking executor, where neither the async reqwest client nor
//!   tonic has the tokio reactor they need.
//! * One task per sink, so a stalled collector does not hold up the other
//!   endpoint, and `export` is never called concurrently on one exporter.
//! * [`ExportPipeline::flush`] waits for the queues to drain, bounded by a
//!   deadline; whatever is still pending then is abandoned and counted as
//!   dropped. It runs after the job's final status was sent to GitLab.
//! * [`SpanSink`] is the seam for the retrying, buffering export client of
//!   issue 6: anything that can export a batch can sit behind the queue.
//!   Today's sinks are the stock `opentelemetry-otlp` exporters (its own
//!   bounded retry for 429/502/503/504 and connection errors, within the
//!   export timeout).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::Context;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};
use opentelemetry_sdk::Resource;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::negotiate::{EndpointAuth, Transport};

/// Spans queued per sink before new ones are dropped (and counted).
pub const QUEUE_CAPACITY: usize = 2048;
/// Most spans in one export request.
pub const MAX_BATCH: usize = 512;

/// A boxed future, as [`SpanSink`] must be object safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Something that can export a batch of finished spans.
pub trait SpanSink: Send + Sync + 'static {
    /// For logs: transport and URL, never credentials.
    fn label(&self) -> String;
    /// Exports one batch. Must end in bounded time.
    fn export(&self, batch: Vec<SpanData>) -> BoxFuture<'_, Result<(), String>>;
    /// The resource of every span of this job; called once before export.
    fn set_resource(&mut self, resource: &Resource);
}

/// A stock `opentelemetry-otlp` exporter as a [`SpanSink`].
pub struct OtlpSink {
    label: String,
    exporter: opentelemetry_otlp::SpanExporter,
}

impl SpanSink for OtlpSink {
    fn label(&self) -> String {
        self.label.clone()
    }

    fn export(&self, batch: Vec<SpanData>) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move { self.exporter.export(batch).await.map_err(|e| e.to_string()) })
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.exporter.set_resource(resource);
    }
}

/// Where one job's spans go.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ExportTarget {
    pub transport: Transport,
    /// HTTP: full traces URL. gRPC: `http://host:port`.
    pub url: String,
    pub tls: bool,
    /// Sent with every request. Values are never logged.
    pub headers: Vec<(String, String)>,
    pub auth: EndpointAuth,
}

impl fmt::Display for ExportTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}+{}", self.transport, self.url)
    }
}

/// Builds sinks for export targets, sharing what is cheap to share: one HTTP
/// client (and its connection pool) for every OTLP/HTTP endpoint, and one
/// lazily connected gRPC channel per gRPC endpoint.
pub struct ExporterFactory {
    export_timeout: Duration,
    http_client: Mutex<Option<reqwest::Client>>,
    grpc_channels: Mutex<HashMap<String, tonic::transport::Channel>>,
}

impl fmt::Debug for ExporterFactory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExporterFactory")
            .field("export_timeout", &self.export_timeout)
            .finish_non_exhaustive()
    }
}

impl ExporterFactory {
    pub fn new(export_timeout: Duration) -> Self {
        ExporterFactory {
            export_timeout,
            http_client: Mutex::new(None),
            grpc_channels: Mutex::new(HashMap::new()),
        }
    }

    /// Builds a sink for `target`. Needs a tokio runtime context (gRPC
    /// channels spawn their connection task there). The error is one line,
    /// without credentials.
    pub fn build(&self, target: &ExportTarget) -> Result<Box<dyn SpanSink>, String> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err("no tokio runtime to export from".into());
        }
        if target.tls {
            return Err(format!(
                "{target}: TLS endpoints are not supported by this build yet"
            ));
        }
        let exporter = match target.transport {
            Transport::HttpProtobuf => self.build_http(target)?,
            Transport::Grpc => self.build_grpc(target)?,
        };
        Ok(Box::new(OtlpSink {
            label: target.to_string(),
            exporter,
        }))
    }

    fn build_http(
        &self,
        target: &ExportTarget,
    ) -> Result<opentelemetry_otlp::SpanExporter, String> {
        let inner = {
            let mut cached = self.http_client.lock().unwrap_or_else(|e| e.into_inner());
            match cached.as_ref() {
                Some(client) => client.clone(),
                None => {
                    let client = reqwest::Client::builder()
                        .timeout(self.export_timeout)
                        .connect_timeout(self.export_timeout.min(Duration::from_secs(5)))
                        .build()
                        .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
                    *cached = Some(client.clone());
                    client
                }
            }
        };
        let mut headers = Vec::new();
        for (key, value) in &target.headers {
            let name = http::HeaderName::from_bytes(key.as_bytes())
                .map_err(|_| format!("{target}: header name `{key}` is not valid"))?;
            let value = http::HeaderValue::from_str(value)
                .map_err(|_| format!("{target}: the value of header `{key}` is not valid"))?;
            headers.push((name, value));
        }
        let strip = env_header_names()
            .into_iter()
            .filter_map(|n| http::HeaderName::from_bytes(n.as_bytes()).ok())
            .collect();
        let client = ScopedHeadersClient {
            inner,
            headers,
            strip,
        };
        opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_endpoint(target.url.clone())
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_timeout(self.export_timeout)
            .build()
            .map_err(|e| format!("{target}: {e}"))
    }

    fn build_grpc(
        &self,
        target: &ExportTarget,
    ) -> Result<opentelemetry_otlp::SpanExporter, String> {
        let channel = {
            let mut channels = self.grpc_channels.lock().unwrap_or_else(|e| e.into_inner());
            match channels.get(&target.url) {
                Some(channel) => channel.clone(),
                None => {
                    let endpoint = tonic::transport::Endpoint::from_shared(target.url.clone())
                        .map_err(|e| format!("{target}: invalid gRPC endpoint: {e}"))?
                        .timeout(self.export_timeout)
                        .connect_timeout(self.export_timeout.min(Duration::from_secs(5)));
                    let channel = endpoint.connect_lazy();
                    channels.insert(target.url.clone(), channel.clone());
                    channel
                }
            }
        };
        let mut metadata = Vec::new();
        for (key, value) in &target.headers {
            let key =
                tonic::metadata::AsciiMetadataKey::from_bytes(key.to_ascii_lowercase().as_bytes())
                    .map_err(|_| {
                        format!("{target}: header name `{key}` is not valid gRPC metadata")
                    })?;
            let value = tonic::metadata::AsciiMetadataValue::try_from(value.as_str())
                .map_err(|_| format!("{target}: the value of header `{key}` is not valid"))?;
            metadata.push((key, value));
        }
        let metadata = Arc::new(metadata);
        let strip = Arc::new(env_header_names());
        // Runs after the exporter added its own metadata (including what it
        // read from the process environment): only this target's headers stay.
        let scope_metadata = move |mut request: tonic::Request<()>| {
            for name in strip.iter() {
                request.metadata_mut().remove(name.as_str());
            }
            for (key, value) in metadata.iter() {
                request.metadata_mut().insert(key.clone(), value.clone());
            }
            Ok(request)
        };
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_channel(channel)
            .with_timeout(self.export_timeout)
            .with_interceptor(scope_metadata)
            .build()
            .map_err(|e| format!("{target}: {e}"))
    }
}

/// Header names that `opentelemetry-otlp` adds to every request on its own,
/// from `OTEL_EXPORTER_OTLP_TRACES_HEADERS` or `OTEL_EXPORTER_OTLP_HEADERS` in
/// the process environment (lowercase).
fn env_header_names() -> Vec<String> {
    use crate::config::{
        parse_headers, OTEL_EXPORTER_OTLP_HEADERS, OTEL_EXPORTER_OTLP_TRACES_HEADERS,
    };
    for name in [
        OTEL_EXPORTER_OTLP_TRACES_HEADERS,
        OTEL_EXPORTER_OTLP_HEADERS,
    ] {
        if let Ok(text) = std::env::var(name) {
            return parse_headers(&text)
                .0
                .into_iter()
                .map(|(key, _)| key.to_ascii_lowercase())
                .collect();
        }
    }
    Vec::new()
}

/// The shared reqwest client, sending exactly the target's headers: the
/// exporter also adds headers from the process environment, which belong to
/// the static collector and must not reach a payload (contract v2) endpoint.
#[derive(Debug)]
struct ScopedHeadersClient {
    inner: reqwest::Client,
    headers: Vec<(http::HeaderName, http::HeaderValue)>,
    strip: Vec<http::HeaderName>,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for ScopedHeadersClient {
    async fn send_bytes(
        &self,
        mut request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let headers = request.headers_mut();
        for name in &self.strip {
            headers.remove(name);
        }
        for (name, value) in &self.headers {
            headers.insert(name.clone(), value.clone());
        }
        self.inner.send_bytes(request).await
    }
}

/// Counters of one sink.
#[derive(Debug, Default)]
struct SinkCounters {
    exported: AtomicU64,
    failed: AtomicU64,
    queue_full: AtomicU64,
    first_error: Mutex<Option<String>>,
}

#[derive(Debug)]
struct PipelineShared {
    /// Spans that ended (each goes to every sink).
    spans: AtomicU64,
    /// Spans that ended after the pipeline was closed.
    late: AtomicU64,
    sinks: Vec<(String, SinkCounters)>,
}

/// The [`SpanProcessor`] of one job: hands every ended span to each sink's
/// queue without blocking.
#[derive(Debug)]
pub(crate) struct JobSpanProcessor {
    senders: Mutex<Option<Vec<mpsc::Sender<SpanData>>>>,
    shared: Arc<PipelineShared>,
}

impl SpanProcessor for JobSpanProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        self.shared.spans.fetch_add(1, Ordering::Relaxed);
        let senders = self.senders.lock().unwrap_or_else(|e| e.into_inner());
        let Some(senders) = senders.as_ref() else {
            self.shared.late.fetch_add(1, Ordering::Relaxed);
            return;
        };
        for (i, sender) in senders.iter().enumerate() {
            if sender.try_send(span.clone()).is_err() {
                self.shared.sinks[i]
                    .1
                    .queue_full
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        // Flushing is asynchronous and bounded: see `ExportPipeline::flush`.
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        // Closing the queues lets the export tasks finish; never blocks.
        self.senders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        Ok(())
    }
}

/// The export tasks of one job.
#[derive(Debug)]
pub struct ExportPipeline {
    tasks: Vec<JoinHandle<()>>,
    shared: Arc<PipelineShared>,
}

impl ExportPipeline {
    /// Starts one export task per sink on `runtime` and returns the processor
    /// to install in the job's tracer provider.
    pub(crate) fn start(
        sinks: Vec<Box<dyn SpanSink>>,
        resource: &Resource,
        runtime: &tokio::runtime::Handle,
    ) -> (JobSpanProcessor, ExportPipeline) {
        let shared = Arc::new(PipelineShared {
            spans: AtomicU64::new(0),
            late: AtomicU64::new(0),
            sinks: sinks
                .iter()
                .map(|s| (s.label(), SinkCounters::default()))
                .collect(),
        });
        let mut senders = Vec::new();
        let mut tasks = Vec::new();
        for (index, mut sink) in sinks.into_iter().enumerate() {
            sink.set_resource(resource);
            let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
            senders.push(tx);
            tasks.push(runtime.spawn(export_loop(sink, rx, shared.clone(), index)));
        }
        let processor = JobSpanProcessor {
            senders: Mutex::new(Some(senders)),
            shared: shared.clone(),
        };
        (processor, ExportPipeline { tasks, shared })
    }

    /// Waits until every queued span was exported or failed, at most until
    /// `deadline`; then abandons the rest. The provider must have been shut
    /// down first (that closes the queues).
    pub async fn flush(self, deadline: Duration) -> FlushReport {
        let started = Instant::now();
        let until = tokio::time::Instant::now() + deadline;
        let mut timed_out = false;
        let mut panicked = false;
        for mut task in self.tasks {
            match tokio::time::timeout_at(until, &mut task).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => panicked = true,
                Err(_) => {
                    timed_out = true;
                    task.abort();
                }
            }
        }
        let spans = self.shared.spans.load(Ordering::Relaxed);
        let endpoints = self
            .shared
            .sinks
            .iter()
            .map(|(label, c)| {
                let exported = c.exported.load(Ordering::Relaxed).min(spans);
                EndpointReport {
                    label: label.clone(),
                    exported,
                    dropped: spans - exported,
                    queue_full: c.queue_full.load(Ordering::Relaxed),
                    error: c
                        .first_error
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clone(),
                }
            })
            .collect();
        FlushReport {
            spans,
            endpoints,
            elapsed: started.elapsed(),
            timed_out,
            panicked,
        }
    }
}

async fn export_loop(
    sink: Box<dyn SpanSink>,
    mut rx: mpsc::Receiver<SpanData>,
    shared: Arc<PipelineShared>,
    index: usize,
) {
    let counters = &shared.sinks[index].1;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(span) => batch.push(span),
                Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        match sink.export(batch).await {
            Ok(()) => {
                counters.exported.fetch_add(n, Ordering::Relaxed);
            }
            Err(error) => {
                counters.failed.fetch_add(n, Ordering::Relaxed);
                let mut first = counters
                    .first_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                first.get_or_insert(error);
            }
        }
    }
}

/// What happened to one endpoint's copy of the job's spans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointReport {
    pub label: String,
    pub exported: u64,
    /// Not exported, for any reason (queue full, export error, deadline).
    pub dropped: u64,
    /// Of `dropped`, those refused by a full queue.
    pub queue_full: u64,
    /// The first export error, if any.
    pub error: Option<String>,
}

/// The account of one job's telemetry after the flush.
///
/// Per endpoint, `exported + dropped == spans`. `exported` and `dropped` of
/// the report add up the endpoints, so with two endpoints they sum to twice
/// `spans`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlushReport {
    /// Spans that ended.
    pub spans: u64,
    pub endpoints: Vec<EndpointReport>,
    pub elapsed: Duration,
    /// The deadline passed with exports still pending.
    pub timed_out: bool,
    /// An export task panicked (its pending spans count as dropped).
    pub panicked: bool,
}

impl FlushReport {
    pub fn exported(&self) -> u64 {
        self.endpoints.iter().map(|e| e.exported).sum()
    }

    pub fn dropped(&self) -> u64 {
        self.endpoints.iter().map(|e| e.dropped).sum()
    }
}

impl fmt::Display for FlushReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spans={} exported={} dropped={} elapsed={}ms",
            self.spans,
            self.exported(),
            self.dropped(),
            self.elapsed.as_millis()
        )?;
        if self.timed_out {
            write!(f, " deadline_exceeded=true")?;
        }
        if self.panicked {
            write!(f, " panicked=true")?;
        }
        for e in &self.endpoints {
            if self.endpoints.len() > 1 || e.dropped > 0 {
                write!(
                    f,
                    " endpoint={} (exported={} dropped={}",
                    e.label, e.exported, e.dropped
                )?;
                if e.queue_full > 0 {
                    write!(f, " queue_full={}", e.queue_full)?;
                }
                if let Some(error) = &e.error {
                    write!(f, " error=\"{}\"", error.replace('"', "'"))?;
                }
                write!(f, ")")?;
            }
        }
        Ok(())
    }
}
