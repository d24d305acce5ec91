//! `cargo xtask demo`: the whole pipeline on this machine. Brings up the
//! embedded stack (kept running afterwards, so the data can be looked at),
//! starts fake-rails and the reference runner, runs the demo pipeline from
//! `compose/demo/.gitlab-ci.yml`, and prints each job's trace as read back
//! from ClickHouse and each job's telemetry page. fake-rails keeps running
//! with the stack (PID file `target/stack/pids/fake-rails.pid`) so the pages
//! can be opened, until `cargo xtask stack down` or the next demo. Exits
//! non-zero if any expectation failed.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};
use conformance::gitlab::{
    clickhouse_args, init_repository, Contract, FakeRails, FakeRailsOptions, ADMIN_TOKEN,
};
use conformance::process::Lifetime;
use conformance::runner::{Runner, RunnerOptions};
use conformance::trace::{self, format_duration, StoredSpan, Tree};
use conformance::{paths, ClickHouse};

use crate::stack::{stop_demo_rails, RAILS_PID_FILE};
use serde_json::Value;

/// What the demo pipeline's jobs must end as.
const EXPECTED: &[(&str, &str)] = &[
    ("build", "success"),
    ("flaky-test", "failed"),
    ("slow-test", "success"),
    ("functions", "success"),
];

/// Child spans each job's `job_execution` must have (the stages that run for
/// it, and its CI Functions).
const EXPECTED_CHILDREN: &[(&str, &[&str])] = &[
    (
        "build",
        &[
            "prepare_executor",
            "get_sources",
            "restore_cache",
            "step_script",
            "archive_cache",
            "upload_artifacts",
        ],
    ),
    (
        "flaky-test",
        &[
            "prepare_executor",
            "get_sources",
            "step_script",
            "after_script",
            "upload_artifacts_on_failure",
        ],
    ),
    (
        "slow-test",
        &["prepare_executor", "get_sources", "step_script"],
    ),
    (
        "functions",
        &[
            "prepare_executor",
            "get_sources",
            "ci_function",
            "ci_function",
        ],
    ),
];

