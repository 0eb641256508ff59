//! Parked events, and the inbox of handled messages.

use async_trait::async_trait;
use chrono::Utc;

use crate::error::StoreError;
use crate::port::projections::{DeadLetter, DeadLetters, Inbox, NewDeadLetter, UnitId};

use super::state::*;

#[async_trait]
impl DeadLetters for MemoryStore {
    async fn park(
        &self,
        tx: &mut MemoryTransaction,
        dead_letter: NewDeadLetter<'_>,
    ) -> Result<(), StoreError> {
        let event = dead_letter.event;
        tx.ops.push(PendingOp::Park(Box::new(DeadLetter {
            id: 0,
            unit: dead_letter.unit.clone(),
            event_id: event.event_id,
            checkpoint: event.checkpoint(),
            event: event.event_ref(),
            error: dead_letter.error,
            attempts: dead_letter.attempts,
            first_failed_at: dead_letter.first_failed_at,
            last_failed_at: Utc::now(),
        })));
        Ok(())
    }

    async fn dead_letters(&self, projection: &str) -> Result<Vec<DeadLetter>, StoreError> {
        Ok(self
            .state()
            .dead_letters
            .values()
            .filter(|d| d.unit.projection == projection)
            .cloned()
            .collect())
    }

    async fn take_dead_letter(
        &self,
        tx: &mut MemoryTransaction,
        id: u64,
    ) -> Result<Option<DeadLetter>, StoreError> {
        let mut state = self.state();
        let found = state.dead_letters.get(&id).cloned();
        if found.is_some() {
            state.retry_requests.remove(&id);
            tx.ops.push(PendingOp::RemoveDeadLetter(id));
        }
        Ok(found)
    }

    async fn note_dead_letter_failure(&self, id: u64, error: &str) -> Result<(), StoreError> {
        let mut state = self.state();
        state.retry_requests.remove(&id);
        if let Some(d) = state.dead_letters.get_mut(&id) {
            d.attempts += 1;
            d.error = error.to_owned();
            d.last_failed_at = Utc::now();
        }
        Ok(())
    }

    async fn discard_dead_letter(&self, id: u64) -> Result<bool, StoreError> {
        let mut state = self.state();
        state.retry_requests.remove(&id);
        Ok(state.dead_letters.remove(&id).is_some())
    }

    async fn request_retry(&self, id: u64) -> Result<bool, StoreError> {
        let mut state = self.state();
        let known = state.dead_letters.contains_key(&id);
        if known {
            state.retry_requests.insert(id);
        }
        Ok(known)
    }

    async fn retry_requests(&self) -> Result<Vec<(UnitId, u64)>, StoreError> {
        let state = self.state();
        Ok(state
            .retry_requests
            .iter()
            .filter_map(|id| {
                let d = state.dead_letters.get(id)?;
                Some((d.unit.clone(), *id))
            })
            .collect())
    }
}

#[async_trait]
impl Inbox for MemoryStore {
    async fn inbox_claim(
        &self,
        tx: &mut MemoryTransaction,
        handler: &str,
        message_id: &str,
    ) -> Result<bool, StoreError> {
        let key = (handler.to_owned(), message_id.to_owned());
        let pending = tx
            .ops
            .iter()
            .any(|op| matches!(op, PendingOp::Inbox(h, m) if *h == key.0 && *m == key.1));
        if pending || self.state().inbox.contains(&key) {
            return Ok(false);
        }
        tx.ops.push(PendingOp::Inbox(key.0, key.1));
        Ok(true)
    }
}
