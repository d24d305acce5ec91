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
//!    `flush_timeout`, `service_name`, and the export client's `buffer_max_spans`,
//!    `buffer_max_bytes`, `max_age`, `retry_initial_backoff`,
//!    `retry_max_backoff`, `shutdown_timeout`, `ca_file`, `bearer_token_file`,
//!    `gcp_metadata_url`);
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
//! The export client's settings have no OTLP variable; their environment
//! variables ([`CI_TELEMETRY_MAX_AGE`] and the others below,
//! [`OTEL_EXPORTER_OTLP_CERTIFICATE`] for the CA file, [`GCE_METADATA_HOST`]
//! for the metadata server, as Google's client libraries read it) come after
//! the config file and before the defaults.
//!
//! Contract v2 payloads carry their own endpoints; those are used **instead
//! of** the static endpoint for that job (the static headers are not sent to
//! them: they belong to the static collector). The static endpoint is the
//! fallback for contract v1.
//!
//! # Job logs (opt-in)
//!
//! Log records of the job log ([`crate::logs`]) are exported when
//! `logs = true` in `[runners.telemetry]`, the `--telemetry-logs` flag, or
//! [`CI_TELEMETRY_LOGS`]`=true` says so (any of them). Their endpoint:
//!
//! 1. [`OTEL_EXPORTER_OTLP_LOGS_ENDPOINT`], as-is;
//! 2. [`OTEL_EXPORTER_OTLP_ENDPOINT`], with `/v1/logs` appended for HTTP;
//! 3. the traces endpoint's collector: for HTTP its URL with a final
//!    `/v1/traces` replaced by `/v1/logs` (or `/v1/logs` appended to its
//!    path), for gRPC the same URL.
//!
//! The protocol is [`OTEL_EXPORTER_OTLP_LOGS_PROTOCOL`], then
//! [`OTEL_EXPORTER_OTLP_PROTOCOL`], then the traces endpoint's. The other
//! settings follow the OTLP specification's rule (the signal-specific
//! variable, then the generic one, then the default), below the explicit
//! configuration as for traces:
//!
//! | setting     | explicit (file, connection string) | signal-specific                          | generic                            | default |
//! |-------------|------------------------------------|------------------------------------------|------------------------------------|---------|
//! | headers     | `[headers]`, `header_NAME=`        | [`OTEL_EXPORTER_OTLP_LOGS_HEADERS`]      | [`OTEL_EXPORTER_OTLP_HEADERS`]     | none    |
//! | timeout     | `timeout`, `timeout=`              | [`OTEL_EXPORTER_OTLP_LOGS_TIMEOUT`] (ms) | [`OTEL_EXPORTER_OTLP_TIMEOUT`]     | 10 s    |
//! | compression |                                    | [`OTEL_EXPORTER_OTLP_LOGS_COMPRESSION`]  | [`OTEL_EXPORTER_OTLP_COMPRESSION`] | `none`  |
//!
//! The `_TRACES_` variables never apply to log records. Compression is
//! `none` or `gzip`; `gzip` is not implemented yet: it is ignored with a
//! warning and records are sent uncompressed. A contract v2 payload's
//! endpoints get the job's records too, at [`logs_url`] of each (with the
//! logs timeout; the static headers are not sent to them).
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
//! parameters are ignored with a warning. `otlps://` is the same with TLS
//! (`https://` endpoints). Example:
//! `otlp://collector:4318?protocol=http&service_name=my-runner&header_x-tenant=ci`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::negotiate::{NegotiationOptions, Transport};

/// Logs endpoint, used as-is.
pub const OTEL_EXPORTER_OTLP_LOGS_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT";
/// Logs protocol, `http/protobuf` or `grpc`.
pub const OTEL_EXPORTER_OTLP_LOGS_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL";
/// Logs headers, `k1=v1,k2=v2`; replaces the generic ones when set.
pub const OTEL_EXPORTER_OTLP_LOGS_HEADERS: &str = "OTEL_EXPORTER_OTLP_LOGS_HEADERS";
/// Logs export timeout in milliseconds.
pub const OTEL_EXPORTER_OTLP_LOGS_TIMEOUT: &str = "OTEL_EXPORTER_OTLP_LOGS_TIMEOUT";
/// Logs compression: `none` or `gzip`.
pub const OTEL_EXPORTER_OTLP_LOGS_COMPRESSION: &str = "OTEL_EXPORTER_OTLP_LOGS_COMPRESSION";
/// Generic compression: `none` or `gzip` (read for log records only).
pub const OTEL_EXPORTER_OTLP_COMPRESSION: &str = "OTEL_EXPORTER_OTLP_COMPRESSION";
/// `true` exports job logs as OTLP log records (opt-in).
pub const CI_TELEMETRY_LOGS: &str = "CI_TELEMETRY_LOGS";
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

