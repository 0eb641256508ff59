//! The event store's role traits: what a backend implements to run commands,
//! serve the log and write inside transactions.
//!
//! A store appends each command's events to their aggregate's stream in one
//! atomic write, with optimistic concurrency on the stream's version, and
//! gives every event a place in one global log (see [`crate::log`]). Each
//! role is a small trait, so a backend implements only what it supports:
//!
//! | role | trait | methods |
//! | --- | --- | --- |
//! | run commands | [`EventStore`] | 4 (+4 optional: remembered outcomes) |
//! | read the log | [`EventLog`] | 6 (1 optional) |
//! | write in transactions | [`Transactional`] | 3 (1 optional) |
//! | inline handlers | [`AppendInTransaction`] | 1 |
//! | projections | [`ProjectionStore`] = [`Checkpoints`](crate::store::projections::Checkpoints) + [`Leases`](crate::store::projections::Leases) + [`DeadLetters`](crate::store::projections::DeadLetters) + [`Inbox`](crate::store::projections::Inbox) | 9 + 4 + 5 + 1 |

use async_trait::async_trait;
use futures::stream::BoxStream;

use crate::error::{ErrorKind, StoreError};
use crate::event::{AppendRequest, RecordedEvent, Snapshot};
use crate::outcome::CommandOutcome;
use chrono::{DateTime, Utc};

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

/// What a command needs from a backend: load an aggregate's stream (with
/// its snapshot), append one command's events atomically with optimistic
/// concurrency, and store snapshots.
///
/// Implemented by [`MemoryStore`](crate::MemoryStore), `PostgresStore` (feature
/// `postgres`), `SqliteStore` (feature `sqlite`) and `JetStreamStore`
/// (feature `nats`). Users rarely call it directly: the
/// [`CommandBus`](crate::CommandBus) appends and loads. Reading the global
/// log is the other role, [`EventLog`](crate::log::EventLog).
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

    /// The outcome stored for command `command_id` on this aggregate, if
    /// any (see [`crate::outcome`]).
    ///
    /// The default remembers nothing: a store that does not override the
    /// outcome methods runs a refused command again when it is re-sent.
    /// Every backend of this crate overrides them.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`] or [`StoreError::Corrupt`].
    async fn command_outcome(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        command_id: uuid::Uuid,
    ) -> Result<Option<CommandOutcome>, StoreError> {
        let _ = (aggregate_type, aggregate_id, command_id);
        Ok(None)
    }

    /// Stores `outcome` unless an outcome for the same command is already
    /// stored, and returns the one that is stored now (`outcome`, or the
    /// earlier one, which wins).
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    async fn record_outcome(&self, outcome: CommandOutcome) -> Result<CommandOutcome, StoreError> {
        Ok(outcome)
    }

    /// Appends the events of command `command_id` and, atomically with
    /// them, claims the command id: when an outcome for it is already
    /// stored (a refusal, or another send's events) nothing is written and
    /// the append fails with [`StoreError::Conflict`], so the caller looks
    /// the outcome up. The default appends without a claim.
    ///
    /// # Errors
    ///
    /// As [`append`](Self::append).
    async fn append_command(
        &self,
        request: AppendRequest,
        command_id: uuid::Uuid,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let _ = command_id;
        self.append(request).await
    }

    /// Deletes the outcomes stored before `before`; returns how many. A
    /// command re-sent after its outcome was pruned is a new command (an
    /// accepted one is still recognized by its events).
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    async fn prune_outcomes(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let _ = before;
        Ok(0)
    }

    /// The ring that seals and opens the personal values of the events
    /// this store keeps (see [`crate::personal`]). The default has none: a
    /// personal value written to such a store fails, naming the missing key
    /// store.
    fn key_ring(&self) -> Option<crate::personal::KeyRing> {
        None
    }
}

/// [`EventStore::append_command`] for a backend whose append joins a
/// transaction: the events and the command's claim commit together.
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub(crate) async fn append_claiming<S: AppendInTransaction>(
    store: &S,
    request: AppendRequest,
    command_id: uuid::Uuid,
) -> Result<Vec<RecordedEvent>, StoreError> {
    if request.events.is_empty() {
        request.validate()?;
        return Ok(Vec::new());
    }
    let (aggregate_type, aggregate_id) =
        (request.aggregate_type.clone(), request.aggregate_id.clone());
    let version = request
        .expected_version
        .saturating_add(request.events.len() as u64);
    let mut tx = store.begin().await?;
    let written = store.append_in(&mut tx, request).await?;
    store
        .claim_command_in(&mut tx, &aggregate_type, &aggregate_id, command_id, version)
        .await?;
    store.commit(tx).await?;
    Ok(written)
}

