//! The job API side of the harness: starts `fake-rails` as a process and
//! drives it through GitLab's own API shapes (projects, pipelines, the
//! feature flag, runner registration), as a test or the demo needs.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::paths;
use crate::process::{wait_for, Lifetime, ManagedProcess};

/// Payload contract fake-rails speaks (`docs/contract.md` §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contract {
    /// `features.job_telemetry` + `trace_context` (v1, the first design).
    V1,
    /// `features.tracing{trace_id, span_parent_id, otel_endpoints}` (GitLab today).
    V2,
}

/// How to start fake-rails.
#[derive(Debug, Clone)]
pub struct FakeRailsOptions {
    pub contract: Contract,
    /// Where fake-rails exports its own (Rails) spans, OTLP/HTTP base URL.
    pub otlp_endpoint: Option<String>,
    /// The endpoints put in v2 payloads.
    pub otel_endpoints: Vec<String>,
    pub extra_args: Vec<String>,
}

impl Default for FakeRailsOptions {
    fn default() -> Self {
        FakeRailsOptions {
            contract: Contract::V1,
            otlp_endpoint: None,
            otel_endpoints: Vec::new(),
            extra_args: Vec::new(),
        }
    }
}

pub const REGISTRATION_TOKEN: &str = "conformance-registration-token";
pub const ADMIN_TOKEN: &str = "conformance-admin-token";

/// A running fake-rails and a client for its API.
#[derive(Debug)]
pub struct FakeRails {
    pub url: String,
    process: ManagedProcess,
    agent: ureq::Agent,
}

impl FakeRails {
    pub fn start(dir: &Path, options: &FakeRailsOptions, lifetime: Lifetime) -> Result<FakeRails> {
        let mut cmd = Command::new(paths::workspace_binary("fake-rails")?);
        cmd.args(["--listen", "127.0.0.1:0"])
            .args(["--registration-token", REGISTRATION_TOKEN])
            .args(["--admin-token", ADMIN_TOKEN])
            .args([
                "--contract",
                match options.contract {
                    Contract::V1 => "v1",
                    Contract::V2 => "v2",
                },
            ]);
        if let Some(endpoint) = &options.otlp_endpoint {
            cmd.args(["--otlp-endpoint", endpoint]);
        }
        if !options.otel_endpoints.is_empty() {
            cmd.args(["--otel-endpoint", &options.otel_endpoints.join(",")]);
        }
        cmd.args(&options.extra_args);
        let mut process = ManagedProcess::spawn(
            "fake-rails",
            cmd,
            &dir.join("logs").join("fake-rails.log"),
            lifetime,
        )?;
        let url = process.wait_for_line("fake-rails listening on ", Duration::from_secs(30))?;
        Ok(FakeRails {
            url,
            process,
            agent: agent(),
        })
    }

    pub fn log_path(&self) -> &Path {
        &self.process.log
    }

    /// Lets the process outlive this handle; returns its PID.
    pub fn release(self) -> u32 {
        self.process.release()
    }

    /// An admin API call (PRIVATE-TOKEN); fails unless the answer is 2xx.
    pub fn api(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let (status, value) = self.call(method, path, body)?;
        if !(200..300).contains(&status) {
            bail!("{method} {path} answered {status}: {value}");
        }
        Ok(value)
    }

    /// Any call; returns the status and the JSON body (Null when empty).
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<(u16, Value)> {
        let url = format!("{}{path}", self.url);
        let request = http::Request::builder()
            .method(method)
            .uri(&url)
            .header("PRIVATE-TOKEN", ADMIN_TOKEN)
            .header("Content-Type", "application/json");
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut response = self
            .agent
            .run(request.body(body)?)
            .with_context(|| format!("{method} {url}"))?;
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string()?;
        let value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok((status, value))
    }

    /// Registers a runner; returns its authentication token.
    pub fn register_runner(&self, description: &str) -> Result<String> {
        let answer = self.api(
            "POST",
            "/api/v4/runners",
            Some(json!({"token": REGISTRATION_TOKEN, "description": description})),
        )?;
        answer["token"]
            .as_str()
            .map(str::to_string)
            .context("registration answer without a token")
    }

    /// Turns the `ci_job_telemetry` flag on or off, for one project (by full
    /// path) or globally.
    pub fn set_telemetry_flag(&self, enabled: bool, project: Option<&str>) -> Result<()> {
        let mut body = json!({"value": enabled});
        if let Some(project) = project {
            body["project"] = json!(project);
        }
        self.api("POST", "/api/v4/features/ci_job_telemetry", Some(body))?;
        Ok(())
    }

    /// Creates a project; returns `(id, full path)`.
    pub fn create_project(&self, name: &str, repository: Option<&Path>) -> Result<(u64, String)> {
        let mut body = json!({"name": name, "path": name});
        if let Some(repo) = repository {
            body["repository_path"] = json!(repo);
        }
        let project = self.api("POST", "/api/v4/projects", Some(body))?;
        let id = project["id"].as_u64().context("project without id")?;
        let path = project["path_with_namespace"]
            .as_str()
            .or_else(|| project["path"].as_str())
            .unwrap_or(name)
            .to_string();
        Ok((id, path))
    }

