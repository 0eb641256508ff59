//! Decisions across aggregates: dynamic consistency boundaries on the
//! gap-safe log.
//!
//! An aggregate is one consistency boundary, fixed in advance. A
//! [`Decision`] draws its boundary per command: it names the events it
//! depends on with a [`Query`] (event types and [tags](crate::tags)), folds
//! them into its state, and decides new events; the [`DecisionBus`] appends
//! them on condition that no event matching the query was appended after
//! the read — otherwise it reads again and decides again. Two decisions
//! whose queries overlap can never both commit on what they read.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use outflow::decision::{Decision, DecisionBus, StreamId};
//! use outflow::tags::{Query, QueryItem, Tagged};
//! use outflow::MemoryStore;
//! use serde::{Deserialize, Serialize};
//!
//! /// At most `capacity` students per course.
//! struct Subscribe;
//!
//! struct SubscribeStudent { student: u32, course: u32, capacity: usize }
//!
//! #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
//! enum CourseEvent { StudentSubscribed { student: u32, course: u32 } }
//!
//! impl outflow::cqrs_es::DomainEvent for CourseEvent {
//!     fn event_type(&self) -> String { "StudentSubscribed".into() }
//!     fn event_version(&self) -> String { "1".into() }
//! }
//!
//! impl Tagged for CourseEvent {
//!     fn tags(&self) -> Vec<String> {
//!         let CourseEvent::StudentSubscribed { student, course } = self;
//!         vec![format!("course:{course}"), format!("student:{student}")]
//!     }
//! }
//!
//! #[derive(Debug, thiserror::Error)]
//! #[error("the course is full")]
//! struct Full;
//!
//! impl Decision for Subscribe {
//!     type Command = SubscribeStudent;
//!     type Event = CourseEvent;
//!     type State = usize;
//!     type Error = Full;
//!
//!     fn query(command: &SubscribeStudent) -> Query {
//!         Query::new().with(QueryItem::tags([format!("course:{}", command.course)]))
//!     }
//!     fn stream(command: &SubscribeStudent) -> StreamId {
//!         StreamId::new("subscription", format!("{}-{}", command.course, command.student))
//!     }
//!     fn evolve(subscribed: &mut usize, _event: CourseEvent) {
//!         *subscribed += 1;
//!     }
//!     fn decide(subscribed: &usize, command: &SubscribeStudent) -> Result<Vec<CourseEvent>, Full> {
//!         if *subscribed >= command.capacity {
//!             return Err(Full);
//!         }
//!         Ok(vec![CourseEvent::StudentSubscribed { student: command.student, course: command.course }])
//!     }
//! }
//!
//! let bus = DecisionBus::<Subscribe, _>::new(MemoryStore::new());
//! bus.execute(SubscribeStudent { student: 1, course: 7, capacity: 1 }).await?;
//! let full = bus.execute(SubscribeStudent { student: 2, course: 7, capacity: 1 }).await;
//! assert!(full.unwrap_err().is_refusal());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
//!
//! A decision's events go to the stream it names ([`Decision::stream`]),
//! with the stream's tag besides their own: an aggregate's stream, so the
//! aggregate loads them, or a stream of the decision's own. Aggregates whose
//! buses are built with [`tag_events`](crate::CommandBusBuilder::tag_events)
//! take part: their events are found by queries, and their appends are seen
//! by conditions.

use std::marker::PhantomData;
use std::time::{Duration, Instant};

use cqrs_es::{Aggregate, DomainEvent};
use tracing::Instrument;
use uuid::Uuid;

use crate::command::CommandContext;
use crate::error::{CommandError, HandlerError, StoreError};
use crate::event::{AppendRequest, Checkpoint, NewEvent, RecordedEvent};
use crate::outcome::{CommandOutcome, Refusal, RefusalRecord};
use crate::port::decisions::{AppendCondition, ConditionalAppend};
use crate::port::events::Transactional;

use crate::port::log::{EventLog, LogFilter};
use crate::tags::{stream_tag, Query, Tagged};

/// The stream a decision appends its events to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamId {
    /// The stream's aggregate type.
    pub aggregate_type: String,
    /// The stream's aggregate id.
    pub aggregate_id: String,
}

