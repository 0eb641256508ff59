//! Relaying the log to NATS JetStream, and consuming JetStream messages with
//! effects applied once (feature `nats`).
//!
//! Two halves:
//!
//! - [`JetStreamRelay`] is a [`Projection`](crate::projection::Projection)
//!   without a read model: run by a
//!   [`ProjectionRunner`](crate::runner::ProjectionRunner), it publishes every
//!   event of the log (or of a [`LogFilter`](crate::LogFilter)) as one
//!   JetStream message, and its checkpoint only moves once JetStream has
//!   acknowledged every message of a batch. **Delivery guarantee:** every event
//!   reaches the stream at least once, and exactly once as long as the
//!   stream's duplicate window is longer than the relay's longest retry (the
//!   event id travels as `Nats-Msg-Id`, and JetStream drops a re-publish
//!   inside the window). Batches land in log order (per relay partition);
//!   within a batch that an outage interrupted, messages may land out of
//!   order (the `Outflow-Sequence` and `Outflow-Position` headers tell).
//! - [`JetStreamConsumer`] runs a [`MessageHandler`] on a durable pull
//!   consumer, each message (or batch of messages) in one store transaction
//!   together with an inbox claim on the message id, and acknowledges only
//!   after the commit. **Delivery guarantee:** JetStream delivers at least
//!   once; the handler's effect in the store happens exactly once per message
//!   id, and a message whose handler keeps failing is parked once in a
//!   dead-letter table.
//!
//! # Message format
//!
//! The payload is the event's JSON payload. Headers (see [`headers`]):
//!
//! | header | value |
//! | --- | --- |
//! | `Nats-Msg-Id` | the event id (JetStream's de-duplication key) |
//! | `Outflow-Event-Type` | event type |
//! | `Outflow-Event-Version` | event version |
//! | `Outflow-Aggregate-Type` | aggregate type |
//! | `Outflow-Aggregate-Id` | aggregate id |
//! | `Outflow-Sequence` | sequence in the aggregate's stream (decimal) |
//! | `Outflow-Position` | global log position (decimal) |
//! | `Outflow-Transaction-Id` | id of the writing transaction (decimal) |
//! | `Outflow-Recorded-At` | when the event was written (RFC 3339, UTC, microseconds) |
//! | `Outflow-Correlation-Id` | correlation id, when the event has one |
//! | `Outflow-Causation-Id` | causation id, when the event has one |
//! | `Outflow-Metadata` | the event's metadata as a JSON object, when not empty |
//!
//! The subject is `<prefix>.<aggregate_type>.<event_type>` by default, each
//! name passed through [`subject_token`]; any mapping can be set with
//! [`JetStreamRelayBuilder::subject`].
//!
//! # Server compatibility
//!
//! Outflow depends on `async-nats` without its default features, so no field
//! of NATS server 2.10 or newer is sent: the relay, [`ensure_stream`] and the
//! consumer work with nats-server 2.9 and later.

use std::time::Duration;

use async_nats::jetstream::stream::{Config as StreamConfig, StorageType};
use async_nats::jetstream::Context;

use crate::nats::streams::ProvisionError;

mod consumer;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
mod outbox_sink;
mod publisher;

pub use crate::port::messages::DeadMessage;
/// The public path of PostgreSQL's dead message store (its code lives with
/// the PostgreSQL backend).
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use crate::store::postgres::PostgresDeadMessages;
pub use consumer::{
    DeadMessageStore, JetStreamConsumer, JetStreamConsumerBuilder, MessageHandler, ReceivedMessage,
};
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub use outbox_sink::{JetStreamOutboxSink, OUTBOX_KEY_HEADER};
pub use publisher::{JetStreamRelay, JetStreamRelayBuilder, SubjectFn};

/// Names of the headers the relay sets on every message.
pub mod headers {
    /// The event id; JetStream de-duplicates on it within the stream's
    /// duplicate window, and [`JetStreamConsumer`](super::JetStreamConsumer)
    /// uses it as the inbox key.
    pub const MSG_ID: &str = "Nats-Msg-Id";
    /// The event type.
    pub const EVENT_TYPE: &str = "Outflow-Event-Type";
    /// The event version.
    pub const EVENT_VERSION: &str = "Outflow-Event-Version";
    /// The aggregate type.
    pub const AGGREGATE_TYPE: &str = "Outflow-Aggregate-Type";
    /// The aggregate id.
    pub const AGGREGATE_ID: &str = "Outflow-Aggregate-Id";
    /// The event's sequence in its aggregate's stream, in decimal.
    pub const SEQUENCE: &str = "Outflow-Sequence";
    /// The event's global log position, in decimal.
    pub const POSITION: &str = "Outflow-Position";
    /// The id of the transaction that wrote the event, in decimal.
    pub const TRANSACTION_ID: &str = "Outflow-Transaction-Id";
    /// When the event was written: RFC 3339 in UTC with microseconds,
    /// e.g. `2024-05-01T12:00:00.123456Z`.
    pub const RECORDED_AT: &str = "Outflow-Recorded-At";
    /// The correlation id (only when the event has one).
    pub const CORRELATION_ID: &str = "Outflow-Correlation-Id";
    /// The causation id (only when the event has one).
    pub const CAUSATION_ID: &str = "Outflow-Causation-Id";
    /// The event's metadata as a JSON object of strings (only when not empty).
    pub const METADATA: &str = "Outflow-Metadata";
}

