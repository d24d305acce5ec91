//! The runner's own telemetry metrics, rendered in Prometheus text exposition
//! format (the reference runner serves them as `GET /metrics` on
//! `--metrics-listen`).
//!
//! ```text
//! ci_telemetry_spans_total                      spans handed to the export client (one per endpoint)
//! ci_telemetry_spans_exported_total             accepted by a collector
//! ci_telemetry_spans_dropped_total{reason}      queue_full | max_age | permanent_error | rejected | shutdown
//! ci_telemetry_export_errors_total              failed export requests (retried or not)
//! ci_telemetry_buffer_spans                     spans waiting for export now
//! ci_telemetry_buffer_bytes                     their encoded size
//! ci_telemetry_log_records_total                log records handed to the export client (one per endpoint)
//! ci_telemetry_log_records_exported_total       accepted by a collector
//! ci_telemetry_log_records_dropped_total{reason} the same reasons as spans
//! ```
//!
//! At any moment `spans_total = exported_total + sum(dropped_total) +
//! buffer_spans`, give or take the spans being counted at that instant; the
//! same holds for log records (`buffer_spans` counts both: spans and records
//! share the buffer, so the invariant is exact for the sum of the two).
//! Hand-written: a dozen series do not need a metrics library.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use crate::export::accounting::DropReason;
use crate::export::logs_encode::Signal;

/// Counters shared by every export hub of the process.
#[derive(Debug, Default)]
pub struct Metrics {
    spans: AtomicU64,
    exported: AtomicU64,
    dropped: [AtomicU64; DropReason::ALL.len()],
    export_errors: AtomicU64,
    buffer_spans: AtomicI64,
    buffer_bytes: AtomicI64,
    log_records: AtomicU64,
    log_exported: AtomicU64,
    log_dropped: [AtomicU64; DropReason::ALL.len()],
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    pub spans: u64,
    pub exported: u64,
    pub dropped: [u64; DropReason::ALL.len()],
    pub export_errors: u64,
    pub buffer_spans: i64,
    pub buffer_bytes: i64,
    pub log_records: u64,
    pub log_exported: u64,
    pub log_dropped: [u64; DropReason::ALL.len()],
}

