//! The export client against a real collector that goes away (issue 6), and
//! workload-identity auth against fake-rails' issuer:
//!
//! 1. collector down for 30 s, then up: spans created during the outage
//!    reach ClickHouse, none twice;
//! 2. an outage longer than the maximum age: spans dropped, counted, and the
//!    count visible at `/metrics`;
//! 3. 200 jobs during an outage: the buffer stays within its bound and the
//!    runner's memory within the bound plus a constant;
//! 4. `http_bearer_gcp_oidc`: the collector sees a bearer JWT that verifies
//!    against fake-rails' JWKS for the payload's audience, refreshed when it
//!    expires.
//!
//! Each checks the accounting invariant from the runner's metrics:
//! `spans_total = exported + dropped + buffer`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use conformance::gitlab::{Contract, FakeRailsOptions};
use conformance::process::{free_port, wait_for};
use conformance::runner::RunnerOptions;
use conformance::world::{World, PIPELINE_DEADLINE};
use serde_json::Value;

/// No sources to fetch: these projects have no repository.
const NO_GIT: &str = "variables:\n  GIT_STRATEGY: none\n";

const THREE_JOBS: &str = "
variables:
  GIT_STRATEGY: none
one:
  script: [echo one]
two:
  script: [echo two]
three:
  script: [echo three]
";

/// The runner's metrics, `name{labels}` -> value.
fn scrape(port: u16) -> anyhow::Result<BTreeMap<String, f64>> {
    let mut response = ureq::get(&format!("http://127.0.0.1:{port}/metrics")).call()?;
    let text = response.body_mut().read_to_string()?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect())
}

#[derive(Debug, Clone, Copy, Default)]
struct Account {
    spans: u64,
    exported: u64,
    dropped: u64,
    max_age: u64,
    queue_full: u64,
    buffer: u64,
    errors: u64,
}

fn account(port: u16) -> anyhow::Result<Account> {
    let m = scrape(port)?;
    let get = |k: &str| m.get(k).copied().unwrap_or(0.0) as u64;
    let dropped = m
        .iter()
        .filter(|(k, _)| k.starts_with("ci_telemetry_spans_dropped_total{"))
        .map(|(_, v)| *v as u64)
        .sum();
    Ok(Account {
        spans: get("ci_telemetry_spans_total"),
        exported: get("ci_telemetry_spans_exported_total"),
        dropped,
        max_age: get("ci_telemetry_spans_dropped_total{reason=\"max_age\"}"),
        queue_full: get("ci_telemetry_spans_dropped_total{reason=\"queue_full\"}"),
        buffer: get("ci_telemetry_buffer_spans"),
        errors: get("ci_telemetry_export_errors_total"),
    })
}

fn assert_invariant(a: &Account) {
    assert_eq!(
        a.spans,
        a.exported + a.dropped + a.buffer,
        "accounting invariant: {a:?}"
    );
}

/// A world whose runner exports to the stack's collector (v1, static
/// endpoint) with metrics on a free port; `env` adds settings.
fn world_with_metrics(env: &[(&str, &str)]) -> (World, u16) {
    let mut world = World::new(FakeRailsOptions::default()).unwrap();
    let port = free_port().unwrap();
    let mut options = world.to_collector();
    options.flush_timeout_secs = Some(1);
    options.extra_env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .chain([(
            "CI_RUNNER_METRICS_LISTEN".to_string(),
            format!("127.0.0.1:{port}"),
        )])
        .collect();
    world.start_runner(options).unwrap();
    wait_for("the runner's metrics", Duration::from_secs(30), || {
        Ok(scrape(port).ok())
    })
    .unwrap();
    (world, port)
}

fn job_ids(jobs: &[Value]) -> Vec<u64> {
    jobs.iter().filter_map(|j| j["id"].as_u64()).collect()
}

