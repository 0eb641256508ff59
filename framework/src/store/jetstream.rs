//! An event store on NATS JetStream (feature `nats`): the scale-out backend,
//! for when one database server's write rate or availability is not enough.
//!
//! # How events are stored
//!
//! - **One message per command.** An append's events travel in one message,
//!   so the append is atomic: every event of the command is stored, or none.
//!   Its subject is `<prefix>.<partition>.<aggregate type>.<aggregate id>`,
//!   each name encoded as one subject token ([`stream_token`]: letters,
//!   digits and `-` stay, every other byte becomes `_` and two hex digits), so
//!   two aggregates never share a subject.
//! - **Optimistic concurrency** by `Nats-Expected-Last-Subject-Sequence`: the
//!   append names the stream sequence of the aggregate's last message, and the
//!   stream's leader refuses it when another message for the aggregate came
//!   first; that comes back as the same [`StoreError::Conflict`] as on the
//!   other backends.
//! - **One message per version.** Each message carries a `Nats-Msg-Id`
//!   naming the aggregate's version slot (a UUID of the aggregate type, id
//!   and the version the append expects). The stream's duplicate check
//!   refuses a second message for a slot while the first is still being
//!   committed, which the expected-sequence check alone does not do on a
//!   cluster (nats-server 2.9 checks it when the leader proposes the
//!   message, so two appends in flight for one version could both commit).
//!   When the stream answers "duplicate", the store reads the stored message:
//!   if it is this append call's own (its first event, and a random number
//!   that each call carries in all its attempts), the append succeeded
//!   earlier and its acknowledgement was lost (a timeout, a dropped
//!   connection, a leader change), so the stored copy's position is
//!   returned and nothing is written twice; otherwise another writer took
//!   the version first, a conflict (also when the same command is sent twice
//!   at once: one writes, and the other's
//!   [`execute_once`](crate::CommandBus::execute_once) finds its events). The
//!   duplicate window is two minutes; later, the expected sequence alone
//!   guards the slot, and no append is in flight that long.
//! - **Positions.** An event's place in the log is its message's stream
//!   sequence (the [`Checkpoint::transaction_id`]: one message is one
//!   "transaction") and its index in the message. The
//!   [`Checkpoint::position`] packs them with the partition:
//!   `sequence << 24 | partition << 16 | index`, so positions are unique
//!   across partitions and increase along each partition's log, and the
//!   events of one append have consecutive positions. The sequence is
//!   assigned by the stream's leader when the message is committed to the
//!   replicated log, in commit order: there are no late commits, so a log
//!   reader can never skip an event that commits after it read past its
//!   position (what PostgreSQL needs transaction ids and a guard for).
//! - **Loads** read only the aggregate's own messages, one subject-filtered
//!   get per message (never a scan of the stream), from after its snapshot.
//!   Gets are answered by any replica; a replica behind what this store last
//!   wrote or read of the aggregate is read past through the stream's
//!   leader, so a node always reads its own writes (a replica behind another
//!   node's write ends in a conflict at the append, as any stale read would).
//!   The store keeps the messages it read or wrote in memory (immutable once
//!   stored; [`cached_events`](JetStreamStoreBuilder::cached_events) bounds
//!   them), so a load asks only for what came after them: one round trip for
//!   an aggregate this node last wrote. **Snapshots** live in a replicated
//!   key-value bucket (`KV_<PREFIX>_snapshots`, newest wins).
//!
//! # Partitions
//!
//! With [`partitions(n)`](JetStreamStoreBuilder::partitions) the store keeps
//! `n` streams (`<PREFIX>_0` …), each with its own leader and log (spread
//! over the cluster's servers by [`build`](JetStreamStoreBuilder::build) and
//! [`spread_leaders`](JetStreamStore::spread_leaders)); an
//! aggregate lives in partition `fnv1a(aggregate id) % n` (the hash
//! [`Partition::contains`](crate::log::Partition::contains) uses). Writes to
//! different partitions do not wait for each other. The log is ordered **per
//! partition**: there is no single total order across partitions. So:
//!
//! - a projection reads one partition per unit: the runner gives every
//!   projection as many partitions as the store has (a projection configured
//!   with another count above 1 is refused at build);
//! - [`ProjectionRunner::wait_for`](crate::runner::ProjectionRunner::wait_for)
//!   waits for the unit of the command's partition (read-your-writes holds
//!   for what the command wrote); the free function
//!   [`wait_for`](crate::runner::wait_for) compares against every unit and is
//!   not for partitioned stores;
//! - reading the log without a partition filter, [`head`](EventLog::head)
//!   and [`committed_head`](EventLog::committed_head) are refused on a
//!   partitioned store with a [`ConfigError`]: there is no head of the
//!   whole log ([`head_of`](EventLog::head_of) a partition is);
//! - one partition is one total order, as on the SQL backends.
//!
//! What JetStream cannot do against PostgreSQL: no inline handlers in the
//! append's transaction and no appends inside a transaction that also
//! writes rows ([`AppendInTransaction`](crate::AppendInTransaction) is not
//! implemented); read models, checkpoints, leases and dead letters live in
//! SQL ([`ProjectionRunner::with_log`](crate::runner::ProjectionRunner::with_log)
//! with a [`PostgresStore`](crate::PostgresStore) or
//! [`SqliteStore`](crate::SqliteStore)), where each batch's read-model writes
//! commit with its checkpoint: exactly once across the two systems. A
//! reaction that must happen with the append becomes a projection.
//!
//! # Failures
//!
//! Each request waits a part of the [timeout](JetStreamStoreBuilder::timeout)
//! for an answer (a quarter, between 250 ms and 2 s) and a call tries again
//! until the whole timeout has passed: a leader election (several seconds
//! on nats-server 2.9) leaves requests unanswered, and a call that spans it
//! succeeds once the new leader answers. Past the timeout (no leader: a
//! majority of the stream's servers is down) the call fails with
//! [`StoreError::Unavailable`]. An append is retried with the same message
//! id, so a retry never writes it twice; an append that failed as
//! `Unavailable` may still have been stored, and
//! [`execute_once`](crate::CommandBus::execute_once) with the same command
//! id finds it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use outflow::store::jetstream::JetStreamStore;
//!
//! let client = async_nats::connect("nats://127.0.0.1:4222").await?;
//! let store = JetStreamStore::builder(client)
//!     .prefix("bank")
//!     .partitions(4)
//!     .build()
//!     .await?;
//! assert_eq!(store.partitions(), 4);
//! # Ok(()) }
//! ```

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::context::{Context, PublishErrorKind};
use async_nats::jetstream::stream::{self, Stream};
use async_nats::jetstream::{kv, Message};
use async_nats::HeaderMap;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{ConfigError, ErrorKind, EventRef, StoreError};
use crate::event::{AppendRequest, Checkpoint, Metadata, RecordedEvent, Snapshot};
use crate::log::{partition_hash, EventLog, LogFilter};
use crate::store::{EventStore, LoadedStream, StreamEvent};
use crate::wake::{WakeSignal, Wakeups};

