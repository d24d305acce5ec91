//! Robust input: arbitrary bytes and arbitrary (but contract-shaped) JSON and
//! TOML fed to payload negotiation, configuration parsing and the export
//! client's parsers. Whatever comes in, the answer is a value or an error,
//! never a panic.

use std::time::SystemTime;

use conformance::doubles::inputs::{environment, interesting_text, telemetry_section};
use proptest::prelude::*;
use runner_telemetry::config::{self, TelemetryOverrides, TelemetrySettings};
use runner_telemetry::export::{auth, retry};
use runner_telemetry::negotiate::negotiate;
use serde_json::{json, Value};

/// The shared generator's environment names are the ones the library reads.
#[test]
fn the_generated_environment_is_the_librarys() {
    let names = [
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
    assert_eq!(conformance::doubles::inputs::TELEMETRY_ENV, names);
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        interesting_text().prop_map(Value::String),
        Just(json!("4bf92f3577b34da6a3ce929d0e0e4736")),
        Just(json!("00f067aa0ba902b7")),
        Just(json!("http_bearer_gcp_oidc")),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        let keys = prop_oneof![
            proptest::sample::select(vec![
                "features",
                "job_telemetry",
                "tracing",
                "trace_context",
                "trace_id",
                "parent_span_id",
                "span_parent_id",
                "otel_endpoints",
                "url",
                "auth",
                "type",
                "http_bearer_gcp_oidc",
                "audience",
                "job_info",
                "root_pipeline_id",
                "pipeline_id",
            ])
            .prop_map(str::to_string),
            "[a-z_]{1,8}",
        ];
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map(keys, inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn negotiation_takes_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(value) = serde_json::from_slice::<Value>(&bytes) {
            let _ = negotiate(&value).to_string();
        }
        let text = String::from_utf8_lossy(&bytes);
        if let Ok(value) = serde_json::from_str::<Value>(&format!("{{\"features\":{text}}}")) {
            let _ = negotiate(&value).to_string();
        }
    }

    #[test]
    fn negotiation_takes_any_contract_shaped_json(
        value in json_value(),
        url in interesting_text(),
        auth in json_value(),
    ) {
        let _ = negotiate(&value).to_string();
        let v2 = json!({"features": {"tracing": {
            "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
            "span_parent_id": "00f067aa0ba902b7",
            "otel_endpoints": [{"url": url, "auth": auth}, value.clone(), {"url": url.clone()}]}}});
        let _ = negotiate(&v2).to_string();
        let v1 = json!({"features": {"job_telemetry": value.clone()}, "trace_context": value, "job_info": auth});
        let _ = negotiate(&v1).to_string();
    }

    #[test]
    fn configuration_takes_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400), env in environment()) {
        let text = String::from_utf8_lossy(&bytes);
        if let Ok(file) = toml::from_str::<TelemetrySettings>(&text) {
            let _ = config::resolve(&file, &TelemetryOverrides::default(), &env);
        }
        let _ = config::parse_connection_string(&text);
        let _ = config::parse_headers(&text);
        let _ = config::parse_duration(&text);
        let _ = config::parse_byte_size(&text);
    }

    #[test]
    fn configuration_takes_any_telemetry_section(section in telemetry_section()) {
        let overrides = TelemetryOverrides {
            endpoint: section.endpoint,
            flush_timeout: section.flush_timeout,
            ..TelemetryOverrides::default()
        };
        if let Ok(file) = toml::from_str::<TelemetrySettings>(&section.text) {
            let _ = config::resolve(&file, &overrides, &section.env);
        }
    }

    #[test]
    fn export_parsers_take_any_input(text in "\\PC{0,80}", bytes in proptest::collection::vec(any::<u8>(), 0..200), status in any::<u16>(), code in any::<i32>()) {
        let _ = auth::jwt_expiry(&text);
        let _ = retry::parse_retry_after(&text, SystemTime::now());
        let _ = retry::classify_http(status, Some(&text), SystemTime::UNIX_EPOCH);
        let _ = retry::retry_info_delay(&bytes);
        let _ = retry::classify_grpc(tonic::Code::from_i32(code), &bytes);
        let _ = config::parse_headers(&text);
    }
}
