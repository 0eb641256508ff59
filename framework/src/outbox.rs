//! The transactional outbox: messages from code that is not event-sourced,
//! published atomically with that code's own writes, on PostgreSQL and
//! SQLite.
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
//! migrations. The relay reads them the way log readers read events, in one
//! delivery order that a late commit can never overtake:
//!
//! - on **PostgreSQL**, `(transaction id, id)` order, serving only rows of
//!   transactions older than the oldest transaction still in flight, so a
//!   transaction that took an id early and commits late is neither skipped
//!   nor overtaken by later messages of its key; relays on other nodes are
//!   woken by a coalesced `NOTIFY`;
//! - on **SQLite**, row id order: SQLite runs one write transaction at a
//!   time, so ids are handed out in commit order. Enqueue in a transaction
//!   from [`Outbox::begin`] (or the store's
//!   [`Transactional::begin`](crate::Transactional::begin): the writer
//!   connection; `SqliteStore::pool()` is read-only). Relays in
//!   this process are woken at once, relays in other processes at their
//!   next poll.
//!
//! One relay delivers at a time across all nodes (a lease in the
//! projections table, unit `outbox:<table>`); others wait and take over when
//! its lease runs out. Its cursor is stored with the lease, so a restart
//! resumes where it stopped. Delivered messages are deleted after a retention
//! period (7 days by default).
//!
//! The backend side is the [`OutboxStore`] port: a backend that implements it
//! (with [`Checkpoints`](crate::store::Checkpoints) and [`Leases`](crate::store::Leases)) gets the outbox and the relay.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use uuid::Uuid;

use crate::error::StoreError;
use crate::event::Checkpoint;
use crate::port::projections::{Lease, ProjectionState, UnitId};
use crate::projection::HandlerError;
use crate::wake::{WakeSignal, Wakeups};

mod relay;

pub use crate::port::outbox::{
    OutboxMessage, OutboxMessageRecord, OutboxSettings, OutboxStore, OutboxTable, Pending,
    MAX_KEY_LEN,
};
pub use relay::{OutboxRelay, OutboxRelayBuilder};

/// Rows a cleanup statement looks at (and deletes at most).
const CLEANUP_BATCH: u64 = 1000;

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

/// The transactional outbox of a store ([`PostgresStore`](crate::PostgresStore)
/// when the type does not say, or [`SqliteStore`](crate::SqliteStore)).
/// Cloning is cheap and shares the handle.
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
///
/// On SQLite the same, with the transaction begun on the store:
///
/// ```no_run
/// # async fn demo(store: outflow::SqliteStore) -> Result<(), Box<dyn std::error::Error>> {
/// use outflow::outbox::{Outbox, OutboxMessage};
/// use serde_json::json;
///
/// let outbox = Outbox::new(&store).await?;
/// let mut tx = outbox.begin().await?; // the store's writer connection
/// sqlx::query("INSERT INTO users (id, email) VALUES (?, ?)")
///     .bind(42_i64)
///     .bind("ada@example.com")
///     .execute(&mut *tx)
///     .await?;
/// outbox
///     .enqueue(&mut tx, OutboxMessage::new("user-42", "users.signed_up", json!({ "id": 42 })))
///     .await?;
/// outbox.commit(tx).await?;
/// # Ok(()) }
/// ```
pub struct Outbox<S: OutboxStore = crate::store::DefaultOutboxStore> {
    inner: Arc<Inner<S>>,
}

impl<S: OutboxStore> Clone for Outbox<S> {
    fn clone(&self) -> Self {
        Outbox {
            inner: self.inner.clone(),
        }
    }
}

impl<S: OutboxStore> std::fmt::Debug for Outbox<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("table", &self.inner.table.table())
            .field("unit", &self.inner.unit)
            .finish_non_exhaustive()
    }
}

struct Inner<S: OutboxStore> {
    store: S,
    table: S::Outbox,
    unit: UnitId,
    wake: WakeSignal,
}

/// Builds an [`Outbox`].
#[must_use = "a builder does nothing until it is built"]
pub struct OutboxBuilder<S: OutboxStore = crate::store::DefaultOutboxStore> {
    store: S,
    settings: OutboxSettings,
}

