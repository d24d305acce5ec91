//! Phase 1 success criteria (gitlab-runner#39231), against a real collector
//! and ClickHouse, fake-rails, and the runner under test as processes:
//!
//! 1. a `job_execution` span is in `otel_traces` with the correct trace id;
//! 2. it can be looked at as a trace (Rails and runner spans form one tree);
//! 3. jobs are unaffected when the collector is unreachable or stalls;
//! 4. jobs without the flag produce no telemetry.

use std::collections::HashSet;
use std::net::TcpListener;
use std::time::Duration;

use conformance::gitlab::{job_id as id, job_named};
use conformance::gitlab::{Contract, FakeRailsOptions};
use conformance::process::wait_for;
use conformance::proxy::Proxy;
use conformance::runner::RunnerOptions;
use conformance::trace::{self, Tree};
use conformance::world::{World, PIPELINE_DEADLINE};
use serde_json::Value;

const ONE_JOB: &str = "
test:
  script:
    - echo hello from a conformance job
";

const PASS_AND_FAIL: &str = "
passes:
  script:
    - echo this one passes
fails:
  script:
    - echo this one fails
    - exit 3
";

/// The Rails formulas (shared/notes/contract.md).
fn rails_trace_id(root_pipeline: u64) -> String {
    format!("{root_pipeline:032x}")
}

fn check_job_execution(contract: Contract) {
    let mut world = World::new(FakeRailsOptions {
        contract,
        ..FakeRailsOptions::default()
    })
    .unwrap();
    let project = world.create_project_with_flag("phase-one", true).unwrap();
    let runner_options = match contract {
        // v1: the endpoint is static runner configuration.
        Contract::V1 => world.to_collector(),
        // v2: the endpoint comes in the payload; the runner has none.
        Contract::V2 => RunnerOptions::default(),
    };
    world.start_runner(runner_options).unwrap();
    let (pipeline, jobs) = world.run_pipeline(project, ONE_JOB).unwrap();
    let job = job_named(&jobs, "test");
    assert_eq!(job["status"], "success");
    let job_id = id(job);

    let span = world.job_execution(job_id).unwrap();
    assert_eq!(span.trace_id, rails_trace_id(pipeline));
    assert_eq!(span.service, "gitlab-ci-runner");
    assert_eq!(span.scope, "gitlab-ci-runner");
    let expect = [
        ("ci.job.id", job_id.to_string()),
        ("ci.pipeline.id", pipeline.to_string()),
        ("ci.project.id", project.to_string()),
        ("ci.job.status", "success".to_string()),
        ("ci.runner.executor", "shell".to_string()),
        ("cicd.pipeline.task.run.id", job_id.to_string()),
        ("cicd.pipeline.run.id", pipeline.to_string()),
        ("cicd.pipeline.task.name", "test".to_string()),
        ("cicd.pipeline.task.run.result", "success".to_string()),
    ];
    for (key, want) in expect {
        assert_eq!(
            span.attribute(key),
            Some(want.as_str()),
            "attribute {key} of {span:#?}"
        );
    }
    for key in ["ci.pipeline.source", "ci.runner.id", "cicd.worker.id"] {
        assert!(
            span.attribute(key).is_some_and(|v| !v.is_empty()),
            "attribute {key} missing from {span:#?}"
        );
    }
    assert_ne!(span.status_code, "Error");

    // The parent is the payload's span: Rails' job_running, and the whole
    // job is one tree rooted at job_lifecycle.
    let clickhouse = world.stack.clickhouse();
    let tree = wait_for("the Rails spans", Duration::from_secs(20), || {
        let tree = Tree::new(trace::spans_of_trace(&clickhouse, &span.trace_id)?);
        let names: HashSet<&str> = tree.spans.iter().map(|s| s.name.as_str()).collect();
        let complete = [
            "job_lifecycle",
            "job_pending",
            "job_running",
            "job_execution",
        ]
        .iter()
        .all(|n| names.contains(n));
        Ok(complete.then_some(tree))
    })
    .unwrap();
    assert_eq!(tree.roots.len(), 1, "one root:\n{}", tree.render());
    assert_eq!(
        tree.spans[tree.roots[0]].name,
        "job_lifecycle",
        "\n{}",
        tree.render()
    );
    let running = tree.find("job_running").unwrap();
    assert_eq!(span.parent_span_id, running.span_id, "\n{}", tree.render());
    assert_eq!(running.service, "gitlab-ci-rails");
    for s in &tree.spans {
        if s.name != "job_lifecycle" {
            assert!(
                tree.spans.iter().any(|p| p.span_id == s.parent_span_id),
                "the parent of {} is missing:\n{}",
                s.name,
                tree.render()
            );
        }
    }

    // The CI view picks the runner's span up.
    let rows = wait_for("ci_job_telemetry_traces", Duration::from_secs(20), || {
        let filter = format!(
            "span_name = 'job_execution' AND trace_id = '{}'",
            span.trace_id
        );
        let rows = trace::ci_rows(&clickhouse, &filter)?;
        Ok((!rows.is_empty()).then_some(rows))
    })
    .unwrap();
    assert_eq!(
        (rows[0].build_id, rows[0].pipeline_id, rows[0].project_id),
        (job_id, pipeline, project)
    );
}

