//! The unit's loop: wait out a pause, read the next window of the log (the
//! one prefetched during the last batch while catching up), move past an
//! empty window or hand its events to the batch machinery of
//! [`UnitWorker`], and wait for what comes next once caught up.

use std::time::Duration;

use tracing::Instrument;

use super::{failing, whole_transactions, Outcome, UnitWorker};
use crate::backoff::Backoff;
use crate::error::{error_chain, StoreError};
use crate::event::{Checkpoint, RecordedEvent};
use crate::port::log::{LogFilter, LogWindow};
use crate::port::projections::{ProjectionState, ProjectionStore};
use crate::wake::{Recheck, Wakeups};

/// The next window of the log, being read while a batch commits; the read
/// is abandoned when the window is not wanted after all.
struct Prefetch {
    /// Where the read starts: the batch's target.
    from: Checkpoint,
    task: Option<PrefetchTask>,
}

type PrefetchTask = tokio::task::JoinHandle<Result<LogWindow, StoreError>>;

impl Drop for Prefetch {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Where a unit's loop stands in the log, and what it waits with.
struct Cursor {
    /// The last checkpoint committed (or moved to).
    checkpoint: Checkpoint,
    /// The unit's filter (its partition of the projection's filter).
    filter: LogFilter,
    wakeups: Wakeups,
    /// Backoff between failed reads (and failed idle commits).
    read_failures: Backoff,
    /// How soon to look again while events are held back.
    recheck: Recheck,
    /// The next window, read while the last batch was handled.
    prefetched: Option<Prefetch>,
}

/// What the loop does after one step.
enum Flow {
    /// Go on with the next round.
    Continue,
    /// The claim was lost: stop without releasing.
    Lost,
    /// Stopped, drained, or stopped by an error policy: release.
    Stopped,
}

impl<S: ProjectionStore> UnitWorker<S> {
    /// Reads, handles and commits windows of the log until the unit is
    /// stopped, drained or its claim lost: each round either waits out a
    /// pause, or reads the next window ([`read_next`](Self::read_next)) and
    /// then moves past an empty one ([`pass_empty`](Self::pass_empty)) or
    /// handles its events ([`advance`](Self::advance)). Returns `true` when
    /// the claim was lost (nothing to release).
    pub(super) async fn run_loop(&mut self) -> bool {
        let mut cursor = Cursor {
            checkpoint: self.lease.checkpoint,
            filter: self
                .registered
                .filter_for(self.lease.unit.partition, self.registered.partitions),
            wakeups: self.shared.log.wakeups(),
            read_failures: Backoff::from_policy(&self.registered.retry),
            recheck: Recheck::new(Duration::from_millis(1)),
            prefetched: None,
        };
        loop {
            if self.stop.is_cancelled() {
                return false;
            }
            let flow = if *self.paused.borrow() {
                self.wait_while_paused().await
            } else {
                match self.read_next(&mut cursor).await {
                    Ok(window) if window.events.is_empty() => {
                        self.pass_empty(&mut cursor, window).await
                    }
                    Ok(window) => self.advance(&mut cursor, window).await,
                    Err(flow) => flow,
                }
            };
            match flow {
                Flow::Continue => {}
                Flow::Lost => return true,
                Flow::Stopped => return false,
            }
        }
    }

    /// Records the pause and waits until it is lifted.
    async fn wait_while_paused(&mut self) -> Flow {
        self.set_state(ProjectionState::Paused, None).await;
        tokio::select! {
            _ = self.stop.cancelled() => Flow::Stopped,
            // Paused: nothing to drain.
            _ = self.draining.cancelled() => Flow::Stopped,
            _ = self.paused.changed() => Flow::Continue,
        }
    }

    /// The next window after the cursor (the one prefetched during the last
    /// batch when it starts there), its events under their current names. A
    /// row that does not decode is parked or stops the unit per policy; a
    /// failed read is recorded in status and retried with backoff.
    async fn read_next(&mut self, cursor: &mut Cursor) -> Result<LogWindow, Flow> {
        let batch_size = self.registered.batch_size;
        let prefetched = cursor.prefetched.take();
        let read = async {
            // While catching up, the next window was read during the last
            // batch's transaction. (A window from elsewhere is aborted when
            // dropped.)
            if let Some(mut prefetch) = prefetched {
                if prefetch.from == cursor.checkpoint {
                    if let Some(Ok(read)) = match prefetch.task.take() {
                        Some(task) => Some(task.await),
                        None => None,
                    } {
                        return read;
                    }
                }
            }
            self.shared
                .log
                .read_window(cursor.checkpoint, &cursor.filter, batch_size + 1)
                .await
        };
        match read.await {
            Ok(mut window) => {
                cursor.read_failures.reset();
                if !self.shared.aliases.is_empty() {
                    for event in &mut window.events {
                        self.shared.aliases.apply(event);
                    }
                }
                Ok(window)
            }
            Err(error @ StoreError::Undecodable { .. }) => {
                // A stored row that does not decode is a poison event: the
                // read stopped right before it, so it is the next wanted
                // event.
                match self.undecodable(error, cursor.checkpoint).await {
                    Outcome::Committed => {}
                    Outcome::Moved(at) => cursor.checkpoint = at,
                    Outcome::Lost => return Err(Flow::Lost),
                    Outcome::Stopped => return Err(Flow::Stopped),
                }
                Err(Flow::Continue)
            }
            Err(error) => {
                let message = failing(error.kind(), &error_chain(&error));
                self.set_state(ProjectionState::Retrying, Some((error.kind(), message)))
                    .await;
                tracing::warn!(kind = %error.kind(), error = %error_chain(&error), "reading the log failed");
                if !cursor.read_failures.wait(&self.stop).await {
                    return Err(Flow::Stopped);
                }
                Err(Flow::Continue)
            }
        }
    }

