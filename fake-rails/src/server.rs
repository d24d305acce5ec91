//! The top of fake-rails' HTTP side: the router (each API module brings
//! its `routes()`), GitLab-style path matching, the operational endpoints
//! (`/-/health`, `/-/metrics`, `/api/v4/version`) and the running server.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::api::{self, Admin, ApiError, ApiResult};
use crate::app::AppState;
use crate::app_state::{GITLAB_REVISION, GITLAB_VERSION, JSON_BODY_LIMIT};
use crate::config::{Config, Contract};
use crate::export::ExportStatsSnapshot;

async fn log_request(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    // The path only: tokens may travel in query strings, never in paths.
    let path = request.uri().path().to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    tracing::info!(
        status = response.status().as_u16(),
        duration = %format_args!("{:.1}ms", started.elapsed().as_secs_f64() * 1000.0),
        "{method} {path}"
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

async fn version(_: Admin) -> ApiResult<Response> {
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

/// The whole API, matching paths as GitLab does (see [`gitlab_path`]).
pub fn app(state: AppState) -> Router {
    let routes = Router::new()
        .route("/-/health", get(health))
        .route("/-/liveness", get(health))
        .route("/-/readiness", get(health))
        .route("/-/metrics", get(metrics))
        .route("/api/v4/version", get(version))
        .merge(api::runners::routes())
        .merge(api::projects::routes())
        .merge(api::features::routes())
        .merge(api::users::routes())
        .merge(api::identity::routes())
        // Routes with larger limits set their own, closer to the handler.
        .layer(DefaultBodyLimit::max(JSON_BODY_LIMIT))
        .merge(api::telemetry::routes(state.clone()))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(log_request))
        .with_state(state);
    // Paths are normalized before `routes` matches them: a layer of this
    // outer router runs before its fallback service.
    Router::new()
        .fallback_service(routes)
        .layer(middleware::map_request(normalize_path))
}

/// Rewrites the request's path the way GitLab (Rails and Grape) matches it.
async fn normalize_path(mut request: Request) -> Request {
    if let Some(path) = gitlab_path(request.uri().path()) {
        let mut parts = request.uri().clone().into_parts();
        let path_and_query = match request.uri().query() {
            Some(query) => format!("{path}?{query}"),
            None => path,
        };
        if let Ok(pq) = path_and_query.parse() {
            parts.path_and_query = Some(pq);
            if let Ok(uri) = Uri::from_parts(parts) {
                *request.uri_mut() = uri;
            }
        }
    }
    request
}

/// The path GitLab routes for `path`, when it differs: repeated slashes count
/// as one and a trailing slash is ignored (`POST /api/v4/runners/`,
/// `/api/v4/features//ci_job_telemetry`). `None`: route `path` as it is.
pub fn gitlab_path(path: &str) -> Option<String> {
    if !path.contains("//") && (path.len() <= 1 || !path.ends_with('/')) {
        return None;
    }
    let mut out = String::with_capacity(path.len());
    for segment in path.split('/').filter(|s| !s.is_empty()) {
        out.push('/');
        out.push_str(segment);
    }
    if out.is_empty() {
        out.push('/');
    }
    Some(out)
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

#[cfg(test)]
mod tests {
    use super::gitlab_path;

    #[test]
    fn paths_are_normalized_as_gitlab_routes_them() {
        let cases = [
            ("/api/v4/runners", None),
            ("/", None),
            ("/api/v4/runners/", Some("/api/v4/runners")),
            (
                "/api/v4/features//ci_job_telemetry",
                Some("/api/v4/features/ci_job_telemetry"),
            ),
            ("//api///v4/user//", Some("/api/v4/user")),
            ("//", Some("/")),
        ];
        for (path, expected) in cases {
            assert_eq!(gitlab_path(path).as_deref(), expected, "{path}");
        }
    }
}
