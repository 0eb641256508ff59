//! The global log: every event of every aggregate in one total order.
//!
//! Readers see events in `(transaction id, position)` order, and a store only
//! serves events whose writing transaction can no longer be overtaken by one
//! still in flight; so a reader never skips an event that commits late, never
//! sees one twice when it resumes from its [`Checkpoint`], and sees each
//! aggregate's events in sequence order.
//!
//! This module holds the reader-side tools: [`LogFilter`], batch-wise
//! [`read_log`] / [`read_stream`] streams that never hold the whole log in
//! memory, and [`Wakeups`], which tells a tailing reader when to look again.

use std::collections::VecDeque;
use std::time::Duration;

use futures::stream::{BoxStream, StreamExt};
use tokio::sync::watch;

use crate::error::StoreError;
use crate::event::{Checkpoint, RecordedEvent};
use crate::store::EventStore;

/// Which events a log reader wants. The store applies it in its query, so
/// unwanted events are never loaded.
///
/// ```
/// use outflow::LogFilter;
/// let all = LogFilter::all();
/// let accounts = LogFilter::aggregate_types(["account"]).with_event_types(["Deposited"]);
/// assert!(all.is_all() && !accounts.is_all());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogFilter {
    aggregate_types: Vec<String>,
    event_types: Vec<String>,
    partition: Option<Partition>,
}

/// One of `count` disjoint parts of the log, split by a hash of the
/// aggregate id: every event of an aggregate falls into the same partition.
/// The hash is the backend's own (PostgreSQL's `hashtext`, FNV-1a in memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Partition {
    /// This partition, `0..count`.
    pub index: u32,
    /// Number of partitions.
    pub count: u32,
}

impl Partition {
    /// Whether an aggregate's events fall into this partition (in-memory hash).
    pub fn contains(&self, aggregate_id: &str) -> bool {
        if self.count <= 1 {
            return true;
        }
        let hash = aggregate_id.bytes().fold(0x811c_9dc5_u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
        hash % self.count == self.index
    }
}

impl LogFilter {
    /// Every event.
    pub fn all() -> Self {
        LogFilter::default()
    }

    /// Events of these aggregate types.
    pub fn aggregate_types<I, T>(types: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        LogFilter {
            aggregate_types: types.into_iter().map(Into::into).collect(),
            event_types: Vec::new(),
            partition: None,
        }
    }

    /// Narrows the filter to these event types.
    pub fn with_event_types<I, T>(mut self, types: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        self.event_types = types.into_iter().map(Into::into).collect();
        self
    }

    /// Narrows the filter to one partition of `count` (no-op when `count` is 1).
    pub fn with_partition(mut self, index: u32, count: u32) -> Self {
        self.partition = (count > 1).then_some(Partition { index, count });
        self
    }

    /// The partition asked for, if any.
    pub fn partition(&self) -> Option<Partition> {
        self.partition
    }

    /// The aggregate types asked for (empty: all).
    pub fn aggregate_type_list(&self) -> &[String] {
        &self.aggregate_types
    }

    /// The event types asked for (empty: all).
    pub fn event_type_list(&self) -> &[String] {
        &self.event_types
    }

    /// `true` when the filter lets every event through.
    pub fn is_all(&self) -> bool {
        self.aggregate_types.is_empty() && self.event_types.is_empty() && self.partition.is_none()
    }

    /// Whether `event` passes the filter.
    pub fn matches(&self, event: &RecordedEvent) -> bool {
        (self.aggregate_types.is_empty() || self.aggregate_types.contains(&event.aggregate_type))
            && (self.event_types.is_empty() || self.event_types.contains(&event.event_type))
            && self
                .partition
                .is_none_or(|p| p.contains(&event.aggregate_id))
    }
}

/// Streams the global log after `after`, reading `batch_size` events at a
/// time, until the reader has caught up with what is readable now. Memory use
/// is bounded by one batch. A database error is yielded as an `Err` item and
/// ends the stream: it never ends silently.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use futures::TryStreamExt;
/// use outflow::{log, Checkpoint, LogFilter, MemoryStore};
/// # use outflow::doc_fixture::{Counter, CounterCommand};
/// let store = MemoryStore::new();
/// let bus = outflow::CommandBus::<Counter, _>::new(store.clone(), ());
/// bus.execute("c-1", CounterCommand::Increment { by: 1 }).await?;
/// bus.execute("c-2", CounterCommand::Increment { by: 2 }).await?;
///
/// let events: Vec<_> = log::read_log(&store, Checkpoint::START, LogFilter::all(), 500)
///     .try_collect()
///     .await?;
/// assert_eq!(events.len(), 2);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
pub fn read_log<S: EventStore + ?Sized>(
    store: &S,
    after: Checkpoint,
    filter: LogFilter,
    batch_size: usize,
) -> BoxStream<'_, Result<RecordedEvent, StoreError>> {
    let filter = std::sync::Arc::new(filter);
    batched(
        after,
        batch_size,
        move |after, limit| {
            let filter = filter.clone();
            async move { store.read_log(after, &filter, limit).await }
        },
        RecordedEvent::checkpoint,
    )
}

