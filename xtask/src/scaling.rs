//! `cargo xtask bench-scaling`: the inputs of docs/scaling.md, measured on
//! an isolated embedded stack (rotel + chDB) on this machine.
//!
//! - spans per second through the collector: jobs of 14 runner spans (the
//!   phase 2 span tree), 30 jobs a request, OTLP/HTTP JSON, timed until every
//!   span is a row in `otel_traces`;
//! - bytes per span on disk, after merging, in `otel_traces` and
//!   `ci_job_telemetry_traces`;
//! - rows per second of the engine: one `INSERT ... SELECT` of a million
//!   spans, both materialized views firing.
//!
//! Load goes to 127.0.0.1 only, bounded in count.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use conformance::process::wait_for;
use conformance::{ClickHouse, Stack, StackOptions};
use serde_json::{json, Value};

/// The runner's stage spans of a full job (phase 2), after `job_execution`.
const STAGES: [&str; 13] = [
    "prepare_executor",
    "prepare_script",
    "resolve_secrets",
    "get_sources",
    "clear_worktree",
    "restore_cache",
    "download_artifacts",
    "step_script",
    "after_script",
    "archive_cache",
    "upload_artifacts",
    "cleanup_file_variables",
    "step_build",
];
const REQUESTS: u64 = 200;
const JOBS_PER_REQUEST: u64 = 30;
const ENGINE_ROWS: u64 = 1_000_000;

pub fn run(_args: &[String]) -> Result<()> {
    let stack =
        Stack::start_with_progress(StackOptions::isolated(), &mut |line| println!("  {line}"))?;
    let clickhouse = stack.clickhouse();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());

    let spans_per_job = 1 + STAGES.len() as u64;
    let total = REQUESTS * JOBS_PER_REQUEST * spans_per_job;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64;
    let bodies: Vec<String> = (0..REQUESTS)
        .map(|r| request_body(r, now).to_string())
        .collect();
    let url = format!("{}/v1/traces", stack.endpoints().otlp_http);
    let started = Instant::now();
    for body in &bodies {
        ureq::post(&url)
            .header("Content-Type", "application/json")
            .send(body.as_str())
            .context("the collector refused a request")?;
    }
    let sent = started.elapsed();
    wait_for(
        "every span in otel_traces",
        Duration::from_secs(300),
        || {
            let rows = clickhouse.count("SELECT count() FROM otel.otel_traces")?;
            Ok((rows >= total).then_some(()))
        },
    )?;
    let landed = started.elapsed();
    println!(
        "Collector (rotel): {total} spans ({spans_per_job} a job) sent in {:.2} s, all in otel_traces after {:.2} s: {:.0} spans/s end to end",
        sent.as_secs_f64(),
        landed.as_secs_f64(),
        total as f64 / landed.as_secs_f64()
    );
    let ci_rows = wait_for("the CI view's rows", Duration::from_secs(30), || {
        let rows = clickhouse.count("SELECT count() FROM otel.ci_job_telemetry_traces")?;
        Ok(Some(rows))
    })?;
    println!("  ci_job_telemetry_traces holds {ci_rows} of those {total} spans");

    clickhouse.execute("OPTIMIZE TABLE otel.otel_traces FINAL")?;
    clickhouse.execute("OPTIMIZE TABLE otel.ci_job_telemetry_traces FINAL")?;
    for table in ["otel_traces", "ci_job_telemetry_traces"] {
        let (rows, disk, raw) = parts(&clickhouse, table)?;
        println!(
            "Disk: {table}: {rows} rows, {:.0} bytes a row on disk ({:.0} uncompressed)",
            disk as f64 / rows.max(1) as f64,
            raw as f64 / rows.max(1) as f64
        );
    }

    let started = Instant::now();
    clickhouse.execute(&format!(
        "INSERT INTO otel.otel_traces (Timestamp, TraceId, SpanId, ParentSpanId, SpanName, \
         SpanKind, ServiceName, SpanAttributes, Duration, StatusCode) \
         SELECT now64(9) - toIntervalSecond(number % 3600), \
         lower(hex(toUInt128(intDiv(number, 17) + 1000000000))), lower(hex(number)), '', \
         ['job_execution', 'get_sources', 'step_script', 'restore_cache', 'upload_artifacts'][number % 5 + 1], \
         'Internal', 'gitlab-ci-runner', \
         map('ci.job.id', toString(intDiv(number, 17)), 'ci.pipeline.id', toString(intDiv(number, 170)), \
             'ci.project.id', '4242', 'ci.stage.status', 'success', 'ci.runner.executor', 'shell'), \
         4000000000 + number % 1000, 'Ok' FROM numbers({ENGINE_ROWS})"
    ))?;
    let took = started.elapsed().as_secs_f64();
    println!(
        "Engine (chDB): {ENGINE_ROWS} spans in one INSERT ... SELECT in {took:.1} s: {:.0} rows/s, {:.0} rows/s a core ({cores} cores)",
        ENGINE_ROWS as f64 / took,
        ENGINE_ROWS as f64 / took / cores as f64
    );
    Ok(())
}

