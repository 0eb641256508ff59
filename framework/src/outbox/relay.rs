//! The relay: delivers the outbox's committed messages to a sink, one relay
//! at a time across all nodes.
//!
//! The relay holds the lease of the projection unit `outbox:<table>` through
//! the same lease engine as projection runners ([`crate::lease`]: claim,
//! renew, release, state, re-checks) and stores its cursor as that unit's
//! checkpoint. The cursor moves, and the batch is marked
//! delivered, in one transaction that only commits while the relay's claim
//! (its epoch) is current: a relay that lost its lease can never move the
//! cursor after another took over.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{Outbox, OutboxMessageRecord, OutboxSink, OutboxStore};
use crate::error::{ConfigError, StoreError};
use crate::event::Checkpoint;
use crate::lease::{check_timing, keep_lease, register, Held, Holder, RecordedState};
use crate::port::log::Wakeups;
use crate::port::projections::ProjectionState;
use crate::projection::RetryPolicy;
use crate::wake::Recheck;

/// How often a running relay reads the outbox's status for its gauges.
const STATUS_METRICS_EVERY: Duration = Duration::from_secs(15);

/// How long one cleanup round may run before the relay delivers again.
const CLEANUP_BUDGET: Duration = Duration::from_millis(500);

/// The first wait before looking again while messages are held back by an
/// older transaction still running.
const FIRST_RECHECK: Duration = Duration::from_millis(10);

/// Delivers an [`Outbox`]'s messages to an [`OutboxSink`]: at least once, in
/// order per key. Start one on every node that may deliver; one of them holds
/// the lease and delivers, the others stand by and take over within the lease
/// time to live after it dies. Cloning is cheap.
///
/// ```no_run
/// # async fn demo(outbox: outflow::outbox::Outbox, sink: impl outflow::outbox::OutboxSink) -> Result<(), outflow::StoreError> {
/// use std::time::Duration;
/// use tokio_util::sync::CancellationToken;
///
/// let relay = outbox
///     .relay(sink)
///     .batch_size(100)
///     .retention(Duration::from_secs(3 * 24 * 3600))
///     .build()?;
/// let shutdown = CancellationToken::new();
/// relay.run(shutdown).await?;
/// # Ok(()) }
/// ```
pub struct OutboxRelay<S: OutboxStore = crate::store::DefaultOutboxStore> {
    shared: Arc<Shared<S>>,
}

impl<S: OutboxStore> Clone for OutboxRelay<S> {
    fn clone(&self) -> Self {
        OutboxRelay {
            shared: self.shared.clone(),
        }
    }
}

impl<S: OutboxStore> std::fmt::Debug for OutboxRelay<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxRelay")
            .field("table", &self.shared.outbox.table())
            .field("node_id", &self.shared.node_id)
            .finish_non_exhaustive()
    }
}

struct Shared<S: OutboxStore> {
    outbox: Outbox<S>,
    sink: Arc<dyn OutboxSink>,
    node_id: String,
    batch_size: usize,
    retry: RetryPolicy,
    lease_ttl: Duration,
    heartbeat: Duration,
    poll_interval: Duration,
    retention: Duration,
    cleanup_interval: Duration,
    /// Whether `run` is running (on this relay or a clone): two loops with
    /// one node id would both believe they hold the lease.
    running: AtomicBool,
}

/// Resets [`Shared::running`] when `run` ends or its future is dropped.
struct RunningGuard<'a>(&'a AtomicBool);

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// Builds an [`OutboxRelay`].
#[must_use = "a builder does nothing until it is built"]
pub struct OutboxRelayBuilder<S: OutboxStore = crate::store::DefaultOutboxStore> {
    outbox: Outbox<S>,
    sink: Arc<dyn OutboxSink>,
    node_id: Option<String>,
    batch_size: usize,
    retry: RetryPolicy,
    lease_ttl: Duration,
    heartbeat: Duration,
    poll_interval: Duration,
    retention: Duration,
    cleanup_interval: Duration,
}