impl<S: OutboxStore> std::fmt::Debug for OutboxBuilder<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxBuilder")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl<S: OutboxStore> OutboxBuilder<S> {
    /// The store's events table (the default: the store's own); the outbox
    /// table is `<events table>_outbox`. [`build`](Self::build) checks that it
    /// is the store's.
    pub fn events_table(mut self, name: impl Into<String>) -> Self {
        self.settings.events_table = Some(name.into());
        self
    }

    /// Whether [`Outbox::wake`] also signals relays on other nodes at once
    /// (default `true`): a coalesced `NOTIFY` on PostgreSQL; SQLite has no
    /// such signal (relays in other processes poll).
    pub fn notify_other_nodes(mut self, notify: bool) -> Self {
        self.settings.notify_other_nodes = notify;
        self
    }

    /// The least time between two signals from this handle (default 5 ms):
    /// commits in between share one.
    pub fn notify_interval(mut self, interval: Duration) -> Self {
        self.settings.notify_interval = interval;
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
    pub async fn build(self) -> Result<Outbox<S>, StoreError> {
        let table = self.store.open_outbox(&self.settings).await?;
        Ok(Outbox {
            inner: Arc::new(Inner {
                unit: UnitId {
                    projection: format!("outbox:{}", table.table()),
                    partition: 0,
                },
                store: self.store,
                table,
                wake: WakeSignal::new(),
            }),
        })
    }
}

impl<S: OutboxStore> Outbox<S> {
    /// The outbox of `store`: the table `<events table>_outbox` its
    /// migrations created.
    ///
    /// # Errors
    ///
    /// As [`OutboxBuilder::build`].
    pub async fn new(store: &S) -> Result<Outbox<S>, StoreError> {
        Self::builder(store).build().await
    }

    /// A builder for the outbox of `store`.
    pub fn builder(store: &S) -> OutboxBuilder<S> {
        OutboxBuilder {
            store: store.clone(),
            settings: OutboxSettings::default(),
        }
    }

    /// The outbox table (`<events table>_outbox`).
    pub fn table(&self) -> &str {
        self.inner.table.table()
    }

    /// The projection unit whose lease the relay holds and whose checkpoint
    /// is the relay's cursor (`outbox:<table>`, partition 0).
    pub fn unit(&self) -> &UnitId {
        &self.inner.unit
    }

    /// The `LISTEN`/`NOTIFY` channel relays are woken on (PostgreSQL); empty
    /// on SQLite, whose relays in other processes poll.
    pub fn channel(&self) -> &str {
        self.inner.table.channel()
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.inner.store
    }

    /// A relay builder delivering this outbox's messages to `sink`.
    pub fn relay(&self, sink: impl OutboxSink) -> OutboxRelayBuilder<S> {
        OutboxRelay::builder(self.clone(), sink)
    }

