//! The command bus: load an aggregate, let it handle a command, append what it
//! emitted, and return what was written.
//!
//! Any `cqrs-es` [`Aggregate`] runs unchanged. Unlike `cqrs-es`'s
//! `PersistedEventStore`, events are applied exactly once: `EventSink::write`
//! applies each event while `handle` runs, so the aggregate after `handle` *is*
//! the new state, and that is what a snapshot stores.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use tracing::Instrument;
use uuid::Uuid;

use crate::error::{CommandError, EventRef, HandlerError, StoreError};
use crate::event::{
    deserialize_payload, AppendRequest, Checkpoint, Envelope, Metadata, NewEvent, RecordedEvent,
    Snapshot,
};
use crate::outcome::{CommandOutcome, Refusal, RefusalRecord};
use crate::pubsub::EventBus;
use crate::store::{AppendInTransaction, EventStore, Transactional};
use crate::upcast::Upcaster;

/// Reacts to a command's events inside the transaction that appends them:
/// exactly once, all or nothing. If it fails, the events and every write it
/// made roll back, and the command's caller gets
/// [`CommandError::Inline`]. Use it for strong consistency inside one
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
    /// Any [`HandlerError`]; the command then writes nothing.
    async fn handle(
        &self,
        events: &[Envelope<A>],
        tx: &mut S::Transaction,
    ) -> Result<(), HandlerError>;
}

/// Runs commands against aggregates of type `A` stored in `S`.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use outflow::{CommandBus, CommandContext, MemoryStore};
/// # use outflow::doc_fixture::{Counter, CounterCommand};
/// let bus = CommandBus::<Counter, _>::builder(MemoryStore::new(), ())
///     .snapshot_every(100)
///     .build();
/// let done = bus
///     .execute_with("c-1", CounterCommand::Increment { by: 3 }, CommandContext::new().with_metadata("user", "ann"))
///     .await?;
/// assert_eq!(done.version, 1);
/// assert_eq!(done.events[0].metadata["user"], "ann");
/// let (counter, version) = bus.load("c-1").await?;
/// assert_eq!((counter.value, version), (3, 1));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
pub struct CommandBus<A: Aggregate, S: EventStore> {
    store: S,
    services: A::Services,
    snapshot_every: Option<u64>,
    upcasters: Arc<[Box<dyn Upcaster>]>,
    inline: Option<Box<dyn InlinePath<A>>>,
    publish: Option<EventBus>,
    cache: Option<std::sync::Mutex<AggregateCache<A>>>,
    typed_refusals: Option<RefusalCodec<A::Error>>,
}

/// How a bus with typed refusals stores and restores its domain error.
struct RefusalCodec<E> {
    encode: fn(&E) -> Option<serde_json::Value>,
    decode: fn(serde_json::Value) -> Option<E>,
}

impl<A: Aggregate, S: EventStore + std::fmt::Debug> std::fmt::Debug for CommandBus<A, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandBus")
            .field("aggregate_type", &A::TYPE)
            .field("store", &self.store)
            .field("snapshot_every", &self.snapshot_every)
            .field("upcasters", &self.upcasters.len())
            .field("inline", &self.inline.is_some())
            .field("publishes", &self.publish.is_some())
            .field("cache", &self.cache.is_some())
            .field("typed_refusals", &self.typed_refusals.is_some())
            .finish_non_exhaustive()
    }
}

/// Builds a [`CommandBus`].
#[must_use = "a builder does nothing until it is built"]
pub struct CommandBusBuilder<A: Aggregate, S: EventStore> {
    store: S,
    services: A::Services,
    snapshot_every: Option<u64>,
    upcasters: Vec<Box<dyn Upcaster>>,
    inline: Option<Box<dyn InlinePath<A>>>,
    publish: Option<EventBus>,
    cache: usize,
    typed_refusals: Option<RefusalCodec<A::Error>>,
}

impl<A: Aggregate, S: EventStore + std::fmt::Debug> std::fmt::Debug for CommandBusBuilder<A, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandBusBuilder")
            .field("aggregate_type", &A::TYPE)
            .field("store", &self.store)
            .field("snapshot_every", &self.snapshot_every)
            .field("upcasters", &self.upcasters.len())
            .field("inline", &self.inline.is_some())
            .field("publishes", &self.publish.is_some())
            .field("cache", &self.cache)
            .field("typed_refusals", &self.typed_refusals.is_some())
            .finish_non_exhaustive()
    }
}

impl<A: Aggregate, S: EventStore> CommandBusBuilder<A, S> {
    /// Keeps up to `capacity` aggregates in memory after their commands, so a
    /// command on a recently used aggregate skips loading it (default 0: off).
    ///
    /// A cached aggregate is checked by the append itself: if another writer
    /// appended meanwhile (another process, or a bus without this cache), the
    /// command fails with a [conflict](CommandError::is_conflict), the entry is
    /// dropped, and a retry ([`CommandBus::execute_retrying`]) loads it fresh.
    /// So turn it on where each aggregate is written mostly through one bus.
    pub fn cache_aggregates(mut self, capacity: usize) -> Self {
        self.cache = capacity;
        self
    }

