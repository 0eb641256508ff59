//! The backend side of projections: checkpoints guarded by leases, dead
//! letters and the inbox, each a small role trait.
//!
//! Each projection partition (a *unit*) has its state: its checkpoint, an
//! `epoch` that a claim bumps unless the claiming node still holds a valid
//! lease on the unit (so every change of owner does) and that every reset
//! bumps, its state and last error;
//! and its lease: the owner and until when (kept apart from the checkpoint,
//! so that renewing it never waits for a batch). A runner writes a batch's
//! read-model changes and the unit's new checkpoint in one transaction, and
//! the checkpoint write only succeeds while the unit's epoch is still the one
//! the runner claimed and the checkpoint is still where the batch started: a
//! runner that lost its lease (it stalled, its node was cut off) cannot commit
//! a batch after another runner took over, and a batch retried after a lost
//! commit acknowledgement is not applied twice.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{ErrorKind, EventRef, StoreError};
use crate::event::{Checkpoint, RecordedEvent};
use crate::port::events::Transactional;
use crate::wake::Wakeups;

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
#[non_exhaustive]
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

impl std::fmt::Display for ProjectionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
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
    /// Grows when a node claims the unit without holding a valid lease on
    /// it, and on every reset; a node that claims again while its lease is
    /// valid (a restarted process with a stable node id) keeps it.
    pub epoch: u64,
    /// What the unit is doing.
    pub state: ProjectionState,
    /// Whether an operator paused it.
    pub paused: bool,
    /// The last error, if the unit is retrying or stopped.
    pub last_error: Option<String>,
    /// Whose fault the last error is, as the backend classified it when it
    /// was recorded ([`Checkpoints::record_state`]); `None` without an
    /// error, or when it was recorded without its kind.
    pub error_kind: Option<ErrorKind>,
    /// Events handled since the last reset.
    pub processed: u64,
    /// Events to replay, counted when the last rebuild started.
    pub rebuild_total: Option<u64>,
    /// When the state last changed.
    pub updated_at: DateTime<Utc>,
    /// Where the latest of the unit's dead letters stands in the log, if it
    /// has any: a wait can tell from it alone that nothing was parked in its
    /// range.
    pub last_parked: Option<Checkpoint>,
}

/// A unit's last error as [`Checkpoints::record_state`] records it: the
/// text shown in status, and whose fault it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnitError<'a> {
    /// Whose fault it is.
    pub kind: ErrorKind,
    /// The text shown in status (the error with its causes).
    pub message: &'a str,
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

/// What a projection runner needs to keep a unit's place: the units'
/// state rows, their checkpoints (moved inside the read model's
/// transaction), resets, pause and restart, and the signal that tells
/// `wait_for` callers that checkpoints moved.
#[async_trait]
pub trait Checkpoints: Transactional + Clone {
    /// Creates the state rows of a projection's partitions if missing.
    ///
    /// # Errors
    ///
    /// [`ConfigError::PartitionCount`](crate::error::ConfigError::PartitionCount)
    /// when the projection exists with another partition count; database errors.
    async fn register_projection(&self, name: &str, partitions: u32) -> Result<(), StoreError>;

    /// Moves a unit's checkpoint from `from` to `to` inside `tx`, counting
    /// `processed` events. Returns `false` (and writes nothing) when the
    /// unit's epoch is no longer `lease.epoch` or its checkpoint is no longer
    /// `from` (a retried batch that had in fact committed): the caller must
    /// roll back.
    ///
    /// A runner calls it first in a batch's transaction, before the
    /// handler writes: the unit is then held until the batch ends (a claim
    /// by another node or a reset waits for it, or skips the unit), while
    /// lease renewals should not wait for it (keep leases apart from the
    /// checkpoint, as the PostgreSQL backend's `<events>_leases` table does;
    /// SQLite, with one writer at a time, cannot, and says so).
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    async fn save_checkpoint(
        &self,
        tx: &mut Self::Transaction,
        lease: &Lease,
        from: Checkpoint,
        to: Checkpoint,
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

    /// Records a unit's state and last error together with the error's
    /// kind, which status and `wait_for` read instead of the text. The
    /// default records the text alone ([`set_state`](Self::set_state));
    /// Outflow's backends keep the kind beside it. A store that wraps another
    /// forwards this method too.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    async fn record_state(
        &self,
        lease: &Lease,
        state: ProjectionState,
        error: Option<UnitError<'_>>,
    ) -> Result<(), StoreError> {
        self.set_state(lease, state, error.map(|e| e.message)).await
    }

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

