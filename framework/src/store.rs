//! The event store: the role traits backends implement, and the backends.
//!
//! The traits (the *ports*) are defined on a floor of their own and
//! re-exported here, where users have always found them; each backend keeps
//! everything it does in one folder under the same file names: `memory`,
//! `postgres`, `sqlite` and `jetstream`.
//!
//! | role | trait | methods |
//! | --- | --- | --- |
//! | run commands | [`EventStore`] | 4 (+4 optional: remembered outcomes) |
//! | read the log | [`EventLog`](crate::log::EventLog) | 6 (1 optional) |
//! | write in transactions | [`Transactional`] | 3 (1 optional) |
//! | inline handlers | [`AppendInTransaction`] | 1 |
//! | projections | [`ProjectionStore`] = [`Checkpoints`] + [`Leases`] + [`DeadLetters`] + [`Inbox`] | 9 + 4 + 5 + 1 |

pub use crate::port::backend::Backend;
pub use crate::port::decisions::{AppendCondition, ConditionalAppend, QueryRead, ReadPosition};
pub use crate::port::events::{
    read_stream, AppendInTransaction, CopyTarget, EventStore, LoadedStream, StreamEvent,
    Transactional,
};
pub use crate::port::projections;
pub use crate::port::projections::{
    Checkpoints, DeadLetter, DeadLetters, Inbox, Lease, Leases, NewDeadLetter, ProjectionState,
    ProjectionStore, UnitError, UnitId, UnitRecord,
};

#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub mod jetstream;
pub mod memory;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod postgres;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
mod sql;
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub mod sqlite;

/// The store an [`Outbox`](crate::outbox::Outbox) or
/// [`OutboxRelay`](crate::outbox::OutboxRelay) is of when its type does not
/// name one: PostgreSQL when that feature is on, SQLite otherwise.
#[cfg(feature = "postgres")]
#[doc(hidden)]
pub type DefaultOutboxStore = postgres::PostgresStore;
/// The store an [`Outbox`](crate::outbox::Outbox) or
/// [`OutboxRelay`](crate::outbox::OutboxRelay) is of when its type does not
/// name one: PostgreSQL when that feature is on, SQLite otherwise.
#[cfg(all(feature = "sqlite", not(feature = "postgres")))]
#[doc(hidden)]
pub type DefaultOutboxStore = sqlite::SqliteStore;
