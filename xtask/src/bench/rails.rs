//! `POST /api/v4/jobs/request` latency with the `ci_job_telemetry` flag on
//! and off (the design's "no measurable increase"): two fake-rails
//! processes exporting their Rails spans to the same collector, requests
//! interleaved.

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use conformance::gitlab::{init_repository, FakeRails, FakeRailsOptions};
use conformance::process::Lifetime;
use serde_json::json;

use super::report::{Goal, Kind, Metric, Report};
use super::stats::{micros, paired_ratio, ratio, spread, summarize};
use super::Profile;

fn pipeline_of(jobs: usize) -> String {
    (0..jobs)
        .map(|i| format!("job-{i}:\n  script:\n    - echo job {i}\n"))
        .collect()
}

fn start_rails(dir: &Path, otlp_endpoint: &str) -> Result<FakeRails> {
    std::fs::create_dir_all(dir.join("logs"))?;
    FakeRails::start(
        dir,
        &FakeRailsOptions {
            otlp_endpoint: Some(otlp_endpoint.to_string()),
            ..FakeRailsOptions::default()
        },
        Lifetime::Owned,
    )
}

/// A project with `jobs` pending jobs, the flag set as asked; a runner token.
fn prepare(rails: &FakeRails, dir: &Path, flag: bool, jobs: usize) -> Result<String> {
    let repo = init_repository(dir, &[])?;
    let (project, path) = rails.create_project("bench", Some(&repo))?;
    rails.set_telemetry_flag(flag, Some(&path))?;
    for _ in 0..jobs.div_ceil(100) {
        rails.create_pipeline(project, &pipeline_of(100))?;
    }
    rails.register_runner("bench")
}

pub fn request_latency(
    report: &mut Report,
    profile: &Profile,
    dir: &Path,
    otlp_endpoint: &str,
) -> Result<()> {
    let scenario = "POST /api/v4/jobs/request, flag on vs off";
    let n = profile.requests;
    println!(
        "==> {scenario} ({n} requests a side, {} rounds, interleaved)",
        profile.rounds
    );
    let on = start_rails(&dir.join("rails-on"), otlp_endpoint)?;
    let off = start_rails(&dir.join("rails-off"), otlp_endpoint)?;
    let total = n * profile.rounds;
    let on_token = prepare(&on, &dir.join("repo-on"), true, total)?;
    let off_token = prepare(&off, &dir.join("repo-off"), false, total)?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let request = |rails: &FakeRails, token: &str| -> Result<f64> {
        let started = Instant::now();
        let mut response = agent
            .post(&format!("{}/api/v4/jobs/request", rails.url))
            .send_json(json!({"token": token, "info": {"name": "bench", "executor": "shell"}}))?;
        let status = response.status();
        response.body_mut().read_to_vec()?;
        let elapsed = micros(started.elapsed());
        anyhow::ensure!(status == 201, "expected a job, got {status}");
        Ok(elapsed)
    };
    let (mut p50s, mut p95s, mut on_p50, mut off_p50) = (vec![], vec![], vec![], vec![]);
    for _ in 0..profile.rounds {
        let (mut with_flag, mut without) = (Vec::new(), Vec::new());
        for i in 0..n {
            // Alternate which goes first, so neither always meets a warm cache.
            if i % 2 == 0 {
                with_flag.push(request(&on, &on_token)?);
                without.push(request(&off, &off_token)?);
            } else {
                without.push(request(&off, &off_token)?);
                with_flag.push(request(&on, &on_token)?);
            }
        }
        let (a, b) = (summarize(&with_flag), summarize(&without));
        p50s.push(paired_ratio(&with_flag, &without));
        p95s.push(ratio(a.p95, b.p95));
        on_p50.push(a.p50);
        off_p50.push(b.p50);
    }
    report.push(
        Metric::new(
            "jobs_request.p50_ratio",
            scenario,
            "latency, flag on/off (median of interleaved pairs)",
            Kind::Ratio,
            "x",
            0.0,
        )
        .over_rounds(spread(&p50s))
        .goal(Goal::AtMost(1.02)),
    );
    report.push(
        Metric::new(
            "jobs_request.p95_ratio",
            scenario,
            "latency p95, flag on/off",
            Kind::Ratio,
            "x",
            0.0,
        )
        .over_rounds(spread(&p95s)),
    );
    report.push(
        Metric::new(
            "jobs_request.p50_us.on",
            scenario,
            "  on: p50",
            Kind::Absolute,
            "µs",
            0.0,
        )
        .over_rounds(spread(&on_p50)),
    );
    report.push(
        Metric::new(
            "jobs_request.p50_us.off",
            scenario,
            "  off: p50",
            Kind::Absolute,
            "µs",
            0.0,
        )
        .over_rounds(spread(&off_p50)),
    );
    Ok(())
}