    /// Moves every unit of a projection to `to` inside `tx`, as
    /// [`reset_projection`](Self::reset_projection) moves them to the start
    /// (epoch bumped, counters cleared, `rebuild_total` recorded as what is
    /// left to replay, stopped units restarted). The default supports the
    /// start only.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`]; [`ConfigError::Invalid`](crate::error::ConfigError::Invalid)
    /// for another checkpoint than the start from a store that cannot.
    async fn reset_projection_to(
        &self,
        tx: &mut Self::Transaction,
        name: &str,
        to: Checkpoint,
        rebuild_total: u64,
    ) -> Result<(), StoreError> {
        if to == Checkpoint::START {
            return self.reset_projection(tx, name, rebuild_total).await;
        }
        Err(StoreError::Config(crate::error::ConfigError::Invalid {
            setting: "reset",
            reason: "this store resets projections to the start of the log only".to_owned(),
        }))
    }

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

    /// Asks the nodes running projection `name` to rebuild it: what a process
    /// without the projection's code (the `outflow` command) does. A node
    /// that runs it takes the request ([`take_rebuild_request`]) in the
    /// transaction that resets it. `false` when no unit of `name` is
    /// registered. The default keeps no requests.
    ///
    /// [`take_rebuild_request`]: Self::take_rebuild_request
    ///
    /// # Errors
    ///
    /// [`StoreError::Config`] where the store keeps no requests;
    /// [`StoreError::Database`].
    async fn request_rebuild(&self, name: &str) -> Result<bool, StoreError> {
        let _ = name;
        Err(no_requests())
    }

    /// The projections a rebuild is asked of. The default: none.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    async fn rebuild_requests(&self) -> Result<Vec<String>, StoreError> {
        Ok(Vec::new())
    }

    /// Clears the rebuild asked of `name` inside `tx`: `true` when there was
    /// one to take (of two nodes that try, one gets it). The default: `true`.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    async fn take_rebuild_request(
        &self,
        tx: &mut Self::Transaction,
        name: &str,
    ) -> Result<bool, StoreError> {
        let _ = (tx, name);
        Ok(true)
    }

    /// Wakes waiters of [`checkpoint_wakeups`](Self::checkpoint_wakeups) here
    /// and on other nodes after checkpoints moved.
    fn signal_checkpoints(&self);

    /// A handle woken when projection checkpoints may have moved.
    fn checkpoint_wakeups(&self) -> Wakeups;
}

/// Leases on units: which node runs which unit, renewed by the owner's
/// heartbeat, fenced by an epoch that a claim bumps unless the claiming node
/// still holds a valid lease.
#[async_trait]
pub trait Leases: Send + Sync + 'static {
    /// Records that `node` is alive; returns the ids of the live nodes
    /// (`node` among them), in order.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    async fn node_heartbeat(&self, node: &str, ttl: Duration) -> Result<Vec<String>, StoreError>;

    /// Claims a unit for `node` if it is free, its lease expired, or `node`
    /// holds it already (then the epoch stays); stopped units are not claimed.
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
    /// Never waits for a batch in progress.
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

    /// Frees `unit`'s lease if `node` holds it, whatever the epoch: what a
    /// node does with a lease whose epoch it lost (an operator reset the
    /// unit from another process) or that it does not run, so that it never
    /// keeps such a lease alive. The default does nothing (the lease then
    /// expires after its TTL once renewals stop).
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    async fn give_up(&self, unit: &UnitId, node: &str) -> Result<(), StoreError> {
        let _ = (unit, node);
        Ok(())
    }

    /// A node's clean stop: frees every lease `node` holds and forgets the
    /// node, so the others (or the same service restarted) take its share
    /// at their next heartbeat instead of after the lease TTL. The default
    /// does nothing.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    async fn deregister(&self, node: &str) -> Result<(), StoreError> {
        let _ = node;
        Ok(())
    }
}

