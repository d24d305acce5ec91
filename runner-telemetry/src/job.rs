//! The spans of one job: `job_execution`, child of the payload's remote span,
//! and the children that later phases hang under it (stage spans in Phase 2,
//! CI Function spans in Phase 3) through [`JobTelemetry::child`]. Names,
//! attributes and limits: `docs/contract.md` §2.
//!
//! Limits (the design's): at most [`MAX_SPANS_PER_JOB`] spans per job,
//! `job_execution` included; children asked for past the cap are not created,
//! and their number goes on `job_execution` as `ci.telemetry.dropped_spans`.
//! The attributes of one span take at most [`MAX_SPAN_ATTRIBUTE_BYTES`]
//! (keys and values); a value that does not fit is cut and ends in
//! [`TRUNCATION_MARKER`], and the span gets `ci.telemetry.truncated=true`
//! (see [`AttributeBudget`]).
//!
//! Every entry point is guarded: a panic inside telemetry code is caught,
//! logged, and switches telemetry off for that job; the job itself never
//! sees it. A disabled [`JobTelemetry`] (and its [`ChildSpan`]s) accepts
//! every call and does nothing, so runner code never branches on it.
//!
//! **Architecture Invariant:** nothing here blocks. Ending a span queues it;
//! the export happens on the runtime's tasks (see [`crate::export`]).

use std::borrow::Cow;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    SpanId, SpanKind, Status, TraceContextExt, TraceId, Tracer, TracerProvider,
};
use opentelemetry::{Array, Context, InstrumentationScope, Key, KeyValue, StringValue, Value};
use opentelemetry_sdk::trace::{
    IdGenerator, RandomIdGenerator, Sampler, SdkTracer, SdkTracerProvider,
};
use opentelemetry_sdk::Resource;

use crate::export::{ExportPipeline, FlushReport, ResourceBlock, ScopeBlock, SpanSink};
use crate::keys;
use crate::logs::{JobLogs, JobLogsStart, SpanStack, CI_TELEMETRY_DROPPED_LOG_RECORDS};
use crate::negotiate::TraceContext;
use crate::secrets::{mask_attribute, mask_text, strip_credentials};

/// Tracer (instrumentation scope) name.
pub const SCOPE_NAME: &str = "gitlab-ci-runner";
/// Instrumentation scope version: this crate's version.
pub const SCOPE_VERSION: &str = env!("CARGO_PKG_VERSION");
pub use crate::keys::{JOB_SPAN_NAME, MAX_SPANS_PER_JOB};
/// Most bytes of attributes (keys and values) one span may carry (the
/// design's 4 KB).
pub const MAX_SPAN_ATTRIBUTE_BYTES: usize = 4096;
/// Most bytes of a span's status message.
pub const MAX_STATUS_MESSAGE_BYTES: usize = 1024;
/// Ends a value that was cut to fit.
pub const TRUNCATION_MARKER: &str = "…[truncated]";

/// Runs `f`, turning a panic into `None` and a log line.
pub fn guarded<T>(job_id: i64, what: &str, f: impl FnOnce() -> T) -> Option<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(value) => Some(value),
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            tracing::error!(
                job_id,
                "Telemetry panicked in `{what}`, telemetry disabled for this job: {message}"
            );
            None
        }
    }
}

/// The runner that runs the job.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunnerIdentity {
    /// The runner's ID in GitLab, when known (registration or verify).
    pub id: Option<i64>,
    pub name: String,
    /// `shell`, `docker`, ...
    pub executor: String,
}

/// What the job span says about the job, taken from the payload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobSpanInfo {
    pub job_id: i64,
    pub job_name: String,
    pub stage: String,
    pub pipeline_id: Option<i64>,
    pub pipeline_source: Option<String>,
    pub project_id: Option<i64>,
    /// `group/project`.
    pub project_path: Option<String>,
    pub git_ref: Option<String>,
    pub sha: Option<String>,
    /// As in the payload; credentials are stripped before it reaches a span.
    pub repo_url: Option<String>,
    /// The job's page, e.g. `https://gitlab.example.com/group/project/-/jobs/42`.
    pub job_url: Option<String>,
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobOutcome {
    Success,
    /// `failure_reason` as sent to GitLab (`script_failure`,
    /// `runner_system_failure`, ...).
    Failed {
        failure_reason: String,
        exit_code: Option<i32>,
    },
    /// The job ran past its timeout (`job_execution_timeout` to GitLab).
    TimedOut,
    Canceled,
}

impl JobOutcome {
    /// `ci.job.status`: `success|failed|canceled|timedout`.
    pub fn ci_status(&self) -> &'static str {
        match self {
            JobOutcome::Success => "success",
            JobOutcome::Failed { .. } => "failed",
            JobOutcome::TimedOut => "timedout",
            JobOutcome::Canceled => "canceled",
        }
    }

    /// `cicd.pipeline.task.run.result`: `success|failure|error|timeout|cancellation`.
    /// A script's own failure is `failure`; anything else that failed the
    /// job (the runner, the system) is `error`.
    pub fn semconv_result(&self) -> &'static str {
        match self {
            JobOutcome::Success => "success",
            JobOutcome::Failed { failure_reason, .. } if failure_reason == "script_failure" => {
                "failure"
            }
            JobOutcome::Failed { .. } => "error",
            JobOutcome::TimedOut => "timeout",
            JobOutcome::Canceled => "cancellation",
        }
    }

    /// The failure reason GitLab knows, if the job did not succeed.
    pub fn failure_reason(&self) -> Option<&str> {
        match self {
            JobOutcome::Success => None,
            JobOutcome::Failed { failure_reason, .. } => Some(failure_reason),
            JobOutcome::TimedOut => Some("job_execution_timeout"),
            JobOutcome::Canceled => Some("job_canceled"),
        }
    }
}

