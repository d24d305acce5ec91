//! Traces read back from ClickHouse: the rows of `otel.otel_traces` for one
//! trace, assembled into a tree that tests check and the demo prints.

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::Result;
use serde::Deserialize;

use crate::clickhouse::ClickHouse;

/// One span as stored by the collector.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredSpan {
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub name: String,
    pub service: String,
    pub scope: String,
    /// Nanoseconds since the epoch.
    pub start_ns: u128,
    pub duration_ns: u64,
    /// `Ok`, `Error` or `Unset`, as the exporter writes `StatusCode`.
    pub status_code: String,
    pub status_message: String,
    pub attributes: BTreeMap<String, String>,
    pub resource: BTreeMap<String, String>,
}

impl StoredSpan {
    pub fn end_ns(&self) -> u128 {
        self.start_ns + u128::from(self.duration_ns)
    }

    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

/// A row of `otel.otel_traces` as [`select`] reads it; column names as in
/// the exporter's DDL.
#[derive(Debug, clickhouse::Row, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SpanRow {
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    span_name: String,
    service_name: String,
    scope_name: String,
    start_ns: i64,
    duration: u64,
    status_code: String,
    status_message: String,
    span_attributes: Vec<(String, String)>,
    resource_attributes: Vec<(String, String)>,
}

impl From<SpanRow> for StoredSpan {
    fn from(row: SpanRow) -> StoredSpan {
        StoredSpan {
            trace_id: row.trace_id,
            span_id: row.span_id,
            parent_span_id: row.parent_span_id,
            name: row.span_name,
            service: row.service_name,
            scope: row.scope_name,
            start_ns: u128::try_from(row.start_ns).unwrap_or(0),
            duration_ns: row.duration,
            status_code: row.status_code,
            status_message: row.status_message,
            attributes: row.span_attributes.into_iter().collect(),
            resource: row.resource_attributes.into_iter().collect(),
        }
    }
}

const COLUMNS: &str = "TraceId, SpanId, ParentSpanId, SpanName, ServiceName, ScopeName, \
     toUnixTimestamp64Nano(Timestamp) AS StartNs, Duration, StatusCode, StatusMessage, \
     SpanAttributes, ResourceAttributes";

/// All spans of a trace, oldest first.
pub fn spans_of_trace(clickhouse: &ClickHouse, trace_id: &str) -> Result<Vec<StoredSpan>> {
    select(clickhouse, &format!("TraceId = '{}'", escape(trace_id)))
}

/// Spans matching a WHERE clause over `otel.otel_traces`, oldest first.
pub fn select(clickhouse: &ClickHouse, filter: &str) -> Result<Vec<StoredSpan>> {
    let rows = clickhouse.fetch_all::<SpanRow>(&format!(
        "SELECT {COLUMNS} FROM otel.otel_traces WHERE {filter} ORDER BY Timestamp, SpanName"
    ))?;
    Ok(rows.into_iter().map(StoredSpan::from).collect())
}

/// A row of `otel.ci_job_telemetry_traces` (the CI view), the columns tests
/// check.
#[derive(Debug, Clone, PartialEq, clickhouse::Row, Deserialize)]
pub struct CiSpanRow {
    pub trace_id: String,
    pub span_id: String,
    pub span_name: String,
    pub service_name: String,
    pub build_id: u64,
    pub pipeline_id: u64,
    pub project_id: u64,
    pub job_status: String,
}

/// CI view rows matching a WHERE clause, by `build_id` then `span_name`.
pub fn ci_rows(clickhouse: &ClickHouse, filter: &str) -> Result<Vec<CiSpanRow>> {
    clickhouse.fetch_all(&format!(
        "SELECT trace_id, span_id, span_name, service_name, build_id, pipeline_id, project_id, \
         job_status FROM otel.ci_job_telemetry_traces WHERE {filter} ORDER BY build_id, span_name"
    ))
}

/// A row of `otel.otel_logs`.
#[derive(Debug, Clone, PartialEq, clickhouse::Row, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct LogRecord {
    pub trace_id: String,
    pub span_id: String,
    pub severity_text: String,
    pub service_name: String,
    pub body: String,
    pub log_attributes: Vec<(String, String)>,
    pub resource_attributes: Vec<(String, String)>,
}

