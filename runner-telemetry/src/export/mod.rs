//! The export path: from a span ending to an OTLP request, through a bounded
//! runner-wide buffer, with retries and an account of every span.
//!
//! ```text
//! span.end() ─> JobSpanProcessor::on_end ─ job's encoder task: encode once ─> SpanSink::accept (per endpoint, never blocks)
//!                                                              │ buffer full: dropped (queue_full)
//!                                                              v
//!                                    runner-wide buffer (spans + bytes bound, max_age)
//!                                                              │ one worker task per endpoint
//!                                                              v
//!                          OTLP/HTTP protobuf POST | OTLP/gRPC Export, retried per the OTLP spec
//! ```
//!
//! * A span is handed over as soon as it ends (streaming: Phase 2 stage
//!   spans leave while the job still runs), as data, to the job's encoder
//!   task, which encodes it to OTLP protobuf once ([`encode`]) and puts it
//!   in the buffer; nothing of that runs on the job's thread (unless the
//!   encoder falls [`ENCODER_QUEUE`] spans behind) and nothing blocks the
//!   job: the buffer is a lock-protected queue with a budget ([`hub`]).
//! * What goes over the wire and which failures are retried: [`transport`]
//!   and [`retry`] (the OTLP specification's rules, with the citations).
//! * Credentials: static headers, a bearer token file, GCP ID tokens
//!   ([`auth`]). TLS for `https`/`grpcs` ([`transport`]).
//! * Accounting: [`accounting`] per job and endpoint, [`crate::metrics`] per
//!   process; every span ends exported or dropped for a [`DropReason`].
//! * [`ExportPipeline::flush`] waits for a job's spans at most until the
//!   job's flush deadline and reports; spans still buffered then stay in the
//!   runner's buffer, and the job's final line is logged when the last is
//!   decided (`Telemetry settled ... job_id=N`).
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
pub mod span_wire;
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
pub use error::{AuthError, ExportError, RequestError, SetupError};
pub use hub::{ExportHub, ShutdownReport, MAX_BATCH};
pub use sink::{ExportTarget, SpanSink};

/// Spans a job may have waiting for its encoder task; past this many, the
/// job's own thread encodes (it never waits). A job's whole span cap, so a
/// job never gets there unless the runtime is starved.
pub const ENCODER_QUEUE: usize = crate::keys::MAX_SPANS_PER_JOB;
/// The encoder waits this long after a span arrives before encoding what
/// has gathered: one wake-up of the task per burst, not one per span (each
/// costs the job a cross-thread wake on a busy machine).
pub const ENCODER_GATHER: Duration = Duration::from_millis(1);

/// The [`SpanProcessor`] of one job: counts every ended span and hands it,
/// as data, to the job's encoder task, which encodes it once and hands it
/// to each sink. Encoding is thus off the job's thread; the sinks' decisions
/// (buffer budget in bytes, drops and their reasons) are the same as if the
/// job's thread had made them.
pub(crate) struct JobSpanProcessor {
    shared: Arc<JobSpans>,
    encoder: tokio::sync::mpsc::Sender<Handoff>,
}

/// What a job's spans go to, shared by the processor and its encoder task.
struct JobSpans {
    sinks: Vec<Box<dyn SpanSink>>,
    account: Arc<JobAccount>,
    resource: Arc<ResourceBlock>,
    scopes: Mutex<HashMap<InstrumentationScope, Arc<ScopeBlock>>>,
}

impl JobSpans {
    /// Whether `span` is the job's root (`job_execution`, child of the
    /// payload's remote span or a root itself).
    fn is_root(span: &SpanData) -> bool {
        span.name == crate::keys::JOB_SPAN_NAME
            && (span.parent_span_is_remote
                || span.parent_span_id == opentelemetry::trace::SpanId::INVALID)
    }

    /// The encoded scope of `span`, from the job's cache (the last one
    /// used is tried first: a job's spans share one scope).
    fn scope(
        &self,
        scope: &InstrumentationScope,
        last: &mut Option<(InstrumentationScope, Arc<ScopeBlock>)>,
    ) -> Arc<ScopeBlock> {
        if let Some((known, block)) = last {
            if known == scope {
                return block.clone();
            }
        }
        let block = {
            let mut scopes = self.scopes.lock().unwrap_or_else(|e| e.into_inner());
            scopes
                .entry(scope.clone())
                .or_insert_with(|| Arc::new(ScopeBlock::new(scope)))
                .clone()
        };
        *last = Some((scope.clone(), block.clone()));
        block
    }

    fn encode(
        &self,
        span: SpanData,
        last: &mut Option<(InstrumentationScope, Arc<ScopeBlock>)>,
    ) -> EncodedSpan {
        let scope = self.scope(&span.instrumentation_scope, last);
        EncodedSpan {
            span: encode::encode_span(span),
            resource: self.resource.clone(),
            scope,
        }
    }

