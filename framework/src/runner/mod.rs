//! The projection runner: runs projections against the global log, on one or
//! many nodes.
//!
//! Each projection partition (a *unit*) is owned by one runner at a time,
//! through a lease in the store that the owner renews; a runner that stops
//! renewing (crash, lost connection) loses the unit to another runner after
//! the lease's time to live. Every batch writes the read model and the new
//! checkpoint in one transaction, and the checkpoint write only succeeds while
//! the runner's claim (its *epoch*) is current and the checkpoint is still
//! where the batch started; so a same-database read model sees every event
//! exactly once, whoever runs it and however often runners or connections
//! die. Runners share the units fairly: every live runner gets
//! `units / runners` units or one more, so a runner that joins later gets work.
//!
//! The log may come from another backend than the one the read models and
//! checkpoints live in ([`ProjectionRunner::with_log`]).
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{ConfigError, StoreError};
use crate::lease::check_timing;
use crate::port::log::{EventLog, LogFilter};
use crate::port::projections::ProjectionStore;
use crate::projection::{OnError, Projection, ProjectionOptions, RetryPolicy};

mod admin;
mod gauges;
mod node;
mod requests;
mod status;
mod wait;
mod worker;

pub use admin::STATUS_PATIENCE;
pub use status::{ProjectionStatus, RebuildProgress, RetryError};
pub use wait::{wait_for, WaitError};

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

impl<S: ProjectionStore> std::fmt::Debug for ProjectionRunner<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<_> = self.shared.projections.keys().collect();
        names.sort();
        f.debug_struct("ProjectionRunner")
            .field("node_id", &self.shared.node_id)
            .field("projections", &names)
            .field("lease_ttl", &self.shared.lease_ttl)
            .field("heartbeat", &self.shared.heartbeat)
            .finish()
    }
}

/// The most partitions a projection may have.
const MAX_PARTITIONS: u32 = 1024;

struct Shared<S: ProjectionStore> {
    store: S,
    log: Arc<dyn EventLog>,
    node_id: String,
    lease_ttl: Duration,
    heartbeat: Duration,
    /// How long a shutdown lets owned units catch up first (see
    /// [`ProjectionRunnerBuilder::drain_on_shutdown`]).
    drain: Option<Duration>,
    /// How often the status gauges are exported (zero: never).
    status_metrics: Duration,
    projections: HashMap<String, Arc<Registered<S>>>,
    /// Renamed event types, applied to every event read.
    aliases: crate::upcast::EventAliases,
    /// The checkpoints as last read, shared by this runner's `wait_for` callers.
    view: wait::SharedView,
    /// Wakes the node loop for a heartbeat now (after a reset or restart
    /// made here), instead of at the next interval.
    poke: tokio::sync::Notify,
    /// Timer schedulers run on this node, under its id and lease timing.
    schedulers: Vec<Arc<dyn Leader>>,
}

