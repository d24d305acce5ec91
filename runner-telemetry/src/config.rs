//! Export configuration of the runner manager: where `job_execution` spans go
//! when the payload does not say (contract v1), and the settings every
//! exporter shares (timeouts, service name).
//!
//! # Sources and precedence
//!
//! Each setting is taken from the first source that has it:
//!
//! 1. explicit configuration: the command line (`--otlp-endpoint`,
//!    `--otlp-protocol`, `--flush-timeout`), then the `[runners.telemetry]`
//!    section of `config.toml` (`endpoint`, `protocol`, `headers`, `timeout`,
//!    `flush_timeout`, `service_name`);
//! 2. the connection string ([`TelemetrySettings::connection_string`] in the
//!    file, or else the [`GITLAB_TRACING`] environment variable);
//! 3. the signal-specific variables `OTEL_EXPORTER_OTLP_TRACES_*`;
//! 4. the generic variables `OTEL_EXPORTER_OTLP_*`;
//! 5. the defaults of the OTLP specification (`http/protobuf`,
//!    `http://localhost:4318/v1/traces`, or `http://localhost:4317` for gRPC;
//!    10 s export timeout), our flush deadline of 5 s and `service.name`
//!    `gitlab-ci-runner`.
//!
//! As the OTLP specification says, the generic endpoint gets `/v1/traces`
//! appended for OTLP/HTTP while the signal-specific one (and an explicit one)
//! is used as-is; for gRPC every endpoint is used as-is. Headers are taken
//! whole from the first source that has any (sources are not merged).
//! Invalid environment values are ignored with a warning, as the
//! specification asks; invalid explicit values are errors.
//!
//! Contract v2 payloads carry their own endpoints; those are used **instead
//! of** the static endpoint for that job (the static headers are not sent to
//! them: they belong to the static collector). The static endpoint is the
//! fallback for contract v1.
//!
//! # Connection string grammar
//!
//! ```text
//! otlp://HOST[:PORT][/PATH][?PARAM(&PARAM)*]
//! PARAM := protocol=(grpc|http|http/protobuf)   default grpc
//!        | service_name=NAME
//!        | timeout=MILLISECONDS
//!        | header_NAME=VALUE                      repeatable, percent-decoded
//! ```
//!
//! The default port is 4317 for gRPC and 4318 for HTTP. For HTTP an empty path
//! becomes `/v1/traces`; any other path is kept. gRPC takes no path. Unknown
//! parameters are ignored with a warning. `otlps://` (TLS) is refused until
//! TLS support lands. Example:
//! `otlp://collector:4318?protocol=http&service_name=my-runner&header_x-tenant=ci`.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::negotiate::Transport;

/// Generic OTLP endpoint (all signals); `/v1/traces` is appended for HTTP.
pub const OTEL_EXPORTER_OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// Traces endpoint, used as-is.
pub const OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
/// Generic protocol: `grpc` or `http/protobuf` (`http/json` is not supported).
pub const OTEL_EXPORTER_OTLP_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_PROTOCOL";
/// Traces protocol.
pub const OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL";
/// Generic headers, `k1=v1,k2=v2`, values percent-decoded.
pub const OTEL_EXPORTER_OTLP_HEADERS: &str = "OTEL_EXPORTER_OTLP_HEADERS";
/// Traces headers; replaces the generic ones when set.
pub const OTEL_EXPORTER_OTLP_TRACES_HEADERS: &str = "OTEL_EXPORTER_OTLP_TRACES_HEADERS";
/// Generic export timeout in milliseconds.
pub const OTEL_EXPORTER_OTLP_TIMEOUT: &str = "OTEL_EXPORTER_OTLP_TIMEOUT";
/// Traces export timeout in milliseconds.
pub const OTEL_EXPORTER_OTLP_TRACES_TIMEOUT: &str = "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT";
/// A LabKit-style connection string, see the module documentation.
pub const GITLAB_TRACING: &str = "GITLAB_TRACING";
/// Seconds the runner may spend flushing a job's telemetry after its status
/// update (below the flag and the config file; the conformance suite's knob).
pub const CI_TELEMETRY_FLUSH_TIMEOUT: &str = "CI_TELEMETRY_FLUSH_TIMEOUT";

