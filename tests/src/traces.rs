//! Traced tests: an in-memory OpenTelemetry exporter behind
//! `tracing-opentelemetry`, installed for the current thread only (run the
//! test on a current-thread runtime, so the tasks it spawns are traced too,
//! and the other tests of the binary are not).
//!
//! Installed this way, a span whose last handle is dropped on another
//! thread never closes its parent: the registry closes a parent through
//! that thread's default subscriber, which is not this one. SQLite's driver
//! drops span handles on its connection threads, so a traced test whose
//! spans must all end runs on PostgreSQL (a service installs its subscriber
//! for every thread, and is not affected).

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing_subscriber::layer::SubscriberExt;

/// The exporter, its provider and the guard that keeps the subscriber
/// installed on this thread.
pub struct Traced {
    exporter: InMemorySpanExporter,
    provider: SdkTracerProvider,
    _guard: tracing::subscriber::DefaultGuard,
}

impl Traced {
    /// Installs the subscriber on this thread.
    pub fn install() -> Traced {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("outflow-tests")));
        Traced {
            _guard: tracing::subscriber::set_default(subscriber),
            exporter,
            provider,
        }
    }

    /// Every span ended so far.
    pub fn spans(&self) -> Vec<SpanData> {
        self.provider.force_flush().expect("flush the spans");
        self.exporter.get_finished_spans().expect("the spans")
    }
}
