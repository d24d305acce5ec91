//! Telemetry of one runner: negotiation, exporter choice and the job span,
//! with one log line per decision.
//!
//! Log lines (stderr, one per event):
//!
//! ```text
//! Telemetry disabled: features.job_telemetry is false job_id=42
//! Telemetry enabled endpoint=http/protobuf+http://localhost:4318/v1/traces job_id=42 contract=v1 trace_id=4bf9… parent_span_id=00f0… span_id=…
//! Telemetry flushed spans=1 exported=1 dropped=0 elapsed=3ms job_id=42
//! Telemetry flush incomplete spans=3 exported=0 dropped=1 buffered=2 elapsed=5001ms deadline_exceeded=true dropped_by=queue_full=1 endpoint=… (exported=0 dropped=1 buffered=2 error="…") job_id=42
//! Telemetry settled spans=3 exported=2 dropped=1 elapsed=31200ms dropped_by=queue_full=1 endpoint=… (…) job_id=42
//! ```
//!
//! (the fields, `job_id=42`, follow the message as tracing-subscriber's
//! `fmt` prints them; ci-runner's README lists the field names).
//!
//! The `flushed`/`flush incomplete` line comes when the job's flush deadline
//! ends (or earlier, when every span is decided). Spans still `buffered`
//! then stay in the runner's buffer and are retried; the `settled` line
//! follows when the last of them is exported or dropped (`max_age`,
//! `shutdown`, ...), with the job's final numbers.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::Value;

use crate::config::ExportSettings;
use crate::export::logs_encode::Signal;
use crate::export::{Auth, ExportHub, ExportTarget, FlushReport, ShutdownReport, SpanSink};
use crate::job::{
    guarded, JobSpanInfo, JobTelemetry, JobTelemetryStart, PendingFlush, RunnerIdentity,
};
use crate::metrics::Metrics;
use crate::negotiate::{
    negotiate_with, ContractVersion, DisabledReason, EndpointAuth, Negotiation, RunnerReason,
    TelemetryPlan,
};

/// The telemetry side of one runner (one `[[runners]]` entry).
#[derive(Debug)]
pub struct RunnerTelemetry {
    settings: ExportSettings,
    runner: RunnerIdentity,
    hub: ExportHub,
}

impl RunnerTelemetry {
    /// With metrics of its own; see [`RunnerTelemetry::with_metrics`].
    pub fn new(settings: ExportSettings, runner: RunnerIdentity) -> Self {
        RunnerTelemetry::with_metrics(settings, runner, Metrics::new())
    }

    /// Counting into `metrics`, which the runners of one process share (and
    /// the metrics endpoint shows).
    pub fn with_metrics(
        settings: ExportSettings,
        runner: RunnerIdentity,
        metrics: Arc<Metrics>,
    ) -> Self {
        let hub = ExportHub::new(&settings, metrics);
        if settings.enabled {
            let b = &settings.buffer;
            let path = |p: &Option<std::path::PathBuf>| {
                p.as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "-".into())
            };
            tracing::info!(
                runner = %runner.name,
                buffer_max_spans = b.max_spans,
                buffer_max_bytes = b.max_bytes,
                max_age = %format_args!("{}s", b.max_age.as_secs_f64()),
                retry_backoff = %format_args!(
                    "{}ms..{}ms",
                    b.initial_backoff.as_millis(),
                    b.max_backoff.as_millis()
                ),
                export_timeout = %format_args!("{}ms", settings.export_timeout.as_millis()),
                shutdown_timeout = %format_args!("{}ms", settings.shutdown_timeout.as_millis()),
                ca_file = %path(&settings.ca_file),
                bearer_token_file = %path(&settings.bearer_token_file),
                "Telemetry export configured"
            );
        }
        RunnerTelemetry {
            settings,
            runner,
            hub,
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        self.hub.metrics()
    }

    /// The runner's export buffer and workers.
    pub fn hub(&self) -> &ExportHub {
        &self.hub
    }

    /// Stops exporting: spans still buffered get one final attempt within
    /// `shutdown_timeout`; the rest are dropped as `shutdown`.
    pub async fn shutdown(&self) -> ShutdownReport {
        self.hub.shutdown().await
    }

    pub fn settings(&self) -> &ExportSettings {
        &self.settings
    }

    pub fn runner(&self) -> &RunnerIdentity {
        &self.runner
    }

    pub fn flush_timeout(&self) -> Duration {
        self.settings.flush_timeout
    }

    /// Where an enabled job's spans go: the payload's endpoints (contract
    /// v2), or else the static endpoint (contract v1).
    pub fn targets(&self, plan: &TelemetryPlan) -> Vec<ExportTarget> {
        if plan.endpoints.is_empty() {
            let endpoint = &self.settings.endpoint;
            return vec![ExportTarget {
                transport: endpoint.transport,
                url: endpoint.url.clone(),
                tls: endpoint.url.starts_with("https://"),
                headers: endpoint.headers.clone(),
                auth: match &self.settings.bearer_token_file {
                    Some(path) => Auth::BearerTokenFile(path.clone()),
                    None => Auth::None,
                },
            }];
        }
        plan.endpoints
            .iter()
            .map(|e| ExportTarget {
                transport: e.transport,
                url: e.url.clone(),
                tls: e.tls,
                // Static headers and tokens belong to the static collector.
                headers: Vec::new(),
                auth: match &e.auth {
                    EndpointAuth::None => Auth::None,
                    EndpointAuth::HttpBearerGcpOidc { audience } => Auth::GcpOidc {
                        audience: audience.clone(),
                    },
                },
            })
            .collect()
    }

