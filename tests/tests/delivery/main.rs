//! Delivery strategies: inline handlers and process managers, the
//! transactional outbox on both SQL backends, the JetStream relay and
//! consumer.
//!
//! Each module is one file's suite; run one with
//! `cargo test -p outflow-tests --test delivery <module>::`.

mod delivery;
mod outbox;
mod relay_nats;