/// Streams one aggregate's events after `after_sequence` in sequence order,
/// `batch_size` at a time, with the same error behaviour as [`read_log`](crate::log::read_log).
pub fn read_stream<'a, S: EventStore + ?Sized>(
    store: &'a S,
    aggregate_type: &'a str,
    aggregate_id: &'a str,
    after_sequence: u64,
    batch_size: usize,
) -> BoxStream<'a, Result<RecordedEvent, StoreError>> {
    crate::port::log::batched(
        after_sequence,
        batch_size,
        move |after, limit| store.read_stream(aggregate_type, aggregate_id, after, limit),
        |event| event.sequence,
    )
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
    async fn command_outcome(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        command_id: uuid::Uuid,
    ) -> Result<Option<CommandOutcome>, StoreError> {
        (**self)
            .command_outcome(aggregate_type, aggregate_id, command_id)
            .await
    }
    async fn record_outcome(&self, outcome: CommandOutcome) -> Result<CommandOutcome, StoreError> {
        (**self).record_outcome(outcome).await
    }
    async fn append_command(
        &self,
        request: AppendRequest,
        command_id: uuid::Uuid,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        (**self).append_command(request, command_id).await
    }
    async fn prune_outcomes(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        (**self).prune_outcomes(before).await
    }
    fn key_ring(&self) -> Option<crate::personal::KeyRing> {
        (**self).key_ring()
    }
}

/// A backend with transactions that handlers write in: read models
/// (projections), inline handlers, inbox records. The backend also
/// classifies the errors raised inside its transactions, so the core can
/// tell a lost connection from a missing table from a bad event without
/// knowing the driver.
#[async_trait]
pub trait Transactional: Send + Sync + 'static {
    /// The transaction handlers write in.
    type Transaction: Send + 'static;

    /// Starts a transaction.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    async fn begin(&self) -> Result<Self::Transaction, StoreError>;

    /// Commits a transaction. When it appended events
    /// ([`AppendInTransaction::append_in`]), log readers are woken.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`]; the transaction's writes are then lost.
    async fn commit(&self, tx: Self::Transaction) -> Result<(), StoreError>;

    /// Whose fault an error raised by this backend's driver is (a handler's
    /// `?` on a driver error, for example); `None` when the error is not this
    /// backend's. The default knows no driver.
    fn classify(&self, error: &(dyn std::error::Error + 'static)) -> Option<ErrorKind> {
        let _ = error;
        None
    }
}

/// A backend whose append can join a transaction, so events commit or roll
/// back with everything else the transaction writes: what
/// [inline handlers](crate::command::InlineHandler) and code that appends
/// next to its own rows need.
#[async_trait]
pub trait AppendInTransaction: EventStore + Transactional {
    /// Appends one command's events inside `tx`;
    /// [`commit`](Transactional::commit) then wakes log readers.
    ///
    /// # Errors
    ///
    /// As [`EventStore::append`]; a backend may also report a conflict at
    /// commit instead.
    async fn append_in(
        &self,
        tx: &mut Self::Transaction,
        request: AppendRequest,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// Claims command `command_id` on an aggregate inside `tx` (after
    /// appending its events there): fails with [`StoreError::Conflict`]
    /// when an outcome for it is already stored, and the caller drops the
    /// transaction. What [`EventStore::append_command`] does in a
    /// transaction of its own; the default claims nothing.
    ///
    /// # Errors
    ///
    /// [`StoreError::Conflict`]; [`StoreError::Database`].
    async fn claim_command_in(
        &self,
        tx: &mut Self::Transaction,
        aggregate_type: &str,
        aggregate_id: &str,
        command_id: uuid::Uuid,
        version: u64,
    ) -> Result<(), StoreError> {
        let _ = (tx, aggregate_type, aggregate_id, command_id, version);
        Ok(())
    }
}

/// A backend a log can be copied into ([`crate::copy`]): it appends events
/// at the times the source recorded them. A backend with transactions
/// appends a batch in one transaction of its own; others append its groups
/// one by one.
#[async_trait]
pub trait CopyTarget: EventStore + crate::port::log::EventLog {
    /// Appends `groups` in order, each request's events recorded at its
    /// time. An error leaves the target as if none had been appended, where
    /// the backend has transactions, or with those before the failing one
    /// appended, where it has not.
    ///
    /// # Errors
    ///
    /// As [`EventStore::append`].
    async fn append_batch(
        &self,
        groups: &[(AppendRequest, DateTime<Utc>)],
    ) -> Result<(), StoreError>;
}
