//! The transactional outbox: messages from code that is not event-sourced,
//! published atomically with that code's own writes. PostgreSQL only (it
//! orders deliveries by PostgreSQL's transaction ids); on SQLite, react to
//! events with a projection's `effects` hook instead.
//!
//! The classic case is "save the user row and publish `UserSignedUp`": the
//! application inserts its row and [enqueues](Outbox::enqueue) the message in
//! **its own transaction**, so both commit or neither does. An
//! [`OutboxRelay`] then hands committed messages to an [`OutboxSink`] (an
//! in-process handler, a message broker) and marks them delivered.
//!
//! **Delivery guarantee: at least once, in order per key.** Every committed
//! message reaches the sink, after every message of its key that was enqueued
//! before it; a message enqueued in a transaction that rolled back never
//! exists. A message can reach the sink more than once (the sink failed
//! half-way, the relay died before recording the delivery): consumers
//! deduplicate by [`OutboxMessageRecord::message_id`].
//!
//! Messages live in the table `<events table>_outbox`, created by the store's
//! migrations. The relay reads them the way log readers read events: in
//! `(transaction id, id)` order, and only rows of transactions older than the
//! oldest transaction still in flight, so a transaction that took an id early
//! and commits late is neither skipped nor overtaken by later messages of its
//! key. One relay delivers at a time across all nodes (a lease in the
//! projections table, unit `outbox:<table>`); others wait and take over when
//! its lease runs out. Its cursor is stored with the lease, so a restart
//! resumes where it stopped. Delivered messages are deleted after a retention
//! period (7 days by default).
//!
//! PostgreSQL only.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::postgres::{PgConnection, PgPool, PgRow};
use sqlx::{Postgres, Row, Transaction};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::error::ConfigError;
use crate::error::StoreError;
use crate::event::Checkpoint;
use crate::names::Identifier;
use crate::projection::HandlerError;
use crate::store::postgres::{db, pg_error, spawn_notifier, to_i64, PostgresStore};
use crate::store::projections::{Checkpoints, Lease, ProjectionState, UnitId};
use crate::store::Transactional;
use crate::wake::{WakeSignal, Wakeups};

mod relay;

pub use relay::{OutboxRelay, OutboxRelayBuilder};

/// Longest message key or topic, in bytes (keys are indexed).
pub const MAX_KEY_LEN: usize = 1024;

/// Rows a cleanup statement looks at (and deletes at most).
const CLEANUP_BATCH: i64 = 1000;

/// A message to enqueue.
///
/// ```
/// use outflow::outbox::OutboxMessage;
/// let message = OutboxMessage::new("user-42", "users.signed_up", serde_json::json!({ "id": 42 }))
///     .header("content-type", "application/json");
/// assert_eq!(message.headers["content-type"], "application/json");
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxMessage {
    /// A stable id, unique per message (default: a new UUID v7). Brokers and
    /// consumers deduplicate redeliveries by it; set it yourself to make a
    /// retried business operation produce the same id.
    pub message_id: Uuid,
    /// The ordering key: messages of one key are delivered in enqueue order.
    /// Typically the id of the entity the message is about. Not empty.
    pub key: String,
    /// Where the message goes (a broker subject, a handler's name). Not empty.
    pub topic: String,
    /// The body, delivered exactly as given.
    pub payload: Value,
    /// Headers, delivered exactly as given.
    pub headers: BTreeMap<String, String>,
}

impl Default for OutboxMessage {
    /// An empty message with a new id (key and topic must still be set).
    fn default() -> Self {
        OutboxMessage {
            message_id: Uuid::now_v7(),
            key: String::new(),
            topic: String::new(),
            payload: Value::Null,
            headers: BTreeMap::new(),
        }
    }
}

impl OutboxMessage {
    /// A message with a new id and no headers.
    pub fn new(key: impl Into<String>, topic: impl Into<String>, payload: Value) -> Self {
        OutboxMessage {
            key: key.into(),
            topic: topic.into(),
            payload,
            ..OutboxMessage::default()
        }
    }

    /// Adds (or replaces) a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Sets the message id.
    pub fn with_message_id(mut self, message_id: Uuid) -> Self {
        self.message_id = message_id;
        self
    }
}

