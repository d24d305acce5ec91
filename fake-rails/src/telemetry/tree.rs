//! Stored spans -> the shapes the API answers and the pages draw. No I/O.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use super::query::{RawLog, RawSpan};

/// Which side of CI emitted a span.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// GitLab itself (`gitlab-ci-rails`).
    Rails,
    /// The runner (`gitlab-ci-runner`, or upstream's `runner`).
    Runner,
    /// Anything else (`gitlab-ci-job-router`, ...).
    Other,
}

impl Side {
    pub fn of_service(service: &str) -> Side {
        match service {
            "gitlab-ci-rails" => Side::Rails,
            "gitlab-ci-runner" | "runner" => Side::Runner,
            _ => Side::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Side::Rails => "rails",
            Side::Runner => "runner",
            Side::Other => "other",
        }
    }
}

/// A log record under its span.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogRecord {
    /// RFC 3339 with nanoseconds.
    pub time: String,
    /// From the job's first span.
    pub offset_ns: i64,
    pub severity: String,
    pub body: String,
}

/// A span and its children.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Span {
    pub span_id: String,
    pub parent_span_id: String,
    pub name: String,
    pub service: String,
    pub side: Side,
    /// RFC 3339 with nanoseconds.
    pub start: String,
    /// From the job's (or pipeline's) first span.
    pub offset_ns: i64,
    pub duration_ns: u64,
    /// `ok`, `error` or `unset`.
    pub status: &'static str,
    pub status_message: String,
    pub attributes: BTreeMap<String, String>,
    pub logs: Vec<LogRecord>,
    pub children: Vec<Span>,
}

impl Span {
    pub fn failed(&self) -> bool {
        self.status == "error"
    }

    /// This span and its descendants, depth first, with their depth.
    pub fn walk(&self) -> Vec<(usize, &Span)> {
        let mut out = Vec::new();
        fn visit<'a>(span: &'a Span, depth: usize, out: &mut Vec<(usize, &'a Span)>) {
            out.push((depth, span));
            for child in &span.children {
                visit(child, depth + 1, out);
            }
        }
        visit(self, 0, &mut out);
        out
    }
}

/// Who a job is, from Rails' own records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobSummary {
    pub id: u64,
    pub name: String,
    pub stage: String,
    pub status: String,
    pub pipeline_id: u64,
    pub project_id: u64,
    pub web_url: String,
}

/// `GET /api/v4/projects/:id/jobs/:job_id/telemetry`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobTelemetry {
    pub job: JobSummary,
    pub trace_id: String,
    /// The first span's start, RFC 3339.
    pub started_at: String,
    /// From the first span's start to the last span's end.
    pub duration_ns: u64,
    /// `job_pending`'s duration, when Rails' span arrived.
    pub queued_duration_ns: Option<u64>,
    /// `job_execution`'s duration, when the runner's span arrived.
    pub execution_duration_ns: Option<u64>,
    /// `ci.telemetry.dropped_spans` of `job_execution`: spans the runner
    /// dropped for this job (limits, masking budget); `None` until it arrived.
    pub dropped_spans: Option<u64>,
    pub span_count: usize,
    pub log_count: usize,
    /// Whether both Rails' `job_lifecycle` and the runner's `job_execution` arrived.
    pub complete: bool,
    pub spans: Vec<Span>,
}

fn status_word(code: &str) -> &'static str {
    match code.to_ascii_lowercase().as_str() {
        "error" | "status_code_error" => "error",
        "ok" | "status_code_ok" => "ok",
        _ => "unset",
    }
}

/// `2026-01-02T03:04:05.123456789Z`.
pub fn rfc3339_nanos(unix_ns: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ns)) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.nanosecond()
        ),
        Err(_) => unix_ns.to_string(),
    }
}

fn end_ns(span: &RawSpan) -> i64 {
    span.start_ns
        .saturating_add(i64::try_from(span.duration_ns).unwrap_or(i64::MAX))
}

