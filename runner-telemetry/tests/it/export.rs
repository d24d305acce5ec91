//! `job_execution` spans exported to in-test OTLP collectors, over HTTP and
//! gRPC, and what happens when the collector is down or stalled.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use conformance::doubles::otlp::{
    closed_port, grpc_collector, http_collector, stalled_server, Collector, ReceivedSpan,
};
use opentelemetry::KeyValue;
use runner_telemetry::config::{ExportSettings, StaticEndpoint};
use runner_telemetry::negotiate::Transport;
use runner_telemetry::{
    DropReason, JobOutcome, JobSpanInfo, PendingFlush, RunnerIdentity, RunnerTelemetry, SpanOutcome,
};
use serde_json::{json, Value};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";
const DEADLINE: Duration = Duration::from_secs(10);

fn settings(transport: Transport, url: &str) -> ExportSettings {
    ExportSettings {
        endpoint: StaticEndpoint {
            transport,
            url: url.to_string(),
            headers: vec![("x-tenant".into(), "ci".into())],
        },
        export_timeout: Duration::from_secs(2),
        ..ExportSettings::default()
    }
}

fn runner() -> RunnerIdentity {
    RunnerIdentity {
        id: Some(17),
        name: "test-runner".into(),
        executor: "shell".into(),
    }
}

fn job_info() -> JobSpanInfo {
    JobSpanInfo {
        job_id: 42,
        job_name: "rspec 1/2".into(),
        stage: "test".into(),
        pipeline_id: Some(1001),
        pipeline_source: Some("push".into()),
        project_id: Some(7),
        project_path: Some("group/project".into()),
        git_ref: Some("main".into()),
        sha: Some("0123456789abcdef".into()),
        repo_url: Some(
            "https://gitlab-ci-token:glcbt-SECRET@gitlab.example.com/group/project.git".into(),
        ),
        job_url: Some("http://gitlab.example.com/group/project/-/jobs/42".into()),
    }
}

fn v1_payload() -> Value {
    json!({"id": 42, "features": {"job_telemetry": true},
           "trace_context": {"trace_id": TRACE_ID, "parent_span_id": PARENT}})
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64
}

/// Whether every request `collector` received carried the static
/// endpoint's header.
fn sent_static_headers(collector: &Collector) -> bool {
    collector
        .headers()
        .iter()
        .all(|h| h.get("x-tenant").map(String::as_str) == Some("ci"))
}

fn find<'a>(spans: &'a [ReceivedSpan], name: &str) -> &'a ReceivedSpan {
    spans
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no span `{name}` in {spans:#?}"))
}

