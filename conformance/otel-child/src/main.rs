//! `otel-child`: a program instrumented with the stock OpenTelemetry SDK, as
//! a test suite inside a CI job would be. It takes its parent from the
//! environment-variable carrier (`TRACEPARENT`, `TRACESTATE`), exports with
//! its own settings (`OTEL_EXPORTER_OTLP_ENDPOINT`, ... read by the SDK at
//! their defaults), and records one span named by its first argument
//! (default `otel_child_work`) under `service.name` `otel-child`.
//!
//! Prints `otel-child trace_id=<hex> span_id=<hex> parent=<hex>` and exits 0
//! once its tracer provider has shut down (the span exported, or the failure
//! reported by the SDK's own diagnostics: its simple processor does not hand
//! export errors to `shutdown`); 1 when the exporter cannot be built.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{Span, TraceContextExt, Tracer, TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;

#[tokio::main]
async fn main() {
    let name = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "otel_child_work".to_string());
    // The carrier's keys are the lower-case header names.
    let carrier: HashMap<String, String> =
        [("traceparent", "TRACEPARENT"), ("tracestate", "TRACESTATE")]
            .into_iter()
            .filter_map(|(key, var)| std::env::var(var).ok().map(|v| (key.to_string(), v)))
            .collect();
    let parent = TraceContextPropagator::new().extract(&carrier);

    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .build()
    {
        Ok(exporter) => exporter,
        Err(e) => {
            eprintln!("otel-child: cannot build the exporter: {e}");
            std::process::exit(1);
        }
    };
    // The simple processor exports as each span ends, on this blocking
    // thread; the runtime's workers drive the HTTP client meanwhile.
    let exported = tokio::task::spawn_blocking(move || {
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter)
            .with_resource(
                Resource::builder_empty()
                    .with_service_name("otel-child")
                    .build(),
            )
            .build();
        let tracer = provider.tracer("otel-child");
        let mut span = tracer.start_with_context(name, &parent);
        let context = span.span_context().clone();
        span.end();
        println!(
            "otel-child trace_id={} span_id={} parent={}",
            context.trace_id(),
            context.span_id(),
            parent.span().span_context().span_id()
        );
        provider.shutdown().map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    if let Err(e) = exported {
        eprintln!("otel-child: exporting the span failed: {e}");
        std::process::exit(1);
    }
}
