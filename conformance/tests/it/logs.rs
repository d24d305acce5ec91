//! Job logs as OTLP log records (issue 12), against a real collector and
//! ClickHouse, fake-rails and the runner under test, with log export on
//! (`CI_TELEMETRY_LOGS=true`):
//!
//! 1. a job's lines land in `otel_logs` in order, line for line the log
//!    fake-rails shows (rendered as GitLab shows it: colours removed,
//!    carriage returns applied, section markers hidden), each with the job's
//!    `TraceId` and the `SpanId` of the stage it was printed in, and the
//!    stream; a masked variable and the job token appear nowhere;
//! 2. with the collector down, the job's result and log are unchanged and
//!    every record is counted as dropped;
//! 3. a job printing many lines: exported + dropped = records emitted =
//!    the lines of its log, and `otel_logs` holds exactly the exported ones.
//!    100,000 lines here (`CONFORMANCE_LOG_LINES` to change it); the
//!    1,000,000-line run with its timings is `cargo xtask bench`.
//!
//! The runner's account is read from its `Telemetry flushed` line
//! (`log_records=N log_records_exported=E log_records_dropped=D`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use conformance::gitlab::{job_id, job_named, FakeRailsOptions};
use conformance::process::wait_for;
use conformance::proxy::Proxy;
use conformance::runner::RunnerOptions;
use conformance::world::{World, SPAN_DEADLINE};
use serde_json::{json, Value};

const SECRET: &str = "Sup3r-S3cret-Log-Value-42";

/// The log as GitLab's view shows it, one entry per visible line. Written
/// here independently of the runner's renderer.
fn visible_lines(log: &str) -> Vec<String> {
    let mut lines: Vec<&str> = log.split('\n').collect();
    if lines.last() == Some(&"") {
        lines.pop();
    }
    let mut out = Vec::new();
    for line in lines {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            out.push(String::new());
            continue;
        }
        let mut shown = None;
        for segment in line.split('\r') {
            let marker = ["section_start:", "section_end:"]
                .iter()
                .any(|p| segment.starts_with(p));
            if marker {
                continue;
            }
            let text = strip_ansi(segment);
            if !text.is_empty() {
                shown = Some(text);
            }
        }
        out.extend(shown);
    }
    out
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            out.push(c);
            continue;
        }
        if chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if ('\x40'..='\x7e').contains(&c) {
                    break;
                }
            }
        } else {
            chars.next();
        }
    }
    out
}

/// A row of `otel_logs`.
#[derive(Debug)]
struct Record {
    body: String,
    trace_id: String,
    span_id: String,
    severity: String,
    attributes: BTreeMap<String, String>,
}

fn records_of_job(world: &World, job: u64) -> Vec<Record> {
    let rows = world
        .stack
        .clickhouse()
        .json_rows(&format!(
            "SELECT Body, TraceId, SpanId, SeverityText, LogAttributes FROM otel.otel_logs \
             WHERE LogAttributes['ci.job.id'] = '{job}' \
             ORDER BY toUInt64OrZero(LogAttributes['ci.log.line_number']), \
             toUInt64OrZero(LogAttributes['ci.log.chunk.index'])"
        ))
        .unwrap();
    rows.into_iter()
        .map(|row| Record {
            body: row["Body"].as_str().unwrap_or_default().to_string(),
            trace_id: row["TraceId"].as_str().unwrap_or_default().to_string(),
            span_id: row["SpanId"].as_str().unwrap_or_default().to_string(),
            severity: row["SeverityText"].as_str().unwrap_or_default().to_string(),
            attributes: serde_json::from_value(row["LogAttributes"].clone()).unwrap_or_default(),
        })
        .collect()
}

fn count_records(world: &World, job: u64) -> u64 {
    world
        .stack
        .clickhouse()
        .count(&format!(
            "SELECT count() FROM otel.otel_logs WHERE LogAttributes['ci.job.id'] = '{job}'"
        ))
        .unwrap()
}

