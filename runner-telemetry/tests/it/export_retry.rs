//! The export client against scripted collectors: throttling, backoff,
//! permanent errors, stalls, partial success, a full buffer, `max_age`, an
//! outage across jobs, and gRPC status codes. Every test checks the
//! accounting invariant.

use std::collections::HashSet;
use std::time::Duration;

use crate::export_support::*;
use conformance::doubles::eventually;
use conformance::doubles::otlp::closed_port;
use conformance::log_lines::job_line;
use runner_telemetry::negotiate::Transport;
use runner_telemetry::{DropReason, RunnerTelemetry};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured_and_the_span_delivered_once() {
    let throttled = Answer::retry_after(503, "1");
    let collector = scripted_collector(vec![throttled.clone(), throttled, Answer::Ok]).await;
    let telemetry = http_telemetry(&collector);

    let report = flush_v1_job(&telemetry, 1).await;
    assert_eq!(
        (report.spans, report.exported(), report.dropped()),
        (1, 1, 0),
        "{report}"
    );
    assert_report(&report);

    let received = collector.received();
    let statuses: Vec<u16> = received.iter().map(|r| r.answer.http_status()).collect();
    assert_eq!(statuses, [503, 503, 200]);
    // Each retry waited the server's second, not the 50 ms backoff.
    for gap in gaps(&received) {
        assert!(gap >= Duration::from_millis(1000), "{gap:?}");
    }
    // The same span each time, accepted exactly once.
    let delivered: Vec<_> = received
        .iter()
        .filter(|r| r.answer.accepts())
        .flat_map(|r| r.span_ids())
        .collect();
    assert_eq!(delivered.len(), 1);
    assert!(received.iter().all(|r| r.span_ids() == delivered));
    assert_eq!(delivered[0].1, "job_execution");
    assert_invariant(&telemetry);
    let m = telemetry.metrics().snapshot();
    assert_eq!((m.exported, m.export_errors), (1, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_without_retry_after_backs_off_exponentially() {
    let collector = scripted_collector(vec![Answer::status(429); 5]).await;
    let mut settings = http_settings(&collector);
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
    let collector = scripted_collector(vec![Answer::with_body(400, "bad span")]).await;
    let telemetry = http_telemetry(&collector);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_collector_costs_one_timeout_per_attempt() {
    // Every request is read and never answered.
    let collector = Collector::start().await;
    collector.otherwise(Answer::Stall);
    let mut settings = http_settings(&collector);
    settings.export_timeout = Duration::from_millis(300);
    settings.flush_timeout = Duration::from_millis(1500);
    let telemetry = RunnerTelemetry::new(settings, runner());

    let started = tokio::time::Instant::now();
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
    // Each attempt gave up after 300 ms and a new one was sent: several
    // attempts fit in the 1.5 s, not one hung request.
    let attempts = collector.received().len();
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
    let collector = Collector::start().await;
    collector.answer_with(|request| {
        let rejected = request
            .span_ids()
            .iter()
            .filter(|(_, name)| name == "oversized")
            .count();
        match rejected {
            0 => Answer::Ok,
            n => Answer::partial_success(n as i64, "span too large"),
        }
    });
    let telemetry = http_telemetry(&collector);
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
    let url = format!("http://{}/v1/traces", closed_port());
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
    let url = format!("http://{}/v1/traces", closed_port());
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
    let collector = Collector::start().await;
    collector.otherwise(Answer::status(503));
    let mut settings = http_settings(&collector);
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
    // The collector answers 503 until it is told to accept.
    let collector = Collector::start().await;
    collector.otherwise(Answer::status(503));
    let mut settings = http_settings(&collector);
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
    collector.otherwise(Answer::Ok);

    // The backoff is at most a second: everything arrives soon after.
    let m = eventually("the 10 spans exported", Duration::from_secs(10), || {
        let m = telemetry.metrics().snapshot();
        std::future::ready((m.exported >= 10).then_some(m))
    })
    .await;
    assert_eq!((m.exported, m.dropped_total(), m.buffer_spans), (10, 0, 0));
    let delivered: Vec<String> = collector
        .received()
        .iter()
        .filter(|r| r.answer.accepts())
        .flat_map(|r| r.span_ids().into_iter().map(|(id, _)| id))
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

/// A collector answering `script` over gRPC, then `OK`; its endpoint.
async fn grpc_collector(script: Vec<Answer>) -> (String, Collector) {
    let collector = scripted_collector(script).await;
    (collector.grpc_endpoint(), collector)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unavailable_is_retried_and_resource_exhausted_only_with_retry_info() {
    let (url, collector) = grpc_collector(vec![
        Answer::grpc(tonic::Code::Unavailable, "restarting"),
        Answer::resource_exhausted_retry_info("collector memory limit", Duration::from_millis(700)),
    ])
    .await;
    let telemetry = RunnerTelemetry::new(settings(Transport::Grpc, &url), runner());
    let report = flush_v1_job(&telemetry, 20).await;
    assert_eq!((report.exported(), report.dropped()), (1, 0), "{report}");
    assert_report(&report);
    let calls = collector.received();
    assert_eq!(calls.len(), 3, "{calls:?}");
    // UNAVAILABLE: the 50 ms backoff; RESOURCE_EXHAUSTED: the server's 700 ms
    // (a lower bound, and the order of the two waits, not a ceiling).
    let (backoff, told) = (calls[1].at - calls[0].at, calls[2].at - calls[1].at);
    assert!(told >= Duration::from_millis(700), "{calls:?}");
    assert!(backoff < told, "{calls:?}");
    assert_invariant(&telemetry);

    // Without RetryInfo, RESOURCE_EXHAUSTED is permanent.
    let (url, collector) = grpc_collector(vec![Answer::grpc(
        tonic::Code::ResourceExhausted,
        "too big",
    )])
    .await;
    let telemetry = RunnerTelemetry::new(settings(Transport::Grpc, &url), runner());
    let report = flush_v1_job(&telemetry, 21).await;
    assert_eq!(
        report.dropped_for(DropReason::PermanentError),
        1,
        "{report}"
    );
    assert_eq!(collector.received().len(), 1);
    assert_eq!(
        report.endpoints[0].error.as_deref(),
        Some("gRPC ResourceExhausted: too big")
    );
    assert_report(&report);
    assert_invariant(&telemetry);

    // Other codes are permanent too.
    let (url, collector) =
        grpc_collector(vec![Answer::grpc(tonic::Code::InvalidArgument, "bad")]).await;
    let telemetry = RunnerTelemetry::new(settings(Transport::Grpc, &url), runner());
    let report = flush_v1_job(&telemetry, 22).await;
    assert_eq!(report.dropped_for(DropReason::PermanentError), 1);
    assert_eq!(collector.received().len(), 1);
    assert_invariant(&telemetry);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_connection_is_retried_and_the_span_delivered_once() {
    // The first request is read and its connection closed without an answer.
    let collector = scripted_collector(vec![Answer::Reset]).await;
    let telemetry = http_telemetry(&collector);
    let report = flush_v1_job(&telemetry, 30).await;
    assert_eq!((report.exported(), report.dropped()), (1, 0), "{report}");
    assert_report(&report);
    let received = collector.received();
    let answers: Vec<&Answer> = received.iter().map(|r| &r.answer).collect();
    assert_eq!(answers, [&Answer::Reset, &Answer::Ok]);
    assert_eq!(received[0].span_ids(), received[1].span_ids());
    assert_eq!(telemetry.metrics().snapshot().export_errors, 1);
    assert_invariant(&telemetry);
}
