//! The event store: the trait every backend implements, and its backends.
//!
//! A store appends each command's events to their aggregate's stream in one
//! atomic write, with optimistic concurrency on the stream's version, and
//! gives every event a place in one global log (see [`crate::log`]).

use async_trait::async_trait;

use crate::error::StoreError;
use crate::event::{AppendRequest, Checkpoint, RecordedEvent, Snapshot};
use crate::log::{LogFilter, Wakeups};

pub use projections::{
    DeadLetter, Lease, NewDeadLetter, OldestTransaction, ProjectionState, ProjectionStore, UnitId,
    UnitRecord, Waiters,
};

pub mod memory;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod postgres;
pub mod projections;

/// An aggregate's stream as loaded for a command: the newest snapshot, if
/// asked for and present, and the events after it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadedStream {
    /// The snapshot the events continue from.
    pub snapshot: Option<Snapshot>,
    /// Events after the snapshot (or all events), in sequence order.
    pub events: Vec<StreamEvent>,
}

/// An event as a command needs it to rebuild its aggregate: no envelope,
/// and the payload as the JSON text it is stored as, so that it can be
/// deserialized straight into the event type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamEvent {
    /// Sequence within the stream.
    pub sequence: u64,
    /// Global position (for error messages).
    pub position: u64,
    /// Event type.
    pub event_type: String,
    /// Event version.
    pub event_version: String,
    /// The payload as JSON text.
    pub payload: String,
}

/// A backend that stores events and serves the global log.
///
/// Implemented by [`memory::MemoryStore`] and, with the `postgres` feature,
/// [`postgres::PostgresStore`]. Users rarely call it directly: the
/// [`CommandBus`](crate::CommandBus) appends, and log readers read.
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Appends one command's events to one stream, atomically.
    ///
    /// # Errors
    ///
    /// [`StoreError::Conflict`] when the stream is not at
    /// `request.expected_version`; [`StoreError::InvalidAppend`] for a request
    /// that cannot be stored; [`StoreError::Database`] when the backend fails.
    async fn append(&self, request: AppendRequest) -> Result<Vec<RecordedEvent>, StoreError>;

    /// Reads up to `limit` events of one stream with sequence greater than
    /// `after_sequence`, in sequence order.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`] or [`StoreError::Corrupt`].
    async fn read_stream(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        after_sequence: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// Loads a stream for a command: with `use_snapshot`, the snapshot and the
    /// events after it (one round trip where the backend can); otherwise all events.
    ///
    /// # Errors
    ///
    /// As [`read_stream`](Self::read_stream).
    async fn load(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        use_snapshot: bool,
    ) -> Result<LoadedStream, StoreError>;

    /// Stores a snapshot unless a newer one is already stored.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreError>;

    /// Reads up to `limit` events of the global log after `after`, in log
    /// order, filtered by `filter`. Never returns an event a concurrent
    /// transaction could still place before the last one returned.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`] or [`StoreError::Corrupt`].
    async fn read_log(
        &self,
        after: Checkpoint,
        filter: &LogFilter,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// The checkpoint of the last event a log reader can see now
    /// ([`Checkpoint::START`] for an empty log).
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    async fn head(&self) -> Result<Checkpoint, StoreError>;

    /// A handle that wakes a log reader when new events may be readable.
    fn wakeups(&self) -> Wakeups;
}

#[async_trait]
impl<S: EventStore + ?Sized> EventStore for std::sync::Arc<S> {
    async fn append(&self, request: AppendRequest) -> Result<Vec<RecordedEvent>, StoreError> {
        (**self).append(request).await
    }
    async fn read_stream(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        after_sequence: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        (**self)
            .read_stream(aggregate_type, aggregate_id, after_sequence, limit)
            .await
    }
    async fn load(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        use_snapshot: bool,
    ) -> Result<LoadedStream, StoreError> {
        (**self)
            .load(aggregate_type, aggregate_id, use_snapshot)
            .await
    }
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        (**self).save_snapshot(snapshot).await
    }
    async fn read_log(
        &self,
        after: Checkpoint,
        filter: &LogFilter,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        (**self).read_log(after, filter, limit).await
    }
    async fn head(&self) -> Result<Checkpoint, StoreError> {
        (**self).head().await
    }
    fn wakeups(&self) -> Wakeups {
        (**self).wakeups()
    }
}
