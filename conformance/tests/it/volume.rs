//! Volume: the embedded stack under the request shapes a fleet produces.
//!
//! Every span sent must land exactly once in `otel.otel_traces` with its own
//! `ServiceName` and `ResourceAttributes`, and every CI span must reach
//! `otel.ci_job_telemetry_traces` with its ids. The shapes are the ones that
//! broke rotel 0.0.1a15's batching (see `compose/README.md`): a request that
//! fills a batch partway through a resource, a request of exactly one batch,
//! concurrent requests inside one batch window, a request larger than two
//! batches, and resources that straddle a batch boundary; then a fleet of
//! runners draining their buffers after an outage, and a sustained load of a
//! million spans from concurrent senders with exact accounting.
//!
//! The SDK's exporter sends one resource per request, so these tests build
//! OTLP requests with `opentelemetry-proto` and send them with reqwest
//! (OTLP/HTTP, protobuf) and tonic (OTLP/gRPC), as a runner's client does.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use conformance::load::{int, runner_resource_spans, step_spans, string};
use conformance::process::wait_for;
use conformance::{ClickHouse, Stack, StackOptions};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::ResourceSpans;
use prost::Message;

/// How long a shape may take to land completely. Spans that never land
/// (dropped) make the check wait this long, then fail with the counts.
const LANDING_DEADLINE: Duration = Duration::from_secs(30);
/// The sustained load has more to write.
const SUSTAINED_DEADLINE: Duration = Duration::from_secs(240);

#[derive(Clone, Copy, Debug)]
enum Transport {
    Http,
    Grpc,
}

/// One resource of a shape: who sends, and how its spans are found again.
#[derive(Clone, Debug)]
struct Source {
    /// `volume.resource`, unique within the test.
    label: String,
    /// `gitlab-ci-runner` for CI sources (their spans must reach
    /// `ci_job_telemetry_traces`), another service otherwise.
    ci: bool,
    /// Every span of this source is in this trace.
    trace_id: [u8; 16],
    /// High half of the span ids; the low half counts up.
    span_base: u64,
}

impl Source {
    fn new(label: &str, ci: bool) -> Source {
        Source {
            label: label.to_string(),
            ci,
            trace_id: rand::random::<u128>().max(1).to_be_bytes(),
            span_base: u64::from(rand::random::<u32>().max(1)) << 32,
        }
    }

    fn service(&self) -> &'static str {
        if self.ci {
            "gitlab-ci-runner"
        } else {
            "volume-test"
        }
    }

    fn trace_hex(&self) -> String {
        hex::encode(self.trace_id)
    }

    fn resource(&self) -> Resource {
        let mut attributes = vec![
            string("service.name", self.service()),
            string("volume.resource", &self.label),
        ];
        if self.ci {
            // The upstream view reads the CI ids from the resource: a span
            // that loses its resource loses them.
            attributes.push(int("ci.pipeline.id", 4100));
            attributes.push(int("ci.project.id", 42));
            attributes.push(int("ci.runner.id", 7));
        }
        Resource {
            attributes,
            ..Default::default()
        }
    }

    /// `count` spans of this source, numbered from `first`.
    fn resource_spans(&self, first: u64, count: u64) -> ResourceSpans {
        let spans = step_spans(first, count, now_ns(), 1_000, |i| {
            (self.trace_id, (self.span_base | (i + 1)).to_be_bytes())
        });
        runner_resource_spans(self.resource(), spans)
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// Sends OTLP requests to one stack over one transport. Cloning shares the
/// connections (HTTP/1 keep-alive pool, one HTTP/2 channel for gRPC).
#[derive(Clone)]
struct Sender {
    http_url: String,
    http: reqwest::Client,
    grpc: Option<TraceServiceClient<tonic::transport::Channel>>,
}

impl Sender {
    async fn connect(stack: &Stack, transport: Transport) -> Sender {
        let grpc = match transport {
            Transport::Http => None,
            Transport::Grpc => Some(
                TraceServiceClient::connect(stack.endpoints().otlp_grpc.clone())
                    .await
                    .expect("connecting to the collector's OTLP/gRPC receiver"),
            ),
        };
        Sender {
            http_url: format!("{}/v1/traces", stack.endpoints().otlp_http),
            http: reqwest::Client::new(),
            grpc,
        }
    }

    /// One request; the collector must accept it.
    async fn send(&self, request: ExportTraceServiceRequest) {
        if let Some(grpc) = &self.grpc {
            grpc.clone()
                .export(request)
                .await
                .expect("the collector refused an OTLP/gRPC request");
            return;
        }
        let response = self
            .http
            .post(&self.http_url)
            .header("Content-Type", "application/x-protobuf")
            .body(request.encode_to_vec())
            .send()
            .await
            .expect("sending an OTLP/HTTP request");
        assert_eq!(
            response.status(),
            200,
            "the collector refused an OTLP/HTTP request"
        );
    }
}

fn request(parts: Vec<ResourceSpans>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: parts,
    }
}

