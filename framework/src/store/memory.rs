//! An in-memory event store with the same log semantics and concurrency
//! checks as the durable ones. For unit tests and examples: it keeps
//! everything in process memory and loses it on exit.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::error::{ConfigError, StoreError};
use crate::event::{AppendRequest, Checkpoint, RecordedEvent, Snapshot};
use crate::log::EventLog;
use crate::log::LogFilter;
use crate::outcome::CommandOutcome;
use crate::store::projections::{
    Checkpoints, DeadLetter, DeadLetters, Inbox, Lease, Leases, NewDeadLetter, ProjectionState,
    UnitId, UnitRecord,
};
use crate::store::{AppendInTransaction, EventStore, LoadedStream, StreamEvent, Transactional};
use crate::wake::{WakeSignal, Wakeups};
use uuid::Uuid;

/// An in-memory [`EventStore`]. Cloning is cheap and shares the same events.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use outflow::{CommandBus, MemoryStore};
/// # use outflow::doc_fixture::{Counter, CounterCommand};
/// let store = MemoryStore::new();
/// let bus = CommandBus::<Counter, _>::new(store.clone(), ());
/// let committed = bus.execute("c-1", CounterCommand::Increment { by: 5 }).await?;
/// assert_eq!(committed.version, 1);
/// assert_eq!(committed.events[0].position, 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Clone, Debug)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    wake: WakeSignal,
    checkpoint_wake: WakeSignal,
    poll_interval: Duration,
}

#[derive(Debug, Default)]
struct State {
    /// The log, in commit order; positions are 1-based indexes.
    log: Vec<RecordedEvent>,
    /// Log indexes of each stream's events, in sequence order.
    streams: HashMap<(String, String), Vec<usize>>,
    snapshots: HashMap<(String, String), Snapshot>,
    transactions: u64,
    units: BTreeMap<UnitId, Unit>,
    nodes: HashMap<String, Instant>,
    dead_letters: BTreeMap<u64, DeadLetter>,
    next_dead_letter: u64,
    inbox: HashSet<(String, String)>,
    outcomes: HashMap<(String, String, Uuid), CommandOutcome>,
}

impl State {
    /// A conflict when an outcome for the command is already stored.
    fn check_unclaimed(&self, key: &(String, String, Uuid)) -> Result<(), StoreError> {
        match self.outcomes.get(key) {
            Some(stored) => Err(StoreError::Conflict {
                aggregate_type: key.0.clone(),
                aggregate_id: key.1.clone(),
                expected: stored.version,
                actual: None,
            }),
            None => Ok(()),
        }
    }

    fn claim(&mut self, key: (String, String, Uuid), version: u64) {
        let outcome = CommandOutcome {
            aggregate_type: key.0.clone(),
            aggregate_id: key.1.clone(),
            command_id: key.2,
            version,
            recorded_at: Utc::now(),
            refusal: None,
        };
        self.outcomes.insert(key, outcome);
    }
}

#[derive(Debug, Clone)]
struct Unit {
    partitions: u32,
    checkpoint: Checkpoint,
    owner: Option<String>,
    lease_until: Option<Instant>,
    epoch: u64,
    state: ProjectionState,
    paused: bool,
    last_error: Option<String>,
    processed: u64,
    rebuild_total: Option<u64>,
    updated_at: DateTime<Utc>,
}

impl Unit {
    fn lease_valid(&self, now: Instant) -> bool {
        self.owner.is_some() && self.lease_until.is_some_and(|until| until >= now)
    }
}

impl State {
    /// Fails with a conflict unless the request's stream is at its expected version.
    fn check_version(&self, request: &AppendRequest) -> Result<(), StoreError> {
        let key = (request.aggregate_type.clone(), request.aggregate_id.clone());
        let actual = self.streams.get(&key).map_or(0, |s| s.len() as u64);
        if actual == request.expected_version {
            return Ok(());
        }
        Err(StoreError::Conflict {
            aggregate_type: request.aggregate_type.clone(),
            aggregate_id: request.aggregate_id.clone(),
            expected: request.expected_version,
            actual: Some(actual),
        })
    }

