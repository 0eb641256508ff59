//! [`StoreError`]: everything that can go wrong in an event store.

use super::chain::causes;
use super::chain::BoxError;
use super::config::ConfigError;
use super::handler::HandlerError;
use super::kind::{ErrorKind, EventRef};

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
    /// A [conditional append](crate::decision) found an event matching its
    /// condition's query appended after the position its writer read: the
    /// facts the decision was made on changed. Transient: read again and
    /// decide again (a [`DecisionBus`](crate::decision::DecisionBus) does).
    #[error("the append's condition failed: an event matching {query} was appended after {after}")]
    ConditionFailed {
        /// The condition's query, as text.
        query: String,
        /// Where the writer had read up to.
        after: crate::event::Checkpoint,
    },
    /// A [`Query`](crate::tags::Query) or a tag that cannot be used (empty,
    /// too long, too many).
    #[error("invalid query or tags: {reason}")]
    InvalidQuery {
        /// What is wrong with it.
        reason: String,
    },
    /// The backend cannot do what was asked, and says why (conditional
    /// appends on a JetStream store).
    #[error("{what} is not supported by this store: {reason}")]
    Unsupported {
        /// What was asked.
        what: &'static str,
        /// Why the backend cannot.
        reason: &'static str,
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
    /// Configuration that is invalid, or contradicts what is stored (for
    /// example a projection registered with another partition count).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A stored payload or metadata did not deserialize into the event type.
    #[error("{event} did not deserialize")]
    Deserialize {
        /// The event.
        event: Box<EventRef>,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// A stored row whose payload or metadata is not JSON that Outflow can
    /// read (the database accepted what `serde_json` refuses: a lone
    /// surrogate escape, a number out of range, nesting deeper than 128, a
    /// metadata value that is not a string). The log treats it as a poison
    /// event: a projection parks it or stops on it, per its policy, and
    /// handles the events around it.
    #[error("the {what} of {event} (event {event_id}) does not decode")]
    Undecodable {
        /// The event.
        event: Box<EventRef>,
        /// The event's id.
        event_id: uuid::Uuid,
        /// The id of the transaction that wrote it (with
        /// [`EventRef::position`], its place in the global log).
        transaction_id: u64,
        /// `"payload"` or `"metadata"`.
        what: &'static str,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// The stored event type is not a variant of the aggregate's event enum.
    #[error("{event} has an event type the aggregate does not know")]
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
    #[error("{what} of {aggregate_type} `{aggregate_id}` did not serialize")]
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
    #[error("migration {version} ({name}) failed")]
    Migration {
        /// Migration version.
        version: i32,
        /// Migration name.
        name: &'static str,
        /// The database error.
        #[source]
        source: BoxError,
    },
    /// The store's servers did not answer in time: no leader for the
    /// stream (a majority of its replicas is down, or an election is under
    /// way) or no connection. Transient: retry with backoff. An append that
    /// failed so may still have been stored (retry it with the same command
    /// id: [`CommandBus::execute_once`](crate::CommandBus::execute_once)).
    #[error("{operation} failed: the event store is unavailable")]
    Unavailable {
        /// What Outflow was doing.
        operation: &'static str,
        /// What the client reported.
        #[source]
        source: BoxError,
    },
    /// The database reported an error or the connection failed.
    #[error("{operation} failed ({kind} error)")]
    Database {
        /// What Outflow was doing.
        operation: &'static str,
        /// Whose fault it is, as the backend classified it.
        kind: ErrorKind,
        /// The backend error.
        #[source]
        source: BoxError,
    },
}

impl StoreError {
    /// Whose fault the error is: concurrency conflicts are
    /// [transient](ErrorKind::Transient); events that do not decode or
    /// upcast are the [data's](ErrorKind::Data); configuration, names and
    /// migrations are the [infrastructure's](ErrorKind::Infrastructure);
    /// database errors carry the backend's own classification.
    pub fn kind(&self) -> ErrorKind {
        match self {
            StoreError::Conflict { .. }
            | StoreError::StaleTransaction { .. }
            | StoreError::ConditionFailed { .. }
            | StoreError::Unavailable { .. } => ErrorKind::Transient,
            StoreError::Database { kind, .. } => *kind,
            StoreError::InvalidIdentifier { .. }
            | StoreError::Config(_)
            | StoreError::Unsupported { .. }
            | StoreError::Migration { .. } => ErrorKind::Infrastructure,
            StoreError::InvalidAppend { .. }
            | StoreError::InvalidQuery { .. }
            | StoreError::Deserialize { .. }
            | StoreError::Undecodable { .. }
            | StoreError::UnknownEventType { .. }
            | StoreError::Upcast { .. }
            | StoreError::Serialize { .. }
            | StoreError::Corrupt { .. } => ErrorKind::Data,
        }
    }

    /// `true` for errors that a fresh attempt may not meet: a concurrency
    /// conflict, a stale transaction, or a lost connection.
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }

    /// `true` when another writer appended to the stream first, or an
    /// append's [condition](StoreError::ConditionFailed) failed.
    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            StoreError::Conflict { .. }
                | StoreError::StaleTransaction { .. }
                | StoreError::ConditionFailed { .. }
        )
    }

    /// `true` when the store's servers did not answer in time
    /// ([`StoreError::Unavailable`]).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }

    /// A database error with the backend's classification.
    pub fn database(operation: &'static str, kind: ErrorKind, source: impl Into<BoxError>) -> Self {
        StoreError::Database {
            operation,
            kind,
            source: source.into(),
        }
    }
}

// Beside `StoreError`, which it looks for: the handler's own file stays below
// the store's errors.
impl HandlerError {
    /// The classification the handler gave, or that an Outflow error in the
    /// chain carries; `None` when only the backend can tell (see
    /// [`kind_with`](Self::kind_with)).
    pub fn declared_kind(&self) -> Option<ErrorKind> {
        if self.kind.is_some() {
            return self.kind;
        }
        causes(&*self.source)
            .find_map(|error| error.downcast_ref::<StoreError>())
            .map(StoreError::kind)
    }
}
