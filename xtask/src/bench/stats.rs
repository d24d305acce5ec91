//! Percentiles of samples and the spread of a figure over rounds.

use std::time::Duration;

/// Microseconds, the unit every latency is kept in.
pub fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// The `p` quantile (0..=1) of `values`, nearest rank; 0 when empty.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// p50 and p95 of one side's samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub p50: f64,
    pub p95: f64,
    pub n: usize,
}

pub fn summarize(values: &[f64]) -> Summary {
    Summary {
        p50: percentile(values, 0.5),
        p95: percentile(values, 0.95),
        n: values.len(),
    }
}

/// One figure measured once per round: the median over rounds, and the
/// smallest and largest round (the noise the reader should assume).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub value: f64,
    pub min: f64,
    pub max: f64,
}

pub fn spread(rounds: &[f64]) -> Spread {
    let finite: Vec<f64> = rounds.iter().copied().filter(|v| v.is_finite()).collect();
    if finite.is_empty() {
        return Spread {
            value: f64::NAN,
            min: f64::NAN,
            max: f64::NAN,
        };
    }
    Spread {
        value: percentile(&finite, 0.5),
        min: finite.iter().copied().fold(f64::INFINITY, f64::min),
        max: finite.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    }
}

/// The median of `a[i] / b[i]` over interleaved pairs: on a busy machine,
/// load that shifts during a round hits both halves of a pair alike.
pub fn paired_ratio(a: &[f64], b: &[f64]) -> f64 {
    let ratios: Vec<f64> = a.iter().zip(b).map(|(x, y)| ratio(*x, *y)).collect();
    percentile(&ratios, 0.5)
}

/// `a / b`, NaN when `b` is 0.
pub fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 {
        f64::NAN
    } else {
        a / b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_spread() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 0.5), 51.0);
        assert_eq!(percentile(&values, 0.95), 95.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
        let s = spread(&[1.2, 0.9, 1.0]);
        assert_eq!((s.value, s.min, s.max), (1.0, 0.9, 1.2));
        assert!(ratio(1.0, 0.0).is_nan());
    }
}
