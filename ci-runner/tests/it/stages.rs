//! Phase 2 and 3 from the real `ci-runner` binary: stage spans, CI Function
//! spans, cache, artifacts, git strategies, the span and attribute caps and
//! the derived trace ID, against an in-test job API (with the artifacts
//! endpoint) and an in-test OTLP/HTTP collector. Every wait polls with a
//! deadline.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::job_api::{git_repo, job_payload, runner_command, set, start_api, PARENT, TRACE_ID};
use conformance::doubles::otlp::{http_collector, Collector, ReceivedSpan};
use conformance::log_lines::{field, job_line};
use serde_json::{json, Value};

const DEADLINE: Duration = Duration::from_secs(60);

/// Runs `ci-runner` for `max_jobs` jobs with one job at a time and waits for
/// it to exit; returns its stderr.
async fn run_runner(
    api: SocketAddr,
    collector: &Collector,
    max_jobs: usize,
    work: &Path,
    extra: &[&str],
) -> String {
    let mut command = runner_command(api, &work.join("builds"), work, max_jobs, 50);
    command
        .args(["--cache-dir", &work.join("cache").to_string_lossy()])
        .args(["--concurrent", "1"])
        .args(["--otlp-endpoint", &collector.http_endpoint()])
        .args(extra);
    for (key, _) in std::env::vars() {
        if key.starts_with("CI_RUNNER_") {
            command.env_remove(key);
        }
    }
    // Waits on the process's exit itself (no polling); the deadline only
    // bounds a runner that hangs, which is killed.
    let mut child = tokio::process::Command::from(command)
        .kill_on_drop(true)
        .spawn()
        .expect("ci-runner starts");
    let mut stderr = child.stderr.take().unwrap();
    let reader = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });
    let exited = tokio::time::timeout(DEADLINE, child.wait()).await;
    if exited.is_err() {
        let _ = child.kill().await;
    }
    let log = reader.await.unwrap();
    let code = exited.ok().and_then(|status| status.unwrap().code());
    assert_eq!(code, Some(0), "ci-runner did not exit 0:\n{log}");
    log
}

/// A traced (contract v1) job payload.
fn job(id: i64, script: &[&str], after: &[&str]) -> Value {
    let variables = json!([
        {"key": "CI_JOB_ID", "value": id.to_string(), "public": true},
        {"key": "CI_JOB_TOKEN", "value": format!("job-token-{id}-SECRET"), "masked": true},
        {"key": "CI_COMMIT_REF_SLUG", "value": "main", "public": true}
    ]);
    let job = job_payload(id, script, after, 2.5, variables);
    let job = set(job, "features", json!({"job_telemetry": true}));
    set(
        job,
        "trace_context",
        json!({"trace_id": TRACE_ID, "parent_span_id": PARENT}),
    )
}

fn add_variable(mut job: Value, key: &str, value: &str, masked: bool) -> Value {
    job["variables"]
        .as_array_mut()
        .unwrap()
        .push(json!({"key": key, "value": value, "masked": masked}));
    job
}

/// The spans of one job (by the resource's `ci.job.id`), once its
/// `job_execution` arrived.
async fn spans_of(collector: &Collector, job: i64) -> Vec<ReceivedSpan> {
    let id = format!("int:{job}");
    let of_job = |s: &ReceivedSpan| s.resource.get("ci.job.id") == Some(&id);
    collector
        .wait_for(DEADLINE, |spans| {
            spans.iter().any(|s| of_job(s) && s.name == "job_execution")
        })
        .await
        .into_iter()
        .filter(of_job)
        .collect()
}

