//! The global log: every event of every aggregate in one total order.
//!
//! Readers see events in `(transaction id, position)` order, and a store only
//! serves events whose writing transaction can no longer be overtaken by one
//! still in flight; so a reader never skips an event that commits late, never
//! sees one twice when it resumes from its [`Checkpoint`], and sees each
//! aggregate's events in sequence order.
//!
//! This module holds the reader-side tools: [`LogFilter`], batch-wise
//! [`read_log`] streams (and [`read_stream`](crate::store::read_stream)) that never hold the whole log in
//! memory, and [`Wakeups`], which tells a tailing reader when to look again.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::stream::{BoxStream, StreamExt};
use std::collections::VecDeque;
use std::time::Duration;

use crate::error::StoreError;
use crate::event::{Checkpoint, RecordedEvent};
pub use crate::wake::{Wake, Wakeups};

/// What a log reader needs from a backend: the global log in order, its
/// head, wake-ups, and the counts that status reports. Object safe: a
/// [`ProjectionRunner`](crate::runner::ProjectionRunner) can read the log of
/// one backend while it commits read models and checkpoints in another.
///
/// Implemented by [`MemoryStore`](crate::MemoryStore), `PostgresStore`
/// (feature `postgres`), `SqliteStore` (feature `sqlite`) and
/// `JetStreamStore` (feature `nats`).
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Reads up to `limit` events of the global log after `after`, in log
    /// order, filtered by `filter`. Never returns an event a concurrent
    /// transaction could still place before the last one returned.
    ///
    /// A stored row whose payload or metadata does not decode ends the read
    /// early: the events before it are returned (fewer than `limit`, although
    /// more follow), and a read that starts at it fails with
    /// [`StoreError::Undecodable`] naming it. A reader can then handle every
    /// good event and treat the bad one as a poison event.
    ///
    /// # Errors
    ///
    /// [`StoreError::Undecodable`] when the first row after `after` does not
    /// decode; [`StoreError::Database`] or [`StoreError::Corrupt`].
    async fn read_log(
        &self,
        after: Checkpoint,
        filter: &LogFilter,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// The head and the events after `after` as one look at the log: what
    /// a tailing reader needs for each batch. `limit` and the errors are as
    /// for [`read_log`](Self::read_log); [`LogWindow::complete`] says
    /// whether nothing wanted was left between the last event returned and
    /// the head, and [`LogWindow::held_back`] whether committed events wait
    /// behind an open transaction.
    ///
    /// The default reads the head, then the window, and counts what a short
    /// window may have left before the head (three statements); PostgreSQL
    /// answers it all in one.
    ///
    /// # Errors
    ///
    /// As [`read_log`](Self::read_log).
    async fn read_window(
        &self,
        after: Checkpoint,
        filter: &LogFilter,
        limit: usize,
    ) -> Result<LogWindow, StoreError> {
        let head = self.head().await?;
        let events = self.read_log(after, filter, limit).await?;
        // A short window may also have stopped before a row that does not
        // decode: complete only when nothing wanted lies between its last
        // event and the head (an empty one saw nothing wanted up to a head
        // read before it).
        let complete = match events.last() {
            None => true,
            Some(_) if events.len() >= limit => false,
            Some(last) => {
                last.checkpoint() >= head
                    || self
                        .count_events(filter, last.checkpoint(), head, 1)
                        .await?
                        == 0
            }
        };
        Ok(LogWindow {
            head,
            events,
            complete,
            held_back: false,
        })
    }

    /// The checkpoint of the last event a log reader can see now
    /// ([`Checkpoint::START`] for an empty log).
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    async fn head(&self) -> Result<Checkpoint, StoreError>;

    /// The checkpoint of the last event committed so far, even when an open
    /// transaction still keeps readers from it (then it is past
    /// [`head`](Self::head)). Waiting until a projection passes it
    /// ([`wait_for`](crate::runner::wait_for)) gives a read that sees every
    /// write committed before the call: what an HTTP API's "strong" read
    /// needs when the client does not send its command's position. The
    /// default is [`head`](Self::head), right for backends where every
    /// committed event is readable at once (memory, SQLite).
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    async fn committed_head(&self) -> Result<Checkpoint, StoreError> {
        self.head().await
    }

    /// The head of the part of the log that `filter` reads: what a reader
    /// of one partition of a [partitioned](Self::partitions) log compares
    /// its checkpoint with. The default is [`head`](Self::head).
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`]; a [`StoreError::Config`] when the filter
    /// does not fit the log's partitions.
    async fn head_of(&self, filter: &LogFilter) -> Result<Checkpoint, StoreError> {
        let _ = filter;
        self.head().await
    }

    /// How many parts the log is ordered in: 1 (the default) when it is one
    /// total order; `n` when each of `n` partitions is ordered on its own
    /// (a partitioned JetStream store), so checkpoints of different
    /// partitions do not compare, and readers must read one partition each
    /// ([`LogFilter::with_partition`]`(p, n)`).
    fn partitions(&self) -> u32 {
        1
    }

    /// The partition a checkpoint of a [partitioned](Self::partitions) log
    /// belongs to; `None` (the default) for a log in one total order.
    fn checkpoint_partition(&self, checkpoint: Checkpoint) -> Option<u32> {
        let _ = checkpoint;
        None
    }

    /// A handle that wakes a log reader when new events may be readable.
    fn wakeups(&self) -> Wakeups;

    /// Counts the events matching `filter` after `after`, up to `upto`,
    /// stopping at `cap`.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    async fn count_events(
        &self,
        filter: &LogFilter,
        after: Checkpoint,
        upto: Checkpoint,
        cap: u64,
    ) -> Result<u64, StoreError>;

    /// When the first event after `after` matching `filter` was recorded.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    async fn first_pending_recorded_at(
        &self,
        filter: &LogFilter,
        after: Checkpoint,
    ) -> Result<Option<DateTime<Utc>>, StoreError>;

    /// The oldest transaction holding log readers back, where the backend
    /// can tell (the default says nothing).
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    async fn oldest_open_transaction(&self) -> Result<Option<OldestTransaction>, StoreError> {
        Ok(None)
    }

    /// The ring that opens the personal values of this log's events (see
    /// [`crate::personal`]); the projection runner opens each batch with
    /// it. The default has none.
    fn key_ring(&self) -> Option<crate::personal::KeyRing> {
        None
    }
}

/// One look at the log by [`EventLog::read_window`]: the head and the next
/// events after a checkpoint.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct LogWindow {
    /// The last event a log reader could see at the time of the read
    /// ([`Checkpoint::START`] for an empty log): every event wanted up to
    /// it is in `events` when the window is [`complete`](Self::complete).
    pub head: Checkpoint,
    /// Up to `limit` events after the checkpoint, in log order (fewer when a
    /// stored row that does not decode ended the read, see
    /// [`EventLog::read_log`]).
    pub events: Vec<RecordedEvent>,
    /// Whether nothing the filter wants lies between the last event of the
    /// window and the head: fewer events than the limit came back, and no
    /// undecodable row cut the read short. A reader that handled a complete
    /// window is caught up to the head.
    pub complete: bool,
    /// Whether events were committed past the head that this reader cannot
    /// see yet — kept from readers by an open transaction (PostgreSQL: they
    /// become readable when it ends, and no append signals that), or
    /// announced as stored but not yet handed to this reader by the server
    /// (JetStream): a reader should look again soon. Backends where every
    /// committed event is readable at once say `false`.
    pub held_back: bool,
}

impl LogWindow {
    /// A window as a backend read it.
    pub fn new(
        head: Checkpoint,
        events: Vec<RecordedEvent>,
        complete: bool,
        held_back: bool,
    ) -> Self {
        LogWindow {
            head,
            events,
            complete,
            held_back,
        }
    }
}

/// The oldest transaction still running on the server: it holds every log
/// reader back (readers never pass a transaction that may still commit).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct OldestTransaction {
    /// Server process id.
    pub pid: i32,
    /// Its database.
    pub database: Option<String>,
    /// How long it has been open.
    pub age: Duration,
    /// Its state (`active`, `idle in transaction`, ...).
    pub state: Option<String>,
    /// The start of its current (or last) query's text.
    pub query: Option<String>,
    /// When its current (or last) query started.
    pub query_start: Option<DateTime<Utc>>,
}

impl OldestTransaction {
    /// A transaction as a backend reports it.
    pub fn new(
        pid: i32,
        database: Option<String>,
        age: Duration,
        state: Option<String>,
        query: Option<String>,
    ) -> Self {
        OldestTransaction {
            pid,
            database,
            age,
            state,
            query,
            query_start: None,
        }
    }

    /// The same, with when its current query started.
    #[must_use]
    pub fn with_query_start(mut self, query_start: Option<DateTime<Utc>>) -> Self {
        self.query_start = query_start;
        self
    }
}

/// A checkpoint after every position: counting up to it counts every
/// committed event, also those that an open transaction still hides from
/// log readers.
pub(crate) const END: Checkpoint = Checkpoint::new(i64::MAX as u64, i64::MAX as u64);

/// The open transaction that committed events matching `filter` wait
/// behind, if any do (events after the readable `head`).
pub(crate) async fn holding_back<L: EventLog + ?Sized>(
    log: &L,
    filter: &LogFilter,
    head: Checkpoint,
) -> Result<Option<OldestTransaction>, StoreError> {
    if log.count_events(filter, head, END, 1).await? == 0 {
        return Ok(None);
    }
    log.oldest_open_transaction().await
}

/// Reads the one event at `checkpoint`, if it is still in the log and visible.
///
/// # Errors
///
/// As [`EventLog::read_log`].
pub async fn read_event<L: EventLog + ?Sized>(
    log: &L,
    checkpoint: Checkpoint,
) -> Result<Option<RecordedEvent>, StoreError> {
    let Some(before) = checkpoint.position.checked_sub(1) else {
        return Ok(None);
    };
    let after = Checkpoint::new(checkpoint.transaction_id, before);
    let mut events = log.read_log(after, &LogFilter::all(), 1).await?;
    Ok(events
        .pop()
        .filter(|event| event.checkpoint() == checkpoint))
}

#[async_trait]
impl<L: EventLog + ?Sized> EventLog for std::sync::Arc<L> {
    async fn read_log(
        &self,
        after: Checkpoint,
        filter: &LogFilter,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        (**self).read_log(after, filter, limit).await
    }
    async fn read_window(
        &self,
        after: Checkpoint,
        filter: &LogFilter,
        limit: usize,
    ) -> Result<LogWindow, StoreError> {
        (**self).read_window(after, filter, limit).await
    }
    async fn head(&self) -> Result<Checkpoint, StoreError> {
        (**self).head().await
    }
    async fn committed_head(&self) -> Result<Checkpoint, StoreError> {
        (**self).committed_head().await
    }
    async fn head_of(&self, filter: &LogFilter) -> Result<Checkpoint, StoreError> {
        (**self).head_of(filter).await
    }
    fn partitions(&self) -> u32 {
        (**self).partitions()
    }
    fn checkpoint_partition(&self, checkpoint: Checkpoint) -> Option<u32> {
        (**self).checkpoint_partition(checkpoint)
    }
    fn wakeups(&self) -> Wakeups {
        (**self).wakeups()
    }
    async fn count_events(
        &self,
        filter: &LogFilter,
        after: Checkpoint,
        upto: Checkpoint,
        cap: u64,
    ) -> Result<u64, StoreError> {
        (**self).count_events(filter, after, upto, cap).await
    }
    async fn first_pending_recorded_at(
        &self,
        filter: &LogFilter,
        after: Checkpoint,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        (**self).first_pending_recorded_at(filter, after).await
    }
    async fn oldest_open_transaction(&self) -> Result<Option<OldestTransaction>, StoreError> {
        (**self).oldest_open_transaction().await
    }
    fn key_ring(&self) -> Option<crate::personal::KeyRing> {
        (**self).key_ring()
    }
}

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
    query: Option<crate::tags::Query>,
}

/// One of `count` disjoint parts of the log, split by a hash of the
/// aggregate id: every event of an aggregate falls into the same partition.
/// The hash is the backend's own (PostgreSQL's `hashtext`, FNV-1a in memory
/// and in SQLite).
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
        partition_hash(aggregate_id) % self.count == self.index
    }
}

/// The FNV-1a hash of an aggregate id: what the in-memory and SQLite stores
/// partition by.
pub(crate) fn partition_hash(aggregate_id: &str) -> u32 {
    aggregate_id.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
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
            query: None,
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

    /// The same filter, also requiring the events to match `query` (event
    /// types and [tags](crate::tags)): what a projection of a
    /// [decision](crate::decision)'s events filters on. The PostgreSQL,
    /// SQLite and in-memory stores apply it in their reads; a JetStream
    /// store refuses it ([`StoreError::Unsupported`](crate::StoreError::Unsupported)).
    ///
    /// ```
    /// use outflow::tags::{Query, QueryItem};
    /// let filter = outflow::LogFilter::all()
    ///     .with_query(Query::new().with(QueryItem::tags(["course:7"])));
    /// assert!(!filter.is_all() && filter.query().is_some());
    /// ```
    pub fn with_query(mut self, query: crate::tags::Query) -> Self {
        self.query = Some(query);
        self
    }

    /// The query the events must match, if any.
    pub fn query(&self) -> Option<&crate::tags::Query> {
        self.query.as_ref()
    }

    /// `true` when the filter lets every event through.
    pub fn is_all(&self) -> bool {
        self.aggregate_types.is_empty()
            && self.event_types.is_empty()
            && self.partition.is_none()
            && self.query.is_none()
    }

    /// Whether `event` passes the filter. A recorded event does not carry
    /// its tags: a [query](Self::with_query) is judged here on the event's
    /// type alone (an item's tags are not checked); the stores check it in
    /// full when they read.
    pub fn matches(&self, event: &RecordedEvent) -> bool {
        (self.aggregate_types.is_empty() || self.aggregate_types.contains(&event.aggregate_type))
            && (self.event_types.is_empty() || self.event_types.contains(&event.event_type))
            && self
                .partition
                .is_none_or(|p| p.contains(&event.aggregate_id))
            && self.query.as_ref().is_none_or(|q| {
                q.items
                    .iter()
                    .any(|i| i.types.is_empty() || i.types.contains(&event.event_type))
            })
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
pub fn read_log<S: EventLog + ?Sized>(
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

/// Reads batch after batch with `fetch` from a cursor that `next` moves to
/// the last event read, until a batch comes back short; an error is yielded
/// once and ends the stream.
pub(crate) fn batched<'a, C, F, Fut, N>(
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

// Renames widen filters here, beside `LogFilter`: the aliases themselves sit
// below the log and know nothing of its filters.
impl crate::upcast::EventAliases {
    /// `filter` with the old names of the event types it asks for added.
    pub fn widen(&self, filter: LogFilter) -> LogFilter {
        if self.is_empty() || filter.event_type_list().is_empty() {
            return filter;
        }
        let mut types: Vec<String> = filter
            .event_type_list()
            .iter()
            .flat_map(|name| self.names_of(name))
            .collect();
        types.sort();
        types.dedup();
        filter.with_event_types(types)
    }
}
