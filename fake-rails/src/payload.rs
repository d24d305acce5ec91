//! The job payload of `POST /api/v4/jobs/request`, shaped like GitLab's
//! `Entities::Ci::JobRequest::Response` (GitLab Runner's `spec.Job`); the
//! telemetry fields follow `docs/contract.md` §1.

use serde::Serialize;
use time::OffsetDateTime;

use crate::app::Settings;
use crate::ci_config::{ArtifactSpec, ImageSpec, When};
use crate::config::Contract;
use crate::state::{Job, Pipeline, Project, Runner, Store};

/// Default `git_info.depth` (GitLab's default for new projects).
pub const DEFAULT_GIT_DEPTH: u64 = 20;

/// GitLab's `Ci::Build.failure_reasons` keys: what a runner may report.
pub const FAILURE_REASONS: [&str; 23] = [
    "unknown_failure",
    "script_failure",
    "api_failure",
    "stuck_or_timeout_failure",
    "runner_system_failure",
    "missing_dependency_failure",
    "runner_unsupported",
    "stale_schedule",
    "job_execution_timeout",
    "archived_failure",
    "unmet_prerequisites",
    "scheduler_failure",
    "data_integrity_failure",
    "forward_deployment_failure",
    "user_blocked",
    "project_deleted",
    "ci_quota_exceeded",
    "pipeline_loop_detected",
    "no_matching_runner",
    "trace_size_exceeded",
    "builds_disabled",
    "environment_creation_failure",
    "deployment_rejected",
];

/// The Rails trace context of a sampled job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceIds {
    pub trace_id: String,
    /// The `job_running` span id.
    pub parent_span_id: String,
}

#[derive(Debug, Serialize)]
pub struct JobPayload {
    pub id: u64,
    pub token: String,
    pub allow_git_fetch: bool,
    pub job_info: JobInfo,
    pub git_info: GitInfo,
    pub runner_info: RunnerInfo,
    pub variables: Vec<Variable>,
    pub steps: Vec<Step>,
    pub image: Option<Image>,
    pub services: Vec<Image>,
    pub artifacts: Vec<Artifact>,
    pub cache: Vec<Cache>,
    pub credentials: Vec<serde_json::Value>,
    pub dependencies: Vec<Dependency>,
    pub features: Features,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_context: Option<TraceContext>,
    pub hooks: Vec<serde_json::Value>,
    /// CI Functions: the `run:` list as a JSON string, only when the job has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct JobInfo {
    pub id: u64,
    pub name: String,
    pub stage: String,
    pub pipeline_id: u64,
    pub project_id: u64,
    pub project_name: String,
    pub project_full_path: String,
    pub namespace_id: u64,
    pub root_namespace_id: u64,
    pub organization_id: u64,
    pub instance_id: String,
    pub instance_uuid: String,
    pub user_id: u64,
    pub time_in_queue_seconds: f64,
    pub project_jobs_running_on_instance_runners_count: String,
    pub queue_size: u64,
    pub queue_depth: u64,
}

#[derive(Debug, Serialize)]
pub struct GitInfo {
    pub repo_url: String,
    pub repo_object_format: &'static str,
    #[serde(rename = "ref")]
    pub git_ref: String,
    pub sha: String,
    pub before_sha: String,
    pub ref_type: &'static str,
    pub refspecs: Vec<String>,
    pub depth: u64,
    pub protected: bool,
}

