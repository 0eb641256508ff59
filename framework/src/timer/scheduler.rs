//! The scheduler: one node at a time (a lease on the unit `timers:<table>`,
//! through the same lease engine as projection units and the outbox relay)
//! reads the timers falling due in a bounded window of the due-time index,
//! keeps that window in memory, and fires each timer when the database's
//! clock reaches it — several at once, each through its target.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cqrs_es::Aggregate;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{command_target, Timers, OUTBOX_TARGET};
use crate::backoff::Backoff;
use crate::command::{CommandBus, CommandContext};
use crate::error::{ConfigError, ErrorKind, StoreError};
use crate::lease::{check_timing, keep_lease, register, Held, Holder, RecordedState};
use crate::outbox::{Outbox, OutboxMessage, OutboxStore};
use crate::port::events::EventStore;
use crate::port::projections::ProjectionState;
use crate::port::timers::{Finish, TimerRecord, TimerStore};

/// How often the leading scheduler sets the timer gauges.
const STATUS_METRICS_EVERY: Duration = Duration::from_secs(15);

/// How a target's attempt to fire a timer ended.
pub(crate) enum Fired {
    /// To record: fired, refused, failed.
    Finish(Finish),
    /// The target recorded it itself, in its own transaction.
    Recorded,
    /// Not this time (an outage, a conflict that outlasted its retries):
    /// the timer stays pending and is tried again after a backoff.
    Retry(String),
}

/// What fires the timers of one target.
#[async_trait]
pub(crate) trait Target: Send + Sync {
    async fn fire(&self, timer: &TimerRecord) -> Fired;
}

/// Sends a timer's command with `execute_once`.
struct CommandTarget<A: Aggregate, E: EventStore> {
    bus: Arc<CommandBus<A, E>>,
}

/// How many times a command that lost a race is sent again at once.
const CONFLICT_ATTEMPTS: u32 = 5;

#[async_trait]
impl<A, E> Target for CommandTarget<A, E>
where
    A: Aggregate + 'static,
    A::Command: serde::de::DeserializeOwned + Send + Sync,
    A::Error: Send + Sync + 'static,
    E: EventStore,
{
    async fn fire(&self, timer: &TimerRecord) -> Fired {
        let mut metadata = timer.metadata.clone();
        metadata.insert("timer".to_owned(), timer.key.clone());
        let context = CommandContext {
            command_id: timer.command_id,
            correlation_id: timer.correlation_id,
            causation_id: timer.causation_id,
            metadata,
        };
        let mut attempt = 1;
        loop {
            let command: A::Command = match serde_json::from_value(timer.payload.clone()) {
                Ok(command) => command,
                Err(error) => {
                    return Fired::Finish(Finish::Failed(format!(
                        "the stored command does not decode as a `{}` command: {error}",
                        A::TYPE
                    )))
                }
            };
            match self
                .bus
                .execute_once(&timer.target_id, command, context.clone())
                .await
            {
                Ok(_) => return Fired::Finish(Finish::Fired),
                Err(error) if error.is_refusal() => {
                    return Fired::Finish(Finish::Refused(
                        error.refusal_message().unwrap_or_else(|| error.to_string()),
                    ))
                }
                Err(error) if error.is_conflict() && attempt < CONFLICT_ATTEMPTS => attempt += 1,
                Err(error) => return Fired::Retry(crate::error::error_chain(&error).to_string()),
            }
        }
    }
}

/// Enqueues a timer's message in the transaction that marks it fired.
struct OutboxTarget<S: TimerStore + OutboxStore> {
    outbox: Outbox<S>,
}