mod announced;
mod outcomes;

/// The most partitions a store may have (8 bits of a position).
pub const MAX_PARTITIONS: u32 = 256;
/// The most events one append may carry (16 bits of a position).
pub const MAX_EVENTS_PER_APPEND: usize = 1 << 16;

/// The header holding the stream version after the message's last event.
const VERSION_HEADER: &str = "Outflow-Version";
/// At most one signal to other nodes' readers per this interval.
const WAKE_EVERY: Duration = Duration::from_millis(2);
/// How many readers (server-side cursors) a store keeps for reuse.
const MAX_IDLE_READERS: usize = 64;
/// How many aggregates' last sequences a store remembers.
const MAX_KNOWN_STREAMS: usize = 100_000;

/// Encodes a name as one NATS subject token, reversibly: ASCII letters,
/// digits and `-` stay; every other byte (of its UTF-8) becomes `_` and two
/// lower-case hex digits; the empty name becomes `_`. Distinct names give
/// distinct tokens.
///
/// ```
/// use outflow::store::jetstream::stream_token;
/// assert_eq!(stream_token("account-7"), "account-7");
/// assert_eq!(stream_token("a.b"), "a_2eb");
/// assert_eq!(stream_token("a_b"), "a_5fb");
/// assert_eq!(stream_token(""), "_");
/// ```
pub fn stream_token(name: &str) -> String {
    if name.is_empty() {
        return "_".to_owned();
    }
    let mut token = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' {
            token.push(char::from(byte));
        } else {
            token.push_str(&format!("_{byte:02x}"));
        }
    }
    token
}

/// The position of the `index`th event of the message at `sequence` in
/// `partition` (see the module documentation).
fn position(sequence: u64, partition: u32, index: usize) -> u64 {
    (sequence << 24) | (u64::from(partition) << 16) | index as u64
}

/// The partition a position belongs to.
fn partition_of_position(position: u64) -> u32 {
    ((position >> 16) & 0xff) as u32
}

/// One event as stored in a message.
#[derive(Clone, Serialize, Deserialize)]
struct StoredEvent {
    id: Uuid,
    #[serde(rename = "type")]
    event_type: String,
    #[serde(rename = "ver")]
    event_version: String,
    payload: Box<serde_json::value::RawValue>,
    #[serde(default, skip_serializing_if = "Metadata::is_empty")]
    metadata: Metadata,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    correlation: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    causation: Option<Uuid>,
}

/// A message: one append.
#[derive(Clone, Serialize, Deserialize)]
struct StoredMessage {
    #[serde(rename = "type")]
    aggregate_type: String,
    #[serde(rename = "id")]
    aggregate_id: String,
    /// Sequence of the first event.
    first: u64,
    at: DateTime<Utc>,
    /// A random number per append call, the same in every attempt: tells
    /// this call's own stored message from another writer's identical one
    /// (the same command sent twice).
    #[serde(default)]
    writer: u64,
    events: Vec<StoredEvent>,
}

/// A snapshot as stored in the bucket.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    version: u64,
    /// Stream sequence of the message holding event `version` (0: unknown).
    seq: u64,
    state: serde_json::Value,
}

/// Builds a [`JetStreamStore`].
#[must_use]
pub struct JetStreamStoreBuilder {
    client: async_nats::Client,
    prefix: String,
    partitions: u32,
    replicas: Option<usize>,
    timeout: Duration,
    poll_interval: Duration,
    cached_events: usize,
}

