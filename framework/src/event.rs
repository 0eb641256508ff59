//! Events as Outflow stores them: the serialized [`RecordedEvent`] read from
//! the log, the typed [`Envelope`] handed to users, and the [`Checkpoint`]
//! that orders them.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use cqrs_es::{Aggregate, EventEnvelope};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{EventRef, StoreError};
use crate::upcast::upcaster::Upcaster;

/// Free-form event metadata, as in `cqrs-es` (string keys and values).
pub type Metadata = HashMap<String, String>;

/// A place in the global log.
///
/// The log is ordered by `(transaction_id, position)`: on PostgreSQL the
/// transaction id is the writer's `xid8`, which makes the order safe against
/// transactions that commit out of position order; the in-memory store
/// commits one writer at a time and use a commit counter. A reader keeps the
/// checkpoint of the last event it handled and asks for what comes after it.
///
/// ```
/// use outflow::Checkpoint;
/// let a = Checkpoint::new(7, 10);
/// let b = Checkpoint::new(8, 3);
/// assert!(Checkpoint::START < a && a < b, "transaction order first, then position");
/// ```
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Checkpoint {
    /// Id of the transaction that wrote the event.
    pub transaction_id: u64,
    /// Global position of the event.
    pub position: u64,
}

impl Checkpoint {
    /// Before the first event.
    pub const START: Checkpoint = Checkpoint {
        transaction_id: 0,
        position: 0,
    };

    /// A checkpoint from its parts.
    pub const fn new(transaction_id: u64, position: u64) -> Self {
        Checkpoint {
            transaction_id,
            position,
        }
    }
}

impl std::fmt::Display for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.position, self.transaction_id)
    }
}

/// An event as stored, with its payload still serialized. This is what log
/// readers see before choosing a type to decode into.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedEvent {
    /// Unique id of the event; a stable idempotency key for consumers.
    pub event_id: Uuid,
    /// Aggregate type (`Aggregate::TYPE`).
    pub aggregate_type: String,
    /// Aggregate instance id.
    pub aggregate_id: String,
    /// Sequence within the aggregate's stream, starting at 1.
    pub sequence: u64,
    /// Global position.
    pub position: u64,
    /// Id of the writing transaction (see [`Checkpoint`]).
    pub transaction_id: u64,
    /// When the event was written.
    pub recorded_at: DateTime<Utc>,
    /// Event type (`DomainEvent::event_type`).
    pub event_type: String,
    /// Event version (`DomainEvent::event_version`).
    pub event_version: String,
    /// The serialized event.
    pub payload: serde_json::Value,
    /// Free metadata.
    pub metadata: Metadata,
    /// Id shared by every event that one user action caused.
    pub correlation_id: Option<Uuid>,
    /// Id of the command or event that directly caused this one.
    pub causation_id: Option<Uuid>,
}

