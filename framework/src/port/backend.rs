//! [`Backend`]: every role at once, for code generic over a whole backend.

use crate::port::events::{AppendInTransaction, EventStore};
use crate::port::log::EventLog;
use crate::port::projections::ProjectionStore;

/// A backend that does it all: runs commands, serves the log, appends inside
/// transactions and keeps read models, checkpoints, leases, dead letters and
/// the inbox in the same database — [`MemoryStore`](crate::MemoryStore),
/// `PostgresStore` and `SqliteStore`. Write code generic over the backend
/// with it (a behaviour suite, a service that runs on any of them).
pub trait Backend: EventStore + EventLog + AppendInTransaction + ProjectionStore + Clone {}

impl<S> Backend for S where S: EventStore + EventLog + AppendInTransaction + ProjectionStore + Clone {}
