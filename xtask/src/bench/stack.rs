//! Scenarios against the real embedded stack (rotel -> chDB): how soon a
//! job's span can be queried after the job ends, how fast the stack ingests
//! with nothing lost, and how fast a trace and a job's spans are looked up
//! among 10 million spans.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use conformance::stack::{Endpoints, Stack};
use runner_telemetry::config::StaticEndpoint;
use runner_telemetry::logs::Stream;
use runner_telemetry::negotiate::Transport;
use runner_telemetry::{JobOutcome, RunnerIdentity, RunnerTelemetry, SpanOutcome};

use super::export::spawn_peer;
use super::peer::{job_info, job_payload, our_settings, PeerConfig, Protocol, Side};
use super::report::{Goal, Kind, Metric, Report};
use super::stats::{micros, summarize};
use super::Profile;

/// A statement with a longer timeout than the harness's client (bulk
/// generation takes a while).
fn long_query(endpoints: &Endpoints, sql: &str, timeout: Duration) -> Result<String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .build()
        .into();
    let mut response = agent
        .post(&format!(
            "{}/",
            endpoints.clickhouse_url.trim_end_matches('/')
        ))
        .header("X-ClickHouse-User", &endpoints.clickhouse_user)
        .header("X-ClickHouse-Key", &endpoints.clickhouse_password)
        .send(sql.as_bytes())?;
    let status = response.status();
    let body = response.body_mut().read_to_string()?;
    if status != 200 {
        bail!("ClickHouse answered {status}: {}", body.trim());
    }
    Ok(body)
}

