//! The runner API: registration, job requests, job updates, logs, artifacts.

use axum::body::Bytes;
use axum::extract::multipart::MultipartRejection;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Multipart, Path, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post, put};
use axum::{Json, Router};
use serde::Deserialize;

use super::{lenient, Admin, ApiError, ApiResult, Params, QueryPairs};
use crate::app::AppState;
use crate::app_state::{now, ARTIFACT_BODY_LIMIT, TRACE_BODY_LIMIT};
use crate::export::{ExportItem, JobSpanData};
use crate::flags::CI_JOB_TELEMETRY;
use crate::ids::{self, RailsSpan};
use crate::payload::{self, TraceIds, FAILURE_REASONS};
use crate::state::{JobStatus, Runner, Store, StoredArtifact};

/// The runner API: registration, jobs, traces and artifacts.
pub fn routes() -> Router<AppState> {
    let traces = Router::new()
        .route("/api/v4/jobs/{id}/trace", patch(patch_trace))
        .layer(DefaultBodyLimit::max(TRACE_BODY_LIMIT));
    let artifacts = Router::new()
        .route(
            "/api/v4/jobs/{id}/artifacts",
            post(upload_artifacts).get(download_artifacts),
        )
        .layer(DefaultBodyLimit::max(ARTIFACT_BODY_LIMIT));
    Router::new()
        .route("/api/v4/runners", post(register).delete(unregister))
        .route("/api/v4/runners/verify", post(verify))
        .route("/api/v4/user/runners", post(create_user_runner))
        .route("/api/v4/jobs/request", post(request_job))
        .route("/api/v4/jobs/{id}", put(update_job))
        .route("/api/v4/job", get(current_job))
        .merge(traces)
        .merge(artifacts)
}

/// Total size a job log may reach.
pub const MAX_TRACE_BYTES: usize = 64 * 1024 * 1024;
/// `X-GitLab-Trace-Update-Interval`: GitLab's interval while someone watches the log.
const TRACE_UPDATE_INTERVAL: &str = "3";
const ARTIFACT_FORMATS: [&str; 5] = ["zip", "gzip", "raw", "zipzstd", "tarzstd"];

static JOB_STATUS: HeaderName = HeaderName::from_static("job-status");

/// The Rails spans of a job, when telemetry is on for it.
pub(crate) fn rails_spans_of(
    store: &Store,
    job_id: u64,
    spans: Vec<RailsSpan>,
) -> Option<ExportItem> {
    let job = store.jobs.get(&job_id)?;
    if !job.telemetry {
        return None;
    }
    let pipeline = store.pipelines.get(&job.pipeline_id)?;
    Some(ExportItem {
        job: JobSpanData {
            root_pipeline_id: pipeline.root_id,
            pipeline_id: pipeline.id,
            job_id: job.id,
            project_id: job.project_id,
            runner_id: job.runner_id,
            pipeline_source: pipeline.source.clone(),
            job_name: job.spec.name.clone(),
            job_stage: job.spec.stage.clone(),
            job_status: job.status.as_str(),
            failure_reason: job.failure_reason.clone(),
            created_at: job.created_at,
            queued_at: job.queued_at,
            started_at: job.started_at,
            finished_at: job.finished_at,
        },
        spans,
    })
}

/// The Rails spans of a job that ended after it ran: its lifecycle and its
/// running time.
pub(crate) fn ended_job_spans(store: &Store, job_id: u64) -> Option<ExportItem> {
    rails_spans_of(
        store,
        job_id,
        vec![RailsSpan::Lifecycle, RailsSpan::Running],
    )
}

/// A registration, verify, unregister or job request without a `token`.
fn required_token(token: Option<String>) -> ApiResult<String> {
    token.ok_or_else(|| ApiError::bad_request("400 Bad request - token is missing"))
}

/// The answer naming a runner and its token.
fn runner_token_body(id: u64, token: &str) -> serde_json::Value {
    serde_json::json!({"id": id, "token": token, "token_expires_at": null})
}

fn job_not_running(status: JobStatus) -> ApiError {
    ApiError::forbidden_because("Job is not processing on runner")
        .with_header(JOB_STATUS.clone(), status.as_str())
}