    /// Where an enabled job's log records go when log export is on: the
    /// logs URL of each of the payload's endpoints (contract v2), or else the
    /// static logs endpoint. Empty when log export is off.
    pub fn log_targets(&self, plan: &TelemetryPlan) -> Vec<ExportTarget> {
        let Some(logs) = &self.settings.logs else {
            return Vec::new();
        };
        if plan.endpoints.is_empty() {
            return vec![ExportTarget {
                transport: logs.transport,
                url: logs.url.clone(),
                tls: logs.url.starts_with("https://"),
                headers: logs.headers.clone(),
                auth: match &self.settings.bearer_token_file {
                    Some(path) => Auth::BearerTokenFile(path.clone()),
                    None => Auth::None,
                },
            }];
        }
        self.targets(plan)
            .into_iter()
            .map(|target| ExportTarget {
                url: crate::config::logs_url(target.transport, &target.url),
                ..target
            })
            .collect()
    }

    /// Negotiates telemetry for a job and, when enabled, starts its
    /// `job_execution` span at `start_time`. Logs one line with the decision.
    /// Never fails and never panics: every problem ends in a disabled
    /// [`JobTelemetry`].
    pub fn start_job(
        &self,
        payload: &Value,
        job: &JobSpanInfo,
        start_time: SystemTime,
    ) -> JobTelemetry {
        let job_id = job.job_id;
        match guarded(job_id, "start_job", || {
            self.start_job_inner(payload, job, start_time)
        }) {
            Some(Ok(telemetry)) => telemetry,
            Some(Err(reason)) => {
                tracing::info!(job_id, "Telemetry disabled: {reason}");
                JobTelemetry::disabled(job_id)
            }
            None => JobTelemetry::disabled(job_id),
        }
    }

    fn start_job_inner(
        &self,
        payload: &Value,
        job: &JobSpanInfo,
        start_time: SystemTime,
    ) -> Result<JobTelemetry, DisabledReason> {
        let job_id = job.job_id;
        if !self.settings.enabled {
            return Err(DisabledReason::Runner(RunnerReason::Configured));
        }
        let plan = match negotiate_with(payload, self.settings.negotiation) {
            Negotiation::Disabled(reason) => return Err(reason),
            Negotiation::Enabled(plan) => plan,
        };
        let mut sinks: Vec<Box<dyn SpanSink>> = Vec::new();
        let mut notes = Vec::new();
        let mut failed = Vec::new();
        for target in self.targets(&plan) {
            match self.hub.build(&target) {
                Ok(sink) => {
                    if target.auth != Auth::None {
                        notes.push(format!("auth[{}]={}", sinks.len(), target.auth));
                    }
                    sinks.push(sink);
                }
                Err(error) => {
                    notes.push(format!("skipped=[{error}]"));
                    failed.push(error);
                }
            }
        }
        if sinks.is_empty() {
            return Err(DisabledReason::Runner(RunnerReason::NoExporter(failed)));
        }
        let mut log_sinks: Vec<Box<dyn SpanSink>> = Vec::new();
        for target in self.log_targets(&plan) {
            match self.hub.build_signal(&target, Signal::Logs) {
                Ok(sink) => log_sinks.push(sink),
                Err(error) => notes.push(format!("logs_skipped=[{error}]")),
            }
        }
        let mut endpoints: Vec<String> = sinks
            .iter()
            .map(|s| format!("endpoint={}", s.label()))
            .collect();
        endpoints.extend(log_sinks.iter().map(|s| format!("logs={}", s.label())));
        let telemetry = JobTelemetry::start(JobTelemetryStart {
            trace_context: plan.trace_context,
            job,
            runner: &self.runner,
            service_name: &self.settings.service_name,
            start_time,
            sinks,
            log_sinks,
        });
        let Some(span) = telemetry.span_context() else {
            return Err(DisabledReason::Runner(RunnerReason::SpanNotStarted));
        };
        let contract = match plan.contract {
            ContractVersion::V1 => "v1",
            ContractVersion::V2 => "v2",
        };
        let mut line = endpoints.join(" ");
        for skipped in &plan.skipped {
            line.push_str(&format!(" skipped=[{skipped}]"));
        }
        for note in notes {
            line.push(' ');
            line.push_str(&note);
        }
        tracing::info!(
            job_id,
            contract = %contract,
            trace_id = %plan.trace_context.trace_id(),
            parent_span_id = %plan.trace_context.parent_span_id(),
            span_id = %span.span_id(),
            "Telemetry enabled {line}"
        );
        Ok(telemetry)
    }

    /// Flushes a finished job's spans within the configured deadline and logs
    /// the account (one line).
    pub async fn flush_job(&self, pending: PendingFlush) -> FlushReport {
        flush_and_log(pending, self.settings.flush_timeout).await
    }
}

/// Flushes within `deadline` and logs one line: INFO when everything was
/// exported, WARN when spans were dropped or are still buffered (the job
/// itself is unaffected; buffered spans keep being retried, and a `settled`
/// line follows when the last of them is decided).
pub async fn flush_and_log(pending: PendingFlush, deadline: Duration) -> FlushReport {
    let job_id = pending.job_id();
    let report = pending.flush(deadline).await;
    if report.dropped() == 0 && report.buffered() == 0 && !report.panicked {
        tracing::info!(job_id, "Telemetry flushed {report}");
    } else {
        tracing::warn!(job_id, "Telemetry flush incomplete {report}");
    }
    report
}
