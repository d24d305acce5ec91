//! `cargo xtask bench logs`: job log export (issue 12). A job printing
//! [`LOG_LINES`] short lines with log export on vs off (telemetry on for
//! both; a fresh runner each): the job's wall-time ratio, the log records
//! exported per second end to end (job start to the last record in
//! ClickHouse's `otel_logs`), and the runner's peak RSS (`VmHWM`).
//! `BENCH_LOG_LINES` changes the count.

use std::time::Duration;

use anyhow::{Context, Result};
use conformance::gitlab::{init_repository, FakeRails, FakeRailsOptions};
use conformance::process::Lifetime;
use conformance::runner::{Runner, RunnerOptions};
use conformance::stack::{Stack, StackOptions};

/// Lines printed by the log export scenario's job.
const LOG_LINES: u64 = 1_000_000;

/// Starts an embedded stack and runs the scenario.
pub fn run() -> Result<()> {
    crate::test::build_binaries()?;
    let stack = Stack::start(StackOptions::isolated())?;
    println!("==> Embedded stack up ({})", stack.dir().display());
    log_export(&stack)
}

/// One job printing `lines` lines on a fresh runner, log export `on` or not.
struct LogRun {
    job_seconds: f64,
    exported: u64,
    dropped: u64,
    records: u64,
    /// From the job's start to the last exported record in `otel_logs`.
    end_to_end: Option<Duration>,
    peak_rss: u64,
}

fn log_export(stack: &Stack) -> Result<()> {
    let lines: u64 = std::env::var("BENCH_LOG_LINES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(LOG_LINES);
    println!("==> Job log export: a job printing {lines} lines, log export on vs off");
    let rails = start_rails(stack, "rails-logs")?;
    let mut runs = Vec::new();
    for (round, on) in [(0, false), (1, true)] {
        let repo = init_repository(&stack.dir().join(format!("logs-repo-{round}")), &[])?;
        let (project, path) = rails.create_project(&format!("bench-logs-{round}"), Some(&repo))?;
        rails.set_telemetry_flag(true, Some(&path))?;
        let token = rails.register_runner("bench-logs")?;
        let dir = stack.dir().join(format!("runner-logs-{round}"));
        std::fs::create_dir_all(dir.join("logs"))?;
        let mut options = RunnerOptions {
            otlp_endpoint: Some(stack.endpoints().otlp_http.clone()),
            otlp_protocol: Some("http/protobuf".into()),
            flush_timeout_secs: Some(600),
            ..RunnerOptions::default()
        };
        if on {
            options
                .extra_env
                .push(("CI_TELEMETRY_LOGS".into(), "true".into()));
        }
        let runner = Runner::start(&dir, &rails.url, &token, &options, Lifetime::Owned)?;
        let started = std::time::SystemTime::now();
        let pipeline =
            rails.create_pipeline(project, &format!("many:\n  script:\n    - seq 1 {lines}\n"))?;
        let jobs = rails.wait_for_pipeline(project, pipeline, Duration::from_secs(600))?;
        let job = jobs.first().context("a job")?;
        anyhow::ensure!(job["status"] == "success", "bench job failed: {job}");
        let job_id = job["id"].as_u64().context("job id")?;
        let job_seconds = job["duration"].as_f64().context("job duration")?;
        let (records, exported, dropped) = if on {
            flushed_line(&runner, job_id)?
        } else {
            (0, 0, 0)
        };
        let end_to_end = if on {
            let clickhouse = stack.clickhouse();
            let query = format!(
                "SELECT count() FROM otel.otel_logs WHERE LogAttributes['ci.job.id'] = '{job_id}'"
            );
            conformance::process::wait_for(
                "the exported records in otel_logs",
                Duration::from_secs(600),
                || Ok((clickhouse.count(&query)? >= exported).then_some(())),
            )?;
            Some(started.elapsed().unwrap_or_default())
        } else {
            None
        };
        let peak_rss = peak_rss(runner.pid()).unwrap_or(0);
        drop(runner);
        runs.push(LogRun {
            job_seconds,
            exported,
            dropped,
            records,
            end_to_end,
            peak_rss,
        });
    }
    let (off, on) = (&runs[0], &runs[1]);
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "  log export off: job {:.2} s  peak RSS {:.1} MiB",
        off.job_seconds,
        mib(off.peak_rss)
    );
    println!(
        "  log export on : job {:.2} s  peak RSS {:.1} MiB  records={} exported={} dropped={}",
        on.job_seconds,
        mib(on.peak_rss),
        on.records,
        on.exported,
        on.dropped
    );
    println!(
        "  ratio on/off job wall time: {:.3}x (goal <= 1.05)",
        on.job_seconds / off.job_seconds
    );
    if let Some(elapsed) = on.end_to_end {
        println!(
            "  exported end to end into ClickHouse: {:.0} records/s ({} in {:.2} s; goal >= 100k/s)",
            on.exported as f64 / elapsed.as_secs_f64(),
            on.exported,
            elapsed.as_secs_f64()
        );
    }
    Ok(())
}

/// `(log_records, exported, dropped)` from the runner's flush line of `job`.
fn flushed_line(runner: &Runner, job: u64) -> Result<(u64, u64, u64)> {
    conformance::process::wait_for(
        "the runner's telemetry flush line",
        Duration::from_secs(600),
        || {
            let log = runner.log();
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
                    .unwrap_or(0)
            };
            Ok(Some((
                field("log_records"),
                field("log_records_exported"),
                field("log_records_dropped"),
            )))
        },
    )
}

/// The process's peak resident memory (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
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
