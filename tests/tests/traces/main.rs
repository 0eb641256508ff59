//! Traces that follow an event, under an in-memory OpenTelemetry exporter
//! installed for the test's own thread. A binary of their own: a test
//! running beside them in one process creates the same spans on other
//! threads, and then some of this thread's spans (the projection batches)
//! were not exported.
//!
//! Run one with `cargo test -p outflow-tests --test traces <module>::`.

mod outbox;
mod transfer;