impl RecordedEvent {
    /// Where this event stands in the global log.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint::new(self.transaction_id, self.position)
    }

    /// A reference naming this event in errors.
    pub fn event_ref(&self) -> EventRef {
        EventRef {
            aggregate_type: self.aggregate_type.clone(),
            aggregate_id: self.aggregate_id.clone(),
            sequence: self.sequence,
            position: Some(self.position),
            event_type: self.event_type.clone(),
            event_version: self.event_version.clone(),
        }
    }

    /// Only the typed payload: what a batch projection that needs nothing
    /// else from the envelope wants. Deserialized in place, without copying
    /// it; see [`decode_payload_with`](Self::decode_payload_with) for stored
    /// events of older versions.
    ///
    /// # Errors
    ///
    /// [`StoreError::Deserialize`] or [`StoreError::UnknownEventType`], naming
    /// the event.
    pub fn decode_payload<A: Aggregate>(&self) -> Result<A::Event, StoreError> {
        self.decode_payload_with::<A>(&[])
    }

    /// Only the typed payload, upcast if needed. When no upcaster applies,
    /// the payload is deserialized in place, without copying it.
    ///
    /// # Errors
    ///
    /// As [`decode`](Self::decode).
    pub fn decode_payload_with<A: Aggregate>(
        &self,
        upcasters: &[Box<dyn Upcaster>],
    ) -> Result<A::Event, StoreError> {
        if upcasters
            .iter()
            .any(|u| u.can_upcast(&self.event_type, &self.event_version))
        {
            return self.clone().decode::<A>(upcasters).map(|e| e.payload);
        }
        use serde::Deserialize as _;
        A::Event::deserialize(&self.payload).map_err(|source| classify(source, || self.event_ref()))
    }

    /// As [`decode`](Self::decode), without consuming the event: when no
    /// upcaster applies, the payload is deserialized in place, without copying
    /// it.
    ///
    /// # Errors
    ///
    /// As [`decode`](Self::decode).
    pub fn decode_ref<A: Aggregate>(
        &self,
        upcasters: &[Box<dyn Upcaster>],
    ) -> Result<Envelope<A>, StoreError> {
        if upcasters
            .iter()
            .any(|u| u.can_upcast(&self.event_type, &self.event_version))
        {
            return self.clone().decode(upcasters);
        }
        let payload = self.decode_payload::<A>()?;
        Ok(Envelope {
            event_id: self.event_id,
            aggregate_id: self.aggregate_id.clone(),
            sequence: self.sequence,
            position: self.position,
            transaction_id: self.transaction_id,
            recorded_at: self.recorded_at,
            event_type: self.event_type.clone(),
            event_version: self.event_version.clone(),
            correlation_id: self.correlation_id,
            causation_id: self.causation_id,
            metadata: self.metadata.clone(),
            payload,
        })
    }

    /// Upcasts (when an upcaster applies) and deserializes the payload into
    /// `A::Event`.
    ///
    /// # Errors
    ///
    /// [`StoreError::Upcast`], [`StoreError::UnknownEventType`] or
    /// [`StoreError::Deserialize`], each naming the event.
    pub fn decode<A: Aggregate>(
        mut self,
        upcasters: &[Box<dyn Upcaster>],
    ) -> Result<Envelope<A>, StoreError> {
        let (event_type, event_version, payload) = crate::upcast::upcaster::apply(
            upcasters,
            &self.aggregate_type,
            &self.aggregate_id,
            self.sequence,
            Some(self.position),
            std::mem::take(&mut self.event_type),
            std::mem::take(&mut self.event_version),
            std::mem::take(&mut self.payload),
        )?;
        self.event_type = event_type;
        self.event_version = event_version;
        let payload = deserialize_payload::<A>(payload, || self.event_ref())?;
        Ok(self.into_envelope(payload))
    }

    /// The typed envelope of this event with an already decoded payload.
    pub(crate) fn into_envelope<A: Aggregate>(self, payload: A::Event) -> Envelope<A> {
        Envelope {
            event_id: self.event_id,
            aggregate_id: self.aggregate_id,
            sequence: self.sequence,
            position: self.position,
            transaction_id: self.transaction_id,
            recorded_at: self.recorded_at,
            event_type: self.event_type,
            event_version: self.event_version,
            correlation_id: self.correlation_id,
            causation_id: self.causation_id,
            metadata: self.metadata,
            payload,
        }
    }
}

/// Deserializes a payload, telling an unknown event type apart from a payload
/// whose fields do not fit.
pub(crate) fn deserialize_payload<A: Aggregate>(
    payload: serde_json::Value,
    event: impl FnOnce() -> EventRef,
) -> Result<A::Event, StoreError> {
    serde_json::from_value::<A::Event>(payload).map_err(|source| classify(source, event))
}

/// As [`deserialize_payload`], from JSON text.
pub(crate) fn deserialize_payload_str<A: Aggregate>(
    payload: &str,
    event: impl FnOnce() -> EventRef,
) -> Result<A::Event, StoreError> {
    serde_json::from_str::<A::Event>(payload).map_err(|source| classify(source, event))
}

fn classify(source: serde_json::Error, event: impl FnOnce() -> EventRef) -> StoreError {
    let event = Box::new(event());
    if source.to_string().starts_with("unknown variant") {
        StoreError::UnknownEventType { event, source }
    } else {
        StoreError::Deserialize { event, source }
    }
}

/// A typed event of aggregate `A` with everything Outflow knows about it.
///
/// Converts into `cqrs-es`'s [`EventEnvelope`] for code written against it.
#[derive(Debug)]
pub struct Envelope<A: Aggregate> {
    /// Unique id of the event; a stable idempotency key for consumers.
    pub event_id: Uuid,
    /// Aggregate instance id.
    pub aggregate_id: String,
    /// Sequence within the aggregate's stream, starting at 1.
    pub sequence: u64,
    /// Global position.
    pub position: u64,
    /// Id of the writing transaction (see [`Checkpoint`]).
    pub transaction_id: u64,
    /// When the event was written.
    pub recorded_at: DateTime<Utc>,
    /// Event type (`DomainEvent::event_type`), after upcasting.
    pub event_type: String,
    /// Event version, after upcasting.
    pub event_version: String,
    /// Id shared by every event that one user action caused.
    pub correlation_id: Option<Uuid>,
    /// Id of the command or event that directly caused this one.
    pub causation_id: Option<Uuid>,
    /// Free metadata.
    pub metadata: Metadata,
    /// The event.
    pub payload: A::Event,
}