#[async_trait]
impl<S> Target for OutboxTarget<S>
where
    S: TimerStore + OutboxStore<Database = <S as TimerStore>::Database>,
{
    async fn fire(&self, timer: &TimerRecord) -> Fired {
        let field = |name: &str| timer.payload.get(name).cloned();
        let topic = field("topic").and_then(|t| t.as_str().map(str::to_owned));
        let headers = field("headers").map(serde_json::from_value);
        let (Some(topic), Some(Ok(headers))) = (topic, headers) else {
            return Fired::Finish(Finish::Failed(
                "the stored message has no topic or no headers object".to_owned(),
            ));
        };
        let message = OutboxMessage {
            message_id: timer.command_id,
            key: timer.target_id.clone(),
            topic,
            payload: field("payload").unwrap_or_default(),
            headers,
        };
        let store = self.outbox.store();
        let attempt = async {
            let mut tx = TimerStore::begin_timers(store).await?;
            self.outbox.enqueue(&mut tx, message).await?;
            let marked = store
                .finish_timer(Some(&mut tx), &timer.key, timer.command_id, &Finish::Fired)
                .await?;
            if marked {
                self.outbox.commit(tx).await?;
            }
            Ok::<(), StoreError>(())
        };
        match attempt.await {
            Ok(()) => Fired::Recorded,
            Err(error @ StoreError::InvalidAppend { .. }) => {
                Fired::Finish(Finish::Failed(error.to_string()))
            }
            Err(error) => Fired::Retry(crate::error::error_chain(&error).to_string()),
        }
    }
}

/// Fires the due timers of one [`Timers`] table, on the node holding its
/// lease; the others stand by and take over within the lease's time to
/// live. Run one on every node ([`run`](Self::run)), or hand it to a
/// projection runner ([`ProjectionRunnerBuilder::scheduler`](crate::runner::ProjectionRunnerBuilder::scheduler)),
/// which runs it under the runner's node id and lease timing.
///
/// Timers due at the same time fire concurrently (up to
/// [`concurrency`](SchedulerBuilder::concurrency)), in no set order.
pub struct Scheduler<S: TimerStore> {
    shared: Arc<Shared<S>>,
}

impl<S: TimerStore> Clone for Scheduler<S> {
    fn clone(&self) -> Self {
        Scheduler {
            shared: self.shared.clone(),
        }
    }
}

impl<S: TimerStore> std::fmt::Debug for Scheduler<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut targets: Vec<_> = self.shared.targets.keys().collect();
        targets.sort();
        f.debug_struct("Scheduler")
            .field("table", &self.shared.timers.table())
            .field("node_id", &self.shared.settings.node_id)
            .field("targets", &targets)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
struct Settings {
    node_id: String,
    lease_ttl: Duration,
    heartbeat: Duration,
    poll_interval: Duration,
    horizon: Duration,
    batch_size: usize,
    concurrency: usize,
    retention: Duration,
    cleanup_interval: Duration,
}

struct Shared<S: TimerStore> {
    timers: Timers<S>,
    targets: HashMap<String, Arc<dyn Target>>,
    settings: Settings,
    running: AtomicBool,
}

/// Builds a [`Scheduler`]; made by [`Timers::scheduler`].
#[must_use = "a builder does nothing until it is built"]
pub struct SchedulerBuilder<S: TimerStore> {
    timers: Timers<S>,
    targets: HashMap<String, Arc<dyn Target>>,
    settings: Settings,
    node_id: Option<String>,
}

