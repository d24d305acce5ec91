//! Export of the Rails spans (`job_lifecycle`, `job_pending`, `job_running`)
//! as OTLP/HTTP protobuf.
//!
//! Handlers never wait on the collector: they `try_send` into a bounded
//! queue (a full queue drops the spans and counts them), and one background
//! task batches what is queued into an `ExportTraceServiceRequest` and POSTs
//! it with a per-request timeout. Failures are counted and logged, never
//! retried: the API's latency does not depend on the collector.
//!
//! The export is kept off the request path: woken by the first queued job,
//! the task waits [`EXPORT_LINGER`] before encoding and sending what has
//! gathered, so a busy API costs one wake-up, one encoding and one POST per
//! linger rather than per request (the bench's `POST /api/v4/jobs/request`
//! flag on/off ratio measures it).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    span, status, ResourceSpans, ScopeSpans, Span, Status,
};
use prost::Message;
use time::OffsetDateTime;
use tokio::sync::mpsc;

use crate::ids::{self, RailsSpan};

pub const SERVICE_NAME: &str = "gitlab-ci-rails";
pub const SCOPE_NAME: &str = "gitlab-ci-job-telemetry";
/// Most jobs' spans in one export request.
const MAX_BATCH: usize = 512;
/// How long the export task lets spans gather after the first one arrives.
/// Short against the time a trace takes to become queryable (goal: 1 s).
pub const EXPORT_LINGER: Duration = Duration::from_millis(50);
/// `SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK` | W3C sampled: local parent, sampled.
const SPAN_FLAGS: u32 = 0x100 | 0x01;

/// What the spans of one job are made of, copied out of the store.
#[derive(Debug, Clone)]
pub struct JobSpanData {
    pub root_pipeline_id: u64,
    pub pipeline_id: u64,
    pub job_id: u64,
    pub project_id: u64,
    pub runner_id: Option<u64>,
    pub pipeline_source: String,
    pub job_name: String,
    pub job_stage: String,
    pub job_status: &'static str,
    pub failure_reason: Option<String>,
    pub created_at: OffsetDateTime,
    pub queued_at: Option<OffsetDateTime>,
    pub started_at: Option<OffsetDateTime>,
    pub finished_at: Option<OffsetDateTime>,
}

/// Spans of one job to export.
#[derive(Debug, Clone)]
pub struct ExportItem {
    pub job: JobSpanData,
    pub spans: Vec<RailsSpan>,
}

/// Counters of the export, readable at any time.
#[derive(Debug, Default)]
pub struct ExportStats {
    pub spans_queued: AtomicU64,
    pub spans_dropped: AtomicU64,
    pub spans_exported: AtomicU64,
    pub export_errors: AtomicU64,
}

/// A copy of [`ExportStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExportStatsSnapshot {
    pub spans_queued: u64,
    pub spans_dropped: u64,
    pub spans_exported: u64,
    pub export_errors: u64,
}

impl ExportStats {
    pub fn snapshot(&self) -> ExportStatsSnapshot {
        ExportStatsSnapshot {
            spans_queued: self.spans_queued.load(Ordering::Relaxed),
            spans_dropped: self.spans_dropped.load(Ordering::Relaxed),
            spans_exported: self.spans_exported.load(Ordering::Relaxed),
            export_errors: self.export_errors.load(Ordering::Relaxed),
        }
    }
}

/// The sending half; cheap to share.
#[derive(Debug)]
pub struct SpanExporter {
    tx: mpsc::Sender<ExportItem>,
    stats: Arc<ExportStats>,
}

/// `http://host:4318` -> `http://host:4318/v1/traces`; a URL already ending in `/v1/traces` is kept.
pub fn traces_url(endpoint: &str) -> String {
    let trimmed = endpoint.trim_end_matches('/');
    if trimmed.ends_with("/v1/traces") {
        trimmed.to_string()
    } else {
        format!("{trimmed}/v1/traces")
    }
}

impl SpanExporter {
    /// Spawns the export task on the current tokio runtime.
    pub fn start(
        endpoint: &str,
        capacity: usize,
        timeout: Duration,
        stats: Arc<ExportStats>,
    ) -> anyhow::Result<Self> {
        let url = traces_url(endpoint);
        let client = reqwest::Client::builder().timeout(timeout).build()?;
        let (tx, rx) = mpsc::channel(capacity);
        tokio::spawn(run_export(rx, client, url, Arc::clone(&stats)));
        Ok(SpanExporter { tx, stats })
    }

    /// Queues without waiting; drops and counts when the queue is full.
    pub fn submit(&self, item: ExportItem) {
        let count = item.spans.len() as u64;
        match self.tx.try_send(item) {
            Ok(()) => {
                self.stats.spans_queued.fetch_add(count, Ordering::Relaxed);
            }
            Err(_) => {
                let dropped = self.stats.spans_dropped.fetch_add(count, Ordering::Relaxed) + count;
                tracing::warn!(
                    dropped_total = dropped,
                    "Rails span export queue is full; dropped {count} spans"
                );
            }
        }
    }
}

