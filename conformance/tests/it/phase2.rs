//! Phases 2 and 3 (gitlab-runner#39230, #39271), against a real collector
//! and ClickHouse, fake-rails with real git repositories, and the runner
//! under test as processes:
//!
//! 1. every job's `job_execution` has one child span per build stage that
//!    ran, named as GitLab Runner's stages, in order, inside its parent's
//!    time range, with the stage metadata (a redacted YAML snapshot);
//! 2. the cache misses in a project's first pipeline and hits in its second;
//! 3. a failing script: `step_script` is an Error, `after_script` still runs
//!    and `artifacts: when: always` are uploaded;
//! 4. stage spans stream: `get_sources` is in ClickHouse while the job still
//!    runs;
//! 5. `run:` (CI Functions) gives one `ci_function` span per invocation, and
//!    a failing function fails the job.

use std::time::{Duration, Instant};

use conformance::gitlab::FakeRailsOptions;
use conformance::gitlab::{job_id as id, job_named};
use conformance::process::wait_for;
use conformance::trace::{self, StoredSpan, Tree};
use conformance::world::{World, PIPELINE_DEADLINE, SPAN_DEADLINE};
use serde_json::{json, Value};

/// Attributes that differ from run to run: IDs, hosts, paths, times, sizes.
const REDACTED: [&str; 14] = [
    "ci.job.id",
    "ci.pipeline.id",
    "ci.project.id",
    "ci.runner.id",
    "cicd.pipeline.run.id",
    "cicd.pipeline.task.run.id",
    "cicd.pipeline.task.run.url.full",
    "cicd.worker.id",
    "cicd.worker.name",
    "vcs.ref.head.revision",
    "vcs.repository.url.full",
    "ci.job.queued_duration",
    "ci.cache.size_bytes",
    "ci.artifact.size_bytes",
];

/// A world with a telemetry-enabled project backed by a git repository
/// holding `files`, and the runner started. Returns the project's id.
fn world_with_repo(name: &str, files: &[(&str, &str)]) -> (World, u64) {
    let mut world = World::new(FakeRailsOptions::default()).unwrap();
    let (project, path) = world.create_project_with_files(name, files).unwrap();
    world.rails.set_telemetry_flag(true, Some(&path)).unwrap();
    world.start_runner(world.to_collector()).unwrap();
    (world, project)
}

/// The runner's spans of `job` once `count` of them are in ClickHouse
/// (`job_execution` ends last, its children stream before it).
fn runner_spans(world: &World, job: u64, count: usize) -> Vec<StoredSpan> {
    let clickhouse = world.stack.clickhouse();
    wait_for(
        &format!("{count} runner spans of job {job}"),
        SPAN_DEADLINE,
        || {
            let spans = trace::select(
                &clickhouse,
                &format!(
                    "ServiceName = 'gitlab-ci-runner' AND ResourceAttributes['ci.job.id'] = '{job}'"
                ),
            )?;
            let done = spans.len() >= count && spans.iter().any(|s| s.name == "job_execution");
            Ok(done.then_some(spans))
        },
    )
    .unwrap()
}

/// `job_execution` and its children in start order, after checking that
/// they form one tree, each child inside its parent's time range and after
/// its previous sibling.
fn job_tree(spans: Vec<StoredSpan>) -> (StoredSpan, Vec<StoredSpan>, Tree) {
    let tree = Tree::new(spans);
    let root = tree
        .spans
        .iter()
        .position(|s| s.name == "job_execution")
        .expect("job_execution");
    let parent = tree.spans[root].clone();
    let children: Vec<StoredSpan> = tree
        .children_of(root)
        .iter()
        .map(|i| tree.spans[*i].clone())
        .collect();
    assert_eq!(
        children.len() + 1,
        tree.spans.len(),
        "every span of the job hangs under job_execution:\n{}",
        tree.render()
    );
    for child in &children {
        assert!(
            child.start_ns >= parent.start_ns && child.end_ns() <= parent.end_ns(),
            "{} lies inside job_execution:\n{}",
            child.name,
            tree.render()
        );
        assert_eq!(child.trace_id, parent.trace_id);
    }
    for pair in children.windows(2) {
        assert!(
            pair[0].end_ns() <= pair[1].start_ns,
            "{} ends before {} starts:\n{}",
            pair[0].name,
            pair[1].name,
            tree.render()
        );
    }
    (parent, children, tree)
}

