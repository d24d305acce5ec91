//! A client for the GitLab job API as GitLab Runner uses it
//! (`network/gitlab.go`): register/verify the runner, request jobs, update
//! their state and append to their log.
//!
//! Tokens go in bodies or headers, never in a log line or an error message.

use std::time::Duration;

use reqwest::StatusCode;
use serde::Serialize;
use serde_json::{json, Value};

/// Timeout of one API request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout of one `PATCH .../trace` or `PUT /jobs/:id`: a request that hangs
/// is cut short and retried rather than waited out (GitLab answers these in
/// milliseconds; the largest PATCH body is 1 MiB).
pub const UPDATE_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest `Retry-After` honoured (a larger one is capped, so a broken
/// proxy cannot park a job's final status for hours).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// What went wrong talking to GitLab, in one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("403 Forbidden")]
    Forbidden,
    #[error("HTTP {0}")]
    Status(u16),
    /// 429 or 5xx with a `Retry-After` (seconds), capped at [`MAX_RETRY_AFTER`].
    #[error("HTTP {status} (Retry-After {secs}s)", status = .0, secs = .1.as_secs())]
    RetryAfter(u16, Duration),
    #[error("network error: {0}")]
    Network(String),
    #[error("invalid response: {0}")]
    InvalidResponse(String),
}

impl ApiError {
    /// Worth retrying: network errors and 5xx.
    pub fn is_transient(&self) -> bool {
        match self {
            ApiError::Network(_) => true,
            ApiError::Status(code) => *code >= 500 || *code == 429,
            ApiError::RetryAfter(..) => true,
            _ => false,
        }
    }

    /// The wait GitLab asked for, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::RetryAfter(_, wait) => Some(*wait),
            _ => None,
        }
    }
}

/// `Retry-After` in seconds (the form GitLab and its proxies send), capped at
/// [`MAX_RETRY_AFTER`]; an HTTP date or garbage counts as absent.
pub fn parse_retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    let secs: u64 = value.trim().parse().ok()?;
    Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER))
}

/// The error for an unexpected status, with its `Retry-After` when it has one.
fn status_error(response: &reqwest::Response) -> ApiError {
    let status = response.status().as_u16();
    match parse_retry_after(response.headers()) {
        Some(wait) if status == 429 || status >= 500 => ApiError::RetryAfter(status, wait),
        _ => ApiError::Status(status),
    }
}

fn network(e: reqwest::Error) -> ApiError {
    // reqwest errors may carry the URL; ours never carry tokens (they go in
    // bodies and headers), and `without_url` drops it anyway.
    ApiError::Network(e.without_url().to_string())
}

/// Answer to `POST /api/v4/jobs/request`.
#[derive(Debug, Clone, PartialEq)]
pub enum JobRequest {
    /// 201: a job (raw JSON, parsed later so a bad payload can be reported).
    Job(Value),
    /// 204: nothing to do; `X-GitLab-Last-Update` to send next time.
    NoJob { last_update: Option<String> },
}

/// Answer to `PUT /api/v4/jobs/:id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateResult {
    /// 200.
    Accepted,
    /// 202: accepted but not complete (GitLab still processing the trace).
    Pending,
    /// 403/404/412...: the job is gone or no longer ours; do not retry.
    Rejected(u16),
}

/// Answer to `PATCH /api/v4/jobs/:id/trace`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatchResult {
    pub status: u16,
    /// The end of the `Range: 0-N` header: the size GitLab has.
    pub remote_size: Option<usize>,
    /// The `Job-Status` header (`running`, `canceling`, `canceled`, ...).
    pub job_status: Option<String>,
    /// `Retry-After`, when GitLab asked to wait.
    pub retry_after: Option<Duration>,
}

/// Body of `PUT /api/v4/jobs/:id`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UpdateJob {
    #[serde(skip)]
    pub job_id: i64,
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    pub output: JobOutput,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobOutput {
    /// `crc32:<8 hex>` of the log as sent.
    pub checksum: String,
    pub bytesize: usize,
}

/// An artifact archive to upload.
#[derive(Clone, PartialEq, Eq)]
pub struct ArtifactUpload {
    /// `artifacts.zip`, `junit.xml.gz`, ...
    pub file_name: String,
    pub artifact_type: String,
    pub artifact_format: String,
    pub expire_in: Option<String>,
    pub data: bytes::Bytes,
}