/// Streams one aggregate's events after `after_sequence` in sequence order,
/// `batch_size` at a time, with the same error behaviour as [`read_log`].
pub fn read_stream<'a, S: EventStore + ?Sized>(
    store: &'a S,
    aggregate_type: &'a str,
    aggregate_id: &'a str,
    after_sequence: u64,
    batch_size: usize,
) -> BoxStream<'a, Result<RecordedEvent, StoreError>> {
    batched(
        after_sequence,
        batch_size,
        move |after, limit| store.read_stream(aggregate_type, aggregate_id, after, limit),
        |event| event.sequence,
    )
}

/// Reads batch after batch with `fetch` from a cursor that `next` moves to
/// the last event read, until a batch comes back short; an error is yielded
/// once and ends the stream.
fn batched<'a, C, F, Fut, N>(
    start: C,
    batch_size: usize,
    fetch: F,
    next: N,
) -> BoxStream<'a, Result<RecordedEvent, StoreError>>
where
    C: Copy + Send + 'a,
    F: Fn(C, usize) -> Fut + Send + 'a,
    Fut: std::future::Future<Output = Result<Vec<RecordedEvent>, StoreError>> + Send + 'a,
    N: Fn(&RecordedEvent) -> C + Send + 'a,
{
    let batch_size = batch_size.max(1);
    let state = (VecDeque::new(), false, start, fetch, next);
    futures::stream::unfold(
        state,
        move |(mut buffer, mut done, mut cursor, fetch, next)| async move {
            loop {
                if let Some(event) = buffer.pop_front() {
                    return Some((Ok(event), (buffer, done, cursor, fetch, next)));
                }
                if done {
                    return None;
                }
                match fetch(cursor, batch_size).await {
                    Ok(batch) => {
                        done = batch.len() < batch_size;
                        if let Some(last) = batch.last() {
                            cursor = next(last);
                        }
                        buffer.extend(batch);
                    }
                    Err(error) => {
                        return Some((Err(error), (buffer, true, cursor, fetch, next)));
                    }
                }
            }
        },
    )
    .boxed()
}

/// Tells a tailing log reader when new events may be readable: at once after
/// an append in this process, within milliseconds after one on another node
/// (PostgreSQL `LISTEN`), and at least every poll interval, because
/// notifications can be lost and writers outside Outflow send none.
#[derive(Debug, Clone)]
pub struct Wakeups {
    changes: watch::Receiver<u64>,
    poll_interval: Duration,
}

/// Why [`Wakeups::wait`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// An append or a notification signalled new events.
    Signalled,
    /// The poll interval passed without a signal.
    Poll,
}

impl Wakeups {
    pub(crate) fn new(changes: watch::Receiver<u64>, poll_interval: Duration) -> Self {
        Wakeups {
            changes,
            poll_interval,
        }
    }

    /// Waits for the next signal or the poll interval, whichever comes first.
    /// Signals that arrived since the last call return at once (none is lost
    /// between two calls).
    pub async fn wait(&mut self) -> Wake {
        tokio::select! {
            changed = self.changes.changed() => match changed {
                Ok(()) => Wake::Signalled,
                Err(_) => {
                    tokio::time::sleep(self.poll_interval).await;
                    Wake::Poll
                }
            },
            _ = tokio::time::sleep(self.poll_interval) => Wake::Poll,
        }
    }

    /// The poll interval.
    pub fn poll_interval(&self) -> Duration {
        self.poll_interval
    }
}

/// The sending side of [`Wakeups`], owned by a store.
#[derive(Debug)]
pub(crate) struct WakeSignal {
    sender: watch::Sender<u64>,
}

impl WakeSignal {
    pub(crate) fn new() -> Self {
        WakeSignal {
            sender: watch::Sender::new(0),
        }
    }

    pub(crate) fn wake(&self) {
        self.sender.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub(crate) fn subscribe(&self, poll_interval: Duration) -> Wakeups {
        Wakeups::new(self.sender.subscribe(), poll_interval)
    }
}