/// A message as stored, handed to an [`OutboxSink`].
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxMessageRecord {
    /// Its row id in the outbox table (the second part of its place in
    /// delivery order).
    pub id: u64,
    /// Id of the transaction that enqueued it (the first part of its place).
    pub transaction_id: u64,
    /// The stable message id: use it as the broker's deduplication id
    /// (e.g. `Nats-Msg-Id`) and as the consumer's idempotency key.
    pub message_id: Uuid,
    /// The ordering key.
    pub key: String,
    /// The topic.
    pub topic: String,
    /// The body.
    pub payload: Value,
    /// The headers.
    pub headers: BTreeMap<String, String>,
    /// When it was enqueued.
    pub created_at: DateTime<Utc>,
}

impl OutboxMessageRecord {
    /// Its place in delivery order.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint::new(self.transaction_id, self.id)
    }
}

/// Where an [`OutboxRelay`] delivers messages: an in-process handler
/// ([`InProcessSink`]), a message broker.
///
/// `deliver` gets a batch in delivery order; several keys interleave in it,
/// each key's messages in order. Return `Ok` only once every message of the
/// batch is delivered. On `Err` the relay waits (its [`RetryPolicy`]
/// backoff), reads again from its cursor and delivers the same messages
/// again (possibly followed by newer ones) — forever: a message is never
/// skipped, and no later message of its key is delivered before it. A sink
/// that delivered part of a batch before failing sees that part again, so
/// consumers deduplicate by [`OutboxMessageRecord::message_id`].
///
/// [`RetryPolicy`]: crate::projection::RetryPolicy
#[async_trait]
pub trait OutboxSink: Send + Sync + 'static {
    /// Delivers a batch of messages, in order.
    ///
    /// # Errors
    ///
    /// Any [`HandlerError`]; the relay retries the batch.
    async fn deliver(&self, messages: &[OutboxMessageRecord]) -> Result<(), HandlerError>;
}

#[async_trait]
impl<T: OutboxSink + ?Sized> OutboxSink for Arc<T> {
    async fn deliver(&self, messages: &[OutboxMessageRecord]) -> Result<(), HandlerError> {
        (**self).deliver(messages).await
    }
}

/// An [`OutboxSink`] that calls a function in this process with each batch.
///
/// ```
/// use outflow::outbox::{InProcessSink, OutboxMessageRecord};
/// use outflow::projection::HandlerError;
///
/// let sink = InProcessSink::new(|batch: Vec<OutboxMessageRecord>| async move {
///     for message in &batch {
///         println!("{} {} {}", message.topic, message.key, message.payload);
///     }
///     Ok::<(), HandlerError>(())
/// });
/// ```
pub struct InProcessSink<F> {
    handler: F,
}

impl<F, Fut> InProcessSink<F>
where
    F: Fn(Vec<OutboxMessageRecord>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    /// A sink calling `handler` with each batch (a copy, so the handler may
    /// keep it).
    pub fn new(handler: F) -> Self {
        InProcessSink { handler }
    }
}

impl<F> std::fmt::Debug for InProcessSink<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InProcessSink")
    }
}

#[async_trait]
impl<F, Fut> OutboxSink for InProcessSink<F>
where
    F: Fn(Vec<OutboxMessageRecord>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    async fn deliver(&self, messages: &[OutboxMessageRecord]) -> Result<(), HandlerError> {
        (self.handler)(messages.to_vec()).await
    }
}

/// How far the outbox's delivery has come, as [`Outbox::status`] reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxStatus {
    /// Committed messages not yet delivered (counted up to 10 million).
    pub pending: u64,
    /// How long ago the oldest of them was enqueued (server clock).
    pub oldest_pending_age: Option<Duration>,
    /// The relay's cursor: the last message delivered.
    pub cursor: Checkpoint,
    /// The node whose relay holds the lease, while it is valid.
    pub relay: Option<String>,
    /// What the relay is doing ([`ProjectionState::Idle`] before any ran).
    pub state: ProjectionState,
    /// The last error while the relay retries.
    pub last_error: Option<String>,
    /// Messages delivered so far (the count the lease row keeps).
    pub delivered: u64,
}

