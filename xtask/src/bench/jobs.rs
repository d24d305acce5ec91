//! A job's own time with telemetry on vs off, and the time from a job's end
//! to its final status reaching GitLab with the collector up, stalled, or
//! telemetry off. In-process, on the runner's API (`RunnerTelemetry`, the
//! same calls the reference runner's job flow makes), with real work in the
//! jobs: short jobs run three stages of real bash; the long job ends 1,000
//! spans, each around a fixed slice of CPU work.

use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use opentelemetry::KeyValue;
use runner_telemetry::{JobOutcome, JobTelemetry, RunnerIdentity, RunnerTelemetry, SpanOutcome};

use super::collector::{self, Collector};
use super::peer::{job_info, job_payload, our_settings, Protocol};
use super::report::{Goal, Kind, Metric, Report};
use super::stats::{micros, paired_ratio, percentile, ratio, spread, summarize};
use super::Profile;

fn runner(collector_url: &str) -> RunnerTelemetry {
    RunnerTelemetry::new(
        our_settings(Protocol::Http, collector_url, "gitlab-ci-runner"),
        RunnerIdentity {
            id: Some(1),
            name: "bench".into(),
            executor: "shell".into(),
        },
    )
}

fn start(telemetry: Option<&RunnerTelemetry>, job: usize) -> JobTelemetry {
    match telemetry {
        Some(t) => t.start_job(&job_payload(job), &job_info(job), SystemTime::now()),
        None => JobTelemetry::disabled(job as i64 + 1),
    }
}

fn end(job: JobTelemetry) {
    if let Some(flush) = job.finish(&JobOutcome::Success, SystemTime::now()) {
        tokio::spawn(flush.flush(Duration::from_secs(5)));
    }
}

/// Three stages, each one real `bash -c :`, like a tiny job's script.
async fn short_job(telemetry: Option<&RunnerTelemetry>, job: usize) -> Result<Duration> {
    let started = Instant::now();
    let mut t = start(telemetry, job);
    for stage in ["get_sources", "step_script", "after_script"] {
        let child = t.child(stage, vec![KeyValue::new("ci.stage.status", "success")]);
        let status = tokio::process::Command::new("bash")
            .args(["-c", ":"])
            .status()
            .await
            .context("running bash")?;
        anyhow::ensure!(status.success(), "bash failed");
        child.end(SpanOutcome::Ok);
    }
    end(t);
    Ok(started.elapsed())
}

/// CPU work of a fixed size.
fn work(iterations: u64) -> u64 {
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    for i in 0..iterations {
        x = black_box(x.rotate_left(5) ^ i).wrapping_mul(0x100_0000_01b3);
    }
    x
}

/// Iterations of [`work`] that take about `target` on this machine now.
fn calibrate(target: Duration) -> u64 {
    let mut iterations = 1000;
    loop {
        let t = Instant::now();
        black_box(work(iterations));
        let took = t.elapsed();
        if took >= Duration::from_millis(20) {
            return (iterations as f64 * target.as_secs_f64() / took.as_secs_f64()) as u64;
        }
        iterations *= 2;
    }
}

/// 999 children (and `job_execution`), each around `iterations` of work.
async fn big_job(telemetry: Option<&RunnerTelemetry>, job: usize, iterations: u64) -> Duration {
    let started = Instant::now();
    let mut t = start(telemetry, job);
    for i in 0..999 {
        let child = t.child(
            "ci_function",
            vec![
                KeyValue::new("ci.function.name", "bench/step"),
                KeyValue::new("ci.function.version", (i % 10) as i64),
            ],
        );
        black_box(work(iterations));
        child.end(SpanOutcome::Ok);
        if i % 64 == 63 {
            tokio::task::yield_now().await;
        }
    }
    end(t);
    started.elapsed()
}

pub fn wall_time(report: &mut Report, profile: &Profile, collector: &Collector) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    let telemetry = {
        let _guard = runtime.enter();
        runner(&collector.http_url)
    };
    let iterations = calibrate(Duration::from_micros(100));
    for (kind, jobs) in [
        ("short", profile.short_jobs),
        ("1000_spans", profile.big_jobs),
    ] {
        let scenario = match kind {
            "short" => "Job wall time, telemetry on vs off: short job (3 stages of real bash)".to_string(),
            _ => "Job wall time, telemetry on vs off: a job ending 1,000 spans (~100 µs of work each)".to_string(),
        };
        println!(
            "==> {scenario} ({jobs} jobs a side, {} rounds)",
            profile.rounds
        );
        let (mut p50s, mut p95s, mut on_p50, mut off_p50) = (vec![], vec![], vec![], vec![]);
        for round in 0..profile.rounds {
            let (mut on, mut off) = (Vec::new(), Vec::new());
            for i in 0..jobs {
                let job = round * jobs + i;
                let sides = if i % 2 == 0 {
                    [true, false]
                } else {
                    [false, true]
                };
                for with in sides {
                    let t = with.then_some(&telemetry);
                    let took = runtime.block_on(async {
                        match kind {
                            "short" => short_job(t, job).await,
                            _ => Ok(big_job(t, job, iterations).await),
                        }
                    })?;
                    if with { &mut on } else { &mut off }.push(micros(took));
                }
            }
            let (a, b) = (summarize(&on), summarize(&off));
            p50s.push(paired_ratio(&on, &off));
            p95s.push(ratio(a.p95, b.p95));
            on_p50.push(a.p50);
            off_p50.push(b.p50);
        }
        let id = |n: &str| format!("job_wall.{kind}.{n}");
        report.push(
            Metric::new(
                &id("p50_ratio"),
                &scenario,
                "wall time, on/off (median of interleaved pairs)",
                Kind::Ratio,
                "x",
                0.0,
            )
            .over_rounds(spread(&p50s))
            .goal(Goal::AtMost(1.01)),
        );
        report.push(
            Metric::new(
                &id("p95_ratio"),
                &scenario,
                "wall time p95, on/off",
                Kind::Ratio,
                "x",
                0.0,
            )
            .over_rounds(spread(&p95s)),
        );
        report.push(
            Metric::new(
                &id("p50_us.on"),
                &scenario,
                "  on: wall time p50",
                Kind::Absolute,
                "µs",
                0.0,
            )
            .over_rounds(spread(&on_p50)),
        );
        report.push(
            Metric::new(
                &id("p50_us.off"),
                &scenario,
                "  off: wall time p50",
                Kind::Absolute,
                "µs",
                0.0,
            )
            .over_rounds(spread(&off_p50)),
        );
    }
    runtime.block_on(telemetry.shutdown());
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Up,
    Stalled,
    Off,
}