/// Traces CA certificate file (PEM) to verify the collector's TLS certificate.
pub const OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE: &str = "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE";
/// Generic CA certificate file (PEM).
pub const OTEL_EXPORTER_OTLP_CERTIFICATE: &str = "OTEL_EXPORTER_OTLP_CERTIFICATE";
/// Most spans held in the export buffer (all endpoints of a runner).
pub const CI_TELEMETRY_BUFFER_MAX_SPANS: &str = "CI_TELEMETRY_BUFFER_MAX_SPANS";
/// Most bytes of encoded spans held in the export buffer (`33554432`, `32MiB`).
pub const CI_TELEMETRY_BUFFER_MAX_BYTES: &str = "CI_TELEMETRY_BUFFER_MAX_BYTES";
/// Age after which a span not yet exported is dropped (`300`, `5m`, `500ms`).
pub const CI_TELEMETRY_MAX_AGE: &str = "CI_TELEMETRY_MAX_AGE";
/// First retry delay (doubles up to the maximum).
pub const CI_TELEMETRY_RETRY_INITIAL_BACKOFF: &str = "CI_TELEMETRY_RETRY_INITIAL_BACKOFF";
/// Longest retry delay.
pub const CI_TELEMETRY_RETRY_MAX_BACKOFF: &str = "CI_TELEMETRY_RETRY_MAX_BACKOFF";
/// Bound on the final export attempt when the runner stops.
pub const CI_TELEMETRY_SHUTDOWN_TIMEOUT: &str = "CI_TELEMETRY_SHUTDOWN_TIMEOUT";
/// A file holding a bearer token for the static endpoint, re-read when it changes.
pub const CI_TELEMETRY_BEARER_TOKEN_FILE: &str = "CI_TELEMETRY_BEARER_TOKEN_FILE";
/// `HOST[:PORT]` of a GCP-metadata-compatible server (Google's convention).
pub const GCE_METADATA_HOST: &str = "GCE_METADATA_HOST";

/// Default `service.name` of runner spans (what the backend's MV expects).
pub const DEFAULT_SERVICE_NAME: &str = "gitlab-ci-runner";
/// Default bound on the background flush after a job.
pub const DEFAULT_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// Default timeout of one export request (OTLP specification).
pub const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default bound of the export buffer in spans.
pub const DEFAULT_BUFFER_MAX_SPANS: usize = 10_000;
/// Default bound of the export buffer in bytes of encoded spans.
pub const DEFAULT_BUFFER_MAX_BYTES: usize = 32 * 1024 * 1024;
/// Default age after which an unexported span is dropped: older data is of
/// little use to anyone looking at a pipeline.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(300);
/// Default first retry delay.
pub const DEFAULT_RETRY_INITIAL_BACKOFF: Duration = Duration::from_secs(1);
/// Default longest retry delay.
pub const DEFAULT_RETRY_MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Default bound on the final export attempt at shutdown (GitLab Runner
/// gives its exporter 5 s).
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// The GCE metadata server.
pub const DEFAULT_GCP_METADATA_URL: &str = "http://metadata.google.internal";
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
    /// `true` exports the job log as OTLP log records too.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub logs: bool,
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
    /// Most spans waiting for export, over all endpoints of this runner.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub buffer_max_spans: Option<u64>,
    /// Most bytes of encoded spans waiting for export: a number, or a string
    /// with a unit (`"32MiB"`, `"512KiB"`, `"1MB"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub buffer_max_bytes: Option<ByteSizeValue>,
    /// Age after which a span not yet exported is dropped (`max_age`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_age: Option<DurationValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_initial_backoff: Option<DurationValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_max_backoff: Option<DurationValue>,
    /// Bound on the final export attempt when the runner stops.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_timeout: Option<DurationValue>,
    /// PEM file of CA certificates trusted for `https`/`grpcs` collectors,
    /// besides the system's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// A file holding a bearer token for the static endpoint (e.g. a
    /// Kubernetes projected service account token), re-read when it changes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bearer_token_file: Option<String>,
    /// Base URL of the GCP-metadata-compatible server that mints ID tokens
    /// for `http_bearer_gcp_oidc` endpoints.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gcp_metadata_url: Option<String>,
}

/// A size in a config file: bytes, or a string with a unit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ByteSizeValue {
    Bytes(u64),
    Text(String),
}

impl ByteSizeValue {
    pub fn to_bytes(&self) -> Result<usize, ConfigError> {
        match self {
            ByteSizeValue::Bytes(n) => usize::try_from(*n)
                .map_err(|_| ConfigError::Invalid(format!("`{n}` bytes is too large"))),
            ByteSizeValue::Text(text) => parse_byte_size(text),
        }
    }
}

/// Parses `"33554432"`, `"32MiB"`, `"512KiB"`, `"1MB"`, `"64kB"`, `"1GiB"`.
pub fn parse_byte_size(text: &str) -> Result<usize, ConfigError> {
    let text = text.trim();
    let invalid = || {
        ConfigError::Invalid(format!(
            "`{text}` is not a size (e.g. 32MiB, 512KiB, 1000000)"
        ))
    };
    let (number, unit) = match text.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => text.split_at(i),
        None => (text, ""),
    };
    let number: u64 = number.trim().parse().map_err(|_| invalid())?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "kB" | "KB" => 1000,
        "KiB" => 1024,
        "MB" => 1000 * 1000,
        "MiB" => 1024 * 1024,
        "GB" => 1000 * 1000 * 1000,
        "GiB" => 1024 * 1024 * 1024,
        _ => return Err(invalid()),
    };
    number
        .checked_mul(factor)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(invalid)
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
        .map_err(|_| ConfigError::Invalid(format!("`{s}` is not a valid number of seconds")))
}

/// Parses `"500ms"`, `"10s"`, `"2m"`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, ConfigError> {
    let text = text.trim();
    let invalid =
        || ConfigError::Invalid(format!("`{text}` is not a duration (e.g. 500ms, 5s, 1m)"));
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

/// A configuration error, shown to the operator as one line. A caller can
/// tell a bad value from a file it names that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A value that is not valid; the message names the key and the value
    /// (never a secret).
    #[error("{0}")]
    Invalid(String),
    /// A file the configuration names (`ca_file`) cannot be read.
    #[error("{key}: cannot read `{}`: {message}", path.display())]
    Unreadable {
        key: &'static str,
        path: PathBuf,
        kind: std::io::ErrorKind,
        message: String,
    },
}