    /// Encodes `span` once and hands it to every sink; the job's root span
    /// may use the room each sink holds for it.
    fn deliver(&self, span: SpanData) {
        let root = Self::is_root(&span);
        let encoded = self.encode(span, &mut None);
        self.hand_over(encoded, root);
    }

    fn hand_over(&self, encoded: EncodedSpan, root: bool) {
        for (index, sink) in self.sinks.iter().enumerate() {
            match root {
                true => sink.accept_root(encoded.clone(), &self.account, index),
                false => sink.accept(encoded.clone(), &self.account, index),
            }
        }
    }

    /// [`Self::deliver`] for a burst of spans, in order: the sinks take the
    /// children as one batch each (one lock and one wake-up of the export
    /// worker per burst, not per span) and the root on its own.
    fn deliver_all(&self, spans: impl Iterator<Item = SpanData>) {
        let mut last = None;
        let mut batch: Vec<EncodedSpan> = Vec::new();
        for span in spans {
            let root = Self::is_root(&span);
            let encoded = self.encode(span, &mut last);
            if root {
                self.hand_over_batch(&mut batch);
                self.hand_over(encoded, true);
            } else {
                batch.push(encoded);
            }
        }
        self.hand_over_batch(&mut batch);
    }

    fn hand_over_batch(&self, batch: &mut Vec<EncodedSpan>) {
        if batch.is_empty() {
            return;
        }
        let spans = std::mem::take(batch);
        let Some((last, others)) = self.sinks.split_last() else {
            return;
        };
        for (index, sink) in others.iter().enumerate() {
            sink.accept_batch(spans.clone(), &self.account, index);
        }
        last.accept_batch(spans, &self.account, others.len());
    }
}

/// An ended span on its way to the encoder. It is delivered exactly once:
/// by the encoder task, or, if it never gets there (queue full, task or
/// runtime gone), where it is dropped. So no span is lost uncounted.
struct Handoff {
    span: Option<SpanData>,
    to: Arc<JobSpans>,
}

impl Handoff {
    /// The span, for the encoder to deliver (it no longer is on drop).
    fn take(mut self) -> Option<SpanData> {
        self.span.take()
    }
}

impl Drop for Handoff {
    fn drop(&mut self) {
        if let Some(span) = self.span.take() {
            self.to.deliver(span);
        }
    }
}

async fn encode_spans(mut handoffs: tokio::sync::mpsc::Receiver<Handoff>) {
    let mut burst = Vec::new();
    while let Some(first) = handoffs.recv().await {
        // Until the spans are taken out below, a cancelled task (runtime
        // gone) still delivers them: dropping a hand-off delivers it.
        tokio::time::sleep(ENCODER_GATHER).await;
        let to = first.to.clone();
        burst.push(first);
        while let Ok(handoff) = handoffs.try_recv() {
            burst.push(handoff);
        }
        to.deliver_all(burst.drain(..).filter_map(Handoff::take));
    }
}

impl fmt::Debug for JobSpanProcessor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobSpanProcessor")
            .field("job_id", &self.shared.account.job_id)
            .finish_non_exhaustive()
    }
}

impl SpanProcessor for JobSpanProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        let account = &self.shared.account;
        account.span_ended();
        for index in 0..self.shared.sinks.len() {
            account.span_created(index);
        }
        let handoff = Handoff {
            span: Some(span),
            to: self.shared.clone(),
        };
        // A full queue or a gone task hands the span back: dropping it
        // delivers it here.
        drop(self.encoder.try_send(handoff));
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
    /// Returns the processor to install in the job's tracer provider, and
    /// starts the job's encoder task on `runtime` (the sinks' workers
    /// already run there).
    pub(crate) fn start(
        sinks: Vec<Box<dyn SpanSink>>,
        resource: &Resource,
        runtime: &tokio::runtime::Handle,
    ) -> (JobSpanProcessor, ExportPipeline) {
        let job_id = resource
            .get(&opentelemetry::Key::from_static_str(crate::keys::CI_JOB_ID))
            .and_then(|v| match v {
                opentelemetry::Value::I64(id) => Some(id),
                other => other.as_str().parse().ok(),
            });
        let labels = sinks.iter().map(|s| s.label()).collect();
        let account = Arc::new(JobAccount::new(job_id, labels));
        let (encoder, handoffs) = tokio::sync::mpsc::channel(ENCODER_QUEUE);
        runtime.spawn(encode_spans(handoffs));
        let processor = JobSpanProcessor {
            shared: Arc::new(JobSpans {
                sinks,
                account: account.clone(),
                resource: Arc::new(ResourceBlock::new(resource)),
                scopes: Mutex::new(HashMap::new()),
            }),
            encoder,
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
