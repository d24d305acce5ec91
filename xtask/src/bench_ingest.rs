//! `cargo xtask bench ingest`: how fast the embedded stack lands spans, next
//! to the engine's own ceiling, and what 5x that load does to it.
//!
//! 1. Engine ceiling: `compose/chdb-server/ingest_ceiling.py` inserts the
//!    same kind of rows straight into chDB through the same schema and views,
//!    in batches of several sizes (no HTTP, no collector), with the CPU its
//!    inserts used per 100,000 rows.
//! 2. Sustained: senders post pre-encoded 1,000-span OTLP/HTTP requests as
//!    fast as the collector answers for `SUSTAINED`; the landed rate is the
//!    spans accepted divided by the time until the last of them is stored
//!    (sending plus draining). Exact accounting: rows = distinct (TraceId,
//!    SpanId) = accepted, none without resource. Then the ratio to the best
//!    ceiling, and the CPU split (`cpu_split`): core-seconds per process and
//!    thread group, per 100,000 landed rows, next to the rest of the machine.
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

use crate::cpu_split;

const SENDERS: usize = 4;
const SPANS_PER_REQUEST: u64 = 1_000;
const SUSTAINED: Duration = Duration::from_secs(30);
const OVERLOAD: Duration = Duration::from_secs(60);
const OVERLOAD_FACTOR: f64 = 5.0;
const DRAIN_DEADLINE: Duration = Duration::from_secs(900);

pub fn run(args: &[String]) -> Result<()> {
    let skip_ceiling = args.iter().any(|a| a == "--no-ceiling");
    let skip_overload = args.iter().any(|a| a == "--no-overload");
    println!("==> Load average at start: {}", load_average());
    let ceiling = if skip_ceiling { None } else { Some(ceiling()?) };
    let stack = Stack::start(StackOptions::isolated())?;
    println!("==> Embedded stack up ({})", stack.dir().display());
    let clickhouse = stack.clickhouse();

    println!(
        "==> Sustained: {SENDERS} senders, {SPANS_PER_REQUEST} spans a request, {SUSTAINED:?}"
    );
    let watched = watched(&stack);
    let (report, landed_in, peaks) = with_memory(&stack, || {
        let before = cpu_split::snapshot(&watched);
        let sampler = CpuSampler::start(&watched, before.clone());
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
        let mut sent = sampler.latest();
        sent.update(cpu_split::snapshot(&watched));
        let sent_in = started.elapsed();
        let landed = wait_landed(&clickhouse, report.accepted, 0);
        let landed_in = started.elapsed();
        let mut after = sampler.stop();
        after.update(cpu_split::snapshot(&watched));
        (
            report,
            landed.map(|_| Phase {
                landed_in,
                sent_in,
                sending: cpu_split::split(&watched, &before, &sent),
                draining: cpu_split::split(&watched, &sent, &after),
                whole: cpu_split::split(&watched, &before, &after),
            }),
        )
    })?;
    let phase = landed_in?;
    let landed_in = phase.landed_in;
    let landed_rate = report.accepted as f64 / landed_in.as_secs_f64();
    println!(
        "  accepted {} spans in {:.1} s ({:.0}/s); all stored after {:.1} s: {landed_rate:.0} spans/s landed \
         (spans / (send + drain time))",
        report.accepted,
        report.elapsed.as_secs_f64(),
        report.accepted as f64 / report.elapsed.as_secs_f64(),
        landed_in.as_secs_f64()
    );
    print_report(&report, &peaks);
    let stored_before = accounting(&clickhouse, &report, 0)?;
    print_cpu(&phase, report.accepted);
    print_groups(&stack);
    if let Some(c) = &ceiling {
        let ours: f64 = phase.whole.processes.iter().map(|p| p.1).sum();
        let ours_per_100k = ours * 100_000.0 / report.accepted.max(1) as f64;
        println!(
            "  ratio: {landed_rate:.0} landed / {:.0} ceiling ({} rows an insert) = {:.0}%; CPU per 100k rows: \
             stack {ours_per_100k:.2} core-s, engine alone {:.2} core-s ({:.0}%)",
            c.rows_per_s,
            c.batch,
            100.0 * landed_rate / c.rows_per_s,
            c.cpu_s_per_100k,
            100.0 * c.cpu_s_per_100k / ours_per_100k.max(1e-9)
        );
    }
    println!("  load average: {}", load_average());
    if skip_overload {
        return Ok(());
    }

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

/// The best batch size's figures of `ingest_ceiling.py`.
struct Ceiling {
    batch: u64,
    rows_per_s: f64,
    cpu_s_per_100k: f64,
}

fn ceiling() -> Result<Ceiling> {
    println!("==> Engine ceiling: 1,000,000 spans straight into chDB (same schema and views)");
    let venv = conformance::venv::ensure(&mut |line| println!("  {line}"))?;
    let mut child = std::process::Command::new(venv.python())
        .arg(
            paths::compose_dir()
                .join("chdb-server")
                .join("ingest_ceiling.py"),
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running ingest_ceiling.py")?;
    let mut best: Option<Ceiling> = None;
    let stdout = child.stdout.take().context("ingest_ceiling.py's output")?;
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line.context("reading ingest_ceiling.py's output")?;
        println!("  {line}");
        let field = |name: &str| -> Option<f64> {
            line.split_whitespace()
                .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))?
                .parse()
                .ok()
        };
        if let (Some(batch), Some(rate), Some(cpu)) =
            (field("batch"), field("rows_per_s"), field("cpu_s_per_100k"))
        {
            if best.as_ref().is_none_or(|b| rate > b.rows_per_s) {
                best = Some(Ceiling {
                    batch: batch as u64,
                    rows_per_s: rate,
                    cpu_s_per_100k: cpu,
                });
            }
        }
    }
    let status = child.wait().context("running ingest_ceiling.py")?;
    if !status.success() {
        bail!("ingest_ceiling.py failed ({status})");
    }
    println!("  load average: {}", load_average());
    best.context("ingest_ceiling.py printed no figures")
}