/// Command-line overrides; they win over everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TelemetryOverrides {
    pub endpoint: Option<String>,
    pub protocol: Option<String>,
    pub flush_timeout: Option<Duration>,
    pub disabled: bool,
    /// `--telemetry-logs`.
    pub logs: bool,
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
    /// The export buffer and retries.
    pub buffer: BufferSettings,
    /// Bound on the final export attempt when the runner stops.
    pub shutdown_timeout: Duration,
    /// Extra CA certificates (PEM) for TLS endpoints.
    pub ca_file: Option<PathBuf>,
    /// Bearer token file for the static endpoint.
    pub bearer_token_file: Option<PathBuf>,
    /// Base URL of the GCP-metadata-compatible ID token server.
    pub gcp_metadata_url: String,
    /// Values ignored on the way, to be logged once at start.
    pub warnings: Vec<String>,
    /// How this runner negotiates a job's telemetry (the old-GitLab trace ID
    /// fallback); not read from `[runners.telemetry]`: the runner sets it
    /// (`--derive-trace-id-from-pipeline`).
    pub negotiation: NegotiationOptions,
    /// Where the job logs' records go (contract v1), `None` when log export
    /// is off.
    pub logs: Option<StaticEndpoint>,
    /// Timeout of one export request of log records (every logs endpoint).
    pub logs_export_timeout: Duration,
    /// Compression of log record requests.
    pub logs_compression: Compression,
}

/// Compression of export requests (`OTEL_EXPORTER_OTLP_*_COMPRESSION`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    #[default]
    None,
    Gzip,
}

/// Limits of the runner-wide export buffer and the retry schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferSettings {
    /// Most spans buffered (all endpoints together); more are dropped as
    /// `queue_full`.
    pub max_spans: usize,
    /// Most bytes of encoded spans buffered (all endpoints together).
    pub max_bytes: usize,
    /// Spans not exported this long after they ended are dropped as `max_age`.
    pub max_age: Duration,
    /// First retry delay; doubles after each failure (with jitter).
    pub initial_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
}

impl Default for BufferSettings {
    fn default() -> Self {
        BufferSettings {
            max_spans: DEFAULT_BUFFER_MAX_SPANS,
            max_bytes: DEFAULT_BUFFER_MAX_BYTES,
            max_age: DEFAULT_MAX_AGE,
            initial_backoff: DEFAULT_RETRY_INITIAL_BACKOFF,
            max_backoff: DEFAULT_RETRY_MAX_BACKOFF,
        }
    }
}

/// The static collector endpoint. `Debug` shows header names, not values
/// (they often carry credentials).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct StaticEndpoint {
    pub transport: Transport,
    /// HTTP: the full traces URL. gRPC: `http://host:port`.
    pub url: String,
    pub headers: Vec<(String, String)>,
}

impl fmt::Debug for StaticEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("StaticEndpoint")
            .field("transport", &self.transport)
            .field("url", &crate::secrets::strip_credentials(&self.url))
            .field("headers", &names)
            .finish()
    }
}

impl fmt::Display for StaticEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}+{}",
            self.transport,
            crate::secrets::strip_credentials(&self.url)
        )
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
            buffer: BufferSettings::default(),
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            ca_file: None,
            bearer_token_file: None,
            gcp_metadata_url: DEFAULT_GCP_METADATA_URL.to_string(),
            warnings: Vec::new(),
            negotiation: NegotiationOptions::default(),
            logs: None,
            logs_export_timeout: DEFAULT_EXPORT_TIMEOUT,
            logs_compression: Compression::None,
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
    let err = |why: &str| ConfigError::Invalid(format!("connection string: {why}"));
    let url = url::Url::parse(text.trim()).map_err(|e| err(&format!("invalid URL: {e}")))?;
    let tls = match url.scheme() {
        "otlp" => false,
        "otlps" => true,
        other => {
            return Err(err(&format!(
                "unsupported scheme `{other}`, expected `otlp` or `otlps`"
            )))
        }
    };
    let scheme = if tls { "https" } else { "http" };
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
            format!("{scheme}://{host}:{}", url.port().unwrap_or(4317))
        }
        Transport::HttpProtobuf => {
            let path = if path.is_empty() || path == "/" {
                "/v1/traces"
            } else {
                path
            };
            format!("{scheme}://{host}:{}{path}", url.port().unwrap_or(4318))
        }
    };
    Ok(parsed)
}

