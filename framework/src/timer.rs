//! Durable timers: a command (or an outbox message) scheduled for later, in
//! the transaction that decides it, and fired once it falls due — through
//! crashes, restarts and failover.
//!
//! A [`Timer`] names what to send (a command for an aggregate, or an
//! [`OutboxMessage`]), when (an instant, or a delay), and a **key** it is
//! scheduled, rescheduled and cancelled by. [`Timers`] writes it in the
//! caller's SQL transaction — beside the caller's own rows, an inline
//! handler's append, or a [process manager](crate::process)'s states and
//! checkpoint ([`ProcessManager::timers`](crate::process::ProcessManager::timers))
//! — so the timer exists exactly when what caused it committed. A
//! [`Scheduler`] (run on every node, alone or inside a
//! [`ProjectionRunner`](crate::runner::ProjectionRunner)) holds a lease so
//! that one node fires at a time, reads the timers falling due in a window
//! of the due-time index, and fires each when the **database's clock**
//! passes its due time:
//!
//! - a command is sent with [`CommandBus::execute_once`](crate::CommandBus::execute_once) and the command id
//!   stored with the timer, then the timer is marked fired. A node that dies
//!   between the two leaves the timer pending; the next leader sends the
//!   command again, and `execute_once` recognizes it: **at least once fired,
//!   applied once.** A refused command (the process moved on: the transfer
//!   already completed) is recorded as `refused`, never retried; a conflict
//!   or an outage is retried with backoff, the attempts counted;
//! - a message is enqueued in the outbox in the transaction that marks the
//!   timer fired: exactly once.
//!
//! **Keys.** [`schedule`](Timers::schedule) keeps a pending timer of the
//! same key (scheduling twice is idempotent); [`reschedule`](Timers::reschedule)
//! replaces it; [`cancel`](Timers::cancel) cancels it. A finished timer
//! (fired, refused, cancelled) is kept for a retention period (30 days by
//! default) and replaced by the next schedule of its key. A timer scheduled
//! for an event ([`Timer::caused_by`]) gets a command id derived from the
//! event and the key and remembers the event's place in the log: scheduling
//! it again from the same event changes nothing, and a schedule or cancel
//! from an *earlier* event never overrides one from a later event. That is
//! why a rebuilt process manager, replaying every event, schedules no timer
//! that already fired, revives no cancelled one, and cancels none a later
//! event set.
//!
//! **Time.** What is due is decided by the database's clock (PostgreSQL's
//! `clock_timestamp()`; for SQLite, an embedded database, this machine's
//! clock), never by the clock of the node that fires, so nodes with skewed
//! clocks agree. A [`Clock`] adds an offset to it: tests move time forward
//! with [`Clock::advance`] instead of sleeping.
//!
//! Timers live in `<events table>_timers`, created by the store's
//! migrations, on PostgreSQL and SQLite. With a JetStream event store, keep
//! them in the read-model database, as its checkpoints: the scheduler's
//! buses send the commands to the JetStream store.
//!
//! ```no_run
//! # async fn demo(store: outflow::PostgresStore) -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use outflow::timer::{Timer, Timers};
//! use outflow::CommandBus;
//! # use outflow::doc_fixture::{Counter, CounterCommand};
//!
//! let timers = Timers::new(&store).await?;
//!
//! // In the application's transaction: increment counter c-1 in an hour.
//! let mut tx = store.pool().begin().await?;
//! let timer = Timer::command::<Counter>("reminder/c-1", "c-1", &CounterCommand::Increment { by: 1 })?
//!     .after(Duration::from_secs(3600));
//! timers.schedule(&mut tx, timer).await?;
//! timers.commit(tx).await?;
//!
//! // On every node: one fires, the others stand by.
//! let counters = CommandBus::<Counter, _>::new(store.clone(), ());
//! let scheduler = timers.scheduler().command(counters).build()?;
//! let shutdown = outflow::CancellationToken::new();
//! tokio::spawn(async move { scheduler.run(shutdown).await });
//! # Ok(()) }
//! ```

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use serde::Serialize;
use uuid::Uuid;

