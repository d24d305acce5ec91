//! `GET /metrics` on `--metrics-listen`: the library's telemetry counters
//! ([`runner_telemetry::metrics::Metrics`]) in Prometheus text format.

use std::net::SocketAddr;
use std::sync::Arc;

use runner_telemetry::metrics::Metrics;

/// Serves `GET /metrics` on `addr` in the background of the current runtime.
/// Returns the bound address (port 0 picks one).
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(
                        http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    metrics.render(),
                )
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("The metrics server stopped: {e}");
        }
    });
    Ok(bound)
}
