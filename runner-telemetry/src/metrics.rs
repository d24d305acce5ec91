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
//! ```
//!
//! At any moment `spans_total = exported_total + sum(dropped_total) +
//! buffer_spans`, give or take the spans being counted at that instant.
//! Hand-written: six series do not need a metrics library.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use crate::export::accounting::DropReason;

/// Counters shared by every export hub of the process.
#[derive(Debug, Default)]
pub struct Metrics {
    spans: AtomicU64,
    exported: AtomicU64,
    dropped: [AtomicU64; DropReason::ALL.len()],
    export_errors: AtomicU64,
    buffer_spans: AtomicI64,
    buffer_bytes: AtomicI64,
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
}

impl MetricsSnapshot {
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason.index()]
    }

    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().sum()
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
        MetricsSnapshot {
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
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }
}
