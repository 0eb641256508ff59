//! Appends and loads, with the same version checks as the durable
//! stores, and appends joined to a caller's transaction.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::error::StoreError;
use crate::event::{AppendRequest, RecordedEvent, Snapshot};
use crate::outcome::CommandOutcome;
use crate::port::events::{AppendInTransaction, EventStore, LoadedStream, StreamEvent};
use uuid::Uuid;

use super::state::*;

impl MemoryStore {
    /// Appends at a given time: what a copy of another log writes.
    pub(crate) fn append_recorded_at(
        &self,
        request: AppendRequest,
        recorded_at: DateTime<Utc>,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        request.validate()?;
        if request.events.is_empty() {
            return Ok(Vec::new());
        }
        let written = {
            let mut state = self.state();
            state.check_version(&request)?;
            let written = state.recorded_at(request, recorded_at);
            state.push(written.clone());
            written
        };
        self.inner.wake.wake();
        Ok(written)
    }
}

#[async_trait]
impl EventStore for MemoryStore {
    async fn append(&self, request: AppendRequest) -> Result<Vec<RecordedEvent>, StoreError> {
        request.validate()?;
        if request.events.is_empty() {
            return Ok(Vec::new());
        }
        let written = {
            let mut state = self.state();
            state.check_version(&request)?;
            let written = state.recorded(request);
            state.push(written.clone());
            written
        };
        self.inner.wake.wake();
        Ok(written)
    }

    async fn read_stream(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        after_sequence: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let state = self.state();
        let key = (aggregate_type.to_owned(), aggregate_id.to_owned());
        let Some(indexes) = state.streams.get(&key) else {
            return Ok(Vec::new());
        };
        let start = usize::try_from(after_sequence)
            .unwrap_or(usize::MAX)
            .min(indexes.len());
        Ok(indexes[start..]
            .iter()
            .take(limit)
            .map(|&i| state.log[i].clone())
            .collect())
    }

    async fn load(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        use_snapshot: bool,
    ) -> Result<LoadedStream, StoreError> {
        let snapshot = if use_snapshot {
            self.state()
                .snapshots
                .get(&(aggregate_type.to_owned(), aggregate_id.to_owned()))
                .cloned()
        } else {
            None
        };
        let after = snapshot.as_ref().map_or(0, |s| s.version);
        let events = self
            .read_stream(aggregate_type, aggregate_id, after, usize::MAX)
            .await?
            .into_iter()
            .map(|e| StreamEvent {
                sequence: e.sequence,
                position: e.position,
                event_type: e.event_type,
                event_version: e.event_version,
                payload: e.payload.to_string(),
            })
            .collect();
        Ok(LoadedStream { snapshot, events })
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        let mut state = self.state();
        let key = (
            snapshot.aggregate_type.clone(),
            snapshot.aggregate_id.clone(),
        );
        match state.snapshots.get(&key) {
            Some(stored) if stored.version >= snapshot.version => {}
            _ => {
                state.snapshots.insert(key, snapshot);
            }
        }
        Ok(())
    }

    async fn command_outcome(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        command_id: Uuid,
    ) -> Result<Option<CommandOutcome>, StoreError> {
        let key = (
            aggregate_type.to_owned(),
            aggregate_id.to_owned(),
            command_id,
        );
        Ok(self.state().outcomes.get(&key).cloned())
    }

    async fn record_outcome(&self, outcome: CommandOutcome) -> Result<CommandOutcome, StoreError> {
        let key = (
            outcome.aggregate_type.clone(),
            outcome.aggregate_id.clone(),
            outcome.command_id,
        );
        Ok(self.state().outcomes.entry(key).or_insert(outcome).clone())
    }

    async fn append_command(
        &self,
        request: AppendRequest,
        command_id: Uuid,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        request.validate()?;
        if request.events.is_empty() {
            return Ok(Vec::new());
        }
        let key = (
            request.aggregate_type.clone(),
            request.aggregate_id.clone(),
            command_id,
        );
        let version = request.expected_version + request.events.len() as u64;
        let written = {
            let mut state = self.state();
            state.check_unclaimed(&key)?;
            state.check_version(&request)?;
            let written = state.recorded(request);
            state.push(written.clone());
            state.claim(key, version);
            written
        };
        self.inner.wake.wake();
        Ok(written)
    }

    async fn prune_outcomes(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let mut state = self.state();
        let count = state.outcomes.len();
        state
            .outcomes
            .retain(|_, outcome| outcome.recorded_at >= before);
        Ok((count - state.outcomes.len()) as u64)
    }

    fn key_ring(&self) -> Option<crate::personal::KeyRing> {
        Some(MemoryStore::key_ring(self))
    }
}

#[async_trait]
impl AppendInTransaction for MemoryStore {
    async fn append_in(
        &self,
        tx: &mut MemoryTransaction,
        request: AppendRequest,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        request.validate()?;
        if request.events.is_empty() {
            return Ok(Vec::new());
        }
        let mut state = self.state();
        state.check_version(&request)?;
        if tx
            .ops
            .iter()
            .any(|op| matches!(op, PendingOp::Append { .. }))
        {
            return Err(StoreError::InvalidAppend {
                aggregate_type: request.aggregate_type,
                aggregate_id: request.aggregate_id,
                reason: "the in-memory store takes one append per transaction".into(),
            });
        }
        // Positions as they will be at commit; the commit fails with a
        // conflict if anything was appended in between.
        let log_len = state.log.len();
        let expected_version = request.expected_version;
        let events = state.recorded(request);
        tx.ops.push(PendingOp::Append {
            events: events.clone(),
            log_len,
            expected_version,
        });
        Ok(events)
    }

    async fn claim_command_in(
        &self,
        tx: &mut MemoryTransaction,
        aggregate_type: &str,
        aggregate_id: &str,
        command_id: Uuid,
        version: u64,
    ) -> Result<(), StoreError> {
        let key = (
            aggregate_type.to_owned(),
            aggregate_id.to_owned(),
            command_id,
        );
        self.state().check_unclaimed(&key)?;
        tx.ops.push(PendingOp::Claim { key, version });
        Ok(())
    }
}

#[async_trait]
impl crate::port::events::CopyTarget for MemoryStore {
    async fn append_batch(
        &self,
        groups: &[(AppendRequest, DateTime<Utc>)],
    ) -> Result<(), StoreError> {
        for (request, at) in groups {
            self.append_recorded_at(request.clone(), *at)?;
        }
        Ok(())
    }
}
