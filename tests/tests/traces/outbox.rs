//! An outbox message carries the trace it was enqueued in: its headers get
//! the current span's `traceparent` at `enqueue`, and the relay's delivery
//! span links to it (an in-memory OpenTelemetry exporter, a SQLite file).

use outflow_tests as common;

use common::outbox::{message, relay, send, until_delivered, Log, Recorder, Running};
use outflow::outbox::{Outbox, OutboxMessageRecord};

use opentelemetry::trace::TraceContextExt;
use outflow::trace::{TraceParent, TRACEPARENT};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

#[tokio::test]
async fn a_message_carries_its_trace_and_its_delivery_links_to_it() {
    // This thread only: a current-thread runtime runs the relay here too.
    let traced = common::traces::Traced::install();

    let dir = common::TestDir::new("outbox-traces");
    let store = dir.sqlite().await;
    let outbox = Outbox::new(&store).await.expect("outbox");
    let request = tracing::info_span!("request");
    let sent = async {
        let mut ids = Vec::new();
        for n in 0..3 {
            ids.push(send(&outbox, "order-1", n).await);
        }
        // A traceparent the caller set itself is replaced by the current
        // span's: the message belongs to the trace it was sent in.
        let own = message("order-2", 0).header(
            TRACEPARENT,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        );
        ids.push(outbox.send(own).await.expect("send"));
        ids
    }
    .instrument(request.clone())
    .await;
    let root = request.context().span().span_context().clone();
    drop(request);
    assert!(root.is_valid());

    let log = Log::default();
    let running = Running::start(relay(&outbox, "node-a", Recorder::new("node-a", &log)));
    until_delivered(&log, &sent).await;
    running.stop().await;

    let delivered: Vec<OutboxMessageRecord> = log
        .lock()
        .expect("log")
        .iter()
        .map(|(_, m)| m.clone())
        .collect();
    for message in &delivered {
        let parent = TraceParent::from_carrier(&message.headers).expect("a traceparent header");
        assert_eq!(parent.trace_id, root.trace_id().to_bytes());
        assert_eq!(parent.span_id, root.span_id().to_bytes());
    }
    let spans = traced.spans();
    let deliveries: Vec<_> = spans
        .iter()
        .filter(|s| s.name == "outflow.outbox.deliver")
        .collect();
    assert!(!deliveries.is_empty(), "no delivery span");
    for delivery in &deliveries {
        assert_ne!(
            delivery.span_context.trace_id(),
            root.trace_id(),
            "a delivery is its own trace"
        );
    }
    assert!(
        deliveries.iter().any(|d| d
            .links
            .iter()
            .any(|link| link.span_context.span_id() == root.span_id()
                && link.span_context.trace_id() == root.trace_id())),
        "no delivery span links to the request that sent the messages"
    );
}
