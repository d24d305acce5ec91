//! `cargo xtask bench --gate`: the report's ratios and loss counts against
//! the thresholds kept in `xtask/bench-thresholds.toml`. Absolute times are
//! never gated: they depend on the machine and on its load.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use super::report::{number, Kind, Report};

/// `[max]` holds the largest value each metric may have, `[min]` the
/// smallest; keys are metric ids.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    #[serde(default)]
    pub max: BTreeMap<String, f64>,
    #[serde(default)]
    pub min: BTreeMap<String, f64>,
}

impl Thresholds {
    pub fn parse(text: &str) -> Result<Thresholds> {
        toml::from_str(text).context("parsing the bench thresholds")
    }

    pub fn load() -> Result<Thresholds> {
        let path = conformance::paths::repo_root()
            .join("xtask")
            .join("bench-thresholds.toml");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Thresholds::parse(&text)
    }
}

/// Every metric over (or under) its threshold, one line each, naming the
/// metric; a threshold on a metric the report lacks, or on an absolute
/// figure, is an error too.
pub fn violations(report: &Report, thresholds: &Thresholds) -> Vec<String> {
    let mut out = Vec::new();
    let bounds = thresholds
        .max
        .iter()
        .map(|(id, bound)| (id, *bound, true))
        .chain(thresholds.min.iter().map(|(id, bound)| (id, *bound, false)));
    for (id, bound, is_max) in bounds {
        let Some(metric) = report.metrics.iter().find(|m| &m.id == id) else {
            out.push(format!("{id}: not measured"));
            continue;
        };
        if metric.kind == Kind::Absolute {
            out.push(format!(
                "{id}: an absolute figure ({}) cannot be gated, only ratios and counts",
                metric.unit
            ));
            continue;
        }
        let value = metric.value;
        if value.is_nan() {
            out.push(format!("{id}: could not be measured"));
        } else if is_max && value > bound {
            out.push(format!(
                "{id} = {} is over its threshold {} ({})",
                number(value),
                number(bound),
                metric.label
            ));
        } else if !is_max && value < bound {
            out.push(format!(
                "{id} = {} is under its threshold {} ({})",
                number(value),
                number(bound),
                metric.label
            ));
        }
    }
    out
}

/// Fails naming each metric past its threshold.
pub fn check(report: &Report, thresholds: &Thresholds) -> Result<()> {
    let violations = violations(report, thresholds);
    if violations.is_empty() {
        println!(
            "==> Gate passed: {} thresholds held",
            thresholds.max.len() + thresholds.min.len()
        );
        return Ok(());
    }
    for line in &violations {
        eprintln!("gate: {line}");
    }
    bail!(
        "the bench gate failed: {} metric(s) past their threshold",
        violations.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::report::Metric;

    fn report() -> Report {
        Report {
            metrics: vec![
                Metric::new(
                    "job.ratio",
                    "s",
                    "job wall time on/off",
                    Kind::Ratio,
                    "x",
                    1.3,
                ),
                Metric::new(
                    "export.uncounted",
                    "s",
                    "uncounted",
                    Kind::Count,
                    "spans",
                    0.0,
                ),
                Metric::new(
                    "export.rate",
                    "s",
                    "spans/s ours/stock",
                    Kind::Ratio,
                    "x",
                    0.8,
                ),
                Metric::new("lookup.p95", "s", "lookup p95", Kind::Absolute, "ms", 12.0),
            ],
            ..Report::default()
        }
    }

    fn check_gate(thresholds: &str, expected: &[&str]) {
        let thresholds = Thresholds::parse(thresholds).unwrap();
        assert_eq!(violations(&report(), &thresholds), expected);
    }

    #[test]
    fn gate_fails_naming_each_metric_past_its_threshold() {
        check_gate(
            "[max]\n\"job.ratio\" = 1.5\n\"export.uncounted\" = 0\n[min]\n\"export.rate\" = 0.5\n",
            &[],
        );
        check_gate(
            "[max]\n\"job.ratio\" = 1.2\n\"export.uncounted\" = 0\n[min]\n\"export.rate\" = 0.9\n",
            &[
                "job.ratio = 1.30 is over its threshold 1.20 (job wall time on/off)",
                "export.rate = 0.800 is under its threshold 0.900 (spans/s ours/stock)",
            ],
        );
        check_gate(
            "[max]\n\"missing\" = 1\n\"lookup.p95\" = 50\n",
            &[
                "lookup.p95: an absolute figure (ms) cannot be gated, only ratios and counts",
                "missing: not measured",
            ],
        );
        assert!(check(
            &report(),
            &Thresholds::parse("[max]\n\"job.ratio\" = 1.0\n").unwrap()
        )
        .is_err());
    }

    #[test]
    fn the_repository_thresholds_parse_and_gate_only_ratios_and_counts() {
        let thresholds = Thresholds::load().unwrap();
        assert!(!thresholds.max.is_empty());
        for id in thresholds.max.keys().chain(thresholds.min.keys()) {
            let absolute = id.split('.').any(|part| {
                ["_us", "_ms", "_s", "_mb", "_per_s"]
                    .iter()
                    .any(|unit| part.ends_with(unit))
            });
            assert!(!absolute, "{id} looks like an absolute figure");
        }
    }
}
