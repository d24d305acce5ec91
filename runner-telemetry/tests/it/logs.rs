//! Job log records (issue 12) through the runner-wide buffer: a trace keeps
//! its root (reserved room for `job_execution` and the final log record),
//! drops are counted per job and reason, records reach `/v1/logs` with the
//! stage span, and the process metrics add up.

use std::time::{Duration, SystemTime};

use crate::export_support::*;
use runner_telemetry::config::{BufferSettings, StaticEndpoint};
use runner_telemetry::logs::Stream;
use runner_telemetry::negotiate::Transport;
use runner_telemetry::{DropReason, JobOutcome, RunnerTelemetry, SpanOutcome};

/// An endpoint nobody listens on: everything stays buffered, retried.
fn closed_port() -> String {
    let addr = conformance::doubles::otlp::closed_port();
    format!("http://{addr}/v1/traces")
}

fn small_buffer_telemetry(url: &str, max_items: usize, logs: bool) -> RunnerTelemetry {
    let mut settings = settings(Transport::HttpProtobuf, url);
    settings.buffer = BufferSettings {
        max_spans: max_items,
        ..settings.buffer
    };
    if logs {
        settings.logs = Some(StaticEndpoint {
            transport: Transport::HttpProtobuf,
            url: url.replace("/v1/traces", "/v1/logs"),
            headers: Vec::new(),
        });
    }
    RunnerTelemetry::new(settings, runner())
}

