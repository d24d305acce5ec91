//! The in-memory store: runners, projects, pipelines, jobs, flags.
//!
//! Everything lives in one [`Store`] behind one `std::sync::Mutex`. Handlers
//! lock it, do their bookkeeping without I/O or `.await`, copy out what they
//! need and unlock. Git commands, export and serialisation happen outside.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use time::OffsetDateTime;

use crate::ci_config::{CiConfig, JobSpec, When};
use crate::flags::Feature;

/// GitLab's job (build) statuses that fake-rails uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobStatus {
    Created,
    Pending,
    Running,
    Success,
    Failed,
    Canceled,
    Skipped,
    Manual,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Created => "created",
            JobStatus::Pending => "pending",
            JobStatus::Running => "running",
            JobStatus::Success => "success",
            JobStatus::Failed => "failed",
            JobStatus::Canceled => "canceled",
            JobStatus::Skipped => "skipped",
            JobStatus::Manual => "manual",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Runner {
    pub id: u64,
    pub description: String,
    pub tags: Vec<String>,
    pub run_untagged: bool,
    pub paused: bool,
    pub locked: bool,
    pub access_level: String,
    pub maximum_timeout: Option<u64>,
    pub created_at: OffsetDateTime,
    pub contacted_at: Option<OffsetDateTime>,
    /// The `info` object of the last request (name, version, executor, ...).
    pub info: serde_json::Value,
}

impl Runner {
    pub fn can_pick(&self, job_tags: &[String]) -> bool {
        if self.paused {
            return false;
        }
        if job_tags.is_empty() {
            return self.run_untagged;
        }
        job_tags.iter().all(|t| self.tags.contains(t))
    }
}

#[derive(Debug, Clone)]
pub struct Project {
    pub id: u64,
    pub name: String,
    pub path: String,
    pub namespace: String,
    pub description: String,
    pub default_branch: String,
    /// A local git repository (work tree or bare) the project points at.
    pub repository: Option<PathBuf>,
    pub created_at: OffsetDateTime,
    /// Project-level job timeout in seconds (GitLab's default: 60 minutes).
    pub build_timeout: u64,
    pub next_pipeline_iid: u64,
}

impl Project {
    pub fn full_path(&self) -> String {
        format!("{}/{}", self.namespace, self.path)
    }
}

#[derive(Debug, Clone, Default)]
pub struct CommitInfo {
    pub sha: String,
    pub before_sha: String,
    pub message: String,
    pub author_name: String,
    pub author_email: String,
    pub timestamp: String,
}

impl CommitInfo {
    pub fn title(&self) -> String {
        self.message.lines().next().unwrap_or_default().to_string()
    }

    pub fn description(&self) -> String {
        match self.message.split_once('\n') {
            Some((_, rest)) => rest.trim_start_matches('\n').to_string(),
            None => String::new(),
        }
    }
}

/// A variable given when the pipeline was created (API / trigger variables).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineVariable {
    pub key: String,
    pub value: String,
    pub file: bool,
    pub raw: bool,
}

#[derive(Debug, Clone)]
pub struct Pipeline {
    pub id: u64,
    pub iid: u64,
    pub project_id: u64,
    /// Parent-child pipelines do not exist here, so the root is the pipeline itself.
    pub root_id: u64,
    pub git_ref: String,
    pub tag: bool,
    pub source: String,
    pub commit: CommitInfo,
    pub config: Arc<CiConfig>,
    pub variables: Vec<PipelineVariable>,
    pub job_ids: Vec<u64>,
    pub status: &'static str,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
    pub started_at: Option<OffsetDateTime>,
    pub finished_at: Option<OffsetDateTime>,
}

#[derive(Debug, Clone)]
pub struct StoredArtifact {
    pub artifact_type: String,
    pub artifact_format: String,
    pub filename: String,
    /// From `expire_in`; `None`: never.
    pub expire_at: Option<OffsetDateTime>,
    pub data: bytes::Bytes,
}

#[derive(Debug, Clone)]
pub struct Job {
    pub id: u64,
    pub pipeline_id: u64,
    pub project_id: u64,
    pub spec: Arc<JobSpec>,
    pub status: JobStatus,
    pub token: String,
    pub runner_id: Option<u64>,
    /// Jobs this one waits for: its `needs`, or every job of earlier stages.
    pub waits_for: Vec<u64>,
    /// Jobs whose artifacts it receives (`dependencies`, `needs:artifacts`, earlier stages).
    pub artifact_deps: Vec<u64>,
    pub created_at: OffsetDateTime,
    pub queued_at: Option<OffsetDateTime>,
    pub started_at: Option<OffsetDateTime>,
    pub finished_at: Option<OffsetDateTime>,
    pub failure_reason: Option<String>,
    pub exit_code: Option<i64>,
    pub trace: Vec<u8>,
    pub artifacts: Vec<StoredArtifact>,
    /// Resolved `cache:key`s, one per `cache:` entry (computed at creation).
    pub cache_keys: Vec<String>,
    /// Rails' decision at pickup: flag on for the project and pipeline sampled.
    pub telemetry: bool,
}

