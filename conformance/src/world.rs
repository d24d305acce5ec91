//! A whole system for one test: an isolated embedded stack, fake-rails
//! exporting its Rails spans into it, and the runner under test.

use std::time::Duration;

use anyhow::Result;

use crate::gitlab::{FakeRails, FakeRailsOptions};
use crate::process::{wait_for, Lifetime};
use crate::runner::{Runner, RunnerOptions};
use crate::stack::{Stack, StackOptions};
use crate::trace::{self, StoredSpan};

/// How long a span may take from a job's end to ClickHouse before a test
/// gives up (the design's target is minutes; ours is about a second).
pub const SPAN_DEADLINE: Duration = Duration::from_secs(30);
/// How long a small pipeline may take to finish.
pub const PIPELINE_DEADLINE: Duration = Duration::from_secs(90);

pub struct World {
    pub stack: Stack,
    pub rails: FakeRails,
    pub runner: Option<Runner>,
}

impl World {
    /// Stack and fake-rails; the runner is started by [`World::start_runner`].
    pub fn new(mut rails_options: FakeRailsOptions) -> Result<World> {
        let stack = Stack::start(StackOptions::isolated())?;
        if rails_options.otlp_endpoint.is_none() {
            rails_options.otlp_endpoint = Some(stack.endpoints().otlp_http.clone());
        }
        if rails_options.otel_endpoints.is_empty() {
            // What contract v2 payloads tell runners to export to.
            rails_options
                .otel_endpoints
                .push(format!("{}/v1/traces", stack.endpoints().otlp_http));
        }
        // The telemetry API and pages read this stack's ClickHouse.
        rails_options
            .extra_args
            .extend(crate::gitlab::clickhouse_args(
                stack.endpoints(),
                &stack.password_file(),
            ));
        let rails = FakeRails::start(stack.dir(), &rails_options, Lifetime::Owned)?;
        Ok(World {
            stack,
            rails,
            runner: None,
        })
    }

    /// Creates a project backed by a real local git repository (so the
    /// runner's clone works); returns `(id, full path)`.
    pub fn create_project(&self, name: &str) -> Result<(u64, String)> {
        self.create_project_with_files(name, &[])
    }

    /// A project on a real repository with the `ci_job_telemetry` flag set
    /// for it; returns its id.
    pub fn create_project_with_flag(&self, name: &str, telemetry: bool) -> Result<u64> {
        let (project, path) = self.create_project(name)?;
        self.rails.set_telemetry_flag(telemetry, Some(&path))?;
        Ok(project)
    }

    /// [`World::create_project`] with `files` committed to the repository.
    pub fn create_project_with_files(
        &self,
        name: &str,
        files: &[(&str, &str)],
    ) -> Result<(u64, String)> {
        let repo =
            crate::gitlab::init_repository(&self.stack.dir().join("repos").join(name), files)?;
        self.rails.create_project(name, Some(&repo))
    }

    /// Creates a pipeline from `ci_config` and waits until its jobs are
    /// done; returns the pipeline id and its jobs.
    pub fn run_pipeline(
        &self,
        project: u64,
        ci_config: &str,
    ) -> Result<(u64, Vec<serde_json::Value>)> {
        let pipeline = self.rails.create_pipeline(project, ci_config)?;
        let jobs = self
            .rails
            .wait_for_pipeline(project, pipeline, PIPELINE_DEADLINE)?;
        Ok((pipeline, jobs))
    }

    /// Runner options that send telemetry to this world's collector over
    /// OTLP/HTTP, as a runner manager's static configuration would.
    pub fn to_collector(&self) -> RunnerOptions {
        RunnerOptions {
            otlp_endpoint: Some(self.stack.endpoints().otlp_http.clone()),
            otlp_protocol: Some("http/protobuf".into()),
            ..RunnerOptions::default()
        }
    }

    /// Registers a runner and starts the runner under test.
    pub fn start_runner(&mut self, options: RunnerOptions) -> Result<()> {
        let url = self.rails.url.clone();
        self.start_runner_via(&url, options)
    }

    /// Like [`World::start_runner`], with the runner talking to `url` (a
    /// [`crate::proxy::Proxy`] in front of fake-rails).
    pub fn start_runner_via(&mut self, url: &str, options: RunnerOptions) -> Result<()> {
        let token = self.rails.register_runner("conformance")?;
        self.runner = Some(Runner::start(
            self.stack.dir(),
            url,
            &token,
            &options,
            Lifetime::Owned,
        )?);
        Ok(())
    }

    /// Waits for the runner's `job_execution` span of `job`.
    pub fn job_execution(&self, job: u64) -> Result<StoredSpan> {
        let clickhouse = self.stack.clickhouse();
        wait_for(
            &format!("the job_execution span of job {job}"),
            SPAN_DEADLINE,
            || {
                let spans = trace::select(
                    &clickhouse,
                    &format!(
                        "SpanName = 'job_execution' AND SpanAttributes['ci.job.id'] = '{job}'"
                    ),
                )?;
                Ok(spans.into_iter().next())
            },
        )
    }

    /// Every span whose `ci.job.id` is `job`, runner's and Rails' alike.
    pub fn spans_of_job(&self, job: u64) -> Result<Vec<StoredSpan>> {
        trace::select(
            &self.stack.clickhouse(),
            &format!("SpanAttributes['ci.job.id'] = '{job}' OR ResourceAttributes['ci.job.id'] = '{job}'"),
        )
    }

    /// The runner's spans (service `gitlab-ci-runner`) of `job`.
    pub fn runner_spans_of_job(&self, job: u64) -> Result<Vec<StoredSpan>> {
        trace::select(
            &self.stack.clickhouse(),
            &format!(
                "ServiceName = 'gitlab-ci-runner' AND (SpanAttributes['ci.job.id'] = '{job}' \
                 OR ResourceAttributes['ci.job.id'] = '{job}')"
            ),
        )
    }

    /// The runner process's ID, once started.
    pub fn runner_pid(&self) -> Option<u32> {
        self.runner.as_ref().map(Runner::pid)
    }

    /// The runner's resident memory (`VmRSS` of `/proc/<pid>/status`), in
    /// bytes.
    pub fn runner_rss(&self) -> Option<u64> {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.runner_pid()?)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    pub fn runner_log(&self) -> String {
        self.runner.as_ref().map(Runner::log).unwrap_or_default()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(runner) = &self.runner {
                eprintln!(
                    "--- runner log ---\n{}",
                    crate::process::log_tail(runner.log_path(), 60)
                );
            }
            eprintln!(
                "--- fake-rails log ---\n{}",
                crate::process::log_tail(self.rails.log_path(), 30)
            );
        }
        // The runner stops before the services it talks to.
        self.runner = None;
    }
}