/// How a child span (a stage, a function) ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpanOutcome {
    Ok,
    /// Not judged (e.g. skipped work).
    Unset,
    /// Failed, with a message for the span status.
    Error(String),
}

impl SpanOutcome {
    fn status(&self) -> Status {
        match self {
            SpanOutcome::Ok => Status::Ok,
            SpanOutcome::Unset => Status::Unset,
            SpanOutcome::Error(message) => {
                Status::error(truncate_str(message, MAX_STATUS_MESSAGE_BYTES))
            }
        }
    }
}

/// `text` cut to at most `max` bytes (on a character boundary), ending in
/// [`TRUNCATION_MARKER`] when it was cut. Empty when not even the marker
/// fits.
pub fn truncate_str(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let Some(room) = max.checked_sub(TRUNCATION_MARKER.len()) else {
        return String::new();
    };
    let mut end = room;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{TRUNCATION_MARKER}", &text[..end])
}

/// Bytes an attribute counts for: its key, plus its value's length for
/// strings, 8 for numbers and 1 for booleans (arrays: the sum).
pub fn attribute_size(attribute: &KeyValue) -> usize {
    attribute.key.as_str().len() + value_size(&attribute.value)
}

fn value_size(value: &Value) -> usize {
    match value {
        Value::Bool(_) => 1,
        Value::I64(_) | Value::F64(_) => 8,
        Value::String(s) => s.as_str().len(),
        Value::Array(Array::Bool(v)) => v.len(),
        Value::Array(Array::I64(v)) => v.len() * 8,
        Value::Array(Array::F64(v)) => v.len() * 8,
        Value::Array(Array::String(v)) => v.iter().map(|s| s.as_str().len()).sum(),
        // Future value kinds: count them by their text.
        other => other.to_string().len(),
    }
}

/// The attribute-size cap of one span: admits attributes while they fit in
/// [`MAX_SPAN_ATTRIBUTE_BYTES`], cuts the string (or string array) that
/// does not, drops what cannot be cut, and adds
/// `ci.telemetry.truncated=true` once. Room for that marker is kept aside,
/// so the total never exceeds the cap.
///
/// It sits on the job's path for every attribute, so it stays cheap: the
/// sizes admitted so far are a short list searched in place (a span carries
/// a few dozen attributes at most), and admitted attributes are appended to
/// the caller's list without a collection of their own.
#[derive(Debug, Clone)]
pub struct AttributeBudget {
    limit: usize,
    used: usize,
    sizes: Vec<(Key, usize)>,
    truncated: bool,
}

impl Default for AttributeBudget {
    fn default() -> Self {
        AttributeBudget::new(MAX_SPAN_ATTRIBUTE_BYTES)
    }
}

/// Bytes the `ci.telemetry.truncated=true` marker counts for.
const MARKER_SIZE: usize = crate::keys::CI_TELEMETRY_TRUNCATED.len() + 1;

impl AttributeBudget {
    pub fn new(limit: usize) -> Self {
        AttributeBudget {
            limit,
            used: 0,
            sizes: Vec::new(),
            truncated: false,
        }
    }

    fn marker() -> KeyValue {
        KeyValue::new(crate::keys::CI_TELEMETRY_TRUNCATED, true)
    }

    /// Bytes used so far, the marker included.
    pub fn used(&self) -> usize {
        self.used + if self.truncated { MARKER_SIZE } else { 0 }
    }

    pub fn is_truncated(&self) -> bool {
        self.truncated
    }

    /// What to set for `attribute`: itself, a cut copy, or nothing, plus the
    /// truncation marker the first time something is cut or dropped. Setting
    /// a key again replaces its earlier size.
    pub fn admit(&mut self, attribute: KeyValue) -> Vec<KeyValue> {
        let mut out = Vec::with_capacity(1);
        self.admit_into(attribute, &mut out);
        out
    }

    /// [`AttributeBudget::admit`], appending to `out`.
    pub fn admit_into(&mut self, attribute: KeyValue, out: &mut Vec<KeyValue>) {
        let earlier = self
            .sizes
            .iter()
            .position(|(key, _)| key.as_str() == attribute.key.as_str());
        if let Some(index) = earlier {
            self.used -= self.sizes.swap_remove(index).1;
        }
        let capacity = self.limit.saturating_sub(MARKER_SIZE);
        let size = attribute_size(&attribute);
        if self.used + size <= capacity {
            self.used += size;
            self.sizes.push((attribute.key.clone(), size));
            out.push(attribute);
            return;
        }
        let room = capacity
            .saturating_sub(self.used)
            .saturating_sub(attribute.key.as_str().len());
        let cut = match &attribute.value {
            Value::String(s) => {
                let cut = truncate_str(s.as_str(), room);
                (!cut.is_empty()).then(|| Value::String(cut.into()))
            }
            Value::Array(Array::String(items)) => {
                let mut kept: Vec<StringValue> = Vec::new();
                let mut left = room;
                for item in items {
                    if item.as_str().len() > left {
                        break;
                    }
                    left -= item.as_str().len();
                    kept.push(item.clone());
                }
                (!kept.is_empty()).then_some(Value::Array(Array::String(kept)))
            }
            _ => None,
        };
        if let Some(value) = cut {
            let attribute = KeyValue::new(attribute.key, value);
            let size = attribute_size(&attribute);
            self.used += size;
            self.sizes.push((attribute.key.clone(), size));
            out.push(attribute);
        }
        if !self.truncated {
            self.truncated = true;
            out.push(Self::marker());
        }
    }

