//! Operating projections: status, rebuilds, pause and restart, dead letters.

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::watch;

use super::status::{ProjectionStatus, RebuildProgress, RetryError};
use super::ProjectionRunner;
use crate::error::{ConfigError, StoreError};
use crate::event::Checkpoint;
use crate::port::log::{holding_back, read_event, END};
use crate::port::projections::{DeadLetter, ProjectionState, ProjectionStore};

/// How long [`ProjectionRunner::status`] waits for a backend that may be
/// down: the projection store's units, and the log's first answer.
pub const STATUS_PATIENCE: Duration = Duration::from_secs(1);

/// How long counting one unit's lag may take once the log has answered
/// (a lag of millions of events takes a while to count).
const COUNTING_PATIENCE: Duration = Duration::from_secs(10);

/// `work` within [`STATUS_PATIENCE`].
async fn patiently<T>(
    operation: &'static str,
    work: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    within(STATUS_PATIENCE, operation, work).await
}

/// `work`, or [`StoreError::Unavailable`] when it takes longer than
/// `patience`.
async fn within<T>(
    patience: Duration,
    operation: &'static str,
    work: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(patience, work).await {
        Ok(result) => result,
        Err(_) => Err(StoreError::Unavailable {
            operation,
            source: format!("no answer within {patience:?}").into(),
        }),
    }
}

impl<S: ProjectionStore> ProjectionRunner<S> {
    /// Registers every projection (so [`status`](Self::status) lists it)
    /// and runs its [`setup`](crate::projection::Projection::setup) hook
    /// now, in a transaction of its own, so its tables exist before anything
    /// reads them — call it before serving queries. The runner does both
    /// again when it starts; they are idempotent.
    ///
    /// # Errors
    ///
    /// [`ConfigError::SetupHook`] naming the projection whose hook failed;
    /// [`StoreError`] when a transaction cannot begin or commit.
    pub async fn setup(&self) -> Result<(), StoreError> {
        let store = &self.shared.store;
        let mut names: Vec<&String> = self.shared.projections.keys().collect();
        names.sort();
        for name in names {
            let registered = &self.shared.projections[name];
            store
                .register_projection(&registered.name, registered.partitions)
                .await?;
            let mut tx = store.begin().await?;
            if let Err(error) = registered.projection.setup(&mut tx).await {
                drop(tx);
                return Err(ConfigError::SetupHook {
                    name: name.clone(),
                    error,
                }
                .into());
            }
            store.commit(tx).await?;
        }
        Ok(())
    }