impl<S: TimerStore> std::fmt::Debug for SchedulerBuilder<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchedulerBuilder")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl<S: TimerStore> SchedulerBuilder<S> {
    /// Fires timers made by [`Timer::command`](super::Timer::command) for
    /// aggregates of type `A` through `bus` (any event store: a JetStream
    /// store's bus, with the timers in the read-model database).
    pub fn command<A, E>(mut self, bus: impl Into<Arc<CommandBus<A, E>>>) -> Self
    where
        A: Aggregate + 'static,
        A::Command: serde::de::DeserializeOwned + Send + Sync,
        A::Error: Send + Sync + 'static,
        E: EventStore,
    {
        self.targets.insert(
            command_target(A::TYPE),
            Arc::new(CommandTarget { bus: bus.into() }),
        );
        self
    }

    /// Fires timers made by [`Timer::message`](super::Timer::message) into
    /// `outbox` (the same store's), exactly once: the message is enqueued
    /// in the transaction that marks the timer fired.
    pub fn outbox(mut self, outbox: Outbox<S>) -> Self
    where
        S: OutboxStore<Database = <S as TimerStore>::Database>,
    {
        self.targets
            .insert(OUTBOX_TARGET.to_owned(), Arc::new(OutboxTarget { outbox }));
        self
    }

    /// A name for this node (default: a random one), unique among the
    /// schedulers and other lease holders (runners, relays) sharing the
    /// store. Inside a projection runner the scheduler holds its lease as
    /// `<runner's node id>:timers`.
    pub fn node_id(mut self, id: impl Into<String>) -> Self {
        self.node_id = Some(id.into());
        self
    }

    /// How long the lease stays valid without a renewal (default 5 s): the
    /// longest timers wait after the leading node died. Inside a runner,
    /// the runner's.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.settings.lease_ttl = ttl;
        self
    }

    /// How often the lease is renewed and a standby node tries to take it
    /// (default 1 s). Inside a runner, the runner's.
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.settings.heartbeat = interval;
        self
    }

    /// How often the window is read again when nothing wakes the scheduler
    /// (default 500 ms): the most a timer scheduled by another process, due
    /// sooner than that, fires late.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.settings.poll_interval = interval;
        self
    }

    /// How far ahead of the clock a window reads (default 2 s).
    pub fn horizon(mut self, horizon: Duration) -> Self {
        self.settings.horizon = horizon;
        self
    }

    /// The most timers a window holds (default 1,000): the scheduler's
    /// memory, whatever the number of pending timers.
    pub fn batch_size(mut self, n: usize) -> Self {
        self.settings.batch_size = n.max(1);
        self
    }

    /// How many due timers fire at once (default 16).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.settings.concurrency = n.max(1);
        self
    }

    /// How long finished timers are kept (default 30 days): a schedule
    /// replayed within it (a rebuild) finds them and changes nothing.
    pub fn retention(mut self, retention: Duration) -> Self {
        self.settings.retention = retention;
        self
    }

    /// The scheduler.
    ///
    /// # Errors
    ///
    /// [`StoreError::Config`] for a heartbeat not shorter than the lease, or
    /// a zero poll interval.
    pub fn build(self) -> Result<Scheduler<S>, StoreError> {
        check_timing(
            "heartbeat interval",
            self.settings.heartbeat,
            self.settings.lease_ttl,
        )?;
        if self.settings.poll_interval.is_zero() {
            return Err(ConfigError::Invalid {
                setting: "poll interval",
                reason: "must be longer than zero".to_owned(),
            }
            .into());
        }
        let mut settings = self.settings;
        settings.node_id = self
            .node_id
            .unwrap_or_else(|| format!("node-{}", uuid::Uuid::new_v4().simple()));
        Ok(Scheduler {
            shared: Arc::new(Shared {
                timers: self.timers,
                targets: self.targets,
                settings,
                running: AtomicBool::new(false),
            }),
        })
    }
}

/// Why a leading scheduler stopped leading.
enum Exit {
    Shutdown,
    Lost,
}

struct RunningGuard<'a>(&'a AtomicBool);

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// How one firing went, before it is recorded.
enum Attempt {
    /// To record with the chunk (`None`: the target recorded it).
    Done(Option<Finish>),
    /// Not this time.
    Retry(String),
}

/// A timer of the window, with the instant it falls due on this node's
/// monotonic clock.
struct Waiting {
    /// When to fire it: its due time, or its next attempt's.
    due: Instant,
    /// How long after its due time that is.
    retried_after: Duration,
    timer: TimerRecord,
}

