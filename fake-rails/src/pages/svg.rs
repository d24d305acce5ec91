//! The inline SVG charts: coordinates in a fixed `viewBox`, scaled by CSS.

use std::fmt::Write as _;

use crate::telemetry::{PipelineJob, Span};

/// Width of the `viewBox`.
const WIDTH: f64 = 1200.0;
/// Where bars start (labels are left of it).
const LABEL_WIDTH: f64 = 330.0;
/// Room right of the chart for a duration label.
const RIGHT_MARGIN: f64 = 70.0;
const ROW: f64 = 24.0;
const AXIS: f64 = 26.0;

/// Text for HTML and SVG, attributes included.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() && c != '\n' && c != '\t' => {}
            c => out.push(c),
        }
    }
    out
}

/// `850 ms`, `12.3 s`, `2 min 05 s`.
pub fn format_duration(ns: u64) -> String {
    let ms = ns as f64 / 1e6;
    if ns < 1_000 {
        format!("{ns} ns")
    } else if ns < 1_000_000 {
        format!("{:.0} µs", ns as f64 / 1e3)
    } else if ms < 10.0 {
        format!("{ms:.1} ms")
    } else if ms < 1_000.0 {
        format!("{ms:.0} ms")
    } else if ms < 60_000.0 {
        format!("{:.2} s", ms / 1e3)
    } else {
        let s = (ms / 1e3).round() as u64;
        format!("{} min {:02} s", s / 60, s % 60)
    }
}

/// A tick step giving about 8 ticks over `total_ns`: 1, 2 or 5 times a power of ten.
fn tick_step(total_ns: u64) -> u64 {
    let rough = (total_ns / 8).max(1);
    let mut power = 1u64;
    while power.saturating_mul(10) <= rough {
        power *= 10;
    }
    for m in [1, 2, 5, 10] {
        if power.saturating_mul(m) >= rough {
            return power.saturating_mul(m);
        }
    }
    power.saturating_mul(10)
}

struct Scale {
    total_ns: f64,
}

impl Scale {
    fn new(total_ns: u64) -> Scale {
        Scale {
            total_ns: total_ns.max(1) as f64,
        }
    }

    fn x(&self, offset_ns: i64) -> f64 {
        let span = WIDTH - LABEL_WIDTH - RIGHT_MARGIN;
        LABEL_WIDTH + (offset_ns.max(0) as f64 / self.total_ns).min(1.0) * span
    }

    fn w(&self, duration_ns: u64) -> f64 {
        let span = WIDTH - LABEL_WIDTH - RIGHT_MARGIN;
        ((duration_ns as f64 / self.total_ns) * span).max(1.5)
    }
}

fn open_svg(out: &mut String, rows: usize, label: &str) -> f64 {
    let height = AXIS + rows as f64 * ROW + 8.0;
    let _ = write!(
        out,
        "<svg class=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {WIDTH} {height}\" \
         role=\"img\" aria-label=\"{}\"><defs><pattern id=\"hatch\" width=\"6\" height=\"6\" \
         patternUnits=\"userSpaceOnUse\" patternTransform=\"rotate(45)\"><rect width=\"6\" height=\"6\" fill=\"#ececef\"/>\
         <line x1=\"0\" y1=\"0\" x2=\"0\" y2=\"6\" stroke=\"#a4a3a8\" stroke-width=\"2\"/></pattern></defs>",
        escape(label)
    );
    height
}

fn axis(out: &mut String, scale: &Scale, total_ns: u64, height: f64) {
    let step = tick_step(total_ns);
    out.push_str("<g class=\"axis\">");
    let mut t = 0u64;
    while t <= total_ns {
        let x = scale.x(t as i64);
        let _ = write!(
            out,
            "<line x1=\"{x:.1}\" y1=\"{}\" x2=\"{x:.1}\" y2=\"{height:.1}\"/>\
             <text x=\"{x:.1}\" y=\"14\" text-anchor=\"middle\">{}</text>",
            AXIS - 6.0,
            format_duration(t)
        );
        t = match t.checked_add(step) {
            Some(next) => next,
            None => break,
        };
    }
    out.push_str("</g>");
}