fn names(children: &[StoredSpan]) -> Vec<&str> {
    children.iter().map(|s| s.name.as_str()).collect()
}

fn span<'a>(children: &'a [StoredSpan], name: &str) -> &'a StoredSpan {
    children
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no {name} in {:?}", names(children)))
}

/// What the snapshot holds of a span: name, status and attributes.
fn snapshot_of(span: &StoredSpan) -> Value {
    json!({
        "name": span.name,
        "status": span.status_code,
        "status_message": span.status_message,
        "attributes": span.attributes,
    })
}

/// `snapshot` with the ids that change from run to run replaced by
/// `[key]`, where present.
fn redacted(mut snapshot: Value) -> Value {
    let Some(object) = snapshot.as_object_mut() else {
        return snapshot;
    };
    for (name, spans) in object.iter_mut() {
        let spans: Vec<&mut Value> = match (name.as_str(), spans) {
            ("job_execution", span) => vec![span],
            ("stages", Value::Array(stages)) => stages.iter_mut().collect(),
            _ => continue,
        };
        for span in spans {
            let Some(attributes) = span["attributes"].as_object_mut() else {
                continue;
            };
            for key in REDACTED {
                if let Some(value) = attributes.get_mut(key) {
                    *value = Value::String(format!("[{key}]"));
                }
            }
        }
    }
    snapshot
}

const BUILD: &str = "
build:
  cache:
    key: deps
    paths: [vendor]
  script:
    - cat README
    - mkdir -p vendor out
    - echo lib > vendor/lib.txt
    - echo built > out/result.txt
  after_script:
    - echo after_script ran
  artifacts:
    name: result
    paths: [out/]
";

#[test]
fn stage_spans_form_the_expected_tree_with_their_metadata() {
    let (world, project) = world_with_repo("stages", &[("README", "from the repository\n")]);
    let (_, jobs) = world.run_pipeline(project, BUILD).unwrap();
    let job = job_named(&jobs, "build");
    assert_eq!(
        job["status"],
        "success",
        "{}",
        world.rails.job_trace(project, id(job)).unwrap()
    );
    let log = world.rails.job_trace(project, id(job)).unwrap();
    assert!(
        log.contains("from the repository") && log.contains("after_script ran"),
        "{log}"
    );

    let (root, children, _) = job_tree(runner_spans(&world, id(job), 8));
    // With the Rails spans, the job is one trace rooted at job_lifecycle.
    let clickhouse = world.stack.clickhouse();
    let whole = wait_for("the Rails spans", SPAN_DEADLINE, || {
        let tree = Tree::new(trace::spans_of_trace(&clickhouse, &root.trace_id)?);
        Ok(tree.find("job_lifecycle").is_some().then_some(tree))
    })
    .unwrap();
    eprintln!("{}", whole.render());
    assert_eq!(whole.roots.len(), 1, "\n{}", whole.render());
    assert_eq!(whole.spans[whole.roots[0]].name, "job_lifecycle");
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
    assert!(span(&children, "upload_artifacts")
        .attribute("ci.artifact.size_bytes")
        .is_some_and(|s| s.parse::<u64>().unwrap() > 0));
    let artifacts = world.rails.job(project, id(job)).unwrap();
    assert_eq!(
        artifacts["artifacts_file"]["filename"], "result.zip",
        "{artifacts:#}"
    );

    let snapshot = json!({
        "job_execution": snapshot_of(&root),
        "stages": children.iter().map(snapshot_of).collect::<Vec<_>>(),
    });
    let mut settings = insta::Settings::clone_current();
    settings.set_sort_maps(true);
    settings.bind(|| insta::assert_yaml_snapshot!(redacted(snapshot)));
}

const CACHED: &str = "
variables:
  GIT_STRATEGY: fetch
deps:
  cache:
    key: deps-$CI_COMMIT_REF_SLUG
    paths: [vendor]
  script:
    - test -f vendor/lib.txt && echo cache restored || echo cache empty
    - mkdir -p vendor && echo lib > vendor/lib.txt
";

