//! Traces read back from ClickHouse: the rows of `otel.otel_traces` for one
//! trace, assembled into a tree that tests check and the demo prints.

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::{Context, Result};
use serde_json::Value;

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

const COLUMNS: &str = "TraceId, SpanId, ParentSpanId, SpanName, ServiceName, ScopeName, \
     toUnixTimestamp64Nano(Timestamp) AS StartNs, Duration, StatusCode, StatusMessage, \
     SpanAttributes, ResourceAttributes";

/// All spans of a trace, oldest first.
pub fn spans_of_trace(clickhouse: &ClickHouse, trace_id: &str) -> Result<Vec<StoredSpan>> {
    select(clickhouse, &format!("TraceId = '{}'", escape(trace_id)))
}

/// Spans matching a WHERE clause over `otel.otel_traces`, oldest first.
pub fn select(clickhouse: &ClickHouse, filter: &str) -> Result<Vec<StoredSpan>> {
    let rows = clickhouse.rows(&format!(
        "SELECT {COLUMNS} FROM otel.otel_traces WHERE {filter} ORDER BY Timestamp, SpanName"
    ))?;
    rows.iter().map(parse_row).collect()
}

fn parse_row(row: &Value) -> Result<StoredSpan> {
    let text = |key: &str| -> String {
        match &row[key] {
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            other => other.to_string(),
        }
    };
    let map = |key: &str| -> BTreeMap<String, String> {
        row[key]
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| {
                        let v = v
                            .as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| v.to_string());
                        (k.clone(), v)
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    Ok(StoredSpan {
        trace_id: text("TraceId"),
        span_id: text("SpanId"),
        parent_span_id: text("ParentSpanId"),
        name: text("SpanName"),
        service: text("ServiceName"),
        scope: text("ScopeName"),
        start_ns: text("StartNs").parse().context("StartNs")?,
        duration_ns: text("Duration").parse().context("Duration")?,
        status_code: text("StatusCode"),
        status_message: text("StatusMessage"),
        attributes: map("SpanAttributes"),
        resource: map("ResourceAttributes"),
    })
}

fn escape(s: &str) -> String {
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
