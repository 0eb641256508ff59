//! An in-memory event store with the same log semantics and concurrency
//! checks as the durable ones. For unit tests and examples: it keeps
//! everything in process memory and loses it on exit.

mod append;
mod dead_letters;
mod decisions;
mod keys;
mod log;
mod state;
mod transactions;
mod units;

pub use state::{MemoryStore, MemoryTransaction};
