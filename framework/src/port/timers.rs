//! The timers' port: what a SQL backend does so that a timer scheduled in
//! the application's transaction is found when it falls due, fired, and
//! recorded.
//!
//! The invariants a backend keeps: a schedule or a cancel runs in the
//! caller's transaction (it commits with the caller's writes or not at
//! all); what is due is decided by the database's clock (plus the handle's
//! [offset](crate::timer::Clock), zero outside tests); the due window is a
//! range scan of an index on the due time of pending timers, so a million
//! pending timers cost nothing until they fall due; and a timer is finished
//! (fired, refused, failed) only while it is still pending with the command
//! id it was fired with, so a finish never lands on a timer rescheduled in
//! between. The feature ([`crate::timer`]) holds everything else.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use crate::error::StoreError;
use crate::event::{Checkpoint, Metadata};
use crate::port::projections::{Checkpoints, Leases};

/// Longest timer key, in bytes (keys are the table's primary key).
pub const MAX_TIMER_KEY_LEN: usize = 512;

/// When a timer falls due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// At this instant.
    At(DateTime<Utc>),
    /// This long after the database's clock at the time of scheduling.
    After(Duration),
}

/// A timer as the store inserts it; built by [`Timer`](crate::timer::Timer).
#[derive(Debug, Clone, PartialEq)]
pub struct NewTimer {
    /// The key it is scheduled, rescheduled and cancelled by.
    pub key: String,
    /// What fires it (`command:<aggregate type>`, `outbox`).
    pub target: String,
    /// The aggregate the command goes to, or the message's key.
    pub target_id: String,
    /// The command, or the message, as JSON.
    pub payload: Value,
    /// When it falls due.
    pub due: Due,
    /// The id the command is sent with (the message id, for a message).
    pub command_id: Uuid,
    /// Correlation id of what it sends.
    pub correlation_id: Uuid,
    /// Causation id of what it sends.
    pub causation_id: Uuid,
    /// Metadata of what it sends.
    pub metadata: Metadata,
    /// The place in the log of the event that scheduled it, if an event
    /// did: a schedule or cancel from an earlier event never overrides one
    /// from a later event (a replay, a rebuild).
    pub source: Option<Checkpoint>,
}

/// Where a timer stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimerState {
    /// Waiting to fall due, or due and not fired yet.
    Pending,
    /// Fired: its command was accepted (or found accepted before), or its
    /// message enqueued.
    Fired,
    /// Fired, and its command was refused: recorded, never retried.
    Refused,
    /// Cancelled before it fired.
    Cancelled,
    /// Could not be fired at all (its stored command does not decode):
    /// recorded, never retried.
    Failed,
}

impl TimerState {
    /// The name stored and shown: `pending`, `fired`, `refused`,
    /// `cancelled`, `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            TimerState::Pending => "pending",
            TimerState::Fired => "fired",
            TimerState::Refused => "refused",
            TimerState::Cancelled => "cancelled",
            TimerState::Failed => "failed",
        }
    }

    /// The state named `name`.
    pub fn parse(name: &str) -> Option<TimerState> {
        Some(match name {
            "pending" => TimerState::Pending,
            "fired" => TimerState::Fired,
            "refused" => TimerState::Refused,
            "cancelled" => TimerState::Cancelled,
            "failed" => TimerState::Failed,
            _ => return None,
        })
    }
}

impl std::fmt::Display for TimerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A timer as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct TimerRecord {
    /// Its key.
    pub key: String,
    /// What fires it (`command:<aggregate type>`, `outbox`).
    pub target: String,
    /// The aggregate the command goes to, or the message's key.
    pub target_id: String,
    /// The command, or the message, as JSON.
    pub payload: Value,
    /// When it falls due.
    pub due_at: DateTime<Utc>,
    /// The id its command is sent with.
    pub command_id: Uuid,
    /// Correlation id of what it sends.
    pub correlation_id: Uuid,
    /// Causation id of what it sends.
    pub causation_id: Uuid,
    /// Metadata of what it sends.
    pub metadata: Metadata,
    /// The event that scheduled it, if any.
    pub source: Option<Checkpoint>,
    /// Where it stands.
    pub state: TimerState,
    /// Failed attempts to fire it (a database or network error, a conflict
    /// that outlasted its retries).
    pub attempts: u32,
    /// The last such error, or the refusal, or why it failed.
    pub last_error: Option<String>,
    /// When it was (last) scheduled.
    pub scheduled_at: DateTime<Utc>,
    /// When it was fired, refused, cancelled or failed.
    pub finished_at: Option<DateTime<Utc>>,
    /// After a failed attempt, when the next one may be made.
    pub retry_at: Option<DateTime<Utc>>,
}

/// What a schedule did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheduled {
    /// A new timer (none had the key, or the key's timer had finished).
    New,
    /// The key's pending timer was replaced (a reschedule).
    Replaced,
    /// Nothing: the same timer was scheduled before, a pending timer keeps
    /// its key (schedule, not reschedule), or a later event scheduled it.
    Unchanged,
}

/// Pending timers near or past their due time, as read by a scheduler.
#[derive(Debug, Clone, PartialEq)]
pub struct DueWindow {
    /// The database's clock (plus the offset) when the window was read.
    pub now: DateTime<Utc>,
    /// Pending timers due before `now` plus the window's horizon, earliest
    /// first.
    pub timers: Vec<TimerRecord>,
}