/// What landed for each source, as lines a person can compare, and the
/// expected lines.
fn landed_report(clickhouse: &ClickHouse, expected: &BTreeMap<String, (Source, u64)>) -> String {
    let traces: Vec<String> = expected
        .values()
        .map(|(s, _)| format!("'{}'", s.trace_hex()))
        .collect();
    let traces = traces.join(",");
    let label_of: BTreeMap<String, String> = expected
        .values()
        .map(|(s, _)| (s.trace_hex(), s.label.clone()))
        .collect();
    let rows = clickhouse
        .json_rows(&format!(
            "SELECT TraceId, ServiceName, ResourceAttributes['volume.resource'] AS resource, \
             count() AS n, uniqExact(SpanId) AS distinct_spans \
             FROM otel.otel_traces WHERE TraceId IN ({traces}) \
             GROUP BY TraceId, ServiceName, resource ORDER BY TraceId, ServiceName"
        ))
        .unwrap();
    let ci_rows = clickhouse
        .json_rows(&format!(
            "SELECT trace_id, count() AS n FROM otel.ci_job_telemetry_traces \
             WHERE trace_id IN ({traces}) AND build_id != 0 AND pipeline_id != 0 \
             AND project_id != 0 AND runner_id != 0 GROUP BY trace_id"
        ))
        .unwrap();
    let mut lines: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{}: service={:?} resource={:?} rows={} distinct={}",
                label_of[&text(&r["TraceId"])],
                text(&r["ServiceName"]),
                text(&r["resource"]),
                text(&r["n"]),
                text(&r["distinct_spans"]),
            )
        })
        .collect();
    lines.extend(ci_rows.iter().map(|r| {
        format!(
            "{}: ci_job_telemetry_traces rows with ids={}",
            label_of[&text(&r["trace_id"])],
            text(&r["n"])
        )
    }));
    lines.sort();
    lines.join("\n")
}

fn expected_report(expected: &BTreeMap<String, (Source, u64)>) -> String {
    let mut lines = Vec::new();
    for (source, count) in expected.values() {
        lines.push(format!(
            "{}: service={:?} resource={:?} rows={count} distinct={count}",
            source.label,
            source.service(),
            source.label
        ));
        if source.ci {
            lines.push(format!(
                "{}: ci_job_telemetry_traces rows with ids={count}",
                source.label
            ));
        }
    }
    lines.sort();
    lines.join("\n")
}

/// Rows stored for these sources, whatever their resource.
fn stored(clickhouse: &ClickHouse, sources: &[&Source]) -> u64 {
    let traces: Vec<String> = sources
        .iter()
        .map(|s| format!("'{}'", s.trace_hex()))
        .collect();
    clickhouse
        .count(&format!(
            "SELECT count() FROM otel.otel_traces WHERE TraceId IN ({})",
            traces.join(",")
        ))
        .unwrap_or(0)
}

/// Waits until every span of `expected` is stored (or the deadline), then
/// returns (what landed, what should have).
fn settle(clickhouse: &ClickHouse, expected: &BTreeMap<String, (Source, u64)>) -> (String, String) {
    let total: u64 = expected.values().map(|(_, n)| n).sum();
    let sources: Vec<&Source> = expected.values().map(|(s, _)| s).collect();
    let _ = wait_for("the spans to land", LANDING_DEADLINE, || {
        Ok((stored(clickhouse, &sources) >= total).then_some(()))
    });
    // The view's rows are written in the same insert as the table's.
    (
        landed_report(clickhouse, expected),
        expected_report(expected),
    )
}

