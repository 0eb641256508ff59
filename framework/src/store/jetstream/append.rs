//! Appends: one message per append, published with the version slot's
//! message id and retried until acknowledged or the timeout; conflicts
//! and duplicates told apart. The `EventStore` implementation.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::HeaderMap;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::error::{ErrorKind, StoreError};
use crate::event::{recorded_events, AppendRequest, RecordedEvent, Snapshot};
use crate::port::events::{EventStore, LoadedStream};

use super::codec::*;
use super::errors::*;
use super::state::*;

impl JetStreamStore {
    /// Publishes one message, retrying with the same message id while the
    /// acknowledgement does not come, until the timeout.
    pub(super) async fn publish(
        &self,
        subject: String,
        headers: HeaderMap,
        body: Vec<u8>,
        request: &AppendRequest,
        writer: u64,
    ) -> Result<u64, StoreError> {
        let deadline = tokio::time::Instant::now() + self.inner.timeout;
        let body = bytes::Bytes::from(body);
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let sent = async {
                self.inner
                    .js
                    .publish_with_headers(subject.clone(), headers.clone(), body.clone())
                    .await?
                    .await
            };
            // An acknowledgement lost with a connection never comes: wait
            // for one a part of the timeout, then send again.
            let attempt_deadline =
                deadline.min(tokio::time::Instant::now() + self.attempt_timeout());
            let outcome = tokio::time::timeout_at(attempt_deadline, sent).await;
            let error = match outcome {
                Ok(Ok(ack)) if !ack.duplicate => return Ok(ack.sequence),
                // The version slot is taken by a message still being
                // committed: ask again once it is.
                Ok(Ok(ack)) if ack.sequence == 0 => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                // The version slot is taken: by this very append (an
                // earlier attempt whose acknowledgement was lost) or by
                // another writer's (a conflict).
                Ok(Ok(ack)) => {
                    tracing::debug!(
                        attempt,
                        seq = ack.sequence,
                        "the append's version slot is taken"
                    );
                    if self.holds(ack.sequence, request, writer).await? {
                        return Ok(ack.sequence);
                    }
                    return Err(self.conflict(request).await?);
                }
                Ok(Err(error)) => error,
                Err(_) if tokio::time::Instant::now() >= deadline => {
                    return Err(StoreError::Unavailable {
                        operation: "append to JetStream",
                        source: format!(
                            "no acknowledgement within {:?} ({attempt} attempt(s))",
                            self.inner.timeout
                        )
                        .into(),
                    })
                }
                Err(_) => {
                    tracing::debug!(attempt, "no acknowledgement yet; sending the message again");
                    continue;
                }
            };
            match error.kind() {
                PublishErrorKind::WrongLastSequence => {
                    return Err(self.conflict(request).await?);
                }
                PublishErrorKind::MaxPayloadExceeded => {
                    return Err(StoreError::InvalidAppend {
                        aggregate_type: request.aggregate_type.clone(),
                        aggregate_id: request.aggregate_id.clone(),
                        reason: format!(
                            "{} bytes in one message: more than the server's maximum payload",
                            body.len()
                        ),
                    })
                }
                // No stream answered: during an election the stream's
                // subjects have no responder for a moment. Past the
                // deadline, a stream that exists has no leader.
                PublishErrorKind::StreamNotFound
                    if tokio::time::Instant::now() + Duration::from_millis(50) < deadline =>
                {
                    tracing::debug!(attempt, "no stream answered; sending the message again");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                PublishErrorKind::StreamNotFound => {
                    let partition = self.partition_of(&request.aggregate_id);
                    return Err(match self.stream(partition).get_info().await {
                        Ok(_) => StoreError::Unavailable {
                            operation: "append to JetStream",
                            source: Box::new(error),
                        },
                        Err(info_error) => match nats_error("find the stream", info_error) {
                            unavailable @ StoreError::Unavailable { .. } => unavailable,
                            _ => StoreError::database(
                                "append to JetStream: the stream is missing",
                                ErrorKind::Infrastructure,
                                error,
                            ),
                        },
                    });
                }
                _ => {
                    // No answer, a lost connection or a leader change: the
                    // message may be stored. Send it again: its id makes the
                    // stream answer with the stored copy.
                    tracing::debug!(attempt, error = %error, "publish not acknowledged; sending it again");
                    let pause = Duration::from_millis((25 * u64::from(attempt)).min(250));
                    if tokio::time::Instant::now() + pause >= deadline {
                        return Err(StoreError::Unavailable {
                            operation: "append to JetStream",
                            source: Box::new(error),
                        });
                    }
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }

    /// The conflict an append met, with the aggregate's version now.
    pub(super) async fn conflict(&self, request: &AppendRequest) -> Result<StoreError, StoreError> {
        self.forget(&request.aggregate_type, &request.aggregate_id);
        let (actual, _) = self
            .last_of(&request.aggregate_type, &request.aggregate_id)
            .await?;
        Ok(StoreError::Conflict {
            aggregate_type: request.aggregate_type.clone(),
            aggregate_id: request.aggregate_id.clone(),
            expected: request.expected_version,
            actual: Some(actual),
        })
    }

    /// Whether the message at `seq` is this append call's own (its first
    /// event and its writer number).
    pub(super) async fn holds(
        &self,
        seq: u64,
        request: &AppendRequest,
        writer: u64,
    ) -> Result<bool, StoreError> {
        let partition = self.partition_of(&request.aggregate_id);
        let message = self
            .stream(partition)
            .raw_message_builder()
            .sequence(seq)
            .send()
            .await
            .map_err(|e| nats_error("read a stored message", e))?;
        let stored: Option<StoredMessage> = serde_json::from_slice(&message.payload).ok();
        Ok(stored.is_some_and(|m| {
            m.aggregate_type == request.aggregate_type
                && m.aggregate_id == request.aggregate_id
                && m.writer == writer
                && m.events.first().map(|e| e.id) == request.events.first().map(|e| e.event_id)
        }))
    }
}

#[async_trait]
impl EventStore for JetStreamStore {
    fn key_ring(&self) -> Option<crate::personal::KeyRing> {
        JetStreamStore::key_ring(self)
    }

    async fn append(&self, request: AppendRequest) -> Result<Vec<RecordedEvent>, StoreError> {
        // A retry after an unanswered attempt is safe: the version slot's
        // message id makes a stored copy answer for it.
        let writer = rand::random::<u64>();
        self.patiently(|| self.append_once(request.clone(), writer, None))
            .await
    }

    async fn read_stream(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        after_sequence: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.patiently(|| {
            self.read_stream_once(aggregate_type, aggregate_id, after_sequence, limit)
        })
        .await
    }

    async fn load(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        use_snapshot: bool,
    ) -> Result<LoadedStream, StoreError> {
        self.patiently(|| self.load_once(aggregate_type, aggregate_id, use_snapshot))
            .await
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        self.patiently(|| self.save_snapshot_once(snapshot.clone()))
            .await
    }

    async fn command_outcome(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        command_id: Uuid,
    ) -> Result<Option<crate::outcome::CommandOutcome>, StoreError> {
        self.patiently(|| self.outcome_once(aggregate_type, aggregate_id, command_id))
            .await
    }

    async fn record_outcome(
        &self,
        outcome: crate::outcome::CommandOutcome,
    ) -> Result<crate::outcome::CommandOutcome, StoreError> {
        self.patiently(|| self.record_outcome_once(&outcome)).await
    }

    /// Checks that no outcome is stored, appends, then claims the command
    /// (see the module `outcomes`: not atomic on JetStream).
    async fn append_command(
        &self,
        request: AppendRequest,
        command_id: Uuid,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.append_claiming(request, command_id).await
    }

    /// Reads every outcome key of the bucket: a job for a quiet hour.
    async fn prune_outcomes(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        self.patiently(|| self.prune_outcomes_once(before)).await
    }
}

impl JetStreamStore {
    /// Appends at a given time: what a copy of another log writes.
    pub(crate) async fn append_recorded_at(
        &self,
        request: AppendRequest,
        recorded_at: DateTime<Utc>,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let writer = rand::random::<u64>();
        self.patiently(|| self.append_once(request.clone(), writer, Some(recorded_at)))
            .await
    }

    pub(super) async fn append_once(
        &self,
        request: AppendRequest,
        writer: u64,
        at: Option<DateTime<Utc>>,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        request.validate()?;
        if request.events.is_empty() {
            return Ok(Vec::new());
        }
        if request.events.len() > MAX_EVENTS_PER_APPEND {
            return Err(StoreError::InvalidAppend {
                aggregate_type: request.aggregate_type.clone(),
                aggregate_id: request.aggregate_id.clone(),
                reason: format!(
                    "{} events in one append; at most {MAX_EVENTS_PER_APPEND} on JetStream",
                    request.events.len()
                ),
            });
        }
        let (aggregate_type, aggregate_id) = (&request.aggregate_type, &request.aggregate_id);
        // The sequence of the aggregate's last message: remembered from the
        // last load or append here when its version matches, else asked.
        let last_seq = match self.known(aggregate_type, aggregate_id) {
            Some((version, seq)) if version == request.expected_version => seq,
            _ => {
                let (version, seq) = self.last_of(aggregate_type, aggregate_id).await?;
                if version != request.expected_version {
                    return Err(StoreError::Conflict {
                        aggregate_type: aggregate_type.clone(),
                        aggregate_id: aggregate_id.clone(),
                        expected: request.expected_version,
                        actual: Some(version),
                    });
                }
                seq
            }
        };
        let recorded_at = at.unwrap_or_else(Utc::now);
        let mut events = Vec::with_capacity(request.events.len());
        for event in &request.events {
            let payload = serde_json::value::to_raw_value(&event.payload).map_err(|source| {
                StoreError::Serialize {
                    what: "event payload",
                    aggregate_type: aggregate_type.clone(),
                    aggregate_id: aggregate_id.clone(),
                    source,
                }
            })?;
            events.push(StoredEvent {
                id: event.event_id,
                event_type: event.event_type.clone(),
                event_version: event.event_version.clone(),
                payload,
                metadata: event.metadata.clone(),
                correlation: event.correlation_id,
                causation: event.causation_id,
            });
        }
        let message = StoredMessage {
            aggregate_type: aggregate_type.clone(),
            aggregate_id: aggregate_id.clone(),
            first: request.expected_version + 1,
            at: recorded_at,
            writer,
            events,
        };
        let body = serde_json::to_vec(&message).map_err(|source| StoreError::Serialize {
            what: "message",
            aggregate_type: aggregate_type.clone(),
            aggregate_id: aggregate_id.clone(),
            source,
        })?;
        let version = request.expected_version + request.events.len() as u64;
        let mut headers = HeaderMap::new();
        headers.insert(
            "Nats-Msg-Id",
            slot_id(aggregate_type, aggregate_id, request.expected_version)
                .to_string()
                .as_str(),
        );
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence",
            last_seq.to_string().as_str(),
        );
        headers.insert(VERSION_HEADER, version.to_string().as_str());
        let subject = self.subject(aggregate_type, aggregate_id);
        let seq = self
            .publish(subject, headers, body, &request, writer)
            .await?;
        self.remember(aggregate_type, aggregate_id, version, seq);
        if let Ok(mut cache) = self.inner.messages.lock() {
            let key = (aggregate_type.clone(), aggregate_id.clone());
            cache.extend(&key, last_seq, seq, &[(seq, Arc::new(message))]);
        }
        let partition = self.partition_of(aggregate_id);
        self.inner
            .announced
            .appended(partition, &stream_token(aggregate_type), seq);
        self.inner.wake.wake();
        self.signal_other_nodes();
        recorded_events(
            aggregate_type,
            aggregate_id,
            request.expected_version,
            request.events,
            |i| Ok((position(seq, partition, i), seq, recorded_at)),
        )
    }
}

#[async_trait]
impl crate::port::events::CopyTarget for JetStreamStore {
    /// Group by group: JetStream has no transaction across messages.
    async fn append_batch(
        &self,
        groups: &[(AppendRequest, DateTime<Utc>)],
    ) -> Result<(), StoreError> {
        for (request, at) in groups {
            self.append_recorded_at(request.clone(), *at).await?;
        }
        Ok(())
    }
}
