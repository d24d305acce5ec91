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
                let mut requests = Encoded::new(Source::new(i), options.spans_per_request);
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
                    let body = requests.request(next, now_nanos());
                    next += options.spans_per_request;
                    let n = options.spans_per_request;
                    let outcome = agent
                        .post(&url)
                        .header("Content-Type", "application/x-protobuf")
                        .send(body);
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

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// CI job ids start here so that each takes five bytes as a protobuf varint
/// (any id below 2^35 does): every request then encodes to the same length
/// and its ids can be written in place.
const JOB_ID_BASE: i64 = 1 << 28;

/// A sender's requests, encoded once: the next request is the same bytes
/// with its spans' trace ids, span ids, timestamps and job ids written in
/// place, so the senders cost next to nothing beside the collector and the
/// engine they load. Checked against prost's encoding when made.
struct Encoded {
    source: Source,
    count: u64,
    body: Vec<u8>,
    /// Offsets in `body` of span 0's fields, and the distance between spans.
    trace_id: usize,
    span_id: usize,
    start: usize,
    end: usize,
    job_id: usize,
    stride: usize,
}

impl Encoded {
    fn new(source: Source, count: u64) -> Encoded {
        let end = now_nanos();
        let body = source.request(0, count, end).encode_to_vec();
        let find = |needle: &[u8], from: usize| -> usize {
            from + body[from..]
                .windows(needle.len())
                .position(|w| w == needle)
                .expect("a field of the encoded template")
        };
        // Span k's fields, each found after its tag (field number, wire type).
        let offsets = |k: u64| -> [usize; 5] {
            let span_id = find(&[&[0x12, 8][..], &source.span_id(k)].concat(), 0) + 2;
            let trace_id = find(&[&[0x0a, 16][..], &source.trace_id(k)].concat(), 0) + 2;
            let start = find(
                &[&[0x39][..], &(end - SPAN_NANOS).to_le_bytes()].concat(),
                span_id,
            ) + 1;
            let end = find(&[&[0x41][..], &end.to_le_bytes()].concat(), span_id) + 1;
            let job_id = find(
                &[&[0x18][..], &varint5(JOB_ID_BASE + (k / 50) as i64)].concat(),
                span_id,
            ) + 1;
            [trace_id, span_id, start, end, job_id]
        };
        let first = offsets(0);
        let stride = if count > 1 {
            offsets(1)[1] - first[1]
        } else {
            0
        };
        let mut encoded = Encoded {
            source,
            count,
            body,
            trace_id: first[0],
            span_id: first[1],
            start: first[2],
            end: first[3],
            job_id: first[4],
            stride,
        };
        // The third request, written in place, decodes to what prost makes.
        let later = end + 1_000_000_007;
        let patched = encoded.request(2 * count, later).to_vec();
        let expected = encoded.source.request(2 * count, count, later);
        assert_eq!(
            ExportTraceServiceRequest::decode(&patched[..])
                .ok()
                .as_ref(),
            Some(&expected),
            "pre-encoded requests differ from prost's encoding"
        );
        encoded
    }

    /// The request of `count` spans numbered from `first`, ending at `end`.
    fn request(&mut self, first: u64, end: u64) -> &[u8] {
        for k in 0..self.count {
            let i = first + k;
            let at = k as usize * self.stride;
            let put = |body: &mut Vec<u8>, offset: usize, bytes: &[u8]| {
                body[at + offset..at + offset + bytes.len()].copy_from_slice(bytes)
            };
            put(&mut self.body, self.trace_id, &self.source.trace_id(i));
            put(&mut self.body, self.span_id, &self.source.span_id(i));
            put(
                &mut self.body,
                self.start,
                &(end - SPAN_NANOS).to_le_bytes(),
            );
            put(&mut self.body, self.end, &end.to_le_bytes());
            put(
                &mut self.body,
                self.job_id,
                &varint5(JOB_ID_BASE + (i / 50) as i64),
            );
        }
        &self.body
    }
}

