//! Projects, pipelines and jobs, as GitLab's REST API shapes them. Admin only.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{entities, lenient, Admin, ApiError, ApiResult, Params, QueryPairs};
use crate::app::AppState;
use crate::app_state::now;
use crate::ci_config::{self, CacheKey, CiConfig};
use crate::git;
use crate::state::{CommitInfo, JobStatus, PipelineVariable, Project, Store};

/// Projects, pipelines and their jobs.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v4/projects", post(create_project).get(list_projects))
        .route("/api/v4/projects/{project}", get(get_project))
        .route("/api/v4/projects/{project}/pipeline", post(create_pipeline))
        .route("/api/v4/projects/{project}/pipelines", get(list_pipelines))
        .route(
            "/api/v4/projects/{project}/pipelines/{pipeline}",
            get(get_pipeline),
        )
        .route(
            "/api/v4/projects/{project}/pipelines/{pipeline}/jobs",
            get(pipeline_jobs),
        )
        .route(
            "/api/v4/projects/{project}/pipelines/{pipeline}/cancel",
            post(cancel_pipeline),
        )
        .route("/api/v4/projects/{project}/jobs", get(project_jobs))
        .route("/api/v4/projects/{project}/jobs/{job}", get(get_job))
        .route(
            "/api/v4/projects/{project}/jobs/{job}/trace",
            get(get_trace),
        )
        .route(
            "/api/v4/projects/{project}/jobs/{job}/artifacts",
            get(download_artifacts),
        )
        .route("/api/v4/projects/{project}/jobs/{job}/play", post(play_job))
        .route(
            "/api/v4/projects/{project}/jobs/{job}/cancel",
            post(cancel_job),
        )
}

/// GitLab's default job timeout of a project (60 minutes).
pub const DEFAULT_BUILD_TIMEOUT: u64 = 3600;
/// The config file read from the repository.
pub const CI_CONFIG_PATH: &str = ".gitlab-ci.yml";

fn project_id(store: &Store, segment: &str) -> ApiResult<u64> {
    store
        .project_by_ref(segment)
        .map(|p| p.id)
        .ok_or_else(|| ApiError::not_found("Project"))
}

fn valid_path(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= 255
        && path
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        && !path.starts_with(['-', '.'])
        && !path.ends_with(".git")
        && !path.ends_with(".atom")
}

/// GitLab's limit on a project's description.
const MAX_DESCRIPTION_CHARS: usize = 2000;

#[derive(Debug, Deserialize)]
pub struct CreateProjectParams {
    #[serde(default, deserialize_with = "lenient::opt_string")]
    name: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    path: Option<String>,
    /// fake-rails: the namespace path (default `root`, the admin's namespace).
    #[serde(default, deserialize_with = "lenient::opt_string")]
    namespace: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    description: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    default_branch: Option<String>,
    /// fake-rails: a local git repository for `git_info.repo_url` and `.gitlab-ci.yml`.
    #[serde(default, deserialize_with = "lenient::opt_string")]
    repository_path: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    build_timeout: Option<u64>,
}