/// The transactional outbox of a [`PostgresStore`]. Cloning is cheap and
/// shares the handle.
///
/// Delivery guarantee: **at least once, in order per key** (see the
/// [module documentation](self)).
///
/// ```no_run
/// # async fn demo(store: outflow::PostgresStore) -> Result<(), Box<dyn std::error::Error>> {
/// use outflow::outbox::{InProcessSink, Outbox, OutboxMessage, OutboxMessageRecord};
/// use outflow::projection::HandlerError;
/// use serde_json::json;
/// use tokio_util::sync::CancellationToken;
///
/// let outbox = Outbox::new(&store).await?;
///
/// // Save the user row and publish `UserSignedUp` atomically.
/// let mut tx = store.pool().begin().await?;
/// sqlx::query("INSERT INTO users (id, email) VALUES ($1, $2)")
///     .bind(42_i64)
///     .bind("ada@example.com")
///     .execute(&mut *tx)
///     .await?;
/// outbox
///     .enqueue(&mut tx, OutboxMessage::new("user-42", "users.signed_up", json!({ "id": 42 })))
///     .await?;
/// outbox.commit(tx).await?; // commits, then wakes the relay
///
/// // On every node: one relay delivers, the others stand by.
/// let sink = InProcessSink::new(|batch: Vec<OutboxMessageRecord>| async move {
///     for message in &batch {
///         println!("{} {}: {}", message.topic, message.key, message.payload);
///     }
///     Ok::<(), HandlerError>(())
/// });
/// let relay = outbox.relay(sink).build()?;
/// let shutdown = CancellationToken::new();
/// tokio::spawn({
///     let shutdown = shutdown.clone();
///     async move { relay.run(shutdown).await }
/// });
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Outbox {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: PostgresStore,
    table: String,
    unit: UnitId,
    channel: String,
    sql: Queries,
    wake: WakeSignal,
    notify: Option<mpsc::Sender<()>>,
    shutdown: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Builds an [`Outbox`].
#[derive(Debug)]
#[must_use = "a builder does nothing until it is built"]
pub struct OutboxBuilder {
    store: PostgresStore,
    events_table: String,
    notify_other_nodes: bool,
    notify_interval: Duration,
}

impl OutboxBuilder {
    /// The store's events table (the default: the store's own); the outbox
    /// table is `<events table>_outbox`. [`build`](Self::build) checks that it
    /// is the store's.
    pub fn events_table(mut self, name: impl Into<String>) -> Self {
        self.events_table = name.into();
        self
    }

    /// Whether [`Outbox::wake`] sends a coalesced `NOTIFY` so relays on other
    /// nodes wake at once (default `true`).
    pub fn notify_other_nodes(mut self, notify: bool) -> Self {
        self.notify_other_nodes = notify;
        self
    }

    /// The least time between two `NOTIFY`s from this handle (default 5 ms):
    /// commits in between share one notification.
    pub fn notify_interval(mut self, interval: Duration) -> Self {
        self.notify_interval = interval;
        self
    }

    /// Checks the names and that the outbox table exists, and starts the
    /// notifier.
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidIdentifier`] for a bad events table name or a
    /// derived name that is too long; [`StoreError::Config`] when the events
    /// table is not the store's or the outbox table is missing (the store's
    /// migrations were not applied); [`StoreError::Database`].
    pub async fn build(self) -> Result<Outbox, StoreError> {
        let events = Identifier::parse(&self.events_table, "events table")?;
        let store_channel = self.store.channel().to_owned();
        if events.to_string() != self.store.events_table() {
            return Err(ConfigError::Invalid {
                setting: "outbox events table",
                reason: format!(
                    "the outbox was given the events table `{events}`, which is not the store's \
                     (`{}`)",
                    self.store.events_table()
                ),
            }
            .into());
        }
        let table = events.derived("outbox", "outbox table")?;
        let channel = format!("{store_channel}_outbox");
        if channel.len() > 63 {
            return Err(StoreError::InvalidIdentifier {
                what: "outbox notification channel derived from the events table",
                name: channel,
                reason: "longer than 63 bytes",
            });
        }
        let sql = Queries::new(&table.quoted());
        let exists: bool = sqlx::query_scalar(&sql.table_exists)
            .bind(table.quoted())
            .fetch_one(self.store.pool())
            .await
            .map_err(db("looking for the outbox table"))?;
        if !exists {
            return Err(ConfigError::MissingTable {
                table: table.to_string(),
                hint: "apply the store's migrations (PostgresStoreBuilder::migrate or \
                       PostgresStore::migrate)",
            }
            .into());
        }
        let shutdown = CancellationToken::new();
        let notify = self.notify_other_nodes.then(|| {
            spawn_notifier(
                self.store.pool().clone(),
                channel.clone(),
                String::new(),
                self.notify_interval,
                shutdown.clone(),
            )
        });
        Ok(Outbox {
            inner: Arc::new(Inner {
                unit: UnitId {
                    projection: format!("outbox:{table}"),
                    partition: 0,
                },
                table: table.to_string(),
                store: self.store,
                channel,
                sql,
                wake: WakeSignal::new(),
                notify,
                shutdown,
            }),
        })
    }
}

impl Outbox {
    /// The outbox of `store`: the table `<events table>_outbox` its
    /// migrations created.
    ///
    /// # Errors
    ///
    /// As [`OutboxBuilder::build`].
    pub async fn new(store: &PostgresStore) -> Result<Outbox, StoreError> {
        Self::builder(store).build().await
    }

    /// A builder for the outbox of `store`.
    pub fn builder(store: &PostgresStore) -> OutboxBuilder {
        OutboxBuilder {
            store: store.clone(),
            events_table: store.events_table().to_owned(),
            notify_other_nodes: true,
            notify_interval: Duration::from_millis(5),
        }
    }

    /// The outbox table (`<events table>_outbox`).
    pub fn table(&self) -> &str {
        &self.inner.table
    }

    /// The projection unit whose lease the relay holds and whose checkpoint
    /// is the relay's cursor (`outbox:<table>`, partition 0).
    pub fn unit(&self) -> &UnitId {
        &self.inner.unit
    }

    /// The `LISTEN`/`NOTIFY` channel relays are woken on.
    pub fn channel(&self) -> &str {
        &self.inner.channel
    }

    /// The store.
    pub fn store(&self) -> &PostgresStore {
        &self.inner.store
    }

    /// A relay builder delivering this outbox's messages to `sink`.
    pub fn relay(&self, sink: impl OutboxSink) -> OutboxRelayBuilder {
        OutboxRelay::builder(self.clone(), sink)
    }

    /// Enqueues a message inside the caller's transaction (`connection` is
    /// the caller's `sqlx` transaction), so it commits or rolls back with the
    /// caller's own writes; returns its message id. After committing, call
    /// [`wake`](Self::wake) (or commit with [`commit`](Self::commit)) so the
    /// relay looks at once; otherwise it finds the message at its next poll.
    ///
    /// Messages of one transaction are delivered in the order they were
    /// enqueued. If the transaction had written before (it has a transaction
    /// id already) and another transaction enqueued a message of the same key
    /// and committed in between, the enqueue fails with
    /// [`StoreError::StaleTransaction`] (retryable): delivered in transaction
    /// order, this message would overtake that one. Retry the whole
    /// transaction.
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidAppend`] for an empty or over-long key or topic,
    /// or a NUL character in the key, topic or headers;
    /// [`StoreError::StaleTransaction`]; [`StoreError::Database`].
    pub async fn enqueue(
        &self,
        connection: &mut PgConnection,
        message: OutboxMessage,
    ) -> Result<Uuid, StoreError> {
        self.validate(&message)?;
        let headers =
            serde_json::to_string(&message.headers).map_err(|source| StoreError::Serialize {
                what: "outbox message headers",
                aggregate_type: self.inner.table.clone(),
                aggregate_id: message.key.clone(),
                source,
            })?;
        let inserted = sqlx::query(&self.inner.sql.enqueue)
            .bind(message.message_id)
            .bind(&message.key)
            .bind(&message.topic)
            .bind(message.payload.to_string())
            .bind(headers)
            .fetch_optional(&mut *connection)
            .await
            .map_err(db("enqueueing an outbox message"))?;
        match inserted {
            Some(_) => Ok(message.message_id),
            None => Err(StoreError::StaleTransaction {
                aggregate_type: self.inner.table.clone(),
                aggregate_id: message.key,
            }),
        }
    }

    /// Commits the caller's transaction, then [wakes](Self::wake) the relay.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`]; the transaction's writes and messages are
    /// then lost.
    pub async fn commit(&self, tx: Transaction<'_, Postgres>) -> Result<(), StoreError> {
        tx.commit()
            .await
            .map_err(db("committing a transaction with outbox messages"))?;
        self.wake();
        Ok(())
    }

    /// Enqueues one message in a transaction of its own and wakes the relay.
    ///
    /// # Errors
    ///
    /// As [`enqueue`](Self::enqueue).
    pub async fn send(&self, message: OutboxMessage) -> Result<Uuid, StoreError> {
        let mut tx = crate::store::postgres::begin_owned(self.inner.store.pool())
            .await
            .map_err(db("starting an outbox transaction"))?;
        let id = self.enqueue(&mut tx, message).await?;
        self.commit(tx).await?;
        Ok(id)
    }

    /// Wakes relays after a commit that enqueued messages: at once in this
    /// process, and on other nodes through one coalesced `NOTIFY` (never sent
    /// inside the caller's transaction).
    pub fn wake(&self) {
        self.inner.wake.wake();
        if let Some(notify) = &self.inner.notify {
            // Full means a NOTIFY is already pending: this commit rides on it.
            let _ = notify.try_send(());
        }
    }

    /// Pending messages, the age of the oldest, and the relay's state.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    pub async fn status(&self) -> Result<OutboxStatus, StoreError> {
        let unit = self
            .inner
            .store
            .units(Some(&self.inner.unit.projection))
            .await?
            .into_iter()
            .find(|u| u.unit == self.inner.unit);
        let cursor = unit.as_ref().map_or(Checkpoint::START, |u| u.checkpoint);
        let row = sqlx::query(&self.inner.sql.pending)
            .bind(cursor.transaction_id.to_string())
            .bind(to_i64(cursor.position))
            .bind(10_000_000_i64)
            .fetch_one(self.inner.store.pool())
            .await
            .map_err(db("counting pending outbox messages"))?;
        let get = db("counting pending outbox messages");
        let pending: i64 = row.try_get("pending").map_err(get)?;
        let age: Option<f64> = row
            .try_get("oldest_age_seconds")
            .map_err(db("counting pending outbox messages"))?;
        Ok(OutboxStatus {
            pending: u64::try_from(pending).unwrap_or(0),
            oldest_pending_age: age
                .map(|seconds| Duration::try_from_secs_f64(seconds.max(0.0)).unwrap_or_default()),
            cursor,
            relay: unit
                .as_ref()
                .and_then(|u| u.owner.clone().filter(|_| u.lease_valid)),
            state: unit.as_ref().map_or(ProjectionState::Idle, |u| u.state),
            last_error: unit.as_ref().and_then(|u| u.last_error.clone()),
            delivered: unit.as_ref().map_or(0, |u| u.processed),
        })
    }

    /// Deletes every delivered message older than `retention` now; returns
    /// how many. The leading relay does this by itself every cleanup
    /// interval; pending messages are never deleted.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    pub async fn cleanup(&self, retention: Duration) -> Result<u64, StoreError> {
        let mut total = 0;
        loop {
            let deleted = self.cleanup_batch(retention).await?;
            total += deleted;
            if deleted == 0 {
                return Ok(total);
            }
        }
    }

    /// Repairs the outbox after a logical dump and restore into another
    /// cluster (see [`PostgresStore::rebase_after_restore`]): when the stored
    /// transaction ids are ahead of this cluster's, delivered messages get
    /// transaction id 0, pending ones 1 (keeping each key's order), and the
    /// relay's cursor goes back to the start (a running relay loses its
    /// lease). Returns the number of messages changed, 0 when nothing was
    /// ahead. Run it once after the restore, before writers and relays start.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    pub async fn rebase_after_restore(&self) -> Result<u64, StoreError> {
        let failed = db("rebasing the outbox after a restore");
        let store = &self.inner.store;
        let mut tx = store.begin().await?;
        let ahead: bool = sqlx::query_scalar(&self.inner.sql.ahead)
            .fetch_one(&mut *tx)
            .await
            .map_err(failed)?;
        if !ahead {
            return Ok(0);
        }
        let mut changed = 0;
        for sql in [
            &self.inner.sql.rebase_delivered,
            &self.inner.sql.rebase_pending,
        ] {
            changed += sqlx::query(sql)
                .execute(&mut *tx)
                .await
                .map_err(db("rebasing the outbox after a restore"))?
                .rows_affected();
        }
        store
            .reset_projection(&mut tx, &self.inner.unit.projection, 0)
            .await?;
        store.commit(tx).await?;
        self.wake();
        Ok(changed)
    }

    fn validate(&self, message: &OutboxMessage) -> Result<(), StoreError> {
        let invalid = |reason: String| StoreError::InvalidAppend {
            aggregate_type: self.inner.table.clone(),
            aggregate_id: message.key.clone(),
            reason,
        };
        for (what, text) in [("key", &message.key), ("topic", &message.topic)] {
            if text.is_empty() {
                return Err(invalid(format!("empty message {what}")));
            }
            if text.len() > MAX_KEY_LEN {
                return Err(invalid(format!(
                    "message {what} of {} bytes (at most {MAX_KEY_LEN})",
                    text.len()
                )));
            }
        }
        let texts = [&message.key, &message.topic]
            .into_iter()
            .chain(message.headers.iter().flat_map(|(k, v)| [k, v]));
        for text in texts {
            if text.contains('\0') {
                return Err(invalid(format!(
                    "`{}` contains a NUL character, which PostgreSQL cannot store",
                    text.escape_debug()
                )));
            }
        }
        Ok(())
    }

    pub(crate) fn wakeups(&self, poll_interval: Duration) -> Wakeups {
        self.inner.wake.subscribe(poll_interval)
    }

    pub(crate) fn wake_here(&self) {
        self.inner.wake.wake();
    }

    pub(crate) fn pool(&self) -> &PgPool {
        self.inner.store.pool()
    }

    /// The next committed messages after `after`, in delivery order.
    pub(crate) async fn read(
        &self,
        after: Checkpoint,
        limit: usize,
    ) -> Result<Vec<OutboxMessageRecord>, StoreError> {
        let rows = sqlx::query(&self.inner.sql.read)
            .bind(after.transaction_id.to_string())
            .bind(to_i64(after.position))
            .bind(to_i64(limit as u64))
            .fetch_all(self.inner.store.pool())
            .await
            .map_err(db("reading the outbox"))?;
        rows.iter()
            .map(|row| record_from_row(row, &self.inner.table))
            .collect()
    }

    /// Whether undelivered messages lie after `after` although a read from
    /// it found none: they wait behind a transaction still in flight (a
    /// read finds them once it ends, and nothing signals that).
    pub(crate) async fn held_back(&self, after: Checkpoint) -> Result<bool, StoreError> {
        sqlx::query_scalar(&self.inner.sql.held_back)
            .bind(after.transaction_id.to_string())
            .bind(to_i64(after.position))
            .fetch_one(self.inner.store.pool())
            .await
            .map_err(db("looking for held-back outbox messages"))
    }

    /// Records a delivered batch: moves the cursor (only while `lease` is
    /// current) and marks the messages delivered, in one transaction.
    /// `false` when the lease was lost (nothing is written). The cursor
    /// moves only from `from`: when an earlier attempt of this very batch
    /// committed but its acknowledgement was lost, the retry finds the cursor
    /// at the batch's end and reports success without writing again.
    pub(crate) async fn commit_delivery(
        &self,
        lease: &Lease,
        from: Checkpoint,
        batch: &[OutboxMessageRecord],
    ) -> Result<bool, StoreError> {
        let Some(last) = batch.last() else {
            return Ok(true);
        };
        let to = last.checkpoint();
        let store = &self.inner.store;
        let mut tx = store.begin().await?;
        if !store
            .save_checkpoint(&mut tx, lease, from, to, batch.len() as u64)
            .await?
        {
            drop(tx);
            let units = store.units(Some(&lease.unit.projection)).await?;
            return Ok(units
                .iter()
                .any(|u| u.unit == lease.unit && u.epoch == lease.epoch && u.checkpoint == to));
        }
        let ids: Vec<i64> = batch.iter().map(|m| to_i64(m.id)).collect();
        sqlx::query(&self.inner.sql.mark_delivered)
            .bind(&ids)
            .execute(&mut *tx)
            .await
            .map_err(db("marking outbox messages delivered"))?;
        store.commit(tx).await?;
        Ok(true)
    }

    /// One cleanup statement; the number of messages deleted.
    pub(crate) async fn cleanup_batch(&self, retention: Duration) -> Result<u64, StoreError> {
        Ok(sqlx::query(&self.inner.sql.cleanup)
            .bind(retention.as_secs_f64())
            .bind(CLEANUP_BATCH)
            .execute(self.inner.store.pool())
            .await
            .map_err(db("deleting delivered outbox messages"))?
            .rows_affected())
    }

    /// Cleanup statements until none is left or `budget` has passed; `true`
    /// when more may be due.
    pub(crate) async fn cleanup_for(
        &self,
        retention: Duration,
        budget: Duration,
    ) -> Result<bool, StoreError> {
        let started = Instant::now();
        loop {
            let deleted = self.cleanup_batch(retention).await?;
            if deleted > 0 {
                tracing::debug!(deleted, table = %self.inner.table, "outbox cleanup");
                metrics::counter!("outflow_outbox_deleted_total").increment(deleted);
            }
            if deleted == 0 {
                return Ok(false);
            }
            if started.elapsed() >= budget {
                return Ok(true);
            }
        }
    }
}