    /// The status of every unit of this runner's projections (all nodes').
    ///
    /// Answers within about a second while a backend is down: the units
    /// come from the projection store, and the lag from the log; a log that
    /// does not answer within [`STATUS_PATIENCE`] (or fails) leaves the lag
    /// at zero and says why in each unit's
    /// [`log_error`](ProjectionStatus::log_error), and no further part of
    /// the status waits for it.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the projection store cannot be read (within
    /// [`STATUS_PATIENCE`]: [`StoreError::Unavailable`] then).
    pub async fn status(&self) -> Result<Vec<ProjectionStatus>, StoreError> {
        let store = &self.shared.store;
        let log = &self.shared.log;
        let records = patiently("read the projections' units", store.units(None)).await?;
        // The first question to the log shows whether it answers; once it
        // has, the rest (counting a long lag may take a while) gets longer.
        let mut log_answered = false;
        let mut log_error: Option<String> = None;
        // A log ordered per partition has no single head, and no open
        // transaction holds its readers back.
        let head = if log.partitions() == 1 {
            match patiently("read the log's head", log.head()).await {
                Ok(head) => {
                    log_answered = true;
                    Some(head)
                }
                Err(error) => {
                    log_error = Some(crate::error::error_chain(&error));
                    None
                }
            }
        } else {
            None
        };
        let mut statuses = Vec::new();
        let mut parked: HashMap<String, Vec<DeadLetter>> = HashMap::new();
        for record in records {
            let Some(registered) = self.shared.projections.get(&record.unit.projection) else {
                continue;
            };
            let filter = registered.filter_for(record.unit.partition, record.partitions);
            let lag_of = async {
                // Every committed event counts, also those an open
                // transaction still hides from the log readers (the head
                // leaves them out).
                let lag_events = log
                    .count_events(&filter, record.checkpoint, END, 10_000_000)
                    .await?;
                let lag = if lag_events == 0 {
                    Duration::ZERO
                } else {
                    log.first_pending_recorded_at(&filter, record.checkpoint)
                        .await?
                        .and_then(|t| (Utc::now() - t).to_std().ok())
                        .unwrap_or_default()
                };
                let held_back_by = match head {
                    Some(head) if lag_events > 0 => {
                        holding_back(log.as_ref(), &filter, head.max(record.checkpoint)).await?
                    }
                    _ => None,
                };
                Ok::<_, StoreError>((lag_events, lag, held_back_by))
            };
            let (lag_events, lag, held_back_by) = if log_error.is_some() {
                (0, Duration::ZERO, None)
            } else {
                let patience = if log_answered {
                    COUNTING_PATIENCE
                } else {
                    STATUS_PATIENCE
                };
                match within(patience, "count a projection's lag", lag_of).await {
                    Ok(lag) => {
                        log_answered = true;
                        lag
                    }
                    Err(error) => {
                        log_error = Some(crate::error::error_chain(&error));
                        (0, Duration::ZERO, None)
                    }
                }
            };
            if !parked.contains_key(&registered.name) {
                parked.insert(
                    registered.name.clone(),
                    patiently(
                        "read the parked events",
                        store.dead_letters(&registered.name),
                    )
                    .await?,
                );
            }
            let parked_here = parked
                .get(&registered.name)
                .map_or(0, |d| d.iter().filter(|d| d.unit == record.unit).count());
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
                } else if record.state == ProjectionState::Live && lag_events > 0 {
                    // `live` means caught up: a unit busy with a batch (a
                    // slow `effects`, say) while events wait is catching up.
                    ProjectionState::CatchingUp
                } else {
                    record.state
                },
                owner: record.owner.filter(|_| record.lease_valid),
                epoch: record.epoch,
                paused: record.paused,
                lag_events,
                lag,
                parked: parked_here,
                last_error: record.last_error,
                error_kind: record.error_kind,
                processed: record.processed,
                rebuild,
                held_back_by,
                log_error: None,
            });
        }
        if let Some(error) = log_error {
            for status in &mut statuses {
                status.log_error = Some(error.clone());
            }
        }
        Ok(statuses)
    }

    /// Rebuilds a projection: in one transaction, resets its checkpoints and
    /// calls its [`reset`](crate::projection::Projection::reset) hook; the runners owning it then
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
        match self.rebuild_taking(name, false).await? {
            Some(progress) => Ok(progress),
            // Not reached: without a request to take, the reset always runs.
            None => Err(StoreError::Config(ConfigError::Invalid {
                setting: "rebuild",
                reason: format!("the rebuild of `{name}` did not start"),
            })),
        }
    }

    /// [`rebuild`](Self::rebuild); with `take_request`, only if the rebuild an
    /// operator asked for through the store is still there to take (in the
    /// reset's transaction: of two nodes, one rebuilds). `None` when it was
    /// not.
    pub(super) async fn rebuild_taking(
        &self,
        name: &str,
        take_request: bool,
    ) -> Result<Option<watch::Receiver<RebuildProgress>>, StoreError> {
        let registered = self.registered(name)?.clone();
        let store = &self.shared.store;
        store
            .register_projection(&registered.name, registered.partitions)
            .await?;
        // Every committed event, including those a transaction still open
        // elsewhere keeps readers from (the head would leave them out).
        let log = &self.shared.log;
        let total = if log.partitions() > 1 {
            let mut total = 0;
            for partition in 0..registered.partitions {
                let filter = registered.filter_for(partition, registered.partitions);
                total += log
                    .count_events(&filter, Checkpoint::START, END, i64::MAX as u64)
                    .await?;
            }
            total
        } else {
            log.count_events(&registered.filter, Checkpoint::START, END, i64::MAX as u64)
                .await?
        };
        let mut tx = store.begin().await?;
        if take_request && !store.take_rebuild_request(&mut tx, name).await? {
            return Ok(None);
        }
        store.reset_projection(&mut tx, name, total).await?;
        registered
            .projection
            .setup(&mut tx)
            .await
            .map_err(|error| ConfigError::SetupHook {
                name: name.to_owned(),
                error,
            })?;
        registered
            .projection
            .reset(&mut tx)
            .await
            .map_err(|error| ConfigError::ResetHook {
                name: name.to_owned(),
                error,
            })?;
        store.commit(tx).await?;
        // The shared view of the checkpoints still shows them before the
        // reset: a wait that starts now must read them itself.
        self.shared.view.forget();
        store.signal_checkpoints();
        self.shared.poke.notify_one();
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
                // Receivers hear of changes only.
                sender.send_if_modified(|current| {
                    let changed = *current != progress;
                    *current = progress;
                    changed
                });
                if progress.is_complete() {
                    return;
                }
            }
        });
        Ok(Some(receiver))
    }

    /// Moves a projection to checkpoint `to` on every node (within one
    /// heartbeat): its units are set there under a new epoch — their owners
    /// let go and claim them again — and it handles the events after `to`:
    /// again, for those it had handled (`to` behind it), never, for those
    /// it skips (`to` ahead of it). Unlike a [`rebuild`](Self::rebuild), the
    /// read model stays as it is and no hook runs: for a projection whose
    /// effects are idempotent (replay a range after a fix), or whose read
    /// model an operator repaired by hand (skip a range). Returns the events
    /// left to handle, which [`status`](Self::status) shows as the reset's
    /// progress.
    ///
    /// ```no_run
    /// # async fn demo(runner: outflow::runner::ProjectionRunner<outflow::PostgresStore>) -> Result<(), outflow::StoreError> {
    /// use outflow::Checkpoint;
    /// // Send the e-mails of everything after transaction 812, position 4310 again.
    /// let again = runner.reset_to("welcome_emails", Checkpoint::new(812, 4310)).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`ConfigError::UnknownProjection`]; [`ConfigError::Invalid`] for a
    /// checkpoint past the log's head, or other than the start on a log
    /// ordered per partition (each partition has its own checkpoints);
    /// [`StoreError`] when the reset fails (nothing is changed then).
    pub async fn reset_to(&self, name: &str, to: Checkpoint) -> Result<u64, StoreError> {
        let registered = self.registered(name)?.clone();
        let store = &self.shared.store;
        let log = &self.shared.log;
        if to != Checkpoint::START {
            if log.partitions() > 1 {
                return Err(ConfigError::Invalid {
                    setting: "reset",
                    reason: format!(
                        "the log is ordered per partition: `{name}` can be reset to the start only (rebuild it, or move its units one by one)"
                    ),
                }
                .into());
            }
            let head = log.committed_head().await?;
            if to > head {
                return Err(ConfigError::Invalid {
                    setting: "reset",
                    reason: format!("checkpoint {to} is past the log's head {head}"),
                }
                .into());
            }
        }
        store
            .register_projection(&registered.name, registered.partitions)
            .await?;
        let left = log
            .count_events(&registered.filter, to, END, i64::MAX as u64)
            .await?;
        let mut tx = store.begin().await?;
        store.reset_projection_to(&mut tx, name, to, left).await?;
        store.commit(tx).await?;
        self.shared.view.forget();
        store.signal_checkpoints();
        self.shared.poke.notify_one();
        tracing::info!(projection = name, checkpoint = %to, events = left, "projection reset to a checkpoint");
        Ok(left)
    }

    /// Pauses a projection on every node (within one heartbeat).
    ///
    /// # Errors
    ///
    /// [`StoreError`].
    pub async fn pause(&self, name: &str) -> Result<(), StoreError> {
        self.registered(name)?;
        self.shared.store.set_paused(name, true).await?;
        self.shared.poke.notify_one();
        Ok(())
    }

    /// Resumes a paused projection.
    ///
    /// # Errors
    ///
    /// [`StoreError`].
    pub async fn resume(&self, name: &str) -> Result<(), StoreError> {
        self.registered(name)?;
        self.shared.store.set_paused(name, false).await?;
        self.shared.poke.notify_one();
        Ok(())
    }

    /// Lets a projection stopped on an error run again (after a fix).
    ///
    /// # Errors
    ///
    /// [`StoreError`].
    pub async fn restart(&self, name: &str) -> Result<(), StoreError> {
        self.registered(name)?;
        self.shared.store.restart_projection(name).await?;
        self.shared.poke.notify_one();
        Ok(())
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
        let not_found = || RetryError::NotFound {
            projection: name.to_owned(),
            id,
        };
        let Some(dead_letter) = store
            .dead_letters(name)
            .await?
            .into_iter()
            .find(|d| d.id == id)
        else {
            return Err(not_found());
        };
        let Some(event) = read_event(&*self.shared.log, dead_letter.checkpoint).await? else {
            return Err(RetryError::Store(StoreError::Corrupt {
                table: "dead letters".into(),
                what: format!("parked {} is no longer in the log", dead_letter.event),
            }));
        };
        let events = [event];
        // The handler opens the event's personal values, as in a batch.
        let ring = self.shared.log.key_ring();
        if let Some(ring) = &ring {
            ring.prepare(&events).await?;
        }
        crate::personal::in_scope(ring, self.retry_parked(&registered, id, &events)).await
    }

    /// [`retry_dead_letter`](Self::retry_dead_letter) once the event is read.
    async fn retry_parked(
        &self,
        registered: &super::Registered<S>,
        id: u64,
        events: &[crate::event::RecordedEvent],
    ) -> Result<(), RetryError> {
        let store = &self.shared.store;
        let not_found = || RetryError::NotFound {
            projection: registered.name.clone(),
            id,
        };
        // The effects first, with no transaction open (as in a batch).
        if let Err(error) = registered.projection.effects(events).await {
            if let Err(note) = store.note_dead_letter_failure(id, &error.chain()).await {
                tracing::warn!(error = %crate::error::error_chain(&note), "recording a failed retry failed");
            }
            return Err(RetryError::Handler(error));
        }
        let mut tx = store.begin().await?;
        // Taken in the handler's transaction: gone if the retry commits.
        if store.take_dead_letter(&mut tx, id).await?.is_none() {
            return Err(not_found());
        }
        let outcome = registered.projection.handle(events, &mut tx).await;
        match outcome {
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

    /// Retries every parked event of a projection, oldest first (as
    /// [`retry_dead_letter`](Self::retry_dead_letter) does one). Returns
    /// `(succeeded, failed)`: how many were handled and left the dead
    /// letters, and for each that failed again its dead-letter id and why
    /// (it stays parked, with its attempt counted).
    ///
    /// ```no_run
    /// # async fn demo(runner: outflow::runner::ProjectionRunner<outflow::PostgresStore>) -> Result<(), outflow::StoreError> {
    /// let (succeeded, failed) = runner.retry_dead_letters("balances").await?;
    /// println!("{succeeded} retried");
    /// for (id, error) in failed {
    ///     println!("dead letter {id} is still parked: {error}");
    /// }
    /// # Ok(()) }
    /// ```
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