use crate::error::StoreError;
use crate::event::{Metadata, RecordedEvent};
use crate::outbox::OutboxMessage;
use crate::port::projections::UnitId;
use crate::wake::WakeSignal;

mod scheduler;

pub use crate::port::timers::{
    Due, NewTimer, Scheduled, TimerCounts, TimerQuery, TimerRecord, TimerState, TimerStore,
    MAX_TIMER_KEY_LEN,
};
pub use scheduler::{Scheduler, SchedulerBuilder};

/// The target name of timers that enqueue an outbox message.
pub const OUTBOX_TARGET: &str = "outbox";

/// The target name of timers that send a command to aggregates of type
/// `aggregate_type`: `command:<aggregate_type>`.
pub fn command_target(aggregate_type: &str) -> String {
    format!("command:{aggregate_type}")
}

/// Something to do later: a command for an aggregate, or an outbox
/// message, due at an instant or after a delay, under a key.
///
/// ```
/// use std::time::Duration;
/// use outflow::timer::Timer;
/// # use outflow::doc_fixture::{Counter, CounterCommand};
/// let timer = Timer::command::<Counter>("expire/c-1", "c-1", &CounterCommand::Increment { by: 1 })?
///     .after(Duration::from_secs(60))
///     .with_metadata("reason", "expiry");
/// assert_eq!(timer.key(), "expire/c-1");
/// # Ok::<(), outflow::StoreError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Timer {
    timer: NewTimer,
}

impl Timer {
    /// A timer sending `command` to the aggregate `aggregate_id` of type
    /// `A`, due now unless [`at`](Self::at) or [`after`](Self::after) say
    /// otherwise, with a new command id. The scheduler needs a bus for `A`
    /// ([`SchedulerBuilder::command`]).
    ///
    /// # Errors
    ///
    /// [`StoreError::Serialize`] when the command does not serialize to JSON.
    pub fn command<A: Aggregate>(
        key: impl Into<String>,
        aggregate_id: impl Into<String>,
        command: &A::Command,
    ) -> Result<Timer, StoreError>
    where
        A::Command: Serialize,
    {
        let aggregate_id = aggregate_id.into();
        let payload = serde_json::to_value(command).map_err(|source| StoreError::Serialize {
            what: "timer command",
            aggregate_type: A::TYPE.to_owned(),
            aggregate_id: aggregate_id.clone(),
            source,
        })?;
        Ok(Timer::new(
            key.into(),
            command_target(A::TYPE),
            aggregate_id,
            payload,
        ))
    }

    /// A timer enqueueing `message` in the outbox when it falls due (in the
    /// transaction that marks it fired). The message keeps its id; the
    /// scheduler needs the outbox ([`SchedulerBuilder::outbox`]).
    pub fn message(key: impl Into<String>, message: OutboxMessage) -> Timer {
        let payload = serde_json::json!({
            "topic": message.topic,
            "payload": message.payload,
            "headers": message.headers,
        });
        let mut timer = Timer::new(key.into(), OUTBOX_TARGET.to_owned(), message.key, payload);
        timer.timer.command_id = message.message_id;
        timer
    }

    fn new(key: String, target: String, target_id: String, payload: serde_json::Value) -> Timer {
        let command_id = Uuid::now_v7();
        Timer {
            timer: NewTimer {
                key,
                target,
                target_id,
                payload,
                due: Due::After(Duration::ZERO),
                command_id,
                correlation_id: command_id,
                causation_id: command_id,
                metadata: Metadata::new(),
                source: None,
            },
        }
    }

    /// Due at `instant` (by the database's clock).
    pub fn at(mut self, instant: DateTime<Utc>) -> Self {
        self.timer.due = Due::At(instant);
        self
    }

    /// Due `delay` after the database's clock when it is scheduled.
    pub fn after(mut self, delay: Duration) -> Self {
        self.timer.due = Due::After(delay);
        self
    }