/// A job with a few stage spans ends; the status is sent (as the runner's
/// job flow does: finish, then the status, then the flush in the
/// background); the time until GitLab (here the bench collector's job API
/// stub) has it.
pub fn status_latency(report: &mut Report, profile: &Profile, gitlab: &Collector) -> Result<()> {
    let scenario = "Job end to final status received: collector up vs stalled vs telemetry off";
    let samples = profile.status_samples;
    println!(
        "==> {scenario} ({samples} jobs a mode, {} rounds)",
        profile.rounds
    );
    let stalled = collector::start()?;
    stalled.stall(true);
    let runtime = tokio::runtime::Runtime::new()?;
    let (up_t, stalled_t) = {
        let _guard = runtime.enter();
        (runner(&gitlab.http_url), runner(&stalled.http_url))
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let status_url = format!("{}/api/v4/jobs/1", gitlab.gitlab_url);
    let modes = [Mode::Up, Mode::Stalled, Mode::Off];
    let mut per_mode: Vec<Vec<f64>> = vec![Vec::new(); 3];
    let mut ratios = Vec::new();
    for round in 0..profile.rounds {
        let mut this_round: Vec<Vec<f64>> = vec![Vec::new(); 3];
        for i in 0..samples {
            for k in 0..3 {
                // Rotate which mode goes first.
                let m = (i + k) % 3;
                let telemetry = match modes[m] {
                    Mode::Up => Some(&up_t),
                    Mode::Stalled => Some(&stalled_t),
                    Mode::Off => None,
                };
                let job = round * samples + i;
                let ended = runtime.block_on(async {
                    let mut t = start(telemetry, job);
                    for stage in ["get_sources", "step_script", "after_script"] {
                        t.child(stage, vec![]).end(SpanOutcome::Ok);
                    }
                    let ended = Instant::now();
                    let flush = t.finish(&JobOutcome::Success, SystemTime::now());
                    (ended, flush)
                });
                let (ended, flush) = ended;
                let response = agent
                    .put(&status_url)
                    .send_json(serde_json::json!({"state": "success"}))?;
                anyhow::ensure!(response.status() == 200, "status update refused");
                let received = gitlab.last_status().context("the status arrived")?;
                if let Some(flush) = flush {
                    runtime.spawn(flush.flush(Duration::from_secs(5)));
                }
                this_round[m].push(micros(received.saturating_duration_since(ended)));
            }
        }
        ratios.push(ratio(
            percentile(&this_round[1], 0.5),
            percentile(&this_round[0], 0.5),
        ));
        for (all, round) in per_mode.iter_mut().zip(this_round) {
            all.extend(round);
        }
    }
    let names = ["up", "stalled", "off"];
    for (m, name) in names.iter().enumerate() {
        let s = summarize(&per_mode[m]);
        report.push(Metric::new(
            &format!("status.{name}.p50_us"),
            scenario,
            &format!("  {name}: p50"),
            Kind::Absolute,
            "µs",
            s.p50,
        ));
        report.push(Metric::new(
            &format!("status.{name}.p95_us"),
            scenario,
            &format!("  {name}: p95"),
            Kind::Absolute,
            "µs",
            s.p95,
        ));
    }
    let delta_ms = (percentile(&per_mode[1], 0.95) - percentile(&per_mode[0], 0.95)) / 1e3;
    report.push(
        Metric::new(
            "status.stalled_minus_up_p95_ms",
            scenario,
            "stalled minus up, p95",
            Kind::Absolute,
            "ms",
            delta_ms,
        )
        .goal(Goal::AtMost(50.0)),
    );
    report.push(
        Metric::new(
            "status.stalled_over_up_p50_ratio",
            scenario,
            "stalled/up p50",
            Kind::Ratio,
            "x",
            0.0,
        )
        .over_rounds(spread(&ratios)),
    );
    drop(runtime);
    Ok(())
}
