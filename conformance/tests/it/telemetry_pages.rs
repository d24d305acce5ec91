//! The Rails query layer (issue 15) against a real pipeline in the embedded
//! stack: fake-rails' job and pipeline telemetry API (shapes as insta
//! snapshots, ids and times redacted), who may read it, why a job has none,
//! and the pages opened by a real headless Chromium (Debian's `chromium`;
//! `cargo xtask test` installs it when missing), which must draw one bar per
//! span with its name, and leave screenshots in `target/telemetry-pages/`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use conformance::gitlab::{
    clickhouse_args, init_repository, job_id, job_named, FakeRails, FakeRailsOptions, ADMIN_TOKEN,
};
use conformance::paths;
use conformance::process::{wait_for, Lifetime};
use conformance::world::{World, SPAN_DEADLINE};
use serde_json::{json, Value};

const PIPELINE: &str = "
stages: [build, test]
compile:
  stage: build
  script:
    - echo compiling
lint:
  stage: build
  script:
    - echo linting
fails:
  stage: test
  script:
    - echo about to fail
    - exit 3
";

const ONE_JOB: &str = "
only:
  script:
    - echo hello
";

/// `GET url` with `headers`; the status and the body.
fn get(url: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into();
    let mut request = agent.get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let mut response = request.call().unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = response.status().as_u16();
    let body = response.body_mut().read_to_string().unwrap_or_default();
    (status, body)
}

fn get_json(url: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let (status, body) = get(url, headers);
    let value = serde_json::from_str(&body).unwrap_or(Value::String(body));
    (status, value)
}

const ADMIN: (&str, &str) = ("PRIVATE-TOKEN", ADMIN_TOKEN);

/// Polls a telemetry endpoint until it answers 200 with `done` true.
fn wait_for_telemetry(url: &str, done: impl Fn(&Value) -> bool) -> Value {
    wait_for(
        &format!("{url} to answer complete telemetry"),
        SPAN_DEADLINE,
        || {
            let (status, body) = get_json(url, &[ADMIN]);
            Ok((status == 200 && done(&body)).then_some(body))
        },
    )
    .unwrap()
}

/// A span tree reduced to what must not vary between runs: names,
/// services, sides, statuses and attribute keys; ids, times and values go.
fn span_shape(span: &Value) -> Value {
    let keys: Vec<&str> = span["attributes"]
        .as_object()
        .map(|a| a.keys().map(String::as_str).collect())
        .unwrap_or_default();
    json!({
        "name": span["name"],
        "service": span["service"],
        "side": span["side"],
        "status": span["status"],
        "status_message": span["status_message"],
        "attribute_keys": keys,
        "children": span["children"].as_array().map(|c| c.iter().map(span_shape).collect::<Vec<_>>()),
    })
}

fn has_time(v: &Value) -> bool {
    v.as_u64().is_some() || v.as_i64().is_some()
}

fn job_shape(t: &Value) -> Value {
    json!({
        "job": {
            "name": t["job"]["name"],
            "stage": t["job"]["stage"],
            "status": t["job"]["status"],
            "web_url_is_the_job_page": t["job"]["web_url"].as_str().is_some_and(|u| u.ends_with(&format!("/-/jobs/{}", t["job"]["id"]))),
        },
        "trace_id_is_the_pipelines": t["trace_id"] == format!("{:032x}", t["job"]["pipeline_id"].as_u64().unwrap_or_default()),
        "has_duration": has_time(&t["duration_ns"]),
        "has_queued_duration": has_time(&t["queued_duration_ns"]),
        "has_execution_duration": has_time(&t["execution_duration_ns"]),
        "dropped_spans": t["dropped_spans"],
        "complete": t["complete"],
        "span_count": t["span_count"],
        "spans": t["spans"].as_array().map(|s| s.iter().map(span_shape).collect::<Vec<_>>()),
    })
}