    /// [`AttributeBudget::admit_all`] for a list the caller owns: the list
    /// itself is returned when everything fits (the common case: no copy,
    /// no allocation beyond the sizes kept).
    pub fn admit_vec(&mut self, mut attributes: Vec<KeyValue>) -> Vec<KeyValue> {
        self.sizes.reserve(attributes.len());
        let capacity = self.limit.saturating_sub(MARKER_SIZE);
        for index in 0..attributes.len() {
            let attribute = &attributes[index];
            let earlier = self
                .sizes
                .iter()
                .position(|(key, _)| key.as_str() == attribute.key.as_str());
            let size = attribute_size(attribute);
            let used = self.used - earlier.map_or(0, |i| self.sizes[i].1);
            if used + size > capacity {
                // From here on, one by one (cut, dropped, marker).
                let rest = attributes.split_off(index);
                for attribute in rest {
                    self.admit_into(attribute, &mut attributes);
                }
                return attributes;
            }
            self.used = used + size;
            match earlier {
                Some(i) => self.sizes[i].1 = size,
                None => self.sizes.push((attribute.key.clone(), size)),
            }
        }
        attributes
    }

    /// [`AttributeBudget::admit`] for several attributes, in order.
    pub fn admit_all(&mut self, attributes: impl IntoIterator<Item = KeyValue>) -> Vec<KeyValue> {
        let attributes = attributes.into_iter();
        let mut out = Vec::with_capacity(attributes.size_hint().0 + 1);
        for attribute in attributes {
            self.admit_into(attribute, &mut out);
        }
        out
    }
}

/// The secrets of a job, longest first, shared by its spans.
type Secrets = Arc<Vec<String>>;

/// The per-job span cap, shared by a job's spans.
#[derive(Debug, Default)]
struct SpanCounter {
    created: AtomicUsize,
    dropped: AtomicUsize,
}

impl SpanCounter {
    /// Takes a span from the cap; false (and one more dropped) when the cap
    /// is reached.
    fn acquire(&self) -> bool {
        let taken = self
            .created
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < MAX_SPANS_PER_JOB).then_some(n + 1)
            })
            .is_ok();
        if !taken {
            self.dropped.fetch_add(1, Ordering::SeqCst);
        }
        taken
    }
}

/// Span IDs at random, and one fixed trace ID for root spans: how a job
/// whose trace ID was derived (no trace context in the payload) starts its
/// own root span in that trace. Children inherit the ID from their parent.
#[derive(Debug)]
struct FixedTraceId(TraceId);

impl IdGenerator for FixedTraceId {
    fn new_trace_id(&self) -> TraceId {
        self.0
    }

    fn new_span_id(&self) -> SpanId {
        RandomIdGenerator::default().new_span_id()
    }
}

/// What a job's spans share: one reference per child instead of one per
/// part (each costs the job's thread an atomic increment and decrement).
struct JobShared {
    tracer: SdkTracer,
    spans: SpanCounter,
    /// The open spans, for the log records' `SpanId`.
    stack: Arc<SpanStack>,
}

/// The telemetry of one job.
pub struct JobTelemetry {
    job_id: i64,
    active: Option<ActiveJob>,
}

struct ActiveJob {
    provider: SdkTracerProvider,
    /// The tracer, span cap and open spans, shared with the children.
    shared: Arc<JobShared>,
    /// Holds the `job_execution` span.
    context: Context,
    pipeline: ExportPipeline,
    budget: AttributeBudget,
    secrets: Secrets,
    /// Log records, when the runner exports the job log.
    logs: Option<JobLogs>,
}

impl std::fmt::Debug for JobTelemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobTelemetry")
            .field("job_id", &self.job_id)
            .field("enabled", &self.active.is_some())
            .finish()
    }
}

/// Everything needed to start a job's telemetry once negotiation said yes.
pub struct JobTelemetryStart<'a> {
    pub trace_context: TraceContext,
    pub job: &'a JobSpanInfo,
    pub runner: &'a RunnerIdentity,
    pub service_name: &'a str,
    /// When the job really started (it may be earlier than now).
    pub start_time: SystemTime,
    pub sinks: Vec<Box<dyn SpanSink>>,
    /// Where the job's log records go; empty when log export is off.
    pub log_sinks: Vec<Box<dyn SpanSink>>,
}

impl JobTelemetry {
    /// Telemetry switched off for this job: every call is a no-op.
    pub fn disabled(job_id: i64) -> Self {
        JobTelemetry {
            job_id,
            active: None,
        }
    }