    /// Publishes every committed command's events to an in-memory
    /// [`EventBus`] (at most once, after the commit).
    pub fn publish_to(mut self, bus: EventBus) -> Self {
        self.publish = Some(bus);
        self
    }

    /// Stores a snapshot each time an aggregate's version crosses a multiple
    /// of `events` (0 turns snapshots off, the default).
    pub fn snapshot_every(mut self, events: u64) -> Self {
        self.snapshot_every = (events > 0).then_some(events);
        self
    }

    /// Renamed event types (see [`EventAliases`](crate::upcast::EventAliases)):
    /// events stored under an old name load under the new one. Give the
    /// same value to the projection runner.
    pub fn event_aliases(mut self, aliases: crate::upcast::EventAliases) -> Self {
        self.upcasters.insert(0, aliases.upcaster());
        self
    }

    /// Adds an upcaster, run on every event loaded.
    pub fn upcaster(mut self, upcaster: Box<dyn Upcaster>) -> Self {
        self.upcasters.push(upcaster);
        self
    }

    /// Adds a list of upcasters, run in order on every event loaded: the
    /// same [`Upcasters`](crate::upcast::Upcasters) value the views and
    /// projections are given.
    pub fn upcasters(mut self, upcasters: impl Into<crate::upcast::Upcasters>) -> Self {
        let upcasters = upcasters.into();
        if !upcasters.is_empty() {
            self.upcasters.push(Box::new(upcasters));
        }
        self
    }

    /// Stores refusals of [`CommandBus::execute_once`] with the domain
    /// error as JSON, so that a re-sent command is answered with
    /// [`CommandError::Rejected`] and the same error value, as when it was
    /// first refused. Without it the error is remembered by its message
    /// and a re-send gets [`CommandError::Refused`] (see
    /// [`crate::outcome`]).
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use outflow::{CommandBus, CommandContext, CommandError, MemoryStore};
    /// # use outflow::doc_fixture::{Counter, CounterCommand, CounterError};
    /// let bus = CommandBus::<Counter, _>::builder(MemoryStore::new(), ())
    ///     .remember_typed_refusals()
    ///     .build();
    /// let context = CommandContext::new();
    /// let first = bus.execute_once("c-1", CounterCommand::Decrement { by: 1 }, context.clone()).await;
    /// bus.execute("c-1", CounterCommand::Increment { by: 10 }).await?;
    /// let again = bus.execute_once("c-1", CounterCommand::Decrement { by: 1 }, context).await;
    /// let (Err(CommandError::Rejected(a)), Err(CommandError::Rejected(b))) = (first, again) else {
    ///     panic!("both refused")
    /// };
    /// assert_eq!(a, b);
    /// assert_eq!(b, CounterError("cannot take 1 from 0".into()));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub fn remember_typed_refusals(mut self) -> Self
    where
        A::Error: serde::Serialize + serde::de::DeserializeOwned,
    {
        self.typed_refusals = Some(RefusalCodec {
            encode: |error| serde_json::to_value(error).ok(),
            decode: |value| serde_json::from_value(value).ok(),
        });
        self
    }

    /// The bus.
    pub fn build(self) -> CommandBus<A, S> {
        CommandBus {
            store: self.store,
            services: self.services,
            snapshot_every: self.snapshot_every,
            upcasters: self.upcasters.into(),
            inline: self.inline,
            publish: self.publish,
            cache: (self.cache > 0).then(|| std::sync::Mutex::new(AggregateCache::new(self.cache))),
            typed_refusals: self.typed_refusals,
        }
    }
}

/// Who and what a command comes from: metadata, correlation and causation ids.
///
/// Every event the command writes carries the context's metadata, its
/// correlation id, and its causation id. By default both ids are the command's
/// own fresh id; [`caused_by`](Self::caused_by) continues the chain of an event.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandContext {
    /// Id of this command.
    pub command_id: Uuid,
    /// Correlation id for the events written.
    pub correlation_id: Uuid,
    /// Causation id for the events written.
    pub causation_id: Uuid,
    /// Metadata copied onto every event written.
    pub metadata: Metadata,
}

impl Default for CommandContext {
    fn default() -> Self {
        Self::new()
    }
}

impl CommandContext {
    /// A context with a fresh command id, used as correlation and causation id.
    pub fn new() -> Self {
        let command_id = Uuid::now_v7();
        CommandContext {
            command_id,
            correlation_id: command_id,
            causation_id: command_id,
            metadata: Metadata::new(),
        }
    }