fn job_token<'a>(
    headers: &'a axum::http::HeaderMap,
    body: Option<&'a str>,
    query: Option<&'a str>,
) -> Option<&'a str> {
    body.filter(|t| !t.is_empty())
        .or_else(|| super::header(headers, "job-token"))
        .or(query.filter(|t| !t.is_empty()))
}

#[derive(Debug, Deserialize)]
pub struct RegisterParams {
    #[serde(default, deserialize_with = "lenient::opt_string")]
    token: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    description: Option<String>,
    #[serde(default)]
    info: Option<serde_json::Value>,
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    active: Option<bool>,
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    paused: Option<bool>,
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    locked: Option<bool>,
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    run_untagged: Option<bool>,
    #[serde(default, deserialize_with = "lenient::string_list")]
    tag_list: Vec<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    access_level: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    maximum_timeout: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    runner_type: Option<String>,
}

/// `POST /api/v4/runners`: registration with the registration token.
pub async fn register(
    State(state): State<AppState>,
    Params(p): Params<RegisterParams>,
) -> ApiResult<Response> {
    let token = required_token(p.token.clone())?;
    if token != state.settings().registration_token {
        return Err(ApiError::forbidden());
    }
    create_runner(&state, p)
}

/// `POST /api/v4/user/runners`: GitLab 16+'s way, an admin creates the
/// runner and hands its `glrt-` token to `gitlab-runner register --token`.
pub async fn create_user_runner(
    State(state): State<AppState>,
    _: Admin,
    Params(p): Params<RegisterParams>,
) -> ApiResult<Response> {
    match p.runner_type.as_deref() {
        Some("instance_type") => create_runner(&state, p),
        Some(_) => Err(ApiError::bad_request(
            "400 Bad request - fake-rails only has instance runners (runner_type=instance_type)",
        )),
        None => Err(ApiError::bad_request(
            "400 Bad request - runner_type is missing",
        )),
    }
}

