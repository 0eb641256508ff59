//! Read-your-writes: waiting until projections have passed a position.
//!
//! Waiters read the units' checkpoints from the store (so they see runners
//! on every node) and are woken when checkpoints move here or elsewhere. A
//! runner's waiters share one view of the checkpoints, refreshed by one task
//! while anyone waits: many waiters cost one query per change, not one each.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::ProjectionRunner;
use crate::error::{ErrorKind, EventRef, StoreError};
use crate::event::Checkpoint;
use crate::port::projections::{
    Checkpoints, DeadLetters, ProjectionState, ProjectionStore, UnitId, UnitRecord,
};

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
        /// The error it was retrying on, if any.
        last_error: Option<String>,
    },
    /// The projection is stopped on an error and will not get there by itself.
    #[error("projection `{projection}` is stopped: {error}")]
    Stopped {
        /// The projection.
        projection: String,
        /// Its last error.
        error: String,
    },
    /// The projection is behind and failing on an error that someone must
    /// fix (a missing table or column, a permission): it keeps retrying, but
    /// will not get there by itself.
    #[error("projection `{projection}` is failing at {reached}: {error}")]
    Failing {
        /// The projection.
        projection: String,
        /// Where it stands.
        reached: Checkpoint,
        /// The error.
        error: String,
    },
    /// The projection passed the position, but parked an event on the way:
    /// one written by the awaited transaction, or one it handled while the
    /// caller waited. Its effect is missing from the read model.
    #[error("projection `{projection}` parked {event}: {error}")]
    Parked {
        /// The projection.
        projection: String,
        /// The parked event (the first, if several).
        event: EventRef,
        /// Where it stands in the log.
        checkpoint: Checkpoint,
        /// Why it was parked.
        error: String,
        /// The dead letter's id (for [`ProjectionRunner::retry_dead_letter`]).
        dead_letter: u64,
    },
    /// No projection of that name is registered in the store.
    #[error("no projection `{0}` is registered: no runner with it has started (`ProjectionRunner::run` registers its projections), or the name is wrong")]
    UnknownProjection(String),
    /// The projection is behind and no live node holds it: no runner runs
    /// it (never started, stopped, or every node is gone), so it will not
    /// get there until one does. Answered once no node held it for 5 s (a
    /// node that starts or takes over claims it sooner).
    #[error("projection `{projection}` reached {reached}, not {target}, and no live node runs it: is a runner running (`ProjectionRunner::run`) with this projection?")]
    NotRunning {
        /// The projection.
        projection: String,
        /// Where it stands.
        reached: Checkpoint,
        /// Where it had to get.
        target: Checkpoint,
    },
    /// Reading the checkpoints failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Waits until every named projection (all its partitions) has passed
/// `target` — typically [`Committed::checkpoint`](crate::Committed::checkpoint)
/// of a command, as it is: a `Checkpoint` or an `Option` of one, where
/// `None` (the command wrote nothing) returns `Ok` at once — so a read
/// model shows that command's effect (read-your-writes). `Ok` means every event up to `target` is in the read
/// model: a projection that parked one of them, or cannot get there without
/// help, makes it return an error instead. Works across nodes: checkpoints are read from the
/// store, and waiters are woken when runners anywhere commit.
///
/// [`ProjectionRunner::wait_for`] does the same and shares one view of the
/// checkpoints between all its callers. On a log ordered per partition (a
/// partitioned JetStream store) only [`ProjectionRunner::wait_for`] is
/// right: it knows the log, so it waits for the partition of `target`
/// alone; this function compares `target` with every partition's
/// checkpoint, which do not compare across partitions.
///
/// # Errors
///
/// - [`WaitError::Stopped`] at once when a projection that is behind is
///   stopped on an error;
/// - [`WaitError::Failing`] at once when a projection that is behind is
///   retrying on an infrastructure error (a missing table or column, a
///   permission: something someone must fix);
/// - [`WaitError::Parked`] when the projections passed `target` but parked
///   an event on the way: one of `target`'s own transaction, or one after
///   where the projection stood when the wait began (as last seen:
///   [`ProjectionRunner::wait_for`] looks at the view its waiters share,
///   refreshed at every move of a checkpoint);
/// - [`WaitError::Timeout`] after `timeout` (with the error the projection
///   is retrying on, if any);
/// - [`WaitError::UnknownProjection`] when no projection of that name is
///   registered within 3 s (or the timeout, if shorter): a runner that is
///   starting has that long to register it; at once from
///   [`ProjectionRunner::wait_for`] for a name neither the runner nor the
///   store knows (the runner's names are logged);
/// - [`WaitError::NotRunning`] when a unit behind the target has had no
///   live node holding it for 5 s.
pub async fn wait_for<S: Checkpoints + DeadLetters>(
    store: &S,
    target: impl Into<Option<Checkpoint>>,
    projections: &[&str],
    timeout: Duration,
) -> Result<(), WaitError> {
    let Some(target) = target.into() else {
        return Ok(());
    };
    let view = SharedView::default();
    wait_on(store, &view, target, projections, timeout, None).await
}