/// `POST /api/v4/projects`.
pub async fn create_project(
    State(state): State<AppState>,
    _: Admin,
    Params(p): Params<CreateProjectParams>,
) -> ApiResult<Response> {
    let (name, path) =
        match (p.name, p.path) {
            (Some(name), Some(path)) => (name, path),
            (Some(name), None) => {
                let path = name
                    .trim()
                    .to_lowercase()
                    .replace(|c: char| c.is_whitespace(), "-");
                (name, path)
            }
            (None, Some(path)) => (path.clone(), path),
            (None, None) => return Err(ApiError::bad_request(
                "400 Bad request - name, path are missing, at least one parameter must be provided",
            )),
        };
    if !valid_path(&path) {
        return Err(ApiError::bad_request(
            "400 Bad request - path can contain only letters, digits, '_', '-' and '.'. Cannot start with '-' or '.', end in '.git' or end in '.atom'",
        ));
    }
    let namespace = p.namespace.unwrap_or_else(|| "root".to_string());
    if !namespace.split('/').all(valid_path) {
        return Err(ApiError::bad_request(
            "400 Bad request - namespace is invalid",
        ));
    }
    // GitLab's `Project` validates `description` to 2000 characters.
    if p.description
        .as_ref()
        .is_some_and(|d| d.chars().count() > MAX_DESCRIPTION_CHARS)
    {
        return Err(ApiError::bad_request(format!(
            "400 Bad request - description is too long (maximum is {MAX_DESCRIPTION_CHARS} characters)"
        )));
    }
    let timeout = p.build_timeout.unwrap_or(DEFAULT_BUILD_TIMEOUT);
    if !(600..=2_592_000).contains(&timeout) {
        return Err(ApiError::bad_request(
            "400 Bad request - build_timeout needs to be between 10 minutes and 1 month",
        ));
    }
    let repository = match &p.repository_path {
        Some(path) => Some(
            git::repository_root(&PathBuf::from(path))
                .await
                .map_err(|e| {
                    ApiError::bad_request(format!("400 Bad request - repository_path {e}"))
                })?,
        ),
        None => None,
    };
    let default_branch = match (p.default_branch, &repository) {
        (Some(branch), _) => branch,
        (None, Some(repo)) => git::head_branch(repo)
            .await
            .unwrap_or_else(|| "main".to_string()),
        (None, None) => "main".to_string(),
    };
    let mut store = state.lock();
    let full_path = format!("{namespace}/{path}");
    if store.projects.values().any(|p| p.full_path() == full_path) {
        return Err(ApiError::bad_request(
            "400 Bad request - path has already been taken",
        ));
    }
    let id = store.next_project_id;
    store.next_project_id += 1;
    let project = Project {
        id,
        name,
        path,
        namespace,
        description: p.description.unwrap_or_default(),
        default_branch,
        repository,
        created_at: now(),
        build_timeout: timeout,
        next_pipeline_iid: 1,
    };
    let body = entities::project(&project, state.settings());
    store.projects.insert(id, project);
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// `GET /api/v4/projects`.
pub async fn list_projects(State(state): State<AppState>, _: Admin) -> ApiResult<Response> {
    let store = state.lock();
    let list: Vec<_> = store
        .projects
        .values()
        .rev()
        .map(|p| entities::project(p, state.settings()))
        .collect();
    Ok(Json(list).into_response())
}

/// `GET /api/v4/projects/:id` (numeric id or URL-encoded full path).
pub async fn get_project(
    State(state): State<AppState>,
    _: Admin,
    Path(project): Path<String>,
) -> ApiResult<Response> {
    let store = state.lock();
    let project = store
        .project_by_ref(&project)
        .ok_or_else(|| ApiError::not_found("Project"))?;
    Ok(Json(entities::project(project, state.settings())).into_response())
}

#[derive(Debug, Deserialize)]
pub struct VariableParam {
    key: String,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    value: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    variable_type: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    raw: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct CreatePipelineParams {
    #[serde(default, rename = "ref", deserialize_with = "lenient::opt_string")]
    git_ref: Option<String>,
    /// fake-rails: the `.gitlab-ci.yml` text, instead of the repository's.
    #[serde(default, deserialize_with = "lenient::opt_string")]
    ci_config: Option<String>,
    #[serde(default)]
    variables: Vec<VariableParam>,
}

fn synthetic_commit(project: &Project, git_ref: &str) -> CommitInfo {
    let digest = Sha256::digest(format!("{}:{git_ref}", project.id));
    CommitInfo {
        sha: hex::encode(digest)[..40].to_string(),
        before_sha: git::BLANK_SHA.to_string(),
        message: format!("Pipeline for {git_ref} (no repository)"),
        author_name: "Administrator".to_string(),
        author_email: "admin@example.com".to_string(),
        timestamp: String::new(),
    }
}

/// Resolves `cache:key:files` like GitLab: `<prefix>-<digest of the files' last commits>`.
async fn cache_keys(
    config: &CiConfig,
    repository: Option<&std::path::Path>,
    sha: &str,
) -> HashMap<String, Vec<String>> {
    let mut out = HashMap::new();
    for job in &config.jobs {
        let mut keys = Vec::new();
        for cache in &job.cache {
            let key = match &cache.key {
                CacheKey::Literal(key) => key.clone(),
                CacheKey::Files { files, prefix } => {
                    let mut commits = Vec::new();
                    if let Some(repo) = repository {
                        for file in files {
                            if let Some(commit) = git::last_commit_touching(repo, sha, file).await {
                                commits.push(commit);
                            }
                        }
                    }
                    let digest = if commits.is_empty() {
                        "default".to_string()
                    } else {
                        hex::encode(Sha256::digest(commits.concat()))[..40].to_string()
                    };
                    match prefix {
                        Some(prefix) => format!("{prefix}-{digest}"),
                        None => digest,
                    }
                }
            };
            keys.push(key);
        }
        out.insert(job.name.clone(), keys);
    }
    out
}

/// `POST /api/v4/projects/:id/pipeline` with `ref` and, optionally, `ci_config` and `variables`.
pub async fn create_pipeline(
    State(state): State<AppState>,
    _: Admin,
    Path(project): Path<String>,
    Params(p): Params<CreatePipelineParams>,
) -> ApiResult<Response> {
    let project = {
        let store = state.lock();
        store
            .project_by_ref(&project)
            .cloned()
            .ok_or_else(|| ApiError::not_found("Project"))?
    };
    let git_ref = p
        .git_ref
        .ok_or_else(|| ApiError::bad_request("400 Bad request - ref is missing"))?;
    let mut variables = Vec::new();
    for v in p.variables {
        if v.key.is_empty()
            || v.key.len() > 255
            || !v.key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(ApiError::bad_request(format!(
                "400 Bad request - variable key `{}` can contain only letters, digits and '_'",
                v.key
            )));
        }
        let file = match v.variable_type.as_deref() {
            None | Some("env_var") => false,
            Some("file") => true,
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "400 Bad request - variable_type `{other}` is not env_var or file"
                )));
            }
        };
        variables.push(PipelineVariable {
            key: v.key,
            value: v.value.unwrap_or_default(),
            file,
            raw: v.raw.unwrap_or(false),
        });
    }
    let (commit, tag) = match &project.repository {
        Some(repo) => git::resolve_ref(repo, &git_ref)
            .await
            .map_err(|e| ApiError::bad_request(format!("400 Bad request - {e}")))?,
        None if git::valid_ref_name(&git_ref) => (synthetic_commit(&project, &git_ref), false),
        None => {
            return Err(ApiError::bad_request(
                "400 Bad request - Reference not found",
            ))
        }
    };
    let yaml = match (p.ci_config, &project.repository) {
        (Some(yaml), _) => yaml,
        (None, Some(repo)) => git::show_file(repo, &commit.sha, CI_CONFIG_PATH)
            .await
            .ok_or_else(|| ApiError::bad_request("400 Bad request - Missing CI config file"))?,
        (None, None) => {
            return Err(ApiError::bad_request(
                "400 Bad request - Missing CI config file",
            ))
        }
    };
    // Off the async workers: a large config must not stall other requests.
    let config = tokio::task::spawn_blocking(move || ci_config::parse(&yaml))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("500 Internal Server Error - parsing the CI config failed: {e}"),
            )
        })?
        .map_err(|e| ApiError::bad_request(format!("400 Bad request - {e}")))?;
    let keys = cache_keys(&config, project.repository.as_deref(), &commit.sha).await;
    let now = now();
    let mut store = state.lock();
    if !store.projects.contains_key(&project.id) {
        return Err(ApiError::not_found("Project"));
    }
    let id = store.create_pipeline(
        project.id,
        git_ref,
        tag,
        commit,
        Arc::new(config),
        variables,
        &keys,
        now,
    );
    let pipeline = &store.pipelines[&id];
    let body = entities::pipeline(pipeline, &store, state.settings(), now);
    drop(store);
    tracing::debug!(
        pipeline_id = id,
        project_id = project.id,
        "Created a pipeline"
    );
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// `GET /api/v4/projects/:id/pipelines`.
pub async fn list_pipelines(
    State(state): State<AppState>,
    _: Admin,
    Path(project): Path<String>,
) -> ApiResult<Response> {
    let store = state.lock();
    let project_id = project_id(&store, &project)?;
    let list: Vec<_> = store
        .pipelines
        .values()
        .rev()
        .filter(|p| p.project_id == project_id)
        .map(|p| entities::pipeline_basic(p, &store, state.settings()))
        .collect();
    Ok(Json(list).into_response())
}