fn create_runner(state: &AppState, p: RegisterParams) -> ApiResult<Response> {
    let access_level = p
        .access_level
        .unwrap_or_else(|| "not_protected".to_string());
    if access_level != "not_protected" && access_level != "ref_protected" {
        return Err(ApiError::bad_request(
            "400 Bad request - access_level does not have a valid value",
        ));
    }
    if matches!(p.maximum_timeout, Some(t) if t < 600) {
        return Err(ApiError::bad_request(
            "400 Bad request - maximum_timeout needs to be at least 10 minutes",
        ));
    }
    let run_untagged = p.run_untagged.unwrap_or(true);
    if !run_untagged && p.tag_list.is_empty() {
        return Err(ApiError::bad_request(
            "400 Bad request - tags_list can not be empty when runner is not allowed to pick untagged jobs",
        ));
    }
    let paused = p.paused.unwrap_or(!p.active.unwrap_or(true));
    let runner_token = crate::tokens::runner_token();
    let id = {
        let mut store = state.lock();
        let id = store.next_runner_id;
        store.next_runner_id += 1;
        store.runner_tokens.insert(runner_token.clone(), id);
        store.runners.insert(
            id,
            Runner {
                id,
                description: p.description.unwrap_or_default(),
                tags: p.tag_list,
                run_untagged,
                paused,
                locked: p.locked.unwrap_or(false),
                access_level,
                maximum_timeout: p.maximum_timeout,
                created_at: now(),
                contacted_at: None,
                info: p.info.unwrap_or(serde_json::Value::Null),
            },
        );
        id
    };
    tracing::debug!(runner_id = id, "Registered a runner");
    let body = runner_token_body(id, &runner_token);
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

#[derive(Debug, Deserialize)]
pub struct TokenParams {
    #[serde(default, deserialize_with = "lenient::opt_string")]
    token: Option<String>,
}

/// `POST /api/v4/runners/verify`.
pub async fn verify(
    State(state): State<AppState>,
    Params(p): Params<TokenParams>,
) -> ApiResult<Response> {
    let token = required_token(p.token)?;
    let mut store = state.lock();
    let id = store
        .runner_tokens
        .get(&token)
        .copied()
        .ok_or_else(ApiError::forbidden)?;
    if let Some(runner) = store.runners.get_mut(&id) {
        runner.contacted_at = Some(now());
    }
    Ok(Json(runner_token_body(id, &token)).into_response())
}

/// `DELETE /api/v4/runners`.
pub async fn unregister(
    State(state): State<AppState>,
    Params(p): Params<TokenParams>,
) -> ApiResult<StatusCode> {
    let token = required_token(p.token)?;
    let mut store = state.lock();
    let id = store
        .runner_tokens
        .remove(&token)
        .ok_or_else(ApiError::forbidden)?;
    store.runners.remove(&id);
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
pub struct JobRequestParams {
    #[serde(default, deserialize_with = "lenient::opt_string")]
    token: Option<String>,
    #[serde(default)]
    info: Option<serde_json::Value>,
}

/// `POST /api/v4/jobs/request`: 201 + a job, 204 when there is none, 403 on a bad token.
pub async fn request_job(
    State(state): State<AppState>,
    Params(p): Params<JobRequestParams>,
) -> ApiResult<Response> {
    let token = required_token(p.token)?;
    let settings = state.settings();
    let now = now();
    let (payload, export) = {
        let mut store = state.lock();
        let runner_id = store
            .runner_tokens
            .get(&token)
            .copied()
            .ok_or_else(ApiError::forbidden)?;
        if let Some(runner) = store.runners.get_mut(&runner_id) {
            runner.contacted_at = Some(now);
            if let Some(info) = p.info {
                runner.info = info;
            }
        }
        let Some(job_id) = store.pick_job(runner_id, now) else {
            let last_update = format!("{:x}", store.queue_version);
            drop(store);
            let mut response = StatusCode::NO_CONTENT.into_response();
            if let Ok(value) = HeaderValue::from_str(&last_update) {
                response.headers_mut().insert("x-gitlab-last-update", value);
            }
            return Ok(response);
        };
        let (project_id, root_id) = {
            let job = &store.jobs[&job_id];
            (
                job.project_id,
                store
                    .pipelines
                    .get(&job.pipeline_id)
                    .map(|p| p.root_id)
                    .unwrap_or_default(),
            )
        };
        let flag_on = store
            .features
            .get(CI_JOB_TELEMETRY)
            .is_some_and(|f| f.enabled_for_project(CI_JOB_TELEMETRY, project_id));
        let telemetry = flag_on && ids::pipeline_sampled(root_id, settings.sampling_rate);
        if let Some(job) = store.jobs.get_mut(&job_id) {
            job.telemetry = telemetry;
        }
        let trace = telemetry.then(|| TraceIds {
            trace_id: ids::trace_id(root_id),
            parent_span_id: ids::span_id(root_id, job_id, RailsSpan::Running),
        });
        let job = &store.jobs[&job_id];
        let payload =
            payload::build(&store, job, settings, trace.as_ref(), now).ok_or_else(|| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "500 Internal Server Error",
                )
            })?;
        let export = rails_spans_of(&store, job_id, vec![RailsSpan::Pending]);
        (payload, export)
    };
    state.export(export);
    tracing::debug!(
        job_id = payload.id,
        telemetry = payload.features.job_telemetry.is_some() || payload.features.tracing.is_some(),
        "Handed out a job"
    );
    Ok((StatusCode::CREATED, Json(payload)).into_response())
}

#[derive(Debug, Deserialize)]
pub struct UpdateParams {
    #[serde(default, deserialize_with = "lenient::opt_string")]
    token: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    state: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    failure_reason: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_i64")]
    exit_code: Option<i64>,
}

/// `PUT /api/v4/jobs/:id`: `running` (keep-alive), `success`, `failed`, `canceled`.
pub async fn update_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
    Params(p): Params<UpdateParams>,
) -> ApiResult<Response> {
    let id = super::parse_id(&id, "Job")?;
    let token = job_token(&headers, p.token.as_deref(), None)
        .ok_or_else(ApiError::forbidden)?
        .to_string();
    let now = now();
    let (status, export) = {
        let mut store = state.lock();
        let job = store
            .jobs
            .get(&id)
            .ok_or_else(|| ApiError::not_found("Job"))?;
        if job.token != token {
            return Err(ApiError::forbidden());
        }
        if job.status != JobStatus::Running {
            return Err(job_not_running(job.status));
        }
        let next = match p.state.as_deref() {
            None | Some("running") => None,
            Some("success") => Some(JobStatus::Success),
            Some("failed") => Some(JobStatus::Failed),
            Some("canceled") => Some(JobStatus::Canceled),
            Some(_) => {
                return Err(ApiError::bad_request(
                    "400 Bad request - state does not have a valid value",
                ))
            }
        };
        if let Some(reason) = &p.failure_reason {
            if !FAILURE_REASONS.contains(&reason.as_str()) {
                return Err(ApiError::bad_request(
                    "400 Bad request - failure_reason does not have a valid value",
                ));
            }
        }
        match next {
            None => (JobStatus::Running, None),
            Some(status) => {
                store.finish_job(id, status, p.failure_reason, p.exit_code, now);
                let export = ended_job_spans(&store, id);
                (status, export)
            }
        }
    };
    state.export(export);
    if status != JobStatus::Running {
        tracing::debug!(job_id = id, status = %status.as_str(), "Job finished");
    }
    Ok(Json(serde_json::json!({"id": id, "status": status.as_str()})).into_response())
}

