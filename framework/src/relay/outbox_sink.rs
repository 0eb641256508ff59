//! Delivers transactional-outbox messages to JetStream.

use std::time::Duration;

use async_nats::header::HeaderMap;
use async_nats::jetstream::Context;
use async_trait::async_trait;

use super::{validate_subject, RelayError};
use crate::outbox::{OutboxMessageRecord, OutboxSink};
use crate::projection::HandlerError;

/// Header carrying an outbox message's key.
pub const OUTBOX_KEY_HEADER: &str = "Outflow-Outbox-Key";

/// An [`OutboxSink`] that publishes each message to JetStream on its topic as
/// subject, with the message id as `Nats-Msg-Id` (so the stream's duplicate
/// window drops re-sends), its key in [`OUTBOX_KEY_HEADER`] and its headers
/// as NATS headers. At least once, in order per key: the relay only moves on
/// when every publish of a batch is acknowledged; failures are retried.
///
/// ```no_run
/// # async fn demo(store: outflow::PostgresStore, js: async_nats::jetstream::Context) -> Result<(), Box<dyn std::error::Error>> {
/// use outflow::outbox::{Outbox, OutboxRelay};
/// use outflow::relay::JetStreamOutboxSink;
/// let outbox = Outbox::new(&store).await?;
/// let relay = OutboxRelay::builder(outbox, JetStreamOutboxSink::new(js)).build()?;
/// # Ok(()) }
/// ```
pub struct JetStreamOutboxSink {
    context: Context,
    ack_timeout: Duration,
}

impl std::fmt::Debug for JetStreamOutboxSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamOutboxSink")
            .field("ack_timeout", &self.ack_timeout)
            .finish_non_exhaustive()
    }
}

impl JetStreamOutboxSink {
    /// Publishes through `context`, waiting up to 5 s for each acknowledgement.
    pub fn new(context: Context) -> Self {
        JetStreamOutboxSink {
            context,
            ack_timeout: Duration::from_secs(5),
        }
    }

    /// How long to wait for an acknowledgement before retrying the batch.
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = timeout;
        self
    }
}

fn bad_message(message: &OutboxMessageRecord, reason: String) -> HandlerError {
    HandlerError::from(RelayError::Config(format!(
        "outbox message {} (key `{}`) cannot be published: {reason}",
        message.message_id, message.key
    )))
}

#[async_trait]
impl OutboxSink for JetStreamOutboxSink {
    async fn deliver(&self, messages: &[OutboxMessageRecord]) -> Result<(), HandlerError> {
        let mut acks = Vec::with_capacity(messages.len());
        for message in messages {
            validate_subject(&message.topic).map_err(|reason| {
                bad_message(message, format!("topic `{}`: {reason}", message.topic))
            })?;
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", message.message_id.to_string().as_str());
            for (name, value) in [(OUTBOX_KEY_HEADER, message.key.as_str())]
                .into_iter()
                .chain(
                    message
                        .headers
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str())),
                )
            {
                if name.is_empty()
                    || name.contains(|c: char| c == ':' || c.is_whitespace() || c.is_control())
                    || value.contains(['\r', '\n'])
                {
                    return Err(bad_message(
                        message,
                        format!("header `{name}` cannot be carried by NATS"),
                    ));
                }
                headers.insert(name, value);
            }
            let payload = serde_json::to_vec(&message.payload)?;
            let send =
                self.context
                    .publish_with_headers(message.topic.clone(), headers, payload.into());
            match tokio::time::timeout(self.ack_timeout, send).await {
                Ok(Ok(ack)) => acks.push(ack),
                Ok(Err(error)) => return Err(HandlerError::transient(error)),
                Err(_) => {
                    return Err(HandlerError::transient(RelayError::Config(format!(
                        "publishing outbox message {} timed out",
                        message.message_id
                    ))))
                }
            }
        }
        for ack in acks {
            match tokio::time::timeout(self.ack_timeout, ack).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => return Err(HandlerError::transient(error)),
                Err(_) => {
                    return Err(HandlerError::transient(RelayError::Config(
                        "an outbox publish was not acknowledged in time".into(),
                    )))
                }
            }
        }
        Ok(())
    }
}