    /// A context for a command issued in reaction to `event`: same correlation
    /// id, caused by the event.
    pub fn caused_by<B: Aggregate>(event: &Envelope<B>) -> Self {
        CommandContext {
            correlation_id: event.correlation_id.unwrap_or(event.event_id),
            causation_id: event.event_id,
            ..Self::new()
        }
    }

    /// A context for a command issued in reaction to a stored event (a
    /// process manager's, a relay's): same correlation id, caused by the
    /// event, and a command id derived from the event id and `label`, the
    /// same every time the event is handled again — what
    /// [`CommandBus::execute_once`] recognizes a repeated command by.
    pub fn reacting_to(event: &RecordedEvent, label: &str) -> Self {
        CommandContext {
            command_id: Uuid::new_v5(&event.event_id, label.as_bytes()),
            correlation_id: event.correlation_id.unwrap_or(event.event_id),
            causation_id: event.event_id,
            metadata: Metadata::new(),
        }
    }

    /// The context of a further command that follows from this one (a
    /// compensation, a second step): same correlation and causation, a
    /// command id derived from this one's and `label`, so it is as
    /// deterministic as this one.
    pub fn follow_up(&self, label: &str) -> Self {
        CommandContext {
            command_id: Uuid::new_v5(&self.command_id, label.as_bytes()),
            ..self.clone()
        }
    }

    /// Adds a metadata entry.
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Sets the correlation id.
    pub fn with_correlation_id(mut self, id: Uuid) -> Self {
        self.correlation_id = id;
        self
    }
}

/// What a command wrote.
#[derive(Debug)]
pub struct Committed<A: Aggregate> {
    /// The events written, with their positions (empty if the command emitted none).
    pub events: Vec<Envelope<A>>,
    /// The aggregate's version after the command.
    pub version: u64,
    /// True when [`CommandBus::execute_once`] found the command already
    /// written by an earlier run: `events` are that run's, nothing new was
    /// written.
    pub repeated: bool,
}

impl<A: Aggregate> Committed<A> {
    /// Checkpoint of the last event written; a reader that has passed it has
    /// seen all of this command's events. `None` when nothing was written.
    pub fn checkpoint(&self) -> Option<Checkpoint> {
        self.events.last().map(Envelope::checkpoint)
    }
}

impl<A, S> CommandBusBuilder<A, S>
where
    A: Aggregate + 'static,
    S: AppendInTransaction + Clone,
{
    /// Adds a handler run inside the append transaction (see
    /// [`InlineHandler`]); needs a backend whose append can join a
    /// transaction.
    pub fn inline(mut self, handler: impl InlineHandler<A, S>) -> Self {
        let handler: Box<dyn InlineHandler<A, S>> = Box::new(handler);
        match self
            .inline
            .as_mut()
            .and_then(|inline| inline.as_any_mut().downcast_mut::<InlineHandlers<A, S>>())
        {
            Some(handlers) => handlers.handlers.push(handler),
            None => {
                self.inline = Some(Box::new(InlineHandlers {
                    store: self.store.clone(),
                    handlers: vec![handler],
                }))
            }
        }
        self
    }
}

/// How a bus with inline handlers appends: in a transaction of the backend,
/// with the handlers, all or nothing. Boxed so that a bus over a store
/// without transactions needs no such bound.
#[async_trait::async_trait]
trait InlinePath<A: Aggregate>: Send + Sync {
    /// Appends, runs the handlers and commits; returns the envelopes and, when
    /// `publish`, the recorded events for the in-memory bus.
    async fn append(
        &self,
        request: AppendRequest,
        payloads: Vec<A::Event>,
        publish: bool,
        claim: Option<Uuid>,
    ) -> Result<(Vec<Envelope<A>>, Option<Vec<RecordedEvent>>), CommandError<A::Error>>;

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
}

struct InlineHandlers<A: Aggregate, S: AppendInTransaction> {
    store: S,
    handlers: Vec<Box<dyn InlineHandler<A, S>>>,
}

#[async_trait::async_trait]
impl<A, S> InlinePath<A> for InlineHandlers<A, S>
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
        let recorded = self.store.append_in(&mut tx, request).await?;
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

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