fn id_list(ids: &[u64]) -> String {
    ids.iter()
        .map(|i| format!("'{i}'"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Runner spans of these jobs in ClickHouse: (rows, distinct span ids).
fn runner_rows(world: &World, jobs: &[u64]) -> anyhow::Result<(u64, u64)> {
    #[derive(clickhouse::Row, serde::Deserialize)]
    struct Counts {
        rows: u64,
        ids: u64,
    }
    let counts = world.stack.clickhouse().fetch_all::<Counts>(&format!(
        "SELECT count() AS rows, uniqExact(SpanId) AS ids FROM otel.otel_traces \
         WHERE ServiceName = 'gitlab-ci-runner' AND ResourceAttributes['ci.job.id'] IN ({})",
        id_list(jobs)
    ))?;
    Ok(counts.first().map_or((0, 0), |c| (c.rows, c.ids)))
}

/// Added to a wait's expected length for its deadline.
const DEADLINE_SLACK: Duration = Duration::from_secs(30);

/// Waits until `at` by the clock (the outage is the scenario, not a
/// synchronisation).
fn until(at: Instant) {
    std::thread::sleep(at.saturating_duration_since(Instant::now()));
}

#[test]
fn spans_made_during_a_30s_outage_reach_clickhouse_once() {
    // Retries back off to at most 5 s, so recovery is seen within seconds.
    let (mut world, port) = world_with_metrics(&[("CI_TELEMETRY_RETRY_MAX_BACKOFF", "5s")]);
    let (project, path) = world.rails.create_project("outage", None).unwrap();
    world.rails.set_telemetry_flag(true, Some(&path)).unwrap();

    world.stack.stop_collector();
    let down_at = Instant::now();
    let pipeline = world.rails.create_pipeline(project, THREE_JOBS).unwrap();
    let jobs = world
        .rails
        .wait_for_pipeline(project, pipeline, PIPELINE_DEADLINE)
        .unwrap();
    // The jobs did not wait for the collector: they all ended while it was
    // still down (it comes back only below). How fast is the bench's claim.
    assert!(jobs.iter().all(|j| j["status"] == "success"), "{jobs:#?}");
    let ids = job_ids(&jobs);
    let during = wait_for("the runner to retry", Duration::from_secs(20), || {
        let a = account(port)?;
        Ok((a.buffer >= 3 && a.errors >= 1).then_some(a))
    })
    .unwrap();
    assert_eq!(during.exported, 0, "{during:?}");
    assert_invariant(&during);

    until(down_at + Duration::from_secs(30));
    world.stack.start_collector().unwrap();
    let up_at = Instant::now();
    let delivered = wait_for("the buffered spans", Duration::from_secs(60), || {
        let a = account(port)?;
        Ok((a.buffer == 0 && a.exported == a.spans).then_some(a))
    })
    .unwrap();
    let (rows, distinct) = wait_for("the spans in ClickHouse", Duration::from_secs(30), || {
        let (rows, distinct) = runner_rows(&world, &ids)?;
        Ok((rows >= delivered.exported).then_some((rows, distinct)))
    })
    .unwrap();
    let delay = up_at.elapsed();
    eprintln!(
        "outage 30s: {} spans buffered, all in ClickHouse {:.1}s after the collector came back",
        delivered.exported,
        delay.as_secs_f64()
    );
    // Every span the runner made, once: none lost, none twice.
    assert_eq!((rows, distinct), (delivered.exported, delivered.exported));
    assert!(delivered.exported >= 3);
    for job in &ids {
        world.job_execution(*job).unwrap();
    }
    assert_eq!(delivered.dropped, 0, "{delivered:?}");
    assert_invariant(&delivered);
    let log = world.runner_log();
    assert!(log.contains("recovered after"), "{log}");
    assert!(log.contains("Telemetry settled spans="), "{log}");
}

#[test]
fn an_outage_longer_than_max_age_drops_and_counts() {
    let (mut world, port) = world_with_metrics(&[
        ("CI_TELEMETRY_MAX_AGE", "3s"),
        ("CI_TELEMETRY_RETRY_INITIAL_BACKOFF", "200ms"),
        ("CI_TELEMETRY_RETRY_MAX_BACKOFF", "1s"),
    ]);
    let (project, path) = world.rails.create_project("too-old", None).unwrap();
    world.rails.set_telemetry_flag(true, Some(&path)).unwrap();

    world.stack.stop_collector();
    let pipeline = world.rails.create_pipeline(project, THREE_JOBS).unwrap();
    let old_jobs = world
        .rails
        .wait_for_pipeline(project, pipeline, PIPELINE_DEADLINE)
        .unwrap();
    assert!(old_jobs.iter().all(|j| j["status"] == "success"));
    // All of them age out, and /metrics says so.
    let aged = wait_for("spans to age out", Duration::from_secs(30), || {
        let a = account(port)?;
        Ok((a.spans >= 3 && a.buffer == 0).then_some(a))
    })
    .unwrap();
    assert_eq!((aged.max_age, aged.exported), (aged.spans, 0), "{aged:?}");
    assert_invariant(&aged);
    let log = world.runner_log();
    assert!(log.contains("dropped_by=max_age="), "{log}");

    // Back up: new spans arrive; the old ones never will.
    world.stack.start_collector().unwrap();
    let pipeline = world
        .rails
        .create_pipeline(
            project,
            &format!("{NO_GIT}late:\n  script: [\"echo ok\"]\n"),
        )
        .unwrap();
    let late = world
        .rails
        .wait_for_pipeline(project, pipeline, PIPELINE_DEADLINE)
        .unwrap();
    world.job_execution(job_ids(&late)[0]).unwrap();
    let (rows, _) = runner_rows(&world, &job_ids(&old_jobs)).unwrap();
    assert_eq!(rows, 0);
    let after = wait_for("the new spans exported", Duration::from_secs(30), || {
        let a = account(port)?;
        Ok((a.buffer == 0 && a.exported > 0).then_some(a))
    })
    .unwrap();
    assert_eq!(after.max_age, aged.max_age);
    assert_invariant(&after);
}

#[test]
fn two_hundred_jobs_during_an_outage_stay_within_the_buffer_bound() {
    const MAX_SPANS: u64 = 100;
    const MAX_BYTES: u64 = 256 * 1024;
    let (mut world, port) = world_with_metrics(&[
        ("CI_TELEMETRY_BUFFER_MAX_SPANS", "100"),
        ("CI_TELEMETRY_BUFFER_MAX_BYTES", "256KiB"),
        ("CI_TELEMETRY_RETRY_MAX_BACKOFF", "2s"),
    ]);
    let (project, path) = world.rails.create_project("many", None).unwrap();
    world.rails.set_telemetry_flag(true, Some(&path)).unwrap();
    let config: String = std::iter::once(NO_GIT.to_string())
        .chain((0..200).map(|i| format!("job_{i:03}:\n  script: [\"true\"]\n")))
        .collect();

    world.stack.stop_collector();
    // The runner's memory once it has run a job (allocator and runtime warm).
    let warmup = world
        .rails
        .create_pipeline(
            project,
            &format!("{NO_GIT}warm:\n  script: [\"echo ok\"]\n"),
        )
        .unwrap();
    world
        .rails
        .wait_for_pipeline(project, warmup, PIPELINE_DEADLINE)
        .unwrap();
    let baseline = world.runner_rss().unwrap();

    let started = Instant::now();
    let pipeline = world.rails.create_pipeline(project, &config).unwrap();
    let peak = Arc::new(Mutex::new((baseline, 0u64)));
    let jobs = wait_for("200 jobs", Duration::from_secs(120), || {
        let rss = world.runner_rss().unwrap_or(0);
        let buffer = account(port).map(|a| a.buffer).unwrap_or(0);
        {
            let mut peak = peak.lock().unwrap();
            peak.0 = peak.0.max(rss);
            peak.1 = peak.1.max(buffer);
        }
        let jobs = world.rails.pipeline_jobs(project, pipeline)?;
        let done = jobs.len() == 200 && jobs.iter().all(|j| j["status"] == "success");
        Ok(done.then_some(jobs))
    })
    .unwrap();
    let elapsed = started.elapsed();
    let (peak_rss, peak_buffer) = *peak.lock().unwrap();
    let during = account(port).unwrap();
    let growth = peak_rss.saturating_sub(baseline);
    eprintln!(
        "200 jobs in {:.1}s during an outage: RSS {:.1} MiB before, peak {:.1} MiB (+{:.1} MiB); buffer bound {MAX_SPANS} spans / {} KiB, peak {peak_buffer} spans; {during:?}",
        elapsed.as_secs_f64(),
        baseline as f64 / 1048576.0,
        peak_rss as f64 / 1048576.0,
        growth as f64 / 1048576.0,
        MAX_BYTES / 1024,
    );
    assert_eq!(jobs.len(), 200);
    // The buffer held at most its bound; the rest were counted, not kept.
    assert!(
        peak_buffer <= MAX_SPANS && during.buffer <= MAX_SPANS,
        "{during:?}"
    );
    assert!(during.queue_full > 0, "{during:?}");
    assert_invariant(&during);
    // Memory: the buffer's bytes plus a constant for 200 jobs' worth of
    // runtime churn (measured at a few MiB).
    const CONSTANT: u64 = 16 * 1024 * 1024;
    assert!(growth <= MAX_BYTES + CONSTANT, "RSS grew by {growth} bytes");

    // Back up: what was buffered is delivered, once.
    world.stack.start_collector().unwrap();
    let settled = wait_for("the buffer to drain", Duration::from_secs(60), || {
        let a = account(port)?;
        Ok((a.buffer == 0).then_some(a))
    })
    .unwrap();
    assert_invariant(&settled);
    let mut ids = job_ids(&jobs);
    ids.extend(job_ids(
        &world.rails.pipeline_jobs(project, warmup).unwrap(),
    ));
    let (rows, distinct) = wait_for("the spans in ClickHouse", Duration::from_secs(30), || {
        let (rows, distinct) = runner_rows(&world, &ids)?;
        Ok((rows >= settled.exported).then_some((rows, distinct)))
    })
    .unwrap();
    assert_eq!((rows, distinct), (settled.exported, settled.exported));
    assert_eq!(
        settled.exported + settled.queue_full,
        settled.spans,
        "{settled:?}"
    );
}

/// A plain HTTP/1.1 server that records each request's `Authorization`
/// header and body, and answers 200.
/// `Authorization` header and body of each request.
type Requests = Vec<(String, Vec<u8>)>;

#[derive(Clone, Default)]
struct RecordingCollector {
    requests: Arc<Mutex<Requests>>,
}

impl RecordingCollector {
    fn start() -> (String, RecordingCollector) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
        let collector = RecordingCollector::default();
        let record = collector.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let record = record.clone();
                std::thread::spawn(move || record.serve(stream));
            }
        });
        (url, collector)
    }

    fn serve(&self, stream: TcpStream) {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut stream = stream;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let (mut length, mut authorization) = (0usize, String::new());
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap_or(0) == 0 {
                    return;
                }
                let header = header.trim_end();
                if header.is_empty() {
                    break;
                }
                if let Some((name, value)) = header.split_once(':') {
                    match name.trim().to_ascii_lowercase().as_str() {
                        "content-length" => length = value.trim().parse().unwrap_or(0),
                        "authorization" => authorization = value.trim().to_string(),
                        _ => {}
                    }
                }
            }
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_err() {
                return;
            }
            self.requests.lock().unwrap().push((authorization, body));
            if stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .is_err()
            {
                return;
            }
        }
    }

    fn requests(&self) -> Requests {
        self.requests.lock().unwrap().clone()
    }
}