/// Waits until `spans` ended spans have been handed to the buffer: span
/// encoding is the job's encoder task's, off the job's thread, so a flush
/// with no deadline right after a job ends may find them undecided.
async fn wait_until_handed_over(telemetry: &RunnerTelemetry, spans: u64) {
    conformance::doubles::eventually(
        "every ended span handed to the buffer",
        Duration::from_secs(10),
        || async { (telemetry.metrics().snapshot().spans >= spans).then_some(()) },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_keeps_each_jobs_root_span_over_its_children() {
    let telemetry = small_buffer_telemetry(&closed_port(), 10, false);
    let children: Vec<&'static str> = vec!["step_script"; 50];
    let pending = run_job(&telemetry, 1, &v1_payload(), &children);
    wait_until_handed_over(&telemetry, 51).await;
    let report = pending.flush(Duration::ZERO).await;
    assert_report(&report);
    // 10 items: one held for the root from the job's start, so 9 children
    // fit and 41 are dropped; the root then takes its own room.
    assert_eq!(report.spans, 51);
    assert_eq!(report.dropped_for(DropReason::QueueFull), 41);
    assert_eq!(report.buffered(), 10);
    assert_invariant(&telemetry);
    telemetry.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_jobs_children_cannot_take_an_earlier_jobs_root_room() {
    let telemetry = small_buffer_telemetry(&closed_port(), 10, false);
    let mut first = telemetry.start_job(&v1_payload(), &job_info(1), SystemTime::now());
    let second = run_job(&telemetry, 2, &v1_payload(), &["step_script"; 30]);
    // Job 2's spans reach the buffer before job 1's children end.
    wait_until_handed_over(&telemetry, 31).await;
    for _ in 0..5 {
        first.child("step_script", vec![]).end(SpanOutcome::Ok);
    }
    let first = first
        .finish(&JobOutcome::Success, SystemTime::now())
        .unwrap();
    wait_until_handed_over(&telemetry, 31 + 6).await;
    let second = second.flush(Duration::ZERO).await;
    let first = first.flush(Duration::ZERO).await;
    // Job 2's root is kept too; job 1's children found the buffer full,
    // its root did not.
    assert_eq!(second.buffered() + first.buffered(), 10);
    assert_eq!(first.dropped_for(DropReason::QueueFull), 5);
    assert_eq!(first.buffered(), 1, "job 1's job_execution is buffered");
    telemetry.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_log_records_are_counted_and_the_final_warning_is_kept() {
    let telemetry = small_buffer_telemetry(&closed_port(), 20, true);
    let job = telemetry.start_job(&v1_payload(), &job_info(7), SystemTime::now());
    let logs = job.logs().expect("log export is on");
    for i in 0..100 {
        logs.emit_raw_line(
            format!("line {i}").as_bytes(),
            Stream::Stdout,
            SystemTime::now(),
        );
    }
    let pending = job.finish(&JobOutcome::Success, SystemTime::now()).unwrap();
    let report = pending.flush(Duration::ZERO).await;
    let records = report.log_records.as_ref().expect("a log account");
    assert!(records.is_consistent(), "{records:?}");
    // 20 items, 2 held (span root, final record): 18 lines fit.
    assert_eq!(records.spans, 101, "100 lines and the final WARN record");
    assert_eq!(records.dropped_for(DropReason::QueueFull), 82);
    assert_eq!(records.buffered(), 19);
    assert_eq!(report.buffered(), 1, "job_execution kept");
    let m = telemetry.metrics().snapshot();
    assert_eq!(m.log_records, 101);
    assert_eq!(m.log_dropped(DropReason::QueueFull), 82);
    assert_eq!(
        m.spans + m.log_records,
        m.exported
            + m.log_exported
            + m.dropped_total()
            + m.log_dropped_total()
            + m.buffer_spans as u64
    );
    let text = telemetry.metrics().render();
    assert!(text.contains("ci_telemetry_log_records_dropped_total{reason=\"queue_full\"} 82"));
    telemetry.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_reach_v1_logs_with_the_stage_span_and_job_ids() {
    let collector = Collector::start().await;
    let telemetry = small_buffer_telemetry(&collector.http_endpoint(), 1000, true);
    let mut job = telemetry.start_job(&v1_payload(), &job_info(9), SystemTime::now());
    let logs = job.logs().unwrap();
    logs.emit_raw_line(b"\x1b[0KRunning with", Stream::Runner, SystemTime::now());
    let stage = job.child("step_script", vec![]);
    let stage_id = stage.span_context().unwrap().span_id();
    logs.emit_raw_line(b"hello", Stream::Stdout, SystemTime::now());
    stage.end(SpanOutcome::Ok);
    logs.emit_raw_line(
        b"\x1b[0;33mWARNING: after\x1b[0;m",
        Stream::Runner,
        SystemTime::now(),
    );
    let root_id = job.span_context().unwrap().span_id();
    let pending = job.finish(&JobOutcome::Success, SystemTime::now()).unwrap();
    let report = pending.flush(Duration::from_secs(10)).await;
    let records = report.log_records.unwrap();
    assert_eq!((records.spans, records.exported()), (3, 3));
    let all: Vec<u8> = collector
        .log_requests()
        .iter()
        .flat_map(prost::Message::encode_to_vec)
        .collect();
    // The protobuf carries the bodies as plain strings and the span IDs as
    // raw bytes.
    let has = |needle: &[u8]| all.windows(needle.len()).any(|w| w == needle);
    assert!(has(b"Running with"));
    assert!(has(b"WARNING: after"));
    assert!(!has(b"\x1b["), "ANSI sequences removed");
    assert!(has(&stage_id.to_bytes()));
    assert!(has(&root_id.to_bytes()));
    assert!(has(b"ci.log.stream"));
    telemetry.shutdown().await;
}

/// Output handed over in chunks that cut lines anywhere: the job's log task
/// makes one record per line, in order, numbered, each with the span open
/// when its line was completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_chunks_become_ordered_records_on_the_jobs_task() {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    let collector = Collector::start().await;
    let telemetry = small_buffer_telemetry(&collector.http_endpoint(), 1000, true);
    let mut job = telemetry.start_job(&v1_payload(), &job_info(11), SystemTime::now());
    let logs = job.logs().unwrap();
    let root_id = job.span_context().unwrap().span_id();
    logs.push_output(b"Running with\nhel", Stream::Runner, SystemTime::now());
    let stage = job.child("step_script", vec![]);
    let stage_id = stage.span_context().unwrap().span_id();
    logs.push_output(
        b"lo\nsection_end:1:x\r\x1b[0K\n\n",
        Stream::Stdout,
        SystemTime::now(),
    );
    stage.end(SpanOutcome::Ok);
    logs.push_output(b"last", Stream::Stdout, SystemTime::now());
    logs.end_output();
    let pending = job.finish(&JobOutcome::Success, SystemTime::now()).unwrap();
    let report = pending.flush(Duration::from_secs(10)).await;
    let records = report.log_records.unwrap();
    assert!(records.is_consistent(), "{records:?}");
    assert_eq!((records.spans, records.exported()), (4, 4));
    let mut seen = Vec::new();
    for record in &collector.log_records() {
        let body = match record.body.as_ref().and_then(|b| b.value.as_ref()) {
            Some(Value::StringValue(s)) => s.clone(),
            other => panic!("body {other:?}"),
        };
        let number = record
            .attributes
            .iter()
            .find(|a| a.key == "ci.log.line_number")
            .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                Value::IntValue(n) => Some(*n),
                _ => None,
            })
            .unwrap();
        seen.push((number, body, record.span_id.clone()));
    }
    seen.sort();
    let root = root_id.to_bytes().to_vec();
    let stage = stage_id.to_bytes().to_vec();
    assert_eq!(
        seen,
        [
            (1, "Running with".to_string(), root.clone()),
            (2, "hello".to_string(), stage.clone()),
            (3, String::new(), stage),
            (4, "last".to_string(), root),
        ]
    );
    telemetry.shutdown().await;
}

/// Output that comes faster than the export waits, as masked bytes, for
/// room in a small buffer: every line is exported, none dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_waits_for_room_in_the_buffer_instead_of_being_dropped() {
    let collector = Collector::start().await;
    let telemetry = small_buffer_telemetry(&collector.http_endpoint(), 2000, true);
    let job = telemetry.start_job(&v1_payload(), &job_info(12), SystemTime::now());
    let logs = job.logs().expect("log export is on");
    let text: String = (0..20_000).map(|i| format!("{i}\n")).collect();
    for chunk in text.as_bytes().chunks(4093) {
        logs.push_output(chunk, Stream::Stdout, SystemTime::now());
    }
    logs.end_output();
    let pending = job.finish(&JobOutcome::Success, SystemTime::now()).unwrap();
    let report = pending.flush(Duration::from_secs(120)).await;
    let records = report.log_records.as_ref().expect("a log account");
    assert!(records.is_consistent(), "{records:?}");
    assert_eq!(records.spans, 20_000, "every line, no final WARN");
    assert_eq!(records.exported(), 20_000);
    let m = telemetry.metrics().snapshot();
    assert_eq!(m.log_records, 20_000);
    assert_eq!(m.log_dropped_total(), 0);
    telemetry.shutdown().await;
}

/// While output keeps coming, the job's task lets it gather (for up to
/// `LOG_GATHER`) instead of rendering it line by line beside the job; the
/// job's end renders it at once. On tokio's paused clock: no time passes
/// unless the test (or an idle runtime) advances it.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn output_gathers_while_the_job_runs_and_renders_when_it_finishes() {
    use runner_telemetry::logs::LOG_GATHER;
    // Nothing listens there: the export fails, which this test does not
    // look at (it counts rendered lines).
    let telemetry = small_buffer_telemetry("http://127.0.0.1:9/v1/traces", 1000, true);
    let job = telemetry.start_job(&v1_payload(), &job_info(21), SystemTime::now());
    let logs = job.logs().unwrap();
    logs.push_output(b"one\ntwo\n", Stream::Stdout, SystemTime::now());
    // A job printing for 750 ms, within the gathering time.
    tokio::time::advance(Duration::from_millis(500)).await;
    logs.push_output(b"three\n", Stream::Stdout, SystemTime::now());
    tokio::time::advance(Duration::from_millis(250)).await;
    // Let every task that is due run.
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert_eq!(logs.lines(), 0, "rendered while the job was printing");
    assert!(LOG_GATHER > Duration::from_millis(750));
    let _pending = job.finish(&JobOutcome::Success, SystemTime::now());
    let before = tokio::time::Instant::now();
    while logs.lines() < 3 {
        tokio::task::yield_now().await;
    }
    // Rendered without waiting out the rest of the gathering time (with
    // the runtime busy rendering, the paused clock did not move).
    assert!(
        before.elapsed() < LOG_GATHER - Duration::from_millis(750),
        "{:?}",
        before.elapsed()
    );
}
