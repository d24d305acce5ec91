//! `cargo xtask bench logs`: job log export (issue 12). A job printing
//! [`LOG_LINES`] short lines with log export on vs off (telemetry on for
//! both; a fresh runner each), in a release build (`--dev-build`: the debug
//! build at hand), [`ROUNDS`] rounds alternating which side goes first:
//! the job's wall-time ratio (median, smallest and largest round), the log
//! records exported per second end to end (job start to the last record in
//! ClickHouse's `otel_logs`) beside the rate the collector accepted them
//! (job start to the runner's flush line, every record decided), the
//! runner's CPU time and peak RSS (`VmHWM`). `BENCH_LOG_LINES` and
//! `BENCH_LOG_ROUNDS` change the sizes.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use conformance::gitlab::{init_repository, FakeRails, FakeRailsOptions};
use conformance::process::Lifetime;
use conformance::runner::{Runner, RunnerOptions};
use conformance::stack::{Stack, StackOptions};

use super::stats;
use crate::cpu_split::{cpu_seconds, minor_faults};

/// Lines printed by the log export scenario's job.
const LOG_LINES: u64 = 1_000_000;
/// Rounds of (off, on) pairs. The job lasts about 0.17 s, so a few ms of
/// scheduling noise move one round's ratio by several percent: the median
/// of 9 rounds is what is compared with the goal.
const ROUNDS: usize = 9;

/// Starts an embedded stack and runs the scenario (binaries already built).
pub fn run() -> Result<()> {
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
    /// From the job's creation to the runner's flush line (every record
    /// accepted by the collector or dropped).
    accepted: Option<Duration>,
    /// From the job's creation to the last exported record in `otel_logs`.
    end_to_end: Option<Duration>,
    peak_rss: u64,
    /// The runner's user + system CPU time.
    cpu_seconds: f64,
    /// CPU seconds of each stack component (collector, database) from the
    /// job's creation until its records landed.
    stack_cpu: Vec<(String, f64)>,
    /// The runner's minor page faults (memory it touched for the first time).
    page_faults: u64,
}

fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn log_export(stack: &Stack) -> Result<()> {
    let lines: u64 = env_number("BENCH_LOG_LINES", LOG_LINES);
    let rounds: usize = env_number("BENCH_LOG_ROUNDS", ROUNDS).max(1);
    println!(
        "==> Job log export: a job printing {lines} lines, log export on vs off, {rounds} rounds"
    );
    let rails = start_rails(stack, "rails-logs")?;
    let mut pairs = Vec::new();
    let mut n = 0;
    for round in 0..rounds {
        // Alternate which side goes first.
        let order = match round % 2 {
            0 => [false, true],
            _ => [true, false],
        };
        let mut off = None;
        let mut on = None;
        for side in order {
            let run = one_run(stack, &rails, n, lines, side)?;
            n += 1;
            print_run(round, side, &run);
            match side {
                true => on = Some(run),
                false => off = Some(run),
            }
        }
        pairs.push((off.context("the off run")?, on.context("the on run")?));
    }
    let mut ratios: Vec<f64> = pairs
        .iter()
        .map(|(off, on)| on.job_seconds / off.job_seconds)
        .collect();
    ratios.sort_by(f64::total_cmp);
    let median = |values: Vec<f64>| stats::percentile(&values, 0.5);
    println!(
        "  job wall time, median: off {:.3} s, on {:.3} s",
        median(pairs.iter().map(|(off, _)| off.job_seconds).collect()),
        median(pairs.iter().map(|(_, on)| on.job_seconds).collect()),
    );
    println!(
        "  ratio on/off job wall time: {:.3}x (rounds {}; goal <= 1.05)",
        stats::percentile(&ratios, 0.5),
        ratios
            .iter()
            .map(|r| format!("{r:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let rates = |end: fn(&LogRun) -> Option<Duration>| -> String {
        let rates: Vec<f64> = pairs
            .iter()
            .filter_map(|(_, on)| end(on).map(|d| on.exported as f64 / d.as_secs_f64()))
            .collect();
        match rates.is_empty() {
            true => "-".into(),
            false => {
                let s = stats::spread(&rates);
                format!("{:.0} (min {:.0}, max {:.0})", s.value, s.min, s.max)
            }
        }
    };
    println!(
        "  accepted by the collector: {} records/s (job start to every record decided)",
        rates(|run| run.accepted)
    );
    println!(
        "  exported end to end into ClickHouse: {} records/s (goal >= 100k/s)",
        rates(|run| run.end_to_end)
    );
    Ok(())
}

fn print_run(round: usize, on: bool, run: &LogRun) {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let secs = |d: Option<Duration>| d.map_or("-".into(), |d| format!("{:.2}s", d.as_secs_f64()));
    match on {
        false => println!(
            "  round {round} log export off: job {:.3} s  runner CPU {:.2} s  peak RSS {:.1} MiB  page faults {}",
            run.job_seconds,
            run.cpu_seconds,
            mib(run.peak_rss),
            run.page_faults
        ),
        true => println!(
            "  round {round} log export on : job {:.3} s  runner CPU {:.2} s  peak RSS {:.1} MiB  page faults {}  records={} exported={} dropped={}  accepted after {}  landed after {}",
            run.job_seconds,
            run.cpu_seconds,
            mib(run.peak_rss),
            run.page_faults,
            run.records,
            run.exported,
            run.dropped,
            secs(run.accepted),
            secs(run.end_to_end),
        ),
    }
    if on && !run.stack_cpu.is_empty() {
        let split: Vec<String> = run
            .stack_cpu
            .iter()
            .map(|(name, cpu)| format!("{name} {cpu:.2} s"))
            .collect();
        println!("    stack CPU until landed: {}", split.join(", "));
    }
}

fn one_run(stack: &Stack, rails: &FakeRails, n: usize, lines: u64, on: bool) -> Result<LogRun> {
    let repo = init_repository(&stack.dir().join(format!("logs-repo-{n}")), &[])?;
    let (project, path) = rails.create_project(&format!("bench-logs-{n}"), Some(&repo))?;
    rails.set_telemetry_flag(true, Some(&path))?;
    let token = rails.register_runner("bench-logs")?;
    let dir = stack.dir().join(format!("runner-logs-{n}"));
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
    let stack_cpu = |stack: &Stack| -> Vec<(String, f64)> {
        stack
            .pids()
            .into_iter()
            .map(|(name, pid)| (name.to_string(), cpu_seconds(pid).unwrap_or(0.0)))
            .collect()
    };
    // Each side starts on a quiet stack: the engine's background merges of
    // the previous run's records would otherwise compete with this job.
    let clickhouse = stack.clickhouse();
    conformance::process::wait_for(
        "the engine's merges to end",
        Duration::from_secs(300),
        || Ok((clickhouse.count("SELECT count() FROM system.merges")? == 0).then_some(())),
    )?;
    let stack_before = stack_cpu(stack);
    let started = Instant::now();
    let pipeline =
        rails.create_pipeline(project, &format!("many:\n  script:\n    - seq 1 {lines}\n"))?;
    let jobs = rails.wait_for_pipeline(project, pipeline, Duration::from_secs(600))?;
    let job = jobs.first().context("a job")?;
    anyhow::ensure!(job["status"] == "success", "bench job failed: {job}");
    let job_id = job["id"].as_u64().context("job id")?;
    let job_seconds = job["duration"].as_f64().context("job duration")?;
    let (records, exported, dropped, accepted) = if on {
        let (records, exported, dropped) = flushed_line(&runner, job_id)?;
        (records, exported, dropped, Some(started.elapsed()))
    } else {
        (0, 0, 0, None)
    };
    let end_to_end = if on {
        let clickhouse = stack.clickhouse();
        // By the job's trace id (the root pipeline's id, zero-padded hex),
        // not by `LogAttributes['ci.job.id']`: each poll reads only the
        // TraceId column (its bloom filter skips earlier runs' granules)
        // instead of decompressing every record's attribute map, which would
        // take the engine's time from the inserts being measured.
        let query = format!("SELECT count() FROM otel.otel_logs WHERE TraceId = '{pipeline:032x}'");
        conformance::process::wait_for(
            "the exported records in otel_logs",
            Duration::from_secs(600),
            || Ok((clickhouse.count(&query)? >= exported).then_some(())),
        )?;
        Some(started.elapsed())
    } else {
        None
    };
    let stack_cpu = match on {
        true => stack_cpu(stack)
            .into_iter()
            .zip(stack_before)
            .map(|((name, after), (_, before))| (name, after - before))
            .collect(),
        false => Vec::new(),
    };
    let peak_rss = peak_rss(runner.pid()).unwrap_or(0);
    let cpu_seconds = cpu_seconds(runner.pid()).unwrap_or(0.0);
    let page_faults = minor_faults(runner.pid()).unwrap_or(0);
    drop(runner);
    Ok(LogRun {
        job_seconds,
        exported,
        dropped,
        records,
        accepted,
        end_to_end,
        peak_rss,
        cpu_seconds,
        stack_cpu,
        page_faults,
    })
}

/// `(log_records, exported, dropped)` from the runner's flush line of `job`.
fn flushed_line(runner: &Runner, job: u64) -> Result<(u64, u64, u64)> {
    conformance::process::wait_for(
        "the runner's telemetry flush line",
        Duration::from_secs(600),
        || Ok(conformance::log_lines::log_account(&runner.log(), job)),
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