impl Waiting {
    /// `timer` as read when the database's clock said `now`, at `read_at`
    /// on this node's.
    fn new(timer: TimerRecord, now: chrono::DateTime<chrono::Utc>, read_at: Instant) -> Self {
        let fire_at = timer.retry_at.unwrap_or(timer.due_at).max(timer.due_at);
        let due = match (fire_at - now).to_std() {
            Ok(ahead) => read_at + ahead,
            // Overdue: it fell due this long ago.
            Err(_) => (now - fire_at)
                .to_std()
                .ok()
                .and_then(|ago| read_at.checked_sub(ago))
                .unwrap_or(read_at),
        };
        Waiting {
            due,
            retried_after: (fire_at - timer.due_at).to_std().unwrap_or_default(),
            timer,
        }
    }

    /// How long after its due time it fires, if it fires now.
    fn late(&self) -> Duration {
        self.due.elapsed() + self.retried_after
    }
}

impl<S: TimerStore> Scheduler<S> {
    /// A builder firing `timers`.
    pub fn builder(timers: Timers<S>) -> SchedulerBuilder<S> {
        SchedulerBuilder {
            timers,
            targets: HashMap::new(),
            node_id: None,
            settings: Settings {
                node_id: String::new(),
                lease_ttl: Duration::from_secs(5),
                heartbeat: Duration::from_secs(1),
                poll_interval: Duration::from_millis(500),
                horizon: Duration::from_secs(2),
                batch_size: 1000,
                concurrency: 16,
                retention: Duration::from_secs(30 * 24 * 3600),
                cleanup_interval: Duration::from_secs(60),
            },
        }
    }

    /// The timers it fires.
    pub fn timers(&self) -> &Timers<S> {
        &self.shared.timers
    }