#[test]
fn the_cache_misses_then_hits_across_two_pipelines() {
    let (world, project) = world_with_repo("cached", &[("README", "cached\n")]);
    let mut restores = Vec::new();
    for round in 0..2 {
        let (_, jobs) = world.run_pipeline(project, CACHED).unwrap();
        let job = job_named(&jobs, "deps");
        assert_eq!(job["status"], "success");
        let log = world.rails.job_trace(project, id(job)).unwrap();
        let expected = if round == 0 {
            "cache empty"
        } else {
            "cache restored"
        };
        assert!(log.contains(expected), "round {round}: {log}");
        let (_, children, _) = job_tree(runner_spans(&world, id(job), 6));
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
        let operation = span(&children, "get_sources")
            .attribute("ci.git.operation")
            .map(String::from);
        restores.push((span(&children, "restore_cache").clone(), operation));
    }
    let (miss, first_operation) = &restores[0];
    let (hit, second_operation) = &restores[1];
    assert_eq!(miss.attribute("ci.cache.key"), Some("deps-main-protected"));
    assert_eq!(miss.attribute("ci.cache.hit"), Some("false"));
    assert_eq!(hit.attribute("ci.cache.key"), Some("deps-main-protected"));
    assert_eq!(hit.attribute("ci.cache.hit"), Some("true"));
    assert!(hit
        .attribute("ci.cache.size_bytes")
        .is_some_and(|s| s.parse::<u64>().unwrap() > 0));
    // GIT_STRATEGY=fetch: the second job fetches into the first one's checkout.
    assert_eq!(first_operation.as_deref(), Some("clone"));
    assert_eq!(second_operation.as_deref(), Some("fetch"));
}

const FAILING: &str = "
fails:
  script:
    - mkdir -p out && echo partial > out/log.txt
    - exit 3
  after_script:
    - echo after_script ran with $CI_JOB_STATUS
  artifacts:
    when: always
    paths: [out/]
";

#[test]
fn a_failing_script_is_an_error_span_and_after_script_and_always_artifacts_still_run() {
    let (world, project) = world_with_repo("failing", &[("README", "x\n")]);
    let (_, jobs) = world.run_pipeline(project, FAILING).unwrap();
    let job = job_named(&jobs, "fails");
    assert_eq!(job["status"], "failed");
    assert_eq!(job["failure_reason"], "script_failure");
    let log = world.rails.job_trace(project, id(job)).unwrap();
    assert!(log.contains("after_script ran with failed"), "{log}");

    let (root, children, tree) = job_tree(runner_spans(&world, id(job), 6));
    assert_eq!(
        names(&children),
        [
            "prepare_executor",
            "get_sources",
            "step_script",
            "after_script",
            "upload_artifacts_on_failure"
        ],
        "\n{}",
        tree.render()
    );
    let script = span(&children, "step_script");
    assert_eq!(script.status_code, "Error");
    assert_eq!(script.status_message, "exit code 3");
    assert_eq!(script.attribute("ci.stage.status"), Some("failed"));
    assert_eq!(script.attribute("ci.script.exit_code"), Some("3"));
    assert_eq!(
        span(&children, "after_script").attribute("ci.stage.status"),
        Some("success")
    );
    let upload = span(&children, "upload_artifacts_on_failure");
    assert_eq!(upload.attribute("ci.stage.status"), Some("success"));
    assert_eq!(upload.attribute("ci.artifact.count"), Some("2"));
    assert_eq!(root.status_code, "Error");
    let stored = world.rails.job(project, id(job)).unwrap();
    assert_eq!(
        stored["artifacts_file"]["filename"], "artifacts.zip",
        "{stored:#}"
    );
}

const SLOW: &str = "
slow:
  script:
    - sleep 8
";

#[test]
fn stage_spans_stream_while_the_job_still_runs() {
    let (world, project) = world_with_repo("streaming", &[("README", "x\n")]);
    let pipeline = world.rails.create_pipeline(project, SLOW).unwrap();
    let job = id(job_named(
        &world.rails.pipeline_jobs(project, pipeline).unwrap(),
        "slow",
    ));
    let clickhouse = world.stack.clickhouse();
    let started = Instant::now();
    let sources = wait_for("the get_sources span", Duration::from_secs(30), || {
        let spans = trace::select(
            &clickhouse,
            &format!("SpanName = 'get_sources' AND ResourceAttributes['ci.job.id'] = '{job}'"),
        )?;
        Ok(spans.into_iter().next())
    })
    .unwrap();
    // Read after the span was found: the job had not finished before.
    let status = world.rails.job(project, job).unwrap()["status"].clone();
    assert_eq!(
        status,
        "running",
        "get_sources reached ClickHouse {:?} after the pipeline was created, while the job ran",
        started.elapsed()
    );
    let early = trace::select(
        &clickhouse,
        &format!("SpanName = 'job_execution' AND ResourceAttributes['ci.job.id'] = '{job}'"),
    )
    .unwrap();
    assert!(
        early.is_empty(),
        "job_execution ends with the job: {early:#?}"
    );
    assert_eq!(sources.status_code, "Ok");

    let jobs = world
        .rails
        .wait_for_pipeline(project, pipeline, PIPELINE_DEADLINE)
        .unwrap();
    assert_eq!(job_named(&jobs, "slow")["status"], "success");
    let (_, children, _) = job_tree(runner_spans(&world, job, 4));
    assert_eq!(span(&children, "get_sources").span_id, sources.span_id);
    let script = span(&children, "step_script");
    assert!(script.duration_ns >= 7_000_000_000, "{script:#?}");
}

