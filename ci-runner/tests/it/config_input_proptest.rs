//! Robust input: arbitrary bytes and arbitrary (but contract-shaped) TOML fed
//! to the runner's `config.toml` parsing and resolution. Whatever comes in,
//! the answer is a value or an error, never a panic. (The library's own
//! parsers are fuzzed in `runner-telemetry/tests/it/export_input_proptest.rs`; the
//! generators are `conformance::doubles::inputs`.)

use ci_runner::config as runner_config;
use conformance::doubles::inputs::{environment, interesting_text, telemetry_section};
use proptest::prelude::*;
use runner_telemetry::config::TelemetryOverrides;

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
        section in telemetry_section(),
        listen in proptest::option::of(interesting_text()),
    ) {
        let overrides = TelemetryOverrides {
            endpoint: section.endpoint,
            flush_timeout: section.flush_timeout,
            ..TelemetryOverrides::default()
        };
        let runner_file = format!("listen_address = {}\n[[runners]]\nurl = \"http://g\"\ntoken = \"t\"\n[runners.telemetry]\n{}",
            toml::Value::String(listen.clone().unwrap_or_default()), section.text);
        if let Ok(file) = runner_config::parse(&runner_file) {
            let flags = runner_config::RunFlags { telemetry: overrides, metrics_listen: listen, ..Default::default() };
            let _ = runner_config::resolve(Some(file), &flags, &section.env);
        }
    }
}
