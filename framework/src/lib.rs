//! # Outflow
//!
//! A CQRS / event-sourcing framework for services whose events must not be
//! lost. Aggregates are plain [`cqrs-es`](cqrs_es) aggregates; Outflow stores
//! their events in an event store with a gap-safe global log, runs commands
//! through a [`CommandBus`] that returns what it wrote, and lets log readers
//! follow every event in one total order.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use outflow::prelude::*;
//! # use outflow::doc_fixture::{Counter, CounterCommand};
//!
//! // `Counter` is an ordinary `cqrs_es::Aggregate`.
//! let store = MemoryStore::new();
//! let bus = CommandBus::<Counter, _>::new(store.clone(), ());
//! let committed = bus.execute("counter-1", CounterCommand::Increment { by: 2 }).await?;
//! assert_eq!(committed.version, 1);
//!
//! // Every event has a place in the global log.
//! let log = store.read_log(Checkpoint::START, &LogFilter::all(), 100).await?;
//! assert_eq!(log[0].event_id, committed.events[0].event_id);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
//!
//! # The five parts
//!
//! - **Commands** ([`command`]): a [`CommandBus`] loads a cqrs-es aggregate,
//!   lets it handle a command, appends what it emitted with optimistic
//!   concurrency, and returns the envelopes and positions it wrote.
//! - **The log** ([`log`]): every event in one total order that never skips a
//!   late commit; [`EventLog`] is what a reader needs from a backend.
//! - **Projections** ([`projection`], [`runner`]): durable readers that commit
//!   each batch's read-model writes with their checkpoint, on one node or
//!   many, with retries, dead letters, rebuilds, status and `wait_for`.
//! - **Delivery** ([`delivery`]): the guarantee each reaction gets — inline
//!   in the append's transaction, in-memory or multi-node pub/sub
//!   ([`pubsub`]), projections with effects, process managers that issue
//!   commands across aggregates (`process`), a broker relay, the outbox.
//! - **Backends** ([`store`]): small role traits ([`EventStore`],
//!   [`EventLog`], [`Transactional`], [`AppendInTransaction`],
//!   [`ProjectionStore`]) implemented by [`MemoryStore`] and, with the
//!   `postgres` feature (on by default), `PostgresStore` (PostgreSQL 13+,
//!   compatible with `postgres-es`'s schema); `SqliteStore` (feature
//!   `sqlite`) keeps everything in one file; `JetStreamStore` (feature
//!   `nats`) is an event store and log on NATS JetStream, with read models
//!   in one of the others. Errors say whose fault they are ([`ErrorKind`]),
//!   as classified by the backend that raised them.
//! - **Operations**: the console any service mounts (`outflow::admin`,
//!   feature `admin`: an axum router with a JSON API and a page), copying a
//!   log between backends ([`copy`]), and the `outflow` command of the
//!   workspace's `cli` crate, which does both from a shell; metrics
//!   ([`telemetry`]) and traces that follow an event from its command to
//!   every reaction ([`trace`], OpenTelemetry with feature `opentelemetry`).
//!
//! # The book
//!
//! The guide is an mdBook in the repository (`mdbook build docs`; every Rust
//! snippet in it is included from `docs/examples`, which the test suite
//! compiles, and runs but for the JetStream relay, the JetStream store's
//! `open` and the TLS examples). Its chapters, by file under `docs/src/`:
//! `quickstart.md` (an aggregate, a command, a projection and a
//! read-your-writes query on SQLite), `getting-started.md` (the dependencies),
//! `delivery.md` (choosing how to handle events: inline, pub/sub, durable
//! projections, a broker, the outbox — guarantees, failure modes, a decision
//! table), `outbox.md`, `relay.md`, `commands.md` (aggregates, tests,
//! snapshots, upcasting, conflicts, context), `projections.md`,
//! `process-managers.md`, `time.md` (deadlines and scheduled commands),
//! `decisions.md` (decisions across aggregates), `personal-data.md`
//! (crypto-shredding: forgetting a person), `from-cqrs-es.md` (moving a cqrs-es / postgres-es
//! application, code and database), `backends.md`, `event-store.md`,
//! `postgres.md` (schema, migration, pool, TLS), `jetstream.md` (the NATS
//! JetStream event store: guarantees, partitions, failures, a cluster, moving
//! from PostgreSQL), `operations.md` (several nodes, lag, rebuilds, dead
//! letters, long transactions, backups),
//! `errors.md`, `how-it-works.md`, `benchmarks.md`, `reliability.md`,
//! `example.md` (the example application).
#![warn(missing_debug_implementations)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs)]