/// Snapshots the watched processes' threads every 200 ms, so threads that
/// end (chdb-http's connection threads, rotel's blocking pool) keep their
/// names in the split.
struct CpuSampler {
    latest: Arc<Mutex<cpu_split::Snapshot>>,
    done: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl CpuSampler {
    fn start(watched: &[cpu_split::Watched], first: cpu_split::Snapshot) -> CpuSampler {
        let latest = Arc::new(Mutex::new(first));
        let done = Arc::new(AtomicBool::new(false));
        let thread = {
            let (latest, done, watched) = (latest.clone(), done.clone(), watched.to_vec());
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(200));
                    let now = cpu_split::snapshot(&watched);
                    latest.lock().unwrap().update(now);
                }
            })
        };
        CpuSampler {
            latest,
            done,
            thread,
        }
    }

    fn latest(&self) -> cpu_split::Snapshot {
        self.latest.lock().unwrap().clone()
    }

    fn stop(self) -> cpu_split::Snapshot {
        self.done.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        let latest = self.latest.lock().unwrap().clone();
        latest
    }
}

/// The sustained phase's timing and CPU split.
struct Phase {
    /// From the first request to the last accepted span stored.
    landed_in: Duration,
    /// From the first request to the senders' end.
    sent_in: Duration,
    sending: cpu_split::Split,
    draining: cpu_split::Split,
    whole: cpu_split::Split,
}

/// The processes whose CPU is split: the senders (this process), the
/// collector and chdb-http (the engine runs inside it).
fn watched(stack: &Stack) -> Vec<cpu_split::Watched> {
    let mut watched = vec![cpu_split::Watched {
        label: "senders (xtask, pre-encoded)".into(),
        pid: std::process::id(),
        classify: cpu_split::by_name,
    }];
    watched.extend(
        stack
            .pids()
            .into_iter()
            .map(|(name, pid)| cpu_split::Watched {
                label: name.to_string(),
                pid,
                classify: if name == "chdb-http" {
                    chdb_thread
                } else {
                    cpu_split::by_name
                },
            }),
    );
    watched
}

/// chdb-http's threads: its own Python threads are named by chdb-http
/// (`chdb-req`: one per HTTP connection, `chdb-commit`: the group
/// committer, which waits while the engine runs its insert); chDB runs a
/// query on threads of its own (`Unknown`, `ThreadPool`, unnamed ones
/// inherit `python`), merges parts on `MergeMutate` threads, and keeps a few
/// more in the background.
fn chdb_thread(name: &str) -> String {
    match name {
        "chdb-req" => "Python: HTTP requests (chdb-req)",
        "chdb-commit" => "Python: committer (chdb-commit)",
        "Unknown" | "ThreadPool" | "python" | "QueryPipelineEx" => "engine: queries (inserts)",
        "MergeMutate" => "engine: merges (MergeMutate)",
        "ended threads" => "ended threads",
        _ => "engine: other background threads",
    }
    .to_string()
}

fn print_cpu(phase: &Phase, landed: u64) {
    println!(
        "  CPU split, sending and draining ({:.1} s, 2 cores = {:.1} core-s):",
        phase.landed_in.as_secs_f64(),
        2.0 * phase.landed_in.as_secs_f64()
    );
    for line in phase.whole.lines(landed, 6) {
        println!("    {line}");
    }
    for (name, split, secs) in [
        ("while sending", &phase.sending, phase.sent_in.as_secs_f64()),
        (
            "while draining",
            &phase.draining,
            (phase.landed_in - phase.sent_in).as_secs_f64(),
        ),
    ] {
        let parts: Vec<String> = split
            .processes
            .iter()
            .map(|(label, core_s, _)| {
                let label = label.split(' ').next().unwrap_or(label);
                format!("{label} {:.2}", core_s / secs.max(1e-9))
            })
            .collect();
        println!(
            "  {name} ({secs:.1} s), cores used: {}, machine {:.2} of {:.0}",
            parts.join(", "),
            split.machine_busy / secs.max(1e-9),
            split.machine_total / secs.max(1e-9),
        );
    }
}

/// How large chdb-http's group commits were so far (its log has a line per
/// group: "Group insert of N requests, B bytes, in T ms").
fn print_groups(stack: &Stack) {
    let log = stack.dir().join("logs").join("chdb-http.log");
    let Ok(text) = std::fs::read_to_string(&log) else {
        return;
    };
    let (mut groups, mut requests, mut bytes, mut ms) = (0u64, 0u64, 0u64, 0u64);
    for line in text.lines() {
        let Some(rest) = line.split("Group insert of ").nth(1) else {
            continue;
        };
        let numbers: Vec<u64> = rest
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse().ok())
            .collect();
        if let [r, b, t, ..] = numbers[..] {
            groups += 1;
            requests += r;
            bytes += b;
            ms += t;
        }
    }
    if groups > 0 {
        println!(
            "  chdb-http group commits: {groups}, on average {:.0} requests, {:.1} MiB, {:.0} ms each",
            requests as f64 / groups as f64,
            bytes as f64 / groups as f64 / (1024.0 * 1024.0),
            ms as f64 / groups as f64
        );
    }
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