    /// Scheduled because of `event`: what it sends continues the event's
    /// correlation and is caused by it; its command id (or message id) is
    /// derived from the event id and the key, the same every time the event
    /// is handled again; and it remembers the event's place in the log, so a
    /// replay of an earlier event never overrides it (see the [module
    /// documentation](self)).
    pub fn caused_by(mut self, event: &RecordedEvent) -> Self {
        let id = Uuid::new_v5(
            &event.event_id,
            format!("timer:{}", self.timer.key).as_bytes(),
        );
        self.timer.command_id = id;
        self.timer.correlation_id = event.correlation_id.unwrap_or(event.event_id);
        self.timer.causation_id = event.event_id;
        self.timer.source = Some(event.checkpoint());
        self
    }

    /// [`caused_by`](Self::caused_by) for an event as an
    /// [inline handler](crate::command::InlineHandler) gets it.
    pub fn caused_by_envelope<A: Aggregate>(self, event: &crate::event::Envelope<A>) -> Self {
        self.caused(event.event_id, event.correlation_id, event.checkpoint())
    }

    fn caused(
        mut self,
        event_id: Uuid,
        correlation_id: Option<Uuid>,
        at: crate::event::Checkpoint,
    ) -> Self {
        let id = Uuid::new_v5(&event_id, format!("timer:{}", self.timer.key).as_bytes());
        self.timer.command_id = id;
        self.timer.correlation_id = correlation_id.unwrap_or(event_id);
        self.timer.causation_id = event_id;
        self.timer.source = Some(at);
        self
    }

    /// Adds a metadata entry to what it sends.
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.timer.metadata.insert(key.into(), value.into());
        self
    }

    /// Sets the command id (the message id, for a message) it is sent with.
    pub fn with_command_id(mut self, id: Uuid) -> Self {
        self.timer.command_id = id;
        self
    }

    /// Sets the correlation id of what it sends.
    pub fn with_correlation_id(mut self, id: Uuid) -> Self {
        self.timer.correlation_id = id;
        self
    }

    /// Its key.
    pub fn key(&self) -> &str {
        &self.timer.key
    }

    /// The timer as the store writes it.
    pub fn as_new(&self) -> &NewTimer {
        &self.timer
    }
}

/// What a [process manager](crate::process::ProcessManager) asks of its
/// timers in one step: applied in the batch's transaction, each caused by
/// the step's event.
#[derive(Debug, Clone, PartialEq)]
pub enum TimerChange {
    /// [`Timers::schedule`]: keeps a pending timer of the key.
    Schedule(Timer),
    /// [`Timers::reschedule`]: replaces a pending timer of the key.
    Reschedule(Timer),
    /// [`Timers::cancel`] of a key.
    Cancel(String),
}

/// The clock timers are due by: the database's clock plus an offset that
/// only tests move. Clones share the offset.
///
/// ```
/// use std::time::Duration;
/// use outflow::timer::Clock;
/// let clock = Clock::new();
/// clock.advance(Duration::from_secs(90));
/// assert_eq!(clock.offset(), Duration::from_secs(90));
/// ```
#[derive(Debug, Clone, Default)]
pub struct Clock {
    offset_micros: Arc<AtomicI64>,
    moved: Arc<WakeSignal>,
}

impl Clock {
    /// The database's clock, not moved.
    pub fn new() -> Self {
        Clock::default()
    }

    /// Moves this clock forward by `by`: timers due within it fall due now,
    /// and running schedulers look at once. Time never moves back.
    pub fn advance(&self, by: Duration) {
        let by = i64::try_from(by.as_micros()).unwrap_or(i64::MAX);
        self.offset_micros.fetch_add(by, Ordering::SeqCst);
        self.moved.wake();
    }

    /// How far it was moved.
    pub fn offset(&self) -> Duration {
        Duration::from_micros(self.offset_micros.load(Ordering::SeqCst).max(0) as u64)
    }
}

/// How the timers stand, as [`Timers::status`] reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct TimerStatus {
    /// The timers table.
    pub table: String,
    /// The counts: pending, overdue, late, kept finished timers.
    pub counts: TimerCounts,
    /// The node whose scheduler holds the lease, while it is valid.
    pub scheduler: Option<String>,
    /// The scheduler's last error while it retries.
    pub last_error: Option<String>,
}

