//! The store's state behind one lock: the log, the streams, snapshots,
//! the projections' units and leases, dead letters and the inbox; and the
//! transaction that buffers writes until commit.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::error::StoreError;
use crate::event::{recorded_events, AppendRequest, Checkpoint, RecordedEvent, Snapshot};
use crate::outcome::CommandOutcome;
use crate::port::projections::{DeadLetter, ProjectionState, UnitId};
use crate::wake::WakeSignal;
use uuid::Uuid;

/// An in-memory [`EventStore`](crate::EventStore). Cloning is cheap and shares the same events.
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
    pub(super) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(super) struct Inner {
    pub(super) state: Mutex<State>,
    pub(super) wake: WakeSignal,
    pub(super) checkpoint_wake: WakeSignal,
    pub(super) poll_interval: Duration,
    /// The subjects' keys (see [`crate::personal`]).
    pub(super) keys: crate::personal::MemoryKeyStore,
    /// The ring over them, made on first use.
    pub(super) key_ring: std::sync::OnceLock<crate::personal::KeyRing>,
}

#[derive(Debug, Default)]
pub(super) struct State {
    /// The log, in commit order; positions are 1-based indexes.
    pub(super) log: Vec<RecordedEvent>,
    /// Log indexes of each stream's events, in sequence order.
    pub(super) streams: HashMap<(String, String), Vec<usize>>,
    pub(super) snapshots: HashMap<(String, String), Snapshot>,
    pub(super) transactions: u64,
    pub(super) units: BTreeMap<UnitId, Unit>,
    pub(super) nodes: HashMap<String, Instant>,
    pub(super) dead_letters: BTreeMap<u64, DeadLetter>,
    pub(super) next_dead_letter: u64,
    pub(super) inbox: HashSet<(String, String)>,
    pub(super) outcomes: HashMap<(String, String, Uuid), CommandOutcome>,
    /// Projections a rebuild is asked of (`Checkpoints::request_rebuild`).
    pub(super) rebuild_requests: std::collections::BTreeSet<String>,
    /// Dead letters a retry is asked of (`DeadLetters::request_retry`).
    pub(super) retry_requests: std::collections::BTreeSet<u64>,
    /// Tags of the events appended with tags, by event id (a rolled-back
    /// append leaves an entry no event has).
    pub(super) tags: HashMap<Uuid, Vec<String>>,
}

impl State {
    /// A conflict when an outcome for the command is already stored.
    pub(super) fn check_unclaimed(&self, key: &(String, String, Uuid)) -> Result<(), StoreError> {
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

    pub(super) fn claim(&mut self, key: (String, String, Uuid), version: u64) {
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
pub(super) struct Unit {
    pub(super) partitions: u32,
    pub(super) checkpoint: Checkpoint,
    pub(super) owner: Option<String>,
    pub(super) lease_until: Option<Instant>,
    pub(super) epoch: u64,
    pub(super) state: ProjectionState,
    pub(super) paused: bool,
    /// The last error's text and kind.
    pub(super) last_error: Option<(String, Option<crate::error::ErrorKind>)>,
    pub(super) processed: u64,
    pub(super) rebuild_total: Option<u64>,
    pub(super) updated_at: DateTime<Utc>,
}

impl Unit {
    pub(super) fn lease_valid(&self, now: Instant) -> bool {
        self.owner.is_some() && self.lease_until.is_some_and(|until| until >= now)
    }
}

impl State {
    /// Fails with a conflict unless the request's stream is at its expected version.
    pub(super) fn check_version(&self, request: &AppendRequest) -> Result<(), StoreError> {
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
    pub(super) fn recorded(&mut self, request: AppendRequest) -> Vec<RecordedEvent> {
        self.recorded_at(request, Utc::now())
    }

    /// [`recorded`](Self::recorded) at a given time (a copied log keeps its
    /// events' times).
    pub(super) fn recorded_at(
        &mut self,
        request: AppendRequest,
        recorded_at: DateTime<Utc>,
    ) -> Vec<RecordedEvent> {
        self.transactions += 1;
        let transaction_id = self.transactions;
        let log_len = self.log.len();
        let placed = recorded_events(
            &request.aggregate_type,
            &request.aggregate_id,
            request.expected_version,
            request.events,
            |i| {
                Ok::<_, std::convert::Infallible>((
                    (log_len + i) as u64 + 1,
                    transaction_id,
                    recorded_at,
                ))
            },
        );
        match placed {
            Ok(events) => events,
            Err(never) => match never {},
        }
    }

    /// Appends recorded events to the log and to their streams.
    pub(super) fn push(&mut self, events: Vec<RecordedEvent>) {
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
    pub(super) ops: Vec<PendingOp>,
}

#[derive(Debug)]
pub(super) enum PendingOp {
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
        to: Checkpoint,
        total: u64,
    },
    Inbox(String, String),
    RemoveDeadLetter(u64),
    TakeRebuildRequest(String),
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
                keys: crate::personal::MemoryKeyStore::new(),
                key_ring: std::sync::OnceLock::new(),
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

    pub(super) fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-written:
        // every mutation below is checked before it starts.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
