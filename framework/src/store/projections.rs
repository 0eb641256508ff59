//! The backend side of projections: transactions for read-model writes,
//! checkpoints guarded by leases, dead letters and the inbox.
//!
//! Each projection partition (a *unit*) has one row of state: its checkpoint,
//! its owner and lease, an `epoch` that grows with every change of owner, its
//! state and last error. A runner writes a batch's read-model changes and the
//! unit's new checkpoint in one transaction, and the checkpoint write only
//! succeeds while the unit's epoch is still the one the runner claimed: a
//! runner that lost its lease (it stalled, its node was cut off) cannot commit
//! a batch after another runner took over, so no event is applied twice.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{EventRef, StoreError};
use crate::event::{Checkpoint, RecordedEvent};
use crate::log::{LogFilter, Wakeups};
use crate::store::EventStore;

/// One projection partition: the unit of work a runner owns.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct UnitId {
    /// Projection name.
    pub projection: String,
    /// Partition index, `0..partitions`.
    pub partition: u32,
}

impl std::fmt::Display for UnitId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}#{}", self.projection, self.partition)
    }
}

/// What a runner gets when it claims a unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The unit.
    pub unit: UnitId,
    /// The epoch this claim holds; checkpoint writes must present it.
    pub epoch: u64,
    /// Where the unit's checkpoint stands.
    pub checkpoint: Checkpoint,
    /// Whether the unit is paused.
    pub paused: bool,
}

/// What a projection unit is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProjectionState {
    /// Registered, not yet run.
    Idle,
    /// Reading batches to catch up with the log.
    CatchingUp,
    /// Caught up, waiting for new events.
    Live,
    /// Paused by an operator.
    Paused,
    /// A batch failed and is being retried.
    Retrying,
    /// Stopped on an error (see the last error); restart it after a fix.
    Stopped,
}

impl ProjectionState {
    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            ProjectionState::Idle => "idle",
            ProjectionState::CatchingUp => "catching_up",
            ProjectionState::Live => "live",
            ProjectionState::Paused => "paused",
            ProjectionState::Retrying => "retrying",
            ProjectionState::Stopped => "stopped",
        }
    }

    /// Parses a stored name.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "idle" => ProjectionState::Idle,
            "catching_up" => ProjectionState::CatchingUp,
            "live" => ProjectionState::Live,
            "paused" => ProjectionState::Paused,
            "retrying" => ProjectionState::Retrying,
            "stopped" => ProjectionState::Stopped,
            _ => return None,
        })
    }
}

/// The stored state of one unit.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitRecord {
    /// The unit.
    pub unit: UnitId,
    /// Number of partitions of the projection.
    pub partitions: u32,
    /// Checkpoint of the last event handled (or skipped as not wanted).
    pub checkpoint: Checkpoint,
    /// The node holding the lease, if any.
    pub owner: Option<String>,
    /// Whether the lease is still valid (the owner renewed it in time).
    pub lease_valid: bool,
    /// Grows with every change of owner and every reset.
    pub epoch: u64,
    /// What the unit is doing.
    pub state: ProjectionState,
    /// Whether an operator paused it.
    pub paused: bool,
    /// The last error, if the unit is retrying or stopped.
    pub last_error: Option<String>,
    /// Events handled since the last reset.
    pub processed: u64,
    /// Events to replay, counted when the last rebuild started.
    pub rebuild_total: Option<u64>,
    /// When the state last changed.
    pub updated_at: DateTime<Utc>,
}

/// An event a projection could not handle, parked for later.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// Id of the dead letter.
    pub id: u64,
    /// The unit that parked it.
    pub unit: UnitId,
    /// The event's id.
    pub event_id: Uuid,
    /// Where the event stands in the log.
    pub checkpoint: Checkpoint,
    /// Which event it is.
    pub event: EventRef,
    /// The handler's error with its causes.
    pub error: String,
    /// How many attempts failed.
    pub attempts: u32,
    /// When the first attempt failed.
    pub first_failed_at: DateTime<Utc>,
    /// When the last attempt failed.
    pub last_failed_at: DateTime<Utc>,
}