fn parse_protocol(value: &str) -> Result<Transport, ConfigError> {
    match value.trim() {
        "grpc" => Ok(Transport::Grpc),
        "http/protobuf" => Ok(Transport::HttpProtobuf),
        "http/json" => Err(ConfigError::Invalid(
            "`http/json` is not supported, use `http/protobuf`".into(),
        )),
        other => Err(ConfigError::Invalid(format!(
            "`{other}` is not a protocol (`grpc` or `http/protobuf`)"
        ))),
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
        Some(p) => {
            Some(parse_protocol(p).map_err(|e| ConfigError::Invalid(format!("protocol: {e}")))?)
        }
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
    let explicit_headers: Option<Vec<(String, String)>> = if !file.headers.is_empty() {
        Some(
            file.headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )
    } else {
        connection
            .as_ref()
            .filter(|c| !c.headers.is_empty())
            .map(|c| c.headers.clone())
    };
    let headers = match &explicit_headers {
        Some(headers) => headers.clone(),
        None => env_headers(env, OTEL_EXPORTER_OTLP_TRACES_HEADERS, &mut warnings),
    };

    // Timeouts.
    let explicit_timeout = match &file.timeout {
        Some(t) => Some(
            t.to_duration()
                .map_err(|e| ConfigError::Invalid(format!("timeout: {e}")))?,
        ),
        None => connection.as_ref().and_then(|c| c.timeout),
    };
    let export_timeout = signal_timeout(
        explicit_timeout,
        env,
        OTEL_EXPORTER_OTLP_TRACES_TIMEOUT,
        &mut warnings,
    );
    let flush_timeout = match (overrides.flush_timeout, &file.flush_timeout) {
        (Some(t), _) => t,
        (None, Some(t)) => t
            .to_duration()
            .map_err(|e| ConfigError::Invalid(format!("flush_timeout: {e}")))?,
        (None, None) => env_var(env, CI_TELEMETRY_FLUSH_TIMEOUT)
            .and_then(
                |v| match v.trim().parse::<f64>().map(Duration::try_from_secs_f64) {
                    // Too large or negative values fall through to the warning.
                    Ok(Ok(duration)) => Some(duration),
                    _ => {
                        warnings.push(format!(
                        "ignored {CI_TELEMETRY_FLUSH_TIMEOUT}: `{v}` is not a number of seconds"
                    ));
                        None
                    }
                },
            )
            .unwrap_or(DEFAULT_FLUSH_TIMEOUT),
    };

    let service_name = file
        .service_name
        .clone()
        .filter(|s| !s.is_empty())
        .or_else(|| connection.as_ref().and_then(|c| c.service_name.clone()))
        .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_string());

    let buffer = resolve_buffer(file, env, &mut warnings)?;
    let shutdown_timeout = file_or_env_duration(
        "shutdown_timeout",
        file.shutdown_timeout.as_ref(),
        env,
        CI_TELEMETRY_SHUTDOWN_TIMEOUT,
        &mut warnings,
    )?
    .unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT);

    let ca_file = match file.ca_file.as_deref().filter(|f| !f.trim().is_empty()) {
        Some(path) => Some(PathBuf::from(path)),
        None => env_var(env, OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE)
            .or_else(|| env_var(env, OTEL_EXPORTER_OTLP_CERTIFICATE))
            .map(PathBuf::from),
    };
    if let Some(path) = &ca_file {
        check_ca_file(path)?;
    }
    let bearer_token_file = file
        .bearer_token_file
        .as_deref()
        .filter(|f| !f.trim().is_empty())
        .map(PathBuf::from)
        .or_else(|| env_var(env, CI_TELEMETRY_BEARER_TOKEN_FILE).map(PathBuf::from));
    let gcp_metadata_url = match file
        .gcp_metadata_url
        .as_deref()
        .filter(|u| !u.trim().is_empty())
    {
        Some(url) => {
            let parsed = url::Url::parse(url.trim()).map_err(|e| {
                ConfigError::Invalid(format!("gcp_metadata_url `{url}` is not a URL: {e}"))
            })?;
            if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
                return Err(ConfigError::Invalid(format!(
                    "gcp_metadata_url `{url}` must be an http:// or https:// URL with a host"
                )));
            }
            url.trim().trim_end_matches('/').to_string()
        }
        None => match env_var(env, GCE_METADATA_HOST) {
            Some(host) => {
                let url = format!("http://{}", host.trim());
                match url::Url::parse(&url) {
                    Ok(parsed) if parsed.host_str().is_some() && parsed.path() == "/" => url,
                    _ => {
                        warnings.push(format!(
                            "ignored {GCE_METADATA_HOST}: `{host}` is not HOST[:PORT]"
                        ));
                        DEFAULT_GCP_METADATA_URL.to_string()
                    }
                }
            }
            None => DEFAULT_GCP_METADATA_URL.to_string(),
        },
    };

    let endpoint = StaticEndpoint {
        transport,
        url,
        headers,
    };
    let logs_on = overrides.logs
        || file.logs
        || env_var(env, CI_TELEMETRY_LOGS).is_some_and(|v| {
            matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "1" | "yes")
        });
    let (logs, logs_export_timeout, logs_compression) = match logs_on {
        true => {
            let mut logs = resolve_logs_endpoint(&endpoint, env, &mut warnings)?;
            logs.headers = match explicit_headers {
                Some(headers) => headers,
                None => env_headers(env, OTEL_EXPORTER_OTLP_LOGS_HEADERS, &mut warnings),
            };
            let timeout = signal_timeout(
                explicit_timeout,
                env,
                OTEL_EXPORTER_OTLP_LOGS_TIMEOUT,
                &mut warnings,
            );
            let compression =
                env_compression(env, OTEL_EXPORTER_OTLP_LOGS_COMPRESSION, &mut warnings)
                    .or_else(|| env_compression(env, OTEL_EXPORTER_OTLP_COMPRESSION, &mut warnings))
                    .unwrap_or_default();
            if compression == Compression::Gzip {
                warnings.push(
                    "gzip compression of log records is not implemented: they are sent uncompressed"
                        .into(),
                );
            }
            (Some(logs), timeout, compression)
        }
        false => (None, export_timeout, Compression::None),
    };
    Ok(ExportSettings {
        enabled: !(overrides.disabled || file.disabled),
        service_name,
        flush_timeout,
        export_timeout,
        endpoint,
        logs,
        logs_export_timeout,
        logs_compression,
        buffer,
        shutdown_timeout,
        ca_file,
        bearer_token_file,
        gcp_metadata_url,
        warnings,
        negotiation: NegotiationOptions::default(),
    })
}

/// Headers from the signal's variable, else from the generic one.
fn env_headers(env: &dyn Env, signal: &str, warnings: &mut Vec<String>) -> Vec<(String, String)> {
    for name in [signal, OTEL_EXPORTER_OTLP_HEADERS] {
        if let Some(text) = env_var(env, name) {
            let (headers, bad) = parse_headers(&text);
            warnings.extend(bad.into_iter().map(|b| format!("ignored in {name}: {b}")));
            return headers;
        }
    }
    Vec::new()
}

