//! The instrumented peer: `xtask bench-peer '<json>'`, a process of its own
//! per side and run, so that CPU time and peak RSS belong to one export
//! pipeline. Many concurrent jobs end spans through either our export client
//! (`RunnerTelemetry`, as the reference runner uses it) or the stock pipeline
//! (`opentelemetry_sdk`'s `BatchSpanProcessor` with `opentelemetry-otlp`'s
//! exporter, both at their defaults). Prints one JSON line with what it saw.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer,
    TracerProvider,
};
use opentelemetry::KeyValue;
use runner_telemetry::config::StaticEndpoint;
use runner_telemetry::negotiate::Transport;
use runner_telemetry::{
    ExportSettings, JobOutcome, JobSpanInfo, RunnerIdentity, RunnerTelemetry, SpanOutcome,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::stats::{micros, percentile};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// `runner-telemetry`'s export client.
    Ours,
    /// `BatchSpanProcessor` + `opentelemetry-otlp`.
    Stock,
}

impl Side {
    pub fn name(self) -> &'static str {
        match self {
            Side::Ours => "ours",
            Side::Stock => "stock",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    Http,
    Grpc,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Grpc => "grpc",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerConfig {
    pub side: Side,
    pub protocol: Protocol,
    /// HTTP: base URL (`/v1/traces` is added); gRPC: `http://host:port`.
    pub endpoint: String,
    pub service_name: String,
    pub jobs: usize,
    pub spans_per_job: usize,
    /// How long to wait for the spans to be delivered before shutting down.
    pub settle_secs: f64,
    /// Our client's buffer in spans (its default when None): the stack
    /// ingest scenario sizes it to the burst, so it measures the stack.
    #[serde(default)]
    pub buffer_max_spans: Option<usize>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PeerResult {
    /// Spans the jobs ended.
    pub spans: u64,
    /// The job's own cost of one span (start + attributes + end), µs.
    pub span_p50_us: f64,
    pub span_p95_us: f64,
    /// Starting and ending a job's telemetry, µs.
    pub start_p50_us: f64,
    pub finish_p50_us: f64,
    /// From the first span to the pipeline shut down, seconds.
    pub elapsed_secs: f64,
    /// User + system CPU of the whole process, seconds.
    pub cpu_secs: f64,
    pub max_rss_kb: u64,
    /// Spans the pipeline itself counted as dropped (with a reason).
    pub counted_drops: u64,
}

const STAGES: [&str; 8] = [
    "prepare_executor",
    "get_sources",
    "restore_cache",
    "step_script",
    "after_script",
    "archive_cache",
    "upload_artifacts",
    "ci_function",
];

/// The attributes a stage span carries (about 150 bytes).
fn stage_attributes(i: usize) -> Vec<KeyValue> {
    vec![
        KeyValue::new("ci.stage.status", "success"),
        KeyValue::new("ci.cache.key", format!("bench-cache-key-{}", i % 7)),
        KeyValue::new("ci.cache.hit", i & 1 == 0),
        KeyValue::new("ci.cache.size_bytes", (i * 1024) as i64),
        KeyValue::new("ci.function.name", "gitlab.com/components/bench/step"),
    ]
}

pub fn run(args: &[String]) -> Result<()> {
    let config: PeerConfig =
        serde_json::from_str(args.first().context("bench-peer needs its JSON config")?)?;
    let result = match config.side {
        Side::Ours => ours(&config)?,
        Side::Stock => stock(&config)?,
    };
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

#[derive(Default)]
struct Costs {
    spans: Vec<f64>,
    starts: Vec<f64>,
    finishes: Vec<f64>,
}

impl Costs {
    fn merge(&mut self, other: Costs) {
        self.spans.extend(other.spans);
        self.starts.extend(other.starts);
        self.finishes.extend(other.finishes);
    }

    fn into_result(self, started: Instant, counted_drops: u64) -> PeerResult {
        let (cpu_secs, max_rss_kb) = usage();
        PeerResult {
            spans: (self.spans.len() + self.starts.len()) as u64,
            span_p50_us: percentile(&self.spans, 0.5),
            span_p95_us: percentile(&self.spans, 0.95),
            start_p50_us: percentile(&self.starts, 0.5),
            finish_p50_us: percentile(&self.finishes, 0.5),
            elapsed_secs: started.elapsed().as_secs_f64(),
            cpu_secs,
            max_rss_kb,
            counted_drops,
        }
    }
}

/// CPU seconds (user + system) and peak RSS (KiB) of this process.
pub fn usage() -> (f64, u64) {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (
        secs(usage.ru_utime) + secs(usage.ru_stime),
        usage.ru_maxrss as u64,
    )
}

pub fn job_payload(job: usize) -> serde_json::Value {
    json!({
        "features": {"job_telemetry": true},
        "trace_context": {
            "trace_id": format!("{:032x}", 0xbe0c_0000_0000_u128 + job as u128 + 1),
            "parent_span_id": "00f067aa0ba902b7"
        }
    })
}

pub fn job_info(job: usize) -> JobSpanInfo {
    JobSpanInfo {
        job_id: job as i64 + 1,
        job_name: format!("bench-{job}"),
        stage: "test".into(),
        pipeline_id: Some(7),
        pipeline_source: Some("push".into()),
        project_id: Some(3),
        project_path: Some("bench/project".into()),
        git_ref: Some("main".into()),
        ..JobSpanInfo::default()
    }
}

/// Settings of our client towards `endpoint`, defaults otherwise.
pub fn our_settings(protocol: Protocol, endpoint: &str, service_name: &str) -> ExportSettings {
    let (transport, url) = match protocol {
        Protocol::Http => (Transport::HttpProtobuf, format!("{endpoint}/v1/traces")),
        Protocol::Grpc => (Transport::Grpc, endpoint.to_string()),
    };
    ExportSettings {
        service_name: service_name.into(),
        endpoint: StaticEndpoint {
            transport,
            url,
            headers: Vec::new(),
        },
        ..ExportSettings::default()
    }
}

fn ours(config: &PeerConfig) -> Result<PeerResult> {
    let runtime = runtime()?;
    let mut settings = our_settings(config.protocol, &config.endpoint, &config.service_name);
    if let Some(spans) = config.buffer_max_spans {
        settings.buffer.max_spans = spans;
        settings.buffer.max_bytes = settings.buffer.max_bytes.max(spans * 1024);
    }
    let telemetry = Arc::new(RunnerTelemetry::new(
        settings,
        RunnerIdentity {
            id: Some(1),
            name: "bench".into(),
            executor: "shell".into(),
        },
    ));
    let started = Instant::now();
    let spans_per_job = config.spans_per_job;
    let costs = runtime.block_on(async {
        let tasks: Vec<_> = (0..config.jobs)
            .map(|job| {
                let telemetry = telemetry.clone();
                tokio::spawn(async move {
                    let mut costs = Costs::default();
                    let t = Instant::now();
                    let mut job_telemetry =
                        telemetry.start_job(&job_payload(job), &job_info(job), SystemTime::now());
                    costs.starts.push(micros(t.elapsed()));
                    for i in 0..spans_per_job.saturating_sub(1) {
                        let t = Instant::now();
                        let child =
                            job_telemetry.child(STAGES[i % STAGES.len()], stage_attributes(i));
                        child.end(SpanOutcome::Ok);
                        costs.spans.push(micros(t.elapsed()));
                        if i % 16 == 15 {
                            tokio::task::yield_now().await;
                        }
                    }
                    let t = Instant::now();
                    let flush = job_telemetry.finish(&JobOutcome::Success, SystemTime::now());
                    costs.finishes.push(micros(t.elapsed()));
                    if let Some(flush) = flush {
                        tokio::spawn(flush.flush(Duration::from_secs(5)));
                    }
                    costs
                })
            })
            .collect();
        let mut all = Costs::default();
        for task in tasks {
            all.merge(task.await.expect("a bench job"));
        }
        // Wait until every span is decided (exported or dropped), bounded.
        let ended = (all.spans.len() + all.starts.len()) as u64;
        let until = Instant::now() + Duration::from_secs_f64(config.settle_secs);
        loop {
            let s = telemetry.metrics().snapshot();
            if s.exported + s.dropped_total() >= ended || Instant::now() >= until {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        telemetry.shutdown().await;
        all
    });
    let dropped = telemetry.metrics().snapshot().dropped_total();
    Ok(costs.into_result(started, dropped))
}

fn stock(config: &PeerConfig) -> Result<PeerResult> {
    use opentelemetry_otlp::{Protocol as OtlpProtocol, WithExportConfig, WithHttpConfig};
    let runtime = runtime()?;
    let exporter = match config.protocol {
        // The blocking client, built outside the runtime (it runs its own).
        Protocol::Http => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(reqwest::blocking::Client::new())
            .with_protocol(OtlpProtocol::HttpBinary)
            .with_endpoint(format!("{}/v1/traces", config.endpoint))
            .build()?,
        // tonic's channel lives on the runtime it was built in.
        Protocol::Grpc => {
            let _guard = runtime.enter();
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(config.endpoint.clone())
                .build()?
        }
    };
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_span_processor(
            opentelemetry_sdk::trace::BatchSpanProcessor::builder(exporter).build(),
        )
        .with_resource(
            opentelemetry_sdk::Resource::builder_empty()
                .with_service_name(config.service_name.clone())
                .build(),
        )
        .build();
    let tracer = provider.tracer("gitlab-ci-runner");
    let started = Instant::now();
    let spans_per_job = config.spans_per_job;
    let costs = runtime.block_on(async {
        let tasks: Vec<_> = (0..config.jobs)
            .map(|job| {
                let tracer = tracer.clone();
                tokio::spawn(async move {
                    let mut costs = Costs::default();
                    let t = Instant::now();
                    let parent =
                        opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
                            TraceId::from(0xbe0c_0000_0000_u128 + job as u128 + 1),
                            SpanId::from(0x00f0_67aa_0ba9_02b7_u64),
                            TraceFlags::SAMPLED,
                            true,
                            TraceState::default(),
                        ));
                    let info = job_info(job);
                    let job_span = tracer
                        .span_builder("job_execution")
                        .with_kind(SpanKind::Internal)
                        .with_attributes(vec![
                            KeyValue::new("ci.job.id", info.job_id),
                            KeyValue::new("ci.job.name", info.job_name.clone()),
                            KeyValue::new("ci.pipeline.id", 7_i64),
                            KeyValue::new("ci.project.id", 3_i64),
                        ])
                        .start_with_context(&tracer, &parent);
                    let job_cx = parent.with_span(job_span);
                    costs.starts.push(micros(t.elapsed()));
                    for i in 0..spans_per_job.saturating_sub(1) {
                        let t = Instant::now();
                        let mut span = tracer
                            .span_builder(STAGES[i % STAGES.len()])
                            .with_kind(SpanKind::Internal)
                            .with_attributes(stage_attributes(i))
                            .start_with_context(&tracer, &job_cx);
                        opentelemetry::trace::Span::end(&mut span);
                        costs.spans.push(micros(t.elapsed()));
                        if i % 16 == 15 {
                            tokio::task::yield_now().await;
                        }
                    }
                    let t = Instant::now();
                    job_cx
                        .span()
                        .set_attribute(KeyValue::new("ci.job.status", "success"));
                    job_cx.span().end();
                    costs.finishes.push(micros(t.elapsed()));
                    costs
                })
            })
            .collect();
        let mut all = Costs::default();
        for task in tasks {
            all.merge(task.await.expect("a bench job"));
        }
        all
    });
    // Flush and stop, as a runner does at exit; the runtime stays up for
    // tonic meanwhile.
    let _ = provider.force_flush();
    let _ = provider.shutdown();
    drop(runtime);
    // The stock pipeline counts no drop anyone can read.
    Ok(costs.into_result(started, 0))
}
