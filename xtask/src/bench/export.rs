//! Our export client against the stock pipeline, same workload, each side in
//! its own peer process (see [`super::peer`]), sides interleaved round by
//! round, into (a) a collector that accepts at once, (b) the real embedded
//! stack, (c) a collector answering 503 + `Retry-After` for a while, then
//! recovering.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::collector::Collector;
use super::peer::{PeerConfig, PeerResult, Protocol, Side};
use super::report::{Goal, Kind, Metric, Report};
use super::stats::{ratio, spread};
use super::Profile;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Accept,
    Stack,
    Outage(Duration),
}

impl Target {
    fn id(self) -> &'static str {
        match self {
            Target::Accept => "accept",
            Target::Stack => "stack",
            Target::Outage(_) => "outage",
        }
    }

    fn title(self) -> String {
        match self {
            Target::Accept => "a collector that accepts at once".into(),
            Target::Stack => "the embedded stack (rotel -> chDB)".into(),
            Target::Outage(d) => format!("503 + Retry-After for {} s, then 200", d.as_secs()),
        }
    }
}

/// Where spans go and how delivered ones are counted.
pub enum Sink<'a> {
    Collector(&'a Collector),
    Stack(&'a conformance::stack::Stack),
}

/// One side's run: what the peer saw, what arrived.
#[derive(Debug, Clone, Default)]
pub struct Run {
    pub peer: PeerResult,
    pub delivered: u64,
    /// Export requests the bench's collector accepted (0 for the stack).
    pub requests: u64,
}

impl Run {
    fn lost(&self) -> u64 {
        self.peer.spans.saturating_sub(self.delivered)
    }

    fn uncounted(&self) -> u64 {
        self.lost().saturating_sub(self.peer.counted_drops)
    }

    fn rate(&self) -> f64 {
        self.delivered as f64 / self.peer.elapsed_secs
    }

    fn cpu_per_span_us(&self) -> f64 {
        self.peer.cpu_secs * 1e6 / self.peer.spans.max(1) as f64
    }
}

/// This program, to run as a peer. `cargo xtask test` builds the workspace's
/// binaries while xtask runs, which replaces xtask's own file: the running
/// process's `/proc/self/exe` then names the deleted file, and the program
/// at the same path is this one, rebuilt from the same sources.
fn own_exe() -> Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    if exe.exists() {
        return Ok(exe);
    }
    let name = exe.to_string_lossy();
    Ok(std::path::PathBuf::from(
        name.strip_suffix(" (deleted)").unwrap_or(&name),
    ))
}

