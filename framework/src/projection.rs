//! Projections: durable, asynchronous readers of the global log that build
//! read models.
//!
//! A projection has a stable name, the part of the log it wants (a
//! [`LogFilter`], applied in the store's query) and a handler that receives
//! batches of events together with a transaction of the backend. The
//! [`ProjectionRunner`](crate::runner::ProjectionRunner) commits the handler's
//! writes and the projection's new checkpoint in that one transaction, so a
//! read model in the same database sees each event's effect exactly once,
//! across crashes.
//!
//! Three ways to write one:
//!
//! - implement [`Projection`] for batches of raw [`RecordedEvent`]s (fastest;
//!   one call per batch; may span several aggregate types);
//! - implement [`EventHandler`] for the typed events of one aggregate and wrap
//!   it with [`typed`];
//! - run an existing `cqrs-es` `View` through
//!   [`ViewProjection`](crate::view::ViewProjection) (PostgreSQL).

use std::marker::PhantomData;
use std::sync::Arc;

use async_trait::async_trait;
use cqrs_es::Aggregate;

use crate::event::{Envelope, RecordedEvent};
use crate::port::events::Transactional;
use crate::port::log::LogFilter;

pub use crate::backoff::RetryPolicy;
pub use crate::error::HandlerError;

/// A read model built from the global log.
///
/// ```
/// use outflow::prelude::*;
/// use outflow::projection::{HandlerError, Projection};
/// use outflow::store::memory::MemoryTransaction;
/// use std::sync::atomic::{AtomicU64, Ordering};
///
/// /// Counts deposits of all accounts.
/// #[derive(Default)]
/// struct DepositCount(AtomicU64);
///
/// #[async_trait::async_trait]
/// impl Projection<MemoryStore> for DepositCount {
///     fn name(&self) -> &str { "deposit_count" }
///     fn filter(&self) -> LogFilter {
///         LogFilter::aggregate_types(["account"]).with_event_types(["Deposited"])
///     }
///     async fn handle(&self, events: &[RecordedEvent], _tx: &mut MemoryTransaction) -> Result<(), HandlerError> {
///         self.0.fetch_add(events.len() as u64, Ordering::Relaxed);
///         Ok(())
///     }
/// }
/// ```
#[async_trait]
pub trait Projection<S: Transactional>: Send + Sync + 'static {
    /// The stable name; the checkpoint is stored under it.
    fn name(&self) -> &str;

    /// The events this projection wants (default: all). Applied by the store.
    fn filter(&self) -> LogFilter {
        LogFilter::all()
    }

    /// Runs a batch's effects outside the database, before its transaction
    /// begins and with no transaction open: publishing to a broker, calling
    /// a service. The default does nothing.
    ///
    /// Effects are at least once: when the batch's transaction then fails
    /// (or the process dies before it commits), the batch and its effects
    /// run again, so make them idempotent (each event's `event_id` is a
    /// stable key). Running them here rather than in
    /// [`handle`](Self::handle) keeps a slow call from holding a
    /// transaction open, which on PostgreSQL would hold back every log
    /// reader on the server.
    ///
    /// # Errors
    ///
    /// Any [`HandlerError`]; the batch is retried under the projection's
    /// policy and its checkpoint does not move.
    async fn effects(&self, _events: &[RecordedEvent]) -> Result<(), HandlerError> {
        Ok(())
    }

    /// Applies a batch of events, in log order, inside `tx`. An error rolls
    /// the whole batch back and applies the projection's error policy.
    ///
    /// # Errors
    ///
    /// Any [`HandlerError`]; the runner retries, then parks or stops.
    async fn handle(
        &self,
        events: &[RecordedEvent],
        tx: &mut S::Transaction,
    ) -> Result<(), HandlerError>;

    /// Empties the read model before a rebuild, inside the transaction that
    /// also resets the checkpoint. The default does nothing.
    ///
    /// # Errors
    ///
    /// Any [`HandlerError`]; the rebuild is then not started.
    async fn reset(&self, _tx: &mut S::Transaction) -> Result<(), HandlerError> {
        Ok(())
    }

    /// Creates what the read model needs (tables, indexes) if it is
    /// missing, inside a transaction of its own. The runner calls it when it
    /// registers the projection, before any batch, and again before a
    /// rebuild (in the rebuild's transaction, before
    /// [`reset`](Self::reset)). Make it idempotent (`CREATE TABLE IF NOT
    /// EXISTS`). The default does nothing: for schemas that evolve, prefer
    /// versioned migrations of your own (for example `sqlx::migrate!`) run
    /// at start-up.
    ///
    /// # Errors
    ///
    /// Any [`HandlerError`]: [`ProjectionRunner::run`](crate::runner::ProjectionRunner::run)
    /// then returns
    /// [`ConfigError::SetupHook`](crate::error::ConfigError::SetupHook)
    /// (transient failures are retried first), and a rebuild is not started.
    async fn setup(&self, _tx: &mut S::Transaction) -> Result<(), HandlerError> {
        Ok(())
    }
}