/// A dead letter about to be written.
#[derive(Debug, Clone)]
pub struct NewDeadLetter<'a> {
    /// The unit parking it.
    pub unit: &'a UnitId,
    /// The event.
    pub event: &'a RecordedEvent,
    /// The error chain.
    pub error: String,
    /// Failed attempts.
    pub attempts: u32,
    /// When the first attempt failed.
    pub first_failed_at: DateTime<Utc>,
}

/// The oldest transaction still running on the server: it holds every log
/// reader back (readers never pass a transaction that may still commit).
#[derive(Debug, Clone, PartialEq)]
pub struct OldestTransaction {
    /// Server process id.
    pub pid: i32,
    /// Its database.
    pub database: Option<String>,
    /// How long it has been open.
    pub age: Duration,
    /// Its state (`active`, `idle in transaction`, ...).
    pub state: Option<String>,
    /// The start of its current query.
    pub query: Option<String>,
}

/// A store that can run projections: the [`EventStore`] plus transactions,
/// checkpoints, leases, dead letters and an inbox.
#[async_trait]
pub trait ProjectionStore: EventStore + Clone {
    /// The transaction handlers write their read models in.
    type Transaction: Send + 'static;

    /// Starts a transaction.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    async fn begin(&self) -> Result<Self::Transaction, StoreError>;

    /// Commits a transaction.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`]; the transaction's writes are then lost.
    async fn commit(&self, tx: Self::Transaction) -> Result<(), StoreError>;

