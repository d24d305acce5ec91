//! A job's and a pipeline's telemetry, read back from ClickHouse: the API
//! (`GET /api/v4/projects/:id/jobs/:job_id/telemetry`,
//! `GET /api/v4/projects/:id/pipelines/:pipeline_id/telemetry`) and the pages
//! (`/:namespace/:project/-/jobs/:id/telemetry`,
//! `/:namespace/:project/-/pipelines/:id/telemetry`).
//!
//! Authorised like GitLab's job API: the admin token (`PRIVATE-TOKEN`,
//! `Authorization: Bearer` or `private_token=`) reads everything; a job token
//! (`JOB-TOKEN` or `job_token=`) reads its own job, and the pipeline that job
//! belongs to. A job without telemetry is a 404 whose `reason` says why;
//! without `--clickhouse-url` every endpoint is a 503.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use super::{header, QueryPairs};
use crate::app::AppState;
use crate::ids;
use crate::pages;
use crate::state::{Job, JobStatus, Store};
use crate::telemetry::{self, JobSummary, PipelineSummary, QueryError, Reader, NOT_ARRIVED};

/// The state of these routes: the app and the ClickHouse reader (or why
/// there is none).
#[derive(Clone)]
pub struct TelemetryState {
    app: AppState,
    reader: Result<Reader, String>,
}

/// The routes, with their own state built from the app's settings.
pub fn routes<S: Clone + Send + Sync + 'static>(app: AppState) -> Router<S> {
    let reader = match &app.settings().clickhouse {
        Some(settings) => Reader::new(settings).map_err(|e| {
            tracing::error!("Telemetry pages and API are unavailable: {e}");
            format!("503 Service Unavailable - {e}")
        }),
        None => Err(
            "503 Service Unavailable - ClickHouse is not configured (start fake-rails with --clickhouse-url)"
                .to_string(),
        ),
    };
    let mut router = Router::new()
        .route(
            "/api/v4/projects/{project}/jobs/{job}/telemetry",
            get(job_api),
        )
        .route(
            "/api/v4/projects/{project}/pipelines/{pipeline}/telemetry",
            get(pipeline_api),
        );
    // GitLab's page URLs: `/<namespace path>/<project>/-/...`, namespaces
    // nested up to three levels here.
    for depth in 2..=4 {
        let prefix: String = (0..depth).map(|i| format!("/{{p{i}}}")).collect();
        router = router
            .route(&format!("{prefix}/-/jobs/{{job}}/telemetry"), get(job_page))
            .route(
                &format!("{prefix}/-/pipelines/{{pipeline}}/telemetry"),
                get(pipeline_page),
            );
    }
    router.with_state(TelemetryState { app, reader })
}

/// Why a request got no telemetry.
#[derive(Debug)]
pub struct TelemetryError {
    pub status: StatusCode,
    pub message: String,
    /// For 404s: `not_run`, `flag_off`, `sampled_out`, `not_arrived`.
    pub reason: Option<&'static str>,
}

impl TelemetryError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        TelemetryError {
            status,
            message: message.into(),
            reason: None,
        }
    }

    fn missing(reason: Reason) -> Self {
        TelemetryError {
            status: StatusCode::NOT_FOUND,
            message: format!("404 Telemetry Not Found - {}", reason.text()),
            reason: Some(reason.code()),
        }
    }
}

impl From<QueryError> for TelemetryError {
    fn from(e: QueryError) -> Self {
        tracing::warn!("Telemetry lookup failed: {e}");
        TelemetryError::new(StatusCode::BAD_GATEWAY, format!("502 Bad Gateway - {e}"))
    }
}

impl IntoResponse for TelemetryError {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({ "message": self.message });
        if let Some(reason) = self.reason {
            body["reason"] = reason.into();
        }
        (self.status, Json(body)).into_response()
    }
}

type TelemetryResult<T> = Result<T, TelemetryError>;

/// Why a job has no telemetry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    NotRun,
    FlagOff,
    SampledOut,
    NotArrived,
}

impl Reason {
    fn code(self) -> &'static str {
        match self {
            Reason::NotRun => "not_run",
            Reason::FlagOff => "flag_off",
            Reason::SampledOut => "sampled_out",
            Reason::NotArrived => "not_arrived",
        }
    }

    fn text(self) -> &'static str {
        match self {
            Reason::NotRun => "the job has not run yet",
            Reason::FlagOff => "the ci_job_telemetry feature flag was off for the project",
            Reason::SampledOut => "the pipeline was sampled out",
            Reason::NotArrived => NOT_ARRIVED,
        }
    }
}

