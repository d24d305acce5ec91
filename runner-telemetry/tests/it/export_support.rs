//! Shared by the export client's tests: settings with short delays, jobs
//! that end a given number of spans, captured logs, and the accounting
//! invariant. The collectors are `conformance::doubles::otlp`'s.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

pub use conformance::doubles::otlp::{Answer, Collector, Received};
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

/// `settings` for OTLP/HTTP to `collector`.
pub fn http_settings(collector: &Collector) -> ExportSettings {
    settings(Transport::HttpProtobuf, &collector.http_endpoint())
}

/// Telemetry exporting with `http_settings` to `collector`.
pub fn http_telemetry(collector: &Collector) -> RunnerTelemetry {
    RunnerTelemetry::new(http_settings(collector), runner())
}

/// A collector answering `script` to its first requests, then `Ok`.
pub async fn scripted_collector(script: Vec<Answer>) -> Collector {
    let collector = Collector::start().await;
    collector.script(script);
    collector
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
/// (That starting and finishing never wait for the network is checked
/// against a collector that never answers, in `export.rs`.)
pub fn run_job(
    telemetry: &RunnerTelemetry,
    job_id: i64,
    payload: &Value,
    children: &[&'static str],
) -> PendingFlush {
    capture();
    let mut job = telemetry.start_job(payload, &job_info(job_id), SystemTime::now());
    assert!(job.is_enabled(), "job {job_id} has telemetry");
    for name in children {
        job.child(*name, vec![]).end(SpanOutcome::Ok);
    }
    job.finish(&JobOutcome::Success, SystemTime::now())
        .expect("a flush")
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