#[test]
fn job_execution_span_lands_with_the_payload_trace_context_contract_v1() {
    check_job_execution(Contract::V1);
}

#[test]
fn job_execution_span_lands_with_the_payload_trace_context_contract_v2() {
    check_job_execution(Contract::V2);
}

#[test]
fn a_failed_job_has_status_failed_and_an_error_span() {
    let mut world = World::new(FakeRailsOptions::default()).unwrap();
    let project = world.create_project_with_flag("failing", true).unwrap();
    world.start_runner(world.to_collector()).unwrap();
    let (_, jobs) = world.run_pipeline(project, PASS_AND_FAIL).unwrap();
    let failed = job_named(&jobs, "fails");
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["failure_reason"], "script_failure");

    let span = world.job_execution(id(failed)).unwrap();
    assert_eq!(span.attribute("ci.job.status"), Some("failed"));
    assert_eq!(
        span.attribute("cicd.pipeline.task.run.result"),
        Some("failure")
    );
    assert_eq!(span.status_code, "Error", "{span:#?}");
    assert!(
        !span.status_message.is_empty(),
        "an Error status says why: {span:#?}"
    );

    let passed = world.job_execution(id(job_named(&jobs, "passes"))).unwrap();
    assert_eq!(passed.attribute("ci.job.status"), Some("success"));
    assert_ne!(passed.status_code, "Error");
}

/// Runs the pass-and-fail pipeline with telemetry sent to `endpoint` (which
/// does not work) and a flush deadline far longer than the poll deadline, so
/// a status update that waited for telemetry would fail the test.
fn check_jobs_unaffected(endpoint: String) {
    let mut world = World::new(FakeRailsOptions::default()).unwrap();
    let project = world.create_project_with_flag("unaffected", true).unwrap();
    world
        .start_runner(RunnerOptions {
            otlp_endpoint: Some(endpoint),
            otlp_protocol: Some("http/protobuf".into()),
            flush_timeout_secs: Some(600),
            ..RunnerOptions::default()
        })
        .unwrap();
    let pipeline = world.rails.create_pipeline(project, PASS_AND_FAIL).unwrap();
    let jobs = world
        .rails
        .wait_for_pipeline(project, pipeline, Duration::from_secs(60))
        .unwrap();
    assert_eq!(job_named(&jobs, "passes")["status"], "success");
    assert_eq!(job_named(&jobs, "fails")["status"], "failed");
    assert_eq!(
        job_named(&jobs, "fails")["failure_reason"],
        "script_failure"
    );
    let log = world
        .rails
        .job_trace(project, id(job_named(&jobs, "passes")))
        .unwrap();
    assert!(
        log.contains("this one passes"),
        "the job log arrived: {log}"
    );
}

#[test]
fn jobs_are_unaffected_when_the_collector_is_unreachable() {
    // A port nobody listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    check_jobs_unaffected(format!("http://127.0.0.1:{port}"));
}

#[test]
fn jobs_are_unaffected_when_the_collector_stalls() {
    // Accepts connections and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    check_jobs_unaffected(format!("http://127.0.0.1:{port}"));
}

#[test]
fn jobs_without_the_flag_produce_no_telemetry() {
    let mut world = World::new(FakeRailsOptions::default()).unwrap();
    let on = world.create_project_with_flag("flag-on", true).unwrap();
    let off = world.create_project_with_flag("flag-off", false).unwrap();
    world.start_runner(world.to_collector()).unwrap();

    let off_pipeline = world.rails.create_pipeline(off, ONE_JOB).unwrap();
    let on_pipeline = world.rails.create_pipeline(on, ONE_JOB).unwrap();
    let off_jobs = world
        .rails
        .wait_for_pipeline(off, off_pipeline, PIPELINE_DEADLINE)
        .unwrap();
    let on_jobs = world
        .rails
        .wait_for_pipeline(on, on_pipeline, PIPELINE_DEADLINE)
        .unwrap();
    let off_job = id(job_named(&off_jobs, "test"));
    assert_eq!(job_named(&off_jobs, "test")["status"], "success");

    // The flagged job's span has arrived, and it ran after the other one was
    // handed out: had the unflagged job produced a span, it would be here.
    world
        .job_execution(id(job_named(&on_jobs, "test")))
        .unwrap();
    let strays = world.spans_of_job(off_job).unwrap();
    assert!(strays.is_empty(), "spans of an unflagged job: {strays:#?}");
    assert!(
        world.runner_log().contains("Telemetry disabled"),
        "the runner says why telemetry is off:\n{}",
        world.runner_log()
    );
}