    /// Starts `job_execution` as a child of the payload's span and its export
    /// tasks on the current tokio runtime. Falls back to disabled (with a
    /// log line) if there is no runtime or the start panics.
    pub fn start(start: JobTelemetryStart<'_>) -> Self {
        let job_id = start.job.job_id;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(
                job_id,
                "Telemetry disabled: no tokio runtime to export from"
            );
            return JobTelemetry::disabled(job_id);
        };
        let active = guarded(job_id, "start", move || start_active(start, &runtime));
        JobTelemetry { job_id, active }
    }

    pub fn job_id(&self) -> i64 {
        self.job_id
    }

    pub fn is_enabled(&self) -> bool {
        self.active.is_some()
    }

    /// The `job_execution` span's IDs, for logs and tests.
    pub fn span_context(&self) -> Option<opentelemetry::trace::SpanContext> {
        let active = self.active.as_ref()?;
        Some(active.context.span().span_context().clone())
    }

    /// Adds an attribute to `job_execution` (within the size cap).
    pub fn set_attribute(&mut self, attribute: KeyValue) {
        self.with_active("set_attribute", |a| {
            let admitted = a.budget.admit(mask_attribute(attribute, &a.secrets));
            a.context.span().set_attributes(admitted)
        });
    }

    /// Values (masked variables, tokens) replaced by `[MASKED]` in every
    /// string attribute and status message set from now on, on
    /// `job_execution` and its children: a safety net under the rule that
    /// spans carry names, never values.
    pub fn mask_secrets(&mut self, secrets: Vec<String>) {
        let mut secrets: Vec<String> = secrets.into_iter().filter(|s| !s.is_empty()).collect();
        secrets.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
        secrets.dedup();
        self.with_active("mask_secrets", |a| a.secrets = Arc::new(secrets));
    }

    /// The job's log records, when log export is on for this job.
    pub fn logs(&self) -> Option<JobLogs> {
        self.active.as_ref()?.logs.clone()
    }

    /// Children not created because the job reached [`MAX_SPANS_PER_JOB`].
    pub fn dropped_spans(&self) -> usize {
        self.active
            .as_ref()
            .map(|a| a.shared.spans.dropped.load(Ordering::SeqCst))
            .unwrap_or(0)
    }

    /// Starts a child of `job_execution` now (a stage, a function).
    pub fn child(
        &mut self,
        name: impl Into<Cow<'static, str>>,
        attributes: Vec<KeyValue>,
    ) -> ChildSpan {
        self.child_at(name, attributes, SystemTime::now())
    }

    /// Starts a child of `job_execution` at `start_time`.
    pub fn child_at(
        &mut self,
        name: impl Into<Cow<'static, str>>,
        attributes: Vec<KeyValue>,
        start_time: SystemTime,
    ) -> ChildSpan {
        let job_id = self.job_id;
        let name = name.into();
        let child = self
            .with_active("child", |a| {
                start_child(
                    &a.shared, &a.secrets, &a.context, name, attributes, start_time,
                )
            })
            .flatten();
        ChildSpan {
            job_id,
            inner: child,
        }
    }

    /// Sets the final status and attributes, ends `job_execution` at
    /// `end_time`, and closes the export queues. The returned flush is to be
    /// awaited in the background, after the status was sent to GitLab.
    pub fn finish(mut self, outcome: &JobOutcome, end_time: SystemTime) -> Option<PendingFlush> {
        let job_id = self.job_id;
        let active = self.active.take()?;
        let ActiveJob {
            provider,
            context,
            pipeline,
            mut budget,
            shared,
            secrets,
            logs,
        } = active;
        let ended = guarded(job_id, "finish", || {
            let span = context.span();
            let dropped_log_records = logs.as_ref().map(|l| l.finish(end_time));
            let dropped = shared.spans.dropped.load(Ordering::SeqCst);
            if dropped > 0 {
                tracing::warn!(
                    job_id,
                    dropped,
                    "The job reached the cap of {MAX_SPANS_PER_JOB} spans: {dropped} more were not created"
                );
            }
            let mut attributes = outcome_attributes(outcome);
            attributes.push(KeyValue::new(
                keys::CI_TELEMETRY_DROPPED_SPANS,
                dropped as i64,
            ));
            if let Some(n) = dropped_log_records {
                if n > 0 {
                    tracing::warn!(
                        job_id,
                        dropped = n,
                        "{n} log records of the job were not exported (counted on `job_execution` as `{CI_TELEMETRY_DROPPED_LOG_RECORDS}`)"
                    );
                }
                attributes.push(KeyValue::new(CI_TELEMETRY_DROPPED_LOG_RECORDS, n as i64));
            }
            let attributes = attributes.into_iter().map(|a| mask_attribute(a, &secrets));
            span.set_attributes(budget.admit_all(attributes));
            let status = match outcome {
                JobOutcome::Success => Status::Ok,
                JobOutcome::Canceled => Status::Unset,
                other => {
                    let reason = other.failure_reason().unwrap_or("failed");
                    Status::error(match other {
                        JobOutcome::Failed {
                            exit_code: Some(code),
                            ..
                        } => format!("{reason}: exit code {code}"),
                        _ => reason.to_string(),
                    })
                }
            };
            span.set_status(status);
            span.end_with_timestamp(end_time);
            drop(context);
            let _ = provider.shutdown();
        });
        if ended.is_none() {
            // The queues may still be open: abandon what is pending quickly.
            return Some(PendingFlush {
                job_id,
                pipeline,
                deadline_cap: Some(Duration::ZERO),
                logs,
            });
        }
        Some(PendingFlush {
            job_id,
            pipeline,
            deadline_cap: None,
            logs,
        })
    }

    fn with_active<T>(&mut self, what: &str, f: impl FnOnce(&mut ActiveJob) -> T) -> Option<T> {
        let active = self.active.as_mut()?;
        let result = guarded(self.job_id, what, || f(active));
        if result.is_none() {
            self.active = None;
        }
        result
    }
}