impl<S: OutboxStore> std::fmt::Debug for OutboxRelayBuilder<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxRelayBuilder")
            .field("table", &self.outbox.table())
            .field("node_id", &self.node_id)
            .field("batch_size", &self.batch_size)
            .field("lease_ttl", &self.lease_ttl)
            .finish_non_exhaustive()
    }
}

impl<S: OutboxStore> OutboxRelayBuilder<S> {
    /// A name for this relay, unique among the relays and projection runners
    /// sharing the store (default: a random one). Do not reuse a
    /// [`ProjectionRunner`](crate::runner::ProjectionRunner)'s node id:
    /// leases are renewed per node.
    pub fn node_id(mut self, id: impl Into<String>) -> Self {
        self.node_id = Some(id.into());
        self
    }

    /// Messages per sink call (default 100).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }

    /// The backoff between attempts of a failing batch. Attempts never run
    /// out (`max_attempts` is not used): a message is never skipped.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// How long the lease stays valid without a renewal (default 5 s): the
    /// longest time delivery stalls after the leading relay died.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// How often the lease is renewed, and how often a standby relay tries
    /// to take it (default 1 s).
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.heartbeat = interval;
        self
    }

    /// How often the relay looks for messages without a wake-up (default
    /// 500 ms). Covers lost notifications and writers that do not call
    /// [`Outbox::wake`].
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// How long delivered messages are kept (default 7 days).
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// How often the leading relay deletes delivered messages past the
    /// retention (default 60 s).
    pub fn cleanup_interval(mut self, interval: Duration) -> Self {
        self.cleanup_interval = interval;
        self
    }

    /// The relay.
    ///
    /// # Errors
    ///
    /// [`StoreError::Config`] when the heartbeat is not shorter than the
    /// lease.
    pub fn build(self) -> Result<OutboxRelay<S>, StoreError> {
        check_timing(
            "outbox relay heartbeat interval",
            self.heartbeat,
            self.lease_ttl,
        )?;
        Ok(OutboxRelay {
            shared: Arc::new(Shared {
                outbox: self.outbox,
                sink: self.sink,
                node_id: self
                    .node_id
                    .unwrap_or_else(|| format!("outbox-relay-{}", uuid::Uuid::new_v4().simple())),
                batch_size: self.batch_size,
                retry: self.retry,
                lease_ttl: self.lease_ttl,
                heartbeat: self.heartbeat,
                poll_interval: self.poll_interval,
                retention: self.retention,
                cleanup_interval: self.cleanup_interval,
                running: AtomicBool::new(false),
            }),
        })
    }
}

/// Why the relay stopped leading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    /// Asked to stop: give the lease back.
    Shutdown,
    /// The lease is gone (expired, or another relay took it).
    Lost,
}

/// What one sink call came to.
enum Sent {
    Delivered,
    /// The sink failed and the backoff has passed: try again.
    Failed,
    /// Stop leading first.
    Stop(Exit),
}

impl<S: OutboxStore> OutboxRelay<S> {
    /// A builder for a relay delivering `outbox`'s messages to `sink`.
    pub fn builder(outbox: Outbox<S>, sink: impl OutboxSink) -> OutboxRelayBuilder<S> {
        OutboxRelayBuilder {
            outbox,
            sink: Arc::new(sink),
            node_id: None,
            batch_size: 100,
            retry: RetryPolicy::default(),
            lease_ttl: Duration::from_secs(5),
            heartbeat: Duration::from_secs(1),
            poll_interval: Duration::from_millis(500),
            retention: Duration::from_secs(7 * 24 * 3600),
            cleanup_interval: Duration::from_secs(60),
        }
    }

    /// This relay's node id.
    pub fn node_id(&self) -> &str {
        &self.shared.node_id
    }

    /// The outbox.
    pub fn outbox(&self) -> &Outbox<S> {
        &self.shared.outbox
    }