/// Default `service.name` of runner spans (what the backend's MV expects).
pub const DEFAULT_SERVICE_NAME: &str = "gitlab-ci-runner";
/// Default bound on the background flush after a job.
pub const DEFAULT_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// Default timeout of one export request (OTLP specification).
pub const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default OTLP/HTTP traces endpoint.
pub const DEFAULT_HTTP_ENDPOINT: &str = "http://localhost:4318/v1/traces";
/// Default OTLP/gRPC endpoint.
pub const DEFAULT_GRPC_ENDPOINT: &str = "http://localhost:4317";

/// A source of environment variables, injectable so tests need not touch the
/// process environment.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for BTreeMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

impl Env for std::collections::HashMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

/// Reads a variable, treating empty as unset.
fn env_var(env: &dyn Env, name: &str) -> Option<String> {
    env.var(name).filter(|v| !v.trim().is_empty())
}

/// The `[runners.telemetry]` section of `config.toml`. Every field is
/// optional; see the module documentation for what fills the gaps.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySettings {
    /// `true` switches telemetry off for every job of this runner.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// `http/protobuf` or `grpc`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Export request timeout: seconds as a number, or a string with a unit
    /// (`"500ms"`, `"10s"`, `"1m"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<DurationValue>,
    /// Bound on the background flush after each job; same format.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flush_timeout: Option<DurationValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
    /// A connection string; takes the place of [`GITLAB_TRACING`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_string: Option<String>,
}

/// A duration in a config file: seconds, or a string with a unit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DurationValue {
    Seconds(f64),
    Text(String),
}

impl DurationValue {
    pub fn to_duration(&self) -> Result<Duration, ConfigError> {
        match self {
            DurationValue::Seconds(s) => seconds(*s),
            DurationValue::Text(text) => parse_duration(text),
        }
    }
}

fn seconds(s: f64) -> Result<Duration, ConfigError> {
    Duration::try_from_secs_f64(s)
        .map_err(|_| ConfigError(format!("`{s}` is not a valid number of seconds")))
}

/// Parses `"500ms"`, `"10s"`, `"2m"`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, ConfigError> {
    let text = text.trim();
    let invalid = || ConfigError(format!("`{text}` is not a duration (e.g. 500ms, 5s, 1m)"));
    let (number, unit) = match text.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let number: f64 = number.trim().parse().map_err(|_| invalid())?;
    let secs = match unit {
        "ms" => number / 1000.0,
        "s" => number,
        "m" => number * 60.0,
        _ => return Err(invalid()),
    };
    seconds(secs).map_err(|_| invalid())
}

/// A configuration error, shown to the operator as one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Command-line overrides; they win over everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TelemetryOverrides {
    pub endpoint: Option<String>,
    pub protocol: Option<String>,
    pub flush_timeout: Option<Duration>,
    pub disabled: bool,
}

/// The resolved static export configuration of one runner.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportSettings {
    /// `false` when telemetry is switched off for every job.
    pub enabled: bool,
    pub service_name: String,
    pub flush_timeout: Duration,
    /// Timeout of one export request (for the static and payload endpoints).
    pub export_timeout: Duration,
    /// The static endpoint (contract v1).
    pub endpoint: StaticEndpoint,
    /// Values ignored on the way, to be logged once at start.
    pub warnings: Vec<String>,
}

/// The static collector endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StaticEndpoint {
    pub transport: Transport,
    /// HTTP: the full traces URL. gRPC: `http://host:port`.
    pub url: String,
    pub headers: Vec<(String, String)>,
}

impl fmt::Display for StaticEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}+{}", self.transport, self.url)
    }
}