/// Who is asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    Admin,
    /// The holder of this job's token.
    Job(u64),
}

fn authenticate(
    state: &AppState,
    store: &Store,
    headers: &HeaderMap,
    query: &QueryPairs,
) -> TelemetryResult<Caller> {
    let private = header(headers, "private-token")
        .or_else(|| {
            header(headers, "authorization").and_then(|v| v.strip_prefix("Bearer ").map(str::trim))
        })
        .or_else(|| query.0.get("private_token").map(String::as_str));
    if let Some(token) = private {
        return if token == state.settings().admin_token {
            Ok(Caller::Admin)
        } else {
            Err(TelemetryError::new(
                StatusCode::UNAUTHORIZED,
                "401 Unauthorized",
            ))
        };
    }
    let job_token =
        header(headers, "job-token").or_else(|| query.0.get("job_token").map(String::as_str));
    match job_token.and_then(|t| store.job_tokens.get(t)) {
        Some(&job) => Ok(Caller::Job(job)),
        None => Err(TelemetryError::new(
            StatusCode::UNAUTHORIZED,
            "401 Unauthorized",
        )),
    }
}

fn forbidden(why: &str) -> TelemetryError {
    TelemetryError::new(StatusCode::FORBIDDEN, format!("403 Forbidden - {why}"))
}

fn not_found(what: &str) -> TelemetryError {
    TelemetryError::new(StatusCode::NOT_FOUND, format!("404 {what} Not Found"))
}

fn job_summary(job: &Job, store: &Store, state: &AppState) -> JobSummary {
    let full_path = store
        .projects
        .get(&job.project_id)
        .map(|p| p.full_path())
        .unwrap_or_default();
    JobSummary {
        id: job.id,
        name: job.spec.name.clone(),
        stage: job.spec.stage.clone(),
        status: job.status.as_str().to_string(),
        pipeline_id: job.pipeline_id,
        project_id: job.project_id,
        web_url: format!(
            "{}/{full_path}/-/jobs/{}",
            state.settings().public_url,
            job.id
        ),
    }
}

/// Why `job` has no telemetry from Rails' point of view (`None`: it should
/// have some).
fn rails_reason(job: &Job, store: &Store, state: &AppState) -> Option<Reason> {
    if job.telemetry {
        return None;
    }
    if job.runner_id.is_none() {
        return Some(Reason::NotRun);
    }
    let root = store
        .pipelines
        .get(&job.pipeline_id)
        .map(|p| p.root_id)
        .unwrap_or(job.pipeline_id);
    if !ids::pipeline_sampled(root, state.settings().sampling_rate) {
        return Some(Reason::SampledOut);
    }
    Some(Reason::FlagOff)
}

/// What a job lookup needs from the store, copied out under the lock.
struct JobLookup {
    summary: JobSummary,
    trace_id: String,
    missing: Option<Reason>,
    finished: bool,
}

fn find_job(
    state: &AppState,
    headers: &HeaderMap,
    query: &QueryPairs,
    project: &str,
    job: &str,
) -> TelemetryResult<JobLookup> {
    let store = state.lock();
    let caller = authenticate(state, &store, headers, query)?;
    let project = store
        .project_by_ref(project)
        .ok_or_else(|| not_found("Project"))?;
    let job = job
        .parse::<u64>()
        .ok()
        .and_then(|id| store.jobs.get(&id))
        .filter(|j| j.project_id == project.id)
        .ok_or_else(|| not_found("Job"))?;
    if let Caller::Job(own) = caller {
        if own != job.id {
            return Err(forbidden("a job token reads only its own job's telemetry"));
        }
    }
    let root = store
        .pipelines
        .get(&job.pipeline_id)
        .map(|p| p.root_id)
        .unwrap_or(job.pipeline_id);
    Ok(JobLookup {
        summary: job_summary(job, &store, state),
        trace_id: ids::trace_id(root),
        missing: rails_reason(job, &store, state),
        finished: !matches!(
            job.status,
            JobStatus::Created | JobStatus::Pending | JobStatus::Running | JobStatus::Manual
        ),
    })
}