fn start_active(start: JobTelemetryStart<'_>, runtime: &tokio::runtime::Handle) -> ActiveJob {
    let JobTelemetryStart {
        trace_context,
        job,
        runner,
        service_name,
        start_time,
        sinks,
        log_sinks,
    } = start;
    let resource = job_resource(service_name, job, runner);
    let resource_block = (!log_sinks.is_empty()).then(|| Arc::new(ResourceBlock::new(&resource)));
    let (processor, pipeline) = ExportPipeline::start(sinks, &resource, runtime);
    let provider = SdkTracerProvider::builder()
        .with_resource(resource)
        // Rails sampled the pipeline; the runner keeps everything it is
        // given, whatever OTEL_TRACES_SAMPLER says.
        .with_sampler(Sampler::AlwaysOn)
        // Only a root `job_execution` (derived trace ID) takes its trace ID
        // from the generator; with a parent, the parent's is used.
        .with_id_generator(FixedTraceId(trace_context.trace_id()))
        .with_span_processor(processor)
        .build();
    let scope = InstrumentationScope::builder(SCOPE_NAME)
        .with_version(SCOPE_VERSION)
        .build();
    let tracer = provider.tracer_with_scope(scope);
    let parent = match trace_context.is_root() {
        true => Context::new(),
        false => Context::new().with_remote_span_context(trace_context.span_context()),
    };
    let mut budget = AttributeBudget::default();
    let span = tracer
        .span_builder(JOB_SPAN_NAME)
        .with_kind(SpanKind::Internal)
        .with_start_time(start_time)
        .with_attributes(budget.admit_vec(job_attributes(job, runner)))
        .start_with_context(&tracer, &parent);
    let root = opentelemetry::trace::Span::span_context(&span).clone();
    let context = Context::new().with_span(span);
    let shared = Arc::new(JobShared {
        tracer,
        spans: SpanCounter::default(),
        stack: Arc::new(SpanStack::new(root.trace_id(), root.span_id())),
    });
    shared.spans.acquire();
    let stack = shared.stack.clone();
    let logs = resource_block.map(|resource| {
        JobLogs::start(
            JobLogsStart {
                sinks: log_sinks,
                resource,
                scope: Arc::new(ScopeBlock::new(
                    &InstrumentationScope::builder(SCOPE_NAME)
                        .with_version(SCOPE_VERSION)
                        .build(),
                )),
                spans: stack.clone(),
                job_id: job.job_id,
                pipeline_id: job.pipeline_id,
                project_id: job.project_id,
            },
            Some(runtime),
        )
    });
    ActiveJob {
        provider,
        shared,
        context,
        pipeline,
        budget,
        secrets: Arc::new(Vec::new()),
        logs,
    }
}

/// Starts a child of `parent` if the job's span cap allows it.
fn start_child(
    shared: &Arc<JobShared>,
    secrets: &Secrets,
    parent: &Context,
    name: Cow<'static, str>,
    mut attributes: Vec<KeyValue>,
    start_time: SystemTime,
) -> Option<ChildInner> {
    if !shared.spans.acquire() {
        return None;
    }
    let mut budget = AttributeBudget::default();
    if !secrets.is_empty() {
        attributes = attributes
            .into_iter()
            .map(|a| mask_attribute(a, secrets))
            .collect();
    }
    let span = shared
        .tracer
        .span_builder(name)
        .with_kind(SpanKind::Internal)
        .with_start_time(start_time)
        .with_attributes(budget.admit_vec(attributes))
        .start_with_context(&shared.tracer, parent);
    let span_id = opentelemetry::trace::Span::span_context(&span).span_id();
    shared.stack.push(span_id);
    Some(ChildInner {
        span: Held::Span(span),
        budget,
        shared: shared.clone(),
        secrets: secrets.clone(),
        span_id,
    })
}

/// The resource of a job's spans. Besides `service.name`, it carries the
/// job's IDs: the backend's materialized view reads `ci.*` from resource
/// attributes, and a per-job provider makes that exact.
fn job_resource(service_name: &str, job: &JobSpanInfo, runner: &RunnerIdentity) -> Resource {
    let mut attributes = vec![KeyValue::new(keys::SERVICE_VERSION, SCOPE_VERSION)];
    attributes.push(KeyValue::new(keys::CI_JOB_ID, job.job_id));
    if let Some(id) = job.pipeline_id {
        attributes.push(KeyValue::new(keys::CI_PIPELINE_ID, id));
    }
    if let Some(id) = job.project_id {
        attributes.push(KeyValue::new(keys::CI_PROJECT_ID, id));
    }
    if let Some(source) = &job.pipeline_source {
        attributes.push(KeyValue::new(keys::CI_PIPELINE_SOURCE, source.clone()));
    }
    if let Some(id) = runner.id {
        attributes.push(KeyValue::new(keys::CI_RUNNER_ID, id));
    }
    Resource::builder_empty()
        .with_service_name(service_name.to_string())
        .with_attributes(attributes)
        .build()
}