impl Default for ExportSettings {
    fn default() -> Self {
        ExportSettings {
            enabled: true,
            service_name: DEFAULT_SERVICE_NAME.to_string(),
            flush_timeout: DEFAULT_FLUSH_TIMEOUT,
            export_timeout: DEFAULT_EXPORT_TIMEOUT,
            endpoint: StaticEndpoint {
                transport: Transport::HttpProtobuf,
                url: DEFAULT_HTTP_ENDPOINT.to_string(),
                headers: Vec::new(),
            },
            warnings: Vec::new(),
        }
    }
}

/// A parsed connection string.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConnectionString {
    pub transport: Option<Transport>,
    /// The endpoint in the form the transport uses.
    pub endpoint: String,
    pub service_name: Option<String>,
    pub timeout: Option<Duration>,
    pub headers: Vec<(String, String)>,
    pub warnings: Vec<String>,
}

/// Parses a connection string (grammar in the module documentation).
pub fn parse_connection_string(text: &str) -> Result<ConnectionString, ConfigError> {
    let err = |why: &str| ConfigError(format!("connection string: {why}"));
    let url = url::Url::parse(text.trim()).map_err(|e| err(&format!("invalid URL: {e}")))?;
    match url.scheme() {
        "otlp" => {}
        "otlps" => return Err(err("`otlps` (TLS) is not supported yet")),
        other => {
            return Err(err(&format!(
                "unsupported scheme `{other}`, expected `otlp`"
            )))
        }
    }
    let host = url
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| err("no host"))?
        .to_string();
    let mut parsed = ConnectionString::default();
    let mut transport = Transport::Grpc;
    for (key, value) in url.query_pairs() {
        match key.as_ref() {
            "protocol" => {
                transport = match value.as_ref() {
                    "grpc" => Transport::Grpc,
                    "http" | "http/protobuf" => Transport::HttpProtobuf,
                    other => return Err(err(&format!("unsupported protocol `{other}`"))),
                };
            }
            "service_name" if !value.is_empty() => parsed.service_name = Some(value.into_owned()),
            "timeout" => {
                let ms: u64 = value
                    .parse()
                    .map_err(|_| err(&format!("timeout `{value}` is not milliseconds")))?;
                parsed.timeout = Some(Duration::from_millis(ms));
            }
            key if key.starts_with("header_") && key.len() > "header_".len() => parsed
                .headers
                .push((key["header_".len()..].to_string(), value.into_owned())),
            other => parsed.warnings.push(format!(
                "connection string: ignored unknown parameter `{other}`"
            )),
        }
    }
    parsed.transport = Some(transport);
    let path = url.path();
    parsed.endpoint = match transport {
        Transport::Grpc => {
            if !(path.is_empty() || path == "/") {
                return Err(err("a gRPC endpoint takes no path"));
            }
            format!("http://{host}:{}", url.port().unwrap_or(4317))
        }
        Transport::HttpProtobuf => {
            let path = if path.is_empty() || path == "/" {
                "/v1/traces"
            } else {
                path
            };
            format!("http://{host}:{}{path}", url.port().unwrap_or(4318))
        }
    };
    Ok(parsed)
}

fn parse_protocol(value: &str) -> Result<Transport, String> {
    match value.trim() {
        "grpc" => Ok(Transport::Grpc),
        "http/protobuf" => Ok(Transport::HttpProtobuf),
        "http/json" => Err("`http/json` is not supported, use `http/protobuf`".into()),
        other => Err(format!(
            "`{other}` is not a protocol (`grpc` or `http/protobuf`)"
        )),
    }
}

/// Parses `k1=v1,k2=v2` (OTLP header syntax), percent-decoding values.
/// Malformed pairs are reported and skipped.
pub fn parse_headers(text: &str) -> (Vec<(String, String)>, Vec<String>) {
    let mut headers = Vec::new();
    let mut bad = Vec::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                let value = percent_decode(v.trim());
                headers.push((k.trim().to_string(), value));
            }
            // The value may be a secret: name only the position.
            _ => bad.push(format!(
                "malformed header entry #{}",
                headers.len() + bad.len() + 1
            )),
        }
    }
    (headers, bad)
}