/// The explicit timeout, else the signal's variable, else the generic one,
/// else the default.
fn signal_timeout(
    explicit: Option<Duration>,
    env: &dyn Env,
    signal: &str,
    warnings: &mut Vec<String>,
) -> Duration {
    explicit
        .or_else(|| env_duration_ms(env, signal, warnings))
        .or_else(|| env_duration_ms(env, OTEL_EXPORTER_OTLP_TIMEOUT, warnings))
        .unwrap_or(DEFAULT_EXPORT_TIMEOUT)
}

/// A compression variable: `none` or `gzip`; anything else is ignored with
/// a warning.
fn env_compression(env: &dyn Env, name: &str, warnings: &mut Vec<String>) -> Option<Compression> {
    let value = env_var(env, name)?;
    match value.trim().to_ascii_lowercase().as_str() {
        "none" => Some(Compression::None),
        "gzip" => Some(Compression::Gzip),
        _ => {
            warnings.push(format!(
                "ignored {name}: `{value}` is not a compression (`none` or `gzip`)"
            ));
            None
        }
    }
}

/// The logs endpoint (see the module docs), given the traces endpoint; its
/// headers are the traces endpoint's until the caller sets the logs' own.
fn resolve_logs_endpoint(
    traces: &StaticEndpoint,
    env: &dyn Env,
    warnings: &mut Vec<String>,
) -> Result<StaticEndpoint, ConfigError> {
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
    let transport = env_protocol(OTEL_EXPORTER_OTLP_LOGS_PROTOCOL)
        .or_else(|| env_protocol(OTEL_EXPORTER_OTLP_PROTOCOL))
        .unwrap_or(traces.transport);
    let url = if let Some(endpoint) = env_var(env, OTEL_EXPORTER_OTLP_LOGS_ENDPOINT) {
        endpoint
    } else if let Some(endpoint) = env_var(env, OTEL_EXPORTER_OTLP_ENDPOINT) {
        match transport {
            Transport::HttpProtobuf => format!("{}/v1/logs", endpoint.trim_end_matches('/')),
            Transport::Grpc => endpoint,
        }
    } else {
        logs_url(transport, &traces.url)
    };
    let url = validate_endpoint(transport, url.trim())
        .map_err(|e| ConfigError::Invalid(format!("logs endpoint: {e}")))?;
    Ok(StaticEndpoint {
        transport,
        url,
        headers: traces.headers.clone(),
    })
}

/// The logs URL of the collector whose traces URL is `traces_url`: for HTTP,
/// a final `/v1/traces` becomes `/v1/logs` (else `/v1/logs` is appended to
/// the path); gRPC URLs are the same for every signal.
pub fn logs_url(transport: Transport, traces_url: &str) -> String {
    match transport {
        Transport::Grpc => traces_url.to_string(),
        Transport::HttpProtobuf => {
            let url = traces_url.trim_end_matches('/');
            match url.strip_suffix("/v1/traces") {
                Some(base) => format!("{base}/v1/logs"),
                None => format!("{url}/v1/logs"),
            }
        }
    }
}

/// A duration from the file (an error when invalid) or else from the
/// environment (ignored with a warning when invalid; `5m`, `500ms` or bare
/// seconds).
fn file_or_env_duration(
    key: &str,
    file: Option<&DurationValue>,
    env: &dyn Env,
    name: &str,
    warnings: &mut Vec<String>,
) -> Result<Option<Duration>, ConfigError> {
    if let Some(value) = file {
        return value
            .to_duration()
            .map(Some)
            .map_err(|e| ConfigError::Invalid(format!("{key}: {e}")));
    }
    let Some(text) = env_var(env, name) else {
        return Ok(None);
    };
    match parse_duration(&text) {
        Ok(d) => Ok(Some(d)),
        Err(e) => {
            warnings.push(format!("ignored {name}: {e}"));
            Ok(None)
        }
    }
}

fn resolve_buffer(
    file: &TelemetrySettings,
    env: &dyn Env,
    warnings: &mut Vec<String>,
) -> Result<BufferSettings, ConfigError> {
    let max_spans = match file.buffer_max_spans {
        Some(n) => usize::try_from(n)
            .map_err(|_| ConfigError::Invalid(format!("buffer_max_spans: `{n}` is too large")))?,
        None => match env_var(env, CI_TELEMETRY_BUFFER_MAX_SPANS) {
            Some(text) => match text.trim().parse::<usize>() {
                Ok(n) => n,
                Err(_) => {
                    warnings.push(format!(
                        "ignored {CI_TELEMETRY_BUFFER_MAX_SPANS}: `{text}` is not a number"
                    ));
                    DEFAULT_BUFFER_MAX_SPANS
                }
            },
            None => DEFAULT_BUFFER_MAX_SPANS,
        },
    };
    let max_bytes = match &file.buffer_max_bytes {
        Some(value) => value
            .to_bytes()
            .map_err(|e| ConfigError::Invalid(format!("buffer_max_bytes: {e}")))?,
        None => match env_var(env, CI_TELEMETRY_BUFFER_MAX_BYTES) {
            Some(text) => match parse_byte_size(&text) {
                Ok(n) => n,
                Err(e) => {
                    warnings.push(format!("ignored {CI_TELEMETRY_BUFFER_MAX_BYTES}: {e}"));
                    DEFAULT_BUFFER_MAX_BYTES
                }
            },
            None => DEFAULT_BUFFER_MAX_BYTES,
        },
    };
    let mut duration = |key: &str, value: Option<&DurationValue>, name: &str| {
        file_or_env_duration(key, value, env, name, warnings)
    };
    let max_age = duration("max_age", file.max_age.as_ref(), CI_TELEMETRY_MAX_AGE)?
        .unwrap_or(DEFAULT_MAX_AGE);
    let initial_backoff = duration(
        "retry_initial_backoff",
        file.retry_initial_backoff.as_ref(),
        CI_TELEMETRY_RETRY_INITIAL_BACKOFF,
    )?
    .unwrap_or(DEFAULT_RETRY_INITIAL_BACKOFF);
    let max_backoff = duration(
        "retry_max_backoff",
        file.retry_max_backoff.as_ref(),
        CI_TELEMETRY_RETRY_MAX_BACKOFF,
    )?
    .unwrap_or(DEFAULT_RETRY_MAX_BACKOFF);
    if initial_backoff.is_zero() {
        return Err(ConfigError::Invalid(
            "retry_initial_backoff must be above zero".into(),
        ));
    }
    Ok(BufferSettings {
        max_spans,
        max_bytes,
        max_age,
        initial_backoff,
        max_backoff: max_backoff.max(initial_backoff),
    })
}

