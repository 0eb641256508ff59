//! Errors of the event store and of command execution.
//!
//! Every failure names what went wrong and with which input: the event (type,
//! version, aggregate, sequence, position), the table, the operation.

use std::fmt;

/// A boxed error from a storage backend, kept as the source of a [`StoreError`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Names one stored event in error messages: which aggregate, which sequence,
/// where in the global log, of which type and version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRef {
    /// Aggregate type (`Aggregate::TYPE`).
    pub aggregate_type: String,
    /// Aggregate instance id.
    pub aggregate_id: String,
    /// Sequence number within the aggregate's stream (1-based).
    pub sequence: u64,
    /// Global position, when the event was read from the log.
    pub position: Option<u64>,
    /// Event type as stored.
    pub event_type: String,
    /// Event version as stored.
    pub event_version: String,
}

impl fmt::Display for EventRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "event `{}` v{} of {} `{}` #{}",
            self.event_type,
            self.event_version,
            self.aggregate_type,
            self.aggregate_id,
            self.sequence
        )?;
        if let Some(position) = self.position {
            write!(f, " at position {position}")?;
        }
        Ok(())
    }
}

/// Everything that can go wrong in an event store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Optimistic concurrency: another writer appended to the stream first.
    /// Reload and retry the command.
    #[error(
        "concurrency conflict on {aggregate_type} `{aggregate_id}`: expected version {expected}{}",
        match .actual { Some(actual) => format!(", stream is at version {actual}"), None => String::new() }
    )]
    Conflict {
        /// Aggregate type of the stream.
        aggregate_type: String,
        /// Aggregate id of the stream.
        aggregate_id: String,
        /// The version the caller loaded.
        expected: u64,
        /// The version found, when known.
        actual: Option<u64>,
    },
    /// The append ran in a transaction that is older than the one that last
    /// appended to this stream (the caller wrote other rows first, and another
    /// transaction appended and committed meanwhile). Appending would put the
    /// stream out of order in the global log; retry in a new transaction.
    #[error(
        "stream {aggregate_type} `{aggregate_id}` was last appended by a transaction newer than \
         the caller's; retry the whole transaction"
    )]
    StaleTransaction {
        /// Aggregate type of the stream.
        aggregate_type: String,
        /// Aggregate id of the stream.
        aggregate_id: String,
    },
    /// A configured name is not a valid SQL identifier.
    #[error("invalid {what} `{name}`: {reason}")]
    InvalidIdentifier {
        /// What the name was for (events table, snapshots table, ...).
        what: &'static str,
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// An append request that cannot be written (empty aggregate id, too many events, ...).
    #[error("invalid append to {aggregate_type} `{aggregate_id}`: {reason}")]
    InvalidAppend {
        /// Aggregate type of the stream.
        aggregate_type: String,
        /// Aggregate id of the stream.
        aggregate_id: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Configuration that contradicts what is stored (for example a projection
    /// registered with another partition count than it has).
    #[error("configuration: {0}")]
    Config(String),
    /// A stored payload or metadata did not deserialize into the event type.
    #[error("{event} did not deserialize: {source}")]
    Deserialize {
        /// The event.
        event: Box<EventRef>,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// The stored event type is not a variant of the aggregate's event enum.
    #[error("{event} has an event type the aggregate does not know: {source}")]
    UnknownEventType {
        /// The event.
        event: Box<EventRef>,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// An upcaster failed (or panicked) on a stored event.
    #[error("upcaster `{upcaster}` failed on {event}: {message}")]
    Upcast {
        /// The event, as it was before the failing upcaster.
        event: Box<EventRef>,
        /// The upcaster's name.
        upcaster: String,
        /// What it reported.
        message: String,
    },
    /// An event or aggregate did not serialize to JSON.
    #[error("{what} of {aggregate_type} `{aggregate_id}` did not serialize: {source}")]
    Serialize {
        /// What was serialized (event payload, snapshot, metadata).
        what: &'static str,
        /// Aggregate type.
        aggregate_type: String,
        /// Aggregate id.
        aggregate_id: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// A stored value is outside what Outflow can represent (a negative
    /// sequence, an unparsable transaction id).
    #[error("corrupt row in {table}: {what}")]
    Corrupt {
        /// The table.
        table: String,
        /// What is wrong.
        what: String,
    },
    /// A schema migration failed.
    #[error("migration {version} ({name}) failed: {source}")]
    Migration {
        /// Migration version.
        version: i32,
        /// Migration name.
        name: &'static str,
        /// The database error.
        #[source]
        source: BoxError,
    },
    /// The database reported an error or the connection failed.
    #[error("{operation} failed: {source}")]
    Database {
        /// What Outflow was doing.
        operation: &'static str,
        /// The backend error.
        #[source]
        source: BoxError,
    },
}

impl StoreError {
    /// `true` for errors that a fresh attempt may not meet: a concurrency
    /// conflict, a stale transaction, or a lost connection.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Conflict { .. } | StoreError::StaleTransaction { .. } => true,
            #[cfg(feature = "postgres")]
            StoreError::Database { source, .. } => source
                .downcast_ref::<sqlx::Error>()
                .is_some_and(crate::store::postgres::is_transient),
            _ => false,
        }
    }

    /// `true` when another writer appended to the stream first.
    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            StoreError::Conflict { .. } | StoreError::StaleTransaction { .. }
        )
    }

    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn database(operation: &'static str, source: impl Into<BoxError>) -> Self {
        StoreError::Database {
            operation,
            source: source.into(),
        }
    }
}

/// The error of [`CommandBus::execute`](crate::CommandBus::execute): the
/// aggregate rejected the command, or storing its events failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError<E: std::error::Error + 'static> {
    /// The aggregate's `handle` returned an error; nothing was written.
    #[error("command rejected: {0}")]
    Rejected(#[source] E),
    /// Loading or appending failed; see [`StoreError::is_conflict`] for
    /// concurrency conflicts.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An inline handler failed; the events and its writes were rolled back.
    #[error("inline handler `{handler}` failed: {error}")]
    Inline {
        /// The handler's name.
        handler: String,
        /// Its error.
        error: crate::projection::HandlerError,
    },
}

impl<E: std::error::Error + 'static> CommandError<E> {
    /// `true` when the command lost an optimistic-concurrency race and may be retried.
    pub fn is_conflict(&self) -> bool {
        matches!(self, CommandError::Store(e) if e.is_conflict())
    }

    /// The aggregate's own error, when the command was rejected.
    pub fn rejection(&self) -> Option<&E> {
        match self {
            CommandError::Rejected(e) => Some(e),
            CommandError::Store(_) | CommandError::Inline { .. } => None,
        }
    }
}
