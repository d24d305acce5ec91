//! The router, the shared state and the running server.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post, put};
use axum::Router;
use time::OffsetDateTime;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::api::{self, ApiError, ApiResult};
use crate::config::{Config, Contract};
use crate::export::{ExportStats, ExportStatsSnapshot, SpanExporter};
use crate::identity::IdentityKey;
use crate::state::Store;

/// The GitLab version fake-rails claims (`CI_SERVER_VERSION`, `/api/v4/version`).
pub const GITLAB_VERSION: &str = "18.6.0";
pub const GITLAB_REVISION: &str = "fakerails";

/// Limit of JSON, form and multipart bodies.
pub const JSON_BODY_LIMIT: usize = 10 * 1024 * 1024;
/// Limit of one trace PATCH.
pub const TRACE_BODY_LIMIT: usize = 16 * 1024 * 1024;
/// Limit of one artifact upload.
pub const ARTIFACT_BODY_LIMIT: usize = 128 * 1024 * 1024;

/// Configuration after startup: what handlers read.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Without a trailing slash.
    pub public_url: String,
    pub registration_token: String,
    pub admin_token: String,
    pub contract: Contract,
    pub otel_endpoints: Vec<String>,
    pub otel_audience: Option<String>,
    pub sampling_rate: f64,
    pub id_token_ttl: Duration,
    pub instance_uuid: String,
    /// Where the telemetry API and pages read stored traces; `None`: they answer 503.
    pub clickhouse: Option<crate::telemetry::ClickHouseSettings>,
}

pub(crate) struct Inner {
    pub settings: Settings,
    pub store: Mutex<Store>,
    pub exporter: Option<SpanExporter>,
    pub export_stats: Arc<ExportStats>,
    pub identity: IdentityKey,
}

/// Shared state of the app. Cloning is cheap.
#[derive(Clone)]
pub struct AppState(pub(crate) Arc<Inner>);

impl AppState {
    /// Builds the state; with an OTLP endpoint, spawns the export task on
    /// the current tokio runtime. `public_url` is the resolved base URL.
    pub fn new(config: &Config, public_url: &str) -> anyhow::Result<Self> {
        config.validate().map_err(anyhow::Error::msg)?;
        let export_stats = Arc::new(ExportStats::default());
        let exporter = match &config.otlp_endpoint {
            Some(endpoint) => Some(SpanExporter::start(
                endpoint,
                config.export_queue_capacity,
                config.export_timeout,
                Arc::clone(&export_stats),
            )?),
            None => None,
        };
        let identity = IdentityKey::load(&config.signing_key)?;
        let settings = Settings {
            public_url: public_url.trim_end_matches('/').to_string(),
            registration_token: config.registration_token.clone(),
            admin_token: config.admin_token.clone(),
            contract: config.contract,
            otel_endpoints: config.otel_endpoints.clone(),
            otel_audience: config.otel_audience.clone(),
            sampling_rate: config.sampling_rate,
            id_token_ttl: config.id_token_ttl,
            instance_uuid: crate::tokens::instance_uuid(),
            clickhouse: config.clickhouse.clone(),
        };
        Ok(AppState(Arc::new(Inner {
            settings,
            store: Mutex::new(Store::new(config.first_id)),
            exporter,
            export_stats,
            identity,
        })))
    }

    pub fn settings(&self) -> &Settings {
        &self.0.settings
    }

    /// The store. Never hold the guard across an `.await`.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Store> {
        self.0
            .store
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn export_stats(&self) -> ExportStatsSnapshot {
        self.0.export_stats.snapshot()
    }

    pub(crate) fn export(&self, item: Option<crate::export::ExportItem>) {
        if let (Some(exporter), Some(item)) = (&self.0.exporter, item) {
            exporter.submit(item);
        }
    }

    pub fn identity(&self) -> &IdentityKey {
        &self.0.identity
    }

    /// Checks the admin `PRIVATE-TOKEN` (or `Authorization: Bearer`).
    pub(crate) fn require_admin(&self, headers: &HeaderMap) -> ApiResult<()> {
        let given = api::header(headers, "private-token").or_else(|| {
            api::header(headers, "authorization")
                .and_then(|v| v.strip_prefix("Bearer ").map(str::trim))
        });
        match given {
            Some(token) if token == self.0.settings.admin_token => Ok(()),
            _ => Err(ApiError::unauthorized()),
        }
    }
}