impl StreamId {
    /// Stream `aggregate_type`/`aggregate_id`.
    ///
    /// ```
    /// let stream = outflow::decision::StreamId::new("user", "u-1");
    /// assert_eq!(stream.aggregate_id, "u-1");
    /// ```
    pub fn new(aggregate_type: impl Into<String>, aggregate_id: impl Into<String>) -> Self {
        StreamId {
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.into(),
        }
    }
}

/// A rule decided on the events a query selects, whichever aggregates
/// wrote them (see the [module](self)).
pub trait Decision: Send + Sync + 'static {
    /// What the decision is asked.
    type Command: Send + Sync;
    /// What it decides; the events it reads decode into this type too (an
    /// event that does not is an error, never skipped).
    type Event: DomainEvent + Tagged;
    /// What it folds the events into.
    type State: Default + Send;
    /// Why it refuses a command.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The events the decision depends on.
    fn query(command: &Self::Command) -> Query;

    /// The stream its events are appended to.
    fn stream(command: &Self::Command) -> StreamId;

    /// Folds one event read into the state, in log order.
    fn evolve(state: &mut Self::State, event: Self::Event);

    /// The events to append, or a refusal.
    ///
    /// # Errors
    ///
    /// The refusal, returned to the caller as
    /// [`CommandError::Rejected`] and remembered for the command id.
    fn decide(
        state: &Self::State,
        command: &Self::Command,
    ) -> Result<Vec<Self::Event>, Self::Error>;
}

/// A handler run inside a decision's append transaction, like an
/// aggregate's [`InlineHandler`](crate::command::InlineHandler): its writes
/// commit with the events or roll back with them.
#[async_trait::async_trait]
pub trait DecisionHandler<S: Transactional>: Send + Sync + 'static {
    /// The handler's name, in errors.
    fn name(&self) -> &str;

    /// Handles the events just appended (not yet committed) inside `tx`.
    ///
    /// # Errors
    ///
    /// A [`HandlerError`]: the append rolls back and the caller gets
    /// [`CommandError::Inline`].
    async fn handle(
        &self,
        events: &[RecordedEvent],
        tx: &mut S::Transaction,
    ) -> Result<(), HandlerError>;
}

/// What a decision wrote.
pub struct Decided<D: Decision> {
    /// The events as recorded.
    pub events: Vec<RecordedEvent>,
    /// The same events, decoded (empty for a repeated command).
    pub payloads: Vec<D::Event>,
    /// How many reads and decisions it took (1 without a conflict; 0 for a
    /// command whose outcome was remembered).
    pub attempts: u32,
    /// `true` when the command id had been decided before and nothing was
    /// decided again.
    pub repeated: bool,
}

impl<D: Decision> std::fmt::Debug for Decided<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decided")
            .field("events", &self.events)
            .field("payloads", &self.payloads)
            .field("attempts", &self.attempts)
            .field("repeated", &self.repeated)
            .finish()
    }
}

impl<D: Decision> Clone for Decided<D> {
    fn clone(&self) -> Self {
        Decided {
            events: self.events.clone(),
            payloads: self.payloads.clone(),
            attempts: self.attempts,
            repeated: self.repeated,
        }
    }
}

impl<D: Decision> Decided<D> {
    /// Where the last event stands in the log (for
    /// [`wait_for`](crate::runner::wait_for)); `None` without events.
    pub fn checkpoint(&self) -> Option<Checkpoint> {
        self.events.last().map(RecordedEvent::checkpoint)
    }
}

/// Runs [`Decision`]s against a store with [conditional
/// appends](ConditionalAppend): read by query, fold, decide, append on
/// condition, and on a conflict read again and decide again.
///
/// Every command runs at most once per command id
/// ([`CommandContext::command_id`]): the id is claimed with the events (in
/// the outcomes of the decision's stream), a refusal is remembered, and a
/// command sent again gets the same answer — the events it wrote
/// (`repeated`) or its refusal ([`CommandError::Refused`]).
pub struct DecisionBus<D: Decision, S: ConditionalAppend> {
    store: S,
    max_attempts: u32,
    handlers: Vec<Box<dyn DecisionHandler<S>>>,
    publish: Option<crate::pubsub::EventBus>,
    decision: PhantomData<fn() -> D>,
}