// Here rather than in `upcast/`, which sits below the events it rewrites.
impl crate::upcast::EventAliases {
    /// Reads `event` under its current name (its type and payload key).
    pub fn apply(&self, event: &mut RecordedEvent) {
        self.rename_read(&mut event.event_type, &mut event.payload);
    }
}

impl<A: Aggregate> Envelope<A> {
    /// Where this event stands in the global log.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint::new(self.transaction_id, self.position)
    }

    /// The aggregate type, `A::TYPE`.
    pub fn aggregate_type(&self) -> &'static str {
        A::TYPE
    }

    /// A `cqrs-es` envelope with the same id, sequence, payload and metadata.
    /// Sequences beyond `usize::MAX` saturate (they cannot occur on 64-bit targets).
    pub fn to_cqrs(&self) -> EventEnvelope<A> {
        EventEnvelope {
            aggregate_id: self.aggregate_id.clone(),
            sequence: usize::try_from(self.sequence).unwrap_or(usize::MAX),
            payload: self.payload.clone(),
            metadata: self.metadata.clone(),
        }
    }
}

impl<A: Aggregate> Clone for Envelope<A> {
    fn clone(&self) -> Self {
        Envelope {
            event_id: self.event_id,
            aggregate_id: self.aggregate_id.clone(),
            sequence: self.sequence,
            position: self.position,
            transaction_id: self.transaction_id,
            recorded_at: self.recorded_at,
            event_type: self.event_type.clone(),
            event_version: self.event_version.clone(),
            correlation_id: self.correlation_id,
            causation_id: self.causation_id,
            metadata: self.metadata.clone(),
            payload: self.payload.clone(),
        }
    }
}

impl<A: Aggregate> From<Envelope<A>> for EventEnvelope<A> {
    fn from(envelope: Envelope<A>) -> Self {
        EventEnvelope {
            aggregate_id: envelope.aggregate_id,
            sequence: usize::try_from(envelope.sequence).unwrap_or(usize::MAX),
            payload: envelope.payload,
            metadata: envelope.metadata,
        }
    }
}

/// One event to append, already serialized.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// Unique id (UUID v7 by default, so ids sort by creation time).
    pub event_id: Uuid,
    /// Event type.
    pub event_type: String,
    /// Event version.
    pub event_version: String,
    /// The serialized event.
    pub payload: serde_json::Value,
    /// Free metadata.
    pub metadata: Metadata,
    /// Correlation id.
    pub correlation_id: Option<Uuid>,
    /// Causation id.
    pub causation_id: Option<Uuid>,
}

impl NewEvent {
    /// Serializes a domain event with a fresh id and no metadata.
    ///
    /// # Errors
    ///
    /// [`StoreError::Serialize`] when the event does not serialize.
    ///
    /// ```
    /// # use outflow::doc_fixture::CounterEvent;
    /// use outflow::NewEvent;
    /// let event = NewEvent::from_event::<outflow::doc_fixture::Counter>("c-1", &CounterEvent::Incremented { by: 2 })?;
    /// assert_eq!(event.event_type, "Incremented");
    /// # Ok::<(), outflow::StoreError>(())
    /// ```
    pub fn from_event<A: Aggregate>(
        aggregate_id: &str,
        event: &A::Event,
    ) -> Result<Self, StoreError> {
        use cqrs_es::DomainEvent;
        let payload = serde_json::to_value(event).map_err(|source| StoreError::Serialize {
            what: "event payload",
            aggregate_type: A::TYPE.to_owned(),
            aggregate_id: aggregate_id.to_owned(),
            source,
        })?;
        Ok(NewEvent {
            event_id: Uuid::now_v7(),
            event_type: event.event_type(),
            event_version: event.event_version(),
            payload,
            metadata: Metadata::new(),
            correlation_id: None,
            causation_id: None,
        })
    }