impl std::fmt::Debug for JetStreamStoreBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamStoreBuilder")
            .field("prefix", &self.prefix)
            .field("partitions", &self.partitions)
            .field("replicas", &self.replicas)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl JetStreamStoreBuilder {
    /// The subjects' first tokens and the streams' names (default
    /// `outflow`): subjects `<prefix>.<partition>.…`, streams
    /// `<PREFIX>_<partition>` (dots become `_`, upper-cased), snapshots in
    /// the bucket `<PREFIX>_snapshots`. Letters, digits, `-` and `_`, in
    /// tokens separated by dots.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How many partition streams (default 1, at most 256). Fixed for the
    /// life of the data: a store opened with another count than it was
    /// created with is refused.
    pub fn partitions(mut self, partitions: u32) -> Self {
        self.partitions = partitions;
        self
    }

    /// Replicas of each stream and of the snapshot bucket (default: 3 when
    /// the server is part of a cluster, 1 on a single server).
    pub fn replicas(mut self, replicas: usize) -> Self {
        self.replicas = Some(replicas);
        self
    }

    /// How long a publish or read may wait for the cluster (default 5 s):
    /// past it, the call fails with [`StoreError::Unavailable`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How many events of aggregates' streams the store keeps in memory
    /// (default 100,000; 0 keeps none). A load of an aggregate whose
    /// messages are kept asks the cluster only for what came after them: one
    /// round trip instead of one per message. Stored messages never change,
    /// so what is kept is never stale; when the count is passed, everything
    /// kept is dropped.
    pub fn cached_events(mut self, events: usize) -> Self {
        self.cached_events = events;
        self
    }

    /// How often idle log readers look for new events when no wake-up came
    /// (default 1 s).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Creates the streams and the snapshot bucket when missing, checks
    /// them when present, and returns the store.
    ///
    /// # Errors
    ///
    /// [`StoreError::Config`] for an invalid prefix, a partition count of 0
    /// or above 256, or one other than the stored data's; a
    /// [`StoreError::Database`] or [`StoreError::Unavailable`] when the
    /// cluster refuses or does not answer (JetStream not enabled, not
    /// enough servers for the replicas).
    pub async fn build(self) -> Result<JetStreamStore, StoreError> {
        validate_prefix(&self.prefix)?;
        if self.partitions == 0 || self.partitions > MAX_PARTITIONS {
            return Err(ConfigError::Invalid {
                setting: "partitions",
                reason: format!(
                    "{} partitions asked for; between 1 and {MAX_PARTITIONS}",
                    self.partitions
                ),
            }
            .into());
        }
        // The server's description arrives with the connection: a client
        // connecting in the background (`retry_on_initial_connect`) has none
        // until a round trip went through.
        if self.replicas.is_none() {
            tokio::time::timeout(self.timeout, self.client.flush())
                .await
                .map_err(|_| StoreError::Unavailable {
                    operation: "connect to NATS",
                    source: format!("no connection within {:?}", self.timeout).into(),
                })?
                .map_err(|e| nats_error("connect to NATS", e))?;
        }
        let replicas = self.replicas.unwrap_or_else(|| {
            if self.client.server_info().cluster.is_some() {
                3
            } else {
                1
            }
        });
        let mut js = async_nats::jetstream::new(self.client.clone());
        // Each request waits a part of the timeout; calls try again until
        // the whole timeout has passed.
        js.set_timeout(attempt_timeout(self.timeout));
        let base = self.prefix.replace('.', "_").to_uppercase();
        // The partition count first: a store opened with another count than
        // its data's creates nothing.
        // Each step is tried again while the cluster does not answer (an
        // election leaves requests unanswered), until the build's timeout.
        let deadline = tokio::time::Instant::now() + self.timeout;
        let bucket = format!("{base}_snapshots");
        let kv = until(deadline, || ensure_bucket(&js, &bucket, replicas)).await?;
        until(deadline, || {
            check_partition_count(&kv, &self.prefix, self.partitions)
        })
        .await?;
        let mut streams = Vec::new();
        for partition in 0..self.partitions {
            let name = format!("{base}_{partition}");
            let subjects = vec![format!("{}.{partition}.>", self.prefix)];
            streams.push(
                until(deadline, || {
                    ensure_stream(&js, &name, subjects.clone(), replicas)
                })
                .await?,
            );
        }
        let store = JetStreamStore {
            inner: Arc::new(Inner {
                client: self.client,
                js,
                prefix: self.prefix,
                partitions: self.partitions,
                streams,
                kv,
                timeout: self.timeout,
                poll_interval: self.poll_interval,
                known: Mutex::new(HashMap::new()),
                messages: Mutex::new(MessageCache::new(self.cached_events)),
                readers: Mutex::new(Vec::new()),
                wake: WakeSignal::new(),
                announced: announced::Announced::default(),
                listening: std::sync::atomic::AtomicBool::new(false),
                last_signal: std::sync::atomic::AtomicU64::new(0),
                signal_pending: std::sync::atomic::AtomicBool::new(false),
                started: std::time::Instant::now(),
            }),
        };
        // Partition leaders spread over the cluster (JetStream may have put
        // them all on one server); only streams whose leader leads more
        // than its share are moved, so nodes opening the store together
        // leave a spread cluster as it is.
        if self.partitions > 1 && replicas > 1 {
            if let Err(error) = store.spread_leaders().await {
                tracing::warn!(error = %crate::error::error_chain(&error), "could not spread the partitions' leaders over the cluster");
            }
        }
        Ok(store)
    }
}

fn validate_prefix(prefix: &str) -> Result<(), StoreError> {
    let ok = !prefix.is_empty()
        && prefix.split('.').all(|token| {
            !token.is_empty()
                && token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            setting: "prefix",
            reason: format!("`{prefix}`: letters, digits, `-` and `_` in tokens separated by dots"),
        }
        .into())
    }
}

/// The snapshot bucket: a key-value bucket (a stream in the layout
/// JetStream's key-value API uses, `KV_<bucket>` on `$KV.<bucket>.>`, one
/// value per key), created here as a stream so that servers from 2.9 on
/// accept it.
async fn ensure_bucket(
    js: &Context,
    bucket: &str,
    replicas: usize,
) -> Result<kv::Store, StoreError> {
    if let Ok(store) = js.get_key_value(bucket).await {
        return Ok(store);
    }
    let config = stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        allow_rollup: true,
        allow_direct: true,
        deny_delete: true,
        discard: stream::DiscardPolicy::New,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    };
    let created = js.create_stream(config).await;
    match js.get_key_value(bucket).await {
        Ok(store) => Ok(store),
        // Not there after a failed create: the create's error says why
        // (no answer during an election, not enough servers), not "not
        // found".
        Err(error) => match created {
            Err(create) => Err(nats_error("create the snapshot bucket", create)),
            Ok(_) => Err(nats_error("open the snapshot bucket", error)),
        },
    }
}

