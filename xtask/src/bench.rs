//! `cargo xtask bench`: performance measured side by side in one run and
//! reported as ratios (never asserted in tests).
//!
//! 1. `POST /api/v4/jobs/request` latency with the `ci_job_telemetry` flag on
//!    and off (the design's "no measurable increase" metric): two fake-rails
//!    instances exporting to the same embedded stack, requests interleaved.
//! 2. The reference runner's job duration with telemetry on and off: one
//!    runner, one pipeline per project, jobs interleaved.
//!
//! `cargo xtask bench ingest` measures the stack's ingest instead
//! (`bench_ingest`).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use conformance::gitlab::{init_repository, FakeRails, FakeRailsOptions};
use conformance::process::Lifetime;
use conformance::runner::{Runner, RunnerOptions};
use conformance::stack::{Stack, StackOptions};
use serde_json::json;

const REQUESTS: usize = 300;
const RUNNER_JOBS: usize = 20;

pub fn run(args: &[String]) -> Result<()> {
    if args.first().map(String::as_str) == Some("ingest") {
        return crate::bench_ingest::run(&args[1..]);
    }
    crate::test::build_binaries()?;
    let stack = Stack::start(StackOptions::isolated())?;
    println!("==> Embedded stack up ({})", stack.dir().display());
    request_latency(&stack)?;
    runner_overhead(&stack)?;
    Ok(())
}

fn pipeline_of(jobs: usize) -> String {
    (0..jobs)
        .map(|i| format!("job-{i}:\n  script:\n    - echo job {i}\n"))
        .collect()
}

fn start_rails(stack: &Stack, name: &str) -> Result<FakeRails> {
    let dir = stack.dir().join(name);
    std::fs::create_dir_all(dir.join("logs"))?;
    FakeRails::start(
        &dir,
        &FakeRailsOptions {
            otlp_endpoint: Some(stack.endpoints().otlp_http.clone()),
            ..FakeRailsOptions::default()
        },
        Lifetime::Owned,
    )
}

/// A project with `jobs` pending jobs, the flag set as asked; returns a
/// runner token to request them with.
fn prepare(rails: &FakeRails, dir: &std::path::Path, flag: bool, jobs: usize) -> Result<String> {
    let repo = init_repository(dir, &[])?;
    let (project, path) = rails.create_project("bench", Some(&repo))?;
    rails.set_telemetry_flag(flag, Some(&path))?;
    rails.create_pipeline(project, &pipeline_of(jobs))?;
    rails.register_runner("bench")
}

fn request_latency(stack: &Stack) -> Result<()> {
    println!("==> POST /api/v4/jobs/request latency, flag on vs off ({REQUESTS} requests each, interleaved)");
    let on = start_rails(stack, "rails-on")?;
    let off = start_rails(stack, "rails-off")?;
    let on_token = prepare(&on, &stack.dir().join("repo-on"), true, REQUESTS)?;
    let off_token = prepare(&off, &stack.dir().join("repo-off"), false, REQUESTS)?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let request = |rails: &FakeRails, token: &str| -> Result<Duration> {
        let started = Instant::now();
        let mut response = agent
            .post(&format!("{}/api/v4/jobs/request", rails.url))
            .send_json(json!({"token": token, "info": {"name": "bench", "executor": "shell"}}))?;
        let status = response.status();
        response.body_mut().read_to_vec()?;
        let elapsed = started.elapsed();
        anyhow::ensure!(status == 201, "expected a job, got {status}");
        Ok(elapsed)
    };
    let (mut with_flag, mut without) = (Vec::new(), Vec::new());
    for round in 0..REQUESTS {
        // Alternate which goes first, so neither always meets a warm cache.
        if round % 2 == 0 {
            with_flag.push(request(&on, &on_token)?);
            without.push(request(&off, &off_token)?);
        } else {
            without.push(request(&off, &off_token)?);
            with_flag.push(request(&on, &on_token)?);
        }
    }
    report("flag on ", "flag off", &mut with_flag, &mut without);
    Ok(())
}

fn runner_overhead(stack: &Stack) -> Result<()> {
    println!("==> Reference runner job duration, telemetry on vs off ({RUNNER_JOBS} jobs each, one runner)");
    let rails = start_rails(stack, "rails-runner")?;
    let mut projects = Vec::new();
    for (name, flag) in [("on", true), ("off", false)] {
        let repo = init_repository(&stack.dir().join(format!("runner-repo-{name}")), &[])?;
        let (project, path) = rails.create_project(&format!("bench-{name}"), Some(&repo))?;
        rails.set_telemetry_flag(flag, Some(&path))?;
        projects.push(project);
    }
    // One job at a time from each project, so the two kinds interleave.
    let mut pipelines = Vec::new();
    for _ in 0..RUNNER_JOBS {
        for project in &projects {
            pipelines.push((*project, rails.create_pipeline(*project, &pipeline_of(1))?));
        }
    }
    let token = rails.register_runner("bench")?;
    let runner_dir = stack.dir().join("runner");
    std::fs::create_dir_all(runner_dir.join("logs"))?;
    let runner = Runner::start(
        &runner_dir,
        &rails.url,
        &token,
        &RunnerOptions {
            otlp_endpoint: Some(stack.endpoints().otlp_http.clone()),
            otlp_protocol: Some("http/protobuf".into()),
            ..RunnerOptions::default()
        },
        Lifetime::Owned,
    )?;
    let (mut with_telemetry, mut without) = (Vec::new(), Vec::new());
    for (project, pipeline) in pipelines {
        let jobs = rails.wait_for_pipeline(project, pipeline, Duration::from_secs(120))?;
        let job = jobs.first().context("a job")?;
        anyhow::ensure!(job["status"] == "success", "bench job failed: {job}");
        let seconds = job["duration"].as_f64().context("job duration")?;
        let bucket = if project == projects[0] {
            &mut with_telemetry
        } else {
            &mut without
        };
        bucket.push(Duration::from_secs_f64(seconds));
    }
    drop(runner);
    report(
        "telemetry on ",
        "telemetry off",
        &mut with_telemetry,
        &mut without,
    );
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn report(a_name: &str, b_name: &str, a: &mut [Duration], b: &mut [Duration]) {
    a.sort();
    b.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    for (name, values) in [(a_name, &*a), (b_name, &*b)] {
        println!(
            "  {name}: p50 {:.2} ms  p95 {:.2} ms  (n={})",
            ms(percentile(values, 0.5)),
            ms(percentile(values, 0.95)),
            values.len()
        );
    }
    println!(
        "  ratio {}/{}: p50 {:.2}x  p95 {:.2}x",
        a_name.trim(),
        b_name.trim(),
        ms(percentile(a, 0.5)) / ms(percentile(b, 0.5)),
        ms(percentile(a, 0.95)) / ms(percentile(b, 0.95))
    );
}
