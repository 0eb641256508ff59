//! The node loop: registers the projections, keeps this node's leases alive,
//! takes its fair share of the units and gives back what exceeds it.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use rand::seq::SliceRandom;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::worker::UnitWorker;
use super::{ProjectionRunner, Registered};
use std::time::Duration;

use crate::backoff::Backoff;
use crate::error::{ConfigError, ErrorKind, HandlerError, StoreError};
use crate::lease::{balance, register, Balance, Holder, Renewed};
use crate::port::log::{holding_back, LogFilter};
use crate::port::projections::{Lease, ProjectionState, ProjectionStore, UnitId};

/// A unit running in this process.
struct Running {
    lease: Lease,
    stop: CancellationToken,
    paused: watch::Sender<bool>,
}

impl<S: ProjectionStore> ProjectionRunner<S> {
    /// Runs the projections until `shutdown` is cancelled: registers them,
    /// claims this node's share of their units, and runs each owned unit
    /// (catch up in batches, then tail the log). On shutdown each unit
    /// finishes or abandons its current batch (an abandoned batch rolls
    /// back) and gives its lease back — after catching up to the head, for
    /// a bounded time, with
    /// [`drain_on_shutdown`](super::ProjectionRunnerBuilder::drain_on_shutdown)
    /// — and the node deregisters, so other nodes take the units at their
    /// next heartbeat.
    ///
    /// Database outages are waited out with backoff; this only returns early
    /// when the configuration is refused, and then also logs the error at
    /// `ERROR` level. Keep the join handle of the task running it and await
    /// it (or watch [`status`](Self::status)): a service that drops it would
    /// not see that error otherwise.
    ///
    /// # Errors
    ///
    /// [`StoreError::Config`] at once when a projection is stored with
    /// another partition count, Outflow's tables are missing
    /// ([`ConfigError::MissingTable`]) or a setup hook fails
    /// ([`ConfigError::SetupHook`]); other errors the backend blames on the
    /// infrastructure while registering after about ten attempts.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), StoreError> {
        let gauges_stop = CancellationToken::new();
        // The schedulers stop with the node, whether it was asked to or not.
        let leaders_stop = shutdown.child_token();
        let node = async {
            let result = self.run_node(shutdown).await;
            gauges_stop.cancel();
            leaders_stop.cancel();
            result
        };
        let shared = &self.shared;
        let leaders = futures::future::join_all(shared.schedulers.iter().map(|leader| async {
            let result = leader
                .run_as(
                    &shared.node_id,
                    shared.lease_ttl,
                    shared.heartbeat,
                    leaders_stop.clone(),
                )
                .await;
            // Said at once: the node keeps running its projections, but no
            // timer fires until the cause is fixed and the node restarted.
            if let Err(error) = &result {
                tracing::error!(node = %shared.node_id, error = %crate::error::error_chain(error), "a timer scheduler of this node stopped");
            }
            result
        }));
        let (result, (), led) =
            tokio::join!(node, self.export_status_gauges(&gauges_stop), leaders);
        let result = result.and(led.into_iter().collect::<Result<Vec<()>, _>>().map(drop));
        if let Err(error) = &result {
            tracing::error!(node = %self.shared.node_id, error = %crate::error::error_chain(error), "projection runner stopped");
        }
        result
    }

    async fn run_node(&self, shutdown: CancellationToken) -> Result<(), StoreError> {
        let shared = &self.shared;
        for registered in shared.projections.values() {
            if registered.stored.load(Ordering::Acquire) {
                continue;
            }
            if !register(
                &shared.store,
                &registered.name,
                registered.partitions,
                &shutdown,
            )
            .await?
            {
                return Ok(());
            }
            registered.stored.store(true, Ordering::Release);
        }
        for registered in shared.projections.values() {
            if !self.setup_with_retries(registered, &shutdown).await? {
                return Ok(());
            }
        }
        let total_units: u32 = shared.projections.values().map(|r| r.partitions).sum();
        // A node is alive while it beats: three missed heartbeats, not a
        // whole lease, and a clean stop deregisters it at once.
        let mut holder = Holder::new(shared.node_id.clone(), shared.lease_ttl)
            .with_liveness(shared.heartbeat * 3);
        let mut tasks: JoinSet<UnitId> = JoinSet::new();
        let mut running: HashMap<UnitId, Running> = HashMap::new();
        let mut warned_about = None;
        let serving = super::requests::Serving::default();
        // Cancelled at shutdown when draining: units stop once caught up.
        let draining = CancellationToken::new();
        loop {
            while let Some(done) = tasks.try_join_next() {
                if let Ok(unit) = done {
                    running.remove(&unit);
                }
            }
            match self.heartbeat(&mut holder, &mut running).await {
                Ok(live) => {
                    if !running.is_empty() {
                        self.watch_held_back(&mut warned_about).await;
                    }
                    if let Err(error) = self
                        .rebalance(
                            &holder,
                            total_units as usize,
                            &live,
                            &mut running,
                            &mut tasks,
                            &draining,
                        )
                        .await
                    {
                        tracing::warn!(node = %shared.node_id, error = %crate::error::error_chain(&error), "claiming units failed");
                    }
                    let held = running.keys().cloned().collect();
                    self.serve_requests(&held, &serving).await;
                }
                Err(error) => {
                    tracing::warn!(node = %shared.node_id, error = %crate::error::error_chain(&error), "heartbeat failed");
                    if holder.expired() {
                        // Our leases have run out: others may own the units now.
                        for unit in running.values() {
                            unit.stop.cancel();
                        }
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(shared.heartbeat) => {}
                // A rebuild or restart made here: hand the units over now.
                _ = shared.poke.notified() => {}
                // A unit ended (its claim lost, or stopped on an error):
                // look at once whether to claim it or another.
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Ok(unit) = done {
                        running.remove(&unit);
                    }
                }
            }
        }
        if let Some(bound) = shared.drain {
            self.drain(bound, &draining, &mut holder, &mut running, &mut tasks)
                .await;
        }
        for unit in running.values() {
            unit.stop.cancel();
        }
        while tasks.join_next().await.is_some() {}
        // The workers released their leases; free any left and stop
        // counting as alive, so the remaining nodes (or this service
        // restarted) take the units at their next heartbeat.
        if let Err(error) = holder.deregister(&shared.store).await {
            tracing::warn!(node = %shared.node_id, error = %crate::error::error_chain(&error), "deregistering the node failed (its leases will expire)");
        }
        Ok(())
    }

    /// Lets the owned units catch up before they stop, for at most `bound`:
    /// heartbeats go on (leases stay renewed), nothing new is claimed.
    async fn drain(
        &self,
        bound: Duration,
        draining: &CancellationToken,
        holder: &mut Holder,
        running: &mut HashMap<UnitId, Running>,
        tasks: &mut JoinSet<UnitId>,
    ) {
        let shared = &self.shared;
        draining.cancel();
        let deadline = tokio::time::Instant::now() + bound;
        tracing::info!(node = %shared.node_id, units = running.len(), ?bound, "draining before the shutdown");
        loop {
            while let Some(done) = tasks.try_join_next() {
                if let Ok(unit) = done {
                    running.remove(&unit);
                }
            }
            if running.is_empty() {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::info!(node = %shared.node_id, units = running.len(), "drain bound reached; stopping the rest");
                return;
            }
            if let Err(error) = self.heartbeat(holder, running).await {
                tracing::warn!(node = %shared.node_id, error = %crate::error::error_chain(&error), "heartbeat failed");
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + shared.heartbeat)) => {}
                Some(done) = tasks.join_next() => {
                    if let Ok(unit) = done {
                        running.remove(&unit);
                    }
                }
            }
        }
    }

    /// Runs a projection's setup hook in a transaction of its own, retrying
    /// transient failures; `false` when shut down first.
    async fn setup_with_retries(
        &self,
        registered: &Registered<S>,
        shutdown: &CancellationToken,
    ) -> Result<bool, StoreError> {
        let store = &self.shared.store;
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let attempt = async {
                let mut tx = store.begin().await?;
                registered.projection.setup(&mut tx).await?;
                store.commit(tx).await?;
                Ok::<_, HandlerError>(())
            };
            let Err(error) = attempt.await else {
                return Ok(true);
            };
            let kind = error.kind_with(|e| store.classify(e));
            tracing::warn!(projection = %registered.name, kind = %kind, error = %error.chain(), "the setup hook failed");
            if kind != ErrorKind::Transient {
                return Err(ConfigError::SetupHook {
                    name: registered.name.clone(),
                    error,
                }
                .into());
            }
            if !backoff.wait(shutdown).await {
                return Ok(false);
            }
        }
    }

    /// Whether committed events wait behind an open transaction: sets the
    /// `outflow_log_held_back_seconds` gauge to its age (0 when none) and
    /// warns once per holding transaction.
    async fn watch_held_back(&self, warned_about: &mut Option<i32>) {
        let log = &self.shared.log;
        if log.partitions() > 1 {
            // A partitioned log has no transactions that hold readers back.
            return;
        }
        let holder = async {
            let head = log.head().await?;
            holding_back(log.as_ref(), &LogFilter::all(), head).await
        };
        match holder.await {
            Ok(Some(holder)) => {
                metrics::gauge!("outflow_log_held_back_seconds").set(holder.age.as_secs_f64());
                if *warned_about != Some(holder.pid) && holder.age >= self.shared.heartbeat {
                    tracing::warn!(
                        pid = holder.pid,
                        age = ?holder.age,
                        state = holder.state.as_deref().unwrap_or(""),
                        query = holder.query.as_deref().unwrap_or(""),
                        "committed events wait behind an open transaction; every log reader is held back until it ends"
                    );
                    *warned_about = Some(holder.pid);
                }
            }
            Ok(None) => {
                metrics::gauge!("outflow_log_held_back_seconds").set(0.0);
                *warned_about = None;
            }
            Err(error) => {
                tracing::debug!(error = %crate::error::error_chain(&error), "checking for held-back events failed");
            }
        }
    }

    /// Renews leases; stops units whose claim is gone; forwards pause flags.
    /// Returns the live nodes.
    async fn heartbeat(
        &self,
        holder: &mut Holder,
        running: &mut HashMap<UnitId, Running>,
    ) -> Result<Vec<String>, StoreError> {
        let store = &self.shared.store;
        let live = holder.heartbeat(store).await?;
        let (renewed, strays) = holder
            .renew(store, running.values().map(|r| &r.lease))
            .await?;
        for unit in strays {
            // Never keep alive a lease this node does not work under its
            // epoch: an operator reset the unit from elsewhere, or it is
            // left from before a restart. Give it up so anyone may claim it.
            tracing::info!(%unit, "giving up a lease this node does not work");
            if let Err(error) = holder.give_up(store, &unit).await {
                tracing::warn!(%unit, error = %crate::error::error_chain(&error), "giving up a lease failed");
            }
        }
        for (unit, outcome) in renewed {
            let Some(r) = running.get(unit) else { continue };
            match outcome {
                Renewed::Held(lease) => {
                    r.paused.send_if_modified(|p| {
                        let changed = *p != lease.paused;
                        *p = lease.paused;
                        changed
                    });
                }
                Renewed::Lost => {
                    tracing::info!(%unit, "claim lost");
                    r.stop.cancel();
                }
            }
        }
        Ok(live)
    }

    /// Applies the fair-share rule: claims free units, or gives one back.
    async fn rebalance(
        &self,
        holder: &Holder,
        total_units: usize,
        live: &[String],
        running: &mut HashMap<UnitId, Running>,
        tasks: &mut JoinSet<UnitId>,
        draining: &CancellationToken,
    ) -> Result<(), StoreError> {
        let shared = &self.shared;
        let units = shared.store.units(None).await?;
        let mut owned: HashMap<String, usize> = HashMap::new();
        for unit in units
            .iter()
            .filter(|u| shared.projections.contains_key(&u.unit.projection) && u.lease_valid)
        {
            if let Some(owner) = &unit.owner {
                *owned.entry(owner.clone()).or_default() += 1;
            }
        }
        // What this node runs counts, whatever the last renewal recorded.
        owned.insert(holder.node().to_owned(), running.len());
        match balance(total_units, live, &owned, holder.node()) {
            Balance::ClaimUpTo(share) if running.len() < share => {
                self.claim_free_units(holder, share, units, running, tasks, draining)
                    .await
            }
            Balance::GiveOneBack => {
                // Give one unit back per round so newcomers get work.
                if let Some(unit) = running.keys().max().cloned() {
                    if let Some(r) = running.get(&unit) {
                        tracing::info!(%unit, "handing over to spread the work");
                        r.stop.cancel();
                    }
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    async fn claim_free_units(
        &self,
        holder: &Holder,
        share: usize,
        units: Vec<crate::port::projections::UnitRecord>,
        running: &mut HashMap<UnitId, Running>,
        tasks: &mut JoinSet<UnitId>,
        draining: &CancellationToken,
    ) -> Result<(), StoreError> {
        let shared = &self.shared;
        let mut candidates: Vec<_> = units
            .into_iter()
            .filter(|u| {
                shared.projections.contains_key(&u.unit.projection)
                    && !running.contains_key(&u.unit)
                    && u.state != ProjectionState::Stopped
                    && (!u.lease_valid || u.owner.as_deref() == Some(holder.node()))
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
            let Some(lease) = holder.claim(&shared.store, &unit).await? else {
                continue;
            };
            tracing::info!(%unit, epoch = lease.epoch, node = %shared.node_id, "claimed");
            let stop = CancellationToken::new();
            let (paused, paused_rx) = watch::channel(lease.paused);
            let worker = UnitWorker::new(
                shared.clone(),
                registered,
                lease.clone(),
                stop.clone(),
                draining.clone(),
                paused_rx,
            );
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
}
