//! PostgreSQL's own guarantees: the gap-safe log under late commits, group
//! append, committed heads, TLS, restores, connection limits, wake-ups
//! through NOTIFY and the move from postgres-es.
//!
//! Each module is one file's suite; run one with
//! `cargo test -p outflow-tests --test postgres <module>::`.

mod append_concurrency;
mod committed_head;
mod connection_exhaustion;
mod decision_interleaving;
mod group_append;
mod log_ordering;
mod log_property;
mod memory_bounded;
mod postgres_es_compat;
mod restore;
mod tls;
mod wakeups;