#[derive(Debug, Serialize)]
pub struct RunnerInfo {
    pub timeout: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Variable {
    pub key: String,
    pub value: String,
    pub public: bool,
    pub file: bool,
    pub masked: bool,
    pub raw: bool,
}

#[derive(Debug, Serialize)]
pub struct Step {
    pub name: &'static str,
    pub script: Vec<String>,
    pub timeout: u64,
    pub when: &'static str,
    pub allow_failure: bool,
}

#[derive(Debug, Serialize)]
pub struct Image {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    pub entrypoint: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    pub ports: Vec<serde_json::Value>,
    pub executor_opts: Option<serde_json::Value>,
    pub pull_policy: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub variables: Vec<Variable>,
}

#[derive(Debug, Serialize)]
pub struct Artifact {
    pub name: Option<String>,
    pub untracked: bool,
    pub paths: Vec<String>,
    pub exclude: Vec<String>,
    pub when: String,
    pub expire_in: Option<String>,
    pub artifact_type: String,
    pub artifact_format: String,
}

#[derive(Debug, Serialize)]
pub struct Cache {
    pub key: String,
    pub untracked: bool,
    pub paths: Vec<String>,
    pub policy: String,
    pub when: String,
    pub fallback_keys: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Dependency {
    pub id: u64,
    pub name: String,
    pub token: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub artifacts_file: Option<ArtifactsFile>,
}

#[derive(Debug, Serialize)]
pub struct ArtifactsFile {
    pub filename: String,
    pub size: u64,
}

#[derive(Debug, Serialize)]
pub struct Features {
    pub trace_sections: bool,
    pub token_mask_prefixes: Vec<&'static str>,
    pub failure_reasons: Vec<&'static str>,
    /// Contract v1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_telemetry: Option<bool>,
    /// Contract v2.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracing: Option<Tracing>,
}

#[derive(Debug, Serialize)]
pub struct TraceContext {
    pub trace_id: String,
    pub parent_span_id: String,
}

#[derive(Debug, Serialize)]
pub struct Tracing {
    pub trace_id: String,
    pub span_parent_id: String,
    pub otel_endpoints: Vec<OtelEndpoint>,
}

#[derive(Debug, Serialize)]
pub struct OtelEndpoint {
    pub url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth: Option<serde_json::Value>,
}

/// `CI_COMMIT_REF_SLUG`-style slug: lowercase, non-alphanumerics to `-`, at most 63 chars.
pub fn slugify(text: &str) -> String {
    let lowered: String = text
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let truncated: String = lowered.chars().take(63).collect();
    truncated.trim_matches('-').to_string()
}

/// The job's timeout in seconds: its own `timeout:` or the project's, capped by the runner's maximum.
pub fn job_timeout(job: &Job, project: &Project, runner: Option<&Runner>) -> u64 {
    let timeout = job.spec.timeout.unwrap_or(project.build_timeout);
    match runner.and_then(|r| r.maximum_timeout) {
        Some(max) => timeout.min(max),
        None => timeout,
    }
}

fn var(key: &str, value: impl Into<String>) -> Variable {
    Variable {
        key: key.to_string(),
        value: value.into(),
        public: true,
        file: false,
        masked: false,
        raw: false,
    }
}

/// The variables GitLab sends: predefined ones, then the YAML's, then the pipeline's.
pub fn variables(store: &Store, job: &Job, settings: &Settings) -> Vec<Variable> {
    let Some(pipeline) = store.pipelines.get(&job.pipeline_id) else {
        return Vec::new();
    };
    let Some(project) = store.projects.get(&job.project_id) else {
        return Vec::new();
    };
    let runner = job.runner_id.and_then(|id| store.runners.get(&id));
    let base = settings.public_url.trim_end_matches('/');
    let full_path = project.full_path();
    let project_url = format!("{base}/{full_path}");
    let server = url::Url::parse(base).ok();
    let host = server
        .as_ref()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_default();
    let port = server
        .as_ref()
        .and_then(|u| u.port_or_known_default())
        .unwrap_or(80);
    let protocol = server
        .as_ref()
        .map(|u| u.scheme().to_string())
        .unwrap_or_else(|| "http".to_string());
    let commit = &pipeline.commit;

    let mut vars = vec![
        var("CI_PIPELINE_ID", pipeline.id.to_string()),
        var(
            "CI_PIPELINE_URL",
            format!("{project_url}/-/pipelines/{}", pipeline.id),
        ),
        var("CI_JOB_ID", job.id.to_string()),
        var("CI_JOB_URL", format!("{project_url}/-/jobs/{}", job.id)),
        Variable {
            masked: true,
            public: false,
            ..var("CI_JOB_TOKEN", job.token.clone())
        },
        var(
            "CI_JOB_STARTED_AT",
            job.started_at
                .map(crate::app_state::format_time)
                .unwrap_or_default(),
        ),
        var("CI_JOB_NAME", job.spec.name.clone()),
        var("CI_JOB_NAME_SLUG", slugify(&job.spec.name)),
        var("CI_JOB_STAGE", job.spec.stage.clone()),
        var("CI_NODE_TOTAL", "1"),
        var("CI", "true"),
        var("GITLAB_CI", "true"),
        var("CI_SERVER_URL", base),
        var("CI_SERVER_HOST", host.clone()),
        var("CI_SERVER_PORT", port.to_string()),
        var("CI_SERVER_PROTOCOL", protocol),
        var(
            "CI_SERVER_FQDN",
            if server.as_ref().and_then(|u| u.port()).is_some() {
                format!("{host}:{port}")
            } else {
                host.clone()
            },
        ),
        var("CI_SERVER_NAME", "GitLab"),
        var("CI_SERVER_VERSION", crate::app_state::GITLAB_VERSION),
        var(
            "CI_SERVER_VERSION_MAJOR",
            crate::app_state::GITLAB_VERSION
                .split('.')
                .next()
                .unwrap_or("0"),
        ),
        var(
            "CI_SERVER_VERSION_MINOR",
            crate::app_state::GITLAB_VERSION
                .split('.')
                .nth(1)
                .unwrap_or("0"),
        ),
        var(
            "CI_SERVER_VERSION_PATCH",
            crate::app_state::GITLAB_VERSION
                .split('.')
                .nth(2)
                .unwrap_or("0"),
        ),
        var("CI_SERVER_REVISION", crate::app_state::GITLAB_REVISION),
        var("GITLAB_FEATURES", ""),
        var("CI_PROJECT_ID", project.id.to_string()),
        var("CI_PROJECT_NAME", project.path.clone()),
        var("CI_PROJECT_TITLE", project.name.clone()),
        var("CI_PROJECT_DESCRIPTION", project.description.clone()),
        var("CI_PROJECT_PATH", full_path.clone()),
        var("CI_PROJECT_PATH_SLUG", slugify(&full_path)),
        var("CI_PROJECT_NAMESPACE", project.namespace.clone()),
        var("CI_PROJECT_NAMESPACE_ID", "1"),
        var(
            "CI_PROJECT_ROOT_NAMESPACE",
            project.namespace.split('/').next().unwrap_or_default(),
        ),
        var("CI_PROJECT_URL", project_url.clone()),
        var("CI_PROJECT_VISIBILITY", "private"),
        var("CI_PROJECT_REPOSITORY_LANGUAGES", ""),
        var("CI_PROJECT_CLASSIFICATION_LABEL", ""),
        var("CI_DEFAULT_BRANCH", project.default_branch.clone()),
        var("CI_CONFIG_PATH", ".gitlab-ci.yml"),
        var("CI_PIPELINE_IID", pipeline.iid.to_string()),
        var("CI_PIPELINE_SOURCE", pipeline.source.clone()),
        var(
            "CI_PIPELINE_CREATED_AT",
            crate::app_state::format_time(pipeline.created_at),
        ),
        var("CI_COMMIT_SHA", commit.sha.clone()),
        var(
            "CI_COMMIT_SHORT_SHA",
            commit.sha.chars().take(8).collect::<String>(),
        ),
        var("CI_COMMIT_BEFORE_SHA", commit.before_sha.clone()),
        var("CI_COMMIT_REF_NAME", pipeline.git_ref.clone()),
        var("CI_COMMIT_REF_SLUG", slugify(&pipeline.git_ref)),
    ];
    if job.spec.when == When::Manual {
        // Only manual jobs have it.
        vars.insert(9, var("CI_JOB_MANUAL", "true"));
    }
    if pipeline.tag {
        vars.push(var("CI_COMMIT_TAG", pipeline.git_ref.clone()));
    } else {
        vars.push(var("CI_COMMIT_BRANCH", pipeline.git_ref.clone()));
    }
    vars.extend([
        var("CI_COMMIT_MESSAGE", commit.message.clone()),
        var("CI_COMMIT_TITLE", commit.title()),
        var("CI_COMMIT_DESCRIPTION", commit.description()),
        var(
            "CI_COMMIT_REF_PROTECTED",
            is_protected(pipeline, project).to_string(),
        ),
        var("CI_COMMIT_TIMESTAMP", commit.timestamp.clone()),
        var(
            "CI_COMMIT_AUTHOR",
            format!("{} <{}>", commit.author_name, commit.author_email),
        ),
        var("GITLAB_USER_ID", "1"),
        var("GITLAB_USER_EMAIL", "admin@example.com"),
        var("GITLAB_USER_LOGIN", "root"),
        var("GITLAB_USER_NAME", "Administrator"),
    ]);
    if let Some(runner) = runner {
        vars.extend([
            var("CI_RUNNER_ID", runner.id.to_string()),
            var("CI_RUNNER_DESCRIPTION", runner.description.clone()),
            var(
                "CI_RUNNER_TAGS",
                serde_json::to_string(&runner.tags).unwrap_or_default(),
            ),
        ]);
    }
    for v in pipeline.config.variables.iter().chain(&job.spec.variables) {
        vars.push(Variable {
            raw: v.raw,
            ..var(&v.key, v.value.clone())
        });
    }
    for v in &pipeline.variables {
        vars.push(Variable {
            public: false,
            file: v.file,
            raw: v.raw,
            ..var(&v.key, v.value.clone())
        });
    }
    vars
}

fn is_protected(pipeline: &Pipeline, project: &Project) -> bool {
    !pipeline.tag && pipeline.git_ref == project.default_branch
}

fn last_variable<'a>(vars: &'a [Variable], key: &str) -> Option<&'a str> {
    vars.iter()
        .rev()
        .find(|v| v.key == key)
        .map(|v| v.value.as_str())
}

