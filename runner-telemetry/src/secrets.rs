//! Secrets and their redaction: what keeps tokens, masked variables and
//! credentials out of spans, logs, error messages and our output.
//!
//! * [`Secret`]: a token that shows as `[REDACTED]` (no `Display`, a redacted
//!   `Debug`); [`Secret::expose`] is the only way in.
//! * [`redact`]: removes one secret from text a server answered (servers
//!   sometimes echo what they were sent).
//! * [`mask_text`], [`mask_attribute`]: replace a job's masked variables by
//!   `[MASKED]` in span attributes, as the job log does.
//! * [`strip_credentials`]: the user and password of a repository URL.

use std::fmt;
use std::sync::Arc;

use opentelemetry::{Array, KeyValue, StringValue, Value};

/// What a masked variable becomes in a span or the job log.
pub const MASKED: &str = "[MASKED]";

/// What a [`Secret`] becomes when shown.
pub const REDACTED: &str = "[REDACTED]";

/// A token. Shows as `[REDACTED]`; [`Secret::expose`] is the only way in.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    pub fn new(value: &str) -> Secret {
        Secret(Arc::from(value))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// Replaces every occurrence of `secret` in `text` (servers sometimes echo
/// what they were sent).
pub fn redact(text: &str, secret: Option<&Secret>) -> String {
    match secret {
        Some(s) if !s.expose().is_empty() => text.replace(s.expose(), REDACTED),
        _ => text.to_string(),
    }
}

/// Replaces every secret in `text` by `[MASKED]` (longest first, as the job
/// log does).
pub fn mask_text(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_string();
    for secret in secrets {
        if !secret.is_empty() && out.contains(secret.as_str()) {
            out = out.replace(secret.as_str(), MASKED);
        }
    }
    out
}

/// An attribute with its string values masked.
pub fn mask_attribute(attribute: KeyValue, secrets: &[String]) -> KeyValue {
    if secrets.is_empty() {
        return attribute;
    }
    let value = match attribute.value {
        Value::String(s) => Value::String(mask_text(s.as_str(), secrets).into()),
        Value::Array(Array::String(items)) => Value::Array(Array::String(
            items
                .iter()
                .map(|i| StringValue::from(mask_text(i.as_str(), secrets)))
                .collect(),
        )),
        other => other,
    };
    KeyValue::new(attribute.key, value)
}

/// Strips credentials from a repository URL (`https://user:token@host/p.git`
/// becomes `https://host/p.git`); for scp-like `user@host:path`, drops the
/// user.
pub fn strip_credentials(url: &str) -> String {
    if let Ok(mut parsed) = url::Url::parse(url) {
        if parsed.has_host() {
            let _ = parsed.set_username("");
            let _ = parsed.set_password(None);
            return parsed.to_string();
        }
    }
    match url.rsplit_once('@') {
        Some((_, rest)) => rest.to_string(),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_credentials_cases() {
        let check = |input: &str, expected: &str| assert_eq!(strip_credentials(input), expected);
        check(
            "https://gitlab-ci-token:glcbt-secret@gitlab.example.com/g/p.git",
            "https://gitlab.example.com/g/p.git",
        );
        check("https://user@host/p.git", "https://host/p.git");
        check("https://host/p.git", "https://host/p.git");
        check("git@gitlab.com:g/p.git", "gitlab.com:g/p.git");
        check("/srv/repos/p.git", "/srv/repos/p.git");
    }

    #[test]
    fn secrets_do_not_show() {
        let secret = Secret::new("s3cr3t-token");
        assert_eq!(format!("{secret:?}"), "[REDACTED]");
        assert_eq!(
            redact("bad token s3cr3t-token!", Some(&secret)),
            "bad token [REDACTED]!"
        );
        assert_eq!(redact("x", None), "x");
    }

    #[test]
    fn masking() {
        let secrets = vec!["hunter22-long".to_string(), "hunter22".to_string()];
        let check = |text: &str, expected: &str| {
            assert_eq!(mask_text(text, &secrets), expected, "{text}");
        };
        check("key-hunter22-long", "key-[MASKED]");
        check("a hunter22 b hunter22", "a [MASKED] b [MASKED]");
        check("nothing here", "nothing here");
        let masked = mask_attribute(
            KeyValue::new(
                "k",
                Value::Array(Array::String(vec!["x-hunter22".into(), "y".into()])),
            ),
            &secrets,
        );
        assert_eq!(masked.value.to_string(), r#"["x-[MASKED]","y"]"#);
        let number = mask_attribute(KeyValue::new("n", 22_i64), &secrets);
        assert_eq!(number.value, Value::I64(22));
    }
}
