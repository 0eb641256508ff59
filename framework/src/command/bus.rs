//! The bus: load, decide, append, and hand back what was written — with
//! metrics and traces around each command, and retries on conflicts.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use tracing::Instrument;

use crate::error::CommandError;
use crate::event::{AppendRequest, Envelope, NewEvent, RecordedEvent};
use crate::port::events::EventStore;
use crate::pubsub::EventBus;
use crate::upcast::Upcaster;

use super::cache::*;
use super::context::*;
use super::inline::*;
use super::report::report;

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
    pub(super) store: S,
    pub(super) services: A::Services,
    pub(super) snapshot_every: Option<u64>,
    pub(super) upcasters: Arc<[Box<dyn Upcaster>]>,
    pub(super) inline: Option<Box<dyn InlinePath<A, S>>>,
    pub(super) publish: Option<EventBus>,
    pub(super) cache: Option<std::sync::Mutex<AggregateCache<A>>>,
    pub(super) typed_refusals: Option<RefusalCodec<A::Error>>,
}

/// What [`CommandBus::decide`] came to.
enum Decision<A: Aggregate>
where
    A::Error: 'static,
{
    /// The command's answer is known without writing: an earlier run of
    /// this command id, a refusal, or an acceptance without events.
    Answered(Result<Committed<A>, CommandError<A::Error>>),
    /// Events to write after `version`.
    Events {
        aggregate: A,
        version: u64,
        payloads: Vec<A::Event>,
    },
}

/// How a bus with typed refusals stores and restores its domain error.
pub(super) struct RefusalCodec<E> {
    pub(super) encode: fn(&E) -> Option<serde_json::Value>,
    pub(super) decode: fn(serde_json::Value) -> Option<E>,
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

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Runs `command` on aggregate `aggregate_id` with a fresh [`CommandContext`](crate::CommandContext).
    ///
    /// # Errors
    ///
    /// [`CommandError::Rejected`](crate::CommandError::Rejected) when the aggregate refuses the command;
    /// [`CommandError::Store`](crate::CommandError::Store) when loading or appending fails, including a
    /// concurrency conflict ([`CommandError::is_conflict`](crate::CommandError::is_conflict)).
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