/// A shape: requests of (source, span count) parts, sent one after the
/// other or all at once.
struct Shape {
    name: &'static str,
    requests: Vec<Vec<(usize, u64)>>,
    concurrent: bool,
    sources: Vec<Source>,
}

fn shapes(prefix: &str) -> Vec<Shape> {
    let source = |name: &str, i: usize, ci: bool| Source::new(&format!("{prefix}/{name}/{i}"), ci);
    vec![
        Shape {
            name: "one request: 8,000 spans of resource A and 400 of resource B",
            requests: vec![vec![(0, 8_000), (1, 400)]],
            concurrent: false,
            sources: vec![source("8000+400", 0, true), source("8000+400", 1, true)],
        },
        Shape {
            name: "one request of 8,192 spans",
            requests: vec![vec![(0, 8_192)]],
            concurrent: false,
            sources: vec![source("8192", 0, true)],
        },
        Shape {
            name: "nine requests of 1,000 spans in one batch window",
            requests: (0..9).map(|i| vec![(i, 1_000)]).collect(),
            concurrent: true,
            sources: (0..9).map(|i| source("9x1000", i, i % 2 == 0)).collect(),
        },
        Shape {
            name: "one request of 20,000 spans",
            requests: vec![vec![(0, 20_000)]],
            concurrent: false,
            sources: vec![source("20000", 0, true)],
        },
        Shape {
            name: "two resources split across a batch boundary",
            requests: vec![vec![(0, 6_000)], vec![(1, 3_000), (2, 1_000)]],
            concurrent: true,
            sources: vec![
                source("boundary", 0, false),
                source("boundary", 1, true),
                source("boundary", 2, false),
            ],
        },
    ]
}