/// How an attempt to fire a timer ended, as recorded.
#[derive(Debug, Clone, PartialEq)]
pub enum Finish {
    /// Its command was accepted (or its message enqueued).
    Fired,
    /// Its command was refused, for this reason.
    Refused(String),
    /// It can never fire, for this reason.
    Failed(String),
}

/// Counts of the timers table, for status and metrics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TimerCounts {
    /// Pending timers.
    pub pending: u64,
    /// Pending timers already due.
    pub overdue: u64,
    /// Pending timers due longer ago than the lateness threshold.
    pub late: u64,
    /// How long ago the earliest overdue timer fell due.
    pub oldest_overdue: Option<Duration>,
    /// When the next pending timer falls due.
    pub next_due: Option<DateTime<Utc>>,
    /// Fired timers still kept.
    pub fired: u64,
    /// Refused firings still kept.
    pub refused: u64,
    /// Cancelled timers still kept.
    pub cancelled: u64,
    /// Timers that failed.
    pub failed: u64,
}

/// Which timers [`TimerStore::list_timers`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimerQuery {
    /// Only timers in this state (default: pending).
    pub state: Option<TimerState>,
    /// Only keys starting with this.
    pub key_prefix: Option<String>,
    /// At most this many (default 100), earliest due first.
    pub limit: usize,
}

impl Default for TimerQuery {
    fn default() -> Self {
        TimerQuery {
            state: Some(TimerState::Pending),
            key_prefix: None,
            limit: 100,
        }
    }
}

/// A backend that keeps timers in a table beside its events
/// (`<events table>_timers`): `PostgresStore` and `SqliteStore`. The
/// scheduler's lease is kept by the store's [`Leases`].
#[async_trait]
pub trait TimerStore: Checkpoints + Leases + std::fmt::Debug {
    /// The SQL database whose transactions timers are scheduled in.
    type Database: sqlx::Database;

    /// The timers table (`<events table>_timers`), after checking that it
    /// exists.
    ///
    /// # Errors
    ///
    /// [`StoreError::Config`] when it is missing (migrations not applied),
    /// [`StoreError::Database`].
    async fn open_timers(&self) -> Result<String, StoreError>;

    /// A write transaction of its own.
    async fn begin_timers(&self) -> Result<sqlx::Transaction<'static, Self::Database>, StoreError>;

    /// Schedules `timer` in the caller's transaction. With `replace`, a
    /// pending timer of the key is replaced; without, it is kept. A timer of
    /// the key scheduled with the same command id, or from a later event,
    /// is never replaced; one left as it was by an event's schedule records
    /// that event as its latest cause. `offset` is added to the database's
    /// clock.
    async fn schedule_timer(
        &self,
        connection: &mut <Self::Database as sqlx::Database>::Connection,
        timer: &NewTimer,
        replace: bool,
        offset: Duration,
    ) -> Result<Scheduled, StoreError>;

    /// Cancels the key's pending timer in the caller's transaction, unless
    /// a later event than `source` scheduled it; whether one was cancelled.
    /// With a `source`, the timer records it as its latest cause (cancelled
    /// or not), so a replay of an earlier event's schedule leaves it alone.
    async fn cancel_timer(
        &self,
        connection: &mut <Self::Database as sqlx::Database>::Connection,
        key: &str,
        source: Option<Checkpoint>,
    ) -> Result<bool, StoreError>;

    /// Pending timers due before the clock plus `horizon`, earliest first,
    /// at most `limit`; a range scan of the due index.
    async fn due_timers(
        &self,
        offset: Duration,
        horizon: Duration,
        limit: usize,
    ) -> Result<DueWindow, StoreError>;

    /// Which of `keys` are still pending, with their command ids (checked
    /// just before a due batch fires).
    async fn still_pending(&self, keys: &[String]) -> Result<Vec<(String, Uuid)>, StoreError>;

    /// Records how a batch of firings ended (key, command id, finish), each
    /// if its timer is still pending with that command id, in one
    /// transaction.
    async fn finish_timers(&self, finished: &[(String, Uuid, Finish)]) -> Result<(), StoreError>;

    /// Records how firing ended, if the key's timer is still pending with
    /// `command_id`; whether it was. In the caller's transaction when one is
    /// given (a message enqueued with it).
    async fn finish_timer(
        &self,
        connection: Option<&mut <Self::Database as sqlx::Database>::Connection>,
        key: &str,
        command_id: Uuid,
        finish: &Finish,
    ) -> Result<bool, StoreError>;

    /// Counts a failed attempt and its error on a pending timer, and puts
    /// its next attempt `retry_in` after the database's clock (the window
    /// skips it until then).
    async fn note_timer_attempt(
        &self,
        key: &str,
        command_id: Uuid,
        error: &str,
        retry_in: Duration,
    ) -> Result<(), StoreError>;

    /// The timer of `key`, in any state.
    async fn timer(&self, key: &str) -> Result<Option<TimerRecord>, StoreError>;

    /// Timers as `query` asks, earliest due first.
    async fn list_timers(&self, query: &TimerQuery) -> Result<Vec<TimerRecord>, StoreError>;

    /// The counts, with `late` those overdue by more than `late_after`.
    async fn timer_counts(
        &self,
        offset: Duration,
        late_after: Duration,
    ) -> Result<TimerCounts, StoreError>;

    /// Puts a refused or failed timer back to pending, due now; whether
    /// there was one.
    async fn retry_timer(&self, key: &str, offset: Duration) -> Result<bool, StoreError>;

    /// Deletes up to `limit` timers finished longer ago than `retention`;
    /// how many.
    async fn prune_timers(&self, retention: Duration, limit: u64) -> Result<u64, StoreError>;
}
