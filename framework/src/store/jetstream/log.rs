//! Reading the log: a partition's stream through a kept consumer, in
//! position order; its head; the `EventLog` implementation.

use std::collections::VecDeque;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::StreamExt;

use crate::error::{ConfigError, StoreError};
use crate::event::{Checkpoint, RecordedEvent};
use crate::port::log::{EventLog, LogFilter};
use crate::wake::Wakeups;

use super::codec::*;
use super::errors::*;
use super::readers::*;
use super::state::*;

impl JetStreamStore {
    /// Which partition and subject filter a log filter reads.
    pub(super) fn route(&self, filter: &LogFilter) -> Result<(u32, String), StoreError> {
        let partition = match filter.partition() {
            Some(p) if p.count == self.inner.partitions => p.index,
            // One stream is one total order: a reader of a part of it reads
            // the stream and keeps its part (as the SQL backends do).
            _ if self.inner.partitions == 1 => 0,
            other => {
                return Err(ConfigError::Invalid {
                    setting: "partitions",
                    reason: format!(
                    "this JetStream store has {} partitions, each ordered on its own: read it one \
                         partition at a time (LogFilter::with_partition(p, {})), not {}",
                    self.inner.partitions,
                    self.inner.partitions,
                    other.map_or("whole".to_owned(), |p| format!("in {} partitions", p.count))
                ),
                }
                .into())
            }
        };
        let subject = match filter.aggregate_type_list() {
            [one] => format!("{}.{partition}.{}.>", self.inner.prefix, stream_token(one)),
            _ => format!("{}.{partition}.>", self.inner.prefix),
        };
        Ok((partition, subject))
    }

    /// A reader whose cursor is at `after`: a kept one, or a new one.
    pub(super) async fn reader(
        &self,
        partition: u32,
        subject: &str,
        after: Checkpoint,
    ) -> Result<Reader, StoreError> {
        let kept = self.inner.readers.lock().ok().and_then(|mut readers| {
            let found = readers.iter().position(|r| {
                r.partition == partition
                    && r.subject == subject
                    && (r.cursor == after || r.recent.iter().any(|e| e.checkpoint() == after))
            })?;
            Some(readers.swap_remove(found))
        });
        if let Some(mut reader) = kept {
            if reader.cursor != after {
                // Back to an event of the last read: what came after it
                // is read again.
                let again: Vec<RecordedEvent> = reader
                    .recent
                    .drain(..)
                    .filter(|e| e.checkpoint() > after)
                    .collect();
                for event in again.into_iter().rev() {
                    reader.leftover.push_front(event);
                }
                reader.cursor = after;
            }
            reader.recent.clear();
            return Ok(reader);
        }
        let deliver_policy = if after == Checkpoint::START {
            DeliverPolicy::All
        } else {
            // The message of `after` again: it may have events after it.
            DeliverPolicy::ByStartSequence {
                start_sequence: after.transaction_id,
            }
        };
        let consumer = self
            .stream(partition)
            .create_consumer(pull::Config {
                deliver_policy,
                ack_policy: AckPolicy::None,
                filter_subject: subject.to_owned(),
                inactive_threshold: Duration::from_secs(60),
                ..Default::default()
            })
            .await
            .map_err(|e| nats_error("open a log reader", e))?;
        Ok(Reader {
            partition,
            subject: subject.to_owned(),
            consumer,
            leftover: VecDeque::new(),
            recent: Vec::new(),
            cursor: after,
            // The message of `after` was delivered before.
            delivered: after.transaction_id,
        })
    }

    pub(super) fn keep_reader(&self, reader: Reader) {
        let Ok(mut readers) = self.inner.readers.lock() else {
            return;
        };
        if readers.len() >= MAX_IDLE_READERS {
            let old = readers.remove(0);
            drop_reader(&self.inner.js, old);
        }
        readers.push(reader);
    }

    /// Reads up to `limit` wanted events after `after`.
    pub(super) async fn read(
        &self,
        after: Checkpoint,
        filter: &LogFilter,
        limit: usize,
    ) -> Result<Read, StoreError> {
        if filter.query().is_some() {
            return Err(StoreError::Unsupported {
                what: "a log filter with a query of tags",
                reason: "a JetStream store keeps no tags; filter on aggregate and event types",
            });
        }
        self.patiently(|| self.read_once(after, filter, limit))
            .await
    }