    /// Enqueues a message inside the caller's transaction (`connection` is
    /// the caller's `sqlx` transaction), so it commits or rolls back with the
    /// caller's own writes; returns its message id. After committing, call
    /// [`wake`](Self::wake) (or commit with [`commit`](Self::commit)) so the
    /// relay looks at once; otherwise it finds the message at its next poll.
    ///
    /// Messages of one transaction are delivered in the order they were
    /// enqueued. On PostgreSQL, if the transaction had written before (it
    /// has a transaction id already) and another transaction enqueued a
    /// message of the same key and committed in between, the enqueue fails
    /// with [`StoreError::StaleTransaction`] (retryable): delivered in
    /// transaction order, this message would overtake that one. Retry the
    /// whole transaction. (SQLite runs one write transaction at a time: it
    /// never happens there.)
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidAppend`] for an empty or over-long key or topic,
    /// or a NUL character in the key, topic or headers;
    /// [`StoreError::StaleTransaction`]; [`StoreError::Database`].
    pub async fn enqueue(
        &self,
        connection: &mut <S::Database as sqlx::Database>::Connection,
        mut message: OutboxMessage,
    ) -> Result<Uuid, StoreError> {
        self.validate(&message)?;
        crate::trace::stamp_headers(&mut message.headers);
        let headers =
            serde_json::to_string(&message.headers).map_err(|source| StoreError::Serialize {
                what: "outbox message headers",
                aggregate_type: self.table().to_owned(),
                aggregate_id: message.key.clone(),
                source,
            })?;
        if self
            .inner
            .table
            .enqueue(connection, &message, &headers)
            .await?
        {
            Ok(message.message_id)
        } else {
            Err(StoreError::StaleTransaction {
                aggregate_type: self.table().to_owned(),
                aggregate_id: message.key,
            })
        }
    }

    /// Commits the caller's transaction, then [wakes](Self::wake) the relay.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`]; the transaction's writes and messages are
    /// then lost.
    pub async fn commit(&self, tx: sqlx::Transaction<'_, S::Database>) -> Result<(), StoreError> {
        self.inner.table.commit(tx).await?;
        self.wake();
        Ok(())
    }

    /// A write transaction on the outbox's database, for the caller's own
    /// writes and [`enqueue`](Self::enqueue)s; finish it with
    /// [`commit`](Self::commit). On SQLite this is the store's writer
    /// connection (`BEGIN IMMEDIATE`); on PostgreSQL a pooled connection,
    /// like `store.pool().begin()`.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    pub async fn begin(&self) -> Result<sqlx::Transaction<'static, S::Database>, StoreError> {
        self.inner.table.begin().await
    }

    /// Enqueues one message in a transaction of its own and wakes the relay.
    ///
    /// # Errors
    ///
    /// As [`enqueue`](Self::enqueue).
    pub async fn send(&self, message: OutboxMessage) -> Result<Uuid, StoreError> {
        let mut tx = self.inner.table.begin().await?;
        let id = self.enqueue(&mut tx, message).await?;
        self.commit(tx).await?;
        Ok(id)
    }

    /// Wakes relays after a commit that enqueued messages: at once in this
    /// process, and on other nodes through one coalesced signal where the
    /// backend has one (never sent inside the caller's transaction).
    pub fn wake(&self) {
        self.inner.wake.wake();
        self.inner.table.notify_others();
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
        let pending = self.inner.table.pending(cursor, 10_000_000).await?;
        Ok(OutboxStatus {
            pending: pending.count,
            oldest_pending_age: pending.oldest_age,
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
    /// PostgreSQL cluster (see
    /// [`PostgresStore::rebase_after_restore`](crate::PostgresStore::rebase_after_restore)):
    /// when the stored transaction ids are ahead of this cluster's, delivered
    /// messages get transaction id 0, pending ones 1 (keeping each key's
    /// order), and the relay's cursor goes back to the start (a running
    /// relay loses its lease). Returns the number of messages changed, 0 when
    /// nothing was ahead (always on SQLite, whose order is its row ids). Run
    /// it once after the restore, before writers and relays start.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    pub async fn rebase_after_restore(&self) -> Result<u64, StoreError> {
        let store = &self.inner.store;
        let mut tx = store.begin().await?;
        let Some(changed) = self.inner.table.rebase(&mut tx).await? else {
            return Ok(0);
        };
        store
            .reset_projection(&mut tx, &self.inner.unit.projection, 0)
            .await?;
        store.commit(tx).await?;
        self.wake();
        Ok(changed)
    }

    fn validate(&self, message: &OutboxMessage) -> Result<(), StoreError> {
        let invalid = |reason: String| StoreError::InvalidAppend {
            aggregate_type: self.table().to_owned(),
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
                    "`{}` contains a NUL character, which the outbox does not store \
                     (PostgreSQL cannot)",
                    text.escape_debug()
                )));
            }
        }
        Ok(())
    }

    pub(crate) fn wakeups(&self, poll_interval: Duration) -> Wakeups {
        self.inner.wake.subscribe(poll_interval)
    }

    /// Waits for other nodes' signals until `stop`, waking this process's
    /// relay on each.
    pub(crate) async fn listen(&self, stop: &tokio_util::sync::CancellationToken) {
        let wake = || self.inner.wake.wake();
        self.inner.table.listen(&wake, stop).await;
    }

    /// The next committed messages after `after`, in delivery order.
    pub(crate) async fn read(
        &self,
        after: Checkpoint,
        limit: usize,
    ) -> Result<Vec<OutboxMessageRecord>, StoreError> {
        self.inner.table.read(after, limit).await
    }

    /// Whether undelivered messages lie after `after` although a read from
    /// it found none: they wait behind a transaction still in flight (a
    /// read finds them once it ends, and nothing signals that).
    pub(crate) async fn held_back(&self, after: Checkpoint) -> Result<bool, StoreError> {
        self.inner.table.held_back(after).await
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
        let ids: Vec<u64> = batch.iter().map(|m| m.id).collect();
        self.inner.table.mark_delivered(&mut tx, &ids).await?;
        store.commit(tx).await?;
        Ok(true)
    }

    /// One cleanup statement; the number of messages deleted.
    pub(crate) async fn cleanup_batch(&self, retention: Duration) -> Result<u64, StoreError> {
        self.inner
            .table
            .cleanup_batch(retention, CLEANUP_BATCH)
            .await
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
                tracing::debug!(deleted, table = %self.table(), "outbox cleanup");
                metrics::counter!("outflow_outbox_deleted_total", "outbox" => self.table().to_owned()).increment(deleted);
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
