//! What [`ProjectionRunner::status`](super::ProjectionRunner::status) and
//! the admin calls report.

use std::time::Duration;

use crate::error::{HandlerError, StoreError};
use crate::event::Checkpoint;
use crate::port::log::OldestTransaction;
use crate::port::projections::ProjectionState;

/// Where a projection unit stands, as [`ProjectionRunner::status`](super::ProjectionRunner::status) reports it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ProjectionStatus {
    /// Projection name.
    pub projection: String,
    /// Partition index.
    pub partition: u32,
    /// Number of partitions.
    pub partitions: u32,
    /// The checkpoint.
    pub checkpoint: Checkpoint,
    /// What it is doing.
    pub state: ProjectionState,
    /// The node running it, while its lease is valid.
    pub owner: Option<String>,
    /// The unit's epoch: it grows with every new owner and every reset, and
    /// fences the commits of an owner that lost the unit.
    pub epoch: u64,
    /// Whether an operator paused it.
    pub paused: bool,
    /// Committed events it still has to handle (up to 10 million; counted
    /// exactly), including those an open transaction still hides from log
    /// readers (see `held_back_by`).
    pub lag_events: u64,
    /// How long ago the oldest committed event it still has to handle was
    /// written.
    pub lag: Duration,
    /// Parked events of this unit.
    pub parked: usize,
    /// The last error while retrying or stopped, from the current attempt:
    /// a new owner (a restarted process, a takeover) clears it, and so does
    /// a batch that succeeds.
    pub last_error: Option<String>,
    /// Whose fault the last error is (`Infrastructure`: someone must fix
    /// something; `Transient`: it passes by itself; `Data`: the event's),
    /// as the backend classified it.
    pub error_kind: Option<crate::error::ErrorKind>,
    /// Events handled since the last reset.
    pub processed: u64,
    /// Progress of a rebuild, while one is running.
    pub rebuild: Option<RebuildProgress>,
    /// When committed events of this unit wait behind a transaction that is
    /// still open (log readers never pass a transaction that may still
    /// commit at a lower position): that transaction, the oldest open on the
    /// server. Long transactions anywhere on the server delay every
    /// projection this way; end them, or keep them short.
    pub held_back_by: Option<OldestTransaction>,
    /// Why the lag could not be counted: the log did not answer within
    /// [`STATUS_PATIENCE`](super::STATUS_PATIENCE), or failed (a broker
    /// down, say). `lag_events` and `lag` read zero then; `None` when they
    /// were counted.
    pub log_error: Option<String>,
}

/// How far a rebuild has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RebuildProgress {
    /// Events replayed.
    pub done: u64,
    /// Events to replay, counted when the rebuild started.
    pub total: u64,
}

impl RebuildProgress {
    /// `true` once every event counted at the start was replayed.
    pub fn is_complete(&self) -> bool {
        self.done >= self.total
    }
}

/// Why a dead letter could not be retried.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RetryError {
    /// No dead letter with that id (for that projection).
    #[error("no dead letter {id} for projection `{projection}`")]
    NotFound {
        /// The projection.
        projection: String,
        /// The id.
        id: u64,
    },
    /// The handler failed again; the event stays parked.
    #[error("the handler failed again: {0}")]
    Handler(HandlerError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}