/// `PATCH /api/v4/jobs/:id/trace`: appends to the log at the offset `Content-Range` names.
pub async fn patch_trace(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
    QueryPairs(query): QueryPairs,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let id = super::parse_id(&id, "Job")?;
    let token = job_token(&headers, None, query.get("token").map(String::as_str))
        .unwrap_or_default()
        .to_string();
    let mut store = state.lock();
    let job = store
        .jobs
        .get_mut(&id)
        .ok_or_else(|| ApiError::not_found("Job"))?;
    if token.is_empty() || job.token != token {
        return Err(ApiError::forbidden());
    }
    if job.status != JobStatus::Running {
        return Err(job_not_running(job.status));
    }
    let range = super::header(&headers, "content-range")
        .ok_or_else(|| ApiError::bad_request("400 Missing header Content-Range"))?;
    let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let start = range
        .trim_start_matches("bytes ")
        .split_once('-')
        .and_then(|(start, end)| {
            Some((
                start.trim().parse::<usize>().ok()?,
                end.trim().parse::<usize>().ok()?,
            ))
        })
        .map(|(start, _end)| start)
        .ok_or_else(|| {
            ApiError::bad_request("400 Bad request - Content-Range should be `<start>-<end>`")
        })?;
    let size = job.trace.len();
    if start != size {
        return Err(ApiError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "416 Range Not Satisfiable",
        )
        .with_header(header::RANGE, format!("0-{size}")));
    }
    if size + body.len() > MAX_TRACE_BYTES {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "413 Request Entity Too Large - the job log is too large",
        ));
    }
    job.trace.extend_from_slice(&body);
    let size = job.trace.len();
    drop(store);
    let mut response = StatusCode::ACCEPTED.into_response();
    let h = response.headers_mut();
    h.insert(JOB_STATUS.clone(), HeaderValue::from_static("running"));
    if let Ok(v) = HeaderValue::from_str(&format!("0-{size}")) {
        h.insert(header::RANGE, v);
    }
    h.insert(
        "x-gitlab-trace-update-interval",
        HeaderValue::from_static(TRACE_UPDATE_INTERVAL),
    );
    Ok(response)
}

