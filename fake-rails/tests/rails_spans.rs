//! The Rails side of the trace, received by a recording OTLP/HTTP endpoint.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use common::Gitlab;
use fake_rails::ids::{self, RailsSpan};
use fake_rails::Config;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::trace::v1::{status, ResourceSpans, Span};
use prost::Message;
use tokio::sync::Notify;

#[derive(Default)]
struct Recorder {
    requests: Mutex<Vec<ExportTraceServiceRequest>>,
    content_types: Mutex<Vec<String>>,
    notify: Notify,
}

async fn record(
    State(recorder): State<Arc<Recorder>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return StatusCode::BAD_REQUEST;
    };
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    recorder.content_types.lock().unwrap().push(content_type);
    recorder.requests.lock().unwrap().push(request);
    recorder.notify.notify_waiters();
    StatusCode::OK
}

/// An in-test OTLP/HTTP endpoint that decodes and keeps every export.
async fn recording_collector() -> (SocketAddr, Arc<Recorder>) {
    let recorder = Arc::new(Recorder::default());
    let app = Router::new()
        .route("/v1/traces", post(record))
        .with_state(Arc::clone(&recorder));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, recorder)
}

fn all_spans(recorder: &Recorder) -> Vec<(ResourceSpans, Span)> {
    let requests = recorder.requests.lock().unwrap();
    let mut out = Vec::new();
    for request in requests.iter() {
        for rs in &request.resource_spans {
            for ss in &rs.scope_spans {
                assert_eq!(ss.scope.as_ref().unwrap().name, "gitlab-ci-job-telemetry");
                for span in &ss.spans {
                    out.push((rs.clone(), span.clone()));
                }
            }
        }
    }
    out
}

/// Waits (woken by each export, bounded by a deadline) until `count` spans arrived.
async fn wait_for_spans(recorder: &Recorder, count: usize) -> Vec<(ResourceSpans, Span)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let notified = recorder.notify.notified();
        let spans = all_spans(recorder);
        if spans.len() >= count {
            return spans;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "timed out: {} of {count} spans arrived",
            spans.len()
        );
        let _ = tokio::time::timeout(left, notified).await;
    }
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn int_attr(attrs: &[KeyValue], key: &str) -> Option<i64> {
    match attr(attrs, key) {
        Some(any_value::Value::IntValue(v)) => Some(*v),
        _ => None,
    }
}

fn str_attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a str> {
    match attr(attrs, key) {
        Some(any_value::Value::StringValue(v)) => Some(v.as_str()),
        _ => None,
    }
}

