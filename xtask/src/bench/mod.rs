//! `cargo xtask bench`: every performance goal measured side by side in one
//! run, in a release build, and reported as a table, `target/bench/report.json`
//! and `target/bench/report.md` (with an SVG chart of the ratios against
//! their goals). `--gate` runs a short profile and compares the ratios and
//! loss counts (never absolute times) with `xtask/bench-thresholds.toml`.
//!
//! Scenarios, each with its goal beside its figure:
//! - our export client vs the stock pipeline (`BatchSpanProcessor` +
//!   `opentelemetry-otlp`), HTTP/protobuf and gRPC, into a collector that
//!   accepts at once, into the real embedded stack, and into one answering
//!   503 + `Retry-After` for a while ([`export`], peers in [`peer`]);
//! - job wall time with telemetry on vs off, and job end to final status
//!   with the collector up, stalled, or telemetry off ([`jobs`]);
//! - `POST /api/v4/jobs/request` with the flag on vs off ([`rails`]);
//! - job end to span queryable, stack ingest (spans/s and job log lines/s),
//!   trace lookup at 10 million spans ([`stack`]).
//!
//! Sides always run interleaved in the same run (alternating which goes
//! first), so a ratio compares like with like even on a busy machine;
//! latencies are kept in microseconds; most scenarios run three rounds and
//! report the median ratio with the smallest and largest round.

mod collector;
mod export;
pub mod gate;
mod jobs;
mod logs;
pub mod peer;
mod rails;
pub mod report;
mod stack;
mod stats;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use conformance::paths;
use conformance::stack::{Stack, StackOptions};

use export::{Sink, Target};
use peer::Protocol;
use report::{Machine, Report};

/// The sizes of one run.
#[derive(Debug, Clone)]
pub struct Profile {
    pub name: &'static str,
    pub rounds: usize,
    pub export_jobs: usize,
    pub export_spans_per_job: usize,
    pub outage: Duration,
    pub outage_rounds: usize,
    pub short_jobs: usize,
    pub big_jobs: usize,
    pub status_samples: usize,
    pub requests: usize,
    /// The scenarios that need the embedded stack (and minutes) run.
    pub stack: bool,
    pub query_samples: usize,
    pub ingest_jobs: usize,
    /// Jobs printing log lines (log export on) into the stack, and lines
    /// each.
    pub log_jobs: usize,
    pub log_lines_per_job: usize,
    pub lookup_spans: u64,
    pub lookup_samples: usize,
}

impl Profile {
    pub fn full() -> Profile {
        Profile {
            name: "full",
            rounds: 3,
            export_jobs: 20,
            export_spans_per_job: 500,
            outage: Duration::from_secs(30),
            outage_rounds: 1,
            short_jobs: 40,
            big_jobs: 8,
            status_samples: 30,
            requests: 300,
            stack: true,
            query_samples: 20,
            ingest_jobs: 100,
            log_jobs: 20,
            log_lines_per_job: 10_000,
            lookup_spans: 10_000_000,
            lookup_samples: 100,
        }
    }

    /// The gate's: at most 3 minutes on a 2-core machine, no stack.
    pub fn short() -> Profile {
        Profile {
            name: "short (gate)",
            rounds: 3,
            export_jobs: 20,
            export_spans_per_job: 500,
            outage: Duration::from_secs(1),
            outage_rounds: 1,
            short_jobs: 40,
            big_jobs: 10,
            status_samples: 20,
            requests: 200,
            stack: false,
            query_samples: 0,
            ingest_jobs: 0,
            log_jobs: 0,
            log_lines_per_job: 0,
            lookup_spans: 0,
            lookup_samples: 0,
        }
    }
}

/// Set in the re-executed release build.
const RELEASE_VAR: &str = "XTASK_BENCH_RELEASE";

pub fn run(args: &[String]) -> Result<()> {
    if args.first().map(String::as_str) == Some("ingest") {
        return crate::bench_ingest::run(&args[1..]);
    }
    let logs = args.first().map(String::as_str) == Some("logs");
    let args = match logs {
        true => &args[1..],
        false => args,
    };
    let mut gate = false;
    let mut dev_build = false;
    let mut profile = Profile::full();
    for arg in args {
        match arg.as_str() {
            "--gate" => {
                gate = true;
                profile = Profile::short();
            }
            "--short" => profile = Profile::short(),
            // The build at hand (`cargo xtask test`'s debug build) instead of a
            // release build: CI gates ratios and losses without a second,
            // optimised build of the workspace.
            "--dev-build" => dev_build = true,
            other => {
                bail!("unknown bench option `{other}` (expected --gate, --short or --dev-build)")
            }
        }
    }
    if cfg!(debug_assertions) && !dev_build && std::env::var_os(RELEASE_VAR).is_none() {
        let mut again = Vec::new();
        if logs {
            again.push("logs".to_string());
        }
        again.extend(args.iter().cloned());
        return rerun_in_release(&again);
    }
    let fake_rails = release_dir().join("fake-rails");
    if std::env::var_os("CONFORMANCE_FAKE_RAILS_BIN").is_none() && fake_rails.is_file() {
        // Still single-threaded here: nothing reads the environment
        // concurrently.
        std::env::set_var("CONFORMANCE_FAKE_RAILS_BIN", fake_rails);
    }
    if logs {
        if dev_build {
            crate::build::build_binaries()?;
        } else if std::env::var_os("CONFORMANCE_CI_RUNNER_BIN").is_none() {
            // `workspace_binary` looks beside a test binary (target/<profile>/deps),
            // not beside xtask: name the release runner.
            std::env::set_var("CONFORMANCE_CI_RUNNER_BIN", release_dir().join("ci-runner"));
        }
        return logs::run();
    }
    let dir = paths::target_dir().join("bench");
    let report = measure(&profile, &dir)?;
    report.write(&dir)?;
    println!("\n{}", report.table());
    println!(
        "==> Wrote {} and {} ({:.0} s, load average {} -> {})",
        dir.join("report.json").display(),
        dir.join("report.md").display(),
        report.elapsed_secs,
        report.machine.load_before,
        report.machine.load_after
    );
    if gate {
        gate::check(&report, &gate::Thresholds::load()?)?;
    }
    Ok(())
}

