//! The program as a job runs it (the conformance suite checks its span in
//! ClickHouse): here, that it takes its parent from `TRACEPARENT` even when
//! nothing receives its span. Being an integration test also makes `cargo test`
//! build the binary where the suite looks for it (`target/<profile>/`).

use std::net::TcpListener;
use std::process::Command;

#[test]
fn takes_its_parent_from_traceparent_with_no_collector() {
    // A port nothing listens on: bound, then released.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let output = Command::new(env!("CARGO_BIN_EXE_otel-child"))
        .arg("carrier_check")
        .env(
            "TRACEPARENT",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .env(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{port}"),
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stdout.starts_with("otel-child trace_id=4bf92f3577b34da6a3ce929d0e0e4736 span_id=")
            && stdout.trim_end().ends_with(" parent=00f067aa0ba902b7"),
        "stdout: {stdout}"
    );
    // The SDK's simple processor reports a failed export through its own
    // diagnostics, not through `shutdown`: the program still ends well.
    assert!(output.status.success(), "stderr: {stderr}");
}