/// Job end (its `finish`) to its `job_execution` row answering a query.
pub fn queryable(report: &mut Report, profile: &Profile, stack: &Stack) -> Result<()> {
    let scenario = "Job end to span queryable in ClickHouse (OTLP/HTTP -> rotel -> chDB)";
    let n = profile.query_samples;
    println!("==> {scenario} ({n} jobs)");
    let clickhouse = stack.clickhouse();
    let runtime = tokio::runtime::Runtime::new()?;
    let service = format!("bench-queryable-{}", std::process::id());
    let telemetry = {
        let _guard = runtime.enter();
        RunnerTelemetry::new(
            our_settings(Protocol::Http, &stack.endpoints().otlp_http, &service),
            RunnerIdentity::default(),
        )
    };
    let mut latencies = Vec::new();
    for i in 0..n {
        let job = 900_000 + i;
        let trace_id = format!("{:016x}{:016x}", std::process::id(), job);
        let payload = serde_json::json!({
            "features": {"job_telemetry": true},
            "trace_context": {"trace_id": trace_id, "parent_span_id": "00f067aa0ba902b7"}
        });
        let ended = runtime.block_on(async {
            let mut t = telemetry.start_job(&payload, &job_info(job), SystemTime::now());
            for stage in ["get_sources", "step_script", "after_script"] {
                t.child(stage, vec![]).end(SpanOutcome::Ok);
            }
            let ended = Instant::now();
            if let Some(flush) = t.finish(&JobOutcome::Success, SystemTime::now()) {
                tokio::spawn(flush.flush(Duration::from_secs(5)));
            }
            ended
        });
        let sql = format!(
            "SELECT count() FROM otel.otel_traces WHERE TraceId = '{trace_id}' AND SpanName = 'job_execution'"
        );
        let deadline = ended + Duration::from_secs(30);
        loop {
            if clickhouse.count(&sql)? >= 1 {
                latencies.push(micros(ended.elapsed()) / 1e3);
                break;
            }
            if Instant::now() > deadline {
                bail!("job {job}'s span was not queryable after 30 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    runtime.block_on(telemetry.shutdown());
    let s = summarize(&latencies);
    report.push(Metric::new(
        "queryable.p50_ms",
        scenario,
        "p50",
        Kind::Absolute,
        "ms",
        s.p50,
    ));
    report.push(
        Metric::new(
            "queryable.p95_ms",
            scenario,
            "p95",
            Kind::Absolute,
            "ms",
            s.p95,
        )
        .goal(Goal::AtMost(1000.0)),
    );
    report.note(format!(
        "Queryable: {n} jobs one after the other, 4 spans each, polled every 10 ms with `count()` by TraceId; rotel batches every 200 ms."
    ));
    Ok(())
}

/// Spans landed per second through the whole stack, and how many were lost.
pub fn ingest(report: &mut Report, profile: &Profile, stack: &Stack) -> Result<()> {
    let scenario = "Stack ingest (our client -> rotel -> chDB), OTLP/HTTP";
    let (jobs, spans_per_job) = (profile.ingest_jobs, 500);
    println!("==> {scenario} ({jobs} jobs x {spans_per_job} spans)");
    let service = format!("bench-ingest-{}", std::process::id());
    let started = Instant::now();
    let peer = spawn_peer(&PeerConfig {
        side: Side::Ours,
        protocol: Protocol::Http,
        endpoint: stack.endpoints().otlp_http.clone(),
        service_name: service.clone(),
        jobs,
        spans_per_job,
        settle_secs: 120.0,
        // A runner sized for the burst: what is measured is the stack.
        buffer_max_spans: Some(jobs * spans_per_job),
    })?;
    let clickhouse = stack.clickhouse();
    let sql = format!("SELECT count() FROM otel.otel_traces WHERE ServiceName = '{service}'");
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut last, mut since) = (0, Instant::now());
    let landed = loop {
        let count = clickhouse.count(&sql)?;
        if count >= peer.spans || Instant::now() > deadline {
            break count;
        }
        if count != last {
            (last, since) = (count, Instant::now());
        } else if since.elapsed() > Duration::from_secs(10) {
            break count;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = started.elapsed().as_secs_f64();
    report.push(Metric::new(
        "ingest.spans_per_s",
        scenario,
        &format!("spans/s landed ({} spans)", peer.spans),
        Kind::Absolute,
        "spans/s",
        landed as f64 / elapsed,
    ));
    report.push(
        Metric::new(
            "ingest.lost",
            scenario,
            "spans lost",
            Kind::Count,
            "spans",
            peer.spans.saturating_sub(landed) as f64,
        )
        .goal(Goal::AtMost(0.0)),
    );
    report.push(Metric::new(
        "ingest.counted_drops",
        scenario,
        "  of which dropped and counted by the client",
        Kind::Count,
        "spans",
        peer.counted_drops as f64,
    ));
    report.note(
        "Stack ingest: from starting the peer to the last row counted in `otel.otel_traces`; the client's buffer holds the whole burst (the default 10,000 spans would drop most of it, counted, before the stack saw it).",
    );
    Ok(())
}

/// Rows of `sql`'s count once it reached `expected` or stopped growing for
/// `quiet`, at most `limit` from now.
fn count_until(
    clickhouse: &conformance::clickhouse::ClickHouse,
    sql: &str,
    expected: u64,
    quiet: Duration,
    limit: Duration,
) -> Result<u64> {
    let deadline = Instant::now() + limit;
    let (mut last, mut since) = (0, Instant::now());
    loop {
        let count = clickhouse.count(sql)?;
        if count >= expected || Instant::now() > deadline {
            return Ok(count);
        }
        if count != last {
            (last, since) = (count, Instant::now());
        } else if since.elapsed() > quiet {
            return Ok(count);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Job log lines landed per second through the whole stack, and how many
/// were lost: concurrent jobs print lines (in chunks, as a job's output
/// arrives) with log export on, in-process on the runner's API.
pub fn log_ingest(report: &mut Report, profile: &Profile, stack: &Stack) -> Result<()> {
    let scenario = "Stack ingest of job logs (our client -> rotel -> chDB), OTLP/HTTP";
    let (jobs, lines) = (profile.log_jobs, profile.log_lines_per_job);
    println!("==> {scenario} ({jobs} jobs x {lines} lines)");
    let endpoint = stack.endpoints().otlp_http.clone();
    let service = format!("bench-log-ingest-{}", std::process::id());
    let mut settings = our_settings(Protocol::Http, &endpoint, &service);
    settings.logs = Some(StaticEndpoint {
        transport: Transport::HttpProtobuf,
        url: format!("{endpoint}/v1/logs"),
        headers: Vec::new(),
    });
    let runtime = tokio::runtime::Runtime::new()?;
    let telemetry = {
        let _guard = runtime.enter();
        Arc::new(RunnerTelemetry::new(settings, RunnerIdentity::default()))
    };
    let started = Instant::now();
    let (records, counted_drops) = runtime.block_on(async {
        let tasks: Vec<_> = (0..jobs)
            .map(|job| {
                let telemetry = telemetry.clone();
                tokio::spawn(async move {
                    let mut t = telemetry.start_job(
                        &job_payload(800_000 + job),
                        &job_info(800_000 + job),
                        SystemTime::now(),
                    );
                    let child = t.child("step_script", vec![]);
                    if let Some(logs) = t.logs() {
                        let mut chunk = String::new();
                        for line in 0..lines {
                            chunk.push_str(&format!(
                                "job {job} line {line}: compiling bench-crate v0.1.0 (/builds/bench)\n"
                            ));
                            if line % 100 == 99 || line + 1 == lines {
                                logs.push_output(chunk.as_bytes(), Stream::Stdout, SystemTime::now());
                                chunk.clear();
                                tokio::task::yield_now().await;
                            }
                        }
                        logs.end_output();
                    }
                    child.end(SpanOutcome::Ok);
                    let flush = t.finish(&JobOutcome::Success, SystemTime::now());
                    match flush {
                        Some(flush) => flush.flush(Duration::from_secs(120)).await.log_records,
                        None => None,
                    }
                })
            })
            .collect();
        let (mut records, mut dropped) = (0, 0);
        for task in tasks {
            if let Some(logs) = task.await? {
                records += logs.spans;
                dropped += logs.dropped();
            }
        }
        anyhow::Ok((records, dropped))
    })?;
    let sql = format!("SELECT count() FROM otel.otel_logs WHERE ServiceName = '{service}'");
    let landed = count_until(
        &stack.clickhouse(),
        &sql,
        records,
        Duration::from_secs(10),
        Duration::from_secs(120),
    )?;
    let elapsed = started.elapsed().as_secs_f64();
    runtime.block_on(telemetry.shutdown());
    anyhow::ensure!(
        records >= (jobs * lines) as u64,
        "{} lines printed, only {records} log records made",
        jobs * lines
    );
    report.push(Metric::new(
        "ingest.log_lines_per_s",
        scenario,
        &format!("log lines/s landed ({records} records)"),
        Kind::Absolute,
        "lines/s",
        landed as f64 / elapsed,
    ));
    report.push(
        Metric::new(
            "ingest.log_lines_lost",
            scenario,
            "log lines lost",
            Kind::Count,
            "lines",
            records.saturating_sub(landed) as f64,
        )
        .goal(Goal::AtMost(0.0)),
    );
    report.push(Metric::new(
        "ingest.log_lines_dropped_counted",
        scenario,
        "  of which dropped and counted by the client",
        Kind::Count,
        "lines",
        counted_drops as f64,
    ));
    report.note(format!(
        "Log ingest: {jobs} concurrent jobs printing {lines} lines each (about 60 bytes, in chunks of 100 lines), log export on, in-process on the runner's API; from the first job's start to the last record counted in `otel.otel_logs`."
    ));
    Ok(())
}

/// Spans per trace and per job in the generated data.
const SPANS_PER_JOB: u64 = 10;
const JOBS_PER_TRACE: u64 = 5;

/// 10 million spans generated inside the engine, then lookups.
pub fn lookup(report: &mut Report, profile: &Profile, stack: &Stack) -> Result<()> {
    let total = profile.lookup_spans;
    let scenario = format!("Trace lookup at {} million spans", total / 1_000_000);
    println!("==> {scenario}");
    let endpoints = stack.endpoints();
    let chunk = 1_000_000_u64;
    let per_trace = SPANS_PER_JOB * JOBS_PER_TRACE;
    let started = Instant::now();
    let mut offset = 0;
    while offset < total {
        let rows = chunk.min(total - offset);
        // n is the span number; trace = n / 50, job = n / 10. Timestamps go
        // back from now, 0.6 s per trace (so about 33 hours for 10M).
        let sql = format!(
            "INSERT INTO otel.otel_traces (Timestamp, TraceId, SpanId, ParentSpanId, SpanName, SpanKind, ServiceName, \
             ResourceAttributes, ScopeName, ScopeVersion, SpanAttributes, Duration, StatusCode) \
             SELECT now64(9) - toIntervalMillisecond(intDiv(n, {per_trace}) * 600 + (n % {per_trace})) AS Timestamp, \
             lower(leftPad(hex(intDiv(n, {per_trace}) + 1), 32, '0')) AS TraceId, \
             lower(leftPad(hex(n + 1), 16, '0')) AS SpanId, \
             if(n % {SPANS_PER_JOB} = 0, '00f067aa0ba902b7', lower(leftPad(hex(n - n % {SPANS_PER_JOB} + 1), 16, '0'))) AS ParentSpanId, \
             ['job_execution','get_sources','restore_cache','step_script','after_script','archive_cache','upload_artifacts','ci_function','ci_function','ci_function'][n % {SPANS_PER_JOB} + 1] AS SpanName, \
             'Internal', 'gitlab-ci-runner', \
             map('service.name', 'gitlab-ci-runner', 'ci.job.id', toString(intDiv(n, {SPANS_PER_JOB}) + 1), 'ci.pipeline.id', toString(intDiv(n, {per_trace}) + 1), 'ci.project.id', toString(intDiv(n, {per_trace}) % 1000)), \
             'gitlab-ci-runner', '0.1.0', \
             map('ci.stage.status', 'success', 'ci.job.id', toString(intDiv(n, {SPANS_PER_JOB}) + 1)), \
             1000000 + n % 7919 * 1000, 'Ok' \
             FROM (SELECT number + {offset} AS n FROM numbers({rows}))"
        );
        long_query(endpoints, &sql, Duration::from_secs(600))
            .with_context(|| format!("generating spans {offset}..{}", offset + rows))?;
        offset += rows;
        println!(
            "  {offset} spans generated ({:.0} s)",
            started.elapsed().as_secs_f64()
        );
    }
    let generation = started.elapsed().as_secs_f64();
    report.note(format!(
        "Lookup data: {total} spans generated inside the engine with `INSERT INTO otel.otel_traces ... SELECT ... FROM numbers(1000000)` in {} chunks (the materialized views fill `otel_traces_trace_id_ts` and `ci_job_telemetry_traces` on the way): {generation:.0} s in all. {per_trace} spans a trace, {SPANS_PER_JOB} a job, timestamps over the last ~{:.0} hours.",
        total.div_ceil(chunk),
        (total / per_trace) as f64 * 0.6 / 3600.0
    ));
    report.push(Metric::new(
        "lookup.generation_s",
        &scenario,
        "generating the spans in the engine",
        Kind::Absolute,
        "s",
        generation,
    ));
    let clickhouse = stack.clickhouse();
    let traces = total / per_trace;
    let jobs = total / SPANS_PER_JOB;
    let n = profile.lookup_samples;
    // Spread the picks over the whole range (a fixed LCG, reproducible).
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut pick = |max: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % max + 1
    };
    let (mut trace_ms, mut job_ms) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let trace_id = format!("{:032x}", pick(traces));
        // What Grafana's ClickHouse plugin runs for a trace: the time
        // bounds from the lookup table, then the spans within them.
        let sql = format!(
            "WITH '{trace_id}' AS trace_id, \
             (SELECT min(Start) FROM otel.otel_traces_trace_id_ts WHERE TraceId = trace_id) AS trace_start, \
             (SELECT max(End) + 1 FROM otel.otel_traces_trace_id_ts WHERE TraceId = trace_id) AS trace_end \
             SELECT TraceId AS traceID, SpanId AS spanID, ParentSpanId AS parentSpanID, ServiceName AS serviceName, \
             SpanName AS operationName, Timestamp AS startTime, multiply(Duration, 0.000001) AS duration, \
             arrayMap(key -> map('key', key, 'value', SpanAttributes[key]), mapKeys(SpanAttributes)) AS tags, \
             arrayMap(key -> map('key', key, 'value', ResourceAttributes[key]), mapKeys(ResourceAttributes)) AS serviceTags \
             FROM otel.otel_traces WHERE traceID = trace_id AND startTime >= trace_start AND startTime <= trace_end \
             LIMIT 1000 FORMAT JSONEachRow"
        );
        let t = Instant::now();
        let body = clickhouse.execute(&sql)?;
        trace_ms.push(micros(t.elapsed()) / 1e3);
        let rows = body.lines().count() as u64;
        if rows != per_trace {
            bail!("trace {trace_id} has {rows} spans, {per_trace} expected");
        }
        let build_id = pick(jobs);
        let sql = format!(
            "SELECT span_name, start_time, duration_ns, job_status, status_code FROM otel.ci_job_telemetry_traces \
             WHERE build_id = {build_id} ORDER BY start_time FORMAT JSONEachRow"
        );
        let t = Instant::now();
        let body = clickhouse.execute(&sql)?;
        job_ms.push(micros(t.elapsed()) / 1e3);
        let rows = body.lines().count() as u64;
        if rows != SPANS_PER_JOB {
            bail!("job {build_id} has {rows} spans, {SPANS_PER_JOB} expected");
        }
    }
    for (name, label, values) in [
        ("trace", "a trace, Grafana plugin's way", &trace_ms),
        (
            "job",
            "a job's spans from ci_job_telemetry_traces by build_id",
            &job_ms,
        ),
    ] {
        let s = summarize(values);
        report.push(Metric::new(
            &format!("lookup.{name}.p50_ms"),
            &scenario,
            &format!("{label}: p50"),
            Kind::Absolute,
            "ms",
            s.p50,
        ));
        report.push(
            Metric::new(
                &format!("lookup.{name}.p95_ms"),
                &scenario,
                &format!("{label}: p95"),
                Kind::Absolute,
                "ms",
                s.p95,
            )
            .goal(Goal::AtMost(50.0)),
        );
    }
    report.note(format!(
        "Lookups: {n} random traces and {n} random jobs, timed at the client over HTTP (the embedded ClickHouse endpoint included)."
    ));
    Ok(())
}