fn percent_decode(text: &str) -> String {
    url::form_urlencoded::parse(format!("v={}", text.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

fn env_duration_ms(env: &dyn Env, name: &str, warnings: &mut Vec<String>) -> Option<Duration> {
    let value = env_var(env, name)?;
    match value.trim().parse::<u64>() {
        Ok(ms) => Some(Duration::from_millis(ms)),
        Err(_) => {
            warnings.push(format!("ignored {name}: `{value}` is not milliseconds"));
            None
        }
    }
}

/// Resolves the export settings of one runner from its config section, the
/// command line and the environment.
pub fn resolve(
    file: &TelemetrySettings,
    overrides: &TelemetryOverrides,
    env: &dyn Env,
) -> Result<ExportSettings, ConfigError> {
    let mut warnings = Vec::new();

    let connection = match file
        .connection_string
        .clone()
        .or_else(|| env_var(env, GITLAB_TRACING))
    {
        Some(text) => {
            let parsed = parse_connection_string(&text)?;
            warnings.extend(parsed.warnings.iter().cloned());
            Some(parsed)
        }
        None => None,
    };

    // Protocol.
    let explicit_protocol = match overrides.protocol.as_deref().or(file.protocol.as_deref()) {
        Some(p) => Some(parse_protocol(p).map_err(|e| ConfigError(format!("protocol: {e}")))?),
        None => None,
    };
    let mut env_protocol = |name: &str| {
        let value = env_var(env, name)?;
        match parse_protocol(&value) {
            Ok(t) => Some(t),
            Err(e) => {
                warnings.push(format!("ignored {name}: {e}"));
                None
            }
        }
    };
    let transport = explicit_protocol
        .or(connection.as_ref().and_then(|c| c.transport))
        .or_else(|| env_protocol(OTEL_EXPORTER_OTLP_TRACES_PROTOCOL))
        .or_else(|| env_protocol(OTEL_EXPORTER_OTLP_PROTOCOL))
        .unwrap_or(Transport::HttpProtobuf);

    // Endpoint.
    let explicit_endpoint = overrides
        .endpoint
        .clone()
        .or_else(|| file.endpoint.clone())
        .filter(|e| !e.trim().is_empty());
    let url = if let Some(endpoint) = explicit_endpoint {
        endpoint
    } else if let Some(c) = connection.as_ref() {
        c.endpoint.clone()
    } else if let Some(endpoint) = env_var(env, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) {
        endpoint
    } else if let Some(endpoint) = env_var(env, OTEL_EXPORTER_OTLP_ENDPOINT) {
        match transport {
            Transport::HttpProtobuf => format!("{}/v1/traces", endpoint.trim_end_matches('/')),
            Transport::Grpc => endpoint,
        }
    } else {
        match transport {
            Transport::HttpProtobuf => DEFAULT_HTTP_ENDPOINT.to_string(),
            Transport::Grpc => DEFAULT_GRPC_ENDPOINT.to_string(),
        }
    };
    let url = validate_endpoint(transport, url.trim())?;

    // Headers: the first source that has any.
    let headers = if !file.headers.is_empty() {
        file.headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    } else if let Some(c) = connection.as_ref().filter(|c| !c.headers.is_empty()) {
        c.headers.clone()
    } else {
        let mut from_env = Vec::new();
        for name in [
            OTEL_EXPORTER_OTLP_TRACES_HEADERS,
            OTEL_EXPORTER_OTLP_HEADERS,
        ] {
            if let Some(text) = env_var(env, name) {
                let (headers, bad) = parse_headers(&text);
                warnings.extend(bad.into_iter().map(|b| format!("ignored in {name}: {b}")));
                from_env = headers;
                break;
            }
        }
        from_env
    };

    // Timeouts.
    let export_timeout = match &file.timeout {
        Some(t) => t
            .to_duration()
            .map_err(|e| ConfigError(format!("timeout: {e}")))?,
        None => connection
            .as_ref()
            .and_then(|c| c.timeout)
            .or_else(|| env_duration_ms(env, OTEL_EXPORTER_OTLP_TRACES_TIMEOUT, &mut warnings))
            .or_else(|| env_duration_ms(env, OTEL_EXPORTER_OTLP_TIMEOUT, &mut warnings))
            .unwrap_or(DEFAULT_EXPORT_TIMEOUT),
    };
    let flush_timeout = match (overrides.flush_timeout, &file.flush_timeout) {
        (Some(t), _) => t,
        (None, Some(t)) => t
            .to_duration()
            .map_err(|e| ConfigError(format!("flush_timeout: {e}")))?,
        (None, None) => env_var(env, CI_TELEMETRY_FLUSH_TIMEOUT)
            .and_then(|v| match v.trim().parse::<f64>() {
                Ok(secs) if secs.is_finite() && secs >= 0.0 => Some(Duration::from_secs_f64(secs)),
                _ => {
                    warnings.push(format!(
                        "ignored {CI_TELEMETRY_FLUSH_TIMEOUT}: `{v}` is not a number of seconds"
                    ));
                    None
                }
            })
            .unwrap_or(DEFAULT_FLUSH_TIMEOUT),
    };

    let service_name = file
        .service_name
        .clone()
        .filter(|s| !s.is_empty())
        .or_else(|| connection.as_ref().and_then(|c| c.service_name.clone()))
        .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_string());

    Ok(ExportSettings {
        enabled: !(overrides.disabled || file.disabled),
        service_name,
        flush_timeout,
        export_timeout,
        endpoint: StaticEndpoint {
            transport,
            url,
            headers,
        },
        warnings,
    })
}

fn validate_endpoint(transport: Transport, url: &str) -> Result<String, ConfigError> {
    let parsed = url::Url::parse(url)
        .map_err(|e| ConfigError(format!("endpoint `{url}` is not a URL: {e}")))?;
    match parsed.scheme() {
        "http" => {}
        "https" => {
            return Err(ConfigError(format!(
                "endpoint `{url}`: TLS is not supported yet, use http://"
            )))
        }
        other => {
            return Err(ConfigError(format!(
                "endpoint `{url}`: unsupported scheme `{other}` for {transport}"
            )))
        }
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(ConfigError(format!("endpoint `{url}` has no host")));
    }
    Ok(url.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Resolves and renders `transport+url headers=[..] timeout=.. flush=.. service=..`.
    fn check(file: &str, overrides: TelemetryOverrides, vars: &[(&str, &str)], expected: &str) {
        let file: TelemetrySettings = toml::from_str(file).expect("test config parses");
        let actual = match resolve(&file, &overrides, &env(vars)) {
            Ok(s) => {
                let headers: Vec<String> = s
                    .endpoint
                    .headers
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                let mut line = format!(
                    "{} headers=[{}] timeout={:?} flush={:?} service={}",
                    s.endpoint,
                    headers.join(","),
                    s.export_timeout,
                    s.flush_timeout,
                    s.service_name
                );
                if !s.enabled {
                    line.push_str(" disabled");
                }
                for w in s.warnings {
                    line.push_str(&format!(" warning=({w})"));
                }
                line
            }
            Err(e) => format!("error: {e}"),
        };
        assert_eq!(actual, expected);
    }

    fn none() -> TelemetryOverrides {
        TelemetryOverrides::default()
    }

    #[test]
    fn defaults() {
        check(
            "",
            none(),
            &[],
            "http/protobuf+http://localhost:4318/v1/traces headers=[] timeout=10s flush=5s service=gitlab-ci-runner",
        );
        check(
            "protocol = 'grpc'",
            none(),
            &[],
            "grpc+http://localhost:4317 headers=[] timeout=10s flush=5s service=gitlab-ci-runner",
        );
        check(
            "disabled = true",
            none(),
            &[],
            "http/protobuf+http://localhost:4318/v1/traces headers=[] timeout=10s flush=5s service=gitlab-ci-runner disabled",
        );
    }

    #[test]
    fn endpoint_precedence() {
        let all = [
            (OTEL_EXPORTER_OTLP_ENDPOINT, "http://generic:4318"),
            (
                OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
                "http://signal:4318/custom",
            ),
            (GITLAB_TRACING, "otlp://conn:9999?protocol=http"),
        ];
        let rest = "headers=[] timeout=10s flush=5s service=gitlab-ci-runner";
        // Generic only: /v1/traces appended (trailing slash too).
        check(
            "",
            none(),
            &all[..1],
            &format!("http/protobuf+http://generic:4318/v1/traces {rest}"),
        );
        check(
            "",
            none(),
            &[(OTEL_EXPORTER_OTLP_ENDPOINT, "http://generic:4318/")],
            &format!("http/protobuf+http://generic:4318/v1/traces {rest}"),
        );
        // Signal-specific wins and is used as-is.
        check(
            "",
            none(),
            &all[..2],
            &format!("http/protobuf+http://signal:4318/custom {rest}"),
        );
        // Connection string wins over both.
        check(
            "",
            none(),
            &all,
            &format!("http/protobuf+http://conn:9999/v1/traces {rest}"),
        );
        // File wins over the connection string.
        check(
            "endpoint = 'http://file:4318/v1/traces'",
            none(),
            &all,
            &format!("http/protobuf+http://file:4318/v1/traces {rest}"),
        );
        // The flag wins over the file.
        let flag = TelemetryOverrides {
            endpoint: Some("http://flag:1/v1/traces".into()),
            ..none()
        };
        check(
            "endpoint = 'http://file:4318/v1/traces'",
            flag,
            &all,
            &format!("http/protobuf+http://flag:1/v1/traces {rest}"),
        );
        // gRPC: the generic endpoint is used as-is.
        check(
            "",
            none(),
            &[
                (OTEL_EXPORTER_OTLP_ENDPOINT, "http://generic:4317"),
                (OTEL_EXPORTER_OTLP_PROTOCOL, "grpc"),
            ],
            &format!("grpc+http://generic:4317 {rest}"),
        );
        // Empty variables count as unset.
        check(
            "",
            none(),
            &[
                (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, ""),
                (OTEL_EXPORTER_OTLP_ENDPOINT, "http://g:1"),
            ],
            &format!("http/protobuf+http://g:1/v1/traces {rest}"),
        );
    }

    #[test]
    fn protocol_precedence() {
        let rest = "headers=[] timeout=10s flush=5s service=gitlab-ci-runner";
        check(
            "",
            none(),
            &[(OTEL_EXPORTER_OTLP_PROTOCOL, "grpc")],
            &format!("grpc+http://localhost:4317 {rest}"),
        );
        check(
            "",
            none(),
            &[
                (OTEL_EXPORTER_OTLP_PROTOCOL, "grpc"),
                (OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, "http/protobuf"),
            ],
            &format!("http/protobuf+http://localhost:4318/v1/traces {rest}"),
        );
        check(
            "protocol = 'grpc'",
            none(),
            &[(OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, "http/protobuf")],
            &format!("grpc+http://localhost:4317 {rest}"),
        );
        let flag = TelemetryOverrides {
            protocol: Some("http/protobuf".into()),
            ..none()
        };
        check(
            "protocol = 'grpc'",
            flag,
            &[],
            &format!("http/protobuf+http://localhost:4318/v1/traces {rest}"),
        );
        // Invalid environment values are ignored with a warning.
        check("", none(), &[(OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, "http/json"), (OTEL_EXPORTER_OTLP_PROTOCOL, "grpc")], &format!("grpc+http://localhost:4317 {rest} warning=(ignored OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: `http/json` is not supported, use `http/protobuf`)"));
        // Invalid explicit values are errors.
        check(
            "protocol = 'thrift'",
            none(),
            &[],
            "error: protocol: `thrift` is not a protocol (`grpc` or `http/protobuf`)",
        );
    }

    #[test]
    fn headers_timeouts_and_service_name() {
        let ep = "http/protobuf+http://localhost:4318/v1/traces";
        check(
            "",
            none(),
            &[(OTEL_EXPORTER_OTLP_HEADERS, "a=1, b=x%20y")],
            &format!("{ep} headers=[a=1,b=x y] timeout=10s flush=5s service=gitlab-ci-runner"),
        );
        check(
            "",
            none(),
            &[
                (OTEL_EXPORTER_OTLP_HEADERS, "a=1"),
                (OTEL_EXPORTER_OTLP_TRACES_HEADERS, "c=3"),
            ],
            &format!("{ep} headers=[c=3] timeout=10s flush=5s service=gitlab-ci-runner"),
        );
        check(
            "[headers]\nx-file = 'f'",
            none(),
            &[(OTEL_EXPORTER_OTLP_TRACES_HEADERS, "c=3")],
            &format!("{ep} headers=[x-file=f] timeout=10s flush=5s service=gitlab-ci-runner"),
        );
        check("", none(), &[(OTEL_EXPORTER_OTLP_HEADERS, "a=1,secretvalue")], &format!("{ep} headers=[a=1] timeout=10s flush=5s service=gitlab-ci-runner warning=(ignored in OTEL_EXPORTER_OTLP_HEADERS: malformed header entry #2)"));
        check(
            "",
            none(),
            &[(OTEL_EXPORTER_OTLP_TIMEOUT, "2500")],
            &format!("{ep} headers=[] timeout=2.5s flush=5s service=gitlab-ci-runner"),
        );
        check(
            "",
            none(),
            &[
                (OTEL_EXPORTER_OTLP_TIMEOUT, "2500"),
                (OTEL_EXPORTER_OTLP_TRACES_TIMEOUT, "700"),
            ],
            &format!("{ep} headers=[] timeout=700ms flush=5s service=gitlab-ci-runner"),
        );
        check(
            "timeout = 3",
            none(),
            &[(OTEL_EXPORTER_OTLP_TRACES_TIMEOUT, "700")],
            &format!("{ep} headers=[] timeout=3s flush=5s service=gitlab-ci-runner"),
        );
        check("", none(), &[(OTEL_EXPORTER_OTLP_TIMEOUT, "soon")], &format!("{ep} headers=[] timeout=10s flush=5s service=gitlab-ci-runner warning=(ignored OTEL_EXPORTER_OTLP_TIMEOUT: `soon` is not milliseconds)"));
        check(
            "",
            none(),
            &[(CI_TELEMETRY_FLUSH_TIMEOUT, "600")],
            &format!("{ep} headers=[] timeout=10s flush=600s service=gitlab-ci-runner"),
        );
        check(
            "flush_timeout = 2",
            none(),
            &[(CI_TELEMETRY_FLUSH_TIMEOUT, "600")],
            &format!("{ep} headers=[] timeout=10s flush=2s service=gitlab-ci-runner"),
        );
        check(
            "flush_timeout = '1500ms'\nservice_name = 'my-runner'",
            none(),
            &[],
            &format!("{ep} headers=[] timeout=10s flush=1.5s service=my-runner"),
        );
        let flag = TelemetryOverrides {
            flush_timeout: Some(Duration::from_secs(2)),
            ..none()
        };
        check(
            "flush_timeout = 9",
            flag,
            &[],
            &format!("{ep} headers=[] timeout=10s flush=2s service=gitlab-ci-runner"),
        );
        check(
            "flush_timeout = 'later'",
            none(),
            &[],
            "error: flush_timeout: `later` is not a duration (e.g. 500ms, 5s, 1m)",
        );
        check(
            "flush_timeout = -1",
            none(),
            &[],
            "error: flush_timeout: `-1` is not a valid number of seconds",
        );
    }

    #[test]
    fn connection_strings() {
        let rest = "timeout=10s flush=5s";
        check(
            "",
            none(),
            &[(GITLAB_TRACING, "otlp://collector")],
            &format!("grpc+http://collector:4317 headers=[] {rest} service=gitlab-ci-runner"),
        );
        check("", none(), &[(GITLAB_TRACING, "otlp://collector:4318?protocol=http&service_name=svc&header_x-tenant=ci%2Fcd&timeout=1500")], "http/protobuf+http://collector:4318/v1/traces headers=[x-tenant=ci/cd] timeout=1.5s flush=5s service=svc");
        check("", none(), &[(GITLAB_TRACING, "otlp://c:1234/otlp/v1/traces?protocol=http/protobuf")], &format!("http/protobuf+http://c:1234/otlp/v1/traces headers=[] {rest} service=gitlab-ci-runner"));
        check(
            "connection_string = 'otlp://file-conn:4317'",
            none(),
            &[(GITLAB_TRACING, "otlp://env-conn")],
            &format!("grpc+http://file-conn:4317 headers=[] {rest} service=gitlab-ci-runner"),
        );
        check("", none(), &[(GITLAB_TRACING, "otlp://c?colour=blue")], &format!("grpc+http://c:4317 headers=[] {rest} service=gitlab-ci-runner warning=(connection string: ignored unknown parameter `colour`)"));
        check(
            "",
            none(),
            &[(GITLAB_TRACING, "otlps://c")],
            "error: connection string: `otlps` (TLS) is not supported yet",
        );
        check(
            "",
            none(),
            &[(GITLAB_TRACING, "jaeger://c")],
            "error: connection string: unsupported scheme `jaeger`, expected `otlp`",
        );
        check(
            "",
            none(),
            &[(GITLAB_TRACING, "otlp://c/path")],
            "error: connection string: a gRPC endpoint takes no path",
        );
        check(
            "",
            none(),
            &[(GITLAB_TRACING, "otlp://c?protocol=zmq")],
            "error: connection string: unsupported protocol `zmq`",
        );
        check(
            "",
            none(),
            &[(GITLAB_TRACING, "otlp://c?timeout=x")],
            "error: connection string: timeout `x` is not milliseconds",
        );
        // The explicit protocol beats the connection string's.
        check(
            "protocol = 'http/protobuf'",
            none(),
            &[(GITLAB_TRACING, "otlp://c:4317?protocol=grpc")],
            &format!("http/protobuf+http://c:4317 headers=[] {rest} service=gitlab-ci-runner"),
        );
    }

    #[test]
    fn invalid_endpoints() {
        check(
            "endpoint = 'https://c/v1/traces'",
            none(),
            &[],
            "error: endpoint `https://c/v1/traces`: TLS is not supported yet, use http://",
        );
        check(
            "endpoint = 'c:4318'",
            none(),
            &[],
            "error: endpoint `c:4318`: unsupported scheme `c` for http/protobuf",
        );
        check(
            "endpoint = 'not a url'",
            none(),
            &[],
            "error: endpoint `not a url` is not a URL: relative URL without a base",
        );
    }

    proptest::proptest! {
        #[test]
        fn parsers_never_panic(text in "\\PC{0,60}", key in "(OTEL_EXPORTER_OTLP_[A-Z_]{0,16}|GITLAB_TRACING)") {
            let _ = parse_connection_string(&text);
            let _ = parse_connection_string(&format!("otlp://{text}"));
            let _ = parse_headers(&text);
            let _ = parse_duration(&text);
            let _ = toml::from_str::<TelemetrySettings>(&text);
            let _ = resolve(&TelemetrySettings::default(), &none(), &env(&[(key.as_str(), text.as_str())]));
            let file = TelemetrySettings { endpoint: Some(text.clone()), protocol: Some(text.clone()), ..Default::default() };
            let _ = resolve(&file, &none(), &BTreeMap::new());
        }
    }
}