/// Parked events: what a unit could not handle, kept for an operator.
#[async_trait]
pub trait DeadLetters: Transactional {
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

    /// The parked events of a projection whose place in the log is after
    /// `after` and up to `upto`, oldest first. The provided method filters
    /// [`dead_letters`](Self::dead_letters); a backend may ask its database.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    async fn dead_letters_between(
        &self,
        projection: &str,
        after: Checkpoint,
        upto: Checkpoint,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let mut letters = self.dead_letters(projection).await?;
        letters.retain(|d| d.checkpoint > after && d.checkpoint <= upto);
        Ok(letters)
    }

    /// Removes a dead letter inside `tx` and returns it, for a retry that
    /// commits or rolls back together with the handler's writes.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    async fn take_dead_letter(
        &self,
        tx: &mut Self::Transaction,
        id: u64,
    ) -> Result<Option<DeadLetter>, StoreError>;

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

    /// Asks the nodes running its projection to retry dead letter `id` (a
    /// process without the projection's code asks; a node retries it as
    /// `ProjectionRunner::retry_dead_letter` does, and the attempt serves
    /// the request). `false` if it does not exist. The default keeps no
    /// requests.
    ///
    /// # Errors
    ///
    /// [`StoreError::Config`] where the store keeps no requests;
    /// [`StoreError::Database`].
    async fn request_retry(&self, id: u64) -> Result<bool, StoreError> {
        let _ = id;
        Err(no_requests())
    }

    /// The dead letters a retry is asked of, as (the unit that parked it,
    /// its id), oldest first. The default: none.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    async fn retry_requests(&self) -> Result<Vec<(UnitId, u64)>, StoreError> {
        Ok(Vec::new())
    }
}

/// What a store that keeps no operators' requests answers a request.
fn no_requests() -> StoreError {
    crate::error::ConfigError::Invalid {
        setting: "operators' requests",
        reason: "this store keeps no requests: run the operation where the projection's code is"
            .to_owned(),
    }
    .into()
}

/// The inbox: which messages a handler has already handled, recorded in the
/// handler's own transaction.
#[async_trait]
pub trait Inbox: Transactional {
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
}

/// Everything a projection needs from the database its read model lives
/// in: [`Checkpoints`], [`Leases`], [`DeadLetters`] and the [`Inbox`]. The
/// events may come from another backend (see
/// [`ProjectionRunner::with_log`](crate::runner::ProjectionRunner::with_log)).
/// Implemented for every backend that implements the four.
pub trait ProjectionStore: Checkpoints + Leases + DeadLetters + Inbox {}

impl<S: Checkpoints + Leases + DeadLetters + Inbox> ProjectionStore for S {}

/// Refuses to register `name` with `configured` partitions when the store
/// holds units of it with another count (`stored`, one per unit): every
/// backend's check, so the error reads the same on each.
pub(crate) fn same_partitions(
    name: &str,
    stored: impl IntoIterator<Item = i64>,
    configured: u32,
) -> Result<(), StoreError> {
    match stored.into_iter().find(|&n| n != i64::from(configured)) {
        Some(other) => Err(crate::error::ConfigError::PartitionCount {
            name: name.to_owned(),
            stored: other.to_string(),
            configured,
        }
        .into()),
        None => Ok(()),
    }
}