impl Job {
    pub fn archive(&self) -> Option<&StoredArtifact> {
        self.artifacts.iter().find(|a| a.artifact_type == "archive")
    }

    /// `failed` with `allow_failure` (or an allowed exit code).
    pub fn failure_tolerated(&self) -> bool {
        self.status == JobStatus::Failed && self.spec.allow_failure.tolerates(self.exit_code)
    }

    pub fn allow_failure(&self) -> bool {
        self.spec.allow_failure.allowed || self.failure_tolerated()
    }
}

/// The store. One per server.
#[derive(Debug)]
pub struct Store {
    pub next_runner_id: u64,
    pub next_project_id: u64,
    pub next_pipeline_id: u64,
    pub next_job_id: u64,
    pub runners: BTreeMap<u64, Runner>,
    pub runner_tokens: HashMap<String, u64>,
    pub projects: BTreeMap<u64, Project>,
    pub pipelines: BTreeMap<u64, Pipeline>,
    pub jobs: BTreeMap<u64, Job>,
    pub job_tokens: HashMap<String, u64>,
    /// Pending jobs, oldest first.
    pub pending: BTreeSet<u64>,
    pub features: BTreeMap<String, Feature>,
    /// Changes whenever jobs are queued; answered as `X-GitLab-Last-Update`.
    pub queue_version: u64,
}

/// What a pipeline's jobs add up to, GitLab's composite status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Composite {
    Incomplete,
    Success,
    Skipped,
    Failed,
    Canceled,
}

impl Store {
    pub fn new(first_id: u64) -> Self {
        Store {
            next_runner_id: 1,
            next_project_id: 1,
            next_pipeline_id: first_id,
            next_job_id: first_id,
            runners: BTreeMap::new(),
            runner_tokens: HashMap::new(),
            projects: BTreeMap::new(),
            pipelines: BTreeMap::new(),
            jobs: BTreeMap::new(),
            job_tokens: HashMap::new(),
            pending: BTreeSet::new(),
            features: BTreeMap::new(),
            queue_version: 1,
        }
    }

    pub fn project_by_ref(&self, id_or_path: &str) -> Option<&Project> {
        if let Ok(id) = id_or_path.parse::<u64>() {
            return self.projects.get(&id);
        }
        self.projects.values().find(|p| p.full_path() == id_or_path)
    }

    /// Creates a pipeline and its jobs, and queues what can start.
    #[allow(clippy::too_many_arguments)]
    pub fn create_pipeline(
        &mut self,
        project_id: u64,
        git_ref: String,
        tag: bool,
        commit: CommitInfo,
        config: Arc<CiConfig>,
        variables: Vec<PipelineVariable>,
        cache_keys: &HashMap<String, Vec<String>>,
        now: OffsetDateTime,
    ) -> u64 {
        let id = self.next_pipeline_id;
        self.next_pipeline_id += 1;
        let iid = match self.projects.get_mut(&project_id) {
            Some(p) => {
                p.next_pipeline_iid += 1;
                p.next_pipeline_iid - 1
            }
            None => 1,
        };
        let mut name_to_id: HashMap<&str, u64> = HashMap::new();
        let mut job_ids = Vec::new();
        for spec in &config.jobs {
            let job_id = self.next_job_id;
            self.next_job_id += 1;
            name_to_id.insert(&spec.name, job_id);
            job_ids.push(job_id);
        }
        for (spec, &job_id) in config.jobs.iter().zip(&job_ids) {
            let earlier: Vec<u64> = config
                .jobs
                .iter()
                .zip(&job_ids)
                .filter(|(other, _)| other.stage_idx < spec.stage_idx)
                .map(|(_, id)| *id)
                .collect();
            let waits_for = match &spec.needs {
                Some(needs) => needs
                    .iter()
                    .filter_map(|n| name_to_id.get(n.job.as_str()).copied())
                    .collect(),
                None => earlier.clone(),
            };
            let artifact_deps = match (&spec.dependencies, &spec.needs) {
                (Some(deps), _) => deps
                    .iter()
                    .filter_map(|d| name_to_id.get(d.as_str()).copied())
                    .collect(),
                (None, Some(needs)) => needs
                    .iter()
                    .filter(|n| n.artifacts)
                    .filter_map(|n| name_to_id.get(n.job.as_str()).copied())
                    .collect(),
                (None, None) => earlier,
            };
            let token = crate::tokens::job_token();
            self.job_tokens.insert(token.clone(), job_id);
            self.jobs.insert(
                job_id,
                Job {
                    id: job_id,
                    pipeline_id: id,
                    project_id,
                    spec: Arc::new(spec.clone()),
                    status: JobStatus::Created,
                    token,
                    runner_id: None,
                    waits_for,
                    artifact_deps,
                    created_at: now,
                    queued_at: None,
                    started_at: None,
                    finished_at: None,
                    failure_reason: None,
                    exit_code: None,
                    trace: Vec::new(),
                    artifacts: Vec::new(),
                    cache_keys: cache_keys.get(&spec.name).cloned().unwrap_or_default(),
                    telemetry: false,
                },
            );
        }
        self.pipelines.insert(
            id,
            Pipeline {
                id,
                iid,
                project_id,
                root_id: id,
                git_ref,
                tag,
                source: "api".to_string(),
                commit,
                config,
                variables,
                job_ids,
                status: "created",
                created_at: now,
                updated_at: now,
                started_at: None,
                finished_at: None,
            },
        );
        self.process_pipeline(id, now);
        id
    }