fn parts(clickhouse: &ClickHouse, table: &str) -> Result<(u64, u64, u64)> {
    let rows = clickhouse.json_rows(&format!(
        "SELECT toUInt64(sum(rows)) AS rows, toUInt64(sum(bytes_on_disk)) AS disk, \
         toUInt64(sum(data_uncompressed_bytes)) AS raw FROM system.parts \
         WHERE database = 'otel' AND table = '{table}' AND active"
    ))?;
    let number = |key: &str| -> u64 {
        match &rows[0][key] {
            Value::String(s) => s.parse().unwrap_or(0),
            other => other.as_u64().unwrap_or(0),
        }
    };
    Ok((number("rows"), number("disk"), number("raw")))
}

fn attributes(pairs: &[(&str, String)]) -> Value {
    pairs
        .iter()
        .map(|(k, v)| json!({"key": k, "value": {"stringValue": v}}))
        .collect()
}

/// One OTLP/HTTP JSON request: `JOBS_PER_REQUEST` jobs of a job_execution
/// span with the runner's attributes and its stage spans.
fn request_body(request: u64, now: u64) -> Value {
    let mut spans = Vec::new();
    for j in 0..JOBS_PER_REQUEST {
        let job = request * JOBS_PER_REQUEST + j + 1;
        let trace = format!("{:032x}", 0xabc0_0000 + job / 5);
        let root = format!("{:016x}", rand_u64(job, 0));
        let start = now - 60_000_000_000;
        spans.push(json!({
            "traceId": trace, "spanId": root, "parentSpanId": format!("{:016x}", rand_u64(job, 99)),
            "name": "job_execution", "kind": 1,
            "startTimeUnixNano": start.to_string(), "endTimeUnixNano": now.to_string(),
            "status": {"code": 1},
            "attributes": attributes(&[
                ("ci.job.id", job.to_string()),
                ("ci.pipeline.id", (job / 10).to_string()),
                ("ci.project.id", "4242".into()),
                ("ci.runner.id", "7".into()),
                ("ci.runner.executor", "shell".into()),
                ("ci.job.status", "success".into()),
                ("ci.job.name", "build".into()),
                ("ci.pipeline.source", "push".into()),
                ("cicd.pipeline.task.run.url.full", format!("https://gitlab.example.com/group/project/-/jobs/{job}")),
                ("vcs.ref.head.revision", format!("{:016x}{:016x}", rand_u64(job, 1), rand_u64(job, 2))),
                ("vcs.repository.url.full", "https://gitlab.example.com/group/project.git".into()),
            ]),
        }));
        for (i, stage) in STAGES.iter().enumerate() {
            let begin = start + i as u64 * 4_000_000_000;
            spans.push(json!({
                "traceId": trace, "spanId": format!("{:016x}", rand_u64(job, i as u64 + 3)),
                "parentSpanId": root, "name": stage, "kind": 1,
                "startTimeUnixNano": begin.to_string(),
                "endTimeUnixNano": (begin + 4_000_000_000).to_string(),
                "status": {"code": 1},
                "attributes": attributes(&[("ci.stage.status", "success".into()), ("ci.job.id", job.to_string())]),
            }));
        }
    }
    json!({"resourceSpans": [{
        "resource": {"attributes": attributes(&[("service.name", "gitlab-ci-runner".into())])},
        "scopeSpans": [{"scope": {"name": "gitlab-ci-runner"}, "spans": spans}]
    }]})
}

/// A well-mixed 64-bit value from two inputs (splitmix64): span ids as
/// random as real ones, reproducible from run to run.
fn rand_u64(a: u64, b: u64) -> u64 {
    let mut z = a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_add(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)).max(1)
}
