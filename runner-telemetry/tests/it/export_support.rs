//! Shared by the export client's tests: settings with short delays, jobs
//! that end a given number of spans, scripted collectors that record when
//! each request came and what it carried, captured logs, and the accounting
//! invariant.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use runner_telemetry::config::{BufferSettings, ExportSettings, StaticEndpoint};
use runner_telemetry::export::FlushReport;
use runner_telemetry::negotiate::Transport;
use runner_telemetry::{
    JobOutcome, JobSpanInfo, PendingFlush, RunnerIdentity, RunnerTelemetry, SpanOutcome,
};
use serde_json::{json, Value};

pub const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
pub const PARENT: &str = "00f067aa0ba902b7";

/// Settings for a static endpoint with quick retries.
pub fn settings(transport: Transport, url: &str) -> ExportSettings {
    ExportSettings {
        endpoint: StaticEndpoint {
            transport,
            url: url.to_string(),
            headers: Vec::new(),
        },
        export_timeout: Duration::from_secs(2),
        flush_timeout: Duration::from_secs(10),
        shutdown_timeout: Duration::from_millis(500),
        buffer: BufferSettings {
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
            ..BufferSettings::default()
        },
        ..ExportSettings::default()
    }
}

/// `settings` for OTLP/HTTP to the wiremock collector `server`.
pub fn http_settings(server: &wiremock::MockServer) -> ExportSettings {
    settings(
        Transport::HttpProtobuf,
        &format!("{}/v1/traces", server.uri()),
    )
}

/// Telemetry exporting with `http_settings` to `server`.
pub fn http_telemetry(server: &wiremock::MockServer) -> RunnerTelemetry {
    RunnerTelemetry::new(http_settings(server), runner())
}

pub fn runner() -> RunnerIdentity {
    RunnerIdentity {
        id: Some(17),
        name: "test-runner".into(),
        executor: "shell".into(),
    }
}

pub fn job_info(job_id: i64) -> JobSpanInfo {
    JobSpanInfo {
        job_id,
        job_name: "build".into(),
        stage: "test".into(),
        pipeline_id: Some(1001),
        ..JobSpanInfo::default()
    }
}

pub fn v1_payload() -> Value {
    json!({"features": {"job_telemetry": true},
           "trace_context": {"trace_id": TRACE_ID, "parent_span_id": PARENT}})
}

/// A contract v2 payload with one endpoint, and `http_bearer_gcp_oidc`
/// auth when `audience` is given.
pub fn v2_payload(url: &str, audience: Option<&str>) -> Value {
    let mut endpoint = json!({"url": url});
    if let Some(audience) = audience {
        endpoint["auth"] = json!({"type": "http_bearer_gcp_oidc",
                                  "http_bearer_gcp_oidc": {"audience": audience}});
    }
    json!({"features": {"tracing": {"trace_id": TRACE_ID, "span_parent_id": PARENT,
           "otel_endpoints": [endpoint]}}})
}

/// Runs a job that ends `children` child spans, then `job_execution`.
/// Starting and finishing must not wait for the network: checked here.
pub fn run_job(
    telemetry: &RunnerTelemetry,
    job_id: i64,
    payload: &Value,
    children: &[&'static str],
) -> PendingFlush {
    capture();
    let started = Instant::now();
    let mut job = telemetry.start_job(payload, &job_info(job_id), SystemTime::now());
    assert!(job.is_enabled(), "job {job_id} has telemetry");
    for name in children {
        job.child(*name, vec![]).end(SpanOutcome::Ok);
    }
    let pending = job
        .finish(&JobOutcome::Success, SystemTime::now())
        .expect("a flush");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "the job waited {:?} for telemetry",
        started.elapsed()
    );
    pending
}

/// Runs a v1 job without child spans (see `run_job`) and flushes it.
pub async fn flush_v1_job(telemetry: &RunnerTelemetry, job_id: i64) -> FlushReport {
    telemetry
        .flush_job(run_job(telemetry, job_id, &v1_payload(), &[]))
        .await
}