impl std::fmt::Debug for ArtifactUpload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArtifactUpload")
            .field("file_name", &self.file_name)
            .field("artifact_type", &self.artifact_type)
            .field("artifact_format", &self.artifact_format)
            .field("bytes", &self.data.len())
            .finish()
    }
}

/// The runner's self-description sent with registration and job requests.
pub fn runner_info(name: &str, executor: &str, shell: &str, telemetry: bool) -> Value {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    };
    json!({
        "name": name,
        "version": env!("CARGO_PKG_VERSION"),
        "revision": option_env!("CI_RUNNER_REVISION").unwrap_or("unknown"),
        "platform": std::env::consts::OS,
        "architecture": arch,
        "executor": executor,
        "shell": shell,
        "features": {
            "variables": true,
            "image": false,
            "services": false,
            "artifacts": true,
            "cache": true,
            "shared": true,
            "upload_multiple_artifacts": false,
            "upload_raw_artifacts": false,
            "session": false,
            "terminal": false,
            "refspecs": true,
            "masking": true,
            "proxy": false,
            "raw_variables": true,
            "artifacts_exclude": false,
            "multi_build_steps": true,
            "trace_reset": true,
            "trace_checksum": true,
            "trace_size": true,
            "vault_secrets": false,
            "cancelable": true,
            "return_exit_code": true,
            "service_variables": false,
            "job_telemetry": telemetry,
            "tracing": telemetry,
        },
        "config": {},
    })
}

/// A GitLab instance's job API.
#[derive(Debug, Clone)]
pub struct GitLabClient {
    /// `<url>/api/v4/`
    api: url::Url,
    http: reqwest::Client,
}