/// `POST /api/v4/jobs/:id/artifacts`: multipart with a `file` part.
pub async fn upload_artifacts(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
    QueryPairs(query): QueryPairs,
    multipart: Result<Multipart, MultipartRejection>,
) -> ApiResult<Response> {
    let id = super::parse_id(&id, "Job")?;
    let header_token =
        job_token(&headers, None, query.get("token").map(String::as_str)).map(str::to_string);
    let check = |store: &Store, token: &str| -> ApiResult<()> {
        let job = store
            .jobs
            .get(&id)
            .ok_or_else(|| ApiError::not_found("Job"))?;
        if job.token != token {
            return Err(ApiError::forbidden());
        }
        if job.status != JobStatus::Running {
            return Err(job_not_running(job.status));
        }
        Ok(())
    };
    if let Some(token) = &header_token {
        check(&state.lock(), token)?;
    }
    let mut multipart = multipart.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let mut fields = std::collections::HashMap::new();
    let mut file: Option<(String, Bytes)> = None;
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|e| ApiError::new(e.status(), e.body_text()))?
    {
        let name = field.name().unwrap_or_default().to_string();
        if name == "file" {
            let filename = field.file_name().unwrap_or("artifacts.zip").to_string();
            let data = field
                .bytes()
                .await
                .map_err(|e| ApiError::new(e.status(), e.body_text()))?;
            file = Some((filename, data));
        } else {
            let text = field
                .text()
                .await
                .map_err(|e| ApiError::new(e.status(), e.body_text()))?;
            fields.insert(name, text);
        }
    }
    let param = |key: &str| {
        query
            .get(key)
            .or_else(|| fields.get(key))
            .filter(|v| !v.is_empty())
            .cloned()
    };
    let token = header_token
        .or_else(|| fields.get("token").cloned())
        .ok_or_else(ApiError::forbidden)?;
    let (filename, data) =
        file.ok_or_else(|| ApiError::bad_request("400 Bad request - file is missing"))?;
    let artifact_type = param("artifact_type").unwrap_or_else(|| "archive".to_string());
    if artifact_type.is_empty()
        || !artifact_type
            .chars()
            .all(|c| c.is_ascii_lowercase() || c == '_')
    {
        return Err(ApiError::bad_request(
            "400 Bad request - artifact_type does not have a valid value",
        ));
    }
    let artifact_format = param("artifact_format").unwrap_or_else(|| "zip".to_string());
    if !ARTIFACT_FORMATS.contains(&artifact_format.as_str()) {
        return Err(ApiError::bad_request(
            "400 Bad request - artifact_format does not have a valid value",
        ));
    }
    let expire_in = param("expire_in");
    if let Some(expire) = &expire_in {
        if expire != "never" && crate::ci_config::parse_duration(expire).is_none() {
            return Err(ApiError::bad_request(
                "400 Bad request - expire_in is not a duration",
            ));
        }
    }
    let size = data.len();
    let expire_at = expire_in
        .as_deref()
        .and_then(crate::ci_config::parse_duration)
        .map(|secs| now() + std::time::Duration::from_secs(secs));
    {
        let mut store = state.lock();
        check(&store, &token)?;
        let job = store
            .jobs
            .get_mut(&id)
            .ok_or_else(|| ApiError::not_found("Job"))?;
        if job
            .artifacts
            .iter()
            .any(|a| a.artifact_type == artifact_type)
        {
            return Err(ApiError::bad_request(
                "400 Bad request - another artifact of the same type already exists",
            ));
        }
        job.artifacts.push(StoredArtifact {
            artifact_type: artifact_type.clone(),
            artifact_format,
            filename: filename.clone(),
            expire_at,
            data,
        });
    }
    let body = serde_json::json!({"id": id, "artifact_type": artifact_type, "filename": filename, "size": size});
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

pub(crate) fn artifact_response(artifact: &StoredArtifact) -> Response {
    let disposition = format!(
        "attachment; filename=\"{}\"",
        artifact.filename.replace('"', "")
    );
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        artifact.data.clone(),
    )
        .into_response()
}

/// `GET /api/v4/jobs/:id/artifacts` with the `JOB-TOKEN` of a running job of the same project.
pub async fn download_artifacts(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
    QueryPairs(query): QueryPairs,
) -> ApiResult<Response> {
    let id = super::parse_id(&id, "Job")?;
    let token = job_token(&headers, None, query.get("job_token").map(String::as_str))
        .ok_or_else(ApiError::unauthorized)?;
    let store = state.lock();
    let requester = store
        .job_tokens
        .get(token)
        .and_then(|jid| store.jobs.get(jid))
        .filter(|j| j.status == JobStatus::Running)
        .ok_or_else(ApiError::unauthorized)?;
    let job = store
        .jobs
        .get(&id)
        .ok_or_else(|| ApiError::not_found("Job"))?;
    if job.project_id != requester.project_id {
        return Err(ApiError::forbidden());
    }
    let artifact = job
        .archive()
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "404 Not Found"))?;
    Ok(artifact_response(artifact))
}

/// `GET /api/v4/job`: the job a running job's token belongs to.
pub async fn current_job(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    QueryPairs(query): QueryPairs,
) -> ApiResult<Response> {
    let token = job_token(&headers, None, query.get("job_token").map(String::as_str))
        .ok_or_else(ApiError::unauthorized)?;
    let store = state.lock();
    let job = store
        .job_tokens
        .get(token)
        .and_then(|id| store.jobs.get(id))
        .filter(|j| j.status == JobStatus::Running)
        .ok_or_else(ApiError::unauthorized)?;
    Ok(Json(super::entities::job(job, &store, state.settings(), now())).into_response())
}