/// Per process: `spans = exported + dropped + buffered`.
pub fn assert_invariant(telemetry: &RunnerTelemetry) {
    let m = telemetry.metrics().snapshot();
    assert_eq!(
        m.spans,
        m.exported + m.dropped_total() + m.buffer_spans as u64,
        "accounting invariant: {m:?}"
    );
}

/// Per job: `spans = exported + dropped + buffered` at every endpoint.
pub fn assert_report(report: &FlushReport) {
    assert!(report.is_consistent(), "accounting invariant: {report:?}");
}

/// A request a scripted collector received.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    pub headers: BTreeMap<String, String>,
    /// Span IDs (hex) and names in the request.
    pub spans: Vec<(String, String)>,
    /// The status it was answered with.
    pub status: u16,
}

/// Records requests and answers them from a script: the `n`th request gets
/// `script[n]` (the last entry repeats).
#[derive(Clone, Default)]
pub struct Recorder {
    pub received: Arc<Mutex<Vec<Received>>>,
}

pub fn decode_spans(body: &[u8]) -> Vec<(String, String)> {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for rs in &request.resource_spans {
        for ss in &rs.scope_spans {
            for span in &ss.spans {
                let id: String = span.span_id.iter().map(|b| format!("{b:02x}")).collect();
                out.push((id, span.name.clone()));
            }
        }
    }
    out
}

impl Recorder {
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// A wiremock responder answering from `script` (status, answer).
    pub fn responder(
        &self,
        script: Vec<(u16, wiremock::ResponseTemplate)>,
    ) -> impl wiremock::Respond + 'static {
        let received = self.received.clone();
        move |request: &wiremock::Request| {
            let mut received = received.lock().unwrap();
            let n = received.len();
            let (status, answer) = script[n.min(script.len() - 1)].clone();
            received.push(Received {
                at: Instant::now(),
                headers: request
                    .headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                    .collect(),
                spans: decode_spans(&request.body),
                status,
            });
            answer
        }
    }

    /// Waits until `n` requests came, at most `deadline`.
    pub async fn wait_for(&self, n: usize, deadline: Duration) -> Vec<Received> {
        let until = Instant::now() + deadline;
        loop {
            let received = self.received();
            if received.len() >= n || Instant::now() >= until {
                return received;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A plain answer with `status`.
pub fn answer(status: u16) -> (u16, wiremock::ResponseTemplate) {
    (status, wiremock::ResponseTemplate::new(status))
}

/// An answer with `status` and a text `body`.
pub fn answer_with_body(status: u16, body: &str) -> (u16, wiremock::ResponseTemplate) {
    (
        status,
        wiremock::ResponseTemplate::new(status).set_body_string(body),
    )
}

/// A wiremock collector at `/v1/traces` answering from `script`.
pub async fn scripted_collector(
    script: Vec<(u16, wiremock::ResponseTemplate)>,
) -> (wiremock::MockServer, Recorder) {
    use wiremock::matchers::{method, path};
    let server = wiremock::MockServer::start().await;
    let recorder = Recorder::default();
    wiremock::Mock::given(method("POST"))
        .and(path("/v1/traces"))
        .respond_with(recorder.responder(script))
        .mount(&server)
        .await;
    (server, recorder)
}

/// Gaps between consecutive request times.
pub fn gaps(received: &[Received]) -> Vec<Duration> {
    received.windows(2).map(|w| w[1].at - w[0].at).collect()
}

/// Everything the process logged (tests of one binary share it).
pub fn logs() -> String {
    let buffer = capture();
    let bytes = buffer.lock().unwrap().clone();
    String::from_utf8_lossy(&bytes).into_owned()
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the capturing subscriber (once per test binary).
pub fn capture() -> Arc<Mutex<Vec<u8>>> {
    static BUFFER: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    BUFFER
        .get_or_init(|| {
            let buffer = Arc::new(Mutex::new(Vec::new()));
            let writer = buffer.clone();
            let _ = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::DEBUG)
                .with_ansi(false)
                .with_writer(move || Capture(writer.clone()))
                .try_init();
            buffer
        })
        .clone()
}
