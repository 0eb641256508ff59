//! The NATS kit: what the JetStream event store and the JetStream relay
//! share, written once — how names become subject tokens, how a stream is
//! provisioned, and how the client's errors are classified (from its typed
//! error kinds and JetStream's error codes).
//!
//! The kit names no Outflow feature: the store (`store/jetstream/`) and the
//! relay (`relay/`) each turn its answers into their own error types.

pub(crate) mod errors;
pub(crate) mod streams;
pub(crate) mod subjects;