/// `GET /api/v4/projects/:id/pipelines/:pipeline_id`.
pub async fn get_pipeline(
    State(state): State<AppState>,
    _: Admin,
    Path((project, pipeline)): Path<(String, String)>,
) -> ApiResult<Response> {
    let store = state.lock();
    let pipeline_id = pipeline_of_project(&store, &project, &pipeline)?;
    Ok(Json(entities::pipeline(
        &store.pipelines[&pipeline_id],
        &store,
        state.settings(),
        now(),
    ))
    .into_response())
}

/// `POST /api/v4/projects/:id/pipelines/:pipeline_id/cancel`.
pub async fn cancel_pipeline(
    State(state): State<AppState>,
    _: Admin,
    Path((project, pipeline)): Path<(String, String)>,
) -> ApiResult<Response> {
    let now = now();
    let (body, exports) = {
        let mut store = state.lock();
        let pipeline_id = pipeline_of_project(&store, &project, &pipeline)?;
        let job_ids = store.pipelines[&pipeline_id].job_ids.clone();
        let running: Vec<u64> = job_ids
            .iter()
            .copied()
            .filter(|id| {
                store
                    .jobs
                    .get(id)
                    .is_some_and(|j| j.status == JobStatus::Running)
            })
            .collect();
        store.cancel_pipeline(pipeline_id, now);
        let exports: Vec<_> = running
            .into_iter()
            .filter_map(|id| super::runners::ended_job_spans(&store, id))
            .collect();
        (
            entities::pipeline(
                &store.pipelines[&pipeline_id],
                &store,
                state.settings(),
                now,
            ),
            exports,
        )
    };
    for item in exports {
        state.export(Some(item));
    }
    Ok(Json(body).into_response())
}

