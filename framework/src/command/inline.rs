//! Inline handlers: reactions that run in the append's own transaction,
//! all or nothing with the events.

use cqrs_es::Aggregate;
use uuid::Uuid;

use crate::error::{CommandError, HandlerError};
use crate::event::{AppendRequest, Envelope, RecordedEvent};
use crate::port::events::{AppendInTransaction, Transactional};

use super::context::*;

/// Reacts to a command's events inside the transaction that appends them:
/// exactly once, all or nothing. If it fails, the events and every write it
/// made roll back, and the command's caller gets
/// [`CommandError::Inline`](crate::CommandError::Inline). Use it for strong consistency inside one
/// database — unique constraints across aggregates, a table that must never
/// lag behind the events.
///
/// ```
/// use outflow::command::InlineHandler;
/// use outflow::projection::HandlerError;
/// use outflow::store::memory::MemoryTransaction;
/// use outflow::{Envelope, MemoryStore};
/// # use outflow::doc_fixture::Counter;
///
/// /// Refuses increments past a total of 100 across all counters.
/// struct Budget(std::sync::Mutex<i64>);
///
/// #[async_trait::async_trait]
/// impl InlineHandler<Counter, MemoryStore> for Budget {
///     fn name(&self) -> &str { "budget" }
///     async fn handle(&self, events: &[Envelope<Counter>], _tx: &mut MemoryTransaction) -> Result<(), HandlerError> {
///         let mut total = self.0.lock().map_err(|_| HandlerError::msg("poisoned"))?;
///         for event in events {
///             let outflow::doc_fixture::CounterEvent::Incremented { by } = event.payload;
///             if *total + by > 100 { return Err(HandlerError::msg("over budget")); }
///             *total += by;
///         }
///         Ok(())
///     }
/// }
/// ```
#[async_trait::async_trait]
pub trait InlineHandler<A: Aggregate, S: Transactional>: Send + Sync + 'static {
    /// A name for errors.
    fn name(&self) -> &str;

    /// Handles the events of one command inside the append transaction.
    ///
    /// # Errors
    ///
    /// Any [`HandlerError`](crate::projection::HandlerError); the command then writes nothing.
    async fn handle(
        &self,
        events: &[Envelope<A>],
        tx: &mut S::Transaction,
    ) -> Result<(), HandlerError>;
}

/// How a bus with inline handlers appends: in a transaction of the backend,
/// with the handlers, all or nothing. Boxed so that a bus over a store
/// without transactions needs no such bound; `S` is named so that the
/// builder can add a handler to the list without knowing its concrete type.
#[async_trait::async_trait]
pub(super) trait InlinePath<A: Aggregate, S>: Send + Sync {
    /// Appends, runs the handlers and commits; returns the envelopes and, when
    /// `publish`, the recorded events for the in-memory bus.
    async fn append(
        &self,
        request: AppendRequest,
        payloads: Vec<A::Event>,
        publish: bool,
        claim: Option<Uuid>,
    ) -> Result<(Vec<Envelope<A>>, Option<Vec<RecordedEvent>>), CommandError<A::Error>>;

    /// Adds a handler, run after those added before.
    fn push(&mut self, handler: Box<dyn InlineHandler<A, S>>)
    where
        S: Transactional;

    /// Appends the events with their tags from now on.
    fn tag(&mut self, tagging: Tagging<A, S>)
    where
        S: Transactional;
}

/// The append of a transaction's events with their tags.
pub(super) type TaggedAppendFn<S> = for<'a> fn(
    &'a S,
    &'a mut <S as Transactional>::Transaction,
    AppendRequest,
    Vec<Vec<String>>,
) -> futures::future::BoxFuture<
    'a,
    Result<Vec<RecordedEvent>, crate::error::StoreError>,
>;

/// How a bus built with [`tag_events`](crate::CommandBusBuilder::tag_events)
/// tags its events.
pub(super) struct Tagging<A: Aggregate, S: Transactional> {
    pub(super) tags: fn(&A::Event) -> Vec<String>,
    pub(super) append: TaggedAppendFn<S>,
}

/// [`TaggedAppendFn`] for a backend with tags.
pub(super) fn tagged_append<'a, S: crate::port::decisions::ConditionalAppend>(
    store: &'a S,
    tx: &'a mut S::Transaction,
    request: AppendRequest,
    tags: Vec<Vec<String>>,
) -> futures::future::BoxFuture<'a, Result<Vec<RecordedEvent>, crate::error::StoreError>> {
    Box::pin(store.append_tagged_in(tx, request, tags, None))
}

pub(super) struct InlineHandlers<A: Aggregate, S: AppendInTransaction> {
    pub(super) store: S,
    pub(super) handlers: Vec<Box<dyn InlineHandler<A, S>>>,
    pub(super) tagging: Option<Tagging<A, S>>,
}

#[async_trait::async_trait]
impl<A, S> InlinePath<A, S> for InlineHandlers<A, S>
where
    A: Aggregate + 'static,
    S: AppendInTransaction,
{
    async fn append(
        &self,
        request: AppendRequest,
        payloads: Vec<A::Event>,
        publish: bool,
        claim: Option<Uuid>,
    ) -> Result<(Vec<Envelope<A>>, Option<Vec<RecordedEvent>>), CommandError<A::Error>> {
        let mut tx = self.store.begin().await?;
        let key = (request.aggregate_type.clone(), request.aggregate_id.clone());
        let version = request.expected_version + request.events.len() as u64;
        let recorded = match &self.tagging {
            Some(tagging) => {
                let tags = payloads.iter().map(tagging.tags).collect();
                (tagging.append)(&self.store, &mut tx, request, tags).await?
            }
            None => self.store.append_in(&mut tx, request).await?,
        };
        if let Some(command_id) = claim {
            self.store
                .claim_command_in(&mut tx, &key.0, &key.1, command_id, version)
                .await?;
        }
        let published = publish.then(|| recorded.clone());
        let envelopes = into_envelopes(recorded, payloads);
        for handler in &self.handlers {
            if let Err(error) = handler.handle(&envelopes, &mut tx).await {
                // Dropping the transaction rolls back the events and the
                // handlers' writes.
                drop(tx);
                return Err(CommandError::Inline {
                    handler: handler.name().to_owned(),
                    error,
                });
            }
        }
        // The commit wakes log readers (the transaction appended).
        self.store.commit(tx).await?;
        Ok((envelopes, published))
    }

    fn push(&mut self, handler: Box<dyn InlineHandler<A, S>>) {
        self.handlers.push(handler);
    }

    fn tag(&mut self, tagging: Tagging<A, S>) {
        self.tagging = Some(tagging);
    }
}