    /// Creates a pipeline from a `.gitlab-ci.yml`; returns its id.
    pub fn create_pipeline(&self, project: u64, ci_config: &str) -> Result<u64> {
        let pipeline = self.api(
            "POST",
            &format!("/api/v4/projects/{project}/pipeline"),
            Some(json!({"ref": "main", "ci_config": ci_config})),
        )?;
        pipeline["id"].as_u64().context("pipeline without id")
    }

    /// Creates a pipeline from the project repository's own `.gitlab-ci.yml`
    /// at `ref`; returns its id.
    pub fn create_pipeline_from_repository(&self, project: u64, git_ref: &str) -> Result<u64> {
        let pipeline = self.api(
            "POST",
            &format!("/api/v4/projects/{project}/pipeline"),
            Some(json!({"ref": git_ref})),
        )?;
        pipeline["id"].as_u64().context("pipeline without id")
    }

    pub fn pipeline_jobs(&self, project: u64, pipeline: u64) -> Result<Vec<Value>> {
        let jobs = self.api(
            "GET",
            &format!("/api/v4/projects/{project}/pipelines/{pipeline}/jobs"),
            None,
        )?;
        Ok(jobs.as_array().cloned().unwrap_or_default())
    }

    /// Waits until every job of the pipeline has a final status.
    pub fn wait_for_pipeline(
        &self,
        project: u64,
        pipeline: u64,
        timeout: Duration,
    ) -> Result<Vec<Value>> {
        wait_for(&format!("pipeline {pipeline} to finish"), timeout, || {
            let jobs = self.pipeline_jobs(project, pipeline)?;
            let done = !jobs.is_empty()
                && jobs.iter().all(|j| {
                    matches!(
                        j["status"].as_str(),
                        Some("success" | "failed" | "canceled" | "skipped" | "manual")
                    )
                });
            Ok(done.then_some(jobs))
        })
    }

    /// One job, Jobs API shape (`status`, `artifacts`, `artifacts_file`, ...).
    pub fn job(&self, project: u64, job: u64) -> Result<Value> {
        self.api(
            "GET",
            &format!("/api/v4/projects/{project}/jobs/{job}"),
            None,
        )
    }

    pub fn job_trace(&self, project: u64, job: u64) -> Result<String> {
        let (_, body) = self.call(
            "GET",
            &format!("/api/v4/projects/{project}/jobs/{job}/trace"),
            None,
        )?;
        Ok(match body {
            Value::String(s) => s,
            other => other.to_string(),
        })
    }
}

/// fake-rails flags that let its telemetry API and pages read the stack's
/// ClickHouse (`password_file` holds the password, e.g. the stack's
/// `credentials`).
pub fn clickhouse_args(endpoints: &crate::stack::Endpoints, password_file: &Path) -> Vec<String> {
    vec![
        "--clickhouse-url".into(),
        endpoints.clickhouse_url.clone(),
        "--clickhouse-user".into(),
        endpoints.clickhouse_user.clone(),
        "--clickhouse-password-file".into(),
        password_file.display().to_string(),
    ]
}

/// The job called `name` in a pipeline's job list.
pub fn job_named<'a>(jobs: &'a [Value], name: &str) -> &'a Value {
    jobs.iter()
        .find(|j| j["name"] == name)
        .unwrap_or_else(|| panic!("no job `{name}` in {jobs:#?}"))
}

/// A job's (or any API object's) id.
pub fn job_id(job: &Value) -> u64 {
    job["id"].as_u64().expect("an id")
}

/// Creates a real git repository at `dir` (branch `main`, one commit with a
/// README and the given files) for a project to point at, so jobs really
/// clone it. Returns `dir`.
pub fn init_repository(dir: &Path, files: &[(&str, &str)]) -> Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("README.md"),
        "A repository made by the conformance harness.\n",
    )?;
    for (name, content) in files {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, content)?;
    }
    let git = |args: &[&str]| -> Result<()> {
        let out = Command::new("git")
            .current_dir(dir)
            .args(args)
            .env("GIT_AUTHOR_NAME", "Conformance")
            .env("GIT_AUTHOR_EMAIL", "conformance@example.com")
            .env("GIT_COMMITTER_NAME", "Conformance")
            .env("GIT_COMMITTER_EMAIL", "conformance@example.com")
            .output()
            .context("running git (is it installed?)")?;
        if !out.status.success() {
            bail!(
                "git {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    };
    git(&["init", "-q", "-b", "main"])?;
    git(&["add", "-A"])?;
    git(&["commit", "-q", "-m", "Initial commit"])?;
    Ok(dir.to_path_buf())
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}
