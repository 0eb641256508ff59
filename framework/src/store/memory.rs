//! An in-memory event store with the same log semantics and concurrency
//! checks as the durable ones. For unit tests and examples: it keeps
//! everything in process memory and loses it on exit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;

use crate::error::StoreError;
use crate::event::{AppendRequest, Checkpoint, RecordedEvent, Snapshot};
use crate::log::{LogFilter, WakeSignal, Wakeups};
use crate::store::{EventStore, LoadedStream};

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
            let key = (request.aggregate_type.clone(), request.aggregate_id.clone());
            let actual = state.streams.get(&key).map_or(0, |s| s.len() as u64);
            if actual != request.expected_version {
                return Err(StoreError::Conflict {
                    aggregate_type: request.aggregate_type,
                    aggregate_id: request.aggregate_id,
                    expected: request.expected_version,
                    actual: Some(actual),
                });
            }
            state.transactions += 1;
            let transaction_id = state.transactions;
            let recorded_at = Utc::now();
            let mut written = Vec::with_capacity(request.events.len());
            for (offset, event) in request.events.into_iter().enumerate() {
                let index = state.log.len();
                let recorded = RecordedEvent {
                    event_id: event.event_id,
                    aggregate_type: request.aggregate_type.clone(),
                    aggregate_id: request.aggregate_id.clone(),
                    sequence: request.expected_version + offset as u64 + 1,
                    position: index as u64 + 1,
                    transaction_id,
                    recorded_at,
                    event_type: event.event_type,
                    event_version: event.event_version,
                    payload: event.payload,
                    metadata: event.metadata,
                    correlation_id: event.correlation_id,
                    causation_id: event.causation_id,
                };
                state.log.push(recorded.clone());
                state.streams.entry(key.clone()).or_default().push(index);
                written.push(recorded);
            }
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
            .await?;
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
}