fn cross(out: &mut String, x: f64, y: f64) {
    let _ = write!(
        out,
        "<path class=\"cross\" d=\"M{:.1} {:.1}l8 8m0 -8l-8 8\"/>",
        x - 4.0,
        y - 4.0
    );
}

/// One row and one bar per span, in tree order (`depth` indents the label).
pub fn waterfall(rows: &[(usize, &Span)], total_ns: u64) -> String {
    let scale = Scale::new(total_ns);
    let mut out = String::new();
    let height = open_svg(&mut out, rows.len(), "Waterfall of the job's spans");
    axis(&mut out, &scale, total_ns, height);
    for (i, (depth, span)) in rows.iter().enumerate() {
        let y = AXIS + i as f64 * ROW;
        let mut title = format!(
            "{} ({})\n{} from +{}\nstatus: {}",
            span.name,
            span.service,
            format_duration(span.duration_ns),
            format_duration(span.offset_ns.max(0) as u64),
            span.status
        );
        if !span.status_message.is_empty() {
            let _ = write!(title, " ({})", span.status_message);
        }
        for (k, v) in &span.attributes {
            let _ = write!(title, "\n{k} = {v}");
        }
        let x = scale.x(span.offset_ns);
        let w = scale.w(span.duration_ns);
        let _ = write!(
            out,
            "<a href=\"#span-{id}\"><g class=\"row span {side}{failed}\" data-span-id=\"{id}\" data-name=\"{name}\" \
             data-service=\"{service}\" data-side=\"{side}\" data-status=\"{status}\" data-duration-ns=\"{dur}\">\
             <title>{title}</title>\
             <rect class=\"bg\" x=\"0\" y=\"{y:.1}\" width=\"{WIDTH}\" height=\"{ROW}\" fill=\"transparent\"/>\
             <text class=\"label\" x=\"{lx:.1}\" y=\"{ty:.1}\">{name}</text>\
             <rect class=\"bar {side}\" x=\"{x:.1}\" y=\"{by:.1}\" width=\"{w:.1}\" height=\"{bh:.1}\" rx=\"2\"/>",
            id = escape(&span.span_id),
            side = span.side.as_str(),
            failed = if span.failed() { " failed" } else { "" },
            name = escape(&span.name),
            service = escape(&span.service),
            status = span.status,
            dur = span.duration_ns,
            title = escape(&title),
            lx = 8.0 + *depth as f64 * 14.0,
            ty = y + 16.0,
            by = y + 5.0,
            bh = ROW - 10.0,
        );
        if span.failed() {
            cross(&mut out, x + w + 8.0, y + ROW / 2.0);
        }
        let label_x = x + w + if span.failed() { 18.0 } else { 5.0 };
        let _ = write!(
            out,
            "<text class=\"dur\" x=\"{label_x:.1}\" y=\"{:.1}\">{}</text></g></a>",
            y + 16.0,
            format_duration(span.duration_ns)
        );
    }
    out.push_str("</svg>");
    out
}

/// A colour per stage name, stable across pages.
fn stage_colour(name: &str) -> &'static str {
    const PALETTE: [&str; 8] = [
        "#1f75cb", "#108548", "#c17d10", "#6e49cb", "#0a7f91", "#b3405d", "#5c6f2b", "#535158",
    ];
    let hash = name
        .bytes()
        .fold(5381u32, |h, b| h.wrapping_mul(33) ^ u32::from(b));
    PALETTE[hash as usize % PALETTE.len()]
}

