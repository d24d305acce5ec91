//! OTLP load for `cargo xtask bench ingest`: senders on threads, each with
//! its own CI runner resource, posting OTLP/HTTP protobuf requests of a
//! fixed number of spans to the collector, as fast as it answers or at a
//! given total rate, for a given time. Every span is counted as accepted
//! (200), refused (another status) or failed (no answer: connection error or
//! timeout), so the stored rows can be checked against what was accepted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, ResourceSpans, ScopeSpans, Span};
use prost::Message;

/// How to load the collector.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub senders: usize,
    pub spans_per_request: u64,
    pub duration: Duration,
    /// Total spans per second offered by all senders; `None`: as fast as the
    /// collector answers.
    pub rate: Option<f64>,
    /// Per request, like an OTLP exporter's timeout (the SDKs' default is 10 s).
    pub request_timeout: Duration,
}

/// What the senders saw, in spans.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    pub accepted: u64,
    pub refused: u64,
    pub failed: u64,
    pub elapsed: Duration,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
}

/// Sends spans to `<otlp_http>/v1/traces` until `options.duration` is over.
pub fn run(otlp_http: &str, options: &LoadOptions) -> LoadReport {
    let url = format!("{}/v1/traces", otlp_http.trim_end_matches('/'));
    let counters = Arc::new(Counters::default());
    let started = Instant::now();
    let per_sender_interval = options.rate.map(|rate| {
        let requests_per_second = rate / options.spans_per_request as f64 / options.senders as f64;
        Duration::from_secs_f64(1.0 / requests_per_second.max(1e-6))
    });
    let threads: Vec<_> = (0..options.senders)
        .map(|i| {
            let url = url.clone();
            let counters = counters.clone();
            let options = options.clone();
            std::thread::spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(options.request_timeout))
                    .build()
                    .into();
                let source = Source::new(i);
                let mut next = 0u64;
                let mut due = Instant::now();
                while started.elapsed() < options.duration {
                    if let Some(interval) = per_sender_interval {
                        let now = Instant::now();
                        if due > now {
                            std::thread::sleep(due - now);
                        }
                        due += interval;
                    }
                    let body = source
                        .request(next, options.spans_per_request)
                        .encode_to_vec();
                    next += options.spans_per_request;
                    let n = options.spans_per_request;
                    let outcome = agent
                        .post(&url)
                        .header("Content-Type", "application/x-protobuf")
                        .send(&body[..]);
                    let counter = match outcome {
                        Ok(mut response) => {
                            let _ = response.body_mut().read_to_vec();
                            if response.status() == 200 {
                                &counters.accepted
                            } else {
                                &counters.refused
                            }
                        }
                        Err(_) => &counters.failed,
                    };
                    counter.fetch_add(n, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for thread in threads {
        let _ = thread.join();
    }
    LoadReport {
        accepted: counters.accepted.load(Ordering::Relaxed),
        refused: counters.refused.load(Ordering::Relaxed),
        failed: counters.failed.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
    }
}

/// One sender's resource: a CI runner, ids in resource and span attributes.
struct Source {
    index: usize,
    trace_base: u128,
    span_base: u64,
}

impl Source {
    fn new(index: usize) -> Source {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(1);
        Source {
            index,
            trace_base: seed.rotate_left(17) ^ ((index as u128 + 1) << 64),
            span_base: ((seed as u64) ^ (index as u64).rotate_left(40)) & 0xffff_ffff_0000_0000,
        }
    }

    /// `count` spans numbered from `first`, 1,000 to a trace.
    fn request(&self, first: u64, count: u64) -> ExportTraceServiceRequest {
        let end = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let spans = (first..first + count)
            .map(|i| Span {
                trace_id: (self.trace_base ^ u128::from(i / 1_000))
                    .to_be_bytes()
                    .to_vec(),
                span_id: (self.span_base | (i + 1)).to_be_bytes().to_vec(),
                name: "step_script".into(),
                kind: SpanKind::Internal as i32,
                start_time_unix_nano: end - 250_000_000,
                end_time_unix_nano: end,
                attributes: vec![int("ci.job.id", 1_000 + (i / 50) as i64)],
                ..Default::default()
            })
            .collect();
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![
                        string("service.name", "gitlab-ci-runner"),
                        string("load.sender", &self.index.to_string()),
                        int("ci.pipeline.id", 4100),
                        int("ci.project.id", 42),
                        int("ci.runner.id", self.index as i64 + 1),
                    ],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "gitlab-ci-runner".into(),
                        ..Default::default()
                    }),
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }
}

/// An OTLP string attribute.
pub fn string(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

/// An OTLP integer attribute.
pub fn int(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(value)),
        }),
        ..Default::default()
    }
}

/// Resident memory of `pid` in bytes (from /proc), if it is running.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}
