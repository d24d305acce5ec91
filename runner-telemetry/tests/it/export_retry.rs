//! The export client against scripted collectors: throttling, backoff,
//! permanent errors, stalls, partial success, a full buffer, `max_age`, an
//! outage across jobs, and gRPC status codes. Every test checks the
//! accounting invariant.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::export_support::*;
use conformance::log_lines::job_line;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;
use runner_telemetry::negotiate::Transport;
use runner_telemetry::{DropReason, RunnerTelemetry};
use wiremock::ResponseTemplate;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured_and_the_span_delivered_once() {
    let throttled = ResponseTemplate::new(503).insert_header("Retry-After", "1");
    let (server, collector) = scripted_collector(vec![
        (503, throttled.clone()),
        (503, throttled),
        answer(200),
    ])
    .await;
    let telemetry = http_telemetry(&server);

    let report = flush_v1_job(&telemetry, 1).await;
    assert_eq!(
        (report.spans, report.exported(), report.dropped()),
        (1, 1, 0),
        "{report}"
    );
    assert_report(&report);

    let received = collector.received();
    let statuses: Vec<u16> = received.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [503, 503, 200]);
    // Each retry waited the server's second, not the 50 ms backoff.
    for gap in gaps(&received) {
        assert!(gap >= Duration::from_millis(1000), "{gap:?}");
    }
    // The same span each time, accepted exactly once.
    let delivered: Vec<_> = received
        .iter()
        .filter(|r| r.status == 200)
        .flat_map(|r| r.spans.clone())
        .collect();
    assert_eq!(delivered.len(), 1);
    assert!(received.iter().all(|r| r.spans == delivered));
    assert_eq!(delivered[0].1, "job_execution");
    assert_invariant(&telemetry);
    let m = telemetry.metrics().snapshot();
    assert_eq!((m.exported, m.export_errors), (1, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_without_retry_after_backs_off_exponentially() {
    let mut script = vec![answer(429); 5];
    script.push(answer(200));
    let (server, collector) = scripted_collector(script).await;
    let mut settings = http_settings(&server);
    settings.buffer.initial_backoff = Duration::from_millis(100);
    settings.buffer.max_backoff = Duration::from_secs(5);
    let telemetry = RunnerTelemetry::new(settings, runner());

    // `run_job` checks that the job itself did not wait.
    let report = flush_v1_job(&telemetry, 2).await;
    assert_eq!((report.exported(), report.dropped()), (1, 0), "{report}");
    assert_report(&report);

    let received = collector.received();
    assert_eq!(received.len(), 6);
    let gaps = gaps(&received);
    // Steps of 100, 200, 400, 800, 1600 ms with equal jitter: each delay is
    // in the upper half of its step, so none is shorter than the one before.
    // (The slack absorbs request latency on a busy machine.)
    let slack = Duration::from_millis(50);
    for pair in gaps.windows(2) {
        assert!(pair[1] + slack >= pair[0], "{gaps:?}");
    }
    assert!(gaps[4] >= Duration::from_millis(800), "{gaps:?}");
    assert!(gaps[4] > gaps[0] * 2, "{gaps:?}");
    assert_invariant(&telemetry);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_request_is_permanent_and_not_retried() {
    let (server, collector) = scripted_collector(vec![answer_with_body(400, "bad span")]).await;
    let telemetry = http_telemetry(&server);
    let report = flush_v1_job(&telemetry, 3).await;
    assert_eq!(
        (
            report.exported(),
            report.dropped_for(DropReason::PermanentError)
        ),
        (0, 1),
        "{report}"
    );
    assert!(!report.timed_out);
    assert_report(&report);
    let error = report.endpoints[0].error.clone().unwrap();
    assert!(
        error.starts_with("HTTP 400 Bad Request: bad span"),
        "{error}"
    );
    // Nothing is left to retry: the one request is all there will be.
    assert_eq!(collector.received().len(), 1);
    let m = telemetry.metrics().snapshot();
    assert_eq!(
        (
            m.dropped(DropReason::PermanentError),
            m.export_errors,
            m.buffer_spans
        ),
        (1, 1, 0)
    );
    assert!(
        job_line(&logs(), 3, "Telemetry export to").is_some(),
        "{}",
        logs()
    );
    assert_invariant(&telemetry);
}

/// A TCP server that accepts connections and never answers; counts them.
async fn stalled_server() -> (SocketAddr, Arc<AtomicUsize>) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_collector_costs_one_timeout_per_attempt() {
    let (addr, accepted) = stalled_server().await;
    let mut settings = settings(Transport::HttpProtobuf, &format!("http://{addr}/v1/traces"));
    settings.export_timeout = Duration::from_millis(300);
    settings.flush_timeout = Duration::from_millis(1500);
    let telemetry = RunnerTelemetry::new(settings, runner());

    let started = Instant::now();
    let report = telemetry
        .flush_job(run_job(&telemetry, 4, &v1_payload(), &["step_script"]))
        .await;
    let elapsed = started.elapsed();
    assert!(report.timed_out, "{report}");
    assert_eq!((report.exported(), report.buffered()), (0, 2), "{report}");
    // The flush waited for its deadline (a lower bound: no wall-clock
    // ceiling a busy machine could miss).
    assert!(elapsed >= Duration::from_millis(1400), "{elapsed:?}");
    assert_report(&report);
    // Each attempt gave up after 300 ms and a new one opened a connection:
    // several attempts fit in the 1.5 s, not one hung request.
    let attempts = accepted.load(Ordering::SeqCst);
    assert!(attempts >= 3, "{attempts} attempts");
    let error = report.endpoints[0].error.clone().unwrap();
    assert_eq!(error, "no answer within 300ms");

    let stopped = telemetry.shutdown().await;
    assert_eq!(stopped.dropped, 2);
    assert_invariant(&telemetry);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_success_counts_the_rejected_spans() {
    // The collector rejects the spans named `oversized`, however they are
    // batched.
    let server = wiremock::MockServer::start().await;
    let recorder = Recorder::default();
    let seen = recorder.received.clone();
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .respond_with(move |request: &wiremock::Request| {
            let spans = decode_spans(&request.body);
            let rejected = spans.iter().filter(|(_, n)| n == "oversized").count();
            seen.lock().unwrap().push(Received {
                at: Instant::now(),
                headers: Default::default(),
                spans,
                status: 200,
            });
            let response = ExportTraceServiceResponse {
                partial_success: (rejected > 0).then(|| ExportTracePartialSuccess {
                    rejected_spans: rejected as i64,
                    error_message: "span too large".into(),
                }),
            };
            ResponseTemplate::new(200).set_body_bytes(response.encode_to_vec())
        })
        .mount(&server)
        .await;
    let telemetry = http_telemetry(&server);
    let report = telemetry
        .flush_job(run_job(
            &telemetry,
            5,
            &v1_payload(),
            &["oversized", "get_sources", "oversized"],
        ))
        .await;
    assert_eq!(
        (
            report.spans,
            report.exported(),
            report.dropped_for(DropReason::Rejected)
        ),
        (4, 2, 2),
        "{report}"
    );
    assert_report(&report);
    assert!(
        report.to_string().contains("dropped_by=rejected=2"),
        "{report}"
    );
    assert!(
        job_line(&logs(), 5, "Telemetry collector").is_some(),
        "{}",
        logs()
    );
    let m = telemetry.metrics().snapshot();
    assert_eq!((m.exported, m.dropped(DropReason::Rejected)), (2, 2));
    assert_invariant(&telemetry);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_drops_new_spans_without_blocking() {
    // Nothing listens: every span stays buffered.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1/traces", closed.local_addr().unwrap());
    drop(closed);
    let mut settings = settings(Transport::HttpProtobuf, &url);
    settings.buffer.max_spans = 3;
    settings.flush_timeout = Duration::from_millis(200);
    let telemetry = RunnerTelemetry::new(settings, runner());

    let report = telemetry
        .flush_job(run_job(&telemetry, 6, &v1_payload(), &["a", "b", "c", "d"]))
        .await;
    // Drop newest: the first three stay, the last two (`d` and
    // `job_execution`) are refused when they end.
    assert_eq!(
        (
            report.spans,
            report.buffered(),
            report.dropped_for(DropReason::QueueFull)
        ),
        (5, 3, 2),
        "{report}"
    );
    assert_report(&report);
    assert_eq!(telemetry.hub().buffered().0, 3);

    // A byte bound: a span bigger than the room left is refused too.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1/traces", closed.local_addr().unwrap());
    drop(closed);
    let mut settings = crate::export_support::settings(Transport::HttpProtobuf, &url);
    settings.buffer.max_bytes = 600;
    settings.flush_timeout = Duration::from_millis(200);
    let small = RunnerTelemetry::new(settings, runner());
    let report = small
        .flush_job(run_job(&small, 7, &v1_payload(), &["x", "y", "z"]))
        .await;
    assert!(report.dropped_for(DropReason::QueueFull) >= 1, "{report}");
    assert!(report.buffered() >= 1, "{report}");
    let (_, bytes) = small.hub().buffered();
    assert!(bytes <= 600, "{bytes}");
    assert_report(&report);

    for telemetry in [&telemetry, &small] {
        telemetry.shutdown().await;
        assert_invariant(telemetry);
        assert_eq!(telemetry.metrics().snapshot().buffer_spans, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_older_than_max_age_are_dropped_and_counted() {
    let (server, collector) = scripted_collector(vec![answer(503)]).await;
    let mut settings = http_settings(&server);
    settings.buffer.max_age = Duration::from_millis(600);
    settings.flush_timeout = Duration::from_secs(5);
    let telemetry = RunnerTelemetry::new(settings, runner());
    let report = telemetry
        .flush_job(run_job(&telemetry, 8, &v1_payload(), &["a", "b"]))
        .await;
    // Settled by age, well before the flush deadline.
    assert!(!report.timed_out, "{report}");
    assert_eq!(
        (report.exported(), report.dropped_for(DropReason::MaxAge)),
        (0, 3),
        "{report}"
    );
    assert_report(&report);
    assert!(collector.received().len() >= 2);
    let m = telemetry.metrics().snapshot();
    assert_eq!((m.dropped(DropReason::MaxAge), m.buffer_spans), (3, 0));
    assert_invariant(&telemetry);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_of_many_jobs_survive_an_outage_and_arrive_once() {
    // The collector answers 503 until `up` is set.
    let server = wiremock::MockServer::start().await;
    let up = Arc::new(Mutex::new(false));
    let recorder = Recorder::default();
    let (seen, is_up) = (recorder.received.clone(), up.clone());
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .respond_with(move |request: &wiremock::Request| {
            let status = if *is_up.lock().unwrap() { 200 } else { 503 };
            seen.lock().unwrap().push(Received {
                at: Instant::now(),
                headers: Default::default(),
                spans: decode_spans(&request.body),
                status,
            });
            ResponseTemplate::new(status)
        })
        .mount(&server)
        .await;
    let mut settings = http_settings(&server);
    settings.flush_timeout = Duration::from_millis(100);
    let telemetry = RunnerTelemetry::new(settings, runner());

    let mut reports = Vec::new();
    for job in 10..15 {
        let report = telemetry
            .flush_job(run_job(&telemetry, job, &v1_payload(), &["step_script"]))
            .await;
        assert_eq!(report.exported(), 0, "{report}");
        assert_report(&report);
        reports.push(report);
    }
    assert_eq!(telemetry.hub().buffered().0, 10);
    *up.lock().unwrap() = true;

    // The backoff is at most a second: everything arrives soon after.
    let until = Instant::now() + Duration::from_secs(10);
    while telemetry.metrics().snapshot().exported < 10 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = telemetry.metrics().snapshot();
    assert_eq!((m.exported, m.dropped_total(), m.buffer_spans), (10, 0, 0));
    let delivered: Vec<String> = recorder
        .received()
        .iter()
        .filter(|r| r.status == 200)
        .flat_map(|r| r.spans.iter().map(|(id, _)| id.clone()))
        .collect();
    let unique: HashSet<&String> = delivered.iter().collect();
    assert_eq!((delivered.len(), unique.len()), (10, 10), "none twice");
    for job in 10..15 {
        assert!(
            job_line(
                &logs(),
                job,
                "Telemetry settled spans=2 exported=2 dropped=0"
            )
            .is_some(),
            "{}",
            logs()
        );
    }
    assert_invariant(&telemetry);
}

/// A gRPC collector answering from a script of statuses (`None` = OK).
#[derive(Clone)]
struct ScriptedGrpc {
    script: Arc<Vec<Option<tonic::Status>>>,
    calls: Arc<Mutex<Vec<(Instant, usize)>>>,
}

#[tonic::async_trait]
impl TraceService for ScriptedGrpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|rs| &rs.scope_spans)
            .map(|ss| ss.spans.len())
            .sum();
        let n = {
            let mut calls = self.calls.lock().unwrap();
            calls.push((Instant::now(), spans));
            calls.len() - 1
        };
        match &self.script[n.min(self.script.len() - 1)] {
            None => Ok(tonic::Response::new(ExportTraceServiceResponse::default())),
            Some(status) => Err(status.clone()),
        }
    }
}

async fn grpc_collector(script: Vec<Option<tonic::Status>>) -> (String, ScriptedGrpc) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = ScriptedGrpc {
        script: Arc::new(script),
        calls: Arc::default(),
    };
    let server = TraceServiceServer::new(service.clone());
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(server)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    (format!("http://{addr}"), service)
}

fn resource_exhausted_with_retry_info(delay: Duration) -> tonic::Status {
    use tonic_types::{ErrorDetails, StatusExt};
    tonic::Status::with_error_details(
        tonic::Code::ResourceExhausted,
        "collector memory limit",
        ErrorDetails::with_retry_info(Some(delay)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unavailable_is_retried_and_resource_exhausted_only_with_retry_info() {
    let (url, collector) = grpc_collector(vec![
        Some(tonic::Status::unavailable("restarting")),
        Some(resource_exhausted_with_retry_info(Duration::from_millis(
            700,
        ))),
        None,
    ])
    .await;
    let telemetry = RunnerTelemetry::new(settings(Transport::Grpc, &url), runner());
    let report = flush_v1_job(&telemetry, 20).await;
    assert_eq!((report.exported(), report.dropped()), (1, 0), "{report}");
    assert_report(&report);
    let calls = collector.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 3, "{calls:?}");
    // UNAVAILABLE: the 50 ms backoff; RESOURCE_EXHAUSTED: the server's 700 ms
    // (a lower bound, and the order of the two waits, not a ceiling).
    let (backoff, told) = (calls[1].0 - calls[0].0, calls[2].0 - calls[1].0);
    assert!(told >= Duration::from_millis(700), "{calls:?}");
    assert!(backoff < told, "{calls:?}");
    assert_invariant(&telemetry);

    // Without RetryInfo, RESOURCE_EXHAUSTED is permanent.
    let (url, collector) =
        grpc_collector(vec![Some(tonic::Status::resource_exhausted("too big"))]).await;
    let telemetry = RunnerTelemetry::new(settings(Transport::Grpc, &url), runner());
    let report = flush_v1_job(&telemetry, 21).await;
    assert_eq!(
        report.dropped_for(DropReason::PermanentError),
        1,
        "{report}"
    );
    assert_eq!(collector.calls.lock().unwrap().len(), 1);
    assert_eq!(
        report.endpoints[0].error.as_deref(),
        Some("gRPC ResourceExhausted: too big")
    );
    assert_report(&report);
    assert_invariant(&telemetry);

    // Other codes are permanent too.
    let (url, collector) = grpc_collector(vec![Some(tonic::Status::invalid_argument("bad"))]).await;
    let telemetry = RunnerTelemetry::new(settings(Transport::Grpc, &url), runner());
    let report = flush_v1_job(&telemetry, 22).await;
    assert_eq!(report.dropped_for(DropReason::PermanentError), 1);
    assert_eq!(collector.calls.lock().unwrap().len(), 1);
    assert_invariant(&telemetry);
}
