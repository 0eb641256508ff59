//! Checkpoints, leases and node liveness for the projections' units.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::Utc;

use crate::error::ErrorKind;
use crate::error::StoreError;
use crate::event::Checkpoint;
use crate::port::projections::{
    same_partitions, Checkpoints, Lease, Leases, ProjectionState, UnitError, UnitId, UnitRecord,
};
use crate::wake::Wakeups;

use super::state::*;

#[async_trait]
impl Checkpoints for MemoryStore {
    async fn register_projection(&self, name: &str, partitions: u32) -> Result<(), StoreError> {
        let mut state = self.state();
        same_partitions(
            name,
            state
                .units
                .iter()
                .filter(|(unit, _)| unit.projection == name)
                .map(|(_, u)| i64::from(u.partitions)),
            partitions,
        )?;
        for partition in 0..partitions {
            state
                .units
                .entry(UnitId {
                    projection: name.to_owned(),
                    partition,
                })
                .or_insert_with(|| Unit {
                    partitions,
                    checkpoint: Checkpoint::START,
                    owner: None,
                    lease_until: None,
                    epoch: 0,
                    state: ProjectionState::Idle,
                    paused: false,
                    last_error: None,
                    processed: 0,
                    rebuild_total: None,
                    updated_at: Utc::now(),
                });
        }
        Ok(())
    }

    async fn save_checkpoint(
        &self,
        tx: &mut MemoryTransaction,
        lease: &Lease,
        from: Checkpoint,
        to: Checkpoint,
        processed: u64,
    ) -> Result<bool, StoreError> {
        let current = self
            .state()
            .units
            .get(&lease.unit)
            .map(|u| (u.epoch, u.checkpoint));
        if current != Some((lease.epoch, from)) {
            return Ok(false);
        }
        tx.ops.push(PendingOp::Checkpoint {
            unit: lease.unit.clone(),
            epoch: lease.epoch,
            from,
            checkpoint: to,
            processed,
        });
        Ok(true)
    }

    async fn set_state(
        &self,
        lease: &Lease,
        new_state: ProjectionState,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        self.write_state(lease, new_state, error.map(|e| (e.to_owned(), None)));
        Ok(())
    }

    async fn record_state(
        &self,
        lease: &Lease,
        new_state: ProjectionState,
        error: Option<UnitError<'_>>,
    ) -> Result<(), StoreError> {
        self.write_state(
            lease,
            new_state,
            error.map(|e| (e.message.to_owned(), Some(e.kind))),
        );
        Ok(())
    }

    async fn units(&self, projection: Option<&str>) -> Result<Vec<UnitRecord>, StoreError> {
        let state = self.state();
        let now = Instant::now();
        Ok(state
            .units
            .iter()
            .filter(|(unit, _)| projection.is_none_or(|p| unit.projection == p))
            .map(|(unit, u)| UnitRecord {
                unit: unit.clone(),
                partitions: u.partitions,
                checkpoint: u.checkpoint,
                owner: u.owner.clone(),
                lease_valid: u.lease_valid(now),
                epoch: u.epoch,
                state: u.state,
                paused: u.paused,
                last_error: u.last_error.as_ref().map(|(text, _)| text.clone()),
                error_kind: u.last_error.as_ref().and_then(|(_, kind)| *kind),
                processed: u.processed,
                rebuild_total: u.rebuild_total,
                updated_at: u.updated_at,
                last_parked: state
                    .dead_letters
                    .values()
                    .filter(|d| d.unit == *unit)
                    .map(|d| d.checkpoint)
                    .max(),
            })
            .collect())
    }

    async fn reset_projection(
        &self,
        tx: &mut MemoryTransaction,
        name: &str,
        rebuild_total: u64,
    ) -> Result<(), StoreError> {
        self.reset_projection_to(tx, name, Checkpoint::START, rebuild_total)
            .await
    }

    async fn reset_projection_to(
        &self,
        tx: &mut MemoryTransaction,
        name: &str,
        to: Checkpoint,
        rebuild_total: u64,
    ) -> Result<(), StoreError> {
        tx.ops.push(PendingOp::Reset {
            name: name.to_owned(),
            to,
            total: rebuild_total,
        });
        Ok(())
    }

    async fn set_paused(&self, name: &str, paused: bool) -> Result<(), StoreError> {
        {
            let mut state = self.state();
            for (unit, u) in state.units.iter_mut() {
                if unit.projection == name {
                    u.paused = paused;
                }
            }
        }
        self.signal_checkpoints();
        Ok(())
    }

    async fn request_rebuild(&self, name: &str) -> Result<bool, StoreError> {
        let known = {
            let mut state = self.state();
            let known = state.units.keys().any(|unit| unit.projection == name);
            if known {
                state.rebuild_requests.insert(name.to_owned());
            }
            known
        };
        self.signal_checkpoints();
        Ok(known)
    }