/// `2026-01-02T03:04:05.678Z`, the way GitLab's API prints times.
pub fn format_time(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

pub fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

async fn log_request(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    // The path only: tokens may travel in query strings, never in paths.
    let path = request.uri().path().to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    tracing::info!(
        "{method} {path} {} {:.1}ms",
        response.status().as_u16(),
        started.elapsed().as_secs_f64() * 1000.0
    );
    response
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "404 Not Found")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "405 Method Not Allowed")
}

async fn health() -> &'static str {
    "GitLab OK"
}

async fn version(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    state.require_admin(&headers)?;
    Ok(axum::Json(serde_json::json!({"version": GITLAB_VERSION, "revision": GITLAB_REVISION, "enterprise": false}))
        .into_response())
}

async fn metrics(State(state): State<AppState>) -> String {
    let stats = state.export_stats();
    let (pending, running) = {
        let store = state.lock();
        let running = store
            .jobs
            .values()
            .filter(|j| j.status == crate::state::JobStatus::Running)
            .count();
        (store.pending.len(), running)
    };
    format!(
        "# TYPE fake_rails_rails_spans_queued_total counter\nfake_rails_rails_spans_queued_total {}\n\
         # TYPE fake_rails_rails_spans_dropped_total counter\nfake_rails_rails_spans_dropped_total {}\n\
         # TYPE fake_rails_rails_spans_exported_total counter\nfake_rails_rails_spans_exported_total {}\n\
         # TYPE fake_rails_rails_span_export_errors_total counter\nfake_rails_rails_span_export_errors_total {}\n\
         # TYPE fake_rails_jobs_pending gauge\nfake_rails_jobs_pending {pending}\n\
         # TYPE fake_rails_jobs_running gauge\nfake_rails_jobs_running {running}\n",
        stats.spans_queued, stats.spans_dropped, stats.spans_exported, stats.export_errors
    )
}

/// The whole API.
pub fn app(state: AppState) -> Router {
    use api::{features, identity, projects, runners};
    let trace_routes = Router::new()
        .route("/api/v4/jobs/{id}/trace", patch(runners::patch_trace))
        .layer(DefaultBodyLimit::max(TRACE_BODY_LIMIT));
    let artifact_routes = Router::new()
        .route(
            "/api/v4/jobs/{id}/artifacts",
            post(runners::upload_artifacts).get(runners::download_artifacts),
        )
        .layer(DefaultBodyLimit::max(ARTIFACT_BODY_LIMIT));
    Router::new()
        .route("/-/health", get(health))
        .route("/-/liveness", get(health))
        .route("/-/readiness", get(health))
        .route("/-/metrics", get(metrics))
        .route("/api/v4/version", get(version))
        // Runner API.
        .route(
            "/api/v4/runners",
            post(runners::register).delete(runners::unregister),
        )
        .route("/api/v4/runners/verify", post(runners::verify))
        .route("/api/v4/user/runners", post(runners::create_user_runner))
        .route("/api/v4/jobs/request", post(runners::request_job))
        .route("/api/v4/jobs/{id}", put(runners::update_job))
        .route("/api/v4/job", get(runners::current_job))
        // Projects, pipelines and jobs.
        .route(
            "/api/v4/projects",
            post(projects::create_project).get(projects::list_projects),
        )
        .route("/api/v4/projects/{project}", get(projects::get_project))
        .route(
            "/api/v4/projects/{project}/pipeline",
            post(projects::create_pipeline),
        )
        .route(
            "/api/v4/projects/{project}/pipelines",
            get(projects::list_pipelines),
        )
        .route(
            "/api/v4/projects/{project}/pipelines/{pipeline}",
            get(projects::get_pipeline),
        )
        .route(
            "/api/v4/projects/{project}/pipelines/{pipeline}/jobs",
            get(projects::pipeline_jobs),
        )
        .route(
            "/api/v4/projects/{project}/pipelines/{pipeline}/cancel",
            post(projects::cancel_pipeline),
        )
        .route(
            "/api/v4/projects/{project}/jobs",
            get(projects::project_jobs),
        )
        .route(
            "/api/v4/projects/{project}/jobs/{job}",
            get(projects::get_job),
        )
        .route(
            "/api/v4/projects/{project}/jobs/{job}/trace",
            get(projects::get_trace),
        )
        .route(
            "/api/v4/projects/{project}/jobs/{job}/artifacts",
            get(projects::download_artifacts),
        )
        .route(
            "/api/v4/projects/{project}/jobs/{job}/play",
            post(projects::play_job),
        )
        .route(
            "/api/v4/projects/{project}/jobs/{job}/cancel",
            post(projects::cancel_job),
        )
        // Feature flags.
        .route("/api/v4/features", get(features::list))
        .route(
            "/api/v4/features/{name}",
            post(features::set).delete(features::remove),
        )
        // Identity.
        .route(
            "/.well-known/openid-configuration",
            get(identity::openid_configuration),
        )
        .route("/oauth/discovery/keys", get(identity::jwks))
        .route(
            "/computeMetadata/v1/instance/service-accounts/default/identity",
            get(identity::gcp_identity),
        )
        .route(
            "/api/v4/internal/ci/telemetry/auth",
            post(identity::telemetry_auth),
        )
        .layer(DefaultBodyLimit::max(JSON_BODY_LIMIT))
        .merge(api::telemetry::routes(state.clone()))
        .merge(trace_routes)
        .merge(artifact_routes)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(log_request))
        .with_state(state)
}

