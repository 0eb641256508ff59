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

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cqrs_es::Aggregate;

use crate::error::BoxError;
use crate::event::{Envelope, RecordedEvent};
use crate::log::LogFilter;
use crate::store::ProjectionStore;
use crate::upcast::Upcaster;

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
pub trait Projection<S: ProjectionStore>: Send + Sync + 'static {
    /// The stable name; the checkpoint is stored under it.
    fn name(&self) -> &str;

    /// The events this projection wants (default: all). Applied by the store.
    fn filter(&self) -> LogFilter {
        LogFilter::all()
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
pub trait EventHandler<A: Aggregate, S: ProjectionStore>: Send + Sync + 'static {
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
}

/// Runs an [`EventHandler`] as a [`Projection`]: filters on `A::TYPE` in the
/// store, decodes (and upcasts) each event, and calls the handler in order.
pub struct Typed<A, S, H> {
    handler: H,
    upcasters: Arc<[Box<dyn Upcaster>]>,
    _types: PhantomData<fn() -> (A, S)>,
}

/// Wraps a typed handler as a projection.
pub fn typed<A, S, H>(handler: H) -> Typed<A, S, H>
where
    A: Aggregate,
    S: ProjectionStore,
    H: EventHandler<A, S>,
{
    Typed {
        handler,
        upcasters: Arc::from(Vec::new()),
        _types: PhantomData,
    }
}

impl<A, S, H> Typed<A, S, H> {
    /// Upcasters run on each event before it is decoded.
    pub fn with_upcasters(mut self, upcasters: Vec<Box<dyn Upcaster>>) -> Self {
        self.upcasters = upcasters.into();
        self
    }
}

#[async_trait]
impl<A, S, H> Projection<S> for Typed<A, S, H>
where
    A: Aggregate + 'static,
    S: ProjectionStore,
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
}

/// The error of a projection's handler: any error, with its chain of causes.
///
/// Any `std::error::Error + Send + Sync` converts into it, so `?` works on
/// sqlx, serde and Outflow errors inside handlers.
pub struct HandlerError {
    source: BoxError,
    transient: bool,
}

impl HandlerError {
    /// An error with a message.
    pub fn msg(message: impl Into<String>) -> Self {
        HandlerError {
            source: message.into().into(),
            transient: false,
        }
    }

    /// An error the handler marks as the infrastructure's (a broker that is
    /// down, an acknowledgement that timed out): the runner retries the batch
    /// with backoff for as long as it takes, never parks its events, and never
    /// moves the checkpoint past them.
    pub fn transient(error: impl Into<BoxError>) -> Self {
        HandlerError {
            source: error.into(),
            transient: true,
        }
    }

    /// The underlying error.
    pub fn source(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.source
    }

    /// The error and its causes, outermost first, joined with `: `.
    pub fn chain(&self) -> String {
        let mut text = self.source.to_string();
        let mut cause = self.source.source();
        while let Some(error) = cause {
            let next = error.to_string();
            if !text.ends_with(&next) {
                text.push_str(": ");
                text.push_str(&next);
            }
            cause = error.source();
        }
        text
    }

    /// `true` when the failure is the infrastructure's (a lost connection, a
    /// serialization failure) rather than the event's: the runner then retries
    /// without counting towards parking the event.
    pub fn is_transient(&self) -> bool {
        if self.transient {
            return true;
        }
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&*self.source);
        while let Some(error) = cause {
            if let Some(store) = error.downcast_ref::<crate::StoreError>() {
                if matches!(store, crate::StoreError::Database { .. }) && store.is_retryable() {
                    return true;
                }
            }
            #[cfg(feature = "postgres")]
            if let Some(sql) = error.downcast_ref::<sqlx::Error>() {
                if crate::store::postgres::is_transient(sql) {
                    return true;
                }
            }
            cause = error.source();
        }
        false
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for HandlerError {
    fn from(error: E) -> Self {
        HandlerError {
            source: Box::new(error),
            transient: false,
        }
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HandlerError({})", self.chain())
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.chain())
    }
}

/// How often and how patiently a failing batch is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all before the event counts as poison (at least 1).
    pub max_attempts: u32,
    /// Wait after the first failure; doubles after each further one.
    pub initial_backoff: Duration,
    /// The longest wait.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The wait before attempt `attempt + 1`, with full jitter in the upper half.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .initial_backoff
            .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)))
            .min(self.max_backoff);
        let half = exp / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
}

/// What happens to an event whose handler still fails after every retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
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
pub struct ProjectionOptions<S: ProjectionStore> {
    pub(crate) projection: Arc<dyn Projection<S>>,
    pub(crate) partitions: u32,
    pub(crate) batch_size: usize,
    pub(crate) retry: RetryPolicy,
    pub(crate) on_error: OnError,
}

impl<S: ProjectionStore> ProjectionOptions<S> {
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
    /// aggregate's events stay in order within its partition. Changing the
    /// count of an existing projection needs a rebuild.
    pub fn partitions(mut self, n: u32) -> Self {
        self.partitions = n.max(1);
        self
    }

    /// Events per batch (and per transaction).
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