/// Spans as a forest: a span whose parent is not among them is a root.
/// Children and roots are in start order. Logs go to their span; a log
/// without a known span goes to the first root.
pub fn build_forest(spans: &[RawSpan], logs: &[RawLog], origin_ns: i64) -> Vec<Span> {
    let mut sorted: Vec<&RawSpan> = spans.iter().collect();
    sorted.sort_by(|a, b| {
        (a.start_ns, &a.span_name, &a.span_id).cmp(&(b.start_ns, &b.span_name, &b.span_id))
    });
    let index: HashMap<&str, usize> = sorted
        .iter()
        .enumerate()
        .map(|(i, s)| (s.span_id.as_str(), i))
        .collect();
    let mut logs_of: HashMap<usize, Vec<LogRecord>> = HashMap::new();
    for log in logs {
        let owner = index.get(log.span_id.as_str()).copied().unwrap_or(0);
        logs_of.entry(owner).or_default().push(LogRecord {
            time: rfc3339_nanos(log.time_ns),
            offset_ns: log.time_ns - origin_ns,
            severity: log.severity.clone(),
            body: log.body.clone(),
        });
    }
    let mut children: HashMap<usize, Vec<usize>> = HashMap::new();
    let mut roots = Vec::new();
    for (i, span) in sorted.iter().enumerate() {
        match index.get(span.parent_span_id.as_str()) {
            Some(&parent) if parent != i => children.entry(parent).or_default().push(i),
            _ => roots.push(i),
        }
    }
    // A cycle in the parent links would leave spans unreachable from a root;
    // `placed` makes every span appear exactly once.
    let mut placed = vec![false; sorted.len()];
    fn make(
        i: usize,
        sorted: &[&RawSpan],
        children: &HashMap<usize, Vec<usize>>,
        logs_of: &mut HashMap<usize, Vec<LogRecord>>,
        placed: &mut Vec<bool>,
        origin_ns: i64,
    ) -> Span {
        placed[i] = true;
        let raw = sorted[i];
        let kids = children
            .get(&i)
            .map(|c| {
                c.iter()
                    .filter(|&&k| !placed[k])
                    .copied()
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
            .into_iter()
            .map(|k| make(k, sorted, children, logs_of, placed, origin_ns))
            .collect();
        Span {
            span_id: raw.span_id.clone(),
            parent_span_id: raw.parent_span_id.clone(),
            name: raw.span_name.clone(),
            service: raw.service_name.clone(),
            side: Side::of_service(&raw.service_name),
            start: rfc3339_nanos(raw.start_ns),
            offset_ns: raw.start_ns - origin_ns,
            duration_ns: raw.duration_ns,
            status: status_word(&raw.status_code),
            status_message: raw.status_message.clone(),
            attributes: raw.metadata.iter().cloned().collect(),
            logs: logs_of.remove(&i).unwrap_or_default(),
            children: kids,
        }
    }
    let mut forest = Vec::new();
    for i in roots.into_iter().chain(0..sorted.len()) {
        if !placed[i] {
            forest.push(make(
                i,
                &sorted,
                &children,
                &mut logs_of,
                &mut placed,
                origin_ns,
            ));
        }
    }
    forest
}

fn named<'a>(spans: &'a [RawSpan], name: &str) -> Option<&'a RawSpan> {
    spans.iter().find(|s| s.span_name == name)
}

fn attribute<'a>(span: &'a RawSpan, key: &str) -> Option<&'a str> {
    span.metadata
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// A job's telemetry; `None` when `spans` is empty.
pub fn job_telemetry(
    job: JobSummary,
    trace_id: &str,
    spans: &[RawSpan],
    logs: &[RawLog],
) -> Option<JobTelemetry> {
    let origin = spans.iter().map(|s| s.start_ns).min()?;
    let end = spans.iter().map(end_ns).max().unwrap_or(origin);
    let execution = named(spans, "job_execution");
    Some(JobTelemetry {
        job,
        trace_id: trace_id.to_string(),
        started_at: rfc3339_nanos(origin),
        duration_ns: u64::try_from(end - origin).unwrap_or_default(),
        queued_duration_ns: named(spans, "job_pending").map(|s| s.duration_ns),
        execution_duration_ns: execution.map(|s| s.duration_ns),
        dropped_spans: execution.map(|s| {
            attribute(s, "ci.telemetry.dropped_spans")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        }),
        span_count: spans.len(),
        log_count: logs.len(),
        complete: execution.is_some() && named(spans, "job_lifecycle").is_some(),
        spans: build_forest(spans, logs, origin),
    })
}