    async fn rebuild_requests(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.state().rebuild_requests.iter().cloned().collect())
    }

    /// Taken at commit; of two transactions that took it, the second fails
    /// its commit.
    async fn take_rebuild_request(
        &self,
        tx: &mut Self::Transaction,
        name: &str,
    ) -> Result<bool, StoreError> {
        if !self.state().rebuild_requests.contains(name) {
            return Ok(false);
        }
        tx.ops.push(PendingOp::TakeRebuildRequest(name.to_owned()));
        Ok(true)
    }

    async fn restart_projection(&self, name: &str) -> Result<(), StoreError> {
        {
            let mut state = self.state();
            for (unit, u) in state.units.iter_mut() {
                if unit.projection == name && u.state == ProjectionState::Stopped {
                    u.state = ProjectionState::Idle;
                    u.last_error = None;
                    u.owner = None;
                    u.lease_until = None;
                }
            }
        }
        self.signal_checkpoints();
        Ok(())
    }

    fn signal_checkpoints(&self) {
        self.inner.checkpoint_wake.wake();
    }

    fn checkpoint_wakeups(&self) -> Wakeups {
        self.inner
            .checkpoint_wake
            .subscribe(self.inner.poll_interval)
    }
}

#[async_trait]
impl Leases for MemoryStore {
    async fn node_heartbeat(&self, node: &str, ttl: Duration) -> Result<Vec<String>, StoreError> {
        let mut state = self.state();
        let now = Instant::now();
        state.nodes.insert(node.to_owned(), now + ttl);
        let mut live: Vec<String> = state
            .nodes
            .iter()
            .filter(|(_, &until)| until >= now)
            .map(|(node, _)| node.clone())
            .collect();
        live.sort();
        Ok(live)
    }

    async fn claim(
        &self,
        unit: &UnitId,
        node: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        let mut state = self.state();
        let now = Instant::now();
        let Some(u) = state.units.get_mut(unit) else {
            return Ok(None);
        };
        let mine = u.owner.as_deref() == Some(node) && u.lease_valid(now);
        if u.state == ProjectionState::Stopped || (u.lease_valid(now) && !mine) {
            return Ok(None);
        }
        if !mine {
            // A new attempt: the last error was the previous owner's.
            u.epoch += 1;
            u.last_error = None;
        }
        u.owner = Some(node.to_owned());
        u.lease_until = Some(now + ttl);
        Ok(Some(Lease {
            unit: unit.clone(),
            epoch: u.epoch,
            checkpoint: u.checkpoint,
            paused: u.paused,
        }))
    }

    async fn renew(&self, node: &str, ttl: Duration) -> Result<Vec<Lease>, StoreError> {
        let mut state = self.state();
        let now = Instant::now();
        Ok(state
            .units
            .iter_mut()
            .filter(|(_, u)| u.owner.as_deref() == Some(node) && u.lease_valid(now))
            .map(|(unit, u)| {
                u.lease_until = Some(now + ttl);
                Lease {
                    unit: unit.clone(),
                    epoch: u.epoch,
                    checkpoint: u.checkpoint,
                    paused: u.paused,
                }
            })
            .collect())
    }

    async fn release(&self, lease: &Lease, node: &str) -> Result<(), StoreError> {
        let mut state = self.state();
        if let Some(u) = state.units.get_mut(&lease.unit) {
            if u.epoch == lease.epoch && u.owner.as_deref() == Some(node) {
                u.owner = None;
                u.lease_until = None;
            }
        }
        Ok(())
    }

    async fn give_up(&self, unit: &UnitId, node: &str) -> Result<(), StoreError> {
        let mut state = self.state();
        if let Some(u) = state.units.get_mut(unit) {
            if u.owner.as_deref() == Some(node) {
                u.owner = None;
                u.lease_until = None;
            }
        }
        Ok(())
    }

    async fn deregister(&self, node: &str) -> Result<(), StoreError> {
        let mut state = self.state();
        state.nodes.remove(node);
        for u in state.units.values_mut() {
            if u.owner.as_deref() == Some(node) {
                u.owner = None;
                u.lease_until = None;
            }
        }
        Ok(())
    }
}

impl MemoryStore {
    /// Records a unit's state and last error while `lease`'s epoch is
    /// current.
    fn write_state(
        &self,
        lease: &Lease,
        new_state: ProjectionState,
        error: Option<(String, Option<ErrorKind>)>,
    ) {
        let mut state = self.state();
        if let Some(u) = state.units.get_mut(&lease.unit) {
            if u.epoch == lease.epoch {
                u.state = new_state;
                u.last_error = error;
                u.updated_at = Utc::now();
            }
        }
    }
}