async fn load_job(
    ts: &TelemetryState,
    headers: &HeaderMap,
    query: &QueryPairs,
    project: &str,
    job: &str,
) -> TelemetryResult<telemetry::JobTelemetry> {
    let lookup = find_job(&ts.app, headers, query, project, job)?;
    let reader = ts
        .reader
        .as_ref()
        .map_err(|e| TelemetryError::new(StatusCode::SERVICE_UNAVAILABLE, e.clone()))?;
    if let Some(reason) = lookup.missing {
        return Err(TelemetryError::missing(reason));
    }
    let Some(bounds) = reader.trace_bounds(&lookup.trace_id).await? else {
        return Err(TelemetryError::missing(Reason::NotArrived));
    };
    let spans = reader
        .job_spans(&lookup.trace_id, bounds, lookup.summary.id)
        .await?;
    if spans.is_empty() {
        return Err(TelemetryError::missing(Reason::NotArrived));
    }
    let span_ids: Vec<String> = spans.iter().map(|s| s.span_id.clone()).collect();
    let first = spans.iter().map(|s| s.start_ns).min().unwrap_or_default();
    let last = spans
        .iter()
        .map(|s| s.start_ns.saturating_add(s.duration_ns as i64))
        .max()
        .unwrap_or_default();
    let to_s = |ns: i64| u32::try_from(ns.div_euclid(1_000_000_000)).unwrap_or(u32::MAX);
    let logs = reader
        .job_logs(
            &lookup.trace_id,
            lookup.summary.id,
            &span_ids,
            to_s(first),
            // A job that still runs logs past its last span's end.
            if lookup.finished {
                to_s(last).saturating_add(1)
            } else {
                u32::MAX
            },
        )
        .await?;
    telemetry::job_telemetry(lookup.summary, &lookup.trace_id, &spans, &logs)
        .ok_or_else(|| TelemetryError::missing(Reason::NotArrived))
}

struct PipelineLookup {
    summary: PipelineSummary,
    trace_id: String,
    jobs: Vec<(JobSummary, Option<Reason>)>,
}

fn find_pipeline(
    state: &AppState,
    headers: &HeaderMap,
    query: &QueryPairs,
    project: &str,
    pipeline: &str,
) -> TelemetryResult<PipelineLookup> {
    let store = state.lock();
    let caller = authenticate(state, &store, headers, query)?;
    let project = store
        .project_by_ref(project)
        .ok_or_else(|| not_found("Project"))?;
    let pipeline = pipeline
        .parse::<u64>()
        .ok()
        .and_then(|id| store.pipelines.get(&id))
        .filter(|p| p.project_id == project.id)
        .ok_or_else(|| not_found("Pipeline"))?;
    if let Caller::Job(own) = caller {
        if !pipeline.job_ids.contains(&own) {
            return Err(forbidden(
                "a job token reads only the telemetry of its own pipeline",
            ));
        }
    }
    let mut jobs: Vec<&Job> = pipeline
        .job_ids
        .iter()
        .filter_map(|id| store.jobs.get(id))
        .collect();
    jobs.sort_by_key(|j| (j.spec.stage_idx, j.id));
    Ok(PipelineLookup {
        summary: PipelineSummary {
            id: pipeline.id,
            project_id: pipeline.project_id,
            status: pipeline.status.to_string(),
            git_ref: pipeline.git_ref.clone(),
            web_url: format!(
                "{}/{}/-/pipelines/{}",
                state.settings().public_url,
                project.full_path(),
                pipeline.id
            ),
        },
        trace_id: ids::trace_id(pipeline.root_id),
        jobs: jobs
            .into_iter()
            .map(|j| {
                (
                    job_summary(j, &store, state),
                    rails_reason(j, &store, state),
                )
            })
            .collect(),
    })
}

