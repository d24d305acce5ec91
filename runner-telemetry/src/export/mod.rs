//! The export path: from a span ending to an OTLP request, through a bounded
//! runner-wide buffer, with retries and an account of every span.
//!
//! ```text
//! span.end() ─> JobSpanProcessor::on_end ─ encode once ─> SpanSink::accept (per endpoint, never blocks)
//!                                                              │ buffer full: dropped (queue_full)
//!                                                              v
//!                                    runner-wide buffer (spans + bytes bound, max_age)
//!                                                              │ one worker task per endpoint
//!                                                              v
//!                          OTLP/HTTP protobuf POST | OTLP/gRPC Export, retried per the OTLP spec
//! ```
//!
//! * A span is handed over as soon as it ends (streaming: Phase 2 stage
//!   spans leave while the job still runs), encoded to OTLP protobuf once
//!   ([`encode`]), and never blocks the job: the buffer is a lock-protected
//!   queue with a budget ([`hub`]).
//! * What goes over the wire and which failures are retried: [`transport`]
//!   and [`retry`] (the OTLP specification's rules, with the citations).
//! * Credentials: static headers, a bearer token file, GCP ID tokens
//!   ([`auth`]). TLS for `https`/`grpcs` ([`transport`]).
//! * Accounting: [`accounting`] per job and endpoint, [`crate::metrics`] per
//!   process; every span ends exported or dropped for a [`DropReason`].
//! * [`ExportPipeline::flush`] waits for a job's spans at most until the
//!   job's flush deadline and reports; spans still buffered then stay in the
//!   runner's buffer, and the job's final line is logged when the last is
//!   decided (`job=N telemetry settled ...`).
//!
//! Why our own client rather than the SDK's `BatchSpanProcessor` and the
//! stock `opentelemetry-otlp` exporters (which do retry, honouring
//! `Retry-After` and `RetryInfo`): the processor runs its own thread without
//! the tokio reactor, and what a runner needs is not per-exporter: one buffer
//! for the whole runner bounded in bytes as well as spans, a `max_age` after
//! which a span is given up, an account per job and endpoint of every span
//! (exported or dropped with a reason), and GCP ID tokens fetched and cached
//! per audience for each payload endpoint.

pub mod accounting;
pub mod auth;
pub mod encode;
pub mod error;
pub mod hub;
pub mod logs_encode;
pub mod retry;
pub mod sink;
pub mod transport;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::{Context, InstrumentationScope};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Span, SpanData, SpanProcessor};
use opentelemetry_sdk::Resource;

pub use accounting::{DropReason, EndpointReport, FlushReport, JobAccount};
pub use auth::Auth;
pub use encode::{EncodedSpan, ResourceBlock, ScopeBlock};
pub use error::SetupError;
pub use hub::{ExportHub, ShutdownReport, MAX_BATCH};
pub use sink::{ExportTarget, SpanSink};

/// The [`SpanProcessor`] of one job: encodes every ended span once and hands
/// it to each sink, never blocking.
pub(crate) struct JobSpanProcessor {
    sinks: Vec<Box<dyn SpanSink>>,
    account: Arc<JobAccount>,
    resource: Arc<ResourceBlock>,
    scopes: Mutex<HashMap<InstrumentationScope, Arc<ScopeBlock>>>,
}

impl fmt::Debug for JobSpanProcessor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobSpanProcessor")
            .field("job_id", &self.account.job_id)
            .finish_non_exhaustive()
    }
}

impl SpanProcessor for JobSpanProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        self.account.span_ended();
        let root = span.name == crate::job::JOB_SPAN_NAME
            && (span.parent_span_is_remote
                || span.parent_span_id == opentelemetry::trace::SpanId::INVALID);
        let scope = {
            let mut scopes = self.scopes.lock().unwrap_or_else(|e| e.into_inner());
            scopes
                .entry(span.instrumentation_scope.clone())
                .or_insert_with(|| Arc::new(ScopeBlock::new(&span.instrumentation_scope)))
                .clone()
        };
        let encoded = EncodedSpan {
            span: encode::encode_span(span),
            resource: self.resource.clone(),
            scope,
        };
        for (index, sink) in self.sinks.iter().enumerate() {
            self.account.span_created(index);
            match root {
                true => sink.accept_root(encoded.clone(), &self.account, index),
                false => sink.accept(encoded.clone(), &self.account, index),
            }
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        // Flushing is asynchronous and bounded: see `ExportPipeline::flush`.
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        // Spans already handed over stay in the runner's buffer.
        Ok(())
    }
}

/// The export side of one job: its account.
#[derive(Debug)]
pub struct ExportPipeline {
    account: Arc<JobAccount>,
}

impl ExportPipeline {
    /// Returns the processor to install in the job's tracer provider. The
    /// sinks' workers already run on the runner's runtime; `_runtime` is kept
    /// for the callers' sake.
    pub(crate) fn start(
        sinks: Vec<Box<dyn SpanSink>>,
        resource: &Resource,
        _runtime: &tokio::runtime::Handle,
    ) -> (JobSpanProcessor, ExportPipeline) {
        let job_id = resource
            .get(&opentelemetry::Key::from_static_str(crate::keys::CI_JOB_ID))
            .and_then(|v| match v {
                opentelemetry::Value::I64(id) => Some(id),
                other => other.as_str().parse().ok(),
            });
        let labels = sinks.iter().map(|s| s.label()).collect();
        let account = Arc::new(JobAccount::new(job_id, labels));
        let processor = JobSpanProcessor {
            sinks,
            account: account.clone(),
            resource: Arc::new(ResourceBlock::new(resource)),
            scopes: Mutex::new(HashMap::new()),
        };
        (processor, ExportPipeline { account })
    }

    /// Waits until every span of the job was exported or dropped, at most
    /// `deadline`. Spans still buffered then are not abandoned: they stay in
    /// the runner's buffer, retried until `max_age`, and the job's final
    /// account is logged when the last of them is decided.
    pub async fn flush(self, deadline: Duration) -> FlushReport {
        self.account.flush(deadline).await
    }

    pub fn account(&self) -> &Arc<JobAccount> {
        &self.account
    }
}