/// `(log_records, exported, dropped)` from the runner's flush line of `job`.
fn flushed_account(world: &World, job: u64) -> (u64, u64, u64) {
    wait_for(
        &format!("the runner's telemetry flush line of job {job}"),
        Duration::from_secs(180),
        || {
            let log = world.runner_log();
            let Some(line) = log.lines().find(|l| {
                l.contains("Telemetry flush")
                    && l.contains("log_records=")
                    && conformance::log_lines::is_job(l, job)
            }) else {
                return Ok(None);
            };
            let field = |name: &str| -> u64 {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(&format!("{name}=")))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("no {name} in {line}"))
            };
            Ok(Some((
                field("log_records"),
                field("log_records_exported"),
                field("log_records_dropped"),
            )))
        },
    )
    .unwrap()
}

fn logs_on(mut options: RunnerOptions) -> RunnerOptions {
    options
        .extra_env
        .push(("CI_TELEMETRY_LOGS".into(), "true".into()));
    options
}

#[test]
fn a_jobs_lines_land_in_otel_logs_in_order_with_their_stage_span_and_no_secret() {
    let mut world = World::new(FakeRailsOptions::default()).unwrap();
    let project = world.create_project_with_flag("logs", true).unwrap();
    let tokens = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = tokens.clone();
    let proxy = Proxy::rewriting(&world.rails.url, move |job: &mut Value| {
        if let Some(token) = job["token"].as_str() {
            seen.lock().unwrap().push(token.to_string());
        }
        if let Some(variables) = job["variables"].as_array_mut() {
            variables.push(json!({
                "key": "LOG_SECRET", "value": SECRET, "masked": true, "public": false
            }));
        }
    })
    .unwrap();
    world
        .start_runner_via(&proxy.url, logs_on(world.to_collector()))
        .unwrap();

    let yaml = r#"
logs:
  script:
    - echo "first line"
    - echo "secret=$LOG_SECRET token=$CI_JOB_TOKEN"
    - echo "to stderr" >&2
    - printf 'progress 10%%\rprogress 100%%\n'
    - printf '\033[32;1mgreen\033[0;m text\n'
  after_script:
    - echo "in after_script"
"#;
    let (_, jobs) = world.run_pipeline(project, yaml).unwrap();
    let job = job_named(&jobs, "logs");
    assert_eq!(job["status"], "success", "{job}");
    let job = job_id(job);

    let trace = world.rails.job_trace(project, job).unwrap();
    let expected = visible_lines(&trace);
    assert!(expected.iter().any(|l| l == "first line"), "{expected:?}");

    let root = world.job_execution(job).unwrap();
    let spans = world.runner_spans_of_job(job).unwrap();
    let span_of = |name: &str| {
        spans
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no {name} span"))
            .span_id
            .clone()
    };
    let records = wait_for(
        &format!("{} log records of job {job}", expected.len()),
        SPAN_DEADLINE,
        || {
            let records = records_of_job(&world, job);
            Ok((records.len() >= expected.len()).then_some(records))
        },
    )
    .unwrap();

    // Line for line the log fake-rails shows.
    let bodies: Vec<&str> = records.iter().map(|r| r.body.as_str()).collect();
    assert_eq!(bodies, expected);

    // Correlation through the native fields.
    assert!(records.iter().all(|r| r.trace_id == root.trace_id));
    let record = |body: &str| records.iter().find(|r| r.body == body).unwrap();
    assert_eq!(record("first line").span_id, span_of("step_script"));
    assert_eq!(record("in after_script").span_id, span_of("after_script"));
    let running = records
        .iter()
        .find(|r| r.body.starts_with("Running with"))
        .unwrap();
    assert_eq!(running.span_id, root.span_id);

    // Streams, severities, ids, rendering.
    assert_eq!(record("first line").attributes["ci.log.stream"], "stdout");
    // A runner may merge the script's stderr into stdout (GitLab Runner's
    // shell executor does, and so does the reference runner).
    let stream = &record("to stderr").attributes["ci.log.stream"];
    assert!(stream == "stderr" || stream == "stdout", "{stream}");
    assert_eq!(running.attributes["ci.log.stream"], "runner");
    assert_eq!(record("first line").severity, "INFO");
    assert_eq!(
        record("first line").attributes["ci.job.id"],
        job.to_string()
    );
    assert!(records.iter().any(|r| r.body == "progress 100%"));
    assert!(records.iter().any(|r| r.body == "green text"));

    // Masked: the secret and the job token appear nowhere in otel_logs.
    let masked = record("secret=[MASKED] token=[MASKED]");
    assert_eq!(masked.attributes["ci.log.stream"], "stdout");
    let everything = world
        .stack
        .clickhouse()
        .execute("SELECT * FROM otel.otel_logs FORMAT JSONEachRow")
        .unwrap();
    assert!(!everything.contains(SECRET));
    let tokens = tokens.lock().unwrap().clone();
    assert!(!tokens.is_empty());
    for token in tokens {
        assert!(
            !everything.contains(&token),
            "the job token is in otel_logs"
        );
    }
}

