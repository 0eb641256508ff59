//! The book's code: each chapter's Rust lives here, one module per chapter,
//! and the chapters include it by anchor (for example
//! `{{#include ../examples/src/quickstart.rs:aggregate}}`), so `cargo test`
//! compiles every snippet the book shows and `tests/` runs them, but for
//! `relay` (it needs NATS servers of its own), `jetstream::open` (it names
//! example hosts; the test opens the same store on the suite's cluster) and
//! the TLS connections in `backends`.
// The modules are the book's text, not an API.
#![allow(missing_docs)]

pub mod backends;
pub mod commands;
pub mod decisions;
pub mod delivery;
pub mod from_cqrs_es;
#[cfg(feature = "nats")]
pub mod jetstream;
pub mod operations;
pub mod outbox;
pub mod personal;
pub mod projections;
pub mod quickstart;
#[cfg(feature = "nats")]
pub mod relay;
pub mod time;
