//! The bench's OTLP collector: the harness's scriptable collector
//! (`conformance::doubles::otlp`, HTTP/protobuf and gRPC on one 127.0.0.1
//! port) on its own one-thread runtime, counting the spans it accepts
//! without keeping them, scripted to answer 503 (gRPC `UNAVAILABLE`) with
//! `Retry-After` for a while, or to stall (read the request, never answer).
//! Beside it, a stub of GitLab's job status endpoint that notes when each
//! status update arrives.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use conformance::doubles::otlp::{self, Answer};

pub struct Collector {
    /// `http://127.0.0.1:PORT` (traces at `/v1/traces`).
    pub http_url: String,
    /// `http://127.0.0.1:PORT` for gRPC (the same port).
    pub grpc_url: String,
    /// `http://127.0.0.1:PORT` of the job status stub
    /// (`PUT /api/v4/jobs/:id`).
    pub gitlab_url: String,
    collector: otlp::Collector,
    /// When each job status update arrived.
    statuses: Arc<Mutex<Vec<Instant>>>,
    runtime: tokio::runtime::Runtime,
}

impl Collector {
    pub fn start() -> Result<Collector> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("bench-collector")
            .enable_all()
            .build()?;
        let statuses = Arc::new(Mutex::new(Vec::new()));
        let (collector, gitlab) = runtime.block_on(async {
            let collector = otlp::Collector::start().await;
            collector.counting_only();
            let gitlab = serve_statuses(statuses.clone()).await?;
            anyhow::Ok((collector, gitlab))
        })?;
        let base = collector.grpc_endpoint();
        Ok(Collector {
            http_url: base.clone(),
            grpc_url: base,
            gitlab_url: format!("http://{gitlab}"),
            collector,
            statuses,
            runtime,
        })
    }

    /// Export requests accepted since the last reset.
    pub fn requests(&self) -> u64 {
        self.collector.counts().requests
    }

    /// Forgets what was counted and answers normally again.
    pub fn reset(&self) {
        self.collector.clear().otherwise(Answer::Ok);
    }

    /// 503 + `Retry-After: 1` (gRPC: `UNAVAILABLE`) for `duration` from now.
    pub fn refuse_for(&self, duration: Duration) {
        let until = Instant::now() + duration;
        self.collector.answer_with(move |_| {
            if Instant::now() < until {
                Answer::retry_after(503, "1")
            } else {
                Answer::Ok
            }
        });
    }

    /// When the last job status update arrived.
    pub fn last_status(&self) -> Option<Instant> {
        self.statuses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last()
            .copied()
    }

    /// Reads requests and never answers them (or answers normally again).
    pub fn stall(&self, stalled: bool) {
        self.collector
            .otherwise(if stalled { Answer::Stall } else { Answer::Ok });
    }

    /// Waits until `expected` spans arrived or `deadline` passed; the count.
    pub fn wait_for_spans(&self, expected: u64, deadline: Duration) -> u64 {
        self.runtime
            .block_on(
                self.collector
                    .wait_for_counts(deadline, |counts| counts.spans >= expected),
            )
            .spans
    }
}

/// Serves the job status stub on a free local port: every request is a
/// status update, noted and answered 200.
async fn serve_statuses(statuses: Arc<Mutex<Vec<Instant>>>) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new().fallback(move |_body: axum::body::Bytes| {
        // The body was read whole first, so the connection can be reused.
        statuses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Instant::now());
        std::future::ready(axum::http::StatusCode::OK)
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(addr)
}

/// Starts a collector or says why not.
pub fn start() -> Result<Collector> {
    Collector::start().context("starting the bench's OTLP collector")
}