    /// An event of type `event_type` (version `"1"`) with `payload`, a fresh
    /// id and no metadata.
    ///
    /// ```
    /// let event = outflow::NewEvent::new("Opened", serde_json::json!({"owner": "ann"}));
    /// assert_eq!((event.event_type.as_str(), event.event_version.as_str()), ("Opened", "1"));
    /// ```
    pub fn new(event_type: impl Into<String>, payload: serde_json::Value) -> Self {
        NewEvent {
            event_id: Uuid::now_v7(),
            event_type: event_type.into(),
            event_version: "1".to_owned(),
            payload,
            metadata: Metadata::new(),
            correlation_id: None,
            causation_id: None,
        }
    }
}

/// The events of one command for one stream, with the version the writer
/// expects the stream to be at.
#[derive(Debug, Clone, PartialEq)]
pub struct AppendRequest {
    /// Aggregate type.
    pub aggregate_type: String,
    /// Aggregate id.
    pub aggregate_id: String,
    /// The stream's version when the writer loaded it (0 for a new stream);
    /// the events get sequences `expected_version + 1 ..`.
    pub expected_version: u64,
    /// The events, in order.
    pub events: Vec<NewEvent>,
}

/// A stream's new events as recorded, sequences following
/// `expected_version`; `place(index)` gives each its position, transaction
/// id and time (the backend's answer). Every backend's last step of an
/// append.
pub(crate) fn recorded_events<E>(
    aggregate_type: &str,
    aggregate_id: &str,
    expected_version: u64,
    events: Vec<NewEvent>,
    mut place: impl FnMut(usize) -> Result<(u64, u64, DateTime<Utc>), E>,
) -> Result<Vec<RecordedEvent>, E> {
    events
        .into_iter()
        .enumerate()
        .map(|(i, event)| {
            let (position, transaction_id, recorded_at) = place(i)?;
            Ok(RecordedEvent {
                event_id: event.event_id,
                aggregate_type: aggregate_type.to_owned(),
                aggregate_id: aggregate_id.to_owned(),
                sequence: expected_version + i as u64 + 1,
                position,
                transaction_id,
                recorded_at,
                event_type: event.event_type,
                event_version: event.event_version,
                payload: event.payload,
                metadata: event.metadata,
                correlation_id: event.correlation_id,
                causation_id: event.causation_id,
            })
        })
        .collect()
}

impl AppendRequest {
    /// `events` for stream `aggregate_type`/`aggregate_id`, expected at
    /// `expected_version`.
    ///
    /// ```
    /// let request = outflow::AppendRequest::new("account", "a-1", 0, vec![]);
    /// assert_eq!(request.expected_version, 0);
    /// ```
    pub fn new(
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
        expected_version: u64,
        events: Vec<NewEvent>,
    ) -> Self {
        AppendRequest {
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.into(),
            expected_version,
            events,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), StoreError> {
        let invalid = |reason: &str| StoreError::InvalidAppend {
            aggregate_type: self.aggregate_type.clone(),
            aggregate_id: self.aggregate_id.clone(),
            reason: reason.to_owned(),
        };
        if self.aggregate_type.is_empty() {
            return Err(invalid("empty aggregate type"));
        }
        if self.aggregate_id.is_empty() {
            return Err(invalid("empty aggregate id"));
        }
        let count = u64::try_from(self.events.len()).unwrap_or(u64::MAX);
        if self
            .expected_version
            .checked_add(count)
            .is_none_or(|v| v > i64::MAX as u64)
        {
            return Err(invalid("sequence would exceed the largest storable value"));
        }
        Ok(())
    }
}

/// A stored aggregate state at a version.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Aggregate type.
    pub aggregate_type: String,
    /// Aggregate id.
    pub aggregate_id: String,
    /// The sequence of the last event folded into `state`.
    pub version: u64,
    /// The serialized aggregate.
    pub state: serde_json::Value,
}

/// A window of the global log from rows: the events before the first row
/// that does not decode, or that row's error when it comes first (see
/// [`EventLog::read_log`](crate::log::EventLog::read_log)). Other errors fail
/// the window.
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub(crate) fn decode_window<R>(
    rows: impl IntoIterator<Item = R>,
    mut decode: impl FnMut(R) -> Result<RecordedEvent, StoreError>,
) -> Result<Vec<RecordedEvent>, StoreError> {
    let mut events = Vec::new();
    for row in rows {
        match decode(row) {
            Ok(event) => events.push(event),
            Err(error @ StoreError::Undecodable { .. }) => {
                if events.is_empty() {
                    return Err(error);
                }
                break;
            }
            Err(error) => return Err(error),
        }
    }
    Ok(events)
}