impl<D: Decision, S: ConditionalAppend + std::fmt::Debug> std::fmt::Debug for DecisionBus<D, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecisionBus")
            .field("decision", &std::any::type_name::<D>())
            .field("store", &self.store)
            .field("max_attempts", &self.max_attempts)
            .field("handlers", &self.handlers.len())
            .field("publishes", &self.publish.is_some())
            .finish()
    }
}

/// A decision's label in metrics and traces: its type's last path segment.
fn decision_name<D>() -> &'static str {
    let full = std::any::type_name::<D>();
    full.rsplit("::").next().unwrap_or(full)
}

/// The id of a command's `index`th event: the same on every run of the
/// same command id, so a repeated command finds what it wrote.
fn event_id(command_id: Uuid, index: usize) -> Uuid {
    Uuid::new_v5(&command_id, &(index as u64).to_be_bytes())
}

impl<D: Decision, S: ConditionalAppend> DecisionBus<D, S> {
    /// A bus that tries each command up to 16 times on conflicts.
    pub fn new(store: S) -> Self {
        DecisionBus {
            store,
            max_attempts: 16,
            handlers: Vec::new(),
            publish: None,
            decision: PhantomData,
        }
    }

    /// How many times a command is read and decided before its conflict is
    /// returned (at least 1).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// Adds a handler run in the append's transaction.
    pub fn inline(mut self, handler: impl DecisionHandler<S>) -> Self {
        self.handlers.push(Box::new(handler));
        self
    }

