//! The log in append order, its head, and wake-ups for tailing readers.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::error::StoreError;
use crate::event::{Checkpoint, RecordedEvent};
use crate::port::log::EventLog;
use crate::port::log::LogFilter;
use crate::wake::Wakeups;

use super::state::*;

#[async_trait]
impl EventLog for MemoryStore {
    async fn read_log(
        &self,
        after: Checkpoint,
        filter: &LogFilter,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let state = self.state();
        // The log is in checkpoint order: transactions are numbered at commit.
        let start = state.log.partition_point(|e| e.checkpoint() <= after);
        Ok(state.log[start..]
            .iter()
            .filter(|e| state.passes(filter, e))
            .take(limit)
            .cloned()
            .collect())
    }

    async fn head(&self) -> Result<Checkpoint, StoreError> {
        Ok(self
            .state()
            .log
            .last()
            .map_or(Checkpoint::START, RecordedEvent::checkpoint))
    }

    fn wakeups(&self) -> Wakeups {
        self.inner.wake.subscribe(self.inner.poll_interval)
    }

    async fn count_events(
        &self,
        filter: &LogFilter,
        after: Checkpoint,
        upto: Checkpoint,
        cap: u64,
    ) -> Result<u64, StoreError> {
        let state = self.state();
        Ok(state
            .log
            .iter()
            .filter(|e| e.checkpoint() > after && e.checkpoint() <= upto && state.passes(filter, e))
            .take(usize::try_from(cap).unwrap_or(usize::MAX))
            .count() as u64)
    }

    async fn first_pending_recorded_at(
        &self,
        filter: &LogFilter,
        after: Checkpoint,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        let state = self.state();
        Ok(state
            .log
            .iter()
            .find(|e| e.checkpoint() > after && state.passes(filter, e))
            .map(|e| e.recorded_at))
    }

    fn key_ring(&self) -> Option<crate::personal::KeyRing> {
        Some(MemoryStore::key_ring(self))
    }
}