    /// The request's events as they will stand at the end of the log, under
    /// a new transaction id (not yet in the log: see [`push`](Self::push)).
    fn recorded(&mut self, request: AppendRequest) -> Vec<RecordedEvent> {
        self.transactions += 1;
        let transaction_id = self.transactions;
        let log_len = self.log.len();
        let recorded_at = Utc::now();
        request
            .events
            .into_iter()
            .enumerate()
            .map(|(offset, event)| RecordedEvent {
                event_id: event.event_id,
                aggregate_type: request.aggregate_type.clone(),
                aggregate_id: request.aggregate_id.clone(),
                sequence: request.expected_version + offset as u64 + 1,
                position: (log_len + offset) as u64 + 1,
                transaction_id,
                recorded_at,
                event_type: event.event_type,
                event_version: event.event_version,
                payload: event.payload,
                metadata: event.metadata,
                correlation_id: event.correlation_id,
                causation_id: event.causation_id,
            })
            .collect()
    }

    /// Appends recorded events to the log and to their streams.
    fn push(&mut self, events: Vec<RecordedEvent>) {
        for event in events {
            let index = self.log.len();
            let key = (event.aggregate_type.clone(), event.aggregate_id.clone());
            self.log.push(event);
            self.streams.entry(key).or_default().push(index);
        }
    }
}

/// The in-memory store's transaction: its writes are buffered and applied
/// together at commit, and dropped on rollback (drop).
#[derive(Debug, Default)]
pub struct MemoryTransaction {
    ops: Vec<PendingOp>,
}

#[derive(Debug)]
enum PendingOp {
    Checkpoint {
        unit: UnitId,
        epoch: u64,
        from: Checkpoint,
        checkpoint: Checkpoint,
        processed: u64,
    },
    Park(Box<DeadLetter>),
    Reset {
        name: String,
        total: u64,
    },
    Inbox(String, String),
    RemoveDeadLetter(u64),
    Append {
        events: Vec<RecordedEvent>,
        log_len: usize,
        expected_version: u64,
    },
    Claim {
        key: (String, String, Uuid),
        version: u64,
    },
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryStore {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                wake: WakeSignal::new(),
                checkpoint_wake: WakeSignal::new(),
                poll_interval: Duration::from_millis(500),
            }),
        }
    }

    /// Number of events stored.
    pub fn len(&self) -> usize {
        self.state().log.len()
    }

    /// `true` when no event is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-written:
        // every mutation below is checked before it starts.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
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
}

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
            .filter(|e| filter.matches(e))
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
            .filter(|e| e.checkpoint() > after && e.checkpoint() <= upto && filter.matches(e))
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
            .find(|e| e.checkpoint() > after && filter.matches(e))
            .map(|e| e.recorded_at))
    }
}

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
                PendingOp::Reset { name, total } => {
                    for (unit, u) in state.units.iter_mut() {
                        if unit.projection == name {
                            u.checkpoint = Checkpoint::START;
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
            }
        }
        drop(state);
        if appended {
            self.inner.wake.wake();
        }
        Ok(())
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
impl Checkpoints for MemoryStore {
    async fn register_projection(&self, name: &str, partitions: u32) -> Result<(), StoreError> {
        let mut state = self.state();
        if let Some((_, u)) = state
            .units
            .iter()
            .find(|(unit, u)| unit.projection == name && u.partitions != partitions)
        {
            return Err(ConfigError::PartitionCount {
                name: name.to_owned(),
                stored: u.partitions.to_string(),
                configured: partitions,
            }
            .into());
        }
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
        let mut state = self.state();
        if let Some(u) = state.units.get_mut(&lease.unit) {
            if u.epoch == lease.epoch {
                u.state = new_state;
                u.last_error = error.map(str::to_owned);
                u.updated_at = Utc::now();
            }
        }
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
                last_error: u.last_error.clone(),
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
        tx.ops.push(PendingOp::Reset {
            name: name.to_owned(),
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
        let found = self.state().dead_letters.get(&id).cloned();
        if found.is_some() {
            tx.ops.push(PendingOp::RemoveDeadLetter(id));
        }
        Ok(found)
    }

    async fn note_dead_letter_failure(&self, id: u64, error: &str) -> Result<(), StoreError> {
        if let Some(d) = self.state().dead_letters.get_mut(&id) {
            d.attempts += 1;
            d.error = error.to_owned();
            d.last_failed_at = Utc::now();
        }
        Ok(())
    }

    async fn discard_dead_letter(&self, id: u64) -> Result<bool, StoreError> {
        Ok(self.state().dead_letters.remove(&id).is_some())
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