/// Handles the typed events of one aggregate type, one event at a time.
/// Wrap it with [`typed`] to run it as a [`Projection`].
///
/// ```
/// use outflow::prelude::*;
/// use outflow::projection::{typed, EventHandler, HandlerError};
/// use outflow::store::memory::MemoryTransaction;
/// # use outflow::doc_fixture::{Counter, CounterEvent};
/// use std::sync::Mutex;
///
/// #[derive(Default)]
/// struct Total(Mutex<i64>);
///
/// #[async_trait::async_trait]
/// impl EventHandler<Counter, MemoryStore> for Total {
///     fn name(&self) -> &str { "counter_total" }
///     async fn handle(&self, event: &Envelope<Counter>, _tx: &mut MemoryTransaction) -> Result<(), HandlerError> {
///         let CounterEvent::Incremented { by } = event.payload;
///         *self.0.lock().map_err(|_| HandlerError::msg("poisoned"))? += by;
///         Ok(())
///     }
/// }
///
/// let projection = typed::<Counter, _, _>(Total::default());
/// ```
#[async_trait]
pub trait EventHandler<A: Aggregate, S: Transactional>: Send + Sync + 'static {
    /// The stable name.
    fn name(&self) -> &str;

    /// Event types to receive (empty: all of the aggregate's).
    fn event_types(&self) -> Vec<String> {
        Vec::new()
    }

    /// Applies one event inside `tx`. `event.event_id` is a stable
    /// idempotency key; `event.to_cqrs()` gives the `cqrs-es` envelope.
    ///
    /// # Errors
    ///
    /// Any [`HandlerError`].
    async fn handle(
        &self,
        event: &Envelope<A>,
        tx: &mut S::Transaction,
    ) -> Result<(), HandlerError>;

    /// Empties the read model before a rebuild.
    ///
    /// # Errors
    ///
    /// Any [`HandlerError`].
    async fn reset(&self, _tx: &mut S::Transaction) -> Result<(), HandlerError> {
        Ok(())
    }

    /// Creates what the read model needs; see [`Projection::setup`].
    ///
    /// # Errors
    ///
    /// Any [`HandlerError`].
    async fn setup(&self, _tx: &mut S::Transaction) -> Result<(), HandlerError> {
        Ok(())
    }
}

/// Runs an [`EventHandler`] as a [`Projection`]: filters on `A::TYPE` in the
/// store, decodes (and upcasts) each event, and calls the handler in order.
pub struct Typed<A, S, H> {
    handler: H,
    upcasters: crate::upcast::Upcasters,
    _types: PhantomData<fn() -> (A, S)>,
}

impl<A: Aggregate, S, H> std::fmt::Debug for Typed<A, S, H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Typed")
            .field("aggregate_type", &A::TYPE)
            .field("handler", &std::any::type_name::<H>())
            .field("upcasters", &self.upcasters.len())
            .finish()
    }
}

/// Wraps a typed handler as a projection.
pub fn typed<A, S, H>(handler: H) -> Typed<A, S, H>
where
    A: Aggregate,
    S: Transactional,
    H: EventHandler<A, S>,
{
    Typed {
        handler,
        upcasters: crate::upcast::Upcasters::new(),
        _types: PhantomData,
    }
}

impl<A, S, H> Typed<A, S, H> {
    /// Upcasters run on each event before it is decoded.
    pub fn with_upcasters(mut self, upcasters: Vec<Box<dyn crate::upcast::Upcaster>>) -> Self {
        self.upcasters = upcasters.into();
        self
    }

