//! Input generators (proptest strategies) for the robustness tests of the
//! runner's and the library's configuration: text shaped like what the
//! parsers expect and not, TOML values, `[runners.telemetry]` tables and
//! telemetry environments, and whole sections with the overrides they are
//! resolved with.

use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::*;

/// The environment variables the telemetry configuration reads.
pub const TELEMETRY_ENV: &[&str] = &[
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
    "OTEL_EXPORTER_OTLP_CERTIFICATE",
    "GITLAB_TRACING",
    "CI_TELEMETRY_FLUSH_TIMEOUT",
    "CI_TELEMETRY_BUFFER_MAX_SPANS",
    "CI_TELEMETRY_BUFFER_MAX_BYTES",
    "CI_TELEMETRY_MAX_AGE",
    "CI_TELEMETRY_RETRY_INITIAL_BACKOFF",
    "CI_TELEMETRY_RETRY_MAX_BACKOFF",
    "CI_TELEMETRY_SHUTDOWN_TIMEOUT",
    "CI_TELEMETRY_BEARER_TOKEN_FILE",
    "GCE_METADATA_HOST",
];

/// The keys of a runner's `[runners.telemetry]` section.
pub const TELEMETRY_KEYS: &[&str] = &[
    "disabled",
    "endpoint",
    "protocol",
    "headers",
    "timeout",
    "flush_timeout",
    "service_name",
    "connection_string",
    "buffer_max_spans",
    "buffer_max_bytes",
    "max_age",
    "retry_initial_backoff",
    "retry_max_backoff",
    "shutdown_timeout",
    "ca_file",
    "bearer_token_file",
    "gcp_metadata_url",
];

/// Strings that look like what the parsers expect, and some that do not.
pub fn interesting_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "\\PC{0,40}",
        "[0-9]{0,25}(ms|s|m|h|KiB|MiB|GiB|kB|MB|B)?",
        "-?[0-9]{1,5}\\.[0-9]{0,5}(e[0-9]{1,3})?",
        "(otlp|otlps|http|https|grpc|grpcs|ftp)://[a-z0-9.:\\[\\]@%-]{0,20}(/[a-z0-9/]{0,10})?(\\?[a-z_=&%/0-9]{0,30})?",
        "[a-z-]{1,8}=[^,]{0,10}(,[a-z-]{0,8}=?[^,]{0,10}){0,3}",
        Just("http/json".to_string()),
        Just("grpc".to_string()),
        Just("".to_string()),
        Just(":".to_string()),
        Just("::1]".to_string()),
    ]
}

/// Any TOML value, nested two deep, with `interesting_text` strings.
pub fn toml_value() -> impl Strategy<Value = toml::Value> {
    let leaf = prop_oneof![
        interesting_text().prop_map(toml::Value::String),
        any::<i64>().prop_map(toml::Value::Integer),
        any::<f64>().prop_map(toml::Value::Float),
        any::<bool>().prop_map(toml::Value::Boolean),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..3).prop_map(toml::Value::Array),
            proptest::collection::btree_map("[a-z_-]{1,10}", inner, 0..3)
                .prop_map(|m| toml::Value::Table(m.into_iter().collect())),
        ]
    })
}

/// A `[runners.telemetry]` table: known keys, any values.
pub fn telemetry_table() -> impl Strategy<Value = toml::Table> {
    proptest::collection::btree_map(
        proptest::sample::select(TELEMETRY_KEYS.to_vec()).prop_map(str::to_string),
        toml_value(),
        0..8,
    )
    .prop_map(|m| m.into_iter().collect())
}

/// An environment of telemetry variables with `interesting_text` values.
pub fn environment() -> impl Strategy<Value = BTreeMap<String, String>> {
    proptest::collection::btree_map(
        proptest::sample::select(TELEMETRY_ENV.to_vec()).prop_map(str::to_string),
        interesting_text(),
        0..6,
    )
}

/// A `[runners.telemetry]` section as TOML text, with the environment and the
/// command-line overrides (endpoint, flush timeout) it is resolved with.
#[derive(Clone, Debug)]
pub struct TelemetrySection {
    /// The section's body (`telemetry_table` written as TOML).
    pub text: String,
    /// The process environment (`environment`).
    pub env: BTreeMap<String, String>,
    /// The endpoint override, if any.
    pub endpoint: Option<String>,
    /// The flush timeout override, if any (0 to 100 s).
    pub flush_timeout: Option<Duration>,
}

/// A `TelemetrySection`: any table, environment and overrides.
pub fn telemetry_section() -> impl Strategy<Value = TelemetrySection> {
    (
        telemetry_table(),
        environment(),
        proptest::option::of(interesting_text()),
        proptest::option::of(0u64..100_000),
    )
        .prop_map(|(table, env, endpoint, flush)| TelemetrySection {
            text: toml::to_string(&table).unwrap_or_default(),
            env,
            endpoint,
            flush_timeout: flush.map(Duration::from_millis),
        })
}