/// Runs `step` until it succeeds, fails for another reason than an
/// unanswered request, or `deadline` passes (then its last error).
async fn until<T, F, Fut>(deadline: tokio::time::Instant, mut step: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut pause = Duration::from_millis(50);
    loop {
        match step().await {
            Err(error)
                if error.is_unavailable() && tokio::time::Instant::now() + pause < deadline =>
            {
                tracing::debug!(error = %crate::error::error_chain(&error), "the cluster did not answer; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(500));
            }
            result => return result,
        }
    }
}

/// Records the partition count in the snapshot bucket on first use, and
/// refuses another one afterwards.
async fn check_partition_count(
    kv: &kv::Store,
    prefix: &str,
    partitions: u32,
) -> Result<(), StoreError> {
    const KEY: &str = "_outflow_partitions";
    let stored = match kv.get(KEY).await {
        Ok(Some(value)) => Some(value),
        Ok(None) => match kv
            .create(KEY, partitions.to_string().into_bytes().into())
            .await
        {
            Ok(_) => None,
            Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => {
                kv.get(KEY)
                    .await
                    .map_err(|e| nats_error("read the partition count", e))?
            }
            Err(error) => return Err(nats_error("record the partition count", error)),
        },
        Err(error) => return Err(nats_error("read the partition count", error)),
    };
    if let Some(value) = stored {
        let text = String::from_utf8_lossy(&value).into_owned();
        if text.trim() != partitions.to_string() {
            return Err(ConfigError::Invalid {
                setting: "partitions",
                reason: format!(
                    "the JetStream event store `{prefix}` was created with {} partition(s), not \
                     {partitions}: an aggregate's partition follows from the count, so it cannot \
                     change (open it with {}, or use a new prefix)",
                    text.trim(),
                    text.trim()
                ),
            }
            .into());
        }
    }
    Ok(())
}

async fn ensure_stream(
    js: &Context,
    name: &str,
    subjects: Vec<String>,
    replicas: usize,
) -> Result<Stream, StoreError> {
    if let Ok(mut existing) = js.get_stream(name).await {
        let info = existing
            .info()
            .await
            .map_err(|e| nats_error("read the stream's configuration", e))?;
        if info.config.subjects != subjects {
            return Err(ConfigError::Invalid {
                setting: "prefix",
                reason: format!(
                    "stream `{name}` exists with subjects {:?}, not {:?}",
                    info.config.subjects, subjects
                ),
            }
            .into());
        }
        return Ok(existing);
    }
    let config = stream::Config {
        name: name.to_owned(),
        subjects,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        allow_direct: true,
        deny_delete: true,
        deny_purge: true,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    };
    match js.create_stream(config).await {
        Ok(stream) => Ok(stream),
        // Another node created it first.
        Err(_) if js.get_stream(name).await.is_ok() => js
            .get_stream(name)
            .await
            .map_err(|e| nats_error("open the stream", e)),
        Err(error) => Err(nats_error("create the stream", error)),
    }
}

/// A NATS error as a store error: no answer in time or no connection is
/// [`StoreError::Unavailable`], anything else the cluster's refusal.
fn nats_error(operation: &'static str, error: impl Into<crate::error::BoxError>) -> StoreError {
    let error: crate::error::BoxError = error.into();
    let text = error.to_string().to_lowercase();
    let unavailable = [
        "timed out",
        "timeout",
        "no responders",
        "broken pipe",
        "disconnected",
        "connection",
        "no suitable peers",
        "insufficient resources",
        "leader",
        "temporarily unavailable",
    ]
    .iter()
    .any(|needle| text.contains(needle));
    if unavailable {
        StoreError::Unavailable {
            operation,
            source: error,
        }
    } else {
        StoreError::database(operation, ErrorKind::Infrastructure, error)
    }
}

/// An event store on NATS JetStream; see the [module documentation](self).
/// Cloning is cheap; clones share the connection and caches.
#[derive(Clone)]
pub struct JetStreamStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: async_nats::Client,
    js: Context,
    prefix: String,
    partitions: u32,
    streams: Vec<Stream>,
    kv: kv::Store,
    timeout: Duration,
    poll_interval: Duration,
    /// Per aggregate (type, id): its version and the sequence of its last
    /// message, as last seen here.
    known: Mutex<HashMap<(String, String), (u64, u64)>>,
    /// Aggregates' messages read or written here (immutable once stored),
    /// so a load asks only for what came after them.
    messages: Mutex<MessageCache>,
    /// Server-side cursors kept between reads.
    readers: Mutex<Vec<Reader>>,
    wake: WakeSignal,
    /// Appends known to be stored, here and on other nodes (see
    /// [`announced`]).
    announced: announced::Announced,
    listening: std::sync::atomic::AtomicBool,
    /// When the last signal to other nodes went (µs since `started`).
    last_signal: std::sync::atomic::AtomicU64,
    /// Whether a signal is scheduled for the end of the current window.
    signal_pending: std::sync::atomic::AtomicBool,
    started: std::time::Instant,
}

impl std::fmt::Debug for JetStreamStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamStore")
            .field("prefix", &self.inner.prefix)
            .field("partitions", &self.inner.partitions)
            .finish()
    }
}

/// Every message of some aggregates up to a sequence, bounded by a count of
/// events.
struct MessageCache {
    streams: HashMap<(String, String), CachedStream>,
    events: usize,
    limit: usize,
}

/// A message kept in memory, with its stream sequence.
type KeptMessage = (u64, Arc<StoredMessage>);

/// All messages of one aggregate with a stream sequence up to `last_seq`.
struct CachedStream {
    last_seq: u64,
    messages: Vec<KeptMessage>,
}

impl MessageCache {
    fn new(limit: usize) -> Self {
        MessageCache {
            streams: HashMap::new(),
            events: 0,
            limit,
        }
    }

    /// The kept messages after `after_seq` and the sequence they reach,
    /// when the aggregate is kept from before `after_seq`.
    fn read(&self, key: &(String, String), after_seq: u64) -> Option<(Vec<KeptMessage>, u64)> {
        let cached = self.streams.get(key)?;
        (after_seq <= cached.last_seq).then(|| {
            let messages = cached
                .messages
                .iter()
                .filter(|(seq, _)| *seq > after_seq)
                .cloned()
                .collect();
            (messages, cached.last_seq)
        })
    }