    /// Upcasters run on each event before it is decoded: the same
    /// [`Upcasters`](crate::upcast::Upcasters) list (cloned) that the
    /// command bus and the other readers are given.
    pub fn upcasters(mut self, upcasters: crate::upcast::Upcasters) -> Self {
        self.upcasters = upcasters;
        self
    }
}

#[async_trait]
impl<A, S, H> Projection<S> for Typed<A, S, H>
where
    A: Aggregate + 'static,
    S: Transactional,
    H: EventHandler<A, S>,
{
    fn name(&self) -> &str {
        self.handler.name()
    }

    fn filter(&self) -> LogFilter {
        LogFilter::aggregate_types([A::TYPE]).with_event_types(self.handler.event_types())
    }

    async fn handle(
        &self,
        events: &[RecordedEvent],
        tx: &mut S::Transaction,
    ) -> Result<(), HandlerError> {
        for event in events {
            let envelope = event.decode_ref::<A>(&self.upcasters)?;
            self.handler.handle(&envelope, tx).await?;
        }
        Ok(())
    }

    async fn reset(&self, tx: &mut S::Transaction) -> Result<(), HandlerError> {
        self.handler.reset(tx).await
    }

    async fn setup(&self, tx: &mut S::Transaction) -> Result<(), HandlerError> {
        self.handler.setup(tx).await
    }
}

/// Runs any `cqrs-es` [`Query`](cqrs_es::Query) as a projection: its
/// `dispatch` is called once per command, with that command's events of the
/// aggregate, in log order — as `cqrs-es` calls it after a commit, but from
/// the durable log, so a query that was down catches up.
///
/// A `Query` writes wherever it likes, outside the runner's transaction, so
/// it runs as the batch's [effects](Projection::effects): at least once,
/// never while a transaction is open. Make it idempotent; the events'
/// sequence numbers tell what it has seen. Works with every backend.
///
/// ```
/// # use outflow::doc_fixture::{Counter, CounterEvent};
/// use cqrs_es::{EventEnvelope, Query};
/// use outflow::projection::{ProjectionOptions, QueryProjection};
/// use outflow::MemoryStore;
///
/// struct Logger;
///
/// #[async_trait::async_trait]
/// impl Query<Counter> for Logger {
///     async fn dispatch(&self, aggregate_id: &str, events: &[EventEnvelope<Counter>]) {
///         println!("{aggregate_id}: {} event(s)", events.len());
///     }
/// }
///
/// let options: ProjectionOptions<MemoryStore> =
///     ProjectionOptions::new(QueryProjection::new("logger", Logger));
/// ```
pub struct QueryProjection<A: Aggregate, Q> {
    name: String,
    query: Q,
    upcasters: crate::upcast::Upcasters,
    _aggregate: PhantomData<fn() -> A>,
}

impl<A: Aggregate, Q> std::fmt::Debug for QueryProjection<A, Q> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryProjection")
            .field("name", &self.name)
            .field("aggregate_type", &A::TYPE)
            .field("query", &std::any::type_name::<Q>())
            .finish_non_exhaustive()
    }
}

impl<A: Aggregate, Q: cqrs_es::Query<A>> QueryProjection<A, Q> {
    /// Runs `query` under the projection name `name` (its checkpoint's).
    pub fn new(name: impl Into<String>, query: Q) -> Self {
        QueryProjection {
            name: name.into(),
            query,
            upcasters: crate::upcast::Upcasters::new(),
            _aggregate: PhantomData,
        }
    }

    /// Upcasters run on each event before it is decoded.
    pub fn with_upcasters(mut self, upcasters: Vec<Box<dyn crate::upcast::Upcaster>>) -> Self {
        self.upcasters = upcasters.into();
        self
    }

    /// Upcasters run on each event before it is decoded: the same
    /// [`Upcasters`](crate::upcast::Upcasters) list (cloned) that the
    /// command bus and the other readers are given.
    pub fn upcasters(mut self, upcasters: crate::upcast::Upcasters) -> Self {
        self.upcasters = upcasters;
        self
    }
}