#[cfg(feature = "admin")]
#[cfg_attr(docsrs, doc(cfg(feature = "admin")))]
pub mod admin;
mod backoff;
pub mod command;
pub mod copy;
pub mod decision;
pub mod delivery;
pub mod error;
pub mod event;
pub mod lease;
pub use port::log;
pub mod names;
#[cfg(feature = "nats")]
mod nats;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "postgres", feature = "sqlite"))))]
pub mod outbox;
pub mod outcome;
pub mod personal;
mod port;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "postgres", feature = "sqlite"))))]
pub mod process;
pub mod projection;
pub mod pubsub;
#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub mod relay;
pub mod runner;
pub mod store;
pub mod tags;
pub mod telemetry;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "postgres", feature = "sqlite"))))]
pub mod timer;
pub mod trace;
pub mod upcast;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "postgres", feature = "sqlite"))))]
pub mod view;
mod wake;

#[doc(hidden)]
pub mod doc_fixture;

pub use backoff::RetryPolicy;
pub use command::{CommandBus, CommandBusBuilder, CommandContext, Committed};
pub use error::{CommandError, ConfigError, ErrorKind, EventRef, HandlerError, StoreError};
pub use event::{AppendRequest, Checkpoint, Envelope, Metadata, NewEvent, RecordedEvent, Snapshot};
pub use outcome::Refusal;
pub use port::log::{EventLog, LogFilter, LogWindow, Wakeups};
#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub use store::jetstream::{JetStreamStore, JetStreamStoreBuilder};
pub use store::memory::MemoryStore;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use store::postgres::{PostgresStore, PostgresStoreBuilder};
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub use store::sqlite::{SqliteStore, SqliteStoreBuilder};
pub use store::{
    AppendInTransaction, Backend, EventStore, LoadedStream, ProjectionStore, StreamEvent,
    Transactional,
};

/// The time types events and timers use.
pub use chrono;
/// Re-exports of `cqrs-es` so applications need one dependency.
pub use cqrs_es;

/// The attribute Outflow's async traits are implemented with:
/// `#[outflow::async_trait]` (or `#[async_trait]` after `use outflow::prelude::*`).
pub use async_trait::async_trait;

/// What [`ProjectionRunner::run`](runner::ProjectionRunner::run) and the
/// relays stop on.
pub use tokio_util::sync::CancellationToken;

/// The sqlx that PostgreSQL handlers' transactions and pools come from
/// (`outflow::sqlx::query`, `outflow::sqlx::Transaction`), so it always
/// matches Outflow's.
#[cfg(any(feature = "postgres", feature = "sqlite"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "postgres", feature = "sqlite"))))]
pub use sqlx;

/// Everything an application usually needs: `use outflow::prelude::*;`.
pub mod prelude {
    pub use crate::projection::{
        typed, EventHandler, OnError, Projection, ProjectionOptions, RetryPolicy,
    };
    pub use crate::runner::{ProjectionRunner, ProjectionStatus, WaitError};
    #[cfg(feature = "postgres")]
    pub use crate::PostgresStore;
    #[cfg(feature = "sqlite")]
    pub use crate::SqliteStore;
    pub use crate::{
        AppendInTransaction, Backend, Checkpoint, CommandBus, CommandContext, CommandError,
        Committed, Envelope, EventLog, EventStore, HandlerError, LogFilter, MemoryStore,
        ProjectionStore, RecordedEvent, StoreError, Transactional,
    };
    pub use async_trait::async_trait;
    pub use cqrs_es::event_sink::EventSink;
    pub use cqrs_es::{Aggregate, DomainEvent, EventEnvelope, View};
    pub use tokio_util::sync::CancellationToken;
}
