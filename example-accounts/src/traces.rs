//! Logs to standard error and, when an OTLP endpoint is configured
//! (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
//! an `http://` collector taking OTLP over HTTP with protobuf), traces to
//! it: every HTTP request, the commands it runs, and through the trace
//! context Outflow stores in the events, the transfer steps, projection
//! batches and e-mails that follow (see `outflow::trace`).

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Whether an OTLP endpoint is configured.
fn otlp_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|name| std::env::var_os(name).is_some_and(|value| !value.is_empty()))
}

/// Installs the logger (`RUST_LOG`, or `default_filter`) and, when
/// configured, the OTLP trace exporter; returns the exporter's provider, to
/// be shut down (flushed) before the process exits.
pub fn init(default_filter: &str) -> anyhow::Result<Option<SdkTracerProvider>> {
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter)),
        );
    let provider = if otlp_configured() {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
            .map_err(|error| anyhow::anyhow!("configuring the OTLP exporter: {error}"))?;
        Some(
            SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(
                    Resource::builder()
                        .with_service_name("outflow-bank")
                        .build(),
                )
                .build(),
        )
    } else {
        None
    };
    // Spans at INFO and above are traced whatever the log filter says.
    let traces = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("example-accounts"))
            .with_filter(LevelFilter::INFO)
    });
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .init();
    Ok(provider)
}

/// Sends the spans still buffered (at most a few seconds' worth).
pub fn shutdown(provider: Option<SdkTracerProvider>) {
    if let Some(provider) = provider {
        if let Err(error) = provider.shutdown() {
            eprintln!("flushing the traces failed: {error}");
        }
    }
}