/// Attributes set when `job_execution` starts.
pub fn job_attributes(job: &JobSpanInfo, runner: &RunnerIdentity) -> Vec<KeyValue> {
    let mut a = vec![
        KeyValue::new(keys::CI_JOB_ID, job.job_id),
        KeyValue::new(keys::CI_JOB_NAME, job.job_name.clone()),
        KeyValue::new(keys::CI_JOB_STAGE, job.stage.clone()),
        KeyValue::new(keys::CI_RUNNER_EXECUTOR, runner.executor.clone()),
        KeyValue::new(keys::CICD_PIPELINE_TASK_RUN_ID, job.job_id.to_string()),
        KeyValue::new(keys::CICD_PIPELINE_TASK_NAME, job.job_name.clone()),
        KeyValue::new(keys::CICD_WORKER_NAME, runner.name.clone()),
    ];
    if let Some(id) = job.pipeline_id {
        a.push(KeyValue::new(keys::CI_PIPELINE_ID, id));
        a.push(KeyValue::new(keys::CICD_PIPELINE_RUN_ID, id.to_string()));
    }
    if let Some(id) = job.project_id {
        a.push(KeyValue::new(keys::CI_PROJECT_ID, id));
    }
    if let Some(source) = &job.pipeline_source {
        a.push(KeyValue::new(keys::CI_PIPELINE_SOURCE, source.clone()));
    }
    if let Some(id) = runner.id {
        a.push(KeyValue::new(keys::CI_RUNNER_ID, id));
        a.push(KeyValue::new(keys::CICD_WORKER_ID, id.to_string()));
    }
    if let Some(path) = &job.project_path {
        a.push(KeyValue::new(keys::CICD_PIPELINE_NAME, path.clone()));
    }
    if let Some(r) = &job.git_ref {
        a.push(KeyValue::new(keys::VCS_REF_HEAD_NAME, r.clone()));
    }
    if let Some(sha) = &job.sha {
        a.push(KeyValue::new(keys::VCS_REF_HEAD_REVISION, sha.clone()));
    }
    if let Some(url) = &job.repo_url {
        a.push(KeyValue::new(
            keys::VCS_REPOSITORY_URL_FULL,
            strip_credentials(url),
        ));
    }
    if let Some(url) = &job.job_url {
        a.push(KeyValue::new(
            keys::CICD_PIPELINE_TASK_RUN_URL_FULL,
            strip_credentials(url),
        ));
    }
    a
}

/// Attributes set when `job_execution` ends.
pub fn outcome_attributes(outcome: &JobOutcome) -> Vec<KeyValue> {
    let mut a = vec![
        KeyValue::new(keys::CI_JOB_STATUS, outcome.ci_status()),
        KeyValue::new(
            keys::CICD_PIPELINE_TASK_RUN_RESULT,
            outcome.semconv_result(),
        ),
    ];
    match outcome {
        JobOutcome::Success | JobOutcome::Canceled => {}
        JobOutcome::Failed {
            failure_reason,
            exit_code,
        } => {
            a.push(KeyValue::new(
                keys::CI_JOB_FAILURE_REASON,
                failure_reason.clone(),
            ));
            a.push(KeyValue::new(keys::ERROR_TYPE, failure_reason.clone()));
            if let Some(code) = exit_code {
                a.push(KeyValue::new(keys::CI_JOB_EXIT_CODE, i64::from(*code)));
            }
        }
        JobOutcome::TimedOut => {
            a.push(KeyValue::new(
                keys::CI_JOB_FAILURE_REASON,
                "job_execution_timeout",
            ));
            a.push(KeyValue::new(keys::ERROR_TYPE, "job_execution_timeout"));
        }
    }
    a
}

/// A child span of `job_execution` (or of another child). Ends when
/// [`ChildSpan::end`] is called, or when dropped.
pub struct ChildSpan {
    job_id: i64,
    inner: Option<ChildInner>,
}

struct ChildInner {
    /// This span.
    span: Held,
    budget: AttributeBudget,
    shared: Arc<JobShared>,
    secrets: Secrets,
    span_id: SpanId,
}

/// A child span, held as itself until it gets a child of its own: only then
/// is it put in a [`Context`] (an allocation and a lock per call that most
/// spans, which have no children, do without).
// The span inline on purpose: boxing it would cost the allocation saved.
#[allow(clippy::large_enum_variant)]
enum Held {
    Span(opentelemetry_sdk::trace::Span),
    Context(Context),
}

impl Held {
    fn set_attributes(&mut self, attributes: Vec<KeyValue>) {
        use opentelemetry::trace::Span as _;
        match self {
            Held::Span(span) => span.set_attributes(attributes),
            Held::Context(cx) => cx.span().set_attributes(attributes),
        }
    }

    fn end(&mut self, status: Status, end_time: SystemTime) {
        use opentelemetry::trace::Span as _;
        match self {
            Held::Span(span) => {
                span.set_status(status);
                span.end_with_timestamp(end_time);
            }
            Held::Context(cx) => {
                let span = cx.span();
                span.set_status(status);
                span.end_with_timestamp(end_time);
            }
        }
    }

    fn span_context(&self) -> opentelemetry::trace::SpanContext {
        match self {
            Held::Span(span) => opentelemetry::trace::Span::span_context(span).clone(),
            Held::Context(cx) => cx.span().span_context().clone(),
        }
    }

    /// The span as a parent context.
    fn context(&mut self) -> &Context {
        if let Held::Span(_) = self {
            let Held::Span(span) = std::mem::replace(self, Held::Context(Context::new())) else {
                unreachable!("matched above");
            };
            *self = Held::Context(Context::new().with_span(span));
        }
        match self {
            Held::Context(cx) => cx,
            Held::Span(_) => unreachable!("replaced above"),
        }
    }
}