pub fn spawn_peer(config: &PeerConfig) -> Result<PeerResult> {
    let exe = own_exe()?;
    let output = Command::new(&exe)
        .arg("bench-peer")
        .arg(serde_json::to_string(config)?)
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_BSP_MAX_QUEUE_SIZE")
        .env_remove("OTEL_BSP_MAX_EXPORT_BATCH_SIZE")
        .env_remove("OTEL_BSP_SCHEDULE_DELAY")
        .env("RUST_LOG", "off")
        .output()
        .with_context(|| format!("starting a bench peer ({})", exe.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "bench peer {config:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let line = stdout
        .lines()
        .last()
        .context("the bench peer printed nothing")?;
    serde_json::from_str(line).with_context(|| format!("reading the peer's result {line:?}"))
}

fn run_side(
    sink: &Sink<'_>,
    target: Target,
    protocol: Protocol,
    side: Side,
    profile: &Profile,
    tag: &str,
) -> Result<Run> {
    let service_name = format!("bench-{}-{tag}", side.name());
    let endpoint = match (sink, protocol) {
        (Sink::Collector(c), Protocol::Http) => c.http_url.clone(),
        (Sink::Collector(c), Protocol::Grpc) => c.grpc_url.clone(),
        (Sink::Stack(s), Protocol::Http) => s.endpoints().otlp_http.clone(),
        (Sink::Stack(s), Protocol::Grpc) => s.endpoints().otlp_grpc.clone(),
    };
    let outage = match target {
        Target::Outage(d) => d,
        _ => Duration::ZERO,
    };
    if let Sink::Collector(c) = sink {
        c.reset();
        if !outage.is_zero() {
            c.refuse_for(outage);
        }
    }
    let config = PeerConfig {
        side,
        protocol,
        endpoint,
        service_name: service_name.clone(),
        jobs: profile.export_jobs,
        spans_per_job: profile.export_spans_per_job,
        settle_secs: outage.as_secs_f64() + 20.0,
        buffer_max_spans: None,
    };
    let peer = spawn_peer(&config)?;
    let (delivered, requests) = match sink {
        Sink::Collector(c) => (
            c.wait_for_spans(peer.spans, Duration::from_secs(2)),
            c.requests(),
        ),
        Sink::Stack(s) => (landed(s, &service_name, peer.spans)?, 0),
    };
    Ok(Run {
        peer,
        delivered,
        requests,
    })
}

/// Rows of `service` in ClickHouse once their count reached `expected` or
/// stopped growing for 5 s.
fn landed(stack: &conformance::stack::Stack, service: &str, expected: u64) -> Result<u64> {
    let clickhouse = stack.clickhouse();
    let sql = format!("SELECT count() FROM otel.otel_traces WHERE ServiceName = '{service}'");
    let (mut last, mut since) = (0, Instant::now());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let count = clickhouse.count(&sql)?;
        if count >= expected || Instant::now() > deadline {
            return Ok(count);
        }
        if count != last {
            (last, since) = (count, Instant::now());
        } else if since.elapsed() > Duration::from_secs(5) {
            return Ok(count);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn scenario(
    report: &mut Report,
    profile: &Profile,
    sink: Sink<'_>,
    target: Target,
    protocol: Protocol,
    rounds: usize,
) -> Result<()> {
    let scenario = format!(
        "Export client vs stock pipeline, OTLP/{}, into {}",
        protocol.name(),
        target.title()
    );
    println!(
        "==> {scenario} ({} jobs x {} spans, {rounds} round(s))",
        profile.export_jobs, profile.export_spans_per_job
    );
    let mut runs: Vec<(Run, Run)> = Vec::new();
    for round in 0..rounds {
        let tag = format!(
            "{}-{}-{round}-{}",
            target.id(),
            protocol.name(),
            std::process::id()
        );
        let order = if round % 2 == 0 {
            [Side::Ours, Side::Stock]
        } else {
            [Side::Stock, Side::Ours]
        };
        let mut ours = Run::default();
        let mut stock = Run::default();
        for side in order {
            let run = run_side(&sink, target, protocol, side, profile, &tag)?;
            match side {
                Side::Ours => ours = run,
                Side::Stock => stock = run,
            }
        }
        println!(
            "  round {round}: ours {} delivered of {} in {} requests, {:.2} µs/span p50, {:.2} µs CPU/span; stock {} of {} in {} requests, {:.2} µs/span p50, {:.2} µs CPU/span",
            ours.delivered,
            ours.peer.spans,
            ours.requests,
            ours.peer.span_p50_us,
            ours.cpu_per_span_us(),
            stock.delivered,
            stock.peer.spans,
            stock.requests,
            stock.peer.span_p50_us,
            stock.cpu_per_span_us()
        );
        runs.push((ours, stock));
    }
    let id = |name: &str| format!("export.{}.{}.{name}", target.id(), protocol.name());
    let over = |f: &dyn Fn(&Run, &Run) -> f64| {
        spread(&runs.iter().map(|(o, s)| f(o, s)).collect::<Vec<_>>())
    };
    let worst = |f: &dyn Fn(&Run) -> u64, ours: bool| {
        runs.iter()
            .map(|(o, s)| f(if ours { o } else { s }))
            .max()
            .unwrap_or(0) as f64
    };
    let metric = |name: &str, label: &str, kind: Kind, unit: &str| {
        Metric::new(&id(name), &scenario, label, kind, unit, f64::NAN)
    };
    {
        report.push(
            metric(
                "span_cost_p50_ratio",
                "job's cost per span p50, ours/stock",
                Kind::Ratio,
                "x",
            )
            .over_rounds(over(&|o, s| ratio(o.peer.span_p50_us, s.peer.span_p50_us)))
            .goal(Goal::AtMost(1.0)),
        );
        report.push(
            metric(
                "span_cost_p95_ratio",
                "job's cost per span p95, ours/stock",
                Kind::Ratio,
                "x",
            )
            .over_rounds(over(&|o, s| ratio(o.peer.span_p95_us, s.peer.span_p95_us))),
        );
        report.push(
            metric(
                "span_cost_p50_us.ours",
                "  ours: cost per span p50",
                Kind::Absolute,
                "µs",
            )
            .over_rounds(over(&|o, _| o.peer.span_p50_us)),
        );
        report.push(
            metric(
                "span_cost_p50_us.stock",
                "  stock: cost per span p50",
                Kind::Absolute,
                "µs",
            )
            .over_rounds(over(&|_, s| s.peer.span_p50_us)),
        );
        report.push(
            metric(
                "start_finish_us.ours",
                "  ours: start_job + finish p50",
                Kind::Absolute,
                "µs",
            )
            .over_rounds(over(&|o, _| o.peer.start_p50_us + o.peer.finish_p50_us)),
        );
        report.push(
            metric(
                "start_finish_us.stock",
                "  stock: job span start + end p50",
                Kind::Absolute,
                "µs",
            )
            .over_rounds(over(&|_, s| s.peer.start_p50_us + s.peer.finish_p50_us)),
        );
        report.push(
            metric(
                "cpu_per_span_ratio",
                "CPU time per span, ours/stock",
                Kind::Ratio,
                "x",
            )
            .over_rounds(over(&|o, s| {
                ratio(o.cpu_per_span_us(), s.cpu_per_span_us())
            }))
            .goal(Goal::AtMost(1.0)),
        );
        report.push(
            metric(
                "cpu_per_span_us.ours",
                "  ours: CPU per span",
                Kind::Absolute,
                "µs",
            )
            .over_rounds(over(&|o, _| o.cpu_per_span_us())),
        );
        report.push(
            metric(
                "cpu_per_span_us.stock",
                "  stock: CPU per span",
                Kind::Absolute,
                "µs",
            )
            .over_rounds(over(&|_, s| s.cpu_per_span_us())),
        );
    }
    if !matches!(target, Target::Outage(_)) {
        report.push(
            metric(
                "rate_ratio",
                "spans/s delivered, ours/stock",
                Kind::Ratio,
                "x",
            )
            .over_rounds(over(&|o, s| ratio(o.rate(), s.rate())))
            .goal(Goal::AtLeast(1.0)),
        );
        report.push(
            metric(
                "rate_per_s.ours",
                "  ours: spans/s delivered",
                Kind::Absolute,
                "spans/s",
            )
            .over_rounds(over(&|o, _| o.rate())),
        );
        report.push(
            metric(
                "rate_per_s.stock",
                "  stock: spans/s delivered",
                Kind::Absolute,
                "spans/s",
            )
            .over_rounds(over(&|_, s| s.rate())),
        );
    }
    report.push(
        metric("rss_mb.ours", "  ours: peak RSS", Kind::Absolute, "MB")
            .over_rounds(over(&|o, _| o.peer.max_rss_kb as f64 / 1024.0)),
    );
    report.push(
        metric("rss_mb.stock", "  stock: peak RSS", Kind::Absolute, "MB")
            .over_rounds(over(&|_, s| s.peer.max_rss_kb as f64 / 1024.0)),
    );
    let spans = runs.first().map(|(o, _)| o.peer.spans).unwrap_or(0);
    report.push(
        metric(
            "delivered.ours",
            &format!("ours: spans delivered of {spans} (worst round)"),
            Kind::Count,
            "spans",
        )
        .value_of(runs.iter().map(|(o, _)| o.delivered).min().unwrap_or(0) as f64),
    );
    report.push(
        metric(
            "delivered.stock",
            &format!("stock: spans delivered of {spans} (worst round)"),
            Kind::Count,
            "spans",
        )
        .value_of(runs.iter().map(|(_, s)| s.delivered).min().unwrap_or(0) as f64),
    );
    report.push(
        metric(
            "lost.ours",
            "ours: spans lost (worst round)",
            Kind::Count,
            "spans",
        )
        .value_of(worst(&Run::lost, true)),
    );
    report.push(
        metric(
            "lost.stock",
            "stock: spans lost (worst round)",
            Kind::Count,
            "spans",
        )
        .value_of(worst(&Run::lost, false)),
    );
    if target == Target::Stack {
        report.note(format!(
            "{scenario}: `lost` counts spans missing from ClickHouse; the client's own account counts what the collector acknowledged, so a span rotel acknowledged but never wrote shows as lost uncounted by the client (a loss inside the stack)."
        ));
    }
    report.push(
        metric(
            "uncounted.ours",
            "ours: lost without being counted",
            Kind::Count,
            "spans",
        )
        .value_of(worst(&Run::uncounted, true))
        .goal(Goal::AtMost(0.0)),
    );
    report.push(
        metric(
            "uncounted.stock",
            "stock: lost without being counted",
            Kind::Count,
            "spans",
        )
        .value_of(worst(&Run::uncounted, false)),
    );
    Ok(())
}