pub fn run(args: &[String]) -> Result<()> {
    let contract = match args.iter().position(|a| a == "--contract") {
        Some(i) => match args.get(i + 1).map(String::as_str) {
            Some("v1") => Contract::V1,
            Some("v2") => Contract::V2,
            _ => bail!("--contract takes v1 or v2"),
        },
        None => Contract::V1,
    };
    crate::build::build_binaries()?;

    let stack_dir = paths::target_dir().join("stack");
    println!("==> Embedded stack ({})", stack_dir.display());
    let endpoints = crate::stack::up(&stack_dir)?;
    let clickhouse = endpoints.clickhouse();

    // The previous demo's fake-rails writes into `target/demo`: stop it first.
    if let Some(line) = stop_demo_rails(&stack_dir)? {
        println!("  {line}");
    }
    let demo_dir = paths::target_dir().join("demo");
    let _ = std::fs::remove_dir_all(&demo_dir);
    std::fs::create_dir_all(demo_dir.join("logs"))?;

    let rails = FakeRails::start(
        &demo_dir,
        &FakeRailsOptions {
            contract,
            otlp_endpoint: Some(endpoints.otlp_http.clone()),
            otel_endpoints: vec![format!("{}/v1/traces", endpoints.otlp_http)],
            // Trace ids come from pipeline ids: start each demo at a new id
            // so runs against the persistent stack do not share traces.
            // The telemetry pages read the stack's ClickHouse.
            extra_args: [
                vec!["--first-id".into(), first_id().to_string()],
                clickhouse_args(&endpoints, &conformance::stack::password_file(&stack_dir)),
            ]
            .concat(),
        },
        // Outlives the demo, with the stack, so the pages can be opened.
        Lifetime::Detached,
    )?;
    println!(
        "==> fake-rails on {} (payload contract {:?}, log {})",
        rails.url,
        contract,
        rails.log_path().display()
    );
    let ci_config =
        std::fs::read_to_string(paths::compose_dir().join("demo").join(".gitlab-ci.yml"))?;
    let repository = init_repository(
        &demo_dir.join("repository"),
        &[(".gitlab-ci.yml", &ci_config)],
    )?;
    let (project, project_path) = rails.create_project("ci-telemetry-demo", Some(&repository))?;
    rails.set_telemetry_flag(true, Some(&project_path))?;
    println!(
        "  Project {project_path} (id {project}) on the git repository {}, feature flag ci_job_telemetry on",
        repository.display()
    );
    let pipeline = rails.create_pipeline_from_repository(project, "main")?;
    let mut jobs = rails.pipeline_jobs(project, pipeline)?;
    jobs.sort_by_key(|j| j["id"].as_u64());
    println!(
        "  Pipeline {pipeline} from compose/demo/.gitlab-ci.yml: {}",
        jobs.iter()
            .filter_map(|j| j["name"].as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );

    let token = rails.register_runner("demo-runner")?;
    let runner = Runner::start(
        &demo_dir,
        &rails.url,
        &token,
        &RunnerOptions {
            otlp_endpoint: (contract == Contract::V1).then(|| endpoints.otlp_http.clone()),
            otlp_protocol: Some("http/protobuf".into()),
            // Job logs as OTLP log records too (into `otel_logs`).
            extra_env: vec![("CI_TELEMETRY_LOGS".into(), "true".into())],
            ..RunnerOptions::default()
        },
        Lifetime::Owned,
    )?;
    println!(
        "==> ci-runner (shell executor, job logs exported too, log {})",
        runner.log_path().display()
    );

    let mut watch = watch_pipeline(&rails, &clickhouse, project, pipeline)?;
    watch.jobs.sort_by_key(|j| j["id"].as_u64());
    drop(runner);

    println!("==> Traces read back from ClickHouse");
    let mut failures = Vec::new();
    let trace_id = format!("{pipeline:032x}");
    let spans = trace::spans_of_trace(&clickhouse, &trace_id)?;
    let tree = Tree::new(spans);
    let log_lines = last_log_lines(&clickhouse, &trace_id, watch.jobs.len())?;
    for job in &watch.jobs {
        let id = job["id"].as_u64().unwrap_or_default();
        let name = job["name"].as_str().unwrap_or("?");
        let status = job["status"].as_str().unwrap_or("?");
        println!();
        println!("Job {id} `{name}`: {status}, trace {trace_id}");
        match job_root(&tree, id) {
            Some(root) => print!("{}", indent(&tree.render_with_notes(root, &log_lines))),
            None => println!("  (no spans found)"),
        }
        let has_lines = tree
            .spans
            .iter()
            .filter(|s| {
                s.attribute("ci.job.id") == Some(&id.to_string())
                    || s.resource.get("ci.job.id") == Some(&id.to_string())
            })
            .any(|s| log_lines.contains_key(&s.span_id));
        if !has_lines {
            failures.push(format!(
                "job {id}: no log lines in otel_logs under its spans"
            ));
        }
        failures.extend(check_job(&tree, job, &trace_id));
    }
    println!();
    for (job, latency) in &watch.latencies {
        println!(
            "  job_execution of job {job} queryable {} after the job ended",
            format_duration(latency.as_nanos() as u64)
        );
    }

    let pages = PageUrls {
        base: format!("{}/{project_path}/-", rails.url),
        api: format!("{}/api/v4/projects/{project}", rails.url),
    };
    failures.extend(check_telemetry_api(&pages, &watch.jobs, pipeline));
    print_where_to_look(&endpoints, &stack_dir, &trace_id);
    print_pages(&pages, &watch.jobs, pipeline);
    let pid = rails.release();
    let pid_dir = stack_dir.join("pids");
    std::fs::create_dir_all(&pid_dir)?;
    std::fs::write(pid_dir.join(RAILS_PID_FILE), format!("{pid}\n"))?;
    if !failures.is_empty() {
        bail!(
            "the demo's expectations failed:\n  {}",
            failures.join("\n  ")
        );
    }
    println!("All expectations met.");
    Ok(())
}

struct PageUrls {
    /// `http://.../<namespace>/<project>/-`
    base: String,
    /// `http://.../api/v4/projects/<id>`
    api: String,
}

impl PageUrls {
    /// The demo's admin token is the conformance suite's fixed, public test
    /// token, so a link can carry it.
    fn job(&self, job: u64) -> String {
        format!(
            "{}/jobs/{job}/telemetry?private_token={ADMIN_TOKEN}",
            self.base
        )
    }

    fn pipeline(&self, pipeline: u64) -> String {
        format!(
            "{}/pipelines/{pipeline}/telemetry?private_token={ADMIN_TOKEN}",
            self.base
        )
    }
}

/// Each job's telemetry through the Rails query layer: every job complete
/// (Rails' and the runner's spans), the pipeline summary with every job.
fn check_telemetry_api(pages: &PageUrls, jobs: &[Value], pipeline: u64) -> Vec<String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let get = |url: &str| -> Option<(u16, Value)> {
        let mut response = agent
            .get(url)
            .header("PRIVATE-TOKEN", ADMIN_TOKEN)
            .call()
            .ok()?;
        let status = response.status().as_u16();
        let body = response.body_mut().read_to_string().ok()?;
        Some((status, serde_json::from_str(&body).unwrap_or(Value::Null)))
    };
    let mut failures = Vec::new();
    for job in jobs {
        let id = job["id"].as_u64().unwrap_or_default();
        let url = format!("{}/jobs/{id}/telemetry", pages.api);
        // The spans are in ClickHouse already (watch_pipeline waited).
        match get(&url) {
            Some((200, body)) if body["complete"] == true => {}
            Some((status, body)) => failures.push(format!(
                "job {id}: telemetry API answered {status} {}",
                body.to_string().chars().take(200).collect::<String>()
            )),
            None => failures.push(format!("job {id}: telemetry API did not answer")),
        }
    }
    match get(&format!("{}/pipelines/{pipeline}/telemetry", pages.api)) {
        Some((200, body)) if body["jobs"].as_array().map(Vec::len) == Some(jobs.len()) => {}
        Some((status, _)) => failures.push(format!("pipeline telemetry API answered {status}")),
        None => failures.push("pipeline telemetry API did not answer".into()),
    }
    failures
}