fn b64(text: &str) -> Vec<u8> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .expect("base64url")
}

/// Verifies an RS256 JWT against a JWKS; returns its claims.
fn verify(token: &str, jwks: &Value) -> Value {
    use rsa::pkcs1v15::{Signature, VerifyingKey};
    use rsa::signature::Verifier;
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "a compact JWT");
    let header: Value = serde_json::from_slice(&b64(parts[0])).unwrap();
    assert_eq!(header["alg"], "RS256");
    let key = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == header["kid"])
        .expect("the token's key is in the JWKS");
    let public = rsa::RsaPublicKey::new(
        rsa::BigUint::from_bytes_be(&b64(key["n"].as_str().unwrap())),
        rsa::BigUint::from_bytes_be(&b64(key["e"].as_str().unwrap())),
    )
    .unwrap();
    let verifier = VerifyingKey::<sha2::Sha256>::new(public);
    let signature = Signature::try_from(b64(parts[2]).as_slice()).unwrap();
    verifier
        .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &signature)
        .expect("the signature verifies against fake-rails' JWKS");
    serde_json::from_slice(&b64(parts[1])).unwrap()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn gcp_oidc_tokens_verify_against_fake_rails_and_are_refreshed() {
    const AUDIENCE: &str = "https://otel-gateway.example.com";
    let (collector_url, collector) = RecordingCollector::start();
    let mut world = World::new(FakeRailsOptions {
        contract: Contract::V2,
        otel_endpoints: vec![collector_url],
        extra_args: vec![
            "--otel-audience".into(),
            AUDIENCE.into(),
            "--id-token-ttl".into(),
            "3".into(),
        ],
        ..FakeRailsOptions::default()
    })
    .unwrap();
    let (project, path) = world.rails.create_project("oidc", None).unwrap();
    world.rails.set_telemetry_flag(true, Some(&path)).unwrap();
    let metadata_host = world.rails.url.trim_start_matches("http://").to_string();
    world
        .start_runner(RunnerOptions {
            extra_env: vec![("GCE_METADATA_HOST".into(), metadata_host)],
            ..RunnerOptions::default()
        })
        .unwrap();
    let (_, jwks) = world
        .rails
        .call("GET", "/oauth/discovery/keys", None)
        .unwrap();
    let (_, discovery) = world
        .rails
        .call("GET", "/.well-known/openid-configuration", None)
        .unwrap();

    let run_one = |name: &str| {
        let pipeline = world
            .rails
            .create_pipeline(
                project,
                &format!("{NO_GIT}{name}:\n  script: [\"echo ok\"]\n"),
            )
            .unwrap();
        let jobs = world
            .rails
            .wait_for_pipeline(project, pipeline, PIPELINE_DEADLINE)
            .unwrap();
        assert_eq!(jobs[0]["status"], "success");
        // The Rails formula: the trace id is the pipeline id, as 16 bytes.
        let trace_id = (pipeline as u128).to_be_bytes();
        wait_for(
            "the job's span at the collector",
            Duration::from_secs(30),
            || {
                Ok(collector
                    .requests()
                    .into_iter()
                    .find(|(_, body)| body.windows(16).any(|w| w == trace_id))
                    .map(|(authorization, _)| authorization))
            },
        )
        .unwrap()
    };

    let first = run_one("first");
    let token_a = first
        .strip_prefix("Bearer ")
        .expect("a bearer token")
        .to_string();
    let claims_a = verify(&token_a, &jwks);
    assert_eq!(claims_a["aud"], AUDIENCE);
    assert_eq!(claims_a["iss"], discovery["issuer"]);
    let exp_a = claims_a["exp"].as_u64().unwrap();

    // Past the first token's expiry, the runner fetches a new one.
    let ttl_left = Duration::from_secs(exp_a.saturating_sub(unix_now()));
    wait_for(
        "the first token to expire",
        ttl_left + DEADLINE_SLACK,
        || Ok((unix_now() > exp_a).then_some(())),
    )
    .unwrap();
    let second = run_one("second");
    let token_b = second
        .strip_prefix("Bearer ")
        .expect("a bearer token")
        .to_string();
    assert_ne!(token_a, token_b);
    let claims_b = verify(&token_b, &jwks);
    assert_eq!(claims_b["aud"], AUDIENCE);
    assert!(claims_b["exp"].as_u64().unwrap() > exp_a);
    // Every request carried a token.
    assert!(collector
        .requests()
        .iter()
        .all(|(a, _)| a.starts_with("Bearer ")));

    // Tokens never reach the runner's log.
    let log = world.runner_log();
    for token in [&token_a, &token_b] {
        assert!(!log.contains(token.as_str()));
        assert!(!log.contains(token.split('.').nth(2).unwrap()));
    }
    assert!(log.contains("auth[0]=http_bearer_gcp_oidc"), "{log}");
}