#[test]
fn with_the_collector_down_the_job_is_unchanged_and_every_record_is_counted_as_dropped() {
    let mut world = World::new(FakeRailsOptions::default()).unwrap();
    let project = world.create_project_with_flag("logs-down", true).unwrap();
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut options = logs_on(RunnerOptions {
        otlp_endpoint: Some(format!("http://127.0.0.1:{port}")),
        otlp_protocol: Some("http/protobuf".into()),
        flush_timeout_secs: Some(60),
        ..RunnerOptions::default()
    });
    options
        .extra_env
        .push(("CI_TELEMETRY_MAX_AGE".into(), "1s".into()));
    world.start_runner(options).unwrap();

    let yaml = "down:\n  script:\n    - for i in $(seq 1 50); do echo line $i; done\n";
    let (_, jobs) = world.run_pipeline(project, yaml).unwrap();
    let job = job_named(&jobs, "down");
    assert_eq!(job["status"], "success", "{job}");
    let job = job_id(job);
    let trace = world.rails.job_trace(project, job).unwrap();
    assert!(trace.contains("line 50\n"), "{trace}");
    let lines = visible_lines(&trace).len() as u64;

    let (records, exported, dropped) = flushed_account(&world, job);
    assert_eq!(exported, 0);
    assert_eq!(dropped, records);
    // Every line, plus the final WARN record when drops were known at the
    // job's end (max_age may not have passed yet then).
    assert!(
        records == lines || records == lines + 1,
        "records={records} lines={lines}"
    );
}

#[test]
fn a_job_printing_many_lines_accounts_for_every_line() {
    let lines: u64 = std::env::var("CONFORMANCE_LOG_LINES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let mut world = World::new(FakeRailsOptions::default()).unwrap();
    let project = world.create_project_with_flag("logs-many", true).unwrap();
    let options = logs_on(RunnerOptions {
        flush_timeout_secs: Some(170),
        ..world.to_collector()
    });
    world.start_runner(options).unwrap();

    let yaml = format!("many:\n  script:\n    - seq 1 {lines}\n");
    let (_, jobs) = world.run_pipeline(project, &yaml).unwrap();
    let job = job_named(&jobs, "many");
    assert_eq!(job["status"], "success", "{job}");
    let job = job_id(job);

    let (records, exported, dropped) = flushed_account(&world, job);
    assert_eq!(exported + dropped, records);
    assert!(records > lines, "records={records} lines={lines}");
    let trace = world.rails.job_trace(project, job).unwrap();
    if trace.len() < 4 * 1024 * 1024 - 1024 {
        // Not truncated by GitLab's output limit: one record per line.
        let visible = visible_lines(&trace).len() as u64;
        let warn = u64::from(dropped > 0);
        assert!(
            records == visible || records == visible + warn,
            "records={records} visible={visible}"
        );
    }
    let stored = wait_for(
        &format!("{exported} records of job {job} in otel_logs"),
        Duration::from_secs(120),
        || {
            let n = count_records(&world, job);
            Ok((n >= exported).then_some(n))
        },
    )
    .unwrap();
    assert_eq!(stored, exported);
}