/// The outbox queries, one `.sql` file each under
/// `store/postgres/queries/outbox/`, rendered with the outbox table's name.
#[derive(Debug)]
struct Queries {
    table_exists: String,
    enqueue: String,
    read: String,
    held_back: String,
    mark_delivered: String,
    cleanup: String,
    pending: String,
    ahead: String,
    rebase_delivered: String,
    rebase_pending: String,
}

impl Queries {
    fn new(outbox: &str) -> Self {
        let render = |sql: &str| sql.trim().replace("{outbox}", outbox);
        Queries {
            table_exists: render(include_str!(
                "store/postgres/queries/outbox/table_exists.sql"
            )),
            enqueue: render(include_str!("store/postgres/queries/outbox/enqueue.sql")),
            read: render(include_str!("store/postgres/queries/outbox/read.sql")),
            held_back: render(include_str!("store/postgres/queries/outbox/held_back.sql")),
            mark_delivered: render(include_str!(
                "store/postgres/queries/outbox/mark_delivered.sql"
            )),
            cleanup: render(include_str!("store/postgres/queries/outbox/cleanup.sql")),
            pending: render(include_str!("store/postgres/queries/outbox/pending.sql")),
            ahead: render(include_str!("store/postgres/queries/outbox/ahead.sql")),
            rebase_delivered: render(include_str!(
                "store/postgres/queries/outbox/rebase_delivered.sql"
            )),
            rebase_pending: render(include_str!(
                "store/postgres/queries/outbox/rebase_pending.sql"
            )),
        }
    }
}

