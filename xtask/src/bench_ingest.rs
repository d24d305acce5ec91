//! `cargo xtask bench ingest`: how fast the embedded stack lands spans, next
//! to the engine's own ceiling, and what 5x that load does to it.
//!
//! 1. Engine ceiling: `compose/chdb-server/ingest_ceiling.py` inserts the
//!    same kind of rows straight into chDB through the same schema and views,
//!    in batches of several sizes (no HTTP, no collector).
//! 2. Sustained: senders post 1,000-span OTLP/HTTP requests as fast as the
//!    collector answers for `SUSTAINED`; the landed rate is the spans accepted
//!    divided by the time until the last of them is stored. Exact accounting:
//!    rows = distinct (TraceId, SpanId) = accepted, none without resource.
//! 3. Overload: 5x the landed rate offered for `OVERLOAD`, paced; the
//!    collector's and chdb-http's resident memory is sampled every 250 ms;
//!    afterwards the backlog drains and the same accounting runs (spans with
//!    no answer may or may not have landed; none may land twice).
//!
//! The machine is shared: the load average is printed with every figure.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use conformance::load::{self, LoadOptions, LoadReport};
use conformance::stack::{Stack, StackOptions};
use conformance::{paths, ClickHouse};

const SENDERS: usize = 4;
const SPANS_PER_REQUEST: u64 = 1_000;
const SUSTAINED: Duration = Duration::from_secs(30);
const OVERLOAD: Duration = Duration::from_secs(60);
const OVERLOAD_FACTOR: f64 = 5.0;
const DRAIN_DEADLINE: Duration = Duration::from_secs(900);

pub fn run(args: &[String]) -> Result<()> {
    let skip_ceiling = args.iter().any(|a| a == "--no-ceiling");
    println!("==> Load average at start: {}", load_average());
    if !skip_ceiling {
        ceiling()?;
    }
    let stack = Stack::start(StackOptions::isolated())?;
    println!("==> Embedded stack up ({})", stack.dir().display());
    let clickhouse = stack.clickhouse();

    println!(
        "==> Sustained: {SENDERS} senders, {SPANS_PER_REQUEST} spans a request, {SUSTAINED:?}"
    );
    let (report, landed_in, peaks) = with_memory(&stack, || {
        let started = Instant::now();
        let report = load::run(
            &stack.endpoints().otlp_http,
            &LoadOptions {
                senders: SENDERS,
                spans_per_request: SPANS_PER_REQUEST,
                duration: SUSTAINED,
                rate: None,
                request_timeout: Duration::from_secs(10),
            },
        );
        let landed = wait_landed(&clickhouse, report.accepted, 0);
        (report, landed.map(|_| started.elapsed()))
    })?;
    let landed_in = landed_in?;
    let landed_rate = report.accepted as f64 / landed_in.as_secs_f64();
    println!(
        "  accepted {} spans in {:.1} s ({:.0}/s); all stored after {:.1} s: {landed_rate:.0} spans/s landed",
        report.accepted,
        report.elapsed.as_secs_f64(),
        report.accepted as f64 / report.elapsed.as_secs_f64(),
        landed_in.as_secs_f64()
    );
    print_report(&report, &peaks);
    let stored_before = accounting(&clickhouse, &report, 0)?;
    println!("  load average: {}", load_average());

    let rate = landed_rate * OVERLOAD_FACTOR;
    println!(
        "==> Overload: {rate:.0} spans/s offered ({OVERLOAD_FACTOR}x) for {OVERLOAD:?}, {} senders",
        SENDERS * 2
    );
    let (report, drained_in, peaks) = with_memory(&stack, || {
        let report = load::run(
            &stack.endpoints().otlp_http,
            &LoadOptions {
                senders: SENDERS * 2,
                spans_per_request: SPANS_PER_REQUEST,
                duration: OVERLOAD,
                rate: Some(rate),
                request_timeout: Duration::from_secs(10),
            },
        );
        let started = Instant::now();
        let drained = wait_landed(&clickhouse, report.accepted, stored_before);
        (report, drained.map(|_| started.elapsed()))
    })?;
    print_report(&report, &peaks);
    match drained_in {
        Ok(d) => println!(
            "  backlog drained {:.1} s after the overload ended",
            d.as_secs_f64()
        ),
        Err(e) => println!("  backlog NOT drained: {e:#}"),
    }
    accounting(&clickhouse, &report, stored_before)?;
    println!("  load average: {}", load_average());
    Ok(())
}