    pub(super) async fn instrumented(
        &self,
        aggregate_id: &str,
        command: A::Command,
        context: CommandContext,
        once: bool,
    ) -> Result<Committed<A>, CommandError<A::Error>> {
        let span = tracing::info_span!(
            "outflow.command",
            aggregate_type = A::TYPE,
            aggregate_id,
            command_id = %context.command_id,
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
        report(&span, started, &result);
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

    /// Runs one command in three phases: [`decide`](Self::decide) (the
    /// aggregate loaded or taken from the cache, the command handled),
    /// [`record`](Self::record) (its events appended, with the command's
    /// claim and the inline handlers when there are any) and
    /// [`after_commit`](Self::after_commit) (published, snapshotted,
    /// cached). A refusal, or an acceptance without events, is remembered
    /// when the command carries its id (`ids_from_command`).
    pub(super) async fn run_command(
        &self,
        aggregate_id: &str,
        command: A::Command,
        context: CommandContext,
        ids_from_command: bool,
    ) -> Result<Committed<A>, CommandError<A::Error>> {
        let (aggregate, version, payloads) = match self
            .decide(aggregate_id, command, &context, ids_from_command)
            .await?
        {
            Decision::Answered(done) => return done,
            Decision::Events {
                aggregate,
                version,
                payloads,
            } => (aggregate, version, payloads),
        };
        let new_version = version + payloads.len() as u64;
        let (envelopes, published) = self
            .record(aggregate_id, version, payloads, &context, ids_from_command)
            .await?;
        self.after_commit(aggregate_id, aggregate, version, new_version, published)
            .await;
        Ok(Committed {
            events: envelopes,
            version: new_version,
            repeated: false,
        })
    }

    /// Loads the aggregate (or takes it from the cache) and lets it handle
    /// the command: either the command's answer is already known (an earlier
    /// run with this id, a refusal, no events) or events are to be written.
    async fn decide(
        &self,
        aggregate_id: &str,
        command: A::Command,
        context: &CommandContext,
        ids_from_command: bool,
    ) -> Result<Decision<A>, CommandError<A::Error>> {
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
                return Ok(Decision::Answered(done));
            }
        }
        let sink = EventSink::<A>::default();
        if let Err(error) = aggregate.handle(command, &self.services, &sink).await {
            let refused = Err(CommandError::Rejected(error));
            if ids_from_command {
                return Ok(Decision::Answered(
                    self.remember(aggregate_id, context.command_id, version, refused)
                        .await,
                ));
            }
            return Ok(Decision::Answered(refused));
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
                return Ok(Decision::Answered(
                    self.remember(aggregate_id, context.command_id, version, accepted)
                        .await,
                ));
            }
            return Ok(Decision::Answered(accepted));
        }
        Ok(Decision::Events {
            aggregate,
            version,
            payloads,
        })
    }

    /// Appends the events after `version` (ids derived from the command id
    /// when it carries one, with its claim), through the inline handlers'
    /// transaction when the bus has them; returns their envelopes and, for
    /// a bus that publishes, the recorded events.
    async fn record(
        &self,
        aggregate_id: &str,
        version: u64,
        payloads: Vec<A::Event>,
        context: &CommandContext,
        ids_from_command: bool,
    ) -> Result<(Vec<Envelope<A>>, Option<Vec<RecordedEvent>>), CommandError<A::Error>> {
        // The command's metadata with its span's trace context, looked up
        // once for all its events.
        let mut metadata = context.metadata.clone();
        crate::trace::stamp(&mut metadata);
        // Personal values are sealed under their subjects' keys (the
        // stream's by default), made for new subjects.
        let ring = self.store.key_ring();
        let events = crate::personal::sealing(ring.as_ref(), Some(aggregate_id), true, || {
            let mut events = Vec::with_capacity(payloads.len());
            for (i, payload) in payloads.iter().enumerate() {
                let mut event = NewEvent::from_event::<A>(aggregate_id, payload)?;
                if ids_from_command {
                    event.event_id = event_id_of(context.command_id, i);
                }
                event.metadata = metadata.clone();
                event.correlation_id = Some(context.correlation_id);
                event.causation_id = Some(context.causation_id);
                events.push(event);
            }
            Ok::<_, crate::error::StoreError>(events)
        })
        .await??;
        let request = AppendRequest {
            aggregate_type: A::TYPE.to_owned(),
            aggregate_id: aggregate_id.to_owned(),
            expected_version: version,
            events,
        };
        // The written events are copied only for a bus that publishes them.
        let publish = self.publish.is_some();
        let claim = ids_from_command.then_some(context.command_id);
        Ok(match &self.inline {
            None => {
                let recorded = match claim {
                    Some(command_id) => self.store.append_command(request, command_id).await?,
                    None => self.store.append(request).await?,
                };
                let published = publish.then(|| recorded.clone());
                (into_envelopes(recorded, payloads), published)
            }
            Some(inline) => inline.append(request, payloads, publish, claim).await?,
        })
    }

    /// After the commit: publishes the events in memory, takes a snapshot
    /// when the version crossed a multiple of the setting, and keeps the
    /// aggregate in the cache.
    async fn after_commit(
        &self,
        aggregate_id: &str,
        aggregate: A,
        version: u64,
        new_version: u64,
        published: Option<Vec<RecordedEvent>>,
    ) {
        if let (Some(bus), Some(events)) = (&self.publish, published) {
            bus.publish(events);
        }
        if let Some(every) = self.snapshot_every {
            if crosses_snapshot(version, new_version, every) {
                self.snapshot(aggregate_id, &aggregate, new_version).await;
            }
        }
        self.keep(aggregate_id, aggregate, new_version);
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
}