fn print_pages(pages: &PageUrls, jobs: &[Value], pipeline: u64) {
    println!();
    println!("==> Open the telemetry pages (fake-rails keeps running with the stack)");
    println!("  Pipeline {pipeline}: {}", pages.pipeline(pipeline));
    for job in jobs {
        let id = job["id"].as_u64().unwrap_or_default();
        println!(
            "  Job {id} {:<12} {}",
            job["name"].as_str().unwrap_or("?"),
            pages.job(id)
        );
    }
    println!("  Stop everything with: cargo xtask stack down");
}

/// A pipeline id no earlier demo used: seconds since 2026-01-01.
/// The last [`LOG_LINES_PER_SPAN`] log lines of each span of the trace, read
/// back from `otel_logs` (keyed by `SpanId`), once every job has records.
fn last_log_lines(
    clickhouse: &ClickHouse,
    trace_id: &str,
    jobs: usize,
) -> Result<std::collections::HashMap<String, Vec<String>>> {
    let jobs_with_records = format!(
        "SELECT uniqExact(LogAttributes['ci.job.id']) FROM otel.otel_logs WHERE TraceId = '{trace_id}'"
    );
    let _ =
        conformance::process::wait_for("the jobs' log records", Duration::from_secs(30), || {
            Ok((clickhouse.count(&jobs_with_records)? >= jobs as u64).then_some(()))
        });
    let rows = clickhouse.json_rows(&format!(
        "SELECT SpanId, arraySlice(groupArray(Body), -{LOG_LINES_PER_SPAN}) AS lines FROM \
         (SELECT SpanId, Body FROM otel.otel_logs WHERE TraceId = '{trace_id}' \
          ORDER BY toUInt64OrZero(LogAttributes['ci.job.id']), toUInt64OrZero(LogAttributes['ci.log.line_number'])) \
         GROUP BY SpanId"
    ))?;
    let mut out = std::collections::HashMap::new();
    for row in rows {
        let span = row["SpanId"].as_str().unwrap_or_default().to_string();
        let lines: Vec<String> = row["lines"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|l| l.as_str())
                    .map(|l| l.chars().take(100).collect())
                    .collect()
            })
            .unwrap_or_default();
        out.insert(span, lines);
    }
    Ok(out)
}