/// How long a wait looks again for a projection that is not registered yet
/// (its runner may be starting) before it reports it unknown.
const UNKNOWN_GRACE: Duration = Duration::from_secs(3);

/// How long a unit that is behind may stay unheld before a wait says that
/// no node runs it: longer than a heartbeat, so a restart or a takeover
/// claims it first.
const NOT_RUNNING_GRACE: Duration = Duration::from_secs(5);

/// The checkpoints as last read, shared by every waiter of a runner, and
/// whether a task is refreshing them.
#[derive(Debug)]
pub(super) struct SharedView {
    units: watch::Sender<Arc<Vec<UnitRecord>>>,
    refreshing: Arc<AtomicBool>,
}

impl Default for SharedView {
    fn default() -> Self {
        SharedView {
            units: watch::Sender::new(Arc::new(Vec::new())),
            refreshing: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl SharedView {
    /// Drops what the view shows (after checkpoints moved back, by a
    /// reset): waits read for themselves until the next refresh.
    pub(super) fn forget(&self) {
        self.units.send_replace(Arc::new(Vec::new()));
    }

    /// A batch of this node committed: `unit`'s checkpoint moved to `to`
    /// under `epoch` (and, when it parked an event, the last parked one is
    /// at `parked`). The view shows it at once, so that the node's waiters
    /// need not wait for the refresh the commit also triggers. Only a record
    /// of the same epoch is touched: a view older than the claim, or one
    /// that a reset emptied, waits for its refresh. What it shows stays
    /// what the store holds — the commit is done — so a wait that it
    /// answers is answered as a read of the store would.
    pub(super) fn committed(
        &self,
        unit: &UnitId,
        epoch: u64,
        to: Checkpoint,
        parked: Option<Checkpoint>,
    ) {
        self.units.send_if_modified(|units| {
            let Some(at) = units
                .iter()
                .position(|u| &u.unit == unit && u.epoch == epoch)
            else {
                return false;
            };
            let current = &units[at];
            let parked_moves = parked.is_some_and(|p| current.last_parked.is_none_or(|l| l < p));
            if current.checkpoint >= to && !parked_moves {
                return false;
            }
            let record = &mut Arc::make_mut(units)[at];
            record.checkpoint = record.checkpoint.max(to);
            if parked_moves {
                record.last_parked = parked;
            }
            true
        });
    }
}

/// Where the named projections stand against `target`.
#[derive(Debug, PartialEq)]
enum Standing<'a> {
    /// Every unit passed the target.
    Reached,
    /// A projection has no units in the store.
    Unknown(&'a str),
    /// A unit is behind and stopped on an error.
    Stopped(&'a str, String),
    /// A unit is behind and retrying on an infrastructure error.
    Failing(&'a str, Checkpoint, String),
    /// A unit is behind (the first one found), with the error it is
    /// retrying on, and whether a live node holds every unit behind.
    Behind(&'a str, Checkpoint, Option<String>, bool),
}

/// Whether a unit must pass the target: every unit, or on a log ordered
/// per partition only the units of the target's partition (`scope`).
fn in_scope(unit: &UnitRecord, scope: Option<u32>) -> bool {
    scope.is_none_or(|partition| unit.unit.partition == partition)
}

/// The pure decision of one look at the units.
fn standing<'a>(
    units: &[UnitRecord],
    target: Checkpoint,
    projections: &[&'a str],
    scope: Option<u32>,
) -> Standing<'a> {
    let mut behind = None;
    let mut stopped = None;
    let mut failing = None;
    let mut all_held = true;
    for &name in projections {
        let mut mine = units
            .iter()
            .filter(|u| u.unit.projection == name)
            .peekable();
        if mine.peek().is_none() {
            return Standing::Unknown(name);
        }
        for unit in mine {
            if unit.checkpoint >= target || !in_scope(unit, scope) {
                continue;
            }
            // An error is current only while a node works the unit: one
            // left by a process that is gone belongs to that attempt.
            let error = unit
                .last_error
                .clone()
                .filter(|_| unit.lease_valid || unit.state == ProjectionState::Stopped);
            all_held &= unit.lease_valid;
            match unit.state {
                ProjectionState::Stopped if stopped.is_none() => {
                    stopped = Some((name, error.clone().unwrap_or_default()));
                }
                ProjectionState::Retrying
                    if failing.is_none()
                        && unit.lease_valid
                        && unit.error_kind == Some(ErrorKind::Infrastructure) =>
                {
                    if let Some(text) = error.as_deref() {
                        failing = Some((name, unit.checkpoint, text.to_owned()));
                    }
                }
                _ => {}
            }
            behind.get_or_insert((name, unit.checkpoint, error));
        }
    }
    if let Some((name, error)) = stopped {
        return Standing::Stopped(name, error);
    }
    if let Some((name, at, error)) = failing {
        return Standing::Failing(name, at, error);
    }
    match behind {
        Some((name, reached, error)) => Standing::Behind(name, reached, error, all_held),
        None => Standing::Reached,
    }
}

/// The lowest checkpoint of each named projection: where parked events
/// start to count against a wait.
fn lowest(units: &[UnitRecord], projection: &str, scope: Option<u32>) -> Option<Checkpoint> {
    units
        .iter()
        .filter(|u| u.unit.projection == projection && in_scope(u, scope))
        .map(|u| u.checkpoint)
        .min()
}

async fn wait_on<S: Checkpoints + DeadLetters>(
    store: &S,
    shared: &SharedView,
    target: Checkpoint,
    projections: &[&str],
    timeout: Duration,
    scope: Option<u32>,
) -> Result<(), WaitError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let unknown_until = tokio::time::Instant::now() + timeout.min(UNKNOWN_GRACE);
    // The runner's shared view of the checkpoints; a stopped or failing
    // unit it shows is confirmed by a read of our own before the wait gives
    // up (admin changes such as a restart reach the view at its next
    // refresh).
    let mut view = shared.units.subscribe();
    ensure_refresher(store, shared);
    let own_transaction = Checkpoint::new(target.transaction_id, 0);
    // When the shared view already shows every unit past the target, it
    // answers alone: a view read before the target committed cannot (a
    // later transaction sorts after every checkpoint read before it), so
    // this one was read after, as our own read would be. Only parked events
    // of the awaited transaction count then, and the view says whether
    // there are any.
    let current = view.borrow_and_update().clone();
    if !current.is_empty() && standing(&current, target, projections, scope) == Standing::Reached {
        let since: Vec<(&str, Checkpoint)> = projections
            .iter()
            .map(|&name| (name, own_transaction))
            .collect();
        return parked_on_the_way(store, &current, &since, target, scope).await;
    }
    // Otherwise the wait starts from the view too (refreshed at every move
    // of a checkpoint, here or on another node), or from a read of its own
    // when nothing has read the view yet.
    let (mut units, mut fresh) = if current.is_empty() {
        (Arc::new(store.units(None).await?), true)
    } else {
        (current, false)
    };
    // Parked events after where each projection stood at that look count
    // against this wait, and so do those of the awaited transaction.
    let since: Vec<(&str, Checkpoint)> = projections
        .iter()
        .map(|&name| {
            let from = lowest(&units, name, scope).unwrap_or(Checkpoint::START);
            (name, from.min(own_transaction))
        })
        .collect();
    let mut unheld_since: Option<tokio::time::Instant> = None;
    loop {
        let (name, reached, last_error) = match standing(&units, target, projections, scope) {
            Standing::Reached => {
                return parked_on_the_way(store, &units, &since, target, scope).await
            }
            Standing::Unknown(name) => {
                // A runner starting at the same moment may not have
                // registered it yet: look again for a moment.
                if tokio::time::Instant::now() < unknown_until {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    units = Arc::new(store.units(None).await?);
                    fresh = true;
                    continue;
                }
                return Err(WaitError::UnknownProjection(name.to_owned()));
            }
            Standing::Stopped(..) | Standing::Failing(..) if !fresh => {
                // Confirm with a read of our own before giving up.
                units = Arc::new(store.units(None).await?);
                fresh = true;
                continue;
            }
            Standing::Stopped(name, error) => {
                return Err(WaitError::Stopped {
                    projection: name.to_owned(),
                    error,
                });
            }
            Standing::Failing(name, reached, error) => {
                return Err(WaitError::Failing {
                    projection: name.to_owned(),
                    reached,
                    error,
                });
            }
            Standing::Behind(name, reached, error, held) => {
                if held {
                    unheld_since = None;
                } else {
                    let since = *unheld_since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() >= NOT_RUNNING_GRACE {
                        if fresh {
                            return Err(WaitError::NotRunning {
                                projection: name.to_owned(),
                                reached,
                                target,
                            });
                        }
                        // Confirm with a read of our own first.
                        units = Arc::new(store.units(None).await?);
                        fresh = true;
                        continue;
                    }
                }
                (name, reached, error)
            }
        };
        // Look again when the grace for an unheld unit ends, if nothing
        // moves before.
        let recheck = unheld_since.map(|since| since + NOT_RUNNING_GRACE);
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
            _ = tokio::time::sleep_until(recheck.unwrap_or(deadline).min(deadline)), if recheck.is_some_and(|r| r < deadline) => {
                units = Arc::new(store.units(None).await?);
                fresh = true;
            }
            _ = tokio::time::sleep_until(deadline) => {
                return Err(WaitError::Timeout {
                    projection: name.to_owned(),
                    reached,
                    target,
                    timeout,
                    last_error,
                });
            }
        }
    }
}

/// The first event parked in each projection's range, as an error. The
/// dead letters are read only for a projection whose units (as read when
/// they passed the target) have one past the range's start.
async fn parked_on_the_way<S: DeadLetters>(
    store: &S,
    units: &[UnitRecord],
    since: &[(&str, Checkpoint)],
    target: Checkpoint,
    scope: Option<u32>,
) -> Result<(), WaitError> {
    for &(name, from) in since {
        let any_in_range = units
            .iter()
            .filter(|u| u.unit.projection == name && in_scope(u, scope))
            .any(|u| u.last_parked.is_some_and(|parked| parked > from));
        if !any_in_range {
            continue;
        }
        let parked = store.dead_letters_between(name, from, target).await?;
        let first = parked
            .into_iter()
            .find(|d| scope.is_none_or(|partition| d.unit.partition == partition));
        if let Some(first) = first {
            return Err(WaitError::Parked {
                projection: name.to_owned(),
                event: first.event,
                checkpoint: first.checkpoint,
                error: first.error,
                dead_letter: first.id,
            });
        }
    }
    Ok(())
}

/// Starts the task that refreshes a shared view while anyone waits, if it is
/// not running.
fn ensure_refresher<S: Checkpoints>(store: &S, shared: &SharedView) {
    if shared.refreshing.swap(true, Ordering::AcqRel) {
        return;
    }
    let store = store.clone();
    let units = shared.units.clone();
    let refreshing = shared.refreshing.clone();
    tokio::spawn(async move {
        let mut wakeups = store.checkpoint_wakeups();
        loop {
            match store.units(None).await {
                Ok(records) => {
                    units.send_replace(Arc::new(records));
                }
                Err(error) => {
                    tracing::debug!(error = %crate::error::error_chain(&error), "refreshing checkpoints failed")
                }
            }
            wakeups.wait().await;
            if units.receiver_count() == 0 {
                refreshing.store(false, Ordering::Release);
                // A waiter may have arrived between the check and the store.
                if units.receiver_count() == 0 || refreshing.swap(true, Ordering::AcqRel) {
                    return;
                }
            }
        }
    });
}

impl<S: ProjectionStore> ProjectionRunner<S> {
    /// Waits until the named projections have passed `target`; see [`wait_for`].
    ///
    /// # Errors
    ///
    /// As [`wait_for`].
    pub async fn wait_for(
        &self,
        target: impl Into<Option<Checkpoint>>,
        projections: &[&str],
        timeout: Duration,
    ) -> Result<(), WaitError> {
        let Some(target) = target.into() else {
            return Ok(());
        };
        // A runner may be waited on before `run` has registered its
        // projections (right after start-up): register those it knows.
        let mut foreign = Vec::new();
        for name in projections {
            match self.shared.projections.get(*name) {
                Some(registered) => self.ensure_registered(registered).await?,
                None => foreign.push(*name),
            }
        }
        // A name this runner does not run may be another process's: only
        // one the store does not know either is a mistake, said at once.
        if !foreign.is_empty() {
            let stored = self.shared.store.units(None).await?;
            if let Some(name) = foreign
                .iter()
                .find(|name| !stored.iter().any(|u| u.unit.projection == **name))
            {
                let mut known: Vec<&str> =
                    self.shared.projections.keys().map(String::as_str).collect();
                known.sort_unstable();
                tracing::warn!(projection = %name, known = %known.join(", "), "waiting on a projection that neither this runner nor the store knows");
                return Err(WaitError::UnknownProjection((*name).to_owned()));
            }
        }
        // On a log ordered per partition, the target's partition alone
        // holds the awaited events; the other partitions' checkpoints do not
        // compare with it.
        let scope = self.shared.log.checkpoint_partition(target);
        wait_on(
            &self.shared.store,
            &self.shared.view,
            target,
            projections,
            timeout,
            scope,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(name: &str, partition: u32, at: u64, state: ProjectionState) -> UnitRecord {
        UnitRecord {
            unit: UnitId {
                projection: name.into(),
                partition,
            },
            partitions: 2,
            checkpoint: Checkpoint::new(1, at),
            owner: Some("node".into()),
            lease_valid: true,
            epoch: 1,
            state,
            paused: false,
            last_error: Some("boom".into()),
            error_kind: None,
            processed: 0,
            rebuild_total: None,
            updated_at: chrono::Utc::now(),
            last_parked: None,
        }
    }

    #[test]
    fn a_local_commit_shows_in_the_view_only_under_the_same_epoch() {
        let view = SharedView::default();
        let live = ProjectionState::Live;
        view.units
            .send_replace(Arc::new(vec![unit("p", 0, 5, live), unit("p", 1, 5, live)]));
        let id = |partition| UnitId {
            projection: "p".into(),
            partition,
        };
        let shown = |partition: u32| {
            view.units
                .borrow()
                .iter()
                .find(|u| u.unit == id(partition))
                .map(|u| (u.checkpoint, u.last_parked))
        };
        view.committed(&id(0), 1, Checkpoint::new(1, 9), None);
        assert_eq!(shown(0), Some((Checkpoint::new(1, 9), None)));
        assert_eq!(shown(1), Some((Checkpoint::new(1, 5), None)));
        // Another epoch: the view is older than the claim, or newer.
        view.committed(&id(1), 2, Checkpoint::new(1, 9), None);
        assert_eq!(shown(1), Some((Checkpoint::new(1, 5), None)));
        // Never backwards.
        view.committed(&id(0), 1, Checkpoint::new(1, 7), None);
        assert_eq!(shown(0), Some((Checkpoint::new(1, 9), None)));
        // A park moves the last parked event with the checkpoint.
        view.committed(
            &id(0),
            1,
            Checkpoint::new(1, 10),
            Some(Checkpoint::new(1, 10)),
        );
        assert_eq!(
            shown(0),
            Some((Checkpoint::new(1, 10), Some(Checkpoint::new(1, 10))))
        );
        // An emptied view (a reset) stays empty until its refresh.
        view.forget();
        view.committed(&id(0), 1, Checkpoint::new(1, 11), None);
        assert!(view.units.borrow().is_empty());
    }

    #[test]
    fn on_a_partitioned_log_only_the_targets_partition_counts() {
        let live = ProjectionState::Live;
        // Partition 1 is far behind the target in number, but its
        // checkpoints do not compare with partition 0's.
        let units = [unit("a", 0, 5, live), unit("a", 1, 1, live)];
        let target = Checkpoint::new(1, 4);
        assert_eq!(standing(&units, target, &["a"], Some(0)), Standing::Reached);
        assert!(matches!(
            standing(&units, target, &["a"], Some(1)),
            Standing::Behind("a", _, _, true)
        ));
        assert!(matches!(
            standing(&units, target, &["a"], None),
            Standing::Behind("a", _, _, true)
        ));
        assert_eq!(lowest(&units, "a", Some(0)), Some(Checkpoint::new(1, 5)));
    }

    #[test]
    fn every_partition_must_pass_the_target() {
        let live = ProjectionState::Live;
        let units = [
            unit("a", 0, 5, live),
            unit("a", 1, 3, live),
            unit("b", 0, 9, live),
        ];
        let target = Checkpoint::new(1, 4);
        assert_eq!(standing(&units, target, &["b"], None), Standing::Reached);
        assert_eq!(
            standing(&units, target, &["b", "a"], None),
            Standing::Behind("a", Checkpoint::new(1, 3), Some("boom".into()), true)
        );
        assert_eq!(
            standing(&units, target, &["c"], None),
            Standing::Unknown("c")
        );
    }

    #[test]
    fn a_stopped_unit_behind_the_target_is_reported() {
        let units = [
            unit("a", 0, 2, ProjectionState::Live),
            unit("a", 1, 1, ProjectionState::Stopped),
        ];
        assert_eq!(
            standing(&units, Checkpoint::new(1, 2), &["a"], None),
            Standing::Stopped("a", "boom".into())
        );
        // Retrying on a missing table: failing; on a lost connection: behind.
        let mut retrying = unit("a", 1, 1, ProjectionState::Retrying);
        retrying.last_error = Some("infrastructure error: relation \"x\" does not exist".into());
        retrying.error_kind = Some(ErrorKind::Infrastructure);
        let units_failing = [unit("a", 0, 2, ProjectionState::Live), retrying.clone()];
        assert!(matches!(
            standing(&units_failing, Checkpoint::new(1, 2), &["a"], None),
            Standing::Failing("a", _, _)
        ));
        retrying.last_error = Some("transient error: connection reset".into());
        retrying.error_kind = Some(ErrorKind::Transient);
        let units_transient = [unit("a", 0, 2, ProjectionState::Live), retrying];
        assert!(matches!(
            standing(&units_transient, Checkpoint::new(1, 2), &["a"], None),
            Standing::Behind("a", _, Some(_), true)
        ));
        // An error left by a node that is gone (no valid lease) is not
        // current: the unit is behind, unheld, with no error.
        let mut orphan = unit("a", 1, 1, ProjectionState::Retrying);
        orphan.last_error = Some("infrastructure error: relation \"x\" does not exist".into());
        orphan.error_kind = Some(ErrorKind::Infrastructure);
        orphan.lease_valid = false;
        orphan.owner = None;
        let units_orphaned = [unit("a", 0, 2, ProjectionState::Live), orphan];
        assert_eq!(
            standing(&units_orphaned, Checkpoint::new(1, 2), &["a"], None),
            Standing::Behind("a", Checkpoint::new(1, 1), None, false)
        );
        // Stopped but past the target: nothing to wait for.
        assert_eq!(
            standing(&units, Checkpoint::new(1, 1), &["a"], None),
            Standing::Reached
        );
    }
}