/// The timers of a store ([`PostgresStore`](crate::PostgresStore) or
/// [`SqliteStore`](crate::SqliteStore)): schedule, reschedule and cancel in
/// the caller's transaction, read them, and build their
/// [`Scheduler`]. Cloning is cheap and shares the handle.
pub struct Timers<S: TimerStore> {
    inner: Arc<Inner<S>>,
}

impl<S: TimerStore> Clone for Timers<S> {
    fn clone(&self) -> Self {
        Timers {
            inner: self.inner.clone(),
        }
    }
}

impl<S: TimerStore> std::fmt::Debug for Timers<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timers")
            .field("table", &self.inner.table)
            .field("clock_offset", &self.inner.clock.offset())
            .finish_non_exhaustive()
    }
}

struct Inner<S> {
    store: S,
    table: String,
    unit: UnitId,
    clock: Clock,
    wake: WakeSignal,
    late_after: Duration,
}

/// The longest a timer may be overdue before it counts as late (default).
const LATE_AFTER: Duration = Duration::from_secs(5);

impl<S: TimerStore> Timers<S> {
    /// The timers of `store` (the table `<events table>_timers` its
    /// migrations created), on the database's clock.
    ///
    /// # Errors
    ///
    /// [`StoreError::Config`] when the timers table is missing (the
    /// store's migrations were not applied); [`StoreError::Database`].
    pub async fn new(store: &S) -> Result<Self, StoreError> {
        Self::with_clock(store, Clock::new()).await
    }

    /// The timers of `store` on `clock` (tests: a clock they move forward).
    ///
    /// # Errors
    ///
    /// As [`new`](Self::new).
    pub async fn with_clock(store: &S, clock: Clock) -> Result<Self, StoreError> {
        let table = store.open_timers().await?;
        Ok(Timers {
            inner: Arc::new(Inner {
                unit: UnitId {
                    projection: format!("timers:{table}"),
                    partition: 0,
                },
                store: store.clone(),
                table,
                clock,
                wake: WakeSignal::new(),
                late_after: LATE_AFTER,
            }),
        })
    }

    /// The timers table (`<events table>_timers`).
    pub fn table(&self) -> &str {
        &self.inner.table
    }

    /// The unit whose lease the scheduler holds (`timers:<table>`).
    pub fn unit(&self) -> &UnitId {
        &self.inner.unit
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.inner.store
    }

    /// The clock timers are due by.
    pub fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    /// A scheduler builder for these timers.
    pub fn scheduler(&self) -> SchedulerBuilder<S> {
        Scheduler::builder(self.clone())
    }