    pub(super) async fn read_once(
        &self,
        after: Checkpoint,
        filter: &LogFilter,
        limit: usize,
    ) -> Result<Read, StoreError> {
        let (partition, subject) = self.route(filter)?;
        let type_token = match filter.aggregate_type_list() {
            [one] => Some(stream_token(one)),
            _ => None,
        };
        // Waited for an announced message once already in this read.
        let mut waited = false;
        let mut held_back = false;
        let limit = limit.max(1);
        let mut reader = self.reader(partition, &subject, after).await?;
        let mut events = Vec::new();
        let mut seen = after;
        let mut exhausted = false;
        // Events the filter skipped, kept for `Reader::recent`.
        let mut skipped = Vec::new();
        loop {
            while let Some(event) = reader.leftover.pop_front() {
                if event.checkpoint() <= after {
                    continue;
                }
                seen = event.checkpoint();
                if filter.matches(&event) {
                    events.push(event);
                    if events.len() >= limit {
                        break;
                    }
                } else {
                    skipped.push(event);
                }
            }
            if events.len() >= limit {
                break;
            }
            let mut want = (limit - events.len()).min(1000);
            let mut wait_for_announced = false;
            if exhausted {
                // A message announced here or by another node's signal lies
                // beyond what the consumer delivered, but its last answer
                // was "no more": the stream has not told the consumer yet.
                // Wait for it (briefly, once) instead of going to sleep.
                let announced = self
                    .inner
                    .announced
                    .latest(partition, type_token.as_deref());
                if announced <= reader.delivered || waited {
                    held_back = announced > reader.delivered;
                    break;
                }
                waited = true;
                wait_for_announced = true;
                want = 1;
            }
            let fetched = tokio::time::timeout(self.attempt_timeout(), async {
                let request = if wait_for_announced {
                    reader
                        .consumer
                        .batch()
                        .max_messages(1)
                        .expires(ANNOUNCED_WAIT)
                        .messages()
                        .await
                } else {
                    reader.consumer.fetch().max_messages(want).messages().await
                };
                let mut batch = request.map_err(|e| nats_error("read the log", e))?;
                let mut messages = Vec::new();
                while let Some(message) = batch.next().await {
                    messages.push(message.map_err(|e| nats_error("read the log", e))?);
                }
                Ok::<_, StoreError>(messages)
            })
            .await;
            let messages = match fetched {
                Ok(Ok(messages)) => messages,
                Ok(Err(error)) => {
                    drop_reader(&self.inner.js, reader);
                    return Err(error);
                }
                Err(_) => {
                    drop_reader(&self.inner.js, reader);
                    return Err(StoreError::Unavailable {
                        operation: "read the log",
                        source: format!("no answer within {:?}", self.attempt_timeout()).into(),
                    });
                }
            };
            exhausted = messages.len() < want;
            for message in messages {
                if let Ok(info) = message.info() {
                    reader.delivered = reader.delivered.max(info.stream_sequence);
                }
                match decode_message(&message, partition) {
                    Ok(decoded) => reader.leftover.extend(decoded),
                    // A message that does not decode, at or before `after`:
                    // the reader was told to go past it (it was parked).
                    Err(StoreError::Undecodable { transaction_id, .. })
                        if Checkpoint::new(
                            transaction_id,
                            position(transaction_id, partition, 0),
                        ) <= after =>
                    {
                        continue;
                    }
                    Err(error) => {
                        // A message that does not decode: hand out what
                        // came before it; a read that starts at it fails.
                        drop_reader(&self.inner.js, reader);
                        if events.is_empty() {
                            return Err(error);
                        }
                        return Ok(Read {
                            events,
                            seen,
                            complete: false,
                            held_back: false,
                        });
                    }
                }
            }
        }
        let complete = exhausted && reader.leftover.is_empty();
        reader.recent = tail_of(&events, skipped);
        reader.cursor = seen;
        self.keep_reader(reader);
        Ok(Read {
            events,
            seen,
            complete,
            held_back,
        })
    }