    fn composite_of(&self, ids: &[u64]) -> Composite {
        let mut any_failed = false;
        let mut any_canceled = false;
        let mut all_skipped = true;
        for id in ids {
            let Some(job) = self.jobs.get(id) else {
                continue;
            };
            match job.status {
                JobStatus::Created | JobStatus::Pending | JobStatus::Running => {
                    return Composite::Incomplete
                }
                JobStatus::Manual if !job.spec.allow_failure.allowed => {
                    return Composite::Incomplete
                }
                JobStatus::Manual | JobStatus::Skipped => {}
                JobStatus::Success => all_skipped = false,
                JobStatus::Failed if job.failure_tolerated() => all_skipped = false,
                JobStatus::Failed => any_failed = true,
                JobStatus::Canceled => any_canceled = true,
            }
        }
        if any_failed {
            Composite::Failed
        } else if any_canceled {
            Composite::Canceled
        } else if all_skipped {
            Composite::Skipped
        } else {
            Composite::Success
        }
    }

    /// Moves `created` jobs whose prerequisites are done to `pending`,
    /// `manual` or `skipped`, until nothing changes; then recomputes the
    /// pipeline status. Returns whether any job was queued.
    pub fn process_pipeline(&mut self, pipeline_id: u64, now: OffsetDateTime) -> bool {
        let Some(job_ids) = self.pipelines.get(&pipeline_id).map(|p| p.job_ids.clone()) else {
            return false;
        };
        let mut queued = false;
        loop {
            let mut changed = false;
            for id in &job_ids {
                let Some(job) = self.jobs.get(id) else {
                    continue;
                };
                if job.status != JobStatus::Created {
                    continue;
                }
                let composite = self.composite_of(&job.waits_for);
                let next = match (job.spec.when, composite) {
                    (_, Composite::Incomplete) => continue,
                    (When::Always, _) => JobStatus::Pending,
                    (When::OnSuccess, Composite::Success | Composite::Skipped) => {
                        JobStatus::Pending
                    }
                    (When::Manual, Composite::Success | Composite::Skipped) => JobStatus::Manual,
                    (When::OnFailure, Composite::Failed) => JobStatus::Pending,
                    _ => JobStatus::Skipped,
                };
                let Some(job) = self.jobs.get_mut(id) else {
                    continue;
                };
                job.status = next;
                if next == JobStatus::Pending {
                    job.queued_at = Some(now);
                    self.pending.insert(*id);
                    queued = true;
                }
                changed = true;
            }
            if !changed {
                break;
            }
        }
        if queued {
            self.queue_version += 1;
        }
        self.update_pipeline_status(pipeline_id, now);
        queued
    }