    /// Schedules `timer` in the caller's transaction (`connection`: the
    /// caller's `sqlx` transaction), so it exists once the transaction
    /// commits and never if it rolls back. A pending timer of the same key
    /// is kept ([`Scheduled::Unchanged`]): scheduling twice is idempotent;
    /// use [`reschedule`](Self::reschedule) to move it. After committing,
    /// call [`wake`](Self::wake) (or commit with [`commit`](Self::commit))
    /// so a scheduler in this process looks at once.
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidAppend`] for an empty or over-long key (or
    /// target id), or one with a NUL character; [`StoreError::Database`].
    pub async fn schedule(
        &self,
        connection: &mut <S::Database as sqlx::Database>::Connection,
        timer: Timer,
    ) -> Result<Scheduled, StoreError> {
        self.write(connection, timer, false).await
    }

    /// Schedules `timer`, replacing a pending timer of its key (another due
    /// time, another command) — unless that one was scheduled by a later
    /// event than `timer`'s. In the caller's transaction, as
    /// [`schedule`](Self::schedule).
    ///
    /// # Errors
    ///
    /// As [`schedule`](Self::schedule).
    pub async fn reschedule(
        &self,
        connection: &mut <S::Database as sqlx::Database>::Connection,
        timer: Timer,
    ) -> Result<Scheduled, StoreError> {
        self.write(connection, timer, true).await
    }

    async fn write(
        &self,
        connection: &mut <S::Database as sqlx::Database>::Connection,
        timer: Timer,
        replace: bool,
    ) -> Result<Scheduled, StoreError> {
        validate(&self.inner.table, &timer.timer.key, "key")?;
        validate(&self.inner.table, &timer.timer.target_id, "target id")?;
        validate_due(&self.inner.table, &timer.timer)?;
        self.inner
            .store
            .schedule_timer(connection, &timer.timer, replace, self.inner.clock.offset())
            .await
    }

    /// Cancels the pending timer of `key` in the caller's transaction;
    /// whether there was one. A timer that fired already stays fired.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    pub async fn cancel(
        &self,
        connection: &mut <S::Database as sqlx::Database>::Connection,
        key: &str,
    ) -> Result<bool, StoreError> {
        self.inner.store.cancel_timer(connection, key, None).await
    }

    /// Cancels the pending timer of `key` because of `event`, unless a
    /// later event than `event` scheduled it (a replay of an old cancel
    /// leaves a newer timer alone).
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    pub async fn cancel_caused_by(
        &self,
        connection: &mut <S::Database as sqlx::Database>::Connection,
        key: &str,
        event: &RecordedEvent,
    ) -> Result<bool, StoreError> {
        self.inner
            .store
            .cancel_timer(connection, key, Some(event.checkpoint()))
            .await
    }

    /// A write transaction of the store's, to schedule in (on SQLite, its
    /// writer connection).
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    pub async fn begin(&self) -> Result<sqlx::Transaction<'static, S::Database>, StoreError> {
        self.inner.store.begin_timers().await
    }

    /// Schedules `timer` in a transaction of its own, and wakes the
    /// scheduler.
    ///
    /// # Errors
    ///
    /// As [`schedule`](Self::schedule).
    pub async fn schedule_alone(&self, timer: Timer) -> Result<Scheduled, StoreError> {
        let mut tx = self.inner.store.begin_timers().await?;
        let scheduled = self.schedule(&mut tx, timer).await?;
        self.commit(tx).await?;
        Ok(scheduled)
    }

    /// Cancels the timer of `key` in a transaction of its own.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    pub async fn cancel_alone(&self, key: &str) -> Result<bool, StoreError> {
        let mut tx = self.inner.store.begin_timers().await?;
        let cancelled = self.cancel(&mut tx, key).await?;
        self.commit(tx).await?;
        Ok(cancelled)
    }

    /// Commits the caller's transaction, then [wakes](Self::wake) the
    /// scheduler.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`]; the transaction's writes are then lost.
    pub async fn commit(&self, tx: sqlx::Transaction<'_, S::Database>) -> Result<(), StoreError> {
        tx.commit().await.map_err(|e| {
            StoreError::database(
                "committing a transaction with timers",
                crate::ErrorKind::Infrastructure,
                e,
            )
        })?;
        self.wake();
        Ok(())
    }

    /// Tells a scheduler running in this process to look at once (after a
    /// commit that scheduled a timer due soon). Schedulers in other
    /// processes find it at their next poll.
    pub fn wake(&self) {
        self.inner.wake.wake();
    }

    /// The timer of `key`, in any state.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    pub async fn get(&self, key: &str) -> Result<Option<TimerRecord>, StoreError> {
        self.inner.store.timer(key).await
    }

    /// Timers as `query` asks (default: the first 100 pending), earliest
    /// due first.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    pub async fn list(&self, query: &TimerQuery) -> Result<Vec<TimerRecord>, StoreError> {
        self.inner.store.list_timers(query).await
    }

    /// The counts (pending, overdue, late: overdue by more than 5 s, kept
    /// finished timers) and the scheduler holding the lease.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    pub async fn status(&self) -> Result<TimerStatus, StoreError> {
        let counts = self
            .inner
            .store
            .timer_counts(self.inner.clock.offset(), self.inner.late_after)
            .await?;
        let unit = self
            .inner
            .store
            .units(Some(&self.inner.unit.projection))
            .await?
            .into_iter()
            .find(|u| u.unit == self.inner.unit);
        let (scheduler, last_error) = match unit {
            Some(unit) => (unit.owner.filter(|_| unit.lease_valid), unit.last_error),
            None => (None, None),
        };
        Ok(TimerStatus {
            table: self.inner.table.clone(),
            counts,
            scheduler,
            last_error,
        })
    }

    /// Fires a refused or failed timer again, now, with a new command id;
    /// whether there was one.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    pub async fn retry(&self, key: &str) -> Result<bool, StoreError> {
        let retried = self
            .inner
            .store
            .retry_timer(key, self.inner.clock.offset())
            .await?;
        self.wake();
        Ok(retried)
    }

    pub(crate) fn wakeups(&self, poll_interval: Duration) -> crate::wake::Wakeups {
        self.inner.wake.subscribe(poll_interval)
    }

    pub(crate) fn clock_moves(&self, poll_interval: Duration) -> crate::wake::Wakeups {
        self.inner.clock.moved.subscribe(poll_interval)
    }
}

