//! Pipelines from `.gitlab-ci.yml`: errors, stage ordering, `when`,
//! `allow_failure`, `needs`, manual jobs, CI Functions, local repositories.

use crate::common;

use common::{Gitlab, TestRunner};
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn setup() -> (Gitlab, u64, TestRunner) {
    let gitlab = Gitlab::start_default().await;
    let project = gitlab.create_project("demo").await["id"].as_u64().unwrap();
    let runner = gitlab.register_runner().await;
    (gitlab, project, runner)
}

/// Drains the queue: every job handed out is finished with the state its
/// name asks for (`fail*` fails), in order. Returns the names in pickup order.
async fn run_all(gitlab: &Gitlab, runner: &TestRunner) -> Vec<String> {
    let mut order = Vec::new();
    while let Some(job) = gitlab.request_job(runner).await {
        let name = job.payload["job_info"]["name"]
            .as_str()
            .unwrap()
            .to_string();
        let state = if name.starts_with("fail") {
            "failed"
        } else {
            "success"
        };
        gitlab.finish_job(&job, state).await;
        order.push(name);
    }
    order
}

async fn config_error(gitlab: &Gitlab, project: u64, yaml: &str) -> String {
    let response = gitlab.try_create_pipeline(project, yaml).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{yaml}");
    response.json::<Value>().await.unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn config_errors_name_the_key_or_line() {
    let (gitlab, project, _) = setup().await;
    let cases: &[(&str, &[&str])] = &[
        (
            "build:\n  script: make\n  scriptt: typo\n",
            &["jobs:build config contains unknown keys: scriptt", "line 3"],
        ),
        ("build:\n  script: [make\n", &["Invalid YAML", "line"]),
        (
            "stages: [build]\nbuild:\n  script: make\n  stage: deploy\n",
            &["chosen stage deploy does not exist", "line 4"],
        ),
        (
            "build:\n  stage: build\n",
            &["jobs:build config should implement the script: or run: keyword"],
        ),
        (
            "build:\n  script: make\n  rules:\n    - when: always\n",
            &["`rules`", "line 3"],
        ),
        (
            "include: other.yml\nbuild:\n  script: make\n",
            &["`include`", "line 1"],
        ),
        (
            "build:\n  script: make\n  timeout: soon\n",
            &["jobs:build:timeout", "soon"],
        ),
        (
            "build:\n  script: make\n  when: sometimes\n",
            &["jobs:build:when"],
        ),
        (
            "test:\n  script: t\n  needs: [build]\n",
            &["'test' job needs 'build' job"],
        ),
        (".hidden:\n  script: make\n", &["at least one visible job"]),
        (
            "a:\n  extends: b\n  script: x\nb:\n  extends: a\n  script: y\n",
            &["circular dependency detected in `extends`"],
        ),
        (
            "build:\n  script: make\n  cache: {key: x, paths: [a], policy: sometimes}\n",
            &["jobs:build:cache:policy"],
        ),
        (
            "build:\n  script: make\n  variables: {A: [1, 2]}\n",
            &["jobs:build:variables", "`A`"],
        ),
        (
            "build:\n  script: make\n  run:\n    - name: s\n      script: echo\n",
            &["`script` and `run` cannot be used together"],
        ),
        (
            "build:\n  run:\n    - name: s\n",
            &["exactly one of `step`, `script` or `func`"],
        ),
        (
            "- just\n- a list\n",
            &["the root of the config should be a hash"],
        ),
        (
            "build:\n  script: !reference [.x, script]\n",
            &["!reference"],
        ),
    ];
    for (yaml, wanted) in cases {
        let message = config_error(&gitlab, project, yaml).await;
        for fragment in *wanted {
            assert!(
                message.contains(fragment),
                "error for {yaml:?} should contain {fragment:?}, was {message:?}"
            );
        }
    }
    assert!(gitlab
        .get_json(&format!("/projects/{project}/pipelines"))
        .await
        .as_array()
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn stages_run_in_order_and_jobs_of_a_stage_together() {
    let (gitlab, project, runner) = setup().await;
    let yaml = "stages: [build, test, deploy]\n\
        deploy:\n  stage: deploy\n  script: d\n\
        test1:\n  stage: test\n  script: t\n\
        build:\n  stage: build\n  script: b\n\
        test2:\n  stage: test\n  script: t\n\
        lint:\n  stage: .pre\n  script: l\n";
    let pipeline = gitlab.create_pipeline(project, yaml).await;
    let pid = pipeline["id"].as_u64().unwrap();
    assert_eq!(pipeline["status"], "pending");

    // Only `.pre` is queued at first.
    let lint = gitlab.request_job(&runner).await.unwrap();
    assert_eq!(lint.payload["job_info"]["name"], "lint");
    assert!(gitlab.request_job(&runner).await.is_none());
    assert_eq!(gitlab.pipeline(project, pid).await["status"], "running");
    gitlab.finish_job(&lint, "success").await;

    let build = gitlab.request_job(&runner).await.unwrap();
    assert_eq!(build.payload["job_info"]["name"], "build");
    assert!(gitlab.request_job(&runner).await.is_none());
    gitlab.finish_job(&build, "success").await;

    // Both test jobs are pending together, deploy is not.
    let t1 = gitlab.request_job(&runner).await.unwrap();
    let t2 = gitlab.request_job(&runner).await.unwrap();
    assert!(gitlab.request_job(&runner).await.is_none());
    let mut names = vec![
        t1.payload["job_info"]["name"].clone(),
        t2.payload["job_info"]["name"].clone(),
    ];
    names.sort_by_key(|n| n.to_string());
    assert_eq!(names, vec![json!("test1"), json!("test2")]);
    gitlab.finish_job(&t1, "success").await;
    assert!(
        gitlab.request_job(&runner).await.is_none(),
        "deploy waits for the whole test stage"
    );
    gitlab.finish_job(&t2, "success").await;

    assert_eq!(run_all(&gitlab, &runner).await, vec!["deploy"]);
    let pipeline = gitlab.pipeline(project, pid).await;
    assert_eq!(pipeline["status"], "success");
    assert!(pipeline["finished_at"].is_string());
}

#[tokio::test]
async fn when_and_allow_failure_decide_what_runs_and_the_pipeline_status() {
    let (gitlab, project, runner) = setup().await;
    let yaml = "stages: [build, test, after]\n\
        fail_allowed:\n  stage: build\n  script: x\n  allow_failure: true\n\
        build:\n  stage: build\n  script: b\n\
        test:\n  stage: test\n  script: t\n\
        on_failure_job:\n  stage: after\n  script: x\n  when: on_failure\n\
        always_job:\n  stage: after\n  script: x\n  when: always\n\
        never_job:\n  stage: after\n  script: x\n  when: never\n";
    let pid = gitlab.create_pipeline(project, yaml).await["id"]
        .as_u64()
        .unwrap();
    let mut order = run_all(&gitlab, &runner).await;
    order[..2].sort();
    assert_eq!(order, vec!["build", "fail_allowed", "test", "always_job"]);
    let statuses = gitlab.job_statuses(project, pid).await;
    assert_eq!(statuses["fail_allowed"], "failed");
    assert_eq!(statuses["on_failure_job"], "skipped");
    assert!(
        !statuses.contains_key("never_job"),
        "when: never jobs are not created"
    );
    let pipeline = gitlab.pipeline(project, pid).await;
    assert_eq!(
        pipeline["status"], "success",
        "an allowed failure does not fail the pipeline"
    );
    let allowed = gitlab.pipeline_job(project, pid, "fail_allowed").await;
    assert_eq!(allowed["allow_failure"], true);
}

#[tokio::test]
async fn a_failure_skips_later_stages_and_runs_on_failure_jobs() {
    let (gitlab, project, runner) = setup().await;
    let yaml = "stages: [build, test, after]\n\
        fail_build:\n  stage: build\n  script: b\n\
        test:\n  stage: test\n  script: t\n\
        cleanup:\n  stage: after\n  script: c\n  when: on_failure\n\
        report:\n  stage: after\n  script: r\n  when: always\n\
        exit_3_ok:\n  stage: build\n  script: x\n  allow_failure: {exit_codes: [3]}\n";
    let pid = gitlab.create_pipeline(project, yaml).await["id"]
        .as_u64()
        .unwrap();
    // `exit_3_ok` fails with exit code 3, which its allow_failure tolerates.
    let mut seen = Vec::new();
    while let Some(job) = gitlab.request_job(&runner).await {
        let name = job.payload["job_info"]["name"]
            .as_str()
            .unwrap()
            .to_string();
        let body = match name.as_str() {
            "exit_3_ok" => {
                json!({"state": "failed", "failure_reason": "script_failure", "exit_code": 3})
            }
            "fail_build" => {
                json!({"state": "failed", "failure_reason": "script_failure", "exit_code": 1})
            }
            _ => json!({"state": "success"}),
        };
        assert_eq!(gitlab.update_job(&job, body).await.status(), StatusCode::OK);
        seen.push(name);
    }
    seen[..2].sort();
    seen[2..].sort();
    assert_eq!(seen, vec!["exit_3_ok", "fail_build", "cleanup", "report"]);
    let statuses = gitlab.job_statuses(project, pid).await;
    assert_eq!(statuses["test"], "skipped");
    let pipeline = gitlab.pipeline(project, pid).await;
    assert_eq!(pipeline["status"], "failed");
    let jobs = gitlab
        .get_json(&format!(
            "/projects/{project}/pipelines/{pid}/jobs?scope=failed"
        ))
        .await;
    let names: Vec<_> = jobs
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["name"].clone())
        .collect();
    assert_eq!(
        names.len(),
        2,
        "scope=failed lists the two failed jobs: {names:?}"
    );
}

#[tokio::test]
async fn needs_start_jobs_before_their_stage() {
    let (gitlab, project, runner) = setup().await;
    let yaml = "stages: [build, test, deploy]\n\
        build_a:\n  stage: build\n  script: a\n\
        build_b:\n  stage: build\n  script: b\n\
        test_a:\n  stage: test\n  script: t\n  needs: [build_a]\n\
        deploy:\n  stage: deploy\n  script: d\n  needs: []\n";
    gitlab.create_pipeline(project, yaml).await;
    let mut first = Vec::new();
    let mut jobs = Vec::new();
    while let Some(job) = gitlab.request_job(&runner).await {
        first.push(
            job.payload["job_info"]["name"]
                .as_str()
                .unwrap()
                .to_string(),
        );
        jobs.push(job);
    }
    first.sort();
    assert_eq!(
        first,
        vec!["build_a", "build_b", "deploy"],
        "needs: [] starts at once"
    );
    let build_a = jobs
        .iter()
        .find(|j| j.payload["job_info"]["name"] == "build_a")
        .unwrap();
    gitlab.finish_job(build_a, "success").await;
    let test_a = gitlab
        .request_job(&runner)
        .await
        .expect("test_a only needs build_a");
    assert_eq!(test_a.payload["job_info"]["name"], "test_a");
    assert_eq!(test_a.payload["dependencies"].as_array().unwrap().len(), 1);
    assert_eq!(test_a.payload["dependencies"][0]["name"], "build_a");
}

#[tokio::test]
async fn manual_jobs_wait_to_be_played() {
    let (gitlab, project, runner) = setup().await;
    let yaml = "stages: [build, deploy]\n\
        build:\n  stage: build\n  script: b\n\
        deploy:\n  stage: deploy\n  script: d\n  when: manual\n";
    let pid = gitlab.create_pipeline(project, yaml).await["id"]
        .as_u64()
        .unwrap();
    assert_eq!(run_all(&gitlab, &runner).await, vec!["build"]);
    let statuses = gitlab.job_statuses(project, pid).await;
    assert_eq!(statuses["deploy"], "manual");
    assert_eq!(
        gitlab.pipeline(project, pid).await["status"],
        "success",
        "an optional manual job does not block"
    );

    let deploy_id = gitlab.pipeline_job(project, pid, "deploy").await["id"]
        .as_u64()
        .unwrap();
    let play = gitlab.play_job(project, deploy_id).await;
    assert_eq!(play.status(), StatusCode::OK);
    let deploy = gitlab
        .request_job(&runner)
        .await
        .expect("played job is queued");
    assert_eq!(deploy.id, deploy_id);
    assert_eq!(
        common::variable(&deploy.payload, "CI_JOB_MANUAL").unwrap()["value"],
        "true"
    );
    let replay = gitlab.play_job(project, deploy_id).await;
    assert_eq!(replay.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn canceling_a_running_job_stops_its_runner() {
    let (gitlab, project, runner) = setup().await;
    let pid = gitlab
        .create_pipeline(project, "a:\n  script: x\nb:\n  script: y\n")
        .await["id"]
        .as_u64()
        .unwrap();
    let job = gitlab.request_job(&runner).await.unwrap();
    let cancel = gitlab
        .admin(
            reqwest::Method::POST,
            &format!("/projects/{project}/jobs/{}/cancel", job.id),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), StatusCode::CREATED);
    let patch = gitlab.patch_trace(&job, Some("0-1"), "x").await;
    assert_eq!(patch.status(), StatusCode::FORBIDDEN);
    assert_eq!(patch.headers()["job-status"], "canceled");
    let cancel_pipeline = gitlab
        .admin(
            reqwest::Method::POST,
            &format!("/projects/{project}/pipelines/{pid}/cancel"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(cancel_pipeline.status(), StatusCode::OK);
    assert_eq!(
        cancel_pipeline.json::<Value>().await.unwrap()["status"],
        "canceled"
    );
    assert!(gitlab.request_job(&runner).await.is_none());
}

#[tokio::test]
async fn extends_default_and_anchors_are_resolved() {
    let (gitlab, project, runner) = setup().await;
    let yaml = r#"
default:
  before_script: [echo default]
  timeout: 10m
.base: &base
  image: alpine:3
  variables: {FROM_BASE: "1", OVERRIDE: base}
  script: [echo base]
job:
  extends: .base
  variables: {OVERRIDE: job}
  after_script: [echo after]
anchored:
  <<: *base
  before_script: []
  script: [echo anchored]
  timeout: 2 hours
"#;
    gitlab.create_pipeline(project, yaml).await;
    let mut payloads = std::collections::BTreeMap::new();
    while let Some(job) = gitlab.request_job(&runner).await {
        payloads.insert(
            job.payload["job_info"]["name"]
                .as_str()
                .unwrap()
                .to_string(),
            job.payload.clone(),
        );
        gitlab.finish_job(&job, "success").await;
    }
    let job = &payloads["job"];
    assert_eq!(job["image"]["name"], "alpine:3");
    assert_eq!(common::variable(job, "FROM_BASE").unwrap()["value"], "1");
    assert_eq!(
        common::variable(job, "OVERRIDE").unwrap()["value"],
        "job",
        "extends deep-merges hashes"
    );
    assert_eq!(
        job["steps"][0]["script"],
        json!(["echo default", "echo base"])
    );
    assert_eq!(job["runner_info"]["timeout"], 600);
    let anchored = &payloads["anchored"];
    assert_eq!(anchored["steps"][0]["script"], json!(["echo anchored"]));
    assert_eq!(anchored["runner_info"]["timeout"], 7200);
    assert_eq!(anchored["image"]["name"], "alpine:3");
}

#[tokio::test]
async fn ci_functions_go_out_as_run() {
    let (gitlab, project, runner) = setup().await;
    let yaml = r#"
steps_job:
  run:
    - name: hello
      step: gitlab.com/gitlab-org/ci-cd/runner-tools/echo-step@v1
      inputs: {echo: hello}
    - name: bye
      script: echo bye
      env: {WHO: world}
"#;
    gitlab.create_pipeline(project, yaml).await;
    let job = gitlab.request_job(&runner).await.unwrap();
    assert_eq!(
        job.payload["steps"],
        json!([{"name": "run", "script": [], "timeout": 3600, "when": "on_success", "allow_failure": false}])
    );
    let run: Value =
        serde_json::from_str(job.payload["run"].as_str().expect("run is a JSON string")).unwrap();
    assert_eq!(run[0]["name"], "hello");
    assert_eq!(run[0]["inputs"]["echo"], "hello");
    assert_eq!(run[1]["env"]["WHO"], "world");
}

fn git(dir: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .args([
            "-c",
            "user.name=Test",
            "-c",
            "user.email=test@example.com",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test]
async fn a_project_with_a_local_repository() {
    let repo = tempfile::tempdir().unwrap();
    git(repo.path(), &["init", "--quiet"]);
    std::fs::write(
        repo.path().join(".gitlab-ci.yml"),
        "build:\n  script: cat README\n  cache:\n    key: {files: [Gemfile.lock], prefix: gems}\n    paths: [vendor]\n",
    )
    .unwrap();
    std::fs::write(repo.path().join("Gemfile.lock"), "gems\n").unwrap();
    git(repo.path(), &["add", "."]);
    git(
        repo.path(),
        &["commit", "--quiet", "-m", "First commit\n\nWith a body"],
    );
    git(repo.path(), &["tag", "v1.0"]);
    let sha = git(repo.path(), &["rev-parse", "HEAD"]);

    let gitlab = Gitlab::start_default().await;
    let created = gitlab
        .admin(reqwest::Method::POST, "/projects")
        .json(&json!({"name": "Local Repo", "repository_path": repo.path()}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let project: Value = created.json().await.unwrap();
    assert_eq!(project["path_with_namespace"], "root/local-repo");
    assert_eq!(project["default_branch"], "main");
    let id = project["id"].as_u64().unwrap();

    // No ci_config: the repository's .gitlab-ci.yml at the ref is used.
    let by_path = gitlab
        .admin(
            reqwest::Method::POST,
            "/projects/root%2Flocal-repo/pipeline",
        )
        .json(&json!({"ref": "v1.0"}))
        .send()
        .await
        .unwrap();
    assert_eq!(by_path.status(), StatusCode::CREATED);
    let pipeline: Value = by_path.json().await.unwrap();
    assert_eq!(pipeline["sha"], sha.as_str());
    assert_eq!(pipeline["tag"], true);

    let runner = gitlab.register_runner().await;
    let job = gitlab.request_job(&runner).await.unwrap();
    let git_info = &job.payload["git_info"];
    let canonical = std::fs::canonicalize(repo.path()).unwrap();
    assert_eq!(
        git_info["repo_url"],
        format!("file://{}", canonical.display())
    );
    assert_eq!(git_info["ref_type"], "tag");
    assert_eq!(
        git_info["refspecs"],
        json!(["+refs/tags/v1.0:refs/tags/v1.0"])
    );
    assert_eq!(
        common::variable(&job.payload, "CI_COMMIT_TAG").unwrap()["value"],
        "v1.0"
    );
    assert_eq!(
        common::variable(&job.payload, "CI_COMMIT_TITLE").unwrap()["value"],
        "First commit"
    );
    assert_eq!(
        common::variable(&job.payload, "CI_COMMIT_DESCRIPTION").unwrap()["value"],
        "With a body"
    );
    let key = job.payload["cache"][0]["key"].as_str().unwrap();
    assert!(
        key.starts_with("gems-") && key.ends_with("-non_protected") && !key.contains("default"),
        "{key}"
    );

    // The repo_url really clones.
    let clone = tempfile::tempdir().unwrap();
    git(
        clone.path(),
        &[
            "clone",
            "--quiet",
            "--depth",
            "1",
            git_info["repo_url"].as_str().unwrap(),
            "c",
        ],
    );
    assert_eq!(git(&clone.path().join("c"), &["rev-parse", "HEAD"]), sha);

    let missing_ref = gitlab
        .admin(reqwest::Method::POST, &format!("/projects/{id}/pipeline"))
        .json(&json!({"ref": "no-such-branch"}))
        .send()
        .await
        .unwrap();
    assert_eq!(missing_ref.status(), StatusCode::BAD_REQUEST);
    let not_a_repo = gitlab
        .admin(reqwest::Method::POST, "/projects")
        .json(&json!({"name": "nope", "repository_path": clone.path()}))
        .send()
        .await
        .unwrap();
    assert_eq!(not_a_repo.status(), StatusCode::BAD_REQUEST);
}