/// Reads a CA file and checks that it holds at least one PEM certificate.
/// The error names the file, never its content.
pub fn check_ca_file(path: &std::path::Path) -> Result<usize, ConfigError> {
    let pem = std::fs::read(path).map_err(|e| ConfigError::Unreadable {
        key: "ca_file",
        path: path.to_path_buf(),
        kind: e.kind(),
        message: e.to_string(),
    })?;
    let count = pem
        .split(|b| *b == b'\n')
        .filter(|line| line.starts_with(b"-----BEGIN CERTIFICATE-----"))
        .count();
    if count == 0 {
        return Err(ConfigError::Invalid(format!(
            "ca_file: `{}` holds no PEM certificate",
            path.display()
        )));
    }
    Ok(count)
}

fn validate_endpoint(transport: Transport, url: &str) -> Result<String, ConfigError> {
    let parsed = url::Url::parse(url)
        .map_err(|e| ConfigError::Invalid(format!("endpoint `{url}` is not a URL: {e}")))?;
    match parsed.scheme() {
        "http" | "https" => {}
        other => {
            return Err(ConfigError::Invalid(format!(
                "endpoint `{url}`: unsupported scheme `{other}` for {transport}"
            )))
        }
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(ConfigError::Invalid(format!(
            "endpoint `{url}` has no host"
        )));
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
        check_rendered(file, &overrides, vars, expected, |s| {
            let mut line = format!(
                "{} headers=[{}] timeout={:?} flush={:?} service={}",
                s.endpoint,
                rendered_headers(&s.endpoint.headers),
                s.export_timeout,
                s.flush_timeout,
                s.service_name
            );
            if !s.enabled {
                line.push_str(" disabled");
            }
            line
        });
    }

    /// Resolves `file` with `overrides` and `vars` and compares `render`'s
    /// line, with the warnings appended (or `error: ..`), to `expected`.
    fn check_rendered(
        file: &str,
        overrides: &TelemetryOverrides,
        vars: &[(&str, &str)],
        expected: &str,
        render: impl FnOnce(&ExportSettings) -> String,
    ) {
        let file: TelemetrySettings = toml::from_str(file).expect("test config parses");
        let actual = match resolve(&file, overrides, &env(vars)) {
            Ok(s) => {
                let mut line = render(&s);
                for w in &s.warnings {
                    line.push_str(&format!(" warning=({w})"));
                }
                line
            }
            Err(e) => format!("error: {e}"),
        };
        assert_eq!(actual, expected);
    }

    fn rendered_headers(headers: &[(String, String)]) -> String {
        let headers: Vec<String> = headers.iter().map(|(k, v)| format!("{k}={v}")).collect();
        headers.join(",")
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

    /// Resolves with log export on and renders the logs side:
    /// `transport+url headers=[..] timeout=.. compression=..` and warnings.
    fn check_logs(file: &str, vars: &[(&str, &str)], expected: &str) {
        let overrides = TelemetryOverrides {
            logs: true,
            ..none()
        };
        check_rendered(file, &overrides, vars, expected, |s| {
            let logs = s.logs.as_ref().expect("log export is on");
            format!(
                "{logs} headers=[{}] timeout={:?} compression={:?}",
                rendered_headers(&logs.headers),
                s.logs_export_timeout,
                s.logs_compression
            )
        });
    }

    /// The logs' own settings: signal-specific variable, then generic, then
    /// default, below the explicit configuration; `_TRACES_` never applies.
    #[test]
    fn logs_settings_precedence() {
        let http = "http/protobuf+http://localhost:4318/v1/logs";
        let defaults = "headers=[] timeout=10s compression=None";
        type Row<'a> = (&'a str, &'a [(&'a str, &'a str)], String);
        let table: &[Row] = &[
            ("", &[], format!("{http} {defaults}")),
            // Endpoint: LOGS, then generic (+ /v1/logs), then the traces
            // endpoint's collector.
            (
                "",
                &[
                    (OTEL_EXPORTER_OTLP_ENDPOINT, "http://c:4318"),
                    (OTEL_EXPORTER_OTLP_LOGS_ENDPOINT, "http://l:9/custom"),
                ],
                format!("http/protobuf+http://l:9/custom {defaults}"),
            ),
            (
                "",
                &[(OTEL_EXPORTER_OTLP_ENDPOINT, "http://c:4318/")],
                format!("http/protobuf+http://c:4318/v1/logs {defaults}"),
            ),
            (
                "endpoint = 'http://t:4318/v1/traces'",
                &[],
                format!("http/protobuf+http://t:4318/v1/logs {defaults}"),
            ),
            // Protocol: LOGS, then generic, then the traces endpoint's.
            (
                "",
                &[
                    (OTEL_EXPORTER_OTLP_PROTOCOL, "grpc"),
                    (OTEL_EXPORTER_OTLP_LOGS_PROTOCOL, "http/protobuf"),
                ],
                format!("http/protobuf+http://localhost:4317/v1/logs {defaults}"),
            ),
            (
                "",
                &[(OTEL_EXPORTER_OTLP_LOGS_PROTOCOL, "grpc")],
                format!("grpc+http://localhost:4318/v1/traces {defaults}"),
            ),
            // Headers: LOGS replaces generic; TRACES does not apply.
            (
                "",
                &[
                    (OTEL_EXPORTER_OTLP_HEADERS, "a=1"),
                    (OTEL_EXPORTER_OTLP_LOGS_HEADERS, "l=2, m=x%20y"),
                    (OTEL_EXPORTER_OTLP_TRACES_HEADERS, "t=3"),
                ],
                format!("{http} headers=[l=2,m=x y] timeout=10s compression=None"),
            ),
            (
                "",
                &[
                    (OTEL_EXPORTER_OTLP_HEADERS, "a=1"),
                    (OTEL_EXPORTER_OTLP_TRACES_HEADERS, "t=3"),
                ],
                format!("{http} headers=[a=1] timeout=10s compression=None"),
            ),
            (
                "",
                &[(OTEL_EXPORTER_OTLP_TRACES_HEADERS, "t=3")],
                format!("{http} {defaults}"),
            ),
            // The file's headers are explicit: above every variable.
            (
                "[headers]\nx-file = 'f'",
                &[(OTEL_EXPORTER_OTLP_LOGS_HEADERS, "l=2")],
                format!("{http} headers=[x-file=f] timeout=10s compression=None"),
            ),
            (
                "",
                &[(OTEL_EXPORTER_OTLP_LOGS_HEADERS, "l=2,broken")],
                format!("{http} headers=[l=2] timeout=10s compression=None warning=(ignored in OTEL_EXPORTER_OTLP_LOGS_HEADERS: malformed header entry #2)"),
            ),
            // Timeout: LOGS, then generic, then 10 s; TRACES does not apply;
            // the file's is explicit.
            (
                "",
                &[
                    (OTEL_EXPORTER_OTLP_TIMEOUT, "2500"),
                    (OTEL_EXPORTER_OTLP_LOGS_TIMEOUT, "700"),
                    (OTEL_EXPORTER_OTLP_TRACES_TIMEOUT, "300"),
                ],
                format!("{http} headers=[] timeout=700ms compression=None"),
            ),
            (
                "",
                &[
                    (OTEL_EXPORTER_OTLP_TIMEOUT, "2500"),
                    (OTEL_EXPORTER_OTLP_TRACES_TIMEOUT, "300"),
                ],
                format!("{http} headers=[] timeout=2.5s compression=None"),
            ),
            (
                "timeout = 3",
                &[(OTEL_EXPORTER_OTLP_LOGS_TIMEOUT, "700")],
                format!("{http} headers=[] timeout=3s compression=None"),
            ),
            (
                "",
                &[
                    (OTEL_EXPORTER_OTLP_LOGS_TIMEOUT, "soon"),
                    (OTEL_EXPORTER_OTLP_TIMEOUT, "2500"),
                ],
                format!("{http} headers=[] timeout=2.5s compression=None warning=(ignored OTEL_EXPORTER_OTLP_LOGS_TIMEOUT: `soon` is not milliseconds)"),
            ),
            // Compression: LOGS, then generic, then none.
            (
                "",
                &[
                    (OTEL_EXPORTER_OTLP_COMPRESSION, "gzip"),
                    (OTEL_EXPORTER_OTLP_LOGS_COMPRESSION, "none"),
                ],
                format!("{http} {defaults}"),
            ),
            (
                "",
                &[(OTEL_EXPORTER_OTLP_COMPRESSION, "gzip")],
                format!("{http} headers=[] timeout=10s compression=Gzip warning=(gzip compression of log records is not implemented: they are sent uncompressed)"),
            ),
            (
                "",
                &[
                    (OTEL_EXPORTER_OTLP_LOGS_COMPRESSION, "zstd"),
                    (OTEL_EXPORTER_OTLP_COMPRESSION, "none"),
                ],
                format!("{http} {defaults} warning=(ignored OTEL_EXPORTER_OTLP_LOGS_COMPRESSION: `zstd` is not a compression (`none` or `gzip`))"),
            ),
        ];
        for (file, vars, expected) in table {
            check_logs(file, vars, expected);
        }
        // The traces side keeps its own values.
        let file: TelemetrySettings = toml::from_str("").unwrap();
        let overrides = TelemetryOverrides {
            logs: true,
            ..none()
        };
        let vars = env(&[
            (OTEL_EXPORTER_OTLP_LOGS_HEADERS, "l=2"),
            (OTEL_EXPORTER_OTLP_LOGS_TIMEOUT, "700"),
        ]);
        let s = resolve(&file, &overrides, &vars).unwrap();
        assert!(s.endpoint.headers.is_empty());
        assert_eq!(s.export_timeout, DEFAULT_EXPORT_TIMEOUT);
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
        // Too many seconds for a Duration: ignored, not a panic.
        check("", none(), &[(CI_TELEMETRY_FLUSH_TIMEOUT, "1e300")], &format!("{ep} headers=[] timeout=10s flush=5s service=gitlab-ci-runner warning=(ignored CI_TELEMETRY_FLUSH_TIMEOUT: `1e300` is not a number of seconds)"));
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
            &format!("grpc+https://c:4317 headers=[] {rest} service=gitlab-ci-runner"),
        );
        check(
            "",
            none(),
            &[(GITLAB_TRACING, "otlps://c?protocol=http")],
            &format!(
                "http/protobuf+https://c:4318/v1/traces headers=[] {rest} service=gitlab-ci-runner"
            ),
        );
        check(
            "",
            none(),
            &[(GITLAB_TRACING, "jaeger://c")],
            "error: connection string: unsupported scheme `jaeger`, expected `otlp` or `otlps`",
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
            "http/protobuf+https://c/v1/traces headers=[] timeout=10s flush=5s service=gitlab-ci-runner",
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

    /// Resolves and renders the export client's settings.
    fn check_client(file: &str, vars: &[(&str, &str)], expected: &str) {
        check_rendered(file, &none(), vars, expected, |s| {
            let b = &s.buffer;
            format!(
                "spans={} bytes={} max_age={:?} backoff={:?}..{:?} shutdown={:?} ca={:?} token_file={:?} metadata={}",
                b.max_spans,
                b.max_bytes,
                b.max_age,
                b.initial_backoff,
                b.max_backoff,
                s.shutdown_timeout,
                s.ca_file,
                s.bearer_token_file,
                s.gcp_metadata_url
            )
        });
    }

    #[test]
    fn export_client_settings() {
        check_client(
            "",
            &[],
            "spans=10000 bytes=33554432 max_age=300s backoff=1s..30s shutdown=5s ca=None token_file=None metadata=http://metadata.google.internal",
        );
        check_client(
            "buffer_max_spans = 50\nbuffer_max_bytes = '512KiB'\nmax_age = '5s'\nretry_initial_backoff = '100ms'\nretry_max_backoff = 2\nshutdown_timeout = '1s'\nbearer_token_file = '/var/run/token'\ngcp_metadata_url = 'http://127.0.0.1:9/'",
            &[(CI_TELEMETRY_MAX_AGE, "1m"), (GCE_METADATA_HOST, "other:80")],
            "spans=50 bytes=524288 max_age=5s backoff=100ms..2s shutdown=1s ca=None token_file=Some(\"/var/run/token\") metadata=http://127.0.0.1:9",
        );
        // The environment fills what the file does not say.
        check_client(
            "",
            &[
                (CI_TELEMETRY_BUFFER_MAX_SPANS, "7"),
                (CI_TELEMETRY_BUFFER_MAX_BYTES, "1MB"),
                (CI_TELEMETRY_MAX_AGE, "5"),
                (CI_TELEMETRY_RETRY_INITIAL_BACKOFF, "250ms"),
                (CI_TELEMETRY_RETRY_MAX_BACKOFF, "100ms"),
                (CI_TELEMETRY_SHUTDOWN_TIMEOUT, "2s"),
                (CI_TELEMETRY_BEARER_TOKEN_FILE, "/t"),
                (GCE_METADATA_HOST, "169.254.169.254:8080"),
            ],
            // A maximum below the initial delay is raised to it.
            "spans=7 bytes=1000000 max_age=5s backoff=250ms..250ms shutdown=2s ca=None token_file=Some(\"/t\") metadata=http://169.254.169.254:8080",
        );
        // Invalid environment values are ignored with a warning.
        check_client(
            "",
            &[(CI_TELEMETRY_BUFFER_MAX_SPANS, "many"), (CI_TELEMETRY_MAX_AGE, "forever"), (GCE_METADATA_HOST, "a/b")],
            "spans=10000 bytes=33554432 max_age=300s backoff=1s..30s shutdown=5s ca=None token_file=None metadata=http://metadata.google.internal warning=(ignored CI_TELEMETRY_BUFFER_MAX_SPANS: `many` is not a number) warning=(ignored CI_TELEMETRY_MAX_AGE: `forever` is not a duration (e.g. 500ms, 5s, 1m)) warning=(ignored GCE_METADATA_HOST: `a/b` is not HOST[:PORT])",
        );
        // Invalid file values are errors.
        check_client(
            "buffer_max_bytes = '12 parsecs'",
            &[],
            "error: buffer_max_bytes: `12 parsecs` is not a size (e.g. 32MiB, 512KiB, 1000000)",
        );
        check_client(
            "max_age = 'old'",
            &[],
            "error: max_age: `old` is not a duration (e.g. 500ms, 5s, 1m)",
        );
        check_client(
            "retry_initial_backoff = 0",
            &[],
            "error: retry_initial_backoff must be above zero",
        );
        check_client(
            "gcp_metadata_url = 'metadata'",
            &[],
            "error: gcp_metadata_url `metadata` is not a URL: relative URL without a base",
        );
        check_client("ca_file = '/nonexistent/ca.pem'", &[], "error: ca_file: cannot read `/nonexistent/ca.pem`: No such file or directory (os error 2)");
        check_client("", &[(OTEL_EXPORTER_OTLP_CERTIFICATE, "/nonexistent/env-ca.pem")], "error: ca_file: cannot read `/nonexistent/env-ca.pem`: No such file or directory (os error 2)");
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("ca.txt");
        std::fs::write(&not_pem, "hello").unwrap();
        check_client(
            &format!("ca_file = '{}'", not_pem.display()),
            &[],
            &format!(
                "error: ca_file: `{}` holds no PEM certificate",
                not_pem.display()
            ),
        );
        // A caller tells an unreadable file from a bad value by the variant.
        let unreadable = check_ca_file(std::path::Path::new("/nonexistent/ca.pem")).unwrap_err();
        assert!(
            matches!(
                unreadable,
                ConfigError::Unreadable {
                    key: "ca_file",
                    kind: std::io::ErrorKind::NotFound,
                    ..
                }
            ),
            "{unreadable:?}"
        );
        assert!(matches!(
            check_ca_file(&not_pem),
            Err(ConfigError::Invalid(_))
        ));
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
