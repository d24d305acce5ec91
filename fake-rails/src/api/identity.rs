//! Workload identity: the OIDC discovery document, the JWKS, a
//! GCP-metadata-compatible ID token endpoint, and the telemetry gateway's
//! token check.

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use super::{lenient, ApiError, ApiResult, Params, QueryPairs};
use crate::app::AppState;
use crate::app_state::now;
use crate::ids;
use crate::state::JobStatus;

/// The OIDC issuer, the GCP-metadata-style ID tokens and the telemetry
/// token exchange.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/.well-known/openid-configuration",
            get(openid_configuration),
        )
        .route("/oauth/discovery/keys", get(jwks))
        .route(
            "/computeMetadata/v1/instance/service-accounts/default/identity",
            get(gcp_identity),
        )
        .route("/api/v4/internal/ci/telemetry/auth", post(telemetry_auth))
}

/// `Cache-Control: max-age` when a job's remaining time is unknown.
pub const DEFAULT_AUTH_MAX_AGE: u64 = 300;
/// The subject of ID tokens: the runner manager's (only) service account.
pub const SERVICE_ACCOUNT: &str = "runner-manager@fake-rails.iam.gserviceaccount.com";

/// `GET /.well-known/openid-configuration`.
pub async fn openid_configuration(State(state): State<AppState>) -> Json<serde_json::Value> {
    let base = &state.settings().public_url;
    Json(serde_json::json!({
        "issuer": base,
        "authorization_endpoint": format!("{base}/oauth/authorize"),
        "token_endpoint": format!("{base}/oauth/token"),
        "userinfo_endpoint": format!("{base}/oauth/userinfo"),
        "jwks_uri": format!("{base}/oauth/discovery/keys"),
        "response_types_supported": ["code", "id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "scopes_supported": ["openid"],
        "claims_supported": ["iss", "sub", "aud", "exp", "iat", "azp", "email", "email_verified"],
    }))
}

/// `GET /oauth/discovery/keys`.
pub async fn jwks(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(state.identity().jwks())
}

/// `GET /computeMetadata/v1/instance/service-accounts/default/identity?audience=...`
/// (needs `Metadata-Flavor: Google`, like the GCE metadata server).
pub async fn gcp_identity(
    State(state): State<AppState>,
    headers: HeaderMap,
    QueryPairs(query): QueryPairs,
) -> ApiResult<Response> {
    if super::header(&headers, "metadata-flavor") != Some("Google") {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "Missing Metadata-Flavor:Google header",
        ));
    }
    let audience = query
        .get("audience")
        .filter(|a| !a.is_empty())
        .ok_or_else(|| ApiError::bad_request("non-empty audience parameter required"))?
        .clone();
    let settings = state.settings();
    let iat = now().unix_timestamp();
    let mut claims = serde_json::json!({
        "iss": settings.public_url,
        "aud": audience,
        "sub": SERVICE_ACCOUNT,
        "azp": SERVICE_ACCOUNT,
        "iat": iat,
        "exp": iat + settings.id_token_ttl.as_secs() as i64,
    });
    if query.get("format").map(String::as_str) == Some("full") {
        claims["email"] = serde_json::json!(SERVICE_ACCOUNT);
        claims["email_verified"] = serde_json::json!(true);
    }
    // RSA signing is slow in debug builds: keep it off the async workers.
    let key = state.identity().clone();
    let token = tokio::task::spawn_blocking(move || key.sign(&claims))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "500 Internal Server Error",
            )
        })?;
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/text"),
            (header::HeaderName::from_static("metadata-flavor"), "Google"),
        ],
        token,
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
pub struct TelemetryAuthParams {
    #[serde(default, deserialize_with = "lenient::opt_string")]
    runner_token: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    job_token: Option<String>,
}

/// `POST /api/v4/internal/ci/telemetry/auth`: runner and job tokens in (JSON
/// body, or `Runner-Token` and `Job-Token` headers), `{trace_id}` out with
/// `Cache-Control: max-age=<seconds left of the job's timeout>`.
pub async fn telemetry_auth(
    State(state): State<AppState>,
    headers: HeaderMap,
    Params(p): Params<TelemetryAuthParams>,
) -> ApiResult<Response> {
    let runner_token = p
        .runner_token
        .or_else(|| super::header(&headers, "runner-token").map(str::to_string));
    let job_token = p
        .job_token
        .or_else(|| super::header(&headers, "job-token").map(str::to_string));
    let (Some(runner_token), Some(job_token)) = (runner_token, job_token) else {
        return Err(ApiError::unauthorized());
    };
    let now = now();
    let store = state.lock();
    let runner_id = store
        .runner_tokens
        .get(&runner_token)
        .copied()
        .ok_or_else(ApiError::unauthorized)?;
    let job = store
        .job_tokens
        .get(&job_token)
        .and_then(|id| store.jobs.get(id))
        .ok_or_else(ApiError::unauthorized)?;
    if job.runner_id != Some(runner_id) {
        return Err(ApiError::forbidden_because(
            "the job is not assigned to this runner",
        ));
    }
    if job.status != JobStatus::Running {
        return Err(ApiError::forbidden_because("the job is not running"));
    }
    if !job.telemetry {
        return Err(ApiError::forbidden_because(
            "CI job telemetry is disabled for this job",
        ));
    }
    let pipeline = store
        .pipelines
        .get(&job.pipeline_id)
        .ok_or_else(|| ApiError::not_found("Pipeline"))?;
    let project = store
        .projects
        .get(&job.project_id)
        .ok_or_else(|| ApiError::not_found("Project"))?;
    let runner = store.runners.get(&runner_id);
    let max_age = match job.started_at {
        Some(started) => {
            let timeout = crate::payload::job_timeout(job, project, runner) as i64;
            let elapsed = (now - started).whole_seconds();
            (timeout - elapsed).max(0) as u64
        }
        None => DEFAULT_AUTH_MAX_AGE,
    };
    let trace_id = ids::trace_id(pipeline.root_id);
    drop(store);
    Ok((
        StatusCode::OK,
        [(header::CACHE_CONTROL, format!("max-age={max_age}"))],
        Json(serde_json::json!({ "trace_id": trace_id })),
    )
        .into_response())
}