    /// Runs until `shutdown` is cancelled: registers the scheduler's unit,
    /// then fires due timers while it holds the lease, or stands by while
    /// another node does. Database outages are waited out with backoff.
    ///
    /// # Errors
    ///
    /// [`StoreError::Config`] when this scheduler (or a clone) is running
    /// already, or the store's tables are missing; an infrastructure
    /// [`StoreError::Database`] after about twenty seconds of failed
    /// attempts to register.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), StoreError> {
        let settings = &self.shared.settings;
        self.run_as(
            &settings.node_id,
            settings.lease_ttl,
            settings.heartbeat,
            shutdown,
        )
        .await
    }

    /// [`run`](Self::run) under another node id and lease timing (a
    /// runner's).
    pub(crate) async fn run_as(
        &self,
        node_id: &str,
        lease_ttl: Duration,
        heartbeat: Duration,
        shutdown: CancellationToken,
    ) -> Result<(), StoreError> {
        let shared = &self.shared;
        if shared.running.swap(true, Ordering::SeqCst) {
            return Err(ConfigError::AlreadyRunning(format!(
                "timer scheduler of `{}`",
                shared.timers.table()
            ))
            .into());
        }
        let _running = RunningGuard(&shared.running);
        let store = shared.timers.store();
        let unit = shared.timers.unit().clone();
        if !register(store, &unit.projection, 1, &shutdown).await? {
            return Ok(());
        }
        let span =
            tracing::info_span!("timer_scheduler", table = %shared.timers.table(), node = %node_id);
        let mut holder = Holder::new(node_id.to_owned(), lease_ttl);
        async {
            loop {
                if shutdown.is_cancelled() {
                    return;
                }
                let started = Instant::now();
                match holder.claim(store, &unit).await {
                    Ok(Some(lease)) => {
                        tracing::info!(epoch = lease.epoch, "timer scheduler leads");
                        let held = Held::new(lease, started, lease_ttl);
                        let done = CancellationToken::new();
                        let keep = keep_lease(
                            &mut holder,
                            store,
                            &held,
                            (lease_ttl, heartbeat),
                            &done,
                            "timer scheduler",
                        );
                        let lead = async {
                            let exit = self.lead(&held, &shutdown).await;
                            done.cancel();
                            exit
                        };
                        let ((), exit) = tokio::join!(keep, lead);
                        match exit {
                            Exit::Shutdown => {
                                if let Err(error) = holder.release(store, &held.lease).await {
                                    tracing::warn!(error = %crate::error::error_chain(&error),
                                        "releasing the timer scheduler's lease failed (it will expire)");
                                }
                                return;
                            }
                            Exit::Lost => tracing::info!("timer scheduler lost its lease"),
                        }
                    }
                    Ok(None) => {}
                    Err(error) => {
                        tracing::warn!(error = %crate::error::error_chain(&error), "claiming the timer scheduler's lease failed")
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(heartbeat) => {}
                }
            }
        }
        .instrument(span)
        .await;
        Ok(())
    }

    /// Fires due timers while the lease is held.
    async fn lead(&self, held: &Held, shutdown: &CancellationToken) -> Exit {
        let exit = self.fire_while_held(held, shutdown).await;
        // Gauges this node no longer keeps up to date would mislead: the
        // next leader sets them.
        crate::telemetry::clear_timer_status(self.shared.timers.table());
        exit
    }

    async fn fire_while_held(&self, held: &Held, shutdown: &CancellationToken) -> Exit {
        let shared = &self.shared;
        let timers = &shared.timers;
        let store = timers.store();
        let settings = &shared.settings;
        let mut wakeups = timers.wakeups(settings.poll_interval);
        let mut moves = timers.clock_moves(settings.poll_interval);
        let mut state = RecordedState::default();
        let mut window: VecDeque<Waiting> = VecDeque::new();
        let mut read_due = true;
        let mut last_read = Instant::now();
        let mut outage = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut next_cleanup = Instant::now();
        let mut next_gauges = Instant::now();
        state
            .set(store, &held.lease, ProjectionState::Live, None)
            .await;
        loop {
            if shutdown.is_cancelled() {
                return Exit::Shutdown;
            }
            if held.lost.is_cancelled() {
                return Exit::Lost;
            }
            if read_due || window.is_empty() || last_read.elapsed() >= settings.poll_interval {
                match store
                    .due_timers(
                        timers.clock().offset(),
                        settings.horizon,
                        settings.batch_size,
                    )
                    .await
                {
                    Ok(read) => {
                        let at = Instant::now();
                        last_read = at;
                        read_due = false;
                        outage.reset();
                        window = read
                            .timers
                            .into_iter()
                            .map(|timer| Waiting::new(timer, read.now, at))
                            .collect();
                    }
                    Err(error) => {
                        let message = crate::error::error_chain(&error).to_string();
                        tracing::warn!(error = %message, "reading due timers failed");
                        state
                            .set(
                                store,
                                &held.lease,
                                ProjectionState::Retrying,
                                Some((error.kind(), message)),
                            )
                            .await;
                        if let Some(exit) = pause(outage.next_delay(), shutdown, held).await {
                            return exit;
                        }
                        continue;
                    }
                }
            }
            let now = Instant::now();
            // Housekeeping, also while timers keep falling due.
            if next_cleanup <= now {
                next_cleanup = now + settings.cleanup_interval;
                self.cleanup().await;
            }
            if next_gauges <= now {
                next_gauges = now + STATUS_METRICS_EVERY;
                match timers.status().await {
                    Ok(status) => crate::telemetry::record_timer_status(&status),
                    Err(error) => {
                        tracing::debug!(error = %crate::error::error_chain(&error), "reading the timers' status for the gauges failed")
                    }
                }
            }
            let now = Instant::now();
            let mut due = Vec::new();
            while window.front().is_some_and(|w| w.due <= now) {
                due.extend(window.pop_front());
            }
            if !due.is_empty() {
                match self.fire_all(due, shutdown, held).await {
                    Ok(None) => {
                        state
                            .set(store, &held.lease, ProjectionState::Live, None)
                            .await;
                    }
                    Ok(Some(failure)) => {
                        state
                            .set(
                                store,
                                &held.lease,
                                ProjectionState::Retrying,
                                Some((ErrorKind::Infrastructure, failure)),
                            )
                            .await;
                    }
                    Err(error) => {
                        // The store did not answer the check or the record:
                        // what was sent is recognized when it fires again.
                        tracing::warn!(error = %crate::error::error_chain(&error), "checking or recording due timers failed");
                        read_due = true;
                        if let Some(exit) = pause(outage.next_delay(), shutdown, held).await {
                            return exit;
                        }
                    }
                }
                continue;
            }
            // Nothing due now: wait for the next one, a signal or the poll.
            let wait = window
                .front()
                .map_or(settings.poll_interval, |w| {
                    w.due.saturating_duration_since(now)
                })
                .min(settings.poll_interval.saturating_sub(last_read.elapsed()));
            tokio::select! {
                _ = shutdown.cancelled() => return Exit::Shutdown,
                _ = held.lost.cancelled() => return Exit::Lost,
                _ = wakeups.wait() => read_due = true,
                _ = moves.wait() => read_due = true,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Fires `due` timers, `concurrency` at once: each such chunk is
    /// checked against the table just before it fires (a cancel or a
    /// reschedule committed since the window was read wins), and its
    /// outcomes are recorded in one statement (one commit). A failed
    /// attempt is noted on its timer with the time of the next one. Returns
    /// the last failure of a target, if any. Stops starting new chunks on
    /// shutdown, and abandons a chunk when the lease is lost (what it sent
    /// is recognized when it fires again).
    async fn fire_all(
        &self,
        due: Vec<Waiting>,
        shutdown: &CancellationToken,
        held: &Held,
    ) -> Result<Option<String>, StoreError> {
        let store = self.shared.timers.store();
        let concurrency = self.shared.settings.concurrency;
        let mut failure = None;
        let mut due = due.into_iter().peekable();
        while due.peek().is_some() {
            if shutdown.is_cancelled() || held.lost.is_cancelled() {
                break;
            }
            let chunk: Vec<Waiting> = due.by_ref().take(concurrency).collect();
            let keys: Vec<String> = chunk.iter().map(|w| w.timer.key.clone()).collect();
            let still: HashMap<String, uuid::Uuid> =
                store.still_pending(&keys).await?.into_iter().collect();
            let chunk: Vec<Waiting> = chunk
                .into_iter()
                .filter(|w| still.get(&w.timer.key) == Some(&w.timer.command_id))
                .collect();
            let fire = futures::stream::iter(chunk)
                .map(|waiting| async move {
                    let attempt = self.fire_one(&waiting.timer, waiting.late()).await;
                    (waiting.timer, attempt)
                })
                .buffer_unordered(concurrency)
                .collect::<Vec<_>>();
            let attempts = tokio::select! {
                attempts = fire => attempts,
                _ = held.lost.cancelled() => break,
            };
            let mut finished = Vec::new();
            for (timer, attempt) in attempts {
                match attempt {
                    Attempt::Done(Some(finish)) => {
                        finished.push((timer.key, timer.command_id, finish));
                    }
                    Attempt::Done(None) => {}
                    Attempt::Retry(message) => {
                        let retry_in =
                            self.shared.timers.clock().offset() + retry_delay(timer.attempts);
                        if let Err(error) = store
                            .note_timer_attempt(&timer.key, timer.command_id, &message, retry_in)
                            .await
                        {
                            tracing::debug!(error = %crate::error::error_chain(&error), "recording a timer's failed attempt failed");
                        }
                        failure = Some(message);
                    }
                }
            }
            store.finish_timers(&finished).await?;
        }
        Ok(failure)
    }

    /// Fires one timer: what to record, or why to try again.
    async fn fire_one(&self, timer: &TimerRecord, late: Duration) -> Attempt {
        let table = self.shared.timers.table();
        let span = tracing::info_span!(
            "outflow.timer.fire",
            timer = %timer.key,
            target = %timer.target,
            target_id = %timer.target_id,
            late_ms = late.as_millis() as u64,
        );
        let Some(target) = self.shared.targets.get(&timer.target) else {
            let message = format!(
                "no target for timer `{}`: its target `{}` was not given to the scheduler \
                 (SchedulerBuilder::command for a command, ::outbox for a message)",
                timer.key, timer.target
            );
            tracing::error!(error = %message, "a timer cannot fire");
            return Attempt::Retry(message);
        };
        let fired =
            match tokio::time::timeout(FIRE_TIMEOUT, target.fire(timer).instrument(span)).await {
                Ok(fired) => fired,
                Err(_) => Fired::Retry(format!(
                    "firing took longer than {} s (a lock, a stalled connection)",
                    FIRE_TIMEOUT.as_secs()
                )),
            };
        let outcome = match &fired {
            Fired::Finish(Finish::Fired) | Fired::Recorded => "fired",
            Fired::Finish(Finish::Refused(_)) => "refused",
            Fired::Finish(Finish::Failed(_)) => "failed",
            Fired::Retry(_) => "retry",
        };
        metrics::counter!("outflow_timers_fired_total", "timers" => table.to_owned(), "outcome" => outcome)
            .increment(1);
        match fired {
            Fired::Finish(finish) => {
                metrics::histogram!("outflow_timer_lateness_seconds", "timers" => table.to_owned())
                    .record(late.as_secs_f64());
                if let Finish::Failed(reason) = &finish {
                    tracing::error!(timer = %timer.key, %reason, "a timer cannot fire: recorded as failed");
                }
                Attempt::Done(Some(finish))
            }
            Fired::Recorded => {
                metrics::histogram!("outflow_timer_lateness_seconds", "timers" => table.to_owned())
                    .record(late.as_secs_f64());
                Attempt::Done(None)
            }
            Fired::Retry(message) => {
                tracing::warn!(timer = %timer.key, error = %message, "firing a timer failed; it will be tried again");
                Attempt::Retry(message)
            }
        }
    }

    /// Deletes timers finished longer ago than the retention, at most ten
    /// statements a turn (the rest at the next cleanup).
    async fn cleanup(&self) {
        let store = self.shared.timers.store();
        for _ in 0..10 {
            match store
                .prune_timers(self.shared.settings.retention, 1000)
                .await
            {
                Ok(1000) => continue,
                Ok(_) => return,
                Err(error) => {
                    tracing::debug!(error = %crate::error::error_chain(&error), "deleting finished timers failed");
                    return;
                }
            }
        }
    }
}

/// How long one firing may take before it counts as a failed attempt.
const FIRE_TIMEOUT: Duration = Duration::from_secs(60);

/// The wait before the next attempt of a timer that failed `attempts`
/// times before: 200 ms, doubling, at most 30 s.
fn retry_delay(attempts: u32) -> Duration {
    Duration::from_millis(200)
        .saturating_mul(2u32.saturating_pow(attempts.min(10)))
        .min(Duration::from_secs(30))
}

/// Waits `delay` unless the scheduler must stop first.
async fn pause(delay: Duration, shutdown: &CancellationToken, held: &Held) -> Option<Exit> {
    tokio::select! {
        _ = shutdown.cancelled() => Some(Exit::Shutdown),
        _ = held.lost.cancelled() => Some(Exit::Lost),
        _ = tokio::time::sleep(delay) => None,
    }
}

#[async_trait]
impl<S: TimerStore> crate::runner::Leader for Scheduler<S> {
    async fn run_as(
        &self,
        node_id: &str,
        lease_ttl: Duration,
        heartbeat: Duration,
        shutdown: CancellationToken,
    ) -> Result<(), StoreError> {
        // A holder of its own: the runner's node renews (and gives up as
        // strays) every lease held under its id that is not one of its
        // projection units.
        let holder = format!("{node_id}:timers");
        Scheduler::run_as(self, &holder, lease_ttl, heartbeat, shutdown).await
    }
}
