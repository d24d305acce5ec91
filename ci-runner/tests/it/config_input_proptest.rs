//! Robust input: arbitrary bytes and arbitrary (but contract-shaped) TOML fed
//! to the runner's `config.toml` parsing and resolution. Whatever comes in,
//! the answer is a value or an error, never a panic. (The library's own
//! parsers are fuzzed in `runner-telemetry/tests/export_input_proptest.rs`.)

use std::collections::BTreeMap;
use std::time::Duration;

use ci_runner::config as runner_config;
use proptest::prelude::*;
use runner_telemetry::config::{self, TelemetryOverrides};

const ENV_NAMES: &[&str] = &[
    config::OTEL_EXPORTER_OTLP_ENDPOINT,
    config::OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
    config::OTEL_EXPORTER_OTLP_PROTOCOL,
    config::OTEL_EXPORTER_OTLP_TRACES_PROTOCOL,
    config::OTEL_EXPORTER_OTLP_HEADERS,
    config::OTEL_EXPORTER_OTLP_TRACES_HEADERS,
    config::OTEL_EXPORTER_OTLP_TIMEOUT,
    config::OTEL_EXPORTER_OTLP_TRACES_TIMEOUT,
    config::OTEL_EXPORTER_OTLP_CERTIFICATE,
    config::GITLAB_TRACING,
    config::CI_TELEMETRY_FLUSH_TIMEOUT,
    config::CI_TELEMETRY_BUFFER_MAX_SPANS,
    config::CI_TELEMETRY_BUFFER_MAX_BYTES,
    config::CI_TELEMETRY_MAX_AGE,
    config::CI_TELEMETRY_RETRY_INITIAL_BACKOFF,
    config::CI_TELEMETRY_RETRY_MAX_BACKOFF,
    config::CI_TELEMETRY_SHUTDOWN_TIMEOUT,
    config::CI_TELEMETRY_BEARER_TOKEN_FILE,
    config::GCE_METADATA_HOST,
];

const TELEMETRY_KEYS: &[&str] = &[
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
fn interesting_text() -> impl Strategy<Value = String> {
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

fn toml_value() -> impl Strategy<Value = toml::Value> {
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

fn telemetry_table() -> impl Strategy<Value = toml::Table> {
    proptest::collection::btree_map(
        proptest::sample::select(TELEMETRY_KEYS.to_vec()).prop_map(str::to_string),
        toml_value(),
        0..8,
    )
    .prop_map(|m| m.into_iter().collect())
}

fn environment() -> impl Strategy<Value = BTreeMap<String, String>> {
    proptest::collection::btree_map(
        proptest::sample::select(ENV_NAMES.to_vec()).prop_map(str::to_string),
        interesting_text(),
        0..6,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn configuration_takes_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400), env in environment()) {
        let text = String::from_utf8_lossy(&bytes);
        if let Ok(file) = runner_config::parse(&text) {
            let _ = runner_config::resolve(Some(file), &runner_config::RunFlags::default(), &env);
        }
        let _ = runner_config::parse_listen_address(&text);
    }

    #[test]
    fn configuration_takes_any_telemetry_section(
        table in telemetry_table(),
        env in environment(),
        flush in proptest::option::of(0u64..100_000),
        endpoint in proptest::option::of(interesting_text()),
        listen in proptest::option::of(interesting_text()),
    ) {
        let text = toml::to_string(&table).unwrap_or_default();
        let overrides = TelemetryOverrides {
            endpoint: endpoint.clone(),
            flush_timeout: flush.map(Duration::from_millis),
            ..TelemetryOverrides::default()
        };
        let runner_file = format!("listen_address = {}\n[[runners]]\nurl = \"http://g\"\ntoken = \"t\"\n[runners.telemetry]\n{text}",
            toml::Value::String(listen.clone().unwrap_or_default()));
        if let Ok(file) = runner_config::parse(&runner_file) {
            let flags = runner_config::RunFlags { telemetry: overrides, metrics_listen: listen, ..Default::default() };
            let _ = runner_config::resolve(Some(file), &flags, &env);
        }
    }
}