    /// Runs until `shutdown` is cancelled: registers the relay's unit, then
    /// either delivers (while it holds the lease) or stands by (while another
    /// relay does), taking over when that relay's lease runs out. On shutdown
    /// a sink call in progress is awaited, its batch recorded, and the lease
    /// given back. Everything the relay runs — delivery, lease renewal,
    /// listening for other nodes' signals — lives in this future: dropping or aborting it stops them
    /// all (the lease then runs out after its time to live).
    ///
    /// Database outages are waited out with backoff; this only returns early
    /// when registration is refused, or keeps failing for a reason the
    /// backend blames on the environment (the store's tables are missing).
    ///
    /// # Errors
    ///
    /// [`StoreError::Config`] when this relay (or a clone) is running
    /// already — start another relay, with its own node id, instead — or
    /// when the relay's unit is registered with several partitions (by
    /// something else than a relay); an infrastructure
    /// [`StoreError::Database`] after about twenty seconds of failed attempts.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), StoreError> {
        let shared = &self.shared;
        if shared.running.swap(true, Ordering::SeqCst) {
            return Err(
                ConfigError::AlreadyRunning(format!("outbox relay `{}`", shared.node_id)).into(),
            );
        }
        let _running = RunningGuard(&shared.running);
        let unit = shared.outbox.unit().clone();
        let store = shared.outbox.store();
        if !register(store, &unit.projection, 1, &shutdown).await? {
            return Ok(());
        }
        let span = tracing::info_span!("outbox_relay", table = %shared.outbox.table(), node = %shared.node_id);
        let stop_listening = CancellationToken::new();
        let listen = shared.outbox.listen(&stop_listening);
        let work = async {
            self.work(&shutdown).await;
            stop_listening.cancel();
        };
        let gauges = async {
            // The pending count for the gauges, while the relay runs.
            loop {
                match shared.outbox.status().await {
                    Ok(status) => {
                        crate::telemetry::record_outbox_status(shared.outbox.table(), &status)
                    }
                    Err(error) => {
                        tracing::debug!(error = %crate::error::error_chain(&error), "reading the outbox's status for its gauges failed");
                    }
                }
                tokio::select! {
                    _ = stop_listening.cancelled() => return,
                    _ = tokio::time::sleep(STATUS_METRICS_EVERY) => {}
                }
            }
        };
        tokio::join!(listen, work.instrument(span), gauges);
        Ok(())
    }

    /// Claims the lease whenever it is free, and delivers while holding it.
    async fn work(&self, shutdown: &CancellationToken) {
        let shared = &self.shared;
        let store = shared.outbox.store();
        let unit = shared.outbox.unit();
        let mut holder = Holder::new(shared.node_id.clone(), shared.lease_ttl);
        let mut wakeups = shared.outbox.wakeups(shared.poll_interval);
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let started = Instant::now();
            match holder.claim(store, unit).await {
                Ok(Some(lease)) => {
                    tracing::info!(epoch = lease.epoch, cursor = %lease.checkpoint, "outbox relay leads");
                    let held = Held::new(lease, started, shared.lease_ttl);
                    let exit = self.lead(&mut holder, &held, shutdown, &mut wakeups).await;
                    match exit {
                        Exit::Shutdown => {
                            if let Err(error) = holder.release(store, &held.lease).await {
                                tracing::warn!(error = %crate::error::error_chain(&error),
                                    "releasing the outbox lease failed (it will expire)"
                                );
                            }
                            return;
                        }
                        Exit::Lost => tracing::info!("outbox relay lost its lease"),
                    }
                }
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(error = %crate::error::error_chain(&error), "claiming the outbox lease failed")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(shared.heartbeat) => {}
            }
        }
    }

    /// Renews the lease and delivers, until shutdown or the lease is lost.
    async fn lead(
        &self,
        holder: &mut Holder,
        held: &Held,
        shutdown: &CancellationToken,
        wakeups: &mut Wakeups,
    ) -> Exit {
        let done = CancellationToken::new();
        let renew = keep_lease(
            holder,
            self.shared.outbox.store(),
            held,
            (self.shared.lease_ttl, self.shared.heartbeat),
            &done,
            "outbox",
        );
        let deliver = async {
            let exit = self.deliver(held, shutdown, wakeups).await;
            done.cancel();
            exit
        };
        let ((), exit) = tokio::join!(renew, deliver);
        exit
    }

    /// Reads, delivers and records batches, retrying forever.
    async fn deliver(
        &self,
        held: &Held,
        shutdown: &CancellationToken,
        wakeups: &mut Wakeups,
    ) -> Exit {
        let shared = &self.shared;
        let outbox = &shared.outbox;
        let mut cursor = held.lease.checkpoint;
        let mut state = RecordedState::default();
        let mut next_cleanup = Instant::now();
        let mut failures = 0u32;
        let mut recheck = Recheck::new(FIRST_RECHECK);
        let mut sink_failures = 0u32;
        loop {
            if shutdown.is_cancelled() {
                return Exit::Shutdown;
            }
            if held.lost.is_cancelled() {
                return Exit::Lost;
            }
            if Instant::now() >= next_cleanup {
                next_cleanup = match outbox.cleanup_for(shared.retention, CLEANUP_BUDGET).await {
                    Ok(true) => Instant::now(),
                    Ok(false) => Instant::now() + shared.cleanup_interval,
                    Err(error) => {
                        tracing::warn!(error = %crate::error::error_chain(&error), "outbox cleanup failed");
                        Instant::now() + shared.cleanup_interval
                    }
                };
            }
            let batch = match outbox.read(cursor, shared.batch_size).await {
                Ok(batch) => {
                    failures = 0;
                    batch
                }
                Err(error) => {
                    failures += 1;
                    tracing::warn!(error = %crate::error::error_chain(&error), "reading the outbox failed");
                    state
                        .set(
                            self.shared.outbox.store(),
                            &held.lease,
                            ProjectionState::Retrying,
                            Some((error.kind(), crate::error::error_chain(&error))),
                        )
                        .await;
                    if let Some(exit) = self
                        .pause(held, shutdown, shared.retry.backoff(failures.min(10)))
                        .await
                    {
                        return exit;
                    }
                    continue;
                }
            };
            if batch.is_empty() {
                state
                    .set(
                        self.shared.outbox.store(),
                        &held.lease,
                        ProjectionState::Live,
                        None,
                    )
                    .await;
                // Messages committed behind an open transaction become
                // readable when it ends, and no signal says so: look again
                // soon while there are any.
                match outbox.held_back(cursor).await {
                    Ok(true) => recheck.held_back(),
                    Ok(false) => recheck.found(),
                    Err(error) => {
                        tracing::debug!(error = %crate::error::error_chain(&error), "looking for held-back outbox messages failed");
                        recheck.held_back();
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return Exit::Shutdown,
                    _ = held.lost.cancelled() => return Exit::Lost,
                    _ = recheck.idle(wakeups) => {}
                    _ = tokio::time::sleep_until(next_cleanup.into()) => {}
                }
                continue;
            }
            recheck.found();
            match self
                .send(held, shutdown, &batch, &mut sink_failures, &mut state)
                .await
            {
                Sent::Delivered => {}
                // Read again from the cursor: the same messages come first
                // (an operator may have removed one the sink refuses for good).
                Sent::Failed => continue,
                Sent::Stop(exit) => return exit,
            }
            if let Some(exit) = self
                .record(held, shutdown, cursor, &batch, &mut state)
                .await
            {
                return exit;
            }
            if let Some(last) = batch.last() {
                cursor = last.checkpoint();
            }
            metrics::counter!("outflow_outbox_delivered_total", "outbox" => shared.outbox.table().to_owned()).increment(batch.len() as u64);
            tracing::debug!(messages = batch.len(), %cursor, "outbox batch delivered");
            let next = if batch.len() >= shared.batch_size {
                ProjectionState::CatchingUp
            } else {
                ProjectionState::Live
            };
            state
                .set(self.shared.outbox.store(), &held.lease, next, None)
                .await;
        }
    }

    /// Hands a batch to the sink once; after a failure, waits the backoff
    /// of `attempts` failures in a row.
    async fn send(
        &self,
        held: &Held,
        shutdown: &CancellationToken,
        batch: &[OutboxMessageRecord],
        attempts: &mut u32,
        state: &mut RecordedState,
    ) -> Sent {
        let shared = &self.shared;
        if let Some(exit) = self.until_fresh(held, shutdown).await {
            return Sent::Stop(exit);
        }
        let started = Instant::now();
        let span = tracing::info_span!(
            parent: None,
            "outflow.outbox.deliver",
            table = %shared.outbox.table(),
            messages = batch.len(),
        );
        crate::trace::link_carriers(&span, batch.iter().map(|message| &message.headers));
        let result = tokio::select! {
            // A relay that lost its lease stops delivering at once: the new
            // holder delivers this batch again.
            _ = held.lost.cancelled() => return Sent::Stop(Exit::Lost),
            result = shared.sink.deliver(batch).instrument(span) => result,
        };
        match result {
            Ok(()) => {
                *attempts = 0;
                metrics::histogram!("outflow_outbox_deliver_seconds", "outbox" => shared.outbox.table().to_owned())
                    .record(started.elapsed().as_secs_f64());
                Sent::Delivered
            }
            Err(error) => {
                *attempts += 1;
                metrics::counter!("outflow_outbox_delivery_failures_total", "outbox" => shared.outbox.table().to_owned()).increment(1);
                tracing::warn!(
                    attempts = *attempts,
                    messages = batch.len(),
                    first = ?batch.first().map(|m| m.message_id),
                    "outbox delivery failed: {}",
                    error.chain()
                );
                state
                    .set(
                        self.shared.outbox.store(),
                        &held.lease,
                        ProjectionState::Retrying,
                        Some((
                            error.kind_with(|e| self.shared.outbox.store().classify(e)),
                            error.chain(),
                        )),
                    )
                    .await;
                match self
                    .pause(held, shutdown, shared.retry.backoff((*attempts).min(30)))
                    .await
                {
                    Some(exit) => Sent::Stop(exit),
                    None => Sent::Failed,
                }
            }
        }
    }

    /// Records a delivered batch (cursor and delivered marks), retrying
    /// database failures. `Some` when the relay must stop leading; the next
    /// holder then delivers the batch again.
    async fn record(
        &self,
        held: &Held,
        shutdown: &CancellationToken,
        from: Checkpoint,
        batch: &[OutboxMessageRecord],
        state: &mut RecordedState,
    ) -> Option<Exit> {
        let mut failures = 0u32;
        loop {
            match self
                .shared
                .outbox
                .commit_delivery(&held.lease, from, batch)
                .await
            {
                Ok(true) => return None,
                Ok(false) => {
                    held.lost.cancel();
                    return Some(Exit::Lost);
                }
                Err(error) => {
                    failures += 1;
                    tracing::warn!(error = %crate::error::error_chain(&error), "recording an outbox delivery failed");
                    state
                        .set(
                            self.shared.outbox.store(),
                            &held.lease,
                            ProjectionState::Retrying,
                            Some((error.kind(), crate::error::error_chain(&error))),
                        )
                        .await;
                    if let Some(exit) = self
                        .pause(held, shutdown, self.shared.retry.backoff(failures.min(10)))
                        .await
                    {
                        return Some(exit);
                    }
                }
            }
        }
    }

    /// Waits until the lease has a safe margin left (a renewal succeeded
    /// recently), so a relay whose renewals fail stops delivering before its
    /// lease can run out under a sink call.
    async fn until_fresh(&self, held: &Held, shutdown: &CancellationToken) -> Option<Exit> {
        let shared = &self.shared;
        let margin = (shared.lease_ttl - shared.heartbeat) / 2;
        loop {
            if held.lost.is_cancelled() {
                return Some(Exit::Lost);
            }
            if shutdown.is_cancelled() {
                return Some(Exit::Shutdown);
            }
            if held.valid_until() > Instant::now() + margin {
                return None;
            }
            let step =
                (shared.heartbeat / 4).clamp(Duration::from_millis(5), Duration::from_millis(50));
            if let Some(exit) = self.pause(held, shutdown, step).await {
                return Some(exit);
            }
        }
    }

    /// Sleeps unless stopped or the lease is lost first.
    async fn pause(
        &self,
        held: &Held,
        shutdown: &CancellationToken,
        duration: Duration,
    ) -> Option<Exit> {
        tokio::select! {
            _ = shutdown.cancelled() => Some(Exit::Shutdown),
            _ = held.lost.cancelled() => Some(Exit::Lost),
            _ = tokio::time::sleep(duration) => None,
        }
    }
}