fn release_dir() -> PathBuf {
    paths::target_dir().join("release")
}

/// Builds what the bench runs in release mode and runs the bench there.
fn rerun_in_release(args: &[String]) -> Result<()> {
    // The same packages every time, so that features (and artifacts) match.
    println!("==> cargo build --release -p xtask -p ci-runner -p fake-rails");
    let status = crate::build::cargo()
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "xtask",
            "-p",
            "ci-runner",
            "-p",
            "fake-rails",
        ])
        .status()
        .context("running cargo build --release")?;
    if !status.success() {
        bail!("cargo build --release failed ({status})");
    }
    let status = Command::new(release_dir().join("xtask"))
        .arg("bench")
        .args(args)
        .env(RELEASE_VAR, "1")
        .status()
        .context("running the release build of xtask")?;
    if !status.success() {
        bail!("cargo xtask bench failed ({status})");
    }
    Ok(())
}

/// Runs every scenario of `profile`; the report so far is written to `dir`
/// after each, so a long run that is cut short still leaves its figures.
fn measure(profile: &Profile, dir: &std::path::Path) -> Result<Report> {
    let started = Instant::now();
    let mut report = Report {
        profile: profile.name.into(),
        rounds: profile.rounds,
        machine: Machine {
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            load_before: Machine::load_now(),
            load_after: String::new(),
        },
        ..Report::default()
    };
    println!(
        "==> cargo xtask bench, {} profile, {} cores, load average {}",
        profile.name, report.machine.cores, report.machine.load_before
    );
    report.note(format!(
        "Export scenarios: {} concurrent jobs x {} spans ({} spans), each stage span with 5 attributes; each side in its own process (CPU time and peak RSS are the process's); the stock pipeline is `BatchSpanProcessor` + `opentelemetry-otlp` 0.33 at their defaults (the blocking reqwest client for HTTP, tonic for gRPC).",
        profile.export_jobs,
        profile.export_spans_per_job,
        profile.export_jobs * profile.export_spans_per_job
    ));
    let collector = collector::start()?;
    for protocol in [Protocol::Http, Protocol::Grpc] {
        export::scenario(
            &mut report,
            profile,
            Sink::Collector(&collector),
            Target::Accept,
            protocol,
            profile.rounds,
        )?;
    }
    for protocol in [Protocol::Http, Protocol::Grpc] {
        export::scenario(
            &mut report,
            profile,
            Sink::Collector(&collector),
            Target::Outage(profile.outage),
            protocol,
            profile.outage_rounds,
        )?;
    }
    collector.reset();
    jobs::wall_time(&mut report, profile, &collector)?;
    report.write(dir)?;
    jobs::status_latency(&mut report, profile, &collector)?;
    report.write(dir)?;
    let scratch = paths::target_dir().join("bench").join("work");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    if !profile.stack {
        rails::request_latency(&mut report, profile, &scratch, &collector.http_url)?;
    } else {
        conformance::venv::ensure(&mut |line| println!("  {line}"))?;
        let stack = Stack::start(StackOptions::isolated())?;
        println!("==> Embedded stack up ({})", stack.dir().display());
        rails::request_latency(&mut report, profile, &scratch, &stack.endpoints().otlp_http)?;
        report.write(dir)?;
        for protocol in [Protocol::Http, Protocol::Grpc] {
            export::scenario(
                &mut report,
                profile,
                Sink::Stack(&stack),
                Target::Stack,
                protocol,
                profile.rounds,
            )?;
        }
        stack::queryable(&mut report, profile, &stack)?;
        report.write(dir)?;
        stack::ingest(&mut report, profile, &stack)?;
        report.write(dir)?;
        stack::log_ingest(&mut report, profile, &stack)?;
        report.write(dir)?;
        stack::lookup(&mut report, profile, &stack)?;
    }
    report.machine.load_after = Machine::load_now();
    report.elapsed_secs = started.elapsed().as_secs_f64();
    Ok(report)
}