async fn load_pipeline(
    ts: &TelemetryState,
    headers: &HeaderMap,
    query: &QueryPairs,
    project: &str,
    pipeline: &str,
) -> TelemetryResult<telemetry::PipelineTelemetry> {
    let lookup = find_pipeline(&ts.app, headers, query, project, pipeline)?;
    let reader = ts
        .reader
        .as_ref()
        .map_err(|e| TelemetryError::new(StatusCode::SERVICE_UNAVAILABLE, e.clone()))?;
    // With no job expected to have telemetry, say why (the first job's reason).
    let expected = lookup.jobs.iter().any(|(_, r)| r.is_none());
    if !expected {
        let reason = lookup
            .jobs
            .iter()
            .filter_map(|(_, r)| *r)
            .find(|r| *r != Reason::NotRun)
            .unwrap_or(Reason::NotRun);
        return Err(TelemetryError::missing(reason));
    }
    let Some(bounds) = reader.trace_bounds(&lookup.trace_id).await? else {
        return Err(TelemetryError::missing(Reason::NotArrived));
    };
    let spans = reader
        .pipeline_spans(&lookup.trace_id, bounds, lookup.summary.id)
        .await?;
    let jobs = lookup
        .jobs
        .into_iter()
        .map(|(job, reason)| (job, reason.map(|r| r.text().to_string())))
        .collect();
    telemetry::pipeline_telemetry(lookup.summary, &lookup.trace_id, jobs, &spans)
        .ok_or_else(|| TelemetryError::missing(Reason::NotArrived))
}

/// `GET /api/v4/projects/:id/jobs/:job_id/telemetry`.
async fn job_api(
    State(ts): State<TelemetryState>,
    headers: HeaderMap,
    query: QueryPairs,
    Path((project, job)): Path<(String, String)>,
) -> TelemetryResult<Response> {
    let body = load_job(&ts, &headers, &query, &project, &job).await?;
    Ok(Json(body).into_response())
}

/// `GET /api/v4/projects/:id/pipelines/:pipeline_id/telemetry`.
async fn pipeline_api(
    State(ts): State<TelemetryState>,
    headers: HeaderMap,
    query: QueryPairs,
    Path((project, pipeline)): Path<(String, String)>,
) -> TelemetryResult<Response> {
    let body = load_pipeline(&ts, &headers, &query, &project, &pipeline).await?;
    Ok(Json(body).into_response())
}

/// The project path and the last id of a page URL's segments.
fn page_target(params: Vec<(String, String)>) -> (String, String) {
    let mut path = Vec::new();
    let mut id = String::new();
    for (name, value) in params {
        let is_path = name
            .strip_prefix('p')
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if is_path {
            path.push(value);
        } else {
            id = value;
        }
    }
    (path.join("/"), id)
}

fn error_page(e: TelemetryError) -> Response {
    let html = pages::error(e.status.as_u16(), &e.message);
    (e.status, Html(html)).into_response()
}

/// `/:namespace/:project/-/jobs/:id/telemetry`.
async fn job_page(
    State(ts): State<TelemetryState>,
    headers: HeaderMap,
    query: QueryPairs,
    Path(params): Path<Vec<(String, String)>>,
) -> Response {
    let (project, job) = page_target(params);
    match load_job(&ts, &headers, &query, &project, &job).await {
        Ok(t) => {
            let pipeline_url = page_link(
                &format!(
                    "{}/{project}/-/pipelines/{}/telemetry",
                    ts.app.settings().public_url,
                    t.job.pipeline_id
                ),
                &query,
            );
            Html(pages::job(&t, &pipeline_url)).into_response()
        }
        Err(e) => error_page(e),
    }
}

/// `/:namespace/:project/-/pipelines/:id/telemetry`.
async fn pipeline_page(
    State(ts): State<TelemetryState>,
    headers: HeaderMap,
    query: QueryPairs,
    Path(params): Path<Vec<(String, String)>>,
) -> Response {
    let (project, pipeline) = page_target(params);
    match load_pipeline(&ts, &headers, &query, &project, &pipeline).await {
        Ok(t) => {
            let links: Vec<String> = t
                .jobs
                .iter()
                .map(|j| page_link(&format!("{}/telemetry", j.web_url), &query))
                .collect();
            Html(pages::pipeline(&t, &links)).into_response()
        }
        Err(e) => error_page(e),
    }
}

/// A link to another page keeping the token the page was opened with.
fn page_link(url: &str, query: &QueryPairs) -> String {
    let token = query
        .0
        .get("private_token")
        .map(|t| ("private_token", t))
        .or_else(|| query.0.get("job_token").map(|t| ("job_token", t)));
    match token {
        Some((name, value)) => {
            let encoded: String = url::form_urlencoded::Serializer::new(String::new())
                .append_pair(name, value)
                .finish();
            format!("{url}?{encoded}")
        }
        None => url.to_string(),
    }
}