/// What can go wrong in the relay and the consumer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// A setting is invalid (an empty name, a bad subject prefix, ...).
    #[error("invalid relay configuration: {0}")]
    Config(String),
    /// The subject mapping produced a subject NATS cannot publish to.
    #[error("subject `{subject}` for {event} is not a valid NATS subject: {reason}")]
    InvalidSubject {
        /// The subject.
        subject: String,
        /// The event.
        event: Box<crate::EventRef>,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A value cannot be carried in a NATS header (it contains `\r` or `\n`).
    #[error("header `{header}` of {event} cannot carry its value (it contains a line break)")]
    InvalidHeader {
        /// The header.
        header: &'static str,
        /// The event.
        event: Box<crate::EventRef>,
    },
    /// Encoding an event's payload or metadata failed.
    #[error("encoding {what} of {event}")]
    Encode {
        /// What was encoded.
        what: &'static str,
        /// The event.
        event: Box<crate::EventRef>,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The message is larger than the server accepts.
    #[error("{event} does not fit into one NATS message ({bytes} bytes of payload)")]
    TooLarge {
        /// The event.
        event: Box<crate::EventRef>,
        /// The payload size.
        bytes: usize,
        /// The client's error.
        #[source]
        source: async_nats::jetstream::context::PublishError,
    },
    /// Publishing or its acknowledgement failed (server down, timeout, no
    /// stream for the subject): retried by the runner.
    #[error("publishing {failed} of {total} messages failed; first: {event} on `{subject}`")]
    Publish {
        /// Messages of the batch whose publish or acknowledgement failed.
        failed: usize,
        /// Messages in the batch.
        total: usize,
        /// The first failed event.
        event: Box<crate::EventRef>,
        /// Its subject.
        subject: String,
        /// The client's error.
        #[source]
        source: async_nats::jetstream::context::PublishError,
    },
    /// Publishing did not even get a permit to send within the acknowledgement
    /// timeout (the context's `max_ack_inflight` is smaller than the relay's
    /// `max_in_flight`, or other publishers hold every permit).
    #[error("publishing {event} on `{subject}` waited longer than {timeout:?} to be sent")]
    SendTimeout {
        /// The event.
        event: Box<crate::EventRef>,
        /// Its subject.
        subject: String,
        /// The timeout.
        timeout: Duration,
    },
    /// A JetStream API request (stream or consumer management) failed.
    #[error("{action}")]
    JetStream {
        /// What was being done.
        action: String,
        /// The client's error.
        #[source]
        source: async_nats::Error,
    },
}

impl RelayError {
    /// Whether the failure passes by itself: a publish that failed or timed
    /// out, or a JetStream request the server or cluster did not answer (no
    /// responders, no leader, a lost connection; read from the client's
    /// typed error kinds). Retry those; the others need a fix.
    pub fn is_transient(&self) -> bool {
        match self {
            RelayError::Publish { .. } | RelayError::SendTimeout { .. } => true,
            RelayError::JetStream { source, .. } => {
                crate::nats::errors::is_unavailable(source.as_ref())
            }
            _ => false,
        }
    }

    pub(crate) fn jetstream(
        action: impl Into<String>,
        source: impl Into<async_nats::Error>,
    ) -> Self {
        RelayError::JetStream {
            action: action.into(),
            source: source.into(),
        }
    }
}

pub use crate::nats::subjects::{subject_token, validate_subject};

/// Creates the stream `name` over `subjects` unless it exists, with file
/// storage and the given duplicate window (JetStream remembers message ids
/// that long, so a re-publish inside it is dropped). Only fields NATS server
/// 2.9 knows are sent. An existing stream is returned as it is, not changed.
///
/// Choose a window well above the relay's longest retry (its
/// [`RetryPolicy`](crate::projection::RetryPolicy)'s `max_backoff` plus the
/// acknowledgement timeout) and above any outage you want re-publishes to be
/// de-duplicated across; two minutes (the server's default) or more.
///
/// # Errors
///
/// [`RelayError::JetStream`] when the server refuses or cannot be reached.
pub async fn ensure_stream(
    context: &Context,
    name: &str,
    subjects: Vec<String>,
    duplicate_window: Duration,
) -> Result<async_nats::jetstream::stream::Info, RelayError> {
    let config = StreamConfig {
        name: name.to_owned(),
        subjects,
        duplicate_window,
        storage: StorageType::File,
        ..Default::default()
    };
    let stream = match crate::nats::streams::ensure_stream(context, config, false).await {
        Ok(stream) => stream,
        Err(ProvisionError::InvalidName) => {
            return Err(RelayError::Config(format!(
                "`{name}` is not a valid stream name"
            )))
        }
        Err(ProvisionError::SubjectsDiffer { existing }) => {
            return Err(RelayError::Config(format!(
                "stream `{name}` exists with subjects {existing:?}"
            )))
        }
        Err(ProvisionError::Nats { action, source }) => {
            return Err(RelayError::jetstream(
                format!("creating stream `{name}` ({action})"),
                source,
            ))
        }
    };
    Ok(stream.cached_info().clone())
}