/// One stage of a job (a child of `job_execution`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StageSummary {
    pub name: String,
    /// From the pipeline's first span.
    pub offset_ns: i64,
    pub duration_ns: u64,
    pub status: &'static str,
}

/// One job of `GET /api/v4/projects/:id/pipelines/:pipeline_id/telemetry`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PipelineJob {
    pub id: u64,
    pub name: String,
    pub stage: String,
    pub status: String,
    pub web_url: String,
    /// Why there is no telemetry for this job; `None` when there is.
    pub telemetry_missing: Option<String>,
    /// Start of `job_pending` (queued), from the pipeline's first span.
    pub queued_offset_ns: Option<i64>,
    pub queued_duration_ns: Option<u64>,
    /// Start of `job_running` (or `job_execution`), from the pipeline's first span.
    pub started_offset_ns: Option<i64>,
    /// `job_running`'s duration (or `job_execution`'s).
    pub duration_ns: Option<u64>,
    /// The span status of the job's run: `ok`, `error` or `unset`.
    pub span_status: Option<&'static str>,
    pub dropped_spans: Option<u64>,
    pub stages: Vec<StageSummary>,
}

/// Who a pipeline is, from Rails' own records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PipelineSummary {
    pub id: u64,
    pub project_id: u64,
    pub status: String,
    #[serde(rename = "ref")]
    pub git_ref: String,
    pub web_url: String,
}

/// `GET /api/v4/projects/:id/pipelines/:pipeline_id/telemetry`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PipelineTelemetry {
    pub pipeline: PipelineSummary,
    pub trace_id: String,
    /// The pipeline's first span's start, RFC 3339.
    pub started_at: String,
    /// From the first span's start to the last span's end.
    pub duration_ns: u64,
    /// In the order Rails lists them (by stage, then as defined).
    pub jobs: Vec<PipelineJob>,
}

/// The pipeline summary: `jobs` with why each has no telemetry (`None`:
/// it should have some); `None` when `spans` is empty.
pub fn pipeline_telemetry(
    pipeline: PipelineSummary,
    trace_id: &str,
    jobs: Vec<(JobSummary, Option<String>)>,
    spans: &[RawSpan],
) -> Option<PipelineTelemetry> {
    let origin = spans.iter().map(|s| s.start_ns).min()?;
    let end = spans.iter().map(end_ns).max().unwrap_or(origin);
    let mut by_job: HashMap<u64, Vec<&RawSpan>> = HashMap::new();
    for span in spans {
        by_job.entry(span.build_id).or_default().push(span);
    }
    let jobs = jobs
        .into_iter()
        .map(|(job, missing)| {
            let own = by_job.remove(&job.id).unwrap_or_default();
            let missing = match (own.is_empty(), missing) {
                (false, _) => None,
                (true, Some(reason)) => Some(reason),
                (true, None) => Some(NOT_ARRIVED.to_string()),
            };
            pipeline_job(&job, &own, origin, missing)
        })
        .collect();
    Some(PipelineTelemetry {
        pipeline,
        trace_id: trace_id.to_string(),
        started_at: rfc3339_nanos(origin),
        duration_ns: u64::try_from(end - origin).unwrap_or_default(),
        jobs,
    })
}

/// The reason given for a job whose spans are not (yet) stored.
pub const NOT_ARRIVED: &str = "its spans have not arrived yet";