/// One row per job: the queue time hatched, then the run split into stages.
pub fn pipeline_chart(jobs: &[PipelineJob], links: &[String], total_ns: u64) -> String {
    let scale = Scale::new(total_ns);
    let mut out = String::new();
    let height = open_svg(&mut out, jobs.len(), "The pipeline's jobs on one time axis");
    axis(&mut out, &scale, total_ns, height);
    for (i, job) in jobs.iter().enumerate() {
        let y = AXIS + i as f64 * ROW;
        let failed = job.span_status == Some("error") || job.status == "failed";
        let mut title = format!("{} ({}, {})", job.name, job.stage, job.status);
        if let Some(q) = job.queued_duration_ns {
            let _ = write!(title, "\nqueued {}", format_duration(q));
        }
        if let Some(d) = job.duration_ns {
            let _ = write!(title, "\nran {}", format_duration(d));
        }
        for s in &job.stages {
            let _ = write!(title, "\n  {} {}", s.name, format_duration(s.duration_ns));
        }
        if let Some(reason) = &job.telemetry_missing {
            let _ = write!(title, "\nno telemetry: {reason}");
        }
        let link = links.get(i).map(String::as_str).unwrap_or("#");
        let _ = write!(
            out,
            "<a href=\"{link}\"><g class=\"row job{failed}\" data-job-id=\"{id}\" data-name=\"{name}\" \
             data-status=\"{status}\" data-queued-ns=\"{queued}\" data-duration-ns=\"{dur}\">\
             <title>{title}</title>\
             <rect class=\"bg\" x=\"0\" y=\"{y:.1}\" width=\"{WIDTH}\" height=\"{ROW}\" fill=\"transparent\"/>\
             <text class=\"label\" x=\"8\" y=\"{ty:.1}\">#{id} {name} ({stage})</text>",
            link = escape(link),
            failed = if failed { " failed" } else { "" },
            id = job.id,
            name = escape(&job.name),
            stage = escape(&job.stage),
            status = escape(&job.status),
            queued = job.queued_duration_ns.unwrap_or_default(),
            dur = job.duration_ns.unwrap_or_default(),
            title = escape(&title),
            ty = y + 16.0,
        );
        let bar_y = y + 5.0;
        let bar_h = ROW - 10.0;
        if let (Some(q_off), Some(q)) = (job.queued_offset_ns, job.queued_duration_ns) {
            let _ = write!(
                out,
                "<rect class=\"queue\" x=\"{:.1}\" y=\"{bar_y:.1}\" width=\"{:.1}\" height=\"{bar_h:.1}\"/>",
                scale.x(q_off),
                scale.w(q)
            );
        }
        match (job.started_offset_ns, job.duration_ns) {
            (Some(start), Some(dur)) => {
                let x = scale.x(start);
                let w = scale.w(dur);
                let _ = write!(
                    out,
                    "<rect class=\"bar runner\" x=\"{x:.1}\" y=\"{bar_y:.1}\" width=\"{w:.1}\" height=\"{bar_h:.1}\" rx=\"2\"/>"
                );
                for s in &job.stages {
                    let _ = write!(
                        out,
                        "<rect class=\"stage\" data-stage=\"{}\" x=\"{:.1}\" y=\"{bar_y:.1}\" width=\"{:.1}\" height=\"{bar_h:.1}\" fill=\"{}\" stroke=\"#fff\" stroke-width=\"0.5\"/>",
                        escape(&s.name),
                        scale.x(s.offset_ns),
                        scale.w(s.duration_ns),
                        if s.status == "error" { "#dd2b0e" } else { stage_colour(&s.name) }
                    );
                }
                if failed {
                    cross(&mut out, x + w + 8.0, y + ROW / 2.0);
                }
                let _ = write!(
                    out,
                    "<text class=\"dur\" x=\"{:.1}\" y=\"{:.1}\">{}</text>",
                    x + w + if failed { 18.0 } else { 5.0 },
                    y + 16.0,
                    format_duration(dur)
                );
            }
            _ => {
                let _ = write!(
                    out,
                    "<text class=\"dur\" x=\"{LABEL_WIDTH}\" y=\"{:.1}\">no telemetry{}</text>",
                    y + 16.0,
                    job.telemetry_missing
                        .as_deref()
                        .map(|r| format!(": {}", escape(r)))
                        .unwrap_or_default()
                );
            }
        }
        out.push_str("</g></a>");
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        let check = |ns: u64, want: &str| assert_eq!(format_duration(ns), want);
        check(999, "999 ns");
        check(1_500, "2 µs");
        check(2_340_000, "2.3 ms");
        check(850_000_000, "850 ms");
        check(12_345_000_000, "12.35 s");
        check(125_000_000_000, "2 min 05 s");
    }

    #[test]
    fn ticks_are_round() {
        assert_eq!(tick_step(10_000_000_000), 2_000_000_000);
        assert_eq!(tick_step(3_000_000), 500_000);
        assert_eq!(tick_step(0), 1);
    }

    #[test]
    fn markup_is_escaped() {
        assert_eq!(
            escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
