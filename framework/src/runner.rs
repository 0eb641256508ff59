//! The projection runner: runs projections against the global log, on one or
//! many nodes.
//!
//! Each projection partition (a *unit*) is owned by one runner at a time,
//! through a lease in the store that the owner renews; a runner that stops
//! renewing (crash, lost connection) loses the unit to another runner after
//! the lease's time to live. Every batch writes the read model and the new
//! checkpoint in one transaction, and the checkpoint write only succeeds while
//! the runner's claim (its *epoch*) is current; so a same-database read model
//! sees every event exactly once, whoever runs it and however often runners
//! die. Runners share the units evenly: each takes its share of the units not
//! owned by a live runner, and gives back what exceeds its share when more
//! runners join.
//!
//! ```no_run
//! # async fn demo(store: outflow::PostgresStore, balances: impl outflow::projection::Projection<outflow::PostgresStore>) -> Result<(), Box<dyn std::error::Error>> {
//! use outflow::projection::ProjectionOptions;
//! use outflow::runner::ProjectionRunner;
//! use tokio_util::sync::CancellationToken;
//!
//! let runner = ProjectionRunner::builder(store.clone())
//!     .projection(ProjectionOptions::new(balances).batch_size(500))
//!     .build()?;
//! let shutdown = CancellationToken::new();
//! let running = tokio::spawn({
//!     let runner = runner.clone();
//!     let shutdown = shutdown.clone();
//!     async move { runner.run(shutdown).await }
//! });
//! // ... on SIGTERM:
//! shutdown.cancel();
//! running.await??;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use rand::seq::SliceRandom;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::error::StoreError;
use crate::event::{Checkpoint, RecordedEvent};
use crate::log::{LogFilter, Wake};
use crate::projection::{HandlerError, OnError, Projection, ProjectionOptions, RetryPolicy};
use crate::store::projections::{
    DeadLetter, Lease, NewDeadLetter, OldestTransaction, ProjectionState, ProjectionStore, UnitId,
};

/// Runs projections. Cloning is cheap; clones share the projections.
pub struct ProjectionRunner<S: ProjectionStore> {
    shared: Arc<Shared<S>>,
}

impl<S: ProjectionStore> Clone for ProjectionRunner<S> {
    fn clone(&self) -> Self {
        ProjectionRunner {
            shared: self.shared.clone(),
        }
    }
}

struct Shared<S: ProjectionStore> {
    store: S,
    node_id: String,
    lease_ttl: Duration,
    heartbeat: Duration,
    projections: HashMap<String, Arc<Registered<S>>>,
}

struct Registered<S: ProjectionStore> {
    /// Whether this runner has registered the projection in the store.
    stored: std::sync::atomic::AtomicBool,
    name: String,
    projection: Arc<dyn Projection<S>>,
    filter: LogFilter,
    partitions: u32,
    batch_size: usize,
    retry: RetryPolicy,
    on_error: OnError,
}

/// Builds a [`ProjectionRunner`].
pub struct ProjectionRunnerBuilder<S: ProjectionStore> {
    store: S,
    node_id: Option<String>,
    lease_ttl: Duration,
    heartbeat: Duration,
    projections: Vec<ProjectionOptions<S>>,
}

impl<S: ProjectionStore> ProjectionRunnerBuilder<S> {
    /// A name for this runner, unique among the runners sharing the store
    /// (default: a random one).
    pub fn node_id(mut self, id: impl Into<String>) -> Self {
        self.node_id = Some(id.into());
        self
    }

    /// How long a unit stays owned without a renewal (default 5 s): the
    /// longest time a unit stays still after its runner died.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// How often leases are renewed and free units looked for (default 1 s).
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.heartbeat = interval;
        self
    }

    /// Adds a projection.
    pub fn projection(mut self, options: ProjectionOptions<S>) -> Self {
        self.projections.push(options);
        self
    }

    /// The runner.
    ///
    /// # Errors
    ///
    /// [`StoreError::Config`] for an empty or duplicate projection name, or a
    /// heartbeat not shorter than the lease.
    pub fn build(self) -> Result<ProjectionRunner<S>, StoreError> {
        if self.heartbeat >= self.lease_ttl {
            return Err(StoreError::Config(format!(
                "heartbeat interval {:?} must be shorter than the lease {:?}",
                self.heartbeat, self.lease_ttl
            )));
        }
        let mut projections = HashMap::new();
        for options in self.projections {
            let name = options.projection.name().to_owned();
            if name.is_empty() {
                return Err(StoreError::Config("a projection has an empty name".into()));
            }
            let registered = Registered {
                stored: std::sync::atomic::AtomicBool::new(false),
                filter: options.projection.filter(),
                name: name.clone(),
                projection: options.projection,
                partitions: options.partitions,
                batch_size: options.batch_size,
                retry: options.retry,
                on_error: options.on_error,
            };
            if projections
                .insert(name.clone(), Arc::new(registered))
                .is_some()
            {
                return Err(StoreError::Config(format!(
                    "projection `{name}` is registered twice"
                )));
            }
        }
        Ok(ProjectionRunner {
            shared: Arc::new(Shared {
                store: self.store,
                node_id: self
                    .node_id
                    .unwrap_or_else(|| format!("node-{}", uuid::Uuid::new_v4().simple())),
                lease_ttl: self.lease_ttl,
                heartbeat: self.heartbeat,
                projections,
            }),
        })
    }
}