/// Runs a v1 job that ends one `step_script` child and finishes.
fn finish_step_script_job(telemetry: &RunnerTelemetry) -> PendingFlush {
    let mut job = telemetry.start_job(&v1_payload(), &job_info(), SystemTime::now());
    job.child("step_script", vec![]).end(SpanOutcome::Ok);
    job.finish(&JobOutcome::Success, SystemTime::now()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_job_span_over_http_has_the_contract_shape() {
    let collector = http_collector().await;
    let telemetry = RunnerTelemetry::new(
        settings(Transport::HttpProtobuf, &collector.http_endpoint()),
        runner(),
    );
    let start = SystemTime::now() - Duration::from_secs(3);
    let end = SystemTime::now();

    let mut job = telemetry.start_job(&v1_payload(), &job_info(), start);
    assert!(job.is_enabled());
    let mut child = job.child(
        "get_sources",
        vec![KeyValue::new("ci.git.operation", "clone")],
    );
    child.set_attribute(KeyValue::new("ci.stage.status", "failed"));
    child.end(SpanOutcome::Error("git clone failed".into()));
    let pending = job
        .finish(
            &JobOutcome::Failed {
                failure_reason: "script_failure".into(),
                exit_code: Some(3),
            },
            end,
        )
        .expect("enabled telemetry has a flush");
    let report = telemetry.flush_job(pending).await;
    assert_eq!(
        (report.spans, report.exported(), report.dropped()),
        (2, 2, 0),
        "{report}"
    );

    let spans = collector.wait_for(DEADLINE, |s| s.len() >= 2).await;
    let span = find(&spans, "job_execution");
    assert_eq!(span.trace_id, TRACE_ID);
    assert_eq!(span.parent_span_id, PARENT);
    assert_eq!(span.start_ns, nanos(start));
    assert_eq!(span.end_ns, nanos(end));
    assert_eq!(span.scope_name, "gitlab-ci-runner");
    assert_eq!(span.scope_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(span.resource["service.name"], "str:gitlab-ci-runner");
    assert_eq!(span.resource["ci.job.id"], "int:42");
    assert_eq!(span.resource["ci.pipeline.id"], "int:1001");
    assert_eq!(span.status_code, 2, "status Error");
    assert_eq!(span.status_message, "script_failure: exit code 3");
    let expected = [
        ("ci.job.id", "int:42"),
        ("ci.pipeline.id", "int:1001"),
        ("ci.project.id", "int:7"),
        ("ci.pipeline.source", "str:push"),
        ("ci.runner.id", "int:17"),
        ("ci.runner.executor", "str:shell"),
        ("ci.job.name", "str:rspec 1/2"),
        ("ci.job.stage", "str:test"),
        ("ci.job.status", "str:failed"),
        ("ci.job.failure_reason", "str:script_failure"),
        ("ci.job.exit_code", "int:3"),
        ("cicd.pipeline.run.id", "str:1001"),
        ("cicd.pipeline.task.run.id", "str:42"),
        ("cicd.pipeline.task.name", "str:rspec 1/2"),
        ("cicd.pipeline.task.run.result", "str:failure"),
        ("cicd.pipeline.name", "str:group/project"),
        (
            "cicd.pipeline.task.run.url.full",
            "str:http://gitlab.example.com/group/project/-/jobs/42",
        ),
        ("cicd.worker.id", "str:17"),
        ("cicd.worker.name", "str:test-runner"),
        ("vcs.ref.head.name", "str:main"),
        ("vcs.ref.head.revision", "str:0123456789abcdef"),
        (
            "vcs.repository.url.full",
            "str:https://gitlab.example.com/group/project.git",
        ),
        ("error.type", "str:script_failure"),
    ];
    for (key, value) in expected {
        assert_eq!(span.attr(key), Some(value), "attribute {key}");
    }
    assert!(
        !format!("{spans:?}").contains("glcbt-SECRET"),
        "a credential reached a span"
    );

    let child = find(&spans, "get_sources");
    assert_eq!(child.trace_id, TRACE_ID);
    assert_eq!(child.parent_span_id, span.span_id);
    assert_eq!(child.status_code, 2);
    assert_eq!(child.attr("ci.git.operation"), Some("str:clone"));
    assert_eq!(child.attr("ci.stage.status"), Some("str:failed"));

    // The static endpoint's headers were sent.
    assert!(sent_static_headers(&collector), "{:?}", collector.headers());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_spans_leave_while_the_job_still_runs() {
    let collector = http_collector().await;
    let telemetry = RunnerTelemetry::new(
        settings(Transport::HttpProtobuf, &collector.http_endpoint()),
        runner(),
    );
    let mut job = telemetry.start_job(&v1_payload(), &job_info(), SystemTime::now());
    job.child("prepare_executor", vec![]).end(SpanOutcome::Ok);

    let spans = collector.wait_for(DEADLINE, |s| !s.is_empty()).await;
    assert_eq!(spans.len(), 1, "{spans:#?}");
    assert_eq!(spans[0].name, "prepare_executor");

    let pending = job.finish(&JobOutcome::Success, SystemTime::now()).unwrap();
    let report = telemetry.flush_job(pending).await;
    assert_eq!((report.spans, report.exported()), (2, 2));
    let spans = collector.wait_for(DEADLINE, |s| s.len() >= 2).await;
    let job_span = find(&spans, "job_execution");
    assert_eq!(job_span.status_code, 1, "status Ok");
    assert_eq!(job_span.attr("ci.job.status"), Some("str:success"));
    assert_eq!(
        job_span.attr("cicd.pipeline.task.run.result"),
        Some("str:success")
    );
    assert_eq!(job_span.attr("error.type"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_payload_endpoint_over_grpc_replaces_the_static_one() {
    let collector = grpc_collector().await;
    // The static endpoint goes nowhere: only the payload's may be used.
    let static_url = format!("http://{}/v1/traces", closed_port());
    let telemetry = RunnerTelemetry::new(settings(Transport::HttpProtobuf, &static_url), runner());
    let payload = json!({"id": 42, "features": {"tracing": {
        "trace_id": TRACE_ID, "span_parent_id": PARENT,
        "otel_endpoints": [{"url": format!("grpc://{}", collector.addr.unwrap())}]}}});

    let job = telemetry.start_job(&payload, &job_info(), SystemTime::now());
    assert!(job.is_enabled());
    let pending = job
        .finish(&JobOutcome::TimedOut, SystemTime::now())
        .unwrap();
    let report = telemetry.flush_job(pending).await;
    assert_eq!((report.exported(), report.dropped()), (1, 0), "{report}");

    let spans = collector.wait_for(DEADLINE, |s| !s.is_empty()).await;
    let span = find(&spans, "job_execution");
    assert_eq!(span.trace_id, TRACE_ID);
    assert_eq!(span.parent_span_id, PARENT);
    assert_eq!(span.resource["service.name"], "str:gitlab-ci-runner");
    assert_eq!(span.attr("ci.job.status"), Some("str:timedout"));
    assert_eq!(
        span.attr("cicd.pipeline.task.run.result"),
        Some("str:timeout")
    );
    assert_eq!(span.status_code, 2);
    // Static headers are not sent to payload endpoints.
    assert!(collector
        .headers()
        .iter()
        .all(|h| !h.contains_key("x-tenant")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_grpc_endpoint_and_custom_service_name() {
    let collector = grpc_collector().await;
    let mut settings = settings(Transport::Grpc, &collector.grpc_endpoint());
    settings.service_name = "my-runner-fleet".into();
    let telemetry = RunnerTelemetry::new(settings, runner());
    let job = telemetry.start_job(&v1_payload(), &job_info(), SystemTime::now());
    let pending = job
        .finish(&JobOutcome::Canceled, SystemTime::now())
        .unwrap();
    let report = telemetry.flush_job(pending).await;
    assert_eq!(report.exported(), 1, "{report}");
    let spans = collector.wait_for(DEADLINE, |s| !s.is_empty()).await;
    let span = find(&spans, "job_execution");
    assert_eq!(span.resource["service.name"], "str:my-runner-fleet");
    assert_eq!(span.attr("ci.job.status"), Some("str:canceled"));
    assert_eq!(
        span.attr("cicd.pipeline.task.run.result"),
        Some("str:cancellation")
    );
    assert!(sent_static_headers(&collector), "{:?}", collector.headers());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_payload_endpoints_both_receive_the_span() {
    let first = http_collector().await;
    let second = grpc_collector().await;
    let telemetry = RunnerTelemetry::new(ExportSettings::default(), runner());
    let payload = json!({"features": {"tracing": {
        "trace_id": TRACE_ID, "span_parent_id": PARENT,
        "otel_endpoints": [
            {"url": format!("http://{}/custom/otlp/path", first.addr.unwrap())},
            {"url": format!("grpc://{}", second.addr.unwrap())}]}}});
    let job = telemetry.start_job(&payload, &job_info(), SystemTime::now());
    let report = telemetry
        .flush_job(job.finish(&JobOutcome::Success, SystemTime::now()).unwrap())
        .await;
    assert_eq!(
        (report.spans, report.exported(), report.dropped()),
        (1, 2, 0),
        "{report}"
    );
    assert_eq!(first.wait_for(DEADLINE, |s| !s.is_empty()).await.len(), 1);
    assert_eq!(second.wait_for(DEADLINE, |s| !s.is_empty()).await.len(), 1);
    // OTLP/HTTP keeps the payload URL's path.
    assert_eq!(first.paths(), vec!["/custom/otlp/path".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_collector_costs_the_job_nothing_and_is_accounted() {
    let url = format!("http://{}/v1/traces", closed_port());
    let mut settings = settings(Transport::HttpProtobuf, &url);
    settings.flush_timeout = Duration::from_millis(500);
    settings.shutdown_timeout = Duration::from_millis(300);
    let telemetry = RunnerTelemetry::new(settings, runner());
    let pending = finish_step_script_job(&telemetry);

    // Connection refused is retried: the spans stay buffered past the
    // flush deadline, and the error is on record.
    let report = telemetry.flush_job(pending).await;
    assert_eq!(
        (
            report.spans,
            report.exported(),
            report.dropped(),
            report.buffered()
        ),
        (2, 0, 0, 2),
        "{report}"
    );
    assert!(report.timed_out && report.is_consistent(), "{report}");
    let error = report.endpoints[0].error.clone().unwrap_or_default();
    assert!(error.contains("cannot connect"), "{report}");

    // Stopping the runner gives them a final attempt, then counts them.
    let stopped = telemetry.shutdown().await;
    assert_eq!(stopped.dropped, 2);
    let metrics = telemetry.metrics().snapshot();
    assert_eq!(
        (
            metrics.spans,
            metrics.exported,
            metrics.dropped(DropReason::Shutdown),
            metrics.buffer_spans
        ),
        (2, 0, 2, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_collector_is_cut_off_at_the_flush_deadline() {
    let url = format!("http://{}/v1/traces", stalled_server().await);
    let mut settings = settings(Transport::HttpProtobuf, &url);
    // An export timeout no test would wait for: whatever returns did not
    // wait for an attempt to end.
    settings.export_timeout = Duration::from_secs(3600);
    settings.flush_timeout = Duration::from_millis(600);
    settings.shutdown_timeout = Duration::from_millis(300);
    let telemetry = RunnerTelemetry::new(settings, runner());
    // Starting, ending spans and finishing never wait for the network, even
    // with a collector that takes connections and never answers: they
    // return while the first attempt hangs.
    let pending = finish_step_script_job(&telemetry);
    let started = Instant::now();
    let report = tokio::time::timeout(DEADLINE, telemetry.flush_job(pending))
        .await
        .expect("the flush ends at its deadline, not the export timeout's");
    let elapsed = started.elapsed();
    assert!(report.timed_out, "{report}");
    assert_eq!(
        (
            report.spans,
            report.exported(),
            report.dropped(),
            report.buffered()
        ),
        (2, 0, 0, 2),
        "{report}"
    );
    // It waited for its deadline (a lower bound: no wall-clock ceiling a
    // busy machine could miss) and the attempt is still in flight: no error
    // on record yet.
    assert!(elapsed >= Duration::from_millis(550), "{elapsed:?}");
    assert_eq!(report.endpoints[0].error, None, "{report}");
    // The attempt in flight is cut at the shutdown deadline, not the hour
    // of the export timeout.
    let stopped = tokio::time::timeout(DEADLINE, telemetry.shutdown())
        .await
        .expect("shutdown ends at its deadline, not the export timeout's");
    assert_eq!(stopped.dropped, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_cases_emit_nothing() {
    let collector = http_collector().await;
    let endpoint = collector.http_endpoint();
    let telemetry = RunnerTelemetry::new(settings(Transport::HttpProtobuf, &endpoint), runner());
    let payloads = [
        json!({"id": 42}),
        json!({"features": {"job_telemetry": false}, "trace_context": {"trace_id": TRACE_ID, "parent_span_id": PARENT}}),
        json!({"features": {"job_telemetry": true}, "trace_context": {"trace_id": "xyz", "parent_span_id": PARENT}}),
        // No usable endpoint: disabled.
        json!({"features": {"tracing": {"trace_id": TRACE_ID, "span_parent_id": PARENT,
               "otel_endpoints": [{"url": "ftp://collector.example.com/v1/traces"}]}}}),
    ];
    for payload in &payloads {
        let mut job = telemetry.start_job(payload, &job_info(), SystemTime::now());
        assert!(!job.is_enabled(), "{payload}");
        job.child("get_sources", vec![]).end(SpanOutcome::Ok);
        assert!(job
            .finish(&JobOutcome::Success, SystemTime::now())
            .is_none());
    }
    // Switched off in the configuration: no telemetry even with the flag.
    let mut off = settings(Transport::HttpProtobuf, &endpoint);
    off.enabled = false;
    let job = RunnerTelemetry::new(off, runner()).start_job(
        &v1_payload(),
        &job_info(),
        SystemTime::now(),
    );
    assert!(!job.is_enabled());

    // A job that is enabled afterwards proves the collector works, so the
    // absence above means something.
    let job = telemetry.start_job(&v1_payload(), &job_info(), SystemTime::now());
    telemetry
        .flush_job(job.finish(&JobOutcome::Success, SystemTime::now()).unwrap())
        .await;
    let spans = collector.wait_for(DEADLINE, |s| !s.is_empty()).await;
    assert_eq!(spans.len(), 1, "{spans:#?}");
}

#[test]
fn no_runtime_means_disabled_not_a_panic() {
    let telemetry = RunnerTelemetry::new(ExportSettings::default(), runner());
    let job = telemetry.start_job(&v1_payload(), &job_info(), SystemTime::now());
    assert!(!job.is_enabled());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_records_over_grpc_reach_the_logs_service() {
    use runner_telemetry::logs::Stream;
    let collector = grpc_collector().await;
    let mut settings = settings(Transport::Grpc, &collector.grpc_endpoint());
    settings.logs = Some(StaticEndpoint {
        transport: Transport::Grpc,
        url: collector.grpc_endpoint(),
        headers: Vec::new(),
    });
    let telemetry = RunnerTelemetry::new(settings, runner());
    let job = telemetry.start_job(&v1_payload(), &job_info(), SystemTime::now());
    let logs = job.logs().expect("log export is on");
    logs.emit_raw_line(b"hello over gRPC", Stream::Stdout, SystemTime::now());
    let pending = job.finish(&JobOutcome::Success, SystemTime::now()).unwrap();
    let report = pending.flush(DEADLINE).await;
    let records = report.log_records.expect("a log account");
    assert!(
        records.spans >= 1 && records.exported() == records.spans,
        "{records:?}"
    );

    let received = collector.received();
    let logs_requests: Vec<_> = received.iter().filter(|r| r.logs.is_some()).collect();
    assert!(!logs_requests.is_empty(), "{received:#?}");
    assert!(logs_requests
        .iter()
        .all(|r| r.grpc && r.path == "/opentelemetry.proto.collector.logs.v1.LogsService/Export"));
    let bodies: Vec<String> = collector
        .log_records()
        .iter()
        .filter_map(|r| match r.body.as_ref()?.value.as_ref()? {
            opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s) => {
                Some(s.clone())
            }
            _ => None,
        })
        .collect();
    assert!(bodies.iter().any(|b| b == "hello over gRPC"), "{bodies:?}");
    assert!(received.iter().any(|r| r.traces.is_some() && r.grpc));
    telemetry.shutdown().await;
}