/// Payload faults, by job name, applied between fake-rails and the runner.
fn break_payload(job: &mut Value) {
    let name = job["job_info"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    match name.as_str() {
        "no-features" => {
            job.as_object_mut().unwrap().remove("features");
        }
        "not-hex" => job["trace_context"]["trace_id"] = "zz".repeat(16).into(),
        "all-zero" => job["trace_context"]["trace_id"] = "0".repeat(32).into(),
        "short-parent" => job["trace_context"]["parent_span_id"] = "00f067aa".into(),
        "number-id" => job["trace_context"]["trace_id"] = 12345.into(),
        "no-context" => {
            job.as_object_mut().unwrap().remove("trace_context");
        }
        "flag-is-a-string" => job["features"]["job_telemetry"] = "true".into(),
        _ => {}
    }
}

const BROKEN_PAYLOADS: [&str; 7] = [
    "no-features",
    "not-hex",
    "all-zero",
    "short-parent",
    "number-id",
    "no-context",
    "flag-is-a-string",
];

#[test]
fn jobs_with_a_missing_or_malformed_trace_context_run_normally_without_telemetry() {
    let mut world = World::new(FakeRailsOptions::default()).unwrap();
    let project = world
        .create_project_with_flag("broken-payloads", true)
        .unwrap();
    let proxy = Proxy::rewriting(&world.rails.url, break_payload).unwrap();
    world
        .start_runner_via(&proxy.url, world.to_collector())
        .unwrap();

    let mut yaml = String::new();
    for name in BROKEN_PAYLOADS.iter().chain(["intact"].iter()) {
        yaml.push_str(&format!("{name}:\n  script:\n    - echo job {name} ran\n"));
    }
    let (_, jobs) = world.run_pipeline(project, &yaml).unwrap();
    for job in &jobs {
        assert_eq!(
            job["status"], "success",
            "a broken payload never fails a job: {job}"
        );
    }

    // The intact job's span is in: from here on, absence means something.
    world.job_execution(id(job_named(&jobs, "intact"))).unwrap();
    let log = world.runner_log();
    for name in BROKEN_PAYLOADS {
        let job = id(job_named(&jobs, name));
        let spans = world.runner_spans_of_job(job).unwrap();
        assert!(
            spans.is_empty(),
            "job `{name}` produced runner spans: {spans:#?}"
        );
        let line = log
            .lines()
            .find(|l| l.contains("Telemetry disabled") && conformance::log_lines::is_job(l, job))
            .unwrap_or_else(|| panic!("no one-line reason for job `{name}` in:\n{log}"));
        assert!(line.len() < 300, "one short line: {line}");
    }
}

/// What a job's result is made of: its status, failure reason, and the
/// script's own lines in its log.
fn results(world: &World, project: u64, jobs: &[Value]) -> Vec<String> {
    let mut out: Vec<String> = jobs
        .iter()
        .map(|job| {
            let log = world.rails.job_trace(project, id(job)).unwrap();
            let script_lines: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("this one") || l.starts_with("$ "))
                .collect();
            format!(
                "{} {} {} {:?}",
                job["name"].as_str().unwrap_or_default(),
                job["status"],
                job["failure_reason"],
                script_lines
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn a_jobs_result_is_identical_with_telemetry_on_off_and_the_collector_down() {
    let mut world = World::new(FakeRailsOptions::default()).unwrap();
    let on = world
        .create_project_with_flag("telemetry-on", true)
        .unwrap();
    let off = world
        .create_project_with_flag("telemetry-off", false)
        .unwrap();
    world.start_runner(world.to_collector()).unwrap();

    let (_, with_telemetry) = world.run_pipeline(on, PASS_AND_FAIL).unwrap();
    let (_, without) = world.run_pipeline(off, PASS_AND_FAIL).unwrap();
    world.stack.stop_collector();
    let (_, collector_down) = world.run_pipeline(on, PASS_AND_FAIL).unwrap();

    let expected = results(&world, on, &with_telemetry);
    assert_eq!(expected.len(), 2, "{expected:#?}");
    assert!(
        expected.iter().any(|r| r.contains("this one fails")),
        "{expected:#?}"
    );
    assert_eq!(results(&world, off, &without), expected, "telemetry off");
    assert_eq!(
        results(&world, on, &collector_down),
        expected,
        "collector down"
    );
}