/// `job_execution` and its children, children by start time, after
/// checking that each child hangs under it and lies inside it.
fn tree(spans: &[ReceivedSpan]) -> (ReceivedSpan, Vec<ReceivedSpan>) {
    let root = spans
        .iter()
        .find(|s| s.name == "job_execution")
        .expect("job_execution")
        .clone();
    let mut children: Vec<ReceivedSpan> = spans
        .iter()
        .filter(|s| s.name != "job_execution")
        .cloned()
        .collect();
    children.sort_by_key(|s| s.start_ns);
    for child in &children {
        assert_eq!(
            child.parent_span_id, root.span_id,
            "{} hangs under job_execution",
            child.name
        );
        assert_eq!(child.trace_id, root.trace_id);
        assert!(
            child.start_ns >= root.start_ns
                && child.end_ns <= root.end_ns
                && child.start_ns <= child.end_ns,
            "{} [{}, {}] lies inside job_execution [{}, {}]",
            child.name,
            child.start_ns,
            child.end_ns,
            root.start_ns,
            root.end_ns
        );
    }
    for pair in children.windows(2) {
        assert!(
            pair[0].end_ns <= pair[1].start_ns,
            "{} ends before {} starts",
            pair[0].name,
            pair[1].name
        );
    }
    (root, children)
}

/// Checks `span`'s attributes: each (key, rendered value) of `expected`.
fn assert_attrs(span: &ReceivedSpan, expected: &[(&str, &str)]) {
    for (key, value) in expected {
        assert_eq!(span.attr(key), Some(*value), "{} {key}", span.name);
    }
}

fn names(children: &[ReceivedSpan]) -> Vec<&str> {
    children.iter().map(|s| s.name.as_str()).collect()
}

fn find<'a>(children: &'a [ReceivedSpan], name: &str) -> &'a ReceivedSpan {
    children
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no span {name} in {:?}", names(children)))
}