impl Drop for ChildInner {
    fn drop(&mut self) {
        // Lines printed from now on belong to the parent again.
        self.shared.stack.remove(self.span_id);
    }
}

impl std::fmt::Debug for ChildSpan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildSpan")
            .field("job_id", &self.job_id)
            .field("recording", &self.inner.is_some())
            .finish()
    }
}

impl ChildSpan {
    pub fn disabled(job_id: i64) -> Self {
        ChildSpan {
            job_id,
            inner: None,
        }
    }

    pub fn is_recording(&self) -> bool {
        self.inner.is_some()
    }

    /// Adds an attribute (within the size cap).
    pub fn set_attribute(&mut self, attribute: KeyValue) {
        self.with_inner("set_attribute", |c| {
            let admitted = c.budget.admit(mask_attribute(attribute, &c.secrets));
            c.span.set_attributes(admitted)
        });
    }

    /// Adds attributes (within the size cap).
    pub fn set_attributes(&mut self, attributes: Vec<KeyValue>) {
        self.with_inner("set_attributes", |c| {
            let attributes = attributes
                .into_iter()
                .map(|a| mask_attribute(a, &c.secrets));
            let admitted = c.budget.admit_all(attributes);
            c.span.set_attributes(admitted)
        });
    }

    /// A grandchild (e.g. a step inside a CI Function), started now.
    pub fn child(
        &mut self,
        name: impl Into<Cow<'static, str>>,
        attributes: Vec<KeyValue>,
    ) -> ChildSpan {
        let job_id = self.job_id;
        let name = name.into();
        let inner = self
            .with_inner("child", |c| {
                let parent = c.span.context();
                start_child(
                    &c.shared,
                    &c.secrets,
                    parent,
                    name,
                    attributes,
                    SystemTime::now(),
                )
            })
            .flatten();
        ChildSpan { job_id, inner }
    }

    /// The span's IDs, for logs and tests.
    pub fn span_context(&self) -> Option<opentelemetry::trace::SpanContext> {
        let inner = self.inner.as_ref()?;
        Some(inner.span.span_context())
    }

    /// Ends the span now.
    pub fn end(self, outcome: SpanOutcome) {
        self.end_at(outcome, SystemTime::now());
    }

    /// Ends the span at `end_time`.
    pub fn end_at(mut self, outcome: SpanOutcome, end_time: SystemTime) {
        self.with_inner("end", |c| {
            let outcome = match outcome {
                SpanOutcome::Error(message) => SpanOutcome::Error(mask_text(&message, &c.secrets)),
                other => other,
            };
            c.span.end(outcome.status(), end_time);
        });
    }

    fn with_inner<T>(&mut self, what: &str, f: impl FnOnce(&mut ChildInner) -> T) -> Option<T> {
        let inner = self.inner.as_mut()?;
        let result = guarded(self.job_id, what, || f(inner));
        if result.is_none() {
            self.inner = None;
        }
        result
    }
}

/// The background part of a job's telemetry: wait for the export, bounded.
#[derive(Debug)]
pub struct PendingFlush {
    job_id: i64,
    pipeline: ExportPipeline,
    /// Set when finishing panicked: flush with this deadline at most.
    deadline_cap: Option<Duration>,
    logs: Option<JobLogs>,
}

impl PendingFlush {
    pub fn job_id(&self) -> i64 {
        self.job_id
    }

    /// Waits for the export, at most `deadline`, and accounts for every
    /// span.
    pub async fn flush(self, deadline: Duration) -> FlushReport {
        let deadline = match self.deadline_cap {
            Some(cap) => deadline.min(cap),
            None => deadline,
        };
        let Some(logs) = self.logs else {
            return self.pipeline.flush(deadline).await;
        };
        let logs_flush = async {
            // The job's task may still be rendering its output.
            let started = std::time::Instant::now();
            logs.rendered(deadline).await;
            let account = logs.account().clone();
            account
                .flush(deadline.saturating_sub(started.elapsed()))
                .await
        };
        let (mut report, logs_report) =
            futures_join(self.pipeline.flush(deadline), logs_flush).await;
        report.log_records = Some(Box::new(logs_report));
        report
    }
}

