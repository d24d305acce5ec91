//! Job logs as OTLP log records (issue 12), against a real collector and
//! ClickHouse, fake-rails and the runner under test, with log export on
//! (`CI_TELEMETRY_LOGS=true`):
//!
//! 1. a job's lines land in `otel_logs` in order, line for line the log
//!    fake-rails shows (rendered as GitLab shows it: colours removed,
//!    carriage returns applied, section markers hidden), each with the job's
//!    `TraceId` and the `SpanId` of the stage it was printed in, and the
//!    stream; a masked variable and the job token appear nowhere;
//! 2. with the logs collector down, or stalled (accepting connections and
//!    never answering), the job's result and log are unchanged, its status
//!    is sent while an export attempt is still unanswered (stalled), and
//!    the dropped count is exact: exported + dropped = records = the job's
//!    visible lines + the final WARN record, and `job_execution`'s
//!    `ci.telemetry.dropped_log_records` is the count the runner knew at
//!    the job's end (the job waits for the first drops, so there are some);
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
use conformance::log_lines::{field, job_line};
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
            Ok(conformance::log_lines::log_account(
                &world.runner_log(),
                job,
            ))
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

/// What a job whose log records cannot be exported left behind.
struct Unexported {
    world: World,
    project: u64,
    job: u64,
    /// Log records counted by the runner's metrics when fake-rails had the
    /// job's final status: `(handed over, decided)`.
    at_status: (u64, u64),
}

/// Log records of the runner's metrics (`GET /metrics`): `(handed over,
/// exported + dropped)`.
fn log_record_metrics(metrics_url: &str) -> (u64, u64) {
    let text = ureq::get(metrics_url)
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    let sum = |name: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with(name) && !l[name.len()..].starts_with('_'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let total = sum("ci_telemetry_log_records_total");
    let decided = sum("ci_telemetry_log_records_exported_total")
        + sum("ci_telemetry_log_records_dropped_total");
    (total, decided)
}

/// Runs a job printing 50 lines with its log records sent to `logs_url`
/// (a collector that is down or stalled; spans go to the real one, so the
/// job's span can be read). The job's last command waits (polling the
/// runner's metrics, with a deadline) until the runner has dropped 50
/// records, so that drops are known when the job ends and the final WARN
/// record is emitted.
fn run_with_unexportable_logs(name: &str, logs_url: &str) -> Unexported {
    let mut world = World::new(FakeRailsOptions::default()).unwrap();
    let project = world.create_project_with_flag(name, true).unwrap();
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics_url = format!("http://127.0.0.1:{metrics_port}/metrics");
    let mut options = logs_on(RunnerOptions {
        flush_timeout_secs: Some(60),
        ..world.to_collector()
    });
    options.extra_env.extend(
        [
            ("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", logs_url),
            // Each attempt at the stalled collector ends after 5 s: long
            // enough for the job's status to be sent while one is pending.
            ("OTEL_EXPORTER_OTLP_LOGS_TIMEOUT", "5000"),
            ("CI_TELEMETRY_MAX_AGE", "1s"),
            ("CI_TELEMETRY_RETRY_INITIAL_BACKOFF", "100ms"),
            (
                "CI_RUNNER_METRICS_LISTEN",
                &format!("127.0.0.1:{metrics_port}"),
            ),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    world.start_runner(options).unwrap();

    let wait = format!(
        "for t in $(seq 1 1200); do \
         n=$(curl -s {metrics_url} | awk '/^ci_telemetry_log_records_dropped_total/ {{s+=$2}} END {{print s+0}}'); \
         [ \"$n\" -ge 50 ] && break; sleep 0.1; done; echo \"dropped so far: $n\""
    );
    let yaml = format!(
        "{name}:\n  script:\n    - |\n      for i in $(seq 1 50); do echo line $i; done\n    - |\n      {wait}\n"
    );
    let pipeline = world.rails.create_pipeline(project, &yaml).unwrap();
    let jobs = world
        .rails
        .wait_for_pipeline(project, pipeline, Duration::from_secs(180))
        .unwrap();
    let at_status = log_record_metrics(&metrics_url);
    let job = job_named(&jobs, name);
    assert_eq!(job["status"], "success", "{job}");
    let job = job_id(job);
    let trace = world.rails.job_trace(project, job).unwrap();
    assert!(trace.contains("line 50\n"), "{trace}");
    assert!(trace.contains("dropped so far: "), "{trace}");
    Unexported {
        world,
        project,
        job,
        at_status,
    }
}

impl Unexported {
    /// Every record is dropped and counted: exported + dropped = records =
    /// the job's visible lines + the final WARN record; the job's span says
    /// how many were known dropped when it ended, as the runner's line does.
    fn check_every_record_dropped(&self) {
        let Unexported {
            world,
            project,
            job,
            ..
        } = self;
        let (records, exported, dropped) = flushed_account(world, *job);
        assert_eq!(exported, 0);
        assert_eq!(dropped, records);
        let lines = visible_lines(&world.rails.job_trace(*project, *job).unwrap()).len() as u64;
        // Drops were known at the job's end: one WARN record more.
        assert_eq!(records, lines + 1, "records={records} lines={lines}");

        let span = world.job_execution(*job).unwrap();
        let known: u64 = span.attributes["ci.telemetry.dropped_log_records"]
            .parse()
            .unwrap();
        assert!(
            known >= 50 && known <= dropped,
            "known={known} dropped={dropped}"
        );
        let log = world.runner_log();
        let line = job_line(&log, *job, "log records of the job were not exported");
        assert_eq!(
            line.and_then(|l| field(l, "dropped")),
            Some(known.to_string().as_str()),
            "no WARN line with dropped={known} for job {job} in\n{log}"
        );
    }
}

#[test]
fn with_the_collector_down_the_job_is_unchanged_and_every_record_is_counted_as_dropped() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let run = run_with_unexportable_logs("logs-down", &format!("http://127.0.0.1:{port}/v1/logs"));
    run.check_every_record_dropped();
}

#[test]
fn with_the_collector_stalled_the_job_is_unchanged_and_every_record_is_counted_as_dropped() {
    // Accepts connections and never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    let run = run_with_unexportable_logs("logs-stalled", &format!("http://{addr}/v1/logs"));
    // The status was sent while the records printed after the wait were
    // still in an unanswered request: telemetry did not hold the job back.
    let (handed_over, decided) = run.at_status;
    assert!(
        decided < handed_over,
        "every record was decided before the status arrived: {:?}",
        run.at_status
    );
    run.check_every_record_dropped();
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
