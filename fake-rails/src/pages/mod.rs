//! The telemetry pages: server-rendered HTML with inline SVG, no build
//! step and no script beyond opening every `<details>` before printing.
//!
//! Job page: a waterfall, one row and one bar per span (`g.span` with
//! `data-name`, `data-service`, `data-side`, `data-status`), Rails and runner
//! spans in different colours, failed spans red with a cross; a bar's
//! `<title>` shows its duration and attributes on hover, a click jumps to its
//! entry in the span list, where log lines sit under their stage.
//! Pipeline page: one row per job on one time axis, the queue time hatched
//! before the run, the run split into its stages.

mod svg;

use std::fmt::Write as _;

use crate::telemetry::{JobTelemetry, PipelineTelemetry, Span};

pub use svg::{escape, format_duration};

const STYLE: &str = r#"
:root { --rails: #6e49cb; --runner: #1f75cb; --other: #737278; --failed: #dd2b0e; --queue: #bfbfc3; }
* { box-sizing: border-box; }
body { font: 14px/1.45 -apple-system, "Segoe UI", Roboto, "Noto Sans", Ubuntu, sans-serif; color: #28272d; margin: 0 auto; padding: 16px 24px; max-width: 1280px; }
h1 { font-size: 20px; margin: 0 0 4px; }
h2 { font-size: 16px; margin: 24px 0 8px; }
a { color: #1f75cb; }
.meta { color: #535158; margin: 0 0 12px; display: flex; flex-wrap: wrap; gap: 4px 18px; }
.meta b { color: #28272d; font-weight: 600; }
.legend { display: flex; gap: 16px; margin: 8px 0; font-size: 13px; }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 2px; vertical-align: -1px; margin-right: 4px; }
.status-failed, .status-error { color: var(--failed); font-weight: 600; }
.status-success { color: #108548; font-weight: 600; }
svg.chart { width: 100%; height: auto; display: block; border: 1px solid #dcdcde; border-radius: 4px; background: #fff; }
svg.chart text { font-size: 12px; fill: #28272d; }
svg.chart .axis text { fill: #737278; font-size: 11px; }
svg.chart .axis line { stroke: #ececef; }
svg.chart .row:hover rect.bg { fill: #f0f0f5; }
svg.chart .bar.rails { fill: var(--rails); }
svg.chart .bar.runner { fill: var(--runner); }
svg.chart .bar.other { fill: var(--other); }
svg.chart .failed .bar { stroke: var(--failed); stroke-width: 2; }
svg.chart .failed text.label { fill: var(--failed); font-weight: 600; }
svg.chart .cross { stroke: var(--failed); stroke-width: 2; }
svg.chart .queue { fill: url(#hatch); stroke: var(--queue); }
svg.chart text.dur { fill: #535158; font-size: 11px; }
details { margin: 2px 0 2px 16px; }
details > summary { cursor: pointer; }
details.failed > summary { color: var(--failed); }
table.attrs { border-collapse: collapse; margin: 4px 0 8px 16px; font-size: 12px; }
table.attrs td { border-top: 1px solid #ececef; padding: 1px 8px 1px 0; vertical-align: top; }
table.attrs td:first-child { color: #535158; white-space: nowrap; }
pre.logs { background: #1f1e24; color: #ececef; font-size: 12px; padding: 6px 8px; margin: 4px 0 8px 16px; border-radius: 4px; overflow-x: auto; white-space: pre-wrap; }
pre.logs .t { color: #a4a3a8; }
table.jobs { border-collapse: collapse; width: 100%; font-size: 13px; }
table.jobs th, table.jobs td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #ececef; vertical-align: top; }
.note { color: #737278; font-size: 12px; }
@media print {
  body { max-width: none; padding: 0; font-size: 11px; }
  svg.chart { border: none; }
  .noprint { display: none; }
  a { color: inherit; text-decoration: none; }
  details, pre.logs, table { break-inside: avoid; }
  * { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
}
"#;

/// Opens every `<details>` before printing, so a printout shows all of it.
const PRINT_SCRIPT: &str =
    "addEventListener('beforeprint',()=>document.querySelectorAll('details').forEach(d=>d.open=true));";

fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><style>{STYLE}</style><script>{PRINT_SCRIPT}</script></head>\n\
         <body>\n{body}\n</body></html>\n",
        escape(title)
    )
}

/// A page saying why there is nothing to show.
pub fn error(status: u16, message: &str) -> String {
    page(
        &format!("{status} - telemetry"),
        &format!(
            "<h1>No telemetry to show</h1><p class=\"status-error\">{}</p>",
            escape(message)
        ),
    )
}

fn legend() -> &'static str {
    "<div class=\"legend\">\
     <span><span class=\"swatch\" style=\"background:var(--rails)\"></span>Rails (gitlab-ci-rails)</span>\
     <span><span class=\"swatch\" style=\"background:var(--runner)\"></span>Runner (gitlab-ci-runner)</span>\
     <span><span class=\"swatch\" style=\"background:var(--other)\"></span>Other services</span>\
     <span><span class=\"swatch\" style=\"background:#fff;border:2px solid var(--failed)\"></span>Failed span (&#x2715;)</span>\
     </div>"
}

/// The job page.
pub fn job(t: &JobTelemetry, pipeline_url: &str) -> String {
    let mut body = String::new();
    let j = &t.job;
    let _ = write!(
        body,
        "<h1>Job #{} <code>{}</code> &middot; <span class=\"status-{}\">{}</span></h1>",
        j.id,
        escape(&j.name),
        escape(&j.status),
        escape(&j.status)
    );
    let _ = write!(
        body,
        "<div class=\"meta\"><span>Stage <b>{}</b></span>\
         <span>Pipeline <a href=\"{}\">#{}</a></span>\
         <span>Started <b>{}</b></span>\
         <span>Total <b>{}</b></span>\
         <span>Queued <b>{}</b></span>\
         <span>Execution <b>{}</b></span>\
         <span>Spans <b>{}</b></span>\
         <span>Dropped by the runner <b>{}</b></span>\
         <span>Trace <code>{}</code></span></div>",
        escape(&j.stage),
        escape(pipeline_url),
        j.pipeline_id,
        escape(&t.started_at),
        format_duration(t.duration_ns),
        t.queued_duration_ns
            .map(format_duration)
            .unwrap_or_else(|| "-".into()),
        t.execution_duration_ns
            .map(format_duration)
            .unwrap_or_else(|| "not arrived yet".into()),
        t.span_count,
        t.dropped_spans
            .map(|n| n.to_string())
            .unwrap_or_else(|| "-".into()),
        escape(&t.trace_id),
    );
    if !t.complete {
        body.push_str(
            "<p class=\"note\">Some of this job's spans have not arrived yet: reload in a moment.</p>",
        );
    }
    body.push_str(legend());
    let rows: Vec<(usize, &Span)> = t.spans.iter().flat_map(Span::walk).collect();
    body.push_str(&svg::waterfall(&rows, t.duration_ns));
    body.push_str("<h2>Spans, attributes and log lines</h2>");
    for root in &t.spans {
        span_details(&mut body, root);
    }
    page(&format!("Job #{} {} - telemetry", j.id, j.name), &body)
}

fn span_details(out: &mut String, span: &Span) {
    let _ = write!(
        out,
        "<details id=\"span-{}\" class=\"{}{}\"{}><summary><b>{}</b> \
         <span class=\"note\">{} &middot; +{} &middot; {}{}</span></summary>",
        escape(&span.span_id),
        span.side.as_str(),
        if span.failed() { " failed" } else { "" },
        if span.failed() || !span.logs.is_empty() {
            " open"
        } else {
            ""
        },
        escape(&span.name),
        escape(&span.service),
        format_duration(span.offset_ns.max(0) as u64),
        format_duration(span.duration_ns),
        if span.failed() {
            format!(" &middot; failed: {}", escape(&span.status_message))
        } else {
            String::new()
        }
    );
    if !span.attributes.is_empty() {
        out.push_str("<table class=\"attrs\">");
        for (k, v) in &span.attributes {
            let _ = write!(out, "<tr><td>{}</td><td>{}</td></tr>", escape(k), escape(v));
        }
        out.push_str("</table>");
    }
    if !span.logs.is_empty() {
        out.push_str("<pre class=\"logs\">");
        for log in &span.logs {
            let _ = writeln!(
                out,
                "<span class=\"t\">+{:>9}</span> {}",
                format_duration(log.offset_ns.max(0) as u64),
                escape(log.body.trim_end())
            );
        }
        out.push_str("</pre>");
    }
    for child in &span.children {
        span_details(out, child);
    }
    out.push_str("</details>");
}

/// The pipeline page; `job_links[i]` is the page of `t.jobs[i]`.
pub fn pipeline(t: &PipelineTelemetry, job_links: &[String]) -> String {
    let p = &t.pipeline;
    let mut body = String::new();
    let _ = write!(
        body,
        "<h1>Pipeline #{} &middot; <span class=\"status-{}\">{}</span></h1>\
         <div class=\"meta\"><span>Ref <b>{}</b></span><span>Started <b>{}</b></span>\
         <span>Total <b>{}</b></span><span>Jobs <b>{}</b></span><span>Trace <code>{}</code></span></div>",
        p.id,
        escape(&p.status),
        escape(&p.status),
        escape(&p.git_ref),
        escape(&t.started_at),
        format_duration(t.duration_ns),
        t.jobs.len(),
        escape(&t.trace_id)
    );
    body.push_str(
        "<div class=\"legend\"><span><span class=\"swatch\" style=\"background:var(--queue)\"></span>Queued (job_pending)</span>\
         <span>Run split into its stages (colours by stage name)</span>\
         <span><span class=\"swatch\" style=\"background:#fff;border:2px solid var(--failed)\"></span>Failed (&#x2715;)</span></div>",
    );
    body.push_str(&svg::pipeline_chart(&t.jobs, job_links, t.duration_ns));
    body.push_str(
        "<h2>Jobs</h2><table class=\"jobs\"><tr><th>Job</th><th>Stage</th><th>Status</th>\
         <th>Queued</th><th>Duration</th><th>Stages</th></tr>",
    );
    for (i, job) in t.jobs.iter().enumerate() {
        let link = job_links.get(i).map(String::as_str).unwrap_or("#");
        let stages = match &job.telemetry_missing {
            Some(reason) => format!(
                "<span class=\"note\">no telemetry: {}</span>",
                escape(reason)
            ),
            None => job
                .stages
                .iter()
                .map(|s| {
                    format!(
                        "<span class=\"status-{}\">{}</span> {}",
                        s.status,
                        escape(&s.name),
                        format_duration(s.duration_ns)
                    )
                })
                .collect::<Vec<_>>()
                .join(" &middot; "),
        };
        let _ = write!(
            body,
            "<tr><td><a href=\"{}\">#{} {}</a></td><td>{}</td><td class=\"status-{}\">{}</td>\
             <td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(link),
            job.id,
            escape(&job.name),
            escape(&job.stage),
            escape(&job.status),
            escape(&job.status),
            job.queued_duration_ns
                .map(format_duration)
                .unwrap_or_else(|| "-".into()),
            job.duration_ns
                .map(format_duration)
                .unwrap_or_else(|| "-".into()),
            stages
        );
    }
    body.push_str("</table>");
    page(&format!("Pipeline #{} - telemetry", p.id), &body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::{JobSummary, LogRecord, Side};

    fn span(name: &str, side: Side, status: &'static str, children: Vec<Span>) -> Span {
        Span {
            span_id: format!("id-{name}"),
            parent_span_id: String::new(),
            name: name.into(),
            service: match side {
                Side::Rails => "gitlab-ci-rails".into(),
                _ => "gitlab-ci-runner".into(),
            },
            side,
            start: "2026-01-01T00:00:00.000000000Z".into(),
            offset_ns: 1_000_000,
            duration_ns: 5_000_000,
            status,
            status_message: String::new(),
            attributes: [(
                "ci.note".to_string(),
                "<script>alert(1)</script>".to_string(),
            )]
            .into(),
            logs: Vec::new(),
            children,
        }
    }

    #[test]
    fn a_job_page_has_one_bar_per_span_marks_failures_and_escapes_everything() {
        let mut step = span("step_script", Side::Runner, "error", vec![]);
        step.logs.push(LogRecord {
            time: String::new(),
            offset_ns: 2_000_000,
            severity: "INFO".into(),
            body: "echo <b>".into(),
        });
        let tree = span(
            "job_lifecycle",
            Side::Rails,
            "unset",
            vec![span("job_execution", Side::Runner, "ok", vec![step])],
        );
        let t = JobTelemetry {
            job: JobSummary {
                id: 7,
                name: "<build>".into(),
                stage: "build".into(),
                status: "failed".into(),
                pipeline_id: 1,
                project_id: 1,
                web_url: String::new(),
            },
            trace_id: "t".into(),
            started_at: String::new(),
            duration_ns: 10_000_000,
            queued_duration_ns: None,
            execution_duration_ns: Some(5_000_000),
            dropped_spans: Some(0),
            span_count: 3,
            log_count: 1,
            complete: true,
            spans: vec![tree],
        };
        let html = job(&t, "/p");
        assert_eq!(html.matches("<rect class=\"bar ").count(), 3);
        assert_eq!(html.matches("class=\"row span runner failed\"").count(), 1);
        assert!(html.contains("data-name=\"step_script\""));
        assert!(html.contains("class=\"row span rails\""));
        assert!(
            !html.contains("<script>alert"),
            "attribute values are escaped"
        );
        assert!(!html.contains("<build>"), "names are escaped");
        assert!(html.contains("echo &lt;b&gt;"), "log lines, escaped");
    }
}