/// The id of `pipeline` when it is one of `project`'s pipelines.
fn pipeline_of_project(store: &Store, project: &str, pipeline: &str) -> ApiResult<u64> {
    let project_id = project_id(store, project)?;
    let pipeline_id = super::parse_id(pipeline, "Pipeline")?;
    store
        .pipelines
        .get(&pipeline_id)
        .filter(|p| p.project_id == project_id)
        .map(|p| p.id)
        .ok_or_else(|| ApiError::not_found("Pipeline"))
}

fn scope_filter(query: &HashMap<String, String>) -> Vec<String> {
    query
        .iter()
        .filter(|(k, _)| k.as_str() == "scope" || k.as_str() == "scope[]")
        .flat_map(|(_, v)| v.split(',').map(str::to_string))
        .collect()
}

/// `GET /api/v4/projects/:id/pipelines/:pipeline_id/jobs` (newest first; `scope` filters by status).
pub async fn pipeline_jobs(
    State(state): State<AppState>,
    _: Admin,
    Path((project, pipeline)): Path<(String, String)>,
    QueryPairs(query): QueryPairs,
) -> ApiResult<Response> {
    let store = state.lock();
    let pipeline = &store.pipelines[&pipeline_of_project(&store, &project, &pipeline)?];
    let scopes = scope_filter(&query);
    let now = now();
    let list: Vec<_> = pipeline
        .job_ids
        .iter()
        .rev()
        .filter_map(|id| store.jobs.get(id))
        .filter(|j| scopes.is_empty() || scopes.iter().any(|s| s == j.status.as_str()))
        .map(|j| entities::job(j, &store, state.settings(), now))
        .collect();
    Ok(Json(list).into_response())
}