    /// The checkpoint of the last event of a partition (START when empty).
    pub(super) async fn partition_head(&self, partition: u32) -> Result<Checkpoint, StoreError> {
        self.patiently(|| self.partition_head_once(partition)).await
    }

    pub(super) async fn partition_head_once(
        &self,
        partition: u32,
    ) -> Result<Checkpoint, StoreError> {
        let stream = self.stream(partition);
        let info = stream
            .get_info()
            .await
            .map_err(|e| nats_error("read the stream's state", e))?;
        let last = info.state.last_sequence;
        if last == 0 || info.state.messages == 0 {
            return Ok(Checkpoint::START);
        }
        let message = stream
            .raw_message_builder()
            .sequence(last)
            .send()
            .await
            .map_err(|e| nats_error("read the stream's last message", e))?;
        let events = serde_json::from_slice::<StoredMessage>(&message.payload)
            .map(|m| m.events.len())
            .unwrap_or(1)
            .max(1);
        Ok(Checkpoint::new(last, position(last, partition, events - 1)))
    }
}

#[async_trait]
impl EventLog for JetStreamStore {
    fn key_ring(&self) -> Option<crate::personal::KeyRing> {
        JetStreamStore::key_ring(self)
    }

    async fn read_log(
        &self,
        after: Checkpoint,
        filter: &LogFilter,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        Ok(self.read(after, filter, limit).await?.events)
    }

    async fn read_window(
        &self,
        after: Checkpoint,
        filter: &LogFilter,
        limit: usize,
    ) -> Result<crate::port::log::LogWindow, StoreError> {
        let read = self.read(after, filter, limit).await?;
        Ok(crate::port::log::LogWindow::new(
            read.seen,
            read.events,
            read.complete,
            read.held_back,
        ))
    }

    async fn head(&self) -> Result<Checkpoint, StoreError> {
        if self.inner.partitions > 1 {
            return Err(self.route(&LogFilter::all()).err().unwrap_or_else(|| {
                StoreError::Config(ConfigError::Invalid {
                    setting: "partitions",
                    reason: "a partitioned store has no single head".to_owned(),
                })
            }));
        }
        self.partition_head(0).await
    }

    async fn head_of(&self, filter: &LogFilter) -> Result<Checkpoint, StoreError> {
        let (partition, _) = self.route(filter)?;
        self.partition_head(partition).await
    }

    fn partitions(&self) -> u32 {
        self.inner.partitions
    }

    fn checkpoint_partition(&self, checkpoint: Checkpoint) -> Option<u32> {
        (self.inner.partitions > 1 && checkpoint != Checkpoint::START)
            .then(|| partition_of_position(checkpoint.position))
    }

    fn wakeups(&self) -> Wakeups {
        self.listen();
        self.inner.wake.subscribe(self.inner.poll_interval)
    }

    async fn count_events(
        &self,
        filter: &LogFilter,
        after: Checkpoint,
        upto: Checkpoint,
        cap: u64,
    ) -> Result<u64, StoreError> {
        let (partition, _) = self.route(filter)?;
        let upto = if upto.transaction_id != 0 && partition_of_position(upto.position) != partition
        {
            // A bound from another partition (the runner's "every committed
            // event"): this partition's end.
            crate::port::log::END
        } else {
            upto
        };
        let mut counted = 0u64;
        let mut cursor = after;
        loop {
            let Read {
                events,
                seen,
                complete,
                ..
            } = self.read(cursor, filter, 1000).await?;
            for event in &events {
                if event.checkpoint() > upto || counted >= cap {
                    return Ok(counted);
                }
                counted += 1;
            }
            if complete || seen == cursor || seen > upto {
                return Ok(counted);
            }
            cursor = seen;
        }
    }

    async fn first_pending_recorded_at(
        &self,
        filter: &LogFilter,
        after: Checkpoint,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        let events = self.read(after, filter, 1).await?.events;
        Ok(events.first().map(|e| e.recorded_at))
    }
}