fn pipeline_shape(t: &Value) -> Value {
    let jobs: Vec<Value> = t["jobs"]
        .as_array()
        .map(|jobs| {
            jobs.iter()
                .map(|j| {
                    json!({
                        "name": j["name"],
                        "stage": j["stage"],
                        "status": j["status"],
                        "telemetry_missing": j["telemetry_missing"],
                        "has_queue_time": has_time(&j["queued_duration_ns"]) && has_time(&j["queued_offset_ns"]),
                        "has_duration": has_time(&j["duration_ns"]) && has_time(&j["started_offset_ns"]),
                        "span_status": j["span_status"],
                        "dropped_spans": j["dropped_spans"],
                        "stages": j["stages"].as_array().map(|s| s.iter().map(|s| json!([s["name"], s["status"]])).collect::<Vec<_>>()),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    json!({
        "pipeline": {"status": t["pipeline"]["status"], "ref": t["pipeline"]["ref"]},
        "trace_id_is_the_pipelines": t["trace_id"] == format!("{:032x}", t["pipeline"]["id"].as_u64().unwrap_or_default()),
        "has_duration": has_time(&t["duration_ns"]),
        "jobs": jobs,
    })
}

/// Every span of a tree, depth first.
fn flatten<'a>(spans: &'a Value, out: &mut Vec<&'a Value>) {
    for span in spans.as_array().into_iter().flatten() {
        out.push(span);
        flatten(&span["children"], out);
    }
}

/// Registers a runner and takes the next job as that runner would; returns
/// `(job id, job token)`.
fn take_job(rails: &FakeRails) -> (u64, String) {
    let runner = rails.register_runner("by-hand").unwrap();
    let payload = rails
        .api(
            "POST",
            "/api/v4/jobs/request",
            Some(json!({"token": runner, "info": {"features": {}}})),
        )
        .unwrap();
    (
        payload["id"].as_u64().expect("a job id"),
        payload["token"].as_str().expect("a job token").to_string(),
    )
}

#[test]
fn job_and_pipeline_telemetry_through_the_api_and_the_pages() {
    let mut world = World::new(FakeRailsOptions::default()).unwrap();
    let (project, project_path) = world.create_project("pages").unwrap();
    world
        .rails
        .set_telemetry_flag(true, Some(&project_path))
        .unwrap();
    let runner_options = world.to_collector();
    world.start_runner(runner_options).unwrap();
    let (pipeline, jobs) = world.run_pipeline(project, PIPELINE).unwrap();
    let failed = job_id(job_named(&jobs, "fails"));
    let compiled = job_id(job_named(&jobs, "compile"));
    assert_eq!(job_named(&jobs, "fails")["status"], "failed");
    // Jobs taken by hand below must not go to the runner.
    world.runner = None;

    let base = format!("{}/api/v4/projects/{project}", world.rails.url);
    let job_url = |job: u64| format!("{base}/jobs/{job}/telemetry");

    // The API, once every span has arrived.
    let failed_telemetry = wait_for_telemetry(&job_url(failed), |t| t["complete"] == true);
    wait_for_telemetry(&job_url(compiled), |t| t["complete"] == true);
    let pipeline_url = format!("{base}/pipelines/{pipeline}/telemetry");
    let pipeline_telemetry = wait_for_telemetry(&pipeline_url, |t| {
        t["jobs"].as_array().is_some_and(|jobs| {
            jobs.iter().all(|j| {
                j["telemetry_missing"].is_null()
                    && !j["stages"].as_array().is_none_or(Vec::is_empty)
            })
        })
    });
    insta::assert_yaml_snapshot!("failed_job", job_shape(&failed_telemetry));
    insta::assert_yaml_snapshot!("pipeline", pipeline_shape(&pipeline_telemetry));
    // The accounting the runner reported, and the tree's integrity.
    let mut spans = Vec::new();
    flatten(&failed_telemetry["spans"], &mut spans);
    assert_eq!(
        spans.len() as u64,
        failed_telemetry["span_count"].as_u64().unwrap()
    );
    assert_eq!(failed_telemetry["dropped_spans"], 0);
    let execution = spans.iter().find(|s| s["name"] == "job_execution").unwrap();
    assert_eq!(execution["status"], "error");
    assert_eq!(execution["attributes"]["ci.job.id"], failed.to_string());

    // Who may read it.
    let url = job_url(failed);
    assert_eq!(get_json(&url, &[]).0, 401, "no token");
    assert_eq!(
        get_json(&url, &[("PRIVATE-TOKEN", "wrong")]).0,
        401,
        "a wrong token"
    );
    assert_eq!(
        get_json(&url, &[("Authorization", &format!("Bearer {ADMIN_TOKEN}"))]).0,
        200,
        "the admin token as a bearer token"
    );
    let (other_project, _) = world.create_project("elsewhere").unwrap();
    let (status, body) = get_json(
        &format!(
            "{}/api/v4/projects/{other_project}/jobs/{failed}/telemetry",
            world.rails.url
        ),
        &[ADMIN],
    );
    assert_eq!(
        (status, body["message"].as_str()),
        (404, Some("404 Job Not Found")),
        "wrong project"
    );
    // A job of another pipeline, taken by hand: its token reads its own job
    // (whose runner spans never come) and nothing else.
    world.rails.create_pipeline(project, ONE_JOB).unwrap();
    let (own_job, own_token) = take_job(&world.rails);
    let (status, body) = get_json(&url, &[("JOB-TOKEN", &own_token)]);
    assert_eq!(status, 403, "another job's token: {body}");
    let (status, _) = get_json(&format!("{url}?job_token={own_token}"), &[]);
    assert_eq!(status, 403, "another job's token as a parameter");
    assert_eq!(
        get_json(&pipeline_url, &[("JOB-TOKEN", &own_token)]).0,
        403,
        "another pipeline"
    );
    let (status, body) = get_json(&job_url(own_job), &[("JOB-TOKEN", &own_token)]);
    assert!(
        status == 200 || (status == 404 && body["reason"] == "not_arrived"),
        "its own job: {status} {body}"
    );
    assert_eq!(get_json(&pipeline_url, &[ADMIN]).0, 200);

    // A log record of the failing stage (as a runner that ships its job log
    // over OTLP would write it) shows under that stage.
    let step = spans.iter().find(|s| s["name"] == "step_script").unwrap();
    world
        .stack
        .clickhouse()
        .execute(&format!(
            "INSERT INTO otel.otel_logs (Timestamp, TraceId, SpanId, SeverityText, SeverityNumber, \
             ServiceName, Body, ResourceAttributes) VALUES (parseDateTime64BestEffort('{}', 9), \
             '{}', '{}', 'INFO', 9, 'gitlab-ci-runner', 'about to fail <for real>', map('ci.job.id', '{failed}'))",
            step["start"].as_str().unwrap(),
            failed_telemetry["trace_id"].as_str().unwrap(),
            step["span_id"].as_str().unwrap(),
        ))
        .unwrap();
    let with_log = wait_for_telemetry(&url, |t| t["log_count"] == 1);
    let mut spans = Vec::new();
    flatten(&with_log["spans"], &mut spans);
    let step = spans.iter().find(|s| s["name"] == "step_script").unwrap();
    assert_eq!(step["logs"][0]["body"], "about to fail <for real>");
    assert_eq!(step["logs"][0]["severity"], "INFO");

    check_pages(
        &world,
        &project_path,
        failed,
        pipeline,
        &failed_telemetry,
        &pipeline_telemetry,
    );
}

/// Why there is no telemetry: each reason, and 503 without ClickHouse.
#[test]
fn a_job_without_telemetry_says_why() {
    let world = World::new(FakeRailsOptions::default()).unwrap();
    let start = |name: &str, args: &[&str], with_clickhouse: bool| {
        let dir = world.stack.dir().join(name);
        let mut extra_args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        if with_clickhouse {
            extra_args.extend(clickhouse_args(
                world.stack.endpoints(),
                &world.stack.password_file(),
            ));
        }
        // No `--otlp-endpoint`: no Rails span of these ever arrives.
        FakeRails::start(
            &dir,
            &FakeRailsOptions {
                extra_args,
                ..FakeRailsOptions::default()
            },
            Lifetime::Owned,
        )
        .unwrap()
    };
    let cases = [
        // Trace ids derive from pipeline ids: keep these apart from the world's.
        (
            "quiet",
            vec!["--first-id", "900000001"],
            true,
            true,
            Some("not_arrived"),
        ),
        (
            "flag-off",
            vec!["--first-id", "900000101"],
            true,
            false,
            Some("flag_off"),
        ),
        (
            "unsampled",
            vec!["--first-id", "900000201", "--sampling-rate", "0"],
            true,
            true,
            Some("sampled_out"),
        ),
        (
            "no-clickhouse",
            vec!["--first-id", "900000301"],
            false,
            true,
            None,
        ),
    ];
    for (name, args, with_clickhouse, flag, want) in cases {
        let rails = start(name, &args, with_clickhouse);
        let repo = init_repository(&world.stack.dir().join(name).join("repo"), &[]).unwrap();
        let (project, path) = rails.create_project("reasons", Some(&repo)).unwrap();
        rails.set_telemetry_flag(flag, Some(&path)).unwrap();
        let pipeline = rails.create_pipeline(project, ONE_JOB).unwrap();
        let job_url = format!(
            "{}/api/v4/projects/{project}/jobs/{}/telemetry",
            rails.url, pipeline
        );
        if with_clickhouse {
            let (status, body) = get_json(&job_url, &[ADMIN]);
            assert_eq!(
                (status, body["reason"].as_str()),
                (404, Some("not_run")),
                "{name}: {body}"
            );
        }
        let (job, _) = take_job(&rails);
        assert_eq!(
            job, pipeline,
            "the pipeline's one job has the same first id"
        );
        let (status, body) = get_json(&job_url, &[ADMIN]);
        match want {
            Some(reason) => {
                assert_eq!(
                    (status, body["reason"].as_str()),
                    (404, Some(reason)),
                    "{name}: {body}"
                );
                assert!(
                    body["message"]
                        .as_str()
                        .unwrap_or_default()
                        .starts_with("404 Telemetry Not Found - "),
                    "{body}"
                );
                let (status, page) = get(
                    &format!(
                        "{}/{path}/-/jobs/{job}/telemetry?private_token={ADMIN_TOKEN}",
                        rails.url
                    ),
                    &[],
                );
                assert_eq!(status, 404, "{name}: the page");
                assert!(page.contains("No telemetry to show"), "{page}");
            }
            None => {
                assert_eq!(status, 503, "{name}: {body}");
                assert!(
                    body["message"]
                        .as_str()
                        .unwrap_or_default()
                        .contains("--clickhouse-url"),
                    "{body}"
                );
            }
        }
    }
}

/// Debian's Chromium, or the one `CHROMIUM` names.
fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("CHROMIUM") {
        return PathBuf::from(path);
    }
    for candidate in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if Path::new(candidate).exists() {
            return PathBuf::from(candidate);
        }
    }
    panic!(
        "no Chromium: `cargo xtask test` installs Debian's `chromium` when missing \
         (or run `apt-get install -y chromium`, or set CHROMIUM=/path/to/chrome)"
    );
}

/// Runs headless Chromium on `url` with `args`; returns stdout.
fn run_chromium(url: &str, profile: &Path, args: &[String]) -> String {
    let output = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
        ])
        .arg("--disable-dev-shm-usage")
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .expect("starting chromium");
    assert!(
        output.status.success(),
        "chromium failed on {url}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The values of `attribute` on every element whose start tag has `marker`.
fn attribute_of_tags(dom: &str, marker: &str, attribute: &str) -> Vec<String> {
    dom.split('<')
        .filter(|tag| tag.contains(marker))
        .filter_map(|tag| {
            let rest = tag.split(&format!(" {attribute}=\"")).nth(1)?;
            Some(rest.split('"').next()?.to_string())
        })
        .collect()
}

fn check_pages(
    world: &World,
    project_path: &str,
    job: u64,
    pipeline: u64,
    job_telemetry: &Value,
    pipeline_telemetry: &Value,
) {
    let out = paths::target_dir().join("telemetry-pages");
    std::fs::create_dir_all(&out).unwrap();
    let profile = tempdir(&out.join("chromium-profile"));
    let base = format!("{}/{project_path}/-", world.rails.url);

    let job_page = format!("{base}/jobs/{job}/telemetry?private_token={ADMIN_TOKEN}");
    let dom = run_chromium(&job_page, &profile, &["--dump-dom".into()]);
    assert!(
        dom.contains("about to fail &lt;for real&gt;"),
        "the log line, escaped, under its stage"
    );
    let names = attribute_of_tags(&dom, "data-span-id=", "data-name");
    let mut spans = Vec::new();
    flatten(&job_telemetry["spans"], &mut spans);
    let expected: Vec<String> = spans
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        names, expected,
        "one bar per span, in tree order, with its name"
    );
    let bars = dom.matches("<rect class=\"bar ").count();
    assert_eq!(bars, spans.len(), "one bar per span");
    let sides: BTreeMap<String, String> = attribute_of_tags(&dom, "data-span-id=", "data-name")
        .into_iter()
        .zip(attribute_of_tags(&dom, "data-span-id=", "data-side"))
        .collect();
    assert_eq!(sides["job_lifecycle"], "rails");
    assert_eq!(sides["job_execution"], "runner");
    let failed: Vec<String> = attribute_of_tags(&dom, "span runner failed", "data-name");
    assert!(failed.contains(&"job_execution".to_string()), "{failed:?}");
    assert!(dom.contains(&format!("Job #{job}")), "the title");
    run_chromium(
        &job_page,
        &profile,
        &[
            format!("--screenshot={}", out.join("job.png").display()),
            "--window-size=1280,900".into(),
        ],
    );

    let pipeline_page =
        format!("{base}/pipelines/{pipeline}/telemetry?private_token={ADMIN_TOKEN}");
    let dom = run_chromium(&pipeline_page, &profile, &["--dump-dom".into()]);
    let names = attribute_of_tags(&dom, "data-job-id=", "data-name");
    let expected: Vec<String> = pipeline_telemetry["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, expected, "one row per job with its name");
    assert_eq!(
        dom.matches("<rect class=\"queue\"").count(),
        expected.len(),
        "queue time of every job"
    );
    assert!(
        dom.contains("data-stage=\"step_script\""),
        "stages inside the run bars"
    );
    run_chromium(
        &pipeline_page,
        &profile,
        &[
            format!("--screenshot={}", out.join("pipeline.png").display()),
            "--window-size=1280,500".into(),
        ],
    );
    for file in ["job.png", "pipeline.png"] {
        let size = std::fs::metadata(out.join(file))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(size > 10_000, "{file} is a real screenshot ({size} bytes)");
    }
}

/// A fresh, empty directory.
fn tempdir(dir: &Path) -> PathBuf {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    dir.to_path_buf()
}