/// A server running in the background of the current tokio runtime.
/// Dropping it stops the server.
pub struct RunningServer {
    addr: SocketAddr,
    state: AppState,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl RunningServer {
    /// The bound address (the real port when `listen` had port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://IP:PORT`, what to point clients at.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The base URL put into payloads and tokens.
    pub fn public_url(&self) -> &str {
        &self.state.settings().public_url
    }

    pub fn registration_token(&self) -> &str {
        &self.state.settings().registration_token
    }

    pub fn admin_token(&self) -> &str {
        &self.state.settings().admin_token
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    pub fn export_stats(&self) -> ExportStatsSnapshot {
        self.state.export_stats()
    }

    /// Serves until `stop` completes (then shuts down gracefully, waiting
    /// at most 5 s for in-flight requests) or the server fails.
    pub async fn run_until(
        mut self,
        stop: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let Some(mut task) = self.task.take() else {
            return Ok(());
        };
        tokio::select! {
            result = &mut task => return Ok(result??),
            _ = stop => {}
        }
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match tokio::time::timeout(Duration::from_secs(5), task).await {
            Ok(result) => Ok(result??),
            Err(_) => Ok(()),
        }
    }

    /// Stops accepting connections and waits for in-flight requests.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Binds `config.listen` and serves the API in the background.
pub async fn serve(config: Config) -> anyhow::Result<RunningServer> {
    config.validate().map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    let addr = listener.local_addr()?;
    let public_url = config
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{addr}"));
    let state = AppState::new(&config, &public_url)?;
    log_startup(&config, &public_url);
    let (tx, rx) = oneshot::channel::<()>();
    let router = app(state.clone());
    let task = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = rx.await;
            })
            .await
    });
    Ok(RunningServer {
        addr,
        state,
        shutdown: Some(tx),
        task: Some(task),
    })
}

fn log_startup(config: &Config, public_url: &str) {
    tracing::info!(
        contract = %config.contract,
        sampling_rate = config.sampling_rate,
        "Serving the GitLab API as `{public_url}`"
    );
    if config.contract == Contract::V2 && config.otel_endpoints.is_empty() {
        tracing::warn!(
            "Contract v2 without `--otel-endpoint`: payloads will carry no `features.tracing`, so runners emit no spans"
        );
    }
    match &config.otlp_endpoint {
        Some(endpoint) => tracing::info!(
            "Exporting Rails spans to `{}`",
            crate::export::traces_url(endpoint)
        ),
        None => tracing::info!("No `--otlp-endpoint`: Rails spans are not exported"),
    }
    if config.signing_key == crate::config::SigningKeySource::EmbeddedTestKey {
        tracing::info!("ID tokens are signed with the embedded test-only key");
    }
}