/// Both futures, concurrently.
async fn futures_join<A, B>(
    a: impl std::future::Future<Output = A>,
    b: impl std::future::Future<Output = B>,
) -> (A, B) {
    tokio::join!(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_mappings() {
        let failed = |reason: &str| JobOutcome::Failed {
            failure_reason: reason.into(),
            exit_code: Some(3),
        };
        let cases = [
            (JobOutcome::Success, "success", "success", None),
            (
                failed("script_failure"),
                "failed",
                "failure",
                Some("script_failure"),
            ),
            (
                failed("runner_system_failure"),
                "failed",
                "error",
                Some("runner_system_failure"),
            ),
            (
                JobOutcome::TimedOut,
                "timedout",
                "timeout",
                Some("job_execution_timeout"),
            ),
            (
                JobOutcome::Canceled,
                "canceled",
                "cancellation",
                Some("job_canceled"),
            ),
        ];
        for (outcome, status, result, reason) in cases {
            assert_eq!(outcome.ci_status(), status);
            assert_eq!(outcome.semconv_result(), result);
            assert_eq!(outcome.failure_reason(), reason);
        }
    }

    /// Admits `attributes` in order under `limit` and renders what the span
    /// would carry: `key=value` (strings as their length when long), then
    /// the bytes used.
    fn check_budget(limit: usize, attributes: Vec<KeyValue>, expected: &str) {
        // The owned-list path admits exactly what the one-by-one path does.
        let mut by_vec = AttributeBudget::new(limit);
        let admitted_vec = by_vec.admit_vec(attributes.clone());
        let mut budget = AttributeBudget::new(limit);
        let admitted = budget.admit_all(attributes);
        assert_eq!(admitted_vec, admitted);
        assert_eq!(by_vec.used(), budget.used());
        assert_eq!(by_vec.is_truncated(), budget.is_truncated());
        let total: usize = admitted.iter().map(attribute_size).sum();
        assert!(total <= limit, "{total} > {limit}");
        assert_eq!(total, budget.used());
        let rendered: Vec<String> = admitted
            .iter()
            .map(|a| format!("{}={}", a.key, a.value))
            .collect();
        assert_eq!(format!("{} ({total})", rendered.join(" ")), expected);
    }

    #[test]
    fn attribute_budget_cases() {
        let long = "x".repeat(5000);
        // Everything fits.
        check_budget(
            4096,
            vec![
                KeyValue::new("a", "one"),
                KeyValue::new("n", 5_i64),
                KeyValue::new("b", true),
            ],
            "a=one n=5 b=true (15)",
        );
        // A string cut to what is left, ending in the marker; the marker
        // attribute (23 bytes) is kept aside.
        check_budget(
            60,
            vec![KeyValue::new("k", "0123456789".repeat(10))],
            "k=0123456789012345678901…[truncated] ci.telemetry.truncated=true (60)",
        );
        // After a cut, later attributes that fit are still admitted, and
        // the marker comes once.
        check_budget(
            70,
            vec![
                KeyValue::new("a", long.clone()),
                KeyValue::new("b", long.clone()),
            ],
            &format!(
                "a={}…[truncated] ci.telemetry.truncated=true (70)",
                "x".repeat(32)
            ),
        );
        // A number that does not fit is dropped (it cannot be cut).
        check_budget(
            40,
            vec![KeyValue::new("abc", "x"), KeyValue::new("n", 1_i64)],
            "abc=x n=1 (13)",
        );
        check_budget(
            28,
            vec![KeyValue::new("abcd", "x"), KeyValue::new("n", 1_i64)],
            "abcd=x ci.telemetry.truncated=true (28)",
        );
        // String arrays keep the items that fit.
        check_budget(
            36,
            vec![KeyValue::new(
                "names",
                Value::Array(Array::String(vec![
                    "aaaa".into(),
                    "bbbb".into(),
                    "cccc".into(),
                ])),
            )],
            r#"names=["aaaa","bbbb"] ci.telemetry.truncated=true (36)"#,
        );
        // Multi-byte characters are never split.
        check_budget(
            40,
            vec![KeyValue::new("k", "é".repeat(20))],
            "k=é…[truncated] ci.telemetry.truncated=true (40)",
        );
        // Setting a key again replaces its size.
        let mut budget = AttributeBudget::new(4096);
        budget.admit(KeyValue::new("k", "first"));
        budget.admit(KeyValue::new("k", "second"));
        assert_eq!(budget.used(), 7);
        // Also within one list, and a replaced key leaves room for others.
        let list = vec![
            KeyValue::new("k", "0123456789"),
            KeyValue::new("k", "x"),
            KeyValue::new("abc", "0123456"),
        ];
        let mut by_vec = AttributeBudget::new(40);
        let mut one_by_one = AttributeBudget::new(40);
        assert_eq!(by_vec.admit_vec(list.clone()), list);
        assert_eq!(one_by_one.admit_all(list.clone()), list);
        assert_eq!((by_vec.used(), by_vec.is_truncated()), (12, false));
        assert_eq!((one_by_one.used(), one_by_one.is_truncated()), (12, false));
    }

    #[test]
    fn truncate_str_cases() {
        let check = |text: &str, max: usize, expected: &str| {
            assert_eq!(truncate_str(text, max), expected, "{text:?} {max}");
        };
        check("short", 10, "short");
        check("0123456789abcdefghij", 18, "0123…[truncated]");
        check("ééééééééé", 16, "é…[truncated]");
        check("0123456789abcdefghij", 5, "");
    }

    #[test]
    fn span_counter_caps_and_counts() {
        let counter = SpanCounter::default();
        let taken = (0..MAX_SPANS_PER_JOB + 25)
            .filter(|_| counter.acquire())
            .count();
        assert_eq!(taken, MAX_SPANS_PER_JOB);
        assert_eq!(counter.dropped.load(Ordering::SeqCst), 25);
    }

    #[test]
    fn guarded_catches_panics() {
        assert_eq!(guarded(1, "test", || 7), Some(7));
        let caught: Option<()> = guarded(1, "test", || panic!("boom"));
        assert_eq!(caught, None);
    }

    #[test]
    fn disabled_telemetry_accepts_every_call() {
        let mut telemetry = JobTelemetry::disabled(9);
        assert!(!telemetry.is_enabled());
        telemetry.set_attribute(KeyValue::new("a", 1));
        let mut child = telemetry.child("get_sources", vec![]);
        assert!(!child.is_recording());
        child.set_attribute(KeyValue::new("b", 2));
        child.end(SpanOutcome::Ok);
        assert!(telemetry
            .finish(&JobOutcome::Success, SystemTime::now())
            .is_none());
    }
}