/// Where a projection unit stands, as [`ProjectionRunner::status`] reports it.
#[derive(Debug, Clone, PartialEq)]
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
    /// Whether an operator paused it.
    pub paused: bool,
    /// Events it still has to handle (up to 10 million; counted exactly).
    pub lag_events: u64,
    /// How long ago the oldest event it still has to handle was written.
    pub lag: Duration,
    /// Parked events of this unit.
    pub parked: usize,
    /// The last error while retrying or stopped.
    pub last_error: Option<String>,
    /// Events handled since the last reset.
    pub processed: u64,
    /// Progress of a rebuild, while one is running.
    pub rebuild: Option<RebuildProgress>,
    /// When the unit lags: the oldest open transaction on the server, which
    /// holds every log reader back until it ends.
    pub held_back_by: Option<OldestTransaction>,
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

/// Why [`wait_for`] returned without the projections reaching the position.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WaitError {
    /// The timeout passed first; the events stay written.
    #[error("projection `{projection}` reached {reached}, not {target}, within {timeout:?}")]
    Timeout {
        /// The first projection that was behind.
        projection: String,
        /// Where it stood.
        reached: Checkpoint,
        /// Where it had to get.
        target: Checkpoint,
        /// The timeout.
        timeout: Duration,
    },
    /// The projection is stopped on an error and will not get there by itself.
    #[error("projection `{projection}` is stopped: {error}")]
    Stopped {
        /// The projection.
        projection: String,
        /// Its last error.
        error: String,
    },
    /// No projection of that name is registered in the store.
    #[error("no projection `{0}` is registered")]
    UnknownProjection(String),
    /// Reading the checkpoints failed.
    #[error(transparent)]
    Store(#[from] StoreError),
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

/// Waits until every named projection (all its partitions) has passed
/// `target` — typically [`Committed::checkpoint`](crate::Committed::checkpoint)
/// of a command — so a read model shows that command's effect
/// (read-your-writes). Works across nodes: checkpoints are read from the
/// store, and waiters are woken when runners anywhere commit.
///
/// # Errors
///
/// [`WaitError::Timeout`] after `timeout`; [`WaitError::Stopped`] at once if a
/// projection is stopped on an error; [`WaitError::UnknownProjection`].
pub async fn wait_for<S: ProjectionStore>(
    store: &S,
    target: Checkpoint,
    projections: &[&str],
    timeout: Duration,
) -> Result<(), WaitError> {
    let deadline = tokio::time::Instant::now() + timeout;
    // One read of our own, then the view that one task keeps fresh for every
    // waiter of this store: many waiters cost one query per change, not one
    // each.
    // One read of our own (admin changes such as a restart reach the shared
    // view only at its next refresh), then the view that one task keeps fresh
    // for every waiter of this store: many waiters cost one query per change,
    // not one each.
    let mut view = store.waiters().view.subscribe();
    ensure_refresher(store);
    let mut units = Arc::new(store.units(None).await?);
    // Whether `units` comes from our own read (the shared view may lag).
    let mut fresh = true;
    loop {
        let mut behind = None;
        let mut stopped = None;
        for &name in projections {
            let mine: Vec<_> = units.iter().filter(|u| u.unit.projection == name).collect();
            if mine.is_empty() {
                return Err(WaitError::UnknownProjection(name.to_owned()));
            }
            for unit in mine {
                if unit.checkpoint >= target {
                    continue;
                }
                if unit.state == ProjectionState::Stopped {
                    stopped.get_or_insert((name, unit.last_error.clone().unwrap_or_default()));
                }
                behind.get_or_insert((name, unit.checkpoint));
            }
        }
        let Some((name, reached)) = behind else {
            return Ok(());
        };
        if let Some((projection, error)) = stopped {
            if fresh {
                return Err(WaitError::Stopped {
                    projection: projection.to_owned(),
                    error,
                });
            }
            // Confirm with a read of our own before giving up.
            units = Arc::new(store.units(None).await?);
            fresh = true;
            continue;
        }
        tokio::select! {
            changed = view.changed() => {
                if changed.is_err() {
                    units = Arc::new(store.units(None).await?);
                    fresh = true;
                    continue;
                }
                let latest = view.borrow_and_update().clone();
                if !latest.is_empty() {
                    units = latest;
                    fresh = false;
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                return Err(WaitError::Timeout {
                    projection: name.to_owned(),
                    reached,
                    target,
                    timeout,
                });
            }
        }
    }
}

/// Starts the task that refreshes a store's shared checkpoint view while
/// anyone waits, if it is not running; `true` when it started one.
fn ensure_refresher<S: ProjectionStore>(store: &S) -> bool {
    use std::sync::atomic::Ordering;
    let waiters = store.waiters();
    if waiters.refreshing.swap(true, Ordering::AcqRel) {
        return false;
    }
    let store = store.clone();
    tokio::spawn(async move {
        let mut wakeups = store.checkpoint_wakeups();
        loop {
            match store.units(None).await {
                Ok(units) => {
                    store.waiters().view.send_replace(Arc::new(units));
                }
                Err(error) => tracing::debug!("refreshing checkpoints failed: {error}"),
            }
            wakeups.wait().await;
            let waiters = store.waiters();
            if waiters.view.receiver_count() == 0 {
                waiters.refreshing.store(false, Ordering::Release);
                // A waiter may have arrived between the check and the store.
                if waiters.view.receiver_count() == 0
                    || waiters.refreshing.swap(true, Ordering::AcqRel)
                {
                    return;
                }
            }
        }
    });
    true
}

/// A unit running in this process.
struct Running {
    lease: Lease,
    stop: CancellationToken,
    paused: watch::Sender<bool>,
}

enum Outcome {
    Committed,
    /// The claim is gone (another runner took over, or a reset): stop.
    Lost,
    /// Stopped on an error (policy `Stop`), or asked to stop.
    Stopped,
}

impl<S: ProjectionStore> ProjectionRunner<S> {
    /// A builder for a runner on `store`.
    pub fn builder(store: S) -> ProjectionRunnerBuilder<S> {
        ProjectionRunnerBuilder {
            store,
            node_id: None,
            lease_ttl: Duration::from_secs(5),
            heartbeat: Duration::from_secs(1),
            projections: Vec::new(),
        }
    }

    /// This runner's node id.
    pub fn node_id(&self) -> &str {
        &self.shared.node_id
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.shared.store
    }

    /// Runs the projections until `shutdown` is cancelled: registers them,
    /// claims this node's share of their units, and runs each owned unit (catch
    /// up in batches, then tail the log). On shutdown each unit finishes or
    /// abandons its current batch (an abandoned batch rolls back) and gives
    /// its lease back.
    ///
    /// Database outages are waited out with backoff; this only returns early
    /// when registration is refused.
    ///
    /// # Errors
    ///
    /// [`StoreError::Config`] when a projection is stored with another
    /// partition count.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), StoreError> {
        let shared = &self.shared;
        let mut backoff = Duration::from_millis(100);
        for registered in shared.projections.values() {
            loop {
                match shared
                    .store
                    .register_projection(&registered.name, registered.partitions)
                    .await
                {
                    Ok(()) => {
                        registered
                            .stored
                            .store(true, std::sync::atomic::Ordering::Release);
                        break;
                    }
                    Err(error @ StoreError::Config(_)) => return Err(error),
                    Err(error) => {
                        tracing::warn!(projection = %registered.name, "registering: {error}");
                        tokio::select! {
                            _ = shutdown.cancelled() => return Ok(()),
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
        let total_units: u32 = shared.projections.values().map(|r| r.partitions).sum();
        let mut tasks: JoinSet<UnitId> = JoinSet::new();
        let mut running: HashMap<UnitId, Running> = HashMap::new();
        let mut last_renewal = Instant::now();
        loop {
            while let Some(done) = tasks.try_join_next() {
                if let Ok(unit) = done {
                    running.remove(&unit);
                }
            }
            let live_nodes = match self.heartbeat(&mut running, &mut last_renewal).await {
                Ok(live) => live,
                Err(error) => {
                    tracing::warn!(node = %shared.node_id, "heartbeat failed: {error}");
                    if last_renewal.elapsed() > shared.lease_ttl {
                        // Our leases have run out: others may own the units now.
                        for unit in running.values() {
                            unit.stop.cancel();
                        }
                    }
                    None
                }
            };
            if let Some(live_nodes) = live_nodes {
                let share = total_units.div_ceil(live_nodes.max(1)) as usize;
                if running.len() < share {
                    if let Err(error) = self.claim_free_units(share, &mut running, &mut tasks).await
                    {
                        tracing::warn!(node = %shared.node_id, "claiming units failed: {error}");
                    }
                } else if running.len() > share {
                    // Give one unit back per round so newcomers get work.
                    if let Some(unit) = running.keys().max().cloned() {
                        if let Some(r) = running.get(&unit) {
                            tracing::info!(%unit, "handing over to spread the work");
                            r.stop.cancel();
                        }
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(shared.heartbeat) => {}
            }
        }
        for unit in running.values() {
            unit.stop.cancel();
        }
        while tasks.join_next().await.is_some() {}
        Ok(())
    }

    /// Renews leases; stops units whose claim is gone; forwards pause flags.
    async fn heartbeat(
        &self,
        running: &mut HashMap<UnitId, Running>,
        last_renewal: &mut Instant,
    ) -> Result<Option<u32>, StoreError> {
        let shared = &self.shared;
        let live = shared
            .store
            .node_heartbeat(&shared.node_id, shared.lease_ttl)
            .await?;
        let leases = shared
            .store
            .renew(&shared.node_id, shared.lease_ttl)
            .await?;
        *last_renewal = Instant::now();
        let held: HashMap<&UnitId, &Lease> = leases.iter().map(|l| (&l.unit, l)).collect();
        for (unit, r) in running.iter() {
            match held.get(unit) {
                Some(lease) if lease.epoch == r.lease.epoch => {
                    r.paused.send_if_modified(|p| {
                        let changed = *p != lease.paused;
                        *p = lease.paused;
                        changed
                    });
                }
                _ => {
                    tracing::info!(%unit, "claim lost");
                    r.stop.cancel();
                }
            }
        }
        Ok(Some(live))
    }

    async fn claim_free_units(
        &self,
        share: usize,
        running: &mut HashMap<UnitId, Running>,
        tasks: &mut JoinSet<UnitId>,
    ) -> Result<(), StoreError> {
        let shared = &self.shared;
        let mut candidates: Vec<_> = shared
            .store
            .units(None)
            .await?
            .into_iter()
            .filter(|u| {
                shared.projections.contains_key(&u.unit.projection)
                    && !running.contains_key(&u.unit)
                    && u.state != ProjectionState::Stopped
                    && (!u.lease_valid || u.owner.as_deref() == Some(&shared.node_id))
            })
            .map(|u| u.unit)
            .collect();
        // Runners starting together should not all race for the same unit.
        candidates.shuffle(&mut rand::rng());
        for unit in candidates {
            if running.len() >= share {
                break;
            }
            let Some(registered) = shared.projections.get(&unit.projection).cloned() else {
                continue;
            };
            let Some(lease) = shared
                .store
                .claim(&unit, &shared.node_id, shared.lease_ttl)
                .await?
            else {
                continue;
            };
            tracing::info!(%unit, epoch = lease.epoch, node = %shared.node_id, "claimed");
            let stop = CancellationToken::new();
            let (paused, paused_rx) = watch::channel(lease.paused);
            let worker = UnitWorker {
                shared: shared.clone(),
                registered,
                lease: lease.clone(),
                stop: stop.clone(),
                paused: paused_rx,
                state: None,
            };
            tasks.spawn(worker.run());
            running.insert(
                unit,
                Running {
                    lease,
                    stop,
                    paused,
                },
            );
        }
        Ok(())
    }

    /// The status of every unit of this runner's projections (all nodes').
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the store cannot be read.
    pub async fn status(&self) -> Result<Vec<ProjectionStatus>, StoreError> {
        let store = &self.shared.store;
        let head = store.head().await?;
        let mut statuses = Vec::new();
        let mut parked: HashMap<String, Vec<DeadLetter>> = HashMap::new();
        let mut oldest: Option<Option<OldestTransaction>> = None;
        for record in store.units(None).await? {
            let Some(registered) = self.shared.projections.get(&record.unit.projection) else {
                continue;
            };
            let filter = registered
                .filter
                .clone()
                .with_partition(record.unit.partition, record.partitions);
            let lag_events = store
                .count_events(&filter, record.checkpoint, head, 10_000_000)
                .await?;
            let lag = if lag_events == 0 {
                Duration::ZERO
            } else {
                store
                    .first_pending_recorded_at(&filter, record.checkpoint)
                    .await?
                    .and_then(|t| (Utc::now() - t).to_std().ok())
                    .unwrap_or_default()
            };
            if !parked.contains_key(&registered.name) {
                parked.insert(
                    registered.name.clone(),
                    store.dead_letters(&registered.name).await?,
                );
            }
            let parked_here = parked
                .get(&registered.name)
                .map_or(0, |d| d.iter().filter(|d| d.unit == record.unit).count());
            let held_back_by = if lag_events > 0 {
                if oldest.is_none() {
                    oldest = Some(store.oldest_open_transaction().await?);
                }
                oldest.clone().flatten()
            } else {
                None
            };
            let rebuild = record.rebuild_total.and_then(|total| {
                let progress = RebuildProgress {
                    done: record.processed.min(total),
                    total,
                };
                (!progress.is_complete() || lag_events > 0).then_some(progress)
            });
            statuses.push(ProjectionStatus {
                projection: record.unit.projection,
                partition: record.unit.partition,
                partitions: record.partitions,
                checkpoint: record.checkpoint,
                state: if record.paused {
                    ProjectionState::Paused
                } else {
                    record.state
                },
                owner: record.owner.filter(|_| record.lease_valid),
                paused: record.paused,
                lag_events,
                lag,
                parked: parked_here,
                last_error: record.last_error,
                processed: record.processed,
                rebuild,
                held_back_by,
            });
        }
        Ok(statuses)
    }

    /// Waits until the named projections have passed `target`; see [`wait_for`].
    ///
    /// # Errors
    ///
    /// As [`wait_for`].
    pub async fn wait_for(
        &self,
        target: Checkpoint,
        projections: &[&str],
        timeout: Duration,
    ) -> Result<(), WaitError> {
        // A runner may be waited on before `run` has registered its
        // projections (right after start-up): register those it knows.
        for name in projections {
            if let Some(registered) = self.shared.projections.get(*name) {
                if !registered.stored.load(std::sync::atomic::Ordering::Acquire) {
                    self.shared
                        .store
                        .register_projection(&registered.name, registered.partitions)
                        .await?;
                    registered
                        .stored
                        .store(true, std::sync::atomic::Ordering::Release);
                }
            }
        }
        wait_for(&self.shared.store, target, projections, timeout).await
    }

    fn registered(&self, name: &str) -> Result<&Arc<Registered<S>>, StoreError> {
        self.shared
            .projections
            .get(name)
            .ok_or_else(|| StoreError::Config(format!("no projection `{name}` in this runner")))
    }

    /// Rebuilds a projection: in one transaction, resets its checkpoints and
    /// calls its [`reset`](Projection::reset) hook; the runners owning it then
    /// replay the log from the start. Returns a channel of progress updates
    /// (events replayed of the total counted now), which ends when the replay
    /// has caught up.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the reset fails (nothing is changed then).
    pub async fn rebuild(
        &self,
        name: &str,
    ) -> Result<watch::Receiver<RebuildProgress>, StoreError> {
        let registered = self.registered(name)?.clone();
        let store = &self.shared.store;
        store
            .register_projection(&registered.name, registered.partitions)
            .await?;
        // Every committed event, including those a transaction still open
        // elsewhere keeps readers from (the head would leave them out).
        let end = Checkpoint::new(i64::MAX as u64, i64::MAX as u64);
        let total = store
            .count_events(&registered.filter, Checkpoint::START, end, i64::MAX as u64)
            .await?;
        let mut tx = store.begin().await?;
        store.reset_projection(&mut tx, name, total).await?;
        registered
            .projection
            .reset(&mut tx)
            .await
            .map_err(|e| StoreError::Config(format!("reset hook of `{name}` failed: {e}")))?;
        store.commit(tx).await?;
        store.signal_checkpoints();
        tracing::info!(projection = name, total, "rebuild started");
        let (sender, receiver) = watch::channel(RebuildProgress { done: 0, total });
        let store = store.clone();
        let name = name.to_owned();
        tokio::spawn(async move {
            let mut wakeups = store.checkpoint_wakeups();
            loop {
                tokio::select! {
                    _ = wakeups.wait() => {}
                    _ = sender.closed() => return,
                }
                let Ok(units) = store.units(Some(&name)).await else {
                    continue;
                };
                let done: u64 = units.iter().map(|u| u.processed).sum();
                let progress = RebuildProgress {
                    done: done.min(total),
                    total,
                };
                let _ = sender.send(progress);
                if progress.is_complete() {
                    return;
                }
            }
        });
        Ok(receiver)
    }

    /// Pauses a projection on every node (within one heartbeat).
    ///
    /// # Errors
    ///
    /// [`StoreError`].
    pub async fn pause(&self, name: &str) -> Result<(), StoreError> {
        self.registered(name)?;
        self.shared.store.set_paused(name, true).await
    }

    /// Resumes a paused projection.
    ///
    /// # Errors
    ///
    /// [`StoreError`].
    pub async fn resume(&self, name: &str) -> Result<(), StoreError> {
        self.registered(name)?;
        self.shared.store.set_paused(name, false).await
    }

    /// Lets a projection stopped on an error run again (after a fix).
    ///
    /// # Errors
    ///
    /// [`StoreError`].
    pub async fn restart(&self, name: &str) -> Result<(), StoreError> {
        self.registered(name)?;
        self.shared.store.restart_projection(name).await
    }

    /// The parked events of a projection.
    ///
    /// # Errors
    ///
    /// [`StoreError`].
    pub async fn dead_letters(&self, name: &str) -> Result<Vec<DeadLetter>, StoreError> {
        self.shared.store.dead_letters(name).await
    }

    /// Runs the projection's handler on one parked event again; on success
    /// the dead letter is removed in the same transaction as the handler's
    /// writes. Retried events are applied out of log order: the handler must
    /// tolerate that (most upserts do).
    ///
    /// # Errors
    ///
    /// [`RetryError::NotFound`], [`RetryError::Handler`] (the event stays
    /// parked, its attempt counted), [`RetryError::Store`].
    pub async fn retry_dead_letter(&self, name: &str, id: u64) -> Result<(), RetryError> {
        let registered = self.registered(name)?.clone();
        let store = &self.shared.store;
        let mut tx = store.begin().await?;
        let Some((dead_letter, event)) = store.take_dead_letter(&mut tx, id).await? else {
            return Err(RetryError::NotFound {
                projection: name.to_owned(),
                id,
            });
        };
        if dead_letter.unit.projection != name {
            return Err(RetryError::NotFound {
                projection: name.to_owned(),
                id,
            });
        }
        match registered.projection.handle(&[event], &mut tx).await {
            Ok(()) => {
                store.commit(tx).await?;
                Ok(())
            }
            Err(error) => {
                drop(tx);
                store.note_dead_letter_failure(id, &error.chain()).await?;
                Err(RetryError::Handler(error))
            }
        }
    }

    /// Retries every parked event of a projection, oldest first; returns how
    /// many succeeded and the failures.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when listing fails.
    pub async fn retry_dead_letters(
        &self,
        name: &str,
    ) -> Result<(usize, Vec<(u64, RetryError)>), StoreError> {
        let mut succeeded = 0;
        let mut failed = Vec::new();
        for dead_letter in self.dead_letters(name).await? {
            match self.retry_dead_letter(name, dead_letter.id).await {
                Ok(()) => succeeded += 1,
                Err(error) => failed.push((dead_letter.id, error)),
            }
        }
        Ok((succeeded, failed))
    }

    /// Drops a parked event without handling it.
    ///
    /// # Errors
    ///
    /// [`StoreError`].
    pub async fn discard_dead_letter(&self, id: u64) -> Result<bool, StoreError> {
        self.shared.store.discard_dead_letter(id).await
    }
}

/// Runs one owned unit until it is stopped, loses its claim or fails for good.
struct UnitWorker<S: ProjectionStore> {
    shared: Arc<Shared<S>>,
    registered: Arc<Registered<S>>,
    lease: Lease,
    stop: CancellationToken,
    paused: watch::Receiver<bool>,
    state: Option<(ProjectionState, Option<String>)>,
}

impl<S: ProjectionStore> UnitWorker<S> {
    async fn run(mut self) -> UnitId {
        let unit = self.lease.unit.clone();
        let span = tracing::info_span!("projection", projection = %unit.projection, partition = unit.partition);
        let lost = self.run_loop().instrument(span).await;
        if !lost {
            if let Err(error) = self
                .shared
                .store
                .release(&self.lease, &self.shared.node_id)
                .await
            {
                tracing::warn!(%unit, "releasing failed (the lease will expire): {error}");
            }
        }
        unit
    }

    /// Returns `true` when the claim was lost (nothing to release).
    async fn run_loop(&mut self) -> bool {
        let store = self.shared.store.clone();
        let filter = self
            .registered
            .filter
            .clone()
            .with_partition(self.lease.unit.partition, self.registered.partitions);
        let mut checkpoint = self.lease.checkpoint;
        let mut wakeups = store.wakeups();
        let mut failures = 0u32;
        let mut recheck: Option<Duration> = None;
        loop {
            if self.stop.is_cancelled() {
                return false;
            }
            if *self.paused.borrow() {
                self.set_state(ProjectionState::Paused, None).await;
                tokio::select! {
                    _ = self.stop.cancelled() => return false,
                    _ = self.paused.changed() => {}
                }
                continue;
            }
            let read = async {
                let head = store.head().await?;
                // One event more than a batch tells whether the batch's last
                // transaction continues past it.
                let events = store
                    .read_log(checkpoint, &filter, self.registered.batch_size + 1)
                    .await?;
                Ok::<_, StoreError>((head, events))
            };
            let (head, events) = match read.await {
                Ok(read) => {
                    failures = 0;
                    read
                }
                Err(error) => {
                    failures += 1;
                    self.set_state(ProjectionState::Retrying, Some(error.to_string()))
                        .await;
                    if !self
                        .sleep(self.registered.retry.backoff(failures.min(10)))
                        .await
                    {
                        return false;
                    }
                    continue;
                }
            };
            if events.is_empty() {
                if head > checkpoint {
                    // Nothing wanted up to the head: move past it, so that
                    // `wait_for` sees this projection reach positions it skips.
                    match self.commit(&[], head).await {
                        Ok(Outcome::Committed) => checkpoint = head,
                        Ok(Outcome::Lost) => return true,
                        Ok(Outcome::Stopped) => return false,
                        Err(_) => continue,
                    }
                }
                self.set_state(ProjectionState::Live, None).await;
                // A signal that found nothing new usually means the events are
                // held back by an older transaction still running: look again
                // soon (1, 2, 4 ms ...) rather than at the next poll.
                let recheck_in = recheck.unwrap_or(Duration::from_secs(3600));
                tokio::select! {
                    _ = self.stop.cancelled() => return false,
                    wake = wakeups.wait() => {
                        recheck = (wake == Wake::Signalled).then_some(Duration::from_millis(1));
                    }
                    _ = tokio::time::sleep(recheck_in), if recheck.is_some() => {
                        recheck = recheck
                            .map(|d| d * 2)
                            .filter(|d| *d < wakeups.poll_interval());
                    }
                    _ = self.paused.changed() => {}
                }
                continue;
            }
            recheck = None;
            let batch_size = self.registered.batch_size;
            let caught_up = events.len() <= batch_size;
            let mut events = events;
            if !caught_up {
                // Keep whole transactions together: a handler then always sees
                // all events of a command in one batch (unless one command
                // alone fills a batch).
                let next_tx = events[batch_size].transaction_id;
                events.truncate(batch_size);
                if events[batch_size - 1].transaction_id == next_tx {
                    let cut = events.partition_point(|e| e.transaction_id != next_tx);
                    if cut > 0 {
                        events.truncate(cut);
                    }
                }
            }
            let last = events.last().map_or(checkpoint, RecordedEvent::checkpoint);
            let target = if caught_up { last.max(head) } else { last };
            if !caught_up {
                self.set_state(ProjectionState::CatchingUp, None).await;
            }
            let batch = tracing::info_span!(
                "batch",
                events = events.len(),
                from = %checkpoint,
                to = %target
            );
            match self.process(&events, target, true).instrument(batch).await {
                Outcome::Committed => {
                    checkpoint = target;
                    // Positions between the head and the checkpoint: a cheap
                    // bound on the lag (`status` counts the wanted events).
                    metrics::gauge!(
                        "outflow_projection_lag_positions",
                        "projection" => self.registered.name.clone()
                    )
                    .set(head.position.saturating_sub(target.position) as f64);
                }
                Outcome::Lost => return true,
                Outcome::Stopped => return false,
            }
        }
    }

    /// Applies a batch with the retry policy; splits a failing batch to find
    /// the poison event, then parks it or stops.
    async fn process(
        &mut self,
        events: &[RecordedEvent],
        target: Checkpoint,
        split: bool,
    ) -> Outcome {
        let retry = self.registered.retry;
        let mut attempts = 0u32;
        let mut infrastructure_failures = 0u32;
        let mut first_failed = None;
        loop {
            let error = match self.commit(events, target).await {
                Ok(outcome) => return outcome,
                Err(error) => error,
            };
            if error.is_transient() {
                infrastructure_failures += 1;
                self.set_state(ProjectionState::Retrying, Some(error.chain()))
                    .await;
                if !self
                    .sleep(retry.backoff(infrastructure_failures.min(10)))
                    .await
                {
                    return Outcome::Stopped;
                }
                continue;
            }
            attempts += 1;
            first_failed.get_or_insert_with(Utc::now);
            tracing::warn!(
                attempts,
                events = events.len(),
                "batch failed: {}",
                error.chain()
            );
            if attempts < retry.max_attempts.max(1) {
                self.set_state(ProjectionState::Retrying, Some(error.chain()))
                    .await;
                if !self.sleep(retry.backoff(attempts)).await {
                    return Outcome::Stopped;
                }
                continue;
            }
            if split && events.len() > 1 {
                // Find the poison event: go one event at a time.
                for (i, event) in events.iter().enumerate() {
                    let single_target = if i + 1 == events.len() {
                        target
                    } else {
                        event.checkpoint()
                    };
                    let outcome =
                        Box::pin(self.process(std::slice::from_ref(event), single_target, false))
                            .await;
                    if !matches!(outcome, Outcome::Committed) {
                        return outcome;
                    }
                }
                return Outcome::Committed;
            }
            let Some(event) = events.first() else {
                return Outcome::Committed;
            };
            return match self.registered.on_error {
                OnError::Park => {
                    self.park(event, &error, attempts, first_failed, target)
                        .await
                }
                OnError::Stop => {
                    let message = format!("{}: {}", event.event_ref(), error.chain());
                    tracing::error!("stopping: {message}");
                    self.set_state(ProjectionState::Stopped, Some(message))
                        .await;
                    Outcome::Stopped
                }
            };
        }
    }

    /// One transaction: the checkpoint first (so a batch and a claim or reset
    /// of the unit never deadlock), then the handler's writes.
    async fn commit(
        &self,
        events: &[RecordedEvent],
        target: Checkpoint,
    ) -> Result<Outcome, HandlerError> {
        let store = &self.shared.store;
        let started = Instant::now();
        let mut tx = store.begin().await?;
        if !store
            .save_checkpoint(&mut tx, &self.lease, target, events.len() as u64)
            .await?
        {
            return Ok(Outcome::Lost);
        }
        if !events.is_empty() {
            self.registered.projection.handle(events, &mut tx).await?;
        }
        store.commit(tx).await?;
        store.signal_checkpoints();
        let name = self.registered.name.clone();
        if !events.is_empty() {
            metrics::counter!("outflow_projection_events_total", "projection" => name.clone())
                .increment(events.len() as u64);
            metrics::histogram!("outflow_projection_batch_seconds", "projection" => name.clone())
                .record(started.elapsed().as_secs_f64());
            tracing::debug!(events = events.len(), checkpoint = %target, "batch committed");
        }
        metrics::gauge!("outflow_projection_position", "projection" => name)
            .set(target.position as f64);
        Ok(Outcome::Committed)
    }

    async fn park(
        &mut self,
        event: &RecordedEvent,
        error: &HandlerError,
        attempts: u32,
        first_failed: Option<chrono::DateTime<Utc>>,
        target: Checkpoint,
    ) -> Outcome {
        let store = self.shared.store.clone();
        let mut failures = 0;
        loop {
            let attempt = async {
                let mut tx = store.begin().await?;
                if !store
                    .save_checkpoint(&mut tx, &self.lease, target, 1)
                    .await?
                {
                    return Ok(Outcome::Lost);
                }
                store
                    .park(
                        &mut tx,
                        NewDeadLetter {
                            unit: &self.lease.unit,
                            event,
                            error: error.chain(),
                            attempts,
                            first_failed_at: first_failed.unwrap_or_else(Utc::now),
                        },
                    )
                    .await?;
                store.commit(tx).await?;
                Ok::<_, StoreError>(Outcome::Committed)
            };
            match attempt.await {
                Ok(outcome) => {
                    if matches!(outcome, Outcome::Committed) {
                        tracing::warn!(event = %event.event_ref(), "parked: {}", error.chain());
                        metrics::counter!("outflow_projection_parked_total", "projection" => self.registered.name.clone()).increment(1);
                        store.signal_checkpoints();
                    }
                    return outcome;
                }
                Err(store_error) => {
                    failures += 1;
                    self.set_state(ProjectionState::Retrying, Some(store_error.to_string()))
                        .await;
                    if !self.sleep(self.registered.retry.backoff(failures)).await {
                        return Outcome::Stopped;
                    }
                }
            }
        }
    }

    async fn set_state(&mut self, state: ProjectionState, error: Option<String>) {
        let next = (state, error);
        if self.state.as_ref() == Some(&next) {
            return;
        }
        match self
            .shared
            .store
            .set_state(&self.lease, next.0, next.1.as_deref())
            .await
        {
            Ok(()) => self.state = Some(next),
            Err(e) => tracing::debug!("recording state failed: {e}"),
        }
    }

    /// Sleeps unless stopped first; `false` when stopped.
    async fn sleep(&self, duration: Duration) -> bool {
        tokio::select! {
            _ = self.stop.cancelled() => false,
            _ = tokio::time::sleep(duration) => true,
        }
    }
}
