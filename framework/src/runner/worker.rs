//! One owned unit: read a batch from the log, apply it with the checkpoint in
//! one transaction, tail the log once caught up, and apply the projection's
//! error policy.
//!
//! A batch's effects outside the database run first, with no transaction
//! open; then one transaction moves the checkpoint from where the batch
//! started (only under the runner's epoch: the fence), lets the handler
//! write, and commits. Failures are
//! classified by the backend: transient and infrastructure failures are
//! retried with backoff for as long as they last (and shown in status), and
//! only failures that are the data's fault count towards parking an event.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{Registered, Shared};
use crate::backoff::Backoff;
use crate::error::{error_chain, ErrorKind, HandlerError, StoreError};
use crate::event::{Checkpoint, RecordedEvent};
use crate::lease::RecordedState;

use crate::port::projections::{Lease, NewDeadLetter, ProjectionState, ProjectionStore, UnitId};
use crate::projection::OnError;

mod read_loop;

/// How a batch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Committed,
    /// The checkpoint was not where the batch started (a retry of a batch
    /// whose commit had in fact succeeded): go on from where it is.
    Moved(Checkpoint),
    /// The claim is gone (another runner took over, or a reset): stop.
    Lost,
    /// Stopped on an error (policy `Stop`), or asked to stop.
    Stopped,
}

/// Trims a batch read with one event more than `batch_size` to whole
/// transactions: a handler then always sees all events of a command in one
/// batch (unless one command alone fills a batch). Returns whether the read
/// reached the end of what is readable (no extra event came back).
pub(crate) fn whole_transactions(events: &mut Vec<RecordedEvent>, batch_size: usize) -> bool {
    let batch_size = batch_size.max(1);
    if events.len() <= batch_size {
        return true;
    }
    let next_tx = events[batch_size].transaction_id;
    events.truncate(batch_size);
    if events[batch_size - 1].transaction_id == next_tx {
        let cut = events.partition_point(|e| e.transaction_id != next_tx);
        if cut > 0 {
            events.truncate(cut);
        }
    }
    false
}

/// The status text of a unit retrying on an error that is not the event's
/// fault: `"<kind> error: <chain>"`.
fn failing(kind: ErrorKind, chain: &str) -> String {
    format!("{kind} error: {chain}")
}

/// Runs one owned unit until it is stopped, loses its claim or fails for good.
pub(super) struct UnitWorker<S: ProjectionStore> {
    shared: Arc<Shared<S>>,
    registered: Arc<Registered<S>>,
    lease: Lease,
    stop: CancellationToken,
    /// Cancelled when the node shuts down with a drain: stop once caught up.
    draining: CancellationToken,
    paused: watch::Receiver<bool>,
    state: RecordedState,
}

impl<S: ProjectionStore> UnitWorker<S> {
    pub(super) fn new(
        shared: Arc<Shared<S>>,
        registered: Arc<Registered<S>>,
        lease: Lease,
        stop: CancellationToken,
        draining: CancellationToken,
        paused: watch::Receiver<bool>,
    ) -> Self {
        UnitWorker {
            shared,
            registered,
            lease,
            stop,
            draining,
            paused,
            state: RecordedState::default(),
        }
    }

    pub(super) async fn run(mut self) -> UnitId {
        let unit = self.lease.unit.clone();
        let span = tracing::info_span!("projection", projection = %unit.projection, partition = unit.partition);
        let lost = self.run_loop().instrument(span).await;
        let store = &self.shared.store;
        let released = if lost {
            // The epoch moved (another node claimed the unit, or an operator
            // reset it from elsewhere): never keep the lease alive.
            store.give_up(&unit, &self.shared.node_id).await
        } else {
            store.release(&self.lease, &self.shared.node_id).await
        };
        if let Err(error) = released {
            tracing::warn!(%unit, error = %crate::error::error_chain(&error), "releasing failed (the lease will expire)");
        }
        unit
    }