    /// Publishes the events of each decision, once committed, to an
    /// in-process [`EventBus`](crate::pubsub::EventBus) (as
    /// [`CommandBusBuilder::publish_to`](crate::CommandBusBuilder::publish_to)
    /// does for commands).
    pub fn publish_to(mut self, bus: crate::pubsub::EventBus) -> Self {
        self.publish = Some(bus);
        self
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The state `command` would be decided on now, and the events it was
    /// folded from.
    ///
    /// # Errors
    ///
    /// [`StoreError::Deserialize`] when a matching event does not decode
    /// into the decision's event type; the store's errors.
    pub async fn state(
        &self,
        command: &D::Command,
    ) -> Result<(D::State, Vec<RecordedEvent>), StoreError> {
        let read = self.store.read_query(&D::query(command), None).await?;
        let state = fold::<D>(self.store.key_ring(), &read.events).await?;
        Ok((state, read.events))
    }

    /// Runs `command` with a fresh [`CommandContext`].
    ///
    /// # Errors
    ///
    /// As [`execute_with`](Self::execute_with).
    pub async fn execute(&self, command: D::Command) -> Result<Decided<D>, CommandError<D::Error>> {
        self.execute_with(command, CommandContext::new()).await
    }

    /// Runs `command`: reads the events its query selects, folds them,
    /// decides, and appends on condition, with `context`'s metadata,
    /// correlation and causation on each event; retries on a conflict.
    ///
    /// # Errors
    ///
    /// [`CommandError::Rejected`] when the decision refuses (or
    /// [`CommandError::Refused`] when a refusal is remembered for the
    /// command id); [`CommandError::Store`] with a conflict
    /// ([`is_conflict`](CommandError::is_conflict)) when every attempt
    /// lost its race; [`CommandError::Inline`] when a handler failed; the
    /// store's other errors.
    pub async fn execute_with(
        &self,
        command: D::Command,
        context: CommandContext,
    ) -> Result<Decided<D>, CommandError<D::Error>> {
        let name = decision_name::<D>();
        let stream = D::stream(&command);
        let span = tracing::info_span!(
            "outflow.decide",
            decision = name,
            aggregate_type = %stream.aggregate_type,
            aggregate_id = %stream.aggregate_id,
            command_id = %context.command_id,
            attempts = tracing::field::Empty,
            outcome = tracing::field::Empty,
            events = tracing::field::Empty,
        );
        let started = Instant::now();
        let result = self
            .run(&command, &stream, &context)
            .instrument(span.clone())
            .await;
        let outcome = match &result {
            Ok(done) if done.repeated => "repeated",
            Ok(_) => "committed",
            Err(e) if e.is_refusal() => "rejected",
            Err(e) if e.is_conflict() => "conflict",
            Err(_) => "failed",
        };
        span.record("outcome", outcome);
        if let Ok(done) = &result {
            span.record("events", done.events.len());
            span.record("attempts", done.attempts);
        }
        metrics::counter!("outflow_decisions_total", "decision" => name, "outcome" => outcome)
            .increment(1);
        metrics::histogram!("outflow_decision_seconds", "decision" => name)
            .record(started.elapsed().as_secs_f64());
        if let Err(error) = &result {
            if !error.is_refusal() {
                tracing::warn!(parent: &span, error = %crate::error::error_chain(error), "decision failed");
            }
        }
        result
    }

    async fn run(
        &self,
        command: &D::Command,
        stream: &StreamId,
        context: &CommandContext,
    ) -> Result<Decided<D>, CommandError<D::Error>> {
        let command_id = context.command_id;
        let query = D::query(command);
        let mut last_conflict = None;
        for attempt in 1..=self.max_attempts {
            if attempt > 1 {
                metrics::counter!("outflow_decision_conflicts_total", "decision" => decision_name::<D>())
                    .increment(1);
                // A lost race: the winner may have been this very command.
                if let Some(done) = self.remembered(stream, command_id).await? {
                    return done;
                }
                tokio::time::sleep(backoff(attempt)).await;
            }
            let reading = self
                .store
                .read_query(&query, Some((&stream.aggregate_type, &stream.aggregate_id)));
            let read = if attempt == 1 {
                // The command id looked up beside the first read, on
                // another connection: a command sent again gets its
                // remembered answer for the price of one round trip.
                let (remembered, read) = tokio::join!(self.remembered(stream, command_id), reading);
                if let Some(done) = remembered? {
                    return done;
                }
                read?
            } else {
                reading.await?
            };
            let ring = self.store.key_ring();
            let state = fold::<D>(ring.clone(), &read.events).await?;
            let payloads = match D::decide(&state, command) {
                Ok(payloads) => payloads,
                Err(error) => {
                    return self
                        .remember(stream, command_id, read.stream_version, Err(error))
                        .await
                }
            };
            if payloads.is_empty() {
                return self
                    .remember(stream, command_id, read.stream_version, Ok(()))
                    .await;
            }
            let mut events = Vec::with_capacity(payloads.len());
            let mut tags = Vec::with_capacity(payloads.len());
            // Personal values sealed under their subjects' keys (the
            // stream's by default).
            let values =
                crate::personal::sealing(ring.as_ref(), Some(&stream.aggregate_id), true, || {
                    payloads
                        .iter()
                        .map(serde_json::to_value)
                        .collect::<Result<Vec<_>, _>>()
                })
                .await?
                .map_err(|source| StoreError::Serialize {
                    what: "event payload",
                    aggregate_type: stream.aggregate_type.clone(),
                    aggregate_id: stream.aggregate_id.clone(),
                    source,
                })?;
            for ((i, payload), value) in payloads.iter().enumerate().zip(values) {
                events.push(NewEvent {
                    event_id: event_id(command_id, i),
                    event_type: payload.event_type(),
                    event_version: payload.event_version(),
                    payload: value,
                    metadata: context.metadata.clone(),
                    correlation_id: Some(context.correlation_id),
                    causation_id: Some(context.causation_id),
                });
                tags.push(payload.tags());
            }
            let request = AppendRequest::new(
                stream.aggregate_type.clone(),
                stream.aggregate_id.clone(),
                read.stream_version,
                events,
            );
            let condition = AppendCondition::new(query.clone(), read.position);
            match self.append(request, tags, &condition, command_id).await {
                Ok(written) => {
                    return Ok(Decided {
                        events: written,
                        payloads,
                        attempts: attempt,
                        repeated: false,
                    })
                }
                Err(CommandError::Store(error)) if error.is_conflict() => {
                    tracing::debug!(attempt, error = %error, "decision lost a race; deciding again");
                    last_conflict = Some(error);
                }
                Err(error) => return Err(error),
            }
        }
        // The last race may have been lost to this very command.
        if let Some(done) = self.remembered(stream, command_id).await? {
            return done;
        }
        Err(CommandError::Store(last_conflict.unwrap_or(
            StoreError::ConditionFailed {
                query: query.to_string(),
                after: Checkpoint::START,
            },
        )))
    }

    /// Appends on condition, claims the command id, runs the handlers and
    /// commits: all or nothing.
    async fn append(
        &self,
        request: AppendRequest,
        tags: Vec<Vec<String>>,
        condition: &AppendCondition,
        command_id: Uuid,
    ) -> Result<Vec<RecordedEvent>, CommandError<D::Error>> {
        let mut tx = self.store.begin().await?;
        let written = self
            .store
            .append_tagged_claiming_in(&mut tx, request, tags, Some(condition), command_id)
            .await?;
        for handler in &self.handlers {
            if let Err(error) = handler.handle(&written, &mut tx).await {
                drop(tx);
                return Err(CommandError::Inline {
                    handler: handler.name().to_owned(),
                    error,
                });
            }
        }
        self.store.commit(tx).await?;
        if let Some(bus) = &self.publish {
            bus.publish(written.iter().cloned());
        }
        Ok(written)
    }

    /// The answer remembered for `command_id`, if any.
    async fn remembered(
        &self,
        stream: &StreamId,
        command_id: Uuid,
    ) -> Result<Option<Result<Decided<D>, CommandError<D::Error>>>, StoreError> {
        let Some(outcome) = self
            .store
            .command_outcome(&stream.aggregate_type, &stream.aggregate_id, command_id)
            .await?
        else {
            return Ok(None);
        };
        if let Some(refusal) = Refusal::from_outcome(&outcome) {
            return Ok(Some(Err(CommandError::Refused(refusal))));
        }
        let written = self.written_by(stream, command_id, outcome.version).await?;
        Ok(Some(Ok(Decided {
            events: written,
            payloads: Vec::new(),
            attempts: 0,
            repeated: true,
        })))
    }

    /// The events command `command_id` wrote to its stream, up to `version`.
    async fn written_by(
        &self,
        stream: &StreamId,
        command_id: Uuid,
        version: u64,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        const PAGE: usize = 1000;
        let mut after = 0;
        let mut found = Vec::new();
        while after < version {
            let page = self
                .store
                .read_stream(&stream.aggregate_type, &stream.aggregate_id, after, PAGE)
                .await?;
            let Some(last) = page.last() else { break };
            after = last.sequence;
            for event in page {
                if event.event_id == event_id(command_id, found.len()) {
                    found.push(event);
                }
            }
        }
        Ok(found)
    }

    /// Stores the outcome of a refusal or of an acceptance without events;
    /// returns the answer stored first.
    async fn remember(
        &self,
        stream: &StreamId,
        command_id: Uuid,
        version: u64,
        mine: Result<(), D::Error>,
    ) -> Result<Decided<D>, CommandError<D::Error>> {
        let refusal = mine.as_ref().err().map(|error| RefusalRecord {
            message: error.to_string(),
            error: None,
        });
        let outcome = CommandOutcome {
            aggregate_type: stream.aggregate_type.clone(),
            aggregate_id: stream.aggregate_id.clone(),
            command_id,
            version,
            recorded_at: chrono::Utc::now(),
            refusal,
        };
        let stored = self.store.record_outcome(outcome.clone()).await?;
        if stored.refusal == outcome.refusal && stored.version == outcome.version {
            return match mine {
                Ok(()) => Ok(Decided {
                    events: Vec::new(),
                    payloads: Vec::new(),
                    attempts: 1,
                    repeated: false,
                }),
                Err(error) => Err(CommandError::Rejected(error)),
            };
        }
        match self.remembered(stream, command_id).await? {
            Some(answer) => answer,
            None => Err(CommandError::Store(StoreError::Corrupt {
                table: "outcomes".into(),
                what: format!("the outcome of command {command_id} vanished"),
            })),
        }
    }
}

/// Tags the events already in the log that `filter` selects: each gets the
/// tags `tags` gives it and its stream's tag ([`stream_tag`]);
/// returns how many tags were new (a second run adds none). For events
/// appended before their aggregate's bus was built with
/// [`tag_events`](crate::CommandBusBuilder::tag_events): until they carry
/// their tags, decisions do not see them.
///
/// Run it before the decisions that depend on those tags are deployed (or
/// with their writers stopped): a decision that read before an event was
/// tagged does not see it, and its condition does not either (the event
/// was already in the log). It reads the log up to the head committed when
/// it starts, waiting for events a transaction still holds back.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use outflow::decision::backfill_tags;
/// use outflow::store::ConditionalAppend;
/// use outflow::tags::{Query, QueryItem};
/// use outflow::{CommandBus, LogFilter, MemoryStore};
/// # use outflow::doc_fixture::{Counter, CounterCommand};
/// let store = MemoryStore::new();
/// let untagged = CommandBus::<Counter, _>::new(store.clone(), ());
/// untagged.execute("c-1", CounterCommand::Increment { by: 1 }).await?;
/// let added = backfill_tags(&store, LogFilter::aggregate_types(["counter"]), |_| Ok(vec!["counting".into()])).await?;
/// assert_eq!(added, 2, "its own tag and its stream's");
/// let read = store.read_query(&Query::new().with(QueryItem::tags(["counting"])), None).await?;
/// assert_eq!(read.events.len(), 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
///
/// # Errors
///
/// What `tags` returns; the store's errors.
pub async fn backfill_tags<S, F>(store: &S, filter: LogFilter, tags: F) -> Result<u64, StoreError>
where
    S: ConditionalAppend + EventLog,
    F: Fn(&RecordedEvent) -> Result<Vec<String>, StoreError>,
{
    const BATCH: usize = 500;
    let until = store.committed_head().await?;
    let mut after = Checkpoint::START;
    let mut added = 0;
    let mut waited = Instant::now();
    // Set once readers see up to `until`: an empty read after that means
    // nothing the filter selects is left.
    let mut readable = false;
    while after < until {
        let events = store.read_log(after, &filter, BATCH).await?;
        let Some(last) = events.last() else {
            if readable {
                break;
            }
            // Until readers see up to the head, an open transaction holds
            // them back; once they do, read again before concluding.
            if store.head().await? >= until {
                readable = true;
                continue;
            }
            if waited.elapsed() > Duration::from_secs(10) {
                tracing::warn!(%until, %after, "backfilling tags: waiting for a transaction that holds the log back");
                waited = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        after = last.checkpoint();
        let mut batch = Vec::with_capacity(events.len());
        for event in &events {
            let mut list = tags(event)?;
            list.push(stream_tag(&event.aggregate_type, &event.aggregate_id));
            batch.push((event.checkpoint(), list));
        }
        added += store.tag_existing(&batch).await?;
    }
    Ok(added)
}

/// [`backfill_tags`] for aggregate `A`'s events, with the tags its event
/// type declares.
///
/// # Errors
///
/// A stored event that does not decode into `A::Event`; the store's errors.
pub async fn backfill_aggregate_tags<A, S>(store: &S) -> Result<u64, StoreError>
where
    A: Aggregate,
    A::Event: Tagged,
    S: ConditionalAppend + EventLog,
{
    backfill_tags(store, LogFilter::aggregate_types([A::TYPE]), |event| {
        Ok(event.decode_payload::<A>()?.tags())
    })
    .await
}

/// Folds the events read into a fresh state, their personal values opened
/// with `ring`.
async fn fold<D: Decision>(
    ring: Option<crate::personal::KeyRing>,
    events: &[RecordedEvent],
) -> Result<D::State, StoreError> {
    if let Some(ring) = &ring {
        ring.prepare(events).await?;
    }
    let payloads = crate::personal::sealing(ring.as_ref(), None, false, || {
        events
            .iter()
            .map(|event| {
                <D::Event as serde::Deserialize>::deserialize(&event.payload).map_err(|source| {
                    StoreError::Deserialize {
                        event: Box::new(event.event_ref()),
                        source,
                    }
                })
            })
            .collect::<Result<Vec<D::Event>, _>>()
    })
    .await??;
    let mut state = D::State::default();
    for payload in payloads {
        D::evolve(&mut state, payload);
    }
    Ok(state)
}

/// A short random pause before deciding again, growing with the attempt.
fn backoff(attempt: u32) -> Duration {
    let ceiling = 2u64.saturating_pow(attempt.min(8)).min(200);
    Duration::from_millis(rand::random::<u64>() % ceiling.max(1))
}
