//! The Rails-side ID formulas of CI job telemetry (`docs/contract.md` §3).
//!
//! Every ID is derived, never stored: the trace id from the root pipeline id,
//! each span id from `SHA256("<root_pipeline_id>:<build_id>:<span>")`. The
//! conformance suite recomputes them with these same functions.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// The three spans Rails emits for every sampled job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RailsSpan {
    /// `job_lifecycle`: job created -> job finished. The root of the job's tree.
    Lifecycle,
    /// `job_pending`: job queued -> picked up by a runner (the queue time).
    Pending,
    /// `job_running`: picked up -> finished. Parent of the runner's `job_execution`.
    Running,
}

impl RailsSpan {
    pub const ALL: [RailsSpan; 3] = [RailsSpan::Lifecycle, RailsSpan::Pending, RailsSpan::Running];

    /// The word used in the span id formula: `lifecycle`, `pending` or `running`.
    pub fn formula_word(self) -> &'static str {
        match self {
            RailsSpan::Lifecycle => "lifecycle",
            RailsSpan::Pending => "pending",
            RailsSpan::Running => "running",
        }
    }

    /// The span name as exported: `job_lifecycle`, `job_pending`, `job_running`.
    pub fn span_name(self) -> &'static str {
        match self {
            RailsSpan::Lifecycle => "job_lifecycle",
            RailsSpan::Pending => "job_pending",
            RailsSpan::Running => "job_running",
        }
    }

    /// The parent of this span inside the Rails tree (`None` for the root).
    pub fn parent(self) -> Option<RailsSpan> {
        match self {
            RailsSpan::Lifecycle => None,
            RailsSpan::Pending | RailsSpan::Running => Some(RailsSpan::Lifecycle),
        }
    }
}

impl fmt::Display for RailsSpan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.formula_word())
    }
}

impl FromStr for RailsSpan {
    type Err = String;

    /// Accepts the formula word (`running`) or the span name (`job_running`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.strip_prefix("job_").unwrap_or(s) {
            "lifecycle" => Ok(RailsSpan::Lifecycle),
            "pending" => Ok(RailsSpan::Pending),
            "running" => Ok(RailsSpan::Running),
            _ => Err(format!("unknown Rails span `{s}`")),
        }
    }
}

/// The trace id of every job of a root pipeline: `format!("{:032x}", root_pipeline_id)`.
pub fn trace_id(root_pipeline_id: u64) -> String {
    format!("{root_pipeline_id:032x}")
}

/// A Rails span id: the first 16 hex chars of
/// `SHA256("<root_pipeline_id>:<build_id>:<lifecycle|pending|running>")`.
pub fn span_id(root_pipeline_id: u64, build_id: u64, span: RailsSpan) -> String {
    hex::encode(span_id_bytes(root_pipeline_id, build_id, span))
}

/// [`trace_id`] as the 16 bytes that go over the wire in OTLP.
pub fn trace_id_bytes(root_pipeline_id: u64) -> [u8; 16] {
    u128::from(root_pipeline_id).to_be_bytes()
}

/// [`span_id`] as the 8 bytes that go over the wire in OTLP.
pub fn span_id_bytes(root_pipeline_id: u64, build_id: u64, span: RailsSpan) -> [u8; 8] {
    let digest = Sha256::digest(format!(
        "{root_pipeline_id}:{build_id}:{}",
        span.formula_word()
    ));
    let mut out = [0u8; 8];
    out.copy_from_slice(&digest[..8]);
    out
}

/// The Rails-side sampling decision, deterministic per root pipeline: the
/// first 8 bytes of `SHA256("sampling:<root_pipeline_id>")`, read as a
/// big-endian fraction of 2^64, must be below `rate`. `rate >= 1` keeps every
/// pipeline, `rate <= 0` none.
pub fn pipeline_sampled(root_pipeline_id: u64, rate: f64) -> bool {
    if rate >= 1.0 {
        return true;
    }
    if rate <= 0.0 || rate.is_nan() {
        return false;
    }
    let digest = Sha256::digest(format!("sampling:{root_pipeline_id}"));
    let mut head = [0u8; 8];
    head.copy_from_slice(&digest[..8]);
    let fraction = u64::from_be_bytes(head) as f64 / 18_446_744_073_709_551_616.0;
    fraction < rate
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_id_is_the_zero_padded_hex_root_pipeline_id() {
        assert_eq!(trace_id(1), "00000000000000000000000000000001");
        assert_eq!(trace_id(0xabc), "00000000000000000000000000000abc");
        assert_eq!(hex::encode(trace_id_bytes(0xabc)), trace_id(0xabc));
    }

    #[test]
    fn span_id_is_a_sha256_prefix() {
        // echo -n "42:7:running" | sha256sum
        let expected = hex::encode(&Sha256::digest(b"42:7:running")[..8]);
        assert_eq!(span_id(42, 7, RailsSpan::Running), expected);
        assert_eq!(span_id(42, 7, RailsSpan::Running).len(), 16);
        assert_ne!(
            span_id(42, 7, RailsSpan::Running),
            span_id(42, 7, RailsSpan::Pending)
        );
        assert_ne!(
            span_id(42, 7, RailsSpan::Running),
            span_id(42, 8, RailsSpan::Running)
        );
    }

    #[test]
    fn span_names_parse_both_ways() {
        for span in RailsSpan::ALL {
            assert_eq!(span.span_name().parse::<RailsSpan>(), Ok(span));
            assert_eq!(span.formula_word().parse::<RailsSpan>(), Ok(span));
        }
        assert!("job_queued".parse::<RailsSpan>().is_err());
    }

    #[test]
    fn sampling_is_deterministic_and_roughly_proportional() {
        assert!(pipeline_sampled(5, 1.0));
        assert!(!pipeline_sampled(5, 0.0));
        let kept = (1..=10_000)
            .filter(|id| pipeline_sampled(*id, 0.25))
            .count();
        assert!(
            (2_200..2_800).contains(&kept),
            "kept {kept} of 10000 at 25%"
        );
        for id in 1..100 {
            assert_eq!(pipeline_sampled(id, 0.5), pipeline_sampled(id, 0.5));
            // Monotonic in the rate: kept at 10% implies kept at 50%.
            if pipeline_sampled(id, 0.1) {
                assert!(pipeline_sampled(id, 0.5));
            }
        }
    }
}