    /// Applies a batch with the retry policy; splits a failing batch to find
    /// the poison event, then parks it or stops.
    async fn process(
        &mut self,
        events: &[RecordedEvent],
        from: Checkpoint,
        target: Checkpoint,
        split: bool,
    ) -> Outcome {
        let retry = self.registered.retry;
        let mut attempts = 0u32;
        let mut environment = Backoff::from_policy(&retry);
        let mut first_failed = None;
        loop {
            let error = match self.commit(events, from, target).await {
                Ok(outcome) => return outcome,
                Err(error) => error,
            };
            let kind = error.kind_with(|e| self.shared.store.classify(e));
            if kind != ErrorKind::Data {
                // Not the event's fault: stay on it until the failure passes
                // or someone fixes what is missing, and say so in status.
                let message = failing(kind, &error.chain());
                if environment.failures() == 0 || kind == ErrorKind::Infrastructure {
                    tracing::warn!(kind = %kind, error = %error.chain(), "batch failed; retrying");
                }
                self.set_state(ProjectionState::Retrying, Some((kind, message)))
                    .await;
                if !environment.wait(&self.stop).await {
                    return Outcome::Stopped;
                }
                continue;
            }
            attempts += 1;
            first_failed.get_or_insert_with(Utc::now);
            tracing::warn!(
                attempts,
                events = events.len(),
                error = %error.chain(),
                "batch failed"
            );
            if attempts < retry.max_attempts.max(1) {
                self.set_state(ProjectionState::Retrying, Some((kind, error.chain())))
                    .await;
                let delay = retry.backoff(attempts);
                if !self.sleep(delay).await {
                    return Outcome::Stopped;
                }
                continue;
            }
            if split && events.len() > 1 {
                // Find the poison event: go one event at a time.
                let mut at = from;
                for (i, event) in events.iter().enumerate() {
                    let single_target = if i + 1 == events.len() {
                        target
                    } else {
                        event.checkpoint()
                    };
                    if single_target <= at {
                        continue;
                    }
                    let outcome = Box::pin(self.process(
                        std::slice::from_ref(event),
                        at,
                        single_target,
                        false,
                    ))
                    .await;
                    match outcome {
                        Outcome::Committed => at = single_target,
                        Outcome::Moved(moved) => at = moved,
                        other => return other,
                    }
                }
                return if at == target {
                    Outcome::Committed
                } else {
                    Outcome::Moved(at)
                };
            }
            let Some(event) = events.first() else {
                return Outcome::Committed;
            };
            return match self.registered.on_error {
                OnError::Park => {
                    self.park(event, &error, attempts, first_failed, from, target)
                        .await
                }
                OnError::Stop => {
                    let message = format!("{}: {}", event.event_ref(), error.chain());
                    tracing::error!(event = %event.event_ref(), error = %error.chain(), "projection stopped");
                    self.set_state(ProjectionState::Stopped, Some((kind, message)))
                        .await;
                    Outcome::Stopped
                }
            };
        }
    }

    /// A row of the log that does not decode, found right after `from`:
    /// parked (the checkpoint moves onto it: `Moved`) or the unit stopped,
    /// per the projection's policy; never handed to the handler.
    async fn undecodable(&mut self, error: StoreError, from: Checkpoint) -> Outcome {
        let StoreError::Undecodable {
            event,
            event_id,
            transaction_id,
            ..
        } = &error
        else {
            return Outcome::Stopped;
        };
        let at = Checkpoint::new(*transaction_id, event.position.unwrap_or_default());
        if at <= from {
            // Not after the checkpoint: nothing this unit can skip.
            self.set_state(
                ProjectionState::Retrying,
                Some((error.kind(), error_chain(&error))),
            )
            .await;
            return if self.sleep(Duration::from_secs(1)).await {
                Outcome::Moved(from)
            } else {
                Outcome::Stopped
            };
        }
        // What the dead letter records of it; the payload stays in the log.
        let placeholder = RecordedEvent {
            event_id: *event_id,
            aggregate_type: event.aggregate_type.clone(),
            aggregate_id: event.aggregate_id.clone(),
            sequence: event.sequence,
            position: at.position,
            transaction_id: at.transaction_id,
            recorded_at: Utc::now(),
            event_type: event.event_type.clone(),
            event_version: event.event_version.clone(),
            payload: serde_json::Value::Null,
            metadata: Default::default(),
            correlation_id: None,
            causation_id: None,
        };
        let message = error_chain(&error);
        match self.registered.on_error {
            OnError::Park => {
                tracing::error!(event = %event, error = %message, "a stored event does not decode");
                let handler_error = HandlerError::data(error);
                match self
                    .park(&placeholder, &handler_error, 1, None, from, at)
                    .await
                {
                    Outcome::Committed => Outcome::Moved(at),
                    other => other,
                }
            }
            OnError::Stop => {
                tracing::error!(event = %event, error = %message, "projection stopped: a stored event does not decode");
                self.set_state(ProjectionState::Stopped, Some((error.kind(), message)))
                    .await;
                Outcome::Stopped
            }
        }
    }

    /// The effects, then one transaction: move the checkpoint from `from` to
    /// `to` under our epoch (first, so the unit is held before the read
    /// model's rows), let the handler write, commit.
    async fn commit(
        &self,
        events: &[RecordedEvent],
        from: Checkpoint,
        to: Checkpoint,
    ) -> Result<Outcome, HandlerError> {
        let store = &self.shared.store;
        let started = Instant::now();
        // The handler opens the batch's personal values with their keys,
        // read here in one go.
        let ring = self.shared.log.key_ring();
        if let Some(ring) = &ring {
            ring.prepare(events).await?;
        }
        let apply = async {
            if !events.is_empty() {
                self.registered.projection.effects(events).await?;
            }
            let mut tx = store.begin().await?;
            if !store
                .save_checkpoint(&mut tx, &self.lease, from, to, events.len() as u64)
                .await?
            {
                drop(tx);
                return Ok(false);
            }
            if !events.is_empty() {
                self.registered.projection.handle(events, &mut tx).await?;
            }
            store.commit(tx).await?;
            Ok::<_, HandlerError>(true)
        };
        if !crate::personal::in_scope(ring, apply).await? {
            return Ok(self.refused().await?);
        }
        store.signal_checkpoints();
        self.shared
            .view
            .committed(&self.lease.unit, self.lease.epoch, to, None);
        let name = self.registered.name.clone();
        if !events.is_empty() {
            metrics::counter!("outflow_projection_events_total", "projection" => name.clone())
                .increment(events.len() as u64);
            metrics::histogram!("outflow_projection_batch_seconds", "projection" => name.clone())
                .record(started.elapsed().as_secs_f64());
            tracing::debug!(events = events.len(), checkpoint = %to, "batch committed");
        }
        metrics::gauge!("outflow_projection_position", "projection" => name)
            .set(to.position as f64);
        Ok(Outcome::Committed)
    }