async fn run_export(
    mut rx: mpsc::Receiver<ExportItem>,
    client: reqwest::Client,
    url: String,
    stats: Arc<ExportStats>,
) {
    let mut next = None;
    loop {
        let first = match next.take() {
            Some(item) => item,
            None => match rx.recv().await {
                Some(item) => {
                    // Handlers queueing meanwhile wake nothing: the task is
                    // asleep, not waiting on the queue.
                    tokio::time::sleep(EXPORT_LINGER).await;
                    item
                }
                None => return,
            },
        };
        let mut batch = vec![first];
        while let Ok(item) = rx.try_recv() {
            if batch.len() == MAX_BATCH {
                next = Some(item);
                break;
            }
            batch.push(item);
        }
        let count: u64 = batch.iter().map(|i| i.spans.len() as u64).sum();
        let body = export_request(&batch).encode_to_vec();
        let result = client
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf")
            .body(body)
            .send()
            .await;
        match result {
            Ok(response) if response.status().is_success() => {
                stats.spans_exported.fetch_add(count, Ordering::Relaxed);
            }
            Ok(response) => {
                stats.export_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(status = %response.status(), "Rails span export to `{url}` was rejected; {count} spans lost");
            }
            Err(error) => {
                stats.export_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%error, "Rails span export to `{url}` failed; {count} spans lost");
            }
        }
    }
}

fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn int(key: &str, value: u64) -> KeyValue {
    kv(key, any_value::Value::IntValue(value as i64))
}

fn string(key: &str, value: &str) -> KeyValue {
    kv(key, any_value::Value::StringValue(value.to_string()))
}

fn nanos(t: OffsetDateTime) -> u64 {
    u64::try_from(t.unix_timestamp_nanos()).unwrap_or_default()
}

/// The identifying `ci.*` attributes, on the resource and on every span.
fn identity_attributes(job: &JobSpanData) -> Vec<KeyValue> {
    let mut attrs = vec![
        int("ci.job.id", job.job_id),
        int("ci.pipeline.id", job.pipeline_id),
        int("ci.project.id", job.project_id),
        string("ci.pipeline.source", &job.pipeline_source),
    ];
    if let Some(runner_id) = job.runner_id {
        attrs.push(int("ci.runner.id", runner_id));
    }
    attrs
}

/// One span of the job, with the IDs of the Rails formulas.
pub fn rails_span(job: &JobSpanData, which: RailsSpan) -> Span {
    let end_of_job = job.finished_at.or(job.started_at).unwrap_or(job.created_at);
    let (start, end) = match which {
        RailsSpan::Lifecycle => (job.created_at, end_of_job),
        RailsSpan::Pending => (
            job.queued_at.unwrap_or(job.created_at),
            job.started_at.unwrap_or(end_of_job),
        ),
        RailsSpan::Running => (job.started_at.unwrap_or(job.created_at), end_of_job),
    };
    let mut attributes = identity_attributes(job);
    attributes.extend([
        string("ci.job.status", job.job_status),
        string("ci.job.name", &job.job_name),
        string("ci.job.stage", &job.job_stage),
    ]);
    let failed = job.job_status == "failed" && which != RailsSpan::Pending;
    Span {
        trace_id: ids::trace_id_bytes(job.root_pipeline_id).to_vec(),
        span_id: ids::span_id_bytes(job.root_pipeline_id, job.job_id, which).to_vec(),
        trace_state: String::new(),
        parent_span_id: which
            .parent()
            .map(|p| ids::span_id_bytes(job.root_pipeline_id, job.job_id, p).to_vec())
            .unwrap_or_default(),
        flags: SPAN_FLAGS,
        name: which.span_name().to_string(),
        kind: span::SpanKind::Internal as i32,
        start_time_unix_nano: nanos(start),
        end_time_unix_nano: nanos(end.max(start)),
        attributes,
        dropped_attributes_count: 0,
        events: Vec::new(),
        dropped_events_count: 0,
        links: Vec::new(),
        dropped_links_count: 0,
        status: Some(if failed {
            Status {
                message: job
                    .failure_reason
                    .clone()
                    .unwrap_or_else(|| "failed".to_string()),
                code: status::StatusCode::Error as i32,
            }
        } else {
            Status::default()
        }),
    }
}

/// One `ResourceSpans` per job: `service.name` plus the job's `ci.*` identity.
pub fn export_request(items: &[ExportItem]) -> ExportTraceServiceRequest {
    let resource_spans = items
        .iter()
        .map(|item| {
            let mut attributes = vec![string("service.name", SERVICE_NAME)];
            attributes.extend(identity_attributes(&item.job));
            ResourceSpans {
                resource: Some(Resource {
                    attributes,
                    dropped_attributes_count: 0,
                    entity_refs: Vec::new(),
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: SCOPE_NAME.to_string(),
                        version: env!("CARGO_PKG_VERSION").to_string(),
                        attributes: Vec::new(),
                        dropped_attributes_count: 0,
                    }),
                    spans: item
                        .spans
                        .iter()
                        .map(|s| rails_span(&item.job, *s))
                        .collect(),
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }
        })
        .collect();
    ExportTraceServiceRequest { resource_spans }
}