fn image(spec: &ImageSpec) -> Image {
    Image {
        name: spec.name.clone(),
        alias: spec.alias.clone(),
        entrypoint: spec.entrypoint.clone(),
        command: spec.command.clone(),
        ports: Vec::new(),
        executor_opts: spec.executor_opts.clone(),
        pull_policy: spec.pull_policy.clone(),
        variables: spec
            .variables
            .iter()
            .map(|(k, v)| var(k, v.clone()))
            .collect(),
    }
}

fn artifact(spec: &ArtifactSpec) -> Artifact {
    Artifact {
        name: spec.name.clone(),
        untracked: spec.untracked,
        paths: spec.paths.clone(),
        exclude: spec.exclude.clone(),
        when: spec.when.clone(),
        expire_in: spec.expire_in.clone(),
        artifact_type: spec.artifact_type.clone(),
        artifact_format: spec.artifact_format.clone(),
    }
}

/// Builds the payload of a job that was just handed to `job.runner_id`.
/// `trace` is the Rails decision: `Some` when telemetry is on for the job.
pub fn build(
    store: &Store,
    job: &Job,
    settings: &Settings,
    trace: Option<&TraceIds>,
    now: OffsetDateTime,
) -> Option<JobPayload> {
    let pipeline = store.pipelines.get(&job.pipeline_id)?;
    let project = store.projects.get(&job.project_id)?;
    let runner = job.runner_id.and_then(|id| store.runners.get(&id));
    let spec = &job.spec;
    let timeout = job_timeout(job, project, runner);
    let variables = variables(store, job, settings);

    let base = settings.public_url.trim_end_matches('/');
    let repo_url = match &project.repository {
        Some(path) => format!("file://{}", path.display()),
        None => {
            let (scheme, rest) = base.split_once("://").unwrap_or(("http", base));
            format!(
                "{scheme}://gitlab-ci-token:{}@{rest}/{}.git",
                job.token,
                project.full_path()
            )
        }
    };
    let depth = last_variable(&variables, "GIT_DEPTH")
        .and_then(|d| d.parse().ok())
        .unwrap_or(DEFAULT_GIT_DEPTH);
    let refspecs = match (depth, pipeline.tag) {
        (0, _) => vec![
            "+refs/heads/*:refs/remotes/origin/*".to_string(),
            "+refs/tags/*:refs/tags/*".to_string(),
        ],
        (_, false) => vec![format!(
            "+refs/heads/{0}:refs/remotes/origin/{0}",
            pipeline.git_ref
        )],
        (_, true) => vec![format!("+refs/tags/{0}:refs/tags/{0}", pipeline.git_ref)],
    };

    let steps = if spec.run.is_some() {
        vec![Step {
            name: "run",
            script: Vec::new(),
            timeout,
            when: "on_success",
            allow_failure: false,
        }]
    } else {
        let mut steps = vec![Step {
            name: "script",
            script: spec
                .before_script
                .iter()
                .chain(&spec.script)
                .cloned()
                .collect(),
            timeout,
            when: "on_success",
            allow_failure: false,
        }];
        if !spec.after_script.is_empty() {
            steps.push(Step {
                name: "after_script",
                script: spec.after_script.clone(),
                timeout,
                when: "always",
                allow_failure: true,
            });
        }
        steps
    };

    let protected = is_protected(pipeline, project);
    let cache = spec
        .cache
        .iter()
        .zip(
            job.cache_keys
                .iter()
                .chain(std::iter::repeat(&"default".to_string())),
        )
        .map(|(c, key)| {
            let suffix = if protected || c.unprotect {
                "protected"
            } else {
                "non_protected"
            };
            Cache {
                key: format!("{key}-{suffix}"),
                untracked: c.untracked,
                paths: c.paths.clone(),
                policy: c.policy.clone(),
                when: c.when.clone(),
                fallback_keys: c.fallback_keys.clone(),
            }
        })
        .collect();

    let dependencies = job
        .artifact_deps
        .iter()
        .filter_map(|id| store.jobs.get(id))
        .map(|dep| Dependency {
            id: dep.id,
            name: dep.spec.name.clone(),
            token: dep.token.clone(),
            artifacts_file: dep.archive().map(|a| ArtifactsFile {
                filename: a.filename.clone(),
                size: a.data.len() as u64,
            }),
        })
        .collect();

    let running_in_project = store
        .jobs
        .values()
        .filter(|j| j.project_id == project.id && j.status == crate::state::JobStatus::Running)
        .count();
    let running_bucket = if running_in_project > 5 {
        "+Inf".to_string()
    } else {
        running_in_project.to_string()
    };

    let mut features = Features {
        trace_sections: true,
        token_mask_prefixes: crate::tokens::MASK_PREFIXES.to_vec(),
        failure_reasons: FAILURE_REASONS.to_vec(),
        job_telemetry: None,
        tracing: None,
    };
    let mut trace_context = None;
    if let Some(ids) = trace {
        match settings.contract {
            Contract::V1 => {
                features.job_telemetry = Some(true);
                trace_context = Some(TraceContext {
                    trace_id: ids.trace_id.clone(),
                    parent_span_id: ids.parent_span_id.clone(),
                });
            }
            Contract::V2 if !settings.otel_endpoints.is_empty() => {
                let auth = settings.otel_audience.as_ref().map(|audience| {
                    serde_json::json!({"type": "http_bearer_gcp_oidc", "http_bearer_gcp_oidc": {"audience": audience}})
                });
                features.tracing = Some(Tracing {
                    trace_id: ids.trace_id.clone(),
                    span_parent_id: ids.parent_span_id.clone(),
                    otel_endpoints: settings
                        .otel_endpoints
                        .iter()
                        .map(|url| OtelEndpoint {
                            url: url.clone(),
                            auth: auth.clone(),
                        })
                        .collect(),
                });
            }
            Contract::V2 => {}
        }
    }

    Some(JobPayload {
        id: job.id,
        token: job.token.clone(),
        allow_git_fetch: true,
        job_info: JobInfo {
            id: job.id,
            name: spec.name.clone(),
            stage: spec.stage.clone(),
            pipeline_id: pipeline.id,
            project_id: project.id,
            project_name: project.name.clone(),
            project_full_path: project.full_path(),
            namespace_id: 1,
            root_namespace_id: 1,
            organization_id: 1,
            instance_id: "fake-rails".to_string(),
            instance_uuid: settings.instance_uuid.clone(),
            user_id: 1,
            time_in_queue_seconds: job
                .queued_at
                .map(|q| (now - q).as_seconds_f64().max(0.0))
                .unwrap_or(0.0),
            project_jobs_running_on_instance_runners_count: running_bucket,
            queue_size: store.pending.len() as u64,
            queue_depth: 0,
        },
        git_info: GitInfo {
            repo_url,
            repo_object_format: "sha1",
            git_ref: pipeline.git_ref.clone(),
            sha: pipeline.commit.sha.clone(),
            before_sha: pipeline.commit.before_sha.clone(),
            ref_type: if pipeline.tag { "tag" } else { "branch" },
            refspecs,
            depth,
            protected,
        },
        runner_info: RunnerInfo { timeout },
        variables,
        steps,
        image: spec.image.as_ref().map(image),
        services: spec.services.iter().map(image).collect(),
        artifacts: spec.artifacts.iter().map(artifact).collect(),
        cache,
        credentials: Vec::new(),
        dependencies,
        features,
        trace_context,
        hooks: Vec::new(),
        run: spec.run.as_ref().map(|r| r.to_string()),
    })
}