    /// Why a checkpoint write was refused: the claim is gone, or the
    /// checkpoint moved (an earlier attempt of this batch committed after
    /// all).
    async fn refused(&self) -> Result<Outcome, StoreError> {
        let units = self
            .shared
            .store
            .units(Some(&self.lease.unit.projection))
            .await?;
        Ok(
            match units.into_iter().find(|u| u.unit == self.lease.unit) {
                Some(unit) if unit.epoch == self.lease.epoch => {
                    tracing::info!(checkpoint = %unit.checkpoint, "checkpoint had moved; going on from there");
                    Outcome::Moved(unit.checkpoint)
                }
                _ => Outcome::Lost,
            },
        )
    }

    async fn park(
        &mut self,
        event: &RecordedEvent,
        error: &HandlerError,
        attempts: u32,
        first_failed: Option<chrono::DateTime<Utc>>,
        from: Checkpoint,
        target: Checkpoint,
    ) -> Outcome {
        let store = self.shared.store.clone();
        let mut failures = Backoff::from_policy(&self.registered.retry);
        loop {
            let attempt = async {
                let mut tx = store.begin().await?;
                if !store
                    .save_checkpoint(&mut tx, &self.lease, from, target, 1)
                    .await?
                {
                    drop(tx);
                    return self.refused().await;
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
                    if outcome == Outcome::Committed {
                        tracing::warn!(event = %event.event_ref(), error = %error.chain(), "event parked");
                        metrics::counter!("outflow_projection_parked_total", "projection" => self.registered.name.clone()).increment(1);
                        store.signal_checkpoints();
                        self.shared.view.committed(
                            &self.lease.unit,
                            self.lease.epoch,
                            target,
                            Some(event.checkpoint()),
                        );
                    }
                    return outcome;
                }
                Err(store_error) => {
                    self.set_state(
                        ProjectionState::Retrying,
                        Some((store_error.kind(), error_chain(&store_error))),
                    )
                    .await;
                    if !failures.wait(&self.stop).await {
                        return Outcome::Stopped;
                    }
                }
            }
        }
    }

    async fn set_state(&mut self, state: ProjectionState, error: Option<(ErrorKind, String)>) {
        self.state
            .set(&self.shared.store, &self.lease, state, error)
            .await;
    }

    /// Sleeps unless stopped first; `false` when stopped.
    async fn sleep(&self, duration: Duration) -> bool {
        tokio::select! {
            _ = self.stop.cancelled() => false,
            _ = tokio::time::sleep(duration) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Metadata;

    fn event(transaction_id: u64, position: u64) -> RecordedEvent {
        RecordedEvent {
            event_id: uuid::Uuid::new_v4(),
            aggregate_type: "a".into(),
            aggregate_id: "1".into(),
            sequence: position,
            position,
            transaction_id,
            recorded_at: Utc::now(),
            event_type: "E".into(),
            event_version: "1".into(),
            payload: serde_json::Value::Null,
            metadata: Metadata::new(),
            correlation_id: None,
            causation_id: None,
        }
    }

    fn txs(events: &[RecordedEvent]) -> Vec<u64> {
        events.iter().map(|e| e.transaction_id).collect()
    }

    #[test]
    fn a_short_read_is_caught_up_and_kept_whole() {
        let mut events = vec![event(1, 1), event(2, 2)];
        assert!(whole_transactions(&mut events, 2));
        assert_eq!(txs(&events), [1, 2]);
    }

    #[test]
    fn a_transaction_cut_by_the_batch_end_waits_for_the_next_batch() {
        // Batch of 3 read with one more: transaction 2 spans the cut.
        let mut events = vec![event(1, 1), event(2, 2), event(2, 3), event(2, 4)];
        assert!(!whole_transactions(&mut events, 3));
        assert_eq!(txs(&events), [1]);
    }

    #[test]
    fn a_transaction_ending_at_the_batch_end_stays() {
        let mut events = vec![event(1, 1), event(2, 2), event(2, 3), event(3, 4)];
        assert!(!whole_transactions(&mut events, 3));
        assert_eq!(txs(&events), [1, 2, 2]);
    }

    #[test]
    fn one_transaction_larger_than_a_batch_is_split() {
        let mut events = vec![event(7, 1), event(7, 2), event(7, 3)];
        assert!(!whole_transactions(&mut events, 2));
        assert_eq!(txs(&events), [7, 7]);
    }
}