    /// Adds messages read after `from_seq` (every message of the aggregate
    /// up to `reached`): kept when they continue what is kept, or start the
    /// aggregate's stream.
    fn extend(
        &mut self,
        key: &(String, String),
        from_seq: u64,
        reached: u64,
        fresh: &[KeptMessage],
    ) {
        if self.limit == 0 {
            return;
        }
        let added: usize = fresh.iter().map(|(_, m)| m.events.len()).sum();
        if self.events + added > self.limit {
            self.streams.clear();
            self.events = 0;
        }
        match self.streams.get_mut(key) {
            Some(cached) if cached.last_seq == from_seq => {
                cached.messages.extend(fresh.iter().cloned());
                cached.last_seq = cached.last_seq.max(reached);
            }
            Some(_) => return,
            None if from_seq == 0 => {
                self.streams.insert(
                    key.clone(),
                    CachedStream {
                        last_seq: reached,
                        messages: fresh.to_vec(),
                    },
                );
            }
            None => return,
        }
        self.events += added;
    }
}

/// A server-side cursor on one partition's stream, kept between reads.
struct Reader {
    partition: u32,
    subject: String,
    consumer: PullConsumer,
    /// Decoded events of the last message not yet handed out.
    leftover: VecDeque<RecordedEvent>,
    /// The last events the last read went through (see [`tail_of`]): a
    /// reader that handled fewer than it was given reads on from one of them.
    recent: Vec<RecordedEvent>,
    /// The last event handed out or skipped.
    cursor: Checkpoint,
    /// The stream sequence of the last message the consumer delivered.
    delivered: u64,
}

impl JetStreamStore {
    /// A builder on a connected client.
    pub fn builder(client: async_nats::Client) -> JetStreamStoreBuilder {
        JetStreamStoreBuilder {
            client,
            prefix: "outflow".to_owned(),
            partitions: 1,
            replicas: None,
            timeout: Duration::from_secs(5),
            poll_interval: Duration::from_secs(1),
            cached_events: 100_000,
        }
    }

    /// The server leading each partition's stream now, by partition:
    /// `None` for a stream without a leader (electing one, or most of its
    /// servers down: such a stream does not answer within the timeout). The
    /// streams are asked at once, so the answer comes within one timeout
    /// whatever the number of partitions.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`] when a stream's state cannot be read for
    /// another reason than an unanswered request (a stream deleted, say).
    pub async fn leaders(&self) -> Result<Vec<Option<String>>, StoreError> {
        let asked = self.inner.streams.iter().map(|stream| {
            self.patiently(|| async {
                stream
                    .get_info()
                    .await
                    .map_err(|e| nats_error("read a stream's leader", e))
            })
        });
        futures::future::join_all(asked)
            .await
            .into_iter()
            .map(|answer| match answer {
                Ok(info) => Ok(info.cluster.and_then(|c| c.leader)),
                Err(error) if error.is_unavailable() => Ok(None),
                Err(error) => Err(error),
            })
            .collect()
    }

    /// Each partition stream's cluster state (leader and replicas) now.
    async fn clusters(
        &self,
    ) -> Result<Vec<Option<async_nats::jetstream::stream::ClusterInfo>>, StoreError> {
        let mut clusters = Vec::with_capacity(self.inner.streams.len());
        for stream in &self.inner.streams {
            let info = self
                .patiently(|| async {
                    stream
                        .get_info()
                        .await
                        .map_err(|e| nats_error("read a stream's leader", e))
                })
                .await?;
            clusters.push(info.cluster);
        }
        Ok(clusters)
    }

    /// Moves partition leaders until they are spread by the floor/ceiling
    /// rule — no server leads two more streams than another, one that leads
    /// none included (4 partitions on 3 servers: 2/1/1) — so that appends
    /// to different partitions are led by different servers: a stream whose
    /// leader leads too many is asked to step down, and the cluster elects
    /// another of its replicas. [`build`](JetStreamStoreBuilder::build) does
    /// it; call it again after servers came back (the survivors then lead
    /// everything). Returns the leaders by partition.
    ///
    /// # Errors
    ///
    /// As [`leaders`](Self::leaders); a stream that does not step down or
    /// elect a leader within the timeout gives [`StoreError::Unavailable`].
    pub async fn spread_leaders(&self) -> Result<Vec<Option<String>>, StoreError> {
        let rounds = 4 * self.inner.streams.len() + 4;
        for _ in 0..rounds {
            let clusters = self.clusters().await?;
            let leaders: Vec<Option<String>> = clusters
                .iter()
                .map(|c| c.as_ref().and_then(|c| c.leader.clone()))
                .collect();
            if leaders.iter().any(Option::is_none) {
                // A stream still electing its first (or next) leader.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            let mut servers: Vec<String> = Vec::new();
            for cluster in clusters.iter().flatten() {
                servers.extend(cluster.leader.iter().cloned());
                servers.extend(cluster.replicas.iter().map(|p| p.name.clone()));
            }
            servers.sort();
            servers.dedup();
            let replicas = self
                .inner
                .streams
                .first()
                .map_or(1, |s| s.cached_info().config.num_replicas);
            if servers.len() < replicas.min(2) {
                return Ok(leaders);
            }
            let peers_known = clusters
                .iter()
                .flatten()
                .all(|c| c.replicas.len() + 1 >= replicas);
            if !peers_known {
                // The streams' replicas are not all reported yet.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            let Some(partition) = overloaded(&leaders, &servers) else {
                return Ok(leaders);
            };
            let name = self
                .stream(partition as u32)
                .cached_info()
                .config
                .name
                .clone();
            let answer: serde_json::Value = self
                .inner
                .js
                .request(
                    format!("STREAM.LEADER.STEPDOWN.{name}"),
                    &serde_json::json!({}),
                )
                .await
                .map_err(|e| nats_error("ask a stream's leader to step down", e))?;
            if let Some(error) = answer.get("error") {
                return Err(StoreError::database(
                    "ask a stream's leader to step down",
                    ErrorKind::Infrastructure,
                    format!("stream {name}: {error}"),
                ));
            }
            // Until another server leads it.
            let old = leaders[partition].clone();
            let deadline = tokio::time::Instant::now() + self.inner.timeout;
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let info = self.stream(partition as u32).get_info().await;
                let leader = info.ok().and_then(|i| i.cluster).and_then(|c| c.leader);
                if leader.is_some() && leader != old {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(StoreError::Unavailable {
                        operation: "spread the partitions' leaders",
                        source: format!("stream {name} elected no leader").into(),
                    });
                }
            }
        }
        self.leaders().await
    }