/// `GET /api/v4/projects/:id/jobs`.
pub async fn project_jobs(
    State(state): State<AppState>,
    _: Admin,
    Path(project): Path<String>,
    QueryPairs(query): QueryPairs,
) -> ApiResult<Response> {
    let store = state.lock();
    let project_id = project_id(&store, &project)?;
    let scopes = scope_filter(&query);
    let now = now();
    let list: Vec<_> = store
        .jobs
        .values()
        .rev()
        .filter(|j| j.project_id == project_id)
        .filter(|j| scopes.is_empty() || scopes.iter().any(|s| s == j.status.as_str()))
        .map(|j| entities::job(j, &store, state.settings(), now))
        .collect();
    Ok(Json(list).into_response())
}

fn job_of_project(store: &Store, project: &str, job: &str) -> ApiResult<u64> {
    let project_id = project_id(store, project)?;
    let job_id = super::parse_id(job, "Job")?;
    store
        .jobs
        .get(&job_id)
        .filter(|j| j.project_id == project_id)
        .map(|j| j.id)
        .ok_or_else(|| ApiError::not_found("Job"))
}

/// `GET /api/v4/projects/:id/jobs/:job_id`.
pub async fn get_job(
    State(state): State<AppState>,
    _: Admin,
    Path((project, job)): Path<(String, String)>,
) -> ApiResult<Response> {
    let store = state.lock();
    let job_id = job_of_project(&store, &project, &job)?;
    Ok(Json(entities::job(
        &store.jobs[&job_id],
        &store,
        state.settings(),
        now(),
    ))
    .into_response())
}

/// `GET /api/v4/projects/:id/jobs/:job_id/trace`: the raw log.
pub async fn get_trace(
    State(state): State<AppState>,
    _: Admin,
    Path((project, job)): Path<(String, String)>,
) -> ApiResult<Response> {
    let store = state.lock();
    let job_id = job_of_project(&store, &project, &job)?;
    let trace = store.jobs[&job_id].trace.clone();
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], trace).into_response())
}

/// `GET /api/v4/projects/:id/jobs/:job_id/artifacts`: the archive.
pub async fn download_artifacts(
    State(state): State<AppState>,
    _: Admin,
    Path((project, job)): Path<(String, String)>,
) -> ApiResult<Response> {
    let store = state.lock();
    let job_id = job_of_project(&store, &project, &job)?;
    let artifact = store.jobs[&job_id]
        .archive()
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "404 Not Found"))?;
    Ok(super::runners::artifact_response(artifact))
}

/// `POST /api/v4/projects/:id/jobs/:job_id/play`: queues a manual job.
pub async fn play_job(
    State(state): State<AppState>,
    _: Admin,
    Path((project, job)): Path<(String, String)>,
) -> ApiResult<Response> {
    let mut store = state.lock();
    let job_id = job_of_project(&store, &project, &job)?;
    let now = now();
    if !store.play_job(job_id, now) {
        return Err(ApiError::forbidden_because("Unplayable Job"));
    }
    Ok(Json(entities::job(
        &store.jobs[&job_id],
        &store,
        state.settings(),
        now,
    ))
    .into_response())
}

/// `POST /api/v4/projects/:id/jobs/:job_id/cancel`.
pub async fn cancel_job(
    State(state): State<AppState>,
    _: Admin,
    Path((project, job)): Path<(String, String)>,
) -> ApiResult<Response> {
    let now = now();
    let (body, export) = {
        let mut store = state.lock();
        let job_id = job_of_project(&store, &project, &job)?;
        let was_running = store.jobs[&job_id].status == JobStatus::Running;
        if !store.cancel_job(job_id, now) {
            return Err(ApiError::forbidden_because("Job is not cancelable"));
        }
        let export = if was_running {
            super::runners::ended_job_spans(&store, job_id)
        } else {
            None
        };
        (
            entities::job(&store.jobs[&job_id], &store, state.settings(), now),
            export,
        )
    };
    state.export(export);
    Ok((StatusCode::CREATED, Json(body)).into_response())
}