fn record_from_row(row: &PgRow, table: &str) -> Result<OutboxMessageRecord, StoreError> {
    let get = |e| pg_error("decoding an outbox message", e);
    let corrupt = |what: String| StoreError::Corrupt {
        table: table.to_owned(),
        what,
    };
    let id: i64 = row.try_get("id").map_err(get)?;
    let id = u64::try_from(id).map_err(|_| corrupt(format!("negative id {id}")))?;
    let txid: String = row.try_get("txid").map_err(get)?;
    let transaction_id = txid
        .parse()
        .map_err(|_| corrupt(format!("transaction id `{txid}` is not a number")))?;
    let headers: Value = row.try_get("headers").map_err(get)?;
    let headers = serde_json::from_value(headers).map_err(|e| {
        corrupt(format!(
            "headers of message {id} are not a map of strings: {e}"
        ))
    })?;
    Ok(OutboxMessageRecord {
        id,
        transaction_id,
        message_id: row.try_get("message_id").map_err(get)?,
        key: row.try_get("key").map_err(get)?,
        topic: row.try_get("topic").map_err(get)?,
        payload: row.try_get("payload").map_err(get)?,
        headers,
        created_at: row.try_get("created_at").map_err(get)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outbox_query_is_rendered() {
        let queries = Queries::new("\"events_outbox\"");
        for (name, sql) in [
            ("table_exists", &queries.table_exists),
            ("enqueue", &queries.enqueue),
            ("read", &queries.read),
            ("mark_delivered", &queries.mark_delivered),
            ("cleanup", &queries.cleanup),
            ("pending", &queries.pending),
            ("ahead", &queries.ahead),
            ("rebase_delivered", &queries.rebase_delivered),
            ("rebase_pending", &queries.rebase_pending),
        ] {
            assert!(!sql.is_empty(), "query `{name}` missing");
            assert!(
                !sql.contains('{'),
                "query `{name}` has an unrendered placeholder: {sql}"
            );
        }
    }
}