fn check_bursts(transport: Transport) {
    let stack = Stack::start(StackOptions::isolated()).unwrap();
    let clickhouse = stack.clickhouse();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let sender = runtime.block_on(Sender::connect(&stack, transport));
    let mut failures = Vec::new();
    for shape in shapes(&format!("{transport:?}")) {
        let mut expected: BTreeMap<String, (Source, u64)> = shape
            .sources
            .iter()
            .map(|s| (s.label.clone(), (s.clone(), 0)))
            .collect();
        let mut next: Vec<u64> = vec![0; shape.sources.len()];
        let requests: Vec<ExportTraceServiceRequest> = shape
            .requests
            .iter()
            .map(|parts| {
                request(
                    parts
                        .iter()
                        .map(|&(i, n)| {
                            let source = &shape.sources[i];
                            expected.get_mut(&source.label).unwrap().1 += n;
                            next[i] += n;
                            source.resource_spans(next[i] - n, n)
                        })
                        .collect(),
                )
            })
            .collect();
        runtime.block_on(async {
            if shape.concurrent {
                futures::future::join_all(requests.into_iter().map(|r| sender.send(r))).await;
            } else {
                for r in requests {
                    sender.send(r).await;
                }
            }
        });
        let (landed, want) = settle(&clickhouse, &expected);
        if landed != want {
            failures.push(format!(
                "{} ({transport:?}):\n  landed:\n    {}\n  expected:\n    {}",
                shape.name,
                landed.replace('\n', "\n    "),
                want.replace('\n', "\n    ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "spans were lost, duplicated or stored without their resource:\n{}",
        failures.join("\n")
    );
}

#[test]
fn bursts_over_otlp_http_land_once_with_their_resource() {
    check_bursts(Transport::Http);
}

#[test]
fn bursts_over_otlp_grpc_land_once_with_their_resource() {
    check_bursts(Transport::Grpc);
}

/// A fleet's runners buffered many jobs' spans while the collector was
/// down, then all drain at once, as the runner's export client does: each
/// runner sends its buffer in batches of 512 spans, one request at a
/// time, every runner at the same time.
#[test]
fn spans_buffered_during_an_outage_land_once_when_drained() {
    const RUNNERS: usize = 12;
    const JOBS_PER_RUNNER: u64 = 20;
    const SPANS_PER_JOB: u64 = 48;
    // runner-telemetry's `export::MAX_BATCH`.
    let batch: u64 = 512;

    let mut stack = Stack::start(StackOptions::isolated()).unwrap();
    let clickhouse = stack.clickhouse();
    let runners: Vec<Source> = (0..RUNNERS)
        .map(|i| Source::new(&format!("drain/runner-{i}"), true))
        .collect();
    let per_runner = JOBS_PER_RUNNER * SPANS_PER_JOB;
    // The buffers fill while the collector is down ...
    stack.stop_collector();
    let buffers: Vec<Vec<ExportTraceServiceRequest>> = runners
        .iter()
        .map(|runner| {
            (0..per_runner)
                .step_by(batch as usize)
                .map(|first| {
                    let n = batch.min(per_runner - first);
                    request(vec![runner.resource_spans(first, n)])
                })
                .collect()
        })
        .collect();
    // ... and drain at once when it is back.
    stack.start_collector().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let sender = runtime.block_on(Sender::connect(&stack, Transport::Http));
    runtime.block_on(async {
        futures::future::join_all(buffers.into_iter().map(|requests| {
            let sender = &sender;
            async move {
                for r in requests {
                    sender.send(r).await;
                }
            }
        }))
        .await;
    });
    let expected: BTreeMap<String, (Source, u64)> = runners
        .into_iter()
        .map(|s| (s.label.clone(), (s, per_runner)))
        .collect();
    let (landed, want) = settle(&clickhouse, &expected);
    assert_eq!(landed, want, "after the drain");
}

/// At least a million spans from concurrent senders: every span sent is
/// stored once, with its resource. Prints the rate at which they landed
/// (timing claims live in `cargo xtask bench`; this only measures).
#[test]
fn a_million_spans_from_concurrent_senders_are_all_stored_once() {
    const SENDERS: usize = 4;
    const REQUESTS_PER_SENDER: u64 = 250;
    const SPANS_PER_REQUEST: u64 = 1_000;
    let total = SENDERS as u64 * REQUESTS_PER_SENDER * SPANS_PER_REQUEST;

    let stack = Stack::start(StackOptions::isolated()).unwrap();
    let clickhouse = stack.clickhouse();
    let senders: Vec<(Source, Transport)> = (0..SENDERS)
        .map(|i| {
            let transport = if i % 2 == 0 {
                Transport::Http
            } else {
                Transport::Grpc
            };
            (Source::new(&format!("sustained/{i}"), true), transport)
        })
        .collect();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let started = Instant::now();
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for (source, transport) in &senders {
            let sender = Sender::connect(&stack, *transport).await;
            let source = source.clone();
            tasks.push(tokio::spawn(async move {
                for r in 0..REQUESTS_PER_SENDER {
                    let first = r * SPANS_PER_REQUEST;
                    let request = request(vec![source.resource_spans(first, SPANS_PER_REQUEST)]);
                    sender.send(request).await;
                }
            }));
        }
        for task in futures::future::join_all(tasks).await {
            task.expect("a sender failed");
        }
    });
    let sent_in = started.elapsed();
    let landed = wait_for("a million spans to land", SUSTAINED_DEADLINE, || {
        let n = clickhouse.count("SELECT count() FROM otel.otel_traces")?;
        Ok((n >= total).then_some(n))
    });
    let landed_in = started.elapsed();
    let accounting = clickhouse
        .json_rows(
            "SELECT count() AS rows, uniqExact(TraceId, SpanId) AS distinct_spans, \
             countIf(ServiceName = '' OR empty(ResourceAttributes)) AS without_resource \
             FROM otel.otel_traces",
        )
        .unwrap();
    let summary = format!(
        "rows={} distinct={} without_resource={}",
        text(&accounting[0]["rows"]),
        text(&accounting[0]["distinct_spans"]),
        text(&accounting[0]["without_resource"]),
    );
    println!(
        "sustained: {total} spans sent in {:.1} s by {SENDERS} senders; landed in {:.1} s: {:.0} spans/s landed ({summary})",
        sent_in.as_secs_f64(),
        landed_in.as_secs_f64(),
        total as f64 / landed_in.as_secs_f64()
    );
    assert_eq!(
        summary,
        format!("rows={total} distinct={total} without_resource=0"),
        "sent {total} spans (landing: {landed:?})"
    );
}

/// A JSONEachRow value as text (64-bit integers may come quoted or not).
fn text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
