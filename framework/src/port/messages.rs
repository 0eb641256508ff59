//! The broker messages' port: a message as a consumer receives it, and where
//! a consumer parks one its handler keeps failing on. A backend that keeps
//! dead messages implements [`DeadMessageStore`] in its own
//! `dead_messages.rs` (PostgreSQL's: `PostgresDeadMessages`).

use std::collections::BTreeMap;

use async_nats::HeaderMap;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;

use crate::error::StoreError;
use crate::port::projections::ProjectionStore;

/// A message as a [`MessageHandler`](crate::relay::MessageHandler) receives it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ReceivedMessage {
    /// The subject it was published on.
    pub subject: String,
    /// The payload (for a relayed event: its JSON payload).
    pub payload: Vec<u8>,
    /// The headers (for a relayed event: see [`headers`](crate::relay::headers)).
    pub headers: HeaderMap,
    /// The inbox key: the `Nats-Msg-Id` header, or `<stream>:<stream
    /// sequence>` for a message published without one.
    pub message_id: String,
    /// The stream it is stored in.
    pub stream: String,
    /// Its sequence in the stream.
    pub stream_sequence: u64,
    /// How often JetStream has delivered it to this consumer, this delivery
    /// included (1 the first time).
    pub deliveries: u64,
}

impl ReceivedMessage {
    /// The last value of header `name`, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| AsRef::<str>::as_ref(*key) == name)
            .and_then(|(_, values)| values.last())
            .map(|value| value.as_str())
    }

    /// The payload decoded from JSON.
    ///
    /// # Errors
    ///
    /// The decoding error.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.payload)
    }
}

/// A parked message, as a dead message store lists it
/// ([`PostgresDeadMessages::list`](crate::relay::PostgresDeadMessages::list)).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct DeadMessage {
    /// Id of the dead letter.
    pub id: u64,
    /// The consumer that parked it.
    pub consumer: String,
    /// Its inbox key (see [`ReceivedMessage::message_id`]).
    pub message_id: String,
    /// The stream it came from.
    pub stream: String,
    /// Its sequence in that stream.
    pub stream_sequence: u64,
    /// Its subject.
    pub subject: String,
    /// Its headers, each name with its values.
    pub headers: BTreeMap<String, Vec<String>>,
    /// Its payload.
    pub payload: Vec<u8>,
    /// The delivery on which it was parked.
    pub deliveries: u64,
    /// The handler's error with its causes.
    pub error: String,
    /// When it was parked.
    pub parked_at: DateTime<Utc>,
}

/// Where a [`JetStreamConsumer`](crate::relay::JetStreamConsumer) parks a message its handler keeps failing
/// on. `PostgresDeadMessages` is the one for
/// PostgreSQL.
#[async_trait]
pub trait DeadMessageStore<S: ProjectionStore>: Send + Sync + 'static {
    /// Records `message` inside `tx`, which also holds the message's inbox
    /// claim. Recording the same consumer and message id twice keeps one.
    ///
    /// # Errors
    ///
    /// [`StoreError`]; the message is then redelivered and parked later.
    async fn park(
        &self,
        tx: &mut S::Transaction,
        consumer: &str,
        message: &ReceivedMessage,
        error: &str,
    ) -> Result<(), StoreError>;
}