/// Log lines shown under each span of the demo's trees.
const LOG_LINES_PER_SPAN: usize = 3;

fn first_id() -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    now.saturating_sub(1_767_225_600).max(1)
}

struct Watched {
    jobs: Vec<Value>,
    /// Job id -> time from the job's end to its span being queryable.
    latencies: BTreeMap<u64, Duration>,
}

/// Prints job status changes until the pipeline is done and every finished
/// job's `job_execution` span is in ClickHouse (or a deadline passes).
fn watch_pipeline(
    rails: &FakeRails,
    clickhouse: &ClickHouse,
    project: u64,
    pipeline: u64,
) -> Result<Watched> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen_status: HashMap<u64, String> = HashMap::new();
    let mut latencies = BTreeMap::new();
    let mut finished_at: Option<Instant> = None;
    loop {
        let jobs = rails.pipeline_jobs(project, pipeline)?;
        for job in &jobs {
            let id = job["id"].as_u64().unwrap_or_default();
            let status = job["status"].as_str().unwrap_or("?").to_string();
            if seen_status.get(&id) != Some(&status) {
                println!(
                    "  job {id:<4} {:<12} {status}",
                    job["name"].as_str().unwrap_or("?")
                );
                seen_status.insert(id, status.clone());
            }
            if matches!(status.as_str(), "success" | "failed") && !latencies.contains_key(&id) {
                if let Some(span) = job_execution_span(clickhouse, id)? {
                    latencies.insert(id, since_end(&span));
                }
            }
        }
        let all_done = jobs.iter().all(|j| {
            matches!(
                j["status"].as_str(),
                Some("success" | "failed" | "canceled" | "skipped")
            )
        });
        if all_done && finished_at.is_none() {
            finished_at = Some(Instant::now());
        }
        let all_spans = jobs
            .iter()
            .all(|j| latencies.contains_key(&j["id"].as_u64().unwrap_or_default()));
        let grace_over = finished_at.is_some_and(|t| t.elapsed() > Duration::from_secs(30));
        if (all_done && all_spans) || grace_over || Instant::now() > deadline {
            if !all_done {
                bail!("the pipeline did not finish in time");
            }
            return Ok(Watched { jobs, latencies });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn job_execution_span(clickhouse: &ClickHouse, job: u64) -> Result<Option<StoredSpan>> {
    let spans = trace::select(
        clickhouse,
        &format!("SpanName = 'job_execution' AND SpanAttributes['ci.job.id'] = '{job}'"),
    )?;
    Ok(spans.into_iter().next())
}

fn since_end(span: &StoredSpan) -> Duration {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    Duration::from_nanos(now.saturating_sub(span.end_ns()) as u64)
}

/// The root of a job's subtree: its `job_lifecycle` span, or whatever root
/// holds its `job_execution` span.
fn job_root(tree: &Tree, job: u64) -> Option<usize> {
    let id = job.to_string();
    tree.roots.iter().copied().find(|&r| {
        let span = &tree.spans[r];
        span.attribute("ci.job.id") == Some(id.as_str())
    })
}

fn check_job(tree: &Tree, job: &Value, trace_id: &str) -> Vec<String> {
    let id = job["id"].as_u64().unwrap_or_default();
    let name = job["name"].as_str().unwrap_or("?");
    let status = job["status"].as_str().unwrap_or("?");
    let mut failures = Vec::new();
    if let Some((_, want)) = EXPECTED.iter().find(|(n, _)| *n == name) {
        if status != *want {
            failures.push(format!("job `{name}` ended {status}, expected {want}"));
        }
    }
    let id_text = id.to_string();
    let of_job = |span_name: &str| {
        tree.spans
            .iter()
            .find(|s| s.name == span_name && s.attribute("ci.job.id") == Some(id_text.as_str()))
    };
    let Some(execution) = of_job("job_execution") else {
        failures.push(format!("job `{name}`: no job_execution span in ClickHouse"));
        return failures;
    };
    if execution.trace_id != trace_id {
        failures.push(format!(
            "job `{name}`: trace id {} instead of {trace_id}",
            execution.trace_id
        ));
    }
    match of_job("job_running") {
        Some(running) if running.span_id == execution.parent_span_id => {}
        Some(_) => failures.push(format!(
            "job `{name}`: job_execution is not a child of job_running"
        )),
        None => failures.push(format!("job `{name}`: no job_running span from Rails")),
    }
    if of_job("job_lifecycle").is_none() {
        failures.push(format!("job `{name}`: no job_lifecycle root span"));
    }
    if let Some((_, want)) = EXPECTED_CHILDREN.iter().find(|(n, _)| *n == name) {
        let got: Vec<&str> = tree
            .spans
            .iter()
            .filter(|s| s.parent_span_id == execution.span_id)
            .map(|s| s.name.as_str())
            .collect();
        for stage in *want {
            let wanted = want.iter().filter(|w| *w == stage).count();
            if got.iter().filter(|g| *g == stage).count() < wanted {
                failures.push(format!(
                    "job `{name}`: no `{stage}` span under job_execution (got {got:?})"
                ));
            }
        }
    }
    if execution.attribute("ci.job.status") != Some(status) {
        failures.push(format!(
            "job `{name}`: ci.job.status is {:?}, the job is {status}",
            execution.attribute("ci.job.status")
        ));
    }
    let is_error =
        execution.status_code.contains("Error") || execution.status_code.contains("ERROR");
    if (status == "failed") != is_error {
        failures.push(format!(
            "job `{name}`: span status {} for a {status} job",
            execution.status_code
        ));
    }
    failures
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

fn print_where_to_look(
    endpoints: &conformance::Endpoints,
    stack_dir: &std::path::Path,
    trace_id: &str,
) {
    println!();
    println!("==> Where the data is");
    println!("  The stack keeps running: ClickHouse at {}, collector at {} (OTLP/HTTP) and {} (OTLP/gRPC).",
        endpoints.clickhouse_url, endpoints.otlp_http, endpoints.otlp_grpc);
    println!(
        "  Credentials: {}",
        stack_dir.join("endpoints.env").display()
    );
    println!("  Look at this trace:");
    println!("    . {} && curl -s -u \"$CLICKHOUSE_USER:$CLICKHOUSE_PASSWORD\" \"$CLICKHOUSE_URL\" --data-binary \\", stack_dir.join("endpoints.env").display());
    println!("      \"SELECT SpanName, ServiceName, Duration/1e6 AS ms, StatusCode FROM otel.otel_traces WHERE TraceId = '{trace_id}' ORDER BY Timestamp FORMAT PrettyCompact\"");
    println!("  CI view: SELECT build_id, span_name, job_status, duration_ns FROM otel.ci_job_telemetry_traces ORDER BY start_time DESC LIMIT 20");
    println!("  With Docker, compose/docker-compose.yml runs the same schema with Grafana on http://localhost:3000.");
    println!("  Stop the stack with: cargo xtask stack down");
}