    fn update_pipeline_status(&mut self, pipeline_id: u64, now: OffsetDateTime) {
        let Some(pipeline) = self.pipelines.get(&pipeline_id) else {
            return;
        };
        let mut set: BTreeSet<&'static str> = BTreeSet::new();
        for id in &pipeline.job_ids {
            let Some(job) = self.jobs.get(id) else {
                continue;
            };
            let category = match job.status {
                JobStatus::Failed if job.failure_tolerated() => "success",
                JobStatus::Manual if job.spec.allow_failure.allowed => "ignored",
                status => status.as_str(),
            };
            set.insert(category);
        }
        let only = |allowed: &[&str]| set.iter().all(|s| allowed.contains(s));
        let any = |wanted: &str| set.contains(wanted);
        let status = if only(&["skipped", "ignored"]) {
            "skipped"
        } else if only(&["success", "skipped", "ignored"]) {
            "success"
        } else if only(&["created", "skipped", "ignored"]) {
            "created"
        } else if only(&["canceled", "success", "skipped", "ignored"]) {
            "canceled"
        } else if only(&["pending", "created", "skipped", "ignored"]) {
            "pending"
        } else if any("running") || any("pending") {
            "running"
        } else if any("manual") {
            "manual"
        } else if any("created") {
            "running"
        } else {
            "failed"
        };
        let started = pipeline
            .job_ids
            .iter()
            .filter_map(|id| self.jobs.get(id).and_then(|j| j.started_at))
            .min();
        let Some(pipeline) = self.pipelines.get_mut(&pipeline_id) else {
            return;
        };
        if pipeline.status != status {
            pipeline.updated_at = now;
        }
        pipeline.status = status;
        pipeline.started_at = started;
        let terminal = matches!(status, "success" | "failed" | "canceled" | "skipped");
        pipeline.finished_at = if terminal {
            Some(pipeline.finished_at.unwrap_or(now))
        } else {
            None
        };
    }

    /// Finishes a running or pending job and moves its pipeline on.
    pub fn finish_job(
        &mut self,
        job_id: u64,
        status: JobStatus,
        failure_reason: Option<String>,
        exit_code: Option<i64>,
        now: OffsetDateTime,
    ) {
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return;
        };
        job.status = status;
        job.finished_at = Some(now);
        job.exit_code = exit_code;
        job.failure_reason = if status == JobStatus::Failed {
            Some(failure_reason.unwrap_or_else(|| "unknown_failure".to_string()))
        } else {
            None
        };
        let pipeline_id = job.pipeline_id;
        self.pending.remove(&job_id);
        self.process_pipeline(pipeline_id, now);
    }

    /// Hands the oldest pending job this runner may run to it.
    pub fn pick_job(&mut self, runner_id: u64, now: OffsetDateTime) -> Option<u64> {
        let runner = self.runners.get(&runner_id)?;
        let job_id = self.pending.iter().copied().find(|id| {
            self.jobs
                .get(id)
                .is_some_and(|j| runner.can_pick(&j.spec.tags))
        })?;
        self.pending.remove(&job_id);
        let job = self.jobs.get_mut(&job_id)?;
        job.status = JobStatus::Running;
        job.runner_id = Some(runner_id);
        job.started_at = Some(now);
        let pipeline_id = job.pipeline_id;
        self.update_pipeline_status(pipeline_id, now);
        Some(job_id)
    }

    /// Cancels a job that has not finished. Returns false when it had.
    pub fn cancel_job(&mut self, job_id: u64, now: OffsetDateTime) -> bool {
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return false;
        };
        if !matches!(
            job.status,
            JobStatus::Created | JobStatus::Pending | JobStatus::Running | JobStatus::Manual
        ) {
            return false;
        }
        job.status = JobStatus::Canceled;
        job.finished_at = Some(now);
        let pipeline_id = job.pipeline_id;
        self.pending.remove(&job_id);
        self.process_pipeline(pipeline_id, now);
        true
    }

    /// Cancels every unfinished job of a pipeline.
    pub fn cancel_pipeline(&mut self, pipeline_id: u64, now: OffsetDateTime) {
        let Some(job_ids) = self.pipelines.get(&pipeline_id).map(|p| p.job_ids.clone()) else {
            return;
        };
        for id in job_ids {
            if let Some(job) = self.jobs.get_mut(&id) {
                if matches!(
                    job.status,
                    JobStatus::Created | JobStatus::Pending | JobStatus::Running
                ) {
                    job.status = JobStatus::Canceled;
                    job.finished_at = Some(now);
                    self.pending.remove(&id);
                }
            }
        }
        self.process_pipeline(pipeline_id, now);
    }

    /// Plays a manual job: it is queued.
    pub fn play_job(&mut self, job_id: u64, now: OffsetDateTime) -> bool {
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return false;
        };
        if job.status != JobStatus::Manual {
            return false;
        }
        job.status = JobStatus::Pending;
        job.queued_at = Some(now);
        let pipeline_id = job.pipeline_id;
        self.pending.insert(job_id);
        self.queue_version += 1;
        self.process_pipeline(pipeline_id, now);
        true
    }
}