fn ceiling() -> Result<()> {
    println!("==> Engine ceiling: 1,000,000 spans straight into chDB (same schema and views)");
    let venv = conformance::venv::ensure(&mut |line| println!("  {line}"))?;
    let status = std::process::Command::new(venv.python())
        .arg(
            paths::compose_dir()
                .join("chdb-server")
                .join("ingest_ceiling.py"),
        )
        .status()
        .context("running ingest_ceiling.py")?;
    if !status.success() {
        bail!("ingest_ceiling.py failed ({status})");
    }
    println!("  load average: {}", load_average());
    Ok(())
}

/// Waits until `stored_before + accepted` rows are in `otel_traces`.
fn wait_landed(clickhouse: &ClickHouse, accepted: u64, stored_before: u64) -> Result<u64> {
    conformance::process::wait_for("the accepted spans to be stored", DRAIN_DEADLINE, || {
        let n = clickhouse.count("SELECT count() FROM otel.otel_traces")?;
        Ok((n >= stored_before + accepted).then_some(n))
    })
}

/// Rows, distinct spans and spans without resource; returns the rows stored.
fn accounting(clickhouse: &ClickHouse, report: &LoadReport, stored_before: u64) -> Result<u64> {
    let rows = clickhouse.count("SELECT count() FROM otel.otel_traces")?;
    let distinct = clickhouse.count("SELECT uniqExact(TraceId, SpanId) FROM otel.otel_traces")?;
    let without = clickhouse.count(
        "SELECT countIf(ServiceName = '' OR empty(ResourceAttributes)) FROM otel.otel_traces",
    )?;
    let new_rows = rows - stored_before;
    println!(
        "  accounting: {new_rows} rows stored for {} spans accepted (+{} without answer, {} refused); \
         duplicates {}; without resource {without}",
        report.accepted,
        report.failed,
        report.refused,
        rows - distinct
    );
    let exact = new_rows >= report.accepted
        && new_rows <= report.accepted + report.failed
        && rows == distinct
        && without == 0;
    println!("  accounting {}", if exact { "OK" } else { "FAILED" });
    Ok(rows)
}

fn print_report(report: &LoadReport, peaks: &Peaks) {
    println!(
        "  senders: accepted {} refused {} no answer {} in {:.1} s",
        report.accepted,
        report.refused,
        report.failed,
        report.elapsed.as_secs_f64()
    );
    let memory: Vec<String> = peaks
        .iter()
        .map(|(name, bytes)| format!("{name} {:.0} MiB", *bytes as f64 / (1024.0 * 1024.0)))
        .collect();
    println!("  peak resident memory: {}", memory.join(", "));
}

/// Peak resident memory per process, in bytes.
type Peaks = Vec<(String, u64)>;

/// Runs `work` while sampling the stack's processes' resident memory;
/// returns what `work` returned and the peak per process.
fn with_memory<A, B>(stack: &Stack, work: impl FnOnce() -> (A, B)) -> Result<(A, B, Peaks)> {
    let pids: Vec<(String, u32)> = stack
        .pids()
        .into_iter()
        .map(|(n, p)| (n.to_string(), p))
        .collect();
    let peaks = Arc::new(Mutex::new(
        pids.iter()
            .map(|(n, _)| (n.clone(), 0u64))
            .collect::<Vec<_>>(),
    ));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let peaks = peaks.clone();
        let done = done.clone();
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                for (i, (_, pid)) in pids.iter().enumerate() {
                    let rss = load::rss_bytes(*pid).unwrap_or(0);
                    let mut peaks = peaks.lock().unwrap();
                    peaks[i].1 = peaks[i].1.max(rss);
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        })
    };
    let (a, b) = work();
    done.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let peaks = peaks.lock().unwrap().clone();
    Ok((a, b, peaks))
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}