#[tokio::test]
async fn rails_spans_carry_the_payload_ids_and_form_one_tree() {
    let (collector, recorder) = recording_collector().await;
    let gitlab = Gitlab::start(Config {
        otlp_endpoint: Some(format!("http://{collector}")),
        ..Config::default()
    })
    .await;
    let project = gitlab.create_project("traced").await["id"]
        .as_u64()
        .unwrap();
    gitlab.set_flag("true", None).await;
    gitlab.create_pipeline(project, "stages: [build, test]\nok:\n  stage: build\n  script: x\nfail_me:\n  stage: test\n  script: y\n").await;
    let runner = gitlab.register_runner().await;

    let ok = gitlab.request_job(&runner).await.unwrap();
    gitlab.finish_job(&ok, "success").await;
    let failing = gitlab.request_job(&runner).await.unwrap();
    gitlab.finish_job(&failing, "failed").await;

    let spans = wait_for_spans(&recorder, 6).await;
    assert_eq!(spans.len(), 6, "3 spans per job, no more");
    assert!(recorder
        .content_types
        .lock()
        .unwrap()
        .iter()
        .all(|c| c == "application/x-protobuf"));

    for job in [&ok, &failing] {
        let pipeline_id = job.payload["job_info"]["pipeline_id"].as_u64().unwrap();
        let trace_id = ids::trace_id_bytes(pipeline_id).to_vec();
        let payload_parent = job.payload["trace_context"]["parent_span_id"]
            .as_str()
            .unwrap();
        let mine: Vec<_> = spans
            .iter()
            .filter(|(_, s)| int_attr(&s.attributes, "ci.job.id") == Some(job.id as i64))
            .collect();
        assert_eq!(mine.len(), 3, "job {}", job.id);
        for which in RailsSpan::ALL {
            let (resource, span) = mine
                .iter()
                .find(|(_, s)| s.name == which.span_name())
                .unwrap_or_else(|| panic!("no {} span", which.span_name()));
            let resource_attrs = &resource.resource.as_ref().unwrap().attributes;
            assert_eq!(
                str_attr(resource_attrs, "service.name"),
                Some("gitlab-ci-rails")
            );
            assert_eq!(int_attr(resource_attrs, "ci.job.id"), Some(job.id as i64));
            assert_eq!(span.trace_id, trace_id);
            assert_eq!(
                hex::encode(&span.span_id),
                ids::span_id(pipeline_id, job.id, which)
            );
            let expected_parent = which
                .parent()
                .map(|p| ids::span_id(pipeline_id, job.id, p))
                .unwrap_or_default();
            assert_eq!(
                hex::encode(&span.parent_span_id),
                expected_parent,
                "{} parent",
                which.span_name()
            );
            assert!(span.end_time_unix_nano >= span.start_time_unix_nano);
            assert_eq!(
                int_attr(&span.attributes, "ci.pipeline.id"),
                Some(pipeline_id as i64)
            );
            assert_eq!(
                int_attr(&span.attributes, "ci.project.id"),
                Some(project as i64)
            );
            assert_eq!(
                int_attr(&span.attributes, "ci.runner.id"),
                Some(runner.id as i64)
            );
            assert_eq!(
                str_attr(&span.attributes, "ci.pipeline.source"),
                Some("api")
            );
            assert_eq!(
                str_attr(&span.attributes, "ci.job.name"),
                job.payload["job_info"]["name"].as_str()
            );
            assert_eq!(
                str_attr(&span.attributes, "ci.job.stage"),
                job.payload["job_info"]["stage"].as_str()
            );
            if which == RailsSpan::Running {
                assert_eq!(
                    hex::encode(&span.span_id),
                    payload_parent,
                    "the payload's parent is job_running"
                );
            }
        }
        let lifecycle = &mine
            .iter()
            .find(|(_, s)| s.name == "job_lifecycle")
            .unwrap()
            .1;
        let pending = &mine
            .iter()
            .find(|(_, s)| s.name == "job_pending")
            .unwrap()
            .1;
        let running = &mine
            .iter()
            .find(|(_, s)| s.name == "job_running")
            .unwrap()
            .1;
        assert!(lifecycle.start_time_unix_nano <= pending.start_time_unix_nano);
        assert_eq!(
            pending.end_time_unix_nano, running.start_time_unix_nano,
            "picked up = pending ends, running starts"
        );
        assert_eq!(running.end_time_unix_nano, lifecycle.end_time_unix_nano);
        let failed = job.id == failing.id;
        let expected_code = if failed {
            status::StatusCode::Error
        } else {
            status::StatusCode::Unset
        } as i32;
        assert_eq!(running.status.as_ref().unwrap().code, expected_code);
        assert_eq!(lifecycle.status.as_ref().unwrap().code, expected_code);
        assert_eq!(
            str_attr(&running.attributes, "ci.job.status"),
            Some(if failed { "failed" } else { "success" })
        );
    }
    // The exporter counts after the collector answered.
    common::eventually(
        "6 exported spans to be counted",
        Duration::from_secs(10),
        || async { (gitlab.server.export_stats().spans_exported == 6).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn unsampled_or_flag_off_jobs_export_nothing() {
    let (collector, recorder) = recording_collector().await;
    let gitlab = Gitlab::start(Config {
        otlp_endpoint: Some(format!("http://{collector}/v1/traces")),
        ..Config::default()
    })
    .await;
    let off = gitlab.create_project("off").await["id"].as_u64().unwrap();
    let on = gitlab.create_project("on").await["id"].as_u64().unwrap();
    gitlab.set_flag("true", Some("root/on")).await;
    gitlab.create_pipeline(off, "a:\n  script: x\n").await;
    let runner = gitlab.register_runner().await;
    let untraced = gitlab.request_job(&runner).await.unwrap();
    gitlab.finish_job(&untraced, "success").await;
    gitlab.create_pipeline(on, "a:\n  script: x\n").await;
    let traced = gitlab.request_job(&runner).await.unwrap();
    gitlab.finish_job(&traced, "success").await;

    // Exports are in order: once the traced job's spans are in, the untraced one's would be too.
    let spans = wait_for_spans(&recorder, 3).await;
    assert!(spans
        .iter()
        .all(|(_, s)| int_attr(&s.attributes, "ci.job.id") == Some(traced.id as i64)));
    assert_eq!(gitlab.server.export_stats().spans_queued, 3);
}

/// A collector that accepts connections and never answers.
async fn stalled_collector() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (addr, task)
}

#[tokio::test]
async fn a_stalled_collector_never_slows_the_api() {
    let (collector, _task) = stalled_collector().await;
    let config = Config {
        otlp_endpoint: Some(format!("http://{collector}")),
        export_queue_capacity: 2,
        export_timeout: Duration::from_millis(300),
        ..Config::default()
    };
    let gitlab = Gitlab::start(config).await;
    let project = gitlab.create_project("stalled").await["id"]
        .as_u64()
        .unwrap();
    gitlab.set_flag("true", None).await;
    let mut yaml = String::new();
    for i in 0..20 {
        yaml.push_str(&format!("job_{i}:\n  script: x\n"));
    }
    gitlab.create_pipeline(project, &yaml).await;
    let runner = gitlab.register_runner().await;

    let started = Instant::now();
    let mut handled = 0;
    while let Some(job) = gitlab.request_job(&runner).await {
        assert!(job.payload["trace_context"].is_object());
        gitlab.finish_job(&job, "success").await;
        handled += 1;
    }
    let elapsed = started.elapsed();
    assert_eq!(handled, 20);
    // 20 jobs x 2 exports each against a collector that never answers: had
    // the API waited for it, this would take at least 40 x 300 ms.
    assert!(elapsed < Duration::from_secs(3), "the API took {elapsed:?}");

    let stats = common::eventually(
        "export errors to be counted",
        Duration::from_secs(10),
        || async {
            let stats = gitlab.server.export_stats();
            (stats.export_errors > 0).then_some(stats)
        },
    )
    .await;
    assert!(
        stats.spans_dropped > 0,
        "a full queue drops and counts: {stats:?}"
    );
    assert_eq!(stats.spans_exported, 0);
    let metrics = gitlab
        .client
        .get(format!("{}/-/metrics", gitlab.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("fake_rails_rails_spans_dropped_total"));
}
