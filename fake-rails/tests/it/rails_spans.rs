//! The Rails side of the trace, received by a recording OTLP/HTTP collector
//! (`conformance::doubles`).

use std::time::Duration;

use conformance::doubles::otlp::{http_collector, stalled_server, Collector};
use fake_rails::ids::{self, RailsSpan};
use fake_rails::Config;
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::trace::v1::{status, ResourceSpans, Span};

use crate::common::{self, Gitlab};

/// Every span the collector received, with its resource.
fn all_spans(collector: &Collector) -> Vec<(ResourceSpans, Span)> {
    let mut out = Vec::new();
    for request in collector.requests() {
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
async fn wait_for_spans(collector: &Collector, count: usize) -> Vec<(ResourceSpans, Span)> {
    let arrived = collector
        .wait_for(Duration::from_secs(10), |spans| spans.len() >= count)
        .await;
    assert!(
        arrived.len() >= count,
        "timed out: {} of {count} spans arrived",
        arrived.len()
    );
    all_spans(collector)
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
    let collector = http_collector().await;
    let gitlab = Gitlab::start(Config {
        otlp_endpoint: Some(format!("http://{}", collector.addr.unwrap())),
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

    let spans = wait_for_spans(&collector, 6).await;
    assert_eq!(spans.len(), 6, "3 spans per job, no more");
    assert!(collector
        .headers()
        .iter()
        .all(|h| h.get("content-type").map(String::as_str) == Some("application/x-protobuf")));
    assert!(collector.paths().iter().all(|p| p == "/v1/traces"));

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
    let collector = http_collector().await;
    let gitlab = Gitlab::start(Config {
        otlp_endpoint: Some(collector.http_endpoint()),
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
    let spans = wait_for_spans(&collector, 3).await;
    assert!(spans
        .iter()
        .all(|(_, s)| int_attr(&s.attributes, "ci.job.id") == Some(traced.id as i64)));
    assert_eq!(gitlab.server.export_stats().spans_queued, 3);
}

#[tokio::test]
async fn a_stalled_collector_never_slows_the_api() {
    let collector = stalled_server().await;
    let config = Config {
        otlp_endpoint: Some(format!("http://{collector}")),
        export_queue_capacity: 2,
        // Longer than the test: no export attempt ends while it runs.
        export_timeout: Duration::from_secs(120),
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

    let mut handled = 0;
    while let Some(job) = gitlab.request_job(&runner).await {
        assert!(job.payload["trace_context"].is_object());
        gitlab.finish_job(&job, "success").await;
        handled += 1;
    }
    assert_eq!(handled, 20);
    // Order, not time: every job was handled while the first export was
    // still waiting for the stalled collector (no attempt has ended).
    let stats = gitlab.server.export_stats();
    assert_eq!(stats.export_errors, 0, "{stats:?}");
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
