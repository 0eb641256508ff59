//! Building a bus: snapshots, upcasters, inline handlers, publishing,
//! the aggregate cache and typed refusals.

use cqrs_es::Aggregate;

use crate::port::events::{AppendInTransaction, EventStore};
use crate::pubsub::EventBus;
use crate::upcast::Upcaster;

use super::bus::*;
use super::cache::*;
use super::inline::*;

/// Builds a [`CommandBus`](crate::CommandBus).
#[must_use = "a builder does nothing until it is built"]
pub struct CommandBusBuilder<A: Aggregate, S: EventStore> {
    store: S,
    services: A::Services,
    snapshot_every: Option<u64>,
    upcasters: Vec<Box<dyn Upcaster>>,
    inline: Option<Box<dyn InlinePath<A, S>>>,
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
    /// command fails with a [conflict](crate::CommandError::is_conflict), the entry is
    /// dropped, and a retry ([`CommandBus::execute_retrying`](crate::CommandBus::execute_retrying)) loads it fresh.
    /// So turn it on where each aggregate is written mostly through one bus.
    pub fn cache_aggregates(mut self, capacity: usize) -> Self {
        self.cache = capacity;
        self
    }

    /// Publishes every committed command's events to an in-memory
    /// [`EventBus`](crate::pubsub::EventBus) (at most once, after the commit).
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

    /// Stores refusals of [`CommandBus::execute_once`](crate::CommandBus::execute_once) with the domain
    /// error as JSON, so that a re-sent command is answered with
    /// [`CommandError::Rejected`](crate::CommandError::Rejected) and the same error value, as when it was
    /// first refused. Without it the error is remembered by its message
    /// and a re-send gets [`CommandError::Refused`](crate::CommandError::Refused) (see
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

impl<A, S> CommandBusBuilder<A, S>
where
    A: Aggregate + 'static,
    S: AppendInTransaction + Clone,
{
    /// Adds a handler run inside the append transaction (see
    /// [`InlineHandler`](crate::command::InlineHandler)); needs a backend whose append can join a
    /// transaction.
    pub fn inline(mut self, handler: impl InlineHandler<A, S>) -> Self {
        let handler: Box<dyn InlineHandler<A, S>> = Box::new(handler);
        match self.inline.as_mut() {
            Some(inline) => inline.push(handler),
            None => {
                self.inline = Some(Box::new(InlineHandlers {
                    store: self.store.clone(),
                    handlers: vec![handler],
                    tagging: None,
                }))
            }
        }
        self
    }
}

impl<A, S> CommandBusBuilder<A, S>
where
    A: Aggregate + 'static,
    A::Event: crate::tags::Tagged,
    S: crate::store::ConditionalAppend + Clone,
{
    /// Stores each event with its [tags](crate::tags::Tagged) and its
    /// stream's tag ([`stream_tag`](crate::tags::stream_tag)), so
    /// [decisions](crate::decision) can read this aggregate's events by
    /// query and their conditions see its appends (each append then takes
    /// a shared lock per tag on PostgreSQL, and writes one row per tag).
    /// The events go through a transaction of the backend, as with
    /// [`inline`](Self::inline) handlers.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use outflow::store::ConditionalAppend;
    /// use outflow::tags::{Query, QueryItem};
    /// use outflow::{CommandBus, MemoryStore};
    /// # use outflow::doc_fixture::{Counter, CounterCommand};
    /// let store = MemoryStore::new();
    /// let bus = CommandBus::<Counter, _>::builder(store.clone(), ()).tag_events().build();
    /// bus.execute("c-1", CounterCommand::Increment { by: 1 }).await?;
    /// let read = store.read_query(&Query::new().with(QueryItem::stream("counter", "c-1")), None).await?;
    /// assert_eq!(read.events.len(), 1);
    /// let counting = store.read_query(&Query::new().with(QueryItem::tags(["counting"])), None).await?;
    /// assert_eq!(counting.events.len(), 1, "the tag the event type declares");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub fn tag_events(mut self) -> Self {
        let tagging = Tagging {
            tags: <A::Event as crate::tags::Tagged>::tags,
            append: tagged_append::<S>,
        };
        match self.inline.as_mut() {
            Some(inline) => inline.tag(tagging),
            None => {
                self.inline = Some(Box::new(InlineHandlers {
                    store: self.store.clone(),
                    handlers: Vec::new(),
                    tagging: Some(tagging),
                }))
            }
        }
        self
    }
}

impl<A, S> CommandBus<A, S>
where
    A: Aggregate + 'static,
    A::Error: 'static,
    S: EventStore,
{
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
}