    /// Creates the state rows of a projection's partitions if missing.
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidAppend`]-like configuration errors when the
    /// projection exists with another partition count; database errors.
    async fn register_projection(&self, name: &str, partitions: u32) -> Result<(), StoreError>;

    /// Records that `node` is alive; returns the number of live nodes.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    async fn node_heartbeat(&self, node: &str, ttl: Duration) -> Result<u32, StoreError>;

    /// Claims a unit for `node` if it is free, its lease expired, or `node`
    /// holds it already; stopped units are not claimed.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    async fn claim(
        &self,
        unit: &UnitId,
        node: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError>;

    /// Extends the leases of every unit `node` holds; returns them with their
    /// epochs and paused flags. A unit missing from the answer was lost.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    async fn renew(&self, node: &str, ttl: Duration) -> Result<Vec<Lease>, StoreError>;

    /// Gives a unit up (graceful shutdown, rebalancing).
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    async fn release(&self, lease: &Lease, node: &str) -> Result<(), StoreError>;

    /// Moves a unit's checkpoint inside `tx`, counting `processed` events.
    /// Returns `false` (and writes nothing) when the unit's epoch is no
    /// longer `lease.epoch`: the caller must roll back.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    async fn save_checkpoint(
        &self,
        tx: &mut Self::Transaction,
        lease: &Lease,
        checkpoint: Checkpoint,
        processed: u64,
    ) -> Result<bool, StoreError>;

    /// Records a unit's state and last error (outside any batch).
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    async fn set_state(
        &self,
        lease: &Lease,
        state: ProjectionState,
        error: Option<&str>,
    ) -> Result<(), StoreError>;

    /// The units of one projection, or of all when `projection` is `None`.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    async fn units(&self, projection: Option<&str>) -> Result<Vec<UnitRecord>, StoreError>;

    /// Resets every unit of a projection inside `tx`: checkpoint to the start,
    /// epoch bumped (current owners lose their claim), counters cleared, the
    /// rebuild's total recorded, stopped units restarted.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    async fn reset_projection(
        &self,
        tx: &mut Self::Transaction,
        name: &str,
        rebuild_total: u64,
    ) -> Result<(), StoreError>;

    /// Pauses or resumes every unit of a projection.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    async fn set_paused(&self, name: &str, paused: bool) -> Result<(), StoreError>;

    /// Lets stopped units of a projection be claimed again, clearing their error.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    async fn restart_projection(&self, name: &str) -> Result<(), StoreError>;

    /// Counts the events matching `filter` after `after`, up to `upto`,
    /// stopping at `cap`.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    async fn count_events(
        &self,
        filter: &LogFilter,
        after: Checkpoint,
        upto: Checkpoint,
        cap: u64,
    ) -> Result<u64, StoreError>;

    /// When the first event after `after` matching `filter` was recorded.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    async fn first_pending_recorded_at(
        &self,
        filter: &LogFilter,
        after: Checkpoint,
    ) -> Result<Option<DateTime<Utc>>, StoreError>;

    /// Parks an event inside `tx`.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    async fn park(
        &self,
        tx: &mut Self::Transaction,
        dead_letter: NewDeadLetter<'_>,
    ) -> Result<(), StoreError>;

    /// The parked events of a projection, oldest first.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    async fn dead_letters(&self, projection: &str) -> Result<Vec<DeadLetter>, StoreError>;

    /// Removes a dead letter inside `tx` and returns it with its event, for a
    /// retry that commits or rolls back together with the handler's writes.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    async fn take_dead_letter(
        &self,
        tx: &mut Self::Transaction,
        id: u64,
    ) -> Result<Option<(DeadLetter, RecordedEvent)>, StoreError>;

    /// Records another failed attempt on a dead letter.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    async fn note_dead_letter_failure(&self, id: u64, error: &str) -> Result<(), StoreError>;

    /// Deletes a dead letter without handling it; `false` if it did not exist.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    async fn discard_dead_letter(&self, id: u64) -> Result<bool, StoreError>;

    /// Records inside `tx` that `handler` handled `message_id`; `false` when
    /// it already had (the caller then skips the message). The record commits
    /// or rolls back with the handler's own writes.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    async fn inbox_claim(
        &self,
        tx: &mut Self::Transaction,
        handler: &str,
        message_id: &str,
    ) -> Result<bool, StoreError>;

    /// Appends one command's events inside `tx`, so they commit or roll back
    /// with everything else the transaction writes (inline handlers, the
    /// caller's own rows). Call [`events_committed`](Self::events_committed)
    /// after committing.
    ///
    /// # Errors
    ///
    /// As [`EventStore::append`]; a backend may also report a conflict at
    /// commit instead.
    async fn append_in(
        &self,
        tx: &mut Self::Transaction,
        request: crate::event::AppendRequest,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// Wakes log readers after a transaction with appended events committed.
    fn events_committed(&self);

    /// Wakes waiters of [`checkpoint_wakeups`](Self::checkpoint_wakeups) here
    /// and on other nodes after checkpoints moved.
    fn signal_checkpoints(&self);

    /// A handle woken when projection checkpoints may have moved.
    fn checkpoint_wakeups(&self) -> Wakeups;

    /// Shared state of the [`wait_for`](crate::runner::wait_for) callers of
    /// this store (one refreshed view of the checkpoints for all of them).
    #[doc(hidden)]
    fn waiters(&self) -> &Waiters;

    /// The oldest transaction holding log readers back, where the backend
    /// can tell.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    async fn oldest_open_transaction(&self) -> Result<Option<OldestTransaction>, StoreError> {
        Ok(None)
    }
}

/// The checkpoints as last read, shared by every waiter of a store, and
/// whether a task is refreshing them.
#[doc(hidden)]
#[derive(Debug)]
pub struct Waiters {
    pub(crate) view: tokio::sync::watch::Sender<std::sync::Arc<Vec<UnitRecord>>>,
    pub(crate) refreshing: std::sync::atomic::AtomicBool,
}

impl Default for Waiters {
    fn default() -> Self {
        Waiters {
            view: tokio::sync::watch::Sender::new(std::sync::Arc::new(Vec::new())),
            refreshing: std::sync::atomic::AtomicBool::new(false),
        }
    }
}
