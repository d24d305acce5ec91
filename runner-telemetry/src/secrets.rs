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

/// Replaces every one of `secrets` in `text` by `[REDACTED]`, longest first.
/// A value with a scheme (`Bearer abc…`, `Basic abc…`) is redacted whole
/// and its credential alone too, as servers echo either. Values shorter
/// than 4 characters are left alone (they would redact ordinary words).
pub fn redact_all<'a>(text: &str, secrets: impl IntoIterator<Item = &'a str>) -> String {
    let mut values: Vec<&str> = Vec::new();
    for secret in secrets {
        let secret = secret.trim();
        values.push(secret);
        if let Some((_, credential)) = secret.split_once(' ') {
            values.push(credential.trim());
        }
    }
    values.retain(|v| v.len() >= 4);
    values.sort_by_key(|v| std::cmp::Reverse(v.len()));
    let mut out = text.to_string();
    for value in values {
        if out.contains(value) {
            out = out.replace(value, REDACTED);
        }
    }
    out
}

/// The password (and user) in a URL's userinfo, percent-decoded and as
/// written, for [`redact_all`].
pub fn url_credentials(url: &str) -> Vec<String> {
    let Ok(parsed) = url::Url::parse(url) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for raw in [parsed.password().unwrap_or(""), parsed.username()] {
        if raw.is_empty() {
            continue;
        }
        out.push(raw.to_string());
        if let Ok(decoded) = percent_decode(raw) {
            if decoded != raw {
                out.push(decoded);
            }
        }
    }
    out
}

fn percent_decode(text: &str) -> Result<String, std::string::FromUtf8Error> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out)
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
            if parsed.username().is_empty() && parsed.password().is_none() {
                // Nothing to strip: the URL as written.
                return url.to_string();
            }
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
        check("http://collector:4317", "http://collector:4317");
        check(
            "http://u:p%40ss@collector:4318/v1/traces",
            "http://collector:4318/v1/traces",
        );
        check("git@gitlab.com:g/p.git", "gitlab.com:g/p.git");
        check("/srv/repos/p.git", "/srv/repos/p.git");
    }

    #[test]
    fn redact_all_cases() {
        let check = |text: &str, secrets: &[&str], expected: &str| {
            assert_eq!(
                redact_all(text, secrets.iter().copied()),
                expected,
                "{text}"
            );
        };
        check(
            "bad authorization: Bearer tok-123456",
            &["Bearer tok-123456"],
            "bad authorization: [REDACTED]",
        );
        check(
            "token tok-123456 refused",
            &["Bearer tok-123456"],
            "token [REDACTED] refused",
        );
        check(
            "x-api-key=k3y-value",
            &["k3y-value", "abc"],
            "x-api-key=[REDACTED]",
        );
        check("the abc", &["abc"], "the abc");
        assert_eq!(
            url_credentials("http://user:p%40ss@host/v1/traces"),
            vec!["p%40ss".to_string(), "p@ss".to_string(), "user".to_string()]
        );
        assert!(url_credentials("http://host/v1/traces").is_empty());
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