fn validate(table: &str, value: &str, what: &'static str) -> Result<(), StoreError> {
    let reason = if value.is_empty() {
        "is empty"
    } else if value.len() > MAX_TIMER_KEY_LEN {
        "is longer than 512 bytes"
    } else if value.contains('\0') {
        "contains a NUL character"
    } else {
        return Ok(());
    };
    Err(StoreError::InvalidAppend {
        aggregate_type: table.to_owned(),
        aggregate_id: value.chars().take(64).collect(),
        reason: format!("the timer's {what} {reason}"),
    })
}

/// The latest due time a timer may have: the year 9999 (both databases
/// store it; PostgreSQL's timestamps and SQLite's microseconds reach far
/// beyond).
const LATEST_DUE: i64 = 253_402_300_799_000_000;

/// Refuses a due time no database stores: a delay or an instant past the
/// year 9999, or an instant before 1970.
fn validate_due(table: &str, timer: &NewTimer) -> Result<(), StoreError> {
    let micros = match timer.due {
        Due::At(at) => Some(at.timestamp_micros()).filter(|m| (0..=LATEST_DUE).contains(m)),
        Due::After(after) => i64::try_from(after.as_micros())
            .ok()
            .filter(|m| *m <= LATEST_DUE - chrono::Utc::now().timestamp_micros()),
    };
    if micros.is_some() {
        return Ok(());
    }
    Err(StoreError::InvalidAppend {
        aggregate_type: table.to_owned(),
        aggregate_id: timer.key.chars().take(64).collect(),
        reason: "the timer's due time is out of range (before 1970 or after 9999)".to_owned(),
    })
}

/// Timers that join transactions of type `Tx`: [`Timers`] of a store, for
/// that store's transactions. What
/// [`Process::with_timers`](crate::process::Process::with_timers) takes: a
/// process's timers must live in the database of its states.
#[async_trait]
pub trait ApplyTimers<Tx>: Send + Sync {
    /// Applies a process step's `changes` in `tx`, each caused by `event`
    /// and carrying `metadata`.
    ///
    /// # Errors
    ///
    /// As [`Timers::schedule`] and [`Timers::cancel`].
    async fn apply(
        &self,
        tx: &mut Tx,
        changes: Vec<TimerChange>,
        event: &RecordedEvent,
        metadata: &[(&str, &str)],
    ) -> Result<(), StoreError>;

    /// Wakes a scheduler of these timers running in this process.
    fn wake(&self);
}

#[async_trait]
impl<S: TimerStore> ApplyTimers<sqlx::Transaction<'static, S::Database>> for Timers<S> {
    async fn apply(
        &self,
        tx: &mut sqlx::Transaction<'static, S::Database>,
        changes: Vec<TimerChange>,
        event: &RecordedEvent,
        metadata: &[(&str, &str)],
    ) -> Result<(), StoreError> {
        let cause = |timer: Timer| {
            metadata
                .iter()
                .fold(timer.caused_by(event), |timer, (k, v)| {
                    timer.with_metadata(*k, *v)
                })
        };
        for change in changes {
            match change {
                TimerChange::Schedule(timer) => {
                    self.schedule(tx, cause(timer)).await?;
                }
                TimerChange::Reschedule(timer) => {
                    self.reschedule(tx, cause(timer)).await?;
                }
                TimerChange::Cancel(key) => {
                    self.cancel_caused_by(tx, &key, event).await?;
                }
            }
        }
        Ok(())
    }

    fn wake(&self) {
        Timers::wake(self);
    }
}
