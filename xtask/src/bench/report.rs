//! The bench's results: one list of metrics, printed as a table, written as
//! `target/bench/report.json` and `target/bench/report.md` (with an SVG
//! chart of the ratios against their goals).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::stats::Spread;

/// What a metric is: the gate only ever looks at ratios and counts, which
/// hold on any machine; absolute figures are for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// One side over the other, measured in the same run.
    Ratio,
    /// A number of spans (lost, uncounted, ...).
    Count,
    /// A time, a rate, a size: depends on the machine.
    Absolute,
}

/// `value <= bound` (`AtMost`) or `value >= bound` (`AtLeast`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Goal {
    AtMost(f64),
    AtLeast(f64),
}

impl Goal {
    pub fn met(&self, value: f64) -> bool {
        match *self {
            Goal::AtMost(bound) => value <= bound,
            Goal::AtLeast(bound) => value >= bound,
        }
    }

    fn render(&self) -> String {
        match *self {
            Goal::AtMost(bound) => format!("<= {}", number(bound)),
            Goal::AtLeast(bound) => format!(">= {}", number(bound)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    /// Stable name, used by the gate's thresholds.
    pub id: String,
    pub scenario: String,
    pub label: String,
    pub kind: Kind,
    pub unit: String,
    /// Median over rounds (or the one measurement); `null` in JSON when it
    /// could not be measured.
    #[serde(with = "nan_as_null")]
    pub value: f64,
    /// Smallest and largest round, when measured over several.
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub goal: Option<Goal>,
}

impl Metric {
    pub fn new(
        id: &str,
        scenario: &str,
        label: &str,
        kind: Kind,
        unit: &str,
        value: f64,
    ) -> Metric {
        Metric {
            id: id.into(),
            scenario: scenario.into(),
            label: label.into(),
            kind,
            unit: unit.into(),
            value,
            min: None,
            max: None,
            goal: None,
        }
    }

    pub fn over_rounds(mut self, spread: Spread) -> Metric {
        self.value = spread.value;
        self.min = Some(spread.min);
        self.max = Some(spread.max);
        self
    }

    pub fn value_of(mut self, value: f64) -> Metric {
        self.value = value;
        self
    }

    pub fn goal(mut self, goal: Goal) -> Metric {
        self.goal = Some(goal);
        self
    }

    pub fn met(&self) -> Option<bool> {
        self.goal.map(|g| g.met(self.value))
    }

    fn rendered_value(&self) -> String {
        let mut text = format!("{} {}", number(self.value), self.unit);
        if let (Some(min), Some(max)) = (self.min, self.max) {
            if min != max {
                let _ = write!(text, " ({}..{})", number(min), number(max));
            }
        }
        text.trim().to_string()
    }
}

/// Numbers the way a person reads them: 3 significant digits.
pub fn number(v: f64) -> String {
    if v.is_nan() {
        return "n/a".into();
    }
    let a = v.abs();
    if a >= 1000.0 || v == v.trunc() && a < 1e15 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// How busy the machine was: `/proc/loadavg` at the start and the end.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    pub cores: usize,
    pub load_before: String,
    pub load_after: String,
}

impl Machine {
    pub fn load_now() -> String {
        std::fs::read_to_string("/proc/loadavg")
            .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|_| "unknown".into())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub profile: String,
    pub rounds: usize,
    pub machine: Machine,
    pub elapsed_secs: f64,
    pub metrics: Vec<Metric>,
    /// How things were measured, one line each (workloads, data generation).
    pub notes: Vec<String>,
}

impl Report {
    pub fn push(&mut self, metric: Metric) {
        println!(
            "  {:<58} {:>28}  {}",
            metric.label,
            metric.rendered_value(),
            metric.goal.map(|g| g.render()).unwrap_or_default()
        );
        self.metrics.push(metric);
    }

    pub fn note(&mut self, note: impl Into<String>) {
        let note = note.into();
        println!("  note: {note}");
        self.notes.push(note);
    }

    pub fn table(&self) -> String {
        let mut out = String::new();
        let mut scenario = "";
        for m in &self.metrics {
            if m.scenario != scenario {
                scenario = &m.scenario;
                let _ = writeln!(out, "{scenario}");
            }
            let verdict = match m.met() {
                Some(true) => "ok",
                Some(false) => "MISSED",
                None => "",
            };
            let _ = writeln!(
                out,
                "  {:<58} {:>30}  {:<10} {}",
                m.label,
                m.rendered_value(),
                m.goal.map(|g| g.render()).unwrap_or_default(),
                verdict
            );
        }
        out
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# `cargo xtask bench` ({} profile)\n", self.profile);
        let _ = writeln!(
            out,
            "{} round(s) per scenario, sides interleaved, release build; {} cores, load average {} at the start and {} at the end; {:.0} s in all. Values are the median over rounds, with the smallest and largest round in brackets.\n",
            self.rounds,
            self.machine.cores,
            self.machine.load_before,
            self.machine.load_after,
            self.elapsed_secs
        );
        let _ = writeln!(out, "![ratios against their goals](ratios.svg)\n");
        let _ = writeln!(out, "| scenario | metric | value | goal | |");
        let _ = writeln!(out, "|---|---|---|---|---|");
        for m in &self.metrics {
            let verdict = match m.met() {
                Some(true) => "ok",
                Some(false) => "**missed**",
                None => "",
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} |",
                m.scenario,
                m.label,
                m.rendered_value(),
                m.goal.map(|g| g.render()).unwrap_or_default(),
                verdict
            );
        }
        if !self.notes.is_empty() {
            let _ = writeln!(out, "\n## How it was measured\n");
            for note in &self.notes {
                let _ = writeln!(out, "- {note}");
            }
        }
        out
    }

    /// Horizontal bars: each ratio with a goal, a tick at the goal.
    pub fn svg(&self) -> String {
        let bars: Vec<&Metric> = self
            .metrics
            .iter()
            .filter(|m| m.kind == Kind::Ratio && m.goal.is_some() && m.value.is_finite())
            .collect();
        let (label_w, bar_w, row_h) = (430.0, 360.0, 22.0);
        let scale_max = bars
            .iter()
            .flat_map(|m| {
                let goal = match m.goal {
                    Some(Goal::AtMost(b) | Goal::AtLeast(b)) => b,
                    None => 0.0,
                };
                [m.value, m.max.unwrap_or(m.value), goal]
            })
            .fold(1.0_f64, f64::max)
            .min(20.0)
            * 1.1;
        let x = |v: f64| label_w + (v.min(scale_max) / scale_max) * bar_w;
        let height = 40.0 + row_h * bars.len() as f64;
        let mut out = String::new();
        let _ = writeln!(
            out,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" font-family="sans-serif" font-size="12">"#,
            w = label_w + bar_w + 80.0
        );
        let _ = writeln!(
            out,
            r#"<text x="4" y="16" font-weight="bold">Ratios (bar) against goals (black tick); green met, red missed; whisker = spread over rounds</text>"#
        );
        for (i, m) in bars.iter().enumerate() {
            let y = 30.0 + row_h * i as f64;
            let color = if m.met() == Some(true) {
                "#3a3"
            } else {
                "#d33"
            };
            let _ = writeln!(
                out,
                r#"<text x="4" y="{ty}">{label}</text><rect x="{x0}" y="{y}" width="{w:.1}" height="14" fill="{color}"/>"#,
                ty = y + 11.0,
                label = escape(&m.label),
                x0 = label_w,
                w = x(m.value) - label_w,
            );
            if let (Some(min), Some(max)) = (m.min, m.max) {
                let _ = writeln!(
                    out,
                    r##"<line x1="{a:.1}" x2="{b:.1}" y1="{c}" y2="{c}" stroke="#222"/>"##,
                    a = x(min),
                    b = x(max),
                    c = y + 7.0
                );
            }
            if let Some(Goal::AtMost(b) | Goal::AtLeast(b)) = m.goal {
                let _ = writeln!(
                    out,
                    r#"<line x1="{g:.1}" x2="{g:.1}" y1="{y0}" y2="{y1}" stroke="black" stroke-width="2"/>"#,
                    g = x(b),
                    y0 = y - 2.0,
                    y1 = y + 16.0
                );
            }
            let _ = writeln!(
                out,
                r#"<text x="{tx:.1}" y="{ty}">{v}</text>"#,
                tx = label_w + bar_w + 6.0,
                ty = y + 11.0,
                v = number(m.value)
            );
        }
        out.push_str("</svg>\n");
        out
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(self)?)?;
        std::fs::write(dir.join("report.md"), self.markdown())?;
        std::fs::write(dir.join("ratios.svg"), self.svg())?;
        Ok(())
    }
}

/// NaN (not measured) as JSON `null`, and back.
mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_output() {
        let mut report = Report::default();
        report.metrics.push(
            Metric::new("a.ratio", "A", "a <ratio>", Kind::Ratio, "x", 1.5)
                .over_rounds(Spread {
                    value: 1.5,
                    min: 1.4,
                    max: 1.7,
                })
                .goal(Goal::AtMost(1.01)),
        );
        report.metrics.push(Metric::new(
            "b.lost",
            "A",
            "lost",
            Kind::Count,
            "spans",
            0.0,
        ));
        assert!(report.table().contains("MISSED"));
        assert!(report.markdown().contains("| A | lost | 0 spans |"));
        let svg = report.svg();
        assert!(
            svg.contains("a &lt;ratio&gt;") && svg.contains("#d33"),
            "{svg}"
        );
        let json = serde_json::to_string(&report).unwrap();
        assert_eq!(serde_json::from_str::<Report>(&json).unwrap(), report);
    }
}
