//! Loads: an aggregate's messages by subject (never a scan of the
//! stream), from after its snapshot, through the kept messages; snapshots
//! in the key-value bucket.

use std::sync::Arc;

use async_nats::jetstream::kv;

use crate::error::StoreError;
use crate::event::{RecordedEvent, Snapshot};
use crate::port::events::{LoadedStream, StreamEvent};

use super::cache::*;
use super::codec::*;
use super::errors::*;
use super::state::*;

impl JetStreamStore {
    /// The aggregate's version and the sequence of its last message, as
    /// the stream's leader has them ((0, 0) for a new aggregate).
    pub(super) async fn last_of(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<(u64, u64), StoreError> {
        let partition = self.partition_of(aggregate_id);
        let subject = self.subject(aggregate_type, aggregate_id);
        match self
            .stream(partition)
            .get_last_raw_message_by_subject(&subject)
            .await
        {
            Ok(message) => {
                let version =
                    version_header(&message.headers).ok_or_else(|| StoreError::Corrupt {
                        table: self.stream_label(partition),
                        what: format!(
                            "message {} has no {VERSION_HEADER} header",
                            message.sequence
                        ),
                    })?;
                self.remember(aggregate_type, aggregate_id, version, message.sequence);
                Ok((version, message.sequence))
            }
            Err(error)
                if matches!(
                    error.kind(),
                    async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound
                ) =>
            {
                Ok((0, 0))
            }
            Err(error) => Err(nats_error("read an aggregate's last message", error)),
        }
    }

    /// Every message of one aggregate after `after_seq`, in order, through
    /// subject-filtered gets answered by the stream's leader.
    pub(super) async fn messages_of(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        after_seq: u64,
        wanted: impl Fn(&StoredMessage) -> bool,
    ) -> Result<Vec<KeptMessage>, StoreError> {
        let partition = self.partition_of(aggregate_id);
        let subject = self.subject(aggregate_type, aggregate_id);
        let stream = self.stream(partition);
        // Gets answered by any replica (cheap, spread over the cluster); a
        // replica behind what this store last wrote or saw of the aggregate
        // is read past through the leader, so a node always reads its own
        // writes. (A replica behind another node's write makes the append
        // meet a conflict, as any stale read would.)
        let must_reach = self
            .known(aggregate_type, aggregate_id)
            .map_or(0, |(_, seq)| seq);
        let key = (aggregate_type.to_owned(), aggregate_id.to_owned());
        let kept = self
            .inner
            .messages
            .lock()
            .ok()
            .and_then(|cache| cache.read(&key, after_seq));
        let (mut messages, from_seq) = match kept {
            Some((messages, reached)) => (messages, reached),
            None => (Vec::new(), after_seq),
        };
        let mut direct = true;
        let mut next = from_seq + 1;
        let mut fresh = Vec::new();
        loop {
            let got = if direct {
                match stream
                    .direct_get_builder()
                    .sequence(next)
                    .next_by_subject(subject.clone())
                    .send()
                    .await
                {
                    Ok(message) => Ok(message),
                    Err(error)
                        if matches!(
                            error.kind(),
                            async_nats::jetstream::stream::DirectGetErrorKind::NotFound
                        ) =>
                    {
                        if next > must_reach {
                            break;
                        }
                        direct = false;
                        continue;
                    }
                    Err(error) => return Err(nats_error("read an aggregate's messages", error)),
                }
            } else {
                stream
                    .raw_message_builder()
                    .sequence(next)
                    .next_by_subject(subject.clone())
                    .send()
                    .await
                    .map_err(|error| {
                        if matches!(
                            error.kind(),
                            async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound
                        ) {
                            None
                        } else {
                            Some(nats_error("read an aggregate's messages", error))
                        }
                    })
            };
            let message = match got {
                Ok(message) => message,
                Err(None) => break,
                Err(Some(error)) => return Err(error),
            };
            next = message.sequence + 1;
            let stored: StoredMessage =
                serde_json::from_slice(&message.payload).map_err(|e| StoreError::Corrupt {
                    table: self.stream_label(partition),
                    what: format!("message {} does not decode: {e}", message.sequence),
                })?;
            if stored.aggregate_id != aggregate_id || stored.aggregate_type != aggregate_type {
                continue;
            }
            let version = stored.first + stored.events.len() as u64 - 1;
            self.remember(aggregate_type, aggregate_id, version, message.sequence);
            fresh.push((message.sequence, Arc::new(stored)));
        }
        let reached = fresh.last().map_or(from_seq, |(seq, _)| *seq);
        if let Ok(mut cache) = self.inner.messages.lock() {
            cache.extend(&key, from_seq, reached, &fresh);
        }
        messages.extend(fresh);
        messages.retain(|(_, m)| wanted(m));
        Ok(messages)
    }

    pub(super) async fn read_stream_once(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        after_sequence: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let partition = self.partition_of(aggregate_id);
        let messages = self
            .messages_of(aggregate_type, aggregate_id, 0, |m| {
                m.first + m.events.len() as u64 - 1 > after_sequence
            })
            .await?;
        let mut events = Vec::new();
        for (seq, message) in messages {
            for event in recorded_ref(&message, seq, partition)? {
                if event.sequence > after_sequence && events.len() < limit {
                    events.push(event);
                }
            }
        }
        Ok(events)
    }

    pub(super) async fn load_once(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        use_snapshot: bool,
    ) -> Result<LoadedStream, StoreError> {
        let (snapshot, after_seq) = if use_snapshot {
            match self.snapshot(aggregate_type, aggregate_id).await? {
                Some((snapshot, seq)) => (Some(snapshot), seq),
                None => (None, 0),
            }
        } else {
            (None, 0)
        };
        let from_version = snapshot.as_ref().map_or(0, |s| s.version);
        let partition = self.partition_of(aggregate_id);
        let messages = self
            .messages_of(aggregate_type, aggregate_id, after_seq, |m| {
                m.first + m.events.len() as u64 - 1 > from_version
            })
            .await?;
        let mut events = Vec::new();
        for (seq, message) in messages {
            for (index, event) in message.events.iter().enumerate() {
                let sequence = message.first + index as u64;
                if sequence <= from_version {
                    continue;
                }
                events.push(StreamEvent {
                    sequence,
                    position: position(seq, partition, index),
                    event_type: event.event_type.clone(),
                    event_version: event.event_version.clone(),
                    payload: event.payload.get().to_owned(),
                });
            }
        }
        Ok(LoadedStream { snapshot, events })
    }

    pub(super) async fn save_snapshot_once(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        let key = snapshot_key(&snapshot.aggregate_type, &snapshot.aggregate_id);
        // The message holding the snapshot's last event, when known here,
        // so a load reads only the messages after it.
        let seq = match self.known(&snapshot.aggregate_type, &snapshot.aggregate_id) {
            Some((version, seq)) if version == snapshot.version => seq,
            _ => 0,
        };
        let value = serde_json::to_vec(&StoredSnapshot {
            version: snapshot.version,
            seq,
            state: snapshot.state,
        })
        .map_err(|source| StoreError::Serialize {
            what: "snapshot",
            aggregate_type: snapshot.aggregate_type.clone(),
            aggregate_id: snapshot.aggregate_id.clone(),
            source,
        })?;
        let value = bytes::Bytes::from(value);
        for _ in 0..16 {
            let current = self
                .inner
                .kv
                .entry(key.clone())
                .await
                .map_err(|e| nats_error("read a snapshot", e))?;
            let written = match current {
                Some(entry) if entry.operation == kv::Operation::Put => {
                    let stored: Option<StoredSnapshot> = serde_json::from_slice(&entry.value).ok();
                    if stored.is_some_and(|s| s.version >= snapshot.version) {
                        return Ok(());
                    }
                    self.inner
                        .kv
                        .update(&key, value.clone(), entry.revision)
                        .await
                        .map(|_| ())
                        .map_err(|e| {
                            (
                                e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                                nats_error("store a snapshot", e),
                            )
                        })
                }
                Some(entry) => self
                    .inner
                    .kv
                    .update(&key, value.clone(), entry.revision)
                    .await
                    .map(|_| ())
                    .map_err(|e| {
                        (
                            e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                            nats_error("store a snapshot", e),
                        )
                    }),
                None => self
                    .inner
                    .kv
                    .create(&key, value.clone())
                    .await
                    .map(|_| ())
                    .map_err(|e| {
                        (
                            e.kind() == kv::CreateErrorKind::AlreadyExists,
                            nats_error("store a snapshot", e),
                        )
                    }),
            };
            match written {
                Ok(()) => return Ok(()),
                // Another writer stored one meanwhile: compare again.
                Err((true, _)) => continue,
                Err((false, error)) => return Err(error),
            }
        }
        Ok(())
    }
}

impl JetStreamStore {
    /// The stored snapshot of an aggregate and the sequence of the message
    /// holding its last event (0 when unknown).
    pub(super) async fn snapshot(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<Option<(Snapshot, u64)>, StoreError> {
        let key = snapshot_key(aggregate_type, aggregate_id);
        let Some(value) = self
            .inner
            .kv
            .get(key)
            .await
            .map_err(|e| nats_error("read a snapshot", e))?
        else {
            return Ok(None);
        };
        let stored: StoredSnapshot =
            serde_json::from_slice(&value).map_err(|e| StoreError::Corrupt {
                table: format!("{} snapshots", self.inner.prefix),
                what: format!(
                    "the snapshot of {aggregate_type} `{aggregate_id}` does not decode: {e}"
                ),
            })?;
        Ok(Some((
            Snapshot {
                aggregate_type: aggregate_type.to_owned(),
                aggregate_id: aggregate_id.to_owned(),
                version: stored.version,
                state: stored.state,
            },
            stored.seq,
        )))
    }
}