    /// A window with no wanted event: moves the checkpoint to the head (so
    /// that `wait_for` sees this unit reach positions it skips), says `live`
    /// and waits for what comes next.
    async fn pass_empty(&mut self, cursor: &mut Cursor, window: LogWindow) -> Flow {
        let LogWindow {
            head,
            complete,
            held_back,
            ..
        } = window;
        if head > cursor.checkpoint && complete {
            match self.commit(&[], cursor.checkpoint, head).await {
                Ok(Outcome::Committed) => cursor.checkpoint = head,
                Ok(Outcome::Moved(at)) => cursor.checkpoint = at,
                Ok(Outcome::Lost) => return Flow::Lost,
                Ok(Outcome::Stopped) => return Flow::Stopped,
                Err(error) => {
                    tracing::warn!(error = %error.chain(), "moving an idle checkpoint failed");
                    let kind = error.kind_with(|e| self.shared.store.classify(e));
                    self.set_state(ProjectionState::Retrying, Some((kind, error.chain())))
                        .await;
                    if !cursor.read_failures.wait(&self.stop).await {
                        return Flow::Stopped;
                    }
                    return Flow::Continue;
                }
            }
        }
        self.set_state(ProjectionState::Live, None).await;
        if self.draining.is_cancelled() {
            // Read to the head, nothing left: drained.
            return Flow::Stopped;
        }
        if held_back {
            cursor.recheck.held_back();
        } else {
            cursor.recheck.found();
        }
        if self.idle(&mut cursor.recheck, &mut cursor.wakeups).await {
            Flow::Continue
        } else {
            Flow::Stopped
        }
    }

    /// Handles a window's events as one batch (whole transactions only),
    /// prefetching the next window meanwhile while catching up, and moves the
    /// cursor past them; once caught up, waits for what comes next.
    async fn advance(&mut self, cursor: &mut Cursor, window: LogWindow) -> Flow {
        let LogWindow {
            head,
            mut events,
            complete,
            held_back,
            ..
        } = window;
        let batch_size = self.registered.batch_size;
        cursor.recheck.found();
        // Caught up when the window holds everything wanted up to the head
        // (a short read, not cut by a row that does not decode) and the
        // batch keeps all of it.
        let caught_up = whole_transactions(&mut events, batch_size) && complete;
        let last = events
            .last()
            .map_or(cursor.checkpoint, RecordedEvent::checkpoint);
        let target = if caught_up { last.max(head) } else { last };
        // The state goes with the first batch, before its commit: a reader
        // that sees the batch's effect sees the state too.
        let state = if caught_up {
            ProjectionState::Live
        } else {
            ProjectionState::CatchingUp
        };
        self.set_state(state, None).await;
        if !caught_up {
            // Read the next window while this batch is handled and
            // committed: reading and writing overlap.
            let (log, filter) = (self.shared.log.clone(), cursor.filter.clone());
            cursor.prefetched = Some(Prefetch {
                from: target,
                task: Some(tokio::spawn(async move {
                    log.read_window(target, &filter, batch_size + 1).await
                })),
            });
        }
        // A trace of its own (not a child of the unit's long-lived span),
        // linked to the trace of each event it handles.
        let batch = tracing::info_span!(
            parent: None,
            "outflow.projection.batch",
            projection = %self.lease.unit.projection,
            partition = self.lease.unit.partition,
            events = events.len(),
            from = %cursor.checkpoint,
            to = %target
        );
        crate::trace::link(&batch, &events);
        match self
            .process(&events, cursor.checkpoint, target, true)
            .instrument(batch)
            .await
        {
            Outcome::Committed => {
                cursor.checkpoint = target;
                // Positions between the head and the checkpoint: a cheap
                // bound on the lag (`status` counts the wanted events).
                metrics::gauge!(
                    "outflow_projection_lag_positions",
                    "projection" => self.registered.name.clone()
                )
                .set(head.position.saturating_sub(target.position) as f64);
                if caught_up {
                    // Everything readable was handled: what comes next is
                    // signalled (or held back, then looked for soon), so
                    // wait instead of reading an empty window. (A retry on
                    // the way said so in status: live again; no write when
                    // it is already.)
                    self.set_state(ProjectionState::Live, None).await;
                    if held_back {
                        cursor.recheck.held_back();
                    }
                    if !self.idle(&mut cursor.recheck, &mut cursor.wakeups).await {
                        return Flow::Stopped;
                    }
                }
                Flow::Continue
            }
            Outcome::Moved(at) => {
                cursor.checkpoint = at;
                Flow::Continue
            }
            Outcome::Lost => Flow::Lost,
            Outcome::Stopped => Flow::Stopped,
        }
    }

    /// Waits until it is time to read again; `false` when stopped. A drain
    /// starting reads once more (then stops when nothing is left).
    async fn idle(&mut self, recheck: &mut Recheck, wakeups: &mut Wakeups) -> bool {
        if self.draining.is_cancelled() {
            return true;
        }
        tokio::select! {
            _ = self.stop.cancelled() => false,
            _ = self.draining.cancelled() => true,
            _ = recheck.idle(wakeups) => true,
            _ = self.paused.changed() => true,
        }
    }
}
