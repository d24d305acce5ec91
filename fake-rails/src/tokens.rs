//! Random tokens with GitLab's prefixes.

use rand::distr::{Alphanumeric, SampleString};

fn random(len: usize) -> String {
    Alphanumeric.sample_string(&mut rand::rng(), len)
}

/// A registration token (GitLab's look: `GR1348941` + 20 chars).
pub fn registration_token() -> String {
    format!("GR1348941{}", random(20))
}

/// An admin personal access token.
pub fn admin_token() -> String {
    format!("glpat-{}", random(20))
}

/// A runner authentication token.
pub fn runner_token() -> String {
    format!("glrt-{}", random(20))
}

/// A CI job token.
pub fn job_token() -> String {
    format!("glcbt-{}", random(24))
}

/// The prefixes runners mask in job logs (`features.token_mask_prefixes`).
pub const MASK_PREFIXES: [&str; 8] = [
    "glpat-", "gloas-", "gldt-", "glrt-", "glcbt-", "glptt-", "glft-", "glimt-",
];

/// A random UUID v4 string, the instance's `instance_uuid`.
pub fn instance_uuid() -> String {
    let mut bytes: [u8; 16] = rand::random();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let h = hex::encode(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}