impl MetricsSnapshot {
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason.index()]
    }

    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().sum()
    }

    pub fn log_dropped(&self, reason: DropReason) -> u64 {
        self.log_dropped[reason.index()]
    }

    pub fn log_dropped_total(&self) -> u64 {
        self.log_dropped.iter().sum()
    }
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    pub(crate) fn span_created(&self) {
        self.spans.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn exported(&self, n: u64) {
        self.exported.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn dropped(&self, reason: DropReason, n: u64) {
        self.dropped[reason.index()].fetch_add(n, Ordering::Relaxed);
    }

    /// An item of `signal` handed to the export client.
    pub(crate) fn created(&self, signal: Signal) {
        match signal {
            Signal::Traces => self.span_created(),
            Signal::Logs => {
                self.log_records.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub(crate) fn exported_signal(&self, signal: Signal, n: u64) {
        match signal {
            Signal::Traces => self.exported(n),
            Signal::Logs => {
                self.log_exported.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    pub(crate) fn dropped_signal(&self, signal: Signal, reason: DropReason, n: u64) {
        match signal {
            Signal::Traces => self.dropped(reason, n),
            Signal::Logs => {
                self.log_dropped[reason.index()].fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    pub(crate) fn export_error(&self) {
        self.export_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn buffer_add(&self, spans: i64, bytes: i64) {
        self.buffer_spans.fetch_add(spans, Ordering::Relaxed);
        self.buffer_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        let mut dropped = [0; DropReason::ALL.len()];
        for (slot, counter) in dropped.iter_mut().zip(&self.dropped) {
            *slot = counter.load(Ordering::Relaxed);
        }
        let mut log_dropped = [0; DropReason::ALL.len()];
        for (slot, counter) in log_dropped.iter_mut().zip(&self.log_dropped) {
            *slot = counter.load(Ordering::Relaxed);
        }
        MetricsSnapshot {
            log_records: self.log_records.load(Ordering::Relaxed),
            log_exported: self.log_exported.load(Ordering::Relaxed),
            log_dropped,
            spans: self.spans.load(Ordering::Relaxed),
            exported: self.exported.load(Ordering::Relaxed),
            dropped,
            export_errors: self.export_errors.load(Ordering::Relaxed),
            buffer_spans: self.buffer_spans.load(Ordering::Relaxed),
            buffer_bytes: self.buffer_bytes.load(Ordering::Relaxed),
        }
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let s = self.snapshot();
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, String)]| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        let plain = |v: String| vec![(String::new(), v)];
        metric(
            "ci_telemetry_spans_total",
            "counter",
            "Spans handed to the export client, once per endpoint.",
            &plain(s.spans.to_string()),
        );
        metric(
            "ci_telemetry_spans_exported_total",
            "counter",
            "Spans accepted by a collector.",
            &plain(s.exported.to_string()),
        );
        let dropped: Vec<_> = DropReason::ALL
            .iter()
            .map(|r| {
                (
                    format!("{{reason=\"{}\"}}", r.as_str()),
                    s.dropped(*r).to_string(),
                )
            })
            .collect();
        metric(
            "ci_telemetry_spans_dropped_total",
            "counter",
            "Spans not exported, by reason.",
            &dropped,
        );
        metric(
            "ci_telemetry_export_errors_total",
            "counter",
            "Export requests that failed (retried or not).",
            &plain(s.export_errors.to_string()),
        );
        metric(
            "ci_telemetry_buffer_spans",
            "gauge",
            "Spans waiting for export.",
            &plain(s.buffer_spans.max(0).to_string()),
        );
        metric(
            "ci_telemetry_buffer_bytes",
            "gauge",
            "Encoded size of the spans waiting for export.",
            &plain(s.buffer_bytes.max(0).to_string()),
        );
        metric(
            "ci_telemetry_log_records_total",
            "counter",
            "Job log records handed to the export client, once per endpoint.",
            &plain(s.log_records.to_string()),
        );
        metric(
            "ci_telemetry_log_records_exported_total",
            "counter",
            "Job log records accepted by a collector.",
            &plain(s.log_exported.to_string()),
        );
        let log_dropped: Vec<_> = DropReason::ALL
            .iter()
            .map(|r| {
                (
                    format!("{{reason=\"{}\"}}", r.as_str()),
                    s.log_dropped(*r).to_string(),
                )
            })
            .collect();
        metric(
            "ci_telemetry_log_records_dropped_total",
            "counter",
            "Job log records not exported, by reason.",
            &log_dropped,
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_series() {
        let metrics = Metrics::default();
        metrics.span_created();
        metrics.span_created();
        metrics.exported(1);
        metrics.dropped(DropReason::MaxAge, 1);
        metrics.export_error();
        metrics.buffer_add(3, 300);
        metrics.buffer_add(-1, -100);
        metrics.created(Signal::Logs);
        metrics.created(Signal::Logs);
        metrics.created(Signal::Logs);
        metrics.exported_signal(Signal::Logs, 2);
        metrics.dropped_signal(Signal::Logs, DropReason::QueueFull, 1);
        let text = metrics.render();
        for line in [
            "ci_telemetry_spans_total 2",
            "ci_telemetry_spans_exported_total 1",
            "ci_telemetry_spans_dropped_total{reason=\"max_age\"} 1",
            "ci_telemetry_spans_dropped_total{reason=\"queue_full\"} 0",
            "ci_telemetry_spans_dropped_total{reason=\"shutdown\"} 0",
            "ci_telemetry_export_errors_total 1",
            "ci_telemetry_buffer_spans 2",
            "ci_telemetry_buffer_bytes 200",
            "# TYPE ci_telemetry_buffer_spans gauge",
            "ci_telemetry_log_records_total 3",
            "ci_telemetry_log_records_exported_total 2",
            "ci_telemetry_log_records_dropped_total{reason=\"queue_full\"} 1",
            "ci_telemetry_log_records_dropped_total{reason=\"max_age\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }
}