impl<A, S> CommandBus<A, S>
where
    A: Aggregate + 'static,
    A::Error: 'static,
    S: EventStore,
{
    /// A bus with default settings (no snapshots, no upcasters).
    pub fn new(store: S, services: A::Services) -> Self {
        Self::builder(store, services).build()
    }

    /// A builder to set snapshots and upcasters.
    pub fn builder(store: S, services: A::Services) -> CommandBusBuilder<A, S> {
        CommandBusBuilder {
            store,
            services,
            snapshot_every: None,
            upcasters: Vec::new(),
            inline: None,
            publish: None,
            cache: 0,
            typed_refusals: None,
        }
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Runs `command` on aggregate `aggregate_id` with a fresh [`CommandContext`].
    ///
    /// # Errors
    ///
    /// [`CommandError::Rejected`] when the aggregate refuses the command;
    /// [`CommandError::Store`] when loading or appending fails, including a
    /// concurrency conflict ([`CommandError::is_conflict`]).
    pub async fn execute(
        &self,
        aggregate_id: &str,
        command: A::Command,
    ) -> Result<Committed<A>, CommandError<A::Error>> {
        self.execute_with(aggregate_id, command, CommandContext::new())
            .await
    }

    /// Runs `command` with the given context.
    ///
    /// # Errors
    ///
    /// As [`execute`](Self::execute).
    pub async fn execute_with(
        &self,
        aggregate_id: &str,
        command: A::Command,
        context: CommandContext,
    ) -> Result<Committed<A>, CommandError<A::Error>> {
        self.instrumented(aggregate_id, command, context, false)
            .await
    }

    /// Runs `command` at most once per command id, and gives every send of
    /// the same id the same outcome: when the command with
    /// `context.command_id` was accepted before, returns the events it
    /// wrote (with [`Committed::repeated`] set) without running it again;
    /// when it was refused before, returns the same refusal — even if the
    /// aggregate changed since and would now accept it (like an
    /// idempotency key: the key fixes the response). For commands sent at
    /// least once — by a [process manager](crate::process), a retried
    /// delivery, a client retrying after a timeout — whose id is
    /// deterministic (see [`CommandContext::reacting_to`] and
    /// [`CommandContext::follow_up`]).
    ///
    /// The outcome is stored atomically with the decision (see
    /// [`crate::outcome`] for what is kept, where, and for how long): the
    /// events' ids are derived from the command id and a claim of the id
    /// commits with them; a refusal is stored as the domain error's message
    /// (and its JSON with
    /// [`remember_typed_refusals`](CommandBusBuilder::remember_typed_refusals)).
    /// Of concurrent sends, the first outcome stored wins and the others
    /// return it. A remembered refusal comes back as
    /// [`CommandError::Refused`], or as [`CommandError::Rejected`] on a bus
    /// with typed refusals; [`CommandError::is_refusal`] covers both.
    ///
    /// The check reads the outcome by key and then the aggregate's stream,
    /// so its cost grows with the stream's length.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use outflow::{CommandBus, CommandContext, MemoryStore};
    /// # use outflow::doc_fixture::{Counter, CounterCommand};
    /// let bus = CommandBus::<Counter, _>::new(MemoryStore::new(), ());
    /// let context = CommandContext::new();
    /// let first = bus.execute_once("c-1", CounterCommand::Increment { by: 5 }, context.clone()).await?;
    /// let again = bus.execute_once("c-1", CounterCommand::Increment { by: 5 }, context).await?;
    /// assert!(!first.repeated && again.repeated);
    /// assert_eq!(again.events[0].event_id, first.events[0].event_id);
    /// assert_eq!(bus.load("c-1").await?.0.value, 5);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    ///
    /// # Errors
    ///
    /// As [`execute`](Self::execute), and [`CommandError::Refused`] for a
    /// remembered refusal. A conflict means another writer changed the
    /// aggregate first and no outcome is stored for this command: retry it
    /// with the same context.
    pub async fn execute_once(
        &self,
        aggregate_id: &str,
        command: A::Command,
        context: CommandContext,
    ) -> Result<Committed<A>, CommandError<A::Error>> {
        self.instrumented(aggregate_id, command, context, true)
            .await
    }

    async fn instrumented(
        &self,
        aggregate_id: &str,
        command: A::Command,
        context: CommandContext,
        once: bool,
    ) -> Result<Committed<A>, CommandError<A::Error>> {
        let span = tracing::info_span!(
            "command",
            aggregate_type = A::TYPE,
            aggregate_id,
            outcome = tracing::field::Empty,
            events = tracing::field::Empty,
        );
        let started = Instant::now();
        let result = async {
            if once {
                self.run_once(aggregate_id, command, context).await
            } else {
                self.run_command(aggregate_id, command, context, false)
                    .await
            }
        }
        .instrument(span.clone())
        .await;
        let outcome = match &result {
            Ok(committed) if committed.repeated => "repeated",
            Ok(_) => "committed",
            Err(CommandError::Rejected(_) | CommandError::Refused(_)) => "rejected",
            Err(error) if error.is_conflict() => "conflict",
            Err(_) => "failed",
        };
        span.record("outcome", outcome);
        if let Ok(committed) = &result {
            span.record("events", committed.events.len());
        }
        metrics::counter!("outflow_commands_total", "aggregate_type" => A::TYPE, "outcome" => outcome)
            .increment(1);
        metrics::histogram!("outflow_command_seconds", "aggregate_type" => A::TYPE)
            .record(started.elapsed().as_secs_f64());
        if let Err(error) = &result {
            match error {
                CommandError::Rejected(_) | CommandError::Refused(_) => {
                    tracing::debug!(parent: &span, error = %crate::error::error_chain(error), "command rejected");
                }
                // An inline handler that refused the data (a unique
                // address taken, say) is a business outcome like a
                // rejection, not a failure to look at.
                CommandError::Inline { error: handler, .. }
                    if handler.declared_kind() == Some(crate::error::ErrorKind::Data) =>
                {
                    tracing::debug!(parent: &span, error = %crate::error::error_chain(error), "command refused by an inline handler");
                }
                _ if error.is_conflict() => {
                    metrics::counter!("outflow_command_conflicts_total", "aggregate_type" => A::TYPE)
                        .increment(1);
                    tracing::debug!(parent: &span, error = %crate::error::error_chain(error), "command lost a concurrency race");
                }
                _ => {
                    tracing::warn!(parent: &span, error = %crate::error::error_chain(error), "command failed");
                }
            }
        }
        result
    }

    /// Runs `command` with `metadata` on every event it writes (the
    /// cqrs-es `execute_with_metadata`).
    ///
    /// # Errors
    ///
    /// As [`execute`](Self::execute).
    pub async fn execute_with_metadata(
        &self,
        aggregate_id: &str,
        command: A::Command,
        metadata: HashMap<String, String>,
    ) -> Result<Committed<A>, CommandError<A::Error>> {
        let mut context = CommandContext::new();
        context.metadata = metadata;
        self.execute_with(aggregate_id, command, context).await
    }

    /// [`execute_once`](Self::execute_once): the stored outcome and the
    /// stream are searched once the aggregate is loaded (see
    /// `run_command`), and again when its append loses a race (the winner
    /// may have been the same command, or its refusal).
    async fn run_once(
        &self,
        aggregate_id: &str,
        command: A::Command,
        context: CommandContext,
    ) -> Result<Committed<A>, CommandError<A::Error>> {
        let command_id = context.command_id;
        match self.run_command(aggregate_id, command, context, true).await {
            Err(error) if error.is_conflict() => {
                match self.decided(aggregate_id, command_id).await? {
                    Some(done) => done,
                    None => Err(error),
                }
            }
            result => result,
        }
    }

    /// What was decided for `command_id` on this aggregate, if anything:
    /// the remembered outcome, or events written by it.
    async fn decided(
        &self,
        aggregate_id: &str,
        command_id: Uuid,
    ) -> Result<Option<Result<Committed<A>, CommandError<A::Error>>>, StoreError> {
        if let Some(outcome) = self
            .store
            .command_outcome(A::TYPE, aggregate_id, command_id)
            .await?
        {
            return self.replay(aggregate_id, outcome).await.map(Some);
        }
        Ok(self.written_by(aggregate_id, command_id).await?.map(Ok))
    }

    /// The answer to a command whose outcome was stored before.
    async fn replay(
        &self,
        aggregate_id: &str,
        outcome: CommandOutcome,
    ) -> Result<Result<Committed<A>, CommandError<A::Error>>, StoreError> {
        if let Some(refusal) = Refusal::from_outcome(&outcome) {
            return Ok(Err(self.refused(refusal)));
        }
        Ok(Ok(
            match self.written_by(aggregate_id, outcome.command_id).await? {
                Some(done) => done,
                // Accepted without events.
                None => Committed {
                    events: Vec::new(),
                    version: outcome.version,
                    repeated: true,
                },
            },
        ))
    }

    /// A remembered refusal as the caller gets it: the domain error again
    /// when it was stored typed and still decodes.
    fn refused(&self, refusal: Refusal) -> CommandError<A::Error> {
        if let (Some(codec), Some(error)) = (&self.typed_refusals, &refusal.error) {
            if let Some(error) = (codec.decode)(error.clone()) {
                return CommandError::Rejected(error);
            }
        }
        CommandError::Refused(refusal)
    }

    /// Stores the outcome of a command run with an id (a refusal, or an
    /// acceptance without events); returns the caller's answer: `mine`
    /// when this outcome was stored, else the one stored first.
    async fn remember(
        &self,
        aggregate_id: &str,
        command_id: Uuid,
        version: u64,
        mine: Result<Committed<A>, CommandError<A::Error>>,
    ) -> Result<Committed<A>, CommandError<A::Error>> {
        let refusal = match &mine {
            Err(CommandError::Rejected(error)) => Some(RefusalRecord {
                message: error.to_string(),
                error: self
                    .typed_refusals
                    .as_ref()
                    .and_then(|codec| (codec.encode)(error)),
            }),
            _ => None,
        };
        let outcome = CommandOutcome {
            aggregate_type: A::TYPE.to_owned(),
            aggregate_id: aggregate_id.to_owned(),
            command_id,
            version,
            recorded_at: chrono::Utc::now(),
            refusal,
        };
        let stored = self.store.record_outcome(outcome.clone()).await?;
        if stored.refusal == outcome.refusal && stored.version == outcome.version {
            return mine;
        }
        self.replay(aggregate_id, stored).await?
    }

    /// The events a command with `command_id` wrote to the aggregate's
    /// stream, if any, and the stream's version.
    async fn written_by(
        &self,
        aggregate_id: &str,
        command_id: Uuid,
    ) -> Result<Option<Committed<A>>, StoreError> {
        const PAGE: usize = 1000;
        let mut after = 0;
        let mut found: Vec<Envelope<A>> = Vec::new();
        loop {
            let page = self
                .store
                .read_stream(A::TYPE, aggregate_id, after, PAGE)
                .await?;
            let full = page.len() == PAGE;
            for event in &page {
                after = event.sequence;
                if event.event_id == event_id_of(command_id, found.len()) {
                    found.push(event.decode_ref::<A>(&self.upcasters)?);
                }
            }
            if !full {
                break;
            }
        }
        Ok((!found.is_empty()).then_some(Committed {
            events: found,
            version: after,
            repeated: true,
        }))
    }

    async fn run_command(
        &self,
        aggregate_id: &str,
        command: A::Command,
        context: CommandContext,
        ids_from_command: bool,
    ) -> Result<Committed<A>, CommandError<A::Error>> {
        // A cached aggregate is taken out while its command runs: a rejected
        // or failed command drops it (its state may hold half a command).
        let cached = self.cache.as_ref().and_then(|cache| {
            cache
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .take(aggregate_id)
        });
        let (mut aggregate, version) = match cached {
            Some(cached) => cached,
            None => self.load(aggregate_id).await?,
        };
        if ids_from_command {
            // Searched after the load: an earlier run of this command is at
            // or below the version loaded (or its outcome is stored), so the
            // search finds it; a run that commits after the load makes this
            // append conflict on the stream or on the command's claim.
            if let Some(done) = self.decided(aggregate_id, context.command_id).await? {
                self.keep(aggregate_id, aggregate, version);
                return done;
            }
        }
        let sink = EventSink::<A>::default();
        if let Err(error) = aggregate.handle(command, &self.services, &sink).await {
            let refused = Err(CommandError::Rejected(error));
            if ids_from_command {
                return self
                    .remember(aggregate_id, context.command_id, version, refused)
                    .await;
            }
            return refused;
        }
        let payloads = sink.collect().await;
        if payloads.is_empty() {
            self.keep(aggregate_id, aggregate, version);
            let accepted = Ok(Committed {
                events: Vec::new(),
                version,
                repeated: false,
            });
            if ids_from_command {
                return self
                    .remember(aggregate_id, context.command_id, version, accepted)
                    .await;
            }
            return accepted;
        }
        let mut events = Vec::with_capacity(payloads.len());
        for (i, payload) in payloads.iter().enumerate() {
            let mut event = NewEvent::from_event::<A>(aggregate_id, payload)?;
            if ids_from_command {
                event.event_id = event_id_of(context.command_id, i);
            }
            event.metadata = context.metadata.clone();
            event.correlation_id = Some(context.correlation_id);
            event.causation_id = Some(context.causation_id);
            events.push(event);
        }
        let request = AppendRequest {
            aggregate_type: A::TYPE.to_owned(),
            aggregate_id: aggregate_id.to_owned(),
            expected_version: version,
            events,
        };
        let new_version = version + payloads.len() as u64;
        // The written events are copied only for a bus that publishes them.
        let publish = self.publish.is_some();
        let claim = ids_from_command.then_some(context.command_id);
        let (envelopes, published) = match &self.inline {
            None => {
                let recorded = match claim {
                    Some(command_id) => self.store.append_command(request, command_id).await?,
                    None => self.store.append(request).await?,
                };
                let published = publish.then(|| recorded.clone());
                (into_envelopes(recorded, payloads), published)
            }
            Some(inline) => inline.append(request, payloads, publish, claim).await?,
        };
        if let (Some(bus), Some(events)) = (&self.publish, published) {
            bus.publish(events);
        }
        if let Some(every) = self.snapshot_every {
            if crosses_snapshot(version, new_version, every) {
                self.snapshot(aggregate_id, &aggregate, new_version).await;
            }
        }
        self.keep(aggregate_id, aggregate, new_version);
        Ok(Committed {
            events: envelopes,
            version: new_version,
            repeated: false,
        })
    }

    /// Runs the command that `command` makes, retrying up to `attempts`
    /// times in all when it loses a concurrency race (another writer appended
    /// to the aggregate first): each attempt reloads the aggregate and makes
    /// the command anew, so commands need not be `Clone`.
    ///
    /// ```
    /// # use outflow::doc_fixture::*;
    /// # use outflow::{CommandBus, MemoryStore};
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let bus: CommandBus<Counter, _> = CommandBus::new(MemoryStore::new(), ());
    /// let done = bus
    ///     .execute_retrying("c-1", 3, || CounterCommand::Increment { by: 1 })
    ///     .await?;
    /// assert_eq!(done.version, 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    ///
    /// # Errors
    ///
    /// As [`execute`](Self::execute); the conflict of the last attempt when all lose.
    pub async fn execute_retrying(
        &self,
        aggregate_id: &str,
        attempts: u32,
        command: impl FnMut() -> A::Command,
    ) -> Result<Committed<A>, CommandError<A::Error>> {
        self.execute_retrying_with(aggregate_id, CommandContext::new(), attempts, command)
            .await
    }

    /// As [`execute_retrying`](Self::execute_retrying), with a context (the
    /// same correlation and causation on every attempt).
    ///
    /// # Errors
    ///
    /// As [`execute`](Self::execute); the conflict of the last attempt when all lose.
    pub async fn execute_retrying_with(
        &self,
        aggregate_id: &str,
        context: CommandContext,
        attempts: u32,
        mut command: impl FnMut() -> A::Command,
    ) -> Result<Committed<A>, CommandError<A::Error>> {
        let mut attempt = 1;
        loop {
            match self
                .execute_with(aggregate_id, command(), context.clone())
                .await
            {
                Err(error) if error.is_conflict() && attempt < attempts.max(1) => {
                    tracing::debug!(error = %crate::error::error_chain(&error), aggregate_id, attempt, "retrying after conflict");
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    /// Loads an aggregate: from its snapshot when snapshots are on and one is
    /// stored, then the events after it. Returns the aggregate and its version.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when reading fails or a stored event does not decode.
    pub async fn load(&self, aggregate_id: &str) -> Result<(A, u64), StoreError> {
        let mut loaded = self
            .store
            .load(A::TYPE, aggregate_id, self.snapshot_every.is_some())
            .await?;
        let (mut aggregate, mut version) = match loaded.snapshot.take() {
            Some(snapshot) => match serde_json::from_value::<A>(snapshot.state) {
                Ok(aggregate) => (aggregate, snapshot.version),
                Err(error) => {
                    // A snapshot of an older shape of the aggregate: fold from the start.
                    tracing::warn!(error = %crate::error::error_chain(&error),
                        aggregate_type = A::TYPE,
                        aggregate_id,
                        version = snapshot.version,
                        "snapshot does not deserialize, replaying all events"
                    );
                    loaded = self.store.load(A::TYPE, aggregate_id, false).await?;
                    (A::default(), 0)
                }
            },
            None => (A::default(), 0),
        };
        for event in loaded.events {
            if event.sequence != version + 1 {
                return Err(StoreError::Corrupt {
                    table: "events".to_owned(),
                    what: format!(
                        "stream {} `{aggregate_id}` jumps from version {version} to {}",
                        A::TYPE,
                        event.sequence
                    ),
                });
            }
            version = event.sequence;
            aggregate.apply(self.decode_stream_event(aggregate_id, event)?);
        }
        Ok((aggregate, version))
    }

    fn keep(&self, aggregate_id: &str, aggregate: A, version: u64) {
        if let Some(cache) = &self.cache {
            cache
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .put(aggregate_id, aggregate, version);
        }
    }

    /// Deserializes a loaded event: straight from its JSON text when no
    /// upcaster wants it, through a JSON value and the upcasters otherwise.
    fn decode_stream_event(
        &self,
        aggregate_id: &str,
        event: crate::store::StreamEvent,
    ) -> Result<A::Event, StoreError> {
        let event_ref = |event_type: &str, event_version: &str| EventRef {
            aggregate_type: A::TYPE.to_owned(),
            aggregate_id: aggregate_id.to_owned(),
            sequence: event.sequence,
            position: Some(event.position),
            event_type: event_type.to_owned(),
            event_version: event_version.to_owned(),
        };
        let wanted = self
            .upcasters
            .iter()
            .any(|u| u.can_upcast(&event.event_type, &event.event_version));
        if !wanted {
            return crate::event::deserialize_payload_str::<A>(&event.payload, || {
                event_ref(&event.event_type, &event.event_version)
            });
        }
        let value: serde_json::Value =
            serde_json::from_str(&event.payload).map_err(|source| StoreError::Deserialize {
                event: Box::new(event_ref(&event.event_type, &event.event_version)),
                source,
            })?;
        let (event_type, event_version, payload) = crate::upcast::upcaster::apply(
            &self.upcasters,
            A::TYPE,
            aggregate_id,
            event.sequence,
            Some(event.position),
            event.event_type.clone(),
            event.event_version.clone(),
            value,
        )?;
        deserialize_payload::<A>(payload, || event_ref(&event_type, &event_version))
    }

    async fn snapshot(&self, aggregate_id: &str, aggregate: &A, version: u64) {
        // (kept below the command path: a failed snapshot never fails a command)
        let state = match serde_json::to_value(aggregate) {
            Ok(state) => state,
            Err(error) => {
                tracing::warn!(error = %crate::error::error_chain(&error),
                    aggregate_type = A::TYPE,
                    aggregate_id,
                    "snapshot not serializable"
                );
                return;
            }
        };
        // The events are committed; a failed snapshot only costs a longer load later.
        if let Err(error) = self
            .store
            .save_snapshot(Snapshot {
                aggregate_type: A::TYPE.to_owned(),
                aggregate_id: aggregate_id.to_owned(),
                version,
                state,
            })
            .await
        {
            tracing::warn!(error = %crate::error::error_chain(&error),
                aggregate_type = A::TYPE,
                aggregate_id,
                version,
                "snapshot not saved"
            );
        }
    }
}

/// The id of the `index`th event written by a command run with
/// [`CommandBus::execute_once`]: derived from the command id, so a repeated
/// command is recognized by its events.
fn event_id_of(command_id: Uuid, index: usize) -> Uuid {
    Uuid::new_v5(&command_id, &(index as u64).to_be_bytes())
}

fn into_envelopes<A: Aggregate>(
    recorded: Vec<RecordedEvent>,
    payloads: Vec<A::Event>,
) -> Vec<Envelope<A>> {
    recorded
        .into_iter()
        .zip(payloads)
        .map(|(event, payload)| event.into_envelope(payload))
        .collect()
}

/// Whether a command that took an aggregate from `version` to `new_version`
/// crossed a multiple of `every`, so a snapshot is due (a command of several
/// events may jump over the multiple itself).
fn crosses_snapshot(version: u64, new_version: u64, every: u64) -> bool {
    every > 0 && version / every != new_version / every
}

/// Aggregates kept after their commands, least recently used evicted first.
struct AggregateCache<A> {
    capacity: usize,
    entries: std::collections::HashMap<String, (A, u64, u64)>,
    by_use: std::collections::BTreeMap<u64, String>,
    tick: u64,
}

impl<A> AggregateCache<A> {
    fn new(capacity: usize) -> Self {
        AggregateCache {
            capacity,
            entries: std::collections::HashMap::new(),
            by_use: std::collections::BTreeMap::new(),
            tick: 0,
        }
    }

    fn take(&mut self, id: &str) -> Option<(A, u64)> {
        let (aggregate, version, tick) = self.entries.remove(id)?;
        self.by_use.remove(&tick);
        Some((aggregate, version))
    }

    fn put(&mut self, id: &str, aggregate: A, version: u64) {
        if let Some((_, _, tick)) = self.entries.remove(id) {
            self.by_use.remove(&tick);
        }
        while self.entries.len() >= self.capacity {
            let Some((_, oldest)) = self.by_use.pop_first() else {
                break;
            };
            self.entries.remove(&oldest);
        }
        self.tick += 1;
        self.by_use.insert(self.tick, id.to_owned());
        self.entries
            .insert(id.to_owned(), (aggregate, version, self.tick));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_is_due_when_a_command_crosses_a_multiple() {
        assert!(!crosses_snapshot(0, 99, 100));
        assert!(crosses_snapshot(99, 100, 100));
        assert!(crosses_snapshot(98, 103, 100), "jumped over 100");
        assert!(!crosses_snapshot(100, 101, 100), "just after one");
        assert!(crosses_snapshot(150, 350, 100));
        assert!(!crosses_snapshot(5, 9, 0), "snapshots off");
    }

    #[test]
    fn the_cache_evicts_the_least_recently_used() {
        let mut cache = AggregateCache::new(2);
        cache.put("a", 'a', 1);
        cache.put("b", 'b', 1);
        // Using `a` again makes `b` the oldest.
        let (aggregate, version) = cache.take("a").expect("a cached");
        cache.put("a", aggregate, version + 1);
        cache.put("c", 'c', 1);
        assert!(cache.take("b").is_none(), "b was evicted");
        assert_eq!(cache.take("a"), Some(('a', 2)));
        assert_eq!(cache.take("c"), Some(('c', 1)));
        assert_eq!(cache.entries.len(), 0);
        assert!(cache.by_use.is_empty());
    }

    #[test]
    fn a_taken_aggregate_is_gone_until_put_back() {
        let mut cache = AggregateCache::new(4);
        cache.put("a", 1u8, 3);
        assert_eq!(cache.take("a"), Some((1, 3)));
        assert_eq!(
            cache.take("a"),
            None,
            "a failed command leaves nothing stale"
        );
    }
}
