//! Building a store: checking the prefix, provisioning the streams and
//! the bucket (each step retried until the timeout), and checking the
//! partition count against the one recorded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::context::Context;
use async_nats::jetstream::kv;
use async_nats::jetstream::stream::{self, Stream};

use crate::error::{ConfigError, StoreError};
use crate::wake::WakeSignal;

use super::cache::*;
use super::codec::*;
use super::errors::*;
use super::state::*;
use crate::nats::streams::ProvisionError;

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
                announced: super::announced::Announced::default(),
                listening: std::sync::atomic::AtomicBool::new(false),
                last_signal: std::sync::atomic::AtomicU64::new(0),
                signal_pending: std::sync::atomic::AtomicBool::new(false),
                started: std::time::Instant::now(),
                key_ring: Mutex::new(None),
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

pub(super) fn validate_prefix(prefix: &str) -> Result<(), StoreError> {
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
pub(super) async fn ensure_bucket(
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

/// Records the partition count in the snapshot bucket on first use, and
/// refuses another one afterwards.
pub(super) async fn check_partition_count(
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

pub(super) async fn ensure_stream(
    js: &Context,
    name: &str,
    subjects: Vec<String>,
    replicas: usize,
) -> Result<Stream, StoreError> {
    let config = stream::Config {
        name: name.to_owned(),
        subjects: subjects.clone(),
        storage: stream::StorageType::File,
        num_replicas: replicas,
        allow_direct: true,
        deny_delete: true,
        deny_purge: true,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    };
    match crate::nats::streams::ensure_stream(js, config, true).await {
        Ok(stream) => Ok(stream),
        Err(ProvisionError::InvalidName) => Err(ConfigError::Invalid {
            setting: "prefix",
            reason: format!("`{name}` is not a valid stream name"),
        }
        .into()),
        Err(ProvisionError::SubjectsDiffer { existing }) => Err(ConfigError::Invalid {
            setting: "prefix",
            reason: format!("stream `{name}` exists with subjects {existing:?}, not {subjects:?}"),
        }
        .into()),
        Err(ProvisionError::Nats { action, source }) => Err(nats_error(action, source)),
    }
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
}