/// A job's row of the pipeline summary, from the spans of that job.
pub fn pipeline_job(
    job: &JobSummary,
    spans: &[&RawSpan],
    origin_ns: i64,
    missing: Option<String>,
) -> PipelineJob {
    let find = |name: &str| spans.iter().copied().find(|s| s.span_name == name);
    let pending = find("job_pending");
    let execution = find("job_execution");
    let run = find("job_running").or(execution);
    let mut stages: Vec<StageSummary> = match execution {
        Some(exec) => spans
            .iter()
            .filter(|s| s.parent_span_id == exec.span_id)
            .map(|s| StageSummary {
                name: s.span_name.clone(),
                offset_ns: s.start_ns - origin_ns,
                duration_ns: s.duration_ns,
                status: status_word(&s.status_code),
            })
            .collect(),
        None => Vec::new(),
    };
    stages.sort_by_key(|s| s.offset_ns);
    PipelineJob {
        id: job.id,
        name: job.name.clone(),
        stage: job.stage.clone(),
        status: job.status.clone(),
        web_url: job.web_url.clone(),
        telemetry_missing: missing,
        queued_offset_ns: pending.map(|s| s.start_ns - origin_ns),
        queued_duration_ns: pending.map(|s| s.duration_ns),
        started_offset_ns: run.map(|s| s.start_ns - origin_ns),
        duration_ns: run.map(|s| s.duration_ns),
        span_status: run.map(|s| {
            let own = status_word(&s.status_code);
            match execution {
                Some(e) if status_word(&e.status_code) == "error" => "error",
                _ => own,
            }
        }),
        dropped_spans: execution.map(|s| {
            attribute(s, "ci.telemetry.dropped_spans")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        }),
        stages,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(id: &str, parent: &str, name: &str, start: i64, duration: u64) -> RawSpan {
        RawSpan {
            build_id: 7,
            span_id: id.into(),
            parent_span_id: parent.into(),
            span_name: name.into(),
            service_name: if name.starts_with("job_") && name != "job_execution" {
                "gitlab-ci-rails".into()
            } else {
                "gitlab-ci-runner".into()
            },
            status_code: "Unset".into(),
            status_message: String::new(),
            start_ns: start,
            duration_ns: duration,
            metadata: vec![],
        }
    }

    fn shape(forest: &[Span]) -> Vec<String> {
        forest
            .iter()
            .flat_map(|root| {
                root.walk()
                    .into_iter()
                    .map(|(d, s)| format!("{}{} {}", "  ".repeat(d), s.name, s.offset_ns))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn check(spans: &[RawSpan], expected: &[&str]) {
        let origin = spans.iter().map(|s| s.start_ns).min().unwrap_or(0);
        assert_eq!(shape(&build_forest(spans, &[], origin)), expected);
    }

    #[test]
    fn spans_become_a_tree_in_start_order() {
        check(
            &[
                raw("e", "r", "job_execution", 30, 50),
                raw("r", "l", "job_running", 20, 70),
                raw("l", "", "job_lifecycle", 0, 100),
                raw("p", "l", "job_pending", 0, 20),
                raw("s2", "e", "step_script", 50, 10),
                raw("s1", "e", "get_sources", 35, 10),
            ],
            &[
                "job_lifecycle 0",
                "  job_pending 0",
                "  job_running 20",
                "    job_execution 30",
                "      get_sources 35",
                "      step_script 50",
            ],
        );
    }

    #[test]
    fn orphans_and_cycles_are_roots_and_nothing_is_lost() {
        check(
            &[
                raw("a", "b", "x", 10, 1),
                raw("b", "a", "y", 20, 1),
                raw("c", "missing", "job_execution", 5, 1),
            ],
            &["job_execution 0", "x 5", "  y 15"],
        );
    }

    #[test]
    fn logs_go_under_their_span_and_accounting_is_read() {
        let mut exec = raw("e", "r", "job_execution", 30, 50);
        exec.metadata = vec![("ci.telemetry.dropped_spans".into(), "3".into())];
        exec.status_code = "Error".into();
        let spans = vec![exec, raw("s", "e", "step_script", 40, 5)];
        let logs = vec![RawLog {
            time_ns: 41,
            span_id: "s".into(),
            severity: "INFO".into(),
            body: "hello".into(),
        }];
        let job = JobSummary {
            id: 7,
            name: "build".into(),
            stage: "build".into(),
            status: "failed".into(),
            pipeline_id: 1,
            project_id: 1,
            web_url: String::new(),
        };
        let t = job_telemetry(job, "t", &spans, &logs).unwrap();
        assert_eq!(t.dropped_spans, Some(3));
        assert!(!t.complete);
        assert_eq!(t.duration_ns, 50);
        assert!(t.spans[0].failed());
        assert_eq!(t.spans[0].children[0].logs[0].body, "hello");
        assert_eq!(t.spans[0].children[0].logs[0].offset_ns, 11);
    }

    #[test]
    fn times_print_with_nanoseconds() {
        assert_eq!(
            rfc3339_nanos(1_767_225_600_000_000_001),
            "2026-01-01T00:00:00.000000001Z"
        );
    }
}