impl GitLabClient {
    /// `url` is GitLab's root (`https://gitlab.example.com`).
    pub fn new(url: &str) -> Result<Self, String> {
        let shown = runner_telemetry::secrets::strip_credentials(url);
        let mut base =
            url::Url::parse(url.trim()).map_err(|e| format!("invalid URL `{shown}`: {e}"))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(format!(
                "invalid URL `{shown}`: expected http:// or https://"
            ));
        }
        let path = format!("{}/api/v4/", base.path().trim_end_matches('/'));
        base.set_path(&path);
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(10))
            .user_agent(format!("ci-runner {}", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(GitLabClient { api: base, http })
    }

    fn url(&self, path: &str) -> url::Url {
        self.api
            .join(path)
            .expect("API paths are valid relative URLs")
    }

    /// `POST /api/v4/runners`: registers a runner; returns `(id, token)`.
    pub async fn register(
        &self,
        registration_token: &str,
        description: &str,
        info: Value,
    ) -> Result<(Option<i64>, String), ApiError> {
        let body = json!({
            "token": registration_token,
            "description": description,
            "info": info,
            "run_untagged": true,
            "locked": false,
        });
        let response = self
            .http
            .post(self.url("runners"))
            .json(&body)
            .send()
            .await
            .map_err(network)?;
        match response.status() {
            StatusCode::CREATED | StatusCode::OK => {}
            StatusCode::FORBIDDEN => return Err(ApiError::Forbidden),
            _ => return Err(status_error(&response)),
        }
        let value: Value = response
            .json()
            .await
            .map_err(|e| ApiError::InvalidResponse(e.without_url().to_string()))?;
        let token = value
            .get("token")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ApiError::InvalidResponse("no `token` in the answer".into()))?;
        Ok((value.get("id").and_then(Value::as_i64), token.to_string()))
    }

    /// `POST /api/v4/runners/verify`: checks the runner token; returns the
    /// runner's ID when GitLab tells it.
    pub async fn verify(&self, token: &str, system_id: &str) -> Result<Option<i64>, ApiError> {
        let response = self
            .http
            .post(self.url("runners/verify"))
            .json(&json!({"token": token, "system_id": system_id}))
            .send()
            .await
            .map_err(network)?;
        match response.status() {
            StatusCode::OK | StatusCode::CREATED => {}
            StatusCode::FORBIDDEN => return Err(ApiError::Forbidden),
            _ => return Err(status_error(&response)),
        }
        let value: Value = response.json().await.unwrap_or(Value::Null);
        Ok(value.get("id").and_then(Value::as_i64))
    }

    /// `POST /api/v4/jobs/request`.
    pub async fn request_job(
        &self,
        token: &str,
        system_id: &str,
        last_update: Option<&str>,
        info: &Value,
    ) -> Result<JobRequest, ApiError> {
        let mut body = json!({"token": token, "system_id": system_id, "info": info});
        if let Some(last_update) = last_update {
            body["last_update"] = Value::String(last_update.to_string());
        }
        let response = self
            .http
            .post(self.url("jobs/request"))
            .json(&body)
            .send()
            .await
            .map_err(network)?;
        match response.status() {
            StatusCode::CREATED => {
                let bytes = response.bytes().await.map_err(network)?;
                match serde_json::from_slice(&bytes) {
                    Ok(value) => Ok(JobRequest::Job(value)),
                    Err(e) => Err(ApiError::InvalidResponse(format!(
                        "the job payload is not JSON: {e}"
                    ))),
                }
            }
            StatusCode::NO_CONTENT => Ok(JobRequest::NoJob {
                last_update: response
                    .headers()
                    .get("X-GitLab-Last-Update")
                    .and_then(|v| v.to_str().ok())
                    .map(String::from),
            }),
            StatusCode::FORBIDDEN => Err(ApiError::Forbidden),
            _ => Err(status_error(&response)),
        }
    }

    /// `PUT /api/v4/jobs/:id` (one attempt).
    pub async fn update_job(
        &self,
        job_token: &str,
        update: &UpdateJob,
    ) -> Result<UpdateResult, ApiError> {
        let mut body = serde_json::to_value(update).expect("UpdateJob serializes");
        body["token"] = Value::String(job_token.to_string());
        let response = self
            .http
            .put(self.url(&format!("jobs/{}", update.job_id)))
            .header("JOB-TOKEN", job_token)
            .timeout(UPDATE_TIMEOUT)
            .json(&body)
            .send()
            .await
            .map_err(network)?;
        let status = response.status().as_u16();
        match status {
            200 => Ok(UpdateResult::Accepted),
            202 => Ok(UpdateResult::Pending),
            s if s >= 500 || s == 429 => Err(status_error(&response)),
            s => Ok(UpdateResult::Rejected(s)),
        }
    }

    /// `POST /api/v4/jobs/:id/artifacts` (one attempt): multipart `file`
    /// with `artifact_type`, `artifact_format` and `expire_in` as query
    /// parameters, the job token as `JOB-TOKEN`. Returns the HTTP status;
    /// `Err` for network errors, 5xx and 429 (with their `Retry-After`).
    pub async fn upload_artifacts(
        &self,
        job_id: i64,
        job_token: &str,
        upload: &ArtifactUpload,
    ) -> Result<u16, ApiError> {
        let mut url = self.url(&format!("jobs/{job_id}/artifacts"));
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("artifact_type", &upload.artifact_type);
            query.append_pair("artifact_format", &upload.artifact_format);
            if let Some(expire_in) = &upload.expire_in {
                query.append_pair("expire_in", expire_in);
            }
        }
        let part = reqwest::multipart::Part::bytes(upload.data.to_vec())
            .file_name(upload.file_name.clone())
            .mime_str("application/octet-stream")
            .map_err(network)?;
        let form = reqwest::multipart::Form::new().part("file", part);
        let response = self
            .http
            .post(url)
            .header("JOB-TOKEN", job_token)
            .multipart(form)
            .send()
            .await
            .map_err(network)?;
        let status = response.status().as_u16();
        if status >= 500 || status == 429 {
            return Err(status_error(&response));
        }
        Ok(status)
    }

    /// `PATCH /api/v4/jobs/:id/trace` with `content` at `start`.
    pub async fn patch_trace(
        &self,
        job_id: i64,
        job_token: &str,
        start: usize,
        content: Vec<u8>,
    ) -> Result<PatchResult, ApiError> {
        let end = start + content.len().saturating_sub(1);
        let response = self
            .http
            .patch(self.url(&format!("jobs/{job_id}/trace")))
            .header("JOB-TOKEN", job_token)
            .header("Content-Type", "text/plain")
            .header("Content-Range", format!("{start}-{end}"))
            .timeout(UPDATE_TIMEOUT)
            .body(content)
            .send()
            .await
            .map_err(network)?;
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(String::from)
        };
        let remote_size = header("Range")
            .and_then(|r| r.rsplit_once('-').map(|(_, end)| end.trim().to_string()))
            .and_then(|end| end.parse().ok());
        Ok(PatchResult {
            status: response.status().as_u16(),
            remote_size,
            job_status: header("Job-Status"),
            retry_after: parse_retry_after(response.headers()),
        })
    }
}
