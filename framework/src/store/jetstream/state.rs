//! The store itself: its connection, streams and what it remembers, and
//! the accessors every other part uses.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::context::Context;
use async_nats::jetstream::kv;
use async_nats::jetstream::stream::Stream;

use crate::error::StoreError;
use crate::port::log::partition_hash;
use crate::wake::WakeSignal;

use super::cache::*;
use super::codec::*;
use super::errors::*;
use super::readers::*;

/// How many aggregates' last sequences a store remembers.
pub(super) const MAX_KNOWN_STREAMS: usize = 100_000;

/// An event store on NATS JetStream; see the [module documentation](crate::store::jetstream).
/// Cloning is cheap; clones share the connection and caches.
#[derive(Clone)]
pub struct JetStreamStore {
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    pub(super) client: async_nats::Client,
    pub(super) js: Context,
    pub(super) prefix: String,
    pub(super) partitions: u32,
    pub(super) streams: Vec<Stream>,
    pub(super) kv: kv::Store,
    pub(super) timeout: Duration,
    pub(super) poll_interval: Duration,
    /// Per aggregate (type, id): its version and the sequence of its last
    /// message, as last seen here.
    pub(super) known: Mutex<HashMap<(String, String), (u64, u64)>>,
    /// Aggregates' messages read or written here (immutable once stored),
    /// so a load asks only for what came after them.
    pub(super) messages: Mutex<MessageCache>,
    /// Server-side cursors kept between reads.
    pub(super) readers: Mutex<Vec<Reader>>,
    pub(super) wake: WakeSignal,
    /// Appends known to be stored, here and on other nodes (see
    /// [`announced`]).
    pub(super) announced: super::announced::Announced,
    pub(super) listening: std::sync::atomic::AtomicBool,
    /// When the last signal to other nodes went (µs since `started`).
    pub(super) last_signal: std::sync::atomic::AtomicU64,
    /// Whether a signal is scheduled for the end of the current window.
    pub(super) signal_pending: std::sync::atomic::AtomicBool,
    pub(super) started: std::time::Instant,
    /// The ring that seals and opens personal values, when given one.
    pub(super) key_ring: Mutex<Option<crate::personal::KeyRing>>,
}

impl std::fmt::Debug for JetStreamStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamStore")
            .field("prefix", &self.inner.prefix)
            .field("partitions", &self.inner.partitions)
            .finish()
    }
}

impl JetStreamStore {
    /// Gives this store (and its clones) `ring` for the personal values of
    /// its events (see [`crate::personal`]): a JetStream store keeps no
    /// keys of its own. Keep them in the read-model database, which has a
    /// keys table: `store.with_key_ring(read_models.key_ring())` with a
    /// `PostgresStore` or `SqliteStore`, whose erasures are then recorded in
    /// that database's log. Without a ring, a personal value written to
    /// this store fails, naming the missing key store.
    pub fn with_key_ring(self, ring: crate::personal::KeyRing) -> Self {
        *self
            .inner
            .key_ring
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(ring);
        self
    }

    /// The ring given with [`with_key_ring`](Self::with_key_ring), if any.
    pub fn key_ring(&self) -> Option<crate::personal::KeyRing> {
        self.inner
            .key_ring
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Whether this store offers [conditional
    /// appends](crate::store::ConditionalAppend) for
    /// [decisions](crate::decision): it does not, and this says why, for
    /// code that picks its backend at run time (a
    /// [`DecisionBus`](crate::decision::DecisionBus) over a JetStream store
    /// does not compile).
    ///
    /// # Errors
    ///
    /// Always [`StoreError::Unsupported`](crate::StoreError::Unsupported).
    pub fn conditional_appends(&self) -> Result<(), crate::StoreError> {
        Err(crate::StoreError::Unsupported {
            what: "a conditional append (decisions across aggregates)",
            reason: "JetStream checks an expected last sequence per subject or per whole stream, \
                     never \"no message matching these tags since\"; the coarse form it allows, \
                     the whole partition as one boundary, would serialize every append of the \
                     partition; use a PostgreSQL or SQLite store for decisions",
        })
    }

    /// The subjects' first tokens (see [`JetStreamStoreBuilder::prefix`](super::JetStreamStoreBuilder::prefix)).
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// How many partition streams the store has.
    pub fn partitions(&self) -> u32 {
        self.inner.partitions
    }

    /// The partition an aggregate's events are stored in.
    pub fn partition_of(&self, aggregate_id: &str) -> u32 {
        partition_hash(aggregate_id) % self.inner.partitions
    }

    /// The name of a partition's stream.
    pub fn stream_name(&self, partition: u32) -> Option<&str> {
        self.inner
            .streams
            .get(partition as usize)
            .map(|s| s.cached_info().config.name.as_str())
    }

    /// The subject an aggregate's messages are published to.
    pub fn subject(&self, aggregate_type: &str, aggregate_id: &str) -> String {
        format!(
            "{}.{}.{}.{}",
            self.inner.prefix,
            self.partition_of(aggregate_id),
            stream_token(aggregate_type),
            stream_token(aggregate_id)
        )
    }

    pub(super) fn stream(&self, partition: u32) -> &Stream {
        &self.inner.streams[partition as usize]
    }

    pub(super) fn remember(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        version: u64,
        seq: u64,
    ) {
        let Ok(mut known) = self.inner.known.lock() else {
            return;
        };
        if known.len() >= MAX_KNOWN_STREAMS {
            known.clear();
        }
        let key = (aggregate_type.to_owned(), aggregate_id.to_owned());
        let entry = known.entry(key).or_insert((version, seq));
        if seq >= entry.1 {
            *entry = (version, seq);
        }
    }

    pub(super) fn known(&self, aggregate_type: &str, aggregate_id: &str) -> Option<(u64, u64)> {
        let known = self.inner.known.lock().ok()?;
        known
            .get(&(aggregate_type.to_owned(), aggregate_id.to_owned()))
            .copied()
    }

    pub(super) fn forget(&self, aggregate_type: &str, aggregate_id: &str) {
        if let Ok(mut known) = self.inner.known.lock() {
            known.remove(&(aggregate_type.to_owned(), aggregate_id.to_owned()));
        }
    }

    pub(super) fn stream_label(&self, partition: u32) -> String {
        format!("stream {}", self.stream_name(partition).unwrap_or("?"))
    }

    /// Runs `attempt` again while the cluster does not answer (each request
    /// waits a part of the timeout: an election leaves requests unanswered),
    /// until the store's timeout; then fails with [`StoreError::Unavailable`].
    pub(super) async fn patiently<T, F, Fut>(&self, mut attempt: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let deadline = tokio::time::Instant::now() + self.inner.timeout;
        let mut pause = Duration::from_millis(20);
        loop {
            match tokio::time::timeout_at(deadline, attempt()).await {
                Ok(Err(error)) if error.is_unavailable() => {
                    if tokio::time::Instant::now() + pause >= deadline {
                        return Err(error);
                    }
                    tracing::debug!(error = %crate::error::error_chain(&error), "the cluster did not answer; trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                Ok(result) => return result,
                Err(_) => {
                    return Err(StoreError::Unavailable {
                        operation: "reach the JetStream cluster",
                        source: format!("no answer within {:?}", self.inner.timeout).into(),
                    })
                }
            }
        }
    }

    /// How long one publish attempt waits for its acknowledgement: a
    /// quarter of the timeout, between 250 ms and 2 s.
    pub(super) fn attempt_timeout(&self) -> Duration {
        attempt_timeout(self.inner.timeout)
    }
}