const GREET: &str = "spec:
  inputs:
    who:
      type: string
    punctuation:
      default: '!'
---
exec:
  command: [bash, -c, 'echo \"greetings, ${{ inputs.who }}${{ inputs.punctuation }}\"']
";

const FUNCTIONS: &str = "
functions:
  run:
    - name: hello
      script: echo hello from a function, ${{ inputs.who }}
      inputs:
        who: world
    - name: greet
      step: ./functions/greet
      inputs:
        who: conformance
broken:
  run:
    - name: first
      script: echo the first function ran
    - name: fails
      script: exit 5
    - name: never
      script: echo the third function ran
";

#[test]
fn run_functions_give_one_span_per_invocation_and_a_failing_one_fails_the_job() {
    let (world, project) = world_with_repo("functions", &[("functions/greet/step.yml", GREET)]);
    let (_, jobs) = world.run_pipeline(project, FUNCTIONS).unwrap();

    let good = job_named(&jobs, "functions");
    let log = world.rails.job_trace(project, id(good)).unwrap();
    assert_eq!(good["status"], "success", "{log}");
    assert!(log.contains("hello from a function, world"), "{log}");
    assert!(log.contains("greetings, conformance!"), "{log}");
    let (_, children, tree) = job_tree(runner_spans(&world, id(good), 5));
    assert_eq!(
        names(&children),
        [
            "prepare_executor",
            "get_sources",
            "ci_function",
            "ci_function"
        ],
        "\n{}",
        tree.render()
    );
    let expect = [
        ("hello", "script", "local", None),
        ("greet", "step", "local", Some("./functions/greet")),
    ];
    for (span, (name, kind, version, reference)) in children[2..].iter().zip(expect) {
        assert_eq!(span.attribute("ci.function.name"), Some(name));
        assert_eq!(span.attribute("ci.function.kind"), Some(kind));
        assert_eq!(span.attribute("ci.function.version"), Some(version));
        assert_eq!(span.attribute("ci.function.ref"), reference);
        assert_eq!(span.attribute("ci.function.status"), Some("success"));
        assert_eq!(span.attribute("ci.script.exit_code"), Some("0"));
        assert_eq!(span.status_code, "Ok");
        let inputs = span.attribute("ci.function.inputs").unwrap_or_default();
        assert!(inputs.contains("who"), "input names: {inputs}");
        assert!(
            !inputs.contains("world") && !inputs.contains("conformance"),
            "never values: {inputs}"
        );
    }

    let broken = job_named(&jobs, "broken");
    assert_eq!(broken["status"], "failed");
    assert_eq!(broken["failure_reason"], "script_failure");
    let log = world.rails.job_trace(project, id(broken)).unwrap();
    assert!(
        log.contains("the first function ran") && !log.contains("the third function ran"),
        "{log}"
    );
    let (root, children, _) = job_tree(runner_spans(&world, id(broken), 5));
    let functions: Vec<&StoredSpan> = children
        .iter()
        .filter(|s| s.name == "ci_function")
        .collect();
    assert_eq!(
        functions.len(),
        2,
        "the function after the failing one does not run"
    );
    assert_eq!(
        functions[0].attribute("ci.function.status"),
        Some("success")
    );
    assert_eq!(functions[1].attribute("ci.function.name"), Some("fails"));
    assert_eq!(functions[1].attribute("ci.function.status"), Some("failed"));
    assert_eq!(functions[1].attribute("ci.script.exit_code"), Some("5"));
    assert_eq!(functions[1].status_code, "Error");
    assert_eq!(root.attribute("ci.job.status"), Some("failed"));
}
