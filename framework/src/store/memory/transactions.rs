//! Transactions: writes buffered, applied together at commit.

use async_trait::async_trait;
use chrono::Utc;

use crate::error::StoreError;
use crate::port::events::Transactional;
use crate::port::projections::ProjectionState;

use super::state::*;

#[async_trait]
impl Transactional for MemoryStore {
    type Transaction = MemoryTransaction;

    async fn begin(&self) -> Result<MemoryTransaction, StoreError> {
        Ok(MemoryTransaction::default())
    }

    async fn commit(&self, tx: MemoryTransaction) -> Result<(), StoreError> {
        let mut state = self.state();
        let now = Utc::now();
        // Like the database, commit everything or nothing: a checkpoint whose
        // epoch moved meanwhile, or an append overtaken by another writer,
        // fails the whole transaction.
        for op in &tx.ops {
            if let PendingOp::Append {
                events,
                log_len,
                expected_version,
            } = op
            {
                if let Some(first) = events.first() {
                    let key = (first.aggregate_type.clone(), first.aggregate_id.clone());
                    let actual = state.streams.get(&key).map_or(0, |s| s.len() as u64);
                    if state.log.len() != *log_len || actual != *expected_version {
                        return Err(StoreError::Conflict {
                            aggregate_type: key.0,
                            aggregate_id: key.1,
                            expected: *expected_version,
                            actual: Some(actual),
                        });
                    }
                }
            }
            if let PendingOp::Claim { key, .. } = op {
                state.check_unclaimed(key)?;
            }
            // Another transaction took the request first (the database's
            // second taker finds no row; here its commit fails).
            if let PendingOp::TakeRebuildRequest(name) = op {
                if !state.rebuild_requests.contains(name) {
                    return Err(StoreError::Conflict {
                        aggregate_type: "rebuild request".into(),
                        aggregate_id: name.clone(),
                        expected: 1,
                        actual: Some(0),
                    });
                }
            }
            if let PendingOp::Checkpoint {
                unit, epoch, from, ..
            } = op
            {
                if state
                    .units
                    .get(unit)
                    .is_none_or(|u| u.epoch != *epoch || u.checkpoint != *from)
                {
                    return Err(StoreError::Conflict {
                        aggregate_type: "projection".into(),
                        aggregate_id: unit.to_string(),
                        expected: *epoch,
                        actual: state.units.get(unit).map(|u| u.epoch),
                    });
                }
            }
        }
        let mut appended = false;
        for op in tx.ops {
            match op {
                PendingOp::Checkpoint {
                    unit,
                    checkpoint,
                    processed,
                    ..
                } => {
                    if let Some(u) = state.units.get_mut(&unit) {
                        u.checkpoint = checkpoint;
                        u.processed += processed;
                        u.updated_at = now;
                    }
                }
                PendingOp::Park(parked) => {
                    state.next_dead_letter += 1;
                    let id = state.next_dead_letter;
                    let mut dead_letter = *parked;
                    dead_letter.id = id;
                    state.dead_letters.insert(id, dead_letter);
                }
                PendingOp::Reset { name, to, total } => {
                    for (unit, u) in state.units.iter_mut() {
                        if unit.projection == name {
                            u.checkpoint = to;
                            u.epoch += 1;
                            u.processed = 0;
                            u.rebuild_total = Some(total);
                            u.state = ProjectionState::CatchingUp;
                            u.last_error = None;
                            u.updated_at = now;
                        }
                    }
                }
                PendingOp::Inbox(handler, id) => {
                    state.inbox.insert((handler, id));
                }
                PendingOp::RemoveDeadLetter(id) => {
                    state.dead_letters.remove(&id);
                }
                PendingOp::Append { events, .. } => {
                    appended = true;
                    state.push(events);
                }
                PendingOp::Claim { key, version } => state.claim(key, version),
                PendingOp::TakeRebuildRequest(name) => {
                    state.rebuild_requests.remove(&name);
                }
            }
        }
        drop(state);
        if appended {
            self.inner.wake.wake();
        }
        Ok(())
    }
}