/// A single-leader loop a runner hosts (a timer scheduler).
#[async_trait::async_trait]
pub(crate) trait Leader: Send + Sync {
    /// Runs under `node_id` with the runner's lease timing until `shutdown`.
    async fn run_as(
        &self,
        node_id: &str,
        lease_ttl: Duration,
        heartbeat: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Result<(), StoreError>;
}

struct Registered<S: ProjectionStore> {
    /// Whether this runner has registered the projection in the store.
    stored: AtomicBool,
    name: String,
    projection: Arc<dyn Projection<S>>,
    filter: LogFilter,
    partitions: u32,
    batch_size: usize,
    retry: RetryPolicy,
    on_error: OnError,
}

impl<S: ProjectionStore> Registered<S> {
    /// The filter of one partition.
    fn filter_for(&self, partition: u32, partitions: u32) -> LogFilter {
        self.filter.clone().with_partition(partition, partitions)
    }
}

/// Builds a [`ProjectionRunner`].
#[must_use]
pub struct ProjectionRunnerBuilder<S: ProjectionStore> {
    store: S,
    log: Arc<dyn EventLog>,
    node_id: Option<String>,
    lease_ttl: Duration,
    heartbeat: Duration,
    drain: Option<Duration>,
    status_metrics: Duration,
    projections: Vec<ProjectionOptions<S>>,
    aliases: crate::upcast::EventAliases,
    schedulers: Vec<Arc<dyn Leader>>,
}

impl<S: ProjectionStore> std::fmt::Debug for ProjectionRunnerBuilder<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectionRunnerBuilder")
            .field("node_id", &self.node_id)
            .field("lease_ttl", &self.lease_ttl)
            .field("heartbeat", &self.heartbeat)
            .field(
                "projections",
                &self
                    .projections
                    .iter()
                    .map(|p| p.name())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl<S: ProjectionStore> ProjectionRunnerBuilder<S> {
    /// A name for this runner, unique among the runners sharing the store
    /// (default: a random one). A restarted process may reuse its id: its
    /// units are then taken back at once, under a new epoch when the old
    /// lease had run out.
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

    /// On shutdown, lets every unit this node owns catch up to the head
    /// first, for at most `bound`: leases are still renewed meanwhile, no
    /// unit is claimed, and each unit stops (and gives its lease back) as
    /// soon as it has read to the head and handled everything; after
    /// `bound` the rest stop as without this option. Use it for rolling
    /// deploys where the next node should find nothing left to do; keep
    /// `bound` under the deploy tool's grace period. Default: off — a unit
    /// finishes the batch it is committing and stops.
    pub fn drain_on_shutdown(mut self, bound: Duration) -> Self {
        self.drain = Some(bound);
        self
    }

    /// How often this node reads the status and sets the status gauges
    /// (`outflow_projection_lag_events`, `outflow_projection_lag_seconds`,
    /// `outflow_projection_dead_letters`,
    /// `outflow_projection_rebuild_progress`; see [`crate::telemetry`]) for
    /// the units it holds (default 15 s; `Duration::ZERO` turns them off).
    /// Each reading counts the lag as [`status`](ProjectionRunner::status)
    /// does, apart from the heartbeat.
    pub fn status_metrics_every(mut self, interval: Duration) -> Self {
        self.status_metrics = interval;
        self
    }

    /// Renamed event types (see [`EventAliases`](crate::upcast::EventAliases)):
    /// every projection reads events stored under an old name under the new
    /// one, and a filter naming the new one also reads the old.
    pub fn event_aliases(mut self, aliases: crate::upcast::EventAliases) -> Self {
        self.aliases = aliases;
        self
    }

    /// Adds a projection.
    pub fn projection(mut self, options: ProjectionOptions<S>) -> Self {
        self.projections.push(options);
        self
    }

    /// Runs a [timer scheduler](crate::timer::Scheduler) on this node, with
    /// the runner's lease time to live and heartbeat, its lease held as
    /// `<node id>:timers`: the node
    /// holding the timers' lease fires them; when it dies, another node's
    /// runner takes the lease within the failover time, as it takes the
    /// node's projection units.
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    pub fn scheduler<T: crate::timer::TimerStore>(
        mut self,
        scheduler: crate::timer::Scheduler<T>,
    ) -> Self {
        self.schedulers.push(Arc::new(scheduler));
        self
    }

    /// The runner.
    ///
    /// # Errors
    ///
    /// [`StoreError::Config`] for an empty or duplicate projection name, more
    /// than 1024 partitions, or a heartbeat not shorter than the lease.
    pub fn build(self) -> Result<ProjectionRunner<S>, StoreError> {
        check_timing("heartbeat interval", self.heartbeat, self.lease_ttl)?;
        let mut projections = HashMap::new();
        for options in self.projections {
            let name = options.projection.name().to_owned();
            if name.is_empty() {
                return Err(ConfigError::EmptyName("a projection").into());
            }
            // A log ordered per partition is read one partition per unit.
            let log_partitions = self.log.partitions();
            let partitions = match (log_partitions, options.partitions) {
                (1, n) => n,
                (n, 1) => n,
                (n, m) if n == m => n,
                (n, m) => {
                    return Err(ConfigError::Invalid {
                        setting: "partitions",
                        reason: format!(
                            "`{name}` asks for {m} partitions, but its log is ordered in {n} \
                             partitions, each read by one unit: use {n} (or leave the default)"
                        ),
                    }
                    .into())
                }
            };
            if partitions > MAX_PARTITIONS {
                return Err(ConfigError::Invalid {
                    setting: "partitions",
                    reason: format!(
                        "`{name}` asks for {partitions} partitions; at most {MAX_PARTITIONS}"
                    ),
                }
                .into());
            }
            let registered = Registered {
                stored: AtomicBool::new(false),
                filter: self.aliases.widen(options.projection.filter()),
                name: name.clone(),
                projection: options.projection,
                partitions,
                batch_size: options.batch_size,
                retry: options.retry,
                on_error: options.on_error,
            };
            if projections
                .insert(name.clone(), Arc::new(registered))
                .is_some()
            {
                return Err(ConfigError::DuplicateName(name).into());
            }
        }
        Ok(ProjectionRunner {
            shared: Arc::new(Shared {
                store: self.store,
                log: self.log,
                node_id: self
                    .node_id
                    .unwrap_or_else(|| format!("node-{}", uuid::Uuid::new_v4().simple())),
                lease_ttl: self.lease_ttl,
                heartbeat: self.heartbeat,
                drain: self.drain,
                status_metrics: self.status_metrics,
                projections,
                aliases: self.aliases,
                view: wait::SharedView::default(),
                poke: tokio::sync::Notify::new(),
                schedulers: self.schedulers,
            }),
        })
    }
}

impl<S: ProjectionStore> ProjectionRunner<S> {
    /// A builder for a runner whose events, read models and checkpoints all
    /// live in `store`.
    pub fn builder(store: S) -> ProjectionRunnerBuilder<S>
    where
        S: EventLog,
    {
        let log: Arc<dyn EventLog> = Arc::new(store.clone());
        Self::with_log(log, store)
    }

    /// A builder for a runner that reads the events from `log` and commits
    /// read models and checkpoints in `store`, another backend: each batch's
    /// read-model writes and its checkpoint still commit together in
    /// `store`, so the exactly-once effect holds across the two.
    pub fn with_log(log: Arc<dyn EventLog>, store: S) -> ProjectionRunnerBuilder<S> {
        ProjectionRunnerBuilder {
            store,
            log,
            node_id: None,
            aliases: crate::upcast::EventAliases::new(),
            lease_ttl: Duration::from_secs(5),
            heartbeat: Duration::from_secs(1),
            drain: None,
            status_metrics: Duration::from_secs(15),
            projections: Vec::new(),
            schedulers: Vec::new(),
        }
    }

    /// This runner's node id.
    pub fn node_id(&self) -> &str {
        &self.shared.node_id
    }

    /// How long a lease of this runner lives without a renewal (see
    /// [`ProjectionRunnerBuilder::lease_ttl`]; 5 s by default).
    ///
    /// ```
    /// use outflow::runner::ProjectionRunner;
    /// use outflow::MemoryStore;
    /// use std::time::Duration;
    ///
    /// let runner = ProjectionRunner::builder(MemoryStore::new()).build()?;
    /// assert_eq!(runner.lease_ttl(), Duration::from_secs(5));
    /// assert_eq!(runner.heartbeat_interval(), Duration::from_secs(1));
    /// # Ok::<(), outflow::StoreError>(())
    /// ```
    pub fn lease_ttl(&self) -> Duration {
        self.shared.lease_ttl
    }

    /// How often this runner renews its leases and claims its share (see
    /// [`ProjectionRunnerBuilder::heartbeat_interval`]; 1 s by default).
    pub fn heartbeat_interval(&self) -> Duration {
        self.shared.heartbeat
    }

    /// The store read models and checkpoints live in.
    pub fn store(&self) -> &S {
        &self.shared.store
    }

    /// The log the events are read from.
    pub fn log(&self) -> &Arc<dyn EventLog> {
        &self.shared.log
    }

    /// Registers a projection in the store unless this runner did already.
    async fn ensure_registered(&self, registered: &Registered<S>) -> Result<(), StoreError> {
        if !registered.stored.load(Ordering::Acquire) {
            self.shared
                .store
                .register_projection(&registered.name, registered.partitions)
                .await?;
            registered.stored.store(true, Ordering::Release);
        }
        Ok(())
    }

    fn registered(&self, name: &str) -> Result<&Arc<Registered<S>>, StoreError> {
        self.shared
            .projections
            .get(name)
            .ok_or_else(|| ConfigError::UnknownProjection(name.to_owned()).into())
    }
}