    /// The subjects' first tokens (see [`JetStreamStoreBuilder::prefix`]).
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

    fn stream(&self, partition: u32) -> &Stream {
        &self.inner.streams[partition as usize]
    }

    fn remember(&self, aggregate_type: &str, aggregate_id: &str, version: u64, seq: u64) {
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

    fn known(&self, aggregate_type: &str, aggregate_id: &str) -> Option<(u64, u64)> {
        let known = self.inner.known.lock().ok()?;
        known
            .get(&(aggregate_type.to_owned(), aggregate_id.to_owned()))
            .copied()
    }

    fn forget(&self, aggregate_type: &str, aggregate_id: &str) {
        if let Ok(mut known) = self.inner.known.lock() {
            known.remove(&(aggregate_type.to_owned(), aggregate_id.to_owned()));
        }
    }

    /// The aggregate's version and the sequence of its last message, as
    /// the stream's leader has them ((0, 0) for a new aggregate).
    async fn last_of(
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

    fn stream_label(&self, partition: u32) -> String {
        format!("stream {}", self.stream_name(partition).unwrap_or("?"))
    }

    /// Every message of one aggregate after `after_seq`, in order, through
    /// subject-filtered gets answered by the stream's leader.
    async fn messages_of(
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

    /// Publishes one message, retrying with the same message id while the
    /// acknowledgement does not come, until the timeout.
    async fn publish(
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

    /// Runs `attempt` again while the cluster does not answer (each request
    /// waits a part of the timeout: an election leaves requests unanswered),
    /// until the store's timeout; then fails with [`StoreError::Unavailable`].
    async fn patiently<T, F, Fut>(&self, mut attempt: F) -> Result<T, StoreError>
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

    /// The conflict an append met, with the aggregate's version now.
    async fn conflict(&self, request: &AppendRequest) -> Result<StoreError, StoreError> {
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
    async fn holds(
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

    /// How long one publish attempt waits for its acknowledgement: a
    /// quarter of the timeout, between 250 ms and 2 s.
    fn attempt_timeout(&self) -> Duration {
        attempt_timeout(self.inner.timeout)
    }

    /// Wakes other nodes' log readers: a message without payload on the
    /// wake subject, at most one per [`WAKE_EVERY`]: an append in a window
    /// that already sent one leaves one more for the window's end, so the
    /// last append is always signalled.
    fn signal_other_nodes(&self) {
        use std::sync::atomic::Ordering;
        let now = self.inner.started.elapsed().as_micros() as u64;
        let last = self.inner.last_signal.load(Ordering::Acquire);
        let every = WAKE_EVERY.as_micros() as u64;
        if now.saturating_sub(last) >= every
            && self
                .inner
                .last_signal
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.send_signal();
            return;
        }
        if self.inner.signal_pending.swap(true, Ordering::AcqRel) {
            return;
        }
        let store = self.clone();
        let wait = Duration::from_micros(every.saturating_sub(now.saturating_sub(last)));
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            store.inner.signal_pending.store(false, Ordering::Release);
            let now = store.inner.started.elapsed().as_micros() as u64;
            store.inner.last_signal.store(now, Ordering::Release);
            store.send_signal();
        });
    }

    /// Sends the wake-up signal, carrying the appends made here since the
    /// last one (see [`announced`]).
    fn send_signal(&self) {
        let client = self.inner.client.clone();
        let subject = self.wake_subject();
        let payload = bytes::Bytes::from(self.inner.announced.take_unsent());
        // Buffered by the client and flushed with the next write; never
        // waited for by the append.
        tokio::spawn(async move {
            let _ = client.publish(subject, payload).await;
        });
    }

    fn wake_subject(&self) -> String {
        format!("{}.wake", self.inner.prefix)
    }

    /// Which partition and subject filter a log filter reads.
    fn route(&self, filter: &LogFilter) -> Result<(u32, String), StoreError> {
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
    async fn reader(
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

    fn keep_reader(&self, reader: Reader) {
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
    async fn read(
        &self,
        after: Checkpoint,
        filter: &LogFilter,
        limit: usize,
    ) -> Result<Read, StoreError> {
        self.patiently(|| self.read_once(after, filter, limit))
            .await
    }

    async fn read_once(
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
    async fn partition_head(&self, partition: u32) -> Result<Checkpoint, StoreError> {
        self.patiently(|| self.partition_head_once(partition)).await
    }

    async fn partition_head_once(&self, partition: u32) -> Result<Checkpoint, StoreError> {
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

    /// Starts the task that turns other nodes' append signals into wake-ups.
    fn listen(&self) {
        if self
            .inner
            .listening
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        let client = self.inner.client.clone();
        let subject = self.wake_subject();
        tokio::spawn(async move {
            let Ok(mut subscription) = client.subscribe(subject).await else {
                if let Some(inner) = weak.upgrade() {
                    inner
                        .listening
                        .store(false, std::sync::atomic::Ordering::Release);
                }
                return;
            };
            while let Some(signal) = subscription.next().await {
                match weak.upgrade() {
                    Some(inner) => {
                        inner.announced.received(&signal.payload);
                        inner.wake.wake();
                    }
                    None => return,
                }
            }
        });
    }
}

/// What one read of the log found.
struct Read {
    events: Vec<RecordedEvent>,
    /// The last event seen, wanted or not.
    seen: Checkpoint,
    /// Whether the partition was read to its end.
    complete: bool,
    /// Whether an announced message did not reach the consumer in time
    /// (the reader should look again soon).
    held_back: bool,
}

/// How long a read waits for a message announced as stored that its
/// consumer has not been told about yet.
const ANNOUNCED_WAIT: Duration = Duration::from_millis(250);

/// How many of the events a read handed out a reader keeps, so that a
/// reader that handled fewer of them reads on from one (a runner reads one
/// more than its batch) without a new consumer.
const RECENT_EVENTS: usize = 8;

/// The last [`RECENT_EVENTS`] events of a read and the skipped events after
/// the first of them, in log order: what a reader can be taken back to. The
/// rest of the read's events are not copied.
fn tail_of(events: &[RecordedEvent], skipped: Vec<RecordedEvent>) -> Vec<RecordedEvent> {
    let tail = &events[events.len().saturating_sub(RECENT_EVENTS)..];
    let from = tail.first().map(RecordedEvent::checkpoint);
    let mut recent: Vec<RecordedEvent> = tail.to_vec();
    recent.extend(
        skipped
            .into_iter()
            .filter(|e| from.is_none_or(|from| e.checkpoint() > from)),
    );
    recent.sort_by_key(RecordedEvent::checkpoint);
    recent
}

/// Deletes a reader's server-side cursor in the background (it would
/// expire by itself after a minute).
fn drop_reader(js: &Context, reader: Reader) {
    if tokio::runtime::Handle::try_current().is_err() {
        return;
    }
    let js = js.clone();
    tokio::spawn(async move {
        let info = reader.consumer.cached_info();
        let _ = js
            .delete_consumer_from_stream(&info.name, &info.stream_name)
            .await;
    });
}

fn version_header(headers: &HeaderMap) -> Option<u64> {
    headers.get(VERSION_HEADER)?.as_str().parse().ok()
}

/// A message's events as log readers see them.
fn decode_message(message: &Message, partition: u32) -> Result<Vec<RecordedEvent>, StoreError> {
    let info = message.info().map_err(|e| StoreError::Corrupt {
        table: "JetStream".to_owned(),
        what: format!("a delivered message has no sequence: {e}"),
    })?;
    let seq = info.stream_sequence;
    decode_stored(&message.payload, seq, partition, &message.subject)
}

fn decode_stored(
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
fn recorded_ref(
    stored: &StoredMessage,
    seq: u64,
    partition: u32,
) -> Result<Vec<RecordedEvent>, StoreError> {
    recorded(stored.clone(), seq, partition)
}

/// A stored message's events as recorded events.
fn recorded(
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

#[async_trait]
impl EventStore for JetStreamStore {
    async fn append(&self, request: AppendRequest) -> Result<Vec<RecordedEvent>, StoreError> {
        // A retry after an unanswered attempt is safe: the version slot's
        // message id makes a stored copy answer for it.
        let writer = rand::random::<u64>();
        self.patiently(|| self.append_once(request.clone(), writer))
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
    async fn append_once(
        &self,
        request: AppendRequest,
        writer: u64,
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
        let recorded_at = Utc::now();
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
        Ok(request
            .events
            .into_iter()
            .enumerate()
            .map(|(index, event)| RecordedEvent {
                event_id: event.event_id,
                aggregate_type: aggregate_type.clone(),
                aggregate_id: aggregate_id.clone(),
                sequence: request.expected_version + 1 + index as u64,
                position: position(seq, partition, index),
                transaction_id: seq,
                recorded_at,
                event_type: event.event_type,
                event_version: event.event_version,
                payload: event.payload,
                metadata: event.metadata,
                correlation_id: event.correlation_id,
                causation_id: event.causation_id,
            })
            .collect())
    }

    async fn read_stream_once(
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

    async fn load_once(
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

    async fn save_snapshot_once(&self, snapshot: Snapshot) -> Result<(), StoreError> {
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
    async fn snapshot(
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

/// How long one request waits for an answer: a quarter of the timeout,
/// between 250 ms and 2 s.
fn attempt_timeout(timeout: Duration) -> Duration {
    (timeout / 4).clamp(Duration::from_millis(250), Duration::from_secs(2))
}

/// The message id of an append: one per aggregate and version slot (the
/// version the append expects), so two appends at the same slot are one
/// message to the stream's duplicate check.
fn slot_id(aggregate_type: &str, aggregate_id: &str, expected_version: u64) -> Uuid {
    const NAMESPACE: Uuid = Uuid::from_u128(0x5d1b_6f0e_2c4a_4e57_9a35_0f7c_3b8e_1d42);
    let mut name = Vec::with_capacity(aggregate_type.len() + aggregate_id.len() + 24);
    name.extend_from_slice(aggregate_type.as_bytes());
    name.push(0);
    name.extend_from_slice(aggregate_id.as_bytes());
    name.push(0);
    name.extend_from_slice(expected_version.to_string().as_bytes());
    Uuid::new_v5(&NAMESPACE, &name)
}

fn snapshot_key(aggregate_type: &str, aggregate_id: &str) -> String {
    format!(
        "{}.{}",
        stream_token(aggregate_type),
        stream_token(aggregate_id)
    )
}

#[async_trait]
impl EventLog for JetStreamStore {
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
    ) -> Result<crate::log::LogWindow, StoreError> {
        let read = self.read(after, filter, limit).await?;
        Ok(crate::log::LogWindow::new(
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
            crate::log::END
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

/// The floor/ceiling rule for leaders, as the runner's fair share: a
/// partition to hand over while some server leads two more partitions than
/// another (which may lead none), led by one of the busiest servers; `None`
/// when the leaders are spread.
fn overloaded(leaders: &[Option<String>], servers: &[String]) -> Option<usize> {
    let mut led: HashMap<&str, usize> = servers.iter().map(|s| (s.as_str(), 0)).collect();
    for leader in leaders.iter().flatten() {
        *led.entry(leader.as_str()).or_default() += 1;
    }
    let most = led.values().copied().max()?;
    let least = led.values().copied().min()?;
    if most < least + 2 {
        return None;
    }
    leaders
        .iter()
        .position(|leader| leader.as_deref().is_some_and(|l| led.get(l) == Some(&most)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn leaders_spread_by_floor_and_ceiling() {
        let servers: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let led = |names: &[&str]| -> Vec<Option<String>> {
            names.iter().map(|n| Some(n.to_string())).collect()
        };
        // 4 partitions on 3 servers: 2/2/0 leaves a server idle while
        // another leads two more.
        assert_eq!(
            super::overloaded(&led(&["a", "a", "b", "b"]), &servers),
            Some(0)
        );
        assert_eq!(
            super::overloaded(&led(&["a", "a", "b", "c"]), &servers),
            None
        );
        assert_eq!(
            super::overloaded(&led(&["a", "b", "c", "c", "c", "a"]), &servers),
            Some(2)
        );
        assert_eq!(
            super::overloaded(&led(&["a", "b", "c", "a", "b", "c"]), &servers),
            None
        );
        assert_eq!(super::overloaded(&led(&["a"]), &servers), None);
        assert_eq!(super::overloaded(&led(&["a", "a"]), &servers), Some(0));
    }

    use super::*;

    #[test]
    fn tokens_are_distinct_for_distinct_names() {
        let names = ["a.b", "a_b", "a b", "a*b", "a>b", "", "_", "é", "a-b", "A"];
        let tokens: std::collections::HashSet<String> =
            names.iter().map(|n| stream_token(n)).collect();
        assert_eq!(tokens.len(), names.len());
        for token in &tokens {
            assert!(
                token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                "{token}"
            );
        }
    }

    #[test]
    fn positions_order_within_a_partition_and_name_it() {
        let a = position(7, 3, 0);
        let b = position(7, 3, 699);
        let c = position(8, 3, 0);
        assert!(a < b && b < c);
        assert_eq!(b - a, 699, "one append's events are consecutive");
        assert_eq!(partition_of_position(b), 3);
        assert_ne!(position(7, 2, 0), position(7, 3, 0));
    }

    #[test]
    fn a_version_slot_has_one_id() {
        assert_eq!(slot_id("account", "a", 3), slot_id("account", "a", 3));
        assert_ne!(slot_id("account", "a", 3), slot_id("account", "a", 4));
        assert_ne!(slot_id("account", "a1", 3), slot_id("account", "a", 13));
        assert_ne!(slot_id("acc", "ount\0a", 3), slot_id("account", "a", 3));
    }

    #[test]
    fn no_answer_is_unavailable_and_a_refusal_is_infrastructure() {
        let timeout = nats_error("x", "timed out: didn't receive ack in time");
        assert!(timeout.is_unavailable() && timeout.is_retryable());
        let refused = nats_error("x", "stream not found");
        assert!(!refused.is_unavailable());
        assert_eq!(refused.kind(), ErrorKind::Infrastructure);
        let single = nats_error("x", "replicas > 1 not supported in non-clustered mode");
        assert_eq!(single.kind(), ErrorKind::Infrastructure);
    }

    fn message(first: u64, events: usize) -> Arc<StoredMessage> {
        Arc::new(StoredMessage {
            aggregate_type: "t".into(),
            aggregate_id: "i".into(),
            first,
            at: Utc::now(),
            writer: 1,
            events: (0..events)
                .map(|_| StoredEvent {
                    id: Uuid::new_v4(),
                    event_type: "E".into(),
                    event_version: "1".into(),
                    payload: serde_json::value::to_raw_value(&1).expect("raw"),
                    metadata: Metadata::default(),
                    correlation: None,
                    causation: None,
                })
                .collect(),
        })
    }

    fn event_at(seq: u64, index: usize) -> RecordedEvent {
        let stored = message(1, index + 1);
        recorded_ref(&stored, seq, 0).expect("decode").remove(index)
    }

    #[test]
    fn a_reader_keeps_the_tail_of_a_read_and_the_skipped_events_after_it() {
        let handed: Vec<RecordedEvent> = (1..=20).map(|seq| event_at(seq * 2, 0)).collect();
        let skipped: Vec<RecordedEvent> = (1..=20).map(|seq| event_at(seq * 2 + 1, 0)).collect();
        let recent = tail_of(&handed, skipped);
        let seqs: Vec<u64> = recent.iter().map(|e| e.transaction_id).collect();
        // The last 8 handed out (26..=40, even) and the skipped after 26.
        assert_eq!(seqs, (26..=41).collect::<Vec<_>>());
        let only_skipped = tail_of(&[], vec![event_at(3, 0), event_at(5, 0)]);
        assert_eq!(only_skipped.len(), 2);
    }

    #[test]
    fn kept_messages_continue_only_what_is_kept() {
        let key = ("t".to_owned(), "i".to_owned());
        let mut cache = MessageCache::new(10);
        // Read from a snapshot (not from the start): not kept.
        cache.extend(&key, 5, 9, &[(9, message(3, 1))]);
        assert!(cache.read(&key, 0).is_none());
        // From the start: kept, and read after any kept sequence.
        cache.extend(&key, 0, 4, &[(2, message(1, 2)), (4, message(3, 1))]);
        let (kept, reached) = cache.read(&key, 0).expect("kept");
        assert_eq!((kept.len(), reached), (2, 4));
        let (after, _) = cache.read(&key, 2).expect("kept");
        assert_eq!(after.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![4]);
        // A message that does not follow what is kept is not added.
        cache.extend(&key, 7, 8, &[(8, message(5, 1))]);
        assert_eq!(cache.read(&key, 0).expect("kept").1, 4);
        cache.extend(&key, 4, 8, &[(8, message(4, 1))]);
        assert_eq!(cache.read(&key, 0).expect("kept").1, 8);
        // Past the limit, everything is dropped.
        cache.extend(&key, 8, 9, &[(9, message(5, 20))]);
        assert!(cache.read(&key, 0).is_none());
    }
}