/// Log records matching a WHERE clause over `otel.otel_logs`, oldest first.
pub fn log_records(clickhouse: &ClickHouse, filter: &str) -> Result<Vec<LogRecord>> {
    clickhouse.fetch_all(&format!(
        "SELECT TraceId, SpanId, SeverityText, ServiceName, Body, LogAttributes, \
         ResourceAttributes FROM otel.otel_logs WHERE {filter} ORDER BY Timestamp"
    ))
}

/// `s` as the inside of a ClickHouse string literal.
pub fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\'', "\\'")
}

/// The spans of a trace as a forest: roots are spans whose parent is absent.
#[derive(Debug)]
pub struct Tree {
    pub spans: Vec<StoredSpan>,
    children: HashMap<String, Vec<usize>>,
    pub roots: Vec<usize>,
}

impl Tree {
    pub fn new(mut spans: Vec<StoredSpan>) -> Tree {
        spans.sort_by(|a, b| a.start_ns.cmp(&b.start_ns).then(a.name.cmp(&b.name)));
        let ids: HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
        let mut children: HashMap<String, Vec<usize>> = HashMap::new();
        let mut roots = Vec::new();
        for (i, span) in spans.iter().enumerate() {
            if span.parent_span_id.is_empty() || !ids.contains(span.parent_span_id.as_str()) {
                roots.push(i);
            } else {
                children
                    .entry(span.parent_span_id.clone())
                    .or_default()
                    .push(i);
            }
        }
        Tree {
            spans,
            children,
            roots,
        }
    }

    pub fn children_of(&self, index: usize) -> &[usize] {
        self.children
            .get(&self.spans[index].span_id)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    pub fn find(&self, name: &str) -> Option<&StoredSpan> {
        self.spans.iter().find(|s| s.name == name)
    }

    /// The subtree under the root whose span is `root`, as indented lines:
    /// name, service, duration, status.
    pub fn render_from(&self, root: usize) -> String {
        let mut out = String::new();
        self.render_into(root, 0, &mut out);
        out
    }

    pub fn render(&self) -> String {
        self.roots.iter().map(|r| self.render_from(*r)).collect()
    }

    /// [`Tree::render_from`] with `notes[span_id]` (e.g. a stage's last log
    /// lines) printed under each span, prefixed with `| `.
    pub fn render_with_notes(&self, root: usize, notes: &HashMap<String, Vec<String>>) -> String {
        let mut out = String::new();
        self.render_notes_into(root, 0, notes, &mut out);
        out
    }

    fn render_notes_into(
        &self,
        index: usize,
        depth: usize,
        notes: &HashMap<String, Vec<String>>,
        out: &mut String,
    ) {
        let mut line = String::new();
        self.render_line(index, depth, &mut line);
        out.push_str(&line);
        for note in notes
            .get(&self.spans[index].span_id)
            .map(Vec::as_slice)
            .unwrap_or(&[])
        {
            out.push_str(&format!("{}  | {note}\n", "  ".repeat(depth)));
        }
        for child in self.children_of(index) {
            self.render_notes_into(*child, depth + 1, notes, out);
        }
    }

    fn render_into(&self, index: usize, depth: usize, out: &mut String) {
        self.render_line(index, depth, out);
        for child in self.children_of(index) {
            self.render_into(*child, depth + 1, out);
        }
    }

    fn render_line(&self, index: usize, depth: usize, out: &mut String) {
        let span = &self.spans[index];
        let status = match span.status_code.as_str() {
            "Error" | "STATUS_CODE_ERROR" => format!("  ERROR {}", span.status_message),
            _ => String::new(),
        };
        // CI Function spans share one name; show which function it was.
        let name = match span.attribute("ci.function.name") {
            Some(function) => format!("{} {function}", span.name),
            None => span.name.clone(),
        };
        let label = format!("{}{name}", "  ".repeat(depth));
        out.push_str(&format!(
            "{label:<40} {:>10}  {}{status}\n",
            format_duration(span.duration_ns),
            span.service
        ));
    }
}

/// `1.234s`, `56.7ms`, `890µs`.
pub fn format_duration(ns: u64) -> String {
    let ns = ns as f64;
    if ns >= 1e9 {
        format!("{:.3}s", ns / 1e9)
    } else if ns >= 1e6 {
        format!("{:.1}ms", ns / 1e6)
    } else {
        format!("{:.0}µs", ns / 1e3)
    }
}
