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
use crate::error::StoreError;
use crate::event::Checkpoint;
use crate::store::projections::{Checkpoints, ProjectionState, ProjectionStore, UnitRecord};

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

/// Waits until every named projection (all its partitions) has passed
/// `target` — typically [`Committed::checkpoint`](crate::Committed::checkpoint)
/// of a command — so a read model shows that command's effect
/// (read-your-writes). Works across nodes: checkpoints are read from the
/// store, and waiters are woken when runners anywhere commit.
///
/// [`ProjectionRunner::wait_for`] does the same and shares one view of the
/// checkpoints between all its callers.
///
/// # Errors
///
/// [`WaitError::Timeout`] after `timeout`; [`WaitError::Stopped`] at once if a
/// projection is stopped on an error; [`WaitError::UnknownProjection`].
pub async fn wait_for<S: Checkpoints>(
    store: &S,
    target: Checkpoint,
    projections: &[&str],
    timeout: Duration,
) -> Result<(), WaitError> {
    let view = SharedView::default();
    wait_on(store, &view, target, projections, timeout).await
}

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

/// Where the named projections stand against `target`.
#[derive(Debug, PartialEq)]
enum Standing<'a> {
    /// Every unit passed the target.
    Reached,
    /// A projection has no units in the store.
    Unknown(&'a str),
    /// A unit is behind and stopped on an error.
    Stopped(&'a str, String),
    /// A unit is behind (the first one found).
    Behind(&'a str, Checkpoint),
}

/// The pure decision of one look at the units.
fn standing<'a>(units: &[UnitRecord], target: Checkpoint, projections: &[&'a str]) -> Standing<'a> {
    let mut behind = None;
    let mut stopped = None;
    for &name in projections {
        let mut mine = units
            .iter()
            .filter(|u| u.unit.projection == name)
            .peekable();
        if mine.peek().is_none() {
            return Standing::Unknown(name);
        }
        for unit in mine {
            if unit.checkpoint >= target {
                continue;
            }
            if unit.state == ProjectionState::Stopped && stopped.is_none() {
                stopped = Some((name, unit.last_error.clone().unwrap_or_default()));
            }
            behind.get_or_insert((name, unit.checkpoint));
        }
    }
    match (stopped, behind) {
        (Some((name, error)), _) => Standing::Stopped(name, error),
        (None, Some((name, reached))) => Standing::Behind(name, reached),
        (None, None) => Standing::Reached,
    }
}

async fn wait_on<S: Checkpoints>(
    store: &S,
    shared: &SharedView,
    target: Checkpoint,
    projections: &[&str],
    timeout: Duration,
) -> Result<(), WaitError> {
    let deadline = tokio::time::Instant::now() + timeout;
    // One read of our own (admin changes such as a restart reach the shared
    // view only at its next refresh), then the shared view.
    let mut view = shared.units.subscribe();
    ensure_refresher(store, shared);
    let mut units = Arc::new(store.units(None).await?);
    // Whether `units` comes from our own read (the shared view may lag).
    let mut fresh = true;
    loop {
        let (name, reached) = match standing(&units, target, projections) {
            Standing::Reached => return Ok(()),
            Standing::Unknown(name) => return Err(WaitError::UnknownProjection(name.to_owned())),
            Standing::Stopped(name, error) => {
                if fresh {
                    return Err(WaitError::Stopped {
                        projection: name.to_owned(),
                        error,
                    });
                }
                // Confirm with a read of our own before giving up.
                units = Arc::new(store.units(None).await?);
                fresh = true;
                continue;
            }
            Standing::Behind(name, reached) => (name, reached),
        };
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
                Err(error) => tracing::debug!(%error, "refreshing checkpoints failed"),
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
        target: Checkpoint,
        projections: &[&str],
        timeout: Duration,
    ) -> Result<(), WaitError> {
        // A runner may be waited on before `run` has registered its
        // projections (right after start-up): register those it knows.
        for name in projections {
            if let Some(registered) = self.shared.projections.get(*name) {
                self.ensure_registered(registered).await?;
            }
        }
        wait_on(
            &self.shared.store,
            &self.shared.view,
            target,
            projections,
            timeout,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::projections::UnitId;

    fn unit(name: &str, partition: u32, at: u64, state: ProjectionState) -> UnitRecord {
        UnitRecord {
            unit: UnitId {
                projection: name.into(),
                partition,
            },
            partitions: 2,
            checkpoint: Checkpoint::new(1, at),
            owner: None,
            lease_valid: false,
            epoch: 1,
            state,
            paused: false,
            last_error: Some("boom".into()),
            processed: 0,
            rebuild_total: None,
            updated_at: chrono::Utc::now(),
        }
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
        assert_eq!(standing(&units, target, &["b"]), Standing::Reached);
        assert_eq!(
            standing(&units, target, &["b", "a"]),
            Standing::Behind("a", Checkpoint::new(1, 3))
        );
        assert_eq!(standing(&units, target, &["c"]), Standing::Unknown("c"));
    }

    #[test]
    fn a_stopped_unit_behind_the_target_is_reported() {
        let units = [
            unit("a", 0, 2, ProjectionState::Live),
            unit("a", 1, 1, ProjectionState::Stopped),
        ];
        assert_eq!(
            standing(&units, Checkpoint::new(1, 2), &["a"]),
            Standing::Stopped("a", "boom".into())
        );
        // Stopped but past the target: nothing to wait for.
        assert_eq!(
            standing(&units, Checkpoint::new(1, 1), &["a"]),
            Standing::Reached
        );
    }
}