/// `value` (in 2^28..2^35) as a five-byte protobuf varint.
fn varint5(value: i64) -> [u8; 5] {
    let v = value as u64;
    debug_assert!((1 << 28..1 << 35).contains(&v));
    [
        (v & 0x7f) as u8 | 0x80,
        ((v >> 7) & 0x7f) as u8 | 0x80,
        ((v >> 14) & 0x7f) as u8 | 0x80,
        ((v >> 21) & 0x7f) as u8 | 0x80,
        (v >> 28) as u8,
    ]
}

const SPAN_NANOS: u64 = 250_000_000;

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

    /// Span `i`'s trace id: 1,000 spans to a trace.
    fn trace_id(&self, i: u64) -> [u8; 16] {
        (self.trace_base ^ u128::from(i / 1_000)).to_be_bytes()
    }

    fn span_id(&self, i: u64) -> [u8; 8] {
        (self.span_base | (i + 1)).to_be_bytes()
    }

    /// `count` spans numbered from `first`, ending at `end` (ns), 50 to a job.
    fn request(&self, first: u64, count: u64, end: u64) -> ExportTraceServiceRequest {
        let spans = step_spans(first, count, end, JOB_ID_BASE, |i| {
            (self.trace_id(i), self.span_id(i))
        });
        let resource = Resource {
            attributes: vec![
                string("service.name", "gitlab-ci-runner"),
                string("load.sender", &self.index.to_string()),
                int("ci.pipeline.id", 4100),
                int("ci.project.id", 42),
                int("ci.runner.id", self.index as i64 + 1),
            ],
            ..Default::default()
        };
        ExportTraceServiceRequest {
            resource_spans: vec![runner_resource_spans(resource, spans)],
        }
    }
}

/// `count` `step_script` spans numbered from `first`, each 250 ms long and
/// ending at `end` (ns), 50 to a job (`ci.job.id` counts up from `job_base`);
/// `ids` gives span `i` its trace id and span id.
pub fn step_spans(
    first: u64,
    count: u64,
    end: u64,
    job_base: i64,
    ids: impl Fn(u64) -> ([u8; 16], [u8; 8]),
) -> Vec<Span> {
    (first..first + count)
        .map(|i| {
            let (trace_id, span_id) = ids(i);
            Span {
                trace_id: trace_id.to_vec(),
                span_id: span_id.to_vec(),
                name: "step_script".into(),
                kind: SpanKind::Internal as i32,
                start_time_unix_nano: end - SPAN_NANOS,
                end_time_unix_nano: end,
                attributes: vec![int("ci.job.id", job_base + (i / 50) as i64)],
                ..Default::default()
            }
        })
        .collect()
}

/// `resource` and its `spans` under the runner's instrumentation scope.
pub fn runner_resource_spans(resource: Resource, spans: Vec<Span>) -> ResourceSpans {
    ResourceSpans {
        resource: Some(resource),
        scope_spans: vec![ScopeSpans {
            scope: Some(InstrumentationScope {
                name: "gitlab-ci-runner".into(),
                ..Default::default()
            }),
            spans,
            ..Default::default()
        }],
        ..Default::default()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pre_encoded_requests_are_what_prost_encodes() {
        for count in [1, 3, 1_000] {
            let mut encoded = Encoded::new(Source::new(2), count);
            for (n, end) in [
                (0, 1_700_000_000_000_000_000u64),
                (7, 1_800_000_000_123_456_789),
            ] {
                let first = n * count;
                let body = encoded.request(first, end).to_vec();
                let decoded = ExportTraceServiceRequest::decode(&body[..]).unwrap();
                assert_eq!(
                    decoded,
                    encoded.source.request(first, count, end),
                    "count {count}, request {n}"
                );
            }
        }
    }

    #[test]
    fn five_byte_varints() {
        for v in [JOB_ID_BASE, JOB_ID_BASE + 12_345, (1 << 35) - 1] {
            let mut buf = Vec::new();
            prost::encoding::encode_varint(v as u64, &mut buf);
            assert_eq!(buf, varint5(v));
        }
    }
}
