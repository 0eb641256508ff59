//! How events are stored: subjects, positions, the message format, and
//! decoding a message back into recorded events. Pure functions: what
//! a message means does not depend on the server.

use async_nats::jetstream::Message;
use async_nats::HeaderMap;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{EventRef, StoreError};
use crate::event::{Metadata, RecordedEvent};

/// The most partitions a store may have (8 bits of a position).
pub const MAX_PARTITIONS: u32 = 256;
/// The most events one append may carry (16 bits of a position).
pub const MAX_EVENTS_PER_APPEND: usize = 1 << 16;

/// The header holding the stream version after the message's last event.
pub(super) const VERSION_HEADER: &str = "Outflow-Version";

pub use crate::nats::subjects::stream_token;

/// The position of the `index`th event of the message at `sequence` in
/// `partition` (see the module documentation).
pub(super) fn position(sequence: u64, partition: u32, index: usize) -> u64 {
    (sequence << 24) | (u64::from(partition) << 16) | index as u64
}

/// The partition a position belongs to.
pub(super) fn partition_of_position(position: u64) -> u32 {
    ((position >> 16) & 0xff) as u32
}

/// One event as stored in a message.
#[derive(Clone, Serialize, Deserialize)]
pub(super) struct StoredEvent {
    pub(super) id: Uuid,
    #[serde(rename = "type")]
    pub(super) event_type: String,
    #[serde(rename = "ver")]
    pub(super) event_version: String,
    pub(super) payload: Box<serde_json::value::RawValue>,
    #[serde(default, skip_serializing_if = "Metadata::is_empty")]
    pub(super) metadata: Metadata,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) correlation: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) causation: Option<Uuid>,
}

/// A message: one append.
#[derive(Clone, Serialize, Deserialize)]
pub(super) struct StoredMessage {
    #[serde(rename = "type")]
    pub(super) aggregate_type: String,
    #[serde(rename = "id")]
    pub(super) aggregate_id: String,
    /// Sequence of the first event.
    pub(super) first: u64,
    pub(super) at: DateTime<Utc>,
    /// A random number per append call, the same in every attempt: tells
    /// this call's own stored message from another writer's identical one
    /// (the same command sent twice).
    #[serde(default)]
    pub(super) writer: u64,
    pub(super) events: Vec<StoredEvent>,
}

/// A snapshot as stored in the bucket.
#[derive(Serialize, Deserialize)]
pub(super) struct StoredSnapshot {
    pub(super) version: u64,
    /// Stream sequence of the message holding event `version` (0: unknown).
    pub(super) seq: u64,
    pub(super) state: serde_json::Value,
}

pub(super) fn version_header(headers: &HeaderMap) -> Option<u64> {
    headers.get(VERSION_HEADER)?.as_str().parse().ok()
}

/// A message's events as log readers see them.
pub(super) fn decode_message(
    message: &Message,
    partition: u32,
) -> Result<Vec<RecordedEvent>, StoreError> {
    let info = message.info().map_err(|e| StoreError::Corrupt {
        table: "JetStream".to_owned(),
        what: format!("a delivered message has no sequence: {e}"),
    })?;
    let seq = info.stream_sequence;
    decode_stored(&message.payload, seq, partition, &message.subject)
}

pub(super) fn decode_stored(
    payload: &[u8],
    seq: u64,
    partition: u32,
    subject: &str,
) -> Result<Vec<RecordedEvent>, StoreError> {
    let stored: StoredMessage = match serde_json::from_slice(payload) {
        Ok(stored) => stored,
        Err(source) => {
            let mut tokens = subject.splitn(4, '.').skip(2);
            let event = EventRef {
                aggregate_type: tokens.next().unwrap_or("").to_owned(),
                aggregate_id: tokens.next().unwrap_or("").to_owned(),
                sequence: 0,
                position: Some(position(seq, partition, 0)),
                event_type: String::new(),
                event_version: String::new(),
            };
            return Err(StoreError::Undecodable {
                event: Box::new(event),
                event_id: Uuid::nil(),
                transaction_id: seq,
                what: "payload",
                source,
            });
        }
    };
    recorded(stored, seq, partition)
}

/// A kept message's events as recorded events.
pub(super) fn recorded_ref(
    stored: &StoredMessage,
    seq: u64,
    partition: u32,
) -> Result<Vec<RecordedEvent>, StoreError> {
    recorded(stored.clone(), seq, partition)
}

/// A stored message's events as recorded events.
pub(super) fn recorded(
    stored: StoredMessage,
    seq: u64,
    partition: u32,
) -> Result<Vec<RecordedEvent>, StoreError> {
    let mut events = Vec::with_capacity(stored.events.len());
    for (index, event) in stored.events.into_iter().enumerate() {
        let event_ref = || EventRef {
            aggregate_type: stored.aggregate_type.clone(),
            aggregate_id: stored.aggregate_id.clone(),
            sequence: stored.first + index as u64,
            position: Some(position(seq, partition, index)),
            event_type: event.event_type.clone(),
            event_version: event.event_version.clone(),
        };
        let payload: serde_json::Value =
            serde_json::from_str(event.payload.get()).map_err(|source| {
                StoreError::Undecodable {
                    event: Box::new(event_ref()),
                    event_id: event.id,
                    transaction_id: seq,
                    what: "payload",
                    source,
                }
            })?;
        events.push(RecordedEvent {
            event_id: event.id,
            aggregate_type: stored.aggregate_type.clone(),
            aggregate_id: stored.aggregate_id.clone(),
            sequence: stored.first + index as u64,
            position: position(seq, partition, index),
            transaction_id: seq,
            recorded_at: stored.at,
            event_type: event.event_type,
            event_version: event.event_version,
            payload,
            metadata: event.metadata,
            correlation_id: event.correlation,
            causation_id: event.causation,
        });
    }
    Ok(events)
}

/// The message id of an append: one per aggregate and version slot (the
/// version the append expects), so two appends at the same slot are one
/// message to the stream's duplicate check.
pub(super) fn slot_id(aggregate_type: &str, aggregate_id: &str, expected_version: u64) -> Uuid {
    const NAMESPACE: Uuid = Uuid::from_u128(0x5d1b_6f0e_2c4a_4e57_9a35_0f7c_3b8e_1d42);
    let mut name = Vec::with_capacity(aggregate_type.len() + aggregate_id.len() + 24);
    name.extend_from_slice(aggregate_type.as_bytes());
    name.push(0);
    name.extend_from_slice(aggregate_id.as_bytes());
    name.push(0);
    name.extend_from_slice(expected_version.to_string().as_bytes());
    Uuid::new_v5(&NAMESPACE, &name)
}

pub(super) fn snapshot_key(aggregate_type: &str, aggregate_id: &str) -> String {
    format!(
        "{}.{}",
        stream_token(aggregate_type),
        stream_token(aggregate_id)
    )
}