fn zip_names(data: &[u8]) -> Vec<String> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(data.to_vec())).unwrap();
    (0..zip.len())
        .map(|i| zip.by_index(i).unwrap().name().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stages_clone_then_fetch_cache_miss_then_hit_and_artifacts() {
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    let sha = git_repo(&repo, &[("README", "hello from the repo\n")]);
    let url = format!("file://{}", repo.display());
    let git_info = json!({"repo_url": url, "ref": "main", "sha": sha, "ref_type": "branch", "depth": 5,
                          "refspecs": ["+refs/heads/main:refs/remotes/origin/main"]});
    let cache = json!([{"key": "deps-$CI_COMMIT_REF_SLUG", "paths": ["vendor"], "policy": "pull-push", "when": "on_success"}]);
    let artifacts = json!([{"name": "out-$CI_JOB_ID", "paths": ["out/*.txt"], "exclude": ["out/skip.txt"], "when": "on_success",
                            "expire_in": "1 day", "artifact_type": "archive", "artifact_format": "zip"}]);
    let first = set(
        set(
            set(
                job(
                    1,
                    &[
                        "cat README",
                        "test -d vendor && echo vendor restored || echo no vendor yet",
                        "mkdir -p vendor out && echo lib > vendor/lib.txt",
                        "echo result > out/a.txt && echo skip > out/skip.txt && echo untracked > left.txt",
                    ],
                    &["echo after ran"],
                ),
                "git_info",
                git_info.clone(),
            ),
            "cache",
            cache.clone(),
        ),
        "artifacts",
        artifacts.clone(),
    );
    let second = add_variable(
        set(
            set(
                set(
                    job(
                        2,
                        &[
                            "ls",
                            "test -f vendor/lib.txt && echo vendor restored",
                            "test ! -e left.txt && echo cleaned",
                        ],
                        &[],
                    ),
                    "git_info",
                    git_info,
                ),
                "cache",
                cache,
            ),
            "artifacts",
            json!([]),
        ),
        "GIT_STRATEGY",
        "fetch",
        false,
    );
    let (api, addr) = start_api(vec![first, second], |_| {}).await;
    let collector = http_collector().await;
    let log = run_runner(addr, &collector, 2, work.path(), &[]).await;
    assert_eq!(
        api.state(1).as_deref(),
        Some("success"),
        "{}\n{log}",
        api.trace(1)
    );
    assert_eq!(
        api.state(2).as_deref(),
        Some("success"),
        "{}\n{log}",
        api.trace(2)
    );
    let trace1 = api.trace(1);
    assert!(
        trace1.contains("hello from the repo") && trace1.contains("no vendor yet"),
        "{trace1}"
    );
    let trace2 = api.trace(2);
    assert!(
        trace2.contains("vendor restored") && trace2.contains("cleaned"),
        "{trace2}"
    );

    // Job 1: every stage, in GitLab's order.
    let (root, children) = tree(&spans_of(&collector, 1).await);
    assert_eq!(
        names(&children),
        [
            "prepare_executor",
            "get_sources",
            "restore_cache",
            "step_script",
            "after_script",
            "archive_cache",
            "upload_artifacts"
        ]
    );
    for child in &children {
        assert_eq!(
            child.attr("ci.stage.status"),
            Some("str:success"),
            "{child:#?}"
        );
        assert_eq!(child.status_code, 1, "{child:#?}");
    }
    assert_attrs(
        &root,
        &[
            ("ci.job.queued_duration", "double:2.5"),
            ("ci.telemetry.dropped_spans", "int:0"),
        ],
    );
    let prepare = find(&children, "prepare_executor");
    assert_attrs(
        prepare,
        &[
            ("ci.runner.executor", "str:shell"),
            ("ci.executor.shell", "str:bash"),
        ],
    );
    let sources = find(&children, "get_sources");
    assert_attrs(
        sources,
        &[
            ("ci.git.strategy", "str:clone"),
            ("ci.git.operation", "str:clone"),
            ("ci.git.depth", "int:5"),
        ],
    );
    let restore = find(&children, "restore_cache");
    assert_attrs(
        restore,
        &[
            ("ci.cache.key", "str:deps-main"),
            ("ci.cache.hit", "bool:false"),
            ("ci.cache.policy", "str:pull-push"),
        ],
    );
    assert_eq!(
        find(&children, "step_script").attr("ci.script.exit_code"),
        Some("int:0")
    );
    let archive = find(&children, "archive_cache");
    assert_attrs(
        archive,
        &[
            ("ci.cache.key", "str:deps-main"),
            ("ci.cache.count", "int:2"),
        ],
    );
    let upload = find(&children, "upload_artifacts");
    assert_attrs(
        upload,
        &[
            ("ci.artifact.name", "str:out-1"),
            ("ci.artifact.type", "str:archive"),
            ("ci.artifact.format", "str:zip"),
            ("ci.artifact.count", "int:2"),
        ],
    );
    let uploads = api.lock().uploads.get(&1).cloned().unwrap_or_default();
    assert_eq!(uploads.len(), 1);
    assert_eq!(
        upload.attr("ci.artifact.size_bytes"),
        Some(format!("int:{}", uploads[0].data.len()).as_str())
    );
    assert_eq!(uploads[0].file_name, "out-1.zip");
    assert_eq!(uploads[0].params["artifact_type"], "archive");
    assert_eq!(uploads[0].params["artifact_format"], "zip");
    assert_eq!(uploads[0].params["expire_in"], "1 day");
    assert_eq!(uploads[0].token.as_deref(), Some("job-token-1-SECRET"));
    assert_eq!(zip_names(&uploads[0].data), ["out/", "out/a.txt"]);
    assert!(work
        .path()
        .join("cache/group/demo/deps-main/cache.zip")
        .is_file());

    // Job 2: an incremental fetch of the same checkout, and a cache hit.
    let (_, children) = tree(&spans_of(&collector, 2).await);
    assert_eq!(
        names(&children),
        [
            "prepare_executor",
            "get_sources",
            "restore_cache",
            "step_script",
            "archive_cache"
        ]
    );
    let sources = find(&children, "get_sources");
    assert_attrs(
        sources,
        &[
            ("ci.git.strategy", "str:fetch"),
            ("ci.git.operation", "str:fetch"),
        ],
    );
    let restore = find(&children, "restore_cache");
    assert_eq!(restore.attr("ci.cache.hit"), Some("bool:true"));
    assert!(
        restore
            .attr("ci.cache.size_bytes")
            .is_some_and(|s| s != "int:0"),
        "{restore:#?}"
    );
    assert!(
        trace2.contains("Reinitialized existing Git repository"),
        "{trace2}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_script_runs_after_script_and_the_on_failure_stages() {
    let work = tempfile::tempdir().unwrap();
    let payload = set(
        set(
            job(
                3,
                &["mkdir -p logs && echo boom > logs/err.txt", "exit 4"],
                &["echo after ran with $CI_JOB_STATUS"],
            ),
            "artifacts",
            json!([{"paths": ["logs/"], "when": "always"}, {"paths": ["never/"], "when": "on_success"}]),
        ),
        "cache",
        json!([{"key": "k", "paths": ["logs"], "when": "on_success"}, {"key": "f-$CACHE_SALT", "paths": ["logs"], "when": "on_failure"}]),
    );
    let payload = add_variable(payload, "CACHE_SALT", "salt-secret-123", true);
    let (api, addr) = start_api(vec![payload], |_| {}).await;
    let collector = http_collector().await;
    run_runner(addr, &collector, 1, work.path(), &[]).await;
    assert_eq!(api.state(3).as_deref(), Some("failed"));
    assert!(
        api.trace(3).contains("after ran with failed"),
        "{}",
        api.trace(3)
    );

    let (root, children) = tree(&spans_of(&collector, 3).await);
    assert_eq!(
        names(&children),
        [
            "prepare_executor",
            "get_sources",
            "restore_cache",
            "restore_cache",
            "step_script",
            "after_script",
            "archive_cache_on_failure",
            "upload_artifacts_on_failure"
        ]
    );
    let script = find(&children, "step_script");
    assert_eq!(script.status_code, 2);
    assert_eq!(script.status_message, "exit code 4");
    assert_attrs(
        script,
        &[
            ("ci.stage.status", "str:failed"),
            ("ci.script.exit_code", "int:4"),
        ],
    );
    assert_eq!(
        find(&children, "after_script").attr("ci.stage.status"),
        Some("str:success")
    );
    // A masked variable in a key: the span says so without the value.
    assert_eq!(
        find(&children, "archive_cache_on_failure").attr("ci.cache.key"),
        Some("str:f-[MASKED]")
    );
    assert!(work
        .path()
        .join("cache/group/demo/f-salt-secret-123/cache.zip")
        .is_file());
    assert_eq!(
        find(&children, "upload_artifacts_on_failure").attr("ci.artifact.name"),
        Some("str:artifacts")
    );
    assert_eq!(root.status_code, 2);
    assert_eq!(root.attr("ci.job.exit_code"), Some("int:4"));
    let uploads = api.lock().uploads.get(&3).cloned().unwrap_or_default();
    assert_eq!(uploads.len(), 1, "only the `when: always` artifact");
    assert_eq!(zip_names(&uploads[0].data), ["logs/", "logs/err.txt"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ci_functions_run_in_order_and_a_failure_stops_the_job() {
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    let sha = git_repo(
        &repo,
        &[(
            "fns/greet/step.yml",
            "spec:\n  inputs:\n    who:\n      type: string\n    punct:\n      default: '!'\n---\nexec:\n  command: [bash, -c, 'echo \"greetings ${{ inputs.who }}${{ inputs.punct }} token=$API_TOKEN\"']\n",
        )],
    );
    let git_info = json!({"repo_url": format!("file://{}", repo.display()), "ref": "main", "sha": sha, "depth": 0});
    let secret = "fn-secret-value-123";
    let passing = add_variable(
        set(
            set(
                job(4, &[], &[]),
                "run",
                json!(serde_json::to_string(&json!([
                    {"name": "hello", "script": ["echo hello ${{ inputs.name }} from $GREETING"], "inputs": {"name": "world"}, "env": {"GREETING": "env"}},
                    {"name": "greet", "step": "./fns/greet", "inputs": {"who": "${{ job.SECRET_TOKEN }}"}, "env": {"API_TOKEN": "${{ job.SECRET_TOKEN }}"}}
                ]))
                .unwrap()),
            ),
            "git_info",
            git_info.clone(),
        ),
        "SECRET_TOKEN",
        secret,
        true,
    );
    let failing = set(
        job(5, &[], &[]),
        "run",
        json!([
            {"name": "first", "script": "echo first ran"},
            {"name": "breaks", "script": ["echo breaking", "exit 6"]},
            {"name": "never", "script": "echo never ran"}
        ]),
    );
    let remote = set(
        job(6, &[], &[]),
        "run",
        json!([{"name": "remote", "step": "gitlab.com/org/fn@v1.2", "inputs": {"x": 1}}, {"name": "after", "script": "echo no"}]),
    );
    let (api, addr) = start_api(vec![passing, failing, remote], |_| {}).await;
    let collector = http_collector().await;
    run_runner(addr, &collector, 3, work.path(), &[]).await;

    assert_eq!(api.state(4).as_deref(), Some("success"), "{}", api.trace(4));
    let trace = api.trace(4);
    assert!(trace.contains("hello world from env"), "{trace}");
    assert!(
        trace.contains("greetings [MASKED]! token=[MASKED]"),
        "{trace}"
    );
    let (_, children) = tree(&spans_of(&collector, 4).await);
    assert_eq!(
        names(&children),
        [
            "prepare_executor",
            "get_sources",
            "ci_function",
            "ci_function"
        ]
    );
    let (hello, greet) = (&children[2], &children[3]);
    assert_attrs(
        hello,
        &[
            ("ci.function.name", "str:hello"),
            ("ci.function.kind", "str:script"),
            ("ci.function.version", "str:local"),
            ("ci.function.status", "str:success"),
            ("ci.script.exit_code", "int:0"),
        ],
    );
    assert!(
        hello
            .attr("ci.function.inputs")
            .is_some_and(|v| v.contains("name")),
        "{hello:#?}"
    );
    assert_attrs(
        greet,
        &[
            ("ci.function.name", "str:greet"),
            ("ci.function.kind", "str:step"),
            ("ci.function.ref", "str:./fns/greet"),
        ],
    );
    assert_eq!(greet.status_code, 1);
    for span in spans_of(&collector, 4).await {
        let all = format!(
            "{:?} {:?} {}",
            span.attributes, span.resource, span.status_message
        );
        assert!(
            !all.contains(secret) && !all.contains("job-token-4-SECRET"),
            "a secret in {span:#?}"
        );
    }

    assert_eq!(api.state(5).as_deref(), Some("failed"));
    assert_eq!(
        api.final_update(5).unwrap()["failure_reason"],
        "script_failure"
    );
    assert_eq!(api.final_update(5).unwrap()["exit_code"], 6);
    let trace = api.trace(5);
    assert!(
        trace.contains("first ran") && !trace.contains("never ran"),
        "{trace}"
    );
    let (root, children) = tree(&spans_of(&collector, 5).await);
    let functions: Vec<_> = children
        .iter()
        .filter(|s| s.name == "ci_function")
        .collect();
    assert_eq!(
        functions.len(),
        2,
        "the function after the failure does not run"
    );
    assert_eq!(functions[1].attr("ci.function.name"), Some("str:breaks"));
    assert_eq!(functions[1].attr("ci.function.status"), Some("str:failed"));
    assert_eq!(functions[1].attr("ci.script.exit_code"), Some("int:6"));
    assert_eq!(functions[1].status_code, 2);
    assert_eq!(
        functions[1].status_message,
        "function `breaks`: exit code 6"
    );
    assert_eq!(root.attr("ci.job.status"), Some("str:failed"));

    assert_eq!(api.state(6).as_deref(), Some("failed"));
    let (_, children) = tree(&spans_of(&collector, 6).await);
    let functions: Vec<_> = children
        .iter()
        .filter(|s| s.name == "ci_function")
        .collect();
    assert_eq!(functions.len(), 1);
    assert_eq!(functions[0].attr("ci.function.version"), Some("str:v1.2"));
    assert_eq!(
        functions[0].attr("ci.function.ref"),
        Some("str:gitlab.com/org/fn")
    );
    assert_eq!(functions[0].attr("ci.function.status"), Some("str:failed"));
    assert!(
        functions[0]
            .status_message
            .contains("cannot resolve step `gitlab.com/org/fn@v1.2`"),
        "{:#?}",
        functions[0]
    );
    assert!(
        api.trace(6)
            .contains("ERROR: function `remote`: cannot resolve"),
        "{}",
        api.trace(6)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn span_cap_drops_and_counts_and_long_values_are_truncated() {
    let work = tempfile::tempdir().unwrap();
    let mut run: Vec<Value> = (0..1005)
        .map(|i| json!({"name": format!("f{i}"), "script": ":"}))
        .collect();
    run[0]["name"] = json!("n".repeat(5000));
    let payload = set(job(7, &[], &[]), "run", Value::Array(run));
    let (api, addr) = start_api(vec![payload], |_| {}).await;
    let collector = http_collector().await;
    run_runner(addr, &collector, 1, work.path(), &[]).await;
    assert_eq!(api.state(7).as_deref(), Some("success"));

    let spans = spans_of(&collector, 7).await;
    // job_execution, prepare_executor, get_sources and 997 functions.
    assert_eq!(spans.len(), 1000);
    let root = spans.iter().find(|s| s.name == "job_execution").unwrap();
    assert_eq!(root.attr("ci.telemetry.dropped_spans"), Some("int:8"));
    let long = spans
        .iter()
        .find(|s| {
            s.attr("ci.function.name")
                .is_some_and(|n| n.starts_with("str:nnn"))
        })
        .expect("the first function");
    let name = long.attr("ci.function.name").unwrap();
    assert!(name.ends_with("…[truncated]"), "{name}");
    assert_eq!(long.attr("ci.telemetry.truncated"), Some("bool:true"));
    let bytes: usize = long
        .attributes
        .iter()
        .map(|(k, v)| k.len() + v.split_once(':').unwrap().1.len())
        .sum();
    assert!(bytes <= 4096 + 64, "{bytes}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_gitlab_without_trace_context_gets_a_derived_root_trace_when_asked() {
    let work = tempfile::tempdir().unwrap();
    let old = |id: i64| {
        let mut payload = job(id, &["echo old gitlab"], &[]);
        payload.as_object_mut().unwrap().remove("trace_context");
        payload["job_info"]["pipeline_id"] = json!(506);
        payload
    };
    // Off by default: no telemetry.
    let (api, addr) = start_api(vec![old(8)], |_| {}).await;
    let collector = http_collector().await;
    let log = run_runner(addr, &collector, 1, work.path(), &[]).await;
    assert_eq!(api.state(8).as_deref(), Some("success"));
    assert!(
        job_line(&log, 8, "Telemetry disabled: trace_context is missing").is_some(),
        "{log}"
    );

    let (api, addr) = start_api(vec![old(9), old(10)], |_| {}).await;
    let log = run_runner(
        addr,
        &collector,
        2,
        work.path(),
        &["--derive-trace-id-from-pipeline"],
    )
    .await;
    assert_eq!(api.state(9).as_deref(), Some("success"));
    let derived = job_line(&log, 9, "Telemetry trace id derived from the pipeline id");
    assert_eq!(
        derived.and_then(|l| field(l, "trace_id")),
        Some("000000000000000000000000000001fa"),
        "{log}"
    );
    let nine = spans_of(&collector, 9).await;
    let ten = spans_of(&collector, 10).await;
    let (root9, children) = tree(&nine);
    let (root10, _) = tree(&ten);
    assert_eq!(root9.trace_id, "000000000000000000000000000001fa");
    assert_eq!(
        root10.trace_id, root9.trace_id,
        "the jobs of a pipeline share one trace"
    );
    assert_eq!(root9.parent_span_id, "", "job_execution is a root span");
    assert!(children.iter().all(|c| c.trace_id == root9.trace_id));
    assert!(collector
        .spans()
        .iter()
        .all(|s| s.resource.get("ci.job.id") != Some(&"int:8".to_string())));
}