#[async_trait]
impl<A, Q, S> Projection<S> for QueryProjection<A, Q>
where
    A: Aggregate + 'static,
    Q: cqrs_es::Query<A> + 'static,
    S: Transactional,
{
    fn name(&self) -> &str {
        &self.name
    }

    fn filter(&self) -> LogFilter {
        LogFilter::aggregate_types([A::TYPE])
    }

    async fn effects(&self, events: &[RecordedEvent]) -> Result<(), HandlerError> {
        // Decode the whole batch first: an event that does not decode fails
        // the batch before anything is dispatched.
        let mut decoded = Vec::with_capacity(events.len());
        for event in events {
            decoded.push((
                event.transaction_id,
                event.decode_ref::<A>(&self.upcasters)?.to_cqrs(),
            ));
        }
        // One dispatch per command: consecutive events of one aggregate
        // written by one transaction.
        let mut start = 0;
        while start < decoded.len() {
            let (transaction, first) = &decoded[start];
            let end = start
                + decoded[start..]
                    .iter()
                    .take_while(|(t, e)| t == transaction && e.aggregate_id == first.aggregate_id)
                    .count();
            let envelopes: Vec<_> = decoded[start..end].iter().map(|(_, e)| e.clone()).collect();
            self.query.dispatch(&first.aggregate_id, &envelopes).await;
            start = end;
        }
        Ok(())
    }

    async fn handle(
        &self,
        _events: &[RecordedEvent],
        _tx: &mut S::Transaction,
    ) -> Result<(), HandlerError> {
        Ok(())
    }
}

/// What happens to an event whose handler still fails after every retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OnError {
    /// Park it in the dead-letter table and go on with the next event
    /// (list, retry or discard it later).
    #[default]
    Park,
    /// Stop this projection (its partition) with the error visible in its
    /// status; other projections go on. Restart it after a fix.
    Stop,
}

/// A projection with its runner settings.
#[must_use = "a builder does nothing until it is built"]
pub struct ProjectionOptions<S: Transactional> {
    pub(crate) projection: Arc<dyn Projection<S>>,
    pub(crate) partitions: u32,
    pub(crate) batch_size: usize,
    pub(crate) retry: RetryPolicy,
    pub(crate) on_error: OnError,
}

impl<S: Transactional> std::fmt::Debug for ProjectionOptions<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectionOptions")
            .field("name", &self.projection.name())
            .field("partitions", &self.partitions)
            .field("batch_size", &self.batch_size)
            .field("retry", &self.retry)
            .field("on_error", &self.on_error)
            .finish()
    }
}

impl<S: Transactional> ProjectionOptions<S> {
    /// Default settings: one partition, batches of 500, [`RetryPolicy::default`], [`OnError::Park`].
    pub fn new(projection: impl Projection<S>) -> Self {
        Self::from_arc(Arc::new(projection))
    }

    /// As [`new`](Self::new), for a projection the caller keeps a handle to.
    pub fn from_arc(projection: Arc<dyn Projection<S>>) -> Self {
        ProjectionOptions {
            projection,
            partitions: 1,
            batch_size: 500,
            retry: RetryPolicy::default(),
            on_error: OnError::Park,
        }
    }

    /// Splits the projection into `n` partitions by a hash of the aggregate
    /// id; each has its own checkpoint and may run on another node, and each
    /// aggregate's events stay in order within its partition. The count is
    /// stored when the projection first registers and cannot be changed:
    /// `run` and `rebuild` refuse another count with
    /// [`ConfigError::PartitionCount`](crate::error::ConfigError::PartitionCount);
    /// use a new projection name. `0` is taken as 1; more than 1024 is
    /// refused when the runner is built.
    pub fn partitions(mut self, n: u32) -> Self {
        self.partitions = n.max(1);
        self
    }

    /// Events per batch (and per transaction): the most a batch takes while
    /// catching up or rebuilding (live batches hold what arrived since the
    /// last one, usually far fewer). Each batch is one transaction with its
    /// commit, so larger batches replay faster — fewer commits, and a
    /// handler that folds a batch into one write per row writes less — at
    /// the cost of memory (the batch handled and the next one, read
    /// meanwhile) and of longer transactions. 500 by default; the
    /// benchmarks replay a million events with 2,000 and with 10,000.
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }

    /// The retry policy for failing batches.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// What to do with an event that keeps failing.
    pub fn on_error(mut self, on_error: OnError) -> Self {
        self.on_error = on_error;
        self
    }

    /// The projection's name.
    pub fn name(&self) -> &str {
        self.projection.name()
    }
}
